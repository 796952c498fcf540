"""Helpers of the agent tests: real `cli/dutagent.py` subprocesses and an admin client.

The agent runs exactly as on a PC: `python dutagent.py run …` in its own process, talking
HTTP to a real server subprocess (or, for the classic-protocol and garbage tests, to a small
fake server in the test, since the classic Go server is not here).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from support import PYTHON, ROOT, RunningServer, http, stop_process, wait_until

AGENT_PY = ROOT / "cli" / "dutagent.py"
AGENT_SECRET = "agent-secret-0123456789"
# Each agent runs in a directory named after it, so this command tells them apart:
# lab-3 prints something else and fails, the others agree.
SPLIT_COMMAND = 'if [ "${PWD##*/}" = lab-3 ]; then echo odd one; exit 3; fi; echo same text'

# Retry delays in milliseconds instead of seconds, so that tests of failures stay fast.
FAST_AGENT_ARGS = [
    "--backoff-min-s",
    "0.05",
    "--backoff-max-s",
    "0.3",
    "--forbidden-backoff-s",
    "0.4",
    "--poll-timeout-s",
    "10",
    "--grace-s",
    "5",
    "--log-level",
    "DEBUG",
]


class AgentProcess:
    """A real agent subprocess; its stderr (the log) goes to a file the test can read."""

    def __init__(
        self,
        argv: list[str],
        log: Path,
        env: dict[str, str] | None = None,
        python: str = PYTHON,
        program: Path = AGENT_PY,
        **popen: Any,
    ) -> None:
        self.log = log
        self.argv = argv
        with open(log, "ab") as logf:
            self.proc = subprocess.Popen(
                [python, str(program), *argv],
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env if env is not None else agent_env(),
                **popen,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.output()))

    def wait_for_log(self, pattern: str, timeout_s: float = 5.0) -> str:
        def found() -> str | None:
            if self.proc.poll() is not None and not re.search(pattern, self.output()):
                raise AssertionError(f"agent exited ({self.proc.returncode}):\n{self.output()}")
            match = re.search(pattern, self.output())
            return match.group(0) if match else None

        try:
            return str(wait_until(found, timeout_s=timeout_s))
        except AssertionError:
            raise AssertionError(
                f"{pattern!r} not logged within {timeout_s} s:\n{self.output()}"
            ) from None

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> int:
        # The output is read only on failure, when the process has been killed.
        try:
            return stop_process(self.proc, sig, timeout_s, f"agent did not stop in {timeout_s} s")
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{self.output()}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def process_gone(pid: int) -> bool:
    """True once pid has ended (a zombie nobody reaped yet counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def agent_env(**extra: str) -> dict[str, str]:
    """The test's environment without DUTAGENT_* settings that could leak into the agent."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUTAGENT_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def start_agent(
    tmp_path: Path, url: str, name: str, *args: str, secret: str = AGENT_SECRET, **kwargs: Any
) -> AgentProcess:
    log = tmp_path / f"agent-{name}-{time.monotonic_ns()}.log"
    argv = ["run", "--server", url, "--name", name, "--secret", secret, *FAST_AGENT_ARGS, *args]
    return AgentProcess(argv, log, **kwargs)


def agent_cli(
    *args: str, env: dict[str, str] | None = None, python: str = PYTHON, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Runs `dutagent.py ARGS…` to completion (register, --version, bad usage…)."""
    return subprocess.run(
        [python, str(AGENT_PY), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        env=env if env is not None else agent_env(),
        stdin=subprocess.DEVNULL,
    )


class Admin:
    """An admin session on a real server: accounts, blocking and queued submits."""

    def __init__(self, server: RunningServer) -> None:
        self.server = server
        self.token = server.login()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": self.token}

    def _http(self, method: str, url: str, body: Any = None,
              headers: dict[str, str] | None = None, timeout: float = 10.0
              ) -> tuple[int, Any, bytes]:
        """support.http, verifying an https server as the server's helpers do."""
        return http(method, url, body, headers, timeout=timeout,
                    context=self.server.client_context)

    def add_agent(self, name: str, secret: str = AGENT_SECRET) -> None:
        status, _, body = self._http(
            "POST",
            f"{self.server.url}/api/v1/accounts",
            {"name": name, "type": "agent", "password": secret},
            self.headers,
        )
        assert status in (200, 201), body

    def run(self, target: str, task: dict[str, Any], timeout_s: float = 10) -> dict[str, Any]:
        """Blocking submit (PROTOCOL part 1): the agent's result as the server returns it."""
        status, _, body = self._http(
            "POST",
            f"{self.server.url}/tasks?target={target}&timeout={timeout_s}",
            task,
            self.headers,
            timeout=timeout_s + 5,
        )
        assert status == 200, (status, body)
        result = json.loads(body)
        assert isinstance(result, dict)
        return result

    def enqueue(self, target: str, task: dict[str, Any]) -> int:
        """Non-blocking submit (PROTOCOL part 2): the new task's id."""
        status, _, body = self._http(
            "POST",
            f"{self.server.url}/api/v1/tasks",
            {"targets": [target], "task": task},
            self.headers,
        )
        assert status == 202, (status, body)
        return int(json.loads(body)["tasks"][0]["id"])

    def task(self, task_id: int, wait_s: float = 0) -> dict[str, Any]:
        query = f"?wait_s={wait_s}" if wait_s else ""
        status, _, body = self._http(
            "GET",
            f"{self.server.url}/api/v1/tasks/{task_id}{query}",
            headers=self.headers,
            timeout=wait_s + 10,
        )
        assert status == 200, (status, body)
        return dict(json.loads(body)["task"])

    def finished(self, task_id: int, wait_s: float = 10) -> dict[str, Any]:
        task = self.task(task_id, wait_s=wait_s)
        assert task["state"] in ("done", "failed"), task
        return task

    def agent(self, name: str) -> dict[str, Any]:
        status, _, body = self._http(
            "GET", f"{self.server.url}/api/v1/agents/{name}", headers=self.headers
        )
        assert status == 200, body
        return dict(json.loads(body)["agent"])

    def set_selfreg(self, enabled: bool) -> None:
        status, _, body = self._http(
            "POST", f"{self.server.url}/agent_selfreg?enabled={int(enabled)}", b"", self.headers
        )
        assert status == 200, body


Responder = Callable[[BaseHTTPRequestHandler], None]


class FakeServer:
    """A tiny scripted HTTP server for what the real one cannot do: speak only the classic
    protocol, answer garbage, refuse results a few times.

    `on_poll` answers each GET /tasks (a queue of responders; when empty, an empty task after a
    short wait, like a long-poll timing out). Every POST is recorded in `posts`; `on_post`
    decides its status (default 200)."""

    def __init__(self) -> None:
        self.polls: list[dict[str, str]] = []
        self.posts: list[tuple[str, dict[str, str], bytes]] = []
        self.hellos: list[bytes] = []  # the agent's POST /api/v1/agent/hello bodies, not in posts
        self.poll_script: list[Responder] = []
        self.post_statuses: list[int] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                with fake.lock:
                    fake.polls.append(
                        {k.lower(): v for k, v in self.headers.items()}
                        | {"path": self.path, "client_port": str(self.client_address[1])}
                    )
                    step = fake.poll_script.pop(0) if fake.poll_script else None
                if step is None:
                    time.sleep(0.2)
                    send_json(self, 200, {})
                else:
                    step(self)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if self.path.endswith("/api/v1/agent/hello"):
                    # Said once per (re)start of polling; this fake is a server older than that.
                    with fake.lock:
                        fake.hellos.append(body)
                    send_json(self, 404, {"error": True, "msg": "Not found"})
                    return
                with fake.lock:
                    fake.posts.append(
                        (self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                    )
                    status = fake.post_statuses.pop(0) if fake.post_statuses else 200
                if status == 200:
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    send_json(self, status, {"error": True, "msg": f"scripted {status}"})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> FakeServer:  # noqa: PYI034 -- typing.Self is 3.11+, tests run on 3.11 anyway
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def script(self, *steps: Responder) -> None:
        with self.lock:
            self.poll_script.extend(steps)

    def results(self) -> dict[str, Any]:
        """Posted results by path: {"/tasks_result?id=7": {...}}."""
        with self.lock:
            return {path: json.loads(body) for path, _, body in self.posts}


def send_json(handler: BaseHTTPRequestHandler, status: int, value: Any) -> None:
    send_raw(handler, status, json.dumps(value).encode())


def send_raw(
    handler: BaseHTTPRequestHandler, status: int, body: bytes, content_length: int | None = None
) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header(
        "Content-Length", str(len(body) if content_length is None else content_length)
    )
    handler.end_headers()
    try:
        handler.wfile.write(body)
        handler.wfile.flush()
    except OSError:
        pass  # the agent hung up on purpose (too big an answer)
    if content_length is not None and content_length != len(body):
        handler.close_connection = True
