// Device parameters: the field tables of every parameter group (shared with the
// profiles page) and the device page's parameter panel.
//
// The tables follow the API's group models (chargegw/api/param_models.py, from
// chargegw/domain/params.py): type, wire range, resolution and unit of every field.
// Forms are `novalidate`: the API checks every value and its message is shown next to
// the field it names.

import {
  api, h, fill, t, tv, fmtTime, fmtUnit, hasScope, onEvent, onReconnect,
  ApiError, clearErrors, notify, link, onSubmit,
} from "./core.js";

const U16 = 65535;
const watts = (name, max = 6553.5) => ({ name, type: "float", step: 0.1, min: 0, max, unit: "w" });
const secs = (name) => ({ name, type: "int", min: 0, max: U16, unit: "s" });
const celsius = (name) => ({ name, type: "int", min: 0, max: 255, unit: "c" });
const onOff = (name) => ({ name, type: "enum", values: [0, 1] });

/**
 * Every parameter group: its protocol, its set and read-back commands (null: the
 * protocol has none), whether its set command may carry only some fields (`partial`),
 * and its fields: `type` int | float | enum | text | hex | periods, with `min`, `max`,
 * `step` (the wire resolution), `unit` (a `unit.*` key), `values` (enum), `maxLength`,
 * `bytes` (hex) and `secret` (shown masked by the API).
 */
export const GROUPS = {
  running1: {
    protocol: "ap3000", set: "set_running_params1", read: "read_running_params1",
    fields: [
      watts("unplug_power_w"), secs("unplug_detect_time_s"),
      { name: "float_percent", type: "int", min: 1, max: 100, unit: "percent" },
      secs("float_detect_time_s"), secs("float_time_s"), secs("heartbeat_interval_s"),
    ],
  },
  running2: {
    protocol: "ap3000", set: "set_running_params2", read: "read_running_params2",
    fields: [
      watts("dynamic_overload_power_w"), secs("dynamic_overload_detect_time_s"),
      secs("dynamic_overload_start_time_s"), watts("unplug_interference_power_w", 25.5),
      secs("unplug_interference_time_s"), secs("float_second_time_point_s"),
      secs("float_second_detect_time_s"), watts("min_power_w"), secs("min_power_time_point_s"),
      secs("second_max_power_time_point_s"), celsius("ambient_alarm_temperature_c"),
      celsius("port_alarm_temperature_c"),
      { name: "unplug_detect_mode", type: "int", min: 0, max: 255 },
      onOff("qr_light"),
    ],
  },
  limits: {
    protocol: "ap3000", set: "set_limits", read: "read_limits",
    fields: [
      secs("max_charge_duration_s"), watts("overload_power_w", 3500),
      { name: "overvoltage_v", type: "float", step: 0.1, min: 0, max: 6553.5, unit: "v" },
      { name: "undervoltage_v", type: "float", step: 0.1, min: 0, max: 6553.5, unit: "v" },
    ],
  },
  card: {
    protocol: "ap3000", set: "set_card_params", read: "read_card_params",
    fields: [
      { name: "card_sector", type: "int", min: 0, max: 255 },
      { name: "user_card_key", type: "hex", bytes: 6, secret: true },
      { name: "new_card_key", type: "hex", bytes: 6, secret: true },
    ],
  },
  mute: { protocol: "ap3000", set: "set_running_params3", read: null, fields: [onOff("mute_mode")] },
  work_mode: { protocol: "ap3000", set: "set_work_mode", read: null, fields: [onOff("work_mode")] },
  card_mode: {
    protocol: "ap3000", set: "set_tc_card_mode", read: null,
    fields: [{ name: "tc_card_mode", type: "enum", values: [0, 1, 3, 4, 5, 6] }],
  },
  qr_code: {
    protocol: "ap3000", set: "set_qr_code", read: null,
    fields: [onOff("main_screen_type"), { name: "qr_data", type: "text", maxLength: 71 }],
  },
  socket_params: {
    protocol: "bkv", set: "set_params", read: "query_params", partial: true,
    fields: [
      watts("full_charge_power_w"),
      { name: "trickle_threshold_pct", type: "int", min: 0, max: 100, unit: "percent" },
      secs("full_charge_delay_s"), watts("no_load_power_w"), secs("no_load_delay_s"),
      { name: "max_charge_duration_min", type: "int", min: 0, max: U16, unit: "min" },
      celsius("high_temperature_c"), watts("power_limit_w"),
      { name: "overcurrent_limit_a", type: "float", step: 0.001, min: 0, max: 65.535, unit: "a" },
      { name: "key_base_amount_cent", type: "int", min: 0, max: 4294967295, unit: "cent" },
      { name: "anti_pulse_time_raw", type: "int", min: 0, max: U16 },
    ],
  },
  voice_window_a: {
    protocol: "bkv", set: "voice_window", read: null,
    fields: [onOff("buzzer"), onOff("voice"), { name: "periods", type: "periods", max: 2 }],
  },
  voice_window_b: {
    protocol: "bkv", set: "voice_window", read: null,
    fields: [onOff("buzzer"), onOff("voice"), { name: "periods", type: "periods", max: 2 }],
  },
};

/** The groups of a protocol, in the table's order. */
export function protocolGroups(protocol) {
  return Object.keys(GROUPS).filter((g) => GROUPS[g].protocol === protocol);
}

const NUMERIC = new Set(["int", "float", "enum"]);

// ------------------------------------------------------------------ values

function digits(field) {
  return field.type === "float" ? Math.max(0, -Math.floor(Math.log10(field.step))) : 0;
}

/** A field's value as the operator reads it: unit, enum meaning, periods. */
export function fmtValue(field, value) {
  if (value === null || value === undefined) return "–";
  if (field.type === "enum") return `${tv(`param_value.${field.name}`, value)} (${value})`;
  if (field.type === "periods") {
    if (!Array.isArray(value) || !value.length) return t("params.no_periods");
    return value.map((p) => `${p.start}–${p.end}`).join(", ");
  }
  if (typeof value === "number" && field.unit) return fmtUnit(value, field.unit, digits(field));
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

/** Short text of a group's values: "field = value; ..." (for profile and job views). */
export function fmtGroupValues(group, values) {
  const spec = GROUPS[group];
  if (!spec || !values) return "–";
  return spec.fields
    .filter((f) => f.name in values)
    .map((f) => `${t(`param_field.${f.name}`)} = ${fmtValue(f, values[f.name])}`)
    .join("; ");
}

/** A status badge of a group (`param_status`) or a job's device (`param_job_status`). */
export function statusBadge(group, status) {
  const kind = {
    verified: "ok", acknowledged: "ok", mismatch: "warn", failed: "bad",
    pending: "off", applying: "off", queued: "off", superseded: "off",
  }[status] || "off";
  const text = status ? tv(group, status) : t("params.not_set");
  return h("span", { class: `badge ${kind}`, "data-status": status || "none" }, text);
}

// ------------------------------------------------------------------ forms

function unitLabel(field) {
  return field.unit ? t(`unit.${field.unit}`) : null;
}

function input(field, id, value, { secretHint }) {
  const common = { id, name: field.name, "data-field": field.name };
  if (field.type === "enum") {
    const options = [h("option", { value: "" }, t("params.choose"))];
    for (const v of field.values) {
      options.push(h("option", { value: String(v), selected: value === v }, `${tv(`param_value.${field.name}`, v)} (${v})`));
    }
    return h("select", common, options);
  }
  if (field.type === "int" || field.type === "float") {
    return h("input", {
      ...common, type: "number", inputmode: field.type === "int" ? "numeric" : "decimal",
      min: field.min, max: field.max, step: field.type === "int" ? 1 : field.step,
      value: typeof value === "number" ? String(value) : null,
    });
  }
  const attrs = { ...common, type: "text", autocomplete: "off", spellcheck: "false" };
  if (field.type === "hex") {
    attrs.maxlength = field.bytes * 2;
    attrs.size = field.bytes * 2 + 2;
    attrs.class = "hex";
    attrs.placeholder = secretHint;
    // a secret is shown masked by the API: never sent back as a value
    if (!field.secret && typeof value === "string") attrs.value = value;
  } else {
    attrs.maxlength = field.maxLength;
    if (typeof value === "string") attrs.value = value;
  }
  return h("input", attrs);
}

function periodsInput(field, idPrefix, value) {
  const periods = Array.isArray(value) ? value : [];
  const rows = [];
  for (let i = 0; i < field.max; i += 1) {
    const p = periods[i] || {};
    const start = `${idPrefix}-${i}-start`;
    const end = `${idPrefix}-${i}-end`;
    rows.push(h("div", { class: "param-period" },
      h("label", { for: start }, t("params.period_start", { n: i + 1 })),
      h("input", { id: start, type: "time", "data-period": `${i}.start`, value: p.start || null }),
      h("label", { for: end }, t("params.period_end", { n: i + 1 })),
      h("input", { id: end, type: "time", "data-period": `${i}.end`, value: p.end || null })));
  }
  return h("fieldset", { class: "param-periods", "data-field": field.name },
    h("legend", {}, t(`param_field.${field.name}`)), rows,
    h("p", { class: "muted" }, t("params.periods_help")));
}

/**
 * The inputs of `group` (a `div.param-fields` of label / input rows), filled with
 * `values`; `idPrefix` keeps ids unique on the page. Secret fields stay empty
 * (`secretHint` is their placeholder).
 */
export function groupFields(group, values, { idPrefix, secretHint = t("params.secret_keep") }) {
  const rows = [];
  for (const field of GROUPS[group].fields) {
    const id = `${idPrefix}-${group}-${field.name}`;
    const value = values ? values[field.name] : undefined;
    if (field.type === "periods") {
      rows.push(periodsInput(field, id, value));
      continue;
    }
    const unit = unitLabel(field);
    rows.push(h("label", { for: id }, t(`param_field.${field.name}`)));
    rows.push(h("span", { class: "param-input" },
      input(field, id, value, { secretHint }),
      unit ? h("span", { class: "muted unit" }, unit) : null));
  }
  return h("div", { class: "param-fields", "data-group": group }, rows);
}

/**
 * The values of `group` in `root` (its `div.param-fields`), typed as the API takes them;
 * empty inputs are left out. `only`: names of the fields to take (the others are left out).
 */
export function readGroup(root, group, only = null) {
  const out = {};
  for (const field of GROUPS[group].fields) {
    if (only && !only.has(field.name)) continue;
    if (field.type === "periods") {
      const periods = [];
      for (let i = 0; i < field.max; i += 1) {
        const start = root.querySelector(`[data-period="${i}.start"]`).value;
        const end = root.querySelector(`[data-period="${i}.end"]`).value;
        if (start || end) periods.push({ start, end });
      }
      out[field.name] = periods;
      continue;
    }
    const el = root.querySelector(`[data-field="${field.name}"]`);
    if (!el || el.value.trim() === "") continue;
    const raw = el.value.trim();
    if (NUMERIC.has(field.type)) {
      const n = Number(raw);
      out[field.name] = Number.isFinite(n) ? n : raw; // the API names what is wrong
    } else {
      out[field.name] = raw;
    }
  }
  return out;
}

/**
 * Show an API error on a form: next to the field it names (inside the parameter group
 * it names, when the form holds several; `resolve(name)` may name the element for a
 * field itself), else at the form's foot.
 */
export function placeError(form, err, { resolve = null } = {}) {
  clearErrors(form);
  const problems = err.details && err.details.length ? err.details : [{ field: err.field, message: err.message }];
  let placed = false;
  for (const p of problems) {
    const message = p.message || err.message;
    const parts = p.field ? String(p.field).split(".") : [];
    const name = parts.length ? parts[parts.length - 1] : null;
    let scope = form;
    const groups = [...form.querySelectorAll(".param-fields[data-group]")];
    const named = groups.find((g) => parts.includes(g.dataset.group))
      || groups.find((g) => String(message).startsWith(`${g.dataset.group}:`));
    if (named) scope = named;
    const target = name
      ? (resolve && resolve(name)) || scope.querySelector(`[data-field="${CSS.escape(name)}"]`)
        || form.querySelector(`[name="${CSS.escape(name)}"]`)
      : null;
    if (!target) continue;
    target.setAttribute("aria-invalid", "true");
    const id = `${target.id || name}-error`;
    const msg = h("p", { class: "error field-error", role: "alert", id }, message);
    target.setAttribute("aria-describedby", id);
    const after = target.closest(".param-input") || target;
    after.insertAdjacentElement("afterend", msg);
    placed = true;
  }
  if (!placed) form.append(h("p", { class: "error form-error", role: "alert" }, err.message));
}

/** Submit `form` with `action()`; API errors are placed on the form (`placeError`). */
export function onApiSubmit(form, action, options = {}) {
  onSubmit(form, () => action(), () => {}, { place: (f, err) => placeError(f, err, options) });
}

// ------------------------------------------------------------------ live re-reads

/**
 * `fn` (async) run at most once per `ms` however often the result is called, the last
 * call never lost, and never two runs at a time. Unlike a debounce, a steady stream of
 * events (a packet every few milliseconds) does not hold the re-read back.
 */
export function throttle(fn, ms = 400) {
  let timer = null;
  let running = false;
  let again = false;
  const run = async () => {
    timer = null;
    if (running) { again = true; return; }
    running = true;
    try {
      await fn();
    } finally {
      running = false;
      if (again) { again = false; schedule(); }
    }
  };
  const schedule = () => { if (timer === null) timer = setTimeout(run, ms); };
  return schedule;
}

// ------------------------------------------------------------------ the device panel

/** Link the stylesheet `name` (under /console/static) once, for pages that embed a panel. */
export function useStyles(name) {
  const href = `/console/static/${name}`;
  if ([...document.querySelectorAll("link[rel=stylesheet]")].some((l) => l.getAttribute("href") === href)) return;
  document.head.append(h("link", { rel: "stylesheet", href }));
}

const FIELD_COMMANDS = new Set(Object.values(GROUPS).flatMap((g) => [g.set, g.read]).filter(Boolean));

/**
 * Fill `container` with the parameters of `deviceId` (GET /devices/{id}/params): per
 * group the desired and reported values, the verification state and the diff, and an
 * edit form (config scope). Follows the device's `param.*` events and its parameter
 * commands (re-read, throttled) and re-reads after a reconnect.
 */
export async function renderParams(container, deviceId) {
  useStyles("params.css");
  const panel = new ParamsPanel(container, deviceId);
  const reload = throttle(() => panel.load());
  onEvent(["param.", "command."], (event) => {
    if (event.device_id !== deviceId) return;
    if (event.type.startsWith("command.") && !FIELD_COMMANDS.has(event.name)) return;
    reload();
  });
  onReconnect(reload);
  await panel.load();
  return panel;
}

class ParamsPanel {
  constructor(container, deviceId) {
    this.container = container;
    this.deviceId = deviceId;
    this.sections = new Map();
    this.protocol = null;
    this.idPrefix = `pp-${String(deviceId).replace(/[^A-Za-z0-9_-]/g, "_")}`;
  }

  async load() {
    try {
      if (this.protocol === null) {
        const device = await api("GET", `/devices/${encodeURIComponent(this.deviceId)}`);
        this.protocol = device.protocol;
      }
      const data = await api("GET", `/devices/${encodeURIComponent(this.deviceId)}/params`);
      this.render(data.groups || {});
    } catch (err) {
      if (!(err instanceof ApiError)) throw err;
      fill(this.container, h("p", { class: "error", role: "alert" }, t("error.failed", { message: err.message })));
      this.sections.clear();
    }
  }

  render(groups) {
    const names = protocolGroups(this.protocol);
    if (!names.length) {
      fill(this.container, h("p", { class: "muted" }, t("params.unsupported")));
      return;
    }
    if (!this.sections.size) {
      fill(this.container);
      if (!hasScope("config")) this.container.append(h("p", { class: "muted" }, t("params.read_only")));
    }
    for (const name of names) {
      let section = this.sections.get(name);
      if (!section) {
        section = new GroupSection(this, name);
        this.sections.set(name, section);
        this.container.append(section.el);
      }
      section.update(groups[name] || null);
    }
  }
}

class GroupSection {
  constructor(panel, group) {
    this.panel = panel;
    this.group = group;
    this.spec = GROUPS[group];
    this.state = null;
    this.dirty = false;
    const headingId = `${panel.idPrefix}-${group}-h`;
    this.heading = h("h3", { id: headingId });
    this.status = h("div", { class: "param-state" });
    this.editor = hasScope("config") ? this.buildEditor() : null;
    this.el = h("section", { class: "card param-group", "data-group": group, "aria-labelledby": headingId },
      this.heading, this.status, this.editor);
  }

  update(state) {
    this.state = state;
    const status = state ? state.status : null;
    fill(this.heading, t(`param_group.${this.group}`), " ", statusBadge("param_status", status));
    fill(this.status, ...this.describe(state));
    if (this.editor && !this.dirty) this.fillForm();
  }

  describe(state) {
    const out = [];
    const facts = [];
    if (state) {
      const when = [
        ["desired_at", "params.desired_at"], ["reported_at", "params.reported_at"],
        ["verified_at", "params.verified_at"], ["acknowledged_at", "params.acknowledged_at"],
        ["checked_at", "params.checked_at"],
      ];
      for (const [key, label] of when) {
        if (state[key]) facts.push(h("span", {}, `${t(label)} ${fmtTime(state[key])}`));
      }
      if (state.job_id) {
        facts.push(h("span", {}, t("params.set_by_job"), " ", link(`/params?job=${state.job_id}`, `#${state.job_id}`)));
      }
    }
    if (facts.length) out.push(h("p", { class: "muted param-times" }, facts));
    if (state && state.failure_reason) {
      out.push(h("p", { class: "error" }, t("params.failure", { reason: state.failure_reason })));
    }
    if (!state || (!state.desired && !state.reported)) {
      const never = this.spec.partial ? "params.never_partial" : this.spec.read ? "params.never" : "params.never_no_read";
      out.push(h("p", { class: "muted" }, t(never)));
      return out;
    }
    const diff = state.diff || {};
    const rows = this.spec.fields.map((f) => h("tr", { class: f.name in diff ? "param-diff" : null, "data-field-row": f.name },
      h("th", { scope: "row" }, t(`param_field.${f.name}`)),
      h("td", { "data-col": "desired" }, state.desired ? fmtValue(f, state.desired[f.name]) : "–"),
      h("td", { "data-col": "reported" }, state.reported ? fmtValue(f, state.reported[f.name]) : "–"),
      h("td", { "data-col": "diff" }, f.name in diff ? h("span", { class: "badge warn" }, t("params.differs")) : "")));
    out.push(h("table", { class: "param-values" },
      h("thead", {}, h("tr", {},
        h("th", { scope: "col" }, t("params.field")),
        h("th", { scope: "col" }, t("params.desired")),
        h("th", { scope: "col" }, t("params.reported")),
        h("th", { scope: "col" }, t("params.diff")))),
      h("tbody", {}, rows)));
    return out;
  }

  buildEditor() {
    const { panel, group, spec } = this;
    this.fieldsHolder = h("div", { class: "param-form-fields" });
    const hint = h("p", { class: "muted" }, t(spec.partial ? "params.edit_help_partial" : "params.edit_help"));
    const submit = h("button", { type: "submit", class: "primary" }, t("params.apply"));
    const reset = h("button", { type: "button", onclick: () => { this.dirty = false; clearErrors(this.form); this.fillForm(); } }, t("params.reset"));
    const readBack = spec.read && hasScope("control")
      ? h("button", { type: "button", onclick: () => this.readBack() }, t("params.read_device"))
      : null;
    this.form = h("form", { class: "param-form", novalidate: true, "data-group": group },
      hint, this.fieldsHolder, h("div", { class: "actions" }, submit, reset, readBack));
    this.form.addEventListener("input", () => { this.dirty = true; });
    onApiSubmit(this.form, () => this.submit());
    this.details = h("details", { class: "param-edit" },
      h("summary", {}, t("params.edit_group", { group: t(`param_group.${group}`) })), this.form);
    return this.details;
  }

  initialValues() {
    const s = this.state;
    return (s && (s.desired || s.reported)) || null;
  }

  fillForm() {
    fill(this.fieldsHolder, groupFields(this.group, this.initialValues(), { idPrefix: this.panel.idPrefix }));
  }

  async submit() {
    const holder = this.fieldsHolder.firstChild;
    let values = readGroup(holder, this.group);
    if (this.spec.partial) {
      // only what changed: the device keeps the others
      const before = this.initialValues() || {};
      values = Object.fromEntries(Object.entries(values).filter(([k, v]) => JSON.stringify(v) !== JSON.stringify(before[k])));
    }
    if (!Object.keys(values).length) {
      this.form.append(h("p", { class: "error form-error", role: "alert" }, t("params.nothing_to_apply")));
      return;
    }
    await api("PUT", `/devices/${encodeURIComponent(this.panel.deviceId)}/params`, { body: { [this.group]: values } });
    this.dirty = false;
    notify(t("params.queued", { group: t(`param_group.${this.group}`), device: this.panel.deviceId }));
    await this.panel.load();
  }

  async readBack() {
    clearErrors(this.form);
    try {
      await api("POST", `/devices/${encodeURIComponent(this.panel.deviceId)}/commands`, { body: { command: this.spec.read } });
      this.dirty = false;
      notify(t("params.read_queued", { group: t(`param_group.${this.group}`) }));
    } catch (err) {
      if (err instanceof ApiError) placeError(this.form, err); else throw err;
    }
  }
}
