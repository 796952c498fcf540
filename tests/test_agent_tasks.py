"""Every task type of PROTOCOL part 3, end to end: a real server, a real agent subprocess, tasks
submitted by an admin over HTTP, results checked as the server hands them back."""

from __future__ import annotations

import base64
import datetime
import getpass
import hashlib
import os
import shutil
import tempfile
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_support import AGENT_PY, Admin, AgentProcess, agent_env, process_gone, start_agent
from support import RunningServer, start_server, wait_until

NAME = "taskpc"
OUTPUT_CAP = 2 * 1024 * 1024  # above the server's 1 MiB body limit, to exercise result fitting


@pytest.fixture(scope="module")
def env(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RunningServer, Admin, AgentProcess]]:
    """One server and one agent for the whole module: each test only submits tasks."""
    base = tmp_path_factory.mktemp("tasks")
    server = start_server(base)
    admin = Admin(server)
    admin.add_agent(NAME)
    agent = start_agent(base, server.url, NAME, "--max-output-bytes", str(OUTPUT_CAP))
    yield server, admin, agent
    assert agent.stop() == 0
    server.stop()


@pytest.fixture
def admin(env: tuple[RunningServer, Admin, AgentProcess]) -> Admin:
    return env[1]


def run(admin: Admin, task: dict[str, Any]) -> dict[str, Any]:
    return admin.run(NAME, task)


def error_of(admin: Admin, task: dict[str, Any]) -> str:
    result = run(admin, task)
    assert result["error"] is True, result
    assert set(result) == {"error", "msg"}, result
    return str(result["msg"])


# --------------------------------------------------------------------------- ping and errors


def test_ping(admin: Admin) -> None:
    assert run(admin, {"type": "ping"}) == {"pong": True, "agent_version": "1.0.0", "error": False}


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ({"type": "execute_cmd"}, "missing field 'cmd'"),
        ({"type": "execute_cmd", "cmd": 42}, "field 'cmd' must be a string"),
        (
            {"type": "execute_cmd", "cmd": "true", "timeout_s": "soon"},
            "field 'timeout_s' must be a number",
        ),
        ({"type": "execute_cmd", "cmd": "true", "env": {"A": 1}}, "field 'env' must be an object"),
        ({"type": "kill"}, "missing field 'pid'"),
        ({"type": "kill", "pid": "12"}, "field 'pid' must be an integer"),
        ({"type": "kill", "pid": 0}, "field 'pid' must be at least 1"),
        ({"type": "kill", "pid": 1, "signal": "NOPE"}, "unknown signal: NOPE"),
        ({"type": "dircontents", "dir": ["/"]}, "field 'dir' must be a string"),
        (
            {"type": "readfile", "path": "/etc/hostname", "max_bytes": -1},
            "field 'max_bytes' must be at least 0",
        ),
        ({"type": "writefile", "path": "/tmp/x", "content_b64": "not base64!"}, "not valid base64"),
        (
            {"type": "writefile", "path": "/tmp/x", "content_b64": "", "mode": "rw"},
            "not an octal number",
        ),
        ({"type": "movefile", "frompath": "/a"}, "missing field 'topath'"),
        ({"type": "downloadfile", "url": "file:///etc/passwd", "out": "/tmp/x"}, "must be an http"),
        (
            {
                "type": "downloadfile",
                "url": "http://127.0.0.1:1/",
                "out": "/tmp/x",
                "sha256": "abc",
            },
            "64 hexadecimal digits",
        ),
    ],
)
def test_unknown_type_or_bad_field_is_an_error_result(
    admin: Admin, task: dict[str, Any], message: str
) -> None:
    assert message in error_of(admin, task)


def test_a_type_the_agent_does_not_offer_is_refused_at_the_submit(admin: Admin) -> None:
    """The agent's hello named the types it runs; the server queues no other (the agent's own
    answer to an unknown type is in test_agent_enroll.py, against a server that sends it)."""
    status, _, body = admin._http("POST", f"{admin.server.url}/tasks?target={NAME}&timeout=5",
                                  {"type": "frobnicate"}, admin.headers)
    assert status == 400 and b"does not run task type frobnicate" in body, body


def test_agent_survives_every_bad_task(env: tuple[RunningServer, Admin, AgentProcess]) -> None:
    _, admin, agent = env
    assert error_of(admin, {"type": "readfile", "path": 7}) == "field 'path' must be a string"
    assert run(admin, {"type": "ping"})["pong"] is True
    assert agent.proc.poll() is None
    assert "Traceback" not in agent.output()


# --------------------------------------------------------------------------- execute_cmd


def test_execute_cmd_result_shape(admin: Admin, tmp_path: Path) -> None:
    result = run(
        admin,
        {
            "type": "execute_cmd",
            "cmd": 'echo "out $GREETING"; pwd; echo oops >&2; exit 3',
            "cwd": str(tmp_path),
            "env": {"GREETING": "hello"},
        },
    )
    assert set(result) == {"status_code", "output", "stderr", "duration_s", "error"}
    assert result["status_code"] == 3
    assert result["output"] == f"out hello\n{tmp_path}\n"
    assert result["stderr"] == "oops\n"
    assert isinstance(result["duration_s"], float) and 0 <= result["duration_s"] < 5
    assert result["error"] is False


def test_execute_cmd_missing_cwd_is_an_error(admin: Admin, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    assert (
        error_of(admin, {"type": "execute_cmd", "cmd": "true", "cwd": str(missing)})
        == f"no such directory: {missing}"
    )


def test_execute_cmd_output_is_capped_and_says_so(admin: Admin) -> None:
    # 3 MB of output: the agent keeps 2 MiB (its cap), then cuts that to fit the server's 1 MiB.
    result = run(
        admin,
        {"type": "execute_cmd", "cmd": "head -c 3000000 /dev/zero | tr '\\0' x; echo done >&2"},
    )
    assert result["truncated"] is True
    assert result["status_code"] == 0
    assert 500_000 < len(result["output"]) < 1024 * 1024
    assert set(result["output"]) == {"x"}
    assert result["stderr"] == "done\n"


def test_execute_cmd_timeout_kills_the_whole_process_tree(admin: Admin, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    started = time.monotonic()
    result = run(
        admin,
        {
            "type": "execute_cmd",
            "timeout_s": 0.5,
            "cmd": f"sleep 30 & echo $! > {pidfile}; echo before; sleep 30",
        },
    )
    assert time.monotonic() - started < 4
    assert result["error"] is True
    assert "timed out after 0.5 s" in result["msg"]
    assert result["output"] == "before\n"
    assert 0.5 <= result["duration_s"] < 3
    child = int(pidfile.read_text())
    wait_until(lambda: process_gone(child), timeout_s=3)


def test_execute_cmd_does_not_wait_for_background_processes(admin: Admin, tmp_path: Path) -> None:
    # `server &` keeps the output pipe open; the agent answers once the shell is done anyway.
    pidfile = tmp_path / "daemon.pid"
    started = time.monotonic()
    result = run(
        admin, {"type": "execute_cmd", "cmd": f"sleep 20 & echo $! > {pidfile}; echo started"}
    )
    assert time.monotonic() - started < 3
    assert result["status_code"] == 0 and result["output"] == "started\n"
    child = int(pidfile.read_text())
    assert not process_gone(child)  # the background process was not killed
    os.kill(child, 9)


# --------------------------------------------------------------------------- processes


def test_proclist_lists_processes_with_name_user_and_cmdline(admin: Admin) -> None:
    sleeper = subprocess.Popen(["sleep", "1234.5"])
    try:
        procs = run(admin, {"type": "proclist"})["procs"]
    finally:
        sleeper.kill()
        sleeper.wait()
    assert all(set(p) == {"id", "name", "user", "cmdline"} for p in procs)
    mine = [p for p in procs if p["id"] == sleeper.pid]
    assert mine == [
        {"id": sleeper.pid, "name": "sleep", "user": getpass.getuser(), "cmdline": "sleep 1234.5"}
    ]
    assert any(p["id"] == os.getpid() for p in procs)


@pytest.mark.parametrize(
    ("signal_field", "returncode"), [(None, -15), ("KILL", -9), ("SIGINT", -2), (1, -1)]
)
def test_kill_sends_the_signal(admin: Admin, signal_field: Any, returncode: int) -> None:
    victim = subprocess.Popen(["sleep", "60"])
    task: dict[str, Any] = {"type": "kill", "pid": victim.pid}
    if signal_field is not None:
        task["signal"] = signal_field
    assert run(admin, task) == {"error": False}
    assert victim.wait(timeout=5) == returncode


def test_kill_of_a_missing_process_is_an_error(admin: Admin) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert error_of(admin, {"type": "kill", "pid": gone.pid}) == f"no such process: {gone.pid}"


# --------------------------------------------------------------------------- files


def iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(int(ts), datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_dircontents_lists_entries(admin: Admin, tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_bytes(b"hello")
    (tmp_path / "sub").mkdir()
    (tmp_path / "A file with spaces").write_bytes(b"")
    result = run(admin, {"type": "dircontents", "dir": str(tmp_path)})
    assert set(result) == {"contents", "error"}
    assert result["contents"] == [
        {
            "name": "sub",
            "dir": True,
            "fullpath": str(tmp_path / "sub"),
            "size": 0,
            "mtime": iso((tmp_path / "sub").stat().st_mtime),
        },
        {
            "name": "A file with spaces",
            "dir": False,
            "fullpath": str(tmp_path / "A file with spaces"),
            "size": 0,
            "mtime": iso((tmp_path / "A file with spaces").stat().st_mtime),
        },
        {
            "name": "b.txt",
            "dir": False,
            "fullpath": str(tmp_path / "b.txt"),
            "size": 5,
            "mtime": iso((tmp_path / "b.txt").stat().st_mtime),
        },
    ]


def test_dircontents_errors(admin: Admin, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    assert (
        error_of(admin, {"type": "dircontents", "dir": str(tmp_path / "nope")})
        == f"no such directory: {tmp_path / 'nope'}"
    )
    assert (
        error_of(admin, {"type": "dircontents", "dir": str(tmp_path / "f")})
        == f"not a directory: {tmp_path / 'f'}"
    )


def test_readfile_returns_content_size_and_sha256(admin: Admin, tmp_path: Path) -> None:
    data = bytes(range(256)) * 10
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    result = run(admin, {"type": "readfile", "path": str(path)})
    assert result == {
        "content_b64": base64.b64encode(data).decode(),
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "error": False,
    }


def test_readfile_max_bytes_cuts_content_but_hashes_the_whole_file(
    admin: Admin, tmp_path: Path
) -> None:
    path = tmp_path / "log.txt"
    path.write_bytes(b"0123456789")
    result = run(admin, {"type": "readfile", "path": str(path), "max_bytes": 4})
    assert base64.b64decode(result["content_b64"]) == b"0123"
    assert result["truncated"] is True
    assert result["size"] == 10
    assert result["sha256"] == hashlib.sha256(b"0123456789").hexdigest()


def test_readfile_errors_and_literal_paths(admin: Admin, tmp_path: Path) -> None:
    assert (
        error_of(admin, {"type": "readfile", "path": str(tmp_path / "missing")})
        == f"no such file or directory: {tmp_path / 'missing'}"
    )
    assert (
        error_of(admin, {"type": "readfile", "path": str(tmp_path)})
        == f"is a directory: {tmp_path}"
    )
    # No shell, no globbing, no ~: the name is the name.
    odd = tmp_path / "$(touch pwned) *.txt"
    odd.write_bytes(b"odd")
    result = run(admin, {"type": "readfile", "path": str(odd)})
    assert base64.b64decode(result["content_b64"]) == b"odd"
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()
    assert "no such file" in error_of(admin, {"type": "readfile", "path": "~/.bashrc"})


def test_writefile_writes_bytes_and_mode(admin: Admin, tmp_path: Path) -> None:
    data = b"\x00\x01binary\xff"
    path = tmp_path / "out.bin"
    result = run(
        admin,
        {
            "type": "writefile",
            "path": str(path),
            "content_b64": base64.b64encode(data).decode(),
            "mode": "640",
        },
    )
    assert result == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "error": False}
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    # Overwriting keeps the mode, and leaves no temporary file behind.
    run(
        admin,
        {"type": "writefile", "path": str(path), "content_b64": base64.b64encode(b"new").decode()},
    )
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert os.listdir(tmp_path) == ["out.bin"]


def test_writefile_errors(admin: Admin, tmp_path: Path) -> None:
    assert (
        error_of(
            admin, {"type": "writefile", "path": str(tmp_path / "no" / "f"), "content_b64": ""}
        )
        == f"no such directory: {tmp_path / 'no'}"
    )
    assert (
        error_of(admin, {"type": "writefile", "path": str(tmp_path), "content_b64": ""})
        == f"is a directory: {tmp_path}"
    )


def test_deletefile(admin: Admin, tmp_path: Path) -> None:
    path = tmp_path / "gone.txt"
    path.write_text("x")
    assert run(admin, {"type": "deletefile", "path": str(path)}) == {"error": False}
    assert not path.exists()
    assert (
        error_of(admin, {"type": "deletefile", "path": str(path)})
        == f"no such file or directory: {path}"
    )
    assert "is a directory" in error_of(admin, {"type": "deletefile", "path": str(tmp_path)})
    assert tmp_path.is_dir()


def test_movefile(admin: Admin, tmp_path: Path) -> None:
    src = tmp_path / "a.txt"
    src.write_text("content")
    assert run(
        admin, {"type": "movefile", "frompath": str(src), "topath": str(tmp_path / "b.txt")}
    ) == {"error": False}
    assert (tmp_path / "b.txt").read_text() == "content" and not src.exists()
    (tmp_path / "dir").mkdir()
    run(
        admin,
        {"type": "movefile", "frompath": str(tmp_path / "b.txt"), "topath": str(tmp_path / "dir")},
    )
    assert (tmp_path / "dir" / "b.txt").read_text() == "content"
    assert (
        error_of(admin, {"type": "movefile", "frompath": str(src), "topath": str(tmp_path / "c")})
        == f"no such file or directory: {src}"
    )


def test_downloadfile_verifies_sha256_before_keeping_the_file(
    env: tuple[RunningServer, Admin, AgentProcess], tmp_path: Path
) -> None:
    server, admin, _ = env
    url = f"{server.url}/agent/dutagent.py"
    expected = AGENT_PY.read_bytes()
    digest = hashlib.sha256(expected).hexdigest()
    out = tmp_path / "dutagent.py"
    result = run(
        admin, {"type": "downloadfile", "url": url, "out": str(out), "sha256": digest.upper()}
    )
    assert result == {"size": len(expected), "sha256": digest, "error": False}
    assert out.read_bytes() == expected

    wrong = tmp_path / "wrong.py"
    msg = error_of(
        admin, {"type": "downloadfile", "url": url, "out": str(wrong), "sha256": "0" * 64}
    )
    assert msg.startswith("sha256 mismatch") and "not kept" in msg
    assert os.listdir(tmp_path) == ["dutagent.py"]  # neither the file nor a temporary one

    assert (
        error_of(
            admin,
            {
                "type": "downloadfile",
                "url": f"{server.url}/no/such/file",
                "out": str(tmp_path / "x"),
            },
        )
        == "download failed: HTTP 404 Not Found"
    )


# --------------------------------------------------------------------------- inventory


def test_inventory_reports_the_machine_and_the_server_keeps_it(admin: Admin) -> None:
    result = run(admin, {"type": "inventory"})
    expected_types = {
        "hostname": str,
        "os": str,
        "os_version": str,
        "kernel": str,
        "arch": str,
        "cpu": str,
        "cpu_count": int,
        "ram_bytes": int,
        "disks": list,
        "networks": list,
        "uptime_s": float,
        "users": list,
        "python_version": str,
        "agent_version": str,
    }
    assert set(result) == set(expected_types) | {"error"}
    for key, kind in expected_types.items():
        assert isinstance(result[key], kind), (key, result[key])
    assert result["hostname"] == socket.gethostname()
    assert result["os"] == "Linux" and result["kernel"] == os.uname().release
    assert result["cpu_count"] == os.cpu_count()
    assert result["ram_bytes"] > 64 * 1024 * 1024
    assert result["python_version"] == ".".join(map(str, sys.version_info[:3]))
    assert result["agent_version"] == "1.0.0"
    assert any(d["mount"] == "/" and d["size"] >= d["free"] > 0 for d in result["disks"])
    loopback = [n for n in result["networks"] if "127.0.0.1" in n["addresses"]]
    assert loopback and set(loopback[0]) == {"name", "addresses", "mac"}
    # The server stores it with its next group commit, a moment after handing back the result.
    wait_until(
        lambda: (admin.agent(NAME)["inventory"] or {}).get("hostname") == socket.gethostname()
    )


# --------------------------------------------------------------------------- permissions


def test_permission_errors_are_clear(
    env: tuple[RunningServer, Admin, AgentProcess], tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """A second agent runs unprivileged (as `nobody` when the tests run as root)."""
    server, admin, _ = env
    admin.add_agent("lowpc")
    secret_file = tmp_path / "private" / "secret.txt"
    secret_file.parent.mkdir()
    secret_file.write_text("top secret")
    os.chmod(secret_file.parent, 0o700)
    os.chmod(secret_file, 0o600)
    extra: dict[str, Any] = {"cwd": "/"}
    if os.geteuid() == 0:
        # nobody may not enter /root, where the test's own interpreter lives.
        if not os.access("/usr/bin/python3", os.X_OK):
            pytest.skip("no /usr/bin/python3 to run an unprivileged agent with")
        # Nor a checkout under a 0700 directory (mktemp -d, pytest's own temp dirs): it runs
        # a copy in a directory of its own that anyone may read, as on a PC.
        shelf = Path(tempfile.mkdtemp(prefix="dutagent-"))
        request.addfinalizer(lambda: shutil.rmtree(shelf, ignore_errors=True))
        os.chmod(shelf, 0o755)
        program = shelf / "dutagent.py"
        shutil.copy(AGENT_PY, program)
        os.chmod(program, 0o644)
        extra.update(user="nobody", python="/usr/bin/python3", program=program,
                     env=agent_env(HOME="/nonexistent"))
        os.chmod(tmp_path, 0o755)
    else:
        os.chmod(secret_file, 0)
    agent = start_agent(tmp_path, server.url, "lowpc", **extra)
    try:
        msg = admin.run("lowpc", {"type": "readfile", "path": str(secret_file)})["msg"]
        assert msg == f"permission denied: {secret_file}"
        msg = admin.run(
            "lowpc", {"type": "writefile", "path": str(secret_file), "content_b64": ""}
        )["msg"]
        assert msg.startswith("permission denied: ")
        msg = admin.run("lowpc", {"type": "dircontents", "dir": str(secret_file.parent)})["msg"]
        assert msg == f"permission denied: {secret_file.parent}"
        init = admin.run("lowpc", {"type": "kill", "pid": 1})
        assert init["error"] is True and init["msg"] == "permission denied to signal process 1"
    finally:
        assert agent.stop() == 0
    os.chmod(secret_file, 0o600)
    assert secret_file.read_text() == "top secret"
