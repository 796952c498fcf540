"""Faults: connections that vanish (with a reset, or silently without FIN), agents killed
mid-task, the server SIGKILLed under load. Every accepted task ends in a final state in the
history, and none runs twice."""

from __future__ import annotations

from http.client import HTTPException
import json
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_support import Admin, start_agent
from support import RunningServer, basic, http, start_server, wait_until

SECRET = "fault-agent-secret-0123"
FINAL = ("done", "failed", "cancelled", "expired")


class Proxy:
    """A TCP proxy between an agent and the server that the test can cut.

    cut("rst") resets both sides at once (SO_LINGER 0); cut("silent") keeps both sockets open
    but forwards nothing any more, as when a NAT or a cable drops a connection without FIN.
    Connections made after a cut are forwarded normally."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.pairs: list[tuple[socket.socket, socket.socket, threading.Event]] = []
        self.sockets: list[socket.socket] = []  # every socket ever opened, closed by close()
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.listener.settimeout(0.1)
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            silenced = threading.Event()
            with self.lock:
                self.pairs.append((client, upstream, silenced))
                self.sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst, silenced), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, silenced: threading.Event) -> None:
        src.settimeout(0.1)
        while not self.stopped.is_set():
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            if silenced.is_set():
                continue  # swallowed: the other side never hears of it
            try:
                dst.sendall(data)
            except OSError:
                break
        if not silenced.is_set():
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def connections(self) -> int:
        with self.lock:
            return len(self.pairs)

    def cut(self, how: str) -> None:
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for client, upstream, silenced in pairs:
            silenced.set()
            if how == "rst":
                for sock in (client, upstream):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.close()

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                sock.close()


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[RunningServer]:
    server = start_server(tmp_path, "--sweep-interval-s", "0.1")
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.stop()


def runs(marker: Path) -> list[str]:
    return marker.read_text().split() if marker.exists() else []


def cmd_task(marker: Path, tag: str, sleep_s: float = 0) -> dict[str, Any]:
    """An execute_cmd that leaves one line per run in marker, so a second run would show."""
    sleep = f" && sleep {sleep_s}" if sleep_s else ""
    return {"type": "execute_cmd", "cmd": f"echo {tag} >> {marker}{sleep}"}


def enqueue(admin: Admin, target: str, task: dict[str, Any], expires_s: float) -> int:
    status, _, body = http("POST", f"{admin.server.url}/api/v1/tasks",
                           {"targets": [target], "task": task, "expires_s": expires_s},
                           admin.headers)
    assert status == 202, body
    return int(json.loads(body)["tasks"][0]["id"])


@pytest.mark.parametrize("how", ["rst", "silent"])
def test_agent_connection_cut_mid_poll_loses_no_task(srv: RunningServer, tmp_path: Path,
                                                      how: str) -> None:
    admin = Admin(srv)
    admin.add_agent("pc1", SECRET)
    proxy = Proxy(srv.port)
    # The agent's client timeout (2 s) is what notices a silent connection: the server's
    # poll answer ({} after 1 s) never comes through.
    agent = start_agent(tmp_path, f"http://127.0.0.1:{proxy.port}", "pc1", "--poll-timeout-s",
                        "2", secret=SECRET)
    marker = tmp_path / "runs.txt"
    try:
        wait_until(lambda: admin.agent("pc1")["online"] and proxy.connections(), timeout_s=10)
        proxy.cut(how)
        if how == "rst":
            # The agent saw its reset and polls again through a new connection; by then the
            # server has long seen the reset of the old one.
            wait_until(proxy.connections, timeout_s=10)
            time.sleep(0.05)
        first = enqueue(admin, "pc1", cmd_task(marker, "first"), expires_s=4)
        task = admin.task(first, wait_s=10)
        if how == "rst":
            # The server saw the reset: the task waited in the queue for the next poll.
            assert task["state"] == "done", (task["result"], task["delivered_at"], task["finished_at"],
                                             srv.output()[-3000:], agent.output()[-3000:])
        else:
            # A silent drop cannot be seen by the server: if the task went into the dead
            # connection it ends failed at its deadline; either way it ends, in the history.
            assert task["state"] in ("done", "failed"), task
        # The agent reconnected through the proxy, and new work reaches it.
        second = enqueue(admin, "pc1", cmd_task(marker, "second"), expires_s=30)
        assert admin.task(second, wait_s=10)["state"] == "done"
        assert runs(marker).count("second") == 1
        assert runs(marker).count("first") == (1 if task["state"] == "done" else 0), runs(marker)
    finally:
        agent.stop()
        proxy.close()


def test_agent_killed_mid_task_fails_at_the_deadline_and_never_reruns(
        srv: RunningServer, tmp_path: Path) -> None:
    admin = Admin(srv)
    admin.add_agent("pc1", SECRET)
    marker = tmp_path / "runs.txt"
    agent = start_agent(tmp_path, srv.url, "pc1", secret=SECRET, start_new_session=True)
    try:
        task_id = enqueue(admin, "pc1", cmd_task(marker, "slow", sleep_s=30), expires_s=2)
        wait_until(lambda: runs(marker) == ["slow"], timeout_s=10)
        assert admin.task(task_id)["state"] == "delivered"
        os.killpg(agent.proc.pid, signal.SIGKILL)  # the agent and its shell, like a power cut
        agent.proc.wait(timeout=5)
        task = admin.task(task_id, wait_s=10)
        assert task["state"] == "failed", task
        agent = start_agent(tmp_path, srv.url, "pc1", secret=SECRET, start_new_session=True)
        after = enqueue(admin, "pc1", cmd_task(marker, "after"), expires_s=30)
        assert admin.task(after, wait_s=10)["state"] == "done"
        assert runs(marker) == ["slow", "after"], "the killed task ran again"
        assert admin.task(task_id)["state"] == "failed"
    finally:
        if agent.proc.poll() is None:
            os.killpg(agent.proc.pid, signal.SIGTERM)
            agent.proc.wait(timeout=10)


def test_server_sigkilled_under_load_keeps_every_acknowledged_task(srv: RunningServer) -> None:
    srv.add_account("pc1", "agent", SECRET)
    token = srv.login()
    acknowledged: list[int] = []
    ack_lock = threading.Lock()
    stop = threading.Event()

    def submitter() -> None:
        deadline = time.monotonic() + 20
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                status, _, body = http("POST", f"{srv.url}/api/v1/tasks",
                                       {"targets": ["pc1"], "task": {"type": "ping"}},
                                       {"Authorization": token}, timeout=5)
            except (OSError, HTTPException):
                # The server died mid-answer: not acknowledged, so it need not exist.
                time.sleep(0.01)
                continue
            if status == 202:
                with ack_lock:
                    acknowledged.append(json.loads(body)["tasks"][0]["id"])

    received: list[int] = []

    def agent() -> None:
        # Like support.PollingAgent, but it also survives the server dying under its result post.
        auth = basic("pc1", SECRET)
        deadline = time.monotonic() + 50
        while not stop_agent.is_set() and time.monotonic() < deadline:
            try:
                status, _, body = http("GET", f"{srv.url}/tasks", headers=auth, timeout=5)
                task = json.loads(body) if status == 200 else {}
                if task:
                    received.append(task["id"])
                    http("POST", f"{srv.url}/tasks_result?id={task['id']}", {"pong": 1}, auth)
                elif status != 200:
                    time.sleep(0.02)
            except (OSError, HTTPException):
                time.sleep(0.02)

    stop_agent = threading.Event()
    agent_thread = threading.Thread(target=agent, daemon=True)
    agent_thread.start()
    threads = [threading.Thread(target=submitter, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(acknowledged) >= 200 and len(received) >= 20, timeout_s=15)
        srv.kill()
        stop.set()
        for t in threads:
            t.join(timeout=10)
        srv.start()
        token = srv.login()
        ids = sorted(set(acknowledged))
        assert len(ids) == len(acknowledged), "one id acknowledged twice"

        def states() -> dict[str, int] | None:
            found: dict[str, int] = {}
            for start in range(0, len(ids), 1000):
                chunk = ",".join(map(str, ids[start:start + 1000]))
                status, _, body = http("GET", f"{srv.url}/api/v1/tasks?ids={chunk}&limit=1000",
                                       headers={"Authorization": token})
                assert status == 200, body
                for task in json.loads(body)["tasks"]:
                    found[task["state"]] = found.get(task["state"], 0) + 1
            assert sum(found.values()) == len(ids), ("acknowledged task missing", found, len(ids))
            return found if set(found) <= set(FINAL) else None

        final = wait_until(states, timeout_s=20, interval_s=0.2)
        assert len(received) == len(set(received)), "a task was delivered twice"
        assert final.get("done", 0) >= 1, final
        print(f"acknowledged {len(ids)}, final states {final}")
    finally:
        stop.set()
        stop_agent.set()
        agent_thread.join(timeout=10)
