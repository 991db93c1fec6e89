"""Unchanged device, gateway and port state is not rewritten until ``state_refresh_s``."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import asyncpg

from chargegw.metrics import Metrics
from chargegw.store.writer import BatchWriter


def _writer(refresh_s: float) -> BatchWriter:
    return BatchWriter(lambda: None, Metrics(), refresh_s=refresh_s)


def test_a_repeated_state_row_is_put_once_per_refresh_period() -> None:
    writer = _writer(3600.0)
    writer.put_port("04000001", 1, status="idle", voltage_v=220.0, reported_at=datetime.now(UTC))
    writer.put_port("04000001", 1, status="idle", voltage_v=220.0, reported_at=datetime.now(UTC))
    assert len(writer._pending.ports) == 1 and len(writer._pending.touched_ports) == 1
    writer._pending.ports.clear()
    writer._pending.touched_ports.clear()
    # the same values again (a newer timestamp only): no upsert, only the timestamp moves
    later = datetime.now(UTC)
    writer.put_port("04000001", 1, status="idle", voltage_v=220.0, reported_at=later)
    assert not writer._pending.ports
    assert writer._pending.touched_ports == {("04000001", 1): later}
    writer._pending.touched_ports.clear()
    # a changed value is written at once, as is another port or another column set
    writer.put_port("04000001", 1, status="charging", voltage_v=220.0)
    writer.put_port("04000001", 2, status="idle", voltage_v=220.0)
    writer.put_port("04000001", 1, status="charging")
    assert writer.backlog == 2  # port 1 coalesced, port 2
    # rows carrying a dict (attributes) are compared too
    writer.put_device("04000001", protocol="ap3000", attributes={"a": 1})
    writer.put_device("04000001", protocol="ap3000", attributes={"a": 1})
    writer.put_device("04000001", protocol="ap3000", attributes={"a": 2})
    assert len(writer._pending.devices) == 1
    assert writer._pending.devices["04000001"]["attributes"] == {"a": 2}


def test_unchanged_state_is_written_again_after_the_refresh_period() -> None:
    writer = _writer(0.05)
    seen = 0
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and seen < 3:
        before = writer.backlog
        writer.put_gateway("82231214000001", protocol="bkv", last_seen_at=datetime.now(UTC))
        if writer.backlog > before:
            seen += 1
        writer._pending.gateways.clear()
        time.sleep(0.01)
    assert seen >= 3


async def test_touches_move_timestamps_forward_only(db_pool: asyncpg.Pool) -> None:
    writer = BatchWriter(lambda: db_pool, Metrics(), refresh_s=3600.0)
    writer.start()
    try:
        t0 = datetime(2026, 11, 29, 8, 0, tzinfo=UTC)
        writer.put_gateway("04000001", protocol="ap3000", last_seen_at=t0)
        writer.put_device("04000001", protocol="ap3000", gateway_id="04000001", last_seen_at=t0)
        writer.put_port("04000001", 1, status="idle", reported_at=t0)
        await writer.drained()
        t1, t2 = t0 + timedelta(minutes=3), t0 + timedelta(minutes=6)
        writer.put_gateway("04000001", protocol="ap3000", last_seen_at=t1)
        writer.put_device("04000001", protocol="ap3000", gateway_id="04000001", last_seen_at=t2)
        writer.touch_device("04000001", None, t2)  # a heartbeat
        writer.touch_device("04000001", t1, None)  # an older one arriving late
        writer.put_port("04000001", 1, status="idle", reported_at=t2)
        assert not writer._pending.devices and not writer._pending.ports
        await writer.drained()
        device = await db_pool.fetchrow("SELECT * FROM devices WHERE device_id = '04000001'")
        port = await db_pool.fetchrow("SELECT * FROM ports WHERE device_id = '04000001'")
        gateway = await db_pool.fetchval(
            "SELECT last_seen_at FROM gateways WHERE gateway_id = '04000001'"
        )
        assert device["last_seen_at"] == t2 and device["last_heartbeat_at"] == t2
        assert port["reported_at"] == t2 and port["status"] == "idle"
        assert gateway == t1
    finally:
        await writer.close()


def test_refresh_zero_writes_every_time() -> None:
    writer = _writer(0.0)
    for _ in range(3):
        writer.put_device("04000001", protocol="ap3000", voltage_v=220.0)
        assert writer.backlog == 1
        writer._pending.devices.clear()
