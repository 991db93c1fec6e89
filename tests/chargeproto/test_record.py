"""The record API: ``to_record`` gives the JSON form ``chargeproto decode`` prints,
``from_record`` reads it back, for every message class of both protocols."""

from __future__ import annotations

import json
from typing import Any

import pytest
from ap3000_support import msg_ids, phy_ids, raw_payloads
from bkv_support import FIXED, TLV, fixed_message, gateway_ids, tlv_container, tlv_message, u32
from hypothesis import given, settings
from hypothesis import strategies as st

import chargeproto
from chargeproto import ap3000, bkv, from_record, to_record

AP3000_CLASSES = ap3000.MESSAGE_CLASSES
AP3000_IDS = [f"{c.__name__}-{c.command:#04x}-{c.direction.value}" for c in AP3000_CLASSES]


def _json(record: dict[str, Any]) -> dict[str, Any]:
    """The record as it comes back from JSON (tuples become lists, and so on)."""
    out: dict[str, Any] = json.loads(json.dumps(record))
    return out


def _round_trip(message: chargeproto.Message) -> dict[str, Any]:
    record = to_record(message)
    assert from_record(record) == message
    assert from_record(_json(record)) == message
    return record


# --- round trips --------------------------------------------------------------------


@pytest.mark.parametrize("cls", AP3000_CLASSES, ids=AP3000_IDS)
@settings(max_examples=15)
@given(data=st.data(), phy=phy_ids, msg_id=msg_ids)
def test_ap3000_record_round_trip(
    cls: type[ap3000.Ap3000Message], data: st.DataObject, phy: int, msg_id: int
) -> None:
    _, payload, _ = data.draw(raw_payloads(cls))
    frame = ap3000.build_frame(phy, msg_id, cls.command, payload)
    message = ap3000.decode(frame, cls.direction)
    record = _round_trip(message)
    head = ap3000.PhysicalId(phy).fields()
    assert {k: record[k] for k in head} == head
    assert record["msg_id"] == msg_id
    assert record["command"] == f"0x{cls.command:02x}"
    assert record["direction"] == cls.direction.value
    assert record["length"] == len(frame) - 5
    encoded = ap3000.encode(message)
    assert record["checksum"] == int.from_bytes(encoded[-2:], "little")


@settings(max_examples=50)
@given(
    command=st.integers(0, 0xFF),
    direction=st.sampled_from(["up", "down"]),
    payload=st.binary(max_size=40),
    phy=phy_ids,
    msg_id=msg_ids,
)
def test_ap3000_unknown_message_record_round_trip(
    command: int, direction: str, payload: bytes, phy: int, msg_id: int
) -> None:
    message = ap3000.UnknownMessage(
        "%08X" % phy, msg_id, command, payload.hex().upper(), chargeproto.Direction(direction)
    )
    record = _round_trip(message)
    assert record["name"] == "UnknownMessage"
    assert record["direction"] == direction
    assert record["fields"] == {"payload_hex": payload.hex().upper()}


@pytest.mark.parametrize("cls", FIXED, ids=lambda c: c.__name__)
@settings(max_examples=25)
@given(data=st.data())
def test_bkv_fixed_record_round_trip(cls: type[bkv.FixedMessage], data: st.DataObject) -> None:
    message = data.draw(fixed_message(cls))
    record = _round_trip(message)
    frame = bkv.encode(message)
    assert (record["length"], record["checksum"]) == (len(frame) - 4, frame[-3])
    assert (record["gateway_id"], record["seq"]) == (message.gateway_id, message.seq)


@pytest.mark.parametrize("cls", TLV, ids=lambda c: c.__name__)
@settings(max_examples=25)
@given(data=st.data())
def test_bkv_tlv_record_round_trip(cls: type[bkv.TlvMessage], data: st.DataObject) -> None:
    _round_trip(data.draw(tlv_message(cls)))


@settings(max_examples=50)
@given(message=tlv_container())
def test_bkv_container_record_round_trip(message: bkv.TlvContainer) -> None:
    record = _round_trip(message)
    assert record["name"] == "TlvContainer"


@settings(max_examples=50)
@given(
    gateway_id=gateway_ids,
    seq=u32,
    command=st.integers(0, 0xFFFF).filter(lambda c: c not in (0x0000, 0x0005, 0x0007, 0x0015)),
    payload=st.binary(max_size=30),
    direction=st.sampled_from(["up", "down"]),
)
def test_bkv_unknown_message_record_round_trip(
    gateway_id: str, seq: int, command: int, payload: bytes, direction: str
) -> None:
    if command == 0x1000:
        return
    message = bkv.UnknownMessage(
        gateway_id, seq, command, payload.hex().upper(), chargeproto.Direction(direction)
    )
    _round_trip(message)


@settings(max_examples=50)
@given(
    gateway_id=gateway_ids,
    seq=u32,
    outer=st.sampled_from([0x0005, 0x0015]),
    sub_cmd=st.integers(0, 0xFF),
    params=st.binary(max_size=30),
    direction=st.sampled_from(["up", "down"]),
)
def test_bkv_unknown_sub_command_record_round_trip(
    gateway_id: str, seq: int, outer: int, sub_cmd: int, params: bytes, direction: str
) -> None:
    message = bkv.UnknownSubCommand(
        gateway_id, seq, outer, sub_cmd, params.hex().upper(), chargeproto.Direction(direction)
    )
    _round_trip(message)


def test_a_decoded_items_order_survives_the_record() -> None:
    gw = "82231214002700"
    frame = bkv.build_frame("up", 0x1000, 0, gw, bytes.fromhex("040101101003014b0003014a02"))
    message = bkv.decode(frame)
    assert message.tlv_order  # type: ignore[attr-defined]
    record = _round_trip(message)
    assert record["fields"]["tlv_order"] == [[1, 0], [0x4B, 0], [0x4A, 0]]
    assert bkv.encode(from_record(_json(record))) == frame  # type: ignore[arg-type]


# --- the shape -------------------------------------------------------------------------


def test_ap3000_record_shape() -> None:
    frame = bytes.fromhex("444e5910003b37ab0401002198080200000905ee02")
    record = to_record(ap3000.decode(frame))
    assert list(record) == [
        "protocol",
        "direction",
        "command",
        "name",
        "length",
        "phy_id",
        "phy_id_type",
        "phy_id_number",
        "phy_id_qr",
        "msg_id",
        "checksum",
        "fields",
    ]
    assert record["phy_id_qr"] == "3b37ab04" and record["checksum"] == 0x02EE
    assert "phy_id" not in record["fields"] and "msg_id" not in record["fields"]


def test_record_length_and_checksum_come_from_the_frame_when_given() -> None:
    """Text is cut at the first NUL: the frame decoded had other bytes than the
    message's encoding, and the record says what was on the wire."""
    qr = b"http://x" + b"\0" + b"junk"
    frame = ap3000.build_frame(0x04AB373B, 1, 0x95, qr.ljust(200, b"\0"))  # TemporaryQrCode
    message = ap3000.decode(frame, "down")
    assert ap3000.encode(message) != frame
    assert to_record(message, frame=frame)["checksum"] == int.from_bytes(frame[-2:], "little")
    assert to_record(message)["checksum"] != to_record(message, frame=frame)["checksum"]


def test_to_record_of_something_else_or_of_an_unsendable_message() -> None:
    with pytest.raises(chargeproto.RecordError):
        to_record({"protocol": "ap3000"})  # type: ignore[arg-type]
    with pytest.raises(chargeproto.EncodeError) as info:
        to_record(ap3000.SetWorkMode("04AB373B", 1, work_mode=300))
    assert info.value.field == "work_mode"


# --- errors --------------------------------------------------------------------------

_HEAD = {"protocol": "ap3000", "phy_id": "04AB373B", "msg_id": 1}
_BKV = {"protocol": "bkv", "gateway_id": "82231214002700", "seq": 1}


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ([], None),
        ({"name": "Reboot", "phy_id": "04AB373B", "msg_id": 1}, "protocol"),
        ({**_HEAD, "protocol": "ocpp", "name": "Reboot"}, "protocol"),
        ({**_HEAD, "name": "NoSuchThing"}, "name"),
        ({**_HEAD, "fields": {}}, "command"),
        ({**_HEAD, "command": "0x87"}, "direction"),
        ({**_HEAD, "command": "zz", "direction": "down"}, "command"),
        ({**_HEAD, "command": "0x99", "direction": "down"}, "command"),
        ({**_HEAD, "name": "Reboot", "command": "0x88"}, "command"),
        ({**_HEAD, "name": "Reboot", "direction": "up"}, "direction"),
        ({**_HEAD, "name": "Reboot", "direction": "sideways"}, "direction"),
        ({"protocol": "ap3000", "name": "Reboot", "msg_id": 1}, "phy_id"),
        ({**_HEAD, "phy_id": "04AB37", "name": "Reboot"}, "phy_id"),
        ({**_HEAD, "phy_id": 12, "name": "Reboot"}, "phy_id"),
        ({**_HEAD, "name": "Reboot", "phy_id_qr": "40aace04"}, "phy_id_qr"),
        ({**_HEAD, "name": "Reboot", "phy_id_type": 9, "phy_id_number": 1}, "phy_id_type"),
        ({**_HEAD, "name": "Reboot", "phy_id_type": "4", "phy_id_number": 1}, "phy_id_type"),
        ({"protocol": "ap3000", "name": "Reboot", "phy_id": "04AB373B"}, "msg_id"),
        ({**_HEAD, "name": "Reboot", "msg_id": 70000}, "msg_id"),
        ({**_HEAD, "name": "Reboot", "fields": {"msg_id": 2}}, "fields.msg_id"),
        ({**_HEAD, "name": "Reboot", "fields": []}, "fields"),
        ({**_HEAD, "name": "Reboot", "fields": {"bogus": 1}}, "fields.bogus"),
        ({**_HEAD, "name": "Reboot", "checksum": "x"}, "checksum"),
        ({**_HEAD, "name": "SetWorkMode", "fields": {}}, "fields.work_mode"),
        ({**_HEAD, "name": "SetWorkMode", "fields": {"work_mode": 256}}, "fields.work_mode"),
        ({**_HEAD, "name": "SetWorkMode", "fields": {"work_mode": "a"}}, "fields.work_mode"),
        ({**_HEAD, "name": "UnknownMessage", "fields": {"payload_hex": "00"}}, "command"),
        ({**_HEAD, "name": "UnknownMessage", "command": "0x99"}, "fields.payload_hex"),
        ({**_BKV, "name": "SocketQuery", "fields": {"socket": 1}, "seq": -1}, "seq"),
        (
            {**_BKV, "name": "SocketQuery", "fields": {"socket": 1}, "gateway_id": "12"},
            "gateway_id",
        ),
        ({"protocol": "bkv", "name": "SocketQuery", "fields": {"socket": 1}}, "gateway_id"),
        ({**_BKV, "command": "0x0015/0x1d", "fields": {"socket": 1}}, "direction"),
        ({**_BKV, "command": "0x15/1d", "direction": "down"}, "command"),
        ({**_BKV, "command": "0x0000/0x01", "direction": "down"}, "command"),
        ({**_BKV, "name": "SocketQuery", "command": "0x0015/0x07"}, "fields.sub_cmd"),
        ({**_BKV, "name": "SocketQuery", "direction": "up"}, "direction"),
        ({**_BKV, "name": "SocketQuery", "fields": {"socket": 300}}, "fields.socket"),
        ({**_BKV, "name": "StatusClusterAck", "fields": {"tag_0g": "01"}}, "fields.tag_0g"),
        ({**_BKV, "name": "StatusClusterAck", "fields": {"tlv_order": "x"}}, "fields.tlv_order"),
        ({**_BKV, "name": "StatusClusterAck", "fields": {"tag_44": 1}}, "fields.tag_44"),
    ],
)
def test_from_record_names_what_is_wrong(record: Any, field: str | None) -> None:
    with pytest.raises(chargeproto.RecordError) as info:
        from_record(record)
    assert isinstance(info.value, chargeproto.ChargeProtoError)
    assert info.value.field == field, str(info.value)


def test_from_record_accepts_each_form_of_the_physical_id() -> None:
    want = ap3000.Reboot("04CEAA40", 3)
    for form in (
        {"phy_id": "04CEAA40"},
        {"phy_id_qr": "40aace04"},
        {"phy_id_type": 4, "phy_id_number": 13544000},
        {
            "phy_id": "04ceaa40",
            "phy_id_qr": "40aace04",
            "phy_id_type": 4,
            "phy_id_number": 13544000,
        },
    ):
        record = {"protocol": "ap3000", "name": "Reboot", "msg_id": 3, **form}
        assert from_record(record) == want


def test_from_record_reads_head_fields_inside_fields_too() -> None:
    record = {
        "protocol": "ap3000",
        "command": "0x87",
        "direction": "down",
        "fields": {"phy_id": "04AB373B", "msg_id": 4},
    }
    assert from_record(record) == ap3000.Reboot("04AB373B", 4)


def test_from_record_builds_raw_bkv_messages_for_commands_without_a_class() -> None:
    container = from_record({**_BKV, "command": "0x1000/0x1013", "direction": "up"})
    assert isinstance(container, bkv.TlvContainer) and container.bkv_cmd == 0x1013
    sub = from_record(
        {**_BKV, "command": "0x0015/0x99", "direction": "down", "fields": {"params_hex": "AB"}}
    )
    assert isinstance(sub, bkv.UnknownSubCommand) and sub.sub_cmd == 0x99
    outer = from_record(
        {**_BKV, "command": "0x0033", "direction": "up", "fields": {"payload_hex": ""}}
    )
    assert isinstance(outer, bkv.UnknownMessage) and outer.unknown_command == 0x33
