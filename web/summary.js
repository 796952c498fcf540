// Groups the results of one command on many agents, so that 50 answers read as
// "48 agents: exit 0, same output" and "2 agents: exit 1 …". Pure functions: no DOM here.

import { firstLine, plural, text } from "./format.js";

export const FINAL_STATES = new Set(["done", "failed", "cancelled", "expired"]);

const STATE_WORDS = {
  cancelled: "cancelled before the agent picked it up",
  expired: "the agent did not pick it up in time",
  failed: "failed without a result",
};

/** Results never change once final, so each is classified once (outputs may be big). */
const classified = new WeakMap();

/** What identifies "the same result": exit code, output and errors, or the error message. */
function classify(entry) {
  const r = entry.result;
  if (r && typeof r === "object") {
    let info = classified.get(r);
    if (!info) {
      info = classifyResult(r);
      classified.set(r, info);
    }
    if (info) return info;
  }
  const state = text(entry.state);
  return { key: JSON.stringify(["state", state]), kind: "state", state };
}

function classifyResult(r) {
  if (r && typeof r === "object" && !Array.isArray(r)) {
    if (r.error) {
      const msg = text(r.msg ?? "error");
      return { key: JSON.stringify(["error", msg]), kind: "error", msg };
    }
    if ("status_code" in r || "output" in r) {
      const exit = text(r.status_code);
      const stdout = text(r.output);
      const stderr = text(r.stderr);
      const truncated = Boolean(r.truncated);
      return {
        key: JSON.stringify(["exit", exit, stdout, stderr, truncated]),
        kind: "exit", exit, stdout, stderr, truncated,
      };
    }
    // Any other result type: the same when equal apart from timing.
    const { duration_s: _ignored, ...rest } = r;
    const body = text(rest);
    return { key: JSON.stringify(["result", body]), kind: "result", body };
  }
  return null; // an array or other odd value: grouped by the task's state
}

/**
 * entries: [{target, state, result}] for the finished targets.
 * Returns groups, largest first: [{key, kind, label, preview, targets, ...details}].
 */
export function groupResults(entries) {
  const groups = new Map();
  for (const entry of entries) {
    const info = classify(entry);
    let group = groups.get(info.key);
    if (!group) {
      group = { ...info, targets: [] };
      groups.set(info.key, group);
    }
    group.targets.push(entry.target);
  }
  const list = [...groups.values()];
  for (const group of list) Object.assign(group, describe(group));
  return list.sort((a, b) => b.targets.length - a.targets.length
    || rank(a) - rank(b) || (a.key < b.key ? -1 : 1));
}

/** Successful exits first, then other exits, then errors and states. */
function rank(group) {
  if (group.kind === "exit") return group.exit === "0" ? 0 : 1;
  return group.kind === "result" ? 2 : group.kind === "error" ? 3 : 4;
}

function describe(group) {
  const n = group.targets.length;
  const count = plural(n, "agent");
  const same = n > 1 ? ", same output" : "";
  switch (group.kind) {
    case "exit": {
      const shown = group.stdout || group.stderr;
      const lines = shown.split(/\r?\n/).filter((l) => l !== "").length;
      const preview = firstLine(shown) + (lines > 1 ? `  (${lines} lines)` : "");
      return { label: `${count}: ${group.exit === "" ? "no exit code" : `exit ${group.exit}`}${same}`,
        preview: shown ? preview : "no output" };
    }
    case "error":
      return { label: `${count}: error`, preview: firstLine(group.msg) };
    case "result":
      return { label: `${count}: ok${same}`, preview: firstLine(group.body) };
    default:
      return { label: `${count}: ${group.state}`, preview: STATE_WORDS[group.state] || "" };
  }
}
