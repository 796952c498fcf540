"""The web client's enrollment pages in Debian's chromium against a real server: the pending
count in the navigation, accepting and rejecting machines (several at once), the lists of
earlier requests, enrollment tokens (shown once, revoked), and Revoke / Re-key on the agent page.

Machines ask to join the way dutagent does: POST /api/v1/enroll with a token, a credential of
their own and their facts."""
# The fixtures imported from web_support are requested by parameter name:
# ruff: noqa: F811

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from support import RunningServer, http
from web_support import (
    HOSTILE,
    PHONE,
    api,
    logged_in,
    open_page,
    screenshot,
    web,  # noqa: F401  (fixture)
    web_browser,  # noqa: F401  (fixture)
    web_server,  # noqa: F401  (fixture)
    web_token,  # noqa: F401  (fixture)
)

expect = pytest.importorskip(
    "playwright.sync_api", reason="the playwright Python package is not installed").expect

# The badge refreshes every 5 s; the lists every 3 s.
BADGE_WAIT_MS = 8000
LIST_WAIT_MS = 6000


def make_token(server: RunningServer, token: str, **fields: Any) -> dict[str, Any]:
    body = {"expires_s": 3600, "max_uses": None, "note": "web tests", **fields}
    return dict(api(server, token, "POST", "/api/v1/enrollment-tokens", body)["token"])


def ask_to_join(server: RunningServer, token: str, hostname: str,
                **extra: Any) -> tuple[int, str]:
    """A machine asks to join as dutagent does; returns (request id, its credential)."""
    credential = secrets.token_urlsafe(32)
    facts = {"hostname": hostname, "os": "Linux", "os_version": "Debian 13",
             "machine_id": f"mid-{hostname}"[:60], "macs": ["52:54:00:aa:bb:01"],
             "agent_version": "2.0.1", **extra.pop("facts", {})}
    status, _, data = http("POST", server.url + "/api/v1/enroll",
                           {"token": token, "credential": credential, "facts": facts, **extra})
    assert status == 202, data
    return int(json.loads(data)["enrollment"]["id"]), credential


def hello(server: RunningServer, name: str, credential: str, **body: Any) -> int:
    """What an agent says when it starts (the task types it runs): 200 while its credential
    works, 403 once it is revoked."""
    auth = "Basic " + base64.b64encode(f"{name}:{credential}".encode()).decode()
    status, _, _ = http("POST", server.url + "/api/v1/agent/hello", body,
                        headers={"Authorization": auth})
    return status


def enrollments(server: RunningServer, token: str, state: str) -> dict[str, dict[str, Any]]:
    found = api(server, token, "GET", f"/api/v1/enrollments?state={state}")["enrollments"]
    return {e["facts"].get("hostname", ""): e for e in found}


@pytest.fixture
def clean(web_server: RunningServer, web_token: str) -> Iterator[None]:
    """The shared server starts each test with nothing pending, and is left so."""
    def reject_all() -> None:
        for request in enrollments(web_server, web_token, "pending").values():
            api(web_server, web_token, "POST", f"/api/v1/enrollments/{request['id']}/reject")
    reject_all()
    yield
    reject_all()


# --- pending requests ------------------------------------------------------------------------

def test_admin_sees_the_count_accepts_two_at_once_and_rejects_one_without_reload(
        web_server: RunningServer, web_token: str, web: tuple[Any, Any], clean: None) -> None:
    page, watch = web
    api(web_server, web_token, "POST", "/api/v1/accounts",
        {"name": "enr-dup", "type": "agent", "password": "s" * 20})
    enrollment_token = make_token(web_server, web_token, note="lab PCs")
    secret = enrollment_token["token"]
    for host in ("enr-a.lab.example", "enr-b", "enr-c"):
        ask_to_join(web_server, secret, host)
    ask_to_join(web_server, secret, "enr-dup")

    logged_in(page, web_server, web_token)
    page.evaluate("window.__sameDocument = true")
    nav = page.get_by_role("navigation", name="Main")
    expect(nav.get_by_role("link", name="Enrollment (4 pending)")).to_be_visible()
    expect(nav.locator(".nav-count .count")).to_have_text("4")  # what the bubble shows

    # A machine asks while the admin looks at the dashboard: the count follows by itself.
    ask_to_join(web_server, secret, HOSTILE, facts={"os": HOSTILE})
    expect(nav.get_by_role("link", name="Enrollment (5 pending)")).to_be_visible(
        timeout=BADGE_WAIT_MS)

    nav.get_by_role("link", name="Enrollment (5 pending)").click()
    expect(page.get_by_role("heading", name="Enrollment")).to_be_visible()
    expect(page.get_by_role("link", name="Pending (5)")).to_be_visible()
    rows = page.locator("table.pending tbody tr")
    expect(rows).to_have_count(5)
    # What the machine says of itself, with the token it used and the name it would get.
    row_a = rows.filter(has_text="enr-a.lab.example")
    for fact in ("Linux Debian 13", "2.0.1", "mid-enr-a.lab.example", "52:54:00:aa:bb:01",
                 "127.0.0.1", "Agent", f"#{enrollment_token['id']} · lab PCs"):
        expect(row_a).to_contain_text(fact)
    expect(page.get_by_role("textbox", name="Name for enr-a.lab.example")).to_have_attribute(
        "placeholder", "enr-a")
    # The same name as an existing agent: flagged before anyone accepts it.
    expect(rows.filter(has_text="enr-dup").locator(".warn")).to_contain_text(
        "Possible duplicate of agent enr-dup")
    expect(rows.filter(has_text="enr-b").locator(".warn")).to_have_count(0)
    # Markup from a machine is shown as text.
    expect(rows.filter(has_text=HOSTILE)).to_have_count(1)

    accept_selected = page.get_by_role("button", name="Accept selected")
    expect(accept_selected).to_be_disabled()
    page.get_by_label("Select enr-a.lab.example", exact=True).check()
    page.get_by_label("Select enr-b", exact=True).check()
    page.get_by_role("textbox", name="Name for enr-b").fill("bench-b")
    expect(accept_selected).to_have_text("Accept selected (2)")
    accept_selected.click()

    done = page.get_by_role("status").filter(has_text="Accepted")
    expect(done).to_have_text("Accepted 2 machines; now agents enr-a, bench-b.")
    expect(rows).to_have_count(3)
    expect(page.get_by_role("link", name="Pending (3)")).to_be_visible()
    expect(nav.get_by_role("link", name="Enrollment (3 pending)")).to_be_visible()
    accepted = enrollments(web_server, web_token, "accepted")
    assert accepted["enr-a.lab.example"]["name"] == "enr-a"
    assert accepted["enr-b"]["name"] == "bench-b"
    agents = {a["name"] for a in api(web_server, web_token, "GET", "/api/v1/agents")["agents"]}
    assert {"enr-a", "bench-b"} <= agents

    page.get_by_role("button", name="Reject enr-c").click()
    dialog = page.locator("dialog[open]")
    expect(dialog).to_contain_text("Reject enr-c?")
    dialog.get_by_role("button", name="Reject").click()
    expect(page.get_by_role("status").filter(has_text="Rejected")).to_have_text(
        "Rejected 1 machine: enr-c.")
    expect(rows).to_have_count(2)
    expect(nav.get_by_role("link", name="Enrollment (2 pending)")).to_be_visible()
    assert "enr-c" in enrollments(web_server, web_token, "rejected")

    # Decided elsewhere (another admin, dutctl): the list follows without a reload.
    dup_id = enrollments(web_server, web_token, "pending")["enr-dup"]["id"]
    api(web_server, web_token, "POST", f"/api/v1/enrollments/{dup_id}/reject")
    ask_to_join(web_server, secret, "enr-late")
    expect(rows.filter(has_text="enr-dup")).to_have_count(0, timeout=LIST_WAIT_MS)
    expect(rows.filter(has_text="enr-late")).to_have_count(1, timeout=LIST_WAIT_MS)

    page.get_by_role("link", name="Accepted", exact=True).click()
    accepted_rows = page.locator("table.accepted tbody tr")
    expect(accepted_rows.filter(has_text="enr-a.lab.example").get_by_role(
        "link", name="enr-a")).to_have_attribute("href", "#/agent/enr-a")
    expect(accepted_rows.filter(has_text="enr-b")).to_contain_text("by admin")
    page.get_by_role("link", name="Rejected", exact=True).click()
    expect(page.locator("table.rejected tbody tr").filter(has_text="enr-c")).to_have_count(1)

    assert page.evaluate("window.__sameDocument") is True  # never reloaded
    assert watch.dialogs == []


def test_a_wrong_name_is_caught_before_anything_is_accepted(
        web_server: RunningServer, web_token: str, web: tuple[Any, Any], clean: None) -> None:
    page, _ = web
    secret = make_token(web_server, web_token)["token"]
    ask_to_join(web_server, secret, "enr-name")
    logged_in(page, web_server, web_token, "#/enroll")

    page.get_by_role("textbox", name="Name for enr-name").fill("no spaces please")
    page.get_by_role("button", name="Accept enr-name").click()

    expect(page.get_by_role("alert")).to_contain_text("a name is 1–64 letters")
    expect(page.locator("table.pending tbody tr")).to_have_count(1)
    assert "enr-name" in enrollments(web_server, web_token, "pending")


# --- tokens ----------------------------------------------------------------------------------

def test_admin_creates_a_token_sees_it_once_and_revokes_it(
        web_server: RunningServer, web_token: str, web: tuple[Any, Any], clean: None) -> None:
    page, watch = web
    page.context.grant_permissions(["clipboard-read", "clipboard-write"],
                                   origin=web_server.url)
    logged_in(page, web_server, web_token, "#/enroll/tokens")
    expect(page.get_by_role("heading", name="New token")).to_be_visible()

    page.get_by_label("Expires after").fill("12")
    page.get_by_label("Unit").select_option("hours")
    page.get_by_label("Maximum uses").fill("3")
    page.get_by_label("Note").fill("web token")
    page.get_by_label("Labels for the machines").fill("site=lab\nrack=3, owner")
    page.get_by_label("Accept machines with this token without asking").check()
    page.get_by_role("button", name="Create token").click()
    expect(page.get_by_role("alert")).to_contain_text('Not a label: "owner"')

    page.get_by_label("Labels for the machines").fill("site=lab\nrack=3, owner=qa")
    page.get_by_role("button", name="Create token").click()

    panel = page.locator(".new-token")
    expect(panel).to_contain_text("copy it now")
    secret = panel.locator("code.copyable").first.inner_text()
    assert secret.startswith("dutenr_") and len(secret) > 40
    expect(panel.locator("code.copyable").nth(1)).to_have_text(
        f"dutagent enroll {web_server.url} {secret}")
    panel.get_by_role("button", name="Copy: Token").click()
    expect(panel.get_by_text("Copied.")).to_be_visible()
    assert page.evaluate("navigator.clipboard.readText()") == secret

    listed = api(web_server, web_token, "GET", "/api/v1/enrollment-tokens")["tokens"]
    (mine,) = [t for t in listed if t["note"] == "web token"]
    assert mine["labels"] == {"site": "lab", "rack": "3", "owner": "qa"}
    assert mine["max_uses"] == 3 and mine["auto_accept"] is True
    row = page.locator(f"tr[data-token='{mine['id']}']")
    expect(row).to_contain_text("web token")
    expect(row).to_contain_text("active")
    expect(row).to_contain_text("0 / 3")
    expect(row).to_contain_text("in 11 h 59 min")
    expect(row.locator(".chips li")).to_have_text(["owner=qa", "rack=3", "site=lab"])
    expect(row).to_contain_text("yes")

    # A machine joins with it (accepted at once: auto-accept); the uses follow.
    ask_to_join(web_server, secret, "enr-tok-1")
    expect(row).to_contain_text("1 / 3", timeout=LIST_WAIT_MS)
    assert "enr-tok-1" in enrollments(web_server, web_token, "accepted")

    # Shown once: gone when hidden, and nowhere after a reload.
    panel.get_by_role("button", name="Done, hide it").click()
    expect(panel).to_have_count(0)
    assert secret not in page.content()
    page.reload()
    expect(row).to_contain_text("web token")
    assert secret not in page.content()

    row.get_by_role("button", name=f"Revoke token {mine['id']}").click()
    page.locator("dialog[open]").get_by_role("button", name="Revoke").click()
    expect(row.locator(".badge")).to_have_text("revoked")
    expect(row.get_by_role("button", name=f"Revoke token {mine['id']}")).to_have_count(0)
    status, _, _ = http("POST", web_server.url + "/api/v1/enroll", {
        "token": secret, "credential": secrets.token_urlsafe(32), "facts": {"hostname": "late"}})
    assert status == 403
    assert watch.dialogs == []


# --- the agent page --------------------------------------------------------------------------

def test_agent_page_shows_what_it_runs_and_re_keys_and_revokes_it(
        web_server: RunningServer, web_token: str, web: tuple[Any, Any], clean: None) -> None:
    page, _ = web
    secret = make_token(web_server, web_token, auto_accept=True, labels={"site": "lab"})["token"]
    _, credential = ask_to_join(web_server, secret, "enr-agent")
    capabilities = ["execute_cmd", "inventory", "readfile", "rekey"]
    assert hello(web_server, "enr-agent", credential, capabilities=capabilities) == 200
    logged_in(page, web_server, web_token, "#/agent/enr-agent")

    profile = page.locator(".agent-profile")
    expect(profile.get_by_role("list", name="Task types it runs").locator("li")).to_have_text(
        capabilities)
    expect(profile.get_by_role("list", name="Labels").locator("li")).to_have_text(["site=lab"])

    page.get_by_role("button", name="Re-key").click()
    dialog = page.locator("dialog[open]")
    expect(dialog).to_contain_text("Re-key enr-agent?")
    dialog.get_by_role("button", name="Re-key").click()
    expect(page.get_by_role("status").filter(has_text="Re-key")).to_contain_text(
        "Re-key requested (task #")
    tasks = api(web_server, web_token, "GET", "/api/v1/tasks?target=enr-agent")["tasks"]
    assert [t["type"] for t in tasks] == ["rekey"]

    page.get_by_role("button", name="Revoke").click()
    page.locator("dialog[open]").get_by_role("button", name="Revoke").click()
    expect(page.locator(".page-head .badge").filter(has_text="revoked")).to_be_visible()
    expect(page.get_by_role("button", name="Revoke")).to_be_hidden()
    expect(page.get_by_role("button", name="Re-key")).to_be_hidden()
    assert hello(web_server, "enr-agent", credential, capabilities=capabilities) == 403
    assert api(web_server, web_token, "GET", "/api/v1/agents/enr-agent")["agent"]["revoked"]


# --- phone width -----------------------------------------------------------------------------

def test_enrollment_pages_fit_a_phone(web_server: RunningServer, web_token: str,
                                      web_browser: Any, clean: None) -> None:
    secret = make_token(web_server, web_token, note="a note " * 20,
                        labels={f"label-{i}": "value" * 4 for i in range(6)})["token"]
    long_host = "a-very-long-host-name-that-goes-on-" * 3 + ".example.com"
    ask_to_join(web_server, secret, long_host, facts={"macs": ["52:54:00:aa:bb:0" + str(i)
                                                               for i in range(6)]})
    phone_id, _ = ask_to_join(web_server, secret, "enr-phone")
    ask_to_join(web_server, secret, "enr-phone-2")
    api(web_server, web_token, "POST", f"/api/v1/enrollments/{phone_id}/reject")
    context, page, watch = open_page(web_browser, PHONE)
    try:
        logged_in(page, web_server, web_token, "#/enroll")
        for route in ("#/enroll", "#/enroll/tokens", "#/enroll/rejected"):
            page.goto(f"{web_server.url}/{route}")
            expect(page.get_by_role("heading", name="Enrollment", exact=True)).to_be_visible()
            expect(page.locator("tbody tr").first).to_be_visible()
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= PHONE["width"], f"{route} is {width} px wide on a phone"
        nav = page.get_by_role("navigation", name="Main")
        assert page.evaluate("(n) => n.scrollWidth <= n.clientWidth", nav.element_handle()), \
            "the navigation needs sideways scrolling on a phone"
    except BaseException:
        screenshot(page, "enroll-phone")
        raise
    finally:
        context.close()
    assert not watch.errors
