"""The agent's side of enrollment (issue 18), against a scripted stand-in for the server: the
enrollment and its resumption, pinning the server's key (DER walk checked against
`cryptography`), the local policy, capabilities and hello, rekey, plain http:// refused.

The unit tests import cli/dutagent.py in-process; the flows run it as a subprocess, as on a PC.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import re
import ssl
import stat
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from agent_support import AGENT_PY, AgentProcess, agent_cli, agent_env
from support import wait_until

trustme = pytest.importorskip("trustme")
x509 = pytest.importorskip("cryptography.x509")
serialization = pytest.importorskip("cryptography.hazmat.primitives.serialization")

NAME = "pc-enrolled"
TOKEN = "enroll-token-0123456789"
# Fast retries and enrollment polls: milliseconds instead of seconds.
FAST = [
    "--backoff-min-s", "0.05", "--backoff-max-s", "0.2", "--forbidden-backoff-s", "0.3",
    "--enroll-poll-min-s", "0.02", "--enroll-poll-max-s", "0.1", "--poll-timeout-s", "10",
    "--grace-s", "5", "--log-level", "DEBUG",
]


@pytest.fixture(scope="module")
def dutagent() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dutagent_enroll_under_test", AGENT_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- a scripted server

Request = tuple[str, str, dict[str, str], Any]  # method, path, headers (lower case), JSON body


class EnrollFake:
    """The enrollment contract as the server will speak it, scripted: POST /api/v1/enroll,
    GET /api/v1/enroll/{id}, hello, rekey, and the classic GET /tasks and POST /tasks_result
    with HTTP Basic name:secret. Every request is recorded in `requests`."""

    def __init__(self, tls: Any = None, config: Path | None = None) -> None:
        self.lock = threading.Lock()
        self.requests: list[Request] = []
        self.enroll_answer: tuple[int, dict[str, Any]] | None = None  # None: 202 pending
        self.states = ["accepted"]  # successive status answers; the last one repeats
        self.valid: dict[str, set[str]] = {}
        self.tasks: list[dict[str, Any]] = []
        self.results: dict[int, tuple[str, Any]] = {}  # id: (secret used, result)
        self.hellos: list[Any] = []
        self.config = config
        self.config_at_enroll: tuple[int, Any] | None = None  # (mode, JSON) when POST arrived
        self.credential: str | None = None
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake.handle(self, None)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                fake.handle(self, json.loads(raw) if raw else None)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.configure_cert(context)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> EnrollFake:  # noqa: PYI034 -- typing.Self is 3.11+
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def paths(self, method: str | None = None) -> list[str]:
        with self.lock:
            return [r[1] for r in self.requests if method is None or r[0] == method]

    def secret_of(self, handler: BaseHTTPRequestHandler) -> str | None:
        """The secret of a valid Basic name:secret, else None."""
        header = handler.headers.get("Authorization") or ""
        if not header.startswith("Basic "):
            return None
        name, _, secret = base64.b64decode(header[6:]).decode().partition(":")
        return secret if secret in self.valid.get(name, set()) else None

    def handle(self, h: BaseHTTPRequestHandler, body: Any) -> None:
        path = h.path
        with self.lock:
            self.requests.append((h.command, path, {k.lower(): v for k, v in h.headers.items()}, body))
        if path == "/api/v1/enroll" and h.command == "POST":
            return self.enroll(h, body)
        if path.startswith("/api/v1/enroll/"):
            return self.status(h)
        secret = self.secret_of(h)
        if secret is None:
            return send(h, 403, {"error": True, "msg": "Authorization failure"})
        if path == "/api/v1/agent/hello":
            with self.lock:
                self.hellos.append(body)
            return send(h, 200, {"error": False})
        if path == "/api/v1/agent/rekey":
            self.valid[NAME].add(body["credential"])  # the old one stays valid meanwhile
            return send(h, 200, {"error": False})
        if path == "/tasks":
            with self.lock:
                task = self.tasks.pop(0) if self.tasks else None
            if task is None:
                time.sleep(0.2)
                task = {}
            return send(h, 200, task)
        if path.startswith("/tasks_result?id="):
            with self.lock:
                self.results[int(path.split("=")[1])] = (secret, body)
            return send(h, 200, {"error": False})
        send(h, 404, {"error": True, "msg": "Not found"})

    def enroll(self, h: BaseHTTPRequestHandler, body: Any) -> None:
        if self.config is not None and self.config.exists():
            self.config_at_enroll = (stat.S_IMODE(self.config.stat().st_mode),
                                     json.loads(self.config.read_text()))
        if self.enroll_answer is not None:
            return send(h, *self.enroll_answer)
        self.credential = body["credential"]
        send(h, 202, {"error": False, "enrollment": {"id": 7, "state": "pending", "name": None}})

    def status(self, h: BaseHTTPRequestHandler) -> None:
        if h.path != "/api/v1/enroll/7" or \
                h.headers.get("Authorization") != f"Bearer {self.credential}":
            return send(h, 403, {"error": True, "msg": "Forbidden"})
        with self.lock:
            state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        if state == "accepted":
            assert self.credential is not None
            self.valid.setdefault(NAME, set()).add(self.credential)
        name = NAME if state == "accepted" else None
        send(h, 200, {"error": False, "enrollment": {"id": 7, "state": state, "name": name}})


def send(h: BaseHTTPRequestHandler, status: int, value: Any) -> None:
    data = json.dumps(value).encode()
    h.send_response(status)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    try:
        h.wfile.write(data)
    except OSError:
        pass  # the agent stopped meanwhile


def enroll_agent(tmp_path: Path, fake: EnrollFake, config: Path, *args: str,
                 command: tuple[str, ...] | None = None) -> AgentProcess:
    argv = list(command or ("enroll", fake.url, TOKEN))
    return AgentProcess([*argv, "--config", str(config), *FAST, *args],
                        tmp_path / f"agent-{time.monotonic_ns()}.log")


def leaf(ca: Any) -> Any:
    return ca.issue_cert("127.0.0.1", "localhost")


def der_of(cert: Any) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


# --------------------------------------------------------------------------- the DER walk

@pytest.mark.parametrize("key_type", ["ECDSA", "RSA"])
def test_spki_from_the_certificate_matches_cryptography(dutagent: ModuleType, key_type: str) -> None:
    kind = getattr(trustme.KeyType, key_type)
    ca = trustme.CA(key_type=kind)
    for der in (der_of(ca.issue_cert("127.0.0.1", "pc.example", key_type=kind)),
                ssl.PEM_cert_to_DER_cert(ca.cert_pem.bytes().decode())):
        expected = x509.load_der_x509_certificate(der).public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        assert dutagent.spki_from_certificate(der) == expected
        digest = base64.b64encode(hashlib.sha256(expected).digest()).decode()
        assert dutagent.spki_pin(der) == "sha256//" + digest


def test_der_walk_refuses_what_is_no_certificate(dutagent: ModuleType) -> None:
    der = der_of(leaf(trustme.CA()))
    for garbage in (b"", b"\x30", der[:40], b"\x04\x03abc", b"\x30\x84\xff\xff\xff\xff" + der,
                    b"\x30\x03\x02\x01\x01"):
        with pytest.raises(ValueError):
            dutagent.spki_from_certificate(garbage)


# --------------------------------------------------------------------------- pinning

def test_first_contact_pins_the_key_in_a_private_config_file(
        dutagent: ModuleType, tmp_path: Path) -> None:
    cert = leaf(trustme.CA())
    config = tmp_path / "conf" / "agent.json"
    config.parent.mkdir()
    config.write_text(json.dumps({"server": "x", "name": "a", "secret": "s" * 20}))
    with EnrollFake(tls=cert) as fake:
        store = dutagent.PinStore(None, dutagent.ConfigFile(str(config)))
        channel = channel_to(dutagent, fake.url, store)
        try:
            reply = channel.request("GET", "/api/v1/enroll/1", {})
        finally:
            channel.close()
        assert reply.status == 403  # it got through: the key was trusted on first contact
    key = f"127.0.0.1:{fake.httpd.server_address[1]}"
    data = json.loads(config.read_text())
    assert data["pins"] == {key: dutagent.spki_pin(der_of(cert))}
    assert data["name"] == "a"  # the rest of the file is kept
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert [p.name for p in config.parent.iterdir()] == ["agent.json"]  # no temporary left


def test_a_server_with_another_key_gets_no_request(dutagent: ModuleType) -> None:
    ca = trustme.CA()
    pinned, other = leaf(ca), leaf(ca)  # same names, same CA: only the key differs
    with EnrollFake(tls=other) as fake:
        key = f"127.0.0.1:{fake.httpd.server_address[1]}"
        store = dutagent.PinStore({key: dutagent.spki_pin(der_of(pinned))}, None)
        channel = channel_to(dutagent, fake.url, store)
        with pytest.raises(dutagent.PinMismatch) as caught:
            channel.request("GET", "/tasks", {"Authorization": "Basic c2VjcmV0"})
        channel.close()
        time.sleep(0.2)
        assert fake.requests == []  # not one byte of HTTP, so no credential either
    message = str(caught.value)
    assert dutagent.spki_pin(der_of(pinned)) in message
    assert dutagent.spki_pin(der_of(other)) in message
    assert "dutagent trust --reset" in message


def channel_to(dutagent: ModuleType, url: str, store: Any) -> Any:
    context = dutagent.make_ssl_context(None, False, pinning=True)
    return dutagent.HttpChannel(dutagent.Endpoint(url, context, store), 5.0)


def test_a_running_agent_refuses_a_server_whose_key_changed(tmp_path: Path) -> None:
    ca = trustme.CA()
    pinned, other = leaf(ca), leaf(ca)
    with EnrollFake(tls=other) as fake:
        key = f"127.0.0.1:{fake.httpd.server_address[1]}"
        config = tmp_path / "agent.json"
        write_config(config, {"server": fake.url, "name": NAME, "secret": "s" * 43, "pin": True,
                              "pins": {key: pin_of(pinned)}})
        agent = AgentProcess(["run", "--config", str(config), *FAST], tmp_path / "run.log")
        try:
            agent.wait_for_log(re.escape(f"poll failed: the server {key} showed the key "
                                         f"{pin_of(other)}, but this agent pinned {pin_of(pinned)}"))
        finally:
            assert agent.stop() == 0
        assert fake.requests == []


def test_trust_reset_forgets_the_pins(tmp_path: Path) -> None:
    config = tmp_path / "agent.json"
    write_config(config, {"server": "https://a:1", "name": NAME, "secret": "s" * 43,
                          "pins": {"a:1": "sha256//AAAA"}})
    listed = agent_cli("trust", "--config", str(config))
    assert listed.returncode == 0 and "a:1 sha256//AAAA" in listed.stdout
    reset = agent_cli("trust", "--reset", "--config", str(config))
    assert reset.returncode == 0, reset.stderr
    assert "forgot 1 pinned server key(s)" in reset.stdout
    assert json.loads(config.read_text()) == {"server": "https://a:1", "name": NAME,
                                              "secret": "s" * 43}
    assert stat.S_IMODE(config.stat().st_mode) == 0o600


def pin_of(cert: Any) -> str:
    digest = hashlib.sha256(x509.load_der_x509_certificate(der_of(cert)).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).digest()
    return "sha256//" + base64.b64encode(digest).decode()


def write_config(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data))
    path.chmod(0o600)


# --------------------------------------------------------------------------- plain http

@pytest.mark.parametrize("host", ["192.0.2.10", "dut.example.com", "[2001:db8::1]"])
def test_enrolling_over_plain_http_to_another_machine_is_refused(tmp_path: Path, host: str) -> None:
    config = tmp_path / "agent.json"
    done = agent_cli("enroll", f"http://{host}:8080", TOKEN, "--config", str(config))
    assert done.returncode == 2
    assert "refusing to enroll over plain http://" in done.stderr
    assert "clear text" in done.stderr and "pose as the server" in done.stderr
    assert not config.exists()


def test_loopback_addresses(dutagent: ModuleType) -> None:
    for host in ("127.0.0.1", "127.8.9.10", "::1", "localhost", "LOCALHOST", "::ffff:127.0.0.1"):
        assert dutagent.is_loopback(host), host
    for host in ("10.0.0.1", "128.0.0.1", "::2", "localhost.example.com", "example.com", ""):
        assert not dutagent.is_loopback(host), host


# --------------------------------------------------------------------------- facts

def test_facts(dutagent: ModuleType) -> None:
    facts = dutagent.build_facts()
    assert set(facts) == {"hostname", "machine_id", "os", "os_version", "arch", "macs",
                          "agent_version"}
    assert facts["agent_version"] == dutagent.__version__
    assert facts["hostname"] and facts["os"] in ("Linux", "Windows", "macOS")
    assert facts["os_version"] and facts["arch"]  # what selectors match: os=linux,arch=…
    if Path("/etc/machine-id").exists() and Path("/etc/machine-id").read_text().strip():
        assert facts["machine_id"] == Path("/etc/machine-id").read_text().strip()
    assert "00:00:00:00:00:00" not in facts["macs"]
    for mac in facts["macs"]:
        assert len(mac) == 17 and mac == mac.lower()
    interfaces = [i for i in Path("/sys/class/net").iterdir() if i.name != "lo"]
    physical = [i for i in interfaces if (i / "device").exists()]
    expected = set()
    for iface in physical or interfaces:  # devices' own addresses rather than made-up ones
        address = (iface / "address").read_text().strip()
        if len(address) == 17 and address != "00:00:00:00:00:00":
            expected.add(address)
    if expected:
        assert set(facts["macs"]) == expected


def test_machine_ids_of_windows_and_macos(dutagent: ModuleType) -> None:
    reg = ("\r\nHKEY_LOCAL_MACHINE\\SOFTWARE\\Microsoft\\Cryptography\r\n"
           "    MachineGuid    REG_SZ    4c4c4544-0042-3510-8050-b4c04f4e3732\r\n\r\n")
    assert dutagent.parse_reg_query(reg, "MachineGuid") == "4c4c4544-0042-3510-8050-b4c04f4e3732"
    ioreg = ('+-o J314sAP  <class IOPlatformExpertDevice, id 0x100000235>\n  {\n'
             '    "IOPlatformSerialNumber" = "C02XXXXXX"\n'
             '    "IOPlatformUUID" = "12345678-ABCD-5E6F-9012-3456789ABCDE"\n  }\n')
    assert dutagent.parse_ioreg_uuid(ioreg) == "12345678-ABCD-5E6F-9012-3456789ABCDE"
    assert dutagent.parse_reg_query("ERROR: not found", "MachineGuid") == ""


def test_macs_elsewhere_fall_back_to_uuid_getnode(
        dutagent: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dutagent, "IS_LINUX", False)
    monkeypatch.setattr(dutagent, "networks", lambda: [{"mac": ""}, {"mac": "00:00:00:00:00:00"}])
    monkeypatch.setattr(dutagent.uuid, "getnode", lambda: 0x0242AC110002)
    assert dutagent.mac_addresses() == ["02:42:ac:11:00:02"]
    monkeypatch.setattr(dutagent, "networks", lambda: [{"mac": "AA:BB:CC:DD:EE:FF"}])
    assert dutagent.mac_addresses() == ["aa:bb:cc:dd:ee:ff"]


# --------------------------------------------------------------------------- policy

def test_policy_parsing(dutagent: ModuleType, tmp_path: Path) -> None:
    policy = dutagent.parse_policy({"deny": ["execute_cmd", "writefile"]}, "test")
    assert not policy.permits("execute_cmd") and not policy.permits("writefile")
    assert policy.permits("ping")
    assert not policy.permits("shell")  # off unless allowed
    assert dutagent.parse_policy({"allow": ["shell"]}, "test").permits("shell")
    assert not dutagent.parse_policy({"allow": ["shell"], "deny": ["shell"]}, "t").permits("shell")
    for bad in ([], {"deny": "execute_cmd"}, {"deny": [1]}, {"denny": ["execute_cmd"]},
                {"deny": [""]}, {"allow": {"shell": True}}):
        with pytest.raises(dutagent.UsageError):
            dutagent.parse_policy(bad, "test")

    assert dutagent.load_policy(None).deny == frozenset() or Path("/etc/dutagent/policy.json").exists()
    with pytest.raises(dutagent.UsageError, match="policy file not found"):
        dutagent.load_policy(str(tmp_path / "missing.json"))
    broken = tmp_path / "broken.json"
    broken.write_text('{"deny": ["execute_cmd",]}')
    with pytest.raises(dutagent.UsageError, match="not valid JSON"):
        dutagent.load_policy(str(broken))


def test_capabilities_leave_out_what_the_policy_denies(dutagent: ModuleType) -> None:
    policy = dutagent.Policy(deny=["execute_cmd", "kill"])
    caps = dutagent.capabilities(policy, can_rekey=True)
    assert "execute_cmd" not in caps and "kill" not in caps
    assert {"ping", "readfile", "rekey", "inventory"} <= set(caps)
    assert "rekey" not in dutagent.capabilities(policy, can_rekey=False)
    assert "shell" not in dutagent.capabilities(dutagent.Policy(allow=["shell"]), True)  # not built


def test_a_malformed_policy_file_stops_the_agent(tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text("deny: execute_cmd\n")
    done = agent_cli("run", "--server", "http://127.0.0.1:9", "--name", "pc", "--secret",
                     "s" * 20, "--policy", str(policy), timeout=10)
    assert done.returncode == 2
    assert f"policy file {policy} is not valid JSON" in done.stderr
    assert "does not start" in done.stderr


def test_a_denied_task_is_refused_and_not_offered(tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"deny": ["execute_cmd"]}))
    config = tmp_path / "agent.json"
    with EnrollFake() as fake:
        fake.valid[NAME] = {"s" * 43}
        fake.tasks = [{"id": 3, "type": "execute_cmd", "cmd": "touch " + str(tmp_path / "ran")},
                      {"id": 4, "type": "ping"}]
        write_config(config, {"server": fake.url, "name": NAME, "secret": "s" * 43,
                              "policy": str(policy)})
        agent = AgentProcess(["run", "--config", str(config), *FAST], tmp_path / "run.log")
        try:
            wait_until(lambda: 4 in fake.results, timeout_s=10)
        finally:
            assert agent.stop() == 0
        assert fake.results[3][1] == {"error": True, "msg": "refused by local policy: execute_cmd"}
        assert not (tmp_path / "ran").exists()
        caps = fake.hellos[0]["capabilities"]
        assert "execute_cmd" not in caps and "ping" in caps and "rekey" in caps


def test_a_type_the_agent_does_not_run_gets_an_error_result(tmp_path: Path) -> None:
    """A server that ignores the capabilities (or predates them) may still send anything."""
    config = tmp_path / "agent.json"
    with EnrollFake() as fake:
        fake.valid[NAME] = {"s" * 43}
        fake.tasks = [{"id": 8, "type": "frobnicate"}, {"id": 9, "type": "shell"}]
        write_config(config, {"server": fake.url, "name": NAME, "secret": "s" * 43})
        agent = AgentProcess(["run", "--config", str(config), *FAST], tmp_path / "run.log")
        try:
            wait_until(lambda: 9 in fake.results, timeout_s=10)
        finally:
            assert agent.stop() == 0
        assert fake.results[8][1] == {"error": True, "msg": "unknown task type: frobnicate"}
        # shell is off unless the policy allows it: refused before it would even be looked up.
        assert fake.results[9][1] == {"error": True, "msg": "refused by local policy: shell"}


# --------------------------------------------------------------------------- enrollment

def test_enroll_waits_for_acceptance_then_runs_tasks(tmp_path: Path) -> None:
    config = tmp_path / "conf" / "agent.json"
    with EnrollFake(config=config) as fake:
        fake.states = ["pending", "pending", "accepted"]
        fake.tasks = [{"id": 1, "type": "ping"}]
        agent = enroll_agent(tmp_path, fake, config)
        try:
            wait_until(lambda: 1 in fake.results, timeout_s=15)
            agent.wait_for_log(r"enrollment 7 is pending: an administrator must accept it")
        finally:
            assert agent.stop() == 0

        # The credential reached the config file (0600) before the server heard of it.
        assert fake.config_at_enroll is not None
        mode, early = fake.config_at_enroll
        assert mode == 0o600
        assert early["enrollment"]["credential"] == fake.credential
        assert "token" not in early  # a token given on the command line is not written down

        data = json.loads(config.read_text())
        assert data == {"server": fake.url, "name": NAME, "secret": fake.credential}
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        assert len(fake.credential or "") == 43

        method, path, headers, body = fake.requests[0]
        assert (method, path) == ("POST", "/api/v1/enroll")
        assert body["token"] == TOKEN and body["credential"] == fake.credential
        assert set(body["facts"]) == {"hostname", "machine_id", "os", "os_version", "arch", "macs",
                          "agent_version"}
        assert "ping" in body["capabilities"] and "rekey" in body["capabilities"]
        assert "authorization" not in headers
        # Then an ordinary agent: hello, polls, the result, with Basic name:credential.
        assert fake.hellos and fake.hellos[0]["capabilities"] == body["capabilities"]
        assert fake.hellos[0]["facts"] == body["facts"]
        assert fake.results[1] == (fake.credential, {"pong": True, "agent_version": "1.0.0"})
        assert "enrolled as agent 'pc-enrolled'" in agent.output()
        assert fake.credential not in agent.output() and TOKEN not in agent.output()


def test_a_restarted_agent_resumes_its_pending_enrollment(tmp_path: Path) -> None:
    config = tmp_path / "agent.json"
    with EnrollFake(config=config) as fake:
        fake.states = ["pending"]
        first = enroll_agent(tmp_path, fake, config)
        try:
            wait_until(lambda: len(fake.paths("GET")) >= 2, timeout_s=10)
        finally:
            first.kill()
        state = json.loads(config.read_text())["enrollment"]
        assert state["id"] == 7 and state["credential"] == fake.credential
        assert stat.S_IMODE(config.stat().st_mode) == 0o600

        fake.states = ["accepted"]
        with fake.lock:
            fake.requests.clear()
        # `run` without a token: the pending enrollment in the config file is enough.
        again = enroll_agent(tmp_path, fake, config, command=("run",))
        try:
            wait_until(lambda: "/tasks" in fake.paths("GET"), timeout_s=10)
        finally:
            assert again.stop() == 0
        assert "/api/v1/enroll" not in fake.paths("POST")  # not enrolled a second time
        assert fake.paths("GET")[0] == "/api/v1/enroll/7"
        assert json.loads(config.read_text())["secret"] == state["credential"]


@pytest.mark.parametrize("state", ["rejected", "revoked", "expired"])
def test_a_refused_enrollment_ends_with_a_clear_message(tmp_path: Path, state: str) -> None:
    config = tmp_path / "agent.json"
    with EnrollFake(config=config) as fake:
        fake.states = ["pending", state]
        done = agent_cli("enroll", fake.url, TOKEN, "--config", str(config), *FAST, timeout=15)
    assert done.returncode == 1
    assert f"enrollment 7 was {state} on the server: this machine gets no account" in done.stderr
    assert "name" not in json.loads(config.read_text())


def test_a_refused_token_ends_with_a_clear_message(tmp_path: Path) -> None:
    config = tmp_path / "agent.json"
    with EnrollFake(config=config) as fake:
        fake.enroll_answer = (403, {"error": True, "msg": "Invalid enrollment token"})
        done = agent_cli("enroll", fake.url, "--config", str(config), *FAST, timeout=15,
                         env=agent_env(DUTAGENT_TOKEN=TOKEN))
    assert done.returncode == 1
    assert "the server refused the enrollment token (HTTP 403 Invalid enrollment token)" in done.stderr
    assert json.loads(config.read_text()) == {"server": fake.url}  # no enrollment left behind


def test_run_with_a_token_in_the_config_file_enrolls_first(tmp_path: Path) -> None:
    """A golden image: the config file carries server and token; each copy enrolls itself."""
    config = tmp_path / "agent.json"
    with EnrollFake(config=config) as fake:
        write_config(config, {"server": fake.url, "token": TOKEN})
        agent = enroll_agent(tmp_path, fake, config, command=("run",))
        try:
            wait_until(lambda: "/tasks" in fake.paths("GET"), timeout_s=10)
        finally:
            assert agent.stop() == 0
        assert fake.requests[0][3]["token"] == TOKEN
        # The token is of no more use to this machine, and might enroll others: gone.
        assert json.loads(config.read_text()) == {"server": fake.url, "name": NAME,
                                                  "secret": fake.credential}


def test_enroll_refuses_when_an_account_is_configured(tmp_path: Path) -> None:
    config = tmp_path / "agent.json"
    write_config(config, {"server": "http://127.0.0.1:9", "name": "pc", "secret": "s" * 20})
    done = agent_cli("enroll", "http://127.0.0.1:9", TOKEN, "--config", str(config))
    assert done.returncode == 2
    assert "already has an account ('pc')" in done.stderr and "--force" in done.stderr


# --------------------------------------------------------------------------- rekey

def test_rekey_switches_to_a_new_secret_saved_first(tmp_path: Path) -> None:
    config = tmp_path / "agent.json"
    old = "o" * 43
    with EnrollFake() as fake:
        fake.valid[NAME] = {old}
        fake.tasks = [{"id": 5, "type": "rekey"}]
        write_config(config, {"server": fake.url, "name": NAME, "secret": old})
        agent = AgentProcess(["run", "--config", str(config), *FAST], tmp_path / "run.log")
        try:
            wait_until(lambda: 5 in fake.results, timeout_s=10)
            fake.tasks.append({"id": 6, "type": "ping"})
            wait_until(lambda: 6 in fake.results, timeout_s=10)
        finally:
            assert agent.stop() == 0
        new = json.loads(config.read_text())["secret"]
        assert new != old and len(new) == 43
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        rekey = [r for r in fake.requests if r[1] == "/api/v1/agent/rekey"]
        assert len(rekey) == 1 and rekey[0][3] == {"credential": new}
        assert rekey[0][2]["authorization"] == basic(NAME, old)  # asked with the old secret
        assert fake.results[5] == (new, {"rekeyed": True})  # answered with the new one
        assert fake.results[6][0] == new
        assert new not in agent.output()


def test_rekey_keeps_the_old_secret_when_the_config_cannot_be_written(
        dutagent: ModuleType, tmp_path: Path) -> None:
    config = tmp_path / "agent.json"
    old = "o" * 43
    with EnrollFake() as fake:
        fake.valid[NAME] = {old}
        write_config(config, {"server": fake.url, "name": NAME, "secret": old})
        settings = dutagent.Settings({"server": fake.url, "name": NAME, "secret": old},
                                     {"server": "file", "name": "file", "secret": "file"})
        agent = dutagent.Agent(settings, dutagent.Policy(), dutagent.ConfigFile(str(config)))
        assert agent.can_rekey

        def fail(change: Callable[[dict[str, Any]], Any]) -> None:
            raise OSError(28, "No space left on device")

        agent.config.update = fail
        try:
            result = agent._rekey()
        finally:
            for channel in agent._all_channels:
                channel.close()
        assert [r[1] for r in fake.requests] == ["/api/v1/agent/rekey"]  # the server heard first
        assert result["error"] is True
        assert "cannot write the config file" in result["msg"] and "unchanged" in result["msg"]
        assert agent.headers["Authorization"] == basic(NAME, old)
        assert json.loads(config.read_text())["secret"] == old


def test_no_rekey_for_a_secret_from_the_environment(dutagent: ModuleType, tmp_path: Path) -> None:
    config = tmp_path / "agent.json"
    write_config(config, {"server": "http://127.0.0.1:9", "name": NAME})
    settings = dutagent.Settings({"server": "http://127.0.0.1:9", "name": NAME, "secret": "e" * 20},
                                 {"secret": "env"})
    agent = dutagent.Agent(settings, dutagent.Policy(), dutagent.ConfigFile(str(config)))
    assert not agent.can_rekey and "rekey" not in agent.capabilities
    assert agent._rekey()["error"] is True


def basic(name: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{name}:{secret}".encode()).decode()


@pytest.fixture(autouse=True)
def _no_dutagent_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key in list(os.environ):
        if key.startswith("DUTAGENT_"):
            monkeypatch.delenv(key)
    yield


# --------------------------------------------------------------------------- with the real server

@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any, Any]]:
    """A real dutserver on https with a certificate of its own CA, which the agents are NOT
    given: they pin the server's key instead."""
    from agent_support import Admin
    from support import Tls, start_server

    base = tmp_path_factory.mktemp("enroll-real")
    tls = Tls.make(base / "ca")
    server = start_server(base, tls=tls)
    yield server, Admin(server), tls
    server.stop()


def new_token(admin: Any, **fields: Any) -> str:
    status, _, body = admin._http("POST", f"{admin.server.url}/api/v1/enrollment-tokens",
                                  {"expires_s": 3600, "max_uses": 1, **fields}, admin.headers)
    assert status == 201, body
    return str(json.loads(body)["token"]["token"])


def pending_of(admin: Any, hostname: str) -> list[dict[str, Any]]:
    status, _, body = admin._http("GET", f"{admin.server.url}/api/v1/enrollments?state=pending",
                                  headers=admin.headers)
    assert status == 200, body
    return [e for e in json.loads(body)["enrollments"] if e["facts"].get("hostname") == hostname]


def decide(admin: Any, enrollment_id: int, verdict: str) -> dict[str, Any]:
    status, _, body = admin._http(
        "POST", f"{admin.server.url}/api/v1/enrollments/{enrollment_id}/{verdict}", b"",
        admin.headers)
    assert status == 200, body
    return dict(json.loads(body)["enrollment"])


def test_real_server_enroll_accept_pin_policy_and_rekey(
        real: tuple[Any, Any, Any], tmp_path: Path) -> None:
    server, admin, tls = real
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"deny": ["execute_cmd"]}))
    config = tmp_path / "agent.json"
    hostname = __import__("socket").gethostname()
    agent = AgentProcess(["enroll", server.url, new_token(admin), "--config", str(config),
                          "--policy", str(policy), *FAST], tmp_path / "agent.log")
    try:
        agent.wait_for_log(r"enrollment \d+ is pending", timeout_s=10)
        (request,) = pending_of(admin, hostname)
        assert "execute_cmd" not in request["capabilities"] and "rekey" in request["capabilities"]
        name = decide(admin, request["id"], "accept")["name"]
        assert admin.run(name, {"type": "ping"})["pong"] is True

        # Pinned, not verified by a CA (the agent was given none): the server's own key.
        data = json.loads(config.read_text())
        assert data["name"] == name and data["pin"] is True and "enrollment" not in data
        assert data["pins"] == {f"127.0.0.1:{server.port}": pin_of_pem(tls.cert)}
        assert stat.S_IMODE(config.stat().st_mode) == 0o600

        # What the policy denies is not offered, so the server does not even queue it.
        status, _, body = admin._http("POST", f"{server.url}/api/v1/tasks",
                                      {"targets": [name], "task": {"type": "execute_cmd",
                                                                   "cmd": "true"}},
                                      admin.headers)
        assert status == 400 and b"execute_cmd" in body

        status, _, body = admin._http("POST", f"{server.url}/api/v1/agents/{name}/rekey", b"",
                                      admin.headers)
        assert status == 202, body
        task = admin.finished(int(json.loads(body)["task"]), wait_s=10)
        assert task["state"] == "done" and task["result"]["rekeyed"] is True
        new = json.loads(config.read_text())["secret"]
        assert new != data["secret"]
        assert admin.run(name, {"type": "ping"})["pong"] is True  # with the new secret
    finally:
        assert agent.stop() == 0
    assert data["secret"] not in agent.output() and new not in agent.output()


def test_real_server_resume_after_restart_then_rejection(
        real: tuple[Any, Any, Any], tmp_path: Path) -> None:
    server, admin, _ = real
    config = tmp_path / "agent.json"
    hostname = __import__("socket").gethostname()
    before = {e["id"] for e in pending_of(admin, hostname)}
    first = AgentProcess(["enroll", server.url, new_token(admin), "--config", str(config), *FAST],
                         tmp_path / "first.log")
    try:
        first.wait_for_log(r"enrollment \d+ is pending", timeout_s=10)
    finally:
        assert first.stop() in (0, -15)
    (mine,) = [e for e in pending_of(admin, hostname) if e["id"] not in before]

    # Restarted (`run`, no token any more): the same enrollment, not a second one.
    again = AgentProcess(["run", "--config", str(config), *FAST], tmp_path / "again.log")
    try:
        again.wait_for_log(rf"enrollment {mine['id']} is pending", timeout_s=10)
        assert [e["id"] for e in pending_of(admin, hostname) if e["id"] not in before] == \
            [mine["id"]]
        decide(admin, mine["id"], "reject")
        wait_until(lambda: again.proc.poll() is not None, timeout_s=10)
    finally:
        again.kill()
    assert again.proc.returncode == 1
    assert f"enrollment {mine['id']} was rejected on the server" in again.output()


def pin_of_pem(path: Path) -> str:
    der = ssl.PEM_cert_to_DER_cert(path.read_text())
    spki = x509.load_der_x509_certificate(der).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256//" + base64.b64encode(hashlib.sha256(spki).digest()).decode()
