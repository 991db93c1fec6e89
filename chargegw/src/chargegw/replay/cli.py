"""The ``chargegw replay`` command (the engine is loaded when it runs)."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any, NoReturn

import click

#: exit statuses
EXIT_SAME, EXIT_DIFFERENT, EXIT_UNUSABLE = 0, 1, 2


def _target(text: str | None) -> tuple[str, int] | None:
    if text is None:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter("expected HOST:PORT, e.g. 127.0.0.1:8900", param_hint="--target")
    return host.strip("[]"), int(port)


def _speed(speed: float | None, realtime: bool, fast: bool) -> float | None:
    flags = {"--speed": speed is not None, "--realtime": realtime, "--fast": fast}
    chosen = [name for name, given in flags.items() if given]
    if len(chosen) > 1:
        raise click.UsageError(
            f"choose one of --speed, --realtime, --fast (got {', '.join(chosen)})"
        )
    if realtime:
        return 1.0
    return speed


@click.command("replay")
@click.argument("capture", type=click.Path(dir_okay=False))
@click.option(
    "--target",
    metavar="HOST:PORT",
    help="Feed a running gateway's device port instead of a fresh in-process gateway.",
)
@click.option(
    "--target-api",
    metavar="URL",
    help="The HTTP API of the --target gateway (e.g. http://127.0.0.1:8980), to check that "
    "it serves no real pile.",
)
@click.option(
    "--target-api-key",
    envvar="CHARGEGW_REPLAY_API_KEY",
    help="API key for --target-api (or CHARGEGW_REPLAY_API_KEY).",
)
@click.option(
    "--i-know-this-is-live",
    "live_ok",
    is_flag=True,
    help="Feed the --target even if it may serve real piles.",
)
@click.option(
    "--dsn",
    help="PostgreSQL server for the scratch database (default: the embedded server in --data-dir).",
)
@click.option("--data-dir", help="Where the embedded PostgreSQL keeps its data.")
@click.option(
    "--speed",
    type=click.FloatRange(min=0.001),
    help="Original timing divided by this factor (--speed 50).",
)
@click.option("--realtime", is_flag=True, help="The original timing (--speed 1).")
@click.option(
    "--fast", is_flag=True, help="As fast as possible, keeping each connection's order (default)."
)
@click.option(
    "--reply-timeout",
    type=click.FloatRange(min=0.01),
    default=2.0,
    show_default=True,
    help="Seconds to wait for each reply the capture recorded.",
)
@click.option(
    "--clock-tolerance",
    type=click.FloatRange(min=0.0),
    default=60.0,
    show_default=True,
    help="Seconds a server-clock field may drift (volatile-field rule `clock`).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option("--verbose", "-v", is_flag=True, help="List identical replies too.")
@click.option(
    "--record-baseline",
    is_flag=True,
    help="Rewrite the capture's replies (and state) with the new ones, after showing the diff.",
)
@click.pass_context
def replay_command(
    ctx: click.Context,
    /,
    capture: str,
    target: str | None,
    target_api: str | None,
    target_api_key: str | None,
    live_ok: bool,
    speed: float | None,
    realtime: bool,
    fast: bool,
    reply_timeout: float,
    clock_tolerance: float,
    as_json: bool,
    verbose: bool,
    record_baseline: bool,
    **flags: Any,
) -> None:
    """Feed the device side of CAPTURE to a gateway and compare its replies with the
    recorded ones (docs/replay.md).

    Exit status: 0 nothing differs, 1 a reply, the state or a line of the capture
    differs, 2 the replay could not run (bad capture, refused target, no database)."""
    from chargegw.capture import CaptureError, read_capture
    from chargegw.config import ConfigError, load_settings
    from chargegw.logs import configure_logging
    from chargegw.replay.baseline import write_baseline
    from chargegw.replay.engine import ReplayError, capture_devices, live_refusal, replay

    address = _target(target)
    pace = _speed(speed, realtime, fast)
    try:
        settings = load_settings((ctx.find_root().obj or {}).get("config"), overrides=flags)
    except ConfigError as exc:
        problems = "; ".join(exc.problems or [str(exc)])
        raise click.UsageError(f"invalid configuration: {problems}") from None
    configure_logging(settings.log_format, "warning")
    try:
        loaded = read_capture(capture)
    except CaptureError as exc:
        _fail(str(exc))
    if record_baseline and loaded.problems:
        listed = "; ".join(str(problem) for problem in loaded.problems[:5])
        _fail(f"{capture} has bad lines ({listed}): fix or remove them before --record-baseline")

    async def run() -> Any:
        if address is not None and not live_ok:
            refusal = await live_refusal(
                address[0],
                capture_devices(loaded.frames),
                api=target_api,
                api_key=target_api_key,
            )
            if refusal is not None:
                raise ReplayError(
                    f"refusing to replay towards {target}: {refusal} "
                    "(--i-know-this-is-live overrides)"
                )
        return await replay(
            loaded,
            source=capture,
            dsn=settings.dsn,
            data_dir=settings.data_dir,
            settings=settings,
            target=address,
            speed=pace,
            reply_timeout_s=reply_timeout,
            clock_tolerance_s=clock_tolerance,
        )

    try:
        report = asyncio.run(run())
    except ReplayError as exc:
        _fail(str(exc))
    except Exception as exc:  # the database or the gateway failed: say what, no traceback
        _fail(f"the replay failed: {exc}")
    if as_json:
        click.echo(json.dumps(report.as_json(), indent=2, default=str))
    else:
        for line in report.lines(verbose=verbose):
            click.echo(line)
    if record_baseline:
        try:
            count = write_baseline(capture, loaded, report)
        except OSError as exc:
            _fail(f"cannot rewrite {capture}: {exc}")
        click.echo(f"baseline recorded: {capture} rewritten ({count} frames)", err=True)
        sys.exit(EXIT_SAME)
    sys.exit(EXIT_DIFFERENT if report.differs else EXIT_SAME)


def _fail(message: str) -> NoReturn:
    click.echo(f"chargegw replay: {message}", err=True)
    sys.exit(EXIT_UNUSABLE)
