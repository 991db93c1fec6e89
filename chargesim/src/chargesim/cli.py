"""``chargegw sim``: run simulated piles against a server from the command line."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time

import click

from chargesim.ap3000 import make_ap3000_piles
from chargesim.bkv import make_bkv_gateways
from chargesim.pile import SimulatedPile
from chargesim.runner import Simulator


def _server(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


@click.command("sim")
@click.option(
    "--server",
    metavar="HOST:PORT",
    default="127.0.0.1:8900",
    show_default=True,
    callback=_server,
    help="Address of the server the piles connect to.",
)
@click.option(
    "--ap3000",
    "ap3000_count",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    help="Number of AP3000 piles.",
)
@click.option(
    "--ports",
    type=click.IntRange(1, 16),
    default=2,
    show_default=True,
    help="Ports per pile (2: dual-port socket, 10 or 16: multi-port pile).",
)
@click.option(
    "--heartbeat-s",
    type=click.FloatRange(min=1.0),
    default=180.0,
    show_default=True,
    help="AP3000 heartbeat interval in pile seconds.",
)
@click.option(
    "--bkv",
    "bkv_count",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Number of BKV gateways.",
)
@click.option(
    "--bkv-sockets",
    type=click.IntRange(1, 250),
    default=2,
    show_default=True,
    help="Sockets per BKV gateway (two jacks each).",
)
@click.option(
    "--bkv-heartbeat-s",
    type=click.FloatRange(min=1.0),
    default=60.0,
    show_default=True,
    help="BKV gateway heartbeat interval in gateway seconds.",
)
@click.option(
    "--bkv-id-start",
    type=click.IntRange(0, 999_999),
    default=1,
    show_default=True,
    help="Number of the first BKV gateway (82231214000001 for 1); the others follow.",
)
@click.option(
    "--accel",
    type=click.FloatRange(min=0.001),
    default=1.0,
    show_default=True,
    help="Time acceleration: divides every protocol interval.",
)
@click.option(
    "--jitter",
    type=click.FloatRange(0.0, 0.99),
    default=0.1,
    show_default=True,
    help="Spread of intervals and start times, as a fraction.",
)
@click.option(
    "--duration-s",
    type=click.FloatRange(min=0.0),
    default=None,
    help="Run this many real seconds, then stop (default: until Ctrl-C).",
)
@click.option("--seed", type=int, default=None, help="Seed for reproducible jitter.")
@click.option(
    "--id-start",
    type=click.IntRange(0, 0xFFFFFF),
    default=1,
    show_default=True,
    help="Device number (24 bits) of the first pile; the others follow.",
)
@click.option(
    "--status-every-s",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="Seconds between status lines.",
)
def sim_command(
    server: tuple[str, int],
    ap3000_count: int,
    ports: int,
    heartbeat_s: float,
    bkv_count: int,
    bkv_sockets: int,
    bkv_heartbeat_s: float,
    bkv_id_start: int,
    accel: float,
    jitter: float,
    duration_s: float | None,
    seed: int | None,
    id_start: int,
    status_every_s: float,
) -> None:
    """Simulate AP3000 piles and BKV gateways speaking real bytes to a server over TCP."""
    if id_start + ap3000_count - 1 > 0xFFFFFF:
        raise click.BadParameter("device numbers are 24 bits", param_hint="--id-start")
    if bkv_id_start + bkv_count - 1 > 999_999:
        raise click.BadParameter("gateway numbers end at 999999", param_hint="--bkv-id-start")
    # a short record per pile: thousands of piles must not hold millions of frames
    ap3000_piles = make_ap3000_piles(
        ap3000_count, ports=ports, id_start=id_start, heartbeat_s=heartbeat_s, record_limit=200
    )
    gateways = make_bkv_gateways(
        bkv_count,
        sockets=bkv_sockets,
        id_start=bkv_id_start,
        heartbeat_s=bkv_heartbeat_s,
        record_limit=200,
    )
    piles: list[SimulatedPile] = [*ap3000_piles, *gateways]
    host, port = server
    simulator = Simulator(host, port, piles, accel=accel, jitter=jitter, seed=seed)
    fleet = []
    if ap3000_piles or not gateways:
        first = ap3000_piles[0].pile_id if ap3000_piles else "-"
        fleet.append(f"{len(ap3000_piles)} AP3000 piles ({first}...) with {ports} ports")
    if gateways:
        fleet.append(
            f"{len(gateways)} BKV gateways ({gateways[0].pile_id}...) with {bkv_sockets} sockets"
        )
    click.echo(
        f"simulating {' and '.join(fleet)} "
        f"against {host}:{port}, accel {accel:g}, jitter {jitter:g}"
    )
    asyncio.run(_run(simulator, duration_s, status_every_s))


async def _run(simulator: Simulator, duration_s: float | None, status_every_s: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, stop.set)
            installed.append(signum)
    started = time.monotonic()
    deadline = None if duration_s is None else started + duration_s
    await simulator.start()
    try:
        while not stop.is_set():
            wait = status_every_s
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await stop.wait()
            if not stop.is_set() and (deadline is None or time.monotonic() < deadline):
                _status(simulator, started)
    finally:
        await simulator.stop()
        for signum in installed:
            loop.remove_signal_handler(signum)
    _status(simulator, started, final=True)
    for pile_id, exc in simulator.errors:
        click.echo(f"pile {pile_id} failed: {exc!r}", err=True)


def _status(simulator: Simulator, started: float, *, final: bool = False) -> None:
    elapsed = time.monotonic() - started
    prefix = "stopped after" if final else "at"
    click.echo(f"[{prefix} {elapsed:.1f}s] {simulator.stats().line()}")
