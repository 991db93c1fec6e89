"""The BKV TLV container, outer command 0x1000 (bkv.md section 9).

The payload is a sequence of items ``L marker tag value`` (L counts marker, tag and
value; the marker is 0x01 in every example). Tags 0x94 (a socket) and 0x5B (a jack)
carry a nested item sequence. Each message class lists the tags it knows
(``TAGS``); everything else stays a raw :class:`TlvItem`, in order:

* an unknown tag, a known tag with an unexpected value length, a repeated scalar
  tag, or any item whose marker is not 0x01 is kept raw (``tag_xx`` in
  ``to_fields()``; known tags kept raw are also explained in ``field_notes``);
* ``tlv_order`` records the received item order when it differs from the order the
  encoder writes by default (the class's tag order, then the raw items), so that
  ``encode(decode(frame)) == frame`` for every container. It is empty for a message
  in default order, which keeps ``decode(encode(m)) == m``.

Unknown BKV command ids decode as a generic :class:`TlvContainer` (the header items
and the tags with a global meaning named, every other item raw, the order kept), e.g.
the undocumented 0x1013 real gateways send after connecting (bkv.md 15).
"""

from __future__ import annotations

import abc
import dataclasses
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

from .._base import ABSENT, Absent, Direction, Item, _fields_of, _from_fields
from .._errors import EncodeError, PayloadError, TruncatedError
from .._units import BCD_TIME, DECI, HEX, HHMM, IDENTITY, MILLI, Converter, Scale
from . import _enums as enums
from ._messages import (
    REGISTRY,
    TLV,
    BkvItem,
    BkvMessage,
    as_direction,
    expect_value,
    strip_computed,
    with_flags,
)

UP = Direction.UP
DOWN = Direction.DOWN

#: the group tags
SOCKET_GROUP = 0x94
JACK_GROUP = 0x5B
#: the largest value one item can carry (L is one byte and counts marker and tag)
MAX_VALUE = 0xFF - 2


class _UnfitError(Exception):
    """A value that does not fit its tag's layout: the item is kept raw."""


# --- raw items ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class TlvItem(Item):
    """One item kept as received: ``tag``, ``value_hex`` (uppercase) and ``marker``."""

    tag: int
    value_hex: str
    marker: int = 1

    def value(self) -> bytes:
        return bytes.fromhex(self.value_hex)


RawItem = tuple[int, int, bytes, int]  # marker, tag, value, offset


def parse_items(buf: bytes | bytearray | memoryview, start: int, end: int) -> list[RawItem]:
    """Split ``buf[start:end]`` into ``(marker, tag, value, offset)`` items.

    Raises ``PayloadError`` for an item length below 2 and ``TruncatedError`` for an
    item that runs past ``end``.
    """
    out: list[RawItem] = []
    off = start
    while off < end:
        size = buf[off]
        if size < 2:
            raise PayloadError(
                f"TLV item at offset {off}: length {size} cannot hold marker and tag",
                offset=off,
                expected=2,
                actual=size,
            )
        if off + 1 + size > end:
            raise TruncatedError(
                f"TLV item at offset {off}: {size} bytes announced, {end - off - 1} left",
                offset=off,
                expected=size,
                actual=end - off - 1,
            )
        out.append((buf[off + 1], buf[off + 2], bytes(buf[off + 3 : off + 1 + size]), off))
        off += 1 + size
    return out


def build_item(tag: int, value: bytes, marker: int = 1, field: str = "") -> bytes:
    """One encoded item; ``EncodeError`` when the value exceeds 253 bytes."""
    if len(value) > MAX_VALUE:
        raise EncodeError(
            f"{field or f'tag 0x{tag:02X}'}: {len(value)} bytes exceed one TLV item "
            f"({MAX_VALUE} at most)",
            field=field or None,
        )
    if not (0 <= tag <= 0xFF and 0 <= marker <= 0xFF):
        raise EncodeError(f"tag 0x{tag:X} / marker 0x{marker:X} is not a byte", field=field or None)
    return bytes((len(value) + 2, marker, tag)) + value


# --- value kinds ---------------------------------------------------------------------------


class Kind(abc.ABC):
    """How one tag's value is laid out."""

    is_list = False
    is_group = False

    @abc.abstractmethod
    def decode(self, value: bytes) -> Any:
        """The field value of one item's bytes."""

    @abc.abstractmethod
    def encode(self, value: Any, field: str) -> bytes:
        """The item's bytes for a field value."""


@dataclasses.dataclass(frozen=True)
class UInt(Kind):
    """A big-endian unsigned integer of ``size`` bytes, scaled by ``conv``."""

    size: int
    conv: Converter = IDENTITY

    def decode(self, value: bytes) -> Any:
        if len(value) != self.size:
            raise _UnfitError(f"{len(value)} bytes, expected {self.size}")
        return self.conv.decode(int.from_bytes(value, "big"))

    def encode(self, value: Any, field: str) -> bytes:
        raw = self.conv.encode(value, field)
        if not 0 <= raw < 1 << (8 * self.size):
            raise EncodeError(f"{field}: {value!r} does not fit {self.size} bytes", field=field)
        return int(raw).to_bytes(self.size, "big")


@dataclasses.dataclass(frozen=True)
class Fixed(Kind):
    """``size`` bytes through a bytes converter (hex, BCD date-time)."""

    size: int
    conv: Converter = HEX

    def decode(self, value: bytes) -> Any:
        if len(value) != self.size:
            raise _UnfitError(f"{len(value)} bytes, expected {self.size}")
        return self.conv.decode(value)

    def encode(self, value: Any, field: str) -> bytes:
        raw = bytes(self.conv.encode(value, field))
        if len(raw) != self.size:
            raise EncodeError(f"{field}: expected {self.size} bytes, got {len(raw)}", field=field)
        return raw


@dataclasses.dataclass(frozen=True)
class Entries(Kind):
    """Fixed-size entries packed into one value (fee tiers 0x83, tier usage 0x84)."""

    item: type[Item]
    fmt: str  # struct format of one entry, without the byte order
    convs: tuple[Converter, ...]
    is_list = True

    @property
    def size(self) -> int:
        return struct.calcsize(">" + self.fmt)

    def decode(self, value: bytes) -> list[Any]:
        size = self.size
        if len(value) % size:
            raise _UnfitError(f"{len(value)} bytes is not a multiple of {size}")
        out = []
        for raw in struct.iter_unpack(">" + self.fmt, value):
            out.append(self.item(*(c.decode(r) for c, r in zip(self.convs, raw, strict=True))))
        return out

    def encode(self, value: Any, field: str) -> bytes:
        parts = []
        names = [f.name for f in dataclasses.fields(self.item)]
        for entry in value:
            if not isinstance(entry, self.item):
                raise EncodeError(
                    f"{field}: expected {self.item.__name__}, got {entry!r}", field=field
                )
            raw = [
                c.encode(getattr(entry, n), f"{field}[].{n}")
                for c, n in zip(self.convs, names, strict=True)
            ]
            try:
                parts.append(struct.pack(">" + self.fmt, *raw))
            except struct.error:
                raise EncodeError(
                    f"{field}: {entry!r} does not fit the wire", field=field
                ) from None
        return b"".join(parts)


@dataclasses.dataclass(frozen=True)
class Group(Kind):
    """A nested item sequence: one record (socket, jack) per item."""

    record: type[TlvRecord]
    is_list = True
    is_group = True

    def decode(self, value: bytes) -> list[Any]:
        try:
            return [decode_items(self.record, value, 0, len(value), {})]
        except (PayloadError, TruncatedError) as exc:
            raise _UnfitError(f"nested items: {exc}") from None

    def encode(self, value: Any, field: str) -> bytes:
        if not isinstance(value, self.record):
            raise EncodeError(
                f"{field}: expected {self.record.__name__}, got {value!r}", field=field
            )
        return encode_record(value)


@dataclasses.dataclass(frozen=True)
class TagSpec:
    """One known tag: its canonical field name and value layout."""

    tag: int
    name: str
    kind: Kind


def _u(tag: int, name: str, size: int = 1, conv: Converter = IDENTITY) -> TagSpec:
    return TagSpec(tag, name, UInt(size, conv))


# --- records: messages and group items --------------------------------------------------


_R = TypeVar("_R")


class _Record:
    """What TLV messages and TLV group items share (mixed into frozen dataclasses)."""

    __slots__ = ()
    TAGS: ClassVar[tuple[TagSpec, ...]] = ()
    TAG_MAP: ClassVar[Mapping[int, TagSpec]] = {}
    raw_items: tuple[TlvItem, ...]
    tlv_order: tuple[tuple[int, int], ...]

    #: tag -> (name, size, divisor or 0, position in TAGS, item header) for plain integer
    #: tags (identity or scaled), read and written inline on the hot path
    PLAIN: ClassVar[Mapping[int, tuple[str, int, int, int, bytes]]] = {}
    #: tag -> position in TAGS
    TAG_POSITION: ClassVar[Mapping[int, int]] = {}
    #: names of the list-valued tags (groups, packed entries)
    LIST_NAMES: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def assemble(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Constructor arguments from decoded tag values (hook for nested names).

        ``values`` belongs to the caller's decoding and is updated in place."""
        for name in cls.LIST_NAMES:
            if name in values:
                values[name] = tuple(values[name])
        return values

    def flatten(self) -> dict[str, Any]:
        """Tag name -> value for every present tag (inverse of :meth:`assemble`)."""
        out: dict[str, Any] = {}
        for spec in self.TAGS:
            value = getattr(self, spec.name, ABSENT)
            if value is not ABSENT:
                out[spec.name] = value
        return out

    @classmethod
    def item_types(cls) -> Mapping[str, type[Item]]:
        """List field name -> item class (groups and packed entries), for ``from_fields``."""
        out: dict[str, type[Item]] = {}
        for spec in cls.TAGS:
            if isinstance(spec.kind, Group):
                out[spec.name] = spec.kind.record
            elif isinstance(spec.kind, Entries):
                out[spec.name] = spec.kind.item
        return out

    @classmethod
    def raw_from_fields(cls, fields: dict[str, Any]) -> dict[str, Any]:
        """``tag_xx`` names back to :class:`TlvItem` raw items (marker 0x01), in the
        order given; ``field_notes`` and ``tlv_markers`` are dropped. The item order of
        the original frame is not part of the fields: encoding writes the default order
        unless ``tlv_order`` is given.

        ``raw_items`` given as objects (``{"tag": 0x44, "value_hex": "01", "marker":
        2}``, what :func:`exact_fields` adds) are the raw items, and the ``tag_xx``
        keys, a view of the same items, are then not added again."""
        fields.pop("field_notes", None)
        fields.pop("tlv_markers", None)
        given = list(fields.pop("raw_items", ()))
        tag_keys = [k for k in fields if _TAG_KEY.fullmatch(k)]
        if given and all(isinstance(entry, Mapping) for entry in given):
            raw = [_raw_item_of(entry) for entry in given]
            for key in tag_keys:
                del fields[key]
            tag_keys = []
        else:
            raw = given
        for key in tag_keys:
            value = fields.pop(key)
            for entry in value if isinstance(value, list) else [value]:
                if not isinstance(entry, str):
                    raise EncodeError(f"{key}: expected hex text, got {entry!r}", field=key)
                raw.append(TlvItem(int(key[4:], 16), entry.upper()))
        if raw:
            fields["raw_items"] = tuple(raw)
        if "tlv_order" in fields:
            fields["tlv_order"] = _order_of(fields["tlv_order"])
        return fields

    def field_notes(self) -> list[str]:
        """Why known tags were kept raw (wrong length, repeated, other marker)."""
        notes = []
        seen: set[int] = set()
        for item in self.raw_items:
            spec = self.TAG_MAP.get(item.tag)
            if spec is None:
                continue
            size = len(item.value_hex) // 2
            if item.marker != 1:
                why = f"marker 0x{item.marker:02X}"
            elif item.tag in seen or _fits(spec.kind, item.value()):
                why = "repeated"
            else:
                why = f"unexpected length {size}"
            seen.add(item.tag)
            notes.append(f"tag 0x{item.tag:02X} ({spec.name}) kept raw: {why}")
        return notes


_TAG_KEY = re.compile(r"tag_[0-9a-f]{2}")


def _raw_item_of(entry: Mapping[str, Any]) -> TlvItem:
    """A raw item from its object form; ``EncodeError`` (``raw_items``) if malformed."""
    tag, value, marker = entry.get("tag"), entry.get("value_hex"), entry.get("marker", 1)
    if (
        isinstance(tag, int)
        and isinstance(marker, int)
        and isinstance(value, str)
        and not isinstance(tag, bool)
        and not isinstance(marker, bool)
        and set(entry) <= {"tag", "value_hex", "marker"}
    ):
        return TlvItem(tag, value.upper(), marker)
    raise EncodeError(
        f"raw_items: expected {{tag, value_hex, marker}}, got {dict(entry)!r}",
        field="raw_items",
    )


def _order_of(value: Any) -> tuple[tuple[int, int], ...]:
    """``tlv_order`` from its list form; ``EncodeError`` unless ``[[tag, count], ...]``."""
    out = []
    for pair in value if isinstance(value, list | tuple) else [value]:
        if (
            not isinstance(pair, list | tuple)
            or len(pair) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
        ):
            raise EncodeError(
                f"tlv_order: expected [tag, count] pairs, got {value!r}", field="tlv_order"
            )
        out.append((pair[0], pair[1]))
    return tuple(out)


def _fits(kind: Kind, value: bytes) -> bool:
    try:
        kind.decode(value)
    except _UnfitError:
        return False
    return True


def tlv_fields(record: Any) -> dict[str, Any]:
    """Canonical fields of a record: typed fields, then ``tag_xx`` for raw items."""
    out = with_flags(_fields_of(record, record.TEXTS))
    out.pop("raw_items", None)
    out.pop("tlv_order", None)
    markers = set()
    for item in record.raw_items:
        markers.add(item.marker)
        key = f"tag_{item.tag:02x}"
        if key in out:
            previous = out[key]
            out[key] = (
                [*previous, item.value_hex]
                if isinstance(previous, list)
                else [
                    previous,
                    item.value_hex,
                ]
            )
        else:
            out[key] = item.value_hex
    if markers - {1}:
        out["tlv_markers"] = sorted(markers | {1})
    notes = record.field_notes()
    if notes:
        out["field_notes"] = notes
    return out


def exact_fields(record: Any, fields: dict[str, Any]) -> dict[str, Any]:
    """Add to ``fields`` (``record.to_fields()``) what they leave out of ``record``.

    ``to_fields`` is for reading: ``tag_xx`` keys group a repeated tag and show no
    marker, and the item order is not part of them. For a lossless form (the records
    of :func:`chargeproto.to_record`) this adds ``tlv_order`` when the items came in
    another order than the default, and ``raw_items`` as objects when the ``tag_xx``
    keys cannot give the raw items back (a marker other than 0x01, a repeated tag
    around another raw tag); then in every group item. ``from_fields`` reads both.
    """
    if record.tlv_order:
        fields["tlv_order"] = [list(pair) for pair in record.tlv_order]
    raw = record.raw_items
    first: dict[int, int] = {}
    for index, item in enumerate(raw):
        first.setdefault(item.tag, index)
    view = sorted(range(len(raw)), key=lambda i: (first[raw[i].tag], i))
    if view != list(range(len(raw))) or any(item.marker != 1 for item in raw):
        fields["raw_items"] = [
            {"tag": item.tag, "value_hex": item.value_hex, "marker": item.marker} for item in raw
        ]
    for spec in record.TAGS:
        value = getattr(record, spec.name, ABSENT)
        if spec.kind.is_group and isinstance(value, tuple):
            for item, item_fields in zip(value, fields.get(spec.name, ()), strict=True):
                exact_fields(item, item_fields)
    return fields


def decode_record(cls: type[_R], items: Sequence[RawItem], head: Mapping[str, Any]) -> _R:
    """Build a record of class ``cls`` from its items (``head``: frame-level fields)."""
    tag_map: Mapping[int, TagSpec] = cls.TAG_MAP  # type: ignore[attr-defined]
    values: dict[str, Any] = {}
    layout: list[tuple[int, int]] = []
    raw: list[TlvItem] = []
    for marker, tag, value, _ in items:
        spec = tag_map.get(tag)
        if spec is not None and marker == 1 and (spec.kind.is_list or spec.name not in values):
            try:
                decoded = spec.kind.decode(value)
            except _UnfitError:
                pass
            else:
                if spec.kind.is_list:
                    values.setdefault(spec.name, []).extend(decoded)
                    layout.append((tag, 1 if spec.kind.is_group else len(decoded)))
                else:
                    values[spec.name] = decoded
                    layout.append((tag, 0))
                continue
        raw.append(TlvItem(tag, value.hex().upper(), marker))
        layout.append((-1, 0))
    order = tuple(layout)
    if order == default_layout(cls, values, len(raw)):
        order = ()
    kwargs = cls.assemble(values)  # type: ignore[attr-defined]
    build: Any = cls
    result: _R = build(**head, **kwargs, raw_items=tuple(raw), tlv_order=order)
    return result


def decode_items(
    cls: type[_R],
    buf: bytes | bytearray | memoryview,
    start: int,
    end: int,
    head: Mapping[str, Any],
) -> _R:
    """:func:`parse_items` and :func:`decode_record` in one pass: the hot path.

    Plain integer tags (:attr:`_Record.PLAIN`) are read inline. The pass assumes the
    items come in the order the encoder writes by default (then ``tlv_order`` is
    empty); at the first item that shows otherwise it starts over with the general
    :func:`decode_record`, which records the order. Raises what ``parse_items`` raises.
    """
    payload = bytes(buf[start:end])
    known = _DECODED.get((cls, payload))
    if known is not None:  # the same items as a recent frame (periodic reports repeat)
        build_known: Any = cls
        kwargs_known, raw_known = known
        cached: _R = build_known(**head, **kwargs_known, raw_items=raw_known, tlv_order=())
        return cached
    tag_map: Mapping[int, TagSpec] = cls.TAG_MAP  # type: ignore[attr-defined]
    plain: Mapping[int, tuple[str, int, int, int, bytes]] = cls.PLAIN  # type: ignore[attr-defined]
    position: Mapping[int, int] = cls.TAG_POSITION  # type: ignore[attr-defined]
    values: dict[str, Any] = {}
    raw: list[TlvItem] = []
    last = -1
    off = start
    while off < end:
        size = buf[off]
        nxt = off + 1 + size
        if size < 2 or nxt > end:
            parse_items(buf, off, end)  # raises the error parse_items gives
        marker = buf[off + 1]
        tag = buf[off + 2]
        if marker == 1:
            fast = plain.get(tag)
            if fast is not None:
                name, value_size, divisor, pos, _ = fast
                if size - 2 == value_size and name not in values:
                    if raw or pos < last:
                        return decode_record(cls, parse_items(buf, start, end), head)
                    last = pos
                    number = int.from_bytes(buf[off + 3 : nxt], "big")
                    values[name] = number / divisor if divisor else number
                    off = nxt
                    continue
            else:
                spec = tag_map.get(tag)
                if spec is not None and (spec.kind.is_list or spec.name not in values):
                    try:
                        decoded = spec.kind.decode(bytes(buf[off + 3 : nxt]))
                    except _UnfitError:
                        pass
                    else:
                        pos = position[tag]
                        if raw or pos < last or (pos == last and not spec.kind.is_group):
                            return decode_record(cls, parse_items(buf, start, end), head)
                        last = pos
                        if spec.kind.is_list and spec.name in values:
                            values[spec.name].extend(decoded)
                        else:
                            values[spec.name] = decoded
                        off = nxt
                        continue
        raw.append(TlvItem(tag, bytes(buf[off + 3 : nxt]).hex().upper(), marker))
        off = nxt
    kwargs = cls.assemble(values)  # type: ignore[attr-defined]
    build: Any = cls
    items = tuple(raw)
    result: _R = build(**head, **kwargs, raw_items=items, tlv_order=())
    if all(type(v) in _SHAREABLE for v in kwargs.values()):
        if len(_DECODED) >= _DECODED_MAX:
            _DECODED.clear()
        _DECODED[(cls, payload)] = (kwargs, items)
    return result


#: the decoded arguments of recent payloads, by (class, payload bytes): a gateway's
#: periodic status reports repeat byte for byte. Only immutable values are kept (the
#: records are frozen; nested records come as tuples of them); bounded, cleared when full
_DECODED: dict[tuple[type, bytes], tuple[dict[str, Any], tuple[TlvItem, ...]]] = {}
_DECODED_MAX = 2048
_SHAREABLE = frozenset({int, float, str, bytes, bool, tuple, type(None)})


def default_layout(
    cls: Any, values: Mapping[str, Any], raw_count: int
) -> tuple[tuple[int, int], ...]:
    """The item layout the encoder writes when no ``tlv_order`` is given."""
    out: list[tuple[int, int]] = []
    for spec in cls.TAGS:
        if spec.name not in values:
            continue
        value = values[spec.name]
        if spec.kind.is_group:
            out.extend((spec.tag, 1) for _ in value)
        elif spec.kind.is_list:
            out.append((spec.tag, len(value)))
        else:
            out.append((spec.tag, 0))
    out.extend((-1, 0) for _ in range(raw_count))
    return tuple(out)


def encode_record(record: Any) -> bytes:
    """The items of a record, in ``tlv_order`` when it has one."""
    flat: dict[str, Any] = record.flatten()
    if not record.tlv_order:
        return _encode_default(record, flat)
    specs: tuple[TagSpec, ...] = record.TAGS
    tag_map: Mapping[int, TagSpec] = record.TAG_MAP
    remaining = {s.name: list(flat[s.name]) for s in specs if s.kind.is_list and s.name in flat}
    done: set[str] = set()
    parts: list[bytes] = []
    raw_items = list(record.raw_items)
    raw_next = 0

    def emit(spec: TagSpec, value: Any) -> None:
        parts.append(build_item(spec.tag, spec.kind.encode(value, spec.name), field=spec.name))

    def emit_list(spec: TagSpec, count: int | None) -> None:
        rest = remaining[spec.name]
        take = rest[:] if count is None else rest[:count]
        del rest[: len(take)]
        done.add(spec.name)
        if spec.kind.is_group:
            for entry in take:
                emit(spec, entry)
        else:
            emit(spec, take)

    for tag, count in record.tlv_order:
        if tag < 0:
            if raw_next < len(raw_items):
                parts.append(_raw_item(raw_items[raw_next]))
                raw_next += 1
            continue
        spec = tag_map.get(tag)
        if spec is None or spec.name not in flat:
            continue
        if spec.kind.is_list:
            if spec.kind.is_group and not remaining[spec.name]:
                continue
            emit_list(spec, 1 if spec.kind.is_group else count)
        elif spec.name not in done:
            emit(spec, flat[spec.name])
            done.add(spec.name)
    for spec in specs:
        if spec.name not in flat:
            continue
        if spec.kind.is_list:
            if spec.name not in done or remaining[spec.name]:
                emit_list(spec, None)
        elif spec.name not in done:
            emit(spec, flat[spec.name])
    parts.extend(_raw_item(item) for item in raw_items[raw_next:])
    return b"".join(parts)


def _encode_default(record: Any, flat: Mapping[str, Any]) -> bytes:
    """The items in the default order: the class's tags, then the raw items."""
    parts: list[bytes] = []
    plain: Mapping[int, tuple[str, int, int, int, bytes]] = record.PLAIN
    for spec in record.TAGS:
        name = spec.name
        if name not in flat:
            continue
        value = flat[name]
        fast = plain.get(spec.tag)
        if fast is not None:
            _, size, divisor, _, prefix = fast
            if divisor:
                number = spec.kind.conv.encode(value, name)
            elif isinstance(value, bool) or not isinstance(value, int):
                raise EncodeError(f"{name}: expected an integer, got {value!r}", field=name)
            else:
                number = value
            try:
                parts.append(prefix + number.to_bytes(size, "big"))
            except OverflowError:
                raise EncodeError(
                    f"{name}: {value!r} does not fit {size} bytes", field=name
                ) from None
        elif spec.kind.is_group:
            for entry in value:
                parts.append(build_item(spec.tag, spec.kind.encode(entry, name), field=name))
        else:
            parts.append(build_item(spec.tag, spec.kind.encode(value, name), field=name))
    parts.extend(_raw_item(item) for item in record.raw_items)
    return b"".join(parts)


def _raw_item(item: TlvItem) -> bytes:
    if not isinstance(item, TlvItem):
        raise EncodeError(f"raw_items: expected TlvItem, got {item!r}", field="raw_items")
    try:
        value = bytes.fromhex(item.value_hex)
    except (TypeError, ValueError):
        raise EncodeError(
            f"raw item value is not hex: {item.value_hex!r}", field="raw_items"
        ) from None
    return build_item(item.tag, value, item.marker, f"tag_{item.tag:02x}")


def _compile_tags(cls: Any, tags: Sequence[TagSpec], extra_names: Sequence[str] = ()) -> None:
    names = {f.name for f in dataclasses.fields(cls)} | set(extra_names)
    tag_map: dict[int, TagSpec] = {}
    for spec in tags:
        if spec.tag in tag_map:
            raise TypeError(f"{cls.__name__}: tag 0x{spec.tag:02X} declared twice")
        if spec.name.split("[")[0] not in names:
            raise TypeError(f"{cls.__name__}: tag 0x{spec.tag:02X} feeds no field {spec.name}")
        tag_map[spec.tag] = spec
    cls.TAGS = tuple(tags)
    cls.TAG_MAP = tag_map
    cls.TAG_POSITION = {spec.tag: i for i, spec in enumerate(tags)}
    cls.LIST_NAMES = tuple(spec.name for spec in tags if spec.kind.is_list)
    plain: dict[int, tuple[str, int, int, int, bytes]] = {}
    for i, spec in enumerate(tags):
        kind = spec.kind
        if type(kind) is UInt and (kind.conv is IDENTITY or type(kind.conv) is Scale):
            divisor = kind.conv.divisor if isinstance(kind.conv, Scale) else 0
            prefix = bytes((kind.size + 2, 1, spec.tag))
            plain[spec.tag] = (spec.name, kind.size, divisor, i, prefix)
    cls.PLAIN = plain


_C = TypeVar("_C")


def record(*tags: TagSpec) -> Callable[[_C], _C]:
    """Declare the tags of a group item class."""

    def declare(cls: _C) -> _C:
        _compile_tags(cls, tags)
        return cls

    return declare


@dataclasses.dataclass(frozen=True, slots=True)
class TlvRecord(_Record, BkvItem):
    """Base of the nested group items (a socket 0x94, a jack 0x5B)."""

    raw_items: tuple[TlvItem, ...] = dataclasses.field(default=(), kw_only=True)
    tlv_order: tuple[tuple[int, int], ...] = dataclasses.field(default=(), kw_only=True)

    def to_fields(self) -> dict[str, Any]:
        return tlv_fields(self)

    @classmethod
    def from_fields(cls: type[_G], fields: Mapping[str, Any]) -> _G:
        """Build from canonical names, ``tag_xx`` raw items included."""
        prepared = cls.raw_from_fields(strip_computed(cls, fields))
        return _from_fields(cls, prepared, cls.item_types())


_G = TypeVar("_G", bound=TlvRecord)


# --- group items and entries ------------------------------------------------------------


@record(
    _u(0x08, "port"),
    _u(0x09, "status_bits"),
    _u(0x0A, "business_no", 2),
    _u(0x95, "voltage_v", 2, DECI),
    _u(0x0B, "power_w", 2, DECI),
    _u(0x0C, "current_a", 2, MILLI),
    _u(0x0D, "energy_kwh", 2, MILLI),
    _u(0x0E, "duration_min", 2),
)
@dataclasses.dataclass(frozen=True, slots=True)
class JackStatus(TlvRecord):
    """One jack of a status cluster (group 0x5B)."""

    port: int | Absent = ABSENT
    status_bits: int | Absent = ABSENT
    business_no: int | Absent = ABSENT
    voltage_v: float | Absent = ABSENT
    power_w: float | Absent = ABSENT
    current_a: float | Absent = ABSENT
    energy_kwh: float | Absent = ABSENT
    duration_min: int | Absent = ABSENT


@record(
    _u(0x4A, "socket"),
    _u(0x3E, "firmware_version", 2),
    _u(0x07, "temperature_c"),
    _u(0x96, "signal_strength"),
    TagSpec(JACK_GROUP, "ports", Group(JackStatus)),
)
@dataclasses.dataclass(frozen=True, slots=True)
class SocketStatus(TlvRecord):
    """One socket of a status cluster (group 0x94) with its jacks."""

    socket: int | Absent = ABSENT
    firmware_version: int | Absent = ABSENT
    temperature_c: int | Absent = ABSENT
    signal_strength: int | Absent = ABSENT
    ports: tuple[JackStatus, ...] | Absent = ABSENT


@dataclasses.dataclass(frozen=True, slots=True)
class FeeTier(BkvItem):
    """A time-of-day fee tier (TLV 0x83): prices until ``end_time`` ("HH:MM")."""

    end_time: str
    electricity_price_cent_per_kwh: int
    service_price_cent_per_kwh: int


@dataclasses.dataclass(frozen=True, slots=True)
class TierUsage(BkvItem):
    """What one fee tier was used for (TLV 0x84); ``energy_raw``: unit not stated."""

    duration_min: int
    energy_raw: int


@dataclasses.dataclass(frozen=True, slots=True)
class EventPort(BkvItem):
    """One jack of an event report (tags 0x55/0x56, 0x4C/0x4D, 0x50-0x53, 0x57/0x58)."""

    port: int
    event_reason: int | Absent = ABSENT
    event_state: int | Absent = ABSENT
    leakage_current_raw: int | Absent = ABSENT
    over_temperature_c: int | Absent = ABSENT
    status_bits: int | Absent = ABSENT


_FEE_TIERS = TagSpec(0x83, "fee_tiers", Entries(FeeTier, "2sHH", (HHMM, IDENTITY, IDENTITY)))
_TIER_USAGE = TagSpec(0x84, "tier_usage", Entries(TierUsage, "HI", (IDENTITY, IDENTITY)))


# --- messages ----------------------------------------------------------------------------

HEADER_TAGS = (
    _u(0x01, "bkv_cmd", 2),
    _u(0x02, "bkv_seq", 8),
    TagSpec(0x03, "bkv_gateway_id", Fixed(7)),
)


@dataclasses.dataclass(frozen=True, slots=True)
class _TlvBase(_Record, BkvMessage):
    """Shared by every 0x1000 message: the header items and the raw-item bookkeeping."""

    bkv_seq: int | Absent = ABSENT
    bkv_gateway_id: str | Absent = ABSENT
    raw_items: tuple[TlvItem, ...] = dataclasses.field(default=(), kw_only=True)
    tlv_order: tuple[tuple[int, int], ...] = dataclasses.field(default=(), kw_only=True)

    def payload(self) -> bytes:
        return encode_record(self)

    def body_fields(self) -> dict[str, Any]:
        return tlv_fields(self)

    @classmethod
    def normalize_fields(cls, fields: dict[str, Any]) -> dict[str, Any]:
        return cls.raw_from_fields(super(_TlvBase, cls).normalize_fields(fields))


_T = TypeVar("_T", bound="type[TlvMessage]")


@dataclasses.dataclass(frozen=True, slots=True)
class TlvMessage(_TlvBase):
    """A 0x1000 message whose BKV command id (``bkv_cmd``) this library knows.

    Every typed field is optional (absent = the item is not sent). Build a server
    command with :meth:`create`, which fills ``bkv_seq`` and ``bkv_gateway_id`` from
    the frame the way the guide's examples do.
    """

    @property
    def bkv_cmd(self) -> int:
        """The BKV command id (item 0x01)."""
        assert self.key is not None
        return self.key

    @classmethod
    def create(cls: type[_S], gateway_id: str, seq: int, **fields: Any) -> _S:
        """A message with ``bkv_seq`` = ``seq`` and ``bkv_gateway_id`` = ``gateway_id``."""
        fields.setdefault("bkv_seq", seq)
        fields.setdefault("bkv_gateway_id", gateway_id)
        return cls(gateway_id=gateway_id, seq=seq, **fields)

    @classmethod
    def assemble(cls, values: dict[str, Any]) -> dict[str, Any]:
        values.pop("bkv_cmd", None)
        return super(TlvMessage, cls).assemble(values)

    def flatten(self) -> dict[str, Any]:
        out = super(TlvMessage, self).flatten()
        out["bkv_cmd"] = self.bkv_cmd
        return out

    def header_fields(self) -> dict[str, Any]:
        return {"bkv_cmd": self.bkv_cmd}


_S = TypeVar("_S", bound=TlvMessage)


def tlv(bkv_cmd: int, direction: Direction, *tags: TagSpec) -> Callable[[_T], _T]:
    """Declare a 0x1000 message for ``bkv_cmd`` in ``direction`` with its tags."""

    def declare(cls: _T) -> _T:
        cls.command = TLV
        cls.direction = direction
        cls.key = bkv_cmd
        _compile_tags(cls, HEADER_TAGS + tags, extra_names=("bkv_cmd",))
        registry_key = (TLV, bkv_cmd, direction)
        if registry_key in REGISTRY:
            raise TypeError(f"{cls.__name__}: {registry_key} is {REGISTRY[registry_key]}")
        REGISTRY[registry_key] = cls
        return cls

    return declare


class _ResultFlag:
    """``success`` for TLV messages with an optional ``result`` (0x0F)."""

    __slots__ = ()
    result: int | Absent

    @property
    def success(self) -> bool | Absent:
        """True when ``result`` is 1; ABSENT when the message carries no result."""
        if self.result is ABSENT:
            return ABSENT
        return self.result == 1

    def derived_fields(self) -> dict[str, Any]:
        if self.result is ABSENT:
            return {}
        return {"success": self.result == 1}


_RESULT_TAG = _u(0x0F, "result")
_SOCKET_TAG = _u(0x4A, "socket")
_PORT_TAG = _u(0x08, "port")
_RESULT_TEXTS: Mapping[str, Mapping[int, str]] = {"result": enums.RESULT}


# 9.4 status cluster


@tlv(0x1017, UP, TagSpec(SOCKET_GROUP, "sockets", Group(SocketStatus)))
@dataclasses.dataclass(frozen=True, slots=True)
class StatusCluster(TlvMessage):
    """0x1000/0x1017 socket status report, every 5 min and on change (9.4)."""

    sockets: tuple[SocketStatus, ...] | Absent = ABSENT


@tlv(0x1017, DOWN, _RESULT_TAG)
@dataclasses.dataclass(frozen=True, slots=True)
class StatusClusterAck(_ResultFlag, TlvMessage):
    """The server's ACK of a status cluster."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = _RESULT_TEXTS

    result: int | Absent = ABSENT


# 9.5 fee-mode control


@tlv(
    0x1007,
    DOWN,
    _SOCKET_TAG,
    _PORT_TAG,
    _u(0x13, "switch"),
    _u(0x12, "charge_mode"),
    _u(0x47, "control_type"),
    _u(0x88, "amount_cent", 2),
    _u(0x80, "service_fee_mode"),
    _u(0x89, "tier_count"),
    _FEE_TIERS,
)
@dataclasses.dataclass(frozen=True, slots=True)
class FeeModeControl(TlvMessage):
    """0x1000/0x1007 switch a jack in electricity + service-fee mode (9.5).

    ``charge_mode`` 4 = electricity + service fee; ``fee_tiers`` are time-of-day
    periods, the last ending at "23:59". ``tier_count`` is sent as its own item.
    """

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {
        "switch": enums.SWITCH,
        "charge_mode": enums.CHARGE_MODE,
        "service_fee_mode": enums.SERVICE_FEE_MODE,
    }

    socket: int | Absent = ABSENT
    port: int | Absent = ABSENT
    switch: int | Absent = ABSENT
    charge_mode: int | Absent = ABSENT
    control_type: int | Absent = ABSENT
    amount_cent: int | Absent = ABSENT
    service_fee_mode: int | Absent = ABSENT
    tier_count: int | Absent = ABSENT
    fee_tiers: tuple[FeeTier, ...] | Absent = ABSENT


@tlv(0x1007, UP, _SOCKET_TAG, _PORT_TAG, _RESULT_TAG, _u(0x0A, "business_no", 2))
@dataclasses.dataclass(frozen=True, slots=True)
class FeeModeControlReply(_ResultFlag, TlvMessage):
    """The socket's answer to 0x1007 (not shown in the guide; any item is kept)."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = _RESULT_TEXTS

    socket: int | Absent = ABSENT
    port: int | Absent = ABSENT
    result: int | Absent = ABSENT
    business_no: int | Absent = ABSENT


# 9.6 fee-mode end report


@tlv(
    0x1004,
    UP,
    _u(0x07, "temperature_c"),
    _SOCKET_TAG,
    _PORT_TAG,
    _u(0x09, "status_bits"),
    _u(0x0A, "business_no", 2),
    _u(0x0B, "power_w", 2, DECI),
    _u(0x0C, "current_a", 2, MILLI),
    _u(0x0D, "energy_kwh", 2, MILLI),
    _u(0x0E, "duration_min", 2),
    TagSpec(0x2E, "end_time", Fixed(7, BCD_TIME)),
    _u(0x2F, "end_reason"),
    _u(0x12, "charge_mode"),
    _u(0x85, "electricity_fee_cent", 2),
    _u(0x86, "service_fee_cent", 2),
    _u(0x89, "tier_count"),
    _TIER_USAGE,
)
@dataclasses.dataclass(frozen=True, slots=True)
class FeeModeEndReport(TlvMessage):
    """0x1000/0x1004 end of an electricity + service-fee session (9.6); ACK it after
    the settlement is committed (:class:`FeeModeEndAck`)."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {
        "charge_mode": enums.CHARGE_MODE,
        "end_reason": enums.END_REASONS.as_dict(),
    }

    temperature_c: int | Absent = ABSENT
    socket: int | Absent = ABSENT
    port: int | Absent = ABSENT
    status_bits: int | Absent = ABSENT
    business_no: int | Absent = ABSENT
    power_w: float | Absent = ABSENT
    current_a: float | Absent = ABSENT
    energy_kwh: float | Absent = ABSENT
    duration_min: int | Absent = ABSENT
    end_time: str | Absent = ABSENT
    end_reason: int | Absent = ABSENT
    charge_mode: int | Absent = ABSENT
    electricity_fee_cent: int | Absent = ABSENT
    service_fee_cent: int | Absent = ABSENT
    tier_count: int | Absent = ABSENT
    tier_usage: tuple[TierUsage, ...] | Absent = ABSENT


@tlv(0x1004, DOWN, _RESULT_TAG, _SOCKET_TAG, _PORT_TAG)
@dataclasses.dataclass(frozen=True, slots=True)
class FeeModeEndAck(_ResultFlag, TlvMessage):
    """The server's ACK of a fee-mode end report: result, socket, port."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = _RESULT_TEXTS

    result: int | Absent = ABSENT
    socket: int | Absent = ABSENT
    port: int | Absent = ABSENT


# 9.7 parameters

_PARAM_TAGS = {
    "full_charge_power_w": _u(0x23, "full_charge_power_w", 2, DECI),
    "trickle_threshold_pct": _u(0x60, "trickle_threshold_pct"),
    "full_charge_delay_s": _u(0x21, "full_charge_delay_s", 2),
    "no_load_power_w": _u(0x24, "no_load_power_w", 2, DECI),
    "no_load_delay_s": _u(0x22, "no_load_delay_s", 2),
    "max_charge_duration_min": _u(0x59, "max_charge_duration_min", 2),
    "high_temperature_c": _u(0x25, "high_temperature_c"),
    "power_limit_w": _u(0x11, "power_limit_w", 2, DECI),
    "overcurrent_limit_a": _u(0x10, "overcurrent_limit_a", 2, MILLI),
    "key_base_amount_cent": _u(0x68, "key_base_amount_cent", 4),
    "anti_pulse_time_raw": _u(0x93, "anti_pulse_time_raw", 2),
}
#: the order of the 0x1011 example
_SET_ORDER = (
    "full_charge_delay_s",
    "no_load_delay_s",
    "full_charge_power_w",
    "no_load_power_w",
    "high_temperature_c",
    "power_limit_w",
    "max_charge_duration_min",
    "trickle_threshold_pct",
    "overcurrent_limit_a",
    "key_base_amount_cent",
    "anti_pulse_time_raw",
)


@dataclasses.dataclass(frozen=True, slots=True)
class _Params(TlvMessage):
    """The socket parameters of 0x1011/0x1012 (9.7); send only those to change."""

    socket: int | Absent = ABSENT
    full_charge_power_w: float | Absent = ABSENT
    trickle_threshold_pct: int | Absent = ABSENT
    full_charge_delay_s: int | Absent = ABSENT
    no_load_power_w: float | Absent = ABSENT
    no_load_delay_s: int | Absent = ABSENT
    max_charge_duration_min: int | Absent = ABSENT
    high_temperature_c: int | Absent = ABSENT
    power_limit_w: float | Absent = ABSENT
    overcurrent_limit_a: float | Absent = ABSENT
    key_base_amount_cent: int | Absent = ABSENT
    anti_pulse_time_raw: int | Absent = ABSENT


@tlv(0x1011, DOWN, _SOCKET_TAG, *(_PARAM_TAGS[n] for n in _SET_ORDER))
@dataclasses.dataclass(frozen=True, slots=True)
class SetParams(_Params):
    """0x1000/0x1011 set socket parameters (9.7). Only the seven parameters of the
    guide's example are known to be writable; the others are accepted untested."""


@tlv(0x1011, UP, _SOCKET_TAG, _RESULT_TAG)
@dataclasses.dataclass(frozen=True, slots=True)
class SetParamsReply(_ResultFlag, TlvMessage):
    """The socket's answer to 0x1011: socket and result."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = _RESULT_TEXTS

    socket: int | Absent = ABSENT
    result: int | Absent = ABSENT


@tlv(0x1012, DOWN, _SOCKET_TAG)
@dataclasses.dataclass(frozen=True, slots=True)
class QueryParams(TlvMessage):
    """0x1000/0x1012 ask a socket for its parameters (9.7)."""

    socket: int | Absent = ABSENT


@tlv(0x1012, UP, _SOCKET_TAG, _RESULT_TAG, *_PARAM_TAGS.values())
@dataclasses.dataclass(frozen=True, slots=True)
class ParamsReport(_ResultFlag, _Params):
    """The socket's parameters, answering 0x1012. Tags 0x98-0x9B (meaning not given)
    stay raw: ``tag_98`` ... ``tag_9b`` in ``to_fields()``."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = _RESULT_TEXTS

    result: int | Absent = ABSENT


# 9.8 event report

_EVENT_PORT_FIELDS = {
    "event_reason": (0x55, 1),
    "event_state": (0x4C, 1),
    "leakage_current_raw": (0x50, 2),
    "over_temperature_c": (0x52, 1),
    "status_bits": (0x57, 1),
}
#: jack-level tags: jack A is the first tag of each pair, jack B the second
_EVENT_PORTS = 2


def _port_tag(name: str, port: int) -> TagSpec:
    tag, size = _EVENT_PORT_FIELDS[name]
    return _u(tag + port, f"ports[{port}].{name}", size)


@tlv(
    0x1010,
    UP,
    _SOCKET_TAG,
    _u(0x54, "socket_event_reason"),
    _u(0x4B, "socket_event_state"),
    _port_tag("event_reason", 0),
    _port_tag("event_state", 0),
    _port_tag("event_reason", 1),
    _port_tag("event_state", 1),
    _u(0x4E, "overvoltage_v", 2, DECI),
    _u(0x4F, "undervoltage_v", 2, DECI),
    _port_tag("leakage_current_raw", 0),
    _port_tag("leakage_current_raw", 1),
    _port_tag("over_temperature_c", 0),
    _port_tag("over_temperature_c", 1),
    _port_tag("status_bits", 0),
    _port_tag("status_bits", 1),
)
@dataclasses.dataclass(frozen=True, slots=True)
class EventReport(TlvMessage):
    """0x1000/0x1010 socket event (fault) report (9.8); reason codes are unpublished.

    The jack-level tags come in pairs (jack A, jack B) and are gathered into
    ``ports`` (one :class:`EventPort` per jack that has any of them, ``port`` 0 or 1).
    """

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {
        "socket_event_reason": enums.EVENT_REASONS.as_dict()
    }

    socket: int | Absent = ABSENT
    socket_event_reason: int | Absent = ABSENT
    socket_event_state: int | Absent = ABSENT
    ports: tuple[EventPort, ...] | Absent = ABSENT
    overvoltage_v: float | Absent = ABSENT
    undervoltage_v: float | Absent = ABSENT

    @classmethod
    def item_types(cls) -> Mapping[str, type[Item]]:
        return {"ports": EventPort}

    @classmethod
    def assemble(cls, values: dict[str, Any]) -> dict[str, Any]:
        plain: dict[str, Any] = {}
        ports: dict[int, dict[str, Any]] = {}
        for name, value in values.items():
            if name.startswith("ports["):
                index, field = int(name[6]), name.split(".", 1)[1]
                ports.setdefault(index, {})[field] = value
            else:
                plain[name] = value
        out = super(EventReport, cls).assemble(plain)
        if ports:
            out["ports"] = tuple(EventPort(port=i, **ports[i]) for i in sorted(ports))
        return out

    def flatten(self) -> dict[str, Any]:
        out = super(EventReport, self).flatten()
        for entry in () if self.ports is ABSENT else self.ports:
            if not isinstance(entry, EventPort) or entry.port not in range(_EVENT_PORTS):
                raise EncodeError(
                    f"ports: {entry!r} is not an EventPort of jack 0 or 1", field="ports"
                )
            for name in _EVENT_PORT_FIELDS:
                value = getattr(entry, name)
                key = f"ports[{entry.port}].{name}"
                if value is ABSENT:
                    continue
                if key in out:
                    raise EncodeError(f"ports: jack {entry.port} given twice", field="ports")
                out[key] = value
        return out


@tlv(0x1010, DOWN, _SOCKET_TAG, _RESULT_TAG)
@dataclasses.dataclass(frozen=True, slots=True)
class EventReportAck(_ResultFlag, TlvMessage):
    """The server's ACK of an event report."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = _RESULT_TEXTS

    socket: int | Absent = ABSENT
    result: int | Absent = ABSENT


# --- unknown command ids ----------------------------------------------------------------

#: the tags whose meaning the guide gives once for every command (bkv.md 9.3), in the
#: order a generic container writes them: socket and port first (as in every
#: socket-level example), then by tag. Left out: the header items, the jack group 0x5B
#: (it lives inside 0x94) and the per-jack pairs of the event report (0x4C/0x4D,
#: 0x50-0x53, 0x55-0x58), which name a jack by their tag rather than by a port field.
GLOBAL_TAGS: tuple[TagSpec, ...] = (
    _SOCKET_TAG,
    _PORT_TAG,
    _u(0x07, "temperature_c"),
    _u(0x09, "status_bits"),
    _u(0x0A, "business_no", 2),
    _u(0x0B, "power_w", 2, DECI),
    _u(0x0C, "current_a", 2, MILLI),
    _u(0x0D, "energy_kwh", 2, MILLI),
    _u(0x0E, "duration_min", 2),
    _RESULT_TAG,
    _PARAM_TAGS["overcurrent_limit_a"],
    _PARAM_TAGS["power_limit_w"],
    _u(0x12, "charge_mode"),
    _u(0x13, "switch"),
    _PARAM_TAGS["full_charge_delay_s"],
    _PARAM_TAGS["no_load_delay_s"],
    _PARAM_TAGS["full_charge_power_w"],
    _PARAM_TAGS["no_load_power_w"],
    _PARAM_TAGS["high_temperature_c"],
    TagSpec(0x2E, "end_time", Fixed(7, BCD_TIME)),
    _u(0x2F, "end_reason"),
    _u(0x3E, "firmware_version", 2),
    _u(0x47, "control_type"),
    _u(0x4B, "socket_event_state"),
    _u(0x4E, "overvoltage_v", 2, DECI),
    _u(0x4F, "undervoltage_v", 2, DECI),
    _u(0x54, "socket_event_reason"),
    _PARAM_TAGS["max_charge_duration_min"],
    _PARAM_TAGS["trickle_threshold_pct"],
    _PARAM_TAGS["key_base_amount_cent"],
    _u(0x80, "service_fee_mode"),
    _FEE_TIERS,
    _TIER_USAGE,
    _u(0x85, "electricity_fee_cent", 2),
    _u(0x86, "service_fee_cent", 2),
    _u(0x88, "amount_cent", 2),
    _u(0x89, "tier_count"),
    _PARAM_TAGS["anti_pulse_time_raw"],
    TagSpec(SOCKET_GROUP, "sockets", Group(SocketStatus)),
    _u(0x95, "voltage_v", 2, DECI),
    _u(0x96, "signal_strength"),
)


@dataclasses.dataclass(frozen=True, slots=True)
class TlvContainer(_ResultFlag, _TlvBase):
    """A 0x1000 container whose BKV command id (or direction) has no class, such as
    the 0x1013 real gateways send after connecting (bkv.md 15).

    The tags with one meaning in every command (:data:`GLOBAL_TAGS`: ``socket``,
    ``port``, ``result``, the readings, the parameters ...) are decoded into their
    named fields; every other item is kept raw (``tag_xx``), and the item order is
    kept (``tlv_order``), so the frame re-encodes byte for byte.
    """

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {
        "result": enums.RESULT,
        "switch": enums.SWITCH,
        "charge_mode": enums.CHARGE_MODE,
        "service_fee_mode": enums.SERVICE_FEE_MODE,
        "end_reason": enums.END_REASONS.as_dict(),
        "socket_event_reason": enums.EVENT_REASONS.as_dict(),
    }

    bkv_cmd: int | Absent = ABSENT
    unknown_direction: Direction = Direction.UP
    _: dataclasses.KW_ONLY
    socket: int | Absent = ABSENT
    port: int | Absent = ABSENT
    temperature_c: int | Absent = ABSENT
    status_bits: int | Absent = ABSENT
    business_no: int | Absent = ABSENT
    power_w: float | Absent = ABSENT
    current_a: float | Absent = ABSENT
    energy_kwh: float | Absent = ABSENT
    duration_min: int | Absent = ABSENT
    result: int | Absent = ABSENT
    overcurrent_limit_a: float | Absent = ABSENT
    power_limit_w: float | Absent = ABSENT
    charge_mode: int | Absent = ABSENT
    switch: int | Absent = ABSENT
    full_charge_delay_s: int | Absent = ABSENT
    no_load_delay_s: int | Absent = ABSENT
    full_charge_power_w: float | Absent = ABSENT
    no_load_power_w: float | Absent = ABSENT
    high_temperature_c: int | Absent = ABSENT
    end_time: str | Absent = ABSENT
    end_reason: int | Absent = ABSENT
    firmware_version: int | Absent = ABSENT
    control_type: int | Absent = ABSENT
    socket_event_state: int | Absent = ABSENT
    overvoltage_v: float | Absent = ABSENT
    undervoltage_v: float | Absent = ABSENT
    socket_event_reason: int | Absent = ABSENT
    max_charge_duration_min: int | Absent = ABSENT
    trickle_threshold_pct: int | Absent = ABSENT
    key_base_amount_cent: int | Absent = ABSENT
    service_fee_mode: int | Absent = ABSENT
    fee_tiers: tuple[FeeTier, ...] | Absent = ABSENT
    tier_usage: tuple[TierUsage, ...] | Absent = ABSENT
    electricity_fee_cent: int | Absent = ABSENT
    service_fee_cent: int | Absent = ABSENT
    amount_cent: int | Absent = ABSENT
    tier_count: int | Absent = ABSENT
    anti_pulse_time_raw: int | Absent = ABSENT
    sockets: tuple[SocketStatus, ...] | Absent = ABSENT
    voltage_v: float | Absent = ABSENT
    signal_strength: int | Absent = ABSENT

    @property
    def wire_direction(self) -> Direction:
        return self.unknown_direction

    @classmethod
    def normalize_fields(cls, fields: dict[str, Any]) -> dict[str, Any]:
        """``direction`` becomes ``unknown_direction``; ``bkv_cmd`` is a field here."""
        fields = strip_computed(cls, fields)
        expect_value(cls, fields, "command", TLV)
        if "direction" in fields:
            fields["unknown_direction"] = fields.pop("direction")
        if "unknown_direction" in fields:
            fields["unknown_direction"] = as_direction(fields["unknown_direction"])
        return cls.raw_from_fields(fields)


TlvContainer.command = TLV
TlvContainer.direction = Direction.UP
_compile_tags(TlvContainer, HEADER_TAGS + GLOBAL_TAGS)


def first_bkv_cmd(items: Sequence[RawItem]) -> int | None:
    """The BKV command id: the first item 0x01 with marker 0x01 and a 2-byte value."""
    for marker, tag, value, _ in items:
        if tag == 0x01 and marker == 1 and len(value) == 2:
            return int.from_bytes(value, "big")
    return None


def decode_tlv(
    buf: bytes | bytearray | memoryview,
    start: int,
    end: int,
    *,
    gateway_id: str,
    seq: int,
    direction: Direction,
) -> _TlvBase:
    """Decode a 0x1000 payload ``buf[start:end]`` into its message class."""
    if end - start >= 5 and buf[start] == 4 and buf[start + 1] == 1 and buf[start + 2] == 1:
        bkv_cmd: int | None = buf[start + 3] << 8 | buf[start + 4]  # the usual first item
    else:
        bkv_cmd = first_bkv_cmd(parse_items(buf, start, end))
    cls = REGISTRY.get((TLV, bkv_cmd, direction)) if bkv_cmd is not None else None
    head: dict[str, Any] = {"gateway_id": gateway_id, "seq": seq}
    if cls is None:
        head["unknown_direction"] = direction
        return decode_items(TlvContainer, buf, start, end, head)
    assert issubclass(cls, TlvMessage)
    return decode_items(cls, buf, start, end, head)
