"""TLS end to end: a real dutserver started with --tls-cert/--tls-key, a throwaway CA (trustme),
a real cli/dutagent.py and cli/dutctl.py, as an administrator would set them up.

One server serves the whole module; every test uses its own agent names and tasks.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from http.client import HTTPException
from pathlib import Path

import pytest
from agent_support import Admin, AgentProcess, start_agent
from support import ADMIN, RunningServer, Tls, http, start_server, wait_until
from test_dutctl import new_ctl

TRUSTING = "tls-pc"
UNTRUSTED = r"poll failed: TLS certificate not trusted \(.+\); use --ca-file"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tls")


@pytest.fixture(scope="module")
def tls(base: Path) -> Tls:
    return Tls.make(base / "ca")


@pytest.fixture(scope="module")
def srv(base: Path, tls: Tls) -> Iterator[RunningServer]:
    server = start_server(base, tls=tls)
    assert server.url.startswith("https://")
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.stop()


@pytest.fixture(scope="module")
def admin(srv: RunningServer) -> Admin:
    """An admin session over https that trusts only the test CA (srv.ssl_context)."""
    return Admin(srv)


@pytest.fixture(scope="module")
def agent(srv: RunningServer, admin: Admin, base: Path, tls: Tls) -> Iterator[AgentProcess]:
    """A real agent given the CA file, online over https."""
    admin.add_agent(TRUSTING)
    proc = start_agent(base, srv.url, TRUSTING, "--ca-file", str(tls.ca))
    try:
        wait_until(lambda: admin.agent(TRUSTING)["online"], timeout_s=10)
        yield proc
    finally:
        assert proc.stop() == 0


def test_agent_with_the_ca_file_runs_tasks_submitted_over_https(
        admin: Admin, agent: AgentProcess) -> None:
    pong = admin.run(TRUSTING, {"type": "ping"})
    task_id = admin.enqueue(TRUSTING, {"type": "execute_cmd", "cmd": "echo over tls"})
    task = admin.finished(task_id)

    assert pong["pong"] is True and pong["error"] is False
    assert task["state"] == "done"
    assert task["result"]["output"] == "over tls\n"
    assert task["result"]["status_code"] == 0
    assert "poll failed" not in agent.output()
    assert "NOT verified" not in agent.output()


@pytest.mark.parametrize("trust", ["system", "another-ca"])
def test_agent_that_does_not_trust_the_certificate_sends_nothing(
        srv: RunningServer, admin: Admin, tmp_path: Path, trust: str) -> None:
    name = f"untrusting-{trust}"
    admin.add_agent(name)
    task_id = admin.enqueue(name, {"type": "ping"})
    args = ["--ca-file", str(Tls.make(tmp_path / "other").ca)] if trust == "another-ca" else []
    agent = start_agent(tmp_path, srv.url, name, *args)
    try:
        agent.wait_for_log(UNTRUSTED)
        # It keeps retrying, and keeps refusing: no retry gets past the handshake either.
        wait_until(lambda: agent.count(UNTRUSTED) >= 3, timeout_s=10)
        task = admin.task(task_id)
        seen = admin.agent(name)
    finally:
        assert agent.stop() == 0

    assert task["state"] == "queued" and task["delivered_at"] is None
    # The server never saw one request of this agent: no poll, so no credentials either.
    assert seen["online"] is False
    assert seen["last_seen"] is None


def raw_exchange(port: int, data: bytes) -> bytes:
    """Sends data on a plain TCP connection and reads until the server closes it."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        while chunk := sock.recv(4096):
            received += chunk
    return received


def test_plain_http_to_the_tls_port_gets_no_http_answer_and_tls_goes_on(
        srv: RunningServer, tls: Tls) -> None:
    # A client that connects and says nothing holds no one else up during its handshake.
    silent = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    try:
        answers = [
            raw_exchange(srv.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
            raw_exchange(srv.port, f"GET /login?user={ADMIN[0]}&pass={ADMIN[1]} HTTP/1.0\r\n\r\n"
                         .encode()),
            raw_exchange(srv.port, b"\x00garbage\r\n\r\n" * 100),
        ]
        with pytest.raises((OSError, HTTPException)):
            http("GET", f"http://127.0.0.1:{srv.port}/healthz", timeout=5)
        status, _, body = http("GET", f"{srv.url}/healthz", context=tls.context())
        token = srv.login()
    finally:
        silent.close()

    for answer in answers:
        assert b"HTTP/" not in answer  # a clean close, or at most a TLS alert
    assert status == 200, body
    assert len(token) == 64
    assert "Traceback" not in srv.output()


def test_dutctl_over_https_with_its_cacert(srv: RunningServer, tls: Tls, agent: AgentProcess,
                                           tmp_path: Path) -> None:
    (tmp_path / "stranger").mkdir()
    (tmp_path / "admin").mkdir()
    stranger = new_ctl(tmp_path / "stranger")
    refused = stranger("login", srv.url, "--user", ADMIN[0], "--cacert",
                       str(Tls.make(tmp_path / "other").ca), stdin=ADMIN[1] + "\n")
    ctl = new_ctl(tmp_path / "admin")
    login = ctl("login", srv.url, "--user", ADMIN[0], "--cacert", str(tls.ca),
                stdin=ADMIN[1] + "\n")
    run = ctl("run", TRUSTING, "--", "echo", "hello over tls")
    agents = ctl.json("agents")

    assert refused.returncode == 4
    assert "presented a certificate that is not trusted" in refused.stderr
    assert not stranger.session_file.exists()
    assert login.returncode == 0, login.stderr
    assert f"logged in to {srv.url} as {ADMIN[0]}" in login.stdout
    assert run.returncode == 0, run.stderr
    assert run.stdout == "hello over tls\n"
    assert {a["name"]: a["online"] for a in agents["agents"]}[TRUSTING] is True
