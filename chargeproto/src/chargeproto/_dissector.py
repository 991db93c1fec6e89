"""A Wireshark dissector (Lua) for both protocols, generated from the codec's declarations.

:func:`dissector_lua` walks the same declarations the codec compiles: the construct
layouts and unit converters of every AP3000 message and BKV fixed-layout message
(through :class:`~chargeproto._layout.Codec`), the tag tables of the BKV TLV
messages and records (``TAGS``), the enumeration tables (``TEXTS``) and the BKV
status flags. From them it writes Lua *data*: message tables with one entry per wire
field or tag. A generic Lua interpreter, written once below and the same for every
command, walks those tables at dissection time: frame header, length, checksum,
payload layout (optional tails, counted arrays, zipped per-port arrays, records,
trailing bytes) and TLV items (groups, packed entries, raw items). A change of a
declaration therefore changes the dissector; nothing per command is written by hand.

How values are shown (the ``kind`` of a field):

* integers without a unit: the integer (``uint32``/``uint64``); an enumeration adds
  a generated ``<name>_text`` string from the same table ``to_fields`` uses;
* scaled values (:class:`~chargeproto._units.Scale`): the scaled number as the codec
  computes it (``raw / divisor``, a ``double``: ``voltage_v`` 218.8);
* temperatures with the offset of 65: degrees (``int32``); raw 0 ("no sensor", the
  codec's ``None``) shows as text only;
* physical ids, hex bytes, NUL-padded ASCII text, BCD and binary date-times,
  ``HH:MM`` and IPv4 addresses: the same text the codec gives (``string``);
* BKV ``status_bits``: the byte and the seven named flags (generated booleans);
* BKV TLV items the message does not know (an unknown tag, an unexpected length, a
  repeated tag, a marker other than 0x01): raw, as ``bkv.tlv.raw`` with the tag;
* a converter this module does not know falls back to the raw bytes
  (``<field>.raw``); :func:`raw_fallbacks` lists such fields (none today).

Values the codec derives in Python (``success``, ``card_number``, ``balance_cent``
from ``balance_or_expiry`` ...) are not shown. Field names: ``<protocol>.<name>`` for
frame fields and payload fields (``ap3000.voltage_v``), and one level per list entry
(``ap3000.ports.status``, ``bkv.sockets.ports.voltage_v``); an entry is a subtree of
its own (``ap3000.ports``).
"""

from __future__ import annotations

import dataclasses
import re
import struct
from collections.abc import Iterable, Mapping
from typing import Any, Final

from ._base import Item, Message
from ._layout import Codec, WireField
from ._units import (
    IDENTITY,
    Ascii,
    Converter,
    Hex,
    PhyIdHex,
    Scale,
    Temperature65,
    TextForm,
)

#: the TCP ports the dissector registers on: those of ``chargegw`` pcap exports
AP3000_PORT: Final = 8990
BKV_PORT: Final = 8991

#: frame-level field names (``<protocol>.<name>``); a payload field may not use them
AP3000_FRAME_NAMES: Final = frozenset(
    {
        "header",
        "length",
        "phy_id",
        "phy_id_type",
        "phy_id_number",
        "phy_id_qr",
        "msg_id",
        "command",
        "direction",
        "message",
        "checksum",
        "payload_hex",
        "preamble",
    }
)
BKV_FRAME_NAMES: Final = frozenset(
    {
        "header",
        "length",
        "command",
        "seq",
        "direction",
        "gateway_id",
        "message",
        "checksum",
        "tail",
        "payload_hex",
        "params_hex",
        "preamble",
    }
)

#: text converters the Lua side implements, by the codec's function name
_TEXT_FORMS: Final = {
    "_bcd_time": "bcd_time",
    "_bin_time": "bin_time",
    "_hhmm": "hhmm",
    "_ipv4": "ipv4",
}
_FMT_PART = re.compile(r"(\d*)([a-zA-Z?])")


class LuaRef(str):
    """A Lua expression written as is (a reference to a shared table)."""


def _lua(value: Any, indent: int = 0) -> str:
    """A Python value as a Lua literal (dicts become tables keyed by string or int)."""
    if isinstance(value, LuaRef):
        return str(value)
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = "".join(
            ch if 0x20 <= ord(ch) < 0x7F and ch not in '"\\' else f"\\{ord(ch):03d}"
            for ch in value.encode("utf-8").decode("latin-1")
        )
        return f'"{escaped}"'
    pad = "  " * (indent + 1)
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        parts = []
        for key, item in value.items():
            shown = f"[{key}]" if isinstance(key, int) else f"[{_lua(key)}]"
            parts.append(f"{pad}{shown} = {_lua(item, indent + 1)}")
        return "{\n" + ",\n".join(parts) + "\n" + "  " * indent + "}"
    if isinstance(value, list | tuple):
        if not value:
            return "{}"
        return (
            "{\n"
            + ",\n".join(pad + _lua(v, indent + 1) for v in value)
            + "\n"
            + "  " * indent
            + "}"
        )
    raise TypeError(f"no Lua form for {value!r}")


@dataclasses.dataclass
class _Fields:
    """The Wireshark fields of one protocol: abbreviation -> field type."""

    proto: str
    types: dict[str, str] = dataclasses.field(default_factory=dict)
    fallbacks: list[str] = dataclasses.field(default_factory=list)
    #: key -> (abbreviation, type) of the fields whose abbreviation has another type too
    extra: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)

    def add(self, abbrev: str, ftype: str) -> str:
        """Declare a field; returns the key the Lua tables use for it.

        Wireshark allows one abbreviation with several types (BKV ``firmware_version``
        is text in the heartbeat and a number in the end reports): the first type of
        an abbreviation is keyed by the abbreviation, any other by ``abbrev#type``.
        """
        known = self.types.setdefault(abbrev, ftype)
        if known == ftype:
            return abbrev
        key = f"{abbrev}#{ftype}"
        self.extra[key] = (abbrev, ftype)
        return key


class _Generator:
    """Builds the Lua data tables of both protocols from the declarations."""

    def __init__(self) -> None:
        self.fields = {"ap3000": _Fields("ap3000"), "bkv": _Fields("bkv")}
        self.texts: dict[tuple[tuple[int, str], ...], str] = {}
        self.records: dict[tuple[int, str], str] = {}
        self.shared: list[tuple[str, Any]] = []

    # -- shared tables --

    def text_table(self, table: Mapping[int, str]) -> LuaRef:
        key = tuple(sorted(table.items()))
        name = self.texts.get(key)
        if name is None:
            name = self.texts[key] = f"TEXTS[{len(self.texts) + 1}]"
        return LuaRef(name)

    # -- values --

    def value(
        self,
        proto: str,
        abbrev: str,
        conv: Converter,
        fmt: str,
        texts: Mapping[str, Mapping[int, str]],
        leaf: str,
    ) -> dict[str, Any]:
        """The Lua spec of one value: how to read it and which field shows it."""
        fields = self.fields[proto]
        is_bytes = fmt.endswith("s") or fmt == ""
        spec: dict[str, Any] = {"f": abbrev}
        if isinstance(conv, Scale):
            spec.update(v="double", div=conv.divisor)
            fields.add(abbrev, "double")
        elif isinstance(conv, Temperature65):
            spec["v"] = "t65"
            fields.add(abbrev, "int32")
        elif isinstance(conv, PhyIdHex):
            spec["v"] = "phyid"
            fields.add(abbrev, "string")
        elif isinstance(conv, TextForm) and conv.to_text.__name__ in _TEXT_FORMS:
            spec["v"] = _TEXT_FORMS[conv.to_text.__name__]
            fields.add(abbrev, "string")
        elif isinstance(conv, Ascii):
            spec["v"] = "ascii"
            fields.add(abbrev, "string")
        elif isinstance(conv, Hex) or (conv is IDENTITY and is_bytes):
            spec["v"] = "hex"
            fields.add(abbrev, "string")
        elif type(conv) is Converter and not is_bytes:
            wide = struct.calcsize("<" + fmt) > 4
            spec["v"] = "uint64" if wide else "uint"
            fields.add(abbrev, "uint64" if wide else "uint32")
            table = texts.get(leaf)
            if table is not None:
                spec["t"] = fields.add(abbrev + "_text", "string")
                spec["tt"] = self.text_table(table)
            if proto == "bkv" and leaf == "status_bits":
                spec["flags"] = self.flags(abbrev.rsplit(".", 1)[0])
        else:  # a converter this generator does not know: the raw bytes
            spec["v"] = "raw"
            spec["f"] = fields.add(abbrev + ".raw", "bytes")
            fields.fallbacks.append(abbrev)
        return spec

    def flags(self, prefix: str) -> list[dict[str, Any]]:
        from .bkv._enums import STATUS_FLAGS

        out = []
        for name, (mask, when_set) in STATUS_FLAGS.items():
            abbrev = self.fields["bkv"].add(f"{prefix}.{name}", "bool")
            out.append({"f": abbrev, "mask": mask, "set": when_set})
        return out

    def container(
        self, proto: str, abbrev: str, item: type[Item] | None, members: Iterable[str]
    ) -> dict[str, Any]:
        """A list entry's subtree and the item fields that hold the entry's index."""
        self.fields[proto].add(abbrev, "none")
        index = []
        if item is not None:
            given = set(members)
            for f in dataclasses.fields(item):
                if f.name not in given:
                    index.append(self.fields[proto].add(f"{abbrev}.{f.name}", "uint32"))
        return {"lf": abbrev, "idx": index}

    # -- fixed layouts (AP3000, BKV fixed and inner messages) --

    def layout(self, proto: str, cls: type[Message], codec: Codec) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        reserved = AP3000_FRAME_NAMES if proto == "ap3000" else BKV_FRAME_NAMES
        zipped: dict[str, list[str]] = {}
        for wf in codec.fields:
            if "[]." in wf.name:
                lst, member = wf.name.split("[].")
                zipped.setdefault(lst, []).append(member)
        for wf in codec.fields:
            top = wf.name.split("[]")[0]
            if top in reserved:
                raise TypeError(
                    f"{cls.__name__}.{top}: the dissector shows {proto}.{top} for the frame"
                )
            out.append(self.wire_field(proto, cls, codec, wf, zipped))
        return out

    def wire_field(
        self,
        proto: str,
        cls: type[Message],
        codec: Codec,
        wf: WireField,
        zipped: Mapping[str, list[str]],
    ) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "w": wf.name,
            "k": wf.kind,
            "fmt": wf.fmt,
            "size": wf.size,
            "g": wf.group,
        }
        if wf.count is not None:
            spec["count"] = wf.count
        texts = cls.TEXTS
        if wf.kind == "records":
            item = codec.items.get(wf.name)
            abbrev = f"{proto}.{wf.name}"
            spec.update(self.container(proto, abbrev, item, [m for m, _ in wf.record]))
            item_texts = item.TEXTS if item is not None else {}
            members = []
            for member, fmt in wf.record:
                conv = codec.converter(f"{wf.name}[].{member}")
                m = self.value(proto, f"{abbrev}.{member}", conv, fmt, item_texts, member)
                m.update(m_fmt=fmt, m_size=struct.calcsize("<" + fmt))
                members.append(m)
            spec["members"] = members
            return spec
        if "[]." in wf.name:
            lst, member = wf.name.split("[].")
            item = codec.items.get(lst)
            abbrev = f"{proto}.{lst}"
            spec.update(self.container(proto, abbrev, item, zipped[lst]))
            item_texts = item.TEXTS if item is not None else {}
            conv = codec.converter(wf.name)
            spec["val"] = self.value(proto, f"{abbrev}.{member}", conv, wf.fmt, item_texts, member)
            return spec
        conv = codec.converter(wf.name)
        fmt = "s" if wf.kind in ("vbytes", "greedy") else wf.fmt
        spec["val"] = self.value(proto, f"{proto}.{wf.name}", conv, fmt, texts, wf.name)
        return spec

    # -- TLV records (BKV 0x1000) --

    def tlv_record(self, cls: Any, prefix: str) -> LuaRef:
        """The Lua table of a TLV message or group record under field prefix ``prefix``."""
        key = (id(cls), prefix)
        name = self.records.get(key)
        if name is not None:
            return LuaRef(name)
        name = self.records[key] = f"TLV_RECORDS[{len(self.records) + 1}]"
        items = cls.item_types() if hasattr(cls, "item_types") else {}
        tags: dict[int, Any] = {}
        for spec in cls.TAGS:
            tags[spec.tag] = self.tag(cls, spec, prefix, items)
        self.shared.append((name, {"name": cls.__name__, "tags": tags}))
        return LuaRef(name)

    def tag(
        self, cls: Any, spec: Any, prefix: str, items: Mapping[str, type[Item]]
    ) -> dict[str, Any]:
        from .bkv._tlv import Entries, Fixed, Group, UInt

        kind = spec.kind
        out: dict[str, Any] = {"n": spec.name}
        match = re.fullmatch(r"(\w+)\[(\d+)\]\.(\w+)", spec.name)
        if match:  # a per-entry tag (``ports[0].event_reason``): the entry is by index
            lst, index, member = match.group(1), int(match.group(2)), match.group(3)
            item = items.get(lst)
            abbrev = f"{prefix}.{lst}"
            members = [
                f.name
                for f in (dataclasses.fields(item) if item is not None else ())
                if self._tag_sets(cls, lst, f.name)
            ]
            out.update(self.container("bkv", abbrev, item, members))
            out.update(entry=index, list=lst)
            owner_texts: Mapping[str, Mapping[int, str]] = item.TEXTS if item is not None else {}
            base, leaf = f"{abbrev}.{member}", member
        else:
            owner_texts = cls.TEXTS
            base, leaf = f"{prefix}.{spec.name}", spec.name
        if isinstance(kind, UInt):
            fmt = {1: "B", 2: "H", 4: "L", 8: "Q"}.get(kind.size, f"{kind.size}s")
            out.update(
                k="uint",
                size=kind.size,
                val=self.value("bkv", base, kind.conv, fmt, owner_texts, leaf),
            )
        elif isinstance(kind, Fixed):
            out.update(
                k="fixed",
                size=kind.size,
                val=self.value("bkv", base, kind.conv, f"{kind.size}s", owner_texts, leaf),
            )
        elif isinstance(kind, Entries):
            names = [f.name for f in dataclasses.fields(kind.item)]
            parts = _fmt_parts(kind.fmt)
            out.update(k="entries", size=kind.size, list=spec.name)
            out.update(self.container("bkv", base, kind.item, names))
            specs = []
            for member, fmt, conv in zip(names, parts, kind.convs, strict=True):
                m = self.value("bkv", f"{base}.{member}", conv, fmt, kind.item.TEXTS, member)
                m.update(m_fmt=fmt, m_size=struct.calcsize(">" + fmt))
                specs.append(m)
            out["members"] = specs
        elif isinstance(kind, Group):
            out.update(k="group", list=spec.name)
            out.update(self.container("bkv", base, None, ()))
            out["rec"] = self.tlv_record(kind.record, base)
        else:
            out.update(k="raw")
        return out

    @staticmethod
    def _tag_sets(record: Any, lst: str, member: str) -> bool:
        return any(
            s.name.startswith(f"{lst}[") and s.name.endswith(f".{member}") for s in record.TAGS
        )

    # -- the whole file --

    def generate(self) -> str:
        from . import ap3000, bkv

        ap_messages: dict[str, dict[int, Any]] = {"up": {}, "down": {}}
        for (command, direction), cls in sorted(
            ap3000.REGISTRY.items(), key=lambda kv: (kv[0][0], kv[0][1].value)
        ):
            ap_messages[direction.value][command] = {
                "name": cls.__name__,
                "layout": self.layout("ap3000", cls, cls.codec),
            }
        bkv_fixed: dict[int, dict[int, dict[str, Any]]] = {}
        bkv_tlv: dict[int, dict[str, Any]] = {}
        for (command, key, direction), bkv_cls in sorted(
            bkv.REGISTRY.items(), key=lambda kv: (kv[0][0], kv[0][1] or -1, kv[0][2].value)
        ):
            if issubclass(bkv_cls, bkv.TlvMessage):
                bkv_tlv.setdefault(key if key is not None else -1, {})[direction.value] = (
                    self.tlv_record(bkv_cls, "bkv")
                )
                continue
            assert issubclass(bkv_cls, bkv.FixedMessage)
            bkv_fixed.setdefault(command, {}).setdefault(key if key is not None else -1, {})[
                direction.value
            ] = {"name": bkv_cls.__name__, "layout": self.layout("bkv", bkv_cls, bkv_cls.codec)}
        container = self.tlv_record(bkv.TlvContainer, "bkv")
        for proto, extra in (
            (
                "ap3000",
                {
                    "header": "string",
                    "length": "uint32",
                    "phy_id": "string",
                    "phy_id_type": "uint32",
                    "phy_id_number": "uint32",
                    "phy_id_qr": "string",
                    "msg_id": "uint32",
                    "command": "uint32h",
                    "direction": "string",
                    "message": "string",
                    "checksum": "uint32h",
                    "checksum.status": "uint8cs",
                    "payload_hex": "string",
                    "preamble": "string",
                    "trailing_hex": "string",
                },
            ),
            (
                "bkv",
                {
                    "header": "bytes",
                    "length": "uint32",
                    "command": "uint32h",
                    "seq": "uint32",
                    "direction": "string",
                    "direction_byte": "uint32",
                    "gateway_id": "string",
                    "message": "string",
                    "checksum": "uint32h",
                    "checksum.status": "uint8cs",
                    "tail": "bytes",
                    "payload_hex": "string",
                    "params_hex": "string",
                    "inner_length": "uint32",
                    "sub_cmd": "uint32h",
                    "preamble": "string",
                    "trailing_hex": "string",
                    "tlv.raw": "bytes",
                    "tlv.tag": "uint32h",
                    "tlv.marker": "uint32h",
                },
            ),
        ):
            for name, ftype in extra.items():
                self.fields[proto].add(f"{proto}.{name}", ftype)
        data = [
            ("AP3000_PORT", AP3000_PORT),
            ("BKV_PORT", BKV_PORT),
        ]
        lines = [_HEAD]
        for name, value in data:
            lines.append(f"local {name} = {_lua(value)}")
        lines.append("local TEXTS = {}")
        for pairs, ref in self.texts.items():
            lines.append(f"{ref} = {_lua(dict(pairs))}")
        lines.append("local TLV_RECORDS = {}")
        for name, _ in self.shared:  # tables first, then fill: records refer to each other
            lines.append(f"{name} = {{}}")
        for name, table in self.shared:
            lines.append(f"for k, v in pairs({_lua(table)}) do {name}[k] = v end")
        lines.append(f"local AP3000_MESSAGES = {_lua(ap_messages)}")
        lines.append(f"local BKV_FIXED = {_lua(bkv_fixed)}")
        lines.append(f"local BKV_TLV = {_lua(bkv_tlv)}")
        lines.append(f"local BKV_TLV_CONTAINER = {container}")
        for proto in ("ap3000", "bkv"):
            fields = self.fields[proto]
            table = {k: [k, t] for k, t in sorted(fields.types.items())}
            table.update({k: list(v) for k, v in sorted(fields.extra.items())})
            lines.append(f"local {proto.upper()}_FIELD_TYPES = {_lua(table)}")
        lines.append(_RUNTIME)
        return "\n".join(lines) + "\n"


def _fmt_parts(fmt: str) -> list[str]:
    """``"2sHH"`` -> ``["2s", "H", "H"]``."""
    parts = []
    for count, code in _FMT_PART.findall(fmt):
        if code == "s":
            parts.append(f"{count}s")
        else:
            parts.extend([code] * int(count or 1))
    return parts


def dissector_lua() -> str:
    """The Lua source of a Wireshark dissector for AP3000 and BKV.

    Load it with ``tshark -X lua_script:FILE`` or copy it into Wireshark's personal
    plugins folder. It registers on TCP ports 8990 (AP3000) and 8991 (BKV), the ports
    of ``chargegw frames export --format pcap``, and as a heuristic TCP dissector.
    """
    return _Generator().generate()


def dissector_field_types() -> dict[str, str]:
    """Every Wireshark field the dissector declares: key (the abbreviation, or
    ``abbrev#type`` for a second type of one abbreviation) -> field type."""
    gen = _Generator()
    gen.generate()
    out: dict[str, str] = {}
    for fields in gen.fields.values():
        out.update(fields.types)
        out.update({key: ftype for key, (_, ftype) in fields.extra.items()})
    return out


def raw_fallbacks() -> list[str]:
    """Fields shown as raw bytes because their converter has no Lua counterpart."""
    gen = _Generator()
    gen.generate()
    return [f for proto in gen.fields.values() for f in proto.fallbacks]


_HEAD = """\
-- chargeproto.lua: a Wireshark dissector for the AP3000 ("DNY") and BKV (fc fe / fc ff)
-- charging-pile protocols. GENERATED by `chargeproto dissector` from the declarations
-- of the chargeproto codec: do not edit; regenerate after upgrading chargeproto.
--
-- Load: tshark -X lua_script:chargeproto.lua ..., or copy into Wireshark's personal
-- plugins folder (Help > About Wireshark > Folders > Personal Lua Plugins).
-- Registers on TCP ports 8990 (AP3000) and 8991 (BKV) (preferences ap3000.tcp_port and
-- bkv.tcp_port; 0 = none) and as a heuristic TCP dissector for both.
"""

_RUNTIME = r"""
-- ===== the generic interpreter: the same code for every command ===========================

local band = bit32.band

local ap = Proto("ap3000", "AP3000 charging pile protocol (DNY)")
local bk = Proto("bkv", "BKV charging pile protocol")

local function make_field(abbrev, ftype)
  local label = abbrev:match("^[^.]+%.(.*)$") or abbrev
  if ftype == "uint32" then return ProtoField.uint32(abbrev, label, base.DEC) end
  if ftype == "uint32h" then return ProtoField.uint32(abbrev, label, base.HEX) end
  if ftype == "uint64" then return ProtoField.uint64(abbrev, label, base.DEC) end
  if ftype == "int32" then return ProtoField.int32(abbrev, label, base.DEC) end
  if ftype == "double" then return ProtoField.double(abbrev, label) end
  if ftype == "string" then return ProtoField.string(abbrev, label) end
  if ftype == "bytes" then return ProtoField.bytes(abbrev, label) end
  if ftype == "bool" then return ProtoField.bool(abbrev, label) end
  if ftype == "none" then return ProtoField.none(abbrev, label) end
  if ftype == "uint8cs" then
    local names = {[0] = "Bad", [1] = "Good", [2] = "Unverified"}
    return ProtoField.uint8(abbrev, label, base.DEC, names)
  end
  error("unknown field type " .. ftype)
end

local F = {}
local function register_fields(proto, types)
  local list = {}
  for key, field in pairs(types) do
    F[key] = make_field(field[1], field[2])
    list[#list + 1] = F[key]
  end
  proto.fields = list
end
register_fields(ap, AP3000_FIELD_TYPES)
register_fields(bk, BKV_FIELD_TYPES)

local function experts(proto, name)
  local g, s = expert.group, expert.severity
  local e = {
    checksum = ProtoExpert.new(name .. ".checksum.bad", "Bad checksum", g.CHECKSUM, s.ERROR),
    malformed = ProtoExpert.new(name .. ".malformed", "Malformed frame", g.MALFORMED, s.ERROR),
    garbage = ProtoExpert.new(name .. ".garbage", "Bytes outside a frame", g.PROTOCOL, s.WARN),
    note = ProtoExpert.new(name .. ".note", "Note", g.PROTOCOL, s.NOTE),
  }
  proto.experts = {e.checksum, e.malformed, e.garbage, e.note}
  return e
end
local AP_EXPERT = experts(ap, "ap3000")
local BKV_EXPERT = experts(bk, "bkv")

ap.prefs.tcp_port = Pref.uint("TCP port", AP3000_PORT,
  "The server's TCP port for AP3000 (0 = none)")
bk.prefs.tcp_port = Pref.uint("TCP port", BKV_PORT, "The server's TCP port for BKV (0 = none)")

-- ----- reading values -------------------------------------------------------------------

local function rng(tvb, off, len)
  return tvb:range(off, len)
end

local function read_uint(tvb, off, size, le)
  local r = rng(tvb, off, size)
  if size > 4 then
    if le then return r:le_uint64() end
    return r:uint64()
  end
  if le then return r:le_uint() end
  return r:uint()
end

local function hex(tvb, off, len)
  if len == 0 then return "" end
  return tostring(rng(tvb, off, len):bytes():tohex())
end

local function ascii(tvb, off, len)
  local out = {}
  for i = 0, len - 1 do
    local b = rng(tvb, off + i, 1):uint()
    if b == 0 then break end
    if b < 0x80 then out[#out + 1] = string.char(b) else out[#out + 1] = "\239\191\189" end
  end
  return table.concat(out)
end

local function bytes_of(tvb, off, len)
  local out = {}
  for i = 0, len - 1 do out[i + 1] = rng(tvb, off + i, 1):uint() end
  return out
end

local TEXT_FORMS = {
  bcd_time = function(tvb, off, len)
    local h = hex(tvb, off, len)
    return string.format("%s-%s-%sT%s:%s:%s", h:sub(1, 4), h:sub(5, 6), h:sub(7, 8),
      h:sub(9, 10), h:sub(11, 12), h:sub(13, 14))
  end,
  bin_time = function(tvb, off, len)
    local b = bytes_of(tvb, off, len)
    return string.format("%04d-%02d-%02dT%02d:%02d:%02d",
      b[1] * 256 + b[2], b[3], b[4], b[5], b[6], b[7])
  end,
  hhmm = function(tvb, off, len)
    local b = bytes_of(tvb, off, len)
    return string.format("%02d:%02d", b[1], b[2])
  end,
  ipv4 = function(tvb, off, len)
    local b = bytes_of(tvb, off, len)
    return string.format("%d.%d.%d.%d", b[1], b[2], b[3], b[4])
  end,
}

local function unknown_text(code)
  return string.format("unknown (0x%02X)", code)
end

-- Show one value (spec from the generated tables) read from tvb[off, off+len); returns
-- the raw integer for counts.
local function show_value(tree, spec, tvb, off, len, le)
  local r = rng(tvb, off, len)
  local v = spec.v
  if v == "uint" or v == "uint64" or v == "double" or v == "t65" or v == "phyid" then
    local raw = read_uint(tvb, off, len, le)
    if v == "uint" or v == "uint64" then
      local item = tree:add(F[spec.f], r, raw)
      if spec.t then
        local text = spec.tt[raw] or unknown_text(raw)
        tree:add(F[spec.t], r, text):set_generated()
      end
      if spec.flags then
        for _, flag in ipairs(spec.flags) do
          local set = band(raw, flag.mask) ~= 0
          tree:add(F[flag.f], r, set == flag.set):set_generated()
        end
      end
      return raw, item
    elseif v == "double" then
      return raw, tree:add(F[spec.f], r, raw / spec.div)
    elseif v == "t65" then
      if raw == 0 then
        return raw, tree:add(r, spec.f:gsub("#.*", ""):match("[^.]+$") .. ": no sensor (raw 0)")
      end
      return raw, tree:add(F[spec.f], r, raw - 65)
    else
      return raw, tree:add(F[spec.f], r, string.format("%08X", raw))
    end
  elseif v == "hex" then
    return nil, tree:add(F[spec.f], r, hex(tvb, off, len))
  elseif v == "ascii" then
    return nil, tree:add(F[spec.f], r, ascii(tvb, off, len))
  elseif TEXT_FORMS[v] then
    return nil, tree:add(F[spec.f], r, TEXT_FORMS[v](tvb, off, len))
  end
  return nil, tree:add(F[spec.f], r)
end

-- The subtree of list entry ``index`` (created on first use; entries are numbered in
-- the order they appear, as in the codec's lists).
local function entry(tree, lists, spec, index, r)
  local entries = lists[spec.lf]
  if not entries then entries = {n = 0, by = {}}; lists[spec.lf] = entries end
  local sub = entries.by[index]
  if not sub then
    local name = spec.lf:gsub("#.*", ""):match("[^.]+$")
    sub = tree:add(F[spec.lf], r)
    sub:set_text(string.format("%s[%d]", name, entries.n))
    entries.n = entries.n + 1
    for _, idx in ipairs(spec.idx) do
      sub:add(F[idx], r, index):set_generated()
    end
    entries.by[index] = sub
  end
  return sub
end

-- ----- fixed layouts ----------------------------------------------------------------------

local function field_bytes(field, raws, off, stop)
  if field.k == "fixed" then return field.size end
  if field.k == "greedy" then return stop - off end
  local count
  if field.count == nil then
    count = math.floor((stop - off) / field.size)
  elseif type(field.count) == "number" then
    count = field.count
  else
    count = raws[field.count] or 0
  end
  return count * field.size
end

-- Dissect a payload tvb[start, stop) with a generated layout; returns false on a short payload.
local function dissect_layout(tree, layout, tvb, start, stop, le, exp)
  local off = start
  local raws = {}
  local lists = {}
  local i = 1
  while i <= #layout do
    local field = layout[i]
    if field.g >= 0 then
      -- an optional group: all of its fields fit, or it and every later group are absent
      local group_off = off
      local j = i
      local fits = true
      local group_raws = {}
      while j <= #layout and layout[j].g == field.g do
        local f = layout[j]
        local need = field_bytes(f, setmetatable(group_raws, {__index = raws}), group_off, stop)
        if stop - group_off < need then fits = false; break end
        if f.k == "fixed" and not f.fmt:find("s") then
          group_raws[f.w] = read_uint(tvb, group_off, f.size, le)
        end
        group_off = group_off + need
        j = j + 1
      end
      if not fits then break end
    end
    local need = field_bytes(field, raws, off, stop)
    if stop - off < need then
      tree:add_proto_expert_info(exp.malformed, string.format(
        "payload ends inside %s (needs %d bytes, %d left)", field.w, need, stop - off))
      return false
    end
    if field.k == "fixed" then
      raws[field.w] = show_value(tree, field.val, tvb, off, field.size, le)
    elseif field.k == "vbytes" or field.k == "greedy" then
      show_value(tree, field.val, tvb, off, need, le)
    elseif field.k == "array" then
      local n = math.floor(need / math.max(field.size, 1))
      for e = 0, n - 1 do
        local at = off + e * field.size
        if field.lf then
          local sub = entry(tree, lists, field, e, rng(tvb, at, field.size))
          show_value(sub, field.val, tvb, at, field.size, le)
        else
          show_value(tree, field.val, tvb, at, field.size, le)
        end
      end
    elseif field.k == "records" then
      local n = math.floor(need / field.size)
      for e = 0, n - 1 do
        local at = off + e * field.size
        local sub = entry(tree, lists, field, e, rng(tvb, at, field.size))
        for _, m in ipairs(field.members) do
          show_value(sub, m, tvb, at, m.m_size, le)
          at = at + m.m_size
        end
      end
    end
    off = off + need
    i = i + 1
  end
  return true, off
end

-- ----- TLV (BKV 0x1000) ---------------------------------------------------------------------

local function items_ok(tvb, off, stop)
  while off < stop do
    local size = rng(tvb, off, 1):uint()
    if size < 2 or off + 1 + size > stop then return false end
    off = off + 1 + size
  end
  return true
end

local dissect_tlv

local function tag_fits(spec, tvb, voff, vlen)
  if spec.k == "uint" or spec.k == "fixed" then return vlen == spec.size end
  if spec.k == "entries" then return vlen % spec.size == 0 end
  if spec.k == "group" then return items_ok(tvb, voff, voff + vlen) end
  return false
end

local function raw_item(tree, tvb, off, size, marker, tag, why)
  local voff, vlen = off + 3, size - 2
  local item = tree:add(F["bkv.tlv.raw"], rng(tvb, voff, vlen))
  item:set_text(string.format("tag_%02x: %s (%s)", tag, hex(tvb, voff, vlen), why))
  item:add(F["bkv.tlv.tag"], rng(tvb, off + 2, 1))
  item:add(F["bkv.tlv.marker"], rng(tvb, off + 1, 1))
end

dissect_tlv = function(tree, rec, tvb, start, stop)
  local off = start
  local seen = {}
  local lists = {}
  local counters = {}
  while off < stop do
    local size = rng(tvb, off, 1):uint()
    if size < 2 or off + 1 + size > stop then
      tree:add_proto_expert_info(BKV_EXPERT.malformed, string.format(
        "TLV item at offset %d: length %d does not fit", off, size))
      return false
    end
    local marker = rng(tvb, off + 1, 1):uint()
    local tag = rng(tvb, off + 2, 1):uint()
    local voff, vlen = off + 3, size - 2
    local spec = rec.tags[tag]
    local why = nil
    if spec == nil then
      why = "unknown tag"
    elseif marker ~= 1 then
      why = string.format("marker 0x%02X", marker)
    elseif (spec.k == "uint" or spec.k == "fixed") and seen[spec.n] then
      why = "repeated"
    elseif not tag_fits(spec, tvb, voff, vlen) then
      why = "unexpected length " .. vlen
    end
    if why then
      raw_item(tree, tvb, off, size, marker, tag, why)
    else
      local itemr = rng(tvb, off, size + 1)
      if spec.entry ~= nil then
        seen[spec.n] = true
        local sub = entry(tree, lists, spec, spec.entry, itemr)
        show_value(sub, spec.val, tvb, voff, vlen, false)
      elseif spec.k == "uint" or spec.k == "fixed" then
        seen[spec.n] = true
        local _, item = show_value(tree, spec.val, tvb, voff, vlen, false)
        if item then item:append_text(string.format(" [tag 0x%02X]", tag)) end
      elseif spec.k == "entries" then
        local at = voff
        while at < voff + vlen do
          local index = counters[spec.lf] or 0
          counters[spec.lf] = index + 1
          local sub = entry(tree, lists, spec, index, rng(tvb, at, spec.size))
          for _, m in ipairs(spec.members) do
            show_value(sub, m, tvb, at, m.m_size, false)
            at = at + m.m_size
          end
        end
      elseif spec.k == "group" then
        local index = counters[spec.lf] or 0
        counters[spec.lf] = index + 1
        local sub = entry(tree, lists, spec, index, itemr)
        sub:append_text(string.format(" [group 0x%02X]", tag))
        dissect_tlv(sub, spec.rec, tvb, voff, voff + vlen)
      end
    end
    off = off + 1 + size
  end
  return true
end

-- ----- frames -----------------------------------------------------------------------------

local function checksum_status(tree, proto, r, want, got, exp)
  local item = tree:add(F[proto .. ".checksum"], r, got)
  local status
  if want == got then
    status = tree:add(F[proto .. ".checksum.status"], r, 1)
  else
    item:append_text(string.format(" [expected 0x%X]", want))
    status = tree:add(F[proto .. ".checksum.status"], r, 0)
    status:add_proto_expert_info(exp.checksum,
      string.format("checksum 0x%X, expected 0x%X", got, want))
  end
  status:set_generated()
end

local function byte_sum(tvb, off, len)
  local sum = 0
  for i = 0, len - 1 do sum = sum + rng(tvb, off + i, 1):uint() end
  return sum
end

local function trailing(tree, proto, tvb, off, stop)
  if off < stop then
    tree:add(F[proto .. ".trailing_hex"], rng(tvb, off, stop - off), hex(tvb, off, stop - off))
  end
end

local function ap3000_direction(pinfo)
  local port = ap.prefs.tcp_port
  if port ~= 0 and pinfo.src_port == port then return "down" end
  if port ~= 0 and pinfo.dst_port == port then return "up" end
  -- another port: the server is the side with the lower port (devices use ephemeral ones)
  if pinfo.src_port < pinfo.dst_port then return "down" end
  return "up"
end

local function dissect_ap3000_frame(tvb, off, size, pinfo, tree)
  local st = tree:add(ap, rng(tvb, off, size))
  local direction = ap3000_direction(pinfo)
  local command = rng(tvb, off + 11, 1):uint()
  local message = AP3000_MESSAGES[direction][command]
  local phy = rng(tvb, off + 5, 4):le_uint()
  st:add(F["ap3000.header"], rng(tvb, off, 3), "DNY")
  st:add(F["ap3000.length"], rng(tvb, off + 3, 2), rng(tvb, off + 3, 2):le_uint())
  st:add(F["ap3000.phy_id"], rng(tvb, off + 5, 4), string.format("%08X", phy))
  st:add(F["ap3000.phy_id_type"], rng(tvb, off + 8, 1), math.floor(phy / 16777216)):set_generated()
  st:add(F["ap3000.phy_id_number"], rng(tvb, off + 5, 3), phy % 16777216):set_generated()
  local qr = string.lower(hex(tvb, off + 5, 4))
  st:add(F["ap3000.phy_id_qr"], rng(tvb, off + 5, 4), qr):set_generated()
  st:add(F["ap3000.msg_id"], rng(tvb, off + 9, 2), rng(tvb, off + 9, 2):le_uint())
  st:add(F["ap3000.command"], rng(tvb, off + 11, 1), command)
  st:add(F["ap3000.direction"], rng(tvb, off + 11, 1), direction):set_generated()
  local name = message and message.name or "UnknownMessage"
  st:add(F["ap3000.message"], rng(tvb, off + 11, 1), name):set_generated()
  st:append_text(string.format(", %s 0x%02X %s", direction, command, name))
  local stop = off + size - 2
  if message then
    local ok, at = dissect_layout(st, message.layout, tvb, off + 12, stop, true, AP_EXPERT)
    if ok then trailing(st, "ap3000", tvb, at, stop) end
  elseif stop > off + 12 then
    local n = stop - off - 12
    st:add(F["ap3000.payload_hex"], rng(tvb, off + 12, n), hex(tvb, off + 12, n))
  end
  local want = byte_sum(tvb, off, size - 2) % 65536
  local got = rng(tvb, stop, 2):le_uint()
  checksum_status(st, "ap3000", rng(tvb, stop, 2), want, got, AP_EXPERT)
  return string.format("%s 0x%02X %s", direction, command, name)
end

local function dissect_bkv_frame(tvb, off, size, pinfo, tree)
  local st = tree:add(bk, rng(tvb, off, size))
  local direction = (rng(tvb, off + 1, 1):uint() == 0xFE) and "up" or "down"
  local command = rng(tvb, off + 4, 2):uint()
  local dir_byte = rng(tvb, off + 10, 1):uint()
  st:add(F["bkv.header"], rng(tvb, off, 2))
  st:add(F["bkv.length"], rng(tvb, off + 2, 2), rng(tvb, off + 2, 2):uint())
  st:add(F["bkv.command"], rng(tvb, off + 4, 2), command)
  st:add(F["bkv.seq"], rng(tvb, off + 6, 4), rng(tvb, off + 6, 4):uint())
  local d = st:add(F["bkv.direction"], rng(tvb, off, 2), direction)
  local db = st:add(F["bkv.direction_byte"], rng(tvb, off + 10, 1), dir_byte)
  if dir_byte ~= ((direction == "up") and 1 or 0) then
    db:add_proto_expert_info(BKV_EXPERT.malformed, string.format(
      "direction byte 0x%02X contradicts the %s header", dir_byte, direction))
  end
  st:add(F["bkv.gateway_id"], rng(tvb, off + 11, 7), hex(tvb, off + 11, 7))
  local start, stop = off + 18, off + size - 3
  local name, key
  local by_command = BKV_FIXED[command]
  if command == 0x1000 then
    local bkv_cmd
    local at = start
    while at + 1 < stop do
      local isize = rng(tvb, at, 1):uint()
      if isize < 2 or at + 1 + isize > stop then break end
      if rng(tvb, at + 2, 1):uint() == 1 and rng(tvb, at + 1, 1):uint() == 1 and isize == 4 then
        bkv_cmd = rng(tvb, at + 3, 2):uint()
        break
      end
      at = at + 1 + isize
    end
    local rec = bkv_cmd and BKV_TLV[bkv_cmd] and BKV_TLV[bkv_cmd][direction]
    if rec == nil then rec = BKV_TLV_CONTAINER end
    name = rec.name
    key = bkv_cmd
    st:add(F["bkv.message"], rng(tvb, off + 4, 2), name):set_generated()
    dissect_tlv(st, rec, tvb, start, stop)
  elseif by_command and by_command[-1] then
    local message = by_command[-1][direction]
    name = message and message.name or "UnknownMessage"
    st:add(F["bkv.message"], rng(tvb, off + 4, 2), name):set_generated()
    if message then
      local ok, at2 = dissect_layout(st, message.layout, tvb, start, stop, false, BKV_EXPERT)
      if ok then trailing(st, "bkv", tvb, at2, stop) end
    elseif stop > start then
      st:add(F["bkv.payload_hex"], rng(tvb, start, stop - start), hex(tvb, start, stop - start))
    end
  elseif by_command then  -- 0x0005 / 0x0015: inner length and sub-command
    if stop - start < 3 then
      st:add_proto_expert_info(BKV_EXPERT.malformed,
        "payload cannot hold the inner length and sub-command")
      name = "?"
    else
      local inner = rng(tvb, start, 2):uint()
      local sub = rng(tvb, start + 2, 1):uint()
      key = sub
      local il = st:add(F["bkv.inner_length"], rng(tvb, start, 2), inner)
      local message = by_command[sub] and by_command[sub][direction]
      name = message and message.name or "UnknownSubCommand"
      st:add(F["bkv.message"], rng(tvb, off + 4, 2), name):set_generated()
      st:add(F["bkv.sub_cmd"], rng(tvb, start + 2, 1), sub)
      if inner ~= stop - start - 3 then
        il:add_proto_expert_info(BKV_EXPERT.malformed, string.format(
          "inner length %d, but %d parameter bytes follow", inner, stop - start - 3))
      elseif message then
        local ok, at2 = dissect_layout(st, message.layout, tvb, start + 3, stop, false, BKV_EXPERT)
        if ok then trailing(st, "bkv", tvb, at2, stop) end
      elseif stop > start + 3 then
        local n = stop - start - 3
        st:add(F["bkv.params_hex"], rng(tvb, start + 3, n), hex(tvb, start + 3, n))
      end
    end
  else
    name = "UnknownMessage"
    st:add(F["bkv.message"], rng(tvb, off + 4, 2), name):set_generated()
    if stop > start then
      st:add(F["bkv.payload_hex"], rng(tvb, start, stop - start), hex(tvb, start, stop - start))
    end
  end
  local want = byte_sum(tvb, off + 2, size - 5) % 256
  local got = rng(tvb, stop, 1):uint()
  checksum_status(st, "bkv", rng(tvb, stop, 1), want, got, BKV_EXPERT)
  local tail = st:add(F["bkv.tail"], rng(tvb, stop + 1, 2))
  if rng(tvb, stop + 1, 2):uint() ~= 0xFCEE then
    tail:add_proto_expert_info(BKV_EXPERT.malformed, "frame does not end with fc ee")
  end
  local shown = string.format("%s 0x%04X", direction, command)
  if key then shown = shown .. string.format("/0x%02X", key) end
  st:append_text(", " .. shown .. " " .. name)
  return shown .. " " .. name
end

-- ----- streams: several frames per segment, frames across segments --------------------

-- A preamble a modem sends outside frames: "link" or a 20-character ICCID.
local function preamble_size(tvb, off, avail)
  if avail >= 1 and rng(tvb, off, 1):uint() == 0x6C then
    if avail < 4 then return -1 end
    if rng(tvb, off, 4):string() == "link" then return 4 end
    return nil
  end
  if avail >= 2 and rng(tvb, off, 2):string() == "89" then
    if avail < 20 then return -1 end
    if rng(tvb, off, 20):string():match("^89[0-9A-Fa-f]+$") then return 20 end
  end
  return nil
end

-- proto: the Proto; frame_size(tvb, off, avail) -> size of the frame at off, -1 for
-- "need more bytes", nil for "no frame starts here"; find_start(tvb, off) -> next
-- candidate offset or nil.
local function dissect_stream(tvb, pinfo, tree, proto, name, exp,
                              frame_size, dissect_frame, find_start)
  local len = tvb:len()
  local off = 0
  local shown = {}
  pinfo.cols.protocol = name
  while off < len do
    local avail = len - off
    local size = frame_size(tvb, off, avail)
    if size == -1 then
      pinfo.desegment_offset = off
      pinfo.desegment_len = DESEGMENT_ONE_MORE_SEGMENT
      break
    elseif size ~= nil and size > avail then
      pinfo.desegment_offset = off
      pinfo.desegment_len = size - avail
      break
    elseif size ~= nil then
      shown[#shown + 1] = dissect_frame(tvb, off, size, pinfo, tree)
      off = off + size
    else
      local pre = preamble_size(tvb, off, avail)
      if pre == -1 then
        pinfo.desegment_offset = off
        pinfo.desegment_len = DESEGMENT_ONE_MORE_SEGMENT
        break
      elseif pre then
        local st = tree:add(proto, rng(tvb, off, pre))
        local text = rng(tvb, off, pre):string()
        st:add(F[name:lower() .. ".preamble"], rng(tvb, off, pre), text)
        st:append_text((pre == 4) and ", keepalive" or ", ICCID " .. text)
        shown[#shown + 1] = (pre == 4) and "link" or ("ICCID " .. text)
        off = off + pre
      else
        local next_start = find_start(tvb, off + 1) or len
        local st = tree:add(proto, rng(tvb, off, next_start - off))
        st:append_text(string.format(", %d bytes outside a frame", next_start - off))
        st:add_proto_expert_info(exp.garbage, string.format("skipped %d bytes", next_start - off))
        shown[#shown + 1] = "garbage"
        off = next_start
      end
    end
  end
  if #shown > 0 then pinfo.cols.info = name .. " " .. table.concat(shown, "; ") end
  return len
end

local function ap3000_size(tvb, off, avail)
  local head = math.min(avail, 3)
  if rng(tvb, off, head):string() ~= ("DNY"):sub(1, head) then return nil end
  if avail < 5 then return -1 end
  local length = rng(tvb, off + 3, 2):le_uint()
  if length < 9 then return nil end
  return length + 5
end

local function find_from(tvb, off, needles)
  local data = (off < tvb:len()) and rng(tvb, off, tvb:len() - off):raw() or ""
  local best
  for _, needle in ipairs(needles) do
    local at = data:find(needle, 1, true)
    if at and (best == nil or at < best) then best = at end
  end
  if best then return off + best - 1 end
  return nil
end

local function ap3000_start(tvb, off)
  return find_from(tvb, off, {"DNY", "link", "89"})
end

local function bkv_size(tvb, off, avail)
  local b0 = rng(tvb, off, 1):uint()
  if b0 ~= 0xFC then return nil end
  if avail < 2 then return -1 end
  local b1 = rng(tvb, off + 1, 1):uint()
  if b1 ~= 0xFE and b1 ~= 0xFF then return nil end
  if avail < 4 then return -1 end
  local length = rng(tvb, off + 2, 2):uint()
  if length < 17 then return nil end
  return length + 4
end

local function bkv_start(tvb, off)
  return find_from(tvb, off, {"\252\254", "\252\255", "link", "89"})
end

function ap.dissector(tvb, pinfo, tree)
  return dissect_stream(tvb, pinfo, tree, ap, "AP3000", AP_EXPERT,
                        ap3000_size, dissect_ap3000_frame, ap3000_start)
end

function bk.dissector(tvb, pinfo, tree)
  return dissect_stream(tvb, pinfo, tree, bk, "BKV", BKV_EXPERT,
                        bkv_size, dissect_bkv_frame, bkv_start)
end

-- ----- registration -----------------------------------------------------------------------

local AP3000_HEURISTIC_MAX = 512
local BKV_HEURISTIC_MAX = 4096

-- Where a frame would start: after a "link" or an ICCID the modem sends first.
local function heuristic_start(tvb)
  local pre = preamble_size(tvb, 0, tvb:len())
  if pre == nil or pre < 0 then return 0 end
  return pre
end

local function ap3000_heuristic(tvb, pinfo, tree)
  local at = heuristic_start(tvb)
  if tvb:len() < at + 12 or rng(tvb, at, 3):string() ~= "DNY" then return false end
  local length = rng(tvb, at + 3, 2):le_uint()
  if length < 9 or length + 5 > AP3000_HEURISTIC_MAX then return false end
  pinfo.conversation = ap
  ap.dissector(tvb, pinfo, tree)
  return true
end

local function bkv_heuristic(tvb, pinfo, tree)
  local at = heuristic_start(tvb)
  if tvb:len() < at + 11 or rng(tvb, at, 1):uint() ~= 0xFC then return false end
  local b1 = rng(tvb, at + 1, 1):uint()
  if b1 ~= 0xFE and b1 ~= 0xFF then return false end
  local length = rng(tvb, at + 2, 2):uint()
  if length < 17 or length + 4 > BKV_HEURISTIC_MAX then return false end
  if rng(tvb, at + 10, 1):uint() ~= ((b1 == 0xFE) and 1 or 0) then return false end
  pinfo.conversation = bk
  bk.dissector(tvb, pinfo, tree)
  return true
end

ap:register_heuristic("tcp", ap3000_heuristic)
bk:register_heuristic("tcp", bkv_heuristic)

local tcp_port = DissectorTable.get("tcp.port")
local registered = {}
local function register_port(proto, port)
  if registered[proto] then tcp_port:remove(registered[proto], proto) end
  registered[proto] = nil
  if port ~= 0 then
    tcp_port:add(port, proto)
    registered[proto] = port
  end
end
register_port(ap, AP3000_PORT)
register_port(bk, BKV_PORT)
function ap.prefs_changed() register_port(ap, ap.prefs.tcp_port) end
function bk.prefs_changed() register_port(bk, bk.prefs.tcp_port) end
"""
