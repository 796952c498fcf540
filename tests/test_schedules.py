"""Schedules and maintenance windows over HTTP with agents that answer, on SQLite and on two
PostgreSQL nodes: the selector resolved at each run, a slot run once for the fleet, a slot
missed while the server was down run once at start-up, overlapping runs skipped, windows
that hold a job's waves, and the bad input of the issue.

Schedules here run every fraction of a second (`every_s`, with the setting
schedule_min_interval_s lowered), so nothing waits for a cron minute: cron slots are tested
with fixed times in tests/test_windows.py."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pg_support import pg_server, pg_url  # noqa: F401  (fixtures)
from support import RunningServer, http, wait_until
from test_enroll import nodes  # noqa: F401  (the fixture: SQLite, or two nodes)
from test_jobs import Fleet, fleet  # noqa: F401  (the fixture: nodes with agents that answer)

PING = {"type": "execute_cmd", "cmd": "true"}
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@pytest.fixture(autouse=True)
def fast_schedules(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the servers start (autouse fixtures come first): schedules every 0.2 s, and a
    sweep that looks at them every 0.1 s."""
    monkeypatch.setenv("DUTSERVER_SCHEDULE_MIN_INTERVAL_S", "0.2")
    monkeypatch.setenv("DUTSERVER_SWEEP_INTERVAL_S", "0.1")


def schedule(f: Fleet, **body: Any) -> dict[str, Any]:
    status, answer = f.admin.call("POST", "/api/v1/schedules", body)
    assert status == 201, answer
    return dict(answer["schedule"])


def get(f: Fleet, sid: int) -> dict[str, Any]:
    status, answer = f.admin.call("GET", f"/api/v1/schedules/{sid}")
    assert status == 200, answer
    return dict(answer["schedule"])


def runs(f: Fleet, sid: int) -> list[dict[str, Any]]:
    status, answer = f.admin.call("GET", f"/api/v1/schedules/{sid}/runs?limit=500")
    assert status == 200, answer
    return list(reversed(answer["jobs"]))  # oldest first


def events(f: Fleet, action: str) -> list[str]:
    found = f.admin.call("GET", "/api/v1/audit?limit=1000")[1]["events"]
    return [e["detail"] for e in found if e["action"] == action]


def label(f: Fleet, name: str, **labels: str) -> None:
    assert f.admin.call("PUT", f"/api/v1/agents/{name}/labels", {"labels": labels})[0] == 200


def seconds(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def test_a_recurring_schedule_resolves_its_selector_at_each_run(fleet: Fleet) -> None:  # noqa: F811
    fleet.add("room-1")
    label(fleet, "room-1", room="204")
    made = schedule(fleet, name="ping room 204", every_s=0.5, tz="Europe/Paris",
                    job={"task": PING, "selector": "room=204"})
    assert (made["kind"], made["every_s"], made["enabled"], made["runs"]) == (
        "every", 0.5, True, 0)
    assert made["tz"] == "Europe/Paris" and made["next_run_at"] and made["windows"] is None
    sid = made["id"]
    first = wait_until(lambda: [j for j in runs(fleet, sid) if j["state"] == "done"],
                       timeout_s=10)[0]
    assert first["targets"] == 1 and first["schedule_id"] == sid
    # A machine that joins later, with the label: the next runs include it.
    fleet.add("room-2")
    label(fleet, "room-2", room="204")
    wait_until(lambda: [j for j in runs(fleet, sid) if j["targets"] == 2 and
                        j["state"] == "done"], timeout_s=10)
    assert fleet.agents["room-2"].received
    status, off = fleet.admin.call("POST", f"/api/v1/schedules/{sid}/disable")
    assert status == 200 and off["schedule"]["enabled"] is False
    assert off["schedule"]["next_run_at"] is None
    assert fleet.admin.call("POST", f"/api/v1/schedules/{sid}/disable")[0] == 409
    # Every run is a job linked to its schedule, made once for the fleet: one per slot.
    jobs = wait_until(lambda: (lambda s, js: js if s["runs"] == len(js) and all(
        j["state"] == "done" for j in js) else None)(get(fleet, sid), runs(fleet, sid)),
        timeout_s=10)
    listed = fleet.admin.call("GET", f"/api/v1/jobs?schedule_id={sid}&limit=500")[1]["jobs"]
    assert sorted(j["id"] for j in listed) == sorted(j["id"] for j in jobs)
    made_at = [seconds(j["created_at"]) for j in jobs]
    assert all(b - a > 0.25 for a, b in zip(made_at, made_at[1:])), made_at
    assert len(events(fleet, "schedule_run")) == len(jobs)
    assert len(fleet.agents["room-1"].received) == len(jobs)
    assert {"schedule_create", "schedule_run", "schedule_disable", "job_create"} <= {
        e["action"] for e in fleet.admin.call("GET", "/api/v1/audit?limit=1000")[1]["events"]}
    status, on = fleet.admin.call("POST", f"/api/v1/schedules/{sid}/enable")
    assert status == 200 and on["schedule"]["enabled"] and on["schedule"]["next_run_at"]


def test_a_once_schedule_runs_once_for_the_fleet(fleet: Fleet) -> None:  # noqa: F811
    fleet.add("once-1", "once-2")
    at = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    made = schedule(fleet, at=at, job={"task": PING, "targets": ["once-1", "once-2"]})
    assert made["kind"] == "once" and made["next_run_at"] is not None
    sid = made["id"]
    (job,) = wait_until(lambda: runs(fleet, made["id"]), timeout_s=10)
    fleet.wait_job(job["id"], "done")
    time.sleep(0.5)  # every node swept a few times since: none made a second job
    assert len(runs(fleet, sid)) == 1
    after = get(fleet, sid)
    assert (after["runs"], after["next_run_at"], after["last_job_id"]) == (1, None, job["id"])
    assert [len(a.received) for a in fleet.agents.values()] == [1, 1]
    # Its time has passed: it cannot be switched on again.
    assert fleet.admin.call("POST", f"/api/v1/schedules/{sid}/disable")[0] == 200
    status, answer = fleet.admin.call("POST", f"/api/v1/schedules/{sid}/enable")
    assert status == 409 and "has passed" in answer["msg"]


def test_slots_missed_while_down_run_once_at_start_up(fleet: Fleet) -> None:  # noqa: F811
    # An agent that never polls, skipped when offline: each run's job ends at once, so that
    # no run is still going when the next slot comes (that slot would be skipped).
    fleet.add("down-1", poll=False)
    job = {"task": PING, "targets": ["down-1"], "offline": "skip"}
    every = schedule(fleet, every_s=1, job=job)["id"]
    wait_until(lambda: get(fleet, every)["runs"] >= 1, timeout_s=10)
    at = (datetime.now(UTC) + timedelta(seconds=1.5)).isoformat()
    once = schedule(fleet, at=at, job=job)["id"]
    for srv in fleet.servers:
        srv.stop()
    time.sleep(3.5)  # the once slot and three slots of the other pass while no node runs
    for srv in fleet.servers:
        srv.start()
    fleet.admin.token = fleet.servers[0].login()
    wait_until(lambda: get(fleet, once)["runs"] == 1, timeout_s=10)
    caught_up = wait_until(lambda: [d for d in events(fleet, "schedule_run")
                                    if d.startswith(f"schedule {every}:") and "missed" in d],
                           timeout_s=10)
    assert len(caught_up) == 1 and "later slot(s) missed meanwhile, run once" in caught_up[0]
    missed = int(caught_up[0].split("; ")[1].split(" ")[0])
    assert missed >= 2  # several slots passed; one run made for them all
    after = get(fleet, once)
    assert after["next_run_at"] is None and len(runs(fleet, once)) == 1
    assert get(fleet, every)["next_run_at"] is not None


@pytest.mark.parametrize("nodes", ["sqlite"], indirect=True)  # the rules; both stores: above
def test_a_slot_that_comes_while_the_last_run_is_still_running_is_skipped(
        fleet: Fleet, nodes: list[RunningServer]) -> None:  # noqa: F811
    fleet.add("win-1")
    # Windows that are closed now: the first run's job waits for one, and holds the schedule.
    later = DAYS[(datetime.now(UTC) + timedelta(days=3)).weekday()]
    made = schedule(fleet, every_s=0.3, tz="UTC", job={"task": PING, "targets": ["win-1"]},
                    windows=[{"days": [later], "from": "00:00", "to": "01:00"}])
    assert made["windows"] == [{"days": [later], "from": "00:00", "to": "01:00"}]
    assert made["window"]["open"] is False and made["window"]["opens_at"]
    sid = made["id"]
    current = wait_until(lambda: (lambda s: s if s["skipped"] >= 2 else None)(get(fleet, sid)),
                         timeout_s=10)
    assert current["runs"] == 1 and "still running" in current["last_error"]
    (job,) = runs(fleet, sid)
    assert job["state"] == "running" and job["counts"] == {"waiting": 1}
    assert job["windows"] == made["windows"] and job["tz"] == "UTC"
    assert job["window"]["open"] is False
    assert fleet.agents["win-1"].received == []  # nothing outside a window
    assert any("still running" in d for d in events(fleet, "schedule_skip"))
    # Deleted: gone from the listings, never run again; its job stays.
    status, answer = fleet.admin.call("DELETE", f"/api/v1/schedules/{sid}")
    assert status == 200 and answer["deleted"] == sid
    for method, path in (("GET", ""), ("DELETE", ""), ("GET", "/runs"), ("POST", "/enable")):
        assert fleet.admin.call(method, f"/api/v1/schedules/{sid}{path}")[0] == 404
    assert fleet.admin.call("GET", "/api/v1/schedules")[1]["schedules"] == []
    listed = fleet.admin.call("GET", f"/api/v1/jobs?schedule_id={sid}")[1]["jobs"]
    assert [j["id"] for j in listed] == [job["id"]]
    assert {"schedule_skip", "schedule_delete"} <= {
        e["action"] for e in fleet.admin.call("GET", "/api/v1/audit?limit=1000")[1]["events"]}


@pytest.mark.parametrize("nodes", ["sqlite"], indirect=True)  # the rules; both stores: above
def test_a_job_in_an_open_window_is_sent_with_its_expiry_cut_at_the_window_end(
        fleet: Fleet, nodes: list[RunningServer]) -> None:  # noqa: F811
    fleet.add("open-1", poll=False)
    now = datetime.now(UTC)
    window = {"from": (now - timedelta(hours=1)).strftime("%H:%M"),
              "to": (now + timedelta(hours=1)).strftime("%H:%M")}
    status, created = fleet.job(targets=["open-1"], windows=[window], tz="UTC")
    assert status == 201, created
    job = created["job"]
    assert job["window"]["open"] is True and job["released"] == 1
    closes = seconds(job["window"]["closes_at"])
    assert closes - now.timestamp() < 3600 + 60
    (target,) = fleet.admin.call("GET", f"/api/v1/jobs/{job['id']}/targets")[1]["targets"]
    task = fleet.admin.call("GET", f"/api/v1/tasks/{target['task_id']}")[1]["task"]
    assert seconds(task["expires_at"]) <= closes  # not the job's default day
    # Windows that are closed now: nothing is released.
    later = DAYS[(now + timedelta(days=3)).weekday()]
    status, created = fleet.job(targets=["open-1"], tz="UTC",
                                windows=[{"days": [later], "from": "10:00", "to": "11:00"}])
    assert status == 201 and created["job"]["released"] == 0
    assert created["job"]["counts"] == {"waiting": 1} and created["job"]["window"]["opens_at"]


@pytest.mark.parametrize("body, status, words", [
    ({"cron": "61 * * * *"}, 400, "out of range"),
    ({"cron": "0 18 * *"}, 400, "4 fields; cron has 5"),
    ({"cron": "0 0 31 2 *"}, 400, "never fires"),
    ({"cron": "0 18 * * fri", "tz": "Mars/Olympus"}, 400, "Unknown time zone"),
    ({"at": "2001-01-01T00:00:00Z"}, 400, "in the past"),
    ({"at": "tomorrow"}, 400, "ISO 8601"),
    ({"every_s": 0.01}, 400, "every_s must be"),
    ({"every_s": 60, "cron": "* * * * *"}, 400, "exactly one of"),
    ({}, 400, "exactly one of"),
    ({"every_s": 60, "windows": [{"days": ["fri"], "from": "18:00", "to": "18:00"}]}, 400,
     "never open"),
    ({"every_s": 60, "windows": [{"days": ["fri"], "from": "18:00", "to": "23:00"},
                                 {"days": ["fri"], "from": "12:00", "to": "23:59",
                                  "exclude": True}]}, 400, "never open"),
    ({"every_s": 60, "windows": [{"days": [], "from": "18:00", "to": "23:00"}]}, 400,
     "days is empty"),
    ({"every_s": 60, "job": {"task": PING, "targets": ["sch-1"], "windows": []}}, 400,
     "go on the schedule"),
    ({"every_s": 60, "job": {"task": PING, "selector": "room="}}, 400, "a value is missing"),
    ({"every_s": 60, "job": {"task": PING, "targets": ["nobody"]}}, 404, "Unknown agent"),
    ({"every_s": 60, "job": {"task": PING}}, 400, "targets must be"),
    ({"every_s": 60, "job": {"task": PING, "targets": ["sch-1"], "wave": "150%"}}, 400,
     "percentage"),
    ({"every_s": 60, "job": {"cmd": "x", "targets": ["sch-1"]}}, 400, "task"),
    ({"every_s": 60, "when": "now"}, 400, "Unknown field 'when'"),
])
@pytest.mark.parametrize("nodes", ["sqlite"], indirect=True)  # the rules; both stores: above
def test_bad_schedules_are_refused_and_store_nothing(  # noqa: F811
        fleet: Fleet, body: dict[str, Any], status: int, words: str,  # noqa: F811
        nodes: list[RunningServer]) -> None:  # noqa: F811
    fleet.add("sch-1", poll=False)
    body.setdefault("job", {"task": PING, "targets": ["sch-1"]})
    got, answer = fleet.admin.call("POST", "/api/v1/schedules", body)
    assert got == status and answer["error"] is True and words in answer["msg"], answer
    assert fleet.admin.call("GET", "/api/v1/schedules")[1]["schedules"] == []
    assert fleet.admin.call("GET", "/api/v1/jobs")[1]["jobs"] == []


@pytest.mark.parametrize("nodes", ["sqlite"], indirect=True)  # the rules; both stores: above
def test_schedules_are_in_openapi(nodes: list[RunningServer]) -> None:  # noqa: F811
    status, _, raw = http("GET", nodes[0].url + "/openapi.json")
    assert status == 200
    paths = json.loads(raw)["paths"]
    assert {"get", "post"} <= set(paths["/api/v1/schedules"])
    assert {"get", "delete"} <= set(paths["/api/v1/schedules/{id}"])
    for tail in ("enable", "disable"):
        assert "post" in paths[f"/api/v1/schedules/{{id}}/{tail}"]
    assert "get" in paths["/api/v1/schedules/{id}/runs"]
