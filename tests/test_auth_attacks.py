"""Auth attacks not covered elsewhere: the shape and randomness of session tokens, and agent
credentials never passing for a session. (That a wrong name costs what a wrong password costs is
asserted by counting the work, not timing it: test_core_auth.py.)

(Bans, expiry, logout and cross-agent tasks are in test_fixes.py and test_classic_api.py.)"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from urllib.parse import urlencode

import pytest
from support import RunningServer, basic, http, start_server

SECRET = "attack-agent-secret-0123"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    # Bans off: the test measures many failures on purpose.
    server = start_server(tmp_path_factory.mktemp("attacks"), "--ban-failures", "100000",
                          "--ban-address-failures", "100000")
    server.add_account("pc1", "agent", SECRET)
    yield server
    server.stop()


def test_session_tokens_are_long_random_and_distinct(srv: RunningServer) -> None:
    tokens = [srv.login() for _ in range(20)]
    assert len(set(tokens)) == 20
    for token in tokens:
        assert re.fullmatch(r"[0-9a-f]{64}", token), token
    # Random 256-bit tokens: two of them agree in about 4 of 64 hex places, never in most.
    for a, b in zip(tokens, tokens[1:]):
        assert sum(x == y for x, y in zip(a, b)) < 20, (a, b)
    # Every hex digit shows up across the tokens at every position range (no fixed parts).
    for start in range(0, 64, 16):
        assert len({c for t in tokens for c in t[start:start + 16]}) == 16


@pytest.mark.parametrize("form", ["basic", "bare", "bearer"])
def test_agent_credentials_never_pass_for_a_session(srv: RunningServer, form: str) -> None:
    value = {"basic": basic("pc1", SECRET)["Authorization"], "bare": f"pc1:{SECRET}",
             "bearer": f"Bearer pc1:{SECRET}"}[form]
    assert http("GET", f"{srv.url}/tasks", headers={"Authorization": value})[0] in (
        (200,) if form != "bearer" else (403,))
    for method, path in (("GET", "/api/v1/session"), ("GET", "/api/v1/tasks"),
                         ("GET", "/agents"), ("POST", "/tasks?target=pc1&timeout=0.1"),
                         ("GET", "/api/v1/accounts"), ("POST", "/agent_selfreg?enabled=1")):
        body = b'{"type": "ping"}' if method == "POST" else None
        status, _, raw = http(method, f"{srv.url}{path}", body, {"Authorization": value})
        assert status in (401, 403), (form, path, status, raw)
        assert json.loads(raw)["error"] is True
    # And no login either: the agent's secret is not a password.
    status, _, _ = http("GET", f"{srv.url}/login?" + urlencode({"user": "pc1", "pass": SECRET}))
    assert status == 403
