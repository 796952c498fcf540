"""dutctl's enrollment commands as an admin or a script uses them, against a real server:
`agents pending|accept|reject|revoke|rekey|adopt|label` and `tokens list|create|revoke`.

Machines ask to join the way dutagent does (POST /api/v1/enroll with a token, a credential of
their own and their facts); an accepted one then polls with Basic name:credential."""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from support import RunningServer, http, start_server
from test_dutctl import Ctl, logged_in_ctl

# One server serves the module (starting one and logging in costs seconds); each test uses
# names of its own, and whatever it leaves pending is rejected after it (see `lab`).


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    srv = start_server(tmp_path_factory.mktemp("enroll"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def admin(server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Ctl:
    return logged_in_ctl(server, tmp_path_factory.mktemp("ctl"))


class Lab:
    """The server's other side: an admin session for setting things up and checking them, and
    machines that ask to join and poll."""

    def __init__(self, server: RunningServer, token: str) -> None:
        self.server = server
        self.token = token

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        status, _, data = http(method, self.server.url + path, body,
                               {"Authorization": self.token})
        return status, json.loads(data) if data else None

    def make_token(self, **fields: Any) -> str:
        status, data = self.api("POST", "/api/v1/enrollment-tokens",
                                {"expires_s": 3600, "max_uses": None, **fields})
        assert status == 201, data
        return str(data["token"]["token"])

    def ask_to_join(self, token: str, hostname: str, **facts: Any) -> tuple[int, str]:
        """A machine asks to join as dutagent does; returns (request id, its credential)."""
        credential = secrets.token_urlsafe(32)
        status, _, data = http("POST", self.server.url + "/api/v1/enroll", {
            "token": token, "credential": credential,
            "facts": {"hostname": hostname, "os": "Linux", "machine_id": f"id-{hostname}",
                      "macs": ["52:54:00:12:34:56"], "agent_version": "2.0", **facts}})
        assert status == 202, data
        return int(json.loads(data)["enrollment"]["id"]), credential

    def poll_status(self, name: str, credential: str) -> int:
        """What the agent's requests get: 200 while its credential works, 403 before it is
        accepted and once revoked. (Its hello, which is answered at once; a poll waits.)"""
        auth = "Basic " + base64.b64encode(f"{name}:{credential}".encode()).decode()
        status, _, _ = http("POST", self.server.url + "/api/v1/agent/hello", {},
                            headers={"Authorization": auth})
        return status

    def agent(self, name: str) -> dict[str, Any]:
        status, data = self.api("GET", f"/api/v1/agents/{name}")
        assert status == 200, data
        return dict(data["agent"])

    def add_agent_account(self, name: str) -> None:
        status, data = self.api("POST", "/api/v1/accounts",
                                {"name": name, "type": "agent", "password": "s" * 20})
        assert status == 201, data


    def reject_all_pending(self) -> None:
        for request in self.api("GET", "/api/v1/enrollments?state=pending")[1]["enrollments"]:
            self.api("POST", f"/api/v1/enrollments/{request['id']}/reject")


@pytest.fixture
def lab(server: RunningServer, admin: Ctl) -> Iterator[Lab]:
    """Starts with no request pending, and leaves none. Uses dutctl's session."""
    helper = Lab(server, json.loads(admin.session_file.read_text())["token"])
    helper.reject_all_pending()
    yield helper
    helper.reject_all_pending()


# --- pending, accept, reject -----------------------------------------------------------------

def test_pending_shows_each_machine_and_flags_a_possible_duplicate(
        server: RunningServer, admin: Ctl, lab: Lab) -> None:
    assert admin("agents", "pending").stdout == "no pending enrollment requests\n"
    lab.add_agent_account("lab-7")
    token = lab.make_token()
    first, _ = lab.ask_to_join(token, "web-a.example.com", os="Debian")
    second, _ = lab.ask_to_join(token, "lab-7")

    proc = admin("agents", "pending")

    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()
    assert header.split() == ["ID", "KIND", "NAME", "HOST", "OS", "ADDRESS", "DUPLICATE", "OF",
                              "AGE"]
    assert len(rows) == 2
    newest, oldest = (row.split() for row in rows)
    assert newest[:7] == [str(second), "agent", "lab-7", "lab-7", "Linux", "127.0.0.1", "lab-7"]
    assert oldest[:7] == [str(first), "agent", "web-a", "web-a.example.com", "Debian",
                          "127.0.0.1", "-"]
    assert rows[0].endswith(("just now", " s ago"))

    doc = admin.json("agents", "pending")
    assert doc["pending"] == 2
    assert [e["facts"]["hostname"] for e in doc["enrollments"]] == ["lab-7", "web-a.example.com"]
    assert admin.json("agents", "pending", "--kind", "rdfm")["enrollments"] == []


def test_accept_and_reject_by_name_or_id_and_the_agent_can_poll(
        server: RunningServer, admin: Ctl, lab: Lab) -> None:
    token = lab.make_token(labels={"site": "lab"})
    id_a, credential_a = lab.ask_to_join(token, "web-a")
    id_b, credential_b = lab.ask_to_join(token, "web-b")
    id_c, _ = lab.ask_to_join(token, "web-c")
    assert lab.poll_status("web-a", credential_a) == 403  # not an agent yet

    proc = admin("agents", "accept", "web-a", str(id_b))

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"accepted request {id_a} (web-a) as agent web-a",
                                        f"accepted request {id_b} (web-b) as agent web-b"]
    assert lab.poll_status("web-a", credential_a) == 200
    assert lab.poll_status("web-b", credential_b) == 200
    assert lab.agent("web-a")["labels"] == {"site": "lab"}

    proc = admin("agents", "reject", "web-c")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"rejected request {id_c} (web-c)\n"
    assert admin.json("agents", "pending")["pending"] == 0
    names = {a["name"] for a in admin.json("agents")["agents"]}
    assert {"web-a", "web-b"} <= names and "web-c" not in names

    # What is decided is no longer pending: a second decision is refused, naming the way out.
    again = admin("agents", "accept", str(id_a))
    assert again.returncode == 2
    assert f"no pending request has the id {id_a}" in again.stderr
    assert "dutctl agents pending" in again.stderr


def test_accept_gives_a_name_and_labels_over_the_tokens(server: RunningServer, admin: Ctl,
                                                        lab: Lab) -> None:
    token = lab.make_token(labels={"site": "lab", "rack": "1"})
    request_id, credential = lab.ask_to_join(token, "localhost.localdomain")

    doc = admin.json("agents", "accept", str(request_id), "--name", "bench-3",
                     "--label", "rack=4", "--label", "owner=qa")

    assert doc["ok"] is True
    assert doc["results"][0]["enrollment"]["name"] == "bench-3"
    assert lab.agent("bench-3")["labels"] == {"site": "lab", "rack": "4", "owner": "qa"}
    assert lab.poll_status("bench-3", credential) == 200


def test_ambiguous_or_unknown_names_decide_nothing(server: RunningServer, admin: Ctl,
                                                   lab: Lab) -> None:
    token = lab.make_token()
    first, _ = lab.ask_to_join(token, "pc-a.example.com")
    second, _ = lab.ask_to_join(token, "pc-a.example.org")
    lab.ask_to_join(token, "pc-b")

    ambiguous = admin("agents", "accept", "pc-b", "pc-a")
    unknown = admin("agents", "reject", "pc-b", "nosuch")
    json_doc = admin.json("agents", "accept", "nosuch", expect_rc=2)
    two_names = admin("agents", "accept", "pc-b", str(first), "--name", "x")
    nothing = admin("agents", "accept")

    assert ambiguous.returncode == 2 and ambiguous.stdout == ""
    assert (f"2 pending requests are called pc-a (ids {second}, {first}); give the id instead"
            in ambiguous.stderr)
    assert unknown.returncode == 2 and "no pending request is called nosuch" in unknown.stderr
    assert json_doc["error"] is True and "nosuch" in json_doc["msg"]
    assert two_names.returncode == 2 and "--name" in two_names.stderr
    assert nothing.returncode == 2 and "which requests?" in nothing.stderr
    assert admin.json("agents", "pending")["pending"] == 3  # none was decided

    # The ids tell the two apart; a name taken already is the server's refusal (exit 1).
    assert admin("agents", "accept", str(first)).returncode == 0
    taken = admin("agents", "accept", str(second), "--name", "pc-a")
    assert taken.returncode == 1
    assert f"cannot accept request {second}" in taken.stderr and "pc-a" in taken.stderr


# --- enrolled agents: revoke, rekey, adopt, label --------------------------------------------

def test_revoke_and_rekey_agents(admin: Ctl, lab: Lab) -> None:
    token = lab.make_token(auto_accept=True)
    _, credential_1 = lab.ask_to_join(token, "rk-1")
    _, credential_2 = lab.ask_to_join(token, "rk-2")
    assert lab.poll_status("rk-1", credential_1) == 200

    rekey = admin.json("agents", "rekey", "rk-1")
    task_id = rekey["results"][0]["task"]
    assert rekey["ok"] is True and isinstance(task_id, int)
    assert admin.json("history", str(task_id))["task"]["type"] == "rekey"
    assert "re-key of rk-2 requested (task " in admin("agents", "rekey", "rk-2").stdout

    unknown = admin("agents", "revoke", "rk-1", "nosuch")
    assert unknown.returncode == 2 and "unknown agent: nosuch" in unknown.stderr
    assert lab.poll_status("rk-1", credential_1) == 200  # nothing was revoked

    proc = admin("agents", "revoke", "rk-1", "rk-2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["revoked rk-1: its credential no longer works",
                                        "revoked rk-2: its credential no longer works"]
    assert lab.poll_status("rk-1", credential_1) == 403
    assert lab.poll_status("rk-2", credential_2) == 403
    assert lab.agent("rk-1")["revoked"] is True
    revoked = lab.api("GET", "/api/v1/enrollments?state=revoked")[1]["enrollments"]
    assert {"rk-1", "rk-2"} <= {e["name"] for e in revoked}


def test_adopt_a_classic_agent_and_set_its_labels(admin: Ctl, lab: Lab) -> None:
    lab.add_agent_account("old-pc")

    proc = admin("agents", "adopt", "old-pc")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("old-pc is an enrolled identity now (request ")
    again = admin("agents", "adopt", "old-pc")
    assert again.returncode == 1 and again.stderr.startswith("dutctl: old-pc: ")
    assert admin("agents", "adopt", "nosuch").returncode == 2

    assert admin("agents", "label", "old-pc", "site=lab", "rack=3").stdout == \
        "old-pc: rack=3,site=lab\n"
    # Labels given are set, key- removes one, the others stay.
    assert admin.json("agents", "label", "old-pc", "rack=4", "site-", "owner=qa")["labels"] == \
        {"rack": "4", "owner": "qa"}
    assert lab.agent("old-pc")["labels"] == {"rack": "4", "owner": "qa"}
    assert admin("agents", "label", "old-pc", "--replace", "os=linux").stdout == \
        "old-pc: os=linux\n"
    assert admin("agents", "label", "old-pc", "--replace").stdout == "old-pc: no labels\n"
    assert lab.agent("old-pc")["labels"] == {}

    bad = admin("agents", "label", "old-pc", "rack")
    assert bad.returncode == 2 and "expected a label as key=value" in bad.stderr
    assert admin("agents", "label", "nosuch", "a=b").returncode == 2
    assert admin("agents", "label", "old-pc").returncode == 2


# --- tokens ----------------------------------------------------------------------------------

def test_tokens_create_shows_the_token_once_and_revoke_stops_it(
        server: RunningServer, admin: Ctl, lab: Lab) -> None:
    proc = admin("tokens", "create", "--expires", "12h", "--uses", "2", "--label", "site=lab",
                 "--note", "lab PCs")

    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    token_id = lines[0].split(":")[0].removeprefix("token ")
    assert lines[0].startswith(f"token {token_id}: 2 uses, expires ")
    assert "labels site=lab, machines accepted by an admin" in lines[0]
    token = lines[1].strip()
    assert token.startswith("dutenr_") and len(token) > 40
    assert lines[2:4] == ["on the new machine, run:", f"  dutagent enroll {server.url} {token}"]
    assert "shown only this once" in lines[4] and f"dutctl tokens revoke {token_id}" in lines[4]

    lab.ask_to_join(token, "tok-1")
    listing = admin("tokens", "list")
    assert listing.returncode == 0
    header, *rows = listing.stdout.splitlines()
    assert header.split() == ["ID", "STATE", "USES", "EXPIRES", "AUTO-ACCEPT", "LABELS", "NOTE"]
    (row,) = [r for r in rows if r.split()[0] == token_id]
    assert row.split()[:3] == [token_id, "active", "1/2"]
    assert row.split()[-4:] == ["no", "site=lab", "lab", "PCs"]
    assert token not in listing.stdout and token not in admin("tokens").stdout
    assert all("token" not in t for t in admin.json("tokens", "list")["tokens"])

    assert admin("tokens", "revoke", token_id).stdout == \
        f"token {token_id} revoked: no machine can join with it any more\n"
    status, _, _ = http("POST", server.url + "/api/v1/enroll", {
        "token": token, "credential": secrets.token_urlsafe(32), "facts": {"hostname": "late"}})
    assert status == 403
    states = {str(t["id"]): t["state"] for t in admin.json("tokens")["tokens"]}
    assert states[token_id] == "revoked"
    again = admin("tokens", "revoke", token_id)
    assert again.returncode == 2 and f"No active enrollment token {token_id}" in again.stderr


def test_tokens_create_json_unlimited_auto_accept(server: RunningServer, admin: Ctl,
                                                   lab: Lab) -> None:
    before = len(admin.json("tokens")["tokens"])
    doc = admin.json("tokens", "create", "--unlimited", "--auto-accept", "--expires", "3600")

    token = doc["token"]
    assert token["max_uses"] is None and token["auto_accept"] is True
    assert doc["command"] == f"dutagent enroll {server.url} {token['token']}"
    _, credential = lab.ask_to_join(token["token"], "auto-1")
    assert admin.json("agents", "pending")["pending"] == 0
    assert lab.poll_status("auto-1", credential) == 200

    for bad in (["--expires", "soon"], ["--uses", "0"], ["--uses", "2", "--unlimited"],
                ["--label", "nolabel"]):
        proc = admin("tokens", "create", *bad)
        assert proc.returncode == 2, (bad, proc.stderr)
    assert len(admin.json("tokens")["tokens"]) == before + 1  # none of those made a token
