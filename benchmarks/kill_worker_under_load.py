"""Kill -9 one of three workers under load (issue 6 target), and check its commands.

Starts ``chargegw serve --workers 3`` on a fresh database, drives ``--piles`` piles at it
with ``chargegw loadtest --target``, and once every pile is online:

1. queues a command (AP3000 ``locate``) for up to ``--commands`` devices held by the
   busiest worker, half of them just before the kill and half just after;
2. kills that worker with SIGKILL;
3. waits until every pile is online again and every one of those commands is finished.

Prints a JSON result: seconds until the piles were back, the commands' final states and
attempts. A command counts as delivered exactly once when it is ``acked`` and the pile saw
one message id for it (a resend after the kill repeats the same id, which the pile
recognises as a repeat). Usage::

    uv run python benchmarks/kill_worker_under_load.py --dsn postgresql://... --piles 30000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import asyncpg
import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _online(conn: asyncpg.Connection) -> int:
    return int(
        await conn.fetchval(
            """SELECT count(*) FROM device_sessions s JOIN cluster_processes p USING (owner)
               WHERE p.stopped_at IS NULL"""
        )
    )


async def main(args: argparse.Namespace) -> dict[str, Any]:
    device_port, http_port = _free_port(), _free_port()
    env = {
        **os.environ,
        "CHARGEGW_DSN": args.dsn,
        "CHARGEGW_LOG_LEVEL": "warning",
        "CHARGEGW_ACCEPT_RATE": "2000",
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chargegw",
            "serve",
            "--workers",
            "3",
            "--device-host",
            "127.0.0.1",
            "--device-port",
            str(device_port),
            "--http-port",
            str(http_port),
        ],
        env=env,
    )
    load = None
    try:
        base = f"http://127.0.0.1:{http_port}"
        # no keep-alive: a connection held by the worker about to be killed would fail the
        # next request; each request opens a new one, which reaches a live worker
        no_reuse = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=base, timeout=10, limits=no_reuse) as client:
            for _ in range(300):
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.2)
            load = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "chargesim.loadtest",
                    "--piles",
                    str(args.piles),
                    "--target",
                    f"127.0.0.1:{device_port}",
                    "--api",
                    base,
                    "--accel",
                    str(args.accel),
                    "--duration",
                    str(args.duration),
                    "--ramp",
                    "30",
                    "--settle",
                    "60",
                    "--report",
                    args.report,
                    "--quiet",
                    "--bkv-share",
                    "0",
                ],
            )
            conn = await asyncpg.connect(args.dsn)
            try:
                deadline = time.monotonic() + 180
                while await _online(conn) < args.piles:
                    if time.monotonic() > deadline:
                        raise SystemExit("the piles did not all come online")
                    await asyncio.sleep(1)
                await asyncio.sleep(10)  # some steady load first
                victim = await conn.fetchrow(
                    """SELECT p.owner, p.pid, count(*) AS devices
                       FROM device_sessions s JOIN cluster_processes p USING (owner)
                       WHERE p.stopped_at IS NULL GROUP BY p.owner, p.pid
                       ORDER BY devices DESC LIMIT 1"""
                )
                doomed = [
                    r["device_id"]
                    for r in await conn.fetch(
                        "SELECT device_id FROM device_sessions WHERE owner = $1 LIMIT $2",
                        victim["owner"],
                        args.commands,
                    )
                ]

                async def command(device_id: str) -> int:
                    # right after the kill a new connection can still be queued on the
                    # dying worker's socket and be reset: that request never ran, retry
                    for attempt in range(5):
                        try:
                            response = await client.post(
                                f"/api/v1/devices/{device_id}/commands",
                                json={"command": "locate", "params": {"locate_duration_s": 1}},
                            )
                            break
                        except httpx.TransportError:
                            if attempt == 4:
                                raise
                            await asyncio.sleep(0.2)
                    response.raise_for_status()
                    return int(response.json()["command_id"])

                half = len(doomed) // 2
                ids = [await command(d) for d in doomed[:half]]
                os.kill(victim["pid"], signal.SIGKILL)
                killed_at = time.monotonic()
                ids += [await command(d) for d in doomed[half:]]
                back_after = None
                while time.monotonic() - killed_at < 120:
                    held = await conn.fetchval(
                        """SELECT count(*) FROM device_sessions s
                           JOIN cluster_processes p USING (owner)
                           WHERE p.stopped_at IS NULL AND p.owner <> $1
                             AND s.device_id = ANY($2::text[])""",
                        victim["owner"],
                        doomed,
                    )
                    if back_after is None and held == len(doomed):
                        back_after = time.monotonic() - killed_at
                    open_ = await conn.fetchval(
                        """SELECT count(*) FROM commands WHERE command_id = ANY($1::bigint[])
                           AND status IN ('pending', 'sent')""",
                        ids,
                    )
                    if back_after is not None and open_ == 0:
                        break
                    await asyncio.sleep(0.5)
                all_back = None
                while time.monotonic() - killed_at < 120:
                    elsewhere = await conn.fetchval(
                        """SELECT count(*) FROM device_sessions s
                           JOIN cluster_processes p USING (owner)
                           WHERE p.stopped_at IS NULL AND p.owner <> $1""",
                        victim["owner"],
                    )
                    if elsewhere >= args.piles:
                        all_back = time.monotonic() - killed_at
                        break
                    await asyncio.sleep(0.5)
                rows = await conn.fetch(
                    "SELECT status, attempts FROM commands WHERE command_id = ANY($1::bigint[])",
                    ids,
                )
            finally:
                await conn.close()
        statuses: dict[str, int] = {}
        attempts: dict[int, int] = {}
        for r in rows:
            statuses[r["status"]] = statuses.get(r["status"], 0) + 1
            attempts[r["attempts"]] = attempts.get(r["attempts"], 0) + 1
        return {
            "piles": args.piles,
            "victim": victim["owner"],
            "victim_devices": victim["devices"],
            "commands": len(ids),
            "commands_queued_before_kill": half,
            "victims_devices_back_on_others_after_s": back_after,
            "all_piles_back_after_s": all_back,
            "command_status": statuses,
            "command_attempts": attempts,
        }
    finally:
        if load is not None:
            load.send_signal(signal.SIGINT)
            load.wait(60)
        server.send_signal(signal.SIGTERM)
        server.wait(180)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", required=True, help="an empty database")
    parser.add_argument("--piles", type=int, default=30000)
    parser.add_argument("--commands", type=int, default=300)
    parser.add_argument("--accel", type=float, default=3.0)
    parser.add_argument("--duration", type=float, default=240.0)
    parser.add_argument("--report", default="kill-worker-loadtest.json")
    print(json.dumps(asyncio.run(main(parser.parse_args())), indent=2))
