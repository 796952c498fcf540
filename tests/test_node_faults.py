"""Faults of a fleet on PostgreSQL (issue 17, items 3 and "bad input and faults"):

- a node killed with -9 in the middle of a stream of tasks: every task that was accepted ends in
  a final state, and none is run twice (real agents write each run down);
- the database lost while a node runs (its connections cut and refused, by a TCP proxy between
  them): /readyz says 503, requests get 503 "database unavailable", nothing accepted is lost,
  the node recovers by itself when the database is back, and the URL's password never shows.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from agent_support import AGENT_SECRET, Admin, start_agent
from pg_support import pg_server, pg_url  # noqa: F401  (fixtures)
from support import ADMIN, FAST_ARGS, RunningServer, free_port, http, wait_until
from test_agent_failover import seed_starting_at
from test_nodes import NODE_ARGS, Fleet, fleet  # noqa: F401  (fixture)

FINAL = {"done", "failed", "cancelled", "expired"}


def test_a_node_killed_under_load_loses_nothing_and_runs_nothing_twice(
        fleet: Fleet, tmp_path: Path) -> None:  # noqa: F811
    a, b = fleet.node(), fleet.node()
    runs = tmp_path / "runs"
    runs.mkdir()
    agents = []
    for n in range(4):
        fleet.cli("addaccount", fleet.url, f"pc{n}", "agent", stdin=AGENT_SECRET + "\n")
        agents.append(start_agent(tmp_path, f"{a.url},{b.url}", f"pc{n}",
                                  "--server-seed", str(seed_starting_at(n % 2))))
    admins = [Admin(a), Admin(b)]
    accepted: list[tuple[int, str]] = []  # (task id, marker)
    try:
        for agent in agents:
            agent.wait_for_log(r"polling http", timeout_s=10)
        wait_until(lambda: len(json.loads(http("GET", f"{b.url}/agents", headers={
            "Authorization": admins[1].headers["Authorization"]})[2])["online"]) == 4,
                   timeout_s=10)
        killed = False
        for i in range(60):
            if i == 25:  # mid-stream, with tasks queued on A and others running
                wait_until(lambda: any(admins[1].task(tid)["state"] == "delivered"
                                       for tid, _ in accepted), timeout_s=5)
                a.stop(signal.SIGKILL)
                killed = True
            marker = f"m{i}"
            # Each run appends its marker to the agent's file: a task run twice shows twice.
            task = {"type": "execute_cmd",
                    "cmd": f"sleep 0.2; echo {marker} >> {runs}/pc{i % 4}; echo {marker}"}
            admin = admins[1] if killed or i % 2 else admins[0]
            accepted.append((admin.enqueue(f"pc{i % 4}", task), marker))
            time.sleep(0.02)

        def states() -> dict[int, dict[str, Any]]:
            return {tid: admins[1].task(tid) for tid, _ in accepted}
        wait_until(lambda: all(t["state"] in FINAL for t in states().values()), timeout_s=30)
        final = states()
    finally:
        for agent in agents:
            agent.stop()
    ran = Counter(line for f in runs.iterdir() for line in f.read_text().split())
    assert ran and all(n == 1 for n in ran.values()), [m for m, n in ran.items() if n > 1]
    for tid, marker in accepted:
        task = final[tid]
        if task["state"] == "done":
            assert task["result"]["output"] == marker + "\n" and ran[marker] == 1, task
        else:  # handed out by A and its result lost with it: failed, said so
            assert task["state"] == "failed" and task["result"]["msg"] == "no result", task


class CuttableProxy:
    """A TCP proxy to PostgreSQL that the test can cut (every connection closed, new ones
    refused: what a node sees when the database goes away) and restore."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = free_port()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        assert self._listener is not None
        self._listener.close()
        self._listener = None
        with self._lock:
            for s in self._conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def proxied(fleet: Fleet) -> Iterator[tuple[CuttableProxy, str]]:  # noqa: F811
    """The fleet's database through a cuttable proxy, in a URL that carries a password (trust
    authentication ignores it; it must never be logged)."""
    parts = urlsplit(fleet.url)
    proxy = CuttableProxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    netloc = f"{parts.username}:hunter2-never-logged@127.0.0.1:{proxy.port}"
    yield proxy, urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    proxy.cut()


def test_a_lost_database_is_503_and_the_node_recovers_by_itself(
        fleet: Fleet, proxied: tuple[CuttableProxy, str], tmp_path: Path) -> None:  # noqa: F811
    proxy, url = proxied
    fleet.agent("pc1")
    node = RunningServer(db=url, log=tmp_path / "node.log",
                         args=[*FAST_ARGS, *NODE_ARGS, "--key-file", str(fleet.key)]).start()
    try:
        token = node.login()
        auth = {"Authorization": token}
        status, _, body = http("POST", f"{node.url}/api/v1/tasks",
                               {"targets": ["pc1"], "task": {"type": "ping"}}, auth)
        assert status == 202, body
        before = json.loads(body)["tasks"][0]["id"]

        proxy.cut()
        wait_until(lambda: http("GET", f"{node.url}/readyz")[0] == 503, timeout_s=10)
        status, headers, body = http("POST", f"{node.url}/api/v1/tasks",
                                     {"targets": ["pc1"], "task": {"type": "ping"}}, auth,
                                     timeout=30)
        assert status == 503, body
        assert json.loads(body) == {"error": True, "msg": "database unavailable"}
        assert http("GET", f"{node.url}/healthz")[0] == 200  # the process itself is fine

        proxy.restore()
        wait_until(lambda: http("GET", f"{node.url}/readyz")[0] == 200, timeout_s=15)
        # Nothing accepted was lost: the task from before the outage reaches the agent.
        status, _, body = http("GET", f"{node.url}/tasks",
                               headers={"Authorization": f"pc1:{AGENT_SECRET}"}, timeout=5)
        assert status == 200 and json.loads(body)["id"] == before, body
        status, _, body = http("POST", f"{node.url}/api/v1/tasks",
                               {"targets": ["pc1"], "task": {"type": "ping"}}, auth)
        assert status == 202, body
    finally:
        node.stop()
    log = (tmp_path / "node.log").read_text()
    assert "database unavailable" in log
    assert "hunter2-never-logged" not in log
    assert ADMIN[1] not in log
