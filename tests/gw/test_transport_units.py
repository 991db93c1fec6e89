"""Unit tests for faults that are impractical to cause over loopback: a peer that stops
reading (kernel buffers would absorb megabytes first), a write that fails in the middle
of a burst, repeated command timeouts; and the frame budgets' arithmetic."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from chargegw.metrics import Metrics
from chargegw.net.sessions import SessionRegistry
from chargegw.net.transport import CONTROL, REPLY, DeviceLink, DeviceServer
from chargegw.store.writer import BatchWriter
from chargeproto import Event, MessageReceived, ap3000

from .waiting import eventually


class FakeTransport:
    """Stands in for a socket whose peer does not read: the write buffer never drains.

    With ``fail_after``, the write after that many is the one that hits a reset socket:
    like asyncio's transports, it is swallowed and the transport is closing from then on.
    """

    def __init__(self, fail_after: int | None = None) -> None:
        self.written: list[bytes] = []
        self.writes = 0
        self.fail_after = fail_after
        self.reading = True
        self.closed = False

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else None

    def set_write_buffer_limits(self, high: int) -> None:
        self.high = high

    def write(self, data: bytes) -> None:
        self.writes += 1
        if self.closed:
            raise AssertionError("write on a closing transport")
        if self.fail_after is not None and self.writes > self.fail_after:
            self.closed = True  # the fatal error path: closing, connection_lost later
            return
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closed = True


class NullHandler:
    def on_open(self, link: DeviceLink) -> None: ...
    def on_events(self, link: DeviceLink, events: list[Any]) -> None: ...
    def on_closed(self, link: DeviceLink, reason: str) -> None: ...


class ReplyingHandler(NullHandler):
    """Answers every message, and stops its per-event loop once the link is closed,
    as ``Gateway.on_events`` does."""

    def __init__(self) -> None:
        self.handed: list[int] = []  # msg ids, in the order handed over

    def on_events(self, link: DeviceLink, events: list[Event]) -> None:
        for event in events:
            if link.closed:
                return
            assert isinstance(event, MessageReceived)
            self.handed.append(event.message.msg_id)  # type: ignore[attr-defined]
            link.send(b"reply")


def _link(
    limit: int = 100,
    *,
    handler: Any = None,
    transport: FakeTransport | None = None,
    frame_rate: float = 0.0,
) -> tuple[DeviceLink, FakeTransport]:
    server = DeviceServer(
        handler or NullHandler(),
        Metrics(),
        max_frame=512,
        max_connections=10,
        accept_rate=100,
        idle_timeout_s=60,
        write_queue_limit=limit,
        frame_rate=frame_rate,
    )
    link = DeviceLink(server)
    transport = transport or FakeTransport()
    link.connection_made(transport)  # type: ignore[arg-type]
    return link, transport


def _receive(link: DeviceLink, heartbeats: int) -> None:
    """The transport delivers ``heartbeats`` frames (msg ids 1..) in one read."""
    ports = (ap3000.PortState(0, 0),)
    data = b"".join(
        ap3000.encode(
            ap3000.Heartbeat(
                "04000001", n, voltage_v=220.0, ports=ports, signal_strength=20, temperature_c=25
            )
        )
        for n in range(1, heartbeats + 1)
    )
    link.server.read_view[: len(data)] = data
    link.buffer_updated(len(data))


def test_a_peer_that_does_not_read_gets_its_reads_paused_not_more_memory() -> None:
    link, transport = _link(limit=100)
    link.pause_writing()  # the transport's buffer is above its high-water mark
    for _ in range(50):
        link.send(b"x" * 10, REPLY)
    assert not transport.reading  # backpressure: we stop reading from it
    assert link.queued <= 100 + 10 * 50  # bounded by what it sent us before the pause
    link.send(b"stop", CONTROL)
    link.resume_writing()
    assert transport.written[0] == b"stop"  # control overtakes queued replies
    assert transport.reading


def test_repeated_ack_timeouts_take_a_device_offline_with_the_reason() -> None:
    metrics = Metrics()
    writer = BatchWriter(lambda: None, metrics)
    sessions = SessionRegistry(
        writer, metrics, missed_heartbeats=2.5, ack_timeouts_offline=3, node="test"
    )
    link, _ = _link()
    wall = datetime.now(UTC)
    sessions.seen(
        link,
        "04000001",
        protocol="ap3000",
        gateway_id="04000001",
        heartbeat_interval_s=180,
        heartbeat=True,
        now=0.0,
        wall=wall,
    )
    offline: list[tuple[str, str]] = []
    sessions.on_offline = lambda device, reason: offline.append((device, reason))
    sessions.ack_timeout("04000001", wall)
    sessions.ack_ok("04000001")  # an answer resets the count
    for _ in range(3):
        sessions.ack_timeout("04000001", wall)
    assert offline == [("04000001", "ack_timeouts")]
    assert not sessions.devices["04000001"].online


async def test_a_read_over_budget_hands_over_the_burst_and_the_rest_as_tokens_refill() -> None:
    handler = ReplyingHandler()
    link, transport = _link(handler=handler, frame_rate=10.0)  # burst: 50 frames
    loop = asyncio.get_running_loop()
    start = loop.time()
    _receive(link, 200)
    assert handler.handed == list(range(1, 51))  # the burst, not the whole read
    assert not transport.reading  # the rest waits in the backlog, the next bytes in TCP
    await eventually(lambda: len(handler.handed) >= 53)
    elapsed = loop.time() - start
    assert len(handler.handed) <= 50 + 10.0 * elapsed  # never ahead of the refill
    assert handler.handed == list(range(1, len(handler.handed) + 1))  # in order
    link.close("test")  # a closed link's backlog is dropped: nothing more is handed over
    handed = len(handler.handed)
    await asyncio.sleep(0.3)  # proves nothing is handed over in three refill periods
    assert len(handler.handed) == handed


async def test_a_failed_write_stops_the_burst_and_drops_the_backlog() -> None:
    handler = ReplyingHandler()
    transport = FakeTransport(fail_after=1)
    link, _ = _link(handler=handler, transport=transport, frame_rate=10.0)
    _receive(link, 200)
    # reply 1 written, reply 2 hits the reset socket, reply 3 sees the transport closing:
    # the link is closed and the handler's loop stops; no write on a closing transport
    assert handler.handed == [1, 2, 3]
    assert transport.writes == 2 and link.closed
    await asyncio.sleep(0.3)  # proves the backlog (150 frames) was dropped, not drained
    assert handler.handed == [1, 2, 3]


async def test_a_backlog_waits_while_the_write_queue_is_full() -> None:
    handler = ReplyingHandler()
    link, transport = _link(limit=10, handler=handler, frame_rate=100.0)  # burst: 500
    link.pause_writing()  # the peer does not read our replies
    _receive(link, 600)
    assert len(handler.handed) == 500
    await asyncio.sleep(0.1)  # proves the full write queue holds it for ten refill periods
    assert len(handler.handed) == 500
    link.resume_writing()  # the queue drains: the backlog moves again, then reading
    await eventually(lambda: len(handler.handed) == 600)
    assert handler.handed == list(range(1, 601))
    await eventually(lambda: transport.reading)


@pytest.mark.parametrize("wanted", [1, 7, 500])
def test_the_process_budget_grants_whole_frames_and_never_goes_into_debt(wanted: int) -> None:
    server = DeviceServer(
        NullHandler(),
        Metrics(),
        max_frame=512,
        max_connections=10,
        accept_rate=100,
        idle_timeout_s=60,
        write_queue_limit=100,
        process_frame_rate=100.0,
    )
    now = time.monotonic() + 100.0
    server.grant_process(1000, now - 50)  # start empty at a known time
    granted = server.grant_process(wanted, now)  # 50 s later: refilled to the burst only
    assert granted == min(wanted, 100)
    assert server.grant_process(wanted, now) == (min(wanted, 100 - granted))
    server.grant_process(1000, now)
    assert server.process_wait(now) == pytest.approx(0.01)  # one frame at 100/s
    assert server.grant_process(wanted, now + 0.055) == min(wanted, 5)  # 5.5 tokens
    server.grant_process(1000, now + 0.055)  # 0.5 left ...
    assert server.process_wait(now + 0.055) == pytest.approx(0.005)  # ... half a frame short
    server.backlogs = 50  # connections waiting on the budget take turns: ~1 frame per wake-up
    assert server.process_wait(now + 0.055) == pytest.approx(0.5)
