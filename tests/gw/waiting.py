"""Waiting in gateway tests: poll a condition with a deadline (never a fixed sleep), and
the in-process HTTP API of a gateway."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import httpx
from fastapi import APIRouter

from chargegw.api.app import ApiState, create_app
from chargegw.api.commands import make_router
from chargegw.app import Gateway

T = TypeVar("T")


async def until(
    probe: Callable[[], Awaitable[T]],
    check: Callable[[T], Any] = bool,
    *,
    timeout: float = 10.0,
    what: str = "condition",
    interval: float = 0.05,
) -> T:
    """Poll ``await probe()`` until ``check(value)`` holds; fail with the last value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await probe()
        if check(value):
            return value
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s: {value!r}")
        await asyncio.sleep(interval)


async def first(probe: Callable[[], Awaitable[T | None]], what: str, timeout: float = 10.0) -> T:
    """The first truthy value of ``await probe()`` within ``timeout``."""
    value = await until(probe, bool, timeout=timeout, what=what, interval=0.02)
    assert value is not None
    return value


@contextlib.asynccontextmanager
async def api_client(
    gateway: Gateway, *routers: APIRouter, **state: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """The HTTP API of ``gateway`` in process: the read API, the command router and
    ``routers``; without authentication unless ``state`` says otherwise."""
    state.setdefault("auth_required", False)
    api_state = ApiState(
        pool=gateway.pool, metrics=gateway.metrics, readiness=gateway.readiness, **state
    )
    app = create_app(api_state, routers=[make_router(gateway), *routers])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        yield client
