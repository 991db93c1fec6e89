"""Several gateway processes on one PostgreSQL (issue 6): real `chargegw serve` processes
(3 workers on one node, 1 on another) on loopback, simulated piles over real TCP.

Correctness only: commands reach whichever process holds the device, a killed worker's
commands are delivered exactly once after its piles reconnect, a drained worker hands
its piles over, a flapping device is banned. No timing assertions.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from chargegw.domain.outbox import MAX_ATTEMPTS
from chargesim import Faults, SimulatedAp3000Pile, Simulator

from .metric_values import Monotonic, total, workers_with
from .waiting import eventually, free_port, wait_http

READ = "read_running_params1"  # 0x90: answered by the pile with the same msg id
READ_CODE = 0x90
#: processes start, and piles move between them, in seconds: wait long, poll gently
WAIT_S, POLL_S = 45.0, 0.2
#: counters summed over a node's workers: never lower in a later scrape, a worker killed
NODE_COUNTERS = (
    "chargegw_connections_accepted_total",
    "chargegw_frames_total",
    "chargegw_commands_sent_total",
    "chargegw_commands_finished_total",
    "chargegw_worker_starts_total",
    "chargegw_event_loop_lag_seconds_count",
)


class Node:
    """``chargegw serve --workers N --node NAME`` in a subprocess."""

    def __init__(self, dsn: str, tmp_path: Path, name: str, workers: int) -> None:
        self.dsn = dsn
        self.tmp_path = tmp_path
        self.name = name
        self.workers = workers
        self.device_port = free_port()
        self.http_port = free_port()
        self.process: asyncio.subprocess.Process | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    async def start(self) -> None:
        log = (self.tmp_path / f"serve-{self.name}.log").open("wb")
        env = {
            **os.environ,
            "CHARGEGW_DSN": self.dsn,
            "CHARGEGW_LOG_FORMAT": "json",
            "CHARGEGW_ACK_TIMEOUT_S": "3",
            "CHARGEGW_BATCH_INTERVAL_S": "0.02",
            "CHARGEGW_CLUSTER_HEARTBEAT_S": "0.5",
            "CHARGEGW_PROCESS_TIMEOUT_S": "3",
            "CHARGEGW_OUTBOX_SCAN_S": "1",
            "CHARGEGW_COMMAND_SPACING_S": "0.1",
            # these tests send commands in bursts; each worker has 1/workers of a key's
            # burst, so the rate limit (tested in test_request_hygiene.py) is off here
            "CHARGEGW_CONTROL_RATE_PER_KEY": "0",
            "TMPDIR": str(self.tmp_path),  # the supervisor's metrics directory goes here
        }
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "chargegw",
            "serve",
            "--node",
            self.name,
            "--workers",
            str(self.workers),
            "--device-host",
            "127.0.0.1",
            "--device-port",
            str(self.device_port),
            "--http-port",
            str(self.http_port),
            env=env,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
        await wait_http(f"{self.base}/readyz", timeout=60, process=self.process)
        await eventually(
            self.live_workers, lambda n: n == self.workers, timeout=WAIT_S, interval=POLL_S
        )

    async def live_workers(self) -> int:
        return sum(1 for p in await self.processes() if p["state"] == "live")

    async def processes(self) -> list[dict[str, Any]]:
        body = await get(self, "/api/v1/nodes")
        return [p for p in body.get("items", []) if p["node"] == self.name]

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 60)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


async def get(node: Node, path: str) -> dict[str, Any]:
    try:
        async with httpx.AsyncClient(base_url=node.base, timeout=10) as client:
            response = await client.get(path)
    except httpx.TransportError:
        return {}
    body: dict[str, Any] = response.json() if response.status_code == 200 else {}
    return body


def _exited(pid: int) -> bool:
    """The process has exited (a zombie waiting for its parent counts: its sockets are
    closed)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


async def command(node: Node, device_id: str) -> int:
    async with httpx.AsyncClient(base_url=node.base, timeout=10) as client:
        response = await client.post(
            f"/api/v1/devices/{device_id}/commands", json={"command": READ, "params": {}}
        )
    assert response.status_code == 202, response.text
    command_id: int = response.json()["command_id"]
    return command_id


async def all_online(node: Node, devices: list[str]) -> bool:
    for device_id in devices:
        if not (await get(node, f"/api/v1/devices/{device_id}")).get("online"):
            return False
    return True


async def statuses(dsn: str, ids: list[int]) -> dict[int, asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT * FROM commands WHERE command_id = ANY($1)", ids)
    finally:
        await conn.close()
    return {r["command_id"]: r for r in rows}


def piles(first: int, count: int, **kwargs: Any) -> list[SimulatedAp3000Pile]:
    return [
        SimulatedAp3000Pile(f"04{n:06X}", ports=2, **kwargs) for n in range(first, first + count)
    ]


def received_ids(pile: SimulatedAp3000Pile) -> list[int]:
    return [r.message.msg_id for r in pile.received(READ_CODE)]


@pytest.fixture
async def node_a(db_dsn: str, tmp_path: Path) -> AsyncIterator[Node]:
    node = Node(db_dsn, tmp_path, "a", workers=3)
    await node.start()
    try:
        yield node
    finally:
        await node.stop()
    # the supervisor removes its workers' metric files when it stops
    assert not list(tmp_path.glob("chargegw-metrics-*"))


async def test_commands_reach_the_process_holding_the_device_across_workers_and_nodes(
    node_a: Node, db_dsn: str, tmp_path: Path
) -> None:
    node_b = Node(db_dsn, tmp_path, "b", workers=1)
    await node_b.start()
    try:
        on_a, on_b = piles(1, 12), piles(101, 4)
        async with (
            Simulator("127.0.0.1", node_a.device_port, on_a, accel=30, jitter=0),
            Simulator("127.0.0.1", node_b.device_port, on_b, accel=30, jitter=0),
        ):
            ids_a, ids_b = [p.pile_id for p in on_a], [p.pile_id for p in on_b]
            await eventually(
                lambda: all_online(node_a, ids_a + ids_b), bool, timeout=WAIT_S, interval=POLL_S
            )
            owners = {p["owner"] for p in await node_a.processes()}
            assert len(owners) == 3
            # every pile asked through the other node's API, and through node a's
            # (which itself hands the call to any of its workers)
            sent = {}
            for pile in on_a:
                sent[await command(node_b, pile.pile_id)] = pile
            for pile in on_b:
                sent[await command(node_a, pile.pile_id)] = pile
            rows = await eventually(
                lambda: statuses(db_dsn, list(sent)),
                lambda rows: all(r["status"] == "acked" for r in rows.values()),
                timeout=WAIT_S,
                interval=POLL_S,
            )
            holders = set()
            for command_id, pile in sent.items():
                session = await get(node_a, f"/api/v1/devices/{pile.pile_id}/session")
                assert rows[command_id]["claimed_by"] == session["owner"]
                holders.add(session["node"])
                assert received_ids(pile) == [rows[command_id]["correlation"]]  # exactly once
            assert holders == {"a", "b"}
            held_on_a = {
                (await get(node_a, f"/api/v1/devices/{p.pile_id}/session"))["owner"] for p in on_a
            }
            assert len(held_on_a) > 1, "SO_REUSEPORT spreads the piles over the workers"
    finally:
        await node_b.stop()


async def test_killed_worker_commands_are_delivered_exactly_once_after_reconnect(
    node_a: Node, db_dsn: str
) -> None:
    # slow answers: several commands per pile queue behind one in flight at the kill
    fleet = piles(1, 18, faults=Faults(reply_delay_s=1.0))
    async with Simulator(
        "127.0.0.1", node_a.device_port, fleet, accel=30, jitter=0, reconnect_max_s=1.0
    ):
        await eventually(
            lambda: all_online(node_a, [p.pile_id for p in fleet]),
            bool,
            timeout=WAIT_S,
            interval=POLL_S,
        )
        sessions = {
            p.pile_id: await get(node_a, f"/api/v1/devices/{p.pile_id}/session") for p in fleet
        }
        victim = max(
            await node_a.processes(),
            key=lambda proc: sum(1 for s in sessions.values() if s["owner"] == proc["owner"]),
        )
        doomed = [p for p in fleet if sessions[p.pile_id]["owner"] == victim["owner"]]
        assert doomed
        # one scrape of the node, whichever worker answers it, shows all of them
        scrapes = Monotonic(node_a.base, NODE_COUNTERS)
        for _ in range(4):
            samples = await scrapes.scrape()
            assert workers_with(samples, "chargegw_worker_up") == {"0", "1", "2"}
            assert workers_with(samples, "chargegw_process_open_fds") == {"0", "1", "2"}
            assert total(samples, "chargegw_devices_online") == len(fleet)
            assert total(samples, "chargegw_connections_accepted_total") >= len(fleet)
            assert samples[("chargegw_workers_configured", frozenset())] == 3
        sent: dict[int, SimulatedAp3000Pile] = {}
        for pile in doomed:
            for _ in range(3):
                sent[await command(node_a, pile.pile_id)] = pile
        # the first of each pile's commands is in flight (the piles answer after 1 s)
        await eventually(lambda: all(received_ids(p) for p in doomed), interval=0.02)
        os.kill(victim["pid"], signal.SIGKILL)
        # gone, its sockets closed: a new API connection can no longer land on its
        # listening socket (SO_REUSEPORT) and be reset
        await eventually(lambda: _exited(victim["pid"]), timeout=WAIT_S, interval=0.02)
        for pile in doomed:  # and more while its piles are away
            sent[await command(node_a, pile.pile_id)] = pile
        # its live gauges leave the scrape (the supervisor restarts it after a pause);
        # the node's counters keep what the dead worker counted
        survivors = {"0", "1", "2"} - {str(victim["worker"])}
        await eventually(
            scrapes.scrape, lambda now: workers_with(now, "chargegw_worker_up") == survivors
        )
        rows = await eventually(
            lambda: statuses(db_dsn, list(sent)),
            lambda rows: all(r["status"] == "acked" for r in rows.values()),
            timeout=60,
            interval=POLL_S,
        )
        for command_id, pile in sent.items():
            row = rows[command_id]
            got = received_ids(pile).count(row["correlation"])
            # a command in flight at the kill is resent once with the same msg id (the
            # pile recognises the repeat); every other one arrives exactly once. An
            # attempt is counted before its bytes are written, and taken back when they
            # were not only as a best effort (the device's answer to the first may also
            # beat the resend): the count may exceed what arrived, never fall below it
            assert 1 <= got <= row["attempts"] <= MAX_ATTEMPTS, (
                command_id,
                got,
                row["attempts"],
            )
            session = await get(node_a, f"/api/v1/devices/{pile.pile_id}/session")
            assert session["owner"] != victim["owner"]
        lost = await eventually(
            lambda: get(node_a, "/api/v1/nodes?include_stopped=true"),
            lambda body: any(
                p["owner"] == victim["owner"] and p["state"] == "stopped"
                for p in body.get("items", [])
            ),
            timeout=WAIT_S,
            interval=POLL_S,
        )
        assert lost
        restarted = await eventually(
            scrapes.scrape,
            lambda now: workers_with(now, "chargegw_worker_up") == {"0", "1", "2"},
            timeout=WAIT_S,
            interval=POLL_S,
        )
        worker = frozenset({("worker", str(victim["worker"]))})
        assert restarted[("chargegw_worker_starts_total", worker)] == 2
        commands = {"protocol": "ap3000", "command": READ}
        finished = restarted[
            ("chargegw_command_latency_seconds_count", frozenset(commands.items()))
        ]
        # every answer, whichever worker had it (the victim may die between its commit
        # and its count: at most its piles' commands in flight)
        assert finished >= len(sent) - len(doomed)


async def test_a_drained_worker_hands_its_piles_to_the_others(node_a: Node, db_dsn: str) -> None:
    fleet = piles(1, 15)
    async with Simulator(
        "127.0.0.1", node_a.device_port, fleet, accel=30, jitter=0, reconnect_max_s=1.0
    ):
        ids = [p.pile_id for p in fleet]
        await eventually(lambda: all_online(node_a, ids), bool, timeout=WAIT_S, interval=POLL_S)
        procs = await node_a.processes()
        target = max(procs, key=lambda p: p["connections"])
        os.kill(target["pid"], signal.SIGTERM)  # one worker drains; the node keeps serving
        await eventually(
            lambda: get(node_a, "/api/v1/nodes?include_stopped=true"),
            lambda body: any(
                p["owner"] == target["owner"] and p["state"] == "stopped"
                for p in body.get("items", [])
            ),
            timeout=WAIT_S,
            interval=POLL_S,
        )
        await eventually(lambda: all_online(node_a, ids), bool, timeout=WAIT_S, interval=POLL_S)
        for device_id in ids:
            session = await get(node_a, f"/api/v1/devices/{device_id}/session")
            assert session["owner"] != target["owner"]
        conn = await asyncpg.connect(db_dsn)
        try:
            reasons = await conn.fetch(
                "SELECT DISTINCT reason FROM device_events WHERE kind = 'offline'"
            )
        finally:
            await conn.close()
        assert "drain" in {r["reason"] for r in reasons}
        # the supervisor starts the worker again, and commands flow everywhere
        await eventually(node_a.live_workers, lambda n: n == 3, timeout=WAIT_S, interval=POLL_S)
        sent = {await command(node_a, p.pile_id): p for p in fleet}
        rows = await eventually(
            lambda: statuses(db_dsn, list(sent)),
            lambda rows: all(r["status"] == "acked" for r in rows.values()),
            timeout=WAIT_S,
            interval=POLL_S,
        )
        assert all(received_ids(p) == [rows[c]["correlation"]] for c, p in sent.items())
