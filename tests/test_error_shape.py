"""Every error path answers one shape: JSON {"error": true, "msg": str} with its status.

Never an HTML page, never a stack trace, never an empty 500 (PROTOCOL, conventions).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from conformance import SHARED_ARGS, Agent, add_agent, basic, call
from support import RunningServer, http, start_server

BODY_MAX = 4096


def assert_error(status: int, headers: dict[str, str], body: bytes, expected_status: int,
                 msg_part: str | None = None) -> str:
    """Checks one error answer against PROTOCOL's error shape; returns its message."""
    lowered = {k.lower(): v for k, v in headers.items()}
    assert status == expected_status, (status, body[:300])
    assert lowered.get("content-type", "").split(";")[0].strip() == "application/json", lowered
    text = body.decode("utf-8")
    assert "Traceback" not in text and "<html" not in text.lower(), text[:300]
    doc = json.loads(text)
    assert isinstance(doc, dict) and set(doc) == {"error", "msg"}, doc
    assert doc["error"] is True, doc
    assert isinstance(doc["msg"], str) and doc["msg"].strip(), doc
    if msg_part is not None:
        assert msg_part in doc["msg"], (msg_part, doc["msg"])
    return str(doc["msg"])


@dataclass
class Ctx:
    srv: RunningServer
    token: str
    agent: Agent
    other: Agent
    delivered_id: int


@dataclass
class Case:
    method: str
    path: str
    expected: int
    msg: str | None = None
    body: bytes | None = None
    auth: str = "session"  # session | agent | none | admin-as-agent | other-agent
    headers: dict[str, str] | None = None
    path_fn: Callable[[Ctx], str] | None = None


def deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


CASES: dict[str, Case] = {
    # Unknown paths, and wrong methods on known ones.
    "unknown-get": Case("GET", "/nope", 404, "Not found"),
    "unknown-api-get": Case("GET", "/api/v1/nope", 404, "Not found"),
    "unknown-api-post": Case("POST", "/api/v1/nope", 404, "Not found", body=b"{}"),
    "unknown-delete": Case("DELETE", "/nope", 404, "Not found"),
    "unknown-task-path-not-int": Case("GET", "/api/v1/tasks/abc", 404),
    "root-delete": Case("DELETE", "/", 405, "GET"),
    "tasks-put": Case("PUT", "/tasks", 405, "GET, POST", body=b"{}"),
    "tasks-result-get": Case("GET", "/tasks_result?id=1", 405, "POST", auth="agent"),
    "login-delete": Case("DELETE", "/login", 405, "GET, POST"),
    "agents-delete": Case("DELETE", "/agents", 405, "GET, POST"),
    "selfreg-put": Case("PUT", "/agent_selfreg", 405, "GET, POST"),
    "api-tasks-delete": Case("DELETE", "/api/v1/tasks", 405, "GET, POST"),
    "api-task-post": Case("POST", "/api/v1/tasks/1", 405, "GET", body=b"{}"),
    "api-cancel-get": Case("GET", "/api/v1/tasks/1/cancel", 405, "POST"),
    "api-accounts-put": Case("PUT", "/api/v1/accounts", 405, "GET, POST", body=b"{}"),
    "api-account-get": Case("GET", "/api/v1/accounts/admin", 405, "DELETE"),
    "healthz-post": Case("POST", "/healthz", 405, "GET", body=b""),
    "openapi-post": Case("POST", "/openapi.json", 405, "GET", body=b""),
    # Authentication.
    "login-bad": Case("GET", "/login?user=admin&pass=wrong-password", 403, "Invalid credentials",
                      auth="none"),
    "logout-no-header": Case("POST", "/logout", 400, "Missing Authorization header", auth="none"),
    "agents-no-session": Case("GET", "/agents", 403, auth="none"),
    "tasks-poll-no-creds": Case("GET", "/tasks", 403, "Authorization failure", auth="none"),
    "tasks-poll-admin-creds": Case("GET", "/tasks", 403, "Authorization failure",
                                   auth="admin-as-agent"),
    "tasks-poll-bad-basic": Case("GET", "/tasks", 403, "Authorization failure", auth="none",
                                 headers={"Authorization": "Basic !!!not-base64"}),
    "tasks-poll-basic-not-ascii": Case("GET", "/tasks", 403, "Authorization failure", auth="none",
                                       headers={"Authorization": "Basic \xff\xfe=="}),
    "tasks-poll-basic-not-utf8": Case("GET", "/tasks", 403, "Authorization failure", auth="none",
                                      headers={"Authorization": "Basic /zr+"}),
    "tasks-poll-bare-not-ascii": Case("GET", "/tasks", 403, "Authorization failure", auth="none",
                                      headers={"Authorization": "\xe9t\xe9:0123456789abcdef"}),
    "result-basic-not-ascii": Case("POST", "/tasks_result?id=1", 403, "Authorization failure",
                                   body=b"{}", auth="none",
                                   headers={"Authorization": "Basic \xff\xfe=="}),
    "agents-session-not-ascii": Case("GET", "/agents", 403, auth="none",
                                     headers={"Authorization": "\xff" * 64}),
    "api-basic-not-ascii": Case("GET", "/api/v1/agents", 403, auth="none",
                                headers={"Authorization": "Basic \xff\xfe=="}),
    "api-no-session": Case("GET", "/api/v1/tasks", 401, auth="none"),
    "api-bad-token": Case("GET", "/api/v1/agents", 401, auth="none",
                          headers={"Authorization": "f" * 64}),
    "api-agent-creds": Case("GET", "/api/v1/accounts", 403, auth="agent"),
    # Bodies: not JSON, not UTF-8, not an object, too deep, too big, wrong field types.
    "submit-not-json": Case("POST", "/tasks?target=AGENT", 400, "Invalid JSON: ", body=b"{nope"),
    "submit-bad-utf8": Case("POST", "/tasks?target=AGENT", 400, "Invalid JSON: ",
                            body=b'{"type": "\xff\xfe"}'),
    "submit-array": Case("POST", "/tasks?target=AGENT", 400, "Invalid JSON: ", body=b"[1, 2]"),
    "submit-string": Case("POST", "/tasks?target=AGENT", 400, "Invalid JSON: ", body=b'"ping"'),
    "submit-empty": Case("POST", "/tasks?target=AGENT", 400, "Invalid JSON: ", body=b""),
    "submit-deep": Case("POST", "/tasks?target=AGENT", 400, "Invalid JSON: ", body=deep(1800)),
    "submit-too-big": Case("POST", "/tasks?target=AGENT", 413, "too large",
                           body=b'{"type": "x", "pad": "' + b"a" * BODY_MAX + b'"}'),
    # NaN and Infinity are not JSON (RFC 8259); stored, they would be sent on to agents and to
    # the browser, whose JSON.parse refuses the whole answer.
    "submit-nan": Case("POST", "/tasks?target=AGENT&timeout=0.2", 400, "Invalid JSON: ",
                       body=b'{"type": "ping", "v": NaN}'),
    "api-submit-infinity": Case("POST", "/api/v1/tasks", 400, "Invalid JSON: ",
                                body=b'{"targets": ["AGENT"], "task": {"type": "x", "v": -Infinity}}'),
    "result-nan": Case("POST", "/tasks_result?id=NEWID", 400, "Invalid JSON: ",
                       body=b'{"load": NaN}', auth="other-agent"),
    "submit-no-type": Case("POST", "/tasks?target=AGENT", 400, "Task type missing", body=b"{}"),
    "submit-type-not-str": Case("POST", "/tasks?target=AGENT", 400, "Task type missing",
                                body=b'{"type": 5}'),
    "submit-no-target": Case("POST", "/tasks", 400, "Missing target parameter",
                             body=b'{"type": "ping"}'),
    "submit-unknown-target": Case("POST", "/tasks?target=nobody", 404, "Unknown agent: nobody",
                                  body=b'{"type": "ping"}'),
    "submit-bad-timeout": Case("POST", "/tasks?target=AGENT&timeout=soon", 400, "timeout",
                               body=b'{"type": "ping"}'),
    "submit-negative-timeout": Case("POST", "/tasks?target=AGENT&timeout=-1", 400, "timeout",
                                    body=b'{"type": "ping"}'),
    "submit-nan-timeout": Case("POST", "/tasks?target=AGENT&timeout=nan", 400, "timeout",
                               body=b'{"type": "ping"}'),
    "result-not-json": Case("POST", "/tasks_result?id=ID", 400, "Invalid JSON: ", body=b"nope",
                            auth="agent"),
    "result-array": Case("POST", "/tasks_result?id=ID", 400, "Invalid JSON: ", body=b"[]",
                         auth="agent"),
    "result-bad-utf8": Case("POST", "/tasks_result?id=ID", 400, "Invalid JSON: ",
                            body=b'{"output": "\xc3\x28"}', auth="agent"),
    "result-too-big": Case("POST", "/tasks_result?id=ID", 413, "too large",
                           body=b'{"output": "' + b"a" * BODY_MAX + b'"}', auth="agent"),
    "result-bad-id": Case("POST", "/tasks_result?id=abc", 400, "id", body=b"{}", auth="agent"),
    "result-no-id": Case("POST", "/tasks_result", 400, "id", body=b"{}", auth="agent"),
    "result-unknown-id": Case("POST", "/tasks_result?id=987654321", 404, body=b"{}",
                              auth="agent"),
    "result-other-agent": Case("POST", "/tasks_result?id=ID", 403, body=b"{}",
                               auth="other-agent"),
    "login-deep-json": Case("POST", "/login", 400, "Invalid JSON", body=b'{"a":' + deep(1800) + b"}",
                            auth="none"),
    "login-json-array": Case("POST", "/login", 403, "Invalid credentials", body=b"[1]",
                             auth="none"),
    "login-too-big": Case("POST", "/login", 413, "too large", body=b"user=" + b"a" * BODY_MAX * 2,
                          auth="none"),
    "register-bad-name": Case("POST", "/agents?user=bad%20name&pass=0123456789abcdef", 400,
                              "Invalid name"),
    "register-short-secret": Case("POST", "/agents?user=fine-name&pass=short", 400,
                                  "16"),
    "selfreg-bad-value": Case("POST", "/agent_selfreg?enabled=yes", 400, "enabled"),
    "api-submit-array": Case("POST", "/api/v1/tasks", 400, "Invalid JSON: ", body=b"[]"),
    "api-submit-not-json": Case("POST", "/api/v1/tasks", 400, "Invalid JSON: ", body=b"{]"),
    "api-submit-bad-utf8": Case("POST", "/api/v1/tasks", 400, "Invalid JSON: ",
                                body=b'{"targets": ["\xff"]}'),
    "api-submit-deep": Case("POST", "/api/v1/tasks", 400, "Invalid JSON: ", body=deep(1800)),
    "api-submit-targets-type": Case("POST", "/api/v1/tasks", 400, "targets",
                                    body=b'{"targets": "AGENT", "task": {"type": "ping"}}'),
    "api-submit-targets-empty": Case("POST", "/api/v1/tasks", 400, "targets",
                                     body=b'{"targets": [], "task": {"type": "ping"}}'),
    "api-submit-task-type": Case("POST", "/api/v1/tasks", 400, "Task type missing",
                                 body=b'{"targets": ["AGENT"], "task": {"type": null}}'),
    "api-submit-task-not-object": Case("POST", "/api/v1/tasks", 400, "Invalid JSON: ",
                                       body=b'{"targets": ["AGENT"], "task": "ping"}'),
    "api-submit-expires-type": Case(
        "POST", "/api/v1/tasks", 400, "expires_s",
        body=b'{"targets": ["AGENT"], "task": {"type": "ping"}, "expires_s": "soon"}'),
    "api-submit-unknown-target": Case("POST", "/api/v1/tasks", 404, "Unknown agent: nobody",
                                      body=b'{"targets": ["nobody"], "task": {"type": "ping"}}'),
    "api-account-type": Case("POST", "/api/v1/accounts", 400, "type",
                             body=b'{"name": "x1", "type": "root", "password": "long-enough"}'),
    "api-account-name-type": Case("POST", "/api/v1/accounts", 400, "Invalid name",
                                  body=b'{"name": 5, "type": "admin", "password": "long-enough"}'),
    "api-account-dup": Case("POST", "/api/v1/accounts", 409, "already exists",
                            body=b'{"name": "admin", "type": "admin", "password": "long-enough"}'),
    "api-password-unknown": Case("POST", "/api/v1/accounts/nobody/password", 404,
                                 "Unknown account: nobody", body=b'{"password": "long-enough"}'),
    "api-password-short": Case("POST", "/api/v1/accounts/admin/password", 400, "8",
                               body=b'{"password": "short"}'),
    "api-remove-unknown": Case("DELETE", "/api/v1/accounts/nobody", 404, "Unknown account"),
    # Query values.
    "api-list-bad-state": Case("GET", "/api/v1/tasks?state=sleeping", 400, "state"),
    "api-list-bad-limit": Case("GET", "/api/v1/tasks?limit=many", 400, "limit"),
    "api-list-zero-limit": Case("GET", "/api/v1/tasks?limit=0", 400, "limit"),
    "api-list-huge-limit": Case("GET", "/api/v1/tasks?limit=1000000", 400, "limit"),
    "api-list-bad-before": Case("GET", "/api/v1/tasks?before_id=x", 400, "before_id"),
    "api-list-negative-before": Case("GET", "/api/v1/tasks?before_id=-5", 400, "before_id"),
    "api-list-bad-ids": Case("GET", "/api/v1/tasks?ids=1,two", 400, "ids"),
    "api-list-too-many-ids": Case("GET", "/api/v1/tasks?ids=" + ",".join(["1"] * 1001), 400,
                                  "ids"),
    "api-audit-bad-limit": Case("GET", "/api/v1/audit?limit=-1", 400, "limit"),
    "api-wait-bad": Case("GET", "/api/v1/tasks/ID?wait_s=forever", 400, "wait_s"),
    "api-wait-too-long": Case("GET", "/api/v1/tasks/ID?wait_s=61", 400, "wait_s"),
    "api-task-unknown": Case("GET", "/api/v1/tasks/987654321", 404, "Unknown task: 987654321"),
    "api-cancel-unknown": Case("POST", "/api/v1/tasks/987654321/cancel", 404, "Unknown task",
                               body=b""),
    "api-cancel-delivered": Case("POST", "/api/v1/tasks/ID/cancel", 409, body=b""),
    "api-agent-unknown": Case("GET", "/api/v1/agents/nobody", 404, "Unknown agent: nobody"),
    # Ids beyond SQLite's 64-bit integers: still a 4xx, never a 500.
    "huge-task-id": Case("GET", "/api/v1/tasks/99999999999999999999", 404, "Unknown task"),
    "huge-cancel-id": Case("POST", "/api/v1/tasks/99999999999999999999/cancel", 404,
                           "Unknown task", body=b""),
    "huge-ids-filter": Case("GET", "/api/v1/tasks?ids=99999999999999999999", 400, "ids"),
    "huge-before-id": Case("GET", "/api/v1/tasks?before_id=99999999999999999999", 400,
                           "before_id"),
}


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctx]:
    srv = start_server(tmp_path_factory.mktemp("errors"), *SHARED_ARGS,
                       "--body-max-bytes", str(BODY_MAX))
    try:
        token = srv.login()
        agent = add_agent(srv, token, "err")
        other = add_agent(srv, token, "other")
        # One task delivered to `agent` and left without a result, for the cases that need an id.
        status, _, raw = call(srv, "POST", "/api/v1/tasks",
                              {"targets": [agent.name], "task": {"type": "ping"}}, token)
        assert status == 202, raw
        task_id = json.loads(raw)["tasks"][0]["id"]
        assert agent.take()["id"] == task_id
        yield Ctx(srv, token, agent, other, task_id)
    finally:
        srv.stop()


def _headers(case: Case, c: Ctx) -> dict[str, str]:
    headers = dict(case.headers or {})
    if case.auth == "session":
        headers["Authorization"] = c.token
    elif case.auth == "agent":
        headers.update(c.agent.auth())
    elif case.auth == "other-agent":
        headers.update(c.other.auth())
    elif case.auth == "admin-as-agent":
        headers["Authorization"] = basic("admin", "adminpass1")
    return headers


@pytest.mark.parametrize("name", list(CASES))
def test_error_paths(ctx: Ctx, name: str) -> None:
    case = CASES[name]
    path = case.path.replace("AGENT", ctx.agent.name)
    if "NEWID" in path:  # a task of its own, delivered to `other`, for a case that may spoil it
        status, _, raw = call(ctx.srv, "POST", "/api/v1/tasks",
                              {"targets": [ctx.other.name], "task": {"type": "ping"}}, ctx.token)
        assert status == 202, raw
        path = path.replace("NEWID", str(ctx.other.take()["id"]))
    path = path.replace("ID", str(ctx.delivered_id))
    body = case.body.replace(b"AGENT", ctx.agent.name.encode()) if case.body else case.body
    status, headers, body = http(case.method, ctx.srv.url + path, body,
                                 headers=_headers(case, ctx))
    msg = assert_error(status, headers, body, case.expected, case.msg)
    if status == 405:
        allowed = {m.strip() for m in headers.get("allow", headers.get("Allow", "")).split(",")}
        assert allowed and all(m in msg for m in allowed - {"HEAD"}), (allowed, msg)
    if status == 413:
        assert "4096" in msg, msg


def test_rejected_submits_store_nothing(ctx: Ctx) -> None:
    """Every refused submit in the table left no task behind (PROTOCOL: nothing is stored)."""
    status, _, raw = call(ctx.srv, "GET", f"/api/v1/tasks?target={ctx.agent.name}",
                          token=ctx.token)
    assert status == 200
    assert [t["id"] for t in json.loads(raw)["tasks"]] == [ctx.delivered_id]


def test_login_ban_is_json_429(tmp_path: Any) -> None:
    srv = start_server(tmp_path, "--ban-failures", "2")
    try:
        for _ in range(2):
            status, headers, body = http("GET", srv.url + "/login?user=admin&pass=nope-nope")
            assert_error(status, headers, body, 403, "Invalid credentials")
        status, headers, body = http("GET", srv.url + "/login?user=admin&pass=adminpass1")
        assert_error(status, headers, body, 429)
        assert int({k.lower(): v for k, v in headers.items()}["retry-after"]) > 0
    finally:
        srv.stop()


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
@pytest.mark.parametrize("path", ["/tasks", "/tasks_result", "/task_result", "/agents", "/login",
                                  "/logout", "/agent_selfreg", "/agents_selfreg",
                                  "/api/v1/tasks", "/api/v1/tasks/1", "/api/v1/tasks/1/cancel",
                                  "/api/v1/agents", "/api/v1/agents/x", "/api/v1/accounts",
                                  "/api/v1/accounts/x", "/api/v1/accounts/x/password",
                                  "/api/v1/audit", "/api/v1/session", "/api/v1", "/api",
                                  "/favicon.ico", "/%ff", "/..%2f..%2fetc/passwd"])
def test_no_html_no_traceback(ctx: Ctx, path: str, method: str) -> None:
    """Whatever is asked anonymously, with a body that is no JSON, the answer is a JSON error."""
    status, headers, body = http(method, ctx.srv.url + path, b"\x00<garbage>" if method in
                                 ("POST", "PUT", "PATCH") else None)
    assert 400 <= status < 500, (status, body[:300])
    assert_error(status, headers, body, status)


def test_body_limit_is_exact_and_a_refused_result_can_be_sent_again(ctx: Ctx) -> None:
    """A body of exactly --body-max-bytes is taken, one byte more is 413; a result refused for
    its size leaves the task waiting for a smaller one."""
    agent = add_agent(ctx.srv, ctx.token, "limit")

    def task_of_size(size: int) -> bytes:
        head = b'{"targets": ["%s"], "task": {"type": "ping", "pad": "' % agent.name.encode()
        return head + b"a" * (size - len(head) - 3) + b'"}}'

    exact = task_of_size(BODY_MAX)
    assert len(exact) == BODY_MAX
    status, _, raw = call(ctx.srv, "POST", "/api/v1/tasks", exact, ctx.token)
    assert status == 202, raw
    task_id = json.loads(raw)["tasks"][0]["id"]
    status, headers, raw = call(ctx.srv, "POST", "/api/v1/tasks", task_of_size(BODY_MAX + 1),
                                ctx.token)
    assert_error(status, headers, raw, 413, str(BODY_MAX))

    task = agent.take()
    assert task["id"] == task_id and len(task["pad"]) > BODY_MAX - 100
    assert_error(*agent.post(task_id, b'{"output": "' + b"x" * BODY_MAX + b'"}'), 413)
    assert agent.post(task_id, {"output": "short"})[0] == 200
    status, _, raw = call(ctx.srv, "GET", f"/api/v1/tasks/{task_id}", token=ctx.token)
    assert json.loads(raw)["task"]["result"] == {"output": "short", "error": False}


@pytest.mark.parametrize("path", ["/", "/tasks", "/api/v1/tasks", "/no/such/path"])
def test_a_websocket_upgrade_nobody_serves_is_an_error_in_our_shape(ctx: Ctx, path: str) -> None:
    """Until a protocol of ours speaks WebSocket, an upgrade to any path is refused as an HTTP
    answer in the error shape (it was a 500 with a traceback in the log), and the server goes on
    serving."""
    import base64
    import os
    import socket

    port = int(ctx.srv.url.rsplit(":", 1)[1])
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      f"Sec-WebSocket-Version: 13\r\n\r\n").encode())
        raw = b""
        while b"\r\n\r\n" not in raw:
            raw += sock.recv(65536)
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        length = int({k.lower(): v for k, v in headers.items()}.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    status = int(lines[0].split()[1])
    assert_error(status, headers, body, 404, "Not found")
    assert http("GET", ctx.srv.url + "/healthz")[0] == 200
