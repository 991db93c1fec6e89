// The order list: filters (kept in the page's URL), pages of orders with "load more",
// and live updates: an order.* event the filters admit reloads the rows shown.
import {
  ApiError, api, badge, clearErrors, config, fill, fmtDuration, fmtMoney, fmtTime, fmtUnit, h,
  link, onEvent, onReconnect, showError, t, table, tv,
} from "../core.js";
import { zoneOffset } from "../chart.js";

const PAGE = 50;
const MAX_LIMIT = 1000;
const FILTERS = ["since", "until", "device_id", "status", "stop_reason", "start_mode", "device_initiated"];

const form = document.getElementById("order-filters");
const more = document.getElementById("order-more");
let rows = [];
let cursor = null;
let generation = 0;

/** A datetime-local value (the site's wall-clock time) as a UTC ISO timestamp. */
function wallToUtc(value) {
  const m = /^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})(?::(\d{2}))?/.exec(value || "");
  if (!m) return null;
  const wall = Date.UTC(Number(m[1]), Number(m[2]) - 1, Number(m[3]), Number(m[4]), Number(m[5]), Number(m[6] || 0));
  // the offset of the instant itself (a guess first: the offset changes at DST)
  const guess = wall - zoneOffset(wall);
  return new Date(wall - zoneOffset(guess)).toISOString();
}

/** The form's filters, as the URL keeps them (wall-clock times). */
function chosen() {
  const out = {};
  for (const name of FILTERS) {
    const value = form.elements[name].value.trim();
    if (value) out[name] = value;
  }
  return out;
}

/** The API query of the filters: times in UTC. */
function query() {
  const q = chosen();
  for (const name of ["since", "until"]) if (q[name]) q[name] = wallToUtc(q[name]) || q[name];
  return q;
}

function fromUrl() {
  const params = new URLSearchParams(location.search);
  for (const name of FILTERS) {
    const value = params.get(name);
    if (value !== null && form.elements[name]) form.elements[name].value = value;
  }
}

function toUrl() {
  const params = new URLSearchParams(chosen());
  const search = params.toString();
  history.replaceState(null, "", search ? `?${search}` : location.pathname);
}

const columns = [
  { key: "order_no", label: t("orders.col_order_no"),
    render: (o) => h("span", { class: "hex" }, link(`/orders/${encodeURIComponent(o.order_no)}`, o.order_no)) },
  { key: "device_id", label: t("orders.col_device"),
    render: (o) => link(`/devices/${encodeURIComponent(o.device_id)}`, o.device_id) },
  { key: "port", label: t("orders.col_port"), num: true },
  { key: "status", label: t("orders.col_status"), render: (o) => [
    badge("order_status", o.status),
    o.device_initiated ? [" ", h("span", { class: "badge initiated" }, t("orders.initiated_badge"))] : null,
    o.review_reason ? [" ", h("span", { class: "badge warn", title: o.review_reason }, t("orders.review_badge"))] : null,
  ] },
  { key: "start_mode", label: t("orders.col_start_mode"), render: (o) => tv("start_mode", o.start_mode) },
  { key: "started_at", label: t("orders.col_started"), render: (o) => fmtTime(o.started_at) },
  { key: "ended_at", label: t("orders.col_ended"), render: (o) => fmtTime(o.ended_at) },
  { key: "duration_s", label: t("orders.col_duration"), num: true, render: (o) => fmtDuration(o.duration_s) },
  { key: "energy_kwh", label: t("orders.col_energy"), num: true, render: (o) => fmtUnit(o.energy_kwh, "kwh", 2) },
  { key: "amount_cent", label: t("orders.col_amount"), num: true, render: (o) => fmtMoney(o.amount_cent) },
  { key: "stop_reason", label: t("orders.col_stop_reason"), render: (o) => tv("stop_reason", o.stop_reason) },
];

function render() {
  fill("order-list", table(columns, rows, {
    caption: t("orders.caption"),
    rowAttrs: (o) => ({ "data-order": o.order_no }),
  }));
  more.hidden = !cursor;
  fill("order-count", rows.length ? t(cursor ? "orders.shown_more" : "orders.shown", { count: rows.length }) : "");
}

/**
 * Load the list anew (as many rows as are shown, at least a page) or, with `append`,
 * the next page. A newer load makes an older one's answer moot.
 */
async function load({ append = false } = {}) {
  const mine = ++generation;
  const limit = append ? PAGE : Math.min(MAX_LIMIT, Math.max(PAGE, rows.length));
  try {
    const page = await api("GET", "/orders", { query: { ...query(), limit, cursor: append ? cursor : null } });
    if (mine !== generation) return;
    clearErrors(form);
    rows = append ? rows.concat(page.items) : page.items;
    cursor = page.next_cursor;
    render();
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    if (mine !== generation) return;
    if (err.status === 422) {
      showError(form, err);
    } else {
      fill("order-list", h("p", { class: "error", role: "alert" }, t("error.failed", { message: err.message })));
    }
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  rows = [];
  cursor = null;
  toUrl();
  load();
});
document.getElementById("order-filters-clear").addEventListener("click", () => {
  form.reset();
  clearErrors(form);
  rows = [];
  cursor = null;
  toUrl();
  load();
});
more.addEventListener("click", () => load({ append: true }));

// ------------------------------------------------------------------ live

/** Run `fn` at most once per `ms`, soon after the first call, and once after the last. */
function throttle(fn, ms) {
  let timer = null;
  let last = 0;
  return () => {
    if (timer) return;
    const wait = Math.max(250, last + ms - Date.now());
    timer = setTimeout(async () => {
      timer = null;
      last = Date.now();
      await fn();
    }, wait);
  };
}

/** Whether an order event may change what the filters show. */
function admits(event) {
  if (event.type === "order.progress") return false; // changes no column of the list
  if (rows.some((o) => o.order_no === event.order_no)) return true;
  const f = chosen();
  if (f.device_id && event.device_id !== f.device_id) return false;
  for (const name of ["status", "stop_reason", "start_mode"]) {
    if (f[name] && event[name] !== f[name]) return false;
  }
  if (f.device_initiated && String(Boolean(event.device_initiated)) !== f.device_initiated) return false;
  // a new order is created now: outside a window that ended, or starts later
  if (event.type === "order.created") {
    const at = new Date(event.at).getTime();
    if (f.until && at >= new Date(wallToUtc(f.until)).getTime()) return false;
    if (f.since && at < new Date(wallToUtc(f.since)).getTime()) return false;
  }
  return true;
}

const refresh = throttle(() => load(), 1500);
onEvent("order.", (event) => { if (admits(event)) refresh(); });
onReconnect(() => load());

fill("order-zone", t("orders.timezone", { zone: config.timezone }));
fromUrl();
load();
