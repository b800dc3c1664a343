// The top bar: the token field, the theme switch and the control plane's health.

import { api, onRefused, session } from "/dashboard/api.js";
import { $, h, toast } from "/dashboard/dom.js";

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

/** Wire the token field; `onSaved()` runs when a token is saved or forgotten. */
export function setupToken(onSaved) {
  onRefused(openToken);
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
    onSaved();
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

export function setupTheme() {
  let theme = localStorage.getItem("dflash.theme") ?? "system";
  applyTheme(theme);
  $("#theme-button").addEventListener("click", () => {
    theme = THEMES[(THEMES.indexOf(theme) + 1) % THEMES.length];
    localStorage.setItem("dflash.theme", theme);
    applyTheme(theme);
  });
}

/** Ask /healthz (open to all): fills session.health and session.auth, and the top bar's status. */
export async function pollHealth() {
  const node = $("#health");
  try {
    const health = await api("/healthz");
    session.health = health;
    session.auth = health.auth;
    // /docs needs the token too, which a plain link cannot send: shown only where no token is set
    // (hidden until this answer, so it never shows where it would not work).
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
