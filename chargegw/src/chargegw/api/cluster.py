"""HTTP endpoints of the cluster: processes, rebalance, the session directory, bans."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import asyncpg
from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from chargegw.cluster.directory import lift_ban, list_bans, list_processes, rebalance

if TYPE_CHECKING:
    from chargegw.app import Gateway


class RebalanceRequest(BaseModel):
    rate: float = Field(20.0, gt=0, le=10000, description="connections per second per process")
    dry_run: bool = False


def make_cluster_router(gateway: Gateway) -> APIRouter:
    """The cluster endpoints of ``gateway`` (every process answers for the whole platform)."""
    router = APIRouter(prefix="/api/v1", tags=["cluster"])

    def pool() -> asyncpg.Pool:
        if gateway.pool is None:
            raise HTTPException(503, "database unavailable")
        return gateway.pool

    @router.get("/nodes", summary="Gateway processes with their connection counts")
    async def get_nodes(include_stopped: bool = False) -> dict[str, Any]:
        async with pool().acquire() as conn:
            procs = await list_processes(conn, include_stopped=include_stopped)
        for p in procs:
            for key in ("started_at", "heartbeat_at", "stopped_at"):
                p[key] = p[key].isoformat() if p[key] is not None else None
        return {"items": procs, "answered_by": gateway.cluster.owner}

    @router.post("/nodes/rebalance", summary="Shed connections from the busiest processes")
    async def post_rebalance(body: RebalanceRequest) -> dict[str, Any]:
        async with pool().acquire() as conn:
            return await rebalance(conn, rate=body.rate, dry_run=body.dry_run)

    @router.get("/devices/{device_id}/session", summary="Which process holds a device")
    async def get_session(device_id: str) -> dict[str, Any]:
        row = await pool().fetchrow(
            """SELECT s.device_id, s.owner, s.connection_id, s.remote_addr, s.since,
                      s.released_at, s.connects, p.node, p.worker, p.pid
               FROM device_sessions s LEFT JOIN cluster_processes p ON p.owner = s.owner
               WHERE s.device_id = $1""",
            device_id,
        )
        if row is None:
            raise HTTPException(404, f"device {device_id} has never been connected")
        out = dict(row)
        for key in ("since", "released_at"):
            out[key] = out[key].isoformat() if out[key] is not None else None
        out["connected"] = row["owner"] is not None
        return out

    @router.get("/bans", summary="Devices refused for reconnecting too often")
    async def get_bans() -> dict[str, Any]:
        async with pool().acquire() as conn:
            return {"items": await list_bans(conn)}

    @router.delete("/bans/{device_id}", summary="Lift a device's ban now")
    async def delete_ban(device_id: str) -> dict[str, Any]:
        async with pool().acquire() as conn:
            if not await lift_ban(conn, device_id):
                raise HTTPException(404, f"device {device_id} is not banned")
        return {"device_id": device_id, "lifted": True}

    return router
