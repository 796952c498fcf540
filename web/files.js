// The Files tab: browse the agent's folders, download, upload, rename and delete files.
// Transfers travel inside task bodies, which the server limits to 1 MiB; after base64 that
// leaves room for files up to MAX_TRANSFER_BYTES.

import * as api from "./api.js";
import { busy, errorBox, h, setText, table } from "./dom.js";
import { confirmDialog, promptDialog } from "./dialog.js";
import { bytes, dateTime, plural, text } from "./format.js";
import { fromBase64, sha256Hex, toBase64 } from "./bytes.js";
import { offlineNote } from "./processes.js";
import { compareNames } from "./selection.js";

export const MAX_TRANSFER_BYTES = 700 * 1024;
const TIMEOUT_S = 60;

export function filesPanel(panel, agentName, getAgent) {
  const dirKey = `dutserver.dir.${agentName}`;
  const error = errorBox();
  const status = h("p", { class: "status", role: "status", hidden: true });
  const up = h("button", { type: "button", text: "↑ Up", "aria-label": "Up to the parent folder" });
  const pathInput = h("input", { name: "path", "aria-label": "Folder", autocomplete: "off",
    spellcheck: "false", placeholder: "Drives" });
  const open = h("button", { type: "submit", text: "Open" });
  const refresh = h("button", { type: "button", text: "Refresh" });
  const fileInput = h("input", { type: "file", class: "visually-hidden", tabindex: "-1",
    "aria-hidden": "true" });
  const upload = h("button", { type: "button", class: "primary", text: "Upload file…" });
  const count = h("span", { class: "muted" });
  const pathForm = h("form", { class: "path-form" }, pathInput, open);
  const { el: tableEl, tbody, row: tableRow } = table(["Name", "Size", "Modified", ""], "files");
  panel.append(h("div", { class: "toolbar" }, up, pathForm, refresh, upload, fileInput),
    status, error.el, count, tableEl);

  let dir = sessionStorage.getItem(dirKey) || defaultDir(getAgent());
  let entries = [];

  pathForm.addEventListener("submit", (event) => {
    event.preventDefault();
    busy(open, "Opening…", () => list(pathInput.value.trim()));
  });
  up.addEventListener("click", () => {
    const parent = parentOf(dir);
    if (parent !== null) busy(up, "Opening…", () => list(parent));
  });
  refresh.addEventListener("click", () => busy(refresh, "Loading…", () => list(dir)));
  upload.addEventListener("click", () => fileInput.click());
  fileInput.addEventListener("change", () => {
    const file = fileInput.files && fileInput.files[0];
    fileInput.value = "";
    if (file) busy(upload, "Uploading…", () => uploadFile(file));
  });
  if (getAgent()?.online === false) {
    offlineNote(count, agentName, "this folder");
    pathInput.value = dir;
  } else busy(refresh, "Loading…", () => list(dir));

  /** Runs one file task; throws with the agent's message when it reports an error. */
  async function task(body) {
    const result = await api.runTask(agentName, body, TIMEOUT_S);
    if (!result || typeof result !== "object") throw new Error("The agent sent no result.");
    if (result.error) throw new Error(text(result.msg ?? "The agent reported an error."));
    return result;
  }

  function failed(what, err) {
    if (err instanceof api.SessionExpired) return;
    error.show(`${what}: ${err.message}`);
  }

  async function list(target) {
    error.clear();
    try {
      const result = await task({ type: "dircontents", dir: target });
      entries = (Array.isArray(result.contents) ? result.contents : [])
        .filter((e) => e && typeof e === "object")
        .sort((a, b) => Boolean(b.dir) - Boolean(a.dir) || compareNames(text(a.name), text(b.name)));
      dir = target;
      sessionStorage.setItem(dirKey, dir);
      render();
    } catch (err) {
      failed(`Cannot open ${target}`, err);
    }
    pathInput.value = dir;
    up.disabled = parentOf(dir) === null;
  }

  function render() {
    setText(count, `${dir || "Drives"}: ${plural(entries.length, "entry", "entries")}`);
    tbody.replaceChildren(...entries.map(row));
  }

  function pathOf(entry) {
    return typeof entry.fullpath === "string" && entry.fullpath ? entry.fullpath
      : joinPath(dir, text(entry.name));
  }

  function row(entry) {
    const name = text(entry.name);
    const isDir = Boolean(entry.dir);
    const actions = h("td", { class: "actions" });
    if (!isDir) {
      actions.append(action("Download", `Download ${name}`, (button) =>
        busy(button, "Downloading…", () => download(entry))));
    }
    actions.append(action("Rename", `Rename ${name}`, () => rename(entry)));
    // The agent's deletefile removes files only; folders go with a command, deliberately.
    if (!isDir) actions.append(action("Delete", `Delete ${name}`, (button) => remove(entry, button), "danger"));
    const nameCell = isDir
      ? h("button", { type: "button", class: "link dir", text: `${name}/`,
        "aria-label": `Open folder ${name}`,
        onclick: (event) => busy(event.currentTarget, "Opening…", () => list(pathOf(entry))) })
      : h("span", { class: "file", text: name });
    return tableRow([
      h("td", { class: "name" }, nameCell),
      h("td", { class: "num", text: isDir ? "" : bytes(entry.size) }),
      h("td", { text: formatMtime(entry.mtime) }),
      actions], { dataset: { name } });
  }

  function action(label, ariaLabel, onClick, extraClass = "") {
    const button = h("button", { type: "button", class: `small ${extraClass}`.trim(), text: label,
      "aria-label": ariaLabel });
    button.addEventListener("click", () => onClick(button));
    return button;
  }

  function progress(message) {
    status.hidden = !message;
    status.replaceChildren(...(message
      ? [h("span", { class: "spinner", "aria-hidden": "true" }), message] : []));
  }

  async function download(entry) {
    const name = text(entry.name);
    error.clear();
    if (Number(entry.size) > MAX_TRANSFER_BYTES) {
      error.show(`${name} is ${bytes(entry.size)}; the browser can download files up to `
        + `${bytes(MAX_TRANSFER_BYTES)}. Use the dutctl terminal client for bigger files.`);
      return;
    }
    progress(`Downloading ${name}…`);
    try {
      const result = await task({ type: "readfile", path: pathOf(entry), max_bytes: MAX_TRANSFER_BYTES });
      const data = fromBase64(text(result.content_b64));
      if (result.truncated || (result.size !== undefined && Number(result.size) !== data.length)) {
        throw new Error(`the file is ${bytes(result.size)}; only files up to `
          + `${bytes(MAX_TRANSFER_BYTES)} can be downloaded here`);
      }
      const digest = await sha256Hex(data);
      if (digest && typeof result.sha256 === "string" && digest !== result.sha256.toLowerCase()) {
        throw new Error("the data arrived damaged (SHA-256 mismatch); try again");
      }
      const url = URL.createObjectURL(new Blob([data], { type: "application/octet-stream" }));
      const link = h("a", { href: url, download: name, class: "visually-hidden" });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60_000);
    } catch (err) {
      failed(`Cannot download ${name}`, err);
    } finally {
      progress("");
    }
  }

  async function uploadFile(file) {
    error.clear();
    if (file.size > MAX_TRANSFER_BYTES) {
      error.show(`${file.name} is ${bytes(file.size)}; the browser can upload files up to `
        + `${bytes(MAX_TRANSFER_BYTES)} (the server's request size limit). `
        + "Use the dutctl terminal client for bigger files.");
      return;
    }
    const existing = entries.find((e) => text(e.name) === file.name);
    if (existing) {
      const ok = await confirmDialog("Replace file?",
        `${file.name} already exists in ${dir}. Replace it?`, { confirmLabel: "Replace", danger: true });
      if (!ok) return;
    }
    const target = existing ? pathOf(existing) : joinPath(dir, file.name);
    progress(`Uploading ${file.name} (${bytes(file.size)})…`);
    try {
      const data = new Uint8Array(await file.arrayBuffer());
      const result = await task({ type: "writefile", path: target, content_b64: toBase64(data) });
      const digest = await sha256Hex(data);
      if (digest && typeof result.sha256 === "string" && digest !== result.sha256.toLowerCase()) {
        throw new Error("the agent stored different data (SHA-256 mismatch); upload again");
      }
      progress("");
      await list(dir);
    } catch (err) {
      failed(`Cannot upload ${file.name}`, err);
    } finally {
      progress("");
    }
  }

  async function rename(entry) {
    const name = text(entry.name);
    const next = await promptDialog("Rename", "New name", name, { confirmLabel: "Rename",
      message: `Rename ${name} in ${dir}` });
    if (next === null || next === name) return;
    error.clear();
    if (/[\\/]/.test(next) || next === "." || next === "..") {
      error.show("A new name cannot contain / or \\ and cannot be . or ..");
      return;
    }
    if (entries.some((e) => text(e.name) === next)) {
      // movefile, like mv, would move the entry into an existing folder or replace a file.
      error.show(`${next} already exists in ${dir}. Choose another name, or delete it first.`);
      return;
    }
    progress(`Renaming ${name}…`);
    try {
      const from = pathOf(entry);
      await task({ type: "movefile", frompath: from, topath: joinPath(parentOf(from) ?? dir, next) });
      await list(dir);
    } catch (err) {
      failed(`Cannot rename ${name}`, err);
    } finally {
      progress("");
    }
  }

  async function remove(entry, button) {
    const name = text(entry.name);
    const what = entry.dir ? "folder" : "file";
    const ok = await confirmDialog(`Delete ${what}?`,
      `Delete the ${what} ${name} from ${dir} on ${agentName}? This cannot be undone.`,
      { confirmLabel: "Delete", danger: true });
    if (!ok) return;
    await busy(button, "Deleting…", async () => {
      error.clear();
      try {
        await task({ type: "deletefile", path: pathOf(entry) });
        await list(dir);
      } catch (err) {
        failed(`Cannot delete ${name}`, err);
      }
    });
  }
}

/** "/" on Unix; "" on Windows, where the agent answers with the list of drives. */
function defaultDir(agent) {
  const os = text(agent?.inventory?.os);
  return /windows/i.test(os) ? "" : "/";
}

function usesBackslash(path) {
  return /^[A-Za-z]:/.test(path) || (path.includes("\\") && !path.includes("/"));
}

function isRoot(path) {
  return path === "/" || path === "\\" || /^[A-Za-z]:[\\/]?$/.test(path);
}

export function joinPath(dir, name) {
  const sep = usesBackslash(dir) ? "\\" : "/";
  return /[\\/]$/.test(dir) ? dir + name : dir + sep + name;
}

/** The folder above path, or null at a root. Above a Windows drive is the drive list (""). */
export function parentOf(path) {
  let p = path;
  if (p === "" || p === "/" || p === "\\") return null;
  if (/^[A-Za-z]:[\\/]?$/.test(p)) return "";
  while (p.length > 1 && /[\\/]$/.test(p) && !isRoot(p)) p = p.slice(0, -1);
  if (isRoot(p)) return null;
  const i = Math.max(p.lastIndexOf("/"), p.lastIndexOf("\\"));
  if (i < 0) return null;
  const up = p.slice(0, i);
  if (up === "") return "/";
  if (/^[A-Za-z]:$/.test(up)) return `${up}\\`;
  return up;
}

function formatMtime(mtime) {
  if (typeof mtime === "number" && Number.isFinite(mtime)) {
    // Seconds since the epoch (as Python's os.stat), or milliseconds if already that big.
    return dateTime(new Date(mtime < 1e11 ? mtime * 1000 : mtime).toISOString());
  }
  return mtime ? dateTime(text(mtime)) : "";
}
