"""A process never loses the devices it holds because the database, or the process
itself, was slow (issue 11, finding 1), and what a killed process left online is marked
offline (finding 10): real ``chargegw serve`` processes, simulated piles over real TCP,
a real PostgreSQL that goes away.

Settings of the node (``test_cluster.Node``): heartbeat every 0.5 s, a process is
declared dead after 3 s without one. Commands expire after 8 s here
(``CHARGEGW_COMMAND_EXPIRY_S``), so a command nobody claims ends ``dead``/``offline``
within the test instead of waiting.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from chargesim import Simulator

from .conftest import database_outage
from .test_cluster import (
    POLL_S,
    WAIT_S,
    Node,
    all_online,
    command,
    piles,
    received_ids,
    statuses,
)
from .test_crash_recovery import Server
from .test_directory_safety import running
from .waiting import eventually

HEARTBEAT_S = 0.5  # CHARGEGW_CLUSTER_HEARTBEAT_S of test_cluster.Node
PROCESS_TIMEOUT_S = 3.0  # CHARGEGW_PROCESS_TIMEOUT_S of test_cluster.Node
EXPIRY_S = "8"


@pytest.fixture
async def node(db_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``chargegw serve --workers 3`` on a fresh database (commands expire after 8 s)."""
    monkeypatch.setenv("CHARGEGW_COMMAND_EXPIRY_S", EXPIRY_S)
    node = Node(db_dsn, tmp_path, "a", workers=3)
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


async def directory(dsn: str, device_ids: list[str]) -> dict[str, tuple[str | None, str | None]]:
    """device id -> (owner, connection id) in ``device_sessions``."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            """SELECT device_id, owner, connection_id FROM device_sessions
               WHERE device_id = ANY($1::text[])""",
            device_ids,
        )
    finally:
        await conn.close()
    return {r["device_id"]: (r["owner"], r["connection_id"]) for r in rows}


async def query(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
    finally:
        await conn.close()
    return rows


async def gateways_online(dsn: str, gateway_ids: list[str]) -> list[str]:
    rows = await query(
        dsn,
        "SELECT gateway_id FROM gateways WHERE gateway_id = ANY($1::text[]) AND online",
        gateway_ids,
    )
    return sorted(r["gateway_id"] for r in rows)


async def all_acked(dsn: str, sent: dict[int, Any], timeout: float = 15.0) -> dict[int, Any]:
    """Wait until every command of ``sent`` is acked; fail with how they ended."""
    try:
        rows: dict[int, Any] = await eventually(
            lambda: statuses(dsn, list(sent)),
            lambda rows: all(r["status"] == "acked" for r in rows.values()),
            timeout=timeout,
            interval=POLL_S,
        )
    except AssertionError:
        rows = await statuses(dsn, list(sent))
        outcome = collections.Counter(
            f"{r['status']}/{r['dead_reason']}" if r["dead_reason"] else r["status"]
            for r in rows.values()
        )
        acked = outcome.get("acked", 0)
        raise AssertionError(
            f"{acked} of {len(sent)} commands acked within {timeout} s: {dict(outcome)}"
        ) from None
    return rows


async def test_an_outage_longer_than_the_process_timeout_strands_no_device(
    node: Node, db_dsn: str, pg_server_dsn: str
) -> None:
    """Three workers hold nine piles; the database goes away for longer than
    ``process_timeout_s`` while the piles stay connected. Once it is back (and past
    the time in which a sweep could declare a worker dead), a command to every pile is
    acked, the piles are shown online, they are still held on their first connections
    (nothing reconnected), and no worker was declared dead for the database's absence.

    Old main: the first worker back swept its peers (their heartbeats were old because
    of the outage) and released their directory entries; their next heartbeat revived
    them, but nothing bound their devices again, so their commands were never claimed
    and died ``dead``/``offline`` (most of the nine), the devices shown offline."""
    fleet = piles(1, 9)
    ids = [p.pile_id for p in fleet]
    async with Simulator("127.0.0.1", node.device_port, fleet, accel=30, jitter=0):
        await eventually(lambda: all_online(node, ids), bool, timeout=WAIT_S, interval=POLL_S)
        before = await eventually(
            lambda: directory(db_dsn, ids),
            lambda d: len(d) == 9 and all(owner for owner, _ in d.values()),
            timeout=WAIT_S,
            interval=POLL_S,
        )
        assert len({owner for owner, _ in before.values()}) > 1, "piles on several workers"
        async with database_outage(pg_server_dsn, db_dsn):
            # holds the outage past process_timeout_s (a duration, not a wait for something)
            await asyncio.sleep(PROCESS_TIMEOUT_S + 2.0)
        await eventually(node.live_workers, lambda n: n == 3, timeout=20, interval=POLL_S)
        # proves no sweep acts wrongly in the time it could: a worker judges liveness only
        # after process_timeout_s of contact, then sweeps at its next heartbeats
        await asyncio.sleep(PROCESS_TIMEOUT_S + 4 * HEARTBEAT_S)
        sent = {await command(node, pile.pile_id): pile for pile in fleet}
        rows = await all_acked(db_dsn, sent)
        for command_id, pile in sent.items():
            assert received_ids(pile) == [rows[command_id]["correlation"]]  # exactly once
        assert await all_online(node, ids)
        assert await gateways_online(db_dsn, ids) == sorted(ids)  # each pile is its gateway
        assert await directory(db_dsn, ids) == before  # same processes, same connections
        # the first worker back did not declare its peers dead for the database's absence
        # (a process declared dead has its devices marked offline with process_lost)
        lost = await query(
            db_dsn,
            """SELECT device_id, reason FROM device_events
               WHERE kind = 'offline' AND device_id = ANY($1::text[])""",
            ids,
        )
        assert [dict(r) for r in lost] == []


async def test_a_worker_stalled_longer_than_the_process_timeout_gets_its_devices_back(
    node: Node, db_dsn: str
) -> None:
    """One worker is stopped (SIGSTOP) until the others declare it dead and mark its
    piles offline (``process_lost``); its piles stay connected to it. When it resumes
    (SIGCONT) it re-asserts every device it holds: they (and their gateways) are shown
    online again (an ``online`` event with reason ``ownership_reasserted``), the
    directory names it on the same connections, and commands to its piles are
    delivered (exactly once) and acked.

    Old main: the resumed worker's heartbeat cleared its ``stopped_at`` but bound none
    of its devices again: they stayed offline and their commands were never claimed
    (``dead``/``offline`` after the expiry)."""
    fleet = piles(1, 9)
    ids = [p.pile_id for p in fleet]
    async with Simulator("127.0.0.1", node.device_port, fleet, accel=30, jitter=0):
        await eventually(lambda: all_online(node, ids), bool, timeout=WAIT_S, interval=POLL_S)
        before = await eventually(
            lambda: directory(db_dsn, ids),
            lambda d: len(d) == 9 and all(owner for owner, _ in d.values()),
            timeout=WAIT_S,
            interval=POLL_S,
        )
        held = collections.Counter(owner for owner, _ in before.values())
        victim = max(await node.processes(), key=lambda p: held[p["owner"]])
        doomed = [p for p in fleet if before[p.pile_id][0] == victim["owner"]]
        doomed_ids = [p.pile_id for p in doomed]
        assert doomed
        os.kill(victim["pid"], signal.SIGSTOP)
        try:
            # the others declare it dead and mark its devices offline (read from the
            # database: an HTTP call could land on the stopped worker)
            await eventually(
                lambda: query(
                    db_dsn,
                    "SELECT stopped_at FROM cluster_processes WHERE owner = $1",
                    victim["owner"],
                ),
                lambda rows: rows and rows[0]["stopped_at"] is not None,
                timeout=15,
                interval=POLL_S,
            )
            await eventually(
                lambda: query(
                    db_dsn,
                    """SELECT device_id FROM devices
                       WHERE device_id = ANY($1::text[]) AND NOT online""",
                    doomed_ids,
                ),
                lambda rows: len(rows) == len(doomed),
                timeout=10,
                interval=POLL_S,
            )
        finally:
            os.kill(victim["pid"], signal.SIGCONT)
        sent = {await command(node, pile.pile_id): pile for pile in doomed}
        rows = await all_acked(db_dsn, sent)
        for command_id, pile in sent.items():
            assert received_ids(pile) == [rows[command_id]["correlation"]]  # exactly once
            assert rows[command_id]["claimed_by"] == victim["owner"]
        assert await all_online(node, ids)
        assert await gateways_online(db_dsn, ids) == sorted(ids)  # each pile is its gateway
        assert await directory(db_dsn, ids) == before  # still held where they are connected
        events = await query(
            db_dsn,
            """SELECT DISTINCT device_id FROM device_events
               WHERE kind = 'online' AND reason = 'ownership_reasserted'
                 AND device_id = ANY($1::text[])""",
            doomed_ids,
        )
        assert sorted(r["device_id"] for r in events) == sorted(doomed_ids)


async def test_devices_and_gateways_of_a_killed_process_go_offline(
    db_dsn: str, tmp_path: Path
) -> None:
    """``chargegw serve`` is killed (SIGKILL: no offline row written) while four piles
    (each its own gateway) are online; the piles do not come back. Once another gateway
    has run for ``process_timeout_s`` and a heartbeat, the devices are offline
    (``process_lost``) and so are their gateways, in the database.

    Old main: the sweep marked the devices offline but left their ``gateways`` rows
    online for good."""
    server = Server(db_dsn, tmp_path)
    await server.start()
    fleet = piles(1, 4)
    ids = [p.pile_id for p in fleet]
    shown = """SELECT 'device ' || device_id AS id FROM devices
               WHERE device_id = ANY($1::text[]) AND online
               UNION ALL
               SELECT 'gateway ' || gateway_id FROM gateways
               WHERE gateway_id = ANY($1::text[]) AND online"""
    try:
        sim = Simulator("127.0.0.1", server.device_port, fleet, accel=30, jitter=0)
        await sim.start()
        try:
            await eventually(
                lambda: query(db_dsn, shown, ids),
                lambda rows: len(rows) == 8,
                timeout=WAIT_S,
                interval=POLL_S,
            )
            await server.kill()
        finally:
            await sim.stop()
    finally:
        await server.stop()
    assert len(await query(db_dsn, shown, ids)) == 8  # left online by the kill
    async with running(db_dsn, node="restarted", cluster_heartbeat_s=0.2, process_timeout_s=1.5):
        left = await eventually(
            lambda: query(db_dsn, shown, ids), lambda rows: not rows, timeout=10, interval=POLL_S
        )
        assert left == []
    reasons = await query(
        db_dsn,
        "SELECT DISTINCT offline_reason FROM devices WHERE device_id = ANY($1::text[])",
        ids,
    )
    assert {r["offline_reason"] for r in reasons} <= {"process_lost", "not_connected"}
