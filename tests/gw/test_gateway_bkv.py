"""The gateway with a BKV gateway (several sockets) over real TCP and a real PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from chargegw.api.app import ApiState, create_app
from chargegw.app import Gateway
from chargegw.domain.devices import get_device
from chargeproto import bkv

from .piles import RawBkvGateway
from .test_gateway_ap3000 import fetch, fetchrow

VECTORS = {
    v["name"]: bytes.fromhex(v["hex"])
    for v in json.loads((Path(__file__).parents[2] / "fixtures" / "bkv.json").read_text())
    if v["valid"]
}


async def test_heartbeat_is_answered_with_the_local_time(gateway: Gateway) -> None:
    box = await RawBkvGateway().connect(gateway.server.port)
    await box.send_raw(VECTORS["bkv_0x0000_heartbeat"])
    reply = await box.expect(bkv.HeartbeatReply)
    assert isinstance(reply, bkv.HeartbeatReply)
    assert reply.gateway_id == "82200520004869" and reply.seq == 0
    assert reply.server_time[:2] == "20" and "T" in reply.server_time
    row = await fetchrow(gateway, "SELECT * FROM gateways WHERE gateway_id = $1", "82200520004869")
    assert row is not None and row["protocol"] == "bkv" and row["online"]
    assert row["iccid"] == "89860463112070319417" and row["firmware"] == "cV.1r46"
    await box.close()


async def test_status_cluster_is_acked_exactly_and_sockets_become_devices(
    gateway: Gateway,
) -> None:
    box = await RawBkvGateway().connect(gateway.server.port)
    await box.send_raw(VECTORS["bkv_0x1000_0x1017_status_cluster"])
    _, raw = await box.expect_with_bytes(bkv.StatusClusterAck)
    assert raw == VECTORS["bkv_0x1000_0x1017_status_cluster_ack"]  # the guide's own ACK
    device = await fetchrow(
        gateway, "SELECT * FROM devices WHERE device_id = $1", "82231214002700-1"
    )
    assert device is not None and device["online"] and device["protocol"] == "bkv"
    assert device["gateway_id"] == "82231214002700" and device["socket_no"] == 1
    assert device["temperature_c"] == 37 and device["port_count"] == 2
    ports = await fetch(
        gateway, "SELECT * FROM ports WHERE device_id = $1 ORDER BY port", "82231214002700-1"
    )
    assert [(p["port"], p["status"], p["status_code"]) for p in ports] == [
        (1, "idle", 0x80),
        (2, "idle", 0x80),
    ]
    assert ports[0]["voltage_v"] == pytest.approx(227.5)

    assert gateway.pool is not None
    app = create_app(
        ApiState(
            pool=gateway.pool,
            metrics=gateway.metrics,
            readiness=gateway.readiness,
            auth_required=False,
        )
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        body = (await client.get("/api/v1/devices/82231214002700-1")).json()
        assert body["online"] is True
        assert [p["port"] for p in body["ports"]] == [1, 2]
        listed = (await client.get("/api/v1/devices", params={"protocol": "bkv"})).json()
        assert [d["device_id"] for d in listed["items"]] == ["82231214002700-1"]
    await box.close()


async def test_a_repeated_status_cluster_moves_one_time_per_socket(gateway: Gateway) -> None:
    """The same status cluster again updates the socket's device row only; its jacks
    read as reported then."""
    box = await RawBkvGateway().connect(gateway.server.port)
    for _ in range(2):  # the second is a repeat
        await box.send_raw(VECTORS["bkv_0x1000_0x1017_status_cluster"])
        await box.expect(bkv.StatusClusterAck)
    device_id = "82231214002700-1"
    device = await fetchrow(gateway, "SELECT * FROM devices WHERE device_id = $1", device_id)
    assert device is not None and device["reported_ports"] == 0b11
    second = device["ports_reported_at"]
    raw = await fetch(gateway, "SELECT reported_at FROM ports WHERE device_id = $1", device_id)
    assert second is not None and all(p["reported_at"] < second for p in raw)
    assert gateway.pool is not None
    async with gateway.pool.acquire() as conn:
        detail = await get_device(conn, device_id)
    assert detail is not None and [p.reported_at for p in detail.ports] == [second, second]
    await box.close()


@pytest.mark.parametrize(
    ("report", "ack_cls", "ack_vector"),
    [
        (
            "bkv_0x1000_0x1010_event_report",
            bkv.EventReportAck,
            "bkv_0x1000_0x1010_event_report_ack",
        ),
        ("bkv_0x1000_0x1004_fee_mode_end", bkv.FeeModeEndAck, "bkv_0x1000_0x1004_fee_mode_end_ack"),
    ],
)
async def test_reports_get_the_guides_acks(
    gateway: Gateway, report: str, ack_cls: Any, ack_vector: str
) -> None:
    box = await RawBkvGateway().connect(gateway.server.port)
    await box.send_raw(VECTORS[report])
    _, raw = await box.expect_with_bytes(ack_cls)
    assert raw == VECTORS[ack_vector]
    await box.close()


async def test_end_report_is_stored_then_acked_in_the_form_that_stops_resends(
    gateway: Gateway,
) -> None:
    box = await RawBkvGateway().connect(gateway.server.port)
    frame = VECTORS["bkv_0x0015_0x02_end_report"]
    report = bkv.decode(frame)
    assert isinstance(report, bkv.EndReport)
    await box.send_raw(frame)
    ack = await box.expect(bkv.CardEndAck)
    assert isinstance(ack, bkv.CardEndAck)
    assert ack.socket == report.socket and ack.result == 1
    assert gateway.pool is not None  # stored before the ACK left
    row = await gateway.pool.fetchrow(
        "SELECT reason FROM device_events WHERE kind = 'settlement' AND device_id = $1",
        f"{report.gateway_id}-{report.socket}",
    )
    assert row is not None and row["reason"] == "applied"  # the settlement, committed
    await box.close()


def _patched(frame: bytes, old: str, new: str) -> bytes:
    """``frame`` with bytes replaced and its checksum recomputed (bkv.md 2)."""
    body = bytearray(frame.replace(bytes.fromhex(old), bytes.fromhex(new), 1))
    body[-3] = sum(body[2:-3]) & 0xFF
    return bytes(body)


async def test_undocumented_container_after_reconnect_is_logged_not_rejected(
    gateway: Gateway,
) -> None:
    box = await RawBkvGateway().connect(gateway.server.port)
    # the field notes' undocumented command id 0x1013, sent after every reconnection
    unknown = _patched(VECTORS["bkv_0x1000_0x1017_status_cluster"], "0110170a", "0110130a")
    assert isinstance(bkv.decode(unknown), bkv.TlvContainer)
    await box.send_raw(unknown)
    heartbeat = _patched(VECTORS["bkv_0x0000_heartbeat"], "82200520004869", "82231214002700")
    await box.send_raw(heartbeat)
    await box.expect(bkv.HeartbeatReply)  # the connection survived, nothing was answered
    assert box.received == []
    rows = await fetch(gateway, "SELECT command, error FROM frames WHERE direction = 'in'")
    assert ("0x1000/0x1013", None) in [(r["command"], r["error"]) for r in rows]
    events = await fetch(gateway, "SELECT reason FROM device_events WHERE kind = 'report'")
    # a known quirk (docs/quirks.md): recorded as the gateway's connect report
    assert [e["reason"] for e in events] == ["connect_report"]
    await box.close()
