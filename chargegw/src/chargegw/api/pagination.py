"""Cursors and query parameters shared by the list endpoints.

A cursor is the URL-safe base64 (unpadded) of ``{"k": <list>, "v": [<key of the last
item>]}``: opaque to clients, checked on the way back (a cursor of another list, or not
one of ours, is a 422 in FastAPI's validation format on the ``cursor`` parameter).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import Query
from fastapi.exceptions import RequestValidationError

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000

Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description=f"page size, at most {MAX_LIMIT}")]
Cursor = Annotated[
    str | None,
    Query(max_length=512, description="`next_cursor` of the previous page"),
]


def invalid(field: str, message: str, value: Any) -> RequestValidationError:
    """A 422 on the query parameter ``field``, in FastAPI's own validation format."""
    return RequestValidationError(
        [{"type": "value_error", "loc": ("query", field), "msg": message, "input": value}]
    )


def encode_cursor(kind: str, key: Sequence[Any]) -> str:
    """The cursor of the list ``kind`` that continues after ``key``."""
    raw = json.dumps({"k": kind, "v": list(key)}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, kind: str, types: Sequence[type]) -> list[Any]:
    """The key in ``cursor``; 422 unless it is a cursor of this endpoint."""
    try:
        raw = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
        data = json.loads(raw)
    except (binascii.Error, ValueError):
        raise invalid("cursor", "malformed cursor", cursor) from None
    if not isinstance(data, dict) or data.get("k") != kind:
        raise invalid("cursor", f"not a cursor of this list ({kind})", cursor)
    key = data.get("v")
    if (
        not isinstance(key, list)
        or len(key) != len(types)
        or not all(type(v) is t for v, t in zip(key, types, strict=False))
    ):
        raise invalid("cursor", "malformed cursor", cursor)
    return key


def timestamp_key(cursor: str, kind: str, second: type = int) -> tuple[dt.datetime, Any]:
    """The (time with a zone, ``second``) key of a cursor of a list ordered by time."""
    at, tie = decode_cursor(cursor, kind, (str, second))
    try:
        when = dt.datetime.fromisoformat(at)
    except ValueError:
        raise invalid("cursor", "malformed cursor", cursor) from None
    if when.tzinfo is None:
        raise invalid("cursor", "malformed cursor", cursor)
    return when, tie


def utc(value: dt.datetime | None) -> dt.datetime | None:
    """Timestamps without a zone are UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value


def check_window(since: dt.datetime | None, until: dt.datetime | None) -> None:
    """422 on ``since`` when it is after ``until``."""
    if since is not None and until is not None and since > until:
        raise invalid("since", "since is after until", since.isoformat())
