"""Hypothesis strategies for BKV messages, derived from each class's declaration
(construct layouts for the fixed messages, tag lists for the TLV messages). Shared by
the round-trip tests and the record tests."""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

from hypothesis import strategies as st

from chargeproto import ABSENT, Direction, bkv
from chargeproto._layout import WireField
from chargeproto._units import HEX, IDENTITY, Ascii, Converter, Hex
from chargeproto.bkv._tlv import Entries, Fixed, Group, TagSpec, UInt

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


def raw_item_lists(tag_map: Any, max_items: int, max_value: int) -> st.SearchStrategy[Any]:
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
    return st.builds(
        cls, **_spec_values(cls.TAGS, depth), raw_items=raw_item_lists(cls.TAG_MAP, 2, 6)
    )


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
        raw_items=raw_item_lists(cls.TAG_MAP, 4, 20),
    )


def tlv_container() -> st.SearchStrategy[bkv.TlvContainer]:
    """Generic containers: an unknown BKV command id, the header and global tags, raw
    items (unknown tags, other markers)."""
    known = {c.key for c in TLV}
    return st.builds(
        bkv.TlvContainer,
        gateway_id=gateway_ids,
        seq=u32,
        bkv_cmd=st.just(ABSENT) | st.integers(0, 0xFFFF).filter(lambda c: c not in known),
        unknown_direction=st.sampled_from([Direction.UP, Direction.DOWN]),
        **_spec_values(bkv.TlvContainer.TAGS, 0),
        raw_items=raw_item_lists(bkv.TlvContainer.TAG_MAP, 4, 20),
    )
