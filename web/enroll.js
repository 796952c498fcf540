// Enrollment: machines that asked to join (accept or reject them, one or many at once), what
// became of earlier requests, and the tokens machines join with. Also the number of pending
// requests in the top bar, kept fresh while someone is logged in.

import * as api from "./api.js";
import { busy, errorBox, h, setChildren, setText, table } from "./dom.js";
import { confirmDialog } from "./dialog.js";
import { ago, dateTime, plural, span, text } from "./format.js";

const REFRESH_MS = 3000;
const BADGE_REFRESH_MS = 5000;
const NAME_RE = /^[A-Za-z0-9._-]{1,64}$/;
const LABEL_KEY_RE = /^[A-Za-z0-9_./-]{1,64}$/;
const MAX_USES = 1000000;
const KINDS = [["agent", "Agent"], ["rdfm", "RDFM"], ["oco", "OCO"]];
const UNITS = [["60", "minutes"], ["3600", "hours"], ["86400", "days"]];
const SECTIONS = [
  ["pending", "Pending"],
  ["accepted", "Accepted"],
  ["rejected", "Rejected"],
  ["revoked", "Revoked"],
  ["expired", "Expired"],
  ["tokens", "Tokens"],
];

const agentHref = (name) => `#/agent/${encodeURIComponent(name)}`;
const kindLabel = (kind) => (KINDS.find(([k]) => k === kind) || [kind, text(kind)])[1];
/** The kind filter is kept while moving between the lists. */
let kindFilter = "";

// --- the pending count in the top bar ---------------------------------------------------

/**
 * app.js puts element() into the navigation (a new one each time the top bar is drawn) and
 * starts the poll after login; the enrollment view also sets the count from its own lists,
 * so acting there shows at once.
 */
export const pendingBadge = (() => {
  let count = null;
  let el = null;
  let number = null;
  let spoken = null;
  let timer = 0;
  let running = false;
  let inFlight = false;

  function render() {
    if (!el) return;
    el.hidden = !count;
    setText(number, count ?? "");
    setText(spoken, count ? ` (${count} pending)` : "");
  }

  function schedule(ms) {
    clearTimeout(timer);
    timer = running ? setTimeout(poll, ms) : 0;
  }

  async function poll() {
    timer = 0;
    if (!running) return;
    if (!api.session.token) {
      badge.stop();
      return;
    }
    if (document.hidden || inFlight) {
      schedule(BADGE_REFRESH_MS);
      return;
    }
    inFlight = true;
    try {
      const { data } = await api.listEnrollments({ state: "pending" });
      badge.set(data && data.pending);
    } catch (err) {
      // Logged out, or a server without enrollment: nothing to count.
      if (err instanceof api.SessionExpired || err.status === 403 || err.status === 404) {
        badge.stop();
        return;
      }
      // Unreachable for a moment: keep the last count and try again.
    } finally {
      inFlight = false;
    }
    schedule(BADGE_REFRESH_MS);
  }

  document.addEventListener("visibilitychange", () => {
    if (running && !document.hidden) schedule(0);
  });

  const badge = {
    element() {
      // Read out as "Enrollment (3 pending)"; shown as a bubble with the number.
      number = h("span", { class: "count", "aria-hidden": "true" });
      spoken = h("span", { class: "visually-hidden" });
      el = h("span", { class: "nav-count", hidden: true }, number, spoken);
      render();
      return el;
    },
    start() {
      if (running) return;
      running = true;
      schedule(0);
    },
    stop() {
      running = false;
      clearTimeout(timer);
      timer = 0;
      count = null;
      render();
    },
    set(n) {
      if (!Number.isInteger(n) || n < 0) return;
      count = n;
      render();
    },
    refresh() {
      if (running) schedule(0);
    },
  };
  return badge;
})();

// --- the view ---------------------------------------------------------------------------

export function enrollView(container, { section }) {
  const current = SECTIONS.find(([key]) => key === section) ?? SECTIONS[0];
  const pendingCount = h("span", { class: "subnav-count" });
  const body = h("div", { class: "enroll-body" });
  container.append(h("section", { class: "enroll" },
    h("h1", { text: "Enrollment" }),
    h("nav", { class: "subnav", "aria-label": "Enrollment" },
      SECTIONS.map(([key, label]) => h("a", { href: `#/enroll/${key}`,
        "aria-current": key === current[0] ? "page" : false },
      label, key === "pending" ? pendingCount : null))),
    body));
  const ctx = {
    setPending(n) {
      if (!Number.isInteger(n)) return;
      setText(pendingCount, n ? ` (${n})` : "");
      pendingBadge.set(n);
    },
  };
  const key = current[0];
  const stop = key === "pending" ? pendingSection(body, ctx)
    : key === "tokens" ? tokensSection(body)
      : historySection(body, key, ctx);
  return stop;
}

/**
 * Runs load() now and every ms while the page is visible; now() runs it at once (after an
 * action). A load that was overtaken by a newer one must not draw (see latest()).
 */
export function poller(load, ms) {
  let timer = 0;
  let stopped = false;
  let seq = 0;
  const onVisible = () => {
    if (!document.hidden && !stopped) run();
  };
  async function run() {
    clearTimeout(timer);
    timer = 0;
    if (stopped || document.hidden) return;
    const mine = ++seq;
    await load(() => !stopped && mine === seq);
    if (!stopped && mine === seq) timer = setTimeout(run, ms);
  }
  document.addEventListener("visibilitychange", onVisible);
  run();
  return {
    now: run,
    stop() {
      stopped = true;
      clearTimeout(timer);
      document.removeEventListener("visibilitychange", onVisible);
    },
  };
}

function kindSelect(onChange) {
  const select = h("select", { "aria-label": "Kind of machine" },
    h("option", { value: "", text: "All kinds" }),
    KINDS.map(([value, label]) => h("option", { value, text: label })));
  select.value = kindFilter;
  select.addEventListener("change", () => {
    kindFilter = select.value;
    onChange();
  });
  return select;
}

/** The machine's own words: host name, OS, agent version, machine id, MACs … */
function hostOf(e) {
  const facts = e.facts && typeof e.facts === "object" ? e.facts : {};
  return text(facts.hostname) || text(e.name) || `request ${text(e.id)}`;
}

function listText(value) {
  return Array.isArray(value) ? value.map(text).join(", ") : text(value);
}

function machineFacts(e) {
  const facts = e.facts && typeof e.facts === "object" ? e.facts : {};
  const os = [facts.os, facts.os_version, facts.arch].map(text).filter(Boolean).join(" ");
  const labels = labelText(e.labels);
  const rows = [
    ["OS", os],
    ["Agent", text(facts.agent_version)],
    ["Machine ID", text(facts.machine_id) || text(e.device_id)],
    ["MAC", listText(facts.macs)],
    ["Key", text(e.key_fingerprint)],
    ["Runs", listText(e.capabilities)],
    ["Labels", labels],
  ].filter(([, value]) => value);
  if (!rows.length) return null;
  return h("dl", { class: "facts compact" },
    rows.map(([label, value]) => [h("dt", { text: label }), h("dd", { text: value })]));
}

function labelText(labels) {
  if (!labels || typeof labels !== "object") return "";
  return Object.entries(labels).map(([k, v]) => `${k}=${text(v)}`).join(", ");
}

function duplicateWarning(e) {
  if (!e.duplicate_of) return null;
  const other = text(e.duplicate_of);
  return h("p", { class: "warn" },
    "⚠ Possible duplicate of agent ", h("a", { href: agentHref(other), text: other }),
    " (same name or machine ID). Check it is not the same machine before accepting.");
}

function tokenCell(e, tokens) {
  if (e.token_id === null || e.token_id === undefined) return "—";
  const note = tokens.get(e.token_id);
  return `#${text(e.token_id)}${note ? ` · ${note}` : ""}`;
}

// --- pending requests -------------------------------------------------------------------

function pendingSection(container, ctx) {
  const error = errorBox();
  const actionError = errorBox();
  const done = h("p", { class: "notice", role: "status", hidden: true });
  const selectAll = h("input", { type: "checkbox" });
  const acceptSelected = h("button", { type: "button", class: "primary", disabled: true,
    text: "Accept selected" });
  const rejectSelected = h("button", { type: "button", class: "danger", disabled: true,
    text: "Reject selected" });
  const kind = kindSelect(() => poll.now());
  const { el: tableEl, tbody, row: tableRow } = table(
    ["Machine", "Name when accepted", "Kind", "Address", "Token", "Asked", ""],
    "enrollments pending");
  const empty = h("div", { class: "empty", hidden: true },
    h("p", { text: "No machine is waiting to join." }),
    h("p", {}, "Machines ask with ", h("code", { text: "dutagent enroll URL TOKEN" }),
      "; create a token under ", h("a", { href: "#/enroll/tokens", text: "Tokens" }), "."));
  const rows = new Map();
  const selected = new Set();
  const tokens = new Map(); // token id -> note, to name the token a machine used
  let tokensLoaded = false;
  let loaded = false;

  setChildren(container,
    h("p", { class: "muted", text: "Machines that asked to join with an enrollment token. "
      + "An accepted machine becomes an agent under the name shown (or the one you type)." }),
    h("div", { class: "toolbar enroll-toolbar" },
      h("label", { class: "switch select-all" }, selectAll, h("span", { text: "Select all" })),
      acceptSelected, rejectSelected, kind),
    error.el, actionError.el, done, empty, tableEl);

  selectAll.addEventListener("change", () => {
    for (const id of rows.keys()) {
      if (selectAll.checked) selected.add(id);
      else selected.delete(id);
    }
    renderSelection();
  });
  acceptSelected.addEventListener("click", () =>
    act("accept", [...selected], acceptSelected));
  rejectSelected.addEventListener("click", () =>
    act("reject", [...selected], rejectSelected));

  const poll = poller(load, REFRESH_MS);

  async function load(latest) {
    let answer;
    try {
      if (!tokensLoaded) await loadTokens();
      answer = await api.listEnrollments({ state: "pending", kind: kindFilter });
    } catch (err) {
      if (!(err instanceof api.SessionExpired) && latest()) {
        error.show(`Cannot load the pending requests: ${err.message}`);
      }
      return;
    }
    if (!latest()) return;
    error.clear();
    const { data, date } = answer;
    const now = Number.isNaN(date) ? Date.now() : date;
    const list = Array.isArray(data.enrollments) ? data.enrollments : [];
    if (list.some((e) => e.token_id != null && !tokens.has(e.token_id))) {
      tokensLoaded = false; // a token made meanwhile: its note shows with the next refresh
    }
    ctx.setPending(data.pending);
    apply(list, now);
  }

  async function loadTokens() {
    const list = (await api.listEnrollTokens()).tokens || [];
    for (const t of list) tokens.set(t.id, text(t.note));
    tokensLoaded = true;
  }

  /** Rows are kept by id, so a refresh never loses a typed name, a tick or the focus. */
  function apply(list, now) {
    const ids = new Set(list.map((e) => e.id));
    for (const [id, row] of rows) {
      if (!ids.has(id)) {
        row.tr.remove();
        rows.delete(id);
        selected.delete(id);
      }
    }
    let previous = null;
    for (const e of list) {
      let row = rows.get(e.id);
      if (!row) {
        row = makeRow(e.id);
        rows.set(e.id, row);
      }
      updateRow(row, e, now);
      if (previous ? previous.nextSibling !== row.tr : tbody.firstChild !== row.tr) {
        if (previous) previous.after(row.tr);
        else tbody.prepend(row.tr);
      }
      previous = row.tr;
    }
    loaded = true;
    empty.hidden = rows.size > 0;
    tableEl.hidden = rows.size === 0;
    renderSelection();
  }

  function makeRow(id) {
    const row = { id, signature: "", label: `request ${id}` };
    row.checkbox = h("input", { type: "checkbox", onchange: () => {
      if (row.checkbox.checked) selected.add(id);
      else selected.delete(id);
      renderSelection();
    } });
    row.host = h("strong", { class: "host" });
    row.facts = h("div", { class: "machine-facts" });
    row.name = h("input", { type: "text", class: "name-input", autocomplete: "off",
      spellcheck: "false", maxlength: "64", autocapitalize: "none" });
    row.kind = h("td", { class: "kind" });
    row.address = h("td", { class: "address" });
    row.token = h("td");
    row.age = h("td", { class: "age" });
    row.accept = h("button", { type: "button", class: "small primary", text: "Accept",
      onclick: () => act("accept", [id], row.accept) });
    row.reject = h("button", { type: "button", class: "small danger", text: "Reject",
      onclick: () => act("reject", [id], row.reject) });
    row.tr = tableRow([
      h("td", { class: "machine" }, h("label", { class: "pick" }, row.checkbox, row.host),
        row.facts),
      h("td", { class: "name-cell" }, row.name),
      row.kind, row.address, row.token, row.age,
      h("td", { class: "actions" }, row.accept, row.reject)],
    { dataset: { enrollment: String(id) } });
    return row;
  }

  function updateRow(row, e, now) {
    row.checkbox.checked = selected.has(row.id);
    setText(row.age, ago(e.created_at, now));
    row.age.title = dateTime(e.created_at);
    const signature = JSON.stringify([e, tokens.get(e.token_id)]);
    if (signature === row.signature) return;
    row.signature = signature;
    const host = hostOf(e);
    row.label = host;
    setText(row.host, host);
    row.checkbox.setAttribute("aria-label", `Select ${host}`);
    row.name.placeholder = text(e.name);
    row.name.setAttribute("aria-label", `Name for ${host} (default ${text(e.name)})`);
    row.accept.setAttribute("aria-label", `Accept ${host}`);
    row.reject.setAttribute("aria-label", `Reject ${host}`);
    setChildren(row.facts, machineFacts(e), duplicateWarning(e));
    row.tr.classList.toggle("duplicate", Boolean(e.duplicate_of));
    setText(row.kind, kindLabel(e.kind));
    setText(row.address, text(e.address));
    setText(row.token, tokenCell(e, tokens));
  }

  function renderSelection() {
    const n = selected.size;
    acceptSelected.disabled = n === 0;
    rejectSelected.disabled = n === 0;
    setText(acceptSelected, n ? `Accept selected (${n})` : "Accept selected");
    setText(rejectSelected, n ? `Reject selected (${n})` : "Reject selected");
    selectAll.checked = n > 0 && n === rows.size;
    selectAll.indeterminate = n > 0 && n < rows.size;
    selectAll.disabled = loaded && rows.size === 0;
  }

  async function act(action, ids, button) {
    actionError.clear();
    done.hidden = true;
    const targets = ids.map((id) => rows.get(id)).filter(Boolean);
    if (!targets.length) return;
    const names = new Map();
    if (action === "accept") {
      for (const row of targets) {
        const name = row.name.value.trim();
        if (name && !NAME_RE.test(name)) {
          actionError.show(`${row.label}: a name is 1–64 letters, digits, dot, dash or underscore.`);
          row.name.focus();
          return;
        }
        if (name) names.set(row.id, name);
      }
    } else {
      const who = targets.length === 1 ? targets[0].label : plural(targets.length, "machine");
      const ok = await confirmDialog(`Reject ${who}?`,
        "A rejected machine does not become an agent. It can ask again with a valid token.",
        { confirmLabel: "Reject", danger: true });
      if (!ok) return;
    }
    const accepted = [];
    const rejected = [];
    const failed = [];
    await busy(button, action === "accept" ? "Accepting…" : "Rejecting…", async () => {
      for (const row of targets) {
        row.accept.disabled = true;
        row.reject.disabled = true;
      }
      try {
        for (const row of targets) {
          try {
            if (action === "accept") {
              const body = names.has(row.id) ? { name: names.get(row.id) } : {};
              const answer = await api.acceptEnrollment(row.id, body);
              accepted.push(text(answer.enrollment && answer.enrollment.name) || row.label);
            } else {
              await api.rejectEnrollment(row.id);
              rejected.push(row.label);
            }
            selected.delete(row.id);
          } catch (err) {
            if (err instanceof api.SessionExpired) return;
            failed.push(`Cannot ${action} ${row.label}: ${err.message}`);
          }
        }
      } finally {
        for (const row of targets) {
          row.accept.disabled = false;
          row.reject.disabled = false;
        }
      }
      await poll.now();
    });
    if (accepted.length) {
      const links = accepted.flatMap((name, i) =>
        [i ? ", " : "", h("a", { href: agentHref(name), text: name })]);
      setChildren(done, `Accepted ${plural(accepted.length, "machine")}; now agent${
        accepted.length === 1 ? "" : "s"} `, links, ".");
      done.hidden = false;
    } else if (rejected.length) {
      setChildren(done, `Rejected ${plural(rejected.length, "machine")}: ${rejected.join(", ")}.`);
      done.hidden = false;
    }
    if (failed.length) actionError.show(failed.join("\n"));
    renderSelection();
    pendingBadge.refresh();
  }

  return () => poll.stop();
}

// --- earlier requests -------------------------------------------------------------------

function historySection(container, state, ctx) {
  const error = errorBox();
  const kind = kindSelect(() => poll.now());
  const { el: tableEl, tbody, row: tableRow } = table(
    ["Name", "Machine", "Kind", "Address", "Token", "Asked", "Decided"], `enrollments ${state}`);
  const empty = h("p", { class: "empty", hidden: true, text: `No ${state} requests.` });
  const tokens = new Map();
  let signature = null;
  setChildren(container, h("div", { class: "toolbar" }, kind), error.el, empty, tableEl);
  const poll = poller(load, REFRESH_MS);

  async function load(latest) {
    let answer;
    try {
      if (!tokens.size) {
        for (const t of (await api.listEnrollTokens()).tokens || []) tokens.set(t.id, text(t.note));
      }
      answer = await api.listEnrollments({ state, kind: kindFilter });
    } catch (err) {
      if (!(err instanceof api.SessionExpired) && latest()) {
        error.show(`Cannot load the ${state} requests: ${err.message}`);
      }
      return;
    }
    if (!latest()) return;
    error.clear();
    const list = Array.isArray(answer.data.enrollments) ? answer.data.enrollments : [];
    ctx.setPending(answer.data.pending);
    const now = Number.isNaN(answer.date) ? Date.now() : answer.date;
    // Unchanged lists are left alone: the reader's selection and place stay.
    const next = JSON.stringify(list);
    if (next === signature) return;
    signature = next;
    empty.hidden = list.length > 0;
    tableEl.hidden = list.length === 0;
    tbody.replaceChildren(...list.map((e) => row(e, now)));
  }

  function row(e, now) {
    const name = text(e.name);
    const isAgent = state === "accepted" || state === "revoked";
    const decided = e.decided_at
      ? `${dateTime(e.decided_at)}${e.decided_by ? ` by ${text(e.decided_by)}` : ""}`
      : state === "expired" ? dateTime(e.updated_at) : "";
    return tableRow([
      h("td", { class: "name" }, isAgent && name ? h("a", { href: agentHref(name), text: name })
        : name || "—"),
      h("td", { class: "machine" }, h("strong", { class: "host", text: hostOf(e) }),
        machineFacts(e), duplicateWarning(e)),
      h("td", { class: "kind", text: kindLabel(e.kind) }),
      h("td", { class: "address", text: text(e.address) }),
      h("td", { text: tokenCell(e, tokens) }),
      h("td", { class: "age", text: ago(e.created_at, now), title: dateTime(e.created_at) }),
      h("td", { text: decided })], { dataset: { enrollment: text(e.id) } });
  }

  return () => poll.stop();
}

// --- tokens -----------------------------------------------------------------------------

/** "site=lab, rack=3" or one pair a line → { site: "lab", rack: "3" }; throws on a bad one. */
export function parseLabels(value) {
  const labels = {};
  for (const item of value.split(/[\n,]/)) {
    const pair = item.trim();
    if (!pair) continue;
    const at = pair.indexOf("=");
    const key = at < 0 ? "" : pair.slice(0, at).trim();
    if (!LABEL_KEY_RE.test(key)) {
      throw new Error(`Not a label: "${pair}". Write name=value; names are 1–64 letters, `
        + "digits, dot, dash, underscore or slash.");
    }
    labels[key] = pair.slice(at + 1).trim();
  }
  return labels;
}

function until(iso, now) {
  const t = Date.parse(iso);
  if (Number.isNaN(t)) return "";
  const s = (t - now) / 1000;
  return s <= 0 ? `ended ${dateTime(iso)}` : `in ${span(s)}`;
}

function tokensSection(container) {
  const error = errorBox();
  const formError = errorBox();
  const { el: tableEl, tbody, row: tableRow } = table(
    ["Token", "State", "Uses", "Expires", "Labels", "Auto-accept", "Created", ""], "tokens");
  const empty = h("p", { class: "empty", hidden: true,
    text: "No enrollment tokens yet. Create one below to let machines ask to join." });
  const reveal = h("div", { class: "new-token-host" });
  let signature = null;

  const amount = h("input", { type: "number", min: "1", step: "1", value: "1", required: true,
    "aria-label": "Expires after" });
  const unit = h("select", { "aria-label": "Unit" },
    UNITS.map(([value, label]) => h("option", { value, text: label })));
  unit.value = "86400";
  const uses = h("input", { type: "number", min: "1", max: String(MAX_USES), step: "1",
    value: "1", required: true, "aria-label": "Maximum uses" });
  const unlimited = h("input", { type: "checkbox", onchange: () => {
    uses.disabled = unlimited.checked;
  } });
  const labels = h("textarea", { rows: "2", spellcheck: "false", autocomplete: "off",
    placeholder: "site=lab\nrack=3", "aria-describedby": "labels-help" });
  const autoAccept = h("input", { type: "checkbox" });
  const note = h("input", { type: "text", maxlength: "200", autocomplete: "off",
    placeholder: "e.g. lab PCs, November" });
  const create = h("button", { type: "submit", class: "primary", text: "Create token" });
  const form = h("form", { class: "token-form" },
    h("div", { class: "field" }, h("span", { class: "field-label", text: "Expires after" }),
      h("div", { class: "inline" }, amount, unit)),
    h("div", { class: "field" }, h("span", { class: "field-label", text: "Maximum uses" }),
      h("div", { class: "inline" }, uses,
        h("label", { class: "switch" }, unlimited, h("span", { text: "Unlimited" })))),
    h("label", { class: "field wide" }, h("span", { text: "Note" }), note),
    h("label", { class: "field wide" }, h("span", { text: "Labels for the machines" }), labels,
      h("small", { id: "labels-help", class: "muted",
        text: "name=value, one a line or separated by commas" })),
    h("label", { class: "switch wide" }, autoAccept, h("span", {
      text: "Accept machines with this token without asking (possible duplicates still wait)" })),
    h("div", { class: "wide" }, create));

  setChildren(container,
    error.el, empty, tableEl,
    h("h2", { text: "New token" }), reveal, form, formError.el);

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    formError.clear();
    let body;
    try {
      body = tokenRequest();
    } catch (err) {
      formError.show(err.message);
      return;
    }
    busy(create, "Creating…", async () => {
      let answer;
      try {
        answer = await api.createEnrollToken(body);
      } catch (err) {
        if (!(err instanceof api.SessionExpired)) formError.show(`Cannot create the token: ${err.message}`);
        return;
      }
      form.reset();
      unit.value = "86400";
      uses.disabled = false;
      showNewToken(answer.token || {});
      await poll.now();
    });
  });

  function tokenRequest() {
    const n = Number(amount.value);
    if (!Number.isFinite(n) || n <= 0) throw new Error("Give the expiry as a positive number.");
    const body = { expires_s: Math.round(n * Number(unit.value)), auto_accept: autoAccept.checked,
      note: note.value.trim(), labels: parseLabels(labels.value) };
    if (unlimited.checked) body.max_uses = null;
    else {
      const max = Number(uses.value);
      if (!Number.isInteger(max) || max < 1 || max > MAX_USES) {
        throw new Error(`Maximum uses: a whole number from 1 to ${MAX_USES}, or tick Unlimited.`);
      }
      body.max_uses = max;
    }
    return body;
  }

  /** The token itself, shown this once; leaving the page forgets it. */
  function showNewToken(t) {
    const secret = text(t.token);
    const command = `dutagent enroll ${location.origin} ${secret}`;
    const done = h("button", { type: "button", text: "Done, hide it",
      onclick: () => reveal.replaceChildren() });
    const panel = h("section", { class: "new-token", "aria-labelledby": "new-token-title" },
      h("h3", { id: "new-token-title", text: `Token #${text(t.id)} created: copy it now` }),
      h("p", { class: "warn", text: "This is the only time the token is shown: the server "
        + "keeps only a digest of it. Whoever has it can ask to join until it expires"
        + (t.max_uses == null ? "." : " or is used up.") }),
      copyRow("Token", secret),
      copyRow("On the new machine, run", command),
      h("div", { class: "actions" }, done));
    reveal.replaceChildren(panel);
    panel.querySelector("button").focus();
  }

  const poll = poller(load, REFRESH_MS);

  async function load(latest) {
    let list;
    try {
      list = (await api.listEnrollTokens()).tokens || [];
    } catch (err) {
      if (!(err instanceof api.SessionExpired) && latest()) {
        error.show(`Cannot load the tokens: ${err.message}`);
      }
      return;
    }
    if (!latest()) return;
    error.clear();
    const now = Date.now();
    const next = JSON.stringify(list) + Math.floor(now / 60000); // "in 5 min" moves on
    if (next === signature) return;
    signature = next;
    empty.hidden = list.length > 0;
    tableEl.hidden = list.length === 0;
    tbody.replaceChildren(...list.map((t) => row(t, now)));
  }

  function row(t, now) {
    const id = text(t.id);
    const state = text(t.state);
    const labelsList = t.labels && typeof t.labels === "object" ? Object.entries(t.labels) : [];
    const revoke = state === "revoked" ? null : h("button", { type: "button",
      class: "small danger", text: "Revoke", "aria-label": `Revoke token ${id}` });
    if (revoke) {
      revoke.addEventListener("click", async () => {
        const ok = await confirmDialog(`Revoke token #${id}?`,
          "It stops working at once: no machine can ask to join with it any more. Machines "
          + "that joined with it stay.", { confirmLabel: "Revoke", danger: true });
        if (!ok) return;
        await busy(revoke, "Revoking…", async () => {
          error.clear();
          try {
            await api.revokeEnrollToken(t.id);
          } catch (err) {
            if (!(err instanceof api.SessionExpired)) error.show(`Cannot revoke token #${id}: ${err.message}`);
            return;
          }
          await poll.now();
        });
      });
    }
    return tableRow([
      h("td", { class: "token-id" }, h("strong", { text: `#${id}` }),
        t.note ? h("span", { class: "token-note", text: ` ${text(t.note)}` }) : null),
      h("td", {}, h("span", { class: `badge state-${state.replace(/\W+/g, "-")}`, text: state })),
      h("td", { class: "num", text: `${text(t.uses)} / ${t.max_uses == null ? "unlimited" : text(t.max_uses)}` }),
      h("td", { text: until(t.expires_at, now), title: dateTime(t.expires_at) }),
      h("td", {}, labelsList.length ? h("ul", { class: "chips" },
        labelsList.map(([k, v]) => h("li", { text: `${k}=${text(v)}` }))) : "—"),
      h("td", { text: t.auto_accept ? "yes" : "no" }),
      h("td", { text: `${dateTime(t.created_at)}${t.created_by ? ` by ${text(t.created_by)}` : ""}` }),
      h("td", { class: "actions" }, revoke)], { dataset: { token: id } });
  }

  return () => poll.stop();
}

function copyRow(label, value) {
  const code = h("code", { class: "copyable", text: value });
  const said = h("span", { class: "copy-status muted", role: "status" });
  const button = h("button", { type: "button", class: "small", text: "Copy",
    "aria-label": `Copy: ${label}` });
  let timer = 0;
  button.addEventListener("click", async () => {
    const ok = await copyText(value, code);
    said.textContent = ok ? "Copied." : "Selected: press Ctrl+C (⌘C) to copy.";
    clearTimeout(timer);
    timer = setTimeout(() => { said.textContent = ""; }, 4000);
  });
  return h("div", { class: "copy-field" }, h("span", { class: "field-label", text: label }),
    h("div", { class: "copy-row" }, code, button), said);
}

/** The clipboard API where the page may use it (https, localhost); else select the text. */
async function copyText(value, element) {
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(value);
      return true;
    }
  } catch {
    // Refused (no permission, not focused): fall back to selecting the text.
  }
  const range = document.createRange();
  range.selectNodeContents(element);
  const chosen = window.getSelection();
  chosen.removeAllRanges();
  chosen.addRange(range);
  try {
    return document.execCommand("copy");
  } catch {
    return false;
  }
}
