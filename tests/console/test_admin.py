"""The administration page in a real browser: API keys (a new key shown once, revoked
after confirming), webhooks (secret shown once, test ping, delivery log, retry, disable,
delete), bans (live, lifted after confirming), cluster nodes, the audit trail, and the
forbidden page for a key without the admin scope."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from playwright.async_api import Page, expect

from tests.console.conftest import Console, assert_accessible, screenshot
from tests.gw.waiting import eventually


@pytest.fixture
def console_settings() -> dict[str, Any]:
    # the test's webhook receiver listens on 127.0.0.1
    return {"webhooks_allow_private": True}


@pytest.fixture
async def receiver() -> AsyncIterator[str]:
    """A webhook receiver on a loopback port that answers every delivery 200: its URL."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/hooks/chargegw"
    finally:
        server.close()
        await server.wait_closed()


async def _admin(console: Console, *, lang: str = "zh", tab: str = "") -> Page:
    page = await console.page(lang=lang)
    await page.goto(f"{console.base}/console/admin{'#' + tab if tab else ''}")
    return page


async def test_a_new_key_is_shown_once_and_revoked_after_confirming(console: Console) -> None:
    page = await _admin(console)
    await expect(page.locator("#key-list")).to_contain_text("还没有存储的 API 密钥")

    await page.fill("#kc-name", "计费系统 <script>")
    await page.check("#kc-scope-billing")
    await page.fill("#kc-expiry", "30")
    await page.click("#key-create button[type=submit]")
    secret = page.locator("#key-secret-value")
    await expect(secret).to_be_visible()
    await expect(page.locator("#key-secret")).to_contain_text("只显示这一次")
    key = await secret.input_value()
    assert key.startswith("cgw_")
    stored = (await console.api("GET", "/api/v1/api-keys")).json()["items"]
    assert len(stored) == 1 and stored[0]["scopes"] == ["read", "billing"]
    assert stored[0]["expires_at"] is not None
    key_id = stored[0]["key_id"]
    row = page.locator(f'[data-key="{key_id}"]')
    await expect(row).to_contain_text("计费系统 <script>")
    await expect(row).to_contain_text("有效")
    # the key works: a billing call with it
    assert (await console.api("GET", "/api/v1/cards", key=key)).status_code == 200
    await screenshot(page, "admin")
    await assert_accessible(page)

    # once stored away, it is nowhere on the page, nor after a reload
    await page.click("#key-secret button:not(.primary)")
    await expect(secret).to_have_count(0)
    assert key not in await page.content()
    await page.reload()
    await expect(row).to_be_visible()
    assert key not in await page.content()

    # what the API refuses is shown next to its field: no name, no scope
    await page.fill("#kc-name", "")
    await page.uncheck("#kc-scope-read")
    await page.click("#key-create button[type=submit]")
    await expect(page.locator("#kc-name + .field-error")).to_be_visible()
    await expect(page.locator("fieldset[name=scopes] + .field-error")).to_be_visible()

    # revoke: the confirmation names the key and the effect; cancelling changes nothing
    await row.locator("[data-action=revoke]").click()
    message = page.locator("#confirm-message")
    await expect(message).to_contain_text("计费系统 <script>")
    await expect(message).to_contain_text(f"#{key_id}")
    await expect(message).to_contain_text("拒绝")
    await page.locator("#confirm button[value=cancel]").click()
    assert (await console.api("GET", "/api/v1/cards", key=key)).status_code == 200

    await row.locator("[data-action=revoke]").click()
    await page.click("#confirm-ok")
    await expect(row).to_contain_text("已吊销")
    await expect(row.locator("[data-action=revoke]")).to_have_count(0)

    async def refused() -> int:
        return (await console.api("GET", "/api/v1/cards", key=key)).status_code

    await eventually(refused, lambda status: status == 401, what="the revoked key refused")


async def test_rotating_a_key_shows_the_new_one(console: Console) -> None:
    old = await console.key("read", name="partner")
    page = await _admin(console, lang="en")
    row = page.locator('[data-key]:has-text("partner")')
    await row.locator("[data-action=rotate]").click()
    await expect(page.locator("#confirm-message")).to_contain_text("partner")
    await page.click("#confirm-ok")
    secret = page.locator("#key-secret-value")
    await expect(secret).to_be_visible()
    new = await secret.input_value()
    assert new.startswith("cgw_") and new != old
    await expect(page.locator("#key-secret")).to_contain_text("stops working at")
    assert (await console.api("GET", "/api/v1/devices", key=new)).status_code == 200
    assert (await console.api("GET", "/api/v1/devices", key=old)).status_code == 200


async def test_a_key_without_admin_gets_the_forbidden_page(console: Console) -> None:
    key = await console.key("read", "billing", "control", "config")
    page = await console.page(key)
    response = await page.goto(f"{console.base}/console/admin")
    assert response is not None and response.status == 403
    await expect(page.locator("main .error")).to_contain_text("admin")
    await expect(page.locator("#key-list")).to_have_count(0)
    # the navigation offers no administration to this key
    await expect(page.locator('nav a[href="/console/admin"]')).to_have_count(0)


async def test_webhooks_secret_ping_deliveries_and_delete(console: Console, receiver: str) -> None:
    page = await _admin(console, lang="en", tab="webhooks")
    await expect(page.locator("#webhook-list")).to_contain_text("No webhook subscriptions")

    # the event types come from the catalogue: a refused URL shows next to its field
    await page.fill("#wc-url", "ftp://example.com/x")
    await page.click("#webhook-create button[type=submit]")
    await expect(page.locator("fieldset[name=event_types] + .field-error")).to_be_visible()
    await page.check("#wc-type-order-all")
    await page.click("#webhook-create button[type=submit]")
    await expect(page.locator("#wc-url + .field-error")).to_be_visible()

    await page.fill("#wc-url", receiver)
    await page.fill("#wc-description", "ERP <b>")
    await page.check("#wc-type-ban-placed")
    await page.click("#webhook-create button[type=submit]")
    secret = page.locator("#webhook-secret-value")
    await expect(secret).to_be_visible()
    assert (await secret.input_value()).startswith("whsec_")
    hooks = (await console.api("GET", "/api/v1/webhooks")).json()["items"]
    assert len(hooks) == 1 and hooks[0]["event_types"] == ["order.*", "ban.placed"]
    hook_id = hooks[0]["id"]
    row = page.locator(f'[data-webhook="{hook_id}"]')
    await expect(row).to_contain_text("ERP <b>")
    await expect(row).to_contain_text("Enabled")

    # a test ping opens the delivery log; once delivered, retry sends it again
    await row.locator("[data-action=test]").click()
    await expect(page.locator("#deliveries")).to_be_visible()
    await expect(page.locator("#delivery-list")).to_contain_text("webhook.ping")

    async def delivered() -> list[dict[str, Any]]:
        response = await console.api("GET", f"/api/v1/webhooks/{hook_id}/deliveries")
        items: list[dict[str, Any]] = response.json()["items"]
        return items

    items = await eventually(delivered, lambda d: d and d[0]["status"] == "delivered", what="ping")
    await page.click("#delivery-filter button[type=submit]")
    first = page.locator(f'[data-delivery="{items[0]["id"]}"]')
    await expect(first).to_contain_text("Delivered")
    await expect(first).to_contain_text("HTTP 200")
    await first.locator("[data-action=retry]").click()
    await expect(page.locator("#delivery-list tbody tr")).to_have_count(2)
    await expect(page.locator("#delivery-list")).to_contain_text("retry")
    await assert_accessible(page)

    # disable and enable again
    await row.locator("[data-action=disable]").click()
    await expect(row).to_contain_text("Disabled by hand")
    assert (await console.api("GET", f"/api/v1/webhooks/{hook_id}")).json()["enabled"] is False
    await row.locator("[data-action=enable]").click()
    await expect(row).to_contain_text("Enabled")

    # delete after confirming: the message names the URL and the effect
    await row.locator("[data-action=delete]").click()
    await expect(page.locator("#confirm-message")).to_contain_text(receiver)
    await expect(page.locator("#confirm-message")).to_contain_text("deleted for good")
    await page.click("#confirm-ok")
    await expect(row).to_have_count(0)
    await expect(page.locator("#deliveries")).to_be_hidden()
    assert (await console.api("GET", "/api/v1/webhooks")).json()["items"] == []


async def test_bans_appear_live_and_are_lifted_after_confirming(console: Console) -> None:
    page = await _admin(console, tab="bans")
    await expect(page.locator("#ban-list")).to_contain_text("当前没有被封禁的设备")
    await expect(page.locator("#live-status")).to_have_attribute("data-state", "live")
    pool = console.gateway.pool
    assert pool is not None
    # a flapping device is banned (as the session writer does): ban.placed shows it
    await pool.execute(
        """INSERT INTO device_bans (device_id, until, reason, connects)
           VALUES ('04C0BAD1', $1, 'flapping', 12)""",
        datetime.now(UTC) + timedelta(minutes=10),
    )
    row = page.locator('[data-ban="04C0BAD1"]')
    await expect(row).to_contain_text("频繁重连")
    await expect(row.locator('[data-col="connects"]')).to_have_text("12")

    await row.locator("[data-action=lift]").click()
    await expect(page.locator("#confirm-message")).to_contain_text("04C0BAD1")
    await expect(page.locator("#confirm-message")).to_contain_text("立即重新连接")
    await page.click("#confirm-ok")
    await expect(row).to_have_count(0)
    assert (await console.api("GET", "/api/v1/bans")).json()["items"] == []
    await assert_accessible(page)


async def test_nodes_and_the_audit_trail(console: Console) -> None:
    await console.key("read", name="audited key")
    page = await _admin(console, lang="en", tab="nodes")
    await expect(page.locator("#node-list [data-owner]")).to_have_count(1)
    await expect(page.locator("#node-list")).to_contain_text("Live")
    await expect(page.locator("#node-answered")).to_contain_text("Answered by process")
    await assert_accessible(page)

    await page.click("#tab-audit")
    await expect(page.locator("#panel-audit")).to_be_visible()
    assert page.url.endswith("#audit")
    await expect(page.locator("#audit-list")).to_contain_text("/api/v1/api-keys")
    await expect(page.locator("#audit-list")).to_contain_text("audited key")
    # filters: no DELETE call was made
    await page.select_option("#af-method", "DELETE")
    await page.click("#audit-filter button[type=submit]")
    await expect(page.locator("#audit-list")).to_contain_text("No calls match")
    # a window that ends before it starts: the API's message next to its field
    await page.select_option("#af-method", "")
    await page.fill("#af-since", "2026-03-02T10:00")
    await page.fill("#af-until", "2026-03-01T10:00")
    await page.click("#audit-filter button[type=submit]")
    await expect(page.locator("#af-since + .field-error")).to_contain_text("since is after until")
    await assert_accessible(page)
