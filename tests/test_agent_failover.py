"""Several servers (the nodes of one fleet) for one agent and for dutctl: issue 17, item 4.

The agent is a real `cli/dutagent.py` subprocess given a comma list of server URLs: it starts at
a random one (seeded here with --server-seed, so each test knows which), keeps to it while it
answers, and moves on to the next when one is unreachable or answers 5xx, for polls and for
results alike. dutctl takes the same kind of list and uses the first node that answers.
"""

from __future__ import annotations

import json
import random
import signal
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from agent_support import (
    AGENT_SECRET,
    Admin,
    AgentProcess,
    FakeServer,
    agent_cli,
    agent_env,
    send_json,
    start_agent,
)
from pg_support import pg_server, pg_url  # noqa: F401  (fixtures)
from support import ADMIN, FAST_ARGS, RunningServer, cli, free_port, start_server, wait_until
from test_dutctl import Ctl, new_ctl
from test_nodes import Fleet, fleet  # noqa: F401  (fixture)


def seed_starting_at(index: int, count: int = 2) -> int:
    """A --server-seed with which the agent starts at servers[index] (the agent draws its first
    server with random.Random(seed).randrange(count))."""
    return next(s for s in range(1000) if random.Random(s).randrange(count) == index)


def dead_url() -> str:
    """A port nobody listens on: connection refused."""
    return f"http://127.0.0.1:{free_port()}"


class Failing:
    """A stdlib HTTP server that answers every request 503, and counts them."""

    def __init__(self, status: int = 503) -> None:
        self.requests: list[str] = []
        failing = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                failing.requests.append(f"{self.command} {self.path}")
                send_json(self, status, {"error": True, "msg": "node unavailable"})

            do_GET = do_POST = _answer

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def failing() -> Iterator[Failing]:
    f = Failing()
    yield f
    f.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Admin]]:
    """One real server (SQLite) for the module; each test uses agent names of its own."""
    server = start_server(tmp_path_factory.mktemp("failover"))
    yield server, Admin(server)
    server.stop()


# ------------------------------------------------------------------------------ the agent

def test_a_dead_first_server_is_skipped_and_tasks_run_through_the_next(
    live: tuple[RunningServer, Admin], tmp_path: Path
) -> None:
    server, admin = live
    admin.add_agent("fo-dead")
    dead = dead_url()
    agent = start_agent(tmp_path, f"{dead},{server.url}", "fo-dead",
                        "--server-seed", str(seed_starting_at(0)))
    try:
        agent.wait_for_log(rf"polling {dead} \(first of 2 servers: {dead}, {server.url}\)")
        agent.wait_for_log(rf"poll failed at {dead}: connection refused; moving to {server.url}")
        for n in range(3):
            assert admin.run("fo-dead", {"type": "execute_cmd", "cmd": f"echo {n}"})["output"] \
                == f"{n}\n"
    finally:
        assert agent.stop() == 0
    # Sticky: once on the live server, the agent did not go back to the dead one.
    assert agent.count(r"poll failed at") == 1


def test_the_server_list_comes_from_the_environment_or_the_config_file(
    live: tuple[RunningServer, Admin], tmp_path: Path
) -> None:
    server, admin = live
    admin.add_agent("fo-env")
    admin.add_agent("fo-file")
    dead = dead_url()
    env = agent_env(DUTAGENT_SERVER=f" {dead} , {server.url} ", DUTAGENT_NAME="fo-env",
                    DUTAGENT_SECRET=AGENT_SECRET, DUTAGENT_SERVER_SEED=str(seed_starting_at(0)))
    by_env = AgentProcess(["run"], tmp_path / "env.log", env=env)
    config = tmp_path / "agent.json"
    # The config file may also list the nodes as a JSON array.
    config.write_text(json.dumps({"server": [dead, server.url], "name": "fo-file",
                                  "secret": AGENT_SECRET, "server_seed": seed_starting_at(0)}))
    config.chmod(0o600)
    by_file = AgentProcess(["run", "--config", str(config)], tmp_path / "file.log")
    try:
        for name, agent in (("fo-env", by_env), ("fo-file", by_file)):
            assert admin.run(name, {"type": "ping"})["pong"] is True
            assert f"poll failed at {dead}: connection refused; moving to {server.url}" \
                in agent.output()
    finally:
        assert [by_env.stop(), by_file.stop()] == [0, 0]


def test_a_server_answering_5xx_is_left_for_the_next(
    live: tuple[RunningServer, Admin], failing: Failing, tmp_path: Path
) -> None:
    server, admin = live
    admin.add_agent("fo-503")
    agent = start_agent(tmp_path, f"{failing.url},{server.url}", "fo-503",
                        "--server-seed", str(seed_starting_at(0)))
    try:
        assert admin.run("fo-503", {"type": "ping"})["pong"] is True
        agent.wait_for_log(rf"poll failed at {failing.url}: HTTP 503 node unavailable; "
                           rf"moving to {server.url}")
    finally:
        assert agent.stop() == 0
    # One try (the hello that starts polling a server), then sticky on the good one.
    assert failing.requests == ["POST /api/v1/agent/hello"]


def test_the_first_server_is_drawn_at_random_and_kept(tmp_path: Path) -> None:
    """Over several starts both servers get first polls (the seed makes it repeatable), and an
    agent keeps polling the one it started at while it answers."""
    seeds = range(6)
    expected = [random.Random(seed).randrange(2) for seed in seeds]
    assert set(expected) == {0, 1}  # the seeds below do exercise both
    with FakeServer() as a, FakeServer() as b:
        fakes = [a, b]
        for seed, first in zip(seeds, expected):
            before = [len(f.polls) for f in fakes]
            agent = start_agent(tmp_path, f"{a.url},{b.url}", f"pc{seed}",
                                "--server-seed", str(seed))
            try:
                wanted = before[first] + 3
                wait_until(lambda fake=fakes[first], wanted=wanted: len(fake.polls) >= wanted,
                           timeout_s=10)
            finally:
                assert agent.stop() == 0
            assert len(fakes[1 - first].polls) == before[1 - first], (seed, agent.output())


def test_a_result_is_posted_to_the_next_server_when_its_server_fails(tmp_path: Path) -> None:
    """The server that handed out the task answers the result 503 (then refuses connections):
    the result goes to the other node of the fleet, at once, and is not lost."""
    with FakeServer() as a, FakeServer() as b:
        a.script(lambda h: send_json(h, 200, {"id": 21, "type": "execute_cmd", "cmd": "echo hi"}))
        a.post_statuses = [503]
        agent = start_agent(tmp_path, f"{a.url},{b.url}", "pc",
                            "--server-seed", str(seed_starting_at(0)))
        try:
            wait_until(lambda: b.posts, timeout_s=10)
            agent.wait_for_log(rf"task 21: result not posted at {a.url} \(HTTP 503 scripted 503\); "
                               rf"moving to {b.url}")
            # The poller follows: the next polls go to b.
            polls_at_b = len(b.polls)
            wait_until(lambda: len(b.polls) >= polls_at_b + 2, timeout_s=5)
        finally:
            assert agent.stop() == 0
        assert [p[0] for p in a.posts] == ["/tasks_result?id=21"]
        assert list(b.results()) == ["/tasks_result?id=21"]
        assert b.results()["/tasks_result?id=21"]["output"] == "hi\n"
        assert "result lost" not in agent.output()


def test_a_409_from_the_next_server_is_not_retried(tmp_path: Path) -> None:
    with FakeServer() as a, FakeServer() as b:
        a.script(lambda h: send_json(h, 200, {"id": 22, "type": "ping"}))
        a.post_statuses = [502]
        b.post_statuses = [409]
        agent = start_agent(tmp_path, f"{a.url},{b.url}", "pc",
                            "--server-seed", str(seed_starting_at(0)))
        try:
            agent.wait_for_log(r"task 22: the server no longer takes its result \(409")
            wait_until(lambda: len(b.polls) >= 2, timeout_s=5)
        finally:
            assert agent.stop() == 0
        assert len(a.posts) == 1 and len(b.posts) == 1


def test_when_every_server_fails_the_agent_backs_off_and_recovers(tmp_path: Path) -> None:
    """Both servers down: the agent goes round the list, then waits (backoff), and does not
    spin; a server started later on one of the ports gets the agent."""
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    agent = start_agent(tmp_path, ",".join(urls), "pc-late",
                        "--server-seed", str(seed_starting_at(0)))
    server = None
    try:
        agent.wait_for_log(rf"poll failed at {urls[1]}: connection refused; all 2 servers failed, "
                           rf"retrying at {urls[0]} in [0-9.]+ s")
        wait_until(lambda: agent.count("all 2 servers failed") >= 4, timeout_s=10)
        rounds = agent.count("all 2 servers failed")
        moves = agent.count(rf"poll failed at {urls[0]}: connection refused; moving to {urls[1]}")
        assert abs(moves - rounds) <= 1  # each round: one move, then the backoff
        db = tmp_path / "late.db"
        cli("addaccount", str(db), ADMIN[0], "admin", stdin=ADMIN[1] + "\n")
        cli("addaccount", str(db), "pc-late", "agent", stdin=AGENT_SECRET + "\n")
        server = RunningServer(db=db, args=FAST_ARGS).start(port=ports[1])
        assert Admin(server).run("pc-late", {"type": "ping"}, timeout_s=10)["pong"] is True
        agent.wait_for_log(rf"the server answers again \({urls[1]}\)")
    finally:
        assert agent.stop() == 0
        if server is not None:
            server.stop()
    # Backoff capped at 0.3 s (FAST_AGENT_ARGS): a few dozen rounds at most, not thousands.
    assert agent.count("all 2 servers failed") < 200


def test_a_node_killed_mid_run_hands_the_agent_to_the_other_node(fleet: Fleet,  # noqa: F811
                                                                 tmp_path: Path) -> None:
    """Two nodes on one PostgreSQL: the agent polls node 0; tasks submitted on node 1 reach it
    there; node 0 dies (SIGKILL); the agent moves to node 1 and tasks still run."""
    a, b = fleet.node(), fleet.node()
    fleet.cli("addaccount", fleet.url, "pc1", "agent", stdin=AGENT_SECRET + "\n")
    admin = Admin(b)
    agent = start_agent(tmp_path, f"{a.url},{b.url}", "pc1",
                        "--server-seed", str(seed_starting_at(0)))
    try:
        agent.wait_for_log(rf"polling {a.url} \(first of 2 servers")
        assert admin.run("pc1", {"type": "execute_cmd", "cmd": "echo before"})["output"] \
            == "before\n"
        a.stop(signal.SIGKILL)
        agent.wait_for_log(rf"poll failed at {a.url}: .*; moving to {b.url}")
        for n in range(3):
            assert admin.run("pc1", {"type": "execute_cmd", "cmd": f"echo after {n}"},
                             timeout_s=10)["output"] == f"after {n}\n"
    finally:
        assert agent.stop() == 0


def test_register_moves_past_an_unreachable_server(
    live: tuple[RunningServer, Admin], tmp_path: Path
) -> None:
    server, admin = live
    admin.set_selfreg(True)
    dead = dead_url()
    config = tmp_path / "agent.json"
    done = agent_cli("register", "--server", f"{dead},{server.url}", "--name", "fo-reg",
                     "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert f"registered agent 'fo-reg' at {server.url}" in done.stdout
    assert f"cannot reach {dead}: connection refused; trying {server.url}" in done.stderr
    assert json.loads(config.read_text())["server"] == f"{dead},{server.url}"


# ------------------------------------------------------------------------------ dutctl

def test_dutctl_uses_the_first_server_that_answers(
    live: tuple[RunningServer, Admin], failing: Failing, tmp_path: Path
) -> None:
    server, admin = live
    ctl = new_ctl(tmp_path)
    dead = dead_url()
    # login takes the list and keeps it with the session.
    done = ctl("login", f"{dead},{server.url}", "--user", ADMIN[0], stdin=ADMIN[1] + "\n")
    assert done.returncode == 0, done.stderr
    assert json.loads(ctl.session_file.read_text())["url"] == f"{dead},{server.url}"
    assert f"cannot reach the server at {dead}: connection refused" in done.stderr
    listed = ctl.json("agents")
    assert listed["error"] is False and isinstance(listed["agents"], list)
    # --server overrides the session's list for one command: a 503 node, then the live one.
    done = ctl("agents", "--json", "--server", f"{failing.url},{server.url}")
    assert done.returncode == 0, done.stderr
    assert f"{failing.url} answered HTTP 503; trying {server.url}" in done.stderr
    assert failing.requests == ["GET /api/v1/agents?inventory=0"]
    # Every node down: the usual one-line error and exit status 4.
    done = ctl("agents", "--server", f"{dead},{dead_url()}")
    assert done.returncode == 4
    assert "connection refused" in done.stderr.splitlines()[-1]


def test_dutctl_run_with_a_dead_node_first(
    live: tuple[RunningServer, Admin], tmp_path: Path
) -> None:
    server, admin = live
    admin.add_agent("fo-ctl")
    agent = start_agent(tmp_path, server.url, "fo-ctl")
    try:
        wait_until(lambda: admin.agent("fo-ctl")["online"], timeout_s=10)
        dead = dead_url()
        ctl = new_ctl(tmp_path)
        ctl.login(server)
        done = ctl("run", "--server", f"{dead},{server.url}", "fo-ctl", "--", "echo", "via", "b")
        assert done.returncode == 0, done.stderr
        assert done.stdout == "via b\n"
        # A token from DUTCTL_TOKEN with a list in DUTCTL_URL works as well.
        token = server.login()
        env_ctl = Ctl(ctl.home, {"DUTCTL_URL": f"{dead},{server.url}", "DUTCTL_TOKEN": token,
                                 "DUTCTL_CONFIG": str(tmp_path / "none.json")})
        result = env_ctl.json("task", "ping", "fo-ctl")
        assert result["ok"] is True
    finally:
        assert agent.stop() == 0


def test_dutctl_session_from_one_node_works_on_the_other(fleet: Fleet,  # noqa: F811
                                                         tmp_path: Path) -> None:
    a, b = fleet.node(), fleet.node()
    ctl = new_ctl(tmp_path)
    ctl.login(a)
    done = ctl("agents", "--json", "--server", f"{dead_url()},{b.url}")
    assert done.returncode == 0, done.stderr
    a.stop(signal.SIGKILL)
    # The stored session names node a only; --server lists b, where the token is valid too.
    done = ctl("history", "--json", "--server", f"{a.url},{b.url}")
    assert done.returncode == 0, done.stderr
    assert f"cannot reach the server at {a.url}" in done.stderr
