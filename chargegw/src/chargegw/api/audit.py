"""The audit trail of API calls: ``GET /api/v1/audit/calls`` (admin scope).

What is recorded, and when, is :mod:`chargegw.api.guard`'s; the rows and their masking
are :mod:`chargegw.domain.call_audit`'s. Newest first, keyset pages by id.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel

from chargegw.api.deps import Pool
from chargegw.api.pagination import (
    DEFAULT_LIMIT,
    Cursor,
    Limit,
    check_window,
    decode_cursor,
    encode_cursor,
    utc,
)
from chargegw.domain import call_audit
from chargegw.domain.call_audit import AuditedCall

__all__ = ["router"]

#: waiting for a pooled connection longer than this means the database is unavailable
ACQUIRE_TIMEOUT_S = 5.0

Method = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class CallPage(BaseModel):
    """A page of audited calls, newest first."""

    items: list[AuditedCall]
    next_cursor: str | None


router = APIRouter(prefix="/api/v1", tags=["audit"])


@router.get("/audit/calls", summary="The audit trail of API calls, newest first")
async def list_calls(
    pool: Pool,
    *,
    key_id: Annotated[
        str | None, Query(max_length=200, description="the calls of one API key (its id)")
    ] = None,
    method: Annotated[Method | None, Query(description="the HTTP method")] = None,
    path: Annotated[
        str | None,
        Query(
            max_length=500,
            description="paths starting with this (`/api/v1/devices/04CEAA40/`)",
        ),
    ] = None,
    status: Annotated[int | None, Query(ge=100, le=599, description="the answer's status")] = None,
    since: Annotated[dt.datetime | None, Query(description="from this time (inclusive)")] = None,
    until: Annotated[dt.datetime | None, Query(description="before this time")] = None,
    device_id: Annotated[
        str | None, Query(max_length=64, description="calls on this device (in the path)")
    ] = None,
    order_no: Annotated[
        str | None,
        Query(max_length=64, description="calls that named or created this order"),
    ] = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> CallPage:
    """Every call that is not GET/HEAD/OPTIONS made with a valid key, and every refused
    authentication: who (``key_id``, ``source``), what (``method``, ``path``, ``query``,
    ``body`` with secrets masked), when (``at``), the answer (``status``) and what it
    created (``order_nos``, ``command_ids``, ``job_ids``). Kept for
    ``call_audit_retention_days``."""
    since, until = utc(since), utc(until)
    check_window(since, until)
    before = None if cursor is None else decode_cursor(cursor, "audit-calls", (int,))[0]
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        page = await call_audit.list_calls(
            conn,
            key_id=key_id,
            method=method,
            path_prefix=path,
            status=status,
            since=since,
            until=until,
            device_id=device_id,
            order_no=order_no.upper() if order_no else None,
            before=before,
            limit=limit,
        )
    items = page.items
    next_cursor = encode_cursor("audit-calls", [items[-1].id]) if page.more else None
    return CallPage(items=items, next_cursor=next_cursor)
