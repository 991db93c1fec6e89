"""BKV enumerations (bkv.md 10.1, 11), the jack status byte, and the reason tables.

The vendor publishes no table of end reasons or event reasons (11.4), so the built-in
tables hold only what the reference states; an operator who learns the codes from a
vendor loads them with :func:`load_reason_table` (a YAML file or a plain mapping).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from os import PathLike
from typing import Any, Final

from .._base import unknown_text
from .._errors import ChargeProtoError


class ReasonTableError(ChargeProtoError, ValueError):
    """A reason table that is not a mapping of byte codes to meanings."""


RESULT: Final[Mapping[int, str]] = {0: "failed", 1: "ok"}
SWITCH: Final[Mapping[int, str]] = {0: "off", 1: "on"}
#: 0x0015/0x07 has its own coding (11.2)
CHARGE_MODE_0x07: Final[Mapping[int, str]] = {0: "by energy", 1: "by time"}
#: 0x0015/0x0B down, 0x0C, TLV 0x12; 2 by energy is presumed for 0x0B down, 4 is TLV only
CHARGE_MODE: Final[Mapping[int, str]] = {
    1: "by time",
    2: "by energy",
    3: "by power tiers",
    4: "electricity + service fee",
}
SERVICE_FEE_MODE: Final[Mapping[int, str]] = {0: "service fee by time", 1: "service fee by energy"}
CARD_TYPE: Final[Mapping[int, str]] = {0: "online card"}
OTA_TARGET: Final[Mapping[int, str]] = {1: "gateway (DTU)"}

#: jack status byte, bkv.md 10.1: flag -> (mask, value of the flag when the bit is set)
STATUS_FLAGS: Final[Mapping[str, tuple[int, bool]]] = {
    "online": (0x80, True),
    "metering_ok": (0x20, False),
    "charging": (0x10, True),
    "no_load": (0x08, True),
    "temperature_ok": (0x04, False),
    "current_ok": (0x02, False),
    "power_ok": (0x01, False),
}


def status_flags(status_bits: int) -> dict[str, bool]:
    """The seven named booleans of a jack status byte (bit 6 is unnamed).

    Bit 7 online, bit 5 metering fault, bit 4 charging, bit 3 no load, bit 2
    temperature fault, bit 1 current fault, bit 0 power fault; the ``*_ok`` flags are
    true when their bit is 0 (the polarity the guide's 0x98 annotation implies). Real
    gateways set bit 5 in normal end reports (bkv.md 15): keep ``status_bits``.
    """
    return dict(_FLAGS_OF_BYTE[status_bits & 0xFF])


#: the flags of every status byte, worked out once (a copy is returned per call)
_FLAGS_OF_BYTE: Final[tuple[Mapping[str, bool], ...]] = tuple(
    {name: bool(bits & mask) == when_set for name, (mask, when_set) in STATUS_FLAGS.items()}
    for bits in range(256)
)


def status_bits_from_flags(**flags: bool) -> int:
    """The status byte for the given flags (unnamed bit 6 clear); the inverse of
    :func:`status_flags` for the seven named flags, all of which must be given."""
    missing = set(STATUS_FLAGS) - set(flags)
    extra = set(flags) - set(STATUS_FLAGS)
    if missing or extra:
        raise TypeError(f"flags missing {sorted(missing)}, unknown {sorted(extra)}")
    bits = 0
    for name, (mask, when_set) in STATUS_FLAGS.items():
        if flags[name] == when_set:
            bits |= mask
    return bits


class ReasonTable:
    """Code -> meaning for ``end_reason``, ``socket_event_reason``, ``event_reason``.

    >>> table = ReasonTable({2: "paid amount used up"})
    >>> table.text(2), table.text(9)
    ('paid amount used up', 'unknown (0x09)')
    """

    __slots__ = ("_codes",)

    def __init__(self, codes: Mapping[int, str] | None = None) -> None:
        self._codes: dict[int, str] = dict(codes or {})

    def text(self, code: int) -> str:
        """The meaning of ``code``, or ``"unknown (0xNN)"``."""
        return self._codes.get(code) or unknown_text(code)

    def __contains__(self, code: object) -> bool:
        return code in self._codes

    def as_dict(self) -> dict[int, str]:
        return dict(self._codes)

    def __repr__(self) -> str:
        return f"ReasonTable({self._codes!r})"


#: the vendor publishes no codes (bkv.md 11.4): the built-in tables are empty and every
#: code renders as "unknown (0xNN)" until a table is loaded
END_REASONS: Final = ReasonTable()
EVENT_REASONS: Final = ReasonTable()


def load_reason_table(source: str | PathLike[str] | Mapping[Any, Any]) -> ReasonTable:
    """A :class:`ReasonTable` from a YAML file or from a mapping the caller loaded.

    The mapping is ``{code: meaning}``; codes may be ints or strings such as ``"8"`` or
    ``"0x08"``. Reading a file needs PyYAML, which chargeproto does not depend on: it
    is imported only here, and a clear ``ImportError`` says how to install it. Callers
    that keep their tables in JSON or TOML pass the loaded mapping instead.
    """
    if isinstance(source, Mapping):
        data: Any = source
    else:
        try:
            yaml: Any = importlib.import_module("yaml")
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "loading a reason table from a YAML file needs PyYAML "
                "(pip install pyyaml), which chargeproto does not depend on; "
                "or load the file yourself and pass the mapping"
            ) from exc
        with open(source, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
        if data is None:
            data = {}
    if not isinstance(data, Mapping):
        raise ReasonTableError("a reason table must be a mapping of code -> meaning")
    codes: dict[int, str] = {}
    for key, meaning in data.items():
        code = key if isinstance(key, int) and not isinstance(key, bool) else _code(key)
        if not 0 <= code <= 0xFF:
            raise ReasonTableError(f"reason code {key!r} is not a byte")
        codes[code] = str(meaning)
    return ReasonTable(codes)


def _code(key: Any) -> int:
    try:
        return int(str(key), 0)
    except ValueError:
        raise ReasonTableError(f"reason code {key!r} is not an integer") from None
