"""Typed views of the cluster for the API: processes, rebalance plans, which process
holds a device, and the devices banned for reconnecting too often.

The processes and the rebalance come from :mod:`chargegw.cluster.directory`; the
session and ban queries are here.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, Field

from chargegw.domain.pages import Page, page_of
from chargegw.store.database import Connection


class Process(BaseModel):
    """A gateway process (a worker of a node) and its load."""

    owner: str = Field(description="node/worker/pid", examples=["gw-a/0/4120"])
    node: str
    worker: int
    pid: int
    state: Literal["live", "draining", "stopped"]
    started_at: dt.datetime
    heartbeat_at: dt.datetime
    silent_s: float = Field(description="seconds since its last heartbeat")
    connections: int
    devices: int
    max_connections: int
    draining: bool
    stopped_at: dt.datetime | None
    shed_remaining: int = Field(description="connections it is still asked to shed")
    device_listen: str | None
    http_listen: str | None


class RebalancePlan(BaseModel):
    """What a rebalance asks (or, with ``dry_run``, would ask) of the processes."""

    processes: int
    connections: int
    target_per_process: int
    shed: dict[str, int] = Field(description="owner -> connections to close")
    rate_per_process: float = Field(description="connections per second per process")
    dry_run: bool


class DeviceSession(BaseModel):
    """Which process holds a device's connection (``owner`` null: nobody now)."""

    device_id: str
    owner: str | None
    node: str | None
    worker: int | None
    pid: int | None
    connection_id: str | None
    remote_addr: str | None
    connected: bool
    since: dt.datetime
    released_at: dt.datetime | None
    connects: int = Field(description="connections in the current flapping window")


class Ban(BaseModel):
    """A device refused until ``until`` (reconnecting too often, or banned by hand)."""

    device_id: str
    until: dt.datetime
    reason: str
    connects: int | None
    since: dt.datetime


async def device_session(conn: Connection, device_id: str) -> DeviceSession | None:
    """The session directory's entry of a device; None if it never connected."""
    row = await conn.fetchrow(
        """SELECT s.device_id, s.owner, s.connection_id, s.remote_addr, s.since,
                  s.released_at, s.connects, p.node, p.worker, p.pid
           FROM device_sessions s LEFT JOIN cluster_processes p ON p.owner = s.owner
           WHERE s.device_id = $1""",
        device_id,
    )
    if row is None:
        return None
    return DeviceSession(**dict(row), connected=row["owner"] is not None)


async def bans(conn: Connection, *, after: tuple[dt.datetime, str] | None, limit: int) -> Page[Ban]:
    """Devices banned now, soonest-ending first, after the key (until, device_id)."""
    rows = await conn.fetch(
        """SELECT device_id, until, reason, connects, created_at AS since FROM device_bans
           WHERE until > now()
             AND ($1::timestamptz IS NULL OR (until, device_id) > ($1, $2))
           ORDER BY until, device_id LIMIT $3""",
        None if after is None else after[0],
        None if after is None else after[1],
        limit + 1,
    )
    return page_of([Ban(**dict(r)) for r in rows], limit)
