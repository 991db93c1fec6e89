"""API keys fit for partners, over real HTTP: scopes, limits on devices, gateways and
networks, expiry, rotation, revocation across two gateways, signed requests, the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from click.testing import CliRunner, Result
from fastapi import APIRouter, Request
from standardwebhooks import Webhook

from chargegw.api import scopes
from chargegw.api.app import ApiState, create_app
from chargegw.api.routers import ROUTERS
from chargegw.app import Gateway
from chargegw.cli import main
from chargegw.domain import auth
from chargegw.metrics import Metrics

from .conftest import database_outage, settings_for
from .waiting import eventually, free_port

ADMIN = "configured-admin-key-0123456789abcdef"


# ---------------------------------------------------------------- helpers


@contextlib.asynccontextmanager
async def serving(dsn: str, node: str = "keys") -> AsyncIterator[tuple[Gateway, str]]:
    """A gateway with its HTTP API on a free port (a configured admin key), and its URL."""
    port = free_port()
    gateway = Gateway(settings_for(dsn, http_port=port, api_keys=ADMIN, node=node))
    await gateway.start()
    try:
        await eventually(lambda: gateway.api_state.key_cache.listening, what="key listener up")
        yield gateway, f"http://127.0.0.1:{port}"
    finally:
        await gateway.stop()


@pytest.fixture
async def base(db_dsn: str) -> AsyncIterator[str]:
    async with serving(db_dsn) as (_, url):
        yield url


@pytest.fixture
async def admin(base: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base, headers=_bearer(ADMIN)) as client:
        yield client


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _create(admin: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    fields.setdefault("name", "partner")
    response = await admin.post("/api/v1/api-keys", json=fields)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def _refusal(response: httpx.Response) -> tuple[int, str, str]:
    error = response.json()["error"]
    return response.status_code, error.get("refusal", ""), error["message"]


# ---------------------------------------------------------------- the scope table


def _api_routes() -> list[tuple[str, str]]:
    app = create_app(ApiState(pool=None, metrics=Metrics(), readiness=dict), routers=ROUTERS)
    spec = app.openapi()
    return [
        (method.upper(), path)
        for path, operations in spec["paths"].items()
        if path.startswith("/api/")
        for method in operations
    ]


def test_every_route_of_the_openapi_document_has_a_listed_scope() -> None:
    routes = _api_routes()
    assert len(routes) > 40
    unlisted = [r for r in routes if not scopes.rule_for(*r).listed]
    assert unlisted == []


@pytest.mark.parametrize(
    ("method", "path", "scope"),
    [
        ("GET", "/api/v1/devices", "read"),
        ("HEAD", "/api/v1/devices/{device_id}", "read"),
        ("GET", "/api/v1/events/stream", "read"),
        ("GET", "/api/v1/devices/registry", "admin"),
        ("POST", "/api/v1/devices/registry", "admin"),
        ("DELETE", "/api/v1/devices/registry/{device_id}", "admin"),
        ("POST", "/api/v1/devices/{device_id}/ports/{port}/start", "control"),
        ("POST", "/api/v1/devices/{device_id}/commands", "control"),
        ("POST", "/api/v1/orders/{order_no}/cancel", "control"),
        ("GET", "/api/v1/orders/{order_no}", "read"),
        ("GET", "/api/v1/cards/{card_id}", "billing"),
        ("GET", "/api/v1/rate-plans", "billing"),
        ("GET", "/api/v1/devices/{device_id}/rate-plan", "billing"),
        ("GET", "/api/v1/reports/reconciliation", "billing"),
        ("POST", "/api/v1/cards/{card_id}/top-up", "billing"),
        ("PUT", "/api/v1/devices/{device_id}/params", "config"),
        ("GET", "/api/v1/devices/{device_id}/params", "read"),
        ("POST", "/api/v1/firmware", "config"),
        ("POST", "/api/v1/upgrade-jobs/{job_id}/cancel", "config"),
        ("GET", "/api/v1/api-keys", "admin"),
        ("GET", "/api/v1/audit/calls", "admin"),
        ("GET", "/api/v1/webhooks", "admin"),
        ("DELETE", "/api/v1/bans/{device_id}", "admin"),
        ("POST", "/api/v1/nodes/rebalance", "admin"),
        # not in the table: reads need read, anything else admin
        ("GET", "/elsewhere", "read"),
        ("POST", "/api/v1/something-new", "admin"),
        ("PATCH", "/elsewhere", "admin"),
    ],
)
def test_scope_rules(method: str, path: str, scope: str) -> None:
    assert scopes.rule_for(method, path).scope == scope


# ---------------------------------------------------------------- scopes over HTTP

# (method, path, body, scope): every call is harmless when allowed (a 404, a dry run)
CALLS: list[tuple[str, str, Any, str]] = [
    ("GET", "/api/v1/devices", None, "read"),
    ("POST", "/api/v1/devices/NOPE0001/ports/1/start", {"mode": "full"}, "control"),
    ("GET", "/api/v1/rate-plans", None, "billing"),
    ("GET", "/api/v1/cards/0A0B0C0D", None, "billing"),
    ("PUT", "/api/v1/devices/NOPE0001/params", {"groups": {}}, "config"),
    ("POST", "/api/v1/nodes/rebalance", {"dry_run": True}, "admin"),
    ("GET", "/api/v1/api-keys", None, "admin"),
]


async def test_each_scope_allows_its_calls_and_refuses_the_others(
    admin: httpx.AsyncClient, base: str
) -> None:
    keys = {
        scope: (await _create(admin, name=scope, scopes=[scope]))["key"]
        for scope in ("read", "control", "billing", "config", "admin")
    }
    async with httpx.AsyncClient(base_url=base) as client:
        for held, key in keys.items():
            for method, path, body, needed in CALLS:
                response = await client.request(method, path, json=body, headers=_bearer(key))
                if held in (needed, "admin"):
                    assert response.status_code != 403, (held, method, path, response.text)
                    assert response.status_code < 500, (held, method, path, response.text)
                else:
                    assert _refusal(response) == (403, "scope", f"this call needs scope {needed}")
                    assert response.json()["error"]["code"] == "forbidden"
    # the refusals are counted by reason
    metrics = (await admin.get("/metrics")).text
    assert 'chargegw_api_auth_refused_total{reason="scope"} 23.0' in metrics


async def test_key_lifecycle_over_the_api(admin: httpx.AsyncClient, base: str) -> None:
    created = await _create(
        admin,
        name="billing app",
        scopes=["read", "billing", "read"],
        allowed_networks=["127.0.0.1", "10.0.0.0/8"],
        expires_in_s=3600,
    )
    key = created["key"]
    assert key.startswith("cgw_") and created["prefix"] == key[:8]
    assert sorted(created["scopes"]) == ["billing", "read"]
    assert created["allowed_networks"] == ["127.0.0.1/32", "10.0.0.0/8"]
    assert created["status"] == "active" and created["expires_at"] is not None
    key_id = created["key_id"]
    # listed and shown without the key
    one = await admin.get(f"/api/v1/api-keys/{key_id}")
    assert one.status_code == 200 and "key" not in one.json() and key not in one.text
    page = (await admin.get("/api/v1/api-keys", params={"limit": 1})).json()
    assert len(page["items"]) == 1 and page["next_cursor"] is None
    # the key works, and its use is recorded
    async with httpx.AsyncClient(base_url=base, headers=_bearer(key)) as partner:
        assert (await partner.get("/api/v1/rate-plans")).status_code == 200
        refused = await partner.get("/api/v1/api-keys")
        assert _refusal(refused)[:2] == (403, "scope")
    assert (await admin.get(f"/api/v1/api-keys/{key_id}")).json()["last_used_at"] is not None
    # revoked (DELETE and POST .../revoke alike; again changes nothing)
    revoked = await admin.delete(f"/api/v1/api-keys/{key_id}")
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    again = await admin.post(f"/api/v1/api-keys/{key_id}/revoke")
    assert again.json()["revoked_at"] == revoked.json()["revoked_at"]
    async with httpx.AsyncClient(base_url=base, headers=_bearer(key)) as partner:
        response = await eventually(
            lambda: partner.get("/api/v1/rate-plans"), lambda r: r.status_code == 401
        )
        assert _refusal(response) == (401, "key_revoked", "API key revoked")
        assert response.headers["www-authenticate"] == "Bearer"
    # unknown keys
    assert (await admin.get("/api/v1/api-keys/999")).status_code == 404
    assert (await admin.post("/api/v1/api-keys/999/revoke")).status_code == 404
    assert (await admin.post("/api/v1/api-keys/999/rotate", json={})).status_code == 404


BAD_KEYS: list[tuple[dict[str, Any], str | None]] = [
    ({"scopes": ["read", "owner"]}, "scopes.1"),
    ({"scopes": []}, "scopes"),
    ({"scopes": ["read"], "allowed_networks": ["10.0.0.1/8"]}, "allowed_networks"),
    ({"scopes": ["read"], "allowed_networks": ["ten"]}, "allowed_networks"),
    ({"scopes": ["read"], "allowed_networks": []}, "allowed_networks"),
    ({"scopes": ["read"], "allowed_device_ids": []}, "allowed_device_ids"),
    ({"scopes": ["read"], "expires_in_s": 0}, "expires_in_s"),
    ({"scopes": ["read"], "expires_in_s": 60, "expires_at": "2099-01-01T00:00:00Z"}, None),
    ({"scopes": ["read"], "expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
    ({"scopes": ["read"], "name": "   "}, "name"),
    ({"scopes": ["read"], "hmac_required": 1}, "hmac_required"),
    ({"scopes": ["read"], "owner": "me"}, "owner"),
]


async def test_bad_keys_are_422_naming_the_field(admin: httpx.AsyncClient) -> None:
    for fields, field in BAD_KEYS:
        response = await admin.post("/api/v1/api-keys", json={"name": "x", **fields})
        assert response.status_code == 422, (fields, response.text)
        error = response.json()["error"]
        if field is not None:
            assert error["field"] == field, (fields, error)
        else:
            assert "not both" in error["message"]
    assert (await admin.get("/api/v1/api-keys")).json()["items"] == []


# ---------------------------------------------------------------- expiry and rotation


async def test_a_key_stops_at_its_expiry(admin: httpx.AsyncClient, base: str) -> None:
    key = (await _create(admin, scopes=["read"], expires_in_s=1.5))["key"]
    async with httpx.AsyncClient(base_url=base, headers=_bearer(key)) as partner:
        assert (await partner.get("/api/v1/devices")).status_code == 200  # cached now
        response = await eventually(
            lambda: partner.get("/api/v1/devices"), lambda r: r.status_code == 401, timeout=5
        )
    assert _refusal(response) == (401, "key_expired", "API key expired")


async def test_rotation_keeps_both_keys_working_for_the_overlap(
    admin: httpx.AsyncClient, base: str
) -> None:
    old = await _create(admin, scopes=["read", "control"], allowed_device_ids=["04000001"])
    rotated = await admin.post(f"/api/v1/api-keys/{old['key_id']}/rotate", json={"overlap_s": 2})
    assert rotated.status_code == 201, rotated.text
    new = rotated.json()
    assert rotated.headers["cache-control"] == "no-store"
    assert new["key"] != old["key"] and new["rotated_from"] == old["key_id"]
    assert (new["scopes"], new["allowed_device_ids"]) == (old["scopes"], ["04000001"])
    assert new["expires_at"] is None and new["previous_expires_at"] is not None
    listed = (await admin.get(f"/api/v1/api-keys/{old['key_id']}")).json()
    assert listed["expires_at"] == new["previous_expires_at"]
    async with httpx.AsyncClient(base_url=base) as client:

        async def statuses() -> tuple[int, int]:
            url = "/api/v1/devices/04000001"
            old_answer = await client.get(url, headers=_bearer(old["key"]))
            new_answer = await client.get(url, headers=_bearer(new["key"]))
            return old_answer.status_code, new_answer.status_code

        assert await statuses() == (404, 404)  # both pass the check (no such device yet)
        await eventually(statuses, lambda s: s == (401, 404), what="the old key expiring")
    # an expired key is not rotated again
    again = await admin.post(f"/api/v1/api-keys/{old['key_id']}/rotate", json={"overlap_s": 0})
    assert again.status_code == 409
    assert (await admin.post(f"/api/v1/api-keys/{new['key_id']}/rotate")).status_code == 201


# ---------------------------------------------------------------- revocation, two gateways


async def test_revocation_and_replays_reach_every_gateway(db_dsn: str) -> None:
    async with (
        serving(db_dsn, "a") as (_, url_a),
        serving(db_dsn, "b") as (_, url_b),
        httpx.AsyncClient(base_url=url_a) as a,
        httpx.AsyncClient(base_url=url_b) as b,
    ):
        created = await a.post(
            "/api/v1/api-keys",
            json={"name": "partner", "scopes": ["read"]},
            headers=_bearer(ADMIN),
        )
        key, key_id = created.json()["key"], created.json()["key_id"]
        for client in (a, b):  # cached on both now
            assert (await client.get("/api/v1/devices", headers=_bearer(key))).is_success
        revoked = await b.post(f"/api/v1/api-keys/{key_id}/revoke", headers=_bearer(ADMIN))
        assert revoked.status_code == 200
        started = time.monotonic()
        response = await eventually(
            lambda: a.get("/api/v1/devices", headers=_bearer(key)),
            lambda r: r.status_code == 401,
            interval=0.02,
        )
        assert time.monotonic() - started < 1.0
        assert _refusal(response)[1] == "key_revoked"
        assert (await b.get("/api/v1/devices", headers=_bearer(key))).status_code == 401

        # a signed request's id is refused on the other gateway too
        headers = _signed(ADMIN, b"")
        assert (await a.get("/api/v1/devices", headers=headers)).status_code == 200
        replayed = await b.get("/api/v1/devices", headers=headers)
        assert _refusal(replayed)[:2] == (401, "signature_replayed")


async def test_the_key_listener_comes_back_after_an_outage(
    pg_server_dsn: str, db_dsn: str, db_pool: asyncpg.Pool
) -> None:
    async with serving(db_dsn) as (gateway, url):
        cache = gateway.api_state.key_cache
        async with database_outage(pg_server_dsn, db_dsn):
            await eventually(lambda: not cache.listening, what="the listener noticing")
            assert cache.effective_ttl_s == auth.UNLISTENED_CACHE_TTL_S
        await eventually(lambda: cache.listening, what="the listener back", timeout=15)
        await db_pool.expire_connections()
        async with db_pool.acquire() as conn:
            key_id, key = await auth.create_key(conn, "after the outage")
        async with httpx.AsyncClient(base_url=url, headers=_bearer(key)) as partner:
            assert (await partner.get("/api/v1/devices")).status_code == 200
            async with db_pool.acquire() as conn:
                await auth.revoke_key(conn, key_id)
            await eventually(
                lambda: partner.get("/api/v1/devices"), lambda r: r.status_code == 401, timeout=1
            )


# ---------------------------------------------------------------- devices and gateways


async def _fleet(pool: asyncpg.Pool) -> None:
    """Gateway G1 with sockets G1-01 and G1-02, gateway G2 with G2-01, pile D1 alone;
    an order on D1 and one on G2-01."""
    await pool.execute(
        """INSERT INTO gateways (gateway_id, protocol) VALUES ('G1', 'bkv'), ('G2', 'bkv');
           INSERT INTO devices (device_id, protocol, gateway_id) VALUES
               ('G1-01', 'bkv', 'G1'), ('G1-02', 'bkv', 'G1'), ('G2-01', 'bkv', 'G2'),
               ('D1', 'ap3000', NULL);
           INSERT INTO orders (order_no, device_id, port, protocol, status) VALUES
               ('ORDER-D1', 'D1', 1, 'ap3000', 'settled'),
               ('ORDER-G2', 'G2-01', 1, 'bkv', 'settled');"""
    )


async def test_a_key_limited_to_devices_names_them_and_only_them(
    admin: httpx.AsyncClient, base: str, db_pool: asyncpg.Pool
) -> None:
    await _fleet(db_pool)
    key = (
        await _create(
            admin,
            scopes=["read", "control", "config"],
            allowed_device_ids=["D1"],
            allowed_gateway_ids=["G1"],
        )
    )["key"]
    allowed = [
        "/api/v1/devices/D1",
        "/api/v1/devices/G1-02",  # behind an allowed gateway
        "/api/v1/devices/G1/events",  # the gateway itself
        "/api/v1/devices?gateway_id=G1",
        "/api/v1/orders?device_id=D1",
        "/api/v1/orders/ORDER-D1",
        "/api/v1/orders/ORDER-NONE",  # no such order: 404
    ]
    refused = {
        "/api/v1/devices/G2-01": "this key may not act on device G2-01",
        "/api/v1/devices/NEW-1": "this key may not act on device NEW-1",
        "/api/v1/devices?gateway_id=G2": "this key may not act on gateway G2",
        "/api/v1/orders?device_id=D1&device_id=G2-01": "this key may not act on device G2-01",
        "/api/v1/orders/ORDER-G2": "this key may not act on device G2-01",
        "/api/v1/orders": "names none",
        "/api/v1/devices": "names none",
        # a parameter the route does not take names nothing
        "/api/v1/gateways?device_id=D1": "names none",
    }
    async with httpx.AsyncClient(base_url=base, headers=_bearer(key)) as partner:
        for url in allowed:
            response = await partner.get(url)
            assert response.status_code in (200, 404), (url, response.text)
        assert (await partner.get("/api/v1/orders/ORDER-NONE")).status_code == 404
        for url, message in refused.items():
            status, refusal, text = _refusal(await partner.get(url))
            assert (status, refusal) == (403, "device") and message in text, (url, text)
        start = await partner.post("/api/v1/devices/G2-01/ports/1/start", json={"mode": "full"})
        assert _refusal(start)[:2] == (403, "device")
        # a job's selector: devices by id only
        path = "/api/v1/param-profiles/none/apply"
        by_type = await partner.post(path, json={"selector": {"device_type": 39}})
        assert "picks devices by type" in _refusal(by_type)[2]
        other = await partner.post(path, json={"selector": {"device_ids": ["D1", "G2-01"]}})
        assert _refusal(other)[:2] == (403, "device")
        mine = await partner.post(path, json={"selector": {"device_ids": ["D1", "G1-01"]}})
        assert mine.status_code == 404, mine.text  # past the check: no such profile


# ---------------------------------------------------------------- networks


async def test_network_allow_lists(admin: httpx.AsyncClient, base: str) -> None:
    local = (await _create(admin, scopes=["read"], allowed_networks=["127.0.0.1/32"]))["key"]
    remote = (await _create(admin, scopes=["read"], allowed_networks=["10.0.0.0/8"]))["key"]
    async with httpx.AsyncClient(base_url=base) as client:
        assert (await client.get("/api/v1/devices", headers=_bearer(local))).status_code == 200
        response = await client.get("/api/v1/devices", headers=_bearer(remote))
        assert _refusal(response) == (403, "network", "this key may not be used from 127.0.0.1")
        # behind a trusted proxy (uvicorn trusts 127.0.0.1 by default) the forwarded address
        # is the client's
        proxied = {**_bearer(remote), "X-Forwarded-For": "10.1.2.3"}
        assert (await client.get("/api/v1/devices", headers=proxied)).status_code == 200
        proxied = {**_bearer(local), "X-Forwarded-For": "10.1.2.3"}
        assert (await client.get("/api/v1/devices", headers=proxied)).status_code == 403


# ---------------------------------------------------------------- signed requests


def _signed(key: str, body: bytes, *, at: dt.datetime | None = None) -> dict[str, str]:
    """Headers of a request signed with the standardwebhooks package (not ours)."""
    request_id = f"req_{uuid.uuid4().hex}"
    at = at or dt.datetime.now(dt.UTC)
    return {
        **_bearer(key),
        "x-chargegw-id": request_id,
        "x-chargegw-timestamp": str(int(at.timestamp())),
        "x-chargegw-signature": Webhook(key.encode()).sign(request_id, at, body),
        "content-type": "application/json",
    }


async def test_signed_requests(admin: httpx.AsyncClient, base: str) -> None:
    key = (await _create(admin, scopes=["admin"], hmac_required=True))["key"]
    optional = (await _create(admin, scopes=["admin"]))["key"]
    body = b'{"dry_run": true}'
    path = "/api/v1/nodes/rebalance"
    async with httpx.AsyncClient(base_url=base) as client:
        unsigned = await client.post(path, content=body, headers=_bearer(key))
        assert _refusal(unsigned)[:2] == (401, "signature_missing")
        headers = _signed(key, body)
        good = await client.post(path, content=body, headers=headers)
        assert good.status_code == 200, good.text
        replayed = await client.post(path, content=body, headers=headers)
        assert _refusal(replayed)[:2] == (401, "signature_replayed")
        tampered = await client.post(
            path, content=b'{"dry_run": false}', headers=_signed(key, body)
        )
        assert _refusal(tampered) == (401, "signature_invalid", "invalid request signature")
        an_hour_ago = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=6)
        stale = await client.post(path, content=body, headers=_signed(key, body, at=an_hour_ago))
        assert _refusal(stale)[:2] == (401, "signature_stale")
        other_key = await client.post(
            path, content=body, headers={**_signed(optional, body), **_bearer(key)}
        )
        assert _refusal(other_key)[:2] == (401, "signature_invalid")
        # a GET is signed over an empty body
        assert (await client.get("/api/v1/nodes", headers=_signed(key, b""))).status_code == 200
        # without hmac_required signing is optional, but a signature sent is checked
        plain = {**_bearer(optional), "content-type": "application/json"}
        assert (await client.post(path, content=body, headers=plain)).is_success
        assert (await client.post(path, content=body, headers=_signed(optional, body))).is_success
        wrong = {**_signed(optional, body), "x-chargegw-signature": "v1,AAAA"}
        assert _refusal(await client.post(path, content=body, headers=wrong))[0] == 401


def test_signature_scheme_matches_standard_webhooks() -> None:
    at = dt.datetime(2026, 5, 1, 8, 0, tzinfo=dt.UTC)
    body = b'{"mode":"full"}'
    signature = auth.sign("cgw_key", "req_1", int(at.timestamp()), body)
    assert signature == Webhook(b"cgw_key").sign("req_1", at, body)
    headers = {
        "x-chargegw-id": "req_1",
        "x-chargegw-timestamp": str(int(at.timestamp())),
        "x-chargegw-signature": f"v1,other {signature}",
    }
    assert auth.check_signature("cgw_key", headers, body, now=at.timestamp() + 299) == (
        "req_1",
        int(at.timestamp()),
    )
    for changed, reason in [
        ({"x-chargegw-id": "req 1"}, auth.Reason.SIGNATURE_INVALID),
        ({"x-chargegw-timestamp": "1e9"}, auth.Reason.SIGNATURE_INVALID),
        ({"x-chargegw-timestamp": str(int(at.timestamp()) - 301)}, auth.Reason.SIGNATURE_STALE),
        ({"x-chargegw-signature": ""}, auth.Reason.SIGNATURE_MISSING),
    ]:
        with pytest.raises(auth.KeyRefusedError) as refused:
            auth.check_signature("cgw_key", {**headers, **changed}, body, now=at.timestamp())
        assert refused.value.reason == reason


# ---------------------------------------------------------------- who is calling

whoami = APIRouter(prefix="/api/v1/whoami")


@whoami.get("")
async def who(request: Request) -> dict[str, Any]:
    info: auth.ApiKeyInfo = request.state.api_key
    return {"key_id": info.key_id, "name": info.name, "scopes": sorted(info.scopes)}


async def test_the_request_carries_the_key_identity(db_pool: asyncpg.Pool) -> None:
    async with db_pool.acquire() as conn:
        key_id, key = await auth.create_key(conn, auth.NewKey("ops", scopes=["read"]))
    for required, headers, expected_id in [
        (True, _bearer(ADMIN), "config:" + auth.hash_key(ADMIN)[7:15]),
        (True, _bearer(key), str(key_id)),
        (False, {}, "local"),
    ]:
        state = ApiState(
            pool=db_pool,
            metrics=Metrics(),
            readiness=dict,
            api_keys=frozenset({ADMIN}),
            auth_required=required,
        )
        app = create_app(state, routers=[whoami])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            answer = (await client.get("/api/v1/whoami", headers=headers)).json()
        assert answer["key_id"] == expected_id


# ---------------------------------------------------------------- CLI


async def _cli(*args: str) -> Result:
    # the commands run their own event loop: keep them off the test's
    return await asyncio.to_thread(CliRunner().invoke, main, ["apikey", *args])


async def test_cli_create_list_rotate_revoke(db_dsn: str, db_pool: asyncpg.Pool) -> None:
    created = await _cli(
        "create", "--name", "partner", "--scope", "read", "--scope", "control",
        "--allow-device", "D1", "--allow-network", "10.0.0.0/8", "--expires-in", "12h",
        "--hmac-required", "--dsn", db_dsn,
    )  # fmt: skip
    assert created.exit_code == 0, created.output
    key = created.stdout.strip()
    assert "scopes: read, control" in created.stderr
    async with db_pool.acquire() as conn:
        [stored] = await auth.list_keys(conn)
    assert (stored.scopes, stored.allowed_device_ids) == (("read", "control"), ("D1",))
    assert stored.allowed_networks == ("10.0.0.0/8",) and stored.hmac_required
    assert stored.expires_at is not None and stored.prefix == key[:8]

    listed = await _cli("list", "--dsn", db_dsn)
    line = listed.stdout.splitlines()[1]
    assert "read,control" in line and "devices=1,networks=1,signed" in line
    assert line.endswith("active") and key not in listed.output

    rotated = await _cli("rotate", str(stored.key_id), "--overlap", "0", "--dsn", db_dsn)
    assert rotated.exit_code == 0, rotated.output
    new_key = rotated.stdout.strip()
    assert new_key.startswith("cgw_") and new_key != key
    assert await auth.verify(db_pool, (), key) is False  # overlap 0: expired at once
    assert await auth.verify(db_pool, (), new_key) is True
    assert "expired" in (await _cli("list", "--dsn", db_dsn)).stdout.splitlines()[1]

    revoked = await _cli("revoke", "2", "--dsn", db_dsn)
    assert revoked.exit_code == 0 and "within a second" in revoked.stdout
    assert await auth.verify(db_pool, (), new_key) is False

    bad = await _cli("create", "--name", "x", "--allow-network", "10.0.0.1/8", "--dsn", db_dsn)
    assert bad.exit_code == 2 and "did you mean 10.0.0.0/8" in bad.output
    bad = await _cli("create", "--name", "x", "--expires-in", "soon", "--dsn", db_dsn)
    assert bad.exit_code == 2 and "not a duration" in bad.output
    bad = await _cli("rotate", "2", "--dsn", db_dsn)
    assert bad.exit_code == 1 and "revoked" in bad.stderr
