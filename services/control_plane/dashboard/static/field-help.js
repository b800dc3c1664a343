// The new-job form's field list and help, from the API's own schema (JobCreate in /openapi.json):
// each field's type, description and default; a click adds the field to the config.
//
//   const help = fieldHelp(card, { onPick: (key, prop) => ... });
//   help.setSchema(schema);  help.show(key);   // key: the field under the cursor, or null

import { h } from "/dashboard/dom.js";

function typeText(prop) {
  const one = (p) => {
    if (p.enum) return p.enum.join(" | ");
    if (p.type === "array") return `${p.items?.type ?? "any"}[]`;
    return p.type ?? (p.$ref ? "object" : "any");
  };
  return (prop.anyOf ?? [prop]).map(one).join(" | ");
}

function defaultText(prop, required) {
  if (required) return "required";
  if (!("default" in prop) || prop.default === null) return "—";
  return JSON.stringify(prop.default);
}

export function fieldHelp(card, { onPick }) {
  let schema = null;
  const isRequired = (key) => (schema?.required ?? []).includes(key);

  function describe(key, prop) {
    return h("div", { class: "field-help active" },
      h("div", { class: "mono" }, key, h("span", { class: "muted" }, `  ${typeText(prop)}`)),
      h("p", {}, prop.description ?? ""),
      h("div", { class: "muted small" }, `default: ${defaultText(prop, isRequired(key))}`));
  }

  function show(key) {
    if (!schema) return;
    const props = schema.properties ?? {};
    const field = key && props[key] ? key : null;
    const names = Object.keys(props);
    const required = (schema.required ?? []).map((r) => h("code", {}, r));
    card.replaceChildren(
      h("div", { class: "card-head" },
        h("h3", {}, "Fields"), h("span", { class: "muted small" }, `${names.length} · click one to add it`)),
      field
        ? describe(field, props[field])
        : h("p", { class: "muted small" }, "Put the cursor on a field to see what it does. Required: ", required, "."),
      h("ul", { class: "field-list" }, names.map((n) =>
        h("li", { class: n === field ? "active" : "" },
          h("button", { type: "button", class: "linklike mono", onclick: () => onPick(n, props[n]) }, n),
          h("span", { class: "muted" }, defaultText(props[n], isRequired(n)))))),
    );
    card.querySelector(".field-list li.active")?.scrollIntoView({ block: "nearest" });
  }

  function setSchema(value) {
    schema = value;
    show(null);
  }

  return { show, setSchema };
}
