"""The agent's per-platform code that can be exercised on Linux: the macOS/BSD `ps` path run for
real here, the Windows parsers fed with the output of the Windows tools, result fitting and the
backoff. These import cli/dutagent.py in-process; everything else runs it as a subprocess."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from types import ModuleType

import pytest
from agent_support import AGENT_PY


@pytest.fixture(scope="module")
def dutagent() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dutagent_under_test", AGENT_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ps_path_agrees_with_proc_path(dutagent: ModuleType) -> None:
    """macOS and the BSDs list processes with ps; procps' ps takes the same arguments."""
    sleeper = subprocess.Popen(["sleep", "4321"])
    try:
        by_ps = {p["id"]: p for p in dutagent.ps_processes()}
        by_proc = {p["id"]: p for p in dutagent.linux_processes()}
    finally:
        sleeper.kill()
        sleeper.wait()
    for pid in (sleeper.pid, os.getpid()):
        assert by_ps[pid] == by_proc[pid]
    assert by_ps[sleeper.pid]["cmdline"] == "sleep 4321"


def test_ps_output_with_spaces_in_names_and_arguments(dutagent: ModuleType) -> None:
    args_out = (
        "    1 root     /sbin/launchd\n"
        "  412 alice    /Applications/Google Chrome.app/Contents/MacOS/Google Chrome --flag\n"
        "  500 bob      \n"
    )
    comm_out = (
        "    1 /sbin/launchd\n"
        "  412 /Applications/Google Chrome.app/Contents/MacOS/Google Chrome\n"
        "  500 zsh\n"
    )
    assert dutagent.parse_ps_output(args_out, comm_out) == [
        {"id": 1, "name": "launchd", "user": "root", "cmdline": "/sbin/launchd"},
        {
            "id": 412,
            "name": "Google Chrome",
            "user": "alice",
            "cmdline": "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome --flag",
        },
        {"id": 500, "name": "zsh", "user": "bob", "cmdline": ""},
    ]


def test_windows_powershell_process_list(dutagent: ModuleType) -> None:
    # ConvertTo-Json -InputObject @(...) output of WINDOWS_PROCLIST_PS.
    text = json.dumps(
        [
            {"id": 0, "name": "System Idle Process", "user": "", "cmdline": ""},
            {
                "id": 4242,
                "name": "notepad.exe",
                "user": "PC1\\alice",
                "cmdline": '"C:\\Windows\\system32\\notepad.exe" C:\\notes.txt',
            },
        ]
    )
    procs = dutagent.parse_powershell_procs(json.loads(text))
    assert procs[1] == {
        "id": 4242,
        "name": "notepad.exe",
        "user": "PC1\\alice",
        "cmdline": '"C:\\Windows\\system32\\notepad.exe" C:\\notes.txt',
    }
    single = dutagent.parse_powershell_procs(
        {"id": 8, "name": "a.exe", "user": None, "cmdline": None}
    )
    assert single == [{"id": 8, "name": "a.exe", "user": "", "cmdline": ""}]


def test_windows_tasklist_fallback(dutagent: ModuleType) -> None:
    text = (
        '"System Idle Process","0","Services","0","8 K"\r\n'
        '"chrome.exe","1234","Console","1","150,000 K"\r\n'
    )
    assert dutagent.parse_tasklist_csv(text) == [
        {"id": 0, "name": "System Idle Process", "user": "", "cmdline": ""},
        {"id": 1234, "name": "chrome.exe", "user": "", "cmdline": ""},
    ]


def test_windows_query_user(dutagent: ModuleType) -> None:
    text = (
        " USERNAME              SESSIONNAME        ID  STATE   IDLE TIME  LOGON TIME\n"
        ">alice                 console             1  Active      none   1/2/2025 9:00 AM\n"
        " bob                                       2  Disc         1:05  1/2/2025 8:00 AM\n"
    )
    assert dutagent.parse_query_user(text) == ["alice", "bob"]


def test_proc_mounts_escapes(dutagent: ModuleType) -> None:
    assert dutagent.unescape_mount("/media/My\\040Disk") == "/media/My Disk"


def test_long_lists_are_cut_to_fit_the_result_limit(dutagent: ModuleType) -> None:
    contents = [
        {
            "name": f"file{i:05}",
            "dir": False,
            "fullpath": f"/d/file{i:05}",
            "size": i,
            "mtime": "2025-01-01T00:00:00Z",
        }
        for i in range(20000)
    ]
    body = dutagent.encode_result({"contents": contents}, 100_000)
    assert len(body) <= 100_000
    fitted = json.loads(body)
    assert fitted["truncated"] is True and 500 < len(fitted["contents"]) < 20000
    assert fitted["contents"][0] == contents[0]


def test_undecodable_file_names_survive_as_escapes(dutagent: ModuleType) -> None:
    name = b"caf\xe9.txt".decode(sys.getfilesystemencoding(), "surrogateescape")
    body = dutagent.encode_result({"contents": [{"name": name}]}, 1000)
    assert json.loads(body)["contents"][0]["name"] == name


def test_backoff_is_capped_exponential_with_full_jitter(dutagent: ModuleType) -> None:
    backoff = dutagent.Backoff(1.0, 60.0)
    for ceiling in [1, 2, 4, 8, 16, 32, 60, 60, 60]:
        assert 0 <= backoff.next_delay() <= ceiling
    backoff.reset()
    assert backoff.next_delay() <= 1
    # Full jitter: over many agents the delays spread over the whole window.
    spread = []
    for _ in range(2000):
        b = dutagent.Backoff(1.0, 60.0)
        b.failures = 10
        spread.append(b.next_delay())
    assert min(spread) < 3 and max(spread) > 57 and 25 < sum(spread) / len(spread) < 35
