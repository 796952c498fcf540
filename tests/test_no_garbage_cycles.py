"""The hot path leaves no reference cycles behind. Under load the cyclic garbage collector's full
passes over such garbage stalled the server for 60-140 ms every few seconds (the half-load p99 of
bench/): a round trip, a poll that times out, a submit that times out and a poll whose agent hung
up must all be freed by reference counting alone."""

from __future__ import annotations

import asyncio
import gc
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn
from support import ADMIN, cli, free_port

from bench.actors import Agent, AgentCounters, create_agents, login
from bench.inprocess import hot_path
from bench.loadgen import Connection, Target
from dutserver.config import load_settings
from dutserver.core.errors import ApiError
from dutserver.http.answer import Reply
from dutserver.http.direct import DirectRequest
from dutserver.routes import classic
from dutserver.server import uvicorn_config

AGENTS = 8
HOT_TYPES = {"Poll", "ParkedPoll", "Waiting", "Future", "TimerHandle", "Task", "DirectRequest",
             "function", "cell"}


async def test_hot_path_leaves_no_reference_cycles(tmp_path: Path) -> None:
    hot = await hot_path(tmp_path / "dut.db", AGENTS, poll_timeout_s=0.05)
    db, request = hot.db, hot.request
    answers: list[Reply] = []

    def responder(req: DirectRequest, then: Callable[[Reply], Any] | None = None) -> Any:
        def respond(outcome: Reply | BaseException) -> None:
            if isinstance(outcome, ApiError):
                outcome = Reply(outcome.status)
            assert isinstance(outcome, Reply), outcome
            req.release()  # what the protocol does once it has written the answer
            answers.append(outcome)
            if then is not None:
                then(outcome)
        return respond

    def agent(i: int) -> list[tuple[bytes, bytes]]:
        return hot.agent_headers[i]

    admin = hot.admin_headers

    def round_trip(i: int) -> None:
        def answer(reply: Reply) -> None:
            task = json.loads(reply.body)
            req = request("POST", "/tasks_result", agent(i), b"id=%d" % task["id"])
            classic.post_result(req, b'{"pong": true}', responder(req))
        req = request("GET", "/tasks", agent(i))
        classic.poll_task(req, b"", responder(req, answer))
        req = request("POST", "/tasks", admin, b"target=a%d" % i)
        classic.submit_task(req, b'{"type": "ping"}', responder(req))

    async def settle() -> None:
        for _ in range(50):
            await asyncio.sleep(0.01)

    round_trip(0)  # warm-up: first-use caches are not garbage
    await settle()
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        answers.clear()
        for i in range(1, AGENTS):
            round_trip(i)
        req = request("GET", "/tasks", agent(0))  # times out empty
        classic.poll_task(req, b"", responder(req))
        hung = request("GET", "/tasks", agent(0))  # its agent hangs up
        classic.poll_task(hung, b"", responder(hung))
        hung.lost()
        req = request("POST", "/tasks", admin, b"target=a1&timeout=0.05")  # nobody polls
        classic.submit_task(req, b'{"type": "ping"}', responder(req))
        await settle()
        assert len(answers) == 3 * (AGENTS - 1) + 3
        assert sorted(a.status for a in answers)[-1] == 504  # the submit that timed out
        gc.collect()
        kinds = Counter(type(o).__name__ for o in gc.garbage)
        left = {k: n for k, n in kinds.items() if k in HOT_TYPES}
        assert not left, f"reference cycles left behind: {left}"
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
        await db.close()


async def test_round_trips_over_http_leave_no_reference_cycles(tmp_path: Path) -> None:
    """The same through a real server in this process: connections that stay and connections
    that close, the direct path (dutserver/direct.py), Starlette's path, and, when
    built, the compiled modules, whose closures keep their environment alive in a cycle where
    an interpreted closure does not (dutserver/native.py). Objects of other code (the bench
    agent and client, asyncio) are not counted."""
    db = tmp_path / "dut.db"
    cli("addaccount", str(db), ADMIN[0], "admin", stdin=ADMIN[1] + "\n")
    settings = load_settings({"db_path": db, "port": free_port(), "log_level": "warning"})
    server = uvicorn.Server(uvicorn_config(settings))
    serving = asyncio.create_task(server.serve())
    try:
        for _ in range(500):
            if server.started:
                break
            await asyncio.sleep(0.01)
        target = Target.from_url(f"http://127.0.0.1:{settings.port}")
        token = await login(target, *ADMIN)
        [cred] = await create_agents(target, token, ["a0"])
        agent = Agent(target, cred, AgentCounters())
        client = Connection(target, {"Authorization": token})
        stop = asyncio.Event()
        polling = asyncio.create_task(agent.run(stop))

        async def round_trip() -> None:
            r = await client.request("POST", "/tasks?target=a0", b'{"type": "ping"}',
                                     timeout_s=10)
            assert r.status == 200 and r.json()["pong"] is True, r

        await round_trip()  # warm-up: first-use caches are not garbage
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(20):
                await round_trip()
            for path in ("/nope", "/", "/healthz"):  # Starlette's path; a fixed one
                for _ in range(3):  # each on a connection of its own, closed after it
                    once = Connection(target, {"Connection": "close"})
                    r = await once.request("GET", path, timeout_s=10)
                    assert r.status in (200, 404), r
                    once.close()
            await asyncio.sleep(0.05)  # the server sees the connections go
            gc.collect()
            ours = Counter(type(o).__qualname__ for o in gc.garbage
                           if type(o).__module__.startswith("dutserver"))
            assert not ours, f"reference cycles left behind: {dict(ours)}"
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        stop.set()
        client.close()
        agent.conn.close()
        await asyncio.wait_for(polling, 10)
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 30)
