"""The billing page in a real browser: cards (create, top up, block after confirming),
rate plans (an API error next to its field, a device's plan), the reconciliation with
its CSV link, and live refreshes from the event stream."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from playwright.async_api import Page, expect

from chargegw.domain.orders import new_order_no
from chargesim import SimulatedAp3000Pile
from tests.console.conftest import Console, assert_accessible, screenshot

CARD = "0A1B2C3D"


async def _billing(
    console: Console, key: str | None = None, *, lang: str = "zh", tab: str = ""
) -> Page:
    page = await console.page(key, lang=lang)
    await page.goto(f"{console.base}/console/billing{'#' + tab if tab else ''}")
    return page


async def _card(console: Console, card_id: str = CARD) -> dict[str, object]:
    response = await console.api("GET", f"/api/v1/cards/{card_id}")
    assert response.status_code == 200, response.text
    card: dict[str, object] = response.json()
    return card


async def _settled_order(console: Console, *, device_id: str, amount: int, at: datetime) -> str:
    """A settled, priced order as a settlement leaves it (its insert emits order.settled)."""
    pool = console.gateway.pool
    assert pool is not None
    order_no = new_order_no()
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            """INSERT INTO orders (order_no, device_id, port, protocol, status, start_mode,
                                   started_at, ended_at, duration_s, energy_kwh, max_power_w,
                                   amount_cent)
               VALUES ($1, $2, 1, 'ap3000', 'settled', 'online', $3, $4, 3600, 1.25, 180.0, $5)""",
            order_no,
            device_id,
            at - timedelta(hours=1),
            at,
            amount,
        )
        await conn.execute(
            """INSERT INTO order_charges (order_no, plan, kind, inputs, amount_cent,
                                          card_charged_cent, shortfall_cent, settled_at)
               VALUES ($1, 'per_hour-plan', 'per_hour', $2, $3, 0, 0, $4)""",
            order_no,
            json.dumps({"kind": "per_hour", "billed_minutes": 60, "billed_centi_kwh": 125}),
            amount,
            at,
        )
    return order_no


async def test_create_top_up_and_block_a_card(console: Console) -> None:
    page = await _billing(console)
    await expect(page.locator("#card-list")).to_contain_text("没有符合条件的充电卡")

    # register with an opening balance in yuan: the API gets cents
    await page.fill("#cc-card-id", CARD.lower())
    await page.fill("#cc-holder", "张三 <b>")
    await page.fill("#cc-balance", "10")
    await page.click("#card-create button[type=submit]")
    await expect(page.locator("#card-balance")).to_have_text("¥10.00")
    await expect(page.locator(f'[data-card-row="{CARD}"]')).to_contain_text("张三 <b>")
    assert (await _card(console))["balance_cent"] == 1000

    # a refused creation shows the API's message next to the field
    await page.fill("#cc-card-id", "XYZ")
    await page.click("#card-create button[type=submit]")
    error = page.locator("#cc-card-id + .field-error")
    await expect(error).to_be_visible()
    await expect(page.locator("#cc-card-id")).to_have_attribute("aria-invalid", "true")

    # top up 5.50 yuan
    await page.fill("#tu-amount", "5.5")
    await page.fill("#tu-reference", "pay-001")
    await page.click("#top-up button[type=submit]")
    await expect(page.locator("#card-balance")).to_have_text("¥15.50")
    await expect(page.locator("#card-detail-body table")).to_contain_text("pay-001")
    await expect(page.locator(f'[data-card-row="{CARD}"] [data-col="balance_cent"]')).to_have_text(
        "¥15.50"
    )
    card = await _card(console)
    assert card["balance_cent"] == 1550
    assert isinstance(card["transactions"], list) and card["transactions"][0]["amount_cent"] == 550

    # block: the confirmation names the card and says what happens; cancelling changes nothing
    await page.click("#card-block")
    dialog = page.locator("#confirm")
    await expect(dialog).to_be_visible()
    await expect(page.locator("#confirm-message")).to_contain_text(CARD)
    await expect(page.locator("#confirm-message")).to_contain_text("拒绝")
    await dialog.locator("button[value=cancel]").click()
    await expect(dialog).to_be_hidden()
    assert (await _card(console))["status"] == "active"

    await page.click("#card-block")
    await page.click("#confirm-ok")
    await expect(page.locator("#card-facts")).to_contain_text("已停用")
    await expect(page.locator(f'[data-card-row="{CARD}"]')).to_contain_text("已停用")
    await expect(page.locator("#card-unblock")).to_be_visible()
    assert (await _card(console))["status"] == "blocked"

    # the status filter finds it; the other status does not
    await page.select_option("#cs-status", "active")
    await page.click("#card-search button[type=submit]")
    await expect(page.locator("#card-list")).to_contain_text("没有符合条件的充电卡")
    await page.select_option("#cs-status", "blocked")
    await page.fill("#cs-q", "0a1b")
    await page.click("#card-search button[type=submit]")
    await expect(page.locator(f'[data-card-row="{CARD}"]')).to_be_visible()
    await screenshot(page, "billing")
    await assert_accessible(page)

    await page.click("#card-unblock")
    await expect(page.locator("#card-facts")).to_contain_text("正常")
    assert (await _card(console))["status"] == "active"


async def test_a_rate_plan_error_is_shown_next_to_its_field(console: Console) -> None:
    page = await _billing(console, lang="en", tab="plans")
    await expect(page.locator("#panel-plans")).to_be_visible()
    await expect(page.locator("#plan-list")).to_contain_text("No rate plans yet")

    # a name the API refuses (its pattern)
    await page.fill("#pc-name", "bad name!")
    await page.fill("#pc-price", "1.2")
    await page.click("#plan-create button[type=submit]")
    await expect(page.locator("#pc-name + .field-error")).to_be_visible()

    # power tiers out of order: the API names the second tier's power
    await page.fill("#pc-name", "tiers-2026")
    await page.select_option("#pc-kind", "power_tier")
    await page.fill("[name=tiers_0_power_w]", "400")
    await page.fill("[name=tiers_0_price_cent]", "0.5")
    await page.fill("[name=tiers_0_duration_min]", "60")
    await page.click("#plan-add-tier")
    await page.fill("[name=tiers_1_power_w]", "200")
    await page.fill("[name=tiers_1_price_cent]", "1")
    await page.fill("[name=tiers_1_duration_min]", "60")
    await page.click("#plan-create button[type=submit]")
    error = page.locator("[name=tiers_1_power_w] + .field-error")
    await expect(error).to_contain_text("ascending")
    await expect(page.locator("#pc-name + .field-error")).to_have_count(0)
    await expect(page.locator("[name=tiers_1_power_w]")).to_have_attribute("aria-invalid", "true")

    await page.fill("[name=tiers_1_power_w]", "2000")
    await page.click("#plan-create button[type=submit]")
    await expect(page.locator('[data-plan="tiers-2026"]')).to_contain_text("Power tiers")
    await expect(page.locator('[data-plan="tiers-2026"]')).to_contain_text("¥0.50")
    plans = (await console.api("GET", "/api/v1/rate-plans")).json()["items"]
    assert plans[0]["parameters"]["tiers"] == [
        {"power_w": 400, "price_cent": 50, "duration_min": 60},
        {"power_w": 2000, "price_cent": 100, "duration_min": 60},
    ]

    # a per-hour plan in yuan per hour
    await page.fill("#pc-name", "hourly")
    await page.select_option("#pc-kind", "per_hour")
    await page.fill("#pc-price", "1.2")
    await page.fill("#pc-min-start", "2")
    await page.click("#plan-create button[type=submit]")
    await expect(page.locator('[data-plan="hourly"]')).to_contain_text("¥1.20")
    hourly = next(
        p
        for p in (await console.api("GET", "/api/v1/rate-plans")).json()["items"]
        if p["name"] == "hourly"
    )
    assert hourly["parameters"] == {"cent_per_hour": 120, "min_start_cent": 200}

    # time-of-day tiers: electricity and a service fee per kWh, in the site's offset
    await page.fill("#pc-name", "tou")
    await page.fill("#pc-min-start", "")
    await page.select_option("#pc-kind", "fee_tier")
    offset = int(await page.input_value("#pc-offset"))
    await page.fill("[name=tiers_0_until]", "08:00")
    await page.fill("[name=tiers_0_electricity_cent_per_kwh]", "0.3")
    await page.fill("[name=tiers_0_service_cent]", "0.2")
    await page.click("#plan-add-tier")
    await page.fill("[name=tiers_1_until]", "22:00")
    await page.fill("[name=tiers_1_electricity_cent_per_kwh]", "0.6")
    await page.fill("[name=tiers_1_service_cent]", "0.4")
    await page.click("#plan-create button[type=submit]")
    # the last tier must reach the end of the day: the API names the tiers
    await expect(page.locator("#plan-tiers-set + .field-error")).to_contain_text("23:59")
    await page.fill("[name=tiers_1_until]", "24:00")
    await page.click("#plan-create button[type=submit]")
    await expect(page.locator('[data-plan="tou"]')).to_contain_text("until 24:00")
    tou = next(
        p
        for p in (await console.api("GET", "/api/v1/rate-plans")).json()["items"]
        if p["name"] == "tou"
    )
    assert tou["parameters"] == {
        "service_fee_mode": "energy",
        "utc_offset_min": offset,
        "tiers": [
            {"until": "08:00", "electricity_cent_per_kwh": 30, "service_cent": 20},
            {"until": "24:00", "electricity_cent_per_kwh": 60, "service_cent": 40},
        ],
    }

    # a device's plan: an unknown device is refused next to the device field
    await page.fill("#dp-device", "NOPE0001")
    await page.select_option("#dp-plan", "hourly")
    await page.click("#device-plan button[type=submit]")
    await expect(page.locator("#dp-device + .field-error")).to_contain_text("not found")
    await assert_accessible(page)


async def test_a_devices_plan_is_set(console: Console) -> None:
    await console.piles(SimulatedAp3000Pile("04C0A001", ports=2))
    body = {"name": "kwh", "kind": "per_kwh", "parameters": {"cent_per_kwh": 150}}
    assert (await console.api("POST", "/api/v1/rate-plans", json=body)).status_code == 201
    page = await _billing(console, lang="en", tab="plans")
    await expect(page.locator('#dp-plan option[value="kwh"]')).to_have_count(1)
    await page.fill("#dp-device", "04C0A001")
    await expect(page.locator("#device-plan-current")).to_contain_text("has no rate plan")
    await page.click("#device-plan button[type=submit]")
    await expect(page.locator("#device-plan-current")).to_contain_text("now uses kwh")
    plan = (await console.api("GET", "/api/v1/devices/04C0A001/rate-plan")).json()
    assert plan["plan"] == "kwh"


async def test_the_reconciliation_and_its_csv_link(console: Console) -> None:
    now = datetime.now(UTC)
    first = await _settled_order(console, device_id="04C0A001", amount=1234, at=now)
    page = await _billing(console, tab="reconciliation")
    today = now.date().isoformat()
    await expect(page.locator("#rc-date")).to_have_value(today)
    await expect(page.locator(f'[data-order="{first}"]')).to_contain_text("¥12.34")
    await expect(page.locator("#recon-amount .value")).to_have_text("¥12.34")

    link = page.locator("#recon-csv")
    href = await link.get_attribute("href")
    assert href == f"/api/v1/reports/reconciliation?date={today}&format=csv"
    # a plain GET with the session cookie: the browser's own download
    response = await page.context.request.get(console.base + href)
    assert response.status == 200
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert f'filename="reconciliation-{today}.csv"' in response.headers["content-disposition"]
    lines = (await response.text()).splitlines()
    assert lines[0].startswith("order_no,device_id,") and "amount_yuan" in lines[0]
    assert lines[1].startswith(first) and "12.34" in lines[1]
    assert lines[-1].startswith("TOTAL,")

    # live: an order settled today appears without a reload (order.settled)
    second = await _settled_order(console, device_id="04C0A002", amount=66, at=datetime.now(UTC))
    await expect(page.locator(f'[data-order="{second}"]')).to_be_visible()
    await expect(page.locator("#recon-amount .value")).to_have_text("¥13.00")
    await expect(page.locator("#recon-orders .value")).to_have_text("2")

    # another day: none, and the link follows the day
    await page.fill("#rc-date", "2020-01-01")
    await page.click("#recon-day button[type=submit]")
    await expect(page.locator("#recon-list")).to_contain_text("当日没有结算的订单")
    assert await link.get_attribute("href") == (
        "/api/v1/reports/reconciliation?date=2020-01-01&format=csv"
    )
    await assert_accessible(page)


async def test_a_swipe_refreshes_the_card_shown(console: Console) -> None:
    pile = SimulatedAp3000Pile("04C0A001", ports=2)
    await console.piles(pile)
    created = await console.api(
        "POST", "/api/v1/cards", json={"card_id": CARD, "balance_cent": 1000}
    )
    assert created.status_code == 201
    page = await _billing(console, lang="en")
    await page.click(f'[data-card="{CARD}"]')
    await expect(page.locator("#card-balance")).to_have_text("¥10.00")
    await expect(page.locator("#live-status")).to_have_attribute("data-state", "live")
    # a partner tops the card up through the API: no event of its own
    top_up = await console.api("POST", f"/api/v1/cards/{CARD}/top-up", json={"amount_cent": 500})
    assert top_up.status_code == 200
    # the swipe (refused: the device has no rate plan) refreshes the card shown
    assert await pile.swipe_card(0, CARD)
    await expect(page.locator("#card-balance")).to_have_text("¥15.00")


async def test_a_key_without_billing_gets_the_forbidden_page(console: Console) -> None:
    key = await console.key("read")
    page = await console.page(key)
    response = await page.goto(f"{console.base}/console/billing")
    assert response is not None and response.status == 403
    await expect(page.locator("main .error")).to_be_visible()
    billing_only = await console.key("billing")
    page = await _billing(console, billing_only, lang="en")
    await expect(page.locator("#card-list")).to_contain_text("No card matches")
