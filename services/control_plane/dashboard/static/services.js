// The services page (/services): hidden-state services (gRPC health, what they serve) and trainer
// agents (state, GPUs busy or free, jobs, last seen), with the jobs each one serves.

import { api, errorText, session } from "/dashboard/api.js";
import { emptyState, every, h, keyedRows, stateChip } from "/dashboard/dom.js";
import { REFRESH_MS, absoluteTime, integer, relativeTime, shortPath, updatedText } from "/dashboard/format.js";
import { pollHealth } from "/dashboard/chrome.js";
import { loadMeta, meta } from "/dashboard/meta.js";
import { jobHref } from "/dashboard/nav.js";

const HEALTH_LABELS = { serving: "serving", not_serving: "not serving", unreachable: "unreachable", error: "error" };

const dash = () => h("span", { class: "muted" }, "–");

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
  const tag = (g) => h("span", {
    class: `tag ${held.has(g) ? "tag-busy" : ""}`,
    title: `GPU ${g}: ${held.has(g) ? "busy" : "free"}`,
    dataset: { gpu: g, busy: held.has(g) },
  }, `GPU ${g}`);
  return [
    h("div", { class: "tags" }, gpus.map(tag)),
    h("div", { class: "muted small" }, `${held.size} of ${gpus.length} busy`),
  ];
}

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

function serviceCells(s, known) {
  const where = s.configured ? "--hidden-states-endpoints" : "named by a job";
  const info = s.info;
  const verifier = info && [
    h("div", { class: "mono", title: info.verifier, dataset: { verifier: info.verifier } },
      shortPath(info.verifier, 40)),
    h("div", { class: "muted small" },
      `${info.architecture} · ${info.num_layers} layers · hidden ${integer(info.hidden_size)}`),
  ];
  return [
    h("td", {}, h("div", { class: "mono strong" }, s.endpoint), h("div", { class: "muted small" }, where)),
    h("td", { class: "col-health" }, stateChip(s.status, HEALTH_LABELS[s.status] ?? s.status),
      s.detail ? h("div", { class: "muted small detail", title: s.detail }, s.detail) : null),
    h("td", { class: "col-verifier" }, verifier || dash()),
    h("td", {}, info ? [h("div", {}, info.backend), h("div", { class: "muted small" }, info.server_version)] : dash()),
    h("td", { class: "mono" }, info ? info.layer_ids.join(", ") : dash()),
    h("td", { class: "mono" }, info ? info.dtype : dash()),
    h("td", {}, jobLinks(s.jobs, known)),
  ];
}

function agentCells(a, known) {
  return [
    h("td", {}, h("div", { class: "strong" }, a.name),
      a.id !== a.name ? h("div", { class: "mono muted small" }, a.id) : null),
    h("td", {}, stateChip(a.state)),
    h("td", {}, a.host || dash()),
    h("td", {}, gpuTags(a.gpus, a.gpus_busy)),
    h("td", {}, jobLinks(a.jobs, known), h("div", { class: "muted small" }, `up to ${a.max_jobs} at once`)),
    h("td", { class: "nowrap", title: absoluteTime(a.last_seen_at) }, relativeTime(a.last_seen_at)),
  ];
}

export function servicesView(root) {
  let known = new Map(); // id -> queued or active job: names and states for the job links
  const updated = h("span", { class: "muted small" });

  const services = listSection({
    title: "Hidden-state services",
    text: "The gRPC services that run a verifier and send trainers its hidden states.",
    columns: ["Endpoint", "Health", "Verifier", "Backend", "Layer ids", "Dtype", "Jobs"],
    empty: emptyState("No hidden-state services", [
      "A service is listed when the control plane is started with ",
      h("code", {}, "--hidden-states-endpoints host:port,…"),
      " or when a queued or running job names one in its ", h("code", {}, "hidden_states_endpoint"),
      ". Jobs without one compute hidden states in their own process."]),
    rows: {
      key: (s) => s.endpoint,
      dataset: (s) => ({ endpoint: s.endpoint, status: s.status }),
      cells: (s) => serviceCells(s, known),
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
      cells: (a) => agentCells(a, known),
    },
  });

  const intro = "Where jobs get their hidden states, and where their trainers run.";
  root.append(
    h("div", { class: "page-head" }, h("div", {}, h("h1", {}, "Services"), h("p", { class: "muted" }, intro)), updated),
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
      const first = list[0];
      agents.foot.textContent = first
        ? `Heartbeat every ${first.heartbeat_interval_s} s · lost after ${first.lost_after_s} s of silence` : "";
    } catch (error) {
      if (error.status === 404) local();
      else agents.error(`Could not list the trainer agents: ${errorText(error)}`);
    }
  }

  async function refresh() {
    const page = await loadMeta().then(() => {
      const open = meta.states.filter((state) => !meta.terminal.has(state)); // queued or active
      return api(`/v1/jobs?${new URLSearchParams([["limit", "500"], ...open.map((state) => ["state", state])])}`);
    }).catch(() => ({ data: [] }));
    known = new Map(page.data.map((job) => [job.id, job]));
    await Promise.all([refreshServices(), refreshAgents()]);
    updated.textContent = updatedText();
  }

  refresh();
  return { destroy: every(REFRESH_MS, refresh) };
}
