"""``python -m chargesim.chaos``: the chaos run from the command line."""

from __future__ import annotations

import os
import sys

import click

from chargesim.chaos.options import FAULT_KINDS, ChaosOptions
from chargesim.chaos.runner import main_exit


def _faults(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[str, ...]:
    if value.strip().lower() in ("all", ""):
        return FAULT_KINDS
    if value.strip().lower() == "none":
        return ()
    kinds = tuple(k.strip() for k in value.split(",") if k.strip())
    unknown = sorted(set(kinds) - set(FAULT_KINDS))
    if unknown:
        raise click.BadParameter(f"unknown {', '.join(unknown)}; known: {', '.join(FAULT_KINDS)}")
    return kinds


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--duration",
    "duration_s",
    type=float,
    default=540.0,
    show_default=True,
    help="Seconds of chaos (activity and faults) before the quiet period.",
)
@click.option(
    "--piles",
    type=int,
    default=500,
    show_default=True,
    help="Devices with ports: AP3000 piles plus BKV sockets (30 % BKV).",
)
@click.option(
    "--seed",
    type=int,
    default=1,
    show_default=True,
    help="Seed of the fault schedule, the activity and the piles' decisions.",
)
@click.option(
    "--quiet-timeout",
    "quiet_timeout_s",
    type=float,
    default=240.0,
    show_default=True,
    help="Longest wait for the platform to settle after the chaos.",
)
@click.option(
    "--faults",
    callback=_faults,
    default="all",
    show_default=True,
    help="Comma-separated fault kinds (" + ", ".join(FAULT_KINDS) + "), all or none.",
)
@click.option(
    "--report",
    default="chaos-report.json",
    show_default=True,
    help="Where the JSON report goes ('' for none).",
)
@click.option(
    "--dsn",
    default=lambda: os.environ.get("CHARGEGW_TEST_DSN") or None,
    help="PostgreSQL server to create the run's database on "
    "[default: $CHARGEGW_TEST_DSN, else an embedded PostgreSQL].",
)
@click.option(
    "--workers", type=int, default=3, show_default=True, help="Worker processes of chargegw serve."
)
@click.option(
    "--accel",
    type=float,
    default=10.0,
    show_default=True,
    help="Time acceleration of the simulated piles.",
)
@click.option(
    "--activity",
    type=float,
    default=1.5,
    show_default=True,
    help="Session actions per second per 100 piles.",
)
@click.option("--log-dir", default=None, help="Where the gateway's log goes [a temporary dir].")
@click.option("--keep-database", is_flag=True, help="Do not drop the run's database.")
@click.option("--quiet", is_flag=True, help="No progress output (the table is still printed).")
def chaos(**options: object) -> None:
    """Run the platform under faults and check its promises.

    Starts `chargegw serve --workers 3` on a fresh database, simulates the piles,
    drives sessions through the API and at the piles while killing workers, taking the
    database away or read-only and dropping connections; then, after a quiet period,
    checks the invariants. Exits 1 on any violation (docs/chaos.md).
    """
    values = dict(options)
    values["report"] = values["report"] or None
    sys.exit(main_exit(ChaosOptions(**values)))  # type: ignore[arg-type]


def main() -> None:
    """Entry point of ``python -m chargesim.chaos``."""
    chaos()
