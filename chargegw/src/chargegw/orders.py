"""Charging sessions (orders): the state machine and its persistence.

States and the transitions the platform makes (anything else is refused)::

    pending --sent--> starting --start acked--> charging --stop sent--> stopping
    pending|starting --start refused/dead--> failed
    starting|failed --device reports the order charging--> charging   (reconciled)
    any but settled --settlement--> settled
    pending --cancelled before sending--> cancelled

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
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import structlog

log = structlog.get_logger("chargegw.orders")


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
    **{
        (state, "settled"): OrderStatus.SETTLED
        for state in OrderStatus
        if state is not OrderStatus.SETTLED
    },
}


def next_status(current: OrderStatus, event: str) -> OrderStatus | None:
    """The state after ``event``, or None when the pair is not a legal transition."""
    return TRANSITIONS.get((current, event))


#: protocol-neutral stop reasons; the raw code and vendor text are kept beside
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
OPEN_STATUSES = ("pending", "starting", "charging", "stopping")
_OPEN = frozenset(OrderStatus(status) for status in OPEN_STATUSES)

#: how long a settled session is remembered to recognise a resent settlement: with the
#: device's own identifiers (business number, order id or end time) and without them
DEDUPE_WINDOW = timedelta(days=30)
DEDUPE_WINDOW_BY_VALUES = timedelta(days=1)


async def transition(conn: Any, order_no: str, event: str, **values: Any) -> OrderStatus | None:
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


async def lock_port(conn: Any, device_id: str, port: int) -> None:
    """Serialise, across processes and nodes, the transactions that decide which order
    a session of this port belongs to (until the caller's transaction ends)."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"port:{device_id}:{port}")


@dataclasses.dataclass(frozen=True)
class SettlementReport:
    """A device's end-of-session report, identified by what identifies the session.

    ``order_ref``: the order id the device reported (AP3000); ``business_no``: the
    session number the socket allocated (BKV), None if the report lacks it. The session's
    own values (``duration_s``, ``energy_kwh``, ``device_ended_at``) identify it when
    nothing else does; live readings (temperature, signal) never do. ``values(order)``
    gives the columns to store, from the order found (None: a new one).
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


@dataclasses.dataclass(frozen=True)
class Settled:
    """What a settlement came to: ``applied`` to ``order_no``, or a resend of it."""

    applied: bool
    order_no: str
    review_reason: str | None = None


async def settle(
    conn: Any,
    report: SettlementReport,
    *,
    at: datetime,
    find_open: Callable[[Any], Awaitable[Any]] | None = None,
) -> Settled:
    """Apply a settlement once, inside the caller's transaction.

    The port is locked first (:func:`lock_port`), so resends arriving at two processes
    at once are decided one after the other. A resend of a settled session changes
    nothing (``applied`` False). Otherwise the session's order is the one the device
    names (an order of *another* device is never touched: a new order is made and marked
    for review), or the open order ``find_open(conn)`` finds, or a new device-initiated
    order."""
    await lock_port(conn, report.device_id, report.port)
    earlier = await _settled_copy(conn, report, at)
    if earlier is not None:
        return Settled(False, earlier)
    order = None
    order_no: str | None = None
    review: str | None = None
    if report.order_ref is not None:
        order = await conn.fetchrow(
            """SELECT * FROM orders WHERE device_id = $1
                 AND (order_no = $2 OR device_ref = $2) ORDER BY created_at DESC LIMIT 1""",
            report.device_id,
            report.order_ref,
        )
        if order is None:
            owner = await conn.fetchval(
                "SELECT device_id FROM orders WHERE order_no = $1", report.order_ref
            )
            if owner is None:
                order_no = report.order_ref
            else:  # the number is another device's order: never settle that one
                review = f"order number {report.order_ref} belongs to device {owner}"
    elif find_open is not None:
        order = await find_open(conn)
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
    await transition(conn, order_no, "settled", ended_at=at, **values)
    return Settled(True, order_no, review)


async def _settled_copy(conn: Any, report: SettlementReport, at: datetime) -> str | None:
    """The settled order this report is a resend of, if any."""
    if report.order_ref is not None:
        found: str | None = await conn.fetchval(
            """SELECT order_no FROM orders WHERE device_id = $1 AND status = 'settled'
                 AND (order_no = $2 OR device_ref = $2) LIMIT 1""",
            report.device_id,
            report.order_ref,
        )
        return found
    own_id = report.business_no is not None or report.device_ended_at is not None
    window = DEDUPE_WINDOW if own_id else DEDUPE_WINDOW_BY_VALUES
    found = await conn.fetchval(
        """SELECT order_no FROM orders
           WHERE device_id = $1 AND port = $2 AND status = 'settled' AND ended_at > $3
             AND ($4::int IS NULL OR business_no IS NULL OR business_no = $4)
             AND duration_s IS NOT DISTINCT FROM $5
             AND energy_kwh IS NOT DISTINCT FROM $6
             AND ($7::timestamptz IS NULL OR device_ended_at = $7)
           ORDER BY ended_at DESC LIMIT 1""",
        report.device_id,
        report.port,
        at - window,
        report.business_no,
        report.duration_s,
        report.energy_kwh,
        report.device_ended_at,
    )
    return found


async def reported_charging(
    conn: Any,
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
    order = await conn.fetchrow(
        """SELECT order_no FROM orders WHERE device_id = $1
             AND (order_no = $2 OR device_ref = $2) ORDER BY created_at DESC LIMIT 1""",
        device_id,
        order_ref,
    )
    if order is not None:
        order_no = str(order["order_no"])
        await transition(conn, order_no, "reported_charging", failure_reason=None)
        return order_no
    owner = await conn.fetchval("SELECT device_id FROM orders WHERE order_no = $1", order_ref)
    order_no = order_ref if owner is None else new_order_no()
    review = None if owner is None else f"order number {order_ref} belongs to device {owner}"
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
