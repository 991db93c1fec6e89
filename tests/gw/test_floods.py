"""Frame floods (finding 13): the frame-rate limits hold under a burst of thousands of
frames in one read, nothing is dropped while the sender stays connected, and a sender
that closes mid-flood stops costing work and writes. Real TCP, real PostgreSQL.

Bounds are on counts, never on how fast the machine is: a reply read by the client at
time ``t`` was handed to the gateway's handler before ``t``, so the replies read by
``t`` can never exceed ``burst + rate * (t - t0)``, whatever the load on the machine.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from chargegw.app import Gateway
from chargeproto import MessageReceived, ap3000

from .piles import RawPile
from .waiting import eventually

PHY = "04000078"
#: a read is at most 64 KiB; a heartbeat is 21 bytes, so one read holds ~3,100 of them
HEARTBEAT_BYTES = 21


def _heartbeats(count: int, first: int = 1) -> bytes:
    """``count`` AP3000 heartbeats of one pile, msg ids ``first`` upwards, back to back."""
    ports = (ap3000.PortState(0, 0), ap3000.PortState(1, 0))
    return b"".join(
        ap3000.encode(
            ap3000.Heartbeat(
                PHY, first + n, voltage_v=220.0, ports=ports, signal_strength=20, temperature_c=25
            )
        )
        for n in range(count)
    )


async def _replies(pile: RawPile, *, until: float, expected: int) -> list[tuple[float, int]]:
    """(time read, msg id) of every HeartbeatReply read before loop time ``until``, or
    until ``expected`` were read or the server closed the connection."""
    assert pile.reader is not None
    loop = asyncio.get_running_loop()
    decoder = ap3000.Ap3000StreamDecoder("down")
    got: list[tuple[float, int]] = []
    while len(got) < expected and (remaining := until - loop.time()) > 0:
        try:
            data = await asyncio.wait_for(pile.reader.read(65536), remaining)
        except TimeoutError:
            break
        if not data:
            break
        now = loop.time()
        for event in decoder.feed(data):
            if isinstance(event, MessageReceived) and isinstance(
                event.message, ap3000.HeartbeatReply
            ):
                got.append((now, event.message.msg_id))
    return got


def _frames_in(gateway: Gateway) -> float:
    """Frames the gateway has processed (the ``frames`` counter, direction in)."""
    (family,) = gateway.metrics.frames_total.collect()
    return sum(
        s.value
        for s in family.samples
        if s.name.endswith("_total") and s.labels["direction"] == "in"
    )


def _throttled(gateway: Gateway, scope: str) -> float:
    """Reads the frame budgets held back (the ``frames_throttled`` counter of ``scope``)."""
    value = gateway.metrics.registry.get_sample_value(
        "chargegw_frames_throttled_total", {"scope": scope}
    )
    return value or 0.0


@pytest.mark.parametrize(
    ("rate", "burst"),
    [
        pytest.param(
            50.0,
            250.0,
            id="per-connection",
            marks=pytest.mark.settings(frame_rate_per_connection=50.0),
        ),
        pytest.param(
            40.0,
            40.0,
            id="per-process",
            marks=pytest.mark.settings(frame_rate_per_connection=0.0, frame_rate_per_process=40.0),
        ),
    ],
)
async def test_a_burst_is_answered_no_faster_than_the_frame_rate_limit(
    gateway: Gateway, rate: float, burst: float
) -> None:
    frames = 5000  # more than one read's worth
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    pile = await RawPile(PHY).connect(gateway.server.port)
    assert pile.writer is not None
    pile.writer.write(_heartbeats(frames))  # not drained: the gateway pauses reading
    got = await _replies(pile, until=t0 + 3.0, expected=frames)
    for count, (at, _msg_id) in enumerate(got, start=1):
        assert count <= burst + rate * (at - t0), (count, at - t0)
    assert len(got) > burst  # the rest keeps coming as tokens refill ...
    assert [msg_id for _at, msg_id in got] == list(range(1, len(got) + 1))  # ... in order
    assert _throttled(gateway, "connection" if burst > rate else "process") >= 1
    await pile.close()


@pytest.mark.settings(frame_rate_per_connection=1000.0)
async def test_a_burst_from_a_connection_that_stays_open_is_answered_in_full_and_in_order(
    gateway: Gateway,
) -> None:
    frames = 8000  # burst 5,000; ~2.5 reads, ~3 s of backlog at 1,000/s
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    pile = await RawPile(PHY).connect(gateway.server.port)
    assert pile.writer is not None
    pile.writer.write(_heartbeats(frames))
    got = await _replies(pile, until=t0 + 12.0, expected=frames)
    assert [msg_id for _at, msg_id in got] == list(range(1, frames + 1))  # all, in order
    for count, (at, _msg_id) in enumerate(got, start=1):  # and none ahead of the budget
        assert count <= 5000 + 1000 * (at - t0), (count, at - t0)
    assert _throttled(gateway, "connection") >= 1
    # the connection is back to normal once its backlog is worked off
    await pile.send_raw(_heartbeats(1, first=frames + 1))
    reply = await pile.expect(ap3000.HeartbeatReply, timeout=5)
    assert reply.msg_id == frames + 1
    await pile.close()


@pytest.mark.settings(frame_rate_per_connection=50.0)
async def test_a_sender_that_closes_mid_flood_stops_costing_work_and_writes(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    """The client floods and closes at once, before reading anything: the gateway's
    replies run into a closed socket. It must stop there, not work through the backlog
    writing to the dead socket."""
    caplog.set_level(logging.WARNING, logger="asyncio")
    loop = asyncio.get_running_loop()
    data = _heartbeats(20000)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * len(data))
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", gateway.server.port))
    # flood and close in one step, without yielding to the loop: the gateway reads
    # only after the client is gone (unsent bytes still go out before the FIN)
    sent = sock.send(data)
    sock.close()
    assert sent >= 65536  # at least a full read for the gateway
    await eventually(
        lambda: not gateway.server.links and _frames_in(gateway), what="the close noticed"
    )
    processed = _frames_in(gateway)
    await asyncio.sleep(1.0)  # proves no backlog drains after the close (50 frames/s would)
    assert _frames_in(gateway) == processed
    # at most the burst allowance (250) was handed over, not the read (~3,100)
    assert 1 <= processed <= 250
    warnings = [r for r in caplog.records if "socket.send() raised exception" in r.getMessage()]
    assert warnings == []
