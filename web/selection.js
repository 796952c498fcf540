// The agents picked for a broadcast. Shared by the dashboard (where they are picked) and the
// broadcast page (where they are used); kept in sessionStorage so a reload does not lose it.

const KEY = "dutserver.selection";
const listeners = new Set();
let names = load();

function load() {
  try {
    const saved = JSON.parse(sessionStorage.getItem(KEY) || "[]");
    return new Set(Array.isArray(saved) ? saved.filter((n) => typeof n === "string") : []);
  } catch {
    return new Set();
  }
}

function changed() {
  sessionStorage.setItem(KEY, JSON.stringify([...names]));
  for (const listener of listeners) listener();
}

export const selection = {
  has: (name) => names.has(name),
  get size() { return names.size; },
  list: () => [...names].sort(compareNames),
  set(name, on) {
    if (on === names.has(name)) return;
    if (on) names.add(name);
    else names.delete(name);
    changed();
  },
  setMany(list, on) {
    for (const name of list) {
      if (on) names.add(name);
      else names.delete(name);
    }
    changed();
  },
  replace(list) {
    names = new Set(list);
    changed();
  },
  clear() {
    names = new Set();
    changed();
  },
  /** Calls listener on every change; returns the function that unsubscribes it. */
  subscribe(listener) {
    listeners.add(listener);
    return () => listeners.delete(listener);
  },
};

const collator = new Intl.Collator(undefined, { numeric: true, sensitivity: "base" });
/** Natural order: pc-2 before pc-10. */
export const compareNames = (a, b) => collator.compare(a, b) || (a < b ? -1 : a > b ? 1 : 0);

/** The dashboard group of an agent: its name up to the first "-", as the classic client. */
export function groupOf(name) {
  const i = name.indexOf("-");
  return i > 0 ? name.slice(0, i) : "";
}

/** "" is the group of names without "-"; no real group can be called that. */
export const groupLabel = (key) => (key === "" ? "(no group)" : key);
