"""The event stream (Server-Sent Events) and the pull API over real HTTP: two gateway
processes' worth of ``Gateway`` objects on one PostgreSQL, each with its own uvicorn on
a free port of 127.0.0.1, and events written by SQL as the triggers write them.

Proven here: subscribers on different workers receive the same events in the same order;
a client that reconnects with ``Last-Event-ID`` (to either worker) while events keep
flowing misses nothing and gets nothing twice; a subscriber that never reads is
disconnected and the others keep receiving; heartbeats; filters; the stream's own
``stream.gap``/``stream.reset`` messages; a clean end when the gateway stops; the pull
API's pages and 422s.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from chargegw.app import Gateway

from .conftest import settings_for
from .waiting import eventually, free_port

STREAM = "/api/v1/events/stream"


@dataclasses.dataclass(frozen=True)
class Sse:
    """One message of the stream."""

    id: int | None
    event: str
    data: dict[str, Any]


class Stream:
    """An SSE client running in a task, keeping what it receives."""

    def __init__(
        self,
        base: str,
        *,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.url = base + STREAM
        self.params = params or {}
        self.headers = headers or {}
        self.messages: list[Sse] = []
        self.comments = 0
        self.retry: int | None = None
        self.status: int | None = None
        self.body = b""
        #: the server ended the body (a complete response)
        self.ended = False
        self.error: BaseException | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def events(self) -> list[Sse]:
        """The events (not the stream's own messages)."""
        return [m for m in self.messages if m.id is not None]

    def ids(self) -> list[int]:
        return [m.id for m in self.events if m.id is not None]

    async def __aenter__(self) -> Stream:
        self._task = asyncio.create_task(self._run())
        await eventually(
            lambda: self.status is not None or self.error is not None,
            what=f"an answer from {self.url}",
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Disconnect (as a client going away does)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def finished(self) -> None:
        """Until the server ends the stream."""
        assert self._task is not None
        await asyncio.wait_for(asyncio.shield(self._task), 10)

    async def _run(self) -> None:
        try:
            async with (
                httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as client,
                client.stream("GET", self.url, params=self.params, headers=self.headers) as r,
            ):
                self.status = r.status_code
                if r.status_code != 200:
                    self.body = await r.aread()
                    return
                fields: dict[str, str] = {}
                async for line in r.aiter_lines():
                    if line == "":
                        if "data" in fields:
                            event_id = int(fields["id"]) if "id" in fields else None
                            data = json.loads(fields["data"])
                            self.messages.append(Sse(event_id, fields["event"], data))
                        fields = {}
                    elif line.startswith(":"):
                        self.comments += 1
                    else:
                        name, _, value = line.partition(":")
                        if name == "retry":
                            self.retry = int(value)
                        fields[name] = value.removeprefix(" ")
            self.ended = True
        except httpx.HTTPError as exc:
            self.error = exc


def base(gateway: Gateway) -> str:
    return f"http://127.0.0.1:{gateway.settings.http_port}"


@contextlib.asynccontextmanager
async def serving(
    db_dsn: str, request: pytest.FixtureRequest, nodes: tuple[str, ...]
) -> AsyncIterator[list[Gateway]]:
    """Gateways (as workers) with HTTP on one database; a ``settings`` marker adds to
    their settings."""
    marker = request.node.get_closest_marker("settings")
    overrides = {"events_sequence_s": 0.2, **(marker.kwargs if marker else {})}
    started: list[Gateway] = []
    try:
        for node in nodes:
            gw = Gateway(settings_for(db_dsn, http_port=free_port(), node=node, **overrides))
            await gw.start()
            started.append(gw)
        yield started
    finally:
        for gw in started:
            await gw.stop()


@pytest.fixture
async def gateways(db_dsn: str, request: pytest.FixtureRequest) -> AsyncIterator[list[Gateway]]:
    """Two gateways (as two workers) with HTTP on one database."""
    async with serving(db_dsn, request, ("a", "b")) as started:
        yield started


@pytest.fixture
async def served(db_dsn: str, request: pytest.FixtureRequest) -> AsyncIterator[Gateway]:
    """One gateway with HTTP."""
    async with serving(db_dsn, request, ("a",)) as started:
        yield started[0]


async def emit(
    pool: asyncpg.Pool,
    device_id: str = "D1",
    count: int = 1,
    *,
    type_name: str = "ban.placed",
    gateway_id: str | None = None,
    protocol: str | None = None,
    pad: int = 0,
) -> None:
    """``count`` events in one transaction, as a trigger writes them (``pad``: with that
    many more bytes of data each)."""
    await pool.execute(
        """SELECT emit_event($1, $2, NULL, NULL, NULL, NULL,
                             jsonb_build_object('n', n, 'pad', repeat('x', $6)), now(), $3, $4)
             FROM generate_series(1, $5) AS n""",
        type_name,
        device_id,
        gateway_id,
        protocol,
        count,
        pad,
    )


async def emit_steadily(pool: asyncpg.Pool, total: int, per_tx: int = 3) -> None:
    """``total`` events in small transactions from two writers, until all are written."""

    async def writer(name: str, count: int) -> None:
        for _ in range(0, count, per_tx):
            await emit(pool, name, per_tx)
            await asyncio.sleep(0.002)

    half = total // 2
    await asyncio.gather(writer("W1", half), writer("W2", total - half))


def _metric(gateway: Gateway, name: str) -> float:
    value = gateway.metrics.registry.get_sample_value(f"chargegw_{name}")
    return 0.0 if value is None else value


# ---------------------------------------------------------------- fan-out


async def test_subscribers_on_two_workers_get_the_same_events_in_the_same_order(
    gateways: list[Gateway], db_pool: asyncpg.Pool
) -> None:
    total = 300
    async with Stream(base(gateways[0])) as one, Stream(base(gateways[1])) as two:
        assert one.retry == two.retry == 2000
        await emit_steadily(db_pool, total)
        for stream in (one, two):
            await eventually(lambda s=stream: len(s.events), lambda n: n >= total)
    assert one.ids() == two.ids() == list(range(1, total + 1))
    assert [m.data for m in one.events] == [m.data for m in two.events]
    first = one.events[0]
    assert first.event == first.data["type"] == "ban.placed" and first.data["id"] == first.id
    assert _metric(gateways[0], "events_streamed_total") == total


async def test_reconnecting_with_last_event_id_misses_nothing_and_repeats_nothing(
    gateways: list[Gateway], db_pool: asyncpg.Pool
) -> None:
    """The client drops its connection four times while events keep coming, each time
    resuming on the other worker with the id of the last event it got."""
    total = 600
    received: list[int] = []
    writing = asyncio.create_task(emit_steadily(db_pool, total))
    last = "0"  # from the first event on: the writers may have begun
    for round_no in range(5):
        headers = {"Last-Event-ID": last}
        async with Stream(base(gateways[round_no % 2]), headers=headers) as stream:
            want = min(total, len(received) + 80) if round_no < 4 else total
            seen = len(received)
            await eventually(
                lambda s=stream, r=seen: r + len(s.events),
                lambda n, w=want: n >= w,
            )
        received += stream.ids()
        assert stream.messages == stream.events, "no stream.gap or stream.reset expected"
        last = str(received[-1])
    await writing
    assert received == list(range(1, total + 1))


async def test_after_replays_the_table_then_goes_live(
    gateways: list[Gateway], db_pool: asyncpg.Pool
) -> None:
    await emit(db_pool, "D1", 5)
    await eventually(lambda: gateways[0].events.last_id, lambda n: n == 5)
    async with Stream(base(gateways[0]), params={"after": 2}) as stream:
        await eventually(stream.ids, lambda ids: ids == [3, 4, 5])
        await emit(db_pool, "D1", 2)
        await eventually(stream.ids, lambda ids: ids == [3, 4, 5, 6, 7])
    # Last-Event-ID wins over after=
    headers = {"Last-Event-ID": "6"}
    async with Stream(base(gateways[1]), params={"after": 0}, headers=headers) as stream:
        await eventually(stream.ids, lambda ids: ids == [7])


# ---------------------------------------------------------------- slow subscribers


async def _stuck_client(port: int) -> socket.socket:
    """A client that asks for the stream and then never reads (a tiny receive window)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    request = f"GET {STREAM} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
    await loop.sock_sendall(sock, request.encode())
    return sock


async def _read_to_the_end(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    received = b""
    while chunk := await loop.sock_recv(sock, 65536):
        received += chunk
    return received


@pytest.mark.settings(events_stream_buffer=50)
async def test_a_subscriber_that_never_reads_is_disconnected_and_the_others_keep_receiving(
    served: Gateway, db_pool: asyncpg.Pool
) -> None:
    gateway = served
    stuck = await _stuck_client(gateway.settings.http_port)
    try:
        async with Stream(base(gateway)) as reader:
            await eventually(lambda: _metric(gateway, "event_stream_subscribers") == 2)
            written = 0
            # fill the stuck client's socket buffers (4 kB events), then its 50 events
            while _metric(gateway, "event_stream_slow_disconnects_total") == 0:
                assert written < 10000, "the stuck client was never disconnected"
                await emit(db_pool, "D1", 100, pad=4000)
                written += 100
                await eventually(reader.ids, lambda ids, w=written: len(ids) == w)
            await emit(db_pool, "D1", 100)
            written += 100
            await eventually(reader.ids, lambda ids: ids == list(range(1, written + 1)))
            assert _metric(gateway, "event_stream_subscribers") == 1
        # the stuck client, reading at last, gets what was on its way, then the end
        rest = await asyncio.wait_for(_read_to_the_end(stuck), 10)
        assert rest.startswith(b"HTTP/1.1 200")
    finally:
        stuck.close()


# ---------------------------------------------------------------- heartbeats, filters


@pytest.mark.settings(events_heartbeat_s=0.2)
async def test_an_idle_stream_sends_heartbeats(served: Gateway) -> None:
    async with Stream(base(served)) as stream:
        await eventually(lambda: stream.comments, lambda n: n >= 3, timeout=5)
        assert stream.messages == []


async def test_filters_choose_types_devices_gateways_and_protocol(
    served: Gateway, db_pool: asyncpg.Pool
) -> None:
    url = base(served)
    async with (
        Stream(url, params={"types": "order.*,device.offline"}) as by_type,
        Stream(url, params={"device_id": ["D1,D2", "D3"]}) as by_device,
        Stream(url, params={"gateway_id": "G1"}) as by_gateway,
        Stream(url, params={"protocol": "bkv", "types": "ban.*"}) as by_protocol,
    ):
        await emit(db_pool, "D1", type_name="order.created", gateway_id="G1", protocol="bkv")
        await emit(db_pool, "D2", type_name="device.offline", gateway_id="G2", protocol="ap3000")
        await emit(db_pool, "D3", type_name="ban.placed", gateway_id="G1", protocol="bkv")
        await emit(db_pool, "D4", type_name="device.online", gateway_id="G1", protocol="bkv")
        await emit(db_pool, "D5", type_name="order.settled", gateway_id="G3", protocol="ap3000")
        await eventually(lambda: served.events.last_id, lambda n: n == 5)
        expected = {by_type: [1, 2, 5], by_device: [1, 2, 3], by_gateway: [1, 3, 4]}
        expected[by_protocol] = [3]
        for stream, ids in expected.items():
            await eventually(lambda s=stream: s.ids(), lambda got, i=ids: got == i)
    async with httpx.AsyncClient(base_url=url) as api:
        pulled = await api.get("/api/v1/events", params={"types": "order.*,device.offline"})
        assert [e["id"] for e in pulled.json()["items"]] == [1, 2, 5]
        pulled = await api.get("/api/v1/events", params=[("device_id", "D1"), ("device_id", "D3")])
        assert [e["id"] for e in pulled.json()["items"]] == [1, 3]
        pulled = await api.get("/api/v1/events", params={"gateway_id": "G1", "protocol": "bkv"})
        assert [e["id"] for e in pulled.json()["items"]] == [1, 3, 4]


# ---------------------------------------------------------------- gaps, resets, the end


async def test_a_resume_from_before_retention_says_what_was_lost(
    served: Gateway, db_pool: asyncpg.Pool
) -> None:
    await db_pool.execute(
        """SELECT emit_event('ban.placed', 'OLD', NULL, NULL, NULL, NULL, '{}',
                             now() - interval '40 days') FROM generate_series(1, 4)"""
    )
    await emit(db_pool, "NEW", 2)
    await eventually(lambda: served.events.last_id, lambda n: n == 6)
    assert await served.events.purge_expired() == 4
    async with Stream(base(served), headers={"Last-Event-ID": "2"}) as stream:
        await eventually(stream.ids, lambda ids: ids == [5, 6])
    assert stream.messages[0] == Sse(None, "stream.gap", {"after": 2, "purged_through": 4})


async def test_a_last_event_id_beyond_the_newest_resets_to_live(
    served: Gateway, db_pool: asyncpg.Pool
) -> None:
    await emit(db_pool, "D1", 3)
    await eventually(lambda: served.events.last_id, lambda n: n == 3)
    async with Stream(base(served), headers={"Last-Event-ID": "500"}) as stream:
        await eventually(lambda: stream.messages, lambda m: len(m) == 1)
        await emit(db_pool, "D1", 1)
        await eventually(stream.ids, lambda ids: ids == [4])
    assert stream.messages[0] == Sse(None, "stream.reset", {"after": 500, "last_id": 3})


async def test_streams_end_cleanly_when_the_gateway_stops(db_dsn: str) -> None:
    gateway = Gateway(settings_for(db_dsn, http_port=free_port()))
    await gateway.start()
    try:
        async with Stream(base(gateway)) as stream:
            await eventually(lambda: _metric(gateway, "event_stream_subscribers") == 1)
            await asyncio.wait_for(gateway.stop(), 10)
            await stream.finished()
            assert stream.ended and stream.error is None
    finally:
        await gateway.stop()


# ---------------------------------------------------------------- bad input


async def test_bad_input_is_a_422_naming_the_field(served: Gateway) -> None:
    url = base(served)
    async with Stream(url, headers={"Last-Event-ID": "12abc"}) as stream:
        pass
    assert stream.status == 422
    assert json.loads(stream.body)["error"]["field"] == "Last-Event-ID"
    async with Stream(url, params={"types": "order.*,nosuch.type"}) as stream:
        pass
    assert stream.status == 422
    error = json.loads(stream.body)["error"]
    assert error["field"] == "types" and "nosuch.type" in error["message"]
    async with httpx.AsyncClient(base_url=url) as api:
        for params, field in [
            ({"types": "Order.Settled"}, "types"),
            ({"after": "-1"}, "after"),
            ({"after": "x"}, "after"),
            ({"limit": "0"}, "limit"),
            ({"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, "since"),
            ({"cursor": "not-a-cursor"}, "cursor"),
            ({"protocol": "ocpp"}, "protocol"),
        ]:
            answer = await api.get("/api/v1/events", params=params)
            assert answer.status_code == 422, (params, answer.text)
            assert answer.json()["error"]["field"] == field, (params, answer.text)
        missing = await api.get("/api/v1/events/12345")
        assert missing.status_code == 404
        assert (await api.get("/api/v1/events/0")).status_code == 422


# ---------------------------------------------------------------- the pull API


async def test_the_pull_api_pages_in_id_order_within_a_window(
    served: Gateway, db_pool: asyncpg.Pool
) -> None:
    await db_pool.execute(
        """SELECT emit_event('ban.placed', 'OLD', NULL, NULL, NULL, NULL, '{}',
                             now() - interval '2 days') FROM generate_series(1, 10)"""
    )
    await emit(db_pool, "D1", 240)
    await eventually(lambda: served.events.last_id, lambda n: n == 250)
    async with httpx.AsyncClient(base_url=base(served)) as api:
        ids: list[int] = []
        params: dict[str, Any] = {"limit": 100}
        pages = 0
        while True:
            page = (await api.get("/api/v1/events", params=params)).json()
            pages += 1
            ids += [e["id"] for e in page["items"]]
            if page["next_cursor"] is None:
                break
            params["cursor"] = page["next_cursor"]
        assert pages == 3 and ids == list(range(1, 251))
        after = (await api.get("/api/v1/events", params={"after": 245})).json()
        assert [e["id"] for e in after["items"]] == [246, 247, 248, 249, 250]
        recent = await api.get("/api/v1/events", params={"since": "2000-01-01", "limit": 1000})
        assert len(recent.json()["items"]) == 250
        window = await api.get(
            "/api/v1/events",
            params={
                "until": (await db_pool.fetchval("SELECT now() - interval '1 day'")).isoformat()
            },
        )
        assert [e["device_id"] for e in window.json()["items"]] == ["OLD"] * 10
        one = (await api.get("/api/v1/events/17")).json()
        assert one["id"] == 17 and one["type"] == "ban.placed" and one["n"] == 7
        catalogue = (await api.get("/api/v1/event-types")).json()["items"]
        settled = next(t for t in catalogue if t["name"] == "order.settled")
        assert "amount_cent" in settled["data"] and settled["data_schema"]["type"] == "object"
