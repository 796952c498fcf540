// DOM helpers. Everything shown on screen goes through textContent / text nodes:
// agent output, file names and account names are data, never markup.

/**
 * Creates an element. props: class, text, on<event>, dataset, aria and other attributes,
 * and DOM properties (hidden, checked, disabled, value …) when the value is not a string.
 * Children may be nodes, strings (added as text), arrays, or null/false (skipped).
 */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "text") el.textContent = String(value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2), value);
    } else if (typeof value !== "string" && key in el) el[key] = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : String(child));
  }
}

/** Replaces all children of el (text children are text nodes, never parsed). */
export function setChildren(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** Sets textContent only when it changes, so unchanged rows cost no layout. */
export function setText(el, value) {
  const text = String(value);
  if (el.textContent !== text) el.textContent = text;
}

/** A paragraph for errors, announced by screen readers; empty and hidden until used. */
export function errorBox() {
  const box = h("p", { class: "error", role: "alert", hidden: true });
  return {
    el: box,
    show(message) {
      box.textContent = String(message);
      box.hidden = false;
    },
    clear() {
      box.textContent = "";
      box.hidden = true;
    },
  };
}

/**
 * Marks a button as busy while promise-returning work runs: disabled, a spinner and a label,
 * restored afterwards whatever happens.
 */
export async function busy(button, label, work) {
  const old = [...button.childNodes];
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  button.replaceChildren(h("span", { class: "spinner", "aria-hidden": "true" }), label);
  try {
    return await work();
  } finally {
    button.disabled = false;
    button.removeAttribute("aria-busy");
    button.replaceChildren(...old);
  }
}

/**
 * A table. On narrow screens each row becomes a small card (see .stack in style.css); row()
 * labels every cell with its column header for that. Null cells are skipped.
 */
export function table(headers, className = "") {
  const tbody = h("tbody");
  const el = h("div", { class: "table-wrap" },
    h("table", { class: `stack ${className}`.trim() },
      h("thead", {}, h("tr", {}, headers.map((t) => h("th", { scope: "col", text: t })))),
      tbody));
  const row = (cells, props = {}) => {
    const tr = h("tr", props);
    cells.filter(Boolean).forEach((td, i) => {
      if (headers[i]) td.dataset.label = headers[i];
      tr.append(td);
    });
    return tr;
  };
  return { el, tbody, row };
}

/** A <pre> showing data verbatim; objects are pretty-printed JSON. */
export function pre(value, className = "") {
  const text = typeof value === "string" ? value : JSON.stringify(value, null, 2);
  return h("pre", { class: `output ${className}`.trim(), text });
}
