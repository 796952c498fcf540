// The Command tab: run a shell command on one agent and show exit code, output, errors and
// duration. Earlier runs stay below, newest first; ↑/↓ in the field recall earlier commands.

import * as api from "./api.js";
import { errorBox, h, pre } from "./dom.js";
import { seconds, text } from "./format.js";

const KEEP_RUNS = 20;
/** The server waits this much longer than the command may run, so a slow start still counts. */
const SLACK_S = 5;

export function commandPanel(panel, agentName, getAgent = () => null) {
  const error = errorBox();
  const input = h("input", { name: "cmd", required: true, autocomplete: "off",
    spellcheck: "false", placeholder: "e.g. hostname", "aria-label": "Command" });
  const timeout = h("input", { name: "timeout", type: "number", min: 1, max: 3600, value: "30",
    required: true, "aria-label": "Timeout in seconds" });
  const run = h("button", { type: "submit", class: "primary", text: "Run" });
  const cancel = h("button", { type: "button", text: "Cancel", hidden: true });
  const elapsed = h("span", { class: "muted", "aria-live": "off" });
  const runs = h("div", { class: "runs" });
  const form = h("form", { class: "command-form" },
    h("label", { class: "grow" }, h("span", { text: "Command" }), input),
    h("label", {}, h("span", { text: "Timeout (s)" }), timeout),
    run, cancel, elapsed);
  panel.append(form, error.el, runs);
  input.focus();

  const recalled = [];
  let recallIndex = -1;
  let controller = null;
  let ticker = 0;

  input.addEventListener("keydown", (event) => {
    if (event.key !== "ArrowUp" && event.key !== "ArrowDown") return;
    if (recalled.length === 0) return;
    event.preventDefault();
    recallIndex += event.key === "ArrowUp" ? 1 : -1;
    recallIndex = Math.max(-1, Math.min(recalled.length - 1, recallIndex));
    input.value = recallIndex < 0 ? "" : recalled[recallIndex];
  });

  cancel.addEventListener("click", () => controller?.abort());

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (controller) return;
    error.clear();
    const cmd = input.value;
    const timeoutS = Number(timeout.value) || 30;
    if (recalled[0] !== cmd) recalled.unshift(cmd);
    recallIndex = -1;
    controller = new AbortController();
    const started = Date.now();
    run.disabled = true;
    run.textContent = "Running…";
    run.setAttribute("aria-busy", "true");
    cancel.hidden = false;
    // An offline agent gets the command when it next polls; say why nothing happens yet.
    const waiting = getAgent()?.online === false ? `${agentName} is offline, waiting for it… ` : "";
    elapsed.textContent = waiting;
    ticker = setInterval(() => {
      elapsed.textContent = `${waiting}${Math.floor((Date.now() - started) / 1000)} s`;
    }, 1000);
    try {
      const result = await api.runTask(agentName,
        { type: "execute_cmd", cmd, timeout_s: timeoutS }, timeoutS + SLACK_S, controller.signal);
      addRun(cmd, result);
    } catch (err) {
      if (err instanceof api.SessionExpired) return;
      if (err.name === "AbortError") error.show("Cancelled. If the agent had already started the command, it runs to its end; see History.");
      else if (err.status === 504) {
        error.show(`No answer from ${agentName} in time. If it was offline, the command was `
          + "cancelled; if it had already started, its result will appear under History.");
      }
      else if (err.status === 404) error.show(`There is no agent called ${agentName}.`);
      else error.show(`Could not run the command: ${err.message}`);
    } finally {
      clearInterval(ticker);
      controller = null;
      run.disabled = false;
      run.textContent = "Run";
      run.removeAttribute("aria-busy");
      cancel.hidden = true;
      elapsed.textContent = "";
    }
  });

  function addRun(cmd, result) {
    runs.prepend(resultCard(cmd, result));
    while (runs.childElementCount > KEEP_RUNS) runs.lastElementChild.remove();
  }

  return () => {
    clearInterval(ticker);
    controller?.abort();
  };
}

/** A card with one command's result. Everything from the agent is text. */
export function resultCard(cmd, result) {
  const r = result && typeof result === "object" ? result : { error: true, msg: text(result) };
  const head = h("header", {}, h("code", { class: "cmd", text: `$ ${cmd}` }));
  const body = [];
  if (r.error) {
    head.append(h("span", { class: "badge state-failed", text: "error" }));
    body.push(pre(text(r.msg ?? "The agent reported an error."), "stderr"));
  } else {
    const exit = text(r.status_code);
    head.append(h("span", { class: `badge ${exit === "0" ? "state-done" : "state-failed"}`,
      text: exit === "" ? "no exit code" : `exit ${exit}` }));
    head.append(h("span", { class: "muted", text: seconds(r.duration_s) }));
    body.push(h("h4", { text: "Output" }), pre(text(r.output) || "(none)"));
    if (text(r.stderr)) body.push(h("h4", { text: "Errors (stderr)" }), pre(text(r.stderr), "stderr"));
    if (r.truncated) body.push(h("p", { class: "muted", text: "The output was cut off by the agent." }));
  }
  head.append(h("time", { class: "muted", text: new Date().toLocaleTimeString() }));
  return h("article", { class: "result-card" }, head, ...body);
}
