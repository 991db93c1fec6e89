// Overview: the platform at a glance (GET /api/v1/overview), re-read on live events.
import {
  ApiError, api, debounce, fill, fmtMoney, fmtTime, h, link, onEvent, onReconnect, t, table, tv,
} from "../core.js";

function tile(label, value, sub = null, id = null) {
  return h("div", { class: "tile", id },
    h("div", { class: "label" }, label),
    h("div", { class: "value" }, value),
    sub ? h("div", { class: "sub" }, sub) : null);
}

function alertText(alert) {
  return t(`alert.${alert.code}`, alert.values);
}

async function load() {
  let data;
  try {
    data = await api("GET", "/overview");
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    fill("ov-alerts", h("p", { class: "error", role: "alert" }, err.message));
    return;
  }
  const online = data.devices.reduce((n, p) => n + p.online, 0);
  const offline = data.devices.reduce((n, p) => n + p.offline, 0);
  const byProtocol = data.devices.map((p) => `${tv("protocol", p.protocol)} ${p.online}/${p.online + p.offline}`).join(" · ");
  const rate = data.commands.success_rate === null ? "–" : `${(data.commands.success_rate * 100).toFixed(1)}%`;
  fill("ov-tiles",
    tile(t("overview.devices_online"), `${online}`, `${t("overview.offline_count", { count: offline })} · ${byProtocol}`, "tile-online"),
    tile(t("overview.charging_now"), `${data.charging}`, null, "tile-charging"),
    tile(t("overview.commands_per_min"), `${data.commands.per_minute}`,
      t("overview.success_rate", { rate, minutes: data.commands.window_min }), "tile-commands"),
    tile(t("overview.settlements_today"), `${data.settlements_today.count}`,
      t("overview.revenue", { amount: fmtMoney(data.settlements_today.revenue_cent) }), "tile-settlements"),
    tile(t("overview.outbox"), `${data.outbox.open}`,
      data.outbox.oldest_s === null ? t("overview.outbox_empty") : t("overview.outbox_oldest", { seconds: Math.round(data.outbox.oldest_s) }), "tile-outbox"),
    tile(t("overview.processes"), `${data.nodes.length}`, null, "tile-nodes"));

  fill("ov-alerts", data.alerts.length
    ? h("ul", { class: "alerts" }, data.alerts.map((a) => h("li", { class: a.severity },
        h("strong", {}, tv("severity", a.severity)), " ", alertText(a))))
    : h("ul", { class: "alerts" }, h("li", { class: "none" }, t("overview.no_alerts"))));

  fill("ov-devices", table([
    { key: "protocol", label: t("device.protocol"), render: (g) => tv("protocol", g.protocol) },
    { key: "gateway_id", label: t("device.gateway"), render: (g) => g.gateway_id
        ? link(`/devices?gateway_id=${encodeURIComponent(g.gateway_id)}`, g.gateway_id) : t("overview.direct") },
    { key: "online", label: t("device.online"), num: true },
    { key: "offline", label: t("device.offline"), num: true },
  ], data.gateways));

  fill("ov-nodes", table([
    { key: "node", label: t("overview.node") },
    { key: "worker", label: t("overview.worker"), num: true },
    { key: "pid", label: t("overview.pid"), num: true },
    { key: "connections", label: t("overview.connections"), num: true },
    { key: "devices", label: t("overview.devices"), num: true },
    { key: "started_at", label: t("overview.started"), render: (n) => fmtTime(n.started_at) },
    { key: "heartbeat_age_s", label: t("overview.heartbeat_age"), num: true,
      render: (n) => `${n.heartbeat_age_s.toFixed(0)} ${t("unit.s")}` },
    { key: "draining", label: t("overview.draining"), render: (n) => t(n.draining ? "common.yes" : "common.no") },
  ], data.nodes));
  document.getElementById("main").dataset.loadedAt = data.at;
}

const reload = debounce(load, 500);
onEvent(["device.", "order.", "command.", "upgrade.", "webhook.", "ban."], reload);
onReconnect(load);
load();
