"""PROTOCOL part 1, the submit row: POST /tasks (the blocking submit) with its exact statuses
and messages. The agent's side (GET /tasks, POST /tasks_result) is in test_classic_poll.py."""

from __future__ import annotations

import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

# The *_fixture imports are fixtures (a shared server per module, its admin session, a
# thread pool): pytest finds them here by their names "shared", "token" and "pool".
from conformance import (  # noqa: F401
    Agent,
    add_agent,
    api,
    call,
    jbody,
    own_server,
    pool_fixture,
    shared_fixture,
    submit,
    token_fixture,
)
from support import ADMIN, RunningServer, http
from test_error_shape import assert_error

TIMEOUT_MSG = "Time out while waiting for task result"


def _result(fut: Future[tuple[int, dict[str, str], bytes]]) -> tuple[int, dict[str, str], Any]:
    status, headers, body = fut.result(timeout=15)
    return status, headers, jbody(body)


# --- single target ----------------------------------------------------------------------------

@pytest.mark.parametrize("agent_form", ["basic", "bare"])
@pytest.mark.parametrize("session_form", ["bare", "bearer"])
def test_single_target_round_trip(shared: RunningServer, token: str, pool: ThreadPoolExecutor,
                                  agent_form: str, session_form: str) -> None:
    agent = add_agent(shared, token)
    fut = submit(pool, shared, token, agent.name,
                 {"type": "execute_cmd", "cmd": "echo hi", "id": 999999, "extra": [1, {"a": 2}]},
                 form=session_form)
    task = agent.take(agent_form)
    # The server assigns the id (a client-supplied one is replaced); other fields pass through.
    assert isinstance(task["id"], int) and task["id"] != 999999
    assert task == {"id": task["id"], "type": "execute_cmd", "cmd": "echo hi",
                    "extra": [1, {"a": 2}]}
    result = {"status_code": 0, "output": "hi\n", "stderr": "", "duration_s": 0.01}
    assert agent.post(task["id"], result, form=agent_form)[:3:2] == (200, b"")
    status, headers, doc = _result(fut)
    assert status == 200
    assert {k.lower(): v for k, v in headers.items()}["content-type"].startswith(
        "application/json")
    assert doc == {**result, "error": False}  # "error": false added, nothing else changed


def test_result_keeps_an_explicit_error_false_and_unicode(shared: RunningServer, token: str,
                                                         pool: ThreadPoolExecutor) -> None:
    agent = add_agent(shared, token)
    fut = submit(pool, shared, token, agent.name, {"type": "ping"})
    task = agent.take()
    result = {"error": False, "pong": True, "note": "grüße ✓", "nested": {"n": [None, 1.5]}}
    assert agent.post(task["id"], result)[0] == 200
    assert _result(fut)[::2] == (200, result)


def test_agent_side_error_is_still_200(shared: RunningServer, token: str,
                                       pool: ThreadPoolExecutor) -> None:
    agent = add_agent(shared, token)
    fut = submit(pool, shared, token, agent.name, {"type": "readfile", "path": "/nope"})
    task = agent.take()
    result = {"error": True, "msg": "file not found: /nope"}
    assert agent.post(task["id"], result)[0] == 200
    assert _result(fut)[::2] == (200, result)


def test_single_target_timeout_is_504_and_the_task_is_never_delivered(
        shared: RunningServer, token: str, pool: ThreadPoolExecutor) -> None:
    agent = add_agent(shared, token)
    started = time.monotonic()
    status, headers, body = submit(pool, shared, token, agent.name, {"type": "ping"},
                                   timeout_s=0.4).result(timeout=15)
    elapsed = time.monotonic() - started
    assert_error(status, headers, body, 504, TIMEOUT_MSG)
    assert 0.35 <= elapsed < 3, elapsed
    # Fix: its submitter stopped waiting before the agent took it, so it is never delivered.
    assert agent.poll() == {}
    status, doc = api(shared, "GET", f"/api/v1/tasks?target={agent.name}", token=token)
    assert [t["state"] for t in doc["tasks"]] == ["cancelled"]


def test_default_and_maximum_timeout_come_from_the_settings(tmp_path: Path) -> None:
    srv = own_server(tmp_path, "--submit-timeout-s", "0.3", "--submit-timeout-max-s", "1.2")
    try:
        token = srv.login()
        agent = add_agent(srv, token)
        for query, low, high in (("", 0.25, 1.0), ("&timeout=300", 1.15, 4)):
            started = time.monotonic()
            status, headers, body = call(srv, "POST", f"/tasks?target={agent.name}{query}",
                                         {"type": "ping"}, token=token)
            elapsed = time.monotonic() - started
            assert_error(status, headers, body, 504, TIMEOUT_MSG)
            assert low <= elapsed < high, (query, elapsed)
    finally:
        srv.stop()


# --- several targets --------------------------------------------------------------------------

def test_multi_target_results_in_target_order_with_a_timed_out_entry(
        shared: RunningServer, token: str, pool: ThreadPoolExecutor) -> None:
    a, b, c = (add_agent(shared, token, p) for p in ("ma", "mb", "mc"))
    timeout_s = 1.5
    started = time.monotonic()
    fut = submit(pool, shared, token, f"{a.name},{b.name},{c.name}", {"type": "ping"},
                 timeout_s=timeout_s)
    task_a, task_b = a.take(), b.take()
    assert task_a["id"] != task_b["id"] and task_a["type"] == task_b["type"] == "ping"
    # b answers first, a second, c never: the answer is still in target order a, b, c.
    assert b.post(task_b["id"], {"pong": True, "who": "b"})[0] == 200
    assert a.post(task_a["id"], {"error": True, "msg": "a failed"})[0] == 200
    status, _, doc = _result(fut)
    elapsed = time.monotonic() - started
    assert status == 200
    assert doc == {"error": False, "results": [
        {"error": True, "msg": "a failed", "target": a.name},
        {"pong": True, "who": "b", "error": False, "target": b.name},
        {"error": True, "msg": TIMEOUT_MSG, "target": c.name},
    ]}
    # The waits run concurrently: one timeout in all, not one per target.
    assert timeout_s - 0.1 <= elapsed < 2 * timeout_s, elapsed
    # c's task was never taken: it was cancelled with its submitter's wait and is never delivered.
    assert c.poll() == {}


def test_multi_target_all_answer_before_the_timeout(shared: RunningServer, token: str,
                                                    pool: ThreadPoolExecutor) -> None:
    agents = [add_agent(shared, token, "all") for _ in range(3)]
    started = time.monotonic()
    fut = submit(pool, shared, token, ",".join(a.name for a in agents), {"type": "ping"},
                 timeout_s=10)
    for agent in reversed(agents):
        task = agent.take()
        assert agent.post(task["id"], {"pong": True, "name": agent.name})[0] == 200
    status, _, doc = _result(fut)
    assert status == 200
    assert doc["results"] == [{"pong": True, "name": a.name, "error": False, "target": a.name}
                              for a in agents]
    assert time.monotonic() - started < 5  # answered when the last result came, not at 10 s


def test_multi_target_all_time_out_is_200(shared: RunningServer, token: str) -> None:
    a, b = add_agent(shared, token), add_agent(shared, token)
    status, _, body = call(shared, "POST", f"/tasks?target={a.name},{b.name}&timeout=0.3",
                           {"type": "ping"}, token=token)
    assert status == 200
    assert jbody(body) == {"error": False, "results": [
        {"error": True, "msg": TIMEOUT_MSG, "target": a.name},
        {"error": True, "msg": TIMEOUT_MSG, "target": b.name}]}


# --- submit errors ----------------------------------------------------------------------------

def _tasks_of(srv: RunningServer, token: str, agent: Agent) -> list[dict[str, object]]:
    status, doc = api(srv, "GET", f"/api/v1/tasks?target={agent.name}", token=token)
    assert status == 200
    return doc["tasks"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("target,missing", [
    ("nobody", "nobody"),
    ("admin", "admin"),            # an admin is not an agent
    ("KNOWN,nobody", "nobody"),    # one unknown target refuses the whole submit
    ("nobody,KNOWN", "nobody"),
    ("bad name!", "bad name!"),
])
def test_unknown_target_is_404_and_nothing_is_queued(shared: RunningServer, token: str,
                                                     target: str, missing: str) -> None:
    agent = add_agent(shared, token)
    from urllib.parse import quote
    status, headers, body = call(shared, "POST", "/tasks?target=" +
                                 quote(target.replace("KNOWN", agent.name), safe=","),
                                 {"type": "ping"}, token=token)
    assert_error(status, headers, body, 404, f"Unknown agent: {missing}")
    assert json.loads(body)["msg"] == f"Unknown agent: {missing}"
    assert agent.poll() == {}
    assert _tasks_of(shared, token, agent) == []


@pytest.mark.parametrize("query", ["", "?target=", "?timeout=1", "?targets=x"])
def test_missing_target(shared: RunningServer, token: str, query: str) -> None:
    status, headers, body = call(shared, "POST", "/tasks" + query, {"type": "ping"}, token=token)
    assert_error(status, headers, body, 400, "Missing target parameter")
    assert json.loads(body)["msg"] == "Missing target parameter"


@pytest.mark.parametrize("body", [b"", b"{", b"ping", b"[]", b"[{\"type\": \"ping\"}]", b"42",
                                  b"null", b'"ping"', b"\xff\xfe{}"])
def test_body_not_a_json_object(shared: RunningServer, token: str, body: bytes) -> None:
    agent = add_agent(shared, token)
    status, headers, raw = call(shared, "POST", f"/tasks?target={agent.name}", body, token=token)
    msg = assert_error(status, headers, raw, 400)
    assert msg.startswith("Invalid JSON: ") and len(msg) > len("Invalid JSON: "), msg
    assert _tasks_of(shared, token, agent) == []


@pytest.mark.parametrize("task", [{}, {"type": None}, {"type": 5}, {"type": ""},
                                  {"type": ["ping"]}, {"cmd": "ls"}])
def test_task_type_missing(shared: RunningServer, token: str, task: dict[str, object]) -> None:
    agent = add_agent(shared, token)
    status, headers, body = call(shared, "POST", f"/tasks?target={agent.name}", task,
                                 token=token)
    assert_error(status, headers, body, 400, "Task type missing")
    assert json.loads(body)["msg"] == "Task type missing"
    assert _tasks_of(shared, token, agent) == []


def test_json_is_read_whatever_the_content_type(shared: RunningServer, token: str,
                                                pool: ThreadPoolExecutor) -> None:
    agent = add_agent(shared, token)
    fut = pool.submit(http, "POST", f"{shared.url}/tasks?target={agent.name}",
                      b'{"type": "ping"}', {"Authorization": token,
                                            "Content-Type": "application/x-www-form-urlencoded"})
    task = agent.take()
    assert task["type"] == "ping"
    agent.post(task["id"], {"pong": True})
    assert _result(fut)[::2] == (200, {"pong": True, "error": False})


@pytest.mark.parametrize("auth", ["none", "garbage", "agent-basic", "agent-bare",
                                  "admin-password"])
def test_submit_needs_a_session(shared: RunningServer, token: str, auth: str) -> None:
    agent = add_agent(shared, token)
    headers = {"none": {}, "garbage": {"Authorization": "e" * 64},
               "agent-basic": agent.auth("basic"), "agent-bare": agent.auth("bare"),
               "admin-password": {"Authorization": f"{ADMIN[0]}:{ADMIN[1]}"}}[auth]
    status, hdrs, body = http("POST", f"{shared.url}/tasks?target={agent.name}",
                              {"type": "ping"}, headers=headers)
    assert_error(status, hdrs, body, 403)
    assert agent.poll() == {}


def test_full_queue_is_503(tmp_path: Path) -> None:
    srv = own_server(tmp_path, "--queue-max", "2")
    try:
        token = srv.login()
        agent, other = add_agent(srv, token), add_agent(srv, token)
        status, doc = api(srv, "POST", "/api/v1/tasks",
                          {"targets": [agent.name, agent.name], "task": {"type": "ping"}}, token)
        assert status == 202, doc
        status, headers, body = call(srv, "POST", f"/tasks?target={agent.name}&timeout=5",
                                     {"type": "ping"}, token=token)
        assert_error(status, headers, body, 503, "Task queue is full")
        # The whole multi-target submit is refused, so nothing reaches the other agent either.
        status, headers, body = call(srv, "POST", f"/tasks?target={other.name},{agent.name}",
                                     {"type": "ping"}, token=token)
        assert_error(status, headers, body, 503, "Task queue is full")
        assert other.poll() == {}
        assert len(_tasks_of(srv, token, agent)) == 2
        # Once the agent takes a task there is room again.
        first = agent.take()
        status, doc = api(srv, "POST", "/api/v1/tasks",
                          {"targets": [agent.name], "task": {"type": "ping"}}, token)
        assert status == 202, doc
        assert agent.take()["id"] > first["id"]
    finally:
        srv.stop()


def test_task_taken_before_the_submit_timed_out_keeps_its_late_result(
        shared: RunningServer, token: str, pool: ThreadPoolExecutor) -> None:
    agent = add_agent(shared, token)
    fut = submit(pool, shared, token, agent.name, {"type": "ping"}, timeout_s=0.5)
    task = agent.take()
    status, headers, body = fut.result(timeout=10)
    assert_error(status, headers, body, 504, TIMEOUT_MSG)
    assert agent.post(task["id"], {"pong": "late"})[:3:2] == (200, b"")
    status, doc = api(shared, "GET", f"/api/v1/tasks/{task['id']}", token=token)
    assert (doc["task"]["state"], doc["task"]["result"]) == ("done", {"pong": "late",
                                                                      "error": False})
