"""BKV parameters end to end: API -> outbox -> simulated gateway (0x1000/0x1011 set,
0x1012 read-back, 0x0015/0x1B voice windows) -> verification, refusals and drift."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from chargegw.app import Gateway
from chargeproto import ABSENT, bkv
from chargesim import SimulatedBkvGateway, Simulator
from chargesim.bkv import DEFAULT_PARAMS

from .test_params import client, events, gateway_settings, param_group, wait_for_event
from .waiting import eventually

__all__ = ["client", "gateway_settings"]  # the fixtures this module uses

GW = "82231214000001"
DEV = f"{GW}-1"
OTHER = f"{GW}-2"
PARAMS = {
    "power_limit_w": 500.04,  # 0.1 W on the wire: held as 500.0
    "max_charge_duration_min": 480,
    "overcurrent_limit_a": 4.0004,  # 0.001 A: held as 4.0
    "full_charge_delay_s": 3600,
}
VOICE: dict[str, Any] = {"buzzer": 1, "voice": 0, "periods": [{"start": "08:00", "end": "22:00"}]}


async def _gateway(gateway: Gateway) -> tuple[Simulator, SimulatedBkvGateway]:
    box = SimulatedBkvGateway(GW, sockets=2, heartbeat_s=60)
    sim = Simulator("127.0.0.1", gateway.server.port, [box], accel=120.0, jitter=0, seed=1)
    await sim.start()
    await sim.wait_connected(1, timeout=10)

    async def known() -> bool:
        await gateway.writer.drained()
        assert gateway.pool is not None
        stored = await gateway.pool.fetchval(
            "SELECT count(*) FROM devices WHERE device_id = ANY($1::text[])", [DEV, OTHER]
        )
        return bool(stored == 2) and gateway.sessions.link_of(DEV) is not None

    await eventually(known, what=f"{DEV} and {OTHER} connected and stored")
    return sim, box


async def test_socket_params_are_set_and_verified_by_0x1012_voice_windows_acknowledged(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    sim, box = await _gateway(gateway)
    async with sim:
        response = await client.put(
            f"/api/v1/devices/{DEV}/params",
            json={"socket_params": PARAMS, "voice_window_a": VOICE},
        )
        assert response.status_code == 202, response.text
        accepted = response.json()["groups"]
        assert accepted["socket_params"]["desired"] == {
            **PARAMS,
            "power_limit_w": 500.0,
            "overcurrent_limit_a": 4.0,
        }
        assert accepted["voice_window_a"]["read_command_id"] is None
        socket_params = await param_group(client, "socket_params", {"verified"}, device_id=DEV)
        assert socket_params["diff"] is None and socket_params["verified_at"]
        # 0x1012 reports every parameter: all are kept, the desired ones compared
        assert set(socket_params["reported"]) == set(DEFAULT_PARAMS)
        assert socket_params["reported"]["power_limit_w"] == 500.0
        assert socket_params["reported"]["no_load_delay_s"] == 120
        voice = await param_group(client, "voice_window_a", {"acknowledged"}, device_id=DEV)
        assert voice["reported"] is None and voice["verified_at"] is None
        assert voice["acknowledged_at"]
        # on the wire: the set carries only the desired parameters, then the read-back
        (sent,) = box.received_messages(bkv.SetParams)
        assert sent.socket == 1 and sent.power_limit_w == 500.0
        assert sent.no_load_delay_s is ABSENT
        assert len(box.received_messages(bkv.QueryParams)) == 1
        (window,) = box.received_messages(bkv.VoiceWindow)
        assert (window.socket, window.port, window.buzzer) == (1, 0, 1)
        assert box.sockets[1].params["max_charge_duration_min"] == 480
        assert box.sockets[1].voice_windows[0] == VOICE
        assert box.sockets[2].params == dict(DEFAULT_PARAMS)  # the other socket untouched
        # a later request adds to what is desired
        response = await client.put(
            f"/api/v1/devices/{DEV}/params", json={"socket_params": {"no_load_delay_s": 60}}
        )
        assert response.status_code == 202, response.text
        assert response.json()["groups"]["socket_params"]["desired"]["power_limit_w"] == 500.0
        await eventually(lambda: box.sockets[1].params["no_load_delay_s"] == 60)
        socket_params = await param_group(client, "socket_params", {"verified"}, device_id=DEV)
        assert socket_params["desired"]["no_load_delay_s"] == 60
        verified = await wait_for_event(gateway, DEV, "param_verified", 3)
        assert [(e["group"], e["status"]) for e in verified][-1] == ("socket_params", "verified")
        assert ("voice_window_a", "acknowledged") in {(e["group"], e["status"]) for e in verified}


async def test_out_of_range_is_422_and_nothing_is_sent(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    sim, box = await _gateway(gateway)
    async with sim:
        box.records.clear()
        bad: list[tuple[dict[str, Any], str, str | None]] = [
            ({"socket_params": {"power_limit_w": 7000.0}}, "socket_params", "power_limit_w"),
            ({"socket_params": {"power_limit_w": -1.0}}, "socket_params", "power_limit_w"),
            (
                {"socket_params": {"trickle_threshold_pct": 101}},
                "socket_params",
                "trickle_threshold_pct",
            ),
            (
                {"socket_params": {"full_charge_delay_s": 70000}},
                "socket_params",
                "full_charge_delay_s",
            ),
            (
                {"socket_params": {"full_charge_delay_s": 7.5}},
                "socket_params",
                "full_charge_delay_s",
            ),
            ({"socket_params": {"high_temperature_c": 256}}, "socket_params", "high_temperature_c"),
            (
                {"socket_params": {"overcurrent_limit_a": 70.0}},
                "socket_params",
                "overcurrent_limit_a",
            ),
            ({"socket_params": {"tag_98": 1}}, "socket_params", "tag_98"),
            ({"socket_params": {}}, "socket_params", None),
            ({"voice_window_a": {**VOICE, "buzzer": 2}}, "voice_window_a", "buzzer"),
            (
                {"voice_window_b": {**VOICE, "periods": [{"start": "08:00", "end": "24:00"}]}},
                "voice_window_b",
                "periods",
            ),
            (
                {"voice_window_a": {**VOICE, "periods": VOICE["periods"] * 3}},
                "voice_window_a",
                "periods",
            ),
            ({"voice_window_a": {"buzzer": 1}}, "voice_window_a", "voice"),  # incomplete
            ({"voice_window_a": {**VOICE, "port": 1}}, "voice_window_a", "port"),
            ({"running1": {"float_percent": 30}}, "running1", None),  # an AP3000 group
        ]
        for body, group, field in bad:
            response = await client.put(f"/api/v1/devices/{DEV}/params", json=body)
            assert response.status_code == 422, (body, response.text)
            detail = response.json()["error"]
            assert (detail["group"], detail["field"]) == (group, field), detail
        # one bad group refuses the whole request
        response = await client.put(
            f"/api/v1/devices/{DEV}/params",
            json={"voice_window_a": VOICE, "socket_params": {"power_limit_w": 7000.0}},
        )
        assert response.status_code == 422
        # refused before a row was written: nothing can ever be sent (a row comes first)
        assert gateway.pool is not None
        assert await gateway.pool.fetchval("SELECT count(*) FROM commands") == 0
        assert await gateway.pool.fetchval("SELECT count(*) FROM device_params") == 0
        assert not box.received_messages(bkv.SetParams)
        assert not box.received_messages(bkv.QueryParams)
        assert not box.received_messages(bkv.VoiceWindow)
        assert box.sockets[1].params == dict(DEFAULT_PARAMS)


async def test_a_socket_that_does_not_keep_a_value_is_mismatch_with_the_diff(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    sim, box = await _gateway(gateway)
    async with sim:
        box.params_ignored = {"power_limit_w"}  # acknowledged, not stored
        response = await client.put(f"/api/v1/devices/{DEV}/params", json={"socket_params": PARAMS})
        assert response.status_code == 202, response.text
        body = await param_group(client, "socket_params", {"mismatch"}, device_id=DEV)
        assert body["diff"] == {"power_limit_w": {"desired": 500.0, "reported": 700.0}}
        (mismatch,) = await wait_for_event(gateway, DEV, "param_mismatch")
        assert mismatch["diff"] == body["diff"]


async def test_a_socket_refusing_the_set_fails_the_group(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    sim, box = await _gateway(gateway)
    async with sim:
        del box.sockets[1]  # the gateway no longer knows socket 1: result 0
        response = await client.put(f"/api/v1/devices/{DEV}/params", json={"socket_params": PARAMS})
        assert response.status_code == 202, response.text
        body = await param_group(client, "socket_params", {"failed"}, device_id=DEV)
        assert "set_params" in body["failure_reason"]
        (failed,) = await wait_for_event(gateway, DEV, "param_failed")
        assert failed["refused"] is True


async def test_drift_after_a_reboot_is_read_back_and_reapplied(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    sim, box = await _gateway(gateway)
    async with sim:
        response = await client.put(
            f"/api/v1/devices/{DEV}/params",
            json={"socket_params": PARAMS, "voice_window_b": VOICE},
        )
        assert response.status_code == 202, response.text
        await param_group(client, "socket_params", {"verified"}, device_id=DEV)
        await param_group(client, "voice_window_b", {"acknowledged"}, device_id=DEV)
        box.factory_reset_on_reboot = True
        box.reboot()
        (drift,) = await wait_for_event(gateway, DEV, "param_drift")
        assert drift["group"] == "socket_params" and drift["reapplied"] is True
        assert drift["diff"]["power_limit_w"] == {"desired": 500.0, "reported": 700.0}
        assert drift["diff"]["max_charge_duration_min"] == {"desired": 480, "reported": 600}
        await eventually(lambda: box.sockets[1].params["power_limit_w"] == 500.0)
        await eventually(lambda: len(box.received_messages(bkv.SetParams)) == 2)
        body = await param_group(client, "socket_params", {"verified"}, device_id=DEV)
        assert body["checked_at"]
        # the other socket has nothing desired: not read back
        assert {m.socket for m in box.received_messages(bkv.QueryParams)} == {1}
        # without a read-back the voice window cannot be checked: still acknowledged
        voice = await param_group(client, "voice_window_b", {"acknowledged"}, device_id=DEV)
        assert voice["checked_at"] is None
        assert box.sockets[1].voice_windows == {}
        assert len(await events(gateway, DEV, "param_drift")) == 1


@pytest.mark.settings(params_reapply_on_drift=False)
async def test_without_reapply_drift_is_a_mismatch_with_its_event(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    sim, box = await _gateway(gateway)
    async with sim:
        response = await client.put(f"/api/v1/devices/{DEV}/params", json={"socket_params": PARAMS})
        assert response.status_code == 202, response.text
        await param_group(client, "socket_params", {"verified"}, device_id=DEV)
        box.factory_reset_on_reboot = True
        box.reboot()
        (drift,) = await wait_for_event(gateway, DEV, "param_drift")
        assert drift["reapplied"] is False and drift["source"] == "reconnect"
        body = await param_group(client, "socket_params", {"mismatch"}, device_id=DEV)
        assert body["diff"]["power_limit_w"] == {"desired": 500.0, "reported": 700.0}
        await asyncio.sleep(0.3)  # proves the drifted group is not set again within 0.3 s
        assert len(box.received_messages(bkv.SetParams)) == 1
        assert box.sockets[1].params["power_limit_w"] == 700.0
