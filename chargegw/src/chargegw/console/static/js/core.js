// The console's shared module: the page's configuration, texts, formatting, the API
// client (session cookie + CSRF token), safe DOM building (text only, never HTML),
// confirmation, error display and the live event stream.
//
// Every string from the API reaches the page through textContent or an attribute
// set with setAttribute: device-provided texts (QR codes, ICCIDs, firmware) are data.

const config = JSON.parse(document.getElementById("console-config").textContent);
export { config };

// ------------------------------------------------------------------ texts

/** The text of `key` in the page's language, `{name}` fields filled from `values`. */
export function t(key, values = {}) {
  let text = config.strings[key];
  if (text === undefined) return key;
  for (const [name, value] of Object.entries(values)) {
    text = text.split(`{${name}}`).join(String(value));
  }
  return text;
}

/** The translation of an enumerated value (`order_status`, `charging`), else the value. */
export function tv(group, value) {
  if (value === null || value === undefined || value === "") return "–";
  const key = `${group}.${value}`;
  return key in config.strings ? config.strings[key] : String(value);
}

const locale = config.lang === "zh" ? "zh-CN" : "en-GB";
const dateTime = new Intl.DateTimeFormat(locale, {
  timeZone: config.timezone, year: "numeric", month: "2-digit", day: "2-digit",
  hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false,
});
const timeOnly = new Intl.DateTimeFormat(locale, {
  timeZone: config.timezone, hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false,
});

/** An ISO timestamp in the site's time zone; "–" for none. */
export function fmtTime(iso, { short = false } = {}) {
  if (!iso) return "–";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  return (short ? timeOnly : dateTime).format(d);
}

/** A number with its unit from the catalogue (`unit.kwh`). */
export function fmtUnit(value, unit, digits = 0) {
  if (value === null || value === undefined) return "–";
  const n = Number(value).toLocaleString(locale, {
    minimumFractionDigits: digits, maximumFractionDigits: digits,
  });
  return `${n} ${t(`unit.${unit}`)}`;
}

/** Cents as yuan: "¥12.34". */
export function fmtMoney(cents) {
  if (cents === null || cents === undefined) return "–";
  return `¥${(Number(cents) / 100).toLocaleString(locale, {
    minimumFractionDigits: 2, maximumFractionDigits: 2,
  })}`;
}

/** Seconds as h:mm:ss. */
export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.max(0, Math.round(Number(seconds)));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  return `${h}:${String(m).padStart(2, "0")}:${String(s % 60).padStart(2, "0")}`;
}

export function hasScope(scope) {
  return config.scopes.includes("admin") || config.scopes.includes(scope);
}

// ------------------------------------------------------------------ the API

/** A refused or failed API call: the API's error body, flattened. */
export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || "http_error";
    this.field = error.field || null;
    this.group = error.group || null;
    this.details = Array.isArray(error.details) ? error.details : [];
  }
}

/**
 * Call the API: `api("GET", "/devices", {query})`, `api("POST", path, {body})`.
 * Paths are relative to /api/v1. Changes carry the session's CSRF token. A 401 (the
 * session ended) goes back to the sign-in page.
 */
export async function api(method, path, { query = null, body = undefined, raw = null,
                                          contentType = null } = {}) {
  let url = `/api/v1${path}`;
  if (query) {
    const params = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) {
      if (v === null || v === undefined || v === "") continue;
      if (Array.isArray(v)) v.forEach((x) => params.append(k, x));
      else params.append(k, v);
    }
    const qs = params.toString();
    if (qs) url += `?${qs}`;
  }
  const headers = { Accept: "application/json" };
  const init = { method, headers, credentials: "same-origin" };
  if (method !== "GET" && method !== "HEAD") headers["X-CSRF-Token"] = config.csrf;
  if (raw !== null) {
    init.body = raw;
    headers["Content-Type"] = contentType || "application/octet-stream";
  } else if (body !== undefined) {
    init.body = JSON.stringify(body);
    headers["Content-Type"] = "application/json";
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch (err) {
    throw new ApiError(0, { error: { code: "network", message: t("error.network") } });
  }
  if (response.status === 401 && !config.local) {
    window.location.assign(`/console/login?next=${encodeURIComponent(location.pathname + location.search)}`);
    throw new ApiError(401, await safeJson(response));
  }
  if (!response.ok) throw new ApiError(response.status, await safeJson(response));
  if (response.status === 204) return null;
  const type = response.headers.get("content-type") || "";
  return type.includes("json") ? response.json() : response.text();
}

async function safeJson(response) {
  try { return await response.json(); } catch { return null; }
}

/** Every page of a list endpoint, up to `max` items. */
export async function apiAll(path, query = {}, max = 1000) {
  const items = [];
  let cursor = null;
  do {
    const page = await api("GET", path, { query: { ...query, cursor, limit: 200 } });
    items.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor && items.length < max);
  return items;
}

// ------------------------------------------------------------------ DOM

/**
 * An element: `h("a", {href: url, class: "x"}, "text", child)`. Strings become text
 * nodes; attributes are set with setAttribute (`on*` properties take functions).
 */
export function h(tag, attrs = {}, ...children) {
  const svg = ["svg", "path", "polyline", "line", "text", "g", "rect", "circle", "title"].includes(tag);
  const el = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") el.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace the children of `el` (or of the element with id `el`). */
export function fill(el, ...children) {
  const node = typeof el === "string" ? document.getElementById(el) : el;
  // a live re-render may move a field the user is typing in (a start form lives across
  // renders): moving a node takes its focus, and keys typed next would go nowhere
  const focused = document.activeElement;
  const keep = focused && focused !== node && node.contains(focused) ? focused : null;
  node.replaceChildren();
  append(node, children);
  if (keep && keep.isConnected) keep.focus({ preventScroll: true });
  return node;
}

/** A link to a console page. */
export function link(path, text) {
  return h("a", { href: `/console${path}` }, text);
}

/**
 * A table: `columns` are `{key, label, render?(row), num?}`; `render` returns a string
 * or a node. Rows without items show `empty`.
 */
export function table(columns, rows, { empty = t("list.empty"), caption = null, rowAttrs = null } = {}) {
  const head = h("tr", {}, columns.map((c) => h("th", { scope: "col", class: c.num ? "num" : null }, c.label)));
  const body = rows.length
    ? rows.map((row) => h("tr", rowAttrs ? rowAttrs(row) : {}, columns.map((c) => h(
        "td", { class: c.num ? "num" : null, "data-col": c.key },
        c.render ? c.render(row) : (row[c.key] ?? "–")))))
    : [h("tr", {}, h("td", { colspan: columns.length, class: "empty" }, empty))];
  return h("table", {}, caption ? h("caption", {}, caption) : null, h("thead", {}, head), h("tbody", {}, body));
}

/** A status badge for an enumerated value. */
export function badge(group, value) {
  return h("span", { class: `badge ${group}-${String(value).replace(/[^a-z0-9_-]/gi, "")}` }, tv(group, value));
}

/** Online / offline badge. */
export function onlineBadge(online) {
  return h("span", { class: `badge ${online ? "ok" : "off"}` }, t(online ? "device.online" : "device.offline"));
}

// ------------------------------------------------------------------ confirmation, errors

/** Ask before a destructive action; resolves true when confirmed. */
export function confirmAction(message, okLabel = t("confirm.ok")) {
  const dialog = document.getElementById("confirm");
  fill("confirm-message", message);
  fill("confirm-ok", okLabel);
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.returnValue = "";
    dialog.showModal();
  });
}

/** Show an API error on a form: next to the field it names, else at the form's foot. */
export function showError(form, err) {
  clearErrors(form);
  const problems = err.details && err.details.length ? err.details : [{ field: err.field, message: err.message }];
  let placed = false;
  for (const p of problems) {
    const name = p.field ? String(p.field).split(".").pop() : null;
    const input = name ? form.querySelector(`[name="${CSS.escape(name)}"]`) : null;
    if (input) {
      input.setAttribute("aria-invalid", "true");
      const msg = h("p", { class: "error field-error", role: "alert" }, p.message || err.message);
      input.insertAdjacentElement("afterend", msg);
      placed = true;
    }
  }
  if (!placed) {
    form.append(h("p", { class: "error form-error", role: "alert" }, err.message));
  }
}

export function clearErrors(form) {
  form.querySelectorAll(".field-error, .form-error").forEach((e) => e.remove());
  form.querySelectorAll("[aria-invalid]").forEach((e) => e.removeAttribute("aria-invalid"));
}

/** A short notice at the top of the page. */
export function notify(message, kind = "ok") {
  let area = document.getElementById("notices");
  if (!area) {
    area = h("div", { id: "notices", role: "status", "aria-live": "polite" });
    document.getElementById("main").prepend(area);
  }
  const note = h("p", { class: `notice ${kind}` }, message);
  area.append(note);
  setTimeout(() => note.remove(), 8000);
}

/** Values of a form as an object; numbers where the input is a number, empty ones left out. */
export function formValues(form) {
  const out = {};
  for (const el of form.elements) {
    if (!el.name || el.disabled) continue;
    if (el.type === "checkbox") { out[el.name] = el.checked; continue; }
    if (el.value === "") continue;
    out[el.name] = el.type === "number" ? Number(el.value) : el.value;
  }
  return out;
}

/**
 * A form that calls the API: `action(values)` returns a promise; errors are shown on the
 * form by `place(form, err)` (`showError` unless given), `done(result)` runs after success.
 */
export function onSubmit(form, action, done = () => {}, { place = showError } = {}) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    const button = form.querySelector("button[type=submit]");
    if (button) button.disabled = true;
    try {
      const result = await action(formValues(form));
      if (result !== false) await done(result);
    } catch (err) {
      if (err instanceof ApiError) place(form, err); else throw err;
    } finally {
      if (button) button.disabled = false;
    }
  });
}

// ------------------------------------------------------------------ tabs

/**
 * The page's tabs (`[role=tab]` with `aria-controls`): click or arrow keys select one,
 * its panel shows, the URL's hash names it (so a reload or a link opens that tab).
 */
export function setupTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  function selectTab(tab, focus = false) {
    for (const other of tabs) {
      const selected = other === tab;
      other.setAttribute("aria-selected", String(selected));
      other.tabIndex = selected ? 0 : -1;
      document.getElementById(other.getAttribute("aria-controls")).hidden = !selected;
    }
    if (focus) tab.focus();
    const name = tab.id.replace(/^tab-/, "");
    if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  }
  tabs.forEach((tab, index) => {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", (event) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
      if (!step) return;
      event.preventDefault();
      selectTab(tabs[(index + step + tabs.length) % tabs.length], true);
    });
  });
  if (tabs.length) selectTab(tabs.find((tab) => `#${tab.id.replace(/^tab-/, "")}` === location.hash) || tabs[0]);
}

// ------------------------------------------------------------------ live updates

const listeners = [];
const reconnectHandlers = [];
let source = null;

/**
 * Call `handler(event)` for live events whose type starts with one of `prefixes`
 * ("device.", "order.", ...). Events are the platform's event model (docs/events.md).
 */
export function onEvent(prefixes, handler) {
  listeners.push({ prefixes: [].concat(prefixes), handler });
  connect();
}

/** Call `handler()` after the stream reconnects: reload what may have changed meanwhile. */
export function onReconnect(handler) {
  reconnectHandlers.push(handler);
}

function setLive(state) {
  const el = document.getElementById("live-status");
  if (!el) return;
  el.dataset.state = state;
  el.textContent = t(`live.${state}`);
}

let retryMs = 2000;

function streamUrl() {
  const params = new URLSearchParams();
  for (const [name, values] of Object.entries(config.stream || {})) {
    for (const value of values) params.append(name, value);
  }
  const qs = params.toString();
  return `/api/v1/events/stream${qs ? `?${qs}` : ""}`;
}

function connect() {
  if (config.stream === null) {
    setLive("unavailable");
    return;
  }
  if (source) return;
  let opened = false;
  source = new EventSource(streamUrl());
  source.onopen = () => {
    setLive("live");
    retryMs = 2000;
    if (opened) reconnectHandlers.forEach((f) => f());
    opened = true;
  };
  source.onerror = async () => {
    if (source.readyState !== EventSource.CLOSED) {
      setLive("connecting"); // the browser reconnects by itself, with Last-Event-ID
      return;
    }
    // the stream answered with an error: ask the API why before trying again
    source = null;
    setLive("offline");
    try {
      await api("GET", "/events", { query: { limit: 1, ...config.stream } });
    } catch (err) {
      if (err instanceof ApiError && (err.status === 401 || err.status === 403)) return;
    }
    setTimeout(() => { connect(); reconnectHandlers.forEach((f) => f()); }, retryMs);
    retryMs = Math.min(retryMs * 2, 60000);
  };
  // every message is named by its event type: listen to each type of the catalogue
  for (const type of config.event_types) source.addEventListener(type, dispatch);
}

function dispatch(message) {
  let event;
  try { event = JSON.parse(message.data); } catch { return; }
  const type = event.type || message.type;
  for (const { prefixes, handler } of listeners) {
    if (prefixes.some((p) => type.startsWith(p))) handler(event);
  }
}

/**
 * A function that runs `fn` at most once per `ms`, with the last call's arguments, at
 * most `ms` after the first call: a steady stream of events (packets, progress) cannot
 * starve it.
 */
export function debounce(fn, ms = 300) {
  let timer = null;
  let last = [];
  return (...args) => {
    last = args;
    if (timer !== null) return;
    timer = setTimeout(() => { timer = null; fn(...last); }, ms);
  };
}
