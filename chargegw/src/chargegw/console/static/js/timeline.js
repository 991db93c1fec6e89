// A timeline (GET /api/v1/orders/{no}/timeline, GET /api/v1/devices/{id}/timeline) as an
// ordered list, in the API's order (time order, a cause before what it caused): frames
// with their decoded fields beside the hex, transitions with their causes (a frame cause
// links to that frame's item), events, commands, the settlement and the samples. Times
// are the site's, to the millisecond. Everything the device sent is shown as text.
import { config, fill, fmtDuration, fmtMoney, fmtUnit, h, link, t, tv } from "./core.js";

const KINDS = ["frame", "transition", "event", "command", "settlement", "samples"];
const locale = config.lang === "zh" ? "zh-CN" : "en-GB";
const precise = new Intl.DateTimeFormat(locale, {
  timeZone: config.timezone, year: "numeric", month: "2-digit", day: "2-digit",
  hour: "2-digit", minute: "2-digit", second: "2-digit", fractionalSecondDigits: 3, hourCycle: "h23",
});

/** An ISO time in the site's time zone, to the millisecond. */
export function fmtPrecise(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? String(iso) : precise.format(d);
}

/**
 * The text of `key` with its `{name}` fields filled by `values`, which may be nodes
 * (a link): a list of strings and nodes for h()/fill().
 */
function tn(key, values) {
  const text = t(key);
  const out = [];
  let last = 0;
  for (const m of text.matchAll(/\{(\w+)\}/g)) {
    out.push(text.slice(last, m.index));
    const value = values[m[1]];
    out.push(value === undefined || value === null ? "–" : value);
    last = m.index + m[0].length;
  }
  out.push(text.slice(last));
  return out.filter((part) => part !== "");
}

const has = (value) => value !== null && value !== undefined;

// per container, kept across re-renders (live updates): the kinds hidden, frames expanded
const views = new WeakMap();
let rendered = 0;

/** A value of a decoded field or event datum as text (objects as compact JSON). */
function text(value) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

function frameAnchor(prefix, id) {
  return `${prefix}-frame-${id}`;
}

/** A reference to frame `id`: a link to its item when the timeline holds it. */
function frameRef(ctx, id) {
  const label = t("timeline.frame_no", { id });
  if (id === null || id === undefined || !ctx.frames.has(String(id))) return label;
  const anchor = frameAnchor(ctx.prefix, id);
  return h("a", {
    href: `#${anchor}`,
    onclick: () => {
      ctx.reveal("frame");
      const details = document.getElementById(anchor)?.querySelector("details.tl-detail");
      if (details) details.open = true;
    },
  }, label);
}

function causeOf(ctx, cause) {
  if (!cause || !cause.kind) return t("timeline.cause_none");
  if (cause.kind === "frame") return tn("timeline.cause_frame", { frame: frameRef(ctx, cause.frame_id) });
  if (cause.kind === "api") return tn("timeline.cause_api", { ref: h("code", {}, text(cause.ref)) });
  const key = `timeline.cause_${cause.kind}`;
  const ref = cause.ref ? tv("timeline.cause_ref", cause.ref) : "–";
  return key in config.strings ? tn(key, { ref }) : `${cause.kind} ${ref}`;
}

function orderRef(orderNo) {
  return orderNo ? link(`/orders/${encodeURIComponent(orderNo)}`, orderNo) : "–";
}

/** A state of a transition's subject, translated by what the subject is. */
function state(family, value) {
  if (value === null || value === undefined) return t("timeline.state_none");
  const group = {
    port: "port_status", order: "order_status", command: "timeline.command_status",
    device: "timeline.device_state",
  }[family];
  return group ? tv(group, value) : String(value);
}

function facts(pairs) {
  const shown = pairs.filter(([, value]) => value !== null && value !== undefined && value !== "");
  if (!shown.length) return null;
  return h("dl", { class: "tl-facts" }, shown.map(([label, value]) => [h("dt", {}, label), h("dd", {}, value)]));
}

/** Decoded fields, a field's `_text` meaning beside its code. */
function fieldList(fields) {
  const entries = Object.entries(fields || {}).filter(([key]) => !key.endsWith("_text") || !(key.slice(0, -5) in fields));
  if (!entries.length) return null;
  return h("dl", { class: "tl-fields" }, entries.map(([key, value]) => {
    const meaning = fields[`${key}_text`];
    return [
      h("dt", {}, h("code", {}, key)),
      h("dd", {}, h("code", {}, text(value)),
        meaning !== undefined && meaning !== null ? h("span", { class: "tl-meaning" }, ` (${text(meaning)})`) : null),
    ];
  }));
}

// decoded fields worth a place on a frame's one line (as domain/timeline.py picks them)
const SUMMARY_FIELDS = ["port", "status", "result", "power_w", "energy_kwh", "duration_s", "stop_reason",
  "order_id", "order_no", "business_no", "card_id"];

function frameLine(item) {
  const fields = (item.decoded && item.decoded.fields) || {};
  const parts = SUMMARY_FIELDS.filter((key) => has(fields[key]) && typeof fields[key] !== "object").map((key) => {
    const meaning = fields[`${key}_text`];
    return `${key}=${text(fields[key])}${has(meaning) ? ` (${text(meaning)})` : ""}`;
  });
  return parts.length ? h("p", { class: "tl-line" }, h("code", {}, parts.join(" "))) : null;
}

function frameBody(ctx, item) {
  const decoded = item.decoded;
  const parts = [];
  if (decoded) {
    const header = Object.entries(decoded).filter(([key, value]) =>
      !["fields", "protocol", "direction", "command", "name", "masked"].includes(key) && typeof value !== "object");
    parts.push(h("div", { class: "tl-decoded" },
      h("p", { class: "tl-label muted" }, t("timeline.decoded")),
      fieldList(decoded.fields) || h("p", { class: "muted" }, t("timeline.no_fields")),
      header.length ? h("p", { class: "tl-header muted" }, header.map(([k, v]) => `${k}=${text(v)}`).join(" ")) : null,
      decoded.masked ? h("p", { class: "muted" }, t("timeline.masked")) : null));
  }
  if (item.hex) {
    parts.push(h("div", { class: "tl-raw" },
      h("p", { class: "tl-label muted" }, t("timeline.hex")),
      h("code", { class: "hex" }, item.hex)));
  }
  return [
    item.error ? h("p", { class: "error" }, t("timeline.decode_error", { error: item.error })) : null,
    frameLine(item),
    h("details", { class: "tl-detail", open: ctx.expanded },
      h("summary", {}, t("timeline.frame_details")),
      h("div", { class: "tl-frame-body" }, parts)),
  ];
}

function frameHead(item) {
  const decoded = item.decoded;
  const what = decoded ? `${decoded.command || item.command || "?"} ${decoded.name || ""}`.trim() : (item.command || "?");
  const arrow = item.direction === "in" ? "←" : "→";
  const sentAs = item.command && decoded && !item.command.startsWith("0x") ? ` (${tv("command", item.command)})` : "";
  return [
    h("span", { class: `tl-dir tl-${item.direction === "in" ? "in" : "out"}`, "aria-hidden": "true" }, arrow), " ",
    tv("timeline.direction", item.direction), ": ", h("strong", {}, what + sentAs), " ",
    h("span", { class: "muted" }, t("timeline.frame_no", { id: item.frame_id })),
  ];
}

function transitionHead(item) {
  const family = (item.type || "").split(".")[0];
  const subject = {
    port: () => t("timeline.subject_port", { port: item.port }),
    order: () => tn("timeline.subject_order", { order: orderRef(item.order_no) }),
    command: () => t("timeline.subject_command", {
      id: item.command_id, name: tv("command", (item.data || {}).name || ""),
    }),
    device: () => t("timeline.subject_device", { device: item.device_id }),
  }[family];
  return tn("timeline.transition", {
    subject: subject ? subject() : item.type,
    from: h("span", { class: "tl-state" }, state(family, item.from_state)),
    to: h("strong", { class: "tl-state" }, state(family, item.to_state)),
  });
}

function dataFacts(data) {
  const entries = Object.entries(data || {}).filter(([, v]) => v !== null && v !== undefined && v !== "");
  if (!entries.length) return null;
  return h("p", { class: "tl-data muted" }, entries.map(([k, v], i) => [
    i ? " · " : "", h("code", {}, k), "=", text(v),
  ]));
}

function settlementBody(item) {
  const d = item.data || {};
  const charge = d.charge || null;
  return facts([
    [t("order.stop_reason"), d.stop_reason ? tv("stop_reason", d.stop_reason) : null],
    [t("order.duration"), d.duration_s === null || d.duration_s === undefined ? null : fmtDuration(d.duration_s)],
    [t("order.energy"), d.energy_kwh === null || d.energy_kwh === undefined ? null : fmtUnit(d.energy_kwh, "kwh", 3)],
    [t("order.max_power"), d.max_power_w === null || d.max_power_w === undefined ? null : fmtUnit(d.max_power_w, "w", 1)],
    [t("order.amount"), fmtMoney(charge ? charge.amount_cent : d.amount_cent)],
    [t("order.plan"), charge ? (charge.plan || t("order.no_plan")) : null],
    [t("order.failure_reason"), d.failure_reason],
  ]);
}

function samplesBody(item) {
  const d = item.data || {};
  return facts([
    [t("timeline.sample_count"), d.count],
    [t("timeline.sample_energy"), `${fmtUnit(d.energy_kwh_first, "kwh", 3)} → ${fmtUnit(d.energy_kwh_last, "kwh", 3)}`],
    [t("order.max_power"), d.max_power_w === null || d.max_power_w === undefined ? null : fmtUnit(d.max_power_w, "w", 1)],
    [t("timeline.sample_last"), fmtPrecise(d.last_at)],
  ]);
}

function commandParts(ctx, item) {
  const d = item.data || {};
  const name = d.name || ctx.commandNames.get(item.command_id) || "";
  if (d.name) ctx.commandNames.set(item.command_id, d.name);
  const label = tv("command", name);
  if (item.type === "command.sent") {
    return {
      head: [t("timeline.command_sent", { id: item.command_id, name: label, attempt: d.attempts ?? "–" }),
        item.frame_id !== null && item.frame_id !== undefined ? [" ", tn("timeline.command_as_frame", { frame: frameRef(ctx, item.frame_id) })] : null],
      body: null,
    };
  }
  const params = d.params && Object.keys(d.params).length ? d.params : null;
  return {
    head: t("timeline.command_created", { id: item.command_id, name: label }),
    body: [
      params ? h("p", { class: "tl-data muted" }, t("timeline.params"), " ", h("code", {}, JSON.stringify(params))) : null,
      item.cause ? h("p", { class: "tl-cause" }, causeOf(ctx, item.cause)) : null,
    ],
  };
}

function renderItem(ctx, item) {
  let head;
  let body = null;
  switch (item.kind) {
    case "frame":
      head = frameHead(item);
      body = frameBody(ctx, item);
      break;
    case "transition":
      head = transitionHead(item);
      body = h("p", { class: "tl-cause" }, causeOf(ctx, item.cause));
      break;
    case "event":
      head = [h("strong", {}, tv("timeline.type", item.type)),
        item.order_no ? [" · ", orderRef(item.order_no)] : null,
        item.port ? [" · ", t("timeline.subject_port", { port: item.port })] : null];
      body = [dataFacts(item.data), h("p", { class: "tl-cause" }, causeOf(ctx, item.cause))];
      break;
    case "command": {
      const parts = commandParts(ctx, item);
      head = parts.head;
      body = parts.body;
      break;
    }
    case "settlement":
      head = [h("strong", {}, t("timeline.settled")), " ", orderRef(item.order_no)];
      body = settlementBody(item);
      break;
    case "samples":
      head = t("timeline.samples", { count: (item.data || {}).count ?? "–" });
      body = samplesBody(item);
      break;
    default:
      head = item.summary;
  }
  const attrs = { class: `tl-item tl-${KINDS.includes(item.kind) ? item.kind : "other"}`, "data-kind": item.kind };
  if (item.kind === "frame" && item.frame_id !== null && item.frame_id !== undefined) {
    attrs.id = frameAnchor(ctx.prefix, item.frame_id);
  }
  if (ctx.hidden.has(item.kind)) attrs.hidden = true;
  return h("li", attrs,
    h("div", { class: "tl-head" },
      h("time", { datetime: item.at, class: "tl-time" }, fmtPrecise(item.at)), " ",
      h("span", { class: `badge tl-kind tl-kind-${item.kind}` }, tv("timeline.kind", item.kind)), " ",
      h("span", { class: "tl-what" }, head)),
    body ? h("div", { class: "tl-body" }, body) : null);
}

/**
 * Render `items` (a timeline's `items`) into `container`: a filter by kind (remembered
 * across renders of the same container), a note when the API cut the timeline
 * (`truncated`, `limit`), and the list.
 */
export function renderTimeline(container, items, { truncated = false, limit = null } = {}) {
  const node = typeof container === "string" ? document.getElementById(container) : container;
  if (!views.has(node)) views.set(node, { hidden: new Set(), expanded: false });
  const view = views.get(node);
  const hidden = view.hidden;
  if (!node.dataset.timeline) node.dataset.timeline = String(++rendered);
  const prefix = `tl${node.dataset.timeline}`;
  const list = h("ol", { class: "timeline" });
  const ctx = {
    prefix,
    hidden,
    expanded: view.expanded,
    frames: new Set((items || []).filter((i) => i.kind === "frame").map((i) => String(i.frame_id))),
    commandNames: new Map(),
    reveal: (kind) => {
      if (!hidden.has(kind)) return;
      hidden.delete(kind);
      const box = node.querySelector(`input[data-kind="${kind}"]`);
      if (box) box.checked = true;
      list.querySelectorAll(`li[data-kind="${kind}"]`).forEach((li) => { li.hidden = false; });
    },
  };
  for (const item of items || []) list.append(renderItem(ctx, item));

  const present = KINDS.filter((kind) => (items || []).some((i) => i.kind === kind));
  const boxes = present.map((kind) => {
    const id = `${prefix}-show-${kind}`;
    const count = items.filter((i) => i.kind === kind).length;
    return h("span", { class: "tl-toggle" },
      h("input", {
        type: "checkbox", id, checked: !hidden.has(kind), "data-kind": kind,
        onchange: (event) => {
          if (event.target.checked) hidden.delete(kind); else hidden.add(kind);
          list.querySelectorAll(`li[data-kind="${kind}"]`).forEach((li) => { li.hidden = !event.target.checked; });
        },
      }),
      h("label", { for: id }, `${tv("timeline.kind", kind)} (${count})`));
  });
  const expandId = `${prefix}-expand`;
  const expand = ctx.frames.size ? h("span", { class: "tl-toggle tl-expand" },
    h("input", {
      type: "checkbox", id: expandId, checked: view.expanded,
      onchange: (event) => {
        view.expanded = event.target.checked;
        list.querySelectorAll("details.tl-detail").forEach((d) => { d.open = view.expanded; });
      },
    }),
    h("label", { for: expandId }, t("timeline.expand_frames"))) : null;
  fill(node,
    present.length > 1 || expand
      ? h("fieldset", { class: "tl-filter" }, h("legend", {}, t("timeline.show")), present.length > 1 ? boxes : null, expand)
      : null,
    truncated ? h("p", { class: "banner warn", role: "note" }, t("timeline.truncated", { limit: limit ?? items.length })) : null,
    items && items.length ? list : h("p", { class: "muted" }, t("timeline.empty")));
}
