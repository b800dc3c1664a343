// The jobs page (/): state, progress, ETA; filter by state; refreshed every few seconds.

import { api, errorText, stateCounts } from "/dashboard/api.js";
import { emptyState, every, h, keyedRows, stateChip } from "/dashboard/dom.js";
import {
  REFRESH_MS, absoluteTime, duration, etaOf, gpusText, integer, progressOf, rateOf, relativeTime, tookText,
  updatedText,
} from "/dashboard/format.js";
import { loadMeta, meta } from "/dashboard/meta.js";
import { jobHref, navigate } from "/dashboard/nav.js";

const PAGE = 50; // jobs per "Show more"
const MOST = 500; // the API's largest page

const capitalized = (word) => word[0].toUpperCase() + word.slice(1);
const buttonLink = (href, label, primary = false) =>
  h("a", { href, "data-link": true, class: primary ? "btn btn-primary" : "btn" }, label);

export function jobsView(root, params) {
  let filter = params.get("state") ?? "";
  let limit = PAGE;
  const rates = new Map(); // job id -> { rate, fetchedAt }
  let rateById = new Map(); // job id -> rate, for the page on screen
  const filters = h("div", { class: "segmented", role: "tablist" });
  const tbody = h("tbody");
  const countNode = h("span", { class: "muted" });
  const updated = h("span", { class: "muted small" });
  const showMore = () => {
    limit = Math.min(limit + PAGE, MOST);
    refresh();
  };
  const more = h("button", { class: "btn btn-ghost", type: "button", hidden: true, onclick: showMore }, "Show more");
  const headings = ["State", "Job", "Progress", "ETA", "Created", "GPUs"].map((text) =>
    h("th", { class: text === "Progress" ? "col-progress" : null }, text));
  const tableCard = h("div", { class: "card table-card" },
    h("table", { class: "jobs-table" }, h("thead", {}, h("tr", {}, headings)), tbody),
    h("div", { class: "table-foot" }, updated, more));
  const rows = keyedRows(tbody, {
    key: (job) => job.id,
    cells: (job) => cells(job, rateById.get(job.id) ?? null),
    dataset: (job) => ({ jobId: job.id, state: job.state }),
    onclick: (event, job) => {
      if (!event.target.closest("a")) navigate(jobHref(job.id));
    },
  });
  const empty = h("div", { hidden: true });
  const intro = "Training runs submitted to this control plane, newest first.";
  root.append(
    h("div", { class: "page-head" },
      h("div", {}, h("h1", {}, "Jobs ", countNode), h("p", { class: "muted" }, intro)),
      filters),
    tableCard,
    empty,
  );

  function filterButton([state, label, n]) {
    const select = () => {
      filter = state;
      history.replaceState(null, "", state ? `/?state=${state}` : "/");
      rows.clear();
      refresh();
    };
    const selected = state === filter;
    return h("button", {
      type: "button",
      role: "tab",
      class: `segment ${selected ? "active" : ""}`,
      "aria-selected": selected ? "true" : "false",
      dataset: { state },
      onclick: select,
    }, state ? h("i", { class: `dot dot-${state}` }) : null, label,
    n ? h("span", { class: "segment-count" }, n) : null);
  }

  function renderFilters(counts) {
    const total = Object.values(counts).reduce((a, b) => a + b, 0);
    const entries = [["", "All", total], ...meta.states.map((s) => [s, capitalized(s), counts[s]])];
    filters.replaceChildren(...entries.map(filterButton));
  }

  async function rateFor(job) {
    const known = rates.get(job.id);
    if (known && Date.now() - known.fetchedAt < 10_000) return known.rate;
    const window = 20 * (job.config.log_freq ?? 10);
    const since = Math.max(0, (job.step ?? 0) - window);
    const page = await api(`/v1/jobs/${encodeURIComponent(job.id)}/metrics?since_step=${since}&limit=500`);
    const train = page.data.filter((r) => r.attempt === job.attempt && "train/loss" in r.metrics);
    const rate = rateOf(train);
    rates.set(job.id, { rate, fetchedAt: Date.now() });
    return rate;
  }

  function etaCell(job, rate) {
    const eta = etaOf(job, rate);
    if (eta !== null) return duration(eta);
    if (tookText(job)) return h("span", { class: "muted" }, tookText(job));
    if (meta.active.has(job.state)) return h("span", { class: "muted" }, "estimating…");
    return "–";
  }

  function progressCell(job) {
    const fraction = progressOf(job);
    const active = meta.active.has(job.state);
    const width = fraction === null ? (active ? 100 : 0) : fraction * 100;
    const of = job.total_steps ? ` / ${integer(job.total_steps)}` : "";
    const waiting = job.state === "queued" ? "waiting" : "–";
    const stepText = job.step === null ? waiting : `${integer(job.step)}${of} steps`;
    const percentText = fraction === null ? null : `${Math.round(fraction * 100)}%`;
    return h("td", { class: "col-progress" },
      h("div", { class: `bar bar-${job.state}`, title: percentText ?? "" },
        h("div", {
          class: `bar-fill ${fraction === null && active ? "bar-indeterminate" : ""}`,
          style: `width:${width}%`,
        })),
      h("div", { class: "small muted bar-label" }, h("span", {}, stepText), percentText && h("span", {}, percentText)));
  }

  function cells(job, rate) {
    const cancelling = job.cancel_requested && !meta.terminal.has(job.state);
    const subtitle = job.name ? job.id : `attempt ${job.attempt}`;
    return [
      h("td", {}, stateChip(job.state), cancelling ? h("span", { class: "tag" }, "cancelling") : null),
      h("td", { class: "col-job" },
        h("a", { href: jobHref(job.id), "data-link": true, class: "job-name" }, job.name || job.id),
        h("div", { class: "mono muted small" }, subtitle)),
      progressCell(job),
      h("td", { class: "nowrap" }, etaCell(job, rate)),
      h("td", { class: "nowrap", title: absoluteTime(job.created_at) }, relativeTime(job.created_at)),
      h("td", { class: "nowrap" }, gpusText(job)),
    ];
  }

  function renderEmpty() {
    empty.replaceChildren(
      filter
        ? emptyState(`No ${filter} jobs`, "Nothing in this state right now.", buttonLink("/", "Show all jobs"))
        : emptyState("No jobs yet", "Submit a training configuration and follow it here live.",
          buttonLink("/new", "New job", true)),
    );
  }

  async function refresh() {
    await loadMeta();
    const query = new URLSearchParams({ limit: String(limit) });
    if (filter) query.append("state", filter);
    const [page, counts] = await Promise.all([api(`/v1/jobs?${query}`), stateCounts()]);
    renderFilters(counts);
    countNode.textContent = page.count ? `${page.count}` : "";
    const running = page.data.filter((job) => job.state === "running").slice(0, 20);
    const found = await Promise.all(running.map((job) => rateFor(job).catch(() => null)));
    rateById = new Map(running.map((job, i) => [job.id, found[i]]));
    rows.update(page.data);
    more.hidden = !page.next_cursor || limit >= MOST;
    tableCard.hidden = page.count === 0;
    empty.hidden = page.count !== 0;
    if (page.count === 0) renderEmpty();
    updated.textContent = updatedText();
  }

  refresh().catch((error) => {
    root.append(h("div", { class: "callout callout-failed" }, `Could not list jobs: ${errorText(error)}`));
  });
  const stop = every(REFRESH_MS, refresh);
  return { destroy: stop };
}
