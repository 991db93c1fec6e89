"""Settlement and money safety (issue 11, findings 3, 7 and the settlement part of 8):
every charging session ends in exactly one settlement, stored and acknowledged whatever
the device resends, whatever the rate plan says, whichever process receives it.

Everything goes over real TCP (byte-level piles from ``piles.py``) into a real gateway on
a real PostgreSQL, and is checked through the HTTP API and the database rows.

Races are made deterministic instead of hoped for: the test holds an ``EXCLUSIVE`` lock
on a table the racing transactions write to, waits (in ``pg_stat_activity``) until every
one of them is blocked inside its transaction, then lets them all go at once. That is the
interleaving a real race produces, every time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, TypeVar

import asyncpg
import httpx
import pytest

from chargegw.api import billing as billing_api
from chargegw.api import commands as commands_api
from chargegw.api.app import ApiState, create_app
from chargegw.app import Gateway
from chargegw.domain.orders import new_order_no
from chargeproto import ABSENT, Message, ap3000, bkv

from .conftest import settings_for
from .piles import RawBkvGateway, RawPile
from .waiting import eventually

T = TypeVar("T")
M = TypeVar("M", bound=Message)

PHY_A = "04000101"
PHY_B = "04000102"
GW = "82231214000011"
DEVICE = f"{GW}-1"
CARD = "0A1B2C3D"
BEIJING = timezone(timedelta(hours=8))
#: 100 000 000 cent per kWh: what the old validation accepted (1 000 000 CNY)
ABSURD_CENT = 100_000_000
INT4_MAX = 2**31 - 1
POWER_TIERS = {
    "tiers": [
        {"power_w": 200, "price_cent": 25, "duration_min": 60},
        {"power_w": 400, "price_cent": 50, "duration_min": 60},
        {"power_w": 2000, "price_cent": 500, "duration_min": 120},
    ]
}
#: the SQL of the transactions the races below block (the test's lock waits list them)
RACING_SQL = r"INSERT INTO (orders|commands|idempotency_keys)"


@pytest.fixture
def gateway_settings() -> dict[str, Any]:
    return {"ack_timeout_s": 1.0, "command_spacing_s": 0.2}


def _client(gateway: Gateway, **state: Any) -> httpx.AsyncClient:
    state.setdefault("services", gateway.api_services())
    api_state = ApiState(
        pool=gateway.pool, metrics=gateway.metrics, readiness=gateway.readiness, **state
    )
    app = create_app(api_state, routers=[commands_api.router, billing_api.router])
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.fixture
async def api(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    """Commands, orders and billing of ``gateway``, without authentication."""
    async with _client(gateway, auth_required=False) as client:
        yield client


# -- helpers ------------------------------------------------------------------------------


def _pool(gateway: Gateway) -> asyncpg.Pool:
    assert gateway.pool is not None
    return gateway.pool


async def _orders(gateway: Gateway, device_id: str) -> list[dict[str, Any]]:
    rows = await _pool(gateway).fetch(
        "SELECT * FROM orders WHERE device_id = $1 ORDER BY created_at, order_no", device_id
    )
    return [dict(r) for r in rows]


async def _open_orders(gateway: Gateway, device_id: str, port: int) -> list[str]:
    rows = await _pool(gateway).fetch(
        """SELECT order_no FROM orders WHERE device_id = $1 AND port = $2
           AND status IN ('pending', 'starting', 'charging', 'stopping')""",
        device_id,
        port,
    )
    return [r["order_no"] for r in rows]


async def _settlement_events(gateway: Gateway, device_id: str) -> list[str]:
    """The reasons of the device's settlement events (``applied`` / ``duplicate``), in order."""
    await gateway.writer.drained()
    rows = await _pool(gateway).fetch(
        """SELECT reason FROM device_events WHERE device_id = $1 AND kind = 'settlement'
           ORDER BY id""",
        device_id,
    )
    return [r["reason"] for r in rows]


async def _pile(gateway: Gateway, phy_id: str) -> RawPile:
    """An AP3000 pile with two ports, registered and known to the database."""
    pile = await RawPile(phy_id).connect(gateway.server.port)
    await pile.register(ports=2)
    await pile.expect(ap3000.RegistrationReply)
    await pile.heartbeat()
    await pile.expect(ap3000.HeartbeatReply)

    async def known() -> bool:
        await gateway.writer.drained()
        return bool(
            await _pool(gateway).fetchval(
                "SELECT 1 FROM devices WHERE device_id = $1 AND port_count = 2", phy_id
            )
        )

    await eventually(known, bool, what=f"device {phy_id} registered")
    return pile


def _jack(
    port: int, *, business_no: int = 0, power_w: float = 0.0, minutes: int = 0
) -> bkv.JackStatus:
    return bkv.JackStatus(
        port=port,
        status_bits=0x90 if business_no else 0x80,  # online, charging / online, idle
        business_no=business_no,
        voltage_v=220.0,
        power_w=power_w,
        current_a=round(power_w / 220.0, 3),
        energy_kwh=round(power_w * minutes / 60_000, 3),
        duration_min=minutes,
    )


def _cluster(gateway_id: str, jack_a: bkv.JackStatus | None = None) -> bkv.StatusCluster:
    """A 0x1000/0x1017 status cluster of socket 1: jack A as given (idle by default), jack
    B idle."""
    socket = bkv.SocketStatus(
        socket=1,
        firmware_version=0x5136,
        temperature_c=30,
        signal_strength=25,
        ports=(jack_a or _jack(0), _jack(1)),
    )
    return bkv.StatusCluster.create(gateway_id, 0, sockets=(socket,))


async def _bkv_box(gateway: Gateway, gateway_id: str = GW) -> RawBkvGateway:
    """A BKV gateway whose socket 1 (two jacks) is known to the database."""
    box = await RawBkvGateway().connect(gateway.server.port)
    await box.send_raw(bkv.encode(_cluster(gateway_id)))
    await box.expect(bkv.StatusClusterAck)
    device_id = f"{gateway_id}-1"

    async def known() -> bool:
        await gateway.writer.drained()
        return bool(
            await _pool(gateway).fetchval(
                "SELECT 1 FROM devices WHERE device_id = $1 AND port_count = 2", device_id
            )
        )

    await eventually(known, bool, what=f"socket {device_id} known")
    return box


def _end_report(business_no: int = 42, **changes: Any) -> bkv.EndReport:
    """A 0x0015/0x02 end report of socket 1, jack A: 45 min, 0.08 kWh."""
    report = bkv.EndReport(
        GW,
        0,
        socket=1,
        firmware_version=0x5136,
        temperature_c=30,
        signal_strength=25,
        port=0,
        status_bits=0xB0,
        business_no=business_no,
        power_w=0.0,
        current_a=0.0,
        energy_kwh=0.08,
        duration_min=45,
    )
    return dataclasses.replace(report, **changes)


def _fee_end_report(business_no: int | None = None, **changes: Any) -> bkv.FeeModeEndReport:
    """A 0x1000/0x1004 fee-mode end report of socket 1, jack A: 42 min, 0.321 kWh; tag 0x0A
    (the business number) left out unless given."""
    report = bkv.FeeModeEndReport.create(
        GW,
        7,
        temperature_c=31,
        socket=1,
        port=0,
        status_bits=0xA0,
        business_no=ABSENT if business_no is None else business_no,
        power_w=0.0,
        current_a=0.0,
        energy_kwh=0.321,
        duration_min=42,
        end_reason=1,
        charge_mode=4,
        electricity_fee_cent=12,
        service_fee_cent=3,
    )
    return dataclasses.replace(report, **changes)


def _beijing(moment: datetime) -> str:
    """A BKV device time: Beijing local time, whole seconds."""
    return moment.astimezone(BEIJING).strftime("%Y-%m-%dT%H:%M:%S")


def _settlement(
    pile: RawPile,
    order_id: str,
    *,
    duration_s: int = 1800,
    energy_kwh: float = 0.42,
    max_power_w: float = 180.0,
    port: int = 0,
    ended_at: datetime | None = None,
) -> ap3000.Settlement:
    """An AP3000 0x03 settlement (``ended_at``: the device's own end time, 8.6 tail)."""
    tail: dict[str, Any] = {}
    if ended_at is not None:
        tail = {"second_max_power_w": 0.0, "timestamp_unix": int(ended_at.timestamp())}
    return ap3000.Settlement(
        pile.phy_id,
        pile.next_id(),
        duration_s=duration_s,
        max_power_w=max_power_w,
        energy_kwh=energy_kwh,
        port=port,
        start_mode=1,
        card_id="00000000",
        stop_reason=1,
        order_id=order_id,
        **tail,
    )


async def _answer(connection: Any, cls: type[M], what: str, timeout: float = 5.0) -> M:
    """The next ``cls`` the server sends on ``connection``; an assertion names ``what``
    went unanswered (a device resends it forever)."""
    try:
        message = await connection.expect(cls, timeout=timeout)
    except TimeoutError:
        raise AssertionError(f"{what}: no {cls.__name__} within {timeout} s") from None
    assert isinstance(message, cls)
    return message


async def _settle(pile: RawPile, settlement: ap3000.Settlement) -> ap3000.SettlementReply:
    """Send a settlement; its answer must come (the pile resends forever otherwise)."""
    await pile.send(settlement)
    reply = await _answer(pile, ap3000.SettlementReply, "the settlement")
    assert (reply.msg_id, reply.result) == (settlement.msg_id, 0)
    return reply


async def _sql_plan(gateway: Gateway, device_id: str, kind: str, params: dict[str, Any]) -> None:
    """A rate plan written straight into the table, as plans stored before today's
    validation (or by hand) are: nothing checks its parameters."""
    pool = _pool(gateway)
    await pool.execute(
        "INSERT INTO rate_plans (name, kind, parameters) VALUES ($1, $2, $3)",
        f"sql-{kind}",
        kind,
        json.dumps(params),
    )
    await pool.execute(
        "INSERT INTO device_rate_plans (device_id, plan) VALUES ($1, $2)",
        device_id,
        f"sql-{kind}",
    )


async def _api_plan(
    api: httpx.AsyncClient, device_id: str, kind: str, params: dict[str, Any]
) -> None:
    response = await api.post(
        "/api/v1/rate-plans", json={"name": f"{kind}-plan", "kind": kind, "parameters": params}
    )
    assert response.status_code == 201, response.text
    response = await api.put(
        f"/api/v1/devices/{device_id}/rate-plan", json={"plan": f"{kind}-plan"}
    )
    assert response.status_code == 200, response.text


async def _reconciliation(api: httpx.AsyncClient, day: Any) -> dict[str, dict[str, Any]]:
    """The reconciliation items of a UTC day, by order number."""
    response = await api.get("/api/v1/reports/reconciliation", params={"date": day.isoformat()})
    assert response.status_code == 200, response.text
    return {item["order_no"]: item for item in response.json()["items"]}


async def _ack_outcome(box: RawBkvGateway, cls: type[bkv.BkvMessage], timeout: float = 5.0) -> str:
    """``acked`` if ``box`` gets a ``cls``; ``closed`` if the server closed the connection
    first (a process superseded by another one's newer connection); else ``silent``."""
    try:
        await box.expect(cls, timeout=timeout)
    except ConnectionError:
        return "closed"
    except AssertionError as exc:
        return "closed" if "connection closed" in str(exc) else "silent"
    except TimeoutError:
        return "silent"
    return "acked"


class _HeldTable:
    """A transaction holding ``LOCK TABLE ... IN EXCLUSIVE MODE``: writers of the table
    wait inside their own transactions until it ends (readers go on)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    async def waiting(self, count: int, sql: str, timeout: float = 10.0) -> None:
        """Until ``count`` backends wait for a lock in a statement matching ``sql``."""
        conn = await asyncpg.connect(self.dsn)  # outside the held transaction's snapshot
        try:

            async def waiters() -> list[str]:
                rows = await conn.fetch(
                    """SELECT query FROM pg_stat_activity
                       WHERE datname = current_database() AND pid <> pg_backend_pid()
                         AND wait_event_type = 'Lock' AND query ~* $1""",
                    sql,
                )
                return [r["query"] for r in rows]

            await eventually(
                waiters, lambda q: len(q) >= count, timeout=timeout, what=f"{count} waiting"
            )
        finally:
            await conn.close()


@contextlib.asynccontextmanager
async def _writes_held(dsn: str, table: str) -> AsyncIterator[_HeldTable]:
    """Hold writes to ``table`` for the block; they all go on when it ends."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")
            yield _HeldTable(dsn)
    finally:
        await conn.close()


# -- finding 3: BKV settlements applied once ------------------------------------------------


@pytest.mark.parametrize("end_time", [True, False], ids=["with-end-time", "without-end-time"])
async def test_fee_mode_end_report_without_business_number_settles_once_and_is_acked(
    gateway: Gateway, end_time: bool
) -> None:
    """A 0x1004 end report without tag 0x0A, sent three times (the gateway resends until
    answered), is one settled order, and every copy gets its 0x1004 ACK.

    Old main: each copy became another settled device-initiated order."""
    box = await RawBkvGateway().connect(gateway.server.port)
    try:
        changes: dict[str, Any] = {}
        if end_time:
            changes["end_time"] = _beijing(gateway.wall() - timedelta(minutes=1))
        report = _fee_end_report(**changes)
        for copy in range(3):
            await box.send_raw(bkv.encode(report))
            ack = await _answer(box, bkv.FeeModeEndAck, f"copy {copy} of the end report")
            assert (ack.socket, ack.port, ack.result) == (1, 0, 1)
        orders = await _orders(gateway, DEVICE)
        assert len(orders) == 1, [o["order_no"] for o in orders]
        order = orders[0]
        assert order["status"] == "settled" and order["device_initiated"]
        assert order["business_no"] is None and order["port"] == 1
        assert order["duration_s"] == 42 * 60
        assert order["energy_kwh"] == pytest.approx(0.321)
        assert await _settlement_events(gateway, DEVICE) == ["applied", "duplicate", "duplicate"]
    finally:
        await box.close()


def _resends(kind: str) -> tuple[list[bkv.BkvMessage], type[bkv.BkvMessage]]:
    """Three copies of one end report whose live readings move; the ACK class."""
    if kind == "0x0015/0x02":
        base = _end_report(business_no=42)
        return [
            dataclasses.replace(base, temperature_c=30 + i, signal_strength=25 - i)
            for i in range(3)
        ], bkv.CardEndAck
    fee = _fee_end_report(business_no=43 if kind == "0x1004" else None)
    return [
        dataclasses.replace(
            fee, temperature_c=31 + i, power_w=round(0.1 * i, 1), current_a=round(0.001 * i, 3)
        )
        for i in range(3)
    ], bkv.FeeModeEndAck


@pytest.mark.parametrize("kind", ["0x0015/0x02", "0x1004", "0x1004-without-0x0A"])
async def test_resent_end_report_with_other_live_readings_is_one_settlement(
    gateway: Gateway, kind: str
) -> None:
    """Resends of one end report whose temperature / signal / residual power moved are
    one settlement (the session is identified by device, port, business number or its
    own values; live readings never count), and each copy is acknowledged.

    Old main: duplicates were recognised by the whole decoded frame, so every copy with
    another reading was another settled order."""
    copies, ack_class = _resends(kind)
    box = await RawBkvGateway().connect(gateway.server.port)
    try:
        for copy in copies:
            await box.send_raw(bkv.encode(copy))
            await _answer(box, ack_class, f"a resent {type(copy).__name__}")
        orders = await _orders(gateway, DEVICE)
        assert len(orders) == 1, [(o["order_no"], o["settlement"]) for o in orders]
        assert orders[0]["status"] == "settled"
        assert await _settlement_events(gateway, DEVICE) == ["applied", "duplicate", "duplicate"]
    finally:
        await box.close()


async def test_resends_on_two_gateway_processes_at_once_make_one_order(
    gateway: Gateway, db_dsn: str, gateway_settings: dict[str, Any]
) -> None:
    """The same device-initiated end report arriving at two gateway processes at the same
    moment (the gateway reconnected to another worker and resent) is one order: the port
    is locked in the database, so the two are decided one after the other.

    The two settlements are held inside their transactions (a lock on ``orders``) until
    both are in flight, then released together. Old main: each process found no order
    and made its own, two settled orders for one session."""
    other = Gateway(settings_for(db_dsn, node="second-process", **gateway_settings))
    await other.start(http=False)
    boxes: list[RawBkvGateway] = []
    try:
        report = bkv.encode(_end_report(business_no=77))
        async with _writes_held(db_dsn, "orders") as held:
            for process in (gateway, other):
                box = await RawBkvGateway().connect(process.server.port)
                boxes.append(box)
                await box.send_raw(report)
            await held.waiting(2, r"orders|pg_advisory")
        outcomes = await asyncio.gather(*(_ack_outcome(box, bkv.CardEndAck) for box in boxes))
        # each copy is acknowledged, unless its process was superseded and hung up
        assert "acked" in outcomes and "silent" not in outcomes, outcomes
        events = await eventually(
            lambda: _settlement_events(gateway, DEVICE),
            lambda reasons: len(reasons) >= 2,
            what="both copies decided",
        )
        orders = await _orders(gateway, DEVICE)
        assert len(orders) == 1, [(o["order_no"], o["status"]) for o in orders]
        assert orders[0]["status"] == "settled" and orders[0]["business_no"] == 77
        assert sorted(events) == ["applied", "duplicate"]
    finally:
        for box in boxes:
            await box.close()
        await other.stop()


# -- finding 7: money edge cases ------------------------------------------------------------


async def test_settlement_that_cannot_be_priced_is_stored_acked_and_listed_for_review(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    """A settlement on a device whose rate plan cannot be priced (a plan row without its
    price, written by hand) is stored and acknowledged, with the pricing error, and
    ``GET /api/v1/orders?review=true`` lists it; a resend changes nothing.

    Old main: pricing raised inside the settlement's transaction, nothing was stored and
    no answer went out (the pile resends forever)."""
    pile = await _pile(gateway, PHY_A)
    try:
        await _sql_plan(gateway, PHY_A, "per_hour", {})  # no cent_per_hour
        order_no = new_order_no()
        settlement = _settlement(pile, order_no)
        await _settle(pile, settlement)
        order = (await api.get(f"/api/v1/orders/{order_no}")).json()
        assert order["status"] == "settled" and order["device_id"] == PHY_A
        assert order["pricing_error"] and "cent_per_hour" in order["pricing_error"]
        assert order["review_reason"] == "pricing_error"
        review = (await api.get("/api/v1/orders", params={"review": "true"})).json()
        assert [o["order_no"] for o in review["items"]] == [order_no]
        fine = (await api.get("/api/v1/orders", params={"review": "false"})).json()
        assert fine["items"] == []
        # the pile did not get the answer and resends: the same order, answered again
        await _settle(pile, dataclasses.replace(settlement, msg_id=pile.next_id()))
        again = (await api.get(f"/api/v1/orders/{order_no}")).json()
        assert again == order
        assert await _settlement_events(gateway, PHY_A) == ["applied", "duplicate"]
    finally:
        await pile.close()


@pytest.mark.parametrize(
    ("kind", "params", "field"),
    [
        ("per_kwh", {"cent_per_kwh": ABSURD_CENT}, "cent_per_kwh"),
        ("per_hour", {"cent_per_hour": ABSURD_CENT}, "cent_per_hour"),
        (
            "power_tier",
            {"tiers": [{"power_w": 200, "price_cent": ABSURD_CENT, "duration_min": 60}]},
            "tiers[0].price_cent",
        ),
        (
            "fee_tier",
            {
                "tiers": [
                    {"until": "24:00", "electricity_cent_per_kwh": 60, "service_cent": ABSURD_CENT}
                ]
            },
            "tiers[0].service_cent",
        ),
    ],
)
async def test_rate_plan_with_an_absurd_price_is_refused_naming_the_field(
    api: httpx.AsyncClient, kind: str, params: dict[str, Any], field: str
) -> None:
    """A rate plan priced at 1 000 000 CNY per unit is a typo: 422 naming the field.

    Old main: accepted (the bound was 100 000 000 cent), and such a plan overflowed the
    order amount at settlement."""
    response = await api.post(
        "/api/v1/rate-plans", json={"name": "typo", "kind": kind, "parameters": params}
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field
    assert (await api.get("/api/v1/rate-plans")).json()["items"] == []


async def test_an_amount_beyond_32_bits_is_stored_and_acked(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    """A settlement priced above 2^31 - 1 cent (a mistyped plan stored before prices were
    bounded: 1 000 000 CNY per kWh, 30 kWh) is stored with its amount and acknowledged.

    Old main: ``orders.amount_cent`` was ``integer``; the settlement's transaction failed
    with an out-of-range error, no answer went out, and the pile resent it forever."""
    pile = await _pile(gateway, PHY_A)
    try:
        await _sql_plan(gateway, PHY_A, "per_kwh", {"cent_per_kwh": ABSURD_CENT})
        order_no = new_order_no()
        await _settle(pile, _settlement(pile, order_no, energy_kwh=30.0))
        order = (await api.get(f"/api/v1/orders/{order_no}")).json()
        expected = 3000 * ABSURD_CENT // 100  # 3000 hundredths of a kWh
        assert expected > INT4_MAX
        assert order["status"] == "settled" and order["amount_cent"] == expected
        item = (await _reconciliation(api, gateway.wall().date()))[order_no]
        assert item["amount_cent"] == expected
    finally:
        await pile.close()


async def test_settlement_naming_another_devices_order_never_touches_it(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    """Pile B settles with the order number of an order on device A: A's order stays as
    it was; B's session becomes a new order of B, marked for review, acknowledged; a
    resend of B's settlement changes nothing.

    Old main: the settlement was applied to A's order (settled with B's figures)."""
    pile_a = await _pile(gateway, PHY_A)
    await pile_a.close()  # offline: its start waits, the order stays pending
    started = await api.post(f"/api/v1/devices/{PHY_A}/ports/1/start", json={"mode": "full"})
    assert started.status_code == 202, started.text
    order_a = started.json()["order_no"]
    before = (await api.get(f"/api/v1/orders/{order_a}")).json()
    assert before["status"] == "pending"
    pile_b = await _pile(gateway, PHY_B)
    try:
        settlement = _settlement(pile_b, order_a, energy_kwh=0.9)
        await _settle(pile_b, settlement)
        assert (await api.get(f"/api/v1/orders/{order_a}")).json() == before
        items = (await api.get("/api/v1/orders", params={"device_id": PHY_B})).json()["items"]
        assert len(items) == 1, items
        order_b = items[0]
        assert order_b["order_no"] != order_a and order_b["status"] == "settled"
        assert order_b["device_initiated"] and order_b["device_ref"] == order_a
        assert order_b["review_reason"] and PHY_A in order_b["review_reason"]
        assert order_b["energy_kwh"] == pytest.approx(0.9)
        review = (await api.get("/api/v1/orders", params={"review": "true"})).json()["items"]
        assert [o["order_no"] for o in review] == [order_b["order_no"]]

        await _settle(pile_b, dataclasses.replace(settlement, msg_id=pile_b.next_id()))
        assert (await api.get(f"/api/v1/orders/{order_a}")).json() == before
        again = (await api.get("/api/v1/orders", params={"device_id": PHY_B})).json()["items"]
        assert again == [order_b]
        assert await _settlement_events(gateway, PHY_B) == ["applied", "duplicate"]
    finally:
        await pile_b.close()


async def test_device_initiated_order_is_reported_on_the_devices_own_end_day(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    """A device-initiated session the pile ended yesterday 23:59 UTC (its 0x03 timestamp)
    and the server received today is in yesterday's reconciliation, not today's, and its
    pricing inputs say the time came from the device.

    Old main: billed and reported at the server's arrival time (today)."""
    pile = await _pile(gateway, PHY_A)
    try:
        await _api_plan(api, PHY_A, "per_hour", {"cent_per_hour": 120})
        today = gateway.wall().date()
        midnight = datetime(today.year, today.month, today.day, tzinfo=UTC)
        device_end = midnight - timedelta(minutes=1)
        order_no = new_order_no()
        await _settle(pile, _settlement(pile, order_no, duration_s=1800, ended_at=device_end))
        order = (await api.get(f"/api/v1/orders/{order_no}")).json()
        assert order["status"] == "settled" and order["device_initiated"]
        received = datetime.fromisoformat(order["ended_at"])
        assert received.date() > device_end.date()  # the server got it on a later day
        yesterday = await _reconciliation(api, today - timedelta(days=1))
        assert order_no in yesterday, sorted(yesterday)
        inputs = yesterday[order_no]["inputs"]
        assert inputs["billed_at_source"] == "device"
        assert datetime.fromisoformat(inputs["billed_at"]) == device_end
        assert yesterday[order_no]["amount_cent"] == 60  # 30 started minutes at 120/h
        assert order_no not in await _reconciliation(api, today)
    finally:
        await pile.close()


async def test_power_tier_order_ended_by_a_plain_end_report_is_priced_by_sampled_power(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    """A BKV order on a power-tier plan that ends with a plain 0x0015/0x02 end report
    (no settlement power) is priced by the highest power its status clusters reported,
    and the order and its pricing inputs say so (``max_power_source`` = samples).

    Old main: priced with max_power_w 0, always at the cheapest tier."""
    box = await _bkv_box(gateway)
    try:
        await _api_plan(api, DEVICE, "power_tier", POWER_TIERS)
        started = await api.post(
            f"/api/v1/devices/{DEVICE}/ports/1/start", json={"mode": "time", "duration_min": 60}
        )
        assert started.status_code == 202, started.text
        order_no = started.json()["order_no"]
        control = await box.expect(bkv.ChargeControl)
        assert isinstance(control, bkv.ChargeControl) and control.switch == 1
        reply = bkv.ChargeControlReply(GW, control.seq, result=1, socket=1, port=0, business_no=9)
        await box.send_raw(bkv.encode(reply))

        async def order() -> dict[str, Any]:
            body: dict[str, Any] = (await api.get(f"/api/v1/orders/{order_no}")).json()
            return body

        await eventually(
            order,
            lambda o: o["status"] == "charging" and o["business_no"] == 9,
            what="order charging",
        )
        for minutes, power in ((10, 150.0), (20, 350.0), (30, 180.0)):
            await box.send_raw(
                bkv.encode(_cluster(GW, _jack(0, business_no=9, power_w=power, minutes=minutes)))
            )
            await box.expect(bkv.StatusClusterAck)

        async def samples() -> list[dict[str, Any]]:
            body = (await api.get(f"/api/v1/orders/{order_no}/samples")).json()
            items: list[dict[str, Any]] = body["items"]
            return items

        await eventually(samples, lambda items: len(items) == 3, what="three samples")
        await box.send_raw(bkv.encode(_end_report(business_no=9, duration_min=60, energy_kwh=0.3)))
        await _answer(box, bkv.CardEndAck, "the end report")
        settled = await eventually(order, lambda o: o["status"] == "settled", what="order settled")
        assert settled["amount_cent"] == 50  # tier 1 (up to 400 W): 60 min at 50 per 60 min
        assert settled["max_power_source"] == "samples"
        assert settled["max_power_w"] == pytest.approx(350.0)
        inputs = (await _reconciliation(api, gateway.wall().date()))[order_no]["inputs"]
        assert inputs["max_power_source"] == "samples" and inputs["tier"] == 1
    finally:
        await box.close()


async def test_top_up_with_a_reference_is_applied_once(api: httpx.AsyncClient) -> None:
    """A card top-up with a payment ``reference`` raises the balance once: the same
    request again (also two at once) leaves it unchanged, the reference with another
    amount is a 409.

    Old main: every repeat raised the balance again."""
    created = await api.post("/api/v1/cards", json={"card_id": CARD, "balance_cent": 100})
    assert created.status_code == 201, created.text
    url = f"/api/v1/cards/{CARD}/top-up"
    first = await api.post(url, json={"amount_cent": 500, "reference": "pay-1"})
    assert first.status_code == 200 and first.json()["balance_cent"] == 600
    again = await api.post(url, json={"amount_cent": 500, "reference": "pay-1"})
    assert again.status_code == 200 and again.json()["balance_cent"] == 600
    other = await api.post(url, json={"amount_cent": 700, "reference": "pay-1"})
    assert other.status_code == 409 and "pay-1" in other.text
    both = await asyncio.gather(
        *(api.post(url, json={"amount_cent": 50, "reference": "pay-2"}) for _ in range(2))
    )
    assert [r.status_code for r in both] == [200, 200]
    card = (await api.get(f"/api/v1/cards/{CARD}")).json()
    assert card["balance_cent"] == 650
    top_ups = [(t["amount_cent"], t["reference"]) for t in card["transactions"]]
    assert sorted(top_ups, key=str) == sorted([(100, None), (500, "pay-1"), (50, "pay-2")], key=str)


# -- finding 7 (Idempotency-Key) and 8: starts ------------------------------------------------


async def test_idempotency_key_reused_for_another_request_is_422_and_scoped_per_api_key(
    gateway: Gateway,
) -> None:
    """An ``Idempotency-Key`` reused with another device, port or body answers 422 naming
    what differs; the same key sent with another API key is that key's own (a new order).

    Old main: the reuse silently returned the first order and started nothing."""
    keys = ("first-api-key-0123456789abcdef", "second-api-key-0123456789abcde")
    for phy in (PHY_A, PHY_B):
        await (await _pile(gateway, phy)).close()  # known, offline: starts wait
    async with _client(gateway, api_keys=frozenset(keys)) as client:

        async def start(
            key: str, device: str = PHY_A, port: int = 1, body: dict[str, Any] | None = None
        ) -> httpx.Response:
            return await client.post(
                f"/api/v1/devices/{device}/ports/{port}/start",
                json=body or {"mode": "full"},
                headers={"Authorization": f"Bearer {key}", "Idempotency-Key": "pay-7"},
            )

        first = await start(keys[0])
        assert first.status_code == 202, first.text
        order_no = first.json()["order_no"]
        repeat = await start(keys[0])
        assert repeat.status_code == 202 and repeat.json()["order_no"] == order_no
        for changes, conflict in (
            ({"port": 2}, ["port"]),
            ({"body": {"mode": "time", "duration_min": 30}}, ["body"]),
            ({"device": PHY_B}, ["device_id"]),
        ):
            reused = await start(keys[0], **changes)
            assert reused.status_code == 422, (changes, reused.text)
            detail = reused.json()["error"]
            assert detail["conflict"] == conflict and detail["order_no"] == order_no
        other_scope = await start(keys[1], port=2)
        assert other_scope.status_code == 202, other_scope.text
        second = other_scope.json()["order_no"]
        assert second != order_no
    assert await _open_orders(gateway, PHY_A, 1) == [order_no]
    assert await _open_orders(gateway, PHY_A, 2) == [second]
    assert await _open_orders(gateway, PHY_B, 1) == []


async def test_two_identical_starts_with_one_key_at_once_are_one_order(
    gateway: Gateway, api: httpx.AsyncClient, db_dsn: str
) -> None:
    """Two identical requests with one ``Idempotency-Key`` in flight at the same time:
    one order, and both get it.

    Both are held inside their transactions until both are in flight. Old main: the key
    was looked up before either stored it; the second request failed on the key's
    primary key (a 500) after opening its own order."""
    await (await _pile(gateway, PHY_A)).close()
    url = f"/api/v1/devices/{PHY_A}/ports/1/start"
    headers = {"Idempotency-Key": "pay-8"}
    async with _writes_held(db_dsn, "commands") as held:
        first = asyncio.create_task(api.post(url, json={"mode": "full"}, headers=headers))
        await held.waiting(1, RACING_SQL)
        second = asyncio.create_task(api.post(url, json={"mode": "full"}, headers=headers))
        await held.waiting(2, RACING_SQL)
    responses = await asyncio.gather(first, second, return_exceptions=True)
    for response in responses:
        assert isinstance(response, httpx.Response), repr(response)
        assert response.status_code == 202, response.text
    order_nos = {r.json()["order_no"] for r in responses if isinstance(r, httpx.Response)}
    assert len(order_nos) == 1
    assert await _open_orders(gateway, PHY_A, 1) == list(order_nos)
    assert len(await _orders(gateway, PHY_A)) == 1


async def test_two_starts_on_one_port_at_once_open_one_order(
    gateway: Gateway, api: httpx.AsyncClient, db_dsn: str
) -> None:
    """Two API starts on one port at the same moment: exactly one open order, the other
    request is a 409.

    Both are held inside their transactions until both are in flight. Old main: both had
    checked the port before either inserted; two open orders on one port."""
    await (await _pile(gateway, PHY_A)).close()
    url = f"/api/v1/devices/{PHY_A}/ports/1/start"
    async with _writes_held(db_dsn, "commands") as held:
        first = asyncio.create_task(api.post(url, json={"mode": "full"}))
        await held.waiting(1, RACING_SQL)
        second = asyncio.create_task(api.post(url, json={"mode": "time", "duration_min": 30}))
        await held.waiting(2, RACING_SQL)
    responses = await asyncio.gather(first, second, return_exceptions=True)
    statuses = [r.status_code if isinstance(r, httpx.Response) else repr(r) for r in responses]
    assert statuses == [202, 409], statuses
    assert isinstance(responses[0], httpx.Response)
    assert await _open_orders(gateway, PHY_A, 1) == [responses[0].json()["order_no"]]


async def test_api_start_and_card_swipe_on_one_port_at_once_open_one_order(
    gateway: Gateway, api: httpx.AsyncClient, db_dsn: str
) -> None:
    """An API start and a card swipe on the same port at the same moment: exactly one open
    order (the start's), and the swipe is answered "port unavailable" (0x08).

    Both are held inside their transactions until both are in flight. Old main: both
    opened an order on the port."""
    pile = await _pile(gateway, PHY_A)
    try:
        await _api_plan(api, PHY_A, "per_hour", {"cent_per_hour": 120})
        card = await api.post("/api/v1/cards", json={"card_id": CARD, "balance_cent": 500})
        assert card.status_code == 201, card.text
        swipe = ap3000.CardSwipe(
            PHY_A, pile.next_id(), card_id=CARD, card_type=0, port=0, balance_cent=0
        )
        async with _writes_held(db_dsn, "commands") as held:
            started = asyncio.create_task(
                api.post(f"/api/v1/devices/{PHY_A}/ports/1/start", json={"mode": "full"})
            )
            await held.waiting(1, RACING_SQL)
            await pile.send(swipe)
            await held.waiting(2, RACING_SQL)
        response = await started
        assert response.status_code == 202, response.text
        reply = await _answer(pile, ap3000.CardSwipeReply, "the card swipe")
        assert reply.account_status == 0x08  # port unavailable
        assert await _open_orders(gateway, PHY_A, 1) == [response.json()["order_no"]]
        card = (await api.get(f"/api/v1/cards/{CARD}")).json()
        assert card["balance_cent"] == 500
    finally:
        await pile.close()


# -- identity without the usual identifiers (adversarial review of the fix) -----------


async def _platform_session(
    gateway: Gateway, api: httpx.AsyncClient, box: RawBkvGateway, business_no: int
) -> str:
    """An API start on socket 1 jack A that the socket answers with ``business_no``; the
    order is ``charging`` when this returns."""
    response = await api.post(
        f"/api/v1/devices/{DEVICE}/ports/1/start", json={"mode": "time", "duration_min": 42}
    )
    assert response.status_code == 202, response.text
    order_no: str = response.json()["order_no"]
    control = await _answer(box, bkv.ChargeControl, "the start")
    await box.send_raw(
        bkv.encode(
            bkv.ChargeControlReply(
                GW, control.seq, result=1, socket=1, port=0, business_no=business_no
            )
        )
    )

    async def status() -> str:
        return str((await api.get(f"/api/v1/orders/{order_no}")).json()["status"])

    await eventually(status, lambda s: s == "charging", what="the order charging")
    return order_no


@pytest.mark.parametrize("second_has_business_no", [True, False], ids=["0x0A", "no-0x0A"])
async def test_a_later_session_with_the_same_values_is_not_taken_for_a_resend(
    gateway: Gateway, api: httpx.AsyncClient, second_has_business_no: bool
) -> None:
    """Two real sessions on one port with the same duration and energy (a 42-minute timer)
    are two settlements: the first ended without tag 0x0A; the second is a platform order
    the socket numbered 9, whose end report (with or without its number) settles it.

    A first version of the fix took the second report for a resend of the first: the
    platform order stayed charging for ever and its money was lost."""
    box = await _bkv_box(gateway)
    try:
        await box.send_raw(bkv.encode(_fee_end_report()))
        await _answer(box, bkv.FeeModeEndAck, "the first session's end report")
        order_no = await _platform_session(gateway, api, box, business_no=9)
        second = _fee_end_report(business_no=9 if second_has_business_no else None)
        await box.send_raw(bkv.encode(dataclasses.replace(second, temperature_c=35)))
        await _answer(box, bkv.FeeModeEndAck, "the second session's end report")
        order = (await api.get(f"/api/v1/orders/{order_no}")).json()
        assert order["status"] == "settled" and order["duration_s"] == 42 * 60
        assert await _settlement_events(gateway, DEVICE) == ["applied", "applied"]
        assert await _open_orders(gateway, DEVICE, 1) == []
    finally:
        await box.close()


async def test_a_resend_that_carries_an_optional_field_the_first_copy_lacked_is_a_resend(
    gateway: Gateway,
) -> None:
    """A copy without the end time (tag 0x2E), then the same report with it: one order.
    A field missing on either side is unknown, not different.

    A first version of the fix compared the end time as a value: two settled orders."""
    box = await RawBkvGateway().connect(gateway.server.port)
    try:
        await box.send_raw(bkv.encode(_fee_end_report()))
        await _answer(box, bkv.FeeModeEndAck, "the first copy")
        ended = _beijing(gateway.wall() - timedelta(minutes=1))
        await box.send_raw(bkv.encode(_fee_end_report(business_no=44, end_time=ended)))
        await _answer(box, bkv.FeeModeEndAck, "the copy with its end time and number")
        assert len(await _orders(gateway, DEVICE)) == 1
        assert await _settlement_events(gateway, DEVICE) == ["applied", "duplicate"]
    finally:
        await box.close()


async def test_a_resend_without_identifiers_during_the_next_session_is_a_resend(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    """A report with no business number and no end time whose ACK was lost is resent
    while a new platform session runs on the port: the resend changes nothing (it matches
    the settled session exactly), and the new session is settled by its own report."""
    box = await _bkv_box(gateway)
    try:
        await box.send_raw(bkv.encode(_fee_end_report(business_no=8)))
        await _answer(box, bkv.FeeModeEndAck, "the first session's end report")
        order_no = await _platform_session(gateway, api, box, business_no=9)
        await box.send_raw(bkv.encode(_fee_end_report(business_no=8, temperature_c=40)))
        await _answer(box, bkv.FeeModeEndAck, "the resend")
        assert (await api.get(f"/api/v1/orders/{order_no}")).json()["status"] == "charging"
        end = _fee_end_report(business_no=9, duration_min=5, energy_kwh=0.05)
        await box.send_raw(bkv.encode(end))
        await _answer(box, bkv.FeeModeEndAck, "the second session's end report")
        assert (await api.get(f"/api/v1/orders/{order_no}")).json()["status"] == "settled"
        assert await _settlement_events(gateway, DEVICE) == ["applied", "duplicate", "applied"]
    finally:
        await box.close()


async def test_an_ap3000_order_id_reused_by_the_pile_is_a_new_session(gateway: Gateway) -> None:
    """A pile that reuses an order id (offline ids made before its clock was set) with
    other values: a second order (with the id in ``device_ref``), not a duplicate; a
    resend of either changes nothing."""
    pile = await _pile(gateway, PHY_A)
    try:
        order_id = "0123456789ABCDEF0123456789ABCDEF"
        await _settle(pile, _settlement(pile, order_id, duration_s=600, energy_kwh=0.1))
        await _settle(pile, _settlement(pile, order_id, duration_s=600, energy_kwh=0.1))
        await _settle(pile, _settlement(pile, order_id, duration_s=1200, energy_kwh=0.3))
        await _settle(pile, _settlement(pile, order_id, duration_s=1200, energy_kwh=0.3))
        orders = await _orders(gateway, PHY_A)
        assert sorted((o["duration_s"], o["status"]) for o in orders) == [
            (600, "settled"),
            (1200, "settled"),
        ]
        assert [o["device_ref"] for o in orders] == [order_id, order_id]
        assert orders[0]["order_no"] == order_id != orders[1]["order_no"]
        events = await _settlement_events(gateway, PHY_A)
        assert events == ["applied", "duplicate", "applied", "duplicate"]
    finally:
        await pile.close()
