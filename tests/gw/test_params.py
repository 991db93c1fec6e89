"""AP3000 parameters end to end: API -> outbox -> simulated pile -> read-back verification."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from chargegw.api import params as params_api
from chargegw.app import Gateway
from chargegw.domain.params import GROUPS, compare
from chargeproto import ap3000
from chargesim import SimulatedAp3000Pile, Simulator

from .waiting import api_client, eventually

PHY = "04000001"


@pytest.fixture
def gateway_settings() -> dict[str, Any]:
    return {"ack_timeout_s": 1.0, "command_spacing_s": 0.05, "params_tick_s": 0.1}


@pytest.fixture
async def client(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(gateway, params_api.router) as c:
        yield c


async def _pile(gateway: Gateway) -> tuple[Simulator, SimulatedAp3000Pile]:
    pile = SimulatedAp3000Pile(PHY, ports=2, heartbeat_s=180)
    sim = Simulator("127.0.0.1", gateway.server.port, [pile], accel=120.0, jitter=0, seed=1)
    await sim.start()
    await sim.wait_connected(1, timeout=10)

    async def known() -> bool:
        await gateway.writer.drained()
        assert gateway.pool is not None
        row = await gateway.pool.fetchval("SELECT 1 FROM devices WHERE device_id = $1", PHY)
        return bool(row) and gateway.sessions.link_of(PHY) is not None

    await eventually(known, what=f"{PHY} connected and stored")
    return sim, pile


async def param_group(
    client: httpx.AsyncClient,
    group: str,
    statuses: set[str],
    timeout: float = 10.0,
    device_id: str = PHY,
) -> dict[str, Any]:
    """The parameter group of ``device_id`` once its status is one of ``statuses``."""

    async def shown() -> dict[str, Any]:
        response = await client.get(f"/api/v1/devices/{device_id}/params")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()["groups"].get(group, {})
        return body

    return await eventually(
        shown,
        lambda body: body.get("status") in statuses,
        what=f"{group} of {device_id} in {sorted(statuses)}",
        timeout=timeout,
    )


RUNNING1 = {
    "unplug_power_w": 1.24,  # 0.1 W on the wire: held as 1.2
    "unplug_detect_time_s": 20,
    "float_percent": 30,
    "float_detect_time_s": 900,
    "float_time_s": 1800,
    "heartbeat_interval_s": 180,
}


async def events(gateway: Gateway, device_id: str, kind: str | None = None) -> list[dict[str, Any]]:
    """The parameter events of ``device_id`` (of one kind), oldest first."""
    assert gateway.pool is not None
    rows = await gateway.pool.fetch(
        """SELECT kind, reason, detail FROM device_events
           WHERE device_id = $1 AND kind LIKE 'param\\_%' AND ($2::text IS NULL OR kind = $2)
           ORDER BY id""",
        device_id,
        kind,
    )
    return [{"kind": r["kind"], "reason": r["reason"], **json.loads(r["detail"])} for r in rows]


async def wait_for_event(
    gateway: Gateway, device_id: str, kind: str, count: int = 1, timeout: float = 10.0
) -> list[dict[str, Any]]:
    """The events of ``kind`` once there are ``count`` of them."""
    return await eventually(
        lambda: events(gateway, device_id, kind),
        lambda found: len(found) >= count,
        what=f"{count} x {kind} of {device_id}",
        timeout=timeout,
    )


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
        running1 = await param_group(client, "running1", {"verified"})
        assert running1["reported"] == {**RUNNING1, "unplug_power_w": 1.2}
        assert running1["verified_at"] and running1["diff"] is None
        limits = await param_group(client, "limits", {"verified"})
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
        running1 = await param_group(client, "running1", {"verified"})
        assert running1["reported"] == {**RUNNING1, "unplug_power_w": 1.2, "float_percent": 40}
        # each verification is an event, ready for webhooks
        verified = await wait_for_event(gateway, PHY, "param_verified", 3)
        assert [(e["group"], e["status"]) for e in verified] == [
            ("running1", "verified"),
            ("limits", "verified"),
            ("running1", "verified"),
        ]
        assert verified[0]["reported"]["unplug_power_w"] == 1.2


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
            detail = response.json()["error"]
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
        # refused before a row was written: nothing can ever be sent (a row comes first)
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
        await param_group(client, "running1", {"verified"})
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
        running1 = await param_group(client, "running1", {"mismatch"})
        assert running1["diff"] == {
            "float_percent": {"desired": 30, "reported": 25},
            "unplug_power_w": {"desired": 1.2, "reported": 1.5},
        }
        assert running1["reported"]["float_percent"] == 25
        assert running1["verified_at"]  # when it was last verified
        # values changed behind the platform's back: drift (an operator's read-back is
        # not a reconnect, so nothing is re-applied)
        (drift,) = await wait_for_event(gateway, PHY, "param_drift")
        assert drift["source"] == "read-back" and drift["reapplied"] is False
        assert drift["diff"] == running1["diff"]
        assert len(pile.received(0x83)) == 1

        # a pile that does not take what it acknowledges: mismatch right after the set
        pile.params_ignored = {"float_time_s"}
        response = await client.put(
            f"/api/v1/devices/{PHY}/params", json={"running1": {"float_time_s": 2400}}
        )
        assert response.status_code == 202, response.text
        (mismatch,) = await wait_for_event(gateway, PHY, "param_mismatch")
        # the whole group went out again (float_percent 30 included): only the field
        # the pile ignored differs
        assert mismatch["diff"] == {"float_time_s": {"desired": 2400, "reported": 1800}}
        running1 = await param_group(client, "running1", {"mismatch"})
        assert running1["diff"] == {"float_time_s": {"desired": 2400, "reported": 1800}}


async def test_a_refused_set_is_failed(gateway: Gateway, client: httpx.AsyncClient) -> None:
    sim, _ = await _pile(gateway)
    async with sim:
        # the simulated pile refuses a heartbeat interval of 0
        response = await client.put(
            f"/api/v1/devices/{PHY}/params",
            json={"running1": {**RUNNING1, "heartbeat_interval_s": 0}},
        )
        assert response.status_code == 202, response.text
        running1 = await param_group(client, "running1", {"failed"})
        assert "set_running_params1" in running1["failure_reason"]
        # the read-back still records what the pile holds
        body = await eventually(
            lambda: param_group(client, "running1", {"failed"}),
            lambda group: group["reported"] is not None,
            what="the read-back recorded",
        )
        assert body["reported"]["heartbeat_interval_s"] == 180
        (failed,) = await wait_for_event(gateway, PHY, "param_failed")
        assert failed["group"] == "running1" and failed["refused"] is True
        assert "set_running_params1" in failed["reason"]


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


async def test_groups_without_read_back_are_acknowledged_and_work_mode_is_verified_by_0x20(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    sim, pile = await _pile(gateway)
    async with sim:
        response = await client.put(
            f"/api/v1/devices/{PHY}/params",
            json={
                "mute": {"mute_mode": 1},
                "card_mode": {"tc_card_mode": 3},
                "qr_code": {"main_screen_type": 1, "qr_data": "https://example.com/p/04000001"},
                "work_mode": {"work_mode": 1},
            },
        )
        assert response.status_code == 202, response.text
        accepted = response.json()["groups"]
        assert all(g["read_command_id"] is None for g in accepted.values())
        for group in ("mute", "card_mode", "qr_code"):
            body = await param_group(client, group, {"acknowledged"})
            assert body["acknowledged_at"] and body["verified_at"] is None
            assert body["reported"] is None
        # the pile registers again when its work mode changes (ap3000.md 8.2): that 0x20
        # reports it, so this one group is verified
        work_mode = await param_group(client, "work_mode", {"verified"})
        assert work_mode["reported"] == {"work_mode": 1} and work_mode["verified_at"]
        assert (pile.mute_mode, pile.tc_card_mode, pile.work_mode) == (1, 3, 1)
        assert pile.qr_code == {"main_screen_type": 1, "qr_data": "https://example.com/p/04000001"}
        sent = pile.received(0x8E)[0].message
        assert isinstance(sent, ap3000.SetQrCode) and sent.reserved == "000000"
        assert not pile.received(0x90)  # nothing was read back
        acknowledged = await wait_for_event(gateway, PHY, "param_verified", 4)
        statuses = {(e["group"], e["status"]) for e in acknowledged}
        assert {("mute", "acknowledged"), ("card_mode", "acknowledged")} <= statuses
        assert ("work_mode", "verified") in statuses


async def test_out_of_range_for_groups_without_read_back_is_422(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    sim, pile = await _pile(gateway)
    async with sim:
        bad = [
            ({"mute": {"mute_mode": 2}}, "mute", "mute_mode"),
            ({"work_mode": {"work_mode": 3}}, "work_mode", "work_mode"),
            ({"card_mode": {"tc_card_mode": 2}}, "card_mode", "tc_card_mode"),  # not defined
            ({"card_mode": {"tc_card_mode": 7}}, "card_mode", "tc_card_mode"),
            ({"qr_code": {"main_screen_type": 0, "qr_data": "x" * 72}}, "qr_code", "qr_data"),
            ({"qr_code": {"main_screen_type": 2, "qr_data": "x"}}, "qr_code", "main_screen_type"),
            ({"qr_code": {"main_screen_type": 0, "reserved": "FFFFFF"}}, "qr_code", "reserved"),
            ({"running2": {"qr_light": 2}}, "running2", "qr_light"),
            (
                {"limits": {"max_charge_duration_s": 600, "overload_power_w": 3600.0}},
                "limits",
                "overload_power_w",
            ),
            ({"mute": {"mute_mode": True}}, "mute", "mute_mode"),
        ]
        for body, group, field in bad:
            response = await client.put(f"/api/v1/devices/{PHY}/params", json=body)
            assert response.status_code == 422, (body, response.text)
            detail = response.json()["error"]
            assert (detail["group"], detail["field"]) == (group, field), detail
        # refused before a row was written: nothing can ever be sent (a row comes first)
        assert gateway.pool is not None
        assert await gateway.pool.fetchval("SELECT count(*) FROM commands") == 0
        assert not any(pile.received(c) for c in (0x97, 0x8D, 0x8E, 0x8F, 0x84, 0x85))


async def test_a_pile_reset_behind_the_platforms_back_is_reapplied_after_its_reboot(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    sim, pile = await _pile(gateway)
    async with sim:
        response = await client.put(
            f"/api/v1/devices/{PHY}/params",
            json={
                "running1": RUNNING1,
                "limits": {"max_charge_duration_s": 36000, "overload_power_w": 1500.0},
                "work_mode": {"work_mode": 1},
            },
        )
        assert response.status_code == 202, response.text
        for group in ("running1", "limits", "work_mode"):
            await param_group(client, group, {"verified"})
        sets = {c: len(pile.received(c)) for c in (0x83, 0x85, 0x8D)}
        # the pile reboots with its factory parameters
        pile.factory_reset_on_reboot = True
        pile.reboot()
        drift = await wait_for_event(gateway, PHY, "param_drift", 3)
        assert {e["group"] for e in drift} == {"running1", "limits", "work_mode"}
        assert all(e["reapplied"] and e["source"] == "reconnect" for e in drift)
        by_group = {e["group"]: e for e in drift}
        assert by_group["running1"]["diff"]["float_percent"] == {"desired": 30, "reported": 20}
        assert by_group["work_mode"]["diff"] == {"work_mode": {"desired": 1, "reported": 0}}
        # set again, and verified again by reading back
        await eventually(
            lambda: pile.running_params_1["float_percent"] == 30 and pile.work_mode == 1
        )
        await eventually(lambda: pile.limits["overload_power_w"] == 1500.0)
        for group in ("running1", "limits", "work_mode"):
            await param_group(client, group, {"verified"})
        assert {c: len(pile.received(c)) for c in (0x83, 0x85, 0x8D)} == {
            c: n + 1 for c, n in sets.items()
        }
        # a reconnect without drift reads back and sets nothing
        pile.factory_reset_on_reboot = False
        reads = len(pile.received(0x90))
        pile.drop_connection()
        await eventually(lambda: len(pile.received(0x90)) > reads)
        await asyncio.sleep(0.3)  # proves nothing is set within 0.3 s of the read-back
        assert len(pile.received(0x83)) == sets[0x83] + 1
        assert len(await events(gateway, PHY, "param_drift")) == 3


@pytest.mark.settings(params_reapply_on_drift=False)
async def test_without_reapply_a_drifted_pile_shows_mismatch_and_the_event(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    sim, pile = await _pile(gateway)
    async with sim:
        response = await client.put(f"/api/v1/devices/{PHY}/params", json={"running1": RUNNING1})
        assert response.status_code == 202, response.text
        await param_group(client, "running1", {"verified"})
        pile.factory_reset_on_reboot = True
        pile.reboot()
        (drift,) = await wait_for_event(gateway, PHY, "param_drift")
        assert drift["reapplied"] is False and drift["previous_status"] == "verified"
        running1 = await param_group(client, "running1", {"mismatch"})
        assert running1["diff"]["float_percent"] == {"desired": 30, "reported": 20}
        await asyncio.sleep(0.3)  # proves the drifted group is not set again within 0.3 s
        assert len(pile.received(0x83)) == 1  # not set again
        assert pile.running_params_1["float_percent"] == 20
