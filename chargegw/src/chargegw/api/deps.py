"""What the routers act through, handed to them as FastAPI dependencies.

The composition root (:mod:`chargegw.app`) builds one :class:`ApiServices` and puts it in
``ApiState.services``; a route declares ``pool: Pool`` and ``services: Services`` and
never sees the gateway. The pool is read whenever a connection is taken (it may be
``None`` while the database is down: a 503, see ``create_app``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated

from asyncpg.pool import PoolAcquireContext
from fastapi import Depends, HTTPException, Request

from chargegw.domain.events import EventHub
from chargegw.domain.outbox import Outbox
from chargegw.domain.refusals import ConflictError, NotFoundError, RequestError
from chargegw.quirks import QuirkBook
from chargegw.store.database import Connection

if TYPE_CHECKING:
    from chargegw.api.app import ApiState


#: starts the devices of a parameter-profile job that its pace allows now, inside the
#: caller's transaction; returns the devices to wake after the commit
StartParamJob = Callable[[Connection, int], Awaitable[list[str]]]


def _nothing() -> None:
    pass


@dataclasses.dataclass(frozen=True)
class ApiServices:
    """The gateway's services the routers use (built by the composition root)."""

    #: the command outbox: rows inside the caller's transaction, woken after the commit
    outbox: Outbox
    #: seconds a queued command waits for its device before it dies
    command_expiry_s: float
    #: the largest firmware image accepted
    firmware_max_bytes: int
    #: this process's id in the session directory (``node/worker/pid``)
    owner: str
    #: the parameter engine runs a pass soon (a job was created)
    kick_params: Callable[[], None]
    #: the upgrade engine runs a pass soon (a job was created or cancelled)
    kick_firmware: Callable[[], None]
    #: the event stream's hub: live subscriptions (GET /api/v1/events/stream)
    events: EventHub
    start_param_job: StartParamJob
    #: webhook URLs may name private, loopback, link-local and multicast addresses
    webhooks_allow_private: bool = False
    #: the webhook engine looks for due deliveries now (a ping, a retry, a replay)
    wake_webhooks: Callable[[], None] = _nothing
    #: the quirk profiles: the live ones of the devices this process holds, and the
    #: configured ones to compute those of the others (GET /api/v1/devices/{id})
    quirks: QuirkBook = dataclasses.field(default_factory=QuirkBook)


def _state(request: Request) -> ApiState:
    state: ApiState = request.app.state.chargegw
    return state


class Database:
    """The pool of the request's application, looked up when a connection is taken:
    a route validates its parameters first, then meets a 503 ``database unavailable``
    while there is no pool."""

    def __init__(self, state: ApiState) -> None:
        self._state = state

    def acquire(self, *, timeout: float | None = None) -> PoolAcquireContext:
        """A pooled connection (``async with db.acquire() as conn``)."""
        pool = self._state.pool
        if pool is None:
            raise HTTPException(503, "database unavailable")
        return pool.acquire(timeout=timeout)


async def database(request: Request) -> Database:
    """The database of the request's application."""
    return Database(_state(request))


async def services(request: Request) -> ApiServices:
    """The services the composition root configured."""
    found = _state(request).services
    if found is None:
        raise RuntimeError("ApiState.services is not configured: the routers need it")
    return found


_SHIPPED_QUIRKS = QuirkBook()


async def quirks(request: Request) -> QuirkBook:
    """The quirk profiles of the composition root; the shipped ones for an application
    built without services (the read API alone)."""
    found = _state(request).services
    return _SHIPPED_QUIRKS if found is None else found.quirks


Pool = Annotated[Database, Depends(database)]
Services = Annotated[ApiServices, Depends(services)]
Quirks = Annotated[QuirkBook, Depends(quirks)]


def refused(exc: RequestError) -> HTTPException:
    """The answer to a domain refusal: 404 not found, 409 conflict, 422 otherwise."""
    status = 422
    if isinstance(exc, NotFoundError):
        status = 404
    elif isinstance(exc, ConflictError):
        status = 409
    return HTTPException(status, exc.detail)
