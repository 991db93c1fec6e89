"""Conversions between wire integers/bytes and canonical engineering values.

Each converter knows how to turn a raw wire value into the canonical value and back,
both as Python callables and as expression templates for the generated fast path
(``{}`` stands for the operand).
"""

from __future__ import annotations

import math
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

    def decode(self, raw: Any) -> Any:
        return _ascii(raw)

    def encode(self, value: Any, field: str) -> Any:
        if not isinstance(value, str):
            raise EncodeError(f"{field}: expected text, got {value!r}", field=field)
        try:
            raw = value.encode("ascii")
        except UnicodeEncodeError:
            raise EncodeError(f"{field}: text must be ASCII: {value!r}", field=field) from None
        if b"\0" in raw:
            raise EncodeError(f"{field}: text must not contain NUL", field=field)
        if self.max_chars is not None and len(raw) > self.max_chars:
            raise EncodeError(
                f"{field}: at most {self.max_chars} characters, got {len(raw)}", field=field
            )
        return raw


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


def _ascii(raw: bytes) -> str:
    end = raw.find(b"\0")
    return (raw if end < 0 else raw[:end]).decode("ascii", "replace")


def _t65(value: int) -> int:
    raw = value + 65
    if raw <= 0:
        raise ValueError(f"{value} degC is below the wire range")
    return raw


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

#: names the generated code may refer to
RUNTIME = {"_ascii": _ascii, "_round": _round, "_t65": _t65, "_unhex": _unhex}
