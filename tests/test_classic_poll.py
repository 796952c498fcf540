"""PROTOCOL part 1, the agent's rows: GET /tasks (the long-poll) and POST /tasks_result
(also /task_result), with their exact statuses and messages."""

from __future__ import annotations

import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

# The *_fixture imports are fixtures (a shared server per module, its admin session, a
# thread pool): pytest finds them here by their names "shared", "token" and "pool".
from conformance import (  # noqa: F401
    Agent,
    add_agent,
    api,
    basic,
    call,
    jbody,
    pool_fixture,
    shared_fixture,
    submit,
    token_fixture,
)
from support import ADMIN, RunningServer, http
from test_error_shape import assert_error

def _result(fut: Future[tuple[int, dict[str, str], bytes]]) -> tuple[int, dict[str, str], Any]:
    status, headers, body = fut.result(timeout=15)
    return status, headers, jbody(body)


# --- GET /tasks (the long-poll) ---------------------------------------------------------------

@pytest.mark.parametrize("form", ["basic", "bare"])
def test_poll_times_out_with_an_empty_object(shared: RunningServer, token: str,
                                             form: str) -> None:
    agent = add_agent(shared, token)
    started = time.monotonic()
    status, headers, body = agent.poll_raw(form)
    elapsed = time.monotonic() - started
    assert status == 200 and json.loads(body) == {}
    assert {k.lower(): v for k, v in headers.items()}["content-type"].startswith(
        "application/json")
    assert 0.4 <= elapsed < 3, elapsed  # the shared server's poll timeout is 0.5 s


def test_secret_with_colons_in_bare_form(shared: RunningServer, token: str) -> None:
    """The bare form splits at the first colon, so a secret may contain colons."""
    name, secret = f"colon{time.monotonic_ns() % 10**6}", "a:b:c:0123456789abcdef"
    from urllib.parse import urlencode
    status, _, body = call(shared, "POST", "/agents?" + urlencode({"user": name, "pass": secret}),
                           b"", token=token)
    assert status == 200, body
    assert Agent(shared.url, name, secret).poll("bare") == {}
    assert Agent(shared.url, name, secret).poll("basic") == {}


@pytest.mark.parametrize("header", [
    None, "", "nocolon", ":", ":secret", "Basic", "Basic !!!", "Basic " + "YWJj",
    "AGENT:wrong-secret-0123456789", "AGENT:", "nobody:0123456789abcdef",
    "BASIC_WRONG", "ADMIN_BASIC", "ADMIN_BARE", "SESSION", "BEARER_SESSION",
])
def test_poll_refused(shared: RunningServer, token: str, header: str | None) -> None:
    agent = add_agent(shared, token)
    replacements = {
        "BASIC_WRONG": basic(agent.name, "wrong-secret-0123456789"),
        "ADMIN_BASIC": basic(*ADMIN), "ADMIN_BARE": f"{ADMIN[0]}:{ADMIN[1]}",
        "SESSION": token, "BEARER_SESSION": f"Bearer {token}",
    }
    if header is not None:
        header = replacements.get(header, header.replace("AGENT", agent.name))
    headers = {} if header is None else {"Authorization": header}
    status, hdrs, body = http("GET", shared.url + "/tasks", headers=headers)
    assert_error(status, hdrs, body, 403, "Authorization failure")
    assert json.loads(body)["msg"] == "Authorization failure"


def test_queued_tasks_come_oldest_first_one_per_poll(shared: RunningServer, token: str) -> None:
    agent = add_agent(shared, token)
    ids = []
    for n in range(3):
        status, doc = api(shared, "POST", "/api/v1/tasks",
                          {"targets": [agent.name], "task": {"type": "ping", "n": n}}, token)
        assert status == 202
        ids.append(doc["tasks"][0]["id"])
    got = [agent.poll() for _ in range(3)]
    assert [t["id"] for t in got] == ids and [t["n"] for t in got] == [0, 1, 2]
    assert agent.poll() == {}


def test_parked_polls_each_get_their_own_task(shared: RunningServer, token: str,
                                              pool: ThreadPoolExecutor) -> None:
    agent = add_agent(shared, token)
    polls = [pool.submit(agent.take) for _ in range(2)]
    status, doc = api(shared, "POST", "/api/v1/tasks",
                      {"targets": [agent.name, agent.name], "task": {"type": "ping"}}, token)
    assert status == 202
    got = sorted(p.result(timeout=10)["id"] for p in polls)
    assert got == sorted(t["id"] for t in doc["tasks"])


# --- POST /tasks_result and /task_result ------------------------------------------------------

def _delivered(srv: RunningServer, token: str, agent: Agent) -> int:
    status, doc = api(srv, "POST", "/api/v1/tasks",
                      {"targets": [agent.name], "task": {"type": "ping"}}, token)
    assert status == 202, doc
    task = agent.take()
    assert task["id"] == doc["tasks"][0]["id"]
    return int(task["id"])


@pytest.mark.parametrize("path", ["/tasks_result", "/task_result"])
@pytest.mark.parametrize("form", ["basic", "bare"])
def test_result_paths_and_forms(shared: RunningServer, token: str, pool: ThreadPoolExecutor,
                                path: str, form: str) -> None:
    agent = add_agent(shared, token)
    fut = submit(pool, shared, token, agent.name, {"type": "ping"})
    task = agent.take(form)
    status, _, body = agent.post(task["id"], {"pong": True}, path=path, form=form)
    assert (status, body) == (200, b"")
    assert _result(fut)[::2] == (200, {"pong": True, "error": False})


@pytest.mark.parametrize("raw_id", ["", "abc", "-1", "1.5", "0x10", "1e3", "%201"])
def test_result_bad_id(shared: RunningServer, token: str, raw_id: str) -> None:
    agent = add_agent(shared, token)
    assert_error(*agent.post(raw_id, {"pong": True}), 400, "id")


def test_result_without_id(shared: RunningServer, token: str) -> None:
    agent = add_agent(shared, token)
    status, headers, body = http("POST", shared.url + "/tasks_result", b"{}",
                                 headers=agent.auth())
    assert_error(status, headers, body, 400, "id")


def test_result_unknown_id(shared: RunningServer, token: str) -> None:
    agent = add_agent(shared, token)
    assert_error(*agent.post(987654321, {"pong": True}), 404)
    assert_error(*agent.post(0, {"pong": True}), 404)


def test_result_of_another_agents_task_is_403(shared: RunningServer, token: str) -> None:
    owner, intruder = add_agent(shared, token), add_agent(shared, token)
    task_id = _delivered(shared, token, owner)
    assert_error(*intruder.post(task_id, {"pong": "forged"}), 403)
    # The real result is still accepted, and it is the one kept.
    assert owner.post(task_id, {"pong": True})[0] == 200
    status, doc = api(shared, "GET", f"/api/v1/tasks/{task_id}", token=token)
    assert status == 200 and doc["task"]["result"] == {"pong": True, "error": False}
    # Once recorded, the intruder still gets 403, not a hint that a result exists.
    assert_error(*intruder.post(task_id, {"pong": "forged"}), 403)


def test_second_result_is_409_and_the_first_is_kept(shared: RunningServer, token: str) -> None:
    agent = add_agent(shared, token)
    task_id = _delivered(shared, token, agent)
    assert agent.post(task_id, {"n": 1})[:3:2] == (200, b"")
    status, headers, body = agent.post(task_id, {"n": 2})
    assert_error(status, headers, body, 409, "Result already recorded")
    assert json.loads(body)["msg"] == "Result already recorded"
    status, doc = api(shared, "GET", f"/api/v1/tasks/{task_id}", token=token)
    assert doc["task"]["result"] == {"n": 1, "error": False}
    assert doc["task"]["state"] == "done"


def test_result_for_a_task_never_delivered_is_refused(shared: RunningServer, token: str) -> None:
    agent = add_agent(shared, token)
    status, doc = api(shared, "POST", "/api/v1/tasks",
                      {"targets": [agent.name], "task": {"type": "ping"}}, token)
    task_id = doc["tasks"][0]["id"]
    status, headers, body = agent.post(task_id, {"pong": True})
    assert_error(status, headers, body, 409)
    # It is still queued and is delivered as usual.
    assert agent.take()["id"] == task_id


@pytest.mark.parametrize("auth", ["none", "wrong", "admin-password", "session"])
def test_result_needs_the_agents_credentials(shared: RunningServer, token: str,
                                             auth: str) -> None:
    agent = add_agent(shared, token)
    task_id = _delivered(shared, token, agent)
    headers = {"none": {}, "wrong": {"Authorization": basic(agent.name, "x" * 20)},
               "admin-password": {"Authorization": basic(*ADMIN)},
               "session": {"Authorization": token}}[auth]
    status, hdrs, body = http("POST", f"{shared.url}/tasks_result?id={task_id}", b"{}",
                              headers=headers)
    assert_error(status, hdrs, body, 403, "Authorization failure")
    assert agent.post(task_id, {"pong": True})[0] == 200


@pytest.mark.parametrize("body", [b"[]", b"nope", b"", b"\"done\""])
def test_result_must_be_a_json_object(shared: RunningServer, token: str, body: bytes) -> None:
    agent = add_agent(shared, token)
    task_id = _delivered(shared, token, agent)
    msg = assert_error(*agent.post(task_id, body), 400)
    assert msg.startswith("Invalid JSON: ")
    assert agent.post(task_id, {"pong": True})[0] == 200  # a refused body recorded nothing


def test_head_on_tasks_never_takes_a_task(shared: RunningServer, token: str) -> None:
    """HEAD is safe (RFC 9110): a HEAD /tasks with the agent's credentials (curl -I, a monitor)
    must not hand a task into a response without a body, where it would be lost."""
    agent = add_agent(shared, token)
    status, doc = api(shared, "POST", "/api/v1/tasks",
                      {"targets": [agent.name], "task": {"type": "ping"}}, token)
    task_id = doc["tasks"][0]["id"]
    status, _, _ = http("HEAD", shared.url + "/tasks", headers=agent.auth())
    assert status < 500
    assert api(shared, "GET", f"/api/v1/tasks/{task_id}", token=token)[1]["task"]["state"] \
        == "queued"
    assert agent.poll()["id"] == task_id
