// The application shell: login screen, top bar, and a hash router that mounts one view at a
// time. Views are functions (container, params) -> destroy(), so leaving a page stops its timers.

import * as api from "./api.js";
import { agentView } from "./agent.js";
import { adminView } from "./admin.js";
import { broadcastView } from "./broadcast.js";
import { dashboardView } from "./dashboard.js";
import { busy, errorBox, h } from "./dom.js";
import { enrollView, pendingBadge } from "./enroll.js";
import { jobsView } from "./jobs.js";
import { selection } from "./selection.js";

const main = document.getElementById("view");
const topbar = document.getElementById("topbar");
let destroyView = null;

api.onSessionExpired((message) => showLogin(message || "Your session expired, please log in again"));
window.addEventListener("hashchange", route);
start();

async function start() {
  if (!api.session.token) {
    showLogin();
    return;
  }
  try {
    await api.whoami();
  } catch (err) {
    if (err instanceof api.SessionExpired) return; // the login screen is showing
    // Server unreachable: show the page anyway; its own requests report the problem in place.
  }
  route();
}

/** Parses "#/agent/pc-1/files" into a view and its parameters. */
function parseHash() {
  const path = location.hash.replace(/^#\/?/, "").split("?")[0];
  const parts = path.split("/").filter(Boolean).map((p) => {
    try {
      return decodeURIComponent(p);
    } catch {
      return p;
    }
  });
  return parts;
}

function route() {
  if (!api.session.token) {
    showLogin();
    return;
  }
  const [page = "", ...rest] = parseHash();
  unmount();
  renderTopbar(page);
  main.replaceChildren();
  if (page === "") mount("Agents", dashboardView);
  else if (page === "agent" && rest[0]) mount(rest[0], agentView, { name: rest[0], tab: rest[1] });
  else if (page === "broadcast") mount("Run on many agents", broadcastView);
  else if (page === "admin") mount("Administration", adminView, { section: rest[0] });
  else if (page === "enroll") mount("Enrollment", enrollView, { section: rest[0] });
  else if (page === "jobs") {
    const id = rest[0];
    const title = id === undefined ? "Jobs" : id === "new" ? "New job"
      : id === "schedules" ? "Schedules" : `Job #${id}`;
    mount(title, jobsView, { id });
  }
  else {
    document.title = "Not found — dutserver";
    main.append(h("section", { class: "not-found" },
      h("h1", { text: "Page not found" }),
      h("p", {}, h("a", { href: "#/", text: "Back to the agents" }))));
  }
  // Keyboard users land at the start of the new page (or in the field the page focused),
  // not at the end of the old one.
  if (!main.contains(document.activeElement)) main.focus();
}

function mount(title, view, params = {}) {
  document.title = `${title} — dutserver`;
  destroyView = view(main, params);
}

function unmount() {
  if (destroyView) destroyView();
  destroyView = null;
  document.querySelectorAll("dialog.dialog").forEach((d) => d.remove());
}

function renderTopbar(page) {
  const link = (href, text, active) => h("a", {
    href, text, "aria-current": active ? "page" : false,
  });
  // The number of machines waiting to join, refreshed every few seconds (enroll.js).
  const enrollLink = link("#/enroll", "Enrollment", page === "enroll");
  enrollLink.append(pendingBadge.element());
  pendingBadge.start();
  const logoutButton = h("button", { type: "button", class: "logout", text: "Log out" });
  logoutButton.addEventListener("click", () => busy(logoutButton, "Logging out…", async () => {
    await api.logout();
    selection.clear(); // the next person at this browser starts with nothing picked
    showLogin("You are logged out.");
  }));
  topbar.replaceChildren(
    h("a", { class: "brand", href: "#/", text: "dutserver" }),
    h("nav", { "aria-label": "Main" },
      link("#/", "Agents", page === "" || page === "agent"),
      link("#/broadcast", "Run on many", page === "broadcast"),
      link("#/jobs", "Jobs", page === "jobs"),
      enrollLink,
      link("#/admin", "Admin", page === "admin")),
    h("span", { class: "user", title: "Logged in as", text: api.session.user }),
    logoutButton);
  topbar.hidden = false;
}

function showLogin(notice = "") {
  unmount();
  pendingBadge.stop();
  topbar.hidden = true;
  topbar.replaceChildren();
  document.title = "Log in — dutserver";
  const error = errorBox();
  const user = h("input", { name: "user", autocomplete: "username", required: true,
    autocapitalize: "none", spellcheck: "false" });
  const pass = h("input", { name: "pass", type: "password", autocomplete: "current-password",
    required: true });
  const submit = h("button", { type: "submit", class: "primary", text: "Log in" });
  const form = h("form", { class: "login-form" },
    h("label", {}, h("span", { text: "User" }), user),
    h("label", {}, h("span", { text: "Password" }), pass),
    submit, error.el);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    error.clear();
    busy(submit, "Logging in…", async () => {
      try {
        await api.login(user.value.trim(), pass.value);
      } catch (err) {
        if (err.status === 429) {
          const wait = err.retryAfter ? ` Try again in ${err.retryAfter} s.` : "";
          error.show(`Too many failed attempts.${wait}`);
        } else error.show(err.status === 403 ? "Wrong user name or password." : err.message);
        pass.select();
        return;
      }
      route();
    });
  });
  main.replaceChildren(h("section", { class: "login" },
    h("h1", { text: "dutserver" }),
    notice ? h("p", { class: "notice", role: "status", text: notice }) : null,
    form));
  user.focus();
}
