"""The ``chargegw`` command: serve, migrate, config, apikey, nodes, rebalance, bans, sim,
loadtest, replay, frames."""

from __future__ import annotations

import asyncio
import importlib
import json
import signal
import sys
from collections.abc import Sequence
from typing import Any

import click

from chargegw.config import ConfigError, Settings, load_settings, reference
from chargegw.logs import configure_logging
from chargegw.replay.cli import replay_command

#: commands that live in the chargesim tools distribution: name -> (module, attribute)
_TOOLS = {
    "sim": ("chargesim.cli", "sim_command"),
    "loadtest": ("chargesim.loadtest.cli", "loadtest"),
}


class _Main(click.Group):
    """The ``chargegw`` group; ``sim`` and ``loadtest`` are loaded from chargesim on use,
    so the gateway neither imports nor requires the tools."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *_TOOLS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in _TOOLS:
            return super().get_command(ctx, cmd_name)
        module_name, attribute = _TOOLS[cmd_name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not exc.name.startswith("chargesim"):
                raise
            return _missing_tools(cmd_name)
        command: click.Command = getattr(module, attribute)
        return command


def _missing_tools(name: str) -> click.Command:
    @click.command(name, context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def missing(args: tuple[str, ...]) -> None:
        """(needs the chargesim tools: pip install 'chargegw[tools]')"""
        raise click.ClickException(
            f"`chargegw {name}` needs the simulator tools, which are not installed: "
            "pip install 'chargegw[tools]' (or pip install chargesim)"
        )

    return missing


def _settings(ctx: click.Context, **flags: Any) -> Settings:
    """The effective settings; a bad one is a usage error (exit 2) naming each problem."""
    try:
        return load_settings(ctx.obj.get("config"), overrides=flags)
    except ConfigError as exc:
        problems = exc.problems or [str(exc)]
        if len(problems) == 1:
            raise click.UsageError(f"invalid configuration: {problems[0]}") from None
        listed = "".join(f"\n  {problem}" for problem in problems)
        raise click.UsageError(f"invalid configuration:{listed}") from None


@click.group(cls=_Main)
@click.option(
    "--config",
    "config",
    type=click.Path(exists=True, dir_okay=False),
    envvar="CHARGEGW_CONFIG",
    help="YAML settings file (overridden by CHARGEGW_* variables and flags).",
)
@click.version_option(package_name="chargegw")
@click.pass_context
def main(ctx: click.Context, config: str | None) -> None:
    """The charging-pile gateway."""
    ctx.ensure_object(dict)
    ctx.obj["config"] = config


@main.command()
@click.option("--dsn", help="PostgreSQL DSN (default: the embedded server in --data-dir).")
@click.option(
    "--data-dir", help="Where the embedded PostgreSQL keeps its data (default ./chargegw-data)."
)
@click.option("--device-host", help="Address of the device listener (default 0.0.0.0).")
@click.option(
    "--device-port",
    type=int,
    help="Port of the device listener, both protocols (default 8900; 0: any free port).",
)
@click.option("--http-host", help="Address of the HTTP API (default 127.0.0.1).")
@click.option(
    "--http-port", type=int, help="Port of the HTTP API (default 8980; 0: any free port)."
)
@click.option("--log-format", type=click.Choice(["console", "json"]), help="Default console.")
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), help="Default info."
)
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    help="Worker processes sharing the device and HTTP ports (default 1).",
)
@click.option("--node", help="This node's name in the cluster (default: the host name).")
@click.pass_context
def serve(ctx: click.Context, /, **flags: Any) -> None:
    """Run the gateway: device listener, HTTP API, and the database (embedded if no DSN).

    SIGTERM (or Ctrl-C) drains: no new connections, device connections closed gradually
    so the piles reconnect to other workers or nodes, commands in flight finished. A
    second signal stops at once.
    """
    settings = _settings(ctx, **flags)
    configure_logging(settings.log_format, settings.log_level)
    if settings.workers > 1:
        from chargegw.supervisor import Supervisor

        try:
            sys.exit(Supervisor(settings).run())
        except Exception as exc:
            click.echo(f"chargegw: {exc}", err=True)
            sys.exit(1)
    from chargegw.app import run

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def main_task() -> None:
        stop = asyncio.Event()
        force = asyncio.Event()

        def signalled() -> None:
            (force if stop.is_set() else stop).set()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, signalled)
        await run(settings, stop, force=force)

    try:
        asyncio.run(main_task())
    except Exception as exc:  # a start-up failure: say what, not a traceback
        click.echo(f"chargegw: {exc}", err=True)
        sys.exit(1)


@main.command()
@click.option("--dsn", help="PostgreSQL DSN (default: the embedded server in --data-dir).")
@click.option("--data-dir", help="Where the embedded PostgreSQL keeps its data.")
@click.pass_context
def migrate(ctx: click.Context, /, **flags: Any) -> None:
    """Apply the database migrations and exit."""
    settings = _settings(ctx, **flags)
    configure_logging(settings.log_format, settings.log_level)
    from chargegw.store.database import migrate as run_migrations

    applied = _with_database(settings, run_migrations, migrate=False)
    click.echo("applied: " + ", ".join(applied) if applied else "database is up to date")


@main.group()
def config() -> None:
    """Inspect the configuration."""


@config.command("show")
@click.pass_context
def config_show(ctx: click.Context) -> None:
    """Print the effective configuration (secrets masked) as JSON."""
    settings = _settings(ctx.find_root(), **{})
    click.echo(json.dumps(settings.masked(), indent=2))


@config.command("settings")
def config_settings() -> None:
    """List every setting: its environment variable, default and allowed values."""
    rows = [("SETTING", "ENVIRONMENT", "DEFAULT", "ALLOWED")]
    rows += [(name, env, default, allowed) for name, env, default, allowed, _ in reference()]
    _table(rows)


# ---------------------------------------------------------------- apikey


def _with_database(settings: Settings, work: Any, *, migrate: bool = True) -> Any:
    """Run ``await work(conn)`` on the database of ``settings`` (migrated first unless
    ``migrate`` is false); exit 1 on failure."""
    from chargegw.store.database import connect_pool, start_embedded
    from chargegw.store.database import migrate as run_migrations

    async def go() -> Any:
        dsn = settings.dsn or await asyncio.to_thread(start_embedded, settings.data_dir)
        pool = await connect_pool(dsn, min_size=1, max_size=1)
        try:
            async with pool.acquire() as conn:
                if migrate:
                    await run_migrations(conn)
                return await work(conn)
        finally:
            await pool.close()

    try:
        return asyncio.run(go())
    except Exception as exc:
        click.echo(f"chargegw: {exc}", err=True)
        sys.exit(1)


_dsn_option = click.option(
    "--dsn", help="PostgreSQL DSN (default: the embedded server in --data-dir)."
)
_data_dir_option = click.option("--data-dir", help="Where the embedded PostgreSQL keeps its data.")


@main.group()
def apikey() -> None:
    """Manage the API keys stored in the database (only their hashes are kept)."""


_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _duration(text: str, param: str) -> float:
    """Seconds of ``90d``, ``12h``, ``30m``, ``45s`` or ``3600``; a usage error otherwise."""
    import re

    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text.lower())
    if found is None:
        raise click.BadParameter(
            f"{text!r} is not a duration (3600, 45s, 30m, 12h, 90d)", param_hint=param
        )
    return float(found.group(1)) * _DURATION_UNITS[found.group(2)]


def _when(value: Any) -> str:
    return value.isoformat(timespec="seconds") if value is not None else "-"


@apikey.command("create")
@click.option("--name", required=True, help="What the key is for (shown by `apikey list`).")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    type=click.Choice(["read", "control", "billing", "config", "admin"]),
    help="What the key may do; repeat for several. Default: admin (every scope).",
)
@click.option("--allow-device", "devices", multiple=True, help="Limit the key to this device.")
@click.option(
    "--allow-gateway", "gateways", multiple=True, help="Limit the key to this gateway's devices."
)
@click.option(
    "--allow-network", "networks", multiple=True, help="Accept the key only from this CIDR."
)
@click.option("--expires-in", help="The key stops working after this long (90d, 12h, 3600).")
@click.option(
    "--expires-at",
    type=click.DateTime(["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d %H:%M:%S%z", "%Y-%m-%dT%H:%M:%S"]),
    help="The key stops working at this time (ISO 8601; UTC without a zone).",
)
@click.option("--hmac-required", is_flag=True, help="Every request must be signed.")
@_dsn_option
@_data_dir_option
@click.pass_context
def apikey_create(
    ctx: click.Context,
    /,
    name: str,
    scopes: tuple[str, ...],
    devices: tuple[str, ...],
    gateways: tuple[str, ...],
    networks: tuple[str, ...],
    expires_in: str | None,
    expires_at: Any,
    hmac_required: bool,
    **flags: Any,
) -> None:
    """Create a key and print it; it is shown only this once."""
    import datetime as dt

    from chargegw.domain.auth import NewKey, create_key, parse_networks
    from chargegw.domain.refusals import RequestError

    if expires_in is not None and expires_at is not None:
        raise click.UsageError("give --expires-in or --expires-at, not both")
    try:
        parse_networks(networks or None)
    except RequestError as exc:
        raise click.BadParameter(str(exc), param_hint="--allow-network") from None
    if expires_at is not None and expires_at.tzinfo is None:
        expires_at = expires_at.replace(tzinfo=dt.UTC)
    spec = NewKey(
        name=name,
        scopes=scopes or ("admin",),
        allowed_device_ids=devices or None,
        allowed_gateway_ids=gateways or None,
        allowed_networks=networks or None,
        expires_at=expires_at,
        expires_in_s=_duration(expires_in, "--expires-in") if expires_in is not None else None,
        hmac_required=hmac_required,
    )
    settings = _settings(ctx.find_root(), **flags)
    configure_logging(settings.log_format, settings.log_level)
    key_id, key = _with_database(settings, lambda conn: create_key(conn, spec))
    click.echo(key)
    click.echo(
        f"created API key {key_id} ({name.strip()}, scopes: {', '.join(spec.scopes)}); store it "
        "now, it is not shown again. A gateway started without any key picks it up at its "
        "next start.",
        err=True,
    )


@apikey.command("list")
@_dsn_option
@_data_dir_option
@click.pass_context
def apikey_list(ctx: click.Context, /, **flags: Any) -> None:
    """List the stored keys (ids, names, scopes, dates; never the keys)."""
    settings = _settings(ctx.find_root(), **flags)
    configure_logging(settings.log_format, settings.log_level)
    from chargegw.domain.auth import list_keys

    keys = _with_database(settings, list_keys)
    if not keys:
        click.echo("no API keys stored", err=True)
        return
    rows = [("KEY_ID", "NAME", "PREFIX", "SCOPES", "LIMITS", "CREATED", "LAST_USED", "EXPIRES")]
    statuses = ["STATUS"]
    for k in keys:
        limits = [
            f"{what}={len(values)}"
            for what, values in (
                ("devices", k.allowed_device_ids),
                ("gateways", k.allowed_gateway_ids),
                ("networks", k.allowed_networks),
            )
            if values is not None
        ]
        if k.hmac_required:
            limits.append("signed")
        rows.append(
            (
                str(k.key_id),
                k.name,
                k.prefix or "-",
                ",".join(k.scopes),
                ",".join(limits) or "-",
                _when(k.created_at),
                _when(k.last_used_at),
                _when(k.expires_at),
            )
        )
        statuses.append(f"revoked {_when(k.revoked_at)}" if k.revoked_at else k.status)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row, status in zip(rows, statuses, strict=True):
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        click.echo("  ".join([*cells, status]))


@apikey.command("revoke")
@click.argument("key_id", type=int)
@_dsn_option
@_data_dir_option
@click.pass_context
def apikey_revoke(ctx: click.Context, /, key_id: int, **flags: Any) -> None:
    """Revoke a key; every running gateway refuses it within a second."""
    settings = _settings(ctx.find_root(), **flags)
    configure_logging(settings.log_format, settings.log_level)
    from chargegw.domain.auth import revoke_key

    if not _with_database(settings, lambda conn: revoke_key(conn, key_id)):
        click.echo(f"chargegw: no active API key {key_id}", err=True)
        sys.exit(1)
    click.echo(f"revoked API key {key_id}; running gateways refuse it within a second")


@apikey.command("rotate")
@click.argument("key_id", type=int)
@click.option(
    "--overlap",
    default="24h",
    show_default=True,
    help="How long the old key keeps working beside the new one (30m, 24h, 7d, 0).",
)
@_dsn_option
@_data_dir_option
@click.pass_context
def apikey_rotate(ctx: click.Context, /, key_id: int, overlap: str, **flags: Any) -> None:
    """Replace a key with a new one (printed once) with the same scopes and limits."""
    overlap_s = _duration(overlap, "--overlap")
    settings = _settings(ctx.find_root(), **flags)
    configure_logging(settings.log_format, settings.log_level)
    from chargegw.domain.auth import rotate_key

    new_id, key, old_expires = _with_database(
        settings, lambda conn: rotate_key(conn, key_id, overlap_s)
    )
    click.echo(key)
    click.echo(
        f"created API key {new_id} to replace {key_id}, which stops working at "
        f"{_when(old_expires)}; store the new key now, it is not shown again.",
        err=True,
    )


# ---------------------------------------------------------------- cluster


def _table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@main.command()
@click.option("--all", "include_stopped", is_flag=True, help="Include stopped processes.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_dsn_option
@_data_dir_option
@click.pass_context
def nodes(ctx: click.Context, /, include_stopped: bool, as_json: bool, **flags: Any) -> None:
    """List the gateway processes (nodes and their workers) with their connection counts."""
    settings = _settings(ctx.find_root(), **flags)
    configure_logging(settings.log_format, "warning")
    from chargegw.cluster.directory import list_processes

    procs = _with_database(
        settings, lambda conn: list_processes(conn, include_stopped=include_stopped)
    )
    if as_json:
        click.echo(json.dumps(procs, indent=2, default=str))
        return
    if not procs:
        click.echo("no gateway process is running", err=True)
        return
    rows = [("NODE", "WORKER", "PID", "STATE", "CONNECTIONS", "DEVICES", "MAX", "SILENT_S")]
    for p in procs:
        rows.append(
            (
                p["node"],
                str(p["worker"]),
                str(p["pid"]),
                p["state"],
                str(p["connections"]),
                str(p["devices"]),
                str(p["max_connections"]),
                f"{p['silent_s']:.1f}",
            )
        )
    _table(rows)
    live = [p for p in procs if p["state"] != "stopped"]
    total = sum(p["connections"] for p in live)
    click.echo(f"{len(live)} live process(es), {total} device connection(s)")


@main.command()
@click.option(
    "--rate",
    type=click.FloatRange(min=0.1),
    default=20.0,
    show_default=True,
    help="Connections each busy process closes per second.",
)
@click.option("--dry-run", is_flag=True, help="Show the plan without asking anyone to shed.")
@_dsn_option
@_data_dir_option
@click.pass_context
def rebalance(ctx: click.Context, /, rate: float, dry_run: bool, **flags: Any) -> None:
    """Shed connections from the busiest processes (down to the mean), at a bounded rate.

    Run it after a node joins: the shed piles reconnect through the load balancer.
    """
    settings = _settings(ctx.find_root(), **flags)
    configure_logging(settings.log_format, "warning")
    from chargegw.cluster.directory import rebalance as plan_rebalance

    plan = _with_database(settings, lambda conn: plan_rebalance(conn, rate=rate, dry_run=dry_run))
    click.echo(json.dumps(plan, indent=2))


@main.group()
def bans() -> None:
    """Devices refused for reconnecting too often (flapping)."""


@bans.command("list")
@_dsn_option
@_data_dir_option
@click.pass_context
def bans_list(ctx: click.Context, /, **flags: Any) -> None:
    """List the devices banned now."""
    settings = _settings(ctx.find_root(), **flags)
    configure_logging(settings.log_format, "warning")
    from chargegw.cluster.directory import list_bans

    found = _with_database(settings, list_bans)
    if not found:
        click.echo("no device is banned", err=True)
        return
    rows = [("DEVICE", "UNTIL", "REASON", "CONNECTS")]
    for b in found:
        rows.append((b["device_id"], b["until"], b["reason"], str(b["connects"] or "-")))
    _table(rows)


@bans.command("lift")
@click.argument("device_id")
@_dsn_option
@_data_dir_option
@click.pass_context
def bans_lift(ctx: click.Context, /, device_id: str, **flags: Any) -> None:
    """Lift a device's ban now (every process hears of it at once)."""
    settings = _settings(ctx.find_root(), **flags)
    configure_logging(settings.log_format, "warning")
    from chargegw.cluster.directory import lift_ban

    if not _with_database(settings, lambda conn: lift_ban(conn, device_id)):
        click.echo(f"chargegw: device {device_id} is not banned", err=True)
        sys.exit(1)
    click.echo(f"lifted the ban on {device_id}")


# ---------------------------------------------------------------- backup, restore, db


def _ops_dsn(settings: Settings) -> str:
    """The database of ``settings`` (the embedded server in ``data_dir`` without a DSN),
    not migrated: backup, restore and stats leave the schema as they find it."""
    from chargegw.store.database import start_embedded

    return settings.dsn or start_embedded(settings.data_dir)


_pg_bin_option = click.option(
    "--pg-bin",
    type=click.Path(exists=True, file_okay=False),
    help="Directory of the pg_dump/pg_restore to use (default: the best fit found).",
)


@main.command()
@click.option(
    "--output",
    "-o",
    type=click.Path(file_okay=False),
    help="New (or empty) directory for the backup (default ./chargegw-backup-<UTC time>).",
)
@_pg_bin_option
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@_dsn_option
@_data_dir_option
@click.pass_context
def backup(
    ctx: click.Context, /, output: str | None, pg_bin: str | None, as_json: bool, **flags: Any
) -> None:
    """Dump the database (one consistent snapshot) with a manifest of its row counts."""
    from datetime import UTC, datetime
    from pathlib import Path

    from chargegw.ops.backup import BackupError
    from chargegw.ops.backup import backup as run_backup

    settings = _settings(ctx.find_root(), **flags)
    configure_logging(settings.log_format, "warning")
    target = Path(output or f"chargegw-backup-{datetime.now(UTC):%Y%m%dT%H%M%SZ}")
    try:
        manifest = asyncio.run(run_backup(_ops_dsn(settings), target, pg_bin=pg_bin))
    except BackupError as exc:
        click.echo(f"chargegw: {exc}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    rows = sum(manifest["tables"].values())
    click.echo(
        f"backup of {manifest['database']} in {target}: schema {manifest['schema_version']}, "
        f"{len(manifest['tables'])} tables, {rows} rows, {manifest['dump_bytes']} bytes, "
        f"{manifest['duration_s']:.1f} s ({manifest['pg_dump_version']})"
    )


@main.command()
@click.argument("source", type=click.Path(exists=True))
@_pg_bin_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--keep-open-commands",
    is_flag=True,
    help="Deliver the commands open at the backup when their piles connect even when "
    "they have expired since, instead of finishing those dead (reason restored).",
)
@_dsn_option
@_data_dir_option
@click.pass_context
def restore(
    ctx: click.Context,
    /,
    source: str,
    pg_bin: str | None,
    as_json: bool,
    keep_open_commands: bool,
    **flags: Any,
) -> None:
    """Restore the backup SOURCE (a directory made by `chargegw backup`) into an EMPTY
    database, in one transaction; the row counts are checked against its manifest. The
    commands open at the backup that have expired since are finished dead (reason
    restored): whether the piles answered them after the backup is unknown."""
    from pathlib import Path

    from chargegw.ops.backup import BackupError
    from chargegw.ops.backup import restore as run_restore

    settings = _settings(ctx.find_root(), **flags)
    configure_logging(settings.log_format, "warning")
    try:
        report = asyncio.run(
            run_restore(
                Path(source),
                _ops_dsn(settings),
                pg_bin=pg_bin,
                keep_open_commands=keep_open_commands,
            )
        )
    except BackupError as exc:
        click.echo(f"chargegw: {exc}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        rows = sum(max(r, 0) for _, r in report.counts.values())
        click.echo(
            f"restored into {report.database}: schema {report.schema_version}, "
            f"{len(report.counts)} tables, {rows} rows, {report.duration_s:.1f} s"
        )
        for table in report.not_restored:
            click.echo(f"  {table}: not restored (on purpose: message ids start afresh)")
        if report.commands_finished:
            click.echo(
                f"  {report.commands_finished} commands open at the backup and expired since "
                "finished dead (restored)"
            )
        for table, (want, got) in sorted(report.mismatched.items()):
            click.echo(f"  {table}: {got} rows restored, the manifest says {want}", err=True)
    if not report.ok:
        click.echo("chargegw: the restored row counts differ from the manifest", err=True)
        sys.exit(1)


@main.group()
def db() -> None:
    """Look into the platform's database."""


@db.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@_dsn_option
@_data_dir_option
@click.pass_context
def db_stats(ctx: click.Context, /, as_json: bool, **flags: Any) -> None:
    """Table sizes (total, heap, indexes), partitions with their ranges, live and dead
    tuples, last (auto)vacuum and analyze."""
    from chargegw.ops import dbstats

    settings = _settings(ctx.find_root(), **flags)
    configure_logging(settings.log_format, "warning")
    stats = _with_database(settings, dbstats.db_stats, migrate=False)
    if as_json:
        click.echo(json.dumps(stats, indent=2))
        return
    click.echo(f"database {stats['database']}: {dbstats.human_bytes(stats['size_bytes'])}")
    _table(dbstats.render_table(stats))
    partitions = dbstats.render_partitions(stats)
    if len(partitions) > 1:
        click.echo("")
        _table(partitions)


# ---------------------------------------------------------------- compliance


@main.group()
def compliance() -> None:
    """Protocol compliance per firmware (docs/compliance.md)."""


@compliance.command("report")
@click.option("--protocol", type=click.Choice(["ap3000", "bkv"]), help="One protocol only.")
@click.option("--firmware", help="One firmware version only.")
@click.option("--device", "device_id", help="Only what this device showed.")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON instead of a table.")
@_dsn_option
@_data_dir_option
@click.pass_context
def compliance_report(
    ctx: click.Context,
    /,
    protocol: str | None,
    firmware: str | None,
    device_id: str | None,
    as_json: bool,
    **flags: Any,
) -> None:
    """Score and top deviations per (protocol, device type, firmware), lowest first."""
    from chargegw.domain.compliance import report
    from chargegw.ops import compliance as render_compliance

    settings = _settings(ctx.find_root(), **flags)
    configure_logging(settings.log_format, "warning")
    items = _with_database(
        settings,
        lambda conn: report(conn, protocol=protocol, firmware=firmware, device_id=device_id),
    )
    if as_json:
        click.echo(render_compliance.as_json(items))
        return
    for line in render_compliance.render(items):
        click.echo(line)


# ---------------------------------------------------------------- doctor


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@click.option(
    "--start-embedded",
    is_flag=True,
    help="Without a DSN: start the embedded PostgreSQL for the checks if it is not running "
    "(it stops again when doctor exits, unless a gateway uses it).",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    help="Worker processes the node runs (default: the `workers` setting).",
)
@_dsn_option
@_data_dir_option
@click.pass_context
def doctor(ctx: click.Context, /, as_json: bool, start_embedded: bool, **flags: Any) -> None:
    """Check what this node needs: open-file limit, ports, PostgreSQL (version, settings,
    connections), clock, free disk, migrations. One line per check: ok, warn or fail,
    what was found and the fix. Exit status 1 if a check failed."""
    from chargegw.ops.doctor import run_checks

    settings = _settings(ctx.find_root(), **flags)
    configure_logging(settings.log_format, "warning")
    report = asyncio.run(run_checks(settings, start_embedded_server=start_embedded))
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        for line in report.lines():
            click.echo(line)
    sys.exit(report.exit_status)


# ---------------------------------------------------------------- replay

main.add_command(replay_command)  # the logic lives in chargegw.replay


# ---------------------------------------------------------------- explain


@main.group()
def explain() -> None:
    """Explain an order or a device: its frames, transitions and their causes."""


def _instant(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """An ISO 8601 time (no zone: UTC); a usage error otherwise."""
    import datetime as dt

    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 time") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)


def _explain_options(command: Any) -> Any:
    command = click.option("--json", "as_json", is_flag=True, help="Print the timeline as JSON.")(
        command
    )
    command = click.option(
        "--limit",
        type=click.IntRange(1, 10000),
        default=1000,
        show_default=True,
        help="At most this many items (the earliest).",
    )(command)
    return _data_dir_option(_dsn_option(command))


def _print_timeline(found: Any, as_json: bool) -> None:
    from chargegw.ops.explain import render

    if as_json:
        click.echo(found.model_dump_json(indent=2))
    else:
        click.echo(render(found), nl=False)


@explain.command("order")
@click.argument("order_no")
@_explain_options
@click.pass_context
def explain_order_command(
    ctx: click.Context, /, order_no: str, as_json: bool, limit: int, **flags: Any
) -> None:
    """The timeline of the order ORDER_NO, from shortly before it was created to shortly
    after it settled. Exit status 1 if there is no such order."""
    from chargegw.ops.explain import explain_order

    settings = _settings(ctx.find_root(), **flags)
    configure_logging(settings.log_format, "warning")
    found = _with_database(
        settings, lambda conn: explain_order(conn, order_no, limit=limit), migrate=False
    )
    _print_timeline(found, as_json)


@explain.command("device")
@click.argument("device_id")
@click.option(
    "--since", callback=_instant, help="From this time (ISO 8601; default 24 h before --until)."
)
@click.option("--until", callback=_instant, help="Before this time (ISO 8601; default now).")
@_explain_options
@click.pass_context
def explain_device_command(
    ctx: click.Context,
    /,
    device_id: str,
    since: Any,
    until: Any,
    as_json: bool,
    limit: int,
    **flags: Any,
) -> None:
    """The timeline of the device DEVICE_ID in a window. Exit status 1 if there is no
    such device or the window is inverted."""
    import datetime as dt

    from chargegw.ops.explain import explain_device

    until = until or dt.datetime.now(dt.UTC)
    since = since or until - dt.timedelta(hours=24)
    settings = _settings(ctx.find_root(), **flags)
    configure_logging(settings.log_format, "warning")
    found = _with_database(
        settings,
        lambda conn: explain_device(conn, device_id, since=since, until=until, limit=limit),
        migrate=False,
    )
    _print_timeline(found, as_json)


# ---------------------------------------------------------------- frames


@main.group()
def frames() -> None:
    """The audit log of frames."""


@frames.command("export")
@click.option(
    "--device", "device_ids", multiple=True, help="A device (repeatable; a gateway id too)."
)
@click.option("--gateway", "gateway_id", help="A gateway: its own frames and its devices'.")
@click.option("--connection", "connection_id", help="Only the frames of this connection.")
@click.option("--since", callback=_instant, required=True, help="From this time (ISO 8601).")
@click.option("--until", callback=_instant, required=True, help="Before this time (ISO 8601).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "pcap"]),
    default="jsonl",
    show_default=True,
    help="A capture (JSON lines) or a pcap with synthetic TCP/IP headers.",
)
@click.option(
    "--out", default="-", show_default=True, help="The file to write (-: standard output)."
)
@click.option(
    "--with-state/--no-state",
    default=True,
    show_default=True,
    help="End a jsonl capture with the devices' recorded state (orders, ports).",
)
@_dsn_option
@_data_dir_option
@click.pass_context
def frames_export_command(
    ctx: click.Context,
    /,
    device_ids: tuple[str, ...],
    gateway_id: str | None,
    connection_id: str | None,
    since: Any,
    until: Any,
    fmt: str,
    out: str,
    with_state: bool,
    **flags: Any,
) -> None:
    """Export the frames of devices in a window to a capture file (docs/replay.md).

    Exit status 2 when a device or gateway is unknown, the window is inverted or the
    file cannot be written (nothing is written then); 1 when the database fails."""
    from chargegw.ops import frames_export as export

    settings = _settings(ctx.find_root(), **flags)
    configure_logging(settings.log_format, "warning")
    try:
        export.check_window(since, until)
        export.check_output(out)
    except export.ExportError as exc:
        click.echo(f"chargegw frames export: {exc}", err=True)
        sys.exit(2)

    async def work(conn: Any) -> Any:
        try:
            await export.check_subjects(conn, device_ids, gateway_id)
            return await export.export_frames(
                conn,
                device_ids=device_ids,
                gateway_id=gateway_id,
                connection_id=connection_id,
                since=since,
                until=until,
            )
        except export.ExportError as exc:
            return exc

    found = _with_database(settings, work, migrate=False)
    try:
        if isinstance(found, export.ExportError):
            raise found
        captured, state = found
        head = export.export_header(
            device_ids=device_ids,
            gateway_id=gateway_id,
            connection_id=connection_id,
            since=since,
            until=until,
        )
        count = export.write_export(
            out,
            captured,
            fmt="pcap" if fmt == "pcap" else "jsonl",
            head=head,
            state=state if with_state else None,
        )
    except export.ExportError as exc:
        click.echo(f"chargegw frames export: {exc}", err=True)
        sys.exit(2)
    if out != "-":
        click.echo(f"{count} frames written to {out}", err=True)
