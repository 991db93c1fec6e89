"""Protocol-neutral simulated pile: one TCP connection at a time, faults, frame records.

A protocol subclass (:class:`~chargesim.ap3000.SimulatedAp3000Pile`, later a BKV one)
supplies the stream decoder, the connection preamble, what to send on connect, how to
take the server's replies and how to answer its commands. This module owns everything
else: connecting and reconnecting with backoff, reading, a bounded command queue,
fault injection (silence, delays, answering only resends, garbage, dropped and
half-open connections), duplicate-command handling and the record of every frame.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import dataclasses
import enum
import hashlib
import logging
import random
import time
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, ClassVar, Final, Protocol

from chargeproto import Event, IccidReceived, KeepaliveReceived, Message, MessageReceived
from chargesim._timing import Timing, backoff_s

log = logging.getLogger(__name__)

#: how many half-open (abandoned, still open) connections a pile keeps at most
MAX_ZOMBIES: Final = 4
#: how many command keys a pile remembers for resend detection and reply replay
COMMAND_MEMORY: Final = 256
#: connections shorter than this count as a failure for the reconnect backoff
SHORT_SESSION_S: Final = 5.0
#: how many connections a pile remembers in :attr:`SimulatedPile.connection_log`
CONNECTION_MEMORY: Final = 1000
#: how many ended sessions a pile keeps in :attr:`SimulatedPile.ledger` (the oldest go)
LEDGER_LIMIT: Final = 100_000
#: garbage bytes exclude the bytes that may start a frame (AP3000 ``DNY``, BKV ``fc``),
#: an ICCID or ``link``, so that a server's resynchronisation is deterministic
_GARBAGE_ALPHABET: Final = bytes(b for b in range(256) if b not in b"Dl8\xfc")


class StreamDecoder(Protocol):
    """What the base needs from a chargeproto stream decoder."""

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]: ...


class Flow(str, enum.Enum):
    """Direction of a recorded item, seen from the pile."""

    SENT = "sent"
    RECEIVED = "received"

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True, slots=True)
class FrameRecord:
    """One item on the wire, with the monotonic time (``loop.time()``) it was seen.

    ``kind`` is ``frame`` (a decoded protocol frame, ``message`` set), ``iccid``,
    ``link``, ``garbage`` (injected bytes) or ``error`` (bytes the decoder rejected).
    ``connection`` numbers the pile's connections from 1.
    """

    t: float
    flow: Flow
    kind: str
    raw: bytes
    connection: int
    message: Message | None = None
    command: int | None = None
    msg_id: int | None = None


@dataclasses.dataclass(slots=True)
class Faults:
    """Fault injection; every field may be changed while the pile runs.

    Times are real seconds (not divided by the acceleration factor): they stand for
    what the server under test experiences.
    """

    #: never answer (nor execute) commands from the server
    silent: bool = False
    #: wait this long before handling each command
    reply_delay_s: float = 0.0
    #: ignore the first copy of each command; answer its resend (same msg id)
    answer_only_resend: bool = False
    #: answer start/stop commands with this result code instead of executing them
    refuse_with: int | None = None
    #: close each connection after this long, then reconnect
    drop_connection_after_s: float | None = None
    #: send this many random bytes before every frame
    garbage: int = 0
    #: after this long, open a new connection with the same ids, leaving the old one open
    half_open_after_s: float | None = None
    #: probability that the pile ignores the server's acknowledgement of a settlement or
    #: end report (AP3000 0x03 ``SettlementReply``, BKV ``CardEndAck``/``FeeModeEndAck``),
    #: so that it resends the report later
    lose_acks: float = 0.0
    #: BKV: probability that a resend of an end report carries different live readings
    #: (``temperature_c``, ``signal_strength``; 0x1004 also ``power_w``/``current_a``)
    #: while the session values (socket, port, business number, duration, energy, end
    #: time, fees) stay the same
    resend_changed_readings: float = 0.0
    #: BKV: probability that a 0x1000/0x1004 fee-mode end report leaves out its optional
    #: tag 0x0A (``business_no`` ABSENT); decided once per report, every copy alike
    omit_optional_tags: float = 0.0
    #: AP3000: never send the 0x21 heartbeat (firmware that registers and reports only)
    omit_heartbeat: bool = False
    #: AP3000: leave out the optional trailing fields, as older firmware does (0x20
    #: without work mode and power-board version)
    short_payloads: bool = False


@dataclasses.dataclass(slots=True)
class LedgerEntry:
    """One charging session a pile ended, as it reported it, and whether the server
    acknowledged the report.

    ``device_id`` is the API's device id (AP3000: the physical id; BKV:
    ``<gateway_id>-<socket>``), ``port`` is 1-based like the API. AP3000 sessions carry
    ``order_id``, BKV sessions ``business_no``. ``started_by`` is ``server`` (a start
    command, also after a card swipe: then ``card_id`` is set) or ``device`` (started at
    the pile: coin, button, offline). ``energy_kwh`` and ``duration_s`` are the values of
    the settlement or end report (BKV reports minutes: ``duration_s`` is minutes x 60).
    Times are wall-clock Unix seconds. ``dropped`` says the pile lost the report
    unacknowledged (its storage overflowed, or the server erased it with 0x88).
    """

    protocol: str
    device_id: str
    port: int
    started_by: str
    energy_kwh: float
    duration_s: int
    started_at: float
    ended_at: float
    stop_reason: int | str
    order_id: str | None = None
    business_no: int | None = None
    card_id: str | None = None
    #: the report as first built (resends may differ in live readings)
    report: Message | None = None
    #: BKV: the report left out its optional business-number tag
    tag_omitted: bool = False
    copies_sent: int = 0
    #: BKV: copies sent with other live readings than the first (``resend_changed_readings``)
    copies_changed: int = 0
    first_sent_at: float | None = None
    acked_at: float | None = None
    acks_lost: int = 0
    dropped: bool = False

    @property
    def acked(self) -> bool:
        """Whether the server acknowledged the report (the pile deleted it)."""
        return self.acked_at is not None

    @property
    def key(self) -> tuple[str, int, str | int | None]:
        """What identifies the session: device, port, and order id or business number."""
        return (self.device_id, self.port, self.order_id or self.business_no)

    def sent(self) -> None:
        """Count one copy of the report on the wire."""
        self.copies_sent += 1
        if self.first_sent_at is None:
            self.first_sent_at = time.time()

    def acknowledge(self) -> None:
        """The server's acknowledgement was taken: the pile deletes the report."""
        if self.acked_at is None:
            self.acked_at = time.time()


@dataclasses.dataclass(slots=True)
class ConnectionSpan:
    """One TCP connection of a pile: when it opened and when it ended (wall-clock Unix
    seconds; ``closed`` None while it lasts)."""

    opened: float
    closed: float | None = None


@dataclasses.dataclass(slots=True)
class PileStats:
    """Counters of one pile."""

    connects: int = 0
    connect_failures: int = 0
    frames_sent: int = 0
    frames_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    decode_errors: int = 0
    commands_ignored: int = 0
    unmatched_replies: int = 0
    #: acknowledgements of settlements / end reports ignored by the ``lose_acks`` fault
    acks_lost: int = 0


class _SessionEndError(Exception):
    """Raised inside a connection's task group to end it."""


class Connection:
    """One TCP connection of a pile and the reason it ended."""

    def __init__(
        self, number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.number = number
        self.reader = reader
        self.writer = writer
        self.opened_at = asyncio.get_running_loop().time()
        self.ended = asyncio.Event()
        self.end_reason = ""
        self.keep_open = False
        self.reconnect_after_s: float | None = None
        self.write_lock = asyncio.Lock()

    def end(
        self, reason: str, *, keep_open: bool = False, reconnect_after_s: float | None = None
    ) -> None:
        """Ask for the connection to end (the first reason wins)."""
        if self.ended.is_set():
            return
        self.end_reason = reason
        self.keep_open = keep_open
        self.reconnect_after_s = reconnect_after_s
        self.ended.set()

    @property
    def usable(self) -> bool:
        return not self.ended.is_set() and not self.writer.is_closing()


class SimulatedPile(abc.ABC):
    """Base of simulated piles of any protocol.

    ``run(host, port)`` keeps one connection to the server alive until cancelled.
    Protocol subclasses implement the abstract hooks; everything else is shared.
    """

    protocol: ClassVar[str]

    def __init__(
        self,
        pile_id: str,
        *,
        heartbeat_s: float,
        faults: Faults | None = None,
        record_limit: int = 10_000,
        command_queue_size: int = 64,
    ) -> None:
        self.pile_id = pile_id
        self.heartbeat_s = heartbeat_s
        self.faults = faults if faults is not None else Faults()
        self.records: collections.deque[FrameRecord] = collections.deque(maxlen=record_limit)
        self.stats = PileStats()
        self.timing = Timing()
        self.rng = random.Random(pile_id)
        #: what fault decisions (:meth:`roll`) and pile-made ids derive from; the
        #: simulator sets it from its seed
        self.seed = pile_id
        #: every session this pile ended (:class:`LedgerEntry`), oldest first, bounded
        self.ledger: collections.deque[LedgerEntry] = collections.deque(maxlen=LEDGER_LIMIT)
        #: the pile's connections (:class:`ConnectionSpan`), oldest first, bounded
        self.connection_log: collections.deque[ConnectionSpan] = collections.deque(
            maxlen=CONNECTION_MEMORY
        )
        self.command_queue_size = command_queue_size
        self.reconnect_min_s = 0.5
        self.reconnect_max_s = 30.0
        self.last_sent_at = 0.0
        self._conn: Connection | None = None
        self._connection_count = 0
        self._tg: asyncio.TaskGroup | None = None
        self._zombies: collections.deque[asyncio.StreamWriter] = collections.deque()
        #: set by :meth:`stopping` (a stop that cancels the pile's task)
        self._stopping = False
        self._seen_commands: collections.OrderedDict[Hashable, None] = collections.OrderedDict()
        self._replies: collections.OrderedDict[Hashable, list[bytes]] = collections.OrderedDict()
        self._record_pulse = asyncio.Event()

    # --- protocol hooks ------------------------------------------------------------------

    @abc.abstractmethod
    def new_decoder(self) -> StreamDecoder:
        """A fresh decoder for what the server sends on one connection."""

    @abc.abstractmethod
    def preamble(self) -> tuple[bytes, str]:
        """Unframed bytes sent first on every connection and their record kind."""

    @abc.abstractmethod
    async def on_connected(self, tg: asyncio.TaskGroup) -> None:
        """Send the opening frames and start the connection's periodic tasks in ``tg``."""

    @abc.abstractmethod
    def is_command(self, message: Message) -> bool:
        """True for a server command, False for the server's reply to a pile message."""

    @abc.abstractmethod
    def command_key(self, message: Message) -> Hashable:
        """What identifies a command and its resends (AP3000: command and msg id)."""

    @abc.abstractmethod
    def on_reply(self, message: Message) -> None:
        """Take a server reply (registration, heartbeat, time, settlement ...)."""

    @abc.abstractmethod
    async def on_command(self, message: Message) -> list[bytes]:
        """Execute a command; return the reply frames (replayed for resends)."""

    def frame_ids(self, message: Message) -> tuple[int | None, int | None]:
        """``(command, msg_id)`` of a message, for the records."""
        return type(message).command, getattr(message, "msg_id", None)

    def on_disconnected(self) -> None:  # noqa: B027 - optional hook
        """Called when a connection ended (the pile may reconnect)."""

    @abc.abstractmethod
    def device_ids(self) -> list[str]:
        """The API device ids behind this pile (AP3000: itself; BKV: its sockets)."""

    @abc.abstractmethod
    def charging(self) -> set[tuple[str, int]]:
        """``(device_id, port)`` (1-based) of every port charging now."""

    # --- state ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the pile has a usable connection now."""
        return self._conn is not None and self._conn.usable

    def unacknowledged(self) -> list[LedgerEntry]:
        """Ended sessions whose report the pile still holds (sent or not, unanswered)."""
        return [e for e in self.ledger if not e.acked and not e.dropped]

    def roll(self, *key: object) -> float:
        """A number in [0, 1) fixed by the pile's seed and ``key``: the same event (e.g.
        ``("ack", order_id, 2)``) gets the same fault decision in every run with the same
        seed, however the scheduler interleaves the piles."""
        digest = hashlib.blake2b(repr((self.seed, *key)).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2.0**64

    def chance(self, probability: float, *key: object) -> bool:
        """True with ``probability`` for the event ``key`` (see :meth:`roll`)."""
        return probability > 0.0 and self.roll(*key) < probability

    @property
    def connection_count(self) -> int:
        """Connections opened so far (1 after the first connect)."""
        return self._connection_count

    def received(self, command: int | None = None) -> list[FrameRecord]:
        """Frames received from the server, optionally only one command."""
        return [
            r
            for r in self.records
            if r.flow is Flow.RECEIVED
            and r.kind == "frame"
            and (command is None or r.command == command)
        ]

    def sent(self, command: int | None = None) -> list[FrameRecord]:
        """Frames sent to the server, optionally only one command."""
        return [
            r
            for r in self.records
            if r.flow is Flow.SENT
            and r.kind == "frame"
            and (command is None or r.command == command)
        ]

    async def wait_for_record(
        self,
        predicate: Callable[[FrameRecord], bool],
        *,
        timeout: float,
        since: float | None = None,
    ) -> FrameRecord:
        """The first record (at or after ``since``) matching ``predicate``.

        Raises ``TimeoutError`` when none arrives within ``timeout`` real seconds.
        """
        async with asyncio.timeout(timeout):
            while True:
                pulse = self._record_pulse
                for record in self.records:
                    if (since is None or record.t >= since) and predicate(record):
                        return record
                await pulse.wait()

    # --- runtime controls ----------------------------------------------------------------

    def drop_connection(self, reason: str = "dropped on request") -> None:
        """Close the current connection; the pile reconnects after the backoff."""
        if self._conn is not None:
            self._conn.end(reason)

    def abandon_connection(self) -> None:
        """Half-open: open a new connection now and leave the current one open, unused."""
        if self._conn is not None:
            self._conn.end("half-open reconnect", keep_open=True, reconnect_after_s=0.0)

    def end_connection(self, reason: str, *, reconnect_after_s: float | None = None) -> None:
        """End the current connection (protocol use: reboot, offline detection)."""
        if self._conn is not None:
            self._conn.end(reason, reconnect_after_s=reconnect_after_s)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
        """Start a task owned by the running pile (it outlives connections).

        Returns None (and closes the coroutine) when the pile is not running.
        """
        if self._tg is None:
            coro.close()
            return None
        return self._tg.create_task(coro)

    # --- sending -------------------------------------------------------------------------

    async def send_frame(self, frame: bytes, message: Message | None = None) -> bool:
        """Send one protocol frame (after injected garbage, if any); False if offline."""
        conn = self._conn
        if conn is None or not conn.usable:
            return False
        garbage = self.faults.garbage
        if garbage > 0:
            junk = bytes(self.rng.choices(_GARBAGE_ALPHABET, k=garbage))
            if not await self._write(conn, junk, "garbage"):
                return False
        return await self._write(conn, frame, "frame", message)

    async def send_unframed(self, data: bytes, kind: str) -> bool:
        """Send bytes outside any frame (an ICCID, ``link``); False if offline."""
        conn = self._conn
        if conn is None or not conn.usable:
            return False
        return await self._write(conn, data, kind)

    async def _write(
        self, conn: Connection, data: bytes, kind: str, message: Message | None = None
    ) -> bool:
        try:
            async with conn.write_lock:
                if not conn.usable:
                    return False
                conn.writer.write(data)
                self._record(conn, Flow.SENT, kind, data, message)
                await conn.writer.drain()
        except (ConnectionError, OSError) as exc:
            conn.end(f"write failed: {exc}")
            return False
        return True

    def _record(
        self,
        conn: Connection,
        flow: Flow,
        kind: str,
        raw: bytes,
        message: Message | None = None,
    ) -> None:
        now = asyncio.get_running_loop().time()
        command = msg_id = None
        if message is not None:
            command, msg_id = self.frame_ids(message)
        self.records.append(
            FrameRecord(now, flow, kind, raw, conn.number, message, command, msg_id)
        )
        if flow is Flow.SENT:
            self.last_sent_at = now
            self.stats.bytes_sent += len(raw)
            if kind == "frame":
                self.stats.frames_sent += 1
        elif kind == "frame":
            self.stats.frames_received += 1
        # wake every waiter, then start a fresh pulse
        self._record_pulse.set()
        self._record_pulse = asyncio.Event()

    # --- running -------------------------------------------------------------------------

    async def run(
        self,
        host: str,
        port: int,
        *,
        timing: Timing | None = None,
        rng: random.Random | None = None,
        start_delay_s: float = 0.0,
        seed: str | None = None,
    ) -> None:
        """Connect to ``host:port`` and stay connected (reconnecting) until cancelled.

        ``seed`` fixes the fault decisions and the ids the pile makes up (default: the
        pile id)."""
        if self._tg is not None:
            raise RuntimeError(f"pile {self.pile_id} is already running")
        if timing is not None:
            self.timing = timing
        if rng is not None:
            self.rng = rng
        if seed is not None:
            self.seed = seed
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                if start_delay_s > 0:
                    await asyncio.sleep(start_delay_s)
                await self._connect_loop(host, port)
        finally:
            self._tg = None
            while self._zombies:
                self._zombies.popleft().close()

    def stopping(self) -> None:
        """Say the pile is being stopped (its task is about to be cancelled): it does not
        connect again even if the cancel is lost (Python 3.11's TaskGroup can swallow a
        cancel that meets a failing child, here the session's)."""
        self._stopping = True

    async def _connect_loop(self, host: str, port: int) -> None:
        failures = 0
        self._stopping = False
        while True:
            if self._stopping:
                raise asyncio.CancelledError
            try:
                async with asyncio.timeout(10.0):
                    reader, writer = await asyncio.open_connection(host, port)
            except (OSError, TimeoutError) as exc:
                failures += 1
                self.stats.connect_failures += 1
                log.debug("pile %s: connect failed (%s)", self.pile_id, exc)
                await asyncio.sleep(self._backoff(failures))
                continue
            conn = await self._session(reader, writer)
            log.debug(
                "pile %s: connection %d ended: %s", self.pile_id, conn.number, conn.end_reason
            )
            lasted = asyncio.get_running_loop().time() - conn.opened_at
            failures = failures + 1 if lasted < SHORT_SESSION_S else 0
            delay = conn.reconnect_after_s
            if delay is None:
                delay = self._backoff(max(failures, 1))
            if delay > 0:
                await asyncio.sleep(delay)

    def _backoff(self, failures: int) -> float:
        return backoff_s(
            failures,
            self.rng,
            minimum=self.reconnect_min_s,
            maximum=self.reconnect_max_s,
            jitter=self.timing.jitter,
        )

    async def _session(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Connection:
        self._connection_count += 1
        self.stats.connects += 1
        conn = Connection(self._connection_count, reader, writer)
        self._conn = conn
        span = ConnectionSpan(time.time())
        self.connection_log.append(span)
        queue: asyncio.Queue[Message] = asyncio.Queue(maxsize=self.command_queue_size)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._watch(conn))
                tg.create_task(self._read(conn, queue))
                tg.create_task(self._work(queue))
                faults = self.faults
                if faults.drop_connection_after_s is not None:
                    tg.create_task(self._end_after(conn, faults.drop_connection_after_s, False))
                if faults.half_open_after_s is not None:
                    tg.create_task(self._end_after(conn, faults.half_open_after_s, True))
                data, kind = self.preamble()
                if data:
                    await self.send_unframed(data, kind)
                await self.on_connected(tg)
        except* _SessionEndError:
            pass
        except* (ConnectionError, OSError) as group:
            conn.end(f"i/o error: {group.exceptions[0]}")
        finally:
            self._conn = None
            span.closed = time.time()
            if conn.keep_open:
                self._zombies.append(writer)
                while len(self._zombies) > MAX_ZOMBIES:
                    self._zombies.popleft().close()
            else:
                writer.close()
            self.on_disconnected()
        return conn

    async def _watch(self, conn: Connection) -> None:
        await conn.ended.wait()
        raise _SessionEndError(conn.end_reason)

    async def _end_after(self, conn: Connection, seconds: float, keep_open: bool) -> None:
        await asyncio.sleep(seconds)
        if keep_open:
            conn.end("half-open reconnect (fault)", keep_open=True, reconnect_after_s=0.0)
        else:
            conn.end("connection dropped (fault)")

    async def _read(self, conn: Connection, queue: asyncio.Queue[Message]) -> None:
        decoder = self.new_decoder()
        while True:
            data = await conn.reader.read(4096)
            if not data:
                conn.end("server closed the connection")
                return
            self.stats.bytes_received += len(data)
            for event in decoder.feed(data):
                if isinstance(event, MessageReceived):
                    message = event.message
                    self._record(conn, Flow.RECEIVED, "frame", event.raw, message)
                    if self.is_command(message):
                        await queue.put(message)  # bounded: a slow pile stops reading
                    else:
                        self.on_reply(message)
                elif isinstance(event, IccidReceived):
                    self._record(conn, Flow.RECEIVED, "iccid", event.raw)
                elif isinstance(event, KeepaliveReceived):
                    self._record(conn, Flow.RECEIVED, "link", event.raw)
                else:
                    self.stats.decode_errors += 1
                    self._record(conn, Flow.RECEIVED, "error", event.raw)

    async def _work(self, queue: asyncio.Queue[Message]) -> None:
        while True:
            message = await queue.get()
            faults = self.faults
            if faults.silent:
                self.stats.commands_ignored += 1
                continue
            key = self.command_key(message)
            if faults.answer_only_resend and key not in self._seen_commands:
                self._remember(self._seen_commands, key, None)
                self.stats.commands_ignored += 1
                continue
            if faults.reply_delay_s > 0:
                await asyncio.sleep(faults.reply_delay_s)
            cached = self._replies.get(key)
            if cached is not None:
                replies = cached  # a resend of a command already executed: same answer again
            else:
                replies = await self.on_command(message)
                if replies:
                    self._remember(self._replies, key, replies)
            for frame in replies:
                await self.send_frame(frame, self.describe_frame(frame))

    def describe_frame(self, frame: bytes) -> Message | None:
        """Decode one of our own frames for the record (subclasses may override)."""
        return None

    @staticmethod
    def _remember(
        memory: collections.OrderedDict[Hashable, Any], key: Hashable, value: Any
    ) -> None:
        memory[key] = value
        memory.move_to_end(key)
        while len(memory) > COMMAND_MEMORY:
            memory.popitem(last=False)
