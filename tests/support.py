"""Helpers shared by the test modules: real servers on free ports, real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
ADMIN = ("admin", "adminpass1")

# Short timeouts so tests run in milliseconds, not in the defaults' seconds.
FAST_ARGS = [
    "--poll-timeout-s", "1",
    "--online-grace-s", "0.3",
    "--submit-timeout-s", "5",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Any, timeout_s: float = 5.0, interval_s: float = 0.01) -> Any:
    """Polls predicate until it returns something truthy; fails the test on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s: {predicate}")
        time.sleep(interval_s)


def cli(*args: str, stdin: str = "", check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Runs `python -m dutserver ARGS…` as a subprocess (env: variables added)."""
    proc = subprocess.run(
        [PYTHON, "-m", "dutserver", *args],
        input=stdin, capture_output=True, text=True, timeout=30, cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"dutserver {args} failed ({proc.returncode}): {proc.stderr}")
    return proc


def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
         timeout: float = 10.0, context: ssl.SSLContext | None = None) -> tuple[int, Any, bytes]:
    """A bare HTTP call with the standard library: (status, headers, body).

    headers is the case-insensitive email.message.Message of http.client. Never raises on
    4xx/5xx. context verifies an https server (default: the system's trust store)."""
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def stop_process(proc: subprocess.Popen[Any], sig: int, timeout_s: float, failure: str) -> int:
    """Signals proc and waits for its exit status; kills it and fails the test if it hangs."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(failure) from None


@dataclass(frozen=True)
class Tls:
    """A throwaway CA (trustme) and a server certificate it signed, as PEM files."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def make(cls, directory: Path, *names: str) -> Tls:
        """A new CA and a certificate for names (default 127.0.0.1 and localhost) in directory."""
        import trustme

        ca = trustme.CA()
        issued = ca.issue_cert(*(names or ("127.0.0.1", "localhost")))
        directory.mkdir(parents=True, exist_ok=True)
        tls = cls(directory / "cert.pem", directory / "key.pem", directory / "ca.pem")
        issued.cert_chain_pems[0].write_to_path(str(tls.cert))
        issued.private_key_pem.write_to_path(str(tls.key))
        ca.cert_pem.write_to_path(str(tls.ca))
        return tls

    @property
    def server_args(self) -> list[str]:
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key)]

    def context(self) -> ssl.SSLContext:
        """A client context that trusts only this CA."""
        return ssl.create_default_context(cafile=str(self.ca))


@dataclass
class RunningServer:
    """A real `dutserver server PORT DBFILE` subprocess.

    For an https server, ssl_context is what the helpers (readiness, login, the agent tests'
    Admin) verify it with; without one they accept any certificate."""

    db: Path | str  # an SQLite file, or a PostgreSQL URL (then say where the log goes)
    args: list[str] = field(default_factory=list)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    scheme: str = "http"
    ssl_context: ssl.SSLContext | None = None

    @property
    def client_context(self) -> ssl.SSLContext | None:
        if self.scheme != "https" or self.ssl_context is not None:
            return self.ssl_context
        return ssl._create_unverified_context()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self, port: int | None = None) -> RunningServer:
        self.port = port or self.port or free_port()
        if self.log is None:
            assert isinstance(self.db, Path), "a server on PostgreSQL needs its log's path"
            self.log = self.db.with_suffix(".log")
        logf = open(self.log, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "dutserver", "server", str(self.port), str(self.db), *self.args],
            stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
        )
        logf.close()
        wait_until(self._ready, timeout_s=15)
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"server exited ({self.proc.returncode}):\n{self.output()}")
        try:
            with urllib.request.urlopen(self.url + "/readyz", timeout=1,
                                        context=self.client_context) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""

    def add_account(self, name: str, kind: str, password: str) -> None:
        cli("addaccount", str(self.db), name, kind, stdin=password + "\n")

    def login(self, user: str = ADMIN[0], password: str = ADMIN[1]) -> str:
        status, _, body = http("GET", f"{self.url}/login?user={user}&pass={password}",
                               context=self.client_context)
        assert status == 200, body
        return str(json.loads(body)["token"])

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10) -> int:
        assert self.proc is not None
        return stop_process(self.proc, sig, timeout_s, "server did not stop in time")

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> RunningServer:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        return self.start()


def start_server(tmp_path: Path, *args: str, admin: bool = True,
                 tls: Tls | None = None) -> RunningServer:
    """Starts a server on a fresh database with an admin account ADMIN and fast timeouts;
    with tls, on https with that certificate, and helpers that trust only its CA."""
    db = tmp_path / "dut.db"
    if admin:
        cli("addaccount", str(db), ADMIN[0], "admin", stdin=ADMIN[1] + "\n")
    if tls is None:
        return RunningServer(db=db, args=[*FAST_ARGS, *args]).start()
    return RunningServer(db=db, args=[*FAST_ARGS, *tls.server_args, *args], scheme="https",
                         ssl_context=tls.context()).start()


def basic(name: str, secret: str) -> dict[str, str]:
    """HTTP Basic agent credentials."""
    import base64
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{secret}".encode()).decode()}


def loads(body: bytes) -> Any:
    return json.loads(body) if body else None


class PollingAgent:
    """A protocol-level agent in a thread: polls GET /tasks and answers with answer(task).

    For server tests that need an agent but are about the server; the real agent
    (cli/dutagent.py) has its own end-to-end tests."""

    def __init__(self, url: str, name: str, secret: str,
                 answer: Any = lambda task: {"echo": task}) -> None:
        import threading
        self.url, self.name, self.secret, self.answer = url, name, secret, answer
        self.received: list[dict[str, Any]] = []
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> PollingAgent:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        headers = basic(self.name, self.secret)
        while not self._stop.is_set():
            try:
                status, _, body = http("GET", f"{self.url}/tasks", headers=headers, timeout=5)
            except OSError:
                time.sleep(0.05)
                continue
            self.statuses.append(status)
            if status != 200:
                time.sleep(0.05)
                continue
            task = json.loads(body)
            if not task:
                continue
            self.received.append(task)
            result = self.answer(task)
            if result is not None:
                http("POST", f"{self.url}/tasks_result?id={task['id']}", result, headers)
