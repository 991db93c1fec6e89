"""Charging sessions (orders): the state machine and its persistence.

States and the transitions the platform makes (anything else is refused)::

    pending --sent--> starting --start acked--> charging --stop sent--> stopping
    pending|starting --start refused/dead--> failed
    starting|failed --device reports the order charging--> charging   (reconciled)
    any but settled --settlement--> settled
    pending --cancelled before sending--> cancelled

A settlement is applied once: the device's resends of the same settlement change
nothing. A settlement or progress report for an order the platform never started
creates an order marked ``device_initiated``.
"""

from __future__ import annotations

import enum
import json
import secrets
from datetime import datetime
from typing import Any

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


async def transition(conn: Any, order_no: str, event: str, **values: Any) -> OrderStatus | None:
    """Apply ``event`` to the order if legal; set ``values`` with it. Returns the new state."""
    row = await conn.fetchrow("SELECT status FROM orders WHERE order_no = $1 FOR UPDATE", order_no)
    if row is None:
        return None
    target = next_status(OrderStatus(row["status"]), event)
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
    await conn.execute(f"UPDATE orders SET {', '.join(sets)} WHERE order_no = $1", *args)
    log.info("order transition", order_no=order_no, order_event=event, status=target.value)
    return target


async def settle(
    conn: Any,
    *,
    order_no: str,
    device_id: str,
    port: int,
    protocol: str,
    start_mode: str,
    values: dict[str, Any],
    at: datetime,
) -> bool:
    """Apply a settlement once; False when it was already applied (a resend)."""
    row = await conn.fetchrow("SELECT status FROM orders WHERE order_no = $1 FOR UPDATE", order_no)
    if row is None:
        await conn.execute(
            """INSERT INTO orders (order_no, device_id, port, protocol, status, start_mode,
                                   device_initiated, created_at)
               VALUES ($1, $2, $3, $4, 'charging', $5, true, $6)""",
            order_no,
            device_id,
            port,
            protocol,
            start_mode,
            at,
        )
    elif row["status"] == OrderStatus.SETTLED.value:
        return False
    await transition(conn, order_no, "settled", ended_at=at, **values)
    return True
