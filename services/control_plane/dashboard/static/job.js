// One job's page (/jobs/<id>): live charts from its metric stream (Server-Sent Events), progress,
// its Run card, and tabs for the log, checkpoints and config; cancel, resume, clone and delete.

import { ApiError, api, authHeaders, errorText, refused } from "/dashboard/api.js";
import { allJobsLink, emptyState, every, h, toast } from "/dashboard/dom.js";
import { REFRESH_MS } from "/dashboard/format.js";
import { chartBoard } from "/dashboard/job-charts.js";
import { checkpointsPanel, configPanel, logsPanel } from "/dashboard/job-panels.js";
import { progressCard, renderDetails, renderHead } from "/dashboard/job-summary.js";
import { loadMeta, meta } from "/dashboard/meta.js";
import { navigate } from "/dashboard/nav.js";
import { eventStream } from "/dashboard/stream.js";

const TABS = ["logs", "checkpoints", "config"];

/** The page; a resume starts it over (a new attempt), in the same place. */
export function jobView(root, jobId) {
  let page = null;
  const restart = () => {
    page.destroy();
    root.replaceChildren();
    page = jobPage(root, jobId, restart);
  };
  page = jobPage(root, jobId, restart);
  return { destroy: () => page.destroy() };
}

function jobPage(root, jobId, restart) {
  const path = `/v1/jobs/${encodeURIComponent(jobId)}`;
  const cleanups = [];
  let job = null;
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
    h("nav", { class: "crumbs" },
      h("a", { href: "/", "data-link": true }, "Jobs"), h("span", { "aria-hidden": "true" }, "/"),
      h("span", { class: "mono" }, jobId)),
    head, callout, progress, tiles, grid, tabs,
  );
  const board = chartBoard(grid, tiles);
  const progressBar = progressCard(progress);
  const handlers = { cancel: () => act("cancel"), resume: () => act("resume"), remove };

  // ---- header, progress, details
  let headSignature = "";
  function renderTop() {
    // Polled every few seconds: redraw only on a change (the running dot's pulse would restart).
    const signature = JSON.stringify([job.state, job.name, job.reason, job.cancel_requested, job.attempt, job.gpus,
      job.pid, job.exit_code, job.started_at, job.finished_at, job.agent_id, Math.floor(Date.now() / 60_000)]);
    if (signature === headSignature) return;
    headSignature = signature;
    renderHead(head, callout, job, handlers);
    renderDetails(details, job);
  }

  function scheduleSummary() {
    if (summaryFrame) return;
    summaryFrame = requestAnimationFrame(() => {
      summaryFrame = 0;
      board.render();
      progressBar.render(job, trainRows);
    });
  }

  function addRow(row) {
    // Rows of an earlier attempt only draw the curve; the rate comes from the current attempt.
    if (row.attempt === job?.attempt && "train/loss" in row.metrics) {
      trainRows.push({ step: row.step, time: row.time });
      if (trainRows.length > 200) trainRows.splice(0, trainRows.length - 200);
    }
    board.add(row);
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
          renderTop();
          scheduleSummary();
        } else if (name === "metrics") addRow(JSON.parse(data));
        else if (name === "end") {
          stream.close();
          refreshJob();
          checkpoints.refresh();
        }
      },
      onRefused(status) {
        refused(status, new ApiError(status, ""));
        if (status === 429) toast("Too many live streams open on this control plane: charts are not live", "error");
      },
    });
    cleanups.push(() => stream.close());
  }

  async function refreshJob() {
    try {
      [job] = await Promise.all([api(path), loadMeta()]);
    } catch (error) {
      if (error.status !== 404) throw error;
      const gone = `No job ${jobId} on this control plane (it may have been deleted).`;
      head.replaceChildren(emptyState("Job not found", gone, allJobsLink()));
      return false;
    }
    renderTop();
    scheduleSummary();
    return true;
  }

  async function act(action) {
    try {
      job = await api(`${path}/${action}`, { method: "POST" });
      toast(action === "cancel" ? "Cancel requested" : "Job queued again");
      if (action === "resume") return restart();
      renderTop();
    } catch (error) {
      toast(`Could not ${action}: ${errorText(error)}`, "error");
    }
  }

  async function remove() {
    const what = "Its record, metric rows and log are removed; checkpoints stay on disk.";
    if (!confirm(`Delete job ${job.name || job.id}? ${what}`)) return;
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
  const config = configPanel();
  const panels = { logs: logs.node, checkpoints: checkpoints.node, config: config.node };
  let activeTab = "logs";
  function tabButton(name) {
    const open = () => {
      activeTab = name;
      if (name === "checkpoints") checkpoints.refresh();
      if (name === "config" && job) config.render(job.config);
      renderTabs();
    };
    return h("button", { type: "button", role: "tab", class: `tab ${activeTab === name ? "active" : ""}`,
      dataset: { tab: name }, onclick: open },
    name[0].toUpperCase() + name.slice(1), name === "checkpoints" ? checkpoints.count : null);
  }
  function renderTabs() {
    tabs.replaceChildren(h("div", { class: "tabs", role: "tablist" }, TABS.map(tabButton)), panels[activeTab]);
  }

  const parts = [progress, tiles, grid, tabs];
  for (const part of parts) part.hidden = true; // until the job is loaded
  (async () => {
    if (!(await refreshJob())) return;
    for (const part of parts) part.hidden = false;
    board.build(job.config.block_size, details);
    renderTabs();
    progressBar.render(job, trainRows);
    board.render();
    openStream();
    logs.start();
    checkpoints.refresh();
    // The `job` event comes on state changes only; progress (step, total) is read every few seconds.
    cleanups.push(every(REFRESH_MS, async () => {
      if (job && !meta.terminal.has(job.state)) await refreshJob();
      if (job?.state === "running") await checkpoints.refresh();
    }));
  })().catch((error) => {
    head.replaceChildren(h("div", { class: "callout callout-failed" }, `Could not load the job: ${errorText(error)}`));
  });

  function destroy() {
    for (const cleanup of cleanups) cleanup();
    logs.stop();
    board.destroy();
    cancelAnimationFrame(summaryFrame);
  }
  return { destroy };
}
