"""``chargegw explain``: an order's or a device's timeline for a person at a terminal
(or as JSON, the API's ``Timeline``), read straight from the database.

One line per item: time, kind, a short summary (a frame's direction, command and key
decoded fields; a transition's ``from -> to`` and its cause). What a timeline holds is
:mod:`chargegw.domain.timeline`'s.
"""

from __future__ import annotations

import datetime as dt

from chargegw.domain import timeline
from chargegw.domain.timeline import Timeline
from chargegw.store.database import Connection

__all__ = ["ExplainError", "explain_device", "explain_order", "render"]


class ExplainError(Exception):
    """The subject is unknown or the window is bad: the message says which."""


async def explain_order(conn: Connection, order_no: str, *, limit: int) -> Timeline:
    """The timeline of an order; :class:`ExplainError` when there is no such order."""
    found = await timeline.order_timeline(conn, order_no.upper(), limit=limit)
    if found is None:
        raise ExplainError(f"order {order_no} not found")
    return found


async def explain_device(
    conn: Connection, device_id: str, *, since: dt.datetime, until: dt.datetime, limit: int
) -> Timeline:
    """The timeline of a device in ``[since, until)``; :class:`ExplainError` when there
    is no such device or the window is inverted."""
    if since > until:
        raise ExplainError("--since is after --until")
    found = await timeline.device_timeline(conn, device_id, since=since, until=until, limit=limit)
    if found is None:
        raise ExplainError(f"device {device_id} not found")
    return found


def _time(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def render(found: Timeline) -> str:
    """The timeline as text: a heading, then one line per item."""
    if found.order_no is not None:
        title = f"order {found.order_no} on {found.device_id} port {found.port}"
    else:
        title = f"device {found.device_id}"
    lines = [f"{title}, {_time(found.since)} .. {_time(found.until)} (UTC)"]
    for item in found.items:
        ident = f"#{item.frame_id}" if item.kind is timeline.ItemKind.FRAME else ""
        lines.append(
            f"{_time(item.at)}  {item.kind.value:<10}  {ident}{' ' if ident else ''}{item.summary}"
        )
    if found.truncated:
        lines.append(f"... cut at {found.limit} items (--limit to see more)")
    if not found.items:
        lines.append("nothing recorded in this window")
    return "\n".join(lines) + "\n"
