"""AP3000 helpers: physical ids, order numbers, verification codes, firmware
transfer, and the encoder's errors."""

from __future__ import annotations

import datetime
import struct
import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import chargeproto
from chargeproto import ABSENT, ap3000

# --- physical ids ----------------------------------------------------------------------


def test_physical_id_all_forms() -> None:
    pid = ap3000.PhysicalId.from_wire(bytes.fromhex("40AACE04"))
    assert pid.value == 0x04CEAA40
    assert pid.type_code == 4
    assert pid.number == 13544000
    assert pid.qr == "40aace04"
    assert pid.canonical == str(pid) == "04CEAA40"
    assert pid.wire == bytes.fromhex("40aace04")
    assert pid.fields() == {
        "phy_id": "04CEAA40",
        "phy_id_type": 4,
        "phy_id_number": 13544000,
        "phy_id_qr": "40aace04",
    }
    assert ap3000.PhysicalId.parse("04CEAA40") == pid
    assert ap3000.PhysicalId.parse("04ceaa40") == pid
    assert ap3000.PhysicalId.from_qr("40aace04") == pid
    assert ap3000.PhysicalId.from_sticker(4, 13544000) == pid
    assert pid.type_text == "dual-port socket"


@given(value=st.integers(0, 0xFFFFFFFF))
@settings(max_examples=100)
def test_physical_id_round_trips(value: int) -> None:
    pid = ap3000.PhysicalId(value)
    assert ap3000.PhysicalId.parse(pid.canonical) == pid
    assert ap3000.PhysicalId.from_qr(pid.qr) == pid
    assert ap3000.PhysicalId.from_wire(pid.wire) == pid
    assert ap3000.PhysicalId.from_sticker(pid.type_code, pid.number) == pid


@pytest.mark.parametrize("text", ["04CEAA4", "04CEAA400", "04CEAA4G", "", " 04CEAA40", "0x4CEAA4"])
def test_physical_id_bad_text(text: str) -> None:
    with pytest.raises(chargeproto.HexSyntaxError):
        ap3000.PhysicalId.parse(text)
    with pytest.raises(chargeproto.HexSyntaxError):
        ap3000.PhysicalId.from_qr(text)


@pytest.mark.parametrize(
    "build",
    [
        lambda: ap3000.PhysicalId(-1),
        lambda: ap3000.PhysicalId(1 << 32),
        lambda: ap3000.PhysicalId.from_wire(b"\x01\x02\x03"),
        lambda: ap3000.PhysicalId.from_sticker(256, 1),
        lambda: ap3000.PhysicalId.from_sticker(4, 1 << 24),
        lambda: ap3000.PhysicalId.from_sticker(-1, 1),
    ],
)
def test_physical_id_bad_values(build: Any) -> None:
    with pytest.raises(chargeproto.EncodeError) as info:
        build()
    assert info.value.field is not None


# --- order numbers -----------------------------------------------------------------------

ORDER = "20190901180000130030380102030405"


def test_online_order_is_opaque() -> None:
    parsed = ap3000.parse_order_id(ORDER.lower(), 1)
    assert parsed.format == "online"
    assert parsed.order_id == ORDER
    assert parsed.to_fields() == {"order_id": ORDER, "format": "online"}


def test_card_order_round_trip() -> None:
    order = ap3000.card_order_id("2019-09-01T18:00:00", "7A8D05DD", 13544000, 1)
    assert order == "20190901180000" + "7A8D05DD" + "13544000" + "31"
    parsed = ap3000.parse_order_id(order, 0)
    assert parsed.format == "card"
    assert parsed.time == "2019-09-01T18:00:00"
    assert parsed.card_id == "7A8D05DD"
    assert parsed.device_number == 13544000
    assert parsed.port == 1


def test_code_order_round_trip() -> None:
    order = ap3000.code_order_id("2024-05-06T07:08:09", "012345", 10011001, 0)
    assert order == "20240506070809" + "00" + "012345" + "10011001" + "70"
    parsed = ap3000.parse_order_id(order, 3)
    assert (parsed.format, parsed.time, parsed.verification_code) == (
        "code",
        "2024-05-06T07:08:09",
        "012345",
    )
    assert (parsed.device_number, parsed.port) == (10011001, 0)


@settings(max_examples=100)
@given(
    stamp=st.datetimes(min_value=datetime.datetime(1000, 1, 1)).map(
        lambda d: d.strftime("%Y-%m-%dT%H:%M:%S")
    ),
    card=st.binary(min_size=4, max_size=4).map(lambda b: b.hex().upper()),
    code=st.integers(0, 999_999).map(lambda c: "%06d" % c),
    device=st.integers(0, 99_999_999),
    port=st.integers(0, 29),
)
def test_offline_orders_round_trip(
    stamp: str, card: str, code: str, device: int, port: int
) -> None:
    parsed = ap3000.parse_order_id(ap3000.card_order_id(stamp, card, device, port), 0)
    assert (parsed.format, parsed.time, parsed.card_id, parsed.device_number, parsed.port) == (
        "card",
        stamp,
        card,
        device,
        port,
    )
    parsed = ap3000.parse_order_id(ap3000.code_order_id(stamp, code, device, port), 3)
    assert (parsed.format, parsed.verification_code, parsed.device_number, parsed.port) == (
        "code",
        code,
        device,
        port,
    )


@pytest.mark.parametrize(
    ("order", "mode"),
    [
        ("2A190901180000" + "7A8D05DD" + "13544000" + "31", 0),  # date not BCD
        ("20190901180000" + "7A8D05DD" + "1354400F" + "31", 0),  # device not BCD
        ("20190901180000" + "7A8D05DD" + "13544000" + "29", 0),  # port below 30
        ("20190901180000" + "01" + "012345" + "10011001" + "70", 3),  # byte 7 not 0
        ("20190901180000" + "00" + "01234F" + "10011001" + "70", 3),  # code not BCD
        ("20190901180000" + "00" + "012345" + "10011001" + "69", 3),  # port below 70
    ],
)
def test_non_bcd_orders_are_unparsed(order: str, mode: int) -> None:
    parsed = ap3000.parse_order_id(order, mode)
    assert parsed.format == "unparsed"
    assert parsed.order_id == order
    assert parsed.to_fields() == {"order_id": order, "format": "unparsed"}


@settings(max_examples=100)
@given(raw=st.binary(min_size=16, max_size=16), mode=st.integers(0, 255))
def test_parse_order_id_never_fails_on_16_bytes(raw: bytes, mode: int) -> None:
    parsed = ap3000.parse_order_id(raw.hex(), mode)
    assert parsed.order_id == raw.hex().upper()
    assert parsed.format in ("online", "card", "code", "unparsed")


@pytest.mark.parametrize("order", ["", "00" * 15, "00" * 17, "zz" * 16, ORDER[:-1] + "g"])
def test_parse_order_id_bad_hex(order: str) -> None:
    with pytest.raises(chargeproto.HexSyntaxError):
        ap3000.parse_order_id(order, 1)


@pytest.mark.parametrize(
    "build",
    [
        lambda: ap3000.card_order_id("2019-09-01 18:00:00", "7A8D05DD", 1, 0),
        lambda: ap3000.card_order_id("2019-09-01T18:00:00", "7A8D05", 1, 0),
        lambda: ap3000.card_order_id("2019-09-01T18:00:00", "XYZ", 1, 0),
        lambda: ap3000.card_order_id("2019-09-01T18:00:00", "7A8D05DD", 100_000_000, 0),
        lambda: ap3000.card_order_id("2019-09-01T18:00:00", "7A8D05DD", 1, 70),
        lambda: ap3000.code_order_id("2019-09-01T18:00:00", "12345", 1, 0),
        lambda: ap3000.code_order_id("2019-09-01T18:00:00", "123456", 1, 30),
    ],
)
def test_order_builders_reject_bad_input(build: Any) -> None:
    with pytest.raises(chargeproto.EncodeError) as info:
        build()
    assert info.value.field is not None


# --- verification codes ------------------------------------------------------------------

PHY = 0x04CEAA40
T = 1_700_000_123


def test_verification_code_definition() -> None:
    minute = T - T % 60
    want = "%06d" % (zlib.crc32(struct.pack("<IIB", PHY, minute, 1)) % 1_000_000)
    assert ap3000.verification_code(PHY, T, 1) == want
    assert ap3000.verification_code("04CEAA40", T, 1) == want
    assert ap3000.verification_code(PHY, minute, 1) == want  # rounded down to the minute
    assert ap3000.verification_code(PHY, minute + 59, 1) == want


@settings(max_examples=100)
@given(phy=st.integers(0, 0xFFFFFFFF), t=st.integers(0, 0xFFFFFFFF), port=st.integers(0, 255))
def test_verification_code_is_six_digits_and_deterministic(phy: int, t: int, port: int) -> None:
    code = ap3000.verification_code(phy, t, port)
    assert len(code) == 6
    assert code.isdigit()
    assert ap3000.verification_code(phy, t, port) == code


def test_check_verification_code_window() -> None:
    code = ap3000.verification_code(PHY, T, 1)
    minute = T - T % 60
    for now in (minute, minute + 59, minute + 120, minute - 120, T + 60, T - 60):
        assert ap3000.check_verification_code(code, PHY, now, 1), now
    for now in (minute + 60 + 121, minute - 121, minute + 3600):
        assert not ap3000.check_verification_code(code, PHY, now, 1), now
    assert not ap3000.check_verification_code(code, PHY, T, 2) or (
        ap3000.verification_code(PHY, T, 2) == code
    )


@pytest.mark.parametrize(
    "args",
    [("XYZ", T, 1), (PHY, T, 256), (PHY, T, -1), (PHY, -1, 1), (PHY, 1 << 32, 1)],
)
def test_verification_code_bad_input(args: tuple[Any, int, int]) -> None:
    with pytest.raises(chargeproto.ChargeProtoError):
        ap3000.verification_code(*args)


# --- firmware ------------------------------------------------------------------------------


def test_split_image_200() -> None:
    image = bytes(range(256)) * 2 + bytes(128)  # 640 bytes
    packets = ap3000.split_image(image, packet_size=200)
    assert [(total, index) for total, index, _ in packets] == [(4, 1), (4, 2), (4, 3), (4, 4)]
    assert all(len(data) == 200 for _, _, data in packets)
    assert b"".join(data for _, _, data in packets)[:640] == image
    assert packets[-1][2][40:] == bytes(160)


def test_split_image_with_check_packet() -> None:
    image = bytes(range(200)) * 3 + bytes(40)
    packets = ap3000.split_image(image, packet_size=200, check_packet=(0x20, 126))
    assert [(total, index) for total, index, _ in packets] == [(5, i) for i in range(1, 6)]
    check = ap3000.parse_check_packet(packets[-1][2])
    assert check == ap3000.CheckPacket(ap3000.image_checksum(image), 0x20, 126)
    assert check.image_checksum == sum(image)
    assert all(ap3000.parse_check_packet(data) is None for _, _, data in packets[:-1])


def test_split_image_256() -> None:
    packets = ap3000.split_image(bytes(600), packet_size=256, padding=0xFF)
    assert [(total, index) for total, index, _ in packets] == [(3, 1), (3, 2), (3, 3)]
    assert packets[-1][2] == bytes(88) + b"\xff" * 168


@settings(max_examples=50)
@given(
    image=st.binary(min_size=1, max_size=2000),
    device_type=st.integers(0, 255),
    version=st.integers(0, 0xFFFF),
)
def test_check_packet_round_trip(image: bytes, device_type: int, version: int) -> None:
    packet = ap3000.build_check_packet(image, device_type, version)
    assert len(packet) == 200
    assert packet.startswith(ap3000.CHECK_MAGIC)
    assert ap3000.parse_check_packet(packet) == ap3000.CheckPacket(
        sum(image) & 0xFFFFFFFF, device_type, version
    )
    # and inside a firmware frame, the decoder reports it
    frame = ap3000.encode(ap3000.SubDeviceFirmwarePacket("04CEAA40", 9, 5, 5, packet.hex()))
    fields = ap3000.decode(frame, "down").to_fields()
    assert fields["check_packet"] == {
        "image_checksum": sum(image) & 0xFFFFFFFF,
        "device_type": device_type,
        "firmware_version": version,
    }


def test_firmware_errors() -> None:
    with pytest.raises(chargeproto.EncodeError):
        ap3000.split_image(b"")
    with pytest.raises(chargeproto.EncodeError):
        ap3000.split_image(b"x", packet_size=0)
    with pytest.raises(chargeproto.EncodeError):
        ap3000.build_check_packet(b"x", 256, 1)
    with pytest.raises(chargeproto.EncodeError):
        ap3000.build_check_packet(b"x", 1, 1 << 16)


def test_verify_replies_happy_path() -> None:
    progress = ap3000.verify_replies(4, [(0, 1), (0, 2), (0, 3), (0, 4)])
    assert progress == ap3000.UpgradeProgress(True, 4, ())
    assert ap3000.verify_replies(4, [(0, 1), (0, 2)]) == ap3000.UpgradeProgress(False, 3, ())
    assert ap3000.verify_replies(4, []) == ap3000.UpgradeProgress(False, 1, ())


def test_verify_replies_out_of_order() -> None:
    progress = ap3000.verify_replies(4, [(0, 1), (0, 3)])
    assert not progress.complete
    assert progress.next_packet == 2
    assert progress.errors == ("acknowledged packet 3, expected 2",)


def test_verify_replies_error_then_resend() -> None:
    progress = ap3000.verify_replies(3, [(0, 1), (1, 2), (0, 2), (0, 3)])
    assert progress == ap3000.UpgradeProgress(True, 3, ())
    progress = ap3000.verify_replies(3, [(0, 1), (1, 3)])
    assert progress.next_packet == 2
    assert len(progress.errors) == 1


# --- encoder errors ------------------------------------------------------------------------


def _heartbeat(**changes: Any) -> ap3000.Heartbeat:
    fields: dict[str, Any] = {
        "phy_id": "04CEAA40",
        "msg_id": 1,
        "voltage_v": 220.0,
        "ports": (ap3000.PortState(0, 0),),
        "signal_strength": 0,
        "temperature_c": 20,
    }
    fields.update(changes)
    return ap3000.Heartbeat(**fields)


def _settlement(**changes: Any) -> ap3000.Settlement:
    fields: dict[str, Any] = {
        "phy_id": "04CEAA40",
        "msg_id": 1,
        "duration_s": 60,
        "max_power_w": 100.0,
        "energy_kwh": 0.1,
        "port": 0,
        "start_mode": 1,
        "card_id": "00000000",
        "stop_reason": 1,
        "order_id": ORDER,
    }
    fields.update(changes)
    return ap3000.Settlement(**fields)


BAD_MESSAGES = [
    ("voltage_v", lambda: _heartbeat(voltage_v=7000)),
    ("voltage_v", lambda: _heartbeat(voltage_v=-1)),
    ("voltage_v", lambda: _heartbeat(voltage_v=float("nan"))),
    ("voltage_v", lambda: _heartbeat(voltage_v=float("inf"))),
    ("voltage_v", lambda: _heartbeat(voltage_v="220")),
    ("temperature_c", lambda: _heartbeat(temperature_c=-65)),
    ("temperature_c", lambda: _heartbeat(temperature_c=191)),
    ("signal_strength", lambda: _heartbeat(signal_strength=256)),
    ("signal_strength", lambda: _heartbeat(signal_strength=1.5)),
    ("ports[0].status", lambda: _heartbeat(ports=(ap3000.PortState(0, 300),))),
    ("phy_id", lambda: _heartbeat(phy_id="04CEAA4")),
    ("phy_id", lambda: _heartbeat(phy_id="XYZXYZXY")),
    ("msg_id", lambda: _heartbeat(msg_id=70000)),
    ("order_id", lambda: _settlement(order_id=ORDER[:-2])),
    ("order_id", lambda: _settlement(order_id=ORDER + "00")),
    ("order_id", lambda: _settlement(order_id="Z" * 32)),
    ("card_id", lambda: _settlement(card_id="000000")),
    ("energy_kwh", lambda: _settlement(energy_kwh=655.36)),
    ("timestamp_unix", lambda: _settlement(timestamp_unix=1)),  # gap: second_max absent
    (
        "occupancy_duration_min",
        lambda: _settlement(second_max_power_w=1.0, occupancy_duration_min=1),
    ),
    (
        "server_address",
        lambda: ap3000.SetServerAddress("04CEAA40", 1, 8888, 3, 1, "bäidu.com"),
    ),
    (
        "server_address",
        lambda: ap3000.SetServerAddress("04CEAA40", 1, 8888, 3, 1, "x" * 46),
    ),
    ("qr_data", lambda: ap3000.SetQrCode("04CEAA40", 1, 0, "000000", "a\0b")),
    (
        "ports[0].power_w",
        lambda: ap3000.LegacyHeartbeat(
            "04CEAA40", 1, 126, 220.0, (ap3000.LegacyPortState(0, 0, 7000.0, 0.0),), 0, 0, 2, None
        ),
    ),
    ("card2", lambda: ap3000.CardSwipe("04CEAA40", 1, "7A8D05DD", 0, 1, 0, 1, "ABC")),
    ("card2", lambda: ap3000.CardSwipe("04CEAA40", 1, "7A8D05DD", 0, 1, 0, 1, "AB" * 256)),
    (
        "entries[0].phy_id",
        lambda: ap3000.SubDeviceVersions(
            "04CEAA40", 1, (ap3000.SubDeviceVersion(1, 0, 100, "nothex!!"),)
        ),
    ),
    ("payload_hex", lambda: ap3000.UnknownMessage("04CEAA40", 1, 0x70, "ABC")),
]


@pytest.mark.parametrize(("field", "build"), BAD_MESSAGES, ids=[f for f, _ in BAD_MESSAGES])
def test_encode_errors_name_the_field(field: str, build: Any) -> None:
    with pytest.raises(chargeproto.EncodeError) as info:
        ap3000.encode(build())
    assert info.value.field == field, info.value


def test_optional_fields_in_order_encode() -> None:
    full = _settlement(second_max_power_w=1.0, timestamp_unix=5, occupancy_duration_min=7)
    assert ap3000.decode(ap3000.encode(full)) == full
    short = _settlement()
    assert short.timestamp_unix is ABSENT
    assert ap3000.decode(ap3000.encode(short)) == short


def test_scaled_values_round_to_the_wire_resolution() -> None:
    message = ap3000.decode(ap3000.encode(_heartbeat(voltage_v=220.04)))
    assert message.voltage_v == 220.0
    message = ap3000.decode(ap3000.encode(_heartbeat(voltage_v=220.06)))
    assert message.voltage_v == pytest.approx(220.1, abs=1e-9)


def test_build_frame_errors() -> None:
    for args in [(-1, 0, 0), (1 << 32, 0, 0), (0, 1 << 16, 0), (0, 0, 256)]:
        with pytest.raises(chargeproto.EncodeError):
            ap3000.build_frame(*args, b"")
    with pytest.raises(chargeproto.EncodeError):
        ap3000.build_frame(0, 0, 0, bytes(0xFFFF))
