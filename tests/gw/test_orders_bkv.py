"""Charging sessions end to end on BKV: API -> outbox -> real TCP -> simulated gateway."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from chargegw.app import Gateway
from chargegw.domain.outbox import MAX_ATTEMPTS
from chargeproto import bkv
from chargesim import Faults, Simulator
from chargesim.bkv import BkvIntervals, SimulatedBkvGateway

from .metric_values import sample
from .piles import RawBkvGateway
from .waiting import eventually, eventually_json

ACCEL = 60.0
GW = "82231214000001"
DEVICE = f"{GW}-1"
#: clusters every second, end-report resends every second (real time at ACCEL)
INTERVALS = BkvIntervals(status_s=60, end_report_resend_s=60)


@pytest.fixture
def gateway_settings() -> dict[str, Any]:
    return {"ack_timeout_s": 1.0, "command_spacing_s": 0.2}


async def _gateway(gateway: Gateway, **options: Any) -> tuple[Simulator, SimulatedBkvGateway]:
    options.setdefault("intervals", INTERVALS)
    box = SimulatedBkvGateway(GW, sockets=1, heartbeat_s=600, **options)
    sim = Simulator("127.0.0.1", gateway.server.port, [box], accel=ACCEL, jitter=0, seed=1)
    await sim.start()
    await sim.wait_connected(1, timeout=10)

    async def known() -> bool:  # the socket is a device in the database, connected here
        await gateway.writer.drained()
        assert gateway.pool is not None
        row = await gateway.pool.fetchval("SELECT 1 FROM devices WHERE device_id = $1", DEVICE)
        return bool(row) and gateway.sessions.link_of(DEVICE) is not None

    await eventually(known, what=f"{DEVICE} connected and stored")
    return sim, box


async def _start(api: httpx.AsyncClient, body: dict[str, Any], port: int = 1) -> dict[str, Any]:
    response = await api.post(f"/api/v1/devices/{DEVICE}/ports/{port}/start", json=body)
    assert response.status_code == 202, response.text
    result: dict[str, Any] = response.json()
    return result


async def _settlement_events(gateway: Gateway) -> list[str]:
    assert gateway.pool is not None
    rows = await gateway.pool.fetch(
        "SELECT reason FROM device_events WHERE kind = 'settlement' ORDER BY id"
    )
    return [r["reason"] for r in rows]


async def test_start_by_time_records_the_business_number_samples_and_settles_once(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    sim, box = await _gateway(gateway)
    async with sim:
        body = await _start(api, {"mode": "time", "duration_min": 5})
        order_no = body["order_no"]
        assert len(order_no) == 32 and body["status"] == "pending"
        command = await eventually_json(
            api, f"/api/v1/commands/{body['command_id']}", "status", {"acked"}
        )
        assert command["result_code"] == 1 and command["attempts"] == 1
        assert command["reply"]["business_no"] == box.jack(1, 0).business_no == 1
        order = await eventually_json(api, f"/api/v1/orders/{order_no}", "status", {"charging"})
        assert order["business_no"] == 1 and order["protocol"] == "bkv"
        # what the socket got: 0x0015/0x07 on, by time, 5 min, jack A
        start = box.received_messages(bkv.ChargeControl)[0]
        assert (start.socket, start.port, start.switch) == (1, 0, 1)
        assert (start.charge_mode, start.duration_min, start.energy_kwh) == (1, 5, 0.0)
        assert start.seq == command["correlation"] != 0
        m, bkv_start = gateway.metrics, {"protocol": "bkv", "command": "start"}
        acked = {"protocol": "bkv", "outcome": "acked"}
        await eventually(lambda: sample(m, "chargegw_start_commands_total", **acked))
        assert sample(m, "chargegw_command_latency_seconds_count", **bkv_start) == 1

        order = await eventually_json(api, f"/api/v1/orders/{order_no}", "status", {"settled"})
        assert order["stop_reason"] == "time_limit" and order["stop_reason_code"] is None
        assert order["duration_s"] == 300 and order["business_no"] == 1
        assert not order["device_initiated"] and order["started_at"] and order["ended_at"]
        assert order["settlement"]["sub_cmd"] == 0x02
        await eventually(
            lambda: sample(m, "chargegw_settlements_committed_total", protocol="bkv"), what="bkv"
        )
        samples = (await api.get(f"/api/v1/orders/{order_no}/samples")).json()["items"]
        assert samples and samples[-1]["energy_kwh"] >= samples[0]["energy_kwh"]

        # ACKed in the 0x0C form: the simulator stops resending (nothing is left in its
        # queue of unacknowledged reports, the only source of resends)
        await eventually(lambda: box.bkv_stats.end_reports_acked, what="the end report ACKed")
        assert box.bkv_stats.end_reports_acked == 1 and not box.end_reports
        acks = box.received_messages(bkv.CardEndAck)
        assert acks and acks[0].socket == 1 and acks[0].result == 1
        reports = box.sent_messages(bkv.EndReport)
        assert box.bkv_stats.wrong_end_acks == 0

        # a resend of the same end report changes nothing and is acknowledged again
        await box.send_message(reports[0])
        await eventually(
            lambda: len(box.received_messages(bkv.CardEndAck)), lambda n: n > len(acks)
        )
        assert len(box.received_messages(bkv.CardEndAck)) == len(acks) + 1
        again = (await api.get(f"/api/v1/orders/{order_no}")).json()
        assert again["updated_at"] == order["updated_at"] and again["status"] == "settled"
        events = await _settlement_events(gateway)
        assert events[0] == "applied" and set(events[1:]) == {"duplicate"}
        assert len((await api.get("/api/v1/orders")).json()["items"]) == 1


async def test_stop_by_api_is_a_server_stop(gateway: Gateway, api: httpx.AsyncClient) -> None:
    sim, box = await _gateway(gateway)
    async with sim:
        body = await _start(api, {"mode": "full"}, port=2)
        order_no = body["order_no"]
        await eventually_json(api, f"/api/v1/orders/{order_no}", "status", {"charging"})
        sent = box.received_messages(bkv.ChargeControl)[0]
        assert (sent.port, sent.charge_mode, sent.duration_min) == (1, 1, 900)  # until full
        stop = await api.post(f"/api/v1/devices/{DEVICE}/ports/2/stop")
        assert stop.status_code == 202 and stop.json()["order_no"] == order_no
        order = await eventually_json(api, f"/api/v1/orders/{order_no}", "status", {"settled"})
        assert order["stop_reason"] == "server_stop" and order["business_no"] == 1
        switches = [m.switch for m in box.received_messages(bkv.ChargeControl)]
        assert switches == [1, 0]
        command = await eventually_json(
            api, f"/api/v1/commands/{stop.json()['command_id']}", "status", {"acked"}
        )
        assert command["reply"]["business_no"] == 1


async def test_refusal_fails_the_order_with_the_result_text(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    sim, _ = await _gateway(gateway, faults=Faults(refuse_with=0))
    async with sim:
        body = await _start(api, {"mode": "energy", "energy_kwh": 0.5})
        command = await eventually_json(
            api, f"/api/v1/commands/{body['command_id']}", "status", {"failed"}
        )
        assert command["result_code"] == 0 and command["result_text"] == "failed"
        order = await eventually_json(
            api, f"/api/v1/orders/{body['order_no']}", "status", {"failed"}
        )
        assert order["failure_reason"] == "failed" and order["business_no"] is None
        refused = {"protocol": "bkv", "outcome": "refused"}
        await eventually(
            lambda: sample(gateway.metrics, "chargegw_start_commands_total", **refused)
        )


async def test_silence_one_resend_with_the_same_seq_then_dead_and_reconciled_later(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    sim, box = await _gateway(gateway, faults=Faults(silent=True))
    async with sim:
        body = await _start(api, {"mode": "time", "duration_min": 3})
        command = await eventually_json(
            api, f"/api/v1/commands/{body['command_id']}", "status", {"dead"}
        )
        assert command["dead_reason"] == "no answer" and command["attempts"] == MAX_ATTEMPTS
        sent = box.received_messages(bkv.ChargeControl)
        assert len(sent) == 2 and sent[0] == sent[1] and sent[0].seq != 0  # same seq
        order = await eventually_json(
            api, f"/api/v1/orders/{body['order_no']}", "status", {"failed"}
        )
        assert order["failure_reason"] == "no answer"

        # the socket did start after all (its reply was lost): the status report shows
        # the jack charging, and the order is reconciled instead of staying failed
        box.faults.silent = False
        # on the wire a start whose reply was lost looks like one begun at the socket
        assert box.start_local(1, 0, duration_min=3) is not None
        order = await eventually_json(
            api, f"/api/v1/orders/{body['order_no']}", "status", {"charging"}
        )
        assert order["business_no"] == 1 and order["failure_reason"] is None
        order = await eventually_json(
            api, f"/api/v1/orders/{body['order_no']}", "status", {"settled"}
        )
        assert order["stop_reason"] == "time_limit" and not order["device_initiated"]


@pytest.mark.parametrize("query_reply", ["state", "cluster"])
async def test_query_is_acknowledged_by_the_state_or_a_status_cluster(
    gateway: Gateway, api: httpx.AsyncClient, query_reply: str
) -> None:
    sim, box = await _gateway(gateway, query_reply=query_reply)
    async with sim:
        response = await api.post(f"/api/v1/devices/{DEVICE}/commands", json={"command": "query"})
        assert response.status_code == 202, response.text
        command = await eventually_json(
            api, f"/api/v1/commands/{response.json()['command_id']}", "status", {"acked"}
        )
        assert command["attempts"] == 1
        if query_reply == "state":
            assert command["reply"]["sub_cmd"] == 0x1C
        else:
            assert command["reply"]["bkv_cmd"] == 0x1017 and command["reply"]["seq"] == 0
        assert [m.socket for m in box.received_messages(bkv.SocketQuery)] == [1]


async def test_generic_commands_and_clear_errors(gateway: Gateway, api: httpx.AsyncClient) -> None:
    sim, box = await _gateway(gateway)
    async with sim:
        response = await api.post(
            f"/api/v1/devices/{DEVICE}/commands",
            json={"command": "set_params", "params": {"max_charge_duration_min": 480}},
        )
        assert response.status_code == 202, response.text
        command = await eventually_json(
            api, f"/api/v1/commands/{response.json()['command_id']}", "status", {"acked"}
        )
        assert (
            command["result_code"] == 1 and box.sockets[1].params["max_charge_duration_min"] == 480
        )
        response = await api.post(
            f"/api/v1/devices/{DEVICE}/commands", json={"command": "query_params"}
        )
        command = await eventually_json(
            api, f"/api/v1/commands/{response.json()['command_id']}", "status", {"acked"}
        )
        assert command["reply"]["max_charge_duration_min"] == 480

        modify = await api.post(
            f"/api/v1/devices/{DEVICE}/ports/1/modify", json={"duration_min": 10}
        )
        assert modify.status_code == 422 and "not supported by BKV" in modify.text
        unknown = await api.post(f"/api/v1/devices/{DEVICE}/commands", json={"command": "reboot"})
        assert unknown.status_code == 422
        assert "set_params" in unknown.json()["error"]["commands"]
        long = await api.post(
            f"/api/v1/devices/{DEVICE}/ports/1/start", json={"mode": "time", "duration_min": 901}
        )
        assert long.status_code == 422 and long.json()["error"]["field"] == "duration_min"
        bad = await api.post(
            f"/api/v1/devices/{DEVICE}/commands",
            json={"command": "voice_window", "params": {"buzzer": 1}},
        )
        assert bad.status_code == 422
        assert box.received_messages(bkv.ChargeControl) == []
        assert box.received_messages(bkv.VoiceWindow) == []


async def test_end_report_of_an_unknown_session_creates_a_device_initiated_order(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    raw = await RawBkvGateway().connect(gateway.server.port)
    report = bkv.EndReport(
        "82231214000077",
        0,
        socket=3,
        firmware_version=0x5136,
        temperature_c=30,
        signal_strength=25,
        port=1,
        status_bits=0xB0,
        business_no=42,
        power_w=0.0,
        current_a=0.0,
        energy_kwh=0.08,
        duration_min=45,
    )
    for _ in range(3):  # the gateway resends until answered
        await raw.send_raw(bkv.encode(report))
        ack = await raw.expect(bkv.CardEndAck)
        assert isinstance(ack, bkv.CardEndAck) and ack.socket == 3 and ack.result == 1
    items = (await api.get("/api/v1/orders", params={"device_id": "82231214000077-3"})).json()
    assert len(items["items"]) == 1
    order = items["items"][0]
    assert order["status"] == "settled" and order["device_initiated"]
    assert order["start_mode"] == "device" and order["port"] == 2 and order["business_no"] == 42
    assert order["stop_reason"] == "unknown" and order["energy_kwh"] == pytest.approx(0.08)
    assert len(order["order_no"]) == 32
    assert await _settlement_events(gateway) == ["applied", "duplicate", "duplicate"]
    await raw.close()
