// Fleet jobs: the list (kept fresh), a form for a new job (a selector with a live preview, or
// agents picked by name), and a job's page: its state, each wave's progress, failures against
// the budget, Pause / Resume / Continue / Abort, the results grouped in buckets with re-runs,
// and the targets a page at a time. A job may have 10,000 targets: nothing here draws one
// element per target (waves far from the current one are summed up, a bucket's agents are
// drawn when opened and capped, targets come a page at a time from the server).

import * as api from "./api.js";
import { agentHref } from "./dashboard.js";
import { busy, errorBox, h, pre, setChildren, setText, table } from "./dom.js";
import { confirmDialog } from "./dialog.js";
import { poller } from "./enroll.js";
import { ago, dateTime, firstLine, plural, span, text } from "./format.js";
import { compareNames, selection } from "./selection.js";

const LIST_REFRESH_MS = 2000;
const JOB_REFRESH_MS = 1500;
const JOBS_PAGE = 50;
const TARGETS_PAGE = 50;
const PREVIEW_DELAY_MS = 300;
const PREVIEW_NAMES = 12;
const PICK_SHOWN = 100;
const WAVES_SHOWN = 12;
const BUCKET_AGENTS_SHOWN = 200;
const BUCKETS_EVERY = 4; // while a job runs, its buckets are fetched again every 4th refresh
const STATES = ["running", "paused", "done", "aborted"];
const FINISHED = new Set(["done", "failed", "expired", "cancelled", "skipped"]);
const COUNT_ORDER = ["done", "failed", "expired", "cancelled", "skipped", "delivered", "queued",
  "waiting"];
const COUNT_RE = /^\d+$|^\d+(\.\d+)?%$/;
const UNITS = [["60", "minutes"], ["3600", "hours"], ["86400", "days"]];

export const jobHref = (id) => `#/jobs/${encodeURIComponent(id)}`;

/** #/jobs, #/jobs/new, #/jobs/schedules, #/jobs/ID */
export function jobsView(container, { id }) {
  if (id === "new") return newJobView(container);
  if (id === "schedules") return schedulesView(container);
  if (id !== undefined) return jobView(container, id);
  return listView(container);
}

function subnav(current) {
  return h("nav", { class: "subnav", "aria-label": "Jobs and schedules" },
    [["#/jobs", "Jobs"], ["#/jobs/schedules", "Schedules"]].map(([href, label]) =>
      h("a", { href, text: label, "aria-current": label === current ? "page" : false })));
}

// --- shared -----------------------------------------------------------------------------

function countsOf(value) {
  return value && typeof value === "object" ? value : {};
}

/** Targets whose task ended (done, failed, expired, cancelled) or that were skipped. */
function finishedOf(counts) {
  let n = 0;
  for (const [state, count] of Object.entries(countsOf(counts))) {
    if (FINISHED.has(state)) n += Number(count) || 0;
  }
  return n;
}

/** "done 4 · waiting 2", in a fixed order. */
function countsText(counts) {
  const c = countsOf(counts);
  const keys = [...COUNT_ORDER.filter((k) => k in c),
    ...Object.keys(c).filter((k) => !COUNT_ORDER.includes(k)).sort()];
  return keys.length ? keys.map((k) => `${k} ${text(c[k])}`).join(" · ") : "nothing sent yet";
}

/** What the job runs, in one line: the command, or the type and its fields. */
function taskText(task) {
  if (!task || typeof task !== "object") return "";
  const { type, ...rest } = task;
  if (type === "execute_cmd" && typeof rest.cmd === "string") return rest.cmd;
  const fields = Object.keys(rest).length ? ` ${text(rest)}` : "";
  return `${text(type)}${fields}`;
}

/** What follows the task's type badge: the command, or the other fields; "" for none. */
function taskDetail(task) {
  if (!task || typeof task !== "object") return "";
  const { type, ...rest } = task;
  if (type === "execute_cmd" && typeof rest.cmd === "string") return rest.cmd;
  return Object.keys(rest).length ? text(rest) : "";
}

function stateBadge(state) {
  const s = text(state);
  return h("span", { class: `badge state-${s.replace(/\W+/g, "-")}`, text: s });
}

/** "fri 18:00–23:00, not sat 00:00–24:00 (Europe/Paris)" */
function windowsText(windows, tz) {
  if (!Array.isArray(windows) || !windows.length) return "";
  const spans = windows.map((w) => {
    const days = Array.isArray(w.days) && w.days.length && w.days.length < 7
      ? `${w.days.map(text).join(",")} ` : "";
    return `${w.exclude ? "not " : ""}${days}${text(w.from)}–${text(w.to)}`;
  });
  return `${spans.join(", ")}${tz ? ` (${text(tz)})` : ""}`;
}

function budgetText(job) {
  const failed = Number(job.failed) || 0;
  if (job.max_failures === null || job.max_failures === undefined) {
    return `${failed} failed (no failure budget)`;
  }
  const over = failed > job.max_failures ? " — exceeded" : "";
  return `${failed} failed of a budget of ${text(job.max_failures)}${over}`;
}

// --- the list ---------------------------------------------------------------------------

function listView(container) {
  const error = errorBox();
  const stateSelect = h("select", { "aria-label": "State" },
    h("option", { value: "", text: "All states" }),
    STATES.map((s) => h("option", { value: s, text: s })));
  const { el: tableEl, tbody, row: tableRow } = table(
    ["Job", "State", "Task", "Targets", "Progress", "Created"], "jobs");
  const empty = h("div", { class: "empty", hidden: true },
    h("p", { text: "No jobs yet." }),
    h("p", {}, "A job runs one task on many agents, in waves with a failure budget. Start one "
      + "with New job above, or with ", h("code", { text: "dutctl job run" }), "."));
  const more = h("button", { type: "button", text: "Load older jobs", hidden: true });
  const rows = new Map();
  let limit = JOBS_PAGE;

  container.append(h("section", { class: "jobs" },
    h("div", { class: "page-head" }, h("h1", { text: "Jobs" }),
      h("a", { class: "button primary", href: "#/jobs/new", text: "New job" })),
    subnav("Jobs"),
    h("div", { class: "toolbar" }, stateSelect),
    error.el, empty, tableEl, more));

  stateSelect.addEventListener("change", () => {
    limit = JOBS_PAGE;
    poll.now();
  });
  more.addEventListener("click", () => busy(more, "Loading…", async () => {
    limit = Math.min(500, limit + JOBS_PAGE);
    await poll.now();
  }));

  const poll = poller(load, LIST_REFRESH_MS);

  async function load(latest) {
    let answer;
    try {
      answer = await api.listJobs({ state: stateSelect.value, limit });
    } catch (err) {
      if (!(err instanceof api.SessionExpired) && latest()) {
        error.show(`Cannot load the jobs: ${err.message}`);
      }
      return;
    }
    if (!latest()) return;
    error.clear();
    const jobs = Array.isArray(answer.data.jobs) ? answer.data.jobs : [];
    const now = Number.isNaN(answer.date) ? Date.now() : answer.date;
    apply(jobs, now);
    more.hidden = jobs.length < limit || limit >= 500;
  }

  /** Rows are kept by id and only their changed cells are touched. */
  function apply(jobs, now) {
    const ids = new Set(jobs.map((j) => j.id));
    for (const [id, row] of rows) {
      if (!ids.has(id)) {
        row.tr.remove();
        rows.delete(id);
      }
    }
    let previous = null;
    for (const job of jobs) {
      let row = rows.get(job.id);
      if (!row) {
        row = makeRow(job.id);
        rows.set(job.id, row);
      }
      updateRow(row, job, now);
      if (previous ? previous.nextSibling !== row.tr : tbody.firstChild !== row.tr) {
        if (previous) previous.after(row.tr);
        else tbody.prepend(row.tr);
      }
      previous = row.tr;
    }
    empty.hidden = rows.size > 0 || stateSelect.value !== "";
    tableEl.hidden = rows.size === 0;
  }

  function makeRow(id) {
    const row = { signature: "" };
    row.state = h("td");
    row.task = h("td", { class: "what" });
    row.targets = h("td", { class: "job-targets" });
    row.bar = h("progress", { max: 1, value: 0 });
    row.progressText = h("span", { class: "progress-text" });
    row.failed = h("span", { class: "failed-count" });
    row.created = h("td", { class: "created" });
    row.tr = tableRow([
      h("td", { class: "job-id" }, h("a", { href: jobHref(id), text: `#${id}` })),
      row.state, row.task, row.targets,
      h("td", { class: "job-progress" }, row.bar, row.progressText, row.failed),
      row.created], { dataset: { job: String(id) } });
    return row;
  }

  function updateRow(row, job, now) {
    setText(row.created, `${ago(job.created_at, now)} by ${text(job.created_by)}`);
    row.created.title = dateTime(job.created_at);
    const signature = JSON.stringify([job.state, job.counts, job.failed, job.targets,
      job.max_failures]);
    if (signature === row.signature) return;
    row.signature = signature;
    setChildren(row.state, stateBadge(job.state));
    setChildren(row.task, h("span", { class: "badge", text: text(job.type) }), " ",
      firstLine(taskDetail(job.task), 80));
    setChildren(row.targets, plural(Number(job.targets) || 0, "agent"),
      job.selector ? [" ", h("code", { class: "selector", text: text(job.selector) })] : null);
    const total = Number(job.targets) || 0;
    const done = finishedOf(job.counts);
    row.bar.max = Math.max(1, total);
    row.bar.value = done;
    row.bar.setAttribute("aria-label", `Job ${job.id}: ${done} of ${total} finished`);
    setText(row.progressText, `${done} / ${total} finished`);
    const failed = Number(job.failed) || 0;
    setText(row.failed, failed ? ` · ${failed} failed` : "");
    row.failed.classList.toggle("has-failed", failed > 0);
  }

  return () => poll.stop();
}

// --- a new job --------------------------------------------------------------------------

/** "5" → 5, "20%" → "20%", "" → undefined; throws with what is wrong. */
function countField(input, what, { allowZero = true } = {}) {
  const value = input.value.trim();
  if (value === "") return undefined;
  if (!COUNT_RE.test(value)) {
    throw new FieldError(input, `${what}: a number of agents (5) or a percentage (20%).`);
  }
  if (value.endsWith("%")) return value;
  const n = Number(value);
  if (!allowZero && n < 1) throw new FieldError(input, `${what}: at least 1.`);
  return n;
}

class FieldError extends Error {
  constructor(field, message) {
    super(message);
    this.field = field;
  }
}

function newJobView(container) {
  let destroyed = false;
  const error = errorBox();
  const agentsHelp = "e.g. room=204,os=windows · role in (build,test) · name=pc-1* · !retired";

  // Which agents: a selector (previewed live) or names picked from the list.
  const modeSelector = h("input", { type: "radio", name: "mode", value: "selector", checked: true });
  const modePick = h("input", { type: "radio", name: "mode", value: "pick" });
  const selectorInput = h("input", { type: "text", name: "selector", class: "selector-input",
    autocomplete: "off", spellcheck: "false", autocapitalize: "none",
    placeholder: "room=204,os=windows", "aria-describedby": "selector-help selector-preview selector-error" });
  const selectorError = h("p", { id: "selector-error", class: "field-error", role: "alert",
    hidden: true });
  const preview = h("div", { id: "selector-preview", class: "selector-preview",
    role: "status", "aria-live": "polite" });
  const selectorPanel = h("div", { class: "mode-panel" },
    h("label", { class: "field" }, h("span", { text: "Selector" }), selectorInput),
    h("small", { id: "selector-help", class: "muted", text: agentsHelp }),
    selectorError, preview);

  const pickFilter = h("input", { type: "search", "aria-label": "Filter agents",
    placeholder: "Filter agents by name", autocomplete: "off", spellcheck: "false" });
  const pickList = h("ul", { class: "pick-list", "aria-label": "Agents" });
  const pickNote = h("p", { class: "muted pick-note" });
  const pickedText = h("span", { class: "picked-count", role: "status" });
  const pickAll = h("button", { type: "button", class: "small", text: "Pick all shown" });
  const pickNone = h("button", { type: "button", class: "small", text: "Clear" });
  const useSelection = h("button", { type: "button", class: "small", hidden: true });
  const pickPanel = h("div", { class: "mode-panel", hidden: true },
    h("div", { class: "toolbar pick-toolbar" }, pickFilter, pickAll, pickNone, useSelection),
    h("p", {}, pickedText), pickList, pickNote);
  const picked = new Set();
  let allAgents = null;

  // The task: a shell command (as on the broadcast page) or any type with JSON fields.
  const kind = h("select", { name: "kind", "aria-label": "What to run" },
    h("option", { value: "execute_cmd", text: "Shell command (execute_cmd)" }),
    h("option", { value: "other", text: "Another task type" }));
  const cmd = h("input", { name: "cmd", autocomplete: "off", spellcheck: "false",
    placeholder: "e.g. uname -r" });
  const cmdTimeout = h("input", { name: "timeout", type: "number", min: 1, max: 86400,
    value: "60" });
  const otherType = h("input", { name: "type", autocomplete: "off", spellcheck: "false",
    placeholder: "e.g. ping" });
  const otherFields = h("textarea", { name: "fields", rows: "3", spellcheck: "false",
    placeholder: '{"path": "/etc/hostname"}' });
  const cmdPanel = h("div", { class: "job-grid" },
    h("label", { class: "field wide" }, h("span", { text: "Command" }), cmd),
    h("label", { class: "field" }, h("span", { text: "Command timeout (s)" }), cmdTimeout));
  const otherPanel = h("div", { class: "job-grid", hidden: true },
    h("label", { class: "field" }, h("span", { text: "Task type" }), otherType),
    h("label", { class: "field wide" }, h("span", { text: "Fields (a JSON object)" }),
      otherFields));

  // How it rolls out.
  const canary = h("input", { name: "canary", inputmode: "numeric", autocomplete: "off",
    placeholder: "none" });
  const wave = h("input", { name: "wave", inputmode: "numeric", autocomplete: "off",
    placeholder: "all the rest" });
  const pauseKind = h("select", { name: "pause", "aria-label": "Between waves" },
    h("option", { value: "", text: "Go on at once" }),
    h("option", { value: "seconds", text: "Wait some seconds" }),
    h("option", { value: "manual", text: "Pause until I resume" }));
  const pauseSeconds = h("input", { type: "number", min: 1, max: 2592000, value: "60",
    "aria-label": "Seconds between waves", hidden: true });
  const budget = h("input", { name: "max_failures", inputmode: "numeric", autocomplete: "off",
    placeholder: "no budget" });
  const nonzero = h("input", { type: "checkbox", checked: true });
  const offline = h("select", { name: "offline", "aria-label": "Offline agents" },
    h("option", { value: "queue", text: "Wait for them" }),
    h("option", { value: "skip", text: "Skip them" }));
  const expiresAmount = h("input", { type: "number", min: "1", step: "1", value: "1",
    "aria-label": "Tasks expire after" });
  const expiresUnit = h("select", { "aria-label": "Expiry unit" },
    UNITS.map(([value, label]) => h("option", { value, text: label })));
  expiresUnit.value = "86400";

  const submit = h("button", { type: "submit", class: "primary", text: "Start job" });
  const form = h("form", { class: "job-form", novalidate: true },
    h("fieldset", {}, h("legend", { text: "Agents" }),
      h("div", { class: "modes" },
        h("label", { class: "switch" }, modeSelector, h("span", { text: "Agents matching a selector" })),
        h("label", { class: "switch" }, modePick, h("span", { text: "Agents picked by name" }))),
      selectorPanel, pickPanel),
    h("fieldset", {}, h("legend", { text: "Task" }),
      h("label", { class: "field" }, h("span", { text: "What to run" }), kind),
      cmdPanel, otherPanel),
    h("fieldset", {}, h("legend", { text: "Rollout" }),
      h("div", { class: "job-grid" },
        h("label", { class: "field" }, h("span", { text: "Canary (agents or %)" }), canary),
        h("label", { class: "field" }, h("span", { text: "Then waves of (agents or %)" }), wave),
        h("div", { class: "field" }, h("span", { class: "field-label", text: "Between waves" }),
          h("div", { class: "inline" }, pauseKind, pauseSeconds)),
        h("label", { class: "field" }, h("span", { text: "Failure budget (agents or %)" }),
          budget),
        h("div", { class: "field" }, h("span", { class: "field-label", text: "Offline agents" }),
          offline),
        h("div", { class: "field" }, h("span", { class: "field-label", text: "Tasks expire after" }),
          h("div", { class: "inline" }, expiresAmount, expiresUnit)),
        h("label", { class: "switch wide" }, nonzero,
          h("span", { text: "A non-zero exit status counts as a failure" }))),
      h("p", { class: "muted", text: "More failures than the budget pause the job before its "
        + "next wave; you can then continue despite them or abort." })),
    h("div", { class: "form-actions" }, submit), error.el);

  container.append(h("section", { class: "new-job" },
    h("nav", { class: "crumbs", "aria-label": "Breadcrumb" },
      h("a", { href: "#/jobs", text: "Jobs" }), " / ", h("span", { text: "New job" })),
    h("h1", { text: "New job" }), form));

  const setMode = () => {
    const pick = modePick.checked;
    selectorPanel.hidden = pick;
    pickPanel.hidden = !pick;
    if (pick) loadAgents();
    else schedulePreview();
  };
  modeSelector.addEventListener("change", setMode);
  modePick.addEventListener("change", setMode);
  kind.addEventListener("change", () => {
    cmdPanel.hidden = kind.value !== "execute_cmd";
    otherPanel.hidden = kind.value === "execute_cmd";
    schedulePreview();
  });
  otherType.addEventListener("input", schedulePreview);
  pauseKind.addEventListener("change", () => { pauseSeconds.hidden = pauseKind.value !== "seconds"; });

  // --- the live preview of the selector ---
  let previewTimer = 0;
  let previewController = null;
  let previewSeq = 0;

  function taskType() {
    return kind.value === "execute_cmd" ? "execute_cmd" : otherType.value.trim();
  }

  function schedulePreview() {
    clearTimeout(previewTimer);
    if (modePick.checked) return;
    previewTimer = setTimeout(runPreview, PREVIEW_DELAY_MS);
  }

  async function runPreview() {
    previewController?.abort();
    const value = selectorInput.value.trim();
    const mine = ++previewSeq;
    if (!value) {
      showSelectorError("");
      setChildren(preview, h("span", { class: "muted", text: "Type a selector to see which agents it matches." }));
      return;
    }
    previewController = new AbortController();
    preview.classList.add("checking");
    let answer;
    try {
      answer = await api.previewSelector(value, taskType(), previewController.signal);
    } catch (err) {
      if (err.name === "AbortError" || err instanceof api.SessionExpired || destroyed) return;
      if (mine !== previewSeq) return;
      preview.classList.remove("checking");
      if (err.status === 400) {
        showSelectorError(err.message);
        setChildren(preview);
      } else {
        showSelectorError("");
        setChildren(preview, h("span", { class: "muted", text: `Cannot check the selector: ${err.message}` }));
      }
      return;
    }
    if (mine !== previewSeq || destroyed) return;
    preview.classList.remove("checking");
    showSelectorError("");
    const names = Array.isArray(answer.agents) ? answer.agents.map(text) : [];
    const count = Number(answer.count) || names.length;
    const rest = count - Math.min(count, PREVIEW_NAMES);
    setChildren(preview,
      h("strong", { class: "match-count", text: `${plural(count, "agent")} match` }),
      h("ul", { class: "chips" }, names.slice(0, PREVIEW_NAMES).map((n) =>
        h("li", {}, h("a", { href: agentHref(n), text: n, target: "_blank", rel: "noopener" })))),
      rest > 0 ? h("span", { class: "muted", text: `and ${rest} more` }) : null);
  }

  function showSelectorError(message) {
    selectorError.textContent = message;
    selectorError.hidden = !message;
    selectorInput.setAttribute("aria-invalid", message ? "true" : "false");
  }

  selectorInput.addEventListener("input", schedulePreview);
  runPreview();

  // --- agents picked by name ---
  async function loadAgents() {
    if (allAgents) {
      renderPick();
      return;
    }
    setText(pickNote, "Loading the agents…");
    try {
      const { data } = await api.listAgents();
      allAgents = (data.agents || []).map((a) => ({ name: text(a.name), online: Boolean(a.online) }))
        .sort((a, b) => compareNames(a.name, b.name));
    } catch (err) {
      if (!(err instanceof api.SessionExpired)) setText(pickNote, `Cannot load the agents: ${err.message}`);
      return;
    }
    if (!destroyed) renderPick();
  }

  function matching() {
    const f = pickFilter.value.trim().toLowerCase();
    return (allAgents || []).filter((a) => !f || a.name.toLowerCase().includes(f));
  }

  function renderPick() {
    const list = matching();
    const shown = list.slice(0, PICK_SHOWN);
    setChildren(pickList, shown.map((a) => {
      const box = h("input", { type: "checkbox", checked: picked.has(a.name) });
      box.addEventListener("change", () => {
        if (box.checked) picked.add(a.name);
        else picked.delete(a.name);
        renderPicked();
      });
      return h("li", {}, h("label", { class: "pick" }, box,
        h("span", { text: a.name }), a.online ? null : h("span", { class: "muted", text: "offline" })));
    }));
    setText(pickNote, list.length > PICK_SHOWN
      ? `Showing ${PICK_SHOWN} of ${list.length}: type to narrow them down.`
      : list.length ? "" : "No agent matches the filter.");
    setText(pickAll, list.length > PICK_SHOWN ? `Pick all ${list.length} matching` : "Pick all shown");
    renderPicked();
  }

  function renderPicked() {
    setText(pickedText, `${plural(picked.size, "agent")} picked`);
    const fromDashboard = selection.size;
    useSelection.hidden = fromDashboard === 0;
    setText(useSelection, `Use the ${plural(fromDashboard, "agent")} selected on the Agents page`);
  }

  pickFilter.addEventListener("input", renderPick);
  pickAll.addEventListener("click", () => {
    for (const a of matching()) picked.add(a.name);
    renderPick();
  });
  pickNone.addEventListener("click", () => {
    picked.clear();
    renderPick();
  });
  useSelection.addEventListener("click", () => {
    for (const name of selection.list()) picked.add(name);
    renderPick();
  });
  renderPicked();

  // --- starting it ---
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    error.clear();
    let body;
    try {
      body = jobRequest();
    } catch (err) {
      error.show(err.message);
      if (err.field) err.field.focus();
      return;
    }
    busy(submit, "Starting…", async () => {
      let answer;
      try {
        answer = await api.createJob(body);
      } catch (err) {
        if (err instanceof api.SessionExpired) return;
        if (body.selector !== undefined && /selector/i.test(err.message)) showSelectorError(err.message);
        error.show(`Cannot start the job: ${err.message}`);
        return;
      }
      location.hash = jobHref(answer.job.id);
    });
  });

  function jobRequest() {
    const body = {};
    if (modePick.checked) {
      if (!picked.size) throw new FieldError(pickFilter, "Pick at least one agent.");
      body.targets = [...picked].sort(compareNames);
    } else {
      const value = selectorInput.value.trim();
      if (!value) throw new FieldError(selectorInput, "Give a selector, e.g. room=204.");
      body.selector = value;
    }
    if (kind.value === "execute_cmd") {
      if (!cmd.value.trim()) throw new FieldError(cmd, "Give the command to run.");
      const timeoutS = Number(cmdTimeout.value);
      if (!Number.isFinite(timeoutS) || timeoutS <= 0) {
        throw new FieldError(cmdTimeout, "Command timeout: a positive number of seconds.");
      }
      body.task = { type: "execute_cmd", cmd: cmd.value, timeout_s: timeoutS };
    } else {
      const type = otherType.value.trim();
      if (!type) throw new FieldError(otherType, "Give the task type.");
      let fields = {};
      if (otherFields.value.trim()) {
        try {
          fields = JSON.parse(otherFields.value);
        } catch {
          throw new FieldError(otherFields, "Fields: not valid JSON.");
        }
        if (!fields || typeof fields !== "object" || Array.isArray(fields)) {
          throw new FieldError(otherFields, "Fields: a JSON object, like {\"path\": \"/tmp\"}.");
        }
      }
      body.task = { ...fields, type };
    }
    const canaryValue = countField(canary, "Canary");
    if (canaryValue !== undefined) body.canary = canaryValue;
    const waveValue = countField(wave, "Wave size", { allowZero: false });
    if (waveValue !== undefined) body.wave = waveValue;
    const budgetValue = countField(budget, "Failure budget");
    if (budgetValue !== undefined) body.max_failures = budgetValue;
    if (pauseKind.value === "manual") body.pause_s = "manual";
    else if (pauseKind.value === "seconds") {
      const s = Number(pauseSeconds.value);
      if (!Number.isFinite(s) || s < 0) throw new FieldError(pauseSeconds, "Pause: a number of seconds.");
      body.pause_s = s;
    }
    body.nonzero_fails = nonzero.checked;
    body.offline = offline.value;
    const amount = Number(expiresAmount.value);
    if (!Number.isFinite(amount) || amount <= 0) {
      throw new FieldError(expiresAmount, "Expiry: a positive number.");
    }
    body.expires_s = Math.round(amount * Number(expiresUnit.value));
    return body;
  }

  return () => {
    destroyed = true;
    clearTimeout(previewTimer);
    previewController?.abort();
  };
}

// --- one job ----------------------------------------------------------------------------

function jobView(container, id) {
  let destroyed = false;
  let job = null;
  let refreshes = 0;
  let bucketsSignature = null;
  let targetsSignature = null;
  let finishedDrawn = false;
  const error = errorBox();
  const actionError = errorBox();
  const notice = h("p", { class: "notice", role: "status", hidden: true });
  const state = h("span", { class: "badge", text: "…" });
  const title = h("h1", { text: `Job #${id}` });
  const task = h("p", { class: "job-task" });
  const reason = h("p", { class: "job-reason", role: "status", hidden: true });
  const facts = h("dl", { class: "facts job-facts" });

  const pauseButton = h("button", { type: "button", text: "Pause", hidden: true });
  const resumeButton = h("button", { type: "button", class: "primary", text: "Resume", hidden: true });
  const continueButton = h("button", { type: "button", class: "primary",
    text: "Continue despite failures", hidden: true });
  const abortButton = h("button", { type: "button", class: "danger", text: "Abort", hidden: true });
  const actions = h("div", { class: "job-actions" }, pauseButton, resumeButton, continueButton,
    abortButton);

  const overall = h("progress", { max: 1, value: 0, "aria-label": "Finished" });
  const overallText = h("span", { class: "progress-text" });
  const budgetLine = h("p", { class: "budget-line" });
  const nextWave = h("p", { class: "muted", hidden: true });
  const windowLine = h("p", { class: "window-line", role: "status", hidden: true });
  const waves = h("ol", { class: "waves", "aria-label": "Waves" });

  const digits = h("input", { type: "checkbox" });
  const keepSpaces = h("input", { type: "checkbox" });
  const rerunFailed = h("button", { type: "button", hidden: true });
  const bucketsError = errorBox();
  const buckets = h("div", { class: "buckets" });
  const bucketsEmpty = h("p", { class: "muted", text: "No results yet." });

  const { el: targetsTable, tbody: targetsBody, row: targetRow } = table(
    ["Agent", "Wave", "State", "Result"], "job-targets-table");
  const prevPage = h("button", { type: "button", text: "← Previous", disabled: true });
  const nextPage = h("button", { type: "button", text: "Next →", disabled: true });
  const pageText = h("span", { class: "muted", role: "status" });
  const targetsError = errorBox();
  const cursors = [null]; // the `after` of each page seen so far
  let page = 0;
  let hasNext = false;

  const body = h("div", { class: "job-body", hidden: true },
    task, reason, actionError.el, notice, facts,
    h("h2", { text: "Progress" }),
    h("div", { class: "progress-line" }, overall, overallText),
    budgetLine, nextWave, windowLine, waves,
    h("h2", { text: "Results" }),
    h("div", { class: "toolbar results-toolbar" },
      h("label", { class: "switch" }, digits, h("span", { text: "Numbers do not matter" })),
      h("label", { class: "switch" }, keepSpaces, h("span", { text: "Trailing spaces matter" })),
      rerunFailed),
    bucketsError.el, bucketsEmpty, buckets,
    h("h2", { text: "Targets" }),
    targetsError.el, targetsTable,
    h("div", { class: "pager" }, prevPage, pageText, nextPage));

  container.append(h("section", { class: "job-page" },
    h("nav", { class: "crumbs", "aria-label": "Breadcrumb" },
      h("a", { href: "#/jobs", text: "Jobs" }), " / ", h("span", { text: `Job #${id}` })),
    h("div", { class: "page-head" }, title, state, actions),
    error.el, body));

  pauseButton.addEventListener("click", () => act("pause", pauseButton));
  resumeButton.addEventListener("click", () => act("resume", resumeButton));
  continueButton.addEventListener("click", () => act("continue", continueButton));
  abortButton.addEventListener("click", async () => {
    const ok = await confirmDialog(`Abort job #${id}?`,
      "Its queued tasks are cancelled and nothing more is sent. Tasks an agent already took "
      + "run to their end.", { confirmLabel: "Abort job", danger: true });
    if (ok) await act("abort", abortButton);
  });
  for (const box of [digits, keepSpaces]) {
    box.addEventListener("change", () => {
      bucketsSignature = null;
      loadBuckets();
    });
  }
  rerunFailed.addEventListener("click", () => rerun({ failed: true }, rerunFailed,
    Number(rerunFailed.dataset.count)));
  prevPage.addEventListener("click", () => {
    if (page === 0) return;
    page -= 1;
    cursors.length = page + 1;
    targetsSignature = null;
    loadTargets();
  });
  nextPage.addEventListener("click", () => {
    if (!hasNext) return;
    page += 1;
    targetsSignature = null;
    loadTargets();
  });

  const poll = poller(load, JOB_REFRESH_MS);

  async function load(latest) {
    let answer;
    try {
      answer = await api.getJob(id);
    } catch (err) {
      if (err instanceof api.SessionExpired || !latest()) return;
      if (err.status === 404) {
        body.hidden = true;
        state.hidden = true;
        error.show(`There is no job #${id}.`);
        poll.stop();
      } else error.show(`Cannot load the job: ${err.message} Retrying.`);
      return;
    }
    if (!latest()) return;
    error.clear();
    job = answer.data.job;
    const now = Number.isNaN(answer.date) ? Date.now() : answer.date;
    render(job, now);
    const ended = job.state === "done" || job.state === "aborted";
    // Buckets cost the server a pass over every result: fetched when something finished; for
    // a big job only every few refreshes while results keep coming.
    refreshes += 1;
    const signature = JSON.stringify([job.counts, digits.checked, keepSpaces.checked]);
    if (signature !== bucketsSignature && (ended || bucketsSignature === null
      || Number(job.targets) <= 1000 || refreshes % BUCKETS_EVERY === 1)) {
      await loadBuckets(signature);
    }
    await loadTargets();
    if (ended && !finishedDrawn) {
      finishedDrawn = true;
      poll.stop(); // a finished job does not change any more
    }
  }

  function render(j, now) {
    body.hidden = false;
    state.hidden = false;
    setText(state, j.state);
    state.className = `badge state-${text(j.state).replace(/\W+/g, "-")}`;
    setChildren(task, h("span", { class: "badge", text: text(j.type) }), " ",
      h("code", { text: taskDetail(j.task) }));
    reason.hidden = !j.reason;
    setText(reason, j.reason ? text(j.reason) : "");
    reason.className = `job-reason ${j.state === "paused" ? "warn" : "notice"}`;

    const paused = j.state === "paused";
    const overBudget = j.max_failures !== null && j.max_failures !== undefined
      && Number(j.failed) > Number(j.max_failures);
    const idle = (el) => el.getAttribute("aria-busy") !== "true";
    if (idle(pauseButton)) pauseButton.hidden = j.state !== "running";
    if (idle(resumeButton)) resumeButton.hidden = !paused || overBudget;
    if (idle(continueButton)) {
      continueButton.hidden = !paused || j.max_failures === null || j.max_failures === undefined;
    }
    if (idle(abortButton)) abortButton.hidden = !(j.state === "running" || paused);
    continueButton.className = overBudget ? "primary" : "";

    const pause = j.pause_s === "manual" ? "until resumed by hand"
      : j.pause_s ? span(j.pause_s) : "none";
    setChildren(facts,
      h("dt", { text: "Created" }),
      h("dd", { text: `${dateTime(j.created_at)} by ${text(j.created_by)}` }),
      h("dt", { text: "Targets" }),
      h("dd", {}, plural(Number(j.targets) || 0, "agent"),
        j.selector ? [" matching ", h("code", { text: text(j.selector) })] : " picked by name"),
      h("dt", { text: "Offline agents" }),
      h("dd", { text: j.offline === "skip" ? "skipped" : "waited for until the task expires" }),
      h("dt", { text: "Between waves" }), h("dd", { text: pause }),
      h("dt", { text: "Non-zero exit" }),
      h("dd", { text: j.nonzero_fails === false ? "does not count as a failure" : "counts as a failure" }),
      j.windows ? [h("dt", { text: "Delivered only" }),
        h("dd", { text: windowsText(j.windows, j.tz) })] : null,
      j.schedule_id !== null && j.schedule_id !== undefined
        ? [h("dt", { text: "Made by" }), h("dd", {}, h("a", { href: "#/jobs/schedules",
          text: `schedule #${text(j.schedule_id)}` }))] : null,
      j.finished_at ? [h("dt", { text: "Finished" }), h("dd", { text: dateTime(j.finished_at) })]
        : [h("dt", { text: "Updated" }), h("dd", { text: ago(j.updated_at, now) })]);

    const total = Number(j.targets) || 0;
    const done = finishedOf(j.counts);
    overall.max = Math.max(1, total);
    overall.value = done;
    setText(overallText, `${done} / ${total} finished · ${countsText(j.counts)}`);
    setText(budgetLine, budgetText(j));
    budgetLine.classList.toggle("over-budget", overBudget);
    const next = Date.parse(j.next_wave_at || "");
    nextWave.hidden = Number.isNaN(next) || j.state !== "running";
    if (!nextWave.hidden) {
      setText(nextWave, `Next wave ${next > now ? `in ${span((next - now) / 1000)}` : "now"}.`);
    }
    const w = j.window && typeof j.window === "object" ? j.window : null;
    windowLine.hidden = !w;
    if (w) {
      setText(windowLine, w.open
        ? `Inside its maintenance window${w.closes_at ? ` until ${dateTime(w.closes_at)}` : ""}.`
        : `Outside its maintenance window: nothing is delivered ${w.opens_at
          ? `until ${dateTime(w.opens_at)}` : "(the window never opens)"}.`);
      windowLine.className = `window-line ${w.open ? "muted" : "warn"}`;
    }
    renderWaves(j);
  }

  /** One row a wave; with many, the waves far from the current one summed in a row each run. */
  function renderWaves(j) {
    const list = Array.isArray(j.waves) ? j.waves : [];
    const released = Number(j.released) || 0;
    const shown = new Set();
    if (list.length <= WAVES_SHOWN) list.forEach((_, i) => shown.add(i));
    else {
      shown.add(0).add(list.length - 1);
      for (let i = Math.max(0, released - 4); i < Math.min(list.length, released + 2); i += 1) shown.add(i);
    }
    const rows = [];
    let hidden = [];
    const flush = () => {
      if (!hidden.length) return;
      const counts = {};
      let targets = 0;
      for (const w of hidden) {
        targets += Number(w.targets) || 0;
        for (const [k, n] of Object.entries(countsOf(w.counts))) counts[k] = (counts[k] || 0) + Number(n);
      }
      const first = hidden[0].wave;
      const last = hidden[hidden.length - 1].wave;
      rows.push(waveRow(`Waves ${first}–${last}`, targets, counts,
        first > released ? "summed not-sent" : "summed"));
      hidden = [];
    };
    list.forEach((w, i) => {
      if (!shown.has(i)) {
        hidden.push(w);
        return;
      }
      flush();
      const label = `Wave ${w.wave}`;
      const current = i === released - 1 && j.state !== "done";
      rows.push(waveRow(label, Number(w.targets) || 0, w.counts,
        i >= released ? "not-sent" : current ? "current" : ""));
    });
    flush();
    const signature = JSON.stringify([list.length, released, j.state, list.map((w) => w.counts)]);
    if (signature === waves.dataset.signature) return;
    waves.dataset.signature = signature;
    setChildren(waves, rows);
  }

  function waveRow(label, targets, counts, kind) {
    const finished = finishedOf(counts);
    const failed = Number(countsOf(counts).failed || 0) + Number(countsOf(counts).expired || 0);
    const bar = h("progress", { max: Math.max(1, targets), value: finished,
      "aria-label": `${label}: ${finished} of ${targets} finished` });
    return h("li", { class: `wave ${kind}`.trim() },
      h("span", { class: "wave-name", text: label }),
      h("span", { class: "wave-size", text: plural(targets, "agent") }),
      bar,
      h("span", { class: `wave-counts${failed ? " has-failed" : ""}`,
        text: kind.includes("not-sent") && !finished ? "not sent yet" : countsText(counts) }));
  }

  async function act(action, button) {
    actionError.clear();
    notice.hidden = true;
    await busy(button, { pause: "Pausing…", resume: "Resuming…", continue: "Continuing…",
      abort: "Aborting…" }[action], async () => {
      try {
        const answer = await api.jobAction(id, action);
        job = answer.job;
        const said = { pause: "Paused: nothing more is sent until it is resumed.",
          resume: "Resumed.", continue: "Continuing despite failures: the budget no longer stops it.",
          abort: "Aborted: queued tasks were cancelled." };
        setText(notice, said[action]);
        notice.hidden = false;
      } catch (err) {
        if (err instanceof api.SessionExpired) return;
        actionError.show(err.status === 409
          ? `${err.message}. The job changed meanwhile; its current state is shown.`
          : `Cannot ${action} the job: ${err.message}`);
      }
    });
    finishedDrawn = false;
    await poll.now();
  }

  async function loadBuckets(signature = null) {
    let list;
    try {
      list = (await api.jobBuckets(id, { normalize: !keepSpaces.checked, digits: digits.checked }))
        .buckets || [];
    } catch (err) {
      if (!(err instanceof api.SessionExpired) && !destroyed) {
        bucketsError.show(`Cannot load the results: ${err.message}`);
      }
      return;
    }
    if (destroyed) return;
    bucketsError.clear();
    bucketsSignature = signature ?? JSON.stringify([job && job.counts, digits.checked, keepSpaces.checked]);
    bucketsEmpty.hidden = list.length > 0;
    const failedCount = list.filter((b) => b.failed).reduce((n, b) => n + (Number(b.count) || 0), 0);
    rerunFailed.hidden = failedCount === 0;
    rerunFailed.dataset.count = String(failedCount);
    setText(rerunFailed, `Re-run on the failed (${failedCount})`);
    // Open buckets stay open across refreshes (same number and content).
    const open = new Set([...buckets.querySelectorAll("details[open]")]
      .map((d) => d.dataset.key));
    setChildren(buckets, list.map((b) => bucketCard(b, open)));
  }

  function bucketCard(b, open) {
    const count = Number(b.count) || 0;
    const status = b.error ? "error" : b.status_code !== null && b.status_code !== undefined
      ? `exit ${text(b.status_code)}` : b.state === "done" ? "ok" : text(b.state);
    const agents = Array.isArray(b.agents) ? b.agents.map(text) : [];
    const key = JSON.stringify([status, agents.length, agents[0] || ""]);
    const list = h("ul", { class: "chips" });
    const details = h("details", { class: "bucket-agents", dataset: { key } },
      h("summary", { text: `Show the ${plural(count, "agent")}` }), list);
    const fill = () => {
      if (list.childElementCount) return;
      const shown = agents.slice(0, BUCKET_AGENTS_SHOWN);
      setChildren(list, shown.map((n) => h("li", {}, h("a", { href: agentHref(n), text: n }))),
        agents.length > shown.length
          ? h("li", { class: "more", text: `and ${agents.length - shown.length} more` }) : null);
    };
    details.addEventListener("toggle", () => { if (details.open) fill(); });
    if (open.has(key)) {
      details.open = true;
      fill();
    }
    const again = h("button", { type: "button", class: "small", text: "Re-run on these",
      "aria-label": `Re-run on the ${plural(count, "agent")} of result #${text(b.bucket)}` });
    again.addEventListener("click", () => rerun({ bucket: b.bucket,
      normalize: !keepSpaces.checked, digits: digits.checked }, again, count));
    return h("article", { class: `bucket${b.failed ? " failed" : " ok"}`,
      dataset: { bucket: text(b.bucket) } },
    h("header", {},
      h("strong", { class: "bucket-count", text: plural(count, "agent") }),
      h("span", { class: `badge ${b.failed ? "state-failed" : "state-done"}`, text: status }),
      b.failed ? h("span", { class: "badge state-failed", text: "failed" }) : null,
      h("span", { class: "muted bucket-number", text: `#${text(b.bucket)}` }),
      again),
    // An example with no output but stderr starts with a blank line: not worth a line here.
    pre(text(b.example).replace(/^\n+/, "") || "(no output)", b.failed ? "stderr" : ""),
    details);
  }

  async function rerun(what, button, count) {
    const ok = await confirmDialog(`Run it again on ${plural(count, "agent")}?`,
      `A new job with the same task (${firstLine(taskText(job && job.task), 60)}) and settings `
      + "starts at once.", { confirmLabel: "Re-run" });
    if (!ok) return;
    await busy(button, "Starting…", async () => {
      actionError.clear();
      try {
        const answer = await api.rerunJob(id, what);
        location.hash = jobHref(answer.job.id);
      } catch (err) {
        if (!(err instanceof api.SessionExpired)) actionError.show(`Cannot re-run: ${err.message}`);
      }
    });
  }

  async function loadTargets() {
    const after = cursors[page];
    let list;
    try {
      // One more than a page: whether there is a next page.
      list = (await api.jobTargets(id, after ?? "", TARGETS_PAGE + 1)).targets || [];
    } catch (err) {
      if (!(err instanceof api.SessionExpired) && !destroyed) {
        targetsError.show(`Cannot load the targets: ${err.message}`);
      }
      return;
    }
    if (destroyed) return;
    targetsError.clear();
    hasNext = list.length > TARGETS_PAGE;
    const rows = list.slice(0, TARGETS_PAGE);
    if (hasNext) cursors[page + 1] = text(rows[rows.length - 1].agent);
    prevPage.disabled = page === 0;
    nextPage.disabled = !hasNext;
    const first = page * TARGETS_PAGE + 1;
    setText(pageText, rows.length
      ? `Agents ${first}–${first + rows.length - 1}${job ? ` of ${text(job.targets)}` : ""}`
      : "No targets.");
    const signature = JSON.stringify(rows);
    if (signature === targetsSignature) return;
    targetsSignature = signature;
    setChildren(targetsBody, rows.map((t) => {
      const name = text(t.agent);
      const s = text(t.state);
      return targetRow([
        h("td", { class: "name" }, h("a", { href: agentHref(name), text: name })),
        h("td", { class: "num", text: text(t.wave) }),
        h("td", {}, h("span", { class: `badge state-${s.replace(/\W+/g, "-")}`, text: s })),
        h("td", { class: "what", text: resultText(t.result) })], { dataset: { agent: name } });
    }));
  }

  return () => {
    destroyed = true;
    poll.stop();
  };
}

// --- schedules --------------------------------------------------------------------------

function whenText(x) {
  if (x.kind === "cron") return `cron ${text(x.cron)}`;
  if (x.kind === "once") return `once, ${dateTime(x.at)}`;
  return `every ${span(x.every_s)}`;
}

function schedulesView(container) {
  const error = errorBox();
  const actionError = errorBox();
  const { el: tableEl, tbody, row: tableRow } = table(
    ["Schedule", "When", "Job", "Next run", "Last run", "Runs", ""], "schedules");
  const empty = h("div", { class: "empty", hidden: true },
    h("p", { text: "No schedules." }),
    h("p", {}, "A schedule starts a job at cron times, once, or every so often; make one with ",
      h("code", { text: "dutctl schedule add" }), "."));
  let signature = null;
  container.append(h("section", { class: "schedules" },
    h("div", { class: "page-head" }, h("h1", { text: "Schedules" })),
    subnav("Schedules"), error.el, actionError.el, empty, tableEl));

  const poll = poller(load, LIST_REFRESH_MS);

  async function load(latest) {
    let answer;
    try {
      answer = await api.listSchedules();
    } catch (err) {
      if (!(err instanceof api.SessionExpired) && latest()) {
        error.show(`Cannot load the schedules: ${err.message}`);
      }
      return;
    }
    if (!latest()) return;
    error.clear();
    const list = Array.isArray(answer.data.schedules) ? answer.data.schedules : [];
    const now = Number.isNaN(answer.date) ? Date.now() : answer.date;
    const next = JSON.stringify(list) + Math.floor(now / 10000);
    if (next === signature) return;
    signature = next;
    empty.hidden = list.length > 0;
    tableEl.hidden = list.length === 0;
    tbody.replaceChildren(...list.map((x) => row(x, now)));
  }

  function row(x, now) {
    const id = text(x.id);
    const job = x.job && typeof x.job === "object" ? x.job : {};
    const whom = job.selector ? h("code", { class: "selector", text: text(job.selector) })
      : plural(Array.isArray(job.targets) ? job.targets.length : 0, "agent");
    const toggle = h("button", { type: "button", class: "small",
      text: x.enabled ? "Disable" : "Enable",
      "aria-label": `${x.enabled ? "Disable" : "Enable"} schedule ${id}` });
    toggle.addEventListener("click", () => act(toggle, x.enabled ? "Disabling…" : "Enabling…",
      () => api.switchSchedule(x.id, x.enabled ? "disable" : "enable")));
    const remove = h("button", { type: "button", class: "small danger", text: "Delete",
      "aria-label": `Delete schedule ${id}` });
    remove.addEventListener("click", async () => {
      const ok = await confirmDialog(`Delete schedule #${id}?`,
        "It never runs again. The jobs it made stay, and a running one goes on.",
        { confirmLabel: "Delete", danger: true });
      if (ok) await act(remove, "Deleting…", () => api.deleteSchedule(x.id));
    });
    const next = Date.parse(x.next_run_at || "");
    return tableRow([
      h("td", { class: "schedule-name" }, h("strong", { text: `#${id}` }),
        x.name ? h("span", { text: ` ${text(x.name)}` }) : null,
        x.enabled ? null : [" ", h("span", { class: "badge state-disabled", text: "off" })]),
      h("td", { text: `${whenText(x)} (${text(x.tz)})` }),
      h("td", { class: "what" }, h("span", { class: "badge", text: text(job.task && job.task.type) }),
        " ", firstLine(taskDetail(job.task), 60), " → ", whom,
        x.windows ? h("div", { class: "muted", text: `only ${windowsText(x.windows, "")}` }) : null),
      h("td", { text: x.enabled && !Number.isNaN(next)
        ? `${dateTime(x.next_run_at)}${next > now ? ` (in ${span((next - now) / 1000)})` : ""}`
        : "—" }),
      h("td", {}, x.last_job_id != null
        ? h("a", { href: jobHref(x.last_job_id), text: `job #${text(x.last_job_id)}` }) : "never",
      x.last_run_at ? h("div", { class: "muted", text: dateTime(x.last_run_at) }) : null,
      x.last_error ? h("div", { class: "warn", text: `Skipped ${dateTime(x.last_skip_at)}: `
        + text(x.last_error) }) : null),
      h("td", { class: "num", text: `${text(x.runs)}${x.skipped ? ` · ${text(x.skipped)} skipped` : ""}` }),
      h("td", { class: "actions" }, toggle, remove)], { dataset: { schedule: id } });
  }

  async function act(button, label, work) {
    actionError.clear();
    await busy(button, label, async () => {
      try {
        await work();
      } catch (err) {
        if (!(err instanceof api.SessionExpired)) actionError.show(err.message);
      }
      signature = null;
      await poll.now();
    });
  }

  return () => poll.stop();
}

/** A target's result in one line: exit status and first line of output, or the error. */
function resultText(result) {
  if (!result || typeof result !== "object") return "";
  if (result.error) return `error: ${firstLine(result.msg ?? "", 100)}`;
  if ("status_code" in result) {
    const said = firstLine(text(result.output) || text(result.stderr), 100);
    return `exit ${text(result.status_code)}${said ? `: ${said}` : ""}`;
  }
  return firstLine(text(result), 100);
}
