"""Durable command delivery: a command is a row before it is a byte on a socket.

Per device, commands go out one at a time, highest priority first (stop before start
before queries before parameter changes); on each TCP link (piles behind one AP3000
host, sockets of one BKV gateway) at least ``spacing_s`` apart. A command that names
``after_command`` waits for that command's outcome (a stop for a start in flight is sent
after the start's answer, never before it; if the start was refused, the stop is dead).

Sending: in one transaction the row is marked ``sent`` with its correlation id (the
AP3000 msg id or BKV seq, never the previous command's id to the same target, across
restarts: ``device_correlations``), the attempt is counted and the order moves
(``on_sent_tx``); then the bytes are written. If the connection closed meanwhile, the
attempt is taken back: an attempt counts only when its bytes were written. Without a
reply within ``ack_timeout_s`` the command is sent once more with the same correlation
id, then it is ``dead``. A command for an offline device waits until ``expires_at``
(database time), then it is ``dead`` with reason ``offline``.

Finishing: a reply is kept in memory the moment it arrives, then the row's final state
and the order's transition (``on_finish_tx``) are written in one transaction, retried
while the database is unavailable: an answered command is never declared dead or sent
again because a write failed. What follows the commit (``on_result``: metrics, events,
the firmware engine) cannot undo it.

Several processes share the table. A command is claimed (``claimed_by``) only by the
process that holds the device's connection according to the session directory
(``device_sessions``), with ``FOR UPDATE SKIP LOCKED``; sending, resending and giving
up check both the claim and the directory, so a process that lost the device (it
reconnected elsewhere) cannot send, resend or kill a command the new owner takes over
(which claims the row first). Recording the device's answer, or taking back an unwritten
attempt, checks the claim only: the device may have left since, the fact stands.
Submitting a command notifies the ``chargegw_outbox`` channel inside the caller's
transaction: at commit every process hears it and the owner delivers at once. Expiring
commands of devices no live process holds is shared background work, claimed with
``SKIP LOCKED`` too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import random
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol

import asyncpg
import structlog

from chargegw import causes
from chargegw.causes import Cause
from chargegw.config import Settings
from chargegw.net.sessions import Link
from chargegw.store.causes import apply as apply_cause
from chargegw.store.database import Connection
from chargegw.store.errors import is_unavailable, reason
from chargegw.store.values import safe_json

log = structlog.get_logger("chargegw.domain.outbox")

#: a command is written at most this often (the first send and one resend); the
#: database refuses to count an attempt beyond it too
MAX_ATTEMPTS = 2
#: timed-out correlation keys remembered to recognise late replies (oldest forgotten)
LATE_KEYS = 4096


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
    #: what brought the reply (the reply's frame; :meth:`Outbox.on_reply` fills it in)
    cause: Cause | None = None


class CommandCodec(Protocol):
    """The protocol side of a command: bytes out, replies recognised."""

    #: correlation ids run from 1 to this (AP3000 msg id: u16; BKV seq: kept in int4)
    max_correlation: int

    def encode_command(
        self, device_id: str, name: str, params: dict[str, Any], correlation: int
    ) -> tuple[bytes, Any]:
        """The frame and the key its reply will carry."""
        ...

    def correlation_scope(self, device_id: str, params: dict[str, Any]) -> str:
        """Whose sequence of correlation ids a command uses (the peer that answers it)."""
        ...


@dataclasses.dataclass(frozen=True)
class Finished:
    """A command that reached a final state (acked, failed or dead)."""

    command_id: int
    device_id: str
    name: str
    order_no: str | None
    status: CommandStatus
    outcome: Outcome | None
    dead_reason: str | None
    created_at: datetime
    #: the device's protocol (ap3000, bkv)
    protocol: str = ""


@dataclasses.dataclass(frozen=True)
class OutboxSettings:
    """How the outbox delivers; :meth:`from_settings` is the one place that reads them
    from the application's settings."""

    #: a command unanswered this long is sent once more (same correlation id), then dead
    ack_timeout_s: float = 15.0
    #: commands on one TCP link at least this far apart
    spacing_s: float = 0.5
    #: the periodic scan (wake, expire, count, purge) runs this often
    scan_interval_s: float = 5.0
    #: finished commands are deleted this long after they finished
    retention_s: float = 7 * 86400
    #: a device taken from a process declared stopped still counts as held this long
    process_timeout_s: float = 20.0

    @classmethod
    def from_settings(cls, settings: Settings) -> OutboxSettings:
        """The outbox's share of the application's settings."""
        return cls(
            ack_timeout_s=settings.ack_timeout_s,
            spacing_s=settings.command_spacing_s,
            scan_interval_s=settings.outbox_scan_s,
            retention_s=settings.command_retention_days * 86400,
            process_timeout_s=settings.process_timeout_s,
        )


def _ignore(_: object) -> None:
    pass


def _ignore2(_: object, __: object) -> None:
    pass


def _no_frame_id() -> int | None:
    return None


@dataclasses.dataclass(frozen=True)
class OutboxHooks:
    """The outbox's collaborators besides the database.

    ``link_of`` names a device's open connection in this process (None: not here) and
    ``write`` puts a frame on it, with the id ``frame_id`` gave it (the command row
    records it as ``sent_frame_id``, and it is the cause of what the send changes).
    ``on_sent_tx`` (a command marked sent, or its unwritten
    attempt taken back: the last argument) and ``on_finish_tx`` run inside the transaction
    that records it, with its connection; ``on_result`` hears of a final state after the
    commit. The others feed metrics and device liveness: ``on_backlog`` (open commands by
    status, each scan), ``on_oldest`` (the age in seconds of the oldest open command, 0
    if none, each scan), ``on_timeout`` / ``on_answered`` (a device left a command
    unanswered / answered one), ``on_sent`` / ``on_resend`` (a command's bytes are written
    the first time / a command is sent a second time: protocol and command name),
    ``on_purged`` (finished commands past the retention deleted by a scan: how many),
    ``on_late_reply`` (a reply came after its command's ACK timeout: device, command name).
    """

    link_of: Callable[[str], Link | None]
    write: Callable[[Link, bytes, str, str, int | None], None] | None = None
    frame_id: Callable[[], int | None] = _no_frame_id
    on_sent_tx: Callable[[Connection, int, str | None, str, bool], Awaitable[None]] | None = None
    on_finish_tx: Callable[[Connection, Finished], Awaitable[None]] | None = None
    on_result: Callable[[Finished], Awaitable[None]] | None = None
    on_backlog: Callable[[dict[str, int]], None] = _ignore
    on_oldest: Callable[[float], None] = _ignore
    on_timeout: Callable[[str], None] = _ignore
    on_answered: Callable[[str], None] = _ignore
    on_sent: Callable[[str, str], None] = _ignore2
    on_resend: Callable[[str, str], None] = _ignore2
    on_purged: Callable[[int], None] = _ignore
    on_late_reply: Callable[[str, str], None] = _ignore2


@dataclasses.dataclass
class _Open:
    """A command in flight, waiting for its reply."""

    command_id: int
    device_id: str
    name: str
    order_no: str | None
    reply: asyncio.Future[Outcome]


@dataclasses.dataclass
class _LinkSlot:
    """Sending on one TCP link: one command at a time, ``spacing_s`` apart."""

    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    last_write: float = -1e18


class _LostError(Exception):
    """The row is no longer this process's to send or finish (claim or device lost)."""


#: the process may update a claimed row only while it holds the row's device
_OURS = """claimed_by = $2 AND EXISTS (SELECT 1 FROM device_sessions s
                                    WHERE s.device_id = commands.device_id AND s.owner = $2)"""


class Outbox:
    """The per-process delivery engine over the ``commands`` table."""

    def __init__(
        self,
        pool: Callable[[], asyncpg.Pool | None],
        codecs: dict[str, CommandCodec],
        hooks: OutboxHooks,
        settings: OutboxSettings | None = None,
        *,
        owner: str = "",
    ) -> None:
        self._pool = pool
        self.codecs = codecs
        self.hooks = hooks
        self.settings = settings or OutboxSettings()
        #: this process's id in the session directory (cluster.py)
        self.owner = owner
        #: while draining, nothing new is claimed (the devices take it elsewhere)
        self.draining = False
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._open: dict[Any, _Open] = {}
        #: replies received and not yet written to the row (command id -> outcome)
        self._answered: dict[int, Outcome] = {}
        self._slots: dict[str, _LinkSlot] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        #: correlation keys whose wait timed out: key -> (device, command name), oldest
        #: first, at most LATE_KEYS (a reply with one of them came too late)
        self._late: dict[Any, tuple[str, str]] = {}

    # -- submitting --

    async def submit(
        self,
        conn: Connection,
        *,
        device_id: str,
        protocol: str,
        name: str,
        params: dict[str, Any],
        priority: Priority,
        expires_s: float,
        order_no: str | None = None,
        after_command: int | None = None,
    ) -> int:
        """Insert a command row (inside the caller's transaction); returns its id.

        ``after_command``: send it only once that command has an outcome. Every process
        hears of it when the transaction commits (``chargegw_outbox``); call :meth:`wake`
        after the commit too, so the local process does not wait for the notification.
        The row's cause is the ambient one (``chargegw.causes``: the API call, the frame).
        """
        await apply_cause(conn)
        await conn.execute("SELECT pg_notify('chargegw_outbox', $1)", device_id)
        command_id: int = await conn.fetchval(
            """INSERT INTO commands (device_id, protocol, name, params, priority, status,
                                     order_no, expires_at, after_command)
               VALUES ($1, $2, $3, $4, $5, 'pending', $6,
                       now() + make_interval(secs => $7), $8)
               RETURNING command_id""",
            device_id,
            protocol,
            name,
            json.dumps(params),
            int(priority),
            order_no,
            float(expires_s),
            after_command,
        )
        return command_id

    def wake(self, device_id: str) -> None:
        """Make sure a worker delivers ``device_id``'s commands, if it is connected here."""
        if self._closing or self.hooks.link_of(device_id) is None:
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
        if outcome.cause is None:  # the frame being handled now
            outcome = dataclasses.replace(outcome, cause=causes.current())
        # kept before anything else: a worker that fails to write it finishes with it
        self._answered[waiting.command_id] = outcome
        waiting.reply.set_result(outcome)
        return True

    def late_reply(self, key: Any) -> bool:
        """A reply that answers no command in flight: True (and ``on_late_reply``) if it
        answers one whose ACK timeout passed (resent since, or dead)."""
        if not self._late:
            return False
        late = self._late.pop(key, None)
        if late is None:
            return False
        self.hooks.on_late_reply(*late)
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
            except Exception as exc:
                if not is_unavailable(exc):
                    raise
                log.warning("outbox scan failed, retrying", reason=reason(exc))
            await asyncio.sleep(self.settings.scan_interval_s)

    async def scan(self) -> None:
        """Wake the local devices with open commands; expire, count and purge (shared)."""
        self._prune_slots()
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
            """SELECT status, count(*) AS n,
                      extract(epoch FROM now() - min(created_at))::float8 AS oldest_s
               FROM commands WHERE status IN ('pending', 'sent') GROUP BY status"""
        )
        self.hooks.on_backlog({"pending": 0, "sent": 0, **{r["status"]: r["n"] for r in counts}})
        self.hooks.on_oldest(max((max(r["oldest_s"], 0.0) for r in counts), default=0.0))
        async with pool.acquire() as conn, conn.transaction():
            # one process purges at a time (concurrent deletes of the same rows only wait)
            purged = 0
            if await conn.fetchval("SELECT pg_try_advisory_xact_lock(hashtext('chargegw.purge'))"):
                done = await conn.execute(
                    """DELETE FROM commands WHERE status IN ('acked', 'failed', 'dead')
                       AND finished_at < now() - make_interval(secs => $1)""",
                    self.settings.retention_s,
                )
                purged = int(done.split()[-1])
        self.hooks.on_purged(purged)

    async def expire(self) -> None:
        """Commands past their expiry whose device no live process holds: dead.

        A device counts as held while a process the sweep has not declared stopped holds
        its directory entry (the sweep alone judges liveness, see cluster.py), and for
        ``process_timeout_s`` after the sweep took the entry from a process declared
        stopped (a process coming back from an outage or a stall re-asserts its devices
        in that time)."""
        pool = self._pool()
        if pool is None:
            return
        while True:
            async with pool.acquire(timeout=5) as conn, conn.transaction():
                await apply_cause(conn, _EXPIRED)
                rows = await self._expire_some(conn)
            for row in rows:
                await self._after_commit(_finished(row, CommandStatus.DEAD, None, "offline"))
            if len(rows) < 500:
                return

    async def _expire_some(self, conn: Connection) -> list[asyncpg.Record]:
        """Up to 500 expired commands dead, with their consequences, in ``conn``'s
        transaction."""
        rows: list[asyncpg.Record] = await conn.fetch(
            """WITH gone AS (
                       SELECT c.command_id FROM commands c
                       WHERE c.status IN ('pending', 'sent') AND c.expires_at < now()
                         AND NOT EXISTS (
                             SELECT 1 FROM device_sessions s
                             LEFT JOIN cluster_processes p ON p.owner = s.owner
                             WHERE s.device_id = c.device_id
                               AND ((p.owner IS NOT NULL AND p.stopped_at IS NULL)
                                    OR (s.lost_owner IS NOT NULL
                                        AND s.released_at > now() - make_interval(secs => $1))))
                       ORDER BY c.expires_at LIMIT 500
                       FOR UPDATE OF c SKIP LOCKED)
                   UPDATE commands c SET status = 'dead', dead_reason = 'offline',
                                         finished_at = now()
                   FROM gone WHERE c.command_id = gone.command_id
                   RETURNING c.*""",
            self.settings.process_timeout_s,
        )
        if self.hooks.on_finish_tx is not None:
            for row in rows:
                await self.hooks.on_finish_tx(
                    conn, _finished(row, CommandStatus.DEAD, None, "offline")
                )
        return rows

    # -- delivery, one worker per device with open commands --

    async def _worker(self, device_id: str) -> None:
        # started while a frame or a call was handled, the worker outlives it: each of
        # its steps names its own cause
        causes.enter(None)
        event = self._wake[device_id]
        delay = 0.5
        try:
            while not self._closing and not self.draining:
                event.clear()
                try:
                    row = await self._next(device_id)
                    if row is None:
                        if event.is_set():  # woken while looking: a row may have committed
                            continue
                        return
                    if not await self._deliver(row):
                        return
                    delay = 0.5
                except _LostError:
                    # cancelled, or the device is another process's now (then the next
                    # look finds nothing to claim and the new owner delivers)
                    continue
                except Exception as exc:
                    if not is_unavailable(exc) or self.hooks.link_of(device_id) is None:
                        raise
                    log.warning(
                        "outbox: database unavailable, retrying",
                        device_id=device_id,
                        reason=reason(exc),
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
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
        """Claim the device's next command, if this process holds the device. A command
        waiting for another command's outcome is not eligible until that outcome."""
        pool = self._pool()
        if pool is None:
            return None
        row: asyncpg.Record | None = await pool.fetchrow(
            """WITH next AS (
                   SELECT command_id FROM commands c
                   WHERE c.device_id = $1 AND c.status IN ('pending', 'sent')
                     AND EXISTS (SELECT 1 FROM device_sessions
                                 WHERE device_id = $1 AND owner = $2)
                     AND (c.after_command IS NULL OR NOT EXISTS (
                          SELECT 1 FROM commands a WHERE a.command_id = c.after_command
                            AND a.status IN ('pending', 'sent')))
                   ORDER BY (c.status = 'sent') DESC, c.priority, c.command_id LIMIT 1
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
        answered = self._answered.get(command_id)
        if answered is not None:  # answered before a write failed: finish with the answer
            status = CommandStatus.ACKED if answered.success else CommandStatus.FAILED
            await self._finish(row, status, answered, None, answered.cause)
            return True
        codec = self.codecs.get(row["protocol"])
        if codec is None:
            await self._finish(
                row,
                CommandStatus.DEAD,
                None,
                f"no driver for {row['protocol']}",
                Cause.fault("no_driver"),
            )
            return True
        link = self.hooks.link_of(device_id)
        if link is None:  # gone since the claim; the directory catches up, a reconnect wakes
            return False
        params = row["params"]
        if isinstance(params, str):
            params = json.loads(params)
        # a frame for the host the device sits behind (host upgrades) says nothing about
        # whether the device itself answers
        own = params.get("phy_id", device_id) == device_id
        attempts = row["attempts"]
        if attempts >= MAX_ATTEMPTS:  # sent and resent, unanswered: a crash cut the wait
            recovered = Cause.system(causes.RESTART_RECOVERY)
            await self._finish(row, CommandStatus.DEAD, None, "no answer", recovered)
            if own:
                with causes.using(recovered):
                    self.hooks.on_timeout(device_id)
            return True
        try:  # the correlation id only changes the id fields: check the rest first
            codec.encode_command(device_id, row["name"], params, row["correlation"] or 1)
        except Exception as exc:
            await self._finish(
                row, CommandStatus.DEAD, None, f"cannot encode: {exc}", Cause.fault("cannot_encode")
            )
            return True
        waiting: _Open | None = None
        slot = self._slots.setdefault(link.id, _LinkSlot())
        async with slot.lock:
            # spacing per link: piles behind one host, sockets of one gateway share it
            wait = slot.last_write + self.settings.spacing_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            frame_id = self.hooks.frame_id()
            correlation = await self._mark_sent(row, codec, params, frame_id)
            frame, key = codec.encode_command(device_id, row["name"], params, correlation)
            if link.closed:  # no bytes written: the attempt does not count
                await self._unmark(row)
                return False
            if key is not None:
                waiting = _Open(
                    command_id,
                    device_id,
                    row["name"],
                    row["order_no"],
                    asyncio.get_running_loop().create_future(),
                )
                self._open[key] = waiting
                self._late.pop(key, None)
            if self.hooks.write is not None:
                self.hooks.write(link, frame, device_id, row["name"], frame_id)
            slot.last_write = time.monotonic()
            if attempts == 0:
                self.hooks.on_sent(row["protocol"], row["name"])
        if waiting is None:  # the protocol defines no reply: done once written
            await self._finish(row, CommandStatus.ACKED, None, None, Cause.frame(frame_id))
            return True
        log.info(
            "command sent",
            device_id=device_id,
            command_id=command_id,
            command=row["name"],
            attempt=attempts + 1,
        )
        try:
            outcome = await asyncio.wait_for(waiting.reply, self.settings.ack_timeout_s)
        except TimeoutError:
            if key is not None:
                self._late[key] = (device_id, row["name"])
                if len(self._late) > LATE_KEYS:
                    del self._late[next(iter(self._late))]
            if attempts == 0:
                self.hooks.on_resend(row["protocol"], row["name"])
            if attempts + 1 >= MAX_ATTEMPTS:
                await self._finish(row, CommandStatus.DEAD, None, "no answer", _ACK_TIMEOUT)
                if own:
                    with causes.using(_ACK_TIMEOUT):
                        self.hooks.on_timeout(device_id)
            return True  # the next round resends it (same correlation id)
        finally:
            self._open.pop(key, None)
        self.hooks.on_answered(device_id)
        status = CommandStatus.ACKED if outcome.success else CommandStatus.FAILED
        await self._finish(row, status, outcome, None, outcome.cause)
        return True

    async def _mark_sent(
        self, row: asyncpg.Record, codec: CommandCodec, params: Any, frame_id: int | None
    ) -> int:
        """Mark the row sent (an attempt counted, a correlation id chosen on the first
        send, the frame that will carry it: ``frame_id``) with the order's move, caused
        by that frame, in one transaction; returns the correlation id.
        Raises :class:`_LostError` if the row is not this process's to send any more."""
        pool = self._pool()
        assert pool is not None
        async with pool.acquire(timeout=5) as conn, conn.transaction():
            await apply_cause(conn, Cause.frame(frame_id))
            correlation = row["correlation"]
            if correlation is None:
                correlation = await conn.fetchval(
                    """INSERT INTO device_correlations AS d (device_id, last) VALUES ($1, $2)
                       ON CONFLICT (device_id) DO UPDATE SET last = d.last % $3 + 1
                       RETURNING last""",
                    codec.correlation_scope(row["device_id"], params),
                    random.randrange(1, codec.max_correlation),
                    codec.max_correlation,
                )
            marked = await conn.fetchval(
                f"""UPDATE commands SET status = 'sent', correlation = $3,
                           attempts = attempts + 1, sent_at = now(), sent_frame_id = $5
                    WHERE command_id = $1 AND status IN ('pending', 'sent') AND {_OURS}
                      AND attempts < $4
                    RETURNING attempts""",
                row["command_id"],
                self.owner,
                correlation,
                MAX_ATTEMPTS,
                frame_id,
            )
            if marked is None:  # cancelled, taken over by the device's new owner, or
                raise _LostError  # out of attempts (the next look gives it up)
            if marked == 1 and self.hooks.on_sent_tx is not None:
                await self.hooks.on_sent_tx(
                    conn, row["command_id"], row["order_no"], row["name"], True
                )
        return int(correlation)

    async def _unmark(self, row: asyncpg.Record) -> None:
        """Take back an attempt whose bytes were never written (best effort: a failure
        only costs one of the ``MAX_ATTEMPTS`` attempts).

        Only the claim is checked, not the directory: the connection closed, so this
        process has usually released the device already; a process that took the device
        over claims the row before it sends, and then this update changes nothing."""
        pool = self._pool()
        assert pool is not None
        try:
            async with pool.acquire(timeout=5) as conn, conn.transaction():
                await apply_cause(conn, Cause.fault(causes.CONNECTION_LOST))
                left = await conn.fetchval(
                    """UPDATE commands SET attempts = attempts - 1,
                              status = CASE WHEN attempts = 1 THEN 'pending' ELSE status END
                       WHERE command_id = $1 AND status = 'sent' AND claimed_by = $2
                       RETURNING attempts""",
                    row["command_id"],
                    self.owner,
                )
                if left == 0 and self.hooks.on_sent_tx is not None:  # the order moves back too
                    await self.hooks.on_sent_tx(
                        conn, row["command_id"], row["order_no"], row["name"], False
                    )
        except Exception as exc:
            log.warning("could not take back an unsent attempt", error=repr(exc))

    async def _finish(
        self,
        row: asyncpg.Record,
        status: CommandStatus,
        outcome: Outcome | None,
        dead_reason: str | None,
        cause: Cause | None,
    ) -> None:
        """Write the command's final state and its consequences (``on_finish_tx``) in one
        transaction, caused by ``cause``, retrying while the database is unavailable and
        the row is still this process's; then run ``on_result``."""
        done = _finished(row, status, outcome, dead_reason)
        delay = 0.5
        while True:
            try:
                with causes.using(cause):
                    followers = await self._finish_tx(done, outcome)
                break
            except Exception as exc:
                if self._closing or not is_unavailable(exc):
                    raise
                log.warning(
                    "command outcome not written yet, retrying",
                    command_id=done.command_id,
                    reason=reason(exc),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self._answered.pop(done.command_id, None)
        if followers is None:  # taken over by the device's new owner, which finishes it
            log.info(
                "command taken over by another process",
                device_id=done.device_id,
                command_id=done.command_id,
            )
            raise _LostError
        await self._after_commit(done)
        for follower in followers:  # dead with it: metrics and events like any dead one
            await self._after_commit(follower)

    async def _finish_tx(self, done: Finished, outcome: Outcome | None) -> list[Finished] | None:
        """The final state of ``done`` and its consequences, in one transaction. Returns
        the commands that waited for it and die with it (``after_failed``), or None if
        the row is no longer this process's."""
        pool = self._pool()
        assert pool is not None
        followers: list[Finished] = []
        # an answer (or a write the protocol expects no answer to) is a fact: it is
        # recorded while the row is still this process's claim, even if the device left
        # meanwhile (its connection may drop before the database comes back); a process
        # that took the device over claims the row first. Giving up (dead) is a
        # judgement: it needs the device too, as a new owner may still deliver it
        ours = _OURS if done.status is CommandStatus.DEAD else "claimed_by = $2"
        async with pool.acquire(timeout=5) as conn, conn.transaction():
            await apply_cause(conn)  # the one :meth:`_finish` names
            finished = await conn.fetchval(
                f"""UPDATE commands SET status = $3, finished_at = now(), result_code = $4,
                           result_text = $5, dead_reason = $6, reply = $7
                    WHERE command_id = $1 AND status IN ('pending', 'sent') AND {ours}
                    RETURNING command_id""",
                done.command_id,
                self.owner,
                done.status.value,
                None if outcome is None else outcome.result_code,
                None if outcome is None else outcome.result_text,
                done.dead_reason,
                None if outcome is None else safe_json(outcome.reply),
            )
            if finished is None:
                return None
            if done.status is CommandStatus.FAILED:
                # commands that wait for this one cannot go (a stop after a refused start)
                rows = await conn.fetch(
                    """UPDATE commands SET status = 'dead', dead_reason = 'after_failed',
                              finished_at = now()
                       WHERE after_command = $1 AND status = 'pending' RETURNING *""",
                    done.command_id,
                )
                followers = [_finished(r, CommandStatus.DEAD, None, "after_failed") for r in rows]
            if self.hooks.on_finish_tx is not None:
                await self.hooks.on_finish_tx(conn, done)
                for follower in followers:
                    await self.hooks.on_finish_tx(conn, follower)
        return followers

    async def _after_commit(self, done: Finished) -> None:
        log.info(
            "command finished",
            device_id=done.device_id,
            command_id=done.command_id,
            status=done.status.value,
            reason=done.dead_reason,
        )
        if self.hooks.on_result is None:
            return
        try:
            await self.hooks.on_result(done)
        except Exception:  # committed: what follows cannot undo it
            log.exception("command result hook failed", command_id=done.command_id)

    def _prune_slots(self) -> None:
        """Forget links with no command in the last spacing interval."""
        idle_before = time.monotonic() - self.settings.spacing_s
        for link_id, slot in list(self._slots.items()):
            if not slot.lock.locked() and slot.last_write < idle_before:
                del self._slots[link_id]


_ACK_TIMEOUT = Cause.timer(causes.ACK_TIMEOUT)
_EXPIRED = Cause.timer(causes.COMMAND_EXPIRED)


def _finished(
    row: asyncpg.Record, status: CommandStatus, outcome: Outcome | None, dead_reason: str | None
) -> Finished:
    return Finished(
        command_id=row["command_id"],
        device_id=row["device_id"],
        name=row["name"],
        order_no=row["order_no"],
        status=status,
        outcome=outcome,
        dead_reason=dead_reason,
        created_at=row["created_at"],
        protocol=row["protocol"],
    )
