"""Property tests: every BKV message class survives encode -> decode unchanged, and
any TLV item sequence (unknown tags, odd lengths, other markers, any order) survives
decode -> encode byte for byte."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from bkv_support import (
    FIXED,
    TLV,
    fixed_message,
    gateway_ids,
    raw_item_lists,
    tlv_container,
    tlv_message,
    u32,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import chargeproto
from chargeproto import ABSENT, bkv

settings.register_profile("bkv", max_examples=100, deadline=None)
settings.load_profile("bkv")

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "bkv.json"
VECTORS = {v["name"]: v for v in json.loads(FIXTURES.read_text())}


@pytest.mark.parametrize("cls", FIXED, ids=lambda c: c.__name__)
@given(data=st.data())
def test_fixed_message_round_trip(cls: type[bkv.FixedMessage], data: st.DataObject) -> None:
    message = data.draw(fixed_message(cls))
    frame = bkv.encode(message)
    decoded = bkv.decode(frame)
    assert decoded == message
    assert bkv.encode(decoded) == frame
    fields = decoded.to_fields()
    assert fields["length"] == len(frame) - 4
    assert fields["checksum"] == frame[-3]


@pytest.mark.parametrize("cls", TLV, ids=lambda c: c.__name__)
@given(data=st.data())
def test_tlv_message_round_trip(cls: type[bkv.TlvMessage], data: st.DataObject) -> None:
    message = data.draw(tlv_message(cls))
    frame = bkv.encode(message)
    decoded = bkv.decode(frame)
    assert decoded == message
    assert bkv.encode(decoded) == frame


def test_every_registered_class_is_property_tested() -> None:
    assert set(FIXED) | set(TLV) == set(bkv.MESSAGE_CLASSES)


# --- arbitrary item sequences -----------------------------------------------------------

KNOWN_TAGS = sorted({t for c in TLV for t in c.TAG_MAP} | {0x94, 0x5B})
item_tags = st.sampled_from(KNOWN_TAGS) | st.integers(0, 255)


@st.composite
def items(draw: st.DrawFn, depth: int = 0) -> bytes:
    out = []
    for _ in range(draw(st.integers(0, 8 if depth == 0 else 4))):
        tag = draw(item_tags)
        marker = draw(st.sampled_from([1, 1, 1, 1, 0, 2, 0x81]))
        if tag in (0x94, 0x5B) and depth < 2 and draw(st.booleans()):
            value = draw(items(depth + 1))[:253]
        else:
            size = draw(st.sampled_from([0, 1, 2, 4, 6, 7, 8, 12, 3]))
            value = draw(st.binary(min_size=size, max_size=size))
        out.append(bytes((len(value) + 2, marker, tag)) + value)
    return b"".join(out)


@st.composite
def containers(draw: st.DrawFn) -> bytes:
    head = b""
    if draw(st.booleans()):
        bkv_cmd = draw(
            st.sampled_from([0x1017, 0x1007, 0x1004, 0x1011, 0x1012, 0x1010, 0x1013])
            | st.integers(0, 0xFFFF)
        )
        head = bytes((4, 1, 1)) + bkv_cmd.to_bytes(2, "big")
    payload = head + draw(items())
    direction = draw(st.sampled_from(["up", "down"]))
    return bkv.build_frame(direction, 0x1000, draw(u32), draw(gateway_ids), payload)


@given(frame=containers())
def test_any_tlv_container_survives_decode_encode(frame: bytes) -> None:
    message = bkv.decode(frame)
    assert bkv.encode(message) == frame
    assert bkv.decode(bkv.encode(message)) == message
    message.to_fields()


@given(
    gateway_id=gateway_ids,
    seq=u32,
    bkv_cmd=st.integers(0, 0xFFFF).filter(lambda c: c not in {c.key for c in TLV}),
    raw=raw_item_lists(bkv.TlvContainer.TAG_MAP, 10, 40),
)
def test_generic_container_round_trip(gateway_id: str, seq: int, bkv_cmd: int, raw: Any) -> None:
    message = bkv.TlvContainer(
        gateway_id, seq, bkv_seq=seq, bkv_gateway_id=gateway_id, bkv_cmd=bkv_cmd, raw_items=raw
    )
    decoded = bkv.decode(bkv.encode(message))
    assert decoded == message


def test_gateway_0x1013_is_a_generic_container_with_its_global_tags_named() -> None:
    """The 0x1013 real gateways send (bkv.md 15): socket 0x4A and port 0x08 mean what
    they mean everywhere; 0x06 and 0x5A are unknown and stay raw, in order."""
    gw = "82231214002700"
    payload = (
        bytes.fromhex("04010110130a01020000000000000000090103")
        + bytes.fromhex(gw)
        + bytes.fromhex("03014a010301087f0901062024082310172904015a1234")
    )
    frame = bkv.build_frame("up", 0x1000, 0, gw, payload)
    message = bkv.decode(frame)
    assert isinstance(message, bkv.TlvContainer)
    assert message.bkv_cmd == 0x1013
    assert (message.socket, message.port) == (1, 0x7F)
    assert [i.tag for i in message.raw_items] == [0x06, 0x5A]
    fields = message.to_fields()
    assert fields["socket"] == 1 and fields["port"] == 0x7F
    assert fields["tag_06"] == "20240823101729" and fields["tag_5a"] == "1234"
    assert "tag_4a" not in fields and "tag_08" not in fields
    assert bkv.encode(message) == frame


def test_global_tags_in_an_unknown_command_keep_their_order() -> None:
    """Unknown tags between and before known ones, and known ones out of the default
    order: every item is kept where it was."""
    gw = "82231214002700"
    items = "04010110990401ee00ff0301087f03014a0104010b10000301ee0203010f01"
    frame = bkv.build_frame("down", 0x1000, 7, gw, bytes.fromhex(items))
    message = bkv.decode(frame)
    assert isinstance(message, bkv.TlvContainer)
    assert message.unknown_direction is chargeproto.Direction.DOWN
    assert (message.port, message.socket, message.power_w, message.result) == (127, 1, 409.6, 1)
    assert message.success is True
    assert [i.tag for i in message.raw_items] == [0xEE, 0xEE]
    assert message.tlv_order
    assert bkv.encode(message) == frame
    fields = message.to_fields()
    assert fields["tag_ee"] == ["00FF", "02"] and fields["result_text"] == "ok"


def test_a_global_tag_of_the_wrong_size_in_an_unknown_command_stays_raw() -> None:
    gw = "82231214002700"
    frame = bkv.build_frame("up", 0x1000, 0, gw, bytes.fromhex("040101109904014a0001"))
    message = bkv.decode(frame)
    assert isinstance(message, bkv.TlvContainer) and message.socket is ABSENT
    fields = message.to_fields()
    assert fields["tag_4a"] == "0001"
    assert any("0x4A (socket)" in note for note in fields["field_notes"])
    assert bkv.encode(message) == frame


def test_status_cluster_under_an_unknown_command_id_is_still_read() -> None:
    """A vector's 0x1017 items behind another command id: the socket groups are
    global, so the cluster reads the same."""
    vector = bytes.fromhex(VECTORS["bkv_0x1000_0x1017_status_cluster"]["hex"])
    cluster = bkv.decode(vector)
    assert isinstance(cluster, bkv.StatusCluster)
    payload = bytearray(vector[18:-3])
    payload[3:5] = (0x1099).to_bytes(2, "big")
    frame = bkv.build_frame("up", 0x1000, 0, cluster.gateway_id, bytes(payload))
    message = bkv.decode(frame)
    assert isinstance(message, bkv.TlvContainer)
    assert message.sockets == cluster.sockets
    assert bkv.encode(message) == frame


@given(message=tlv_container())
def test_generic_container_with_global_tags_round_trip(message: bkv.TlvContainer) -> None:
    frame = bkv.encode(message)
    decoded = bkv.decode(frame)
    assert decoded == message
    assert bkv.encode(decoded) == frame


def test_global_tags_mean_the_same_in_every_class() -> None:
    """The generic container and every TLV class agree on each tag's name and layout."""
    from chargeproto.bkv._tlv import GLOBAL_TAGS

    dictionary = {spec.tag: spec for spec in GLOBAL_TAGS}
    for cls in TLV:
        for spec in cls.TAGS:
            if spec.tag in dictionary:
                assert spec == dictionary[spec.tag], (cls.__name__, spec)


def test_known_tag_with_wrong_length_is_kept_raw_and_noted() -> None:
    gw = "82231214002700"
    payload = bytes.fromhex("040101101003014a0205014e08bc00")  # 0x4E with 3 bytes
    frame = bkv.build_frame("up", 0x1000, 0, gw, payload)
    message = bkv.decode(frame)
    assert isinstance(message, bkv.EventReport)
    assert message.overvoltage_v is ABSENT
    fields = message.to_fields()
    assert fields["tag_4e"] == "08BC00"
    assert any("0x4E" in note for note in fields["field_notes"])
    assert bkv.encode(message) == frame


def test_other_marker_is_reported() -> None:
    gw = "82231214002700"
    payload = bytes.fromhex("040101101003024a02")
    message = bkv.decode(bkv.build_frame("up", 0x1000, 0, gw, payload))
    assert message.to_fields()["tlv_markers"] == [1, 2]


def test_tlv_order_kept_only_when_needed() -> None:
    gw = "82231214002700"
    swapped = bytes.fromhex("040101101003014b0003014a02")
    message = bkv.decode(bkv.build_frame("up", 0x1000, 0, gw, swapped))
    assert message.tlv_order
    assert "tlv_order" not in message.to_fields()
    plain = bytes.fromhex("040101101003014a0203014b00")
    assert bkv.decode(bkv.build_frame("up", 0x1000, 0, gw, plain)).tlv_order == ()


# --- encoding rejects what the wire cannot carry ------------------------------------------


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (bkv.SocketQuery("82231214002700", 1, socket=256), "socket"),
        (bkv.SocketQuery("8223121400270", 1, socket=1), "gateway_id"),
        (bkv.SocketQuery("82231214002700", -1, socket=1), "seq"),
        (
            bkv.ChargeControl("82231214002700", 1, 1, 0, 1, 1, 60, float("nan")),
            "energy_kwh",
        ),
        (
            bkv.ChargeControl("82231214002700", 1, 1, 0, 1, 1, 60, 65.536),
            "energy_kwh",
        ),
        (bkv.HeartbeatReply("82231214002700", 0, "2020-07-30 16:45:45"), "server_time"),
        (bkv.QueryParams.create("82231214002700", 1, socket=300), "socket"),
    ],
)
def test_encode_rejects_out_of_range(message: bkv.BkvMessage, field: str) -> None:
    with pytest.raises(chargeproto.EncodeError) as info:
        bkv.encode(message)
    assert info.value.field in (field, None)
