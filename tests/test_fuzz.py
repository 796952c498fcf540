"""Hypothesis fuzzing of every parser of the server, through HTTP against one real server.

Authorization headers, query values, task/result/account bodies and names in paths: whatever a
client sends, the server answers below 500 (except the documented 503 full queue and 504
submit timeout), every error is the JSON error shape, and the server still answers afterwards.

FUZZ_EXAMPLES sets the number of examples per fuzz test (default 120: about 2,000 requests, ~25 s).
"""

from __future__ import annotations

import base64
import http.client as httpclient
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote, quote_from_bytes

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import PollingAgent, RunningServer, basic, http, start_server, wait_until
from test_error_shape import assert_error

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "120"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
# Logins cost an argon2 hash each (~50 ms): fewer of them keep the module fast.
FUZZ_LOGIN = settings(FUZZ, max_examples=max(10, EXAMPLES // 3))
REQUEST_TIMEOUT_S = 10.0
AGENT, AGENT_SECRET = "fz-agent", "fz-agent-secret-0123"
PROTECTED_NAMES = {"admin", AGENT}
# The only 5xx answers the contract allows for a request a client may send.
DOCUMENTED_5XX = {503: "Task queue is full", 504: "Time out"}


@dataclass
class Fuzzed:
    srv: RunningServer
    token: str
    final_task_id: int
    agent: PollingAgent


@pytest.fixture(scope="module")
def fz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    # Bans off (huge limits): thousands of bad credentials from 127.0.0.1 are the point here,
    # and a ban would only hide the parsers behind 429. Short waits so no example blocks long.
    srv = start_server(tmp_path_factory.mktemp("fuzz"),
                       "--ban-failures", "1000000", "--ban-address-failures", "1000000",
                       "--poll-timeout-s", "0.3", "--submit-timeout-s", "0.3",
                       "--submit-timeout-max-s", "0.5", "--body-max-bytes", "65536")
    srv.add_account(AGENT, "agent", AGENT_SECRET)
    token = srv.login()
    # A task already cancelled, so that ?wait_s= on it answers at once whatever wait_s says.
    status, _, body = http("POST", f"{srv.url}/api/v1/tasks",
                           {"targets": [AGENT], "task": {"type": "ping"}},
                           {"Authorization": token})
    assert status == 202, body
    task_id = json.loads(body)["tasks"][0]["id"]
    status, _, body = http("POST", f"{srv.url}/api/v1/tasks/{task_id}/cancel", b"",
                           {"Authorization": token})
    assert status == 200, body
    # A live agent answering everything, so blocking submits with valid bodies return at once.
    agent = PollingAgent(srv.url, AGENT, AGENT_SECRET).start()
    try:
        yield Fuzzed(srv, token, task_id, agent)
    finally:
        agent.stop()
        srv.stop()


def send(srv: RunningServer, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection, with header values exactly as given (latin-1)."""
    conn = httpclient.HTTPConnection("127.0.0.1", srv.port, timeout=REQUEST_TIMEOUT_S)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value.encode("latin-1"))
        conn.putheader("Content-Length", str(len(body or b"")))
        conn.endheaders(body or b"")
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def check(answer: tuple[int, dict[str, str], bytes]) -> int:
    """The invariants every fuzzed answer keeps; returns the status."""
    status, headers, body = answer
    if status >= 500:
        assert status in DOCUMENTED_5XX, (status, body[:300])
        assert DOCUMENTED_5XX[status] in assert_error(status, headers, body, status)
    elif status >= 400:
        assert_error(status, headers, body, status)
    return status


def q(value: str | bytes) -> str:
    """Percent-encodes any text or bytes (also invalid UTF-8) into a query value."""
    return quote_from_bytes(value, safe="") if isinstance(value, bytes) else quote(value, safe="")


# --- strategies --------------------------------------------------------------------------------

# Header values: printable latin-1 (http.client refuses CR/LF; the HTTP parser refuses other
# controls with a 400 before the app runs, see test_control_characters_…).
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                                    exclude_characters="\x7f"), max_size=200)
name_secret = st.tuples(st.text(max_size=40), st.text(max_size=60))
auth_values = st.one_of(
    header_text,
    st.builds(lambda b: "Basic " + base64.b64encode(b).decode(), st.binary(max_size=120)),
    st.builds(lambda t: "Basic " + t, header_text),
    st.builds(lambda ns: "Basic " + base64.b64encode(f"{ns[0]}:{ns[1]}".encode()).decode(),
              name_secret),
    st.builds(lambda ns: "".join(c for c in f"{ns[0]}:{ns[1]}".encode().decode("latin-1")
                                 if c.isprintable() or c == " "), name_secret),
    st.builds(lambda t: "Bearer " + t, header_text),
    st.builds(lambda h: h, st.text("0123456789abcdef", min_size=60, max_size=70)),
    st.sampled_from(["Basic", "Basic ", "Bearer", "Bearer ", ":", f"{AGENT}:", f":{AGENT_SECRET}",
                     "Basic " + base64.b64encode(f"{AGENT}:".encode()).decode(),
                     "Basic ====", "Basic \u00ff\u00fe"]),
)
query_value = st.one_of(
    st.text(max_size=40), st.binary(max_size=20),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "0", "-1", "1e309", "nan", "inf", "-inf", "0x10", "1_000", " 5 ",
                     "1,2,3", ",", "1,,2", "９", "1.5", "true", "null", "[]"]),
)
# Text without lone surrogates: a surrogate in a task type is a known server bug, tested on
# its own (test_lone_surrogate_in_task_type_is_400_not_500); hypothesis text has none anyway.
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80),
                         st.floats(allow_nan=False), st.text(max_size=30))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=12), inner, max_size=5)),
    max_leaves=20)
raw_bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.sampled_from([b"", b"{", b"[" * 5000, b"{\"type\":", b"\xff\xfe{}", b"NaN", b"Infinity",
                     b"{\"type\": NaN}", b"{\"a\":1,\"a\":2}", b"\"type\"",
                     b"1" * 5000, b"{\"type\": \"x\"}" + b" " * 70000]),
)
task_fields = st.dictionaries(
    st.sampled_from(["type", "id", "cmd", "target", "timeout_s", "x"]), json_values, max_size=5)
task_bodies = st.one_of(raw_bodies, task_fields.map(lambda d: json.dumps(d).encode()),
                        task_fields.map(lambda d: json.dumps({**d, "type": "ping"}).encode()))
native_submit = st.fixed_dictionaries({}, optional={
    "targets": st.one_of(json_values, st.lists(st.sampled_from([AGENT, "nobody", ""]), max_size=3)),
    "task": st.one_of(json_values, task_fields),
    "expires_s": st.one_of(json_values, st.floats(), st.integers()),
}).map(lambda d: json.dumps(d).encode())
account_bodies = st.fixed_dictionaries({}, optional={
    "name": st.one_of(json_values, st.text(max_size=70)),
    "type": st.one_of(json_values, st.sampled_from(["admin", "agent", "root", ""])),
    "password": st.one_of(json_values, st.text(max_size=40)),
}).map(lambda d: json.dumps(d).encode())
names = st.one_of(st.text(st.characters(codec="utf-8"), max_size=80), st.binary(max_size=40),
                  st.text("abcXYZ019._-", min_size=1, max_size=70),
                  st.sampled_from(["..", ".", "%", "a/b", "a%2Fb", " ", "\x00", "🙂" * 30]))


def name_path(name: str | bytes) -> str:
    return q(name) or "%20"


# --- tests -------------------------------------------------------------------------------------

AUTH_ROUTES = [("GET", "/tasks"), ("GET", "/agents"), ("GET", "/api/v1/session"),
               ("GET", "/api/v1/tasks?limit=1"), ("GET", "/agent_selfreg"),
               ("POST", "/tasks_result?id=1"), ("GET", "/api/v1/agents?inventory=0")]


@FUZZ
@given(value=auth_values, route=st.sampled_from(AUTH_ROUTES))
def test_authorization_header_values(fz: Fuzzed, value: str, route: tuple[str, str]) -> None:
    method, path = route
    status = check(send(fz.srv, method, path, b"{}" if method == "POST" else None,
                        {"Authorization": value}))
    # A random header never authenticates (the token is 64 random hex digits).
    assert status != 200 or value.strip() in (fz.token, "Bearer " + fz.token), (value, status)


@FUZZ_LOGIN
@given(user=query_value, password=query_value, method=st.sampled_from(["GET", "POST"]))
def test_login_query_values(fz: Fuzzed, user: str | bytes, password: str | bytes,
                            method: str) -> None:
    query = f"user={q(user)}&pass={q(password)}"
    if method == "GET":
        status = check(send(fz.srv, "GET", "/login?" + query))
    else:
        status = check(send(fz.srv, "POST", "/login", query.encode(),
                            {"Content-Type": "application/x-www-form-urlencoded"}))
    assert status in (400, 403, 429), status


@FUZZ
@given(target=query_value, timeout=query_value, body=task_bodies)
def test_blocking_submit_query_and_body(fz: Fuzzed, target: str | bytes, timeout: str | bytes,
                                        body: bytes) -> None:
    check(send(fz.srv, "POST", f"/tasks?target={q(target)}&timeout={q(timeout)}", body,
               {"Authorization": fz.token}))


@FUZZ
@given(timeout=query_value, body=task_bodies)
def test_blocking_submit_to_a_live_agent(fz: Fuzzed, timeout: str | bytes, body: bytes) -> None:
    check(send(fz.srv, "POST", f"/tasks?target={AGENT}&timeout={q(timeout)}", body,
               {"Authorization": fz.token}))


@FUZZ
@given(task_id=query_value, body=task_bodies, path=st.sampled_from(["/tasks_result",
                                                                    "/task_result"]))
def test_result_id_and_body(fz: Fuzzed, task_id: str | bytes, body: bytes, path: str) -> None:
    check(send(fz.srv, "POST", f"{path}?id={q(task_id)}", body, basic(AGENT, AGENT_SECRET)))


@FUZZ
@given(params=st.dictionaries(
    st.sampled_from(["state", "limit", "before_id", "ids", "target", "submitted_by"]),
    query_value, max_size=6))
def test_task_history_query_values(fz: Fuzzed, params: dict[str, str | bytes]) -> None:
    query = "&".join(f"{k}={q(v)}" for k, v in params.items())
    check(send(fz.srv, "GET", "/api/v1/tasks?" + query, None, {"Authorization": fz.token}))


@FUZZ
@given(params=st.dictionaries(st.sampled_from(["limit", "before_id"]), query_value, max_size=2),
       wait_s=query_value)
def test_audit_and_task_view_query_values(fz: Fuzzed, params: dict[str, str | bytes],
                                          wait_s: str | bytes) -> None:
    query = "&".join(f"{k}={q(v)}" for k, v in params.items())
    check(send(fz.srv, "GET", "/api/v1/audit?" + query, None, {"Authorization": fz.token}))
    start = time.monotonic()
    check(send(fz.srv, "GET", f"/api/v1/tasks/{fz.final_task_id}?wait_s={q(wait_s)}", None,
               {"Authorization": fz.token}))
    assert time.monotonic() - start < 2, "wait_s on a final task must answer at once"


@FUZZ
@given(body=st.one_of(native_submit, raw_bodies))
def test_native_submit_bodies(fz: Fuzzed, body: bytes) -> None:
    check(send(fz.srv, "POST", "/api/v1/tasks", body, {"Authorization": fz.token}))


@FUZZ
@given(body=st.one_of(account_bodies, raw_bodies))
def test_account_bodies(fz: Fuzzed, body: bytes) -> None:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        doc = None
    if isinstance(doc, dict) and str(doc.get("name")) in PROTECTED_NAMES:
        return  # the fixture's accounts must stay as they are (409 anyway)
    check(send(fz.srv, "POST", "/api/v1/accounts", body, {"Authorization": fz.token}))


@FUZZ
@given(name=names, body=raw_bodies)
def test_names_in_paths(fz: Fuzzed, name: str | bytes, body: bytes) -> None:
    path = name_path(name)
    auth = {"Authorization": fz.token}
    check(send(fz.srv, "GET", f"/api/v1/agents/{path}", None, auth))
    if name in PROTECTED_NAMES or (isinstance(name, bytes) and name.decode("latin-1")
                                   in PROTECTED_NAMES):
        return
    check(send(fz.srv, "POST", f"/api/v1/accounts/{path}/password", body, auth))
    check(send(fz.srv, "DELETE", f"/api/v1/accounts/{path}", None, auth))
    check(send(fz.srv, "GET", f"/api/v1/tasks/{path}", None, auth))
    check(send(fz.srv, "POST", f"/api/v1/tasks/{path}/cancel", None, auth))


@FUZZ
@given(path=st.one_of(st.text(st.characters(codec="utf-8"), max_size=60)
                      .map(lambda t: "/" + quote(t, safe="/")),
                      st.binary(max_size=40).map(lambda b: "/" + quote_from_bytes(b, safe="/")),
                      st.sampled_from(["/..", "/../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd",
                                       "//", "/index.html/..", "/api/v1/", "/agent/../pyproject.toml",
                                       "/.git/config", "/%00", "/web/../dutserver/app.py"])),
       method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]))
def test_arbitrary_paths_and_methods(fz: Fuzzed, path: str, method: str) -> None:
    status, headers, body = send(fz.srv, method, path, None, {"Authorization": fz.token})
    if method != "HEAD":
        check((status, headers, body))
    else:
        assert status < 500, status
    # Nothing outside web/ is ever served (no path traversal).
    assert b"[tool.pytest" not in body and b"repositoryformatversion" not in body
    assert b"def create_app" not in body


def test_control_characters_in_headers_never_crash(fz: Fuzzed) -> None:
    """Bytes http.client will not send (NUL, DEL, other C0 controls) sent raw over a socket."""
    import socket
    for value in (b"\x00", b"abc\x01def", b"Basic \x7f\x7f", b"\x1b[31m", b"a\x0bb", b"\x7f"):
        with socket.create_connection(("127.0.0.1", fz.srv.port), timeout=5) as sock:
            sock.sendall(b"GET /api/v1/session HTTP/1.1\r\nHost: x\r\nAuthorization: " + value
                         + b"\r\nConnection: close\r\n\r\n")
            data = b""
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        status_line = data.split(b"\r\n", 1)[0]
        assert status_line.startswith(b"HTTP/1.1 4"), (value, data[:300])
        body = json.loads(data.partition(b"\r\n\r\n")[2])  # the error shape, even here
        assert body["error"] is True and isinstance(body["msg"], str), (value, body)
    wait_until(lambda: http("GET", f"{fz.srv.url}/healthz", timeout=2)[0] == 200)


@pytest.mark.parametrize("method,path", [("POST", "/%00"), ("DELETE", "/a%00b"),
                                         ("POST", "/api/v1/tasks/%00/cancel")])
def test_nul_byte_in_a_path_is_404_not_500(fz: Fuzzed, method: str, path: str) -> None:
    status = check(send(fz.srv, method, path, None, {"Authorization": fz.token}))
    assert status == 404


@pytest.mark.parametrize("task_id", ["%C2%B2", "1%C2%B2", "%E2%91%A0"])
def test_result_id_with_non_decimal_digits_is_400_not_500(fz: Fuzzed, task_id: str) -> None:
    status = check(send(fz.srv, "POST", f"/tasks_result?id={task_id}", b"{}",
                        basic(AGENT, AGENT_SECRET)))
    assert status == 400


@pytest.mark.parametrize("path,body", [
    ("/api/v1/tasks", b'{"targets": ["fz-agent"], "task": {"type": "\\ud800"}}'),
    ("/tasks?target=fz-agent&timeout=0.3", b'{"type": "\\udfff"}'),
])
def test_lone_surrogate_in_task_type_is_400_not_500(fz: Fuzzed, path: str, body: bytes) -> None:
    status = check(send(fz.srv, "POST", path, body, {"Authorization": fz.token}))
    assert status == 400


def test_server_survived_the_fuzzing(fz: Fuzzed) -> None:
    """Runs last in the module: the server still answers, quickly, and still works."""
    assert fz.srv.proc is not None and fz.srv.proc.poll() is None, fz.srv.output()[-2000:]
    status, _, _ = http("GET", f"{fz.srv.url}/healthz", timeout=2)
    assert status == 200
    status, _, body = http("POST", f"{fz.srv.url}/tasks?target={AGENT}&timeout=0.5",
                           {"type": "ping"}, {"Authorization": fz.token})
    assert status == 200 and json.loads(body)["echo"]["type"] == "ping", body
    log = fz.srv.output()
    assert "Traceback" not in log, log[-3000:]
