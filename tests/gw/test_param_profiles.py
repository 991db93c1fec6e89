"""Parameter profiles (versioned, per protocol) applied by paced jobs to simulated
AP3000 piles and BKV sockets, end to end."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from typing import Any

import asyncpg
import httpx
import pytest

from chargegw.app import Gateway
from chargegw.domain import params
from chargesim import SimulatedAp3000Pile, SimulatedBkvGateway, SimulatedPile, Simulator

from .test_params import RUNNING1, client, gateway_settings
from .waiting import eventually, eventually_json

__all__ = ["client", "gateway_settings"]  # the fixtures this module uses

A, B = "04000001", "04000002"
LIMITS = {"max_charge_duration_s": 36000, "overload_power_w": 1500.0}


async def _piles(
    gateway: Gateway, types: dict[str, int], extra: Sequence[SimulatedPile] = ()
) -> tuple[Simulator, dict[str, Any]]:
    piles = {
        phy: SimulatedAp3000Pile(phy, ports=2, heartbeat_s=180, device_type=t)
        for phy, t in types.items()
    }
    sim = Simulator(
        "127.0.0.1",
        gateway.server.port,
        [*piles.values(), *extra],
        accel=120.0,
        jitter=0,
        seed=1,
    )
    await sim.start()
    await sim.wait_connected(len(piles) + len(extra), timeout=10)
    sockets = [
        f"{g.gateway_id}-{n}"
        for g in extra
        if isinstance(g, SimulatedBkvGateway)
        for n in g.sockets
    ]
    devices = [*piles, *sockets]

    async def known() -> bool:
        await gateway.writer.drained()
        assert gateway.pool is not None
        stored = await gateway.pool.fetchval(
            "SELECT count(*) FROM devices WHERE device_id = ANY($1::text[])"
            " AND (device_type IS NOT NULL OR protocol = 'bkv')",
            devices,
        )
        connected = all(gateway.sessions.link_of(d) is not None for d in devices)
        return bool(stored == len(devices)) and connected

    await eventually(known, what=f"{devices} connected and stored")
    return sim, piles


async def _job(client: httpx.AsyncClient, job_id: int, timeout: float = 10.0) -> dict[str, Any]:
    """The parameter job once it is done."""
    return await eventually_json(
        client, f"/api/v1/param-jobs/{job_id}", "state", {"done"}, timeout=timeout
    )


async def _counts(client: httpx.AsyncClient, job_id: int) -> dict[str, int]:
    counts: dict[str, int] = (await client.get(f"/api/v1/param-jobs/{job_id}")).json()["counts"]
    return counts


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
            ({"name": "p", "protocol": "bkv", "groups": {"limits": LIMITS}}, "limits", None),
            ({"name": "p", "protocol": "ocpp", "groups": {"limits": LIMITS}}, None, "protocol"),
            ({"name": "no spaces", "groups": {"limits": LIMITS}}, None, "name"),
            ({"name": "p", "groups": {"limits": LIMITS}, "version": 3}, None, "version"),
        ]
        for body, group, field in bad:
            response = await client.post("/api/v1/param-profiles", json=body)
            assert response.status_code == 422, (body, response.text)
            detail = response.json()["error"]
            assert detail["group"] == group, detail
            if field is not None:
                assert detail["field"] == field, detail
        assert (await client.get("/api/v1/param-profiles/p")).status_code == 404
        created = await client.post(
            "/api/v1/param-profiles", json={"name": "p", "groups": {"limits": LIMITS}}
        )
        assert created.status_code == 201, created.text
        selectors: list[Any] = [
            None,
            {},
            {"device_ids": []},
            {"device_ids": [A, "04009999"]},
            {"device_ids": [A], "all": True},
            {"device_type": "0x27"},
            {"device_type": 0x55},
            {"all": False},
        ]
        for selector in selectors:
            response = await client.post(
                "/api/v1/param-profiles/p/apply", json={"selector": selector}
            )
            assert response.status_code == 422, (selector, response.text)
            assert response.json()["error"]["field"] == "selector"
        paces: list[dict[str, Any]] = [
            {"rate_per_min": 0},
            {"rate_per_min": "60"},
            {"concurrency": 0},
            {"concurrency": True},
            {"force": True},
        ]
        for pace in paces:
            response = await client.post(
                "/api/v1/param-profiles/p/apply", json={"selector": {"all": True}, **pace}
            )
            assert response.status_code == 422, (pace, response.text)
            assert response.json()["error"]["field"] == next(iter(pace)), response.text
        missing = await client.post(
            "/api/v1/param-profiles/nope/apply", json={"selector": {"all": True}}
        )
        assert missing.status_code == 404
        assert (await client.get("/api/v1/param-jobs/999")).status_code == 404
        # refused before a row was written: nothing can ever be sent (a row comes first)
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
            "queued": 0,
            "pending": 0,
            "applying": 0,
            "verified": 1,
            "acknowledged": 0,
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


async def test_a_profile_update_is_a_new_version_and_jobs_keep_theirs(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    sim, piles = await _piles(gateway, {A: 0x27})
    async with sim:
        created = await client.post(
            "/api/v1/param-profiles", json={"name": "p", "groups": {"limits": LIMITS}}
        )
        assert created.status_code == 201, created.text
        assert created.json()["version"] == 1
        first = await client.post(
            "/api/v1/param-profiles/p/apply", json={"selector": {"device_ids": [A]}}
        )
        assert first.status_code == 202, first.text
        first_id = first.json()["job_id"]
        await _job(client, first_id)
        # bad updates change nothing
        for body, status in [
            ({"groups": {"limits": {**LIMITS, "overload_power_w": 9000.0}}}, 422),
            ({"protocol": "bkv", "groups": {"limits": LIMITS}}, 422),
            ({"groups": {}}, 422),
        ]:
            response = await client.put("/api/v1/param-profiles/p", json=body)
            assert response.status_code == status, (body, response.text)
        missing = await client.put("/api/v1/param-profiles/nope", json={"groups": {}})
        assert missing.status_code == 404
        assert (await client.get("/api/v1/param-profiles/p")).json()["version"] == 1

        changed = {**LIMITS, "overload_power_w": 1200.0}
        updated = await client.put(
            "/api/v1/param-profiles/p", json={"groups": {"limits": changed, "running1": RUNNING1}}
        )
        assert updated.status_code == 200, updated.text
        body = updated.json()
        assert body["version"] == 2 and body["groups"]["limits"] == changed
        assert body["updated_at"] >= body["created_at"]
        old = (await client.get("/api/v1/param-profiles/p", params={"version": 1})).json()
        assert old["version"] == 1 and old["groups"] == {"limits": LIMITS}
        assert (await client.get("/api/v1/param-profiles/p?version=7")).status_code == 404
        # the first job still says what it applied
        job = (await client.get(f"/api/v1/param-jobs/{first_id}")).json()
        assert job["profile_version"] == 1 and job["groups"] == {"limits": LIMITS}
        second = await client.post(
            "/api/v1/param-profiles/p/apply", json={"selector": {"device_ids": [A]}}
        )
        assert second.status_code == 202, second.text
        done = await _job(client, second.json()["job_id"])
        assert done["profile_version"] == 2 and done["counts"]["verified"] == 1
        assert piles[A].limits["overload_power_w"] == 1200.0
        assert piles[A].running_params_1["float_percent"] == 30
        job = (await client.get(f"/api/v1/param-jobs/{first_id}")).json()
        assert job["devices"][0]["status"] == "superseded"
        listed = (await client.get("/api/v1/param-jobs")).json()["items"]
        assert [(j["job_id"], j["profile_version"]) for j in listed] == [
            (second.json()["job_id"], 2),
            (first_id, 1),
        ]


async def test_a_bkv_profile_applies_to_bkv_sockets(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    box = SimulatedBkvGateway("82231214000001", sockets=2, heartbeat_s=60)
    sim, _ = await _piles(gateway, {A: 0x27}, extra=[box])
    sockets = ["82231214000001-1", "82231214000001-2"]
    async with sim:
        groups = {
            "socket_params": {"power_limit_w": 600.0, "max_charge_duration_min": 300},
            "voice_window_a": {"buzzer": 0, "voice": 1, "periods": []},
        }
        bad = await client.post(
            "/api/v1/param-profiles",
            json={"name": "b", "protocol": "bkv", "groups": {"socket_params": {"x": 1}}},
        )
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "x"
        created = await client.post(
            "/api/v1/param-profiles", json={"name": "b", "protocol": "bkv", "groups": groups}
        )
        assert created.status_code == 201, created.text
        wrong = await client.post(
            "/api/v1/param-profiles/b/apply", json={"selector": {"device_ids": [A]}}
        )
        assert wrong.status_code == 422 and "not BKV devices" in wrong.text
        response = await client.post(
            "/api/v1/param-profiles/b/apply", json={"selector": {"all": True}}
        )
        assert response.status_code == 202, response.text
        assert [d["device_id"] for d in response.json()["devices"]] == sockets
        done = await _job(client, response.json()["job_id"])
        assert done["protocol"] == "bkv"
        for device in done["devices"]:
            assert device["groups"] == {
                "socket_params": {"status": "verified"},
                "voice_window_a": {"status": "acknowledged"},
            }
            assert device["status"] == "acknowledged"  # not every group could be read back
        assert done["counts"]["acknowledged"] == 2
        for number in (1, 2):
            assert box.sockets[number].params["power_limit_w"] == 600.0
            assert box.sockets[number].voice_windows[0]["voice"] == 1


async def test_a_job_starts_devices_at_its_rate(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    ids = [f"0400000{i}" for i in range(1, 5)]
    sim, piles = await _piles(gateway, dict.fromkeys(ids, 0x27))
    async with sim:
        created = await client.post(
            "/api/v1/param-profiles", json={"name": "p", "groups": {"limits": LIMITS}}
        )
        assert created.status_code == 201, created.text
        response = await client.post(
            "/api/v1/param-profiles/p/apply",
            json={"selector": {"all": True}, "rate_per_min": 2, "concurrency": 10},
        )
        assert response.status_code == 202, response.text
        job = response.json()
        assert (job["rate_per_min"], job["concurrency"]) == (2, 10)
        assert job["counts"]["pending"] == 2 and job["counts"]["queued"] == 2
        job_id = job["job_id"]
        # the first two are verified; the others wait for the next minute
        await eventually(lambda: _counts(client, job_id), lambda counts: counts["verified"] >= 2)
        await asyncio.sleep(0.5)  # proves no third device starts within the minute (5 passes)
        body = (await client.get(f"/api/v1/param-jobs/{job_id}")).json()
        assert body["state"] == "running" and body["counts"]["queued"] == 2
        assert sum(bool(p.received(0x85)) for p in piles.values()) == 2
        # a minute later (moved back in the database) the rest start
        assert gateway.pool is not None
        await gateway.pool.execute(
            """UPDATE param_job_devices SET started_at = started_at - interval '61 s'
               WHERE job_id = $1""",
            job_id,
        )
        done = await _job(client, job_id)
        assert done["counts"]["verified"] == 4
        assert all(p.limits["overload_power_w"] == 1500.0 for p in piles.values())
        pool = gateway.pool
        await eventually(
            lambda: pool.fetchval("SELECT finished_at FROM param_jobs WHERE job_id = $1", job_id),
            what=f"job {job_id} finished_at",
            timeout=2,
        )


async def test_a_job_keeps_to_its_concurrency(gateway: Gateway, client: httpx.AsyncClient) -> None:
    ids = [f"0400000{i}" for i in range(1, 5)]
    sim, piles = await _piles(gateway, dict.fromkeys(ids, 0x27))
    for pile in piles.values():
        pile.faults.reply_delay_s = 0.1  # each device takes a while
    async with sim:
        created = await client.post(
            "/api/v1/param-profiles",
            json={"name": "p", "groups": {"limits": LIMITS, "running1": RUNNING1}},
        )
        assert created.status_code == 201, created.text
        response = await client.post(
            "/api/v1/param-profiles/p/apply",
            json={"selector": {"all": True}, "rate_per_min": 100, "concurrency": 1},
        )
        assert response.status_code == 202, response.text
        job_id = response.json()["job_id"]
        most = 0

        async def sample() -> dict[str, Any]:  # and note the most devices in work at once
            nonlocal most
            body: dict[str, Any] = (await client.get(f"/api/v1/param-jobs/{job_id}")).json()
            most = max(most, body["counts"]["pending"] + body["counts"]["applying"])
            return body

        body = await eventually(sample, lambda b: b["state"] == "done", timeout=20, interval=0.02)
        assert most == 1
        assert body["counts"]["verified"] == 4
        # one after the other: each device's first set came after the previous verification
        assert gateway.pool is not None
        rows = await gateway.pool.fetch(
            """SELECT j.device_id, j.started_at, max(p.verified_at) AS verified_at
               FROM param_job_devices j JOIN device_params p USING (device_id)
               WHERE j.job_id = $1 GROUP BY j.device_id, j.started_at ORDER BY j.started_at""",
            job_id,
        )
        for before, after in itertools.pairwise(rows):
            assert after["started_at"] >= before["verified_at"]


@pytest.mark.settings(ack_timeout_s=30.0)  # the silent piles' commands stay open
async def test_concurrent_passes_start_no_more_than_the_concurrency(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    """Several processes run the same pass against one database: the job row's lock
    (SKIP LOCKED) lets one of them start devices, the others skip the job."""
    ids = [f"0400000{i}" for i in range(1, 6)]
    sim, piles = await _piles(gateway, dict.fromkeys(ids, 0x27))
    for pile in piles.values():
        pile.faults.silent = True  # started devices stay pending
    async with sim:
        created = await client.post(
            "/api/v1/param-profiles", json={"name": "p", "groups": {"limits": LIMITS}}
        )
        assert created.status_code == 201, created.text
        pool = gateway.pool
        assert pool is not None
        job_id = await pool.fetchval(
            """INSERT INTO param_jobs (profile, profile_version, protocol, groups, selector,
                                       rate_per_min, concurrency)
               SELECT name, version, protocol, groups, '{"all": true}', 100, 2
               FROM param_profiles WHERE name = 'p' RETURNING job_id"""
        )
        await pool.execute(
            """INSERT INTO param_job_devices (job_id, device_id)
               SELECT $1, d FROM unnest($2::text[]) AS d""",
            job_id,
            ids,
        )
        extra = await asyncpg.create_pool(gateway.dsn, min_size=4, max_size=8)
        assert extra is not None

        async def one_pass() -> list[str]:
            assert extra is not None
            async with extra.acquire() as conn, conn.transaction():
                started = await params.start_ready(gateway, conn, job_id)
                # holds the lock 50 ms, as a busy process would (the contention under test)
                await asyncio.sleep(0.05)
                return started

        try:
            for _ in range(3):
                results = await asyncio.gather(*(one_pass() for _ in range(8)))
                assert sum(len(r) for r in results) <= 2
        finally:
            await extra.close()
        started = await pool.fetchval(
            "SELECT count(*) FROM param_job_devices WHERE job_id = $1 AND started_at IS NOT NULL",
            job_id,
        )
        assert started == 2
