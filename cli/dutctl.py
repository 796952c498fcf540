#!/usr/bin/env python3
"""dutctl: the terminal client of dutserver, for administrators and scripts.

One file, standard library only (Python >= 3.9), so it can be copied anywhere.

    dutctl login URL --user NAME          password on stdin (prompted without echo on a terminal)
                                          URL: one server, or a fleet's nodes as URL1,URL2
    dutctl agents                         name, online, last seen, version
    dutctl agents pending                 machines waiting to join (enrollment requests)
    dutctl agents accept|reject NAME_OR_ID…   decide on pending requests
    dutctl agents revoke|rekey NAME…      end an agent's credential / have it make a new one
    dutctl agents adopt NAME              make an existing agent account an enrolled identity
    dutctl agents label NAME k=v… [k-]    set (or remove) an agent's labels
    dutctl tokens [list]                  enrollment tokens
    dutctl tokens create [--expires 1d] [--uses N|--unlimited] [--label k=v] [--auto-accept]
    dutctl tokens revoke ID
    dutctl run TARGETS -- COMMAND         run a shell command, wait for the results, summarise them
    dutctl task TYPE TARGETS key=value …  any task type
    dutctl history [ID]                   past tasks, newest first, or one task in full
    dutctl selfreg [on|off]               agent self-registration switch
    dutctl job run (--selector SEL | AGENT…) [--canary N] [--wave N|P%] [--pause S|manual]
               [--max-failures N|P%] [--offline queue|skip] (--cmd CMD | -- TYPE key=value…)
    dutctl job list|show ID [--follow]|pause|resume|continue|abort|rerun|buckets|targets
    dutctl schedule add (--cron EXPR | --at TIME | --every S) …job run's options…
    dutctl schedule list|rm ID…|enable ID|disable ID
    dutctl select SELECTOR                which agents a selector matches now
    dutctl batch [FILE.json]              several submits, stored all or none (stdin without FILE)
    dutctl logout

TARGETS: agent names, a comma list, `group:PREFIX` (agents whose name before the first `-` is PREFIX),
`all` (the agents online now). `--json` (anywhere) prints exactly one JSON document on stdout.

Exit status: 0 success; 1 a target failed, exited non-zero or timed out; 2 usage error or unknown
agent; 3 not logged in, session expired, bad login or permission denied; 4 server unreachable or
answering unexpectedly; 130 interrupted.
"""

from __future__ import annotations

import argparse
import getpass
import http.client
import json
import math
import os
import re
import shutil
import signal
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

__version__ = "1.0.0"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_SERVER = 4
EXIT_INTERRUPTED = 130

DEFAULT_WAIT_S = 30.0
DEFAULT_REQUEST_TIMEOUT_S = 15.0
# Cancelling and collecting what is left after the wait ran out must not be cut short by that same
# deadline, or queued tasks would stay queued behind a user who already gave up.
CLEANUP_TIMEOUT_S = 5.0
# The server answers at most this many ids per GET /api/v1/tasks?ids=….
IDS_PER_QUERY = 1000
MAX_POLL_INTERVAL_S = 0.5
MAX_WAIT_PARAM_S = 60.0
PROGRESS_TICK_S = 1.0
NAMES_SHOWN_PER_GROUP = 20
FINAL_STATES = frozenset({"done", "failed", "cancelled", "expired"})
# Fields the protocol adds to a result; they differ per agent and carry no information of their own.
BOOKKEEPING_FIELDS = ("id", "error", "target")


class CtlError(Exception):
    """A failure explained to the user in one line, with the exit status it maps to."""

    def __init__(self, msg: str, exit_code: int) -> None:
        super().__init__(msg)
        self.msg = msg
        self.exit_code = exit_code


class Interrupted(Exception):
    """Raised from the SIGTERM handler so `timeout dutctl …` cleans up as Ctrl-C does."""


# ---------------------------------------------------------------------------------------------
# Session storage
# ---------------------------------------------------------------------------------------------

@dataclass
class Session:
    url: str
    token: str
    user: str = ""
    expires_at: str | None = None
    cacert: str | None = None


def config_file() -> Path:
    """$DUTCTL_CONFIG, else $XDG_CONFIG_HOME/dutctl/session.json, else ~/.config/dutctl/session.json."""
    explicit = os.environ.get("DUTCTL_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    # The XDG spec says a relative XDG_CONFIG_HOME is invalid and must be ignored.
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".config"
    return base / "dutctl" / "session.json"


def save_session(session: Session) -> Path:
    path = config_file()
    owned_dir = not os.environ.get("DUTCTL_CONFIG")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if owned_dir:
        # Only the dutctl directory is ours to tighten; a directory named by DUTCTL_CONFIG is the user's.
        os.chmod(path.parent, 0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # Created 0600 from the first byte (O_EXCL, explicit mode), then renamed into place, so the token
    # is never readable by others, not even for a moment, and a crash never leaves half a file.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(session.__dict__, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_session() -> Session | None:
    path = config_file()
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CtlError(f"cannot read the session file {path}: {e.strerror}", EXIT_AUTH) from e
    try:
        data = json.loads(raw)
        session = Session(**{k: data[k] for k in Session.__dataclass_fields__ if k in data})
    except (ValueError, TypeError, KeyError) as e:
        raise CtlError(f"the session file {path} is damaged; run `dutctl login` again", EXIT_AUTH) from e
    if os.name == "posix" and path.stat().st_mode & 0o077:
        warn(f"{path} was readable by other users; made it private (mode 0600)")
        os.chmod(path, 0o600)
    return session


def remove_session() -> bool:
    try:
        config_file().unlink()
        return True
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------

def normalise_url(url: str) -> str:
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise CtlError(f"not a server URL: {url!r} (expected http://HOST:PORT or https://…)",
                       EXIT_USAGE)
    return url.rstrip("/")


def normalise_urls(text: str) -> str:
    """A server URL, or the comma list of a fleet's nodes (`URL1,URL2`), each one normalised."""
    urls: list[str] = []
    for item in text.split(","):
        if item.strip():
            url = normalise_url(item)
            if url not in urls:
                urls.append(url)
    if not urls:
        raise CtlError(f"not a server URL: {text!r} (expected http://HOST:PORT or https://…)",
                       EXIT_USAGE)
    return ",".join(urls)


@dataclass
class Answer:
    status: int
    data: Any
    headers: Any


class NotSent(Exception):
    """The request never reached the server (no connection): safe to send to another node."""


class Client:
    """Talks to a server; turns every transport or protocol failure into a one-line CtlError.

    `url` may list several nodes of one fleet (`URL1,URL2`): the client uses the first that
    answers, and moves on to the next for the rest of the command when one is unreachable or
    answers 5xx. A session token is valid on every node.
    """

    def __init__(self, url: str, token: str | None = None, cacert: str | None = None) -> None:
        self.urls = [u for u in url.split(",") if u] or [url]
        self.index = 0
        self.token = token
        try:
            self.ssl_context = ssl.create_default_context(cafile=cacert) if cacert else None
        except (OSError, ssl.SSLError) as e:
            raise CtlError(f"cannot use the CA certificate {cacert}: {e}", EXIT_USAGE) from e

    @property
    def url(self) -> str:
        """The node in use."""
        return self.urls[self.index]

    def send(self, method: str, path: str, *, query: dict[str, Any] | None = None,
             body: Any = None, timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S) -> Answer:
        # A submit that may have reached a node is not sent again (it could run twice);
        # every other request is safe to repeat on another node.
        # (A job, a re-run and a batch are submits too.)
        repeatable = not (method == "POST" and (
            path in ("/api/v1/tasks", "/api/v1/jobs", "/api/v1/batches", "/api/v1/schedules")
            or path.endswith("/rerun")))
        for attempt in range(len(self.urls)):
            last = attempt == len(self.urls) - 1
            url = self.url
            try:
                answer = self._send_once(url, method, path, query, body, timeout_s)
            except NotSent as e:
                error = self.unreachable(e.args[0], timeout_s)
                if last:
                    raise error from e.__cause__
                self._move_on(error.msg)
                continue
            except CtlError as e:
                if last or not repeatable:
                    raise
                self._move_on(e.msg)
                continue
            if answer.status >= 500 and not last:
                self._move_on(f"{url} answered HTTP {answer.status}")
                continue
            return answer
        raise AssertionError("unreachable")

    def _move_on(self, why: str) -> None:
        """The node in use failed: the next one serves the rest of the command."""
        self.index = (self.index + 1) % len(self.urls)
        warn(f"{why}; trying {self.url}")

    def _send_once(self, base_url: str, method: str, path: str, query: dict[str, Any] | None,
                   body: Any, timeout_s: float) -> Answer:
        url = base_url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        headers = {"Accept": "application/json", "User-Agent": f"dutctl/{__version__}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        timeout_s = max(timeout_s, 0.05)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s, context=self.ssl_context) as resp:
                return Answer(resp.status, parse_body(resp.read()), resp.headers)
        except urllib.error.HTTPError as e:
            with e:
                return Answer(e.code, parse_body(e.read()), e.headers)
        except urllib.error.URLError as e:
            # urllib raises URLError for what fails while connecting and sending the request.
            raise NotSent(e.reason) from e
        except (OSError, http.client.HTTPException) as e:
            raise self.unreachable(e, timeout_s) from e

    def unreachable(self, reason: Any, timeout_s: float) -> CtlError:
        where = f"the server at {self.url}"
        if isinstance(reason, ssl.SSLCertVerificationError):
            return CtlError(f"{where} presented a certificate that is not trusted "
                            f"({reason.verify_message}); log in with --cacert FILE", EXIT_SERVER)
        if isinstance(reason, (socket.timeout, TimeoutError)):
            return CtlError(f"{where} did not answer within {timeout_s:g} s", EXIT_SERVER)
        if isinstance(reason, ConnectionRefusedError):
            return CtlError(f"cannot reach {where}: connection refused (is dutserver running?)",
                            EXIT_SERVER)
        if isinstance(reason, socket.gaierror):
            host = urllib.parse.urlsplit(self.url).hostname
            return CtlError(f"cannot reach {where}: unknown host {host}", EXIT_SERVER)
        text = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
        return CtlError(f"cannot reach {where}: {text}", EXIT_SERVER)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """A request that must succeed: returns the decoded body, raises a CtlError otherwise."""
        answer = self.send(method, path, **kwargs)
        if 200 <= answer.status < 300:
            if path.startswith("/api/") and not isinstance(answer.data, dict):
                raise self.unexpected(answer, path)
            return answer.data
        raise self.failure(answer, path)

    def failure(self, answer: Answer, path: str) -> CtlError:
        msg = server_msg(answer.data)
        if answer.status == 401:
            return CtlError("the session has expired or was logged out; run `dutctl login`", EXIT_AUTH)
        if answer.status == 403:
            return CtlError(f"permission denied{': ' + msg if msg else ''}", EXIT_AUTH)
        if answer.status == 429:
            return CtlError(banned_message(answer), EXIT_AUTH)
        if msg is None:
            return self.unexpected(answer, path)
        if 400 <= answer.status < 500 and answer.status not in (408, 409):
            return CtlError(msg, EXIT_USAGE)
        return CtlError(f"the server answered HTTP {answer.status}: {msg}", EXIT_SERVER)

    def unexpected(self, answer: Answer, path: str) -> CtlError:
        return CtlError(f"unexpected answer from {self.url}{path} (HTTP {answer.status}); "
                        f"is {self.url} a dutserver?", EXIT_SERVER)


def parse_body(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


def server_msg(data: Any) -> str | None:
    if isinstance(data, dict) and isinstance(data.get("msg"), str):
        return str(data["msg"])
    return None


def banned_message(answer: Answer) -> str:
    retry = answer.headers.get("Retry-After") if answer.headers else None
    when = f"; try again in {retry} s" if retry else "; try again later"
    return f"too many failed logins from this address{when}"


def session_client(args: argparse.Namespace | None = None) -> Client:
    """A client for the stored session, or for DUTCTL_URL + DUTCTL_TOKEN when both are set;
    --server names other nodes (of the same fleet) to use the token with."""
    server = getattr(args, "server", None)
    env_token = os.environ.get("DUTCTL_TOKEN")
    session = load_session()
    if env_token:
        url = server or os.environ.get("DUTCTL_URL") or (session.url if session else None)
        if not url:
            raise CtlError("DUTCTL_TOKEN is set but no server URL: set DUTCTL_URL too", EXIT_USAGE)
        return Client(normalise_urls(url), env_token, os.environ.get("DUTCTL_CACERT"))
    if session is None:
        raise CtlError("not logged in; run `dutctl login URL --user NAME`", EXIT_AUTH)
    url = normalise_urls(server) if server else session.url
    return Client(url, session.token, os.environ.get("DUTCTL_CACERT") or session.cacert)


# ---------------------------------------------------------------------------------------------
# Output helpers
# ---------------------------------------------------------------------------------------------

def warn(msg: str) -> None:
    print(f"dutctl: {msg}", file=sys.stderr)


def emit_json(doc: dict[str, Any]) -> None:
    json.dump(doc, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        # fromisoformat() before Python 3.11 does not take a trailing Z.
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))  # noqa: FURB162
    except ValueError:
        return None
    # timezone.utc, not datetime.UTC: dutctl also runs on Python 3.9 and 3.10.
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)  # noqa: UP017


def local_time(value: Any) -> str:
    parsed = parse_time(value)
    return parsed.astimezone().strftime("%Y-%m-%d %H:%M:%S") if parsed else "-"


def time_ago(value: Any, now: datetime | None = None) -> str:
    parsed = parse_time(value)
    if parsed is None:
        return "never"
    seconds = ((now or datetime.now(timezone.utc)) - parsed).total_seconds()  # noqa: UP017
    if seconds < 2:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    # Cells may hold what agents sent (names, messages): never an escape sequence, raw.
    rows = [[safe(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        print("  ".join(cells).rstrip())


def shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def name_list(names: list[str]) -> str:
    shown = ", ".join(names[:NAMES_SHOWN_PER_GROUP])
    hidden = len(names) - NAMES_SHOWN_PER_GROUP
    return shown + (f", … (+{hidden} more; --json lists all)" if hidden > 0 else "")


class Progress:
    """One self-rewriting status line on a terminal's stderr; silent when stderr is not a terminal."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.enabled = sys.stderr.isatty()
        self.started = time.monotonic()
        self.shown = False

    def update(self, outcomes: Iterable[Outcome]) -> None:
        if not self.enabled:
            return
        counts: dict[str, int] = {}
        done = 0
        for outcome in outcomes:
            counts[outcome.outcome] = counts.get(outcome.outcome, 0) + 1
            done += 1
        parts = [f"{done}/{self.total} answered"]
        parts += [f"{n} {kind.replace('_', ' ')}" for kind, n in sorted(counts.items())]
        parts.append(f"{time.monotonic() - self.started:.1f} s")
        sys.stderr.write("\r\x1b[K" + " · ".join(parts))
        sys.stderr.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self.shown = False


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------

def group_of(name: str) -> str:
    """An agent's group is its name up to the first `-`, as in the classic web client."""
    return name.split("-", 1)[0]


def resolve_targets(spec: str, agents: list[dict[str, Any]]) -> list[str]:
    """Expands names, comma lists, group:PREFIX and all (online agents) into agent names, in order."""
    known = sorted(str(a["name"]) for a in agents)
    known_set = set(known)
    online = {str(a["name"]) for a in agents if a.get("online")}
    chosen: dict[str, None] = {}  # an ordered set: first mention wins, duplicates collapse
    unknown: list[str] = []
    words = [w.strip() for w in spec.split(",") if w.strip()]
    if not words:
        raise CtlError("no targets given", EXIT_USAGE)
    for word in words:
        if word == "all":
            members = [n for n in known if n in online]
        elif word.startswith("group:"):
            prefix = word[len("group:"):]
            members = [n for n in known if group_of(n) == prefix]
            if not members:
                unknown.append(word)
        elif word in known_set:
            members = [word]
        else:
            members = []
            unknown.append(word)
        chosen.update(dict.fromkeys(members))
    if unknown:
        noun = "agent or group" if len(unknown) == 1 else "agents or groups"
        raise CtlError(f"unknown {noun}: {', '.join(unknown)}", EXIT_USAGE)
    if not chosen:
        raise CtlError("no agent is online, so `all` matches nothing", EXIT_USAGE)
    return list(chosen)


def fetch_agents(client: Client, timeout_s: float) -> list[dict[str, Any]]:
    data = client.call("GET", "/api/v1/agents", query={"inventory": "0"}, timeout_s=timeout_s)
    agents = data.get("agents")
    if not isinstance(agents, list):
        raise client.unexpected(Answer(200, data, None), "/api/v1/agents")
    return sorted((a for a in agents if isinstance(a, dict)), key=lambda a: str(a.get("name")))


# ---------------------------------------------------------------------------------------------
# Submitting tasks and watching their results
# ---------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    """What became of one target's task, as the user should hear it."""

    target: str
    task_id: int | None
    state: str
    outcome: str  # ok | failed | timed_out | cancelled | expired | interrupted
    exit_code: int | None = None
    msg: str | None = None
    result: dict[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def classify(task: dict[str, Any], task_type: str) -> Outcome:
    """Turns a task in a final state into an Outcome; a non-zero exit of a command is a failure."""
    state = str(task.get("state"))
    result = task.get("result") if isinstance(task.get("result"), dict) else None
    outcome = Outcome(str(task.get("target")), task.get("id"), state, "failed", result=result)
    if state == "done" and result is not None and not result.get("error"):
        code = result.get("status_code")
        if task_type == "execute_cmd" and isinstance(code, int):
            outcome.exit_code = code
            outcome.outcome = "ok" if code == 0 else "failed"
        else:
            outcome.outcome = "ok"
    elif state in ("done", "failed"):
        outcome.msg = server_msg(result) or "the agent sent no result"
    elif state in ("cancelled", "expired"):
        outcome.outcome = state
        outcome.msg = server_msg(result) or f"the task was {state} before an agent took it"
    return outcome


@dataclass
class Batch:
    """Tasks submitted together, and which of their agents were offline when they were sent."""

    client: Client
    task_type: str
    targets: dict[int, str]  # task id -> agent name
    offline: set[str]


def submit(client: Client, targets: list[str], task: dict[str, Any],
           expires_s: float | None, timeout_s: float) -> dict[int, str]:
    body: dict[str, Any] = {"targets": targets, "task": task}
    if expires_s is not None:
        body["expires_s"] = math.ceil(expires_s)
    data = client.call("POST", "/api/v1/tasks", body=body, timeout_s=timeout_s)
    try:
        return {int(t["id"]): str(t["target"]) for t in data["tasks"]}
    except (KeyError, TypeError, ValueError) as e:
        raise client.unexpected(Answer(202, data, None), "/api/v1/tasks") from e


def fetch_tasks(client: Client, ids: list[int], timeout_s: float) -> dict[int, dict[str, Any]]:
    found: dict[int, dict[str, Any]] = {}
    for start in range(0, len(ids), IDS_PER_QUERY):
        chunk = ids[start:start + IDS_PER_QUERY]
        query = {"ids": ",".join(map(str, chunk)), "limit": len(chunk)}
        data = client.call("GET", "/api/v1/tasks", query=query, timeout_s=timeout_s)
        for task in data.get("tasks") or []:
            if isinstance(task, dict) and isinstance(task.get("id"), int):
                found[task["id"]] = task
    return found


def wait_for_one(client: Client, task_id: int, wait_s: float) -> dict[str, Any] | None:
    """Long-polls one task, so a single target's result shows the moment it arrives."""
    wait_s = min(MAX_WAIT_PARAM_S, max(0.01, wait_s))
    data = client.call("GET", f"/api/v1/tasks/{task_id}", query={"wait_s": f"{wait_s:.3f}"},
                       timeout_s=wait_s + DEFAULT_REQUEST_TIMEOUT_S)
    task = data.get("task")
    return task if isinstance(task, dict) else None


def watch(batch: Batch, deadline: float, progress: Progress) -> tuple[dict[int, Outcome], bool]:
    """Collects results until all are final or the deadline passes; then cancels what is still queued.

    Returns the outcomes by task id and whether the wait was interrupted (Ctrl-C, SIGTERM).
    """
    client = batch.client
    pending = dict(batch.targets)
    finished: dict[int, Outcome] = {}
    interrupted = False
    interval_s = 0.02
    try:
        while pending:
            remaining = deadline - time.monotonic()
            if len(pending) == 1 and remaining > 0:
                (task_id,) = pending
                found = {}
                # On a terminal, come back every second so the progress line's clock moves.
                longest_s = PROGRESS_TICK_S if progress.enabled else MAX_WAIT_PARAM_S
                task = wait_for_one(client, task_id, min(remaining, longest_s))
                if task is not None:
                    found[task_id] = task
            else:
                found = fetch_tasks(client, list(pending), max(remaining, CLEANUP_TIMEOUT_S))
            for task_id, task in found.items():
                if task.get("state") in FINAL_STATES and task_id in pending:
                    pending.pop(task_id)
                    finished[task_id] = classify(task, batch.task_type)
            progress.update(finished.values())
            remaining = deadline - time.monotonic()
            if not pending or remaining <= 0:
                break
            if len(pending) > 1:
                time.sleep(min(interval_s, remaining))
                interval_s = min(interval_s * 1.5, MAX_POLL_INTERVAL_S)
    except (KeyboardInterrupt, Interrupted):
        interrupted = True
    finally:
        progress.clear()
    if pending:
        finished.update(give_up(batch, list(pending), interrupted))
    return finished, interrupted


def give_up(batch: Batch, task_ids: list[int], interrupted: bool) -> dict[int, Outcome]:
    """Cancels the tasks no agent took yet, so none runs after the user stopped waiting."""
    client = batch.client
    kind = "interrupted" if interrupted else "timed_out"
    stopped = "dutctl was interrupted" if interrupted else "the wait ran out"
    outcomes: dict[int, Outcome] = {}
    taken: list[int] = []
    for task_id in task_ids:
        target = batch.targets[task_id]
        answer = client.send("POST", f"/api/v1/tasks/{task_id}/cancel", timeout_s=CLEANUP_TIMEOUT_S)
        if answer.status == 200:
            why = ("the agent was offline" if target in batch.offline
                   else "the agent had not picked the task up")
            outcomes[task_id] = Outcome(target, task_id, "cancelled", kind,
                                        msg=f"{why} when {stopped}; the task was cancelled")
        elif answer.status == 409:
            taken.append(task_id)  # delivered meanwhile, or even finished
        else:
            raise client.failure(answer, f"/api/v1/tasks/{task_id}/cancel")
    latest = fetch_tasks(client, taken, CLEANUP_TIMEOUT_S)
    for task_id in taken:
        task = latest.get(task_id, {})
        if task.get("state") in FINAL_STATES:
            outcomes[task_id] = classify(task, batch.task_type)
        else:
            msg = (f"still running on the agent when {stopped}; "
                   f"`dutctl history {task_id}` shows its result later")
            outcomes[task_id] = Outcome(batch.targets[task_id], task_id,
                                        str(task.get("state", "delivered")), kind, msg=msg)
    return outcomes


# ---------------------------------------------------------------------------------------------
# Presenting results
# ---------------------------------------------------------------------------------------------

OUTCOME_RANK = {"ok": 0, "failed": 1, "timed_out": 2, "interrupted": 3, "cancelled": 4, "expired": 5}


def label_of(outcome: Outcome) -> str:
    if outcome.exit_code is not None:
        return f"exit {outcome.exit_code}"
    return {"ok": "ok", "failed": "error", "timed_out": "timed out"}.get(
        outcome.outcome, outcome.outcome)


def content_of(outcome: Outcome, task_type: str) -> str:
    """The text shown for a result; two targets with the same label and content share one section."""
    if outcome.exit_code is not None and outcome.result is not None:
        return command_text(outcome.result)
    if outcome.outcome == "ok" and outcome.result is not None:
        shown = {k: v for k, v in outcome.result.items() if k not in BOOKKEEPING_FIELDS}
        return json.dumps(shown, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    return (outcome.msg or "") + "\n"


def command_text(result: dict[str, Any]) -> str:
    out = str(result.get("output") or "")
    err = str(result.get("stderr") or "")
    text = out if not out or out.endswith("\n") else out + "\n"
    if err:
        text += "--- stderr\n" + err + ("" if err.endswith("\n") else "\n")
    if result.get("truncated"):
        text += "[output truncated by the agent]\n"
    return text or "(no output)\n"


@dataclass
class Group:
    label: str
    outcome: str
    exit_code: int | None
    sections: dict[str, list[str]] = field(default_factory=dict)  # content -> target names

    @property
    def targets(self) -> list[str]:
        return [name for names in self.sections.values() for name in names]


def group_outcomes(outcomes: list[Outcome], task_type: str) -> list[Group]:
    groups: dict[str, Group] = {}
    for outcome in outcomes:
        label = label_of(outcome)
        group = groups.setdefault(label, Group(label, outcome.outcome, outcome.exit_code))
        group.sections.setdefault(content_of(outcome, task_type), []).append(outcome.target)
    return sorted(groups.values(), key=lambda g: (OUTCOME_RANK.get(g.outcome, 9),
                                                  -len(g.targets), g.exit_code or 0, g.label))


def print_summary(outcomes: list[Outcome], task_type: str) -> None:
    groups = group_outcomes(outcomes, task_type)
    word = "output" if task_type == "execute_cmd" else "result"
    for group in groups:
        count = len(group.targets)
        line = f"{plural(count, 'agent')}: {group.label}"
        if count > 1:
            distinct = len(group.sections)
            noun = word if group.outcome == "ok" or group.exit_code is not None else "message"
            line += f", same {noun}" if distinct == 1 else f", {distinct} different {noun}s"
        print(line)
    for group in groups:
        for content, names in sorted(group.sections.items(), key=lambda s: -len(s[1])):
            who = name_list(names) if len(names) == 1 else f"{len(names)} agents: {name_list(names)}"
            print(f"\n=== {group.label} · {who}")
            sys.stdout.write(for_terminal(content))


def print_single(outcome: Outcome, task_type: str) -> None:
    """One target: the result itself, as ssh would show it, so `$(dutctl run pc1 -- cmd)` just works."""
    result = outcome.result or {}
    if outcome.exit_code is not None:
        sys.stdout.write(for_terminal(str(result.get("output") or "")))
        sys.stdout.flush()
        err = str(result.get("stderr") or "")
        sys.stderr.write(safe(err) if sys.stderr.isatty() else err)
        if result.get("truncated"):
            warn(f"{outcome.target}: output truncated by the agent")
        if outcome.exit_code != 0:
            warn(f"{outcome.target}: command exited with status {outcome.exit_code}")
    elif outcome.outcome == "ok":
        sys.stdout.write(for_terminal(content_of(outcome, task_type)))
    else:
        warn(f"{outcome.target}: {label_of(outcome)}: {safe(outcome.msg)}")


def run_task(args: argparse.Namespace, target_spec: str, task: dict[str, Any]) -> int:
    wait_s = args.timeout if args.timeout is not None else DEFAULT_WAIT_S
    deadline = time.monotonic() + wait_s
    client = session_client(args)
    agents = fetch_agents(client, DEFAULT_REQUEST_TIMEOUT_S)
    targets = resolve_targets(target_spec, agents)
    if args.no_wait:
        ids = submit(client, targets, task, args.expires, DEFAULT_REQUEST_TIMEOUT_S)
        rows = [{"id": task_id, "target": target} for task_id, target in ids.items()]
        if args.json:
            emit_json({"error": False, "task": task, "tasks": rows})
        else:
            for row in rows:
                print(f"{row['id']}\t{row['target']}")
        return EXIT_OK
    # No default expiry: the server also fails a delivered task at its expiry, so a short one would
    # throw away the result of a long command; tasks left queued at the deadline are cancelled instead.
    batch = Batch(client, task["type"], submit(client, targets, task, args.expires,
                                               DEFAULT_REQUEST_TIMEOUT_S),
                  offline={str(a["name"]) for a in agents if not a.get("online")})
    finished, interrupted = watch(batch, deadline, Progress(len(batch.targets)))
    order = {name: i for i, name in enumerate(targets)}
    outcomes = sorted(finished.values(), key=lambda o: order.get(o.target, len(order)))
    all_ok = all(o.outcome == "ok" for o in outcomes)
    if args.json:
        groups = group_outcomes(outcomes, task["type"])
        counts = {kind: sum(o.outcome == kind for o in outcomes) for kind in OUTCOME_RANK}
        emit_json({
            "error": False, "ok": all_ok, "interrupted": interrupted, "task": task,
            "summary": {"targets": len(outcomes), **counts},
            "groups": [{"label": g.label, "outcome": g.outcome, "exit_code": g.exit_code,
                        "count": len(g.targets), "distinct": len(g.sections), "targets": g.targets}
                       for g in groups],
            "results": [o.as_json() for o in outcomes],
        })
    elif len(outcomes) == 1:
        print_single(outcomes[0], task["type"])
    else:
        print_summary(outcomes, task["type"])
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if all_ok else EXIT_FAILED


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------

def read_password(user: str, url: str) -> str:
    if sys.stdin.isatty():
        try:
            return getpass.getpass(f"Password for {user} at {url}: ")
        except EOFError:
            return ""
    line = sys.stdin.readline()
    return line.rstrip("\r\n")


def cmd_login(args: argparse.Namespace) -> int:
    previous = load_session()
    url = (args.url or args.server or os.environ.get("DUTCTL_URL")
           or (previous.url if previous else None))
    if not url:
        raise CtlError("which server? run `dutctl login URL --user NAME`", EXIT_USAGE)
    url = normalise_urls(url)
    user = args.user or (previous.user if previous and previous.url == url else None)
    if not user:
        raise CtlError("which account? add --user NAME", EXIT_USAGE)
    cacert = args.cacert or os.environ.get("DUTCTL_CACERT")
    if cacert is None and previous and previous.url == url:
        cacert = previous.cacert
    if cacert:
        cacert = str(Path(cacert).expanduser().resolve())
    password = read_password(user, url)
    if not password:
        raise CtlError("no password given (dutctl reads it from stdin)", EXIT_USAGE)
    timeout_s = args.timeout or DEFAULT_REQUEST_TIMEOUT_S
    client = Client(url, None, cacert)
    # A POST body keeps the password out of URLs, and so out of proxy and server access logs.
    answer = client.send("POST", "/login", body={"user": user, "pass": password}, timeout_s=timeout_s)
    if answer.status == 403:
        raise CtlError(f"login failed: wrong user name or password for {user} at {url}", EXIT_AUTH)
    if answer.status != 200:
        raise client.failure(answer, "/login")
    token = answer.data.get("token") if isinstance(answer.data, dict) else None
    if not isinstance(token, str) or not token:
        raise client.unexpected(answer, "/login")
    client.token = token
    info = client.send("GET", "/api/v1/session", timeout_s=timeout_s)
    expires_at = info.data.get("expires_at") if isinstance(info.data, dict) else None
    path = save_session(Session(url=url, token=token, user=user, expires_at=expires_at, cacert=cacert))
    if previous and previous.url == url and previous.token != token:
        # The new session replaces the old one: end it on the server too, so logging in again
        # does not leave live tokens behind. Best effort: it may well have expired already.
        try:
            Client(url, previous.token, cacert).send("POST", "/logout", timeout_s=timeout_s)
        except CtlError:
            pass
    if args.json:
        emit_json({"error": False, "url": url, "user": user, "expires_at": expires_at,
                   "config": str(path)})
    else:
        until = f" until {local_time(expires_at)}" if expires_at else ""
        print(f"logged in to {url} as {user}{until}")
    return EXIT_OK


def cmd_logout(args: argparse.Namespace) -> int:
    session = load_session()
    if session is None:
        if args.json:
            emit_json({"error": False, "logged_out": False, "revoked": False})
        else:
            print("not logged in")
        return EXIT_OK
    # Forget the token locally whatever the server says: the user asked for it to be gone.
    remove_session()
    url = normalise_urls(args.server) if args.server else session.url
    client = Client(url, session.token, session.cacert)
    timeout_s = args.timeout or DEFAULT_REQUEST_TIMEOUT_S
    try:
        answer = client.send("POST", "/logout", timeout_s=timeout_s)
    except CtlError as e:
        raise CtlError(f"removed the local session, but could not revoke it on the server: {e.msg}",
                       e.exit_code) from e
    # 401/403: the server had already forgotten the session (expired), which is what we wanted.
    if answer.status not in (200, 401, 403):
        raise CtlError("removed the local session, but the server did not confirm the logout: "
                       + str(client.failure(answer, "/logout")), EXIT_SERVER)
    if args.json:
        emit_json({"error": False, "logged_out": True, "revoked": answer.status == 200,
                   "url": session.url})
    else:
        print(f"logged out of {session.url}")
    return EXIT_OK


def cmd_agents(args: argparse.Namespace) -> int:
    client = session_client(args)
    agents = fetch_agents(client, args.timeout or DEFAULT_REQUEST_TIMEOUT_S)
    if args.json:
        emit_json({"error": False, "agents": agents})
        return EXIT_OK
    rows = [[str(a.get("name")), "yes" if a.get("online") else "no",
             "now" if a.get("online") else time_ago(a.get("last_seen")),
             str(a.get("agent_version") or "-")] for a in agents]
    print_table(["NAME", "ONLINE", "LAST SEEN", "VERSION"], rows)
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    if args.command_words is not None:
        target_spec, words = ",".join(args.words), args.command_words
    else:
        target_spec, words = (args.words[0] if args.words else ""), args.words[1:]
    if not target_spec:
        raise CtlError("usage: dutctl run TARGETS -- COMMAND", EXIT_USAGE)
    command = " ".join(words).strip()
    if not command:
        raise CtlError("no command given: dutctl run TARGETS -- COMMAND", EXIT_USAGE)
    return run_task(args, target_spec, {"type": "execute_cmd", "cmd": command})


def parse_field_value(key: str, raw: str) -> Any:
    if raw.startswith("@"):
        path = Path(raw[1:]).expanduser()
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or str(e)
            raise CtlError(f"{key}=@{path}: cannot read the file: {reason}", EXIT_USAGE) from e
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def parse_fields(items: list[str]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CtlError(f"expected key=value, got {item!r}", EXIT_USAGE)
        if key == "type":
            raise CtlError("the task type is the first argument: dutctl task TYPE TARGETS key=value…",
                           EXIT_USAGE)
        fields[key] = parse_field_value(key, raw)
    return fields


def cmd_task(args: argparse.Namespace) -> int:
    task = {"type": args.type, **parse_fields(args.fields)}
    return run_task(args, args.targets, task)


def payload_of(task: dict[str, Any]) -> dict[str, Any]:
    """The task's own fields, without the type and id the server keeps beside them."""
    payload = task.get("payload")
    if not isinstance(payload, dict):
        return {}
    return {k: v for k, v in payload.items() if k not in ("type", "id")}


def describe_payload(task: dict[str, Any]) -> str:
    payload = payload_of(task)
    for key in ("cmd", "path", "dir", "url"):
        if isinstance(payload.get(key), str):
            return shorten(payload[key], 40)
    if "frompath" in payload:
        return shorten(f"{payload.get('frompath')} -> {payload.get('topath')}", 40)
    return shorten(json.dumps(payload, ensure_ascii=False), 40) if payload else ""


def describe_result(task: dict[str, Any]) -> str:
    if task.get("state") not in FINAL_STATES:
        return ""
    outcome = classify(task, str(task.get("type")))
    if outcome.exit_code is not None:
        return f"exit {outcome.exit_code}"
    return "ok" if outcome.outcome == "ok" else shorten(outcome.msg or "", 40)


def cmd_history(args: argparse.Namespace) -> int:
    client = session_client(args)
    timeout_s = args.timeout or DEFAULT_REQUEST_TIMEOUT_S
    if args.id is not None:
        task = client.call("GET", f"/api/v1/tasks/{args.id}", timeout_s=timeout_s).get("task")
        if args.json:
            emit_json({"error": False, "task": task})
        else:
            print_task(task)
        return EXIT_OK
    query = {"target": args.target, "state": args.state, "submitted_by": args.by,
             "before_id": args.before_id, "limit": args.limit}
    tasks = client.call("GET", "/api/v1/tasks", query=query, timeout_s=timeout_s).get("tasks") or []
    if args.json:
        emit_json({"error": False, "tasks": tasks})
        return EXIT_OK
    rows = [[str(t.get("id")), local_time(t.get("created_at")), str(t.get("target")),
             str(t.get("type")), str(t.get("state")), str(t.get("submitted_by") or "-"),
             describe_payload(t), describe_result(t)] for t in tasks]
    print_table(["ID", "CREATED", "TARGET", "TYPE", "STATE", "BY", "WHAT", "RESULT"], rows)
    return EXIT_OK


def print_task(task: dict[str, Any]) -> None:
    print(f"task {task.get('id')}: {task.get('type')} on {task.get('target')}, {task.get('state')}")
    print(f"submitted by {task.get('submitted_by') or '-'} at {local_time(task.get('created_at'))}")
    for label, key in (("delivered", "delivered_at"), ("finished", "finished_at"),
                       ("expires", "expires_at")):
        if task.get(key):
            print(f"{label} at {local_time(task.get(key))}")
    payload = payload_of(task)
    if payload:
        print("payload: " + json.dumps(payload, ensure_ascii=False))
    if task.get("state") in FINAL_STATES:
        outcome = classify(task, str(task.get("type")))
        print(f"result: {label_of(outcome)}")
        sys.stdout.write(for_terminal(content_of(outcome, str(task.get("type")))))


def cmd_selfreg(args: argparse.Namespace) -> int:
    client = session_client(args)
    timeout_s = args.timeout or DEFAULT_REQUEST_TIMEOUT_S
    if args.state is not None:
        enabled = args.state == "on"
        answer = client.send("POST", "/agent_selfreg", query={"enabled": int(enabled)},
                             timeout_s=timeout_s)
    else:
        answer = client.send("GET", "/agent_selfreg", timeout_s=timeout_s)
    if answer.status != 200:
        raise classic_failure(client, answer, timeout_s)
    if args.state is None:
        text = str(answer.data).strip()
        if text not in ("0", "1"):
            raise client.unexpected(answer, "/agent_selfreg")
        enabled = text == "1"
    if args.json:
        emit_json({"error": False, "selfreg": enabled})
    else:
        print(f"agent self-registration is {'on' if enabled else 'off'}")
    return EXIT_OK


def classic_failure(client: Client, answer: Answer, timeout_s: float) -> CtlError:
    """Classic routes answer 403 for an expired session too; the native API tells which it was."""
    if answer.status == 403:
        check = client.send("GET", "/api/v1/session", timeout_s=timeout_s)
        if check.status == 401:
            return client.failure(check, "/api/v1/session")
    return client.failure(answer, "/agent_selfreg")


# ---------------------------------------------------------------------------------------------
# Enrollment: requests to join, enrolled identities, tokens
# ---------------------------------------------------------------------------------------------

DURATION_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


def duration(text: str) -> float:
    """`3600`, `90s`, `30m`, `12h`, `1d`, `2w` -> seconds."""
    raw = text.strip().lower()
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(number):] or "s"
    try:
        value = float(number) * DURATION_UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (seconds, or a number with s, m, h, d or w: 12h, 1d)") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive duration: {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more: {text!r}")
    return value


def parse_labels(items: list[str], removals: bool = False) -> tuple[dict[str, str], list[str]]:
    """`key=value` words into labels; with removals, `key-` words name labels to remove."""
    labels: dict[str, str] = {}
    removed: list[str] = []
    for item in items:
        key, sep, value = item.partition("=")
        if removals and not sep and item.endswith("-") and len(item) > 1:
            removed.append(item[:-1])
            continue
        if not sep or not key.strip():
            hint = " (or key- to remove one)" if removals else ""
            raise CtlError(f"expected a label as key=value{hint}, got {item!r}", EXIT_USAGE)
        labels[key.strip()] = value.strip()
    return labels, removed


def label_text(labels: Any) -> str:
    if not isinstance(labels, dict) or not labels:
        return "-"
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def enroll_failure(client: Client, answer: Answer, path: str) -> CtlError:
    """An unknown request, agent or token is a usage error (2); a request in another state, a
    name taken, an agent enrolled already: the action failed (1); the rest as for any call."""
    msg = server_msg(answer.data)
    if msg is not None and answer.status == 404:
        return CtlError(msg, EXIT_USAGE)
    if msg is not None and answer.status == 409:
        return CtlError(msg, EXIT_FAILED)
    return client.failure(answer, path)


def enroll_call(client: Client, method: str, path: str, timeout_s: float,
                body: Any = None) -> dict[str, Any]:
    answer = client.send(method, path, body=body, timeout_s=timeout_s)
    if 200 <= answer.status < 300 and isinstance(answer.data, dict):
        return answer.data
    if 200 <= answer.status < 300:
        raise client.unexpected(answer, path)
    raise enroll_failure(client, answer, path)


def fetch_pending(client: Client, timeout_s: float, kind: str | None = None) -> list[dict[str, Any]]:
    data = client.call("GET", "/api/v1/enrollments", query={"state": "pending", "kind": kind},
                       timeout_s=timeout_s)
    found = data.get("enrollments")
    if not isinstance(found, list):
        raise client.unexpected(Answer(200, data, None), "/api/v1/enrollments")
    return [e for e in found if isinstance(e, dict)]


def facts_of(request: dict[str, Any]) -> dict[str, Any]:
    facts = request.get("facts")
    return facts if isinstance(facts, dict) else {}


def host_of(request: dict[str, Any]) -> str:
    return str(facts_of(request).get("hostname") or request.get("name") or "-")


def describe_request(request: dict[str, Any]) -> str:
    name, host = str(request.get("name")), host_of(request)
    return f"request {request.get('id')} ({name}{'' if host in (name, '-') else ', ' + host})"


def resolve_requests(words: list[str], pending: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Request ids, or the names pending requests go by (the name each would get), into
    requests; nothing is decided unless every word names exactly one pending request."""
    by_id = {e.get("id"): e for e in pending}
    chosen: dict[Any, dict[str, Any]] = {}
    problems: list[str] = []
    for word in words:
        if word.isdigit():
            request = by_id.get(int(word))
            if request is None:
                problems.append(f"no pending request has the id {word}")
            else:
                chosen[request["id"]] = request
            continue
        matches = [e for e in pending if e.get("name") == word]
        if not matches:
            matches = [e for e in pending if facts_of(e).get("hostname") == word]
        if len(matches) == 1:
            chosen[matches[0]["id"]] = matches[0]
        elif not matches:
            problems.append(f"no pending request is called {word}")
        else:
            ids = ", ".join(str(e.get("id")) for e in matches)
            problems.append(f"{len(matches)} pending requests are called {word} (ids {ids}); "
                            "give the id instead")
    if problems:
        raise CtlError("; ".join(problems) + " (see `dutctl agents pending`)", EXIT_USAGE)
    return list(chosen.values())


def cmd_agents_pending(args: argparse.Namespace) -> int:
    client = session_client(args)
    timeout_s = args.timeout or DEFAULT_REQUEST_TIMEOUT_S
    data = client.call("GET", "/api/v1/enrollments", query={"state": "pending", "kind": args.kind},
                       timeout_s=timeout_s)
    pending = data.get("enrollments")
    if not isinstance(pending, list):
        raise client.unexpected(Answer(200, data, None), "/api/v1/enrollments")
    if args.json:
        emit_json({"error": False, "enrollments": pending, "pending": data.get("pending")})
        return EXIT_OK
    if not pending:
        print("no pending enrollment requests")
        return EXIT_OK
    rows = []
    for e in pending:
        facts = facts_of(e)
        os_name = " ".join(str(facts[k]) for k in ("os", "os_version") if facts.get(k)) or "-"
        rows.append([str(e.get("id")), str(e.get("kind")), str(e.get("name")), host_of(e),
                     shorten(os_name, 24), str(e.get("address") or "-"),
                     str(e.get("duplicate_of") or "-"), time_ago(e.get("created_at"))])
    print_table(["ID", "KIND", "NAME", "HOST", "OS", "ADDRESS", "DUPLICATE OF", "AGE"], rows)
    return EXIT_OK


def cmd_agents_decide(args: argparse.Namespace) -> int:
    """accept or reject pending requests, named by id or name; the rest goes on when one fails."""
    client = session_client(args)
    timeout_s = args.timeout or DEFAULT_REQUEST_TIMEOUT_S
    accept = args.action == "accept"
    if not args.requests:
        raise CtlError(f"which requests? dutctl agents {args.action} NAME_OR_ID…", EXIT_USAGE)
    labels, _ = parse_labels(getattr(args, "label", None) or [])
    new_name = getattr(args, "name", None)
    requests = resolve_requests(args.requests, fetch_pending(client, timeout_s))
    if new_name is not None and len(requests) != 1:
        raise CtlError("--name gives one request its name: name one request only", EXIT_USAGE)
    results: list[dict[str, Any]] = []
    for request in requests:
        path = f"/api/v1/enrollments/{request['id']}/{args.action}"
        body: dict[str, Any] | None = None
        if accept:
            body = {}
            if new_name is not None:
                body["name"] = new_name
            if labels:
                body["labels"] = labels
        try:
            data = enroll_call(client, "POST", path, timeout_s, body)
        except CtlError as e:
            if e.exit_code not in (EXIT_USAGE, EXIT_FAILED):
                raise
            warn(f"cannot {args.action} {describe_request(request)}: {e.msg}")
            results.append({"id": request["id"], "ok": False, "msg": e.msg})
            continue
        decided = data.get("enrollment") if isinstance(data.get("enrollment"), dict) else {}
        results.append({"id": request["id"], "ok": True, "enrollment": decided})
        if not args.json:
            if accept:
                print(f"accepted {describe_request(request)} as agent {decided.get('name')}")
            else:
                print(f"rejected {describe_request(request)}")
    ok = all(r["ok"] for r in results)
    if args.json:
        emit_json({"error": False, "ok": ok, "results": results})
    return EXIT_OK if ok else EXIT_FAILED


def known_agents(client: Client, names: list[str], timeout_s: float) -> None:
    """Every name is an agent, or nothing is done (as for the targets of `run`)."""
    known = {str(a.get("name")) for a in fetch_agents(client, timeout_s)}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise CtlError(f"unknown {'agent' if len(unknown) == 1 else 'agents'}: "
                       f"{', '.join(unknown)}", EXIT_USAGE)


def cmd_agents_each(args: argparse.Namespace) -> int:
    """revoke or rekey agents, one request each."""
    client = session_client(args)
    timeout_s = args.timeout or DEFAULT_REQUEST_TIMEOUT_S
    names = list(dict.fromkeys(args.names))
    if not names:
        raise CtlError(f"which agents? dutctl agents {args.action} NAME…", EXIT_USAGE)
    known_agents(client, names, timeout_s)
    results: list[dict[str, Any]] = []
    for name in names:
        path = f"/api/v1/agents/{urllib.parse.quote(name, safe='')}/{args.action}"
        try:
            data = enroll_call(client, "POST", path, timeout_s)
        except CtlError as e:
            if e.exit_code not in (EXIT_USAGE, EXIT_FAILED):
                raise
            warn(f"cannot {args.action} {name}: {e.msg}")
            results.append({"name": name, "ok": False, "msg": e.msg})
            continue
        if args.action == "rekey":
            results.append({"name": name, "ok": True, "task": data.get("task")})
            if not args.json:
                print(f"re-key of {name} requested (task {data.get('task')}): the agent makes a "
                      "new credential with its next poll")
        else:
            results.append({"name": name, "ok": True})
            if not args.json:
                print(f"revoked {name}: its credential no longer works")
    ok = all(r["ok"] for r in results)
    if args.json:
        emit_json({"error": False, "ok": ok, "results": results})
    return EXIT_OK if ok else EXIT_FAILED


def cmd_agents_adopt(args: argparse.Namespace) -> int:
    client = session_client(args)
    timeout_s = args.timeout or DEFAULT_REQUEST_TIMEOUT_S
    path = f"/api/v1/agents/{urllib.parse.quote(args.name, safe='')}/adopt"
    data = enroll_call(client, "POST", path, timeout_s)
    enrollment = data.get("enrollment") if isinstance(data.get("enrollment"), dict) else {}
    if args.json:
        emit_json({"error": False, "enrollment": enrollment})
    else:
        print(f"{args.name} is an enrolled identity now (request {enrollment.get('id')}): "
              "it can be revoked and re-keyed")
    return EXIT_OK


def cmd_agents_label(args: argparse.Namespace) -> int:
    client = session_client(args)
    timeout_s = args.timeout or DEFAULT_REQUEST_TIMEOUT_S
    given, removed = parse_labels(args.pairs, removals=not args.replace)
    if not given and not removed and not args.replace:
        raise CtlError("which labels? dutctl agents label NAME key=value… (key- removes one; "
                       "--replace with no labels removes all)", EXIT_USAGE)
    quoted = urllib.parse.quote(args.name, safe="")
    if args.replace:
        labels = given
    else:
        data = enroll_call(client, "GET", f"/api/v1/agents/{quoted}", timeout_s)
        agent = data.get("agent") if isinstance(data.get("agent"), dict) else {}
        current = agent.get("labels")
        if not isinstance(current, dict):
            raise CtlError("this server does not report agents' labels; set them all at once "
                           "with --replace", EXIT_SERVER)
        labels = {k: str(v) for k, v in current.items() if k not in removed}
        labels.update(given)
    enroll_call(client, "PUT", f"/api/v1/agents/{quoted}/labels", timeout_s, {"labels": labels})
    if args.json:
        emit_json({"error": False, "name": args.name, "labels": labels})
    else:
        print(f"{args.name}: {label_text(labels) if labels else 'no labels'}")
    return EXIT_OK


def uses_text(token: dict[str, Any]) -> str:
    limit = token.get("max_uses")
    return f"{token.get('uses')}/{'unlimited' if limit is None else limit}"


def cmd_tokens_list(args: argparse.Namespace) -> int:
    client = session_client(args)
    data = client.call("GET", "/api/v1/enrollment-tokens",
                       timeout_s=args.timeout or DEFAULT_REQUEST_TIMEOUT_S)
    tokens = data.get("tokens")
    if not isinstance(tokens, list):
        raise client.unexpected(Answer(200, data, None), "/api/v1/enrollment-tokens")
    if args.json:
        emit_json({"error": False, "tokens": tokens})
        return EXIT_OK
    if not tokens:
        print("no enrollment tokens; make one with `dutctl tokens create`")
        return EXIT_OK
    rows = [[str(t.get("id")), str(t.get("state")), uses_text(t), local_time(t.get("expires_at")),
             "yes" if t.get("auto_accept") else "no", label_text(t.get("labels")),
             shorten(str(t.get("note") or "-"), 40)] for t in tokens if isinstance(t, dict)]
    print_table(["ID", "STATE", "USES", "EXPIRES", "AUTO-ACCEPT", "LABELS", "NOTE"], rows)
    return EXIT_OK


def cmd_tokens_create(args: argparse.Namespace) -> int:
    client = session_client(args)
    timeout_s = args.timeout or DEFAULT_REQUEST_TIMEOUT_S
    labels, _ = parse_labels(args.label or [])
    body: dict[str, Any] = {"labels": labels, "auto_accept": args.auto_accept,
                            "note": args.note or ""}
    if args.expires is not None:
        body["expires_s"] = math.ceil(args.expires)
    if args.unlimited:
        body["max_uses"] = None
    elif args.uses is not None:
        body["max_uses"] = args.uses
    data = client.call("POST", "/api/v1/enrollment-tokens", body=body, timeout_s=timeout_s)
    token = data.get("token")
    if not isinstance(token, dict) or not isinstance(token.get("token"), str):
        raise client.unexpected(Answer(201, data, None), "/api/v1/enrollment-tokens")
    command = f"dutagent enroll {client.url} {token['token']}"
    if args.json:
        emit_json({"error": False, "token": token, "command": command})
        return EXIT_OK
    limit = token.get("max_uses")
    uses = "unlimited uses" if limit is None else plural(int(limit), "use")
    accept = "accepted without asking" if token.get("auto_accept") else "accepted by an admin"
    print(f"token {token.get('id')}: {uses}, expires {local_time(token.get('expires_at'))}, "
          f"labels {label_text(token.get('labels'))}, machines {accept}")
    print(f"  {token['token']}")
    print("on the new machine, run:")
    print(f"  {command}")
    print(f"the token is shown only this once; `dutctl tokens revoke {token.get('id')}` "
          "withdraws it")
    return EXIT_OK


def cmd_tokens_revoke(args: argparse.Namespace) -> int:
    client = session_client(args)
    enroll_call(client, "DELETE", f"/api/v1/enrollment-tokens/{args.id}",
                args.timeout or DEFAULT_REQUEST_TIMEOUT_S)
    if args.json:
        emit_json({"error": False, "revoked": args.id})
    else:
        print(f"token {args.id} revoked: no machine can join with it any more")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# Fleet jobs, selectors and atomic batches
# ---------------------------------------------------------------------------------------------

JOB_STATES = ("running", "paused", "done", "aborted")
JOB_ENDED = frozenset({"done", "aborted"})
# The order counts are shown in: what ended first, then what is on its way.
COUNT_ORDER = ("done", "failed", "expired", "cancelled", "skipped", "delivered", "queued",
               "waiting")
ENDED_STATES = frozenset({"done", "failed", "expired", "cancelled", "skipped"})
FOLLOW_INTERVAL_S = 1.0
WAVES_SHOWN = 12  # more waves than this: the ones far from the current one are summed up
BUCKET_AGENTS_SHOWN = 6
COUNT_RE = re.compile(r"^\d+$|^\d+(\.\d+)?%$")
SELECTOR_AT_RE = re.compile(r"^Invalid selector at character (\d+)")
# Bidirectional overrides can reorder what a terminal shows; they are shown escaped too.
_BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_UNSAFE = {c: f"\\x{c:02x}" for c in [*range(0x00, 0x09), *range(0x0b, 0x20), 0x7f,
                                       *range(0x80, 0xa0)]}
_UNSAFE.update({ord(c): f"\\u{ord(c):04x}" for c in _BIDI})


def safe(value: Any) -> str:
    """Text from agents (or anyone) made harmless for a terminal: escape sequences, other
    control characters and bidi overrides are shown escaped (ESC as \\x1b), never sent raw.
    Newlines and tabs stay; a Windows line end (CR LF) becomes a newline."""
    text = value if isinstance(value, str) else "" if value is None else str(value)
    return text.replace("\r\n", "\n").translate(_UNSAFE)


def for_terminal(text: str) -> str:
    """Agent output as `run` and `history` print it: made safe when stdout is a terminal,
    unchanged when it goes to a pipe or a file (so `$(dutctl run pc1 -- cat f)` is exact)."""
    return safe(text) if sys.stdout.isatty() else text


def count_value(text: str) -> Any:
    """`5` -> 5, `20%` -> "20%" (canary, wave, failure budget)."""
    value = text.strip()
    if not COUNT_RE.match(value):
        raise argparse.ArgumentTypeError(
            f"not a number of agents or a percentage: {text!r} (e.g. 5 or 20%)")
    return value if value.endswith("%") else int(value)


def pause_value(text: str) -> Any:
    """`manual`, `0`, or a duration (`90`, `30s`, `5m`) -> seconds."""
    if text.strip().lower() == "manual":
        return "manual"
    if text.strip() in ("0", "0s"):
        return 0
    return duration(text)


def api_call(client: Client, method: str, path: str, timeout_s: float, body: Any = None,
             query: dict[str, Any] | None = None) -> dict[str, Any]:
    """A call whose refusals are the user's to hear: 400/404 exit 2, 409 exit 1 (a job in a
    state that does not allow it), the rest as for any call."""
    answer = client.send(method, path, body=body, query=query, timeout_s=timeout_s)
    if 200 <= answer.status < 300 and isinstance(answer.data, dict):
        return answer.data
    if 200 <= answer.status < 300:
        raise client.unexpected(answer, path)
    raise enroll_failure(client, answer, path)


def with_caret(error: CtlError, selector: str) -> CtlError:
    """The server's "Invalid selector at character N" with the selector and a caret under N."""
    found = SELECTOR_AT_RE.match(error.msg)
    if not found or "\n" in selector:
        return error
    at = min(int(found.group(1)), len(selector) + 1)
    return CtlError(f"{error.msg}\n  {safe(selector)}\n  {' ' * (at - 1)}^", error.exit_code)


def selector_call(client: Client, method: str, path: str, timeout_s: float, selector: str | None,
                  **kwargs: Any) -> dict[str, Any]:
    try:
        return api_call(client, method, path, timeout_s, **kwargs)
    except CtlError as e:
        raise with_caret(e, selector) if selector else e from None


def job_of(data: dict[str, Any], client: Client, path: str) -> dict[str, Any]:
    job = data.get("job")
    if not isinstance(job, dict) or not isinstance(job.get("id"), int):
        raise client.unexpected(Answer(200, data, None), path)
    return job


def fetch_job(client: Client, job_id: int, timeout_s: float) -> dict[str, Any]:
    path = f"/api/v1/jobs/{job_id}"
    return job_of(api_call(client, "GET", path, timeout_s), client, path)


def fetch_buckets(client: Client, job_id: int, timeout_s: float, normalize: bool = True,
                  digits: bool = False) -> list[dict[str, Any]]:
    data = api_call(client, "GET", f"/api/v1/jobs/{job_id}/buckets", timeout_s,
                    query={"normalize": int(normalize), "digits": int(digits)})
    found = data.get("buckets")
    return [b for b in found if isinstance(b, dict)] if isinstance(found, list) else []


def counts_text(counts: Any) -> str:
    if not isinstance(counts, dict) or not counts:
        return "-"
    keys = [k for k in COUNT_ORDER if k in counts] + sorted(k for k in counts
                                                             if k not in COUNT_ORDER)
    return ", ".join(f"{safe(k)} {counts[k]}" for k in keys)


def finished_of(counts: Any) -> int:
    if not isinstance(counts, dict):
        return 0
    return sum(int(n) for k, n in counts.items() if k in ENDED_STATES and isinstance(n, int))


def bar(done: int, total: int, width: int = 20) -> str:
    filled = width if total <= 0 else min(width, (done * width) // total)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def budget_text(job: dict[str, Any]) -> str:
    budget = job.get("max_failures")
    return f"{job.get('failed', 0)} failed" + (" (no budget)" if budget is None
                                              else f" of a budget of {budget}")


def task_words(task: Any) -> str:
    """execute_cmd: the command; another type: its type and fields."""
    if not isinstance(task, dict):
        return "-"
    kind = safe(task.get("type"))
    if kind == "execute_cmd" and isinstance(task.get("cmd"), str):
        return f"execute_cmd: {shorten(safe(task['cmd']), 60)}"
    rest = {k: v for k, v in task.items() if k != "type"}
    return kind + (f" {shorten(safe(json.dumps(rest, ensure_ascii=False)), 60)}" if rest else "")


def wave_rows(job: dict[str, Any]) -> list[str]:
    """One line a wave; with many waves, the ones far from the current one in a summed line."""
    waves = [w for w in job.get("waves") or [] if isinstance(w, dict)]
    total = len(waves)
    released = int(job.get("released") or 0)
    if total <= WAVES_SHOWN:
        shown = set(range(total))
    else:
        shown = {0, total - 1} | set(range(max(0, released - 4), min(total, released + 2)))
        shown |= {i for i, w in enumerate(waves) if i < released
                  and finished_of(w.get("counts")) < int(w.get("targets") or 0)}
    rows: list[str] = []
    hidden: list[int] = []

    def flush() -> None:
        if not hidden:
            return
        counts: dict[str, int] = {}
        targets = 0
        for i in hidden:
            targets += int(waves[i].get("targets") or 0)
            for k, n in (waves[i].get("counts") or {}).items():
                counts[k] = counts.get(k, 0) + int(n)
        first, last = hidden[0] + 1, hidden[-1] + 1
        rows.append(f"waves {first}-{last}/{total}  {plural(targets, 'agent')}  "
                    f"{bar(finished_of(counts), targets)}  {counts_text(counts)}")
        hidden.clear()

    for i, w in enumerate(waves):
        if i not in shown:
            hidden.append(i)
            continue
        flush()
        targets = int(w.get("targets") or 0)
        rows.append(f"wave {i + 1}/{total}  {plural(targets, 'agent')}  {bar(finished_of(w.get('counts')), targets)}"
                    f"  {counts_text(w.get('counts'))}")
    flush()
    return rows


def job_lines(job: dict[str, Any]) -> list[str]:
    targets = int(job.get("targets") or 0)
    whom = plural(targets, "agent") + (f" ({safe(job['selector'])})" if job.get("selector") else "")
    lines = [f"job {job.get('id')}: {task_words(job.get('task'))} to {whom}",
             f"state: {safe(job.get('state'))}" + (f" - {safe(job['reason'])}"
                                                    if job.get("reason") else "")]
    window = job.get("window")
    if isinstance(window, dict):
        lines.append("window: " + ("open" + (f" until {local_time(window['closes_at'])}"
                                              if window.get("closes_at") else "")
                                   if window.get("open") else
                                   "closed" + (f", opens at {local_time(window['opens_at'])}"
                                               if window.get("opens_at") else ", never opens")))
    lines += wave_rows(job)
    finished = finished_of(job.get("counts"))
    line = f"{finished}/{targets} finished, {budget_text(job)}"
    if job.get("next_wave_at") and job.get("state") == "running":
        line += f", next wave at {local_time(job.get('next_wave_at'))}"
    lines.append(line)
    return lines


def job_summary(job: dict[str, Any]) -> str:
    """One line for a log (stdout not a terminal): printed each time it changes."""
    waves = job.get("waves") or []
    return (f"job {job.get('id')} {safe(job.get('state'))}: wave {job.get('released')}/"
            f"{len(waves)}, {counts_text(job.get('counts'))}; {budget_text(job)}"
            + (f"; {safe(job['reason'])}" if job.get("reason") else ""))


def status_of(bucket: dict[str, Any]) -> str:
    if bucket.get("error"):
        return "error"
    if bucket.get("status_code") is not None:
        return f"exit {safe(bucket.get('status_code'))}"
    return "ok" if bucket.get("state") == "done" else safe(bucket.get("state"))


def first_line(text: str) -> str:
    """The first line that says something; a bucket's "[stderr]" marker (its output was only
    on stderr) goes with the line after it."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return "(no output)"
    if lines[0] == "[stderr]" and len(lines) > 1:
        return f"[stderr] {lines[1]}"
    return lines[0]


def print_buckets(buckets: list[dict[str, Any]], full: bool = False) -> None:
    """Largest first: number, count, status, agents (abbreviated), the example's first line
    (full: the whole example)."""
    total = sum(int(b.get("count") or 0) for b in buckets)
    print(f"results: {plural(total, 'agent')} in {plural(len(buckets), 'group')}"
          + (" (rerun one: dutctl job rerun ID --bucket N)" if len(buckets) > 1 else ""))
    for b in buckets:
        agents = [safe(a) for a in b.get("agents") or []]
        shown = ", ".join(agents[:BUCKET_AGENTS_SHOWN])
        if len(agents) > BUCKET_AGENTS_SHOWN:
            shown += f", … (+{len(agents) - BUCKET_AGENTS_SHOWN})"
        flag = "  FAILED" if b.get("failed") else ""
        print(f"  #{b.get('bucket')}  {plural(int(b.get('count') or 0), 'agent')}  "
              f"{status_of(b)}{flag}  {shown}")
        example = safe(b.get("example"))
        if full:
            for line in (example.strip("\n") or "(no output)").split("\n"):
                print(f"      {line}")
        else:
            print(f"      {shorten(first_line(example), 100)}")


class JobDisplay:
    """A job's live state: redrawn in place on a terminal; a line each time it changes
    otherwise (a log a script can read)."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.drawn = 0
        self.last = ""

    def show(self, job: dict[str, Any]) -> None:
        if not self.tty:
            line = job_summary(job)
            if line != self.last:
                self.last = line
                print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)
            return
        width = max(20, shutil.get_terminal_size((100, 24)).columns - 1)
        # Cut to the terminal's width: a wrapped line would throw the redraw off.
        lines = [line if len(line) <= width else line[:width - 1] + "…"
                 for line in job_lines(job)]
        # Back to the block's first line and clear it: short lines leave no leftovers.
        out = f"\x1b[{self.drawn}F\x1b[J" if self.drawn else ""
        sys.stdout.write(out + "\n".join(lines) + "\n")
        sys.stdout.flush()
        self.drawn = len(lines)


def follow(client: Client, job: dict[str, Any], args: argparse.Namespace,
           timeout_s: float) -> tuple[dict[str, Any], bool]:
    """Polls the job until it ends (or pauses, without --follow-paused); (last view,
    interrupted)."""
    display = JobDisplay(sys.stdout.isatty() and not args.json)
    keep_paused = getattr(args, "follow_paused", False)
    try:
        while True:
            if not args.json:
                display.show(job)
            state = job.get("state")
            if state in JOB_ENDED or (state == "paused" and not keep_paused):
                return job, False
            time.sleep(FOLLOW_INTERVAL_S)
            job = fetch_job(client, int(job["id"]), timeout_s)
    except (KeyboardInterrupt, Interrupted):
        warn(f"stopped following; job {job.get('id')} goes on "
             f"(dutctl job show {job.get('id')} --follow)")
        return job, True


def job_outcome(job: dict[str, Any]) -> int:
    """0 when the job is done with no failure; 1 when it failed somewhere, was aborted or is
    paused (it needs someone)."""
    return EXIT_OK if job.get("state") == "done" and not job.get("failed") else EXIT_FAILED


def report_job(client: Client, job: dict[str, Any], args: argparse.Namespace,
               timeout_s: float, followed: bool) -> int:
    """The end of show/run --follow: the job (unless a terminal shows it already) and its
    buckets."""
    buckets = fetch_buckets(client, int(job["id"]), timeout_s)
    if args.json:
        emit_json({"error": False, "job": job, "buckets": buckets})
    else:
        if not (followed and sys.stdout.isatty()):
            for line in job_lines(job):
                print(line)
        if buckets:
            print_buckets(buckets)
    return job_outcome(job) if followed else EXIT_OK


def task_of_job_args(args: argparse.Namespace) -> dict[str, Any]:
    words = args.task_words or []
    if args.cmd is not None:
        if words:
            raise CtlError("give the task as --cmd COMMAND or after -- as TYPE key=value…, not "
                           "both", EXIT_USAGE)
        if not args.cmd.strip():
            raise CtlError("--cmd: the command is empty", EXIT_USAGE)
        return {"type": "execute_cmd", "cmd": args.cmd}
    if not words:
        raise CtlError("which task? dutctl job run … --cmd COMMAND, or … -- TYPE [key=value…]",
                       EXIT_USAGE)
    return {"type": words[0], **parse_fields(words[1:])}


WINDOW_RE = re.compile(r"^(?:(?P<days>[A-Za-z,-]+)\s+)?(?P<from>\d{1,2}:\d{2})\s*-\s*"
                       r"(?P<to>\d{1,2}:\d{2})$")


def window_value(text: str) -> dict[str, Any]:
    """`fri 18:00-23:00`, `mon-fri 22:00-02:00`, `sat,sun 00:00-24:00`, `18:00-06:00` (every
    day) -> a maintenance window as the server takes it (it checks days and times)."""
    found = WINDOW_RE.match(text.strip())
    if not found:
        raise argparse.ArgumentTypeError(
            f"not a window: {text!r} (e.g. 'fri 18:00-23:00', 'mon-fri 22:00-02:00', "
            "'18:00-06:00')")
    window: dict[str, Any] = {"from": found.group("from"), "to": found.group("to")}
    if found.group("days"):
        window["days"] = [d for d in found.group("days").lower().split(",") if d]
    return window


def job_body_of(args: argparse.Namespace, client: Client, timeout_s: float,
                command: str) -> dict[str, Any]:
    """A job's body from `job run` / `schedule add` options: the task, the agents (a selector,
    or names resolved now), the waves, the budget, the windows."""
    body: dict[str, Any] = {"task": task_of_job_args(args)}
    if args.selector is not None:
        if args.agents:
            raise CtlError("give agents or --selector, not both", EXIT_USAGE)
        body["selector"] = args.selector
    elif args.agents:
        body["targets"] = resolve_targets(",".join(args.agents), fetch_agents(client, timeout_s))
    else:
        raise CtlError(f"to which agents? dutctl {command} --selector SELECTOR … or dutctl "
                       f"{command} AGENT… …", EXIT_USAGE)
    for key, value in (("canary", args.canary), ("wave", args.wave), ("pause_s", args.pause),
                       ("max_failures", args.max_failures), ("offline", args.offline)):
        if value is not None:
            body[key] = value
    if args.expires is not None:
        body["expires_s"] = math.ceil(args.expires)
    if args.no_nonzero_fails:
        body["nonzero_fails"] = False
    return body


def windows_of(args: argparse.Namespace) -> list[dict[str, Any]] | None:
    found = list(args.window or []) + [{**w, "exclude": True} for w in args.not_window or []]
    return found or None


def cmd_job_run(args: argparse.Namespace) -> int:
    client = session_client(args)
    timeout_s = args.timeout or DEFAULT_REQUEST_TIMEOUT_S
    body = job_body_of(args, client, timeout_s, "job run")
    if windows_of(args):
        body["windows"] = windows_of(args)
    if args.tz:
        body["tz"] = args.tz
    data = selector_call(client, "POST", "/api/v1/jobs", timeout_s, args.selector, body=body)
    job = job_of(data, client, "/api/v1/jobs")
    return show_created(client, job, args, timeout_s)


def show_created(client: Client, job: dict[str, Any], args: argparse.Namespace,
                 timeout_s: float) -> int:
    if not args.follow:
        if args.json:
            emit_json({"error": False, "job": job})
        else:
            waves = len(job.get("waves") or [])
            print(f"job {job['id']}: {task_words(job.get('task'))} to "
                  f"{plural(int(job.get('targets') or 0), 'agent')} in {plural(waves, 'wave')}; "
                  f"follow it with `dutctl job show {job['id']} --follow`")
        return EXIT_OK
    if not args.json:
        print(f"job {job['id']} created")
    job, interrupted = follow(client, job, args, timeout_s)
    if interrupted:
        return EXIT_INTERRUPTED
    return report_job(client, job, args, timeout_s, followed=True)


def cmd_job_show(args: argparse.Namespace) -> int:
    client = session_client(args)
    timeout_s = args.timeout or DEFAULT_REQUEST_TIMEOUT_S
    job = fetch_job(client, args.id, timeout_s)
    if args.follow or args.follow_paused:
        job, interrupted = follow(client, job, args, timeout_s)
        if interrupted:
            return EXIT_INTERRUPTED
        return report_job(client, job, args, timeout_s, followed=True)
    return report_job(client, job, args, timeout_s, followed=False)


def cmd_job_list(args: argparse.Namespace) -> int:
    client = session_client(args)
    data = api_call(client, "GET", "/api/v1/jobs", args.timeout or DEFAULT_REQUEST_TIMEOUT_S,
                    query={"state": args.state, "limit": args.limit, "before_id": args.before_id})
    jobs = [j for j in data.get("jobs") or [] if isinstance(j, dict)]
    if args.json:
        emit_json({"error": False, "jobs": jobs})
        return EXIT_OK
    if not jobs:
        print("no jobs" + (f" {args.state}" if args.state else "")
              + "; start one with `dutctl job run`")
        return EXIT_OK
    rows = [[str(j.get("id")), safe(j.get("state")), shorten(task_words(j.get("task")), 40),
             str(j.get("targets")), str(finished_of(j.get("counts"))), str(j.get("failed")),
             shorten(safe(j.get("selector") or "-"), 30), safe(j.get("created_by") or "-"),
             local_time(j.get("created_at"))] for j in jobs]
    print_table(["ID", "STATE", "TASK", "TARGETS", "FINISHED", "FAILED", "SELECTOR", "BY",
                 "CREATED"], rows)
    return EXIT_OK


def cmd_job_act(args: argparse.Namespace) -> int:
    client = session_client(args)
    path = f"/api/v1/jobs/{args.id}/{args.action}"
    job = job_of(api_call(client, "POST", path, args.timeout or DEFAULT_REQUEST_TIMEOUT_S),
                 client, path)
    if args.json:
        emit_json({"error": False, "job": job})
        return EXIT_OK
    said = {"pause": "paused: nothing more is sent until it is resumed",
            "resume": "resumed", "continue": "continues despite failures (no budget from now on)",
            "abort": "aborted: its queued tasks are cancelled, running ones finish"}
    print(f"job {job['id']} {said[args.action]}")
    return EXIT_OK


def cmd_job_rerun(args: argparse.Namespace) -> int:
    client = session_client(args)
    timeout_s = args.timeout or DEFAULT_REQUEST_TIMEOUT_S
    if (args.bucket is None) == (not args.failed):
        raise CtlError("which agents? --bucket N (see `dutctl job buckets ID`) or --failed",
                       EXIT_USAGE)
    body: dict[str, Any] = {"failed": True} if args.failed else {"bucket": args.bucket}
    path = f"/api/v1/jobs/{args.id}/rerun"
    job = job_of(api_call(client, "POST", path, timeout_s, body=body), client, path)
    return show_created(client, job, args, timeout_s)


def cmd_job_buckets(args: argparse.Namespace) -> int:
    client = session_client(args)
    timeout_s = args.timeout or DEFAULT_REQUEST_TIMEOUT_S
    buckets = fetch_buckets(client, args.id, timeout_s, not args.no_normalize, args.digits)
    if args.json:
        emit_json({"error": False, "buckets": buckets})
    elif not buckets:
        print(f"job {args.id} has no results yet")
    else:
        print_buckets(buckets, full=True)
    return EXIT_OK


def cmd_job_targets(args: argparse.Namespace) -> int:
    client = session_client(args)
    data = api_call(client, "GET", f"/api/v1/jobs/{args.id}/targets",
                    args.timeout or DEFAULT_REQUEST_TIMEOUT_S,
                    query={"after": args.after, "limit": args.limit})
    targets = [t for t in data.get("targets") or [] if isinstance(t, dict)]
    if args.json:
        emit_json({"error": False, "targets": targets})
        return EXIT_OK
    rows = []
    for t in targets:
        result = t.get("result") if isinstance(t.get("result"), dict) else None
        said = ""
        if result is not None:
            if result.get("error"):
                said = "error: " + shorten(safe(result.get("msg")), 50)
            elif result.get("status_code") is not None:
                said = f"exit {safe(result.get('status_code'))}: " + shorten(
                    first_line(safe(result.get("output") or result.get("stderr") or "")), 50)
            else:
                said = "ok"
        rows.append([safe(t.get("agent")), str(t.get("wave")), safe(t.get("state")),
                     str(t.get("task_id") or "-"), said])
    print_table(["AGENT", "WAVE", "STATE", "TASK", "RESULT"], rows)
    if args.limit and len(targets) == args.limit:
        warn(f"more: dutctl job targets {args.id} --after {safe(targets[-1].get('agent'))}")
    return EXIT_OK


def when_text(schedule: dict[str, Any]) -> str:
    kind = schedule.get("kind")
    if kind == "cron":
        return f"cron {safe(schedule.get('cron'))}"
    if kind == "once":
        return f"once at {local_time(schedule.get('at'))}"
    every = schedule.get("every_s")
    return f"every {every:g} s" if isinstance(every, (int, float)) else safe(kind)


def targets_text(job: Any) -> str:
    if not isinstance(job, dict):
        return "-"
    if job.get("selector"):
        return safe(job["selector"])
    names = job.get("targets") if isinstance(job.get("targets"), list) else []
    return shorten(",".join(safe(n) for n in names), 30) or "-"


def schedule_of(data: dict[str, Any], client: Client, path: str) -> dict[str, Any]:
    found = data.get("schedule")
    if not isinstance(found, dict) or not isinstance(found.get("id"), int):
        raise client.unexpected(Answer(200, data, None), path)
    return found


def cmd_schedule_add(args: argparse.Namespace) -> int:
    client = session_client(args)
    timeout_s = args.timeout or DEFAULT_REQUEST_TIMEOUT_S
    if args.cron is None and args.at is None and args.every is None:
        raise CtlError("when? --cron '0 18 * * fri', --at 2026-05-01T18:00 or --every 1h",
                       EXIT_USAGE)
    body: dict[str, Any] = {"job": job_body_of(args, client, timeout_s, "schedule add")}
    if args.cron is not None:
        body["cron"] = args.cron
    elif args.at is not None:
        body["at"] = args.at
    else:
        body["every_s"] = args.every
    for key, value in (("name", args.name), ("tz", args.tz), ("windows", windows_of(args))):
        if value:
            body[key] = value
    if args.disabled:
        body["enabled"] = False
    data = selector_call(client, "POST", "/api/v1/schedules", timeout_s, args.selector,
                         body=body)
    schedule = schedule_of(data, client, "/api/v1/schedules")
    if args.json:
        emit_json({"error": False, "schedule": schedule})
        return EXIT_OK
    nxt = schedule.get("next_run_at")
    print(f"schedule {schedule['id']}: {task_words(body['job']['task'])} to "
          f"{targets_text(body['job'])}, {when_text(schedule)} ({safe(schedule.get('tz'))}); "
          + (f"next run at {local_time(nxt)}" if nxt else "switched off"))
    return EXIT_OK


def cmd_schedule_list(args: argparse.Namespace) -> int:
    client = session_client(args)
    data = api_call(client, "GET", "/api/v1/schedules", args.timeout or DEFAULT_REQUEST_TIMEOUT_S)
    schedules = [x for x in data.get("schedules") or [] if isinstance(x, dict)]
    if args.json:
        emit_json({"error": False, "schedules": schedules})
        return EXIT_OK
    if not schedules:
        print("no schedules; make one with `dutctl schedule add`")
        return EXIT_OK
    rows = []
    for x in schedules:
        job = x.get("job") if isinstance(x.get("job"), dict) else {}
        last = local_time(x.get("last_run_at")) + (f" (job {x['last_job_id']})"
                                                   if x.get("last_job_id") else "")
        rows.append([str(x.get("id")), shorten(safe(x.get("name") or "-"), 24),
                     when_text(x), safe(x.get("tz")),
                     local_time(x.get("next_run_at")) if x.get("enabled") else "off",
                     last, f"{x.get('runs', 0)}/{x.get('skipped', 0)}",
                     shorten(task_words(job.get("task")), 30), targets_text(job)])
    print_table(["ID", "NAME", "WHEN", "TZ", "NEXT RUN", "LAST RUN", "RUNS/SKIPPED", "TASK",
                 "AGENTS"], rows)
    for x in schedules:
        if x.get("last_error"):
            warn(f"schedule {x.get('id')}: last run skipped at {local_time(x.get('last_skip_at'))}:"
                 f" {safe(x['last_error'])}")
    return EXIT_OK


def cmd_schedule_rm(args: argparse.Namespace) -> int:
    client = session_client(args)
    timeout_s = args.timeout or DEFAULT_REQUEST_TIMEOUT_S
    results: list[dict[str, Any]] = []
    for the_id in dict.fromkeys(args.ids):
        try:
            api_call(client, "DELETE", f"/api/v1/schedules/{the_id}", timeout_s)
        except CtlError as e:
            if e.exit_code not in (EXIT_USAGE, EXIT_FAILED):
                raise
            warn(f"cannot delete schedule {the_id}: {e.msg}")
            results.append({"id": the_id, "ok": False, "msg": e.msg})
            continue
        results.append({"id": the_id, "ok": True})
        if not args.json:
            print(f"schedule {the_id} deleted: it never runs again (its jobs stay)")
    ok = all(r["ok"] for r in results)
    if args.json:
        emit_json({"error": False, "ok": ok, "results": results})
    return EXIT_OK if ok else EXIT_USAGE


def cmd_schedule_switch(args: argparse.Namespace) -> int:
    client = session_client(args)
    path = f"/api/v1/schedules/{args.id}/{args.action}"
    schedule = schedule_of(api_call(client, "POST", path,
                                    args.timeout or DEFAULT_REQUEST_TIMEOUT_S), client, path)
    if args.json:
        emit_json({"error": False, "schedule": schedule})
    elif args.action == "enable":
        print(f"schedule {args.id} enabled; next run at {local_time(schedule.get('next_run_at'))}")
    else:
        print(f"schedule {args.id} disabled")
    return EXIT_OK


def cmd_select(args: argparse.Namespace) -> int:
    client = session_client(args)
    selector = " ".join(args.selector)
    data = selector_call(client, "GET", "/api/v1/selector", args.timeout or DEFAULT_REQUEST_TIMEOUT_S,
                         selector, query={"selector": selector, "type": args.type})
    agents = [str(a) for a in data.get("agents") or []]
    if args.json:
        emit_json({"error": False, "selector": selector, "agents": agents, "count": len(agents)})
        return EXIT_OK
    for name in agents:
        print(safe(name))
    warn(f"{plural(len(agents), 'agent')} match {safe(selector)}")
    return EXIT_OK


def cmd_batch(args: argparse.Namespace) -> int:
    source = args.file or "-"
    try:
        raw = sys.stdin.read() if source == "-" else Path(source).expanduser().read_text(
            encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CtlError(f"cannot read {source}: {getattr(e, 'strerror', None) or e}",
                       EXIT_USAGE) from e
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise CtlError(f"{'stdin' if source == '-' else source} is not JSON: {e}",
                       EXIT_USAGE) from e
    submits = doc.get("submits") if isinstance(doc, dict) else doc
    if not isinstance(submits, list) or not submits:
        raise CtlError('expected {"submits": [{"targets": [...], "task": {...}}, ...]} or the '
                       "list alone", EXIT_USAGE)
    client = session_client(args)
    data = api_call(client, "POST", "/api/v1/batches", args.timeout or DEFAULT_REQUEST_TIMEOUT_S,
                    body={"submits": submits})
    parts = data.get("submits")
    if not isinstance(parts, list):
        raise client.unexpected(Answer(202, data, None), "/api/v1/batches")
    if args.json:
        emit_json({"error": False, "submits": parts})
        return EXIT_OK
    rows = []
    for number, (part, sent) in enumerate(zip(parts, submits), 1):
        kind = sent.get("task", {}).get("type") if isinstance(sent, dict) else None
        for t in part.get("tasks") or []:
            rows.append([str(number), str(t.get("id")), safe(t.get("target")), safe(kind)])
    print_table(["SUBMIT", "TASK", "TARGET", "TYPE"], rows)
    warn(f"stored {plural(len(parts), 'submit')} ({plural(len(rows), 'task')}) at once; "
         "follow them with `dutctl history`")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

class ArgParser(argparse.ArgumentParser):
    """Raises instead of exiting, so usage errors share the error path (and --json) of everything else."""

    def error(self, message: str) -> NoReturn:
        raise CtlError(f"{message}\n{self.format_usage().rstrip()}", EXIT_USAGE)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def build_parser() -> ArgParser:
    # Options every command takes, accepted before or after the subcommand: SUPPRESS keeps a
    # subparser's unset copy from overwriting a value the main parser already took.
    common = ArgParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print exactly one JSON document on stdout")
    common.add_argument("--timeout", type=positive_float, metavar="S", default=argparse.SUPPRESS,
                        help=f"run/task: wait at most S seconds for results (default "
                             f"{DEFAULT_WAIT_S:g}); other commands: per request "
                             f"(default {DEFAULT_REQUEST_TIMEOUT_S:g})")
    common.add_argument("--server", metavar="URLS", default=argparse.SUPPRESS,
                        help="the server, or several nodes of one fleet as a comma list "
                             "(URL1,URL2): the first that answers is used (default: the "
                             "session's, or $DUTCTL_URL)")

    parser = ArgParser(prog="dutctl", parents=[common], description="Terminal client of dutserver.",
                       epilog="Exit status: 0 ok; 1 a target failed or timed out; 2 usage error or "
                              "unknown agent; 3 authentication; 4 server unreachable; "
                              "130 interrupted.")
    parser.add_argument("--version", action="version", version=f"dutctl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgParser)
    sub.required = True

    def add(name: str, handler: Callable[[argparse.Namespace], int], help_text: str,
            **kwargs: Any) -> ArgParser:
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text, **kwargs)
        p.set_defaults(handler=handler)
        return p

    p = add("login", cmd_login, "log in; the password is read from stdin")
    p.add_argument("url", nargs="?", metavar="URL",
                   help="server, e.g. https://dut.example:8080, or the nodes of one fleet as a comma "
                        "list (default: --server, $DUTCTL_URL or the last one)")
    p.add_argument("--user", "-u", metavar="NAME", help="admin account (default: the last one)")
    p.add_argument("--cacert", metavar="FILE", help="CA certificate to trust for an https server")

    add("logout", cmd_logout, "end the session on the server and forget it here")
    p = add("agents", cmd_agents, "list agents (name, online, last seen, version), or act on "
            "enrollment requests and enrolled agents",
            usage="dutctl agents [options] [pending|accept|reject|revoke|rekey|adopt|label] …")
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=ArgParser,
                               prog="dutctl agents")

    def action(name: str, handler: Callable[[argparse.Namespace], int], help_text: str,
               **kwargs: Any) -> ArgParser:
        q = actions.add_parser(name, parents=[common], help=help_text, description=help_text,
                               **kwargs)
        q.set_defaults(handler=handler)
        return q

    def add_label_option(q: ArgParser, help_text: str) -> None:
        q.add_argument("--label", action="append", metavar="KEY=VALUE", help=help_text)

    q = action("pending", cmd_agents_pending, "machines waiting to join: id, kind, name, host, "
               "OS, address, possible duplicate, age")
    q.add_argument("--kind", choices=["agent", "rdfm", "oco"])
    q = action("accept", cmd_agents_decide, "accept pending requests: each becomes an agent",
               epilog="NAME_OR_ID: a request's id, or the name it goes by in `dutctl agents "
                      "pending` (unique among the pending requests).")
    q.add_argument("requests", nargs="*", metavar="NAME_OR_ID")
    q.add_argument("--name", metavar="NEW", help="the agent's name (one request only; default: "
                                                 "the name the request goes by, made unique)")
    add_label_option(q, "a label for the new agents, over the token's (repeatable)")
    q = action("reject", cmd_agents_decide, "reject pending requests")
    q.add_argument("requests", nargs="*", metavar="NAME_OR_ID")
    q = action("revoke", cmd_agents_each, "revoke agents: their credentials stop working at once")
    q.add_argument("names", nargs="*", metavar="NAME")
    q = action("rekey", cmd_agents_each, "have agents make a new credential with their next poll")
    q.add_argument("names", nargs="*", metavar="NAME")
    q = action("adopt", cmd_agents_adopt, "make an existing agent account an enrolled identity "
               "(revocable, re-keyable)")
    q.add_argument("name", metavar="NAME")
    q = action("label", cmd_agents_label, "set an agent's labels: key=value sets one, key- "
               "removes one, the others stay")
    q.add_argument("name", metavar="NAME")
    q.add_argument("pairs", nargs="*", metavar="KEY=VALUE")
    q.add_argument("--replace", action="store_true",
                   help="the labels given become all the agent's labels")

    p = add("tokens", cmd_tokens_list, "enrollment tokens: list, create, revoke",
            usage="dutctl tokens [options] [list|create|revoke] …")
    token_actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=ArgParser,
                                     prog="dutctl tokens")

    def token_action(name: str, handler: Callable[[argparse.Namespace], int],
                     help_text: str) -> ArgParser:
        q = token_actions.add_parser(name, parents=[common], help=help_text,
                                     description=help_text)
        q.set_defaults(handler=handler)
        return q

    token_action("list", cmd_tokens_list, "list enrollment tokens (never the tokens themselves)")
    q = token_action("create", cmd_tokens_create,
                     "create an enrollment token; it is printed this once")
    q.add_argument("--expires", type=duration, metavar="DURATION",
                   help="lifetime: seconds, or 30m, 12h, 1d, 2w (default: the server's, 1 d)")
    uses = q.add_mutually_exclusive_group()
    uses.add_argument("--uses", type=positive_int, metavar="N",
                      help="how many machines may join with it (default 1)")
    uses.add_argument("--unlimited", action="store_true",
                      help="any number of machines until it expires")
    add_label_option(q, "a label the machines get (repeatable)")
    q.add_argument("--auto-accept", action="store_true",
                   help="accept machines without asking (possible duplicates still wait)")
    q.add_argument("--note", metavar="TEXT", help="what the token is for")
    q = token_action("revoke", cmd_tokens_revoke, "revoke an enrollment token: it stops working")
    q.add_argument("id", type=int, metavar="ID")

    def add_wait_options(p: ArgParser) -> None:
        p.add_argument("--no-wait", action="store_true",
                       help="submit, print the task ids and return; tasks wait for offline agents")
        p.add_argument("--expires", type=positive_float, metavar="S",
                       help="the task's deadline: dropped if no agent took it, failed if no result "
                            "came within S seconds (default: the server's, one day)")

    p = add("run", cmd_run, "run a shell command on agents and summarise the results",
            usage="dutctl run [options] TARGETS -- COMMAND…",
            epilog="TARGETS: NAME, NAME,NAME, group:PREFIX, all (online agents). The words after "
                   "-- are joined with spaces and run by the agent's shell, as ssh does.")
    p.add_argument("words", nargs="*", metavar="TARGETS", help=argparse.SUPPRESS)
    add_wait_options(p)

    p = add("task", cmd_task, "submit a task of any type and show the results",
            usage="dutctl task [options] TYPE TARGETS [key=value …]",
            epilog="Values are JSON when they parse as JSON (5, true, {\"a\": 1}, \"quoted "
                   "text\"), else text; key=@FILE takes the text of FILE.")
    p.add_argument("type", metavar="TYPE")
    p.add_argument("targets", metavar="TARGETS")
    p.add_argument("fields", nargs="*", metavar="key=value")
    add_wait_options(p)

    p = add("history", cmd_history, "list past tasks, newest first, or show one task")
    p.add_argument("id", nargs="?", type=int, metavar="ID", help="show this task in full")
    p.add_argument("--target", metavar="NAME")
    p.add_argument("--state", choices=["queued", "delivered", "done", "failed", "cancelled",
                                       "expired"])
    p.add_argument("--by", metavar="USER", help="submitted by this account")
    p.add_argument("--limit", type=int, default=20, metavar="N", help="at most N tasks (default 20)")
    p.add_argument("--before-id", type=int, metavar="ID", help="page: only tasks older than ID")

    p = add("selfreg", cmd_selfreg, "show or switch agent self-registration")
    p.add_argument("state", nargs="?", choices=["on", "off"])

    p = add("job", cmd_job_list, "fleet jobs: one task to many agents, in waves with a failure "
            "budget", usage="dutctl job [options] [run|list|show|pause|resume|continue|abort|"
            "rerun|buckets|targets] …")
    job_actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=ArgParser,
                                   prog="dutctl job")

    def job_action(name: str, handler: Callable[[argparse.Namespace], int], help_text: str,
                   **kwargs: Any) -> ArgParser:
        q = job_actions.add_parser(name, parents=[common], help=help_text,
                                   description=help_text, **kwargs)
        q.set_defaults(handler=handler)
        return q

    def add_job_options(q: ArgParser) -> None:
        q.add_argument("agents", nargs="*", metavar="AGENT", help=argparse.SUPPRESS)
        q.add_argument("--selector", "-l", metavar="SELECTOR",
                       help="the agents a selector matches (see `dutctl select`)")
        q.add_argument("--cmd", metavar="COMMAND", help="run this shell command (execute_cmd)")
        q.add_argument("--canary", type=count_value, metavar="N|P%",
                       help="a first wave of this many agents")
        q.add_argument("--wave", type=count_value, metavar="N|P%",
                       help="then waves of this many agents (default: all the rest at once)")
        q.add_argument("--pause", type=pause_value, metavar="S|manual",
                       help="between waves: wait S seconds (30, 5m), or `manual`: pause until "
                            "`dutctl job resume`")
        q.add_argument("--max-failures", type=count_value, metavar="N|P%",
                       help="failure budget: more failures than this pause the job before the "
                            "next wave")
        q.add_argument("--offline", choices=["queue", "skip"],
                       help="agents offline when their wave goes: queue (wait for them; "
                            "default) or skip")
        q.add_argument("--expires", type=duration, metavar="S",
                       help="each task's deadline (seconds, or 30m, 12h, 1d; default: the "
                            "server's)")
        q.add_argument("--no-nonzero-fails", action="store_true",
                       help="a non-zero exit status does not count as a failure")
        q.add_argument("--window", type=window_value, action="append", metavar="SPAN",
                       help="a maintenance window: tasks are delivered only inside it, e.g. "
                            "'fri 18:00-23:00', 'mon-fri 22:00-02:00' (repeatable)")
        q.add_argument("--not-window", type=window_value, action="append", metavar="SPAN",
                       help="a span when nothing is delivered, even inside a window "
                            "(repeatable)")
        q.add_argument("--tz", metavar="ZONE",
                       help="the time zone of the windows (and of a schedule), e.g. "
                            "Europe/Paris (default: the server's)")

    def add_follow_options(q: ArgParser) -> None:
        q.add_argument("--follow", "-f", action="store_true",
                       help="show the job live until it is done, aborted or paused")
        q.add_argument("--follow-paused", action="store_true",
                       help="with --follow: keep following while the job is paused (until "
                            "someone resumes or aborts it)")

    q = job_action("run", cmd_job_run, "start a job: a task to agents or a selector's agents",
                   usage="dutctl job run [options] (--selector SELECTOR | AGENT…) "
                         "(--cmd COMMAND | -- TYPE [key=value …])",
                   epilog="AGENT: names, comma lists, group:PREFIX, all (as for run). N|P%: a "
                          "number of agents or a percentage (20%). Values after TYPE are JSON "
                          "when they parse as JSON, else text; key=@FILE takes a file's text.")
    add_job_options(q)
    add_follow_options(q)
    job_action("list", cmd_job_list, "jobs, newest first")
    for q in (p, job_actions.choices["list"]):
        q.add_argument("--state", choices=list(JOB_STATES))
        q.add_argument("--limit", type=positive_int, default=20, metavar="N",
                       help="at most N jobs (default 20)")
        q.add_argument("--before-id", type=int, metavar="ID", help="page: only jobs older than ID")
    q = job_action("show", cmd_job_show, "a job: its state, waves, failures and result buckets")
    q.add_argument("id", type=int, metavar="ID")
    add_follow_options(q)
    for name, text in (("pause", "pause a running job: nothing more is sent until it is "
                        "resumed"),
                       ("resume", "resume a paused job"),
                       ("continue", "resume a job its failure budget paused, with no budget "
                        "from now on"),
                       ("abort", "abort a job: its queued tasks are cancelled")):
        q = job_action(name, cmd_job_act, text)
        q.add_argument("id", type=int, metavar="ID")
    q = job_action("rerun", cmd_job_rerun, "a new job with the same task, to one bucket's "
                   "agents or to the failed ones")
    q.add_argument("id", type=int, metavar="ID")
    q.add_argument("--bucket", type=int, metavar="N", help="the agents of bucket N "
                   "(see `dutctl job buckets ID`; 0 is the largest)")
    q.add_argument("--failed", action="store_true", help="the agents whose task failed")
    add_follow_options(q)
    q = job_action("buckets", cmd_job_buckets, "a job's results grouped by what they said, "
                   "largest first")
    q.add_argument("id", type=int, metavar="ID")
    q.add_argument("--digits", action="store_true",
                   help="results that differ only in numbers are one bucket")
    q.add_argument("--no-normalize", action="store_true",
                   help="trailing whitespace counts (it is ignored by default)")
    q = job_action("targets", cmd_job_targets, "a job's agents with their wave, state and "
                   "result, by name")
    q.add_argument("id", type=int, metavar="ID")
    q.add_argument("--after", metavar="NAME", help="page: the agents after NAME")
    q.add_argument("--limit", type=positive_int, default=200, metavar="N",
                   help="at most N agents (default 200)")

    p = add("schedule", cmd_schedule_list, "schedules: a job made at cron times, once, or "
            "every N seconds", usage="dutctl schedule [options] [add|list|rm|enable|disable] …")
    schedule_actions = p.add_subparsers(dest="action", metavar="ACTION",
                                        parser_class=ArgParser, prog="dutctl schedule")

    def schedule_action(name: str, handler: Callable[[argparse.Namespace], int],
                        help_text: str, **kwargs: Any) -> ArgParser:
        q = schedule_actions.add_parser(name, parents=[common], help=help_text,
                                        description=help_text, **kwargs)
        q.set_defaults(handler=handler)
        return q

    q = schedule_action(
        "add", cmd_schedule_add, "make a schedule: each run starts a job (a selector is "
        "resolved at each run)",
        usage="dutctl schedule add [options] (--cron EXPR | --at TIME | --every S) "
              "(--selector SELECTOR | AGENT…) (--cmd COMMAND | -- TYPE [key=value …])",
        epilog="EXPR: five cron fields, e.g. '0 18 * * fri', or @daily, @hourly …; TIME: ISO "
               "8601, e.g. 2026-05-01T18:00 (in --tz without an offset). A run is skipped "
               "while the job of the previous one still runs.")
    when = q.add_mutually_exclusive_group()
    when.add_argument("--cron", metavar="EXPR", help="at these times (cron)")
    when.add_argument("--at", metavar="TIME", help="once, at this time")
    when.add_argument("--every", type=duration, metavar="S",
                      help="every S seconds (or 30m, 12h, 1d)")
    q.add_argument("--name", metavar="TEXT", help="what it is for")
    q.add_argument("--disabled", action="store_true", help="made switched off")
    add_job_options(q)
    schedule_action("list", cmd_schedule_list, "schedules, newest first, with their next and "
                    "last runs")
    q = schedule_action("rm", cmd_schedule_rm, "delete schedules: they never run again (their "
                        "jobs stay)")
    q.add_argument("ids", nargs="+", type=int, metavar="ID")
    for name, text in (("enable", "switch a schedule on, from its next time after now"),
                       ("disable", "switch a schedule off (its running job goes on)")):
        q = schedule_action(name, cmd_schedule_switch, text)
        q.add_argument("id", type=int, metavar="ID")

    p = add("select", cmd_select, "which agents a selector matches now (one name a line)",
            usage="dutctl select [options] SELECTOR",
            epilog="e.g. dutctl select 'room=204,os=windows'; see docs/dutctl.md for the "
                   "grammar.")
    p.add_argument("selector", nargs="+", metavar="SELECTOR")
    p.add_argument("--type", metavar="TYPE",
                   help="leave out agents that do not run this task type")

    p = add("batch", cmd_batch, "submit several tasks at once, all stored or none",
            usage="dutctl batch [options] [FILE.json | -]",
            epilog='FILE: {"submits": [{"targets": [...], "task": {"type": ...}, '
                   '"expires_s": S}, ...]} (or the list alone); - or nothing reads stdin.')
    p.add_argument("file", nargs="?", metavar="FILE")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    command_words = None
    task_words = None
    # Everything after the first `--` of `run` is the command, even words that look like
    # options; after that of `job run`, the task (TYPE key=value…).
    if "--" in argv:
        cut = argv.index("--")
        head, _ = parser.parse_known_args(argv[:cut])
        if head.command == "run":
            argv, command_words = argv[:cut], argv[cut + 1:]
        elif (head.command, getattr(head, "action", None)) in (("job", "run"),
                                                                ("schedule", "add")):
            argv, task_words = argv[:cut], argv[cut + 1:]
    args, extra = parser.parse_known_args(argv)
    # argparse takes no more positionals once an option followed the first ones
    # (`task ping pc1 --no-wait n=5`), so such leftovers go to the command's trailing list.
    trailing = {"run": "words", "task": "fields", "select": "selector"}.get(args.command)
    if args.command == "agents":
        trailing = {"accept": "requests", "reject": "requests", "revoke": "names",
                    "rekey": "names", "label": "pairs"}.get(str(getattr(args, "action", None)))
    if args.command in ("job", "schedule"):
        trailing = "agents" if getattr(args, "action", None) in ("run", "add") else None
    stray = [word for word in extra if trailing is None or word.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if trailing:
        getattr(args, trailing).extend(extra)
    args.command_words = command_words
    args.task_words = task_words
    return finish_args(args)


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    args.json = getattr(args, "json", False)
    args.timeout = getattr(args, "timeout", None)
    args.server = getattr(args, "server", None)
    args.action = getattr(args, "action", None)
    return args


def wants_json(argv: list[str]) -> bool:
    return "--json" in (argv[:argv.index("--")] if "--" in argv else argv)


def raise_interrupted(signum: int, frame: Any) -> NoReturn:
    raise Interrupted()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = wants_json(argv)
    previous_handler = signal.getsignal(signal.SIGTERM)
    # Signal handlers can only be set from the main thread (tests may call main() from others).
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        signal.signal(signal.SIGTERM, raise_interrupted)
    try:
        args = parse_args(argv)
        return int(args.handler(args))
    except CtlError as e:
        warn(e.msg)
        if as_json:
            emit_json({"error": True, "msg": e.msg.splitlines()[0], "exit_code": e.exit_code})
        return e.exit_code
    except (KeyboardInterrupt, Interrupted):
        warn("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader (`| head`) went away; Python would complain again at exit while flushing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)


if __name__ == "__main__":
    sys.exit(main())
