// The API client: the tab's token, JSON requests under /v1 and how a refusal is reported.
//
//   const page = await api("/v1/jobs?limit=50");
//   await api(`/v1/jobs/${id}/cancel`, { method: "POST" });
//
// A 401 or 403 anywhere (a request here, a live stream, a download) goes to refused(), which opens
// the token field (chrome.js registers it with onRefused, so this module needs no page element).

// The token lives in this tab only: sessionStorage is gone when the tab closes, and no other tab
// or later visitor of this browser profile finds it. (Earlier versions kept it in localStorage.)
localStorage.removeItem("dflash.token");
export const session = {
  token: sessionStorage.getItem("dflash.token") ?? "",
  auth: false,
  health: null,
};

export class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : `HTTP ${status}`);
    this.status = status;
    this.detail = detail;
  }
}

let refusalHandler = () => {};

/** Who hears of a refused token: fn(ApiError). */
export function onRefused(fn) {
  refusalHandler = fn;
}

/** Report an answer's status: a 401 or 403 is a token problem, anything else is the caller's. */
export function refused(status, error = new ApiError(status, "")) {
  if (status === 401 || status === 403) refusalHandler(error);
}

export function authHeaders() {
  return session.token ? { Authorization: `Bearer ${session.token}` } : {};
}

export async function api(path, { method = "GET", body } = {}) {
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
    refused(response.status, error);
    throw error;
  }
  return data;
}

/** Jobs per state from the Prometheus exposition (one request instead of six). */
export async function stateCounts() {
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

export function errorText(error) {
  if (!Array.isArray(error.detail)) return error.message;
  return error.detail.map((e) => `${(e.loc ?? []).slice(1).join(".")}: ${e.msg}`).join("; ");
}
