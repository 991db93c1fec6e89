"""The order list and the order page in a browser, against a gateway with a simulated
AP3000 pile: a session started and stopped through the API shows up in the list (found by
its filters), live on its page (charging, then settled with its amount), with a chart of
its samples and a timeline of decoded frames; stop reasons are translated in both
languages, and axe finds nothing serious on either page.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import pytest
from playwright.async_api import expect

from chargegw.console import i18n
from chargegw.domain.event_types import EVENT_TYPES
from chargegw.domain.orders import OrderStatus, StartMode, StopReason
from chargegw.domain.timeline import ItemKind
from chargesim import Ap3000Intervals, SimulatedAp3000Pile
from tests.console.conftest import Console, assert_accessible, screenshot

PHY = "04000001"
#: how long a live change may take to show (an event, then a throttled reload)
LIVE = 20_000


async def _charging(console: Console) -> str:
    """A session on port 1 of a simulated pile with a rate plan, started through the API
    and charging: its order number."""
    # progress every simulated minute: a sample a second at 60x
    pile = SimulatedAp3000Pile(
        PHY, ports=2, heartbeat_s=180, intervals=Ap3000Intervals(power_heartbeat_s=60)
    )
    await console.piles(pile, accel=60)
    plan = {"name": "hourly-60", "kind": "per_hour", "parameters": {"cent_per_hour": 6000}}
    assert (await console.api("POST", "/api/v1/rate-plans", json=plan)).status_code == 201
    chosen = await console.api(
        "PUT", f"/api/v1/devices/{PHY}/rate-plan", json={"plan": "hourly-60"}
    )
    assert chosen.status_code == 200, chosen.text
    started = await console.api(
        "POST", f"/api/v1/devices/{PHY}/ports/1/start", json={"mode": "full"}
    )
    assert started.status_code == 202, started.text
    order_no: str = started.json()["order_no"]
    return order_no


async def _stop(console: Console) -> None:
    stopped = await console.api("POST", f"/api/v1/devices/{PHY}/ports/1/stop")
    assert stopped.status_code == 202, stopped.text


async def test_the_list_finds_the_session_by_its_filters_and_follows_it_live(
    console: Console,
) -> None:
    order_no = await _charging(console)
    page = await console.page()
    await page.goto(f"{console.base}/console/orders")
    row = page.locator(f'#order-list tr[data-order="{order_no}"]')
    await expect(row).to_be_visible()
    # the options are the API's values, every one translated
    for select, values in [
        ("#f-status", [s.value for s in OrderStatus]),
        ("#f-stop-reason", [s.value for s in StopReason]),
        ("#f-start-mode", [s.value for s in StartMode]),
    ]:
        options = await page.locator(f"{select} option").evaluate_all(
            "(os) => os.map((o) => [o.value, o.textContent])"
        )
        assert [v for v, _ in options] == ["", *values]
        assert all(text and text != value for value, text in options[1:]), options
    # another device: nothing; this device, online starts, charging: the session
    await page.fill("#f-device", "0400FFFF")
    await page.click("#order-filters button[type=submit]")
    await expect(page.locator("#order-list td.empty")).to_be_visible()
    await page.fill("#f-device", PHY)
    await page.select_option("#f-start-mode", "online")
    await page.select_option("#f-initiated", "false")
    await page.select_option("#f-status", "charging")
    await page.click("#order-filters button[type=submit]")
    await expect(row).to_be_visible()
    await expect(row.locator("[data-col=status]")).to_have_text("充电中", timeout=LIVE)
    assert f"device_id={PHY}" in page.url and "status=charging" in page.url
    link = row.locator("[data-col=device_id] a")
    await expect(link).to_have_attribute("href", f"/console/devices/{PHY}")
    # a settled order leaves a list of charging ones, live; all statuses: settled, priced
    await _stop(console)
    await expect(row).to_have_count(0, timeout=LIVE)
    await page.select_option("#f-status", "")
    await page.select_option("#f-stop-reason", "server_stop")
    await page.click("#order-filters button[type=submit]")
    await expect(row.locator("[data-col=status]")).to_have_text("已结算", timeout=LIVE)
    await expect(row.locator("[data-col=stop_reason]")).to_have_text("平台停止")
    await expect(row.locator("[data-col=amount_cent]")).to_have_text(re.compile(r"^¥[1-9]"))
    # the filters survive a reload (they are in the URL)
    await page.reload()
    await expect(page.locator("#f-stop-reason")).to_have_value("server_stop")
    await expect(row).to_be_visible()
    await screenshot(page, "orders")
    await assert_accessible(page)


@pytest.fixture
def console_settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The gateway's settings: a test's ``settings`` marker adds to them."""
    marker = request.node.get_closest_marker("settings")
    return dict(marker.kwargs) if marker else {}


@pytest.mark.settings(device_timezone="Asia/Kathmandu")
async def test_the_time_window_is_the_sites_wall_clock(console: Console) -> None:
    """The window's inputs are read in the site's zone (UTC+5:45 here; the browser's is
    UTC+8): a second either side of an order's creation decides."""
    pool = console.gateway.pool
    assert pool is not None
    created = dt.datetime(2026, 3, 1, 10, 0, 30, 500_000, tzinfo=dt.UTC)  # 15:45:30.5 there
    await pool.execute(
        """INSERT INTO orders (order_no, device_id, port, protocol, status, created_at)
           VALUES ($1, '04000009', 1, 'ap3000', 'settled', $2)""",
        "A" * 32,
        created,
    )
    page = await console.page(lang="en")
    await page.goto(f"{console.base}/console/orders")
    await expect(page.locator("#order-zone")).to_contain_text("Asia/Kathmandu")
    row = page.locator(f'#order-list tr[data-order="{"A" * 32}"]')
    await expect(row).to_be_visible()
    for since, until, shown in [
        ("2026-03-01T15:45:30", "", 1),
        ("2026-03-01T15:45:31", "", 0),
        ("", "2026-03-01T15:45:31", 1),
        ("", "2026-03-01T15:45:30", 0),
    ]:
        await page.fill("#f-since", since)
        await page.fill("#f-until", until)
        await page.click("#order-filters button[type=submit]")
        await expect(row).to_have_count(shown)
        if not shown:
            await expect(page.locator("#order-list td.empty")).to_have_text("Nothing here.")


async def test_the_order_page_follows_the_session_to_its_settlement(console: Console) -> None:
    order_no = await _charging(console)
    page = await console.page()
    await page.goto(f"{console.base}/console/orders/{order_no}")
    await expect(page.locator("#order-status .badge")).to_have_text("充电中", timeout=LIVE)
    # the chart fills with the samples as they arrive (live: order.progress)
    power = page.locator("#order-chart svg.chart path.series-0")
    await expect(power).to_have_attribute(
        "data-points", re.compile(r"^([3-9]|\d\d+)$"), timeout=LIVE
    )
    await expect(page.locator("#order-chart svg.chart")).to_have_attribute(
        "aria-label", re.compile("功率")
    )
    rows = page.locator("#order-chart details.chart-data tbody tr")
    assert await rows.count() >= 3
    # the timeline: frames decoded beside their hex, the start command, transitions
    start_frame = page.locator("#order-timeline li.tl-frame", has_text="ChargeControl").first
    await expect(start_frame.locator("dl.tl-fields")).to_contain_text("order_id")
    await expect(start_frame.locator("code.hex")).to_have_text(re.compile(r"^[0-9a-f*]+$"))
    await expect(page.locator("#order-timeline li.tl-transition").first).to_be_visible()
    await expect(page.locator("#order-timeline li.tl-command").first).to_contain_text("开始充电")

    await _stop(console)
    await expect(page.locator("#order-status .badge")).to_have_text("已结算", timeout=LIVE)
    await expect(page.locator("#order-settlement .amount")).to_have_text(re.compile(r"^¥[1-9]"))
    await expect(page.locator("#order-settlement")).to_contain_text("hourly-60")
    await expect(page.locator("#order-settlement")).to_contain_text("按时长计费")
    await expect(page.locator("#order-summary .stop-reason")).to_have_text("平台停止")
    settlement = page.locator("#order-timeline li.tl-settlement")
    await expect(settlement).to_contain_text("平台停止")
    caused = page.locator("#order-timeline li.tl-transition", has_text="已结算").first
    await expect(caused.locator(".tl-cause a")).to_have_attribute("href", re.compile("^#tl"))
    await screenshot(page, "order")
    await assert_accessible(page)

    english = await console.page(lang="en")
    await english.goto(f"{console.base}/console/orders/{order_no}")
    await expect(english.locator("#order-summary .stop-reason")).to_have_text(
        "Stopped by the platform"
    )
    await expect(english.locator("#order-status .badge")).to_have_text("Settled")
    await assert_accessible(english)


async def test_an_unknown_order_says_so(console: Console) -> None:
    page = await console.page(lang="en")
    await page.goto(f"{console.base}/console/orders/{'0' * 32}")
    await expect(page.locator("#order-problem .error")).to_contain_text("not found")


async def test_stop_from_the_order_page_asks_first_and_a_reader_sees_no_actions(
    console: Console,
) -> None:
    order_no = await _charging(console)
    page = await console.page(lang="en")
    await page.goto(f"{console.base}/console/orders/{order_no}")
    stop = page.locator("#order-actions button", has_text="Stop charging")
    await expect(stop).to_be_visible(timeout=LIVE)
    # the confirmation names the order, the device and the port, and the effect
    await stop.click()
    message = page.locator("#confirm-message")
    await expect(message).to_contain_text(order_no)
    await expect(message).to_contain_text(f"port 1 of device {PHY}")
    await expect(message).to_contain_text("settled")
    await page.click("#confirm button[value=cancel]")
    await expect(page.locator("#order-status .badge")).to_have_text("Charging")
    await stop.click()
    await page.click("#confirm-ok")
    await expect(page.locator("#notices")).to_contain_text("Stop sent.")
    await expect(page.locator("#order-status .badge")).to_have_text("Settled", timeout=LIVE)
    await expect(page.locator("#order-actions")).to_contain_text("Nothing can be done")

    reader = await console.page(await console.key("read"), lang="en")
    await reader.goto(f"{console.base}/console/orders/{order_no}")
    await expect(reader.locator("#order-status .badge")).to_have_text("Settled")
    await expect(reader.locator("#order-actions")).to_be_hidden()
    await expect(reader.locator("#actions-h")).to_be_hidden()


def test_every_value_the_pages_show_is_in_the_catalogue() -> None:
    for lang in i18n.LANGUAGES:
        texts = i18n.catalogue(lang)
        keys = [
            *(f"order_status.{s.value}" for s in OrderStatus),
            *(f"stop_reason.{s.value}" for s in StopReason),
            *(f"start_mode.{s.value}" for s in StartMode),
            *(f"timeline.type.{name}" for name in EVENT_TYPES),
            *(f"timeline.kind.{kind.value}" for kind in ItemKind),
        ]
        assert [key for key in keys if not texts.get(key)] == [], lang


async def test_load_more_follows_the_cursor_with_the_filters(console: Console) -> None:
    pool = console.gateway.pool
    assert pool is not None
    await pool.executemany(
        """INSERT INTO orders (order_no, device_id, port, protocol, status, start_mode,
                               device_initiated, created_at)
           VALUES ($1, $2, 1, 'ap3000', 'settled', $3, $4, now() - make_interval(secs => $5))""",
        [
            (f"{i:032X}", "04000009", "device" if i % 2 else "card", bool(i % 2), i)
            for i in range(1, 131)
        ],
    )
    page = await console.page(lang="en")
    await page.goto(f"{console.base}/console/orders?device_id=04000009&start_mode=device")
    await expect(page.locator("#f-start-mode")).to_have_value("device")
    rows = page.locator("#order-list tbody tr[data-order]")
    await expect(rows).to_have_count(50)
    await expect(page.locator("#order-count")).to_have_text("Orders shown: 50; more exist")
    await page.click("#order-more")
    await expect(rows).to_have_count(65)
    await expect(page.locator("#order-more")).to_be_hidden()
    await expect(page.locator("#order-count")).to_have_text("Orders shown: 65")
    assert (
        await page.locator("#order-list td[data-col=start_mode]").all_inner_texts()
        == ["At the device"] * 65
    )
