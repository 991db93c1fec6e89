"""Backup and restore, drilled: a backup taken while piles charge and the API writes,
restored into a fresh database that a new gateway then serves; and every way a restore
must refuse (non-empty target, damaged, corrupt or truncated dump, newer schema, no
pg_dump), leaving the target as it was."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from click.testing import CliRunner, Result

from chargegw.api import billing, firmware, params
from chargegw.app import Gateway
from chargegw.cli import main
from chargegw.ops.backup import (
    DUMP_FILE,
    ID_GAP,
    MANIFEST_FILE,
    BackupError,
    backup,
    restore,
)
from chargegw.store.database import MIGRATION_LOCK, migrate, migrations
from chargegw.store.partitions import MAINTENANCE_LOCK, maintain
from chargesim import SimulatedAp3000Pile, Simulator

from .conftest import fresh_database, settings_for
from .waiting import api_client, eventually, eventually_json

CHARGING, SETTLING, OFFLINE = "04000001", "04000002", "04000003"
CARD = "0A1B2C3D"
#: the simulated piles of type code 04 report device type 0x27 and firmware 312
IMAGE = bytes(range(256)) * 8
RUNNING1 = {
    "unplug_power_w": 1.2,
    "unplug_detect_time_s": 20,
    "float_percent": 30,
    "float_detect_time_s": 900,
    "float_time_s": 1800,
    "heartbeat_interval_s": 180,
}
FAST = {
    "ack_timeout_s": 1.0,
    "command_spacing_s": 0.05,
    "command_expiry_s": 3600.0,
    "outbox_scan_s": 0.5,
    "firmware_tick_s": 0.2,
}


@pytest.fixture
def gateway_settings() -> dict[str, Any]:
    return dict(FAST)


@pytest.fixture
async def target(pg_server_dsn: str) -> AsyncIterator[str]:
    """An empty database to restore into."""
    async with fresh_database(pg_server_dsn, "chargegw_restore") as dsn:
        yield dsn


async def relations(dsn: str) -> int:
    """Tables and functions of the public schema (0: an empty database)."""
    conn = await asyncpg.connect(dsn)
    try:
        count: int = await conn.fetchval(
            """SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n
                        ON n.oid = c.relnamespace WHERE n.nspname = 'public')
                    + (SELECT count(*) FROM pg_proc p JOIN pg_namespace n
                        ON n.oid = p.pronamespace WHERE n.nspname = 'public')"""
        )
        return count
    finally:
        await conn.close()


async def _stored(gateway: Gateway, device_id: str) -> bool:
    await gateway.writer.drained()
    assert gateway.pool is not None
    row = await gateway.pool.fetchval(
        "SELECT 1 FROM devices WHERE device_id = $1 AND device_type IS NOT NULL", device_id
    )
    return bool(row) and gateway.sessions.link_of(device_id) is not None


def _sim(gateway: Gateway, piles: list[SimulatedAp3000Pile]) -> Simulator:
    return Simulator(
        "127.0.0.1", gateway.server.port, piles, accel=120.0, jitter=0, seed=1, reconnect_min_s=0.1
    )


async def _json(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_backup_under_traffic_restores_into_a_fresh_database_that_serves_on(
    gateway: Gateway, pg_server_dsn: str, target: str, tmp_path: Path
) -> None:
    routers = (billing.router, params.router, firmware.router)
    async with api_client(gateway, *routers) as api:
        # the pile that will be offline: known, then gone; commands and jobs wait for it
        offline = SimulatedAp3000Pile(OFFLINE, ports=2, heartbeat_s=180)
        async with _sim(gateway, [offline]):
            await eventually(lambda: _stored(gateway, OFFLINE), what=f"{OFFLINE} stored")
        await eventually(lambda: gateway.sessions.link_of(OFFLINE) is None, what="offline")

        piles = [SimulatedAp3000Pile(p, ports=2, heartbeat_s=180) for p in (CHARGING, SETTLING)]
        sim = _sim(gateway, piles)
        async with sim:
            for pile in piles:
                await eventually(lambda p=pile: _stored(gateway, p.phy_id), what="pile stored")
            await _json(
                await api.post("/api/v1/cards", json={"card_id": CARD, "balance_cent": 500}), 201
            )
            charging = await _json(
                await api.post(f"/api/v1/devices/{CHARGING}/ports/1/start", json={"mode": "full"}),
                202,
            )
            settling = await _json(
                await api.post(
                    f"/api/v1/devices/{SETTLING}/ports/1/start",
                    json={"mode": "time", "duration_min": 1},
                ),
                202,
            )
            await _json(
                await api.put(f"/api/v1/devices/{CHARGING}/params", json={"running1": RUNNING1}),
                202,
            )
            await _json(
                await api.put(f"/api/v1/devices/{OFFLINE}/params", json={"running1": RUNNING1}), 202
            )
            waiting = await _json(
                await api.post(
                    f"/api/v1/devices/{OFFLINE}/commands", json={"command": "read_running_params1"}
                ),
                202,
            )
            image = await _json(
                await api.post(
                    "/api/v1/firmware",
                    content=IMAGE,
                    params={
                        "protocol": "ap3000",
                        "family": "0xE0",
                        "device_type": 0x27,
                        "version": "313",
                    },
                    headers={"Content-Type": "application/octet-stream"},
                ),
                201,
            )
            job = await _json(
                await api.post(
                    "/api/v1/upgrade-jobs",
                    json={
                        "firmware_id": image["firmware_id"],
                        "selector": {"device_ids": [OFFLINE]},
                    },
                ),
                202,
            )
            await eventually_json(
                api, f"/api/v1/orders/{charging['order_no']}", "status", {"charging"}
            )
            settled = await eventually_json(
                api, f"/api/v1/orders/{settling['order_no']}", "status", {"settled"}
            )
            verified = await eventually(
                lambda: api.get(f"/api/v1/devices/{CHARGING}/params"),
                lambda r: r.json()["groups"]["running1"]["status"] == "verified",
                what="running1 verified",
            )
            assert verified.status_code == 200

            # the backup runs while the API keeps writing (a top-up of 1 cent at a time)
            # and the piles keep reporting
            stop = asyncio.Event()

            done = [0]

            async def keep_topping_up() -> None:
                while not stop.is_set():
                    await _json(
                        await api.post(f"/api/v1/cards/{CARD}/top-up", json={"amount_cent": 1}),
                        200,
                    )
                    done[0] += 1

            writer = asyncio.create_task(keep_topping_up())
            await eventually(lambda: done[0] > 0, what="top-ups running")
            manifest = await backup(gateway.dsn or "", tmp_path / "backup")
            stop.set()
            await writer
            topped_up = done[0]
        await eventually(lambda: not gateway.sessions.devices, what="piles gone")

    # the manifest: this code's schema, counts of the snapshot, the dump's digest
    assert manifest["schema_version"] == migrations()[-1].version
    assert manifest["tables"]["orders"] == 2 and manifest["tables"]["firmware_images"] == 1
    assert manifest["partitions"]["frames"], manifest["partitions"]
    written = json.loads((tmp_path / "backup" / MANIFEST_FILE).read_text())
    assert written == manifest

    report = await restore(tmp_path / "backup", target)
    conn = await asyncpg.connect(target)
    try:  # the audit log's daily partitions came back as partitions, with their bounds
        rows = await conn.fetch(
            """SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound FROM pg_inherits i
                 JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'frames'::regclass"""
        )
        # ids go on past the backup's: none issued after it is given again
        last_event = await conn.fetchval("SELECT last_id FROM event_sequencer")
        max_event = await conn.fetchval("SELECT max(id) FROM events")
        next_command = await conn.fetchval("SELECT nextval('commands_command_id_seq')")
        max_command = await conn.fetchval("SELECT max(command_id) FROM commands")
    finally:
        await conn.close()
    assert last_event >= max_event + ID_GAP and next_command > max_command + ID_GAP
    assert sorted(r["relname"] for r in rows) == manifest["partitions"]["frames"]
    assert all(
        r["bound"].startswith("FOR VALUES FROM") for r in rows if r["relname"] != "frames_default"
    )
    assert report.ok, report.mismatched
    assert report.not_restored == ["device_correlations"]
    frames = sum(n for t, n in manifest["tables"].items() if t.startswith("frames"))
    assert frames > 0 and report.counts["events"][1] == manifest["tables"]["events"] > 0

    restored = Gateway(settings_for(target, **FAST, process_timeout_s=1.0, cluster_heartbeat_s=0.2))
    await restored.start(http=False)
    try:
        assert restored.pool is not None
        # one snapshot: the card's balance is the sum of the top-ups the dump holds
        balance, total, top_ups = await restored.pool.fetchrow(
            """SELECT c.balance_cent, sum(t.amount_cent), count(*) FILTER (WHERE t.amount_cent = 1)
                 FROM cards c JOIN card_transactions t USING (card_id)
                WHERE c.card_id = $1 GROUP BY c.balance_cent""",
            CARD,
        )
        assert balance == total == 500 + top_ups and 0 < top_ups <= topped_up
        async with api_client(restored, *routers) as api:
            order = await _json(await api.get(f"/api/v1/orders/{settling['order_no']}"), 200)
            assert order["status"] == "settled" and order["amount_cent"] == settled["amount_cent"]
            order = await _json(await api.get(f"/api/v1/orders/{charging['order_no']}"), 200)
            assert order["status"] == "charging"
            groups = (await _json(await api.get(f"/api/v1/devices/{CHARGING}/params"), 200))[
                "groups"
            ]
            assert groups["running1"]["status"] == "verified"
            groups = (await _json(await api.get(f"/api/v1/devices/{OFFLINE}/params"), 200))[
                "groups"
            ]
            assert groups["running1"]["status"] != "verified"
            restored_job = await _json(await api.get(f"/api/v1/upgrade-jobs/{job['job_id']}"), 200)
            assert restored_job["state"] == "running"
            command = await _json(await api.get(f"/api/v1/commands/{waiting['command_id']}"), 200)
            assert command["status"] == "pending"

            # the processes of the backed-up platform are declared stopped, their devices
            # released and offline
            async def others_live() -> int:
                assert restored.pool is not None
                n: int = await restored.pool.fetchval(
                    """SELECT count(*) FROM cluster_processes
                        WHERE stopped_at IS NULL AND owner <> $1""",
                    restored.owner,
                )
                return n

            await eventually(others_live, lambda n: n == 0, what="old processes stopped")
            device = await eventually_json(api, f"/api/v1/devices/{CHARGING}", "online", {False})
            assert device["offline_reason"] in {"process_lost", "not_connected"}

            # the waiting command reaches its pile when it connects to the new gateway
            pile = SimulatedAp3000Pile(OFFLINE, ports=2, heartbeat_s=180)
            async with _sim(restored, [pile]):
                await eventually_json(
                    api, f"/api/v1/commands/{waiting['command_id']}", "status", {"acked"}
                )
    finally:
        await restored.stop()


# ---------------------------------------------------------------- refusals


@pytest.fixture
async def small_backup(db_pool: asyncpg.Pool, db_dsn: str, tmp_path: Path) -> Path:
    """A backup of a database with a few rows and today's audit partitions."""
    await db_pool.execute(
        "INSERT INTO cards (card_id, balance_cent) VALUES ('0A0B0C0D', 100), ('01020304', 5)"
    )
    async with db_pool.acquire() as conn:
        await maintain(conn, today=datetime.now(UTC).date(), retention_days=30, days_ahead=1)
    await backup(db_dsn, tmp_path / "small")
    return tmp_path / "small"


def _edit_manifest(folder: Path, **changes: Any) -> None:
    path = folder / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_restore_refuses_bad_backups_and_targets_and_changes_nothing(
    small_backup: Path, db_pool: asyncpg.Pool, db_dsn: str, target: str, tmp_path: Path
) -> None:
    # a database that is not empty
    before = await relations(db_dsn)
    with pytest.raises(BackupError, match=r"not empty \(table public\..*nothing was changed"):
        await restore(small_backup, db_dsn)
    assert await relations(db_dsn) == before

    # a manifest that says a newer chargegw made it
    manifest = json.loads((small_backup / MANIFEST_FILE).read_text())
    _edit_manifest(small_backup, migrations=[*manifest["migrations"], "9999"])
    with pytest.raises(BackupError, match=r"the backup has schema version 9999.*newer"):
        await restore(small_backup, target)
    _edit_manifest(small_backup, migrations=manifest["migrations"])
    # a dump of a newer pg_dump than the target server
    _edit_manifest(small_backup, pg_dump_major=99)
    with pytest.raises(BackupError, match=r"written by pg_dump 99 .* PostgreSQL 99 or newer"):
        await restore(small_backup, target)
    _edit_manifest(small_backup, pg_dump_major=manifest["pg_dump_major"])

    # a dump holding a migration this code does not know, whatever its manifest says
    await db_pool.execute(
        "INSERT INTO schema_migrations (version, name) VALUES ('9999', '9999_future.sql')"
    )
    await backup(db_dsn, tmp_path / "future")
    _edit_manifest(tmp_path / "future", migrations=manifest["migrations"])
    with pytest.raises(BackupError, match=r"the dump has schema version 9999.*newer"):
        await restore(tmp_path / "future", target)

    # one byte changed after the backup: the digest says so
    dump = small_backup / DUMP_FILE
    good = dump.read_bytes()
    dump.write_bytes(good[:2000] + bytes([good[2000] ^ 0xFF]) + good[2001:])
    with pytest.raises(BackupError, match="does not match its manifest"):
        await restore(small_backup, target)
    # never a dump, its digest matching: pg_restore cannot read it
    dump.write_bytes(b"not a dump" * 100)
    _edit_manifest(small_backup, sha256=_sha256(dump))
    with pytest.raises(BackupError, match="corrupt or truncated"):
        await restore(small_backup, target)
    # cut short, its digest matching: refused, or failed within its one transaction
    dump.write_bytes(good[: len(good) * 2 // 3])
    _edit_manifest(small_backup, sha256=_sha256(dump))
    with pytest.raises(BackupError, match=r"corrupt or truncated|nothing was restored"):
        await restore(small_backup, target)
    assert await relations(target) == 0

    # no pg_dump where it was asked for; a used directory; no backup at all
    nowhere = tmp_path / "no-tools"
    nowhere.mkdir()
    with pytest.raises(BackupError, match=r"no pg_dump and pg_restore in .*no-tools"):
        await backup(db_dsn, tmp_path / "out", pg_bin=nowhere)
    assert not (tmp_path / "out").exists()
    with pytest.raises(BackupError, match="is not empty"):
        await backup(db_dsn, small_backup)
    with pytest.raises(BackupError, match="no manifest"):
        await restore(nowhere, target)
    assert await relations(target) == 0


# ---------------------------------------------------------------- the commands


async def _cli(*args: str) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, main, list(args))


async def test_cli_backup_restore_and_db_stats(
    small_backup: Path, db_dsn: str, target: str, tmp_path: Path
) -> None:
    out = tmp_path / "cli"
    made = await _cli("backup", "--dsn", db_dsn, "--output", str(out))
    assert made.exit_code == 0, made.output
    assert "schema " + migrations()[-1].version in made.output
    done = await _cli("restore", str(out), "--dsn", target, "--json")
    assert done.exit_code == 0, done.output
    report = json.loads(done.output)
    assert report["ok"] and report["tables"]["cards"] == {"manifest": 2, "restored": 2}
    again = await _cli("restore", str(out), "--dsn", target)
    assert again.exit_code == 1 and "not empty" in again.output

    # two rows updated of two: as many dead tuples as live ones
    conn = await asyncpg.connect(target)
    try:
        await conn.execute("UPDATE cards SET balance_cent = balance_cent + 1")
        await conn.execute("SELECT pg_stat_force_next_flush()")
    finally:
        await conn.close()

    async def cards() -> dict[str, Any]:
        shown = await _cli("db", "stats", "--dsn", target, "--json")
        assert shown.exit_code == 0, shown.output
        stats: dict[str, Any] = json.loads(shown.output)
        return {t["name"]: t for t in stats["tables"]}

    tables = await eventually(cards, lambda t: t["cards"]["dead_tuples"] == 2)
    assert tables["cards"]["total_bytes"] > 0 and tables["cards"]["live_tuples"] == 2
    assert tables["cards"]["dead_ratio"] == 0.5
    frames = tables["frames"]
    assert frames["partitioned"] and len(frames["partitions"]) == 3  # default, today, tomorrow
    today = f"frames_{datetime.now(UTC).date():%Y%m%d}"
    ranges = {p["name"]: p["range"] for p in frames["partitions"]}
    assert ranges["frames_default"] == "DEFAULT" and ranges[today].startswith("FROM ('")
    table = await _cli("db", "stats", "--dsn", target)
    assert table.exit_code == 0, table.output
    assert "DEAD%" in table.output and today in table.output and "cards" in table.output


async def test_a_gateway_starting_during_a_backup_does_not_wait_for_it(db_dsn: str) -> None:
    """``chargegw backup`` holds the migration and maintenance locks shared for its whole
    dump: a process starting meanwhile (nothing to migrate) goes on at once."""
    backup_conn = await asyncpg.connect(db_dsn)
    conn = await asyncpg.connect(db_dsn)
    try:
        await backup_conn.execute("SELECT pg_advisory_lock_shared($1)", MIGRATION_LOCK)
        await backup_conn.execute("SELECT pg_advisory_lock_shared($1)", MAINTENANCE_LOCK)
        assert await asyncio.wait_for(migrate(conn), 5) == []
        today = datetime.now(UTC).date()
        skipped = await asyncio.wait_for(
            maintain(conn, today=today, retention_days=30, wait=False), 5
        )
        assert skipped == ([], [])
    finally:
        await conn.close()
        await backup_conn.close()


async def test_commands_expired_since_the_backup_are_finished_not_sent_again(
    db_pool: asyncpg.Pool, db_dsn: str, target: str, tmp_path: Path
) -> None:
    """A start still open at the backup whose expiry has passed by the restore is
    finished dead (``restored``) and its order fails: the pile may have answered it after
    the backup. One still within its expiry goes on as after a restart."""
    await db_pool.execute("INSERT INTO devices (device_id, protocol) VALUES ('04000077', 'ap3000')")
    await db_pool.execute(
        """INSERT INTO orders (order_no, device_id, port, protocol, status)
           VALUES ('OLD1', '04000077', 1, 'ap3000', 'starting')"""
    )
    await db_pool.execute(
        """INSERT INTO commands (device_id, protocol, name, priority, status, expires_at,
                                 order_no, correlation)
           VALUES ('04000077', 'ap3000', 'start', 0, 'sent', now() - interval '1 hour',
                   'OLD1', 7),
                  ('04000077', 'ap3000', 'reboot', 0, 'pending', now() + interval '1 hour',
                   NULL, NULL)"""
    )
    await backup(db_dsn, tmp_path / "b")
    report = await restore(tmp_path / "b", target)
    assert report.ok and report.commands_finished == 1
    conn = await asyncpg.connect(target)
    try:
        rows = await conn.fetch("SELECT name, status, dead_reason FROM commands ORDER BY name")
        order = await conn.fetchrow("SELECT status, failure_reason FROM orders")
    finally:
        await conn.close()
    assert [tuple(r) for r in rows] == [
        ("reboot", "pending", None),
        ("start", "dead", "restored"),
    ]
    assert tuple(order) == ("failed", "restored")
