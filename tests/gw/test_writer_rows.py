"""The batch writer's typed rows: one class per table, field names are column names, so a
misspelt column fails when the row is built instead of vanishing at flush time."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from chargegw.metrics import Metrics
from chargegw.store.writer import (
    BatchWriter,
    DeviceRow,
    EventRow,
    FrameRow,
    GatewayRow,
    PortRow,
)

ROWS: dict[str, type[Any]] = {
    "gateways": GatewayRow,
    "devices": DeviceRow,
    "ports": PortRow,
    "device_events": EventRow,
    "frames": FrameRow,
}


def test_a_misspelt_column_is_refused_when_the_row_is_built() -> None:
    with pytest.raises(TypeError, match="signal_strenght"):
        DeviceRow("04000001", signal_strenght=20)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="reportd_at"):
        PortRow("04000001", 1, status="idle", reportd_at=datetime.now(UTC))  # type: ignore[call-arg]


def test_rows_are_frozen() -> None:
    row = GatewayRow("82231214000001", protocol="bkv")
    with pytest.raises(AttributeError):
        row.protocol = "ap3000"  # type: ignore[misc]


async def test_every_field_of_a_row_is_a_column_of_its_table(db_pool: asyncpg.Pool) -> None:
    for table, row_class in ROWS.items():
        columns = {
            r["column_name"]
            for r in await db_pool.fetch(
                "SELECT column_name FROM information_schema.columns WHERE table_name = $1",
                table,
            )
        }
        fields = set(row_class._fields)
        assert fields <= columns, (table, fields - columns)


async def test_rows_put_in_one_batch_are_coalesced_and_written(db_pool: asyncpg.Pool) -> None:
    """Later values win, unreported (None) ones keep what was put before, attributes are
    merged, and a late offline row of an older connection changes nothing of the newer
    connection's state."""
    writer = BatchWriter(lambda: db_pool, Metrics(), interval_s=60.0)
    writer.start()
    now = datetime.now(UTC)
    try:
        writer.put_gateway(GatewayRow("04000001", protocol="ap3000", last_seen_at=now))
        writer.put_device(
            DeviceRow(
                "04000001",
                protocol="ap3000",
                online=True,
                connection_id="new",
                firmware="1.0",
                attributes={"a": 1},
            )
        )
        writer.put_device(DeviceRow("04000001", signal_strength=20, attributes={"b": 2}))
        writer.put_device(
            DeviceRow("04000001", online=False, offline_reason="peer closed", connection_id="old")
        )
        writer.put_port(PortRow("04000001", 1, status="idle", voltage_v=220.0, reported_at=now))
        writer.put_port(PortRow("04000001", 1, status="charging", reported_at=now))
        writer.put_event(EventRow("04000001", now, "report", "Heartbeat", {"x": 1}))
        writer.put_frame(FrameRow(now, "new", "04000001", "in", "ap3000", "heartbeat", "444e59"))
        assert writer.backlog == 5
        await writer.drained()
    finally:
        await writer.close()
    device = await db_pool.fetchrow("SELECT * FROM devices WHERE device_id = '04000001'")
    assert device["online"] is True and device["connection_id"] == "new"
    assert device["offline_reason"] is None
    assert device["firmware"] == "1.0" and device["signal_strength"] == 20
    assert device["attributes"] == '{"a": 1, "b": 2}'
    port = await db_pool.fetchrow("SELECT * FROM ports WHERE device_id = '04000001'")
    assert port["status"] == "charging" and port["voltage_v"] == 220.0
    assert await db_pool.fetchval("SELECT detail::text FROM device_events") == '{"x": 1}'
    assert await db_pool.fetchval("SELECT hex FROM frames") == "444e59"
