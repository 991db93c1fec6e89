"""Unit tests for faults that are impractical to cause over loopback: a peer that stops
reading (kernel buffers would absorb megabytes first), and repeated command timeouts."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from chargegw.metrics import Metrics
from chargegw.sessions import SessionRegistry
from chargegw.store.writer import BatchWriter
from chargegw.transport import CONTROL, REPLY, DeviceLink, DeviceServer


class FakeTransport:
    """Stands in for a socket whose peer does not read: the write buffer never drains."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.reading = True
        self.closed = False

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else None

    def set_write_buffer_limits(self, high: int) -> None:
        self.high = high

    def write(self, data: bytes) -> None:
        self.written.append(data)

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


def _link(limit: int = 100) -> tuple[DeviceLink, FakeTransport]:
    server = DeviceServer(
        NullHandler(),
        Metrics(),
        max_frame=512,
        max_connections=10,
        accept_rate=100,
        idle_timeout_s=60,
        write_queue_limit=limit,
    )
    link = DeviceLink(server)
    transport = FakeTransport()
    link.connection_made(transport)  # type: ignore[arg-type]
    return link, transport


def test_a_peer_that_does_not_read_gets_its_reads_paused_not_more_memory() -> None:
    link, transport = _link(limit=100)
    link.pause_writing()  # the transport's buffer is above its high-water mark
    for _ in range(50):
        link.send(b"x" * 10, REPLY)
    assert not transport.reading  # backpressure: we stop reading from it
    assert link._queued <= 100 + 10 * 50  # bounded by what it sent us before the pause
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
