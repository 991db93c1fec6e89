"""``GET /api/v1/overview``: the platform at a glance (:mod:`chargegw.domain.overview`)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from chargegw.api.deps import Pool
from chargegw.domain import overview as overview_domain
from chargegw.domain.overview import Overview

__all__ = ["router"]

router = APIRouter(prefix="/api/v1", tags=["overview"])

ACQUIRE_TIMEOUT_S = 5.0


@router.get(
    "/overview",
    summary="The platform at a glance: devices, sessions, commands, "
    "settlements, outbox, processes and firing alerts",
)
async def get_overview(request: Request, pool: Pool) -> Overview:
    """Devices online and offline by protocol and gateway, orders charging now, commands
    finished per minute with their success rate, today's settlements and revenue (in the
    site's time zone), the outbox backlog, the live gateway processes, and the alerts of
    the platform's own checks (docs/console.md)."""
    state = request.app.state.chargegw
    checks = state.readiness()
    reasons = state.reasons()
    not_ready = {name: reasons.get(name, "failing") for name, ok in checks.items() if not ok}
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        return await overview_domain.overview(
            conn,
            timezone=state.console.timezone,
            process_timeout_s=state.console.process_timeout_s,
            not_ready=not_ready,
        )
