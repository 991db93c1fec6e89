"""The billing API: the card registry, rate plans per device, and the daily
reconciliation export (JSON or CSV)."""

from __future__ import annotations

import datetime as dt
import json
from typing import TYPE_CHECKING, Annotated, Any, Literal

import asyncpg
from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import Response
from pydantic import BaseModel, Field

from chargegw.domain import billing

if TYPE_CHECKING:
    from chargegw.app import Gateway


class CardCreate(BaseModel):
    card_id: str = Field(description="card number in hex, e.g. the AP3000 UID 0A1B2C3D")
    holder: str | None = Field(None, max_length=200)
    balance_cent: int = Field(0, ge=0, le=100_000_000, description="opening balance")
    reference: str | None = Field(None, max_length=200, description="e.g. a payment id")


class TopUp(BaseModel):
    amount_cent: int = Field(gt=0, le=100_000_000)
    reference: str | None = Field(None, max_length=200)


class RatePlanCreate(BaseModel):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")
    kind: Literal["per_hour", "per_kwh", "power_tier", "fee_tier"]
    parameters: dict[str, Any]


class DeviceRatePlan(BaseModel):
    plan: str


def make_billing_router(gateway: Gateway) -> APIRouter:
    """The card, rate-plan and report endpoints of ``gateway``."""
    router = APIRouter(prefix="/api/v1", tags=["billing"])

    def pool() -> asyncpg.Pool:
        if gateway.pool is None:
            raise HTTPException(503, "database unavailable")
        return gateway.pool

    def card_id_of(text: str) -> str:
        try:
            return billing.normalise_card_id(text)
        except billing.CardError as exc:
            raise HTTPException(exc.status, str(exc)) from None

    async def card_call(coro: Any) -> dict[str, Any]:
        try:
            result: dict[str, Any] = await coro
        except billing.CardError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        return _plain(result)

    @router.post("/cards", status_code=201, summary="Register a card")
    async def create_card(body: CardCreate) -> dict[str, Any]:
        card_id = card_id_of(body.card_id)
        async with pool().acquire() as conn:
            return await card_call(
                billing.create_card(
                    conn,
                    card_id,
                    holder=body.holder,
                    balance_cent=body.balance_cent,
                    reference=body.reference,
                )
            )

    @router.get("/cards/{card_id}", summary="A card, its balance and latest transactions")
    async def get_card(card_id: str) -> dict[str, Any]:
        async with pool().acquire() as conn:
            return await card_call(billing.get_card(conn, card_id_of(card_id)))

    @router.post("/cards/{card_id}/top-up", summary="Add to a card's balance")
    async def top_up(card_id: str, body: TopUp) -> dict[str, Any]:
        async with pool().acquire() as conn:
            return await card_call(
                billing.top_up(conn, card_id_of(card_id), body.amount_cent, body.reference)
            )

    @router.post("/cards/{card_id}/block", summary="Block a card: swipes are refused")
    async def block(card_id: str) -> dict[str, Any]:
        async with pool().acquire() as conn:
            return await card_call(billing.set_status(conn, card_id_of(card_id), "blocked"))

    @router.post("/cards/{card_id}/unblock", summary="Accept a blocked card again")
    async def unblock(card_id: str) -> dict[str, Any]:
        async with pool().acquire() as conn:
            return await card_call(billing.set_status(conn, card_id_of(card_id), "active"))

    @router.post("/rate-plans", status_code=201, summary="Create a rate plan (plans never change)")
    async def create_plan(body: RatePlanCreate) -> dict[str, Any]:
        try:
            params = billing.validate_plan(body.kind, body.parameters)
        except billing.PlanError as exc:
            raise HTTPException(422, {"error": str(exc), "field": exc.field}) from None
        row = await pool().fetchrow(
            """INSERT INTO rate_plans (name, kind, parameters) VALUES ($1, $2, $3)
               ON CONFLICT DO NOTHING RETURNING *""",
            body.name,
            body.kind,
            json.dumps(params),
        )
        if row is None:
            raise HTTPException(409, f"rate plan {body.name} exists")
        return _plain(dict(row))

    @router.get("/rate-plans", summary="Every rate plan")
    async def list_plans() -> dict[str, Any]:
        rows = await pool().fetch("SELECT * FROM rate_plans ORDER BY name")
        return {"items": [_plain(dict(r)) for r in rows]}

    @router.put("/devices/{device_id}/rate-plan", summary="Set the rate plan of a device")
    async def set_device_plan(device_id: str, body: DeviceRatePlan) -> dict[str, Any]:
        async with pool().acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT 1 FROM devices WHERE device_id = $1", device_id):
                raise HTTPException(404, f"device {device_id} not found")
            if not await conn.fetchval("SELECT 1 FROM rate_plans WHERE name = $1", body.plan):
                raise HTTPException(422, {"error": f"no rate plan {body.plan}", "field": "plan"})
            await conn.execute(
                """INSERT INTO device_rate_plans (device_id, plan) VALUES ($1, $2)
                   ON CONFLICT (device_id) DO UPDATE SET plan = $2, updated_at = now()""",
                device_id,
                body.plan,
            )
        return {"device_id": device_id, "plan": body.plan}

    @router.get("/devices/{device_id}/rate-plan", summary="The rate plan of a device")
    async def get_device_plan(device_id: str) -> dict[str, Any]:
        async with pool().acquire() as conn:
            plan = await billing.device_plan(conn, device_id)
        if plan is None:
            raise HTTPException(404, f"device {device_id} has no rate plan")
        return {"device_id": device_id, "plan": plan[0], "kind": plan[1], "parameters": plan[2]}

    @router.get(
        "/reports/reconciliation",
        summary="Orders settled on a UTC day, their amounts, pricing inputs and totals",
        response_model=None,
    )
    async def reconciliation(
        date: Annotated[dt.date, Query(description="YYYY-MM-DD, a UTC day")],
        format: Literal["json", "csv"] = "json",
    ) -> dict[str, Any] | Response:
        async with pool().acquire() as conn:
            report = await billing.reconciliation(conn, date)
        if format == "csv":
            return Response(
                billing.reconciliation_csv(report),
                media_type="text/csv; charset=utf-8",
                headers={
                    "Content-Disposition": (
                        f'attachment; filename="reconciliation-{date.isoformat()}.csv"'
                    )
                },
            )
        return report

    return router


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, raw in row.items():
        value: Any = raw
        if isinstance(raw, dt.datetime):
            value = raw.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
        elif key == "parameters" and isinstance(raw, str):
            value = json.loads(raw)
        elif key == "transactions":
            value = [_plain(item) for item in raw]
        out[key] = value
    return out
