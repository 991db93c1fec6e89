// The firmware page: the image store (list, upload, delete) and upgrade jobs (create,
// list, each device's progress, cancel). The job shown is re-read (at most every 0.4 s)
// on its `upgrade.*` events and when a firmware packet of one of its devices ends (the
// engine counts packets then; there is no progress event of its own), and after a
// reconnect.

import {
  api, h, fill, t, tv, fmtTime, hasScope, onEvent, onReconnect, ApiError, link,
  table, notify, confirmAction,
} from "../core.js";
import { onApiSubmit, throttle } from "../params_panel.js";
import {
  fmtImage, fmtSelector, fmtType, fmtVersion, isPacketEvent, jobBadge, readSelector,
  selectorFields, selectorInput, targetBadge, targetProgress,
} from "../firmware_panel.js";

const canChange = hasScope("config");
const FAMILIES = {
  ap3000: ["0xE0", "0xE1", "0xE2", "0xF8", "0xF9", "0xFA"],
  bkv: ["ota"],
};

const view = {
  images: [],
  jobId: null,
  job: null,
  jobDevices: new Set(),
};

function failed(target, err) {
  if (!(err instanceof ApiError)) throw err;
  fill(target, h("p", { class: "error", role: "alert" }, t("error.failed", { message: err.message })));
}

function remember() {
  history.replaceState(null, "", view.jobId !== null ? `?job=${view.jobId}` : location.pathname);
}

function field(id, label, control, help = null) {
  const helpId = help ? `${id}-help` : null;
  if (helpId) control.setAttribute("aria-describedby", helpId);
  return [
    h("label", { for: id }, label),
    h("span", { class: "param-input" }, control, help ? h("span", { class: "muted help", id: helpId }, help) : null),
  ];
}

// ------------------------------------------------------------------ images

async function loadImages() {
  const target = document.getElementById("fw-images");
  try {
    view.images = (await api("GET", "/firmware")).items;
  } catch (err) {
    failed(target, err);
    return;
  }
  const columns = [
    { key: "firmware_id", label: t("firmware.id"), render: (i) => `#${i.firmware_id}`, num: true },
    { key: "protocol", label: t("firmware.protocol"), render: (i) => tv("param_protocol", i.protocol) },
    { key: "family", label: t("firmware.family"), render: (i) => tv("firmware_family", i.family) },
    { key: "target", label: t("firmware.target"), render: (i) => tv("firmware_target", i.target) },
    { key: "device_type", label: t("firmware.device_type"), render: (i) => fmtType(i.device_type) },
    { key: "version", label: t("firmware.version"), render: (i) => fmtVersion(i.version, i.protocol) },
    { key: "size", label: t("firmware.size"), num: true, render: (i) => t("firmware.bytes", { n: i.size_bytes.toLocaleString() }) },
    { key: "packets", label: t("firmware.packets_col"), num: true, render: (i) => (i.protocol === "ap3000" ? String(i.total_packets) : "–") },
    { key: "sha256", label: t("firmware.sha256"), render: (i) => (i.sha256 ? h("span", { class: "hex", title: i.sha256 }, `${i.sha256.slice(0, 16)}…`) : "–") },
    { key: "note", label: t("firmware.note"), render: (i) => i.note || "" },
    { key: "created_at", label: t("firmware.uploaded_at"), render: (i) => fmtTime(i.created_at) },
  ];
  if (canChange) {
    columns.push({ key: "actions", label: t("firmware.actions"), render: (i) => h("button", {
      type: "button", class: "danger", onclick: () => deleteImage(i),
      "aria-label": t("firmware.delete_image", { id: i.firmware_id }),
    }, t("action.delete")) });
  }
  fill(target, table(columns, view.images, {
    empty: t("firmware.no_images"), rowAttrs: (i) => ({ "data-image": i.firmware_id }),
  }));
  fillImageChoice();
}

async function deleteImage(image) {
  const errors = document.getElementById("fw-images-error");
  fill(errors);
  const ok = await confirmAction(t("firmware.confirm_delete", { id: image.firmware_id, image: fmtImage(image) }), t("action.delete"));
  if (!ok) return;
  try {
    await api("DELETE", `/firmware/${image.firmware_id}`);
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    fill(errors, h("p", { class: "error" }, t("firmware.delete_refused", { id: image.firmware_id, message: err.message })));
    return;
  }
  notify(t("firmware.deleted", { id: image.firmware_id }));
  await loadImages();
}

function uploadForm() {
  const protocol = h("select", { id: "fu-protocol", name: "protocol", "data-field": "protocol" },
    Object.keys(FAMILIES).map((p) => h("option", { value: p }, tv("param_protocol", p))));
  const family = h("select", { id: "fu-family", name: "family", "data-field": "family" });
  const bkvOnly = [];
  const bkvField = (id, name, label, attrs, help = null) => {
    const parts = field(id, label, h("input", { id, name, "data-field": name, ...attrs }), help);
    bkvOnly.push(...parts);
    return parts;
  };
  const form = h("form", { id: "fu-form", novalidate: true },
    h("div", { class: "param-fields" },
      field("fu-protocol", t("firmware.protocol"), protocol),
      field("fu-family", t("firmware.family"), family),
      field("fu-device-type", t("firmware.device_type"),
        h("input", { id: "fu-device-type", name: "device_type", "data-field": "device_type", type: "text", size: 6, placeholder: "0x27" }),
        t("firmware.device_type_help")),
      field("fu-version", t("firmware.version"),
        h("input", { id: "fu-version", name: "version", "data-field": "version", type: "text", size: 10, maxlength: 16 }),
        t("firmware.version_help")),
      bkvField("fu-ftp-host", "ftp_host", t("firmware.ftp_host"), { type: "text", size: 16, maxlength: 64 }),
      bkvField("fu-ftp-port", "ftp_port", t("firmware.ftp_port"), { type: "number", min: 1, max: 65535, step: 1, placeholder: "21" }),
      bkvField("fu-file-name", "file_name", t("firmware.file_name"), { type: "text", size: 16, maxlength: 64 }),
      field("fu-note", t("firmware.note"), h("input", { id: "fu-note", name: "note", "data-field": "note", type: "text", maxlength: 200 })),
      field("fu-file", t("firmware.file"), h("input", { id: "fu-file", name: "body", "data-field": "body", type: "file" }))),
    h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, t("firmware.upload_submit"))));
  const choose = () => {
    fill(family, FAMILIES[protocol.value].map((f) => h("option", { value: f }, `${tv("firmware_family", f)}`)));
    for (const el of bkvOnly) el.hidden = protocol.value !== "bkv";
  };
  protocol.addEventListener("change", choose);
  choose();
  onApiSubmit(form, async () => {
    const value = (name) => form.querySelector(`[name="${name}"]`).value.trim();
    const query = { protocol: protocol.value, family: family.value, device_type: value("device_type"), version: value("version"), note: value("note") };
    if (protocol.value === "bkv") {
      Object.assign(query, { ftp_host: value("ftp_host"), ftp_port: value("ftp_port"), file_name: value("file_name") });
    }
    const file = form.querySelector("#fu-file").files[0];
    const raw = file ? await file.arrayBuffer() : new ArrayBuffer(0);
    const image = await api("POST", "/firmware", { query, raw, contentType: "application/octet-stream" });
    notify(t("firmware.uploaded", { id: image.firmware_id, image: fmtImage(image) }));
    form.reset();
    choose();
    await loadImages();
  });
  return form;
}

// ------------------------------------------------------------------ jobs

let imageChoice = null;

function fillImageChoice() {
  if (!imageChoice) return;
  const chosen = imageChoice.value;
  fill(imageChoice, h("option", { value: "" }, t("firmware.choose_image")),
    view.images.map((i) => h("option", { value: String(i.firmware_id), selected: String(i.firmware_id) === chosen },
      `#${i.firmware_id} ${fmtImage(i)}`)));
}

function jobForm() {
  imageChoice = h("select", { id: "fj-image", name: "firmware_id", "data-field": "firmware_id" });
  fillImageChoice();
  const form = h("form", { id: "fj-form", novalidate: true },
    h("div", { class: "param-fields" }, field("fj-image", t("firmware.image"), imageChoice)),
    selectorFields("fj"),
    h("div", { class: "param-fields" },
      field("fj-concurrency", t("firmware.concurrency"),
        h("input", { id: "fj-concurrency", name: "concurrency", "data-field": "concurrency", type: "number", min: 1, step: 1, value: "10" })),
      field("fj-rate", t("firmware.rate_per_min"),
        h("input", { id: "fj-rate", name: "rate_per_min", "data-field": "rate_per_min", type: "number", min: 1, step: 1, value: "60" })),
      field("fj-force", t("firmware.force"),
        h("input", { id: "fj-force", name: "force", "data-field": "force", type: "checkbox" }), t("firmware.force_help"))),
    h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, t("firmware.start_job"))));
  const number = (id) => {
    const raw = form.querySelector(id).value.trim();
    if (raw === "") return undefined;
    return Number.isFinite(Number(raw)) ? Number(raw) : raw;
  };
  onApiSubmit(form, async () => {
    const body = {
      firmware_id: imageChoice.value === "" ? null : Number(imageChoice.value),
      selector: readSelector(form),
      concurrency: number("#fj-concurrency"),
      rate_per_min: number("#fj-rate"),
      force: form.querySelector("#fj-force").checked,
    };
    const image = view.images.find((i) => i.firmware_id === body.firmware_id);
    if (image) {
      const ask = t(body.force ? "firmware.confirm_job_force" : "firmware.confirm_job", {
        devices: fmtSelector(body.selector), id: image.firmware_id, image: fmtImage(image),
      });
      if (!(await confirmAction(ask, t("firmware.start_job")))) return;
    }
    const job = await api("POST", "/upgrade-jobs", { body });
    notify(t("firmware.job_created", { id: job.job_id, n: job.total }));
    document.getElementById("fw-create-box").open = false;
    await loadJobs();
    await showJob(job.job_id);
  }, { resolve: (name) => (name === "selector" ? selectorInput(form) : null) });
  return form;
}

function countsText(counts) {
  return Object.entries(counts).filter(([, n]) => n > 0)
    .map(([state, n]) => `${tv("upgrade_state", state)} ${n}`).join(" · ") || "–";
}

async function loadJobs() {
  const target = document.getElementById("fw-jobs");
  let jobs;
  try {
    jobs = (await api("GET", "/upgrade-jobs", { query: { limit: 50 } })).items;
  } catch (err) {
    failed(target, err);
    return;
  }
  const columns = [
    { key: "job_id", label: t("firmware.job_id"), render: (j) => h("button", {
      type: "button", class: "link", onclick: () => showJob(j.job_id),
    }, `#${j.job_id}`) },
    { key: "image", label: t("firmware.image"), render: (j) => fmtImage(j.firmware) },
    { key: "selector", label: t("firmware.selector"), render: (j) => fmtSelector(j.selector) },
    { key: "state", label: t("firmware.state"), render: (j) => jobBadge(j.state) },
    { key: "counts", label: t("firmware.devices"), render: (j) => `${j.total}: ${countsText(j.counts)}` },
    { key: "created_at", label: t("firmware.created_at"), render: (j) => fmtTime(j.created_at) },
    { key: "finished_at", label: t("firmware.finished_at"), render: (j) => fmtTime(j.finished_at || j.cancelled_at) },
  ];
  fill(target, table(columns, jobs, { empty: t("firmware.no_jobs"), rowAttrs: (j) => ({ "data-job": j.job_id }) }));
}

async function showJob(jobId) {
  const body = document.getElementById("fw-job-body");
  document.getElementById("fw-job").hidden = false;
  view.jobId = jobId;
  remember();
  let job;
  try {
    job = await api("GET", `/upgrade-jobs/${jobId}`);
  } catch (err) {
    failed(body, err);
    return;
  }
  if (view.jobId !== jobId) return; // another job was chosen meanwhile
  view.job = job;
  view.jobDevices = new Set(job.devices.map((d) => d.device_id));
  fill("fw-job-h", t("firmware.job_title", { id: job.job_id }));
  const protocol = job.firmware.protocol;
  const tiles = Object.entries(job.counts).filter(([, n]) => n > 0).map(([state, n]) => h("div", { class: "tile", "data-count": state },
    h("div", { class: "label" }, tv("upgrade_state", state)), h("div", { class: "value" }, String(n))));
  const columns = [
    { key: "device_id", label: t("firmware.device"), render: (d) => link(`/devices/${encodeURIComponent(d.device_id)}`, d.device_id) },
    { key: "state", label: t("firmware.state"), render: (d) => targetBadge(d.state) },
    { key: "progress", label: t("firmware.progress"), render: (d) => targetProgress(d, protocol) },
    { key: "started_at", label: t("firmware.started_at"), render: (d) => fmtTime(d.started_at) },
    { key: "finished_at", label: t("firmware.finished_at"), render: (d) => fmtTime(d.finished_at) },
  ];
  const cancel = canChange && job.state === "running"
    ? h("button", { type: "button", class: "danger", id: "fw-cancel", onclick: () => cancelJob(job) }, t("firmware.cancel_job"))
    : null;
  fill(body,
    h("dl", { class: "facts" },
      h("dt", {}, t("firmware.state")), h("dd", { "data-fact": "state" }, jobBadge(job.state)),
      h("dt", {}, t("firmware.image")), h("dd", {}, `#${job.firmware.firmware_id} ${fmtImage(job.firmware)}`),
      h("dt", {}, t("firmware.selector")), h("dd", {}, fmtSelector(job.selector)),
      h("dt", {}, t("firmware.pace")), h("dd", {}, t("firmware.pace_text", { rate: job.rate_per_min, n: job.concurrency })),
      h("dt", {}, t("firmware.force")), h("dd", {}, t(job.force ? "common.yes" : "common.no")),
      h("dt", {}, t("firmware.created_at")), h("dd", {}, fmtTime(job.created_at)),
      job.cancelled_at ? [h("dt", {}, t("firmware.cancelled_at")), h("dd", {}, fmtTime(job.cancelled_at))] : null,
      h("dt", {}, t("firmware.finished_at")), h("dd", {}, fmtTime(job.finished_at))),
    h("div", { class: "tiles" },
      h("div", { class: "tile" }, h("div", { class: "label" }, t("firmware.total")), h("div", { class: "value" }, String(job.total))),
      tiles),
    cancel ? h("div", { class: "toolbar" }, cancel) : null,
    h("div", { id: "fw-job-error", role: "alert" }),
    table(columns, job.devices, { rowAttrs: (d) => ({ "data-device": d.device_id, "data-state": d.state }) }));
}

async function cancelJob(job) {
  const ok = await confirmAction(
    t("firmware.confirm_cancel", { id: job.job_id, image: fmtImage(job.firmware), n: job.total }),
    t("firmware.cancel_job"));
  if (!ok) return;
  try {
    await api("POST", `/upgrade-jobs/${job.job_id}/cancel`);
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    fill("fw-job-error", h("p", { class: "error" }, t("error.failed", { message: err.message })));
    return;
  }
  notify(t("firmware.job_cancelled", { id: job.job_id }));
  await Promise.all([showJob(job.job_id), loadJobs()]);
}

// ------------------------------------------------------------------ live, start

const reloadJob = throttle(() => (view.jobId !== null ? showJob(view.jobId) : null));
const reloadJobs = throttle(() => loadJobs(), 1000);

onEvent(["upgrade.", "command."], (event) => {
  if (event.type.startsWith("upgrade.")) {
    reloadJobs();
    if (view.jobId !== null && (event.job_id === view.jobId || view.jobDevices.has(event.device_id))) reloadJob();
    return;
  }
  if (isPacketEvent(event) && view.job && view.job.state === "running" && view.jobDevices.has(event.device_id)) reloadJob();
});

onReconnect(() => {
  loadImages();
  loadJobs();
  if (view.jobId !== null) showJob(view.jobId);
});

if (canChange) {
  const upload = document.getElementById("fw-upload");
  if (upload) fill(upload, uploadForm());
  const create = document.getElementById("fw-create");
  if (create) fill(create, jobForm());
}
const start = new URLSearchParams(location.search);
await Promise.all([loadImages(), loadJobs()]);
if (/^\d+$/.test(start.get("job") || "")) await showJob(Number(start.get("job")));
