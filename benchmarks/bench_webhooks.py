"""Webhook delivery benchmark (``nox -s bench-webhooks``; docs/webhooks.md).

On a fresh database of the PostgreSQL server ``--dsn`` names (default
``CHARGEGW_TEST_DSN``, else the local one), starts ``chargegw serve --workers 3``, a
receiver on 127.0.0.1 (it answers 200 at once and checks every 50th signature with the
``standardwebhooks`` package), one subscription to every event type, and ``--piles``
simulated AP3000 piles (the load-test generator, real-time intervals). Once the piles are
online and the deliveries of their first events are done:

A. steady: ``--rate`` events per second for ``--duration`` seconds (``emit_event`` from
   the benchmark, spread over ``--devices`` devices): deliveries per second while it runs
   and latency from the event's time to the receiver's answer (p50, p99, max);
B. burst: ``--burst`` events at once: how fast the workers drain them.

Prints the results as JSON and the markdown section; ``--write docs/benchmarks.md``
replaces the section "Webhook delivery" there. Bounded in time: every wait has a
deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import re
import signal
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
from standardwebhooks.webhooks import Webhook

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_name, write_section

_CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")
_WEBHOOK_ID = re.compile(rb"(?i)\r\nwebhook-id:\s*([^\r]+)")
_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_EMIT = """SELECT emit_event('device.alarm', 'BENCH-' || lpad((i % $3)::text, 5, '0'), NULL,
                             NULL, NULL, NULL, jsonb_build_object('seq', i))
             FROM generate_series($1::bigint, $2::bigint) AS i"""
_OPEN = """SELECT count(*) FROM webhook_deliveries
            WHERE status IN ('queued', 'pending', 'delivering')"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass(slots=True)
class Arrival:
    """One request the receiver answered."""

    received: float
    event_at: float
    webhook_id: str
    seq: int | None


class Receiver:
    """Answers 200 at once; records every request; verifies every 50th signature."""

    def __init__(self) -> None:
        self.arrivals: list[Arrival] = []
        self.secret = ""
        self.verified = 0
        self.bad_signatures = 0
        self._count = 0

    def record(self, head: bytes, body: bytes) -> None:
        now = time.time()
        self._count += 1
        match = _WEBHOOK_ID.search(head)
        webhook_id = match.group(1).decode() if match else ""
        payload = json.loads(body)
        data = payload.get("data") or {}
        at = data.get("at")
        event_at = datetime.datetime.fromisoformat(at).timestamp() if at else now
        seq = data.get("seq") if data.get("device_id", "").startswith("BENCH-") else None
        self.arrivals.append(Arrival(now, event_at, webhook_id, seq))
        if self.secret and self._count % 50 == 1:
            headers = {}
            for line in head.decode("latin-1").split("\r\n")[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            try:
                Webhook(self.secret).verify(body, headers)
                self.verified += 1
            except Exception:
                self.bad_signatures += 1


class _Connection(asyncio.Protocol):
    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver
        self.buffer = bytearray()
        self.transport: Any = None  # asyncio's or uvloop's

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[: end + 2])
        match = _CONTENT_LENGTH.search(head)
        length = int(match.group(1)) if match else 0
        if len(self.buffer) < end + 4 + length:
            return
        body = bytes(self.buffer[end + 4 : end + 4 + length])
        assert self.transport is not None
        self.transport.write(_OK)
        self.transport.close()
        self.receiver.record(head, body)


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the machine so far (/proc/stat; zeros elsewhere)."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0]
        fields = [int(v) for v in first.split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def _busy(before: tuple[int, int], after: tuple[int, int]) -> float:
    total = after[1] - before[1]
    return 100.0 * (after[0] - before[0]) / total if total else float("nan")


def _with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _wait(probe: Any, what: str, timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(interval)


class Piles:
    """The load-test generator in a subprocess (JSON Lines on stdin/stdout)."""

    def __init__(self, count: int, port: int) -> None:
        self.count = count
        self.port = port
        self.connected = 0
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if not self.count:
            return
        config = {
            "host": "127.0.0.1",
            "port": self.port,
            "ap3000_count": self.count,
            "ramp_s": 10.0,
            "seed": 1,
        }
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "chargesim.loadtest.piles",
            json.dumps(config),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        self._reader = asyncio.create_task(self._read())
        self._send({"cmd": "start"})

    def _send(self, command: dict[str, Any]) -> None:
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write((json.dumps(command) + "\n").encode())

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        async for line in self.process.stdout:
            with contextlib.suppress(ValueError):
                item = json.loads(line)
                if item.get("type") in ("stats", "ready"):
                    self.connected = int(item.get("connected", 0))

    async def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(Exception):
            self._send({"cmd": "stop"})
        try:
            await asyncio.wait_for(self.process.wait(), 15)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
        if self._reader is not None:
            self._reader.cancel()


async def _emit_steady(pool: asyncpg.Pool, rate: float, duration: float, devices: int) -> int:
    """``rate`` events a second for ``duration`` seconds, a transaction every 50 ms."""
    tick = 0.05
    started = time.monotonic()
    sent = 0
    while True:
        elapsed = time.monotonic() - started
        if elapsed >= duration:
            return sent
        due = int(min(elapsed + tick, duration) * rate)
        if due > sent:
            await pool.execute(_EMIT, sent, due - 1, devices)
            sent = due
        await asyncio.sleep(max(0.0, started + elapsed + tick - time.monotonic()))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    name = f"chargegw_bench_webhooks_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(args.dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    pg_version = await admin.fetchval("SHOW server_version")
    await admin.close()
    dsn = _with_database(args.dsn, name)
    receiver = Receiver()
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(lambda: _Connection(receiver), "127.0.0.1", 0, backlog=4096)
    receiver_port = listener.sockets[0].getsockname()[1]
    device_port, http_port = _free_port(), _free_port()
    env = {
        **os.environ,
        "CHARGEGW_DSN": dsn,
        "CHARGEGW_LOG_LEVEL": "warning",
        "CHARGEGW_LOG_FORMAT": "json",
        "CHARGEGW_WEBHOOKS_ALLOW_PRIVATE": "true",
        "CHARGEGW_ACCEPT_RATE": "2000",
    }
    log = Path(tempfile.gettempdir()) / f"bench-webhooks-{name}.log"
    log_file = log.open("wb")  # a file, not a pipe nobody reads: logs never block
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chargegw", "serve", "--workers", str(args.workers),
        "--device-host", "127.0.0.1", "--device-port", str(device_port),
        "--http-port", str(http_port), "--data-dir", tempfile.gettempdir(),
        env=env, stdout=log_file, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    piles = Piles(args.piles, device_port)
    pool: asyncpg.Pool | None = None
    base = f"http://127.0.0.1:{http_port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:

            async def ready() -> bool:
                if server.returncode is not None:
                    raise RuntimeError(f"chargegw serve exited; see {log}")
                with contextlib.suppress(httpx.TransportError):
                    return (await client.get("/readyz")).status_code == 200
                return False

            await _wait(ready, "chargegw serve ready", 60)
            made = await client.post(
                "/api/v1/webhooks",
                json={
                    "url": f"http://127.0.0.1:{receiver_port}/hook",
                    "event_types": ["*"],
                    "max_concurrency": 100,
                    "timeout_s": 10,
                },
            )
            made.raise_for_status()
            receiver.secret = made.json()["secret"]
            pool = await asyncpg.create_pool(dsn, min_size=2, max_size=4)
            assert pool is not None
            await piles.start()

            async def online() -> bool:
                return piles.connected >= args.piles * 0.99

            await _wait(online, f"{args.piles} piles connected", 90)

            async def settled() -> bool:
                assert pool is not None
                return int(await pool.fetchval(_OPEN)) < 50

            await _wait(settled, "the piles' first events delivered", 120)
            warmup = len(receiver.arrivals)

            # A. steady rate
            cpu_a0 = _cpu_ticks()
            emitted = await _emit_steady(pool, args.rate, args.duration, args.devices)
            cpu_a = (cpu_a0, _cpu_ticks())

            async def steady_done() -> bool:
                seen = {a.seq for a in receiver.arrivals if a.seq is not None}
                return len(seen) >= emitted

            await _wait(steady_done, "the steady events delivered", 60, 0.2)
            steady = [a for a in receiver.arrivals if a.seq is not None]
            # every delivery (the piles' too) between the first and the last steady one
            s_first, s_last = min(a.received for a in steady), max(a.received for a in steady)
            in_window = [a for a in receiver.arrivals[warmup:] if s_first <= a.received <= s_last]
            latency_a = [a.received - a.event_at for a in steady]

            # B. burst
            b_first = args.duration * args.rate + 1_000_000
            b_start, cpu_b0 = time.time(), _cpu_ticks()
            async with pool.acquire() as conn:
                for at in range(0, args.burst, 2000):
                    count = min(2000, args.burst - at)
                    await conn.execute(_EMIT, b_first + at, b_first + at + count - 1, args.devices)
            b_emitted = time.time()

            async def burst_done() -> bool:
                got = {a.seq for a in receiver.arrivals if a.seq is not None and a.seq >= b_first}
                return len(got) >= args.burst

            await _wait(burst_done, "the burst delivered", 120, 0.2)
            burst = [a for a in receiver.arrivals if a.seq is not None and a.seq >= b_first]
            cpu_b = (cpu_b0, _cpu_ticks())
            b_first_at = min(a.received for a in burst)
            b_end = max(a.received for a in burst)
    finally:
        await piles.stop()
        if server.returncode is None:
            server.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(server.wait(), 60)
            except TimeoutError:
                server.kill()
        if pool is not None:
            await pool.close()
        listener.close()
        log_file.close()
        admin = await asyncpg.connect(args.dsn)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    ids = [a.webhook_id for a in receiver.arrivals]
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_name(),
        "python": platform.python_version(),
        "postgresql": pg_version,
        "workers": args.workers,
        "piles": args.piles,
        "piles_connected": piles.connected,
        "steady": {
            "rate": args.rate,
            "duration_s": args.duration,
            "events": emitted,
            "deliveries_per_s_all": len(in_window) / max(s_last - s_first, 1e-9),
            "p50_ms": _percentile(latency_a, 0.50) * 1000,
            "p99_ms": _percentile(latency_a, 0.99) * 1000,
            "max_ms": max(latency_a) * 1000,
            "cpu_busy_percent": _busy(*cpu_a),
        },
        "burst": {
            "events": args.burst,
            "emit_s": b_emitted - b_start,
            "drain_s": b_end - b_start,
            "deliveries_per_s": args.burst / (b_end - b_first_at),
            "cpu_busy_percent": _busy(*cpu_b),
        },
        "received": len(ids),
        "duplicates": len(ids) - len(set(ids)),
        "signatures_verified": receiver.verified,
        "bad_signatures": receiver.bad_signatures,
        "log": str(log),
    }


def markdown(result: dict[str, Any], command: str) -> str:
    steady, burst = result["steady"], result["burst"]
    # the steady phase delivers what is offered (it cannot show more); the burst shows
    # how many the workers can deliver
    kept_up = steady["deliveries_per_s_all"] >= 0.98 * steady["rate"]
    ok_rate = burst["deliveries_per_s"] >= 1000 and kept_up
    ok_p99 = steady["p99_ms"] < 1000
    return "\n".join(
        [
            "## Webhook delivery (`nox -s bench-webhooks`)",
            "",
            f"Measured {result['date']} on {result['machine']}, Python {result['python']}, "
            f"PostgreSQL {result['postgresql']}; `chargegw serve --workers {result['workers']}`, "
            "the receiver (answers 200 at once), the pile generator and PostgreSQL on the "
            "same cores. Command:",
            "",
            "```",
            command,
            "```",
            "",
            "| | |",
            "|---|---|",
            f"| simulated piles online (real-time intervals) | {result['piles_connected']:,} |",
            f"| steady: events offered | {steady['rate']:,.0f}/s for {steady['duration_s']:g} s |",
            "| steady: deliveries/s (all events, the piles' too) | "
            f"{steady['deliveries_per_s_all']:,.0f} |",
            f"| steady: event to 2xx, p50 / p99 / max | {steady['p50_ms']:.0f} / "
            f"{steady['p99_ms']:.0f} / {steady['max_ms']:.0f} ms |",
            f"| burst: events emitted at once | {burst['events']:,} (in {burst['emit_s']:.1f} s) |",
            f"| burst: all delivered after | {burst['drain_s']:.1f} s |",
            "| burst: deliveries/s (first to last delivery) | "
            f"**{burst['deliveries_per_s']:,.0f}** |",
            f"| machine CPU busy: steady / burst | {steady['cpu_busy_percent']:.0f} % / "
            f"{burst['cpu_busy_percent']:.0f} % |",
            f"| duplicates / bad signatures (every 50th checked) | {result['duplicates']} / "
            f"{result['bad_signatures']} |",
            "",
            "Steady: events written by the benchmark at the rate given (a transaction per "
            "50 ms), spread over 5,000 devices, besides the piles' own; the latency runs "
            "from the event's time to the receiver's answer. Burst: events written in "
            "transactions of 2,000 as fast as PostgreSQL takes them; the rate counts from "
            "the first delivery to the last. One subscription (`max_concurrency` 100, the "
            "most), one connection per delivery.",
            "",
            "Target: at least 1,000 deliveries/s with p99 under 1 s while 5,000 piles run: "
            f"{'met' if ok_rate and ok_p99 else 'NOT met'} (the burst's rate "
            f"{'met' if ok_rate else 'not met'}, the steady rate "
            f"{'kept up with' if kept_up else 'not kept up with'}, p99 "
            f"{'met' if ok_p99 else 'not met'}).",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dsn",
        default=os.environ.get(
            "CHARGEGW_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="a PostgreSQL server where a database may be created (dropped after)",
    )
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--piles", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=1000.0, help="steady events per second")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of steady load")
    parser.add_argument("--burst", type=int, default=20000)
    parser.add_argument("--devices", type=int, default=5000, help="devices the events name")
    parser.add_argument("--write", type=Path, help="update this markdown file")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=2))
    command = "python benchmarks/bench_webhooks.py " + " ".join(
        f"--{k} {v}" for k, v in (
            ("workers", args.workers), ("piles", args.piles), ("rate", f"{args.rate:g}"),
            ("duration", f"{args.duration:g}"), ("burst", args.burst),
        )
    )  # fmt: skip
    section = markdown(result, command)
    print(section)
    if args.write:
        write_section(args.write, section)


if __name__ == "__main__":
    main()
