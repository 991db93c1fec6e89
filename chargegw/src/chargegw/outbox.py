"""Durable command delivery: a command is a row before it is a byte on a socket.

Per device, commands go out one at a time, highest priority first (stop before start
before queries before parameter changes), at least ``spacing_s`` apart. A command is
marked ``sent`` (with its correlation id: the AP3000 msg id) in the database before
its bytes are written. The driver correlates the device's reply; without one within
``ack_timeout_s`` the command is sent once more with the same correlation id, then it
is ``dead``. A command for an offline device waits until ``expires_at``, then it is
``dead`` with reason ``offline``. On start, a cold-start scan picks up what a crash
left ``pending`` or ``sent``; a periodic scan repeats it.

Several processes share the table. A command is claimed (``claimed_by``) only by the
process that holds the device's connection according to the session directory
(``device_sessions``), with ``FOR UPDATE SKIP LOCKED``; every later update of the row
checks the claim, so a process that lost the device (it reconnected elsewhere) cannot
finish or resend a command the new owner has taken over. Submitting a command notifies
the ``chargegw_outbox`` channel inside the caller's transaction: at commit every process
hears it and the owner delivers at once. Expiring commands of devices no live process
holds is shared background work, claimed with ``SKIP LOCKED`` too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import asyncpg
import structlog

log = structlog.get_logger("chargegw.outbox")


class Priority(enum.IntEnum):
    """Lower goes first."""

    STOP = 0
    START = 1
    QUERY = 2
    PARAMETER = 3
    FIRMWARE = 4


class CommandStatus(str, enum.Enum):
    PENDING = "pending"
    SENT = "sent"
    ACKED = "acked"
    FAILED = "failed"
    DEAD = "dead"


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What the device's reply says about a command."""

    success: bool
    result_code: int | None
    result_text: str | None
    reply: dict[str, Any]


class CommandCodec(Protocol):
    """The protocol side of a command: bytes out, replies recognised."""

    def encode_command(
        self, device_id: str, name: str, params: dict[str, Any], correlation: int
    ) -> tuple[bytes, Any]:
        """The frame and the key its reply will carry."""
        ...

    def new_correlation(self, device_id: str) -> int: ...


@dataclasses.dataclass(frozen=True)
class Finished:
    """A command that reached a final state (acked, failed or dead)."""

    command_id: int
    device_id: str
    name: str
    order_no: str | None
    status: str
    outcome: Outcome | None
    dead_reason: str | None
    created_at: datetime


@dataclasses.dataclass
class _Open:
    """A command in flight, waiting for its reply."""

    command_id: int
    device_id: str
    name: str
    order_no: str | None
    reply: asyncio.Future[Outcome]


class Outbox:
    """The per-process delivery engine over the ``commands`` table."""

    def __init__(
        self,
        pool: Callable[[], asyncpg.Pool | None],
        codecs: dict[str, CommandCodec],
        link_of: Callable[[str], Any],
        *,
        ack_timeout_s: float = 15.0,
        spacing_s: float = 0.5,
        scan_interval_s: float = 5.0,
        retention_s: float = 7 * 86400,
        on_result: Callable[[Finished], Awaitable[None]] | None = None,
        on_backlog: Callable[[dict[str, int]], None] = lambda counts: None,
        on_timeout: Callable[[str], None] = lambda device_id: None,
        on_answered: Callable[[str], None] = lambda device_id: None,
        on_resend: Callable[[str], None] = lambda name: None,
        on_sent: Callable[[int, str | None, str], Awaitable[None]] | None = None,
        write: Callable[[Any, bytes, str, str], None] | None = None,
        owner: str = "",
        process_timeout_s: float = 20.0,
    ) -> None:
        self._pool = pool
        self.codecs = codecs
        self.link_of = link_of
        self.ack_timeout_s = ack_timeout_s
        self.spacing_s = spacing_s
        self.scan_interval_s = scan_interval_s
        self.retention_s = retention_s
        self.on_result = on_result
        self.on_backlog = on_backlog
        self.on_timeout = on_timeout
        self.on_answered = on_answered
        self.on_resend = on_resend
        self.on_sent = on_sent
        self.write = write
        #: this process's id in the session directory (cluster.py)
        self.owner = owner
        self.process_timeout_s = process_timeout_s
        #: while draining, nothing new is claimed (the devices take it elsewhere)
        self.draining = False
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._open: dict[Any, _Open] = {}
        self._last_sent: dict[str, float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    # -- submitting --

    async def submit(
        self,
        conn: Any,
        *,
        device_id: str,
        protocol: str,
        name: str,
        params: dict[str, Any],
        priority: Priority,
        expires_s: float,
        order_no: str | None = None,
    ) -> int:
        """Insert a command row (inside the caller's transaction); returns its id.

        Every process hears of it when the transaction commits (``chargegw_outbox``);
        call :meth:`wake` after the commit too, so the local process does not wait for
        the notification to come back.
        """
        expires = datetime.now(UTC) + timedelta(seconds=expires_s)
        await conn.execute("SELECT pg_notify('chargegw_outbox', $1)", device_id)
        command_id: int = await conn.fetchval(
            """INSERT INTO commands (device_id, protocol, name, params, priority, status,
                                     order_no, expires_at)
               VALUES ($1, $2, $3, $4, $5, 'pending', $6, $7) RETURNING command_id""",
            device_id,
            protocol,
            name,
            json.dumps(params),
            int(priority),
            order_no,
            expires,
        )
        return command_id

    def wake(self, device_id: str) -> None:
        """Make sure a worker delivers ``device_id``'s commands, if it is connected here."""
        if self._closing or self.link_of(device_id) is None:
            return
        event = self._wake.setdefault(device_id, asyncio.Event())
        event.set()
        worker = self._workers.get(device_id)
        if worker is None or worker.done():
            task = asyncio.get_running_loop().create_task(
                self._worker(device_id), name=f"outbox-{device_id}"
            )
            self._workers[device_id] = task

    async def wake_waiting(self, device_ids: list[str]) -> None:
        """Wake those of ``device_ids`` that have open commands."""
        pool = self._pool()
        if pool is None or not device_ids:
            return
        rows = await pool.fetch(
            """SELECT DISTINCT device_id FROM commands
               WHERE device_id = ANY($1::text[]) AND status IN ('pending', 'sent')""",
            device_ids,
        )
        for row in rows:
            self.wake(row["device_id"])

    # -- replies from the drivers --

    def on_reply(self, key: Any, outcome: Outcome) -> bool:
        """A reply arrived; True if it answered a command in flight."""
        waiting = self._open.get(key)
        if waiting is None or waiting.reply.done():
            return False
        waiting.reply.set_result(outcome)
        return True

    def open_command(self, key: Any) -> _Open | None:
        """The command in flight that a reply with ``key`` would answer."""
        return self._open.get(key)

    def busy(self, device_id: str) -> bool:
        """True while a command to ``device_id`` waits for its reply here."""
        return any(w.device_id == device_id for w in self._open.values())

    # -- lifecycle --

    def start(self) -> None:
        self._spawn(self._scanner(), "outbox-scanner")

    async def close(self) -> None:
        self._closing = True
        tasks = [*self._workers.values(), *self._tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _scanner(self) -> None:
        """Cold-start scan, then periodic: wake every device with open commands."""
        while True:
            try:
                await self.scan()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                log.warning("outbox scan failed, retrying")
            await asyncio.sleep(self.scan_interval_s)

    async def scan(self) -> None:
        """Wake the local devices with open commands; expire, count and purge (shared)."""
        pool = self._pool()
        if pool is None:
            return
        rows = await pool.fetch(
            """SELECT DISTINCT c.device_id FROM commands c
               JOIN device_sessions s ON s.device_id = c.device_id AND s.owner = $1
               WHERE c.status IN ('pending', 'sent')""",
            self.owner,
        )
        for row in rows:
            self.wake(row["device_id"])
        await self.expire()
        counts = await pool.fetch(
            """SELECT status, count(*) AS n FROM commands
               WHERE status IN ('pending', 'sent') GROUP BY status"""
        )
        self.on_backlog({"pending": 0, "sent": 0, **{r["status"]: r["n"] for r in counts}})
        async with pool.acquire() as conn, conn.transaction():
            # one process purges at a time (concurrent deletes of the same rows only wait)
            if await conn.fetchval("SELECT pg_try_advisory_xact_lock(hashtext('chargegw.purge'))"):
                await conn.execute(
                    """DELETE FROM commands WHERE status IN ('acked', 'failed', 'dead')
                       AND finished_at < now() - make_interval(secs => $1)""",
                    self.retention_s,
                )

    async def expire(self) -> None:
        """Commands of devices that no live process holds, past their expiry: dead."""
        pool = self._pool()
        if pool is None:
            return
        while True:
            rows = await pool.fetch(
                """WITH gone AS (
                       SELECT c.command_id FROM commands c
                       WHERE c.status IN ('pending', 'sent') AND c.expires_at < now()
                         AND NOT EXISTS (
                             SELECT 1 FROM device_sessions s
                             JOIN cluster_processes p ON p.owner = s.owner
                             WHERE s.device_id = c.device_id AND p.stopped_at IS NULL
                               AND p.heartbeat_at > now() - make_interval(secs => $1))
                       ORDER BY c.expires_at LIMIT 500
                       FOR UPDATE OF c SKIP LOCKED)
                   UPDATE commands c SET status = 'dead', dead_reason = 'offline',
                                         finished_at = now()
                   FROM gone WHERE c.command_id = gone.command_id
                   RETURNING c.*""",
                self.process_timeout_s,
            )
            for row in rows:
                await self._finished(row, CommandStatus.DEAD, None, "offline")
            if len(rows) < 500:
                return

    # -- delivery, one worker per device with open commands --

    async def _worker(self, device_id: str) -> None:
        event = self._wake[device_id]
        try:
            while not self._closing and not self.draining:
                event.clear()
                row = await self._next(device_id)
                if row is None:
                    if event.is_set():  # woken while looking: a row may have just committed
                        continue
                    return
                if not await self._deliver(row):
                    return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "outbox worker failed; the periodic scan restarts it", device_id=device_id
            )
        finally:
            # forget an idle device (tens of thousands of them must not keep a task each)
            if self._workers.get(device_id) is asyncio.current_task():
                del self._workers[device_id]
                self._wake.pop(device_id, None)

    async def _next(self, device_id: str) -> asyncpg.Record | None:
        """Claim the device's next command, if this process holds the device."""
        pool = self._pool()
        if pool is None:
            return None
        row: asyncpg.Record | None = await pool.fetchrow(
            """WITH next AS (
                   SELECT command_id FROM commands
                   WHERE device_id = $1 AND status IN ('pending', 'sent')
                     AND EXISTS (SELECT 1 FROM device_sessions
                                 WHERE device_id = $1 AND owner = $2)
                   ORDER BY (status = 'sent') DESC, priority, command_id LIMIT 1
                   FOR UPDATE SKIP LOCKED)
               UPDATE commands c SET claimed_by = $2 FROM next
               WHERE c.command_id = next.command_id RETURNING c.*""",
            device_id,
            self.owner,
        )
        return row

    async def _deliver(self, row: asyncpg.Record) -> bool:
        """Send one claimed command and wait for its reply; False: stop this worker."""
        device_id = row["device_id"]
        command_id = row["command_id"]
        codec = self.codecs.get(row["protocol"])
        if codec is None:
            await self._finish(row, CommandStatus.DEAD, None, f"no driver for {row['protocol']}")
            return True
        link = self.link_of(device_id)
        if link is None:  # gone since the claim; the directory catches up, a reconnect wakes
            return False
        params = row["params"]
        if isinstance(params, str):
            params = json.loads(params)
        # a frame for the host the device sits behind (host upgrades) says nothing about
        # whether the device itself answers
        own = params.get("phy_id", device_id) == device_id
        attempts = row["attempts"]
        if attempts >= 2:  # sent twice, unanswered: a crash interrupted the wait
            await self._finish(row, CommandStatus.DEAD, None, "no answer")
            if own:
                self.on_timeout(device_id)
            return True
        correlation = row["correlation"]
        if correlation is None:
            correlation = codec.new_correlation(device_id)
        try:
            frame, key = codec.encode_command(device_id, row["name"], params, correlation)
        except Exception as exc:
            await self._finish(row, CommandStatus.DEAD, None, f"cannot encode: {exc}")
            return True
        # spacing: at least spacing_s between two commands to one device
        since = time.monotonic() - self._last_sent.get(device_id, -1e9)
        if since < self.spacing_s:
            await asyncio.sleep(self.spacing_s - since)
        pool = self._pool()
        assert pool is not None
        marked = await pool.execute(
            """UPDATE commands SET status = 'sent', correlation = $2, attempts = attempts + 1,
                                   sent_at = now()
               WHERE command_id = $1 AND claimed_by = $3 AND status IN ('pending', 'sent')""",
            command_id,
            correlation,
            self.owner,
        )
        if marked == "UPDATE 0":  # another process took the device (and the command) over
            return False
        if attempts == 0 and self.on_sent is not None:
            await self.on_sent(command_id, row["order_no"], row["name"])
        if key is None:  # the protocol defines no reply: done once written
            if self.write is not None:
                self.write(link, frame, device_id, row["name"])
            self._last_sent[device_id] = time.monotonic()
            await self._finish(row, CommandStatus.ACKED, None, None)
            return True
        waiting = _Open(
            command_id,
            device_id,
            row["name"],
            row["order_no"],
            asyncio.get_running_loop().create_future(),
        )
        self._open[key] = waiting
        try:
            if self.write is not None:
                self.write(link, frame, device_id, row["name"])
            self._last_sent[device_id] = time.monotonic()
            log.info(
                "command sent",
                device_id=device_id,
                command_id=command_id,
                command=row["name"],
                attempt=attempts + 1,
            )
            try:
                outcome = await asyncio.wait_for(waiting.reply, self.ack_timeout_s)
            except TimeoutError:
                if attempts == 0:
                    self.on_resend(row["name"])
                if attempts + 1 >= 2:
                    await self._finish(row, CommandStatus.DEAD, None, "no answer")
                    if own:
                        self.on_timeout(device_id)
                return True  # the next round resends it (same correlation id)
        finally:
            self._open.pop(key, None)
        self.on_answered(device_id)
        status = CommandStatus.ACKED if outcome.success else CommandStatus.FAILED
        await self._finish(row, status, outcome, None)
        return True

    async def _finish(
        self,
        row: asyncpg.Record,
        status: CommandStatus,
        outcome: Outcome | None,
        dead_reason: str | None,
    ) -> None:
        pool = self._pool()
        assert pool is not None
        done = await pool.execute(
            """UPDATE commands SET status = $2, finished_at = now(), result_code = $3,
                      result_text = $4, dead_reason = $5, reply = $6
               WHERE command_id = $1 AND claimed_by = $7 AND status IN ('pending', 'sent')""",
            row["command_id"],
            status.value,
            None if outcome is None else outcome.result_code,
            None if outcome is None else outcome.result_text,
            dead_reason,
            None if outcome is None else json.dumps(outcome.reply),
            self.owner,
        )
        if done == "UPDATE 0":  # taken over by the device's new owner, which finishes it
            log.info(
                "command taken over by another process",
                device_id=row["device_id"],
                command_id=row["command_id"],
            )
            return
        await self._finished(row, status, outcome, dead_reason)

    async def _finished(
        self,
        row: asyncpg.Record,
        status: CommandStatus,
        outcome: Outcome | None,
        dead_reason: str | None,
    ) -> None:
        log.info(
            "command finished",
            device_id=row["device_id"],
            command_id=row["command_id"],
            status=status.value,
            reason=dead_reason,
        )
        if self.on_result is not None:
            await self.on_result(
                Finished(
                    command_id=row["command_id"],
                    device_id=row["device_id"],
                    name=row["name"],
                    order_no=row["order_no"],
                    status=status.value,
                    outcome=outcome,
                    dead_reason=dead_reason,
                    created_at=row["created_at"],
                )
            )


def random_start() -> int:
    """A random 16-bit starting point for message ids (devices keep no shared counter)."""
    return random.randrange(1, 0xFFFF)
