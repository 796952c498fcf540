"""What the agent sends and how it copes with what it gets, against a scripted fake server:
the classic header form and paths, keep-alive, garbage answers, results the server refuses.

A fake server is the honest tool here: the classic Go dutserver is not available, and the real
dutserver never sends garbage."""

from __future__ import annotations

import base64
import json
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from agent_support import AGENT_SECRET, FakeServer, send_json, send_raw, start_agent
from support import wait_until


def task(value: Any) -> Any:
    return lambda h: send_json(h, 200, value)


def raw(body: bytes, status: int = 200, content_length: int | None = None) -> Any:
    return lambda h: send_raw(h, status, body, content_length)


def unbounded(size: int) -> Any:
    """An answer without Content-Length, ended by closing the connection: only the agent's
    own limit stops it from reading everything."""

    def respond(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        try:
            h.wfile.write(b'{"id": 1, "type": "ping", "pad": "' + b"x" * size + b'"}')
        except OSError:
            pass

    return respond


def test_classic_mode_speaks_the_classic_protocol(tmp_path: Path) -> None:
    with FakeServer() as fake:
        fake.script(task({"id": 3, "type": "ping"}))
        agent = start_agent(tmp_path, fake.url, "oldpc", "--classic")
        try:
            wait_until(lambda: "/task_result?id=3" in fake.results())
            wait_until(lambda: len(fake.polls) >= 3)
        finally:
            assert agent.stop() == 0
        assert fake.results()["/task_result?id=3"] == {"pong": True, "agent_version": "1.0.0"}
        _, headers, _ = fake.posts[0]
        assert headers["authorization"] == f"oldpc:{AGENT_SECRET}"
        assert headers["user-agent"] == "dutagent/1.0.0"
        assert json.loads(fake.posts[0][2])  # a JSON body
        for poll in fake.polls:
            assert poll["path"] == "/tasks"
            assert poll["authorization"] == f"oldpc:{AGENT_SECRET}"
            assert poll["user-agent"] == "dutagent/1.0.0"


def test_native_mode_uses_basic_auth_and_one_keep_alive_connection(tmp_path: Path) -> None:
    with FakeServer() as fake:
        fake.script(task({"id": 5, "type": "ping"}))
        agent = start_agent(tmp_path, fake.url, "newpc")
        try:
            wait_until(lambda: len(fake.polls) >= 4 and fake.posts)
        finally:
            assert agent.stop() == 0
        expected = "Basic " + base64.b64encode(f"newpc:{AGENT_SECRET}".encode()).decode()
        assert all(p["authorization"] == expected for p in fake.polls)
        assert fake.posts[0][0] == "/tasks_result?id=5"
        assert fake.posts[0][1]["authorization"] == expected
        # Every poll came over the same TCP connection: no new connection per poll.
        assert len({p["client_port"] for p in fake.polls}) == 1


def test_garbage_from_the_server_is_logged_and_survived(tmp_path: Path) -> None:
    with FakeServer() as fake:
        fake.script(
            raw(b"<html>Bad Gateway</html>"),  # not JSON
            task([1, 2, 3]),  # JSON, not an object
            raw(b'{"id": 4, "type": "pi', content_length=200),  # truncated body
            raw(b"{}", content_length=500 * 1024 * 1024),  # announces 500 MiB
            unbounded(3 * 1024 * 1024),  # 3 MiB with no length
            task({"id": "abc", "type": "ping"}),  # wrong type of id
            task({"type": "ping"}),  # no id at all
            task({"id": 7, "type": 5}),  # wrong type of type
            task({"id": 8, "type": "execute_cmd", "cmd": ["ls"]}),  # wrong type of a field
            raw(b"<html>Internal Server Error</html>", status=500),
            task({"id": 9, "type": "ping"}),
        )
        agent = start_agent(tmp_path, fake.url, "pc", "--max-task-bytes", str(1024 * 1024))
        try:
            wait_until(lambda: "/tasks_result?id=9" in fake.results(), timeout_s=10)
            assert agent.proc.poll() is None
        finally:
            assert agent.stop() == 0
        results = fake.results()
        assert results == {
            "/tasks_result?id=7": {"error": True, "msg": "task type missing"},
            "/tasks_result?id=8": {"error": True, "msg": "field 'cmd' must be a string"},
            "/tasks_result?id=9": {"pong": True, "agent_version": "1.0.0"},
        }
        log = agent.output()
        for expected in [
            "poll failed: poll answer is not JSON",
            "poll failed: poll answer is not a JSON object: [1, 2, 3]",
            "poll failed: truncated answer",
            "poll failed: answer of 524288000 bytes exceeds the limit of 1048576 bytes",
            "poll failed: answer exceeds the limit of 1048576 bytes",
            'a task without a valid id (id "abc", type "ping"); it cannot be answered',
            'a task without a valid id (id null, type "ping"); it cannot be answered',
            "poll answered HTTP 500 (<html>Internal Server Error</html>)",
        ]:
            assert expected in log, expected
        assert "Traceback" not in log


def test_a_result_is_retried_until_the_server_takes_it(tmp_path: Path) -> None:
    with FakeServer() as fake:
        fake.post_statuses = [503, 500, 429, 502]
        fake.script(task({"id": 11, "type": "ping"}))
        agent = start_agent(tmp_path, fake.url, "pc")
        try:
            wait_until(lambda: len(fake.posts) == 5, timeout_s=10)
            agent.wait_for_log(r"task 11: result not posted \(HTTP 503 scripted 503\); retrying in")
        finally:
            assert agent.stop() == 0
        assert [p[0] for p in fake.posts] == ["/tasks_result?id=11"] * 5
        assert all(json.loads(p[2]) == {"pong": True, "agent_version": "1.0.0"} for p in fake.posts)
        assert "result lost" not in agent.output()


def test_a_refused_result_becomes_an_error_result(tmp_path: Path) -> None:
    """413 (too large for this server's limit): the agent says so instead of losing the task."""
    with FakeServer() as fake:
        fake.post_statuses = [413]
        fake.script(task({"id": 12, "type": "ping"}))
        agent = start_agent(tmp_path, fake.url, "pc")
        try:
            wait_until(lambda: len(fake.posts) == 2)
        finally:
            assert agent.stop() == 0
        assert json.loads(fake.posts[1][2]) == {
            "error": True,
            "msg": "the server refused the agent's result: HTTP 413 scripted 413",
        }
        assert (
            "task 12: the server refused the result (413 scripted 413); posting an error result"
            in agent.output()
        )


def test_a_result_the_server_no_longer_wants_is_dropped_after_one_try(tmp_path: Path) -> None:
    with FakeServer() as fake:
        fake.post_statuses = [404]
        fake.script(task({"id": 13, "type": "ping"}))
        agent = start_agent(tmp_path, fake.url, "pc")
        try:
            agent.wait_for_log(
                r"task 13: the server no longer takes its result \(404 scripted 404\); dropped"
            )
            wait_until(lambda: len(fake.polls) >= 3)
        finally:
            assert agent.stop() == 0
        assert len(fake.posts) == 1
