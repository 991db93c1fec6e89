"""Billing: rate plans and the price of a settled order, the card registry and its ledger,
the verdict on a card swipe, and the daily reconciliation.

Prices are integers in cents (fen) and computed with integer arithmetic only:

* time is billed per **started minute**: ``minutes = ceil(duration_s / 60)``;
* energy is billed per **0.01 kWh**, the reported energy rounded half up to 0.01 kWh;
* every product of a quantity and a price is rounded **half up** to the cent, once per
  component (electricity and service fee are two components of a ``fee_tier`` order).

The plan (kind and parameters) and every intermediate value are returned beside the
amount, stored with it in ``order_charges.inputs``: an amount can be recomputed from its
row alone, whatever happens to the plan later.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import asyncpg
import structlog

from chargegw.domain.orders import (
    OPEN_STATUSES,
    Settled,
    SettlementReport,
    limit_by_time,
    lock_port,
    new_order_no,
    open_card_order,
    settle,
)
from chargegw.domain.outbox import Outbox, Priority
from chargegw.domain.ports import (
    EngineContext,
    LimitedStartParams,
    StartParams,
    SwipeResult,
)
from chargegw.store.causes import apply as apply_cause
from chargegw.store.database import Connection
from chargegw.store.errors import is_unavailable
from chargegw.store.values import safe_json

log = structlog.get_logger("chargegw.domain.billing")

PLAN_KINDS = ("per_hour", "per_kwh", "power_tier", "fee_tier")
CARD_ID = re.compile(r"^([0-9A-F]{2}){1,32}$")
#: a card needs at least this balance to start charging unless its plan says otherwise
DEFAULT_MIN_START_CENT = 1
_MAX_CENT = 100_000_000  # 1 000 000 CNY: a bound against typos, not a business rule
#: a price per hour, kWh or tier: 1 000 CNY, far above any real tariff; it keeps a mistyped
#: plan from pricing a session at millions (and within what a BKV tier carries, u16)
MAX_PRICE_CENT = 65_535
_MAX_TIERS = 5  # BKV 0x17/0x0B carry at most 5 power tiers
_HHMM = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])$|^24:00$")


# -- AP3000 account status (ap3000.md 11.6) --

ACCOUNT_NORMAL = 0x00
#: also the answer for a blocked card: 11.6 has no "blocked" or "lost" code, and
#: "card not registered" is the truthful prompt for a card the platform does not accept
ACCOUNT_UNREGISTERED = 0x01
#: "do not charge twice": the card already has an open order
ACCOUNT_CHARGING_TWICE = 0x04
ACCOUNT_INSUFFICIENT_BALANCE = 0x06
#: "port fault": the port does not exist on the device or already has an open order
ACCOUNT_PORT_UNAVAILABLE = 0x08
#: "device not registered": the device has no rate plan, so card charging is off
ACCOUNT_DEVICE_UNREGISTERED = 0x0C

#: AP3000 rate_mode (11.7) announced for a plan kind: energy plans say energy-based
RATE_MODE = {"per_hour": 0, "per_kwh": 2, "power_tier": 0, "fee_tier": 2}


class PlanError(ValueError):
    """A rate plan's parameters are not valid; ``field`` names the offending one."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


class CardError(Exception):
    """A card operation is refused; ``status`` is the HTTP status that says why."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


# -- rounding --


def half_up(numerator: int, denominator: int) -> int:
    """``numerator / denominator`` rounded half up (both non-negative, denominator > 0)."""
    if numerator < 0 or denominator <= 0:
        raise ValueError("half_up needs numerator >= 0 and denominator > 0")
    return (2 * numerator + denominator) // (2 * denominator)


def billed_minutes(duration_s: int | None) -> int:
    """Started minutes: 0 s -> 0, 1..60 s -> 1, 61 s -> 2."""
    seconds = max(0, int(duration_s or 0))
    return -(-seconds // 60)


def energy_centi_kwh(energy_kwh: float | None) -> int:
    """Energy in 0.01 kWh, rounded half up from the reported value's decimal form."""
    if not energy_kwh or energy_kwh < 0:
        return 0
    return int((Decimal(repr(float(energy_kwh))) * 100).to_integral_value(ROUND_HALF_UP))


# -- plans --


def _cent(
    params: Mapping[str, Any],
    key: str,
    field: str,
    *,
    required: bool = True,
    limit: int = MAX_PRICE_CENT,
) -> int:
    value = params.get(key)
    if value is None and not required:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanError(f"{field} must be an integer number of cents", field)
    if not 0 <= value <= limit:
        raise PlanError(f"{field} must be between 0 and {limit}", field)
    return value


def _tiers(params: Mapping[str, Any]) -> list[Any]:
    tiers = params.get("tiers")
    if not isinstance(tiers, list) or not tiers:
        raise PlanError("tiers must be a non-empty list", "tiers")
    if len(tiers) > _MAX_TIERS:
        raise PlanError(f"at most {_MAX_TIERS} tiers", "tiers")
    for index, tier in enumerate(tiers):
        if not isinstance(tier, dict):
            raise PlanError("each tier must be an object", f"tiers[{index}]")
    return tiers


def _minutes_of_day(text: Any, field: str) -> int:
    if not isinstance(text, str) or not _HHMM.match(text):
        raise PlanError(f"{field} must be HH:MM (00:00 to 24:00)", field)
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


def validate_plan(kind: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The plan's parameters, checked and normalised; ``PlanError`` says what is wrong.

    * ``per_hour``: ``cent_per_hour``
    * ``per_kwh``: ``cent_per_kwh``
    * ``power_tier``: ``tiers`` = up to 5 of ``{power_w, price_cent, duration_min}`` in
      ascending ``power_w`` (a tier covers powers up to its ``power_w``; above the last,
      the last applies) - the BKV 0x17 tier table
    * ``fee_tier``: ``service_fee_mode`` (``energy`` or ``time``), ``tiers`` = up to 5 of
      ``{until, electricity_cent_per_kwh, service_cent}`` in ascending ``until`` (HH:MM;
      the last must be 23:59 or 24:00), ``utc_offset_min`` (default 0); ``service_cent``
      is per kWh (energy) or per hour (time) - the BKV 0x1007 fee tiers

    Every kind also takes ``min_start_cent`` (default 1): the least balance a card needs
    to start charging on a device with this plan.
    """
    if kind not in PLAN_KINDS:
        raise PlanError(f"kind must be one of {', '.join(PLAN_KINDS)}", "kind")
    out: dict[str, Any] = {}
    if "min_start_cent" in params:
        out["min_start_cent"] = _cent(params, "min_start_cent", "min_start_cent", limit=_MAX_CENT)
    allowed = {"min_start_cent"}
    if kind == "per_hour":
        out["cent_per_hour"] = _cent(params, "cent_per_hour", "cent_per_hour")
        allowed.add("cent_per_hour")
    elif kind == "per_kwh":
        out["cent_per_kwh"] = _cent(params, "cent_per_kwh", "cent_per_kwh")
        allowed.add("cent_per_kwh")
    elif kind == "power_tier":
        allowed.add("tiers")
        tiers = []
        previous = 0.0
        for index, tier in enumerate(_tiers(params)):
            field = f"tiers[{index}]"
            power = tier.get("power_w")
            if isinstance(power, bool) or not isinstance(power, int | float) or power <= 0:
                raise PlanError(f"{field}.power_w must be a positive number", f"{field}.power_w")
            if power <= previous:
                raise PlanError("tiers must be in ascending power_w", f"{field}.power_w")
            previous = float(power)
            duration = tier.get("duration_min")
            if isinstance(duration, bool) or not isinstance(duration, int) or duration < 1:
                raise PlanError(
                    f"{field}.duration_min must be a positive integer", f"{field}.duration_min"
                )
            tiers.append(
                {
                    "power_w": power,
                    "price_cent": _cent(tier, "price_cent", f"{field}.price_cent"),
                    "duration_min": duration,
                }
            )
        out["tiers"] = tiers
    else:
        allowed |= {"tiers", "service_fee_mode", "utc_offset_min"}
        mode = params.get("service_fee_mode", "energy")
        if mode not in ("energy", "time"):
            raise PlanError("service_fee_mode must be energy or time", "service_fee_mode")
        offset = params.get("utc_offset_min", 0)
        if isinstance(offset, bool) or not isinstance(offset, int) or not -720 <= offset <= 840:
            raise PlanError("utc_offset_min must be an integer from -720 to 840", "utc_offset_min")
        tiers = []
        previous_end = -1
        for index, tier in enumerate(_tiers(params)):
            field = f"tiers[{index}]"
            end = _minutes_of_day(tier.get("until"), f"{field}.until")
            if end <= previous_end:
                raise PlanError("tiers must be in ascending until", f"{field}.until")
            previous_end = end
            tiers.append(
                {
                    "until": tier["until"],
                    "electricity_cent_per_kwh": _cent(
                        tier, "electricity_cent_per_kwh", f"{field}.electricity_cent_per_kwh"
                    ),
                    "service_cent": _cent(tier, "service_cent", f"{field}.service_cent"),
                }
            )
        if previous_end < 23 * 60 + 59:
            raise PlanError("the last tier must run until 23:59 or 24:00", "tiers")
        out.update(service_fee_mode=mode, utc_offset_min=offset, tiers=tiers)
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise PlanError(f"unknown parameter {unknown[0]!r} for kind {kind}", unknown[0])
    return out


def min_start_cent(params: Mapping[str, Any]) -> int:
    return int(params.get("min_start_cent", DEFAULT_MIN_START_CENT))


@dataclasses.dataclass(frozen=True)
class Usage:
    """What a settlement says was consumed."""

    duration_s: int
    energy_kwh: float
    max_power_w: float
    started_at: datetime | None = None


@dataclasses.dataclass(frozen=True)
class Priced:
    amount_cent: int
    inputs: dict[str, Any]


def price(kind: str, params: Mapping[str, Any], usage: Usage) -> Priced:
    """The amount of an order under a (validated) plan, with every input it came from."""
    minutes = billed_minutes(usage.duration_s)
    centi_kwh = energy_centi_kwh(usage.energy_kwh)
    inputs: dict[str, Any] = {
        "kind": kind,
        "parameters": dict(params),
        "duration_s": usage.duration_s,
        "energy_kwh": usage.energy_kwh,
        "max_power_w": usage.max_power_w,
        "billed_minutes": minutes,
        "billed_centi_kwh": centi_kwh,
    }
    if kind == "per_hour":
        amount = half_up(minutes * params["cent_per_hour"], 60)
    elif kind == "per_kwh":
        amount = half_up(centi_kwh * params["cent_per_kwh"], 100)
    elif kind == "power_tier":
        tiers = params["tiers"]
        power = usage.max_power_w or 0.0
        index = next((i for i, t in enumerate(tiers) if power <= t["power_w"]), len(tiers) - 1)
        tier = tiers[index]
        inputs["tier"] = index
        amount = half_up(minutes * tier["price_cent"], tier["duration_min"])
    elif kind == "fee_tier":
        start = usage.started_at or datetime.now(UTC)
        local = start.astimezone(UTC) + timedelta(minutes=params["utc_offset_min"])
        minute = local.hour * 60 + local.minute
        tiers = params["tiers"]
        index = next(
            (i for i, t in enumerate(tiers) if minute < _minutes_of_day(t["until"], "until")),
            len(tiers) - 1,
        )
        tier = tiers[index]
        electricity = half_up(centi_kwh * tier["electricity_cent_per_kwh"], 100)
        if params["service_fee_mode"] == "energy":
            service = half_up(centi_kwh * tier["service_cent"], 100)
        else:
            service = half_up(minutes * tier["service_cent"], 60)
        inputs.update(
            tier=index,
            started_at=_iso(start),
            local_start_minute=minute,
            electricity_cent=electricity,
            service_cent=service,
        )
        amount = electricity + service
    else:
        raise PlanError(f"unknown plan kind {kind!r}", "kind")
    return Priced(amount, inputs)


# -- card verdicts --


def account_status(
    card: Mapping[str, Any] | None, *, balance_query: bool, min_start: int
) -> tuple[int, str]:
    """The AP3000 ``account_status`` for a card (before the device/port checks), with a
    short reason for the event log."""
    if card is None:
        return ACCOUNT_UNREGISTERED, "unregistered"
    if card["status"] == "blocked":
        return ACCOUNT_UNREGISTERED, "blocked"
    if balance_query:
        return ACCOUNT_NORMAL, "balance_query"
    if card["balance_cent"] < min_start:
        return ACCOUNT_INSUFFICIENT_BALANCE, "insufficient_balance"
    return ACCOUNT_NORMAL, "accepted"


def normalise_card_id(card_id: str) -> str:
    """Upper-case hex; ``CardError`` 422 unless it is 1 to 32 bytes of hex."""
    text = card_id.strip().upper()
    if not CARD_ID.match(text):
        raise CardError("card_id must be 2 to 64 hex digits (whole bytes)", 422)
    return text


# -- BKV card orders --

#: 0x0B down by time: the longest limit given, in minutes (the 0x07 range, bkv.md 7.2)
BKV_CARD_MAX_MIN = 900
#: 0x0B down ``amount_cent`` is a u16
BKV_CARD_MAX_AMOUNT = 0xFFFF


def bkv_card_order(
    kind: str | None, params: Mapping[str, Any], balance_cent: int
) -> dict[str, Any]:
    """What a BKV 0x0B down order for an accepted card carries (bkv.md 7.6).

    * ``power_tier`` plans: by power tiers (charge mode 3), the plan's tiers and the
      balance as the amount (at most 655.35): the socket derives the time itself.
    * ``per_hour``: by time (charge mode 1), the whole minutes the balance covers at the
      plan's price (at least 1, at most 900); a free plan gets the maximum.
    * ``per_kwh`` and ``fee_tier``: by time with the maximum, 900 minutes (by energy is
      only presumed for 0x0B, bkv.md 11.2); the socket stops when the battery is full
      and the settlement charges what was used, never below zero.

    ``duration_min`` is sent as ``duration_raw`` in minutes: the unit is unconfirmed
    (bkv.md 14.3), and if a socket reads seconds the session is shorter, never longer
    than the balance covers.
    """
    if kind == "power_tier":
        return {
            "charge_mode": 3,
            "amount_cent": min(balance_cent, BKV_CARD_MAX_AMOUNT),
            "tiers": [dict(tier) for tier in params["tiers"]],
            "duration_min": None,
        }
    minutes = BKV_CARD_MAX_MIN
    if kind == "per_hour" and params.get("cent_per_hour"):
        minutes = max(1, min(BKV_CARD_MAX_MIN, balance_cent * 60 // params["cent_per_hour"]))
    return {"charge_mode": 1, "duration_min": minutes}


# -- database: plans --


async def device_plan(conn: Connection, device_id: str) -> tuple[str, str, dict[str, Any]] | None:
    row = await conn.fetchrow(
        """SELECT p.name, p.kind, p.parameters FROM device_rate_plans d
           JOIN rate_plans p ON p.name = d.plan WHERE d.device_id = $1""",
        device_id,
    )
    if row is None:
        return None
    return row["name"], row["kind"], _json(row["parameters"])


# -- database: cards --


async def create_card(
    conn: Connection, card_id: str, *, holder: str | None, balance_cent: int, reference: str | None
) -> dict[str, Any]:
    async with conn.transaction():
        row = await conn.fetchrow(
            """INSERT INTO cards (card_id, holder, balance_cent) VALUES ($1, $2, $3)
               ON CONFLICT DO NOTHING RETURNING *""",
            card_id,
            holder,
            balance_cent,
        )
        if row is None:
            raise CardError(f"card {card_id} exists", 409)
        if balance_cent:
            await conn.execute(
                """INSERT INTO card_transactions (card_id, kind, amount_cent,
                                                  balance_after_cent, reference)
                   VALUES ($1, 'top_up', $2, $2, $3)""",
                card_id,
                balance_cent,
                reference,
            )
    return dict(row)


async def _locked_card(conn: Connection, card_id: str) -> Any:
    row = await conn.fetchrow("SELECT * FROM cards WHERE card_id = $1 FOR UPDATE", card_id)
    if row is None:
        raise CardError(f"card {card_id} not found", 404)
    return row


async def top_up(
    conn: Connection, card_id: str, amount_cent: int, reference: str | None
) -> dict[str, Any]:
    """Add to a card's balance (blocked cards too: money in is never refused).

    A top-up with a ``reference`` is applied once per card: the same reference again
    with the same amount changes nothing (the card is returned as it is, with
    ``replayed`` true); with another amount it is refused (409)."""
    async with conn.transaction():
        card = await _locked_card(conn, card_id)
        if reference is not None:
            earlier = await conn.fetchval(
                """SELECT amount_cent FROM card_transactions
                   WHERE card_id = $1 AND kind = 'top_up' AND reference = $2 LIMIT 1""",
                card_id,
                reference,
            )
            if earlier is not None:
                if earlier != amount_cent:
                    raise CardError(
                        f"reference {reference!r} was used for a top-up of {earlier} cent "
                        f"on card {card_id}, not {amount_cent}",
                        409,
                    )
                return {**dict(card), "replayed": True}
        balance = card["balance_cent"] + amount_cent
        row = await conn.fetchrow(
            """UPDATE cards SET balance_cent = $2, updated_at = now() WHERE card_id = $1
               RETURNING *""",
            card_id,
            balance,
        )
        assert row is not None  # locked above
        await conn.execute(
            """INSERT INTO card_transactions (card_id, kind, amount_cent, balance_after_cent,
                                              reference)
               VALUES ($1, 'top_up', $2, $3, $4)""",
            card_id,
            amount_cent,
            balance,
            reference,
        )
    return dict(row)


async def set_status(conn: Connection, card_id: str, status: str) -> dict[str, Any]:
    async with conn.transaction():
        await _locked_card(conn, card_id)
        row = await conn.fetchrow(
            """UPDATE cards SET status = $2, updated_at = now() WHERE card_id = $1
               RETURNING *""",
            card_id,
            status,
        )
    assert row is not None  # locked above
    return dict(row)


async def get_card(conn: Connection, card_id: str, *, transactions: int = 50) -> dict[str, Any]:
    row = await conn.fetchrow("SELECT * FROM cards WHERE card_id = $1", card_id)
    if row is None:
        raise CardError(f"card {card_id} not found", 404)
    ledger = await conn.fetch(
        """SELECT id, kind, amount_cent, balance_after_cent, order_no, shortfall_cent,
                  reference, at
           FROM card_transactions WHERE card_id = $1 ORDER BY id DESC LIMIT $2""",
        card_id,
        transactions,
    )
    return {**dict(row), "transactions": [dict(r) for r in ledger]}


async def charge_card(
    conn: Connection, card_id: str, order_no: str, amount_cent: int
) -> tuple[int, int]:
    """Deduct an order's amount (inside the caller's transaction): never below zero.
    Returns (charged, shortfall); a missing card is all shortfall."""
    card = await conn.fetchrow("SELECT * FROM cards WHERE card_id = $1 FOR UPDATE", card_id)
    if card is None:
        return 0, amount_cent
    charged = min(card["balance_cent"], amount_cent)
    shortfall = amount_cent - charged
    balance = card["balance_cent"] - charged
    await conn.execute(
        "UPDATE cards SET balance_cent = $2, updated_at = now() WHERE card_id = $1",
        card_id,
        balance,
    )
    await conn.execute(
        """INSERT INTO card_transactions (card_id, kind, amount_cent, balance_after_cent,
                                          order_no, shortfall_cent)
           VALUES ($1, 'charge', $2, $3, $4, $5)""",
        card_id,
        -charged,
        balance,
        order_no,
        shortfall,
    )
    if shortfall:
        log.warning(
            "card balance short of the order amount",
            order_no=order_no,
            amount_cent=amount_cent,
            shortfall_cent=shortfall,
        )
    return charged, shortfall


# -- database: settlement and swipes --


async def settle_and_price(
    conn: Connection, report: SettlementReport, *, at: datetime, detail: Mapping[str, Any]
) -> tuple[Settled, str | None]:
    """Apply a settlement once (:func:`~chargegw.domain.orders.settle`), price it and
    charge its card, and log it in the device's events, all in the caller's transaction
    (which must commit before the device is answered). Returns the settlement and, if it
    could not be priced, why (it is then kept for review)."""
    settled = await settle(conn, report, at=at)
    unpriced = await price_or_flag(conn, settled.order_no) if settled.applied else None
    await conn.execute(
        """INSERT INTO device_events (device_id, at, kind, reason, detail)
           VALUES ($1, $2, 'settlement', $3, $4)""",
        report.device_id,
        at,
        "applied" if settled.applied else "duplicate",
        safe_json({**detail, "order_no": settled.order_no}),
    )
    return settled, unpriced


async def price_or_flag(conn: Connection, order_no: str) -> str | None:
    """Price a settled order in a savepoint; one that cannot be priced is kept with the
    pricing error and marked for review. Returns that error, if any; an unavailable
    database is raised (the settlement is retried, not stored unpriced)."""
    try:
        async with conn.transaction():
            await price_order(conn, order_no)
    except Exception as exc:
        if is_unavailable(exc):
            raise
        error = f"{type(exc).__name__}: {exc}"[:500]
        log.error("settlement stored unpriced, for review", order_no=order_no, error=error)
        await conn.execute(
            """UPDATE orders SET pricing_error = $2,
                      review_reason = COALESCE(review_reason, 'pricing_error')
               WHERE order_no = $1""",
            order_no,
            error,
        )
        return error
    return None


async def price_order(conn: Connection, order_no: str) -> Priced | None:
    """Price a just-settled order and charge its card, inside the settlement's
    transaction. Once per order: None when it was priced already or does not exist.

    A device-initiated order is priced (and reported) on the day and tier of the device's
    own end time when it reported a plausible one (:func:`billing_time`). Without a
    maximum power in the settlement, the session's highest sampled power is used; the
    order and the inputs say which (``max_power_source``)."""
    order = await conn.fetchrow("SELECT * FROM orders WHERE order_no = $1", order_no)
    if order is None:
        return None
    if await conn.fetchval("SELECT 1 FROM order_charges WHERE order_no = $1", order_no):
        return None
    settled_at, time_source = billing_time(order)
    duration = int(order["duration_s"] or 0)
    started = order["started_at"] or order["created_at"]
    if order["device_initiated"] or started is None:
        started = settled_at - timedelta(seconds=duration)
    max_power, power_source = float(order["max_power_w"] or 0.0), "settlement"
    if not max_power:
        sampled = await conn.fetchval(
            "SELECT max(power_w) FROM order_samples WHERE order_no = $1", order_no
        )
        max_power, power_source = (float(sampled), "samples") if sampled else (0.0, "none")
    usage = Usage(
        duration_s=duration,
        energy_kwh=float(order["energy_kwh"] or 0.0),
        max_power_w=max_power,
        started_at=started,
    )
    plan = await device_plan(conn, order["device_id"])
    if plan is None:
        priced = Priced(
            0,
            {
                "kind": None,
                "reason": "no rate plan for the device",
                "duration_s": usage.duration_s,
                "energy_kwh": usage.energy_kwh,
                "max_power_w": usage.max_power_w,
            },
        )
        name: str | None = None
        kind: str | None = None
    else:
        name, kind, params = plan
        priced = price(kind, params, usage)
        priced.inputs["plan"] = name
    priced.inputs["max_power_source"] = power_source
    priced.inputs["billed_at"] = settled_at.isoformat()
    priced.inputs["billed_at_source"] = time_source
    charged = shortfall = 0
    if order["card_id"]:
        charged, shortfall = await charge_card(conn, order["card_id"], order_no, priced.amount_cent)
    await conn.execute(
        """INSERT INTO order_charges (order_no, plan, kind, inputs, amount_cent, card_id,
                                      card_charged_cent, shortfall_cent, settled_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)""",
        order_no,
        name,
        kind,
        json.dumps(priced.inputs),
        priced.amount_cent,
        order["card_id"],
        charged,
        shortfall,
        settled_at,
    )
    await conn.execute(
        """UPDATE orders SET amount_cent = $2, max_power_source = $3,
                  max_power_w = COALESCE(NULLIF(max_power_w, 0), $4)
           WHERE order_no = $1""",
        order_no,
        priced.amount_cent,
        power_source,
        max_power or None,
    )
    log.info("order priced", order_no=order_no, plan=name, amount_cent=priced.amount_cent)
    return priced


#: a device's end time is believed for billing within this distance of the server's
DEVICE_TIME_BEFORE = timedelta(days=7)
DEVICE_TIME_AFTER = timedelta(minutes=10)


def billing_time(order: Mapping[str, Any]) -> tuple[datetime, str]:
    """The moment an order is priced and reported at, and its source: the device's own
    end time for a device-initiated order (``device``), when it is within a week before
    and ten minutes after the server's; else the server's (``server``)."""
    server = order["ended_at"] or datetime.now(UTC)
    device = order["device_ended_at"]
    if (
        order["device_initiated"]
        and device is not None
        and server - DEVICE_TIME_BEFORE <= device <= server + DEVICE_TIME_AFTER
    ):
        return device, "device"
    return server, "server"


async def card_swipe(
    conn: Connection,
    outbox: Outbox,
    *,
    device_id: str,
    protocol: str,
    card_id: str,
    port: int | None,
    expires_s: float,
    start_params: StartParams | None,
    business_no: int | None = None,
) -> SwipeResult:
    """Decide on a swipe (``port`` 1-based, None for a balance query) in one transaction;
    when accepted, insert the order (start_mode ``card``) and its start command.

    ``start_params(order_no, port, rate_mode, balance_cent)`` gives the start command's
    protocol parameters. Call ``outbox.wake(device_id)`` after this returns an order.
    ``business_no`` (BKV: allocated by the socket with the swipe) is stored on the order,
    so the session's end report finds it.
    """
    async with conn.transaction():
        card = await conn.fetchrow(
            "SELECT * FROM cards WHERE card_id = $1 FOR UPDATE", card_id.upper()
        )
        plan = await device_plan(conn, device_id)
        params = plan[2] if plan else {}
        rate_mode = RATE_MODE[plan[1]] if plan else 0
        status, reason = account_status(
            card, balance_query=port is None, min_start=min_start_cent(params)
        )
        balance = int(card["balance_cent"]) if card is not None else 0
        if status != ACCOUNT_NORMAL or port is None:
            return SwipeResult(status, reason, balance, rate_mode)
        assert card is not None  # only a card is in good standing
        if plan is None:
            return SwipeResult(ACCOUNT_DEVICE_UNREGISTERED, "no_rate_plan", balance, rate_mode)
        count = await conn.fetchval(
            "SELECT port_count FROM devices WHERE device_id = $1", device_id
        )
        if count is not None and port > count:
            return SwipeResult(ACCOUNT_PORT_UNAVAILABLE, "no_such_port", balance, rate_mode)
        if await conn.fetchval(
            "SELECT 1 FROM orders WHERE card_id = $1 AND status = ANY($2::text[])",
            card["card_id"],
            list(OPEN_STATUSES),
        ):
            return SwipeResult(ACCOUNT_CHARGING_TWICE, "card_already_charging", balance, rate_mode)
        if await conn.fetchval(
            """SELECT 1 FROM orders WHERE device_id = $1 AND port = $2
               AND status = ANY($3::text[])""",
            device_id,
            port,
            list(OPEN_STATUSES),
        ):
            return SwipeResult(ACCOUNT_PORT_UNAVAILABLE, "port_busy", balance, rate_mode)
        order_no = new_order_no()
        await apply_cause(conn)  # the swipe's frame
        try:
            async with conn.transaction():  # a savepoint: a concurrent start may win the port
                await conn.execute(
                    """INSERT INTO orders (order_no, device_id, port, protocol, status,
                                           start_mode, mode, balance_cent, card_id, business_no)
                       VALUES ($1, $2, $3, $4, 'pending', 'card', 'full', $5, $6, $7)""",
                    order_no,
                    device_id,
                    port,
                    protocol,
                    min(balance, 0xFFFFFFFF),
                    card["card_id"],
                    business_no,
                )
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name != "orders_one_open_per_port":
                raise
            # an API start (or another swipe) opened an order on the port meanwhile
            return SwipeResult(ACCOUNT_PORT_UNAVAILABLE, "port_busy", balance, rate_mode)
        assert start_params is not None, "a swipe on a port needs its start parameters"
        command_id = await outbox.submit(
            conn,
            device_id=device_id,
            protocol=protocol,
            name="start",
            params=start_params(order_no, port, rate_mode, balance),
            priority=Priority.START,
            expires_s=expires_s,
            order_no=order_no,
        )
        await conn.execute(
            "UPDATE orders SET start_command_id = $2 WHERE order_no = $1", order_no, command_id
        )
    return SwipeResult(ACCOUNT_NORMAL, "accepted", balance, rate_mode, order_no, command_id)


class CardDesk:
    """The card registry as the drivers ask it (``ports.CardService``): each decision in
    its own transaction, its start command in the outbox."""

    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx

    def _pool(self, what: str) -> asyncpg.Pool:
        pool = self.ctx.pool
        if pool is None:
            raise RuntimeError(f"no database pool: {what} left unanswered")
        return pool

    async def swipe(
        self,
        *,
        protocol: str,
        device_id: str,
        card_id: str,
        port: int | None,
        start_params: StartParams | None,
        what: str,
    ) -> SwipeResult:
        """Decide on a swipe (``port`` None: a balance query), see :func:`card_swipe`."""
        async with self._pool(what).acquire(timeout=5) as conn:
            return await card_swipe(
                conn,
                self.ctx.outbox,
                device_id=device_id,
                protocol=protocol,
                card_id=card_id,
                port=port,
                expires_s=self.ctx.settings.command_expiry_s,
                start_params=start_params,
            )

    async def swipe_with_limit(
        self,
        *,
        protocol: str,
        device_id: str,
        card_id: str,
        port: int,
        business_no: int,
        start_params: LimitedStartParams,
    ) -> SwipeResult:
        """Decide on a swipe whose start carries what the balance buys under the device's
        plan (:func:`bkv_card_order`); a ``per_hour`` order ends at that time limit. The
        same swipe again (its ``business_no`` has an open card order) is ``resent``."""
        async with self._pool("card swipe").acquire(timeout=5) as conn, conn.transaction():
            # a copy of the swipe resent before the first is decided waits here for its
            # commit, then finds its order (not the card busy with it, which would refuse
            # a swipe the platform accepted); same lock order as a settlement
            await lock_port(conn, device_id, port)
            resent = await open_card_order(conn, device_id, port, business_no)
            if resent is not None:
                return SwipeResult(ACCOUNT_NORMAL, "resend", 0, 0, order_no=resent, resent=True)
            plan = await device_plan(conn, device_id)
            kind, params = (plan[1], plan[2]) if plan is not None else (None, {})
            limit: dict[str, Any] = {}

            def start(_order_no: str, _port: int, _rate_mode: int, balance: int) -> dict[str, Any]:
                order = bkv_card_order(kind, params, balance)
                limit["duration_min"] = order["duration_min"]
                return start_params(order)

            result = await card_swipe(
                conn,
                self.ctx.outbox,
                device_id=device_id,
                protocol=protocol,
                card_id=card_id,
                port=port,
                expires_s=self.ctx.settings.command_expiry_s,
                start_params=start,
                business_no=business_no,
            )
            if result.order_no is not None and kind == "per_hour":
                await limit_by_time(conn, result.order_no, limit["duration_min"])
        return result


# -- reconciliation --

REPORT_COLUMNS = (
    "order_no",
    "device_id",
    "port",
    "protocol",
    "start_mode",
    "card_id",
    "started_at",
    "ended_at",
    "plan",
    "kind",
    "duration_s",
    "energy_kwh",
    "max_power_w",
    "amount_cent",
    "card_charged_cent",
    "shortfall_cent",
    "inputs",
)
TOTAL_COLUMNS = ("orders", "amount_cent", "card_charged_cent", "shortfall_cent")


async def reconciliation(conn: Connection, day: date) -> dict[str, Any]:
    """Every order billed on ``day`` (UTC) with its amount and pricing inputs, and the
    totals - computed from the rows themselves, so they add up to the cent. An order is
    billed when it settled; a device-initiated one at the device's own end time
    (:func:`billing_time`)."""
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    rows = await conn.fetch(
        """SELECT o.order_no, o.device_id, o.port, o.protocol, o.start_mode, o.card_id,
                  o.started_at, o.ended_at, c.plan, c.kind, o.duration_s, o.energy_kwh,
                  o.max_power_w, COALESCE(c.amount_cent, 0) AS amount_cent,
                  COALESCE(c.card_charged_cent, 0) AS card_charged_cent,
                  COALESCE(c.shortfall_cent, 0) AS shortfall_cent,
                  COALESCE(c.inputs, '{"reason": "not priced"}'::jsonb) AS inputs
           FROM orders o LEFT JOIN order_charges c ON c.order_no = o.order_no
           WHERE o.status = 'settled'
             AND COALESCE(c.settled_at, o.ended_at) >= $1
             AND COALESCE(c.settled_at, o.ended_at) < $2
           ORDER BY COALESCE(c.settled_at, o.ended_at), o.order_no""",
        start,
        start + timedelta(days=1),
    )
    items = []
    for row in rows:
        item = {key: row[key] for key in REPORT_COLUMNS}
        item["inputs"] = _json(row["inputs"])
        for key in ("started_at", "ended_at"):
            item[key] = _iso(item[key])
        items.append(item)
    totals = {"orders": len(items)}
    for key in TOTAL_COLUMNS[1:]:
        totals[key] = sum(int(item[key]) for item in items)
    return {"date": day.isoformat(), "currency": "CNY", "items": items, "totals": totals}


def _json(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        loaded: dict[str, Any] = json.loads(value)
        return loaded
    return dict(value or {})


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
