"""The read API: health, readiness, metrics, gateways, devices, their events and frames.

``create_app(state)`` builds a FastAPI application (OpenAPI at ``/openapi.json``) that only
reads: it queries PostgreSQL through the pool in :class:`ApiState` and never holds state
of its own, so several nodes can serve it side by side.

Conventions shared by every list endpoint:

- ``{"items": [...], "next_cursor": "..."}``; ``next_cursor`` is ``null`` on the last page.
  Pass it back as ``cursor=`` (with the same filters) for the next page. Cursors are opaque
  (URL-safe base64 of the last row's key); a cursor that is not one of ours is a 422.
- Keyset pagination, so pages stay consistent while rows are being added.
- Bad query values are 422 in FastAPI's validation format
  (``{"detail": [{"loc": ["query", "limit"], "msg": ..., ...}]}``).
- Timestamps are ISO 8601 in UTC with a zone; timestamps given without a zone are UTC.
- While the database is unavailable (``store.errors.is_unavailable``: no connection, a
  database not accepting connections, a read-only standby on a write ...) every endpoint,
  the routers passed to ``create_app`` included, answers 503 with ``Retry-After`` and
  ``{"detail": "database unavailable", "reason": "..."}``; the log says so once per change
  of state (:class:`DatabaseStatus`), not once per request.

Authentication: every ``/api/v1`` endpoint, and every router passed to ``create_app``,
requires ``Authorization: Bearer <key>`` (see :mod:`chargegw.domain.auth`); without a valid key
the answer is 401 ``{"detail": "missing or invalid API key"}`` with
``WWW-Authenticate: Bearer``. ``/healthz``, ``/readyz``, ``/metrics``, ``/openapi.json``
and ``/docs`` stay open. With ``ApiState.auth_required`` false (no key configured or
stored: the gateway then listens on 127.0.0.1 only) requests need no key.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import datetime as dt
import enum
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Annotated, Any

import asyncpg
import structlog
from fastapi import APIRouter, FastAPI, HTTPException, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chargegw import __version__
from chargegw.core import EventKind
from chargegw.domain import auth
from chargegw.metrics import Metrics
from chargegw.store import errors as store_errors

__all__ = ["ApiState", "DatabaseStatus", "create_app", "mask_iccid"]

log = structlog.get_logger("chargegw.api.app")

#: readiness probes must answer fast; a database slower than this counts as down
READY_DB_TIMEOUT_S = 1.0
#: waiting for a pooled connection longer than this means the database is unavailable
ACQUIRE_TIMEOUT_S = 5.0
#: longest a read query may run
QUERY_TIMEOUT_S = 10.0
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
#: frames are kept in daily partitions; a window is at most this long
MAX_FRAMES_WINDOW = dt.timedelta(days=31)
DEFAULT_FRAMES_WINDOW = dt.timedelta(hours=24)

#: seconds a client should wait before retrying a 503
RETRY_AFTER_S = 5
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
    database are accepted too, checked through ``key_cache``. ``auth_required`` false
    lets every request through without a key: only for a gateway listening on loopback.

    ``database`` is what the API last found of the database, for logging its changes.
    """

    pool: asyncpg.Pool | None
    metrics: Metrics
    readiness: Callable[[], dict[str, bool]]
    api_keys: frozenset[str] = frozenset()
    auth_required: bool = True
    key_cache: auth.KeyCache = dataclasses.field(default_factory=auth.KeyCache)
    reasons: Callable[[], dict[str, str]] = _no_reasons
    database: DatabaseStatus = dataclasses.field(default_factory=DatabaseStatus)


class DatabaseUnavailableError(Exception):
    """No pool, or no way to reach the database; served as 503 with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------- response models


class Protocol(str, enum.Enum):
    """The device protocols chargegw speaks."""

    AP3000 = "ap3000"
    BKV = "bkv"


class Direction(str, enum.Enum):
    """A frame received from a device (``in``) or sent to it (``out``)."""

    IN = "in"
    OUT = "out"


class ErrorResponse(BaseModel):
    """An error with a human-readable explanation."""

    detail: str = Field(examples=["device 04CEAA40 not found"])


class UnavailableResponse(BaseModel):
    """The database is unavailable now; retry after ``Retry-After`` seconds."""

    detail: str = Field(examples=["database unavailable"])
    reason: str = Field(examples=["the database does not accept connections now"])


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


class Gateway(BaseModel):
    """A gateway: the owner of one TCP connection (an AP3000 pile or a BKV gateway)."""

    gateway_id: str = Field(examples=["82231214002700"])
    protocol: str = Field(examples=["bkv"])
    online: bool
    iccid: str | None = Field(
        description="SIM ICCID, masked: first 6 and last 4 characters kept",
        examples=["898604**********1234"],
    )
    imei: str | None
    firmware: str | None
    remote_addr: str | None = Field(examples=["203.0.113.7:50122"])
    connected_at: dt.datetime | None
    last_seen_at: dt.datetime | None
    device_count: int = Field(description="devices (sockets, piles) behind this gateway")


class GatewayPage(BaseModel):
    items: list[Gateway]
    next_cursor: str | None


class Device(BaseModel):
    """A charging device, by its canonical chargeproto id."""

    device_id: str = Field(
        description="AP3000: the physical id (`04CEAA40`); BKV: `<gateway_id>-<socket_no>`",
        examples=["04CEAA40"],
    )
    protocol: str = Field(examples=["ap3000"])
    gateway_id: str | None
    phy_id: str | None
    socket_no: int | None
    device_type: int | None
    firmware: str | None
    port_count: int | None
    online: bool
    offline_reason: str | None
    last_seen_at: dt.datetime | None
    last_heartbeat_at: dt.datetime | None
    signal_strength: int | None
    temperature_c: int | None
    voltage_v: float | None


class DevicePage(BaseModel):
    items: list[Device]
    next_cursor: str | None


class Port(BaseModel):
    """The last reported state of one port."""

    port: int = Field(description="port number, 1-based on both protocols", ge=1)
    status: str = Field(
        description="idle, charging, occupied, full, float, fault or unknown",
        examples=["charging"],
    )
    status_code: int | None = Field(description="the raw status code the device sent")
    status_text: str | None
    power_w: float | None
    voltage_v: float | None
    current_a: float | None
    energy_kwh: float | None
    temperature_c: int | None
    reported_at: dt.datetime


class DeviceDetail(Device):
    ports: list[Port]


class DeviceEvent(BaseModel):
    """One row of a device's event log (online/offline transitions, alarms, ...)."""

    id: int
    at: dt.datetime
    kind: str = Field(examples=["offline"])
    reason: str | None = Field(examples=["heartbeat_timeout"])
    detail: dict[str, Any]


class EventPage(BaseModel):
    items: list[DeviceEvent]
    next_cursor: str | None


class Frame(BaseModel):
    """One frame of the audit log, received from or sent to a device."""

    id: int
    received_at: dt.datetime = Field(description="server time the frame was read or written")
    connection_id: str
    direction: str = Field(examples=["in"])
    protocol: str | None
    command: str | None
    hex: str = Field(description="the frame's bytes; ICCIDs and card numbers masked")
    error: str | None = Field(description="why the frame could not be decoded, if so")


class FramePage(BaseModel):
    items: list[Frame]
    next_cursor: str | None


# ---------------------------------------------------------------- helpers


def mask_iccid(iccid: str | None) -> str | None:
    """Keep the first 6 and last 4 characters, ``*`` between; too short: all ``*``."""
    if iccid is None:
        return None
    if len(iccid) <= 10:
        return "*" * len(iccid)
    return iccid[:6] + "*" * (len(iccid) - 10) + iccid[-4:]


def _invalid(field: str, message: str, value: Any) -> RequestValidationError:
    """A 422 in the same format FastAPI uses for its own validation errors."""
    return RequestValidationError(
        [{"type": "value_error", "loc": ("query", field), "msg": message, "input": value}]
    )


def encode_cursor(kind: str, key: Sequence[Any]) -> str:
    raw = json.dumps({"k": kind, "v": list(key)}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, kind: str, types: Sequence[type]) -> list[Any]:
    """The key in ``cursor``; 422 unless it is a cursor of this endpoint."""
    try:
        raw = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
        data = json.loads(raw)
    except (binascii.Error, ValueError):
        raise _invalid("cursor", "malformed cursor", cursor) from None
    if not isinstance(data, dict) or data.get("k") != kind:
        raise _invalid("cursor", f"not a cursor of this list ({kind})", cursor)
    key = data.get("v")
    if (
        not isinstance(key, list)
        or len(key) != len(types)
        or not all(type(v) is t for v, t in zip(key, types, strict=False))
    ):
        raise _invalid("cursor", "malformed cursor", cursor)
    return key


def _timestamp_key(cursor: str, kind: str) -> tuple[dt.datetime, int]:
    """The (time, id) key of an events or frames cursor."""
    at, row_id = decode_cursor(cursor, kind, (str, int))
    try:
        when = dt.datetime.fromisoformat(at)
    except ValueError:
        raise _invalid("cursor", "malformed cursor", cursor) from None
    if when.tzinfo is None:
        raise _invalid("cursor", "malformed cursor", cursor)
    return when, row_id


def utc(value: dt.datetime | None) -> dt.datetime | None:
    """Timestamps without a zone are UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value


def _json_object(value: Any) -> dict[str, Any]:
    """A jsonb value as a dict, whether or not the pool has a jsonb codec."""
    if isinstance(value, str):
        value = json.loads(value)
    return value if isinstance(value, dict) else {"value": value}


class _Where:
    """Collects ``AND``-ed conditions and their numbered parameters."""

    def __init__(self) -> None:
        self.conditions: list[str] = []
        self.args: list[Any] = []

    def add(self, condition: str, *values: Any) -> None:
        """``condition`` uses ``{}`` placeholders, one per value, filled with ``$n``."""
        numbers = []
        for value in values:
            self.args.append(value)
            numbers.append(f"${len(self.args)}")
        self.conditions.append(condition.format(*numbers))

    def sql(self) -> str:
        return "WHERE " + " AND ".join(self.conditions) if self.conditions else ""

    def limit(self, limit: int) -> str:
        """A LIMIT clause fetching one row more than a page, to know if another follows."""
        self.args.append(limit + 1)
        return f"LIMIT ${len(self.args)}"


def _state(request: Request) -> ApiState:
    state: ApiState = request.app.state.chargegw
    return state


@contextlib.asynccontextmanager
async def _connection(request: Request) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy]:
    """A pooled connection; :class:`DatabaseUnavailableError` without a pool. Database
    errors propagate to the handlers :func:`create_app` installs."""
    pool = _state(request).pool
    if pool is None:
        raise DatabaseUnavailableError(_NO_POOL)
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        yield conn


async def _require_device(conn: asyncpg.pool.PoolConnectionProxy, device_id: str) -> None:
    found = await conn.fetchval(
        "SELECT 1 FROM devices WHERE device_id = $1", device_id, timeout=QUERY_TIMEOUT_S
    )
    if found is None:
        raise HTTPException(404, f"device {device_id} not found")


# ---------------------------------------------------------------- authentication

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearerAuth",
    bearerFormat="cgw_...",
    description="An API key: configured in `CHARGEGW_API_KEYS` or made with "
    "`chargegw apikey create`. Send it as `Authorization: Bearer <key>`.",
)

_UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or invalid API key"}
}


async def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> None:
    """401 unless the request carries a valid ``Authorization: Bearer <key>``."""
    state = _state(request)
    if not state.auth_required:
        return
    presented = credentials.credentials if credentials is not None else None
    # database errors of the lookup are 503 (or 500) through create_app's handlers
    valid = await auth.verify(state.pool, state.api_keys, presented, cache=state.key_cache)
    if not valid and presented and state.pool is None:
        # a stored key cannot be told from a wrong one without the database
        raise DatabaseUnavailableError(_NO_POOL)
    if not valid:
        raise HTTPException(
            401, "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"}
        )


# ---------------------------------------------------------------- endpoints

_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "No such device"}
}
_RETRY_AFTER_HEADER = {
    "Retry-After": {
        "description": f"seconds to wait before retrying ({RETRY_AFTER_S})",
        "schema": {"type": "integer"},
    }
}
_UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {
        "model": UnavailableResponse,
        "description": "The database is unavailable",
        "headers": _RETRY_AFTER_HEADER,
    }
}

Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description=f"page size, at most {MAX_LIMIT}")]
Cursor = Annotated[
    str | None,
    Query(max_length=512, description="`next_cursor` of the previous page"),
]

health = APIRouter(tags=["health"])
data = APIRouter(prefix="/api/v1", responses=_UNAVAILABLE)


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
                read_only = await conn.fetchval("SELECT current_setting('transaction_read_only')")
    except store_errors.DB_ERRORS as exc:
        return store_errors.reason(exc), store_errors.sqlstate(exc) == _READ_ONLY
    if read_only == "on":  # a standby, or default_transaction_read_only: reads alone pass
        return store_errors.reason(asyncpg.exceptions.ReadOnlySQLTransactionError()), True
    return None


@health.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
async def metrics(request: Request) -> Response:
    body, content_type = _state(request).metrics.render()
    return Response(body, media_type=content_type)


@data.get("/gateways", tags=["gateways"], summary="List gateways")
async def list_gateways(
    request: Request,
    *,
    protocol: Protocol | None = None,
    online: bool | None = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> GatewayPage:
    """Gateways ordered by id; ICCIDs are masked."""
    where = _Where()
    if protocol is not None:
        where.add("g.protocol = {}", protocol.value)
    if online is not None:
        where.add("g.online = {}", online)
    if cursor is not None:
        (after,) = decode_cursor(cursor, "gateways", (str,))
        where.add("g.gateway_id > {}", after)
    query = f"""
        SELECT g.gateway_id, g.protocol, g.online, g.iccid, g.imei, g.firmware,
               g.remote_addr, g.connected_at, g.last_seen_at,
               (SELECT count(*) FROM devices d WHERE d.gateway_id = g.gateway_id)
                   AS device_count
          FROM gateways g {where.sql()}
         ORDER BY g.gateway_id {where.limit(limit)}"""
    async with _connection(request) as conn:
        rows = await conn.fetch(query, *where.args, timeout=QUERY_TIMEOUT_S)
    items = [Gateway(**{**dict(r), "iccid": mask_iccid(r["iccid"])}) for r in rows[:limit]]
    next_cursor = encode_cursor("gateways", [items[-1].gateway_id]) if len(rows) > limit else None
    return GatewayPage(items=items, next_cursor=next_cursor)


_DEVICE_COLUMNS = """device_id, protocol, gateway_id, phy_id, socket_no, device_type,
    firmware, port_count, online, offline_reason, last_seen_at, last_heartbeat_at,
    signal_strength, temperature_c, voltage_v"""


@data.get("/devices", tags=["devices"], summary="List devices")
async def list_devices(
    request: Request,
    *,
    protocol: Protocol | None = None,
    online: bool | None = None,
    gateway_id: Annotated[str | None, Query(max_length=64)] = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> DevicePage:
    """Devices ordered by device id, optionally filtered."""
    where = _Where()
    if protocol is not None:
        where.add("protocol = {}", protocol.value)
    if online is not None:
        where.add("online = {}", online)
    if gateway_id is not None:
        where.add("gateway_id = {}", gateway_id)
    if cursor is not None:
        (after,) = decode_cursor(cursor, "devices", (str,))
        where.add("device_id > {}", after)
    query = f"""SELECT {_DEVICE_COLUMNS} FROM devices {where.sql()}
                ORDER BY device_id {where.limit(limit)}"""
    async with _connection(request) as conn:
        rows = await conn.fetch(query, *where.args, timeout=QUERY_TIMEOUT_S)
    items = [Device(**dict(r)) for r in rows[:limit]]
    next_cursor = encode_cursor("devices", [items[-1].device_id]) if len(rows) > limit else None
    return DevicePage(items=items, next_cursor=next_cursor)


@data.get(
    "/devices/{device_id}",
    tags=["devices"],
    summary="One device with its ports",
    responses=_NOT_FOUND,
)
async def get_device(request: Request, device_id: str) -> DeviceDetail:
    async with _connection(request) as conn:
        row = await conn.fetchrow(
            f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = $1",
            device_id,
            timeout=QUERY_TIMEOUT_S,
        )
        if row is None:
            raise HTTPException(404, f"device {device_id} not found")
        ports = await conn.fetch(
            """SELECT port, status, status_code, status_text, power_w, voltage_v, current_a,
                      energy_kwh, temperature_c, reported_at
                 FROM ports WHERE device_id = $1 ORDER BY port""",
            device_id,
            timeout=QUERY_TIMEOUT_S,
        )
    return DeviceDetail(**dict(row), ports=[Port(**dict(p)) for p in ports])


def _check_window(since: dt.datetime | None, until: dt.datetime | None) -> None:
    if since is not None and until is not None and since > until:
        raise _invalid("since", "since is after until", since.isoformat())


@data.get(
    "/devices/{device_id}/events",
    tags=["devices"],
    summary="A device's event log",
    responses=_NOT_FOUND,
)
async def list_events(
    request: Request,
    device_id: str,
    *,
    since: Annotated[dt.datetime | None, Query(description="from this time (inclusive)")] = None,
    until: Annotated[dt.datetime | None, Query(description="before this time")] = None,
    kind: EventKind | None = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> EventPage:
    """Events ordered by (at, id), oldest first; the whole log unless a window is given."""
    since, until = utc(since), utc(until)
    _check_window(since, until)
    where = _Where()
    where.add("device_id = {}", device_id)
    if since is not None:
        where.add("at >= {}", since)
    if until is not None:
        where.add("at < {}", until)
    if kind is not None:
        where.add("kind = {}", kind.value)
    if cursor is not None:
        where.add("(at, id) > ({}, {})", *_timestamp_key(cursor, "events"))
    query = f"""SELECT id, at, kind, reason, detail FROM device_events {where.sql()}
                ORDER BY at, id {where.limit(limit)}"""
    async with _connection(request) as conn:
        await _require_device(conn, device_id)
        rows = await conn.fetch(query, *where.args, timeout=QUERY_TIMEOUT_S)
    items = [DeviceEvent(**{**dict(r), "detail": _json_object(r["detail"])}) for r in rows[:limit]]
    next_cursor = None
    if len(rows) > limit:
        next_cursor = encode_cursor("events", [items[-1].at.isoformat(), items[-1].id])
    return EventPage(items=items, next_cursor=next_cursor)


@data.get(
    "/devices/{device_id}/frames",
    tags=["devices"],
    summary="A device's frames from the audit log",
    responses=_NOT_FOUND,
)
async def list_frames(
    request: Request,
    device_id: str,
    *,
    since: Annotated[
        dt.datetime | None,
        Query(description="from this time (inclusive); default: 24 h before `until`"),
    ] = None,
    until: Annotated[
        dt.datetime | None, Query(description="before this time; default: now")
    ] = None,
    direction: Direction | None = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> FramePage:
    """Frames ordered by (received_at, id), oldest first, within a window of at most
    31 days (the last 24 h by default)."""
    until = utc(until) or dt.datetime.now(dt.UTC)
    since = utc(since) or until - DEFAULT_FRAMES_WINDOW
    _check_window(since, until)
    if until - since > MAX_FRAMES_WINDOW:
        raise _invalid(
            "since", f"the window is longer than {MAX_FRAMES_WINDOW.days} days", since.isoformat()
        )
    where = _Where()
    where.add("device_id = {}", device_id)
    where.add("received_at >= {}", since)
    where.add("received_at < {}", until)
    if direction is not None:
        where.add("direction = {}", direction.value)
    if cursor is not None:
        where.add("(received_at, id) > ({}, {})", *_timestamp_key(cursor, "frames"))
    query = f"""SELECT id, received_at, connection_id, direction, protocol, command, hex, error
                  FROM frames {where.sql()}
                 ORDER BY received_at, id {where.limit(limit)}"""
    async with _connection(request) as conn:
        await _require_device(conn, device_id)
        rows = await conn.fetch(query, *where.args, timeout=QUERY_TIMEOUT_S)
    items = [Frame(**dict(r)) for r in rows[:limit]]
    next_cursor = None
    if len(rows) > limit:
        next_cursor = encode_cursor("frames", [items[-1].received_at.isoformat(), items[-1].id])
    return FramePage(items=items, next_cursor=next_cursor)


def _unavailable(request: Request, reason: str, *, read_only: bool = False) -> JSONResponse:
    """The 503 every database-unavailable request gets; notes the outage for the log."""
    _state(request).database.unavailable(reason, read_only=read_only, path=request.url.path)
    body = {"detail": "database unavailable", "reason": reason}
    return JSONResponse(body, status_code=503, headers=_RETRY_AFTER)


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
    return JSONResponse({"detail": exc.detail}, status_code=503, headers=headers)


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


def create_app(state: ApiState, routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The read API over ``state``, plus ``routers``, all behind the API-key check.

    Serve it with uvicorn on the host given by :func:`chargegw.domain.auth.effective_http_host`.
    Database unavailability anywhere (``store.errors.is_unavailable``) is a 503 with
    ``Retry-After``, handled, so the server logs no traceback for it.
    """
    app = FastAPI(
        title="chargegw",
        version=__version__,
        summary="Read API of the chargegw charging-pile gateway",
        openapi_tags=_TAGS,
    )
    app.state.chargegw = state
    app.include_router(health)
    protected = [Security(require_api_key)]
    for router in (data, *routers):
        app.include_router(
            router, dependencies=protected, responses={**_UNAUTHORIZED, **_UNAVAILABLE}
        )
    app.add_exception_handler(DatabaseUnavailableError, _database_unavailable)
    # by class, not as the catch-all Exception handler: Starlette re-raises what that
    # one handles, and uvicorn logs it with a traceback
    for error in store_errors.DB_ERRORS:
        if issubclass(error, Exception):
            app.add_exception_handler(error, _database_error)
    app.add_exception_handler(503, _service_unavailable)
    app.add_middleware(_DatabaseRecovery)
    return app
