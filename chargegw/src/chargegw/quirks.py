"""Quirk profiles: named, documented deviations of device firmware (docs/quirks.md).

A :class:`QuirkProfile` names a known deviation of some firmware from the protocol
reference and says which devices have it: a protocol, optionally device types and an
inclusive firmware range. It turns on driver **switches** (:class:`Switch`: a behaviour
the driver applies only to such devices) and lists the protocol deviations it
**tolerates** (the compliance counters count them as expected: ``kind`` or
``kind@command``, e.g. ``short_payload@0x82``).

Behaviours every device needs are not profiles: they are the drivers' defaults (the
table in docs/quirks.md says which and why). The shipped profiles are
:data:`DEFAULT_PROFILES`; the ``quirk_profiles`` setting adds profiles, overrides keys of a
shipped one (by name) or disables one (``enabled: false``); :func:`parse_profiles`
validates it.

Matching is done once per device: :meth:`QuirkBook.learn` when a driver learns a device's
type and firmware (AP3000 0x20/0x01, BKV heartbeats, status clusters and socket
states); the result (:class:`ActiveQuirks`) is kept per device id until the process lets
go of the device, so a driver's check per frame is a dict lookup and a set membership.
Before a device's type and firmware are known, the profiles without a device-type or
firmware condition of its protocol apply.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from chargegw.core import split_device_id

PROTOCOLS: Final = ("ap3000", "bkv")

#: the deviation kinds of the compliance counters (docs/compliance.md) a profile may
#: tolerate; tests/gw/test_quirks.py checks this against ``domain.compliance.Kind``
DEVIATION_KINDS: Final = frozenset(
    {
        "checksum_error",
        "length_error",
        "framing_error",
        "unknown_command",
        "unknown_tag",
        "truncated_payload",
        "invalid_payload",
        "short_payload",
        "long_payload",
        "missing_heartbeat",
        "missing_business_no",
        "late_reply",
        "settlement_resend",
        "clock_drift",
        "out_of_range",
    }
)

#: BKV device types (AP3000 device types are the 0x20/0x01 type codes, ``0x04``)
BKV_DEVICE_TYPES: Final = frozenset({"gateway", "socket"})
#: BKV command id of the undocumented container gateways send after connecting
CONNECT_REPORT: Final = 0x1013


class Switch(str, enum.Enum):
    """A behaviour a driver applies only to the devices of an active profile."""

    #: AP3000: answer a 0x01 heartbeat with 0x01 at once (firmware without 0x21),
    #: instead of after two 0x01 in a row on a connection that never sent 0x21
    ANSWER_LEGACY_HEARTBEAT = "answer_legacy_heartbeat"
    #: BKV: the 0x1000/0x1013 after a connection is a known connect report (an event
    #: ``connect_report``), not an unknown container
    CONNECT_REPORT_0X1013 = "connect_report_0x1013"


#: the protocol each switch belongs to
SWITCH_PROTOCOL: Final[Mapping[Switch, str]] = {
    Switch.ANSWER_LEGACY_HEARTBEAT: "ap3000",
    Switch.CONNECT_REPORT_0X1013: "bkv",
}

#: a tolerated deviation: (kind, command or None for every command)
Tolerance = tuple[str, str | None]


@dataclasses.dataclass(frozen=True, slots=True)
class QuirkProfile:
    """One named deviation and the devices that have it.

    ``device_types`` empty = every type; ``firmware_min``/``firmware_max`` None = no
    bound (inclusive, compared as versions: ``"9" < "10"``, ``"cV.1r46" < "cV.1r50"``).
    A profile with a device-type or firmware condition matches only devices whose type
    or firmware is known.
    """

    name: str
    protocol: str
    description: str = ""
    device_types: frozenset[str] = frozenset()
    firmware_min: str | None = None
    firmware_max: str | None = None
    switches: frozenset[Switch] = frozenset()
    tolerates: frozenset[Tolerance] = frozenset()
    enabled: bool = True
    #: where the deviation is documented (the field note)
    source: str = ""
    #: the capture that proves it, under fixtures/captures/quirks/
    capture: str = ""

    def matches(self, protocol: str, device_type: str | None, firmware: str | None) -> bool:
        """Whether a device of ``protocol``, ``device_type`` and ``firmware`` has it."""
        if not self.enabled or protocol != self.protocol:
            return False
        if self.device_types and device_type not in self.device_types:
            return False
        if self.firmware_min is None and self.firmware_max is None:
            return True
        if firmware is None:
            return False
        key = version_key(firmware)
        if self.firmware_min is not None and key < version_key(self.firmware_min):
            return False
        return self.firmware_max is None or key <= version_key(self.firmware_max)

    def to_json(self) -> dict[str, Any]:
        """The profile as plain values (docs, ``config show``)."""
        return {
            "name": self.name,
            "protocol": self.protocol,
            "description": self.description,
            "device_types": sorted(self.device_types),
            "firmware_min": self.firmware_min,
            "firmware_max": self.firmware_max,
            "switches": sorted(s.value for s in self.switches),
            "tolerates": sorted(_tolerance_text(t) for t in self.tolerates),
            "enabled": self.enabled,
            "source": self.source,
            "capture": self.capture,
        }


DEFAULT_PROFILES: Final[tuple[QuirkProfile, ...]] = (
    QuirkProfile(
        name="ap3000-short-charge-reply",
        protocol="ap3000",
        description="the answer to 0x82 stops after `result` and one more byte (2 bytes of "
        "payload instead of 20): the fields after `result` are absent, the extra byte is "
        "kept as `trailing_hex`, and the command's outcome is read from `result` alone",
        tolerates=frozenset({("short_payload", "0x82"), ("long_payload", "0x82")}),
        source="ap3000.md 14 (field notes), first note",
        capture="ap3000_short_charge_reply.jsonl",
    ),
    QuirkProfile(
        name="ap3000-registration-trailing-bytes",
        protocol="ap3000",
        description="0x20 carries 2 bytes after the power-board version (`E4 00` in the "
        "vendor's own example); they are kept as `trailing_hex` and ignored",
        tolerates=frozenset({("long_payload", "0x20")}),
        source="errata.md E1",
        capture="ap3000_registration_trailing_bytes.jsonl",
    ),
    QuirkProfile(
        name="ap3000-legacy-heartbeat",
        protocol="ap3000",
        description="firmware without 0x21: every 0x01 heartbeat is answered with 0x01 at "
        "once, and a missing 0x21 is expected. Shipped disabled: enable it with the "
        "firmware range of such piles",
        switches=frozenset({Switch.ANSWER_LEGACY_HEARTBEAT}),
        tolerates=frozenset({("missing_heartbeat", None)}),
        enabled=False,
        source="ap3000.md 3 (0x01 versus 0x21: some old devices have no 0x21)",
        capture="ap3000_legacy_heartbeat.jsonl",
    ),
    QuirkProfile(
        name="bkv-connect-report-0x1013",
        protocol="bkv",
        description="after every (re)connection the gateway sends an undocumented "
        "0x1000/0x1013 (socket, all ports, its clock, 2 unknown bytes): recorded as a "
        "`connect_report` event, not as an unknown container",
        switches=frozenset({Switch.CONNECT_REPORT_0X1013}),
        tolerates=frozenset({("unknown_command", "0x1000/0x1013")}),
        source="bkv.md 15 (field notes), first note",
        capture="bkv_connect_report_0x1013.jsonl",
    ),
)


# ---------------------------------------------------------------- versions and types

_CHUNKS = re.compile(r"(\d+)")


def version_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """A firmware version as a sortable key: digit runs compare as numbers, the rest as
    case-folded text (``"9" < "10"``, ``"cV.1r46" < "cV.1r50"``)."""
    key: list[tuple[int, int | str]] = []
    for chunk in _CHUNKS.split(text.strip()):
        if not chunk:
            continue
        key.append((0, int(chunk)) if chunk.isdigit() else (1, chunk.casefold()))
    return tuple(key)


def ap3000_device_type(code: int) -> str:
    """An AP3000 device type code as profiles name it: ``0x04``."""
    return f"0x{code:02X}"


def identity_of(device_id: str) -> tuple[str, str | None] | None:
    """(protocol, device type) told by a canonical id alone: ``<gateway>-<n>`` is a BKV
    socket, 14 hex digits a BKV gateway, 8 an AP3000 pile (its type is not in the id)."""
    if split_device_id(device_id)[1] is not None:
        return ("bkv", "socket")
    if _is_hex(device_id) and len(device_id) == 14:
        return ("bkv", "gateway")
    if _is_hex(device_id) and len(device_id) == 8:
        return ("ap3000", None)
    return None


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


# ---------------------------------------------------------------- configuration


class QuirkConfigError(ValueError):
    """The ``quirk_profiles`` setting is not valid; ``problems`` has one line each."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


_KEYS: Final = frozenset(
    {
        "name",
        "protocol",
        "description",
        "device_types",
        "firmware_min",
        "firmware_max",
        "switches",
        "tolerates",
        "enabled",
        "source",
        "capture",
    }
)
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_HEX_TYPE = re.compile(r"^(?:0[xX])?([0-9a-fA-F]{1,2})$")


def _tolerance_text(tolerance: Tolerance) -> str:
    kind, command = tolerance
    return kind if command is None else f"{kind}@{command}"


def _as_list(value: Any, what: str, problems: list[str], where: str) -> list[Any]:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, list | tuple):
        return list(value)
    problems.append(f"{where}: {what} must be a list")
    return []


def _device_type(value: Any, protocol: str, problems: list[str], where: str) -> str | None:
    if protocol == "bkv":
        if isinstance(value, str) and value.strip().lower() in BKV_DEVICE_TYPES:
            return value.strip().lower()
        problems.append(f"{where}: BKV device type {value!r} is not one of gateway, socket")
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0xFF:
        return ap3000_device_type(value)
    if isinstance(value, str) and (match := _HEX_TYPE.match(value.strip())):
        return ap3000_device_type(int(match.group(1), 16))
    problems.append(f"{where}: AP3000 device type {value!r} is not a type code such as 0x04")
    return None


def _firmware(value: Any, key: str, problems: list[str], where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).strip():
        problems.append(f"{where}: {key} must be a firmware version (a number or text)")
        return None
    return str(value).strip()


def _tolerance(value: Any, problems: list[str], where: str) -> Tolerance | None:
    if not isinstance(value, str):
        problems.append(f"{where}: tolerates entry {value!r} is not text")
        return None
    kind, at, command = value.strip().partition("@")
    if kind not in DEVIATION_KINDS:
        known = ", ".join(sorted(DEVIATION_KINDS))
        problems.append(f"{where}: unknown deviation kind {kind!r} (known: {known})")
        return None
    if at and not command:
        problems.append(f"{where}: {value!r} names no command after @")
        return None
    return (kind, command.lower() if command else None)


def _profile(
    entry: Mapping[str, Any], base: QuirkProfile | None, problems: list[str], where: str
) -> QuirkProfile | None:
    count = len(problems)
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        problems.append(
            f"{where}: unknown key {', '.join(map(repr, unknown))} "
            f"(allowed: {', '.join(sorted(_KEYS))})"
        )
    name = str(entry["name"])
    protocol = entry.get("protocol", base.protocol if base else None)
    if protocol not in PROTOCOLS:
        problems.append(f"{where}: protocol must be one of {', '.join(PROTOCOLS)}")
        return None
    if base is not None and protocol != base.protocol:
        problems.append(f"{where}: the shipped profile {name} is for {base.protocol}")
    fields: dict[str, Any] = {} if base is None else dataclasses.asdict(base)
    fields.update(name=name, protocol=protocol)
    for key in ("description", "source", "capture"):
        if key in entry:
            if not isinstance(entry[key], str):
                problems.append(f"{where}: {key} must be text")
            else:
                fields[key] = entry[key]
    if "enabled" in entry:
        if not isinstance(entry["enabled"], bool):
            problems.append(f"{where}: enabled must be true or false")
        else:
            fields["enabled"] = entry["enabled"]
    if "device_types" in entry:
        types = _as_list(entry["device_types"], "device_types", problems, where)
        fields["device_types"] = frozenset(
            t for v in types if (t := _device_type(v, protocol, problems, where)) is not None
        )
    for key in ("firmware_min", "firmware_max"):
        if key in entry:
            fields[key] = _firmware(entry[key], key, problems, where)
    low, high = fields.get("firmware_min"), fields.get("firmware_max")
    if low is not None and high is not None and version_key(low) > version_key(high):
        problems.append(f"{where}: firmware_min {low} is above firmware_max {high}")
    if "switches" in entry:
        switches = set()
        for value in _as_list(entry["switches"], "switches", problems, where):
            try:
                switch = Switch(value)
            except ValueError:
                known = ", ".join(s.value for s in Switch)
                problems.append(f"{where}: unknown switch {value!r} (known: {known})")
                continue
            if SWITCH_PROTOCOL[switch] != protocol:
                problems.append(f"{where}: switch {switch.value} is for {SWITCH_PROTOCOL[switch]}")
                continue
            switches.add(switch)
        fields["switches"] = frozenset(switches)
    if "tolerates" in entry:
        values = _as_list(entry["tolerates"], "tolerates", problems, where)
        fields["tolerates"] = frozenset(
            pair for v in values if (pair := _tolerance(v, problems, where)) is not None
        )
    if len(problems) > count:
        return None
    return QuirkProfile(**fields)


def parse_profiles(entries: Any) -> tuple[QuirkProfile, ...]:
    """The effective profiles: :data:`DEFAULT_PROFILES` with the ``quirk_profiles``
    entries applied (an entry naming a shipped profile overrides the keys it gives; a
    new name is a new profile and needs ``protocol``). Raises
    :class:`QuirkConfigError` naming every problem."""
    if entries is None:
        entries = []
    if not isinstance(entries, list | tuple):
        raise QuirkConfigError(["quirk_profiles must be a list of profiles"])
    shipped = {p.name: p for p in DEFAULT_PROFILES}
    profiles = dict(shipped)
    problems: list[str] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"quirk_profiles[{index}]"
        if not isinstance(entry, Mapping):
            problems.append(f"{where}: must be a mapping with at least a name")
            continue
        name = entry.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            problems.append(
                f"{where}: name must be 1-64 lower-case letters, digits, '.', '_' or '-'"
            )
            continue
        where = f"{where} ({name})"
        if name in seen:
            problems.append(f"{where}: the name is given twice")
            continue
        seen.add(name)
        if name not in shipped and "protocol" not in entry:
            problems.append(f"{where}: a new profile needs a protocol")
            continue
        profile = _profile(entry, shipped.get(name), problems, where)
        if profile is not None:
            profiles[name] = profile
    if problems:
        raise QuirkConfigError(problems)
    return tuple(profiles.values())


# ---------------------------------------------------------------- matching


@dataclasses.dataclass(frozen=True, slots=True)
class ActiveQuirks:
    """The profiles active for one device, ready for per-frame checks."""

    names: tuple[str, ...] = ()
    switches: frozenset[Switch] = frozenset()
    #: kinds tolerated on every command
    kinds: frozenset[str] = frozenset()
    #: (kind, command) tolerated on that command only
    pairs: frozenset[tuple[str, str]] = frozenset()

    def has(self, switch: Switch) -> bool:
        """Whether a profile of the device turns ``switch`` on."""
        return switch in self.switches

    def tolerates(self, kind: str, command: str | None = None) -> bool:
        """Whether a profile of the device expects deviation ``kind``. Without a
        ``command`` a kind tolerated on some command counts."""
        if kind in self.kinds:
            return True
        if command is None:
            return any(k == kind for k, _ in self.pairs)
        return (kind, command.lower()) in self.pairs


NONE: Final = ActiveQuirks()


def combine(profiles: Iterable[QuirkProfile]) -> ActiveQuirks:
    """The :class:`ActiveQuirks` of ``profiles`` (all matching one device)."""
    chosen = list(profiles)
    if not chosen:
        return NONE
    tolerated = [t for p in chosen for t in p.tolerates]
    return ActiveQuirks(
        names=tuple(sorted(p.name for p in chosen)),
        switches=frozenset(s for p in chosen for s in p.switches),
        kinds=frozenset(k for k, c in tolerated if c is None),
        pairs=frozenset((k, c) for k, c in tolerated if c is not None),
    )


class QuirkBook:
    """The effective profiles of a process and the active ones of each device it holds."""

    #: distinct (protocol, type, firmware) results kept; more are recomputed
    MEMO_LIMIT: Final = 4096

    def __init__(self, profiles: Iterable[QuirkProfile] = DEFAULT_PROFILES) -> None:
        self.profiles = tuple(profiles)
        self._memo: dict[tuple[str, str | None, str | None], ActiveQuirks] = {}
        self._devices: dict[str, ActiveQuirks] = {}

    @classmethod
    def from_config(cls, entries: Any) -> QuirkBook:
        """The book of the ``quirk_profiles`` setting (``QuirkConfigError`` if invalid)."""
        return cls(parse_profiles(entries))

    def match(self, protocol: str, device_type: str | None, firmware: str | None) -> ActiveQuirks:
        """The profiles a device of this protocol, type and firmware has."""
        key = (protocol, device_type, firmware)
        found = self._memo.get(key)
        if found is None:
            found = combine(p for p in self.profiles if p.matches(*key))
            if len(self._memo) >= self.MEMO_LIMIT:
                self._memo.clear()
            self._memo[key] = found
        return found

    def learn(
        self, device_id: str, protocol: str, device_type: str | None, firmware: str | None
    ) -> ActiveQuirks:
        """A driver learnt a device's type and firmware: its profiles, kept for it."""
        active = self._devices[device_id] = self.match(protocol, device_type, firmware)
        return active

    def active(self, device_id: str) -> ActiveQuirks:
        """The profiles of a device (the protocol's unconditional ones until its type and
        firmware are learnt)."""
        found = self._devices.get(device_id)
        if found is not None:
            return found
        identity = identity_of(device_id)
        return NONE if identity is None else self.match(identity[0], identity[1], None)

    def known(self, device_id: str) -> ActiveQuirks | None:
        """The profiles learnt for a device this process holds, if any."""
        return self._devices.get(device_id)

    def forget(self, device_id: str) -> None:
        """The process let go of the device."""
        self._devices.pop(device_id, None)

    def tolerates(self, device_id: str, kind: str, command: str | None = None) -> bool:
        """Whether a profile of ``device_id`` expects deviation ``kind`` (for the
        compliance counters)."""
        return self.active(device_id).tolerates(kind, command)

    def stored(
        self, protocol: str, device_type: int | str | None, firmware: str | None
    ) -> ActiveQuirks:
        """The profiles of a device from its stored row (``devices.device_type`` is the
        AP3000 type code; BKV devices are sockets)."""
        if protocol == "bkv":
            kind: str | None = "socket"
        elif isinstance(device_type, int):
            kind = ap3000_device_type(device_type)
        else:
            kind = device_type
        return self.match(protocol, kind, firmware)
