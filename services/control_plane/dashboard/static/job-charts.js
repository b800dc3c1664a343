// A job page's live charts (loss, acceptance, accuracy per slot, throughput, data wait), their
// legends, and the tiles above them with each curve's latest value.
//
//   const board = chartBoard(grid, tiles);
//   board.build(job.config.block_size, detailsCard);  board.add(row);  board.render();

import { h } from "/dashboard/dom.js";
import { LineChart, compact, percent, ramp } from "/dashboard/plot.js";

const COLORS = { blue: "#6366f1", orange: "#f59e0b", green: "#10b981", pink: "#ec4899", sky: "#0ea5e9" };
const CHARTS = [
  {
    id: "loss",
    title: "Loss",
    unit: "train per log step, validation per epoch",
    series: [
      { key: "train/loss", label: "train", color: COLORS.blue },
      { key: "val/loss", label: "validation", color: COLORS.orange, markers: true },
    ],
    logToggle: true,
  },
  {
    id: "eal",
    title: "Acceptance length",
    unit: "train / validation: expected tokens per block (teacher-forced) · live tau: greedy speculative "
      + "decoding on held-out prompts (--eval-every)",
    series: [
      { key: "train/eal", label: "train", color: COLORS.green },
      { key: "val/eal", label: "validation", color: COLORS.orange, markers: true },
      { key: "eval/tau", label: "live tau", color: COLORS.pink, markers: true },
    ],
  },
  {
    id: "accuracy",
    title: "Accuracy per slot",
    unit: "train, by draft position",
    series: [], // one per draft position, added when the job's block size is known
    format: percent,
    yMin: 0,
  },
  {
    id: "throughput",
    title: "Throughput",
    unit: "tokens / s",
    series: [{ key: "train/tokens_per_s", label: "tokens/s", color: COLORS.sky }],
    yMin: 0,
  },
  {
    id: "wait",
    title: "Data wait",
    unit: "share of step time waiting for hidden states",
    series: [{ key: "train/data_wait_frac", label: "waiting", color: COLORS.pink }],
    format: percent,
    yMin: 0,
  },
];

function tile(label, value, sub) {
  return h("div", { class: "tile" },
    h("div", { class: "tile-label" }, label),
    h("div", { class: "tile-value" }, value),
    h("div", { class: "tile-sub muted" }, sub ?? ""));
}

/** One series per draft position after the first (position 0 is the anchor, never predicted). */
function slotSeries(blockSize) {
  const slots = Math.max((blockSize ?? 2) - 1, 1);
  const colors = ramp(slots);
  return Array.from({ length: slots }, (_, i) =>
    ({ key: `train/acc_slot_${i + 1}`, label: `slot ${i + 1}`, color: colors[i] }));
}

function logToggle(chart) {
  return h("button", { class: "btn btn-ghost btn-xs", type: "button", title: "Logarithmic y axis", onclick: (event) => {
    chart().options.log = !chart().options.log;
    event.currentTarget.classList.toggle("active", chart().options.log);
    chart().schedule();
  } }, "log");
}

export function chartBoard(grid, tiles) {
  let charts = {};
  let legends = {};
  const last = (chart, key) => charts[chart]?.last(key) ?? null;

  function build(blockSize, details) {
    destroy();
    grid.replaceChildren();
    for (const spec of CHARTS) {
      const series = spec.id === "accuracy" ? slotSeries(blockSize) : spec.series;
      const body = h("div", { class: "chart-body", dataset: { chart: spec.id } });
      const legend = h("div", { class: "legend" });
      const toggle = spec.logToggle ? logToggle(() => charts[spec.id]) : null;
      const unit = spec.unit ? h("div", { class: "muted small" }, spec.unit) : null;
      grid.append(h("section", { class: "card chart-card" },
        h("div", { class: "card-head" }, h("div", {}, h("h3", {}, spec.title), unit), toggle),
        body, legend));
      charts[spec.id] = new LineChart(body, { series, format: spec.format ?? compact, yMin: spec.yMin, height: 190 });
      legends[spec.id] = legend;
    }
    grid.append(details);
  }

  /** A metric row: each chart takes the series it draws. */
  function add(row) {
    for (const chart of Object.values(charts)) {
      for (const key of chart.series.keys()) {
        if (key in row.metrics) chart.add(key, row.step, row.metrics[key]);
      }
    }
  }

  function renderLegend(id, chart) {
    const format = chart.options.format;
    const latest = (s) => (s.points.length ? format(s.points[s.points.length - 1][1]) : "–");
    legends[id].replaceChildren(...[...chart.series.values()].map((s) =>
      h("span", { class: "legend-item" }, h("i", { style: `background:${s.color}` }), s.label, h("b", {}, latest(s)))));
  }

  function acceptanceTile() {
    // Live tau (what serving gets) when the run measures it, else the teacher-forced estimates.
    const [value, sub] = last("eal", "eval/tau") !== null
      ? [last("eal", "eval/tau"), "live tau (speculative decoding)"]
      : last("eal", "val/eal") !== null ? [last("eal", "val/eal"), "validation"] : [last("eal", "train/eal"), "train"];
    return tile("Acceptance length", compact(value), sub);
  }

  function renderTiles() {
    const lossNow = last("loss", "train/loss");
    const lossFirst = charts.loss?.series.get("train/loss").points[0]?.[1] ?? null;
    const moved = lossFirst !== null && lossNow !== null && lossFirst !== lossNow;
    tiles.replaceChildren(
      tile("Train loss", compact(lossNow), moved ? `from ${compact(lossFirst)}` : "latest"),
      tile("Validation loss", compact(last("loss", "val/loss")), "latest evaluation"),
      acceptanceTile(),
      tile("Throughput", compact(last("throughput", "train/tokens_per_s")), "tokens / s"),
      tile("Data wait", percent(last("wait", "train/data_wait_frac")), "of step time"),
    );
  }

  /** The tiles and legends, from what the charts hold now. */
  function render() {
    renderTiles();
    for (const [id, chart] of Object.entries(charts)) renderLegend(id, chart);
  }

  function destroy() {
    for (const chart of Object.values(charts)) chart.destroy();
    charts = {};
    legends = {};
  }

  return { build, add, render, destroy };
}
