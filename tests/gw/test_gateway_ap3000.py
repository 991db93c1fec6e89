"""The gateway with AP3000 piles over real TCP and a real PostgreSQL."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from chargegw.app import Gateway
from chargegw.domain.devices import get_device, get_gateway
from chargeproto import ap3000

from .conftest import database_outage
from .metric_values import sample
from .piles import RawPile
from .waiting import eventually


async def fetchrow(gw: Gateway, sql: str, *args: Any) -> asyncpg.Record | None:
    await gw.writer.drained()
    assert gw.pool is not None
    return await gw.pool.fetchrow(sql, *args)


async def fetch(gw: Gateway, sql: str, *args: Any) -> list[asyncpg.Record]:
    await gw.writer.drained()
    assert gw.pool is not None
    return list(await gw.pool.fetch(sql, *args))


def _decode_errors(gw: Gateway) -> float:
    """Undecodable input the gateway counted (``decode_errors``, every kind)."""
    (family,) = gw.metrics.decode_errors_total.collect()
    return sum(s.value for s in family.samples if s.name.endswith("_total"))


async def test_a_repeated_heartbeat_restores_what_another_report_changed(
    gateway: Gateway,
) -> None:
    """A heartbeat equal to the last one skips building its rows; a 0x06 in between
    changed the port, so the next equal heartbeat writes its status again."""
    pile = await RawPile("04CEAA41").connect(gateway.server.port)
    await pile.register()
    await pile.expect(ap3000.RegistrationReply)

    async def status() -> tuple[str, int]:
        await gateway.writer.drained()
        row = await fetchrow(
            gateway,
            "SELECT status, status_code FROM ports WHERE device_id = $1 AND port = 1",
            "04CEAA41",
        )
        assert row is not None
        return row["status"], row["status_code"]

    for _ in range(2):  # the second is a repeat
        await pile.heartbeat((1, 0))
        await pile.expect(ap3000.HeartbeatReply)
    assert await status() == ("charging", 1)
    await pile.send(
        ap3000.PowerHeartbeat(
            pile.phy_id,
            pile.next_id(),
            port=0,
            status=2,
            duration_s=60,
            energy_kwh=0.01,
            start_mode=0,
            power_w=0.0,
            max_power_w=0.0,
            min_power_w=0.0,
            avg_power_w=0.0,
            order_id="00" * 16,
            period_energy_raw=0,
            peak_power_w=0.0,
        )
    )
    await eventually(status, lambda s: s == ("occupied", 2), what="the 0x06 status")
    await pile.heartbeat((1, 0))  # equal to the heartbeat before the 0x06
    await pile.expect(ap3000.HeartbeatReply)
    assert await status() == ("charging", 1)


async def test_a_repeated_heartbeat_moves_one_time_for_its_ports_and_gateway(
    gateway: Gateway,
) -> None:
    """An equal heartbeat updates one row: its device's (last seen, ports reported). The
    API still shows each port reported, and the pile's gateway seen, at that heartbeat."""
    pile = await RawPile("04CEAA42").connect(gateway.server.port)
    await pile.register()
    await pile.expect(ap3000.RegistrationReply)
    for _ in range(2):  # the second is a repeat
        await pile.heartbeat((0, 1))
        await pile.expect(ap3000.HeartbeatReply)
    raw = await fetch(
        gateway, "SELECT reported_at FROM ports WHERE device_id = $1 ORDER BY port", "04CEAA42"
    )
    device = await fetchrow(gateway, "SELECT * FROM devices WHERE device_id = $1", "04CEAA42")
    assert device is not None and device["reported_ports"] == 0b11
    second = device["ports_reported_at"]
    assert second is not None and all(p["reported_at"] < second for p in raw)
    gw_row = await fetchrow(gateway, "SELECT * FROM gateways WHERE gateway_id = $1", "04CEAA42")
    assert gw_row is not None and gw_row["last_seen_at"] is None  # the device's stands in
    assert gateway.pool is not None
    async with gateway.pool.acquire() as conn:
        detail = await get_device(conn, "04CEAA42")
        seen = await get_gateway(conn, "04CEAA42")
    assert detail is not None and [p.reported_at for p in detail.ports] == [second, second]
    assert [p.status for p in detail.ports] == ["idle", "charging"]
    assert seen is not None and seen.last_seen_at == device["last_seen_at"] >= second
    # ports the report did not cover (bit clear, past 31, no mask) keep their own time
    own = await fetch(
        gateway,
        """SELECT port_reported_at($1, p, m, $2) AS at
             FROM (VALUES (2, 1), (32, -1), (1, NULL)) AS v(p, m)""",
        raw[0]["reported_at"],
        second,
    )
    assert [r["at"] for r in own] == [raw[0]["reported_at"]] * 3


async def test_pile_registers_heartbeats_and_is_seen(gateway: Gateway) -> None:
    pile = await RawPile("04CEAA40").connect(gateway.server.port)
    await pile.register()
    reply = await pile.expect(ap3000.RegistrationReply)
    assert reply.msg_id == 1 and isinstance(reply, ap3000.RegistrationReply) and reply.result == 0
    msg_id = await pile.heartbeat((1, 0))
    hb = await pile.expect(ap3000.HeartbeatReply)
    assert hb.msg_id == msg_id
    await pile.send(ap3000.TimeRequest(pile.phy_id, pile.next_id()))
    time_reply = await pile.expect(ap3000.TimeReply)
    assert isinstance(time_reply, ap3000.TimeReply) and time_reply.timestamp_unix > 1_700_000_000

    device = await fetchrow(gateway, "SELECT * FROM devices WHERE device_id = $1", "04CEAA40")
    assert device is not None
    assert device["online"] and device["protocol"] == "ap3000"
    assert device["port_count"] == 2 and device["firmware"] == "126"
    assert device["voltage_v"] == pytest.approx(221.5) and device["temperature_c"] == 30
    ports = await fetch(
        gateway, "SELECT * FROM ports WHERE device_id = $1 ORDER BY port", "04CEAA40"
    )
    assert [(p["port"], p["status"], p["status_code"]) for p in ports] == [
        (1, "charging", 1),
        (2, "idle", 0),
    ]
    gw_row = await fetchrow(gateway, "SELECT * FROM gateways WHERE gateway_id = $1", "04CEAA40")
    assert gw_row is not None and gw_row["online"]
    frames = await fetch(gateway, "SELECT direction, command, hex FROM frames ORDER BY id")
    assert (frames[0]["direction"], frames[0]["command"]) == ("in", "iccid")
    assert "*" in frames[0]["hex"]  # the ICCID is masked
    assert [(f["direction"], f["command"]) for f in frames[1:]] == [
        ("in", "0x20"),
        ("out", "0x20"),
        ("in", "0x21"),
        ("out", "0x21"),
        ("in", "0x22"),
        ("out", "0x22"),
    ]
    await pile.close()
    await eventually(lambda: _offline(gateway, "04CEAA40"), timeout=5)
    event = await fetchrow(
        gateway,
        "SELECT reason FROM device_events WHERE device_id = $1 AND kind = 'offline'",
        "04CEAA40",
    )
    assert event is not None and event["reason"] == "peer closed"


async def _offline(gw: Gateway, device_id: str) -> bool:
    row = await fetchrow(gw, "SELECT online FROM devices WHERE device_id = $1", device_id)
    return row is not None and not row["online"]


@pytest.mark.settings(ap3000_heartbeat_s=0.2, missed_heartbeats=2.0)
async def test_silent_pile_goes_offline_with_reason(gateway: Gateway) -> None:
    pile = await RawPile("04000001").connect(gateway.server.port)
    await pile.heartbeat()
    await pile.expect(ap3000.HeartbeatReply)
    await eventually(lambda: _offline(gateway, "04000001"), timeout=5)
    row = await fetchrow(
        gateway,
        "SELECT reason FROM device_events WHERE device_id = $1 AND kind = 'offline'",
        "04000001",
    )
    assert row is not None and row["reason"] == "heartbeat_timeout"
    await pile.close()


async def test_reconnect_on_a_new_socket_rebinds_and_closes_the_old(gateway: Gateway) -> None:
    old = await RawPile("04000002").connect(gateway.server.port)
    await old.heartbeat()
    await old.expect(ap3000.HeartbeatReply)
    new = await RawPile("04000002").connect(gateway.server.port, iccid=None)
    await new.heartbeat()
    await new.expect(ap3000.HeartbeatReply)
    assert await old.closed_by_server()
    link = gateway.sessions.link_of("04000002")
    assert link is not None and not link.closed
    kinds = [
        r["kind"]
        for r in await fetch(
            gateway, "SELECT kind FROM device_events WHERE device_id = $1 ORDER BY id", "04000002"
        )
    ]
    assert kinds == ["online", "rebound"]  # never offline in between
    await new.close()


async def test_same_sim_on_a_new_connection_supersedes_the_old(gateway: Gateway) -> None:
    old = await RawPile("04000003").connect(gateway.server.port)
    await old.heartbeat()
    await old.expect(ap3000.HeartbeatReply)
    new = await RawPile("04000004").connect(gateway.server.port)  # same ICCID
    assert await old.closed_by_server()
    await new.heartbeat()
    await new.expect(ap3000.HeartbeatReply)
    await new.close()


@pytest.mark.settings(garbage_budget=3)
async def test_garbage_is_counted_then_the_connection_closed_others_unaffected(
    gateway: Gateway,
) -> None:
    good = await RawPile("04000005").connect(gateway.server.port)
    bad = await RawPile("04000006").connect(gateway.server.port, iccid=None)
    for _ in range(5):
        await bad.send_raw(b"\x00\x01garbage\xff" * 3)
        await bad.send_raw(bytes.fromhex("444e5910003b37ab0401002198080200000905eeff"))  # bad sum
    assert await bad.closed_by_server()
    await good.heartbeat()
    await good.expect(ap3000.HeartbeatReply)
    errors = await fetch(gateway, "SELECT error FROM frames WHERE error IS NOT NULL")
    assert any("checksum" in r["error"] for r in errors)
    assert any("garbage" in r["error"] for r in errors)
    await good.close()


async def test_oversized_length_never_buffers_more_than_one_frame(gateway: Gateway) -> None:
    pile = await RawPile("04000007").connect(gateway.server.port, iccid=None)
    # a header announcing 65535 bytes, then lots of filler
    await pile.send_raw(b"DNY\xff\xff" + b"\x00" * 10000)
    await eventually(lambda: _decode_errors(gateway), what="the oversized header refused")
    for link in gateway.server.links.values():
        assert link.buffered <= gateway.settings.max_frame
    await pile.heartbeat()
    await pile.expect(ap3000.HeartbeatReply)
    await pile.close()


async def test_settlement_is_acknowledged_after_it_is_stored(gateway: Gateway) -> None:
    pile = await RawPile("04000008").connect(gateway.server.port)
    settlement = ap3000.Settlement(
        pile.phy_id,
        pile.next_id(),
        duration_s=3600,
        max_power_w=100.0,
        energy_kwh=0.48,
        port=0,
        start_mode=1,
        card_id="00000000",
        stop_reason=1,
        order_id="AB" * 16,
    )
    await pile.send(settlement)
    reply = await pile.expect(ap3000.SettlementReply)
    assert reply.msg_id == settlement.msg_id
    # by the time the pile has its ACK, the settlement is in the database
    assert gateway.pool is not None
    row = await gateway.pool.fetchrow(
        "SELECT detail FROM device_events WHERE device_id = $1 AND kind = 'settlement'",
        pile.phy_id,
    )
    assert row is not None and '"order_id": "' + "AB" * 16 in row["detail"]
    await pile.close()


async def test_database_outage_keeps_piles_answered_and_loses_nothing(
    gateway: Gateway, db_dsn: str, pg_server_dsn: str
) -> None:
    pile = await RawPile("04000009").connect(gateway.server.port)
    await pile.heartbeat()
    await pile.expect(ap3000.HeartbeatReply)
    await gateway.writer.drained()
    # the database goes away: no new connections, existing ones killed
    async with database_outage(pg_server_dsn, db_dsn):
        sent = []
        for _ in range(5):
            sent.append(await pile.heartbeat((1, 0)))
            await pile.expect(ap3000.HeartbeatReply)  # still answered
        settlement = ap3000.Settlement(
            pile.phy_id,
            pile.next_id(),
            duration_s=60,
            max_power_w=50.0,
            energy_kwh=0.01,
            port=0,
            start_mode=1,
            card_id="00000000",
            stop_reason=7,
            order_id="CD" * 16,
        )
        await pile.send(settlement)
        await eventually(lambda: not gateway.readiness()["database"], what="database not ready")
        # proves no settlement ACK comes within 0.5 s while it cannot be stored
        with pytest.raises((AssertionError, TimeoutError)):
            await pile.expect(ap3000.SettlementReply, timeout=0.5)
        assert pile.received == []
        m = gateway.metrics
        assert sample(m, "chargegw_settlements_waiting") == 1  # its ACK waits on the database
        assert sample(m, "chargegw_db_write_failures_total") >= 1
    reply = await pile.expect(ap3000.SettlementReply, timeout=15)
    assert reply.msg_id == settlement.msg_id
    assert sample(m, "chargegw_settlements_waiting") == 0
    assert sample(m, "chargegw_settlements_committed_total", protocol="ap3000") == 1
    assert sample(m, "chargegw_settlement_ingest_seconds_sum", protocol="ap3000") >= 0.5
    await gateway.writer.drained()
    assert gateway.readiness()["database"]
    rows = await fetch(
        gateway,
        "SELECT count(*) AS n FROM frames WHERE device_id = $1 AND command = '0x21'"
        " AND direction = 'in'",
        pile.phy_id,
    )
    assert rows[0]["n"] == 6  # the heartbeat before and the five during the outage
    await pile.close()


async def test_a_host_relays_several_piles_as_one_gateway(gateway: Gateway) -> None:
    host = await RawPile("09D62684").connect(gateway.server.port)
    await host.send(
        ap3000.HostHeartbeat(
            "09D62684",
            host.next_id(),
            firmware_version=101,
            rtc_type=1,
            timestamp_unix=1604934748,
            signal_strength=31,
            modem_type=6,
            iccid="89860413161892009275",
            host_type=0x50,
            frequency_mhz=472,
        )
    )
    for phy_id in ("04000011", "04000012"):
        host.phy_id = phy_id
        await host.heartbeat((0, 1))
        await host.expect(ap3000.HeartbeatReply)
    devices = await fetch(gateway, "SELECT device_id, gateway_id FROM devices ORDER BY device_id")
    assert [(d["device_id"], d["gateway_id"]) for d in devices] == [
        ("04000011", "09D62684"),
        ("04000012", "09D62684"),
    ]
    row = await fetchrow(gateway, "SELECT * FROM gateways WHERE gateway_id = '09D62684'")
    assert row is not None and row["iccid"] == "89860413161892009275" and row["firmware"] == "101"
    assert len(gateway.sessions.device_ids(next(iter(gateway.server.links.values())))) == 2
    await host.close()
