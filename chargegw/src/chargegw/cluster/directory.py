"""Membership of one gateway process in a platform of many processes on one PostgreSQL.

Every process (a worker of ``chargegw serve --workers N``, on any node) has a row in
``cluster_processes`` named by its *owner* id ``node/worker/pid`` and refreshes it every
``heartbeat_s``. The session directory (``device_sessions``, written by the batch writer)
says which owner holds each device's connection; only that owner may claim the device's
commands (outbox.py).

Each process also:

- listens on PostgreSQL channels: ``chargegw_outbox`` (a command was committed for a
  device: its owner wakes at once, no polling) and ``chargegw_ban`` (a device was banned
  or unbanned). The listening connection reconnects after an outage, then resyncs, since
  notifications sent while it was away are lost;
- sweeps for dead processes (no heartbeat for ``process_timeout_s``): they are marked
  stopped, their devices and gateways offline (``process_lost``) and their directory
  entries released, so commands wait for the devices to reconnect elsewhere. Every
  process runs the sweep; ``SKIP LOCKED`` lets exactly one of them act on each dead
  process. Liveness is judged in database time, and only by a process that has itself
  been in contact with the database for ``process_timeout_s`` without a gap: after an
  outage every heartbeat is old, and the first process back must not declare its peers
  dead for the database's absence;
- never loses the devices it holds because the database (or the process itself) was
  slow: when its heartbeat finds it was declared stopped, or finds fewer directory
  entries in its name than the connections it holds, it re-asserts ownership of every
  held device (unless a newer connection of the device was bound elsewhere) and marks
  them online again;
- lets go of devices another process bound later (newest connection wins, by the
  directory's database-time ``since``);
- now and then (one process at a time) marks offline the devices and gateways that the
  database shows online but no live process holds (left over by a crash or a restart);
- sheds connections when a rebalance asks it to (``shed_remaining`` at ``shed_rate``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import asyncpg
import structlog

from chargegw.net.sessions import Held
from chargegw.store.database import Connection
from chargegw.store.errors import DB_ERRORS, reason

log = structlog.get_logger("chargegw.cluster.directory")

#: the heartbeat's statements give up after this long (a hung database must not hang it)
HEARTBEAT_STATEMENT_S = 10.0
#: every this many heartbeats, the directory's entries are compared exactly
EXACT_CHECK_EVERY = 6

OUTBOX_CHANNEL = "chargegw_outbox"
BAN_CHANNEL = "chargegw_ban"


def owner_id(node: str, worker: int, pid: int | None = None) -> str:
    """The id of a process in the session directory: ``node/worker/pid``."""
    return f"{node}/{worker}/{os.getpid() if pid is None else pid}"


@dataclasses.dataclass
class ProcessStats:
    """What a process reports in its heartbeat."""

    connections: int
    devices: int
    max_connections: int
    draining: bool


class Cluster:
    """This process's row, heartbeat, notification listener, and the shared sweeps."""

    def __init__(
        self,
        pool: Callable[[], asyncpg.Pool | None],
        dsn: Callable[[], str],
        *,
        node: str,
        worker: int,
        heartbeat_s: float = 5.0,
        process_timeout_s: float = 20.0,
        stats: Callable[[], ProcessStats],
        on_command: Callable[[str], None],
        on_resync: Callable[[], None],
        shed: Callable[[int], int],
        superseded: Callable[[list[tuple[str, Any]]], None] = lambda bound: None,
        held: Callable[[], list[Held]] = list,
        held_count: Callable[[], int] | None = None,
        knows: Callable[[str], bool] = lambda device_id: False,
        held_gateways: Callable[[], list[tuple[str, str]]] = list,
        on_reasserted: Callable[[list[Held]], None] = lambda held: None,
        device_listen: str = "",
        http_listen: str = "",
    ) -> None:
        self._pool = pool
        self._dsn = dsn
        self.node = node
        self.worker = worker
        self.owner = owner_id(node, worker)
        self.heartbeat_s = heartbeat_s
        self.process_timeout_s = process_timeout_s
        self._stats = stats
        self._on_command = on_command
        self._on_resync = on_resync
        self._shed = shed
        self._superseded = superseded
        self._held = held
        #: how many ``held`` would list (each heartbeat compares it, without the list)
        self._held_count = held_count or (lambda: len(held()))
        self._knows = knows
        self._held_gateways = held_gateways
        self._on_reasserted = on_reasserted
        self._checked_at: datetime | None = None
        #: database time of this process's last heartbeat, and since when its heartbeats
        #: have come without a gap (None: the last one failed)
        self._last_contact: datetime | None = None
        self._contact_since: datetime | None = None
        self._last_online_check = -1e18
        self.device_listen = device_listen
        self.http_listen = http_listen
        #: device id -> monotonic time its ban ends
        self.bans: dict[str, float] = {}
        self._listener: asyncpg.Connection | None = None
        #: the heartbeat's own connections: a busy main pool (settlements, outbox workers
        #: retrying after an outage) must not starve it into being declared dead
        self._own: asyncpg.Pool | None = None
        self._beats = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._shedding: asyncio.Task[None] | None = None

    # -- lifecycle --

    async def start(self) -> None:
        """Register this process (the database must be reachable), then run the loops."""
        pool = self._pool()
        assert pool is not None
        self._own = await asyncpg.create_pool(
            self._dsn(), min_size=1, max_size=2, command_timeout=HEARTBEAT_STATEMENT_S
        )
        await self._register(self._stats())
        await self._refresh_bans(pool)
        self._spawn(self._listen(), "cluster-listener")
        self._spawn(self._heartbeat(), "cluster-heartbeat")
        log.info("joined the cluster", owner=self.owner)

    async def stop(self) -> None:
        """Leave: stop the loops, release what this process still holds, mark it stopped."""
        tasks = [*self._tasks, *([self._shedding] if self._shedding else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close(timeout=2)
        if self._own is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._own.close(), 2)
            self._own = None
        pool = self._pool()
        if pool is None:
            return
        try:
            async with pool.acquire(timeout=5) as conn, conn.transaction():
                await conn.execute(
                    """UPDATE device_sessions SET owner = NULL, connection_id = NULL,
                                                  released_at = now()
                       WHERE owner = $1""",
                    self.owner,
                )
                await conn.execute(
                    """UPDATE cluster_processes SET stopped_at = now(), connections = 0,
                                                    devices = 0 WHERE owner = $1""",
                    self.owner,
                )
        except DB_ERRORS as exc:
            log.warning(
                "could not record the stop; other processes will time this one out",
                error=repr(exc),
            )

    def _db(self) -> asyncpg.Pool | None:
        """The heartbeat's own pool once started, else the process's pool."""
        return self._own or self._pool()

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- bans --

    def banned(self, device_id: str) -> bool:
        until = self.bans.get(device_id)
        if until is None:
            return False
        if until <= time.monotonic():
            del self.bans[device_id]
            return False
        return True

    async def announce_bans(self, device_ids: list[str]) -> None:
        """Tell every process (this one included) that these devices were banned."""
        pool = self._pool()
        if pool is None:
            return
        await pool.execute(
            "SELECT pg_notify($1, d) FROM unnest($2::text[]) AS d", BAN_CHANNEL, device_ids
        )

    async def _refresh_bans(self, conn: Connection | asyncpg.Pool) -> None:
        rows = await conn.fetch(
            """SELECT device_id, extract(epoch FROM until - now()) AS left_s
               FROM device_bans WHERE until > now()"""
        )
        now = time.monotonic()
        self.bans = {r["device_id"]: now + float(r["left_s"]) for r in rows}

    # -- notifications --

    def _notified(self, _conn: Connection, _pid: int, channel: str, payload: object) -> None:
        if channel == OUTBOX_CHANNEL:
            self._on_command(str(payload))
        elif channel == BAN_CHANNEL:
            self._spawn(self._ban_changed(), "ban-refresh")

    async def _ban_changed(self) -> None:
        pool = self._pool()
        if pool is not None:
            with contextlib.suppress(*DB_ERRORS):
                await self._refresh_bans(pool)

    async def _listen(self) -> None:
        """Hold a LISTEN connection; after losing it, reconnect and resync."""
        delay = 0.5
        first = True
        while True:
            try:
                conn = await asyncpg.connect(self._dsn(), timeout=5)
            except DB_ERRORS as exc:
                log.warning("cannot open the notification connection, retrying", error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.5
            self._listener = conn
            try:
                await conn.add_listener(OUTBOX_CHANNEL, self._notified)
                await conn.add_listener(BAN_CHANNEL, self._notified)
                if not first:  # notifications sent while away are lost: look again
                    log.info("notification connection back, resyncing")
                    self._on_resync()
                    await self._refresh_bans(conn)
                first = False
                while not conn.is_closed():
                    await asyncio.sleep(1.0)
                    # a cheap round trip notices a dead server sooner than TCP would
                    await conn.execute("SELECT 1", timeout=5)
            except DB_ERRORS as exc:
                log.warning("notification connection lost", error=str(exc))
            finally:
                self._listener = None
                with contextlib.suppress(Exception):
                    await conn.close(timeout=1)

    # -- heartbeat, shedding, sweeping --

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            for step in (self.beat, self.sweep):
                try:
                    await step()
                except DB_ERRORS as exc:
                    if step == self.beat:
                        self._contact_since = None  # the next contact starts a new run
                    log.warning(
                        "cluster heartbeat failed, retrying", step=step.__name__, reason=reason(exc)
                    )

    def _note_contact(self, at: datetime) -> None:
        """A heartbeat reached the database at ``at`` (database time)."""
        last = self._last_contact
        gap = self.heartbeat_s * 2 + 5.0
        if self._contact_since is None or last is None or (at - last).total_seconds() > gap:
            self._contact_since = at
        self._last_contact = at

    def can_judge_liveness(self) -> bool:
        """True once this process has reached the database without a gap for
        ``process_timeout_s``: only then is an old heartbeat of another process evidence
        that the other process is gone, not that the database was."""
        since, last = self._contact_since, self._last_contact
        if since is None or last is None:
            return False
        return (last - since).total_seconds() >= self.process_timeout_s

    async def beat(self) -> None:
        """Refresh this process's row; re-assert what it holds if it was declared stopped
        or lost directory entries; let go of devices bound later elsewhere; shed
        connections if a rebalance asks for it."""
        pool = self._db()
        if pool is None:
            return
        stats = self._stats()
        row = await pool.fetchrow(
            """WITH old AS (SELECT stopped_at FROM cluster_processes WHERE owner = $1
                            FOR UPDATE)
               UPDATE cluster_processes p SET heartbeat_at = now(), connections = $2,
                      devices = $3, max_connections = $4, draining = $5, stopped_at = NULL
               FROM old WHERE p.owner = $1
               RETURNING p.shed_remaining, p.shed_rate, now() AS at,
                         old.stopped_at AS was_stopped,
                         (SELECT count(*) FROM device_sessions s WHERE s.owner = $1) AS rows""",
            self.owner,
            stats.connections,
            stats.devices,
            stats.max_connections,
            stats.draining,
        )
        if row is None:  # its row was deleted while the database was away: register again
            await self._register(stats)
            at = await pool.fetchval("SELECT now()")
            self._note_contact(at)
            await self.reassert("this process was not registered")
            return
        at = row["at"]
        self._note_contact(at)
        await self._reconcile(pool, at)
        self._beats += 1
        if row["was_stopped"] is not None:
            await self.reassert("another process declared this one stopped")
        elif row["rows"] < self._held_count():
            await self.reassert("directory entries of this process were released")
        elif self._beats % EXACT_CHECK_EVERY == 0:
            await self.check_entries()
        remaining = int(row["shed_remaining"])
        if remaining > 0 and self._shedding is None:
            rate = float(row["shed_rate"]) or 10.0
            self._shedding = asyncio.get_running_loop().create_task(
                self._shed_at(remaining, rate), name="rebalance-shed"
            )

    async def reassert(self, why: str) -> list[str]:
        """Claim again, in the directory, every device this process holds on an open
        connection (unless a newer connection of it was bound elsewhere: those it lets
        go), mark those online again, and the gateways of its connections; returns the
        devices taken."""
        pool = self._db()
        if pool is None:
            return []
        async with pool.acquire(timeout=5) as conn, conn.transaction():
            # what is held now (after the wait for a connection): a link that closes
            # from here on is released by the writer after this transaction
            held = self._held()
            gateways = self._held_gateways()
            taken = await conn.fetch(
                """UPDATE device_sessions s SET owner = $1, connection_id = u.c,
                          since = u.t, released_at = NULL, lost_owner = NULL,
                          updated_at = clock_timestamp()
                   FROM unnest($2::text[], $3::text[], $4::timestamptz[]) AS u(d, c, t)
                   WHERE s.device_id = u.d AND s.since <= u.t
                     AND (s.owner IS NULL OR s.owner = $1 OR s.since < u.t)
                     AND (s.owner IS DISTINCT FROM $1 OR s.connection_id IS DISTINCT FROM u.c)
                   RETURNING s.device_id""",
                self.owner,
                [h.device_id for h in held],
                [h.connection_id for h in held],
                [h.since for h in held],
            )
            taken_ids = {r["device_id"] for r in taken}
            # held here, but bound later by another process: a bind that :meth:`_reconcile`
            # missed (committed long after its ``updated_at``, outside the scan window)
            newer = await conn.fetch(
                """SELECT s.device_id, s.since FROM device_sessions s
                   JOIN unnest($2::text[], $3::timestamptz[]) AS u(d, t) ON s.device_id = u.d
                   WHERE s.owner IS NOT NULL AND s.owner <> $1 AND s.since > u.t""",
                self.owner,
                [h.device_id for h in held],
                [h.since for h in held],
            )
            online = [h for h in held if h.online and h.device_id in taken_ids]
            revived = await conn.fetch(
                """UPDATE devices d SET online = true, offline_reason = NULL,
                          connection_id = u.c, updated_at = now()
                   FROM unnest($1::text[], $2::text[]) AS u(d, c)
                   WHERE d.device_id = u.d AND NOT d.online
                   RETURNING d.device_id""",
                [h.device_id for h in online],
                [h.connection_id for h in online],
            )
            if revived:
                await conn.execute(
                    """INSERT INTO device_events (device_id, at, kind, reason, detail,
                                                  cause_kind, cause_ref)
                       SELECT d, now(), 'online', 'ownership_reasserted',
                              jsonb_build_object('owner', $2::text),
                              'system', 'ownership_reasserted'
                       FROM unnest($1::text[]) AS d""",
                    [r["device_id"] for r in revived],
                    self.owner,
                )
            if gateways:
                await conn.execute(
                    """UPDATE gateways g SET online = true, owner = $1, connection_id = u.c,
                              updated_at = now()
                       FROM unnest($2::text[], $3::text[]) AS u(g, c)
                       WHERE g.gateway_id = u.g
                         AND (NOT g.online OR g.owner IS DISTINCT FROM $1)
                         AND (g.owner IS NULL OR g.owner = $1 OR NOT EXISTS (
                              SELECT 1 FROM cluster_processes p
                              WHERE p.owner = g.owner AND p.stopped_at IS NULL))""",
                    self.owner,
                    [g for g, _ in gateways],
                    [c for _, c in gateways],
                )
        if newer:  # newest connection wins: let go of them here
            self._superseded([(r["device_id"], r["since"]) for r in newer])
        devices = sorted(taken_ids)
        if devices or revived:
            log.warning(
                "re-asserted ownership of held devices",
                why=why,
                devices=len(devices),
                back_online=len(revived),
            )
        self._on_reasserted([h for h in held if h.device_id in taken_ids])
        return devices

    async def check_entries(self) -> None:
        """Compare the directory's entries in this process's name with what it holds,
        exactly: re-assert what is missing or names another connection; release entries
        of devices this process does not know at all (a crash of a write, a race the
        scans missed), and mark them offline if the device row still names that entry's
        connection."""
        pool = self._db()
        if pool is None:
            return
        rows = await pool.fetch(
            """SELECT device_id, connection_id, updated_at < now() - interval '5 seconds' AS old
               FROM device_sessions WHERE owner = $1""",
            self.owner,
        )
        entries = {r["device_id"]: r["connection_id"] for r in rows}
        if any(entries.get(h.device_id) != h.connection_id for h in self._held()):
            await self.reassert("directory entries differ from the connections held")
        # a bind committed a moment ago may not be known to the session layer yet
        stray = [r["device_id"] for r in rows if r["old"] and not self._knows(r["device_id"])]
        if not stray:
            return
        async with pool.acquire(timeout=5) as conn, conn.transaction():
            released = await conn.fetch(
                """UPDATE device_sessions SET owner = NULL, connection_id = NULL,
                          released_at = now(), updated_at = clock_timestamp()
                   WHERE owner = $1 AND device_id = ANY($2::text[])
                     AND updated_at < now() - interval '5 seconds'
                   RETURNING device_id""",
                self.owner,
                stray,
            )
            gone = [r["device_id"] for r in released]
            stale = await conn.fetch(
                """SELECT d.device_id FROM devices d
                   JOIN unnest($1::text[], $2::text[]) AS u(id, c)
                     ON d.device_id = u.id AND d.connection_id = u.c""",
                gone,
                [entries[d] for d in gone],
            )
            if stale:
                await _mark_offline(
                    conn, [r["device_id"] for r in stale], "not_connected", [None] * len(stale)
                )
        if gone:
            log.warning("released directory entries of devices not held", devices=len(gone))

    async def _reconcile(self, pool: asyncpg.Pool, now: datetime) -> None:
        """Devices another process bound since the last look: newest connection wins,
        so this process lets go of them (the same rule as within one process)."""
        since, self._checked_at = self._checked_at, now
        if since is None:
            return
        rows = await pool.fetch(
            """SELECT device_id, since FROM device_sessions
               WHERE updated_at > $1::timestamptz - interval '2 seconds'
                 AND owner IS NOT NULL AND owner <> $2""",
            since,
            self.owner,
        )
        if rows:
            self._superseded([(r["device_id"], r["since"]) for r in rows])

    async def _shed_at(self, count: int, rate: float) -> None:
        """Close ``count`` connections, ``rate`` per second, then clear the request."""
        closed = 0
        credit = 0.0
        try:
            while closed < count:
                await asyncio.sleep(0.1)
                credit += rate * 0.1
                step = min(count - closed, math.floor(credit))
                if step <= 0:
                    continue
                credit -= step
                done = self._shed(step)
                closed += done
                if done < step:  # nothing left to close
                    break
            log.info("shed connections for a rebalance", closed=closed, asked=count)
            pool = self._pool()
            if pool is not None:
                await pool.execute(
                    "UPDATE cluster_processes SET shed_remaining = 0 WHERE owner = $1",
                    self.owner,
                )
        except DB_ERRORS:
            log.warning("could not clear the rebalance request; it is retried")
        finally:
            self._shedding = None

    async def _register(self, stats: ProcessStats) -> None:
        pool = self._pool()
        assert pool is not None
        await pool.execute(
            """INSERT INTO cluster_processes (owner, node, worker, pid, max_connections,
                                              device_listen, http_listen, connections, devices)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
               ON CONFLICT (owner) DO UPDATE SET heartbeat_at = now(), stopped_at = NULL""",
            self.owner,
            self.node,
            self.worker,
            os.getpid(),
            stats.max_connections,
            self.device_listen,
            self.http_listen,
            stats.connections,
            stats.devices,
        )

    async def sweep(self) -> None:
        """Declare processes without a heartbeat dead and release what they held.

        Judged in database time, and only once this process has been in contact with the
        database for ``process_timeout_s`` (:meth:`can_judge_liveness`)."""
        pool = self._db()
        if pool is None or not self.can_judge_liveness():
            return
        async with pool.acquire(timeout=5) as conn, conn.transaction():
            dead = await conn.fetch(
                """UPDATE cluster_processes SET stopped_at = now(), connections = 0, devices = 0
                   WHERE owner IN (
                       SELECT owner FROM cluster_processes
                       WHERE stopped_at IS NULL AND owner <> $2
                         AND heartbeat_at < now() - make_interval(secs => $1)
                       FOR UPDATE SKIP LOCKED)
                   RETURNING owner""",
                self.process_timeout_s,
                self.owner,
            )
            owners = [r["owner"] for r in dead]
            # a stopped process's entries (a clean stop releases its own; this catches
            # the rest) and those of processes that died
            lost = await conn.fetch(
                """UPDATE device_sessions s SET owner = NULL, connection_id = NULL,
                          lost_owner = s.owner, released_at = now(),
                          updated_at = clock_timestamp()
                   FROM cluster_processes p
                   WHERE s.owner = p.owner AND p.stopped_at IS NOT NULL
                   RETURNING s.device_id, p.owner""",
            )
            if lost:
                await _mark_offline(
                    conn,
                    [r["device_id"] for r in lost],
                    "process_lost",
                    [r["owner"] for r in lost],
                )
            if owners:
                await conn.execute(
                    """UPDATE gateways SET online = false, updated_at = now()
                       WHERE owner = ANY($1::text[]) AND online""",
                    owners,
                )
            await conn.execute(
                "DELETE FROM cluster_processes WHERE stopped_at < now() - interval '1 day'"
            )
            await conn.execute("DELETE FROM device_bans WHERE until < now() - interval '1 day'")
        for owner in owners:
            log.warning("process lost (no heartbeat), its devices released", owner=owner)
        if time.monotonic() - self._last_online_check >= self.process_timeout_s:
            self._last_online_check = time.monotonic()
            await self.reconcile_online()

    async def reconcile_online(self) -> tuple[int, int]:
        """Mark offline the devices and gateways shown online that no live process holds
        (a crash, a restart, a lost write left them so); one process at a time. Rows that
        changed within ``process_timeout_s`` are left for the next round (a bind may be
        on its way). Returns the numbers of devices and gateways marked offline."""
        pool = self._db()
        if pool is None:
            return 0, 0
        async with pool.acquire(timeout=5) as conn, conn.transaction():
            if not await conn.fetchval(
                "SELECT pg_try_advisory_xact_lock(hashtext('chargegw.online-reconcile'))"
            ):
                return 0, 0
            # entries naming a process that has no row at all (deleted, restored from a
            # backup): nobody holds them
            orphans = await conn.fetch(
                """UPDATE device_sessions s SET owner = NULL, connection_id = NULL,
                          lost_owner = s.owner, released_at = now(),
                          updated_at = clock_timestamp()
                   WHERE s.owner IS NOT NULL
                     AND s.updated_at < now() - make_interval(secs => $1)
                     AND NOT EXISTS (SELECT 1 FROM cluster_processes p WHERE p.owner = s.owner)
                   RETURNING s.device_id""",
                self.process_timeout_s,
            )
            stale = await conn.fetch(
                """SELECT d.device_id FROM devices d
                   WHERE d.online AND d.updated_at < now() - make_interval(secs => $1)
                     AND NOT EXISTS (
                         SELECT 1 FROM device_sessions s
                         LEFT JOIN cluster_processes p ON p.owner = s.owner
                         WHERE s.device_id = d.device_id
                           AND ((p.owner IS NOT NULL AND p.stopped_at IS NULL)
                                OR s.updated_at > now() - make_interval(secs => $1)))
                   FOR UPDATE OF d SKIP LOCKED""",
                self.process_timeout_s,
            )
            devices = [r["device_id"] for r in stale]
            if devices:
                await _mark_offline(conn, devices, "not_connected", [None] * len(devices))
            # a gateway is held while a live process holds its connection (``owner``) or
            # one of its devices (rows written before gateways had an owner)
            gateways = await conn.fetch(
                """UPDATE gateways g SET online = false, updated_at = now()
                   WHERE g.online AND g.updated_at < now() - make_interval(secs => $1)
                     AND NOT EXISTS (SELECT 1 FROM cluster_processes p
                                     WHERE p.owner = g.owner AND p.stopped_at IS NULL)
                     AND NOT EXISTS (
                         SELECT 1 FROM devices d
                         JOIN device_sessions s ON s.device_id = d.device_id
                         JOIN cluster_processes p ON p.owner = s.owner
                         WHERE d.gateway_id = g.gateway_id AND p.stopped_at IS NULL)
                   RETURNING g.gateway_id""",
                self.process_timeout_s,
            )
        if devices or gateways or orphans:
            log.warning(
                "marked offline what no live process holds",
                devices=len(devices),
                gateways=len(gateways),
                orphaned_entries=len(orphans),
            )
        return len(devices), len(gateways)


async def _mark_offline(
    conn: Connection, devices: list[str], why: str, owners: list[str | None]
) -> None:
    """Devices offline with ``why``, each with an offline event (if it was online)."""
    offline = await conn.fetch(
        """UPDATE devices SET online = false, offline_reason = $2, updated_at = now()
           WHERE device_id = ANY($1::text[]) AND online RETURNING device_id""",
        devices,
        why,
    )
    went = {r["device_id"] for r in offline}
    pairs = [(d, o) for d, o in zip(devices, owners, strict=True) if d in went]
    if pairs:
        await conn.execute(
            """INSERT INTO device_events (device_id, at, kind, reason, detail,
                                          cause_kind, cause_ref)
               SELECT d, now(), 'offline', $3,
                      CASE WHEN o IS NULL THEN '{}'::jsonb
                           ELSE jsonb_build_object('owner', o) END,
                      'system', $3
               FROM unnest($1::text[], $2::text[]) AS u(d, o)""",
            [d for d, _ in pairs],
            [o for _, o in pairs],
            why,
        )


async def list_processes(
    conn: Connection, *, include_stopped: bool = False
) -> list[dict[str, Any]]:
    """Processes of the platform with their load (``chargegw nodes``, the API)."""
    rows = await conn.fetch(
        """SELECT owner, node, worker, pid, started_at, heartbeat_at, connections, devices,
                  max_connections, draining, stopped_at, shed_remaining, device_listen,
                  http_listen, extract(epoch FROM now() - heartbeat_at) AS silent_s
           FROM cluster_processes
           WHERE $1 OR stopped_at IS NULL
           ORDER BY node, worker, started_at""",
        include_stopped,
    )
    out = []
    for r in rows:
        item = dict(r)
        item["silent_s"] = round(float(item["silent_s"]), 1)
        item["state"] = (
            "stopped" if r["stopped_at"] is not None else "draining" if r["draining"] else "live"
        )
        out.append(item)
    return out


async def rebalance(conn: Connection, *, rate: float, dry_run: bool = False) -> dict[str, Any]:
    """Ask the busiest live processes to shed connections down to the mean.

    Each process above the mean (rounded up) is asked to close its surplus at ``rate``
    connections per second; the devices reconnect through the load balancer to whichever
    process it picks. Returns the plan.
    """
    if rate <= 0:
        raise ValueError("rate must be positive")
    async with conn.transaction():
        rows = await conn.fetch(
            """SELECT owner, connections FROM cluster_processes
               WHERE stopped_at IS NULL AND NOT draining ORDER BY owner FOR UPDATE"""
        )
        total = sum(r["connections"] for r in rows)
        target = math.ceil(total / len(rows)) if rows else 0
        plan = {r["owner"]: max(r["connections"] - target, 0) for r in rows}
        if not dry_run:
            for owner, surplus in plan.items():
                await conn.execute(
                    """UPDATE cluster_processes SET shed_remaining = $2, shed_rate = $3
                       WHERE owner = $1""",
                    owner,
                    surplus,
                    rate,
                )
    return {
        "processes": len(rows),
        "connections": total,
        "target_per_process": target,
        "shed": {owner: n for owner, n in plan.items() if n},
        "rate_per_process": rate,
        "dry_run": dry_run,
    }


async def list_bans(conn: Connection) -> list[dict[str, Any]]:
    """Devices banned now, soonest-ending first."""
    rows = await conn.fetch(
        """SELECT device_id, until, reason, connects, created_at FROM device_bans
           WHERE until > now() ORDER BY until"""
    )
    return [
        {
            "device_id": r["device_id"],
            "until": r["until"].isoformat(),
            "reason": r["reason"],
            "connects": r["connects"],
            "since": r["created_at"].isoformat(),
        }
        for r in rows
    ]


async def lift_ban(conn: Connection, device_id: str) -> bool:
    """End a ban now and tell every process; False if the device was not banned."""
    async with conn.transaction():
        lifted = await conn.fetchval(
            "DELETE FROM device_bans WHERE device_id = $1 AND until > now() RETURNING 1",
            device_id,
        )
        # a lifted ban also forgets the reconnections that led to it
        await conn.execute(
            "UPDATE device_sessions SET connects = 0 WHERE device_id = $1", device_id
        )
        await conn.execute("SELECT pg_notify($1, $2)", BAN_CHANNEL, device_id)
    return lifted is not None
