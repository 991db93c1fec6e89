"""Property tests: every BKV message class survives encode -> decode unchanged, and
any TLV item sequence (unknown tags, odd lengths, other markers, any order) survives
decode -> encode byte for byte."""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import chargeproto
from chargeproto import ABSENT, bkv
from chargeproto._layout import WireField
from chargeproto._units import HEX, IDENTITY, Ascii, Converter, Hex
from chargeproto.bkv._tlv import Entries, Fixed, Group, TagSpec, UInt

settings.register_profile("bkv", max_examples=100, deadline=None)
settings.load_profile("bkv")

gateway_ids = st.binary(min_size=7, max_size=7).map(lambda b: b.hex().upper())
u32 = st.integers(0, 0xFFFFFFFF)

FIXED = [c for c in bkv.MESSAGE_CLASSES if issubclass(c, bkv.FixedMessage)]
TLV = [c for c in bkv.MESSAGE_CLASSES if issubclass(c, bkv.TlvMessage)]


# --- fixed layouts, from the construct declarations -----------------------------------


def _int_strategy(fmt: str, conv: Converter) -> st.SearchStrategy[Any]:
    size = struct.calcsize(">" + fmt)
    return st.integers(0, (1 << (8 * size)) - 1).map(conv.decode)


def _bytes_strategy(size: int, conv: Converter) -> st.SearchStrategy[Any]:
    if isinstance(conv, Ascii):
        chars = st.characters(min_codepoint=1, max_codepoint=127)
        return st.text(alphabet=chars, max_size=size)
    if conv is IDENTITY or isinstance(conv, Hex):
        conv = HEX
    return st.binary(min_size=size, max_size=size).map(conv.decode)


def _scalar(fmt: str, conv: Converter) -> st.SearchStrategy[Any]:
    if fmt.endswith("s"):
        return _bytes_strategy(int(fmt[:-1]), conv)
    return _int_strategy(fmt, conv)


def fixed_message(cls: type[bkv.FixedMessage]) -> st.SearchStrategy[bkv.FixedMessage]:
    codec = cls.codec
    values: dict[str, st.SearchStrategy[Any]] = {"gateway_id": gateway_ids, "seq": u32}
    groups: dict[str, int] = {}
    for wf in codec.fields:
        typed = codec.typed_name(wf)
        if typed is None:
            continue
        groups[typed] = wf.group
        values[typed] = _wire_value(cls, wf, codec.converter(wf.name))
    optional = sorted({g for g in groups.values() if g >= 0})

    @st.composite
    def build(draw: st.DrawFn) -> bkv.FixedMessage:
        present = draw(st.integers(0, len(optional)))
        kwargs = {}
        for name, strategy in values.items():
            group = groups.get(name, -1)
            if group >= 0 and optional.index(group) >= present:
                continue
            kwargs[name] = draw(strategy)
        return cls(**kwargs)

    return build()


def _wire_value(cls: Any, wf: WireField, conv: Converter) -> st.SearchStrategy[Any]:
    if wf.kind == "fixed":
        return _scalar(wf.fmt, conv)
    if wf.kind == "array":
        return st.lists(_int_strategy(wf.fmt, conv), max_size=6).map(tuple)
    assert wf.kind == "records", wf
    item = cls.codec.items[wf.name]
    members = {}
    for name, fmt in wf.record:
        members[name] = _scalar(fmt, cls.codec.converter(f"{wf.name}[].{name}"))
    return st.lists(st.builds(item, **members), max_size=5).map(tuple)


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


# --- TLV messages, from their tag declarations -------------------------------------------


def _kind_value(kind: Any, depth: int) -> st.SearchStrategy[Any]:
    if isinstance(kind, UInt):
        return st.integers(0, (1 << (8 * kind.size)) - 1).map(kind.conv.decode)
    if isinstance(kind, Fixed):
        return st.binary(min_size=kind.size, max_size=kind.size).map(kind.conv.decode)
    if isinstance(kind, Entries):
        fields = [f.name for f in dataclasses.fields(kind.item)]
        parts = struct.Struct(">" + kind.fmt)
        raw = st.binary(min_size=parts.size, max_size=parts.size)

        def entry(b: bytes) -> Any:
            values = parts.unpack(b)
            return kind.item(
                **{n: c.decode(v) for n, c, v in zip(fields, kind.convs, values, strict=True)}
            )

        return st.lists(raw.map(entry), max_size=5).map(tuple)
    assert isinstance(kind, Group)
    return st.lists(record(kind.record, depth + 1), min_size=1, max_size=3).map(tuple)


def _raw_items(tag_map: Any, max_items: int, max_value: int) -> st.SearchStrategy[Any]:
    unknown = st.integers(0, 255).filter(lambda t: t not in tag_map)
    plain = st.builds(
        bkv.TlvItem,
        tag=unknown,
        value_hex=st.binary(max_size=max_value).map(lambda b: b.hex().upper()),
    )
    other_marker = st.builds(
        bkv.TlvItem,
        tag=st.integers(0, 255),
        value_hex=st.binary(max_size=max_value).map(lambda b: b.hex().upper()),
        marker=st.integers(0, 255).filter(lambda m: m != 1),
    )
    return st.lists(plain | other_marker, max_size=max_items).map(tuple)


def _spec_values(specs: tuple[TagSpec, ...], depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for spec in specs:
        if spec.name == "bkv_cmd" or "[" in spec.name:
            continue
        out[spec.name] = st.just(ABSENT) | _kind_value(spec.kind, depth)
    return out


def record(cls: Any, depth: int) -> st.SearchStrategy[Any]:
    return st.builds(cls, **_spec_values(cls.TAGS, depth), raw_items=_raw_items(cls.TAG_MAP, 2, 6))


event_ports = st.lists(
    st.builds(
        bkv.EventPort,
        port=st.integers(0, 1),
        event_reason=st.integers(0, 255),
        event_state=st.just(ABSENT) | st.integers(0, 255),
        leakage_current_raw=st.just(ABSENT) | st.integers(0, 0xFFFF),
        over_temperature_c=st.just(ABSENT) | st.integers(0, 255),
        status_bits=st.just(ABSENT) | st.integers(0, 255),
    ),
    min_size=1,
    max_size=2,
    unique_by=lambda p: p.port,
).map(lambda ports: tuple(sorted(ports, key=lambda p: p.port)))


def tlv_message(cls: type[bkv.TlvMessage]) -> st.SearchStrategy[bkv.TlvMessage]:
    extra: dict[str, Any] = {}
    if cls is bkv.EventReport:
        extra["ports"] = st.just(ABSENT) | event_ports
    return st.builds(
        cls,
        gateway_id=gateway_ids,
        seq=u32,
        **_spec_values(cls.TAGS, 0),
        **extra,
        raw_items=_raw_items(cls.TAG_MAP, 4, 20),
    )


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
    raw=_raw_items({}, 10, 40),
)
def test_generic_container_round_trip(gateway_id: str, seq: int, bkv_cmd: int, raw: Any) -> None:
    message = bkv.TlvContainer(
        gateway_id, seq, bkv_seq=seq, bkv_gateway_id=gateway_id, bkv_cmd=bkv_cmd, raw_items=raw
    )
    decoded = bkv.decode(bkv.encode(message))
    assert decoded == message


def test_gateway_0x1013_is_kept_as_a_generic_container() -> None:
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
    assert [i.tag for i in message.raw_items] == [0x4A, 0x08, 0x06, 0x5A]
    fields = message.to_fields()
    assert fields["tag_08"] == "7F" and fields["tag_5a"] == "1234"
    assert bkv.encode(message) == frame


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
