// DOM helpers every view uses: element building, toasts, empty states, polling, keyed table rows.
//
//   h("a", { href, class: "btn", onclick }, "text", child, [more, children])

export function h(tag, attrs, ...children) {
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

export const $ = (selector, root = document) => root.querySelector(selector);

export function toast(message, kind = "info") {
  const node = h("div", { class: `toast toast-${kind}` }, message);
  $("#toasts").append(node);
  setTimeout(() => node.classList.add("toast-out"), 3600);
  setTimeout(() => node.remove(), 4000);
}

export function emptyState(title, text, ...actions) {
  return h("div", { class: "empty" },
    h("div", { class: "empty-mark", "aria-hidden": "true" }), h("h2", {}, title), h("p", {}, text), actions);
}

/** A link back to the jobs table, the way out of an empty or missing page. */
export const allJobsLink = (label = "All jobs") => h("a", { href: "/", "data-link": true, class: "btn" }, label);

/** A coloured pill for a state: a job's, a hidden-state service's health or an agent's. */
export function stateChip(state, label = state) {
  return h("span", { class: `state state-${state}` }, h("i", { "aria-hidden": "true" }), label);
}

/** Call `fn` every `ms` while the tab is visible (never two at once); returns the stop function. */
export function every(ms, fn) {
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
export function keyedRows(tbody, { key, cells, dataset, onclick }) {
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
