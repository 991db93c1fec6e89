"""The console's parameters: the device page's panel against a simulated AP3000 pile (an
edit verified by read-back, live; the API's error next to its field) and the profiles
page (create a profile, apply it, follow the job live)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from playwright.async_api import Page, expect

from chargegw.api.param_models import group_schema
from chargegw.console import i18n
from chargegw.domain.params import GROUPS, MemberStatus, ParamStatus
from chargegw.domain.params_store import JOB_STATUSES
from chargesim import SimulatedAp3000Pile
from tests.console.conftest import Console, assert_accessible, screenshot

PHY = "04000001"
OTHER = "04000002"
#: a verification takes a set, its acknowledgement and a read-back: well under this
VERIFIED_MS = 20_000


@pytest.fixture
def console_settings() -> dict[str, Any]:
    return {"ack_timeout_s": 1.0, "command_spacing_s": 0.05, "params_tick_s": 0.1}


def _page_errors(page: Page) -> list[str]:
    """Uncaught errors of the page's modules (a test ends with none)."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return errors


async def _mark(page: Page) -> None:
    """Mark the document: the mark is gone if the page reloads."""
    await page.evaluate("window.__noReload = true")


async def _not_reloaded(page: Page) -> None:
    assert await page.evaluate("window.__noReload === true"), "the page was reloaded"


async def test_edit_a_parameter_on_the_device_page_and_see_it_verified(console: Console) -> None:
    await console.piles(SimulatedAp3000Pile(PHY, ports=2, heartbeat_s=180), accel=120.0)
    page = await console.page()
    errors = _page_errors(page)
    await page.goto(f"{console.base}/console/devices/{PHY}")
    panel = page.locator("#device-params-body")
    running1 = panel.locator("section[data-group=running1]")
    await expect(running1.locator("h3 .badge")).to_have_attribute("data-status", "none")
    await expect(panel.locator("section.param-group")).to_have_count(8)  # the AP3000 groups
    await _mark(page)

    # never set: read the pile's values first, then change one field of the group
    await running1.locator("summary").click()
    await running1.get_by_role("button", name="读取设备当前值").click()
    reported = running1.locator("tr[data-field-row=heartbeat_interval_s] td[data-col=reported]")
    await expect(reported).to_have_text("180 秒")
    percent = running1.locator("input[data-field=float_percent]")
    await expect(percent).to_have_value("20")  # the form holds what the pile reported

    # out of the reference's range: the API's message next to the field, nothing sent
    await percent.fill("300")
    await running1.get_by_role("button", name="下发并校验").click()
    error = running1.locator("p.field-error")
    await expect(error).to_contain_text("float_percent must be 1-100")
    await expect(percent).to_have_attribute("aria-invalid", "true")
    assert await error.get_attribute("id") == await percent.get_attribute("aria-describedby")
    # right after the field's input (and its unit)
    follows = "(e, id) => e.previousElementSibling.contains(document.getElementById(id))"
    assert await error.evaluate(follows, await percent.get_attribute("id"))
    await expect(running1.locator("h3 .badge")).to_have_attribute("data-status", "none")

    await percent.fill("40")
    await running1.get_by_role("button", name="下发并校验").click()
    await expect(error).to_have_count(0)
    await expect(running1.locator("h3 .badge")).to_have_attribute(
        "data-status", "verified", timeout=VERIFIED_MS
    )
    await expect(running1.locator("h3 .badge")).to_have_text("已校验")
    desired = running1.locator("tr[data-field-row=float_percent] td[data-col=desired]")
    await expect(desired).to_have_text("40 %")
    await expect(
        running1.locator("tr[data-field-row=float_percent] td[data-col=reported]")
    ).to_have_text("40 %")
    await _not_reloaded(page)

    # a group set from scratch: every field its wire format needs
    limits = panel.locator("section[data-group=limits]")
    await limits.locator("summary").click()
    await limits.locator("input[data-field=max_charge_duration_s]").fill("36000")
    await limits.locator("input[data-field=overload_power_w]").fill("1500")
    await limits.get_by_role("button", name="下发并校验").click()
    await expect(limits.locator("h3 .badge")).to_have_attribute(
        "data-status", "verified", timeout=VERIFIED_MS
    )
    await expect(
        limits.locator("tr[data-field-row=overload_power_w] td[data-col=reported]")
    ).to_have_text("1,500.0 瓦")
    await _not_reloaded(page)
    await assert_accessible(page)

    # the live stream drops and stays down while another client changes the group:
    # after the reconnect the panel shows it (without a reload)
    stream = "**/api/v1/events/stream*"
    await page.route(stream, lambda route: route.abort())
    console.gateway.events.close_streams("test: the stream drops")
    await expect(page.locator("#live-status")).not_to_have_attribute("data-state", "live")
    response = await console.api(
        "PUT", f"/api/v1/devices/{PHY}/params", json={"limits": {"overload_power_w": 1800}}
    )
    assert response.status_code == 202, response.text
    await page.unroute(stream)
    await expect(page.locator("#live-status")).to_have_attribute(
        "data-state", "live", timeout=VERIFIED_MS
    )
    await expect(
        limits.locator("tr[data-field-row=overload_power_w] td[data-col=reported]")
    ).to_have_text("1,800.0 瓦", timeout=VERIFIED_MS)
    await expect(limits.locator("h3 .badge")).to_have_attribute("data-status", "verified")
    # the form follows what is desired now (it was not being edited)
    await expect(limits.locator("input[data-field=overload_power_w]")).to_have_value("1800")
    await _not_reloaded(page)
    assert not errors, errors


async def test_the_field_tables_follow_the_api_models(console: Console) -> None:
    """The panel's inputs (type, range, allowed values) are the API's group schemas."""
    page = await console.page()
    await page.goto(f"{console.base}/console/params")
    tables: dict[str, Any] = await page.evaluate(
        "import('/console/static/js/params_panel.js').then(m => m.GROUPS)"
    )
    assert set(tables) == set(GROUPS)
    for name, group in GROUPS.items():
        spec = tables[name]
        assert spec["protocol"] == group.protocol, name
        assert (spec["set"], spec["read"]) == (group.set_command, group.read_command), name
        assert bool(spec.get("partial")) == group.partial, name
        assert [f["name"] for f in spec["fields"]] == list(group.fields), name
        schema = group_schema(group)["properties"]
        for field in spec["fields"]:
            want = schema[field["name"]]
            what = f"{name}.{field['name']}"
            if "enum" in want:
                assert field["type"] == "enum" and field["values"] == want["enum"], what
            elif want.get("type") == "integer":
                assert field["type"] == "int", what
                assert (field["min"], field["max"]) == (want["minimum"], want["maximum"]), what
            elif want.get("type") == "number":
                assert field["type"] == "float", what
                assert (field["min"], field["max"]) == (want["minimum"], want["maximum"]), what
                assert field["step"] == group.resolution[field["name"]], what
            elif "pattern" in want:
                assert field["type"] == "hex", what
                assert want["pattern"] == f"^([0-9A-Fa-f]{{2}}){{{field['bytes']}}}$", what
            elif want.get("type") == "string":
                assert field["type"] == "text" and field["maxLength"] == want["maxLength"], what
            else:
                assert field["type"] == "periods" and field["max"] == want["maxItems"], what


async def test_create_a_profile_apply_it_and_follow_the_job(console: Console) -> None:
    await console.piles(
        SimulatedAp3000Pile(PHY, ports=2, heartbeat_s=180),
        SimulatedAp3000Pile(OTHER, ports=2, heartbeat_s=180),
        accel=120.0,
    )
    page = await console.page()
    errors = _page_errors(page)
    await page.goto(f"{console.base}/console/params")
    await expect(page.locator("#pp-profiles td.empty")).to_be_visible()
    await page.click("#pp-new")
    editor = page.locator("#pe-form")
    await editor.locator("#pe-name").fill("night-limits")
    await editor.locator("#pe-include-limits").check()
    await editor.locator("#pe-limits-max_charge_duration_s").fill("28800")
    # out of range: the API's message next to the field, in its group
    await editor.locator("#pe-limits-overload_power_w").fill("9000")
    await editor.get_by_role("button", name="创建").click()
    await expect(editor.locator("p.field-error")).to_contain_text("overload_power_w must be 0-3500")
    await expect(editor.locator("#pe-limits-overload_power_w")).to_have_attribute(
        "aria-invalid", "true"
    )
    await editor.locator("#pe-limits-overload_power_w").fill("1200")
    await editor.locator("#pe-include-mute").check()
    await editor.locator("#pe-mute-mute_mode").select_option("1")
    await editor.get_by_role("button", name="创建").click()

    profile = page.locator("#pp-profile")
    await expect(profile.locator("h2")).to_have_text("参数模板 night-limits")
    await expect(profile.locator("section[data-group=limits]")).to_contain_text("1,200.0 瓦")
    await expect(
        page.locator("#pp-profiles tr[data-profile=night-limits] td[data-col=version]")
    ).to_have_text("1")
    await _mark(page)

    await profile.get_by_role("button", name="下发到设备").click()
    apply = page.locator("#pa-form")
    await apply.locator("textarea").fill(f"{PHY}, 04009999")
    await apply.get_by_role("button", name="开始下发").click()
    dialog = page.locator("dialog#confirm")
    await expect(dialog.locator("#confirm-message")).to_contain_text(f"下发到 设备 {PHY}, 04009999")
    await dialog.locator("#confirm-ok").click()
    await expect(apply.locator("p.field-error")).to_contain_text("unknown devices: 04009999")
    await apply.locator("textarea").fill(f"{PHY} {OTHER}")
    await apply.get_by_role("button", name="开始下发").click()
    await dialog.locator("#confirm-ok").click()

    job = page.locator("#pp-job")
    await expect(job.locator("h2")).to_have_text(re.compile(r"下发任务 #\d+"))
    await expect(job.locator("tbody tr[data-device]")).to_have_count(2)
    for device in (PHY, OTHER):
        # limits are read back (verified), the mute group only acknowledged: no read-back
        row = job.locator(f"tr[data-device='{device}']")
        status = row.locator("td[data-col=status] .badge")
        await expect(status).to_have_attribute("data-status", "acknowledged", timeout=VERIFIED_MS)
        await expect(row.locator("td[data-col=groups] li")).to_have_text(
            [re.compile(r"0x85\W+已校验$"), re.compile(r"0x97\W+设备已确认$")]
        )
    await expect(job.locator("[data-fact=state] .badge")).to_have_attribute("data-state", "done")
    await expect(
        page.locator("#pp-jobs tbody tr[data-job] td[data-col=state] .badge")
    ).to_have_attribute("data-state", "done")
    await _not_reloaded(page)
    await screenshot(page, "params")
    await assert_accessible(page)

    # a new version; the first stays readable
    await profile.get_by_role("button", name="修改模板").click()
    await page.locator("#pe-limits-overload_power_w").fill("1300")
    await page.locator("#pe-form").get_by_role("button", name="保存为新版本").click()
    await expect(profile.locator("#pp-version")).to_have_value("2")
    await profile.locator("#pp-version").select_option("1")
    await expect(profile.locator("section[data-group=limits]")).to_contain_text("1,200.0 瓦")
    assert not errors, errors


async def test_a_bkv_profile_with_voice_periods(console: Console) -> None:
    page = await console.page(lang="en")
    errors = _page_errors(page)
    await page.goto(f"{console.base}/console/params")
    await page.click("#pp-new")
    editor = page.locator("#pe-form")
    await editor.locator("#pe-name").fill("quiet-nights")
    await editor.locator("#pe-protocol").select_option("bkv")
    await expect(editor.locator("fieldset.pp-group")).to_have_count(3)
    await editor.locator("#pe-include-voice_window_a").check()
    group = editor.locator(".param-fields[data-group=voice_window_a]")
    await group.locator("[data-field=buzzer]").select_option("0")
    await group.locator("[data-field=voice]").select_option("1")
    await group.locator("[data-period='0.start']").fill("22:00")
    await group.locator("[data-period='0.end']").fill("06:30")
    await editor.locator("#pe-include-socket_params").check()
    await editor.locator("#pe-socket_params-overcurrent_limit_a").fill("5.5")
    await editor.get_by_role("button", name="Create").click()
    profile = page.locator("#pp-profile")
    await expect(profile.locator("h2")).to_have_text("Profile quiet-nights")
    voice = profile.locator("section[data-group=voice_window_a]")
    await expect(voice).to_contain_text(re.compile(r"22:00\W06:30"))
    await expect(voice).to_contain_text("On (1)")
    await expect(profile.locator("section[data-group=socket_params]")).to_contain_text("5.500 A")
    await expect(page.locator("tr[data-profile=quiet-nights] td[data-col=protocol]")).to_have_text(
        "BKV"
    )
    await assert_accessible(page)
    assert not errors, errors


async def test_a_read_only_key_sees_no_forms(console: Console) -> None:
    await console.piles(SimulatedAp3000Pile(PHY, ports=2, heartbeat_s=180), accel=120.0)
    page = await console.page(await console.key("read"), lang="en")
    errors = _page_errors(page)
    await page.goto(f"{console.base}/console/devices/{PHY}")
    panel = page.locator("#device-params-body")
    await expect(panel.locator("section[data-group=running1]")).to_be_visible()
    await expect(panel).to_contain_text("Your API key lacks the config scope")
    await expect(panel.locator("form")).to_have_count(0)
    await expect(page.locator("#device-firmware-body")).to_contain_text("no upgrade history")
    await page.goto(f"{console.base}/console/params")
    await expect(page.locator("#pp-profiles td.empty")).to_be_visible()
    await expect(page.locator("#pp-new")).to_have_count(0)

    # a key limited to one device reads its parameters; upgrade jobs name no device, so
    # the API refuses them and the panel says so
    response = await console.api(
        "POST",
        "/api/v1/api-keys",
        json={"name": "one pile", "scopes": ["read"], "allowed_device_ids": [PHY]},
    )
    assert response.status_code == 201, response.text
    limited = await console.page(response.json()["key"], lang="en")
    errors += _page_errors(limited)
    await limited.goto(f"{console.base}/console/devices/{PHY}")
    await expect(limited.locator("#device-params-body section[data-group=limits]")).to_be_visible()
    firmware = limited.locator("#device-firmware-body")
    await expect(firmware.locator("[data-fact=firmware]")).to_have_text("312 (V3.12)")
    await expect(firmware).to_contain_text("The upgrade history cannot be shown")
    assert not errors, errors


def test_every_group_field_status_and_value_has_its_texts() -> None:
    """The keys the modules build (`param_field.<name>` ...) are in the catalogue."""
    texts = i18n.catalogue("zh")
    keys = {"param_protocol.ap3000", "param_protocol.bkv"}
    keys |= {"param_job_state.running", "param_job_state.done"}
    keys |= {f"param_status.{s.value}" for s in ParamStatus}
    keys |= {f"param_job_status.{s}" for s in JOB_STATUSES}
    keys |= {f"param_job_status.{s.value}" for s in MemberStatus}
    for name, group in GROUPS.items():
        keys.add(f"param_group.{name}")
        for field in group.fields:
            keys.add(f"param_field.{field}")
            rule = group.rules.get(field)
            if rule is not None and rule.values is not None:
                keys |= {f"param_value.{field}.{v}" for v in rule.values}
    missing = sorted(k for k in keys if k not in texts)
    assert not missing, missing
