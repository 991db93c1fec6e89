// Administration: API keys (create, rotate, revoke; a new key is shown once), webhook
// subscriptions (create, enable/disable, test ping, delivery log and retries, delete),
// bans (lift), the cluster's processes and the audit trail of API calls. Everything goes
// through the API; ban and webhook events refresh their sections live.
import {
  ApiError, api, clearErrors, config, confirmAction, debounce, fill, fmtTime, h, link, notify,
  onEvent, onReconnect, onSubmit, setupTabs, showError, t, table, tv,
} from "../core.js";

const PAGE = 100;

// ------------------------------------------------------------------ helpers

function statusBadge(group, value, kind) {
  return h("span", { class: `badge ${kind}` }, tv(group, value));
}

function errorBox(err) {
  return h("p", { class: "error", role: "alert" }, err.message);
}

/** A list typed as "A, B C" (commas, Chinese commas or spaces): its items; none: undefined. */
function listOf(text) {
  const items = String(text || "").split(/[\s,，、;；]+/).map((s) => s.trim()).filter(Boolean);
  return items.length ? items : undefined;
}

/** The input of `form` an API field names (`allowed_device_ids.0` is `allowed_device_ids`);
 * `aliases` map API names to other input names. */
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

/** Run `call`; an API error is rewritten to name this form's inputs and rethrown. */
async function withFields(form, call, aliases = {}) {
  try {
    return await call();
  } catch (err) {
    if (err instanceof ApiError) {
      err.field = inputName(form, err.field, aliases);
      err.details = err.details.map((d) => ({ ...d, field: inputName(form, d.field, aliases) }));
    }
    throw err;
  }
}

function failed(err) {
  if (!(err instanceof ApiError)) throw err;
  notify(t("error.failed", { message: err.message }), "bad");
}

function actions(...buttons) {
  return h("div", { class: "row-actions" }, buttons.filter(Boolean));
}

function button(text, onclick, attrs = {}) {
  return h("button", { type: "button", onclick, ...attrs }, text);
}

/**
 * A keyset-paged list: `load()` reads the first page, the "more" button the next ones.
 * `render(rows)` gives the list's content; `onError(err)` may take a refusal (true).
 */
function pagedList({ name, path, query = () => ({}), render, onError = () => false }) {
  const list = { rows: [], cursor: null };
  const moreRow = document.getElementById(`${name}-more-row`);
  list.render = () => fill(`${name}-list`, render(list.rows));
  list.load = async (append = false) => {
    try {
      const page = await api("GET", path(), {
        query: { ...query(), cursor: append ? list.cursor : null, limit: PAGE },
      });
      list.rows = append ? list.rows.concat(page.items) : page.items;
      list.cursor = page.next_cursor;
      list.render();
      moreRow.hidden = !list.cursor;
    } catch (err) {
      if (!(err instanceof ApiError)) throw err;
      if (onError(err)) return;
      fill(`${name}-list`, errorBox(err));
      moreRow.hidden = true;
    }
  };
  document.getElementById(`${name}-more`).addEventListener("click", () => list.load(true));
  return list;
}

/** A secret shown once, in `holder`: its title, the warning, the value to copy. */
function showSecret(holder, { title, note, value, label, extra = null }) {
  const id = `${holder}-value`;
  const input = h("input", { id, class: "hex secret-value", readonly: true, value, size: Math.min(80, value.length + 2) });
  const copy = async () => {
    try {
      await navigator.clipboard.writeText(value);
    } catch {
      input.select();
      document.execCommand("copy"); // plain http: no clipboard API
    }
    notify(t("admin.secret.copied"));
  };
  fill(holder, h("div", { class: "card secret", role: "status" },
    h("h3", {}, title),
    h("p", { class: "notice bad" }, note),
    extra ? h("p", {}, extra) : null,
    h("label", { for: id }, label), " ", input,
    h("div", { class: "actions" },
      button(t("admin.secret.copy"), copy, { class: "primary" }),
      button(t("admin.secret.done"), () => fill(holder)))));
  input.focus();
  input.select();
}

// ------------------------------------------------------------------ tabs

setupTabs();

// ------------------------------------------------------------------ API keys

const KEY_BADGE = { active: "ok", expired: "off", revoked: "bad" };
const ownKey = (k) => String(k.key_id) === String(config.key.id);

function keyLimits(k) {
  const parts = [];
  if (k.allowed_device_ids) parts.push(t("admin.key.limit_devices", { ids: k.allowed_device_ids.join(", ") }));
  if (k.allowed_gateway_ids) parts.push(t("admin.key.limit_gateways", { ids: k.allowed_gateway_ids.join(", ") }));
  if (k.allowed_networks) parts.push(t("admin.key.limit_networks", { nets: k.allowed_networks.join(", ") }));
  if (k.hmac_required) parts.push(t("admin.key.limit_hmac"));
  return parts.length ? h("ul", { class: "plain" }, parts.map((p) => h("li", {}, p))) : t("admin.key.unlimited");
}

const keys = pagedList({
  name: "key",
  path: () => "/api-keys",
  render: (rows) => table([
    { key: "key_id", label: t("admin.key.id"), num: true, render: (k) => `#${k.key_id}` },
    { key: "name", label: t("admin.key.name"), render: (k) => [k.name,
        ownKey(k) ? [" ", h("span", { class: "badge warn" }, t("admin.key.this_session"))] : null] },
    { key: "prefix", label: t("admin.key.prefix"), render: (k) => (k.prefix ? h("code", {}, `${k.prefix}…`) : "–") },
    { key: "scopes", label: t("admin.key.scopes"), render: (k) => k.scopes.map((s) => tv("key_scope", s)).join(t("admin.list_sep")) },
    { key: "limits", label: t("admin.key.limits"), render: keyLimits },
    { key: "expires_at", label: t("admin.key.expires"), render: (k) => (k.expires_at ? fmtTime(k.expires_at) : t("admin.key.never")) },
    { key: "last_used_at", label: t("admin.key.last_used"), render: (k) => fmtTime(k.last_used_at) },
    { key: "status", label: t("admin.key.status"), render: (k) => statusBadge("key_status", k.status, KEY_BADGE[k.status] || "off") },
    { key: "created_at", label: t("admin.key.created"), render: (k) => fmtTime(k.created_at) },
    { key: "actions", label: t("admin.actions"), render: (k) => (k.status === "active" ? actions(
        button(t("admin.key.rotate"), () => rotateKey(k), { "data-action": "rotate" }),
        button(t("admin.key.revoke"), () => revokeKey(k), { class: "danger", "data-action": "revoke" })) : "–") },
  ], rows, { empty: t("admin.key.none"), rowAttrs: (k) => ({ "data-key": k.key_id }) }),
});

async function rotateKey(k) {
  const ok = await confirmAction(t("admin.key.rotate_confirm", { name: k.name, id: k.key_id }), t("admin.key.rotate"));
  if (!ok) return;
  try {
    const made = await api("POST", `/api-keys/${k.key_id}/rotate`, { body: {} });
    showSecret("key-secret", {
      title: t("admin.key.new_title", { name: made.name, id: made.key_id }),
      note: t("admin.key.copy_once"),
      label: t("admin.key.new_key"),
      value: made.key,
      extra: t("admin.key.rotated_note", { id: k.key_id, at: fmtTime(made.previous_expires_at) }),
    });
    await keys.load();
  } catch (err) {
    failed(err);
  }
}

async function revokeKey(k) {
  const message = t("admin.key.revoke_confirm", { name: k.name, id: k.key_id })
    + (ownKey(k) ? ` ${t("admin.key.revoke_own")}` : "");
  if (!(await confirmAction(message, t("admin.key.revoke")))) return;
  try {
    await api("POST", `/api-keys/${k.key_id}/revoke`);
    notify(t("admin.key.revoked", { name: k.name, id: k.key_id }));
    await keys.load();
  } catch (err) {
    failed(err);
  }
}

const keyForm = document.getElementById("key-create");
onSubmit(keyForm, (values) => withFields(keyForm, () => {
  const scopes = [...keyForm.querySelectorAll('[name="scopes"]:checked')].map((el) => el.value);
  const body = {
    name: values.name ?? "",
    scopes,
    allowed_device_ids: listOf(values.allowed_device_ids),
    allowed_gateway_ids: listOf(values.allowed_gateway_ids),
    allowed_networks: listOf(values.allowed_networks),
    hmac_required: Boolean(values.hmac_required),
  };
  if (values.expires_in_days !== undefined) body.expires_in_s = values.expires_in_days * 86400;
  return api("POST", "/api-keys", { body });
}, { expires_in_s: "expires_in_days", expires_at: "expires_in_days" }), async (made) => {
  showSecret("key-secret", {
    title: t("admin.key.new_title", { name: made.name, id: made.key_id }),
    note: t("admin.key.copy_once"),
    label: t("admin.key.new_key"),
    value: made.key,
  });
  keyForm.reset();
  await keys.load();
});

// ------------------------------------------------------------------ webhooks

let eventTypes = [];

function disabledText(w) {
  return w.enabled ? null : tv("webhook_disabled", w.disabled_reason || "manual");
}

function webhookState(w) {
  if (!w.enabled) {
    return [h("span", { class: `badge ${w.disabled_reason === "manual" ? "off" : "bad"}` }, disabledText(w)),
      w.disabled_at ? h("div", { class: "muted" }, fmtTime(w.disabled_at)) : null];
  }
  return [h("span", { class: "badge ok" }, t("admin.webhook.enabled")),
    w.failing_since ? h("div", { class: "error" }, t("admin.webhook.failing_since", { at: fmtTime(w.failing_since) })) : null];
}

function webhookFilters(w) {
  const parts = [];
  if (w.device_ids) parts.push(t("admin.key.limit_devices", { ids: w.device_ids.join(", ") }));
  if (w.gateway_ids) parts.push(t("admin.key.limit_gateways", { ids: w.gateway_ids.join(", ") }));
  if (w.protocol) parts.push(t("admin.webhook.only_protocol", { protocol: w.protocol.toUpperCase() }));
  return parts.length ? h("ul", { class: "plain" }, parts.map((p) => h("li", {}, p))) : t("admin.webhook.no_filters");
}

const webhooks = pagedList({
  name: "webhook",
  path: () => "/webhooks",
  render: (rows) => table([
    { key: "id", label: t("admin.webhook.id"), num: true, render: (w) => `#${w.id}` },
    { key: "url", label: t("admin.webhook.url"), render: (w) => [h("span", { class: "hex" }, w.url),
        w.description ? h("div", { class: "muted" }, w.description) : null] },
    { key: "event_types", label: t("admin.webhook.event_types"), render: (w) => h("span", { class: "hex" }, w.event_types.join(", ")) },
    { key: "filters", label: t("admin.webhook.filters"), render: webhookFilters },
    { key: "state", label: t("admin.webhook.state"), render: webhookState },
    { key: "last_success_at", label: t("admin.webhook.last_success"), render: (w) => fmtTime(w.last_success_at) },
    { key: "actions", label: t("admin.actions"), render: (w) => actions(
        button(t("admin.webhook.deliveries"), () => openDeliveries(w), { "data-action": "deliveries" }),
        w.enabled ? button(t("admin.webhook.test"), () => pingWebhook(w), { "data-action": "test" }) : null,
        button(t(w.enabled ? "admin.webhook.disable" : "admin.webhook.enable"), () => toggleWebhook(w),
          { "data-action": w.enabled ? "disable" : "enable" }),
        button(t("action.delete"), () => deleteWebhook(w), { class: "danger", "data-action": "delete" })) },
  ], rows, { empty: t("admin.webhook.none"), rowAttrs: (w) => ({ "data-webhook": w.id }) }),
});

async function toggleWebhook(w) {
  try {
    const changed = await api("PATCH", `/webhooks/${w.id}`, { body: { enabled: !w.enabled } });
    notify(t(changed.enabled ? "admin.webhook.enabled_notice" : "admin.webhook.disabled_notice", { id: w.id }));
    await webhooks.load();
  } catch (err) {
    failed(err);
  }
}

async function pingWebhook(w) {
  try {
    await api("POST", `/webhooks/${w.id}/test`);
    notify(t("admin.webhook.test_sent", { id: w.id }));
    await openDeliveries(w);
  } catch (err) {
    failed(err);
  }
}

async function deleteWebhook(w) {
  const ok = await confirmAction(t("admin.webhook.delete_confirm", { id: w.id, url: w.url }), t("action.delete"));
  if (!ok) return;
  try {
    await api("DELETE", `/webhooks/${w.id}`);
    notify(t("admin.webhook.deleted", { id: w.id }));
    if (shownWebhook && shownWebhook.id === w.id) closeDeliveries();
    await webhooks.load();
  } catch (err) {
    failed(err);
  }
}

function eventTypeChoices() {
  const groups = new Map();
  for (const type of eventTypes) {
    const group = type.name.split(".")[0];
    if (!groups.has(group)) groups.set(group, []);
    groups.get(group).push(type);
  }
  const check = (value, label, hint = null) => {
    const id = `wc-type-${value.replace("*", "all").replace(/[^a-z0-9]/gi, "-")}`;
    return h("span", { class: "check" },
      h("input", { type: "checkbox", id, name: "event_types", value }),
      h("label", { for: id }, label, hint ? h("span", { class: "muted" }, ` ${hint}`) : null));
  };
  fill("wc-types",
    h("div", { class: "type-group" }, check("*", t("admin.webhook.all_events"))),
    [...groups].map(([group, types]) => h("div", { class: "type-group" },
      check(`${group}.*`, t("admin.webhook.group_all", { group: tv("event_group", group) })),
      types.map((type) => check(type.name, type.name, tv("webhook_event", type.name))))));
}

async function loadEventTypes() {
  try {
    eventTypes = (await api("GET", "/event-types")).items;
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    // the catalogue the page came with names the same types
    eventTypes = config.event_types.map((name) => ({ name }));
  }
  eventTypeChoices();
}

const webhookForm = document.getElementById("webhook-create");
onSubmit(webhookForm, (values) => withFields(webhookForm, () => {
  const body = {
    url: values.url ?? "",
    description: values.description ?? "",
    event_types: [...webhookForm.querySelectorAll('[name="event_types"]:checked')].map((el) => el.value),
    device_ids: listOf(values.device_ids),
    gateway_ids: listOf(values.gateway_ids),
    protocol: values.protocol || undefined,
  };
  return api("POST", "/webhooks", { body });
}), async (made) => {
  showSecret("webhook-secret", {
    title: t("admin.webhook.new_title", { id: made.id }),
    note: t("admin.webhook.secret_once"),
    label: t("admin.webhook.secret"),
    value: made.secret,
  });
  webhookForm.reset();
  await webhooks.load();
});

// a subscription's deliveries
let shownWebhook = null;
const deliverySection = document.getElementById("deliveries");
const deliveryFilter = document.getElementById("delivery-filter");
const RETRYABLE = ["pending", "failed", "delivered"];
const DELIVERY_BADGE = {
  queued: "off", pending: "warn", delivering: "warn", delivered: "ok", failed: "bad", cancelled: "off",
};

function answer(d) {
  const text = d.last_error || d.response_body;
  return [d.response_status ? h("strong", {}, `HTTP ${d.response_status}`) : null,
    d.latency_ms !== null && d.latency_ms !== undefined ? h("span", { class: "muted" }, ` ${Math.round(d.latency_ms)} ms`) : null,
    text ? h("details", { class: "answer" }, h("summary", {}, t("admin.delivery.detail")), h("pre", {}, text)) : null];
}

const deliveries = pagedList({
  name: "delivery",
  path: () => `/webhooks/${shownWebhook.id}/deliveries`,
  query: () => ({ status: deliveryFilter.elements.status.value || null }),
  render: (rows) => table([
    { key: "id", label: t("admin.delivery.id"), num: true, render: (d) => `#${d.id}` },
    { key: "type", label: t("admin.delivery.type"), render: (d) => [h("span", { class: "hex" }, d.type),
        h("div", { class: "muted" }, tv("delivery_origin", d.origin))] },
    { key: "status", label: t("admin.delivery.status"), render: (d) => statusBadge("delivery_status", d.status, DELIVERY_BADGE[d.status] || "off") },
    { key: "attempts", label: t("admin.delivery.attempts"), num: true },
    { key: "answer", label: t("admin.delivery.answer"), render: answer },
    { key: "created_at", label: t("admin.delivery.created"), render: (d) => fmtTime(d.created_at) },
    { key: "last_attempt_at", label: t("admin.delivery.last_attempt"), render: (d) => fmtTime(d.last_attempt_at) },
    { key: "next_attempt_at", label: t("admin.delivery.next_attempt"), render: (d) => fmtTime(d.next_attempt_at) },
    { key: "actions", label: t("admin.actions"), render: (d) => (RETRYABLE.includes(d.status)
        ? button(t("admin.delivery.retry"), () => retryDelivery(d), { "data-action": "retry" }) : "–") },
  ], rows, { empty: t("admin.delivery.none"), rowAttrs: (d) => ({ "data-delivery": d.id }) }),
});

async function openDeliveries(w) {
  shownWebhook = w;
  fill("deliveries-h", t("admin.delivery.title", { id: w.id, url: w.url }));
  deliverySection.hidden = false;
  await deliveries.load();
  deliverySection.scrollIntoView({ block: "nearest" });
}

function closeDeliveries() {
  shownWebhook = null;
  deliverySection.hidden = true;
}

async function retryDelivery(d) {
  try {
    await api("POST", `/webhooks/${d.subscription_id}/deliveries/${d.id}/retry`);
    notify(t("admin.delivery.retried", { id: d.id }));
    await deliveries.load();
  } catch (err) {
    failed(err);
  }
}

deliveryFilter.addEventListener("submit", (event) => {
  event.preventDefault();
  if (shownWebhook) deliveries.load();
});
document.getElementById("deliveries-close").addEventListener("click", closeDeliveries);

// ------------------------------------------------------------------ bans

const bans = pagedList({
  name: "ban",
  path: () => "/bans",
  render: (rows) => table([
    { key: "device_id", label: t("admin.ban.device"), render: (b) => link(`/devices/${encodeURIComponent(b.device_id)}`, b.device_id) },
    { key: "reason", label: t("admin.ban.reason"), render: (b) => tv("ban_reason", b.reason) },
    { key: "connects", label: t("admin.ban.connects"), num: true, render: (b) => b.connects ?? "–" },
    { key: "since", label: t("admin.ban.since"), render: (b) => fmtTime(b.since) },
    { key: "until", label: t("admin.ban.until"), render: (b) => fmtTime(b.until) },
    { key: "actions", label: t("admin.actions"), render: (b) => button(t("admin.ban.lift"), () => liftBan(b),
        { class: "danger", "data-action": "lift" }) },
  ], rows, { empty: t("admin.ban.none"), rowAttrs: (b) => ({ "data-ban": b.device_id }) }),
});

async function liftBan(b) {
  const ok = await confirmAction(t("admin.ban.lift_confirm", { device: b.device_id, until: fmtTime(b.until) }), t("admin.ban.lift"));
  if (!ok) return;
  try {
    await api("DELETE", `/bans/${encodeURIComponent(b.device_id)}`);
    notify(t("admin.ban.lifted", { device: b.device_id }));
  } catch (err) {
    if (!(err instanceof ApiError) || err.status !== 404) failed(err); // 404: it ran out meanwhile
  }
  await bans.load();
}

// ------------------------------------------------------------------ nodes

const NODE_BADGE = { live: "ok", draining: "warn", stopped: "off" };
const nodeFilter = document.getElementById("node-filter");

async function loadNodes() {
  try {
    const nodes = await api("GET", "/nodes", { query: { include_stopped: nodeFilter.elements.include_stopped.checked || null } });
    fill("node-answered", t("admin.node.answered_by", { owner: nodes.answered_by }));
    fill("node-list", table([
      { key: "node", label: t("admin.node.node"), render: (n) => n.node },
      { key: "worker", label: t("admin.node.worker"), num: true },
      { key: "pid", label: t("admin.node.pid"), num: true },
      { key: "state", label: t("admin.node.state"), render: (n) => statusBadge("node_state", n.state, NODE_BADGE[n.state] || "off") },
      { key: "connections", label: t("admin.node.connections"), num: true,
        render: (n) => `${n.connections} / ${n.max_connections}` },
      { key: "devices", label: t("admin.node.devices"), num: true },
      { key: "heartbeat_at", label: t("admin.node.heartbeat"),
        render: (n) => [fmtTime(n.heartbeat_at), h("div", { class: "muted" }, t("admin.node.silent", { s: Math.round(n.silent_s) }))] },
      { key: "started_at", label: t("admin.node.started"), render: (n) => fmtTime(n.started_at) },
      { key: "listen", label: t("admin.node.listen"),
        render: (n) => [n.device_listen ? h("div", {}, t("admin.node.device_listen", { at: n.device_listen })) : null,
          n.http_listen ? h("div", {}, t("admin.node.http_listen", { at: n.http_listen })) : null] },
      { key: "shed_remaining", label: t("admin.node.shedding"), num: true },
    ], nodes.items, { empty: t("admin.node.none"), rowAttrs: (n) => ({ "data-owner": n.owner }) }));
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    fill("node-list", errorBox(err));
  }
}

nodeFilter.addEventListener("submit", (event) => {
  event.preventDefault();
  loadNodes();
});

// ------------------------------------------------------------------ audit trail

const auditFilter = document.getElementById("audit-filter");

/** How far the site's time zone is ahead of UTC at `date`, in ms. */
function zoneOffsetMs(date) {
  const parts = Object.fromEntries(new Intl.DateTimeFormat("en-US", {
    timeZone: config.timezone, hourCycle: "h23", year: "numeric", month: "2-digit", day: "2-digit",
    hour: "2-digit", minute: "2-digit", second: "2-digit",
  }).formatToParts(date).map((p) => [p.type, p.value]));
  const wall = Date.UTC(+parts.year, +parts.month - 1, +parts.day, +parts.hour, +parts.minute, +parts.second);
  return wall - Math.floor(date.getTime() / 1000) * 1000;
}

/** A "YYYY-MM-DDTHH:MM" wall time of the site's time zone as an ISO instant. */
function siteTimeToIso(value) {
  const [day, time] = value.split("T");
  const [y, m, d] = day.split("-").map(Number);
  const [hh, mm] = time.split(":").map(Number);
  const wall = Date.UTC(y, m - 1, d, hh, mm);
  let at = wall - zoneOffsetMs(new Date(wall));
  at = wall - zoneOffsetMs(new Date(at)); // across a change of offset
  return new Date(at).toISOString();
}

function auditQuery() {
  const q = {};
  for (const name of ["key_id", "method", "path", "status", "device_id", "order_no"]) {
    const value = auditFilter.elements[name].value.trim();
    if (value) q[name] = value;
  }
  for (const name of ["since", "until"]) {
    const value = auditFilter.elements[name].value;
    if (value) q[name] = siteTimeToIso(value);
  }
  return q;
}

function callStatus(c) {
  const kind = c.status >= 500 ? "bad" : c.status >= 400 ? "warn" : "ok";
  return h("span", { class: `badge ${kind}` }, String(c.status));
}

function callWho(c) {
  return [c.key_id ? h("div", {}, c.key_name ? `${c.key_name} (#${c.key_id})` : `#${c.key_id}`) : h("div", {}, "–"),
    c.auth_failure ? h("span", { class: "badge bad" }, tv("auth_failure", c.auth_failure)) : null,
    c.source ? h("div", { class: "muted" }, c.source) : null];
}

function callBody(c) {
  const body = c.body ?? c.body_excerpt;
  if (body === null || body === undefined) return "–";
  const text = typeof body === "string" ? body : JSON.stringify(body, null, 2);
  return h("details", { class: "answer" },
    h("summary", {}, t("admin.audit.body_bytes", { bytes: c.body_bytes })), h("pre", {}, text));
}

const calls = pagedList({
  name: "audit",
  path: () => "/audit/calls",
  query: auditQuery,
  onError: (err) => {
    // a refused filter (since after until ...) is shown next to its input
    if (err.status !== 422) return false;
    err.field = inputName(auditFilter, err.field);
    err.details = err.details.map((d) => ({ ...d, field: inputName(auditFilter, d.field) }));
    showError(auditFilter, err);
    return true;
  },
  render: (rows) => table([
    { key: "at", label: t("admin.audit.at"), render: (c) => fmtTime(c.at) },
    { key: "who", label: t("admin.audit.who"), render: callWho },
    { key: "request", label: t("admin.audit.request"), render: (c) => [h("strong", {}, c.method), " ",
        h("span", { class: "hex" }, c.query ? `${c.path}?${c.query}` : c.path)] },
    { key: "status", label: t("admin.audit.status"), render: callStatus },
    { key: "duration_ms", label: t("admin.audit.duration"), num: true, render: (c) => `${Math.round(c.duration_ms)} ms` },
    { key: "subjects", label: t("admin.audit.subjects"), render: (c) => [
        c.device_id ? h("div", {}, link(`/devices/${encodeURIComponent(c.device_id)}`, c.device_id)) : null,
        ...c.order_nos.map((o) => h("div", {}, link(`/orders/${encodeURIComponent(o)}`, o))),
        c.resource_id ? h("div", { class: "muted" }, t("admin.audit.resource", { id: c.resource_id })) : null] },
    { key: "body", label: t("admin.audit.body"), render: callBody },
  ], rows, { empty: t("admin.audit.none"), rowAttrs: (c) => ({ "data-call": c.id }) }),
});

auditFilter.addEventListener("submit", (event) => {
  event.preventDefault();
  clearErrors(auditFilter);
  calls.load();
});

// ------------------------------------------------------------------ live

const reloadBans = debounce(() => bans.load(), 500);
const reloadWebhooks = debounce(() => {
  webhooks.load();
  if (shownWebhook) deliveries.load();
}, 500);
onEvent(["ban.placed", "ban.lifted"], reloadBans);
onEvent(["webhook.disabled"], reloadWebhooks);
onReconnect(() => {
  keys.load();
  webhooks.load();
  if (shownWebhook) deliveries.load();
  bans.load();
  loadNodes();
  calls.load();
});

keys.load();
webhooks.load();
loadEventTypes();
bans.load();
loadNodes();
calls.load();
