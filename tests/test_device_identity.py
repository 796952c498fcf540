"""dutserver/core/device_identity.py against the bytes of a protocol-faithful client
(tests/rdfm_device.py): keys in three PEM shapes, signatures over Go and Android bodies, the
enrollment body's rules, device names, JWT device tokens and the Bearer header."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import stat
import warnings
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from dutserver.core import device_identity as di
from dutserver.core.credentials import NAME_RE
from rdfm_device import AUTH_PATH, SIGNATURE_HEADER, Device, decode_token_payload

SECRET = b"k" * 32
SHAPES = ("linux", "android", "python")
_KEY = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # for quick extra devices


@pytest.fixture(scope="module")
def device() -> Device:
    # `<>&` and `/` in metadata make the Go and Android bytes differ from Python's json.dumps.
    return Device("52:54:00:12:34:56", metadata={"note": "a<b>&c/d", "café": "é\u2028"})


@pytest.fixture(scope="module")
def other() -> Device:
    return Device("52:54:00:ab:cd:ef")


def public_pem(key: Any) -> str:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def rsa_pem(bits: int, e: int = 65537) -> str:
    """An RSA public key of any size (the library generates nothing under 1024 bits; a public
    key needs no primes, so a random odd modulus does)."""
    n = secrets.randbits(bits) | (1 << (bits - 1)) | 1
    return public_pem(rsa.RSAPublicNumbers(e, n).public_key())


def body_with(**changes: Any) -> bytes:
    body: dict[str, Any] = {
        "metadata": {"rdfm.software.version": "v1", "rdfm.hardware.devtype": "x86_64",
                     "rdfm.hardware.macaddr": "aa:bb:cc:dd:ee:ff"},
        "public_key": "-----BEGIN PUBLIC KEY-----\n-----END PUBLIC KEY-----\n",
        "timestamp": 1700000000,
    }
    for name, value in changes.items():
        if value is ...:
            del body[name]
        else:
            body[name] = value
    return json.dumps(body).encode()


# -- public keys ---------------------------------------------------------------------------------


def test_the_three_shapes_are_what_the_note_describes(device: Device) -> None:
    linux, android, python = (device.pem(s) for s in SHAPES)  # type: ignore[arg-type]
    assert linux.startswith("-----BEGIN PUBLIC KEY-----\n") and linux.endswith("-----\n")
    assert {len(x) for x in linux.splitlines()[1:-2]} == {64}
    with pytest.raises(ValueError):  # why the parser must not be cryptography's PEM loader
        serialization.load_pem_public_key(linux.encode())
    assert android.endswith("-----END PUBLIC KEY-----")
    assert {len(x) for x in android.splitlines()[1:-2]} == {76}
    assert python == public_pem(device.key.public_key())


def test_all_shapes_parse_to_the_same_fingerprint(device: Device) -> None:
    spki = device.key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    expected = hashlib.sha256(spki).hexdigest()
    pems = [device.pem(s) for s in SHAPES]  # type: ignore[arg-type]
    pems += [p.replace("\n", "\r\n") for p in pems]  # CRLF
    pems += ["junk before\n" + device.pem("linux").rstrip("\n") + "\ntrailing junk"]
    pems += [device.pem("linux").replace("PUBLIC KEY", "RSA PUBLIC KEY")]  # the proper label
    for pem in pems:
        key = di.parse_public_key(pem)
        assert di.key_fingerprint(key) == expected
        assert key.public_numbers() == device.key.public_key().public_numbers()


def test_a_different_key_has_a_different_fingerprint(device: Device, other: Device) -> None:
    assert di.key_fingerprint(di.parse_public_key(device.pem())) != \
        di.key_fingerprint(di.parse_public_key(other.pem()))


def test_1024_bits_accepted_512_refused() -> None:
    assert di.parse_public_key(rsa_pem(1024)).key_size == 1024
    with pytest.raises(ValueError, match="512 bits"):
        di.parse_public_key(rsa_pem(512))
    with pytest.raises(ValueError, match="16392 bits"):
        di.parse_public_key(rsa_pem(16392))


@pytest.mark.parametrize("key", [ec.generate_private_key(ec.SECP256R1()).public_key(),
                                 ed25519.Ed25519PrivateKey.generate().public_key()],
                         ids=["ec", "ed25519"])
def test_non_rsa_keys_refused(key: Any) -> None:
    with pytest.raises(ValueError, match="not an RSA key"):
        di.parse_public_key(public_pem(key))


@pytest.mark.parametrize(("pem", "message"), [
    ("", "no BEGIN and END"),
    ("MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA", "no BEGIN and END"),
    ("-----BEGIN PUBLIC KEY-----\nnot base64!\n-----END PUBLIC KEY-----\n", "bad base64"),
    ("-----BEGIN PUBLIC KEY-----\nQUJD\n-----END PUBLIC KEY-----\n", "neither"),
    ("-----BEGIN PUBLIC KEY-----\néé\n-----END PUBLIC KEY-----\n", "bad base64"),
    ("-----BEGIN PUBLIC KEY-----\n" + "QUJD\n" * 4000 + "-----END PUBLIC KEY-----\n", "larger"),
])
def test_unparsable_keys_refused(pem: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        di.parse_public_key(pem)


# -- signatures ----------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["go", "android"])
@pytest.mark.parametrize("shape", SHAPES)
def test_signature_over_the_exact_body_verifies(device: Device, style: Any, shape: Any) -> None:
    body, headers = device.signed(style, shape)
    key = di.parse_public_key(di.parse_auth_request(body).public_key_pem)
    assert di.verify_signature(key, body, headers[SIGNATURE_HEADER])


def test_the_clients_bytes_are_their_own(device: Device) -> None:
    go, android = device.body("go", timestamp=1), device.body("android", timestamp=1000)
    assert b"a\\u003cb\\u003e\\u0026c/d" in go and b"\\u2028" in go
    assert go.startswith('{"metadata":{"café":"é'.encode()) and b'", "' not in go
    assert b'"a<b>&c\\/d"' in android and b"\\/" in android
    assert go.index(b'"metadata"') < go.index(b'"public_key"') < go.index(b'"timestamp"')
    assert android.index(b'"timestamp"') < android.index(b'"metadata"')
    assert json.loads(go)["metadata"] == json.loads(android)["metadata"] == device.metadata
    # A re-serialisation is other bytes: the signature holds only for the body as received.
    key = device.key.public_key()
    for body in (go, android):
        again = json.dumps(json.loads(body)).encode()
        assert again != body
        assert not di.verify_signature(key, again, device.sign(body))


def test_one_flipped_byte_fails(device: Device) -> None:
    body, headers = device.signed()
    key = device.key.public_key()
    signature = base64.b64decode(headers[SIGNATURE_HEADER])
    for i in (0, len(body) // 2, len(body) - 1):
        flipped = body[:i] + bytes([body[i] ^ 1]) + body[i + 1:]
        assert not di.verify_signature(key, flipped, headers[SIGNATURE_HEADER])
    for i in (0, len(signature) // 2, len(signature) - 1):
        flipped = signature[:i] + bytes([signature[i] ^ 0x80]) + signature[i + 1:]
        assert not di.verify_signature(key, body, base64.b64encode(flipped).decode())
    assert di.verify_signature(key, body, headers[SIGNATURE_HEADER])


def test_another_keys_signature_fails(device: Device, other: Device) -> None:
    body = device.body()
    assert not di.verify_signature(device.key.public_key(), body, other.sign(body))


def test_bad_base64_fails_without_raising(device: Device) -> None:
    body, headers = device.signed()
    good = headers[SIGNATURE_HEADER]
    key = device.key.public_key()
    urlsafe = good.replace("+", "-").replace("/", "_")
    bad = ["", "!!!!", good.rstrip("="), good + "=", good + "AAAA", good[:10] + "\n" + good[10:],
           " " + good, good[:-4] + "é===", "=" + good]
    if urlsafe != good:
        bad.append(urlsafe)
    if good.endswith("="):
        bad.append(good.rstrip("=") + "A")  # wrong length once the padding is gone
    for sig in bad:
        assert di.verify_signature(key, body, sig) is False, sig


# -- the enrollment body -------------------------------------------------------------------------


def test_go_and_android_bodies_parse(device: Device) -> None:
    go = di.parse_auth_request(device.body("go", timestamp=1700000000))
    assert (go.device_id, go.devtype, go.software_version) == ("52:54:00:12:34:56", "x86_64", "v1")
    assert go.metadata == device.metadata and go.timestamp == 1700000000
    assert go.public_key_pem == device.pem("linux")
    android = di.parse_auth_request(device.body("android", timestamp=1700000000123))
    assert android.timestamp == 1700000000123 and android.public_key_pem == device.pem("android")


@pytest.mark.parametrize("value", [1, 2.5, True, None, [], ["a", "b"], {"x": {"y": [1, None]}},
                                   "", "x" * 1000])
def test_extra_metadata_values_of_any_json_type_pass(value: Any) -> None:
    d = Device(metadata={"rdfm.software.tags": ["a", "b"], "local.value": value}, key=_KEY)
    for style in ("go", "android"):
        assert di.parse_auth_request(d.body(style))  # type: ignore[arg-type]


MANDATORY = ["rdfm.software.version", "rdfm.hardware.devtype", "rdfm.hardware.macaddr"]
META = json.loads(body_with())["metadata"]


@pytest.mark.parametrize(("body", "message"), [
    (b"", "not JSON"),
    (b"{", "not JSON"),
    (b"\xff\xfe{}", "not JSON"),
    (b"[]", "not a JSON object"),
    (b'"metadata"', "not a JSON object"),
    (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
    (body_with().replace(b"1700000000", b"NaN"), "NaN is not JSON"),
    (body_with().replace(b"1700000000", b"Infinity"), "Infinity is not JSON"),
    (body_with().replace(b"1700000000", b"9" * 5000), "not JSON"),
    (b"{}", "body has no metadata"),
    (body_with(metadata=...), "body has no metadata"),
    (body_with(metadata=[]), "metadata is not an object"),
    (body_with(metadata="x"), "metadata is not an object"),
    *[(body_with(metadata={k: v for k, v in META.items() if k != name}), f"metadata has no {name}")
      for name in MANDATORY],
    *[(body_with(metadata={**META, name: 1}), f"metadata {name} is not a string")
      for name in MANDATORY],
    (body_with(metadata={**META, "rdfm.hardware.devtype": None}), "devtype is not a string"),
    (body_with(metadata={**META, "rdfm.hardware.macaddr": ""}), "1 to 128 characters"),
    (body_with(metadata={**META, "rdfm.hardware.macaddr": "a" * 129}), "1 to 128 characters"),
    (body_with(metadata={**META, "big": "x" * 70_000}), "metadata is larger than 65536"),
    (body_with(metadata={**META, "big": "x" * 300_000}), "body is larger than 262144"),
    (body_with(public_key=...), "body has no public_key"),
    (body_with(public_key=None), "public_key is not a string"),
    (body_with(public_key=["-----BEGIN"]), "public_key is not a string"),
    (body_with(timestamp=...), "body has no timestamp"),
    (body_with(timestamp=1.7e9), "timestamp is not an integer"),
    (body_with(timestamp="1700000000"), "timestamp is not an integer"),
    (body_with(timestamp=True), "timestamp is not an integer"),
    (body_with(timestamp=None), "timestamp is not an integer"),
])
def test_bad_bodies_refused_with_the_reason(body: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        di.parse_auth_request(body)


def test_limits_are_inclusive() -> None:
    assert di.parse_auth_request(body_with(metadata={**META, "rdfm.hardware.macaddr": "é" * 128}))
    assert di.parse_auth_request(body_with(timestamp=0)).timestamp == 0


# -- device names --------------------------------------------------------------------------------


@pytest.mark.parametrize(("device_id", "name"), [
    ("52:54:00:12:34:56", "rdfm-52-54-00-12-34-56"),
    ("board_7.rev-B", "rdfm-board_7.rev-B"),
    ("café 🚀/x", "rdfm-caf----x"),
    ("a" * 128, "rdfm-" + "a" * 59),
])
def test_device_names(device_id: str, name: str) -> None:
    assert di.device_name(device_id) == name
    assert NAME_RE.fullmatch(di.device_name(device_id))


# -- tokens --------------------------------------------------------------------------------------


def test_token_round_trip_and_the_linux_clients_reading() -> None:
    tokens = di.DeviceTokens(SECRET, 300)
    token, expires = tokens.issue("52:54:00:12:34:56", 1_700_000_000)
    assert expires == 300
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
    assert decode_token_payload(token) == \
        {"device_id": "52:54:00:12:34:56", "created_at": 1_700_000_000, "expires": 300}
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    assert tokens.verify(token, 1_700_000_000) == "52:54:00:12:34:56"
    assert tokens.verify(token, 1_700_000_299) == "52:54:00:12:34:56"
    assert tokens.verify(token, 1_700_000_300) is None  # created_at + expires is the end
    assert tokens.verify(token, 1_800_000_000) is None


def test_a_token_keeps_its_own_lifetime() -> None:
    token, _ = di.DeviceTokens(SECRET, 3600).issue("d", 1000)
    assert di.DeviceTokens(SECRET, 30).verify(token, 1000 + 3599) == "d"


def _segments(token: str) -> list[str]:
    return token.split(".")


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_tampered_forged_and_foreign_tokens_rejected() -> None:
    tokens = di.DeviceTokens(SECRET, 300)
    token, _ = tokens.issue("victim", 1000)
    header, payload, signature = _segments(token)
    now = 1001
    forged_payload = _b64({"device_id": "admin", "created_at": 1000, "expires": 300})
    longer = _b64({"device_id": "victim", "created_at": 1000, "expires": 10**9})
    flipped = signature[:5] + ("A" if signature[5] != "A" else "B") + signature[6:]
    none_header = _b64({"alg": "none", "typ": "JWT"})
    with warnings.catch_warnings():  # our 32-byte key is short for HS512: the point here
        warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)
        hs512 = jwt.encode({"device_id": "victim", "created_at": 1000, "expires": 300}, SECRET,
                           algorithm="HS512")
    bad = [
        f"{header}.{forged_payload}.{signature}",
        f"{header}.{longer}.{signature}",
        f"{header}.{payload}.{flipped}",
        f"{header}.{payload}.",
        f"{none_header}.{payload}.",
        f"{none_header}.{payload}.{signature}",
        jwt.encode({"device_id": "victim", "created_at": 1000, "expires": 300}, None,
                   algorithm="none"),
        hs512,
        di.DeviceTokens(b"o" * 32, 300).issue("victim", 1000)[0],
    ]
    for t in bad:
        assert tokens.verify(t, now) is None, t
    assert tokens.verify(token, now) == "victim"


@pytest.mark.parametrize("payload", [
    {"device_id": "d", "created_at": 1000},
    {"device_id": "d", "expires": 300},
    {"created_at": 1000, "expires": 300},
    {"device_id": 7, "created_at": 1000, "expires": 300},
    {"device_id": "d", "created_at": True, "expires": 300},
    {"device_id": "d", "created_at": 1000, "expires": "300"},
    {"device_id": "d", "created_at": 1000.0, "expires": 300},
])
def test_tokens_of_the_wrong_shape_rejected_even_when_signed(payload: dict[str, Any]) -> None:
    assert di.DeviceTokens(SECRET, 300).verify(jwt.encode(payload, SECRET, "HS256"), 1001) is None


@pytest.mark.parametrize("junk", ["", ".", "..", "a.b.c", "a.b", "a.b.c.d", "é.é.é", "x" * 10_000,
                                  "eyJ.eyJ.eyJ", "Bearer token=a.b.c"])
def test_junk_tokens_rejected_without_raising(junk: str) -> None:
    assert di.DeviceTokens(SECRET, 300).verify(junk, 0) is None


def test_lifetime_and_key_length_asserted() -> None:
    with pytest.raises(AssertionError):
        di.DeviceTokens(SECRET, 29)
    with pytest.raises(AssertionError):
        di.DeviceTokens(b"short", 300)


# -- the Authorization header --------------------------------------------------------------------


@pytest.mark.parametrize(("header", "token"), [
    ("Bearer token=a.b_c-d", "a.b_c-d"),
    ("Bearer a.b_c-d", "a.b_c-d"),
    ("bearer TOKEN=abc", "abc"),
    ("BEARER abc", "abc"),
    ("Bearer   token=abc  ", "abc"),
    ('Bearer token="abc"', "abc"),
    (None, None),
    ("", None),
    ("Bearer", None),
    ("Bearer ", None),
    ("Bearer token=", None),
    ('Bearer token=""', None),
    ("Bearer a b", None),
    ("Bearer token=a b", None),
    ("Bearer a+b/c=", None),
    ("Bearer token=a=b", None),
    ("Bearer tok$en", None),
    ("Bearertoken=abc", None),
    ("Basic YTpi", None),
    ("Token abc", None),
    ("Bearer " + "a" * 4097, None),
    ("Bearer é", None),
])
def test_bearer_header(header: str | None, token: str | None) -> None:
    assert di.bearer_token(header) == token


def test_the_clients_header_round_trips() -> None:
    d = Device(key=_KEY)
    d.token, _ = di.DeviceTokens(SECRET, 300).issue(d.device_id, 1000)
    assert di.bearer_token(d.headers()["Authorization"]) == d.token


# -- the key file --------------------------------------------------------------------------------


def test_key_file_created_once_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "rdfm.key"
    key = di.load_or_create_key(path)
    assert len(key) == 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert di.load_or_create_key(path) == key
    assert di.DeviceTokens(key, 300).verify(di.DeviceTokens(key, 300).issue("d", 0)[0], 1) == "d"


# -- the client against a minimal route built from these pieces ----------------------------------


def test_client_enrolls_through_a_route_built_from_these_pieces(device: Device) -> None:
    """Rule order of the note (§2): body, then signature header, then key and signature; the
    route's real version lives in the server, this one only shows the pieces fit."""
    tokens = di.DeviceTokens(SECRET, 300)
    accepted = {di.key_fingerprint(device.key.public_key())}

    def route(request: httpx.Request) -> httpx.Response:
        assert request.url.path == AUTH_PATH
        raw = request.read()
        try:
            req = di.parse_auth_request(raw)
        except ValueError as e:
            return httpx.Response(400, json={"error": str(e)})
        signature = request.headers.get(SIGNATURE_HEADER)
        if signature is None:
            return httpx.Response(400, json={"error": "no signature"})
        try:
            key = di.parse_public_key(req.public_key_pem)
        except ValueError as e:
            return httpx.Response(400, json={"error": str(e)})
        if not di.verify_signature(key, raw, signature):
            return httpx.Response(400, json={"error": "bad signature"})
        if di.key_fingerprint(key) not in accepted:
            return httpx.Response(401, json={"error": "pending"})
        token, expires = tokens.issue(req.device_id, 1000)
        return httpx.Response(200, json={"token": token, "expires": expires})

    with httpx.Client(transport=httpx.MockTransport(route)) as client:
        for style in ("go", "android"):
            r = device.auth("http://rdfm.test/", style=style, client=client)  # type: ignore[arg-type]
            assert r.status_code == 200, r.text
            assert r.json()["expires"] == 300 and not device.needs_auth()
            assert tokens.verify(device.token or "", 1001) == device.device_id
        newcomer = Device("02:00:00:00:00:01", key=_KEY)
        request = newcomer.signed()
        assert newcomer.auth("http://rdfm.test", request=request, client=client).status_code == 401
        body, headers = request
        assert newcomer.auth("http://rdfm.test", client=client,
                             request=(body + b" ", headers)).status_code == 400
        unsigned = {k: v for k, v in headers.items() if k != SIGNATURE_HEADER}
        assert newcomer.auth("http://rdfm.test", client=client,
                             request=(body, unsigned)).status_code == 400
        accepted.add(di.key_fingerprint(_KEY.public_key()))
        # The very same bytes as before, hours later, now get a token (no freshness check).
        assert newcomer.auth("http://rdfm.test", request=request, client=client).status_code == 200
