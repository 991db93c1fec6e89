// Devices: search (id, QR number or URL, ICCID tail), filters, live online state.
import {
  ApiError, api, config, debounce, fill, fmtTime, h, link, onEvent, onReconnect, onlineBadge, t, table, tv,
} from "../core.js";

const form = document.getElementById("device-filters");
const list = document.getElementById("device-list");
const more = document.getElementById("device-more");
let rows = [];
let cursor = null;

// the filters start from the URL (a link from the overview names a gateway)
const initial = new URLSearchParams(location.search);
for (const name of ["q", "protocol", "online", "gateway_id"]) {
  if (initial.has(name) && form.elements[name]) form.elements[name].value = initial.get(name);
}

function query() {
  const q = {};
  for (const name of ["q", "protocol", "online", "gateway_id"]) {
    const value = form.elements[name].value.trim();
    if (value) q[name] = value;
  }
  return q;
}

function render() {
  fill(list, table([
    { key: "device_id", label: t("device.id"), render: (d) => link(`/devices/${encodeURIComponent(d.device_id)}`, d.device_id) },
    { key: "qr_number", label: t("device.qr_number"), render: (d) => d.qr_number ?? "–" },
    { key: "iccid", label: t("device.iccid_tail"), render: (d) => (d.iccid ? d.iccid.slice(-4) : "–") },
    { key: "protocol", label: t("device.protocol"), render: (d) => tv("protocol", d.protocol) },
    { key: "gateway_id", label: t("device.gateway"), render: (d) => d.gateway_id ?? "–" },
    { key: "online", label: t("device.state"), render: (d) => onlineBadge(d.online) },
    { key: "firmware", label: t("device.firmware"), render: (d) => d.firmware ?? "–" },
    { key: "signal_strength", label: t("device.signal"), num: true, render: (d) => d.signal_strength ?? "–" },
    { key: "last_seen_at", label: t("device.last_seen"), render: (d) => fmtTime(d.last_seen_at) },
  ], rows, { rowAttrs: (d) => ({ "data-device": d.device_id }) }));
  more.hidden = !cursor;
}

async function load(append = false) {
  try {
    const page = await api("GET", "/devices", { query: { ...query(), cursor: append ? cursor : null, limit: 100 } });
    rows = append ? rows.concat(page.items) : page.items;
    cursor = page.next_cursor;
    render();
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    fill(list, h("p", { class: "error", role: "alert" }, err.message));
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const params = new URLSearchParams(query());
  history.replaceState(null, "", `${location.pathname}${params.toString() ? `?${params}` : ""}`);
  load();
});
more.addEventListener("click", () => load(true));

// live: a device shown changes state in place; a device not shown may now match
const refresh = debounce(() => load(), 1000);
onEvent(["device.online", "device.offline", "device.registered"], (event) => {
  const row = rows.find((d) => d.device_id === event.device_id);
  if (row && event.type !== "device.registered") {
    row.online = event.type === "device.online";
    row.last_seen_at = event.at || row.last_seen_at;
    render();
  } else {
    refresh();
  }
});
onReconnect(() => load());
load();
void config;
