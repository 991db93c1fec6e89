"""Browser tests of the operator console: a real gateway (HTTP on a free loopback port,
devices from the simulator over TCP) driven by Playwright in Debian's Chromium.

The browser is the system's (``/usr/bin/chromium``, Debian's ``chromium`` package, which
``.ci/run`` installs); Playwright downloads nothing. Without it the tests are skipped on a
laptop and fail under CI. With ``CHARGEGW_SCREENSHOTS=<dir>`` (``nox -s screenshots``
sets ``docs/console``) the tests save screenshots of the main pages there.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright

from chargegw.app import Gateway
from chargesim import SimulatedPile, Simulator
from tests.gw.conftest import db_dsn, empty_db_dsn, pg_server_dsn, settings_for
from tests.gw.waiting import eventually

#: the database fixtures of the gateway tests, shared
FIXTURES = (db_dsn, empty_db_dsn, pg_server_dsn)

ADMIN_KEY = "cgw_console-admin-key-for-tests-0000000000000"
CHROMIUM = os.environ.get("CHARGEGW_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOTS = os.environ.get("CHARGEGW_SCREENSHOTS")


def _chromium() -> str:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"no Chromium at {CHROMIUM}: .ci/run installs Debian's chromium")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    return CHROMIUM


@dataclasses.dataclass
class Console:
    """A gateway serving the console, a browser, and what tests do with them."""

    gateway: Gateway
    base: str
    browser: Browser
    admin_key: str | None
    contexts: list[BrowserContext] = dataclasses.field(default_factory=list)
    sims: list[Simulator] = dataclasses.field(default_factory=list)
    #: uncaught errors of the pages' modules and CSP refusals: the test fails with them
    page_errors: list[str] = dataclasses.field(default_factory=list)

    async def api(
        self, method: str, path: str, key: str | None = None, **kw: Any
    ) -> httpx.Response:
        """An API call with the admin key (or ``key``), as a partner system would make it."""
        headers = kw.pop("headers", {})
        if key or self.admin_key:
            headers["Authorization"] = f"Bearer {key or self.admin_key}"
        async with httpx.AsyncClient(base_url=self.base, timeout=30) as client:
            return await client.request(method, path, headers=headers, **kw)

    async def key(self, *scopes: str, name: str = "console test key") -> str:
        """A new stored key with ``scopes``."""
        response = await self.api(
            "POST", "/api/v1/api-keys", json={"name": name, "scopes": list(scopes)}
        )
        assert response.status_code == 201, response.text
        key: str = response.json()["key"]
        return key

    async def page(self, key: str | None = None, *, lang: str = "zh") -> Page:
        """A browser page signed in with ``key`` (the admin key by default), in ``lang``
        (the browser's language: the console's default for it)."""
        context = await self.browser.new_context(
            locale="zh-CN" if lang == "zh" else "en-US",
            viewport={"width": 1280, "height": 900},
            timezone_id="Asia/Shanghai",
        )
        self.contexts.append(context)
        page = await context.new_page()
        page.set_default_timeout(15_000)
        page.on("pageerror", lambda error: self.page_errors.append(f"uncaught: {error}"))
        page.on(
            "console",
            lambda message: (
                self.page_errors.append(message.text)
                if "Content Security Policy" in message.text
                else None
            ),
        )
        await page.goto(self.base + "/console/")
        if self.admin_key is not None:
            await sign_in(page, key or self.admin_key)
        return page

    async def piles(self, *piles: SimulatedPile, accel: float = 60.0) -> Simulator:
        """Simulated piles connected to the gateway and known to its database."""
        sim = Simulator(
            "127.0.0.1", self.gateway.server.port, list(piles), accel=accel, jitter=0, seed=1
        )
        await sim.start()
        self.sims.append(sim)
        await sim.wait_connected(len(piles), timeout=15)
        pool = self.gateway.pool
        assert pool is not None

        async def known() -> bool:
            await self.gateway.writer.drained()
            count = await pool.fetchval("SELECT count(*) FROM devices WHERE online")
            return bool(count >= len(piles))

        await eventually(known, what="piles online")
        return sim


async def sign_in(page: Page, key: str) -> None:
    """Sign in on the console's sign-in page (where an unsigned page sends the browser)."""
    await page.wait_for_url("**/console/login**")
    await page.fill("#api_key", key)
    await page.click("button[type=submit]")
    await page.wait_for_url(lambda url: "/console/login" not in url)


async def screenshot(page: Page, name: str) -> None:
    """Save the page as ``<name>.png`` under ``CHARGEGW_SCREENSHOTS`` when it is set."""
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"), full_page=True)


async def assert_accessible(page: Page) -> None:
    """axe-core (axe-playwright-python's copy) finds no serious or critical violation."""
    from axe_playwright_python.async_playwright import Axe

    results = await Axe().run(page)
    bad = [
        (v["id"], v["impact"], [n["target"] for n in v["nodes"]][:3], v["help"])
        for v in results.response["violations"]
        if v["impact"] in ("serious", "critical")
    ]
    assert not bad, f"accessibility violations on {page.url}: {bad}"


@pytest.fixture
def console_settings() -> dict[str, Any]:
    """Settings of the console's gateway (overridden per module)."""
    return {}


async def _console(db_dsn: str, overrides: dict[str, Any], keys: bool) -> AsyncIterator[Console]:
    settings = settings_for(
        db_dsn,
        http_host="127.0.0.1",
        http_port=0,
        api_keys=ADMIN_KEY if keys else "",
        control_rate_per_key=0,
        **overrides,
    )
    gateway = Gateway(settings)
    await gateway.start()
    assert gateway.http_url is not None
    base = gateway.http_url.removesuffix("/docs")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=_chromium())
        console = Console(gateway, base, browser, ADMIN_KEY if keys else None)
        try:
            yield console
            assert not console.page_errors, console.page_errors
        finally:
            for context in console.contexts:
                await context.close()
            await browser.close()
            for sim in console.sims:
                await sim.stop()
            await gateway.stop()


@pytest.fixture
async def console(db_dsn: str, console_settings: dict[str, Any]) -> AsyncIterator[Console]:
    """The console of a gateway with an admin key configured (sign-in required)."""
    _chromium()
    async for c in _console(db_dsn, console_settings, keys=True):
        yield c


@pytest.fixture
async def local_console(db_dsn: str, console_settings: dict[str, Any]) -> AsyncIterator[Console]:
    """The console of a gateway without keys (localhost mode: no sign-in)."""
    _chromium()
    async for c in _console(db_dsn, console_settings, keys=False):
        yield c
