// The one place that talks to the server. The session token lives in sessionStorage (see
// session below) and travels only in the Authorization header, never in a URL.

const TOKEN_KEY = "dutserver.token";
const USER_KEY = "dutserver.user";

/**
 * sessionStorage rather than localStorage: the login ends when the tab or browser closes (a
 * forgotten login on a shared PC does not outlive it), and it is not shared with other tabs
 * or written to disk for later. Links opened in a new tab from the page inherit a copy.
 */
export const session = {
  get token() { return sessionStorage.getItem(TOKEN_KEY); },
  get user() { return sessionStorage.getItem(USER_KEY) || ""; },
  set(token, user) {
    sessionStorage.setItem(TOKEN_KEY, token);
    sessionStorage.setItem(USER_KEY, user);
  },
  clear() {
    sessionStorage.removeItem(TOKEN_KEY);
    sessionStorage.removeItem(USER_KEY);
  },
};

export class ApiError extends Error {
  constructor(status, message, body = null) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

/** Thrown after the server refused the session; the login screen is already showing. */
export class SessionExpired extends ApiError {}

let expiredHandler = () => {};

/** app.js registers what happens when the server says the session is gone. */
export function onSessionExpired(handler) {
  expiredHandler = handler;
}

/**
 * One request. path may carry a query string built with query(). Returns the parsed body
 * (JSON object, text, or null for an empty body). Throws ApiError with the server's message.
 * classic: the route is part 1 of the protocol, which answers 403 (not 401) to a bad session.
 */
export async function request(method, path, { body, signal, classic = false, auth = true,
  withDate = false } = {}) {
  const headers = {};
  if (auth) {
    const token = session.token;
    if (!token) {
      expire();
      throw new SessionExpired(401, "Not logged in");
    }
    headers.Authorization = token;
  }
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method, headers, signal, cache: "no-store", credentials: "omit",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    if (err && err.name === "AbortError") throw err;
    throw new ApiError(0, "Cannot reach the server. Check the connection and try again.");
  }
  const data = await readBody(response);
  if (auth && (response.status === 401 || (classic && response.status === 403))) {
    expire(headers.Authorization);
    throw new SessionExpired(response.status, "Your session expired, please log in again");
  }
  if (!response.ok) {
    const msg = data && typeof data === "object" && typeof data.msg === "string"
      ? data.msg : `The server answered ${response.status} ${response.statusText}`.trim();
    const err = new ApiError(response.status, msg, data);
    err.retryAfter = Number(response.headers.get("Retry-After")) || 0;
    throw err;
  }
  if (withDate) return { data, date: Date.parse(response.headers.get("Date") || "") };
  return data;
}

async function readBody(response) {
  const text = await response.text();
  if (!text) return null;
  if ((response.headers.get("Content-Type") || "").includes("json")) {
    try {
      return JSON.parse(text);
    } catch {
      return { msg: `Unreadable answer from the server (${response.status})` };
    }
  }
  return text;
}

/** Ends the session on purpose (own password changed, own account removed). */
export function endSession(message) {
  session.clear();
  expiredHandler(message);
}

let expiring = false;
function expire(tokenUsed = null) {
  // An old request answered after a new login must not end the new session.
  if (tokenUsed !== null && session.token !== tokenUsed) return;
  // Many requests in flight fail together; the login screen appears once.
  session.clear();
  if (expiring) return;
  expiring = true;
  queueMicrotask(() => {
    expiring = false;
    expiredHandler();
  });
}

/** Builds "?a=1&b=2" from an object, skipping empty values. */
export function query(params) {
  const q = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value === undefined || value === null || value === "") continue;
    q.set(key, String(value));
  }
  const s = q.toString();
  return s ? `?${s}` : "";
}

const enc = encodeURIComponent;

// --- sessions ---------------------------------------------------------------------------

/** POST with a JSON body, so the password never appears in a URL or a server log. */
export async function login(user, pass) {
  const data = await request("POST", "/login", { body: { user, pass }, auth: false });
  session.set(data.token, user);
  return data;
}

export async function logout() {
  const token = session.token;
  session.clear();
  if (!token) return;
  // Best effort: the token is forgotten here whatever the server says.
  await fetch("/logout", { method: "POST", headers: { Authorization: token } }).catch(() => {});
}

export const whoami = () => request("GET", "/api/v1/session");

// --- agents -----------------------------------------------------------------------------

export const listAgents = () =>
  request("GET", "/api/v1/agents?inventory=0", { withDate: true });
export const getAgent = (name) => request("GET", `/api/v1/agents/${enc(name)}`);

/**
 * Runs one task on one agent and waits for its result (classic blocking submit). The server
 * cancels the task if we stop waiting (abort) before the agent took it.
 */
export async function runTask(target, task, timeoutS, signal) {
  return request("POST", `/tasks${query({ target, timeout: timeoutS })}`,
    { body: task, signal, classic: true });
}

// --- tasks ------------------------------------------------------------------------------

export const submitTasks = (targets, task, expiresS) =>
  request("POST", "/api/v1/tasks", { body: { targets, task, expires_s: expiresS } });
export const listTasks = (filters) => request("GET", `/api/v1/tasks${query(filters)}`);
export const getTasksByIds = (ids) =>
  request("GET", `/api/v1/tasks${query({ ids: ids.join(","), limit: ids.length })}`);
export const cancelTask = (id) => request("POST", `/api/v1/tasks/${enc(id)}/cancel`);

// --- administration ---------------------------------------------------------------------

export const listAccounts = () => request("GET", "/api/v1/accounts");
export const createAccount = (name, type, password) =>
  request("POST", "/api/v1/accounts", { body: { name, type, password } });
export const setPassword = (name, password) =>
  request("POST", `/api/v1/accounts/${enc(name)}/password`, { body: { password } });
export const removeAccount = (name) => request("DELETE", `/api/v1/accounts/${enc(name)}`);
export const listAudit = (filters) => request("GET", `/api/v1/audit${query(filters)}`);

export async function getSelfRegistration() {
  const text = await request("GET", "/agent_selfreg", { classic: true });
  return String(text).trim() === "1";
}
export const setSelfRegistration = (enabled) =>
  request("POST", `/agent_selfreg?enabled=${enabled ? 1 : 0}`, { classic: true });

// --- enrollment -------------------------------------------------------------------------

/** Requests to join, newest first, with the number pending; filters: state, kind. */
export const listEnrollments = (filters = {}) =>
  request("GET", `/api/v1/enrollments${query(filters)}`, { withDate: true });
/** body: {} or { name, labels }; an empty body takes the name the machine proposed. */
export const acceptEnrollment = (id, body = {}) =>
  request("POST", `/api/v1/enrollments/${enc(id)}/accept`, { body });
export const rejectEnrollment = (id) => request("POST", `/api/v1/enrollments/${enc(id)}/reject`);
export const listEnrollTokens = () => request("GET", "/api/v1/enrollment-tokens");
/** { expires_s, max_uses (null: unlimited), labels, auto_accept, note } → the token, once. */
export const createEnrollToken = (body) =>
  request("POST", "/api/v1/enrollment-tokens", { body });
export const revokeEnrollToken = (id) =>
  request("DELETE", `/api/v1/enrollment-tokens/${enc(id)}`);
export const revokeAgent = (name) => request("POST", `/api/v1/agents/${enc(name)}/revoke`);
export const rekeyAgent = (name) => request("POST", `/api/v1/agents/${enc(name)}/rekey`);
export const setAgentLabels = (name, labels) =>
  request("PUT", `/api/v1/agents/${enc(name)}/labels`, { body: { labels } });

// --- fleet jobs -------------------------------------------------------------------------

/** Jobs, newest first; filters: state, before_id, limit. */
export const listJobs = (filters = {}) =>
  request("GET", `/api/v1/jobs${query(filters)}`, { withDate: true });
export const getJob = (id) => request("GET", `/api/v1/jobs/${enc(id)}`, { withDate: true });
/** { task, targets | selector, offline, expires_s, canary, wave, pause_s, max_failures, nonzero_fails } */
export const createJob = (body) => request("POST", "/api/v1/jobs", { body });
/** One page of a job's targets, by agent name: after the name given. */
export const jobTargets = (id, after, limit) =>
  request("GET", `/api/v1/jobs/${enc(id)}/targets${query({ after, limit })}`);
export const jobBuckets = (id, { normalize = true, digits = false } = {}) =>
  request("GET", `/api/v1/jobs/${enc(id)}/buckets${query({
    normalize: normalize ? 1 : 0, digits: digits ? 1 : 0 })}`);
/** action: pause, resume, continue or abort (409 when the job's state does not allow it). */
export const jobAction = (id, action) => request("POST", `/api/v1/jobs/${enc(id)}/${action}`);
/** body: { bucket: N } or { failed: true } → a new job. */
export const rerunJob = (id, body) => request("POST", `/api/v1/jobs/${enc(id)}/rerun`, { body });
/** The agents a selector matches now ({agents, count}); 400 with where it is malformed. */
export const previewSelector = (selector, type, signal) =>
  request("GET", `/api/v1/selector${query({ selector, type })}`, { signal });

// --- schedules --------------------------------------------------------------------------

export const listSchedules = () => request("GET", "/api/v1/schedules", { withDate: true });
/** action: enable or disable (409 when it is so already). */
export const switchSchedule = (id, action) =>
  request("POST", `/api/v1/schedules/${enc(id)}/${action}`);
export const deleteSchedule = (id) => request("DELETE", `/api/v1/schedules/${enc(id)}`);
