"""Searching the audit log (``frames``) and reading the recorded state next to it.

One query serves ``GET /api/v1/frames``, ``GET /api/v1/devices/{id}/frames`` and
``chargegw frames export``: :class:`FrameQuery` holds the filters (all of them AND-ed;
``device_ids`` is the set of devices whose frames are wanted, already widened by the
caller from a gateway or an order), :func:`search_frames` returns a keyset page ordered
by ``(received_at, id)``, oldest first. Every query is bounded by a time window, because
the table is partitioned by day and large; the indexes each filter uses are listed in
migration 0021.

Frames are returned with ``decoded``: the chargeproto record of the frame as ``chargeproto
decode`` prints it (:func:`chargegw.domain.timeline.decode_frame`, which also reads
masked frames, showing their sensitive fields as ``*``), or null when the frame cannot be
decoded (an ICCID, garbage, a frame the decoder refuses).

:func:`recorded_state` is the state record of a capture: the orders, settlements and
ports of some devices as stored.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import Any

import asyncpg
from pydantic import BaseModel, Field

from chargegw.domain.devices import PORT_REPORTED_AT
from chargegw.domain.pages import Page, Where, page_of
from chargegw.domain.timeline import ORDER_MARGIN, decode_frame
from chargegw.store.database import Connection

__all__ = [
    "FINAL_ORDER_STATUSES",
    "ORDER_MARGIN",
    "Frame",
    "FrameQuery",
    "OrderScope",
    "connection_orphans",
    "gateway_devices",
    "known_ids",
    "order_scope",
    "recorded_state",
    "search_frames",
]

#: longest a read query may run
QUERY_TIMEOUT_S = 10.0
#: an order in one of these will not change any more (its window is closed)
FINAL_ORDER_STATUSES = frozenset({"settled", "failed", "cancelled"})

_COLUMNS = "id, received_at, connection_id, device_id, direction, protocol, command, hex, error"


class Frame(BaseModel):
    """One frame of the audit log, received from or sent to a device."""

    id: int
    received_at: dt.datetime = Field(description="server time the frame was read or written")
    connection_id: str
    device_id: str | None = Field(
        description="the device the frame is from or for (a BKV gateway's own frames: the "
        "gateway id); null when it names none (an ICCID, bytes that did not decode)",
        examples=["04CEAA40"],
    )
    direction: str = Field(examples=["in"])
    protocol: str | None
    command: str | None = Field(examples=["0x21"])
    hex: str = Field(description="the frame's bytes; ICCIDs and card numbers masked (`**`)")
    error: str | None = Field(description="why the frame could not be decoded, if so")
    decoded: dict[str, Any] | None = Field(
        default=None,
        description="the chargeproto record of the frame (as `chargeproto decode` prints "
        "it; masked fields are `*`); null when it cannot be decoded",
    )


@dataclasses.dataclass(frozen=True)
class FrameQuery:
    """The filters of an audit-log search; ``None`` or empty means "any"."""

    since: dt.datetime
    until: dt.datetime
    device_ids: Sequence[str] | None = None
    connection_id: str | None = None
    direction: str | None = None
    commands: Sequence[str] = ()
    errors_only: bool = False

    def where(self, after: tuple[dt.datetime, int] | None = None) -> Where:
        """The conditions, frames in ``[since, until)`` after the key ``after``."""
        where = Where()
        if self.device_ids is not None:
            if len(self.device_ids) == 1:
                where.add("device_id = {}", self.device_ids[0])
            else:
                where.add("device_id = ANY({}::text[])", list(self.device_ids))
        if self.connection_id is not None:
            where.add("connection_id = {}", self.connection_id)
        where.add("received_at >= {}", self.since)
        where.add("received_at < {}", self.until)
        if self.direction is not None:
            where.add("direction = {}", self.direction)
        if self.commands:
            where.add("command = ANY({}::text[])", list(self.commands))
        if self.errors_only:
            where.conditions.append("error IS NOT NULL")
        if after is not None:
            where.add("(received_at, id) > ({}, {})", *after)
        return where


def _frame(row: asyncpg.Record, decode: bool) -> Frame:
    decoded = None
    if decode:
        decoded, _ = decode_frame(row["hex"], row["direction"], row["protocol"])
    return Frame(**dict(row), decoded=decoded)


async def search_frames(
    conn: Connection,
    query: FrameQuery,
    *,
    after: tuple[dt.datetime, int] | None = None,
    limit: int,
    decode: bool = True,
) -> Page[Frame]:
    """The frames ``query`` selects, ordered by (received_at, id), after the key ``after``;
    ``decode``: fill in :attr:`Frame.decoded`."""
    if query.device_ids is not None and not query.device_ids:
        return Page([], False)
    where = query.where(after)
    sql = f"""SELECT {_COLUMNS} FROM frames {where.sql()}
               ORDER BY received_at, id {where.limit(limit)}"""
    rows = await conn.fetch(sql, *where.args, timeout=QUERY_TIMEOUT_S)
    return page_of([_frame(r, decode) for r in rows], limit)


async def connection_orphans(
    conn: Connection,
    connection_ids: Sequence[str],
    since: dt.datetime,
    until: dt.datetime,
) -> list[Frame]:
    """The frames of these connections in ``[since, until)`` that name no device (an
    ICCID, bytes that did not decode), oldest first, undecoded."""
    if not connection_ids:
        return []
    rows = await conn.fetch(
        f"""SELECT {_COLUMNS} FROM frames
             WHERE connection_id = ANY($1::text[]) AND device_id IS NULL
               AND received_at >= $2 AND received_at < $3
             ORDER BY received_at, id""",
        list(connection_ids),
        since,
        until,
        timeout=QUERY_TIMEOUT_S,
    )
    return [_frame(r, False) for r in rows]


async def known_ids(conn: Connection, ids: Sequence[str]) -> set[str]:
    """Those of ``ids`` that are a device or a gateway."""
    rows = await conn.fetch(
        """SELECT device_id AS id FROM devices WHERE device_id = ANY($1::text[])
           UNION SELECT gateway_id FROM gateways WHERE gateway_id = ANY($1::text[])""",
        list(ids),
        timeout=QUERY_TIMEOUT_S,
    )
    return {r["id"] for r in rows}


async def gateway_devices(conn: Connection, gateway_id: str) -> list[str] | None:
    """The gateway itself (its own frames carry its id) and the devices behind it; None
    when neither a gateway nor a device has that id."""
    rows = await conn.fetch(
        """SELECT device_id FROM devices WHERE gateway_id = $1
           UNION SELECT gateway_id FROM gateways WHERE gateway_id = $1""",
        gateway_id,
        timeout=QUERY_TIMEOUT_S,
    )
    if not rows:
        return None
    return sorted({gateway_id, *(r["device_id"] for r in rows)})


@dataclasses.dataclass(frozen=True)
class OrderScope:
    """Where an order's frames are: its device, from :data:`ORDER_MARGIN` before it was
    created to :data:`ORDER_MARGIN` after its last change (now, while it is open)."""

    device_id: str
    since: dt.datetime
    until: dt.datetime


async def order_scope(
    conn: Connection, order_no: str, *, now: dt.datetime | None = None
) -> OrderScope | None:
    """The frames window of the order ``order_no``; None if there is no such order."""
    row = await conn.fetchrow(
        """SELECT o.device_id, o.status, o.created_at,
                  greatest(o.updated_at, o.ended_at, o.device_ended_at, c.computed_at)
                      AS last_change
             FROM orders o LEFT JOIN order_charges c USING (order_no)
            WHERE o.order_no = $1""",
        order_no,
        timeout=QUERY_TIMEOUT_S,
    )
    if row is None:
        return None
    now = now or dt.datetime.now(dt.UTC)
    if row["status"] in FINAL_ORDER_STATUSES:
        until = row["last_change"] + ORDER_MARGIN
    else:
        until = max(now, row["last_change"]) + ORDER_MARGIN
    return OrderScope(row["device_id"], row["created_at"] - ORDER_MARGIN, until)


# --- the recorded state -----------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A database value as JSON: times in ISO 8601, jsonb decoded."""
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return value


def _rows(records: Sequence[asyncpg.Record]) -> list[dict[str, Any]]:
    return [{key: _plain(value) for key, value in r.items()} for r in records]


async def recorded_state(
    conn: Connection, device_ids: Sequence[str], since: dt.datetime, until: dt.datetime
) -> dict[str, Any]:
    """The stored state of ``device_ids`` as a capture's state record:

    - ``orders``: the orders of these devices that touch ``[since, until)``: created
      before ``until``, and still open or ended (without an end time: last updated)
      at or after ``since``;
    - ``settlements``: the charges of those orders (``order_charges``);
    - ``ports``: the last reported state of each of their ports;
    - ``as_of``: when it was read. The rows are as stored now: a window that ends in the
      past shows an order or a port as it is now, not as it was at ``until``.
    """
    ids = list(device_ids)
    as_of = await conn.fetchval("SELECT now()", timeout=QUERY_TIMEOUT_S)
    orders = await conn.fetch(
        """SELECT order_no, device_id, port, protocol, status, start_mode, device_initiated,
                  mode, business_no, device_ref, created_at, started_at, ended_at,
                  duration_s, energy_kwh, max_power_w, stop_reason, stop_reason_code,
                  stop_reason_text, failure_reason, amount_cent
             FROM orders
            WHERE device_id = ANY($1::text[]) AND created_at < $3
              AND (status <> ALL($4::text[]) OR coalesce(ended_at, updated_at) >= $2)
            ORDER BY created_at, order_no""",
        ids,
        since,
        until,
        sorted(FINAL_ORDER_STATUSES),
        timeout=QUERY_TIMEOUT_S,
    )
    order_nos = [r["order_no"] for r in orders]
    settlements = await conn.fetch(
        """SELECT order_no, plan, kind, amount_cent, card_charged_cent, shortfall_cent,
                  settled_at
             FROM order_charges WHERE order_no = ANY($1::text[])
            ORDER BY settled_at, order_no""",
        order_nos,
        timeout=QUERY_TIMEOUT_S,
    )
    ports = await conn.fetch(
        f"""SELECT p.device_id, p.port, p.status, p.status_code,
                   {PORT_REPORTED_AT} AS reported_at
             FROM ports p JOIN devices d USING (device_id)
            WHERE p.device_id = ANY($1::text[])
            ORDER BY p.device_id, p.port""",
        ids,
        timeout=QUERY_TIMEOUT_S,
    )
    return {
        "as_of": _plain(as_of),
        "orders": _rows(orders),
        "settlements": _rows(settlements),
        "ports": _rows(ports),
    }
