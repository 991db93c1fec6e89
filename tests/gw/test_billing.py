"""Billing: pricing rules, the card API, AP3000 card swipes over real TCP, and the
daily reconciliation adding up to the cent."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chargegw.api import billing as billing_api
from chargegw.app import Gateway
from chargegw.domain import billing, billing_store
from chargegw.domain.orders import SettlementReport, new_order_no, settle
from chargeproto import ap3000

from .piles import RawPile
from .waiting import api_client, eventually, eventually_json

PHY = "04000001"
CARD = "0A1B2C3D"

PER_HOUR = {"cent_per_hour": 120}
PER_KWH = {"cent_per_kwh": 150}
POWER_TIERS = {
    "tiers": [
        {"power_w": 200, "price_cent": 25, "duration_min": 60},
        {"power_w": 400, "price_cent": 50, "duration_min": 60},
        {"power_w": 2000, "price_cent": 500, "duration_min": 120},
    ]
}
FEE_TIERS = {
    "service_fee_mode": "energy",
    "utc_offset_min": 480,
    "tiers": [
        {"until": "08:00", "electricity_cent_per_kwh": 30, "service_cent": 20},
        {"until": "23:59", "electricity_cent_per_kwh": 60, "service_cent": 40},
    ],
}
PLANS: dict[str, dict[str, Any]] = {
    "per_hour": PER_HOUR,
    "per_kwh": PER_KWH,
    "power_tier": POWER_TIERS,
    "fee_tier": FEE_TIERS,
}


def usage(duration_s: int = 0, energy_kwh: float = 0.0, max_power_w: float = 0.0) -> billing.Usage:
    return billing.Usage(duration_s, energy_kwh, max_power_w)


# -- rounding and pricing, pure --


def test_rounding_helpers() -> None:
    assert [billing.billed_minutes(s) for s in (0, 1, 59, 60, 61, 3600)] == [0, 1, 1, 1, 2, 60]
    assert [billing.half_up(n, 2) for n in (0, 1, 2, 3, 5)] == [0, 1, 1, 2, 3]
    assert billing.half_up(149, 100) == 1 and billing.half_up(150, 100) == 2
    assert billing.energy_centi_kwh(0.285) == 29  # decimal 0.285, not binary 0.28499...
    assert billing.energy_centi_kwh(1.0) == 100
    assert billing.energy_centi_kwh(None) == 0 and billing.energy_centi_kwh(-1.0) == 0


def test_per_hour_bills_started_minutes_rounded_half_up() -> None:
    plan = billing.validate_plan("per_hour", {"cent_per_hour": 100})
    # 61 s = 2 started minutes = 200/60 = 3.33 cents -> 3
    priced = billing.price("per_hour", plan, usage(61))
    assert priced.amount_cent == 3 and priced.inputs["billed_minutes"] == 2
    # 9 minutes at 100/h = 15 cents exactly; 3 minutes = 5 cents; 1 minute = 1.67 -> 2
    assert billing.price("per_hour", plan, usage(540)).amount_cent == 15
    assert billing.price("per_hour", plan, usage(60)).amount_cent == 2
    assert billing.price("per_hour", plan, usage(0)).amount_cent == 0
    # 30 started minutes at 1 cent per hour = 0.5 -> rounds half up to 1
    half = billing.validate_plan("per_hour", {"cent_per_hour": 1})
    assert billing.price("per_hour", half, usage(1800)).amount_cent == 1


def test_per_kwh_bills_hundredths_of_a_kwh() -> None:
    plan = billing.validate_plan("per_kwh", {"cent_per_kwh": 150})
    priced = billing.price("per_kwh", plan, usage(3600, 1.23))
    assert priced.amount_cent == 185  # 123 * 150 / 100 = 184.5 -> 185
    assert priced.inputs["billed_centi_kwh"] == 123
    assert priced.inputs["parameters"] == {"cent_per_kwh": 150}


def test_power_tier_picks_the_bracket_of_the_maximum_power() -> None:
    plan = billing.validate_plan("power_tier", POWER_TIERS)
    low = billing.price("power_tier", plan, usage(3600, 0.2, 150.0))
    assert low.amount_cent == 25 and low.inputs["tier"] == 0
    mid = billing.price("power_tier", plan, usage(1800, 0.2, 200.1))
    assert mid.amount_cent == 25 and mid.inputs["tier"] == 1  # 30 min of 50/60 min
    above = billing.price("power_tier", plan, usage(7200, 3.0, 2500.0))
    assert above.amount_cent == 500 and above.inputs["tier"] == 2  # above the last: last


def test_fee_tier_adds_electricity_and_service_by_the_start_time() -> None:
    plan = billing.validate_plan("fee_tier", FEE_TIERS)
    # 23:30 UTC = 07:30 at UTC+8: the first tier
    night = billing.Usage(3600, 2.05, 300.0, datetime(2026, 1, 1, 23, 30, tzinfo=UTC))
    priced = billing.price("fee_tier", plan, night)
    assert priced.inputs["tier"] == 0
    assert priced.inputs["electricity_cent"] == 62  # 205 * 30 / 100 = 61.5 -> 62
    assert priced.inputs["service_cent"] == 41
    assert priced.amount_cent == 103
    day = billing.Usage(3600, 2.05, 300.0, datetime(2026, 1, 1, 4, 0, tzinfo=UTC))
    assert billing.price("fee_tier", plan, day).amount_cent == 123 + 82
    by_time = billing.validate_plan("fee_tier", {**FEE_TIERS, "service_fee_mode": "time"})
    timed = billing.price("fee_tier", by_time, billing.Usage(90, 0.0, 0.0, night.started_at))
    assert timed.inputs["service_cent"] == 1  # 2 minutes at 20/h = 0.67 -> 1


@pytest.mark.parametrize(
    ("kind", "params", "field"),
    [
        ("per_hour", {}, "cent_per_hour"),
        ("per_hour", {"cent_per_hour": 1.5}, "cent_per_hour"),
        ("per_hour", {"cent_per_hour": -1}, "cent_per_hour"),
        ("per_hour", {"cent_per_hour": True}, "cent_per_hour"),
        ("per_kwh", {"cent_per_kwh": 10, "surprise": 1}, "surprise"),
        ("power_tier", {"tiers": []}, "tiers"),
        ("power_tier", {"tiers": [{"power_w": 200, "price_cent": 1}]}, "tiers[0].duration_min"),
        (
            "power_tier",
            {
                "tiers": [
                    {"power_w": 400, "price_cent": 1, "duration_min": 60},
                    {"power_w": 200, "price_cent": 1, "duration_min": 60},
                ]
            },
            "tiers[1].power_w",
        ),
        ("fee_tier", {**FEE_TIERS, "service_fee_mode": "both"}, "service_fee_mode"),
        (
            "fee_tier",
            {"tiers": [{"until": "12:00", "electricity_cent_per_kwh": 1, "service_cent": 1}]},
            "tiers",
        ),
        (
            "fee_tier",
            {"tiers": [{"until": "25:00", "electricity_cent_per_kwh": 1, "service_cent": 1}]},
            "tiers[0].until",
        ),
        ("flat", {}, "kind"),
    ],
)
def test_invalid_plans_name_the_field(kind: str, params: dict[str, Any], field: str) -> None:
    with pytest.raises(billing.PlanError) as caught:
        billing.validate_plan(kind, params)
    assert caught.value.field == field


def test_account_status_codes() -> None:
    active = {"status": "active", "balance_cent": 100}
    assert billing.account_status(None, balance_query=False, min_start=1)[0] == 0x01
    blocked = {"status": "blocked", "balance_cent": 100}
    assert billing.account_status(blocked, balance_query=True, min_start=1) == (1, "blocked")
    assert billing.account_status(active, balance_query=False, min_start=101)[0] == 0x06
    assert billing.account_status(active, balance_query=False, min_start=100)[0] == 0x00
    broke = {"status": "active", "balance_cent": 0}
    assert billing.account_status(broke, balance_query=True, min_start=1)[0] == 0x00


# -- the reconciliation adds up: a property over random days of orders --

_ORDER = st.tuples(
    st.sampled_from(sorted(PLANS)),
    st.integers(0, 36_000),  # duration_s
    st.integers(0, 2_000).map(lambda n: n / 100),  # energy as the device reports it
    st.integers(0, 25_000).map(lambda n: n / 10),  # max power, 0.1 W
    st.one_of(st.none(), st.integers(0, 2_000)),  # a card and its balance, or none
    st.integers(0, 86_399),  # second of the day it settles
)


async def _reset(conn: asyncpg.Connection) -> None:
    await conn.execute(
        """TRUNCATE order_charges, card_transactions, cards, device_rate_plans, rate_plans,
                    order_samples, orders CASCADE"""
    )
    for kind, params in PLANS.items():
        await conn.execute(
            "INSERT INTO rate_plans (name, kind, parameters) VALUES ($1, $1, $2)",
            kind,
            json.dumps(billing.validate_plan(kind, params)),
        )
        await conn.execute("INSERT INTO device_rate_plans (device_id, plan) VALUES ($1, $1)", kind)


async def _day_of_orders(dsn: str, orders: list[tuple[Any, ...]]) -> None:
    day = date(2026, 3, 1)
    midnight = datetime(2026, 3, 1, tzinfo=UTC)
    conn = await asyncpg.connect(dsn)
    try:
        await _reset(conn)
        expected: list[int] = []
        charged_total = shortfall_total = 0
        for index, (kind, duration, energy, power, card_balance, second) in enumerate(orders):
            order_no = new_order_no()
            card_id = None
            if card_balance is not None:
                card_id = f"{index:08X}"
                await billing.create_card(
                    conn, card_id, holder=None, balance_cent=card_balance, reference=None
                )
            await conn.execute(
                """INSERT INTO orders (order_no, device_id, port, protocol, status, start_mode,
                                       card_id, started_at)
                   VALUES ($1, $2, 1, 'ap3000', 'charging', $3, $4, $5)""",
                order_no,
                kind,
                "card" if card_id else "online",
                card_id,
                midnight + timedelta(seconds=second) - timedelta(seconds=duration),
            )
            ended = midnight + timedelta(seconds=second)
            async with conn.transaction():
                values = {"duration_s": duration, "energy_kwh": energy, "max_power_w": power}
                report = SettlementReport(
                    protocol="ap3000",
                    device_id=kind,
                    port=1,
                    start_mode="online",
                    order_ref=order_no,
                    business_no=None,
                    duration_s=duration,
                    energy_kwh=energy,
                    device_ended_at=None,
                    values=lambda order, values=values: values,
                )
                assert (await settle(conn, report, at=ended)).applied
                priced = await billing.price_order(conn, order_no)
                assert priced is not None
                assert await billing.price_order(conn, order_no) is None  # once
            start = midnight + timedelta(seconds=second) - timedelta(seconds=duration)
            alone = billing.price(
                kind,
                billing.validate_plan(kind, PLANS[kind]),
                billing.Usage(duration, energy, power, start),
            )
            assert priced.amount_cent == alone.amount_cent
            expected.append(alone.amount_cent)
            if card_balance is not None:
                charged = min(card_balance, alone.amount_cent)
                charged_total += charged
                shortfall_total += alone.amount_cent - charged
                balance = await conn.fetchval(
                    "SELECT balance_cent FROM cards WHERE card_id = $1", card_id
                )
                assert balance == card_balance - charged >= 0
        # an order settled the day after is not in the report
        report = await billing.reconciliation(conn, day)
        assert report["totals"] == {
            "orders": len(orders),
            "amount_cent": sum(expected),
            "card_charged_cent": charged_total,
            "shortfall_cent": shortfall_total,
        }
        assert sum(item["amount_cent"] for item in report["items"]) == sum(expected)
        rows = list(csv.DictReader(io.StringIO(billing_store.reconciliation_csv(report))))
        total = rows.pop()
        assert total["order_no"] == "TOTAL" and len(rows) == len(orders)
        for key in ("amount_cent", "card_charged_cent", "shortfall_cent"):
            assert int(total[key]) == sum(int(r[key]) for r in rows) == report["totals"][key]
        assert json.loads(total["inputs"]) == {"orders": len(orders)}
        assert (await billing.reconciliation(conn, day + timedelta(days=1)))["items"] == []
    finally:
        await conn.close()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(orders=st.lists(_ORDER, max_size=12))
def test_reconciliation_total_is_the_sum_of_order_amounts(
    db_dsn: str, orders: list[tuple[Any, ...]]
) -> None:
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(_day_of_orders(db_dsn, orders))
    finally:
        loop.close()


# -- the gateway: API and card swipes over real TCP --


@pytest.fixture
def gateway_settings() -> dict[str, Any]:
    return {"ack_timeout_s": 1.0, "command_spacing_s": 0.2}


@pytest.fixture
async def api(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(gateway, billing_api.router) as client:
        yield client


async def _pile(gateway: Gateway) -> RawPile:
    pile = await RawPile(PHY).connect(gateway.server.port)
    await pile.register(ports=2)
    await pile.expect(ap3000.RegistrationReply)
    await pile.heartbeat()
    await pile.expect(ap3000.HeartbeatReply)

    async def known() -> bool:
        await gateway.writer.drained()
        assert gateway.pool is not None
        return bool(await gateway.pool.fetchval("SELECT 1 FROM devices WHERE device_id = $1", PHY))

    await eventually(known, what=f"device {PHY} registered")
    return pile


async def _plan(api: httpx.AsyncClient, kind: str = "per_hour", **params: Any) -> None:
    body = {"name": f"{kind}-plan", "kind": kind, "parameters": params or PLANS[kind]}
    response = await api.post("/api/v1/rate-plans", json=body)
    assert response.status_code == 201, response.text
    response = await api.put(f"/api/v1/devices/{PHY}/rate-plan", json={"plan": body["name"]})
    assert response.status_code == 200, response.text


async def _swipe(pile: RawPile, card_id: str, port: int) -> ap3000.CardSwipeReply:
    await pile.send(
        ap3000.CardSwipe(
            PHY, pile.next_id(), card_id=card_id, card_type=0, port=port, balance_cent=0
        )
    )
    reply = await pile.expect(ap3000.CardSwipeReply)
    assert isinstance(reply, ap3000.CardSwipeReply)
    return reply


async def test_card_api(api: httpx.AsyncClient) -> None:
    created = await api.post(
        "/api/v1/cards", json={"card_id": "0a1b2c3d", "holder": "Li", "balance_cent": 500}
    )
    assert created.status_code == 201, created.text
    assert created.json()["card_id"] == CARD and created.json()["status"] == "active"
    assert (await api.post("/api/v1/cards", json={"card_id": CARD})).status_code == 409
    assert (await api.post("/api/v1/cards", json={"card_id": "XYZ"})).status_code == 422
    bad = await api.post("/api/v1/cards", json={"card_id": "01", "balance_cent": -1})
    assert bad.status_code == 422
    topped = await api.post(f"/api/v1/cards/{CARD}/top-up", json={"amount_cent": 250})
    assert topped.status_code == 200 and topped.json()["balance_cent"] == 750
    zero = await api.post(f"/api/v1/cards/{CARD}/top-up", json={"amount_cent": 0})
    assert zero.status_code == 422
    missing = await api.post("/api/v1/cards/FFFFFFFF/top-up", json={"amount_cent": 1})
    assert missing.status_code == 404
    blocked = await api.post(f"/api/v1/cards/{CARD}/block")
    assert blocked.status_code == 200 and blocked.json()["status"] == "blocked"
    card = (await api.get(f"/api/v1/cards/{CARD.lower()}")).json()
    assert card["status"] == "blocked" and card["balance_cent"] == 750
    assert [
        (t["kind"], t["amount_cent"], t["balance_after_cent"]) for t in card["transactions"]
    ] == [
        ("top_up", 250, 750),
        ("top_up", 500, 500),
    ]
    assert (await api.post(f"/api/v1/cards/{CARD}/unblock")).json()["status"] == "active"
    assert (await api.get("/api/v1/cards/DEADBEEF")).status_code == 404


async def test_rate_plan_api_validates(api: httpx.AsyncClient, gateway: Gateway) -> None:
    bad = await api.post(
        "/api/v1/rate-plans",
        json={"name": "x", "kind": "per_hour", "parameters": {"cent_per_hour": "1"}},
    )
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "cent_per_hour"
    unknown_kind = await api.post(
        "/api/v1/rate-plans", json={"name": "x", "kind": "flat", "parameters": {}}
    )
    assert unknown_kind.status_code == 422
    good = {"name": "hourly", "kind": "per_hour", "parameters": PER_HOUR}
    assert (await api.post("/api/v1/rate-plans", json=good)).status_code == 201
    assert (await api.post("/api/v1/rate-plans", json=good)).status_code == 409
    nodevice = await api.put("/api/v1/devices/NOPE/rate-plan", json={"plan": "hourly"})
    assert nodevice.status_code == 404
    pile = await _pile(gateway)
    try:
        noplan = await api.put(f"/api/v1/devices/{PHY}/rate-plan", json={"plan": "nope"})
        assert noplan.status_code == 422
        assert (
            await api.put(f"/api/v1/devices/{PHY}/rate-plan", json={"plan": "hourly"})
        ).status_code == 200
        plan = (await api.get(f"/api/v1/devices/{PHY}/rate-plan")).json()
        assert plan["kind"] == "per_hour" and plan["parameters"] == PER_HOUR
        report = await api.get("/api/v1/reports/reconciliation", params={"date": "2026-02-30"})
        assert report.status_code == 422
    finally:
        await pile.close()


async def test_accepted_swipe_starts_an_order_and_settlement_deducts(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    await api.post("/api/v1/cards", json={"card_id": CARD, "balance_cent": 500})
    pile = await _pile(gateway)
    try:
        await _plan(api)  # 120 cents per hour = 2 cents per started minute
        # balance query: normal, the balance, no order
        query = await _swipe(pile, CARD, 0xFF)
        assert (query.account_status, query.balance_or_expiry, query.port) == (0, 500, 0xFF)
        reply = await _swipe(pile, CARD, 1)
        assert (reply.account_status, reply.rate_mode, reply.balance_or_expiry) == (0, 0, 500)
        assert reply.card_id == CARD and reply.port == 1
        start = await pile.expect(ap3000.ChargeControl)
        assert isinstance(start, ap3000.ChargeControl)
        assert start.charge_command == 1 and start.port == 1 and start.charge_limit == 0
        assert start.balance_or_expiry == 500
        order_no = start.order_id
        order = (await api.get(f"/api/v1/orders/{order_no}")).json()
        assert order["start_mode"] == "card" and order["card_id"] == CARD and order["port"] == 2
        # a second swipe of the same card while it charges: "do not charge twice"
        again = await _swipe(pile, CARD, 0)
        assert again.account_status == 0x04
        await pile.send(
            ap3000.ChargeControlReply(
                PHY, start.msg_id, result=0, order_id=order_no, port=1, waiting_ports=0
            )
        )
        await eventually_json(api, f"/api/v1/orders/{order_no}", "status", {"charging"})
        settlement = ap3000.Settlement(
            PHY,
            pile.next_id(),
            duration_s=3599,  # 60 started minutes -> 120 cents
            max_power_w=180.0,
            energy_kwh=0.42,
            port=1,
            start_mode=1,
            card_id=CARD,
            stop_reason=1,
            order_id=order_no,
        )
        await pile.send(settlement)
        await pile.expect(ap3000.SettlementReply)
        await pile.send(settlement)  # a resend is not charged twice
        await pile.expect(ap3000.SettlementReply)
        order = (await api.get(f"/api/v1/orders/{order_no}")).json()
        assert order["status"] == "settled" and order["amount_cent"] == 120
        card = (await api.get(f"/api/v1/cards/{CARD}")).json()
        assert card["balance_cent"] == 380
        charge = card["transactions"][0]
        assert charge["kind"] == "charge" and charge["order_no"] == order_no
        assert (charge["amount_cent"], charge["balance_after_cent"]) == (-120, 380)
        # the day's reconciliation, JSON and CSV
        today = gateway.wall().date().isoformat()
        report = (await api.get("/api/v1/reports/reconciliation", params={"date": today})).json()
        assert report["totals"] == {
            "orders": 1,
            "amount_cent": 120,
            "card_charged_cent": 120,
            "shortfall_cent": 0,
        }
        item = report["items"][0]
        assert item["order_no"] == order_no and item["plan"] == "per_hour-plan"
        assert item["inputs"]["billed_minutes"] == 60
        assert item["inputs"]["parameters"] == PER_HOUR
        response = await api.get(
            "/api/v1/reports/reconciliation", params={"date": today, "format": "csv"}
        )
        assert response.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(response.text)))
        assert rows[0]["order_no"] == order_no and rows[0]["amount_cent"] == "120"
        assert rows[-1]["order_no"] == "TOTAL" and rows[-1]["amount_cent"] == "120"
    finally:
        await pile.close()


async def test_settlement_beyond_the_balance_charges_what_is_there(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    await api.post("/api/v1/cards", json={"card_id": CARD, "balance_cent": 50})
    pile = await _pile(gateway)
    try:
        await _plan(api, "per_kwh")  # 150 cents per kWh
        reply = await _swipe(pile, CARD, 0)
        assert (reply.account_status, reply.rate_mode) == (0, 2)
        start = await pile.expect(ap3000.ChargeControl)
        assert isinstance(start, ap3000.ChargeControl)
        assert start.rate_mode == 2
        await pile.send(
            ap3000.ChargeControlReply(
                PHY, start.msg_id, result=0, order_id=start.order_id, port=0, waiting_ports=0
            )
        )
        await pile.send(
            ap3000.Settlement(
                PHY,
                pile.next_id(),
                duration_s=1800,
                max_power_w=180.0,
                energy_kwh=1.0,
                port=0,
                start_mode=1,
                card_id=CARD,
                stop_reason=5,
                order_id=start.order_id,
            )
        )
        await pile.expect(ap3000.SettlementReply)
        card = (await api.get(f"/api/v1/cards/{CARD}")).json()
        assert card["balance_cent"] == 0
        charge = card["transactions"][0]
        assert (charge["amount_cent"], charge["shortfall_cent"]) == (-50, 100)
        today = gateway.wall().date().isoformat()
        report = (await api.get("/api/v1/reports/reconciliation", params={"date": today})).json()
        assert report["totals"]["amount_cent"] == 150
        assert report["totals"]["card_charged_cent"] == 50
        assert report["totals"]["shortfall_cent"] == 100
        # the card is empty now: the next swipe is refused
        assert (await _swipe(pile, CARD, 0)).account_status == 0x06
    finally:
        await pile.close()


async def test_refused_swipes_start_nothing(gateway: Gateway, api: httpx.AsyncClient) -> None:
    await api.post("/api/v1/cards", json={"card_id": "11111111", "balance_cent": 0})
    await api.post("/api/v1/cards", json={"card_id": "22222222", "balance_cent": 900})
    await api.post("/api/v1/cards/22222222/block")
    await api.post("/api/v1/cards", json={"card_id": "33333333", "balance_cent": 900})
    pile = await _pile(gateway)
    try:
        # no rate plan on the device yet: card charging is off
        assert (await _swipe(pile, "33333333", 0)).account_status == 0x0C
        await _plan(api, "per_hour", cent_per_hour=120, min_start_cent=100)
        unregistered = await _swipe(pile, "DEADBEEF", 0)
        assert (unregistered.account_status, unregistered.balance_or_expiry) == (0x01, 0)
        broke = await _swipe(pile, "11111111", 0)
        assert (broke.account_status, broke.balance_or_expiry) == (0x06, 0)
        blocked = await _swipe(pile, "22222222", 0)
        assert blocked.account_status == 0x01
        assert (await _swipe(pile, "33333333", 7)).account_status == 0x08  # no port 8
        await asyncio.sleep(0.5)  # proves no start follows a refused swipe within 0.5 s
        assert not [m for m in pile.received if isinstance(m, ap3000.ChargeControl)]
        assert gateway.pool is not None
        assert await gateway.pool.fetchval("SELECT count(*) FROM orders") == 0
        assert await gateway.pool.fetchval("SELECT count(*) FROM commands") == 0
        await gateway.writer.drained()
        reasons = await gateway.pool.fetch(
            "SELECT reason FROM device_events WHERE kind = 'card_swipe' ORDER BY id"
        )
        assert [r["reason"] for r in reasons] == [
            "no_rate_plan",
            "unregistered",
            "insufficient_balance",
            "blocked",
            "no_such_port",
        ]
    finally:
        await pile.close()
