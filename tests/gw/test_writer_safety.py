"""What the batch writer and the device layer must never lose (issue 11, findings 5, 11, 13).

- A statement-level refusal (a read-only standby after a failover) is an outage: rows are
  held, nothing that waits for a commit is acknowledged, and everything is written once
  the database takes writes again.
- A row whose own values the database refuses is set aside in ``rejected_rows`` (with the
  error), never dropped, and never blocks the rows around it.
- Text a device sends with undecodable bytes is stored readably; logs never show the ICCID.
- Devices that leave are forgotten: memory does not grow with every device id seen.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from chargegw.app import Gateway
from chargegw.metrics import Metrics
from chargegw.store.writer import BatchWriter, DeviceRow, EventRow, FrameRow, GatewayRow
from chargeproto import ap3000, bkv

from .conftest import read_only_database
from .piles import RawBkvGateway, RawPile
from .waiting import first

GW = "82231214000042"


def _order_confirm(pile: RawPile) -> ap3000.OrderConfirm:
    return ap3000.OrderConfirm(
        pile.phy_id,
        pile.next_id(),
        port=0,
        start_mode=1,
        card_id="00000000",
        duration_s=60,
        order_id="0" * 32,
    )


def _jackless_end_report() -> bkv.FeeModeEndReport:
    """A 0x1000/0x1004 end report that names no socket or port: kept as an event."""
    return bkv.FeeModeEndReport(
        GW, 0, bkv_seq=7, bkv_gateway_id=GW, energy_kwh=0.5, duration_min=30
    )


@pytest.mark.settings(state_refresh_s=300.0)
async def test_a_read_only_database_holds_rows_and_acks_until_they_are_stored(
    gateway: Gateway, pg_server_dsn: str, db_dsn: str
) -> None:
    """AP3000 0x04 and a BKV end report without a jack are answered only once stored; a
    pile that connects meanwhile is in the directory afterwards and gets its commands."""
    assert gateway.pool is not None
    pile = await RawPile("04000101").connect(gateway.server.port)
    await pile.heartbeat()
    await pile.expect(ap3000.HeartbeatReply)
    box = await RawBkvGateway().connect(gateway.server.port)
    async with read_only_database(pg_server_dsn, db_dsn, gateway.pool):
        await pile.send(_order_confirm(pile))
        await box.send_raw(bkv.encode(_jackless_end_report()))
        late = await RawPile("04000102").connect(gateway.server.port, iccid=None)
        await late.heartbeat()
        await late.expect(ap3000.HeartbeatReply)  # plain replies do not wait for a commit
        await first(lambda: _async(not gateway.writer.healthy), "the writer holds the rows")
        # nothing that waits for a commit is acknowledged while nothing can be committed
        with pytest.raises((AssertionError, TimeoutError)):
            await pile.expect(ap3000.OrderConfirmReply, timeout=1.5)
        with pytest.raises((AssertionError, TimeoutError)):
            await box.expect(bkv.FeeModeEndAck, timeout=0.5)
        await first(
            lambda: _async("read-only" in gateway.readiness_reasons().get("database", "")),
            "readiness names the read-only database",
        )
    await pile.expect(ap3000.OrderConfirmReply, timeout=15)
    await box.expect(bkv.FeeModeEndAck, timeout=15)
    await first(lambda: _async(gateway.writer.healthy), "the writer recovers")
    kinds = {
        (r["device_id"], r["reason"])
        for r in await gateway.pool.fetch("SELECT device_id, reason FROM device_events")
    }
    assert ("04000101", "OrderConfirm") in kinds
    assert (GW, "FeeModeEndReport") in kinds
    owner = await gateway.pool.fetchval(
        "SELECT owner FROM device_sessions WHERE device_id = '04000102'"
    )
    assert owner == gateway.owner
    assert await gateway.pool.fetchval("SELECT count(*) FROM rejected_rows") == 0
    for raw in (pile, box, late):
        await raw.close()


async def _async(value: Any) -> Any:
    return value


async def test_a_row_the_database_refuses_is_set_aside_and_the_rest_is_written(
    db_pool: asyncpg.Pool,
) -> None:
    """One row with a value out of its column's range goes to ``rejected_rows`` with the
    error; the rows around it are written and the callbacks run."""
    metrics = Metrics()
    writer = BatchWriter(lambda: db_pool, metrics, interval_s=0.02)
    writer.start()
    acked: list[str] = []
    try:
        now = datetime.now(UTC)
        writer.put_gateway(GatewayRow(GW, protocol="bkv", online=True, last_seen_at=now))
        writer.put_device(DeviceRow("dev-ok", protocol="bkv", online=True, temperature_c=30))
        writer.put_device(DeviceRow("dev-bad", protocol="bkv", online=True, signal_strength=2**40))
        writer.put_event(EventRow("dev-ok", now, "report", "fine", {"a": 1}))
        writer.after_commit(lambda: acked.append("ack"))
        await asyncio.wait_for(writer.drained(), 10)
    finally:
        await writer.close()
    assert acked == ["ack"] and writer.healthy
    devices = {r["device_id"] for r in await db_pool.fetch("SELECT device_id FROM devices")}
    assert devices == {"dev-ok"}
    assert await db_pool.fetchval("SELECT count(*) FROM device_events") == 1
    rejected = await db_pool.fetchrow("SELECT * FROM rejected_rows")
    assert rejected["table_name"] == "devices" and rejected["row_key"] == "dev-bad"
    assert json.loads(rejected["row_data"])["signal_strength"] == 2**40
    assert "out of" in rejected["error"] or "int32" in rejected["error"]
    sample = metrics.registry.get_sample_value(
        "chargegw_db_rows_rejected_total", {"table": "devices"}
    )
    assert sample == 1.0


async def test_undecodable_device_text_is_stored_readably_and_logs_mask_the_iccid(
    gateway: Gateway,
) -> None:
    """A BKV heartbeat whose ICCID and firmware hold bytes that are not text: the gateway
    row is stored with ``\\xNN`` escapes, the heartbeat is answered, no row is refused,
    and no log line carries the ICCID unmasked."""
    assert gateway.pool is not None
    iccid = "8986046311207031\udcff\udcfe17"
    with capture_logs() as logs:
        box = await RawBkvGateway().connect(gateway.server.port)
        await box.send_raw(
            bkv.encode(
                bkv.Heartbeat(GW, 0, iccid=iccid, firmware_version="cV.1\udc80", signal_strength=20)
            )
        )
        await box.expect(bkv.HeartbeatReply)
        row = await first(
            lambda: gateway.pool.fetchrow(  # type: ignore[union-attr]
                "SELECT iccid, firmware FROM gateways WHERE gateway_id = $1 AND iccid IS NOT NULL",
                GW,
            ),
            "the gateway row with its ICCID",
        )
        await box.close()
    assert row["iccid"] == "8986046311207031\\xff\\xfe17"
    assert row["firmware"] == "cV.1\\x80"
    assert await gateway.pool.fetchval("SELECT count(*) FROM rejected_rows") == 0
    assert gateway.writer.healthy
    printed = json.dumps(logs, default=str)
    assert "8986046311207031" not in printed and "\\xff\\xfe17" not in printed


async def test_devices_that_leave_are_forgotten(gateway: Gateway) -> None:
    """Every new device id that connects and leaves costs no memory afterwards: the
    session registry holds only devices on open connections."""
    for number in range(40):
        pile = await RawPile(f"040002{number:02X}").connect(gateway.server.port, iccid=None)
        await pile.heartbeat()
        await pile.expect(ap3000.HeartbeatReply)
        await pile.close()
    box = await RawBkvGateway().connect(gateway.server.port)
    for socket in range(1, 6):
        status = bkv.SocketStatus(
            socket=socket,
            firmware_version=0x5136,
            temperature_c=30,
            signal_strength=20,
            ports=(bkv.JackStatus(port=0, status_bits=0x80, business_no=0),),
        )
        await box.send_raw(bkv.encode(bkv.StatusCluster.create(GW, 0, sockets=(status,))))
        await box.expect(bkv.StatusClusterAck)
    await box.close()
    await first(lambda: _async(not gateway.server.links), "every connection closed")
    await first(lambda: _async(not gateway.sessions.devices), "every device forgotten")
    assert gateway.metrics_devices_online() == 0


async def test_drained_returns_under_steady_traffic(db_pool: asyncpg.Pool) -> None:
    """``drained`` waits for the rows put before it, not for a pause in traffic: rows put
    faster than the batches commit never keep it waiting."""
    writer = BatchWriter(lambda: db_pool, Metrics(), interval_s=0.01)
    writer.start()
    stop = asyncio.Event()

    async def chatter() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            writer.put_event(EventRow("dev-busy", datetime.now(UTC), "report", "tick", {"n": n}))
            await asyncio.sleep(0)  # a row on every turn of the loop: never idle

    traffic = asyncio.create_task(chatter())
    try:
        writer.put_device(DeviceRow("dev-first", protocol="bkv", online=True))
        await asyncio.sleep(0.05)
        for _ in range(3):
            await asyncio.wait_for(writer.drained(), 10)
        assert await db_pool.fetchval("SELECT count(*) FROM devices") == 1
    finally:
        stop.set()
        await traffic
        await writer.close()


async def test_frames_of_a_batch_retried_after_an_unacknowledged_commit_are_not_refused(
    db_pool: asyncpg.Pool,
) -> None:
    """A batch retried although its COMMIT went through (the acknowledgement was lost)
    carries frames already stored under the same in-process ids: they are recognised as
    stored, the batch's other frames are written, and nothing goes to ``rejected_rows``."""
    metrics = Metrics()
    writer = BatchWriter(lambda: db_pool, metrics, interval_s=0.02)
    writer.start()
    try:
        now = datetime.now(UTC)
        first_copy = FrameRow(now, "c1", "dev-1", "in", "ap3000", "0x01", "aa", id=7 << 32 | 1)
        writer.put_frame(first_copy)
        await asyncio.wait_for(writer.drained(), 10)
        writer.put_frame(first_copy)  # the retried batch: the same frame again ...
        writer.put_frame(first_copy._replace(id=7 << 32 | 2, hex="bb"))  # ... and a new one
        await asyncio.wait_for(writer.drained(), 10)
    finally:
        await writer.close()
    assert writer.healthy
    rows = await db_pool.fetch("SELECT id, hex FROM frames ORDER BY id")
    assert [(r["id"], r["hex"]) for r in rows] == [(7 << 32 | 1, "aa"), (7 << 32 | 2, "bb")]
    assert await db_pool.fetchval("SELECT count(*) FROM rejected_rows") == 0
