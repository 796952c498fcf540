"""SIGTERM: parked polls are answered at once (and their connections closed), in-flight requests
finish, the process exits."""

from __future__ import annotations

import asyncio
import base64
import socket
import time
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager
from support import RunningServer, basic, http, loads

from bench.loadgen import Connection, Target
from dutserver.app import create_app
from dutserver.config import load_settings

SECRET = "shutdown-secret-12345"


@pytest.mark.timeout(60)
async def test_sigterm_with_1000_parked_polls_exits_within_2_s(tmp_path: Path) -> None:
    from support import start_server
    srv = start_server(tmp_path, "--poll-timeout-s", "60")
    srv.add_account("pc", "agent", SECRET)
    target = Target.from_url(srv.url)
    auth = {"Authorization": "Basic " + base64.b64encode(f"pc:{SECRET}".encode()).decode()}
    conns = [Connection(target, auth) for _ in range(1000)]
    for i in range(0, 1000, 100):
        await asyncio.gather(*(c.connect() for c in conns[i:i + 100]))
    polls = [asyncio.create_task(c.request("GET", "/tasks", timeout_s=30)) for c in conns]
    await asyncio.sleep(1.0)
    assert not any(p.done() for p in polls), "polls should be parked"
    started = time.monotonic()
    srv.proc.terminate()  # type: ignore[union-attr]
    answers = await asyncio.gather(*polls, return_exceptions=True)
    code = await asyncio.to_thread(srv.proc.wait, 10)  # type: ignore[union-attr]
    elapsed = time.monotonic() - started
    assert all(not isinstance(a, BaseException) and a.status == 200 and a.json() == {}
               for a in answers), [a for a in answers if isinstance(a, BaseException)][:3]
    # Each answer is its connection's last: agents reconnect to the next server process rather
    # than poll the stopping one again and again.
    assert all(a.close for a in answers if not isinstance(a, BaseException))
    assert code == 0
    assert elapsed < 2.0, f"took {elapsed:.2f} s to stop"


def test_a_result_in_flight_at_sigterm_is_still_accepted(server: RunningServer) -> None:
    server.add_account("pc", "agent", SECRET)
    token = server.login()
    status, _, body = http("POST", f"{server.url}/api/v1/tasks",
                           {"targets": ["pc"], "task": {"type": "ping"}}, {"Authorization": token})
    task = loads(http("GET", f"{server.url}/tasks", headers=basic("pc", SECRET))[2])
    result = b'{"pong": true}'
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(f"POST /tasks_result?id={task['id']} HTTP/1.1\r\nHost: x\r\n"
                  f"Authorization: {basic('pc', SECRET)['Authorization']}\r\n"
                  f"Content-Length: {len(result)}\r\n\r\n".encode())
        time.sleep(0.2)
        server.proc.terminate()  # type: ignore[union-attr]
        time.sleep(0.3)  # the server is stopping while the body is still on its way
        s.sendall(result)
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200")
    assert server.proc.wait(5) == 0  # type: ignore[union-attr]
    server.start()
    token = server.login()
    view = loads(http("GET", f"{server.url}/api/v1/tasks/{task['id']}",
                      headers={"Authorization": token})[2])["task"]
    assert view["state"] == "done" and view["result"] == {"pong": True, "error": False}


async def test_readiness_turns_503_when_stopping(tmp_path: Path) -> None:
    app = create_app(load_settings({"db_path": tmp_path / "d.db"}, environ={}))
    async with LifespanManager(app) as manager:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(manager.app),
                                     base_url="http://t") as client:
            assert (await client.get("/readyz")).status_code == 200
            app.state.services.close()  # what the SIGTERM handler does
            r = await client.get("/readyz")
            assert r.status_code == 503 and r.json() == {"error": True, "msg": "Shutting down"}
            assert (await client.get("/healthz")).status_code == 200
