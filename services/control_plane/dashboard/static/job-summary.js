// The top of a job page: its title and actions, the reason it gives, the Run card, and the
// progress card (percent, steps, rate and ETA). Each is rendered from the job record alone.

import { h, stateChip } from "/dashboard/dom.js";
import { absoluteTime, duration, etaOf, gpusText, integer, progressOf, rateOf, relativeTime, shortPath, tookText }
  from "/dashboard/format.js";
import { meta } from "/dashboard/meta.js";
import { SERVICES_PATH } from "/dashboard/nav.js";

const plural = (n, word) => `${n} ${word}${n > 1 ? "s" : ""}`;

/** The buttons a job's state allows: `on` has cancel(), resume() and remove(). */
function actions(job, on) {
  const ended = meta.terminal.has(job.state);
  const buttons = [];
  if (job.cancel_requested && !ended) buttons.push(h("button", { class: "btn", disabled: true }, "Cancelling…"));
  if (!ended && !job.cancel_requested) {
    buttons.push(h("button", { class: "btn btn-danger", type: "button", onclick: on.cancel }, "Cancel"));
  }
  if (job.state === "failed" || job.state === "cancelled") {
    buttons.push(h("button", { class: "btn btn-primary", type: "button", onclick: on.resume }, "Resume"));
  }
  buttons.push(h("a", { class: "btn", href: `/new?from=${encodeURIComponent(job.id)}`, "data-link": true }, "Clone"));
  if (!meta.active.has(job.state)) {
    buttons.push(h("button", { class: "btn btn-ghost btn-danger-text", type: "button", onclick: on.remove }, "Delete"));
  }
  return buttons;
}

export function renderHead(head, callout, job, on) {
  const c = job.config;
  head.replaceChildren(
    h("div", { class: "job-title" }, h("h1", {}, job.name || job.id), stateChip(job.state)),
    h("div", { class: "job-actions" }, actions(job, on)),
    h("div", { class: "job-meta muted" },
      job.name ? h("span", { class: "mono" }, job.id) : null,
      h("span", { title: absoluteTime(job.created_at) }, `created ${relativeTime(job.created_at)}`),
      h("span", {}, `attempt ${job.attempt}`),
      h("span", {}, gpusText(job)),
      h("span", {}, `block ${c.block_size} · ${plural(c.num_layers, "layer")} · ${plural(c.epochs, "epoch")}`)),
  );
  callout.replaceChildren();
  if (job.reason) {
    const title = job.state === "failed" ? "Why it failed" : "Note";
    callout.append(
      h("div", { class: `callout callout-${job.state}` }, h("strong", {}, title), h("pre", {}, job.reason)));
  }
}

export function renderDetails(details, job) {
  const c = job.config;
  const agent = job.agent_id
    ? ["Agent", h("a", { href: SERVICES_PATH, "data-link": true }, job.agent_id), `trainer agent ${job.agent_id}`]
    : null;
  // Under the slurm executor the pid is the job's Slurm job id (set once submitted, while queued too).
  const handle = job.executor === "slurm" ? `Slurm job ${job.pid}` : `pid ${job.pid}`;
  const process = job.exit_code !== null ? `exited ${job.exit_code}` : job.pid ? handle : "–";
  const rows = [
    ["Verifier", shortPath(c.verifier_name_or_path), c.verifier_name_or_path],
    ["Data", shortPath(c.data_path), c.data_path],
    ["Checkpoints", shortPath(c.save_path), c.save_path],
    ["Hidden states", c.hidden_states_endpoint?.join(", ") || c.vllm_endpoint?.join(", ") || "in-process"],
    ["Learning rate", `${c.lr} · warmup ${c.warmup_steps}`],
    ["Sequence", `${integer(c.total_seq_len)} tokens · ${integer(c.max_anchors)} anchors`],
    ["Started", absoluteTime(job.started_at) || "–"],
    ["Finished", absoluteTime(job.finished_at) || "–"],
    agent,
    ["Process", process],
  ].filter(Boolean);
  details.replaceChildren(
    h("div", { class: "card-head" }, h("h3", {}, "Run")),
    h("dl", { class: "details" }, rows.map(([k, v, full]) => [
      h("dt", {}, k),
      h("dd", { title: String(full ?? v ?? ""), dataset: { detail: k.toLowerCase() } },
        v instanceof Node ? v : String(v ?? "–")),
    ])),
  );
}

/**
 * The progress card, built once and updated in place: the bar's width transition and the
 * indeterminate animation keep running instead of restarting on every update.
 *   const card = progressCard(node);  card.render(job, trainRows);
 */
export function progressCard(node) {
  const p = {
    percent: h("span", { class: "progress-big" }),
    steps: h("span", { class: "muted" }),
    rate: h("span"),
    eta: h("strong"),
    fill: h("div", { class: "bar-fill" }),
    bar: h("div", { class: "bar bar-lg" }),
  };
  p.bar.append(p.fill);
  node.append(
    h("div", { class: "progress-top" },
      h("div", {}, p.percent, p.steps),
      h("div", { class: "muted" }, p.rate, p.eta)),
    p.bar,
  );

  function status(job, rate) {
    // A running job whose trainer has gone quiet for ten of its log intervals: say so, not an ETA.
    const quiet = rate ? Date.now() / 1000 - rate.lastTime : 0;
    const interval = rate ? (job.config.log_freq ?? 10) / rate.stepsPerS : 0;
    const eta = etaOf(job, rate);
    if (job.state === "running" && rate && quiet > Math.max(120, 10 * interval)) {
      return `no metrics for ${duration(quiet)}`;
    }
    if (eta !== null) return `ETA ${duration(eta)}`;
    if (tookText(job)) return tookText(job);
    if (job.state === "queued") return "waiting for a slot";
    if (job.state === "starting") return "loading the verifier…";
    if (job.state === "running") return "estimating…";
    return "";
  }

  function stepsText(job) {
    if (job.step === null) return " no steps yet";
    const of = job.total_steps ? ` of ${integer(job.total_steps)}` : "";
    const epoch = job.epoch !== null ? ` · epoch ${job.epoch.toFixed(2)}` : "";
    return ` step ${integer(job.step)}${of}${epoch}`;
  }

  function render(job, trainRows) {
    const fraction = progressOf(job);
    const rate = rateOf(trainRows);
    p.percent.textContent = fraction === null ? "–" : `${Math.round(fraction * 100)}%`;
    p.steps.textContent = stepsText(job);
    const perS = rate && (rate.stepsPerS >= 10 ? rate.stepsPerS.toFixed(0) : rate.stepsPerS.toFixed(2));
    p.rate.textContent = rate ? `${perS} steps/s · ` : "";
    p.eta.textContent = status(job, rate);
    p.bar.className = `bar bar-lg bar-${job.state}`;
    const indeterminate = fraction === null && meta.active.has(job.state);
    p.fill.classList.toggle("bar-indeterminate", indeterminate);
    p.fill.style.width = `${fraction === null ? (indeterminate ? 100 : 0) : fraction * 100}%`;
  }

  return { render };
}
