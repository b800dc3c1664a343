// The submit form (/new, /new?from=<id> to clone): a JSON TrainConfig plus name and GPUs. A 422
// is shown next to the field it names; the example config and the fields a clone leaves out come
// from the control plane (/v1/meta).

import { api, authHeaders, errorText, session } from "/dashboard/api.js";
import { pollHealth } from "/dashboard/chrome.js";
import { $, h, toast } from "/dashboard/dom.js";
import { fieldHelp } from "/dashboard/field-help.js";
import { loadMeta, meta } from "/dashboard/meta.js";
import { jobHref, navigate } from "/dashboard/nav.js";

const LAST_CONFIG = "dflash.lastConfig"; // localStorage: the config last submitted from this browser

function inputs() {
  const name = h("input",
    { id: "job-name", name: "name", type: "text", placeholder: "e.g. qwen3-8b sharegpt", autocomplete: "off" });
  const gpus = h("input",
    { id: "job-gpus", name: "gpus", type: "number", min: "0", step: "1", placeholder: "default" });
  const config = h("textarea",
    { id: "job-config", name: "config", spellcheck: "false", rows: "22", "aria-describedby": "config-errors" });
  const errorsFor = {
    name: h("div", { class: "field-errors", dataset: { for: "name" } }),
    gpus: h("div", { class: "field-errors", dataset: { for: "gpus" } }),
    config: h("ul", { id: "config-errors", class: "field-errors config-errors", dataset: { for: "config" } }),
  };
  return { name, gpus, config, errorsFor };
}

export function newJobView(root, fromId) {
  const { name, gpus, config, errorsFor } = inputs();
  const gpuHint = h("div", { class: "hint" });
  const submit = h("button", { class: "btn btn-primary", type: "submit" }, "Submit job");
  const status = h("span", { class: "muted small" });
  const helpCard = h("div", { class: "card help-card" });
  const help = fieldHelp(helpCard, { onPick: insertField });
  const small = (label, onclick) => h("button", { class: "btn btn-ghost btn-xs", type: "button", onclick }, label);
  const last = localStorage.getItem(LAST_CONFIG);
  const form = h("form", { class: "card form-card", novalidate: true },
    h("div", { class: "form-row" },
      h("div", { class: "field" },
        h("label", { for: "job-name" }, "Name"), name, h("div", { class: "hint" }, "A label for people; not unique."),
        errorsFor.name),
      h("div", { class: "field field-narrow" },
        h("label", { for: "job-gpus" }, "GPUs"), gpus, gpuHint, errorsFor.gpus)),
    h("div", { class: "field" },
      h("div", { class: "label-row" },
        h("label", { for: "job-config" },
          "Training config ",
          h("span", { class: "muted" }, "(JSON, the fields of ", h("code", {}, "dflash train"), ")")),
        h("div", { class: "label-actions" },
          small("Example", () => loadMeta().then(() => setConfig(meta.exampleConfig), fail("load the example"))),
          last ? small("Last submitted", () => setConfig(JSON.parse(localStorage.getItem(LAST_CONFIG)))) : null)),
      config, errorsFor.config),
    h("div", { class: "form-actions" }, submit, status),
  );
  root.append(
    h("div", { class: "page-head" }, h("div", {},
      h("h1", {}, fromId ? "Clone job" : "New job"),
      h("p", { class: "muted" }, "Paths are taken under the control plane's data and checkpoint roots; leave ",
        h("code", {}, "save_path"), " out and the job gets a folder of its own."))),
    h("div", { class: "form-layout" }, form, helpCard),
  );

  function fail(what) {
    return (error) => toast(`Could not ${what}: ${errorText(error)}`, "error");
  }

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
    help.show(key);
  }

  function configError(item, loc) {
    const field = loc.length ? String(loc[0]) : null;
    const where = loc.length ? loc.join(".") : "config";
    const present = field !== null && config.value.includes(`"${field}"`);
    const title = "Show it in the config";
    return h("li", { class: "field-error", dataset: { field: field ?? "" } },
      present
        ? h("button", { type: "button", class: "linklike mono", title, onclick: () => selectKey(field) }, where)
        : h("span", { class: "mono" }, where),
      h("span", {}, item.msg));
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
      errorsFor.config.append(configError(item, loc));
    }
    $(".invalid", form)?.scrollIntoView({ block: "center", behavior: "smooth" });
  }

  /** The request body from the form, or null (the errors shown) when the config is not an object. */
  function body() {
    let parsed;
    try {
      parsed = JSON.parse(config.value || "{}");
    } catch (error) {
      showErrors([{ loc: ["body"], msg: `Not valid JSON: ${error.message}` }]);
      return null;
    }
    if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) {
      showErrors([{ loc: ["body"], msg: "The config must be a JSON object: { \"field\": value, ... }" }]);
      return null;
    }
    if (name.value.trim()) parsed.name = name.value.trim();
    if (gpus.value !== "") parsed.gpus = Number(gpus.value);
    return parsed;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors();
    const sent = body();
    if (sent === null) return;
    submit.disabled = true;
    status.textContent = "Submitting…";
    try {
      const job = await api("/v1/jobs", { method: "POST", body: sent });
      const { name: _name, gpus: _gpus, ...saved } = sent;
      localStorage.setItem(LAST_CONFIG, JSON.stringify(saved));
      toast(`Job ${job.name || job.id} queued`, "success");
      navigate(jobHref(job.id));
    } catch (error) {
      status.textContent = "";
      if (error.status === 422) showErrors(error.detail);
      else if (error.status === 401 || error.status === 403) {
        status.textContent = "Add the control plane's token (top right), then submit again.";
      } else showErrors([{ loc: ["body"], msg: errorText(error) }]);
    } finally {
      submit.disabled = false;
    }
  });

  function insertField(key, prop) {
    let parsed;
    try {
      parsed = JSON.parse(config.value || "{}");
    } catch {
      return selectKey(key);
    }
    if (!(key in parsed)) parsed[key] = prop.default ?? null;
    config.value = JSON.stringify(parsed, null, 2);
    selectKey(key);
  }

  function cursorHelp() {
    const start = config.value.lastIndexOf("\n", config.selectionStart - 1) + 1;
    const line = config.value.slice(start, config.value.indexOf("\n", start) >>> 0);
    const match = line.match(/"(\w+)"\s*:/);
    help.show(match?.[1] ?? null);
  }
  config.addEventListener("keyup", cursorHelp);
  config.addEventListener("click", cursorHelp);

  async function loadSchema() {
    // Field help from the API's own schema: the description and default of the field under the cursor.
    const openapi = fetch("/openapi.json", { headers: authHeaders() }).then((r) => (r.ok ? r.json() : null));
    const [schemaSource] = await Promise.all([openapi.catch(() => null), pollHealth()]);
    help.setSchema(schemaSource?.components?.schemas?.JobCreate ?? null);
    const health = session.health;
    if (health) {
      gpuHint.textContent = health.gpus.length
        ? `${health.gpus_free.length} of ${health.gpus.length} free now; default 1. 0 = CPU.`
        : "This control plane has no GPUs: jobs run on CPU (0).";
    }
  }

  let copied = !fromId;
  function copyJob() {
    Promise.all([api(`/v1/jobs/${encodeURIComponent(fromId)}`), loadMeta()]).then(([job]) => {
      const copy = { ...job.config };
      for (const key of meta.notCopied) delete copy[key];
      setConfig(copy);
      name.value = job.name ? `${job.name} (copy)` : "";
      gpus.value = String(job.gpus_requested);
      copied = true;
    }).catch(fail(`copy job ${fromId}`));
  }

  function showExample() {
    // Unless something was typed while the example was on its way (or before a token was given).
    loadMeta().then(() => config.value || setConfig(meta.exampleConfig), () => {});
  }

  loadSchema();
  if (fromId) copyJob();
  else showExample();
  // A token given later fills in what needed it, without losing what was typed.
  return {
    destroy() {},
    onToken() {
      loadSchema();
      if (!copied) copyJob();
      else if (!fromId) showExample();
    },
  };
}
