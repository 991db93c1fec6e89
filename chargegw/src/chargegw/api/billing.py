"""The billing API: the card registry (its list is a keyset page like the other lists),
rate plans per device, and the daily reconciliation export (JSON or CSV)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, HTTPException, Path, Query
from fastapi.responses import Response
from pydantic import BaseModel, Field

from chargegw.api.deps import Pool, refused
from chargegw.api.errors import api_error, error_responses
from chargegw.api.pagination import DEFAULT_LIMIT, Cursor, Limit, decode_cursor, encode_cursor
from chargegw.domain import billing, billing_store
from chargegw.domain.billing_store import (
    Card,
    CardDetail,
    DevicePlan,
    RatePlan,
    Reconciliation,
    ToppedUp,
)
from chargegw.domain.refusals import RequestError

__all__ = ["router"]

#: a card number: 1 to 32 bytes of hex (any case; stored upper-case)
CARD_ID_PATTERN = r"^([0-9A-Fa-f]{2}){1,32}$"

CardId = Annotated[
    str, Path(pattern=CARD_ID_PATTERN, description="card number in hex (whole bytes)")
]
CardPrefix = Annotated[
    str | None,
    Query(
        pattern=r"^[0-9A-Fa-f]{1,64}$",
        description="cards whose number starts with these hex digits (any case)",
        examples=["0A1B"],
    ),
]
_T = TypeVar("_T")


class CardCreate(BaseModel):
    """A card to register."""

    card_id: str = Field(
        pattern=CARD_ID_PATTERN, description="card number in hex, e.g. the AP3000 UID 0A1B2C3D"
    )
    holder: str | None = Field(None, max_length=200)
    balance_cent: int = Field(0, ge=0, le=100_000_000, description="opening balance")
    reference: str | None = Field(None, max_length=200, description="e.g. a payment id")


class TopUp(BaseModel):
    """Money in: applied once per card and ``reference``."""

    amount_cent: int = Field(gt=0, le=100_000_000)
    reference: str | None = Field(None, max_length=200)


class RatePlanCreate(BaseModel):
    """A rate plan: its kind and the parameters the kind takes (docs/billing.md)."""

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")
    kind: Literal["per_hour", "per_kwh", "power_tier", "fee_tier"]
    parameters: dict[str, Any] = Field(
        description="per_hour: cent_per_hour; per_kwh: cent_per_kwh; power_tier and "
        "fee_tier: their tiers (docs/billing.md)",
        examples=[{"cent_per_hour": 100}],
    )


class DeviceRatePlan(BaseModel):
    """The plan to price a device's sessions with."""

    plan: str = Field(min_length=1, max_length=100)


class DevicePlanSet(BaseModel):
    """A device's plan, as set."""

    device_id: str
    plan: str


class CardPage(BaseModel):
    """A page of cards, by card number."""

    items: list[Card]
    next_cursor: str | None


class RatePlanList(BaseModel):
    """Every rate plan, by name."""

    items: list[RatePlan]


router = APIRouter(prefix="/api/v1", tags=["billing"])

_CARD_NOT_FOUND = (404, "No such card")


async def _card_call(call: Awaitable[_T]) -> _T:
    try:
        return await call
    except billing.CardError as exc:
        raise HTTPException(exc.status, str(exc)) from None


def _card_id(text: str) -> str:
    try:
        return billing.normalise_card_id(text)
    except billing.CardError as exc:
        raise api_error(exc.status, str(exc), field="card_id") from None


@router.post(
    "/cards",
    status_code=201,
    summary="Register a card",
    responses=error_responses((409, "The card exists")),
)
async def create_card(pool: Pool, body: CardCreate) -> Card:
    """With an opening balance, its top-up is the card's first transaction."""
    card_id = _card_id(body.card_id)
    async with pool.acquire() as conn:
        row = await _card_call(
            billing.create_card(
                conn,
                card_id,
                holder=body.holder,
                balance_cent=body.balance_cent,
                reference=body.reference,
            )
        )
    return Card(**row)


@router.get("/cards", summary="List cards, by card number")
async def list_cards(
    pool: Pool,
    *,
    q: CardPrefix = None,
    status: Annotated[
        Literal["active", "blocked"] | None, Query(description="only cards in this status")
    ] = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> CardPage:
    """Cards with their balances (not their transactions: see ``GET /cards/{card_id}``),
    ordered by card number, optionally filtered by a number prefix (``q``) and status."""
    after = None if cursor is None else decode_cursor(cursor, "cards", (str,))[0]
    async with pool.acquire() as conn:
        page = await billing_store.list_cards(
            conn, prefix=q.upper() if q else None, status=status, after=after, limit=limit
        )
    next_cursor = encode_cursor("cards", [page.items[-1].card_id]) if page.more else None
    return CardPage(items=page.items, next_cursor=next_cursor)


@router.get(
    "/cards/{card_id}",
    summary="A card, its balance and latest transactions",
    responses=error_responses(_CARD_NOT_FOUND),
)
async def get_card(pool: Pool, card_id: CardId) -> CardDetail:
    """The latest 50 transactions, newest first."""
    async with pool.acquire() as conn:
        row = await _card_call(billing.get_card(conn, _card_id(card_id)))
    return CardDetail(**row)


@router.post(
    "/cards/{card_id}/top-up",
    summary="Add to a card's balance",
    responses=error_responses(_CARD_NOT_FOUND, (409, "The reference was used for another amount")),
)
async def top_up(pool: Pool, card_id: CardId, body: TopUp) -> ToppedUp:
    """Blocked cards too: money in is never refused. The same ``reference`` again with
    the same amount changes nothing (``replayed``); with another amount it is a 409."""
    async with pool.acquire() as conn:
        row = await _card_call(
            billing.top_up(conn, _card_id(card_id), body.amount_cent, body.reference)
        )
    return ToppedUp(**row)


@router.post(
    "/cards/{card_id}/block",
    summary="Block a card: swipes are refused",
    responses=error_responses(_CARD_NOT_FOUND),
)
async def block(pool: Pool, card_id: CardId) -> Card:
    """The card stays in the registry; top-ups still work."""
    async with pool.acquire() as conn:
        row = await _card_call(billing.set_status(conn, _card_id(card_id), "blocked"))
    return Card(**row)


@router.post(
    "/cards/{card_id}/unblock",
    summary="Accept a blocked card again",
    responses=error_responses(_CARD_NOT_FOUND),
)
async def unblock(pool: Pool, card_id: CardId) -> Card:
    """Swipes are accepted again."""
    async with pool.acquire() as conn:
        row = await _card_call(billing.set_status(conn, _card_id(card_id), "active"))
    return Card(**row)


@router.post(
    "/rate-plans",
    status_code=201,
    summary="Create a rate plan (plans never change)",
    responses=error_responses((409, "A plan of that name exists")),
)
async def create_plan(pool: Pool, body: RatePlanCreate) -> RatePlan:
    """The parameters are checked for the kind: a 422 names the offending one."""
    try:
        params = billing.validate_plan(body.kind, body.parameters)
    except billing.PlanError as exc:
        raise api_error(422, str(exc), field=exc.field) from None
    async with pool.acquire() as conn:
        plan = await billing_store.create_plan(conn, body.name, body.kind, params)
    if plan is None:
        raise HTTPException(409, f"rate plan {body.name} exists")
    return plan


@router.get("/rate-plans", summary="Every rate plan")
async def list_plans(pool: Pool) -> RatePlanList:
    """By name."""
    async with pool.acquire() as conn:
        return RatePlanList(items=await billing_store.list_plans(conn))


@router.put(
    "/devices/{device_id}/rate-plan",
    summary="Set the rate plan of a device",
    responses=error_responses((404, "No such device")),
)
async def set_device_plan(pool: Pool, device_id: str, body: DeviceRatePlan) -> DevicePlanSet:
    """The device's sessions settled from now on are priced with the plan; an unknown
    plan is a 422."""
    try:
        async with pool.acquire() as conn, conn.transaction():
            await billing_store.set_device_plan(conn, device_id, body.plan)
    except RequestError as exc:
        raise refused(exc) from None
    return DevicePlanSet(device_id=device_id, plan=body.plan)


@router.get(
    "/devices/{device_id}/rate-plan",
    summary="The rate plan of a device",
    responses=error_responses((404, "The device has no rate plan")),
)
async def get_device_plan(pool: Pool, device_id: str) -> DevicePlan:
    """The plan's kind and parameters with its name."""
    async with pool.acquire() as conn:
        plan = await billing.device_plan(conn, device_id)
    if plan is None:
        raise HTTPException(404, f"device {device_id} has no rate plan")
    return DevicePlan(device_id=device_id, plan=plan[0], kind=plan[1], parameters=plan[2])


@router.get(
    "/reports/reconciliation",
    summary="Orders settled on a UTC day, their amounts, pricing inputs and totals",
    response_model=Reconciliation,
    responses={
        200: {
            "description": "The report: JSON, or CSV with `format=csv` (a header, one line "
            "per order, then a `TOTAL` line whose `inputs` column holds the number of "
            "orders), as an attachment `reconciliation-<date>.csv`. The CSV gives every "
            "amount in cents and in yuan (`amount_cent`, `amount_yuan` ...); a cell that "
            "would start with `=`, `+`, `-` or `@` starts with `'` (no spreadsheet "
            "formulas)",
            "content": {"text/csv": {"schema": {"type": "string"}}},
        }
    },
)
async def reconciliation(
    pool: Pool,
    date: Annotated[dt.date, Query(description="YYYY-MM-DD, a UTC day")],
    format: Annotated[Literal["json", "csv"], Query(description="json (default) or csv")] = "json",
) -> Response | Reconciliation:
    """Totals computed from the rows themselves, so they add up to the cent."""
    async with pool.acquire() as conn:
        report = await billing.reconciliation(conn, date)
    if format == "csv":
        return Response(
            billing_store.reconciliation_csv(report),
            media_type="text/csv; charset=utf-8",
            headers={
                "Content-Disposition": (
                    f'attachment; filename="reconciliation-{date.isoformat()}.csv"'
                )
            },
        )
    return Reconciliation.model_validate(report)
