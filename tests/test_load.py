"""Many agents and submitters at once: every submitter gets exactly its own task's result.

Uses bench.loadgen's raw keep-alive connections: a full client library would spend more CPU
than the server and make this a test of the client."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import sqlite3

import pytest
from support import ADMIN, RunningServer

from bench.loadgen import Connection, Target

AGENTS = 100
TASKS = 1000
SECRET = "load-secret-0123456789"


@pytest.mark.timeout(120)
async def test_100_agents_1000_tasks_each_submitter_gets_its_own_result(
        server: RunningServer) -> None:
    target = Target.from_url(server.url)
    setup = Connection(target)
    r = await setup.request("GET", f"/login?user={ADMIN[0]}&pass={ADMIN[1]}")
    admin = {"Authorization": r.json()["token"]}
    for i in range(AGENTS):
        body = json.dumps({"name": f"pc-{i}", "type": "agent", "password": SECRET}).encode()
        r = await setup.request("POST", "/api/v1/accounts", body, admin)
        assert r.status == 201, r.body
    done = asyncio.Event()
    answered: dict[str, int] = {}

    async def agent(name: str) -> None:
        auth = {"Authorization": "Basic " + base64.b64encode(f"{name}:{SECRET}".encode()).decode()}
        conn = Connection(target, auth)
        while not done.is_set():
            task = (await conn.request("GET", "/tasks")).json()
            if not task:
                continue
            answered[name] = answered.get(name, 0) + 1
            # Echo the nonce and say who answered, so a crossed wire would show.
            result = json.dumps({"nonce": task["nonce"], "by": name}).encode()
            r = await conn.request("POST", f"/tasks_result?id={task['id']}", result)
            assert r.status == 200, r.body
        conn.close()

    async def submitter(numbers: list[int]) -> list[tuple[int, str, dict]]:
        conn, out = Connection(target, admin), []
        for n in numbers:
            name = f"pc-{random.randrange(AGENTS)}"
            body = json.dumps({"type": "echo", "nonce": n}).encode()
            r = await conn.request("POST", f"/tasks?target={name}&timeout=20", body)
            out.append((n, name, r.json()))
        conn.close()
        return out

    agents = [asyncio.create_task(agent(f"pc-{i}")) for i in range(AGENTS)]
    batches = await asyncio.gather(*(submitter(list(range(k, TASKS, 50))) for k in range(50)))
    done.set()
    await asyncio.gather(*agents)  # each ends at its next poll timeout (1 s)
    setup.close()
    results = [r for batch in batches for r in batch]
    assert len(results) == TASKS
    for n, name, result in results:
        assert result == {"nonce": n, "by": name, "error": False}
    assert sum(answered.values()) == TASKS
    states = sqlite3.connect(server.db).execute(
        "SELECT state, count(*) FROM tasks GROUP BY state").fetchall()
    assert states == [("done", TASKS)]
