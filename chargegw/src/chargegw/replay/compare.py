"""Pair a connection's recorded replies with the new ones and compare them; compare
the recorded run's state with the replay's. Pure: no socket, database or clock.

Pairing. A recorded ``out`` frame is a *reply* when chargeproto's reply tables say the
server sends that message only as an answer (``ap3000.is_server_reply``,
``bkv.is_server_reply``); any other ``out`` frame (a start, a stop, a parameter read:
a command that came from the API or a timer) is *server-initiated* and cannot be
reproduced by playing the device side: it is listed, not compared; so are the new ones.
Each new reply, in arrival order, is paired with the first unpaired recorded reply of
the same key (protocol, message class, AP3000 msg id or BKV seq: the id the server
echoes). Recorded replies left unpaired are *missing*, new ones *added*.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import chargeproto
from chargegw.capture import CaptureFrame
from chargegw.replay import rules
from chargegw.replay.frames import (
    Decoded,
    ReplyKey,
    describe_key,
    flat_fields,
    is_server_reply,
    masked_hex,
    reply_key,
    usable_bytes,
)
from chargegw.replay.report import (
    ConnectionResult,
    FieldChange,
    NewFrame,
    NotCompared,
    Outcome,
    ReplyComparison,
    StateDifference,
)
from chargeproto import Message


@dataclasses.dataclass(frozen=True, slots=True)
class Received:
    """A frame the gateway sent during the replay."""

    raw: bytes
    at: datetime
    #: the capture line of the device frame fed last before it arrived (0: none yet)
    after_line: int
    #: why it did not decode as a frame, if it did not
    error: str | None = None


@dataclasses.dataclass(slots=True)
class _Recorded:
    frame: CaptureFrame
    decoded: Decoded
    key: ReplyKey
    paired: bool = False


def recorded_replies(frames: Sequence[CaptureFrame]) -> tuple[list[_Recorded], list[NotCompared]]:
    """A connection's recorded ``out`` frames: the replies (keyed) and the rest."""
    replies: list[_Recorded] = []
    others: list[NotCompared] = []
    for frame in frames:
        if frame.direction != "out":
            continue
        decoded = Decoded.of(usable_bytes(frame.hex), "down")
        if decoded.message is None:
            why = f"undecodable ({decoded.error})"
            others.append(NotCompared("recorded", frame.command, frame.hex, why, frame.line))
        elif is_server_reply(decoded.message):
            replies.append(_Recorded(frame, decoded, reply_key(decoded.message)))
        else:
            others.append(
                NotCompared("recorded", frame.command, frame.hex, "server-initiated", frame.line)
            )
    return replies, others


def compare_connection(
    result: ConnectionResult,
    frames: Sequence[CaptureFrame],
    received: Sequence[Received],
    *,
    clock_tolerance_s: float = rules.CLOCK_TOLERANCE_S,
) -> None:
    """Fill ``result`` (replies, not compared, new frames) from a connection's recorded
    ``frames`` and what the gateway sent during the replay."""
    recorded, others = recorded_replies(frames)
    result.not_compared.extend(others)
    for index, item in enumerate(received):
        position = item.after_line + (index + 1) / (len(received) + 1)
        if item.error is not None:
            result.new_frames.append(
                NewFrame(item.after_line, item.at, item.raw.hex(), None, False)
            )
            result.replies.append(
                ReplyComparison(
                    Outcome.ADDED,
                    "undecodable frame",
                    new_hex=item.raw.hex(),
                    note=item.error,
                    position=position,
                )
            )
            continue
        new = Decoded.of(item.raw, "down")
        message = new.message
        shown = masked_hex(item.raw, message)
        command = _command(message)
        reply = message is not None and is_server_reply(message)
        result.new_frames.append(NewFrame(item.after_line, item.at, shown, command, reply))
        if message is None:
            result.replies.append(
                ReplyComparison(
                    Outcome.ADDED,
                    "undecodable frame",
                    new_hex=shown,
                    note=new.error,
                    position=position,
                )
            )
            continue
        if not is_server_reply(message):
            result.not_compared.append(NotCompared("new", command, shown, "server-initiated"))
            continue
        key = reply_key(message)
        match = next((r for r in recorded if not r.paired and r.key == key), None)
        if match is None:
            result.replies.append(
                ReplyComparison(
                    Outcome.ADDED,
                    describe_key(key),
                    new_hex=shown,
                    note="answered now, not recorded",
                    position=position,
                )
            )
            continue
        match.paired = True
        result.replies.append(_compare(match, shown, item.at, clock_tolerance_s))
    for left in recorded:
        if not left.paired:
            result.replies.append(
                ReplyComparison(
                    Outcome.MISSING,
                    describe_key(left.key),
                    recorded_line=left.frame.line,
                    recorded_hex=left.frame.hex,
                    note="recorded, not answered now",
                    position=left.frame.line,
                )
            )
    result.replies.sort(key=lambda reply: reply.position)


def _command(message: Message | None) -> str | None:
    """The command as chargeproto's records name it (``0x21``, ``0x0015/0x0c``)."""
    return None if message is None else str(chargeproto.to_record(message)["command"])


def _compare(
    recorded: _Recorded, new_hex: str, new_at: datetime, tolerance: float
) -> ReplyComparison:
    frame = recorded.frame
    comparison = ReplyComparison(
        Outcome.IDENTICAL,
        describe_key(recorded.key),
        recorded_line=frame.line,
        recorded_hex=frame.hex,
        new_hex=new_hex,
        position=frame.line,
    )
    if new_hex == frame.hex:
        return comparison
    old_message = recorded.decoded.message
    # both sides filled the same way: masked bytes compare equal, whatever they held
    new_message = Decoded.of(usable_bytes(new_hex), "down").message
    assert old_message is not None
    if new_message is None:
        comparison.outcome = Outcome.DIFFERENT
        comparison.note = "the new reply no longer decodes once masked"
        return comparison
    old_fields, new_fields = flat_fields(old_message), flat_fields(new_message)
    protocol, name, _ = recorded.key
    different = False
    for field in sorted(old_fields.keys() | new_fields.keys()):
        old, new = old_fields.get(field), new_fields.get(field)
        if old == new:
            continue
        rule = rules.rule_for(protocol, name, field)
        if rule is not None:
            allowed, note = rules.judge(rule, old, new, frame.at, new_at, tolerance)
        else:
            allowed, note = False, None
        different = different or not allowed
        comparison.changes.append(FieldChange(field, old, new, note if allowed else None))
    if not comparison.changes:
        # equal fields but other bytes: the encoding itself changed
        comparison.changes.append(FieldChange("hex", frame.hex, new_hex))
        different = True
    comparison.outcome = Outcome.DIFFERENT if different else Outcome.VOLATILE
    if comparison.outcome is Outcome.DIFFERENT:
        # only the changes that matter are shown as differences; the volatile ones keep
        # their note so a reader sees why they were not counted
        comparison.changes.sort(key=lambda change: change.note is not None)
    return comparison


# --- state ------------------------------------------------------------------------------

#: order fields the device side determines (status, why and how much); fields an API
#: call sets (mode, requested limits, start mode, device_initiated), generated numbers
#: and times are not compared
ORDER_FIELDS = ("status", "stop_reason", "stop_reason_code", "duration_s", "energy_kwh")
#: port fields compared
PORT_FIELDS = ("status",)


def _rows(state: Mapping[str, Any], name: str) -> list[Mapping[str, Any]]:
    rows = state.get(name) or []
    return [row for row in rows if isinstance(row, Mapping)]


def _orders_by_port(state: Mapping[str, Any]) -> dict[tuple[str, int], list[Mapping[str, Any]]]:
    out: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for row in _rows(state, "orders"):
        out.setdefault((str(row.get("device_id")), int(row.get("port") or 0)), []).append(row)
    for rows in out.values():
        rows.sort(key=lambda row: str(row.get("created_at") or ""))
    return out


def compare_state(recorded: Mapping[str, Any], new: Mapping[str, Any]) -> list[StateDifference]:
    """The differences between two states (``{"orders": [...], "ports": [...]}``).

    Orders are matched per (device, port) in the order they were created (order numbers
    are generated and not compared); ports by (device, port). An order's
    ``stop_reason`` is compared only when the device gave a reason code."""
    out: list[StateDifference] = []
    old_orders, new_orders = _orders_by_port(recorded), _orders_by_port(new)
    for device, port in sorted(old_orders.keys() | new_orders.keys()):
        before, after = old_orders.get((device, port), []), new_orders.get((device, port), [])
        for index in range(max(len(before), len(after))):
            key = f"{device} port {port} #{index + 1}"
            if index >= len(after):
                out.append(
                    StateDifference("order", key, "order", before[index].get("status"), None)
                )
                continue
            if index >= len(before):
                out.append(StateDifference("order", key, "order", None, after[index].get("status")))
                continue
            for field in ORDER_FIELDS:
                if field == "stop_reason" and before[index].get("stop_reason_code") is None:
                    # no code from the device (BKV end reports carry none): the gateway
                    # inferred the reason from the API's order, which a replay lacks
                    continue
                if field in before[index] and field in after[index]:
                    old, value = before[index][field], after[index][field]
                    if old != value:
                        out.append(StateDifference("order", key, field, old, value))
    old_ports = {(str(p.get("device_id")), p.get("port")): p for p in _rows(recorded, "ports")}
    new_ports = {(str(p.get("device_id")), p.get("port")): p for p in _rows(new, "ports")}
    for device, port_no in sorted(old_ports.keys() | new_ports.keys(), key=str):
        key = f"{device} port {port_no}"
        before_port = old_ports.get((device, port_no))
        after_port = new_ports.get((device, port_no))
        if before_port is None or after_port is None:
            out.append(
                StateDifference(
                    "port",
                    key,
                    "port",
                    before_port.get("status") if before_port else None,
                    after_port.get("status") if after_port else None,
                )
            )
            continue
        for field in PORT_FIELDS:
            if before_port.get(field) != after_port.get(field):
                out.append(
                    StateDifference(
                        "port", key, field, before_port.get(field), after_port.get(field)
                    )
                )
    return out
