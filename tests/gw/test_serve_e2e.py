"""`chargegw serve` as an operator runs it, with `chargegw sim` piles connecting to it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import httpx

from chargesim import Simulator, make_ap3000_piles, make_bkv_gateways

from .waiting import eventually, free_port, wait_http


async def test_serve_brings_up_the_platform_and_simulated_piles_are_seen(
    db_dsn: str, tmp_path: Path
) -> None:
    await _serve_and_simulate({"CHARGEGW_DSN": db_dsn}, tmp_path)


async def test_serve_without_a_dsn_runs_on_the_embedded_postgresql(tmp_path: Path) -> None:
    """The README's zero-configuration run command."""
    await _serve_and_simulate({"CHARGEGW_DSN": ""}, tmp_path)
    assert (tmp_path / "postgres" / "PG_VERSION").exists()


async def _serve_and_simulate(extra_env: dict[str, str], tmp_path: Path) -> None:
    device_port, http_port = free_port(), free_port()
    env = {**os.environ, **extra_env, "CHARGEGW_LOG_FORMAT": "json"}
    log_path = tmp_path / "serve.log"
    log_file = log_path.open("wb")  # a file, not a pipe nobody reads: logs never block
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "chargegw",
        "serve",
        "--device-host",
        "127.0.0.1",
        "--device-port",
        str(device_port),
        "--http-port",
        str(http_port),
        "--data-dir",
        str(tmp_path),
        env=env,
        stdout=log_file,
        stderr=asyncio.subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{http_port}"
    try:
        try:
            await wait_http(f"{base}/readyz", timeout=60, process=server)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{log_path.read_text()[-3000:]}") from None
        piles = [*make_ap3000_piles(3), *make_bkv_gateways(1, sockets=2)]
        sim = Simulator("127.0.0.1", device_port, piles, accel=60, seed=7)
        async with sim:
            await sim.wait_connected(4, timeout=10)
            async with httpx.AsyncClient(base_url=base) as client:

                async def online() -> dict[str, Any]:
                    response = await client.get("/api/v1/devices", params={"online": "true"})
                    listed: dict[str, Any] = response.json()
                    return listed

                body = await eventually(
                    online, lambda b: len(b["items"]) == 5, timeout=20, interval=0.2
                )
                assert sorted(d["device_id"] for d in body["items"]) == [
                    "04000001",
                    "04000002",
                    "04000003",
                    "82231214000001-1",
                    "82231214000001-2",
                ]
                detail = (await client.get("/api/v1/devices/04000001")).json()
                assert [p["port"] for p in detail["ports"]] == [1, 2]
                metrics = (await client.get("/metrics")).text
                assert "chargegw_connections_current 4.0" in metrics
                bkv_socket = (await client.get("/api/v1/devices/82231214000001-1")).json()
                assert [p["port"] for p in bkv_socket["ports"]] == [1, 2]
                assert bkv_socket["protocol"] == "bkv"
    finally:
        if server.returncode is None:
            server.send_signal(signal.SIGTERM)
        await asyncio.wait_for(server.wait(), 30)
        log_file.close()
    assert server.returncode == 0, log_path.read_text()[-2000:]
