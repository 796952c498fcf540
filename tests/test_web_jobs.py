"""The web client's Jobs pages in Debian's chromium against a real server: a job started from
the form with a selector previewed live, its pause on the failure budget and its continuation
with a click, result buckets and a re-run, the list kept fresh, a refused action told, a job of
10,000 targets shown a page at a time, labels edited on the agent page, and a phone's width.

Agents are protocol-level (support.PollingAgent) and answer execute_cmd by their name: *bad-*
exit 1 with "disk full" on stderr, the others print hello and exit 0."""
# The fixtures imported from web_support are requested by parameter name:
# ruff: noqa: F811

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from support import PollingAgent, RunningServer, http, start_server, wait_until
from web_support import (
    AGENT_SECRET,
    PHONE,
    api,
    logged_in,
    open_page,
    screenshot,
    web,  # noqa: F401  (fixture)
    web_browser,  # noqa: F401  (fixture)
)

expect = pytest.importorskip(
    "playwright.sync_api", reason="the playwright Python package is not installed").expect

LAPTOP = {"width": 1366, "height": 768}
JOB_WAIT_MS = 15000  # a rollout through real polls; the page refreshes every 1.5 s


def reply(name: str) -> Any:
    def answer(task: dict[str, Any]) -> dict[str, Any]:
        if "bad-" in name:
            return {"status_code": 1, "output": "", "stderr": "disk full\n"}
        return {"status_code": 0, "output": f"hello from {task.get('cmd')}\n", "stderr": ""}
    return answer


class Fleet:
    """Agent accounts on the shared server, labelled, some of them polling."""

    def __init__(self, server: RunningServer, token: str) -> None:
        self.server = server
        self.token = token
        self.agents: list[PollingAgent] = []

    def add(self, *names: str, labels: dict[str, str] | None = None, poll: bool = True) -> None:
        for name in names:
            api(self.server, self.token, "POST", "/api/v1/accounts",
                {"name": name, "type": "agent", "password": AGENT_SECRET})
            if labels:
                api(self.server, self.token, "PUT", f"/api/v1/agents/{name}/labels",
                    {"labels": labels})
            if poll:
                self.agents.append(PollingAgent(self.server.url, name, AGENT_SECRET,
                                                reply(name)).start())
        polling = {a.name for a in self.agents} & set(names)
        wait_until(lambda: all(self.job_api("GET", f"/api/v1/agents/{n}")["agent"]["online"]
                               for n in polling), timeout_s=10)

    def job_api(self, method: str, path: str, body: Any = None) -> Any:
        return api(self.server, self.token, method, path, body)

    def job(self, **body: Any) -> int:
        body.setdefault("task", {"type": "execute_cmd", "cmd": "true"})
        return int(self.job_api("POST", "/api/v1/jobs", body)["job"]["id"])

    def stop(self) -> None:
        for agent in self.agents:
            agent.stop()


@pytest.fixture(scope="module")
def web_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server of this module's own, not the session's shared one: jobs take task ids in
    blocks above those of plain submits, and the SQLite history's look-ups then miss the
    plain tasks submitted after them (a server bug, see test_dutctl_jobs.py), which the other
    modules' tests of the history would see."""
    server = start_server(tmp_path_factory.mktemp("web-jobs"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def web_token(web_server: RunningServer) -> str:
    return web_server.login()


@pytest.fixture
def fleet(web_server: RunningServer, web_token: str) -> Iterator[Fleet]:
    f = Fleet(web_server, web_token)
    yield f
    f.stop()


def state_badge(page: Any) -> Any:
    return page.locator(".job-page .page-head .badge")


# --- a job from the form, to its end ---------------------------------------------------------

def test_a_job_from_the_form_pauses_on_its_budget_and_continues_with_a_click(
        web_server: RunningServer, web: tuple[Any, Any], fleet: Fleet) -> None:
    page, watch = web
    # In name order the canary is the two bad ones: they exceed a budget of 1 at once.
    fleet.add("wj1-bad-1", "wj1-bad-2", "wj1-good-1", "wj1-good-2", "wj1-late-1", "wj1-late-2",
              labels={"room": "wj1", "os": "Linux"})
    fleet.add("wj1-other", labels={"room": "elsewhere"}, poll=False)
    logged_in(page, web_server, fleet.token, "#/")
    page.evaluate("window.__sameDocument = true")

    page.get_by_role("navigation", name="Main").get_by_role("link", name="Jobs").click()
    expect(page.get_by_role("heading", name="Jobs", exact=True)).to_be_visible()
    page.get_by_role("link", name="New job").click()
    expect(page.get_by_role("heading", name="New job")).to_be_visible()

    # A malformed selector: the server's words under the field, pointing at the bad part.
    selector = page.get_by_role("textbox", name="Selector")
    selector.fill("room=wj1,os=")
    field_error = page.locator("#selector-error")
    expect(field_error).to_have_text("Invalid selector at character 12 ('='): a value is "
                                     'missing (quote one with spaces: os="windows 11")')
    expect(selector).to_have_attribute("aria-invalid", "true")
    # Fixed: the preview follows as one types, with the count and the first names.
    selector.fill("room=wj1,os=linux")
    preview = page.locator("#selector-preview")
    expect(preview.locator(".match-count")).to_have_text("6 agents match")
    expect(preview.locator(".chips li")).to_have_text(
        ["wj1-bad-1", "wj1-bad-2", "wj1-good-1", "wj1-good-2", "wj1-late-1", "wj1-late-2"])
    expect(field_error).to_be_hidden()
    selector.fill("room=nowhere-wj1")
    expect(field_error).to_contain_text("matches no agent")
    selector.fill("room=wj1")
    expect(preview.locator(".match-count")).to_have_text("6 agents match")

    page.get_by_label("Command", exact=True).fill("uname -r")
    page.get_by_label("Canary (agents or %)").fill("2")
    page.get_by_label("Then waves of (agents or %)").fill("2")
    page.get_by_label("Failure budget (agents or %)").fill("1")
    page.get_by_role("button", name="Start job").click()

    heading = page.get_by_role("heading", name=re.compile(r"^Job #\d+$"))
    expect(heading).to_be_visible()
    job_id = int(heading.inner_text().split("#")[1])
    assert page.url.endswith(f"#/jobs/{job_id}")
    expect(page.locator(".job-task")).to_contain_text("uname -r")

    # The budget stops it after the canary, and the page follows by itself.
    expect(state_badge(page)).to_have_text("paused", timeout=JOB_WAIT_MS)
    expect(page.locator(".job-reason")).to_have_text(
        "failure budget exceeded: 2 failed (budget 1); nothing more is sent until resumed")
    expect(page.locator(".budget-line")).to_have_text("2 failed of a budget of 1 — exceeded")
    waves = page.get_by_role("list", name="Waves").locator("li")
    expect(waves).to_have_count(3)
    expect(waves.nth(0)).to_contain_text("done 2")
    expect(waves.nth(2)).to_contain_text("not sent yet")
    expect(page.get_by_role("button", name="Pause")).to_be_hidden()
    expect(page.get_by_role("button", name="Resume")).to_be_hidden()  # it would stop again
    expect(page.get_by_role("button", name="Abort")).to_be_visible()
    bucket = page.locator("article.bucket")
    expect(bucket).to_have_count(1)
    expect(bucket).to_contain_text("2 agents")
    expect(bucket.locator("pre")).to_have_text("[stderr]\ndisk full")

    page.get_by_role("button", name="Continue despite failures").click()
    expect(page.get_by_role("status").filter(has_text="Continuing")).to_have_text(
        "Continuing despite failures: the budget no longer stops it.")
    expect(state_badge(page)).to_have_text("done", timeout=JOB_WAIT_MS)
    expect(page.locator(".job-page .progress-line")).to_contain_text("6 / 6 finished")
    expect(page.locator(".budget-line")).to_have_text("2 failed (no failure budget)")
    for name in ("Pause", "Resume", "Continue despite failures", "Abort"):
        expect(page.get_by_role("button", name=name, exact=True)).to_be_hidden()

    # The buckets: largest first, each with its example, its agents folded away.
    expect(bucket).to_have_count(2)
    expect(bucket.nth(0).locator("header")).to_contain_text("4 agents")
    expect(bucket.nth(0).locator("header")).to_contain_text("exit 0")
    expect(bucket.nth(0).locator("pre")).to_have_text("hello from uname -r")
    expect(bucket.nth(1).locator("header")).to_contain_text("exit 1")
    expect(bucket.nth(1).locator("header .badge").filter(has_text="failed")).to_be_visible()
    failed_agents = bucket.nth(1).locator(".bucket-agents li")
    expect(failed_agents.first).to_be_hidden()
    bucket.nth(1).get_by_text("Show the 2 agents").click()
    expect(failed_agents).to_have_text(["wj1-bad-1", "wj1-bad-2"])
    rows = page.locator("table.job-targets-table tbody tr")
    expect(rows).to_have_count(6)
    expect(rows.filter(has_text="wj1-bad-2")).to_contain_text("exit 1: disk full")
    expect(page.get_by_text("Agents 1–6 of 6")).to_be_visible()

    # Run it again on the failed ones: a new job, its page shown.
    page.get_by_role("button", name="Re-run on the failed (2)").click()
    dialog = page.locator("dialog[open]")
    expect(dialog).to_contain_text("Run it again on 2 agents?")
    dialog.get_by_role("button", name="Re-run").click()
    expect(page.get_by_role("heading", name=f"Job #{job_id + 1}")).to_be_visible()
    expect(page.locator("table.job-targets-table tbody tr")).to_have_count(2)
    expect(state_badge(page)).to_have_text("done", timeout=JOB_WAIT_MS)
    assert page.evaluate("window.__sameDocument") is True  # never reloaded
    assert watch.dialogs == []


# --- the list, actions, a refused one --------------------------------------------------------

def test_the_list_follows_jobs_and_a_refused_action_is_told(
        web_server: RunningServer, web: tuple[Any, Any], fleet: Fleet) -> None:
    page, watch = web
    fleet.add("wj2-off", poll=False)  # never polls: its job keeps running
    first = fleet.job(targets=["wj2-off"], task={"type": "execute_cmd", "cmd": "sleep 1"})
    logged_in(page, web_server, fleet.token, "#/jobs")
    row = page.locator(f"tr[data-job='{first}']")
    expect(row.locator(".badge").first).to_have_text("running")
    expect(row).to_contain_text("sleep 1")
    expect(row).to_contain_text("0 / 1 finished")
    expect(row).to_contain_text("by admin")

    # Changed elsewhere (dutctl, another admin): the list follows without a reload.
    fleet.job_api("POST", f"/api/v1/jobs/{first}/abort")
    expect(row.locator(".badge").first).to_have_text("aborted")
    second = fleet.job(targets=["wj2-off"])
    expect(page.locator("table.jobs tbody tr").first).to_have_attribute("data-job", str(second))
    page.get_by_label("State").select_option("aborted")
    expect(page.locator(f"tr[data-job='{second}']")).to_have_count(0)
    expect(row).to_be_visible()

    page.get_by_label("State").select_option("")
    page.locator(f"tr[data-job='{second}']").get_by_role("link", name=f"#{second}").click()
    expect(state_badge(page)).to_have_text("running")
    pause = page.get_by_role("button", name="Pause")
    expect(pause).to_be_visible()
    # Someone pauses it while this page still shows it running (its refresh held back): the
    # click is refused (409) and the page says so, then shows the job as it is.
    stale = json.loads(http("GET", f"{web_server.url}/api/v1/jobs/{second}",
                            headers={"Authorization": fleet.token})[2])
    page.route(f"**/api/v1/jobs/{second}", lambda route: route.fulfill(json=stale)
               if route.request.method == "GET" else route.continue_())
    fleet.job_api("POST", f"/api/v1/jobs/{second}/pause")
    pause.click()
    expect(page.get_by_role("alert").filter(has_text="cannot be paused")).to_have_text(
        f"Job {second} is paused: it cannot be paused. The job changed meanwhile; its current "
        "state is shown.")
    page.unroute(f"**/api/v1/jobs/{second}")
    expect(state_badge(page)).to_have_text("paused")
    expect(page.locator(".job-reason")).to_have_text("paused by admin")
    page.get_by_role("button", name="Resume").click()
    expect(state_badge(page)).to_have_text("running")
    page.get_by_role("button", name="Abort").click()
    dialog = page.locator("dialog[open]")
    expect(dialog).to_contain_text(f"Abort job #{second}?")
    dialog.get_by_role("button", name="Abort job").click()
    expect(state_badge(page)).to_have_text("aborted")
    expect(page.get_by_role("button", name="Abort")).to_be_hidden()
    task = fleet.job_api("GET", "/api/v1/tasks?ids=" + ",".join(
        str(t["task_id"]) for t in fleet.job_api(
            "GET", f"/api/v1/jobs/{second}/targets")["targets"]))["tasks"]
    assert [t["state"] for t in task] == ["cancelled"]
    assert watch.dialogs == []


# --- labels on the agent page ----------------------------------------------------------------

def test_labels_are_edited_on_the_agent_page_and_selectors_find_them(
        web_server: RunningServer, web: tuple[Any, Any], fleet: Fleet) -> None:
    page, _ = web
    fleet.add("wj3-pc", poll=False)
    logged_in(page, web_server, fleet.token, "#/agent/wj3-pc")
    profile = page.locator(".agent-profile")
    expect(profile).to_contain_text("Labels")
    expect(profile).to_contain_text("none")
    page.get_by_role("button", name="Edit labels").click()
    labels = page.get_by_role("textbox", name="Labels")
    labels.fill("room=wj3\nrack 4")
    page.get_by_role("button", name="Save labels").click()
    expect(page.get_by_role("alert")).to_contain_text('Not a label: "rack 4"')
    labels.fill("room=wj3\nrack=4, owner=<b>qa</b>")
    page.get_by_role("button", name="Save labels").click()
    expect(profile.get_by_role("list", name="Labels").locator("li")).to_have_text(
        ["owner=<b>qa</b>", "rack=4", "room=wj3"])
    expect(labels).to_be_hidden()
    assert fleet.job_api("GET", "/api/v1/agents/wj3-pc")["agent"]["labels"] == {
        "room": "wj3", "rack": "4", "owner": "<b>qa</b>"}

    page.goto(f"{web_server.url}/#/jobs/new")
    page.get_by_role("textbox", name="Selector").fill("room=wj3,rack in (3,4)")
    expect(page.locator("#selector-preview .match-count")).to_have_text("1 agent match")
    expect(page.locator("#selector-preview .chips li")).to_have_text(["wj3-pc"])


def test_a_job_to_agents_picked_by_name_with_another_task_type(
        web_server: RunningServer, web: tuple[Any, Any], fleet: Fleet) -> None:
    page, _ = web
    fleet.add("wj5-a", "wj5-b", "wj5-c", poll=False)
    logged_in(page, web_server, fleet.token, "#/jobs/new")
    page.get_by_role("radio", name="Agents picked by name").check()
    page.get_by_role("searchbox", name="Filter agents").fill("wj5-")
    picks = page.get_by_role("list", name="Agents").locator("li")
    expect(picks).to_have_count(3)
    expect(picks.first).to_contain_text("offline")
    page.get_by_role("checkbox", name="wj5-a").check()
    page.get_by_role("checkbox", name="wj5-c").check()
    expect(page.get_by_text("2 agents picked")).to_be_visible()
    page.get_by_label("What to run").select_option("other")
    page.get_by_label("Task type", exact=True).fill("ping")
    page.get_by_label("Fields (a JSON object)").fill("[1]")
    page.get_by_label("Between waves", exact=True).select_option("manual")
    page.get_by_label("Offline agents").select_option("skip")
    page.get_by_role("button", name="Start job").click()
    expect(page.get_by_role("alert")).to_have_text('Fields: a JSON object, like {"path": "/tmp"}.')
    page.get_by_label("Fields (a JSON object)").fill('{"n": 2}')
    page.get_by_role("button", name="Start job").click()
    heading = page.get_by_role("heading", name=re.compile(r"^Job #\d+$"))
    expect(heading).to_be_visible()
    job = fleet.job_api("GET", f"/api/v1/jobs/{heading.inner_text().split('#')[1]}")["job"]
    assert job["task"] == {"type": "ping", "n": 2} and job["targets"] == 2
    assert job["offline"] == "skip" and job["pause_s"] == "manual"
    # Both offline and skipped: the job ends at once, nothing sent.
    expect(state_badge(page)).to_have_text("done", timeout=JOB_WAIT_MS)
    expect(page.locator("table.job-targets-table tbody tr")).to_have_text(
        [re.compile(r"wj5-a\s*1\s*skipped"), re.compile(r"wj5-c\s*1\s*skipped")])


def test_schedules_are_listed_switched_and_deleted_and_a_window_is_told(
        web_server: RunningServer, web: tuple[Any, Any], fleet: Fleet) -> None:
    page, watch = web
    fleet.add("wj6-pc", labels={"room": "wj6"}, poll=False)
    made = fleet.job_api("POST", "/api/v1/schedules", {
        "name": "Friday updates", "cron": "0 18 * * fri", "tz": "Europe/Paris",
        "windows": [{"days": ["fri"], "from": "18:00", "to": "23:00"}],
        "job": {"task": {"type": "execute_cmd", "cmd": "apt-get -y upgrade"},
                "selector": "room=wj6", "canary": 1}})["schedule"]
    sid = made["id"]
    logged_in(page, web_server, fleet.token, "#/jobs")
    page.get_by_role("navigation", name="Jobs and schedules").get_by_role(
        "link", name="Schedules").click()
    expect(page.get_by_role("heading", name="Schedules")).to_be_visible()
    row = page.locator(f"tr[data-schedule='{sid}']")
    expect(row).to_contain_text("Friday updates")
    expect(row).to_contain_text("cron 0 18 * * fri (Europe/Paris)")
    expect(row).to_contain_text("apt-get -y upgrade → room=wj6")
    expect(row).to_contain_text("only fri 18:00–23:00")
    expect(row).to_contain_text("never")
    expect(row).to_contain_text("(in ")

    row.get_by_role("button", name=f"Disable schedule {sid}").click()
    expect(row.locator(".badge").filter(has_text="off")).to_be_visible()
    assert fleet.job_api("GET", f"/api/v1/schedules/{sid}")["schedule"]["enabled"] is False
    row.get_by_role("button", name=f"Enable schedule {sid}").click()
    expect(row.locator(".badge").filter(has_text="off")).to_have_count(0)
    row.get_by_role("button", name=f"Delete schedule {sid}").click()
    page.locator("dialog[open]").get_by_role("button", name="Delete").click()
    expect(row).to_have_count(0)
    assert all(x["id"] != sid for x in fleet.job_api("GET", "/api/v1/schedules")["schedules"])

    # A job outside its window: the page says when it opens, and nothing is sent.
    start = datetime.now(timezone.utc) + timedelta(hours=2)  # noqa: UP017
    span = (f"{start:%H:%M}", f"{start + timedelta(hours=1):%H:%M}")
    job_id = fleet.job(targets=["wj6-pc"], tz="UTC",
                       windows=[{"days": ["sat"], "from": "00:00", "to": "01:00", "exclude": True},
                                {"from": span[0], "to": span[1]}])
    page.goto(f"{web_server.url}/#/jobs/{job_id}")
    expect(page.locator(".window-line")).to_contain_text(
        "Outside its maintenance window: nothing is delivered until ")
    expect(page.locator(".job-facts")).to_contain_text(
        f"not sat 00:00–01:00, {span[0]}–{span[1]} (UTC)")
    fleet.job_api("POST", f"/api/v1/jobs/{job_id}/abort")
    assert watch.dialogs == []


# --- a big job -------------------------------------------------------------------------------

def test_a_job_of_10000_targets_is_shown_a_page_at_a_time(web_browser: Any,
                                                          tmp_path: Path) -> None:
    server = start_server(tmp_path)
    try:
        token = server.login()
        headers = {"Authorization": token}

        def add(i: int) -> None:
            status, _, body = http("POST", f"{server.url}/api/v1/accounts",
                                   {"name": f"big-{i:05d}", "type": "agent",
                                    "password": AGENT_SECRET}, headers)
            assert status == 201, body
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(add, range(10_000)))
        # Selectors see new accounts once the server's account cache has them.
        wait_until(lambda: api(server, token, "GET", "/api/v1/selector?selector=name%3Dbig-*")
                   ["count"] == 10_000, timeout_s=10, interval_s=0.2)
        job_id = api(server, token, "POST", "/api/v1/jobs", {
            "task": {"type": "execute_cmd", "cmd": "true"}, "selector": "name=big-*",
            "canary": 100, "wave": "5%"})["job"]["id"]

        context, page, watch = open_page(web_browser, LAPTOP)
        try:
            logged_in(page, server, token, f"#/jobs/{job_id}")
            rows = page.locator("table.job-targets-table tbody tr")
            expect(rows).to_have_count(50)
            expect(page.get_by_text("Agents 1–50 of 10000")).to_be_visible()
            expect(rows.first).to_contain_text("big-00000")
            # 21 waves: those far from the current one summed up, so the list stays short.
            waves = page.get_by_role("list", name="Waves").locator("li")
            expect(waves.first).to_contain_text("Wave 1")
            expect(waves.first).to_contain_text("queued 100")
            expect(waves.filter(has_text="Waves 4–20")).to_contain_text("not sent yet")
            assert waves.count() <= 6
            next_page = page.get_by_role("button", name="Next →")
            for _ in range(3):
                started = time.monotonic()
                next_page.click()
                expect(rows.first).not_to_contain_text(rows.first.inner_text())
                assert time.monotonic() - started < 2
            expect(page.get_by_text("Agents 151–200 of 10000")).to_be_visible()
            expect(rows.first).to_contain_text("big-00150")
            page.get_by_role("button", name="← Previous").click()
            expect(page.get_by_text("Agents 101–150 of 10000")).to_be_visible()
            expect(rows.first).to_contain_text("big-00100")
            # A page of the job is a few hundred elements, whatever its size.
            assert page.evaluate("document.querySelectorAll('*').length") < 1500
            page.goto(f"{server.url}/#/jobs")
            expect(page.locator(f"tr[data-job='{job_id}']")).to_contain_text("0 / 10000 finished")
        except BaseException:
            screenshot(page, "jobs-10000")
            raise
        finally:
            context.close()
        assert not watch.errors
    finally:
        server.stop()


# --- a phone ---------------------------------------------------------------------------------

def test_jobs_pages_fit_a_phone(web_server: RunningServer, web_browser: Any,
                                fleet: Fleet) -> None:
    names = [f"wj4-a-very-long-agent-name-for-a-phone-{i}" for i in range(3)]
    fleet.add(*names[:2], labels={"room": "wj4"})
    fleet.add("wj4-bad-1", labels={"room": "wj4"})
    job_id = fleet.job(selector="room=wj4", canary=1, max_failures=0, task={
        "type": "execute_cmd", "cmd": "cat /a/very/long/path/" + "x" * 120})
    wait_until(lambda: fleet.job_api("GET", f"/api/v1/jobs/{job_id}")["job"]["state"]
               in ("paused", "done"), timeout_s=10)
    for viewport, label in ((PHONE, "phone"), (LAPTOP, "laptop")):
        context, page, watch = open_page(web_browser, viewport)
        try:
            logged_in(page, web_server, fleet.token, "#/jobs")
            expect(page.locator(f"tr[data-job='{job_id}']")).to_be_visible()
            screenshot(page, f"jobs-list-{label}")
            page.goto(f"{web_server.url}/#/jobs/{job_id}")
            expect(page.locator("article.bucket").first).to_be_visible()
            expect(page.locator("table.job-targets-table tbody tr")).to_have_count(3)
            screenshot(page, f"job-page-{label}")
            page.goto(f"{web_server.url}/#/jobs/new")
            page.get_by_role("textbox", name="Selector").fill("room=wj4")
            expect(page.locator("#selector-preview .match-count")).to_have_text("3 agents match")
            screenshot(page, f"job-new-{label}")
            if viewport is PHONE:
                for route in ("#/jobs", f"#/jobs/{job_id}", "#/jobs/new"):
                    page.goto(f"{web_server.url}/{route}")
                    page.locator("main h1").wait_for()
                    page.wait_for_timeout(300)
                    width = page.evaluate("document.documentElement.scrollWidth")
                    assert width <= PHONE["width"], f"{route} is {width} px wide on a phone"
                nav = page.get_by_role("navigation", name="Main")
                assert page.evaluate("(n) => n.scrollWidth <= n.clientWidth",
                                     nav.element_handle()), "the navigation scrolls on a phone"
        except BaseException:
            screenshot(page, f"jobs-{label}-failed")
            raise
        finally:
            context.close()
        assert not watch.errors
