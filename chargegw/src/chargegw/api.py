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
- While the database is unavailable the data endpoints answer 503
  ``{"detail": "database unavailable"}``.

Authentication: every ``/api/v1`` endpoint, and every router passed to ``create_app``,
requires ``Authorization: Bearer <key>`` (see :mod:`chargegw.auth`); without a valid key
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
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Annotated, Any

import asyncpg
import structlog
from fastapi import APIRouter, FastAPI, HTTPException, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from chargegw import __version__, auth
from chargegw.core import EventKind
from chargegw.metrics import Metrics

__all__ = ["ApiState", "create_app", "mask_iccid"]

log = structlog.get_logger("chargegw.api")

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

#: errors that mean "the database cannot be reached now", not "the query is wrong"
_DATABASE_DOWN: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
)


@dataclasses.dataclass
class ApiState:
    """What the API reads from; owned by the process that serves it.

    ``pool`` may be ``None`` (or be replaced) while the database is down: it is read on
    every request. ``readiness`` returns named checks such as
    ``{"database": True, "listener": True}``; the process is ready when all are true.

    ``api_keys`` are the configured keys (``CHARGEGW_API_KEYS``); keys stored in the
    database are accepted too, checked through ``key_cache``. ``auth_required`` false
    lets every request through without a key: only for a gateway listening on loopback.
    """

    pool: asyncpg.Pool | None
    metrics: Metrics
    readiness: Callable[[], dict[str, bool]]
    api_keys: frozenset[str] = frozenset()
    auth_required: bool = True
    key_cache: auth.KeyCache = dataclasses.field(default_factory=auth.KeyCache)


class DatabaseUnavailableError(Exception):
    """No pool, or the database did not answer; served as 503."""


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


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, bool] = Field(examples=[{"database": True, "listener": True}])


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
    """A pooled connection; :class:`DatabaseUnavailableError` when there is none to be had."""
    pool = _state(request).pool
    if pool is None:
        raise DatabaseUnavailableError("no database pool")
    try:
        async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
            yield conn
    except _DATABASE_DOWN as exc:
        log.warning("database unavailable", path=request.url.path, error=repr(exc))
        raise DatabaseUnavailableError(str(exc)) from exc


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
    try:
        valid = await auth.verify(state.pool, state.api_keys, presented, cache=state.key_cache)
    except _DATABASE_DOWN as exc:
        log.warning("database unavailable for a key lookup", error=repr(exc))
        raise DatabaseUnavailableError(str(exc)) from exc
    if not valid and presented and state.pool is None:
        # a stored key cannot be told from a wrong one without the database
        raise DatabaseUnavailableError("no database pool")
    if not valid:
        raise HTTPException(
            401, "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"}
        )


# ---------------------------------------------------------------- endpoints

_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "No such device"}
}
_UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorResponse, "description": "The database is unavailable"}
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
    responses={503: {"model": Readiness, "description": "Not ready"}},
)
async def readyz(request: Request) -> JSONResponse:
    state = _state(request)
    checks = dict(state.readiness())
    database_ok = False
    if state.pool is not None:
        try:
            async with asyncio.timeout(READY_DB_TIMEOUT_S):
                async with state.pool.acquire() as conn:
                    database_ok = await conn.fetchval("SELECT 1") == 1
        except _DATABASE_DOWN as exc:
            log.info("readiness: database check failed", error=repr(exc))
    checks["database"] = checks.get("database", True) and database_ok
    ready = all(checks.values())
    body = Readiness(ready=ready, checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


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


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": "database unavailable"}, status_code=503)


_TAGS = [
    {"name": "health", "description": "Liveness, readiness and Prometheus metrics."},
    {"name": "gateways", "description": "Gateways: the owners of device TCP connections."},
    {"name": "devices", "description": "Devices, their ports, event log and audit frames."},
]


def create_app(state: ApiState, routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The read API over ``state``, plus ``routers``, all behind the API-key check.

    Serve it with uvicorn on the host given by :func:`chargegw.auth.effective_http_host`.
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
        app.include_router(router, dependencies=protected, responses=_UNAUTHORIZED)
    app.add_exception_handler(DatabaseUnavailableError, _database_unavailable)
    return app
