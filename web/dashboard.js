// The agent dashboard: agents grouped by name prefix, live online state, filter, selection.
// Built for thousands of agents: rows exist only for expanded groups, are keyed by name, and
// a refresh touches only the cells whose text changed.

import * as api from "./api.js";
import { errorBox, h, setText } from "./dom.js";
import { ago, dateTime, plural } from "./format.js";
import { compareNames, groupLabel, groupOf, selection } from "./selection.js";

const REFRESH_MS = 1000;
/** With more agents than this, groups start collapsed so the first paint stays cheap. */
const EXPAND_UP_TO = 100;
const EXPANDED_KEY = "dutserver.expanded";
/**
 * New rows are built for at most this long per frame; the rest follow in the next frames, so
 * expanding 2,000 agents never blocks the page (typing, clicks) for more than a frame or two.
 */
const BUILD_BUDGET_MS = 12;

export const agentHref = (name) => `#/agent/${encodeURIComponent(name)}`;

export function dashboardView(container) {
  const agents = new Map();
  const groups = new Map();
  const expanded = loadExpanded();
  let filterExpanded = new Map();
  let filterText = "";
  let stateFilter = "all";
  let namesSignature = null;
  let serverOffsetMs = 0;
  let timer = 0;
  let frame = 0;
  let buildDeadline = 0;
  let inFlight = false;
  let destroyed = false;
  let loaded = false;

  const status = errorBox();
  const filterInput = h("input", {
    type: "search", placeholder: "Filter by name or address  ( / )", "aria-label": "Filter agents",
    autocomplete: "off", spellcheck: "false",
    oninput: () => {
      filterText = filterInput.value.trim().toLowerCase();
      filterExpanded = new Map();
      renderAll();
    },
  });
  const stateSelect = h("select", {
    "aria-label": "Show agents",
    onchange: () => { stateFilter = stateSelect.value; renderAll(); },
  }, h("option", { value: "all", text: "All agents" }),
  h("option", { value: "online", text: "Online only" }),
  h("option", { value: "offline", text: "Offline only" }));
  const totals = h("p", { class: "totals", "aria-live": "polite", text: "Loading agents…" });
  const selectedText = h("span");
  const selectionBar = h("div", { class: "selection-bar", hidden: true },
    selectedText,
    h("a", { class: "button primary", href: "#/broadcast", text: "Run a command on them" }),
    h("button", { type: "button", text: "Clear selection", onclick: () => selection.clear() }));
  const groupsEl = h("div", { class: "groups" });
  const empty = h("div", { class: "empty", hidden: true },
    h("p", { text: "No agents are registered yet." }),
    h("p", {}, "Copy the agent program from ",
      h("a", { href: "/agent/dutagent.py", download: "dutagent.py", text: "/agent/dutagent.py" }),
      " to a PC and run it with a name and secret; it appears here as soon as it polls."));

  container.append(h("section", { class: "dashboard" },
    h("div", { class: "page-head" }, h("h1", { text: "Agents" }), totals),
    h("div", { class: "toolbar" }, filterInput, stateSelect,
      h("button", { type: "button", text: "Expand all", onclick: () => setAllExpanded(true) }),
      h("button", { type: "button", text: "Collapse all", onclick: () => setAllExpanded(false) })),
    status.el, selectionBar, empty, groupsEl));

  const unsubscribe = selection.subscribe(renderSelection);
  const onKey = (event) => {
    const target = event.target;
    const typing = target instanceof HTMLInputElement || target instanceof HTMLTextAreaElement
      || target instanceof HTMLSelectElement;
    if (event.key === "/" && !typing && !event.ctrlKey && !event.metaKey) {
      event.preventDefault();
      filterInput.focus();
    }
  };
  const onVisible = () => {
    if (!document.hidden && !timer && !inFlight && !destroyed) refresh();
  };
  document.addEventListener("keydown", onKey);
  document.addEventListener("visibilitychange", onVisible);
  refresh();
  renderSelection();

  async function refresh() {
    timer = 0;
    if (destroyed || document.hidden) return; // resumes on visibilitychange
    inFlight = true;
    try {
      const { data, date } = await api.listAgents();
      if (destroyed) return;
      if (!Number.isNaN(date)) serverOffsetMs = date - Date.now();
      status.clear();
      apply(Array.isArray(data.agents) ? data.agents : []);
    } catch (err) {
      if (err instanceof api.SessionExpired || destroyed) return;
      status.show(`Cannot refresh the agent list: ${err.message} Retrying every second.`);
    } finally {
      inFlight = false;
    }
    if (!destroyed) timer = setTimeout(refresh, REFRESH_MS);
  }

  function apply(list) {
    const signature = list.map((a) => a.name).join("\n");
    agents.clear();
    for (const agent of list) if (typeof agent.name === "string") agents.set(agent.name, agent);
    if (signature !== namesSignature) {
      namesSignature = signature;
      regroup();
    }
    loaded = true;
    renderAll();
  }

  /** Rebuilds group membership; only when the set of names changed. */
  function regroup() {
    // A removed agent cannot stay picked for a broadcast (the submit would fail with 404).
    const gone = selection.list().filter((name) => !agents.has(name));
    if (gone.length) selection.setMany(gone, false);
    const members = new Map();
    for (const name of agents.keys()) {
      const key = groupOf(name);
      if (!members.has(key)) members.set(key, []);
      members.get(key).push(name);
    }
    for (const [key, group] of groups) {
      if (!members.has(key)) {
        group.el.remove();
        groups.delete(key);
      }
    }
    const keys = [...members.keys()].sort((a, b) =>
      (a === "") - (b === "") || compareNames(a, b)); // "(no group)" last
    let previous = null;
    for (const key of keys) {
      let group = groups.get(key);
      if (!group) {
        group = makeGroup(key);
        groups.set(key, group);
      }
      group.names = members.get(key).sort(compareNames);
      if (previous ? previous.nextSibling !== group.el : groupsEl.firstChild !== group.el) {
        if (previous) previous.after(group.el);
        else groupsEl.prepend(group.el);
      }
      previous = group.el;
    }
  }

  function matches(agent) {
    if (stateFilter === "online" && !agent.online) return false;
    if (stateFilter === "offline" && agent.online) return false;
    if (!filterText) return true;
    return agent.name.toLowerCase().includes(filterText)
      || String(agent.address || "").toLowerCase().includes(filterText);
  }

  function isExpanded(group) {
    if (filterText) return filterExpanded.get(group.key) ?? true;
    return expanded.get(group.key) ?? agents.size <= EXPAND_UP_TO;
  }

  function setExpanded(group, on) {
    if (filterText) filterExpanded.set(group.key, on);
    else {
      expanded.set(group.key, on);
      saveExpanded(expanded);
    }
    renderAll();
  }

  function setAllExpanded(on) {
    for (const group of groups.values()) {
      if (filterText) filterExpanded.set(group.key, on);
      else expanded.set(group.key, on);
    }
    if (!filterText) saveExpanded(expanded);
    renderAll();
  }

  function renderAll() {
    if (!loaded || destroyed) return;
    cancelAnimationFrame(frame);
    frame = 0;
    buildDeadline = performance.now() + BUILD_BUDGET_MS;
    const now = Date.now() + serverOffsetMs;
    let online = 0;
    let shown = 0;
    for (const agent of agents.values()) if (agent.online) online += 1;
    for (const group of groups.values()) shown += renderGroup(group, now);
    const filtered = filterText || stateFilter !== "all";
    setText(totals, `${online} / ${agents.size} online`
      + (filtered ? ` · ${plural(shown, "agent")} match the filter` : ""));
    empty.hidden = agents.size > 0;
    renderSelection();
  }

  /** Updates one group's header and rows; returns how many of its agents match the filter. */
  function renderGroup(group, now) {
    let online = 0;
    const visible = [];
    for (const name of group.names) {
      const agent = agents.get(name);
      if (agent.online) online += 1;
      if (matches(agent)) visible.push(name);
    }
    group.visible = visible;
    setText(group.count, `${online} / ${group.names.length} online`);
    group.el.hidden = visible.length === 0;
    const open = isExpanded(group) && visible.length > 0;
    group.toggle.setAttribute("aria-expanded", String(open));
    group.list.hidden = !open;
    const want = open ? visible : [];
    const wanted = new Set(want);
    // Rows stay cached when hidden, so clearing a filter or re-expanding costs no rebuild.
    for (const [name, row] of group.rows) {
      if (!agents.has(name) || groupOf(name) !== group.key) group.rows.delete(name);
      if (!wanted.has(name) && row.li.parentNode) row.li.remove();
    }
    let previous = null;
    for (const name of want) {
      let row = group.rows.get(name);
      if (!row) {
        if (performance.now() > buildDeadline) {
          // Out of time for this frame: the rest of this group's rows come in the next one.
          if (!frame) frame = requestAnimationFrame(renderAll);
          break;
        }
        row = makeRow(name);
        group.rows.set(name, row);
      }
      if (previous ? previous.nextSibling !== row.li : group.list.firstChild !== row.li) {
        if (previous) previous.after(row.li);
        else group.list.prepend(row.li);
      }
      updateRow(row, agents.get(name), now);
      previous = row.li;
    }
    return visible.length;
  }

  function makeGroup(key) {
    const label = groupLabel(key);
    const group = { key, names: [], visible: [], rows: new Map() };
    group.count = h("span", { class: "group-count" });
    group.toggle = h("button", {
      type: "button", class: "group-toggle", "aria-expanded": "false",
      onclick: () => setExpanded(group, group.toggle.getAttribute("aria-expanded") !== "true"),
    }, h("span", { class: "caret", "aria-hidden": "true" }),
    h("span", { class: "group-name", text: label }), group.count);
    group.checkbox = h("input", {
      type: "checkbox", "aria-label": `Select all shown agents of group ${label}`,
      onchange: () => selection.setMany(group.visible, group.checkbox.checked),
    });
    group.list = h("ul", { class: "agent-list", hidden: true });
    group.el = h("section", { class: "group", dataset: { group: label } },
      h("div", { class: "group-head" }, group.checkbox, group.toggle), group.list);
    return group;
  }

  function makeRow(name) {
    const row = { name, online: null };
    row.checkbox = h("input", {
      type: "checkbox", "aria-label": `Select ${name}`, checked: selection.has(name),
      onchange: () => selection.set(name, row.checkbox.checked),
    });
    row.state = h("span", { class: "state" });
    row.seen = h("span", { class: "seen" });
    row.address = h("span", { class: "address" });
    row.version = h("span", { class: "version" });
    row.li = h("li", { class: "agent-row", dataset: { agent: name } },
      row.checkbox, h("span", { class: "dot", "aria-hidden": "true" }),
      h("a", { class: "agent-name", href: agentHref(name), text: name }),
      row.state, row.seen, row.address, row.version);
    return row;
  }

  function updateRow(row, agent, now) {
    const online = Boolean(agent.online);
    if (row.online !== online) {
      row.online = online;
      row.li.classList.toggle("online", online);
    }
    setText(row.state, online ? "online" : "offline");
    setText(row.seen, online ? "" : `last seen ${ago(agent.last_seen, now)}`);
    const when = dateTime(agent.last_seen);
    if (row.seen.title !== when) row.seen.title = when;
    setText(row.address, agent.address ?? "");
    setText(row.version, agent.agent_version ?? "");
  }

  function renderSelection() {
    const count = selection.size;
    selectionBar.hidden = count === 0;
    setText(selectedText, `${plural(count, "agent")} selected`);
    for (const group of groups.values()) {
      let picked = 0;
      for (const name of group.visible) if (selection.has(name)) picked += 1;
      group.checkbox.checked = picked > 0 && picked === group.visible.length;
      group.checkbox.indeterminate = picked > 0 && picked < group.visible.length;
      for (const row of group.rows.values()) {
        if (row.li.parentNode) row.checkbox.checked = selection.has(row.name);
      }
    }
  }

  return () => {
    destroyed = true;
    clearTimeout(timer);
    cancelAnimationFrame(frame);
    unsubscribe();
    document.removeEventListener("keydown", onKey);
    document.removeEventListener("visibilitychange", onVisible);
  };
}

function loadExpanded() {
  try {
    return new Map(Object.entries(JSON.parse(sessionStorage.getItem(EXPANDED_KEY) || "{}")));
  } catch {
    return new Map();
  }
}

function saveExpanded(map) {
  sessionStorage.setItem(EXPANDED_KEY, JSON.stringify(Object.fromEntries(map)));
}
