// The tabs under a job's charts: its log (followed live), its checkpoints (downloadable) and the
// config its trainer runs with. Each panel is { node, ... } for the job page to place.

import { api, authHeaders, errorText, refused, session } from "/dashboard/api.js";
import { h, toast } from "/dashboard/dom.js";
import { absoluteTime, bytes, integer, relativeTime } from "/dashboard/format.js";
import { eventStream } from "/dashboard/stream.js";

const MAX_LOG_LINES = 5000;

export function logsPanel(path) {
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
        status.textContent = code === 429
          ? "too many live streams open: not following" : `not following (HTTP ${code})`;
        refused(code);
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

export function checkpointsPanel(path, jobId) {
  const node = h("div", { class: "panel" });
  const count = h("span", { class: "tab-count" }); // beside the tab's name
  const archive = (name) => `${path}/checkpoints/${encodeURIComponent(name)}/archive`;
  const fileName = (name) => `${jobId}-${name}.tar.gz`;

  async function download(name, button) {
    // With a token the archive route needs the Authorization header, which a plain link cannot
    // send: fetch it (held in memory, fine for drafter checkpoints) and hand the blob over.
    button.disabled = true;
    button.textContent = "Downloading…";
    try {
      const response = await fetch(archive(name), { headers: authHeaders() });
      if (!response.ok) {
        refused(response.status);
        throw new Error(`HTTP ${response.status}`);
      }
      const url = URL.createObjectURL(await response.blob());
      const link = h("a", { href: url, download: fileName(name) });
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
      return h("a", { class: "btn btn-sm", href: archive(name), download: fileName(name) }, "Download");
    }
    const button = h("button", { class: "btn btn-sm", type: "button" }, "Download");
    button.addEventListener("click", () => download(name, button));
    return button;
  }

  function row(listing, c) {
    return h("tr", { dataset: { checkpoint: c.name } },
      h("td", {}, h("span", { class: "mono" }, c.name),
        c.name === listing.latest ? h("span", { class: "tag" }, "latest") : null,
        c.name === listing.checkpoint_best ? h("span", { class: "tag tag-best" }, "best") : null),
      h("td", {}, c.epoch ?? "–"),
      h("td", {}, integer(c.step)),
      h("td", {}, c.val_loss === null ? "–" : c.val_loss.toFixed(4)),
      h("td", {}, bytes(c.size_bytes)),
      h("td", { title: absoluteTime(c.modified_at) }, relativeTime(c.modified_at)),
      h("td", { class: "right" }, downloadControl(c.name)));
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
    const savePath = h("span", { class: "muted small mono" }, listing.save_path);
    if (!listing.data.length) {
      const none = "No checkpoints yet: one is written at the end of each epoch.";
      node.replaceChildren(h("p", { class: "muted panel-empty" }, none), 
        h("p", { class: "muted small mono" }, listing.save_path));
      return;
    }
    const headings = ["Checkpoint", "Epoch", "Step", "Val loss", "Size", "Written", ""];
    node.replaceChildren(
      h("div", { class: "panel-bar" }, savePath,
        h("span", { class: "muted small" }, "Each archive unpacks to a folder that ",
          h("code", {}, "vllm serve <folder>"), " loads.")),
      h("table", { class: "ckpt-table" },
        h("thead", {}, h("tr", {}, headings.map((t) => h("th", {}, t)))),
        h("tbody", {}, listing.data.map((c) => row(listing, c)))),
    );
  }
  return { node, refresh, count };
}

/** The job's config as the trainer runs it (every default filled in), highlighted, with a copy button. */
export function configPanel() {
  const node = h("div", { class: "panel" });
  function render(config) {
    const text = JSON.stringify(config, null, 2);
    const copy = async () => {
      await navigator.clipboard?.writeText(text);
      toast("Config copied");
    };
    node.replaceChildren(
      h("div", { class: "panel-bar" },
        h("span", { class: "muted small" },
          "The config the trainer runs with: every default filled in, paths resolved."),
        h("button", { class: "btn btn-sm", type: "button", onclick: copy }, "Copy")),
      h("pre", { class: "json" }, highlightJson(text)),
    );
  }
  return { node, render };
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
