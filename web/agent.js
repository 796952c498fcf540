// One agent: a header with its live state, what it runs and its labels, Revoke and Re-key,
// and tabs for command, processes, files, inventory and task history. Tabs are built on first
// use and keep their state.

import * as api from "./api.js";
import { commandPanel } from "./command.js";
import { busy, errorBox, h, setChildren, setText } from "./dom.js";
import { confirmDialog } from "./dialog.js";
import { parseLabels } from "./enroll.js";
import { ago, dateTime, text } from "./format.js";
import { filesPanel } from "./files.js";
import { inventoryPanel } from "./inventory.js";
import { processesPanel } from "./processes.js";
import { taskHistory } from "./tasks.js";

const HEADER_REFRESH_MS = 2000;

const TABS = [
  ["command", "Command"],
  ["processes", "Processes"],
  ["files", "Files"],
  ["inventory", "Inventory"],
  ["history", "History"],
];

export function agentView(container, { name, tab }) {
  let destroyed = false;
  let timer = 0;
  let agent = null;
  const cleanups = [];
  const error = errorBox();
  const state = h("span", { class: "badge", text: "…" });
  const facts = h("span", { class: "agent-facts muted" });
  const revokedBadge = h("span", { class: "badge state-revoked", text: "revoked", hidden: true });
  const rekeyButton = h("button", { type: "button", class: "small", text: "Re-key", hidden: true,
    title: "Tell the agent to make a new credential" });
  const revokeButton = h("button", { type: "button", class: "small danger", text: "Revoke",
    hidden: true, title: "Stop this agent's credential from working" });
  const actions = h("div", { class: "agent-actions" }, rekeyButton, revokeButton);
  const notice = h("p", { class: "notice", role: "status", hidden: true });
  const profile = h("div", { class: "agent-profile" });
  let profileShown = null;
  const labelsError = errorBox();
  const labelsInput = h("textarea", { rows: "3", spellcheck: "false", autocomplete: "off",
    "aria-label": "Labels", "aria-describedby": "labels-edit-help", placeholder: "room=204\nrole=build" });
  const labelsSave = h("button", { type: "submit", class: "primary small", text: "Save labels" });
  const labelsCancel = h("button", { type: "button", class: "small", text: "Cancel" });
  const labelsForm = h("form", { class: "labels-form", hidden: true },
    labelsInput,
    h("small", { id: "labels-edit-help", class: "muted",
      text: "name=value, one a line or separated by commas; selectors pick agents by them" }),
    h("div", { class: "actions" }, labelsSave, labelsCancel), labelsError.el);
  const panels = new Map();
  const tabButtons = new Map();
  const tablist = h("div", { class: "tabs", role: "tablist", "aria-label": `Views of ${name}` });
  const panelHost = h("div", { class: "tab-panels" });
  const inventoryListeners = [];

  container.append(h("section", { class: "agent-page" },
    h("nav", { class: "crumbs", "aria-label": "Breadcrumb" },
      h("a", { href: "#/", text: "Agents" }), " / ", h("span", { text: name })),
    h("div", { class: "page-head" }, h("h1", { text: name }), state, revokedBadge, facts, actions),
    profile, labelsForm, error.el, notice, tablist, panelHost));

  labelsCancel.addEventListener("click", () => {
    labelsForm.hidden = true;
    labelsError.clear();
  });
  labelsForm.addEventListener("submit", (event) => {
    event.preventDefault();
    labelsError.clear();
    let labels;
    try {
      labels = parseLabels(labelsInput.value);
    } catch (err) {
      labelsError.show(err.message);
      labelsInput.focus();
      return;
    }
    busy(labelsSave, "Saving…", async () => {
      try {
        await api.setAgentLabels(name, labels);
      } catch (err) {
        if (!(err instanceof api.SessionExpired)) labelsError.show(`Cannot save the labels: ${err.message}`);
        return;
      }
      labelsForm.hidden = true;
      notice.textContent = `Labels of ${name} saved.`;
      notice.hidden = false;
      await loadAgent();
    });
  });

  function editLabels() {
    const labels = agent && agent.labels && typeof agent.labels === "object" ? agent.labels : {};
    labelsInput.value = Object.entries(labels).map(([k, v]) => `${k}=${text(v)}`).join("\n");
    labelsError.clear();
    labelsForm.hidden = false;
    labelsInput.focus();
  }

  rekeyButton.addEventListener("click", async () => {
    const ok = await confirmDialog(`Re-key ${name}?`,
      "With its next poll the agent makes a new credential and sends it. Its old credential "
      + "keeps working until the new one is first used.", { confirmLabel: "Re-key" });
    if (!ok) return;
    await busy(rekeyButton, "Re-keying…", async () => {
      error.clear();
      notice.hidden = true;
      try {
        const answer = await api.rekeyAgent(name);
        notice.textContent = `Re-key requested (task #${text(answer && answer.task)}): the `
          + `agent makes a new credential with its next poll${agent && !agent.online
            ? ", once it is online again" : ""}.`;
        notice.hidden = false;
      } catch (err) {
        if (!(err instanceof api.SessionExpired)) error.show(`Cannot re-key ${name}: ${err.message}`);
      }
    });
  });
  revokeButton.addEventListener("click", async () => {
    const ok = await confirmDialog(`Revoke ${name}?`,
      "Its credential stops working at once: the agent can no longer fetch tasks or send "
      + "results until it enrolls again. Its history stays.",
      { confirmLabel: "Revoke", danger: true });
    if (!ok) return;
    await busy(revokeButton, "Revoking…", async () => {
      error.clear();
      notice.hidden = true;
      try {
        await api.revokeAgent(name);
        notice.textContent = `${name} is revoked.`;
        notice.hidden = false;
      } catch (err) {
        if (!(err instanceof api.SessionExpired)) error.show(`Cannot revoke ${name}: ${err.message}`);
      }
      await loadAgent();
    });
  });

  for (const [key, label] of TABS) {
    const button = h("button", {
      type: "button", role: "tab", id: `tab-${key}`, "aria-controls": `panel-${key}`,
      "aria-selected": "false", tabindex: "-1", text: label,
      onclick: () => select(key, true),
      onkeydown: (event) => moveFocus(event, key),
    });
    tabButtons.set(key, button);
    tablist.append(button);
  }
  const first = TABS.some(([k]) => k === tab) ? tab : "command";
  // The first tab is built once the agent is known, so it can tell an offline agent apart.
  loadAgent().then(() => {
    if (destroyed) return;
    if (!panels.size) select(first, false);
    timer = setTimeout(tick, HEADER_REFRESH_MS);
  });
  for (const [key, button] of tabButtons) button.setAttribute("aria-selected", String(key === first));

  /** Arrow keys move between tabs, as in every tab widget. */
  function moveFocus(event, key) {
    const keys = TABS.map(([k]) => k);
    let i = keys.indexOf(key);
    if (event.key === "ArrowRight") i = (i + 1) % keys.length;
    else if (event.key === "ArrowLeft") i = (i - 1 + keys.length) % keys.length;
    else if (event.key === "Home") i = 0;
    else if (event.key === "End") i = keys.length - 1;
    else return;
    event.preventDefault();
    select(keys[i], true);
    tabButtons.get(keys[i]).focus();
  }

  function select(key, updateUrl) {
    for (const [k, button] of tabButtons) {
      const on = k === key;
      button.setAttribute("aria-selected", String(on));
      button.tabIndex = on ? 0 : -1;
    }
    if (!panels.has(key)) {
      const panel = h("div", { class: "tab-panel", role: "tabpanel", id: `panel-${key}`,
        "aria-labelledby": `tab-${key}` });
      panelHost.append(panel);
      panels.set(key, panel);
      build(key, panel);
    }
    for (const [k, panel] of panels) panel.hidden = k !== key;
    if (updateUrl) {
      // replaceState: switching tabs is not a navigation, and must not rebuild the page.
      history.replaceState(null, "", `#/agent/${encodeURIComponent(name)}/${key}`);
    }
  }

  function build(key, panel) {
    if (key === "command") cleanups.push(commandPanel(panel, name, () => agent));
    else if (key === "processes") cleanups.push(processesPanel(panel, name, () => agent));
    else if (key === "files") cleanups.push(filesPanel(panel, name, () => agent));
    else if (key === "inventory") {
      const view = inventoryPanel(panel, name, loadAgent);
      inventoryListeners.push(view.show);
      if (agent) view.show(agent);
    } else if (key === "history") {
      const history = taskHistory({ target: name });
      panel.append(history.el);
      history.reload();
    }
  }

  async function tick() {
    await loadAgent();
    if (!destroyed) timer = setTimeout(tick, HEADER_REFRESH_MS);
  }

  /** Fetches the agent (with inventory) and updates the header and the inventory tab. */
  async function loadAgent() {
    try {
      agent = (await api.getAgent(name)).agent;
      if (destroyed) return;
      error.clear();
      for (const el of [state, tablist, panelHost, actions, profile]) el.hidden = false;
      const online = Boolean(agent.online);
      setText(state, online ? "online" : "offline");
      state.className = `badge ${online ? "state-online" : "state-offline"}`;
      const parts = [];
      if (!online) parts.push(`last seen ${ago(agent.last_seen)}`);
      if (agent.address) parts.push(String(agent.address));
      if (agent.agent_version) parts.push(`agent ${agent.agent_version}`);
      setText(facts, parts.join(" · "));
      facts.title = agent.last_seen ? `Last seen ${dateTime(agent.last_seen)}` : "";
      const revoked = agent.revoked === true;
      revokedBadge.hidden = !revoked;
      revokeButton.hidden = revoked;
      rekeyButton.hidden = revoked;
      // An agent that said which task types it runs and left out rekey cannot be re-keyed.
      const noRekey = Array.isArray(agent.capabilities) && !agent.capabilities.includes("rekey");
      if (rekeyButton.getAttribute("aria-busy") !== "true") rekeyButton.disabled = noRekey;
      rekeyButton.title = noRekey ? "This agent does not run rekey tasks (an older agent?)"
        : "Tell the agent to make a new credential";
      showProfile(agent);
      for (const show of inventoryListeners) show(agent);
    } catch (err) {
      if (err instanceof api.SessionExpired || destroyed) return;
      if (err.status === 404) {
        // Nothing to run anything on; the page recovers if the agent is created meanwhile.
        for (const el of [state, tablist, panelHost, actions, profile]) el.hidden = true;
        error.show(`There is no agent called ${name}.`);
      } else error.show(`Cannot load the agent: ${err.message}`);
    }
  }

  /** What the agent said it runs (its capabilities) and the labels admins gave it. */
  function showProfile(a) {
    const capabilities = Array.isArray(a.capabilities) ? a.capabilities.map(text) : null;
    const labels = a.labels && typeof a.labels === "object" ? Object.entries(a.labels) : [];
    const key = JSON.stringify([capabilities, labels]);
    if (key === profileShown) return;
    profileShown = key;
    setChildren(profile,
      capabilities ? h("div", { class: "profile-line" }, h("span", { class: "muted", text: "Runs" }),
        capabilities.length ? h("ul", { class: "chips", "aria-label": "Task types it runs" },
          capabilities.map((c) => h("li", { text: c })))
          : h("span", { text: "no task types" })) : null,
      h("div", { class: "profile-line" }, h("span", { class: "muted", text: "Labels" }),
        labels.length ? h("ul", { class: "chips", "aria-label": "Labels" },
          labels.map(([k, v]) => h("li", { text: `${k}=${text(v)}` })))
          : h("span", { class: "muted", text: "none" }),
        h("button", { type: "button", class: "small", text: "Edit labels",
          onclick: editLabels })));
  }

  return () => {
    destroyed = true;
    clearTimeout(timer);
    for (const cleanup of cleanups) if (typeof cleanup === "function") cleanup();
  };
}
