"""PROTOCOL part 2, the admin side: accounts CRUD, the audit log, and who may call the native
API at all (401 without a session, 403 for an agent credential)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

# The *_fixture imports are fixtures (a shared server per module, its admin session, a
# thread pool): pytest finds them here by their names "shared", "token" and "pool".
from conformance import (  # noqa: F401
    add_agent,
    api,
    basic,
    call,
    own_server,
    pool_fixture,
    recent,
    shared_fixture,
    token_fixture,
    unique,
    when,
)
from support import ADMIN, RunningServer, http, wait_until
from test_error_shape import assert_error

ADMIN_ROUTES = [
    ("GET", "/api/v1/session"),
    ("GET", "/api/v1/tasks"),
    ("POST", "/api/v1/tasks"),
    ("GET", "/api/v1/tasks/1"),
    ("POST", "/api/v1/tasks/1/cancel"),
    ("GET", "/api/v1/agents"),
    ("GET", "/api/v1/agents/someone"),
    ("GET", "/api/v1/accounts"),
    ("POST", "/api/v1/accounts"),
    ("POST", "/api/v1/accounts/admin/password"),
    ("DELETE", "/api/v1/accounts/admin"),
    ("GET", "/api/v1/audit"),
]


def _accounts(srv: RunningServer, token: str) -> dict[str, dict[str, Any]]:
    status, doc = api(srv, "GET", "/api/v1/accounts", token=token)
    assert status == 200 and doc["error"] is False, doc
    return {a["name"]: a for a in doc["accounts"]}


def _create(srv: RunningServer, token: str, name: str, kind: str, password: str) -> None:
    status, doc = api(srv, "POST", "/api/v1/accounts",
                      {"name": name, "type": kind, "password": password}, token)
    assert status in (200, 201), doc
    assert doc["error"] is False and doc["account"] == {"name": name, "type": kind}


def _login_status(srv: RunningServer, name: str, password: str) -> int:
    return http("GET", f"{srv.url}/login?{urlencode({'user': name, 'pass': password})}")[0]


def _poll_status(srv: RunningServer, name: str, secret: str) -> int:
    return http("GET", srv.url + "/tasks", headers={"Authorization": basic(name, secret)})[0]


# --- who may call ------------------------------------------------------------------------------

@pytest.mark.parametrize("method,path", ADMIN_ROUTES)
def test_admin_routes_without_a_session_are_401(shared: RunningServer, method: str,
                                                path: str) -> None:
    body = b"{}" if method == "POST" else None
    for headers in ({}, {"Authorization": "a" * 64}, {"Authorization": "Bearer " + "b" * 64},
                    {"Authorization": "garbage"}):
        assert_error(*http(method, shared.url + path, body, headers=headers), 401)


@pytest.mark.parametrize("method,path", ADMIN_ROUTES)
def test_admin_routes_refuse_agent_credentials_with_403(shared: RunningServer, token: str,
                                                        method: str, path: str) -> None:
    agent = add_agent(shared, token)
    body = b"{}" if method == "POST" else None
    for form in ("basic", "bare"):
        assert_error(*http(method, shared.url + path, body, headers=agent.auth(form)), 403)
    # An admin's password as a credential is no session either.
    assert http(method, shared.url + path, body,
                headers={"Authorization": basic(*ADMIN)})[0] in (401, 403)
    assert _accounts(shared, token)["admin"]["type"] == "admin"  # nothing was changed


def test_session_info(shared: RunningServer, token: str) -> None:
    status, doc = api(shared, "GET", "/api/v1/session", token=token)
    assert status == 200
    assert doc["error"] is False and doc["user"] == "admin" and doc["type"] == "admin"
    assert when(doc["expires_at"]) > when("2000-01-01T00:00:00Z")


# --- accounts ----------------------------------------------------------------------------------

def test_list_accounts(shared: RunningServer, token: str) -> None:
    agent = add_agent(shared, token)
    accounts = _accounts(shared, token)
    assert accounts["admin"]["type"] == "admin"
    assert accounts[agent.name]["type"] == "agent"
    for account in accounts.values():
        assert {"name", "type", "created_at", "updated_at"} <= set(account)
        assert "password" not in account and "secret_hash" not in account
        assert when(account["updated_at"]) >= when(account["created_at"])
    assert recent(accounts[agent.name]["created_at"])


def test_create_admin_and_agent_accounts(shared: RunningServer, token: str) -> None:
    admin, agent = unique("boss"), unique("box")
    _create(shared, token, admin, "admin", "eight-ch")
    _create(shared, token, agent, "agent", "sixteen-chars-ok")
    assert _login_status(shared, admin, "eight-ch") == 200
    assert _poll_status(shared, agent, "sixteen-chars-ok") == 200
    # Types are kept apart: the agent cannot log in, the admin cannot poll.
    assert _login_status(shared, agent, "sixteen-chars-ok") == 403
    assert _poll_status(shared, admin, "eight-ch") == 403
    accounts = _accounts(shared, token)
    assert (accounts[admin]["type"], accounts[agent]["type"]) == ("admin", "agent")


@pytest.mark.parametrize("body,status,msg", [
    ({"name": "ok-name", "type": "admin", "password": "seven77"}, 400, "8"),
    ({"name": "ok-name", "type": "agent", "password": "fifteen-chars-x"}, 400, "16"),
    ({"name": "ok-name", "type": "admin"}, 400, None),
    ({"name": "ok-name", "type": "admin", "password": 12345678}, 400, None),
    ({"name": "bad name", "type": "admin", "password": "long-enough"}, 400, "Invalid name"),
    ({"name": "", "type": "admin", "password": "long-enough"}, 400, "Invalid name"),
    ({"name": "x" * 65, "type": "admin", "password": "long-enough"}, 400, "Invalid name"),
    ({"type": "admin", "password": "long-enough"}, 400, "Invalid name"),
    ({"name": "ok-name", "type": "root", "password": "long-enough"}, 400, "type"),
    ({"name": "ok-name", "password": "long-enough"}, 400, "type"),
    ({"name": "admin", "type": "admin", "password": "long-enough"}, 409, "already exists"),
    ({"name": "admin", "type": "agent", "password": "long-enough-16-ch"}, 409, "already exists"),
])
def test_create_account_refused(shared: RunningServer, token: str, body: dict[str, Any],
                                status: int, msg: str | None) -> None:
    if body.get("name") == "ok-name":
        body = {**body, "name": unique("ok")}
    assert_error(*call(shared, "POST", "/api/v1/accounts", body, token), status, msg)
    if body.get("name") and body["name"] != "admin":
        assert body["name"] not in _accounts(shared, token)
    assert _login_status(shared, *ADMIN) == 200  # the existing admin is untouched


def test_create_existing_agent_is_409_and_keeps_its_secret(shared: RunningServer,
                                                           token: str) -> None:
    agent = add_agent(shared, token)
    assert_error(*call(shared, "POST", "/api/v1/accounts",
                       {"name": agent.name, "type": "agent", "password": "replacement-secret-1"},
                       token), 409, "already exists")
    assert _poll_status(shared, agent.name, agent.secret) == 200
    assert _poll_status(shared, agent.name, "replacement-secret-1") == 403


def test_change_admin_password_ends_its_sessions(shared: RunningServer, token: str) -> None:
    name = unique("pw")
    _create(shared, token, name, "admin", "first-password")
    their_session = shared.login(name, "first-password")
    status, doc = api(shared, "POST", f"/api/v1/accounts/{name}/password",
                      {"password": "second-password"}, token)
    assert status == 200 and doc["error"] is False, doc
    assert _login_status(shared, name, "first-password") == 403
    assert _login_status(shared, name, "second-password") == 200
    assert api(shared, "GET", "/api/v1/session", token=their_session)[0] == 401
    assert api(shared, "GET", "/api/v1/session", token=token)[0] == 200  # others keep theirs
    updated = _accounts(shared, token)[name]
    assert when(updated["updated_at"]) >= when(updated["created_at"])


def test_change_agent_secret(shared: RunningServer, token: str) -> None:
    agent = add_agent(shared, token)
    assert _poll_status(shared, agent.name, agent.secret) == 200  # its header is known now
    status, doc = api(shared, "POST", f"/api/v1/accounts/{agent.name}/password",
                      {"password": "the-new-agent-secret"}, token)
    assert status == 200, doc
    assert _poll_status(shared, agent.name, agent.secret) == 403
    assert _poll_status(shared, agent.name, "the-new-agent-secret") == 200


@pytest.mark.parametrize("body,status", [({"password": "short"}, 400), ({}, 400),
                                         ({"password": None}, 400)])
def test_change_password_refused(shared: RunningServer, token: str, body: dict[str, Any],
                                 status: int) -> None:
    name = unique("keep")
    _create(shared, token, name, "admin", "keep-this-one")
    assert_error(*call(shared, "POST", f"/api/v1/accounts/{name}/password", body, token), status)
    assert _login_status(shared, name, "keep-this-one") == 200


def test_change_password_of_unknown_account_is_404(shared: RunningServer, token: str) -> None:
    assert_error(*call(shared, "POST", "/api/v1/accounts/nobody/password",
                       {"password": "long-enough-pw"}, token), 404, "Unknown account: nobody")


def test_remove_admin_ends_its_sessions(shared: RunningServer, token: str) -> None:
    name = unique("gone")
    _create(shared, token, name, "admin", "gone-password")
    their_session = shared.login(name, "gone-password")
    status, doc = api(shared, "DELETE", f"/api/v1/accounts/{name}", token=token)
    assert status == 200 and doc["error"] is False, doc
    assert name not in _accounts(shared, token)
    assert _login_status(shared, name, "gone-password") == 403
    assert api(shared, "GET", "/api/v1/session", token=their_session)[0] == 401
    assert_error(*call(shared, "DELETE", f"/api/v1/accounts/{name}", token=token), 404,
                 "Unknown account")


def test_remove_agent_cancels_its_queued_tasks(shared: RunningServer, token: str) -> None:
    agent = add_agent(shared, token)
    status, doc = api(shared, "POST", "/api/v1/tasks",
                      {"targets": [agent.name], "task": {"type": "ping"}}, token)
    assert status == 202
    task_id = doc["tasks"][0]["id"]
    assert _poll_status(shared, agent.name, agent.secret) == 200  # gets the task; header known
    status, doc = api(shared, "POST", "/api/v1/tasks",
                      {"targets": [agent.name], "task": {"type": "ping"}}, token)
    assert status == 202
    task_id = doc["tasks"][0]["id"]
    assert api(shared, "DELETE", f"/api/v1/accounts/{agent.name}", token=token)[0] == 200
    assert _poll_status(shared, agent.name, agent.secret) == 403
    assert agent.name not in api(shared, "GET", "/api/v1/agents", token=token)[1]["agents"]
    wait_until(lambda: api(shared, "GET", f"/api/v1/tasks/{task_id}",
                           token=token)[1]["task"]["state"] == "cancelled")
    assert_error(*call(shared, "POST", f"/tasks?target={agent.name}", {"type": "ping"}, token),
                 404, f"Unknown agent: {agent.name}")


# --- audit -------------------------------------------------------------------------------------

def _events(srv: RunningServer, token: str, query: str = "") -> list[dict[str, Any]]:
    status, doc = api(srv, "GET", "/api/v1/audit" + query, token=token)
    assert status == 200 and doc["error"] is False, doc
    for event in doc["events"]:
        assert set(event) == {"id", "at", "actor", "action", "detail", "address"}
    return doc["events"]  # type: ignore[no-any-return]


def test_audit_records_who_did_what(tmp_path: Path) -> None:
    srv = own_server(tmp_path, "--ban-failures", "2")
    try:
        token = srv.login()
        assert _login_status(srv, "admin", "wrong-password") == 403
        assert _login_status(srv, "mallory", "whatever-pw") == 403
        assert _login_status(srv, "mallory", "whatever-pw") == 403  # second failure: banned
        agent = add_agent(srv, token)                               # account created
        status, doc = api(srv, "POST", "/api/v1/tasks",
                          {"targets": [agent.name], "task": {"type": "ping"}}, token)
        assert status == 202
        task_id = doc["tasks"][0]["id"]
        assert api(srv, "POST", f"/api/v1/tasks/{task_id}/cancel", b"", token)[0] == 200
        assert call(srv, "POST", "/agent_selfreg?enabled=1", b"", token)[0] == 200
        assert api(srv, "POST", f"/api/v1/accounts/{agent.name}/password",
                   {"password": "another-secret-16"}, token)[0] == 200
        assert api(srv, "DELETE", f"/api/v1/accounts/{agent.name}", token=token)[0] == 200

        events = _events(srv, token)
        ids = [e["id"] for e in events]
        assert ids == sorted(ids, reverse=True)  # newest first
        for event in events:
            assert recent(event["at"])
        by_action: dict[str, list[dict[str, Any]]] = {}
        for event in reversed(events):
            by_action.setdefault(event["action"], []).append(event)

        def one(action: str, actor: str, detail_part: str) -> dict[str, Any]:
            found = [e for e in by_action.get(action, [])
                     if e["actor"] == actor and detail_part in (e["detail"] or "")]
            assert found, (action, actor, detail_part, by_action.keys())
            return found[0]

        assert one("login", "admin", "")["address"] == "127.0.0.1"
        assert one("login_failed", "admin", "")["address"] == "127.0.0.1"
        one("login_failed", "mallory", "")
        assert "mallory" in one("ban", "mallory", "")["detail"]
        one("account_create", "admin", agent.name)
        one("task_submit", "admin", str(task_id))
        one("task_cancel", "admin", str(task_id))
        one("selfreg", "admin", "on")
        one("account_password", "admin", agent.name)
        one("account_remove", "admin", agent.name)
        # Passwords and tokens never reach the audit log.
        text = repr(events)
        assert "wrong-password" not in text and "another-secret-16" not in text
        assert token not in text and agent.secret not in text
    finally:
        srv.stop()


def test_audit_pages_with_before_id(shared: RunningServer, token: str) -> None:
    for _ in range(3):
        add_agent(shared, token)
    everything = _events(shared, token, "?limit=1000")
    assert len(everything) >= 4
    seen: list[int] = []
    page = _events(shared, token, "?limit=3")
    while page:
        assert len(page) <= 3
        seen += [e["id"] for e in page]
        page = _events(shared, token, f"?limit=3&before_id={page[-1]['id']}")
    assert seen == [e["id"] for e in everything]


def test_audit_of_agent_credential_failure(shared: RunningServer, token: str) -> None:
    agent = add_agent(shared, token)
    assert _poll_status(shared, agent.name, "not-the-secret-at-all") == 403
    events = [e for e in _events(shared, token, "?limit=50") if e["actor"] == agent.name]
    assert events and "failed" in events[0]["action"], events
