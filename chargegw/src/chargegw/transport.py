"""The device TCP server: one BufferedProtocol per connection, both protocols on one port.

Received bytes go straight into the connection's chargeproto stream decoder; events are
handed to the handler synchronously (nothing awaits inside ``buffer_updated``).
Writes go through a small per-connection queue ordered by priority (control before
queries before replies) and bounded in bytes: when a peer does not read, its queue
fills, and then reading from that peer is paused, so a slow reader cannot grow memory.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import time
from typing import Any, Protocol

import structlog

from chargeproto import Event, StreamDecoder

from .metrics import Metrics

log = structlog.get_logger("chargegw.transport")

#: write priorities, lowest value first
CONTROL, QUERY, REPLY = 0, 1, 2

_READ_BUFFER = 65536
_ids = itertools.count(1)


class Handler(Protocol):
    """What the transport calls; implemented by the gateway service."""

    def on_open(self, link: DeviceLink) -> None: ...

    def on_events(self, link: DeviceLink, events: list[Event]) -> None: ...

    def on_closed(self, link: DeviceLink, reason: str) -> None: ...


class DeviceLink(asyncio.BufferedProtocol):
    """One device connection (a pile, a host, or a BKV gateway)."""

    def __init__(self, server: DeviceServer) -> None:
        self.server = server
        self.id = f"{server.node_prefix}{next(_ids)}"
        self.remote = ""
        self.iccid: str | None = None
        self.protocol: str | None = None
        #: protocol-specific state kept by the driver (heartbeat mode, ...)
        self.driver_state: dict[str, Any] = {}
        self.closed = False
        self.close_reason = "peer closed"
        self.errors = 0
        self.last_rx = time.monotonic()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray(_READ_BUFFER)
        self._view = memoryview(self._buffer)
        self._decoder = StreamDecoder(ap3000_max_frame=server.max_frame)
        self._queue: list[collections.deque[bytes]] = [collections.deque() for _ in range(3)]
        self._queued = 0
        self._write_paused = False
        self._reading_paused_by: set[str] = set()

    # -- asyncio callbacks --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without inheriting from it
        self._transport = tcp = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.remote = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        tcp.set_write_buffer_limits(high=self.server.write_queue_limit)  # type: ignore[attr-defined]
        refusal = self.server.admit(self)
        if refusal:
            self.close(refusal)
            return
        self.server.handler.on_open(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        if self.closed:
            return
        self.last_rx = time.monotonic()
        events = self._decoder.feed(self._view[:nbytes])
        if events:
            self.server.handler.on_events(self, events)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.close_reason == "peer closed":
            self.close_reason = "connection error"
        self.closed = True
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

    def send(self, data: bytes, priority: int = REPLY) -> None:
        """Queue ``data`` for the peer; control frames overtake queued replies."""
        if self.closed or self._transport is None:
            return
        if not self._write_paused and not self._queued:
            self._transport.write(data)
            return
        self._queue[priority].append(data)
        self._queued += len(data)
        if self._queued > self.server.write_queue_limit:
            self.pause_reading("write queue full")

    def _flush(self) -> None:
        assert self._transport is not None
        for queue in self._queue:
            while queue and not self._write_paused:
                data = queue.popleft()
                self._queued -= len(data)
                self._transport.write(data)
        if self._queued <= self.server.write_queue_limit // 2:
            self.resume_reading("write queue full")

    def pause_reading(self, why: str) -> None:
        if not self._reading_paused_by and self._transport is not None and not self.closed:
            self._transport.pause_reading()
        self._reading_paused_by.add(why)

    def resume_reading(self, why: str) -> None:
        if why not in self._reading_paused_by:
            return
        self._reading_paused_by.discard(why)
        if not self._reading_paused_by and self._transport is not None and not self.closed:
            self._transport.resume_reading()

    def close(self, reason: str) -> None:
        """Close the connection; ``reason`` is recorded and counted."""
        if self.closed:
            return
        self.closed = True
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
    ) -> None:
        self.handler = handler
        self.metrics = metrics
        self.max_frame = max_frame
        self.max_connections = max_connections
        self.accept_rate = accept_rate
        self.idle_timeout_s = idle_timeout_s
        self.write_queue_limit = write_queue_limit
        self.node_prefix = f"{node}-{os.getpid()}-" if node else f"{os.getpid()}-"
        self.links: dict[str, DeviceLink] = {}
        self._server: asyncio.Server | None = None
        self._tokens = accept_rate
        self._refill = time.monotonic()
        self._paused_all = False

    @property
    def listening(self) -> bool:
        return self._server is not None and self._server.is_serving()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: DeviceLink(self), host, port, reuse_address=True, backlog=1024
        )
        log.info("device listener up", host=host, port=self.port)

    def admit(self, link: DeviceLink) -> str | None:
        """Register a new connection, or say why it is refused."""
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
        if self._paused_all:
            link.pause_reading("database backlog")
        return None

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
