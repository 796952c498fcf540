// The audit log: who did what, newest first, paged backwards.

import * as api from "./api.js";
import { busy, errorBox, h, setChildren, table } from "./dom.js";
import { dateTime, text } from "./format.js";

const PAGE = 100;

export function auditSection(container) {
  const error = errorBox();
  const { el: tableEl, tbody, row } = table(["Time", "Who", "Action", "Detail", "Address"], "audit");
  const more = h("button", { type: "button", text: "Load older events", hidden: true });
  const reload = h("button", { type: "button", class: "primary", text: "Refresh" });
  let lastId = null;
  setChildren(container, h("h2", { text: "Audit log" }),
    h("div", { class: "toolbar" }, reload), error.el, tableEl, more);

  reload.addEventListener("click", () => busy(reload, "Loading…", () => load(false)));
  more.addEventListener("click", () => busy(more, "Loading…", () => load(true)));
  load(false);

  async function load(older) {
    error.clear();
    let events;
    try {
      events = (await api.listAudit({ limit: PAGE, before_id: older ? lastId : "" })).events || [];
    } catch (err) {
      if (!(err instanceof api.SessionExpired)) error.show(`Cannot load the audit log: ${err.message}`);
      return;
    }
    if (!older) tbody.replaceChildren();
    for (const e of events) {
      tbody.append(row([
        h("td", { text: dateTime(e.at) }),
        h("td", { text: text(e.actor) }),
        h("td", { text: text(e.action) }),
        h("td", { class: "what", text: text(e.detail) }),
        h("td", { text: text(e.address) })]));
    }
    if (events.length) lastId = events[events.length - 1].id;
    more.hidden = events.length < PAGE;
  }
}
