"""Resource abuse: slow clients, huge declared bodies, deep JSON, a flood of submits to one
offline agent. Limits apply with clear errors and everyone else is still served. Also: the
security headers are on every kind of answer."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from support import RunningServer, basic, http, start_server, wait_until
from test_error_shape import assert_error

SECRET = "abuse-agent-secret-0123"
QUEUE_MAX = 100


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    server = start_server(tmp_path_factory.mktemp("abuse"), "--queue-max", str(QUEUE_MAX))
    server.add_account("offline", "agent", SECRET)
    server.add_account("online", "agent", SECRET)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def token(srv: RunningServer) -> str:
    return srv.login()


def raw(srv: RunningServer, request: bytes, timeout_s: float = 5) -> bytes:
    """Sends request bytes and reads the answer until the server closes or timeout_s."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=timeout_s) as sock:
        sock.sendall(request)
        data = b""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:")]
        while length and len(body) < length[0] and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body


def healthy_quickly(srv: RunningServer) -> float:
    start = time.monotonic()
    assert http("GET", f"{srv.url}/healthz", timeout=2)[0] == 200
    return time.monotonic() - start


def test_slowloris_clients_do_not_stop_others_being_served(srv: RunningServer,
                                                            token: str) -> None:
    request = (b"GET /api/v1/session HTTP/1.1\r\nHost: x\r\nAuthorization: " + token.encode()
               + b"\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n")
    stop = threading.Event()
    socks: list[socket.socket] = []

    def drip() -> None:
        # 50 clients each send one byte every 50 ms, for at most 3 s.
        for _ in range(50):
            socks.append(socket.create_connection(("127.0.0.1", srv.port), timeout=5))
        for i in range(len(request)):
            if stop.is_set() or i > 60:
                return
            for s in socks:
                try:
                    s.send(request[i:i + 1])
                except OSError:
                    pass
            time.sleep(0.05)

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        wait_until(lambda: len(socks) == 50)
        for _ in range(20):
            assert healthy_quickly(srv) < 0.5
            status, _, body = http("GET", f"{srv.url}/api/v1/session",
                                   headers={"Authorization": token}, timeout=2)
            assert status == 200, body
    finally:
        stop.set()
        dripper.join(timeout=5)
        for s in socks:
            s.close()


def test_a_1_gb_declared_body_is_refused_at_once_without_being_read(srv: RunningServer,
                                                                     token: str) -> None:
    for path, auth in (("/tasks?target=online", token.encode()),
                       ("/api/v1/tasks", token.encode()),
                       ("/tasks_result?id=1", basic("online", SECRET)["Authorization"].encode()),
                       ("/login", b"")):
        start = time.monotonic()
        answer = raw(srv, b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nAuthorization: "
                     + auth + b"\r\nContent-Length: 1073741824\r\n\r\n" + b"{" * 1000)
        elapsed = time.monotonic() - start
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413"), (path, answer[:300])
        headers = dict(line.decode().split(": ", 1) for line in head.split(b"\r\n")[1:])
        assert "too large" in assert_error(413, headers, body, 413), path
        assert elapsed < 1, (path, elapsed)
    assert healthy_quickly(srv) < 0.5


def test_deep_json_is_400_not_a_crash(srv: RunningServer, token: str) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000  # 200 kB: under the 1 MiB limit, so it is parsed
    for path in ("/tasks?target=online", "/api/v1/tasks", "/api/v1/accounts"):
        status, headers, body = http("POST", f"{srv.url}{path}", deep,
                                     {"Authorization": token})
        assert_error(status, dict(headers), body, 400, "Invalid JSON")
    nested = b'{"type": "ping", "x": ' + b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b"}"
    status, headers, body = http("POST", f"{srv.url}/tasks?target=online&timeout=0.2", nested,
                                 {"Authorization": token})
    assert_error(status, dict(headers), body, 400, "Invalid JSON")
    assert healthy_quickly(srv) < 0.5
    assert "Traceback" not in srv.output()


def test_submit_flood_to_one_offline_agent_hits_the_queue_bound(srv: RunningServer,
                                                                 token: str) -> None:
    def submit(_: int) -> tuple[int, str]:
        status, _, body = http("POST", f"{srv.url}/api/v1/tasks",
                               {"targets": ["offline"], "task": {"type": "ping"}},
                               {"Authorization": token}, timeout=10)
        return status, (json.loads(body).get("msg", "") if status != 202 else "")

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(submit, range(2000)))
        # Meanwhile another agent is served normally.
        status, _, body = http("GET", f"{srv.url}/tasks", headers=basic("online", SECRET))
        assert status == 200, body
    accepted = sum(1 for status, _ in answers if status == 202)
    refused = [(status, msg) for status, msg in answers if status != 202]
    assert accepted == QUEUE_MAX, accepted
    assert set(refused) == {(503, "Task queue is full")}, set(refused)
    status, _, body = http("POST", f"{srv.url}/tasks?target=online&timeout=0.1",
                           {"type": "ping"}, {"Authorization": token})
    assert status == 504, body  # the other agent's queue is not affected (it just did not poll)
    assert healthy_quickly(srv) < 0.5


SECURITY = {
    "content-security-policy": "frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


@pytest.mark.parametrize("method,path,body,expected", [
    ("GET", "/healthz", None, 200),
    ("GET", "/", None, 200),
    ("GET", "/index.html", None, 200),
    ("GET", "/openapi.json", None, 200),
    ("GET", "/agent/dutagent.py", None, 200),
    ("GET", "/no-such-file.js", None, 404),
    ("GET", "/api/v1/no-such-route", None, 404),
    ("DELETE", "/login", None, 405),
    ("GET", "/api/v1/tasks", None, 401),
    ("GET", "/agents", None, 403),
    ("POST", "/login", b'{"user": ', 400),
])
def test_security_headers_on_every_kind_of_answer(srv: RunningServer, method: str, path: str,
                                                  body: bytes | None, expected: int) -> None:
    status, headers, _ = http(method, f"{srv.url}{path}", body)
    assert status == expected
    for name, part in SECURITY.items():
        assert part in (headers.get(name) or ""), (path, name, dict(headers))




def test_security_headers_on_a_413(srv: RunningServer) -> None:
    # Declared, not sent: the server refuses by Content-Length and closes, and a client still
    # writing megabytes would see a broken pipe instead of the answer.
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n")
        head = sock.recv(65536).split(b"\r\n\r\n")[0].decode("latin-1").lower()
    assert head.startswith("http/1.1 413"), head
    for name, part in SECURITY.items():
        assert f"\r\n{name}: " in head and part.lower() in head, (name, head)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_10000_idle_connections_cost_bounded_memory_and_others_are_served(
        srv: RunningServer, token: str) -> None:
    assert srv.proc is not None
    before = rss_kib(srv.proc.pid)
    socks: list[socket.socket] = []
    try:
        for _ in range(10_000):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", srv.port))
            socks.append(sock)
        # A few of them send half a request and stop there.
        for sock in socks[:1000]:
            try:
                sock.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            except OSError:
                pass
        # The first answer waits behind the accepts of the 10,000 (seconds on a busy machine);
        # once they are in, each answer must come at once.
        assert http("GET", f"{srv.url}/healthz", timeout=30)[0] == 200
        for _ in range(10):
            assert healthy_quickly(srv) < 1
            status, _, body = http("GET", f"{srv.url}/api/v1/session",
                                   headers={"Authorization": token}, timeout=5)
            assert status == 200, body
        grown_mib = (rss_kib(srv.proc.pid) - before) / 1024
        # Measured here: a few tens of MiB for 10,000 connections (a few kB each).
        assert grown_mib < 200, grown_mib
        print(f"10,000 idle connections: server RSS grew {grown_mib:.0f} MiB")
    finally:
        for sock in socks:
            sock.close()
    wait_until(lambda: healthy_quickly(srv) < 0.5)
