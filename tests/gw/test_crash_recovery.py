"""The gateway process is killed (SIGKILL) mid-command and mid-settlement, then restarted:
nothing is lost, nothing is doubled, and the pile gets its answers."""

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
from chargesim import Ap3000Intervals, Faults, SimulatedAp3000Pile, Simulator

from .conftest import database_outage
from .waiting import eventually, eventually_json, free_port, wait_http

PHY = "04000001"


class Server:
    """``chargegw serve`` in a subprocess that the test can kill and restart."""

    def __init__(self, dsn: str, tmp_path: Path) -> None:
        self.dsn = dsn
        self.tmp_path = tmp_path
        self.device_port = free_port()
        self.http_port = free_port()
        self.process: asyncio.subprocess.Process | None = None
        self.runs = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    async def start(self) -> None:
        self.runs += 1
        log = (self.tmp_path / f"serve-{self.runs}.log").open("wb")
        env = {
            **os.environ,
            "CHARGEGW_DSN": self.dsn,
            "CHARGEGW_LOG_FORMAT": "json",
            "CHARGEGW_ACK_TIMEOUT_S": "3",
            "CHARGEGW_BATCH_INTERVAL_S": "0.02",
        }
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "chargegw",
            "serve",
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

    async def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(self.process.wait(), 30)


@pytest.fixture
async def server(db_dsn: str, tmp_path: Path) -> AsyncIterator[Server]:
    srv = Server(db_dsn, tmp_path)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


async def _until(
    server: Server, path: str, key: str, values: set[Any], timeout: float = 30.0
) -> dict[str, Any]:
    """``GET path`` of ``server`` once its ``key`` is one of ``values`` (across restarts)."""
    async with httpx.AsyncClient(base_url=server.base) as client:
        return await eventually_json(client, path, key, values, timeout=timeout, interval=0.1)


async def device_online(server: Server, device_id: str = PHY) -> None:
    """Until the server lists ``device_id`` online."""
    await _until(server, f"/api/v1/devices/{device_id}", "online", {True})


async def test_killed_between_the_start_request_and_the_piles_ack(server: Server) -> None:
    # the pile answers late, so the kill lands while the start is in flight
    pile = SimulatedAp3000Pile(PHY, ports=2, faults=Faults(reply_delay_s=1.5))
    async with Simulator(
        "127.0.0.1", server.device_port, [pile], accel=60, jitter=0, reconnect_max_s=1.0
    ):
        await device_online(server)
        async with httpx.AsyncClient(base_url=server.base) as client:
            response = await client.post(
                f"/api/v1/devices/{PHY}/ports/1/start", json={"mode": "full"}
            )
        assert response.status_code == 202
        order_no, command_id = response.json()["order_no"], response.json()["command_id"]
        await pile.wait_for_record(lambda r: r.command == 0x82, timeout=10)
        await server.kill()
        await server.start()
        command = await _until(server, f"/api/v1/commands/{command_id}", "status", {"acked"})
        order = await _until(server, f"/api/v1/orders/{order_no}", "status", {"charging"})
        assert order["start_command_id"] == command_id
        starts = [r.message for r in pile.received(0x82)]
        assert all(m == starts[0] for m in starts)  # a resend carries the same msg id
        assert command["attempts"] <= MAX_ATTEMPTS
        assert sum(1 for p in pile.ports if p.session is not None) == 1  # started once


async def test_killed_between_a_settlement_and_its_ack(
    server: Server, db_dsn: str, pg_server_dsn: str
) -> None:
    intervals = Ap3000Intervals(settlement_resend_s=120.0)  # 2 s at accel 60
    pile = SimulatedAp3000Pile(PHY, ports=2, intervals=intervals)
    async with Simulator(
        "127.0.0.1", server.device_port, [pile], accel=60, jitter=0, reconnect_max_s=1.0
    ):
        await device_online(server)
        async with httpx.AsyncClient(base_url=server.base) as client:
            response = await client.post(
                f"/api/v1/devices/{PHY}/ports/1/start", json={"mode": "full"}
            )
        order_no = response.json()["order_no"]
        await _until(server, f"/api/v1/orders/{order_no}", "status", {"charging"})
        # the database goes away, so the settlement cannot be committed (no ACK) ...
        async with database_outage(pg_server_dsn, db_dsn):
            pile.unplug(0)  # the session ends: the pile sends its 0x03
            await pile.wait_for_record(lambda r: r.command == 0x03, timeout=10)
            await asyncio.sleep(0.5)  # proves no ACK comes within 0.5 s of the 0x03
            assert pile.settlements, "the settlement must not be acknowledged yet"
            await server.kill()  # ... and the server dies holding it
        await server.start()
        order = await _until(server, f"/api/v1/orders/{order_no}", "status", {"settled"})
        assert order["stop_reason"] == "unplugged"
        # the resend is answered after the commit
        await eventually(lambda: not pile.settlements, timeout=10, interval=0.1)
        conn = await asyncpg.connect(db_dsn)
        try:
            applied = await conn.fetchval(
                "SELECT count(*) FROM device_events"
                " WHERE kind = 'settlement' AND reason = 'applied'"
            )
        finally:
            await conn.close()
        assert applied == 1  # applied once, however often it was sent


async def test_bkv_killed_between_the_start_request_and_the_sockets_reply(
    server: Server,
) -> None:
    from chargesim.bkv import SimulatedBkvGateway

    gateway_id = "82231214000001"
    device = f"{gateway_id}-1"
    box = SimulatedBkvGateway(gateway_id, sockets=1, faults=Faults(reply_delay_s=1.5))
    async with Simulator(
        "127.0.0.1", server.device_port, [box], accel=60, jitter=0, reconnect_max_s=1.0
    ):
        await device_online(server, device)
        async with httpx.AsyncClient(base_url=server.base) as client:
            response = await client.post(
                f"/api/v1/devices/{device}/ports/1/start",
                json={"mode": "time", "duration_min": 600},
            )
        assert response.status_code == 202, response.text
        order_no, command_id = response.json()["order_no"], response.json()["command_id"]
        await box.wait_for_record(lambda r: r.command == 0x0015, timeout=10)
        await server.kill()
        await server.start()
        command = await _until(server, f"/api/v1/commands/{command_id}", "status", {"acked"})
        order = await _until(server, f"/api/v1/orders/{order_no}", "status", {"charging"})
        assert order["business_no"] == box.jack(1, 0).business_no != 0
        assert command["attempts"] <= MAX_ATTEMPTS
        assert box.sockets[1].last_business_no == 1  # one session, not two


async def test_bkv_killed_between_an_end_report_and_its_ack(
    server: Server, db_dsn: str, pg_server_dsn: str
) -> None:
    from chargesim.bkv import BkvIntervals, SimulatedBkvGateway

    gateway_id = "82231214000001"
    device = f"{gateway_id}-1"
    box = SimulatedBkvGateway(
        gateway_id, sockets=1, intervals=BkvIntervals(end_report_resend_s=60)
    )  # 1 s at accel 60
    async with Simulator(
        "127.0.0.1", server.device_port, [box], accel=60, jitter=0, reconnect_max_s=1.0
    ):
        await device_online(server, device)
        async with httpx.AsyncClient(base_url=server.base) as client:
            response = await client.post(
                f"/api/v1/devices/{device}/ports/1/start",
                json={"mode": "time", "duration_min": 600},
            )
        order_no = response.json()["order_no"]
        await _until(server, f"/api/v1/orders/{order_no}", "status", {"charging"})
        async with database_outage(pg_server_dsn, db_dsn):
            box.unplug(1, 0)  # the session ends: the socket sends its end report
            await box.wait_for_record(
                lambda r: (
                    r.command == 0x0015
                    and r.flow.name == "SENT"
                    and r.message is not None
                    and type(r.message).__name__ == "EndReport"
                ),
                timeout=10,
            )
            await asyncio.sleep(0.5)  # proves no ACK comes within 0.5 s of the report
            assert box.end_reports, "the end report must not be acknowledged yet"
            await server.kill()
        await server.start()
        order = await _until(server, f"/api/v1/orders/{order_no}", "status", {"settled"})
        assert order["business_no"] is not None
        await eventually(lambda: not box.end_reports, timeout=10, interval=0.1)
        conn = await asyncpg.connect(db_dsn)
        try:
            applied = await conn.fetchval(
                "SELECT count(*) FROM device_events"
                " WHERE kind = 'settlement' AND reason = 'applied'"
            )
        finally:
            await conn.close()
        assert applied == 1
