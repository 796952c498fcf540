"""The parties of a benchmark, speaking the classic protocol: accounts, admin sessions, agents, submitters."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import secrets
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from bench.loadgen import Connection, ProtocolError, Response, Target, error_kind

# Errors that mean "the server is not there right now" (restart, crash): the agent retries.
TRANSIENT = (OSError, ProtocolError, TimeoutError)


@dataclass(frozen=True, slots=True)
class Credentials:
    name: str
    secret: str


class BenchError(Exception):
    """A benchmark could not set itself up (bad admin login, refused account creation…)."""


def unique_prefix() -> str:
    """A short name prefix, so runs against a long-lived server never collide (names stay short
    because a fan-out puts all of them into one URL)."""
    return "b" + secrets.token_hex(2) + "-"


async def login(target: Target, user: str, password: str) -> str:
    conn = Connection(target)
    try:
        r = await conn.request("GET", f"/login?user={quote(user)}&pass={quote(password)}",
                               timeout_s=30)
    finally:
        conn.close()
    if r.status != 200:
        raise BenchError(f"admin login failed: {r.status} {r.body[:200]!r}")
    return str(r.json()["token"])


async def create_agents(target: Target, token: str, names: Sequence[str],
                        parallel: int = 8) -> list[Credentials]:
    """Creates agent accounts through `POST /agents` with an admin session (works on the classic
    server too, where that route may need self-registration switched on: then it is switched on
    for the duration and restored)."""
    creds = [Credentials(n, secrets.token_urlsafe(18)) for n in names]
    conn = Connection(target, {"Authorization": token})
    try:
        first = await _create_one(conn, creds[0]) if creds else 200
        restore_selfreg = False
        if first == 405:  # self-registration off and the server wants it on even for admins
            await _set_selfreg(conn, True)
            restore_selfreg = True
            first = await _create_one(conn, creds[0])
        if first != 200:
            raise BenchError(f"creating agent {creds[0].name} failed with {first}")
        pending = iter(creds[1:])
        conns = [conn] + [Connection(target, {"Authorization": token}) for _ in range(parallel - 1)]

        async def work(c: Connection) -> None:
            for cred in pending:
                status = await _create_one(c, cred)
                if status != 200:
                    raise BenchError(f"creating agent {cred.name} failed with {status}")

        try:
            await asyncio.gather(*(work(c) for c in conns))
        finally:
            for c in conns[1:]:
                c.close()
        if restore_selfreg:
            await _set_selfreg(conn, False)
    finally:
        conn.close()
    return creds


async def _create_one(conn: Connection, cred: Credentials) -> int:
    r = await conn.request("POST", f"/agents?user={quote(cred.name)}&pass={quote(cred.secret)}",
                           timeout_s=30)
    return r.status


async def _set_selfreg(conn: Connection, enabled: bool) -> None:
    r = await conn.request("POST", f"/agent_selfreg?enabled={int(enabled)}", timeout_s=30)
    if r.status != 200:
        raise BenchError(f"switching self-registration failed: {r.status} {r.body[:200]!r}")


async def online_agents(conn: Connection, names: set[str] | None = None) -> int:
    """How many agents (of `names`, if given) the server reports online (classic `GET /agents`)."""
    r = await conn.request("GET", "/agents", timeout_s=30)
    if r.status != 200:
        raise BenchError(f"GET /agents: {r.status} {r.body[:200]!r}")
    online: dict[str, bool] = r.json().get("online", {})
    return sum(1 for n, on in online.items() if on and (names is None or n in names))


PING_RESULT = json.dumps({"pong": True, "agent_version": "dutbench"}).encode()


def ping_result(task: dict[str, Any]) -> bytes:
    """What a bench agent answers to any task (a JSON body): instant, like the reference
    agent's `ping`, and encoded once, since the generator's CPU is precious."""
    return PING_RESULT


@dataclass
class AgentCounters:
    """Shared by all agents of a scenario: cheap integer counts plus per-task delivery counts."""

    polls: int = 0
    empty_polls: int = 0
    tasks: int = 0
    results_ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    result_status: Counter[int] = field(default_factory=Counter)  # non-200 answers to results
    deliveries: dict[int, list[str]] | None = None  # task id -> agents that got it, if tracking
    acked_results: set[int] | None = None  # task ids whose result got a 200, when tracking is on
    parked: int = 0  # agents with a poll sent and not yet answered


@dataclass
class Retry:
    """How agents retry after a failure: capped exponential back-off with full jitter, the
    n-th delay random in [0, min(max_s, min_s * 2^n)], as cli/dutagent.py does."""

    min_s: float = 0.05
    max_s: float = 1.0
    fast_empty_s: float = 0.0  # an empty poll answered faster than this counts as a failure

    def delay_s(self, failures: int) -> float:
        return random.uniform(0, min(self.max_s, self.min_s * 2 ** min(failures, 30)))


# The reference agent's defaults (cli/dutagent.py: backoff_min_s, backoff_max_s, FAST_EMPTY_POLL_S).
DUTAGENT_RETRY = Retry(1.0, 60.0, 0.1)
# Every agent back within 0.1 s: the worst herd a server can meet.
EAGER_RETRY = Retry(0.05, 0.1, 0.0)


class Agent:
    """A bench agent: long-polls `GET /tasks`, answers each task at once, polls again.

    On a connection error (server restarting or killed) it retries as `retry` says; a result
    that could not be posted is posted again once the server is back, so a crash can neither
    silently drop nor double a result.
    """

    def __init__(self, target: Target, cred: Credentials, counters: AgentCounters, *,
                 classic_auth: bool = False, poll_timeout_s: float = 330.0,
                 retry: Retry | None = None,
                 answer: Callable[[dict[str, Any]], bytes] = ping_result,
                 source: str | None = None) -> None:
        if classic_auth:
            auth = f"{cred.name}:{cred.secret}"
        else:
            auth = "Basic " + base64.b64encode(f"{cred.name}:{cred.secret}".encode()).decode()
        self.cred = cred
        # Content-Type rides on every request (a GET ignores it) so that request heads stay
        # fixed per path and the generator formats each of them only once.
        self.conn = Connection(target, {"Authorization": auth, "User-Agent": "dutagent/bench",
                                        "Content-Type": "application/json"}, source=source)
        self.counters = counters
        self.result_path = "/task_result" if classic_auth else "/tasks_result"
        self.poll_timeout_s = poll_timeout_s
        self.retry = retry or Retry()  # shared by a fleet, so a scenario can switch it
        self.answer = answer
        self.last_poll_sent = 0.0  # monotonic time of the latest poll written to the server

    async def run(self, stop: asyncio.Event) -> None:
        failures = 0
        c = self.counters
        while not stop.is_set():
            try:
                c.parked += 1
                self.last_poll_sent = sent = time.monotonic()
                try:
                    r = await self.conn.request("GET", "/tasks", timeout_s=self.poll_timeout_s)
                finally:
                    c.parked -= 1
                c.polls += 1
                if r.status != 200:
                    raise _BadStatus(r)
                task = json.loads(r.body.decode())  # str: json skips its encoding sniffing
                if not task:  # the long-poll timed out: poll again at once
                    c.empty_polls += 1
                    if time.monotonic() - sent < self.retry.fast_empty_s:
                        # Not long-polling (a server shutting down answers parked polls at once).
                        await _sleep_unless(stop, self.retry.delay_s(failures))
                        failures += 1
                    else:
                        failures = 0
                    continue
                failures = 0
                task_id = int(task["id"])
                c.tasks += 1
                if c.deliveries is not None:
                    c.deliveries.setdefault(task_id, []).append(self.cred.name)
                await self._post_result(task_id, self.answer(task), stop)
            except asyncio.CancelledError:
                raise
            except (_BadStatus, *TRANSIENT, ValueError, KeyError) as e:
                c.errors[_kind(e)] += 1
                await _sleep_unless(stop, self.retry.delay_s(failures))
                failures += 1

    async def _post_result(self, task_id: int, body: bytes, stop: asyncio.Event) -> None:
        failures = 0
        c = self.counters
        while not stop.is_set():
            try:
                r = await self.conn.request("POST", f"{self.result_path}?id={task_id}", body,
                                            timeout_s=self.poll_timeout_s, reuse_head=False)
            except TRANSIENT as e:
                c.errors["result " + error_kind(e)] += 1
                await _sleep_unless(stop, self.retry.delay_s(failures))
                failures += 1
                continue
            if r.status == 200:
                c.results_ok += 1
                if c.acked_results is not None:
                    c.acked_results.add(task_id)
            else:
                # 409 after a crash means the server gave up on the task (failed: no result)
                # or already has this result; either way posting again cannot help.
                c.result_status[r.status] += 1
            return

    def close(self) -> None:
        self.conn.close()


class _BadStatus(Exception):
    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.status = response.status


def _kind(e: BaseException) -> str:
    return f"http {e.status}" if isinstance(e, _BadStatus) else error_kind(e)


async def _sleep_unless(stop: asyncio.Event, delay_s: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), delay_s)
    except TimeoutError:
        pass


AGENTS_PER_SOURCE = 20_000  # of the some 28,000 ephemeral ports one local address has


def _source(target: Target, index: int, count: int) -> str | None:
    """The local address agent `index` of `count` connects from: the default one for fleets
    that fit one address, else 127.0.0.2, .3, … (all loopback) for a server on 127.0.0.1."""
    if count <= AGENTS_PER_SOURCE or target.host != "127.0.0.1":
        return None
    return f"127.0.0.{2 + index // AGENTS_PER_SOURCE}"


class AgentFleet:
    """Many agents running as tasks of this event loop; stop() ends them all within moments."""

    def __init__(self, target: Target, creds: Sequence[Credentials], **agent_kwargs: Any) -> None:
        self.counters = AgentCounters()
        self.retry = Retry()
        self.agents = [Agent(target, c, self.counters, retry=self.retry,
                             source=_source(target, i, len(creds)), **agent_kwargs)
                       for i, c in enumerate(creds)]
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(a.run(self._stop)) for a in self.agents]

    async def stop(self) -> None:
        self._stop.set()
        for t in self._tasks:
            t.cancel()  # parked polls never end by themselves before the poll timeout
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for a in self.agents:
            a.close()

    def set_retry(self, retry: Retry) -> None:
        """Switches every agent's retry policy (they share one object)."""
        self.retry.min_s, self.retry.max_s = retry.min_s, retry.max_s
        self.retry.fast_empty_s = retry.fast_empty_s

    def all_polled_since(self, t: float) -> bool:
        return all(a.last_poll_sent >= t for a in self.agents)
