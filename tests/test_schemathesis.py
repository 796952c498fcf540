"""Schemathesis against the server's own /openapi.json: every route, with and without a session.

No generated request may get a 5xx (schemathesis' not_a_server_error check); the server keeps
answering and the admin session survives the run. SCHEMATHESIS_EXAMPLES sets the examples per
operation (default 40; the coverage phase adds its own boundary cases on top).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import ROOT, RunningServer, http, start_server

# The run's own admin. Schemathesis reuses names it saw in answers: it removes "admin" (which
# the operator may do; removing itself is 409) and would change the operator's own password,
# so the authenticated run leaves out password changes (test_fuzz.py covers that route).
OPERATOR = ("st-operator-q7x2", "st-operator-pass-q7x2")
EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "25"))  # ~70 operations now
ST = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin" / "st"
pytestmark = pytest.mark.skipif(not ST.exists() and shutil.which("st") is None,
                                reason="schemathesis is not installed (pip install schemathesis)")


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    # Bans off: thousands of bad credentials are the point; short waits so nothing blocks.
    server = start_server(tmp_path_factory.mktemp("st"),
                          "--ban-failures", "1000000", "--ban-address-failures", "1000000",
                          "--poll-timeout-s", "0.3", "--submit-timeout-s", "0.3",
                          "--submit-timeout-max-s", "0.5")
    server.add_account(OPERATOR[0], "admin", OPERATOR[1])
    yield server
    server.stop()


def run_schemathesis(srv: RunningServer, *extra: str) -> subprocess.CompletedProcess[str]:
    st = str(ST) if ST.exists() else "st"
    return subprocess.run(
        [st, "run", f"{srv.url}/openapi.json", "--checks", "not_a_server_error",
         "--phases", "coverage,fuzzing", "--max-examples", str(EXAMPLES), "--workers", "1",
         # One worker: with several threads, schemathesis 4.32 on CPython 3.11 now and then
         # dies of its own "Runtime Error" (SystemError: AST constructor recursion depth
         # mismatch, in hypothesis' strategy validation). /logout would end the session.
         "--exclude-path", "/logout", "--warnings", "off", *extra],
        capture_output=True, text=True, timeout=55, cwd=ROOT,
        env=dict(os.environ, SCHEMATHESIS_TELEMETRY="false", NO_COLOR="1"),
    )


def generated_cases(output: str) -> int:
    for line in output.splitlines():
        if "generated" in line and "passed" in line:
            return int(line.split()[0])
    raise AssertionError(f"no summary line in:\n{output[-2000:]}")


def test_no_route_answers_5xx_with_a_session(srv: RunningServer) -> None:
    token = srv.login(*OPERATOR)
    proc = run_schemathesis(srv, "--header", f"Authorization: {token}",
                            "--exclude-path-regex", "/password$")
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    cases = generated_cases(proc.stdout)
    assert cases >= 100, proc.stdout[-2000:]
    print(f"schemathesis: {cases} cases")
    # The run was authenticated all along, and the server is still fine.
    status, _, body = http("GET", f"{srv.url}/api/v1/session", headers={"Authorization": token})
    assert status == 200 and json.loads(body)["user"] == OPERATOR[0], body
    assert "Traceback" not in srv.output(), srv.output()[-3000:]


def test_no_route_answers_5xx_without_a_session(srv: RunningServer) -> None:
    proc = run_schemathesis(srv)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    cases = generated_cases(proc.stdout)
    assert cases >= 100, proc.stdout[-2000:]
    print(f"schemathesis: {cases} cases")
    assert http("GET", f"{srv.url}/healthz")[0] == 200
    assert "Traceback" not in srv.output(), srv.output()[-3000:]
