"""Waiting in gateway tests: poll a condition with a deadline (never a fixed sleep), a
server in a subprocess coming up, and the in-process HTTP API of a gateway."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import httpx

if TYPE_CHECKING:
    from fastapi import APIRouter

    from chargegw.app import Gateway

T = TypeVar("T")

#: the longest repr of the last value a failure message shows
_SHOWN = 2000


async def eventually(
    probe: Callable[[], T | Awaitable[T]],
    check: Callable[[T], object] = bool,
    *,
    what: str | None = None,
    timeout: float = 10.0,
    interval: float = 0.05,
    retry: tuple[type[BaseException], ...] = (),
) -> T:
    """Poll ``probe()`` (a plain or an async callable) until ``check(value)`` holds and
    return that value; the one way tests wait for something, instead of a fixed sleep.

    ``retry`` names exceptions of the probe that mean "not yet" (a server still starting).
    Past ``timeout`` it fails with what was awaited (``what``, else the probe's and the
    check's source) and the last value seen (or the last exception)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            got = probe()
            value = cast("T", await got if inspect.isawaitable(got) else got)
        except retry as exc:
            last: object = exc
        else:
            if check(value):
                return value
            last = value
        if loop.time() > deadline:
            shown = repr(last)
            if len(shown) > _SHOWN:
                shown = shown[:_SHOWN] + " ..."
            awaited = what or _describe(probe, check)
            raise AssertionError(f"not reached within {timeout} s: {awaited}; last seen: {shown}")
        await asyncio.sleep(interval)


def _describe(probe: Callable[..., object], check: Callable[..., object]) -> str:
    """What a probe and a check wait for, from their source: a lambda's line, else the
    function's name; with the file and line of the probe."""
    parts = []
    for fn in (probe, check):
        text = _source(fn)
        if text not in parts:
            parts.append(text)
    code = getattr(probe, "__code__", None)
    where = f" ({Path(code.co_filename).name}:{code.co_firstlineno})" if code else ""
    return " / ".join(parts) + where


def _source(fn: Callable[..., object]) -> str:
    name: str = getattr(fn, "__qualname__", repr(fn))
    if not name.endswith("<lambda>"):
        return name
    try:
        lines = inspect.getsource(fn).splitlines()
    except (OSError, TypeError):
        return name
    return " ".join(line.strip() for line in lines)


async def first(probe: Callable[[], Awaitable[T | None]], what: str, timeout: float = 10.0) -> T:
    """The first truthy value of ``await probe()`` within ``timeout`` (``eventually``,
    typed without the None)."""
    value: T | None = await eventually(probe, bool, timeout=timeout, what=what, interval=0.02)
    assert value is not None
    return value


async def eventually_json(
    client: httpx.AsyncClient,
    path: str,
    key: str,
    values: Collection[object],
    *,
    timeout: float = 15.0,
    interval: float = 0.05,
) -> dict[str, Any]:
    """The JSON body of ``GET path`` once its ``key`` is one of ``values`` (a command's
    or an order's status); a request that fails to connect is retried."""

    async def body() -> dict[str, Any]:
        response = await client.get(path)
        answer: dict[str, Any] = response.json()
        return answer

    return await eventually(
        body,
        lambda b: b.get(key) in values,
        what=f"GET {path}: {key} in {sorted(map(str, values))}",
        timeout=timeout,
        interval=interval,
        retry=(httpx.TransportError,),
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_http(url: str, timeout: float, process: asyncio.subprocess.Process) -> None:
    """Until ``GET url`` answers 200 (a server starting in ``process``); fails at once if
    the process exits."""

    async with httpx.AsyncClient() as client:

        async def status() -> int:
            if process.returncode is not None:
                raise AssertionError(f"the server exited with status {process.returncode}")
            return (await client.get(url)).status_code

        await eventually(
            status,
            lambda code: code == 200,
            what=f"{url} answering 200",
            timeout=timeout,
            interval=0.2,
            retry=(httpx.TransportError,),
        )


@contextlib.asynccontextmanager
async def api_client(
    gateway: Gateway, *routers: APIRouter, **state: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """The HTTP API of ``gateway`` in process: the read API, the command router and
    ``routers``; without authentication unless ``state`` says otherwise."""
    # imported here: the waiting helpers do not need the HTTP stack
    from chargegw.api import commands
    from chargegw.api.app import ApiState, create_app

    state.setdefault("auth_required", False)
    state.setdefault("services", gateway.api_services())
    state.setdefault("reasons", gateway.readiness_reasons)
    api_state = ApiState(
        pool=gateway.pool, metrics=gateway.metrics, readiness=gateway.readiness, **state
    )
    app = create_app(api_state, routers=[commands.router, *routers])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        yield client
