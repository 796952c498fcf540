"""Several nodes, one fleet: real servers sharing one throw-away PostgreSQL database.

Any node answers any request: a task submitted on one reaches an agent parked on another, the
result posted to a third answers the blocking submit; sessions, bans and online status hold
fleet-wide; a node killed with -9 loses nothing (a survivor recovers it within the lease).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pg_support import pg_server, pg_url  # noqa: F401  (fixtures)
from support import (ADMIN, FAST_ARGS, PollingAgent, RunningServer, basic, cli, free_port, http,
                     wait_until)

SECRET = "agent-secret-0123456789"
NODE_ARGS = ["--node-heartbeat-s", "0.1", "--node-lease-s", "1", "--accounts-refresh-s", "0.05",
             "--session-cache-s", "0.2"]


class Fleet:
    def __init__(self, tmp_path: Path, url: str) -> None:
        self.tmp_path, self.url = tmp_path, url
        self.key = tmp_path / "fleet.key"
        self.nodes: list[RunningServer] = []

    def cli(self, *args: str, stdin: str = "") -> Any:
        return cli(*args, stdin=stdin, env={"DUTSERVER_KEY_FILE": str(self.key)})

    def node(self, *args: str) -> RunningServer:
        n = len(self.nodes)
        srv = RunningServer(db=self.url, log=self.tmp_path / f"node{n}.log",
                            args=[*FAST_ARGS, *NODE_ARGS, "--key-file", str(self.key),
                                  "--node-name", f"node{n}", *args])
        self.nodes.append(srv.start())
        return srv

    def agent(self, name: str) -> None:
        self.cli("addaccount", self.url, name, "agent", stdin=SECRET + "\n")


@pytest.fixture
def fleet(tmp_path: Path, pg_url: str) -> Iterator[Fleet]:  # noqa: F811
    f = Fleet(tmp_path, pg_url)
    f.cli("addaccount", pg_url, ADMIN[0], "admin", stdin=ADMIN[1] + "\n")
    yield f
    for srv in f.nodes:
        if srv.proc is not None and srv.proc.poll() is None:
            srv.stop()


def submit(srv: RunningServer, token: str, targets: str, task: dict[str, Any],
           timeout_s: float = 5) -> tuple[int, Any]:
    status, _, body = http("POST", f"{srv.url}/tasks?target={targets}&timeout={timeout_s}",
                           task, {"Authorization": token}, timeout=timeout_s + 5)
    return status, json.loads(body) if body else None


def test_a_round_trip_across_three_nodes(fleet: Fleet) -> None:
    """Submit on A, the agent parked on B, its result posted to C: the blocking submit on A
    answers with it, and every node shows the task done."""
    # A poll outlives the wait until other nodes see its agent online (a sweep or two).
    a, b, c = (fleet.node("--poll-timeout-s", "10") for _ in range(3))
    fleet.agent("pc1")
    token = a.login()
    polled: dict[str, Any] = {}

    def poll() -> None:
        status, _, body = http("GET", f"{b.url}/tasks", headers=basic("pc1", SECRET), timeout=10)
        polled["status"], polled["task"] = status, json.loads(body)

    poller = threading.Thread(target=poll)
    poller.start()
    wait_until(lambda: _online(c, token, "pc1"), timeout_s=5)  # parked on B, seen from C
    answer: dict[str, Any] = {}
    submitter = threading.Thread(target=lambda: answer.update(
        zip(("status", "body"), submit(a, token, "pc1", {"type": "ping", "n": 1}))))
    started = time.monotonic()
    submitter.start()
    poller.join(10)
    assert polled["status"] == 200 and polled["task"]["type"] == "ping", polled
    task_id = polled["task"]["id"]
    status, _, _ = http("POST", f"{c.url}/tasks_result?id={task_id}", {"pong": 1},
                        basic("pc1", SECRET))
    assert status == 200
    submitter.join(10)
    assert answer == {"status": 200, "body": {"pong": 1, "error": False}}
    assert time.monotonic() - started < 3
    # At most once: a second result, to any node, is refused.
    for srv in (a, b, c):
        status, _, body = http("POST", f"{srv.url}/tasks_result?id={task_id}", {"pong": 2},
                               basic("pc1", SECRET))
        assert status == 409, body
    for srv in (a, b, c):
        status, _, body = http("GET", f"{srv.url}/api/v1/tasks/{task_id}", None,
                               {"Authorization": token})
        assert json.loads(body)["task"]["state"] == "done" and \
            json.loads(body)["task"]["result"] == {"pong": 1, "error": False}


def _online(srv: RunningServer, token: str, name: str) -> bool:
    status, _, body = http("GET", f"{srv.url}/agents", headers={"Authorization": token})
    return status == 200 and json.loads(body)["online"].get(name) is True


def test_a_multi_target_submit_over_agents_spread_over_nodes(fleet: Fleet) -> None:
    nodes = [fleet.node(), fleet.node()]
    names = [f"pc{i}" for i in range(6)]
    for name in names:
        fleet.agent(name)
    agents = [PollingAgent(nodes[i % 2].url, name, SECRET,
                           answer=lambda task, name=name: {"me": name}).start()
              for i, name in enumerate(names)]
    try:
        token = nodes[0].login()
        wait_until(lambda: all(_online(nodes[1], token, n) for n in names), timeout_s=5)
        status, body = submit(nodes[0], token, ",".join(names), {"type": "who"})
        assert status == 200, body
        assert [(r["target"], r["me"]) for r in body["results"]] == [(n, n) for n in names]
        # Each task went to its agent once, whichever node it polls.
        assert all(len(agent.received) == 1 for agent in agents)
    finally:
        for agent in agents:
            agent.stop()


def test_sessions_bans_and_accounts_hold_fleet_wide(fleet: Fleet) -> None:
    a, b = fleet.node("--ban-failures", "3"), fleet.node("--ban-failures", "3")
    token = a.login()
    status, _, body = http("GET", f"{b.url}/api/v1/session", headers={"Authorization": token})
    assert status == 200 and json.loads(body)["user"] == ADMIN[0]
    # An account made on A is usable on B at once.
    status, _, _ = http("POST", f"{a.url}/api/v1/accounts",
                        {"name": "pc9", "type": "agent", "password": SECRET},
                        {"Authorization": token})
    assert status == 201
    status, _, _ = http("GET", f"{b.url}/tasks", headers=basic("pc9", SECRET), timeout=5)
    assert status == 200
    # Failed logins on A ban the pair; B refuses it too, with the right password.
    for _ in range(3):
        http("GET", f"{a.url}/login?user=admin&pass=wrong-password")
    wait_until(lambda: http("GET", f"{b.url}/login?user=admin&pass={ADMIN[1]}")[0] == 429,
               timeout_s=3)
    # A logout on B ends the session on A too (within session_cache_s).
    status, _, _ = http("POST", f"{b.url}/logout", headers={"Authorization": token})
    assert status == 200
    wait_until(lambda: http("GET", f"{a.url}/api/v1/session",
                            headers={"Authorization": token})[0] == 401, timeout_s=3)


def test_a_killed_node_loses_nothing(fleet: Fleet) -> None:
    """kill -9 of the node an agent polled: what it had handed out without a result fails
    ("no result"), recovered by a survivor within the lease; what it had queued reaches the
    agent through the other node."""
    a, b = fleet.node(), fleet.node()
    fleet.agent("pc1")
    token = b.login()
    # Two tasks submitted on A (non-blocking); the agent takes one from A, then A dies.
    ids = []
    for n in range(2):
        status, _, body = http("POST", f"{a.url}/api/v1/tasks",
                               {"targets": ["pc1"], "task": {"type": "ping", "n": n}},
                               {"Authorization": token})
        assert status == 202, body
        ids.append(json.loads(body)["tasks"][0]["id"])
    status, _, body = http("GET", f"{a.url}/tasks", headers=basic("pc1", SECRET), timeout=5)
    delivered = json.loads(body)
    assert delivered["id"] == ids[0]
    a.kill()
    # The queued one reaches the agent through B; the delivered one fails, recovered by B.
    status, _, body = http("GET", f"{b.url}/tasks", headers=basic("pc1", SECRET), timeout=5)
    assert status == 200 and json.loads(body)["id"] == ids[1], body

    def state(task_id: int) -> Any:
        _, _, raw = http("GET", f"{b.url}/api/v1/tasks/{task_id}", None, {"Authorization": token})
        return json.loads(raw)["task"]

    wait_until(lambda: state(ids[0])["state"] == "failed", timeout_s=5)
    assert state(ids[0])["result"] == {"error": True, "msg": "no result"}
    assert state(ids[1])["state"] == "delivered"
    status, _, _ = http("POST", f"{b.url}/tasks_result?id={ids[1]}", {"ok": 1},
                        basic("pc1", SECRET))
    assert status == 200 and state(ids[1])["state"] == "done"


def test_ids_are_unique_across_nodes(fleet: Fleet) -> None:
    nodes = [fleet.node(), fleet.node()]
    fleet.agent("pc1")
    token = nodes[0].login()
    seen = []
    for i in range(10):
        status, _, body = http("POST", f"{nodes[i % 2].url}/api/v1/tasks",
                               {"targets": ["pc1"], "task": {"type": "ping"}},
                               {"Authorization": token})
        assert status == 202
        seen.append(json.loads(body)["tasks"][0]["id"])
    assert len(set(seen)) == 10
    nodes[0].stop()
    nodes[0].start(port=free_port())  # a restart never gives an id out twice
    status, _, body = http("POST", f"{nodes[0].url}/api/v1/tasks",
                           {"targets": ["pc1"], "task": {"type": "ping"}},
                           {"Authorization": token})
    assert json.loads(body)["tasks"][0]["id"] not in seen


def test_a_node_rides_out_lost_database_connections(fleet: Fleet, pg_server: str) -> None:  # noqa: F811
    """Every connection of the node to the database is cut (as a restart of PostgreSQL
    would): the node reconnects by itself, and wake-ups from other nodes are heard again."""
    from pg_support import _admin
    a, b = fleet.node(), fleet.node()
    fleet.agent("pc1")
    token = a.login()
    name = fleet.url.rsplit("/", 1)[1]
    _admin(pg_server, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      f"WHERE datname = '{name}' AND pid <> pg_backend_pid()")

    def submit_on_b() -> bool:
        status, _, _ = http("POST", f"{b.url}/api/v1/tasks",
                            {"targets": ["pc1"], "task": {"type": "ping"}},
                            {"Authorization": token})
        return status == 202
    wait_until(lambda: http("GET", f"{a.url}/readyz")[0] == 200, timeout_s=10)
    wait_until(submit_on_b, timeout_s=10)
    status, _, body = http("GET", f"{a.url}/tasks", headers=basic("pc1", SECRET), timeout=5)
    assert status == 200 and json.loads(body).get("type") == "ping", body
    # The agent now parked on A; a task submitted on B wakes A (its listener is back).
    agent = PollingAgent(a.url, "pc1", SECRET, answer=lambda task: {"ok": task["id"]}).start()
    try:
        wait_until(lambda: _online(b, token, "pc1"), timeout_s=5)
        status, body = submit(b, token, "pc1", {"type": "ping"})
        assert status == 200 and "ok" in body, body
    finally:
        agent.stop()


def test_an_unreachable_database_is_one_clear_line(tmp_path: Path) -> None:
    url = f"postgresql://dut:secret-pw@127.0.0.1:{free_port()}/nowhere"
    out = cli("server", str(free_port()), url, check=False,
              env={"DUTSERVER_KEY_FILE": str(tmp_path / "k")})
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dutserver: cannot use the database"), lines
    assert "secret-pw" not in out.stderr and "***" in out.stderr
