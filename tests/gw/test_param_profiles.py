"""Parameter profiles applied by jobs to two simulated AP3000 piles, end to end."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from chargegw.service import Gateway
from chargegw.sim import SimulatedAp3000Pile, Simulator

from .test_params import RUNNING1, client, gateway_settings

__all__ = ["client", "gateway_settings"]  # the fixtures this module uses

A, B = "04000001", "04000002"
LIMITS = {"max_charge_duration_s": 36000, "overload_power_w": 1500.0}


async def _piles(gateway: Gateway, types: dict[str, int]) -> tuple[Simulator, dict[str, Any]]:
    piles = {
        phy: SimulatedAp3000Pile(phy, ports=2, heartbeat_s=180, device_type=t)
        for phy, t in types.items()
    }
    sim = Simulator(
        "127.0.0.1", gateway.server.port, [*piles.values()], accel=120.0, jitter=0, seed=1
    )
    await sim.start()
    await sim.wait_connected(len(piles), timeout=10)
    assert gateway.pool is not None
    for _ in range(200):
        await gateway.writer.drained()
        known = await gateway.pool.fetchval(
            "SELECT count(*) FROM devices WHERE device_id = ANY($1::text[])"
            " AND device_type IS NOT NULL",
            [*piles],
        )
        if known == len(piles) and all(gateway.sessions.link_of(p) is not None for p in piles):
            break
        await asyncio.sleep(0.05)
    return sim, piles


async def _job(client: httpx.AsyncClient, job_id: int, timeout: float = 10.0) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        response = await client.get(f"/api/v1/param-jobs/{job_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        if body["state"] == "done":
            return body
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"job {job_id} never done: {body}")
        await asyncio.sleep(0.05)


async def test_a_profile_applied_to_a_list_is_verified_on_both_piles(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    sim, piles = await _piles(gateway, {A: 0x27, B: 0x27})
    async with sim:
        created = await client.post(
            "/api/v1/param-profiles",
            json={
                "name": "night-1",
                "protocol": "ap3000",
                "groups": {"running1": RUNNING1, "limits": LIMITS},
            },
        )
        assert created.status_code == 201, created.text
        assert created.json()["groups"]["running1"]["unplug_power_w"] == 1.2
        again = await client.post(
            "/api/v1/param-profiles", json={"name": "night-1", "groups": {"limits": LIMITS}}
        )
        assert again.status_code == 409
        assert (await client.get("/api/v1/param-profiles/night-1")).status_code == 200
        listed = (await client.get("/api/v1/param-profiles")).json()["items"]
        assert [p["name"] for p in listed] == ["night-1"]

        response = await client.post(
            "/api/v1/param-profiles/night-1/apply", json={"selector": {"device_ids": [A, B]}}
        )
        assert response.status_code == 202, response.text
        job = response.json()
        assert job["total"] == 2 and job["counts"]["pending"] == 2
        assert {d["device_id"] for d in job["devices"]} == {A, B}
        done = await _job(client, job["job_id"])
        assert done["counts"]["verified"] == 2, done
        for device in done["devices"]:
            assert device["status"] == "verified"
            assert device["groups"] == {
                "running1": {"status": "verified"},
                "limits": {"status": "verified"},
            }
        for pile in piles.values():
            assert pile.running_params_1["float_percent"] == 30
            assert pile.limits["overload_power_w"] == 1500.0
        # the device view is the same path as PUT params
        params = (await client.get(f"/api/v1/devices/{B}/params")).json()["groups"]
        assert params["running1"]["status"] == "verified"
        # a later PUT supersedes the job's group on that device
        put = await client.put(
            f"/api/v1/devices/{A}/params", json={"limits": {"overload_power_w": 1200.0}}
        )
        assert put.status_code == 202, put.text
        later = (await client.get(f"/api/v1/param-jobs/{job['job_id']}")).json()
        states = {d["device_id"]: d for d in later["devices"]}
        assert states[A]["status"] == "superseded"
        assert states[A]["groups"]["limits"] == {"status": "superseded"}
        assert states[B]["status"] == "verified"
        assert gateway.pool is not None
        stored = await gateway.pool.fetch(
            "SELECT device_id, status FROM param_job_devices ORDER BY device_id"
        )
        assert [(r["device_id"], r["status"]) for r in stored] == [
            (A, "superseded"),
            (B, "verified"),
        ]


async def test_bad_profiles_and_selectors_are_422_and_send_nothing(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    sim, piles = await _piles(gateway, {A: 0x27})
    async with sim:
        bad = [
            (
                {"name": "p", "groups": {"running1": {**RUNNING1, "float_percent": 300}}},
                "running1",
                "float_percent",
            ),
            ({"name": "p", "groups": {"running1": {"float_percent": 30}}}, "running1", None),
            ({"name": "p", "groups": {"limits": {**LIMITS, "nope": 1}}}, "limits", "nope"),
            ({"name": "p", "groups": {"firmware": {"x": 1}}}, "firmware", None),
            ({"name": "p", "groups": {}}, None, "groups"),
            ({"name": "p", "protocol": "bkv", "groups": {"limits": LIMITS}}, None, "protocol"),
            ({"name": "no spaces", "groups": {"limits": LIMITS}}, None, "name"),
        ]
        for body, group, field in bad:
            response = await client.post("/api/v1/param-profiles", json=body)
            assert response.status_code == 422, (body, response.text)
            detail = response.json()["detail"]
            assert detail["group"] == group, detail
            if field is not None:
                assert detail["field"] == field, detail
        assert (await client.get("/api/v1/param-profiles/p")).status_code == 404
        created = await client.post(
            "/api/v1/param-profiles", json={"name": "p", "groups": {"limits": LIMITS}}
        )
        assert created.status_code == 201, created.text
        for selector in [
            None,
            {},
            {"device_ids": []},
            {"device_ids": [A, "04009999"]},
            {"device_ids": [A], "all": True},
            {"device_type": "0x27"},
            {"device_type": 0x55},
            {"all": False},
        ]:
            response = await client.post(
                "/api/v1/param-profiles/p/apply", json={"selector": selector}
            )
            assert response.status_code == 422, (selector, response.text)
            assert response.json()["detail"]["field"] == "selector"
        missing = await client.post(
            "/api/v1/param-profiles/nope/apply", json={"selector": {"all": True}}
        )
        assert missing.status_code == 404
        assert (await client.get("/api/v1/param-jobs/999")).status_code == 404
        await asyncio.sleep(0.3)
        assert gateway.pool is not None
        assert await gateway.pool.fetchval("SELECT count(*) FROM commands") == 0
        assert await gateway.pool.fetchval("SELECT count(*) FROM param_jobs") == 0
        assert not piles[A].received(0x85)


async def test_a_selector_by_device_type_and_firmware(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    sim, piles = await _piles(gateway, {A: 0x27, B: 0x28})
    async with sim:
        assert gateway.pool is not None
        firmware = await gateway.pool.fetchval(
            "SELECT firmware FROM devices WHERE device_id = $1", A
        )
        assert firmware
        created = await client.post(
            "/api/v1/param-profiles", json={"name": "limits", "groups": {"limits": LIMITS}}
        )
        assert created.status_code == 201, created.text
        response = await client.post(
            "/api/v1/param-profiles/limits/apply",
            json={"selector": {"device_type": 0x27, "firmware": firmware}},
        )
        assert response.status_code == 202, response.text
        job = response.json()
        assert [d["device_id"] for d in job["devices"]] == [A]
        done = await _job(client, job["job_id"])
        assert done["counts"] == {
            "pending": 0,
            "applying": 0,
            "verified": 1,
            "mismatch": 0,
            "failed": 0,
            "superseded": 0,
        }
        assert done["selector"] == {"device_type": 0x27, "firmware": firmware}
        assert piles[A].limits["overload_power_w"] == 1500.0
        assert not piles[B].received(0x85)
        wrong = await client.post(
            "/api/v1/param-profiles/limits/apply",
            json={"selector": {"device_type": 0x27, "firmware": "0.00"}},
        )
        assert wrong.status_code == 422
        everything = await client.post(
            "/api/v1/param-profiles/limits/apply", json={"selector": {"all": True}}
        )
        assert everything.status_code == 202, everything.text
        done = await _job(client, everything.json()["job_id"])
        assert done["counts"]["verified"] == 2
        assert piles[B].limits["overload_power_w"] == 1500.0
