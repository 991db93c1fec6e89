"""Every AP3000 message, declared once with construct.

Each class below is one command in one direction. ``WIRE`` is the payload as
construct declares it (raw integers and bytes, canonical names); ``UNITS`` says how
the typed layer scales them. Section numbers refer to shared/protocols/ap3000.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import construct as cs
from construct import Array, Bytes, GreedyBytes, Int8ul, Int16ul, Int32ul, Struct, this

from .._base import ABSENT, Absent, Direction, Item, Message
from .._layout import Codec, lazy_codec, optional_tail
from .._units import CENTI, DECI, MILLI, PHY_ID, TEMP65, Ascii, Converter
from . import _enums as E  # noqa: N812 - short name for the enumeration tables

UP = Direction.UP
DOWN = Direction.DOWN

#: (command, direction) -> message class
REGISTRY: dict[tuple[int, Direction], type[Ap3000Message]] = {}

_M = TypeVar("_M", bound="type[Ap3000Message]")


@dataclasses.dataclass(frozen=True, slots=True)
class Ap3000Message(Message):
    """Base of AP3000 messages: the frame's physical id and message id come first.

    ``phy_id`` is the canonical 8-hex-digit id (``"04CEAA40"``). ``trailing_hex`` holds
    payload bytes after the last field this library knows (newer firmware).
    """

    protocol: ClassVar[str] = "ap3000"
    WIRE: ClassVar[cs.Struct] = Struct()
    codec: ClassVar[Codec]

    phy_id: str
    msg_id: int
    trailing_hex: str = dataclasses.field(default="", kw_only=True)

    @classmethod
    def item_types(cls) -> Mapping[str, type[Item]]:
        codec: Codec | None = getattr(cls, "codec", None)  # UnknownMessage has none
        return codec.items if codec is not None else {}


def message(
    command: int,
    direction: Direction,
    wire: cs.Struct | None = None,
    units: Mapping[str, Converter] | None = None,
    items: Mapping[str, type[Item]] | None = None,
) -> Callable[[_M], _M]:
    """Register a message class for ``(command, direction)``; its codec is compiled
    from the declaration on first use (:class:`~chargeproto._layout.LazyCodec`)."""

    def register(cls: _M) -> _M:
        key = (command, direction)
        if key in REGISTRY:
            raise TypeError(f"{cls.__name__}: {command:#04x} {direction} is {REGISTRY[key]}")
        cls.command = command
        cls.direction = direction
        layout = cls.WIRE if wire is None else wire
        cls.WIRE = layout
        lazy_codec(cls, layout, endian="<", head=("phy_id", "msg_id"), units=units, items=items)
        REGISTRY[key] = cls
        return cls

    return register


# --- shared shapes ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ResultReply(Ap3000Message):
    """A reply whose payload is one result byte; ``success`` is ``result == 0``."""

    WIRE: ClassVar[cs.Struct] = Struct("result" / Int8ul)
    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {"result": E.RESULT_OK}

    result: int

    @property
    def success(self) -> bool:
        """True when the peer reports success (result 0)."""
        return self.result == 0

    def derived_fields(self) -> dict[str, Any]:
        return {"success": self.success}


@dataclasses.dataclass(frozen=True, slots=True)
class EmptyMessage(Ap3000Message):
    """A message with an empty payload (requests, queries, triggers)."""


def _with_balance(rate_mode: int, balance_or_expiry: int) -> dict[str, Any]:
    if rate_mode == 1:
        return {"expiry_unix": balance_or_expiry}
    return {"balance_cent": balance_or_expiry}


def _raw_balance(fields: dict[str, Any]) -> dict[str, Any]:
    """``from_fields`` helper: accept balance_cent / expiry_unix for balance_or_expiry."""
    if "balance_or_expiry" not in fields:
        for name in ("balance_cent", "expiry_unix"):
            if name in fields:
                fields["balance_or_expiry"] = fields[name]
    fields.pop("balance_cent", None)
    fields.pop("expiry_unix", None)
    return fields


def _raw_limit(fields: dict[str, Any]) -> dict[str, Any]:
    """``from_fields`` helper: accept duration_s / energy_kwh for charge_limit."""
    if "charge_limit" not in fields:
        if "energy_kwh" in fields:
            fields["charge_limit"] = round(fields["energy_kwh"] * 100)
        elif "duration_s" in fields:
            fields["charge_limit"] = fields["duration_s"]
    fields.pop("duration_s", None)
    fields.pop("energy_kwh", None)
    return fields


def _with_limit(rate_mode: int, charge_limit: int) -> dict[str, Any]:
    if rate_mode == 2:
        return {"energy_kwh": charge_limit / 100}
    return {"duration_s": charge_limit}


# --- items ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class PortState(Item):
    """One port of a 0x21 heartbeat."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {"status": E.PORT_STATUS}

    port: int
    status: int


@dataclasses.dataclass(frozen=True, slots=True)
class LegacyPortState(Item):
    """One port of a legacy 0x01 heartbeat."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {"status": E.PORT_STATUS}

    port: int
    status: int
    power_w: float
    peak_power_w: float


@dataclasses.dataclass(frozen=True, slots=True)
class SubDeviceVersion(Item):
    """One entry of a host's 0x35 report."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {"device_type": E.DEVICE_TYPE}

    device_type: int
    reserved: int
    min_firmware_version: int
    phy_id: str


# === 8. device to server ==============================================================


@message(
    0x01,
    UP,
    Struct(
        "firmware_version" / Int16ul,
        "voltage_v" / Int16ul,
        "port_count" / Int8ul,
        "ports[].status" / Array(this.port_count, Int8ul),
        "ports[].power_w" / Array(this.port_count, Int16ul),
        "ports[].peak_power_w" / Array(this.port_count, Int16ul),
        "virtual_id" / Int8ul,
        "signal_strength" / Int8ul,
        "device_type" / Int8ul,
        "temperature_c" / Int8ul,
        optional_tail("work_mode" / Int8ul),
    ),
    units={
        "voltage_v": DECI,
        "ports[].power_w": DECI,
        "ports[].peak_power_w": DECI,
        "temperature_c": TEMP65,
    },
    items={"ports": LegacyPortState},
)
@dataclasses.dataclass(frozen=True, slots=True)
class LegacyHeartbeat(Ap3000Message):
    """0x01 legacy heartbeat (8.1); answer it or 0x21, never both."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {"device_type": E.DEVICE_TYPE}

    firmware_version: int
    voltage_v: float
    ports: tuple[LegacyPortState, ...]
    virtual_id: int
    signal_strength: int
    device_type: int
    temperature_c: int | None
    work_mode: int | Absent = ABSENT

    def derived_fields(self) -> dict[str, Any]:
        return {"port_count": len(self.ports)}


@message(0x01, DOWN)
@dataclasses.dataclass(frozen=True, slots=True)
class LegacyHeartbeatReply(ResultReply):
    """Server's answer to 0x01."""


@message(
    0x20,
    UP,
    Struct(
        "firmware_version" / Int16ul,
        "port_count" / Int8ul,
        "virtual_id" / Int8ul,
        "device_type" / Int8ul,
        optional_tail("work_mode" / Int8ul, "power_board_version" / Int16ul),
    ),
)
@dataclasses.dataclass(frozen=True, slots=True)
class Registration(Ap3000Message):
    """0x20 registration (8.2)."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {"device_type": E.DEVICE_TYPE}

    firmware_version: int
    port_count: int
    virtual_id: int
    device_type: int
    work_mode: int | Absent = ABSENT
    power_board_version: int | Absent = ABSENT


@message(0x20, DOWN)
@dataclasses.dataclass(frozen=True, slots=True)
class RegistrationReply(ResultReply):
    """Server's answer to 0x20."""


@message(
    0x21,
    UP,
    Struct(
        "voltage_v" / Int16ul,
        "port_count" / Int8ul,
        "ports[].status" / Array(this.port_count, Int8ul),
        "signal_strength" / Int8ul,
        "temperature_c" / Int8ul,
    ),
    units={"voltage_v": DECI, "temperature_c": TEMP65},
    items={"ports": PortState},
)
@dataclasses.dataclass(frozen=True, slots=True)
class Heartbeat(Ap3000Message):
    """0x21 heartbeat (8.3)."""

    voltage_v: float
    ports: tuple[PortState, ...]
    signal_strength: int
    temperature_c: int | None

    def derived_fields(self) -> dict[str, Any]:
        return {"port_count": len(self.ports)}


@message(0x21, DOWN)
@dataclasses.dataclass(frozen=True, slots=True)
class HeartbeatReply(ResultReply):
    """Server's answer to 0x21."""


@message(0x22, UP)
@dataclasses.dataclass(frozen=True, slots=True)
class TimeRequest(EmptyMessage):
    """0x22 device asks for the server time (8.4)."""


_TIME = Struct("timestamp_unix" / Int32ul)


@message(0x22, DOWN, _TIME)
@dataclasses.dataclass(frozen=True, slots=True)
class TimeReply(Ap3000Message):
    """Server time, answering 0x22."""

    timestamp_unix: int


@message(
    0x02,
    UP,
    Struct(
        "card_id" / Bytes(4),
        "card_type" / Int8ul,
        "port" / Int8ul,
        "balance_cent" / Int16ul,
        optional_tail(
            "timestamp_unix" / Int32ul,
            ("card2_length" / Int8ul, "card2" / Bytes(this.card2_length)),
        ),
    ),
)
@dataclasses.dataclass(frozen=True, slots=True)
class CardSwipe(Ap3000Message):
    """0x02 card swipe (8.5); ``port`` 0xFF = balance query only."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {"card_type": E.CARD_TYPE}

    card_id: str
    card_type: int
    port: int
    balance_cent: int
    timestamp_unix: int | Absent = ABSENT
    card2: str | Absent = ABSENT

    def derived_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"card_number": int(self.card_id, 16)}
        if self.card2 is not ABSENT:
            out["card2_length"] = len(self.card2) // 2
        return out


@message(
    0x02,
    DOWN,
    Struct(
        "card_id" / Bytes(4),
        "account_status" / Int8ul,
        "rate_mode" / Int8ul,
        "balance_or_expiry" / Int32ul,
        "port" / Int8ul,
    ),
)
@dataclasses.dataclass(frozen=True, slots=True)
class CardSwipeReply(Ap3000Message):
    """Server's verdict on a card swipe."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {
        "account_status": E.ACCOUNT_STATUS,
        "rate_mode": E.RATE_MODE,
    }

    card_id: str
    account_status: int
    rate_mode: int
    balance_or_expiry: int
    port: int

    def derived_fields(self) -> dict[str, Any]:
        return _with_balance(self.rate_mode, self.balance_or_expiry)

    @classmethod
    def normalize_fields(cls, fields: dict[str, Any]) -> dict[str, Any]:
        return _raw_balance(fields)


_SETTLEMENT_HEAD = (
    "duration_s" / Int16ul,
    "max_power_w" / Int16ul,
    "energy_kwh" / Int16ul,
    "port" / Int8ul,
    "start_mode" / Int8ul,
    "card_id" / Bytes(4),
    "stop_reason" / Int8ul,
    "order_id" / Bytes(16),
)
_SETTLEMENT_UNITS = {"max_power_w": DECI, "energy_kwh": CENTI, "second_max_power_w": DECI}
_SETTLEMENT_TEXTS = {"start_mode": E.START_MODE, "stop_reason": E.STOP_REASON}


@message(
    0x03,
    UP,
    Struct(
        *_SETTLEMENT_HEAD,
        optional_tail(
            "second_max_power_w" / Int16ul,
            "timestamp_unix" / Int32ul,
            "occupancy_duration_min" / Int16ul,
        ),
    ),
    units=_SETTLEMENT_UNITS,
)
@dataclasses.dataclass(frozen=True, slots=True)
class Settlement(Ap3000Message):
    """0x03 settlement (8.6): must be answered; resends repeat the same order."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = _SETTLEMENT_TEXTS

    duration_s: int
    max_power_w: float
    energy_kwh: float
    port: int
    start_mode: int
    card_id: str
    stop_reason: int
    order_id: str
    second_max_power_w: float | Absent = ABSENT
    timestamp_unix: int | Absent = ABSENT
    occupancy_duration_min: int | Absent = ABSENT


@message(0x03, DOWN)
@dataclasses.dataclass(frozen=True, slots=True)
class SettlementReply(ResultReply):
    """Server's acknowledgement of a settlement."""


@message(
    0x04,
    UP,
    Struct(
        "port" / Int8ul,
        "start_mode" / Int8ul,
        "card_id" / Bytes(4),
        "duration_s" / Int16ul,
        "order_id" / Bytes(16),
    ),
)
@dataclasses.dataclass(frozen=True, slots=True)
class OrderConfirm(Ap3000Message):
    """0x04 legacy order confirmation (8.7)."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {"start_mode": E.START_MODE}

    port: int
    start_mode: int
    card_id: str
    duration_s: int
    order_id: str


@message(0x04, DOWN, Struct("port" / Int8ul, "result" / Int8ul))
@dataclasses.dataclass(frozen=True, slots=True)
class OrderConfirmReply(Ap3000Message):
    """Server's answer to 0x04: port and result."""

    port: int
    result: int

    def derived_fields(self) -> dict[str, Any]:
        return {"success": self.result == 0}


@message(
    0x05,
    UP,
    Struct(
        optional_tail(
            "device_type" / Int8ul, "firmware_version" / Int16ul, "package_type" / Int32ul
        )
    ),
)
@dataclasses.dataclass(frozen=True, slots=True)
class UpgradeRequest(Ap3000Message):
    """0x05 the device asks for firmware (8.8); empty = legacy "restart the F8 upgrade"."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {"device_type": E.DEVICE_TYPE}

    device_type: int | Absent = ABSENT
    firmware_version: int | Absent = ABSENT
    package_type: int | Absent = ABSENT


@message(
    0x06,
    UP,
    Struct(
        "port" / Int8ul,
        "status" / Int8ul,
        "duration_s" / Int16ul,
        "energy_kwh" / Int16ul,
        "start_mode" / Int8ul,
        "power_w" / Int16ul,
        "max_power_w" / Int16ul,
        "min_power_w" / Int16ul,
        "avg_power_w" / Int16ul,
        "order_id" / Bytes(16),
        optional_tail(
            "period_energy_raw" / Int16ul,
            "peak_power_w" / Int16ul,
            "voltage_v" / Int16ul,
            "current_a" / Int16ul,
            "temperature_c" / Int8ul,
            "port_temperature_c" / Int8ul,
            "timestamp_unix" / Int32ul,
            "occupancy_duration_min" / Int16ul,
        ),
    ),
    units={
        "energy_kwh": CENTI,
        "power_w": DECI,
        "max_power_w": DECI,
        "min_power_w": DECI,
        "avg_power_w": DECI,
        "peak_power_w": DECI,
        "voltage_v": DECI,
        "current_a": MILLI,
        "temperature_c": TEMP65,
        "port_temperature_c": TEMP65,
    },
)
@dataclasses.dataclass(frozen=True, slots=True)
class PowerHeartbeat(Ap3000Message):
    """0x06 charging power heartbeat (8.9), every 5 min while a port charges; no reply."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {
        "status": E.CHARGING_STATUS,
        "start_mode": E.START_MODE,
    }

    port: int
    status: int
    duration_s: int
    energy_kwh: float
    start_mode: int
    power_w: float
    max_power_w: float
    min_power_w: float
    avg_power_w: float
    order_id: str
    period_energy_raw: int | Absent = ABSENT
    peak_power_w: float | Absent = ABSENT
    voltage_v: float | Absent = ABSENT
    current_a: float | Absent = ABSENT
    temperature_c: int | Absent | None = ABSENT
    port_temperature_c: int | Absent | None = ABSENT
    timestamp_unix: int | Absent = ABSENT
    occupancy_duration_min: int | Absent = ABSENT


@message(
    0x09,
    UP,
    Struct("status_raw" / Int16ul, "voltage_v" / Int16ul, "power_w" / Int32ul),
    units={"voltage_v": DECI, "power_w": DECI},
)
@dataclasses.dataclass(frozen=True, slots=True)
class TestModeReport(Ap3000Message):
    """0x09 test mode (8.10); sub-device to host only, decoded for completeness."""

    __test__: ClassVar[bool] = False  # not a pytest class

    status_raw: int
    voltage_v: float
    power_w: float


_SERVER_ADDRESS = Struct(
    "server_port" / Int16ul,
    "modem_type" / Int8ul,
    "socket_b_enable" / Int8ul,
    "server_address" / Bytes(46),
)
_SERVER_ADDRESS_UNITS = {"server_address": Ascii(45)}


@dataclasses.dataclass(frozen=True, slots=True)
class _ServerAddress(Ap3000Message):
    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {"modem_type": E.SERVER_MODEM_TYPE}

    server_port: int
    modem_type: int
    socket_b_enable: int
    server_address: str


@message(0x0A, UP, _SERVER_ADDRESS, units=_SERVER_ADDRESS_UNITS)
@dataclasses.dataclass(frozen=True, slots=True)
class LocalServerAddress(_ServerAddress):
    """0x0A set host server address (8.10); sub-device to host only."""


@message(0x41, UP, Struct("port_count" / Int8ul, "door_status" / Int32ul, "fan_status" / Int32ul))
@dataclasses.dataclass(frozen=True, slots=True)
class CabinetHeartbeat(Ap3000Message):
    """0x41 cabinet heartbeat (8.11): door and fan bits."""

    port_count: int
    door_status: int
    fan_status: int


@message(
    0x42,
    UP,
    Struct("alarm_type" / Int8ul, "port" / Int8ul, optional_tail("trigger_mask" / Int8ul)),
)
@dataclasses.dataclass(frozen=True, slots=True)
class AlarmPush(Ap3000Message):
    """0x42 alarm push (8.12)."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {"alarm_type": E.ALARM_TYPE}

    alarm_type: int
    port: int
    trigger_mask: int | Absent = ABSENT


@message(0x43, UP, Struct(*_SETTLEMENT_HEAD), units=_SETTLEMENT_UNITS)
@dataclasses.dataclass(frozen=True, slots=True)
class ChargeFinished(Ap3000Message):
    """0x43 cabinet: charge finished, not settled (8.13)."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = _SETTLEMENT_TEXTS

    duration_s: int
    max_power_w: float
    energy_kwh: float
    port: int
    start_mode: int
    card_id: str
    stop_reason: int
    order_id: str


@message(0x44, UP, Struct("push_type" / Int8ul, "port" / Int8ul, "order_id" / Bytes(16)))
@dataclasses.dataclass(frozen=True, slots=True)
class PortPush(Ap3000Message):
    """0x44 port push (8.14): 1 = cabinet door not properly closed."""

    push_type: int
    port: int
    order_id: str


# === 9. server to device ==============================================================


@message(0x81, DOWN)
@dataclasses.dataclass(frozen=True, slots=True)
class QueryStatus(EmptyMessage):
    """0x81 query device state (9.1); the device answers with 0x20/0x01/0x21."""


@message(
    0x82,
    DOWN,
    Struct(
        "rate_mode" / Int8ul,
        "balance_or_expiry" / Int32ul,
        "port" / Int8ul,
        "charge_command" / Int8ul,
        "charge_limit" / Int16ul,
        "order_id" / Bytes(16),
        optional_tail(
            "max_charge_duration_s" / Int16ul,
            "overload_power_w" / Int16ul,
            "qr_light" / Int8ul,
            "long_charge_mode" / Int8ul,
            "extra_float_time_s" / Int16ul,
            "short_circuit_check" / Int8ul,
            "unplug_detect_disable" / Int8ul,
            "force_full_stop" / Int8ul,
            "full_power_w" / Int8ul,
            "full_power_max_time_min" / Int8ul,
        ),
    ),
    units={"overload_power_w": DECI},
)
@dataclasses.dataclass(frozen=True, slots=True)
class ChargeControl(Ap3000Message):
    """0x82 start (``charge_command`` 1) or stop (0) charging (9.2).

    ``charge_limit`` is seconds, or 0.01 kWh when ``rate_mode`` is 2; 0 = until full.
    Stopping needs the ``order_id`` of the running order.
    """

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {"rate_mode": E.RATE_MODE}

    rate_mode: int
    balance_or_expiry: int
    port: int
    charge_command: int
    charge_limit: int
    order_id: str
    max_charge_duration_s: int | Absent = ABSENT
    overload_power_w: float | Absent = ABSENT
    qr_light: int | Absent = ABSENT
    long_charge_mode: int | Absent = ABSENT
    extra_float_time_s: int | Absent = ABSENT
    short_circuit_check: int | Absent = ABSENT
    unplug_detect_disable: int | Absent = ABSENT
    force_full_stop: int | Absent = ABSENT
    full_power_w: int | Absent = ABSENT
    full_power_max_time_min: int | Absent = ABSENT

    def derived_fields(self) -> dict[str, Any]:
        return {
            **_with_balance(self.rate_mode, self.balance_or_expiry),
            **_with_limit(self.rate_mode, self.charge_limit),
        }

    @classmethod
    def normalize_fields(cls, fields: dict[str, Any]) -> dict[str, Any]:
        return _raw_limit(_raw_balance(fields))


@message(
    0x82,
    UP,
    Struct(
        "result" / Int8ul,
        optional_tail("order_id" / Bytes(16), "port" / Int8ul, "waiting_ports" / Int16ul),
    ),
)
@dataclasses.dataclass(frozen=True, slots=True)
class ChargeControlReply(Ap3000Message):
    """The device's answer to 0x82; real piles may stop after ``result``."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {"result": E.CHARGE_RESULT}

    result: int
    order_id: str | Absent = ABSENT
    port: int | Absent = ABSENT
    waiting_ports: int | Absent = ABSENT

    def derived_fields(self) -> dict[str, Any]:
        return {"success": self.result == 0}


@message(0x8A, DOWN, Struct("rate_mode" / Int8ul, "port" / Int8ul, "charge_limit" / Int16ul))
@dataclasses.dataclass(frozen=True, slots=True)
class ModifyChargeLimit(Ap3000Message):
    """0x8A change the duration or energy of a running charge (9.3)."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {"rate_mode": E.MODIFY_RATE_MODE}

    rate_mode: int
    port: int
    charge_limit: int

    def derived_fields(self) -> dict[str, Any]:
        return _with_limit(self.rate_mode, self.charge_limit)

    @classmethod
    def normalize_fields(cls, fields: dict[str, Any]) -> dict[str, Any]:
        return _raw_limit(fields)


@message(0x8A, UP)
@dataclasses.dataclass(frozen=True, slots=True)
class ModifyChargeLimitReply(ResultReply):
    """The device's answer to 0x8A."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {"result": E.MODIFY_RESULT}


_RUNNING_PARAMS_1 = Struct(
    "unplug_power_w" / Int16ul,
    "unplug_detect_time_s" / Int16ul,
    "float_percent" / Int8ul,
    "float_detect_time_s" / Int16ul,
    "float_time_s" / Int16ul,
    "heartbeat_interval_s" / Int16ul,
)


@dataclasses.dataclass(frozen=True, slots=True)
class _RunningParams1(Ap3000Message):
    unplug_power_w: float
    unplug_detect_time_s: int
    float_percent: int
    float_detect_time_s: int
    float_time_s: int
    heartbeat_interval_s: int


@message(0x83, DOWN, _RUNNING_PARAMS_1, units={"unplug_power_w": DECI})
@dataclasses.dataclass(frozen=True, slots=True)
class SetRunningParams1(_RunningParams1):
    """0x83 set running parameters 1.1 (9.4)."""


@message(0x90, UP, _RUNNING_PARAMS_1, units={"unplug_power_w": DECI})
@dataclasses.dataclass(frozen=True, slots=True)
class RunningParams1(_RunningParams1):
    """The device's answer to 0x90: its running parameters 1.1."""


_RUNNING_PARAMS_2 = Struct(
    "dynamic_overload_power_w" / Int16ul,
    "dynamic_overload_detect_time_s" / Int16ul,
    "dynamic_overload_start_time_s" / Int16ul,
    "unplug_interference_power_w" / Int8ul,
    "unplug_interference_time_s" / Int16ul,
    "float_second_time_point_s" / Int16ul,
    "float_second_detect_time_s" / Int16ul,
    "min_power_w" / Int16ul,
    "min_power_time_point_s" / Int16ul,
    "second_max_power_time_point_s" / Int16ul,
    "ambient_alarm_temperature_c" / Int8ul,
    "port_alarm_temperature_c" / Int8ul,
    "unplug_detect_mode" / Int8ul,
    optional_tail("qr_light" / Int8ul),
)
_RUNNING_PARAMS_2_UNITS = {
    "dynamic_overload_power_w": DECI,
    "unplug_interference_power_w": DECI,
    "min_power_w": DECI,
}


@dataclasses.dataclass(frozen=True, slots=True)
class _RunningParams2(Ap3000Message):
    dynamic_overload_power_w: float
    dynamic_overload_detect_time_s: int
    dynamic_overload_start_time_s: int
    unplug_interference_power_w: float
    unplug_interference_time_s: int
    float_second_time_point_s: int
    float_second_detect_time_s: int
    min_power_w: float
    min_power_time_point_s: int
    second_max_power_time_point_s: int
    ambient_alarm_temperature_c: int
    port_alarm_temperature_c: int
    unplug_detect_mode: int
    qr_light: int | Absent = ABSENT


@message(0x84, DOWN, _RUNNING_PARAMS_2, units=_RUNNING_PARAMS_2_UNITS)
@dataclasses.dataclass(frozen=True, slots=True)
class SetRunningParams2(_RunningParams2):
    """0x84 set running parameters 1.2 (9.5); alarm temperatures have no offset."""


@message(0x91, UP, _RUNNING_PARAMS_2, units=_RUNNING_PARAMS_2_UNITS)
@dataclasses.dataclass(frozen=True, slots=True)
class RunningParams2(_RunningParams2):
    """The device's answer to 0x91: its running parameters 1.2."""


_LIMITS = Struct(
    "max_charge_duration_s" / Int16ul,
    "overload_power_w" / Int16ul,
    optional_tail("overvoltage_v" / Int16ul, "undervoltage_v" / Int16ul),
)
_LIMITS_UNITS = {"overload_power_w": DECI, "overvoltage_v": DECI, "undervoltage_v": DECI}


@dataclasses.dataclass(frozen=True, slots=True)
class _Limits(Ap3000Message):
    max_charge_duration_s: int
    overload_power_w: float
    overvoltage_v: float | Absent = ABSENT
    undervoltage_v: float | Absent = ABSENT


@message(0x85, DOWN, _LIMITS, units=_LIMITS_UNITS)
@dataclasses.dataclass(frozen=True, slots=True)
class SetLimits(_Limits):
    """0x85 set maximum duration, overload power and voltage limits (9.6)."""


@message(0x92, UP, _LIMITS, units=_LIMITS_UNITS)
@dataclasses.dataclass(frozen=True, slots=True)
class Limits(_Limits):
    """The device's answer to 0x92: its limits."""


_CARD_PARAMS = Struct("card_sector" / Int8ul, "user_card_key" / Bytes(6), "new_card_key" / Bytes(6))


@dataclasses.dataclass(frozen=True, slots=True)
class _CardParams(Ap3000Message):
    card_sector: int
    user_card_key: str
    new_card_key: str


@message(0x86, DOWN, _CARD_PARAMS)
@dataclasses.dataclass(frozen=True, slots=True)
class SetCardParams(_CardParams):
    """0x86 set user-card parameters (9.7)."""


@message(0x93, UP, _CARD_PARAMS)
@dataclasses.dataclass(frozen=True, slots=True)
class CardParams(_CardParams):
    """The device's answer to 0x93: its card parameters."""


@message(0x87, DOWN)
@dataclasses.dataclass(frozen=True, slots=True)
class Reboot(EmptyMessage):
    """0x87 reboot the device (9.8)."""


@message(0x88, DOWN)
@dataclasses.dataclass(frozen=True, slots=True)
class ClearStorage(EmptyMessage):
    """0x88 clear the device's storage (9.9)."""


@message(
    0x89,
    DOWN,
    Struct("interrupt" / Int8ul, "voice_count" / Int8ul, "voice_segments" / GreedyBytes),
)
@dataclasses.dataclass(frozen=True, slots=True)
class PlayVoice(Ap3000Message):
    """0x89 play voice (9.10); reserved by the vendor, segment codes unpublished."""

    interrupt: int
    voice_count: int
    voice_segments: str


@message(0x8B, DOWN, Struct("eeprom_address" / Int16ul, "data_length" / Int8ul))
@dataclasses.dataclass(frozen=True, slots=True)
class ReadEeprom(Ap3000Message):
    """0x8B read up to 32 bytes of EEPROM (9.11)."""

    eeprom_address: int
    data_length: int


@message(0x8B, UP, Struct("result" / Int8ul, "data" / GreedyBytes))
@dataclasses.dataclass(frozen=True, slots=True)
class ReadEepromReply(Ap3000Message):
    """The device's answer to 0x8B: result and the bytes read."""

    result: int
    data: str

    def derived_fields(self) -> dict[str, Any]:
        return {"success": self.result == 0}


@message(
    0x8C,
    DOWN,
    Struct(
        "eeprom_address" / Int16ul,
        "data_length" / Int8ul,
        "data" / Bytes(this.data_length),
    ),
)
@dataclasses.dataclass(frozen=True, slots=True)
class WriteEeprom(Ap3000Message):
    """0x8C write up to 32 bytes of EEPROM (9.12)."""

    eeprom_address: int
    data: str

    def derived_fields(self) -> dict[str, Any]:
        return {"data_length": len(self.data) // 2}


@message(0x8D, DOWN, Struct("work_mode" / Int8ul))
@dataclasses.dataclass(frozen=True, slots=True)
class SetWorkMode(Ap3000Message):
    """0x8D set work mode (9.13): 0 networked, 1 card."""

    work_mode: int


@message(
    0x8E,
    DOWN,
    Struct("main_screen_type" / Int8ul, "reserved" / Bytes(3), "qr_data" / Bytes(72)),
    units={"qr_data": Ascii(71)},
)
@dataclasses.dataclass(frozen=True, slots=True)
class SetQrCode(Ap3000Message):
    """0x8E set the QR code (9.14); at most 71 characters."""

    main_screen_type: int
    reserved: str
    qr_data: str


@message(0x8F, DOWN, Struct("tc_card_mode" / Int8ul))
@dataclasses.dataclass(frozen=True, slots=True)
class SetTcCardMode(Ap3000Message):
    """0x8F set TC card mode (9.15)."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {"tc_card_mode": E.TC_CARD_MODE}

    tc_card_mode: int


@message(0x90, DOWN)
@dataclasses.dataclass(frozen=True, slots=True)
class ReadRunningParams1(EmptyMessage):
    """0x90 read back the 0x83 parameters (9.16)."""


@message(0x91, DOWN)
@dataclasses.dataclass(frozen=True, slots=True)
class ReadRunningParams2(EmptyMessage):
    """0x91 read back the 0x84 parameters (9.16)."""


@message(0x92, DOWN)
@dataclasses.dataclass(frozen=True, slots=True)
class ReadLimits(EmptyMessage):
    """0x92 read back the 0x85 limits (9.16)."""


@message(0x93, DOWN)
@dataclasses.dataclass(frozen=True, slots=True)
class ReadCardParams(EmptyMessage):
    """0x93 read back the 0x86 card parameters (9.16)."""


@message(0x95, DOWN, Struct("qr_content" / Bytes(200)), units={"qr_content": Ascii(199)})
@dataclasses.dataclass(frozen=True, slots=True)
class TemporaryQrCode(Ap3000Message):
    """0x95 show a temporary QR code (9.17)."""

    qr_content: str


@message(0x96, DOWN, Struct("locate_duration_s" / Int8ul))
@dataclasses.dataclass(frozen=True, slots=True)
class Locate(Ap3000Message):
    """0x96 locate the device by sound and light (9.18)."""

    locate_duration_s: int


@message(0x97, DOWN, Struct("mute_mode" / Int8ul))
@dataclasses.dataclass(frozen=True, slots=True)
class SetRunningParams3(Ap3000Message):
    """0x97 set running parameters 1.3: mute (9.19)."""

    mute_mode: int


@message(0x72, DOWN, Struct("port" / Int8ul, "order_id" / Bytes(16)))
@dataclasses.dataclass(frozen=True, slots=True)
class CabinetStop(Ap3000Message):
    """0x72 cabinet: stop charging and keep the door shut (9.20)."""

    port: int
    order_id: str


@message(0x72, UP, Struct("result" / Int8ul, optional_tail("order_id" / Bytes(16))))
@dataclasses.dataclass(frozen=True, slots=True)
class CabinetStopReply(Ap3000Message):
    """The device's answer to 0x72."""

    result: int
    order_id: str | Absent = ABSENT

    def derived_fields(self) -> dict[str, Any]:
        return {"success": self.result == 0}


@message(0x98, DOWN, Struct("function" / Int8ul, "port" / Int8ul))
@dataclasses.dataclass(frozen=True, slots=True)
class MultiFunction(Ap3000Message):
    """0x98 multi-function (9.21): function 0 forces a cabinet door open."""

    function: int
    port: int


_FIRMWARE_200 = Struct("total_packets" / Int16ul, "packet_index" / Int16ul, "firmware" / Bytes(200))
_FIRMWARE_256 = Struct("total_packets" / Int16ul, "packet_index" / Int16ul, "firmware" / Bytes(256))
_FIRMWARE_REPLY = Struct("result" / Int8ul, "packet_index" / Int16ul)


@dataclasses.dataclass(frozen=True, slots=True)
class _FirmwarePacket(Ap3000Message):
    total_packets: int
    packet_index: int
    firmware: str

    def derived_fields(self) -> dict[str, Any]:
        from ._firmware import parse_check_packet

        check = parse_check_packet(bytes.fromhex(self.firmware))
        return {} if check is None else {"check_packet": check.to_fields()}


@dataclasses.dataclass(frozen=True, slots=True)
class _FirmwareReply(Ap3000Message):
    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {"result": E.UPGRADE_RESULT}

    result: int
    packet_index: int

    def derived_fields(self) -> dict[str, Any]:
        return {"success": self.result == 0}


@message(0xE0, DOWN, _FIRMWARE_200)
@dataclasses.dataclass(frozen=True, slots=True)
class SubDeviceFirmwarePacket(_FirmwarePacket):
    """0xE0 firmware packet for a socket or pile (9.22), 200 bytes."""


@message(0xE1, DOWN, _FIRMWARE_200)
@dataclasses.dataclass(frozen=True, slots=True)
class PowerBoardFirmwarePacket(_FirmwarePacket):
    """0xE1 firmware packet for a power board (9.22), 200 bytes."""


@message(0xE2, DOWN, _FIRMWARE_200)
@dataclasses.dataclass(frozen=True, slots=True)
class HostSetFirmwarePacket(_FirmwarePacket):
    """0xE2 firmware packet for everything behind a host (9.22), 200 bytes."""


@message(0xE0, UP, _FIRMWARE_REPLY)
@dataclasses.dataclass(frozen=True, slots=True)
class SubDeviceFirmwareReply(_FirmwareReply):
    """The device's answer to an 0xE0 packet."""


@message(0xE1, UP, _FIRMWARE_REPLY)
@dataclasses.dataclass(frozen=True, slots=True)
class PowerBoardFirmwareReply(_FirmwareReply):
    """The device's answer to an 0xE1 packet."""


@message(0xE2, UP, _FIRMWARE_REPLY)
@dataclasses.dataclass(frozen=True, slots=True)
class HostSetFirmwareReply(_FirmwareReply):
    """The device's answer to an 0xE2 packet."""


@message(0xE4, DOWN)
@dataclasses.dataclass(frozen=True, slots=True)
class TriggerSelfUpgrade(EmptyMessage):
    """0xE4 trigger a self-download upgrade (9.24)."""


@message(0xE4, UP)
@dataclasses.dataclass(frozen=True, slots=True)
class TriggerSelfUpgradeAck(EmptyMessage):
    """An up 0xE4: an acknowledgement whose payload is not defined (kept raw)."""


@message(0xF8, DOWN, _FIRMWARE_256)
@dataclasses.dataclass(frozen=True, slots=True)
class LegacyFirmwarePacket(_FirmwarePacket):
    """0xF8 firmware packet for legacy devices (9.23), 256 bytes."""


@message(0xF8, UP, _FIRMWARE_REPLY)
@dataclasses.dataclass(frozen=True, slots=True)
class LegacyFirmwareReply(_FirmwareReply):
    """The device's answer to an 0xF8 packet (0 next, 1 resend)."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {"result": E.LEGACY_UPGRADE_RESULT}


@message(
    0xFD,
    DOWN,
    Struct(
        "function" / Int8ul,
        "r1" / Int32ul,
        "r2" / Int32ul,
        "r3" / Int32ul,
        "r4" / Int32ul,
    ),
)
@dataclasses.dataclass(frozen=True, slots=True)
class ReservedFD(Ap3000Message):
    """0xFD reserved placeholder (9.25); no defined meaning."""

    function: int
    r1: int
    r2: int
    r3: int
    r4: int


@message(0xFD, UP, Struct("function" / Int8ul, "result" / Int8ul))
@dataclasses.dataclass(frozen=True, slots=True)
class ReservedFDReply(Ap3000Message):
    """The device's answer to 0xFD."""

    function: int
    result: int

    def derived_fields(self) -> dict[str, Any]:
        return {"success": self.result == 0}


@message(0xFE, DOWN, Struct("r1" / Int32ul, "r2" / Int32ul, "r3" / Int32ul))
@dataclasses.dataclass(frozen=True, slots=True)
class ReservedFE(Ap3000Message):
    """0xFE reserved placeholder (9.25)."""

    r1: int
    r2: int
    r3: int


@message(0xFE, UP)
@dataclasses.dataclass(frozen=True, slots=True)
class ReservedFEAck(EmptyMessage):
    """An up 0xFE: acknowledgement, payload kept raw."""


# === 10. host commands ================================================================


@message(
    0x11,
    UP,
    Struct(
        "firmware_version" / Int16ul,
        "rtc_type" / Int8ul,
        "timestamp_unix" / Int32ul,
        "signal_strength" / Int8ul,
        "modem_type" / Int8ul,
        "iccid" / Bytes(20),
        "host_type" / Int8ul,
        "frequency_mhz" / Int16ul,
        optional_tail("imei" / Bytes(15), "modem_version" / Bytes(24)),
    ),
    units={"iccid": Ascii(20), "imei": Ascii(15), "modem_version": Ascii(24)},
)
@dataclasses.dataclass(frozen=True, slots=True)
class HostHeartbeat(Ap3000Message):
    """0x11 host heartbeat (10.2), every 30 min; no reply."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {
        "rtc_type": E.RTC_TYPE,
        "modem_type": E.MODEM_TYPE,
        "host_type": E.HOST_TYPE,
    }

    firmware_version: int
    rtc_type: int
    timestamp_unix: int
    signal_strength: int
    modem_type: int
    iccid: str
    host_type: int
    frequency_mhz: int
    imei: str | Absent = ABSENT
    modem_version: str | Absent = ABSENT


@message(0x12, UP)
@dataclasses.dataclass(frozen=True, slots=True)
class HostTimeRequest(EmptyMessage):
    """0x12 host (or socket) asks for the server time (10.3)."""


@message(0x12, DOWN, _TIME)
@dataclasses.dataclass(frozen=True, slots=True)
class HostTimeReply(Ap3000Message):
    """Server time, answering 0x12."""

    timestamp_unix: int


@message(
    0xFA,
    DOWN,
    Struct(
        optional_tail(
            ("total_packets" / Int16ul, "packet_index" / Int16ul, "firmware" / Bytes(200))
        )
    ),
)
@dataclasses.dataclass(frozen=True, slots=True)
class HostFirmwareUpgrade(Ap3000Message):
    """0xFA host firmware upgrade (10.4): empty = trigger, else one 200-byte packet."""

    total_packets: int | Absent = ABSENT
    packet_index: int | Absent = ABSENT
    firmware: str | Absent = ABSENT

    def derived_fields(self) -> dict[str, Any]:
        return {"upgrade_trigger": self.firmware is ABSENT}


@message(0xFA, UP, _FIRMWARE_REPLY)
@dataclasses.dataclass(frozen=True, slots=True)
class HostFirmwareReply(_FirmwareReply):
    """The host's 0xFA answer; ``packet_index`` 0 = trigger answer / firmware request."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {"result": E.LEGACY_UPGRADE_RESULT}


@message(0x15, UP)
@dataclasses.dataclass(frozen=True, slots=True)
class HostFirmwareRequest(EmptyMessage):
    """0x15 legacy host asks for firmware after a failed upgrade (10.5)."""


@message(0x15, DOWN)
@dataclasses.dataclass(frozen=True, slots=True)
class HostFirmwareRequestReply(ResultReply):
    """Server's answer to 0x15; 0xF9 packets follow."""


@message(0xF9, DOWN, _FIRMWARE_256)
@dataclasses.dataclass(frozen=True, slots=True)
class HostLegacyFirmwarePacket(_FirmwarePacket):
    """0xF9 legacy host firmware packet (10.6), 256 bytes."""


@message(0xF9, UP, _FIRMWARE_REPLY)
@dataclasses.dataclass(frozen=True, slots=True)
class HostLegacyFirmwareReply(_FirmwareReply):
    """The host's answer to an 0xF9 packet."""

    TEXTS: ClassVar[Mapping[str, Mapping[int, str]]] = {"result": E.LEGACY_UPGRADE_RESULT}


@message(
    0x17,
    UP,
    Struct(
        "breaker_state" / Int8ul,
        "temperature_raw" / Int8ul,
        "voltage_v" / Int16ul,
        "current_a" / Int16ul,
        "energy_kwh" / Int32ul,
        "meter_current_a" / Int16ul,
        "meter_energy_kwh" / Int32ul,
        "smoke_alarm" / Int8ul,
        "alarm_relay_state" / Int8ul,
        optional_tail(
            "leakage_current_ma" / Int8ul,
            "live_temperature_raw" / Int8ul,
            "neutral_temperature_raw" / Int8ul,
            "breaker_lock_state" / Int8ul,
            "breaker_style" / Int8ul,
        ),
    ),
    units={
        "voltage_v": DECI,
        "current_a": CENTI,
        "energy_kwh": CENTI,
        "meter_current_a": CENTI,
        "meter_energy_kwh": CENTI,
    },
)
@dataclasses.dataclass(frozen=True, slots=True)
class HostStatusReport(Ap3000Message):
    """0x17 host status report (10.7); currents in 0.01 A."""

    breaker_state: int
    temperature_raw: int
    voltage_v: float
    current_a: float
    energy_kwh: float
    meter_current_a: float
    meter_energy_kwh: float
    smoke_alarm: int
    alarm_relay_state: int
    leakage_current_ma: int | Absent = ABSENT
    live_temperature_raw: int | Absent = ABSENT
    neutral_temperature_raw: int | Absent = ABSENT
    breaker_lock_state: int | Absent = ABSENT
    breaker_style: int | Absent = ABSENT


@message(0x31, DOWN)
@dataclasses.dataclass(frozen=True, slots=True)
class RebootHost(EmptyMessage):
    """0x31 reboot the host (10.8)."""


@message(0x32, DOWN)
@dataclasses.dataclass(frozen=True, slots=True)
class RebootModem(EmptyMessage):
    """0x32 reboot the host's communication module (10.8)."""


@message(0x33, DOWN)
@dataclasses.dataclass(frozen=True, slots=True)
class ClearSubDeviceUpgrades(EmptyMessage):
    """0x33 erase stored sub-device upgrade data (10.8)."""


@message(0x34, DOWN, _SERVER_ADDRESS, units=_SERVER_ADDRESS_UNITS)
@dataclasses.dataclass(frozen=True, slots=True)
class SetServerAddress(_ServerAddress):
    """0x34 change the host's server address (10.8); at most 45 characters."""


@message(
    0x35,
    UP,
    Struct(
        "type_count" / Int8ul,
        "entries"
        / Array(
            this.type_count,
            Struct(
                "device_type" / Int8ul,
                "reserved" / Int8ul,
                "min_firmware_version" / Int16ul,
                "phy_id" / Int32ul,
            ),
        ),
    ),
    units={"entries[].phy_id": PHY_ID},
    items={"entries": SubDeviceVersion},
)
@dataclasses.dataclass(frozen=True, slots=True)
class SubDeviceVersions(Ap3000Message):
    """0x35 the host reports the lowest firmware per sub-device type (10.9)."""

    entries: tuple[SubDeviceVersion, ...]

    def derived_fields(self) -> dict[str, Any]:
        return {"type_count": len(self.entries)}


@message(
    0x3A,
    DOWN,
    Struct(
        "frequency_mhz" / Int16ul,
        "reserved" / Bytes(3),
        "slave_count" / Int8ul,
        "slave_ids" / Array(this.slave_count, Int32ul),
    ),
    units={"slave_ids": PHY_ID},
)
@dataclasses.dataclass(frozen=True, slots=True)
class SetFskParams(Ap3000Message):
    """0x3A set FSK host parameters and the sub-device list (10.10)."""

    frequency_mhz: int
    reserved: str
    slave_ids: tuple[str, ...]

    def derived_fields(self) -> dict[str, Any]:
        return {"slave_count": len(self.slave_ids)}


@message(0x3B, UP, Struct("frequency_mhz" / Int16ul))
@dataclasses.dataclass(frozen=True, slots=True)
class FskParamsRequest(Ap3000Message):
    """0x3B the host asks for its FSK parameters (10.11); answer with 0x3A."""

    frequency_mhz: int


# --- result-only replies of the device to server commands -------------------------------


def _result_reply(command: int, name: str, doc: str) -> type[ResultReply]:
    cls = dataclasses.make_dataclass(
        name, [], bases=(ResultReply,), frozen=True, slots=True, namespace={"__doc__": doc}
    )
    cls.__module__ = __name__
    return message(command, UP)(cls)


RebootHostReply = _result_reply(0x31, "RebootHostReply", "The host's answer to 0x31.")
RebootModemReply = _result_reply(0x32, "RebootModemReply", "The host's answer to 0x32.")
ClearSubDeviceUpgradesReply = _result_reply(
    0x33, "ClearSubDeviceUpgradesReply", "The host's answer to 0x33."
)
SetServerAddressReply = _result_reply(0x34, "SetServerAddressReply", "The host's answer to 0x34.")
SetFskParamsReply = _result_reply(0x3A, "SetFskParamsReply", "The host's answer to 0x3A.")
SetRunningParams1Reply = _result_reply(0x83, "SetRunningParams1Reply", "Answer to 0x83.")
SetRunningParams2Reply = _result_reply(0x84, "SetRunningParams2Reply", "Answer to 0x84.")
SetLimitsReply = _result_reply(0x85, "SetLimitsReply", "Answer to 0x85.")
SetCardParamsReply = _result_reply(0x86, "SetCardParamsReply", "Answer to 0x86.")
RebootReply = _result_reply(0x87, "RebootReply", "Answer to 0x87 (may be lost in the reboot).")
ClearStorageReply = _result_reply(0x88, "ClearStorageReply", "Answer to 0x88.")
PlayVoiceReply = _result_reply(0x89, "PlayVoiceReply", "Answer to 0x89.")
WriteEepromReply = _result_reply(0x8C, "WriteEepromReply", "Answer to 0x8C.")
SetWorkModeReply = _result_reply(0x8D, "SetWorkModeReply", "Answer to 0x8D.")
SetQrCodeReply = _result_reply(0x8E, "SetQrCodeReply", "Answer to 0x8E.")
SetTcCardModeReply = _result_reply(0x8F, "SetTcCardModeReply", "Answer to 0x8F.")
TemporaryQrCodeReply = _result_reply(0x95, "TemporaryQrCodeReply", "Answer to 0x95.")
LocateReply = _result_reply(0x96, "LocateReply", "Answer to 0x96.")
SetRunningParams3Reply = _result_reply(0x97, "SetRunningParams3Reply", "Answer to 0x97.")
MultiFunctionReply = _result_reply(
    0x98, "MultiFunctionReply", "Answer to 0x98; function-specific bytes stay in trailing_hex."
)


# --- anything else -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class UnknownMessage(Ap3000Message):
    """A command (or direction) this library has no layout for; the payload is kept raw."""

    unknown_command: int
    payload_hex: str
    unknown_direction: Direction = Direction.UP

    def derived_fields(self) -> dict[str, Any]:
        return {}


UnknownMessage.command = -1
UnknownMessage.direction = Direction.UP
