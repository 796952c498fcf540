"""`dutctl run` and `dutctl task` against a real server and real agents, as scripts call them.

One server with its agents serves the whole module (starting five agents per test would cost
seconds each); every test looks only at the tasks it submitted itself.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_support import SPLIT_COMMAND
from support import PYTHON, start_server, wait_until
from test_dutctl import DUTCTL, Agents, Ctl, logged_in_ctl


@pytest.fixture(scope="module")
def admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctl]:
    """A dutctl logged in to a server with three online agents lab-1..lab-3, an online other-1,
    and lab-9, registered but never online."""
    base = tmp_path_factory.mktemp("lab")
    server = start_server(base)
    pool = Agents(server, base / "agents")
    try:
        pool.start("lab-1", "lab-2", "lab-3", "other-1")
        pool.register("lab-9")
        yield logged_in_ctl(server, base)
    finally:
        pool.stop_all()
        server.stop()


def task(admin: Ctl, task_id: Any) -> dict[str, Any]:
    return dict(admin.json("history", str(task_id))["task"])


def newest_task_id(admin: Ctl) -> int:
    tasks = admin.json("history", "--limit", "1")["tasks"]
    return int(tasks[0]["id"]) if tasks else 0


def test_run_one_target_prints_just_the_output(admin: Ctl) -> None:
    proc = admin("run", "lab-1", "--", "echo", "hello", "world")

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "hello world\n"
    assert proc.stderr == ""


def test_run_one_target_failing_passes_stderr_through_and_exits_1(admin: Ctl) -> None:
    proc = admin("run", "lab-2", "--", "echo out; echo err >&2; exit 7")

    assert proc.returncode == 1
    assert proc.stdout == "out\n"
    assert proc.stderr == "err\ndutctl: lab-2: command exited with status 7\n"


def test_run_group_summarises_and_prints_each_distinct_output_once(admin: Ctl) -> None:
    proc = admin("run", "group:lab", "lab-1", "--timeout", "1", "--", SPLIT_COMMAND)

    assert proc.returncode == 1  # lab-3 exited 3, lab-9 is offline
    lines = proc.stdout.splitlines()
    assert lines[:3] == [
        "2 agents: exit 0, same output",
        "1 agent: exit 3",
        "1 agent: timed out",
    ]
    assert proc.stdout.count("same text") == 1
    assert "=== exit 0 · 2 agents: lab-1, lab-2\nsame text\n" in proc.stdout
    assert "=== exit 3 · lab-3\nodd one\n" in proc.stdout
    assert ("=== timed out · lab-9\nthe agent was offline when the wait ran out; "
            "the task was cancelled\n") in proc.stdout
    assert "other-1" not in proc.stdout
    assert proc.stderr == ""  # no progress noise when stderr is not a terminal


def test_run_json_has_per_target_results_and_groups(admin: Ctl) -> None:
    doc = admin.json("run", "lab-1,lab-2,lab-3", "--", SPLIT_COMMAND, expect_rc=1)

    assert doc["ok"] is False
    assert doc["summary"]["targets"] == 3
    assert doc["summary"]["ok"] == 2 and doc["summary"]["failed"] == 1
    by_target = {r["target"]: r for r in doc["results"]}
    assert by_target["lab-3"]["exit_code"] == 3
    assert by_target["lab-3"]["result"]["output"] == "odd one\n"
    assert by_target["lab-1"]["outcome"] == "ok" and by_target["lab-1"]["state"] == "done"
    assert [(g["label"], g["targets"]) for g in doc["groups"]] == [
        ("exit 0", ["lab-1", "lab-2"]), ("exit 3", ["lab-3"])]
    assert doc["task"] == {"type": "execute_cmd", "cmd": SPLIT_COMMAND}


def test_run_all_means_the_online_agents(admin: Ctl) -> None:
    doc = admin.json("run", "all", "--", "true")

    assert doc["ok"] is True
    assert sorted(r["target"] for r in doc["results"]) == ["lab-1", "lab-2", "lab-3", "other-1"]


def test_run_words_after_the_separator_are_the_command_even_option_like_ones(
        admin: Ctl) -> None:
    proc = admin("run", "lab-1", "--json", "--", "echo", "--json", "-n", "x")

    assert json.loads(proc.stdout)["results"][0]["result"]["output"] == "--json -n x\n"


def test_unknown_agent_submits_nothing_and_exits_2(admin: Ctl) -> None:
    before = newest_task_id(admin)

    proc = admin("run", "lab-1,nope,group:ghost", "--", "true")

    assert proc.returncode == 2
    assert proc.stderr == "dutctl: unknown agents or groups: nope, group:ghost\n"
    assert newest_task_id(admin) == before
    doc = admin.json("run", "nope", "--", "true", expect_rc=2)
    assert doc == {"error": True, "msg": "unknown agent or group: nope", "exit_code": 2}


def test_timeout_cancels_tasks_no_agent_took_and_returns_on_time(admin: Ctl) -> None:
    started = time.monotonic()
    doc = admin.json("run", "lab-9", "--timeout", "0.5", "--", "echo never", expect_rc=1)
    elapsed = time.monotonic() - started

    assert elapsed < 3
    (result,) = doc["results"]
    assert result["outcome"] == "timed_out" and result["state"] == "cancelled"
    assert task(admin, result["task_id"])["state"] == "cancelled"  # never runs later


def test_timeout_of_a_running_command_is_reported_and_its_result_kept(admin: Ctl) -> None:
    proc = admin("run", "lab-1", "--timeout", "0.3", "--", "sleep 1; echo late")

    assert proc.returncode == 1
    task_id = admin.json("history", "--target", "lab-1", "--limit", "1")["tasks"][0]["id"]
    assert proc.stderr == (f"dutctl: lab-1: timed out: still running on the agent when the wait "
                           f"ran out; `dutctl history {task_id}` shows its result later\n")
    wait_until(lambda: task(admin, task_id)["state"] == "done", timeout_s=5)
    assert task(admin, task_id)["result"]["output"] == "late\n"


def test_sigterm_while_waiting_cancels_queued_tasks(admin: Ctl) -> None:
    before = newest_task_id(admin)
    proc = admin.popen("run", "lab-9", "--timeout", "30", "--", "echo never")

    def submitted() -> int:
        newest = newest_task_id(admin)
        return newest if newest > before else 0

    task_id = wait_until(submitted)
    assert task(admin, task_id)["state"] == "queued"

    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)

    assert proc.returncode == 130, err
    assert out == ""
    assert err == ("dutctl: lab-9: interrupted: the agent was offline when dutctl was interrupted; "
                   "the task was cancelled\n")
    assert task(admin, task_id)["state"] == "cancelled"


def test_progress_is_shown_on_a_terminal_only(admin: Ctl) -> None:
    leader, follower = pty.openpty()
    proc = subprocess.run(
        [PYTHON, str(DUTCTL), "run", "group:lab", "--timeout", "0.5", "--", "true"],
        stdout=subprocess.PIPE, stderr=follower, text=True, env=admin.env, timeout=20,
        check=False)
    os.close(follower)
    progress = os.read(leader, 65536).decode()
    os.close(leader)

    assert proc.returncode == 1
    assert "3/4 answered" in progress and "\x1b[K" in progress
    assert proc.stdout.startswith("3 agents: exit 0, same output\n")


def test_no_wait_prints_task_ids_and_leaves_tasks_for_offline_agents(admin: Ctl) -> None:
    proc = admin("run", "lab-9,lab-1", "--no-wait", "--", "echo later")

    assert proc.returncode == 0
    ids = dict(line.split("\t")[::-1] for line in proc.stdout.splitlines())
    assert set(ids) == {"lab-9", "lab-1"}
    wait_until(lambda: task(admin, ids["lab-1"])["state"] == "done")
    assert task(admin, ids["lab-9"])["state"] == "queued"


def test_task_values_are_json_when_they_parse_else_text(admin: Ctl, tmp_path: Path) -> None:
    note = tmp_path / "note.txt"
    note.write_text("from a file\n")

    doc = admin.json("task", "custom", "lab-9", "--no-wait", "n=5", "flag=true", 'obj={"a": 1}',
                     "word=hello", 'quoted="5"', f"text=@{note}", "empty=")
    submitted = task(admin, doc["tasks"][0]["id"])

    assert submitted["type"] == "custom"
    assert submitted["payload"] == {"n": 5, "flag": True, "obj": {"a": 1}, "word": "hello",
                                    "quoted": "5", "text": "from a file\n", "empty": ""}


def test_task_of_any_type_groups_identical_results(admin: Ctl) -> None:
    proc = admin("task", "ping", "group:lab", "--timeout", "0.5")

    assert proc.returncode == 1  # lab-9 is offline
    assert proc.stdout.startswith("3 agents: ok, same result\n1 agent: timed out\n")
    assert proc.stdout.count('"pong": true') == 1


def test_task_error_from_the_agent_is_a_failure(admin: Ctl) -> None:
    doc = admin.json("task", "readfile", "lab-1", "path=/no/such/file", expect_rc=1)

    (result,) = doc["results"]
    assert result["outcome"] == "failed" and result["state"] == "failed"
    assert result["msg"]
    proc = admin("task", "readfile", "lab-1", "path=/no/such/file")
    assert proc.returncode == 1 and proc.stderr.startswith("dutctl: lab-1: error: ")
    # A type the agent does not run is refused at the submit (it said what it runs).
    proc = admin("task", "no_such_type", "lab-1")
    assert proc.returncode != 0 and "does not run task type no_such_type" in proc.stderr


def test_task_rejects_malformed_fields_before_submitting(admin: Ctl) -> None:
    before = newest_task_id(admin)

    assert admin("task", "ping", "lab-1", "novalue").returncode == 2
    proc = admin("task", "readfile", "lab-1", "path=@/does/not/exist")

    assert proc.returncode == 2 and "cannot read the file" in proc.stderr
    assert newest_task_id(admin) == before
