"""Searching the audit log: ``GET /api/v1/frames`` (read scope).

The frames of any devices, filtered and paged like a device's own frames
(``GET /api/v1/devices/{device_id}/frames``, which goes through the same
:func:`frames_window`, :func:`frames_after` and :func:`frame_page`); the query itself is
:mod:`chargegw.domain.frames`'s. A key limited to devices must name them
(``device_id``, ``gateway_id`` or ``order_no``; :mod:`chargegw.api.scopes`) and sees only
their frames.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel

from chargegw.api.deps import Pool
from chargegw.api.errors import error_responses
from chargegw.api.pagination import (
    DEFAULT_LIMIT,
    Cursor,
    Limit,
    check_window,
    encode_cursor,
    invalid,
    timestamp_key,
    utc,
)
from chargegw.domain import frames
from chargegw.domain.frames import Frame, FrameQuery
from chargegw.store.database import Connection

__all__ = [
    "DEFAULT_FRAMES_WINDOW",
    "MAX_FRAMES_WINDOW",
    "Direction",
    "FramePage",
    "frame_page",
    "frames_after",
    "frames_window",
    "router",
]

#: waiting for a pooled connection longer than this means the database is unavailable
ACQUIRE_TIMEOUT_S = 5.0
#: frames are kept in daily partitions; a window is at most this long
MAX_FRAMES_WINDOW = dt.timedelta(days=31)
DEFAULT_FRAMES_WINDOW = dt.timedelta(hours=24)
#: at most this many ``device_id`` or ``command`` values in one search
MAX_VALUES = 100
#: ids are short; a longer one is a mistake, not a device
MAX_ID_LENGTH = 64
#: the audit log's command labels: a device's frame by its code, ``0x21`` (AP3000),
#: ``0x1000/0x1017`` or ``0x0015/0x07`` (BKV); ``iccid``; a command the server sent by
#: its kind (``start``, ``stop``, ``set_params`` ...)
_COMMAND = re.compile(r"0x[0-9a-f]{2,4}(/0x[0-9a-f]{2,4})?|[a-z][a-z0-9_]{0,39}")
_KIND = "frames"


class Direction(str, enum.Enum):
    """A frame received from a device (``in``) or sent to it (``out``)."""

    IN = "in"
    OUT = "out"


class FramePage(BaseModel):
    """A page of audit frames, oldest first."""

    items: list[Frame]
    next_cursor: str | None


def frames_window(
    since: dt.datetime | None, until: dt.datetime | None
) -> tuple[dt.datetime, dt.datetime]:
    """The window ``[since, until)`` of a frames query: ``until`` defaults to now,
    ``since`` to :data:`DEFAULT_FRAMES_WINDOW` before it; 422 when inverted or longer
    than :data:`MAX_FRAMES_WINDOW`."""
    until = utc(until) or dt.datetime.now(dt.UTC)
    since = utc(since) or until - DEFAULT_FRAMES_WINDOW
    check_window(since, until)
    if until - since > MAX_FRAMES_WINDOW:
        raise invalid(
            "since", f"the window is longer than {MAX_FRAMES_WINDOW.days} days", since.isoformat()
        )
    return since, until


def frames_after(cursor: str | None) -> tuple[dt.datetime, int] | None:
    """The key a frames cursor continues after; 422 if it is not a cursor of a frames
    list (checked before the database is asked)."""
    return None if cursor is None else timestamp_key(cursor, _KIND)


async def frame_page(
    conn: Connection, query: FrameQuery, *, after: tuple[dt.datetime, int] | None, limit: int
) -> FramePage:
    """One page of the frames ``query`` selects, after the key ``after``
    (:func:`frames_after`)."""
    page = await frames.search_frames(conn, query, after=after, limit=limit)
    next_cursor = None
    if page.more:
        last = page.items[-1]
        next_cursor = encode_cursor(_KIND, [last.received_at.isoformat(), last.id])
    return FramePage(items=page.items, next_cursor=next_cursor)


def _checked_ids(name: str, values: list[str]) -> list[str]:
    if len(values) > MAX_VALUES:
        raise invalid(name, f"at most {MAX_VALUES} values", len(values))
    for value in values:
        if not value or len(value) > MAX_ID_LENGTH:
            raise invalid(name, f"an id is 1 to {MAX_ID_LENGTH} characters", value)
    return sorted(set(values))


def _checked_commands(values: list[str]) -> list[str]:
    if len(values) > MAX_VALUES:
        raise invalid("command", f"at most {MAX_VALUES} values", len(values))
    out = set()
    for value in values:
        label = value.strip().lower()
        if not _COMMAND.fullmatch(label):
            raise invalid(
                "command",
                "a command as the audit log labels it: 0x21 (AP3000), 0x1000/0x1017 or "
                "0x0015/0x07 (BKV), iccid, or a server command's kind (start, stop ...)",
                value,
            )
        out.add(label)
    return sorted(out)


router = APIRouter(prefix="/api/v1")


@router.get(
    "/frames",
    tags=["audit log"],
    summary="Search the audit log of frames across devices",
    responses=error_responses((422, "A filter is malformed or names nothing known")),
)
async def search_frames(
    pool: Pool,
    *,
    device_id: Annotated[
        list[str] | None,
        Query(description="frames of this device (repeatable: of any of them)"),
    ] = None,
    gateway_id: Annotated[
        str | None,
        Query(
            max_length=MAX_ID_LENGTH,
            description="frames of the devices behind this gateway and the gateway's own "
            "(added to `device_id`'s)",
        ),
    ] = None,
    connection_id: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=200,
            description="frames of this TCP connection, including those that name no "
            "device (an ICCID, bytes that did not decode)",
        ),
    ] = None,
    direction: Direction | None = None,
    command: Annotated[
        list[str] | None,
        Query(
            description="the command as the audit log labels it: `0x21`, `0x1000/0x1017`, "
            "`iccid`, a server command's kind (`start`); repeatable"
        ),
    ] = None,
    since: Annotated[
        dt.datetime | None,
        Query(description="from this time (inclusive); default: 24 h before `until`"),
    ] = None,
    until: Annotated[
        dt.datetime | None, Query(description="before this time; default: now")
    ] = None,
    order_no: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=MAX_ID_LENGTH,
            description="frames around this order: its device's, from 60 s before the "
            "order was created to 60 s after its last change (its end, settlement or "
            "pricing; while it is open, 60 s after now). Sets the window: not with "
            "`since`/`until`",
        ),
    ] = None,
    errors_only: Annotated[
        bool, Query(description="only the frames that could not be decoded")
    ] = False,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> FramePage:
    """Frames ordered by (received_at, id), oldest first, each with its decoded record.

    The filters combine (AND); `device_id` and `gateway_id` together select the frames of
    any of the devices they name. The window is at most 31 days (the last 24 h by
    default) unless `order_no` sets it. A device, gateway or order that does not exist is
    a 422 on its parameter."""
    devices = _checked_ids("device_id", device_id or [])
    commands = _checked_commands(command or [])
    if order_no is not None and (since is not None or until is not None):
        field, value = ("since", since) if since is not None else ("until", until)
        raise invalid(
            field, "order_no sets the window: give either order_no or a window", str(value)
        )
    window = frames_window(since, until) if order_no is None else None
    after = frames_after(cursor)
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        wanted: list[str] | None = None
        if devices:
            missing = sorted(set(devices) - await frames.known_ids(conn, devices))
            if missing:
                raise invalid("device_id", f"no such device: {', '.join(missing)}", missing[0])
            wanted = list(devices)
        if gateway_id is not None:
            behind = await frames.gateway_devices(conn, gateway_id)
            if behind is None:
                raise invalid("gateway_id", f"no such gateway: {gateway_id}", gateway_id)
            wanted = sorted({*(wanted or []), *behind})
        if order_no is not None:
            scope = await frames.order_scope(conn, order_no.upper())
            if scope is None:
                raise invalid("order_no", f"no such order: {order_no}", order_no)
            window = scope.since, scope.until
            wanted = [d for d in (wanted or [scope.device_id]) if d == scope.device_id]
        assert window is not None
        query = FrameQuery(
            since=window[0],
            until=window[1],
            device_ids=wanted,
            connection_id=connection_id,
            direction=None if direction is None else direction.value,
            commands=commands,
            errors_only=errors_only,
        )
        return await frame_page(conn, query, after=after, limit=limit)
