"""API keys: the bearer check on the API, stored keys, the no-key mode and the CLI."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import asyncpg
import httpx
import pytest
from click.testing import CliRunner, Result
from fastapi import APIRouter

from chargegw.api.app import ApiState, create_app
from chargegw.cli import main
from chargegw.domain import auth
from chargegw.domain.refusals import InvalidError
from chargegw.metrics import Metrics

CONFIGURED = "configured-key-0123456789abcdef"


def _unauthorized(message: str, refusal: str) -> dict[str, Any]:
    return {
        "error": {
            "code": "unauthorized",
            "message": message,
            "field": None,
            "details": [],
            "refusal": refusal,
        }
    }


MISSING = _unauthorized("missing API key: send Authorization: Bearer <key>", "missing_key")
UNKNOWN = _unauthorized("invalid API key", "unknown_key")
REVOKED = _unauthorized("API key revoked", "key_revoked")


def _unavailable(reason: str) -> dict[str, Any]:
    return {
        "error": {
            "code": "database_unavailable",
            "message": "database unavailable",
            "field": None,
            "details": [],
            "reason": reason,
        }
    }


NO_POOL = _unavailable("no database pool")
DATA_URLS = [
    "/api/v1/gateways",
    "/api/v1/devices",
    "/api/v1/devices/04CEAA40",
    "/api/v1/devices/04CEAA40/events",
    "/api/v1/devices/04CEAA40/frames",
]
EXTRA_URLS = ["/api/v1/extra/ping", "/admin/ping"]

extra = APIRouter(prefix="/api/v1/extra")
admin = APIRouter(prefix="/admin")


@extra.get("/ping")
async def extra_ping() -> dict[str, str]:
    return {"pong": "extra"}


@admin.get("/ping")
async def admin_ping() -> dict[str, str]:
    return {"pong": "admin"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _all_ready() -> dict[str, bool]:
    return {"database": True, "listener": True}


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _state(pool: asyncpg.Pool | None, **fields: object) -> ApiState:
    return ApiState(
        pool=pool,
        metrics=Metrics(),
        readiness=_all_ready,
        api_keys=frozenset({CONFIGURED}),
        **fields,  # type: ignore[arg-type]
    )


def _client(state: ApiState) -> httpx.AsyncClient:
    app = create_app(state, routers=[extra, admin])
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def state(db_pool: asyncpg.Pool, clock: Clock) -> ApiState:
    return _state(db_pool, key_cache=auth.KeyCache(ttl_s=60, clock=clock))


@pytest.fixture
async def client(state: ApiState) -> AsyncIterator[httpx.AsyncClient]:
    async with _client(state) as c:
        yield c


async def _create(pool: asyncpg.Pool, name: str = "ops") -> tuple[int, str]:
    async with pool.acquire() as conn:
        return await auth.create_key(conn, name)


# ---------------------------------------------------------------- rejected


@pytest.mark.parametrize("url", DATA_URLS + EXTRA_URLS)
@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, MISSING),
        (_bearer("wrong-key"), UNKNOWN),
        (_bearer(CONFIGURED + "x"), UNKNOWN),
        ({"Authorization": CONFIGURED}, MISSING),
        ({"Authorization": f"Basic {CONFIGURED}"}, MISSING),
        ({"Authorization": "Bearer "}, MISSING),
    ],
    ids=["none", "wrong", "longer", "no-scheme", "basic", "empty"],
)
async def test_without_a_valid_key_is_401(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], expected: dict[str, Any]
) -> None:
    response = await client.get(url, headers=headers)
    assert response.status_code == 401
    assert response.json() == expected
    assert response.headers["www-authenticate"] == "Bearer"


async def test_an_overlong_key_is_rejected_without_a_lookup(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/devices", headers=_bearer("k" * 10_000))
    assert response.status_code == 401


# ---------------------------------------------------------------- accepted


@pytest.mark.parametrize("url", ["/api/v1/gateways", "/api/v1/devices", *EXTRA_URLS])
async def test_a_configured_key_is_accepted(client: httpx.AsyncClient, url: str) -> None:
    response = await client.get(url, headers=_bearer(CONFIGURED))
    assert response.status_code == 200


async def test_a_configured_key_reaches_the_endpoint(client: httpx.AsyncClient) -> None:
    # past the check, the endpoint answers as usual (404 for an unknown device)
    response = await client.get("/api/v1/devices/04CEAA40", headers=_bearer(CONFIGURED))
    assert response.status_code == 404


async def test_a_stored_key_is_accepted_and_its_use_recorded(
    client: httpx.AsyncClient, db_pool: asyncpg.Pool
) -> None:
    key_id, key = await _create(db_pool)
    assert key.startswith(auth.KEY_PREFIX) and len(key) > 40
    for url in ("/api/v1/devices", "/admin/ping"):
        assert (await client.get(url, headers=_bearer(key))).status_code == 200
    row = await db_pool.fetchrow("SELECT * FROM api_keys WHERE key_id = $1", key_id)
    assert row is not None
    assert row["key_hash"] == auth.hash_key(key) and key not in row["key_hash"]
    assert row["last_used_at"] is not None


async def test_a_revoked_key_stops_working_within_a_second_without_a_listener(
    client: httpx.AsyncClient, state: ApiState, db_pool: asyncpg.Pool, clock: Clock
) -> None:
    # nothing listens for key changes here: cached keys are trusted for a second only
    key_id, key = await _create(db_pool)
    assert (await client.get("/api/v1/devices", headers=_bearer(key))).status_code == 200
    async with db_pool.acquire() as conn:
        assert await auth.revoke_key(conn, key_id) is True
        assert await auth.revoke_key(conn, key_id) is False
    clock.now += 0.9  # still cached
    assert (await client.get("/api/v1/devices", headers=_bearer(key))).status_code == 200
    clock.now += 0.2
    response = await client.get("/api/v1/devices", headers=_bearer(key))
    assert (response.status_code, response.json()) == (401, REVOKED)
    # and a fresh cache never accepts it
    state.key_cache.clear()
    assert (await client.get("/api/v1/devices", headers=_bearer(key))).status_code == 401


async def test_a_listening_cache_keeps_keys_until_told_of_a_change(
    client: httpx.AsyncClient, state: ApiState, db_pool: asyncpg.Pool, clock: Clock
) -> None:
    # what a KeyListener does on a notification (test_api_keys.py runs the real one)
    state.key_cache.listening = True
    key_id, key = await _create(db_pool)
    assert (await client.get("/api/v1/devices", headers=_bearer(key))).status_code == 200
    async with db_pool.acquire() as conn:
        await auth.revoke_key(conn, key_id)
    clock.now += 30
    assert (await client.get("/api/v1/devices", headers=_bearer(key))).status_code == 200
    state.key_cache.forget(key_id)
    response = await client.get("/api/v1/devices", headers=_bearer(key))
    assert (response.status_code, response.json()) == (401, REVOKED)


async def test_a_key_revoked_before_first_use_is_rejected_at_once(
    client: httpx.AsyncClient, db_pool: asyncpg.Pool
) -> None:
    key_id, key = await _create(db_pool)
    async with db_pool.acquire() as conn:
        await auth.revoke_key(conn, key_id)
    assert (await client.get("/api/v1/devices", headers=_bearer(key))).status_code == 401


# ---------------------------------------------------------------- open paths, modes


@pytest.mark.parametrize(
    "url", ["/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/redoc"]
)
async def test_health_metrics_and_docs_need_no_key(client: httpx.AsyncClient, url: str) -> None:
    assert (await client.get(url)).status_code == 200


async def test_openapi_documents_the_bearer_scheme(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    scheme = spec["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for path in ("/api/v1/gateways", "/api/v1/devices/{device_id}/frames", "/admin/ping"):
        operation = spec["paths"][path]["get"]
        assert operation["security"] == [{"bearerAuth": []}]
        assert "401" in operation["responses"]
    for path in ("/healthz", "/readyz", "/metrics"):
        assert "security" not in spec["paths"][path]["get"]


async def test_without_auth_required_requests_need_no_key(db_pool: asyncpg.Pool) -> None:
    state = ApiState(pool=db_pool, metrics=Metrics(), readiness=_all_ready, auth_required=False)
    async with _client(state) as client:
        for url in ["/api/v1/gateways", *EXTRA_URLS]:
            assert (await client.get(url)).status_code == 200
        assert (await client.get("/api/v1/devices", headers=_bearer("any"))).status_code == 200


async def test_auth_is_required_by_default(db_pool: asyncpg.Pool) -> None:
    state = ApiState(pool=db_pool, metrics=Metrics(), readiness=_all_ready)
    async with _client(state) as client:
        assert (await client.get("/api/v1/devices")).status_code == 401
        assert (await client.get("/api/v1/devices", headers=_bearer("x"))).status_code == 401


async def test_without_a_database(clock: Clock) -> None:
    state = _state(None, key_cache=auth.KeyCache(clock=clock))
    async with _client(state) as client:
        # a configured key passes the check; the endpoint then needs the database
        response = await client.get("/api/v1/devices", headers=_bearer(CONFIGURED))
        assert (response.status_code, response.json()) == (503, NO_POOL)
        assert (await client.get("/admin/ping", headers=_bearer(CONFIGURED))).status_code == 200
        # no key at all is still 401; an unknown key might be a stored one: 503
        assert (await client.get("/admin/ping")).status_code == 401
        response = await client.get("/admin/ping", headers=_bearer("cgw_unknown"))
        assert (response.status_code, response.json()) == (503, NO_POOL)


async def test_unreachable_database_during_a_lookup_is_503() -> None:
    pool = await asyncpg.create_pool("postgresql://postgres@127.0.0.1:1/x", min_size=0)
    try:
        async with _client(_state(pool)) as client:
            response = await client.get("/admin/ping", headers=_bearer("cgw_unknown"))
            assert (response.status_code, response.json()) == (
                503,
                _unavailable("cannot connect to the database"),
            )
            assert (await client.get("/admin/ping", headers=_bearer(CONFIGURED))).status_code == 200
    finally:
        await pool.close()


# ---------------------------------------------------------------- auth.py


async def test_auth_mode(db_pool: asyncpg.Pool) -> None:
    assert await auth.auth_mode("", db_pool) is False
    assert await auth.auth_mode(" , ", db_pool) is False
    assert await auth.auth_mode("k1,k2", db_pool) is True
    assert await auth.auth_mode(frozenset({"k1"}), db_pool) is True
    key_id, _ = await _create(db_pool)
    assert await auth.auth_mode("", db_pool) is True
    async with db_pool.acquire() as conn:
        await auth.revoke_key(conn, key_id)
    assert await auth.auth_mode(None, db_pool) is False


@pytest.mark.parametrize(
    ("host", "auth_required", "effective", "warned"),
    [
        ("0.0.0.0", True, "0.0.0.0", False),
        ("10.1.2.3", True, "10.1.2.3", False),
        ("127.0.0.1", False, "127.0.0.1", True),
        ("127.0.0.2", False, "127.0.0.2", True),
        ("localhost", False, "localhost", True),
        ("::1", False, "::1", True),
        ("0.0.0.0", False, "127.0.0.1", True),
        ("::", False, "127.0.0.1", True),
        ("10.1.2.3", False, "127.0.0.1", True),
        ("gw.example.net", False, "127.0.0.1", True),
        ("", False, "127.0.0.1", True),
    ],
)
def test_effective_http_host(host: str, auth_required: bool, effective: str, warned: bool) -> None:
    bound, warning = auth.effective_http_host(host, auth_required)
    assert bound == effective
    if not warned:
        assert warning is None
        return
    assert warning is not None and warning.startswith(auth.NO_KEYS_WARNING)
    assert ("ignored" in warning) == (effective != host)


def test_configured_keys_come_from_settings_when_it_has_them() -> None:
    assert auth.configured_keys(SimpleNamespace(api_keys=" a , b,,a ")) == {"a", "b"}
    assert auth.configured_keys(SimpleNamespace(api_keys="")) == frozenset()
    assert auth.configured_keys(SimpleNamespace()) == frozenset()


def test_key_cache_is_bounded_and_expires() -> None:
    clock = Clock()
    cache = auth.KeyCache(ttl_s=10, max_entries=3, clock=clock)
    cache.listening = True
    infos = {name: auth.ApiKeyInfo(name, name, auth.ALL_SCOPES) for name in "abcd"}
    for name, info in infos.items():
        cache.add(name, info)
    assert len(cache) == 3 and cache.get("a") is None and cache.get("d") == infos["d"]
    clock.now += 10
    assert cache.get("d") is None and len(cache) == 2
    # a key's own expiry ends its entry, and so does losing the listener (1 s)
    cache.add("e", infos["a"], expires_in_s=2)
    cache.add("f", infos["b"])
    clock.now += 2
    assert cache.get("e") is None and cache.get("f") == infos["b"]
    cache.listening = False
    assert cache.get("f") is None
    # a lookup that began before an invalidation is not cached
    generation = cache.generation
    cache.clear()
    cache.add("g", infos["c"], generation=generation)
    assert cache.get("g") is None


async def test_list_keys_shows_no_secrets(db_pool: asyncpg.Pool) -> None:
    first, key = await _create(db_pool, "ops")
    second, _ = await _create(db_pool, "  billing  ")
    async with db_pool.acquire() as conn:
        await auth.revoke_key(conn, first)
        keys = await auth.list_keys(conn)
        with pytest.raises(InvalidError, match="name"):
            await auth.create_key(conn, "  ")
    assert [(k.key_id, k.name, k.active) for k in keys] == [
        (first, "ops", False),
        (second, "billing", True),
    ]
    assert all(key not in repr(k) and "sha256" not in repr(k) for k in keys)


# ---------------------------------------------------------------- CLI


async def _cli(*args: str) -> Result:
    # the commands run their own event loop: keep them off the test's
    return await asyncio.to_thread(CliRunner().invoke, main, ["apikey", *args])


async def test_cli_create_list_revoke(db_dsn: str, db_pool: asyncpg.Pool) -> None:
    created = await _cli("create", "--name", "ci", "--dsn", db_dsn)
    assert created.exit_code == 0, created.output
    key = created.stdout.strip()
    assert key.startswith(auth.KEY_PREFIX) and "\n" not in key
    assert "not shown again" in created.stderr
    assert await auth.verify(db_pool, (), key, cache=auth.KeyCache()) is True

    listed = await _cli("list", "--dsn", db_dsn)
    assert listed.exit_code == 0, listed.output
    lines = listed.stdout.splitlines()
    assert lines[0].split() == [
        "KEY_ID",
        "NAME",
        "PREFIX",
        "SCOPES",
        "LIMITS",
        "CREATED",
        "LAST_USED",
        "EXPIRES",
        "STATUS",
    ]
    assert lines[1].split()[:4] == ["1", "ci", key[:8], "admin"] and lines[1].endswith("active")
    assert key not in listed.output and "sha256" not in listed.output

    revoked = await _cli("revoke", "1", "--dsn", db_dsn)
    assert revoked.exit_code == 0, revoked.output
    assert await auth.verify(db_pool, (), key, cache=auth.KeyCache()) is False
    assert "revoked" in (await _cli("list", "--dsn", db_dsn)).stdout.splitlines()[1]

    again = await _cli("revoke", "1", "--dsn", db_dsn)
    assert again.exit_code == 1 and "no active API key 1" in again.stderr
    unknown = await _cli("revoke", "99", "--dsn", db_dsn)
    assert unknown.exit_code == 1


async def test_cli_create_migrates_a_fresh_database(empty_db_dsn: str) -> None:
    created = await _cli("create", "--name", "first", "--dsn", empty_db_dsn)
    assert created.exit_code == 0, created.output
    listed = await _cli("list", "--dsn", empty_db_dsn)
    assert "first" in listed.stdout


async def test_cli_list_empty_and_errors(db_dsn: str) -> None:
    empty = await _cli("list", "--dsn", db_dsn)
    assert empty.exit_code == 0 and empty.stdout == "" and "no API keys" in empty.stderr
    blank = await _cli("create", "--name", " ", "--dsn", db_dsn)
    assert blank.exit_code == 1 and "needs a name" in blank.stderr
    missing = await _cli("create", "--dsn", db_dsn)
    assert missing.exit_code == 2
