"""The command line: accounts on a database, with and without a running server."""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from pathlib import Path

from support import RunningServer, basic, cli, http, wait_until

SECRET = "cli-agent-secret-1234"


def test_addaccount_creates_the_database_and_lists_accounts(tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    out = cli("addaccount", str(db), "ops", "admin", stdin="adminpass1\n")
    assert out.returncode == 0 and db.exists()
    cli("addaccount", str(db), "pc-1", "agent", stdin=SECRET + "\n")
    listing = cli("accounts", str(db)).stdout.splitlines()
    assert listing[0].split() == ["NAME", "TYPE"]
    assert [line.split() for line in listing[1:]] == [["ops", "admin"], ["pc-1", "agent"]]
    key = Path(str(db) + ".key")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600  # the agent-digest key is private


def test_secrets_are_never_stored_in_clear(tmp_path: Path) -> None:
    db = tmp_path / "d.db"
    cli("addaccount", str(db), "ops", "admin", stdin="adminpass1\n")
    cli("addaccount", str(db), "pc-1", "agent", stdin=SECRET + "\n")
    hashes = dict(sqlite3.connect(db).execute("SELECT name, secret_hash FROM accounts"))
    assert hashes["ops"].startswith("$argon2id$")
    assert hashes["pc-1"].startswith("hmac-sha256$") and SECRET not in hashes["pc-1"]


def test_errors_exit_non_zero_with_one_clear_line(tmp_path: Path) -> None:
    db = tmp_path / "d.db"
    cases = [
        (("addaccount", str(db), "x", "root"), "pw12345678\n", "bad account type"),
        (("addaccount", str(db), "bad name!", "admin"), "pw12345678\n", "Invalid name"),
        (("addaccount", str(db), "pc", "agent"), "short\n", "16"),
        (("addaccount", str(db), "ops", "admin"), "short\n", "8"),
    ]
    for args, stdin, words in cases:
        out = cli(*args, stdin=stdin, check=False)
        assert out.returncode != 0, args
        assert words in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    cli("addaccount", str(db), "ops", "admin", stdin="adminpass1\n")
    out = cli("addaccount", str(db), "ops", "admin", stdin="adminpass1\n", check=False)
    assert out.returncode != 0 and "already exists" in out.stderr
    for cmd in (("remove", str(db), "ghost"), ("passwd", str(db), "ghost")):
        out = cli(*cmd, stdin="whatever-password\n", check=False)
        assert out.returncode != 0 and "unknown account: ghost" in out.stderr
    out = cli("accounts", str(tmp_path / "missing.db"), check=False)
    assert out.returncode != 0 and "no database" in out.stderr


def test_unwritable_database_is_a_clear_error(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        target = "/proc/forbidden.db"  # root may write anywhere on disk; /proc refuses everyone
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = str(locked / "d.db")
    out = cli("addaccount", target, "ops", "admin", stdin="adminpass1\n", check=False)
    assert out.returncode != 0 and out.stderr.startswith("dutserver: ")
    assert "Traceback" not in out.stderr


def test_delaccount_is_an_alias_of_remove(tmp_path: Path) -> None:
    db = tmp_path / "d.db"
    cli("addaccount", str(db), "a", "admin", stdin="adminpass1\n")
    cli("addaccount", str(db), "b", "admin", stdin="adminpass1\n")
    cli("delaccount", str(db), "a")
    cli("remove", str(db), "b")
    assert cli("accounts", str(db)).stdout.splitlines()[1:] == []


def test_changes_reach_a_running_server_within_a_second(server: RunningServer) -> None:
    server.add_account("pc-1", "agent", SECRET)
    # Added while it runs: usable at once.
    assert http("GET", f"{server.url}/tasks", headers=basic("pc-1", SECRET))[0] == 200
    token = server.login()
    cli("remove", str(server.db), "pc-1")
    cli("remove", str(server.db), "admin")
    removed_at = time.monotonic()
    wait_until(lambda: http("GET", f"{server.url}/agents",
                            headers={"Authorization": token})[0] == 403, timeout_s=1)
    # A poll parks for the poll timeout once accepted, so probe with one started after 1 s.
    time.sleep(max(0.0, removed_at + 1.0 - time.monotonic()))
    assert http("GET", f"{server.url}/tasks", headers=basic("pc-1", SECRET))[0] == 403


def test_server_refuses_bad_settings_with_one_line(tmp_path: Path) -> None:
    out = cli("server", "0", str(tmp_path / "d.db"), "--poll-timeout-s", "-1", check=False)
    assert out.returncode != 0 and "poll_timeout_s must be positive" in out.stderr
    config = tmp_path / "bad.toml"
    config.write_text('no_such_setting = 1\n')
    out = cli("server", "0", str(tmp_path / "d.db"), "--config", str(config), check=False)
    assert out.returncode != 0 and "unknown setting" in out.stderr
