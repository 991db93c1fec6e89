"""The billing API's repository: rate plans and the plans of devices, the list of cards,
the typed views of cards and the reconciliation report (whose SQL and rules are in
:mod:`chargegw.domain.billing`), and the report's CSV form."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, Field, field_validator

from chargegw.domain.billing import REPORT_COLUMNS, TOTAL_COLUMNS
from chargegw.domain.pages import Page, Where, page_of
from chargegw.domain.refusals import InvalidError, NotFoundError
from chargegw.store.database import Connection

#: a list query waits at most this long
QUERY_TIMEOUT_S = 10.0


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


# -- cards --

_CARD_COLUMNS = "card_id, status, balance_cent, holder, created_at, updated_at"


async def list_cards(
    conn: Connection,
    *,
    prefix: str | None,
    status: str | None,
    after: str | None,
    limit: int,
) -> Page[Card]:
    """Cards ordered by card id, after the card ``after``: those whose id starts with
    ``prefix`` (upper-case hex) and in ``status``, when given."""
    where = Where()
    if prefix:
        where.add("starts_with(card_id, {})", prefix)
    if status is not None:
        where.add("status = {}", status)
    if after is not None:
        where.add("card_id > {}", after)
    query = f"""SELECT {_CARD_COLUMNS} FROM cards {where.sql()}
                ORDER BY card_id {where.limit(limit)}"""
    rows = await conn.fetch(query, *where.args, timeout=QUERY_TIMEOUT_S)
    return page_of([Card(**dict(r)) for r in rows], limit)


# -- the reconciliation as CSV --

#: the cent columns that get a yuan column beside them
_MONEY_COLUMNS = frozenset(TOTAL_COLUMNS[1:])
#: the CSV's columns: the report's, each amount in cents followed by the same in yuan
CSV_COLUMNS: tuple[str, ...] = tuple(
    name
    for column in REPORT_COLUMNS
    for name in (
        (column, column.removesuffix("_cent") + "_yuan") if column in _MONEY_COLUMNS else (column,)
    )
)
#: a cell starting with one of these is a formula to a spreadsheet (CSV injection)
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def yuan(cents: int) -> str:
    """Cents as yuan with two decimals, exactly: 12345 -> ``123.45``, -5 -> ``-0.05``."""
    sign = "-" if cents < 0 else ""
    whole, fraction = divmod(abs(int(cents)), 100)
    return f"{sign}{whole}.{fraction:02d}"


def csv_cell(value: Any) -> str:
    """A value as a CSV cell a spreadsheet shows as text: ``None`` is empty, and a value
    that starts like a formula (``=``, ``+``, ``-``, ``@``, a tab or a carriage return)
    gets a leading ``'``."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def reconciliation_csv(report: Mapping[str, Any]) -> str:
    """The report as CSV (:data:`CSV_COLUMNS`): a header, one line per order (``inputs``
    as JSON), then a ``TOTAL`` line with the totals in their columns and
    ``{"orders": n}`` in ``inputs``. Amounts are in cents and in yuan; every cell is
    safe from CSV injection (:func:`csv_cell`)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)

    def row(values: Mapping[str, Any]) -> list[str]:
        cells: dict[str, Any] = {}
        for column in REPORT_COLUMNS:
            value = values.get(column)
            if column == "inputs" and not isinstance(value, str):
                value = json.dumps(value, sort_keys=True, ensure_ascii=False)
            cells[column] = value
            if column in _MONEY_COLUMNS:
                cells[column.removesuffix("_cent") + "_yuan"] = yuan(int(value or 0))
        return [csv_cell(cells[name]) for name in CSV_COLUMNS]

    for item in report["items"]:
        writer.writerow(row(item))
    totals = report["totals"]
    writer.writerow(
        row(
            {
                "order_no": "TOTAL",
                "inputs": json.dumps({"orders": totals["orders"]}),
                **{key: int(totals[key]) for key in _MONEY_COLUMNS},
            }
        )
    )
    return buffer.getvalue()
