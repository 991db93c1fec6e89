"""The ``chargegw`` command: serve, migrate, config show, sim."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from typing import Any

import click

from .config import ConfigError, Settings, load_settings
from .logs import configure_logging
from .sim.cli import sim_command


def _settings(ctx: click.Context, **flags: Any) -> Settings:
    try:
        return load_settings(ctx.obj.get("config"), overrides=flags)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


@click.group()
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
@click.option("--data-dir", help="Where the embedded PostgreSQL keeps its data.")
@click.option("--device-host", help="Address of the device listener.")
@click.option("--device-port", type=int, help="Port of the device listener (both protocols).")
@click.option("--http-host", help="Address of the HTTP API.")
@click.option("--http-port", type=int, help="Port of the HTTP API.")
@click.option("--log-format", type=click.Choice(["console", "json"]))
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
@click.pass_context
def serve(ctx: click.Context, /, **flags: Any) -> None:
    """Run the gateway: device listener, HTTP API, and the database (embedded if no DSN)."""
    settings = _settings(ctx, **flags)
    configure_logging(settings.log_format, settings.log_level)
    from .service import run

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def main_task() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run(settings, stop)

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
    from .store.database import connect_pool, start_embedded
    from .store.database import migrate as run_migrations

    async def go() -> list[str]:
        dsn = settings.dsn or await asyncio.to_thread(start_embedded, settings.data_dir)
        pool = await connect_pool(dsn, min_size=1, max_size=1)
        try:
            async with pool.acquire() as conn:
                return await run_migrations(conn)
        finally:
            await pool.close()

    try:
        applied = asyncio.run(go())
    except Exception as exc:
        click.echo(f"chargegw: {exc}", err=True)
        sys.exit(1)
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


main.add_command(sim_command, "sim")
