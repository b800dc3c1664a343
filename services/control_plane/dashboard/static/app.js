// The control plane's dashboard: a jobs table, a live job page and a submit form, over the REST API
// under /v1 (docs/control_plane.md). Plain ES modules, no build step, nothing fetched from outside.
//
//   /               jobs: state, progress, ETA; filter by state; refreshed every few seconds
//   /jobs/<id>      one job: live charts (Server-Sent Events), logs, checkpoints, config, actions
//   /new[?from=ID]  submit form: a JSON TrainConfig plus name and GPUs; 422s shown by their field
//   /services       hidden-state services (gRPC health, what they serve) and trainer agents

import { LineChart, compact, percent, ramp } from "/dashboard/plot.js";
import { eventStream } from "/dashboard/stream.js";

const REFRESH_MS = 3000;
const STATES = ["queued", "starting", "running", "succeeded", "failed", "cancelled"];
const ACTIVE = new Set(["starting", "running"]);
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
// Filled in by the control plane when it starts the trainer, and per job: never copied into a new job.
const NOT_COPIED = ["control_plane_url", "job_id", "save_path", "resume"];
const COLORS = { blue: "#6366f1", orange: "#f59e0b", green: "#10b981", pink: "#ec4899", sky: "#0ea5e9" };
const EXAMPLE_CONFIG = {
  verifier_name_or_path: "embedded:smollm2-135m-instruct",
  data_path: "demo/data",
  block_size: 8,
  num_layers: 2,
  max_anchors: 128,
  total_seq_len: 1024,
  epochs: 1,
  lr: 0.002,
};

// ------------------------------------------------------------------------------------------ helpers
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs ?? {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "class") el.className = value;
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (value === true) el.setAttribute(name, "");
    else el.setAttribute(name, value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

const $ = (selector, root = document) => root.querySelector(selector);

function relativeTime(iso) {
  if (!iso) return "–";
  const seconds = (Date.now() - new Date(iso).getTime()) / 1000;
  if (seconds < 45) return "just now";
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)} h ago`;
  if (seconds < 7 * 86400) return `${Math.round(seconds / 86400)} d ago`;
  return new Date(iso).toLocaleDateString();
}

function absoluteTime(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

/** A long path cut in the middle of its folders, keeping the end: "…/checkpoints/<job id>". */
function shortPath(path, max = 44) {
  const text = String(path ?? "–");
  if (text.length <= max) return text;
  const parts = text.split("/");
  let tail = parts.pop();
  while (parts.length && tail.length + parts[parts.length - 1].length + 3 <= max) tail = `${parts.pop()}/${tail}`;
  return `…/${tail}`;
}

const integer = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString());

/** A coloured pill for a state: a job's, a hidden-state service's health or an agent's. */
function stateChip(state, label = state) {
  return h("span", { class: `state state-${state}` }, h("i", { "aria-hidden": "true" }), label);
}

function jobHref(id) {
  return `/jobs/${encodeURIComponent(id)}`;
}

function gpusText(job) {
  if (job.gpus?.length) return `GPU ${job.gpus.join(", ")}`;
  if (!job.gpus_requested) return "CPU";
  return `${job.gpus_requested} GPU${job.gpus_requested > 1 ? "s" : ""}`;
}

/** Fraction done (0..1), or null when the run has not said how long it is. */
function progressOf(job) {
  if (job.state === "succeeded") return 1;
  if (job.total_steps && job.step !== null) return Math.min(job.step / job.total_steps, 1);
  return null;
}

/** Steps per second over the newest rows of the job's current attempt ([{step, time}] in order). */
function rateOf(rows) {
  const recent = rows.slice(-20);
  if (recent.length < 2) return null;
  const first = recent[0];
  const last = recent[recent.length - 1];
  const dt = last.time - first.time;
  const ds = last.step - first.step;
  return dt > 0 && ds > 0 ? { stepsPerS: ds / dt, lastTime: last.time } : null;
}

/** Seconds left, from the rate and the time since the newest row; null when unknown. */
function etaOf(job, rate) {
  if (!ACTIVE.has(job.state) || !rate || !job.total_steps || job.step === null) return null;
  const left = (job.total_steps - job.step) / rate.stepsPerS;
  return Math.max(left - (Date.now() / 1000 - rate.lastTime), 0);
}

function toast(message, kind = "info") {
  const node = h("div", { class: `toast toast-${kind}` }, message);
  $("#toasts").append(node);
  setTimeout(() => node.classList.add("toast-out"), 3600);
  setTimeout(() => node.remove(), 4000);
}

// ------------------------------------------------------------------------------------------ API
// The token lives in this tab only: sessionStorage is gone when the tab closes, and no other tab
// or later visitor of this browser profile finds it. (Earlier versions kept it in localStorage.)
localStorage.removeItem("dflash.token");
const session = {
  token: sessionStorage.getItem("dflash.token") ?? "",
  auth: false,
  health: null,
};

class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : `HTTP ${status}`);
    this.status = status;
    this.detail = detail;
  }
}

function authHeaders() {
  return session.token ? { Authorization: `Bearer ${session.token}` } : {};
}

async function api(path, { method = "GET", body } = {}) {
  // X-DFlash-Client: a header a cross-site page cannot send without a preflight (browser_guard.py).
  const headers = { Accept: "application/json", "X-DFlash-Client": "dashboard", ...authHeaders() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch {
    throw new ApiError(0, "The control plane did not answer.");
  }
  if (response.status === 204) return null;
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = text;
  }
  if (!response.ok) {
    const error = new ApiError(response.status, data?.detail ?? data ?? response.statusText);
    if (response.status === 401 || response.status === 403) openToken(error);
    throw error;
  }
  return data;
}

/** Jobs per state from the Prometheus exposition (one request instead of six). */
async function stateCounts() {
  try {
    const text = await (await fetch("/metrics", { headers: authHeaders() })).text();
    const counts = {};
    for (const match of text.matchAll(/^dflash_control_plane_jobs\{state="(\w+)"\} (\d+)/gm)) {
      counts[match[1]] = Number(match[2]);
    }
    return counts;
  } catch {
    return {};
  }
}

function errorText(error) {
  if (Array.isArray(error.detail)) return error.detail.map((e) => `${(e.loc ?? []).slice(1).join(".")}: ${e.msg}`).join("; ");
  return error.message;
}

// ------------------------------------------------------------------------------------------ chrome
function renderToken() {
  const button = $("#token-button");
  button.hidden = !session.auth && !session.token;
  button.replaceChildren(
    h("span", { class: `lock ${session.token ? "lock-set" : ""}`, "aria-hidden": "true" }),
    session.token ? "Token set" : "Add token",
  );
}

function openToken(error) {
  const message = $("#token-message");
  message.hidden = !error;
  if (error) {
    message.textContent =
      error.status === 401 ? "This control plane needs its token." : "The control plane refused this token.";
  }
  const popover = $("#token-popover");
  if (!popover.hidden) return; // already open: a refused poll must not wipe what is being typed
  popover.hidden = false;
  $("#token-input").value = session.token;
  $("#token-input").focus();
  $("#token-button").hidden = false;
}

function setupToken() {
  $("#token-button").addEventListener("click", () => {
    const popover = $("#token-popover");
    if (popover.hidden) openToken(null);
    else popover.hidden = true;
  });
  $("#token-popover").addEventListener("submit", (event) => {
    event.preventDefault();
    session.token = $("#token-input").value.trim();
    if (session.token) sessionStorage.setItem("dflash.token", session.token);
    else sessionStorage.removeItem("dflash.token");
    $("#token-popover").hidden = true;
    renderToken();
    toast(session.token ? "Token kept for this tab" : "Token forgotten");
    // Pages that could not load without it load now; the form keeps what was typed into it.
    if (current?.onToken) current.onToken();
    else route();
  });
  $("#token-clear").addEventListener("click", () => {
    $("#token-input").value = "";
    $("#token-popover").requestSubmit();
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") $("#token-popover").hidden = true;
  });
  renderToken();
}

const THEMES = ["system", "light", "dark"];

function applyTheme(theme) {
  if (theme === "system") delete document.documentElement.dataset.theme;
  else document.documentElement.dataset.theme = theme;
  const button = $("#theme-button");
  button.dataset.mode = theme;
  button.title = `Theme: ${theme} (click to change)`;
}

function setupTheme() {
  let theme = localStorage.getItem("dflash.theme") ?? "system";
  applyTheme(theme);
  $("#theme-button").addEventListener("click", () => {
    theme = THEMES[(THEMES.indexOf(theme) + 1) % THEMES.length];
    localStorage.setItem("dflash.theme", theme);
    applyTheme(theme);
  });
}

async function pollHealth() {
  const node = $("#health");
  try {
    const health = await api("/healthz");
    session.health = health;
    session.auth = health.auth;
    // /docs needs the token too, which a plain link cannot send: the API is for clients then.
    $("#docs-link").hidden = health.auth;
    // With trainer agents the GPUs are theirs (the Services page lists them), not this host's.
    const gpus = health.executor === "agent" ? "trainer agents"
      : health.gpus.length ? `${health.gpus_free.length}/${health.gpus.length} GPUs free` : "CPU only";
    node.className = "health health-ok";
    node.textContent = gpus;
  } catch {
    node.className = "health health-down";
    node.textContent = "unreachable";
  }
  renderToken();
}

// ------------------------------------------------------------------------------------------ router
let current = null;
const SERVICES_PATH = "/services";

function navigate(href, { replace = false } = {}) {
  if (replace) history.replaceState(null, "", href);
  else history.pushState(null, "", href);
  route();
}

function route() {
  current?.destroy?.();
  const view = $("#view");
  view.replaceChildren();
  window.scrollTo(0, 0);
  const { pathname, searchParams } = new URL(location.href);
  const job = pathname.match(/^\/jobs\/([^/]+)\/?$/);
  let nav = "jobs";
  if (pathname === SERVICES_PATH) {
    current = servicesView(view);
    nav = "services";
  } else if (pathname === "/" || pathname === "") current = jobsView(view, searchParams);
  else if (job) current = jobView(view, decodeURIComponent(job[1]));
  else if (pathname === "/new") {
    current = newJobView(view, searchParams.get("from"));
    nav = "new";
  } else {
    current = null;
    view.append(emptyState("Nothing here", "This page does not exist.", h("a", { href: "/", "data-link": true, class: "btn" }, "All jobs")));
  }
  for (const link of document.querySelectorAll("[data-nav]")) link.classList.toggle("active", link.dataset.nav === nav);
}

document.addEventListener("click", (event) => {
  const link = event.target.closest("a[data-link]");
  if (!link || event.defaultPrevented || event.button !== 0) return;
  if (event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
  const url = new URL(link.href);
  if (url.origin !== location.origin) return;
  event.preventDefault();
  navigate(url.pathname + url.search + url.hash);
});
window.addEventListener("popstate", route);

function emptyState(title, text, ...actions) {
  return h("div", { class: "empty" }, h("div", { class: "empty-mark", "aria-hidden": "true" }), h("h2", {}, title), h("p", {}, text), actions);
}

function every(ms, fn) {
  let stopped = false;
  let timer = 0;
  const tick = async () => {
    if (stopped) return;
    if (!document.hidden) {
      try {
        await fn();
      } catch (error) {
        console.warn(error);
      }
    }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  timer = setTimeout(tick, ms);
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

/**
 * A <tbody> kept in step with a polled list: one <tr> per key, in the list's order. Only the
 * cells that changed are replaced, so a running dot's pulse does not restart on every refresh.
 *   key(item) -> string; cells(item) -> [<td>]; dataset(item) -> the row's data-* attributes;
 *   onclick(event, item) -> on a click on the row (optional).
 */
function keyedRows(tbody, { key, cells, dataset, onclick }) {
  const rows = new Map(); // key -> <tr>
  function render(item) {
    const fresh = cells(item);
    let tr = rows.get(key(item));
    if (!tr) {
      tr = h("tr", { onclick: onclick && ((event) => onclick(event, item)) }, fresh);
      rows.set(key(item), tr);
    } else {
      fresh.forEach((cell, i) => {
        if (tr.cells[i].outerHTML !== cell.outerHTML) tr.cells[i].replaceWith(cell);
      });
    }
    Object.assign(tr.dataset, dataset(item));
    return tr;
  }
  function update(items) {
    const ordered = items.map(render);
    const seen = new Set(items.map(key));
    for (const id of [...rows.keys()]) if (!seen.has(id)) rows.delete(id);
    ordered.forEach((tr, i) => {
      if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] ?? null);
    });
    while (tbody.children.length > ordered.length) tbody.lastElementChild.remove();
  }
  function clear() {
    rows.clear();
    tbody.replaceChildren();
  }
  return { update, clear };
}

// ------------------------------------------------------------------------------------------ jobs
function jobsView(root, params) {
  let filter = params.get("state") ?? "";
  let limit = 50;
  const rates = new Map(); // job id -> { rate, fetchedAt }
  let rateById = new Map(); // job id -> rate, for the page on screen
  const filters = h("div", { class: "segmented", role: "tablist" });
  const tbody = h("tbody");
  const countNode = h("span", { class: "muted" });
  const updated = h("span", { class: "muted small" });
  const more = h("button", { class: "btn btn-ghost", type: "button", hidden: true, onclick: () => { limit = Math.min(limit + 50, 500); refresh(); } }, "Show more");
  const tableCard = h(
    "div",
    { class: "card table-card" },
    h("table", { class: "jobs-table" },
      h("thead", {}, h("tr", {}, h("th", {}, "State"), h("th", {}, "Job"), h("th", { class: "col-progress" }, "Progress"), h("th", {}, "ETA"), h("th", {}, "Created"), h("th", {}, "GPUs"))),
      tbody),
    h("div", { class: "table-foot" }, updated, more),
  );
  const rows = keyedRows(tbody, {
    key: (job) => job.id,
    cells: (job) => cells(job, rateById.get(job.id) ?? null),
    dataset: (job) => ({ jobId: job.id, state: job.state }),
    onclick: (event, job) => {
      if (!event.target.closest("a")) navigate(jobHref(job.id));
    },
  });
  const empty = h("div", { hidden: true });
  root.append(
    h("div", { class: "page-head" },
      h("div", {}, h("h1", {}, "Jobs ", countNode), h("p", { class: "muted" }, "Training runs submitted to this control plane, newest first.")),
      filters),
    tableCard,
    empty,
  );

  function renderFilters(counts) {
    const total = Object.values(counts).reduce((a, b) => a + b, 0);
    const entries = [["", "All", total], ...STATES.map((s) => [s, s[0].toUpperCase() + s.slice(1), counts[s]])];
    filters.replaceChildren(
      ...entries.map(([state, label, n]) =>
        h("button", {
          type: "button",
          role: "tab",
          class: `segment ${state === filter ? "active" : ""}`,
          "aria-selected": state === filter ? "true" : "false",
          dataset: { state },
          onclick: () => {
            filter = state;
            history.replaceState(null, "", state ? `/?state=${state}` : "/");
            rows.clear();
            refresh();
          },
        }, state ? h("i", { class: `dot dot-${state}` }) : null, label, n ? h("span", { class: "segment-count" }, n) : null),
      ),
    );
  }

  async function rateFor(job) {
    const known = rates.get(job.id);
    if (known && Date.now() - known.fetchedAt < 10_000) return known.rate;
    const window = 20 * (job.config.log_freq ?? 10);
    const page = await api(`/v1/jobs/${encodeURIComponent(job.id)}/metrics?since_step=${Math.max(0, (job.step ?? 0) - window)}&limit=500`);
    const train = page.data.filter((r) => r.attempt === job.attempt && "train/loss" in r.metrics);
    const rate = rateOf(train);
    rates.set(job.id, { rate, fetchedAt: Date.now() });
    return rate;
  }

  function cells(job, rate) {
    const fraction = progressOf(job);
    const href = jobHref(job.id);
    const eta = etaOf(job, rate);
    let etaText = "–";
    if (eta !== null) etaText = duration(eta);
    else if (job.finished_at && job.started_at) etaText = h("span", { class: "muted" }, `took ${duration((new Date(job.finished_at) - new Date(job.started_at)) / 1000)}`);
    else if (ACTIVE.has(job.state)) etaText = h("span", { class: "muted" }, "estimating…");
    const stepText = job.step === null ? (job.state === "queued" ? "waiting" : "–") : `${integer(job.step)}${job.total_steps ? ` / ${integer(job.total_steps)}` : ""} steps`;
    return [
      h("td", {}, stateChip(job.state), job.cancel_requested && !TERMINAL.has(job.state) ? h("span", { class: "tag" }, "cancelling") : null),
      h("td", { class: "col-job" }, h("a", { href, "data-link": true, class: "job-name" }, job.name || job.id), h("div", { class: "mono muted small" }, job.name ? job.id : `attempt ${job.attempt}`)),
      h("td", { class: "col-progress" },
        h("div", { class: `bar bar-${job.state}`, title: fraction === null ? "" : `${Math.round(fraction * 100)}%` },
          h("div", { class: `bar-fill ${fraction === null && ACTIVE.has(job.state) ? "bar-indeterminate" : ""}`, style: `width:${fraction === null ? (ACTIVE.has(job.state) ? 100 : 0) : fraction * 100}%` })),
        h("div", { class: "small muted bar-label" }, h("span", {}, stepText), fraction === null ? null : h("span", {}, `${Math.round(fraction * 100)}%`))),
      h("td", { class: "nowrap" }, etaText),
      h("td", { class: "nowrap", title: absoluteTime(job.created_at) }, relativeTime(job.created_at)),
      h("td", { class: "nowrap" }, gpusText(job)),
    ];
  }

  async function refresh() {
    const query = new URLSearchParams({ limit: String(limit) });
    if (filter) query.append("state", filter);
    const [page, counts] = await Promise.all([api(`/v1/jobs?${query}`), stateCounts()]);
    renderFilters(counts);
    countNode.textContent = page.count ? `${page.count}` : "";
    const running = page.data.filter((job) => job.state === "running").slice(0, 20);
    const found = await Promise.all(running.map((job) => rateFor(job).catch(() => null)));
    rateById = new Map(running.map((job, i) => [job.id, found[i]]));
    rows.update(page.data);
    more.hidden = !page.next_cursor || limit >= 500;
    tableCard.hidden = page.count === 0;
    empty.hidden = page.count !== 0;
    if (page.count === 0) {
      empty.replaceChildren(
        filter
          ? emptyState(`No ${filter} jobs`, "Nothing in this state right now.", h("a", { href: "/", "data-link": true, class: "btn" }, "Show all jobs"))
          : emptyState("No jobs yet", "Submit a training configuration and follow it here live.", h("a", { href: "/new", "data-link": true, class: "btn btn-primary" }, "New job")),
      );
    }
    updated.textContent = `Updated ${new Date().toLocaleTimeString()} · refreshes every ${REFRESH_MS / 1000} s`;
  }

  refresh().catch((error) => {
    root.append(h("div", { class: "callout callout-failed" }, `Could not list jobs: ${errorText(error)}`));
  });
  const stop = every(REFRESH_MS, refresh);
  return { destroy: stop };
}

// ------------------------------------------------------------------------------------------ job page
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
    unit: "train / validation: expected tokens per block (teacher-forced) · live tau: greedy speculative decoding on held-out prompts (--eval-every)",
    series: [
      { key: "train/eal", label: "train", color: COLORS.green },
      { key: "val/eal", label: "validation", color: COLORS.orange, markers: true },
      { key: "eval/tau", label: "live tau", color: COLORS.pink, markers: true },
    ],
  },
  { id: "accuracy", title: "Accuracy per slot", unit: "train, by draft position", series: [], format: percent, yMin: 0 },
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

function jobView(root, jobId) {
  const path = `/v1/jobs/${encodeURIComponent(jobId)}`;
  const cleanups = [];
  let job = null;
  let charts = {};
  let legends = {};
  const trainRows = []; // {step, time} of the current attempt, for the rate
  let summaryFrame = 0;

  const head = h("div", { class: "job-head" });
  const callout = h("div");
  const progress = h("div", { class: "card progress-card" });
  const tiles = h("div", { class: "tiles" });
  const grid = h("div", { class: "chart-grid" });
  const details = h("div", { class: "card details-card" });
  const tabs = h("div", { class: "card tabs-card" });
  root.append(
    h("nav", { class: "crumbs" }, h("a", { href: "/", "data-link": true }, "Jobs"), h("span", { "aria-hidden": "true" }, "/"), h("span", { class: "mono" }, jobId)),
    head, callout, progress, tiles, grid, tabs,
  );

  // ---- header, progress, details
  let headSignature = "";
  function renderHead() {
    // Polled every few seconds: redraw only on a change (the running dot's pulse would restart).
    const signature = JSON.stringify([job.state, job.name, job.reason, job.cancel_requested, job.attempt, job.gpus,
      job.pid, job.exit_code, job.started_at, job.finished_at, job.agent_id, Math.floor(Date.now() / 60_000)]);
    if (signature === headSignature) return;
    headSignature = signature;
    const actions = [];
    const canCancel = !TERMINAL.has(job.state) && !job.cancel_requested;
    if (job.cancel_requested && !TERMINAL.has(job.state)) actions.push(h("button", { class: "btn", disabled: true }, "Cancelling…"));
    if (canCancel) actions.push(h("button", { class: "btn btn-danger", type: "button", onclick: () => act("cancel") }, "Cancel"));
    if (job.state === "failed" || job.state === "cancelled") actions.push(h("button", { class: "btn btn-primary", type: "button", onclick: () => act("resume") }, "Resume"));
    actions.push(h("a", { class: "btn", href: `/new?from=${encodeURIComponent(job.id)}`, "data-link": true }, "Clone"));
    if (!ACTIVE.has(job.state)) actions.push(h("button", { class: "btn btn-ghost btn-danger-text", type: "button", onclick: remove }, "Delete"));
    head.replaceChildren(
      h("div", { class: "job-title" },
        h("h1", {}, job.name || job.id),
        stateChip(job.state)),
      h("div", { class: "job-actions" }, actions),
      h("div", { class: "job-meta muted" },
        job.name ? h("span", { class: "mono" }, job.id) : null,
        h("span", { title: absoluteTime(job.created_at) }, `created ${relativeTime(job.created_at)}`),
        h("span", {}, `attempt ${job.attempt}`),
        h("span", {}, gpusText(job)),
        h("span", {}, `block ${job.config.block_size} · ${job.config.num_layers} layer${job.config.num_layers > 1 ? "s" : ""} · ${job.config.epochs} epoch${job.config.epochs > 1 ? "s" : ""}`)),
    );
    callout.replaceChildren();
    if (job.reason) {
      callout.append(h("div", { class: `callout callout-${job.state}` }, h("strong", {}, job.state === "failed" ? "Why it failed" : "Note"), h("pre", {}, job.reason)));
    }
    renderDetails();
  }

  function renderDetails() {
    const c = job.config;
    const rows = [
      ["Verifier", shortPath(c.verifier_name_or_path), c.verifier_name_or_path],
      ["Data", shortPath(c.data_path), c.data_path],
      ["Checkpoints", shortPath(c.save_path), c.save_path],
      ["Hidden states", c.hidden_states_endpoint?.join(", ") || c.vllm_endpoint?.join(", ") || "in-process"],
      ["Learning rate", `${c.lr} · warmup ${c.warmup_steps}`],
      ["Sequence", `${integer(c.total_seq_len)} tokens · ${integer(c.max_anchors)} anchors`],
      ["Started", absoluteTime(job.started_at) || "–"],
      ["Finished", absoluteTime(job.finished_at) || "–"],
      job.agent_id ? ["Agent", h("a", { href: SERVICES_PATH, "data-link": true }, job.agent_id), `trainer agent ${job.agent_id}`] : null,
      ["Process", job.exit_code !== null ? `exited ${job.exit_code}` : job.pid ? `pid ${job.pid}` : "–"],
    ].filter(Boolean);
    details.replaceChildren(
      h("div", { class: "card-head" }, h("h3", {}, "Run")),
      h("dl", { class: "details" }, rows.map(([k, v, full]) => [
        h("dt", {}, k),
        h("dd", { title: String(full ?? v ?? ""), dataset: { detail: k.toLowerCase() } }, v instanceof Node ? v : String(v ?? "–")),
      ])),
    );
  }

  // Built once and updated in place: the bar's width transition and the indeterminate
  // animation keep running instead of restarting on every update.
  const progressParts = {
    percent: h("span", { class: "progress-big" }),
    steps: h("span", { class: "muted" }),
    rate: h("span"),
    eta: h("strong"),
    fill: h("div", { class: "bar-fill" }),
    bar: h("div", { class: "bar bar-lg" }),
  };
  progressParts.bar.append(progressParts.fill);
  progress.append(
    h("div", { class: "progress-top" },
      h("div", {}, progressParts.percent, progressParts.steps),
      h("div", { class: "muted" }, progressParts.rate, progressParts.eta)),
    progressParts.bar,
  );

  function renderProgress() {
    const fraction = progressOf(job);
    const rate = rateOf(trainRows);
    const eta = etaOf(job, rate);
    let right = "";
    // A running job whose trainer has gone quiet for ten of its log intervals: say so, not an ETA.
    const quiet = rate ? Date.now() / 1000 - rate.lastTime : 0;
    const interval = rate ? (job.config.log_freq ?? 10) / rate.stepsPerS : 0;
    if (job.state === "running" && rate && quiet > Math.max(120, 10 * interval)) right = `no metrics for ${duration(quiet)}`;
    else if (eta !== null) right = `ETA ${duration(eta)}`;
    else if (job.finished_at && job.started_at) right = `took ${duration((new Date(job.finished_at) - new Date(job.started_at)) / 1000)}`;
    else if (job.state === "queued") right = "waiting for a slot";
    else if (job.state === "starting") right = "loading the verifier…";
    else if (job.state === "running") right = "estimating…";
    const p = progressParts;
    p.percent.textContent = fraction === null ? "–" : `${Math.round(fraction * 100)}%`;
    p.steps.textContent = job.step === null
      ? " no steps yet"
      : ` step ${integer(job.step)}${job.total_steps ? ` of ${integer(job.total_steps)}` : ""}${job.epoch !== null ? ` · epoch ${job.epoch.toFixed(2)}` : ""}`;
    p.rate.textContent = rate ? `${rate.stepsPerS >= 10 ? rate.stepsPerS.toFixed(0) : rate.stepsPerS.toFixed(2)} steps/s · ` : "";
    p.eta.textContent = right;
    p.bar.className = `bar bar-lg bar-${job.state}`;
    const indeterminate = fraction === null && ACTIVE.has(job.state);
    p.fill.classList.toggle("bar-indeterminate", indeterminate);
    p.fill.style.width = `${fraction === null ? (indeterminate ? 100 : 0) : fraction * 100}%`;
  }

  function tile(label, value, sub) {
    return h("div", { class: "tile" }, h("div", { class: "tile-label" }, label), h("div", { class: "tile-value" }, value), h("div", { class: "tile-sub muted" }, sub ?? ""));
  }

  function acceptanceTile() {
    // Live tau (what serving gets) when the run measures it, else the teacher-forced estimates.
    const last = (key) => charts.eal?.last(key) ?? null;
    const [value, sub] = last("eval/tau") !== null
      ? [last("eval/tau"), "live tau (speculative decoding)"]
      : last("val/eal") !== null ? [last("val/eal"), "validation"] : [last("train/eal"), "train"];
    return tile("Acceptance length", compact(value), sub);
  }

  function renderTiles() {
    const last = (chart, key) => charts[chart]?.last(key) ?? null;
    const lossNow = last("loss", "train/loss");
    const lossFirst = charts.loss?.series.get("train/loss").points[0]?.[1] ?? null;
    tiles.replaceChildren(
      tile("Train loss", compact(lossNow), lossFirst !== null && lossNow !== null && lossFirst !== lossNow ? `from ${compact(lossFirst)}` : "latest"),
      tile("Validation loss", compact(last("loss", "val/loss")), "latest evaluation"),
      acceptanceTile(),
      tile("Throughput", compact(last("throughput", "train/tokens_per_s")), "tokens / s"),
      tile("Data wait", percent(last("wait", "train/data_wait_frac")), "of step time"),
    );
  }

  function scheduleSummary() {
    if (summaryFrame) return;
    summaryFrame = requestAnimationFrame(() => {
      summaryFrame = 0;
      renderTiles();
      renderProgress();
      for (const [id, chart] of Object.entries(charts)) renderLegend(id, chart);
    });
  }

  // ---- charts
  function buildCharts() {
    for (const chart of Object.values(charts)) chart.destroy();
    charts = {};
    legends = {};
    grid.replaceChildren();
    const slots = Math.max((job.config.block_size ?? 2) - 1, 1);
    const slotColors = ramp(slots);
    for (const spec of CHARTS) {
      const series = spec.id === "accuracy"
        ? Array.from({ length: slots }, (_, i) => ({ key: `train/acc_slot_${i + 1}`, label: `slot ${i + 1}`, color: slotColors[i] }))
        : spec.series;
      const body = h("div", { class: "chart-body", dataset: { chart: spec.id } });
      const legend = h("div", { class: "legend" });
      const toggle = spec.logToggle
        ? h("button", { class: "btn btn-ghost btn-xs", type: "button", title: "Logarithmic y axis", onclick: (event) => {
            const chart = charts[spec.id];
            chart.options.log = !chart.options.log;
            event.currentTarget.classList.toggle("active", chart.options.log);
            chart.schedule();
          } }, "log")
        : null;
      grid.append(h("section", { class: "card chart-card" },
        h("div", { class: "card-head" }, h("div", {}, h("h3", {}, spec.title), spec.unit ? h("div", { class: "muted small" }, spec.unit) : null), toggle),
        body, legend));
      charts[spec.id] = new LineChart(body, { series, format: spec.format ?? compact, yMin: spec.yMin, height: 190 });
      legends[spec.id] = legend;
    }
    grid.append(details);
  }

  function renderLegend(id, chart) {
    const format = chart.options.format;
    legends[id].replaceChildren(
      ...[...chart.series.values()].map((s) =>
        h("span", { class: "legend-item" }, h("i", { style: `background:${s.color}` }), s.label, h("b", {}, s.points.length ? format(s.points[s.points.length - 1][1]) : "–")),
      ),
    );
  }

  function addRow(row) {
    if (row.attempt !== job?.attempt) {
      // Rows of an earlier attempt only draw the curve; the rate comes from the current attempt.
    } else if ("train/loss" in row.metrics) {
      trainRows.push({ step: row.step, time: row.time });
      if (trainRows.length > 200) trainRows.splice(0, trainRows.length - 200);
    }
    for (const chart of Object.values(charts)) {
      for (const key of chart.series.keys()) {
        if (key in row.metrics) chart.add(key, row.step, row.metrics[key]);
      }
    }
    scheduleSummary();
  }

  // ---- live stream of metric rows and state changes
  function openStream() {
    // Reconnects by itself, resuming after the last row it got (Last-Event-ID).
    const stream = eventStream(`${path}/metrics/stream`, {
      headers: authHeaders(),
      onEvent(name, data) {
        if (name === "job") {
          job = JSON.parse(data);
          renderHead();
          scheduleSummary();
        } else if (name === "metrics") addRow(JSON.parse(data));
        else if (name === "end") {
          stream.close();
          refreshJob();
          checkpoints.refresh();
        }
      },
      onRefused(status) {
        if (status === 401 || status === 403) openToken(new ApiError(status, ""));
        else if (status === 429) toast("Too many live streams open on this control plane: charts are not live", "error");
      },
    });
    cleanups.push(() => stream.close());
  }

  async function refreshJob() {
    try {
      job = await api(path);
    } catch (error) {
      if (error.status === 404) {
        head.replaceChildren(emptyState("Job not found", `No job ${jobId} on this control plane (it may have been deleted).`, h("a", { href: "/", "data-link": true, class: "btn" }, "All jobs")));
        return false;
      }
      throw error;
    }
    renderHead();
    scheduleSummary();
    return true;
  }

  async function act(action) {
    try {
      job = await api(`${path}/${action}`, { method: "POST" });
      toast(action === "cancel" ? "Cancel requested" : "Job queued again");
      if (action === "resume") {
        destroy();
        root.replaceChildren();
        current = jobView(root, jobId);
        return;
      }
      renderHead();
    } catch (error) {
      toast(`Could not ${action}: ${errorText(error)}`, "error");
    }
  }

  async function remove() {
    if (!confirm(`Delete job ${job.name || job.id}? Its record, metric rows and log are removed; checkpoints stay on disk.`)) return;
    try {
      await api(path, { method: "DELETE" });
      toast("Job deleted");
      navigate("/");
    } catch (error) {
      toast(`Could not delete: ${errorText(error)}`, "error");
    }
  }

  // ---- logs, checkpoints, config
  const logs = logsPanel(path);
  const checkpoints = checkpointsPanel(path, jobId);
  const config = h("div", { class: "panel" });
  const panels = { logs: logs.node, checkpoints: checkpoints.node, config };
  let activeTab = "logs";
  function renderTabs() {
    tabs.replaceChildren(
      h("div", { class: "tabs", role: "tablist" },
        ["logs", "checkpoints", "config"].map((name) =>
          h("button", { type: "button", role: "tab", class: `tab ${activeTab === name ? "active" : ""}`, dataset: { tab: name }, onclick: () => {
            activeTab = name;
            if (name === "checkpoints") checkpoints.refresh();
            if (name === "config") renderConfig();
            renderTabs();
          } }, name[0].toUpperCase() + name.slice(1), name === "checkpoints" ? checkpoints.count : null),
        )),
      panels[activeTab],
    );
  }
  function renderConfig() {
    if (!job) return;
    const text = JSON.stringify(job.config, null, 2);
    config.replaceChildren(
      h("div", { class: "panel-bar" },
        h("span", { class: "muted small" }, "The config the trainer runs with: every default filled in, paths resolved."),
        h("button", { class: "btn btn-sm", type: "button", onclick: async () => {
          await navigator.clipboard?.writeText(text);
          toast("Config copied");
        } }, "Copy")),
      h("pre", { class: "json" }, highlightJson(text)),
    );
  }

  for (const part of [progress, tiles, grid, tabs]) part.hidden = true; // until the job is loaded
  (async () => {
    if (!(await refreshJob())) return;
    for (const part of [progress, tiles, grid, tabs]) part.hidden = false;
    buildCharts();
    renderTabs();
    renderProgress();
    renderTiles();
    openStream();
    logs.start();
    checkpoints.refresh();
    // The `job` event comes on state changes only; progress (step, total) is read every few seconds.
    cleanups.push(every(REFRESH_MS, async () => {
      if (job && !TERMINAL.has(job.state)) await refreshJob();
      if (job?.state === "running") await checkpoints.refresh();
    }));
  })().catch((error) => head.replaceChildren(h("div", { class: "callout callout-failed" }, `Could not load the job: ${errorText(error)}`)));

  function destroy() {
    for (const cleanup of cleanups) cleanup();
    logs.stop();
    for (const chart of Object.values(charts)) chart.destroy();
    cancelAnimationFrame(summaryFrame);
  }
  return { destroy };
}

function highlightJson(text) {
  const out = [];
  const pattern = /("(?:\\.|[^"\\])*")(\s*:)?|\b(true|false|null)\b|(-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)/g;
  let last = 0;
  for (const match of text.matchAll(pattern)) {
    out.push(text.slice(last, match.index));
    if (match[1]) out.push(h("span", { class: match[2] ? "j-key" : "j-str" }, match[1]), match[2] ?? "");
    else if (match[3]) out.push(h("span", { class: "j-lit" }, match[3]));
    else out.push(h("span", { class: "j-num" }, match[4]));
    last = match.index + match[0].length;
  }
  out.push(text.slice(last));
  return out;
}

const MAX_LOG_LINES = 5000;

function logsPanel(path) {
  const pre = h("pre", { class: "log", tabindex: "0" });
  const follow = h("input", { type: "checkbox", checked: true });
  const status = h("span", { class: "muted small" });
  const node = h("div", { class: "panel" },
    h("div", { class: "panel-bar" },
      h("label", { class: "switch" }, follow, h("span", {}), "Follow"),
      status),
    pre);
  let stream = null;
  let retry = 0;

  function append(lines) {
    const atBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 40;
    pre.append(lines.join("\n") + "\n");
    // Keep the newest lines only: text nodes are merged and cut from the front.
    if (pre.childNodes.length > 200 || pre.textContent.length > 400_000) {
      const all = pre.textContent.split("\n");
      pre.textContent = all.slice(-MAX_LOG_LINES).join("\n");
    }
    if (atBottom) pre.scrollTop = pre.scrollHeight; // unless someone scrolled up to read
  }

  async function tail() {
    const response = await fetch(`${path}/logs?lines=500`, { headers: authHeaders() });
    pre.textContent = response.ok ? await response.text() : "";
    pre.scrollTop = pre.scrollHeight;
  }

  function start() {
    stop();
    pre.textContent = "";
    if (!follow.checked) {
      status.textContent = "last 500 lines";
      tail();
      return;
    }
    status.textContent = "following…";
    // The log stream sends the tail, then each new line; it does not resume from an offset, so a
    // dropped connection starts over with a fresh tail rather than repeating lines.
    stream = eventStream(`${path}/logs?follow=true&lines=500`, {
      headers: authHeaders(),
      reconnectMs: null,
      onEvent(name, data) {
        if (name === "log") append([data]);
        else if (name === "end") {
          stop();
          status.textContent = `job ${data || "ended"}: log complete`;
        }
      },
      onRefused(code) {
        status.textContent = code === 429 ? "too many live streams open: not following" : `not following (HTTP ${code})`;
        if (code === 401 || code === 403) openToken(new ApiError(code, ""));
      },
      onBroken() {
        stop();
        status.textContent = "reconnecting…";
        retry = setTimeout(start, 2000);
      },
    });
  }

  function stop() {
    stream?.close();
    stream = null;
    clearTimeout(retry);
  }

  follow.addEventListener("change", start);
  return { node, start, stop };
}

function checkpointsPanel(path, jobId) {
  const node = h("div", { class: "panel" });
  const count = h("span", { class: "tab-count" }); // beside the tab's name
  async function download(name, button) {
    // With a token the archive route needs the Authorization header, which a plain link cannot
    // send: fetch it (held in memory, fine for drafter checkpoints) and hand the blob over.
    button.disabled = true;
    button.textContent = "Downloading…";
    try {
      const response = await fetch(`${path}/checkpoints/${encodeURIComponent(name)}/archive`, { headers: authHeaders() });
      if (!response.ok) {
        if (response.status === 401 || response.status === 403) openToken(new ApiError(response.status, ""));
        throw new Error(`HTTP ${response.status}`);
      }
      const url = URL.createObjectURL(await response.blob());
      const link = h("a", { href: url, download: `${jobId}-${name}.tar.gz` });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60_000);
    } catch (error) {
      toast(`Download failed: ${error.message}`, "error");
    } finally {
      button.disabled = false;
      button.textContent = "Download";
    }
  }
  function downloadControl(name) {
    if (!session.auth) {
      return h("a", { class: "btn btn-sm", href: `${path}/checkpoints/${encodeURIComponent(name)}/archive`, download: `${jobId}-${name}.tar.gz` }, "Download");
    }
    const button = h("button", { class: "btn btn-sm", type: "button" }, "Download");
    button.addEventListener("click", () => download(name, button));
    return button;
  }
  async function refresh() {
    let listing;
    try {
      listing = await api(`${path}/checkpoints`);
    } catch (error) {
      node.replaceChildren(h("p", { class: "muted" }, `Could not list checkpoints: ${errorText(error)}`));
      return;
    }
    count.textContent = listing.data.length ? String(listing.data.length) : "";
    if (!listing.data.length) {
      node.replaceChildren(h("p", { class: "muted panel-empty" }, "No checkpoints yet: one is written at the end of each epoch."), h("p", { class: "muted small mono" }, listing.save_path));
      return;
    }
    const best = listing.checkpoint_best;
    node.replaceChildren(
      h("div", { class: "panel-bar" }, h("span", { class: "muted small mono" }, listing.save_path),
        h("span", { class: "muted small" }, "Each archive unpacks to a folder that ", h("code", {}, "vllm serve <folder>"), " loads.")),
      h("table", { class: "ckpt-table" },
        h("thead", {}, h("tr", {}, ["Checkpoint", "Epoch", "Step", "Val loss", "Size", "Written", ""].map((t) => h("th", {}, t)))),
        h("tbody", {}, listing.data.map((c) =>
          h("tr", { dataset: { checkpoint: c.name } },
            h("td", {}, h("span", { class: "mono" }, c.name), c.name === listing.latest ? h("span", { class: "tag" }, "latest") : null, c.name === best ? h("span", { class: "tag tag-best" }, "best") : null),
            h("td", {}, c.epoch ?? "–"),
            h("td", {}, integer(c.step)),
            h("td", {}, c.val_loss === null ? "–" : c.val_loss.toFixed(4)),
            h("td", {}, bytes(c.size_bytes)),
            h("td", { title: absoluteTime(c.modified_at) }, relativeTime(c.modified_at)),
            h("td", { class: "right" }, downloadControl(c.name)),
          ))),
      ),
    );
  }
  return { node, refresh, count };
}

// ------------------------------------------------------------------------------------------ services
const HEALTH_LABELS = { serving: "serving", not_serving: "not serving", unreachable: "unreachable", error: "error" };

/** Links to jobs, each with its state's dot and its name when `known` has it (id -> job). */
function jobLinks(ids, known) {
  if (!ids.length) return h("span", { class: "muted" }, "none");
  return h("div", { class: "job-links" }, ids.map((id) => {
    const job = known.get(id);
    return h("a", { href: jobHref(id), "data-link": true, title: id, dataset: { job: id } },
      job ? h("i", { class: `dot dot-${job.state}`, "aria-hidden": "true" }) : null,
      h("span", { class: job?.name ? "" : "mono" }, job?.name || id));
  }));
}

/** An agent's GPUs as tags, the busy ones (held by its starting or running jobs) filled. */
function gpuTags(gpus, busy) {
  if (!gpus.length) return h("span", { class: "muted" }, "CPU only");
  const held = new Set(busy);
  return [
    h("div", { class: "tags" }, gpus.map((g) =>
      h("span", { class: `tag ${held.has(g) ? "tag-busy" : ""}`, title: `GPU ${g}: ${held.has(g) ? "busy" : "free"}`, dataset: { gpu: g, busy: held.has(g) } }, `GPU ${g}`))),
    h("div", { class: "muted small" }, `${held.size} of ${gpus.length} busy`),
  ];
}

const dash = () => h("span", { class: "muted" }, "–");

/**
 * One titled list on the services page: a table, or an empty state, a note or an error in its place.
 *   columns: header texts; rows: keyedRows options; empty: the empty state node.
 */
function listSection({ title, text, columns, rows, empty }) {
  const count = h("span", { class: "muted" });
  const tbody = h("tbody");
  const foot = h("span", { class: "muted small" });
  const card = h("div", { class: "card table-card" },
    h("table", {}, h("thead", {}, h("tr", {}, columns.map((t) => h("th", {}, t)))), tbody),
    h("div", { class: "table-foot" }, foot));
  const other = h("div"); // the empty state, a note or an error, when there is no table
  const node = h("section", { class: "section" },
    h("div", { class: "section-head" }, h("h2", {}, title, " ", count), h("p", { class: "muted" }, text)),
    card, other);
  const table = keyedRows(tbody, rows);
  function instead(content) {
    count.textContent = "";
    card.hidden = true;
    other.replaceChildren(content);
  }
  return {
    node,
    foot,
    show(list) {
      table.update(list);
      if (!list.length) return instead(empty);
      count.textContent = String(list.length);
      card.hidden = false;
      other.replaceChildren();
    },
    note: (...children) => instead(h("div", { class: "card note-card" }, h("p", {}, children))),
    error: (message) => instead(h("div", { class: "callout callout-failed" }, message)),
  };
}

function servicesView(root) {
  let known = new Map(); // id -> queued or active job: names and states for the job links
  const updated = h("span", { class: "muted small" });

  const services = listSection({
    title: "Hidden-state services",
    text: "The gRPC services that run a verifier and send trainers its hidden states.",
    columns: ["Endpoint", "Health", "Verifier", "Backend", "Layer ids", "Dtype", "Jobs"],
    empty: emptyState("No hidden-state services", [
      "A service is listed when the control plane is started with ", h("code", {}, "--hidden-states-endpoints host:port,…"),
      " or when a queued or running job names one in its ", h("code", {}, "hidden_states_endpoint"),
      ". Jobs without one compute hidden states in their own process."]),
    rows: {
      key: (s) => s.endpoint,
      dataset: (s) => ({ endpoint: s.endpoint, status: s.status }),
      cells: (s) => [
        h("td", {}, h("div", { class: "mono strong" }, s.endpoint),
          h("div", { class: "muted small" }, s.configured ? "--hidden-states-endpoints" : "named by a job")),
        h("td", { class: "col-health" }, stateChip(s.status, HEALTH_LABELS[s.status] ?? s.status),
          s.detail ? h("div", { class: "muted small detail", title: s.detail }, s.detail) : null),
        h("td", { class: "col-verifier" }, s.info
          ? [h("div", { class: "mono", title: s.info.verifier, dataset: { verifier: s.info.verifier } }, shortPath(s.info.verifier, 40)),
            h("div", { class: "muted small" }, `${s.info.architecture} · ${s.info.num_layers} layers · hidden ${integer(s.info.hidden_size)}`)]
          : dash()),
        h("td", {}, s.info ? [h("div", {}, s.info.backend), h("div", { class: "muted small" }, s.info.server_version)] : dash()),
        h("td", { class: "mono" }, s.info ? s.info.layer_ids.join(", ") : dash()),
        h("td", { class: "mono" }, s.info ? s.info.dtype : dash()),
        h("td", {}, jobLinks(s.jobs, known)),
      ],
    },
  });
  services.foot.textContent = "gRPC health and GetInfo, checked with a 2 s deadline and cached for 2 s";

  const agents = listSection({
    title: "Trainer agents",
    text: "Hosts that claim queued jobs and run their trainers on their own GPUs.",
    columns: ["Agent", "State", "Host", "GPUs", "Jobs", "Last seen"],
    empty: emptyState("No trainer agents yet", [
      "Run ", h("code", {}, `dflash trainer-agent --control-plane ${location.origin} --gpus 0,1`),
      " on a GPU host: it registers its GPUs here and claims the queued jobs that fit them."]),
    rows: {
      key: (a) => a.id,
      dataset: (a) => ({ agent: a.name, state: a.state }),
      cells: (a) => [
        h("td", {}, h("div", { class: "strong" }, a.name), a.id !== a.name ? h("div", { class: "mono muted small" }, a.id) : null),
        h("td", {}, stateChip(a.state)),
        h("td", {}, a.host || dash()),
        h("td", {}, gpuTags(a.gpus, a.gpus_busy)),
        h("td", {}, jobLinks(a.jobs, known), h("div", { class: "muted small" }, `up to ${a.max_jobs} at once`)),
        h("td", { class: "nowrap", title: absoluteTime(a.last_seen_at) }, relativeTime(a.last_seen_at)),
      ],
    },
  });

  root.append(
    h("div", { class: "page-head" },
      h("div", {}, h("h1", {}, "Services"), h("p", { class: "muted" }, "Where jobs get their hidden states, and where their trainers run.")),
      updated),
    services.node,
    agents.node,
  );

  async function refreshServices() {
    try {
      services.show(await api("/v1/hidden-state-services"));
    } catch (error) {
      services.error(`Could not list the hidden-state services: ${errorText(error)}`);
    }
  }

  async function refreshAgents() {
    const local = () => agents.note("Trainers run on this host (", h("code", {}, "--executor local"), ").");
    if (!session.health) await pollHealth();
    // The local executor has no agents (its /v1/agents answers 404 with a detail): skip the request.
    if (session.health?.executor === "local") return local();
    try {
      const list = await api("/v1/agents");
      agents.show(list);
      agents.foot.textContent = list.length ? `Heartbeat every ${list[0].heartbeat_interval_s} s · lost after ${list[0].lost_after_s} s of silence` : "";
    } catch (error) {
      if (error.status === 404) local();
      else agents.error(`Could not list the trainer agents: ${errorText(error)}`);
    }
  }

  async function refresh() {
    const active = new URLSearchParams([["limit", "500"], ["state", "queued"], ["state", "starting"], ["state", "running"]]);
    const page = await api(`/v1/jobs?${active}`).catch(() => ({ data: [] }));
    known = new Map(page.data.map((job) => [job.id, job]));
    await Promise.all([refreshServices(), refreshAgents()]);
    updated.textContent = `Updated ${new Date().toLocaleTimeString()} · refreshes every ${REFRESH_MS / 1000} s`;
  }

  refresh();
  return { destroy: every(REFRESH_MS, refresh) };
}

// ------------------------------------------------------------------------------------------ submit
function newJobView(root, fromId) {
  const name = h("input", { id: "job-name", name: "name", type: "text", placeholder: "e.g. qwen3-8b sharegpt", autocomplete: "off" });
  const gpus = h("input", { id: "job-gpus", name: "gpus", type: "number", min: "0", step: "1", placeholder: "default" });
  const config = h("textarea", { id: "job-config", name: "config", spellcheck: "false", rows: "22", "aria-describedby": "config-errors" });
  const errorsFor = {
    name: h("div", { class: "field-errors", dataset: { for: "name" } }),
    gpus: h("div", { class: "field-errors", dataset: { for: "gpus" } }),
    config: h("ul", { id: "config-errors", class: "field-errors config-errors", dataset: { for: "config" } }),
  };
  const gpuHint = h("div", { class: "hint" });
  const submit = h("button", { class: "btn btn-primary", type: "submit" }, "Submit job");
  const status = h("span", { class: "muted small" });
  const help = h("div", { class: "card help-card" });
  const form = h("form", { class: "card form-card", novalidate: true },
    h("div", { class: "form-row" },
      h("div", { class: "field" }, h("label", { for: "job-name" }, "Name"), name, h("div", { class: "hint" }, "A label for people; not unique."), errorsFor.name),
      h("div", { class: "field field-narrow" }, h("label", { for: "job-gpus" }, "GPUs"), gpus, gpuHint, errorsFor.gpus)),
    h("div", { class: "field" },
      h("div", { class: "label-row" },
        h("label", { for: "job-config" }, "Training config ", h("span", { class: "muted" }, "(JSON, the fields of ", h("code", {}, "dflash train"), ")")),
        h("div", { class: "label-actions" },
          h("button", { class: "btn btn-ghost btn-xs", type: "button", onclick: () => setConfig(EXAMPLE_CONFIG) }, "Example"),
          localStorage.getItem("dflash.lastConfig")
            ? h("button", { class: "btn btn-ghost btn-xs", type: "button", onclick: () => setConfig(JSON.parse(localStorage.getItem("dflash.lastConfig"))) }, "Last submitted")
            : null)),
      config, errorsFor.config),
    h("div", { class: "form-actions" }, submit, status),
  );
  root.append(
    h("div", { class: "page-head" }, h("div", {},
      h("h1", {}, fromId ? "Clone job" : "New job"),
      h("p", { class: "muted" }, "Paths are taken under the control plane's data and checkpoint roots; leave ", h("code", {}, "save_path"), " out and the job gets a folder of its own."))),
    h("div", { class: "form-layout" }, form, help),
  );

  function setConfig(value) {
    config.value = JSON.stringify(value, null, 2);
    config.rows = Math.min(Math.max(14, config.value.split("\n").length + 2), 40);
    clearErrors();
  }

  function clearErrors() {
    for (const node of Object.values(errorsFor)) node.replaceChildren();
    for (const input of [name, gpus, config]) input.classList.remove("invalid");
  }

  function selectKey(key) {
    const at = config.value.indexOf(`"${key}"`);
    if (at < 0) return;
    config.focus();
    config.setSelectionRange(at, at + key.length + 2);
    const line = config.value.slice(0, at).split("\n").length;
    config.scrollTop = Math.max(0, (line - 4) * parseFloat(getComputedStyle(config).lineHeight));
    showHelp(key);
  }

  function showErrors(detail) {
    clearErrors();
    const items = Array.isArray(detail) ? detail : [{ loc: ["body"], msg: String(detail) }];
    for (const item of items) {
      const loc = (item.loc ?? []).filter((part) => part !== "body");
      const field = loc.length ? String(loc[0]) : null;
      if (field === "name" || field === "gpus") {
        errorsFor[field].append(h("div", { class: "error-text", dataset: { field } }, item.msg));
        (field === "name" ? name : gpus).classList.add("invalid");
        continue;
      }
      config.classList.add("invalid");
      const where = loc.length ? loc.join(".") : "config";
      const present = field !== null && config.value.includes(`"${field}"`);
      errorsFor.config.append(
        h("li", { class: "field-error", dataset: { field: field ?? "" } },
          present
            ? h("button", { type: "button", class: "linklike mono", title: "Show it in the config", onclick: () => selectKey(field) }, where)
            : h("span", { class: "mono" }, where),
          h("span", {}, item.msg)),
      );
    }
    const first = $(".invalid", form);
    first?.scrollIntoView({ block: "center", behavior: "smooth" });
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors();
    let body;
    try {
      body = JSON.parse(config.value || "{}");
    } catch (error) {
      showErrors([{ loc: ["body"], msg: `Not valid JSON: ${error.message}` }]);
      return;
    }
    if (typeof body !== "object" || body === null || Array.isArray(body)) {
      showErrors([{ loc: ["body"], msg: "The config must be a JSON object: { \"field\": value, ... }" }]);
      return;
    }
    if (name.value.trim()) body.name = name.value.trim();
    if (gpus.value !== "") body.gpus = Number(gpus.value);
    submit.disabled = true;
    status.textContent = "Submitting…";
    try {
      const job = await api("/v1/jobs", { method: "POST", body });
      const saved = { ...body };
      delete saved.name;
      delete saved.gpus;
      localStorage.setItem("dflash.lastConfig", JSON.stringify(saved));
      toast(`Job ${job.name || job.id} queued`, "success");
      navigate(jobHref(job.id));
    } catch (error) {
      status.textContent = "";
      if (error.status === 422) showErrors(error.detail);
      else if (error.status === 401 || error.status === 403) status.textContent = "Add the control plane's token (top right), then submit again.";
      else showErrors([{ loc: ["body"], msg: errorText(error) }]);
    } finally {
      submit.disabled = false;
    }
  });

  // Field help from the API's own schema: the description and default of the field under the cursor.
  let schema = null;
  const isRequired = (key) => (schema?.required ?? []).includes(key);
  function showHelp(key) {
    if (!schema) return;
    const props = schema.properties ?? {};
    const field = key && props[key] ? key : null;
    const names = Object.keys(props);
    help.replaceChildren(
      h("div", { class: "card-head" }, h("h3", {}, "Fields"), h("span", { class: "muted small" }, `${names.length} · click one to add it`)),
      field ? fieldHelp(field, props[field], true) : h("p", { class: "muted small" }, "Put the cursor on a field to see what it does. Required: ", (schema.required ?? []).map((r) => h("code", {}, r)), "."),
      h("ul", { class: "field-list" }, names.map((n) =>
        h("li", { class: n === field ? "active" : "" },
          h("button", { type: "button", class: "linklike mono", onclick: () => insertField(n, props[n]) }, n),
          h("span", { class: "muted" }, defaultText(props[n], isRequired(n)))))),
    );
    help.querySelector(".field-list li.active")?.scrollIntoView({ block: "nearest" });
  }
  function fieldHelp(key, prop, active) {
    return h("div", { class: `field-help ${active ? "active" : ""}` },
      h("div", { class: "mono" }, key, h("span", { class: "muted" }, `  ${typeText(prop)}`)),
      h("p", {}, prop.description ?? ""),
      h("div", { class: "muted small" }, `default: ${defaultText(prop, isRequired(key))}`));
  }
  function insertField(key, prop) {
    let body;
    try {
      body = JSON.parse(config.value || "{}");
    } catch {
      return selectKey(key);
    }
    if (!(key in body)) body[key] = prop.default ?? null;
    config.value = JSON.stringify(body, null, 2);
    selectKey(key);
  }
  config.addEventListener("keyup", cursorHelp);
  config.addEventListener("click", cursorHelp);
  function cursorHelp() {
    const start = config.value.lastIndexOf("\n", config.selectionStart - 1) + 1;
    const line = config.value.slice(start, config.value.indexOf("\n", start) >>> 0);
    const match = line.match(/"(\w+)"\s*:/);
    showHelp(match?.[1] ?? null);
  }

  async function loadSchema() {
    const openapi = fetch("/openapi.json", { headers: authHeaders() }).then((r) => (r.ok ? r.json() : null));
    const [schemaSource] = await Promise.all([openapi.catch(() => null), pollHealth()]);
    schema = schemaSource?.components?.schemas?.JobCreate ?? null;
    showHelp(null);
    const health = session.health;
    if (health) {
      gpuHint.textContent = health.gpus.length
        ? `${health.gpus_free.length} of ${health.gpus.length} free now; default 1. 0 = CPU.`
        : "This control plane has no GPUs: jobs run on CPU (0).";
    }
  }

  let copied = !fromId;
  function copyJob() {
    api(`/v1/jobs/${encodeURIComponent(fromId)}`).then((job) => {
      const copy = { ...job.config };
      for (const key of NOT_COPIED) delete copy[key];
      setConfig(copy);
      name.value = job.name ? `${job.name} (copy)` : "";
      gpus.value = String(job.gpus_requested);
      copied = true;
    }).catch((error) => toast(`Could not copy job ${fromId}: ${errorText(error)}`, "error"));
  }

  loadSchema();
  if (fromId) copyJob();
  else setConfig(EXAMPLE_CONFIG);
  // A token given later fills in what needed it, without losing what was typed.
  return { destroy() {}, onToken() {
    loadSchema();
    if (!copied) copyJob();
  } };
}

function typeText(prop) {
  const types = (prop.anyOf ?? [prop]).map((p) => (p.enum ? p.enum.join(" | ") : p.type === "array" ? `${p.items?.type ?? "any"}[]` : (p.type ?? (p.$ref ? "object" : "any"))));
  return types.join(" | ");
}

function defaultText(prop, required) {
  if (required) return "required";
  if (!("default" in prop) || prop.default === null) return "—";
  return JSON.stringify(prop.default);
}

// ------------------------------------------------------------------------------------------ start
setupTheme();
setupToken();
pollHealth();
setInterval(() => !document.hidden && pollHealth(), 10_000);
route();
