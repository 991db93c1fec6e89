"""The gateway process is killed (SIGKILL) in the middle of a firmware transfer and
restarted: the upgrade resumes from the database, after the last acknowledged packet."""

from __future__ import annotations

import itertools
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from chargesim import SimulatedAp3000Pile, Simulator

from .test_crash_recovery import Server, device_online
from .waiting import eventually_json

PHY = "04000001"
IMAGE = random.Random(11).randbytes(5 * 1024)


@pytest.fixture
async def server(
    db_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Server]:
    monkeypatch.setenv("CHARGEGW_COMMAND_SPACING_S", "0.05")
    monkeypatch.setenv("CHARGEGW_FIRMWARE_TICK_S", "0.2")
    srv = Server(db_dsn, tmp_path)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


async def _job(server: Server, job_id: int, timeout: float = 40.0) -> dict[str, Any]:
    """The upgrade job once it is done (the server may be restarting meanwhile)."""
    async with httpx.AsyncClient(base_url=server.base) as client:
        path = f"/api/v1/upgrade-jobs/{job_id}"
        return await eventually_json(client, path, "state", {"done"}, timeout=timeout, interval=0.2)


async def test_killed_mid_transfer_the_upgrade_resumes_after_a_restart(server: Server) -> None:
    pile = SimulatedAp3000Pile(PHY, ports=2)
    async with Simulator(
        "127.0.0.1", server.device_port, [pile], accel=60, jitter=0, reconnect_max_s=1.0
    ):
        await device_online(server)
        async with httpx.AsyncClient(base_url=server.base) as client:
            image = await client.post(
                "/api/v1/firmware",
                content=IMAGE,
                params={"protocol": "ap3000", "family": "E0", "device_type": 0x27, "version": 313},
            )
            assert image.status_code == 201, image.text
            response = await client.post(
                "/api/v1/upgrade-jobs",
                json={"firmware_id": image.json()["firmware_id"], "selector": {"all": True}},
            )
            assert response.status_code == 202, response.text
        job_id = response.json()["job_id"]
        await pile.wait_for_record(
            lambda r: r.command == 0xE0 and r.message.packet_index == 10,  # type: ignore[union-attr]
            timeout=20,
        )
        await server.kill()
        killed_at = len(pile.received(0xE0))
        await server.start()
        done = await _job(server, job_id)
    device = done["devices"][0]
    assert device["state"] == "verified" and device["reported_version"] == "313", device
    indexes = [r.message.packet_index for r in pile.received(0xE0)]  # type: ignore[union-attr]
    # nothing started over: after the restart the transfer goes on where it stopped
    assert indexes.count(1) == 1 and sorted(set(indexes)) == list(range(1, 28))
    assert indexes[killed_at] >= indexes[killed_at - 1] - 1
    assert all(b >= a - 1 for a, b in itertools.pairwise(indexes))
    assert pile.firmware_version == 313
