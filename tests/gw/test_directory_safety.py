"""The session directory and the online flags stay true to the connections really held
(issue 11, findings 2 and 10, and the superseded owner of finding 1).

In-process gateways on one real PostgreSQL, byte-level piles over real TCP. Two
``Gateway`` objects in one test process stand for two nodes (different ``node`` names,
so different owners in the directory); a node's clock is injected by replacing its
``wall()`` (and, for a whole skewed process, ``datetime.now`` in the gateway's modules).
What is checked is what an operator or a pile sees: rows of ``device_sessions``,
``devices``, ``gateways`` and ``commands``, the HTTP API, and the frames on the wire.

Multi-process scenarios (a database outage with ``serve --workers 3``, a stalled
worker, a killed process) are in ``test_cluster_outage.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from chargegw.app import Gateway
from chargeproto import ap3000

from .conftest import settings_for
from .piles import RawPile
from .waiting import api_client, eventually

READ = "read_running_params1"  # 0x90: the pile answers with its parameters, same msg id
SKEW = timedelta(seconds=60)


@contextlib.asynccontextmanager
async def running(dsn: str, **overrides: Any) -> AsyncIterator[Gateway]:
    """A gateway process (in this test process) on ``dsn``, stopped at the end."""
    gw = Gateway(settings_for(dsn, **overrides))
    await gw.start(http=False)
    try:
        yield gw
    finally:
        await gw.stop()


async def submit(client: httpx.AsyncClient, device_id: str) -> int:
    response = await client.post(
        f"/api/v1/devices/{device_id}/commands", json={"command": READ, "params": {}}
    )
    assert response.status_code == 202, response.text
    command_id: int = response.json()["command_id"]
    return command_id


def answer(pile: RawPile, msg_id: int) -> ap3000.RunningParams1:
    """The pile's answer to a 0x90 read with ``msg_id``."""
    return ap3000.RunningParams1(
        pile.phy_id,
        msg_id,
        unplug_power_w=5.0,
        unplug_detect_time_s=60,
        float_percent=80,
        float_detect_time_s=30,
        float_time_s=600,
        heartbeat_interval_s=180,
    )


async def online_on(pile: RawPile, port: int) -> RawPile:
    """``pile`` connected to ``port`` and seen there (a heartbeat, answered)."""
    await pile.connect(port, iccid=None)
    await pile.heartbeat()
    await pile.expect(ap3000.HeartbeatReply)
    return pile


async def directory_owner(pool: asyncpg.Pool, device_id: str) -> str | None:
    owner: str | None = await pool.fetchval(
        "SELECT owner FROM device_sessions WHERE device_id = $1", device_id
    )
    return owner


async def one(pool: asyncpg.Pool, sql: str, *args: Any) -> asyncpg.Record:
    """The row ``sql`` selects (there must be one)."""
    row: asyncpg.Record | None = await pool.fetchrow(sql, *args)
    assert row is not None, (sql, args)
    return row


def command_row(pool: asyncpg.Pool, command_id: int) -> Awaitable[asyncpg.Record]:
    return one(
        pool, "SELECT status, claimed_by, attempts FROM commands WHERE command_id = $1", command_id
    )


def finished_count(gw: Gateway, status: str) -> float:
    """``chargegw_commands_finished_total`` of ``gw`` for 0x90 reads with ``status``."""
    value = gw.metrics.registry.get_sample_value(
        "chargegw_commands_finished_total",
        {"protocol": "ap3000", "command": READ, "status": status},
    )
    return value or 0.0


# -- finding 2: a node whose clock is behind ------------------------------------------


async def test_a_newer_connection_on_a_node_whose_clock_is_behind_takes_the_device(
    db_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The directory orders binds by database time, not by each node's wall clock: a
    device that reconnects to a node whose clock is 60 s behind is owned there (the
    old node lets go and closes its stale connection), and a command sent afterwards
    goes out on the newer connection.

    Old main: the bind's ``since`` came from node b's wall clock, 60 s older than node
    a's bind, so ``WHERE s.since <= EXCLUDED.since`` ignored it; the directory kept
    naming node a, which sent the command down the stale connection."""
    fast = {"cluster_heartbeat_s": 0.2, "process_timeout_s": 30.0, "command_spacing_s": 0.0}
    async with running(db_dsn, node="a", **fast) as gw_a, running(db_dsn, node="b", **fast) as gw_b:
        monkeypatch.setattr(gw_b, "wall", lambda: datetime.now(UTC) - SKEW)
        assert gw_a.pool is not None
        pool = gw_a.pool
        phy = "04000A01"
        old = await online_on(RawPile(phy), gw_a.server.port)
        await eventually(lambda: directory_owner(pool, phy), lambda o: o == gw_a.cluster.owner)
        # the pile comes back through the load balancer to node b; the old socket lingers
        new = await online_on(RawPile(phy), gw_b.server.port)
        try:
            await eventually(lambda: directory_owner(pool, phy), lambda o: o == gw_b.cluster.owner)
            # node a sees the newer bind and lets the device go: its stale socket closes
            assert await old.closed_by_server(timeout=5), "node a kept the superseded socket"
            async with api_client(gw_b) as client:
                command_id = await submit(client, phy)
            sent = await new.expect(ap3000.ReadRunningParams1, timeout=5)
            await new.send(answer(new, sent.msg_id))
            row = await eventually(
                lambda: command_row(pool, command_id), lambda r: r["status"] == "acked"
            )
            assert row["claimed_by"] == gw_b.cluster.owner
            device = await one(
                pool, "SELECT online, offline_reason FROM devices WHERE device_id = $1", phy
            )
            assert device["online"] is True, dict(device)
        finally:
            await old.close()
            await new.close()


def _skewed_datetime(skew: timedelta) -> type[datetime]:
    class Skewed(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Skewed:
            return datetime.now(tz) - skew  # type: ignore[return-value]

        @classmethod
        def utcnow(cls) -> Skewed:
            return datetime.now(UTC).replace(tzinfo=None) - skew  # type: ignore[return-value]

    return Skewed


async def test_a_command_expires_in_database_time_whatever_the_api_hosts_clock(
    gateway: Gateway, api: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command submitted through a gateway whose clock is 60 s behind expires
    ``command_expiry_s`` after the database's ``now()``, like every other time the
    database compares ``expires_at`` with.

    Old main: ``expires_at`` was the API host's ``datetime.now() + command_expiry_s``,
    60 s early against the database's clock (and 60 s late on a host ahead)."""
    pile = await online_on(RawPile("04000A02"), gateway.server.port)
    try:
        await gateway.writer.drained()
        # the whole process's clock is behind: the gateway's wall() and datetime.now()
        # wherever the gateway's modules call it
        skewed = _skewed_datetime(SKEW)
        monkeypatch.setattr(gateway, "wall", lambda: datetime.now(UTC) - SKEW)
        for name, module in list(sys.modules.items()):
            if name.startswith("chargegw") and getattr(module, "datetime", None) is datetime:
                monkeypatch.setattr(module, "datetime", skewed)
        command_id = await submit(api, pile.phy_id)
        assert gateway.pool is not None
        row = await one(
            gateway.pool,
            """SELECT extract(epoch FROM expires_at - now()) AS left_s
               FROM commands WHERE command_id = $1""",
            command_id,
        )
        expiry = gateway.settings.command_expiry_s
        assert abs(float(row["left_s"]) - expiry) < 5.0, (
            f"expires_at is {row['left_s']:.1f} s after the database's now(), "
            f"not command_expiry_s = {expiry} s"
        )
    finally:
        await pile.close()


# -- finding 10: online forever after short reconnections ------------------------------


async def _short_connections(phy: str, port: int, pool: asyncpg.Pool) -> None:
    """Two short connections of one pile: connect, one heartbeat, close; twice. Each
    step is waited for in the database, so each connection's rows are put apart; the
    outcome of the second close is what the test looks at."""

    async def online() -> bool | None:
        value: bool | None = await pool.fetchval(
            "SELECT online FROM devices WHERE device_id = $1", phy
        )
        return value

    pile = await online_on(RawPile(phy), port)
    await eventually(online, lambda v: v is True)
    await pile.close()
    await eventually(online, lambda v: v is False)
    pile = await online_on(RawPile(phy), port)  # back within state_refresh_s
    await eventually(online, lambda v: v is True)
    await pile.close()


async def test_devices_that_reconnect_briefly_end_offline_in_the_database_and_the_api(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    """20 devices each make two short connections within ``state_refresh_s`` (connect,
    one heartbeat, close; again): all of them, and their gateways, end ``online =
    false`` in ``devices``, ``gateways`` and ``GET /api/v1/devices``.

    Old main: the writer's unchanged-row check was keyed by the row's columns, so the
    second offline row (identical to the first) was skipped although an online row had
    been written in between: 20 of 20 devices and gateways stayed online."""
    assert gateway.writer.refresh_s >= 60, "the two connections fall in one refresh period"
    assert gateway.pool is not None
    pool = gateway.pool
    phys = [f"04000B{n:02X}" for n in range(1, 21)]
    await asyncio.gather(*(_short_connections(phy, gateway.server.port, pool) for phy in phys))

    async def still_online() -> list[str]:
        rows = await pool.fetch(
            """SELECT device_id FROM devices WHERE device_id = ANY($1::text[]) AND online
               UNION ALL
               SELECT 'gateway ' || gateway_id FROM gateways
               WHERE gateway_id = ANY($1::text[]) AND online""",
            phys,
        )
        return sorted(r["device_id"] for r in rows)

    left = await eventually(still_online, lambda ids: not ids, timeout=5.0)
    assert left == []
    count = await pool.fetchval("SELECT count(*) FROM devices WHERE device_id = ANY($1)", phys)
    assert count == 20
    body = (await api.get("/api/v1/devices", params={"limit": 100})).json()
    shown = {d["device_id"]: d["online"] for d in body["items"] if d["device_id"] in phys}
    assert shown == dict.fromkeys(phys, False)
    gateways = (await api.get("/api/v1/gateways", params={"online": "true"})).json()
    assert [g["gateway_id"] for g in gateways["items"] if g["gateway_id"] in phys] == []


# -- finding 10: what a crash or a restart left online ----------------------------------


@pytest.mark.settings(cluster_heartbeat_s=0.2, process_timeout_s=1.0)
async def test_a_running_gateway_marks_offline_devices_no_live_process_holds(
    gateway: Gateway,
) -> None:
    """Devices shown online in the database that no live process holds (their
    directory entry released, or never written: left by a crash, a lost write, the
    bug above, a restart) are marked offline, with an offline event, once a gateway
    has run for ``process_timeout_s``. A device really held keeps its online flag.

    Old main: nothing reconciled ``online`` with the connections held: such devices
    stayed online across restarts until they next connected."""
    assert gateway.pool is not None
    pool = gateway.pool
    held = await online_on(RawPile("04000C03"), gateway.server.port)
    try:
        await gateway.writer.drained()
        await pool.execute(
            """INSERT INTO devices (device_id, protocol, online, last_seen_at, updated_at)
               VALUES ('04000C01', 'ap3000', true, now() - interval '1 hour',
                       now() - interval '1 hour'),
                      ('04000C02', 'ap3000', true, now() - interval '1 hour',
                       now() - interval '1 hour')"""
        )
        # 04000C01: no directory entry at all; 04000C02: released an hour ago
        await pool.execute(
            """INSERT INTO device_sessions (device_id, owner, connection_id, since,
                                            window_start, released_at)
               VALUES ('04000C02', NULL, NULL, now() - interval '1 hour',
                       now() - interval '1 hour', now() - interval '1 hour')"""
        )

        async def shown() -> dict[str, tuple[bool, str | None]]:
            rows = await pool.fetch(
                """SELECT device_id, online, offline_reason FROM devices
                   WHERE device_id LIKE '04000C%'"""
            )
            return {r["device_id"]: (r["online"], r["offline_reason"]) for r in rows}

        state = await eventually(
            shown, lambda s: not s["04000C01"][0] and not s["04000C02"][0], timeout=8.0
        )
        assert state["04000C01"] == (False, "not_connected")
        assert state["04000C02"] == (False, "not_connected")
        assert state["04000C03"] == (True, None)
        events = await pool.fetch(
            """SELECT device_id, reason FROM device_events
               WHERE kind = 'offline' AND device_id LIKE '04000C%' ORDER BY device_id"""
        )
        assert [(e["device_id"], e["reason"]) for e in events] == [
            ("04000C01", "not_connected"),
            ("04000C02", "not_connected"),
        ]
    finally:
        await held.close()


# -- finding 1: an owner that is alive but superseded ----------------------------------


async def out_frames(pool: asyncpg.Pool, device_id: str) -> dict[str, int]:
    """Connection id -> 0x90 reads written to it for ``device_id`` (the audit log)."""
    rows = await pool.fetch(
        """SELECT connection_id, count(*) AS n FROM frames
           WHERE device_id = $1 AND direction = 'out' AND command = $2
           GROUP BY connection_id""",
        device_id,
        READ,
    )
    return {r["connection_id"]: r["n"] for r in rows}


async def lock_waiters(conn: asyncpg.Connection) -> int:
    """Statements of this database waiting for a lock."""
    n: int = await conn.fetchval(
        """SELECT count(*) FROM pg_stat_activity
           WHERE datname = current_database() AND wait_event_type = 'Lock'"""
    )
    return n


async def test_a_superseded_owner_cannot_send_a_command_it_claimed_the_new_owner_does(
    db_dsn: str,
) -> None:
    """Process a has claimed a device's command and waits out the command spacing when
    the device reconnects to process b. Once the directory names b, a must not send
    the command down its stale connection: b delivers it on the newer connection, with
    one attempt, and finishes it.

    The race is pinned with a row lock held by the test on the command: while it is
    held, b's claim skips the row (and a's marking it sent, on old main, waits for
    it); it is released once a's UPDATE is seen waiting, or after the spacing and 1.5 s.

    Old main: marking a command sent checked only ``claimed_by``, so the superseded a
    wrote it to the connection the device had left (which then waits for an answer
    that comes, if ever, on the other connection); b took the row over and sent it a
    second time (two attempts, one on each connection)."""
    common = {"cluster_heartbeat_s": 60.0, "process_timeout_s": 120.0, "ack_timeout_s": 10.0}
    spacing = 1.5
    phy = "04000D01"
    async with (
        running(db_dsn, node="a", command_spacing_s=spacing, **common) as gw_a,
        running(db_dsn, node="b", command_spacing_s=0.0, outbox_scan_s=0.3, **common) as gw_b,
    ):
        assert gw_a.pool is not None
        pool = gw_a.pool
        old = await online_on(RawPile(phy), gw_a.server.port)
        new = RawPile(phy)
        locker = await asyncpg.connect(db_dsn)
        try:
            await eventually(lambda: directory_owner(pool, phy), lambda o: o == gw_a.cluster.owner)
            async with api_client(gw_a) as client:
                first_id = await submit(client, phy)  # answered: a's spacing runs from here
                first = await old.expect(ap3000.ReadRunningParams1, timeout=5)
                await old.send(answer(old, first.msg_id))
                await eventually(
                    lambda: command_row(pool, first_id), lambda r: r["status"] == "acked"
                )
                command_id = await submit(client, phy)
            claimed = await eventually(
                lambda: one(
                    pool, "SELECT claimed_by FROM commands WHERE command_id = $1", command_id
                ),
                lambda r: r["claimed_by"] == gw_a.cluster.owner,
            )
            assert claimed
            lock = locker.transaction()
            await lock.start()
            await locker.execute(
                "SELECT 1 FROM commands WHERE command_id = $1 FOR UPDATE", command_id
            )
            await online_on(new, gw_b.server.port)  # the newer connection, on b
            await eventually(lambda: directory_owner(pool, phy), lambda o: o == gw_b.cluster.owner)
            # old main: a's spacing ends and its UPDATE queues behind the lock; the
            # fixed a sees that the directory names b and leaves the row alone
            with contextlib.suppress(AssertionError):
                await eventually(
                    lambda: lock_waiters(locker), lambda n: n >= 1, timeout=spacing + 1.5
                )
            await lock.commit()
            sent = await new.expect(ap3000.ReadRunningParams1, timeout=5)
            await new.send(answer(new, sent.msg_id))
            row = await eventually(
                lambda: command_row(pool, command_id),
                lambda r: r["status"] not in ("pending", "sent"),
            )
            await gw_a.writer.drained()
            await gw_b.writer.drained()
            frames = await out_frames(pool, phy)
            assert (row["status"], row["claimed_by"], row["attempts"]) == (
                "acked",
                gw_b.cluster.owner,
                1,
            ), (dict(row), frames)
            # a wrote only the first command; b wrote this one, once
            assert sorted(frames.values()) == [1, 1], frames
            assert finished_count(gw_a, "acked") == 1  # the first command only
            assert finished_count(gw_b, "acked") == 1
        finally:
            await locker.close()
            await old.close()
            await new.close()


async def test_a_command_in_flight_when_its_device_moves_is_finished_once_by_the_new_owner(
    db_dsn: str,
) -> None:
    """A command is in flight on process a when the device reconnects to process b: b
    takes the row over and sends it again with the same correlation id (the pile can
    recognise the repeat) on the newer connection; the pile's late answer on the old
    connection does not finish it a second time; b finishes it, once.

    A guard (it passes on old main too, where the new owner's claim also fenced the old
    one). An answer that reaches a before b has claimed the row is not pinned here:
    a may record it while the claim is still its own, or leave it to b's resend."""
    slow = {
        "cluster_heartbeat_s": 60.0,
        "process_timeout_s": 120.0,
        "ack_timeout_s": 10.0,
        "command_spacing_s": 0.0,
    }
    phy = "04000D02"
    async with running(db_dsn, node="a", **slow) as gw_a, running(db_dsn, node="b", **slow) as gw_b:
        assert gw_a.pool is not None
        pool = gw_a.pool
        old = await online_on(RawPile(phy), gw_a.server.port)
        new = RawPile(phy)
        try:
            await eventually(lambda: directory_owner(pool, phy), lambda o: o == gw_a.cluster.owner)
            async with api_client(gw_a) as client:
                command_id = await submit(client, phy)
            first = await old.expect(ap3000.ReadRunningParams1, timeout=5)  # in flight on a
            await online_on(new, gw_b.server.port)
            resent = await new.expect(ap3000.ReadRunningParams1, timeout=5)
            assert resent.msg_id == first.msg_id  # the same command, recognisable as a repeat
            # the pile's answer to the first copy reaches a, which no longer holds the row
            await old.send(answer(old, first.msg_id))
            await eventually(lambda: not gw_a.outbox.busy(phy))
            await new.send(answer(new, resent.msg_id))
            row = await eventually(
                lambda: command_row(pool, command_id),
                lambda r: r["status"] not in ("pending", "sent"),
            )
            assert (row["status"], row["claimed_by"], row["attempts"]) == (
                "acked",
                gw_b.cluster.owner,
                2,
            )
            assert finished_count(gw_a, "acked") == 0, "the superseded owner finished it too"
            assert finished_count(gw_b, "acked") == 1
        finally:
            await old.close()
            await new.close()


async def test_a_rebind_committed_late_elsewhere_is_still_noticed(db_dsn: str) -> None:
    """A device moves from process a to process b, and b's bind is committed late (its
    transaction waited for a lock, longer than the window in which a scans the
    directory for binds of other processes). Process a still notices that the device
    is held elsewhere on a newer connection: it lets the device go and closes its
    stale connection, instead of holding it (and re-asserting it at every heartbeat)
    until the idle timeout.

    The late commit is made with a row lock on the device's directory entry, held by
    the test until a has run heartbeats for longer than that window."""
    fast = {"cluster_heartbeat_s": 0.2, "process_timeout_s": 30.0}
    phy = "04000E01"
    async with running(db_dsn, node="a", **fast) as gw_a, running(db_dsn, node="b", **fast) as gw_b:
        assert gw_a.pool is not None
        pool = gw_a.pool
        old = await online_on(RawPile(phy), gw_a.server.port)
        new = RawPile(phy)
        locker = await asyncpg.connect(db_dsn)
        try:
            await eventually(lambda: directory_owner(pool, phy), lambda o: o == gw_a.cluster.owner)
            lock = locker.transaction()
            await lock.start()
            await locker.execute(
                "SELECT 1 FROM device_sessions WHERE device_id = $1 FOR UPDATE", phy
            )
            # b's bind now waits for the lock (the only statement that can: it is the
            # only one in this test that writes the entry)
            await online_on(new, gw_b.server.port)

            async def a_beats_past_the_waiting_bind() -> bool:
                past: bool = await locker.fetchval(
                    """SELECT p.heartbeat_at > w.query_start + interval '3 seconds'
                       FROM cluster_processes p, pg_stat_activity w
                       WHERE p.owner = $1 AND w.datname = current_database()
                         AND w.wait_event_type = 'Lock'""",
                    gw_a.cluster.owner,
                )
                return bool(past)

            await eventually(a_beats_past_the_waiting_bind, bool, timeout=8.0)
            await lock.commit()
            await eventually(lambda: directory_owner(pool, phy), lambda o: o == gw_b.cluster.owner)
            assert await old.closed_by_server(timeout=5), "a kept the superseded connection"
        finally:
            await locker.close()
            await old.close()
            await new.close()


# -- review: a live process whose own pool is exhausted -------------------------------


async def test_a_process_whose_pool_is_exhausted_is_not_declared_dead(db_dsn: str) -> None:
    """Every connection of node a's pool is busy (settlement retries, outbox workers
    after an outage) for longer than ``process_timeout_s``: its heartbeat still goes
    out on its own connection, so node b does not declare it stopped and its device
    keeps its directory entry and its online flag.

    Found in review: the heartbeat shared the main pool and waited behind the busy
    connections; the peer's sweep released a live process's devices."""
    timing = {"cluster_heartbeat_s": 0.2, "process_timeout_s": 1.0}
    async with running(db_dsn, node="a", **timing) as a, running(db_dsn, node="b", **timing) as b:
        assert a.pool is not None and b.pool is not None
        pile = await online_on(RawPile("04000201"), a.server.port)
        owner = await eventually(lambda: directory_owner(b.pool, "04000201"), bool)  # type: ignore[arg-type]
        await eventually(b.cluster.can_judge_liveness)
        held = [await a.pool.acquire() for _ in range(a.pool.get_max_size())]
        try:
            # proves the busy process is not declared stopped within four process timeouts
            await asyncio.sleep(4 * timing["process_timeout_s"])
            stopped = await b.pool.fetchval(
                "SELECT stopped_at FROM cluster_processes WHERE owner = $1", owner
            )
            assert stopped is None, "the busy process was declared stopped"
        finally:
            for conn in held:
                await a.pool.release(conn)
        assert await directory_owner(b.pool, "04000201") == owner
        assert await b.pool.fetchval("SELECT online FROM devices WHERE device_id = '04000201'")
        await pile.close()
