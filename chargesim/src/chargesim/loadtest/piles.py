"""A load generator process: thousands of light piles on one event loop.

Run by the load-test runner as ``python -m chargesim.loadtest.piles CONFIG_JSON``; it
talks JSON Lines: control on stdin (``{"cmd": "start"}``, ``{"cmd": "storm", "count": N,
"window": S}``, ``{"cmd": "rate", "accel": X}``, ``{"cmd": "rtt"}``, ``{"cmd": "stop"}``),
figures on stdout (``ready``, ``stats`` at every whole second with the heartbeat round
trips of that second, ``commands`` with the receive times of the server's commands,
``rate``, ``rtt``: the heartbeat round-trip histogram so far, ``final``).

What makes it cheap per pile: each pile is one slotted object that is also its
connection's protocol (no task, no coroutine while connected); every timer of every pile
lives in one timer wheel driven by a single ``call_later``; all connections read into
one shared buffer (``buffer_updated`` runs synchronously, so it is never shared by two
reads at once); frames are pre-encoded templates patched per pile (:mod:`.frames`).
What the server sends is decoded with chargeproto's stream decoders, so every byte is
checked; the rare commands are answered with chargeproto-encoded replies.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import json
import random
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any, ClassVar, Final

from chargegw.core import bkv_device_id
from chargeproto import ABSENT, Message, MessageReceived, StreamError, ap3000, bkv
from chargesim.bkv import DEFAULT_PARAMS
from chargesim.loadtest import frames
from chargesim.loadtest.stats import Histogram, cpu_seconds, raise_open_files_limit, rss_kib

# pile states
IDLE, CONNECTING, CONNECTED, WAITING, STOPPED = range(5)
#: a connection that lasted this long resets the reconnect backoff
STABLE_AFTER_S: Final = 5.0
_LINGER_RESET: Final = struct.pack("ii", 1, 0)
_READ_BUFFER: Final = 65536
_U16: Final = 0xFFFF
_COMMANDS_PER_LINE: Final = 200
#: heartbeats of one pile awaiting their reply that are remembered (the rest go unmeasured)
_AWAITED_MAX: Final = 32


@dataclasses.dataclass(frozen=True, slots=True)
class GeneratorConfig:
    """What one generator process simulates (serialised as JSON on its command line)."""

    host: str
    port: int
    ap3000_start: int = 1
    ap3000_count: int = 0
    ap3000_ports: int = 2
    bkv_start: int = 1
    bkv_count: int = 0
    bkv_sockets: int = 2
    #: client sockets are bound to these addresses, pile by pile in turn
    source_addrs: tuple[str, ...] = ("127.0.0.1",)
    #: index of this generator's first pile in the whole fleet (spreads addresses evenly)
    addr_offset: int = 0
    accel: float = 1.0
    jitter: float = 0.1
    ap3000_heartbeat_s: float = 180.0
    bkv_heartbeat_s: float = 60.0
    bkv_status_s: float = 300.0
    #: first connections spread over this many real seconds
    ramp_s: float = 10.0
    seed: int = 0
    stats_interval_s: float = 1.0
    connect_timeout_s: float = 10.0
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    #: timer wheel resolution
    tick_s: float = 0.05

    @classmethod
    def from_json(cls, text: str) -> GeneratorConfig:
        """Parse the JSON form (lists become tuples)."""
        data = json.loads(text)
        data["source_addrs"] = tuple(data.get("source_addrs", ("127.0.0.1",)))
        return cls(**data)

    def to_json(self) -> str:
        """The JSON form for the command line."""
        return json.dumps(dataclasses.asdict(self))

    @property
    def piles(self) -> int:
        return self.ap3000_count + self.bkv_count


@dataclasses.dataclass(slots=True)
class Counters:
    """What a generator counts; sent in every stats line."""

    connects: int = 0
    connect_failures: int = 0
    #: connections the server closed (EOF) or that broke (reset), not asked for
    closed_by_server: int = 0
    connection_errors: int = 0
    frames_out: int = 0
    frames_in: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    decode_errors: int = 0
    #: decodable input a pile does not expect (an ICCID or ``link`` from the server)
    unexpected: int = 0
    heartbeats: int = 0
    heartbeats_unanswered: int = 0
    registrations_resent: int = 0
    time_replies: int = 0
    status_acks: int = 0
    commands: int = 0
    commands_ignored: int = 0
    storm_dropped: int = 0
    storm_back: int = 0


class TimerWheel:
    """One timer for every pile: buckets of piles per tick, one ``call_later`` chain.

    A pile has at most one pending timer (``pile.timer_tick``); rescheduling leaves the
    old entry in its bucket, where it is skipped as stale.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, tick_s: float, fire: Callable[[LoadPile], None]
    ) -> None:
        self.loop = loop
        self.tick_s = tick_s
        self.fire = fire
        self._buckets: dict[int, list[LoadPile]] = {}
        self._current = self._tick_of(loop.time())
        self._handle: asyncio.TimerHandle | None = loop.call_later(tick_s, self._run)

    def _tick_of(self, t: float) -> int:
        return int(t / self.tick_s)

    def schedule(self, pile: LoadPile, delay_s: float) -> None:
        """Fire ``pile`` in ``delay_s`` seconds (at the next tick at the earliest)."""
        due = self.loop.time() + delay_s
        tick = max(self._tick_of(due), self._current + 1)
        pile.due = due
        if tick == pile.timer_tick:  # moved within its tick: the entry stands
            return
        pile.timer_tick = tick
        bucket = self._buckets.get(tick)
        if bucket is None:
            self._buckets[tick] = [pile]
        else:
            bucket.append(pile)

    def _run(self) -> None:
        now = self._tick_of(self.loop.time())
        while self._current <= now:
            tick = self._current
            self._current += 1
            bucket = self._buckets.pop(tick, None)
            if bucket:
                for pile in bucket:
                    if pile.timer_tick == tick:
                        pile.timer_tick = -1
                        self.fire(pile)
        self._handle = self.loop.call_later(self.tick_s, self._run)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._buckets.clear()


class LoadPile(asyncio.BufferedProtocol, metaclass=abc.ABCMeta):
    """One simulated device connection; protocol subclasses send and answer frames."""

    __slots__ = (
        "addr",
        "decoder",
        "delay",
        "due",
        "failures",
        "gen",
        "hb_awaited",
        "hb_id",
        "hb_sent_at",
        "ident",
        "number",
        "online",
        "since",
        "state",
        "storm",
        "timer_tick",
        "transport",
    )
    protocol: ClassVar[str]

    def __init__(self, gen: Generator, number: int, ident: bytes, addr: str) -> None:
        self.gen = gen
        self.number = number
        self.ident = ident
        self.addr = addr
        self.transport: asyncio.Transport | None = None
        self.decoder: Any = None
        self.state = IDLE
        self.timer_tick = -1
        #: loop time the pending timer is due at
        self.due = 0.0
        self.failures = 0
        self.since = 0.0
        self.online = False
        #: the oldest heartbeat awaiting its reply: when it was sent (0: none) and its id
        self.hb_sent_at = 0.0
        self.hb_id = 0
        #: later heartbeats awaiting theirs, oldest first: (sent at, id)
        self.hb_awaited: list[tuple[float, int]] | None = None
        #: dropped by a reconnect storm and not online again yet
        self.storm = False
        #: reconnect delay chosen by a storm (negative: none)
        self.delay = -1.0

    # --- asyncio callbacks -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.gen.on_connected(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.gen.view

    def buffer_updated(self, nbytes: int) -> None:
        gen = self.gen
        counters = gen.counters
        counters.bytes_in += nbytes
        for event in self.decoder.feed(gen.view[:nbytes]):
            if type(event) is MessageReceived:
                counters.frames_in += 1
                self.on_message(event.message)
            elif isinstance(event, StreamError):
                counters.decode_errors += 1
            else:
                counters.unexpected += 1

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.gen.on_lost(self, exc)

    # --- protocol hooks --------------------------------------------------------------

    @abc.abstractmethod
    def new_decoder(self) -> Any:
        """A stream decoder for what the server sends."""

    @abc.abstractmethod
    def opening(self) -> None:
        """Send what the device sends right after connecting."""

    @abc.abstractmethod
    def beat(self) -> None:
        """The periodic traffic (heartbeat, status)."""

    @abc.abstractmethod
    def interval_s(self) -> float:
        """Pile seconds between two beats."""

    @abc.abstractmethod
    def on_message(self, message: Message) -> None:
        """Handle one decoded frame from the server."""

    @abc.abstractmethod
    def answer(self, message: Message) -> list[bytes | bytearray]:
        """The frames that answer a server command (none: ignored)."""

    def heartbeat_sent(self, hb_id: int) -> None:
        """Note a heartbeat just written (``hb_id``: its AP3000 msg id; 0 for BKV)."""
        now = time.monotonic()
        counters = self.gen.counters
        counters.heartbeats += 1
        if not self.hb_sent_at:
            self.hb_sent_at, self.hb_id = now, hb_id
            return
        counters.heartbeats_unanswered += 1
        awaited = self.hb_awaited
        if awaited is None:
            self.hb_awaited = [(now, hb_id)]
        elif len(awaited) < _AWAITED_MAX:
            awaited.append((now, hb_id))

    def heartbeat_answered(self, hb_id: int | None) -> None:
        """Record the round trip of the heartbeat a reply answers: the one with ``hb_id``
        (AP3000 echoes the msg id; older ones still awaited are given up), or, for
        ``None`` (BKV replies echo seq 0), the oldest: the server answers in order."""
        if not self.hb_sent_at:
            return
        sent_at = self.hb_sent_at
        awaited = self.hb_awaited
        if hb_id is not None and hb_id != self.hb_id:
            if awaited is None:
                return
            for index, (at, pending_id) in enumerate(awaited):
                if pending_id == hb_id:
                    sent_at = at
                    del awaited[: index + 1]
                    break
            else:
                return  # not a heartbeat of ours (one sent to answer a 0x81 query)
        self.gen.record_rtt((time.monotonic() - sent_at) * 1000.0)
        if awaited:
            self.hb_sent_at, self.hb_id = awaited.pop(0)
            if not awaited:
                self.hb_awaited = None
        else:
            self.hb_sent_at, self.hb_awaited = 0.0, None

    def awaited(self) -> int:
        """Heartbeats sent and not answered yet."""
        if not self.hb_sent_at:
            return 0
        return 1 + (len(self.hb_awaited) if self.hb_awaited else 0)

    def write(self, data: bytes | bytearray, count: int) -> None:
        """Send ``count`` frames in one write."""
        transport = self.transport
        if transport is None:
            return
        transport.write(data)
        counters = self.gen.counters
        counters.frames_out += count
        counters.bytes_out += len(data)


class Ap3000LoadPile(LoadPile):
    """An AP3000 pile: ICCID, 0x20 until answered, 0x22, 0x21 heartbeats, all ports idle."""

    __slots__ = ("msg_id", "reg_id")
    protocol = "ap3000"

    def __init__(self, gen: Generator, number: int, ident: bytes, addr: str) -> None:
        super().__init__(gen, number, ident, addr)
        self.msg_id = 0
        self.reg_id = 0

    def next_id(self) -> int:
        self.msg_id = self.msg_id % _U16 + 1
        return self.msg_id

    def new_decoder(self) -> Any:
        return ap3000.Ap3000StreamDecoder("down")

    def interval_s(self) -> float:
        return self.gen.config.ap3000_heartbeat_s

    def opening(self) -> None:
        t = self.gen.ap
        _, _, iccid = frames.ap3000_identity(self.number, t.ports)
        self.reg_id = self.next_id()
        registration = t.registration.build(self.ident, self.reg_id)
        time_request = t.time_request.build(self.ident, self.next_id())
        hb_id = self.next_id()
        data = b"".join((iccid, registration, time_request, t.heartbeat.build(self.ident, hb_id)))
        self.write(data, 3)
        self.heartbeat_sent(hb_id)

    def beat(self) -> None:
        gen = self.gen
        hb_id = self.next_id()
        frame = gen.ap.heartbeat.build(self.ident, hb_id)
        if not self.online:  # 0x20 again, same msg id, until answered (ap3000.md 3)
            gen.counters.registrations_resent += 1
            frame = gen.ap.registration.build(self.ident, self.reg_id) + frame
            self.write(frame, 2)
        else:
            self.write(frame, 1)
        self.heartbeat_sent(hb_id)

    def on_message(self, message: Message) -> None:
        kind = type(message)
        gen = self.gen
        if kind is ap3000.HeartbeatReply:
            assert isinstance(message, ap3000.HeartbeatReply)
            self.heartbeat_answered(message.msg_id)
        elif kind is ap3000.RegistrationReply:
            assert isinstance(message, ap3000.RegistrationReply)
            if message.msg_id == self.reg_id and message.result == 0 and not self.online:
                gen.set_online(self)
        elif kind is ap3000.TimeReply:
            gen.counters.time_replies += 1
        else:
            gen.on_command(self, message)

    def answer(self, m: Message) -> list[bytes | bytearray]:
        """Replies to a server command (the load piles do not charge)."""
        if not isinstance(m, ap3000.Ap3000Message) or isinstance(m, ap3000.UnknownMessage):
            return []
        phy, mid = m.phy_id, m.msg_id
        if isinstance(m, ap3000.Locate):
            return [ap3000.encode(ap3000.LocateReply(phy, mid, result=0))]
        if isinstance(m, ap3000.QueryStatus):  # no reply of its own: 0x20 and 0x21 follow
            t = self.gen.ap
            return [
                t.registration.build(self.ident, self.next_id()),
                t.heartbeat.build(self.ident, self.next_id()),
            ]
        if isinstance(m, ap3000.ChargeControl):
            # start: 1 "no charger plugged"; stop: 2 "port idle"
            result = 1 if m.charge_command == 1 else 2
            reply = ap3000.ChargeControlReply(
                phy, mid, result=result, order_id=m.order_id, port=m.port, waiting_ports=0
            )
            return [ap3000.encode(reply)]
        if isinstance(m, ap3000.ModifyChargeLimit):
            return [ap3000.encode(ap3000.ModifyChargeLimitReply(phy, mid, result=1))]
        reply_cls = ap3000.message_class(m.command, "up")
        if reply_cls is not None and issubclass(reply_cls, ap3000.ResultReply):
            return [ap3000.encode(reply_cls(phy, mid, result=0))]
        return []


class BkvLoadPile(LoadPile):
    """A BKV gateway: heartbeat, 0x1013 and a status cluster per socket on connecting,
    then heartbeats and, every ``bkv_status_s``, status clusters (all jacks idle)."""

    __slots__ = ("beats",)
    protocol = "bkv"

    def __init__(self, gen: Generator, number: int, ident: bytes, addr: str) -> None:
        super().__init__(gen, number, ident, addr)
        self.beats = 0

    def new_decoder(self) -> Any:
        return bkv.BkvStreamDecoder()

    def interval_s(self) -> float:
        return self.gen.config.bkv_heartbeat_s

    def _iccid(self) -> bytes:
        return frames.bkv_identity(self.number)[2]

    def opening(self) -> None:
        t = self.gen.bk
        iccid = self._iccid()
        parts = [t.heartbeat.build(self.ident, 0, iccid)]
        parts.extend(r.build(self.ident) for r in t.connect_reports)
        parts.extend(s.build(self.ident) for s in t.status_clusters)
        self.beats = 0
        self.write(b"".join(parts), len(parts))
        self.heartbeat_sent(0)

    def beat(self) -> None:
        gen = self.gen
        t = gen.bk
        parts = [t.heartbeat.build(self.ident, 0, self._iccid())]
        self.beats += 1
        if self.beats % gen.status_every == 0:
            parts.extend(s.build(self.ident) for s in t.status_clusters)
        self.write(b"".join(parts), len(parts))
        self.heartbeat_sent(0)

    def on_message(self, message: Message) -> None:
        kind = type(message)
        gen = self.gen
        if kind is bkv.HeartbeatReply:
            self.heartbeat_answered(None)
            if not self.online:
                gen.set_online(self)
        elif kind is bkv.StatusClusterAck:
            gen.counters.status_acks += 1
        else:
            gen.on_command(self, message)

    def answer(self, m: Message) -> list[bytes | bytearray]:
        """Replies to a server command (the load gateways' jacks are idle)."""
        if not isinstance(m, bkv.BkvMessage):
            return []
        gw, seq = m.gateway_id, m.seq
        reply: bkv.BkvMessage
        if isinstance(m, bkv.SocketQuery):
            reply = frames.bkv_socket_state(gw, seq, m.socket)
        elif isinstance(m, bkv.ChargeControl):  # result 0: no charger plugged
            reply = bkv.ChargeControlReply(
                gw, seq, result=0, socket=m.socket, port=m.port, business_no=0
            )
        elif isinstance(m, bkv.VoiceWindow):
            reply = bkv.VoiceWindowReply(gw, seq, socket=m.socket, port=m.port, result=1)
        elif isinstance(m, bkv.NodeListRefresh):
            reply = bkv.NodeListRefreshReply(gw, seq, result=1)
        elif isinstance(m, bkv.NodeAdd):
            reply = bkv.NodeAddReply(gw, seq, result=1)
        elif isinstance(m, bkv.SetParams):
            socket_no = m.socket if isinstance(m.socket, int) else 0
            reply = bkv.SetParamsReply.create(gw, seq, socket=socket_no, result=1)
        elif isinstance(m, bkv.QueryParams):
            socket_no = m.socket if isinstance(m.socket, int) else 0
            reply = bkv.ParamsReport.create(gw, seq, socket=socket_no, result=1, **DEFAULT_PARAMS)
        else:
            return []
        return [bkv.encode(reply)]


def _device_of(pile: LoadPile, message: Message) -> str:
    if isinstance(message, bkv.BkvMessage):
        socket_no = getattr(message, "socket", ABSENT)
        if isinstance(socket_no, int):
            return bkv_device_id(message.gateway_id, socket_no)
        return message.gateway_id
    return str(getattr(message, "phy_id", pile.number))


def _correlation(message: Message) -> int | None:
    if isinstance(message, bkv.BkvMessage):
        return message.seq
    msg_id = getattr(message, "msg_id", None)
    return msg_id if isinstance(msg_id, int) else None


class Generator:
    """All piles of one process, their timer wheel and their counters."""

    def __init__(
        self,
        config: GeneratorConfig,
        out: Callable[[dict[str, Any]], None],
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """``loop``: the running one by default (a test passes one with its own clock)."""
        self.config = config
        self.out = out
        self.loop = loop if loop is not None else asyncio.get_running_loop()
        self.rng = random.Random(config.seed)
        self.counters = Counters()
        #: heartbeat round trips since the start, and since the last stats line
        self.rtt = Histogram()
        self.rtt_window = Histogram()
        #: time acceleration now (``rate`` changes it)
        self.accel = config.accel
        self.ap = frames.Ap3000Frames(config.ap3000_ports)
        self.bk = frames.BkvFrames(config.bkv_sockets)
        frames.check_templates(self.ap, self.bk, max(config.ap3000_start, config.bkv_start))
        self.status_every = max(1, round(config.bkv_status_s / config.bkv_heartbeat_s))
        self._buffer = bytearray(_READ_BUFFER)
        self.view = memoryview(self._buffer)
        self.connected = 0
        self.online = 0
        self.stopping = False
        self.storm_last_back: float | None = None
        self.last_error: str | None = None
        self.commands: list[dict[str, Any]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.wheel = TimerWheel(self.loop, config.tick_s, self._fire)
        self.piles: list[LoadPile] = []
        addrs = config.source_addrs
        index = config.addr_offset
        for number in range(config.ap3000_start, config.ap3000_start + config.ap3000_count):
            _, phy, _ = frames.ap3000_identity(number, config.ap3000_ports)
            self.piles.append(Ap3000LoadPile(self, number, phy, addrs[index % len(addrs)]))
            index += 1
        for number in range(config.bkv_start, config.bkv_start + config.bkv_count):
            _, gw, _ = frames.bkv_identity(number)
            self.piles.append(BkvLoadPile(self, number, gw, addrs[index % len(addrs)]))
            index += 1

    # --- timing ------------------------------------------------------------------------

    def spread(self, pile_s: float) -> float:
        """Real seconds for ``pile_s`` pile seconds, with jitter."""
        jitter = self.config.jitter
        return pile_s / self.accel * (1.0 + self.rng.uniform(-jitter, jitter))

    def set_rate(self, accel: float) -> int:
        """Change the time acceleration of every pile at once; return the piles moved.

        The time left to each connected pile's next beat is scaled by old / new: the
        piles keep their phases, so the offered rate steps to the new one without a
        burst or a gap, and every later beat (status clusters too) follows the new
        interval. Connection attempts and backoffs are real time and stay as they are.
        """
        if not accel > 0:
            raise ValueError(f"accel must be positive, not {accel}")
        factor = self.accel / accel
        self.accel = accel
        now = self.loop.time()
        moved = 0
        for pile in self.piles:
            if pile.state == CONNECTED and pile.timer_tick >= 0:
                self.wheel.schedule(pile, max(0.0, pile.due - now) * factor)
                moved += 1
        return moved

    def backoff(self, failures: int) -> float:
        c = self.config
        base = min(c.reconnect_max_s, c.reconnect_min_s * 2.0 ** max(0, failures - 1))
        return base * (1.0 + self.rng.uniform(-0.5, 0.5))

    def _fire(self, pile: LoadPile) -> None:
        if self.stopping:
            return
        if pile.state == CONNECTED:
            pile.beat()
            # from when this beat was due, not from the tick that fired it: the tick's
            # lateness would lengthen every interval (by 25 ms on average, a tenth of a
            # 250 ms interval); a pile late by more than an interval does not catch up
            due = pile.due + self.spread(pile.interval_s())
            self.wheel.schedule(pile, max(0.0, due - self.loop.time()))
        elif pile.state in (IDLE, WAITING):
            self.connect(pile)

    # --- connections -------------------------------------------------------------------

    def start(self) -> None:
        """Connect every pile once, spread over the ramp."""
        ramp = self.config.ramp_s
        for pile in self.piles:
            self.wheel.schedule(pile, self.rng.uniform(0.0, ramp))

    def connect(self, pile: LoadPile) -> None:
        pile.state = CONNECTING
        task = self.loop.create_task(self._connect(pile))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, pile: LoadPile) -> None:
        c = self.config
        sock = _client_socket(pile.addr)
        try:
            async with asyncio.timeout(c.connect_timeout_s):
                await self.loop.sock_connect(sock, (c.host, c.port))
                await self.loop.create_connection(lambda: pile, sock=sock)
        except (OSError, TimeoutError) as exc:
            sock.close()
            self.counters.connect_failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            if self.stopping:
                pile.state = STOPPED
                return
            pile.state = WAITING
            pile.failures += 1
            self.wheel.schedule(pile, self.backoff(pile.failures))

    def on_connected(self, pile: LoadPile) -> None:
        self.counters.connects += 1
        self.connected += 1
        pile.state = CONNECTED
        pile.since = self.loop.time()
        pile.decoder = pile.new_decoder()
        pile.hb_sent_at, pile.hb_awaited = 0.0, None
        if self.stopping:
            assert pile.transport is not None
            pile.transport.abort()
            return
        pile.opening()
        self.wheel.schedule(pile, self.spread(pile.interval_s()))

    def set_online(self, pile: LoadPile) -> None:
        pile.online = True
        self.online += 1
        if pile.storm:
            pile.storm = False
            self.counters.storm_back += 1
            self.storm_last_back = time.time()

    def on_lost(self, pile: LoadPile, exc: Exception | None) -> None:
        if pile.state != CONNECTED:
            return
        self.connected -= 1
        if pile.online:
            pile.online = False
            self.online -= 1
        pile.transport = None
        pile.decoder = None
        pile.timer_tick = -1
        pile.hb_sent_at, pile.hb_awaited = 0.0, None
        if self.stopping:
            pile.state = STOPPED
            return
        pile.state = WAITING
        if pile.delay >= 0:  # dropped on purpose by a storm
            delay, pile.delay = pile.delay, -1.0
            pile.failures = 0
        else:
            if exc is None:
                self.counters.closed_by_server += 1
            else:
                self.counters.connection_errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
            if self.loop.time() - pile.since > STABLE_AFTER_S:
                pile.failures = 0
            pile.failures += 1
            delay = self.backoff(pile.failures)
        self.wheel.schedule(pile, delay)

    def storm(self, count: int, window_s: float) -> int:
        """Drop ``count`` connected piles at once (with a reset, as a lost network
        does); each reconnects at a random moment within ``window_s``."""
        connected = [p for p in self.piles if p.state == CONNECTED]
        chosen = self.rng.sample(connected, min(count, len(connected)))
        for pile in chosen:
            pile.storm = True
            pile.delay = self.rng.uniform(0.0, window_s)
            _reset(pile.transport)
        self.counters.storm_dropped += len(chosen)
        return len(chosen)

    async def stop(self) -> None:
        """Close every connection (reset: no TIME_WAIT left behind) and stop."""
        self.stopping = True
        self.wheel.close()
        for pile in self.piles:
            if pile.transport is not None:
                _reset(pile.transport)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for _ in range(50):  # connection_lost callbacks come one loop turn later
            if self.connected == 0:
                break
            await asyncio.sleep(0.02)

    # --- commands from the server ------------------------------------------------------

    def on_command(self, pile: LoadPile, message: Message) -> None:
        received = time.time()
        replies = pile.answer(message)
        replied = time.time()  # the ACK is ready: once written, the server may see it at once
        for reply in replies:
            pile.write(reply, 1)
        self.counters.commands += 1
        if not replies:
            self.counters.commands_ignored += 1
        wire = getattr(message, "wire_command", None)
        if wire is None:
            wire = getattr(message, "command", None)
        self.commands.append(
            {
                "device": _device_of(pile, message),
                "protocol": pile.protocol,
                "message": type(message).__name__,
                "command": wire,
                "correlation": _correlation(message),
                "received": received,
                "replied": replied if replies else None,
            }
        )

    # --- reporting ---------------------------------------------------------------------

    def snapshot(self, kind: str) -> dict[str, Any]:
        """A stats line: counters, connections, process figures."""
        return {
            "type": kind,
            "t": time.time(),
            "piles": len(self.piles),
            "connected": self.connected,
            "online": self.online,
            "accel": self.accel,
            **dataclasses.asdict(self.counters),
            "storm_last_back": self.storm_last_back,
            "rss_kib": rss_kib(),
            "cpu_s": cpu_seconds(),
            "last_error": self.last_error,
        }

    def flush_commands(self) -> None:
        """Report the commands received since the last report (in lines of 200)."""
        for at in range(0, len(self.commands), _COMMANDS_PER_LINE):
            self.out({"type": "commands", "items": self.commands[at : at + _COMMANDS_PER_LINE]})
        self.commands = []

    def record_rtt(self, ms: float) -> None:
        """One heartbeat round trip, in milliseconds."""
        self.rtt.add(ms)
        self.rtt_window.add(ms)

    def flush(self, window_end: float) -> None:
        """Report the commands, then a stats line that closes the window ending at
        ``window_end``: its round trips, and the heartbeats awaiting a reply now."""
        self.flush_commands()
        line = self.snapshot("stats")
        line["window_end"] = window_end
        line["rtt_window"] = self.rtt_window.to_json()
        line["heartbeats_awaited"] = sum(pile.awaited() for pile in self.piles)
        self.rtt_window = Histogram()
        self.out(line)


async def _stats_loop(gen: Generator) -> None:
    # on whole multiples of the interval (wall clock), so that the windows of every
    # generator end together and the runner can add them up second by second
    interval = gen.config.stats_interval_s
    due = (time.time() // interval + 1) * interval
    while True:
        await asyncio.sleep(max(0.0, due - time.time()))
        gen.flush(due)
        due += interval
        now = time.time()
        if due <= now:  # this process fell behind by a whole window: skip it
            due = (now // interval + 1) * interval


#: Linux: choose the source port at connect(), not at bind(); without it every bind to
#: (address, 0) scans the address's used ports, which with tens of thousands of connections
#: per source address spends most of the generator's time in the kernel
_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def _client_socket(addr: str) -> socket.socket:
    """A non-blocking TCP socket bound to source address ``addr``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        with contextlib.suppress(OSError):  # not Linux: bind() picks the port itself
            sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((addr, 0))
    except OSError:
        sock.close()
        raise
    return sock


def _reset(transport: asyncio.Transport | None) -> None:
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


def _print(item: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(item, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def run(config: GeneratorConfig) -> None:
    """Build the piles, report ``ready``, then follow the commands on stdin."""
    limit = raise_open_files_limit()
    gen = Generator(config, _print)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    _print({**gen.snapshot("ready"), "open_files_limit": limit})
    stats: asyncio.Task[None] | None = None
    try:
        while True:
            line = await reader.readline()
            if not line:
                break  # the runner went away
            command = json.loads(line)
            name = command.get("cmd")
            if name == "start" and stats is None:
                gen.start()
                stats = asyncio.create_task(_stats_loop(gen))
            elif name == "storm":
                dropped = gen.storm(int(command["count"]), float(command["window"]))
                _print({"type": "storm", "t": time.time(), "dropped": dropped})
            elif name == "rate":
                moved = gen.set_rate(float(command["accel"]))
                _print({"type": "rate", "t": time.time(), "accel": gen.accel, "moved": moved})
            elif name == "rtt":  # the round trips so far, to cut windows out of
                _print({"type": "rtt", "t": time.time(), "rtt": gen.rtt.to_json()})
            elif name == "stop":
                break
    finally:
        if stats is not None:
            stats.cancel()
        await gen.stop()
        final = gen.snapshot("final")
        final["rtt"] = gen.rtt.to_json()
        gen.flush_commands()
        _print(final)


def main(argv: list[str] | None = None) -> None:
    """``python -m chargesim.loadtest.piles CONFIG_JSON``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python -m chargesim.loadtest.piles CONFIG_JSON")
    config = GeneratorConfig.from_json(args[0])
    try:
        import uvloop
    except ImportError:
        asyncio.run(run(config))
    else:
        uvloop.run(run(config))


if __name__ == "__main__":
    main()
