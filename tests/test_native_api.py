"""PROTOCOL part 2, the task and agent routes: non-blocking submit, task views, history with
filters and paging, cancel, the agents' status, and the health probes.

Accounts, audit and the admin-only rules are in test_native_accounts.py.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from asgi_lifespan import LifespanManager

# The *_fixture imports are fixtures (a shared server per module, its admin session, a
# thread pool): pytest finds them here by their names "shared", "token" and "pool".
from conformance import (  # noqa: F401
    add_agent,
    api,
    call,
    own_server,
    pool_fixture,
    recent,
    shared_fixture,
    token_fixture,
    unique,
    when,
)
from support import RunningServer, http, wait_until
from test_error_shape import assert_error

from dutserver.app import create_app
from dutserver.config import Settings

TASK_FIELDS = {"id", "target", "type", "payload", "state", "submitted_by", "created_at",
               "delivered_at", "finished_at", "expires_at", "result"}


def submit_native(srv: RunningServer, token: str, targets: list[str], task: dict[str, Any],
                  **extra: Any) -> list[dict[str, Any]]:
    status, doc = api(srv, "POST", "/api/v1/tasks", {"targets": targets, "task": task, **extra},
                      token)
    assert status == 202, doc
    assert doc["error"] is False
    return doc["tasks"]  # type: ignore[no-any-return]


def get_task(srv: RunningServer, token: str, task_id: int, query: str = "") -> dict[str, Any]:
    status, doc = api(srv, "GET", f"/api/v1/tasks/{task_id}{query}", token=token)
    assert status == 200, doc
    assert doc["error"] is False and set(doc["task"]) == TASK_FIELDS, doc
    return doc["task"]  # type: ignore[no-any-return]


def list_tasks(srv: RunningServer, token: str, query: str) -> list[dict[str, Any]]:
    status, doc = api(srv, "GET", "/api/v1/tasks?" + query, token=token)
    assert status == 200, doc
    assert doc["error"] is False
    for task in doc["tasks"]:
        assert set(task) == TASK_FIELDS
    return doc["tasks"]  # type: ignore[no-any-return]


# --- POST /api/v1/tasks -----------------------------------------------------------------------

def test_submit_is_202_with_one_task_per_target_in_order(shared: RunningServer,
                                                         token: str) -> None:
    a, b = add_agent(shared, token), add_agent(shared, token)
    started = time.monotonic()
    tasks = submit_native(shared, token, [b.name, a.name],
                          {"type": "execute_cmd", "cmd": "uptime", "id": 5})
    assert time.monotonic() - started < 2  # it does not wait for the agents
    assert [t["target"] for t in tasks] == [b.name, a.name]
    assert len({t["id"] for t in tasks}) == 2
    for agent, entry in ((b, tasks[0]), (a, tasks[1])):
        assert agent.poll() == {"id": entry["id"], "type": "execute_cmd", "cmd": "uptime"}


def test_submitted_task_view_has_every_field(shared: RunningServer, token: str) -> None:
    agent = add_agent(shared, token)
    before = datetime.now(UTC) - timedelta(seconds=1)
    (entry,) = submit_native(shared, token, [agent.name],
                             {"type": "readfile", "path": "/etc/hostname", "max_bytes": 10})
    task = get_task(shared, token, entry["id"])
    assert task["id"] == entry["id"] and task["target"] == agent.name
    assert task["type"] == "readfile"
    assert task["payload"] == {"path": "/etc/hostname", "max_bytes": 10}
    assert task["state"] == "queued" and task["submitted_by"] == "admin"
    created = when(task["created_at"])
    assert before <= created <= datetime.now(UTC) + timedelta(seconds=1)
    # Default lifetime: one day.
    assert abs((when(task["expires_at"]) - created).total_seconds() - 86400) < 2
    assert task["delivered_at"] is None and task["finished_at"] is None
    assert task["result"] is None


def test_task_view_through_its_life(shared: RunningServer, token: str) -> None:
    agent = add_agent(shared, token)
    (entry,) = submit_native(shared, token, [agent.name], {"type": "ping"})
    assert agent.take()["id"] == entry["id"]
    task = get_task(shared, token, entry["id"])
    assert task["state"] == "delivered" and task["finished_at"] is None
    assert when(task["delivered_at"]) >= when(task["created_at"])
    assert agent.post(entry["id"], {"pong": True, "agent_version": "1.0"})[0] == 200
    task = get_task(shared, token, entry["id"])
    assert task["state"] == "done"
    assert when(task["finished_at"]) >= when(task["delivered_at"])
    assert task["result"] == {"pong": True, "agent_version": "1.0", "error": False}


def test_agent_error_makes_the_task_failed(shared: RunningServer, token: str) -> None:
    agent = add_agent(shared, token)
    (entry,) = submit_native(shared, token, [agent.name], {"type": "kill", "pid": 1})
    agent.take()
    agent.post(entry["id"], {"error": True, "msg": "operation not permitted"})
    task = get_task(shared, token, entry["id"])
    assert task["state"] == "failed"
    assert task["result"] == {"error": True, "msg": "operation not permitted"}


def test_expires_s_sets_the_deadline_and_an_expired_task_is_never_delivered(
        shared: RunningServer, token: str) -> None:
    agent = add_agent(shared, token)
    (entry,) = submit_native(shared, token, [agent.name], {"type": "ping"}, expires_s=0.5)
    task = get_task(shared, token, entry["id"])
    span = (when(task["expires_at"]) - when(task["created_at"])).total_seconds()
    assert 0.4 <= span <= 0.6, span
    wait_until(lambda: get_task(shared, token, entry["id"])["state"] == "expired", timeout_s=5)
    task = get_task(shared, token, entry["id"])
    assert task["finished_at"] is not None and task["delivered_at"] is None
    assert agent.poll() == {}


def test_unknown_target_is_404_and_nothing_is_stored(shared: RunningServer, token: str) -> None:
    agent = add_agent(shared, token)
    newest_before = list_tasks(shared, token, "limit=1")
    status, headers, body = call(shared, "POST", "/api/v1/tasks",
                                 {"targets": [agent.name, "nobody"], "task": {"type": "ping"}},
                                 token)
    assert_error(status, headers, body, 404, "Unknown agent: nobody")
    assert list_tasks(shared, token, "limit=1") == newest_before
    assert list_tasks(shared, token, f"target={agent.name}") == []
    assert agent.poll() == {}


def test_202_means_stored_durably_even_across_a_crash(tmp_path: Path) -> None:
    srv = own_server(tmp_path)
    try:
        token = srv.login()
        agent = add_agent(srv, token)
        (entry,) = submit_native(srv, token, [agent.name], {"type": "ping", "n": 7})
        srv.kill()  # SIGKILL right after the 202: no shutdown, no last flush
        srv.start()
        token = srv.login()
        task = get_task(srv, token, entry["id"])
        assert task["state"] == "queued" and task["payload"] == {"n": 7}
        assert agent.take() == {"id": entry["id"], "type": "ping", "n": 7}
    finally:
        srv.stop()


# --- GET /api/v1/tasks/{id}?wait_s ------------------------------------------------------------

def test_wait_s_returns_as_soon_as_the_task_is_final(shared: RunningServer, token: str,
                                                     pool: ThreadPoolExecutor) -> None:
    agent = add_agent(shared, token)
    (entry,) = submit_native(shared, token, [agent.name], {"type": "ping"})
    started = time.monotonic()
    waiting = pool.submit(get_task, shared, token, entry["id"], "?wait_s=10")
    agent.post(agent.take()["id"], {"pong": True})
    task = waiting.result(timeout=10)
    assert task["state"] == "done" and time.monotonic() - started < 5


def test_wait_s_gives_up_after_wait_s(shared: RunningServer, token: str) -> None:
    agent = add_agent(shared, token)
    (entry,) = submit_native(shared, token, [agent.name], {"type": "ping"})
    started = time.monotonic()
    assert get_task(shared, token, entry["id"], "?wait_s=0.4")["state"] == "queued"
    assert 0.35 <= time.monotonic() - started < 3


# --- GET /api/v1/tasks (history) --------------------------------------------------------------

def test_history_filters_and_pages(shared: RunningServer, token: str) -> None:
    a, b = add_agent(shared, token), add_agent(shared, token)
    ids_a = [t["id"] for t in (submit_native(shared, token, [a.name], {"type": "ping", "n": n})[0]
                               for n in range(5))]
    (b1,) = submit_native(shared, token, [b.name], {"type": "ping"})
    # a takes its oldest task and finishes it; cancel its second one.
    assert a.take()["id"] == ids_a[0]
    a.post(ids_a[0], {"pong": True})
    assert api(shared, "POST", f"/api/v1/tasks/{ids_a[1]}/cancel", b"", token)[0] == 200

    newest_first = list_tasks(shared, token, f"target={a.name}")
    assert [t["id"] for t in newest_first] == ids_a[::-1]
    assert {t["target"] for t in newest_first} == {a.name}
    assert [t["id"] for t in list_tasks(shared, token, f"target={b.name}")] == [b1["id"]]

    assert [t["id"] for t in list_tasks(shared, token, f"target={a.name}&state=done")] \
        == [ids_a[0]]
    assert [t["id"] for t in list_tasks(shared, token, f"target={a.name}&state=cancelled")] \
        == [ids_a[1]]
    assert [t["id"] for t in list_tasks(shared, token, f"target={a.name}&state=queued")] \
        == ids_a[:1:-1]
    assert list_tasks(shared, token, f"target={a.name}&state=expired") == []

    ids = f"{ids_a[2]},{b1['id']},{ids_a[4]},987654321"
    assert [t["id"] for t in list_tasks(shared, token, f"ids={ids}")] \
        == [b1["id"], ids_a[4], ids_a[2]]

    # Paging: two at a time with before_id, newest first, until an empty page.
    seen: list[int] = []
    page = list_tasks(shared, token, f"target={a.name}&limit=2")
    while page:
        assert len(page) <= 2
        seen += [t["id"] for t in page]
        page = list_tasks(shared, token, f"target={a.name}&limit=2&before_id={page[-1]['id']}")
    assert seen == ids_a[::-1]


def test_history_by_submitter(shared: RunningServer, token: str) -> None:
    agent = add_agent(shared, token)
    other_admin, password = unique("ops"), "other-admin-pw"
    status, doc = api(shared, "POST", "/api/v1/accounts",
                      {"name": other_admin, "type": "admin", "password": password}, token)
    assert status in (200, 201), doc
    other_token = shared.login(other_admin, password)
    (mine,) = submit_native(shared, token, [agent.name], {"type": "ping"})
    (theirs,) = submit_native(shared, other_token, [agent.name], {"type": "ping"})
    got = list_tasks(shared, token, f"submitted_by={other_admin}")
    assert [t["id"] for t in got] == [theirs["id"]]
    assert got[0]["submitted_by"] == other_admin
    assert mine["id"] in [t["id"] for t in list_tasks(shared, token, "submitted_by=admin")]
    assert list_tasks(shared, token, "submitted_by=nobody-at-all") == []


def test_history_default_limit_is_100_and_limit_is_honoured(tmp_path: Path) -> None:
    srv = own_server(tmp_path)
    try:
        token = srv.login()
        agent = add_agent(srv, token)
        status, doc = api(srv, "POST", "/api/v1/tasks",
                          {"targets": [agent.name] * 120, "task": {"type": "ping"}}, token)
        assert status == 202 and len(doc["tasks"]) == 120
        assert len(list_tasks(srv, token, "")) == 100
        assert len(list_tasks(srv, token, "limit=1000")) == 120
        assert len(list_tasks(srv, token, "limit=7")) == 7
    finally:
        srv.stop()


# --- POST /api/v1/tasks/{id}/cancel -----------------------------------------------------------

def test_cancel_queued_task_then_it_is_never_delivered(shared: RunningServer,
                                                       token: str) -> None:
    agent = add_agent(shared, token)
    first, second = (submit_native(shared, token, [agent.name], {"type": "ping", "n": n})[0]
                     for n in (1, 2))
    status, doc = api(shared, "POST", f"/api/v1/tasks/{first['id']}/cancel", b"", token)
    assert status == 200 and doc["error"] is False
    assert set(doc["task"]) == TASK_FIELDS
    assert doc["task"]["id"] == first["id"] and doc["task"]["state"] == "cancelled"
    assert doc["task"]["finished_at"] is not None and doc["task"]["delivered_at"] is None
    # The agent gets the next task, never the cancelled one.
    assert agent.take()["id"] == second["id"]
    assert agent.poll() == {}
    assert get_task(shared, token, first["id"])["state"] == "cancelled"
    # Cancelling again: it already left the queue.
    assert_error(*call(shared, "POST", f"/api/v1/tasks/{first['id']}/cancel", b"", token), 409)


def test_cancel_after_delivery_is_409_and_the_task_runs_on(shared: RunningServer,
                                                           token: str) -> None:
    agent = add_agent(shared, token)
    (entry,) = submit_native(shared, token, [agent.name], {"type": "ping"})
    agent.take()
    assert_error(*call(shared, "POST", f"/api/v1/tasks/{entry['id']}/cancel", b"", token), 409)
    assert get_task(shared, token, entry["id"])["state"] == "delivered"
    assert agent.post(entry["id"], {"pong": True})[0] == 200
    assert get_task(shared, token, entry["id"])["state"] == "done"
    assert_error(*call(shared, "POST", f"/api/v1/tasks/{entry['id']}/cancel", b"", token), 409)


def test_cancel_unknown_task_is_404(shared: RunningServer, token: str) -> None:
    assert_error(*call(shared, "POST", "/api/v1/tasks/987654321/cancel", b"", token), 404,
                 "Unknown task")


# --- GET /api/v1/agents -----------------------------------------------------------------------

def _agents(srv: RunningServer, token: str, query: str = "") -> dict[str, dict[str, Any]]:
    status, doc = api(srv, "GET", "/api/v1/agents" + query, token=token)
    assert status == 200 and doc["error"] is False, doc
    return {a["name"]: a for a in doc["agents"]}


def test_agent_that_never_polled(shared: RunningServer, token: str) -> None:
    agent = add_agent(shared, token)
    view = _agents(shared, token)[agent.name]
    assert view == {"name": agent.name, "online": False, "last_seen": None, "address": None,
                    "agent_version": None, "inventory": None, "capabilities": None,
                    "facts": {}, "labels": {}, "revoked": False}
    assert "admin" not in _agents(shared, token)


def test_agent_status_online_last_seen_address_version(shared: RunningServer, token: str,
                                                       pool: ThreadPoolExecutor) -> None:
    agent = add_agent(shared, token, user_agent="dutagent/9.8.7 (linux)")
    parked = pool.submit(agent.poll)
    wait_until(lambda: _agents(shared, token)[agent.name]["online"])
    view = _agents(shared, token)[agent.name]
    assert recent(view["last_seen"], 5)
    assert view["address"] == "127.0.0.1"
    assert view["agent_version"] == "9.8.7"
    assert parked.result(timeout=5) == {}
    wait_until(lambda: not _agents(shared, token)[agent.name]["online"])
    assert _agents(shared, token)[agent.name]["agent_version"] == "9.8.7"


def test_other_user_agents_set_no_version(shared: RunningServer, token: str) -> None:
    agent = add_agent(shared, token, user_agent="curl/8.0")
    agent.poll()
    view = _agents(shared, token)[agent.name]
    assert view["agent_version"] is None and view["last_seen"] is not None


def test_inventory_comes_from_the_last_successful_inventory_task(shared: RunningServer,
                                                                 token: str) -> None:
    agent = add_agent(shared, token)
    inventory = {"hostname": "pc-lab-3", "os": "Linux", "os_version": "12", "kernel": "6.1",
                 "arch": "x86_64", "cpu": "Test CPU", "cpu_count": 8, "ram_bytes": 8 << 30,
                 "disks": [{"mount": "/", "size": 100, "free": 40}],
                 "networks": [{"name": "eth0", "addresses": ["10.0.0.3"], "mac": "aa:bb"}],
                 "uptime_s": 12.5, "users": ["alice"], "python_version": "3.11.2",
                 "agent_version": "1.0.0"}
    for result in (inventory, {"error": True, "msg": "psutil missing"}):
        (entry,) = submit_native(shared, token, [agent.name], {"type": "inventory"})
        assert agent.take()["id"] == entry["id"]
        assert agent.post(entry["id"], result)[0] == 200
        assert _agents(shared, token)[agent.name]["inventory"] == inventory  # a failure keeps it
    status, doc = api(shared, "GET", f"/api/v1/agents/{agent.name}", token=token)
    assert status == 200 and doc["error"] is False
    assert doc["agent"]["name"] == agent.name and doc["agent"]["inventory"] == inventory
    # inventory=0 leaves it out (for frequent dashboard refreshes).
    assert "inventory" not in _agents(shared, token, "?inventory=0")[agent.name]
    # Another task type's result is not an inventory.
    (entry,) = submit_native(shared, token, [agent.name], {"type": "ping"})
    agent.post(agent.take()["id"], {"hostname": "spoofed"})
    assert _agents(shared, token)[agent.name]["inventory"] == inventory


def test_unknown_agent_view_is_404(shared: RunningServer, token: str) -> None:
    assert_error(*call(shared, "GET", "/api/v1/agents/nobody", token=token), 404,
                 "Unknown agent: nobody")
    assert_error(*call(shared, "GET", "/api/v1/agents/admin", token=token), 404,
                 "Unknown agent: admin")


def test_agent_status_survives_a_restart(tmp_path: Path) -> None:
    srv = own_server(tmp_path)
    try:
        token = srv.login()
        agent = add_agent(srv, token, user_agent="dutagent/2.0.1")
        (entry,) = submit_native(srv, token, [agent.name], {"type": "inventory"})
        assert agent.post(agent.take()["id"], {"hostname": "kept"})[0] == 200
        assert get_task(srv, token, entry["id"])["state"] == "done"
        before = _agents(srv, token)[agent.name]
        srv.restart()
        after = _agents(srv, srv.login())[agent.name]
        assert after["online"] is False
        assert after["inventory"] == {"hostname": "kept"}
        assert after["agent_version"] == "2.0.1" and after["address"] == "127.0.0.1"
        assert after["last_seen"] == before["last_seen"]
    finally:
        srv.stop()


# --- health -----------------------------------------------------------------------------------

def test_healthz_and_readyz_need_no_session(shared: RunningServer) -> None:
    for path in ("/healthz", "/readyz"):
        status, headers, body = http("GET", shared.url + path)
        assert status == 200, body
        assert headers["content-type"].startswith("application/json")
        assert json.loads(body)["error"] is False


async def test_readyz_is_503_while_shutting_down(tmp_path: Path) -> None:
    """In-process: the stop signal closes the dispatcher; from then on readyz says 503."""
    app = create_app(Settings(db_path=tmp_path / "dut.db", poll_timeout_s=0.5))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/readyz")).status_code == 200
            app.state.services.close()  # what server.py does on SIGTERM
            ready = await client.get("/readyz")
            assert_error(ready.status_code, dict(ready.headers), ready.content, 503)
            alive = await client.get("/healthz")
            assert alive.status_code == 200 and alive.json()["error"] is False

