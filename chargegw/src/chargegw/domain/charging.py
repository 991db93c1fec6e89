"""Charging sessions and commands asked for through the API, and their reads.

:class:`ChargingService` opens an order and queues its start, stops or cancels it,
changes its limit and sends any other command: each decides inside the caller's
transaction and every command is an outbox row (:class:`CommandQueue`) before it is a
byte on a socket; the caller wakes the queue after the commit. Refusals are the
:mod:`chargegw.domain.refusals` errors (404, 409, 422).

Protocol details (how a start is encoded, which commands exist) stay with the caller:
it passes the command parameters and a :data:`Validate` that checks them against the
driver's codec.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import asyncpg
from pydantic import BaseModel, Field, field_validator

from chargegw.domain.orders import OPEN_STATUSES, OrderStatus, transition
from chargegw.domain.outbox import CommandStatus, Priority
from chargegw.domain.refusals import ConflictError, InvalidError, NotFoundError
from chargegw.store.causes import apply as apply_cause
from chargegw.store.database import Connection
from chargeproto import EncodeError

#: protocols commands can be sent to
PROTOCOLS = ("ap3000", "bkv")

#: command name -> priority (stop before start before queries before parameters)
PRIORITIES: Mapping[str, Priority] = {
    "stop": Priority.STOP,
    "start": Priority.START,
    "modify": Priority.START,
    "query": Priority.QUERY,
}

#: checks a command's parameters for a device: ``(protocol, device_id, name, params)``;
#: raises ``EncodeError`` (naming the field) when they cannot be sent
Validate = Callable[[str, str, str, dict[str, Any]], None]


class CommandQueue(Protocol):
    """The outbox as the API uses it."""

    async def submit(
        self,
        conn: Connection,
        *,
        device_id: str,
        protocol: str,
        name: str,
        params: dict[str, Any],
        priority: Priority,
        expires_s: float,
        order_no: str | None = None,
        after_command: int | None = None,
    ) -> int:
        """Insert a command row inside the caller's transaction; its id."""
        ...

    def wake(self, device_id: str) -> None:
        """Deliver ``device_id``'s commands now, if it is connected here (after the commit)."""
        ...


# --- reads -------------------------------------------------------------------------------


def _json(raw: Any) -> Any:
    return json.loads(raw) if isinstance(raw, str) else raw


class CommandRecord(BaseModel):
    """A command row of the outbox and its delivery state."""

    command_id: int
    device_id: str
    protocol: str
    name: str = Field(examples=["start"])
    params: dict[str, Any]
    priority: int = Field(description="lower goes first: stop 0, start 1, query 2, ...")
    status: CommandStatus
    correlation: int | None = Field(description="AP3000 message id or BKV frame sequence")
    attempts: int
    order_no: str | None
    created_at: dt.datetime
    expires_at: dt.datetime
    sent_at: dt.datetime | None
    finished_at: dt.datetime | None
    result_code: int | None
    result_text: str | None
    dead_reason: str | None
    reply: dict[str, Any] | None
    claimed_by: str | None = Field(description="the process that sends it")
    after_command: int | None = Field(description="sent only once this command has an outcome")

    _decode = field_validator("params", "reply", mode="before")(_json)


class OrderRecord(BaseModel):
    """An order: one charging session of a port."""

    order_no: str = Field(examples=["9C0F5E2B7D6A41F0B3C2D1E0F9A8B7C6"])
    device_id: str
    port: int
    protocol: str
    status: OrderStatus
    start_mode: str = Field(description="online, card, code or device")
    device_initiated: bool
    mode: str | None = Field(description="full, time or energy")
    requested_duration_min: int | None
    requested_energy_kwh: float | None
    balance_cent: int | None
    card_id: str | None
    business_no: int | None
    start_command_id: int | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    ended_at: dt.datetime | None
    device_ended_at: dt.datetime | None
    duration_s: int | None
    energy_kwh: float | None
    max_power_w: float | None
    stop_reason: str | None
    stop_reason_code: int | None
    stop_reason_text: str | None
    failure_reason: str | None
    amount_cent: int | None
    settlement: dict[str, Any] | None
    updated_at: dt.datetime
    device_ref: str | None = Field(description="the session id the device reported")
    pricing_error: str | None
    review_reason: str | None = Field(description="why a person should look at this order")
    max_power_source: str | None

    _decode = field_validator("settlement", mode="before")(_json)


class OrderSample(BaseModel):
    """A progress sample of a charging session."""

    at: dt.datetime
    duration_s: int | None
    energy_kwh: float | None
    power_w: float | None
    voltage_v: float | None
    current_a: float | None


_COMMAND_COLUMNS = """command_id, device_id, protocol, name, params, priority, status,
    correlation, attempts, order_no, created_at, expires_at, sent_at, finished_at,
    result_code, result_text, dead_reason, reply, claimed_by, after_command"""
_ORDER_COLUMNS = """order_no, device_id, port, protocol, status, start_mode, device_initiated,
    mode, requested_duration_min, requested_energy_kwh, balance_cent, card_id, business_no,
    start_command_id, created_at, started_at, ended_at, device_ended_at, duration_s,
    energy_kwh, max_power_w, stop_reason, stop_reason_code, stop_reason_text, failure_reason,
    amount_cent, settlement, updated_at, device_ref, pricing_error, review_reason,
    max_power_source"""


async def get_command(conn: Connection, command_id: int) -> CommandRecord | None:
    """A command by id; None if there is none."""
    row = await conn.fetchrow(
        f"SELECT {_COMMAND_COLUMNS} FROM commands WHERE command_id = $1", command_id
    )
    return None if row is None else CommandRecord(**dict(row))


async def get_order(conn: Connection, order_no: str) -> OrderRecord | None:
    """An order by number (upper-case hex); None if there is none."""
    row = await conn.fetchrow(f"SELECT {_ORDER_COLUMNS} FROM orders WHERE order_no = $1", order_no)
    return None if row is None else OrderRecord(**dict(row))


async def order_samples(conn: Connection, order_no: str) -> list[OrderSample]:
    """An order's progress samples, oldest first (none for an unknown order)."""
    rows = await conn.fetch(
        """SELECT at, duration_s, energy_kwh, power_w, voltage_v, current_a
           FROM order_samples WHERE order_no = $1 ORDER BY at, id""",
        order_no,
    )
    return [OrderSample(**dict(r)) for r in rows]


# --- commands ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    """A device commands can be sent to."""

    device_id: str
    protocol: str
    port_count: int | None

    def check_port(self, port: int) -> None:
        """``InvalidError`` unless the device has ``port`` (1-based; unknown counts pass)."""
        if self.port_count is not None and port > self.port_count:
            raise InvalidError(f"port {port} does not exist: the device has {self.port_count}")


@dataclasses.dataclass(frozen=True)
class Queued:
    """A command accepted: its row, the order it belongs to, and the order's status
    (``pending``; ``cancelled`` for a start withdrawn before it was sent)."""

    command_id: int
    status: str
    order_no: str | None = None


@dataclasses.dataclass(frozen=True)
class NewOrder:
    """An order to open on ``port`` and the parameters of its start command."""

    port: int
    order_no: str
    mode: str
    duration_min: int | None
    energy_kwh: float | None
    balance_cent: int | None
    start_params: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Idempotency:
    """An ``Idempotency-Key`` of the API key ``scope`` (a digest, '' without a key) and
    what identifies the request (compared with a repeat's)."""

    scope: str
    key: str
    fingerprint: dict[str, Any]


async def command_target(conn: Connection, device_id: str) -> Target:
    """The device, if commands can be sent to it: ``NotFoundError`` or ``InvalidError``."""
    row = await conn.fetchrow(
        "SELECT device_id, protocol, port_count FROM devices WHERE device_id = $1", device_id
    )
    if row is None:
        raise NotFoundError(f"device {device_id} not found")
    if row["protocol"] not in PROTOCOLS:
        raise InvalidError(f"commands to {row['protocol']} devices are not supported")
    return Target(row["device_id"], row["protocol"], row["port_count"])


class ChargingService:
    """Orders and commands through the outbox ``queue``; commands expire after
    ``expires_s`` and are checked with ``validate`` before they become rows."""

    def __init__(self, queue: CommandQueue, *, expires_s: float, validate: Validate) -> None:
        self.queue = queue
        self.expires_s = expires_s
        self.validate = validate

    async def send(
        self,
        conn: Connection,
        target: Target,
        name: str,
        params: dict[str, Any],
        *,
        order_no: str | None = None,
        after_command: int | None = None,
    ) -> int:
        """Queue the command ``name`` inside the caller's transaction; its id.
        ``InvalidError`` (naming the field) when the parameters cannot be sent."""
        try:
            self.validate(target.protocol, target.device_id, name, params)
        except EncodeError as exc:
            raise InvalidError({"error": str(exc), "field": exc.field, "command": name}) from None
        return await self.queue.submit(
            conn,
            device_id=target.device_id,
            protocol=target.protocol,
            name=name,
            params=params,
            priority=PRIORITIES.get(name, Priority.PARAMETER),
            expires_s=self.expires_s,
            order_no=order_no,
            after_command=after_command,
        )

    async def start(
        self, conn: Connection, target: Target, order: NewOrder, idem: Idempotency | None
    ) -> Queued:
        """Open ``order`` and queue its start, inside the caller's transaction.

        With ``idem``, a repeat of the same request answers the first result and starts
        nothing; the same key with another device, port or body is ``InvalidError``.
        ``ConflictError`` when the order number exists or the port has an open order.
        """
        if idem is not None:
            if await conn.fetchval(
                """SELECT 1 FROM idempotency_keys
                   WHERE scope = '' AND key = $1 AND request IS NULL""",
                idem.key,
            ):  # answered before keys were scoped (migration 0011)
                return await _repeated(conn, "", idem.key, idem.fingerprint)
            # taking the key first makes a concurrent repeat wait for this request
            taken = await conn.fetchval(
                """INSERT INTO idempotency_keys (scope, key, request) VALUES ($1, $2, $3)
                   ON CONFLICT DO NOTHING RETURNING 1""",
                idem.scope,
                idem.key,
                json.dumps(idem.fingerprint),
            )
            if taken is None:
                return await _repeated(conn, idem.scope, idem.key, idem.fingerprint)
        if await conn.fetchval("SELECT 1 FROM orders WHERE order_no = $1", order.order_no):
            raise ConflictError(f"order {order.order_no} exists")
        busy = await conn.fetchval(
            """SELECT order_no FROM orders WHERE device_id = $1 AND port = $2
               AND status = ANY($3::text[])""",
            target.device_id,
            order.port,
            list(OPEN_STATUSES),
        )
        if busy:
            raise ConflictError(f"port {order.port} has an open order {busy}")
        await apply_cause(conn)  # the API call that opens it
        try:
            async with conn.transaction():
                await conn.execute(
                    """INSERT INTO orders (order_no, device_id, port, protocol, status,
                                           mode, requested_duration_min,
                                           requested_energy_kwh, balance_cent)
                       VALUES ($1, $2, $3, $8, $9, $4, $5, $6, $7)""",
                    order.order_no,
                    target.device_id,
                    order.port,
                    order.mode,
                    order.duration_min,
                    order.energy_kwh,
                    order.balance_cent,
                    target.protocol,
                    OrderStatus.PENDING.value,
                )
        except asyncpg.UniqueViolationError:  # a concurrent start opened one first
            raise ConflictError(f"port {order.port} has an open order") from None
        command_id = await self.send(
            conn, target, "start", order.start_params, order_no=order.order_no
        )
        await conn.execute(
            "UPDATE orders SET start_command_id = $2 WHERE order_no = $1",
            order.order_no,
            command_id,
        )
        if idem is not None:
            await conn.execute(
                """UPDATE idempotency_keys SET order_no = $3, command_id = $4
                   WHERE scope = $1 AND key = $2""",
                idem.scope,
                idem.key,
                order.order_no,
                command_id,
            )
        return Queued(command_id, OrderStatus.PENDING.value, order.order_no)

    async def stop(
        self,
        conn: Connection,
        target: Target,
        port: int,
        stop_params: Callable[[str], dict[str, Any]],
    ) -> Queued:
        """Stop the port's open order, inside the caller's transaction: a start not sent
        yet is cancelled instead; a stop for a start in flight goes after the start's
        answer; a stop already queued is returned again. ``stop_params(order_no)``: the
        stop command's parameters. ``ConflictError`` without an open order."""
        target.check_port(port)
        order = await conn.fetchrow(
            """SELECT order_no, start_command_id FROM orders
               WHERE device_id = $1 AND port = $2 AND status = ANY($3::text[])
               ORDER BY created_at DESC LIMIT 1""",
            target.device_id,
            port,
            list(OPEN_STATUSES),
        )
        if order is None:
            raise ConflictError(f"no running order on port {port}")
        order_no: str = order["order_no"]
        # lock order: the start command, then the order (as the outbox does)
        start = await _lock_start(conn, order["start_command_id"])
        status = await conn.fetchval(
            "SELECT status FROM orders WHERE order_no = $1 FOR UPDATE", order_no
        )
        if status not in OPEN_STATUSES:
            raise ConflictError(f"no running order on port {port}: {order_no} is {status}")
        if start is not None and start.unsent:
            await _cancel_start(conn, start.command_id, "stopped before it was sent")
            await transition(conn, order_no, "cancel")
            return Queued(start.command_id, OrderStatus.CANCELLED.value, order_no)
        queued = await conn.fetchval(
            """SELECT command_id FROM commands WHERE order_no = $1 AND name = 'stop'
               AND status = ANY($2::text[]) ORDER BY command_id LIMIT 1""",
            order_no,
            [CommandStatus.PENDING.value, CommandStatus.SENT.value],
        )
        if queued is not None:
            return Queued(queued, OrderStatus.PENDING.value, order_no)
        in_flight = start is not None and start.status in (
            CommandStatus.PENDING,
            CommandStatus.SENT,
        )
        command_id = await self.send(
            conn,
            target,
            "stop",
            stop_params(order_no),
            order_no=order_no,
            after_command=start.command_id if in_flight and start else None,
        )
        return Queued(command_id, OrderStatus.PENDING.value, order_no)

    async def cancel(self, conn: Connection, order_no: str) -> Queued:
        """Cancel an order whose start is still an unsent row, inside the caller's
        transaction: ``NotFoundError``, or ``ConflictError`` once the start was sent."""
        command_id = await conn.fetchval(
            "SELECT start_command_id FROM orders WHERE order_no = $1", order_no
        )
        # lock order: the start command, then the order (as the outbox does)
        start = await _lock_start(conn, command_id)
        status = await conn.fetchval(
            "SELECT status FROM orders WHERE order_no = $1 FOR UPDATE", order_no
        )
        if status is None:
            raise NotFoundError(f"order {order_no} not found")
        # only while the start is still a row: once sent, stop the session instead
        if status != OrderStatus.PENDING.value or start is None or not start.unsent:
            raise ConflictError(f"order {order_no} is {status}: stop it instead")
        await _cancel_start(conn, start.command_id, "cancelled")
        await transition(conn, order_no, "cancel")
        return Queued(start.command_id, OrderStatus.CANCELLED.value, order_no)


@dataclasses.dataclass(frozen=True)
class _Start:
    command_id: int
    status: CommandStatus
    attempts: int

    @property
    def unsent(self) -> bool:
        """Still a row only: pending and never written to the device."""
        return self.status is CommandStatus.PENDING and self.attempts == 0


async def _repeated(conn: Connection, scope: str, key: str, fingerprint: dict[str, Any]) -> Queued:
    """The answer to a request whose ``Idempotency-Key`` was used before: the first
    result, or ``InvalidError`` naming what differs."""
    earlier = await conn.fetchrow(
        """SELECT order_no, command_id, request FROM idempotency_keys
           WHERE scope = $1 AND key = $2""",
        scope,
        key,
    )
    assert earlier is not None
    first = _json(earlier["request"])
    if first is not None:
        differ = [
            name for name in ("device_id", "port", "body") if first.get(name) != fingerprint[name]
        ]
        if differ:
            raise InvalidError(
                {
                    "error": "the Idempotency-Key was used for a different request",
                    "conflict": differ,
                    "order_no": earlier["order_no"],
                }
            )
    status = await conn.fetchval(
        "SELECT status FROM orders WHERE order_no = $1", earlier["order_no"]
    )
    return Queued(earlier["command_id"], status, earlier["order_no"])


async def _lock_start(conn: Connection, command_id: int | None) -> _Start | None:
    """The start command of an order, locked (None if it has none)."""
    if command_id is None:
        return None
    row = await conn.fetchrow(
        "SELECT command_id, status, attempts FROM commands WHERE command_id = $1 FOR UPDATE",
        command_id,
    )
    if row is None:
        return None
    return _Start(row["command_id"], CommandStatus(row["status"]), row["attempts"])


async def _cancel_start(conn: Connection, command_id: int, why: str) -> None:
    await apply_cause(conn)  # the call that cancels it (and its order, next)
    await conn.execute(
        """UPDATE commands SET status = $3, dead_reason = $2, finished_at = now()
           WHERE command_id = $1 AND status = $4""",
        command_id,
        why,
        CommandStatus.DEAD.value,
        CommandStatus.PENDING.value,
    )
