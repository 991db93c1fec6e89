"""One chaos run: the platform and the fleet up, the chaos phase (activity and faults),
the quiet period, the invariant checks, the report."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import hashlib
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

import chargegw
from chargesim import Simulator
from chargesim.chaos import report as reporting
from chargesim.chaos.checks import DbState, InvariantResult, SimSnapshot, attach_frames, check_all
from chargesim.chaos.driver import ActivityDriver, make_fleet, set_up_billing, slots_of
from chargesim.chaos.faults import FaultDriver
from chargesim.chaos.options import ChaosError, ChaosOptions, gateway_settings
from chargesim.chaos.platform import Database, GatewayProcess, postgres_server
from chargesim.loadtest.stats import machine_info, raise_open_files_limit, versions


@dataclasses.dataclass
class ChaosResult:
    """The invariant results and the whole report of a run."""

    results: list[InvariantResult]
    report: dict[str, Any]

    @property
    def violations(self) -> int:
        """Violations of every invariant together."""
        return sum(len(r.violations) for r in self.results)

    def table(self) -> str:
        """The invariant table."""
        return reporting.table(self.results)

    def text(self) -> str:
        """The table and the violations, for people."""
        return self.table() + reporting.violations_text(self.results)


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def code_fingerprint() -> str:
    """A hash of the gateway's code (Python and SQL, without the simulator and this
    harness): restarted workers import the code afresh, so a change during a run would
    make its results those of two versions."""
    root = Path(chargegw.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.suffix not in (".py", ".sql"):
            continue
        digest.update(str(relative).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


async def run_chaos(opts: ChaosOptions, *, say: Callable[[str], None] | None = None) -> ChaosResult:
    """Run the chaos test ``opts`` describes; the report is also written to ``opts.report``."""
    opts.check()
    if say is None:
        say = (lambda text: None) if opts.quiet else _stderr
    raise_open_files_limit()
    started = time.monotonic()
    code = code_fingerprint()
    async with postgres_server(opts.dsn, say) as server_dsn:
        database = Database(server_dsn)
        await database.create()
        say(
            f"database {database.name}; {opts.ap3000_piles} AP3000 piles, "
            f"{opts.bkv_gateways} BKV gateways x {opts.bkv_sockets} sockets, "
            f"{opts.workers} workers, seed {opts.seed}"
        )
        try:
            result = await _run(opts, database, say, started)
        finally:
            if opts.keep_database:
                say(f"database kept: {database.dsn}")
            else:
                with contextlib.suppress(Exception):
                    await database.heal()
                    await database.drop()
    code_after = code_fingerprint()
    result.report["code"] = {
        "package": str(Path(chargegw.__file__).resolve().parent),
        "fingerprint": code,
        "changed_during_run": code_after != code,
    }
    if code_after != code:
        say(
            "WARNING: the gateway's code changed during the run; restarted workers ran "
            "the new code: the results mix two versions"
        )
    if opts.report:
        reporting.write_json(opts.report, result.report)
    return result


async def _run(
    opts: ChaosOptions, database: Database, say: Callable[[str], None], started: float
) -> ChaosResult:
    rng = random.Random(opts.seed)
    log_dir = Path(opts.log_dir or tempfile.mkdtemp(prefix="chargegw-chaos-"))
    settings = gateway_settings(opts)
    gateway = GatewayProcess(database.dsn, opts.workers, settings, log_dir / "serve.log")
    timings: dict[str, float] = {}
    await gateway.start()
    say(
        f"chargegw serve: devices 127.0.0.1:{gateway.device_port}, API {gateway.api}, "
        f"log {gateway.log_path}"
    )
    try:
        sim = Simulator(
            "127.0.0.1",
            gateway.device_port,
            make_fleet(opts),
            accel=opts.accel,
            jitter=0.1,
            seed=opts.seed,
            reconnect_max_s=5.0,
        )
        async with sim:
            await sim.wait_connected(timeout=90)
            devices = sum(len(p.device_ids()) for p in sim.piles)
            await _until(
                lambda: _count(database.dsn, "SELECT count(*) FROM devices"),
                lambda n: n >= devices,
                timeout=90,
            )
            cards, unknown, planned = await set_up_billing(gateway.api, sim, rng)
            timings["setup_s"] = time.monotonic() - started
            say(
                f"[setup {timings['setup_s']:.0f}s] {devices} devices online, "
                f"{len(cards)} cards, {len(planned)} devices with a rate plan; "
                f"chaos for {opts.duration_s:.0f}s"
            )
            driver = ActivityDriver(
                opts, sim, gateway.api, rng, cards=cards, unknown_cards=unknown, planned=planned
            )
            faults = FaultDriver(opts.faults, database, gateway, sim, rng, say)
            chaos_started = time.monotonic()
            status = asyncio.create_task(_status(opts, sim, driver, chaos_started, say))
            try:
                await asyncio.gather(driver.run(opts.duration_s), faults.run(opts.duration_s))
            finally:
                status.cancel()
            timings["chaos_s"] = time.monotonic() - chaos_started
            quiet_started = time.monotonic()
            quiet = await _quiet(opts, sim, gateway, database, faults, say)
            timings["quiet_s"] = time.monotonic() - quiet_started
            checks_started = time.monotonic()
            snapshot = SimSnapshot.take(sim)
            conn = await asyncpg.connect(database.dsn, timeout=30)
            try:
                state = await DbState.load(conn)
                results = check_all(snapshot, state, driver.calls, faults.database_windows())
                await attach_frames(conn, results)
            finally:
                await conn.close()
            timings["checks_s"] = time.monotonic() - checks_started
    finally:
        await gateway.stop()
    timings["total_s"] = time.monotonic() - started
    report = _report(opts, database, gateway, timings, quiet, faults, driver, snapshot, results)
    result = ChaosResult(results, report)
    say("\n" + result.text())
    say(
        f"\n{result.violations} violations; {timings['total_s']:.0f}s in all "
        f"(setup {timings['setup_s']:.0f}s, chaos {timings['chaos_s']:.0f}s, quiet "
        f"{timings['quiet_s']:.0f}s, checks {timings['checks_s']:.0f}s)"
        + (f"; report {opts.report}" if opts.report else "")
    )
    return result


async def _count(dsn: str, sql: str) -> int:
    try:
        conn = await asyncpg.connect(dsn, timeout=10)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return -1
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


async def _until(
    probe: Callable[[], Awaitable[Any]], ok: Callable[[Any], bool], *, timeout: float
) -> bool:
    """Poll ``probe`` until ``ok``; False when ``timeout`` passed first."""
    deadline = time.monotonic() + timeout
    while True:
        if ok(await probe()):
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(1.0)


async def _status(
    opts: ChaosOptions,
    sim: Simulator,
    driver: ActivityDriver,
    t0: float,
    say: Callable[[str], None],
) -> None:
    while True:
        await asyncio.sleep(opts.status_every_s)
        ledger = sim.ledger()
        accepted = sum(c.accepted for c in driver.calls)
        say(
            f"[{time.monotonic() - t0:.0f}s] {sim.stats().line()}; API {len(driver.calls)} "
            f"calls ({accepted} accepted); sessions ended {len(ledger)}, "
            f"unacknowledged {len(sim.unacknowledged())}, charging {len(sim.charging())}"
        )


async def _quiet(
    opts: ChaosOptions,
    sim: Simulator,
    gateway: GatewayProcess,
    database: Database,
    faults: FaultDriver,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Faults off, no new starts: wait for every worker, every pile connected and the
    outbox empty; then end every session at the piles (unplugged: a late start cannot
    begin a new one) and wait until every report is acknowledged. Bounded by
    ``opts.quiet_timeout_s``; then a grace period so the platform notices what the
    last kill left behind (``process_timeout_s``)."""
    await faults.heal()
    deadline = time.monotonic() + opts.quiet_timeout_s
    say(f"quiet period (at most {opts.quiet_timeout_s:.0f}s)")
    outbox = "SELECT count(*) FROM commands WHERE status IN ('pending', 'sent')"

    def left() -> float:
        return max(1.0, deadline - time.monotonic())

    began = time.monotonic()
    workers = await _until(
        gateway.live_workers, lambda live: len(live) >= opts.workers, timeout=left()
    )
    workers_s = time.monotonic() - began
    drained = await _until(lambda: _count(database.dsn, outbox), lambda n: n == 0, timeout=left())
    unplugged_at = time.monotonic()
    for slot in slots_of(sim):
        slot.unplug()

    async def state() -> tuple[int, int, int, int]:
        return (
            await _count(database.dsn, outbox),
            len(sim.unacknowledged()),
            sum(not p.connected for p in sim.piles),
            len(sim.charging()),
        )

    settled = await _until(state, lambda s: s == (0, 0, 0, 0), timeout=left())
    final = await state()
    # the dead-process sweep of a killed worker runs process_timeout_s after its last
    # heartbeat: let it happen before the online flags are compared
    settings = gateway.settings
    grace = float(settings["process_timeout_s"]) + 2 * float(settings["cluster_heartbeat_s"]) + 2
    if faults.last_kill_wall is not None:
        wait = faults.last_kill_wall + grace - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
    await asyncio.sleep(3.0)  # batches flushed
    quiet = {
        "reached": bool(workers and drained and settled),
        "workers_live": workers,
        "workers_live_after_s": round(workers_s, 1),
        "outbox_drained_before_unplug": drained,
        "outbox_drained_after_s": round(unplugged_at - began, 1),
        "settled_after_unplug": settled,
        "after_unplug_s": round(time.monotonic() - unplugged_at, 1),
        "left": dict(
            zip(("outbox_open", "unacknowledged", "disconnected", "charging"), final, strict=True)
        ),
    }
    say(f"quiet period {'reached' if quiet['reached'] else 'NOT reached'}: {quiet['left']}")
    return quiet


def _report(
    opts: ChaosOptions,
    database: Database,
    gateway: GatewayProcess,
    timings: dict[str, float],
    quiet: dict[str, Any],
    faults: FaultDriver,
    driver: ActivityDriver,
    snapshot: SimSnapshot,
    results: list[InvariantResult],
) -> dict[str, Any]:
    api = collections.Counter(
        f"{c.action} {c.path.rsplit('/', 1)[1]} {c.status or c.error or '-'}" for c in driver.calls
    )
    sessions = collections.Counter(f"{e.protocol} {e.started_by}" for e in snapshot.ledger)
    ledger = snapshot.ledger
    windows = faults.database_windows()
    errors = [c for c in driver.calls if c.status is not None and c.status >= 500]
    outside = [c for c in errors if not any(b - 3 <= c.at <= e + 3 for b, e in windows)]
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "options": {**dataclasses.asdict(opts), "dsn": None if opts.dsn is None else "(given)"},
        "machine": machine_info(),
        "versions": versions(),
        "database": database.name,
        "gateway": {
            "settings": gateway.settings,
            "workers": opts.workers,
            "log": str(gateway.log_path),
            "killed": gateway.killed,
        },
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "quiet": quiet,
        "faults": [e.to_json() for e in faults.events],
        "activity": {
            "actions": driver.actions,
            "card_swipes": driver.swipes,
            "device_starts": driver.device_starts,
            "api": dict(sorted(api.items())),
            # the API promises 503 while the database is unreachable; 5xx outside the
            # database faults are worth a look (the first 50 are listed)
            "api_5xx": {
                "during_database_faults": len(errors) - len(outside),
                "outside_database_faults": len(outside),
                "outside_examples": [c.to_json() for c in outside[:50]],
            },
        },
        "sessions": {
            "ended": len(ledger),
            "by_protocol_and_starter": dict(sorted(sessions.items())),
            "acknowledged": sum(e.acked for e in ledger),
            "dropped_by_piles": sum(e.dropped for e in ledger),
            "report_copies": sum(e.copies_sent for e in ledger),
            "copies_with_changed_readings": sum(e.copies_changed for e in ledger),
            "acks_lost": sum(e.acks_lost for e in ledger),
            "tag_omitted": sum(e.tag_omitted for e in ledger),
        },
        "invariants": [r.to_json() for r in results],
        "violations": sum(len(r.violations) for r in results),
    }


def main_exit(opts: ChaosOptions) -> int:
    """Run and return the exit status: 0 without violations, 1 with, 2 if it failed."""
    try:
        result = asyncio.run(run_chaos(opts))
    except ChaosError as exc:
        _stderr(f"chaos: {exc}")
        return 2
    if opts.quiet:  # nothing was said on the way: the table at least
        _stderr(result.text())
    return 1 if result.violations else 0
