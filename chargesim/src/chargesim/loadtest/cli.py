"""The ``chargegw loadtest`` command (wired into ``chargegw`` as ``loadtest``)."""

from __future__ import annotations

import asyncio
import math
import sys
from pathlib import Path
from typing import Any

import click

from chargesim.loadtest import http as httpload
from chargesim.loadtest import overload
from chargesim.loadtest.runner import LoadOptions, LoadTestError, parse_addrs, run_loadtest


def _settings(values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"expected NAME=VALUE, not {item!r}", param_hint="--set")
        out[name.strip().lower()] = value
    return out


def _http_spec(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> httpload.HttpLoadSpec | None:
    if value is None:
        return None
    try:
        return httpload.parse_spec(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _command_line() -> list[str]:
    """This invocation as a user would type it."""
    program = Path(sys.argv[0]).name
    if program == "__main__.py":
        return ["python", "-m", "chargesim.loadtest", *sys.argv[1:]]
    return [program, *sys.argv[1:]]


def summary(report: dict[str, Any]) -> list[str]:
    """A few readable lines per run of a report."""
    lines: list[str] = []
    for kind, run in report["runs"].items():
        conn, mem, frames = run["connections"], run["memory"], run["frames"] or {}
        errors, latency = run["errors"], run["latency"]
        lines.append(
            f"{kind}: held {conn['held_min']}-{conn['held_max']} of {run['piles']['total']} "
            f"piles (all online after {conn['all_online_after_s']} s); server RSS "
            f"{mem['server_rss_kib_steady']} KiB, {mem['rss_per_pile_kib']} KiB per pile "
            f"({mem['rss_total_per_pile_kib']} with the idle process)"
        )
        lines.append(
            f"  frames/s to server {frames.get('to_server_per_s')}, from server "
            f"{frames.get('from_server_per_s')}; server CPU {frames.get('server_cpu_percent')}%, "
            f"{frames.get('server_cpu_us_per_frame')} us/frame; heartbeat RTT p99 "
            f"{run['heartbeat_rtt_ms']['p99']} ms"
        )
        lines.append(
            f"  decode errors {errors['decode_errors']}, unintended disconnects "
            f"{errors['unintended_disconnects']}, connect failures {errors['connect_failures']}"
        )
        if run["database"]:
            lines.append(f"  database rows/s {run['database']['rows_per_s']}")
        if run["storm"]:
            storm = run["storm"]
            lines.append(
                f"  storm: {storm['dropped']} dropped, {storm['back_online']} back, all back "
                f"after {storm['all_back_after_s']} s"
            )
        if run.get("overload"):
            lines.extend(_overload_lines(run["overload"]))
        if latency and latency["probes"]:
            total = latency["legs_ms"]["total"]
            lines.append(
                f"  API latency to ack: p50 {total['p50']} ms, p99 {total['p99']} ms, "
                f"max {total['max']} ms ({latency['outcomes']})"
            )
        if run.get("http_load"):
            lines.extend(httpload.summary_lines(run["http_load"]))
    if "ratios" in report:
        lines.append(f"chargegw / baseline: {report['ratios']}")
    return lines


def _overload_lines(result: dict[str, Any]) -> list[str]:
    capacity, verdicts, phases = result["capacity"], result["verdicts"], result["phases"]
    how = f"measured, limited by {capacity['limited_by']}" if capacity["measured"] else "given"
    lines = [f"  overload profile: capacity {capacity['frames_per_s']} answered frames/s ({how})"]
    for name in overload.PHASES:
        phase = phases.get(name)
        if phase is None:
            continue
        rtt = phase["heartbeat_rtt_ms"]
        lines.append(
            f"    {name}: offered {phase['offered_per_s']}/s, sent {phase['sent_per_s']}/s, "
            f"answered {phase['answered_per_s']}/s; online {phase['online_min']}-"
            f"{phase['online_max']}, disconnects {phase['disconnects']}; heartbeat p50/p99 "
            f"{rtt['p50']}/{rtt['p99']} ms, unanswered {phase['heartbeats_unanswered']}; "
            f"server CPU {phase['server_cpu_percent']}%"
        )
    lines.append(
        f"  verdicts: all piles held {verdicts['all_piles_held']}, round trip under "
        f"{overload.RTT_LIMIT_MS:g} ms after {verdicts['rtt_recovered_after_s']} s, recovered "
        f"within {overload.RECOVERY_LIMIT_S:g} s {verdicts['recovered_within_30s']}"
        + ("" if result["completed"] else " (the profile did not complete)")
    )
    if verdicts["overload_reached"] is False:
        lines.append(
            f"  not an overload: the piles sent {verdicts['overload_sent_share']}x the capacity"
        )
    return lines


@click.command("loadtest")
@click.option(
    "--piles",
    type=click.IntRange(1),
    default=1000,
    show_default=True,
    help="Simulated devices (AP3000 piles and BKV gateways together).",
)
@click.option(
    "--bkv-share",
    type=click.FloatRange(0, 1),
    default=0.2,
    show_default=True,
    help="Fraction of the piles that are BKV gateways (the rest are AP3000 piles).",
)
@click.option(
    "--generators",
    type=click.IntRange(1),
    help="Generator processes (default: one per 15,000 piles).",
)
@click.option(
    "--source-addrs",
    default="127.0.0.2-127.0.0.9",
    show_default=True,
    help="Client source addresses: a range and/or a comma-separated list.",
)
@click.option(
    "--accel",
    type=float,
    default=1.0,
    show_default=True,
    help="Time acceleration: every protocol interval is divided by this.",
)
@click.option(
    "--jitter",
    type=click.FloatRange(0, 0.99),
    default=0.1,
    show_default=True,
    help="Intervals vary by plus or minus this fraction.",
)
@click.option(
    "--duration",
    "duration_s",
    type=click.FloatRange(1),
    help="Length of the load against each server, seconds (a hard cap). Default: 60; "
    "with --profile overload, what its phases may need.",
)
@click.option(
    "--ramp",
    "ramp_s",
    type=click.FloatRange(0),
    default=10.0,
    show_default=True,
    help="First connections spread over this many seconds.",
)
@click.option(
    "--settle",
    "settle_s",
    type=click.FloatRange(0),
    default=30.0,
    show_default=True,
    help="After the ramp, wait this long at most for every pile to be online.",
)
@click.option("--storm-at", "storm_at_s", type=float, help="Reconnect storm at this second.")
@click.option("--storm-piles", type=click.IntRange(1), help="Piles dropped (default: all).")
@click.option(
    "--storm-window",
    "storm_window_s",
    type=float,
    default=10.0,
    show_default=True,
    help="Dropped piles reconnect within this many seconds.",
)
@click.option(
    "--profile",
    type=click.Choice(overload.PROFILES),
    default=overload.PROFILES[0],
    show_default=True,
    help="steady: ramp, steady load, optional storm. overload: once all piles are online, "
    "measure the capacity, offer 150 % of it, then 50 % (docs/loadtest.md).",
)
@click.option(
    "--capacity",
    type=click.FloatRange(0, min_open=True),
    metavar="FRAMES_PER_S",
    help="With --profile overload: the server's capacity in answered frames/s (no search).",
)
@click.option(
    "--overload-s",
    type=click.FloatRange(1),
    default=60.0,
    show_default=True,
    help="With --profile overload: seconds at 150 % of the capacity.",
)
@click.option(
    "--recover-s",
    type=click.FloatRange(overload.RTT_HOLD_S),
    default=45.0,
    show_default=True,
    help="With --profile overload: seconds at 50 % of the capacity, after the overload.",
)
@click.option(
    "--latency-probes",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="API commands issued during the steady phase (AP3000 locate, BKV query).",
)
@click.option(
    "--http-load",
    metavar="SPEC",
    callback=_http_spec,
    help="An open-loop HTTP load on the API in the steady phase: `default` or KEY=VALUE,... "
    "(detail, list, orders, start: requests/s; stop_after, duration, delay: s; page, "
    "processes, connections, timeout). See docs/loadtest.md.",
)
@click.option("--target", help="HOST:PORT of a running server's device port.")
@click.option("--api", help="Base URL of the running server's HTTP API.")
@click.option("--api-key", envvar="CHARGEGW_LOADTEST_API_KEY", help="Its API key.")
@click.option(
    "--server-pid",
    "server_pids",
    type=int,
    multiple=True,
    help="Sample this process tree as the server (with --target).",
)
@click.option("--start", type=click.Choice(["chargegw", "baseline", "both"]))
@click.option(
    "--workers",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Processes of the started server(s).",
)
@click.option(
    "--dsn",
    envvar="CHARGEGW_LOADTEST_DSN",
    help="PostgreSQL of the started chargegw (default: an embedded one in a temp dir); "
    "with --target, the running server's database, read for rows/s and command rows.",
)
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="NAME=VALUE",
    help="A chargegw setting for the started server (CHARGEGW_NAME), repeatable.",
)
@click.option(
    "--ap3000-ports", type=click.IntRange(1, 16), default=2, show_default=True, help="Per pile."
)
@click.option(
    "--bkv-sockets", type=click.IntRange(1, 250), default=2, show_default=True, help="Per gateway."
)
@click.option(
    "--ap3000-heartbeat-s",
    type=click.FloatRange(1),
    default=180.0,
    show_default=True,
    help="In pile seconds (divided by --accel).",
)
@click.option(
    "--bkv-heartbeat-s",
    type=click.FloatRange(1),
    default=60.0,
    show_default=True,
    help="In gateway seconds (divided by --accel).",
)
@click.option(
    "--bkv-status-s",
    type=click.FloatRange(1),
    default=300.0,
    show_default=True,
    help="Status cluster interval per socket, gateway seconds.",
)
@click.option(
    "--id-start",
    type=click.IntRange(0, 999_999),
    default=1,
    show_default=True,
    help="Number of the first device (AP3000 04000001..., BKV 82231214000001...).",
)
@click.option(
    "--seed",
    type=int,
    default=1,
    show_default=True,
    help="Jitter, storm choice and probe targets.",
)
@click.option(
    "--report", default="loadtest-report.json", show_default=True, help="Where the JSON goes."
)
@click.option(
    "--benchmarks",
    metavar="PATH",
    help="Also rewrite the load-test section of this markdown file (docs/benchmarks.md).",
)
@click.option("--quiet", is_flag=True, help="No progress lines on stderr.")
def loadtest(source_addrs: str, settings: tuple[str, ...], **options: Any) -> None:
    """Drive simulated piles against a server and write a JSON report.

    Either start the servers (--start chargegw|baseline|both) or point at one that runs
    (--target, --api). See docs/loadtest.md.
    """
    duration_s: float | None = options.pop("duration_s")
    try:
        opts = LoadOptions(
            source_addrs=parse_addrs(source_addrs),
            server_settings=_settings(settings),
            server_pids=tuple(options.pop("server_pids")),
            **options,
        )
        if duration_s is not None:
            opts.duration_s = duration_s
        elif opts.profile == "overload":
            opts.duration_s = math.ceil(overload.planned_length_s(opts))
        report = asyncio.run(run_loadtest(opts, argv=_command_line()))
    except LoadTestError as exc:
        raise click.ClickException(str(exc)) from None
    for line in summary(report):
        click.echo(line)
