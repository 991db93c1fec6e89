// Firmware: how upgrade targets and jobs are shown (shared with the firmware page) and
// the device page's firmware panel: the device's version and its upgrade history.
//
// Live updates: `upgrade.started/verified/failed` events, and the end of each firmware
// packet command (`command.acked/failed/dead` named `firmware_*`), which is when the
// engine counts a packet: the event model has no event of its own for transfer progress.

import {
  api, apiAll, h, fill, t, tv, fmtTime, hasScope, onEvent, onReconnect, ApiError, link, table,
} from "./core.js";
import { throttle, useStyles } from "./params_panel.js";

/** Whether an event is the end of a firmware packet command (transfer progress). */
export function isPacketEvent(event) {
  return event.type.startsWith("command.") && typeof event.name === "string" && event.name.startsWith("firmware_");
}

/** An AP3000 version number as the device shows it too: "313 (V3.13)". */
export function fmtVersion(version, protocol = "ap3000") {
  if (version === null || version === undefined || version === "") return "–";
  const text = String(version);
  if (protocol !== "ap3000" || !/^\d{1,5}$/.test(text)) return text;
  const n = Number(text);
  return `${text} (V${Math.floor(n / 100)}.${String(n % 100).padStart(2, "0")})`;
}

/** A type code as hex: 39 -> "0x27". */
export function fmtType(code) {
  if (code === null || code === undefined) return "–";
  return `0x${Number(code).toString(16).toUpperCase().padStart(2, "0")}`;
}

/** An image in one line: "0xE0 · 313 (V3.13) · 0x27". */
export function fmtImage(image) {
  return `${image.family} · ${fmtVersion(image.version, image.protocol)} · ${t("firmware.type_short")} ${fmtType(image.device_type)}`;
}

/** A job's selector in words. */
export function fmtSelector(selector) {
  if (!selector) return "–";
  if (Array.isArray(selector.device_ids)) return t("job_selector.ids_text", { ids: selector.device_ids.join(", ") });
  if (selector.device_type !== undefined) {
    return selector.firmware
      ? t("job_selector.type_firmware_text", { type: fmtType(selector.device_type), firmware: selector.firmware })
      : t("job_selector.type_text", { type: fmtType(selector.device_type) });
  }
  if (selector.all) return t("job_selector.all_text");
  return JSON.stringify(selector);
}

/**
 * The inputs of a job's device selector, as the API takes it: a list of device ids,
 * the devices of a type code (optionally only those reporting a firmware version), or
 * every device of the protocol. `readSelector` reads it, `selectorInput` is the input
 * an error about `selector` belongs to.
 */
export function selectorFields(idPrefix, { ids = "" } = {}) {
  const modes = ["ids", "type", "all"];
  const radios = modes.map((mode) => {
    const id = `${idPrefix}-mode-${mode}`;
    return h("span", { class: "selector-mode" },
      h("input", { type: "radio", id, name: `${idPrefix}-mode`, value: mode, checked: mode === "ids", "data-mode": mode }),
      h("label", { for: id }, t(`job_selector.${mode}`)));
  });
  const idsId = `${idPrefix}-ids`;
  const typeId = `${idPrefix}-type`;
  const fwId = `${idPrefix}-firmware`;
  const blocks = [
    h("div", { class: "selector-block", "data-block": "ids" },
      h("label", { for: idsId }, t("job_selector.device_ids")),
      h("textarea", { id: idsId, name: "device_ids", rows: 2, cols: 40, "data-field": "device_ids", spellcheck: "false" }, ids),
      h("p", { class: "muted" }, t("job_selector.ids_help"))),
    h("div", { class: "selector-block", "data-block": "type", hidden: true },
      h("label", { for: typeId }, t("job_selector.device_type")),
      h("input", { id: typeId, name: "device_type", type: "text", size: 6, "data-field": "device_type", placeholder: "0x27" }),
      h("label", { for: fwId }, t("job_selector.firmware")),
      h("input", { id: fwId, name: "firmware", type: "text", size: 8, "data-field": "firmware" })),
    h("div", { class: "selector-block", "data-block": "all", hidden: true },
      h("p", { class: "muted", "data-field": "all" }, t("job_selector.all_help"))),
  ];
  const fieldset = h("fieldset", { class: "selector" },
    h("legend", {}, t("job_selector.legend")), h("div", { class: "selector-modes" }, radios), blocks);
  fieldset.addEventListener("change", (event) => {
    if (!event.target.dataset.mode) return;
    for (const block of blocks) block.hidden = block.dataset.block !== event.target.dataset.mode;
  });
  return fieldset;
}

function selectorMode(root) {
  const checked = root.querySelector(".selector input[data-mode]:checked");
  return checked ? checked.value : "ids";
}

/** The selector of a `selectorFields` fieldset in `root`, as the API takes it. */
export function readSelector(root) {
  const mode = selectorMode(root);
  if (mode === "all") return { all: true };
  if (mode === "type") {
    const raw = root.querySelector(".selector [data-field=device_type]").value.trim();
    const code = /^0x[0-9a-f]+$/i.test(raw) ? parseInt(raw, 16) : /^\d+$/.test(raw) ? Number(raw) : raw;
    const firmware = root.querySelector(".selector [data-field=firmware]").value.trim();
    return firmware ? { device_type: code, firmware } : { device_type: code };
  }
  const ids = root.querySelector(".selector [data-field=device_ids]").value
    .split(/[\s,;，；]+/).map((s) => s.trim()).filter(Boolean);
  return { device_ids: ids };
}

/** The input of the active selector form (where an error about `selector` goes). */
export function selectorInput(root) {
  const field = { ids: "device_ids", type: "device_type", all: "all" }[selectorMode(root)];
  return root.querySelector(`.selector [data-field=${field}]`);
}

const TARGET_KINDS = { verified: "ok", failed: "bad", cancelled: "off", queued: "off", transferring: "warn", rebooting: "warn" };
const JOB_KINDS = { running: "warn", done: "ok", cancelled: "off" };

/** A target's state badge (`upgrade_state`). */
export function targetBadge(state) {
  return h("span", { class: `badge ${TARGET_KINDS[state] || "off"}`, "data-state": state }, tv("upgrade_state", state));
}

/** A job's state badge (`upgrade_job_state`). */
export function jobBadge(state) {
  return h("span", { class: `badge ${JOB_KINDS[state] || "off"}`, "data-state": state }, tv("upgrade_job_state", state));
}

/**
 * What a target is doing: a progress bar while packets go out (n/m), what it waits
 * for, the reboot, the reported version or why it failed.
 */
export function targetProgress(target, protocol = "ap3000") {
  const parts = [];
  const total = target.total_packets || 0;
  if ((target.state === "transferring" || target.state === "rebooting") && total > 0) {
    parts.push(h("progress", {
      max: total, value: target.acked_packets,
      "aria-label": t("firmware.packets_of", { device: target.device_id }),
    }, target.progress));
    parts.push(h("span", { class: "num packets" }, t("firmware.packets", { n: target.acked_packets, m: total })));
  }
  if (target.state === "rebooting") parts.push(h("span", { class: "muted" }, t("firmware.awaiting_report")));
  if (target.waiting) parts.push(h("span", { class: "badge warn" }, tv("upgrade_waiting", target.waiting)));
  if (target.state === "verified") {
    parts.push(h("span", {}, t("firmware.version_change", {
      from: fmtVersion(target.previous_version, protocol), to: fmtVersion(target.reported_version, protocol),
    })));
  }
  if (target.failure_reason) parts.push(h("span", { class: "error" }, target.failure_reason));
  if (target.restarts) parts.push(h("span", { class: "muted" }, t("firmware.restarts", { n: target.restarts })));
  return h("div", { class: "fw-progress" }, parts.length ? parts : "–");
}

// ------------------------------------------------------------------ the device panel

/**
 * Fill `container` with the firmware of `deviceId` and its upgrade history: every
 * upgrade job that included it (from its upgrade events, and running jobs), with its
 * state there. Live on the device's `upgrade.*` events and firmware packets.
 */
export async function renderFirmwareHistory(container, deviceId) {
  useStyles("firmware.css");
  const panel = new FirmwarePanel(container, deviceId);
  const reload = throttle(() => panel.load());
  const progress = throttle(() => panel.refresh());
  onEvent(["upgrade.", "command."], (event) => {
    if (event.device_id !== deviceId) return;
    if (event.type.startsWith("upgrade.")) reload();
    else if (isPacketEvent(event)) progress();
  });
  onReconnect(reload);
  await panel.load();
  return panel;
}

/** Most jobs the panel reads. */
const HISTORY_JOBS = 20;

class FirmwarePanel {
  constructor(container, deviceId) {
    this.container = container;
    this.deviceId = deviceId;
    this.device = null;
    this.jobs = [];
    this.refused = null;
  }

  /** Re-read only the jobs still running (a packet moved one on). */
  async refresh() {
    if (this.device === null) {
      await this.load();
      return;
    }
    try {
      const jobs = await Promise.all(this.jobs.map((job) => (job.state === "running"
        ? api("GET", `/upgrade-jobs/${job.job_id}`) : job)));
      this.render(this.device, jobs);
    } catch (err) {
      if (!(err instanceof ApiError)) throw err;
      fill(this.container, h("p", { class: "error", role: "alert" }, t("error.failed", { message: err.message })));
    }
  }

  async load() {
    const path = `/devices/${encodeURIComponent(this.deviceId)}`;
    let device = null;
    try {
      device = await api("GET", path);
      const [started, failed, recent] = await Promise.all([
        apiAll(`${path}/events`, { kind: "upgrade_started" }),
        apiAll(`${path}/events`, { kind: "upgrade_failed" }),
        api("GET", "/upgrade-jobs", { query: { limit: 50 } }),
      ]);
      const ids = new Set();
      for (const e of [...started, ...failed]) {
        const id = e.detail && e.detail.job_id;
        if (Number.isInteger(id)) ids.add(id);
      }
      // a queued device has no event yet: running jobs that may include it
      for (const job of recent.items) {
        if (job.state === "running" && mayInclude(job.selector, device)) ids.add(job.job_id);
      }
      const newest = [...ids].sort((a, b) => b - a).slice(0, HISTORY_JOBS);
      const jobs = await Promise.all(newest.map((id) => api("GET", `/upgrade-jobs/${id}`)));
      this.render(device, jobs, null);
    } catch (err) {
      if (!(err instanceof ApiError)) throw err;
      if (device !== null && err.status === 403) {
        // a key limited to some devices may not read upgrade jobs (they name no device)
        this.render(device, [], t("firmware.jobs_refused", { message: err.message }));
        return;
      }
      fill(this.container, h("p", { class: "error", role: "alert" }, t("error.failed", { message: err.message })));
    }
  }

  render(device, jobs, refused = this.refused) {
    this.device = device;
    this.jobs = jobs;
    this.refused = refused;
    const rows = [];
    for (const job of jobs) {
      const target = job.devices.find((d) => d.device_id === this.deviceId);
      if (target) rows.push({ job, target });
    }
    const facts = h("dl", { class: "facts" },
      h("dt", {}, t("firmware.current_version")), h("dd", { "data-fact": "firmware" }, fmtVersion(device.firmware, device.protocol)),
      h("dt", {}, t("firmware.device_type")), h("dd", {}, fmtType(device.device_type)));
    const columns = [
      { key: "job", label: t("firmware.job"), render: (r) => link(`/firmware?job=${r.job.job_id}`, `#${r.job.job_id}`) },
      { key: "image", label: t("firmware.image"), render: (r) => fmtImage(r.job.firmware) },
      { key: "state", label: t("firmware.state"), render: (r) => targetBadge(r.target.state) },
      { key: "progress", label: t("firmware.progress"), render: (r) => targetProgress(r.target, r.job.firmware.protocol) },
      { key: "started", label: t("firmware.started_at"), render: (r) => fmtTime(r.target.started_at) },
      { key: "finished", label: t("firmware.finished_at"), render: (r) => fmtTime(r.target.finished_at) },
    ];
    fill(this.container, facts,
      refused ? h("p", { class: "muted" }, refused)
        : table(columns, rows, { empty: t("firmware.no_history"), rowAttrs: (r) => ({ "data-job": r.job.job_id }) }),
      hasScope("config") ? h("p", {}, link("/firmware", t("firmware.go_upgrade"))) : null);
  }
}

/** Whether a job's selector can name `device` (ids, its type code, or all). */
function mayInclude(selector, device) {
  if (!selector) return false;
  if (Array.isArray(selector.device_ids)) return selector.device_ids.includes(device.device_id);
  if (selector.device_type !== undefined) return selector.device_type === device.device_type;
  return Boolean(selector.all);
}
