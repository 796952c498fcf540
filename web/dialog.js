// In-page confirmation and input dialogs, built on <dialog>. Deliberately not window.confirm
// or window.prompt: those are native dialogs, and the tests treat any native dialog as a sign
// that hostile agent data ran as script.

import { h } from "./dom.js";

function open({ title, message, confirmLabel, danger, input }) {
  return new Promise((resolve) => {
    const field = input
      ? h("input", { type: input.type || "text", value: input.value || "", required: true,
        "aria-label": input.label, autocomplete: "off", spellcheck: "false" })
      : null;
    const ok = h("button", { type: "submit", class: danger ? "danger" : "primary",
      text: confirmLabel });
    const cancel = h("button", { type: "button", text: "Cancel" });
    const titleId = `dlg-${Math.random().toString(36).slice(2)}`;
    const dialog = h("dialog", { class: "dialog", "aria-labelledby": titleId },
      h("form", { method: "dialog" },
        h("h2", { id: titleId, text: title }),
        message ? h("p", { class: "dialog-message", text: message }) : null,
        field ? h("label", {}, h("span", { text: input.label }), field) : null,
        h("div", { class: "actions" }, cancel, ok)));
    let result = null;
    cancel.addEventListener("click", () => dialog.close());
    dialog.addEventListener("submit", (event) => {
      if (field && !field.value.trim()) {
        event.preventDefault();
        field.focus();
        return;
      }
      result = field ? field.value : true;
    });
    dialog.addEventListener("close", () => {
      dialog.remove();
      resolve(field ? result : result === true);
    });
    document.body.append(dialog);
    dialog.showModal();
    // A destructive action starts on Cancel, so a stray Enter does no harm.
    if (field) {
      field.focus();
      field.select();
    } else (danger ? cancel : ok).focus();
  });
}

/** Resolves true when the user confirmed. */
export function confirmDialog(title, message, { confirmLabel = "OK", danger = false } = {}) {
  return open({ title, message, confirmLabel, danger });
}

/** Resolves to the entered text, or null when cancelled. */
export function promptDialog(title, label, value = "", { confirmLabel = "OK", type = "text",
  message = "" } = {}) {
  return open({ title, message, confirmLabel, input: { label, value, type } });
}
