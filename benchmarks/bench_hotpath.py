"""The gateway's hot path per device frame, in process: no sockets, no database.

Run with ``nox -s bench`` (``python benchmarks/bench_hotpath.py --write docs/benchmarks.md
--check``). Three frame types, each from 200 devices (200 piles, or 100 BKV gateways of
two sockets) in the steady state of a running gateway:

``ap3000-0x21``
    AP3000 heartbeat of an already registered 2-port pile (ICCID, 0x20 and a first 0x21
    were handled during the set-up), answered with its 0x21 reply.
``ap3000-0x06``
    AP3000 0x06 power heartbeat of a pile charging on port 1 (a running order): the
    values move from one report to the next, so the port row is written every time.
    The fields are those chargesim's piles send (with ``timestamp_unix``, without the
    last optional field, ``occupancy_duration_min``, as older firmware): the compliance
    module counts each such frame as a ``short_payload`` deviation, part of the cost.
``bkv-0x1017``
    BKV 0x1000/0x1017 status cluster: the periodic report of one socket (two idle
    jacks) of a simulated BKV gateway (``chargesim.bkv``), acknowledged.

What one frame costs here is what the gateway does in process for it: the bytes are
copied into the process's read buffer and handed to ``DeviceLink.buffer_updated`` as
the event loop would (the stream decoder, the frame budget, ``Gateway.on_events``, the
driver, the session registry, the state comparison of the batch writer, the audit rows,
the reply encoded and written to the transport), plus the writer's flush of its batch
every ``batch_rows`` (500) rows and the tasks a frame starts.

How the gateway is built. A real :class:`chargegw.app.Gateway` is constructed from the
default settings (``batch_interval_s`` raised so that batches are flushed by size only,
as under load; ``frame_rate_per_connection`` raised so that no frame is held back: each
connection here sends hundreds of frames a second) and *not started*: its writer task
is started, nothing else (no listener, no pool, no cluster, outbox or engines'
background passes). Three things stand in for the outside world:

* each connection is a real ``DeviceLink`` whose transport is a fake that records the
  writes (``connection_made`` runs as for an accepted socket);
* the writer's pool is a fake whose connection records the statements, the upsert
  parameters and the COPY records it is handed (``BatchWriter._pool_factory`` is
  pointed at it; the gateway's own ``pool`` stays None, so the engines find no
  database). The Python side of a flush (``_take``, ``_Batch.absorb``, ``_params``,
  the session-directory rows, the touch arrays, the COPY record lists) is measured;
  asyncpg's binary encoding of those rows is not: it happens inside
  ``copy_records_to_table``/``executemany`` of a live protocol (the table's column
  types introspected from the server), which cannot be driven without a PostgreSQL;
* ``Gateway.order_progress`` (per 0x06 frame of a charging port: once a minute the full
  check in a transaction, BEGIN, the cause, a port lock, the order lookup, the order
  row locked ``FOR UPDATE``, the sample INSERT, the status, COMMIT; in between one
  statement, the cause and the sample if the order is still charging) is replaced by a
  coroutine that returns at once: the task it runs in is created and run, the round
  trips are not. Frame ids come
  from an epoch set by hand (``FrameIds._use``), not from the database.

Starting a real gateway on a throwaway database and driving its connection objects was
the alternative; it would add the engines' and the cluster's database passes to the
loop without bringing any per-frame step closer to production: every step above is
the production code, called as production calls it.

The baseline is ``chargesim.loadtest.baseline.BaselineLink``, the struct-only server
of the load test: the same ``BufferedProtocol`` entry point, hand-written framing with
``struct``, the length, checksum and tail checks, the reply packed with ``struct``
(0x21 reply, the status-cluster ACK; 0x06 gets no reply from either), nothing stored.
It runs in the same harness and process, interleaved with the gateway, and its replies
are checked byte for byte against the gateway's.

Figures, per frame type:

* **us/frame**: wall time of ``--frames`` frames (default 20,000, round robin over the
  devices), median of ``--repeat`` runs; the ratio divides it by the baseline's median
  of the same run.
* **instructions/frame**: counted by ``valgrind --tool=callgrind``. The script runs
  itself under callgrind (``--callgrind-child``) and calls ``os.getppid()`` between
  phases, which ``--dump-before=os_getppid`` turns into one profile dump per phase:
  (set-up) (N1 frames) (N2 frames), the same for the baseline. Instructions per frame
  are (I(N2) - I(N1)) / (N2 - N1), so what a phase costs once (its boundary, a partial
  batch) cancels. If the interpreter has no ``os_getppid`` symbol (a stripped build),
  the fallback runs one process per case and N (the difference of whole runs).
  ``PYTHONHASHSEED=0`` makes the counts repeatable; they depend on the interpreter
  build and the library versions, so the budgets hold for one machine image. The
  runs under callgrind read byte code cached in a temporary directory (filled by a
  native run first): compiling the modules under callgrind would take minutes.
* **top 15**: cProfile of ``--profile-frames`` frames, by self time (``tottime``), with
  calls, self and cumulative microseconds per frame. cProfile adds a fixed cost to every
  call, which inflates small functions called often: read the ranks and the call
  counts, take the absolute microseconds from the wall-time column.

How to read them: us/frame is the CPU one frame takes in Python on one core, the floor
under the load test's "server CPU per frame" (which adds the kernel, the event loop,
asyncpg and the batch transactions); the ratio says how far it is from the least a
server must do for the frame; instructions per frame are the figure to watch for
regressions (repeatable where the wall time is not); the top 15 say where the time goes.

``--check`` compares the instructions per frame with ``benchmarks/hotpath_budget.json``
(measured + 20 %) and exits 1 naming each type over its budget; ``--update-budget``
rewrites that file from this run. ``--write FILE`` replaces the section of FILE.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import cProfile
import dataclasses
import datetime
import gc
import importlib.metadata
import io
import json
import logging
import os
import platform
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common import commit_id, machine_name, write_section

from chargegw.app import Gateway
from chargegw.config import Settings
from chargegw.logs import configure_logging
from chargegw.net.transport import DeviceLink
from chargegw.store import writer as writer_module
from chargeproto import ap3000, bkv
from chargesim.ap3000 import PortStatus, SimulatedAp3000Pile
from chargesim.bkv import SimulatedBkvGateway, bkv_gateway_id
from chargesim.loadtest.baseline import BaselineLink, BaselineServer

HERE = Path(__file__).resolve().parent
BUDGET_FILE = HERE / "hotpath_budget.json"
#: the budget is the instructions per frame measured when it was set, plus this share
MARGIN = 0.20
TITLE = "Gateway hot path per frame (`bench_hotpath.py`)"
#: callgrind dumps a profile before every call of this C function (``os.getppid``)
BOUNDARY_SYMBOL = "os_getppid"
#: tasks a burst of frames may start before the harness lets the loop run them
TASK_SLACK = 16

# --- what the measured frames come from ---------------------------------------------


@dataclasses.dataclass
class Device:
    """One connection: the bytes sent when it opens, then the frames it repeats."""

    peer: tuple[str, int]
    opening: list[bytes]
    frames: list[bytes]


@dataclasses.dataclass(frozen=True)
class Case:
    key: str
    title: str
    devices: Callable[[int], list[Device]]
    #: connections (piles, or BKV gateways of two sockets)
    connections: int


def _pile(number: int) -> SimulatedAp3000Pile:
    return SimulatedAp3000Pile("04%06X" % (0x100000 + number), signal_strength=20)


def _peer(number: int) -> tuple[str, int]:
    return (f"10.{number >> 8 & 255}.{number & 255}.7", 40000 + number % 20000)


def heartbeat_devices(count: int) -> list[Device]:
    """Registered 2-port piles sending 0x21 heartbeats (idle ports, msg ids moving)."""
    devices = []
    for n in range(count):
        pile = _pile(n)
        opening = [
            pile.preamble()[0],
            ap3000.encode(pile.registration(1)),
            ap3000.encode(pile.heartbeat(2)),
        ]
        frames = [ap3000.encode(pile.heartbeat(10 + k)) for k in range(4)]
        devices.append(Device(_peer(n), opening, frames))
    return devices


def power_devices(count: int) -> list[Device]:
    """Piles charging on port 1 (0-based 0) sending 0x06 reports whose values move."""
    devices = []
    now = int(time.time())
    for n in range(count):
        pile = _pile(n)
        pile.ports[0].status = PortStatus.CHARGING
        opening = [
            pile.preamble()[0],
            ap3000.encode(pile.registration(1)),
            ap3000.encode(pile.heartbeat(2)),
        ]
        order_id = "2026120416%022d" % n
        frames = []
        for k in range(4):  # one report a minute, as the simulator sends them
            power = 180.0 + 3.1 * k
            frames.append(
                ap3000.encode(
                    ap3000.PowerHeartbeat(
                        pile.phy_id,
                        10 + k,
                        port=0,
                        status=1,
                        duration_s=600 + 60 * k,
                        energy_kwh=round(0.03 + 0.003 * k, 2),
                        start_mode=1,
                        power_w=power,
                        max_power_w=200.0,
                        min_power_w=175.0,
                        avg_power_w=190.0,
                        order_id=order_id,
                        period_energy_raw=0,
                        peak_power_w=200.0,
                        voltage_v=pile.voltage_v,
                        current_a=round(power / pile.voltage_v, 3),
                        temperature_c=pile.temperature_c,
                        port_temperature_c=pile.temperature_c + 2,
                        timestamp_unix=now,
                    )
                )
            )
        devices.append(Device(_peer(n), opening, frames))
    return devices


def bkv_devices(count: int) -> list[Device]:
    """BKV gateways of two sockets: heartbeat, 0x1013 connect reports and a first
    status cluster per socket on opening, then one status cluster per socket."""
    devices = []
    for n in range(count):
        box = SimulatedBkvGateway(bkv_gateway_id(n + 1), sockets=2)
        sockets = list(box.sockets.values())
        opening = [bkv.encode(box.heartbeat())]
        opening += [bkv.encode(box.connect_report(s)) for s in sockets]
        opening += [bkv.encode(box.status_cluster(s)) for s in sockets]
        frames = [bkv.encode(box.status_cluster(s)) for s in sockets]
        devices.append(Device(_peer(n), opening, frames))
    return devices


CASES = [
    Case("ap3000-0x21", "AP3000 0x21 heartbeat (2 ports), answered", heartbeat_devices, 200),
    Case(
        "ap3000-0x06",
        "AP3000 0x06 power heartbeat, port charging (a `short_payload`, as chargesim's)",
        power_devices,
        200,
    ),
    Case(
        "bkv-0x1017",
        "BKV 0x1000/0x1017 status cluster (1 socket, 2 jacks), ACKed",
        bkv_devices,
        100,
    ),
]

# --- the fakes: transport, pool -----------------------------------------------------


class FakeTransport:
    """What ``DeviceLink`` (and the baseline) use of an asyncio transport; writes are
    counted and the last one kept."""

    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        self.writes = 0
        self.last = b""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.last = data

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Block:
    """An async context manager that yields ``value`` and never suspends."""

    def __init__(self, value: Any = None) -> None:
        self.value = value

    async def __aenter__(self) -> Any:
        return self.value

    async def __aexit__(self, *exc: object) -> None:
        return None


class FakeConnection:
    """The writer's database connection: records what a flush hands to asyncpg (the
    statements, the upsert parameters, the touch arrays, the COPY records)."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        #: the last COPY of each table: (columns, records)
        self.copies: dict[str, tuple[Sequence[str], list[tuple[Any, ...]]]] = {}
        self._transaction = _Block()

    def transaction(self) -> _Block:
        self.counts["transactions"] += 1
        return self._transaction

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        self.counts["statements"] += 1
        if sql is writer_module._BIND_SQL:  # every bind takes effect, as on one process
            since = datetime.datetime.now(datetime.UTC)
            self.counts["session rows"] += len(args[0])
            return [
                {"device_id": d, "connection_id": c, "connects": 1, "since": since}
                for d, c in zip(args[0], args[2], strict=True)
            ]
        return []

    async def execute(self, sql: str, *args: Any) -> str:
        self.counts["statements"] += 1
        if args and isinstance(args[0], list):  # touches and releases: unnest arrays
            self.counts["touched rows"] += len(args[0])
        return "OK"

    async def executemany(self, sql: str, args: Sequence[Sequence[Any]]) -> None:
        self.counts["statements"] += 1
        self.counts["upserted rows"] += len(args)

    async def copy_records_to_table(
        self, table: str, *, records: list[tuple[Any, ...]], columns: Sequence[str], **_: Any
    ) -> str:
        self.counts["statements"] += 1
        self.counts["COPY rows"] += len(records)
        self.copies[table] = (columns, records)
        return f"COPY {len(records)}"


class FakePool:
    """``acquire()`` of asyncpg's pool, handing out the one fake connection."""

    def __init__(self, conn: FakeConnection) -> None:
        self.conn = conn
        self._acquired = _Block(conn)

    def acquire(self, *, timeout: float | None = None) -> _Block:
        return self._acquired


class _LineCounter(io.TextIOBase):
    """The log's stream: lines counted, nothing kept."""

    def __init__(self) -> None:
        self.lines = 0

    def write(self, text: str) -> int:
        self.lines += text.count("\n")
        return len(text)


LOG_LINES = _LineCounter()


def quiet_production_logging() -> None:
    """The gateway's own logging set-up (JSON, level info), into a line counter."""
    configure_logging("json", "info")
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(LOG_LINES)


# --- the harness ---------------------------------------------------------------------


def feed(link: asyncio.BufferedProtocol, frame: bytes) -> None:
    """One read of ``frame`` as the event loop does it: get_buffer, the bytes, updated."""
    size = len(frame)
    link.get_buffer(size)[:size] = frame
    link.buffer_updated(size)


class HotPath:
    """A gateway built from its parts (see the module doc), its devices connected
    through fake transports, and the baseline's links for the same devices."""

    def __init__(self, case: Case) -> None:
        self.case = case
        self.conn = FakeConnection()
        self.progress_calls = 0
        self.cursor = 0
        self.base_cursor = 0
        #: long-lived tasks (the engines' passes, started on first use): counted at the
        #: end of the set-up, until then no task holds the harness up
        self.resident = sys.maxsize

    async def _order_progress(self, **_: Any) -> None:
        """Stands in for ``Gateway.order_progress`` (a database transaction)."""
        self.progress_calls += 1

    async def open(self) -> None:
        settings = Settings(
            dsn="postgresql://postgres@127.0.0.1:1/hotpath-not-used",
            device_host="127.0.0.1",
            device_port=0,
            accept_rate=1e6,  # the set-up connects every device at once
            # each connection here sends hundreds of frames a second (a pile: one every few
            # minutes): the budget is computed for every frame, as in production, but
            # must never hold frames back (they would then cost nothing)
            frame_rate_per_connection=1e9,
            batch_interval_s=3600.0,  # batches are flushed by size (batch_rows), as under load
        )
        gateway = self.gateway = Gateway(settings)
        pool = FakePool(self.conn)
        gateway.writer._pool_factory = lambda: pool  # type: ignore[assignment,return-value]
        gateway.writer.frame_ids._use(1)  # an epoch of frame ids, as start() fetches one
        gateway.order_progress = self._order_progress  # type: ignore[method-assign]
        gateway.writer.start()
        self.writer = gateway.writer
        self.wake = gateway.writer._wake
        self.tasks = gateway._tasks
        devices = self.case.devices(self.case.connections)
        self.links: list[DeviceLink] = []
        self.transports: list[FakeTransport] = []
        base_server = BaselineServer()
        self.base_links: list[BaselineLink] = []
        self.base_transports: list[FakeTransport] = []
        for device in devices:
            link = DeviceLink(gateway.server)
            transport = FakeTransport(device.peer)
            link.connection_made(transport)  # type: ignore[arg-type]
            self.links.append(link)
            self.transports.append(transport)
            base = BaselineLink(base_server)
            base_transport = FakeTransport(device.peer)
            base.connection_made(base_transport)  # type: ignore[arg-type]
            self.base_links.append(base)
            self.base_transports.append(base_transport)
            for frame in device.opening:
                feed(link, frame)
                feed(base, frame)
        await self.settle(drain=True)  # the binds committed (their rows all in one batch)
        width = max(len(d.frames) for d in devices)
        # every device's k-th frame, then every device's (k+1)-th: a device's frames
        # are a whole round apart, as from many devices sending at the same pace
        self.schedule = [
            (i, device.frames[k % len(device.frames)])
            for k in range(width)
            for i, device in enumerate(devices)
        ]
        self.gateway_schedule = [(self.links[i], frame) for i, frame in self.schedule]
        self.base_schedule = [(self.base_links[i], frame) for i, frame in self.schedule]
        self.frame_bytes = statistics.mean(len(frame) for _, frame in self.schedule)
        for _ in range(50):  # the set-up's own tasks (wake-ups, version reports) finish
            await asyncio.sleep(0)
        self.resident = len(self.tasks)
        # warm-up: a frame from every connection (its state remembered by the writer)
        await self.run(len(devices))
        self.run_baseline(len(devices))
        await self.settle(drain=True)
        self.replies = self._compare_replies()
        if any(link.closed for link in self.links):
            raise RuntimeError(f"{self.case.key}: a connection was closed during the set-up")

    def writes(self) -> int:
        """Replies written to the gateway's transports so far."""
        return sum(transport.writes for transport in self.transports)

    async def close(self) -> None:
        """Flush the writer and stop it and the gateway's tasks (the next case starts on
        an idle loop); fail if a connection was closed on the way (its frames would have
        cost nothing)."""
        await self.settle(drain=True)
        await self.writer.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        closed = [link.close_reason for link in self.links if link.closed]
        if closed:
            raise RuntimeError(f"{self.case.key}: connections closed: {closed[:5]}")

    def _compare_replies(self) -> str:
        """The gateway's and the baseline's answers to the same frame, compared."""
        i, frame = self.schedule[self.cursor]
        link, base = self.links[i], self.base_links[i]
        before, base_before = self.transports[i].writes, self.base_transports[i].writes
        feed(link, frame)
        feed(base, frame)
        self.cursor = self.base_cursor = (self.cursor + 1) % len(self.schedule)
        ours = self.transports[i].last if self.transports[i].writes > before else None
        theirs = (
            self.base_transports[i].last if self.base_transports[i].writes > base_before else None
        )
        if ours is None and theirs is None:
            return "none (no reply)"
        if ours == theirs:
            return f"identical ({len(ours or b'')} bytes)"
        hexes = [None if reply is None else reply.hex() for reply in (ours, theirs)]
        return f"DIFFER: gateway {hexes[0]}, baseline {hexes[1]}"

    async def settle(self, *, drain: bool = False) -> None:
        """Let the loop run the writer's flush and the tasks frames started, as it does
        between reads; with ``drain`` until no rows are left."""
        for _ in range(1000):
            busy = self.wake.is_set() or len(self.tasks) > self.resident
            if drain and self.writer.backlog:
                self.writer._wake.set()
                busy = True
            if not busy:
                return
            await asyncio.sleep(0)
        raise RuntimeError(f"{self.case.key}: the writer or the frames' tasks did not settle")

    async def run(self, count: int) -> None:
        """``count`` frames through the gateway, round robin, from where the last run
        stopped."""
        schedule = self.gateway_schedule
        size = len(schedule)
        wake, tasks, limit = self.wake, self.tasks, self.resident + TASK_SLACK
        start = self.cursor
        for i in range(start, start + count):
            link, frame = schedule[i % size]
            n = len(frame)
            link.get_buffer(n)[:n] = frame
            link.buffer_updated(n)
            if wake.is_set() or len(tasks) > limit:
                await self.settle()
        self.cursor = (start + count) % size
        if self.gateway.server.backlogs:
            raise RuntimeError(f"{self.case.key}: frames held back by the frame budget")

    def run_baseline(self, count: int) -> None:
        """``count`` frames through the baseline, round robin."""
        schedule = self.base_schedule
        size = len(schedule)
        start = self.base_cursor
        for i in range(start, start + count):
            link, frame = schedule[i % size]
            n = len(frame)
            link.get_buffer(n)[:n] = frame
            link.buffer_updated(n)
        self.base_cursor = (start + count) % size


# --- measuring -----------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    key: str
    title: str
    connections: int
    frame_bytes: float
    replies: str
    us: float = 0.0
    base_us: float = 0.0
    us_runs: list[float] = dataclasses.field(default_factory=list)
    base_runs: list[float] = dataclasses.field(default_factory=list)
    #: CPU time of the process (``time.process_time``) over the same runs, medians
    cpu_us: float = 0.0
    base_cpu_us: float = 0.0
    #: database work per frame handed to the fake connection, by kind
    db: dict[str, float] = dataclasses.field(default_factory=dict)
    tasks_per_frame: float = 0.0
    replies_per_frame: float = 0.0
    log_lines_per_frame: float = 0.0
    instructions: float | None = None
    base_instructions: float | None = None
    profile: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    profile_total_us: float = 0.0

    @property
    def ratio(self) -> float:
        return self.us / self.base_us


def _runner() -> asyncio.Runner:
    """uvloop when installed, as ``chargegw serve`` runs."""
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


async def measure_case(case: Case, frames: int, repeat: int, profile_frames: int) -> Result:
    bench = HotPath(case)
    await bench.open()
    result = Result(case.key, case.title, case.connections, bench.frame_bytes, bench.replies)
    # what a frame hands to the database and starts, over one counted stretch
    counts_before = collections.Counter(bench.conn.counts)
    spawned = bench.progress_calls
    lines = LOG_LINES.lines
    writes = bench.writes()
    await bench.run(frames)
    await bench.settle(drain=True)
    delta = bench.conn.counts - counts_before
    result.db = {kind: delta[kind] / frames for kind in sorted(delta)}
    result.tasks_per_frame = (bench.progress_calls - spawned) / frames
    result.log_lines_per_frame = (LOG_LINES.lines - lines) / frames
    result.replies_per_frame = (bench.writes() - writes) / frames
    # wall time, gateway and baseline in turns (a busy moment slows both)
    cpu: list[float] = []
    base_cpu: list[float] = []
    for _ in range(repeat):
        gc.collect()
        started, cpu_started = time.perf_counter(), time.process_time()
        await bench.run(frames)
        result.us_runs.append((time.perf_counter() - started) / frames * 1e6)
        cpu.append((time.process_time() - cpu_started) / frames * 1e6)
        gc.collect()
        started, cpu_started = time.perf_counter(), time.process_time()
        bench.run_baseline(frames)
        result.base_runs.append((time.perf_counter() - started) / frames * 1e6)
        base_cpu.append((time.process_time() - cpu_started) / frames * 1e6)
    result.us = statistics.median(result.us_runs)
    result.base_us = statistics.median(result.base_runs)
    result.cpu_us = statistics.median(cpu)
    result.base_cpu_us = statistics.median(base_cpu)
    # the profile
    if profile_frames:
        profiler = cProfile.Profile()
        profiler.enable()
        await bench.run(profile_frames)
        profiler.disable()
        result.profile, result.profile_total_us = top_costs(profiler, profile_frames)
    await bench.close()
    return result


def _where(file: str, line: int, name: str) -> str:
    if file == "~":  # a builtin: "<method 'append' of 'list' objects>"
        return name
    for anchor in ("/src/", "/site-packages/", "/lib/python3", "/benchmarks/"):
        if anchor in file:
            file = file.rsplit(anchor, 1)[1]
            if anchor == "/lib/python3":
                file = file.split("/", 1)[1]
            break
    return f"{file}:{line}({name})"


def top_costs(
    profiler: cProfile.Profile, frames: int, top: int = 15
) -> tuple[list[dict[str, Any]], float]:
    """The ``top`` functions by self time, per frame; and the profiled total per frame."""
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in stats.values())
    rows = [
        {
            "function": _where(*key),
            "calls": calls / frames,
            "self_us": self_s / frames * 1e6,
            "cum_us": cum_s / frames * 1e6,
            "share": self_s / total,
        }
        for key, (_, calls, self_s, cum_s, _) in stats.items()
    ]
    rows.sort(key=lambda r: r["self_us"], reverse=True)
    return rows[:top], total / frames * 1e6


# --- callgrind -----------------------------------------------------------------------


def boundary() -> None:
    """Where callgrind (``--dump-before=os_getppid``) starts a new profile dump."""
    os.getppid()


async def callgrind_child(keys: list[str], n1: int, n2: int, phases: bool) -> list[str]:
    """Under callgrind: per case, set-up, then N1 and N2 gateway frames, then N1 and N2
    baseline frames, each phase closed by a boundary (``phases``) or, without them, one
    case and N1 gateway frames only (the fallback: whole runs). Returns the phase labels
    in dump order."""
    labels = []
    for case in CASES:
        if case.key not in keys:
            continue
        bench = HotPath(case)
        await bench.open()
        if not phases:
            await bench.run(n1)
            await bench.close()
            return []
        boundary()
        labels.append(f"{case.key} set-up")
        for n in (n1, n2):
            await bench.run(n)
            boundary()
            labels.append(f"{case.key} gateway {n}")
        for n in (n1, n2):
            bench.run_baseline(n)
            boundary()
            labels.append(f"{case.key} baseline {n}")
        await bench.close()
    return labels


def _instructions(path: Path) -> int:
    """The Ir total of one callgrind output file."""
    for line in path.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise ValueError(f"no instruction total in {path}")


def _child_env(tmp: Path) -> dict[str, str]:
    """The environment of the runs under callgrind: a fixed hash seed (repeatable
    counts) and byte code cached in ``tmp`` (a module compiled from source under
    callgrind costs minutes; the cache only shortens the set-up, which is not counted)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONHASHSEED"] = "0"
    env["PYTHONPYCACHEPREFIX"] = str(tmp / "pyc")
    return env


def _child(args: list[str], env: dict[str, str], valgrind: Sequence[str] = ()) -> str:
    """Run this script's ``--callgrind-child`` mode (under ``valgrind``); its stdout."""
    command = [*valgrind, sys.executable, str(Path(__file__).resolve()), "--callgrind-child"]
    done = subprocess.run([*command, *args], env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def count_instructions(keys: list[str], n1: int, n2: int) -> dict[str, tuple[float, float | None]]:
    """Instructions per frame, gateway and baseline, by case (see the module doc)."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise FileNotFoundError("valgrind not found: instructions per frame need it")
    callgrind = [valgrind, "--tool=callgrind"]
    results: dict[str, tuple[float, float | None]] = {}
    with tempfile.TemporaryDirectory(prefix="hotpath-cg-") as name:
        tmp = Path(name)
        env = _child_env(tmp)
        _child(["--keys", ",".join(keys), "--cg-frames", "1,1"], env)  # fills the cache
        out = tmp / "callgrind.out"
        stdout = _child(
            ["--keys", ",".join(keys), "--cg-frames", f"{n1},{n2}"],
            env,
            [*callgrind, f"--callgrind-out-file={out}", f"--dump-before={BOUNDARY_SYMBOL}"],
        )
        labels = json.loads(stdout.strip().splitlines()[-1])
        dumps = sorted(tmp.glob("callgrind.out.*"), key=lambda p: int(p.suffix[1:]))
        if dumps:
            if len(dumps) != len(labels):
                raise RuntimeError(
                    f"{len(dumps)} callgrind dumps for {len(labels)} phases: something else "
                    f"calls {BOUNDARY_SYMBOL}; the phases cannot be told apart"
                )
            cost = dict(zip(labels, (_instructions(p) for p in dumps), strict=True))
            for key in keys:
                gw = (cost[f"{key} gateway {n2}"] - cost[f"{key} gateway {n1}"]) / (n2 - n1)
                base = (cost[f"{key} baseline {n2}"] - cost[f"{key} baseline {n1}"]) / (n2 - n1)
                results[key] = (gw, base)
            return results
        print(f"no {BOUNDARY_SYMBOL} dumps (a stripped interpreter?): whole runs instead")
        for key in keys:
            totals = []
            for n in (n1, n2):
                single = tmp / f"{key}-{n}.out"
                _child(
                    ["--keys", key, "--cg-frames", f"{n},{n}", "--whole"],
                    env,
                    [*callgrind, f"--callgrind-out-file={single}"],
                )
                totals.append(_instructions(single))
            results[key] = ((totals[1] - totals[0]) / (n2 - n1), None)
    return results


# --- budget, markdown ----------------------------------------------------------------


def load_budget(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text())) if path.exists() else {}


def write_budget(path: Path, results: list[Result]) -> None:
    measured = {r.key: round(r.instructions or 0) for r in results}
    data = {
        "about": "instructions per frame of benchmarks/bench_hotpath.py (callgrind), "
        f"measured + {MARGIN:.0%}; `--check` fails above `budget`. Rewrite with "
        "`python benchmarks/bench_hotpath.py --update-budget` after a deliberate change.",
        "measured_on": f"{datetime.date.today().isoformat()}, {machine_name()}, "
        f"Python {platform.python_version()}, commit {commit_id()[:12]}",
        "measured": measured,
        "budget": {key: round(value * (1 + MARGIN)) for key, value in measured.items()},
    }
    path.write_text(json.dumps(data, indent=2) + "\n")


def check_budget(results: list[Result], budget: dict[str, Any], path: Path) -> list[str]:
    """One message per frame type over its budget (or without a figure or a budget)."""
    failures = []
    limits = budget.get("budget", {})
    for r in results:
        limit = limits.get(r.key)
        if limit is None:
            failures.append(f"{r.key}: no budget in {path}")
        elif r.instructions is None:
            failures.append(f"{r.key}: no instruction count (callgrind skipped?)")
        elif r.instructions > limit:
            failures.append(
                f"{r.key}: {r.instructions:,.0f} instructions per frame exceed the budget "
                f"of {limit:,} ({path.name}; measured {budget['measured'][r.key]:,} + "
                f"{MARGIN:.0%})"
            )
    return failures


def _versions() -> str:
    out = []
    for name in ("uvloop", "asyncpg", "structlog", "prometheus-client"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out.append(f"{name} {importlib.metadata.version(name)}")
    return ", ".join(out)


def _db_text(db: dict[str, float]) -> str:
    keys = ("upserted rows", "touched rows", "COPY rows", "statements")
    return " / ".join(f"{db.get(k, 0.0):.2f}" for k in keys)


def markdown(
    results: list[Result], args: argparse.Namespace, budget: dict[str, Any], command: str
) -> str:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    limits = budget.get("budget", {})
    out = [
        f"## {TITLE}",
        "",
        f"Measured {when} on {machine_name()}, Python {platform.python_version()} "
        f"({_versions()}), valgrind {_valgrind_version()}, commit `{commit_id()[:12]}` "
        "(HEAD; uncommitted changes are not seen); load average "
        f"{args.load[0]:.1f} at the start, {args.load[1]:.1f} at the end "
        "(other work on the machine moves the wall times, not the instruction counts). "
        "`nox -s bench` runs `python benchmarks/bench_hotpath.py --write docs/benchmarks.md "
        "--check`; this section was written by:",
        "",
        "```",
        f"{command}",
        "# what it runs for the instruction counts (one process, a dump per phase):",
        f"PYTHONHASHSEED=0 valgrind --tool=callgrind --dump-before={BOUNDARY_SYMBOL} \\",
        "    python benchmarks/bench_hotpath.py --callgrind-child "
        f"--cg-frames {args.cg_frames[0]},{args.cg_frames[1]}",
        "```",
        "",
        "The gateway's in-process work per device frame, without sockets or database: a",
        "real `Gateway` (default settings, not started) gets each frame through",
        "`DeviceLink.buffer_updated`, with fake transports recording the replies and a fake",
        "pool behind the batch writer recording what each flush hands to asyncpg (method and",
        "limits: the module docstring of `benchmarks/bench_hotpath.py`). Not included: the",
        "kernel and the event loop's own work per read, asyncpg's encoding of the rows, the",
        "database, and for 0x06 the progress sample each charging report writes (one",
        "statement, outside the batches; the full order check once a minute). Steady state:",
        "set-up and a warm-up",
        "frame per device first, frames round robin over the devices. Baseline: the load test's",
        "struct-only server (`chargesim.loadtest.baseline`) in the same harness; its replies",
        "are compared byte for byte with the gateway's.",
        "",
        f"Wall time: {args.frames:,} frames per run, median of {args.repeat} runs, gateway",
        "and baseline in turns; in brackets the process's CPU time over the same runs (less",
        "moved by other work on the machine). Instructions: callgrind, (I(N2) - I(N1)) /",
        f"(N2 - N1) with N1, N2 = {args.cg_frames[0]:,}, {args.cg_frames[1]:,} frames per phase.",
        "",
        "| frame | devices | bytes | us/frame (CPU) | baseline us (CPU) | ratio (CPU) "
        "| instructions/frame | baseline instr. | ratio | budget | reply vs baseline |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        instr = "-" if r.instructions is None else f"{r.instructions:,.0f}"
        base = "-" if r.base_instructions is None else f"{r.base_instructions:,.0f}"
        iratio = (
            "-"
            if r.instructions is None or not r.base_instructions
            else f"**{r.instructions / r.base_instructions:.0f}x**"
        )
        limit = limits.get(r.key)
        out.append(
            f"| {r.title} | {r.connections} | {r.frame_bytes:.0f} | {r.us:.1f} "
            f"({r.cpu_us:.1f}) | {r.base_us:.2f} ({r.base_cpu_us:.2f}) | **{r.ratio:.0f}x** "
            f"({r.cpu_us / r.base_cpu_us:.0f}x) | {instr} | {base} | {iratio} | "
            f"{'-' if limit is None else f'{limit:,}'} | {r.replies} |"
        )
    out += [
        "",
        "Per frame, what the writer handed to the (fake) database and what the frame started:",
        "",
        "| frame | upserted / touched / COPY rows / statements | replies | "
        "order-progress tasks | log lines | us/frame runs (gateway; baseline) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in results:
        runs = ", ".join(f"{u:.1f}" for u in r.us_runs)
        base_runs = ", ".join(f"{u:.2f}" for u in r.base_runs)
        out.append(
            f"| {r.key} | {_db_text(r.db)} | {r.replies_per_frame:.2f} | "
            f"{r.tasks_per_frame:.2f} | "
            f"{r.log_lines_per_frame:.2f} | {runs}; {base_runs} |"
        )
    out += [
        "",
        f"Budgets: `benchmarks/hotpath_budget.json`, instructions per frame measured + "
        f"{MARGIN:.0%}; `--check` fails above them. Instruction counts are repeatable on one",
        "machine image (same interpreter build and library versions), not across images.",
    ]
    for r in results:
        if not r.profile:
            continue
        out += [
            "",
            f"### Top 15 by self time: {r.key}",
            "",
            f"cProfile over {args.profile_frames:,} frames; {r.profile_total_us:.1f} us/frame "
            f"under the profiler ({r.us:.1f} without). Self = the function's own time "
            "(`tottime`), cumulative = with its callees, both per frame.",
            "",
            "| # | function | calls/frame | self us | self % | cumulative us |",
            "|---:|---|---:|---:|---:|---:|",
        ]
        for index, row in enumerate(r.profile, start=1):
            out.append(
                f"| {index} | `{row['function']}` | {row['calls']:.2f} | {row['self_us']:.2f} "
                f"| {row['share']:.1%} | {row['cum_us']:.2f} |"
            )
    return "\n".join(out) + "\n"


def _valgrind_version() -> str:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        return "not installed"
    done = subprocess.run([valgrind, "--version"], capture_output=True, text=True, check=False)
    return re.sub(r"^valgrind-", "", done.stdout.strip()) or "unknown"


# --- command line --------------------------------------------------------------------


def _pair(text: str) -> tuple[int, int]:
    first, second = (int(part) for part in text.split(","))
    if not 0 < first <= second:
        raise argparse.ArgumentTypeError("N1,N2 with 0 < N1 <= N2")
    return first, second


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n", 1)[0] if __doc__ else None,
        epilog="See the module docstring for what is measured and how.",
    )
    keys = [case.key for case in CASES]
    parser.add_argument("--frames", type=int, default=20000, help="frames per timing run")
    parser.add_argument("--repeat", type=int, default=5, help="timing runs (median)")
    parser.add_argument("--profile-frames", type=int, default=5000, help="0: no profile")
    parser.add_argument(
        "--cg-frames", type=_pair, default=(300, 1100), help="N1,N2 frames under callgrind"
    )
    parser.add_argument("--no-callgrind", action="store_true", help="skip instruction counts")
    parser.add_argument("--keys", default=",".join(keys), help=f"frame types ({', '.join(keys)})")
    parser.add_argument("--write", type=Path, help="update this markdown file")
    parser.add_argument("--check", action="store_true", help="fail above the budgets")
    parser.add_argument("--budget", type=Path, default=BUDGET_FILE)
    parser.add_argument(
        "--update-budget", action="store_true", help="rewrite the budgets from this run"
    )
    parser.add_argument("--callgrind-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.keys = [k for k in args.keys.split(",") if k]
    unknown = set(args.keys) - set(keys)
    if unknown:
        parser.error(f"unknown frame types: {', '.join(sorted(unknown))}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_production_logging()
    if args.callgrind_child:
        with _runner() as runner:
            labels = runner.run(callgrind_child(args.keys, *args.cg_frames, not args.whole))
        print(json.dumps(labels))
        return 0
    command = "python " + " ".join(
        ["benchmarks/bench_hotpath.py", *(argv if argv is not None else sys.argv[1:])]
    )
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    results: list[Result] = []
    with _runner() as runner:
        for case in CASES:
            if case.key in args.keys:
                result = runner.run(
                    measure_case(case, args.frames, args.repeat, args.profile_frames)
                )
                results.append(result)
                print(
                    f"{case.key}: {result.us:.1f} us/frame, baseline {result.base_us:.2f} "
                    f"({result.ratio:.1f}x); reply {result.replies}",
                    flush=True,
                )
    if not args.no_callgrind:
        counted = count_instructions(args.keys, *args.cg_frames)
        for r in results:
            r.instructions, r.base_instructions = counted[r.key]
            print(f"{r.key}: {r.instructions:,.0f} instructions/frame", flush=True)
    args.load = (load_before, os.getloadavg()[0])
    if args.update_budget:
        write_budget(args.budget, results)
    budget = load_budget(args.budget)
    section = markdown(results, args, budget, command)
    print(section)
    if args.write:
        write_section(args.write, section)
    print(f"took {time.perf_counter() - started:.0f} s")
    if args.check:
        failures = check_budget(results, budget, args.budget)
        for failure in failures:
            print(f"FAIL {failure}", file=sys.stderr)
        if failures:
            return 1
        print("all frame types within their instruction budgets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
