"""The command API: start and stop charging, change a running session, send commands,
and follow orders and commands. Every command becomes an outbox row first
(:class:`chargegw.domain.charging.ChargingService`); the protocol details of a command
(its parameters, the commands a driver knows) come from the drivers' command modules."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, HTTPException, Path, Query, Request
from pydantic import BaseModel, Field

from chargegw.api.deps import Pool, Services, refused
from chargegw.api.errors import api_error, error_responses
from chargegw.api.pagination import DEFAULT_LIMIT, Cursor, Limit, encode_cursor, timestamp_key, utc
from chargegw.core import split_device_id
from chargegw.domain import auth, charging, orders
from chargegw.domain.charging import (
    ChargingService,
    CommandRecord,
    Idempotency,
    NewOrder,
    OrderRecord,
    OrderSample,
    Queued,
)
from chargegw.domain.orders import (
    OrderFilter,
    OrderStatus,
    StartMode,
    StopReason,
    new_order_no,
)
from chargegw.domain.refusals import InvalidError, RequestError
from chargegw.drivers import ap3000_commands, bkv_commands

__all__ = ["router"]

#: an AP3000 order id on the wire: 16 bytes
ORDER_NO_PATTERN = r"^[0-9A-Fa-f]{32}$"

PortNumber = Annotated[int, Path(ge=1, le=255, description="1-based")]


class StartRequest(BaseModel):
    """How to charge: until full, for a time, or for an amount of energy."""

    mode: Literal["full", "time", "energy"]
    duration_min: int | None = Field(None, ge=1, le=1092, description="for mode=time")
    energy_kwh: float | None = Field(None, gt=0, le=655.35, description="for mode=energy")
    balance_cent: int | None = Field(
        None, ge=0, le=0xFFFFFFFF, description="announced by the pile's voice prompt"
    )
    order_no: str | None = Field(
        None,
        pattern=ORDER_NO_PATTERN,
        description="32 hex digits (16 bytes on the wire); generated when absent",
    )


class ModifyRequest(BaseModel):
    """New limit of a running session (AP3000 0x8A; BKV has no such command): exactly
    one of ``duration_min`` and ``energy_kwh``."""

    duration_min: int | None = Field(None, ge=1, le=1092)
    energy_kwh: float | None = Field(None, gt=0, le=655.35)
    stop_when_full: bool = False


class CommandRequest(BaseModel):
    """Any other command of the device's driver, with its parameters (the canonical
    field names of the protocol reference)."""

    command: str = Field(
        min_length=1,
        max_length=64,
        description="e.g. reboot, locate, set_qr_code, set_work_mode (AP3000); "
        "set_params, query_params, voice_window, node_add, node_list_refresh (BKV)",
    )
    params: dict[str, Any] = Field(default_factory=dict)


class Accepted(BaseModel):
    """A command queued (202): follow it at ``/api/v1/commands/{command_id}``."""

    order_no: str | None = None
    command_id: int
    status: str = Field(
        description="the order's status: pending; cancelled when a start not sent yet "
        "was withdrawn instead",
        examples=["pending"],
    )


class OrderPage(BaseModel):
    """A page of orders, newest first."""

    items: list[OrderRecord]
    next_cursor: str | None


class SampleList(BaseModel):
    """An order's progress samples, oldest first."""

    items: list[OrderSample]


router = APIRouter(prefix="/api/v1", tags=["commands"])


def _validate(protocol: str, device_id: str, name: str, params: dict[str, Any]) -> None:
    if protocol == "bkv":
        bkv_commands.validate(device_id, name, params)
    else:
        ap3000_commands.validate(split_device_id(device_id)[0], name, params)


def _service(services: Services) -> ChargingService:
    return ChargingService(services.outbox, expires_s=services.command_expiry_s, validate=_validate)


def _accepted(queued: Queued) -> Accepted:
    return Accepted(order_no=queued.order_no, command_id=queued.command_id, status=queued.status)


def _key_scope(request: Request) -> str:
    """Whose idempotency keys a request uses: a digest of its API key ('' without one);
    a console session's is that of the key it was opened with."""
    session_key_hash: str | None = getattr(request.state, "session_key_hash", None)
    if session_key_hash is not None:
        return session_key_hash
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else ""
    return auth.hash_key(token) if token else ""


def start_command_params(
    protocol: str, port: int, body: StartRequest, order_no: str
) -> dict[str, Any]:
    """The start command's parameters (ports are 0-based on the wire)."""
    if protocol == "bkv":  # the order number stays here; the socket names a business no
        return bkv_commands.start_params(port - 1, body.mode, body.duration_min, body.energy_kwh)
    rate_mode, limit = 0, 0
    if body.mode == "time":
        limit = (body.duration_min or 0) * 60
    elif body.mode == "energy":
        rate_mode, limit = 2, round((body.energy_kwh or 0) * 100)
    return {
        "port": port - 1,
        "rate_mode": rate_mode,
        "charge_limit": limit,
        "balance_cent": body.balance_cent or 0,
        "order_id": order_no,
    }


@router.post(
    "/devices/{device_id}/ports/{port}/start",
    status_code=202,
    summary="Start charging on a port",
    responses=error_responses(
        (404, "No such device"),
        (409, "The port has an open order, or the order number exists"),
    ),
)
async def start(
    request: Request,
    pool: Pool,
    services: Services,
    device_id: str,
    port: PortNumber,
    body: StartRequest,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> Accepted:
    """Open an order and queue its start. With an ``Idempotency-Key`` (scoped to the
    API key that sends it), a repeat of the same request returns the first result and
    starts nothing; the same key with another device, port or body is a 422 naming what
    differs (``conflict``)."""
    order_no = (body.order_no or new_order_no()).upper()
    fingerprint = {
        "device_id": device_id,
        "port": port,
        "body": hashlib.sha256(
            json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()
        ).hexdigest(),
    }
    idem = None
    if idempotency_key:
        idem = Idempotency(_key_scope(request), idempotency_key, fingerprint)
    service = _service(services)
    try:
        async with pool.acquire() as conn:
            target = await charging.command_target(conn, device_id)
            target.check_port(port)
            if body.mode == "time" and body.duration_min is None:
                raise api_error(422, "mode=time needs duration_min", field="duration_min")
            if body.mode == "energy" and body.energy_kwh is None:
                raise api_error(422, "mode=energy needs energy_kwh", field="energy_kwh")
            order = NewOrder(
                port=port,
                order_no=order_no,
                mode=body.mode,
                duration_min=body.duration_min,
                energy_kwh=body.energy_kwh,
                balance_cent=body.balance_cent,
                start_params=start_command_params(target.protocol, port, body, order_no),
            )
            async with conn.transaction():
                queued = await service.start(conn, target, order, idem)
    except RequestError as exc:
        raise refused(exc) from None
    services.outbox.wake(device_id)
    return _accepted(queued)


@router.post(
    "/devices/{device_id}/ports/{port}/stop",
    status_code=202,
    summary="Stop charging on a port",
    responses=error_responses((404, "No such device"), (409, "No order is open on the port")),
)
async def stop(pool: Pool, services: Services, device_id: str, port: PortNumber) -> Accepted:
    """Stop the port's open order. A start not sent yet is cancelled instead (status
    ``cancelled``); a stop for a start in flight goes after the start's answer; a stop
    already queued for the order is returned again. A port the device does not have is
    a 422, as for a start."""

    def stop_params(order_no: str) -> dict[str, Any]:
        params: dict[str, Any] = {"port": port - 1}
        if target.protocol == "ap3000":  # the pile needs the running order id
            params["order_id"] = order_no
        return params

    service = _service(services)
    try:
        async with pool.acquire() as conn:
            target = await charging.command_target(conn, device_id)
            async with conn.transaction():
                queued = await service.stop(conn, target, port, stop_params)
    except RequestError as exc:
        raise refused(exc) from None
    services.outbox.wake(device_id)
    return _accepted(queued)


@router.post(
    "/devices/{device_id}/ports/{port}/modify",
    status_code=202,
    summary="Change the limit of a running session",
    responses=error_responses((404, "No such device")),
)
async def modify(
    pool: Pool, services: Services, device_id: str, port: PortNumber, body: ModifyRequest
) -> Accepted:
    """AP3000 0x8A: if the new limit is below what was already delivered, the pile
    stops at once and settles. BKV has no such command (422)."""
    service = _service(services)
    try:
        async with pool.acquire() as conn:
            target = await charging.command_target(conn, device_id)
            if target.protocol == "bkv":
                raise InvalidError(
                    "changing the limit of a running session is not supported by BKV: the "
                    "protocol has no such command (stop the session and start a new one)"
                )
            if (body.duration_min is None) == (body.energy_kwh is None):
                raise InvalidError("give exactly one of duration_min and energy_kwh")
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
            async with conn.transaction():
                command_id = await service.send(conn, target, "modify", params)
    except RequestError as exc:
        raise refused(exc) from None
    services.outbox.wake(device_id)
    return Accepted(command_id=command_id, status="pending")


@router.post(
    "/devices/{device_id}/commands",
    status_code=202,
    summary="Send any other command the device's driver supports",
    responses=error_responses((404, "No such device")),
)
async def command(pool: Pool, services: Services, device_id: str, body: CommandRequest) -> Accepted:
    """Parameters are checked against the wire field's range: a value that does not fit
    is a 422 naming the field, and nothing is sent. An unknown name is a 422 that lists
    the known ones (``commands``)."""
    service = _service(services)
    try:
        async with pool.acquire() as conn:
            target = await charging.command_target(conn, device_id)
            if body.command in ("start", "stop", "modify"):
                raise InvalidError(f"use the {body.command} endpoint")
            known = bkv_commands.GENERIC if target.protocol == "bkv" else ap3000_commands.GENERIC
            if body.command != "query" and body.command not in known:
                raise InvalidError(
                    {
                        "error": f"unknown {target.protocol} command {body.command!r}",
                        "field": "command",
                        "commands": ["query", *sorted(known)],
                    }
                )
            async with conn.transaction():
                command_id = await service.send(conn, target, body.command, body.params)
    except RequestError as exc:
        raise refused(exc) from None
    services.outbox.wake(device_id)
    return Accepted(command_id=command_id, status="pending")


@router.get(
    "/commands/{command_id}",
    summary="A command's delivery state",
    responses=error_responses((404, "No such command")),
)
async def get_command(pool: Pool, command_id: int) -> CommandRecord:
    """``status``: pending, sent, acked (the device said yes), failed (it refused:
    ``result_code`` and ``result_text``) or dead (``dead_reason``)."""
    async with pool.acquire() as conn:
        found = await charging.get_command(conn, command_id)
    if found is None:
        raise HTTPException(404, f"command {command_id} not found")
    return found


@router.get(
    "/orders/{order_no}",
    summary="An order (charging session)",
    responses=error_responses((404, "No such order")),
)
async def get_order(pool: Pool, order_no: str) -> OrderRecord:
    """The order by its number (hex, any case)."""
    async with pool.acquire() as conn:
        found = await charging.get_order(conn, order_no.upper())
    if found is None:
        raise HTTPException(404, f"order {order_no} not found")
    return found


@router.get("/orders/{order_no}/samples", summary="Progress samples of an order")
async def samples(pool: Pool, order_no: str) -> SampleList:
    """Oldest first; none for an order without samples (or an unknown one)."""
    async with pool.acquire() as conn:
        items = await charging.order_samples(conn, order_no.upper())
    return SampleList(items=items)


@router.get("/orders", summary="Orders, newest first")
async def list_orders(
    pool: Pool,
    device_id: Annotated[str | None, Query(max_length=64)] = None,
    status: OrderStatus | None = None,
    since: Annotated[dt.datetime | None, Query(description="created at or after this time")] = None,
    until: Annotated[dt.datetime | None, Query(description="created before this time")] = None,
    review: Annotated[
        bool | None,
        Query(description="only orders marked for review (unpriced, foreign order id)"),
    ] = None,
    stop_reason: Annotated[
        StopReason | None,
        Query(description="only sessions that ended for this (protocol-neutral) reason"),
    ] = None,
    start_mode: Annotated[
        StartMode | None,
        Query(description="only sessions started this way (online: the API)"),
    ] = None,
    device_initiated: Annotated[
        bool | None,
        Query(description="true: only sessions the device started on its own; false: none of them"),
    ] = None,
    cursor: Cursor = None,
    limit: Limit = DEFAULT_LIMIT,
) -> OrderPage:
    """Orders by creation time, newest first, with cursor pagination like the other
    lists. The filters combine (all must hold); an unknown ``status``, ``stop_reason`` or
    ``start_mode`` is a 422."""
    before = None if cursor is None else timestamp_key(cursor, "orders", str)
    filters = OrderFilter(
        device_id=device_id,
        status=status,
        since=utc(since),
        until=utc(until),
        review=review,
        stop_reason=stop_reason,
        start_mode=start_mode,
        device_initiated=device_initiated,
    )
    async with pool.acquire() as conn:
        page = await orders.list_orders(conn, filters, before=before, limit=limit)
    items = [OrderRecord(**dict(row)) for row in page.items]
    next_cursor = None
    if page.more:
        last = items[-1]
        next_cursor = encode_cursor("orders", [last.created_at.isoformat(), last.order_no])
    return OrderPage(items=items, next_cursor=next_cursor)


@router.post(
    "/orders/{order_no}/cancel",
    summary="Cancel an order whose start has not been sent yet",
    responses=error_responses(
        (404, "No such order"), (409, "The start was sent: stop the session instead")
    ),
)
async def cancel(pool: Pool, services: Services, order_no: str) -> Accepted:
    """The order becomes ``cancelled``, its start command ``dead`` (reason
    ``cancelled``); nothing reaches the device."""
    service = _service(services)
    try:
        async with pool.acquire() as conn, conn.transaction():
            queued = await service.cancel(conn, order_no.upper())
    except RequestError as exc:
        raise refused(exc) from None
    return _accepted(queued)
