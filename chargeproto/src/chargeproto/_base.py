"""Shared vocabulary: directions, the ABSENT marker, and the message base class."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any, ClassVar, Final, TypeVar

from ._errors import EncodeError

_T = TypeVar("_T", bound="Item | Message")

#: output-only names that ``from_fields`` accepts and ignores (``to_fields`` adds them)
DERIVED_NAMES: Final = frozenset(
    {
        "success",
        "port_count",
        "type_count",
        "slave_count",
        "data_length",
        "card2_length",
        "card_number",
        "check_packet",
        "upgrade_trigger",
    }
)


class Direction(str, enum.Enum):
    """Who sent a frame: ``UP`` device to server, ``DOWN`` server to device."""

    UP = "up"
    DOWN = "down"

    def __str__(self) -> str:
        return self.value


class Absent(enum.Enum):
    """Type of :data:`ABSENT`: an optional field that the payload did not contain."""

    ABSENT = "absent"

    def __repr__(self) -> str:
        return "ABSENT"

    def __bool__(self) -> bool:
        return False


ABSENT: Final = Absent.ABSENT
"""Marks a field that an older (shorter) payload layout does not carry.

Distinct from ``None``, which means "no sensor" for temperatures.
"""


def unknown_text(code: int) -> str:
    """The ``_text`` for an enumeration code that no table lists."""
    return f"unknown (0x{code:02X})"


@dataclasses.dataclass(frozen=True, slots=True)
class Item:
    """Base of the small per-port / per-entry objects inside a message."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {}

    def to_fields(self) -> dict[str, Any]:
        """The canonical fields of this item, enumeration texts included."""
        return _fields_of(self, self.TEXTS)

    @classmethod
    def from_fields(cls: type[_T], fields: Mapping[str, Any]) -> _T:
        """Build from canonical names (the inverse of ``to_fields``)."""
        return _from_fields(cls, fields, {})


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """Base of every decoded message of every protocol.

    Subclasses are frozen, slotted dataclasses whose field names are the canonical
    names of the protocol reference, with engineering units applied.
    """

    #: wire command code (the sub-command family is protocol specific)
    command: ClassVar[int]
    direction: ClassVar[Direction]
    protocol: ClassVar[str]
    #: field name -> {code: meaning}; ``to_fields`` adds ``<name>_text``
    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {}

    def to_fields(self) -> dict[str, Any]:
        """The message as a dict of canonical names (JSON ready).

        Absent optional fields are left out; enumeration codes get a sibling
        ``<name>_text``; derived values (``success``, ``port_count`` ...) are added.
        """
        out = _fields_of(self, self.TEXTS)
        out.update(self.derived_fields())
        return out

    def derived_fields(self) -> dict[str, Any]:
        """Values computed from the fields (``success`` ...); none by default."""
        return {}

    @classmethod
    def from_fields(cls: type[_T], fields: Mapping[str, Any]) -> _T:
        """Build a message from canonical names, the inverse of ``to_fields``.

        ``_text`` siblings and derived values (``success``, ``port_count`` ...) are
        accepted and ignored; lists of objects become items; a missing required field
        or an unknown name raises ``EncodeError``.
        """
        normalized = cls.normalize_fields(dict(fields))  # type: ignore[attr-defined]
        return _from_fields(cls, normalized, cls.item_types())  # type: ignore[attr-defined]

    @classmethod
    def normalize_fields(cls, fields: dict[str, Any]) -> dict[str, Any]:
        """Hook for ``from_fields``: map convenience names onto wire fields."""
        return fields

    @classmethod
    def item_types(cls) -> Mapping[str, type[Item]]:
        """List field name -> item class, for ``from_fields``."""
        return {}


def _fields_of(obj: Any, texts: Mapping[str, Mapping[int, str]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is ABSENT or f.name == "trailing_hex":
            continue
        if isinstance(value, tuple):
            value = [v.to_fields() if isinstance(v, Item) else v for v in value]
        elif isinstance(value, Item):
            value = value.to_fields()
        out[f.name] = value
        table = texts.get(f.name)
        if table is not None and isinstance(value, int):
            out[f.name + "_text"] = table.get(value) or unknown_text(value)
    trailing = getattr(obj, "trailing_hex", "")
    if trailing:  # bytes after the last known field, kept last
        out["trailing_hex"] = trailing
    return out


def _from_fields(cls: type[_T], fields: Mapping[str, Any], items: Mapping[str, type[Item]]) -> _T:
    kwargs: dict[str, Any] = {}
    names = set()
    for f in dataclasses.fields(cls):
        names.add(f.name)
        if f.name not in fields:
            continue
        value = fields[f.name]
        item_cls = items.get(f.name)
        if isinstance(value, list | tuple):
            if item_cls is not None:
                if not all(isinstance(v, Mapping) for v in value):
                    raise EncodeError(f"{f.name}: expected a list of objects", field=f.name)
                value = tuple(item_cls.from_fields(v) for v in value)
            else:
                value = tuple(value)
        kwargs[f.name] = value
    unknown = sorted(
        k for k in fields if k not in names and k not in DERIVED_NAMES and not k.endswith("_text")
    )
    if unknown:
        raise EncodeError(
            f"{cls.__name__}: unknown field(s) {', '.join(unknown)}", field=unknown[0]
        )
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise EncodeError(
            f"{cls.__name__}: missing field(s) {', '.join(missing)}", field=missing[0]
        )
    return cls(**kwargs)
