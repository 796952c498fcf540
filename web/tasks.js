// A task history table with filters and paging, used by the agent page (one target) and by
// the administration page (all targets). Payloads and results are shown as text.

import * as api from "./api.js";
import { busy, errorBox, h, pre, setChildren, table } from "./dom.js";
import { between, dateTime, firstLine, text } from "./format.js";

const PAGE = 50;
export const STATES = ["queued", "delivered", "done", "failed", "cancelled", "expired"];

/** One line saying what a task does: the command, the path, the process … */
export function describeTask(type, payload) {
  const p = payload && typeof payload === "object" ? payload : {};
  switch (type) {
    case "execute_cmd": return text(p.cmd);
    case "dircontents": return text(p.dir);
    case "readfile": case "writefile": case "deletefile": return text(p.path);
    case "movefile": return `${text(p.frompath)} → ${text(p.topath)}`;
    case "downloadfile": return `${text(p.url)} → ${text(p.out)}`;
    case "kill": return `process ${text(p.pid ?? p.id)}`;
    default: return "";
  }
}

/** One line saying how it went: exit code or the agent's error message. */
export function describeResult(task) {
  const r = task.result;
  if (!r || typeof r !== "object") return "";
  if (r.error) return firstLine(r.msg ?? "error");
  if (task.type === "execute_cmd" && "status_code" in r) return `exit ${text(r.status_code)}`;
  return "ok";
}

/** Big base64 payloads (uploads, downloads) are summarised rather than dumped. */
function shorten(value) {
  if (!value || typeof value !== "object") return value;
  const copy = Array.isArray(value) ? [...value] : { ...value };
  if (typeof copy.content_b64 === "string" && copy.content_b64.length > 200) {
    copy.content_b64 = `(${copy.content_b64.length} characters of base64)`;
  }
  return copy;
}

/**
 * target: show only this agent's tasks (and hide the target column and filter).
 * Returns { el, reload }.
 */
export function taskHistory({ target = null } = {}) {
  const error = errorBox();
  const { el: tableEl, tbody, row: tableRow } = table(
    ["ID", ...(target ? [] : ["Agent"]), "Type", "What", "State", "Result", "By", "Created",
      "Took", ""], "tasks");
  const more = h("button", { type: "button", text: "Load older tasks", hidden: true });
  const note = h("p", { class: "muted", hidden: true });
  const targetInput = h("input", { type: "search", "aria-label": "Agent", placeholder: "Agent",
    autocomplete: "off", spellcheck: "false" });
  const stateSelect = h("select", { "aria-label": "State" },
    h("option", { value: "", text: "Any state" }),
    STATES.map((s) => h("option", { value: s, text: s })));
  const byInput = h("input", { type: "search", "aria-label": "Submitted by",
    placeholder: "Submitted by", autocomplete: "off", spellcheck: "false" });
  const apply = h("button", { type: "submit", class: "primary", text: target ? "Refresh" : "Apply" });
  const filters = h("form", { class: "toolbar filters" },
    target ? null : targetInput, stateSelect, target ? null : byInput, apply);
  let lastId = null;

  filters.addEventListener("submit", (event) => {
    event.preventDefault();
    busy(apply, "Loading…", () => load(false));
  });
  more.addEventListener("click", () => busy(more, "Loading…", () => load(true)));

  async function load(older) {
    error.clear();
    const params = {
      target: target ?? targetInput.value.trim(),
      state: stateSelect.value,
      submitted_by: target ? "" : byInput.value.trim(),
      limit: PAGE,
      before_id: older ? lastId : "",
    };
    let tasks;
    try {
      tasks = (await api.listTasks(params)).tasks || [];
    } catch (err) {
      if (!(err instanceof api.SessionExpired)) error.show(`Cannot load tasks: ${err.message}`);
      return;
    }
    if (!older) tbody.replaceChildren();
    for (const task of tasks) addRow(task);
    if (tasks.length) lastId = tasks[tasks.length - 1].id;
    more.hidden = tasks.length < PAGE;
    note.hidden = tbody.childElementCount > 0;
    note.textContent = "No tasks match.";
  }

  function addRow(task) {
    const details = h("tr", { class: "task-details", hidden: true });
    const toggle = h("button", { type: "button", class: "small", "aria-expanded": "false",
      "aria-label": `Details of task ${text(task.id)}`, text: "Details" });
    toggle.addEventListener("click", () => {
      const open = details.hidden;
      details.hidden = !open;
      toggle.setAttribute("aria-expanded", String(open));
      if (open && !details.firstChild) {
        details.append(h("td", { colspan: 10 },
          h("dl", { class: "facts" },
            h("dt", { text: "Submitted" }), h("dd", { text: dateTime(task.created_at) }),
            h("dt", { text: "Delivered" }), h("dd", { text: dateTime(task.delivered_at) || "—" }),
            h("dt", { text: "Finished" }), h("dd", { text: dateTime(task.finished_at) || "—" }),
            h("dt", { text: "Expires" }), h("dd", { text: dateTime(task.expires_at) || "—" })),
          h("h3", { text: "Task" }), pre(shorten(task.payload && typeof task.payload === "object"
            ? { type: task.type, ...task.payload } : { type: task.type, payload: task.payload })),
          h("h3", { text: "Result" }),
          task.result ? pre(shorten(task.result)) : h("p", { class: "muted", text: "No result." })));
      }
    });
    const row = tableRow([
      h("td", { text: `#${text(task.id)}` }),
      target ? null : h("td", {}, h("a", { href: `#/agent/${encodeURIComponent(text(task.target))}`,
        text: text(task.target) })),
      h("td", { text: text(task.type) }),
      h("td", { class: "what", text: firstLine(describeTask(task.type, task.payload), 120) }),
      h("td", {}, h("span", { class: `badge state-${text(task.state)}`, text: text(task.state) })),
      h("td", { class: "what", text: describeResult(task) }),
      h("td", { text: text(task.submitted_by) }),
      h("td", { text: dateTime(task.created_at) }),
      h("td", { text: between(task.created_at, task.finished_at) }),
      h("td", { class: "actions" }, toggle)], { dataset: { task: text(task.id) } });
    tbody.append(row, details);
  }

  const el = h("div", { class: "task-history" }, filters, error.el, tableEl, note, more);
  return { el, reload: () => load(false) };
}

/** The admin view of all tasks. */
export function taskHistorySection(container) {
  const history = taskHistory();
  setChildren(container, h("h2", { text: "Task history" }), history.el);
  history.reload();
}
