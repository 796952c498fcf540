"""RDFM device identity: the enrollment body, its RSA key and signature, the JWT device tokens.

Pure functions for the route of `POST /api/v1/auth/device` and the device routes after it
(docs: shared/protocols/rdfm-device.md, sections 1 and 2). The signature covers the exact bytes
of the body, which Go and Android clients serialise differently, so it is checked against the
raw body, never against a re-serialisation. Every refusal is a ValueError naming the problem;
checks that answer yes or no (signature, token) never raise.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import jwt
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from dutserver.core.credentials import load_key

MAX_PEM = 16 * 1024
MIN_BITS = 1024  # upstream's own tools make 1024-bit keys; the Linux client 4096
WEAK_BITS = 2048  # accepted, but the caller should warn below this
MAX_BITS = 16384  # OpenSSL verifies nothing larger
MAX_BODY = 256 * 1024
MAX_METADATA = 64 * 1024
MAX_DEVICE_ID = 128
MAX_TOKEN = 4096
MANDATORY = ("rdfm.software.version", "rdfm.hardware.devtype", "rdfm.hardware.macaddr")
# Label-agnostic armour: the Linux client puts PKCS#1 under the SubjectPublicKeyInfo label.
_ARMOUR_RE = re.compile(r"-----BEGIN [A-Z0-9 ]+-----(.*?)-----END [A-Z0-9 ]+-----", re.S)
_NOT_NAME_RE = re.compile(r"[^A-Za-z0-9._-]")
_TOKEN_RE = re.compile(rf"[A-Za-z0-9_.-]{{1,{MAX_TOKEN}}}")
_JWT_RE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


def parse_public_key(pem: str) -> RSAPublicKey:
    """An RSA public key from any of the three PEM shapes: SPKI or PKCS#1, any label and wrap."""
    if len(pem) > MAX_PEM:
        raise ValueError(f"public_key is larger than {MAX_PEM} characters")
    armour = _ARMOUR_RE.search(pem)
    if armour is None:
        raise ValueError("public_key is not PEM: no BEGIN and END lines")
    try:
        # Any wrap width and line ending (76 columns on Android, CRLF): drop all whitespace.
        der = base64.b64decode("".join(armour.group(1).split()), validate=True)
    except ValueError:  # binascii.Error, and non-ASCII text
        raise ValueError("public_key is not PEM: bad base64 between the armour lines") from None
    try:
        key = serialization.load_der_public_key(der)  # SPKI (and PKCS#1 in recent versions)
    except (ValueError, UnsupportedAlgorithm):
        try:  # PKCS#1 RSAPublicKey, under the label that says so
            body = base64.encodebytes(der).decode()
            key = serialization.load_pem_public_key(
                f"-----BEGIN RSA PUBLIC KEY-----\n{body}-----END RSA PUBLIC KEY-----\n".encode())
        except (ValueError, UnsupportedAlgorithm):
            raise ValueError("public_key is neither SubjectPublicKeyInfo nor PKCS#1") from None
    if not isinstance(key, RSAPublicKey):
        raise ValueError(f"public_key is not an RSA key ({type(key).__name__})")
    if not MIN_BITS <= key.key_size <= MAX_BITS:
        raise ValueError(f"public_key has {key.key_size} bits: use {MIN_BITS} to {MAX_BITS}")
    return key


def key_fingerprint(key: RSAPublicKey) -> str:
    """Keys are compared by material, never by PEM text: SHA-256 hex of the SPKI DER."""
    der = key.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def verify_signature(key: RSAPublicKey, raw_body: bytes, signature_b64: str) -> bool:
    """RSASSA-PKCS1-v1_5 with SHA-256 over the body exactly as received; False for anything bad."""
    try:
        # strict_mode: padding required, nothing after it, no characters outside the alphabet.
        signature = binascii.a2b_base64(signature_b64, strict_mode=True)
        key.verify(signature, raw_body, padding.PKCS1v15(), hashes.SHA256())
    except (ValueError, InvalidSignature):  # binascii.Error is a ValueError
        return False
    return True


@dataclass(frozen=True)
class AuthRequest:
    device_id: str
    devtype: str
    software_version: str
    metadata: dict[str, Any]
    public_key_pem: str
    timestamp: int  # seconds (Go) or milliseconds (Android): stored, never checked (doc, §2)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # Python would take NaN and Infinity; JSON has none


def parse_auth_request(raw_body: bytes) -> AuthRequest:
    """The enrollment body, checked by rule 1 (types and mandatory keys only: a real client
    must never get 400, since it then re-sends at once in a loop, so extra keys of any type pass).
    """
    if len(raw_body) > MAX_BODY:
        raise ValueError(f"body is larger than {MAX_BODY} bytes")
    try:
        body = json.loads(raw_body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # also bad UTF-8 and absurd nesting
        raise ValueError(f"body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise ValueError("body is not a JSON object")
    metadata = _field(body, "metadata", dict, "an object")
    for name in MANDATORY:
        if name not in metadata:
            raise ValueError(f"metadata has no {name}")
        if not isinstance(metadata[name], str):
            raise ValueError(f"metadata {name} is not a string")
    device_id = metadata["rdfm.hardware.macaddr"]
    if not 1 <= len(device_id) <= MAX_DEVICE_ID:
        raise ValueError(f"rdfm.hardware.macaddr must have 1 to {MAX_DEVICE_ID} characters")
    size = len(json.dumps(metadata, ensure_ascii=False, separators=(",", ":")).encode())
    if size > MAX_METADATA:
        raise ValueError(f"metadata is larger than {MAX_METADATA} bytes")
    public_key = _field(body, "public_key", str, "a string")
    timestamp = _field(body, "timestamp", int, "an integer")
    if isinstance(timestamp, bool):  # a bool is an int to Python, not to JSON
        raise ValueError("timestamp is not an integer")
    return AuthRequest(device_id, metadata["rdfm.hardware.devtype"],
                       metadata["rdfm.software.version"], metadata, public_key, timestamp)


def _field(body: dict[str, Any], name: str, kind: type, what: str) -> Any:
    if name not in body:
        raise ValueError(f"body has no {name}")
    if not isinstance(body[name], kind):
        raise ValueError(f"{name} is not {what}")
    return body[name]


def device_name(device_id: str) -> str:
    """A dutserver agent name for a device id (MACs have ':', which names forbid). Different
    ids can give the same name (`a:b` and `a-b`, or a long shared prefix): the caller checks."""
    return ("rdfm-" + _NOT_NAME_RE.sub("-", device_id))[:64]


class DeviceTokens:
    """RDFM's token: an HS256 JWT {"device_id", "created_at", "expires"}, `expires` being a
    duration in seconds. The Linux client reads the payload without verifying it and
    re-authenticates at created + expires - 5 s, so `expires` must mean exactly that."""

    def __init__(self, secret: bytes, lifetime_s: int) -> None:
        assert lifetime_s >= 30, "clients renew 5 s before the end: keep a margin"
        assert len(secret) >= 32, "HS256 wants a key of 32 bytes or more (RFC 7518, 3.2)"
        self._secret = secret
        self.lifetime_s = lifetime_s

    def issue(self, device_id: str, now_s: int) -> tuple[str, int]:
        """The token and the response's `expires` (Android reads that one, as a long)."""
        payload = {"device_id": device_id, "created_at": now_s, "expires": self.lifetime_s}
        return jwt.encode(payload, self._secret, algorithm="HS256"), self.lifetime_s

    def verify(self, token: str, now_s: int) -> str | None:
        """The device id of a valid, unexpired token of ours; None for anything else."""
        if len(token) > MAX_TOKEN or not _JWT_RE.fullmatch(token):
            return None
        try:
            # algorithms pins HS256: `none`, and RS256 with our secret as a "public key", fail.
            payload = jwt.decode(token, self._secret, algorithms=["HS256"])
        except (jwt.PyJWTError, ValueError, TypeError):
            return None
        device_id = payload.get("device_id")
        created, expires = payload.get("created_at"), payload.get("expires")
        if not isinstance(device_id, str) or not _is_int(created) or not _is_int(expires):
            return None
        # The token's own duration, not today's setting: clients hold it that long and do not
        # re-authenticate on a 401.
        return device_id if created + expires > now_s else None


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def bearer_token(header: str | None) -> str | None:
    """The token of `Bearer token=<T>` (RDFM's form, an auth-param) or RFC 6750's `Bearer <T>`."""
    if not header or header[:7].lower() != "bearer ":
        return None
    token = header[7:].strip()
    if token[:6].lower() == "token=":  # auth-param names are case-insensitive (RFC 9110, 11.2)
        token = token[6:]
        if len(token) >= 2 and token[0] == token[-1] == '"':  # a quoted-string is allowed too
            token = token[1:-1]
    return token if _TOKEN_RE.fullmatch(token) else None


def load_or_create_key(path: Path) -> bytes:
    """The token-signing key: the agent-digest key's rules (32 random bytes as hex, created
    0600 with O_EXCL), in its own file. Every node must read the same file, or a token
    issued by one node fails on the next."""
    return load_key(path)
