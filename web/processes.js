// The Processes tab: the agent's process list, filterable, with a kill button per process
// (after an in-page confirmation).

import * as api from "./api.js";
import { busy, errorBox, h, setText, table } from "./dom.js";
import { confirmDialog } from "./dialog.js";
import { plural, text } from "./format.js";

const TIMEOUT_S = 30;

export function processesPanel(panel, agentName, getAgent = () => null) {
  const error = errorBox();
  const refresh = h("button", { type: "button", class: "primary", text: "Refresh" });
  const filter = h("input", { type: "search", placeholder: "Filter by name, user or command",
    "aria-label": "Filter processes", autocomplete: "off", spellcheck: "false" });
  const count = h("span", { class: "muted" });
  const { el: tableEl, tbody, row: tableRow } = table(["Name", "PID", "User", "Command line", ""],
    "procs");
  panel.append(h("div", { class: "toolbar" }, refresh, filter, count), error.el, tableEl);
  let procs = [];

  refresh.addEventListener("click", () => busy(refresh, "Loading…", load));
  filter.addEventListener("input", render);
  // An offline agent would keep the list loading until the timeout; wait for a click instead.
  if (getAgent()?.online === false) offlineNote(count, agentName, "its process list");
  else busy(refresh, "Loading…", load);

  async function load() {
    error.clear();
    try {
      const result = await api.runTask(agentName, { type: "proclist" }, TIMEOUT_S);
      if (result.error) throw new Error(text(result.msg));
      procs = (Array.isArray(result.procs) ? result.procs : [])
        .filter((p) => p && typeof p === "object");
      procs.sort((a, b) => text(a.name).localeCompare(text(b.name)) || Number(a.id) - Number(b.id));
      render();
    } catch (err) {
      if (!(err instanceof api.SessionExpired)) error.show(`Cannot list processes: ${err.message}`);
    }
  }

  function render() {
    const needle = filter.value.trim().toLowerCase();
    const shown = needle
      ? procs.filter((p) => [p.name, p.user, p.cmdline, p.id].some(
        (v) => text(v).toLowerCase().includes(needle)))
      : procs;
    setText(count, `${plural(shown.length, "process", "processes")}`
      + (needle ? ` of ${procs.length}` : ""));
    tbody.replaceChildren(...shown.map(row));
  }

  function row(proc) {
    const pid = text(proc.id);
    const name = text(proc.name);
    const kill = h("button", { type: "button", class: "small danger", text: "Kill",
      "aria-label": `Kill ${name} (${pid})` });
    kill.addEventListener("click", async () => {
      const ok = await confirmDialog("Kill process?",
        `Kill ${name} (process ${pid}) on ${agentName}?`, { confirmLabel: "Kill", danger: true });
      if (!ok) return;
      await busy(kill, "Killing…", async () => {
        error.clear();
        try {
          const result = await api.runTask(agentName, { type: "kill", pid: proc.id }, TIMEOUT_S);
          if (result.error) throw new Error(text(result.msg));
          await load();
        } catch (err) {
          if (!(err instanceof api.SessionExpired)) error.show(`Cannot kill ${name} (${pid}): ${err.message}`);
        }
      });
    });
    return tableRow([
      h("td", { class: "name", text: name }),
      h("td", { class: "num", text: pid }),
      h("td", { text: text(proc.user) }),
      h("td", { class: "cmdline", text: text(proc.cmdline) }),
      h("td", { class: "actions" }, kill)], { dataset: { pid } });
  }
}

/** Says why nothing loaded, in place of the count, until the user asks anyway. */
export function offlineNote(el, agentName, what) {
  el.textContent = `${agentName} is offline. Press Refresh to fetch ${what} anyway: `
    + "the request waits until the agent polls again, or gives up.";
}
