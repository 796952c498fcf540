"""Enrollment end to end over HTTP, on SQLite and on PostgreSQL (and across two nodes): tokens,
requests that wait as pending, admins' decisions, revocation and re-keying, capabilities, and
the attacks of issue 18 (used-up, revoked, expired and guessed tokens, replays, duplicates,
floods, huge facts, a room of agents behind one address)."""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pg_support import pg_server, pg_url  # noqa: F401  (fixtures)
from support import ADMIN, FAST_ARGS, RunningServer, basic, cli, http, start_server, wait_until

FAST = ["--accounts-refresh-s", "0.05", "--session-cache-s", "0.2", "--node-heartbeat-s", "0.1",
        "--node-lease-s", "1"]


class Admin:
    def __init__(self, srv: RunningServer) -> None:
        self.srv = srv
        self.token = srv.login()

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        status, _, raw = http(method, self.srv.url + path, body,
                              {"Authorization": self.token, "Content-Type": "application/json"})
        return status, json.loads(raw) if raw else None

    def new_token(self, **fields: Any) -> str:
        status, answer = self.call("POST", "/api/v1/enrollment-tokens", fields)
        assert status == 201, answer
        return str(answer["token"]["token"])

    def pending(self) -> list[dict[str, Any]]:
        status, answer = self.call("GET", "/api/v1/enrollments?state=pending")
        assert status == 200, answer
        return list(answer["enrollments"])


class Machine:
    """What `dutagent enroll` sends, by hand: its own credential, its facts."""

    def __init__(self, hostname: str, machine_id: str | None = None) -> None:
        self.credential = secrets.token_urlsafe(32)
        self.facts = {"hostname": hostname, "machine_id": machine_id or secrets.token_hex(16),
                      "os": "Linux", "macs": ["52:54:00:12:34:56"], "agent_version": "2.0"}
        self.id: int | None = None
        self.name: str | None = None

    def enroll(self, srv: RunningServer, token: str, **extra: Any) -> tuple[int, Any]:
        status, _, raw = http("POST", srv.url + "/api/v1/enroll",
                              {"token": token, "credential": self.credential,
                               "facts": self.facts, **extra})
        answer = json.loads(raw)
        if status == 202:
            self.id = answer["enrollment"]["id"]
            self.name = answer["enrollment"]["name"]
        return status, answer

    def status(self, srv: RunningServer, credential: str | None = None) -> tuple[int, Any]:
        status, _, raw = http("GET", f"{srv.url}/api/v1/enroll/{self.id}",
                              headers={"Authorization": "Bearer " + (credential or
                                                                     self.credential)})
        return status, json.loads(raw)

    def auth(self) -> dict[str, str]:
        assert self.name is not None
        return basic(self.name, self.credential)

    def poll(self, srv: RunningServer) -> tuple[int, Any]:
        status, _, raw = http("GET", srv.url + "/tasks", headers=self.auth())
        return status, json.loads(raw) if raw else None


@pytest.fixture(params=["sqlite", "postgres"])
def nodes(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[list[RunningServer]]:
    """One server on SQLite, or two nodes on one PostgreSQL database."""
    started: list[RunningServer] = []
    if request.param == "sqlite":
        started.append(start_server(tmp_path, *FAST, "--enroll-pending-max", "3"))
    else:
        url = request.getfixturevalue("pg_url")
        key = tmp_path / "fleet.key"
        cli("addaccount", url, ADMIN[0], "admin", stdin=ADMIN[1] + "\n",
            env={"DUTSERVER_KEY_FILE": str(key)})
        for n in range(2):
            started.append(RunningServer(
                db=url, log=tmp_path / f"node{n}.log",
                args=[*FAST_ARGS, *FAST, "--enroll-pending-max", "3", "--key-file", str(key),
                      "--node-name", f"node{n}"]).start())
    yield started
    for srv in started:
        if srv.proc is not None and srv.proc.poll() is None:
            srv.stop()


def test_a_machine_waits_as_pending_and_runs_tasks_once_accepted(
        nodes: list[RunningServer]) -> None:
    a, b = nodes[0], nodes[-1]  # on PostgreSQL: asks on one node, is decided and runs on another
    admin_a, admin_b = Admin(a), Admin(b)
    token = admin_a.new_token(max_uses=2, labels={"room": "204"}, note="room 204")
    listed = admin_b.call("GET", "/api/v1/enrollment-tokens")[1]["tokens"]
    assert [t["uses"] for t in listed] == [0] and "token" not in listed[0]  # shown once only
    pc = Machine("pc-17.lab.example")
    status, answer = pc.enroll(a, token, capabilities=["ping", "execute_cmd", "rekey"])
    assert status == 202 and answer["enrollment"]["state"] == "pending"
    assert pc.status(b)[1]["enrollment"] == {"id": pc.id, "state": "pending", "name": None}
    assert pc.status(b, secrets.token_urlsafe(32))[0] == 403  # somebody else's credential
    (entry,) = admin_b.pending()
    assert (entry["name"], entry["kind"], entry["facts"]["os"], entry["labels"]) == (
        "pc-17", "agent", "Linux", {"room": "204"})
    assert admin_b.call("GET", "/api/v1/enrollment-tokens")[1]["tokens"][0]["uses"] == 1
    status, answer = admin_b.call("POST", f"/api/v1/enrollments/{pc.id}/accept",
                                  {"labels": {"role": "build"}})
    assert status == 200 and answer["enrollment"]["state"] == "accepted"
    assert pc.status(a)[1]["enrollment"]["name"] == "pc-17"
    pc.name = "pc-17"
    # Accepted: a poll on either node works now, and gets a task submitted on the other.
    got: dict[str, Any] = {}
    poller = threading.Thread(target=lambda: got.update(r=pc.poll(a)))
    poller.start()
    wait_until(lambda: admin_b.call("GET", "/api/v1/agents/pc-17")[1]["agent"]["online"])
    status, answer = admin_b.call("POST", "/api/v1/tasks",
                                  {"targets": ["pc-17"], "task": {"type": "ping"}})
    assert status == 202, answer
    poller.join(10)
    assert got["r"][0] == 200 and got["r"][1]["type"] == "ping"
    agent = admin_a.call("GET", "/api/v1/agents/pc-17")[1]["agent"]
    assert agent["labels"] == {"role": "build", "room": "204"}
    assert agent["capabilities"] == ["execute_cmd", "ping", "rekey"]
    # A task type the agent does not run is refused at once, naming both.
    status, answer = admin_a.call("POST", "/api/v1/tasks",
                                  {"targets": ["pc-17"], "task": {"type": "writefile"}})
    assert status == 400 and "pc-17" in answer["msg"] and "writefile" in answer["msg"]
    actions = {e["action"] for e in admin_a.call("GET", "/api/v1/audit")[1]["events"]}
    assert {"enroll_token_create", "enroll_request", "enroll_accept"} <= actions


@pytest.mark.parametrize("nodes", ["sqlite"], indirect=True)  # the rules; both stores: above
def test_tokens_that_are_used_up_revoked_expired_or_guessed_admit_nobody(
        nodes: list[RunningServer]) -> None:
    srv = nodes[-1]
    admin = Admin(nodes[0])
    once = admin.new_token()
    assert Machine("a").enroll(srv, once)[0] == 202
    replay = Machine("b")
    assert replay.enroll(srv, once)[0] == 403  # used up: default one use
    revoked = admin.new_token(max_uses=None)
    token_id = admin.call("GET", "/api/v1/enrollment-tokens")[1]["tokens"][0]["id"]
    assert admin.call("DELETE", f"/api/v1/enrollment-tokens/{token_id}")[0] == 200
    assert Machine("c").enroll(srv, revoked)[0] == 403  # at once, on every node
    expired = admin.new_token(expires_s=0.001)
    assert Machine("d").enroll(srv, expired)[0] == 403
    assert Machine("e").enroll(srv, "dutenr_" + secrets.token_urlsafe(32))[0] == 403
    assert len(admin.pending()) == 1  # only the first one
    states = {t["id"]: t["state"] for t in admin.call("GET", "/api/v1/enrollment-tokens")[1]
              ["tokens"]}
    assert sorted(states.values()) == ["expired", "revoked", "used up"]


def test_guessing_tokens_bans_the_address_for_enrollment(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--ban-failures", "3")
    try:
        token = Admin(srv).new_token()
        for _ in range(3):
            assert Machine("x").enroll(srv, "dutenr_guess")[0] == 403
        status, answer = Machine("y").enroll(srv, token)
        assert status == 429, answer  # banned now, even with a good token
    finally:
        srv.stop()


@pytest.mark.parametrize("nodes", ["sqlite"], indirect=True)  # the rules; both stores: above
def test_bad_requests_store_nothing(nodes: list[RunningServer]) -> None:
    srv = nodes[0]
    admin = Admin(srv)
    token = admin.new_token(max_uses=None)
    huge = Machine("big")
    huge.facts["notes"] = "x" * 20000
    assert huge.enroll(srv, token)[0] == 400
    for facts in ([1, 2], {"hostname": {"nested": 1}}, {"bad key!": "x"},
                  {"hostname": "RTL\u202eevil"}, {"macs": ["m"] * 100}):
        status, _, raw = http("POST", srv.url + "/api/v1/enroll",
                              {"token": token, "credential": secrets.token_urlsafe(32),
                               "facts": facts})
        assert status == 400, (facts, raw)
    for credential in ("short", "x" * 43 + "!", 12345):
        status, _, _ = http("POST", srv.url + "/api/v1/enroll",
                            {"token": token, "credential": credential, "facts": {}})
        assert status == 400
    assert http("POST", srv.url + "/api/v1/enroll", b"not json")[0] == 400
    assert admin.pending() == []
    assert admin.call("GET", "/api/v1/enrollment-tokens")[1]["tokens"][0]["uses"] == 0


@pytest.mark.parametrize("nodes", ["sqlite"], indirect=True)  # the rules; both stores: above
def test_duplicates_never_take_over_and_floods_are_bounded(nodes: list[RunningServer]) -> None:
    srv = nodes[-1]
    admin = Admin(nodes[0])
    token = admin.new_token(max_uses=None, auto_accept=True)
    first = Machine("pc-1", machine_id="m-1")
    status, answer = first.enroll(srv, token)
    assert answer["enrollment"] == {"id": first.id, "state": "accepted", "name": "pc-1"}
    # The same name and machine id again (a clone, or an attacker): pending, flagged, and the
    # first machine's credential stays the only one that works as pc-1.
    clone = Machine("pc-1", machine_id="m-1")
    status, answer = clone.enroll(srv, token)
    assert status == 202 and answer["enrollment"]["state"] == "pending"
    (entry,) = admin.pending()
    assert entry["duplicate_of"] == "pc-1"
    status, answer = admin.call("POST", f"/api/v1/enrollments/{clone.id}/accept")
    assert answer["enrollment"]["name"] == "pc-1-2"
    first.name = "pc-1"
    clone.name = "pc-1"
    assert http("POST", srv.url + "/api/v1/agent/hello", {}, first.auth())[0] == 200
    assert http("POST", srv.url + "/api/v1/agent/hello", {}, clone.auth())[0] == 403
    # A flood from one address: at most --enroll-pending-max (3) stay pending.
    flood = admin.new_token(max_uses=None)
    for i in range(6):
        assert Machine(f"flood-{i}").enroll(srv, flood)[0] == 202
    assert sorted(e["name"] for e in admin.pending()) == ["flood-3", "flood-4", "flood-5"]
    expired = admin.call("GET", "/api/v1/enrollments?state=expired")[1]["enrollments"]
    assert len(expired) == 3


def test_reject_and_revoke(nodes: list[RunningServer]) -> None:
    a, b = nodes[0], nodes[-1]
    admin = Admin(a)
    token = admin.new_token(max_uses=None)
    good, bad = Machine("good"), Machine("bad")
    good.enroll(a, token)
    bad.enroll(a, token)
    assert admin.call("POST", f"/api/v1/enrollments/{bad.id}/reject")[0] == 200
    assert bad.status(b)[1]["enrollment"]["state"] == "rejected"
    assert admin.call("POST", f"/api/v1/enrollments/{bad.id}/accept")[0] == 409
    admin.call("POST", f"/api/v1/enrollments/{good.id}/accept")
    good.name = "good"
    got: dict[str, Any] = {}
    poller = threading.Thread(target=lambda: got.update(r=good.poll(b)))
    poller.start()
    wait_until(lambda: admin.call("GET", "/api/v1/agents/good")[1]["agent"]["online"])
    assert admin.call("POST", "/api/v1/agents/good/revoke")[0] == 200
    poller.join(5)  # the parked poll was answered (on the other node too), not left hanging
    assert not poller.is_alive() and got["r"] == (200, {})
    assert wait_until(lambda: good.poll(b)[0] == 403)
    assert good.status(b)[1]["enrollment"]["state"] == "revoked"
    status, answer = admin.call("POST", "/api/v1/tasks",
                                {"targets": ["good"], "task": {"type": "ping"}})
    assert status == 409 and "revoked" in answer["msg"]
    agent = admin.call("GET", "/api/v1/agents/good")[1]["agent"]
    assert agent["revoked"] is True
    actions = [e["action"] for e in admin.call("GET", "/api/v1/audit")[1]["events"]]
    assert "agent_revoke" in actions and "enroll_reject" in actions


def test_rekey_keeps_the_old_credential_until_the_new_one_is_used(
        nodes: list[RunningServer]) -> None:
    a, b = nodes[0], nodes[-1]
    admin = Admin(a)
    pc = Machine("pc-r")
    pc.enroll(a, admin.new_token())
    admin.call("POST", f"/api/v1/enrollments/{pc.id}/accept")
    pc.name = "pc-r"
    status, answer = admin.call("POST", "/api/v1/agents/pc-r/rekey")
    assert status == 202
    task = pc.poll(b)[1]
    assert task["type"] == "rekey" and task["id"] == answer["task"]
    new = secrets.token_urlsafe(32)
    assert http("POST", b.url + "/api/v1/agent/rekey", {"credential": new}, pc.auth())[0] == 200
    # The agent "dies" here: its old credential still works, on every node.
    assert http("POST", a.url + "/api/v1/agent/hello", {}, pc.auth())[0] == 200
    old = pc.credential
    pc.credential = new
    status, _, raw = http("POST", f"{b.url}/tasks_result?id={task['id']}", {"rekeyed": True},
                          pc.auth())
    assert status == 200, raw
    pc.credential = old  # the first use of the new one ended the old one
    assert wait_until(lambda: http("POST", a.url + "/api/v1/agent/hello", {},
                                   pc.auth())[0] == 403)
    pc.credential = new
    assert http("POST", a.url + "/api/v1/agent/hello", {}, pc.auth())[0] == 200


def test_a_classic_agent_account_can_be_adopted(tmp_path: Path) -> None:
    srv = start_server(tmp_path)
    try:
        srv.add_account("classic", "agent", "classic-secret-12345")
        admin = Admin(srv)
        status, answer = admin.call("POST", "/api/v1/agents/classic/adopt")
        assert status == 200 and answer["enrollment"]["state"] == "accepted"
        assert http("GET", srv.url + "/tasks", headers=basic("classic",
                                                             "classic-secret-12345"))[0] == 200
        assert admin.call("POST", "/api/v1/agents/classic/adopt")[0] == 409
        assert admin.call("POST", "/api/v1/agents/nobody/adopt")[0] == 404
        status, answer = admin.call("GET", "/api/v1/enrollments?state=accepted")
        assert [e["name"] for e in answer["enrollments"]] == ["classic"]
    finally:
        srv.stop()


def test_a_room_behind_one_address_is_not_locked_out_by_its_bad_agents(tmp_path: Path) -> None:
    """500 good agents and 60 with wrong secrets (a re-imaged room) behind one address: the
    bad ones are throttled, every good one keeps working."""
    srv = start_server(tmp_path)
    try:
        good = [(f"good-{i}", secrets.token_urlsafe(32)) for i in range(500)]
        bad = [f"bad-{i}" for i in range(60)]
        admin = Admin(srv)
        for name, secret in good:
            assert admin.call("POST", "/api/v1/accounts",
                              {"name": name, "type": "agent", "password": secret})[0] == 201
        for name in bad:
            admin.call("POST", "/api/v1/accounts",
                       {"name": name, "type": "agent", "password": secrets.token_urlsafe(32)})
        statuses = []
        for name in bad:
            for _ in range(6):  # past the per-account limit (5)
                statuses.append(http("POST", srv.url + "/api/v1/agent/hello", {},
                                     basic(name, "wrong-secret-0123456789"))[0])
        assert statuses.count(429) >= 60 and set(statuses) == {403, 429}
        refused = [name for name, secret in good
                   if http("POST", srv.url + "/api/v1/agent/hello", {}, basic(name, secret))[0]
                   != 200]
        assert refused == []
        # Scanning unknown names still bans the address for them (and for logins).
        for i in range(50):
            http("GET", srv.url + "/tasks", headers=basic(f"nobody-{i}", "x" * 20))
        assert http("GET", srv.url + "/tasks", headers=basic("nobody-x", "x" * 20))[0] == 429
        assert http("GET", f"{srv.url}/login?user=admin&pass=adminpass1")[0] == 429
        assert http("POST", srv.url + "/api/v1/agent/hello", {}, basic(*good[0]))[0] == 200
    finally:
        srv.stop()
