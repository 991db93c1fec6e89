// An order: its facts, its settlement and pricing, its power and energy over time (chart),
// its timeline, and stop / cancel for keys with the control scope; re-read live when an
// event concerns it, and after the event stream reconnects.
import {
  ApiError, api, badge, config, confirmAction, fill, fmtDuration, fmtMoney, fmtTime, fmtUnit, h,
  hasScope, link, notify, onEvent, onReconnect, showError, t, tv,
} from "../core.js";
import { chartFigure } from "../chart.js";
import { renderTimeline } from "../timeline.js";

const orderNo = config.params.order_no;
const path = `/orders/${encodeURIComponent(orderNo)}`;
const actions = document.getElementById("order-actions");

function fact(label, value) {
  const empty = value === null || value === undefined || value === "" || (Array.isArray(value) && !value.length);
  return [h("dt", {}, label), h("dd", {}, empty ? "–" : value)];
}

function facts(...pairs) {
  return h("dl", { class: "facts" }, pairs.filter(Boolean));
}

const has = (value) => value !== null && value !== undefined;

function limitOf(o) {
  if (o.mode === "time" && has(o.requested_duration_min)) {
    return t("order.limit_time", { limit: fmtUnit(o.requested_duration_min, "min") });
  }
  if (o.mode === "energy" && has(o.requested_energy_kwh)) {
    return t("order.limit_energy", { limit: fmtUnit(o.requested_energy_kwh, "kwh", 2) });
  }
  return o.mode ? tv("charge_mode", o.mode) : null;
}

function stopReasonOf(o) {
  if (!o.stop_reason) return null;
  // the device's own code; its vendor text is in the settlement report below
  const vendor = has(o.stop_reason_code)
    ? h("span", { class: "muted" }, ` (${t("order.stop_code", { code: o.stop_reason_code })})`)
    : null;
  return [h("span", { class: "stop-reason" }, tv("stop_reason", o.stop_reason)), vendor];
}

function renderSummary(o) {
  fill("order-status", badge("order_status", o.status));
  fill("order-summary", facts(
    fact(t("order.status"), badge("order_status", o.status)),
    fact(t("order.device"), link(`/devices/${encodeURIComponent(o.device_id)}`, o.device_id)),
    fact(t("order.port"), String(o.port)),
    fact(t("order.protocol"), tv("protocol", o.protocol)),
    fact(t("order.start_mode"), tv("start_mode", o.start_mode)),
    fact(t("order.device_initiated"), t(o.device_initiated ? "common.yes" : "common.no")),
    fact(t("order.mode"), limitOf(o)),
    has(o.balance_cent) ? fact(t("order.balance"), fmtMoney(o.balance_cent)) : null,
    o.card_id ? fact(t("order.card"), h("span", { class: "hex" }, o.card_id)) : null,
    has(o.business_no) ? fact(t("order.business_no"), String(o.business_no)) : null,
    o.device_ref && o.device_ref !== o.order_no ? fact(t("order.device_ref"), h("span", { class: "hex" }, o.device_ref)) : null,
    fact(t("order.created"), fmtTime(o.created_at)),
    fact(t("order.started"), fmtTime(o.started_at)),
    fact(t("order.ended"), fmtTime(o.ended_at)),
    o.device_ended_at ? fact(t("order.device_ended"), fmtTime(o.device_ended_at)) : null,
    fact(t("order.duration"), fmtDuration(o.duration_s)),
    fact(t("order.energy"), fmtUnit(o.energy_kwh, "kwh", 3)),
    fact(t("order.max_power"), fmtUnit(o.max_power_w, "w", 1)),
    fact(t("order.stop_reason"), stopReasonOf(o)),
    o.failure_reason ? fact(t("order.failure_reason"), h("span", { class: "error" }, o.failure_reason)) : null,
    o.review_reason ? fact(t("order.review_reason"), h("span", { class: "badge warn" }, o.review_reason)) : null,
    fact(t("order.updated"), fmtTime(o.updated_at)),
  ));
}

/** The device's settlement report (the pricing inputs): fields, meanings beside codes. */
function reportTable(report) {
  const entries = Object.entries(report || {}).filter(([key, value]) =>
    has(value) && !(key.endsWith("_text") && key.slice(0, -5) in report));
  if (!entries.length) return h("p", { class: "muted" }, t("order.no_report"));
  return h("table", { class: "report" },
    h("caption", {}, t("order.pricing_inputs")),
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, t("order.field")), h("th", { scope: "col" }, t("order.value")))),
    h("tbody", {}, entries.map(([key, value]) => {
      const meaning = report[`${key}_text`];
      return h("tr", {},
        h("td", {}, h("code", {}, key)),
        h("td", {}, h("code", {}, typeof value === "object" ? JSON.stringify(value) : String(value)),
          has(meaning) ? h("span", { class: "muted" }, ` (${meaning})`) : null));
    })));
}

/** The pricing's own inputs (order_charges.inputs), where the timeline carries them. */
function inputsTable(inputs) {
  const entries = Object.entries(inputs).filter(([, value]) => has(value));
  return h("table", { class: "report" },
    h("caption", {}, t("order.charge_inputs")),
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, t("order.field")), h("th", { scope: "col" }, t("order.value")))),
    h("tbody", {}, entries.map(([key, value]) => h("tr", {},
      h("td", {}, h("code", {}, key)),
      h("td", {}, h("code", {}, typeof value === "object" ? JSON.stringify(value) : String(value)))))));
}

function renderSettlement(o, charge) {
  const settled = o.status === "settled";
  const priced = has(o.amount_cent);
  fill("order-settlement",
    settled ? null : h("p", { class: "muted" }, t("order.not_settled")),
    facts(
      fact(t("order.amount"), priced
        ? h("strong", { class: "amount" }, fmtMoney(o.amount_cent))
        : (settled ? t("order.not_priced") : null)),
      charge ? fact(t("order.plan"), charge.plan || t("order.no_plan")) : null,
      charge && charge.kind ? fact(t("order.plan_kind"), tv("order.plan_kind", charge.kind)) : null,
      charge && o.card_id ? fact(t("order.card_charged"), fmtMoney(charge.card_charged_cent)) : null,
      charge && charge.shortfall_cent ? fact(t("order.shortfall"), h("span", { class: "error" }, fmtMoney(charge.shortfall_cent))) : null,
      o.max_power_source ? fact(t("order.max_power_source"), tv("order.power_source", o.max_power_source)) : null,
      o.pricing_error ? fact(t("order.pricing_error"), h("span", { class: "error" }, o.pricing_error)) : null,
    ),
    charge && charge.inputs ? inputsTable(charge.inputs) : null,
    o.settlement ? reportTable(o.settlement) : (settled ? h("p", { class: "muted" }, t("order.no_report")) : null));
}

function renderChart(samples) {
  const at = (s) => Date.parse(s.at);
  const series = [
    { label: t("order.power"), unit: "w", points: samples.map((s) => [at(s), s.power_w]) },
    { label: t("order.energy_series"), unit: "kwh", points: samples.map((s) => [at(s), s.energy_kwh]) },
  ];
  fill("order-chart", chartFigure({ series, caption: t("order.chart_caption", { order: orderNo }), digits: [1, 3] }));
}

// ------------------------------------------------------------------ stop, cancel

async function act(kind, o) {
  const values = { order: o.order_no, device: o.device_id, port: o.port };
  const ok = await confirmAction(t(`order.${kind}_confirm`, values), t(`order.${kind}`));
  if (!ok) return;
  try {
    if (kind === "stop") {
      await api("POST", `/devices/${encodeURIComponent(o.device_id)}/ports/${o.port}/stop`);
      notify(t("order.stop_sent"));
    } else {
      await api("POST", `${path}/cancel`);
      notify(t("order.cancelled_notice"));
    }
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    showError(actions, err);
  }
  reload();
}

function renderActions(o) {
  if (!hasScope("control")) {
    actions.hidden = true;
    document.getElementById("actions-h").hidden = true;
    return;
  }
  const buttons = [];
  if (["starting", "charging"].includes(o.status)) {
    buttons.push(h("button", { type: "button", class: "danger", onclick: () => act("stop", o) }, t("order.stop")));
  }
  if (o.status === "pending") {
    buttons.push(h("button", { type: "button", class: "danger", onclick: () => act("cancel", o) }, t("order.cancel")));
  }
  // keep a refusal shown until the next action
  const shown = actions.querySelector(".form-error");
  fill(actions, buttons.length ? buttons : h("p", { class: "muted" }, t("order.no_actions")), shown);
}

// ------------------------------------------------------------------ loading

let generation = 0;

async function load() {
  const mine = ++generation;
  let order;
  let samples;
  let timeline;
  try {
    [order, samples, timeline] = await Promise.all([
      api("GET", path),
      api("GET", `${path}/samples`),
      api("GET", `${path}/timeline`),
    ]);
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    if (mine !== generation) return;
    fill("order-problem", h("p", { class: "error", role: "alert" }, err.status === 404 ? err.message : t("error.failed", { message: err.message })));
    if (err.status === 404) {
      for (const id of ["order-summary", "order-settlement", "order-chart", "order-timeline"]) fill(id);
      actions.hidden = true;
    }
    return;
  }
  if (mine !== generation) return;
  fill("order-problem");
  const settlement = timeline.items.find((i) => i.kind === "settlement");
  renderSummary(order);
  renderSettlement(order, settlement && settlement.data ? settlement.data.charge : null);
  renderActions(order);
  renderChart(samples.items);
  renderTimeline(document.getElementById("order-timeline"), timeline.items, {
    truncated: timeline.truncated, limit: timeline.limit,
  });
}

/** Run `fn` at most once per `ms`, soon after the first call, and once after the last. */
function throttle(fn, ms) {
  let timer = null;
  let last = 0;
  return () => {
    if (timer) return;
    const wait = Math.max(200, last + ms - Date.now());
    timer = setTimeout(async () => {
      timer = null;
      last = Date.now();
      await fn();
    }, wait);
  };
}

const reload = throttle(load, 1000);
onEvent(["order.", "command."], (event) => {
  if (event.order_no && event.order_no.toUpperCase() === orderNo.toUpperCase()) reload();
});
onReconnect(() => load());
load();
