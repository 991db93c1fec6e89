"""The read API: health, readiness, metrics, gateways, devices, their events and frames.

``create_app(state)`` builds a FastAPI application (OpenAPI at ``/openapi.json``) that only
reads: it queries PostgreSQL through the pool in :class:`ApiState` and never holds state
of its own, so several nodes can serve it side by side.

Conventions shared by every list endpoint:

- ``{"items": [...], "next_cursor": "..."}``; ``next_cursor`` is ``null`` on the last page.
  Pass it back as ``cursor=`` (with the same filters) for the next page. Cursors are opaque
  (URL-safe base64 of the last row's key); a cursor that is not one of ours is a 422.
- Keyset pagination, so pages stay consistent while rows are being added.
- Errors have one shape (:mod:`chargegw.api.errors`): ``{"error": {"code": ...,
  "message": ..., "field": ..., "details": [...]}}``; bad query values are 422
  ``validation_failed`` with one ``details`` entry per problem.
- Timestamps are ISO 8601 in UTC with a zone; timestamps given without a zone are UTC.
- While the database is unavailable (``store.errors.is_unavailable``: no connection, a
  database not accepting connections, a read-only standby on a write ...) every endpoint,
  the routers passed to ``create_app`` included, answers 503 with ``Retry-After`` and
  ``{"error": {"code": "database_unavailable", "reason": "...", ...}}``; the log says so
  once per change of state (:class:`DatabaseStatus`), not once per request.

Authentication: every ``/api/v1`` endpoint, and every router passed to ``create_app``,
requires ``Authorization: Bearer <key>`` (see :mod:`chargegw.domain.auth`); without a valid key
the answer is 401 ``unauthorized`` with ``WWW-Authenticate: Bearer``. ``/healthz``,
``/readyz``, ``/metrics``, ``/openapi.json``, ``/docs``, ``/redoc`` and ``/static`` stay
open. With ``ApiState.auth_required`` false (no key configured or
stored: the gateway then listens on 127.0.0.1 only) requests need no key.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import asyncpg
import structlog
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Security
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chargegw import __version__
from chargegw.api import devices, errors, guard, scopes
from chargegw.api.deps import ApiServices
from chargegw.api.docs import add_docs
from chargegw.api.errors import (
    RETRY_AFTER_HEADER,
    RETRY_AFTER_S,
    error_responses,
)
from chargegw.domain import auth, console_sessions, readiness
from chargegw.domain.devices import mask_iccid
from chargegw.metrics import Metrics
from chargegw.store import errors as store_errors

__all__ = ["ApiState", "ConsoleConfig", "DatabaseStatus", "create_app", "mask_iccid"]

log = structlog.get_logger("chargegw.api.app")

#: readiness probes must answer fast; a database slower than this counts as down
READY_DB_TIMEOUT_S = 1.0
_RETRY_AFTER = {"Retry-After": str(RETRY_AFTER_S)}
_NO_POOL = "no database pool"
_READ_ONLY = "25006"


class DatabaseStatus:
    """Whether the API last found the database available, logged once per change.

    An outage fails every request the same way, hundreds a second: only the change to
    unavailable is logged (a warning with the reason, no traceback), and the change back
    (an info line), not each request.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._since = 0.0
        #: why the database is unavailable; None while it is available
        self.reason: str | None = None
        #: the outage refuses writes only (reads keep working on a read-only database)
        self.read_only = False
        #: requests answered 503 since the outage began
        self.failed_requests = 0

    @property
    def available(self) -> bool:
        """False from the first request that found the database unavailable."""
        return self.reason is None

    def unavailable(self, reason: str, *, read_only: bool = False, path: str = "") -> None:
        """A request (to ``path``) found the database unavailable for ``reason``."""
        self.failed_requests += 1
        if self.reason is None:
            self._since = self._clock()
            log.warning("database unavailable", reason=reason, path=path)
        self.reason = reason
        self.read_only = self.read_only or read_only

    def succeeded(self, *, wrote: bool) -> None:
        """A request was served by the database; ``wrote``: it wrote, or checked it could.

        A read succeeds on a read-only database too, so it does not end such an outage.
        """
        if self.reason is None or (self.read_only and not wrote):
            return
        log.info(
            "database available again",
            unavailable_s=round(self._clock() - self._since, 1),
            failed_requests=self.failed_requests,
        )
        self.reason = None
        self.read_only = False
        self.failed_requests = 0


@dataclasses.dataclass(frozen=True)
class ConsoleConfig:
    """The operator console's settings (docs/console.md)."""

    #: a sign-in lasts at most this long
    session_lifetime_s: float = 12 * 3600.0
    #: a session unused this long ends
    idle_timeout_s: float = 3600.0
    #: the time zone the console shows times in (and "today" of the overview)
    timezone: str = "Asia/Shanghai"
    #: a gateway process silent this long is dead (the overview's ``node_silent`` alert)
    process_timeout_s: float = 20.0


def _no_reasons() -> dict[str, str]:
    return {}


@dataclasses.dataclass
class ApiState:
    """What the API reads from; owned by the process that serves it.

    ``pool`` may be ``None`` (or be replaced) while the database is down: it is read on
    every request. ``readiness`` returns named checks such as
    ``{"database": True, "listener": True}``; the process is ready when all are true.

    ``reasons`` returns why checks fail, by check name (``{"database": "read-only
    database ..."}``); ``/readyz`` adds the reason of its own database check.

    ``api_keys`` are the configured keys (``CHARGEGW_API_KEYS``); keys stored in the
    database are accepted too, checked through ``key_cache`` (whose owner runs an
    :class:`~chargegw.domain.auth.KeyListener` on it, so revocations apply at once; without
    one, cached keys are trusted for a second). ``auth_required`` false lets every request
    through without a key: only for a gateway listening on loopback.

    ``database`` is what the API last found of the database, for logging its changes.

    ``services`` are what the routers act through (the outbox, the engines: see
    :class:`chargegw.api.deps.ApiServices`); the read endpoints need none.
    """

    pool: asyncpg.Pool | None
    metrics: Metrics
    readiness: Callable[[], dict[str, bool]]
    api_keys: frozenset[str] = frozenset()
    auth_required: bool = True
    key_cache: auth.KeyCache = dataclasses.field(default_factory=auth.KeyCache)
    reasons: Callable[[], dict[str, str]] = _no_reasons
    database: DatabaseStatus = dataclasses.field(default_factory=DatabaseStatus)
    services: ApiServices | None = None
    #: request hygiene: body sizes, failed authentications, rate limits, the call audit
    #: (:mod:`chargegw.api.guard`); the defaults of the settings, without an audit
    guard: guard.Guard = dataclasses.field(default_factory=guard.Guard)
    #: the operator console's sessions and time zone
    console: ConsoleConfig = dataclasses.field(default_factory=ConsoleConfig)
    #: without keys: the ``Host`` names requests may carry (loopback); None: any
    local_hosts: frozenset[str] | None = None


class DatabaseUnavailableError(Exception):
    """No pool, or no way to reach the database; served as 503 with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------- response models


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, bool] = Field(examples=[{"database": True, "listener": True}])
    reasons: dict[str, str] = Field(
        default_factory=dict,
        description="why checks fail, by check name; empty when ready",
        examples=[{"database": "the database does not accept connections now"}],
    )


# ---------------------------------------------------------------- helpers


def _state(request: Request) -> ApiState:
    state: ApiState = request.app.state.chargegw
    return state


# ---------------------------------------------------------------- authentication

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearerAuth",
    bearerFormat="cgw_...",
    description="An API key: configured in `CHARGEGW_API_KEYS` or made with "
    "`chargegw apikey create`. Send it as `Authorization: Bearer <key>`.",
)

_UNAUTHORIZED = error_responses(401)
#: spelt out rather than by ``model``: FastAPI would document a model under the route's own
#: media type (text/event-stream for the event stream), and refusals are JSON everywhere
_FORBIDDEN: dict[int | str, dict[str, Any]] = {
    403: {
        "description": "The key may not make this call: a scope it lacks, a device or a "
        "network it is not allowed",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
}


#: the refusals that are 401 (who is calling is not established); the others are 403
_UNAUTHENTICATED = frozenset(
    {
        auth.Reason.MISSING_KEY,
        auth.Reason.UNKNOWN_KEY,
        auth.Reason.KEY_EXPIRED,
        auth.Reason.KEY_REVOKED,
        auth.Reason.SIGNATURE_MISSING,
        auth.Reason.SIGNATURE_INVALID,
        auth.Reason.SIGNATURE_STALE,
        auth.Reason.SIGNATURE_REPLAYED,
        auth.Reason.SESSION_EXPIRED,
    }
)

#: the console's session cookie (:mod:`chargegw.console`); a request without
#: ``Authorization`` that carries it is authenticated by its session
SESSION_COOKIE = "chargegw_session"
#: the header a console request that changes something repeats the session's CSRF token in
CSRF_HEADER = "x-csrf-token"
#: a console session opened while the API runs without keys (localhost mode)
LOCAL_SESSION = "local"


async def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> None:
    """Who is calling, and whether the key may make this call.

    401 ``unauthorized`` (with ``WWW-Authenticate: Bearer``) for a missing, unknown,
    expired or revoked key and for a bad signature (signed requests: required by the key's
    ``hmac_required``, checked whenever ``x-chargegw-signature`` is sent); 403
    ``forbidden`` for a client outside the key's networks, a scope the key lacks
    (:mod:`chargegw.api.scopes`), or devices it may not act on. The message says why.

    Sets ``request.state.api_key`` (:class:`~chargegw.domain.auth.ApiKeyInfo`) once the
    key is known to be valid (so also on the 403s and signature 401s that follow), and
    ``request.state.auth_failure`` (a :class:`~chargegw.domain.auth.Reason`) before any
    refusal; the call audit and the rate limits read both.
    """
    state = _state(request)
    try:
        if credentials is None:  # what a browser sends by itself: a cookie, or nothing
            _check_origin(request)
        if not state.auth_required:
            check_local_host(request, state)
            request.state.api_key = auth.LOCAL_KEY
            return
        token = request.cookies.get(SESSION_COOKIE) if credentials is None else None
        if token:
            info, session = await _session_key(request, state, token)
            request.state.api_key = info
            request.state.session_key_hash = session.key_hash
            if request.method not in scopes.READS and not hmac.compare_digest(
                request.headers.get(CSRF_HEADER, "").encode(), session.csrf_token.encode()
            ):
                raise auth.KeyRefusedError(
                    auth.Reason.CSRF,
                    f"missing or wrong {CSRF_HEADER} header for this console session",
                    key_id=info.key_id,
                )
            await _authorize(request, state, info)
            return
        info = await _authenticate(request, state, credentials)
        request.state.api_key = info
        await _authorize(request, state, info)
    except auth.KeyRefusedError as exc:
        raise _refused(request, state, exc) from None


def _check_origin(request: Request) -> None:
    """Refuse a change a browser sends from another site (a cross-site form or script):
    ``Sec-Fetch-Site`` says so, or an ``Origin`` that is not this host. API clients send
    neither header."""
    if request.method in scopes.READS:
        return
    site = request.headers.get("sec-fetch-site")
    if site is None:  # an older browser: its Origin must be this host
        origin = request.headers.get("origin")
        foreign = origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}"
    else:
        foreign = site in ("cross-site", "same-site")
    if foreign:
        raise auth.KeyRefusedError(
            auth.Reason.CSRF, "a change sent from another site is refused (cross-site request)"
        )


def check_local_host(request: Request, state: ApiState) -> None:
    """Without keys the API answers loopback clients only: refuse a ``Host`` that is not a
    loopback name, or the browser of a web page whose name was rebound to 127.0.0.1 (DNS
    rebinding) could use it. ``ApiState.local_hosts`` None: no check (in-process tests)."""
    if state.local_hosts is None:
        return
    host = request.headers.get("host", "")
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    if name.strip("[]").lower() not in state.local_hosts:
        raise auth.KeyRefusedError(
            auth.Reason.NETWORK,
            f"without API keys the gateway answers loopback addresses only, not host {host!r}",
        )


async def _session_key(
    request: Request, state: ApiState, token: str
) -> tuple[auth.ApiKeyInfo, console_sessions.Session]:
    """The key behind a console session, as it is now (revoked, expired: refused)."""
    if state.pool is None:
        raise DatabaseUnavailableError(_NO_POOL)
    async with state.pool.acquire(timeout=auth.LOOKUP_TIMEOUT_S) as conn:
        session = await console_sessions.session_for(
            conn, token, idle_timeout_s=state.console.idle_timeout_s
        )
    if session is None or session.key_hash == LOCAL_SESSION:
        raise auth.KeyRefusedError(
            auth.Reason.SESSION_EXPIRED, "the console session has ended: sign in again"
        )
    try:
        info = await auth.authenticate_hash(
            state.pool, state.api_keys, session.key_hash, cache=state.key_cache
        )
    except auth.NeedsDatabaseError:
        raise DatabaseUnavailableError(_NO_POOL) from None
    if info.hmac_required:  # its calls must be signed: a cookie cannot sign
        raise auth.KeyRefusedError(
            auth.Reason.SIGNATURE_MISSING,
            "this key requires signed requests: it cannot be used in the console",
            key_id=info.key_id,
        )
    return info, session


async def _authenticate(
    request: Request, state: ApiState, credentials: HTTPAuthorizationCredentials | None
) -> auth.ApiKeyInfo:
    presented = credentials.credentials if credentials is not None else None
    try:
        # database errors of the lookup are 503 (or 500) through create_app's handlers
        info = await auth.authenticate(state.pool, state.api_keys, presented, cache=state.key_cache)
    except auth.NeedsDatabaseError:
        # a stored key cannot be told from a wrong one without the database
        raise DatabaseUnavailableError(_NO_POOL) from None
    assert presented is not None
    if info.hmac_required or auth.SIGNATURE_HEADER in request.headers:
        request_id, _ = auth.check_signature(presented, request.headers, await request.body())
        if state.pool is None:
            raise DatabaseUnavailableError(_NO_POOL)
        if not await auth.record_nonce(state.pool, info.key_id, request_id):
            raise auth.KeyRefusedError(
                auth.Reason.SIGNATURE_REPLAYED,
                f"{auth.ID_HEADER} {request_id} was used already (a replay)",
                key_id=info.key_id,
            )
    return info


async def _authorize(request: Request, state: ApiState, info: auth.ApiKeyInfo) -> None:
    client = request.client.host if request.client is not None else None
    if not info.allows_address(client):
        raise auth.KeyRefusedError(
            auth.Reason.NETWORK,
            f"this key may not be used from {client or 'an unknown address'}",
            key_id=info.key_id,
        )
    route = request.scope.get("route")
    rule = scopes.rule_for(request.method, getattr(route, "path", request.url.path))
    if not info.has_scope(rule.scope):
        raise auth.KeyRefusedError(
            auth.Reason.SCOPE, f"this call needs scope {rule.scope}", key_id=info.key_id
        )
    await scopes.check_subjects(request, info, rule, state.pool)


def _refused(request: Request, state: ApiState, exc: auth.KeyRefusedError) -> HTTPException:
    """The answer to a refused key: noted on the request, counted, logged for known keys."""
    request.state.auth_failure = exc.reason
    state.metrics.api_auth_refused_total.labels(reason=exc.reason.value).inc()
    if exc.key_id is not None:
        log.info(
            "API request refused",
            reason=exc.reason.value,
            key_id=exc.key_id,
            client=request.client.host if request.client is not None else None,
            method=request.method,
            path=request.url.path,
        )
    if exc.reason in _UNAUTHENTICATED:
        return errors.api_error(
            401, exc.message, refusal=exc.reason.value, headers={"WWW-Authenticate": "Bearer"}
        )
    return errors.api_error(403, exc.message, refusal=exc.reason.value)


# ---------------------------------------------------------------- endpoints

_RETRY_AFTER_HEADER = RETRY_AFTER_HEADER
_UNAVAILABLE = error_responses((503, "The database is unavailable"))

health = APIRouter(tags=["health"])


@health.get("/healthz", summary="Liveness: the process serves HTTP")
async def healthz() -> Health:
    return Health(status="ok")


@health.get(
    "/readyz",
    summary="Readiness: database reachable, device listener up",
    response_model=Readiness,
    responses={
        503: {"model": Readiness, "description": "Not ready", "headers": _RETRY_AFTER_HEADER}
    },
)
async def readyz(request: Request) -> JSONResponse:
    """Every check with, for those that fail, the reason when one is known."""
    state = _state(request)
    checks = dict(state.readiness())
    reasons = dict(state.reasons())
    problem = await _database_problem(state.pool)
    if problem is None:
        state.database.succeeded(wrote=True)
    else:
        reasons["database"], read_only = problem
        state.database.unavailable(reasons["database"], read_only=read_only, path="/readyz")
    checks["database"] = checks.get("database", True) and problem is None
    ready = all(checks.values())
    body = Readiness(ready=ready, checks=checks, reasons=reasons)
    if ready:
        return JSONResponse(body.model_dump())
    return JSONResponse(body.model_dump(), status_code=503, headers=_RETRY_AFTER)


async def _database_problem(pool: asyncpg.Pool | None) -> tuple[str, bool] | None:
    """Why the database cannot take this process's writes now, and whether it is because
    it is read-only; None when it can. Answers within ``READY_DB_TIMEOUT_S``."""
    if pool is None:
        return _NO_POOL, False
    try:
        async with asyncio.timeout(READY_DB_TIMEOUT_S):
            async with pool.acquire() as conn:
                read_only = await readiness.read_only(conn)
    except store_errors.DB_ERRORS as exc:
        return store_errors.reason(exc), store_errors.sqlstate(exc) == _READ_ONLY
    if read_only:  # a standby, or default_transaction_read_only: reads alone pass
        return store_errors.reason(asyncpg.exceptions.ReadOnlySQLTransactionError()), True
    return None


@health.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
async def metrics(request: Request) -> Response:
    # off the event loop: in multiprocess mode a render reads every worker's files, and the
    # loop also answers the piles
    body, content_type = await asyncio.to_thread(_state(request).metrics.render)
    return Response(body, media_type=content_type)


def _unavailable(request: Request, reason: str, *, read_only: bool = False) -> JSONResponse:
    """The 503 every database-unavailable request gets; notes the outage for the log."""
    _state(request).database.unavailable(reason, read_only=read_only, path=request.url.path)
    body = errors.error_body(
        503, "database unavailable", code=errors.DATABASE_UNAVAILABLE, reason=reason
    )
    return errors.error_response(503, body, _RETRY_AFTER)


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DatabaseUnavailableError)
    return _unavailable(request, exc.reason)


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    """503 for an error that means the database is unavailable; anything else (a defect,
    a bad row) is raised on to FastAPI's 500, traceback and all."""
    if not store_errors.is_unavailable(exc):
        raise exc
    read_only = store_errors.sqlstate(exc) == _READ_ONLY
    return _unavailable(request, store_errors.reason(exc), read_only=read_only)


async def _service_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """``HTTPException(503)`` raised by a router, with ``Retry-After``."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.detail == "database unavailable":  # the routers' answer when there is no pool
        return _unavailable(request, _NO_POOL)
    headers = {**_RETRY_AFTER, **(exc.headers or {})}
    body = errors.from_detail(503, exc.detail)
    body["error"].setdefault("reason", body["error"]["message"])
    return errors.error_response(503, body, headers)


class _DatabaseRecovery:
    """Ends an outage at the first successful ``/api/v1`` answer: every endpoint there
    reads or writes the database, so a 2xx means it served the request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/api/v1/"):
            await self.app(scope, receive, send)
            return
        status: DatabaseStatus = scope["app"].state.chargegw.database
        if status.available:
            await self.app(scope, receive, send)
            return
        wrote = scope["method"] not in ("GET", "HEAD")

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start" and 200 <= message["status"] < 300:
                status.succeeded(wrote=wrote)
            await send(message)

        await self.app(scope, receive, watch)


_TAGS = [
    {"name": "health", "description": "Liveness, readiness and Prometheus metrics."},
    {"name": "gateways", "description": "Gateways: the owners of device TCP connections."},
    {"name": "devices", "description": "Devices, their ports, event log and audit frames."},
]


_DESCRIPTION = """\
The HTTP API of chargegw: gateways and devices with their ports, event log and audit
frames; charging sessions (orders) and device commands; parameters and profiles; firmware
upgrades; cards and rate plans; the cluster's nodes.

**Authentication**: every `/api/v1` request carries `Authorization: Bearer <key>` (a key
from `CHARGEGW_API_KEYS` or `chargegw apikey create`), unless the gateway runs without keys
on 127.0.0.1 only. A key has scopes (`read`, `control`, `billing`, `config`, `admin`) and
may be limited to devices, gateways and client networks: a call it may not make is 403
`forbidden`, with the reason in `message` and `refusal`. Keys may require signed requests
(`x-chargegw-id`, `x-chargegw-timestamp`, `x-chargegw-signature`).

**Errors**: every 4xx and 5xx answer has one shape, `{"error": {"code", "message", "field",
"details"}}`; `code` is stable (`validation_failed`, `not_found`, `conflict`,
`unauthorized`, `database_unavailable` ...). A 503 adds `reason` and `Retry-After`: the
database is unavailable, retry later.

**Lists** answer `{"items": [...], "next_cursor": ...}`; pass `next_cursor` back as
`cursor`. Timestamps are ISO 8601 in UTC.

**Limits**: a body over the gateway's limit (1 MiB by default) is 413
`payload_too_large`; control calls over a key's or the gateway's rate, and any request
from an address after too many failed authentications, are 429 `rate_limited` with
`Retry-After`. Calls that change something are audited (`GET /api/v1/audit/calls`); every
answer carries `X-Request-Id`.
"""


def _bound_integers_in_openapi(app: FastAPI) -> None:
    """The OpenAPI document states the 64-bit range :func:`errors.check_input` enforces."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            errors.bound_integers(schema)
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]


def _paths_overlap(a: str, b: str) -> bool:
    """Whether one request path can match both route paths: segment by segment, equal
    or a parameter on either side (a ``:path`` parameter takes the rest)."""
    left, right = a.strip("/").split("/"), b.strip("/").split("/")
    for x, y in zip(left, right, strict=False):
        if x.endswith(":path}") or y.endswith(":path}"):
            return True
        if x != y and "{" not in x and "{" not in y:
            return False
    return len(left) == len(right)


def match_order(routers: Sequence[APIRouter], read_api: APIRouter) -> list[APIRouter]:
    """The order routes are matched in, one by one: ``routers`` in their order, and the
    read API right after the last of them with a path one of its paths can also match,
    so theirs keeps winning (a literal ``GET /api/v1/devices/registry`` over
    ``/api/v1/devices/{device_id}``), and every router keeps its order with the others.
    The device detail and list, the most frequent calls, are then tried after 47 routes
    rather than after nearly all (83): matching the routes ahead of them was about a third
    of a device detail's time in the application."""
    read_paths = [route.path for route in read_api.routes if isinstance(route, APIRoute)]

    def overlaps(router: APIRouter) -> bool:
        return any(
            not isinstance(route, APIRoute)
            or any(_paths_overlap(route.path, read) for read in read_paths)
            for route in router.routes
        )

    at = max((i + 1 for i, router in enumerate(routers) if overlaps(router)), default=0)
    return [*routers[:at], read_api, *routers[at:]]


def create_app(state: ApiState, routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The read API over ``state``, plus ``routers``, all behind the API-key check.

    Serve it with uvicorn on the host given by :func:`chargegw.domain.auth.effective_http_host`.
    Database unavailability anywhere (``store.errors.is_unavailable``) is a 503 with
    ``Retry-After``, handled, so the server logs no traceback for it. Every error answer
    has the shape of :mod:`chargegw.api.errors`, whose guard refuses input PostgreSQL
    cannot hold before a route runs; ``/docs`` and ``/redoc`` come from the package.
    """
    app = FastAPI(
        title="chargegw HTTP API",
        version=__version__,
        summary="Devices, charging sessions, commands, parameters, firmware and billing of "
        "the chargegw charging-pile gateway",
        description=_DESCRIPTION,
        openapi_tags=_TAGS,
        docs_url=None,
        redoc_url=None,
    )
    app.state.chargegw = state
    app.include_router(health)
    # after the key check, before the route's own validation
    # admit: rate limits of control calls, by the key the check accepted
    protected = [
        Security(require_api_key),
        Depends(guard.admit),
        Depends(errors.check_input),
    ]
    documented = {
        **_UNAUTHORIZED,
        **_FORBIDDEN,
        **error_responses(422),
        **_UNAVAILABLE,
        **guard.RESPONSES,
    }
    for router in match_order(routers, devices.router):
        app.include_router(router, dependencies=protected, responses=documented)
    add_docs(app)
    _bound_integers_in_openapi(app)
    errors.install(app)
    app.add_exception_handler(DatabaseUnavailableError, _database_unavailable)
    # by class, not as the catch-all Exception handler: Starlette re-raises what that
    # one handles, and uvicorn logs it with a traceback
    for error in store_errors.DB_ERRORS:
        if issubclass(error, Exception):
            app.add_exception_handler(error, _database_error)
    app.add_exception_handler(503, _service_unavailable)
    app.add_middleware(_DatabaseRecovery)
    guard.install(app)  # body sizes, failed authentications, the call audit: outermost
    return app
