"""The order list's filters (``GET /api/v1/orders``): stop reason, start mode and
device-initiated besides device, status, time and review; each validated like ``status``
(an unknown value is a 422 in the API's error shape), all combined, across pages.

Against real PostgreSQL: orders made by a simulated AP3000 pile through the API, and rows
written the way the settlement paths write them for the shapes a pile cannot be asked for
(a card session that ran out, a device-initiated one, a session marked for review).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import asyncpg
import httpx
import pytest

from chargegw.app import Gateway
from chargegw.domain.orders import AP3000_STOP_REASONS, StopReason
from chargesim import SimulatedAp3000Pile, Simulator

from .test_api_errors import error_of
from .waiting import eventually, eventually_json

PHY = "04000001"
T0 = dt.datetime(2026, 3, 1, 8, 0, tzinfo=dt.UTC)


@pytest.fixture
def gateway_settings() -> dict[str, Any]:
    return {"ack_timeout_s": 1.0, "command_spacing_s": 0.2}


async def _order(
    pool: asyncpg.Pool,
    order_no: str,
    *,
    device_id: str = "04000002",
    status: str = "settled",
    start_mode: str = "online",
    device_initiated: bool = False,
    stop_reason: str | None = None,
    minutes: int = 0,
    review: str | None = None,
) -> None:
    await pool.execute(
        """INSERT INTO orders (order_no, device_id, port, protocol, status, start_mode,
                               device_initiated, stop_reason, created_at, review_reason)
           VALUES ($1, $2, 1, 'ap3000', $3, $4, $5, $6, $7, $8)""",
        order_no,
        device_id,
        status,
        start_mode,
        device_initiated,
        stop_reason,
        T0 + dt.timedelta(minutes=minutes),
        review,
    )


async def _registered(gateway: Gateway) -> bool:
    """The pile is connected here and its device row is written."""
    await gateway.writer.drained()
    assert gateway.pool is not None
    known = await gateway.pool.fetchval("SELECT 1 FROM devices WHERE device_id = $1", PHY)
    return bool(known) and gateway.sessions.link_of(PHY) is not None


async def _numbers(api: httpx.AsyncClient, **query: Any) -> list[str]:
    response = await api.get("/api/v1/orders", params=query)
    assert response.status_code == 200, response.text
    return [item["order_no"] for item in response.json()["items"]]


@pytest.fixture
async def orders(gateway: Gateway) -> asyncpg.Pool:
    """Five orders of two devices, created a minute apart (A oldest)."""
    pool = gateway.pool
    assert pool is not None
    await _order(pool, "A" * 32, stop_reason="full", minutes=0)
    await _order(pool, "B" * 32, start_mode="card", stop_reason="time_limit", minutes=1)
    await _order(
        pool,
        "C" * 32,
        start_mode="device",
        device_initiated=True,
        stop_reason="unplugged",
        minutes=2,
        review="order number X belongs to device Y",
    )
    await _order(pool, "D" * 32, device_id="04000003", status="charging", minutes=3)
    await _order(
        pool, "E" * 32, start_mode="card", device_initiated=True, stop_reason="full", minutes=4
    )
    return pool


async def test_each_new_filter_alone_and_combined(
    orders: asyncpg.Pool, api: httpx.AsyncClient
) -> None:
    a, b, c, d, e = ("A" * 32, "B" * 32, "C" * 32, "D" * 32, "E" * 32)
    assert await _numbers(api) == [e, d, c, b, a]
    assert await _numbers(api, stop_reason="full") == [e, a]
    assert await _numbers(api, stop_reason="server_stop") == []
    assert await _numbers(api, start_mode="card") == [e, b]
    assert await _numbers(api, start_mode="device") == [c]
    assert await _numbers(api, device_initiated="true") == [e, c]
    assert await _numbers(api, device_initiated="false") == [d, b, a]
    # with each other and with the filters there were before
    assert await _numbers(api, stop_reason="full", device_initiated="false") == [a]
    assert await _numbers(api, start_mode="card", device_initiated="true") == [e]
    assert await _numbers(api, start_mode="online", device_id="04000003") == [d]
    assert await _numbers(api, start_mode="online", status="settled") == [a]
    assert await _numbers(api, device_initiated="true", review="true") == [c]
    since, until = (T0 + dt.timedelta(minutes=1)).isoformat(), (T0 + dt.timedelta(minutes=4))
    assert await _numbers(api, start_mode="card", since=since, until=until.isoformat()) == [b]


async def test_pages_keep_the_filters(orders: asyncpg.Pool, api: httpx.AsyncClient) -> None:
    seen, cursor = [], None
    while True:
        query = {"stop_reason": "full", "limit": 1, **({"cursor": cursor} if cursor else {})}
        page = (await api.get("/api/v1/orders", params=query)).json()
        seen += [item["order_no"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ["E" * 32, "A" * 32]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("stop_reason", "bored"),
        ("stop_reason", "FULL"),
        ("start_mode", "app"),
        ("device_initiated", "perhaps"),
        ("status", "paid"),
    ],
)
async def test_unknown_values_are_422_in_the_error_shape(
    gateway: Gateway, api: httpx.AsyncClient, name: str, value: str
) -> None:
    error = error_of(await api.get("/api/v1/orders", params={name: value}), 422)
    assert error["code"] == "validation_failed"
    (detail,) = error["details"]
    assert (detail["location"], detail["field"]) == ("query", name)


def test_every_stop_reason_a_driver_gives_is_a_filter_value() -> None:
    values = {reason.value for reason in StopReason}
    assert set(AP3000_STOP_REASONS.values()) <= values
    # BKV's (drivers/bkv.py _stop_reason) and the fallback for an unmapped code
    assert {"server_stop", "time_limit", "energy_limit", "unknown"} <= values


async def test_a_session_stopped_through_the_api_is_found_by_its_filters(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    pile = SimulatedAp3000Pile(PHY, ports=2, heartbeat_s=180)
    sim = Simulator("127.0.0.1", gateway.server.port, [pile], accel=120.0, jitter=0, seed=1)
    await sim.start()
    async with sim:
        await sim.wait_connected(1, timeout=10)
        await eventually(lambda: _registered(gateway), what=f"{PHY} connected and registered")
        started = await api.post(f"/api/v1/devices/{PHY}/ports/1/start", json={"mode": "full"})
        assert started.status_code == 202, started.text
        order_no = started.json()["order_no"]
        await eventually_json(api, f"/api/v1/orders/{order_no}", "status", {"charging"})
        assert await _numbers(api, device_id=PHY, status="charging", start_mode="online") == [
            order_no
        ]
        assert (await api.post(f"/api/v1/devices/{PHY}/ports/1/stop")).status_code == 202
        await eventually_json(api, f"/api/v1/orders/{order_no}", "status", {"settled"})
    found = await _numbers(
        api, device_id=PHY, stop_reason="server_stop", start_mode="online", device_initiated="false"
    )
    assert found == [order_no]
    assert await _numbers(api, device_id=PHY, stop_reason="full") == []
    assert await _numbers(api, device_id=PHY, device_initiated="true") == []
