"""Protocol compliance per firmware: deviations counted per device and firmware, the
score, the API, the CLI, and counts that survive a restart (docs/compliance.md)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from click.testing import CliRunner, Result

from chargegw.api import compliance as compliance_api
from chargegw.app import Gateway
from chargegw.cli import main
from chargegw.domain.compliance import score
from chargeproto import ap3000
from chargesim import Faults, SimulatedAp3000Pile
from chargesim.runner import Simulator

from .conftest import settings_for
from .metric_values import sample
from .piles import RawPile
from .waiting import api_client, eventually

CLEAN = "04CEAA41"
LEGACY = "04CEAA42"
RAW = "04CEAA43"

#: a pile counts a missing 0x21 one heartbeat period (0.3 s) after registering; counts
#: reach the database every 0.1 s
FAST = {
    "ap3000_heartbeat_s": 0.3,
    "missed_heartbeats": 100,
    "compliance_missing_heartbeat_periods": 1,
    "compliance_flush_s": 0.1,
}


@pytest.fixture
def gateway_settings() -> dict[str, Any]:
    return FAST


async def deviations(gw: Gateway, device_id: str) -> dict[str, int]:
    assert gw.pool is not None
    rows = await gw.pool.fetch(
        "SELECT kind, count FROM compliance_deviations WHERE device_id = $1", device_id
    )
    return {r["kind"]: r["count"] for r in rows}


async def frames(gw: Gateway, device_id: str) -> int:
    assert gw.pool is not None
    value = await gw.pool.fetchval(
        "SELECT coalesce(sum(frames), 0) FROM compliance_frames WHERE device_id = $1", device_id
    )
    return int(value)


async def cli(*args: str) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, main, list(args))


def simulator(gateway: Gateway, *piles: Any) -> Simulator:
    return Simulator("127.0.0.1", gateway.server.port, list(piles), accel=1, jitter=0, seed=1)


async def test_firmware_without_0x21_and_short_payloads_scores_below_a_clean_one(
    gateway: Gateway,
) -> None:
    clean = SimulatedAp3000Pile(CLEAN, ports=2, firmware_version=312, heartbeat_s=0.2)
    legacy = SimulatedAp3000Pile(
        LEGACY,
        ports=2,
        firmware_version=205,
        heartbeat_s=0.2,
        faults=Faults(omit_heartbeat=True, short_payloads=True),
    )
    async with simulator(gateway, clean, legacy):
        found = await eventually(
            lambda: deviations(gateway, LEGACY),
            lambda d: d.get("missing_heartbeat") == 1 and d.get("short_payload", 0) >= 1,
            what="the legacy pile's deviations counted",
        )
        assert set(found) == {"missing_heartbeat", "short_payload"}
        await eventually(lambda: frames(gateway, CLEAN), lambda n: n >= 5, what="clean frames")
    assert await deviations(gateway, CLEAN) == {}
    assert (
        sample(
            gateway.metrics,
            "chargegw_protocol_deviations_total",
            protocol="ap3000",
            kind="missing_heartbeat",
        )
        == 1
    )

    async with api_client(gateway, compliance_api.router) as api:
        response = await api.get("/api/v1/compliance", params={"protocol": "ap3000"})
        assert response.status_code == 200, response.text
        items = {item["firmware"]: item for item in response.json()["items"]}
        assert items["312"]["score"] == 100.0 and items["312"]["top"] == []
        legacy_fw = items["205"]
        assert legacy_fw["device_type"] == "0x27" and legacy_fw["devices"] == 1
        assert legacy_fw["score"] < items["312"]["score"]
        top = {d["kind"]: d for d in legacy_fw["top"]}
        assert top["missing_heartbeat"]["weight"] == 10
        example = top["short_payload"]["examples"][0]
        assert example["command"] == "0x20" and example["hex"].startswith("444e59")
        assert example["detail"] == "Registration without work_mode, power_board_version"
        assert isinstance(example["frame_id"], int)
        # the frame named is the audit frame
        assert gateway.pool is not None
        await gateway.writer.drained()
        row = await gateway.pool.fetchrow(
            "SELECT command, hex FROM frames WHERE id = $1", example["frame_id"]
        )
        assert row is not None and row["command"] == "0x20" and row["hex"] == example["hex"]

        one = await api.get(f"/api/v1/compliance/devices/{LEGACY}")
        assert one.status_code == 200, one.text
        (entry,) = one.json()["firmwares"]
        assert entry["firmware"] == "205" and entry["devices"] == 1
        filtered = await api.get("/api/v1/compliance", params={"firmware": "205"})
        assert [i["firmware"] for i in filtered.json()["items"]] == ["205"]
        missing = await api.get("/api/v1/compliance/devices/NOPE")
        assert missing.status_code == 404
        bad = await api.get("/api/v1/compliance", params={"top": 0})
        assert bad.status_code == 422


async def test_bad_checksums_and_unknown_commands_count_under_the_connections_pile(
    gateway: Gateway,
) -> None:
    pile = await RawPile(RAW).connect(gateway.server.port)
    bad = bytearray(ap3000.encode(ap3000.TimeRequest(RAW, 7)))
    bad[-1] ^= 0xFF  # the checksum
    await pile.send_raw(bytes(bad))  # before the pile is known: held for the connection
    await pile.register()
    await pile.expect(ap3000.RegistrationReply)
    await pile.heartbeat()
    await pile.send(ap3000.UnknownMessage(RAW, pile.next_id(), 0xEE, "0102"))
    await pile.send_raw(bytes(bad))
    found = await eventually(
        lambda: deviations(gateway, RAW),
        lambda d: d.get("checksum_error") == 2 and d.get("unknown_command") == 1,
        what="checksum errors and the unknown command counted",
    )
    assert set(found) == {"checksum_error", "unknown_command"}
    assert await frames(gateway, RAW) == 5  # two bad, 0x20, 0x21, 0xEE
    assert gateway.pool is not None
    examples = await gateway.pool.fetchval(
        "SELECT examples FROM compliance_deviations WHERE device_id = $1 AND kind = $2",
        RAW,
        "checksum_error",
    )
    assert json.loads(examples)[0]["hex"] == bytes(bad).hex()
    assert json.loads(examples)[0]["detail"].startswith("checksum")
    await pile.close()


async def test_counts_survive_a_restart_and_the_cli_prints_them(
    gateway: Gateway, db_dsn: str
) -> None:
    pile = await RawPile(RAW).connect(gateway.server.port)
    await pile.register()
    await pile.expect(ap3000.RegistrationReply)
    await pile.heartbeat()
    await pile.send(ap3000.UnknownMessage(RAW, pile.next_id(), 0xEE, ""))
    await pile.close()
    await gateway.stop()  # writes what the last flush did not
    assert (await _report(db_dsn))["unknown_command"] == 1

    again = Gateway(settings_for(db_dsn, **FAST))
    await again.start(http=False)
    try:
        pile = await RawPile(RAW).connect(again.server.port)
        await pile.register()
        await pile.expect(ap3000.RegistrationReply)
        await pile.heartbeat()
        await pile.send(ap3000.UnknownMessage(RAW, pile.next_id(), 0xEE, ""))
        await eventually(
            lambda: deviations(again, RAW),
            lambda d: d.get("unknown_command") == 2,
            what="the count added to the stored one",
        )
        await pile.close()
    finally:
        await again.stop()

    table = await cli("compliance", "report", "--dsn", db_dsn)
    assert table.exit_code == 0, table.output
    assert "FIRMWARE" in table.output and "126" in table.output
    assert "unknown_command" in table.output
    as_json = await cli("compliance", "report", "--dsn", db_dsn, "--json", "--protocol", "ap3000")
    assert as_json.exit_code == 0, as_json.output
    (item,) = json.loads(as_json.output)["items"]
    assert item["firmware"] == "126" and item["frames"] == 6
    assert item["top"][0]["kind"] == "unknown_command" and item["top"][0]["count"] == 2
    assert item["score"] == score(6, 2)
    refused = await cli("compliance", "report", "--dsn", db_dsn, "--protocol", "ocpp")
    assert refused.exit_code == 2 and "ocpp" in refused.output


async def _report(dsn: str) -> dict[str, int]:
    result = await cli("compliance", "report", "--dsn", dsn, "--json")
    assert result.exit_code == 0, result.output
    (item,) = json.loads(result.output)["items"]
    return {d["kind"]: d["count"] for d in item["top"]}


def test_the_score_formula() -> None:
    assert score(0, 0) == 100.0
    assert score(1000, 5) == 95.0
    assert score(10, 10) == 0.0  # floored
    assert score(2000, 3) == 98.5


async def test_errors_on_a_connection_no_device_spoke_on_count_under_unknown(
    gateway: Gateway,
) -> None:
    pile = await RawPile(RAW).connect(gateway.server.port, iccid=None)
    bad = bytearray(ap3000.encode(ap3000.TimeRequest(RAW, 1)))
    bad[-1] ^= 0xFF
    await pile.send_raw(bytes(bad))
    await eventually(lambda: _decode_errors(gateway) >= 1, what="the bad frame seen")
    await pile.close()
    found = await eventually(
        lambda: deviations(gateway, "unknown"),
        lambda d: d.get("checksum_error") == 1,
        what="the error counted under the device unknown",
    )
    assert found == {"checksum_error": 1}
    assert await deviations(gateway, RAW) == {}


async def test_a_deviation_a_quirk_profile_expects_is_counted_as_tolerated(
    gateway: Gateway,
) -> None:
    gateway.compliance.tolerates = lambda device_id, kind, command: kind == "short_payload"
    pile = await RawPile(RAW).connect(gateway.server.port)
    await pile.send(
        ap3000.Registration(RAW, 1, firmware_version=9, port_count=2, virtual_id=0, device_type=3)
    )
    await pile.expect(ap3000.RegistrationReply)
    assert gateway.pool is not None
    pool = gateway.pool
    row = await eventually(
        lambda: pool.fetchrow(
            "SELECT count, tolerated, examples FROM compliance_deviations WHERE device_id = $1",
            RAW,
        ),
        what="the short registration counted",
    )
    assert (row["count"], row["tolerated"]) == (1, 1)
    assert json.loads(row["examples"])[0]["tolerated"] is True
    await pile.close()


async def test_http_contract(gateway: Gateway) -> None:
    async with api_client(gateway, compliance_api.router) as api:
        empty = await api.get("/api/v1/compliance")
        assert empty.status_code == 200 and empty.json() == {"items": []}
        too_long = await api.get("/api/v1/compliance", params={"firmware": "x" * 65})
        assert too_long.status_code == 422


def _decode_errors(gw: Gateway) -> float:
    (family,) = gw.metrics.decode_errors_total.collect()
    return sum(s.value for s in family.samples if s.name.endswith("_total"))
