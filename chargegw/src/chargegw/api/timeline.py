"""Timelines: ``GET /api/v1/orders/{order_no}/timeline`` and
``GET /api/v1/devices/{device_id}/timeline`` (read scope; a key limited to devices sees
only its devices' orders and devices, by the path as every other read).

The read model, what a timeline holds and its bounds are :mod:`chargegw.domain.timeline`'s.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from chargegw.api.deps import Pool
from chargegw.api.errors import error_responses
from chargegw.api.frames import DEFAULT_FRAMES_WINDOW, MAX_FRAMES_WINDOW
from chargegw.api.pagination import check_window, invalid, utc
from chargegw.domain import timeline
from chargegw.domain.timeline import Timeline

__all__ = ["router"]

#: waiting for a pooled connection longer than this means the database is unavailable
ACQUIRE_TIMEOUT_S = 5.0

TimelineLimit = Annotated[
    int,
    Query(
        ge=1,
        le=timeline.MAX_LIMIT,
        description="at most this many items (the earliest); `truncated` says when cut",
    ),
]

router = APIRouter(prefix="/api/v1")


@router.get(
    "/orders/{order_no}/timeline",
    tags=["orders"],
    summary="An order's timeline: frames, transitions with their causes, commands, settlement",
    responses=error_responses((404, "No such order")),
)
async def order_timeline(
    pool: Pool, order_no: str, *, limit: TimelineLimit = timeline.DEFAULT_LIMIT
) -> Timeline:
    """Everything that happened to the order, oldest first: the audit frames of its
    device (decoded, with hex), each transition of the order, its port, its commands
    and its device's online state with the cause that made it (a frame of this
    timeline, an API call, a timer, a fault), the commands created and sent, its
    progress samples (summarised) and its settlement. It covers the order's device from
    60 s before the order was created to 60 s after its last change."""
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        found = await timeline.order_timeline(conn, order_no.upper(), limit=limit)
    if found is None:
        raise HTTPException(404, f"order {order_no} not found")
    return found


@router.get(
    "/devices/{device_id}/timeline",
    tags=["devices"],
    summary="A device's timeline in a window",
    responses=error_responses((404, "No such device")),
)
async def device_timeline(
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
    limit: TimelineLimit = timeline.DEFAULT_LIMIT,
) -> Timeline:
    """The device's frames, transitions (with their causes), other events, commands and
    settlements in ``[since, until)``, oldest first; the window is at most 31 days (the
    last 24 h by default), like the device's frames."""
    until = utc(until) or dt.datetime.now(dt.UTC)
    since = utc(since) or until - DEFAULT_FRAMES_WINDOW
    check_window(since, until)
    if until - since > MAX_FRAMES_WINDOW:
        raise invalid(
            "since", f"the window is longer than {MAX_FRAMES_WINDOW.days} days", since.isoformat()
        )
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        found = await timeline.device_timeline(
            conn, device_id, since=since, until=until, limit=limit
        )
    if found is None:
        raise HTTPException(404, f"device {device_id} not found")
    return found
