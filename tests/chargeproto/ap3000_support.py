"""Helpers shared by the AP3000 tests: the vectors, field flattening, and hypothesis
strategies derived from each message's construct declaration."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

import chargeproto
from chargeproto import ap3000
from chargeproto._layout import WireField
from chargeproto._units import Ascii

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "ap3000.json"
VECTORS: list[dict[str, Any]] = json.loads(FIXTURES.read_text())
FRAME_VECTORS = [v for v in VECTORS if v["command"] not in ("iccid", "link")]
STRING_VECTORS = [v for v in VECTORS if v["command"] in ("iccid", "link")]

#: the decode error a vector's ``defects`` entry names
DEFECT_ERRORS: dict[str, type[chargeproto.DecodeError]] = {
    "hex": chargeproto.HexSyntaxError,
    "length": chargeproto.LengthError,
    "checksum": chargeproto.ChecksumError,
    "header": chargeproto.HeaderError,
    "truncated": chargeproto.TruncatedError,
}


def vector_bytes(vector: dict[str, Any]) -> bytes:
    """The vector's bytes; a non-hex character is the peer's fault (HexSyntaxError)."""
    try:
        return bytes.fromhex(vector["hex"])
    except ValueError as exc:
        raise chargeproto.HexSyntaxError(f"{vector['name']}: {exc}") from None


# --- fields ------------------------------------------------------------------------


def flatten(fields: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested ``to_fields()`` output -> the vectors' path form (``ports[1].power_w``)."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        elif isinstance(value, list):
            for i, element in enumerate(value):
                if isinstance(element, dict):
                    out.update(flatten(element, f"{path}[{i}]."))
                else:
                    out[f"{path}[{i}]"] = element
        else:
            out[path] = value
    return out


def frame_fields(message: ap3000.Ap3000Message, frame: bytes) -> dict[str, Any]:
    """The frame-level names of the vectors, computed from the frame and the message."""
    command = (
        message.unknown_command if isinstance(message, ap3000.UnknownMessage) else message.command
    )
    return {
        **ap3000.PhysicalId.parse(message.phy_id).fields(),
        "msg_id": message.msg_id,
        "command": command,
        "length": len(frame) - 5,
        "checksum": int.from_bytes(frame[-2:], "little"),
    }


def all_fields(message: ap3000.Ap3000Message, frame: bytes) -> dict[str, Any]:
    return {**flatten(message.to_fields()), **frame_fields(message, frame)}


def same_value(actual: Any, expected: Any) -> bool:
    """Equality as the vectors mean it: floats within 1e-6, bools and None exactly."""
    if expected is None or isinstance(expected, bool):
        return actual is expected
    if isinstance(expected, float) or isinstance(actual, float):
        return (
            isinstance(actual, int | float)
            and not isinstance(actual, bool)
            and math.isclose(actual, expected, rel_tol=0, abs_tol=1e-6)
        )
    return type(actual) is type(expected) and actual == expected


# --- strategies from the declaration -------------------------------------------------

_INT_RANGES = {
    "B": (0, 0xFF),
    "b": (-0x80, 0x7F),
    "H": (0, 0xFFFF),
    "h": (-0x8000, 0x7FFF),
    "L": (0, 0xFFFFFFFF),
    "I": (0, 0xFFFFFFFF),
    "l": (-0x80000000, 0x7FFFFFFF),
    "i": (-0x80000000, 0x7FFFFFFF),
    "Q": (0, 2**64 - 1),
    "q": (-(2**63), 2**63 - 1),
}


def _element(fmt: str) -> st.SearchStrategy[Any]:
    if fmt.endswith("s"):
        size = int(fmt[:-1] or 1)
        return st.binary(min_size=size, max_size=size)
    lo, hi = _INT_RANGES[fmt]
    return st.integers(lo, hi)


def _ascii_field(conv: Ascii, size: int) -> st.SearchStrategy[bytes]:
    """NUL-padded ASCII that the text converter can carry both ways."""
    limit = min(size, conv.max_chars if conv.max_chars is not None else size)
    text = st.text(st.characters(min_codepoint=1, max_codepoint=127), max_size=limit)
    return text.map(lambda s: s.encode("ascii").ljust(size, b"\0"))


def groups_of(cls: type[ap3000.Ap3000Message]) -> tuple[list[WireField], list[list[WireField]]]:
    fields = cls.codec.fields
    required = [f for f in fields if f.group < 0]
    optional: dict[int, list[WireField]] = {}
    for f in fields:
        if f.group >= 0:
            optional.setdefault(f.group, []).append(f)
    return required, [optional[k] for k in sorted(optional)]


@st.composite
def raw_payloads(
    draw: st.DrawFn, cls: type[ap3000.Ap3000Message], max_items: int = 16
) -> tuple[dict[str, Any], bytes, int]:
    """Raw wire values for ``cls``, the payload they pack into, and how many of the
    optional groups are present (a random prefix of them)."""
    codec = cls.codec
    endian = codec.endian
    required, optional = groups_of(cls)
    present = draw(st.integers(0, len(optional)))
    fields = required + [f for g in optional[:present] for f in g]
    counts = {f.count for f in fields if isinstance(f.count, str)}
    raw: dict[str, Any] = {}
    parts: list[bytes] = []
    # a count field precedes its lists; draw every count first so lists agree
    count_values = {name: draw(st.integers(0, max_items)) for name in counts}
    for f in fields:
        if f.name in counts:
            value = count_values[f.name]
            raw[f.name] = value
            parts.append(struct.pack(endian + f.fmt, value))
            continue
        n = f.count if isinstance(f.count, int) else count_values.get(f.count or "", 0)
        conv = codec.converter(f.name)
        if f.kind == "fixed":
            if f.fmt.endswith("s") and isinstance(conv, Ascii):
                value = draw(_ascii_field(conv, f.size))
            else:
                value = draw(_element(f.fmt))
            raw[f.name] = value
            parts.append(struct.pack(endian + f.fmt, value))
        elif f.kind == "array":
            values = draw(st.lists(_element(f.fmt), min_size=n, max_size=n))
            raw[f.name] = values
            parts.append(struct.pack(f"{endian}{len(values)}{f.fmt}", *values))
        elif f.kind == "vbytes":
            value = draw(st.binary(min_size=n, max_size=n))
            raw[f.name] = value
            parts.append(value)
        elif f.kind == "greedy":
            value = draw(st.binary(max_size=32))
            raw[f.name] = value
            parts.append(value)
        elif f.kind == "records":
            records = [{m: draw(_element(fmt)) for m, fmt in f.record} for _ in range(n)]
            raw[f.name] = records
            for record in records:
                parts.append(struct.pack(endian + f.fmt, *(record[m] for m, _ in f.record)))
        else:  # pragma: no cover - a new kind needs a strategy
            raise AssertionError(f"no strategy for {f.kind}")
    # bytes after the newest layout are kept as trailing_hex; they are unambiguous
    # only when every optional group is present and nothing greedy ends the payload
    if present == len(optional) and not any(f.kind == "greedy" for f in fields):
        parts.append(draw(st.binary(max_size=8)))
    return raw, b"".join(parts), present


phy_ids = st.integers(0, 0xFFFFFFFF)
msg_ids = st.integers(0, 0xFFFF)
