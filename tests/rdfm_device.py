"""A test RDFM device client, written from the protocol note only (shared/protocols/rdfm-device.md,
sections 1 and 2), byte-exact where the real clients differ:

- the public key in the three PEM shapes seen in the wild (`pem("linux" | "android" | "python")`);
- the enrollment body serialised like the Go client (sorted keys, no spaces, HTML characters
  escaped, timestamp in seconds) or like Android's org.json (keys in its own order, `/` written
  as `\\/`, timestamp in milliseconds), signed over those exact bytes;
- the token read the way the Linux client reads it: payload decoded without verification, renewed
  5 s before acquired_at + payload.expires.

It knows nothing of dutserver, so it tests the server against the protocol, not against itself.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any, Literal

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

Shape = Literal["linux", "android", "python"]
Style = Literal["go", "android"]
AUTH_PATH = "/api/v1/auth/device"
SIGNATURE_HEADER = "X-RDFM-Device-Signature"
# JWT algorithms the Linux client's JWT library knows: anything else is "not a parsable JWT".
KNOWN_ALGS = {"HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "ES512",
              "PS256", "PS384", "PS512", "EdDSA"}
RENEW_MARGIN_S = 5


def go_json(value: Any) -> bytes:
    """Go's encoding/json: map keys sorted, no spaces, UTF-8 as is, and HTML-safe escapes of
    < > & (plus U+2028 and U+2029, which Go escapes too). These characters can only occur inside
    strings, so replacing them in Python's output gives Go's bytes."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return text.encode()


def android_json(value: Any) -> bytes:
    """Android's org.json toString(): no spaces, keys in the map's order (not sorted), `/`
    escaped as `\\/` (only strings can hold one)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text.replace("/", "\\/").encode()


def _wrap(text: str, width: int) -> list[str]:
    return [text[i:i + width] for i in range(0, len(text), width)]


def _unsorted(d: dict[str, Any]) -> dict[str, Any]:
    """An order that is certainly not the sorted one (a HashMap's order is arbitrary)."""
    return dict(reversed(sorted(d.items())))


class Device:
    def __init__(self, device_id: str = "52:54:00:12:34:56", *, bits: int = 2048,
                 devtype: str = "x86_64", version: str = "v1",
                 metadata: dict[str, Any] | None = None,
                 key: rsa.RSAPrivateKey | None = None) -> None:
        self.key = key or rsa.generate_private_key(public_exponent=65537, key_size=bits)
        self.device_id = device_id
        self.metadata: dict[str, Any] = {
            "rdfm.software.version": version,
            "rdfm.hardware.devtype": devtype,
            "rdfm.hardware.macaddr": device_id,
            "rdfm.software.supports_rsync": "true",
            "rdfm.software.supports_xdelta": "true",
            **(metadata or {}),
        }
        self.token: str | None = None
        self.token_deadline = 0.0  # monotonic time after which the Linux client re-authenticates

    # -- the public key ------------------------------------------------------------------------

    def pem(self, shape: Shape = "linux") -> str:
        public = self.key.public_key()
        if shape == "python":
            return public.public_bytes(serialization.Encoding.PEM,
                                       serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        if shape == "linux":  # PKCS#1 under the SPKI label (Go's pem.Encode: 64 columns, "\n")
            der = public.public_bytes(serialization.Encoding.DER,
                                      serialization.PublicFormat.PKCS1)
            lines = _wrap(base64.b64encode(der).decode(), 64)
            return "-----BEGIN PUBLIC KEY-----\n" + "\n".join(lines) + "\n-----END PUBLIC KEY-----\n"
        # Android: SPKI, Base64.DEFAULT (76 columns, each line ends "\n"), nothing after END.
        der = public.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
        lines = _wrap(base64.b64encode(der).decode(), 76)
        return "-----BEGIN PUBLIC KEY-----\n" + "".join(x + "\n" for x in lines) + \
            "-----END PUBLIC KEY-----"

    # -- the enrollment request ----------------------------------------------------------------

    def body(self, style: Style = "go", shape: Shape | None = None,
             timestamp: int | None = None) -> bytes:
        """The enrollment body as that client writes it (shape: the key's PEM; by default the
        one that client sends)."""
        if style == "go":
            ts = int(time.time()) if timestamp is None else timestamp
            return go_json({"metadata": self.metadata, "public_key": self.pem(shape or "linux"),
                            "timestamp": ts})
        ts = int(time.time() * 1000) if timestamp is None else timestamp
        return android_json(_unsorted({"timestamp": ts, "public_key": self.pem(shape or "android"),
                                       "metadata": _unsorted(self.metadata)}))

    def sign(self, body: bytes) -> str:
        """RSASSA-PKCS1-v1_5, SHA-256, over the exact bytes; standard base64 with padding."""
        signature = self.key.sign(body, padding.PKCS1v15(), hashes.SHA256())
        return base64.b64encode(signature).decode()

    def signed(self, style: Style = "go", shape: Shape | None = None,
               timestamp: int | None = None) -> tuple[bytes, dict[str, str]]:
        """Body and headers, ready to send, and to re-send unchanged as the Linux client does."""
        body = self.body(style, shape, timestamp)
        ctype = "application/json" if style == "go" else "application/json; charset=utf-8"
        return body, {"Content-Type": ctype, SIGNATURE_HEADER: self.sign(body)}

    def auth(self, url: str, *, request: tuple[bytes, dict[str, str]] | None = None,
             style: Style = "go", client: httpx.Client | None = None) -> httpx.Response:
        """POST /api/v1/auth/device to the base URL; on 200, keep the token as the client does."""
        body, headers = request or self.signed(style)
        if client is None:
            r = httpx.post(url.rstrip("/") + AUTH_PATH, content=body, headers=headers)
        else:
            r = client.post(url.rstrip("/") + AUTH_PATH, content=body, headers=headers)
        if r.status_code == 200:
            self.take_token(r.json(), style)
        return r

    async def auth_async(self, client: httpx.AsyncClient, url: str = "", *,
                         request: tuple[bytes, dict[str, str]] | None = None,
                         style: Style = "go") -> httpx.Response:
        body, headers = request or self.signed(style)
        r = await client.post(url.rstrip("/") + AUTH_PATH, content=body, headers=headers)
        if r.status_code == 200:
            self.take_token(r.json(), style)
        return r

    # -- the token -----------------------------------------------------------------------------

    def take_token(self, answer: dict[str, Any], style: Style = "go") -> None:
        """Linux: lifetime from the JWT payload (unverified), or renew before every request if
        it is no parsable JWT. Android: the answer's `expires`, read as a long."""
        token = answer["token"]
        now = time.monotonic()
        if style == "android":
            lifetime = answer["expires"]
            assert isinstance(lifetime, int) and not isinstance(lifetime, bool)
        else:
            payload = decode_token_payload(token)
            lifetime = payload["expires"] if payload and isinstance(payload.get("expires"), int) \
                else RENEW_MARGIN_S
        self.token = token
        self.token_deadline = now + lifetime - RENEW_MARGIN_S

    def needs_auth(self) -> bool:
        return self.token is None or time.monotonic() >= self.token_deadline

    def headers(self) -> dict[str, str]:
        """RDFM's Authorization form: an auth-param, not RFC 6750's bare token."""
        assert self.token is not None
        return {"Authorization": f"Bearer token={self.token}"}


def _b64url(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def decode_token_payload(token: str) -> dict[str, Any] | None:
    """The Linux client's reading: three base64url segments, a JSON header with a known `alg`,
    and the payload as JSON, with no signature check. None: not a parsable JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        header = json.loads(_b64url(parts[0]))
        payload = json.loads(_b64url(parts[1]))
    except ValueError:
        return None
    if not isinstance(header, dict) or header.get("alg") not in KNOWN_ALGS:
        return None
    return payload if isinstance(payload, dict) else None
