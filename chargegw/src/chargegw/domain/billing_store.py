"""The billing API's repository: rate plans and the plans of devices, and the typed
views of cards and the reconciliation report (whose SQL and rules are in
:mod:`chargegw.domain.billing`)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from pydantic import BaseModel, Field, field_validator

from chargegw.domain.refusals import InvalidError, NotFoundError
from chargegw.store.database import Connection


def _json(raw: Any) -> Any:
    return json.loads(raw) if isinstance(raw, str) else raw


class Card(BaseModel):
    """A card of the registry and its balance."""

    card_id: str = Field(description="upper-case hex", examples=["0A1B2C3D"])
    status: str = Field(description="active or blocked", examples=["active"])
    balance_cent: int
    holder: str | None
    created_at: dt.datetime
    updated_at: dt.datetime


class ToppedUp(Card):
    """The card after a top-up."""

    replayed: bool = Field(
        False,
        description="true when the top-up's reference was applied before with the same "
        "amount: nothing changed",
    )


class CardTransaction(BaseModel):
    """A change of a card's balance (append-only), with the balance after it."""

    id: int
    kind: str = Field(description="top_up or charge")
    amount_cent: int
    balance_after_cent: int
    order_no: str | None
    shortfall_cent: int = Field(description="what a charge could not take from the balance")
    reference: str | None
    at: dt.datetime


class CardDetail(Card):
    """A card with its latest transactions, newest first."""

    transactions: list[CardTransaction]


class RatePlan(BaseModel):
    """A rate plan (plans never change: create another one)."""

    name: str
    kind: str = Field(description="per_hour, per_kwh, power_tier or fee_tier")
    parameters: dict[str, Any]
    created_at: dt.datetime

    _decode = field_validator("parameters", mode="before")(_json)


class DevicePlan(BaseModel):
    """The rate plan of a device."""

    device_id: str
    plan: str
    kind: str
    parameters: dict[str, Any]


class ReportItem(BaseModel):
    """A settled order of the reconciliation day: its amount and how it was priced."""

    order_no: str
    device_id: str
    port: int
    protocol: str
    start_mode: str
    card_id: str | None
    started_at: dt.datetime | None
    ended_at: dt.datetime | None
    plan: str | None
    kind: str | None
    duration_s: int | None
    energy_kwh: float | None
    max_power_w: float | None
    amount_cent: int
    card_charged_cent: int
    shortfall_cent: int
    inputs: dict[str, Any] = Field(description="what the amount was computed from")


class ReportTotals(BaseModel):
    """The report's totals, from its rows."""

    orders: int
    amount_cent: int
    card_charged_cent: int
    shortfall_cent: int


class Reconciliation(BaseModel):
    """Orders billed on a UTC day, their amounts and pricing inputs, and the totals."""

    date: dt.date
    currency: str = Field(examples=["CNY"])
    items: list[ReportItem]
    totals: ReportTotals


async def create_plan(
    conn: Connection, name: str, kind: str, parameters: dict[str, Any]
) -> RatePlan | None:
    """Store a validated plan; None when a plan of that name exists."""
    row = await conn.fetchrow(
        """INSERT INTO rate_plans (name, kind, parameters) VALUES ($1, $2, $3)
           ON CONFLICT DO NOTHING RETURNING name, kind, parameters, created_at""",
        name,
        kind,
        json.dumps(parameters),
    )
    return None if row is None else RatePlan(**dict(row))


async def list_plans(conn: Connection) -> list[RatePlan]:
    """Every rate plan, by name."""
    rows = await conn.fetch(
        "SELECT name, kind, parameters, created_at FROM rate_plans ORDER BY name"
    )
    return [RatePlan(**dict(r)) for r in rows]


async def set_device_plan(conn: Connection, device_id: str, plan: str) -> None:
    """Price the device's sessions with ``plan`` from now on (inside the caller's
    transaction): ``NotFoundError`` for an unknown device, ``InvalidError`` for an
    unknown plan."""
    if not await conn.fetchval("SELECT 1 FROM devices WHERE device_id = $1", device_id):
        raise NotFoundError(f"device {device_id} not found")
    if not await conn.fetchval("SELECT 1 FROM rate_plans WHERE name = $1", plan):
        raise InvalidError({"error": f"no rate plan {plan}", "field": "plan"})
    await conn.execute(
        """INSERT INTO device_rate_plans (device_id, plan) VALUES ($1, $2)
           ON CONFLICT (device_id) DO UPDATE SET plan = $2, updated_at = now()""",
        device_id,
        plan,
    )
