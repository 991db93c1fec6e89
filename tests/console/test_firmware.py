"""The console's firmware page and the device page's firmware panel against simulated
AP3000 piles: an image uploaded through the form, an upgrade of two piles followed live
until verified, a delete refused while the image is in use, a job cancelled."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Page, expect

from chargegw.console import i18n
from chargegw.domain.firmware import FAMILIES, TargetState, Waiting
from chargesim import SimulatedAp3000Pile
from tests.console.conftest import Console, assert_accessible, screenshot

PILES = ("04000001", "04000002")
#: the simulated piles of type code 04 report device type 0x27 and version 312
NEW = "313"
#: 103 packets of 200 bytes (and the check packet): long enough to watch it move
IMAGE = random.Random(7).randbytes(20 * 1024)
#: an upgrade of two piles: transfers, reboots, version reports
UPGRADED_MS = 40_000


@pytest.fixture
def console_settings() -> dict[str, Any]:
    return {
        "ack_timeout_s": 1.0,
        "command_spacing_s": 0.01,
        "firmware_tick_s": 0.1,
        "firmware_reboot_timeout_s": 5.0,
        "outbox_scan_s": 0.5,
    }


def _page_errors(page: Page) -> list[str]:
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return errors


async def _upload(page: Page, path: Path, version: str) -> None:
    form = page.locator("#fu-form")
    if not await form.is_visible():
        await page.locator("#fw-upload-box summary").click()
    await form.locator("#fu-device-type").fill("0x27")
    await form.locator("#fu-version").fill(version)
    await form.locator("#fu-file").set_input_files(str(path))
    await form.get_by_role("button", name="上传").click()


async def test_upload_an_image_and_upgrade_two_piles_live(console: Console, tmp_path: Path) -> None:
    await console.piles(*(SimulatedAp3000Pile(p, heartbeat_s=180) for p in PILES), accel=60.0)
    page = await console.page()
    errors = _page_errors(page)
    await page.goto(f"{console.base}/console/firmware")
    await expect(page.locator("#fw-images td.empty")).to_be_visible()
    await assert_accessible(page)

    # the API checks the metadata: its message next to the field
    image_file = tmp_path / "pile-313.bin"
    image_file.write_bytes(IMAGE)
    await _upload(page, image_file, "3.13")
    version_error = page.locator("#fu-form p.field-error")
    await expect(version_error).to_contain_text(
        "an AP3000 version is the number the device reports"
    )
    await expect(page.locator("#fu-version")).to_have_attribute("aria-invalid", "true")
    await _upload(page, image_file, NEW)
    row = page.locator("#fw-images tr[data-image]")
    await expect(row).to_have_count(1)
    await expect(row.locator("td[data-col=version]")).to_have_text("313 (V3.13)")
    await expect(row.locator("td[data-col=packets]")).to_have_text("104")
    await expect(row.locator("td[data-col=size]")).to_contain_text("20,480")
    await expect(version_error).to_have_count(0)
    await page.evaluate("window.__noReload = true")

    # an upgrade of both piles by their ids
    await page.locator("#fw-create-box summary").click()
    create = page.locator("#fj-form")
    await create.locator("#fj-image").select_option(index=1)
    await create.locator("textarea").fill(" ".join(PILES))
    await create.get_by_role("button", name="开始升级").click()
    dialog = page.locator("dialog#confirm")
    await expect(dialog.locator("#confirm-message")).to_contain_text(
        f"将 设备 {', '.join(PILES)} 升级到固件 #1"
    )
    await dialog.locator("#confirm-ok").click()
    job = page.locator("#fw-job")
    await expect(job.locator("h2")).to_have_text(re.compile(r"升级任务 #\d+"))
    await expect(job.locator("tbody tr[data-device]")).to_have_count(2)

    # live: a transfer part way through (packets n of m) without a reload
    await page.wait_for_function(
        """() => [...document.querySelectorAll('#fw-job progress')]
                 .some(p => p.value >= 20 && p.value < p.max)""",
        timeout=UPGRADED_MS,
    )
    await expect(
        job.locator("td[data-col=state] .badge[data-state=transferring]").first
    ).to_have_text("传输中")
    await expect(job.locator(".packets").first).to_contain_text("/104 包")
    await screenshot(page, "firmware-job")

    # the image is in use: the API refuses to delete it and says why
    await page.locator("#fw-images tr[data-image] button.danger").click()
    await expect(dialog.locator("#confirm-message")).to_contain_text("删除固件 #1")
    await expect(dialog.locator("#confirm-message")).to_contain_text(
        "0xE0 · 313 (V3.13) · 类型 0x27"
    )
    await dialog.locator("#confirm-ok").click()
    await expect(page.locator("#fw-images-error")).to_contain_text("in use by upgrade job(s) 1")
    await expect(page.locator("#fw-images tr[data-image]")).to_have_count(1)

    for pile in PILES:
        state = job.locator(f"tr[data-device='{pile}'] td[data-col=state] .badge")
        await expect(state).to_have_attribute("data-state", "verified", timeout=UPGRADED_MS)
        progress = job.locator(f"tr[data-device='{pile}'] td[data-col=progress]")
        await expect(progress).to_have_text("312 (V3.12) → 313 (V3.13)")
    await expect(job.locator("[data-fact=state] .badge")).to_have_attribute("data-state", "done")
    await expect(job.locator("#fw-cancel")).to_have_count(0)
    await expect(page.locator("#fw-jobs tr[data-job] td[data-col=state] .badge")).to_have_attribute(
        "data-state", "done"
    )
    assert await page.evaluate("window.__noReload === true"), "the page was reloaded"
    await screenshot(page, "firmware")
    await assert_accessible(page)

    # the device page: its version and the upgrade in its history
    await page.goto(f"{console.base}/console/devices/{PILES[0]}")
    panel = page.locator("#device-firmware-body")
    await expect(panel.locator("[data-fact=firmware]")).to_have_text("313 (V3.13)")
    history = panel.locator("tr[data-job]")
    await expect(history).to_have_count(1)
    await expect(history.locator("td[data-col=state] .badge")).to_have_attribute(
        "data-state", "verified"
    )
    assert not errors, errors


async def test_a_waiting_job_is_cancelled_after_confirmation(console: Console) -> None:
    sim = await console.piles(SimulatedAp3000Pile(PILES[0], heartbeat_s=180), accel=60.0)
    page = await console.page(lang="en")
    errors = _page_errors(page)
    # the pile is known but offline: its upgrade waits
    await sim.stop()
    image = await console.api(
        "POST",
        "/api/v1/firmware",
        params={"protocol": "ap3000", "family": "0xE0", "device_type": "39", "version": NEW},
        content=IMAGE,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert image.status_code == 201, image.text
    response = await console.api(
        "POST",
        "/api/v1/upgrade-jobs",
        json={"firmware_id": image.json()["firmware_id"], "selector": {"device_ids": [PILES[0]]}},
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    # the device page's history shows the queued target (no event yet: a running job)
    await page.goto(f"{console.base}/console/devices/{PILES[0]}")
    history = page.locator("#device-firmware-body tr[data-job]")
    await expect(history.locator("td[data-col=state] .badge")).to_have_attribute(
        "data-state", "queued"
    )

    await page.goto(f"{console.base}/console/firmware?job={job_id}")
    # a BKV image is an FTP address: its fields, and the API's word on a missing one
    await page.locator("#fw-upload-box summary").click()
    upload = page.locator("#fu-form")
    await expect(upload.locator("#fu-ftp-host")).to_be_hidden()
    await upload.locator("#fu-protocol").select_option("bkv")
    await expect(upload.locator("#fu-family")).to_have_value("ota")
    await upload.locator("#fu-version").fill("V2.0.1")
    await upload.locator("#fu-file-name").fill("dtu.bin")
    await upload.get_by_role("button", name="Upload").click()
    await expect(upload.locator("p.field-error")).to_contain_text("ftp_host must be an IPv4")
    await expect(upload.locator("#fu-ftp-host")).to_have_attribute("aria-invalid", "true")
    await upload.locator("#fu-ftp-host").fill("192.0.2.10")
    await upload.get_by_role("button", name="Upload").click()
    await expect(page.locator("#fw-images tr[data-image]")).to_have_count(2)
    await expect(page.locator("#fw-images tr[data-image='2'] td[data-col=family]")).to_have_text(
        "OTA gateway upgrade"
    )
    job = page.locator("#fw-job")
    row = job.locator(f"tr[data-device='{PILES[0]}']")
    await expect(row.locator("td[data-col=state] .badge")).to_have_attribute("data-state", "queued")
    await expect(row.locator("td[data-col=progress]")).to_contain_text(
        "Waiting for the device to come online"
    )
    # asked first; declining changes nothing
    await job.locator("#fw-cancel").click()
    dialog = page.locator("dialog#confirm")
    await expect(dialog.locator("#confirm-message")).to_contain_text(
        f"Cancel upgrade job #{job_id}"
    )
    await expect(dialog.locator("#confirm-message")).to_contain_text(
        "Queued and transferring devices stop"
    )
    await dialog.get_by_role("button", name="Cancel", exact=True).click()
    await expect(row.locator("td[data-col=state] .badge")).to_have_attribute("data-state", "queued")
    await job.locator("#fw-cancel").click()
    await dialog.locator("#confirm-ok").click()
    await expect(row.locator("td[data-col=state] .badge")).to_have_attribute(
        "data-state", "cancelled"
    )
    await expect(job.locator("[data-fact=state] .badge")).to_have_text("Cancelled")
    await expect(job.locator("#fw-cancel")).to_have_count(0)
    assert not errors, errors


def test_every_state_family_and_wait_has_its_texts() -> None:
    """The keys the modules build (`upgrade_state.<state>` ...) are in the catalogue."""
    texts = i18n.catalogue("en")
    keys = {f"upgrade_state.{s.value}" for s in TargetState}
    keys |= {f"upgrade_waiting.{w.value}" for w in Waiting}
    keys |= {f"upgrade_job_state.{s}" for s in ("running", "done", "cancelled")}
    keys |= {f"firmware_family.{name}" for name in FAMILIES}
    keys |= {f"firmware_target.{f.target}" for f in FAMILIES.values()}
    keys |= {f"job_selector.{mode}" for mode in ("ids", "type", "all")}
    missing = sorted(k for k in keys if k not in texts)
    assert not missing, missing
