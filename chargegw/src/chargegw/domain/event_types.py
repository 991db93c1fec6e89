"""The catalogue of domain events: every type name the platform emits, what it means and
what its ``data`` holds.

Events are rows of the ``events`` table, written by database triggers in the transaction
of the change they report (migration ``0012_events.sql``), so no code path can change a
port, an order or a command without its event. This module is the one list of their type
names: webhooks validate subscriptions against it (``matching``), the API documents it,
and a test checks that every type the triggers can emit is listed here.

Every event carries, besides ``data``: ``id`` (increasing in commit order), ``type``,
``at``, and the subjects it concerns where they apply: ``device_id``, ``gateway_id``,
``protocol``, ``port``, ``order_no``, ``command_id``, ``job_id``, ``frame_id``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "DATA_SCHEMAS",
    "ENVELOPE_SCHEMA",
    "EVENT_TYPES",
    "TYPE_PATTERN",
    "EventType",
    "matches",
    "matching",
    "unknown_patterns",
]


@dataclasses.dataclass(frozen=True)
class EventType:
    """One event type: its name, what it means, and the keys of its ``data``."""

    name: str
    description: str
    data: Mapping[str, str]

    def data_schema(self) -> dict[str, Any]:
        """The JSON Schema of this type's ``data`` keys (each may be null), as published in
        the OpenAPI document; keys not listed may be added later, so more are allowed."""
        return {
            "type": "object",
            "properties": {
                key: {"anyOf": [dict(DATA_SCHEMAS[key]), {"type": "null"}], "description": text}
                for key, text in self.data.items()
            },
            "additionalProperties": True,
        }


_ORDER_DATA: Mapping[str, str] = {
    "status": "the order's status after the change",
    "start_mode": "online, card, code or device",
    "device_initiated": "the device started it (no API call)",
    "mode": "full, time or energy",
    "card_id": "the card that started it, if any",
    "started_at": "when charging began",
    "ended_at": "when charging ended",
    "duration_s": "seconds charged",
    "energy_kwh": "energy delivered",
    "max_power_w": "the highest power reported",
    "stop_reason": "why it stopped (protocol-neutral)",
    "stop_reason_code": "the device's raw stop-reason code",
    "failure_reason": "why it failed",
    "amount_cent": "the price, once settled",
}
_REASON_DATA: Mapping[str, str] = {
    "reason": "why (a stable word, e.g. heartbeat_timeout)",
    "detail": "what the device or the engine reported",
}
_PORT_DATA: Mapping[str, str] = {
    "status": "idle, charging, occupied, full, float, fault ...",
    "previous_status": "the status before (null for the first report)",
    "status_code": "the device's raw status code",
    "status_text": "the raw status in words",
    "order_ref": "the order the device names for the port",
}
_COMMAND_DATA: Mapping[str, str] = {
    "name": "the command (start, stop, query ...)",
    "attempts": "transmissions",
    "result_code": "the device's result code",
    "result_text": "the result in words",
    "dead_reason": "why it gave up (dead only)",
}
_SWIPE_DATA: Mapping[str, str] = {
    "result": "accepted, or why it was refused (unknown_card, blocked, port_busy ...)",
    "card_id": "the card number",
    "port": "the port it was swiped for",
    "balance_cent": "the card's balance",
    "detail": "the swipe as decoded",
}
_BAN_DATA: Mapping[str, str] = {
    "reason": "flapping, or the operator's reason",
    "until": "when the ban ends",
    "connects": "connects counted in the window (flapping)",
}
_PING_DATA: Mapping[str, str] = {"message": "a test delivery asked for by an operator"}
_DISABLED_DATA: Mapping[str, str] = {
    "subscription_id": "the subscription",
    "reason": "why it was disabled (failing for the disable period, 410 Gone)",
}


_STRING: Mapping[str, Any] = {"type": "string"}
_INTEGER: Mapping[str, Any] = {"type": "integer"}
_NUMBER: Mapping[str, Any] = {"type": "number"}
_TIME: Mapping[str, Any] = {"type": "string", "format": "date-time"}

#: the JSON type of every ``data`` key the catalogue names (a test checks each is listed)
DATA_SCHEMAS: Mapping[str, Mapping[str, Any]] = {
    # orders
    "status": _STRING,
    "start_mode": _STRING,
    "device_initiated": {"type": "boolean"},
    "mode": _STRING,
    "card_id": _STRING,
    "started_at": _TIME,
    "ended_at": _TIME,
    "duration_s": _INTEGER,
    "energy_kwh": _NUMBER,
    "max_power_w": _NUMBER,
    "stop_reason": _STRING,
    "stop_reason_code": _INTEGER,
    "failure_reason": _STRING,
    "amount_cent": _INTEGER,
    # progress samples
    "power_w": _NUMBER,
    "voltage_v": _NUMBER,
    "current_a": _NUMBER,
    # device events, parameters, upgrades
    "reason": _STRING,
    "detail": {"type": "object"},
    # ports
    "previous_status": _STRING,
    "status_code": _INTEGER,
    "status_text": _STRING,
    "order_ref": _STRING,
    # commands
    "name": _STRING,
    "attempts": _INTEGER,
    "result_code": _INTEGER,
    "result_text": _STRING,
    "dead_reason": _STRING,
    # card swipes
    "result": _STRING,
    "port": _INTEGER,
    "balance_cent": _INTEGER,
    # bans
    "until": _TIME,
    "connects": _INTEGER,
    # webhooks
    "message": _STRING,
    "subscription_id": _INTEGER,
}

#: what every event carries besides its ``data`` keys, with their JSON types
ENVELOPE_SCHEMA: Mapping[str, tuple[Mapping[str, Any], str]] = {
    "id": (_INTEGER, "increasing in commit order; the SSE `id:` and `after=` cursor"),
    "type": (_STRING, "the event type (the catalogue's name)"),
    "at": (_TIME, "when it happened (server time)"),
    "device_id": (_STRING, "the device it concerns"),
    "gateway_id": (_STRING, "the device's gateway (AP3000: the pile itself or its host)"),
    "protocol": (_STRING, "ap3000 or bkv"),
    "port": (_INTEGER, "the port it concerns, 1-based"),
    "order_no": (_STRING, "the charging order it concerns"),
    "command_id": (_INTEGER, "the command it concerns"),
    "job_id": (_INTEGER, "the parameter or firmware job it concerns"),
    "frame_id": (_INTEGER, "the audit frame that caused it"),
}


def _types() -> dict[str, EventType]:
    table: list[tuple[str, str, Mapping[str, str]]] = [
        ("device.online", "A device connected and identified itself.", _REASON_DATA),
        ("device.offline", "A device went offline; `reason` says why.", _REASON_DATA),
        ("device.registered", "A device registered (AP3000 0x20).", _REASON_DATA),
        ("device.alarm", "A device reported an alarm (AP3000 0x42/0x44, BKV event).", _REASON_DATA),
        ("device.fault", "A port went to the fault status.", _PORT_DATA),
        ("port.status_changed", "A port's status changed.", _PORT_DATA),
        ("order.created", "A charging order was created (API, card or device).", _ORDER_DATA),
        ("order.started", "The device confirmed charging began.", _ORDER_DATA),
        ("order.progress", "The device reported progress of a charging order.", {
            "duration_s": "seconds charged so far",
            "energy_kwh": "energy so far",
            "power_w": "power now",
            "voltage_v": "voltage now",
            "current_a": "current now",
        }),
        ("order.stopping", "A stop was asked for; the device has not ended it yet.", _ORDER_DATA),
        ("order.stopped", "Charging ended (the device's settlement arrived).", _ORDER_DATA),
        ("order.settled", "The order was settled and priced.", _ORDER_DATA),
        ("order.failed", "The order failed (refused, no answer, superseded).", _ORDER_DATA),
        ("order.cancelled", "The order was cancelled before it started.", _ORDER_DATA),
        ("command.acked", "A device acknowledged a command.", _COMMAND_DATA),
        ("command.failed", "A device refused a command.", _COMMAND_DATA),
        ("command.dead", "A command gave up (no answer, expired, device offline).", _COMMAND_DATA),
        ("card.swipe_accepted", "A card swipe was accepted and charging is starting.", _SWIPE_DATA),
        ("card.swipe_refused", "A card swipe was refused.", _SWIPE_DATA),
        ("param.verified", "A parameter group was read back as desired.", _REASON_DATA),
        ("param.mismatch", "A parameter group's read-back differs from the desired.", _REASON_DATA),
        ("param.failed", "A parameter group was refused or its command died.", _REASON_DATA),
        ("param.drift", "A device reports other parameters than were verified.", _REASON_DATA),
        ("upgrade.started", "A firmware upgrade began sending to a device.", _REASON_DATA),
        ("upgrade.verified", "A device came back from its upgrade with the new one.", _REASON_DATA),
        ("upgrade.failed", "A firmware upgrade was refused, gave up or failed.", _REASON_DATA),
        ("ban.placed", "A device was banned for a while (flapping or by hand).", _BAN_DATA),
        ("ban.lifted", "A ban was lifted before it ran out.", _BAN_DATA),
        ("webhook.disabled", "A subscription was disabled by the platform.", _DISABLED_DATA),
        ("webhook.ping", "A test delivery, only to the subscription asked for.", _PING_DATA),
    ]  # fmt: skip
    return {name: EventType(name, text, data) for name, text, data in table}


#: every event type, by name
EVENT_TYPES: Mapping[str, EventType] = _types()

#: what a subscription's type pattern may look like: names, dots, underscores, `*`
TYPE_PATTERN = re.compile(r"^[a-z0-9_.*]{1,64}$")


def matches(pattern: str, type_name: str) -> bool:
    """Whether ``pattern`` (``*`` is any run of characters) matches ``type_name``; the same
    rule as SQL ``event_type_matches``."""
    regex = "^" + ".*".join(re.escape(part) for part in pattern.split("*")) + "$"
    return re.match(regex, type_name) is not None


def matching(pattern: str) -> list[str]:
    """The catalogue's types ``pattern`` matches (none: the pattern is useless)."""
    return [name for name in EVENT_TYPES if matches(pattern, name)]


def unknown_patterns(patterns: Iterable[str]) -> list[str]:
    """The patterns that are malformed or match no type of the catalogue."""
    return [p for p in patterns if not TYPE_PATTERN.match(p) or not matching(p)]
