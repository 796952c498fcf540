// Formatting of numbers, sizes and times for display. Inputs come from agents and may have
// any type; every function here returns a plain string and never throws.

export function plural(n, one, many = `${one}s`) {
  return `${n} ${n === 1 ? one : many}`;
}

export function bytes(value) {
  const n = Number(value);
  if (!Number.isFinite(n) || n < 0) return value === undefined || value === null ? "" : String(value);
  const units = ["B", "KB", "MB", "GB", "TB", "PB"];
  let size = n;
  let unit = 0;
  while (size >= 1024 && unit < units.length - 1) {
    size /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${n} B` : `${size.toFixed(size < 10 ? 1 : 0)} ${units[unit]}`;
}

export function seconds(value) {
  const s = Number(value);
  if (!Number.isFinite(s)) return value === undefined || value === null ? "" : String(value);
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
  return span(s);
}

/** "3 d 4 h", "5 min 2 s": a long duration, two units at most. */
export function span(value) {
  let s = Math.floor(Number(value));
  if (!Number.isFinite(s)) return String(value);
  const parts = [];
  for (const [size, unit] of [[86400, "d"], [3600, "h"], [60, "min"], [1, "s"]]) {
    if (s >= size || (size === 1 && parts.length === 0)) {
      parts.push(`${Math.floor(s / size)} ${unit}`);
      s %= size;
    }
    if (parts.length === 2) break;
  }
  return parts.join(" ");
}

/** Parses an ISO time from the server; NaN when absent or unreadable. */
export function parseTime(iso) {
  return typeof iso === "string" ? Date.parse(iso) : NaN;
}

/** "just now", "12 s ago", "5 min ago", "3 h ago", then a date. nowMs is the server's clock. */
export function ago(iso, nowMs = Date.now()) {
  const t = parseTime(iso);
  if (Number.isNaN(t)) return "never";
  const s = Math.max(0, Math.round((nowMs - t) / 1000));
  if (s < 2) return "just now";
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return dateTime(iso);
}

/** A local date and time as "2026-11-23 14:05:09" (short, sortable, unambiguous), or "". */
export function dateTime(iso) {
  const t = parseTime(iso);
  if (Number.isNaN(t)) return iso ? String(iso) : "";
  const d = new Date(t);
  const two = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())} `
    + `${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}`;
}

/** Seconds between two ISO times, or "" when either is missing. */
export function between(startIso, endIso) {
  const a = parseTime(startIso);
  const b = parseTime(endIso);
  if (Number.isNaN(a) || Number.isNaN(b)) return "";
  return seconds((b - a) / 1000);
}

/** Any value as display text: strings as they are, the rest as compact JSON. */
export function text(value) {
  if (value === undefined || value === null) return "";
  if (typeof value === "string") return value;
  try {
    return JSON.stringify(value);
  } catch {
    return String(value);
  }
}

/** The first non-blank line of a text, shortened, for one-line previews. */
export function firstLine(value, max = 80) {
  const s = text(value);
  let start = 0;
  let line = "";
  // Walks line by line instead of splitting: outputs may be a megabyte long.
  while (start <= s.length) {
    let end = s.indexOf("\n", start);
    if (end < 0) end = s.length;
    line = s.slice(start, Math.min(end, start + max + 1)).replace(/\r$/, "");
    if (line.trim() !== "") break;
    line = "";
    start = end + 1;
  }
  return line.length > max ? `${line.slice(0, max - 1)}…` : line;
}
