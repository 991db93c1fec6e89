"""AP3000 parameters end to end: API -> outbox -> simulated pile -> read-back verification."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from chargegw.api import ApiState, create_app
from chargegw.commands_api import make_router
from chargegw.params import GROUPS, compare
from chargegw.params_api import make_params_router
from chargegw.service import Gateway
from chargegw.sim import SimulatedAp3000Pile, Simulator
from chargeproto import ap3000

PHY = "04000001"


@pytest.fixture
def gateway_settings() -> dict[str, Any]:
    return {"ack_timeout_s": 1.0, "command_spacing_s": 0.05}


@pytest.fixture
async def client(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    state = ApiState(
        pool=gateway.pool, metrics=gateway.metrics, readiness=gateway.readiness, auth_required=False
    )
    app = create_app(state, routers=[make_router(gateway), make_params_router(gateway)])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as c:
        yield c


async def _pile(gateway: Gateway) -> tuple[Simulator, SimulatedAp3000Pile]:
    pile = SimulatedAp3000Pile(PHY, ports=2, heartbeat_s=180)
    sim = Simulator("127.0.0.1", gateway.server.port, [pile], accel=120.0, jitter=0, seed=1)
    await sim.start()
    await sim.wait_connected(1, timeout=10)
    assert gateway.pool is not None
    for _ in range(100):
        await gateway.writer.drained()
        known = await gateway.pool.fetchval("SELECT 1 FROM devices WHERE device_id = $1", PHY)
        if gateway.sessions.link_of(PHY) is not None and known:
            break
        await asyncio.sleep(0.05)
    return sim, pile


async def _group(
    client: httpx.AsyncClient, group: str, statuses: set[str], timeout: float = 10.0
) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        response = await client.get(f"/api/v1/devices/{PHY}/params")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()["groups"].get(group, {})
        if body.get("status") in statuses:
            return body
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{group} never in {statuses}: {body}")
        await asyncio.sleep(0.05)


RUNNING1 = {
    "unplug_power_w": 1.24,  # 0.1 W on the wire: held as 1.2
    "unplug_detect_time_s": 20,
    "float_percent": 30,
    "float_detect_time_s": 900,
    "float_time_s": 1800,
    "heartbeat_interval_s": 180,
}


async def test_apply_then_verify_by_read_back(gateway: Gateway, client: httpx.AsyncClient) -> None:
    sim, pile = await _pile(gateway)
    async with sim:
        response = await client.put(
            f"/api/v1/devices/{PHY}/params",
            json={
                "running1": RUNNING1,
                "limits": {"max_charge_duration_s": 36000, "overload_power_w": 1500.0},
            },
        )
        assert response.status_code == 202, response.text
        accepted = response.json()["groups"]
        assert accepted["running1"]["status"] == "pending"
        assert accepted["running1"]["desired"]["unplug_power_w"] == 1.2
        assert accepted["running1"]["read_command_id"] > accepted["running1"]["set_command_id"]
        running1 = await _group(client, "running1", {"verified"})
        assert running1["reported"] == {**RUNNING1, "unplug_power_w": 1.2}
        assert running1["verified_at"] and running1["diff"] is None
        limits = await _group(client, "limits", {"verified"})
        assert limits["desired"] == {"max_charge_duration_s": 36000, "overload_power_w": 1500.0}
        assert limits["reported"]["overload_power_w"] == 1500.0
        # the pile got set then read-back, in that order
        set_at = pile.received(0x83)[0]
        read_at = pile.received(0x90)[0]
        assert isinstance(set_at.message, ap3000.SetRunningParams1)
        assert set_at.message.float_percent == 30
        assert pile.received().index(set_at) < pile.received().index(read_at)
        assert pile.running_params_1["unplug_power_w"] == pytest.approx(1.2)
        assert pile.limits["overload_power_w"] == 1500.0
        # a partial group is completed from what is desired already
        response = await client.put(
            f"/api/v1/devices/{PHY}/params", json={"running1": {"float_percent": 40}}
        )
        assert response.status_code == 202, response.text
        running1 = await _group(client, "running1", {"verified"})
        assert running1["reported"] == {**RUNNING1, "unplug_power_w": 1.2, "float_percent": 40}


async def test_out_of_range_is_422_naming_the_field_and_sends_nothing(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    sim, pile = await _pile(gateway)
    async with sim:
        bad = [
            ({"running1": {**RUNNING1, "float_percent": 300}}, "float_percent"),
            ({"running1": {**RUNNING1, "unplug_power_w": 7000.0}}, "unplug_power_w"),
            ({"running1": {"no_such_field": 1}}, "no_such_field"),
            ({"running1": {"float_percent": 10}}, None),  # nothing to complete it from
            ({"firmware": {"x": 1}}, None),
        ]
        for body, field in bad:
            response = await client.put(f"/api/v1/devices/{PHY}/params", json=body)
            assert response.status_code == 422, response.text
            detail = response.json()["detail"]
            if field is not None:
                assert detail["field"] == field, detail
        # a valid group next to an invalid one: the whole request is refused
        response = await client.put(
            f"/api/v1/devices/{PHY}/params",
            json={"limits": {"overload_power_w": 1500.0}, "running1": {"float_percent": 300}},
        )
        assert response.status_code == 422
        assert (await client.get("/api/v1/nope")).status_code == 404
        missing = await client.put("/api/v1/devices/04009999/params", json={"running1": RUNNING1})
        assert missing.status_code == 404
        await asyncio.sleep(0.3)
        assert gateway.pool is not None
        assert await gateway.pool.fetchval("SELECT count(*) FROM commands") == 0
        assert await gateway.pool.fetchval("SELECT count(*) FROM device_params") == 0
        assert not pile.received(0x83) and not pile.received(0x85)


async def test_a_pile_holding_other_values_shows_mismatch_with_the_diff(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    sim, pile = await _pile(gateway)
    async with sim:
        response = await client.put(f"/api/v1/devices/{PHY}/params", json={"running1": RUNNING1})
        assert response.status_code == 202, response.text
        await _group(client, "running1", {"verified"})
        # someone changes the pile behind the platform's back (a local tool, a reset)
        pile.running_params_1 = {
            **pile.running_params_1,
            "float_percent": 25,
            "unplug_power_w": 1.5,
        }
        read = await client.post(
            f"/api/v1/devices/{PHY}/commands", json={"command": "read_running_params1"}
        )
        assert read.status_code == 202, read.text
        running1 = await _group(client, "running1", {"mismatch"})
        assert running1["diff"] == {
            "float_percent": {"desired": 30, "reported": 25},
            "unplug_power_w": {"desired": 1.2, "reported": 1.5},
        }
        assert running1["reported"]["float_percent"] == 25
        assert running1["verified_at"]  # when it was last verified


async def test_a_refused_set_is_failed(gateway: Gateway, client: httpx.AsyncClient) -> None:
    sim, _ = await _pile(gateway)
    async with sim:
        # the simulated pile refuses a heartbeat interval of 0
        response = await client.put(
            f"/api/v1/devices/{PHY}/params",
            json={"running1": {**RUNNING1, "heartbeat_interval_s": 0}},
        )
        assert response.status_code == 202, response.text
        running1 = await _group(client, "running1", {"failed"})
        assert "set_running_params1" in running1["failure_reason"]
        # the read-back still records what the pile holds
        await asyncio.sleep(0.5)
        body = (await client.get(f"/api/v1/devices/{PHY}/params")).json()["groups"]["running1"]
        assert body["status"] == "failed"


def test_compare_uses_the_wire_resolution() -> None:
    group = GROUPS["limits"]
    assert compare(group, {"overload_power_w": 1500.0}, {"overload_power_w": 1500.04}) == {}
    assert compare(group, {"overload_power_w": 1500.0}, {"overload_power_w": 1500.1}) == {
        "overload_power_w": {"desired": 1500.0, "reported": 1500.1}
    }
    assert (
        compare(
            GROUPS["card"], {"user_card_key": "ffffffffffff"}, {"user_card_key": "FFFFFFFFFFFF"}
        )
        == {}
    )
