"""Helpers of the protocol conformance tests: a classic agent's two calls, a session client,
blocking submits in a thread, and one shared server per test module.

The agent here is deliberately the smallest thing that speaks PROTOCOL part 1 (GET /tasks,
POST /tasks_result), driven step by step by the test, so each test decides exactly when a task
is taken and when its result arrives.
"""

from __future__ import annotations

import base64
import itertools
import json
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from support import RunningServer, http, start_server

# A shared server: empty polls end quickly; bans are set high so that the deliberate credential
# failures of one test cannot lock out the next (tests that check bans start their own server).
SHARED_ARGS = ["--poll-timeout-s", "0.5", "--ban-address-failures", "100000",
               "--ban-failures", "1000"]

_names = itertools.count(1)


def unique(prefix: str) -> str:
    """A fresh account name, so tests sharing one server never see each other's agents."""
    return f"{prefix}{next(_names)}-{time.monotonic_ns() % 100000}"


def jbody(body: bytes) -> Any:
    return json.loads(body) if body else None


def when(value: str) -> datetime:
    """An ISO 8601 time in UTC, as the API writes them."""
    assert isinstance(value, str) and value.endswith(("Z", "+00:00")), value
    parsed = datetime.fromisoformat(value)
    assert parsed.utcoffset() == timedelta(0)
    return parsed


def recent(value: str, within_s: float = 30) -> bool:
    return abs((datetime.now(UTC) - when(value)).total_seconds()) < within_s


def basic(name: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{name}:{secret}".encode()).decode()


@dataclass
class Agent:
    """One agent account: its two classic calls, with either header form."""

    url: str
    name: str
    secret: str
    user_agent: str | None = None

    def auth(self, form: str = "basic") -> dict[str, str]:
        value = basic(self.name, self.secret) if form == "basic" else f"{self.name}:{self.secret}"
        headers = {"Authorization": value}
        if self.user_agent:
            headers["User-Agent"] = self.user_agent
        return headers

    def poll_raw(self, form: str = "basic", timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
        return http("GET", self.url + "/tasks", headers=self.auth(form), timeout=timeout)

    def poll(self, form: str = "basic") -> dict[str, Any]:
        """One long-poll: the task, or {} when the poll timed out."""
        status, _, body = self.poll_raw(form)
        assert status == 200, (status, body)
        task = json.loads(body)
        assert isinstance(task, dict)
        return task

    def take(self, form: str = "basic", timeout_s: float = 5) -> dict[str, Any]:
        """Polls until a task comes (a submit racing the first poll may land on the next one)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            task = self.poll(form)
            if task:
                return task
        raise AssertionError(f"agent {self.name} got no task within {timeout_s} s")

    def post(self, task_id: Any, result: Any, path: str = "/tasks_result",
             form: str = "basic") -> tuple[int, dict[str, str], bytes]:
        body = result if isinstance(result, bytes) else json.dumps(result).encode()
        return http("POST", f"{self.url}{path}?id={task_id}", body, headers=self.auth(form))


def session_headers(token: str, form: str = "bare") -> dict[str, str]:
    return {"Authorization": f"Bearer {token}" if form == "bearer" else token}


def call(srv: RunningServer, method: str, path: str, body: Any = None,
         token: str | None = None, headers: dict[str, str] | None = None,
         timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    h = dict(headers or {})
    if token is not None:
        h.update(session_headers(token))
    return http(method, srv.url + path, body, headers=h, timeout=timeout)


def api(srv: RunningServer, method: str, path: str, body: Any = None,
        token: str | None = None) -> tuple[int, Any]:
    """A native API call: (status, parsed JSON)."""
    status, _, raw = call(srv, method, path, body, token)
    return status, jbody(raw)


def add_agent(srv: RunningServer, token: str, prefix: str = "pc",
              user_agent: str | None = None) -> Agent:
    """Registers a fresh agent with the admin session (POST /agents) and returns it."""
    name = unique(prefix)
    secret = f"secret-of-{name}-0123456789"
    status, _, body = call(srv, "POST", "/agents?" + urlencode({"user": name, "pass": secret}),
                           token=token)
    assert status == 200, (status, body)
    return Agent(srv.url, name, secret, user_agent)


def submit(pool: ThreadPoolExecutor, srv: RunningServer, token: str, target: str,
           task: Any, timeout_s: float | None = None,
           form: str = "bare") -> Future[tuple[int, dict[str, str], bytes]]:
    """A blocking classic submit (POST /tasks) running in a thread."""
    query = {"target": target}
    if timeout_s is not None:
        query["timeout"] = str(timeout_s)
    body = task if isinstance(task, bytes) else json.dumps(task).encode()
    return pool.submit(http, "POST", f"{srv.url}/tasks?{urlencode(query)}", body,
                       session_headers(token, form), 30)


@pytest.fixture(scope="module", name="shared")
def shared_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One real server for the module's tests that need no flags of their own."""
    srv = start_server(tmp_path_factory.mktemp("shared"), *SHARED_ARGS)
    yield srv
    srv.stop()


@pytest.fixture(scope="module", name="token")
def token_fixture(shared: RunningServer) -> str:
    return shared.login()


@pytest.fixture(name="pool")
def pool_fixture() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(8) as executor:
        yield executor


def own_server(tmp_path: Path, *args: str) -> RunningServer:
    return start_server(tmp_path, *SHARED_ARGS, *args)
