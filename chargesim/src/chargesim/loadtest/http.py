"""An open-loop HTTP load on chargegw's API while the piles run (``--http-load``).

Requests arrive at fixed rates per endpoint, whatever the server answers: a request's
latency runs from the moment it was due, so time spent waiting for a free connection or
behind a slow answer counts (a closed loop would hide it by sending less). The endpoints:

- ``device_detail``: ``GET /api/v1/devices/{id}`` of a random pile of the fleet;
- ``device_list``: ``GET /api/v1/devices?limit=N``, walking the pages by ``next_cursor``;
- ``order_list``: ``GET /api/v1/orders?limit=N`` (the newest orders);
- ``start``: ``POST /api/v1/devices/{id}/ports/{port}/start`` on distinct ports;
- ``stop``: ``POST .../stop`` on the same port ``stop_after_s`` after its start.

The load piles refuse a start (AP3000 result 1, BKV result 0: no charger plugged), so the
start's command row finishes as soon as the pile answers and its order fails; the stop
that follows is answered 409 (no open order), which counts as expected.

The requests go out from ``processes`` child processes (``python -m
chargesim.loadtest.http CONFIG_JSON``, the API key in ``CHARGESIM_HTTP_KEY``), each with
its share of every rate and a small HTTP/1.1 client on asyncio streams that keeps
connections alive (at most ``connections`` at once). A child reports its own CPU time
and how late it dispatched requests, so a generator that cannot keep up shows.
Children talk JSON Lines: ``ready`` on stdout, ``{"cmd": "go", "at": EPOCH}`` on stdin,
then one ``result`` line.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import heapq
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, NamedTuple
from urllib.parse import quote, urlsplit

from chargegw.core import bkv_device_id
from chargesim.loadtest import frames
from chargesim.loadtest.stats import Histogram, cpu_seconds

DETAIL: Final = "device_detail"
LIST: Final = "device_list"
ORDERS: Final = "order_list"
START: Final = "start"
STOP: Final = "stop"
#: report order
ENDPOINTS: Final = (DETAIL, LIST, ORDERS, START, STOP)
#: statuses that are not errors, per endpoint (a stop after a refused start: 409)
EXPECTED: Final[Mapping[str, frozenset[int]]] = {
    DETAIL: frozenset({200}),
    LIST: frozenset({200}),
    ORDERS: frozenset({200}),
    START: frozenset({202}),
    STOP: frozenset({202, 409}),
}
#: command rows in these statuses are finished; acked and failed are the pile's answers
FINAL_STATUSES: Final = ("acked", "failed", "dead")
ANSWERED: Final = ("acked", "failed")
#: the key reaches the children through the environment, not their command line
KEY_ENV: Final = "CHARGESIM_HTTP_KEY"
BEGIN: Final = "<!-- load-http:begin -->"
END: Final = "<!-- load-http:end -->"
#: arrivals of the endpoints are offset by fractions of their interval, so they interleave
_GOLDEN: Final = 0.6180339887
_MAX_HEAD: Final = 64 * 1024
_READ: Final = 65536
_LINE_LIMIT: Final = 64 * 1024 * 1024
_START_BODY: Final = b'{"mode":"full"}'
#: idle connections opened before the load, per process
_WARM: Final = 8


class HttpLoadError(Exception):
    """The HTTP load cannot run (a bad spec, a child that fails)."""


# --- the specification ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HttpLoadSpec:
    """Rates (requests per second) and bounds of one HTTP load."""

    detail_rate: float = 500.0
    list_rate: float = 20.0
    orders_rate: float = 20.0
    start_rate: float = 50.0
    #: each start is followed by a stop of the same port this much later (0: no stops)
    stop_after_s: float = 5.0
    #: page size of the device and order lists
    page: int = 50
    duration_s: float = 60.0
    #: after the steady phase begins, this long without HTTP load (the "before" window)
    delay_s: float = 15.0
    processes: int = 1
    #: connections per process at most (requests beyond wait for one, and that counts)
    connections: int = 64
    timeout_s: float = 10.0

    def rates(self) -> dict[str, float]:
        """Target requests per second by endpoint (stops: at the rate of the starts)."""
        return {
            DETAIL: self.detail_rate,
            LIST: self.list_rate,
            ORDERS: self.orders_rate,
            START: self.start_rate,
            STOP: self.start_rate if self.stop_after_s > 0 else 0.0,
        }


#: ``--http-load`` keys -> (field, type)
_SPEC_KEYS: Final[Mapping[str, tuple[str, type]]] = {
    "detail": ("detail_rate", float),
    "list": ("list_rate", float),
    "orders": ("orders_rate", float),
    "start": ("start_rate", float),
    "stop_after": ("stop_after_s", float),
    "page": ("page", int),
    "duration": ("duration_s", float),
    "delay": ("delay_s", float),
    "processes": ("processes", int),
    "connections": ("connections", int),
    "timeout": ("timeout_s", float),
}


def parse_spec(text: str) -> HttpLoadSpec:
    """``detail=500,start=50,duration=60`` (keys of :data:`_SPEC_KEYS`, the rest default;
    ``default`` or nothing: all defaults). ``ValueError`` names what is wrong."""
    values: dict[str, Any] = {}
    for raw in text.split(","):
        item = raw.strip()
        if not item or item == "default":
            continue
        name, sep, value = item.partition("=")
        key = name.strip().replace("-", "_")
        if not sep or key not in _SPEC_KEYS:
            known = ", ".join(_SPEC_KEYS)
            raise ValueError(f"expected KEY=VALUE with KEY one of {known}, not {item!r}")
        field, kind = _SPEC_KEYS[key]
        try:
            values[field] = kind(value.strip())
        except ValueError:
            raise ValueError(f"{key}: not a number: {value!r}") from None
    spec = HttpLoadSpec(**values)
    rates = (spec.detail_rate, spec.list_rate, spec.orders_rate, spec.start_rate)
    if any(r < 0 or not math.isfinite(r) for r in rates) or not any(rates):
        raise ValueError("rates are numbers of at least 0, and one of them more")
    if not 0 < spec.duration_s <= 3600 or spec.delay_s < 0 or spec.stop_after_s < 0:
        raise ValueError("duration is 0-3600 s; delay and stop_after at least 0")
    if not 1 <= spec.page <= 1000:
        raise ValueError("page is 1-1000")
    if not 1 <= spec.processes <= 16 or not 1 <= spec.connections <= 4096:
        raise ValueError("processes is 1-16, connections 1-4096")
    if spec.timeout_s <= 0:
        raise ValueError("timeout must be positive")
    return spec


# --- the schedule --------------------------------------------------------------------------


class Arrival(NamedTuple):
    """A request due ``t`` seconds after the load's start; ``seq``: its index among the
    endpoint's arrivals of all processes (a start and its stop share it)."""

    t: float
    endpoint: str
    seq: int


def arrival_count(rate: float, duration_s: float, phase: float = 0.0) -> int:
    """How many arrivals ``(j + phase) / rate`` fall before ``duration_s`` (all processes)."""
    if rate <= 0 or duration_s <= 0:
        return 0
    return max(0, math.ceil(duration_s * rate - phase))


def arrival_times(
    rate: float, duration_s: float, *, worker: int = 0, workers: int = 1, phase: float = 0.0
) -> Iterator[tuple[float, int]]:
    """``(t, j)`` of this worker's share of the arrivals at a fixed ``rate``: the j-th
    arrival of all workers is due at ``(j + phase) / rate`` and belongs to worker
    ``j % workers``, so the workers together keep the rate and its even spacing."""
    if rate <= 0:
        return
    j = worker
    while (t := (j + phase) / rate) < duration_s:
        yield t, j
        j += workers


def _phase(index: int) -> float:
    return (index * _GOLDEN) % 1.0


def schedule(spec: HttpLoadSpec, worker: int = 0, workers: int = 1) -> Iterator[Arrival]:
    """This worker's arrivals of every endpoint, in time order. A stop follows each
    start by ``stop_after_s`` (only those due within the duration)."""
    streams: list[Iterator[Arrival]] = []
    rates = spec.rates()
    for index, endpoint in enumerate((DETAIL, LIST, ORDERS, START)):
        times = arrival_times(
            rates[endpoint],
            spec.duration_s,
            worker=worker,
            workers=workers,
            phase=_phase(index),
        )
        streams.append(_arrivals(times, endpoint))
    if spec.stop_after_s > 0:
        times = arrival_times(
            spec.start_rate,
            spec.duration_s - spec.stop_after_s,
            worker=worker,
            workers=workers,
            phase=_phase(3),
        )
        streams.append(_arrivals(times, STOP, spec.stop_after_s))
    return heapq.merge(*streams, key=lambda a: a.t)


def _arrivals(
    times: Iterator[tuple[float, int]], endpoint: str, shift: float = 0.0
) -> Iterator[Arrival]:
    for t, j in times:
        yield Arrival(t + shift, endpoint, j)


def planned(spec: HttpLoadSpec) -> dict[str, int]:
    """Arrivals of every endpoint, all processes together."""
    rates = spec.rates()
    out = {
        endpoint: arrival_count(rates[endpoint], spec.duration_s, _phase(i))
        for i, endpoint in enumerate((DETAIL, LIST, ORDERS, START))
    }
    out[STOP] = 0
    if spec.stop_after_s > 0:
        out[STOP] = arrival_count(spec.start_rate, spec.duration_s - spec.stop_after_s, _phase(3))
    return out


# --- the fleet -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Fleet:
    """The load piles, as the runner numbers them (AP3000 piles, then BKV gateways)."""

    id_start: int
    ap3000: int
    ap3000_ports: int
    bkv: int
    bkv_sockets: int
    #: ports (jacks) of a BKV socket
    bkv_ports: int = 2

    def device_ids(self) -> list[str]:
        """Every device: AP3000 piles by physical id, BKV sockets as ``<gateway>-<n>``."""
        out = [
            frames.ap3000_identity(self.id_start + i, self.ap3000_ports)[0]
            for i in range(self.ap3000)
        ]
        for i in range(self.bkv):
            gateway_id = frames.bkv_identity(self.id_start + i)[0]
            out.extend(bkv_device_id(gateway_id, s) for s in range(1, self.bkv_sockets + 1))
        return out

    def control_targets(self, seed: int) -> list[tuple[str, int]]:
        """Every (device, port), shuffled with ``seed``: the n-th start goes to the n-th."""
        out: list[tuple[str, int]] = []
        for device_id in self.device_ids():
            ports = self.bkv_ports if "-" in device_id else self.ap3000_ports
            out.extend((device_id, port) for port in range(1, ports + 1))
        random.Random(seed).shuffle(out)
        return out


# --- the client ----------------------------------------------------------------------------


class HttpError(Exception):
    """A response that is not HTTP/1.x as this client reads it."""


@dataclasses.dataclass(slots=True)
class Response:
    """One HTTP response: status, headers (names in lower case), body."""

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def keep_alive(self) -> bool:
        """The connection may carry another request."""
        return "close" not in self.headers.get("connection", "").lower()


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """Status and headers of a response head (without its blank line)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise HttpError(f"bad status line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise HttpError(f"bad header line {line[:80]!r}")
        key = name.decode("latin-1").lower()
        text = value.strip().decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return int(parts[1]), headers


class ResponseParser:
    """Responses from the bytes of one connection, fed as they arrive (sans I/O): bodies
    by ``Content-Length``, ``Transfer-Encoding: chunked``, or up to the end of the
    connection (:meth:`eof`). Interim (1xx) responses are skipped."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._head: tuple[int, dict[str, str]] | None = None
        #: "length", "chunked" or "eof", while a body is read
        self._mode = ""
        self._left = 0
        #: chunked: -1 while a size line is due, -2 in the trailer
        self._chunk = -1
        self._body = bytearray()

    def feed(self, data: bytes) -> list[Response]:
        """Every response the bytes so far complete."""
        self._buf += data
        out: list[Response] = []
        while (response := self._step()) is not None:
            out.append(response)
        return out

    def eof(self) -> Response | None:
        """The connection ended: the response whose body ran to its end, if one did;
        ``HttpError`` for a response cut short."""
        if self._head is not None and self._mode == "eof":
            self._body += self._buf
            self._buf.clear()
            return self._finish()
        if self._head is not None or self._buf:
            raise HttpError("connection closed inside a response")
        return None

    def _finish(self) -> Response:
        assert self._head is not None
        status, headers = self._head
        response = Response(status, headers, bytes(self._body))
        self._head, self._mode, self._chunk = None, "", -1
        self._body = bytearray()
        return response

    def _step(self) -> Response | None:
        buf = self._buf
        if self._head is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    raise HttpError("response head too large")
                return None
            status, headers = parse_head(bytes(buf[:end]))
            del buf[: end + 4]
            if 100 <= status < 200:
                return self._step()  # interim: the real response follows
            self._head = (status, headers)
            if status in (204, 304):
                return self._finish()
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self._mode = "chunked"
            elif "content-length" in headers:
                try:
                    self._left = int(headers["content-length"])
                except ValueError:
                    raise HttpError("bad Content-Length") from None
                if self._left < 0:
                    raise HttpError("bad Content-Length")
                self._mode = "length"
            else:
                self._mode = "eof"
        if self._mode == "length":
            if len(buf) < self._left:
                return None
            self._body += buf[: self._left]
            del buf[: self._left]
            return self._finish()
        if self._mode == "chunked":
            return self._chunked()
        return None

    def _chunked(self) -> Response | None:
        buf = self._buf
        while True:
            if self._chunk == -1:
                end = buf.find(b"\r\n")
                if end < 0:
                    return None
                size = bytes(buf[:end]).split(b";", 1)[0].strip()
                try:
                    self._chunk = int(size, 16)
                except ValueError:
                    raise HttpError(f"bad chunk size {size[:20]!r}") from None
                del buf[: end + 2]
                if self._chunk == 0:
                    self._chunk = -2
            if self._chunk == -2:  # trailer fields, then a blank line
                if buf.startswith(b"\r\n"):
                    del buf[:2]
                    return self._finish()
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return None
                del buf[: end + 4]
                return self._finish()
            if len(buf) < self._chunk + 2:
                return None
            if buf[self._chunk : self._chunk + 2] != b"\r\n":
                raise HttpError("chunk not followed by CRLF")
            self._body += buf[: self._chunk]
            del buf[: self._chunk + 2]
            self._chunk = -1


def build_request(
    method: str,
    target: str,
    host: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes | None = None,
) -> bytes:
    """The bytes of an HTTP/1.1 request (keep-alive; a JSON body when given)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    if body is not None:
        lines.append("Content-Type: application/json")
    if body is not None or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body or b'')}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


class _Connection:
    """One keep-alive connection: a request, then its response, and again."""

    __slots__ = ("parser", "reader", "used", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = ResponseParser()
        self.used = False

    async def exchange(self, data: bytes) -> Response:
        self.used = True
        self.writer.write(data)
        while True:
            chunk = await self.reader.read(_READ)
            if not chunk:
                last = self.parser.eof()
                if last is None:
                    raise ConnectionResetError("the server closed the connection")
                return last
            got = self.parser.feed(chunk)
            if got:
                return got[0]

    @property
    def closed(self) -> bool:
        return self.reader.at_eof() or self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()


class ConnectionPool:
    """At most ``limit`` keep-alive connections to one server; a request waits for a
    free one. A connection the server closed while it was idle is replaced once."""

    def __init__(self, host: str, port: int, limit: int) -> None:
        self.host = host
        self.port = port
        self._slots = asyncio.Semaphore(limit)
        self._idle: list[_Connection] = []
        self.opened = 0
        self.retried = 0

    async def _open(self) -> _Connection:
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        self.opened += 1
        return _Connection(reader, writer)

    async def warm(self, count: int) -> None:
        """Open ``count`` idle connections ahead of the load."""
        opened = await asyncio.gather(*(self._open() for _ in range(count)))
        self._idle.extend(opened)

    async def request(self, data: bytes) -> Response:
        """Send ``data`` on a free connection and read its response."""
        async with self._slots:
            conn = None
            while self._idle and conn is None:
                conn = self._idle.pop()  # the most recently used: least likely timed out
                if conn.closed:
                    conn.close()
                    conn = None
            reused = conn is not None and conn.used
            if conn is None:
                conn = await self._open()
            try:
                response = await conn.exchange(data)
            except (ConnectionError, HttpError):
                conn.close()
                if not reused:
                    raise
                self.retried += 1  # closed by the server between two requests: once more
                conn = await self._open()
                try:
                    response = await conn.exchange(data)
                except BaseException:
                    conn.close()
                    raise
            except BaseException:
                conn.close()
                raise
            if response.keep_alive:
                self._idle.append(conn)
            else:
                conn.close()
            return response

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


# --- one process ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """What one load process does (JSON on its command line)."""

    spec: HttpLoadSpec
    api: str
    fleet: Fleet
    worker: int = 0
    workers: int = 1
    seed: int = 1

    def to_json(self) -> str:
        """The JSON form for the command line."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        """Inverse of :meth:`to_json`."""
        data = json.loads(text)
        return cls(spec=HttpLoadSpec(**data.pop("spec")), fleet=Fleet(**data.pop("fleet")), **data)


@dataclasses.dataclass
class Recorder:
    """What a process measured: per endpoint, latencies (ms, from the moment each
    request was due) and statuses or exceptions; the commands accepted; dispatch lag."""

    latency_ms: dict[str, list[float]] = dataclasses.field(
        default_factory=lambda: {e: [] for e in ENDPOINTS}
    )
    statuses: dict[str, collections.Counter[str]] = dataclasses.field(
        default_factory=lambda: {e: collections.Counter() for e in ENDPOINTS}
    )
    scheduled: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    commands: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    lag_ms: list[float] = dataclasses.field(default_factory=list)

    def response(self, endpoint: str, status: int, latency_ms: float) -> None:
        self.latency_ms[endpoint].append(round(latency_ms, 3))
        self.statuses[endpoint][str(status)] += 1

    def failure(self, endpoint: str, what: str) -> None:
        self.statuses[endpoint][what] += 1


class Worker:
    """One process's share of the load."""

    def __init__(self, config: WorkerConfig, key: str | None) -> None:
        self.config = config
        self.spec = config.spec
        url = urlsplit(config.api)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 80
        self.authority = url.netloc
        self.headers: tuple[tuple[str, str], ...] = (
            (("Authorization", f"Bearer {key}"),) if key else ()
        )
        self.devices = config.fleet.device_ids()
        self.targets = config.fleet.control_targets(config.seed)
        self.rng = random.Random(config.seed * 1000 + config.worker)
        self.pool = ConnectionPool(self.host, self.port, self.spec.connections)
        self.rec = Recorder()
        self.cursor: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def request_for(self, arrival: Arrival) -> tuple[bytes, str, int]:
        """The request bytes of an arrival, and its (device, port) for a start or stop."""
        endpoint = arrival.endpoint
        if endpoint == DETAIL:
            device = self.devices[self.rng.randrange(len(self.devices))]
            return self._get(f"/api/v1/devices/{quote(device, safe='')}"), device, 0
        if endpoint == LIST:
            query = f"limit={self.spec.page}"
            if self.cursor:
                query += f"&cursor={quote(self.cursor, safe='')}"
            return self._get(f"/api/v1/devices?{query}"), "", 0
        if endpoint == ORDERS:
            return self._get(f"/api/v1/orders?limit={self.spec.page}"), "", 0
        device, port = self.targets[arrival.seq % len(self.targets)]
        path = f"/api/v1/devices/{quote(device, safe='')}/ports/{port}/{endpoint}"
        body = _START_BODY if endpoint == START else None
        data = build_request("POST", path, self.authority, self.headers, body)
        return data, device, port

    def _get(self, target: str) -> bytes:
        return build_request("GET", target, self.authority, self.headers)

    async def run(self, at: float) -> dict[str, Any]:
        """The load from the wall-clock moment ``at``; the result line."""
        loop = asyncio.get_running_loop()
        clock = time.perf_counter  # uvloop's loop.time() is cached, in whole milliseconds
        start = clock() + (at - time.time())
        await asyncio.sleep(max(0.0, start - clock()))
        cpu0, wall0 = cpu_seconds() or 0.0, clock()
        for arrival in schedule(self.spec, self.config.worker, self.config.workers):
            due = start + arrival.t
            delay = due - clock()
            if delay > 0.0:
                await asyncio.sleep(delay)
            self.rec.lag_ms.append((clock() - due) * 1000.0)
            self.rec.scheduled[arrival.endpoint] += 1
            task = loop.create_task(self._one(arrival, due, at + arrival.t))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.spec.timeout_s + 5.0)
        wall = clock() - wall0
        cpu = (cpu_seconds() or 0.0) - cpu0
        self.pool.close()
        rec = self.rec
        return {
            "type": "result",
            "worker": self.config.worker,
            "scheduled": dict(rec.scheduled),
            "latency_ms": rec.latency_ms,
            "statuses": {e: dict(c) for e, c in rec.statuses.items()},
            "commands": rec.commands,
            "lag_ms": quantiles(rec.lag_ms),
            "cpu_s": round(cpu, 3),
            "wall_s": round(wall, 3),
            "connections_opened": self.pool.opened,
            "connections_retried": self.pool.retried,
        }

    async def _one(self, arrival: Arrival, due: float, t_api: float) -> None:
        endpoint = arrival.endpoint
        data, device, port = self.request_for(arrival)
        try:
            async with asyncio.timeout(self.spec.timeout_s):
                response = await self.pool.request(data)
        except TimeoutError:
            self.rec.failure(endpoint, "timeout")
            return
        except (OSError, HttpError) as exc:
            self.rec.failure(endpoint, type(exc).__name__)
            return
        self.rec.response(endpoint, response.status, (time.perf_counter() - due) * 1000.0)
        if endpoint == LIST:
            self.cursor = _next_cursor(response) if response.status == 200 else None
        elif endpoint in (START, STOP) and response.status == 202:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                self.rec.commands.append(
                    {
                        "kind": endpoint,
                        "command_id": int(json.loads(response.body)["command_id"]),
                        "device": device,
                        "port": port,
                        "t_api": round(t_api, 6),
                    }
                )


def _next_cursor(response: Response) -> str | None:
    with contextlib.suppress(ValueError, AttributeError):
        cursor = json.loads(response.body).get("next_cursor")
        return cursor if isinstance(cursor, str) else None
    return None


def _print(item: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(item, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def run_worker(config: WorkerConfig, key: str | None) -> None:
    """Warm the connections, report ``ready``, run on ``go``, report the result."""
    worker = Worker(config, key)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    warm = min(config.spec.connections, _WARM)
    try:
        await worker.pool.warm(warm)
    except OSError as exc:
        _print({"type": "error", "error": f"{type(exc).__name__}: {exc}"})
        return
    _print({"type": "ready", "devices": len(worker.devices), "targets": len(worker.targets)})
    while line := await reader.readline():
        command = json.loads(line)
        if command.get("cmd") == "go":
            _print(await worker.run(float(command["at"])))
            return


def main(argv: list[str] | None = None) -> None:
    """``python -m chargesim.loadtest.http CONFIG_JSON`` (the key in ``$CHARGESIM_HTTP_KEY``)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python -m chargesim.loadtest.http CONFIG_JSON")
    config = WorkerConfig.from_json(args[0])
    key = os.environ.get(KEY_ENV)
    try:
        import uvloop
    except ImportError:
        asyncio.run(run_worker(config, key))
    else:
        uvloop.run(run_worker(config, key))


# --- the runner's side ---------------------------------------------------------------------


class HttpLoad:
    """The load processes of one run: started ahead, run at a given moment, collected."""

    def __init__(
        self, spec: HttpLoadSpec, api: str, api_key: str | None, fleet: Fleet, seed: int
    ) -> None:
        self.spec = spec
        self.configs = [
            WorkerConfig(spec, api, fleet, worker=k, workers=spec.processes, seed=seed)
            for k in range(spec.processes)
        ]
        self.api_key = api_key
        self.procs: list[asyncio.subprocess.Process] = []
        self.stderr: collections.deque[str] = collections.deque(maxlen=40)

    async def start(self, timeout: float = 60.0) -> None:
        """Start the processes and wait until each has its connections open."""
        env = dict(os.environ)
        if self.api_key:
            env[KEY_ENV] = self.api_key
        for config in self.configs:
            self.procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "chargesim.loadtest.http",
                    config.to_json(),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    env=env,
                    limit=_LINE_LIMIT,
                )
            )
        try:
            async with asyncio.timeout(timeout):
                for proc in self.procs:
                    line = await self._line(proc)
                    if line.get("type") != "ready":
                        raise HttpLoadError(f"an HTTP load process failed: {line}")
        except TimeoutError:
            raise HttpLoadError("the HTTP load processes did not start") from None

    async def _line(self, proc: asyncio.subprocess.Process) -> dict[str, Any]:
        assert proc.stdout is not None and proc.stderr is not None
        raw = await proc.stdout.readline()
        if not raw:
            tail = (await proc.stderr.read()).decode(errors="replace").strip().splitlines()
            raise HttpLoadError("an HTTP load process exited: " + "\n".join(tail[-15:]))
        item: dict[str, Any] = json.loads(raw)
        return item

    async def run(self, at: float) -> list[dict[str, Any]]:
        """Start every process's load at the wall-clock moment ``at``; their results."""
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write((json.dumps({"cmd": "go", "at": at}) + "\n").encode())
            await proc.stdin.drain()
        budget = at - time.time() + self.spec.duration_s + self.spec.timeout_s + 30.0
        async with asyncio.timeout(budget):
            return list(await asyncio.gather(*(self._line(p) for p in self.procs)))

    async def close(self) -> None:
        """Stop the processes (they exit by themselves after their result)."""
        for proc in self.procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        for proc in self.procs:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await proc.wait()
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


# --- the report ----------------------------------------------------------------------------


def quantiles(values: Iterable[float], qs: Sequence[float] = (50, 90, 99)) -> dict[str, Any]:
    """Exact ``{"count", "p50", "p90", "p99", "max"}`` (nearest rank), in the values' unit."""
    ordered = sorted(values)
    out: dict[str, Any] = {"count": len(ordered)}
    for q in qs:
        key = f"p{q:g}"
        out[key] = (
            round(ordered[max(0, math.ceil(len(ordered) * q / 100.0) - 1)], 2) if ordered else None
        )
    out["max"] = round(ordered[-1], 2) if ordered else None
    return out


def endpoint_report(
    spec: HttpLoadSpec, results: Sequence[Mapping[str, Any]], window_s: float
) -> dict[str, dict[str, Any]]:
    """Per endpoint, all processes: target and achieved rates, latency quantiles, every
    status and exception, and the errors (what :data:`EXPECTED` does not admit)."""
    rates = spec.rates()
    out: dict[str, dict[str, Any]] = {}
    for endpoint in ENDPOINTS:
        if rates[endpoint] <= 0:
            continue
        latencies: list[float] = []
        statuses: collections.Counter[str] = collections.Counter()
        scheduled = 0
        for result in results:
            latencies.extend(result["latency_ms"].get(endpoint, ()))
            statuses.update(result["statuses"].get(endpoint, {}))
            scheduled += int(result["scheduled"].get(endpoint, 0))
        expected = {str(s) for s in EXPECTED[endpoint]}
        ok = sum(n for s, n in statuses.items() if s in expected)
        out[endpoint] = {
            "target_per_s": rates[endpoint],
            "scheduled": scheduled,
            "sent_per_s": round(scheduled / window_s, 1) if window_s > 0 else None,
            "answered_per_s": round(len(latencies) / window_s, 1) if window_s > 0 else None,
            "ok": ok,
            "latency_ms": quantiles(latencies),
            "statuses": dict(sorted(statuses.items())),
            "errors": {s: n for s, n in sorted(statuses.items()) if s not in expected},
        }
    return out


def _epoch(value: Any) -> float | None:
    if value is None:
        return None
    if hasattr(value, "timestamp"):
        return float(value.timestamp())
    if isinstance(value, str):
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None


def ack_report(
    commands: Sequence[Mapping[str, Any]], rows: Mapping[int, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per command kind (start, stop): the commands accepted, their final statuses, and
    API-to-answer latency: from the moment the request was due (``t_api``) to the
    row's ``finished_at``, for the commands the pile answered (acked or failed)."""
    out: dict[str, dict[str, Any]] = {}
    for kind in (START, STOP):
        mine = [c for c in commands if c["kind"] == kind]
        if not mine:
            continue
        outcomes: collections.Counter[str] = collections.Counter()
        answered: list[float] = []
        to_sent: list[float] = []
        for command in mine:
            row = rows.get(int(command["command_id"]))
            status = "no row" if row is None else str(row.get("status"))
            outcomes[status] += 1
            if row is None:
                continue
            sent = _epoch(row.get("sent_at"))
            if sent is not None:
                to_sent.append((sent - command["t_api"]) * 1000.0)
            finished = _epoch(row.get("finished_at"))
            if finished is not None and status in ANSWERED:
                answered.append((finished - command["t_api"]) * 1000.0)
        out[kind] = {
            "accepted": len(mine),
            "outcomes": dict(sorted(outcomes.items())),
            "api_to_sent_ms": quantiles(to_sent),
            "api_to_answer_ms": quantiles(answered),
        }
    return out


def rtt_between(before: Histogram, after: Histogram) -> Histogram:
    """The round trips recorded between two cumulative histograms of the same piles. Its
    max is exact when the later one's max grew, else the top bucket's upper edge."""
    counts = [max(0, a - b) for a, b in zip(after.counts, before.counts, strict=True)]
    window = Histogram(counts, maximum=after.max)
    if after.max <= before.max:
        window.max = window.percentile(100) or 0.0
    return window


def client_report(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The load processes' own figures: CPU, dispatch lag, connections."""
    return {
        "processes": len(results),
        "cpu_percent": [
            round(100.0 * r["cpu_s"] / r["wall_s"], 1) if r["wall_s"] else None for r in results
        ],
        "cpu_s": [r["cpu_s"] for r in results],
        "dispatch_lag_ms": [r["lag_ms"] for r in results],
        "connections_opened": [r["connections_opened"] for r in results],
        "connections_retried": [r["connections_retried"] for r in results],
    }


def summary_lines(http: Mapping[str, Any]) -> list[str]:
    """A few readable lines of the ``http_load`` part of a run's report."""
    if http.get("error"):
        return [f"  HTTP load: {http['error']}"]
    lines = [f"  HTTP load over {http['window_s']} s (p50 / p99 / max ms, achieved/target per s):"]
    for endpoint, block in http["endpoints"].items():
        lat = block["latency_ms"]
        errors = sum(block["errors"].values())
        lines.append(
            f"    {endpoint}: {block['answered_per_s']}/{block['target_per_s']:g} per s, "
            f"{lat['p50']} / {lat['p99']} / {lat['max']} ms, errors {errors}"
        )
    for kind, block in http["commands"].items():
        lat = block["api_to_answer_ms"]
        lines.append(
            f"    {kind} to ACK: p50 {lat['p50']} ms, p99 {lat['p99']} ms ({block['outcomes']})"
        )
    rtt = http["heartbeat_rtt_ms"]
    lines.append(
        f"    heartbeat RTT p99: {rtt['before']['p99']} ms before, {rtt['during']['p99']} ms "
        f"during; client CPU {http['client']['cpu_percent']} %"
    )
    return lines


# --- docs/benchmarks.md --------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render(report: Mapping[str, Any]) -> str:
    """The markdown section (without markers) of a report's chargegw run with an HTTP load."""
    machine, versions = report["machine"], report["versions"]
    kind, run = next((k, r) for k, r in report["runs"].items() if r.get("http_load"))
    http = run["http_load"]
    lines = [
        "## HTTP API under load (`nox -s load-http`)",
        "",
        f"Measured {report['date']} on {machine['cpu_model']} ({machine['cores']} logical "
        f"CPUs, {machine['memory_gib']} GiB), Python {versions['python']}, PostgreSQL "
        f"{versions.get('postgresql') or '-'}: {kind} with "
        f"{run['piles']['ap3000']:,} AP3000 piles and {run['piles']['bkv']:,} BKV gateways "
        "running, an open-loop HTTP load on loopback for "
        f"{http.get('window_s', 0):g} s (the load generator and the piles share the cores "
        "with the server and PostgreSQL). Command:",
        "",
        "```",
        report["command"],
        "```",
    ]
    if http.get("error"):
        return "\n".join([*lines, "", f"The HTTP load did not run: {http['error']}"])
    lines += [
        "",
        "| endpoint | target/s | achieved/s | p50 ms | p90 ms | p99 ms | max ms | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for endpoint, block in http["endpoints"].items():
        lat = block["latency_ms"]
        errors = ", ".join(f"{s}: {n}" for s, n in block["errors"].items()) or "0"
        lines.append(
            f"| {endpoint} | {_cell(block['target_per_s'])} | {_cell(block['answered_per_s'])} "
            f"| {_cell(lat['p50'])} | {_cell(lat['p90'])} | {_cell(lat['p99'])} "
            f"| {_cell(lat['max'])} | {errors} |"
        )
    lines += ["", "| command | accepted | outcomes | API to ACK p50 / p99 / max ms |"]
    lines.append("|---|---|---|---|")
    for command, block in http["commands"].items():
        lat = block["api_to_answer_ms"]
        outcomes = ", ".join(f"{s} {n:,}" for s, n in block["outcomes"].items())
        lines.append(
            f"| {command} | {_cell(block['accepted'])} | {outcomes} "
            f"| {_cell(lat['p50'])} / {_cell(lat['p99'])} / {_cell(lat['max'])} |"
        )
    rtt, client = http["heartbeat_rtt_ms"], http["client"]
    before, during = rtt["before"], rtt["during"]
    lines += [
        "",
        f"Device heartbeat round trip p50 / p99: {_cell(before['p50'])} / "
        f"{_cell(before['p99'])} ms in the {_cell(rtt['before_s'])} s before the HTTP load "
        f"({_cell(before['count'])} heartbeats), {_cell(during['p50'])} / "
        f"{_cell(during['p99'])} ms during it ({_cell(during['count'])}). Server CPU (100 % = a "
        f"core): {_cell(http.get('server_cpu_percent_before'))} % before the load, "
        f"{_cell(http.get('server_cpu_percent'))} % during it, "
        f"{_cell(http.get('server_cpu_ms_per_request'))} ms per request answered above the "
        "device path's; the load generator's own CPU: "
        f"{', '.join(_cell(c) for c in client['cpu_percent'])} % of a core.",
        "",
        "Targets (issue): device detail p99 under 50 ms at 500 requests/s; start to ACK p99 "
        "under 200 ms at 50 starts/s; heartbeat p99 under 100 ms during the load. How to "
        'read it: docs/loadtest.md, "HTTP API load".',
    ]
    return "\n".join(lines)


def update_section(path: str | Path, report: Mapping[str, Any]) -> None:
    """Replace (or append) the marked HTTP-load section of ``path``."""
    from chargesim.loadtest.markdown import write_section

    write_section(path, BEGIN, END, render(report))


def window_rtt(
    before: Histogram, start: Histogram, end: Histogram, before_s: float
) -> dict[str, Any]:
    """Heartbeat round trips before the HTTP load (``before`` to ``start``) and during it."""
    return {
        "before_s": round(before_s, 1),
        "before": rtt_between(before, start).summary(),
        "during": rtt_between(start, end).summary(),
    }


def http_report(
    spec: HttpLoadSpec,
    results: Sequence[Mapping[str, Any]],
    rows: Mapping[int, Mapping[str, Any]],
    *,
    rtt: dict[str, Any],
    server_cpu_percent: tuple[float | None, float | None],
) -> dict[str, Any]:
    """The ``http_load`` part of a run's report. ``server_cpu_percent``: the server's
    CPU before the load and during it; the difference spread over the requests answered
    is what an HTTP request costs the server (``server_cpu_ms_per_request``)."""
    commands = [c for r in results for c in r["commands"]]
    endpoints = endpoint_report(spec, results, spec.duration_s)
    before, during = server_cpu_percent
    answered = sum(e["latency_ms"]["count"] for e in endpoints.values()) / spec.duration_s
    per_request = None
    if before is not None and during is not None and answered > 0:
        per_request = round((during - before) * 10.0 / answered, 3)
    return {
        "spec": dataclasses.asdict(spec),
        "window_s": spec.duration_s,
        "endpoints": endpoints,
        "commands": ack_report(commands, rows),
        "heartbeat_rtt_ms": rtt,
        "server_cpu_percent": during,
        "server_cpu_percent_before": before,
        "server_cpu_ms_per_request": per_request,
        "client": client_report(results),
    }


if __name__ == "__main__":
    main()
