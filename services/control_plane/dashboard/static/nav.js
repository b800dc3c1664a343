// Client-side navigation without a page load. The router (app.js) registers itself here, so a view
// can move to another page without importing the router, which imports every view.

export const SERVICES_PATH = "/services";

let router = () => {};

export function setRouter(route) {
  router = route;
}

export function navigate(href, { replace = false } = {}) {
  if (replace) history.replaceState(null, "", href);
  else history.pushState(null, "", href);
  router();
}

export function jobHref(id) {
  return `/jobs/${encodeURIComponent(id)}`;
}
