"""The browser client in web/, driven in Debian's chromium against a real server and real agents:
login and sessions, the dashboard (up to 2,000 agents), administration, phone width.
Working with agents (commands, files, broadcast, hostile data) is in test_web_agents.py."""
# The fixtures imported from web_support are requested by parameter name:
# ruff: noqa: F811

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support import RunningServer, http, wait_until
from web_support import (
    AGENT_SECRET,
    PHONE,
    Agents,
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

# --- many agents ---------------------------------------------------------------------------

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
