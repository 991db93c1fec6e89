"""The device TCP server: one BufferedProtocol per connection, both protocols on one port.

Received bytes go straight into the connection's chargeproto stream decoder; events are
handed to the handler synchronously (nothing awaits inside ``buffer_updated``).
Writes go through a small per-connection queue ordered by priority (control before
queries before replies) and bounded in bytes: when a peer does not read, its queue
fills, and then reading from that peer is paused, so a slow reader cannot grow memory.

Memory per connection is kept small for tens of thousands of piles: all connections of
a process read into one shared buffer (the decoder copies what it keeps before the
callback returns), and write queues exist only while a peer is not keeping up.

Hygiene: new connections beyond ``accept_rate`` per second or ``max_connections`` are
closed at once, and so are connections from outside ``allowed_networks`` (before anything
is read) and one more from a source address that already holds
``max_unidentified_per_source`` connections that have not identified themselves. A
connection identifies itself with its first complete valid frame (one the codec decodes;
an ICCID preamble, a keepalive or garbage do not count); one that has not within
``identify_timeout_s`` of its accept is closed. Connections are refused (closed) through
:meth:`DeviceServer.refuse`: counted by rule, logged at debug level with an info summary
at most every ``REFUSAL_SUMMARY_S``.

Frames are handed to the handler only as a token bucket per connection (``frame_rate``)
and one per process (``process_frame_rate``) allow, whole frames only: what one read
decodes beyond that waits in the connection's backlog, reading from it is paused (so at
most one read's worth waits, the rest stays in TCP), and one timer per connection hands
the backlog over as tokens refill. Nothing is dropped while the peer stays connected;
once its transport is closing, the backlog is dropped and nothing more is handed over
or written.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import itertools
import os
import resource
import socket
import time
from collections.abc import Sequence
from typing import Any, Protocol

import structlog

from chargegw.config import IPNetwork, peer_address
from chargegw.metrics import Metrics
from chargeproto import Event, MessageReceived, StreamDecoder

log = structlog.get_logger("chargegw.net.transport")

#: write priorities, lowest value first
CONTROL, QUERY, REPLY = 0, 1, 2

_READ_BUFFER = 65536
#: the shortest wait between two hand-overs from a backlog: at high rates a tick hands
#: over several frames rather than one timer callback per frame
_MIN_TICK = 0.02
#: file descriptors kept free for the database pool, listeners, logs ...
FD_RESERVE = 200
#: refusals are logged one by one at debug level, and summed up at info level at most
#: this often (a flood of silent sockets must not flood the log)
REFUSAL_SUMMARY_S = 10.0
_ids = itertools.count(1)


def bound_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A TCP socket bound to ``host:port`` (not listening yet). With ``reuse_port`` several
    processes bind the same port and the kernel spreads new connections over them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def connection_limit(configured: int) -> tuple[int, int]:
    """The effective connection limit and the open-file limit it was derived from.

    The soft open-file limit is raised to the hard one; ``configured`` 0 means "as many
    as that allows" (the limit minus ``FD_RESERVE``), and a larger configured value is
    capped to it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard not in (soft, resource.RLIM_INFINITY):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    files = soft if soft != resource.RLIM_INFINITY else 1 << 20
    allowed = max(files - FD_RESERVE, 1)
    return (allowed if configured <= 0 else min(configured, allowed)), files


class Handler(Protocol):
    """What the transport calls; implemented by the gateway service."""

    def on_open(self, link: DeviceLink) -> None: ...

    def on_events(self, link: DeviceLink, events: list[Event]) -> None: ...

    def on_closed(self, link: DeviceLink, reason: str) -> None: ...


class DeviceLink(asyncio.BufferedProtocol):
    """One device connection (a pile, a host, or a BKV gateway)."""

    __slots__ = (
        "_backlog",
        "_backlog_at",
        "_decoder",
        "_queue",
        "_queued",
        "_reading_paused_by",
        "_timer",
        "_tokens",
        "_tokens_at",
        "_transport",
        "_write_paused",
        "accepted_at",
        "close_reason",
        "closed",
        "driver_state",
        "errors",
        "gateway",
        "iccid",
        "id",
        "identified",
        "last_rx",
        "notes",
        "pending_iccid",
        "protocol",
        "remote",
        "reported",
        "server",
        "source",
    )

    def __init__(self, server: DeviceServer) -> None:
        self.server = server
        self.id = f"{server.node_prefix}{next(_ids)}"
        self.remote = ""
        #: the peer's address (IPv4-mapped IPv6 as IPv4), without the port
        self.source = ""
        self.accepted_at = time.monotonic()
        #: a complete valid frame has arrived (see the module docstring)
        self.identified = False
        #: what the gateway noted about this connection once (not to log it again)
        self.notes: set[str] | None = None
        self.iccid: str | None = None
        #: an ICCID the gateway has not bound yet (see ``Gateway._iccid_waits``)
        self.pending_iccid: str | None = None
        self.protocol: str | None = None
        #: the gateway this connection speaks for, once a frame named it (the BKV
        #: gateway; the AP3000 host, else the first pile)
        self.gateway: str | None = None
        #: protocol-specific state kept by the driver (an object with slots of its own:
        #: a dict cost about 200 bytes per connection)
        self.driver_state: Any = None
        #: devices that have reported on this connection (a device's first report on a
        #: connection is a reconnect, for the engines that read values back)
        self.reported: set[str] | None = None
        self.closed = False
        self.close_reason = "peer closed"
        self.errors = 0
        self.last_rx = time.monotonic()
        self._transport: asyncio.Transport | None = None
        self._decoder = StreamDecoder(ap3000_max_frame=server.max_frame)
        #: per-priority write queues, created when a peer first falls behind
        self._queue: list[collections.deque[bytes]] | None = None
        self._queued = 0
        self._write_paused = False
        self._reading_paused_by: set[str] | None = None
        self._tokens = server.frame_burst
        self._tokens_at = self.last_rx
        #: decoded events the frame budgets did not allow yet, from ``_backlog_at`` on;
        #: None in the common case. Reading is paused while it exists.
        self._backlog: list[Event] | None = None
        self._backlog_at = 0
        #: the one timer that hands the backlog over as tokens refill
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio callbacks --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without inheriting from it
        self._transport = tcp = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.remote = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        host = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        address = peer_address(host)
        self.source = host if address is None else str(address)
        tcp.set_write_buffer_limits(high=self.server.write_queue_limit)  # type: ignore[attr-defined]
        refusal = self.server.admit(self, address)
        if refusal:
            self.server.refuse(self, refusal)
            return
        self.server.handler.on_open(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.server.read_view

    def buffer_updated(self, nbytes: int) -> None:
        if self.closed:
            return
        now = time.monotonic()
        self.last_rx = now
        server = self.server
        events = self._decoder.feed(server.read_view[:nbytes])
        if not events:
            return
        if not self.identified and any(isinstance(e, MessageReceived) for e in events):
            self.identified = True
            server.drop_unidentified(self)
        if self._backlog is not None:
            # reading is paused while a backlog exists; a read already under way joins it
            self._backlog.extend(events)
            return
        granted = self._grant(len(events), now)
        if granted == len(events):  # the common case: within budget, no copy
            server.handler.on_events(self, events)
        else:
            self._defer(events, granted)

    def _grant(self, wanted: int, now: float) -> int:
        """Spend tokens for up to ``wanted`` frames; how many both budgets allow now.

        Whole frames only, and tokens never go negative: the frames handed over in any
        window of ``w`` seconds are at most ``burst + rate * w``, however large a read.
        """
        server = self.server
        rate = server.frame_rate
        tokens = 0.0
        if rate > 0:
            tokens = self._tokens + (now - self._tokens_at) * rate
            tokens = min(tokens, server.frame_burst)
            if tokens < wanted:
                wanted = int(tokens) if tokens > 0 else 0
        if server.process_frame_rate > 0:
            wanted = server.grant_process(wanted, now)
        if rate > 0:
            self._tokens = tokens - wanted
            self._tokens_at = now
        return wanted

    def _defer(self, events: list[Event], granted: int) -> None:
        """Over budget: hand over the ``granted`` first events, keep the rest, pause
        reading until they are worked off."""
        server = self.server
        # the connection's bucket limited this read if it has no whole token left
        scope = "connection" if server.frame_rate > 0 and self._tokens < 1 else "process"
        server.metrics.frames_throttled_total.labels(scope=scope).inc()
        self._backlog = events
        self._backlog_at = granted
        server.backlogs += 1
        self.pause_reading("frame rate")
        if granted:
            server.handler.on_events(self, events[:granted])
        self._after_hand_over()

    def _drain(self) -> None:
        """The timer: hand over as much of the backlog as the budgets allow now."""
        self._timer = None
        backlog = self._backlog
        if backlog is None:
            return
        if self._gone():
            return
        if len(self._reading_paused_by or ()) > 1:
            # also paused for the write queue or the database: hold the backlog too
            # (resume_reading re-arms), so those pauses bound what is handed over
            return
        now = time.monotonic()
        start = self._backlog_at
        granted = self._grant(len(backlog) - start, now)
        if granted:
            self._backlog_at = start + granted
            self.last_rx = now  # frames still being worked off: not idle
            self.server.handler.on_events(self, backlog[start : start + granted])
        self._after_hand_over()

    def _after_hand_over(self) -> None:
        """Finish the backlog if it is worked off, else arm the timer for the next
        hand-over; drop it if the connection went away meanwhile."""
        backlog = self._backlog
        if backlog is None or self._gone():
            return
        if self._backlog_at >= len(backlog):
            self._backlog = None
            self.server.backlogs -= 1
            if self._timer is not None:  # armed by a resume_reading inside the handler
                self._timer.cancel()
                self._timer = None
            self.resume_reading("frame rate")
        else:
            self._arm()

    def _arm(self) -> None:
        """Arm the link's one timer for its next share of both budgets (never sooner
        than ``_MIN_TICK``: a backlog costs a bounded number of callbacks, not a spin)."""
        if self._timer is not None:
            return
        now = time.monotonic()
        server = self.server
        wait = server.process_wait(now)
        rate = server.frame_rate
        if rate > 0:
            wait = max(wait, (1.0 - self._tokens - (now - self._tokens_at) * rate) / rate)
        self._timer = asyncio.get_running_loop().call_later(max(wait, _MIN_TICK), self._drain)

    def _gone(self) -> bool:
        """True once the connection is closed or its transport is closing (a write
        failed, the peer reset it); the first time, it is marked closed."""
        if self.closed:
            return True
        transport = self._transport
        if transport is None or not transport.is_closing():
            return False
        self._lost()
        return True

    def _lost(self) -> None:
        """Closed or closing: ``closed`` tells the handler's per-event loop to stop, the
        backlog is dropped and its timer cancelled."""
        self.closed = True
        if not self.identified:
            self.server.drop_unidentified(self)
        if self._backlog is not None:
            self._backlog = None
            self.server.backlogs -= 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def eof_received(self) -> bool:
        # returning False closes the transport: nothing more is handed over or written
        self._lost()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.close_reason == "peer closed":
            self.close_reason = "connection error"
        self._lost()
        if self.server.forget(self):
            self.server.handler.on_closed(self, self.close_reason)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._flush()

    # -- used by the gateway --

    @property
    def buffered(self) -> int:
        """Bytes received that do not form a complete frame yet."""
        return int(self._decoder.buffered)

    @property
    def reading_paused(self) -> bool:
        """Reading from the peer is paused (for any reason)."""
        return bool(self._reading_paused_by)

    @property
    def queued(self) -> int:
        """Bytes waiting in the write queue for a peer that reads too slowly."""
        return self._queued

    def send(self, data: bytes, priority: int = REPLY) -> None:
        """Queue ``data`` for the peer; control frames overtake queued replies.

        Nothing is written once the transport is closing (a failed write, a reset):
        the link is marked closed then, which also stops the handler's event loop.
        """
        transport = self._transport
        if self.closed or transport is None:
            return
        if transport.is_closing():
            self._lost()
            return
        if not self._write_paused and not self._queued:
            transport.write(data)
            return
        if self._queue is None:
            self._queue = [collections.deque() for _ in range(3)]
        self._queue[priority].append(data)
        self._queued += len(data)
        if self._queued > self.server.write_queue_limit:
            self.pause_reading("write queue full")

    def _flush(self) -> None:
        assert self._transport is not None
        if self._gone():
            return
        for queue in self._queue or ():
            while queue and not self._write_paused:
                data = queue.popleft()
                self._queued -= len(data)
                self._transport.write(data)
                if self._transport.is_closing():  # that write failed
                    self._lost()
                    return
        if self._queued <= self.server.write_queue_limit // 2:
            self.resume_reading("write queue full")

    def pause_reading(self, why: str) -> None:
        if not self._reading_paused_by and self._transport is not None and not self.closed:
            self._transport.pause_reading()
        if self._reading_paused_by is None:
            self._reading_paused_by = set()
        self._reading_paused_by.add(why)

    def resume_reading(self, why: str) -> None:
        paused = self._reading_paused_by
        if not paused or why not in paused:
            return
        paused.discard(why)
        if paused:
            if self._backlog is not None and len(paused) == 1:
                self._arm()  # only "frame rate" is left: the backlog may move again
            return
        if self._transport is not None and not self.closed:
            self._transport.resume_reading()

    def close(self, reason: str) -> None:
        """Close the connection; ``reason`` is recorded and counted."""
        if self.closed:
            return
        self._lost()
        self.close_reason = reason
        if self._transport is not None:
            self._transport.close()


class DeviceServer:
    """Accepts device connections, enforces the connection limits, sweeps idle ones."""

    def __init__(
        self,
        handler: Handler,
        metrics: Metrics,
        *,
        max_frame: int,
        max_connections: int,
        accept_rate: float,
        idle_timeout_s: float,
        write_queue_limit: int,
        node: str = "",
        frame_rate: float = 0.0,
        process_frame_rate: float = 0.0,
        reuse_port: bool = False,
        identify_timeout_s: float = 30.0,
        max_unidentified_per_source: int = 0,
        allowed_networks: Sequence[IPNetwork] = (),
    ) -> None:
        self.handler = handler
        self.metrics = metrics
        self.max_frame = max_frame
        self.max_connections, self.open_files = connection_limit(max_connections)
        self.frame_rate = frame_rate
        #: a connection may send this many frames at once before it is throttled
        self.frame_burst = max(frame_rate * 5, 20.0)
        self.process_frame_rate = process_frame_rate
        #: the process may decode one second's worth at once (at least one frame)
        self._process_burst = max(process_frame_rate, 1.0)
        self._process_tokens = self._process_burst
        self._process_tokens_at = time.monotonic()
        #: connections with a backlog waiting for tokens
        self.backlogs = 0
        self.reuse_port = reuse_port
        self.read_view = memoryview(bytearray(_READ_BUFFER))
        self.accept_rate = accept_rate
        self.idle_timeout_s = idle_timeout_s
        self.write_queue_limit = write_queue_limit
        self.node_prefix = f"{node}-{os.getpid()}-" if node else f"{os.getpid()}-"
        self.links: dict[str, DeviceLink] = {}
        self._server: asyncio.Server | None = None
        self._tokens = accept_rate
        self._refill = time.monotonic()
        self._paused_all = False
        self.identify_timeout_s = identify_timeout_s
        self.max_unidentified_per_source = max_unidentified_per_source
        #: the event loop is behind (set by the gateway): connections may be silent
        #: because we have not read them yet, so neither the identification deadline
        #: nor the per-source cap holds it against them
        self.behind = False
        self.allowed_networks = tuple(allowed_networks)
        #: admitted connections not identified yet, oldest first (all share one deadline,
        #: so the first one is always the next to expire), and their count per source
        self._unidentified: dict[str, DeviceLink] = {}
        self._unidentified_at: collections.Counter[str] = collections.Counter()
        #: the one timer that closes connections past the identification deadline; armed
        #: once the server runs on a loop (:meth:`start`)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._identify_timer: asyncio.TimerHandle | None = None
        self._refusals = _RefusalLog()

    @property
    def listening(self) -> bool:
        return self._server is not None and self._server.is_serving()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int) -> None:
        self._loop = loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: DeviceLink(self),
            host,
            port,
            reuse_address=True,
            reuse_port=self.reuse_port or None,
            backlog=4096,
        )
        log.info(
            "device listener up",
            host=host,
            port=self.port,
            max_connections=self.max_connections,
            open_file_limit=self.open_files,
        )
        if self.max_connections >= self.open_files - FD_RESERVE:
            log.info(
                f"open-file limit {self.open_files}: at most {self.max_connections} device "
                "connections in this process (raise `ulimit -n` or add workers for more)"
            )

    def grant_process(self, wanted: int, now: float) -> int:
        """Spend process-wide tokens for up to ``wanted`` frames (whole frames, never
        into debt); how many are allowed now. Only called with a limit set."""
        rate = self.process_frame_rate
        tokens = self._process_tokens + (now - self._process_tokens_at) * rate
        tokens = min(tokens, self._process_burst)
        if tokens < wanted:
            wanted = int(tokens) if tokens > 0 else 0
        self._process_tokens = tokens - wanted
        self._process_tokens_at = now
        return wanted

    def process_wait(self, now: float) -> float:
        """Seconds a connection with a backlog waits for its next share of the process
        budget (0 without a limit): until a whole frame is there, and at least its turn
        among the ``backlogs`` connections sharing the budget, so that thousands of them
        do not all wake every tick to find it spent."""
        rate = self.process_frame_rate
        if rate <= 0:
            return 0.0
        tokens = self._process_tokens + (now - self._process_tokens_at) * rate
        return max(0.0, (1.0 - tokens) / rate, self.backlogs / rate)

    def admit(
        self,
        link: DeviceLink,
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None,
    ) -> str | None:
        """Register a new connection (not identified yet), or name the rule that refuses
        it. The rules that cost nothing come first: a connection refused by the allow-list
        or the per-source cap does not spend the accept budget."""
        if self.allowed_networks and (
            address is None or not any(address in net for net in self.allowed_networks)
        ):
            return "network"
        cap = self.max_unidentified_per_source
        if cap and not self.behind and self._unidentified_at[link.source] >= cap:
            return "per_source"
        now = time.monotonic()
        self._tokens = min(self.accept_rate, self._tokens + (now - self._refill) * self.accept_rate)
        self._refill = now
        if len(self.links) >= self.max_connections:
            return "max_connections"
        if self._tokens < 1:
            return "accept_rate"
        self._tokens -= 1
        self.links[link.id] = link
        self.metrics.connections_accepted_total.inc()
        self.metrics.connections_current.set(len(self.links))
        link.accepted_at = now
        self._unidentified[link.id] = link
        self._unidentified_at[link.source] += 1
        self.metrics.device_connections_unidentified.set(len(self._unidentified))
        self._arm_identify(now)
        if self._paused_all:
            link.pause_reading("database backlog")
        return None

    def refuse(self, link: DeviceLink, rule: str, **context: Any) -> None:
        """Close ``link`` for breaking ``rule`` (its close reason too): counted, logged."""
        if link.closed:
            return
        self.metrics.device_connections_refused_total.labels(rule=rule).inc()
        self._refusals.note(rule, link.remote, context)
        link.close(rule)

    def drop_unidentified(self, link: DeviceLink) -> None:
        """``link`` identified itself or closed: it no longer counts as unidentified."""
        if self._unidentified.pop(link.id, None) is None:
            return
        source = link.source
        left = self._unidentified_at[source] - 1
        if left > 0:
            self._unidentified_at[source] = left
        else:
            del self._unidentified_at[source]
        self.metrics.device_connections_unidentified.set(len(self._unidentified))

    @property
    def unidentified(self) -> int:
        """Connections admitted that have not identified themselves yet."""
        return len(self._unidentified)

    def _arm_identify(self, now: float) -> None:
        """Arm the identification timer for the oldest unidentified connection."""
        if self._identify_timer is not None or self._loop is None or not self._unidentified:
            return
        oldest = next(iter(self._unidentified.values()))
        wait = max(oldest.accepted_at + self.identify_timeout_s - now, 0.0)
        self._identify_timer = self._loop.call_later(wait, self._expire_unidentified)

    def _expire_unidentified(self) -> None:
        """The timer: close every connection past the identification deadline."""
        self._identify_timer = None
        now = time.monotonic()
        deadline = now - self.identify_timeout_s
        while self._unidentified:
            link = next(iter(self._unidentified.values()))
            if link.accepted_at > deadline:
                break
            if link.reading_paused or self.behind:
                # we stopped reading (the database is backlogged) or read late (the loop
                # is behind): its first frame may be waiting in our socket buffer. Its
                # deadline starts again, at the back of the queue (still in deadline
                # order: every other one began earlier).
                del self._unidentified[link.id]
                link.accepted_at = now
                self._unidentified[link.id] = link
                continue
            self.drop_unidentified(link)
            self.refuse(link, "identify_timeout")
        self._arm_identify(now)

    def forget(self, link: DeviceLink) -> bool:
        """Drop a closed connection; True if it had been admitted."""
        self.metrics.connections_closed_total.labels(reason=link.close_reason).inc()
        if self.links.pop(link.id, None) is None:
            return False
        self.metrics.connections_current.set(len(self.links))
        return True

    def set_paused(self, paused: bool) -> None:
        """Pause (or resume) reading from every device: the write backlog is too long."""
        self._paused_all = paused
        for link in list(self.links.values()):
            if paused:
                link.pause_reading("database backlog")
            else:
                link.resume_reading("database backlog")

    def sweep_idle(self, now: float) -> None:
        for link in list(self.links.values()):
            if now - link.last_rx > self.idle_timeout_s:
                link.close("idle_timeout")

    async def stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def close_all(self, reason: str) -> None:
        for link in list(self.links.values()):
            link.close(reason)
        if self._identify_timer is not None:
            self._identify_timer.cancel()
            self._identify_timer = None

    def shed(self, count: int, reason: str, keep: Any = None) -> int:
        """Close up to ``count`` connections (oldest first, skipping ``keep(link)``)."""
        closed = 0
        for link in list(self.links.values()):
            if closed >= count:
                break
            if link.closed or (keep is not None and keep(link)):
                continue
            link.close(reason)
            closed += 1
        return closed


class _RefusalLog:
    """Refusals one by one at debug level; at info level the first after a quiet spell,
    then a summary (counts by rule) at most every ``REFUSAL_SUMMARY_S``."""

    def __init__(self) -> None:
        self._counts: collections.Counter[str] = collections.Counter()
        self._next_summary = 0.0

    def note(self, rule: str, remote: str, context: dict[str, Any]) -> None:
        log.debug("device connection refused", rule=rule, remote=remote, **context)
        self._counts[rule] += 1
        now = time.monotonic()
        if now < self._next_summary:
            return
        counts, self._counts = dict(self._counts), collections.Counter()
        self._next_summary = now + REFUSAL_SUMMARY_S
        log.info(
            "device connections refused",
            by_rule=counts,
            last_rule=rule,
            last_remote=remote,
            **context,
        )
