"""The browser client in web/, driven in Debian's chromium against a real server and real agents."""
# The fixtures imported from web_support are requested by parameter name:
# ruff: noqa: F811

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support import RunningServer, http, wait_until
from web_support import (
    AGENT_SECRET,
    HOSTILE,
    HOSTILE_WORD,
    PHONE,
    Agents,
    ScriptedAgent,
    api,
    log_in,
    logged_in,
    open_page,
    screenshot,
    server_with,
    token_of,
    web,  # noqa: F401  (fixture)
    web_agents,  # noqa: F401  (fixture)
    web_browser,  # noqa: F401  (fixture)
    web_server,  # noqa: F401  (fixture)
    web_token,  # noqa: F401  (fixture)
)

expect = pytest.importorskip(
    "playwright.sync_api", reason="the playwright Python package is not installed").expect

# Each agent runs in a directory named after it, so this command tells them apart:
# lab-3 prints something else and fails, the others agree.
SPLIT_COMMAND = 'if [ "${PWD##*/}" = lab-3 ]; then echo odd one; exit 3; fi; echo same text'


# --- sessions ------------------------------------------------------------------------------

def test_login_logout_and_the_token_stays_out_of_urls(
        web_server: RunningServer, web_agents: Agents, web: tuple[Any, Any]) -> None:
    page, watch = web
    web_agents.start("login-1")
    response = page.goto(web_server.url + "/")
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    background = "getComputedStyle(document.body).backgroundColor"
    page.emulate_media(color_scheme="dark")
    dark = page.evaluate(background)
    page.emulate_media(color_scheme="light")
    assert dark != page.evaluate(background)  # follows the system's dark/light setting

    page.get_by_label("User").fill("admin")
    page.get_by_label("Password").fill("wrong-password")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_have_text("Wrong user name or password.")

    page.get_by_label("Password").fill("adminpass1")
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("[data-agent='login-1']")).to_contain_text("online")
    token = token_of(page)
    assert token and len(token) == 64
    page.get_by_role("link", name="login-1").click()
    expect(page.get_by_role("heading", name="login-1")).to_be_visible()

    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("button", name="Log in")).to_be_visible()
    expect(page.get_by_role("status")).to_have_text("You are logged out.")
    assert token_of(page) is None
    status, _, _ = http("GET", web_server.url + "/api/v1/session", headers={"Authorization": token})
    assert status == 401  # the server ended the session, not just the page
    assert not [u for u in watch.urls if token in u or "adminpass1" in u]


def test_expired_session_returns_to_login_and_back_to_the_same_page(
        tmp_path: Path, web: tuple[Any, Any]) -> None:
    page, _ = web
    # lab-1 stays offline: the agent page polls its state all the same.
    srv = server_with(tmp_path, "--session-max-s", "2", agents=["lab-1"])
    try:
        log_in(page, srv)
        page.get_by_role("link", name="lab-1").click()
        expect(page.get_by_role("heading", name="lab-1")).to_be_visible()

        # The agent page re-reads the agent every 2 s; the session dies 2 s after login.
        expect(page.get_by_text("Your session expired, please log in again")).to_be_visible(
            timeout=6000)
        assert token_of(page) is None
        page.get_by_label("User").fill("admin")
        page.get_by_label("Password").fill("adminpass1")
        page.get_by_role("button", name="Log in").click()
        expect(page.get_by_role("heading", name="lab-1")).to_be_visible()
    finally:
        srv.stop()


# --- dashboard -----------------------------------------------------------------------------

def test_dashboard_groups_agents_and_follows_online_state_without_reload(
        web_server: RunningServer, web_agents: Agents, web: tuple[Any, Any]) -> None:
    page, _ = web
    web_agents.start("dash-1", "dash-2")
    web_agents.register("dash-3")
    web_agents.register("solo")
    logged_in(page, web_server, web_agents.token)

    dash = page.locator("section.group[data-group='dash']")
    expect(dash.locator(".group-count")).to_have_text("2 / 3 online")
    expect(page.locator("section.group[data-group='(no group)']")).to_contain_text("solo")
    expect(page.locator("[data-agent='dash-3']")).to_contain_text("offline")

    web_agents.start("dash-3", register=False)
    expect(page.locator("[data-agent='dash-3']")).to_contain_text("online", timeout=2500)
    expect(dash.locator(".group-count")).to_have_text("3 / 3 online")

    web_agents.stop("dash-1")
    expect(page.locator("[data-agent='dash-1'] .state")).to_have_text("offline", timeout=4000)
    expect(page.locator("[data-agent='dash-1'] .seen")).to_contain_text("last seen")

    dash.get_by_role("button", name="dash").click()  # collapse
    expect(page.locator("[data-agent='dash-2']")).to_have_count(0)
    page.get_by_label("Filter agents").fill("dash-2")
    expect(page.locator("[data-agent='dash-2']")).to_be_visible()
    expect(page.locator("[data-agent='solo']")).to_have_count(0)


# --- one agent -----------------------------------------------------------------------------

def test_run_a_command_and_see_exit_code_output_errors_and_duration(
        web_server: RunningServer, web_agents: Agents, web: tuple[Any, Any]) -> None:
    page, _ = web
    web_agents.start("cmd-1")
    logged_in(page, web_server, web_agents.token, "#/agent/cmd-1")

    page.get_by_role("textbox", name="Command").fill("echo hello; echo oops >&2; exit 3")
    page.get_by_role("textbox", name="Command").press("Enter")
    card = page.locator(".result-card").first
    expect(card.locator(".badge")).to_have_text("exit 3")
    expect(card.locator("pre").first).to_have_text("hello\n")
    expect(card.locator("pre.stderr")).to_have_text("oops\n")
    expect(card.locator("header .muted").first).to_have_text(re.compile(r"^\d+(\.\d+)? (ms|s)$"))

    # Keyboard only: ↑ recalls the last command, arrow keys move between the tabs.
    page.get_by_role("textbox", name="Command").fill("")
    page.get_by_role("textbox", name="Command").press("ArrowUp")
    expect(page.get_by_role("textbox", name="Command")).to_have_value(
        "echo hello; echo oops >&2; exit 3")
    page.get_by_role("tab", name="Command").focus()
    page.keyboard.press("ArrowRight")
    expect(page.get_by_role("tab", name="Processes")).to_be_focused()
    expect(page.get_by_role("tab", name="Processes")).to_have_attribute("aria-selected", "true")
    expect(page.locator("table.procs tbody tr").first).to_be_visible(timeout=10000)
    assert page.url.endswith("#/agent/cmd-1/processes")  # a reload comes back to this tab


def test_upload_then_download_gives_back_the_same_bytes_and_rename_delete_confirm(
        web_server: RunningServer, web_agents: Agents, web: tuple[Any, Any], tmp_path: Path) -> None:
    page, watch = web
    home = web_agents.start("files-1")["files-1"]
    payload = os.urandom(300_000) + b"\x00\xff end"
    local = tmp_path / "upload.bin"
    local.write_bytes(payload)
    logged_in(page, web_server, web_agents.token, "#/agent/files-1/files")
    page.get_by_role("textbox", name="Folder").fill(str(home))
    page.get_by_role("button", name="Open", exact=True).click()
    expect(page.get_by_text(f"{home}: 0 entries")).to_be_visible()

    page.locator("input[type=file]").set_input_files(str(local))
    expect(page.locator("tr[data-name='upload.bin']")).to_be_visible(timeout=10000)
    assert (home / "upload.bin").read_bytes() == payload

    with page.expect_download() as info:
        page.get_by_role("button", name="Download upload.bin").click()
    saved = tmp_path / "downloaded.bin"
    info.value.save_as(saved)
    assert info.value.suggested_filename == "upload.bin"
    assert saved.read_bytes() == payload

    page.get_by_role("button", name="Rename upload.bin").click()
    dialog = page.locator("dialog[open]")
    dialog.get_by_label("New name").fill("renamed.bin")
    dialog.get_by_role("button", name="Rename").click()
    expect(page.locator("tr[data-name='renamed.bin']")).to_be_visible()
    assert (home / "renamed.bin").read_bytes() == payload and not (home / "upload.bin").exists()

    page.get_by_role("button", name="Delete renamed.bin").click()
    expect(dialog.get_by_role("button", name="Cancel")).to_be_focused()  # a stray Enter is safe
    page.keyboard.press("Escape")
    expect(dialog).to_have_count(0)
    assert (home / "renamed.bin").exists()
    page.get_by_role("button", name="Delete renamed.bin").click()
    expect(dialog).to_contain_text("This cannot be undone")
    dialog.get_by_role("button", name="Delete").click()
    expect(page.locator("tr[data-name='renamed.bin']")).to_have_count(0)
    assert not (home / "renamed.bin").exists()

    too_big = tmp_path / "big.bin"
    too_big.write_bytes(b"x" * 800_000)
    page.locator("input[type=file]").set_input_files(str(too_big))
    expect(page.get_by_role("alert")).to_contain_text("big.bin is 781 KB")
    assert not (home / "big.bin").exists()
    assert watch.dialogs == []  # confirmations are in the page, never native dialogs


# --- many agents ---------------------------------------------------------------------------

def test_broadcast_to_a_group_shows_each_result_and_a_grouped_summary(
        web_server: RunningServer, web_agents: Agents, web: tuple[Any, Any]) -> None:
    page, _ = web
    web_agents.start("lab-1", "lab-2", "lab-3", "other-1")
    logged_in(page, web_server, web_agents.token)

    page.get_by_label("Select all shown agents of group lab").check()
    expect(page.locator(".selection-bar")).to_contain_text("3 agents selected")
    page.get_by_role("link", name="Run a command on them").click()
    page.get_by_role("textbox", name="Command").fill(SPLIT_COMMAND)
    page.get_by_role("button", name="Run on 3 agents").click()

    expect(page.get_by_text("3 / 3 finished")).to_be_visible(timeout=10000)
    groups = page.locator(".result-group")
    expect(groups).to_have_count(2)
    expect(groups.nth(0).locator("summary")).to_contain_text("2 agents: exit 0, same output")
    expect(groups.nth(1).locator("summary")).to_contain_text("1 agent: exit 3")
    expect(groups.nth(1).locator("summary")).to_contain_text("odd one")

    groups.nth(0).locator("summary").click()
    expect(groups.nth(0).locator(".chips li")).to_have_text(["lab-1", "lab-2"])
    expect(groups.nth(0).locator("pre")).to_have_text("same text\n")
    rows = page.locator("table.per-agent tbody tr")
    expect(rows).to_have_count(3)
    expect(page.locator("table.per-agent tr[data-agent='lab-3']")).to_contain_text("odd one")
    expect(page.locator("table.per-agent")).not_to_contain_text("other-1")


def test_two_thousand_agents_render_and_the_page_stays_responsive(
        tmp_path: Path, web_browser: Any) -> None:
    names = [f"rack{i % 20:02d}-pc{i}" for i in range(2000)]
    srv = server_with(tmp_path, agents=names)
    context, page, watch = open_page(web_browser)
    pool = None
    try:
        page.goto(srv.url + "/")
        # Long tasks (main thread busy > 50 ms) from the first render on, refreshes included.
        page.evaluate("""() => { window.__longest = 0; new PerformanceObserver((list) => {
            for (const e of list.getEntries()) window.__longest = Math.max(window.__longest, e.duration);
        }).observe({ type: "longtask" }); }""")
        page.get_by_label("User").fill("admin")
        page.get_by_label("Password").fill("adminpass1")
        page.get_by_role("button", name="Log in").click()
        expect(page.locator(".totals")).to_have_text("0 / 2000 online")
        expect(page.locator("section.group")).to_have_count(20)
        expect(page.locator(".agent-row")).to_have_count(0)  # collapsed: no rows built yet
        pool = Agents(srv, tmp_path / "agents", token_of(page))
        pool.start("rack07-pc7", register=False)
        expect(page.locator(".totals")).to_have_text("1 / 2000 online", timeout=2500)
        page.get_by_role("button", name="Expand all").click()
        expect(page.locator(".agent-row")).to_have_count(2000)
        expect(page.locator("[data-agent='rack07-pc7'] .state")).to_have_text("online")
        page.get_by_label("Filter agents").fill("pc1999")
        expect(page.locator(".agent-row")).to_have_count(1)
        page.get_by_label("Filter agents").fill("")
        expect(page.locator(".agent-row")).to_have_count(2000)
        longest = page.evaluate("window.__longest")
        print(f"2000 agents: longest main-thread task {longest:.0f} ms")
        assert longest < 500, f"the page froze for {longest:.0f} ms"
    except BaseException:
        screenshot(page, "test_two_thousand_agents")
        raise
    finally:
        context.close()
        if pool:
            pool.stop_all()
        srv.stop()
    assert not watch.errors


# --- hostile data --------------------------------------------------------------------------

def test_hostile_output_and_file_names_from_the_real_agent_are_text(
        web_server: RunningServer, web_agents: Agents, web: tuple[Any, Any]) -> None:
    page, watch = web
    home = web_agents.start("xss-1", "xss-2")["xss-1"]
    (home / HOSTILE).write_text("x")
    (home / f"dir {HOSTILE}").mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", HOSTILE])
    try:
        logged_in(page, web_server, web_agents.token, "#/agent/xss-1")
        page.get_by_role("textbox", name="Command").fill(f"echo '{HOSTILE}'; echo '{HOSTILE}' >&2")
        page.get_by_role("button", name="Run").click()
        expect(page.locator(".result-card pre").first).to_have_text(HOSTILE + "\n")
        expect(page.locator(".result-card pre.stderr")).to_have_text(HOSTILE + "\n")

        page.get_by_role("tab", name="Files").click()
        page.get_by_role("textbox", name="Folder").fill(str(home))
        page.get_by_role("button", name="Open", exact=True).click()
        expect(page.locator("td.name").get_by_text(HOSTILE, exact=True)).to_be_visible()
        expect(page.get_by_role("button", name=f"Open folder dir {HOSTILE}")).to_be_visible()

        page.get_by_role("tab", name="Processes").click()
        page.get_by_label("Filter processes").fill("onerror")
        expect(page.locator("td.cmdline").filter(has_text=HOSTILE).first).to_be_visible(
            timeout=10000)

        page.get_by_role("tab", name="History").click()
        expect(page.locator("td.what").filter(has_text=HOSTILE).first).to_be_visible()

        page.goto(web_server.url + "/#/")
        page.get_by_label("Select all shown agents of group xss").check()
        page.get_by_role("link", name="Run a command on them").click()
        page.get_by_role("textbox", name="Command").fill(f"echo '{HOSTILE}'")
        page.get_by_role("button", name="Run on 2 agents").click()
        summary = page.locator(".result-group summary")
        expect(summary).to_contain_text("2 agents: exit 0, same output")
        expect(summary.locator(".preview")).to_have_text(HOSTILE)

        assert page.locator("img").count() == 0  # markup was never parsed
        assert watch.dialogs == []
    finally:
        sleeper.kill()
        sleeper.wait()


def hostile_answer(task: dict[str, Any]) -> Any:
    """Every field a scripted agent controls, with markup and the wrong types."""
    kind = task["type"]
    if kind == "execute_cmd":
        return {"status_code": HOSTILE, "output": {"html": HOSTILE}, "stderr": 5,
                "duration_s": HOSTILE, "truncated": HOSTILE}
    if kind == "proclist":
        return {"procs": [{"id": HOSTILE, "name": HOSTILE, "user": HOSTILE, "cmdline": [HOSTILE]},
                          "not a process", None]}
    if kind == "dircontents":
        return {"contents": [{"name": HOSTILE, "dir": HOSTILE, "fullpath": 7, "size": HOSTILE,
                              "mtime": HOSTILE}, {"name": {"x": HOSTILE}, "dir": False}, 3]}
    if kind == "inventory":
        return {"hostname": HOSTILE, "os": {"name": HOSTILE}, "cpu_count": HOSTILE,
                "disks": HOSTILE, "networks": [{"name": HOSTILE, "addresses": HOSTILE}],
                "users": [HOSTILE], HOSTILE: HOSTILE}
    return {"error": True, "msg": HOSTILE}


def test_a_hostile_agent_cannot_inject_markup_or_break_the_page(
        web_server: RunningServer, web_agents: Agents, web: tuple[Any, Any]) -> None:
    page, watch = web
    web_agents.register("evil-1")
    web_agents.register("evil-2")
    evil = [ScriptedAgent(web_server, name, hostile_answer, f"dutagent/{HOSTILE_WORD} x")
            for name in ("evil-1", "evil-2")]
    for agent in evil:
        agent.start()
    try:
        wait_until(lambda: web_agents.online() >= {"evil-1", "evil-2"})
        logged_in(page, web_server, web_agents.token)
        expect(page.locator("[data-agent='evil-1'] .version")).to_have_text(HOSTILE_WORD)

        page.goto(web_server.url + "/#/agent/evil-1")
        expect(page.locator(".agent-facts")).to_contain_text(f"agent {HOSTILE_WORD}")
        page.get_by_role("textbox", name="Command").fill("anything")
        page.get_by_role("button", name="Run").click()
        expect(page.locator(".result-card .badge")).to_have_text(f"exit {HOSTILE}")
        expect(page.locator(".result-card pre").first).to_have_text(
            json.dumps({"html": HOSTILE}, separators=(",", ":")))

        page.get_by_role("tab", name="Processes").click()
        expect(page.locator("table.procs td.name").first).to_have_text(HOSTILE)

        page.get_by_role("tab", name="Files").click()
        expect(page.get_by_role("button", name=f"Open folder {HOSTILE}")).to_be_visible()

        page.get_by_role("tab", name="Inventory").click()
        page.get_by_role("button", name="Collect inventory now").click()
        expect(page.locator(".inventory dd").first).to_have_text(HOSTILE)
        expect(page.locator(".inventory dt").get_by_text(HOSTILE)).to_be_visible()

        page.goto(web_server.url + "/#/")
        page.get_by_label("Select all shown agents of group evil").check()
        page.get_by_role("link", name="Run a command on them").click()
        page.get_by_role("textbox", name="Command").fill("anything")
        page.get_by_role("button", name="Run on 2 agents").click()
        expect(page.locator(".result-group summary")).to_contain_text(
            f"2 agents: exit {HOSTILE}, same output")

        page.goto(web_server.url + "/#/admin/tasks")
        page.get_by_role("button", name="Apply").click()
        page.locator("table.tasks").get_by_role("button", name="Details").first.click()
        expect(page.locator(".task-details pre").last).to_contain_text(HOSTILE)

        assert page.locator("img, svg").count() == 0
        assert watch.dialogs == []
    finally:
        for agent in evil:
            agent.stop()


# --- administration ------------------------------------------------------------------------

def test_admin_accounts_self_registration_audit_and_task_filters(
        web_server: RunningServer, web_token: str, web: tuple[Any, Any]) -> None:
    page, watch = web
    token = web_token
    logged_in(page, web_server, token)
    page.get_by_role("link", name="Admin").click()

    page.get_by_label("Name").fill("operator")
    page.get_by_label("Password or agent secret").fill("short")
    page.get_by_role("button", name="Create account").click()
    expect(page.get_by_role("alert")).to_contain_text("at least 8 characters")
    page.get_by_label("Password or agent secret").fill("operator-pass-1")
    page.get_by_role("button", name="Create account").click()
    expect(page.locator("tr[data-account='operator']")).to_contain_text("admin")
    assert http("POST", web_server.url + "/login", {"user": "operator", "pass": "operator-pass-1"})[0] == 200

    page.get_by_role("button", name="Change the password of operator").click()
    page.locator("dialog[open] input").fill("operator-pass-2")
    page.locator("dialog[open]").get_by_role("button", name="Change").click()
    wait_until(lambda: http("POST", web_server.url + "/login",
                            {"user": "operator", "pass": "operator-pass-2"})[0] == 200)

    page.get_by_role("button", name="Remove operator").click()
    page.locator("dialog[open]").get_by_role("button", name="Remove").click()
    expect(page.locator("tr[data-account='operator']")).to_have_count(0)

    page.get_by_role("link", name="Self-registration").click()
    switch = page.get_by_label("Agents may register themselves")
    expect(switch).to_be_enabled()
    expect(switch).not_to_be_checked()
    switch.check()
    expect(page.get_by_text("Saved: self-registration is on.")).to_be_visible()
    status, _, body = http("GET", web_server.url + "/agent_selfreg",
                           headers={"Authorization": token})
    assert (status, body.strip()) == (200, b"1")

    page.get_by_role("link", name="Audit log").click()
    audit = page.locator("table.audit")
    expect(audit).to_contain_text("account_remove")
    expect(audit).to_contain_text("operator")

    api(web_server, token, "POST", "/api/v1/accounts",
        {"name": "adm-1", "type": "agent", "password": AGENT_SECRET})
    api(web_server, token, "POST", "/api/v1/tasks",
        {"targets": ["adm-1"], "task": {"type": "execute_cmd", "cmd": "echo queued"}})
    page.get_by_role("link", name="Task history").click()
    page.get_by_role("searchbox", name="Agent").fill("adm-1")
    page.get_by_label("State").select_option("done")
    page.get_by_role("button", name="Apply").click()
    expect(page.get_by_text("No tasks match.")).to_be_visible()
    page.get_by_label("State").select_option("queued")
    page.get_by_role("button", name="Apply").click()
    expect(page.locator("table.tasks tbody tr:not(.task-details)")).to_have_count(1)
    expect(page.locator("table.tasks")).to_contain_text("echo queued")
    assert watch.dialogs == []


# --- phone width ---------------------------------------------------------------------------

PHONE_ROUTES = [
    ("#/", "Agents"), ("#/agent/phone-1", "phone-1"), ("#/agent/phone-1/files", "phone-1"),
    ("#/agent/phone-1/history", "phone-1"), ("#/broadcast", "Run a command on many agents"),
    ("#/admin/accounts", "Administration"), ("#/admin/audit", "Administration"),
]


def test_pages_fit_a_phone_screen_without_sideways_scrolling(
        web_server: RunningServer, web_agents: Agents, web_browser: Any) -> None:
    web_agents.start("phone-1")
    context, page, watch = open_page(web_browser, PHONE)
    try:
        logged_in(page, web_server, web_agents.token)
        page.get_by_label("Select phone-1").check()
        page.goto(f"{web_server.url}/#/agent/phone-1")
        page.get_by_role("textbox", name="Command").fill("seq 1 3; echo " + "long-line-" * 40)
        page.get_by_role("button", name="Run").click()
        page.locator(".result-card").wait_for()
        for route, heading in PHONE_ROUTES:
            page.goto(f"{web_server.url}/{route}")
            expect(page.get_by_role("heading", name=heading, exact=True)).to_be_visible()
            expect(page.locator(".loading, [aria-busy=true]")).to_have_count(0)
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= PHONE["width"], f"{route} is {width} px wide on a {PHONE['width']} px phone"
    except BaseException:
        screenshot(page, "phone")
        raise
    finally:
        context.close()
    assert not watch.errors


# --- pure logic, run in the browser ----------------------------------------------------------

def test_path_helpers_handle_posix_and_windows_paths(
        web_server: RunningServer, web: tuple[Any, Any]) -> None:
    page, _ = web
    page.goto(web_server.url + "/")
    result = page.evaluate("""async () => {
        const { joinPath, parentOf } = await import('./files.js');
        const cases = ['/', '/etc', '/etc/ssh/', 'C:\\\\', 'C:\\\\Users', 'C:\\\\Users\\\\me\\\\', ''];
        return { parents: cases.map(parentOf),
                 joined: [joinPath('/', 'a'), joinPath('/etc', 'a'), joinPath('C:\\\\', 'a'),
                          joinPath('C:\\\\Users', 'a')] };
    }""")
    assert result["parents"] == [None, "/", "/etc", "", "C:\\", "C:\\Users", None]
    assert result["joined"] == ["/a", "/etc/a", "C:\\a", "C:\\Users\\a"]
