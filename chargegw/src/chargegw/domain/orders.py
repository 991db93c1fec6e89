"""Charging sessions (orders): the state machine and its persistence.

States and the transitions the platform makes (anything else is refused)::

    pending --sent--> starting --start acked--> charging --stop sent--> stopping
    pending|starting --start refused/dead--> failed
    starting|failed --device reports the order charging--> charging   (reconciled)
    any but settled --settlement--> settled
    pending --cancelled before sending--> cancelled
    starting --start never written (taken back)--> pending; --cancelled--> cancelled
    stopping --stop never written (taken back)--> charging

A settlement is applied once: the device's resends of the same settlement change
nothing, even when their live readings differ or they lack optional identifiers
(:func:`settle`). A settlement or progress report for an order the platform never started
creates an order marked ``device_initiated``; one that names another device's order
number creates a new order marked for review. The platform opens at most one order per
port at a time (a unique index).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import secrets
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import structlog

from chargegw.causes import Cause
from chargegw.domain.pages import Page, Where, page_of
from chargegw.store.database import Connection

log = structlog.get_logger("chargegw.domain.orders")


class OrderStatus(str, enum.Enum):
    PENDING = "pending"
    STARTING = "starting"
    CHARGING = "charging"
    STOPPING = "stopping"
    SETTLED = "settled"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: (from, event) -> to
TRANSITIONS: dict[tuple[OrderStatus, str], OrderStatus] = {
    (OrderStatus.PENDING, "start_sent"): OrderStatus.STARTING,
    (OrderStatus.PENDING, "start_acked"): OrderStatus.CHARGING,
    (OrderStatus.STARTING, "start_acked"): OrderStatus.CHARGING,
    (OrderStatus.PENDING, "start_failed"): OrderStatus.FAILED,
    (OrderStatus.STARTING, "start_failed"): OrderStatus.FAILED,
    (OrderStatus.STARTING, "reported_charging"): OrderStatus.CHARGING,
    (OrderStatus.PENDING, "reported_charging"): OrderStatus.CHARGING,
    (OrderStatus.FAILED, "reported_charging"): OrderStatus.CHARGING,
    (OrderStatus.CHARGING, "stop_sent"): OrderStatus.STOPPING,
    (OrderStatus.STARTING, "stop_sent"): OrderStatus.STOPPING,
    (OrderStatus.PENDING, "cancel"): OrderStatus.CANCELLED,
    # a start (stop) marked sent whose bytes never went out: the connection closed first
    (OrderStatus.STARTING, "start_unsent"): OrderStatus.PENDING,
    (OrderStatus.STARTING, "cancel"): OrderStatus.CANCELLED,
    (OrderStatus.STOPPING, "stop_unsent"): OrderStatus.CHARGING,
    **{
        (state, "settled"): OrderStatus.SETTLED
        for state in OrderStatus
        if state is not OrderStatus.SETTLED
    },
}


def next_status(current: OrderStatus, event: str) -> OrderStatus | None:
    """The state after ``event``, or None when the pair is not a legal transition."""
    return TRANSITIONS.get((current, event))


class StartMode(str, enum.Enum):
    """How a session was started: by the API, a card, a code, or at the device."""

    ONLINE = "online"
    CARD = "card"
    CODE = "code"
    DEVICE = "device"


class StopReason(str, enum.Enum):
    """Why a session ended, the same words for every protocol (the drivers' vendor codes
    map to these; ``unknown`` where a report gives no honest reason)."""

    FULL = "full"
    MAX_DURATION = "max_duration"
    TIME_LIMIT = "time_limit"
    ENERGY_LIMIT = "energy_limit"
    UNPLUGGED = "unplugged"
    OVERLOAD = "overload"
    SERVER_STOP = "server_stop"
    LOW_POWER = "low_power"
    OVER_TEMPERATURE = "over_temperature"
    OVER_VOLTAGE = "over_voltage"
    UNDER_VOLTAGE = "under_voltage"
    USER_STOP = "user_stop"
    EXTERNAL_STOP = "external_stop"
    CARD_STOP = "card_stop"
    FAULT = "fault"
    UNKNOWN = "unknown"


#: protocol-neutral stop reasons (:class:`StopReason` values); the raw code and vendor
#: text are kept beside
AP3000_STOP_REASONS: dict[int, str] = {
    0x01: "full",
    0x02: "max_duration",
    0x03: "time_limit",
    0x04: "energy_limit",
    0x05: "unplugged",
    0x06: "overload",
    0x07: "server_stop",
    0x08: "overload",
    0x09: "low_power",
    0x0A: "over_temperature",
    0x0B: "over_temperature",
    0x0C: "overload",
    0x0D: "unplugged",
    0x0E: "fault",
    0x0F: "fault",
    0x10: "fault",
    0x11: "fault",
    0x12: "fault",
    0x13: "user_stop",
    0x14: "fault",
    0x15: "external_stop",
    0x16: "card_stop",
    0x17: "server_stop",
    0x18: "fault",
    0x19: "fault",
    0x1A: "over_voltage",
    0x1B: "under_voltage",
    0x1C: "low_power",
}


def new_order_no() -> str:
    """A fresh order number: 16 random bytes, 32 uppercase hex digits (AP3000's width)."""
    return secrets.token_hex(16).upper()


#: statuses of an order whose session may still run
_OPEN = frozenset(
    {OrderStatus.PENDING, OrderStatus.STARTING, OrderStatus.CHARGING, OrderStatus.STOPPING}
)
#: their values, for SQL parameters
OPEN_STATUSES = tuple(s.value for s in OrderStatus if s in _OPEN)

#: how long a settled session is remembered to recognise a resent settlement: with the
#: device's own identifiers (business number, order id or end time) and without them
DEDUPE_WINDOW = timedelta(days=30)
DEDUPE_WINDOW_BY_VALUES = timedelta(days=1)
#: a progress report this soon after its session's settlement is late, not a new session
LATE_PROGRESS = timedelta(minutes=10)
#: a start that went unanswered may still have started: reconciled within this window
RECONCILE_WINDOW = timedelta(days=1)
#: a start whose answer is unknown is a session's start if sent this close to its begin
#: (durations come in whole minutes; the answer and the start take seconds)
START_MATCH = timedelta(minutes=3)


async def transition(
    conn: Connection, order_no: str, event: str, **values: Any
) -> OrderStatus | None:
    """Apply ``event`` to the order if legal; set ``values`` with it. Returns the new state.

    An order that would open again (a failed start reported charging after all) while
    another order the platform started is open on its port stays as it is: one open
    order per port (the database enforces it too)."""
    row = await conn.fetchrow(
        "SELECT status, device_id, port FROM orders WHERE order_no = $1 FOR UPDATE", order_no
    )
    if row is None:
        return None
    current = OrderStatus(row["status"])
    target = next_status(current, event)
    if target is None:
        if current is OrderStatus.CHARGING and event == "reported_charging":
            return None  # every progress report of a running session: nothing to say
        log.info(
            "order event ignored in this state",
            order_no=order_no,
            order_event=event,
            status=row["status"],
        )
        return None
    sets = ["status = $2", "updated_at = now()"]
    args: list[Any] = [order_no, target.value]
    for name, value in values.items():
        args.append(json.dumps(value) if name == "settlement" else value)
        sets.append(f"{name} = ${len(args)}")
    statement = f"UPDATE orders SET {', '.join(sets)} WHERE order_no = $1"
    if target in _OPEN and current not in _OPEN:
        try:
            async with conn.transaction():  # a savepoint: the caller's work stays
                await conn.execute(statement, *args)
        except asyncpg.UniqueViolationError:
            log.warning(
                "order not reopened: another order is open on its port",
                order_no=order_no,
                order_event=event,
                device_id=row["device_id"],
                port=row["port"],
            )
            return None
    else:
        await conn.execute(statement, *args)
    log.info("order transition", order_no=order_no, order_event=event, status=target.value)
    return target


async def lock_port(conn: Connection, device_id: str, port: int) -> None:
    """Serialise, across processes and nodes, the transactions that decide which order
    a session of this port belongs to (until the caller's transaction ends)."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"port:{device_id}:{port}")


@dataclasses.dataclass(frozen=True)
class SettlementReport:
    """A device's end-of-session report, identified by what identifies the session.

    ``order_ref``: the order id the device reported (AP3000); ``business_no``: the
    session number the socket allocated (BKV), None if the report lacks it;
    ``hint_order_no``: the order a start the socket just answered with that business
    number belongs to (known before the answer is committed). The session's own values
    (``duration_s``, ``energy_kwh``, ``device_ended_at``) identify it when nothing else
    does; live readings (temperature, signal) never do. ``values(order)`` gives the
    columns to store, from the order found (None: a new one). ``stuck_starts``: a start
    left without an answer may be the session's order (not for card sessions, whose
    orders carry their business number from the swipe).
    """

    protocol: str
    device_id: str
    port: int
    start_mode: str
    order_ref: str | None
    business_no: int | None
    duration_s: int | None
    energy_kwh: float | None
    device_ended_at: datetime | None
    values: Callable[[Any], dict[str, Any]]
    hint_order_no: str | None = None
    stuck_starts: bool = True


@dataclasses.dataclass(frozen=True)
class Settled:
    """What a settlement came to: ``applied`` to ``order_no``, or a resend of it."""

    applied: bool
    order_no: str
    review_reason: str | None = None


#: an order as the settlement and progress paths look at it
_ORDER_COLUMNS = """o.*, EXISTS (SELECT 1 FROM commands c WHERE c.order_no = o.order_no
                                 AND c.name = 'stop' AND c.status = 'acked') AS stop_acked"""


async def settle(conn: Connection, report: SettlementReport, *, at: datetime) -> Settled:
    """Apply a settlement once, inside the caller's transaction.

    The port is locked first (:func:`lock_port`), so resends arriving at two processes at
    once are decided one after the other. A resend of a settled session changes nothing
    (``applied`` False). Otherwise the session's order is, in this order: the open order
    the device's id names (order id, or business number or the start it just answered);
    a start that failed or got no answer although the session ran; for a report without a
    business number, the port's open order whose start was acknowledged; else a new
    device-initiated order. An order of *another* device is never touched: a new order
    is made and marked for review."""
    await lock_port(conn, report.device_id, report.port)
    if report.order_ref is not None:
        return await _settle_by_ref(conn, report, at)
    if report.business_no is not None:
        order = await find_session_order(
            conn,
            report.device_id,
            report.port,
            report.business_no,
            hint_order_no=report.hint_order_no,
            stuck_starts=False,
        )
        if order is not None:
            return await _apply(conn, report, order, at)
    earlier = await _settled_copy(conn, report, at)
    if earlier is not None:
        return Settled(False, earlier)
    if report.business_no is not None:
        began = None if report.duration_s is None else at - timedelta(seconds=report.duration_s)
        order = await find_session_order(
            conn,
            report.device_id,
            report.port,
            report.business_no,
            stuck_starts=report.stuck_starts,
            session_started_at=began,
        )
    else:  # a port runs one session at a time: the open order whose start was answered
        order = await conn.fetchrow(
            f"""SELECT {_ORDER_COLUMNS} FROM orders o
                WHERE o.device_id = $1 AND o.port = $2 AND o.status IN ('charging', 'stopping')
                ORDER BY o.created_at DESC LIMIT 1""",
            report.device_id,
            report.port,
        )
    return await _apply(conn, report, order, at)


async def find_session_order(
    conn: Connection,
    device_id: str,
    port: int,
    business_no: int,
    *,
    hint_order_no: str | None = None,
    stuck_starts: bool = True,
    session_started_at: datetime | None = None,
    window: timedelta = RECONCILE_WINDOW,
) -> Any:
    """The order of the session (device, port, business number) that is not settled, or
    None: an open order with that business number (or ``hint_order_no``, the order whose
    start the socket just answered with it); else a recent order that failed although it
    carries that very business number (a card order whose confirmation was lost); with
    ``stuck_starts``, else a recent order whose start was sent and whose answer is not
    recorded (``starting``, or ``failed`` after no answer), which may have started after
    all. Such a start is taken only if it was sent within ``START_MATCH`` of when the
    session began (``session_started_at``, from its duration): a session the device
    started on its own at another time is never billed to it. Without that time only a
    start that failed for want of an answer is taken."""
    row = await conn.fetchrow(
        f"""SELECT {_ORDER_COLUMNS} FROM orders o
            WHERE o.device_id = $1 AND o.port = $2
              AND (o.business_no = $3 OR o.order_no = $4)
              AND o.status = ANY($5::text[])
            ORDER BY o.created_at DESC LIMIT 1""",
        device_id,
        port,
        business_no,
        hint_order_no,
        list(OPEN_STATUSES),
    )
    if row is not None:
        return row
    row = await conn.fetchrow(
        f"""SELECT {_ORDER_COLUMNS} FROM orders o
            WHERE o.device_id = $1 AND o.port = $2
              AND o.created_at > now() - make_interval(secs => $4)
              AND ((o.status = 'failed' AND o.business_no = $3)
                   OR ($5 AND o.business_no IS NULL AND EXISTS (
                       SELECT 1 FROM commands c WHERE c.command_id = o.start_command_id
                         AND c.attempts > 0 AND c.sent_at IS NOT NULL
                         AND ((o.status = 'failed' AND c.status = 'dead')
                              OR (o.status = 'starting' AND c.status IN ('pending', 'sent')))
                         AND CASE WHEN $6::timestamptz IS NULL THEN o.status = 'failed'
                                  ELSE c.sent_at BETWEEN $6 - make_interval(secs => $7)
                                                     AND $6 + make_interval(secs => $7)
                             END)))
            ORDER BY (o.business_no IS NOT NULL) DESC, o.created_at DESC LIMIT 1""",
        device_id,
        port,
        business_no,
        window.total_seconds(),
        stuck_starts,
        session_started_at,
        START_MATCH.total_seconds(),
    )
    if row is not None:
        log.info(
            "start without an answer reconciled by the business number",
            order_no=row["order_no"],
            business_no=business_no,
        )
    return row


async def _settle_by_ref(conn: Connection, report: SettlementReport, at: datetime) -> Settled:
    """A report naming its order id (AP3000): that order of this device, unless it is
    settled already with the same values (a resend) or with others (the device reused
    the id: a new order)."""
    ref = report.order_ref
    assert ref is not None
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtext($1))", f"ref:{report.device_id}:{ref}"
    )
    rows = await conn.fetch(
        f"""SELECT {_ORDER_COLUMNS} FROM orders o WHERE o.device_id = $1
              AND (o.order_no = $2 OR o.device_ref = $2) ORDER BY o.created_at DESC""",
        report.device_id,
        ref,
    )
    for row in rows:
        if row["status"] != OrderStatus.SETTLED.value:
            return await _apply(conn, report, row, at)
    for row in rows:
        if _same_session(row, report):
            return Settled(False, str(row["order_no"]))
    owner = await conn.fetchval("SELECT device_id FROM orders WHERE order_no = $1", ref)
    review = None
    if owner is not None and owner != report.device_id:
        review = f"order number {ref} belongs to device {owner}"
    return await _apply(conn, report, None, at, order_no=None if owner else ref, review=review)


async def _apply(
    conn: Connection,
    report: SettlementReport,
    order: Any,
    at: datetime,
    *,
    order_no: str | None = None,
    review: str | None = None,
) -> Settled:
    """Settle ``order`` (None: a new device-initiated one) with the report's values."""
    values = dict(report.values(order))
    if order is None:
        order_no = order_no or new_order_no()
        await conn.execute(
            """INSERT INTO orders (order_no, device_id, port, protocol, status, start_mode,
                                   device_initiated, created_at, device_ref, review_reason)
               VALUES ($1, $2, $3, $4, 'charging', $5, true, $6, $7, $8)""",
            order_no,
            report.device_id,
            report.port,
            report.protocol,
            report.start_mode,
            at,
            report.order_ref,
            review,
        )
        if review is not None:
            log.warning("settlement names another device's order", order_no=order_no, why=review)
    else:
        order_no = str(order["order_no"])
        if values.get("business_no") is None:
            values.pop("business_no", None)  # a report without it keeps the order's
    if await transition(conn, order_no, "settled", ended_at=at, **values) is None:
        return Settled(False, order_no)  # settled meanwhile (cannot happen under the lock)
    return Settled(True, order_no, review)


def _known_equal(stored: Any, reported: Any) -> bool:
    """Equal where both are known: a field missing on either side tells nothing."""
    return stored is None or reported is None or stored == reported


def _same_session(row: Any, report: SettlementReport) -> bool:
    return (
        _known_equal(row["duration_s"], report.duration_s)
        and _known_equal(row["energy_kwh"], report.energy_kwh)
        and _known_equal(row["device_ended_at"], report.device_ended_at)
    )


async def _settled_copy(conn: Connection, report: SettlementReport, at: datetime) -> str | None:
    """The settled order this report (without an order id) is a resend of, if any.

    Fields missing on either side (an optional tag a copy lacked) are unknown, not
    different. A match on the business number or the device's end time identifies the
    session; a match on duration and energy alone only if that order is the port's
    latest one, settled within a day (two real sessions that look alike on a port are
    otherwise told apart by what happened between them)."""
    rows = await conn.fetch(
        """SELECT order_no, business_no, device_ended_at, ended_at, duration_s, energy_kwh
           FROM orders
           WHERE device_id = $1 AND port = $2 AND status = 'settled' AND ended_at > $3
             AND ($4::int IS NULL OR business_no IS NULL OR business_no = $4)
             AND ($5::int IS NULL OR duration_s IS NULL OR duration_s = $5)
             AND ($6::float8 IS NULL OR energy_kwh IS NULL OR energy_kwh = $6)
             AND ($7::timestamptz IS NULL OR device_ended_at IS NULL OR device_ended_at = $7)
           ORDER BY ended_at DESC LIMIT 20""",
        report.device_id,
        report.port,
        at - DEDUPE_WINDOW,
        report.business_no,
        report.duration_s,
        report.energy_kwh,
        report.device_ended_at,
    )
    for row in rows:
        by_number = report.business_no is not None and row["business_no"] == report.business_no
        by_end = (
            report.device_ended_at is not None and row["device_ended_at"] == report.device_ended_at
        )
        if by_number or by_end:
            return str(row["order_no"])
    if not rows:
        return None
    latest = rows[0]
    if latest["ended_at"] < at - DEDUPE_WINDOW_BY_VALUES:
        return None
    newer = await conn.fetchval(
        """SELECT 1 FROM orders WHERE device_id = $1 AND port = $2 AND order_no <> $3
             AND (created_at > $4 OR (status = 'settled' AND ended_at > $4)) LIMIT 1""",
        report.device_id,
        report.port,
        latest["order_no"],
        latest["ended_at"],
    )
    return None if newer else str(latest["order_no"])


async def reported_charging(
    conn: Connection,
    *,
    protocol: str,
    device_id: str,
    port: int,
    order_ref: str,
    start_mode: str,
    at: datetime,
) -> str:
    """A device reports the session ``order_ref`` charging: the device's order of that
    reference moves to ``charging`` (reconciling a start left without an answer), or a
    device-initiated order is made for it. Returns the order number. Inside the caller's
    transaction, the port locked (:func:`lock_port`)."""
    await lock_port(conn, device_id, port)
    rows = await conn.fetch(
        """SELECT order_no, status, ended_at FROM orders WHERE device_id = $1
             AND (order_no = $2 OR device_ref = $2) ORDER BY created_at DESC""",
        device_id,
        order_ref,
    )
    for row in rows:
        settled = row["status"] == OrderStatus.SETTLED.value
        # a late report of a session just settled belongs to it; a reference settled
        # long ago that reports charging again is a new session (the device reused it)
        if not settled or row["ended_at"] > at - LATE_PROGRESS:
            order_no = str(row["order_no"])
            await transition(conn, order_no, "reported_charging", failure_reason=None)
            return order_no
    owner = await conn.fetchval("SELECT device_id FROM orders WHERE order_no = $1", order_ref)
    order_no = order_ref if owner is None else new_order_no()
    review = None
    if owner is not None and owner != device_id:
        review = f"order number {order_ref} belongs to device {owner}"
    await conn.execute(
        """INSERT INTO orders (order_no, device_id, port, protocol, status, start_mode,
                               device_initiated, started_at, device_ref, review_reason)
           VALUES ($1, $2, $3, $4, 'charging', $5, true, $6, $7, $8)""",
        order_no,
        device_id,
        port,
        protocol,
        start_mode,
        at,
        order_ref,
        review,
    )
    return order_no


async def open_card_order(
    conn: Connection, device_id: str, port: int, business_no: int
) -> str | None:
    """The open card order of the swipe that allocated ``business_no`` on this port, if
    any (the device resent the swipe: its order is on its way)."""
    order_no: str | None = await conn.fetchval(
        """SELECT order_no FROM orders WHERE device_id = $1 AND port = $2
           AND business_no = $3 AND start_mode = 'card'
           AND status = ANY($4::text[])""",
        device_id,
        port,
        business_no,
        list(OPEN_STATUSES),
    )
    return order_no


async def limit_by_time(conn: Connection, order_no: str, duration_min: int | None) -> None:
    """The order ends at a time limit of ``duration_min`` (what a card's balance buys)."""
    await conn.execute(
        "UPDATE orders SET mode = 'time', requested_duration_min = $2 WHERE order_no = $1",
        order_no,
        duration_min,
    )


async def note_business_no(conn: Connection, order_no: str, business_no: int) -> None:
    """The business number a socket named when it accepted the order's start (kept if the
    order has one already)."""
    await conn.execute(
        "UPDATE orders SET business_no = $2 WHERE order_no = $1 AND business_no IS NULL",
        order_no,
        business_no,
    )


_SAMPLE_COLUMNS = "order_no, at, duration_s, energy_kwh, power_w, voltage_v, current_a"
#: a sample and its cause in one statement (outside a transaction: its own), the cause
#: set before the row's trigger emits ``order.progress`` (as ``store.causes.apply``)
_SAMPLE_WITH_CAUSE = f"""
    WITH cause AS (
        SELECT set_config('chargegw.cause_kind', $8, true),
               set_config('chargegw.cause_ref', coalesce($9, ''), true),
               set_config('chargegw.cause_frame_id', coalesce($10::bigint::text, ''), true))
    INSERT INTO order_samples ({_SAMPLE_COLUMNS})
    SELECT $1, $2, $3, $4, $5, $6, $7 FROM cause
    WHERE EXISTS (SELECT 1 FROM orders WHERE order_no = $1 AND status = 'charging')"""


def _sample_values(order_no: str, at: datetime, sample: Mapping[str, Any]) -> tuple[Any, ...]:
    """A sample's values in the order of ``_SAMPLE_COLUMNS`` (absent values are NULL)."""
    return (
        order_no,
        at,
        sample.get("duration_s"),
        sample.get("energy_kwh"),
        sample.get("power_w"),
        sample.get("voltage_v"),
        sample.get("current_a"),
    )


async def add_sample(
    conn: Connection,
    order_no: str,
    at: datetime,
    sample: Mapping[str, Any],
) -> None:
    """One progress sample of a running order (duration, energy, power, voltage,
    current; absent values are NULL)."""
    await conn.execute(
        f"INSERT INTO order_samples ({_SAMPLE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        *_sample_values(order_no, at, sample),
    )


async def add_charging_sample(
    conn: Connection, order_no: str, at: datetime, sample: Mapping[str, Any], cause: Cause
) -> bool:
    """:func:`add_sample` if the order is ``charging`` now, with ``cause`` applied, in
    one statement (one round trip where a transaction takes four). False if the order
    is not charging (nothing added: check it in full)."""
    status = await conn.execute(_SAMPLE_WITH_CAUSE, *_sample_values(order_no, at, sample), *cause)
    return bool(status == "INSERT 0 1")


async def note_session(
    conn: Connection, order_no: str, business_no: int, started_at: datetime
) -> None:
    """The device reports the order's session running under ``business_no`` since about
    ``started_at`` (kept if a start time is known already)."""
    await conn.execute(
        """UPDATE orders SET business_no = $2, started_at = COALESCE(started_at, $3)
           WHERE order_no = $1""",
        order_no,
        business_no,
        started_at,
    )


def _plain(value: enum.Enum | None) -> Any:
    return None if value is None else value.value


@dataclasses.dataclass(frozen=True)
class OrderFilter:
    """Which orders a list holds; None: any. ``since`` and ``until`` bound the creation
    time (``[since, until)``); ``review``: marked for review or not."""

    device_id: str | None = None
    status: OrderStatus | None = None
    since: datetime | None = None
    until: datetime | None = None
    review: bool | None = None
    stop_reason: StopReason | None = None
    start_mode: StartMode | None = None
    device_initiated: bool | None = None

    def where(self) -> Where:
        """The conditions, on the columns of ``orders``."""
        where = Where()
        for column, value in (
            ("device_id", self.device_id),
            ("status", _plain(self.status)),
            ("stop_reason", _plain(self.stop_reason)),
            ("start_mode", _plain(self.start_mode)),
            ("device_initiated", self.device_initiated),
        ):
            if value is not None:
                where.add(f"{column} = {{}}", value)
        if self.since is not None:
            where.add("created_at >= {}", self.since)
        if self.until is not None:
            where.add("created_at < {}", self.until)
        if self.review is not None:
            where.add("(review_reason IS NOT NULL) = {}", self.review)
        return where


async def list_orders(
    conn: Connection,
    filters: OrderFilter,
    *,
    before: tuple[datetime, str] | None,
    limit: int,
) -> Page[asyncpg.Record]:
    """The rows of the orders ``filters`` admits, newest first (creation time, then order
    number), after the key ``before`` (created_at, order_no) of the previous page."""
    where = filters.where()
    if before is not None:
        where.add("(created_at, order_no) < ({}, {})", *before)
    rows = await conn.fetch(
        f"SELECT * FROM orders {where.sql()} "
        f"ORDER BY created_at DESC, order_no DESC {where.limit(limit)}",
        *where.args,
    )
    return page_of(rows, limit)
