"""Timelines of orders and devices (API and ``chargegw explain``): simulated AP3000 and
BKV sessions over real TCP and the real database; every transition points at its cause,
and a frame cause is an item of the same timeline."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

from chargegw.api import timeline as timeline_api
from chargegw.api.guard import Guard, HttpLimits
from chargegw.app import Gateway
from chargegw.cli import main
from chargegw.domain import auth
from chargegw.domain.timeline import decode_frame
from chargesim import SimulatedAp3000Pile, Simulator
from chargesim.bkv import BkvIntervals, SimulatedBkvGateway

from .waiting import api_client, eventually, eventually_json

PHY = "04000001"
GW = "82231214000001"
SOCKET = f"{GW}-1"
CAUSE_KINDS = {"frame", "api", "timer", "fault", "system"}


@pytest.fixture
def gateway_settings() -> dict[str, Any]:
    return {"ack_timeout_s": 1.0, "command_spacing_s": 0.2}


@pytest.fixture
async def api(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway's API with the timeline routes, its calls audited (as ``serve`` does)."""
    guard = Guard(HttpLimits(), audit=gateway.call_audit)
    async with api_client(gateway, timeline_api.router, guard=guard) as client:
        yield client


async def _connected(gateway: Gateway, device_id: str) -> bool:
    await gateway.writer.drained()
    assert gateway.pool is not None
    known = await gateway.pool.fetchval("SELECT 1 FROM devices WHERE device_id = $1", device_id)
    return bool(known) and gateway.sessions.link_of(device_id) is not None


async def _ap3000_session(gateway: Gateway, api: httpx.AsyncClient) -> str:
    """A 10-minute session (5 s at 120x) started from the API and settled; the pile then
    leaves. The order's number."""
    pile = SimulatedAp3000Pile(PHY, ports=2, heartbeat_s=180)
    sim = Simulator("127.0.0.1", gateway.server.port, [pile], accel=120.0, jitter=0, seed=1)
    await sim.start()
    await sim.wait_connected(1, timeout=10)
    await eventually(lambda: _connected(gateway, PHY), what=f"{PHY} connected")
    async with sim:
        response = await api.post(
            f"/api/v1/devices/{PHY}/ports/1/start",
            json={"mode": "time", "duration_min": 10},
            headers={"X-Request-Id": "c2-ap3000-start"},
        )
        assert response.status_code == 202, response.text
        order_no: str = response.json()["order_no"]
        await eventually_json(api, f"/api/v1/orders/{order_no}", "status", {"settled"}, timeout=20)
    await eventually(lambda: gateway.sessions.link_of(PHY) is None, what=f"{PHY} gone")
    await gateway.writer.drained()
    return order_no


def _of(items: list[dict[str, Any]], kind: str, **match: Any) -> list[dict[str, Any]]:
    return [i for i in items if i["kind"] == kind and all(i[k] == v for k, v in match.items())]


def _one(items: list[dict[str, Any]], kind: str, **match: Any) -> dict[str, Any]:
    found = _of(items, kind, **match)
    assert len(found) == 1, (kind, match, [i["summary"] for i in items])
    return found[0]


def _assert_explained(body: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Every transition names its cause; a frame cause is a frame item placed before it.
    The frame items by id."""
    items = body["items"]
    frames = {i["frame_id"]: i for i in items if i["kind"] == "frame"}
    position = {id(item): n for n, item in enumerate(items)}
    transitions = _of(items, "transition")
    assert transitions
    for item in transitions:
        cause = item["cause"]
        assert cause is not None and cause["kind"] in CAUSE_KINDS, item
        if cause["kind"] == "frame":
            frame = frames.get(cause["frame_id"])
            assert frame is not None, f"cause of {item['summary']} not in the timeline"
            assert position[id(frame)] < position[id(item)], item["summary"]
            code = frame["decoded"]["command"] if frame["decoded"] else frame["command"]
            assert f"caused by frame #{cause['frame_id']} ({code}" in item["summary"]
        else:
            assert cause["frame_id"] is None and cause["ref"], item
    times = [i["at"] for i in items]
    assert len(times) == body["limit"] or not body["truncated"]
    return frames


async def test_an_ap3000_order_timeline_explains_every_transition(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    order_no = await _ap3000_session(gateway, api)
    response = await api.get(f"/api/v1/orders/{order_no.lower()}/timeline")
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["order_no"], body["device_id"], body["port"]) == (order_no, PHY, 1)
    assert not body["truncated"]
    items = body["items"]
    frame_times = [i["at"] for i in items if i["kind"] == "frame"]
    assert frame_times and frame_times == sorted(frame_times, key=dt.datetime.fromisoformat)
    frames = _assert_explained(body)
    # the order's life, each step with its cause
    created = _one(items, "transition", type="order.created")
    assert created["cause"] == {"kind": "api", "frame_id": None, "ref": "c2-ap3000-start"}
    assert "caused by API call c2-ap3000-start" in created["summary"]
    started = _one(items, "transition", type="order.started")
    assert started["to_state"] == "charging" and started["cause"]["kind"] == "frame"
    assert frames[started["cause"]["frame_id"]]["direction"] == "in"
    stopped = _one(items, "transition", type="order.stopped")
    assert (stopped["from_state"], stopped["to_state"]) == ("charging", "settled")
    settlement_frame = frames[stopped["cause"]["frame_id"]]
    assert settlement_frame["decoded"]["name"] == "Settlement"
    assert settlement_frame["decoded"]["fields"]["port"] == 0  # on the wire: 0-based
    # the port went charging and back, caused by the pile's reports
    ports = _of(items, "transition", type="port.status_changed")
    assert any(p["to_state"] == "charging" for p in ports)
    assert all(p["port"] == 1 for p in ports)
    # the start command: created, sent as the 0x82 out frame, acked by the pile's answer
    command = _one(items, "command", type="command.created")
    sent = _one(items, "command", type="command.sent")
    assert sent["frame_id"] in frames
    out = frames[sent["frame_id"]]
    assert (out["direction"], out["command"], out["decoded"]["command"]) == ("out", "start", "0x82")
    assert out["summary"].startswith("-> 0x82 ChargeControl (start) port=0")
    assert out["decoded"]["fields"]["order_id"] == order_no and out["hex"].startswith("444e59")
    acked = _one(items, "transition", type="command.acked")
    assert acked["command_id"] == command["command_id"] and acked["to_state"] == "acked"
    # settlement and samples
    settlement = _one(items, "settlement")
    assert settlement["data"]["stop_reason"] == "time_limit"
    assert settlement["data"]["duration_s"] == 600
    samples = _one(items, "samples")
    assert samples["data"]["count"] >= 1
    # the device went online and offline around it
    offline = _of(items, "transition", type="device.offline")
    assert offline and offline[-1]["cause"]["kind"] in ("fault", "system", "timer")
    # bounded: the earliest items, flagged
    cut = (await api.get(f"/api/v1/orders/{order_no}/timeline", params={"limit": 3})).json()
    assert cut["truncated"] and len(cut["items"]) == 3 and cut["limit"] == 3
    assert [i["at"] for i in cut["items"]] == [i["at"] for i in items[:3]]


async def _cli(*args: str) -> Result:
    # the command runs its own event loop: keep it off the test's
    return await asyncio.to_thread(CliRunner().invoke, main, ["explain", *args])


async def test_explain_prints_the_timeline_for_a_person_and_as_json(
    gateway: Gateway, api: httpx.AsyncClient, db_dsn: str
) -> None:
    order_no = await _ap3000_session(gateway, api)
    text = await _cli("order", order_no, "--dsn", db_dsn)
    assert text.exit_code == 0, text.output
    lines = text.output.splitlines()
    assert lines[0].startswith(f"order {order_no} on {PHY} port 1, ")
    assert any(
        "transition" in line and "caused by API call c2-ap3000-start" in line for line in lines
    )
    started = next(
        line
        for line in lines
        if f"order {order_no}: starting -> charging" in line
        or f"order {order_no}: pending -> charging" in line
        or ("-> charging" in line and f"order {order_no}" in line)
    )
    assert "caused by frame #" in started
    assert any("frame" in line and "-> 0x82 ChargeControl (start)" in line for line in lines)
    assert any(line.split()[2] == "settlement" and "time_limit" in line for line in lines)
    as_json = await _cli("order", order_no.lower(), "--dsn", db_dsn, "--json")
    assert as_json.exit_code == 0, as_json.output
    body = json.loads(as_json.output)
    api_body = (await api.get(f"/api/v1/orders/{order_no}/timeline")).json()
    assert body["items"] == api_body["items"]
    assert len(lines) == 1 + len(body["items"])
    # the device: the same frames in a window around the order, none before it
    since = body["since"]
    device = await _cli("device", PHY, "--dsn", db_dsn, "--since", since, "--json")
    assert device.exit_code == 0, device.output
    device_frames = {i["frame_id"] for i in json.loads(device.output)["items"] if i["frame_id"]}
    assert {i["frame_id"] for i in body["items"] if i["kind"] == "frame"} <= device_frames
    before = await _cli("device", PHY, "--dsn", db_dsn, "--until", "2000-01-01T00:00:00")
    assert before.exit_code == 0 and "nothing recorded in this window" in before.output


async def test_explain_errors(db_dsn: str) -> None:
    unknown = await _cli("order", "00" * 16, "--dsn", db_dsn)
    assert unknown.exit_code == 1
    assert f"order {'00' * 16} not found" in unknown.output
    assert "Traceback" not in unknown.output
    device = await _cli("device", "04FFFFFF", "--dsn", db_dsn)
    assert device.exit_code == 1 and "device 04FFFFFF not found" in device.output
    inverted = await _cli(
        "device", "04FFFFFF", "--dsn", db_dsn, "--since", "2026-01-02", "--until", "2026-01-01"
    )
    assert inverted.exit_code == 1 and "--since is after --until" in inverted.output
    bad = await _cli("device", "04FFFFFF", "--dsn", db_dsn, "--since", "yesterday")
    assert bad.exit_code == 2 and "not an ISO 8601 time" in bad.output


async def test_a_bkv_order_timeline_points_at_its_causes(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    intervals = BkvIntervals(status_s=60, end_report_resend_s=60)
    box = SimulatedBkvGateway(GW, sockets=1, heartbeat_s=600, intervals=intervals)
    sim = Simulator("127.0.0.1", gateway.server.port, [box], accel=60.0, jitter=0, seed=1)
    await sim.start()
    await sim.wait_connected(1, timeout=10)
    await eventually(lambda: _connected(gateway, SOCKET), what=f"{SOCKET} connected")
    async with sim:
        start = await api.post(
            f"/api/v1/devices/{SOCKET}/ports/1/start",
            json={"mode": "full"},
            headers={"X-Request-Id": "c2-bkv-start"},
        )
        assert start.status_code == 202, start.text
        order_no = start.json()["order_no"]
        await eventually_json(api, f"/api/v1/orders/{order_no}", "status", {"charging"})
        stop = await api.post(
            f"/api/v1/devices/{SOCKET}/ports/1/stop", headers={"X-Request-Id": "c2-bkv-stop"}
        )
        assert stop.status_code == 202, stop.text
        await eventually_json(api, f"/api/v1/orders/{order_no}", "status", {"settled"}, timeout=20)
        await gateway.writer.drained()
        body = (await api.get(f"/api/v1/orders/{order_no}/timeline")).json()
    items = body["items"]
    frames = _assert_explained(body)
    assert all(f["protocol"] == "bkv" for f in frames.values())
    assert any(f["decoded"] and f["decoded"]["protocol"] == "bkv" for f in frames.values())
    created = _one(items, "transition", type="order.created")
    assert created["cause"]["ref"] == "c2-bkv-start"
    # the stop asked for through the API: stopping once its frame went out
    stopping = _one(items, "transition", type="order.stopping")
    stop_frame = frames[stopping["cause"]["frame_id"]]
    assert (stop_frame["direction"], stop_frame["command"]) == ("out", "stop")
    stopped = _one(items, "transition", type="order.stopped")
    assert stopped["cause"]["kind"] == "frame"
    assert _one(items, "settlement")["data"]["stop_reason"] == "server_stop"
    sent = _of(items, "command", type="command.sent")
    assert len(sent) == 2 and all(frames[s["frame_id"]]["direction"] == "out" for s in sent)


async def test_device_timeline_window_and_errors(gateway: Gateway, api: httpx.AsyncClient) -> None:
    order_no = await _ap3000_session(gateway, api)
    order = (await api.get(f"/api/v1/orders/{order_no}/timeline")).json()
    created = dt.datetime.fromisoformat(
        _one(order["items"], "transition", type="order.created")["at"]
    )
    whole = await api.get(f"/api/v1/devices/{PHY}/timeline")
    assert whole.status_code == 200, whole.text
    whole_items = whole.json()["items"]
    assert _of(whole_items, "transition", type="device.online")
    assert _one(whole_items, "settlement")["order_no"] == order_no
    _assert_explained(whole.json())
    # a window that ends before the order was created holds nothing of it
    until = (created - dt.timedelta(microseconds=1)).isoformat()
    early = (await api.get(f"/api/v1/devices/{PHY}/timeline", params={"until": until})).json()
    assert all(i["order_no"] != order_no for i in early["items"])
    assert all(
        dt.datetime.fromisoformat(i["at"]) < created for i in early["items"] if i["kind"] == "frame"
    )
    assert len(early["items"]) < len(whole_items)
    # errors, in the API's shape
    bad_windows: list[tuple[dict[str, Any], str]] = [
        ({"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, "since"),
        ({"since": "2025-01-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, "since"),
        ({"since": "yesterday"}, "since"),
        ({"limit": 0}, "limit"),
    ]
    for params, field in bad_windows:
        bad = await api.get(f"/api/v1/devices/{PHY}/timeline", params=params)
        assert bad.status_code == 422, (params, bad.text)
        assert bad.json()["error"]["field"] == field
    missing = await api.get("/api/v1/devices/04FFFFFF/timeline")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    missing = await api.get(f"/api/v1/orders/{'00' * 16}/timeline")
    assert missing.status_code == 404 and "not found" in missing.json()["error"]["message"]


async def test_a_key_limited_to_devices_sees_only_their_timelines(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    order_no = await _ap3000_session(gateway, api)
    assert gateway.pool is not None
    async with gateway.pool.acquire() as conn:
        _, other = await auth.create_key(
            conn, auth.NewKey("other", scopes=["read"], allowed_device_ids=["04FFFFFF"])
        )
        _, mine = await auth.create_key(
            conn, auth.NewKey("mine", scopes=["read"], allowed_device_ids=[PHY])
        )
    async with api_client(gateway, timeline_api.router, auth_required=True) as client:
        for key, status in ((other, 403), (mine, 200)):
            headers = {"Authorization": f"Bearer {key}"}
            for path in (f"/api/v1/orders/{order_no}/timeline", f"/api/v1/devices/{PHY}/timeline"):
                answer = await client.get(path, headers=headers)
                assert answer.status_code == status, (path, answer.text)


def test_a_masked_frame_is_decoded_with_its_sensitive_fields_hidden() -> None:
    from chargegw.audit import mask_frame
    from chargeproto import ap3000

    swipe = ap3000.CardSwipe(
        phy_id=PHY, msg_id=7, card_id="1234ABCD", card_type=0, port=0, balance_cent=0
    )
    raw = ap3000.encode(swipe)
    stored = mask_frame(swipe, raw)
    assert "**" in stored
    decoded, error = decode_frame(stored, "in", "ap3000")
    assert error is None and decoded is not None
    assert decoded["masked"] and set(decoded["fields"]["card_id"]) == {"*"}
    assert decoded["checksum"] == raw[-2] | raw[-1] << 8
    plain, _ = decode_frame(raw.hex(), "in", "ap3000")
    assert plain is not None and plain["fields"]["card_id"] == "1234ABCD"
    assert decode_frame("zz", "in", "ap3000") == (None, "not hex")
    assert decode_frame(raw.hex()[:-2] + "00", "in", "ap3000")[1]
