// The Inventory tab: what the agent reported about its machine in its last inventory task,
// and a button to collect a fresh one.

import * as api from "./api.js";
import { busy, errorBox, h, setChildren, table } from "./dom.js";
import { bytes, span, text } from "./format.js";

const KNOWN = new Set(["hostname", "os", "os_version", "kernel", "arch", "cpu", "cpu_count",
  "ram_bytes", "disks", "networks", "uptime_s", "users", "python_version", "agent_version"]);

export function inventoryPanel(panel, agentName, reloadAgent) {
  const error = errorBox();
  const collect = h("button", { type: "button", class: "primary", text: "Collect inventory now" });
  const content = h("div", { class: "inventory" },
    h("p", { class: "muted", text: "Loading…" }));
  panel.append(h("div", { class: "toolbar" }, collect), error.el, content);
  let shown = null;

  collect.addEventListener("click", () => busy(collect, "Collecting…", async () => {
    error.clear();
    try {
      const result = await api.runTask(agentName, { type: "inventory" }, 60);
      if (result.error) throw new Error(text(result.msg));
      // The server keeps the last successful inventory; reload the agent to show it.
      await reloadAgent();
    } catch (err) {
      if (!(err instanceof api.SessionExpired)) error.show(`Cannot collect the inventory: ${err.message}`);
    }
  }));

  function show(agent) {
    const inv = agent.inventory;
    const key = JSON.stringify(inv ?? null);
    if (key === shown) return; // unchanged: keep the page (and the reader's place) as it is
    shown = key;
    if (!inv || typeof inv !== "object") {
      setChildren(content, h("p", { class: "muted",
        text: "No inventory yet. Collect one with the button above (the agent must be online)." }));
      return;
    }
    setChildren(content, ...render(inv));
  }

  return { show };
}

function render(inv) {
  const fact = (label, value) => (value === undefined || value === null || value === ""
    ? null : [h("dt", { text: label }), h("dd", { text: value })]);
  const os = [text(inv.os), text(inv.os_version)].filter(Boolean).join(" ");
  const cpu = [text(inv.cpu), inv.cpu_count !== undefined ? `(${text(inv.cpu_count)} cores)` : ""]
    .filter(Boolean).join(" ");
  const users = Array.isArray(inv.users) ? inv.users.map(text).join(", ") : text(inv.users);
  const parts = [h("dl", { class: "facts" },
    fact("Host name", text(inv.hostname)),
    fact("Operating system", os),
    fact("Kernel", text(inv.kernel)),
    fact("Architecture", text(inv.arch)),
    fact("CPU", cpu),
    fact("Memory", inv.ram_bytes !== undefined ? bytes(inv.ram_bytes) : null),
    fact("Up for", inv.uptime_s !== undefined ? span(inv.uptime_s) : null),
    fact("Users logged in", users),
    fact("Python", text(inv.python_version)),
    fact("Agent version", text(inv.agent_version)))];

  if (Array.isArray(inv.disks) && inv.disks.length) {
    const { el, tbody, row } = table(["Mount", "Size", "Free", "Used"], "disks");
    for (const d of inv.disks) {
      const size = Number(d?.size);
      const free = Number(d?.free);
      const used = size > 0 && Number.isFinite(free) ? `${Math.round((1 - free / size) * 100)} %` : "";
      tbody.append(row([h("td", { text: text(d?.mount) }), h("td", { text: bytes(d?.size) }),
        h("td", { text: bytes(d?.free) }), h("td", { class: "num", text: used })]));
    }
    parts.push(h("h3", { text: "Disks" }), el);
  }
  if (Array.isArray(inv.networks) && inv.networks.length) {
    const { el, tbody, row } = table(["Interface", "Addresses", "MAC"], "networks");
    for (const n of inv.networks) {
      const addresses = Array.isArray(n?.addresses) ? n.addresses.map(text).join(", ") : text(n?.addresses);
      tbody.append(row([h("td", { text: text(n?.name) }), h("td", { text: addresses }),
        h("td", { text: text(n?.mac) })]));
    }
    parts.push(h("h3", { text: "Network" }), el);
  }
  const extra = Object.entries(inv).filter(([k]) => !KNOWN.has(k));
  if (extra.length) {
    parts.push(h("h3", { text: "Other" }), h("dl", { class: "facts" },
      extra.map(([k, v]) => [h("dt", { text: k }), h("dd", { text: text(v) })])));
  }
  return parts;
}
