"""The read endpoints of gateways and devices: lists, one device with its ports, a
device's event log and its audit frames (the read model is :mod:`chargegw.domain.devices`).

Lists are keyset pages, ``{"items": [...], "next_cursor": ...}`` (:mod:`.pagination`).
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query
from pydantic import BaseModel

from chargegw.api.deps import Pool, Quirks
from chargegw.api.errors import error_responses
from chargegw.api.frames import Direction, FramePage, frame_page, frames_after, frames_window
from chargegw.api.pagination import (
    DEFAULT_LIMIT,
    Cursor,
    Limit,
    check_window,
    decode_cursor,
    encode_cursor,
    timestamp_key,
    utc,
)
from chargegw.core import EventKind
from chargegw.domain import devices
from chargegw.domain.devices import Device, DeviceDetail, DeviceEvent, Gateway
from chargegw.domain.frames import FrameQuery
from chargegw.store.database import Connection

__all__ = ["router"]

#: waiting for a pooled connection longer than this means the database is unavailable
ACQUIRE_TIMEOUT_S = 5.0


class Protocol(str, enum.Enum):
    """The device protocols chargegw speaks."""

    AP3000 = "ap3000"
    BKV = "bkv"


class GatewayPage(BaseModel):
    """A page of gateways."""

    items: list[Gateway]
    next_cursor: str | None


class DevicePage(BaseModel):
    """A page of devices."""

    items: list[Device]
    next_cursor: str | None


class EventPage(BaseModel):
    """A page of a device's event log."""

    items: list[DeviceEvent]
    next_cursor: str | None


_NOT_FOUND = error_responses((404, "No such device"))
_NO_GATEWAY = error_responses((404, "No such gateway"))

router = APIRouter(prefix="/api/v1")


async def _require_device(conn: Connection, device_id: str) -> None:
    if not await devices.device_exists(conn, device_id):
        raise HTTPException(404, f"device {device_id} not found")


def _value(member: enum.Enum | None) -> str | None:
    return None if member is None else str(member.value)


@router.get("/gateways", tags=["gateways"], summary="List gateways")
async def list_gateways(
    pool: Pool,
    *,
    protocol: Protocol | None = None,
    online: bool | None = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> GatewayPage:
    """Gateways ordered by id; ICCIDs are masked."""
    after = None if cursor is None else decode_cursor(cursor, "gateways", (str,))[0]
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        page = await devices.list_gateways(
            conn, protocol=_value(protocol), online=online, after=after, limit=limit
        )
    items = page.items
    next_cursor = encode_cursor("gateways", [items[-1].gateway_id]) if page.more else None
    return GatewayPage(items=items, next_cursor=next_cursor)


@router.get(
    "/gateways/{gateway_id}",
    tags=["gateways"],
    summary="One gateway",
    responses=_NO_GATEWAY,
)
async def get_gateway(pool: Pool, gateway_id: Annotated[str, Path(max_length=64)]) -> Gateway:
    """A gateway's connection, SIM (ICCID masked), firmware text and device count."""
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        gateway = await devices.get_gateway(conn, gateway_id)
    if gateway is None:
        raise HTTPException(404, f"gateway {gateway_id} not found")
    return gateway


@router.get("/devices", tags=["devices"], summary="List devices")
async def list_devices(
    pool: Pool,
    *,
    protocol: Protocol | None = None,
    online: bool | None = None,
    gateway_id: Annotated[str | None, Query(max_length=64)] = None,
    q: Annotated[
        str | None,
        Query(
            max_length=200,
            description="search: a device or gateway id (or its start), the number under "
            "an AP3000 pile's QR code, the URL of its QR code, or the last digits (4 or "
            "more) of an ICCID",
            examples=["13544000"],
        ),
    ] = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> DevicePage:
    """Devices ordered by device id, optionally filtered and searched."""
    after = None if cursor is None else decode_cursor(cursor, "devices", (str,))[0]
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        page = await devices.list_devices(
            conn,
            protocol=_value(protocol),
            online=online,
            gateway_id=gateway_id,
            after=after,
            limit=limit,
            q=q,
        )
    items = page.items
    next_cursor = encode_cursor("devices", [items[-1].device_id]) if page.more else None
    return DevicePage(items=items, next_cursor=next_cursor)


@router.get(
    "/devices/{device_id}",
    tags=["devices"],
    summary="One device with its ports",
    responses=_NOT_FOUND,
)
async def get_device(pool: Pool, quirks: Quirks, device_id: str) -> DeviceDetail:
    """The device's last known state, the last reported state of each port, and its
    active quirk profiles."""
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        device = await devices.get_device(conn, device_id)
    if device is None:
        raise HTTPException(404, f"device {device_id} not found")
    active = quirks.known(device_id)
    if active is None:
        active = quirks.stored(device.protocol, device.device_type, device.firmware)
    return device.model_copy(update={"quirks": list(active.names)})


@router.get(
    "/devices/{device_id}/events",
    tags=["devices"],
    summary="A device's event log",
    responses=_NOT_FOUND,
)
async def list_events(
    pool: Pool,
    device_id: str,
    *,
    since: Annotated[dt.datetime | None, Query(description="from this time (inclusive)")] = None,
    until: Annotated[dt.datetime | None, Query(description="before this time")] = None,
    kind: EventKind | None = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> EventPage:
    """Events ordered by (at, id), oldest first; the whole log unless a window is given."""
    since, until = utc(since), utc(until)
    check_window(since, until)
    after = None if cursor is None else timestamp_key(cursor, "events")
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        await _require_device(conn, device_id)
        page = await devices.list_events(
            conn,
            device_id,
            since=since,
            until=until,
            kind=_value(kind),
            after=after,
            limit=limit,
        )
    items = page.items
    next_cursor = None
    if page.more:
        next_cursor = encode_cursor("events", [items[-1].at.isoformat(), items[-1].id])
    return EventPage(items=items, next_cursor=next_cursor)


@router.get(
    "/devices/{device_id}/frames",
    tags=["devices"],
    summary="A device's frames from the audit log",
    responses=_NOT_FOUND,
)
async def list_frames(
    pool: Pool,
    device_id: str,
    *,
    since: Annotated[
        dt.datetime | None,
        Query(description="from this time (inclusive); default: 24 h before `until`"),
    ] = None,
    until: Annotated[
        dt.datetime | None, Query(description="before this time; default: now")
    ] = None,
    direction: Direction | None = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> FramePage:
    """Frames ordered by (received_at, id), oldest first, each with its decoded record,
    within a window of at most 31 days (the last 24 h by default); ``GET /api/v1/frames``
    searches across devices."""
    since, until = frames_window(since, until)
    query = FrameQuery(since, until, device_ids=[device_id], direction=_value(direction))
    after = frames_after(cursor)
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        await _require_device(conn, device_id)
        return await frame_page(conn, query, after=after, limit=limit)
