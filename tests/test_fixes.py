"""Each **Fix** of PROTOCOL.md part 1, as its own test against a real server subprocess."""

from __future__ import annotations

import hashlib
import json
import socket
import sqlite3
import threading
import time
from pathlib import Path

from support import (
    ADMIN,
    PollingAgent,
    RunningServer,
    basic,
    cli,
    http,
    loads,
    start_server,
    wait_until,
)

SECRET = "agent-secret-0123456789"


def login(srv: RunningServer, user: str = ADMIN[0], password: str = ADMIN[1]) -> tuple[int, dict]:
    status, headers, body = http("GET", f"{srv.url}/login?user={user}&pass={password}")
    return status, {**(loads(body) or {}), "_headers": headers}


def task_state(srv: RunningServer, token: str, task_id: int) -> dict:
    status, _, body = http("GET", f"{srv.url}/api/v1/tasks/{task_id}", headers={"Authorization": token})
    assert status == 200, body
    return loads(body)["task"]


def submit_later(srv: RunningServer, token: str, target: str, timeout: float) -> int:
    status, _, body = http("POST", f"{srv.url}/api/v1/tasks",
                           {"targets": [target], "task": {"type": "ping"}},
                           {"Authorization": token})
    assert status == 202, body
    return int(loads(body)["tasks"][0]["id"])


def test_agent_account_cannot_log_in(server: RunningServer) -> None:
    server.add_account("pc1", "agent", SECRET)
    status, body = login(server, "pc1", SECRET)
    assert status == 403 and body["msg"] == "Invalid credentials"


def test_admin_password_never_authenticates_an_agent(server: RunningServer) -> None:
    status, _, body = http("GET", f"{server.url}/tasks", headers=basic(*ADMIN))
    assert status == 403 and loads(body)["msg"] == "Authorization failure"
    status, _, body = http("GET", f"{server.url}/tasks",
                           headers={"Authorization": f"{ADMIN[0]}:{ADMIN[1]}"})
    assert status == 403


def test_sessions_are_stored_as_digests_not_tokens(server: RunningServer) -> None:
    token = server.login()
    rows = sqlite3.connect(server.db).execute("SELECT digest FROM sessions").fetchall()
    assert rows == [(hashlib.sha256(token.encode()).hexdigest(),)]
    assert token not in server.db.read_bytes().decode("latin-1")


def test_session_expires_after_idle_time(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--session-idle-s", "0.4")
    try:
        token = srv.login()
        assert http("GET", f"{srv.url}/agents", headers={"Authorization": token})[0] == 200
        time.sleep(0.6)  # the idle timeout itself is what is under test
        status, _, body = http("GET", f"{srv.url}/agents", headers={"Authorization": token})
        assert status == 403 and loads(body)["error"] is True
        assert http("GET", f"{srv.url}/api/v1/session", headers={"Authorization": token})[0] == 401
    finally:
        srv.stop()


def test_session_has_an_absolute_lifetime_even_when_busy(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--session-max-s", "0.6")
    try:
        token = srv.login()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # keep it busy: idle time never runs out
            if http("GET", f"{srv.url}/agents", headers={"Authorization": token})[0] == 403:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("session outlived its absolute lifetime")
    finally:
        srv.stop()


def test_login_failures_ban_account_and_address_pair(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--ban-failures", "3", "--ban-s", "1")
    try:
        srv.add_account("other", "admin", "otherpass1")
        for _ in range(3):
            assert login(srv, ADMIN[0], "wrong-password")[0] == 403
        status, body = login(srv)  # even the right password is refused while banned
        assert status == 429 and int(body["_headers"]["Retry-After"]) >= 1
        assert login(srv, "other", "otherpass1")[0] == 200  # neighbours are not locked out
        wait_until(lambda: login(srv)[0] == 200, timeout_s=3, interval_s=0.1)
    finally:
        srv.stop()


def test_agent_credential_failures_are_throttled_too(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--ban-failures", "2", "--ban-s", "30")
    try:
        srv.add_account("pc1", "agent", SECRET)
        for _ in range(2):
            assert http("GET", f"{srv.url}/tasks", headers=basic("pc1", "x" * 16))[0] == 403
        status, headers, body = http("GET", f"{srv.url}/tasks", headers=basic("pc1", "y" * 16))
        assert status == 429 and "Retry-After" in headers and loads(body)["error"] is True
        # The right secret is never refused for what failed before it from its address (a
        # re-imaged room behind one NAT: issue 18); 256 random bits are not guessed in 5 tries.
        assert http("GET", f"{srv.url}/tasks", headers=basic("pc1", SECRET))[0] == 200
    finally:
        srv.stop()


def test_address_failing_for_many_accounts_is_refused_as_a_whole(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--ban-address-failures", "4", "--ban-s", "30")
    try:
        for i in range(4):
            login(srv, f"user{i}", "wrong-password")
        assert login(srv)[0] == 429
    finally:
        srv.stop()


def test_password_change_from_cli_takes_effect_within_a_second(server: RunningServer) -> None:
    server.add_account("pc1", "agent", SECRET)
    assert http("GET", f"{server.url}/tasks", headers=basic("pc1", SECRET))[0] == 200
    token = server.login()
    cli("passwd", str(server.db), "pc1", stdin="new-agent-secret-123\n")
    cli("passwd", str(server.db), ADMIN[0], stdin="newadminpass\n")
    wait_until(lambda: http("GET", f"{server.url}/tasks",
                            headers=basic("pc1", SECRET))[0] == 403, timeout_s=1)
    assert http("GET", f"{server.url}/tasks", headers=basic("pc1", "new-agent-secret-123"))[0] == 200
    # The changed admin's open session is no stale credential either.
    wait_until(lambda: http("GET", f"{server.url}/agents",
                            headers={"Authorization": token})[0] == 403, timeout_s=1)
    assert login(server, ADMIN[0], "newadminpass")[0] == 200


def test_multi_target_waits_run_concurrently(server: RunningServer) -> None:
    for name in ("a", "b", "c"):
        server.add_account(name, "agent", SECRET)
    agents = [PollingAgent(server.url, n, SECRET, lambda t: {"ok": True}).start() for n in "ab"]
    try:
        token = server.login()
        wait_until(lambda: all(json.loads(http("GET", f"{server.url}/agents", headers={
            "Authorization": token})[2])["online"].get(n) for n in "ab"))
        started = time.monotonic()
        status, _, body = http("POST", f"{server.url}/tasks?target=c,a,b&timeout=1",
                               {"type": "ping"}, {"Authorization": token})
        elapsed = time.monotonic() - started
    finally:
        for agent in agents:
            agent.stop()
    results = loads(body)["results"]
    assert status == 200
    assert [r["target"] for r in results] == ["c", "a", "b"]
    assert results[0] == {"error": True, "msg": "Time out while waiting for task result",
                          "target": "c"}
    assert results[1] == {"ok": True, "error": False, "target": "a"}
    assert elapsed < 1.9, "the three waits ran one after another"


def test_task_whose_submitter_timed_out_is_never_delivered(server: RunningServer) -> None:
    server.add_account("pc1", "agent", SECRET)
    token = server.login()
    status, _, body = http("POST", f"{server.url}/tasks?target=pc1&timeout=0.2",
                           {"type": "ping"}, {"Authorization": token})
    assert status == 504 and loads(body)["msg"] == "Time out while waiting for task result"
    status, _, body = http("GET", f"{server.url}/tasks", headers=basic("pc1", SECRET))
    assert (status, loads(body)) == (200, {})
    tasks = loads(http("GET", f"{server.url}/api/v1/tasks", headers={"Authorization": token})[2])
    assert [t["state"] for t in tasks["tasks"]] == ["cancelled"]


def test_task_whose_submitter_disconnected_is_never_delivered(server: RunningServer) -> None:
    server.add_account("pc1", "agent", SECRET)
    token = server.login()
    body = b'{"type": "ping"}'
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /tasks?target=pc1&timeout=30 HTTP/1.1\r\nHost: x\r\nAuthorization: "
                  + token.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        wait_until(lambda: loads(http("GET", f"{server.url}/api/v1/tasks",
                                      headers={"Authorization": token})[2])["tasks"])
    wait_until(lambda: task_state(server, token, 1)["state"] == "cancelled")
    status, _, body = http("GET", f"{server.url}/tasks", headers=basic("pc1", SECRET))
    assert (status, loads(body)) == (200, {})


def test_no_hand_off_to_a_poll_whose_connection_is_gone(server: RunningServer) -> None:
    server.add_account("pc1", "agent", SECRET)
    token = server.login()
    auth = basic("pc1", SECRET)["Authorization"].encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"GET /tasks HTTP/1.1\r\nHost: x\r\nAuthorization: " + auth + b"\r\n\r\n")
        wait_until(lambda: loads(http("GET", f"{server.url}/agents",
                                      headers={"Authorization": token})[2])["online"].get("pc1"))
    time.sleep(0.1)  # let the server see the hang-up before the task arrives
    task_id = submit_later(server, token, "pc1", 5)
    assert task_state(server, token, task_id)["state"] == "queued"
    status, _, body = http("GET", f"{server.url}/tasks", headers=basic("pc1", SECRET))
    assert loads(body) == {"id": task_id, "type": "ping"}


def test_task_ids_never_restart_after_a_restart(server: RunningServer) -> None:
    server.add_account("pc1", "agent", SECRET)
    token = server.login()
    first = submit_later(server, token, "pc1", 5)
    server.restart()
    token = server.login()
    assert submit_later(server, token, "pc1", 5) > first


def test_delivered_task_is_never_run_twice_after_a_crash(server: RunningServer) -> None:
    server.add_account("pc1", "agent", SECRET)
    token = server.login()
    task_id = submit_later(server, token, "pc1", 5)
    status, _, body = http("GET", f"{server.url}/tasks", headers=basic("pc1", SECRET))
    assert loads(body)["id"] == task_id
    server.kill()
    server.start()
    token = server.login()
    task = task_state(server, token, task_id)
    assert task["state"] == "failed" and task["result"] == {"error": True, "msg": "no result"}
    status, _, body = http("GET", f"{server.url}/tasks", headers=basic("pc1", SECRET))
    assert loads(body) == {}, "the delivered task came again"
    status, _, body = http("POST", f"{server.url}/tasks_result?id={task_id}", {"late": True},
                           basic("pc1", SECRET))
    assert status == 409 and loads(body)["msg"] == "Result already recorded"


def test_agents_cannot_read_or_answer_each_others_tasks(server: RunningServer) -> None:
    server.add_account("pc1", "agent", SECRET)
    server.add_account("pc2", "agent", SECRET)
    token = server.login()
    task_id = submit_later(server, token, "pc1", 5)
    assert loads(http("GET", f"{server.url}/tasks", headers=basic("pc2", SECRET))[2]) == {}
    assert loads(http("GET", f"{server.url}/tasks", headers=basic("pc1", SECRET))[2])["id"] == task_id
    status, _, _ = http("POST", f"{server.url}/tasks_result?id={task_id}", {"x": 1},
                        basic("pc2", SECRET))
    assert status == 403
    assert task_state(server, token, task_id)["state"] == "delivered"


def test_self_registration_never_replaces_an_account(server: RunningServer) -> None:
    server.add_account("pc1", "agent", SECRET)
    token = server.login()
    http("POST", f"{server.url}/agent_selfreg?enabled=1", headers={"Authorization": token})
    status, _, body = http("POST", f"{server.url}/agents?user=pc1&pass=hijacker-secret-123")
    assert status == 409 and loads(body)["msg"] == "Agent already exists"
    status, _, body = http("POST", f"{server.url}/agents?user=admin&pass=hijacker-secret-123")
    assert status == 409
    assert http("GET", f"{server.url}/tasks", headers=basic("pc1", SECRET))[0] == 200
    assert http("GET", f"{server.url}/tasks", headers=basic("pc1", "hijacker-secret-123"))[0] == 403


def test_parallel_polls_of_one_agent_each_get_their_own_task(server: RunningServer) -> None:
    server.add_account("pc1", "agent", SECRET)
    token = server.login()
    got: list[dict] = []

    def poll() -> None:
        status, _, body = http("GET", f"{server.url}/tasks", headers=basic("pc1", SECRET))
        assert status == 200, body
        got.append(loads(body))
    threads = [threading.Thread(target=poll) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    ids = {submit_later(server, token, "pc1", 5) for _ in range(2)}
    for t in threads:
        t.join()
    assert sorted(g["id"] for g in got if g) == sorted(ids)
    assert got.count({}) == 1
