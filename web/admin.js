// Administration: accounts, the self-registration switch, the audit log and the task history.

import * as api from "./api.js";
import { auditSection } from "./audit.js";
import { busy, errorBox, h, setChildren, table } from "./dom.js";
import { confirmDialog, promptDialog } from "./dialog.js";
import { dateTime, text } from "./format.js";
import { taskHistorySection } from "./tasks.js";

const SECTIONS = [
  ["accounts", "Accounts", accountsSection],
  ["registration", "Self-registration", registrationSection],
  ["audit", "Audit log", auditSection],
  ["tasks", "Task history", taskHistorySection],
];
const NAME_RE = /^[A-Za-z0-9._-]{1,64}$/;
const MIN_PASSWORD = { admin: 8, agent: 16 };

export function adminView(container, { section }) {
  const current = SECTIONS.find(([key]) => key === section) ?? SECTIONS[0];
  const body = h("div", { class: "admin-body" });
  container.append(h("section", { class: "admin" },
    h("h1", { text: "Administration" }),
    h("nav", { class: "subnav", "aria-label": "Administration" },
      SECTIONS.map(([key, label]) => h("a", { href: `#/admin/${key}`, text: label,
        "aria-current": key === current[0] ? "page" : false }))),
    body));
  current[2](body);
  return () => {};
}

function accountsSection(container) {
  const error = errorBox();
  const formError = errorBox();
  const { el: tableEl, tbody, row: tableRow } = table(["Name", "Type", "Created", ""], "accounts");
  const name = h("input", { name: "name", required: true, autocomplete: "off", spellcheck: "false",
    maxlength: "64", pattern: "[A-Za-z0-9._\\-]{1,64}" });
  const type = h("select", { name: "type" },
    h("option", { value: "admin", text: "Administrator" }),
    h("option", { value: "agent", text: "Agent" }));
  const password = h("input", { name: "password", type: "password", required: true,
    autocomplete: "new-password" });
  const create = h("button", { type: "submit", class: "primary", text: "Create account" });
  const form = h("form", { class: "command-form" },
    h("label", {}, h("span", { text: "Name" }), name),
    h("label", {}, h("span", { text: "Type" }), type),
    h("label", {}, h("span", { text: "Password or agent secret" }), password),
    create);
  setChildren(container,
    h("h2", { text: "Accounts" }), error.el, tableEl,
    h("h3", { text: "New account" }),
    h("p", { class: "muted",
      text: "Names: 1–64 letters, digits, dot, dash or underscore. Admin passwords need 8 "
        + "characters, agent secrets 16." }),
    form, formError.el);

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    formError.clear();
    const problem = checkAccount(name.value, type.value, password.value);
    if (problem) {
      formError.show(problem);
      return;
    }
    busy(create, "Creating…", async () => {
      try {
        await api.createAccount(name.value, type.value, password.value);
        form.reset();
        await load();
      } catch (err) {
        if (!(err instanceof api.SessionExpired)) formError.show(`Cannot create the account: ${err.message}`);
      }
    });
  });
  load();

  async function load() {
    error.clear();
    let accounts;
    try {
      accounts = (await api.listAccounts()).accounts || [];
    } catch (err) {
      if (!(err instanceof api.SessionExpired)) error.show(`Cannot load accounts: ${err.message}`);
      return;
    }
    tbody.replaceChildren(...accounts.map(row));
  }

  function row(account) {
    const accountName = text(account.name);
    const kind = text(account.type);
    const change = h("button", { type: "button", class: "small",
      text: kind === "agent" ? "Change secret" : "Change password",
      "aria-label": `Change the password of ${accountName}` });
    const remove = h("button", { type: "button", class: "small danger", text: "Remove",
      "aria-label": `Remove ${accountName}` });
    change.addEventListener("click", async () => {
      const pw = await promptDialog(`New password for ${accountName}`,
        kind === "agent" ? "New secret (at least 16 characters)" : "New password (at least 8 characters)",
        "", { type: "password", confirmLabel: "Change" });
      if (pw === null) return;
      const problem = checkAccount(accountName, kind, pw);
      if (problem) {
        error.show(problem);
        return;
      }
      await busy(change, "Saving…", async () => {
        error.clear();
        try {
          await api.setPassword(accountName, pw);
          // The server ends the account's sessions, this one included when it is ours.
          if (accountName === api.session.user) {
            api.endSession("Your password was changed. Please log in with the new one.");
          }
        } catch (err) {
          if (!(err instanceof api.SessionExpired)) error.show(`Cannot change the password of ${accountName}: ${err.message}`);
        }
      });
    });
    remove.addEventListener("click", async () => {
      const self = accountName === api.session.user;
      const ok = await confirmDialog(`Remove ${accountName}?`,
        self ? "This is your own account: you will be logged out and cannot log in again with it."
          : kind === "agent" ? `The agent ${accountName} can no longer connect.`
            : `${accountName} can no longer log in.`,
        { confirmLabel: "Remove", danger: true });
      if (!ok) return;
      await busy(remove, "Removing…", async () => {
        try {
          await api.removeAccount(accountName);
          if (self) {
            api.endSession(`The account ${accountName} was removed.`);
            return;
          }
          await load();
        } catch (err) {
          if (!(err instanceof api.SessionExpired)) error.show(`Cannot remove ${accountName}: ${err.message}`);
        }
      });
    });
    return tableRow([
      h("td", { class: "name", text: accountName }),
      h("td", { text: kind }),
      h("td", { text: dateTime(account.created_at) }),
      h("td", { class: "actions" }, change, remove)], { dataset: { account: accountName } });
  }
}

/** The protocol's rules, checked here too so mistakes show before a round trip. */
function checkAccount(name, type, password) {
  if (!NAME_RE.test(name)) return "A name is 1–64 letters, digits, dot, dash or underscore.";
  const min = MIN_PASSWORD[type] ?? 8;
  if (password.length < min) {
    return `${type === "agent" ? "An agent secret" : "A password"} needs at least ${min} characters.`;
  }
  return "";
}

function registrationSection(container) {
  const error = errorBox();
  const toggle = h("input", { type: "checkbox", disabled: true });
  const saved = h("span", { class: "muted", role: "status" });
  setChildren(container,
    h("h2", { text: "Agent self-registration" }),
    h("p", { text: "While this is on, any agent that knows the server's address can create its "
      + "own agent account (it never replaces an existing one). Leave it off unless you are "
      + "enrolling new PCs." }),
    h("label", { class: "switch" }, toggle, h("span", { text: "Agents may register themselves" })),
    saved, error.el,
    h("p", {}, "New PCs fetch the agent program from ",
      h("a", { href: "/agent/dutagent.py", download: "dutagent.py", text: "/agent/dutagent.py" }), "."));

  api.getSelfRegistration().then((on) => {
    toggle.checked = on;
    toggle.disabled = false;
  }).catch((err) => {
    if (!(err instanceof api.SessionExpired)) error.show(`Cannot read the setting: ${err.message}`);
  });

  toggle.addEventListener("change", async () => {
    const on = toggle.checked;
    toggle.disabled = true;
    error.clear();
    saved.textContent = "Saving…";
    try {
      await api.setSelfRegistration(on);
      saved.textContent = on ? "Saved: self-registration is on." : "Saved: self-registration is off.";
    } catch (err) {
      toggle.checked = !on;
      saved.textContent = "";
      if (!(err instanceof api.SessionExpired)) error.show(`Cannot change the setting: ${err.message}`);
    } finally {
      toggle.disabled = false;
    }
  });
}
