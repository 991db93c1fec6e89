"""Conversions between wire integers/bytes and canonical engineering values.

Each converter knows how to turn a raw wire value into the canonical value and back,
both as Python callables and as expression templates for the generated fast path
(``{}`` stands for the operand).
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._errors import EncodeError


class Converter:
    """Identity: the wire integer is the canonical value."""

    #: expression template raw -> value, ``{}`` is the raw operand
    decode_expr = "{}"
    #: expression template value -> raw, ``{}`` is the value operand
    encode_expr = "{}"

    def decode(self, raw: Any) -> Any:
        return raw

    def encode(self, value: Any, field: str) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            raise EncodeError(f"{field}: expected an integer, got {value!r}", field=field)
        return value


@dataclass(frozen=True)
class Scale(Converter):
    """``value = raw / divisor``; encoding rounds to the wire resolution."""

    divisor: int

    @property
    def decode_expr(self) -> str:  # type: ignore[override]
        return "{} / %d" % self.divisor

    @property
    def encode_expr(self) -> str:  # type: ignore[override]
        return "_round({} * %d)" % self.divisor

    def decode(self, raw: Any) -> Any:
        return raw / self.divisor

    def encode(self, value: Any, field: str) -> Any:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise EncodeError(f"{field}: expected a finite number, got {value!r}", field=field)
        return round(value * self.divisor)


class Temperature65(Converter):
    """Degrees Celsius with an offset of 65; raw 0 means "no sensor" (``None``)."""

    decode_expr = "(({0}) - 65 if {0} else None)"
    # raw 0 means "no sensor": -65 degC must not wrap into it (_t65 rejects it)
    encode_expr = "(0 if {0} is None else _t65({0}))"

    def decode(self, raw: Any) -> Any:
        return raw - 65 if raw else None

    def encode(self, value: Any, field: str) -> Any:
        if value is None:
            return 0
        raw = super().encode(value, field) + 65
        if raw <= 0:
            raise EncodeError(
                f"{field}: {value} degC is below the wire range (-64..190)", field=field
            )
        return raw


class Hex(Converter):
    """Raw bytes <-> uppercase hex without separators."""

    decode_expr = "{}.hex().upper()"
    encode_expr = "_unhex({})"

    def decode(self, raw: Any) -> Any:
        return bytes(raw).hex().upper()

    def encode(self, value: Any, field: str) -> Any:
        if not isinstance(value, str):
            raise EncodeError(f"{field}: expected a hex string, got {value!r}", field=field)
        try:
            return bytes.fromhex(value)
        except ValueError:
            raise EncodeError(f"{field}: not a hex string: {value!r}", field=field) from None


@dataclass(frozen=True)
class Ascii(Converter):
    """NUL-padded ASCII text, cut at the first NUL; ``max_chars`` leaves room for a NUL."""

    max_chars: int | None = None

    decode_expr = "_ascii({})"
    encode_expr = "{}.encode('ascii')"
    #: how ``encode`` treats what is not ASCII (``str.encode`` errors)
    text_errors = "strict"

    def decode(self, raw: Any) -> Any:
        return _ascii(raw)

    def encode(self, value: Any, field: str) -> Any:
        if not isinstance(value, str):
            raise EncodeError(f"{field}: expected text, got {value!r}", field=field)
        try:
            raw = value.encode("ascii", self.text_errors)
        except UnicodeEncodeError:
            raise EncodeError(f"{field}: text must be ASCII: {value!r}", field=field) from None
        if b"\0" in raw:
            raise EncodeError(f"{field}: text must not contain NUL", field=field)
        if self.max_chars is not None and len(raw) > self.max_chars:
            raise EncodeError(
                f"{field}: at most {self.max_chars} characters, got {len(raw)}", field=field
            )
        return raw


@dataclass(frozen=True)
class EscapedAscii(Ascii):
    """Like :class:`Ascii`, but bytes above 0x7F decode to lone surrogates
    (``surrogateescape``) instead of U+FFFD, so that hostile text re-encodes to the
    same bytes. Encoding accepts ASCII and such surrogates only."""

    decode_expr = "_ascii_escaped({})"
    encode_expr = "{}.encode('ascii', 'surrogateescape')"
    text_errors = "surrogateescape"

    def decode(self, raw: Any) -> Any:
        return _ascii_escaped(raw)


class PhyIdHex(Converter):
    """An AP3000 physical id as a u32 <-> 8 uppercase hex digits (most significant first)."""

    decode_expr = "'%08X' % {}"
    encode_expr = "int({}, 16)"

    def decode(self, raw: Any) -> Any:
        return "%08X" % raw

    def encode(self, value: Any, field: str) -> Any:
        if not isinstance(value, str) or len(value) != 8:
            raise EncodeError(f"{field}: expected 8 hex digits, got {value!r}", field=field)
        try:
            return int(value, 16)
        except ValueError:
            raise EncodeError(f"{field}: not hex: {value!r}", field=field) from None


@dataclass(frozen=True)
class TextForm(Converter):
    """Bytes <-> text through a pair of :data:`RUNTIME` helpers (the generated code
    calls them by name); ``form`` says what text ``encode`` expects."""

    to_text: Callable[[bytes], str]
    to_raw: Callable[[str], bytes]
    form: str

    @property
    def decode_expr(self) -> str:  # type: ignore[override]
        return self.to_text.__name__ + "({})"

    @property
    def encode_expr(self) -> str:  # type: ignore[override]
        return self.to_raw.__name__ + "({})"

    def decode(self, raw: Any) -> Any:
        return self.to_text(raw)

    def encode(self, value: Any, field: str) -> Any:
        return _checked(self.to_raw, value, field, self.form)


def _checked(fn: Any, value: Any, field: str, form: str) -> bytes:
    try:
        raw: bytes = fn(value)
    except (TypeError, ValueError, AttributeError, OverflowError):
        raise EncodeError(f"{field}: expected {form}, got {value!r}", field=field) from None
    return raw


_X2 = "([0-9A-F]{2})"
_BCD_TIME = re.compile(f"([0-9A-F]{{4}})-{_X2}-{_X2}T{_X2}:{_X2}:{_X2}")
_BIN_TIME = re.compile(r"(\d{4,5})-(\d{2,3})-(\d{2,3})T(\d{2,3}):(\d{2,3}):(\d{2,3})")
_HHMM = re.compile(r"(\d{2,3}):(\d{2,3})")


def _bcd_time(raw: bytes) -> str:
    h = bytes(raw).hex().upper()
    return f"{h[0:4]}-{h[4:6]}-{h[6:8]}T{h[8:10]}:{h[10:12]}:{h[12:14]}"


def _bcd_time_raw(value: str) -> bytes:
    match = _BCD_TIME.fullmatch(value)
    if match is None:
        raise ValueError(value)
    return bytes.fromhex("".join(match.groups()))


def _bin_time(raw: bytes) -> str:
    year, month, day, hour, minute, second = struct.unpack(">H5B", raw)
    return f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}"


def _bin_time_raw(value: str) -> bytes:
    match = _BIN_TIME.fullmatch(value)
    if match is None:
        raise ValueError(value)
    return struct.pack(">H5B", *(int(g) for g in match.groups()))


def _hhmm(raw: bytes) -> str:
    return f"{raw[0]:02d}:{raw[1]:02d}"


def _hhmm_raw(value: str) -> bytes:
    match = _HHMM.fullmatch(value)
    if match is None:
        raise ValueError(value)
    return bytes(int(g) for g in match.groups())


def _ipv4(raw: bytes) -> str:
    return ".".join(str(b) for b in raw)


def _ipv4_raw(value: str) -> bytes:
    parts = value.split(".")
    if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 for p in parts):
        raise ValueError(value)
    return bytes(int(p) for p in parts)


def _ascii(raw: bytes) -> str:
    end = raw.find(b"\0")
    return (raw if end < 0 else raw[:end]).decode("ascii", "replace")


def _t65(value: int) -> int:
    raw = value + 65
    if raw <= 0:
        raise ValueError(f"{value} degC is below the wire range")
    return raw


def _ascii_escaped(raw: bytes) -> str:
    end = raw.find(b"\0")
    return (raw if end < 0 else raw[:end]).decode("ascii", "surrogateescape")


def _round(value: float) -> int:
    return round(value)


def _unhex(value: str) -> bytes:
    return bytes.fromhex(value)


IDENTITY = Converter()
DECI = Scale(10)
CENTI = Scale(100)
MILLI = Scale(1000)
TEMP65 = Temperature65()
HEX = Hex()
ASCII = Ascii()
PHY_ID = PhyIdHex()
#: 7 BCD bytes ``YY YY MM DD hh mm ss`` <-> ``"YYYY-MM-DDThh:mm:ss"`` (BKV). The
#: digits are the hex digits of the bytes, so a corrupt nibble (A-F) survives a
#: decode/encode round trip instead of failing the whole frame.
BCD_TIME = TextForm(_bcd_time, _bcd_time_raw, "YYYY-MM-DDThh:mm:ss")
#: year u16be, month, day, hour, minute, second <-> ``"YYYY-MM-DDThh:mm:ss"`` (BKV 0x18)
BIN_TIME = TextForm(_bin_time, _bin_time_raw, "YYYY-MM-DDThh:mm:ss")
#: hour, minute (binary bytes) <-> ``"HH:MM"`` (BKV periods and fee tiers)
HHMM = TextForm(_hhmm, _hhmm_raw, "HH:MM")
#: 4 bytes <-> dotted quad ``"101.37.145.162"``
IPV4 = TextForm(_ipv4, _ipv4_raw, "a dotted IPv4 address")

#: names the generated code may refer to
RUNTIME = {
    "_ascii": _ascii,
    "_ascii_escaped": _ascii_escaped,
    "_round": _round,
    "_t65": _t65,
    "_unhex": _unhex,
    "_bcd_time": _bcd_time,
    "_bcd_time_raw": _bcd_time_raw,
    "_bin_time": _bin_time,
    "_bin_time_raw": _bin_time_raw,
    "_hhmm": _hhmm,
    "_hhmm_raw": _hhmm_raw,
    "_ipv4": _ipv4,
    "_ipv4_raw": _ipv4_raw,
}
