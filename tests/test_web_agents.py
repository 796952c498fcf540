"""The browser client in web/ working with agents: a command, files, one command on many agents,
and hostile data from the real agent and from a scripted one. Driven in Debian's chromium
against a real server and real `cli/dutagent.py` agents (fixtures in web_support.py)."""
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
from agent_support import SPLIT_COMMAND
from support import RunningServer, wait_until
from web_support import (
    HOSTILE,
    HOSTILE_WORD,
    Agents,
    ScriptedAgent,
    logged_in,
    web,  # noqa: F401  (fixture)
    web_agents,  # noqa: F401  (fixture)
    web_browser,  # noqa: F401  (fixture)
    web_server,  # noqa: F401  (fixture)
    web_token,  # noqa: F401  (fixture)
)

expect = pytest.importorskip(
    "playwright.sync_api", reason="the playwright Python package is not installed").expect


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
