"""Firmware upgrades end to end: API -> upgrade engine -> outbox -> simulated piles over TCP."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import pytest

from chargegw.api import firmware as firmware_api
from chargegw.app import Gateway
from chargeproto import ap3000
from chargesim import (
    SimulatedAp3000Host,
    SimulatedAp3000Pile,
    SimulatedBkvGateway,
    SimulatedPile,
    Simulator,
    UpgradeFaults,
    make_ap3000_piles,
)
from chargesim.ap3000 import PortStatus

from .waiting import api_client, eventually

#: the simulated piles of type code 04 report device type 0x27 and version 312
TYPE = 0x27
OLD, NEW = "312", "313"
IMAGE = random.Random(7).randbytes(5 * 1024)


@pytest.fixture
def gateway_settings() -> dict[str, Any]:
    return {
        "ack_timeout_s": 1.0,
        "command_spacing_s": 0.01,
        "firmware_tick_s": 0.1,
        "firmware_reboot_timeout_s": 5.0,
        "firmware_ota_timeout_s": 5.0,
        "outbox_scan_s": 0.5,
    }


@pytest.fixture
async def client(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(gateway, firmware_api.router) as c:
        yield c


def _sim(gateway: Gateway, piles: Sequence[SimulatedPile]) -> Simulator:
    return Simulator(
        "127.0.0.1", gateway.server.port, piles, accel=60.0, jitter=0, seed=1, reconnect_min_s=0.1
    )


async def _known(gateway: Gateway, ids: Sequence[str], *, gateways: bool = False) -> None:
    """Wait until the devices (or gateways) are stored, online, with their type if they
    report one (AP3000)."""
    table, column = ("gateways", "gateway_id") if gateways else ("devices", "device_id")

    async def known() -> int:
        await gateway.writer.drained()
        assert gateway.pool is not None
        count: int = await gateway.pool.fetchval(
            f"SELECT count(*) FROM {table} WHERE {column} = ANY($1::text[]) AND online"
            + ("" if gateways else " AND (device_type IS NOT NULL OR protocol = 'bkv')"),
            list(ids),
        )
        return count

    await eventually(known, lambda n: n == len(ids), what=f"all of {ids} known", timeout=20)


async def _upload(client: httpx.AsyncClient, body: bytes = IMAGE, **params: Any) -> dict[str, Any]:
    query = {"protocol": "ap3000", "family": "0xE0", "device_type": TYPE, "version": NEW, **params}
    response = await client.post(
        "/api/v1/firmware",
        content=body,
        params=query,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 201, response.text
    image: dict[str, Any] = response.json()
    return image


async def _create(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await client.post("/api/v1/upgrade-jobs", json=body)
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


async def _done(client: httpx.AsyncClient, job_id: int, timeout: float = 30.0) -> dict[str, Any]:
    """The upgrade job once it is no longer running."""

    async def job() -> dict[str, Any]:
        response = await client.get(f"/api/v1/upgrade-jobs/{job_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    return await eventually(
        job, lambda j: j["state"] != "running", what=f"job {job_id} over", timeout=timeout
    )


def _indexes(pile: SimulatedPile, command: int) -> list[int]:
    """Packet indexes of the firmware frames ``pile`` received, in order."""
    return [r.message.packet_index for r in pile.received(command)]  # type: ignore[union-attr]


async def test_one_pile_is_upgraded_and_verified_by_its_new_version(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    pile = SimulatedAp3000Pile("04000001", heartbeat_s=180)
    async with _sim(gateway, [pile]):
        await _known(gateway, [pile.phy_id])
        image = await _upload(client)
        assert image["total_packets"] == 27 and image["packet_size"] == 200
        assert image["image_checksum"] == ap3000.image_checksum(IMAGE)
        job = await _create(
            client, firmware_id=image["firmware_id"], selector={"device_ids": [pile.phy_id]}
        )
        done = await _done(client, job["job_id"])
    assert done["counts"]["verified"] == 1, done
    device = done["devices"][0]
    assert device["progress"] == "27/27" and device["reported_version"] == NEW
    assert device["previous_version"] == OLD
    assert _indexes(pile, 0xE0) == list(range(1, 28))
    assert pile.firmware_version == int(NEW) and pile.upgrades == [(0xE0, int(NEW))]
    assert gateway.pool is not None
    kinds = [
        r["kind"]
        for r in await gateway.pool.fetch(
            "SELECT kind FROM device_events WHERE device_id = $1 AND kind LIKE 'upgrade%'"
            " ORDER BY id",
            pile.phy_id,
        )
    ]
    assert kinds == ["upgrade_started", "upgrade_verified"]


def _max_overlap(windows: Sequence[tuple[float, float]]) -> int:
    """The most windows open at one time."""
    edges = sorted([(a, 1) for a, _ in windows] + [(b, -1) for _, b in windows])
    most = open_now = 0
    for _, step in edges:
        open_now += step
        most = max(most, open_now)
    return most


async def _firmware_commands(gateway: Gateway) -> int:
    assert gateway.pool is not None
    count: int = await gateway.pool.fetchval(
        "SELECT count(*) FROM commands WHERE name LIKE 'firmware%'"
    )
    return count


async def test_a_5kb_image_reaches_50_piles_never_more_than_10_at_a_time(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    piles = make_ap3000_piles(50, heartbeat_s=180)
    async with _sim(gateway, piles):
        await _known(gateway, [p.phy_id for p in piles])
        image = await _upload(client)
        job = await _create(
            client,
            firmware_id=image["firmware_id"],
            selector={"device_type": TYPE, "firmware": OLD},
            concurrency=10,
            rate_per_min=6000,
        )
        assert job["total"] == 50 and job["counts"]["queued"] == 50
        done = await _done(client, job["job_id"], timeout=50)
    assert done["state"] == "done" and done["counts"]["verified"] == 50, done["counts"]
    for pile in piles:
        assert isinstance(pile, SimulatedAp3000Pile)
        assert _indexes(pile, 0xE0) == list(range(1, 28)), pile.phy_id
        assert pile.firmware_version == int(NEW)
    # what the piles saw: from the first to the last packet of each transfer
    windows = [(p.received(0xE0)[0].t, p.received(0xE0)[-1].t) for p in piles]
    assert 2 <= _max_overlap(windows) <= 10
    # what the gateway recorded: started .. verified, in the database's clock
    assert gateway.pool is not None
    rows = await gateway.pool.fetch("SELECT started_at, finished_at FROM upgrade_targets")
    spans = [(r["started_at"].timestamp(), r["finished_at"].timestamp()) for r in rows]
    assert _max_overlap(spans) <= 10


async def test_a_pile_that_drops_mid_transfer_resumes_after_the_last_acknowledged_packet(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    pile = SimulatedAp3000Pile("04000001", heartbeat_s=180)
    pile.upgrade_faults = UpgradeFaults(drop_at_packet=10)
    async with _sim(gateway, [pile]):
        await _known(gateway, [pile.phy_id])
        image = await _upload(client)
        job = await _create(
            client, firmware_id=image["firmware_id"], selector={"device_ids": [pile.phy_id]}
        )
        done = await _done(client, job["job_id"])
    assert done["devices"][0]["state"] == "verified", done
    # 1-9 acknowledged; 10 arrived as the connection dropped and is sent again after
    # the reconnect, with everything after it once
    assert _indexes(pile, 0xE0) == [*range(1, 11), *range(10, 28)]
    connections = [r.connection for r in pile.received(0xE0)]
    assert connections[:10] == [1] * 10 and set(connections[10:]) == {2}
    assert pile.upgrades == [(0xE0, int(NEW))]


async def test_a_checksum_error_gets_the_same_packet_again(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    pile = SimulatedAp3000Pile("04000001", heartbeat_s=180)
    # a packet in the middle, and the check packet (image checksum) at the end
    pile.upgrade_faults = UpgradeFaults(checksum_error_at_packet=5)
    async with _sim(gateway, [pile]):
        await _known(gateway, [pile.phy_id])
        image = await _upload(client)
        job = await _create(
            client, firmware_id=image["firmware_id"], selector={"device_ids": [pile.phy_id]}
        )
        await eventually(lambda: len(pile.received(0xE0)) >= 7, interval=0.02)
        pile.upgrade_faults.checksum_error_at_packet = 27
        done = await _done(client, job["job_id"])
    assert done["devices"][0]["state"] == "verified", done
    assert _indexes(pile, 0xE0) == [*range(1, 6), *range(5, 28), 27]
    answers = [
        (r.message.result, r.message.packet_index)  # type: ignore[union-attr]
        for r in pile.sent(0xE0)
    ]
    assert answers.count((2, 5)) == 1 and answers.count((2, 27)) == 1


async def test_an_image_for_another_device_type_is_refused_and_nothing_is_sent(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    piles = [SimulatedAp3000Pile(f"0400000{n}", heartbeat_s=180) for n in (1, 2)]
    async with _sim(gateway, piles):
        await _known(gateway, [p.phy_id for p in piles])
        other = await _upload(client, device_type=0x29, version="211")
        # one device named: 422 and no job
        response = await client.post(
            "/api/v1/upgrade-jobs",
            json={"firmware_id": other["firmware_id"], "selector": {"device_ids": ["04000001"]}},
        )
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["field"] == "selector"
        assert "reports type 0x27, the image is for 0x29" in error["message"]
        # several: each fails with the reason, before a byte is sent
        job = await _create(
            client,
            firmware_id=other["firmware_id"],
            selector={"device_ids": ["04000001", "04000002"]},
        )
        assert job["counts"]["failed"] == 2 and job["state"] == "done"
        assert all("reports type 0x27" in d["failure_reason"] for d in job["devices"])
        await asyncio.sleep(0.5)  # proves no pass of the engine (5 of them) sends anything
    assert await _firmware_commands(gateway) == 0
    assert all(not p.received(0xE0) for p in piles)
    assert gateway.pool is not None
    events = await gateway.pool.fetch(
        "SELECT device_id, reason FROM device_events WHERE kind = 'upgrade_failed'"
    )
    assert {e["device_id"] for e in events} == {"04000001", "04000002"}


async def test_a_pile_that_comes_back_with_the_old_version_fails(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    pile = SimulatedAp3000Pile("04000001", heartbeat_s=180)
    pile.upgrade_faults = UpgradeFaults(keep_version=True)
    async with _sim(gateway, [pile]):
        await _known(gateway, [pile.phy_id])
        image = await _upload(client)
        job = await _create(
            client, firmware_id=image["firmware_id"], selector={"device_ids": [pile.phy_id]}
        )
        done = await _done(client, job["job_id"])
    device = done["devices"][0]
    assert device["state"] == "failed" and device["reported_version"] == OLD, device
    assert device["failure_reason"] == f"rebooted and reports version {OLD}, expected {NEW}"
    assert _indexes(pile, 0xE0) == list(range(1, 28)) and pile.connection_count == 2


async def test_a_device_asking_for_firmware_0x05_restarts_the_transfer_from_packet_1(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    pile = SimulatedAp3000Pile("04000001", heartbeat_s=180)
    pile.upgrade_faults = UpgradeFaults(request_restart_after_packet=8)
    async with _sim(gateway, [pile]):
        await _known(gateway, [pile.phy_id])
        image = await _upload(client)
        job = await _create(
            client, firmware_id=image["firmware_id"], selector={"device_ids": [pile.phy_id]}
        )
        done = await _done(client, job["job_id"])
    device = done["devices"][0]
    assert device["state"] == "verified" and device["restarts"] == 1, device
    assert len(pile.sent(0x05)) == 1
    indexes = _indexes(pile, 0xE0)
    assert indexes[:8] == list(range(1, 9))
    last_start = len(indexes) - 1 - indexes[::-1].index(1)
    assert last_start >= 8 and indexes[last_start:] == list(range(1, 28))


async def test_a_charging_pile_waits_until_idle_unless_the_job_is_forced(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    waiting, forced = (SimulatedAp3000Pile(f"0400000{n}", heartbeat_s=30) for n in (1, 2))
    for pile in (waiting, forced):
        pile.ports[0].status = PortStatus.CHARGING
    async with _sim(gateway, [waiting, forced]):
        await _known(gateway, [waiting.phy_id, forced.phy_id])
        image = await _upload(client)
        job = await _create(
            client, firmware_id=image["firmware_id"], selector={"device_ids": [waiting.phy_id]}
        )
        pushed = await _create(
            client,
            firmware_id=image["firmware_id"],
            selector={"device_ids": [forced.phy_id]},
            force=True,
        )
        assert (await _done(client, pushed["job_id"]))["counts"]["verified"] == 1
        state = (await client.get(f"/api/v1/upgrade-jobs/{job['job_id']}")).json()
        assert state["devices"][0]["state"] == "queued"
        assert state["devices"][0]["waiting"] == "charging"
        assert not waiting.received(0xE0)
        waiting.ports[0].status = PortStatus.IDLE  # reported by the next heartbeat
        done = await _done(client, job["job_id"])
    assert done["devices"][0]["state"] == "verified", done
    assert forced.firmware_version == waiting.firmware_version == int(NEW)


async def test_a_host_is_upgraded_with_0xfa_trigger_then_packets(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    host = SimulatedAp3000Host("09000001", "04000011", host_type=0x03, host_firmware_version=501)
    async with _sim(gateway, [host]):
        await _known(gateway, ["04000011"])
        await _known(gateway, [host.host_id], gateways=True)
        image = await _upload(client, family="0xFA", device_type=0x03, version="502")
        assert image["total_packets"] == 26 and image["target"] == "host"
        job = await _create(
            client, firmware_id=image["firmware_id"], selector={"device_ids": [host.host_id]}
        )
        done = await _done(client, job["job_id"])
    device = done["devices"][0]
    assert device["device_id"] == host.host_id and device["state"] == "verified", done
    assert device["previous_version"] == "501" and device["reported_version"] == "502"
    frames = [r.message for r in host.received(0xFA)]
    trigger = frames[0]
    assert isinstance(trigger, ap3000.HostFirmwareUpgrade)
    assert trigger.to_fields()["upgrade_trigger"] is True
    assert [f.packet_index for f in frames[1:]] == list(range(1, 27))  # type: ignore[union-attr]
    assert all(f.phy_id == host.host_id for f in frames)  # type: ignore[union-attr]
    assert host.host_firmware_version == 502 and host.firmware_version == int(OLD)


async def test_a_legacy_host_asking_again_with_0x15_restarts_its_0xf9_transfer(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    host = SimulatedAp3000Host("09000002", "04000012", host_type=0x01, host_firmware_version=205)
    host.upgrade_faults = UpgradeFaults(request_restart_after_packet=3)
    async with _sim(gateway, [host]):
        await _known(gateway, ["04000012"])
        await _known(gateway, [host.host_id], gateways=True)
        image = await _upload(client, family="0xF9", device_type=0x01, version="206")
        assert image["total_packets"] == 20 and image["packet_size"] == 256
        job = await _create(
            client, firmware_id=image["firmware_id"], selector={"device_ids": [host.host_id]}
        )
        done = await _done(client, job["job_id"])
    assert done["devices"][0]["state"] == "verified", done
    assert done["devices"][0]["restarts"] == 1
    answer = host.received(0x15)
    assert len(answer) == 1 and answer[0].message.result == 0  # type: ignore[union-attr]
    indexes = _indexes(host, 0xF9)
    assert indexes[:3] == [1, 2, 3] and indexes[-20:] == list(range(1, 21))
    assert host.host_firmware_version == 206


async def test_bkv_gateways_upgrade_by_ota_and_are_checked_by_their_heartbeat(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    good = SimulatedBkvGateway("82231214000001", sockets=1, heartbeat_s=60)
    stuck = SimulatedBkvGateway("82231214000002", sockets=1, heartbeat_s=60)
    for gw in (good, stuck):
        gw.ota_files["GV.8r12.OTA"] = "cV.1r47"
    stuck.ota_keep_version = True
    async with _sim(gateway, [good, stuck]):
        await _known(gateway, [f"{good.gateway_id}-1", f"{stuck.gateway_id}-1"])
        response = await client.post(
            "/api/v1/firmware",
            params={
                "protocol": "bkv",
                "family": "ota",
                "version": "cV.1r47",
                "ftp_host": "101.37.145.162",
                "file_name": "GV.8r12.OTA",
            },
        )
        assert response.status_code == 201, response.text
        image = response.json()
        assert image["ftp_port"] == 21 and image["device_type"] == 1 and image["sha256"] is None
        job = await _create(client, firmware_id=image["firmware_id"], selector={"all": True})
        done = await _done(client, job["job_id"])
    states = {d["device_id"]: d for d in done["devices"]}
    assert states[good.gateway_id]["state"] == "verified", done
    assert states[good.gateway_id]["reported_version"] == "cV.1r47"
    assert states[stuck.gateway_id]["state"] == "failed"
    assert "reports version cV.1r46" in states[stuck.gateway_id]["failure_reason"]
    for gw in (good, stuck):
        assert gw.ota_requests == [("101.37.145.162", 21, "GV.8r12.OTA")]


async def test_one_upgrade_per_pile_at_a_time(gateway: Gateway, client: httpx.AsyncClient) -> None:
    piles = [SimulatedAp3000Pile(f"0400000{n}", heartbeat_s=180) for n in (1, 2)]
    piles[0].faults.silent = True  # never answers: its upgrade stays in progress
    async with _sim(gateway, piles):
        await _known(gateway, [p.phy_id for p in piles])
        image = await _upload(client)
        first = await _create(
            client, firmware_id=image["firmware_id"], selector={"device_ids": ["04000001"]}
        )
        again = await client.post(
            "/api/v1/upgrade-jobs",
            json={"firmware_id": image["firmware_id"], "selector": {"device_ids": ["04000001"]}},
        )
        assert again.status_code == 409 and f"job {first['job_id']}" in again.text
        both = await _create(
            client,
            firmware_id=image["firmware_id"],
            selector={"device_ids": ["04000001", "04000002"]},
        )
        states = {d["device_id"]: d for d in both["devices"]}
        assert states["04000001"]["state"] == "failed"
        assert states["04000001"]["failure_reason"] == (
            f"another upgrade is in progress (job {first['job_id']})"
        )
        assert (await _done(client, both["job_id"]))["counts"]["verified"] == 1
        deleted = await client.delete(f"/api/v1/firmware/{image['firmware_id']}")
        assert deleted.status_code == 409
        cancelled = await client.post(f"/api/v1/upgrade-jobs/{first['job_id']}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["devices"][0]["state"] == "cancelled"
        assert cancelled.json()["state"] == "cancelled"
    assert (await client.delete(f"/api/v1/firmware/{image['firmware_id']}")).status_code == 204
    assert (await client.get(f"/api/v1/firmware/{image['firmware_id']}")).status_code == 404
    assert (await client.get("/api/v1/firmware")).json()["items"] == []
    assert gateway.pool is not None
    assert (
        await gateway.pool.fetchval(
            "SELECT count(*) FROM commands WHERE name LIKE 'firmware%' AND status = 'pending'"
        )
        == 0
    )


@pytest.mark.parametrize(
    ("params", "body", "field"),
    [
        ({}, b"", "body"),
        ({"protocol": "ocpp"}, IMAGE, "protocol"),
        ({"family": "0xE5"}, IMAGE, "family"),
        ({"packet_size": 256}, IMAGE, "packet_size"),
        ({"family": "0xF8"}, IMAGE, "family"),  # 0x27 upgrades with 0xE0 (ap3000.md 11.9)
        ({"family": "0xFA"}, IMAGE, "device_type"),  # 0x27 is no host type (11.14)
        ({"device_type": 0x31}, IMAGE, "device_type"),  # not in the table
        ({"device_type": "x"}, IMAGE, "device_type"),
        ({"version": "3.13"}, IMAGE, "version"),
        ({"version": ""}, IMAGE, "version"),
        ({"protocol": "bkv", "family": "0xE0"}, b"", "family"),
        ({"protocol": "bkv", "family": "ota", "device_type": 2}, b"", "device_type"),
        ({"protocol": "bkv", "family": "ota", "device_type": 1}, b"", "ftp_host"),
        (
            {"protocol": "bkv", "family": "ota", "device_type": 1, "ftp_host": "1.2.3.4"},
            b"",
            "file_name",
        ),
    ],
)
async def test_bad_uploads_are_422_with_the_field_named(
    gateway: Gateway,
    client: httpx.AsyncClient,
    params: dict[str, Any],
    body: bytes,
    field: str,
) -> None:
    query = {"protocol": "ap3000", "family": "0xE0", "device_type": TYPE, "version": NEW, **params}
    response = await client.post("/api/v1/firmware", content=body, params=query)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field, response.text
    assert (await client.get("/api/v1/firmware")).json()["items"] == []


async def test_bad_jobs_are_422_with_the_field_named(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    pile = SimulatedAp3000Pile("04000001", heartbeat_s=180)
    async with _sim(gateway, [pile]):
        await _known(gateway, [pile.phy_id])
        image = await _upload(client)
        good = {"firmware_id": image["firmware_id"], "selector": {"all": True}}
        for change, field in [
            ({"firmware_id": 999}, "firmware_id"),
            ({"firmware_id": "1"}, "firmware_id"),
            ({"selector": {"device_ids": []}}, "selector"),
            ({"selector": {"device_ids": ["04999999"]}}, "selector"),
            ({"selector": {"device_type": 0x29}}, "selector"),
            ({"concurrency": 0}, "concurrency"),
            ({"rate_per_min": 0}, "rate_per_min"),
            ({"force": "yes"}, "force"),
            ({"colour": "red"}, "colour"),
        ]:
            response = await client.post("/api/v1/upgrade-jobs", json={**good, **change})
            assert response.status_code == 422, (change, response.text)
            assert response.json()["error"]["field"] == field, (change, response.text)
        assert (await client.get("/api/v1/upgrade-jobs")).json()["items"] == []
    assert await _firmware_commands(gateway) == 0


async def test_a_power_board_0xe1_upgrade_is_verified_by_the_power_board_version(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    with_board, without = (SimulatedAp3000Pile(f"0400000{n}", heartbeat_s=180) for n in (1, 2))
    with_board.power_board_version = 105
    async with _sim(gateway, [with_board, without]):
        await _known(gateway, [with_board.phy_id, without.phy_id])
        image = await _upload(client, family="E1", version="106")
        assert image["family"] == "0xE1" and image["check_packet"] is True
        job = await _create(client, firmware_id=image["firmware_id"], selector={"all": True})
        done = await _done(client, job["job_id"])
    states = {d["device_id"]: d for d in done["devices"]}
    assert states[with_board.phy_id]["state"] == "verified", done
    assert states[with_board.phy_id]["previous_version"] == "105"
    assert states[without.phy_id]["failure_reason"] == (
        "the device reports no power board (power_board_version 0)"
    )
    assert with_board.power_board_version == 106 and with_board.firmware_version == int(OLD)
    assert not without.received(0xE1) and len(with_board.received(0xE1)) == 27


async def test_a_0xe2_upgrade_through_a_host_is_verified_by_its_sub_device_report(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    host = SimulatedAp3000Host("09000003", "04000013", host_type=0x50)
    async with _sim(gateway, [host]):
        await _known(gateway, ["04000013"])
        await _known(gateway, [host.host_id], gateways=True)
        image = await _upload(client, family="0xE2")
        job = await _create(
            client, firmware_id=image["firmware_id"], selector={"device_ids": [host.host_id]}
        )
        done = await _done(client, job["job_id"])
    device = done["devices"][0]
    assert device["state"] == "verified" and device["reported_version"] == NEW, done
    assert _indexes(host, 0xE2) == list(range(1, 28))
    assert host.firmware_version == int(NEW) and len(host.sent(0x35)) == 1


async def test_the_rollout_rate_limits_starts_per_minute(
    gateway: Gateway, client: httpx.AsyncClient
) -> None:
    piles = make_ap3000_piles(3, heartbeat_s=180)
    async with _sim(gateway, piles):
        await _known(gateway, [p.phy_id for p in piles])
        image = await _upload(client)
        job = await _create(
            client,
            firmware_id=image["firmware_id"],
            selector={"all": True},
            concurrency=3,
            rate_per_min=2,
        )
        path = f"/api/v1/upgrade-jobs/{job['job_id']}"
        await eventually(
            lambda: client.get(path), lambda r: r.json()["counts"]["verified"] == 2, timeout=20
        )
        await asyncio.sleep(1.0)  # proves the third waits out the minute (10 passes go on)
        state = (await client.get(f"/api/v1/upgrade-jobs/{job['job_id']}")).json()
        assert state["counts"] == {**state["counts"], "verified": 2, "queued": 1}
        assert sum(1 for p in piles if p.received(0xE0)) == 2
