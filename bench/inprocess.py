"""The hot path's own cost, without sockets: CPU per round trip of the three direct handlers
(poll, blocking submit, result) against the real store, auth, dispatcher and tasks.

    python -m bench.inprocess [--agents 64] [--waves 300]

Each wave: every agent polls, the admin submits one ping to each, each agent posts its result
once its poll is answered; the wave ends when every submit is answered. What the server spends
on sockets, HTTP parsing and the event loop's I/O is not in this figure (see README: the
direct-path /healthz). Run it under py-spy to see where the rest goes.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop

from dutserver.config import Settings
from dutserver.core.clock import Clock
from dutserver.core.credentials import hash_secret
from dutserver.core.services import Services, build_services
from dutserver.http.answer import Reply
from dutserver.http.direct import DirectRequest
from dutserver.http.endpoint import Endpoint
from dutserver.routes import classic
from dutserver.store import create_store
from dutserver.store.sqlite import SqliteStore


@dataclass
class HotPath:
    """The server's services without its sockets, and requests for the direct handlers."""

    services: Services
    db: SqliteStore
    agent_headers: list[list[tuple[bytes, bytes]]]
    admin_headers: list[tuple[bytes, bytes]]

    def request(self, method: str, path: str, headers: list[tuple[bytes, bytes]],
                query: bytes = b"") -> DirectRequest:
        return DirectRequest(_NO_ENDPOINT, method, path.encode(), headers,
                             dict(reversed(headers)), query, True, False, self.services,
                             "127.0.0.1")


_NO_ENDPOINT = Endpoint({})  # the handlers are called directly, not through an Endpoint


async def hot_path(db_path: Path, agents: int, **settings: Any) -> HotPath:
    """The store and the core's services as the lifespan builds them, with agents a0 … aN-1
    and an admin session."""
    s = Settings(db_path=db_path, **settings)
    db, notifier = create_store(s)
    assert isinstance(db, SqliteStore)
    await db.open()
    services = build_services(s, db, notifier, Clock())
    auth = services.auth
    for i in range(agents):
        await db.add_account(f"a{i}", "agent",
                             hash_secret("agent", f"secret-{i}-0123456789", auth.key), 1)
    await db.add_account("admin", "admin", hash_secret("admin", "adminpass1", auth.key), 1)
    await services.start()
    token = await auth.login("admin", "adminpass1", "127.0.0.1")
    return HotPath(
        services, db,
        [[(b"authorization", b"Basic " + base64.b64encode(
            f"a{i}:secret-{i}-0123456789".encode())), (b"user-agent", b"dutagent/bench")]
         for i in range(agents)],
        [(b"authorization", token.encode())])


async def measure(agents: int, waves: int) -> dict[str, float]:
    hot = await hot_path(Path(tempfile.mkdtemp(prefix="dutbench-")) / "dut.db", agents)
    db = hot.db
    agent_headers, admin_headers = hot.agent_headers, hot.admin_headers
    answered = 0

    def request(method: str, path: str, headers: list[tuple[bytes, bytes]],
                query: bytes = b"") -> DirectRequest:
        return hot.request(method, path, headers, query)

    def round_trip(i: int) -> None:
        def polled(reply: Reply | BaseException) -> None:
            assert isinstance(reply, Reply), reply
            task_id = json.loads(reply.body)["id"]
            classic.post_result(request("POST", "/tasks_result", agent_headers[i],
                                        b"id=%d" % task_id), b'{"pong": true}', ignore)

        def submitted(reply: Reply | BaseException) -> None:
            nonlocal answered
            assert isinstance(reply, Reply) and reply.status == 200, reply
            answered += 1

        classic.poll_task(request("GET", "/tasks", agent_headers[i]), b"", polled)
        classic.submit_task(request("POST", "/tasks", admin_headers, b"target=a%d" % i),
                            b'{"type": "ping"}', submitted)

    async def run(count: int) -> None:
        for _ in range(count):
            goal = answered + agents
            for i in range(agents):
                round_trip(i)
            while answered < goal:
                await asyncio.sleep(0)

    await run(20)  # warm-up
    cpu0, commits0, done0 = time.process_time(), db.writer.commits, answered
    await run(waves)
    cpu = time.process_time() - cpu0
    n = answered - done0
    await db.close()
    return {"round_trips": n, "us_per_round_trip": round(cpu / n * 1e6, 1),
            "round_trips_per_commit": round(n / (db.writer.commits - commits0), 1)}


def ignore(_: object) -> None:
    return None


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.inprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=64)
    p.add_argument("--waves", type=int, default=300)
    args = p.parse_args()
    print(json.dumps({"scenario": "inprocess", "agents": args.agents,
                      **uvloop.run(measure(args.agents, args.waves))}))


if __name__ == "__main__":
    main()
