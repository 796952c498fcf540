"""The agent's connection behaviour, end to end: concurrency, backoff across a server restart,
refused credentials, a dead server, clean stops, and TLS."""

from __future__ import annotations

import json
import re
import signal
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_support import AGENT_SECRET, Admin, process_gone, start_agent
from support import ADMIN, FAST_ARGS, RunningServer, cli, start_server, wait_until


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Admin]]:
    """A server whose polls park for 30 s (so a prompt stop proves the poll was abandoned), and
    whose credential bans are out of the way of the deliberate 403s below."""
    server = start_server(
        tmp_path_factory.mktemp("conn"),
        "--poll-timeout-s",
        "30",
        "--ban-failures",
        "1000",
        "--ban-address-failures",
        "100000",
    )
    yield server, Admin(server)
    server.stop()


def online(admin: Admin, name: str) -> bool:
    return bool(admin.agent(name)["online"])


def test_a_slow_task_does_not_block_a_fast_one(
    shared: tuple[RunningServer, Admin], tmp_path: Path
) -> None:
    server, admin = shared
    admin.add_agent("busy")
    agent = start_agent(tmp_path, server.url, "busy")
    try:
        slow = admin.enqueue("busy", {"type": "execute_cmd", "cmd": "sleep 2"})
        wait_until(lambda: admin.task(slow)["state"] == "delivered")
        started = time.monotonic()
        assert admin.run("busy", {"type": "ping"})["pong"] is True
        assert time.monotonic() - started < 1.8  # before the 2 s task ends
        assert admin.task(slow)["state"] == "delivered"  # still running
        # SIGINT (Ctrl-C) stops like SIGTERM; a second one skips the grace period.
        agent.proc.send_signal(signal.SIGINT)
        agent.wait_for_log("stopping: no new tasks")
        assert agent.stop(signal.SIGINT) == 0
        agent.wait_for_log("second stop signal: not waiting for the grace period")
        assert (
            admin.task(slow)["result"]["msg"]
            == "the agent is stopping; the command and its child processes were killed"
        )
    finally:
        agent.kill()


def test_max_tasks_bounds_concurrency(shared: tuple[RunningServer, Admin], tmp_path: Path) -> None:
    server, admin = shared
    admin.add_agent("single")
    agent = start_agent(tmp_path, server.url, "single", "--max-tasks", "1")
    try:
        slow = admin.enqueue("single", {"type": "execute_cmd", "cmd": "sleep 0.8; echo slow"})
        fast = admin.enqueue("single", {"type": "execute_cmd", "cmd": "echo fast"})
        slow_task, fast_task = admin.finished(slow), admin.finished(fast)
        assert (
            slow_task["result"]["output"] == "slow\n" and fast_task["result"]["output"] == "fast\n"
        )
        assert fast_task["finished_at"] >= slow_task["finished_at"]
    finally:
        assert agent.stop() == 0


def _readable(path: Path) -> bool:
    try:
        path.read_bytes()
        return True
    except OSError:  # the process ended between the listing and the read
        return False


def retry_delays(log: str) -> list[float]:
    return [float(d) for d in re.findall(r"poll failed: .*; retrying in ([0-9.]+) s", log)]


def test_server_restart_agent_reconnects_with_backoff(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    admin = Admin(server)
    admin.add_agent("phoenix")
    agent = start_agent(tmp_path, server.url, "phoenix")
    try:
        # A task in flight when the server dies: its result cannot be posted until the server
        # is back, and then the server refuses it (409: tasks delivered before a crash are failed).
        inflight = admin.enqueue("phoenix", {"type": "execute_cmd", "cmd": "sleep 0.5; echo late"})
        wait_until(lambda: admin.task(inflight)["state"] == "delivered")
        # "delivered" is committed just before the answer is written: wait until the agent
        # really runs the command, or a kill in between would cut the answer itself.
        wait_until(lambda: any(b"echo late" in p.read_bytes() for p in Path("/proc").glob("*/cmdline")
                               if p.parent.name.isdigit() and _readable(p)))
        server.kill()
        agent.wait_for_log(r"task \d+: result not posted \(connection refused\); retrying")
        wait_until(lambda: len(retry_delays(agent.output())) >= 5, timeout_s=10)
        delays = retry_delays(agent.output())
        # Capped (--backoff-max-s 0.3) and jittered: random delays, not a fixed beat.
        assert all(0 <= d <= 0.3 for d in delays) and len(set(delays)) > 1

        server.start()
        admin = Admin(server)
        queued = admin.enqueue("phoenix", {"type": "execute_cmd", "cmd": "echo back"})
        task = admin.finished(queued)
        assert task["state"] == "done" and task["result"]["output"] == "back\n"
        agent.wait_for_log("the server answers again")
        agent.wait_for_log(rf"task {inflight}: the server no longer takes its result \(409")
        assert admin.task(inflight)["state"] == "failed"
        attempts = len(retry_delays(agent.output()))
        assert attempts < 200  # no busy loop while the server was away
    finally:
        assert agent.stop() == 0
        server.stop()


def test_refused_credentials_back_off_and_recover(
    shared: tuple[RunningServer, Admin], tmp_path: Path
) -> None:
    server, admin = shared
    agent = start_agent(tmp_path, server.url, "latecomer")  # no such account yet
    try:
        agent.wait_for_log(
            r"the server refused the agent's credentials \(403 .*\): check name and "
            r"secret of agent 'latecomer'"
        )
        time.sleep(1.0)  # a window in which a busy loop would make hundreds of attempts
        assert agent.count("refused the agent's credentials") <= 8
        assert agent.proc.poll() is None  # no exit on 403
        admin.add_agent("latecomer")
        assert admin.run("latecomer", {"type": "ping"})["pong"] is True
    finally:
        assert agent.stop() == 0


def test_a_dead_server_is_noticed_by_the_client_timeout(tmp_path: Path) -> None:
    """A server that accepts connections and never answers (hung, or a black-holed route)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(50)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    port = listener.getsockname()[1]
    agent = start_agent(tmp_path, f"http://127.0.0.1:{port}", "pc", "--poll-timeout-s", "0.4")
    try:
        agent.wait_for_log(r"poll failed: no answer in time; retrying")
        wait_until(lambda: len(accepted) >= 3, timeout_s=5)  # it reconnects each time
    finally:
        assert agent.stop() == 0
        listener.close()
        for conn in accepted:
            conn.close()


def test_sigterm_with_a_parked_poll_exits_at_once(
    shared: tuple[RunningServer, Admin], tmp_path: Path
) -> None:
    server, admin = shared
    admin.add_agent("idle")
    agent = start_agent(tmp_path, server.url, "idle")
    wait_until(lambda: online(admin, "idle"))
    time.sleep(0.2)  # the poll is parked on the server (which would hold it for 30 s)
    started = time.monotonic()
    assert agent.stop() == 0
    assert time.monotonic() - started < 1.5
    assert "dutagent stopped" in agent.output()


def test_sigterm_lets_running_tasks_finish_and_answers_waiting_ones(
    shared: tuple[RunningServer, Admin], tmp_path: Path
) -> None:
    server, admin = shared
    admin.add_agent("finisher")
    agent = start_agent(tmp_path, server.url, "finisher", "--max-tasks", "1")
    running = admin.enqueue("finisher", {"type": "execute_cmd", "cmd": "sleep 0.8; echo finished"})
    waiting = admin.enqueue("finisher", {"type": "ping"})
    wait_until(lambda: admin.task(waiting)["state"] == "delivered")
    started = time.monotonic()
    assert agent.stop() == 0
    took = time.monotonic() - started
    assert 0.3 < took < 4
    done = admin.task(running)
    assert done["state"] == "done" and done["result"]["output"] == "finished\n"
    refused = admin.task(waiting)
    assert refused["state"] == "failed"
    assert refused["result"]["msg"] == "the agent is stopping; the task was not started"


def test_sigterm_after_the_grace_period_kills_tasks_and_reports_them(
    shared: tuple[RunningServer, Admin], tmp_path: Path
) -> None:
    server, admin = shared
    admin.add_agent("impatient")
    agent = start_agent(tmp_path, server.url, "impatient", "--grace-s", "0.3")
    pidfile = tmp_path / "child.pid"
    task_id = admin.enqueue(
        "impatient", {"type": "execute_cmd", "cmd": f"sleep 30 & echo $! > {pidfile}; sleep 30"}
    )
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip())
    child = int(pidfile.read_text())
    started = time.monotonic()
    assert agent.stop() == 0
    assert time.monotonic() - started < 4
    task = admin.task(task_id)
    assert task["state"] == "failed"
    assert (
        task["result"]["msg"]
        == "the agent is stopping; the command and its child processes were killed"
    )
    wait_until(lambda: process_gone(child))


def test_tls_with_ca_file_and_insecure(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_pem, key_pem, ca_pem = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_pem))
    cert.private_key_pem.write_to_path(str(key_pem))
    ca.cert_pem.write_to_path(str(ca_pem))
    db = tmp_path / "tls.db"
    cli("addaccount", str(db), ADMIN[0], "admin", stdin=ADMIN[1] + "\n")
    server = RunningServer(
        db=db,
        args=[*FAST_ARGS, "--tls-cert", str(cert_pem), "--tls-key", str(key_pem)],
        scheme="https",
    ).start()
    context = ssl.create_default_context(cafile=str(ca_pem))
    token = json.loads(https(context, f"{server.url}/login?user={ADMIN[0]}&pass={ADMIN[1]}"))[
        "token"
    ]
    for name in ("untrusting", "trusting", "insecure"):
        https(
            context,
            f"{server.url}/api/v1/accounts",
            token,
            {"name": name, "type": "agent", "password": AGENT_SECRET},
        )
    agents = [
        start_agent(tmp_path, server.url, "untrusting"),
        start_agent(tmp_path, server.url, "trusting", "--ca-file", str(ca_pem)),
        start_agent(tmp_path, server.url, "insecure", "--insecure"),
    ]
    try:
        agents[0].wait_for_log(r"poll failed: TLS certificate not trusted .*; use --ca-file")
        for name in ("trusting", "insecure"):
            result = json.loads(
                https(context, f"{server.url}/tasks?target={name}", token, {"type": "ping"})
            )
            assert result["pong"] is True
        agents[2].wait_for_log(r"\*\*\* --insecure: the server's TLS certificate is NOT verified")
        assert "NOT verified" not in agents[1].output()
    finally:
        for agent in agents:
            assert agent.stop() == 0
        server.stop()


def https(context: ssl.SSLContext, url: str, token: str | None = None, body: Any = None) -> bytes:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url,
        data=data,
        method="GET" if body is None else "POST",
        headers={"Authorization": token} if token else {},
    )
    with urllib.request.urlopen(req, context=context, timeout=15) as resp:
        return bytes(resp.read())
