"""Fleet jobs over HTTP with agents that answer, on SQLite and on two PostgreSQL nodes: waves
with a failure budget decided once for the fleet, selectors, buckets, actions, atomic batches,
and the bad input of issue 19."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from pg_support import pg_server, pg_url  # noqa: F401  (fixtures)
from support import PollingAgent, RunningServer, wait_until
from test_enroll import Admin, nodes  # noqa: F401  (the fixture: SQLite, or two nodes)

SECRET = "agent-secret-0123456789"


def answer(task: dict[str, Any]) -> dict[str, Any]:
    """bad-* agents exit 1; the others print their name's first letter and exit 0."""
    name = task.get("cmd", "")
    return {"status_code": 1 if "bad" in name else 0, "output": "ok\n", "stderr": ""}


class Fleet:
    def __init__(self, servers: list[RunningServer]) -> None:
        self.servers = servers
        self.admin = Admin(servers[0])
        self.agents: dict[str, PollingAgent] = {}

    def add(self, *names: str, poll: bool = True, reply: Any = None) -> None:
        for i, name in enumerate(names):
            status, body = self.admin.call("POST", "/api/v1/accounts",
                                           {"name": name, "type": "agent", "password": SECRET})
            assert status == 201, body
            if poll:
                srv = self.servers[i % len(self.servers)]  # spread over the nodes
                self.agents[name] = PollingAgent(
                    srv.url, name, SECRET,
                    reply or (lambda task, n=name: {
                        "status_code": 1 if n.startswith("bad") else 0,
                        "output": f"hello from {'bad' if n.startswith('bad') else 'good'}  \n",
                        "stderr": ""})).start()
        if poll:
            wait_until(lambda: all(self.admin.call("GET", f"/api/v1/agents/{n}")[1]["agent"]
                                   ["online"] for n in names if n in self.agents), timeout_s=10)

    def job(self, **body: Any) -> tuple[int, Any]:
        body.setdefault("task", {"type": "execute_cmd", "cmd": "true"})
        return self.admin.call("POST", "/api/v1/jobs", body)

    def wait_job(self, job_id: int, state: str, timeout_s: float = 15) -> dict[str, Any]:
        def reached() -> Any:
            job = self.admin.call("GET", f"/api/v1/jobs/{job_id}")[1]["job"]
            return job if job["state"] == state else None
        return wait_until(reached, timeout_s=timeout_s)

    def stop(self) -> None:
        for agent in self.agents.values():
            agent.stop()


@pytest.fixture
def fleet(nodes: list[RunningServer]) -> Iterator[Fleet]:  # noqa: F811
    f = Fleet(nodes)
    yield f
    f.stop()


def test_the_budget_stops_a_rollout_before_the_next_wave(fleet: Fleet) -> None:
    fleet.add("good-1", "good-2", "bad-1", "bad-2", "late-1", "late-2")
    status, answer_ = fleet.job(targets=["good-1", "good-2", "bad-1", "bad-2", "late-1",
                                         "late-2"], canary=2, wave=2, max_failures=1)
    assert status == 201, answer_
    job_id = answer_["job"]["id"]
    job = fleet.wait_job(job_id, "paused")
    assert job["failed"] == 2 and "failure budget exceeded" in job["reason"]
    assert [w["counts"] for w in job["waves"]] == [{"done": 2}, {"done": 2}, {"waiting": 2}]
    # Nothing of the third wave was sent, on any node.
    assert fleet.agents["late-1"].received == [] and fleet.agents["late-2"].received == []
    for agent in ("good-1", "good-2", "bad-1", "bad-2"):
        assert len(fleet.agents[agent].received) == 1  # each wave sent once, fleet-wide
    # Continue despite failures: the last wave goes, the job ends.
    status, resumed = fleet.admin.call("POST", f"/api/v1/jobs/{job_id}/continue")
    assert status == 200 and resumed["job"]["max_failures"] is None
    job = fleet.wait_job(job_id, "done")
    assert job["counts"] == {"done": 6} and job["released"] == 3
    assert len(fleet.agents["late-1"].received) == 1
    # A finished job cannot be paused, resumed or aborted.
    for action in ("pause", "resume", "abort"):
        assert fleet.admin.call("POST", f"/api/v1/jobs/{job_id}/{action}")[0] == 409
    # Buckets: two groups, the larger first, trailing blanks ignored.
    groups = fleet.admin.call("GET", f"/api/v1/jobs/{job_id}/buckets")[1]["buckets"]
    assert [(g["count"], g["status_code"], g["failed"]) for g in groups] == [
        (4, 0, False), (2, 1, True)]
    assert groups[1]["agents"] == ["bad-1", "bad-2"]
    actions = {e["action"] for e in fleet.admin.call("GET", "/api/v1/audit")[1]["events"]}
    assert {"job_create", "job_wave", "job_pause", "job_continue", "job_done"} <= actions


def test_selectors_pick_by_labels_and_a_paused_job_can_be_aborted(fleet: Fleet) -> None:
    fleet.add("r204-a", "r204-b", "r101-a")
    for name, room in (("r204-a", "204"), ("r204-b", "204"), ("r101-a", "101")):
        assert fleet.admin.call("PUT", f"/api/v1/agents/{name}/labels",
                                {"labels": {"room": room}})[0] == 200
    status, preview = fleet.admin.call("GET", "/api/v1/selector?selector=room%3D204")
    assert status == 200 and preview["agents"] == ["r204-a", "r204-b"]
    status, created = fleet.job(selector="room=204", canary=1, pause_s="manual")
    assert status == 201, created
    job_id = created["job"]["id"]
    job = fleet.wait_job(job_id, "paused")
    assert "waiting for resume" in job["reason"] and job["counts"] == {"done": 1, "waiting": 1}
    # Two clients act at once: one wins, the other is told.
    results: list[int] = []
    threads = [threading.Thread(target=lambda a=a: results.append(
        fleet.admin.call("POST", f"/api/v1/jobs/{job_id}/{a}")[0])) for a in ("abort", "abort")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200, 409]
    job = fleet.admin.call("GET", f"/api/v1/jobs/{job_id}")[1]["job"]
    assert job["state"] == "aborted" and job["counts"] == {"done": 1, "waiting": 1}
    assert len(fleet.agents["r101-a"].received) == 0


@pytest.mark.parametrize("nodes", ["sqlite"], indirect=True)  # the rules; both stores: above
def test_offline_agents_are_skipped_when_the_job_says_so(
        fleet: Fleet, nodes: list[RunningServer]) -> None:  # noqa: F811
    fleet.add("on-1")
    fleet.add("off-1", poll=False)
    status, created = fleet.job(targets=["on-1", "off-1"], offline="skip")
    assert status == 201, created
    job = fleet.wait_job(created["job"]["id"], "done")
    assert job["counts"] == {"done": 1, "skipped": 1} and job["failed"] == 0
    targets = fleet.admin.call("GET", f"/api/v1/jobs/{job['id']}/targets")[1]["targets"]
    assert {t["agent"]: t["state"] for t in targets} == {"off-1": "skipped", "on-1": "done"}


@pytest.mark.parametrize("nodes", ["sqlite"], indirect=True)  # the rules; both stores: above
def test_an_atomic_batch_is_stored_whole_or_not_at_all(
        fleet: Fleet, nodes: list[RunningServer]) -> None:  # noqa: F811
    fleet.add("batch-1", "batch-2", poll=False)
    before = fleet.admin.call("GET", "/api/v1/tasks?limit=1000")[1]["tasks"]
    status, refused = fleet.admin.call("POST", "/api/v1/batches", {"submits": [
        {"targets": ["batch-1"], "task": {"type": "ping"}},
        {"targets": ["batch-2", "nobody"], "task": {"type": "ping"}}]})
    assert status == 404 and refused["msg"].startswith("submit 2 of 2 refused, nothing stored")
    assert fleet.admin.call("GET", "/api/v1/tasks?limit=1000")[1]["tasks"] == before
    status, stored = fleet.admin.call("POST", "/api/v1/batches", {"submits": [
        {"targets": ["batch-1"], "task": {"type": "ping"}},
        {"targets": ["batch-1", "batch-2"], "task": {"type": "execute_cmd", "cmd": "x"}}]})
    assert status == 202 and [len(p["tasks"]) for p in stored["submits"]] == [1, 2]
    queued = fleet.admin.call("GET", "/api/v1/tasks?state=queued")[1]["tasks"]
    assert len(queued) == 3


@pytest.mark.parametrize("body, status, words", [
    ({"selector": "room="}, 400, "a value is missing"),
    ({"selector": "room=nowhere"}, 400, "matches no agent"),
    ({"targets": ["j-1"], "canary": 5}, 400, "larger than"),
    ({"targets": ["j-1", "j-2"], "max_failures": 3}, 400, "more than the 2 targets"),
    ({"targets": ["j-1"], "selector": "x"}, 400, "not both"),
    ({"targets": ["j-1", "j-1"]}, 400, "repeat"),
    ({"targets": ["nobody"]}, 404, "Unknown agent"),
    ({"targets": ["j-1"], "wave": "150%"}, 400, "percentage"),
    ({"targets": ["j-1"], "pause_s": -1}, 400, "pause_s"),
    ({"targets": ["j-1"], "task": {"cmd": "x"}}, 400, "task"),
])
@pytest.mark.parametrize("nodes", ["sqlite"], indirect=True)  # the rules; both stores: above
def test_bad_jobs_are_refused_and_store_nothing(
        fleet: Fleet, body: dict[str, Any], status: int, words: str,
        nodes: list[RunningServer]) -> None:  # noqa: F811
    fleet.add("j-1", "j-2", poll=False)
    got, answer_ = fleet.job(**body)
    assert got == status and words in answer_["msg"], answer_
    assert fleet.admin.call("GET", "/api/v1/jobs")[1]["jobs"] == []


@pytest.mark.parametrize("nodes", ["sqlite"], indirect=True)  # the rules; both stores: above
def test_rerun_on_the_failed_ones(fleet: Fleet,
                                  nodes: list[RunningServer]) -> None:  # noqa: F811
    fleet.add("ok-1", "bad-9")
    status, created = fleet.job(targets=["ok-1", "bad-9"])
    job = fleet.wait_job(created["job"]["id"], "done")
    assert job["failed"] == 1
    status, again = fleet.admin.call("POST", f"/api/v1/jobs/{job['id']}/rerun",
                                     {"failed": True})
    assert status == 201 and again["job"]["targets"] == 1, again
    targets = fleet.admin.call("GET", f"/api/v1/jobs/{again['job']['id']}/targets")[1]
    assert [t["agent"] for t in targets["targets"]] == ["bad-9"]
    json.dumps(targets)


@pytest.mark.parametrize("nodes", ["sqlite"], indirect=True)  # the rules; both stores: above
def test_an_agent_removed_while_its_job_runs_is_skipped(
        fleet: Fleet, nodes: list[RunningServer]) -> None:  # noqa: F811
    fleet.add("stay-1", "gone-1")
    status, created = fleet.job(targets=["stay-1", "gone-1"], canary=1, pause_s="manual")
    assert status == 201, created
    job_id = created["job"]["id"]
    fleet.wait_job(job_id, "paused")
    assert fleet.admin.call("DELETE", "/api/v1/accounts/gone-1")[0] == 200
    assert fleet.admin.call("POST", f"/api/v1/jobs/{job_id}/resume")[0] == 200
    job = fleet.wait_job(job_id, "done")
    assert job["counts"] == {"done": 1, "skipped": 1} and job["failed"] == 0
    assert fleet.agents["gone-1"].received == []
