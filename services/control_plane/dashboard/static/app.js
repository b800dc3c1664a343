// The control plane's dashboard: a jobs table, a live job page and a submit form, over the REST API
// under /v1 (docs/control_plane.md). Plain ES modules, no build step, nothing fetched from outside.
// This module starts it: the top bar, and the router that picks the page's view by its path.
//
//   /               jobs.js      jobs: state, progress, ETA; filter by state; refreshed every few seconds
//   /jobs/<id>      job.js       one job: live charts (Server-Sent Events), logs, checkpoints, config, actions
//   /new[?from=ID]  new-job.js   submit form: a JSON TrainConfig plus name and GPUs; 422s shown by their field
//   /services       services.js  hidden-state services (gRPC health, what they serve) and trainer agents
//
// Shared: api.js (token, requests), meta.js (what the server defines: /v1/meta), dom.js, format.js,
// nav.js (navigation), chrome.js (top bar), plot.js (charts), stream.js (SSE over fetch).

import { pollHealth, setupTheme, setupToken } from "/dashboard/chrome.js";
import { $, allJobsLink, emptyState } from "/dashboard/dom.js";
import { jobView } from "/dashboard/job.js";
import { jobsView } from "/dashboard/jobs.js";
import { SERVICES_PATH, navigate, setRouter } from "/dashboard/nav.js";
import { newJobView } from "/dashboard/new-job.js";
import { servicesView } from "/dashboard/services.js";

let current = null; // the view on screen: { destroy(), onToken()? }

/** The view for the path, and the top bar link it highlights. */
function viewFor(view, { pathname, searchParams }) {
  const job = pathname.match(/^\/jobs\/([^/]+)\/?$/);
  if (pathname === SERVICES_PATH) return [servicesView(view), "services"];
  if (pathname === "/" || pathname === "") return [jobsView(view, searchParams), "jobs"];
  if (job) return [jobView(view, decodeURIComponent(job[1])), "jobs"];
  if (pathname === "/new") return [newJobView(view, searchParams.get("from")), "new"];
  view.append(emptyState("Nothing here", "This page does not exist.", allJobsLink()));
  return [null, "jobs"];
}

function route() {
  current?.destroy?.();
  const view = $("#view");
  view.replaceChildren();
  window.scrollTo(0, 0);
  let nav;
  [current, nav] = viewFor(view, new URL(location.href));
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

setRouter(route);
setupTheme();
// Pages that could not load without the token load now; the form keeps what was typed into it.
setupToken(() => (current?.onToken ? current.onToken() : route()));
pollHealth();
setInterval(() => !document.hidden && pollHealth(), 10_000);
route();
