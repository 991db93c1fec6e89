"""The resource routers a gateway serves besides the read API of :mod:`.app`, in the
order they are mounted: ``create_app(state, routers=ROUTERS)``."""

from __future__ import annotations

from fastapi import APIRouter

from chargegw.api import (
    audit,
    billing,
    cluster,
    commands,
    compliance,
    events,
    firmware,
    frames,
    keys,
    overview,
    params,
    registry,
    timeline,
    webhooks,
)

ROUTERS: tuple[APIRouter, ...] = (
    commands.router,
    billing.router,
    params.router,
    cluster.router,
    firmware.router,
    registry.router,
    keys.router,
    events.router,
    audit.router,
    frames.router,
    compliance.router,
    timeline.router,
    webhooks.router,
    overview.router,
)
