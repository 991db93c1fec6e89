"""HTTP endpoints of the cluster: processes, rebalance, the session directory, bans.

Every process answers for the whole platform: they read the shared database.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, Field

from chargegw.api.deps import Pool, Services
from chargegw.api.errors import error_responses
from chargegw.api.pagination import DEFAULT_LIMIT, Cursor, Limit, encode_cursor, timestamp_key
from chargegw.cluster import views
from chargegw.cluster.directory import lift_ban, list_processes, rebalance
from chargegw.cluster.views import Ban, DeviceSession, Process, RebalancePlan

__all__ = ["router"]


class RebalanceRequest(BaseModel):
    """How fast the busiest processes shed their surplus."""

    rate: float = Field(20.0, gt=0, le=10000, description="connections per second per process")
    dry_run: bool = False


class ProcessList(BaseModel):
    """The processes of the platform, and which one answered."""

    items: list[Process]
    answered_by: str = Field(description="the owner id of the process that answered")


class BanPage(BaseModel):
    """A page of bans, soonest-ending first."""

    items: list[Ban]
    next_cursor: str | None


class BanLifted(BaseModel):
    """A ban lifted: the device may connect again at once."""

    device_id: str
    lifted: bool


router = APIRouter(prefix="/api/v1", tags=["cluster"])


@router.get("/nodes", summary="Gateway processes with their connection counts")
async def get_nodes(
    pool: Pool,
    services: Services,
    include_stopped: Annotated[
        bool, Query(description="also processes that stopped (kept for a day)")
    ] = False,
) -> ProcessList:
    """``state`` is live, draining or stopped."""
    async with pool.acquire() as conn:
        processes = await list_processes(conn, include_stopped=include_stopped)
    items = [Process.model_validate(p) for p in processes]
    return ProcessList(items=items, answered_by=services.owner)


@router.post("/nodes/rebalance", summary="Shed connections from the busiest processes")
async def post_rebalance(pool: Pool, body: RebalanceRequest) -> RebalancePlan:
    """Each live process above the mean (rounded up) is asked to close its surplus at
    ``rate`` connections per second; the devices reconnect through the load balancer."""
    async with pool.acquire() as conn:
        plan = await rebalance(conn, rate=body.rate, dry_run=body.dry_run)
    return RebalancePlan.model_validate(plan)


@router.get(
    "/devices/{device_id}/session",
    summary="Which process holds a device",
    responses=error_responses((404, "The device has never been connected")),
)
async def get_session(pool: Pool, device_id: str) -> DeviceSession:
    """``connected`` is false while nobody holds the device."""
    async with pool.acquire() as conn:
        session = await views.device_session(conn, device_id)
    if session is None:
        raise HTTPException(404, f"device {device_id} has never been connected")
    return session


@router.get("/bans", summary="Devices refused for reconnecting too often")
async def get_bans(pool: Pool, limit: Limit = DEFAULT_LIMIT, cursor: Cursor = None) -> BanPage:
    """Bans in force, soonest-ending first, with cursor pagination like the other lists."""
    after = None if cursor is None else timestamp_key(cursor, "bans", str)
    async with pool.acquire() as conn:
        page = await views.bans(conn, after=after, limit=limit)
    next_cursor = None
    if page.more:
        last = page.items[-1]
        next_cursor = encode_cursor("bans", [last.until.isoformat(), last.device_id])
    return BanPage(items=page.items, next_cursor=next_cursor)


@router.delete(
    "/bans/{device_id}",
    summary="Lift a device's ban now",
    responses=error_responses((404, "The device is not banned")),
)
async def delete_ban(pool: Pool, device_id: str) -> BanLifted:
    """Also forgets the reconnections that led to it, and tells every process."""
    async with pool.acquire() as conn:
        if not await lift_ban(conn, device_id):
            raise HTTPException(404, f"device {device_id} is not banned")
    return BanLifted(device_id=device_id, lifted=True)
