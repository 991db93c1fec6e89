"""BKV card charging over real TCP: 0x0B swipe -> 0x0B order -> 0x0F -> 0x0C settled and
charged to the card; refusals; 0x1A balance queries (bkv.md 7.6, 7.7)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from chargegw.app import Gateway
from chargegw.domain import billing
from chargeproto import bkv

from .piles import RawBkvGateway
from .waiting import eventually

VECTORS = {
    v["name"]: bytes.fromhex(v["hex"])
    for v in json.loads((Path(__file__).parents[2] / "fixtures" / "bkv.json").read_text())
    if v["valid"]
}
GW = "82231214002700"  # the gateway of the status-cluster vector: socket 1, two jacks
DEVICE = f"{GW}-1"
CARD = "00000000A1B2"
POWER_TIERS = {
    "tiers": [
        {"power_w": 200, "price_cent": 25, "duration_min": 60},
        {"power_w": 2000, "price_cent": 500, "duration_min": 120},
    ]
}


@pytest.fixture
def gateway_settings() -> dict[str, Any]:
    return {"ack_timeout_s": 1.0, "command_spacing_s": 0.2}


async def _box(gateway: Gateway) -> RawBkvGateway:
    box = await RawBkvGateway().connect(gateway.server.port)
    await box.send_raw(VECTORS["bkv_0x1000_0x1017_status_cluster"])
    await box.expect(bkv.StatusClusterAck)
    return box


async def _setup(gateway: Gateway, kind: str | None, params: dict[str, Any], balance: int) -> None:
    pool = gateway.pool
    assert pool is not None
    async with pool.acquire() as conn:
        await conn.execute(
            """TRUNCATE order_charges, card_transactions, cards, device_rate_plans, rate_plans,
                        order_samples, orders CASCADE"""
        )
        if kind is not None:
            await conn.execute(
                "INSERT INTO rate_plans (name, kind, parameters) VALUES ($1, $1, $2)",
                kind,
                json.dumps(billing.validate_plan(kind, params)),
            )
            await conn.execute(
                "INSERT INTO device_rate_plans (device_id, plan) VALUES ($1, $2)", DEVICE, kind
            )
        await billing.create_card(conn, CARD, holder=None, balance_cent=balance, reference=None)


async def _send(box: RawBkvGateway, message: bkv.BkvMessage) -> None:
    await box.send_raw(bkv.encode(message))


def _swipe(card_id: str = CARD, port: int = 0, business_no: int = 26) -> bkv.CardSwipe:
    return bkv.CardSwipe(
        GW,
        0,
        socket=1,
        port=port,
        business_no=business_no,
        status_bits=0x90,
        card_id=card_id,
        offline_card_params="00" * 20,
    )


def _end(business_no: int = 26, minutes: int = 31, port: int = 0) -> bkv.CardEndReport:
    return bkv.CardEndReport(
        GW,
        0,
        socket=1,
        firmware_version=20790,
        temperature_c=45,
        signal_strength=32,
        port=port,
        status_bits=0x98,
        business_no=business_no,
        power_w=0.0,
        current_a=0.002,
        energy_kwh=0.25,
        duration_min=minutes,
        card_id=CARD,
        card_type=0,
        charge_mode=1,
        amount_cent=0,
        settlement_power_w=0.0,
        tier_durations_min=(),
    )


async def _order(gateway: Gateway, business_no: int) -> Any:
    assert gateway.pool is not None
    return await gateway.pool.fetchrow(
        "SELECT * FROM orders WHERE device_id = $1 AND business_no = $2", DEVICE, business_no
    )


async def _until_status(gateway: Gateway, business_no: int, status: str) -> Any:
    """The order of ``business_no`` once it is ``status``."""
    return await eventually(
        lambda: _order(gateway, business_no),
        lambda order: order is not None and order["status"] == status,
        what=f"order of business number {business_no} {status}",
    )


async def _events(gateway: Gateway) -> list[Any]:
    await gateway.writer.drained()
    assert gateway.pool is not None
    return list(
        await gateway.pool.fetch(
            """SELECT reason, detail FROM device_events WHERE device_id = $1
               AND kind = 'card_swipe' ORDER BY id""",
            DEVICE,
        )
    )


async def test_accepted_swipe_orders_by_time_and_the_end_report_charges_once(
    gateway: Gateway,
) -> None:
    await _setup(gateway, "per_hour", {"cent_per_hour": 120}, balance=500)
    box = await _box(gateway)
    try:
        await _send(box, _swipe())
        order_msg = await box.expect(bkv.CardOrder)
        assert isinstance(order_msg, bkv.CardOrder)
        assert (order_msg.socket, order_msg.port, order_msg.business_no) == (1, 0, 26)
        assert (order_msg.switch, order_msg.charge_mode) == (1, 1)
        assert order_msg.duration_raw == 250  # 500 cents at 2 cents a minute
        assert order_msg.seq != 0
        await _send(box, _swipe())  # the socket swipes again: no refusal, no second order
        order = await _order(gateway, 26)
        assert order["start_mode"] == "card" and order["card_id"] == CARD and order["port"] == 1
        assert (order["mode"], order["requested_duration_min"]) == ("time", 250)
        # 0x0F confirms the order
        await _send(box, bkv.CardOrderAck(GW, order_msg.seq, socket=1, port=0, result=1))
        await _until_status(gateway, 26, "charging")
        # the socket then asks for the balance
        await _send(box, bkv.BalanceQuery(GW, 0, socket=1, port=0, card_id=CARD))
        balance = await box.expect(bkv.BalanceReply)
        assert isinstance(balance, bkv.BalanceReply) and balance.balance_cent == 500
        await _send(box, _end())  # 31 minutes -> 62 cents
        ack = await box.expect(bkv.CardEndAck)
        assert isinstance(ack, bkv.CardEndAck) and ack.result == 1
        await _send(box, _end())  # a resend is not charged twice
        await box.expect(bkv.CardEndAck)
        order = await _until_status(gateway, 26, "settled")
        assert order["amount_cent"] == 62 and order["card_id"] == CARD
        assert gateway.pool is not None
        card = await gateway.pool.fetchrow("SELECT * FROM cards WHERE card_id = $1", CARD)
        assert card is not None and card["balance_cent"] == 438
        charges = await gateway.pool.fetch(
            "SELECT * FROM card_transactions WHERE card_id = $1 AND kind = 'charge'", CARD
        )
        assert [(c["amount_cent"], c["order_no"]) for c in charges] == [(-62, order["order_no"])]
        events = await _events(gateway)
        assert [e["reason"] for e in events] == ["accepted", "resend", "balance_query"]
        assert not [m for m in box.received if isinstance(m, bkv.CardOrder)]
        assert CARD not in json.dumps([json.loads(e["detail"]) for e in events])  # masked
    finally:
        await box.close()


async def test_power_tier_plan_orders_by_tiers_with_the_balance(gateway: Gateway) -> None:
    await _setup(gateway, "power_tier", POWER_TIERS, balance=300)
    box = await _box(gateway)
    try:
        await _send(box, _swipe(port=1, business_no=83))
        order_msg = await box.expect(bkv.CardOrder)
        assert isinstance(order_msg, bkv.CardOrder)
        assert (order_msg.port, order_msg.business_no, order_msg.switch) == (1, 83, 1)
        assert (order_msg.charge_mode, order_msg.duration_raw, order_msg.amount_cent) == (3, 0, 300)
        assert isinstance(order_msg.tiers, tuple)
        assert [(t.power_w, t.price_cent, t.duration_min) for t in order_msg.tiers] == [
            (200.0, 25, 60),
            (2000.0, 500, 120),
        ]
        order = await _order(gateway, 83)
        assert order["port"] == 2 and order["start_mode"] == "card"
    finally:
        await box.close()


@pytest.mark.parametrize(
    ("kind", "card", "status", "balance", "reason"),
    [
        ("per_hour", "0000000000FF", "active", 500, "unregistered"),
        ("per_hour", CARD, "blocked", 500, "blocked"),
        ("per_hour", CARD, "active", 0, "insufficient_balance"),
        (None, CARD, "active", 500, "no_rate_plan"),
    ],
)
async def test_refused_swipe_is_answered_with_switch_off(
    gateway: Gateway, kind: str | None, card: str, status: str, balance: int, reason: str
) -> None:
    await _setup(gateway, kind, {"cent_per_hour": 120}, balance=balance)
    assert gateway.pool is not None
    await gateway.pool.execute("UPDATE cards SET status = $2 WHERE card_id = $1", CARD, status)
    box = await _box(gateway)
    try:
        await _send(box, _swipe(card_id=card))
        refusal = await box.expect(bkv.CardOrder)
        assert isinstance(refusal, bkv.CardOrder)
        assert (refusal.switch, refusal.business_no, refusal.port) == (0, 26, 0)
        assert await gateway.pool.fetchval("SELECT count(*) FROM orders") == 0
        assert (
            await gateway.pool.fetchval("SELECT count(*) FROM commands WHERE name = 'start'") == 0
        )
        assert [e["reason"] for e in await _events(gateway)] == [reason]
    finally:
        await box.close()


async def test_balance_query_of_an_unknown_card_is_zero(gateway: Gateway) -> None:
    await _setup(gateway, "per_hour", {"cent_per_hour": 120}, balance=5001)
    box = await _box(gateway)
    try:
        await _send(box, bkv.BalanceQuery(GW, 0, socket=1, port=0, card_id=CARD))
        known = await box.expect(bkv.BalanceReply)
        assert isinstance(known, bkv.BalanceReply)
        assert (known.card_id, known.port, known.balance_cent) == (CARD, 0, 5001)
        await _send(box, bkv.BalanceQuery(GW, 0, socket=1, port=1, card_id="0000000000FF"))
        unknown = await box.expect(bkv.BalanceReply)
        assert isinstance(unknown, bkv.BalanceReply) and unknown.balance_cent == 0
        assert [e["reason"] for e in await _events(gateway)] == ["balance_query", "unregistered"]
    finally:
        await box.close()


async def test_a_card_session_whose_confirmation_was_lost_is_still_charged_to_the_card(
    gateway: Gateway,
) -> None:
    """The socket starts the card session but its 0x0F answers are lost (the 0x0B order
    dies unanswered, the order fails); its end report names the swipe's business number:
    the card order is settled and the card charged, no card-less order appears.

    Found in review: the end report made a new device-initiated order and the card was
    never charged."""
    await _setup(gateway, "per_hour", {"cent_per_hour": 120}, balance=500)
    box = await _box(gateway)
    pool = gateway.pool
    assert pool is not None
    try:
        await _send(box, _swipe())
        await box.expect(bkv.CardOrder)
        await box.expect(bkv.CardOrder, timeout=4)  # the resend, unanswered too
        await eventually(
            lambda: pool.fetchval("SELECT status FROM orders WHERE card_id = $1", CARD),
            lambda status: status == "failed",
            what="the card order failed",
        )
        await _send(box, _end())
        await box.expect(bkv.CardEndAck)
        orders = await pool.fetch(
            "SELECT status, card_id, amount_cent FROM orders WHERE device_id = $1", DEVICE
        )
        assert [(o["status"], o["card_id"]) for o in orders] == [("settled", CARD)]
        balance = await pool.fetchval("SELECT balance_cent FROM cards WHERE card_id = $1", CARD)
        assert balance == 500 - orders[0]["amount_cent"] and orders[0]["amount_cent"] > 0
    finally:
        await box.close()


async def test_a_swipe_resent_before_the_first_copy_is_decided_is_never_refused(
    gateway: Gateway,
) -> None:
    """Both copies in one write: the second must find the first's order (a resend), not
    the card busy with it, or the socket is told "no" for a swipe the platform started."""
    await _setup(gateway, "per_hour", {"cent_per_hour": 120}, balance=500)
    box = await _box(gateway)
    try:
        frame = bkv.encode(_swipe())
        await box.send_raw(frame + frame)
        first = await box.expect(bkv.CardOrder)
        second = await box.expect(bkv.CardOrder)
        await _until_status(gateway, 26, "starting")
        reasons = [e["reason"] for e in await _events(gateway)]
        assert 0 not in (first.switch, second.switch), reasons
        assert "card_already_charging" not in reasons, reasons
    finally:
        await box.close()
