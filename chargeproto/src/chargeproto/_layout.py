"""From a construct declaration to a fast, generated codec.

A message class declares its payload once, as a ``construct.Struct`` of raw wire
values with canonical names, plus a table of unit converters. This module reads that
declaration and generates two plain Python functions from it (the way ``dataclasses``
generates ``__init__``): a decoder built on ``struct.unpack_from`` and an encoder
built on ``struct.pack``. Generation happens on the first use of a message class
(:class:`LazyCodec`), so importing the library compiles nothing. The hot path
therefore runs no construct code at all, while the construct declaration stays the
single source of truth; the test suite checks the generated code against construct's
own (compiled) parser.

Supported declaration elements, in a top-level ``Struct``:

* ``"name" / Int8ul`` (any ``FormatField``) and ``"name" / Bytes(n)``;
* ``"name" / Array(n or this.count, FormatField)``; fields named ``"list[].field"``
  with the same count are zipped into a tuple of :class:`~chargeproto._base.Item`;
* ``"name" / Array(this.count, Struct(...fixed fields...))`` -> tuple of items;
* ``"name" / GreedyRange(Struct(...fixed fields...))``: as many records as the
  payload holds (a partial record at the end is kept as ``trailing_hex``);
* ``"name" / Bytes(this.count)`` and ``"name" / GreedyBytes`` (last only);
* :func:`optional_tail` for the fields that older firmware leaves out.

Count fields referenced with ``this.<count>`` are not message fields: they are
derived from the length of their list on encoding and reported by ``to_fields``.
Bytes after the last declared field are kept as ``trailing_hex``.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import construct as cs

from ._base import ABSENT, Item, Message
from ._errors import EncodeError, TruncatedError
from ._units import HEX, IDENTITY, RUNTIME, Ascii, Converter, Hex

OPT_PREFIX = "_opt"


def optional_tail(*fields: cs.Renamed | tuple[cs.Renamed, ...]) -> cs.Renamed:
    """Declare fields that may be missing at the end of a payload.

    Each element is a field, or a tuple of fields that are present or absent together
    (a count and its array). Fields are taken in order while bytes remain: the first
    one that does not fit ends the payload, and so in construct terms the tail is a
    chain of nested ``Optional(Struct(...))``.
    """
    tail: cs.Renamed | None = None
    for depth in range(len(fields) - 1, -1, -1):
        group = fields[depth]
        members = list(group) if isinstance(group, tuple) else [group]
        try:
            size: int | None = sum(m.sizeof() for m in members)
        except cs.SizeofError:
            size = None
        if tail is not None:
            members.append(tail)
        tail = f"{OPT_PREFIX}{depth}" / _OptionalGroup(cs.Struct(*members), size)
    assert tail is not None
    return tail


class _OptionalGroup(cs.Select):  # type: ignore[misc]
    """``Optional(subcon)`` that construct can compile.

    construct 2.10 cannot compile ``Select``: with a plain ``Optional`` every message
    with an optional tail fell back to construct's interpreter. ``size`` is the group's
    own fixed size (None if variable): such a group is present only when that many
    bytes remain, because construct's compiled ``Bytes(n)`` accepts a short read.
    """

    def __init__(self, subcon: cs.Construct, size: int | None) -> None:
        super().__init__(subcon, cs.Pass)
        self.size = size

    def _emitparse(self, code: Any) -> str:
        fname = f"parse_optional_{code.allocateId()}"
        check = ""
        if self.size is not None:
            check = (
                "here = io.tell(); left = io.seek(0, 2) - here; io.seek(here)\n"
                f"                if left < {self.size}: return None"
            )
        code.append(f"""
            def {fname}(io, this):
                {check}
                fallback = io.tell()
                try:
                    return {self.subcons[0]._compileparse(code)}
                except ExplicitError:
                    raise
                except Exception:
                    io.seek(fallback)
                    return None
        """)
        return f"{fname}(io, this)"

    def _emitbuild(self, code: Any) -> str:
        fname = f"build_optional_{code.allocateId()}"
        code.append(f"""
            def {fname}(obj, io, this):
                if obj is None:
                    return None
                return {self.subcons[0]._compilebuild(code)}
        """)
        return f"{fname}(obj, io, this)"


# --- the flat plan of a declaration -------------------------------------------------


@dataclasses.dataclass
class WireField:
    """One field of a payload, flattened out of the construct declaration."""

    name: str
    kind: str  # "fixed" | "array" | "vbytes" | "records" | "greedy"
    fmt: str = ""  # struct code of the field or of one array element ("H", "16s")
    size: int = 0  # size of the field or of one element / record
    count: str | int | None = None  # array length: a field name or a constant
    group: int = -1  # optional group index; -1 = required
    record: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def _field_of(name: str, sub: Any, endian: str, group: int) -> WireField:
    if isinstance(sub, cs.FormatField):
        fmt = sub.fmtstr[1:]
        return WireField(name, "fixed", fmt, struct.calcsize(endian + fmt), group=group)
    if isinstance(sub, cs.Bytes):
        if isinstance(sub.length, int):
            return WireField(name, "fixed", f"{sub.length}s", sub.length, group=group)
        return WireField(name, "vbytes", "s", 1, count=_path_name(sub.length), group=group)
    if isinstance(sub, type(cs.GreedyBytes)):
        return WireField(name, "greedy", group=group)
    if isinstance(sub, cs.Array | cs.GreedyRange):
        count: str | int | None = None
        if isinstance(sub, cs.Array):
            count = sub.count if isinstance(sub.count, int) else _path_name(sub.count)
        item = sub.subcon
        if isinstance(item, cs.FormatField) and count is not None:
            fmt = item.fmtstr[1:]
            return WireField(name, "array", fmt, struct.calcsize(endian + fmt), count, group)
        if isinstance(item, cs.Struct):
            record = []
            for member in item.subcons:
                inner = _field_of(member.name, member.subcon, endian, group)
                if inner.kind != "fixed":
                    raise TypeError(f"{name}: records may hold fixed fields only")
                record.append((member.name, inner.fmt))
            fmt = "".join(f for _, f in record)
            return WireField(
                name, "records", fmt, struct.calcsize(endian + fmt), count, group, record
            )
    raise TypeError(f"{name}: construct element {sub!r} is not supported by the layout compiler")


def _path_name(path: Any) -> str:
    field = vars(path).get("_Path__field")
    if not isinstance(field, str):
        raise TypeError(f"count {path!r} must be this.<field>")
    return field


def flatten(wire: cs.Struct, endian: str) -> list[WireField]:
    """The fields of a declaration in wire order, optional groups numbered."""
    out: list[WireField] = []

    def walk(struct_: cs.Struct, group: int) -> None:
        for member in struct_.subcons:
            sub = member.subcon
            if member.name and member.name.startswith(OPT_PREFIX):
                assert isinstance(sub, cs.Select)
                walk(sub.subcons[0], int(member.name[len(OPT_PREFIX) :]))
            else:
                out.append(_field_of(member.name, sub, endian, group))

    walk(wire, -1)
    return out


# --- compiling a message class --------------------------------------------------------


class Codec:
    """The generated decoder and encoder of one message class.

    ``decode(buf, start, end, *head)`` reads the payload ``buf[start:end]`` and returns
    the message, with ``head`` (the frame-level fields) as its first fields.
    ``encode(message)`` returns the payload bytes.
    """

    def __init__(
        self,
        cls: type[Message],
        wire: cs.Struct,
        *,
        endian: str,
        head: Sequence[str],
        units: Mapping[str, Converter],
        items: Mapping[str, type[Item]],
    ) -> None:
        self.cls = cls
        self.wire = wire
        self.endian = endian
        self.head = tuple(head)
        self.units = dict(units)
        self.items = dict(items)
        self.fields = flatten(wire, endian)
        self.counts = {
            f.count: f.name.split("[]")[0] for f in self.fields if isinstance(f.count, str)
        }
        self._check_declaration()
        self.decode_source, self.encode_source, consts = _generate(self)
        namespace: dict[str, Any] = {
            "_cls": cls,
            "ABSENT": ABSENT,
            "_trunc": _truncated,
            "_unpack_from": struct.unpack_from,
            "_pack": struct.pack,
            "_present": _present,
            "_fixhex": _fixhex,
            "_fixascii": _fixascii,
            "_fixbytes": _fixbytes,
            **RUNTIME,
            **{f"_I_{k}": v for k, v in self.items.items()},
            **consts,
        }
        exec(compile(self.decode_source, f"<decode {cls.__name__}>", "exec"), namespace)
        exec(compile(self.encode_source, f"<encode {cls.__name__}>", "exec"), namespace)
        self.decode: Callable[..., Any] = namespace["decode"]
        self._encode: Callable[[Any], bytes] = namespace["encode"]

    def encode(self, message: Message) -> bytes:
        """The payload bytes of ``message``; ``EncodeError`` names a bad field."""
        try:
            return self._encode(message)
        except EncodeError:
            raise
        except (struct.error, TypeError, ValueError, AttributeError, OverflowError) as exc:
            self._blame(message)
            raise EncodeError(f"{type(message).__name__}: {exc}") from None

    def converter(self, name: str) -> Converter:
        return self.units.get(name, IDENTITY)

    def _check_declaration(self) -> None:
        names = {f.name for f in dataclasses.fields(self.cls)}
        for wf in self.fields:
            typed = self.typed_name(wf)
            if typed is not None and typed not in names:
                raise TypeError(f"{self.cls.__name__}: wire field {wf.name} has no field {typed}")

    def typed_name(self, wf: WireField) -> str | None:
        """The message field a wire field feeds (None for derived counts)."""
        if wf.name in self.counts:
            return None
        return wf.name.split("[]")[0]

    def _blame(self, message: Message) -> None:
        """Re-check every field slowly to name the one that failed to encode."""
        for wf in self.fields:
            typed = self.typed_name(wf)
            if typed is None:
                continue
            value = getattr(message, typed)
            if value is ABSENT:
                continue
            if wf.kind in ("vbytes", "greedy"):
                HEX.encode(value, typed)
            elif wf.kind == "fixed" and wf.fmt.endswith("s"):
                conv = self.converter(wf.name)
                if isinstance(conv, Ascii):
                    _fixascii(value, wf.size, typed, conv)
                else:
                    _fixhex(value, wf.size, typed)
            elif wf.kind == "fixed":
                raw = self.converter(wf.name).encode(value, wf.name)
                _check_range(self.endian, wf, raw)
            elif wf.kind == "array" and "[]" not in wf.name:
                for i, element in enumerate(value):
                    self._check_element(wf, f"{typed}[{i}]", wf.name, wf.fmt, element)
            else:  # per-item values: "ports[].power_w" arrays or records
                members = wf.record or [(wf.name.split("[].")[1], wf.fmt)]
                for i, item in enumerate(value):
                    for member, fmt in members:
                        path = f"{typed}[{i}].{member}"
                        element = getattr(item, member)
                        self._check_element(wf, path, f"{typed}[].{member}", fmt, element)
        for count, target in self.counts.items():
            wf = next(f for f in self.fields if f.name == count)
            value = getattr(message, target)
            if value is not ABSENT:
                _check_range(
                    self.endian,
                    dataclasses.replace(wf, name=target),
                    len(HEX.encode(value, target)) if isinstance(value, str) else len(value),
                )

    def _check_element(self, wf: WireField, path: str, unit: str, fmt: str, value: Any) -> None:
        if fmt.endswith("s"):
            _fixhex(value, int(fmt[:-1]), path)
            return
        raw = self.converter(unit).encode(value, path)
        _check_range(self.endian, dataclasses.replace(wf, name=path, fmt=fmt), raw)

    # -- introspection, used by the CLI's table output and by tests --

    def spans(self, buf: bytes, start: int, end: int) -> list[tuple[str, int, int]]:
        """(wire field, offset from payload start, size) of each field present."""
        out: list[tuple[str, int, int]] = []
        off = start
        raw: dict[str, Any] = {}
        stopped_group = None
        for wf in self.fields:
            if wf.group >= 0 and stopped_group is not None:
                break
            if wf.kind == "fixed":
                size = wf.size
            elif wf.kind == "greedy":
                size = end - off
            else:
                if wf.count is None:
                    count = (end - off) // wf.size
                elif isinstance(wf.count, int):
                    count = wf.count
                else:
                    count = int(raw.get(wf.count, 0))
                size = count * wf.size
            if end - off < size:
                if wf.group >= 0:
                    stopped_group = wf.group
                    # a group is all or nothing
                    while out and self._group_of(out[-1][0]) == wf.group:
                        out.pop()
                        off = start + (out[-1][1] + out[-1][2] if out else 0)
                    break
                out.append((wf.name, off - start, end - off))
                return out
            if wf.kind == "fixed" and wf.fmt[-1] != "s":
                raw[wf.name] = struct.unpack_from(self.endian + wf.fmt, buf, off)[0]
            out.append((wf.name, off - start, size))
            off += size
        if off < end:
            out.append(("trailing_hex", off - start, end - off))
        return out

    def _group_of(self, name: str) -> int:
        for wf in self.fields:
            if wf.name == name:
                return wf.group
        return -1


def _truncated(cls_name: str, field: str, offset: int, need: int, have: int) -> TruncatedError:
    return TruncatedError(
        f"{cls_name}: payload ends inside {field} (needs {need} bytes, {have} left)",
        offset=offset,
        expected=need,
        actual=have,
    )


def _present(values: tuple[Any, ...], names: tuple[str, ...]) -> int:
    """How many leading optional values are present; a gap is an error."""
    count = 0
    for value in values:
        if value is ABSENT:
            break
        count += 1
    for index in range(count, len(values)):
        if values[index] is not ABSENT:
            raise EncodeError(
                f"{names[index]} is set but {names[count]} before it is absent: "
                "optional fields are sent in order",
                field=names[index],
            )
    return count


def _fixhex(value: str, size: int, field: str) -> bytes:
    raw = HEX.encode(value, field)
    if len(raw) != size:
        raise EncodeError(f"{field}: expected {size} bytes, got {len(raw)}", field=field)
    return bytes(raw)


def _fixbytes(raw: bytes, size: int, field: str) -> bytes:
    if len(raw) != size:
        raise EncodeError(f"{field}: expected {size} bytes, got {len(raw)}", field=field)
    return raw


def _fixascii(value: str, size: int, field: str, conv: Ascii) -> bytes:
    raw = conv.encode(value, field)
    if len(raw) > size:
        raise EncodeError(f"{field}: at most {size} characters, got {len(raw)}", field=field)
    return bytes(raw)


def _check_range(endian: str, wf: WireField, raw: Any) -> None:
    try:
        struct.pack(endian + wf.fmt, raw)
    except struct.error:
        raise EncodeError(
            f"{wf.name}: {raw!r} does not fit the wire field", field=wf.name
        ) from None


# --- code generation ------------------------------------------------------------------


def _generate(codec: Codec) -> tuple[str, str, dict[str, Any]]:
    encoder = _EncodeWriter(codec)
    return _DecodeWriter(codec).source(), encoder.source(), encoder.consts


class _Writer:
    def __init__(self, codec: Codec) -> None:
        self.c = codec
        self.lines: list[str] = []
        self.var: dict[str, str] = {}  # wire field name -> variable holding the raw value
        self.consts: dict[str, Any] = {}

    def emit(self, depth: int, line: str) -> None:
        self.lines.append("    " * depth + line)

    def fmt(self, fmt: str) -> str:
        return repr(self.c.endian + fmt)

    def groups(self) -> tuple[list[WireField], list[list[WireField]]]:
        required = [f for f in self.c.fields if f.group < 0]
        optional: dict[int, list[WireField]] = {}
        for f in self.c.fields:
            if f.group >= 0:
                optional.setdefault(f.group, []).append(f)
        return required, [optional[k] for k in sorted(optional)]

    def conv_decode(self, name: str, operand: str, fmt: str) -> str:
        conv = self.c.converter(name)
        if fmt.endswith("s") and conv is IDENTITY:
            conv = HEX
        return conv.decode_expr.format(operand)


class _DecodeWriter(_Writer):
    def source(self) -> str:
        c = self.c
        head = ", ".join(c.head)
        self.emit(0, f"def decode(buf, off, end, {head}):")
        self.emit(1, "start = off")
        required, optional = self.groups()
        self.fixed_run_or_dynamic(required, 1, optional_group=False)
        for group in optional:
            for f in group:
                v = f"r_{len(self.var)}"
                self.var[f.name] = v
                self.emit(1, f"{v} = ABSENT")
        if optional:
            self.optional_chain(optional, 1)
        self.build(1)
        return "\n".join(self.lines) + "\n"

    def fixed_run_or_dynamic(
        self, fields: list[WireField], depth: int, optional_group: bool
    ) -> None:
        run: list[WireField] = []
        for f in fields:
            if f.kind == "fixed":
                run.append(f)
                continue
            self.fixed_run(run, depth)
            run = []
            self.dynamic(f, depth)
        self.fixed_run(run, depth)

    def fixed_run(self, run: list[WireField], depth: int) -> None:
        if not run:
            return
        size = sum(f.size for f in run)
        fmt = "".join(f.fmt for f in run)
        names = []
        for f in run:
            v = f"r_{len(self.var)}"
            self.var[f.name] = v
            names.append(v)
        self.emit(depth, f"if end - off < {size}:")
        self.emit(
            depth + 1,
            f"raise _trunc({self.c.cls.__name__!r}, {run[0].name!r},"
            f" off - start, {size}, end - off)",
        )
        self.emit(depth, f"{', '.join(names)}, = _unpack_from({self.fmt(fmt)}, buf, off)")
        self.emit(depth, f"off += {size}")

    def dynamic(self, f: WireField, depth: int) -> None:
        v = f"r_{len(self.var)}"
        self.var[f.name] = v
        if f.kind == "greedy":
            self.emit(depth, f"{v} = bytes(buf[off:end])")
            self.emit(depth, "off = end")
            return
        self.emit(depth, f"n_ = {self.count_expr(f)} * {f.size}")
        self.emit(depth, "if end - off < n_:")
        self.emit(
            depth + 1,
            f"raise _trunc({self.c.cls.__name__!r}, {f.name!r}, off - start, n_, end - off)",
        )
        self.unpack_dynamic(f, v, depth)
        self.emit(depth, "off += n_")

    def optional_chain(self, groups: list[list[WireField]], depth: int) -> None:
        # fixed groups: choose how many fit with one comparison chain and one unpack
        if all(f.kind == "fixed" for g in groups for f in g):
            sizes = [sum(f.size for f in g) for g in groups]
            first = True
            for k in range(len(groups), 0, -1):
                need = sum(sizes[:k])
                self.emit(depth, f"{'if' if first else 'elif'} end - off >= {need}:")
                first = False
                fields = [f for g in groups[:k] for f in g]
                names = [self.var[f.name] for f in fields]
                fmt = "".join(f.fmt for f in fields)
                self.emit(
                    depth + 1, f"{', '.join(names)}, = _unpack_from({self.fmt(fmt)}, buf, off)"
                )
                self.emit(depth + 1, f"off += {need}")
            return
        # general case: one group at a time, nested
        self._nested(groups, depth)

    def _nested(self, groups: list[list[WireField]], depth: int) -> None:
        """One optional group at a time: all of it fits, or it and the rest are absent."""
        group = groups[0]
        self.emit(depth, "save_ = off")
        self.emit(depth, "ok_ = True")
        for f in group:
            v = self.var[f.name]
            self.emit(depth, "if ok_:")
            inner = depth + 1
            if f.kind == "greedy":
                self.emit(inner, f"{v} = bytes(buf[off:end])")
                self.emit(inner, "off = end")
                continue
            if f.kind == "fixed":
                self.emit(inner, f"n_ = {f.size}")
            else:
                self.emit(inner, f"n_ = {self.count_expr(f)} * {f.size}")
            self.emit(inner, "if end - off < n_:")
            self.emit(inner + 1, "ok_ = False")
            self.emit(inner, "else:")
            self.unpack_dynamic(f, v, inner + 1)
            self.emit(inner + 1, "off += n_")
        self.emit(depth, "if not ok_:")
        self.emit(depth + 1, "off = save_")
        for f in group:
            self.emit(depth + 1, f"{self.var[f.name]} = ABSENT")
        if len(groups) > 1:
            self.emit(depth, "else:")
            self._nested(groups[1:], depth + 1)

    def count_expr(self, f: WireField) -> str:
        """Expression for the element count of a dynamic field."""
        if f.count is None:  # GreedyRange: every whole record left
            return f"((end - off) // {f.size})"
        return str(f.count) if isinstance(f.count, int) else self.var[f.count]

    def unpack_dynamic(self, f: WireField, v: str, depth: int) -> None:
        """Read field ``f`` (its byte size is in ``n_``) into variable ``v``."""
        if f.kind == "fixed":
            self.emit(depth, f"{v}, = _unpack_from({self.fmt(f.fmt)}, buf, off)")
        elif f.kind == "vbytes" or (f.kind == "array" and f.fmt == "B"):
            self.emit(depth, f"{v} = bytes(buf[off:off + n_])")
        elif f.kind == "array":
            self.emit(
                depth,
                f"{v} = _unpack_from('{self.c.endian}%d{f.fmt}' % (n_ // {f.size}), buf, off)",
            )
        else:
            width = len(f.record)
            self.emit(
                depth,
                f"{v} = _unpack_from('{self.c.endian}' + {f.fmt!r} * (n_ // {f.size}), buf, off)",
            )
            self.emit(depth, f"{v} = [{v}[i:i + {width}] for i in range(0, len({v}), {width})]")

    def build(self, depth: int) -> None:
        c = self.c
        args: list[str] = []
        for field in dataclasses.fields(c.cls):
            if field.name in c.head:
                args.append(field.name)
                continue
            if field.kw_only:
                continue
            args.append(self.typed_expr(field.name, depth))
        extra = ""
        if "trailing_hex" in {f.name for f in dataclasses.fields(c.cls)}:
            self.emit(depth, "trailing_ = buf[off:end].hex().upper() if off < end else ''")
            extra = ", trailing_hex=trailing_"
        self.emit(depth, f"return _cls({', '.join(args)}{extra})")

    def typed_expr(self, name: str, depth: int) -> str:
        c = self.c
        wire = [f for f in c.fields if f.name == name or f.name.startswith(name + "[]")]
        if not wire:
            raise TypeError(f"{c.cls.__name__}.{name} has no wire field")
        first = wire[0]
        optional = first.group >= 0
        if first.kind == "records" or "[]" in first.name:
            expr = self.items_expr(name, wire)
        elif first.kind == "array":
            conv = c.converter(name)
            raw = self.var[name]
            if conv is IDENTITY:
                expr = f"tuple({raw})"
            else:
                expr = f"tuple([{conv.decode_expr.format('x_')} for x_ in {raw}])"
        else:
            expr = self.conv_decode(
                name, self.var[name], first.fmt if first.kind == "fixed" else "s"
            )
        if optional:
            v = self.var[name]
            return f"(ABSENT if {v} is ABSENT else {expr})"
        return expr

    def items_expr(self, name: str, wire: list[WireField]) -> str:
        c = self.c
        item_cls = c.items[name]
        item_fields = [f.name for f in dataclasses.fields(item_cls)]
        if wire[0].kind == "records":
            rec = wire[0]
            members = [m for m, _ in rec.record]
            args = []
            for f in item_fields:
                if f in members:
                    i = members.index(f)
                    fmt = rec.record[i][1]
                    args.append(self.conv_decode(f"{name}[].{f}", f"t_[{i}]", fmt))
                else:
                    args.append("i_")
            rows = self.var[rec.name]
            return f"tuple([_I_{name}({', '.join(args)}) for i_, t_ in enumerate({rows})])"
        members = [f.name.split("[].")[1] for f in wire]
        zipped = ", ".join(self.var[f.name] for f in wire)
        args = []
        for f in item_fields:
            if f in members:
                i = members.index(f)
                wf = wire[i]
                args.append(self.conv_decode(wf.name, f"t_[{i}]", wf.fmt))
            else:
                args.append("i_")
        return f"tuple([_I_{name}({', '.join(args)}) for i_, t_ in enumerate(zip({zipped}))])"


class _EncodeWriter(_Writer):
    def source(self) -> str:
        c = self.c
        self.emit(0, "def encode(m):")
        required, optional = self.groups()
        self.emit(1, "parts_ = []")
        self.values(required, 1)
        self.pack(required, 1)
        if optional:
            typed = []
            for g in optional:
                t = c.typed_name(g[-1]) or g[-1].name
                typed.append(t)
            self.emit(
                1, f"k_ = _present(({', '.join('m.' + t for t in typed)},), {tuple(typed)!r})"
            )
            for k, group in enumerate(optional):
                self.emit(1 + k, f"if k_ > {k}:")
                self.values(group, 2 + k)
                self.pack(group, 2 + k)
        if "trailing_hex" in {f.name for f in dataclasses.fields(c.cls)}:
            self.emit(1, "if m.trailing_hex:")
            self.emit(2, "parts_.append(_unhex(m.trailing_hex))")
        self.emit(1, "return b''.join(parts_)")
        return "\n".join(self.lines) + "\n"

    def values(self, fields: list[WireField], depth: int) -> None:
        c = self.c
        for f in fields:
            v = f"w_{len(self.var)}"
            self.var[f.name] = v
            if f.name in c.counts:
                target = c.counts[f.name]
                list_field = next(
                    x for x in c.fields if x.name == target or x.name.startswith(target + "[]")
                )
                if list_field.kind == "vbytes":
                    self.emit(depth, f"{v} = len(m.{target}) // 2")
                else:
                    self.emit(depth, f"{v} = len(m.{target})")
                continue
            typed = c.typed_name(f)
            assert typed is not None
            conv = c.converter(f.name)
            if "[]" in f.name:
                member = f.name.split("[].")[1]
                inner = conv.encode_expr.format(f"x_.{member}")
                self.emit(depth, f"{v} = [{inner} for x_ in m.{typed}]")
            elif f.kind == "records":
                parts = []
                for member, fmt in f.record:
                    mconv = c.converter(f"{typed}[].{member}")
                    if fmt.endswith("s") and (mconv is IDENTITY or isinstance(mconv, Hex)):
                        parts.append(f"_fixhex(x_.{member}, {fmt[:-1]}, {member!r})")
                    elif fmt.endswith("s"):
                        raw = mconv.encode_expr.format(f"x_.{member}")
                        parts.append(f"_fixbytes({raw}, {fmt[:-1]}, {member!r})")
                    else:
                        parts.append(mconv.encode_expr.format(f"x_.{member}"))
                self.emit(depth, f"{v} = [y_ for x_ in m.{typed} for y_ in ({', '.join(parts)},)]")
            elif f.kind == "array":
                self.emit(depth, f"{v} = [{conv.encode_expr.format('x_')} for x_ in m.{typed}]")
            elif f.kind in ("vbytes", "greedy"):
                self.emit(depth, f"{v} = _unhex(m.{typed})")
            elif f.fmt.endswith("s"):
                size = int(f.fmt[:-1])
                if isinstance(conv, Ascii):
                    const = f"_A_{len(self.consts)}"
                    self.consts[const] = conv
                    self.emit(depth, f"{v} = _fixascii(m.{typed}, {size}, {f.name!r}, {const})")
                elif isinstance(conv, Hex) or conv is IDENTITY:
                    self.emit(depth, f"{v} = _fixhex(m.{typed}, {size}, {f.name!r})")
                else:  # a converter that yields bytes (dates, addresses)
                    raw = conv.encode_expr.format("m." + typed)
                    self.emit(depth, f"{v} = _fixbytes({raw}, {size}, {f.name!r})")
            else:
                self.emit(depth, f"{v} = {conv.encode_expr.format('m.' + typed)}")

    def pack(self, fields: list[WireField], depth: int) -> None:
        run: list[WireField] = []

        def flush() -> None:
            if run:
                fmt = "".join(f.fmt for f in run)
                args = ", ".join(self.var[f.name] for f in run)
                self.emit(depth, f"parts_.append(_pack({self.fmt(fmt)}, {args}))")
                run.clear()

        for f in fields:
            if f.kind == "fixed":
                run.append(f)
                continue
            flush()
            v = self.var[f.name]
            if f.kind in ("vbytes", "greedy"):
                self.emit(depth, f"parts_.append({v})")
            elif f.kind == "array":
                self.emit(
                    depth, f"parts_.append(_pack('{self.c.endian}%d{f.fmt}' % len({v}), *{v}))"
                )
            else:
                self.emit(
                    depth,
                    f"parts_.append(_pack('{self.c.endian}' + {f.fmt!r}"
                    f" * (len({v}) // {len(f.record)}), *{v}))",
                )
        flush()


def compile_message(
    cls: type[Message],
    wire: cs.Struct,
    *,
    endian: str,
    head: Sequence[str],
    units: Mapping[str, Converter] | None = None,
    items: Mapping[str, type[Item]] | None = None,
) -> Codec:
    """Compile a message declaration; raises ``TypeError`` on an unsupported one."""
    codec = Codec(cls, wire, endian=endian, head=head, units=units or {}, items=items or {})
    return codec


class LazyCodec:
    """A class attribute that compiles its message's codec on first access.

    Generating and compiling the decoder and encoder of every message at import made
    ``import chargeproto`` cost most of a second; a program that decodes a few
    commands compiles only those. The first access replaces this descriptor on the
    declaring class with the :class:`Codec`, so every later ``cls.codec`` is a plain
    class attribute lookup: the hot path pays nothing for the laziness. Compiling
    the same codec twice (two threads racing) is harmless: both results are equal.
    """

    def __init__(
        self,
        cls: type[Message],
        wire: cs.Struct,
        *,
        endian: str,
        head: Sequence[str],
        units: Mapping[str, Converter] | None = None,
        items: Mapping[str, type[Item]] | None = None,
    ) -> None:
        self.cls = cls
        self.wire = wire
        self.endian = endian
        self.head = tuple(head)
        self.units = dict(units or {})
        self.items = dict(items or {})

    def compile(self) -> Codec:
        """Compile the codec now and install it on the declaring class."""
        codec = compile_message(
            self.cls,
            self.wire,
            endian=self.endian,
            head=self.head,
            units=self.units,
            items=self.items,
        )
        setattr(self.cls, "codec", codec)  # noqa: B010 - replaces this descriptor
        return codec

    def __get__(self, instance: object, owner: type | None = None) -> Codec:
        return self.compile()


def lazy_codec(
    cls: type[Message],
    wire: cs.Struct,
    *,
    endian: str,
    head: Sequence[str],
    units: Mapping[str, Converter] | None = None,
    items: Mapping[str, type[Item]] | None = None,
) -> None:
    """Give ``cls`` a ``codec`` that is compiled from its declaration on first use.

    What can be checked without generating code (every wire field feeds a message
    field) is checked now, at import; the rest when the codec is compiled, which the
    test suite does for every message class.
    """
    fields = flatten(wire, endian)
    counts = {f.count for f in fields if isinstance(f.count, str)}
    names = {f.name for f in dataclasses.fields(cls)}
    for wf in fields:
        typed = wf.name.split("[]")[0]
        if wf.name not in counts and typed not in names:
            raise TypeError(f"{cls.__name__}: wire field {wf.name} has no field {typed}")
    lazy = LazyCodec(cls, wire, endian=endian, head=head, units=units, items=items)
    setattr(cls, "codec", lazy)  # noqa: B010 - the classes declare codec: ClassVar[Codec]
