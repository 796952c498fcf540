"""The direct path (dutserver/direct.py) speaks HTTP/1.1 as uvicorn's own path does: pipelined
requests answered in order (direct and ASGI mixed), Expect: 100-continue, body limits while the
body is still arriving, chunked bodies, HTTP/1.0, HEAD. (A poll that hangs up: test_fixes.py.)"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest
from support import RunningServer, basic, http, start_server

SECRET = "protocol-agent-secret-01"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    server = start_server(tmp_path_factory.mktemp("protocol"), "--body-max-bytes", "1000")
    server.add_account("pc1", "agent", SECRET)
    yield server
    server.stop()


def connect(srv: RunningServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=5)


def read_response(sock: socket.socket, buf: bytearray,
                  head: bool = False) -> tuple[int, dict[str, str], bytes]:
    """One response from sock (buf keeps what arrived beyond it); head: it has no body."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a full response: {bytes(buf)!r}")
        buf += chunk
    top, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = 0 if head else int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError("connection closed inside a body")
        rest += chunk
    buf[:] = rest[length:]
    return status, headers, rest[:length]


def closed(sock: socket.socket, buf: bytearray) -> bool:
    """True when the server closed the connection (after what buf holds)."""
    try:
        return not buf and sock.recv(1) == b""
    except (ConnectionResetError, TimeoutError):
        return False


def request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
            version: str = "1.1") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: test"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def test_pipelined_requests_are_answered_in_order_direct_and_asgi_mixed(
        srv: RunningServer) -> None:
    login = json.dumps({"user": "admin", "pass": "adminpass1"}).encode()
    with connect(srv) as sock:
        sock.sendall(request("GET", "/healthz") + request("GET", "/")  # "/" is a web file (ASGI)
                     + request("POST", "/login", login) + request("GET", "/readyz"))
        buf = bytearray()
        answers = [read_response(sock, buf) for _ in range(4)]
    assert [a[0] for a in answers] == [200, 200, 200, 200]
    assert json.loads(answers[0][2])["status"] == "alive"
    assert answers[1][1]["content-type"].startswith("text/html")
    assert json.loads(answers[2][2])["token"]
    assert json.loads(answers[3][2])["status"] == "ready"


def test_expect_continue_gets_100_then_the_answer(srv: RunningServer) -> None:
    body = json.dumps({"user": "admin", "pass": "adminpass1"}).encode()
    with connect(srv) as sock:
        sock.sendall(request("POST", "/login", headers={
            "Expect": "100-continue", "Content-Length": str(len(body))}))
        buf = bytearray()
        status, _, _ = read_response(sock, buf)
        assert status == 100
        sock.sendall(body)
        status, _, answer = read_response(sock, buf)
    assert status == 200 and json.loads(answer)["token"]


def test_declared_body_over_the_limit_is_refused_before_it_is_sent(srv: RunningServer) -> None:
    with connect(srv) as sock:
        sock.sendall(request("POST", "/tasks_result?id=1", headers={
            "Content-Length": "5000", "Expect": "100-continue", **basic("pc1", SECRET)}))
        buf = bytearray()
        status, headers, body = read_response(sock, buf)
        assert status == 413 and headers["connection"] == "close"
        assert json.loads(body) == {"error": True,
                                    "msg": "Request body too large (limit 1000 bytes)"}
        assert closed(sock, buf)


def test_chunked_body_over_the_limit_is_refused_as_it_arrives(srv: RunningServer) -> None:
    with connect(srv) as sock:
        sock.sendall(request("POST", "/login", headers={"Transfer-Encoding": "chunked"})
                     + b"400\r\n" + b"x" * 1024 + b"\r\n")
        buf = bytearray()
        status, headers, _ = read_response(sock, buf)
        assert status == 413 and headers["connection"] == "close"


def test_chunked_body_within_the_limit_works(srv: RunningServer) -> None:
    body = json.dumps({"user": "admin", "pass": "adminpass1"}).encode()
    with connect(srv) as sock:
        sock.sendall(request("POST", "/login", headers={"Transfer-Encoding": "chunked"})
                     + b"%x\r\n" % 10 + body[:10] + b"\r\n")
        time.sleep(0.05)  # the rest arrives later, in a second chunk
        sock.sendall(b"%x\r\n" % (len(body) - 10) + body[10:] + b"\r\n0\r\n\r\n")
        status, _, answer = read_response(sock, bytearray())
    assert status == 200 and json.loads(answer)["token"]


@pytest.mark.parametrize("headers", [{}, {"Connection": "keep-alive"},
                                     {"Proxy-Connection": "keep-alive"}])
def test_http_10_gets_its_answer_and_a_close(srv: RunningServer, headers: dict[str, str]) -> None:
    with connect(srv) as sock:
        sock.sendall(request("GET", "/healthz", headers=headers, version="1.0"))
        buf = bytearray()
        status, headers, _ = read_response(sock, buf)
        assert status == 200 and headers["connection"] == "close"
        assert closed(sock, buf)


def test_head_has_the_length_but_no_body(srv: RunningServer) -> None:
    with connect(srv) as sock:
        sock.sendall(request("HEAD", "/healthz") + request("GET", "/healthz"))
        buf = bytearray()
        head_status, head_headers, nothing = read_response(sock, buf, head=True)
        status, headers, body = read_response(sock, buf)  # right after the HEAD's headers
    assert head_status == 200 and status == 200 and nothing == b""
    assert int(head_headers["content-length"]) == len(body) > 0


def test_keep_alive_carries_many_requests_on_one_connection(srv: RunningServer) -> None:
    with connect(srv) as sock:
        buf = bytearray()
        for _ in range(50):
            sock.sendall(request("GET", "/healthz"))
            status, headers, _ = read_response(sock, buf)
            assert status == 200 and "connection" not in headers


def test_malformed_request_gets_400_and_others_are_served(srv: RunningServer) -> None:
    with connect(srv) as sock:
        sock.sendall(b"GET /tasks HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
        status, headers, body = read_response(sock, bytearray())
    assert status == 400 and headers["connection"] == "close"
    assert json.loads(body) == {"error": True, "msg": "Malformed HTTP request"}
    assert headers["x-content-type-options"] == "nosniff"
    assert http("GET", f"{srv.url}/healthz")[0] == 200


def test_idle_connections_close_after_the_keep_alive_time_busy_ones_stay(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    server = start_server(tmp_path_factory.mktemp("keepalive"), "--keep-alive-s", "0.4",
                          "--poll-timeout-s", "1")
    try:
        server.add_account("pc1", "agent", SECRET)
        with connect(server) as idle, connect(server) as busy, connect(server) as polling:
            buf_idle, buf_busy, buf_poll = bytearray(), bytearray(), bytearray()
            idle.sendall(request("GET", "/healthz"))
            assert read_response(idle, buf_idle)[0] == 200
            polling.sendall(request("GET", "/tasks", headers=basic("pc1", SECRET)))
            for _ in range(8):  # a request every 0.15 s for 1.2 s: never idle for 0.4 s
                busy.sendall(request("GET", "/healthz"))
                assert read_response(busy, buf_busy)[0] == 200
                time.sleep(0.15)
            assert closed(idle, buf_idle), "idle for 1.2 s with a 0.4 s keep-alive"
            # The long-poll (1 s) outlasted the keep-alive time and was still answered.
            status, _, body = read_response(polling, buf_poll)
            assert (status, json.loads(body)) == (200, {})
            busy.sendall(request("GET", "/healthz"))
            assert read_response(busy, buf_busy)[0] == 200
    finally:
        server.stop()
