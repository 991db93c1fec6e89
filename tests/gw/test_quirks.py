"""Quirk profiles (docs/quirks.md): each shipped profile's capture fed to a gateway over
TCP, with the profile active and disabled; the device API's ``quirks``; the setting's
validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from chargegw.app import Gateway
from chargegw.capture import CaptureFrame, read_capture
from chargegw.config import ConfigError, load_settings
from chargegw.domain.compliance import Kind
from chargegw.quirks import (
    DEFAULT_PROFILES,
    DEVIATION_KINDS,
    QuirkBook,
    QuirkConfigError,
    Switch,
    parse_profiles,
    version_key,
)
from chargeproto import ap3000

from .piles import RawBkvGateway, RawPile
from .quirk_captures import BKV_GATEWAY, PILE, QUIRK_CAPTURES, captures
from .waiting import eventually

pytestmark = pytest.mark.usefixtures("db_dsn")

SOCKET = f"{BKV_GATEWAY}-1"
#: the legacy-heartbeat profile switched on for the firmware of the vendor's pile (126)
LEGACY_ON = [{"name": "ap3000-legacy-heartbeat", "enabled": True, "firmware_min": 100}]


@pytest.fixture
def gateway_settings() -> dict[str, Any]:
    return {"compliance_flush_s": 0.05}


def _device_frames(name: str) -> list[CaptureFrame]:
    capture = read_capture(QUIRK_CAPTURES / name)
    assert not capture.problems
    return [frame for frame in capture.frames if frame.direction == "in"]


async def _feed_pile(gateway: Gateway, name: str) -> RawPile:
    pile = await RawPile(PILE).connect(gateway.server.port)
    for frame in _device_frames(name):
        await pile.send_raw(frame.raw)
    return pile


async def _deviations(gateway: Gateway, device_id: str, kind: str) -> tuple[int, int] | None:
    assert gateway.pool is not None
    row = await gateway.pool.fetchrow(
        "SELECT sum(count) AS count, sum(tolerated) AS tolerated FROM compliance_deviations"
        " WHERE device_id = $1 AND kind = $2",
        device_id,
        kind,
    )
    return None if row["count"] is None else (int(row["count"]), int(row["tolerated"]))


# ---------------------------------------------------------------- the captures


def test_every_shipped_profile_has_its_capture_and_it_is_current() -> None:
    built = captures()
    assert {p.capture for p in DEFAULT_PROFILES} == set(built)
    for name, frames in built.items():
        assert [f.hex for f in _device_frames(name)] == [f.hex for f in frames], name
    assert {p.name for p in DEFAULT_PROFILES} == {
        read_capture(QUIRK_CAPTURES / name).header["quirk_profile"] for name in built
    }


async def test_short_charge_reply_is_tolerated(gateway: Gateway) -> None:
    pile = await _feed_pile(gateway, "ap3000_short_charge_reply.jsonl")
    await pile.expect(ap3000.RegistrationReply)
    for kind in ("short_payload", "long_payload"):
        found = await eventually(
            lambda kind=kind: _deviations(gateway, PILE, kind),
            lambda counts: counts is not None and counts[0] >= 1,
            what=f"the short 0x82 reply's {kind} counted",
        )
        assert found is not None and found[1] == found[0]
    await pile.close()


@pytest.mark.settings(quirk_profiles=[{"name": "ap3000-short-charge-reply", "enabled": False}])
async def test_short_charge_reply_without_its_profile_is_a_plain_deviation(
    gateway: Gateway,
) -> None:
    pile = await _feed_pile(gateway, "ap3000_short_charge_reply.jsonl")
    await pile.expect(ap3000.RegistrationReply)
    found = await eventually(
        lambda: _deviations(gateway, PILE, "short_payload"),
        lambda counts: counts is not None and counts[0] >= 1,
        what="the short 0x82 reply counted",
    )
    assert found == (1, 0)
    await pile.close()


async def test_registration_trailing_bytes_are_tolerated(gateway: Gateway) -> None:
    pile = await _feed_pile(gateway, "ap3000_registration_trailing_bytes.jsonl")
    await pile.expect(ap3000.RegistrationReply)
    found = await eventually(
        lambda: _deviations(gateway, PILE, "long_payload"),
        lambda counts: counts is not None,
        what="the 0x20 trailing bytes counted",
    )
    assert found == (1, 1)
    await pile.close()


# the 0x82 profile tolerates long_payload on 0x82 only: it stays enabled
@pytest.mark.settings(
    quirk_profiles=[{"name": "ap3000-registration-trailing-bytes", "enabled": False}]
)
async def test_registration_trailing_bytes_without_the_profile(gateway: Gateway) -> None:
    pile = await _feed_pile(gateway, "ap3000_registration_trailing_bytes.jsonl")
    await pile.expect(ap3000.RegistrationReply)
    found = await eventually(
        lambda: _deviations(gateway, PILE, "long_payload"),
        lambda counts: counts is not None,
        what="the 0x20 trailing bytes counted",
    )
    assert found == (1, 0)
    await pile.close()


@pytest.mark.settings(quirk_profiles=LEGACY_ON)
async def test_legacy_heartbeat_profile_answers_the_first_0x01(gateway: Gateway) -> None:
    pile = await _feed_pile(gateway, "ap3000_legacy_heartbeat.jsonl")
    # replies go out in the order of the frames: the 0x01's before the 0x22's
    await pile.expect(ap3000.TimeReply)
    assert any(isinstance(m, ap3000.LegacyHeartbeatReply) for m in pile.received)
    await pile.close()


async def test_without_the_legacy_profile_the_first_0x01_waits_for_a_second(
    gateway: Gateway,
) -> None:
    pile = await _feed_pile(gateway, "ap3000_legacy_heartbeat.jsonl")
    await pile.expect(ap3000.TimeReply)
    assert not any(isinstance(m, ap3000.LegacyHeartbeatReply) for m in pile.received)
    await pile.send_raw(_device_frames("ap3000_legacy_heartbeat.jsonl")[0].raw)
    await pile.expect(ap3000.LegacyHeartbeatReply)  # the second 0x01 in a row
    await pile.close()


async def _connect_report_reasons(gateway: Gateway) -> list[str]:
    assert gateway.pool is not None
    rows = await gateway.pool.fetch(
        "SELECT reason FROM device_events WHERE device_id = $1 AND kind = 'report'", SOCKET
    )
    return [row["reason"] for row in rows]


async def _feed_bkv(gateway: Gateway) -> RawBkvGateway:
    peer = await RawBkvGateway().connect(gateway.server.port)
    for frame in _device_frames("bkv_connect_report_0x1013.jsonl"):
        await peer.send_raw(frame.raw)
    return peer


async def test_bkv_connect_report_is_known(gateway: Gateway) -> None:
    peer = await _feed_bkv(gateway)
    reasons = await eventually(
        lambda: _connect_report_reasons(gateway), bool, what="the 0x1013 stored"
    )
    assert reasons == ["connect_report"]
    found = await eventually(
        lambda: _deviations(gateway, SOCKET, "unknown_command"),
        lambda counts: counts is not None,
        what="the 0x1013 counted",
    )
    assert found == (1, 1)
    await peer.close()


@pytest.mark.settings(quirk_profiles=[{"name": "bkv-connect-report-0x1013", "enabled": False}])
async def test_bkv_connect_report_without_the_profile_is_an_unknown_container(
    gateway: Gateway,
) -> None:
    peer = await _feed_bkv(gateway)
    reasons = await eventually(
        lambda: _connect_report_reasons(gateway), bool, what="the 0x1013 stored"
    )
    assert reasons == ["TlvContainer"]
    found = await eventually(
        lambda: _deviations(gateway, SOCKET, "unknown_command"),
        lambda counts: counts is not None,
        what="the 0x1013 counted",
    )
    assert found == (1, 0)
    await peer.close()


# ---------------------------------------------------------------- the device API


@pytest.mark.settings(quirk_profiles=LEGACY_ON)
async def test_the_device_api_shows_the_active_profiles(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    pile = await _feed_pile(gateway, "ap3000_legacy_heartbeat.jsonl")
    await pile.expect(ap3000.TimeReply)
    body = await eventually(
        lambda: api.get(f"/api/v1/devices/{PILE}"),
        lambda response: response.status_code == 200 and response.json()["firmware"],
        what="the pile stored",
    )
    expected = [
        "ap3000-legacy-heartbeat",
        "ap3000-registration-trailing-bytes",
        "ap3000-short-charge-reply",
    ]
    assert body.json()["quirks"] == expected
    await pile.close()
    # offline: computed from the stored type and firmware, the same
    await eventually(
        lambda: api.get(f"/api/v1/devices/{PILE}"),
        lambda response: response.json()["online"] is False,
        what="the pile offline",
    )
    assert gateway.quirks.known(PILE) is None
    assert (await api.get(f"/api/v1/devices/{PILE}")).json()["quirks"] == expected


# ---------------------------------------------------------------- matching and configuration


def test_the_tolerated_kinds_are_the_compliance_kinds() -> None:
    assert {kind.value for kind in Kind} == DEVIATION_KINDS


def test_firmware_ranges_compare_as_versions() -> None:
    assert version_key("9") < version_key("10") < version_key("126")
    assert version_key("cV.1r46") < version_key("cV.1r50") < version_key("cV.2r1")
    book = QuirkBook(
        parse_profiles(
            [
                {
                    "name": "old-gateways",
                    "protocol": "bkv",
                    "device_types": ["gateway"],
                    "firmware_max": "cV.1r46",
                    "switches": ["connect_report_0x1013"],
                    "tolerates": ["clock_drift"],
                }
            ]
        )
    )
    old = book.match("bkv", "gateway", "cV.1r46")
    assert "old-gateways" in old.names and old.tolerates("clock_drift")
    assert "old-gateways" not in book.match("bkv", "gateway", "cV.1r50").names
    assert "old-gateways" not in book.match("bkv", "socket", "cV.1r40").names
    # unknown firmware: only unconditional profiles
    assert "old-gateways" not in book.match("bkv", "gateway", None).names
    assert book.match("bkv", "gateway", None).has(Switch.CONNECT_REPORT_0X1013)


def test_a_tolerance_names_a_command_or_every_command() -> None:
    book = QuirkBook()
    assert book.tolerates(PILE, "short_payload", "0x82")
    assert not book.tolerates(PILE, "short_payload", "0x06")
    assert book.tolerates(PILE, "short_payload")  # the command not given: the kind counts
    assert not book.tolerates(PILE, "checksum_error")
    book.learn(PILE, "ap3000", "0x02", "126")
    book.forget(PILE)
    assert book.known(PILE) is None


@pytest.mark.parametrize(
    ("entries", "problem"),
    [
        (
            [{"name": "ap3000-legacy-heartbeat", "firmware_min": 130, "firmware_max": 120}],
            "quirk_profiles[0] (ap3000-legacy-heartbeat): firmware_min 130 is above "
            "firmware_max 120",
        ),
        (
            [{"name": "mine", "protocol": "ap3000", "switches": ["answer_twice"]}],
            "quirk_profiles[0] (mine): unknown switch 'answer_twice'",
        ),
        (
            [{"name": "mine", "protocol": "ap3000", "switches": ["connect_report_0x1013"]}],
            "quirk_profiles[0] (mine): switch connect_report_0x1013 is for bkv",
        ),
        ([{"name": "mine"}], "quirk_profiles[0] (mine): a new profile needs a protocol"),
        (
            [{"name": "mine", "protocol": "bkv", "tolerates": ["odd_bytes"]}],
            "quirk_profiles[0] (mine): unknown deviation kind 'odd_bytes'",
        ),
        (
            [{"name": "mine", "protocol": "bkv", "device_types": ["pile"]}],
            "quirk_profiles[0] (mine): BKV device type 'pile' is not one of gateway, socket",
        ),
        (
            [{"name": "mine", "protocol": "ap3000", "firmware": 3}],
            "quirk_profiles[0] (mine): unknown key 'firmware'",
        ),
        ([{"name": "Bad Name"}], "quirk_profiles[0]: name must be"),
        ("nope", "quirk_profiles must be a list of profiles"),
    ],
)
def test_bad_profiles_are_refused_with_a_clear_problem(entries: Any, problem: str) -> None:
    with pytest.raises(QuirkConfigError) as caught:
        parse_profiles(entries)
    assert any(line.startswith(problem) for line in caught.value.problems), caught.value


def test_the_setting_names_its_source_and_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "chargegw.yaml"
    path.write_text(
        "quirk_profiles:\n"
        "  - name: ap3000-legacy-heartbeat\n"
        "    enabled: true\n"
        "    firmware_min: 130\n"
        "    firmware_max: 120\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    assert str(caught.value) == (
        f"quirk_profiles ({path}): quirk_profiles[0] (ap3000-legacy-heartbeat): "
        "firmware_min 130 is above firmware_max 120"
    )
    env = {"CHARGEGW_QUIRK_PROFILES": '[{"name": "bkv-connect-report-0x1013", "enabled": false}]'}
    settings = load_settings(env=env)
    names = [p.name for p in QuirkBook.from_config(settings.quirk_profiles).profiles if p.enabled]
    assert "bkv-connect-report-0x1013" not in names
