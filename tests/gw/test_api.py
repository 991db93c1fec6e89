"""The read API against a real PostgreSQL: rows are inserted with SQL, then read over HTTP."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from chargegw.api.app import ApiState, create_app, mask_iccid
from chargegw.metrics import Metrics

UTC = dt.UTC
T0 = dt.datetime(2024, 5, 1, 8, 0, tzinfo=UTC)
NO_POOL = {
    "error": {
        "code": "database_unavailable",
        "message": "database unavailable",
        "field": None,
        "details": [],
        "reason": "no database pool",
    }
}


def _all_ready() -> dict[str, bool]:
    return {"database": True, "listener": True}


def _client(state: ApiState) -> httpx.AsyncClient:
    # the read API itself, without keys; authentication is tested in test_auth.py
    state = dataclasses.replace(state, auth_required=False)
    transport = httpx.ASGITransport(app=create_app(state))
    return httpx.AsyncClient(transport=transport, base_url="http://test")


@pytest.fixture
def state(db_pool: asyncpg.Pool) -> ApiState:
    return ApiState(pool=db_pool, metrics=Metrics(), readiness=_all_ready)


@pytest.fixture
async def client(state: ApiState) -> AsyncIterator[httpx.AsyncClient]:
    async with _client(state) as c:
        yield c


@pytest.fixture
async def offline_client() -> AsyncIterator[httpx.AsyncClient]:
    """No database at all: for what must be answered (or rejected) without one."""
    state = ApiState(pool=None, metrics=Metrics(), readiness=_all_ready)
    async with _client(state) as c:
        yield c


async def add_gateway(pool: asyncpg.Pool, gateway_id: str, **columns: Any) -> None:
    values = {"protocol": "bkv", "online": True, **columns}
    names = ["gateway_id", *values]
    marks = ", ".join(f"${i + 1}" for i in range(len(names)))
    await pool.execute(
        f"INSERT INTO gateways ({', '.join(names)}) VALUES ({marks})", gateway_id, *values.values()
    )


async def add_device(pool: asyncpg.Pool, device_id: str, **columns: Any) -> None:
    values = {"protocol": "ap3000", "online": True, **columns}
    names = ["device_id", *values]
    marks = ", ".join(f"${i + 1}" for i in range(len(names)))
    await pool.execute(
        f"INSERT INTO devices ({', '.join(names)}) VALUES ({marks})", device_id, *values.values()
    )


async def add_event(
    pool: asyncpg.Pool, device_id: str, at: dt.datetime, kind: str, reason: str | None = None
) -> None:
    await pool.execute(
        "INSERT INTO device_events (device_id, at, kind, reason, detail)"
        " VALUES ($1, $2, $3, $4, $5::jsonb)",
        device_id,
        at,
        kind,
        reason,
        json.dumps({"source": "test"}),
    )


async def add_frame(
    pool: asyncpg.Pool, device_id: str, at: dt.datetime, direction: str = "in"
) -> None:
    await pool.execute(
        "INSERT INTO frames (received_at, connection_id, device_id, direction, protocol,"
        " command, hex) VALUES ($1, 'c1', $2, $3, 'ap3000', '0x01', '444e59')",
        at,
        device_id,
        direction,
    )


async def collect(
    client: httpx.AsyncClient, url: str, params: dict[str, Any], key: Callable[[Any], Any]
) -> tuple[list[Any], int]:
    """Follow ``next_cursor`` to the end; the keys of every item and the number of pages."""
    keys: list[Any] = []
    pages = 0
    cursor = None
    while True:
        query = dict(params, **({"cursor": cursor} if cursor else {}))
        response = await client.get(url, params=query)
        assert response.status_code == 200, response.text
        body = response.json()
        pages += 1
        keys.extend(key(item) for item in body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return keys, pages


# ---------------------------------------------------------------- health, readiness, metrics


async def test_healthz_and_readyz(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {
        "ready": True,
        "checks": {"database": True, "listener": True},
        "reasons": {},
    }


async def test_readyz_not_ready_when_a_check_fails(db_pool: asyncpg.Pool) -> None:
    state = ApiState(
        pool=db_pool, metrics=Metrics(), readiness=lambda: {"database": True, "listener": False}
    )
    async with _client(state) as client:
        response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {
        "ready": False,
        "checks": {"database": True, "listener": False},
        "reasons": {},
    }


async def test_closed_pool_means_not_ready_and_503(db_dsn: str) -> None:
    pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=2)
    await pool.close()
    async with _client(ApiState(pool=pool, metrics=Metrics(), readiness=_all_ready)) as client:
        ready = await client.get("/readyz")
        devices = await client.get("/api/v1/devices")
        health = await client.get("/healthz")
    assert ready.status_code == 503
    assert ready.json()["checks"] == {"database": False, "listener": True}
    assert devices.status_code == 503
    assert devices.json()["error"]["code"] == "database_unavailable"
    assert devices.headers["Retry-After"] == "5"
    assert health.status_code == 200


async def test_unreachable_database_is_503() -> None:
    # nothing listens on port 1: connecting fails at once with an OSError
    pool = await asyncpg.create_pool("postgresql://postgres@127.0.0.1:1/x", min_size=0)
    try:
        state = ApiState(pool=pool, metrics=Metrics(), readiness=_all_ready)
        async with _client(state) as client:
            for url in ("/api/v1/gateways", "/api/v1/devices/04CEAA40/frames"):
                response = await client.get(url)
                assert response.status_code == 503
                error = response.json()["error"]
                assert error["code"] == "database_unavailable"
                assert error["reason"] == "cannot connect to the database"
            ready = await client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["checks"]["database"] is False
    finally:
        await pool.close()


@pytest.mark.parametrize(
    "url",
    [
        "/api/v1/gateways",
        "/api/v1/devices",
        "/api/v1/devices/04CEAA40",
        "/api/v1/devices/04CEAA40/events",
        "/api/v1/devices/04CEAA40/frames",
    ],
)
async def test_no_pool_is_503(offline_client: httpx.AsyncClient, url: str) -> None:
    response = await offline_client.get(url)
    assert (response.status_code, response.json()) == (503, NO_POOL)


async def test_no_pool_is_alive_but_not_ready(offline_client: httpx.AsyncClient) -> None:
    assert (await offline_client.get("/healthz")).status_code == 200
    response = await offline_client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {
        "ready": False,
        "checks": {"database": False, "listener": True},
        "reasons": {"database": "no database pool"},
    }


async def test_metrics_endpoint() -> None:
    metrics = Metrics()
    metrics.connections_accepted_total.inc(3)
    metrics.frames_total.labels(protocol="ap3000", direction="in", command="0x01").inc()
    metrics.connections_closed_total.labels(reason="idle").inc()
    metrics.db_write_seconds.observe(0.004)
    metrics.devices_online.labels(protocol="bkv").set(7)
    async with _client(ApiState(pool=None, metrics=metrics, readiness=_all_ready)) as client:
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    text = response.text
    assert "chargegw_connections_accepted_total 3.0" in text
    assert 'chargegw_frames_total{command="0x01",direction="in",protocol="ap3000"} 1.0' in text
    assert 'chargegw_connections_closed_total{reason="idle"} 1.0' in text
    assert 'chargegw_devices_online{protocol="bkv"} 7.0' in text
    assert "chargegw_db_write_seconds_count 1.0" in text
    for name in (
        "chargegw_connections_current",
        "chargegw_decode_errors_total",
        "chargegw_db_write_failures_total",
        "chargegw_batch_queue_depth",
        "chargegw_db_buffered_rows",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in text


def test_metrics_instances_are_independent() -> None:
    first, second = Metrics(), Metrics()
    first.connections_current.set(5)
    assert b"chargegw_connections_current 5.0" in first.render()[0]
    assert b"chargegw_connections_current 0.0" in second.render()[0]


async def test_openapi_documents_every_path(offline_client: httpx.AsyncClient) -> None:
    response = await offline_client.get("/openapi.json")
    assert response.status_code == 200
    spec = response.json()
    assert set(spec["paths"]) >= {
        "/healthz",
        "/readyz",
        "/metrics",
        "/api/v1/gateways",
        "/api/v1/devices",
        "/api/v1/devices/{device_id}",
        "/api/v1/devices/{device_id}/events",
        "/api/v1/devices/{device_id}/frames",
    }
    schemas = spec["components"]["schemas"]
    assert {"DevicePage", "DeviceDetail", "Port", "FramePage", "EventPage", "GatewayPage"} <= set(
        schemas
    )
    listing = spec["paths"]["/api/v1/devices"]["get"]
    assert listing["summary"] == "List devices"
    assert listing["tags"] == ["devices"]
    assert {p["name"] for p in listing["parameters"]} == {
        "protocol",
        "online",
        "gateway_id",
        "q",
        "limit",
        "cursor",
    }


# ---------------------------------------------------------------- gateways


async def test_gateways_masks_iccid_counts_devices_and_filters(
    client: httpx.AsyncClient, db_pool: asyncpg.Pool
) -> None:
    await add_gateway(
        db_pool,
        "82231214002700",
        iccid="89860412345678901234",
        imei="864000000000001",
        firmware="v1.2",
        remote_addr="203.0.113.7:50122",
        connected_at=T0,
        last_seen_at=T0 + dt.timedelta(minutes=1),
    )
    await add_gateway(db_pool, "04CEAA40", protocol="ap3000", online=False)
    await add_device(db_pool, "82231214002700-1", protocol="bkv", gateway_id="82231214002700")
    await add_device(db_pool, "82231214002700-2", protocol="bkv", gateway_id="82231214002700")

    body = (await client.get("/api/v1/gateways")).json()
    assert body["next_cursor"] is None
    assert [g["gateway_id"] for g in body["items"]] == ["04CEAA40", "82231214002700"]
    ap3000, bkv = body["items"]
    assert ap3000["device_count"] == 0
    assert ap3000["iccid"] is None
    assert bkv == {
        "gateway_id": "82231214002700",
        "protocol": "bkv",
        "online": True,
        "iccid": "898604**********1234",
        "imei": "864000000000001",
        "firmware": "v1.2",
        "remote_addr": "203.0.113.7:50122",
        "connected_at": "2024-05-01T08:00:00Z",
        "last_seen_at": "2024-05-01T08:01:00Z",
        "device_count": 2,
    }
    online = (await client.get("/api/v1/gateways", params={"online": "false"})).json()
    assert [g["gateway_id"] for g in online["items"]] == ["04CEAA40"]
    by_protocol = (await client.get("/api/v1/gateways", params={"protocol": "bkv"})).json()
    assert [g["gateway_id"] for g in by_protocol["items"]] == ["82231214002700"]


async def test_gateways_pagination(client: httpx.AsyncClient, db_pool: asyncpg.Pool) -> None:
    await db_pool.execute(
        "INSERT INTO gateways (gateway_id, protocol)"
        " SELECT format('GW%s', lpad(i::text, 4, '0')), 'bkv' FROM generate_series(1, 25) i"
    )
    ids, pages = await collect(client, "/api/v1/gateways", {"limit": 10}, lambda g: g["gateway_id"])
    assert pages == 3
    assert ids == [f"GW{i:04d}" for i in range(1, 26)]


def test_mask_iccid() -> None:
    assert mask_iccid("89860412345678901234") == "898604**********1234"
    assert mask_iccid("8986041234567") == "898604***4567"
    assert mask_iccid("1234567890") == "**********"
    assert mask_iccid("") == ""
    assert mask_iccid(None) is None


# ---------------------------------------------------------------- devices


async def test_devices_pagination_250_in_3_pages(
    client: httpx.AsyncClient, db_pool: asyncpg.Pool
) -> None:
    await db_pool.execute(
        "INSERT INTO devices (device_id, protocol, online)"
        " SELECT upper(lpad(to_hex(i * 7919), 8, '0')), 'ap3000', i % 2 = 0"
        " FROM generate_series(1, 250) i"
    )
    expected = [r["device_id"] for r in await db_pool.fetch("SELECT device_id FROM devices")]

    def key(item: dict[str, Any]) -> str:
        return str(item["device_id"])

    ids, pages = await collect(client, "/api/v1/devices", {"limit": 100}, key)
    assert pages == 3
    assert ids == sorted(expected)  # no duplicates, no gaps, in order
    online, pages = await collect(client, "/api/v1/devices", {"online": "true", "limit": 50}, key)
    assert (len(online), pages) == (125, 3)
    default_page = (await client.get("/api/v1/devices")).json()
    assert len(default_page["items"]) == 100  # the default page size
    assert default_page["next_cursor"] is not None


async def test_devices_filters(client: httpx.AsyncClient, db_pool: asyncpg.Pool) -> None:
    await add_gateway(db_pool, "82231214002700")
    await add_gateway(db_pool, "82231214009999")
    await add_device(db_pool, "04CEAA40", phy_id="04CEAA40", port_count=2, voltage_v=228.5)
    await add_device(db_pool, "04CEAA41", online=False, offline_reason="heartbeat_timeout")
    await add_device(
        db_pool, "82231214002700-1", protocol="bkv", gateway_id="82231214002700", socket_no=1
    )
    await add_device(
        db_pool, "82231214009999-1", protocol="bkv", gateway_id="82231214009999", socket_no=1
    )

    async def ids(**params: Any) -> list[str]:
        response = await client.get("/api/v1/devices", params=params)
        assert response.status_code == 200, response.text
        return [d["device_id"] for d in response.json()["items"]]

    assert await ids() == ["04CEAA40", "04CEAA41", "82231214002700-1", "82231214009999-1"]
    assert await ids(protocol="ap3000") == ["04CEAA40", "04CEAA41"]
    assert await ids(protocol="bkv", online="true") == ["82231214002700-1", "82231214009999-1"]
    assert await ids(online="false") == ["04CEAA41"]
    assert await ids(gateway_id="82231214002700") == ["82231214002700-1"]
    assert await ids(gateway_id="nope") == []

    first = (await client.get("/api/v1/devices", params={"limit": 1})).json()
    assert first["items"][0] == {
        "device_id": "04CEAA40",
        "protocol": "ap3000",
        "gateway_id": None,
        "phy_id": "04CEAA40",
        "socket_no": None,
        "device_type": None,
        "firmware": None,
        "port_count": 2,
        "online": True,
        "offline_reason": None,
        "last_seen_at": None,
        "last_heartbeat_at": None,
        "signal_strength": None,
        "temperature_c": None,
        "voltage_v": 228.5,
        "qr_number": "13544000",
        "iccid": None,
    }
    assert first["next_cursor"] is not None


async def test_device_detail_with_ports(client: httpx.AsyncClient, db_pool: asyncpg.Pool) -> None:
    await add_gateway(db_pool, "82231214002700")
    await add_device(
        db_pool,
        "82231214002700-1",
        protocol="bkv",
        gateway_id="82231214002700",
        socket_no=1,
        port_count=2,
        last_heartbeat_at=dt.datetime(2024, 5, 1, 16, 0, tzinfo=dt.timezone(dt.timedelta(hours=8))),
    )
    await db_pool.execute(
        """INSERT INTO ports (device_id, port, status, status_code, power_w, voltage_v,
                              current_a, energy_kwh, temperature_c, reported_at)
           VALUES ('82231214002700-1', 2, 'idle', 0, 0, 230, 0, 0, 25, $1),
                  ('82231214002700-1', 1, 'charging', 1, 180.5, 229.1, 0.79, 1.25, 31, $1)""",
        T0,
    )
    response = await client.get("/api/v1/devices/82231214002700-1")
    assert response.status_code == 200
    body = response.json()
    assert body["device_id"] == "82231214002700-1"
    assert body["socket_no"] == 1
    assert body["last_heartbeat_at"] == "2024-05-01T08:00:00Z"  # UTC, with a zone
    assert [p["port"] for p in body["ports"]] == [1, 2]
    assert body["ports"][0] == {
        "port": 1,
        "status": "charging",
        "status_code": 1,
        "status_text": None,
        "power_w": 180.5,
        "voltage_v": 229.1,
        "current_a": 0.79,
        "energy_kwh": 1.25,
        "temperature_c": 31,
        "reported_at": "2024-05-01T08:00:00Z",
    }


@pytest.mark.parametrize("suffix", ["", "/events", "/frames"])
async def test_unknown_device_is_404(client: httpx.AsyncClient, suffix: str) -> None:
    response = await client.get(f"/api/v1/devices/04CEAA40{suffix}")
    assert response.status_code == 404
    assert response.json() == {
        "error": {
            "code": "not_found",
            "message": "device 04CEAA40 not found",
            "field": None,
            "details": [],
        }
    }


# ---------------------------------------------------------------- events and frames


async def test_events_window_kind_and_pagination(
    client: httpx.AsyncClient, db_pool: asyncpg.Pool
) -> None:
    await add_device(db_pool, "04CEAA40")
    await add_device(db_pool, "04CEAA41")
    for minute in range(30):
        # two events share each timestamp: the id breaks the tie
        await add_event(db_pool, "04CEAA40", T0 + dt.timedelta(minutes=minute), "online")
        await add_event(
            db_pool, "04CEAA40", T0 + dt.timedelta(minutes=minute), "offline", "heartbeat_timeout"
        )
    await add_event(db_pool, "04CEAA41", T0, "online")

    url = "/api/v1/devices/04CEAA40/events"
    keys, pages = await collect(client, url, {"limit": 7}, lambda e: (e["at"], e["id"]))
    assert (len(keys), pages) == (60, 9)
    assert keys == sorted(keys)
    assert len(set(keys)) == 60

    body = (await client.get(url, params={"limit": 1})).json()
    assert body["items"][0] == {
        "id": body["items"][0]["id"],
        "at": "2024-05-01T08:00:00Z",
        "kind": "online",
        "reason": None,
        "detail": {"source": "test"},
    }
    window = {"since": "2024-05-01T08:10:00Z", "until": "2024-05-01T08:20:00Z", "kind": "offline"}
    items = (await client.get(url, params=window)).json()["items"]
    assert [e["at"][11:16] for e in items] == [f"08:{m}" for m in range(10, 20)]
    assert {e["reason"] for e in items} == {"heartbeat_timeout"}
    # a zone other than UTC, and a timestamp without a zone (taken as UTC)
    local = {"since": "2024-05-01T16:29:00+08:00", "until": "2024-05-01T09:00:00"}
    assert len((await client.get(url, params=local)).json()["items"]) == 2


async def test_frames_window_direction_and_pagination(
    client: httpx.AsyncClient, db_pool: asyncpg.Pool
) -> None:
    now = dt.datetime.now(UTC)
    await add_device(db_pool, "04CEAA40")
    await add_frame(db_pool, "04CEAA40", now - dt.timedelta(days=3))  # outside the default
    for i in range(12):
        at = now - dt.timedelta(hours=2) + dt.timedelta(seconds=i)
        await add_frame(db_pool, "04CEAA40", at, "in" if i % 3 else "out")
    await add_frame(db_pool, "04CEAA41", now - dt.timedelta(hours=1))  # another device

    url = "/api/v1/devices/04CEAA40/frames"
    keys, pages = await collect(client, url, {"limit": 5}, lambda f: (f["received_at"], f["id"]))
    assert (len(keys), pages) == (12, 3)
    assert keys == sorted(keys)
    outgoing = (await client.get(url, params={"direction": "out"})).json()["items"]
    assert [f["direction"] for f in outgoing] == ["out"] * 4
    assert outgoing[0]["received_at"].endswith("Z")
    assert set(outgoing[0]) == {
        "id",
        "received_at",
        "connection_id",
        "device_id",
        "direction",
        "protocol",
        "command",
        "hex",
        "error",
        "decoded",
    }
    since = (now - dt.timedelta(days=4)).isoformat()
    assert len((await client.get(url, params={"since": since})).json()["items"]) == 13


async def test_frames_window_longer_than_31_days_is_422(client: httpx.AsyncClient) -> None:
    url = "/api/v1/devices/04CEAA40/frames"
    response = await client.get(
        url, params={"since": "2024-01-01T00:00:00Z", "until": "2024-02-02T00:00:00Z"}
    )
    assert response.status_code == 422
    assert "31 days" in response.json()["error"]["details"][0]["message"]
    response = await client.get(
        url, params={"since": "2024-01-02T00:00:00Z", "until": "2024-01-01T00:00:00Z"}
    )
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "since"


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("url", "field"),
    [
        ("/api/v1/devices?limit=0", "limit"),
        ("/api/v1/devices?limit=5000", "limit"),
        ("/api/v1/devices?limit=ten", "limit"),
        ("/api/v1/devices?protocol=xyz", "protocol"),
        ("/api/v1/devices?online=maybe", "online"),
        ("/api/v1/gateways?protocol=ocpp", "protocol"),
        ("/api/v1/devices/04CEAA40/events?since=yesterday", "since"),
        ("/api/v1/devices/04CEAA40/events?kind=nope", "kind"),
        ("/api/v1/devices/04CEAA40/frames?until=2024-13-01T00:00:00Z", "until"),
        ("/api/v1/devices/04CEAA40/frames?direction=sideways", "direction"),
    ],
)
async def test_bad_query_values_are_422(
    offline_client: httpx.AsyncClient, url: str, field: str
) -> None:
    response = await offline_client.get(url)
    assert response.status_code == 422
    (error,) = response.json()["error"]["details"]
    assert (error["location"], error["field"]) == ("query", field)


def _cursor(payload: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    ("url", "cursor", "message"),
    [
        ("/api/v1/devices", "!!!not-base64!!!", "malformed cursor"),
        ("/api/v1/devices", "bm90IGpzb24", "malformed cursor"),  # "not json"
        ("/api/v1/devices", _cursor([1, 2]), "not a cursor of this list"),
        ("/api/v1/devices", _cursor({"k": "devices", "v": [42]}), "malformed cursor"),
        ("/api/v1/devices", _cursor({"k": "gateways", "v": ["A"]}), "not a cursor of this list"),
        ("/api/v1/gateways", _cursor({"k": "devices", "v": ["A"]}), "not a cursor of this list"),
        (
            "/api/v1/devices/04CEAA40/events",
            _cursor({"k": "events", "v": ["yesterday", 1]}),
            "malformed cursor",
        ),
        (
            "/api/v1/devices/04CEAA40/events",
            _cursor({"k": "events", "v": ["2024-05-01T08:00:00", 1]}),
            "malformed cursor",
        ),
        (
            "/api/v1/devices/04CEAA40/frames",
            _cursor({"k": "events", "v": ["2024-05-01T08:00:00+00:00", 1]}),
            "not a cursor of this list",
        ),
    ],
)
async def test_bad_cursors_are_422(
    offline_client: httpx.AsyncClient, url: str, cursor: str, message: str
) -> None:
    response = await offline_client.get(url, params={"cursor": cursor})
    assert response.status_code == 422
    (error,) = response.json()["error"]["details"]
    assert (error["location"], error["field"]) == ("query", "cursor")
    assert message in error["message"]
