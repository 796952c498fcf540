// One command on many agents: submit to all selected targets without blocking, show each
// target's result as it arrives, and a summary that groups identical results.

import * as api from "./api.js";
import { agentHref } from "./dashboard.js";
import { busy, errorBox, h, pre, setChildren, setText, table } from "./dom.js";
import { firstLine, plural, seconds, text } from "./format.js";
import { selection } from "./selection.js";
import { FINAL_STATES, groupResults } from "./summary.js";

const POLL_MS = 300;
const IDS_PER_REQUEST = 1000; // the server's limit for ?ids=

export function broadcastView(container) {
  let destroyed = false;
  let run = null; // the current run: { byId, byTarget, timer }
  const targets = selection.list();
  const error = errorBox();
  const section = h("section", { class: "broadcast" }, h("h1", { text: "Run a command on many agents" }));
  container.append(section);

  if (targets.length === 0) {
    section.append(h("p", { class: "empty" }, "No agents are selected. Pick agents or whole groups on ",
      h("a", { href: "#/", text: "the Agents page" }), ", then come back here."));
    return () => { destroyed = true; };
  }

  const onlineNote = h("span", { class: "muted" });
  const cmd = h("input", { name: "cmd", required: true, autocomplete: "off", spellcheck: "false",
    placeholder: "e.g. uptime", "aria-describedby": "bc-targets" });
  const timeout = h("input", { name: "timeout", type: "number", min: 1, max: 3600, value: "30",
    required: true });
  const wait = h("input", { name: "wait", type: "number", min: 1, max: 86400, value: "60",
    required: true });
  const submit = h("button", { type: "submit", class: "primary",
    text: `Run on ${plural(targets.length, "agent")}` });
  const form = h("form", { class: "command-form" },
    h("label", { class: "grow" }, h("span", { text: "Command" }), cmd),
    h("label", {}, h("span", { text: "Command timeout (s)" }), timeout),
    h("label", {}, h("span", { text: "Wait for offline agents (s)" }), wait),
    submit);
  const results = h("div", { class: "run", hidden: true });

  section.append(
    h("div", { class: "targets", id: "bc-targets" },
      h("p", {}, `${plural(targets.length, "agent")} selected `, onlineNote, " · ",
        h("a", { href: "#/", text: "change the selection" })),
      h("details", {}, h("summary", { text: "Show the selected agents" }),
        h("ul", { class: "chips" }, targets.map((name) =>
          h("li", {}, h("a", { href: agentHref(name), text: name })))))),
    form, error.el, results);
  cmd.focus();

  api.listAgents().then(({ data }) => {
    const online = new Set((data.agents || []).filter((a) => a.online).map((a) => a.name));
    const offline = targets.filter((t) => !online.has(t)).length;
    setText(onlineNote, offline
      ? `(${offline} offline: their command waits until they poll, up to the wait below)`
      : "(all online)");
  }).catch(() => {});

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    error.clear();
    busy(submit, "Submitting…", () => start(cmd.value, Number(timeout.value), Number(wait.value)));
  });

  async function start(command, timeoutS, waitS) {
    stopPolling();
    const task = { type: "execute_cmd", cmd: command, timeout_s: timeoutS };
    let submitted;
    try {
      // The task may wait in the queue for waitS, then run for up to timeoutS.
      submitted = await api.submitTasks(targets, task, Math.ceil(waitS + timeoutS + 5));
    } catch (err) {
      if (!(err instanceof api.SessionExpired)) error.show(`Could not submit: ${err.message}`);
      return;
    }
    if (destroyed) return;
    run = buildRun(command, submitted.tasks || []);
    poll(run);
  }

  function buildRun(command, submittedTasks) {
    const progress = h("progress", { max: submittedTasks.length, value: 0 });
    const progressText = h("span", { "aria-live": "polite" });
    const cancel = h("button", { type: "button", text: "Cancel tasks not started yet" });
    const summary = h("div", { class: "summary" });
    const { el: tableEl, tbody, row: tableRow } = table(["Agent", "State", "Exit", "Took", "Output"],
      "per-agent");
    const thisRun = { byId: new Map(), rows: new Map(), summary, groups: new Map(), progress,
      progressText, cancel, timer: 0, signature: "" };
    for (const { id, target } of submittedTasks) {
      const row = {
        state: h("span", { class: "badge state-queued", text: "queued" }),
        exit: h("td"), took: h("td"), output: h("td", { class: "what" }),
      };
      tbody.append(tableRow([
        h("td", { class: "name" }, h("a", { href: agentHref(text(target)), text: text(target) })),
        h("td", {}, row.state), row.exit, row.took, row.output], { dataset: { agent: text(target) } }));
      thisRun.rows.set(id, row);
      thisRun.byId.set(id, { id, target: text(target), state: "queued", result: null });
    }
    cancel.addEventListener("click", () => busy(cancel, "Cancelling…", async () => {
      const queued = [...thisRun.byId.values()].filter((t) => t.state === "queued");
      // A task may leave the queue meanwhile (409); that one simply runs.
      await Promise.allSettled(queued.map((t) => api.cancelTask(t.id)));
    }));
    setChildren(results,
      h("h2", { text: `Results of: ${command}` }),
      h("div", { class: "progress-line" }, progress, progressText, cancel),
      h("h3", { text: "Summary" }), summary,
      h("h3", { text: "Per agent" }), tableEl);
    results.hidden = false;
    render(thisRun);
    return thisRun;
  }

  async function poll(thisRun) {
    if (destroyed || run !== thisRun) return;
    const pending = [...thisRun.byId.values()].filter((t) => !FINAL_STATES.has(t.state));
    try {
      for (let i = 0; i < pending.length; i += IDS_PER_REQUEST) {
        const ids = pending.slice(i, i + IDS_PER_REQUEST).map((t) => t.id);
        const { tasks } = await api.getTasksByIds(ids);
        for (const task of tasks || []) {
          const entry = thisRun.byId.get(task.id);
          if (entry) Object.assign(entry, { state: text(task.state), result: task.result ?? null });
        }
      }
      error.clear();
    } catch (err) {
      if (err instanceof api.SessionExpired) return;
      error.show(`Cannot fetch results: ${err.message} Retrying.`);
    }
    if (destroyed || run !== thisRun) return;
    const left = render(thisRun);
    if (left > 0) thisRun.timer = setTimeout(() => poll(thisRun), POLL_MS);
  }

  /** Updates progress, rows and summary; returns how many targets are still pending. */
  function render(thisRun) {
    const entries = [...thisRun.byId.values()];
    const finished = entries.filter((t) => FINAL_STATES.has(t.state));
    const queued = entries.filter((t) => t.state === "queued").length;
    const running = entries.length - finished.length - queued;
    thisRun.progress.value = finished.length;
    setText(thisRun.progressText, `${finished.length} / ${entries.length} finished`
      + (running ? ` · ${running} running` : "") + (queued ? ` · ${queued} waiting to be picked up` : ""));
    thisRun.cancel.hidden = queued === 0;
    for (const entry of entries) updateRow(thisRun.rows.get(entry.id), entry);
    const signature = finished.map((t) => t.id).join(",");
    if (signature !== thisRun.signature) {
      thisRun.signature = signature;
      renderSummary(thisRun, groupResults(finished));
    }
    return entries.length - finished.length;
  }

  function updateRow(row, entry) {
    if (row.state.textContent === entry.state && row.result === entry.result) return;
    row.result = entry.result;
    setText(row.state, entry.state);
    row.state.className = `badge state-${entry.state}`;
    const r = entry.result && typeof entry.result === "object" ? entry.result : null;
    setText(row.exit, r && !r.error ? text(r.status_code) : "");
    setText(row.took, r && !r.error ? seconds(r.duration_s) : "");
    setText(row.output, r ? firstLine(r.error ? r.msg : (text(r.output) || text(r.stderr)), 100) : "");
  }

  function renderSummary(thisRun, groups) {
    if (groups.length === 0) {
      setChildren(thisRun.summary, h("p", { class: "muted", text: "No results yet." }));
      thisRun.groups.clear();
      return;
    }
    const keep = new Set(groups.map((g) => g.key));
    for (const [key, view] of thisRun.groups) {
      if (!keep.has(key)) {
        view.el.remove();
        thisRun.groups.delete(key);
      }
    }
    thisRun.summary.querySelector(":scope > p.muted")?.remove();
    let previous = null;
    for (const group of groups) {
      let view = thisRun.groups.get(group.key);
      if (!view) {
        view = makeGroupView(group);
        thisRun.groups.set(group.key, view);
      }
      setText(view.label, group.label);
      setText(view.preview, group.preview);
      if (view.count !== group.targets.length) {
        view.count = group.targets.length;
        setChildren(view.agents, group.targets.map((name) =>
          h("li", {}, h("a", { href: agentHref(name), text: name }))));
      }
      if (previous ? previous.nextSibling !== view.el : thisRun.summary.firstChild !== view.el) {
        if (previous) previous.after(view.el);
        else thisRun.summary.prepend(view.el);
      }
      previous = view.el;
    }
  }

  function makeGroupView(group) {
    const label = h("span", { class: "group-label" });
    const preview = h("span", { class: "preview" });
    const agents = h("ul", { class: "chips" });
    const body = [h("h4", { text: "Agents" }), agents];
    if (group.kind === "exit") {
      body.push(h("h4", { text: `Exit code ${group.exit}` }));
      body.push(h("h4", { text: "Output" }), pre(group.stdout || "(none)"));
      if (group.stderr) body.push(h("h4", { text: "Errors (stderr)" }), pre(group.stderr, "stderr"));
      if (group.truncated) body.push(h("p", { class: "muted", text: "Output was cut off by the agent." }));
    } else if (group.kind === "error") {
      body.push(h("h4", { text: "Error" }), pre(group.msg, "stderr"));
    } else if (group.kind === "result") {
      body.push(h("h4", { text: "Result" }), pre(group.body));
    }
    const ok = group.kind === "exit" && group.exit === "0";
    const el = h("details", { class: `result-group kind-${group.kind}${ok ? " exit-ok" : ""}` },
      h("summary", {}, label, preview), h("div", { class: "group-body" }, body));
    return { el, label, preview, agents, count: -1 };
  }

  function stopPolling() {
    if (run) clearTimeout(run.timer);
    run = null;
  }

  return () => {
    destroyed = true;
    stopPolling();
  };
}
