"""``chargegw nodes``, ``chargegw rebalance`` and ``chargegw bans`` on a real database."""

from __future__ import annotations

import asyncio
import json
import socket
import sys

import asyncpg
from click.testing import CliRunner, Result

from chargegw.cli import main


async def _cli(*args: str) -> Result:
    # the commands run their own event loop: keep them off the test's
    return await asyncio.to_thread(CliRunner().invoke, main, list(args))


async def _processes(pool: asyncpg.Pool) -> None:
    await pool.execute(
        """INSERT INTO cluster_processes (owner, node, worker, pid, connections, devices,
                                          max_connections)
           VALUES ('gw-a/0/100', 'gw-a', 0, 100, 900, 950, 19800),
                  ('gw-a/1/101', 'gw-a', 1, 101, 100, 100, 19800),
                  ('gw-b/0/200', 'gw-b', 0, 200, 0, 0, 19800)"""
    )
    await pool.execute(
        """INSERT INTO cluster_processes (owner, node, worker, pid, stopped_at)
           VALUES ('gw-a/1/99', 'gw-a', 1, 99, now())"""
    )


async def test_nodes_lists_live_processes_and_totals(db_dsn: str, db_pool: asyncpg.Pool) -> None:
    await _processes(db_pool)
    listed = await _cli("nodes", "--dsn", db_dsn)
    assert listed.exit_code == 0, listed.output
    lines = listed.stdout.splitlines()
    assert lines[0].split() == [
        "NODE", "WORKER", "PID", "STATE", "CONNECTIONS", "DEVICES", "MAX", "SILENT_S"
    ]  # fmt: skip
    assert [line.split()[:5] for line in lines[1:4]] == [
        ["gw-a", "0", "100", "live", "900"],
        ["gw-a", "1", "101", "live", "100"],
        ["gw-b", "0", "200", "live", "0"],
    ]
    assert lines[-1] == "3 live process(es), 1000 device connection(s)"
    everything = await _cli("nodes", "--all", "--json", "--dsn", db_dsn)
    procs = json.loads(everything.stdout)
    assert {p["owner"]: p["state"] for p in procs}["gw-a/1/99"] == "stopped"


async def test_rebalance_plans_and_asks_the_busiest(db_dsn: str, db_pool: asyncpg.Pool) -> None:
    await _processes(db_pool)
    dry = await _cli("rebalance", "--dry-run", "--dsn", db_dsn)
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.stdout)
    assert plan["target_per_process"] == 334 and plan["shed"] == {"gw-a/0/100": 566}
    asked = await db_pool.fetchval("SELECT sum(shed_remaining) FROM cluster_processes")
    assert asked == 0  # a dry run asks nobody
    done = await _cli("rebalance", "--rate", "25", "--dsn", db_dsn)
    assert done.exit_code == 0, done.output
    row = await db_pool.fetchrow(
        "SELECT shed_remaining, shed_rate FROM cluster_processes WHERE owner = 'gw-a/0/100'"
    )
    assert (row["shed_remaining"], row["shed_rate"]) == (566, 25.0)
    bad = await _cli("rebalance", "--rate", "0", "--dsn", db_dsn)
    assert bad.exit_code == 2 and "--rate" in bad.output


async def test_bans_list_and_lift(db_dsn: str, db_pool: asyncpg.Pool) -> None:
    empty = await _cli("bans", "list", "--dsn", db_dsn)
    assert empty.exit_code == 0 and "no device is banned" in empty.output
    await db_pool.execute(
        """INSERT INTO device_bans (device_id, until, reason, connects)
           VALUES ('04000077', now() + interval '10 minutes', 'flapping', 11),
                  ('04000078', now() - interval '1 minute', 'flapping', 12)"""
    )
    listed = await _cli("bans", "list", "--dsn", db_dsn)
    assert listed.exit_code == 0, listed.output
    rows = listed.stdout.splitlines()
    assert rows[0].split() == ["DEVICE", "UNTIL", "REASON", "CONNECTS"]
    assert len(rows) == 2 and rows[1].split()[0] == "04000077"  # the expired one is not listed
    lifted = await _cli("bans", "lift", "04000077", "--dsn", db_dsn)
    assert lifted.exit_code == 0 and "lifted" in lifted.output
    again = await _cli("bans", "lift", "04000077", "--dsn", db_dsn)
    assert again.exit_code == 1 and "not banned" in again.output


async def test_serve_workers_refuses_a_port_held_by_another_program(db_dsn: str) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "chargegw",
            "serve",
            "--workers",
            "2",
            "--dsn",
            db_dsn,
            "--device-host",
            "127.0.0.1",
            "--device-port",
            str(port),
            "--http-port",
            "0",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 1
    assert f"the device port {port} is already in use on 127.0.0.1" in output.decode()
    assert "--device-port or CHARGEGW_DEVICE_PORT" in output.decode()
