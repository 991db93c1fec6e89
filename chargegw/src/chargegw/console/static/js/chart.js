// Line charts drawn as SVG: time on the x axis (ticks in the site's time zone), one y
// axis per unit (the first unit on the left, a second on the right), a legend, a
// <title> and aria-label saying what it shows, and a data table beside it for those who
// cannot see it. Colours are presentation attributes (stroke) plus classes `series-N`
// a stylesheet may override; no inline styles.
import { config, fmtTime, h, t } from "./core.js";

const WIDTH = 760;
const HEIGHT = 280;
const PAD = { top: 48, right: 64, bottom: 36, left: 64 };
// colours with at least 3:1 contrast on white, told apart by dash pattern too
const COLOURS = ["#0a5bc4", "#b35900", "#116329", "#8250df"];
const DASHES = [null, "6 4", "2 3", "10 3 2 3"];

const locale = config.lang === "zh" ? "zh-CN" : "en-GB";
const numberFormat = (digits) => new Intl.NumberFormat(locale, { maximumFractionDigits: digits });
const clock = new Intl.DateTimeFormat(locale, {
  timeZone: config.timezone, hour: "2-digit", minute: "2-digit", hourCycle: "h23",
});
const clockSeconds = new Intl.DateTimeFormat(locale, {
  timeZone: config.timezone, hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23",
});
const dayClock = new Intl.DateTimeFormat(locale, {
  timeZone: config.timezone, month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit",
  hourCycle: "h23",
});
const offsetParts = new Intl.DateTimeFormat("en-US", {
  timeZone: config.timezone, year: "numeric", month: "numeric", day: "numeric",
  hour: "numeric", minute: "numeric", second: "numeric", hourCycle: "h23",
});

/** The site's time zone's offset from UTC at `ms`, in milliseconds. */
export function zoneOffset(ms) {
  const parts = Object.fromEntries(offsetParts.formatToParts(new Date(ms)).map((p) => [p.type, p.value]));
  const wall = Date.UTC(Number(parts.year), Number(parts.month) - 1, Number(parts.day),
    Number(parts.hour) % 24, Number(parts.minute), Number(parts.second));
  return wall - (ms - (ms % 1000));
}

const SECOND = 1000;
const MINUTE = 60 * SECOND;
const HOUR = 60 * MINUTE;
const TIME_STEPS = [
  SECOND, 2 * SECOND, 5 * SECOND, 10 * SECOND, 15 * SECOND, 30 * SECOND,
  MINUTE, 2 * MINUTE, 5 * MINUTE, 10 * MINUTE, 15 * MINUTE, 30 * MINUTE,
  HOUR, 2 * HOUR, 3 * HOUR, 6 * HOUR, 12 * HOUR, 24 * HOUR, 2 * 24 * HOUR, 7 * 24 * HOUR,
];

/** Time ticks between `from` and `to` (ms), on round wall-clock times of the site. */
function timeTicks(from, to, wanted = 6) {
  const span = Math.max(to - from, SECOND);
  const step = TIME_STEPS.find((s) => span / s <= wanted) || TIME_STEPS[TIME_STEPS.length - 1];
  const offset = zoneOffset(from);
  let tick = Math.ceil((from + offset) / step) * step - offset;
  const ticks = [];
  for (; tick <= to && ticks.length < 50; tick += step) ticks.push(tick);
  let format = clock;
  if (span > 24 * HOUR) format = dayClock;
  else if (step < MINUTE) format = clockSeconds;
  return { ticks, format: (ms) => format.format(new Date(ms)) };
}

/** Round value ticks from 0 (or below, for negative values) to at least `max`. */
function valueTicks(min, max, wanted = 5) {
  const low = Math.min(0, min);
  let high = Math.max(max, low + 1e-9);
  if (high === low) high = low + 1;
  const raw = (high - low) / wanted;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => s >= raw) || 10 * power;
  const top = Math.ceil(high / step) * step;
  const bottom = Math.floor(low / step) * step;
  const ticks = [];
  for (let v = bottom; v <= top + step / 2; v += step) ticks.push(Number(v.toPrecision(12)));
  const digits = Math.max(0, -Math.floor(Math.log10(step)) + (step / power === 2.5 ? 1 : 0));
  return { ticks, low: bottom, high: top, digits };
}

/** About how wide `text` is at `size` px: CJK characters are square, others narrower. */
function textWidth(text, size) {
  let width = 0;
  for (const ch of text) width += ch.codePointAt(0) > 0x2e80 ? size : size * 0.6;
  return width;
}

function unitLabel(unit) {
  return unit ? t(`unit.${unit}`) : "";
}

function seriesName(s) {
  return s.unit ? `${s.label} (${unitLabel(s.unit)})` : s.label;
}

/** What the chart shows, for its <title> and aria-label. */
function describe(series, from, to) {
  const count = series.reduce((n, s) => n + s.points.length, 0);
  return t("chart.description", {
    series: series.map(seriesName).join(", "),
    from: fmtTime(new Date(from).toISOString()),
    to: fmtTime(new Date(to).toISOString()),
    count,
  });
}

/**
 * A line chart: `series` are `{label, unit, points: [[t_ms, value], ...]}` (values may
 * be null: a gap). Series of the first unit use the left axis, of a second unit the
 * right one. Returns an `<svg>` element (role img, with a <title> and aria-label).
 */
export function lineChart({ series, title = null, width = WIDTH, height = HEIGHT } = {}) {
  const drawn = (series || []).map((s, i) => ({
    ...s, index: i, points: (s.points || []).filter(([at]) => Number.isFinite(at)),
  }));
  const all = drawn.flatMap((s) => s.points);
  const description = title ? `${title}: ` : "";
  if (!all.length) {
    return h("svg", {
      class: "chart empty", viewBox: `0 0 ${width} 60`, role: "img", "aria-label": description + t("chart.no_data"),
    }, h("title", {}, description + t("chart.no_data")),
    h("text", { x: width / 2, y: 34, "text-anchor": "middle", class: "chart-empty", fill: "#57606a" }, t("chart.no_data")));
  }
  const from = Math.min(...all.map(([at]) => at));
  let to = Math.max(...all.map(([at]) => at));
  if (to === from) to = from + MINUTE;
  const left = PAD.left;
  const right = width - PAD.right;
  const top = PAD.top;
  const bottom = height - PAD.bottom;
  const x = (at) => left + ((at - from) / (to - from)) * (right - left);

  // one axis per unit: the first two units get an axis each; a third shares the left
  const units = [...new Set(drawn.map((s) => s.unit || ""))];
  const axes = units.slice(0, 2).map((unit, side) => {
    const values = drawn.filter((s) => (s.unit || "") === unit || (side === 0 && units.indexOf(s.unit || "") > 1))
      .flatMap((s) => s.points.map(([, v]) => v)).filter((v) => v !== null && Number.isFinite(Number(v))).map(Number);
    const scale = valueTicks(values.length ? Math.min(...values) : 0, values.length ? Math.max(...values) : 1);
    const y = (v) => bottom - ((v - scale.low) / (scale.high - scale.low || 1)) * (bottom - top);
    return { unit, side, scale, y };
  });
  const axisOf = (s) => axes.find((a) => a.unit === (s.unit || "")) || axes[0];

  const label = describe(drawn, from, to);
  const svg = h("svg", {
    class: "chart", viewBox: `0 0 ${width} ${height}`, width: "100%", role: "img",
    "aria-label": description + label, preserveAspectRatio: "xMidYMid meet",
  }, h("title", {}, description + label));

  // grid and value axes
  const grid = h("g", { class: "chart-grid", "aria-hidden": "true" });
  for (const axis of axes) {
    const fmt = numberFormat(axis.scale.digits);
    const atX = axis.side === 0 ? left : right;
    grid.append(h("line", { x1: atX, x2: atX, y1: top, y2: bottom, stroke: "#8c959f", class: "chart-axis" }));
    for (const v of axis.scale.ticks) {
      const yy = axis.y(v);
      if (axis.side === 0) {
        grid.append(h("line", { x1: left, x2: right, y1: yy, y2: yy, stroke: "#e1e4e8", class: "chart-gridline" }));
      }
      grid.append(h("text", {
        x: axis.side === 0 ? left - 6 : right + 6, y: yy + 4, "text-anchor": axis.side === 0 ? "end" : "start",
        fill: "#424a53", "font-size": 11, class: "chart-tick",
      }, fmt.format(v)));
    }
    grid.append(h("text", {
      x: axis.side === 0 ? left - 6 : right + 6, y: top - 10, "text-anchor": axis.side === 0 ? "end" : "start",
      fill: "#424a53", "font-size": 11, class: "chart-unit",
    }, unitLabel(axis.unit)));
  }
  // time axis
  grid.append(h("line", { x1: left, x2: right, y1: bottom, y2: bottom, stroke: "#8c959f", class: "chart-axis" }));
  const time = timeTicks(from, to);
  for (const tick of time.ticks) {
    const xx = x(tick);
    grid.append(h("line", { x1: xx, x2: xx, y1: bottom, y2: bottom + 4, stroke: "#8c959f" }));
    grid.append(h("text", {
      x: xx, y: bottom + 18, "text-anchor": "middle", fill: "#424a53", "font-size": 11, class: "chart-tick",
    }, time.format(tick)));
  }
  svg.append(grid);

  // the lines: a path per series, broken where a value is missing
  for (const s of drawn) {
    const axis = axisOf(s);
    let d = "";
    let pen = "M";
    for (const [at, value] of [...s.points].sort((a, b) => a[0] - b[0])) {
      if (value === null || value === undefined || !Number.isFinite(Number(value))) { pen = "M"; continue; }
      d += `${pen}${x(at).toFixed(1)},${axis.y(Number(value)).toFixed(1)} `;
      pen = "L";
    }
    const colour = COLOURS[s.index % COLOURS.length];
    svg.append(h("path", {
      d: d.trim() || null, fill: "none", stroke: colour, "stroke-width": 2,
      "stroke-dasharray": DASHES[s.index % DASHES.length], "stroke-linejoin": "round",
      class: `series series-${s.index}`, "data-points": s.points.length,
    }));
    if (s.points.length === 1) {
      const [at, value] = s.points[0];
      if (value !== null) {
        svg.append(h("circle", { cx: x(at), cy: axis.y(Number(value)), r: 3, fill: colour, class: `series-${s.index}` }));
      }
    }
  }

  // legend, above the plot
  const legend = h("g", { class: "chart-legend" });
  let lx = left;
  for (const s of drawn) {
    const colour = COLOURS[s.index % COLOURS.length];
    legend.append(h("line", {
      x1: lx, x2: lx + 22, y1: 12, y2: 12, stroke: colour, "stroke-width": 2,
      "stroke-dasharray": DASHES[s.index % DASHES.length], class: `series-${s.index}`,
    }));
    const text = seriesName(s);
    legend.append(h("text", { x: lx + 28, y: 16, fill: "#1b1f24", "font-size": 12 }, text));
    lx += 44 + textWidth(text, 12);
  }
  svg.append(legend);
  return svg;
}

/** The chart's values as a table in a <details>: one row per time, a column per series. */
export function chartTable({ series, caption = null, digits = [] } = {}) {
  const drawn = series || [];
  const times = [...new Set(drawn.flatMap((s) => (s.points || []).map(([at]) => at)))].sort((a, b) => a - b);
  const byTime = drawn.map((s) => new Map((s.points || []).map(([at, v]) => [at, v])));
  const formats = drawn.map((_, i) => numberFormat(digits[i] ?? 3));
  const head = h("tr", {}, h("th", { scope: "col" }, t("chart.time")),
    drawn.map((s) => h("th", { scope: "col", class: "num" }, seriesName(s))));
  const rows = times.length
    ? times.map((at) => h("tr", {}, h("td", {}, fmtTime(new Date(at).toISOString())),
      byTime.map((values, i) => {
        const v = values.get(at);
        return h("td", { class: "num" }, v === null || v === undefined ? "–" : formats[i].format(Number(v)));
      })))
    : [h("tr", {}, h("td", { colspan: drawn.length + 1, class: "empty" }, t("chart.no_data")))];
  return h("details", { class: "chart-data" },
    h("summary", {}, t("chart.data_table", { count: times.length })),
    h("table", {}, caption ? h("caption", {}, caption) : null, h("thead", {}, head), h("tbody", {}, rows)));
}

/** A <figure>: the chart, its caption and its data table. */
export function chartFigure({ series, caption, digits = [] }) {
  return h("figure", { class: "chart-figure" },
    lineChart({ series, title: caption }),
    h("figcaption", { class: "muted" }, caption),
    chartTable({ series, caption, digits }));
}
