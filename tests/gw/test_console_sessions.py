"""The console's sessions over the API (in process, real PostgreSQL): signing in and out,
the cookie, CSRF and cross-site refusals, revocation and expiry, the pages' headers, the
catalogue, and the device search and overview endpoints the console reads."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from chargegw import console
from chargegw.api.app import ApiState, ConsoleConfig, create_app
from chargegw.api.routers import ROUTERS
from chargegw.console import i18n
from chargegw.console.pages import CSP
from chargegw.domain import auth
from chargegw.domain.devices import qr_number, search_terms
from chargegw.metrics import Metrics

from .conftest import database_outage, read_only_database

ADMIN = "cgw_console-sessions-admin-key-0123456789"
CONSOLE = Path(console.__file__).parent


def _ready() -> dict[str, bool]:
    return {"database": True, "listener": True}


def _state(pool: asyncpg.Pool, *, keys: bool = True, **console_fields: float) -> ApiState:
    return ApiState(
        pool=pool,
        metrics=Metrics(),
        readiness=_ready,
        api_keys=frozenset({ADMIN}) if keys else frozenset(),
        auth_required=keys,
        console=ConsoleConfig(**console_fields),  # type: ignore[arg-type]
    )


def _client(state: ApiState) -> httpx.AsyncClient:
    app = create_app(state, routers=ROUTERS)
    console.install(app)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.fixture
async def client(db_pool: asyncpg.Pool) -> AsyncIterator[httpx.AsyncClient]:
    async with _client(_state(db_pool)) as c:
        yield c


async def _sign_in(client: httpx.AsyncClient, key: str = ADMIN) -> str:
    """Sign in; the CSRF token of the new session (read off a page, as a browser would)."""
    response = await client.post(
        "/console/login", data={"api_key": key, "next": "/console/devices"}
    )
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/console/devices"
    page = await client.get("/console/devices")
    assert page.status_code == 200
    found = re.search(r'"csrf": "([^"]+)"', page.text)
    assert found
    return found.group(1)


async def test_signing_in_sets_a_strict_http_only_cookie(client: httpx.AsyncClient) -> None:
    response = await client.post("/console/login", data={"api_key": ADMIN})
    assert response.status_code == 303
    cookie = response.headers["set-cookie"]
    assert "chargegw_session=" in cookie
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert "Max-Age=43200" in cookie


async def test_a_wrong_key_is_refused_on_the_form(client: httpx.AsyncClient) -> None:
    response = await client.post("/console/login", data={"api_key": "cgw_wrong"})
    assert response.status_code == 401
    assert "API 密钥无效" in response.text  # Chinese without a browser language
    assert "set-cookie" not in response.headers
    response = await client.post(
        "/console/login", data={"api_key": ""}, headers={"Accept-Language": "en-US,en;q=0.9"}
    )
    assert "Enter an API key." in response.text


async def test_pages_need_a_session_and_keep_where_they_were_going(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/console/orders?status=settled")
    assert response.status_code == 303
    assert (
        response.headers["location"] == "/console/login?next=%2Fconsole%2Forders%3Fstatus%3Dsettled"
    )


@pytest.mark.parametrize(
    "target", ["https://evil.example/", "//evil.example/console/", "/api/v1/devices", "/console\\x"]
)
async def test_signing_in_never_redirects_off_the_console(
    client: httpx.AsyncClient, target: str
) -> None:
    response = await client.post("/console/login", data={"api_key": ADMIN, "next": target})
    assert response.headers["location"] == "/console/"


async def test_the_session_authenticates_api_calls_and_changes_need_its_csrf_token(
    client: httpx.AsyncClient,
) -> None:
    csrf = await _sign_in(client)
    assert (await client.get("/api/v1/devices")).status_code == 200
    body = {"name": "made in the console", "scopes": ["read"]}
    refused = await client.post("/api/v1/api-keys", json=body)
    assert refused.status_code == 403
    assert refused.json()["error"]["refusal"] == "csrf"
    wrong = await client.post("/api/v1/api-keys", json=body, headers={"X-CSRF-Token": "x" + csrf})
    assert wrong.status_code == 403
    made = await client.post("/api/v1/api-keys", json=body, headers={"X-CSRF-Token": csrf})
    assert made.status_code == 201, made.text
    # audited as any API call, under the session's key
    audit = await client.get("/api/v1/audit/calls")
    assert audit.status_code == 200


async def test_a_change_from_another_site_is_refused(client: httpx.AsyncClient) -> None:
    csrf = await _sign_in(client)
    body = {"name": "x", "scopes": ["read"]}
    for headers in (
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": "https://evil.example"},
    ):
        response = await client.post(
            "/api/v1/api-keys", json=body, headers={"X-CSRF-Token": csrf, **headers}
        )
        assert response.status_code == 403, headers
        assert response.json()["error"]["refusal"] == "csrf"
    same = await client.post(
        "/api/v1/api-keys",
        json=body,
        headers={"X-CSRF-Token": csrf, "Sec-Fetch-Site": "same-origin", "Origin": "http://test"},
    )
    assert same.status_code == 201
    # a bearer key is never sent by a browser on its own: a proxy forwarding browser
    # headers with it is not refused
    bearer = await client.post(
        "/api/v1/api-keys",
        json=body,
        headers={"Authorization": f"Bearer {ADMIN}", "Sec-Fetch-Site": "cross-site"},
    )
    assert bearer.status_code == 201


async def test_revoking_the_key_ends_its_sessions(db_pool: asyncpg.Pool) -> None:
    async with db_pool.acquire() as conn:
        key_id, key = await auth.create_key(conn, "operator")
    state = _state(db_pool)
    async with _client(state) as client:
        await _sign_in(client, key)
        assert (await client.get("/api/v1/devices")).status_code == 200
        async with db_pool.acquire() as conn:
            assert await auth.revoke_key(conn, key_id)
        state.key_cache.forget(key_id)  # what the KeyListener does on NOTIFY
        response = await client.get("/api/v1/devices")
        assert response.status_code == 401
        page = await client.get("/console/")
        assert page.status_code == 303 and page.headers["location"].startswith("/console/login")


async def test_an_idle_or_expired_session_ends(db_pool: asyncpg.Pool) -> None:
    async with _client(_state(db_pool, idle_timeout_s=60.0)) as client:
        await _sign_in(client)
        await db_pool.execute("UPDATE console_sessions SET last_used_at = now() - interval '2 min'")
        response = await client.get("/api/v1/devices")
        assert response.status_code == 401
        assert response.json()["error"]["refusal"] == "session_expired"
    async with _client(_state(db_pool)) as client:
        await _sign_in(client)
        await db_pool.execute("UPDATE console_sessions SET expires_at = now() - interval '1 s'")
        assert (await client.get("/api/v1/devices")).status_code == 401


async def test_signing_out_needs_the_csrf_token_and_ends_the_session(
    client: httpx.AsyncClient, db_pool: asyncpg.Pool
) -> None:
    csrf = await _sign_in(client)
    refused = await client.post("/console/logout", data={"csrf": "nope"})
    assert refused.status_code == 403
    assert await db_pool.fetchval("SELECT count(*) FROM console_sessions") == 1
    done = await client.post("/console/logout", data={"csrf": csrf})
    assert done.status_code == 303 and done.headers["location"] == "/console/login"
    assert await db_pool.fetchval("SELECT count(*) FROM console_sessions") == 0
    assert "chargegw_session" not in client.cookies
    assert (await client.get("/api/v1/devices")).status_code == 401


async def test_localhost_mode_opens_a_local_session_by_itself(db_pool: asyncpg.Pool) -> None:
    state = _state(db_pool, keys=False)
    state.local_hosts = frozenset({"127.0.0.1", "localhost", "::1"})
    app = create_app(state, routers=ROUTERS)
    console.install(app)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8980") as client:
        page = await client.get("/console/")
        assert page.status_code == 200
        assert "chargegw_session=" in page.headers["set-cookie"]
        assert "127.0.0.1" in page.text
        login = await client.get("/console/login")
        assert login.status_code == 303
        # a cookie from when keys were configured does not loop: a local session instead
        client.cookies.set("chargegw_session", "left-over-from-keyed-mode")
        again = await client.get("/console/")
        assert again.status_code == 200 and "chargegw_session=" in again.headers["set-cookie"]
        assert (await client.get("/api/v1/devices")).status_code == 200
    # a web page whose name was rebound to 127.0.0.1 (DNS rebinding) is refused
    async with httpx.AsyncClient(transport=transport, base_url="http://rebind.example:8980") as c:
        refused = await c.post(
            "/api/v1/api-keys",
            json={"name": "x", "scopes": ["admin"]},
            headers={"Sec-Fetch-Site": "same-origin", "Origin": "http://rebind.example:8980"},
        )
        assert refused.status_code == 403
        assert "loopback" in refused.json()["error"]["message"]
        assert (await c.get("/console/")).status_code == 403


async def test_a_key_that_must_sign_its_requests_cannot_open_a_session(
    client: httpx.AsyncClient, db_pool: asyncpg.Pool
) -> None:
    async with db_pool.acquire() as conn:
        _, key = await auth.create_key(conn, auth.NewKey(name="signed", hmac_required=True))
    response = await client.post("/console/login", data={"api_key": key})
    assert response.status_code == 403
    assert "set-cookie" not in response.headers


async def test_an_ended_session_does_not_count_as_a_failed_authentication(
    client: httpx.AsyncClient,
) -> None:
    client.cookies.set("chargegw_session", "ended-long-ago")
    for _ in range(15):  # beyond the failed-authentication burst
        response = await client.get("/api/v1/devices")
        assert response.status_code == 401
        assert response.json()["error"]["refusal"] == "session_expired"


async def test_console_answers_carry_a_strict_content_security_policy(
    client: httpx.AsyncClient,
) -> None:
    await _sign_in(client)
    for path in ("/console/", "/console/login", "/console/static/console.css"):
        response = await client.get(path)
        assert response.headers["content-security-policy"] == CSP
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["x-content-type-options"] == "nosniff"
    assert "unsafe-inline" not in CSP and "unsafe-eval" not in CSP
    assert "script-src 'self'" in CSP and "style-src 'self'" in CSP


def test_the_language_follows_the_choice_then_the_browser() -> None:
    assert i18n.negotiate(None, None) == "zh"
    assert i18n.negotiate(None, "en-US,en;q=0.9") == "en"
    assert i18n.negotiate(None, "fr-FR, en;q=0.5, zh-CN;q=0.8") == "zh"
    assert i18n.negotiate(None, "zh-TW") == "zh"
    assert i18n.negotiate("en", "zh-CN") == "en"
    assert i18n.negotiate("xx", "en;q=bad, en-GB") == "en"


def test_every_text_has_both_languages_and_every_key_used_exists() -> None:
    zh, en = i18n.catalogue("zh"), i18n.catalogue("en")
    assert zh.keys() == en.keys()
    for key in zh:
        assert zh[key].strip() and en[key].strip(), key
        fields = re.compile(r"\{(\w+)\}")
        assert sorted(fields.findall(zh[key])) == sorted(fields.findall(en[key])), key
    used: set[str] = set()
    for path in [*CONSOLE.glob("templates/*.html"), *CONSOLE.glob("static/js/**/*.js")]:
        text = path.read_text("utf-8")
        used |= set(re.findall(r"""\bt\(\s*["']([a-z_]+\.[a-z0-9_.]+)["']""", text))
    missing = sorted(k for k in used if k not in zh)
    assert not missing, missing


def test_no_module_writes_html() -> None:
    for path in CONSOLE.glob("static/js/**/*.js"):
        text = path.read_text("utf-8")
        for banned in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert banned not in text, f"{path.name} uses {banned}"
    for path in CONSOLE.glob("templates/*.html"):
        text = path.read_text("utf-8")
        assert not re.search(r"<script(?![^>]*\b(src|type=\"application/json\"))", text), path.name
        assert " style=" not in text and "<style" not in text, path.name
        assert not re.search(r"\son[a-z]+=", text), path.name


def test_qr_numbers_and_search_terms() -> None:
    assert qr_number("ap3000", "04CEAA40") == "13544000"
    assert qr_number("bkv", "82231214002700-1") is None
    assert search_terms("13544000") == ("13544000", "CEAA40", None)
    assert search_terms("http://ap3200.haokuaichong.cn/ap3200/40aace04/01")[2] == "04CEAA40"
    assert search_terms("50%_x")[0] == "50\\%\\_x"


async def test_devices_are_found_by_id_qr_number_qr_url_and_iccid_tail(
    client: httpx.AsyncClient, db_pool: asyncpg.Pool
) -> None:
    await db_pool.execute(
        """INSERT INTO devices (device_id, protocol, phy_id, iccid) VALUES
           ('04CEAA40', 'ap3000', '04CEAA40', '89860448161870064815'),
           ('04CEAA41', 'ap3000', '04CEAA41', '89860448161870069999'),
           ('05CEAA40', 'ap3000', '05CEAA40', NULL)"""
    )
    headers = {"Authorization": f"Bearer {ADMIN}"}

    async def found(q: str) -> list[str]:
        response = await client.get("/api/v1/devices", params={"q": q}, headers=headers)
        assert response.status_code == 200, response.text
        return [d["device_id"] for d in response.json()["items"]]

    assert await found("13544000") == ["04CEAA40", "05CEAA40"]
    assert await found("http://ap3200.haokuaichong.cn/ap3200/40aace04/01") == ["04CEAA40"]
    assert await found("9999") == ["04CEAA41"]
    assert await found("04ceaa4") == ["04CEAA40", "04CEAA41"]
    assert await found("%") == []
    detail = (await client.get("/api/v1/devices/04CEAA40", headers=headers)).json()
    assert detail["qr_number"] == "13544000"
    assert detail["iccid"] == "898604**********4815"


async def test_the_overview_counts_and_alerts(
    client: httpx.AsyncClient, db_pool: asyncpg.Pool
) -> None:
    await db_pool.execute(
        """INSERT INTO devices (device_id, protocol, online, last_seen_at) VALUES
           ('04CEAA40', 'ap3000', true, now()), ('04CEAA41', 'ap3000', false, now())"""
    )
    await db_pool.execute(
        """INSERT INTO commands (device_id, protocol, name, priority, status, created_at,
                                expires_at)
           VALUES ('04CEAA41', 'ap3000', 'query', 1, 'pending',
                   now() - interval '10 min', now() + interval '1 hour')"""
    )
    headers = {"Authorization": f"Bearer {ADMIN}"}
    response = await client.get("/api/v1/overview", headers=headers)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["devices"] == [{"protocol": "ap3000", "online": 1, "offline": 1}]
    assert data["gateways"] == [
        {"protocol": "ap3000", "gateway_id": None, "online": 1, "offline": 1}
    ]
    assert data["outbox"]["open"] == 1 and data["outbox"]["oldest_s"] >= 590
    codes = {a["code"]: a for a in data["alerts"]}
    assert codes["outbox_backlog"]["values"]["open"] == 1
    assert data["charging"] == 0 and data["settlements_today"]["count"] == 0


async def test_a_session_keeps_reading_while_the_database_is_read_only(
    client: httpx.AsyncClient, db_pool: asyncpg.Pool, pg_server_dsn: str, db_dsn: str
) -> None:
    await _sign_in(client)
    # idle past the touch interval: the next request would write last_used_at
    await db_pool.execute("UPDATE console_sessions SET last_used_at = now() - interval '5 min'")
    async with read_only_database(pg_server_dsn, db_dsn, db_pool):
        assert (await client.get("/api/v1/devices")).status_code == 200
        assert (await client.get("/console/devices")).status_code == 200
        # a change is refused for the database, not for the session
        refused = await client.post("/console/login", data={"api_key": ADMIN})
        assert refused.status_code == 503
    assert (await client.get("/api/v1/devices")).status_code == 200


async def test_a_session_during_a_database_outage_is_503_not_a_refusal(
    client: httpx.AsyncClient, pg_server_dsn: str, db_dsn: str
) -> None:
    await _sign_in(client)
    async with database_outage(pg_server_dsn, db_dsn):
        response = await client.get("/api/v1/devices")
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "database_unavailable"
    assert (await client.get("/api/v1/devices")).status_code == 200
