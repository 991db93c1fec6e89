// A device: facts, commands, ports with their running sessions (start, stop), recent
// orders, parameters, firmware, event log and timeline; live from the event stream.
import {
  ApiError, api, badge, clearErrors, config, confirmAction, debounce, fill, fmtDuration, fmtMoney,
  fmtTime, fmtUnit, h, hasScope, link, notify, onEvent, onReconnect, onlineBadge, showError, t,
  table, tv,
} from "../core.js";
import { renderParams } from "../params_panel.js";
import { renderFirmwareHistory } from "../firmware_panel.js";
import { renderTimeline } from "../timeline.js";

const deviceId = config.params.device_id;
const path = `/devices/${encodeURIComponent(deviceId)}`;
const OPEN = ["pending", "starting", "charging", "stopping"];
let device = null;
let orders = [];
// commands this page sent, by id: what the page says of each
const sent = new Map();
// their names, by id
const sentNames = new Map();

function fact(label, value) {
  return [h("dt", {}, label), h("dd", {}, value ?? "–")];
}

function renderFacts() {
  const d = device;
  fill("device-online", onlineBadge(d.online));
  fill("device-facts", h("dl", { class: "facts" },
    fact(t("device.protocol"), tv("protocol", d.protocol)),
    fact(t("device.gateway"), d.gateway_id),
    fact(t("device.qr_number"), d.qr_number),
    fact(t("device.iccid"), d.iccid),
    fact(t("device.type"), d.device_type),
    fact(t("device.firmware"), d.firmware),
    fact(t("device.port_count"), d.port_count),
    fact(t("device.signal"), d.signal_strength),
    fact(t("device.temperature"), fmtUnit(d.temperature_c, "c")),
    fact(t("device.voltage"), fmtUnit(d.voltage_v, "v", 1)),
    fact(t("device.last_seen"), fmtTime(d.last_seen_at)),
    fact(t("device.last_heartbeat"), fmtTime(d.last_heartbeat_at)),
    fact(t("device.offline_reason"), d.online ? null : tv("offline_reason", d.offline_reason)),
    fact(t("device.quirks"), d.quirks && d.quirks.length ? d.quirks.join(", ") : t("common.none"))));
}

async function renderGateway() {
  const section = document.getElementById("gateway-facts");
  if (!device.gateway_id) {
    section.hidden = true;
    return;
  }
  let g;
  try {
    g = await api("GET", `/gateways/${encodeURIComponent(device.gateway_id)}`);
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    fill("gateway-facts-body", h("p", { class: "error" }, err.message));
    return;
  }
  section.hidden = false;
  fill("gateway-facts-body", h("dl", { class: "facts" },
    fact(t("device.gateway"), link(`/devices?gateway_id=${encodeURIComponent(g.gateway_id)}`, g.gateway_id)),
    fact(t("device.state"), onlineBadge(g.online)),
    fact(t("gateway.firmware"), g.firmware),
    fact(t("device.iccid"), g.iccid),
    fact(t("gateway.imei"), g.imei),
    fact(t("gateway.remote_addr"), g.remote_addr),
    fact(t("gateway.connected_at"), fmtTime(g.connected_at)),
    fact(t("gateway.device_count"), g.device_count)));
}

// ------------------------------------------------------------------ commands

const COMMANDS = {
  ap3000: [
    { name: "query", danger: false },
    { name: "locate", danger: false },
    { name: "reboot", danger: true },
    { name: "clear_storage", danger: true },
  ],
  bkv: [{ name: "query", danger: false }],
};

async function sendCommand(name, danger) {
  if (danger && !(await confirmAction(t(`command_confirm.${name}`, { device: deviceId }), tv("command", name)))) return;
  try {
    const accepted = await api("POST", `${path}/commands`, { body: { command: name, params: {} } });
    sentNames.set(accepted.command_id, name);
    sent.set(accepted.command_id, t("device.command_sent", { command: tv("command", name) }));
    renderCommands();
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    notify(t("error.failed", { message: err.message }), "bad");
  }
}

function renderActions() {
  const allowed = hasScope("control");
  fill("device-actions", (COMMANDS[device.protocol] || []).map((c) => h("button", {
    type: "button", class: c.danger ? "danger" : null, disabled: !allowed,
    "data-command": c.name, onclick: () => sendCommand(c.name, c.danger),
  }, tv("command", c.name))));
}

function renderCommands() {
  fill("device-commands", sent.size
    ? h("ul", {}, [...sent.entries()].map(([id, state]) => h("li", { "data-command-id": id }, state)))
    : null);
}

async function followCommand(event) {
  if (!sent.has(event.command_id)) return;
  const name = (event.data && event.data.name) || sentNames.get(event.command_id) || "";
  const text = t(`command_result.${event.type.split(".")[1]}`, {
    command: tv("command", name), result: event.data && event.data.result_text ? event.data.result_text : "",
  });
  sent.set(event.command_id, text);
  renderCommands();
}

// ------------------------------------------------------------------ ports

// a port's start form lives across live re-renders: what the user typed stays
const startForms = new Map();

function startForm(port) {
  if (!startForms.has(port)) startForms.set(port, newStartForm(port));
  return startForms.get(port);
}

function newStartForm(port) {
  const id = `start-${port}`;
  const mode = h("select", { id: `${id}-mode`, name: "mode" },
    ["full", "time", "energy"].map((m) => h("option", { value: m }, tv("charge_mode", m))));
  const duration = h("input", { id: `${id}-duration`, name: "duration_min", type: "number", min: 1, max: 1092, step: 1 });
  const energy = h("input", { id: `${id}-energy`, name: "energy_kwh", type: "number", min: 0.01, max: 655.35, step: 0.01 });
  const durationRow = h("div", { class: "field" }, h("label", { for: `${id}-duration` }, `${t("dev_order.duration_min")} (${t("unit.min")})`), duration);
  const energyRow = h("div", { class: "field" }, h("label", { for: `${id}-energy` }, `${t("dev_order.energy_kwh")} (${t("unit.kwh")})`), energy);
  const sync = () => {
    durationRow.hidden = mode.value !== "time";
    energyRow.hidden = mode.value !== "energy";
    duration.disabled = mode.value !== "time";
    energy.disabled = mode.value !== "energy";
  };
  mode.addEventListener("change", sync);
  const form = h("form", { class: "start-form", "data-port": port },
    h("div", { class: "field" }, h("label", { for: `${id}-mode` }, t("dev_order.mode")), mode),
    durationRow, energyRow,
    h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, t("device.start"))));
  sync();
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    const body = { mode: mode.value };
    if (mode.value === "time" && duration.value) body.duration_min = Number(duration.value);
    if (mode.value === "energy" && energy.value) body.energy_kwh = Number(energy.value);
    const limit = mode.value === "time" ? fmtUnit(body.duration_min, "min")
      : mode.value === "energy" ? fmtUnit(body.energy_kwh, "kwh", 2) : tv("charge_mode", "full");
    if (!(await confirmAction(t("device.confirm_start", { device: deviceId, port, limit }), t("device.start")))) return;
    try {
      const accepted = await api("POST", `${path}/ports/${port}/start`, { body });
      startForms.delete(port);
      sentNames.set(accepted.command_id, "start");
      sent.set(accepted.command_id, t("device.start_sent", { port, order: accepted.order_no }));
      renderCommands();
      await loadOrders();
    } catch (err) {
      if (err instanceof ApiError) showError(form, err); else throw err;
    }
  });
  return form;
}

async function stop(port, order) {
  if (!(await confirmAction(t("device.confirm_stop", { device: deviceId, port, order: order.order_no }), t("device.stop")))) return;
  try {
    const accepted = await api("POST", `${path}/ports/${port}/stop`, { body: {} });
    sentNames.set(accepted.command_id, "stop");
    sent.set(accepted.command_id, t("device.stop_sent", { port }));
    renderCommands();
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    notify(t("error.failed", { message: err.message }), "bad");
  }
}

function portCard(p) {
  const running = orders.find((o) => o.port === p.port && OPEN.includes(o.status));
  const canControl = hasScope("control");
  return h("div", { class: "card port", "data-port": p.port, "data-status": p.status },
    h("h3", {}, t("device.port", { port: p.port }), badge("port_status", p.status)),
    h("dl", { class: "facts" },
      fact(t("port.power"), fmtUnit(p.power_w, "w", 1)),
      fact(t("port.energy"), fmtUnit(p.energy_kwh, "kwh", 3)),
      fact(t("port.voltage"), fmtUnit(p.voltage_v, "v", 1)),
      fact(t("port.current"), fmtUnit(p.current_a, "a", 2)),
      fact(t("port.reported"), fmtTime(p.reported_at))),
    running
      ? h("div", { class: "session", "data-order": running.order_no },
          h("p", {}, badge("order_status", running.status), " ",
            link(`/orders/${encodeURIComponent(running.order_no)}`, running.order_no)),
          h("dl", { class: "facts" },
            fact(t("dev_order.energy"), fmtUnit(running.energy_kwh, "kwh", 3)),
            fact(t("dev_order.duration"), fmtDuration(running.duration_s)),
            fact(t("dev_order.max_power"), fmtUnit(running.max_power_w, "w", 1))),
          canControl && running.status !== "stopping"
            ? h("button", { type: "button", class: "danger", onclick: () => stop(p.port, running) }, t("device.stop"))
            : null)
      : canControl && device.online ? startForm(p.port) : null);
}

function renderPorts() {
  const ports = device.ports.length ? device.ports
    : Array.from({ length: device.port_count || 0 }, (_, i) => ({ port: i + 1, status: "unknown" }));
  fill("device-ports", ports.length ? ports.map(portCard) : h("p", { class: "muted" }, t("list.empty")));
}

function renderOrders() {
  fill("device-orders", table([
    { key: "order_no", label: t("dev_order.no"), render: (o) => link(`/orders/${encodeURIComponent(o.order_no)}`, o.order_no) },
    { key: "port", label: t("dev_order.port"), num: true },
    { key: "status", label: t("dev_order.status"), render: (o) => badge("order_status", o.status) },
    { key: "start_mode", label: t("dev_order.start_mode"), render: (o) => tv("start_mode", o.start_mode) },
    { key: "started_at", label: t("dev_order.started"), render: (o) => fmtTime(o.started_at) },
    { key: "energy_kwh", label: t("dev_order.energy"), num: true, render: (o) => fmtUnit(o.energy_kwh, "kwh", 3) },
    { key: "amount_cent", label: t("dev_order.amount"), num: true, render: (o) => fmtMoney(o.amount_cent) },
    { key: "stop_reason", label: t("dev_order.stop_reason"), render: (o) => tv("stop_reason", o.stop_reason) },
  ], orders.slice(0, 10)));
}

// ------------------------------------------------------------------ loading

async function loadDevice() {
  try {
    device = await api("GET", path);
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    fill("device-facts", h("p", { class: "error", role: "alert" }, err.message));
    return false;
  }
  renderFacts();
  renderActions();
  renderPorts();
  await renderGateway();
  return true;
}

async function loadOrders() {
  try {
    orders = (await api("GET", "/orders", { query: { device_id: deviceId, limit: 20 } })).items;
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    fill("device-orders", h("p", { class: "error", role: "alert" }, err.message));
    return;
  }
  renderOrders();
  if (device) renderPorts();
}

async function loadEvents() {
  try {
    const page = await api("GET", `${path}/events`, { query: { limit: 20 } });
    fill("device-events", table([
      { key: "at", label: t("event.at"), render: (e) => fmtTime(e.at) },
      { key: "kind", label: t("event.kind"), render: (e) => tv("device_event", e.kind) },
      { key: "reason", label: t("event.reason"), render: (e) => e.reason ?? "–" },
      { key: "detail", label: t("event.detail"), render: (e) => h("code", {}, JSON.stringify(e.detail)) },
    ], page.items));
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    fill("device-events", h("p", { class: "error" }, err.message));
  }
}

const timelineForm = document.getElementById("timeline-window");
async function loadTimeline() {
  const hours = Number(timelineForm.elements.hours.value);
  const until = new Date();
  const since = new Date(until.getTime() - hours * 3600 * 1000);
  try {
    const data = await api("GET", `${path}/timeline`, { query: { since: since.toISOString(), until: until.toISOString() } });
    renderTimeline(document.getElementById("device-timeline"), data.items || [],
      { truncated: data.truncated, limit: data.limit });
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    fill("device-timeline", h("p", { class: "error" }, err.message));
  }
}
timelineForm.addEventListener("submit", (event) => { event.preventDefault(); loadTimeline(); });

async function loadAll() {
  if (!(await loadDevice())) return;
  await Promise.all([loadOrders(), loadEvents(), loadTimeline()]);
}

// ------------------------------------------------------------------ live

const mine = (event) => event.device_id === deviceId;
const reloadDevice = debounce(loadDevice, 300);
const reloadOrders = debounce(loadOrders, 300);
const reloadEvents = debounce(loadEvents, 1000);
const reloadTimeline = debounce(loadTimeline, 3000);

onEvent(["device.", "port."], (e) => { if (mine(e)) { reloadDevice(); reloadEvents(); reloadTimeline(); } });
onEvent(["order."], (e) => { if (mine(e)) { reloadOrders(); reloadDevice(); reloadTimeline(); } });
onEvent(["command."], (e) => { if (mine(e)) followCommand(e); });
onReconnect(loadAll);

await loadAll();
if (device) {
  renderParams(document.getElementById("device-params-body"), deviceId);
  renderFirmwareHistory(document.getElementById("device-firmware-body"), deviceId);
}
