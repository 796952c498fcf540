"""The agent's command line as the README uses it: fetch it from the server, register, run from
the config file or from DUTAGENT_* variables; clear messages when something is missing."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_support import (
    AGENT_PY,
    AGENT_SECRET,
    Admin,
    AgentProcess,
    FakeServer,
    agent_cli,
    agent_env,
    start_agent,
)
from support import PYTHON, ROOT, RunningServer, http, start_server, wait_until

PYTHON39 = Path("/root/.pyenv/versions/3.9.18/bin/python")


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Admin]]:
    """One server for the module; each test uses its own agent names and sets self-registration."""
    server = start_server(tmp_path_factory.mktemp("cli"))
    yield server, Admin(server)
    server.stop()


def host_name() -> str:
    return socket.gethostname().split(".")[0]


def test_register_writes_a_private_config_and_run_uses_it(
    shared: tuple[RunningServer, Admin], tmp_path: Path
) -> None:
    server, admin = shared
    admin.set_selfreg(True)
    config = tmp_path / "conf" / "agent.json"
    done = agent_cli("register", "--server", server.url, "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert f"registered agent '{host_name()}'" in done.stdout

    data = json.loads(config.read_text())
    assert data == {"server": server.url, "name": host_name(), "secret": data["secret"]}
    assert len(data["secret"]) >= 32
    assert data["secret"] not in done.stdout + done.stderr
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert stat.S_IMODE(config.parent.stat().st_mode) == 0o700

    agent = AgentProcess(
        ["run", "--config", str(config), "--log-level", "DEBUG"], tmp_path / "run.log"
    )
    try:
        assert admin.run(host_name(), {"type": "ping"})["pong"] is True
        assert admin.agent(host_name())["agent_version"] == "1.0.0"
    finally:
        assert agent.stop() == 0
    assert data["secret"] not in agent.output()  # the secret is never logged, even at DEBUG


def test_register_refuses_to_overwrite_a_config_without_force(
    shared: tuple[RunningServer, Admin], tmp_path: Path
) -> None:
    server, admin = shared
    admin.set_selfreg(True)
    config = tmp_path / "agent.json"
    assert (
        agent_cli(
            "register", "--server", server.url, "--name", "first", "--config", str(config)
        ).returncode
        == 0
    )
    again = agent_cli(
        "register", "--server", server.url, "--name", "second", "--config", str(config)
    )
    assert again.returncode == 2
    assert f"config file {config} already exists; use --force to replace it" in again.stderr
    forced = agent_cli(
        "register", "--server", server.url, "--name", "second", "--config", str(config), "--force"
    )
    assert forced.returncode == 0, forced.stderr
    assert json.loads(config.read_text())["name"] == "second"


def test_register_with_self_registration_off_says_so(
    shared: tuple[RunningServer, Admin], tmp_path: Path
) -> None:
    server, admin = shared
    admin.set_selfreg(False)
    config = tmp_path / "agent.json"
    done = agent_cli("register", "--server", server.url, "--name", "pc7", "--config", str(config))
    assert done.returncode == 1
    assert (
        "registration failed (HTTP 405 Agents self-registration is disabled): self-registration "
        "is disabled on the server" in done.stderr
    )
    assert not config.exists() and os.listdir(tmp_path) == []  # no config, no temporary file


def test_register_with_a_taken_name_says_so(
    shared: tuple[RunningServer, Admin], tmp_path: Path
) -> None:
    server, admin = shared
    admin.set_selfreg(True)
    admin.add_agent("taken")
    done = agent_cli(
        "register", "--server", server.url, "--name", "taken", "--config", str(tmp_path / "a.json")
    )
    assert done.returncode == 1
    assert (
        "an agent named 'taken' already exists on the server. Choose another name with --name."
        in done.stderr
    )
    assert not (tmp_path / "a.json").exists()


def test_register_errors_before_any_request(tmp_path: Path) -> None:
    bad_name = agent_cli(
        "register",
        "--server",
        "http://127.0.0.1:1",
        "--name",
        "no spaces",
        "--config",
        str(tmp_path / "a.json"),
    )
    assert bad_name.returncode == 2 and "invalid agent name 'no spaces'" in bad_name.stderr
    unreachable = agent_cli(
        "register",
        "--server",
        "http://127.0.0.1:1",
        "--name",
        "pc",
        "--config",
        str(tmp_path / "a.json"),
    )
    assert unreachable.returncode == 1
    assert "cannot reach http://127.0.0.1:1: connection refused" in unreachable.stderr
    assert os.listdir(tmp_path) == []
    no_server = agent_cli("register", "--config", str(tmp_path / "a.json"))
    assert no_server.returncode == 2 and "register needs --server URL" in no_server.stderr


def test_classic_register_sends_the_credentials_as_query(tmp_path: Path) -> None:
    with FakeServer() as fake:
        config = tmp_path / "agent.json"
        done = agent_cli(
            "register",
            "--server",
            fake.url,
            "--name",
            "oldpc",
            "--classic",
            "--config",
            str(config),
        )
        assert done.returncode == 0, done.stderr
        data = json.loads(config.read_text())
        assert data["classic"] is True
        path, _, body = fake.posts[0]
        assert path == f"/agents?user=oldpc&pass={data['secret']}" and body == b""


def test_run_from_environment_variables_only(
    shared: tuple[RunningServer, Admin], tmp_path: Path
) -> None:
    server, admin = shared
    admin.add_agent("envpc")
    env = agent_env(
        DUTAGENT_SERVER=server.url,
        DUTAGENT_NAME="envpc",
        DUTAGENT_SECRET=AGENT_SECRET,
        DUTAGENT_MAX_TASKS="2",
        DUTAGENT_LOG_LEVEL="debug",
        HOME=str(tmp_path),
    )
    env.pop("XDG_CONFIG_HOME", None)
    agent = AgentProcess(["run"], tmp_path / "env.log", env=env)
    try:
        assert admin.run("envpc", {"type": "ping"})["pong"] is True
        assert "up to 2 tasks at once" in agent.output()
    finally:
        assert agent.stop() == 0
    assert AGENT_SECRET not in agent.output()


def test_flags_win_over_environment_and_environment_over_file(
    shared: tuple[RunningServer, Admin], tmp_path: Path
) -> None:
    server, admin = shared
    admin.add_agent("filepc")
    config = tmp_path / "agent.json"
    config.write_text(
        json.dumps(
            {
                "server": "http://127.0.0.1:1",
                "name": "filepc",
                "secret": AGENT_SECRET,
                "max_tasks": 7,
            }
        )
    )
    config.chmod(0o600)
    env = agent_env(DUTAGENT_SERVER=server.url, DUTAGENT_MAX_TASKS="5")
    agent = AgentProcess(
        ["run", "--config", str(config), "--max-tasks", "3"], tmp_path / "prec.log", env=env
    )
    try:
        assert admin.run("filepc", {"type": "ping"})["pong"] is True  # server from the environment
        assert "up to 3 tasks at once" in agent.output()  # max_tasks from the flag
    finally:
        assert agent.stop() == 0


def test_run_without_settings_explains_what_is_missing(tmp_path: Path) -> None:
    env = agent_env(HOME=str(tmp_path))
    env.pop("XDG_CONFIG_HOME", None)
    done = agent_cli("run", env=env)
    assert done.returncode == 2
    default = (
        "/etc/dutagent/agent.json"
        if os.geteuid() == 0
        else str(tmp_path / ".config/dutagent/agent.json")
    )
    assert (
        f"missing --server, --name, --secret (no config file at {default}); run `dutagent register "
        f"--server URL` first" in done.stderr
    )
    missing = agent_cli("run", "--config", str(tmp_path / "nope.json"), env=env)
    assert (
        missing.returncode == 2
        and f"config file not found: {tmp_path / 'nope.json'}" in missing.stderr
    )
    bad = tmp_path / "bad.json"
    bad.write_text('{"server": "http://x", "max_tasks": "many"}')
    wrong = agent_cli("run", "--config", str(bad), env=env)
    assert wrong.returncode == 2 and "max_tasks must be a int, not 'many'" in wrong.stderr


def test_a_config_readable_by_others_is_warned_about(
    shared: tuple[RunningServer, Admin], tmp_path: Path
) -> None:
    server, admin = shared
    admin.add_agent("looseperms")
    config = tmp_path / "agent.json"
    config.write_text(
        json.dumps({"server": server.url, "name": "looseperms", "secret": AGENT_SECRET})
    )
    config.chmod(0o644)
    agent = AgentProcess(["run", "--config", str(config)], tmp_path / "perm.log")
    try:
        agent.wait_for_log(
            rf"config file {config} holds the agent secret but other users may read it "
            rf"\(mode 644\): run chmod 600"
        )
        assert admin.run("looseperms", {"type": "ping"})["pong"] is True
    finally:
        assert agent.stop() == 0


def test_fetched_from_the_server_it_runs_on_python_3_9(
    shared: tuple[RunningServer, Admin], tmp_path: Path
) -> None:
    server, admin = shared
    """The README's install: fetch dutagent.py from the server, run it with any Python >= 3.9."""
    status, _, body = http("GET", f"{server.url}/agent/dutagent.py")
    assert status == 200 and body == AGENT_PY.read_bytes()
    fetched = tmp_path / "dutagent.py"
    fetched.write_bytes(body)
    python = str(PYTHON39) if PYTHON39.exists() else shutil.which("python3.9")
    if python is None:
        pytest.skip("no Python 3.9 here")
    admin.add_agent("oldpython")
    log = tmp_path / "py39.log"
    with open(log, "ab") as logf:
        proc = subprocess.Popen(
            [
                python,
                str(fetched),
                "run",
                "--server",
                server.url,
                "--name",
                "oldpython",
                "--secret",
                AGENT_SECRET,
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=agent_env(),
            cwd=tmp_path,
        )
    try:
        assert admin.run("oldpython", {"type": "inventory"})["python_version"].startswith("3.9.")
        result = admin.run("oldpython", {"type": "execute_cmd", "cmd": "echo ok", "timeout_s": 5})
        assert result["output"] == "ok\n"
        assert admin.run("oldpython", {"type": "dircontents", "dir": str(tmp_path)})["contents"]
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0, log.read_text()


def test_installed_dutagent_command(tmp_path: Path) -> None:
    command = Path(PYTHON).parent / "dutagent"
    if not command.exists():
        pytest.skip("the package is not installed in this environment (pip install -e .)")
    done = subprocess.run(
        [str(command), "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip() == "dutagent 1.0.0"


def test_help_lists_every_option_with_its_environment_variable() -> None:
    done = agent_cli("run", "--help")
    assert done.returncode == 0
    for flag in (
        "--server",
        "--name",
        "--secret",
        "--config",
        "--classic",
        "--ca-file",
        "--insecure",
        "--log-level",
        "--log-file",
        "--max-tasks",
        "--poll-timeout-s",
        "--backoff-max-s",
        "--grace-s",
    ):
        assert flag in done.stdout
    assert "DUTAGENT_" in agent_cli("--help").stdout


def test_the_readme_documents_every_option() -> None:
    doc = (ROOT / "docs" / "agent.md").read_text()
    flags = re.findall(r"^\s+(--[a-z-]+)", agent_cli("run", "--help").stdout, re.MULTILINE)
    assert len(flags) > 15
    for flag in flags:
        if flag not in ("--help", "--no-classic", "--no-insecure"):
            assert f"`{flag}`" in doc, flag
            assert "`DUTAGENT_" + flag[2:].upper().replace("-", "_") + "`" in doc, flag


def test_log_file_gets_one_line_per_task(
    shared: tuple[RunningServer, Admin], tmp_path: Path
) -> None:
    server, admin = shared
    admin.add_agent("logger")
    log_file = tmp_path / "logs" / "dutagent.log"
    agent = start_agent(
        tmp_path, server.url, "logger", "--log-file", str(log_file), "--log-level", "INFO"
    )
    try:
        admin.run("logger", {"type": "ping"})
        admin.run("logger", {"type": "execute_cmd", "cmd": "exit 4"})
        admin.run("logger", {"type": "readfile", "path": str(tmp_path / "missing")})
    finally:
        assert agent.stop() == 0
    lines = [line for line in log_file.read_text().splitlines() if " task " in line]
    assert len(lines) == 3
    assert re.search(r" INFO task \d+ ping: \d+\.\d{3} s, ok$", lines[0]), lines[0]
    assert re.search(
        r" INFO task \d+ execute_cmd: \d+\.\d{3} s, ok \(exit status 4\)$", lines[1]
    ), lines[1]
    assert re.search(
        r" INFO task \d+ readfile: \d+\.\d{3} s, error: no such file or directory: ", lines[2]
    )
    assert AGENT_SECRET not in log_file.read_text()
    wait_until(lambda: "dutagent stopped" in log_file.read_text())
