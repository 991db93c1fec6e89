"""The console's shell in a real browser: signing in, the overview, finding a device,
charging from the device page, the languages, escaping, scopes and accessibility."""

from __future__ import annotations

import re

from playwright.async_api import Page, expect

from chargesim import SimulatedAp3000Pile, SimulatedBkvGateway
from tests.console.conftest import Console, assert_accessible, screenshot

PHY = "04CEAA40"  # QR number 13544000
OTHER = "04CEAA41"
HOSTILE_ICCID = "89<script>alert(1)</"  # 20 characters, as a pile may send
HOSTILE_FIRMWARE = "<script>"  # the 8 characters of a BKV gateway's firmware text


async def _dialogs_fail(page: Page) -> list[str]:
    seen: list[str] = []
    page.on("dialog", lambda d: seen.append(d.message))
    return seen


async def test_sign_in_refuses_a_wrong_key_and_opens_with_a_right_one(console: Console) -> None:
    context = await console.browser.new_context(locale="en-US")
    console.contexts.append(context)
    page = await context.new_page()
    await page.goto(console.base + "/console/devices")
    await expect(page).to_have_url(re.compile(r"/console/login\?next=%2Fconsole%2Fdevices"))
    await page.fill("#api_key", "cgw_not-a-key")
    await page.click("button[type=submit]")
    await expect(page.locator("#login-error")).to_have_text("The API key is not valid.")
    await screenshot(page, "login")
    await assert_accessible(page)
    await sign_in_again(page, console.admin_key or "")
    await expect(page).to_have_url(re.compile(r"/console/devices$"))
    cookie = next(c for c in await context.cookies() if c["name"] == "chargegw_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    # signing out ends the session: the next page asks again
    await page.click("text=Sign out")
    await expect(page).to_have_url(re.compile(r"/console/login"))
    await page.goto(console.base + "/console/")
    await expect(page).to_have_url(re.compile(r"/console/login"))


async def sign_in_again(page: Page, key: str) -> None:
    await page.fill("#api_key", key)
    await page.click("button[type=submit]")


async def test_the_overview_shows_the_simulated_piles_live(console: Console) -> None:
    page = await console.page()
    await console.piles(SimulatedAp3000Pile(PHY, ports=2), SimulatedAp3000Pile(OTHER, ports=2))
    # no reload: the device.online events update the page
    await expect(page.locator("#tile-online .value")).to_have_text("2")
    await expect(page.locator("#ov-devices td[data-col=protocol]").first).to_have_text("AP3000")
    await expect(page.locator("#ov-nodes tbody tr")).to_have_count(1)
    await expect(page.locator("#live-status")).to_have_attribute("data-state", "live")
    await screenshot(page, "overview")
    await assert_accessible(page)


async def test_find_a_device_by_its_qr_number_and_charge_from_its_page(console: Console) -> None:
    await console.piles(SimulatedAp3000Pile(PHY, ports=2), SimulatedAp3000Pile(OTHER, ports=2))
    page = await console.page(lang="en")
    await page.goto(console.base + "/console/devices")
    await expect(page.locator("#device-list tbody tr")).to_have_count(2)
    await page.fill("#f-q", "13544000")
    await page.click("#device-filters button[type=submit]")
    await expect(page.locator("#device-list tbody tr")).to_have_count(1)
    await expect(page.locator("#device-list td[data-col=qr_number]")).to_have_text("13544000")
    await screenshot(page, "devices")
    await assert_accessible(page)
    await page.click(f"#device-list a:text('{PHY}')")
    await expect(page).to_have_url(re.compile(f"/console/devices/{PHY}$"))

    port = page.locator("#device-ports .port[data-port='1']")
    await port.locator("select[name=mode]").select_option("time")
    await port.locator("input[name=duration_min]").fill("30")
    await port.locator("button[type=submit]").click()
    await expect(page.locator("#confirm-message")).to_contain_text(PHY)
    await page.click("#confirm-ok")
    # charging, live: the port's session appears with no reload
    await expect(port.locator(".session .badge")).to_have_text("Charging", timeout=20_000)
    order_no = await port.locator(".session").get_attribute("data-order")
    assert order_no
    await screenshot(page, "device")
    await assert_accessible(page)

    await port.locator(".session button.danger").click()
    await expect(page.locator("#confirm-message")).to_contain_text(order_no)
    await page.click("#confirm-ok")
    # settled: the recent orders show the amount and the stop reason
    row = page.locator("#device-orders tbody tr").first
    await expect(row.locator("td[data-col=status]")).to_have_text("Settled", timeout=20_000)
    await expect(row.locator("td[data-col=amount_cent]")).to_have_text(re.compile(r"^¥\d+\.\d\d$"))
    await expect(port.locator(".start-form")).to_be_visible()


async def test_switch_to_english_and_back(console: Console) -> None:
    page = await console.page(lang="zh")
    await expect(page.locator("h1")).to_have_text("总览")
    await expect(page.locator("html")).to_have_attribute("lang", "zh-CN")
    await page.click("header .langs a[lang=en]")
    await expect(page.locator("h1")).to_have_text("Overview")
    await expect(page.locator("html")).to_have_attribute("lang", "en")
    await page.goto(console.base + "/console/devices")
    await expect(page.locator("h1")).to_have_text("Devices")  # the choice is remembered
    await page.click("header .langs a[lang=zh-CN]")
    await expect(page.locator("h1")).to_have_text("设备")
    await expect(page).to_have_url(re.compile(r"/console/devices$"))


async def test_hostile_device_strings_are_shown_as_text(console: Console) -> None:
    # no protocol carries a QR code's text up from a pile; these are the texts piles do
    # send: a BKV gateway's firmware and its SIM's ICCID
    gateway = SimulatedBkvGateway(
        "82231214002700", sockets=1, firmware=HOSTILE_FIRMWARE, iccid=HOSTILE_ICCID, send_iccid=True
    )
    await console.piles(gateway)
    page = await console.page(lang="en")
    alerts = await _dialogs_fail(page)
    await page.goto(console.base + "/console/devices/82231214002700-1")
    facts = page.locator("#gateway-facts-body")
    await expect(facts).to_contain_text(HOSTILE_FIRMWARE)
    await expect(facts).to_contain_text("89<scr**********1)</")  # masked, and shown as text
    await page.goto(console.base + "/console/devices?q=" + "%3Cscript%3E")
    await expect(page.locator("#f-q")).to_have_value("<script>")
    await expect(page.locator("#device-list td.empty")).to_have_count(1)
    # nothing ran, and no element came from the strings
    assert alerts == []
    assert await page.locator("main script, main img").count() == 0


async def test_an_action_without_its_scope_is_refused(console: Console) -> None:
    await console.piles(SimulatedAp3000Pile(PHY, ports=2), SimulatedAp3000Pile(OTHER, ports=2))
    # a read-only key sees no controls, and the admin pages answer 403
    reader = await console.key("read", name="reader")
    page = await console.page(reader, lang="en")
    await page.goto(console.base + f"/console/devices/{PHY}")
    await expect(page.locator("#device-ports .port")).to_have_count(2)
    await expect(page.locator("#device-ports .start-form")).to_have_count(0)
    await expect(page.locator("#device-actions button").first).to_be_disabled()
    response = await page.goto(console.base + "/console/admin")
    assert response is not None and response.status == 403
    await expect(page.locator("main .error")).to_contain_text("admin")
    # the session itself cannot do it either: a start sent past the page is refused
    answer = await page.evaluate(
        """async (device) => {
            const csrf = JSON.parse(document.getElementById("console-config").textContent).csrf;
            const r = await fetch(`/api/v1/devices/${device}/ports/1/start`, {
                method: "POST", headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
                body: JSON.stringify({mode: "full"})});
            return [r.status, (await r.json()).error.message];
        }""",
        PHY,
    )
    assert answer == [403, "this call needs scope control"]
    # a key limited to another device: the device's page shows the API's refusal
    limited = await console.api(
        "POST",
        "/api/v1/api-keys",
        json={
            "name": "other pile only",
            "scopes": ["read", "control"],
            "allowed_device_ids": [OTHER],
        },
    )
    assert limited.status_code == 201, limited.text
    page = await console.page(limited.json()["key"], lang="en")
    await page.goto(console.base + f"/console/devices/{PHY}")
    await expect(page.locator("#device-facts .error")).to_contain_text(PHY)
    await page.goto(console.base + f"/console/devices/{OTHER}")
    await expect(page.locator("#device-ports .start-form")).to_have_count(2)


async def test_localhost_mode_opens_without_signing_in(local_console: Console) -> None:
    page = await local_console.page(lang="en")
    await expect(page).to_have_url(re.compile(r"/console/$"))
    await expect(page.locator(".banner.warn")).to_contain_text("Localhost mode")
    await expect(page.locator("#tile-online .value")).to_have_text("0")
