// A small SVG line chart for live training curves: no dependencies, works offline.
//
//   const chart = new LineChart(element, { series: [{ key: "train/loss", label: "train", color: "#…" }] });
//   chart.add("train/loss", step, value);   // cheap; the chart redraws once per animation frame
//
// Series share the x axis (the global step). A point whose x is not past the series' last one
// replaces the tail from that x on: a resumed job repeats the steps since its checkpoint, and the
// newer attempt is what the chart should show. Long series are reduced to the min and max of each
// pixel column before drawing, so thousands of rows stay smooth. The container's `data-points`
// attribute holds the number of points plotted (tests read it).

const SVG = "http://www.w3.org/2000/svg";
const PAD = { top: 10, right: 14, bottom: 24, left: 48 };

function svg(tag, attrs = {}, parent = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (parent) parent.appendChild(node);
  return node;
}

/** Round tick values covering [lo, hi]: steps of 1, 2 or 5 times a power of ten. */
export function niceTicks(lo, hi, count = 5) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / Math.max(count, 1);
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => s >= raw) ?? 10 * power;
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) {
    ticks.push(Math.abs(v) < step * 1e-9 ? 0 : Number(v.toPrecision(12)));
  }
  return ticks;
}

function logTicks(lo, hi) {
  const ticks = [];
  const mantissas = Math.log10(hi / lo) < 1.5 ? [1, 2, 5] : [1];
  for (let e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++) {
    for (const m of mantissas) {
      const v = m * 10 ** e;
      if (v >= lo * 0.999 && v <= hi * 1.001) ticks.push(v);
    }
  }
  return ticks.length >= 2 ? ticks : niceTicks(lo, hi, 4);
}

/** 1234 -> "1.23k"; 0.000123 -> "1.23e-4"; 42 -> "42". */
export function compact(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  const abs = Math.abs(value);
  if (abs >= 1e9) return `${+(value / 1e9).toPrecision(3)}G`;
  if (abs >= 1e6) return `${+(value / 1e6).toPrecision(3)}M`;
  if (abs >= 1e4) return `${+(value / 1e3).toPrecision(3)}k`;
  if (abs !== 0 && abs < 1e-3) return value.toExponential(1);
  return `${+value.toPrecision(3)}`;
}

export const percent = (value) => (value === null || value === undefined ? "–" : `${+(value * 100).toPrecision(3)}%`);

/** Keep the first and last point and each pixel column's min and max, in x order. */
function reduce(points, x0, x1, width) {
  if (points.length <= width * 2) return points;
  const out = [];
  const scale = width / Math.max(x1 - x0, 1e-12);
  let column = null;
  let lo = null;
  let hi = null;
  const flush = () => {
    if (lo === null) return;
    if (lo === hi) out.push(lo);
    else if (lo[0] <= hi[0]) out.push(lo, hi);
    else out.push(hi, lo);
  };
  for (const p of points) {
    const c = Math.floor((p[0] - x0) * scale);
    if (c !== column) {
      flush();
      column = c;
      lo = hi = p;
    } else {
      if (p[1] < lo[1]) lo = p;
      if (p[1] > hi[1]) hi = p;
    }
  }
  flush();
  return out;
}

export class LineChart {
  /**
   * options.series: [{ key, label, color, dashed?, markers? }] (markers: draw dots, for sparse
   *   series such as validation rows);
   * options.format: y value -> text (axis and tooltip); options.log: log-scale y axis;
   * options.yMin / options.yMax: fixed ends of the y axis (else from the data);
   * options.height: pixels; options.empty: the text shown before the first point.
   */
  constructor(element, options) {
    this.element = element;
    this.options = { format: compact, height: 200, empty: "Waiting for the first metrics…", ...options };
    this.series = new Map();
    for (const def of this.options.series) this.addSeries(def);
    this.width = 0;
    this.frame = 0;
    this.hoverX = null;
    element.classList.add("chart");
    this.root = svg("svg", { class: "chart-svg", height: this.options.height, role: "img" }, element);
    this.emptyNode = document.createElement("div");
    this.emptyNode.className = "chart-empty";
    this.emptyNode.textContent = this.options.empty;
    element.appendChild(this.emptyNode);
    this.tooltip = document.createElement("div");
    this.tooltip.className = "chart-tooltip";
    element.appendChild(this.tooltip);
    this.root.addEventListener("pointermove", (event) => this.hover(event));
    this.root.addEventListener("pointerleave", () => this.hover(null));
    this.resizer = new ResizeObserver(() => this.schedule());
    this.resizer.observe(element);
    this.schedule();
  }

  addSeries(def) {
    if (!this.series.has(def.key)) this.series.set(def.key, { ...def, points: [] });
    return this.series.get(def.key);
  }

  has(key) {
    return this.series.has(key);
  }

  add(key, x, y) {
    const series = this.series.get(key);
    if (!series || y === null || y === undefined || !Number.isFinite(y)) return;
    const points = series.points;
    if (points.length && x <= points[points.length - 1][0]) {
      let keep = points.length;
      while (keep > 0 && points[keep - 1][0] >= x) keep--;
      points.length = keep;
    }
    points.push([x, y]);
    this.schedule();
  }

  count() {
    let n = 0;
    for (const s of this.series.values()) n += s.points.length;
    return n;
  }

  last(key) {
    const points = this.series.get(key)?.points;
    return points?.length ? points[points.length - 1][1] : null;
  }

  destroy() {
    this.resizer.disconnect();
    cancelAnimationFrame(this.frame);
  }

  schedule() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.draw();
    });
  }

  bounds() {
    let x0 = Infinity;
    let x1 = -Infinity;
    let y0 = Infinity;
    let y1 = -Infinity;
    for (const s of this.series.values()) {
      for (const [x, y] of s.points) {
        if (this.options.log && y <= 0) continue;
        if (x < x0) x0 = x;
        if (x > x1) x1 = x;
        if (y < y0) y0 = y;
        if (y > y1) y1 = y;
      }
    }
    if (x0 === Infinity) return null;
    if (x1 === x0) x1 = x0 + 1;
    if (this.options.yMin !== undefined) y0 = Math.min(this.options.yMin, y0);
    if (this.options.yMax !== undefined) y1 = Math.max(this.options.yMax, y1);
    if (y1 === y0) {
      const d = Math.abs(y0) * 0.1 || 1;
      y0 = this.options.log ? y0 / 2 : y0 - d;
      y1 = this.options.log ? y1 * 2 : y1 + d;
    } else if (!this.options.log) {
      const margin = (y1 - y0) * 0.06;
      if (this.options.yMin === undefined) y0 = y0 >= 0 && y0 - margin < 0 ? 0 : y0 - margin;
      if (this.options.yMax === undefined) y1 += margin;
    } else {
      y0 /= 1.15;
      y1 *= 1.15;
    }
    return { x0, x1, y0, y1 };
  }

  draw() {
    const width = Math.max(this.element.clientWidth, 120);
    const height = this.options.height;
    this.width = width;
    this.root.setAttribute("width", width);
    this.root.setAttribute("viewBox", `0 0 ${width} ${height}`);
    this.root.replaceChildren();
    const total = this.count();
    this.element.dataset.points = String(total);
    this.emptyNode.hidden = total > 0;
    const b = this.bounds();
    if (!b) return;
    const plotW = width - PAD.left - PAD.right;
    const plotH = height - PAD.top - PAD.bottom;
    const log = this.options.log;
    const ly = (v) => (log ? Math.log10(v) : v);
    const sx = (x) => PAD.left + ((x - b.x0) / (b.x1 - b.x0)) * plotW;
    const sy = (y) => PAD.top + plotH - ((ly(y) - ly(b.y0)) / (ly(b.y1) - ly(b.y0))) * plotH;
    this.scale = { sx, b, plotW };

    const grid = svg("g", { class: "chart-gridlines" }, this.root);
    const yTicks = log ? logTicks(b.y0, b.y1) : niceTicks(b.y0, b.y1, Math.max(2, Math.round(plotH / 36)));
    for (const t of yTicks) {
      const y = sy(t);
      if (y < PAD.top - 1 || y > PAD.top + plotH + 1) continue;
      svg("line", { x1: PAD.left, x2: PAD.left + plotW, y1: y, y2: y }, grid);
      const label = svg("text", { x: PAD.left - 8, y: y + 4, "text-anchor": "end" }, grid);
      label.textContent = this.options.format(t);
    }
    const xTicks = niceTicks(b.x0, b.x1, Math.max(2, Math.round(plotW / 90))).filter(
      (t) => Number.isInteger(t) || b.x1 - b.x0 < 10,
    );
    for (const t of xTicks) {
      const x = sx(t);
      if (x < PAD.left - 1 || x > PAD.left + plotW + 1) continue;
      const label = svg("text", { x, y: height - 6, "text-anchor": "middle" }, grid);
      label.textContent = compact(t);
    }
    const axisY = PAD.top + plotH;
    svg("line", { class: "chart-axis", x1: PAD.left, x2: PAD.left + plotW, y1: axisY, y2: axisY }, grid);

    for (const s of this.series.values()) {
      if (!s.points.length) continue;
      const shown = log ? s.points.filter((p) => p[1] > 0) : s.points;
      if (!shown.length) continue;
      const points = reduce(shown, b.x0, b.x1, plotW);
      const d = points.map(([x, y], i) => `${i ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join("");
      svg("path", {
        d,
        class: "chart-line",
        stroke: s.color,
        "stroke-dasharray": s.dashed ? "5 4" : "none",
      }, this.root);
      if (s.markers || s.points.length === 1) {
        for (const [x, y] of points) {
          svg("circle", { cx: sx(x), cy: sy(y), r: 3, fill: s.color, class: "chart-marker" }, this.root);
        }
      }
    }
    this.cursor = svg("g", { class: "chart-cursor" }, this.root);
    this.sy = sy;
    if (this.hoverX !== null) this.showHover();
  }

  hover(event) {
    if (!event || !this.scale) {
      this.hoverX = null;
      this.tooltip.style.opacity = "0";
      this.cursor?.replaceChildren();
      return;
    }
    const rect = this.root.getBoundingClientRect();
    const { b, plotW } = this.scale;
    const px = Math.min(Math.max(event.clientX - rect.left - PAD.left, 0), plotW);
    this.hoverX = b.x0 + (px / plotW) * (b.x1 - b.x0);
    this.showHover();
  }

  showHover() {
    const { sx } = this.scale;
    let best = null;
    const rows = [];
    for (const s of this.series.values()) {
      const nearest = nearestPoint(s.points, this.hoverX);
      if (!nearest) continue;
      if (!best || Math.abs(nearest[0] - this.hoverX) < Math.abs(best - this.hoverX)) best = nearest[0];
      rows.push([s, nearest]);
    }
    this.cursor.replaceChildren();
    if (best === null) return;
    const x = sx(best);
    svg("line", { x1: x, x2: x, y1: PAD.top, y2: this.options.height - PAD.bottom }, this.cursor);
    const lines = [`<div class="chart-tooltip-step">step ${best.toLocaleString()}</div>`];
    for (const [s, [px, py]] of rows) {
      if (px !== best) continue;
      svg("circle", { cx: x, cy: this.sy(py), r: 3.5, fill: s.color }, this.cursor);
      lines.push(
        `<div><i style="background:${s.color}"></i>${escapeHtml(s.label)}<b>${this.options.format(py)}</b></div>`,
      );
    }
    this.tooltip.innerHTML = lines.join("");
    this.tooltip.style.opacity = "1";
    const left = x + 12 + this.tooltip.offsetWidth > this.width ? x - 12 - this.tooltip.offsetWidth : x + 12;
    this.tooltip.style.transform = `translate(${left}px, ${PAD.top}px)`;
  }
}

function nearestPoint(points, x) {
  if (!points.length) return null;
  let lo = 0;
  let hi = points.length - 1;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (points[mid][0] < x) lo = mid + 1;
    else hi = mid;
  }
  if (lo > 0 && Math.abs(points[lo - 1][0] - x) <= Math.abs(points[lo][0] - x)) lo -= 1;
  return points[lo];
}

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

/** `n` colours from light to dark along one hue family (per-slot accuracy: slot 1 first). */
export function ramp(n) {
  const stops = [
    [94, 234, 212],
    [45, 212, 191],
    [20, 184, 166],
    [13, 148, 136],
    [14, 116, 144],
    [30, 64, 175],
    [67, 56, 202],
  ];
  const out = [];
  for (let i = 0; i < n; i++) {
    const t = n === 1 ? 0 : i / (n - 1);
    const pos = t * (stops.length - 1);
    const k = Math.min(Math.floor(pos), stops.length - 2);
    const f = pos - k;
    const c = stops[k].map((v, j) => Math.round(v + (stops[k + 1][j] - v) * f));
    out.push(`rgb(${c.join(",")})`);
  }
  return out.reverse(); // slot 1 (the easiest to get right) darkest, the last slot lightest
}
