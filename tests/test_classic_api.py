"""PROTOCOL part 1, row by row: the classic endpoints with their exact statuses and messages.

Sessions, logout, the agent list, registration and self-registration live here; submitting,
polling and results are in test_classic_tasks.py.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

# The *_fixture imports are fixtures (a shared server per module, its admin session, a
# thread pool): pytest finds them here by their names "shared", "token" and "pool".
from conformance import (  # noqa: F401
    add_agent,
    basic,
    call,
    jbody,
    own_server,
    pool_fixture,
    session_headers,
    shared_fixture,
    token_fixture,
    unique,
)
from support import ADMIN, RunningServer, http, wait_until
from test_error_shape import assert_error


def ok_json(status: int, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    assert status == 200, (status, body)
    lowered = {k.lower(): v for k, v in headers.items()}
    assert lowered["content-type"].startswith("application/json"), lowered
    doc = json.loads(body)
    assert doc["error"] is False, doc
    return doc  # type: ignore[no-any-return]


# --- /login -----------------------------------------------------------------------------------

def _assert_logged_in(srv: RunningServer, status: int, headers: dict[str, str],
                      body: bytes) -> str:
    doc = ok_json(status, headers, body)
    assert doc["msg"] == "Logged in"
    token = doc["token"]
    assert isinstance(token, str) and re.fullmatch(r"[0-9a-f]{64}", token), token
    # The token is a session: it opens GET /agents, which refuses anonymous callers.
    assert call(srv, "GET", "/agents", token=token)[0] == 200
    return token


def test_login_with_query(shared: RunningServer) -> None:
    _assert_logged_in(shared, *http("GET", shared.url + "/login?user=admin&pass=adminpass1"))


def test_login_post_query(shared: RunningServer) -> None:
    _assert_logged_in(shared, *http("POST", shared.url + "/login?user=admin&pass=adminpass1", b""))


def test_login_with_form_body(shared: RunningServer) -> None:
    form = urlencode({"user": ADMIN[0], "pass": ADMIN[1]}).encode()
    _assert_logged_in(shared, *http("POST", shared.url + "/login", form, headers={
        "Content-Type": "application/x-www-form-urlencoded"}))


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", None])
def test_login_with_json_body_whatever_its_content_type(shared: RunningServer,
                                                        content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    _assert_logged_in(shared, *http("POST", shared.url + "/login",
                                     {"user": ADMIN[0], "pass": ADMIN[1]}, headers=headers))


def test_two_logins_get_two_sessions(shared: RunningServer) -> None:
    first, second = shared.login(), shared.login()
    assert first != second
    assert call(shared, "POST", "/logout", token=first)[0] == 200
    assert call(shared, "GET", "/agents", token=second)[0] == 200


@pytest.mark.parametrize("query", [
    "user=admin&pass=wrong-password",
    "user=nobody-at-all&pass=adminpass1",
    "user=admin",
    "pass=adminpass1",
    "",
    "user=&pass=",
    "user=admin&pass=ADMINPASS1",
])
def test_login_refused(shared: RunningServer, query: str) -> None:
    status, headers, body = http("GET", f"{shared.url}/login?{query}")
    assert_error(status, headers, body, 403, "Invalid credentials")
    assert "token" not in json.loads(body)


def test_login_refused_in_json_body(shared: RunningServer) -> None:
    status, headers, body = http("POST", shared.url + "/login",
                                 {"user": ADMIN[0], "pass": "wrong-password"})
    assert_error(status, headers, body, 403, "Invalid credentials")


def test_agent_account_cannot_log_in(shared: RunningServer, token: str) -> None:
    agent = add_agent(shared, token)
    for method, path, body in [
        ("GET", f"/login?{urlencode({'user': agent.name, 'pass': agent.secret})}", None),
        ("POST", "/login", {"user": agent.name, "pass": agent.secret}),
    ]:
        assert_error(*http(method, shared.url + path, body), 403, "Invalid credentials")
    # ... though its credential is good: it polls fine.
    assert agent.poll_raw()[0] == 200


def test_login_ban_then_429_even_with_the_right_password(tmp_path: Path) -> None:
    srv = own_server(tmp_path, "--ban-failures", "3")
    try:
        for _ in range(3):
            assert_error(*http("GET", srv.url + "/login?user=admin&pass=bad-password"), 403,
                         "Invalid credentials")
        status, headers, body = http("GET", srv.url + "/login?user=admin&pass=adminpass1")
        assert_error(status, headers, body, 429)
        retry = int({k.lower(): v for k, v in headers.items()}["retry-after"])
        assert 0 < retry <= 60
    finally:
        srv.stop()


# --- /logout ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE"])
def test_logout_any_method_kills_the_token(shared: RunningServer, method: str) -> None:
    token = shared.login()
    status, headers, body = call(shared, method, "/logout", b"" if method != "GET" else None,
                                 token=token)
    assert ok_json(status, headers, body) == {"error": False, "msg": "Logged out"}
    status, headers, body = call(shared, "GET", "/agents", token=token)
    assert_error(status, headers, body, 403)


def test_logout_with_bearer_form(shared: RunningServer) -> None:
    token = shared.login()
    status, headers, body = http("POST", shared.url + "/logout", b"",
                                 headers=session_headers(token, "bearer"))
    assert ok_json(status, headers, body)["msg"] == "Logged out"
    assert call(shared, "GET", "/agents", token=token)[0] == 403


def test_logout_without_header(shared: RunningServer) -> None:
    assert_error(*http("POST", shared.url + "/logout", b""), 400, "Missing Authorization header")
    assert_error(*http("GET", shared.url + "/logout"), 400, "Missing Authorization header")


def test_logout_does_not_touch_other_sessions(shared: RunningServer, token: str) -> None:
    other = shared.login()
    assert call(shared, "POST", "/logout", b"", token=other)[0] == 200
    assert call(shared, "GET", "/agents", token=token)[0] == 200


# --- GET /agents ------------------------------------------------------------------------------

def test_agents_lists_names_and_online_map(shared: RunningServer, token: str) -> None:
    quiet = add_agent(shared, token, "quiet")
    busy = add_agent(shared, token, "busy")
    doc = ok_json(*call(shared, "GET", "/agents", token=token))
    assert set(doc) == {"error", "agents", "online"}
    names = doc["agents"]
    assert isinstance(names, list) and {quiet.name, busy.name} <= set(names)
    assert "admin" not in names  # admins are not agents
    assert set(doc["online"]) == set(names)
    assert doc["online"][quiet.name] is False

    # busy parks a long-poll: it is online while the poll waits ...
    with ThreadPoolExecutor(1) as ex:
        parked = ex.submit(busy.poll)
        wait_until(lambda: jbody(call(shared, "GET", "/agents", token=token)[2])
                   ["online"][busy.name] is True)
        assert parked.result() == {}  # the poll timed out empty (0.5 s)
    # ... and goes offline once the poll ended and the grace period (0.3 s) passed.
    wait_until(lambda: jbody(call(shared, "GET", "/agents", token=token)[2])
               ["online"][busy.name] is False)


def test_agents_is_sorted_and_bearer_works(shared: RunningServer, token: str) -> None:
    add_agent(shared, token, "zz")
    add_agent(shared, token, "aa")
    doc = ok_json(*http("GET", shared.url + "/agents", headers=session_headers(token, "bearer")))
    assert doc["agents"] == sorted(doc["agents"])


@pytest.mark.parametrize("auth", ["none", "garbage", "agent", "admin-password"])
def test_agents_needs_a_session(shared: RunningServer, token: str, auth: str) -> None:
    agent = add_agent(shared, token)
    headers = {"none": {}, "garbage": {"Authorization": "0" * 64},
               "agent": agent.auth("bare"),
               "admin-password": {"Authorization": basic(*ADMIN)}}[auth]
    assert_error(*http("GET", shared.url + "/agents", headers=headers), 403)


# --- POST /agents (registration) --------------------------------------------------------------

def _register(srv: RunningServer, name: str, secret: str, token: str | None = None,
              how: str = "query") -> tuple[int, dict[str, str], bytes]:
    headers = session_headers(token) if token else {}
    fields = {"user": name, "pass": secret}
    if how == "query":
        return http("POST", f"{srv.url}/agents?{urlencode(fields)}", b"", headers=headers)
    if how == "form":
        headers["Content-Type"] = "application/x-www-form-urlencoded"
        return http("POST", srv.url + "/agents", urlencode(fields).encode(), headers=headers)
    return http("POST", srv.url + "/agents", fields, headers=headers)


def _can_poll(srv: RunningServer, name: str, secret: str) -> bool:
    status, _, body = http("GET", srv.url + "/tasks", headers={"Authorization":
                                                                 basic(name, secret)})
    assert status in (200, 403), (status, body)
    return status == 200


def _set_selfreg(srv: RunningServer, token: str, on: bool, path: str = "/agent_selfreg") -> None:
    status, _, body = call(srv, "POST", f"{path}?enabled={int(on)}", b"", token=token)
    assert (status, body) == (200, b"")


def test_selfreg_off_refuses_anonymous_registration(shared: RunningServer, token: str) -> None:
    name = unique("anon")
    for how in ("query", "form", "json"):
        assert_error(*_register(shared, name, "0123456789abcdef", how=how), 405,
                     "Agents self-registration is disabled")
    assert name not in jbody(call(shared, "GET", "/agents", token=token)[2])["agents"]
    assert not _can_poll(shared, name, "0123456789abcdef")


@pytest.mark.parametrize("how", ["query", "form", "json"])
def test_admin_session_registers_while_selfreg_is_off(shared: RunningServer, token: str,
                                                      how: str) -> None:
    name, secret = unique("byadmin"), "0123456789abcdef"
    status, _, body = _register(shared, name, secret, token, how)
    assert (status, body) == (200, b"")
    assert name in jbody(call(shared, "GET", "/agents", token=token)[2])["agents"]
    assert _can_poll(shared, name, secret)


@pytest.mark.parametrize("name", ["", "bad name", "a/b", "x" * 65, "ümlaut", "semi;colon"])
def test_register_bad_name(shared: RunningServer, token: str, name: str) -> None:
    assert_error(*_register(shared, name, "0123456789abcdef", token), 400, "Invalid name")


def test_register_name_of_64_characters_is_fine(shared: RunningServer, token: str) -> None:
    name = ("n" + unique("") + "x" * 64)[:64]
    status, _, body = _register(shared, name, "0123456789abcdef", token)
    assert (status, body) == (200, b""), body
    assert _can_poll(shared, name, "0123456789abcdef")


@pytest.mark.parametrize("secret", ["", "0123456789abcde"])
def test_register_short_secret(shared: RunningServer, token: str, secret: str) -> None:
    name = unique("short")
    assert_error(*_register(shared, name, secret, token), 400, "16")
    assert name not in jbody(call(shared, "GET", "/agents", token=token)[2])["agents"]


def test_register_missing_fields(shared: RunningServer, token: str) -> None:
    assert_error(*http("POST", shared.url + "/agents", b"", headers=session_headers(token)), 400)


def test_register_existing_agent_is_409_and_never_replaces(shared: RunningServer,
                                                           token: str) -> None:
    agent = add_agent(shared, token)
    new_secret = "taken-over-0123456789"
    assert_error(*_register(shared, agent.name, new_secret, token), 409, "Agent already exists")
    assert _can_poll(shared, agent.name, agent.secret)
    assert not _can_poll(shared, agent.name, new_secret)


def test_register_admin_name_is_409(shared: RunningServer, token: str) -> None:
    assert_error(*_register(shared, "admin", "0123456789abcdef", token), 409, "already exists")
    shared.login()  # the admin's password is unchanged


def test_selfreg_on_lets_anyone_register_but_never_take_over(shared: RunningServer,
                                                             token: str) -> None:
    # Switched on with a form body this time (query and body are both read).
    headers = {**session_headers(token), "Content-Type": "application/x-www-form-urlencoded"}
    assert http("POST", shared.url + "/agent_selfreg", b"enabled=1", headers=headers)[::2] \
        == (200, b"")
    try:
        for how in ("query", "form", "json"):
            name, secret = unique(f"self-{how}-"), "0123456789abcdef"
            status, _, body = _register(shared, name, secret, how=how)
            assert (status, body) == (200, b""), body
            assert _can_poll(shared, name, secret)
        # The fix: self-registration never replaces an existing agent ...
        victim = add_agent(shared, token)
        assert_error(*_register(shared, victim.name, "attacker-secret-123456"), 409,
                     "Agent already exists")
        assert _can_poll(shared, victim.name, victim.secret)
        assert not _can_poll(shared, victim.name, "attacker-secret-123456")
        # ... nor an admin.
        assert_error(*_register(shared, "admin", "attacker-secret-123456"), 409, "already exists")
        shared.login()
        assert not _can_poll(shared, "admin", "attacker-secret-123456")
        # Bad names and short secrets are refused anonymously too.
        assert_error(*_register(shared, "bad name", "0123456789abcdef"), 400, "Invalid name")
        assert_error(*_register(shared, unique("s"), "too-short"), 400, "16")
    finally:
        _set_selfreg(shared, token, False)
    # Off again: refused again.
    assert_error(*_register(shared, unique("late"), "0123456789abcdef"), 405,
                 "Agents self-registration is disabled")


# --- /agent_selfreg and /agents_selfreg -------------------------------------------------------

def _get_selfreg(srv: RunningServer, token: str, path: str) -> bytes:
    status, headers, body = call(srv, "GET", path, token=token)
    assert status == 200, body
    ctype = {k.lower(): v for k, v in headers.items()}["content-type"]
    assert ctype.split(";")[0] == "text/plain", ctype
    return body


def test_selfreg_switch_on_both_paths_and_survives_restart(tmp_path: Path) -> None:
    srv = own_server(tmp_path)
    try:
        token = srv.login()
        assert _get_selfreg(srv, token, "/agent_selfreg") == b"0"  # default: off
        assert _get_selfreg(srv, token, "/agents_selfreg") == b"0"
        _set_selfreg(srv, token, True, "/agents_selfreg")
        assert _get_selfreg(srv, token, "/agent_selfreg") == b"1"
        assert _get_selfreg(srv, token, "/agents_selfreg") == b"1"

        srv.restart()
        token = srv.login()
        assert _get_selfreg(srv, token, "/agent_selfreg") == b"1"
        assert _register(srv, unique("after-restart"), "0123456789abcdef")[0] == 200

        _set_selfreg(srv, token, False, "/agent_selfreg")
        assert _get_selfreg(srv, token, "/agents_selfreg") == b"0"
        assert_error(*_register(srv, unique("x"), "0123456789abcdef"), 405,
                     "Agents self-registration is disabled")
    finally:
        srv.stop()


@pytest.mark.parametrize("path", ["/agent_selfreg", "/agents_selfreg"])
@pytest.mark.parametrize("value", ["", "2", "yes", "true", "on"])
def test_selfreg_bad_enabled(shared: RunningServer, token: str, path: str, value: str) -> None:
    assert_error(*call(shared, "POST", f"{path}?enabled={value}", b"", token=token), 400,
                 "enabled")
    assert _get_selfreg(shared, token, path) == b"0"


def test_selfreg_missing_enabled(shared: RunningServer, token: str) -> None:
    assert_error(*call(shared, "POST", "/agent_selfreg", b"", token=token), 400, "enabled")


@pytest.mark.parametrize("path", ["/agent_selfreg", "/agents_selfreg"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_selfreg_needs_a_session(shared: RunningServer, token: str, path: str,
                                 method: str) -> None:
    agent = add_agent(shared, token)
    query = "?enabled=1" if method == "POST" else ""
    body = b"" if method == "POST" else None
    for headers in ({}, agent.auth("bare"), {"Authorization": "f" * 64}):
        assert_error(*http(method, f"{shared.url}{path}{query}", body, headers=headers), 403)
    assert _get_selfreg(shared, token, path) == b"0"


# --- wrong methods ----------------------------------------------------------------------------

@pytest.mark.parametrize("method,path,allowed", [
    ("PUT", "/tasks", {"GET", "POST"}),
    ("DELETE", "/tasks", {"GET", "POST"}),
    ("GET", "/tasks_result?id=1", {"POST"}),
    ("PUT", "/task_result?id=1", {"POST"}),
    ("DELETE", "/login", {"GET", "POST"}),
    ("PUT", "/agents", {"GET", "POST"}),
    ("DELETE", "/agent_selfreg", {"GET", "POST"}),
    ("PATCH", "/agents_selfreg", {"GET", "POST"}),
])
def test_wrong_method_names_the_allowed_ones(shared: RunningServer, token: str, method: str,
                                             path: str, allowed: set[str]) -> None:
    status, headers, body = call(shared, method, path, b"{}" if method != "GET" else None,
                                 token=token)
    msg = assert_error(status, headers, body, 405)
    assert all(m in msg for m in allowed), msg
    allow = {m.strip() for m in {k.lower(): v for k, v in headers.items()}["allow"].split(",")}
    assert allow - {"HEAD"} == allowed

