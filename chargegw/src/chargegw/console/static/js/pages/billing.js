// Billing: the card registry (search, create, top up, block, unblock, a card's ledger),
// rate plans (list, create per kind, a device's plan) and the daily reconciliation with
// its CSV. Everything goes through the API; live updates refresh the card shown and
// today's reconciliation.
//
// Money is entered in yuan: an input marked `data-money` holds yuan and is sent in cents.
// Inputs are named after the API's fields, so an API error lands next to its input.
import {
  ApiError, api, config, confirmAction, debounce, fill, fmtDuration, fmtMoney, fmtTime, fmtUnit,
  h, hasScope, link, notify, onEvent, onReconnect, onSubmit, setupTabs, t, table, tv,
} from "../core.js";

const PAGE = 100;

// ------------------------------------------------------------------ helpers

/** A badge coloured by `kind` (ok, off, warn, bad) with the translated value. */
function statusBadge(group, value, kind) {
  return h("span", { class: `badge ${kind}` }, tv(group, value));
}

/** Yuan as typed ("12.5") in whole cents (1250); undefined for an empty input. */
function cents(text) {
  if (text === undefined || text === null || String(text).trim() === "") return undefined;
  const value = Number(text);
  return Number.isFinite(value) ? Math.round(value * 100) : Number.NaN;
}

/** Signed money: "+¥5.00", "-¥1.20". */
function fmtSigned(amount) {
  return `${amount < 0 ? "-" : "+"}${fmtMoney(Math.abs(amount))}`;
}

/** The form's values by input name: trimmed text, numbers for number inputs, cents for
 * `data-money` inputs, checkboxes as booleans; empty inputs left out. */
function readForm(form) {
  const out = {};
  for (const el of form.elements) {
    if (!el.name || el.disabled || el.tagName === "FIELDSET" || el.tagName === "BUTTON") continue;
    if (el.type === "checkbox") { out[el.name] = el.checked; continue; }
    const value = el.value.trim();
    if (value === "") continue;
    if (el.hasAttribute("data-money")) out[el.name] = cents(value);
    else if (el.type === "number") out[el.name] = Number(value);
    else out[el.name] = value;
  }
  return out;
}

/** The input of `form` an API field names: `tiers[1].price_cent` is `tiers_1_price_cent`;
 * a deeper field falls back to its parent's input; `aliases` map other names. */
function inputName(form, field, aliases = {}) {
  if (!field) return null;
  const path = String(field).replace(/^body\./, "").replace(/\[(\d+)\]/g, ".$1").split(".");
  for (let n = path.length; n > 0; n -= 1) {
    const name = path.slice(0, n).join("_");
    const candidate = aliases[name] || name;
    if (form.querySelector(`[name="${CSS.escape(candidate)}"]`)) return candidate;
  }
  return null;
}

/** Run `call`; an API error is rewritten to name this form's inputs, then rethrown for
 * onSubmit to show next to them. */
async function withFields(form, call, aliases = {}) {
  try {
    return await call();
  } catch (err) {
    if (err instanceof ApiError) {
      const name = inputName(form, err.field, aliases);
      err.field = name;
      err.details = err.details.map((d) => ({ ...d, field: inputName(form, d.field, aliases) }));
    }
    throw err;
  }
}

function errorBox(err) {
  return h("p", { class: "error", role: "alert" }, err.message);
}

function todayUtc() {
  return new Date().toISOString().slice(0, 10);
}

// ------------------------------------------------------------------ tabs

setupTabs();

// ------------------------------------------------------------------ cards

const cardSearch = document.getElementById("card-search");
const cardMoreRow = document.getElementById("card-more-row");
let cards = [];
let cardCursor = null;
let shownCard = null; // the card id of the detail shown

function cardQuery() {
  const q = cardSearch.elements.q.value.trim();
  return { q: q || null, status: cardSearch.elements.status.value || null };
}

function renderCards() {
  fill("card-list", table([
    { key: "card_id", label: t("billing.card.id"), render: (c) => h("button", {
        type: "button", class: "link hex", "data-card": c.card_id, onclick: () => showCard(c.card_id),
      }, c.card_id) },
    { key: "holder", label: t("billing.card.holder"), render: (c) => c.holder ?? "–" },
    { key: "status", label: t("billing.card.status"),
      render: (c) => statusBadge("card_status", c.status, c.status === "active" ? "ok" : "bad") },
    { key: "balance_cent", label: t("billing.card.balance"), num: true, render: (c) => fmtMoney(c.balance_cent) },
    { key: "updated_at", label: t("billing.card.updated"), render: (c) => fmtTime(c.updated_at) },
  ], cards, {
    empty: t("billing.card.none"),
    rowAttrs: (c) => ({ "data-card-row": c.card_id, "aria-current": c.card_id === shownCard ? "true" : null }),
  }));
  cardMoreRow.hidden = !cardCursor;
}

async function loadCards(append = false) {
  try {
    const page = await api("GET", "/cards", {
      query: { ...cardQuery(), cursor: append ? cardCursor : null, limit: PAGE },
    });
    cards = append ? cards.concat(page.items) : page.items;
    cardCursor = page.next_cursor;
    renderCards();
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    fill("card-list", errorBox(err));
    cardMoreRow.hidden = true;
  }
}

cardSearch.addEventListener("submit", (event) => {
  event.preventDefault();
  loadCards();
});
document.getElementById("card-more").addEventListener("click", () => loadCards(true));

/** The card's row of the list, updated in place (a top-up, a block). */
function updateRow(card) {
  const index = cards.findIndex((c) => c.card_id === card.card_id);
  if (index >= 0) {
    const { transactions, replayed, ...row } = card;
    cards[index] = row;
    renderCards();
  }
}

function fact(label, value) {
  return [h("dt", {}, label), h("dd", {}, value ?? "–")];
}

function renderCard(card) {
  const active = card.status === "active";
  const topUp = h("form", { id: "top-up", novalidate: true },
    h("label", { for: "tu-amount" }, t("billing.card.top_up_amount"),
      h("input", { id: "tu-amount", name: "amount_cent", type: "number", min: "0.01", step: "0.01",
                   inputmode: "decimal", "data-money": true, required: true })),
    h("label", { for: "tu-reference" }, t("billing.card.reference"),
      h("input", { id: "tu-reference", name: "reference", autocomplete: "off" })),
    h("button", { type: "submit", class: "primary" }, t("billing.card.top_up")));
  onSubmit(topUp, () => withFields(topUp, () => api(
    "POST", `/cards/${encodeURIComponent(card.card_id)}/top-up`, { body: readForm(topUp) },
  )), (result) => {
    notify(result.replayed
      ? t("billing.card.top_up_replayed", { card: result.card_id })
      : t("billing.card.topped_up", { card: result.card_id, balance: fmtMoney(result.balance_cent) }));
    topUp.reset();
    updateRow(result);
    return showCard(card.card_id);
  });

  const toggle = h("button", {
    type: "button", id: active ? "card-block" : "card-unblock", class: active ? "danger" : null,
    onclick: () => (active ? blockCard(card) : unblockCard(card)),
  }, t(active ? "billing.card.block" : "billing.card.unblock"));

  fill("card-detail-body",
    h("dl", { class: "facts", id: "card-facts" },
      fact(t("billing.card.id"), h("span", { class: "hex" }, card.card_id)),
      fact(t("billing.card.holder"), card.holder),
      fact(t("billing.card.status"),
        statusBadge("card_status", card.status, active ? "ok" : "bad")),
      fact(t("billing.card.balance"), h("span", { class: "balance", id: "card-balance" }, fmtMoney(card.balance_cent))),
      fact(t("billing.card.created"), fmtTime(card.created_at)),
      fact(t("billing.card.updated"), fmtTime(card.updated_at))),
    active ? null : h("p", { class: "notice bad" }, t("billing.card.blocked_note")),
    hasScope("billing") ? h("div", { class: "card-actions" }, topUp, toggle) : null,
    table([
      { key: "at", label: t("billing.tx.at"), render: (x) => fmtTime(x.at) },
      { key: "kind", label: t("billing.tx.kind"), render: (x) => tv("card_tx", x.kind) },
      { key: "amount_cent", label: t("billing.tx.amount"), num: true, render: (x) => fmtSigned(x.amount_cent) },
      { key: "balance_after_cent", label: t("billing.tx.balance_after"), num: true, render: (x) => fmtMoney(x.balance_after_cent) },
      { key: "shortfall_cent", label: t("billing.tx.shortfall"), num: true,
        render: (x) => (x.shortfall_cent ? fmtMoney(x.shortfall_cent) : "–") },
      { key: "order_no", label: t("billing.tx.order"),
        render: (x) => (x.order_no ? link(`/orders/${encodeURIComponent(x.order_no)}`, x.order_no) : "–") },
      { key: "reference", label: t("billing.tx.reference"), render: (x) => x.reference ?? "–" },
    ], card.transactions, { empty: t("billing.tx.none"), caption: t("billing.card.transactions") }));
}

async function showCard(cardId) {
  shownCard = cardId;
  if (cards.some((c) => c.card_id === cardId)) renderCards();
  try {
    const card = await api("GET", `/cards/${encodeURIComponent(cardId)}`);
    if (shownCard !== cardId) return; // another card was picked meanwhile
    renderCard(card);
    updateRow(card);
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    fill("card-detail-body", errorBox(err));
  }
}

async function setStatus(card, action, done) {
  try {
    const result = await api("POST", `/cards/${encodeURIComponent(card.card_id)}/${action}`);
    notify(t(done, { card: result.card_id }));
    updateRow(result);
    await showCard(card.card_id);
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    notify(t("error.failed", { message: err.message }), "bad");
  }
}

async function blockCard(card) {
  const ok = await confirmAction(
    t("billing.card.block_confirm", { card: card.card_id, holder: card.holder || t("common.none") }),
    t("billing.card.block"));
  if (ok) await setStatus(card, "block", "billing.card.blocked");
}

async function unblockCard(card) {
  await setStatus(card, "unblock", "billing.card.unblocked");
}

const cardCreate = document.getElementById("card-create");
onSubmit(cardCreate, () => withFields(cardCreate, () => api("POST", "/cards", { body: readForm(cardCreate) })),
  async (card) => {
    notify(t("billing.card.created_notice", { card: card.card_id }));
    cardCreate.reset();
    await loadCards();
    await showCard(card.card_id);
  });

// ------------------------------------------------------------------ rate plans

let plans = [];

function perUnit(mode) {
  return t(mode === "time" ? "billing.plan.per_hour_unit" : "billing.plan.per_kwh_unit");
}

function planSummary(plan) {
  const p = plan.parameters || {};
  switch (plan.kind) {
    case "per_hour":
      return `${fmtMoney(p.cent_per_hour)}${t("billing.plan.per_hour_unit")}`;
    case "per_kwh":
      return `${fmtMoney(p.cent_per_kwh)}${t("billing.plan.per_kwh_unit")}`;
    case "power_tier":
      return h("ul", { class: "plain" }, (p.tiers || []).map((tier) => h("li", {},
        t("billing.plan.power_tier_item", {
          power: fmtUnit(tier.power_w, "w"), price: fmtMoney(tier.price_cent),
          minutes: fmtUnit(tier.duration_min, "min"),
        }))));
    case "fee_tier":
      return h("div", {},
        h("div", { class: "muted" }, t("billing.plan.fee_tier_head", {
          mode: tv("service_fee_mode", p.service_fee_mode), offset: utcOffset(p.utc_offset_min || 0),
        })),
        h("ul", { class: "plain" }, (p.tiers || []).map((tier) => h("li", {},
          t("billing.plan.fee_tier_item", {
            until: tier.until,
            electricity: `${fmtMoney(tier.electricity_cent_per_kwh)}${t("billing.plan.per_kwh_unit")}`,
            service: `${fmtMoney(tier.service_cent)}${perUnit(p.service_fee_mode)}`,
          })))));
    default:
      return JSON.stringify(p);
  }
}

function utcOffset(minutes) {
  const sign = minutes < 0 ? "-" : "+";
  const m = Math.abs(minutes);
  return `UTC${sign}${String(Math.floor(m / 60)).padStart(2, "0")}:${String(m % 60).padStart(2, "0")}`;
}

function renderPlans() {
  fill("plan-list", table([
    { key: "name", label: t("billing.plan.name"), render: (p) => h("span", { class: "hex" }, p.name) },
    { key: "kind", label: t("billing.plan.kind"), render: (p) => tv("plan_kind", p.kind) },
    { key: "parameters", label: t("billing.plan.prices"), render: planSummary },
    { key: "min_start_cent", label: t("billing.plan.min_start"), num: true,
      render: (p) => fmtMoney(p.parameters.min_start_cent ?? 1) },
    { key: "created_at", label: t("billing.plan.created"), render: (p) => fmtTime(p.created_at) },
  ], plans, { empty: t("billing.plan.none"), rowAttrs: (p) => ({ "data-plan": p.name }) }));
  const select = document.getElementById("dp-plan");
  const chosen = select.value;
  fill(select, plans.map((p) => h("option", { value: p.name, selected: p.name === chosen },
    `${p.name} (${tv("plan_kind", p.kind)})`)));
}

async function loadPlans() {
  try {
    plans = (await api("GET", "/rate-plans")).items;
    renderPlans();
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    fill("plan-list", errorBox(err));
  }
}

// the fields of the chosen kind
const planForm = document.getElementById("plan-create");
const kindFields = document.getElementById("plan-kind-fields");
const MAX_TIERS = 5;

/** A label holding its input, for a `.toolbar` row. */
function field(id, name, label, attrs = {}) {
  return h("label", { for: id }, label, h("input", { id, name, ...attrs }));
}

function moneyField(id, name, label) {
  return field(id, name, label, { type: "number", min: "0", step: "0.01", inputmode: "decimal", "data-money": true });
}

function tierFieldset(kind, index) {
  const n = `tiers_${index}`;
  const id = `pc-${n}`;
  const fields = kind === "power_tier"
    ? [
        h("label", { for: `${id}-power` }, t("billing.plan.tier_power"),
          h("input", { id: `${id}-power`, name: `${n}_power_w`, type: "number", min: "0", step: "any", size: 8 })),
        h("label", { for: `${id}-price` }, t("billing.plan.tier_price"),
          h("input", { id: `${id}-price`, name: `${n}_price_cent`, type: "number", min: "0", step: "0.01", "data-money": true, size: 8 })),
        h("label", { for: `${id}-duration` }, t("billing.plan.tier_duration"),
          h("input", { id: `${id}-duration`, name: `${n}_duration_min`, type: "number", min: "1", step: "1", size: 6 })),
      ]
    : [
        h("label", { for: `${id}-until` }, t("billing.plan.tier_until"),
          h("input", { id: `${id}-until`, name: `${n}_until`, placeholder: "HH:MM", size: 6, autocomplete: "off" })),
        h("label", { for: `${id}-electricity` }, t("billing.plan.tier_electricity"),
          h("input", { id: `${id}-electricity`, name: `${n}_electricity_cent_per_kwh`, type: "number", min: "0", step: "0.01", "data-money": true, size: 8 })),
        h("label", { for: `${id}-service` },
          t(serviceMode() === "time" ? "billing.plan.tier_service_time" : "billing.plan.tier_service_energy"),
          h("input", { id: `${id}-service`, name: `${n}_service_cent`, type: "number", min: "0", step: "0.01", "data-money": true, size: 8 })),
      ];
  return h("fieldset", { class: "tier", "data-tier": index },
    h("legend", {}, t("billing.plan.tier", { n: index + 1 })),
    h("div", { class: "toolbar" }, fields,
      h("button", { type: "button", class: "link", onclick: () => removeTier(index) },
        t("billing.plan.remove_tier", { n: index + 1 }))));
}

function serviceMode() {
  const select = document.getElementById("pc-mode");
  return select ? select.value : "energy";
}

function tierValues() {
  return [...kindFields.querySelectorAll("fieldset.tier")].map((set) =>
    Object.fromEntries([...set.querySelectorAll("input")].map((i) => [i.name.replace(/^tiers_\d+_/, ""), i.value])));
}

function renderTiers(kind, values) {
  const holder = document.getElementById("plan-tiers");
  fill(holder, values.map((_, i) => tierFieldset(kind, i)));
  values.forEach((v, i) => {
    for (const [name, value] of Object.entries(v)) {
      const input = holder.querySelector(`[name="tiers_${i}_${name}"]`);
      if (input) input.value = value;
    }
  });
  document.getElementById("plan-add-tier").disabled = values.length >= MAX_TIERS;
}

function addTier() {
  const values = tierValues();
  if (values.length < MAX_TIERS) renderTiers(planForm.elements.kind.value, [...values, {}]);
}

function removeTier(index) {
  const values = tierValues();
  values.splice(index, 1);
  renderTiers(planForm.elements.kind.value, values.length ? values : [{}]);
}

function siteOffsetMinutes() {
  return Math.round(zoneOffsetMs(new Date()) / 60000);
}

function renderKindFields() {
  const kind = planForm.elements.kind.value;
  if (kind === "per_hour" || kind === "per_kwh") {
    const name = kind === "per_hour" ? "cent_per_hour" : "cent_per_kwh";
    fill(kindFields, h("div", { class: "toolbar" },
      moneyField("pc-price", name, t(kind === "per_hour" ? "billing.plan.yuan_per_hour" : "billing.plan.yuan_per_kwh"))));
    return;
  }
  const head = kind === "fee_tier"
    ? h("div", { class: "toolbar" },
        h("label", { for: "pc-mode" }, t("billing.plan.service_fee_mode"),
          h("select", { id: "pc-mode", name: "service_fee_mode",
                        onchange: () => renderTiers(kind, tierValues()) },
            h("option", { value: "energy" }, tv("service_fee_mode", "energy")),
            h("option", { value: "time" }, tv("service_fee_mode", "time")))),
        field("pc-offset", "utc_offset_min", t("billing.plan.utc_offset"),
          { type: "number", step: "1", min: "-720", max: "840", value: String(siteOffsetMinutes()) }))
    : null;
  fill(kindFields,
    head,
    h("fieldset", { name: "tiers", id: "plan-tiers-set", class: "plain" },
      h("legend", {}, t("billing.plan.tiers")),
      h("p", { class: "muted" }, t(kind === "fee_tier" ? "billing.plan.fee_tier_help" : "billing.plan.power_tier_help")),
      h("div", { id: "plan-tiers" })),
    h("p", {}, h("button", { type: "button", id: "plan-add-tier", onclick: addTier }, t("billing.plan.add_tier"))));
  renderTiers(kind, [{}]);
}

function planBody(values) {
  const kind = values.kind;
  const parameters = {};
  if (values.min_start_cent !== undefined) parameters.min_start_cent = values.min_start_cent;
  if (kind === "per_hour") parameters.cent_per_hour = values.cent_per_hour;
  else if (kind === "per_kwh") parameters.cent_per_kwh = values.cent_per_kwh;
  else {
    const tiers = [];
    for (let i = 0; i < MAX_TIERS; i += 1) {
      const prefix = `tiers_${i}_`;
      const tier = {};
      let present = false;
      for (const [name, value] of Object.entries(values)) {
        if (name.startsWith(prefix)) { tier[name.slice(prefix.length)] = value; present = true; }
      }
      if (present || planForm.querySelector(`[data-tier="${i}"]`)) tiers.push(tier);
    }
    parameters.tiers = tiers;
    if (kind === "fee_tier") {
      parameters.service_fee_mode = values.service_fee_mode;
      if (values.utc_offset_min !== undefined) parameters.utc_offset_min = values.utc_offset_min;
    }
  }
  return { name: values.name, kind, parameters };
}

planForm.elements.kind.addEventListener("change", renderKindFields);
onSubmit(planForm, () => withFields(planForm, () => api("POST", "/rate-plans", { body: planBody(readForm(planForm)) })),
  async (plan) => {
    notify(t("billing.plan.created_notice", { name: plan.name }));
    planForm.elements.name.value = "";
    await loadPlans();
  });
renderKindFields();

// a device's plan
const devicePlan = document.getElementById("device-plan");
const currentPlan = document.getElementById("device-plan-current");

async function showDevicePlan() {
  const deviceId = devicePlan.elements.device_id.value.trim();
  if (!deviceId) { currentPlan.textContent = ""; return; }
  try {
    const plan = await api("GET", `/devices/${encodeURIComponent(deviceId)}/rate-plan`);
    currentPlan.textContent = t("billing.device_plan.current", { device: deviceId, plan: plan.plan, kind: tv("plan_kind", plan.kind) });
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    currentPlan.textContent = err.status === 404 ? t("billing.device_plan.none", { device: deviceId }) : err.message;
  }
}

devicePlan.elements.device_id.addEventListener("input", debounce(showDevicePlan, 400));
onSubmit(devicePlan, () => withFields(devicePlan, async () => {
  const values = readForm(devicePlan);
  if (!values.device_id) {
    throw new ApiError(422, { error: { message: t("billing.device_plan.need_device"), field: "device_id" } });
  }
  try {
    return await api("PUT", `/devices/${encodeURIComponent(values.device_id)}/rate-plan`, { body: { plan: values.plan } });
  } catch (err) {
    // "no such device" names no field: it is the device input's
    if (err instanceof ApiError && !err.field && err.status === 404) err.field = "device_id";
    throw err;
  }
}), async (result) => {
  notify(t("billing.device_plan.saved", { device: result.device_id, plan: result.plan }));
  await showDevicePlan();
});

async function loadDevices() {
  if (!hasScope("read")) return;
  try {
    const page = await api("GET", "/devices", { query: { limit: 1000 } });
    fill("dp-devices", page.items.map((d) => h("option", { value: d.device_id })));
  } catch (err) {
    if (!(err instanceof ApiError)) throw err; // the list is a convenience only
  }
}

// ------------------------------------------------------------------ reconciliation

const reconForm = document.getElementById("recon-day");
const reconDate = reconForm.elements.date;
reconDate.value = new URLSearchParams(location.search).get("date") || todayUtc();

function tile(label, value, id) {
  return h("div", { class: "tile", id },
    h("div", { class: "label" }, label), h("div", { class: "value" }, value));
}

const REASONS = {
  "no rate plan for the device": "billing.recon.no_plan",
  "not priced": "billing.recon.not_priced",
};

function pricing(item) {
  const x = item.inputs || {};
  const parts = [];
  if (!x.kind && x.reason) parts.push(REASONS[x.reason] ? t(REASONS[x.reason]) : x.reason);
  if (x.billed_minutes !== undefined) parts.push(fmtUnit(x.billed_minutes, "min"));
  if (x.billed_centi_kwh !== undefined) parts.push(fmtUnit(x.billed_centi_kwh / 100, "kwh", 2));
  if (x.tier !== undefined) parts.push(t("billing.recon.tier", { n: x.tier + 1 }));
  if (x.electricity_cent !== undefined) {
    parts.push(t("billing.recon.fee_split", { electricity: fmtMoney(x.electricity_cent), service: fmtMoney(x.service_cent) }));
  }
  return h("div", {},
    parts.join(" · ") || "–",
    h("details", { class: "inputs" },
      h("summary", {}, t("billing.recon.inputs")),
      h("pre", {}, JSON.stringify(x, null, 2))));
}

function csvHref(day) {
  return `/api/v1/reports/reconciliation?${new URLSearchParams({ date: day, format: "csv" })}`;
}

async function loadReconciliation() {
  const day = reconDate.value;
  const csv = document.getElementById("recon-csv");
  if (!day) return;
  csv.setAttribute("href", csvHref(day));
  csv.setAttribute("download", `reconciliation-${day}.csv`);
  let report;
  try {
    report = await api("GET", "/reports/reconciliation", { query: { date: day } });
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    fill("recon-totals");
    fill("recon-list", errorBox(err));
    return;
  }
  const tot = report.totals;
  fill("recon-totals",
    tile(t("billing.recon.orders"), String(tot.orders), "recon-orders"),
    tile(t("billing.recon.amount"), fmtMoney(tot.amount_cent), "recon-amount"),
    tile(t("billing.recon.card_charged"), fmtMoney(tot.card_charged_cent), "recon-card-charged"),
    tile(t("billing.recon.shortfall"), fmtMoney(tot.shortfall_cent), "recon-shortfall"),
    tile(t("billing.recon.other"), fmtMoney(tot.amount_cent - tot.card_charged_cent - tot.shortfall_cent), "recon-other"));
  const lines = (...parts) => parts.map((part, i) => (i ? [h("br"), part] : part));
  fill("recon-list", h("div", { class: "scroll" }, table([
    { key: "order_no", label: t("billing.recon.order"),
      render: (o) => h("a", { class: "hex", href: `/console/orders/${encodeURIComponent(o.order_no)}` }, o.order_no) },
    { key: "device_id", label: t("billing.recon.device"),
      render: (o) => [link(`/devices/${encodeURIComponent(o.device_id)}`, o.device_id), ` #${o.port}`] },
    { key: "start_mode", label: t("billing.recon.start_mode"),
      render: (o) => lines(tv("billing_start_mode", o.start_mode), ...(o.card_id ? [h("span", { class: "hex" }, o.card_id)] : [])) },
    { key: "time", label: t("billing.recon.time"), render: (o) => lines(fmtTime(o.started_at), fmtTime(o.ended_at)) },
    { key: "plan", label: t("billing.recon.plan"),
      render: (o) => (o.plan ? lines(o.plan, tv("plan_kind", o.kind)) : t("common.none")) },
    { key: "usage", label: t("billing.recon.usage"), num: true,
      render: (o) => lines(fmtDuration(o.duration_s), fmtUnit(o.energy_kwh, "kwh", 2), fmtUnit(o.max_power_w, "w")) },
    { key: "amount_cent", label: t("billing.recon.amount"), num: true, render: (o) => fmtMoney(o.amount_cent) },
    { key: "card_charged_cent", label: t("billing.recon.card_charged"), num: true, render: (o) => fmtMoney(o.card_charged_cent) },
    { key: "shortfall_cent", label: t("billing.recon.shortfall"), num: true, render: (o) => fmtMoney(o.shortfall_cent) },
    { key: "inputs", label: t("billing.recon.pricing"), render: pricing },
  ], report.items, {
    empty: t("billing.recon.none"),
    caption: t("billing.recon.caption", { date: report.date, currency: report.currency }),
    rowAttrs: (o) => ({ "data-order": o.order_no }),
  })));
}

reconForm.addEventListener("submit", (event) => {
  event.preventDefault();
  loadReconciliation();
});
reconDate.addEventListener("change", loadReconciliation);

// ------------------------------------------------------------------ time zone

/** How far the site's time zone is ahead of UTC at `date`, in ms. */
function zoneOffsetMs(date) {
  const parts = Object.fromEntries(new Intl.DateTimeFormat("en-US", {
    timeZone: config.timezone, hourCycle: "h23", year: "numeric", month: "2-digit", day: "2-digit",
    hour: "2-digit", minute: "2-digit", second: "2-digit",
  }).formatToParts(date).map((p) => [p.type, p.value]));
  const wall = Date.UTC(+parts.year, +parts.month - 1, +parts.day, +parts.hour, +parts.minute, +parts.second);
  return wall - Math.floor(date.getTime() / 1000) * 1000;
}

// ------------------------------------------------------------------ live

const reloadCard = debounce(() => { if (shownCard) showCard(shownCard); }, 300);
const reloadReconciliation = debounce(() => {
  if (reconDate.value === todayUtc()) loadReconciliation();
}, 1000);

function cardOf(event) {
  return (event.data && event.data.card_id) || event.card_id || null;
}

/** Whether the card number of an event is `card`: events mask the middle of a swipe's
 * number ("0A*****D"), so the visible digits and the length must match. */
function sameCard(eventCard, card) {
  if (!eventCard || !card) return false;
  const text = String(eventCard).toUpperCase();
  return text.length === card.length && [...text].every((c, i) => c === "*" || c === card[i]);
}

if (hasScope("read")) {
  // the event stream needs the read scope; without it the page shows what it loads
  onEvent(["card.swipe_accepted", "card.swipe_refused"], (event) => {
    if (sameCard(cardOf(event), shownCard)) reloadCard();
  });
  onEvent(["order.settled"], (event) => {
    reloadReconciliation();
    if (sameCard(cardOf(event), shownCard)) reloadCard();
  });
  onReconnect(() => {
    loadCards();
    loadPlans();
    loadReconciliation();
    if (shownCard) showCard(shownCard);
  });
}

loadCards();
loadPlans();
loadDevices();
loadReconciliation();
