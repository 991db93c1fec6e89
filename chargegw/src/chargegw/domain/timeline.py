"""Timelines: what happened to an order or a device, merged in time order and each change
pointing at its cause (issue "Explainable state").

A timeline merges, from the database:

- the audit frames (``frames``), decoded with chargeproto into the record
  ``chargeproto decode`` prints, with their (masked) hex;
- the transitions (``events`` of the types in :data:`TRANSITIONS`: a port's status, an
  order's status, a command's outcome, a device going online or offline), each with its
  cause ``{kind, frame_id, ref}`` (migration 0019);
- the other events of the subject (alarms, card swipes, ``order.settled`` ...), but not
  ``order.progress``: the progress samples say the same;
- commands (``commands``): created and sent (the finish is the ``command.*`` transition);
- settlements: the order's end figures (``orders``) and its charge (``order_charges``);
- for an order, its progress samples (``order_samples``), summarised in one item.

An order's timeline covers the order's device (its frames and port ``port``'s changes)
from :data:`ORDER_MARGIN` before the order was created to :data:`ORDER_MARGIN` after it
last changed (ended, settled, priced or its last command finished; now while it is
open). A device's timeline covers a window the caller gives. Frames a transition names
as its cause are part of the timeline even when they fall outside that scope (a BKV
gateway's frame that changed a socket), looked up within :data:`CAUSE_LOOKBACK` before
the window.

Items are in time order; at equal times (and when a change is stamped before the frame
that caused it: the database's and the gateway's clocks differ by microseconds) a cause
comes before what it caused. A timeline holds at most ``limit`` items: the earliest
ones, with ``truncated`` set when more existed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import asyncpg
from pydantic import BaseModel, Field

import chargeproto
from chargegw.audit import SENSITIVE_FIELDS
from chargegw.capture import MASK
from chargegw.store.database import Connection
from chargeproto import ChargeProtoError, Message, ap3000, bkv

__all__ = [
    "CAUSE_LOOKBACK",
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "ORDER_MARGIN",
    "TRANSITIONS",
    "Cause",
    "ItemKind",
    "Timeline",
    "TimelineItem",
    "decode_frame",
    "device_timeline",
    "order_timeline",
]

#: an order's timeline starts this long before the order was created and ends this long
#: after its last change: the card swipe or the API call that made it, the last resend
ORDER_MARGIN = dt.timedelta(seconds=60)
#: a cause frame outside the timeline's scope is looked for this far before the window
CAUSE_LOOKBACK = dt.timedelta(hours=1)
DEFAULT_LIMIT = 1000
MAX_LIMIT = 10000
#: longest a timeline query may run
QUERY_TIMEOUT_S = 10.0

#: event types that are transitions of a state, with the state they leave when the
#: event itself does not say it
TRANSITIONS: Mapping[str, str | None] = {
    "port.status_changed": None,
    "order.created": None,
    "order.started": None,
    "order.stopping": None,
    "order.stopped": None,
    "order.failed": None,
    "order.cancelled": None,
    "command.acked": None,
    "command.failed": None,
    "command.dead": None,
    "device.online": "offline",
    "device.offline": "online",
}


class ItemKind(str, enum.Enum):
    """What a timeline item is."""

    FRAME = "frame"
    TRANSITION = "transition"
    EVENT = "event"
    COMMAND = "command"
    SETTLEMENT = "settlement"
    SAMPLES = "samples"


#: at equal sort times: causes first (frames, API commands), then what they caused
_RANK = {
    ItemKind.FRAME: 0,
    ItemKind.COMMAND: 1,
    ItemKind.TRANSITION: 2,
    ItemKind.EVENT: 3,
    ItemKind.SETTLEMENT: 4,
    ItemKind.SAMPLES: 5,
}


class Cause(BaseModel):
    """What caused a change: a frame (``frame_id``), an API call (``ref``: its
    X-Request-Id), a timer, a fault or the system (``ref``: its name)."""

    kind: str | None = Field(
        description="frame, api, timer, fault or system; null: not recorded",
        examples=["frame"],
    )
    frame_id: int | None = Field(
        default=None,
        description="the audit frame that caused it (kind frame); an item of the timeline",
    )
    ref: str | None = Field(
        default=None,
        description="the API call's X-Request-Id (kind api) or the timer's, fault's or "
        "system's name (`ack_timeout`, `connection_lost` ...)",
        examples=["ack_timeout"],
    )


class TimelineItem(BaseModel):
    """One item of a timeline. Which fields are set depends on ``kind``."""

    at: dt.datetime = Field(description="when it happened (server time)")
    kind: ItemKind
    summary: str = Field(description="one line for a person", examples=["port 1: idle -> charging"])
    device_id: str | None = None
    port: int | None = Field(default=None, description="1-based")
    order_no: str | None = None
    command_id: int | None = None
    # frames
    frame_id: int | None = Field(default=None, description="frame: the audit frame's id")
    direction: str | None = Field(default=None, description="frame: in (from the device) or out")
    protocol: str | None = None
    command: str | None = Field(
        default=None, description="frame: the command (`0x06`, `0x0015/0x07`)"
    )
    connection_id: str | None = None
    hex: str | None = Field(
        default=None, description="frame: its bytes, ICCIDs and card numbers masked"
    )
    decoded: dict[str, Any] | None = Field(
        default=None,
        description="frame: the chargeproto record (as `chargeproto decode` prints it); "
        "masked fields are `*`; null when it could not be decoded",
    )
    error: str | None = Field(default=None, description="frame: why it could not be decoded")
    # transitions and events
    type: str | None = Field(default=None, description="transition or event: the event type")
    event_id: int | None = Field(
        default=None, description="the event's id (as the event API shows it)"
    )
    from_state: str | None = Field(
        default=None, description="transition: the state it left, if known"
    )
    to_state: str | None = Field(default=None, description="transition: the state it entered")
    cause: Cause | None = Field(default=None, description="transition or event: what caused it")
    data: dict[str, Any] | None = Field(
        default=None, description="the event's data, the command's or settlement's figures"
    )


class Timeline(BaseModel):
    """The merged, time-ordered history of an order or a device."""

    order_no: str | None = Field(default=None, description="the order (an order's timeline)")
    device_id: str
    port: int | None = Field(default=None, description="the order's port")
    since: dt.datetime = Field(description="the window's start (inclusive)")
    until: dt.datetime = Field(description="the window's end (exclusive)")
    items: list[TimelineItem]
    truncated: bool = Field(description="more items existed than `limit`: the earliest are shown")
    limit: int


# --- frames ---------------------------------------------------------------------------


def _fill_masked(text: str) -> tuple[bytes, bool]:
    """The bytes of a stored frame, masked pairs as ASCII ``0``; whether any was masked."""
    if MASK not in text:
        return bytes.fromhex(text), False
    return bytes(
        0x30 if text[i : i + 2] == MASK else int(text[i : i + 2], 16)
        for i in range(0, len(text), 2)
    ), True


def _with_checksum(raw: bytes, protocol: str) -> bytes:
    if protocol == "ap3000" and len(raw) >= ap3000.PAYLOAD_OFFSET + 2:
        total = ap3000.checksum(raw[:-2])
        return raw[:-2] + bytes((total & 0xFF, total >> 8))
    if protocol == "bkv" and len(raw) >= 5:
        return raw[:-3] + bytes((bkv.checksum(raw[2:-3]),)) + raw[-2:]
    return raw


def _masked(value: Any) -> Any:
    return "*" * len(value) if isinstance(value, str) else None


def decode_frame(
    hex_text: str, direction: str, protocol: str | None
) -> tuple[dict[str, Any] | None, str | None]:
    """A stored frame's chargeproto record (the form ``chargeproto decode`` prints) or
    why it cannot be decoded. ``direction``: ``in`` (up) or ``out`` (down).

    Masked bytes (``**``) cannot be read back: the frame is decoded with them as
    stand-ins (and its checksum recomputed to match), then every sensitive field
    (ICCID, IMEI, card numbers) is shown as ``*`` and ``checksum`` is the recorded one.
    """
    if protocol not in ("ap3000", "bkv"):
        return None, None
    try:
        raw, masked = _fill_masked(hex_text)
    except ValueError:
        return None, "not hex"
    checked = _with_checksum(raw, protocol) if masked else raw
    try:
        message: Message
        if protocol == "ap3000":
            message = ap3000.decode(checked, "up" if direction == "in" else "down")
        else:
            message = bkv.decode(checked)
        record = chargeproto.to_record(message, frame=raw)
    except ChargeProtoError as exc:
        return None, str(exc)
    if masked:
        fields = record.get("fields", {})
        for key in SENSITIVE_FIELDS & set(fields):
            fields[key] = _masked(fields[key])
        record["masked"] = True
    return record, None


#: decoded fields worth a place in a frame's one-line summary, in this order
_SUMMARY_FIELDS = (
    "port",
    "status",
    "result",
    "power_w",
    "energy_kwh",
    "duration_s",
    "stop_reason",
    "order_id",
    "order_no",
    "business_no",
    "card_id",
)


def _frame_label(command: str | None, decoded: dict[str, Any] | None) -> str:
    """``0x06 PowerReport``; the gateway's name for a command it sent (the audit log's
    ``command`` of an out frame: ``start``) in parentheses."""
    if decoded is None:
        return command or "frame"
    label = f"{decoded.get('command', '?')} {decoded.get('name', '')}".rstrip()
    if command and not command.startswith("0x") and command != decoded.get("command"):
        label += f" ({command})"
    return label


def _frame_summary(
    command: str | None, direction: str, decoded: dict[str, Any] | None, error: str | None
) -> str:
    arrow = "<-" if direction == "in" else "->"
    if decoded is None:
        head = f"{arrow} {command or '?'}"
        return f"{head} ({error})" if error else head
    head = f"{arrow} {_frame_label(command, decoded)}"
    fields = decoded.get("fields", {})
    shown = []
    for key in _SUMMARY_FIELDS:
        value = fields.get(key)
        if value is None or isinstance(value, dict | list):
            continue
        text = fields.get(f"{key}_text")
        shown.append(f"{key}={value}" + (f" ({text})" if text else ""))
    return f"{head} {' '.join(shown)}".rstrip()


def _frame_item(row: asyncpg.Record) -> TimelineItem:
    decoded, error = decode_frame(row["hex"], row["direction"], row["protocol"])
    error = row["error"] or error
    return TimelineItem(
        at=row["received_at"],
        kind=ItemKind.FRAME,
        summary=_frame_summary(row["command"], row["direction"], decoded, error),
        device_id=row["device_id"],
        frame_id=row["id"],
        direction=row["direction"],
        protocol=row["protocol"],
        command=row["command"],
        connection_id=row["connection_id"],
        hex=row["hex"],
        decoded=decoded,
        error=error,
    )


# --- events -----------------------------------------------------------------------------


def _json(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        value = json.loads(value)
    return value if isinstance(value, dict) else {}


def _cause(row: asyncpg.Record) -> Cause:
    return Cause(kind=row["cause_kind"], frame_id=row["frame_id"], ref=row["cause_ref"])


def describe_cause(cause: Cause | None, frames: Mapping[int, TimelineItem]) -> str:
    """``caused by frame #12 (0x06 PowerReport)`` / ``API call <id>`` / ``timer X``."""
    if cause is None or cause.kind is None:
        return "cause not recorded"
    if cause.kind == "frame":
        if cause.frame_id is None:
            return "caused by a frame without an id"
        frame = frames.get(cause.frame_id)
        if frame is None:
            return f"caused by frame #{cause.frame_id}"
        arrow = "from the device" if frame.direction == "in" else "sent"
        label = _frame_label(frame.command, frame.decoded)
        return f"caused by frame #{cause.frame_id} ({label}, {arrow})"
    if cause.kind == "api":
        return f"caused by API call {cause.ref}"
    return f"caused by {cause.kind} {cause.ref}"


def _event_item(row: asyncpg.Record, previous: dict[tuple[str, str], str]) -> TimelineItem:
    """An event row as a transition (``previous``: the last state seen per subject, to
    name the state an order or command left) or another event."""
    type_ = row["type"]
    data = _json(row["data"])
    item = TimelineItem(
        at=row["at"],
        kind=ItemKind.TRANSITION if type_ in TRANSITIONS else ItemKind.EVENT,
        summary=type_,
        device_id=row["device_id"],
        port=row["port"],
        order_no=row["order_no"],
        command_id=row["command_id"],
        type=type_,
        event_id=row["id"],
        cause=_cause(row),
        data=data,
    )
    if type_ not in TRANSITIONS:
        return item
    family, _, verb = type_.partition(".")
    if family == "port":
        subject = ("port", f"{row['device_id']}/{row['port']}")
        item.to_state = data.get("status")
        item.from_state = data.get("previous_status") or previous.get(subject)
    elif family == "order":
        subject = ("order", str(row["order_no"]))
        item.to_state = data.get("status")
        item.from_state = previous.get(subject)
    elif family == "command":
        subject = ("command", str(row["command_id"]))
        item.to_state = verb
        item.from_state = previous.get(subject, "sent")
    else:
        subject = ("device", str(row["device_id"]))
        item.to_state = verb
        item.from_state = TRANSITIONS[type_]
    if item.to_state is not None:
        previous[subject] = item.to_state
    return item


def _transition_summary(item: TimelineItem) -> str:
    assert item.type is not None
    family = item.type.partition(".")[0]
    what = {
        "port": f"port {item.port}",
        "order": f"order {item.order_no}",
        "command": f"command {item.command_id} {(item.data or {}).get('name', '')}".rstrip(),
        "device": f"device {item.device_id}",
    }[family]
    return f"{what}: {item.from_state or '(none)'} -> {item.to_state}"


# --- commands, settlements, samples -------------------------------------------------------


def _command_items(row: asyncpg.Record) -> list[TimelineItem]:
    base = {
        "kind": ItemKind.COMMAND,
        "device_id": row["device_id"],
        "order_no": row["order_no"],
        "command_id": row["command_id"],
        "protocol": row["protocol"],
    }
    label = f"command {row['command_id']} {row['name']}"
    created = TimelineItem(
        at=row["created_at"],
        summary=f"{label} created",
        type="command.created",
        cause=Cause(kind=row["cause_kind"], ref=row["cause_ref"], frame_id=row["cause_frame_id"])
        if row["cause_kind"] is not None and row["status"] == "pending"
        else None,
        data={"name": row["name"], "params": _json(row["params"]), "priority": row["priority"]},
        **base,
    )
    items = [created]
    if row["sent_at"] is not None:
        sent_frame = row["sent_frame_id"]
        items.append(
            TimelineItem(
                at=row["sent_at"],
                summary=f"{label} sent (attempt {row['attempts']})"
                + (f" as frame #{sent_frame}" if sent_frame is not None else ""),
                type="command.sent",
                frame_id=sent_frame,
                data={"attempts": row["attempts"], "status": row["status"]},
                **base,
            )
        )
    return items


def _settlement_item(row: asyncpg.Record) -> TimelineItem:
    figures = {
        key: row[key]
        for key in (
            "status",
            "started_at",
            "ended_at",
            "duration_s",
            "energy_kwh",
            "max_power_w",
            "stop_reason",
            "stop_reason_code",
            "stop_reason_text",
            "failure_reason",
            "amount_cent",
            "business_no",
        )
    }
    for key in ("started_at", "ended_at"):
        if figures[key] is not None:
            figures[key] = figures[key].isoformat()
    charge = None
    if row["plan"] is not None or row["charged_cent"] is not None:
        charge = {
            "plan": row["plan"],
            "kind": row["charge_kind"],
            "amount_cent": row["charged_cent"],
            "card_charged_cent": row["card_charged_cent"],
            "shortfall_cent": row["shortfall_cent"],
            "inputs": None if row["inputs"] is None else _json(row["inputs"]),
        }
    figures["charge"] = charge
    parts = [f"order {row['order_no']} settled"]
    if row["stop_reason"]:
        parts.append(f"stop_reason={row['stop_reason']}")
    if row["duration_s"] is not None:
        parts.append(f"duration_s={row['duration_s']}")
    if row["energy_kwh"] is not None:
        parts.append(f"energy_kwh={row['energy_kwh']}")
    if row["charged_cent"] is not None:
        parts.append(f"charged {row['charged_cent']} cent ({row['plan'] or 'no plan'})")
    elif row["amount_cent"] is not None:
        parts.append(f"amount_cent={row['amount_cent']}")
    return TimelineItem(
        at=row["settled_at"],
        kind=ItemKind.SETTLEMENT,
        summary=", ".join(parts),
        device_id=row["device_id"],
        port=row["port"],
        order_no=row["order_no"],
        data=figures,
    )


def _samples_item(rows: Sequence[asyncpg.Record], order_no: str) -> TimelineItem | None:
    if not rows:
        return None
    first, last = rows[0], rows[-1]
    powers = [r["power_w"] for r in rows if r["power_w"] is not None]
    data = {
        "count": len(rows),
        "first_at": first["at"].isoformat(),
        "last_at": last["at"].isoformat(),
        "energy_kwh_first": first["energy_kwh"],
        "energy_kwh_last": last["energy_kwh"],
        "duration_s_last": last["duration_s"],
        "max_power_w": max(powers) if powers else None,
    }
    summary = (
        f"{len(rows)} progress samples until {last['at'].isoformat(timespec='seconds')}: "
        f"energy {first['energy_kwh']} -> {last['energy_kwh']} kWh"
        + (f", max {data['max_power_w']} W" if powers else "")
    )
    return TimelineItem(
        at=first["at"], kind=ItemKind.SAMPLES, summary=summary, order_no=order_no, data=data
    )


# --- merging ------------------------------------------------------------------------------


@dataclasses.dataclass
class _Collected:
    frames: list[TimelineItem]
    events: list[asyncpg.Record]
    others: list[TimelineItem]
    cut: bool


def _merge(collected: _Collected, limit: int) -> tuple[list[TimelineItem], bool]:
    frames = {item.frame_id: item for item in collected.frames if item.frame_id is not None}
    previous: dict[tuple[str, str], str] = {}
    events = [_event_item(row, previous) for row in collected.events]
    for item in events:
        if item.kind is ItemKind.TRANSITION:
            item.summary = _transition_summary(item)
        item.summary += f", {describe_cause(item.cause, frames)}"
    items = [*frames.values(), *events, *collected.others]

    def key(item: TimelineItem) -> tuple[dt.datetime, int, int]:
        at = item.at
        cause = item.cause
        if cause is not None and cause.frame_id in frames:  # never before its cause
            at = max(at, frames[cause.frame_id].at)
        return at, _RANK[item.kind], item.frame_id or item.event_id or item.command_id or 0

    items.sort(key=key)
    return items[:limit], collected.cut or len(items) > limit


_FRAME_COLUMNS = (
    "id, received_at, connection_id, device_id, direction, protocol, command, hex, error"
)
_EVENT_COLUMNS = """pk, id, type, at, device_id, port, order_no, command_id, frame_id,
                    cause_kind, cause_ref, data"""
_COMMAND_COLUMNS = """command_id, device_id, protocol, name, params, priority, status, attempts,
                      order_no, created_at, sent_at, finished_at, cause_kind, cause_ref,
                      cause_frame_id, sent_frame_id"""
_SETTLEMENT_SQL = """
    SELECT o.order_no, o.device_id, o.port, o.status, o.started_at, o.ended_at, o.duration_s,
           o.energy_kwh, o.max_power_w, o.stop_reason, o.stop_reason_code, o.stop_reason_text,
           o.failure_reason, o.amount_cent, o.business_no,
           c.plan, c.kind AS charge_kind, c.amount_cent AS charged_cent, c.card_charged_cent,
           c.shortfall_cent, c.inputs,
           coalesce(c.computed_at, o.updated_at) AS settled_at
      FROM orders o LEFT JOIN order_charges c USING (order_no)
     WHERE o.status = 'settled' AND {where}
     ORDER BY settled_at, o.order_no LIMIT {limit}"""


async def _frames(
    conn: Connection,
    device_ids: Sequence[str],
    since: dt.datetime,
    until: dt.datetime,
    limit: int,
) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT {_FRAME_COLUMNS} FROM frames
             WHERE device_id = ANY($1::text[]) AND received_at >= $2 AND received_at < $3
             ORDER BY received_at, id LIMIT $4""",
        list(device_ids),
        since,
        until,
        limit + 1,
        timeout=QUERY_TIMEOUT_S,
    )
    return rows


async def _cause_frames(
    conn: Connection,
    events: Iterable[asyncpg.Record],
    known: set[int],
    since: dt.datetime,
    until: dt.datetime,
) -> list[asyncpg.Record]:
    wanted = sorted({e["frame_id"] for e in events if e["frame_id"] is not None} - known)
    if not wanted:
        return []
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT {_FRAME_COLUMNS} FROM frames
             WHERE id = ANY($1::bigint[]) AND received_at >= $2 AND received_at < $3""",
        wanted,
        since - CAUSE_LOOKBACK,
        until,
        timeout=QUERY_TIMEOUT_S,
    )
    return rows


async def _collect(
    conn: Connection,
    *,
    frame_rows: list[asyncpg.Record],
    events: list[asyncpg.Record],
    others: list[TimelineItem],
    since: dt.datetime,
    until: dt.datetime,
    limit: int,
) -> _Collected:
    cut = len(frame_rows) > limit or len(events) > limit
    frame_rows, events = frame_rows[:limit], events[:limit]
    known = {r["id"] for r in frame_rows}
    frame_rows += await _cause_frames(conn, events, known, since, until)
    return _Collected([_frame_item(r) for r in frame_rows], events, others, cut)


async def order_timeline(
    conn: Connection, order_no: str, *, limit: int = DEFAULT_LIMIT, now: dt.datetime | None = None
) -> Timeline | None:
    """The timeline of the order ``order_no`` (see the module doc); None if unknown."""
    order = await conn.fetchrow(
        """SELECT o.order_no, o.device_id, o.port, o.status, o.created_at,
                  greatest(o.updated_at, o.ended_at, o.device_ended_at, c.computed_at,
                           (SELECT max(coalesce(finished_at, sent_at, created_at))
                              FROM commands WHERE order_no = o.order_no)) AS last_change
             FROM orders o LEFT JOIN order_charges c USING (order_no)
            WHERE o.order_no = $1""",
        order_no,
        timeout=QUERY_TIMEOUT_S,
    )
    if order is None:
        return None
    now = now or dt.datetime.now(dt.UTC)
    device_id, port = order["device_id"], order["port"]
    since = order["created_at"] - ORDER_MARGIN
    if order["status"] in ("settled", "failed", "cancelled"):
        until = order["last_change"] + ORDER_MARGIN
    else:
        until = max(now, order["last_change"]) + dt.timedelta(microseconds=1)
    frame_rows = await _frames(conn, [device_id], since, until, limit)
    events: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT {_EVENT_COLUMNS} FROM events
             WHERE type <> 'order.progress'
               AND (order_no = $1
                OR (device_id = $2 AND at >= $3 AND at < $4
                    AND (order_no IS NULL OR order_no = $1)
                    AND (port IS NULL OR port = $5)))
             ORDER BY at, pk LIMIT $6""",
        order_no,
        device_id,
        since,
        until,
        port,
        limit + 1,
        timeout=QUERY_TIMEOUT_S,
    )
    commands = await conn.fetch(
        f"""SELECT {_COMMAND_COLUMNS} FROM commands
             WHERE order_no = $1
                OR command_id = (SELECT start_command_id FROM orders WHERE order_no = $1)
             ORDER BY command_id LIMIT $2""",
        order_no,
        limit,
        timeout=QUERY_TIMEOUT_S,
    )
    others = [item for row in commands for item in _command_items(row)]
    settled = await conn.fetch(
        _SETTLEMENT_SQL.format(where="o.order_no = $1", limit=1),
        order_no,
        timeout=QUERY_TIMEOUT_S,
    )
    others += [_settlement_item(row) for row in settled]
    samples = await conn.fetch(
        """SELECT at, duration_s, energy_kwh, power_w FROM order_samples
            WHERE order_no = $1 ORDER BY at, id""",
        order_no,
        timeout=QUERY_TIMEOUT_S,
    )
    summary = _samples_item(samples, order_no)
    if summary is not None:
        others.append(summary)
    collected = await _collect(
        conn,
        frame_rows=frame_rows,
        events=events,
        others=others,
        since=since,
        until=until,
        limit=limit,
    )
    items, truncated = _merge(collected, limit)
    return Timeline(
        order_no=order_no,
        device_id=device_id,
        port=port,
        since=since,
        until=until,
        items=items,
        truncated=truncated,
        limit=limit,
    )


async def device_timeline(
    conn: Connection,
    device_id: str,
    *,
    since: dt.datetime,
    until: dt.datetime,
    limit: int = DEFAULT_LIMIT,
) -> Timeline | None:
    """The timeline of the device ``device_id`` in ``[since, until)``: its frames,
    events (transitions of its ports, orders, commands and online state included),
    commands created or sent and orders settled in the window; None if unknown."""
    known = await conn.fetchval(
        "SELECT 1 FROM devices WHERE device_id = $1", device_id, timeout=QUERY_TIMEOUT_S
    )
    if not known:
        return None
    frame_rows = await _frames(conn, [device_id], since, until, limit)
    events: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT {_EVENT_COLUMNS} FROM events
             WHERE device_id = $1 AND at >= $2 AND at < $3 AND type <> 'order.progress'
             ORDER BY at, pk LIMIT $4""",
        device_id,
        since,
        until,
        limit + 1,
        timeout=QUERY_TIMEOUT_S,
    )
    commands = await conn.fetch(
        f"""SELECT {_COMMAND_COLUMNS} FROM commands
             WHERE device_id = $1 AND created_at < $3
               AND coalesce(sent_at, created_at) >= $2
             ORDER BY command_id LIMIT $4""",
        device_id,
        since,
        until,
        limit,
        timeout=QUERY_TIMEOUT_S,
    )
    others = [item for row in commands for item in _command_items(row) if since <= item.at < until]
    settled = await conn.fetch(
        _SETTLEMENT_SQL.format(
            where="o.device_id = $1 AND coalesce(c.computed_at, o.updated_at) >= $2 "
            "AND coalesce(c.computed_at, o.updated_at) < $3",
            limit="$4",
        ),
        device_id,
        since,
        until,
        limit,
        timeout=QUERY_TIMEOUT_S,
    )
    others += [_settlement_item(row) for row in settled]
    collected = await _collect(
        conn,
        frame_rows=frame_rows,
        events=events,
        others=others,
        since=since,
        until=until,
        limit=limit,
    )
    items, truncated = _merge(collected, limit)
    return Timeline(
        device_id=device_id,
        since=since,
        until=until,
        items=items,
        truncated=truncated,
        limit=limit,
    )
