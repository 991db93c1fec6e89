"""The command API: start and stop charging, change a running session, send commands,
and follow orders and commands. Every command becomes an outbox row first."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from typing import TYPE_CHECKING, Annotated, Any, Literal

import asyncpg
from fastapi import APIRouter, Header, HTTPException, Path, Query, Request
from pydantic import BaseModel, Field

from chargegw.api.app import decode_cursor, encode_cursor, utc
from chargegw.core import split_device_id
from chargegw.domain import auth
from chargegw.domain.orders import OPEN_STATUSES, OrderStatus, new_order_no, transition
from chargegw.domain.outbox import Priority
from chargegw.drivers import ap3000_commands, bkv_commands
from chargeproto import EncodeError

if TYPE_CHECKING:
    from chargegw.app import Gateway

_ORDER_NO = re.compile(r"^[0-9A-F]{32}$")
#: protocols commands can be sent to
_PROTOCOLS = ("ap3000", "bkv")

#: command name -> priority (stop before start before queries before parameters)
_PRIORITIES = {
    "stop": Priority.STOP,
    "start": Priority.START,
    "modify": Priority.START,
    "query": Priority.QUERY,
}


class StartRequest(BaseModel):
    """How to charge: until full, for a time, or for an amount of energy."""

    mode: Literal["full", "time", "energy"]
    duration_min: int | None = Field(None, ge=1, le=1092, description="for mode=time")
    energy_kwh: float | None = Field(None, gt=0, le=655.35, description="for mode=energy")
    balance_cent: int | None = Field(
        None, ge=0, le=0xFFFFFFFF, description="announced by the pile's voice prompt"
    )
    order_no: str | None = Field(None, description="32 hex digits; generated when absent")


class ModifyRequest(BaseModel):
    """New limit of a running session (AP3000 0x8A; BKV has no such command)."""

    duration_min: int | None = Field(None, ge=1, le=1092)
    energy_kwh: float | None = Field(None, gt=0, le=655.35)
    stop_when_full: bool = False


class CommandRequest(BaseModel):
    command: str = Field(
        description="e.g. reboot, locate, set_qr_code, set_work_mode (AP3000); "
        "set_params, query_params, voice_window, node_add, node_list_refresh (BKV)"
    )
    params: dict[str, Any] = Field(default_factory=dict)


class Accepted(BaseModel):
    order_no: str | None = None
    command_id: int
    status: str


def make_router(gateway: Gateway) -> APIRouter:
    """The command and order endpoints of ``gateway``."""
    router = APIRouter(prefix="/api/v1", tags=["commands"])

    def pool() -> asyncpg.Pool:
        if gateway.pool is None:
            raise HTTPException(503, "database unavailable")
        return gateway.pool

    async def device(device_id: str) -> asyncpg.Record:
        row = await pool().fetchrow(
            "SELECT device_id, protocol, port_count FROM devices WHERE device_id = $1", device_id
        )
        if row is None:
            raise HTTPException(404, f"device {device_id} not found")
        if row["protocol"] not in _PROTOCOLS:
            raise HTTPException(422, f"commands to {row['protocol']} devices are not supported")
        return row

    def generic(protocol: str) -> dict[str, Any]:
        """The commands the generic endpoint accepts for ``protocol``."""
        if protocol == "bkv":
            return dict(bkv_commands.GENERIC)
        return dict(ap3000_commands.GENERIC)

    def check_port(row: asyncpg.Record, port: int) -> None:
        count = row["port_count"]
        if count is not None and port > count:
            raise HTTPException(422, f"port {port} does not exist: the device has {count}")

    async def enqueue(
        conn: Any,
        device_id: str,
        protocol: str,
        name: str,
        params: dict[str, Any],
        order_no: str | None,
        *,
        after_command: int | None = None,
    ) -> int:
        try:
            if protocol == "bkv":
                bkv_commands.validate(device_id, name, params)
            else:
                ap3000_commands.validate(split_device_id(device_id)[0], name, params)
        except EncodeError as exc:
            raise HTTPException(
                422, {"error": str(exc), "field": exc.field, "command": name}
            ) from None
        return await gateway.outbox.submit(
            conn,
            device_id=device_id,
            protocol=protocol,
            name=name,
            params=params,
            priority=_PRIORITIES.get(name, Priority.PARAMETER),
            expires_s=gateway.settings.command_expiry_s,
            order_no=order_no,
            after_command=after_command,
        )

    @router.post(
        "/devices/{device_id}/ports/{port}/start",
        status_code=202,
        response_model=Accepted,
        summary="Start charging on a port",
    )
    async def start(
        request: Request,
        device_id: str,
        port: Annotated[int, Path(ge=1, le=255)],
        body: StartRequest,
        idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    ) -> Accepted:
        """Open an order and queue its start. With an ``Idempotency-Key`` (scoped to the
        API key that sends it), a repeat of the same request returns the first result and
        starts nothing; the same key with another device, port or body is a 422."""
        row = await device(device_id)
        check_port(row, port)
        if body.mode == "time" and body.duration_min is None:
            raise HTTPException(422, "mode=time needs duration_min")
        if body.mode == "energy" and body.energy_kwh is None:
            raise HTTPException(422, "mode=energy needs energy_kwh")
        order_no = (body.order_no or new_order_no()).upper()
        if not _ORDER_NO.match(order_no):
            raise HTTPException(422, "order_no must be 32 hex digits (16 bytes on the wire)")
        protocol = row["protocol"]
        params: dict[str, Any]
        if protocol == "bkv":  # the order number stays here; the socket names a business no
            params = bkv_commands.start_params(
                port - 1, body.mode, body.duration_min, body.energy_kwh
            )
        else:
            rate_mode, limit = 0, 0
            if body.mode == "time":
                limit = (body.duration_min or 0) * 60
            elif body.mode == "energy":
                rate_mode, limit = 2, round((body.energy_kwh or 0) * 100)
            params = {
                "port": port - 1,
                "rate_mode": rate_mode,
                "charge_limit": limit,
                "balance_cent": body.balance_cent or 0,
                "order_id": order_no,
            }
        fingerprint = {
            "device_id": device_id,
            "port": port,
            "body": hashlib.sha256(
                json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()
            ).hexdigest(),
        }
        scope = _key_scope(request)
        async with pool().acquire() as conn, conn.transaction():
            if idempotency_key:
                if await conn.fetchval(
                    """SELECT 1 FROM idempotency_keys
                       WHERE scope = '' AND key = $1 AND request IS NULL""",
                    idempotency_key,
                ):  # answered before keys were scoped (migration 0011)
                    return await _repeated(conn, "", idempotency_key, fingerprint)
                # taking the key first makes a concurrent repeat wait for this request
                taken = await conn.fetchval(
                    """INSERT INTO idempotency_keys (scope, key, request) VALUES ($1, $2, $3)
                       ON CONFLICT DO NOTHING RETURNING 1""",
                    scope,
                    idempotency_key,
                    json.dumps(fingerprint),
                )
                if taken is None:
                    return await _repeated(conn, scope, idempotency_key, fingerprint)
            if await conn.fetchval("SELECT 1 FROM orders WHERE order_no = $1", order_no):
                raise HTTPException(409, f"order {order_no} exists")
            busy = await conn.fetchval(
                """SELECT order_no FROM orders WHERE device_id = $1 AND port = $2
                   AND status = ANY($3::text[])""",
                device_id,
                port,
                list(OPEN_STATUSES),
            )
            if busy:
                raise HTTPException(409, f"port {port} has an open order {busy}")
            try:
                async with conn.transaction():
                    await conn.execute(
                        """INSERT INTO orders (order_no, device_id, port, protocol, status,
                                               mode, requested_duration_min,
                                               requested_energy_kwh, balance_cent)
                           VALUES ($1, $2, $3, $8, 'pending', $4, $5, $6, $7)""",
                        order_no,
                        device_id,
                        port,
                        body.mode,
                        body.duration_min,
                        body.energy_kwh,
                        body.balance_cent,
                        protocol,
                    )
            except asyncpg.UniqueViolationError:  # a concurrent start opened one first
                raise HTTPException(409, f"port {port} has an open order") from None
            command_id = await enqueue(conn, device_id, protocol, "start", params, order_no)
            await conn.execute(
                "UPDATE orders SET start_command_id = $2 WHERE order_no = $1", order_no, command_id
            )
            if idempotency_key:
                await conn.execute(
                    """UPDATE idempotency_keys SET order_no = $3, command_id = $4
                       WHERE scope = $1 AND key = $2""",
                    scope,
                    idempotency_key,
                    order_no,
                    command_id,
                )
        gateway.outbox.wake(device_id)
        return Accepted(order_no=order_no, command_id=command_id, status="pending")

    @router.post(
        "/devices/{device_id}/ports/{port}/stop",
        status_code=202,
        response_model=Accepted,
        summary="Stop charging on a port",
    )
    async def stop(device_id: str, port: Annotated[int, Path(ge=1, le=255)]) -> Accepted:
        """Stop the port's open order. A start not sent yet is cancelled instead (status
        ``cancelled``); a stop for a start in flight goes after the start's answer; a stop
        already queued for the order is returned again."""
        row = await device(device_id)
        async with pool().acquire() as conn, conn.transaction():
            order = await conn.fetchrow(
                """SELECT order_no, start_command_id FROM orders
                   WHERE device_id = $1 AND port = $2 AND status = ANY($3::text[])
                   ORDER BY created_at DESC LIMIT 1""",
                device_id,
                port,
                list(OPEN_STATUSES),
            )
            if order is None:
                raise HTTPException(409, f"no running order on port {port}")
            order_no = order["order_no"]
            # lock order: the start command, then the order (as the outbox does)
            start = await _lock_start(conn, order["start_command_id"])
            status = await conn.fetchval(
                "SELECT status FROM orders WHERE order_no = $1 FOR UPDATE", order_no
            )
            if status not in OPEN_STATUSES:
                raise HTTPException(409, f"no running order on port {port}: {order_no} is {status}")
            if start is not None and start["status"] == "pending" and start["attempts"] == 0:
                await _cancel_start(conn, start["command_id"], "stopped before it was sent")
                await transition(conn, order_no, "cancel")
                return Accepted(
                    order_no=order_no, command_id=start["command_id"], status="cancelled"
                )
            queued = await conn.fetchval(
                """SELECT command_id FROM commands WHERE order_no = $1 AND name = 'stop'
                   AND status IN ('pending', 'sent') ORDER BY command_id LIMIT 1""",
                order_no,
            )
            if queued is not None:
                return Accepted(order_no=order_no, command_id=queued, status="pending")
            in_flight = start is not None and start["status"] in ("pending", "sent")
            params: dict[str, Any] = {"port": port - 1}
            if row["protocol"] == "ap3000":
                params["order_id"] = order_no
            command_id = await enqueue(
                conn,
                device_id,
                row["protocol"],
                "stop",
                params,
                order_no,
                after_command=start["command_id"] if in_flight and start else None,
            )
        gateway.outbox.wake(device_id)
        return Accepted(order_no=order_no, command_id=command_id, status="pending")

    @router.post(
        "/devices/{device_id}/ports/{port}/modify",
        status_code=202,
        response_model=Accepted,
        summary="Change the limit of a running session",
    )
    async def modify(
        device_id: str, port: Annotated[int, Path(ge=1, le=255)], body: ModifyRequest
    ) -> Accepted:
        row = await device(device_id)
        if row["protocol"] == "bkv":
            raise HTTPException(
                422,
                "changing the limit of a running session is not supported by BKV: the "
                "protocol has no such command (stop the session and start a new one)",
            )
        if (body.duration_min is None) == (body.energy_kwh is None):
            raise HTTPException(422, "give exactly one of duration_min and energy_kwh")
        if body.energy_kwh is not None:
            params = {
                "port": port - 1,
                "rate_mode": 2,
                "charge_limit": round(body.energy_kwh * 100),
            }
        else:
            params = {
                "port": port - 1,
                "rate_mode": 1 if body.stop_when_full else 0,
                "charge_limit": (body.duration_min or 0) * 60,
            }
        async with pool().acquire() as conn, conn.transaction():
            command_id = await enqueue(conn, device_id, row["protocol"], "modify", params, None)
        gateway.outbox.wake(device_id)
        return Accepted(command_id=command_id, status="pending")

    @router.post(
        "/devices/{device_id}/commands",
        status_code=202,
        response_model=Accepted,
        summary="Send any other command the device's driver supports",
    )
    async def command(device_id: str, body: CommandRequest) -> Accepted:
        row = await device(device_id)
        protocol = row["protocol"]
        if body.command in ("start", "stop", "modify"):
            raise HTTPException(422, f"use the {body.command} endpoint")
        known = generic(protocol)
        if body.command != "query" and body.command not in known:
            raise HTTPException(
                422,
                {
                    "error": f"unknown {protocol} command {body.command!r}",
                    "commands": ["query", *sorted(known)],
                },
            )
        async with pool().acquire() as conn, conn.transaction():
            command_id = await enqueue(conn, device_id, protocol, body.command, body.params, None)
        gateway.outbox.wake(device_id)
        return Accepted(command_id=command_id, status="pending")

    @router.get("/commands/{command_id}", summary="A command's delivery state")
    async def get_command(command_id: int) -> dict[str, Any]:
        row = await pool().fetchrow("SELECT * FROM commands WHERE command_id = $1", command_id)
        if row is None:
            raise HTTPException(404, f"command {command_id} not found")
        return _record(row)

    @router.get("/orders/{order_no}", summary="An order (charging session)")
    async def get_order(order_no: str) -> dict[str, Any]:
        row = await pool().fetchrow("SELECT * FROM orders WHERE order_no = $1", order_no.upper())
        if row is None:
            raise HTTPException(404, f"order {order_no} not found")
        return _record(row)

    @router.get("/orders/{order_no}/samples", summary="Progress samples of an order")
    async def samples(order_no: str) -> dict[str, Any]:
        rows = await pool().fetch(
            """SELECT at, duration_s, energy_kwh, power_w, voltage_v, current_a
               FROM order_samples WHERE order_no = $1 ORDER BY at, id""",
            order_no.upper(),
        )
        return {"items": [_record(r) for r in rows]}

    @router.get("/orders", summary="Orders, newest first")
    async def list_orders(
        device_id: str | None = None,
        status: OrderStatus | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        review: Annotated[
            bool | None,
            Query(description="only orders marked for review (unpriced, foreign order id)"),
        ] = None,
        cursor: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> dict[str, Any]:
        after: tuple[dt.datetime, str] | None = None
        if cursor is not None:
            at, order_no = decode_cursor(cursor, "orders", (str, str))
            try:
                after = (dt.datetime.fromisoformat(at), order_no)
            except ValueError:
                raise HTTPException(422, "malformed cursor") from None
        rows = await pool().fetch(
            """SELECT * FROM orders
               WHERE ($1::text IS NULL OR device_id = $1)
                 AND ($2::text IS NULL OR status = $2)
                 AND ($3::timestamptz IS NULL OR created_at >= $3)
                 AND ($4::timestamptz IS NULL OR created_at < $4)
                 AND ($5::timestamptz IS NULL OR (created_at, order_no) < ($5, $6))
                 AND ($8::bool IS NULL OR (review_reason IS NOT NULL) = $8)
               ORDER BY created_at DESC, order_no DESC LIMIT $7""",
            device_id,
            None if status is None else status.value,
            utc(since),
            utc(until),
            None if after is None else after[0],
            None if after is None else after[1],
            limit + 1,
            review,
        )
        page = rows[:limit]
        next_cursor = None
        if len(rows) > limit:
            last = page[-1]
            next_cursor = encode_cursor(
                "orders", [last["created_at"].isoformat(), last["order_no"]]
            )
        return {"items": [_record(r) for r in page], "next_cursor": next_cursor}

    @router.post(
        "/orders/{order_no}/cancel",
        response_model=Accepted,
        summary="Cancel an order whose start has not been sent yet",
    )
    async def cancel(order_no: str) -> Accepted:
        order_no = order_no.upper()
        async with pool().acquire() as conn, conn.transaction():
            command_id = await conn.fetchval(
                "SELECT start_command_id FROM orders WHERE order_no = $1", order_no
            )
            # lock order: the start command, then the order (as the outbox does)
            start = await _lock_start(conn, command_id)
            status = await conn.fetchval(
                "SELECT status FROM orders WHERE order_no = $1 FOR UPDATE", order_no
            )
            if status is None:
                raise HTTPException(404, f"order {order_no} not found")
            # only while the start is still a row: once sent, stop the session instead
            if (
                status != OrderStatus.PENDING.value
                or start is None
                or start["status"] != "pending"
                or start["attempts"]
            ):
                raise HTTPException(409, f"order {order_no} is {status}: stop it instead")
            await _cancel_start(conn, start["command_id"], "cancelled")
            await transition(conn, order_no, "cancel")
        return Accepted(order_no=order_no, command_id=start["command_id"], status="cancelled")

    return router


def _key_scope(request: Request) -> str:
    """Whose idempotency keys a request uses: a digest of its API key ('' without one)."""
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else ""
    return auth.hash_key(token) if token else ""


async def _repeated(conn: Any, scope: str, key: str, fingerprint: dict[str, Any]) -> Accepted:
    """The answer to a request whose ``Idempotency-Key`` was used before: the first
    result, or 422 naming what differs."""
    earlier = await conn.fetchrow(
        """SELECT order_no, command_id, request FROM idempotency_keys
           WHERE scope = $1 AND key = $2""",
        scope,
        key,
    )
    first = earlier["request"]
    if isinstance(first, str):
        first = json.loads(first)
    if first is not None:
        differ = [
            name for name in ("device_id", "port", "body") if first.get(name) != fingerprint[name]
        ]
        if differ:
            raise HTTPException(
                422,
                {
                    "error": "the Idempotency-Key was used for a different request",
                    "conflict": differ,
                    "order_no": earlier["order_no"],
                },
            )
    status = await conn.fetchval(
        "SELECT status FROM orders WHERE order_no = $1", earlier["order_no"]
    )
    return Accepted(order_no=earlier["order_no"], command_id=earlier["command_id"], status=status)


async def _lock_start(conn: Any, command_id: int | None) -> asyncpg.Record | None:
    """The start command of an order, locked (None if it has none)."""
    if command_id is None:
        return None
    row: asyncpg.Record | None = await conn.fetchrow(
        "SELECT command_id, status, attempts FROM commands WHERE command_id = $1 FOR UPDATE",
        command_id,
    )
    return row


async def _cancel_start(conn: Any, command_id: int, why: str) -> None:
    await conn.execute(
        """UPDATE commands SET status = 'dead', dead_reason = $2, finished_at = now()
           WHERE command_id = $1 AND status = 'pending'""",
        command_id,
        why,
    )


def _record(row: asyncpg.Record) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, raw in row.items():
        value: Any = raw
        if isinstance(raw, dt.datetime):
            value = raw.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
        elif key in ("params", "reply", "settlement") and isinstance(raw, str):
            value = json.loads(raw)
        out[key] = value
    return out
