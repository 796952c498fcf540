"""dutctl as a script uses it: a subprocess against a real server, with real agents.

This module holds the shared helpers (Ctl, Agents: real cli/dutagent.py processes) and the
tests of the session and of the listing commands; tests/test_dutctl_run.py covers `run` and
`task`.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from agent_support import AGENT_SECRET, Admin, AgentProcess, agent_env, start_agent
from support import (
    ADMIN,
    FAST_ARGS,
    PYTHON,
    ROOT,
    RunningServer,
    cli,
    free_port,
    http,
    wait_until,
)

DUTCTL = ROOT / "cli" / "dutctl.py"


@dataclass
class Ctl:
    """Runs `dutctl` as a subprocess with its own HOME and XDG_CONFIG_HOME."""

    home: Path
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("DUTCTL_") and not k.lower().endswith("_proxy")}
        env.update(HOME=str(self.home), XDG_CONFIG_HOME=str(self.home / "xdg"), **self.extra_env)
        return env

    @property
    def session_file(self) -> Path:
        return self.home / "xdg" / "dutctl" / "session.json"

    def __call__(self, *args: str, stdin: str = "",
                 timeout_s: float = 20) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PYTHON, str(DUTCTL), *args], input=stdin, capture_output=True,
                              text=True, timeout=timeout_s, env=self.env, cwd=self.home,
                              check=False)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([PYTHON, str(DUTCTL), *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                env=self.env, cwd=self.home)

    def json(self, *args: str, expect_rc: int = 0, **kwargs: Any) -> Any:
        """Runs with --json after the subcommand; asserts the exit status and that stdout is
        exactly one JSON document."""
        proc = self(args[0], "--json", *args[1:], **kwargs)
        assert proc.returncode == expect_rc, (proc.returncode, proc.stdout, proc.stderr)
        return json.loads(proc.stdout)

    def login(self, server: RunningServer, user: str = ADMIN[0], password: str = ADMIN[1]) -> None:
        proc = self("login", server.url, "--user", user, stdin=password + "\n")
        assert proc.returncode == 0, proc.stderr


class Agents:
    """Real agents for a server: `cli/dutagent.py` subprocesses, each in a directory of its name
    (so `basename $PWD` tells them apart in a command's output) that is also its HOME."""

    def __init__(self, server: RunningServer, base: Path) -> None:
        self.server = server
        self.base = base
        self.admin = Admin(server)
        self.procs: list[AgentProcess] = []

    def register(self, name: str) -> None:
        self.admin.add_agent(name)

    def start(self, *names: str) -> None:
        """Starts agents and waits until the server sees each of them online."""
        for name in names:
            self.register(name)
            cwd = self.base / name
            cwd.mkdir(parents=True, exist_ok=True)
            env = agent_env(HOME=str(cwd), XDG_CONFIG_HOME=str(cwd / "xdg"))
            self.procs.append(start_agent(cwd, self.server.url, name, cwd=cwd, env=env))
        wait_until(lambda: self.online_names() >= set(names), timeout_s=10)

    def online_names(self) -> set[str]:
        status, _, body = http("GET", f"{self.server.url}/api/v1/agents?inventory=0",
                               headers=self.admin.headers)
        assert status == 200, body
        return {a["name"] for a in json.loads(body)["agents"] if a["online"]}

    def stop_all(self) -> None:
        # Signal every agent first, then wait, so their shutdowns overlap.
        for agent in self.procs:
            agent.proc.terminate()
        for agent in self.procs:
            agent.stop()


def new_ctl(tmp_path: Path) -> Ctl:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return Ctl(home)


def logged_in_ctl(server: RunningServer, tmp_path: Path) -> Ctl:
    ctl = new_ctl(tmp_path)
    ctl.login(server)
    return ctl


@pytest.fixture
def ctl(tmp_path: Path) -> Ctl:
    return new_ctl(tmp_path)


@pytest.fixture
def admin(server: RunningServer, tmp_path: Path) -> Ctl:
    """A dutctl logged in to the server as the admin."""
    return logged_in_ctl(server, tmp_path)


@pytest.fixture
def agents(server: RunningServer, tmp_path: Path) -> Iterator[Agents]:
    pool = Agents(server, tmp_path / "agents")
    yield pool
    pool.stop_all()


# --- login and logout ------------------------------------------------------------------------

def test_login_keeps_the_session_in_a_private_file_and_never_prints_the_token(
        server: RunningServer, ctl: Ctl) -> None:
    proc = ctl("login", server.url, "--user", "admin", stdin="adminpass1\n")

    assert proc.returncode == 0, proc.stderr
    assert f"logged in to {server.url} as admin" in proc.stdout
    saved = json.loads(ctl.session_file.read_text())
    assert saved["url"] == server.url and saved["user"] == "admin"
    assert saved["token"] not in proc.stdout + proc.stderr
    assert stat.S_IMODE(ctl.session_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(ctl.session_file.parent.stat().st_mode) == 0o700
    # The stored session works for the next command.
    assert ctl("agents").returncode == 0


def test_login_json_reports_the_session_without_the_token(server: RunningServer, ctl: Ctl) -> None:
    doc = ctl.json("login", server.url, "--user", "admin", stdin="adminpass1\n")

    assert doc["error"] is False and doc["user"] == "admin" and doc["url"] == server.url
    assert doc["expires_at"]
    assert "token" not in doc


def test_wrong_password_is_a_clear_auth_failure_and_stores_nothing(
        server: RunningServer, ctl: Ctl) -> None:
    proc = ctl("login", server.url, "--user", "admin", stdin="not-the-password\n")

    assert proc.returncode == 3
    assert "login failed: wrong user name or password" in proc.stderr
    assert proc.stdout == ""
    assert not ctl.session_file.exists()


def test_repeated_failures_are_reported_as_a_ban_with_its_length(
        server: RunningServer, ctl: Ctl) -> None:
    for _ in range(5):
        assert ctl("login", server.url, "--user", "admin", stdin="wrong-password\n").returncode == 3

    proc = ctl("login", server.url, "--user", "admin", stdin="adminpass1\n")

    assert proc.returncode == 3
    assert "too many failed logins" in proc.stderr and "try again in" in proc.stderr


def test_unreachable_server_is_named_with_exit_status_4(ctl: Ctl) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    proc = ctl("login", url, "--user", "admin", stdin="adminpass1\n")

    assert proc.returncode == 4
    assert f"cannot reach the server at {url}: connection refused" in proc.stderr


def test_a_server_that_is_not_dutserver_is_named_as_such(ctl: Ctl, tmp_path: Path) -> None:
    port = free_port()
    other = subprocess.Popen([PYTHON, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                             cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: http_answers(f"http://127.0.0.1:{port}/"))
        proc = ctl("login", f"127.0.0.1:{port}", "--user", "admin", stdin="adminpass1\n")
    finally:
        other.terminate()
        other.wait()

    assert proc.returncode == 4
    assert f"is http://127.0.0.1:{port} a dutserver?" in proc.stderr


def http_answers(url: str) -> bool:
    try:
        http("GET", url, timeout=1)
        return True
    except OSError:
        return False


def test_https_server_with_a_private_ca_needs_cacert_once(tmp_path: Path, ctl: Ctl) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    cli("addaccount", str(tmp_path / "tls.db"), ADMIN[0], "admin", stdin=ADMIN[1] + "\n")
    server = RunningServer(db=tmp_path / "tls.db", scheme="https", args=[
        *FAST_ARGS, "--tls-cert", str(tmp_path / "server.pem"),
        "--tls-key", str(tmp_path / "server.pem")]).start()
    try:
        untrusted = ctl("login", server.url, "--user", "admin", stdin="adminpass1\n")
        trusted = ctl("login", server.url, "--user", "admin", "--cacert", str(tmp_path / "ca.pem"),
                      stdin="adminpass1\n")
        listing = ctl("agents", "--json")
    finally:
        server.stop()

    assert untrusted.returncode == 4
    assert "presented a certificate that is not trusted" in untrusted.stderr
    assert "--cacert" in untrusted.stderr
    assert trusted.returncode == 0, trusted.stderr
    assert listing.returncode == 0 and json.loads(listing.stdout)["agents"] == []


def test_dutctl_config_names_another_session_file(server: RunningServer, ctl: Ctl,
                                                  tmp_path: Path) -> None:
    ctl.extra_env["DUTCTL_CONFIG"] = str(tmp_path / "servers" / "one.json")
    ctl.login(server)

    assert stat.S_IMODE((tmp_path / "servers" / "one.json").stat().st_mode) == 0o600
    assert not ctl.session_file.exists()
    assert ctl("agents").returncode == 0


def test_commands_without_a_session_say_how_to_log_in(ctl: Ctl) -> None:
    proc = ctl("agents")

    assert proc.returncode == 3
    assert "not logged in; run `dutctl login URL --user NAME`" in proc.stderr


def test_relogin_needs_only_the_password(server: RunningServer, admin: Ctl) -> None:
    proc = admin("login", stdin="adminpass1\n")

    assert proc.returncode == 0, proc.stderr
    assert f"logged in to {server.url} as admin" in proc.stdout


def test_expired_session_asks_for_a_new_login(server: RunningServer, admin: Ctl) -> None:
    token = json.loads(admin.session_file.read_text())["token"]
    http("POST", server.url + "/logout", headers={"Authorization": token})  # revoked elsewhere

    for command in (["agents"], ["history"], ["selfreg"]):
        proc = admin(*command)
        assert proc.returncode == 3, command
        assert "session has expired or was logged out; run `dutctl login`" in proc.stderr


def test_logout_revokes_the_session_on_the_server(server: RunningServer, admin: Ctl) -> None:
    token = json.loads(admin.session_file.read_text())["token"]

    doc = admin.json("logout")

    assert doc == {"error": False, "logged_out": True, "revoked": True, "url": server.url}
    assert not admin.session_file.exists()
    status, _, _ = http("GET", server.url + "/api/v1/agents", headers={"Authorization": token})
    assert status == 401
    assert admin("logout").stdout == "not logged in\n"


def test_dutctl_token_and_url_from_the_environment_need_no_session_file(
        server: RunningServer, ctl: Ctl) -> None:
    ctl.extra_env.update(DUTCTL_URL=server.url, DUTCTL_TOKEN=server.login())

    assert ctl.json("agents") == {"error": False, "agents": []}
    assert not ctl.session_file.exists()


# --- agents, history, selfreg -----------------------------------------------------------------

def test_agents_lists_name_online_last_seen_and_version(
        server: RunningServer, admin: Ctl, agents: Agents) -> None:
    agents.start("lab-1")
    agents.register("lab-2")  # never polled

    proc = admin("agents")

    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()
    assert header.split() == ["NAME", "ONLINE", "LAST", "SEEN", "VERSION"]
    assert rows[0].split()[:3] == ["lab-1", "yes", "now"]
    assert rows[0].split()[3] not in ("", "-")  # the version from the agent's User-Agent
    assert rows[1].split() == ["lab-2", "no", "never", "-"]


def test_agents_json_may_follow_the_subcommand_and_is_one_document(
        server: RunningServer, admin: Ctl, agents: Agents) -> None:
    agents.start("lab-1")

    for args in (["agents", "--json"], ["--json", "agents"]):
        proc = admin(*args)
        doc = json.loads(proc.stdout)
        assert [a["name"] for a in doc["agents"]] == ["lab-1"]
        assert doc["agents"][0]["online"] is True
        assert doc["agents"][0]["agent_version"]


def test_history_filters_and_shows_one_task_in_full(server: RunningServer, admin: Ctl,
                                                   agents: Agents) -> None:
    agents.register("pc-a")
    agents.register("pc-b")
    for target in ("pc-a", "pc-b", "pc-a"):
        admin("task", "ping", target, "--no-wait")

    doc = admin.json("history", "--target", "pc-a")
    assert [t["target"] for t in doc["tasks"]] == ["pc-a", "pc-a"]
    assert doc["tasks"][0]["id"] > doc["tasks"][1]["id"]  # newest first
    assert len(admin.json("history", "--limit", "1")["tasks"]) == 1
    assert admin.json("history", "--state", "done")["tasks"] == []

    table = admin("history").stdout.splitlines()
    assert table[0].split()[:5] == ["ID", "CREATED", "TARGET", "TYPE", "STATE"]
    assert len(table) == 4 and all(" ping " in row and " queued " in row for row in table[1:])

    newest = doc["tasks"][0]["id"]
    one = admin("history", str(newest))
    assert f"task {newest}: ping on pc-a, queued" in one.stdout
    assert admin("history", "999999").returncode == 2


def test_selfreg_shows_and_switches(server: RunningServer, admin: Ctl) -> None:
    assert admin("selfreg").stdout == "agent self-registration is off\n"
    assert admin.json("selfreg", "on") == {"error": False, "selfreg": True}
    assert admin("selfreg").stdout == "agent self-registration is on\n"
    status, _, _ = http("POST", f"{server.url}/agents?user=newpc&pass={AGENT_SECRET}")
    assert status == 200
    assert admin.json("selfreg", "off") == {"error": False, "selfreg": False}
    status, _, _ = http("POST", f"{server.url}/agents?user=otherpc&pass={AGENT_SECRET}")
    assert status == 405


def test_usage_errors_exit_2_and_keep_json_output_parseable(admin: Ctl) -> None:
    proc = admin("selfreg", "maybe", "--json")

    assert proc.returncode == 2
    assert json.loads(proc.stdout)["error"] is True
    assert "invalid choice: 'maybe'" in proc.stderr
    assert admin("frobnicate").returncode == 2
