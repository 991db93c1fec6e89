"""The HTTP API while the database is away: every endpoint answers 503 with ``Retry-After``
and a reason (never a 500 with a traceback), ``/readyz`` says why it is not ready, and the
log has one line per change of state, not one per request.

Against a real PostgreSQL: the database stops accepting connections
(:func:`~tests.gw.conftest.database_outage`) or turns read-only, as a standby does after
a failover.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import asyncpg
import httpx
import pytest
import structlog
import uvicorn
from fastapi import APIRouter, FastAPI

from chargegw.api import app as api_module
from chargegw.api.app import ApiState, create_app
from chargegw.api.routers import ROUTERS
from chargegw.app import Gateway
from chargegw.metrics import Metrics

from .conftest import database_outage, read_only_database, settings_for
from .waiting import eventually

DEVICE = "04CEAA40"
CARD = "0A1B2C3D"
START = f"/api/v1/devices/{DEVICE}/ports/1/start"
TOP_UP = f"/api/v1/cards/{CARD}/top-up"
NOT_ACCEPTING = "the database does not accept connections now"
READ_ONLY = "read-only database (a standby after a failover?)"

#: reads through api.py and through each router passed to create_app
READS = [
    "/api/v1/devices",
    f"/api/v1/devices/{DEVICE}",
    f"/api/v1/devices/{DEVICE}/events",
    "/api/v1/orders",
    f"/api/v1/cards/{CARD}",
    "/api/v1/rate-plans",
    "/api/v1/param-profiles",
    "/api/v1/nodes",
    "/api/v1/firmware",
]
#: writes, with the status each answers once the database is back
WRITES: list[tuple[str, str, dict[str, Any], int]] = [
    ("POST", START, {"mode": "full"}, 202),
    ("POST", TOP_UP, {"amount_cent": 100}, 200),
    ("POST", "/api/v1/cards", {"card_id": "0A1B2C3E"}, 201),
    ("PUT", f"/api/v1/devices/{DEVICE}/rate-plan", {"plan": "hourly"}, 200),
]


def _app(state: ApiState, gateway: Gateway) -> FastAPI:
    """``state``'s API with every router the gateway serves."""
    state.services = gateway.api_services()
    return create_app(state, routers=ROUTERS)


def _client(app: FastAPI) -> httpx.AsyncClient:
    """In process. Exceptions the app does not handle are raised here
    (``raise_app_exceptions``), where uvicorn would log a traceback."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@contextlib.asynccontextmanager
async def _served(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client of ``app`` served by uvicorn on a free local port, as ``chargegw serve``
    runs it (its error log propagates to the root logger)."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_config=None, access_log=False, lifespan="off"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started, what="uvicorn started", interval=0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            yield client
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def app(gateway: Gateway) -> FastAPI:
    """The whole API of ``gateway``, without keys, with a device, a card and a rate plan."""
    state = ApiState(
        pool=gateway.pool, metrics=gateway.metrics, readiness=gateway.readiness, auth_required=False
    )
    assert gateway.pool is not None
    await gateway.pool.execute(
        "INSERT INTO devices (device_id, protocol, online, port_count)"
        " VALUES ($1, 'ap3000', true, 10)",
        DEVICE,
    )
    application = _app(state, gateway)
    async with _client(application) as c:
        card = await c.post("/api/v1/cards", json={"card_id": CARD, "balance_cent": 1000})
        assert card.status_code == 201, card.text
        plan = {"name": "hourly", "kind": "per_hour", "parameters": {"cent_per_hour": 100}}
        created = await c.post("/api/v1/rate-plans", json=plan)
        assert created.status_code == 201, created.text
    return application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with _client(app) as c:
        yield c


@pytest.fixture
def api_log(monkeypatch: pytest.MonkeyPatch) -> list[MutableMapping[str, Any]]:
    """What ``chargegw.api.app`` logs during the test, as structlog event dicts.

    A logger of its own rather than ``capture_logs()``: with the CLI's logging set up
    earlier in the session, loggers are cached and would not see capture_logs' processors.
    """
    capture = structlog.testing.LogCapture()
    monkeypatch.setattr(api_module, "log", structlog.wrap_logger(None, processors=[capture]))
    return capture.entries


def assert_unavailable(response: httpx.Response) -> str:
    """A 503 ``database unavailable`` with ``Retry-After``; its reason."""
    where = f"{response.request.method} {response.request.url.path}"
    assert response.status_code == 503, (where, response.status_code, response.text)
    assert int(response.headers["Retry-After"]) > 0, where
    body = response.json()["error"]
    assert set(body) == {"code", "message", "field", "details", "reason"}, (where, body)
    assert body["code"] == "database_unavailable", where
    assert body["message"] == "database unavailable", where
    assert isinstance(body["reason"], str) and body["reason"], where
    reason: str = body["reason"]
    return reason


async def wait_ready(client: httpx.AsyncClient, timeout: float = 15.0) -> None:
    """Until /readyz answers 200 (the gateway's own writer has recovered too)."""
    await eventually(
        lambda: client.get("/readyz"),
        lambda response: response.status_code == 200,
        what="/readyz answering 200",
        timeout=timeout,
    )


def state_changes(entries: list[MutableMapping[str, Any]]) -> list[tuple[str, str]]:
    return [(e["log_level"], e["event"]) for e in entries]


# ---------------------------------------------------------------- not accepting connections


async def test_outage_is_503_with_retry_after_from_every_router(
    client: httpx.AsyncClient, pg_server_dsn: str, db_dsn: str
) -> None:
    async with database_outage(pg_server_dsn, db_dsn):
        reasons = [assert_unavailable(await client.get(url)) for url in READS]
        for method, url, body, _ in WRITES:
            reasons.append(assert_unavailable(await client.request(method, url, json=body)))
        # the first requests may meet connections being terminated; then 55000
        assert reasons[-1] == NOT_ACCEPTING, reasons
        ready = await client.get("/readyz")
    assert ready.status_code == 503
    assert int(ready.headers["Retry-After"]) > 0
    assert ready.json()["ready"] is False
    assert ready.json()["checks"]["database"] is False
    assert ready.json()["reasons"]["database"] == NOT_ACCEPTING

    # the same requests succeed as soon as the database is back
    for url in READS:
        response = await client.get(url)
        assert response.status_code == 200, (url, response.text)
    for method, url, body, status in WRITES:
        response = await client.request(method, url, json=body)
        assert response.status_code == status, (url, response.text)
    await wait_ready(client)
    ready = await client.get("/readyz")
    assert (ready.json()["reasons"], "Retry-After" in ready.headers) == ({}, False)


async def test_one_outage_logs_one_warning_and_one_recovery_without_traceback(
    app: FastAPI,
    api_log: list[MutableMapping[str, Any]],
    caplog: pytest.LogCaptureFixture,
    pg_server_dsn: str,
    db_dsn: str,
) -> None:
    caplog.set_level(logging.INFO)
    async with _served(app) as client:
        for url in READS:
            assert (await client.get(url)).status_code == 200
        assert state_changes(api_log) == []

        async with database_outage(pg_server_dsn, db_dsn):
            for _ in range(5):
                for url in READS:
                    assert_unavailable(await client.get(url))
                for method, url, body, _status in WRITES:
                    assert_unavailable(await client.request(method, url, json=body))
                assert (await client.get("/readyz")).status_code == 503
        assert state_changes(api_log) == [("warning", "database unavailable")]
        assert api_log[0]["reason"]

        # a data request notices first; readiness and later requests add nothing
        for _ in range(3):
            for url in READS:
                assert (await client.get(url)).status_code == 200
        await wait_ready(client)
    assert state_changes(api_log) == [
        ("warning", "database unavailable"),
        ("info", "database available again"),
    ]
    assert api_log[1]["failed_requests"] == 5 * (len(READS) + len(WRITES) + 1)
    for entry in api_log:
        assert not {"exc_info", "exception", "stack"} & set(entry), entry
    # uvicorn logs "Exception in ASGI application" with a traceback for what is not handled
    errors = [
        r
        for r in caplog.records
        if r.name.startswith(("uvicorn", "starlette", "fastapi", "chargegw.api.app"))
        and (r.exc_info or r.levelno >= logging.ERROR)
    ]
    assert errors == []


async def test_readyz_success_ends_the_outage_too(
    client: httpx.AsyncClient,
    api_log: list[MutableMapping[str, Any]],
    pg_server_dsn: str,
    db_dsn: str,
) -> None:
    async with database_outage(pg_server_dsn, db_dsn):
        for _ in range(3):
            assert (await client.get("/readyz")).status_code == 503
    await wait_ready(client)
    assert (await client.get("/api/v1/orders")).status_code == 200
    assert state_changes(api_log) == [
        ("warning", "database unavailable"),
        ("info", "database available again"),
    ]


# ---------------------------------------------------------------- read-only database


async def test_writes_to_a_read_only_database_are_503(
    client: httpx.AsyncClient,
    gateway: Gateway,
    api_log: list[MutableMapping[str, Any]],
    pg_server_dsn: str,
    db_dsn: str,
) -> None:
    assert gateway.pool is not None
    async with read_only_database(pg_server_dsn, db_dsn, gateway.pool):
        for _ in range(3):
            assert assert_unavailable(await client.post(START, json={"mode": "full"})) == READ_ONLY
            top_up = await client.post(TOP_UP, json={"amount_cent": 100})
            assert assert_unavailable(top_up) == READ_ONLY
            # reads still work, and do not count as the database being back
            assert (await client.get("/api/v1/orders")).status_code == 200
            assert (await client.get(f"/api/v1/cards/{CARD}")).status_code == 200
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["reasons"]["database"] == READ_ONLY
    assert state_changes(api_log) == [("warning", "database unavailable")]
    assert api_log[0]["reason"] == READ_ONLY

    started = await client.post(START, json={"mode": "full"})
    assert started.status_code == 202, started.text
    topped = await client.post(TOP_UP, json={"amount_cent": 100})
    assert (topped.status_code, topped.json()["balance_cent"]) == (200, 1100)
    assert state_changes(api_log)[-1] == ("info", "database available again")
    assert len(api_log) == 2


# ---------------------------------------------------------------- no pool, state reasons, bugs


async def test_no_pool_is_503_with_retry_after_in_api_and_routers(
    api_log: list[MutableMapping[str, Any]],
) -> None:
    # a gateway that never started: no pool, its services built but idle
    services = Gateway(settings_for("postgresql://127.0.0.1:1/unused")).api_services()
    state = ApiState(
        pool=None, metrics=Metrics(), readiness=dict, auth_required=False, services=services
    )
    async with _client(create_app(state, routers=ROUTERS)) as client:
        for url in READS:
            assert assert_unavailable(await client.get(url)) == "no database pool"
        for method, url, body, _ in WRITES:
            response = await client.request(method, url, json=body)
            assert assert_unavailable(response) == "no database pool"
        ready = await client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["reasons"] == {"database": "no database pool"}
    assert state_changes(api_log) == [("warning", "database unavailable")]


async def test_readyz_reports_the_reasons_of_the_state(db_pool: asyncpg.Pool) -> None:
    state = ApiState(
        pool=db_pool,
        metrics=Metrics(),
        readiness=lambda: {"database": False, "listener": True},
        reasons=lambda: {"database": "writes held: disk full (53100)"},
    )
    transport = httpx.ASGITransport(app=create_app(state))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        ready = await client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json() == {
        "ready": False,
        "checks": {"database": False, "listener": True},
        "reasons": {"database": "writes held: disk full (53100)"},
    }


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.exceptions.UndefinedColumnError("column x does not exist"),
        asyncpg.exceptions.NumericValueOutOfRangeError("integer out of range"),
        RuntimeError("a bug"),
    ],
    ids=["undefined-column", "row-error", "runtime-error"],
)
async def test_a_bug_is_still_a_500(
    error: Exception, api_log: list[MutableMapping[str, Any]]
) -> None:
    router = APIRouter(prefix="/api/v1")

    @router.get("/broken")
    async def broken() -> None:
        raise error

    state = ApiState(pool=None, metrics=Metrics(), readiness=dict, auth_required=False)
    app = create_app(state, routers=[router])
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/api/v1/broken")
    assert response.status_code == 500
    assert "Retry-After" not in response.headers
    assert api_log == []


async def test_openapi_documents_503_for_every_router(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    for path, method in [
        ("/api/v1/devices", "get"),
        ("/api/v1/devices/{device_id}/ports/{port}/start", "post"),
        ("/api/v1/cards/{card_id}/top-up", "post"),
    ]:
        unavailable = spec["paths"][path][method]["responses"]["503"]
        assert "Retry-After" in unavailable["headers"], path
