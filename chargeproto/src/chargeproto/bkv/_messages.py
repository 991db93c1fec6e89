"""The fixed-layout BKV messages: heartbeat 0x0000, node list 0x0005, the 0x0015
control and report family, OTA 0x0007 (bkv.md sections 5-8).

Each class is one (command, sub-command, direction). ``WIRE`` declares the payload
(after the inner header, for 0x0005/0x0015) with construct; the layout compiler
generates the struct-based codec from it. The TLV container 0x1000 is in ``_tlv``.
"""

from __future__ import annotations

import abc
import dataclasses
import struct
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import construct as cs
from construct import Array, Bytes, GreedyRange, Int8ub, Int16ub, Int32ub, Struct, this

from .._base import ABSENT, Absent, Direction, Item, Message, _fields_of, _from_fields
from .._errors import EncodeError
from .._layout import Codec, lazy_codec, optional_tail
from .._units import BCD_TIME, BIN_TIME, DECI, HHMM, IPV4, MILLI, Converter, EscapedAscii
from . import _enums as enums
from ._frame import build_frame

UP = Direction.UP
DOWN = Direction.DOWN

HEARTBEAT = 0x0000
NODE_LIST = 0x0005
OTA = 0x0007
CONTROL = 0x0015
TLV = 0x1000

#: (command, sub-command or BKV command id or None, direction) -> message class
REGISTRY: dict[tuple[int, int | None, Direction], type[BkvMessage]] = {}

_M = TypeVar("_M", bound="type[BkvMessage]")
_I = TypeVar("_I", bound="BkvItem")

_INNER = struct.Struct(">HB")
#: text fields (rule 8); undecodable bytes survive a round trip as surrogates
TEXT = EscapedAscii()


@dataclasses.dataclass(frozen=True, slots=True)
class BkvMessage(Message, metaclass=abc.ABCMeta):
    """Base of BKV messages: the frame's gateway id and sequence number come first.

    ``gateway_id`` is 14 uppercase hex digits (``"82231214002700"``); ``seq`` is the
    outer frame sequence (0 in frames a device sends on its own).
    ``to_fields()`` also gives the frame-level ``length``, ``command``, ``direction``
    and ``checksum`` (computed from the encoding, which reproduces a decoded frame).
    """

    protocol: ClassVar[str] = "bkv"
    #: sub-command (0x0005/0x0015) or BKV command id (0x1000); None for the others
    key: ClassVar[int | None] = None

    gateway_id: str
    seq: int

    @property
    def wire_command(self) -> int:
        """The outer command of the frame."""
        return self.command

    @property
    def wire_direction(self) -> Direction:
        """Who sends the frame."""
        return self.direction

    @abc.abstractmethod
    def payload(self) -> bytes:
        """The payload bytes (between the gateway id and the checksum)."""

    def to_bytes(self) -> bytes:
        """The complete frame; ``EncodeError`` names a field that does not fit."""
        return build_frame(
            self.wire_direction, self.wire_command, self.seq, self.gateway_id, self.payload()
        )

    def frame_fields(self) -> dict[str, Any]:
        """``length``, ``command``, ``seq``, ``direction``, ``gateway_id``, ``checksum``."""
        frame = self.to_bytes()
        return {
            "length": len(frame) - 4,
            "command": self.wire_command,
            "seq": self.seq,
            "direction": self.wire_direction.value,
            "gateway_id": self.gateway_id,
            "checksum": frame[-3],
        }

    def to_fields(self) -> dict[str, Any]:
        """The message as canonical names, frame-level fields first (rule 13)."""
        try:
            out = self.frame_fields()
        except EncodeError:  # a hand-built message that cannot be sent: no frame fields
            out = {"command": self.wire_command, "direction": self.wire_direction.value}
        out.update(self.header_fields())
        out.update(self.body_fields())
        out.update(self.derived_fields())
        return out

    def header_fields(self) -> dict[str, Any]:
        """Inner-header fields (``inner_length``, ``sub_cmd``, ``bkv_cmd`` ...)."""
        return {}

    @classmethod
    def normalize_fields(cls, fields: dict[str, Any]) -> dict[str, Any]:
        """Accept what ``to_fields`` gives: computed names (``length``, ``checksum``,
        ``inner_length``, status flags, counts) are dropped; ``command``, ``direction``,
        ``sub_cmd`` and ``bkv_cmd`` must match the class when given."""
        fields = strip_computed(cls, fields)
        expect_value(cls, fields, "command", cls.command)
        expect_value(cls, fields, "direction", cls.direction)
        for name in ("sub_cmd", "bkv_cmd"):
            expect_value(cls, fields, name, cls.key)
        return fields

    def body_fields(self) -> dict[str, Any]:
        """The payload fields with their ``_text`` siblings and status flags."""
        return with_flags(_fields_of(self, self.TEXTS))


def with_flags(fields: dict[str, Any]) -> dict[str, Any]:
    """Insert the seven status flags after a ``status_bits`` key (rule 5)."""
    if not isinstance(fields.get("status_bits"), int):
        return fields
    out: dict[str, Any] = {}
    for name, value in fields.items():
        out[name] = value
        if name == "status_bits":
            out.update(enums.status_flags(value))
    return out


#: names ``to_fields`` adds that ``from_fields`` recomputes (when not a field of the class)
COMPUTED_NAMES = frozenset(
    {"length", "checksum", "inner_length", "tier_count", "period_count", *enums.STATUS_FLAGS}
)


def strip_computed(cls: type, fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` without the computed names that are not dataclass fields of ``cls``."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in fields.items() if k in names or k not in COMPUTED_NAMES}


def as_direction(value: Any, field: str = "direction") -> Direction:
    """A :class:`Direction` from ``"up"``/``"down"``; ``EncodeError`` for anything else."""
    try:
        return Direction(value)
    except ValueError:
        raise EncodeError(f"{field} must be 'up' or 'down', got {value!r}", field=field) from None


def expect_value(cls: type, fields: dict[str, Any], name: str, want: Any) -> None:
    """Pop ``name`` from ``fields``; ``EncodeError`` when it is given and is not ``want``."""
    if name not in fields:
        return
    got = fields.pop(name)
    if name == "direction":
        got = as_direction(got)
    if got != want or isinstance(got, bool):
        raise EncodeError(f"{cls.__name__} has {name} {want!r}, got {got!r}", field=name)


@dataclasses.dataclass(frozen=True, slots=True)
class BkvItem(Item):
    """Base of the per-port / per-node / per-tier objects of BKV messages."""

    def to_fields(self) -> dict[str, Any]:
        return with_flags(_fields_of(self, self.TEXTS))

    @classmethod
    def from_fields(cls: type[_I], fields: Mapping[str, Any]) -> _I:
        """Build from canonical names; the status flags ``to_fields`` adds are ignored."""
        return _from_fields(cls, strip_computed(cls, fields), cls.item_types())

    @classmethod
    def item_types(cls) -> Mapping[str, type[Item]]:
        """List field name -> item class, for ``from_fields``."""
        return {}


@dataclasses.dataclass(frozen=True, slots=True)
class FixedMessage(BkvMessage):
    """A message whose payload has a fixed layout (``WIRE``), compiled on first use."""

    WIRE: ClassVar[cs.Struct] = Struct()
    codec: ClassVar[Codec]

    trailing_hex: str = dataclasses.field(default="", kw_only=True)

    def payload(self) -> bytes:
        return self.codec.encode(self)

    @classmethod
    def item_types(cls) -> Mapping[str, type[Item]]:
        return cls.codec.items


@dataclasses.dataclass(frozen=True, slots=True)
class InnerMessage(FixedMessage):
    """A 0x0005/0x0015 message: ``inner_length`` u16 and ``sub_cmd`` u8 come first."""

    @property
    def sub_cmd(self) -> int:
        """The sub-command byte."""
        assert self.key is not None
        return self.key

    def payload(self) -> bytes:
        params = self.codec.encode(self)
        if len(params) > 0xFFFF:
            raise EncodeError("parameters longer than the inner length field allows")
        return _INNER.pack(len(params), self.sub_cmd) + params

    def header_fields(self) -> dict[str, Any]:
        return {"inner_length": len(self.payload()) - 3, "sub_cmd": self.sub_cmd}


def message(
    command: int,
    direction: Direction,
    key: int | None = None,
    wire: cs.Struct | None = None,
    *,
    units: Mapping[str, Converter] | None = None,
    items: Mapping[str, type[Item]] | None = None,
    register: bool = True,
) -> Callable[[_M], _M]:
    """Declare a fixed-layout message and register it for decoding; its codec is
    compiled from the declaration on first use."""

    def declare(cls: _M) -> _M:
        cls.command = command
        cls.direction = direction
        cls.key = key
        layout = cls.WIRE if wire is None else wire  # type: ignore[attr-defined]
        cls.WIRE = layout  # type: ignore[attr-defined]
        lazy_codec(cls, layout, endian=">", head=("gateway_id", "seq"), units=units, items=items)
        if register:
            registry_key = (command, key, direction)
            if registry_key in REGISTRY:
                raise TypeError(f"{cls.__name__}: {registry_key} is {REGISTRY[registry_key]}")
            REGISTRY[registry_key] = cls
        return cls

    return declare


def control(sub_cmd: int, direction: Direction, wire: cs.Struct | None = None, **kw: Any) -> Any:
    """Declare a 0x0015 sub-command."""
    return message(CONTROL, direction, sub_cmd, wire, **kw)


def node_list(sub_cmd: int, direction: Direction, wire: cs.Struct | None = None, **kw: Any) -> Any:
    """Declare a 0x0005 sub-command."""
    return message(NODE_LIST, direction, sub_cmd, wire, **kw)


# --- shared shapes ----------------------------------------------------------------------


class _Result:
    """Mixin for messages with a ``result`` byte: BKV success is ``result == 1``."""

    __slots__ = ()
    result: int

    @property
    def success(self) -> bool:
        """True when the peer reports success (result 1)."""
        return self.result == 1

    def derived_fields(self) -> dict[str, Any]:
        return {"success": self.success}


_JACK_UNITS: dict[str, Converter] = {
    "power_w": DECI,
    "current_a": MILLI,
    "energy_kwh": MILLI,
}
#: socket ... duration_min: the 17 bytes that open 0x02, 0x18 and 0x0C (7.3)
_END_HEAD = (
    "socket" / Int8ub,
    "firmware_version" / Int16ub,
    "temperature_c" / Int8ub,
    "signal_strength" / Int8ub,
    "port" / Int8ub,
    "status_bits" / Int8ub,
    "business_no" / Int16ub,
    "power_w" / Int16ub,
    "current_a" / Int16ub,
    "energy_kwh" / Int16ub,
    "duration_min" / Int16ub,
)
_POWER_TIER = Struct("power_w" / Int16ub, "price_cent" / Int16ub, "duration_min" / Int16ub)


@dataclasses.dataclass(frozen=True, slots=True)
class PowerTier(BkvItem):
    """One power tier (10.4): up to ``power_w`` the price buys ``duration_min``."""

    power_w: float
    price_cent: int
    duration_min: int


@dataclasses.dataclass(frozen=True, slots=True)
class Node(BkvItem):
    """One socket of a node list: its number and MAC (12 hex digits)."""

    socket: int
    mac: str


@dataclasses.dataclass(frozen=True, slots=True)
class JackState(BkvItem):
    """One jack of a 0x1C state reply; ``port`` 0 = jack A."""

    port: int
    status_bits: int
    business_no: int
    voltage_v: float
    power_w: float
    current_a: float
    energy_kwh: float
    duration_min: int


@dataclasses.dataclass(frozen=True, slots=True)
class Period(BkvItem):
    """A voice/buzzer time window, ``"HH:MM"`` to ``"HH:MM"``."""

    start: str
    end: str


@dataclasses.dataclass(frozen=True, slots=True)
class _EndHead(InnerMessage):
    """The socket and jack block shared by the end reports (7.3)."""

    socket: int
    firmware_version: int
    temperature_c: int
    signal_strength: int
    port: int
    status_bits: int
    business_no: int
    power_w: float
    current_a: float
    energy_kwh: float
    duration_min: int


# === 5. 0x0000 heartbeat ==================================================================


@message(
    HEARTBEAT,
    UP,
    wire=Struct(
        "iccid" / Bytes(20),
        "firmware_version" / Bytes(8),
        "signal_strength" / Int8ub,
    ),
    units={"iccid": TEXT, "firmware_version": TEXT},
)
@dataclasses.dataclass(frozen=True, slots=True)
class Heartbeat(FixedMessage):
    """0x0000 gateway heartbeat, every minute (5); answer with :class:`HeartbeatReply`."""

    iccid: str
    firmware_version: str
    signal_strength: int


@message(HEARTBEAT, DOWN, wire=Struct("server_time" / Bytes(7)), units={"server_time": BCD_TIME})
@dataclasses.dataclass(frozen=True, slots=True)
class HeartbeatReply(FixedMessage):
    """The server's answer to a heartbeat: its local time, ``"YYYY-MM-DDThh:mm:ss"``."""

    server_time: str


# === 6. 0x0005 node list ==================================================================


@node_list(
    0x08,
    DOWN,
    Struct("channel" / Int8ub, "nodes" / GreedyRange(Struct("socket" / Int8ub, "mac" / Bytes(6)))),
    items={"nodes": Node},
)
@dataclasses.dataclass(frozen=True, slots=True)
class NodeListRefresh(InnerMessage):
    """0x0005/0x08 replace the gateway's node list (6.1); ``channel`` 1-15."""

    channel: int
    nodes: tuple[Node, ...]


_RESULT = Struct("result" / Int8ub)


@node_list(0x08, UP, _RESULT)
@dataclasses.dataclass(frozen=True, slots=True)
class NodeListRefreshReply(_Result, InnerMessage):
    """The gateway's answer to 0x08."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {"result": enums.RESULT}

    result: int


@node_list(0x09, DOWN, Struct("socket" / Int8ub, "mac" / Bytes(6)))
@dataclasses.dataclass(frozen=True, slots=True)
class NodeAdd(InnerMessage):
    """0x0005/0x09 add one socket to the gateway (6.2)."""

    socket: int
    mac: str


@node_list(0x09, UP, _RESULT)
@dataclasses.dataclass(frozen=True, slots=True)
class NodeAddReply(_Result, InnerMessage):
    """The gateway's answer to 0x09."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {"result": enums.RESULT}

    result: int


@node_list(0x0A, DOWN, Struct("socket" / Int8ub, "mac" / Bytes(6)), register=False)
@dataclasses.dataclass(frozen=True, slots=True)
class NodeDelete(InnerMessage):
    """Delete one socket: UNCONFIRMED sub-command 0x0A with the 0x09 layout (6.3).

    The guide omits this section; integrators use 0x0A. The class is for encoding
    only and is not registered for decoding: as the reference asks, a 0x0005/0x0A
    frame decodes as :class:`UnknownSubCommand` with its raw ``params_hex``. Test on a
    gateway before relying on it.
    """

    socket: int
    mac: str


# === 7. 0x0015 control and report family ================================================


@control(0x1D, DOWN, Struct("socket" / Int8ub))
@dataclasses.dataclass(frozen=True, slots=True)
class SocketQuery(InnerMessage):
    """0x0015/0x1D query a socket's state (7.1).

    Real gateways may answer with a 0x1000/0x1017 status cluster (seq 0) instead of
    the documented 0x1C reply (bkv.md 15): accept either.
    """

    socket: int


_SOCKET_STATE = Struct(
    "socket" / Int8ub,
    "firmware_version" / Int16ub,
    "temperature_c" / Int8ub,
    "signal_strength" / Int8ub,
    "ports"
    / GreedyRange(
        Struct(
            "port" / Int8ub,
            "status_bits" / Int8ub,
            "business_no" / Int16ub,
            "voltage_v" / Int16ub,
            "power_w" / Int16ub,
            "current_a" / Int16ub,
            "energy_kwh" / Int16ub,
            "duration_min" / Int16ub,
        )
    ),
)
_SOCKET_STATE_UNITS = {
    "ports[].voltage_v": DECI,
    "ports[].power_w": DECI,
    "ports[].current_a": MILLI,
    "ports[].energy_kwh": MILLI,
}


@control(0x1C, UP, _SOCKET_STATE, units=_SOCKET_STATE_UNITS, items={"ports": JackState})
@dataclasses.dataclass(frozen=True, slots=True)
class SocketState(InnerMessage):
    """The socket's state, answering 0x1D; the guide's example carries sub-command 0x1C."""

    socket: int
    firmware_version: int
    temperature_c: int
    signal_strength: int
    ports: tuple[JackState, ...]


@control(0x1D, UP, _SOCKET_STATE, units=_SOCKET_STATE_UNITS, items={"ports": JackState})
@dataclasses.dataclass(frozen=True, slots=True)
class SocketState1D(SocketState):
    """The same state reply carrying sub-command 0x1D, as the guide's annotation says (B2)."""


@control(
    0x07,
    DOWN,
    Struct(
        "socket" / Int8ub,
        "port" / Int8ub,
        "switch" / Int8ub,
        "charge_mode" / Int8ub,
        "duration_min" / Int16ub,
        "energy_kwh" / Int16ub,
    ),
    units={"energy_kwh": MILLI},
)
@dataclasses.dataclass(frozen=True, slots=True)
class ChargeControl(InnerMessage):
    """0x0015/0x07 switch a jack on or off by time or energy (7.2).

    ``charge_mode``: 1 = by time, 0 = by energy (this sub-command's own coding);
    ``duration_min`` 1-900; ``energy_kwh`` in 0.001 kWh steps, 0 when by time.
    """

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {
        "switch": enums.SWITCH,
        "charge_mode": enums.CHARGE_MODE_0x07,
    }

    socket: int
    port: int
    switch: int
    charge_mode: int
    duration_min: int
    energy_kwh: float


@control(
    0x07,
    UP,
    Struct("result" / Int8ub, "socket" / Int8ub, "port" / Int8ub, "business_no" / Int16ub),
)
@dataclasses.dataclass(frozen=True, slots=True)
class ChargeControlReply(_Result, InnerMessage):
    """The socket's answer to 0x07 with the business number of the new session."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {"result": enums.RESULT}

    result: int
    socket: int
    port: int
    business_no: int


@control(0x02, UP, Struct(*_END_HEAD), units=_JACK_UNITS)
@dataclasses.dataclass(frozen=True, slots=True)
class EndReport(_EndHead):
    """0x0015/0x02 end of a time/energy session (7.3).

    Real gateways resend it every ~10 s until acknowledged; an acknowledgement in the
    0x0C form (:class:`CardEndAck`, socket + result 1) stops them (bkv.md 15). Treat
    resends as duplicates. Do not derive the stop cause from ``status_bits``.
    """


@control(
    0x17,
    DOWN,
    Struct(
        "socket" / Int8ub,
        "port" / Int8ub,
        "switch" / Int8ub,
        "amount_cent" / Int16ub,
        "tier_count" / Int8ub,
        "tiers" / Array(this.tier_count, _POWER_TIER),
    ),
    units={"tiers[].power_w": DECI},
    items={"tiers": PowerTier},
)
@dataclasses.dataclass(frozen=True, slots=True)
class PowerTierControl(InnerMessage):
    """0x0015/0x17 switch on by power tiers for a paid amount (7.4); at most 5 tiers."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {"switch": enums.SWITCH}

    socket: int
    port: int
    switch: int
    amount_cent: int
    tiers: tuple[PowerTier, ...]

    def derived_fields(self) -> dict[str, Any]:
        return {"tier_count": len(self.tiers)}


@control(
    0x18,
    UP,
    Struct(
        *_END_HEAD,
        "end_time" / Bytes(7),
        "end_reason" / Int8ub,
        "amount_cent" / Int16ub,
        "settlement_power_w" / Int16ub,
        "tier_count" / Int8ub,
        "tier_durations_min" / Array(this.tier_count, Int16ub),
    ),
    units={**_JACK_UNITS, "end_time": BIN_TIME, "settlement_power_w": DECI},
)
@dataclasses.dataclass(frozen=True, slots=True)
class PowerTierEndReport(_EndHead):
    """0x0015/0x18 end of a power-tier session (7.5); ``end_time`` is binary here."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {"end_reason": enums.END_REASONS.as_dict()}

    end_time: str
    end_reason: int
    amount_cent: int
    settlement_power_w: float
    tier_durations_min: tuple[int, ...]

    def derived_fields(self) -> dict[str, Any]:
        return {"tier_count": len(self.tier_durations_min)}


@control(
    0x0B,
    UP,
    Struct(
        "socket" / Int8ub,
        "port" / Int8ub,
        "business_no" / Int16ub,
        "status_bits" / Int8ub,
        "card_id" / Bytes(6),
        "offline_card_params" / Bytes(20),
    ),
)
@dataclasses.dataclass(frozen=True, slots=True)
class CardSwipe(InnerMessage):
    """0x0015/0x0B a card was swiped (7.6); answer with :class:`CardOrder`."""

    socket: int
    port: int
    business_no: int
    status_bits: int
    card_id: str
    offline_card_params: str


@control(
    0x0B,
    DOWN,
    Struct(
        "socket" / Int8ub,
        "port" / Int8ub,
        "business_no" / Int16ub,
        "switch" / Int8ub,
        "charge_mode" / Int8ub,
        "duration_raw" / Int16ub,
        "energy_kwh" / Int16ub,
        optional_tail(
            (
                "amount_cent" / Int16ub,
                "tier_count" / Int8ub,
                "tiers" / Array(this.tier_count, _POWER_TIER),
            )
        ),
    ),
    units={"energy_kwh": MILLI, "tiers[].power_w": DECI},
    items={"tiers": PowerTier},
)
@dataclasses.dataclass(frozen=True, slots=True)
class CardOrder(InnerMessage):
    """0x0015/0x0B the server's order for a swiped card (7.6).

    ``charge_mode`` 1 = by time, 3 = by power tiers (then ``amount_cent`` and
    ``tiers`` follow). ``duration_raw``: the unit is not confirmed (bkv.md 14.3).
    """

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {
        "switch": enums.SWITCH,
        "charge_mode": enums.CHARGE_MODE,
    }

    socket: int
    port: int
    business_no: int
    switch: int
    charge_mode: int
    duration_raw: int
    energy_kwh: float
    amount_cent: int | Absent = ABSENT
    tiers: tuple[PowerTier, ...] | Absent = ABSENT

    def derived_fields(self) -> dict[str, Any]:
        if self.tiers is ABSENT:
            return {}
        return {"tier_count": len(self.tiers)}


@control(0x0F, UP, Struct("socket" / Int8ub, "port" / Int8ub, "result" / Int8ub))
@dataclasses.dataclass(frozen=True, slots=True)
class CardOrderAck(_Result, InnerMessage):
    """0x0015/0x0F the socket confirms a card order (same ``seq`` as the order)."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {"result": enums.RESULT}

    socket: int
    port: int
    result: int


@control(
    0x0C,
    UP,
    Struct(
        *_END_HEAD,
        "card_id" / Bytes(6),
        "card_type" / Int8ub,
        "charge_mode" / Int8ub,
        "amount_cent" / Int16ub,
        "settlement_power_w" / Int16ub,
        "tier_count" / Int8ub,
        "tier_durations_min" / Array(this.tier_count, Int16ub),
    ),
    units={**_JACK_UNITS, "settlement_power_w": DECI},
)
@dataclasses.dataclass(frozen=True, slots=True)
class CardEndReport(_EndHead):
    """0x0015/0x0C end of a card session (7.6); acknowledge with :class:`CardEndAck`."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {
        "card_type": enums.CARD_TYPE,
        "charge_mode": enums.CHARGE_MODE,
    }

    card_id: str
    card_type: int
    charge_mode: int
    amount_cent: int
    settlement_power_w: float
    tier_durations_min: tuple[int, ...]

    def derived_fields(self) -> dict[str, Any]:
        return {"tier_count": len(self.tier_durations_min)}


@control(0x0C, DOWN, Struct("socket" / Int8ub, "result" / Int8ub))
@dataclasses.dataclass(frozen=True, slots=True)
class CardEndAck(_Result, InnerMessage):
    """0x0015/0x0C the server acknowledges an end report (``result`` 1 = OK).

    Real gateways also stop resending 0x02 end reports when answered with this.
    """

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {"result": enums.RESULT}

    socket: int
    result: int


@control(0x1A, UP, Struct("socket" / Int8ub, "port" / Int8ub, "card_id" / Bytes(6)))
@dataclasses.dataclass(frozen=True, slots=True)
class BalanceQuery(InnerMessage):
    """0x0015/0x1A the socket asks for a card's balance (7.7)."""

    socket: int
    port: int
    card_id: str


@control(
    0x1A,
    DOWN,
    Struct("socket" / Int8ub, "port" / Int8ub, "card_id" / Bytes(6), "balance_cent" / Int32ub),
)
@dataclasses.dataclass(frozen=True, slots=True)
class BalanceReply(InnerMessage):
    """The server's answer to 0x1A: the balance in fen."""

    socket: int
    port: int
    card_id: str
    balance_cent: int


@control(
    0x1B,
    DOWN,
    Struct(
        "socket" / Int8ub,
        "port" / Int8ub,
        "buzzer" / Int8ub,
        "voice" / Int8ub,
        "period_count" / Int8ub,
        "periods" / Array(this.period_count, Struct("start" / Bytes(2), "end" / Bytes(2))),
    ),
    units={"periods[].start": HHMM, "periods[].end": HHMM},
    items={"periods": Period},
)
@dataclasses.dataclass(frozen=True, slots=True)
class VoiceWindow(InnerMessage):
    """0x0015/0x1B when voice prompts are allowed (7.8); ``socket`` 254 = all sockets."""

    socket: int
    port: int
    buzzer: int
    voice: int
    periods: tuple[Period, ...]

    def derived_fields(self) -> dict[str, Any]:
        return {"period_count": len(self.periods)}


@control(0x1B, UP, Struct("socket" / Int8ub, "port" / Int8ub, "result" / Int8ub))
@dataclasses.dataclass(frozen=True, slots=True)
class VoiceWindowReply(_Result, InnerMessage):
    """The socket's answer to 0x1B."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {"result": enums.RESULT}

    socket: int
    port: int
    result: int


# === 8. 0x0007 OTA ==========================================================================


@message(
    OTA,
    DOWN,
    wire=Struct(
        "target" / Int8ub,
        "ftp_ip" / Bytes(4),
        "ftp_port" / Int16ub,
        "file_name" / Bytes(13),
    ),
    units={"ftp_ip": IPV4, "file_name": TEXT},
)
@dataclasses.dataclass(frozen=True, slots=True)
class OtaUpgrade(FixedMessage):
    """0x0007 make the gateway fetch firmware by FTP (8); the answer is undocumented."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {"target": enums.OTA_TARGET}

    target: int
    ftp_ip: str
    ftp_port: int
    file_name: str


# === anything else =========================================================================


@dataclasses.dataclass(frozen=True, slots=True)
class UnknownSubCommand(BkvMessage):
    """A 0x0005/0x0015 sub-command (or direction) without a layout; parameters kept raw."""

    outer_command: int
    sub_cmd: int
    params_hex: str
    unknown_direction: Direction = Direction.UP

    @property
    def wire_command(self) -> int:
        return self.outer_command

    @property
    def wire_direction(self) -> Direction:
        return self.unknown_direction

    def payload(self) -> bytes:
        params = _unhex(self.params_hex, "params_hex")
        if not 0 <= self.sub_cmd <= 0xFF:
            raise EncodeError(f"sub_cmd {self.sub_cmd} is not a byte", field="sub_cmd")
        if len(params) > 0xFFFF:
            raise EncodeError("params_hex too long for the inner length", field="params_hex")
        return _INNER.pack(len(params), self.sub_cmd) + params

    def header_fields(self) -> dict[str, Any]:
        return {"inner_length": len(self.params_hex) // 2, "sub_cmd": self.sub_cmd}

    def body_fields(self) -> dict[str, Any]:
        return {"params_hex": self.params_hex, "unknown_sub_cmd": True}

    @classmethod
    def normalize_fields(cls, fields: dict[str, Any]) -> dict[str, Any]:
        """``command`` and ``direction`` become ``outer_command``/``unknown_direction``."""
        fields = strip_computed(cls, fields)
        fields.pop("unknown_sub_cmd", None)
        return _unknown_head(fields, "outer_command")


@dataclasses.dataclass(frozen=True, slots=True)
class UnknownMessage(BkvMessage):
    """An outer command (or direction) without a layout; the payload is kept raw."""

    unknown_command: int
    payload_hex: str
    unknown_direction: Direction = Direction.UP

    @property
    def wire_command(self) -> int:
        return self.unknown_command

    @property
    def wire_direction(self) -> Direction:
        return self.unknown_direction

    def payload(self) -> bytes:
        return _unhex(self.payload_hex, "payload_hex")

    def body_fields(self) -> dict[str, Any]:
        return {"payload_hex": self.payload_hex, "unknown_command": True}

    @classmethod
    def normalize_fields(cls, fields: dict[str, Any]) -> dict[str, Any]:
        """``command`` and ``direction`` become ``unknown_command``/``unknown_direction``."""
        fields = strip_computed(cls, fields)
        if isinstance(fields.get("unknown_command"), bool):  # the flag to_fields adds
            del fields["unknown_command"]
        return _unknown_head(fields, "unknown_command")


def _unknown_head(fields: dict[str, Any], command_field: str) -> dict[str, Any]:
    if "command" in fields:
        fields[command_field] = fields.pop("command")
    if "direction" in fields:
        fields["unknown_direction"] = fields.pop("direction")
    if "unknown_direction" in fields:
        fields["unknown_direction"] = as_direction(fields["unknown_direction"])
    return fields


for _cls in (UnknownSubCommand, UnknownMessage):
    _cls.command = -1
    _cls.direction = Direction.UP


def _unhex(value: str, field: str) -> bytes:
    try:
        return bytes.fromhex(value)
    except (TypeError, ValueError):
        raise EncodeError(f"{field} is not hex", field=field) from None
