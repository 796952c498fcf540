"""RDFM devices' enrollment and tokens, `POST /api/v1/auth/device` (shared/protocols/rdfm-device.md,
sections 1, 2 and 7, steps 1-3), against real servers and a byte-exact device client
(tests/rdfm_device.py): pending (401) until an admin accepts through the native API, then 200
with a JWT whose `expires` is the token's lifetime; 400 only for what no real client sends, and
nothing stored then; revocation and key rotation; SQLite, PostgreSQL, and two nodes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from dutserver.config import Settings
from dutserver.core.errors import ApiError
from dutserver.core.notify import LocalNotifier
from dutserver.core.services import build_services
from dutserver.store.sqlite import SqliteStore
from fakes import FakeClock
from pg_support import pg_server, pg_url  # noqa: F401  (fixtures)
from rdfm_device import AUTH_PATH, SIGNATURE_HEADER, Device, decode_token_payload
from support import ADMIN, FAST_ARGS, RunningServer, cli, http, start_server, wait_until

RDFM_ARGS = ["--rdfm-devices", "--rdfm-token-s", "30", "--accounts-refresh-s", "0.05"]
NODE_ARGS = ["--node-heartbeat-s", "0.1", "--node-lease-s", "1", "--session-cache-s", "0.2"]


def start_pg(tmp_path: Path, url: str, n: int = 0, *args: str) -> RunningServer:
    key = tmp_path / "fleet.key"
    if n == 0:
        cli("addaccount", url, ADMIN[0], "admin", stdin=ADMIN[1] + "\n",
            env={"DUTSERVER_KEY_FILE": str(key)})
    return RunningServer(db=url, log=tmp_path / f"node{n}.log",
                         args=[*FAST_ARGS, *RDFM_ARGS, *NODE_ARGS, "--key-file", str(key),
                               "--node-name", f"node{n}", *args]).start()


@pytest.fixture(params=["sqlite", "postgres"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningServer]:
    if request.param == "postgres":
        srv = start_pg(tmp_path, request.getfixturevalue("pg_url"))
    else:
        srv = start_server(tmp_path, *RDFM_ARGS)
    yield srv
    srv.stop()


@pytest.fixture
def lite(tmp_path: Path) -> Iterator[RunningServer]:
    srv = start_server(tmp_path, *RDFM_ARGS, "--ban-failures", "20")
    yield srv
    srv.stop()


class Admin:
    def __init__(self, srv: RunningServer) -> None:
        self.srv, self.token = srv, srv.login()

    def call(self, method: str, path: str, body: Any = None, ok: int = 200) -> Any:
        status, _, raw = http(method, self.srv.url + path, body, {"Authorization": self.token})
        assert status == ok, (status, raw)
        return json.loads(raw)

    def entries(self, state: str | None = None) -> list[dict[str, Any]]:
        query = f"?kind=rdfm&state={state}" if state else "?kind=rdfm"
        return list(self.call("GET", "/api/v1/enrollments" + query)["enrollments"])

    def accept(self, entry_id: int, body: Any = None) -> dict[str, Any]:
        return dict(self.call("POST", f"/api/v1/enrollments/{entry_id}/accept",
                              body)["enrollment"])

    def agent(self, name: str) -> dict[str, Any]:
        agents = self.call("GET", "/api/v1/agents?inventory=0")["agents"]
        return next(a for a in agents if a["name"] == name)

    def audit(self, action: str) -> list[dict[str, Any]]:
        return [e for e in self.call("GET", "/api/v1/audit?limit=1000")["events"]
                if e["action"] == action]


def post(srv: RunningServer, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(srv.url + AUTH_PATH, content=body, headers=headers)


def fingerprint(device: Device) -> str:
    der = device.key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def assert_error(r: httpx.Response, status: int) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["error"] is True and isinstance(body["msg"], str) and set(body) == {"error", "msg"}


def assert_token(r: httpx.Response, device_id: str, lifetime_s: int = 30) -> str:
    assert r.status_code == 200, r.text
    answer = r.json()
    assert set(answer) == {"token", "expires"} and answer["expires"] == lifetime_s
    payload = decode_token_payload(answer["token"])  # as the Linux client reads it
    assert payload is not None and payload["expires"] == lifetime_s == answer["expires"]
    assert payload["device_id"] == device_id and isinstance(payload["created_at"], int)
    assert set(answer["token"]) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                       "0123456789-_.")
    return str(answer["token"])


# --- the whole flow, on each store ---------------------------------------------------------------


def test_enroll_pending_accept_token_facts_revoke(server: RunningServer) -> None:
    device = Device(metadata={"rdfm.software.tags": ["lab", "x"], "slots": 2, "nested": {"a": None}})
    request = device.signed("go")  # signed once, re-sent unchanged, as the Linux client does
    for _ in range(3):
        assert_error(device.auth(server.url, request=request), 401)
    admin = Admin(server)
    (entry,) = admin.entries("pending")  # one entry, however many retries
    assert (entry["kind"], entry["device_id"], entry["name"]) == (
        "rdfm", device.device_id, "rdfm-52-54-00-12-34-56")
    assert entry["key_fingerprint"] == fingerprint(device)
    assert entry["facts"] == device.metadata  # any JSON value, as the device sent it
    wait_until(lambda: len(admin.audit("enroll_request")) == 1)  # audited once, not per retry
    accepted = admin.accept(entry["id"])
    assert (accepted["state"], accepted["name"]) == ("accepted", "rdfm-52-54-00-12-34-56")
    # The very same bytes as before now get a token.
    token = assert_token(device.auth(server.url, request=request), device.device_id)
    assert not device.needs_auth() and device.token == token
    agent = admin.agent("rdfm-52-54-00-12-34-56")
    assert agent["facts"] == device.metadata
    # Each authentication replaces the agent's facts with the body's metadata.
    device.metadata["rdfm.software.version"] = "v2"
    assert_token(device.auth(server.url, style="android"), device.device_id)
    assert admin.agent("rdfm-52-54-00-12-34-56")["facts"]["rdfm.software.version"] == "v2"
    admin.call("POST", "/api/v1/agents/rdfm-52-54-00-12-34-56/revoke")
    assert_error(device.auth(server.url, request=request), 401)
    assert [e["state"] for e in admin.entries() if e["id"] == entry["id"]] == ["revoked"]


def test_off_by_default_and_switched_on_by_environment(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    device = Device()
    (tmp_path / "off").mkdir()
    (tmp_path / "on").mkdir()
    srv = start_server(tmp_path / "off")
    try:
        assert_error(device.auth(srv.url), 404)
        assert Admin(srv).call("GET", "/api/v1/enrollments")["enrollments"] == []
        assert AUTH_PATH not in json.loads(http("GET", srv.url + "/openapi.json")[2])["paths"]
    finally:
        srv.stop()
    monkeypatch.setenv("DUTSERVER_RDFM_DEVICES", "1")
    srv = start_server(tmp_path / "on")
    try:
        assert_error(device.auth(srv.url), 401)
        assert (tmp_path / "on" / "dut.db.key.rdfm").stat().st_mode & 0o777 == 0o600
    finally:
        srv.stop()


# --- what gets 400, and stores nothing -----------------------------------------------------------


def test_malformed_or_badly_signed_requests_get_400_and_store_nothing(lite: RunningServer) -> None:
    device, other = Device(), Device("52:54:00:ab:cd:ef")
    body, headers = device.signed("go")
    no_header = {k: v for k, v in headers.items() if k != SIGNATURE_HEADER}
    flipped = body.replace(b"x86_64", b"x86_65")
    assert flipped != body
    unsigned_fields = json.loads(body)
    del unsigned_fields["metadata"]["rdfm.hardware.devtype"]
    no_devtype = json.dumps(unsigned_fields).encode()
    bad_key = body.replace(b"-----BEGIN PUBLIC KEY-----\\n", b"-----BEGIN PUBLIC KEY-----\\n@")
    fields = json.loads(body)
    fields["metadata"]["note"] = "\ud800"  # a lone surrogate: no UTF-8, no store takes it
    surrogate = json.dumps(fields).encode()  # (written as an ASCII escape)
    fields = json.loads(body)
    fields["metadata"]["rdfm.hardware.macaddr"] = "aa\u0000bb"
    nul_id = json.dumps(fields).encode()
    cases = [
        (body, no_header),  # no signature
        (body, {**headers, SIGNATURE_HEADER: ""}),
        (body, {**headers, SIGNATURE_HEADER: "not base64!"}),
        (body, {**headers, SIGNATURE_HEADER: other.sign(body)}),  # another key's signature
        (flipped, headers),  # one byte changed after signing
        (b"not json", {**headers, SIGNATURE_HEADER: device.sign(b"not json")}),
        (no_devtype, {**headers, SIGNATURE_HEADER: device.sign(no_devtype)}),
        (bad_key, {**headers, SIGNATURE_HEADER: device.sign(bad_key)}),
        (surrogate, {**headers, SIGNATURE_HEADER: device.sign(surrogate)}),
        (nul_id, {**headers, SIGNATURE_HEADER: device.sign(nul_id)}),
    ]
    for data, hdrs in cases:
        assert_error(post(lite, data, hdrs), 400)
    admin = Admin(lite)
    assert admin.entries() == []
    wait_until(lambda: len(admin.audit("rdfm_auth_failed")) == len(cases))
    # A real client's odd metadata (numbers, lists, an old timestamp) is no reason for 400.
    odd = Device(metadata={"rdfm.software.tags": ["a"], "n": 1.5, "b": True, "x": None})
    assert_error(odd.auth(lite.url, request=odd.signed("go", timestamp=1)), 401)
    assert len(admin.entries("pending")) == 1


def test_a_throttled_address_gets_401_never_429(tmp_path: Path) -> None:
    # This route's failures count under one name per address: banned after --ban-failures.
    srv = start_server(tmp_path, *RDFM_ARGS, "--ban-failures", "3")
    try:
        admin = Admin(srv)
        known = Device("02:00:00:00:00:01", bits=1024)
        assert_error(known.auth(srv.url), 401)
        admin.accept(admin.entries("pending")[0]["id"])
        body, headers = known.signed()
        for _ in range(3):  # three failures from this address: banned
            assert_error(post(srv, body, {**headers, SIGNATURE_HEADER: "AAAA"}), 400)
        assert_error(post(srv, body, {**headers, SIGNATURE_HEADER: "AAAA"}), 401)
        newcomer = Device("02:00:00:00:00:02", bits=1024)
        assert_error(newcomer.auth(srv.url), 401)
        assert [e["device_id"] for e in admin.entries()] == [known.device_id]  # nothing stored
        # A valid key of an accepted device is never throttled for its neighbours' failures.
        assert_token(known.auth(srv.url), known.device_id)
        assert "weak 1024-bit RSA key" in srv.output()
    finally:
        srv.stop()


# --- the clients' shapes, rotation -------------------------------------------------------------


def test_every_pem_shape_and_body_style(lite: RunningServer) -> None:
    admin = Admin(lite)
    combos = [(style, shape) for style in ("go", "android")
              for shape in ("linux", "android", "python")]
    devices = [Device(f"02:00:00:00:01:{i:02x}", bits=1024) for i in range(len(combos))]
    for device, (style, shape) in zip(devices, combos):
        assert_error(post(lite, *device.signed(style, shape)), 401)  # type: ignore[arg-type]
    for entry in admin.entries("pending"):
        admin.accept(entry["id"])
    for device, (style, shape) in zip(devices, combos):
        r = post(lite, *device.signed(style, shape))  # type: ignore[arg-type]
        assert_token(r, device.device_id)
        device.take_token(r.json(), style)  # type: ignore[arg-type]
        assert not device.needs_auth()
    assert {e["key_fingerprint"] for e in admin.entries("accepted")} == {
        fingerprint(d) for d in devices}


def test_a_new_key_of_an_accepted_device_rotates_its_key(lite: RunningServer) -> None:
    admin = Admin(lite)
    old = Device("52:54:00:12:34:56", bits=1024)
    assert_error(old.auth(lite.url), 401)
    first = admin.accept(admin.entries("pending")[0]["id"])
    assert_token(old.auth(lite.url), old.device_id)
    new = Device(old.device_id, bits=1024)  # re-imaged: same id, another key
    assert_error(new.auth(lite.url), 401)
    (pending,) = admin.entries("pending")
    assert pending["key_fingerprint"] == fingerprint(new)
    assert pending["duplicate_of"] == first["name"]
    assert_token(old.auth(lite.url), old.device_id)  # the old key works until the admin decides
    rotated = admin.accept(pending["id"])
    assert rotated["name"] == first["name"]  # the same agent, not "-2"
    assert_token(new.auth(lite.url), new.device_id)
    assert_error(old.auth(lite.url), 401)
    states = {e["id"]: e["state"] for e in admin.entries()}
    assert states[first["id"]] == "revoked" and states[rotated["id"]] == "accepted"
    names = [a["name"] for a in admin.call("GET", "/api/v1/agents?inventory=0")["agents"]]
    assert names == [first["name"]]


# --- several nodes -------------------------------------------------------------------------------


def test_pending_on_one_node_accepted_on_another(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    a = start_pg(tmp_path, pg_url, 0)
    b = start_pg(tmp_path, pg_url, 1)
    try:
        device = Device(bits=1024)
        request = device.signed()
        assert_error(device.auth(a.url, request=request), 401)
        admin = Admin(b)
        admin.accept(admin.entries("pending")[0]["id"])
        token = assert_token(device.auth(a.url, request=request), device.device_id)
        assert_token(device.auth(b.url, request=request), device.device_id)
        # Both nodes sign with the one key file beside the agent-digest key.
        key = bytes.fromhex((tmp_path / "fleet.key.rdfm").read_text().strip())
        assert jwt.decode(token, key, algorithms=["HS256"])["device_id"] == device.device_id
        admin.call("POST", f"/api/v1/agents/{admin.entries('accepted')[0]['name']}/revoke")
        assert_error(device.auth(a.url, request=request), 401)
    finally:
        b.stop()
        a.stop()


# --- who a token stands for (the device routes after it), in the core ---------------------------


async def test_device_for_token(tmp_path: Path) -> None:
    settings = Settings(db_path=tmp_path / "dut.db", rdfm_devices=True, rdfm_token_s=30)
    store, clock = SqliteStore(settings.db_path), FakeClock()
    await store.open()
    services = build_services(settings, store, LocalNotifier(), clock)
    await services.start()
    devices = services.devices
    try:
        device = Device(bits=1024)
        body, headers = device.signed()
        with pytest.raises(ApiError) as refused:
            await devices.authenticate(body, headers[SIGNATURE_HEADER], "10.0.0.1")
        assert refused.value.status == 401
        (entry,) = await store.enrollments("pending", "rdfm")
        await services.enrollment.accept(entry.id, {}, "admin", None)
        answer = await devices.authenticate(body, headers[SIGNATURE_HEADER], "10.0.0.1")
        token = answer["token"]
        name = "rdfm-52-54-00-12-34-56"
        assert await devices.device_for_token(f"Bearer token={token}") == name
        assert await devices.device_for_token(f"Bearer {token}") == name  # RFC 6750's form too
        forged = jwt.encode({"device_id": device.device_id, "created_at": clock.now_ms() // 1000,
                             "expires": 30}, b"x" * 32, algorithm="HS256")
        for header in (None, "", "Bearer", f"Basic {token}", f"Bearer token={forged}"):
            assert await devices.device_for_token(header) is None
        clock.advance(29)
        assert await devices.device_for_token(f"Bearer token={token}") == name
        clock.advance(1)  # expired: the client re-authenticates with the same key
        assert await devices.device_for_token(f"Bearer token={token}") is None
        fresh = (await devices.authenticate(body, headers[SIGNATURE_HEADER], "10.0.0.1"))["token"]
        assert await devices.device_for_token(f"Bearer token={fresh}") == name
        await services.enrollment.revoke(name, "admin", None)
        assert await devices.device_for_token(f"Bearer token={fresh}") is None
    finally:
        services.close()
        await store.close()
