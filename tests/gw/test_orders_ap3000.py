"""Charging sessions end to end on AP3000: API -> outbox -> real TCP -> simulated pile."""

from __future__ import annotations

import itertools
from typing import Any

import asyncpg
import httpx
import pytest

from chargegw.app import Gateway
from chargegw.domain.outbox import MAX_ATTEMPTS
from chargeproto import ap3000
from chargesim import Ap3000Intervals, Faults, SimulatedAp3000Pile, Simulator

from .metric_values import sample
from .piles import RawPile
from .waiting import eventually, eventually_json

ACCEL = 120.0
PHY = "04000001"


@pytest.fixture
def gateway_settings() -> dict[str, Any]:
    return {"ack_timeout_s": 1.0, "command_spacing_s": 0.5}


AP = {"protocol": "ap3000"}
AP_START = {**AP, "command": "start"}
START_ACKED = {**AP, "outcome": "acked"}


async def _pile(gateway: Gateway, **options: Any) -> tuple[Simulator, SimulatedAp3000Pile]:
    pile = SimulatedAp3000Pile(PHY, ports=2, heartbeat_s=180, **options)
    sim = Simulator("127.0.0.1", gateway.server.port, [pile], accel=ACCEL, jitter=0, seed=1)
    await sim.start()
    await sim.wait_connected(1, timeout=10)
    await eventually(lambda: _registered(gateway), what=f"{PHY} connected and registered")
    return sim, pile


async def _registered(gateway: Gateway) -> bool:
    """The pile is connected here and its device row is written."""
    await gateway.writer.drained()
    assert gateway.pool is not None
    known = await gateway.pool.fetchval("SELECT 1 FROM devices WHERE device_id = $1", PHY)
    return bool(known) and gateway.sessions.link_of(PHY) is not None


async def _offline(gateway: Gateway, sim: Simulator) -> None:
    """Stop ``sim`` and wait until the gateway has seen its pile leave: commands wait in
    the outbox from then on."""
    await sim.stop()
    await eventually(lambda: gateway.sessions.link_of(PHY) is None, what=f"{PHY} gone")


async def test_every_progress_report_is_a_sample_caused_by_its_frame(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    """The first 0x06 of a session checks the order in full; the later ones, the order
    known charging, add the sample alone: each still one sample and one order.progress
    event naming its report, and a settlement ends the shortcut."""
    intervals = Ap3000Intervals(power_heartbeat_s=20.0)
    sim, _ = await _pile(gateway, intervals=intervals)
    async with sim:
        body = (
            await api.post(f"/api/v1/devices/{PHY}/ports/1/start", json={"mode": "full"})
        ).json()
        order_no = body["order_no"]
        await eventually_json(api, f"/api/v1/orders/{order_no}", "status", {"charging"})
        pool = gateway.pool
        assert pool is not None

        async def reported() -> bool:
            count = await pool.fetchval(
                "SELECT count(*) FROM order_samples WHERE order_no = $1", order_no
            )
            return bool(count >= 4)

        await eventually(reported, what="four progress samples")
        assert (PHY, 1) in gateway._progressing
        response = await api.post(f"/api/v1/devices/{PHY}/ports/1/stop")
        assert response.status_code == 202, response.text
        await eventually_json(api, f"/api/v1/orders/{order_no}", "status", {"settled"})
        await gateway.writer.drained()
        samples = await pool.fetch(
            "SELECT id, at FROM order_samples WHERE order_no = $1 ORDER BY id", order_no
        )
        events = await pool.fetch(
            """SELECT e.cause_kind, f.direction, f.command FROM events e
               LEFT JOIN frames f ON f.id = e.frame_id
               WHERE e.type = 'order.progress' AND e.order_no = $1""",
            order_no,
        )
    assert len(events) == len(samples) >= 4
    assert {tuple(e) for e in events} == {("frame", "in", "0x06")}


async def test_start_by_time_charges_reports_progress_and_settles(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    sim, pile = await _pile(gateway)
    async with sim:
        response = await api.post(
            f"/api/v1/devices/{PHY}/ports/1/start", json={"mode": "time", "duration_min": 10}
        )
        assert response.status_code == 202, response.text
        body = response.json()
        order_no, command_id = body["order_no"], body["command_id"]
        assert body["status"] == "pending" and len(order_no) == 32
        command = await eventually_json(api, f"/api/v1/commands/{command_id}", "status", {"acked"})
        assert command["result_code"] == 0 and command["attempts"] == 1
        m = gateway.metrics
        await eventually(lambda: sample(m, "chargegw_start_commands_total", **START_ACKED))
        assert sample(m, "chargegw_commands_sent_total", protocol="ap3000", command="start") == 1
        assert sample(m, "chargegw_command_latency_seconds_count", **AP_START) == 1
        assert sample(m, "chargegw_devices_online", protocol="ap3000") == 1
        order = await eventually_json(api, f"/api/v1/orders/{order_no}", "status", {"settled"})
        assert order["stop_reason"] == "time_limit" and order["stop_reason_code"] == 3
        await eventually(lambda: sample(m, "chargegw_settlement_ingest_seconds_count", **AP))
        assert sample(m, "chargegw_settlements_committed_total", **AP) == 1
        assert sample(m, "chargegw_settlements_waiting") == 0
        assert order["duration_s"] == 600 and not order["device_initiated"]
        assert order["started_at"] and order["ended_at"]
        samples = (await api.get(f"/api/v1/orders/{order_no}/samples")).json()["items"]
        assert samples and samples[-1]["energy_kwh"] >= samples[0]["energy_kwh"]
        # the 0x82 the pile got carries the order number and the limit in seconds
        start = pile.received(0x82)[0].message
        assert isinstance(start, ap3000.ChargeControl)
        assert start.order_id == order_no and start.charge_limit == 600 and start.port == 0


async def test_stop_by_api_and_idempotent_start(gateway: Gateway, api: httpx.AsyncClient) -> None:
    sim, pile = await _pile(gateway)
    async with sim:
        headers = {"Idempotency-Key": "app-request-1"}
        first = await api.post(
            f"/api/v1/devices/{PHY}/ports/2/start", json={"mode": "full"}, headers=headers
        )
        again = await api.post(
            f"/api/v1/devices/{PHY}/ports/2/start", json={"mode": "full"}, headers=headers
        )
        assert first.status_code == again.status_code == 202
        assert first.json()["order_no"] == again.json()["order_no"]
        order_no = first.json()["order_no"]
        await eventually_json(api, f"/api/v1/orders/{order_no}", "status", {"charging"})
        stop = await api.post(f"/api/v1/devices/{PHY}/ports/2/stop")
        assert stop.status_code == 202 and stop.json()["order_no"] == order_no
        order = await eventually_json(api, f"/api/v1/orders/{order_no}", "status", {"settled"})
        assert order["stop_reason"] == "server_stop"
        assert len(pile.received(0x82)) == 2  # one start (not two), one stop


async def test_refusal_fails_the_order_with_the_piles_reason(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    sim, _ = await _pile(gateway, plugged=[False, True])
    async with sim:
        body = (
            await api.post(f"/api/v1/devices/{PHY}/ports/1/start", json={"mode": "full"})
        ).json()
        command = await eventually_json(
            api, f"/api/v1/commands/{body['command_id']}", "status", {"failed"}
        )
        assert command["result_code"] == 1
        assert command["result_text"] == "no charger plugged into the port"
        order = await eventually_json(
            api, f"/api/v1/orders/{body['order_no']}", "status", {"failed"}
        )
        assert order["failure_reason"] == "no charger plugged into the port"
        refused = {**AP, "outcome": "refused"}
        await eventually(
            lambda: sample(gateway.metrics, "chargegw_start_commands_total", **refused)
        )


async def test_a_silent_pile_gets_one_resend_with_the_same_msg_id_then_dead(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    sim, pile = await _pile(gateway, faults=Faults(silent=True))
    async with sim:
        body = (
            await api.post(f"/api/v1/devices/{PHY}/ports/1/start", json={"mode": "full"})
        ).json()
        command = await eventually_json(
            api, f"/api/v1/commands/{body['command_id']}", "status", {"dead"}
        )
        assert command["dead_reason"] == "no answer" and command["attempts"] == MAX_ATTEMPTS
        sent = [r.message for r in pile.received(0x82)]
        assert len(sent) == 2 and sent[0] == sent[1]  # same bytes, same msg id
        order = await eventually_json(
            api, f"/api/v1/orders/{body['order_no']}", "status", {"failed"}
        )
        assert order["failure_reason"] == "no answer"
        m = gateway.metrics
        timeout = {**AP, "outcome": "timeout"}
        await eventually(lambda: sample(m, "chargegw_start_commands_total", **timeout))
        assert sample(m, "chargegw_commands_resent_total", **AP_START) == 1
        assert sample(m, "chargegw_commands_sent_total", **AP_START) == 1
        assert sample(m, "chargegw_command_latency_seconds_count", **AP_START) == 0


async def test_a_pile_that_answers_only_the_resend_is_acked(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    sim, _ = await _pile(gateway, faults=Faults(answer_only_resend=True))
    async with sim:
        body = (
            await api.post(
                f"/api/v1/devices/{PHY}/commands",
                json={"command": "locate", "params": {"locate_duration_s": 5}},
            )
        ).json()
        command = await eventually_json(
            api, f"/api/v1/commands/{body['command_id']}", "status", {"acked"}
        )
        assert command["attempts"] == MAX_ATTEMPTS


@pytest.mark.settings(command_spacing_s=0.5)
async def test_priority_order_and_spacing_as_the_pile_receives_them(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    sim, pile = await _pile(gateway)
    await _offline(gateway, sim)
    names = []
    for request in (
        {"command": "set_running_params3", "params": {"mute_mode": 1}},  # parameter
        {"command": "query"},  # query
    ):
        assert (await api.post(f"/api/v1/devices/{PHY}/commands", json=request)).status_code == 202
        names.append(request["command"])
    start = await api.post(f"/api/v1/devices/{PHY}/ports/1/start", json={"mode": "full"})
    assert start.status_code == 202
    sim2 = Simulator("127.0.0.1", gateway.server.port, [pile], accel=ACCEL, jitter=0, seed=2)
    async with sim2:
        await eventually_json(
            api, f"/api/v1/commands/{start.json()['command_id']}", "status", {"acked"}
        )

        def delivered() -> list[Any]:
            return [r for r in pile.received() if r.command in (0x82, 0x81, 0x97)]

        commands = await eventually(delivered, lambda got: len(got) == 3, timeout=5)
        assert [r.command for r in commands] == [0x82, 0x81, 0x97]  # start, query, parameter
        gaps = [b.t - a.t for a, b in itertools.pairwise(commands)]
        assert all(gap >= 0.49 for gap in gaps), gaps


async def test_bad_requests_get_clear_errors_and_send_nothing(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    sim, pile = await _pile(gateway)
    async with sim:
        cases = [
            ("/api/v1/devices/04999999/ports/1/start", {"mode": "full"}, 404),
            (f"/api/v1/devices/{PHY}/ports/3/start", {"mode": "full"}, 422),
            (f"/api/v1/devices/{PHY}/ports/1/start", {"mode": "time"}, 422),
            (f"/api/v1/devices/{PHY}/ports/1/start", {"mode": "fast"}, 422),
            (f"/api/v1/devices/{PHY}/ports/1/start", {"mode": "full", "order_no": "xyz"}, 422),
            (f"/api/v1/devices/{PHY}/commands", {"command": "explode"}, 422),
            (
                f"/api/v1/devices/{PHY}/commands",
                {"command": "locate", "params": {"locate_duration_s": 999}},
                422,
            ),
            (f"/api/v1/devices/{PHY}/ports/1/stop", None, 409),
        ]
        for path, body, status in cases:
            response = await api.post(path, json=body)
            assert response.status_code == status, (path, body, response.text)
        # refused before a row was written: nothing can ever be sent (a row comes first)
        assert gateway.pool is not None
        assert await gateway.pool.fetchval("SELECT count(*) FROM commands") == 0
        assert pile.received(0x82) == [] and pile.received(0x96) == []


async def test_settlement_resends_change_nothing_and_unknown_orders_become_device_initiated(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    pile = await RawPile("04000077").connect(gateway.server.port)
    settlement = ap3000.Settlement(
        pile.phy_id,
        pile.next_id(),
        duration_s=1800,
        max_power_w=250.0,
        energy_kwh=0.75,
        port=1,
        start_mode=0,
        card_id="7A8D05DD",
        stop_reason=5,
        order_id="AB" * 16,
    )
    for _ in range(3):  # the pile resends until answered; each resend is answered
        await pile.send(settlement)
        await pile.expect(ap3000.SettlementReply)
    order = (await api.get(f"/api/v1/orders/{'AB' * 16}")).json()
    assert order["status"] == "settled" and order["device_initiated"]
    assert order["start_mode"] == "card" and order["port"] == 2
    assert order["stop_reason"] == "unplugged" and order["energy_kwh"] == pytest.approx(0.75)
    assert gateway.pool is not None
    events = await gateway.pool.fetch(
        "SELECT reason FROM device_events WHERE kind = 'settlement' ORDER BY id"
    )
    assert [e["reason"] for e in events] == ["applied", "duplicate", "duplicate"]
    await pile.close()


async def test_start_by_energy_and_the_order_list_pages(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    sim, pile = await _pile(gateway)
    async with sim:
        body = (
            await api.post(
                f"/api/v1/devices/{PHY}/ports/1/start", json={"mode": "energy", "energy_kwh": 1.5}
            )
        ).json()
        await eventually_json(api, f"/api/v1/commands/{body['command_id']}", "status", {"acked"})
        start = pile.received(0x82)[0].message
        assert isinstance(start, ap3000.ChargeControl)
        assert start.rate_mode == 2 and start.charge_limit == 150  # 0.01 kWh on the wire
        stop = await api.post(f"/api/v1/devices/{PHY}/ports/1/stop")
        assert stop.status_code == 202
        await eventually_json(api, f"/api/v1/orders/{body['order_no']}", "status", {"settled"})
    # three more orders (device-initiated settlements) for the pagination
    raw = await RawPile(PHY).connect(gateway.server.port, iccid=None)
    for index in range(3):
        await raw.send(
            ap3000.Settlement(
                PHY,
                raw.next_id(),
                duration_s=60,
                max_power_w=10.0,
                energy_kwh=0.01,
                port=1,
                start_mode=1,
                card_id="00000000",
                stop_reason=1,
                order_id=f"{index:032X}",
            )
        )
        await raw.expect(ap3000.SettlementReply)
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, "device_id": PHY}
        if cursor:
            params["cursor"] = cursor
        page = (await api.get("/api/v1/orders", params=params)).json()
        seen += [o["order_no"] for o in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 4
    bad = await api.get("/api/v1/orders", params={"cursor": "nonsense"})
    assert bad.status_code == 422
    await raw.close()


async def test_a_pending_order_can_be_cancelled_and_a_dead_command_is_an_event(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    sim, _ = await _pile(gateway)
    await _offline(gateway, sim)  # the start waits in the outbox
    body = (await api.post(f"/api/v1/devices/{PHY}/ports/1/start", json={"mode": "full"})).json()
    cancelled = await api.post(f"/api/v1/orders/{body['order_no']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert (await api.get(f"/api/v1/orders/{body['order_no']}")).json()["status"] == "cancelled"
    command = (await api.get(f"/api/v1/commands/{body['command_id']}")).json()
    assert command["status"] == "dead" and command["dead_reason"] == "cancelled"
    again = await api.post(f"/api/v1/orders/{body['order_no']}/cancel")
    assert again.status_code == 409


@pytest.mark.settings(command_expiry_s=0.5)
async def test_a_command_for_an_offline_device_dies_offline_with_an_event(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    sim, _ = await _pile(gateway)
    await _offline(gateway, sim)
    body = (await api.post(f"/api/v1/devices/{PHY}/commands", json={"command": "reboot"})).json()
    command = await eventually_json(
        api, f"/api/v1/commands/{body['command_id']}", "status", {"dead"}
    )
    assert command["dead_reason"] == "offline"
    pool = gateway.pool
    assert pool is not None

    async def dead_event() -> asyncpg.Record | None:
        # put after the command's status commits: the API can say dead a moment before
        await gateway.writer.drained()
        return await pool.fetchrow(
            "SELECT reason, detail FROM device_events WHERE kind = 'command_dead'"
        )

    event = await eventually(dead_event, what="the command_dead event")
    assert event is not None and event["reason"] == "offline"


@pytest.mark.parametrize(
    ("start", "intervals", "unplug", "reason", "code"),
    [
        ({"mode": "full"}, {"full_after_s": 60.0}, False, "full", 0x01),
        ({"mode": "energy", "energy_kwh": 0.01}, {}, False, "energy_limit", 0x04),
        ({"mode": "full"}, {}, True, "unplugged", 0x05),
    ],
    ids=["full", "energy_limit", "unplugged"],
)
async def test_stop_reason_families(
    gateway: Gateway,
    api: httpx.AsyncClient,
    start: dict[str, Any],
    intervals: dict[str, float],
    unplug: bool,
    reason: str,
    code: int,
) -> None:
    sim, pile = await _pile(gateway, intervals=Ap3000Intervals(**intervals), charge_power_w=2000)
    async with sim:
        body = (await api.post(f"/api/v1/devices/{PHY}/ports/1/start", json=start)).json()
        await eventually_json(api, f"/api/v1/orders/{body['order_no']}", "status", {"charging"})
        if unplug:
            pile.unplug(0)
        order = await eventually_json(
            api, f"/api/v1/orders/{body['order_no']}", "status", {"settled"}
        )
        assert (order["stop_reason"], order["stop_reason_code"]) == (reason, code)
        assert order["stop_reason_text"]


class _BrokenMetric:
    """A metric whose value file can no longer be written (a full or wiped multiprocess
    directory): a fault the suite cannot cause for real."""

    def labels(self, *args: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device")


async def test_a_metric_that_fails_costs_no_command(
    gateway: Gateway, api: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in (
        "commands_sent_total",
        "commands_finished_total",
        "command_latency_seconds",
        "start_commands_total",
    ):
        monkeypatch.setattr(gateway.metrics, name, _BrokenMetric())
    sim, _ = await _pile(gateway)
    async with sim:
        response = await api.post(
            f"/api/v1/devices/{PHY}/ports/1/start", json={"mode": "time", "duration_min": 10}
        )
        assert response.status_code == 202, response.text
        body = response.json()
        await eventually_json(api, f"/api/v1/commands/{body['command_id']}", "status", {"acked"})
        await eventually_json(api, f"/api/v1/orders/{body['order_no']}", "status", {"charging"})
