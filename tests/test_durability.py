"""Every task is a row: queued tasks survive kill -9 and reach their agent after the restart."""

from __future__ import annotations

import sqlite3
import time

from support import RunningServer, basic, http, loads, wait_until

SECRET = "durable-secret-123456"


def submit(srv: RunningServer, token: str, targets: list[str], expires_s: float = 3600,
           **task: object) -> list[int]:
    status, _, body = http("POST", f"{srv.url}/api/v1/tasks",
                           {"targets": targets, "task": {"type": "execute_cmd", **task},
                            "expires_s": expires_s}, {"Authorization": token})
    assert status == 202, body
    return [t["id"] for t in loads(body)["tasks"]]


def test_accepted_tasks_survive_sigkill_and_reach_the_agent(server: RunningServer) -> None:
    server.add_account("pc1", "agent", SECRET)
    server.add_account("pc2", "agent", SECRET)
    token = server.login()
    ids = [i for n in range(20) for i in submit(server, token, ["pc1", "pc2"], cmd=f"echo {n}")]
    server.kill()  # no chance to flush anything: the 202 must have meant "on disk"
    server.start()
    got = {"pc1": [], "pc2": []}  # type: dict[str, list[dict]]
    for name in got:
        while True:
            task = loads(http("GET", f"{server.url}/tasks", headers=basic(name, SECRET))[2])
            if not task:
                break
            got[name].append(task)
    assert [t["cmd"] for t in got["pc1"]] == [f"echo {n}" for n in range(20)]  # in order
    assert sorted(t["id"] for ts in got.values() for t in ts) == sorted(ids)


def test_tasks_that_expired_while_the_server_was_down_are_not_delivered(
        server: RunningServer) -> None:
    server.add_account("pc1", "agent", SECRET)
    token = server.login()
    [short] = submit(server, token, ["pc1"], expires_s=0.2, cmd="too late")
    [long] = submit(server, token, ["pc1"], cmd="still wanted")
    server.kill()

    time.sleep(0.3)  # the expiry itself is under test
    server.start()
    task = loads(http("GET", f"{server.url}/tasks", headers=basic("pc1", SECRET))[2])
    assert task["id"] == long
    token = server.login()
    status, _, body = http("GET", f"{server.url}/api/v1/tasks/{short}", headers={"Authorization": token})
    assert loads(body)["task"]["state"] == "expired"


def test_expiry_while_running_ends_the_task_in_the_history(server: RunningServer) -> None:
    server.add_account("pc1", "agent", SECRET)
    token = server.login()
    [task_id] = submit(server, token, ["pc1"], expires_s=0.3, cmd="nobody polls")

    wait_until(lambda: loads(http("GET", f"{server.url}/api/v1/tasks/{task_id}",
                                  headers={"Authorization": token})[2])["task"]["state"]
               == "expired", timeout_s=5)
    assert loads(http("GET", f"{server.url}/tasks", headers=basic("pc1", SECRET))[2]) == {}
    server.stop()
    rows = sqlite3.connect(server.db).execute("SELECT state FROM tasks").fetchall()
    assert rows == [("expired",)]
