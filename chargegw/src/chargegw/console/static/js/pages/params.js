// The parameters page: profiles (list, versions, create, edit), applying a profile to
// devices with a pace, and the apply jobs with each device's progress, live on the
// `param.*` events of the job shown (and its devices' parameter commands).

import {
  api, h, fill, t, tv, fmtTime, hasScope, onEvent, onReconnect, ApiError, link,
  table, notify, confirmAction,
} from "../core.js";
import {
  GROUPS, protocolGroups, groupFields, readGroup, fmtGroupValues, fmtValue, statusBadge,
  onApiSubmit, throttle,
} from "../params_panel.js";
import { fmtSelector, selectorFields, readSelector, selectorInput } from "../firmware_panel.js";

const canChange = hasScope("config");
const PROTOCOLS = ["ap3000", "bkv"];
const PARAM_COMMANDS = new Set(Object.values(GROUPS).flatMap((g) => [g.set, g.read]).filter(Boolean));

const view = {
  profiles: [],
  profile: null, // the profile shown
  jobId: null, // the job shown
  jobDevices: new Set(),
};

function section(id, show) {
  document.getElementById(id).hidden = !show;
}

function remember() {
  const query = new URLSearchParams();
  if (view.profile) query.set("profile", view.profile.name);
  if (view.jobId !== null) query.set("job", String(view.jobId));
  const qs = query.toString();
  history.replaceState(null, "", qs ? `?${qs}` : location.pathname);
}

function failed(target, err) {
  if (!(err instanceof ApiError)) throw err;
  fill(target, h("p", { class: "error", role: "alert" }, t("error.failed", { message: err.message })));
}

/** The entries of `groups` (group -> anything) in the groups' table order. */
function ordered(groups) {
  const names = Object.keys(groups || {});
  const known = Object.keys(GROUPS).filter((g) => names.includes(g));
  return [...known, ...names.filter((g) => !(g in GROUPS))].map((g) => [g, groups[g]]);
}

function groupNames(groups) {
  return ordered(groups).map(([g]) => g).map((g) => tv("param_group", g)).join(t("params.list_sep"));
}

// ------------------------------------------------------------------ profiles

async function loadProfiles() {
  const target = document.getElementById("pp-profiles");
  try {
    view.profiles = (await api("GET", "/param-profiles")).items;
  } catch (err) {
    failed(target, err);
    return;
  }
  const columns = [
    { key: "name", label: t("params.profile_name"), render: (p) => h("button", {
      type: "button", class: "link", onclick: () => showProfile(p.name),
    }, p.name) },
    { key: "protocol", label: t("params.protocol"), render: (p) => tv("param_protocol", p.protocol) },
    { key: "version", label: t("params.version"), num: true },
    { key: "groups", label: t("params.groups"), render: (p) => groupNames(p.groups) },
    { key: "updated_at", label: t("params.updated_at"), render: (p) => fmtTime(p.updated_at) },
  ];
  fill(target, table(columns, view.profiles, {
    empty: t("params.no_profiles"), rowAttrs: (p) => ({ "data-profile": p.name }),
  }));
}

async function showProfile(name, version = null) {
  const body = document.getElementById("pp-profile-body");
  section("pp-profile", true);
  let profile;
  let current;
  try {
    profile = await api("GET", `/param-profiles/${encodeURIComponent(name)}`, { query: { version } });
    current = version === null ? profile.version
      : (await api("GET", `/param-profiles/${encodeURIComponent(name)}`)).version;
  } catch (err) {
    failed(body, err);
    return;
  }
  view.profile = profile;
  remember();
  fill("pp-profile-h", t("params.profile_title", { name: profile.name }));
  const versionId = "pp-version";
  const versions = [];
  for (let v = current; v >= 1; v -= 1) {
    versions.push(h("option", { value: String(v), selected: v === profile.version },
      v === current ? t("params.version_current", { v }) : t("params.version_n", { v })));
  }
  const select = h("select", { id: versionId, onchange: (e) => showProfile(name, Number(e.target.value)) }, versions);
  const actions = canChange ? [
    h("button", { type: "button", onclick: () => openEditor(profile), disabled: profile.version !== current }, t("params.edit_profile")),
    h("button", { type: "button", class: "primary", onclick: () => openApply(profile), disabled: profile.version !== current }, t("params.apply_profile")),
  ] : [];
  const groups = ordered(profile.groups).map(([group, values]) => {
    const spec = GROUPS[group];
    const rows = spec ? spec.fields.filter((f) => f.name in values).map((f) => ({ f, value: values[f.name] })) : [];
    return h("section", { class: "card", "data-group": group },
      h("h3", {}, tv("param_group", group)),
      table([
        { key: "field", label: t("params.field"), render: (r) => t(`param_field.${r.f.name}`) },
        { key: "value", label: t("params.value"), render: (r) => fmtValue(r.f, r.value) },
      ], rows));
  });
  fill(body,
    h("div", { class: "toolbar" },
      h("label", { for: versionId }, t("params.version"), select), actions),
    h("dl", { class: "facts" },
      h("dt", {}, t("params.protocol")), h("dd", {}, tv("param_protocol", profile.protocol)),
      h("dt", {}, t("params.created_at")), h("dd", {}, fmtTime(profile.created_at)),
      h("dt", {}, t("params.version_made_at")), h("dd", {}, fmtTime(profile.updated_at))),
    h("div", { id: "pp-apply" }),
    groups);
}

// ------------------------------------------------------------------ the editor

function openEditor(profile = null) {
  section("pp-editor", true);
  fill("pp-editor-h", profile ? t("params.edit_title", { name: profile.name }) : t("params.new_profile"));
  const body = document.getElementById("pp-editor-body");
  const groupsHolder = h("div", { class: "pp-groups" });
  const head = [];
  let protocol = profile ? profile.protocol : "ap3000";
  if (!profile) {
    head.push(
      h("label", { for: "pe-name" }, t("params.profile_name")),
      h("span", { class: "param-input" }, h("input", {
        id: "pe-name", name: "name", "data-field": "name", type: "text", maxlength: 64,
        autocomplete: "off", spellcheck: "false", "aria-describedby": "pe-name-help",
      })),
      h("p", { class: "muted span", id: "pe-name-help" }, t("params.name_help")),
      h("label", { for: "pe-protocol" }, t("params.protocol")),
      h("span", { class: "param-input" }, h("select", {
        id: "pe-protocol", name: "protocol", "data-field": "protocol",
        onchange: (e) => { protocol = e.target.value; drawGroups(); },
      }, PROTOCOLS.map((p) => h("option", { value: p }, tv("param_protocol", p))))),
    );
  }
  const drawGroups = () => {
    fill(groupsHolder, protocolGroups(protocol).map((group) => {
      const values = profile ? profile.groups[group] : null;
      const checkId = `pe-include-${group}`;
      const fields = groupFields(group, values, { idPrefix: "pe", secretHint: t("params.secret_reenter") });
      fields.hidden = !values;
      const check = h("input", {
        type: "checkbox", id: checkId, "data-include": group, checked: Boolean(values),
        onchange: (e) => { fields.hidden = !e.target.checked; },
      });
      return h("fieldset", { class: "card pp-group", "data-group": group },
        h("legend", {}, check, h("label", { for: checkId }, tv("param_group", group))),
        fields);
    }));
  };
  drawGroups();
  const form = h("form", { id: "pe-form", novalidate: true },
    h("div", { class: "param-fields" }, head),
    h("p", { class: "muted" }, t("params.profile_help")),
    groupsHolder,
    h("div", { class: "actions" },
      h("button", { type: "submit", class: "primary" }, profile ? t("params.save_version") : t("action.create")),
      h("button", { type: "button", onclick: () => { section("pp-editor", false); fill(body); } }, t("action.cancel"))));
  onApiSubmit(form, async () => {
    const groups = {};
    for (const box of form.querySelectorAll("input[data-include]:checked")) {
      const group = box.dataset.include;
      groups[group] = readGroup(form.querySelector(`.param-fields[data-group="${group}"]`), group);
    }
    let saved;
    if (profile) {
      saved = await api("PUT", `/param-profiles/${encodeURIComponent(profile.name)}`, { body: { groups } });
    } else {
      const name = form.querySelector("#pe-name").value.trim();
      saved = await api("POST", "/param-profiles", { body: { name, protocol, groups } });
    }
    notify(t("params.profile_saved", { name: saved.name, v: saved.version }));
    section("pp-editor", false);
    fill(body);
    await loadProfiles();
    await showProfile(saved.name);
  });
  fill(body, form);
  (form.querySelector("#pe-name") || form.querySelector("input[data-include]")).focus();
}

// ------------------------------------------------------------------ applying

function openApply(profile) {
  const holder = document.getElementById("pp-apply");
  const form = h("form", { class: "card", novalidate: true, id: "pa-form" },
    h("h3", {}, t("params.apply_title", { name: profile.name, v: profile.version })),
    selectorFields("pa"),
    h("div", { class: "param-fields" },
      h("label", { for: "pa-rate" }, t("params.rate_per_min")),
      h("span", { class: "param-input" }, h("input", { id: "pa-rate", name: "rate_per_min", "data-field": "rate_per_min", type: "number", min: 1, step: 1, value: "60" }), h("span", { class: "muted unit" }, t("params.per_min"))),
      h("label", { for: "pa-concurrency" }, t("params.concurrency")),
      h("span", { class: "param-input" }, h("input", { id: "pa-concurrency", name: "concurrency", "data-field": "concurrency", type: "number", min: 1, step: 1, value: "10" }))),
    h("p", { class: "muted" }, t("params.apply_help")),
    h("div", { class: "actions" },
      h("button", { type: "submit", class: "primary" }, t("params.apply_start")),
      h("button", { type: "button", onclick: () => fill(holder) }, t("action.cancel"))));
  onApiSubmit(form, async () => {
    const body = {
      selector: readSelector(form),
      rate_per_min: numberOf(form.querySelector("#pa-rate")),
      concurrency: numberOf(form.querySelector("#pa-concurrency")),
    };
    const ask = t("params.confirm_apply", {
      name: profile.name, v: profile.version, devices: fmtSelector(body.selector), groups: groupNames(profile.groups),
    });
    if (!(await confirmAction(ask, t("params.apply_start")))) return;
    const job = await api("POST", `/param-profiles/${encodeURIComponent(profile.name)}/apply`, { body });
    notify(t("params.job_started", { id: job.job_id, n: job.total }));
    fill(holder);
    await loadJobs();
    await showJob(job.job_id);
  }, { resolve: (name) => (name === "selector" ? selectorInput(form) : null) });
  fill(holder, form);
  form.querySelector("textarea").focus();
}

function numberOf(input) {
  const raw = input.value.trim();
  if (raw === "") return undefined; // the API's default
  const n = Number(raw);
  return Number.isFinite(n) ? n : raw;
}

// ------------------------------------------------------------------ jobs

async function loadJobs() {
  const target = document.getElementById("pp-jobs");
  let jobs;
  try {
    jobs = (await api("GET", "/param-jobs", { query: { limit: 50 } })).items;
  } catch (err) {
    failed(target, err);
    return;
  }
  const columns = [
    { key: "job_id", label: t("params.job_id"), render: (j) => h("button", {
      type: "button", class: "link", onclick: () => showJob(j.job_id),
    }, `#${j.job_id}`) },
    { key: "profile", label: t("params.profile"), render: (j) => `${j.profile} v${j.profile_version}` },
    { key: "selector", label: t("params.selector"), render: (j) => fmtSelector(j.selector) },
    { key: "pace", label: t("params.pace"), render: (j) => t("params.pace_text", { rate: j.rate_per_min, n: j.concurrency }) },
    { key: "created_at", label: t("params.created_at"), render: (j) => fmtTime(j.created_at) },
    { key: "state", label: t("params.state"), render: (j) => jobState(j.finished_at ? "done" : "running") },
  ];
  fill(target, table(columns, jobs, { empty: t("params.no_jobs"), rowAttrs: (j) => ({ "data-job": j.job_id }) }));
}

function jobState(state) {
  return h("span", { class: `badge ${state === "done" ? "ok" : "warn"}`, "data-state": state }, tv("param_job_state", state));
}

async function showJob(jobId) {
  const body = document.getElementById("pp-job-body");
  section("pp-job", true);
  view.jobId = jobId;
  remember();
  let job;
  try {
    job = await api("GET", `/param-jobs/${jobId}`);
  } catch (err) {
    failed(body, err);
    return;
  }
  if (view.jobId !== jobId) return; // another job was chosen meanwhile
  view.jobDevices = new Set(job.devices.map((d) => d.device_id));
  fill("pp-job-h", t("params.job_title", { id: job.job_id }));
  const tiles = Object.entries(job.counts).filter(([, n]) => n > 0).map(([status, n]) => h("div", { class: "tile", "data-count": status },
    h("div", { class: "label" }, tv("param_job_status", status)), h("div", { class: "value" }, String(n))));
  const devices = [
    { key: "device_id", label: t("params.device"), render: (d) => link(`/devices/${encodeURIComponent(d.device_id)}`, d.device_id) },
    { key: "status", label: t("params.state"), render: (d) => statusBadge("param_job_status", d.status) },
    { key: "started_at", label: t("params.started_at"), render: (d) => fmtTime(d.started_at) },
    { key: "groups", label: t("params.groups"), render: (d) => deviceGroups(d) },
  ];
  fill(body,
    h("dl", { class: "facts" },
      h("dt", {}, t("params.state")), h("dd", { "data-fact": "state" }, jobState(job.state)),
      h("dt", {}, t("params.profile")), h("dd", {}, `${job.profile} v${job.profile_version}`),
      h("dt", {}, t("params.protocol")), h("dd", {}, tv("param_protocol", job.protocol)),
      h("dt", {}, t("params.selector")), h("dd", {}, fmtSelector(job.selector)),
      h("dt", {}, t("params.pace")), h("dd", {}, t("params.pace_text", { rate: job.rate_per_min, n: job.concurrency })),
      h("dt", {}, t("params.created_at")), h("dd", {}, fmtTime(job.created_at)),
      h("dt", {}, t("params.finished_at")), h("dd", {}, fmtTime(job.finished_at))),
    h("div", { class: "tiles" },
      h("div", { class: "tile" }, h("div", { class: "label" }, t("params.total")), h("div", { class: "value" }, String(job.total))),
      tiles),
    h("details", {}, h("summary", {}, t("params.job_values")),
      h("ul", {}, ordered(job.groups).map(([g, values]) => h("li", {}, h("strong", {}, tv("param_group", g)), t("params.colon"), fmtGroupValues(g, values))))),
    table(devices, job.devices, { rowAttrs: (d) => ({ "data-device": d.device_id }) }));
}

function deviceGroups(device) {
  if (device.failure_reason) return h("span", { class: "error" }, device.failure_reason);
  if (!device.groups) return "–";
  return h("ul", { class: "pp-job-groups" }, ordered(device.groups).map(([group, g]) => h("li", {},
    tv("param_group", group), " ", statusBadge("param_job_status", g.status),
    g.failure_reason ? h("span", { class: "error" }, " ", g.failure_reason) : null,
    g.diff ? h("span", { class: "muted" }, " ", diffText(group, g.diff)) : null)));
}

function diffText(group, diff) {
  const spec = GROUPS[group];
  return Object.entries(diff).map(([name, d]) => {
    const field = spec ? spec.fields.find((f) => f.name === name) : null;
    const show = (v) => (field ? fmtValue(field, v) : String(v));
    return t("params.diff_text", { field: t(`param_field.${name}`), desired: show(d.desired), reported: show(d.reported) });
  }).join("; ");
}

// ------------------------------------------------------------------ live, start

const reloadJob = throttle(() => (view.jobId !== null ? showJob(view.jobId) : null));
const reloadJobs = throttle(() => loadJobs(), 1000);

onEvent(["param.", "command."], (event) => {
  if (event.type.startsWith("param.")) {
    if (event.job_id !== null && event.job_id !== undefined) reloadJobs();
    if (view.jobId !== null && (event.job_id === view.jobId || view.jobDevices.has(event.device_id))) reloadJob();
    return;
  }
  // a set or read-back of a device of the job shown ended: its groups moved on
  if (view.jobId !== null && PARAM_COMMANDS.has(event.name) && view.jobDevices.has(event.device_id)) reloadJob();
});

onReconnect(() => {
  loadProfiles();
  loadJobs();
  if (view.profile) showProfile(view.profile.name, view.profile.version);
  if (view.jobId !== null) showJob(view.jobId);
});

const newButton = document.getElementById("pp-new");
if (newButton) newButton.addEventListener("click", () => openEditor(null));

const start = new URLSearchParams(location.search);
await Promise.all([loadProfiles(), loadJobs()]);
if (start.get("profile")) await showProfile(start.get("profile"));
if (/^\d+$/.test(start.get("job") || "")) await showJob(Number(start.get("job")));
