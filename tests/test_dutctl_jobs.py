"""dutctl's fleet job commands against a real server, as an admin or a script uses them:
`job run|list|show|pause|resume|continue|abort|rerun|buckets|targets`, `select` and `batch`.

The agents are protocol-level (support.PollingAgent) and answer execute_cmd by their name:
bad-* exit 1, esc-* print terminal escape sequences, the others say hello and exit 0."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from support import PYTHON, PollingAgent, RunningServer, http, start_server, wait_until
from test_dutctl import DUTCTL, Ctl, logged_in_ctl

SECRET = "agent-secret-0123456789"
ESCAPES = "\x1b[31mred\x1b[0m\x1b]0;owned\x07 \x9b2J"


def answer(name: str) -> Any:
    def reply(task: dict[str, Any]) -> dict[str, Any]:
        if name.startswith("bad"):
            return {"status_code": 1, "output": "", "stderr": "disk full\n"}
        if name.startswith("esc"):
            return {"status_code": 0, "output": ESCAPES + "\n", "stderr": ""}
        return {"status_code": 0, "output": f"hello {task.get('cmd')}  \n", "stderr": ""}
    return reply


class Lab:
    """The server's other side: an admin session to set things up and check them, and agents
    that answer."""

    def __init__(self, server: RunningServer) -> None:
        self.server = server
        self.token = server.login()
        self.agents: dict[str, PollingAgent] = {}

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        status, _, data = http(method, self.server.url + path, body,
                               {"Authorization": self.token})
        return status, json.loads(data) if data else None

    def add(self, *names: str, labels: dict[str, str] | None = None, poll: bool = True) -> None:
        for name in names:
            status, data = self.api("POST", "/api/v1/accounts",
                                    {"name": name, "type": "agent", "password": SECRET})
            assert status == 201, data
            if labels:
                assert self.api("PUT", f"/api/v1/agents/{name}/labels",
                                {"labels": labels})[0] == 200
            if poll:
                self.agents[name] = PollingAgent(self.server.url, name, SECRET,
                                                 answer(name)).start()
        wait_until(lambda: all(self.api("GET", f"/api/v1/agents/{n}")[1]["agent"]["online"]
                               for n in names if n in self.agents), timeout_s=10)

    def job(self, job_id: int) -> dict[str, Any]:
        status, data = self.api("GET", f"/api/v1/jobs/{job_id}")
        assert status == 200, data
        return dict(data["job"])

    def jobs(self) -> list[dict[str, Any]]:
        return list(self.api("GET", "/api/v1/jobs?limit=500")[1]["jobs"])

    def stop(self) -> None:
        for agent in self.agents.values():
            agent.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    # Schedules may run every 0.2 s, and the sweep that runs them looks every 0.1 s.
    srv = start_server(tmp_path_factory.mktemp("jobs"), "--schedule-min-interval-s", "0.2",
                       "--sweep-interval-s", "0.1")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def lab(server: RunningServer) -> Iterator[Lab]:
    the_lab = Lab(server)
    yield the_lab
    the_lab.stop()


@pytest.fixture(scope="module")
def admin(server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Ctl:
    return logged_in_ctl(server, tmp_path_factory.mktemp("ctl"))


def job_id_of(stdout: str) -> int:
    found = re.search(r"^job (\d+)", stdout, re.MULTILINE)
    assert found, stdout
    return int(found.group(1))


def test_a_rollout_pauses_on_its_budget_and_continues_despite_failures(
        admin: Ctl, lab: Lab) -> None:
    # Selected by label, in name order: the canary is bad-1, bad-2; then good-*, then late-*.
    lab.add("bad-1", "bad-2", "good-1", "good-2", "late-1", "late-2", labels={"room": "204"})
    lab.add("other-1", labels={"room": "101"})

    proc = admin("job", "run", "--selector", "room=204", "--canary", "2", "--wave", "2",
                 "--max-failures", "1", "--cmd", "uname -r", "--follow", timeout_s=30)

    # Followed until the budget paused it: a line each time it changed, then the job and the
    # buckets so far; exit 1 since it needs someone.
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    job_id = job_id_of(proc.stdout)
    out = proc.stdout
    assert re.search(rf"^\d\d:\d\d:\d\d job {job_id} paused: wave 1/3, done 2, waiting 4; "
                     r"2 failed of a budget of 1; failure budget exceeded", out, re.MULTILINE), out
    assert f"job {job_id}: execute_cmd: uname -r to 6 agents (room=204)" in out
    assert "state: paused - failure budget exceeded: 2 failed (budget 1)" in out
    assert "wave 1/3  2 agents  [####################]  done 2" in out
    assert "wave 3/3  2 agents  [....................]  waiting 2" in out
    assert "2/6 finished, 2 failed of a budget of 1" in out
    assert "#0  2 agents  exit 1  FAILED  bad-1, bad-2" in out
    assert "      [stderr] disk full\n" in out  # the example's first line: only stderr
    # Nothing of the next waves was sent; other-1 is not in the job at all.
    for name in ("good-1", "good-2", "late-1", "late-2", "other-1"):
        assert lab.agents[name].received == []

    shown = admin("job", "show", str(job_id))
    assert shown.returncode == 0, shown.stderr
    assert "state: paused - failure budget exceeded" in shown.stdout
    assert "wave 2/3  2 agents  [....................]  waiting 2" in shown.stdout

    listed = admin("job", "list", "--state", "paused")
    assert listed.returncode == 0
    row = next(line for line in listed.stdout.splitlines() if line.startswith(f"{job_id} "))
    assert re.search(r"paused\s+execute_cmd: uname -r\s+6\s+2\s+2\s+room=204\s+admin", row), row

    resumed = admin("job", "continue", str(job_id))
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout == f"job {job_id} continues despite failures (no budget from now on)\n"

    followed = admin("job", "show", str(job_id), "--follow", timeout_s=30)
    assert followed.returncode == 1, followed.stderr  # done, but two failed
    assert "state: done" in followed.stdout
    assert "6/6 finished, 2 failed (no budget)" in followed.stdout
    # The buckets: largest first, trailing blanks ignored, agents abbreviated past six.
    assert ("results: 6 agents in 2 groups (rerun one: dutctl job rerun ID --bucket N)\n"
            "  #0  4 agents  exit 0  good-1, good-2, late-1, late-2\n"
            "      hello uname -r\n"
            "  #1  2 agents  exit 1  FAILED  bad-1, bad-2\n"
            "      [stderr] disk full\n") in followed.stdout
    assert lab.job(job_id)["counts"] == {"done": 6}

    # A finished job cannot be paused: the server's word, exit 1.
    refused = admin("job", "pause", str(job_id))
    assert refused.returncode == 1
    assert refused.stderr == f"dutctl: Job {job_id} is done: it cannot be paused\n"
    assert admin("job", "show", "999999").returncode == 2

    # Buckets in full, then a re-run on the failed ones.
    buckets = admin("job", "buckets", str(job_id))
    assert "  #1  2 agents  exit 1  FAILED  bad-1, bad-2\n      [stderr]\n      disk full\n" \
        in buckets.stdout
    data = admin.json("job", "buckets", str(job_id), "--no-normalize")
    assert [b["count"] for b in data["buckets"]] == [4, 2]
    again = admin.json("job", "rerun", str(job_id), "--failed")
    assert again["job"]["targets"] == 2 and again["job"]["task"] == {
        "type": "execute_cmd", "cmd": "uname -r"}
    targets = admin.json("job", "targets", str(again["job"]["id"]))["targets"]
    assert [t["agent"] for t in targets] == ["bad-1", "bad-2"]


def test_a_job_to_named_agents_with_a_timed_pause_and_pause_resume_abort_by_hand(
        admin: Ctl, lab: Lab) -> None:
    lab.add("man-1", "man-2", "man-3")
    proc = admin("job", "run", "man-1", "man-2,man-3", "--canary", "1", "--pause", "1s",
                 "--", "execute_cmd", "cmd=id", "timeout_s=30")
    assert proc.returncode == 0, proc.stderr
    job_id = job_id_of(proc.stdout)
    assert proc.stdout == (f"job {job_id}: execute_cmd: id to 3 agents in 2 waves; follow it "
                           f"with `dutctl job show {job_id} --follow`\n")
    assert lab.job(job_id)["task"] == {"type": "execute_cmd", "cmd": "id", "timeout_s": 30}
    followed = admin("job", "show", str(job_id), "--follow", timeout_s=30)
    assert followed.returncode == 0, followed.stdout  # done, none failed
    assert "3/3 finished, 0 failed (no budget)" in followed.stdout
    assert "  #0  3 agents  exit 0  man-1, man-2, man-3\n      hello id\n" in followed.stdout

    # By hand: a job whose agent never polls stays running, so it can be paused, resumed and
    # aborted; each refused move says why.
    lab.add("man-off", poll=False)
    started = admin.json("job", "run", "man-off", "--cmd", "true")
    the_id = str(started["job"]["id"])
    assert started["job"]["state"] == "running"
    assert admin("job", "pause", the_id).stdout == (
        f"job {the_id} paused: nothing more is sent until it is resumed\n")
    assert "state: paused - paused by admin" in admin("job", "show", the_id).stdout
    refused = admin("job", "pause", the_id)
    assert (refused.returncode, refused.stderr) == (
        1, f"dutctl: Job {the_id} is paused: it cannot be paused\n")
    assert admin.json("job", "resume", the_id)["job"]["state"] == "running"
    assert admin.json("job", "abort", the_id)["job"]["state"] == "aborted"
    assert lab.job(int(the_id))["reason"] == "aborted by admin"
    assert lab.api("GET", "/api/v1/tasks?target=man-off")[1]["tasks"][0]["state"] == "cancelled"
    listed = admin.json("job", "list", "--state", "aborted")["jobs"]
    assert [j["id"] for j in listed] == [int(the_id)]


def test_resume_after_a_manual_pause_sends_the_next_wave(admin: Ctl, lab: Lab) -> None:
    lab.add("manual-1", "manual-2")
    job_id = admin.json("job", "run", "manual-1", "manual-2", "--canary", "1", "--pause",
                        "manual", "--cmd", "id")["job"]["id"]
    wait_until(lambda: lab.job(job_id)["state"] == "paused", timeout_s=10)
    assert "waiting for resume" in admin("job", "show", str(job_id)).stdout
    assert admin("job", "resume", str(job_id)).returncode == 0
    followed = admin("job", "show", str(job_id), "--follow", timeout_s=20)
    assert followed.returncode == 0, followed.stdout
    assert "2/2 finished" in followed.stdout


def test_agent_output_never_reaches_the_terminal_raw(admin: Ctl, lab: Lab) -> None:
    lab.add("esc-1")
    created = admin.json("job", "run", "esc-1", "--cmd", "printf")
    job_id = created["job"]["id"]
    wait_until(lambda: lab.job(job_id)["state"] == "done", timeout_s=10)
    for args in (("job", "show", str(job_id)), ("job", "buckets", str(job_id)),
                 ("job", "targets", str(job_id))):
        out = admin(*args).stdout
        assert "\x1b" not in out and "\x07" not in out and "\x9b" not in out, args
        assert "\\x1b[31mred\\x1b[0m" in out, (args, out)


def test_select_previews_a_selector_and_points_at_a_malformed_one(
        admin: Ctl, lab: Lab) -> None:
    lab.add("sel-a", "sel-b", labels={"lab": "sel", "os": "Windows"}, poll=False)
    lab.add("sel-c", labels={"lab": "sel", "os": "linux"}, poll=False)

    proc = admin("select", "lab=sel,os=windows")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "sel-a\nsel-b\n"
    assert proc.stderr == "dutctl: 2 agents match lab=sel,os=windows\n"
    assert admin.json("select", "lab", "=", "sel,", "os", "in", "(linux,", "macos)") == {
        "error": False, "selector": "lab = sel, os in (linux, macos)", "agents": ["sel-c"],
        "count": 1}

    bad = admin("select", "lab=sel,os=")
    assert bad.returncode == 2
    assert bad.stderr == ("dutctl: Invalid selector at character 11 ('='): a value is missing "
                          "(quote one with spaces: os=\"windows 11\")\n"
                          "  lab=sel,os=\n"
                          "            ^\n")
    assert admin.json("select", "lab=sel,(", expect_rc=2)["msg"].startswith(
        "Invalid selector at character 9")
    none = admin("select", "lab=nowhere")
    assert none.returncode == 2 and "matches no agent" in none.stderr

    # The same error from job run, and no job is made.
    before = len(lab.jobs())
    run = admin("job", "run", "--selector", "lab=sel,os=", "--cmd", "true")
    assert run.returncode == 2 and "Invalid selector at character 11" in run.stderr
    assert "            ^" in run.stderr
    assert len(lab.jobs()) == before
    usage = admin("job", "run", "--selector", "lab=sel", "sel-a", "--cmd", "true")
    assert usage.returncode == 2 and "not both" in usage.stderr
    assert admin("job", "run", "sel-a").returncode == 2  # no task
    assert admin("job", "run", "sel-a", "--canary", "many", "--cmd", "x").returncode == 2
    assert len(lab.jobs()) == before


def test_a_batch_with_a_bad_part_stores_nothing(admin: Ctl, lab: Lab, tmp_path: Path) -> None:
    lab.add("bat-1", "bat-2", poll=False)

    def tasks_of_bat() -> list[dict[str, Any]]:
        tasks = lab.api("GET", "/api/v1/tasks?limit=1000")[1]["tasks"]
        return [t for t in tasks if t["target"].startswith("bat-")]

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"submits": [
        {"targets": ["bat-1"], "task": {"type": "ping"}},
        {"targets": ["bat-2", "nobody"], "task": {"type": "execute_cmd", "cmd": "x"}}]}))
    proc = admin("batch", str(bad))
    assert proc.returncode == 2
    assert proc.stderr == ("dutctl: submit 2 of 2 refused, nothing stored: Unknown agent: "
                           "nobody\n")
    assert tasks_of_bat() == []

    good = [{"targets": ["bat-1"], "task": {"type": "ping"}},
            {"targets": ["bat-1", "bat-2"], "task": {"type": "execute_cmd", "cmd": "x"},
             "expires_s": 600}]
    proc = admin("batch", stdin=json.dumps(good))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert re.fullmatch(r"SUBMIT\s+TASK\s+TARGET\s+TYPE", lines[0])
    rows = [line.split() for line in lines[1:]]
    assert [(r[0], r[2], r[3]) for r in rows] == [
        ("1", "bat-1", "ping"), ("2", "bat-1", "execute_cmd"), ("2", "bat-2", "execute_cmd")]
    assert proc.stderr == ("dutctl: stored 2 submits (3 tasks) at once; follow them with "
                           "`dutctl history`\n")
    stored = {t["id"]: (t["target"], t["type"], t["state"]) for t in tasks_of_bat()}
    assert stored == {int(r[1]): (r[2], r[3], "queued") for r in rows}

    not_json = tmp_path / "x.json"
    not_json.write_text("{")
    assert admin("batch", str(not_json)).returncode == 2
    assert admin("batch", str(tmp_path / "missing.json")).returncode == 2
    assert admin.json("batch", stdin="[]", expect_rc=2)["msg"].startswith("expected")


def test_tasks_submitted_after_a_job_are_in_the_filtered_history(admin: Ctl, lab: Lab) -> None:
    lab.add("hist-1", poll=False)
    assert admin("job", "run", "hist-1", "--cmd", "true").returncode == 0
    ids = admin.json("task", "ping", "hist-1", "--no-wait")["tasks"]
    listed = admin.json("history", "--target", "hist-1")["tasks"]
    assert ids[0]["id"] in [t["id"] for t in listed]


def test_schedules_are_added_listed_switched_and_removed(admin: Ctl, lab: Lab) -> None:
    lab.add("sch-1", labels={"room": "sch"})
    proc = admin("schedule", "add", "--every", "0.5", "--name", "ping the lab", "--tz", "UTC",
                 "--selector", "room=sch", "--cmd", "true")
    assert proc.returncode == 0, proc.stderr
    found = re.fullmatch(r"schedule (\d+): execute_cmd: true to room=sch, every 0.5 s \(UTC\); "
                         r"next run at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\n", proc.stdout)
    assert found, proc.stdout
    sid = int(found.group(1))

    def runs() -> list[dict[str, Any]]:
        return [j for j in lab.jobs() if j["schedule_id"] == sid]
    wait_until(lambda: any(j["state"] == "done" for j in runs()), timeout_s=10)
    listed = admin("schedule", "list")
    row = next(line for line in listed.stdout.splitlines() if line.startswith(f"{sid} "))
    assert re.search(r"ping the lab\s+every 0.5 s\s+UTC\s+\d{4}-", row), row
    assert "execute_cmd: true" in row and row.rstrip().endswith("room=sch")

    assert admin("schedule", "disable", str(sid)).stdout == f"schedule {sid} disabled\n"
    off = admin.json("schedule", "list")["schedules"]
    assert [x["enabled"] for x in off if x["id"] == sid] == [False]
    row = next(line for line in admin("schedule", "list").stdout.splitlines()
               if line.startswith(f"{sid} "))
    assert re.search(r"UTC\s+off\s+", row), row
    again = admin("schedule", "disable", str(sid))
    assert (again.returncode, again.stderr) == (
        1, f"dutctl: Schedule {sid} is already disabled\n")
    assert admin("schedule", "enable", str(sid)).stdout.startswith(f"schedule {sid} enabled; ")

    assert admin("schedule", "rm", str(sid)).stdout == (
        f"schedule {sid} deleted: it never runs again (its jobs stay)\n")
    assert [x for x in admin.json("schedule", "list")["schedules"] if x["id"] == sid] == []
    gone = admin("schedule", "rm", str(sid))
    assert gone.returncode == 2 and f"Unknown schedule: {sid}" in gone.stderr

    bad = admin("schedule", "add", "--cron", "0 18 * *", "--selector", "room=sch", "--cmd",
                "true")
    assert bad.returncode == 2 and "Invalid cron expression '0 18 * *': 4 fields" in bad.stderr
    when = admin("schedule", "add", "--selector", "room=sch", "--cmd", "true")
    assert when.returncode == 2 and when.stderr.startswith("dutctl: when? --cron")
    made = admin.json("schedule", "add", "--cron", "0 18 * * fri", "--tz", "Europe/Paris",
                      "--window", "fri 18:00-23:00", "--disabled", "sch-1", "--", "ping")
    assert made["schedule"]["cron"] == "0 18 * * fri" and made["schedule"]["enabled"] is False
    assert made["schedule"]["windows"] == [{"days": ["fri"], "from": "18:00", "to": "23:00"}]
    assert made["schedule"]["job"] == {"task": {"type": "ping"}, "targets": ["sch-1"]}
    admin("schedule", "rm", str(made["schedule"]["id"]))


def test_a_job_outside_its_window_waits_and_says_when_it_opens(admin: Ctl, lab: Lab) -> None:
    lab.add("win-1")
    start = datetime.now(timezone.utc) + timedelta(hours=2)  # noqa: UP017
    span = f"{start:%H:%M}-{start + timedelta(hours=1):%H:%M}"
    proc = admin("job", "run", "win-1", "--window", span, "--tz", "UTC", "--cmd", "true")
    assert proc.returncode == 0, proc.stderr
    job_id = job_id_of(proc.stdout)
    shown = admin("job", "show", str(job_id)).stdout
    opens = start.replace(second=0, microsecond=0).astimezone()
    assert f"window: closed, opens at {opens:%Y-%m-%d %H:%M:%S}" in shown, shown
    assert "wave 1/1  1 agent  [....................]  waiting 1" in shown
    assert lab.agents["win-1"].received == []
    assert admin("job", "run", "win-1", "--window", "friday", "--cmd", "x").returncode == 2
    admin("job", "abort", str(job_id))


def test_follow_redraws_the_job_in_place_on_a_terminal(admin: Ctl, lab: Lab) -> None:
    lab.add("tty-1", "tty-2", "tty-3")
    leader, follower = pty.openpty()
    proc = subprocess.run(
        [PYTHON, str(DUTCTL), "job", "run", "tty-1", "tty-2", "tty-3", "--canary", "1",
         "--pause", "1", "--cmd", "echo hi", "--follow"],
        stdout=follower, stderr=subprocess.PIPE, text=True, env=admin.env, timeout=30,
        check=False)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the follower side is closed and everything was read
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    shown = b"".join(chunks).decode()

    assert proc.returncode == 0, proc.stderr
    # The block is redrawn: back to its first line and cleared, then written again.
    assert re.search(r"\x1b\[\d+F\x1b\[J", shown), shown
    final = shown.rsplit("\x1b[J", 1)[-1].replace("\r\n", "\n")
    assert "state: done" in final and "3/3 finished, 0 failed (no budget)" in final, final
    assert "wave 2/2  2 agents  [####################]  done 2\n" in final
    assert "  #0  3 agents  exit 0  tty-1, tty-2, tty-3\n      hello echo hi\n" in final
