"""RDFM devices: enrollment and tokens (`POST /api/v1/auth/device`), and who a device token
stands for on the device routes after it (shared/protocols/rdfm-device.md, sections 1, 2, 7).

A device is identified by its id (`rdfm.hardware.macaddr`) and its RSA key, and proves both by
signing the raw body. Its enrollment is an entry of kind `rdfm` in the one list of requests
(core/enrollment.py), keyed by (id, key fingerprint): pending until an admin accepts it through
the native API, which makes it an agent (a key of an accepted device rotates the key instead).

What a real client does with our answers decides them: it waits only after 200 and 401, and
re-sends at once after anything else, forever. So 400 is only for what no real client sends
(malformed, unsigned, a bad signature), a device waiting for an admin gets 401, a throttled
address gets 401 and nothing is stored, and the body's timestamp is recorded, never checked
(the Linux client re-sends the same signed bytes every minute until it is accepted).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from dutserver.config import Settings
from dutserver.core.auth import Auth
from dutserver.core.clock import Clock
from dutserver.core.credentials import REVOKED
from dutserver.core.device_identity import (WEAK_BITS, AuthRequest, DeviceTokens, bearer_token,
                                            device_name, key_fingerprint, load_or_create_key,
                                            parse_auth_request, parse_public_key,
                                            verify_signature)
from dutserver.core.errors import ApiError
from dutserver.core.model import EnrollmentRecord
from dutserver.core.ports import Store

log = logging.getLogger("dutserver.devices")

THROTTLE_NAME = "(rdfm)"  # failures of this route are counted under this name, per address
_UNSAFE_ID = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")  # controls; lone surrogates (no UTF-8)
_WHY_MAX = 200


def token_key(path: Path) -> bytes:
    """The token-signing key file, created the first time (every node needs a copy of it)."""
    try:
        key = load_or_create_key(path)
    except FileExistsError:  # another node of the fleet created it a moment ago
        key = load_or_create_key(path)
    if len(key) < 32:
        raise ValueError(f"the RDFM token key file {path} holds no key of 32 bytes")
    return key


class RdfmDevices:
    def __init__(self, settings: Settings, store: Store, clock: Clock, auth: Auth) -> None:
        self.s = settings
        self.store = store
        self.clock = clock
        self.auth = auth
        self._tokens: DeviceTokens | None = None

    def start(self) -> None:
        """Start-up with RDFM devices served: the token key is read (or created) now, so that
        an unusable key file stops the server at once rather than fail the first device."""
        self._tokens = self._load_tokens()

    @property
    def tokens(self) -> DeviceTokens:
        """The device tokens, with their key read (or created) on first use."""
        if self._tokens is None:
            self._tokens = self._load_tokens()
        return self._tokens

    def _load_tokens(self) -> DeviceTokens:
        return DeviceTokens(token_key(self.s.rdfm_key_path), int(self.s.rdfm_token_s))

    # --- POST /api/v1/auth/device --------------------------------------------------------------

    async def authenticate(self, raw_body: bytes, signature: str | None,
                           address: str) -> dict[str, Any]:
        """A device asks for a token with its signed body: {"token", "expires"} once its key is
        accepted; else ApiError 401 (waiting for an admin, rejected, throttled) or 400
        (malformed, unsigned, a bad signature: nothing stored)."""
        banned = self._banned(address)
        try:
            request = parse_auth_request(raw_body)
            if _UNSAFE_ID.search(request.device_id):
                raise ValueError("rdfm.hardware.macaddr holds control characters")
            if not signature:
                raise ValueError("no X-RDFM-Device-Signature header")
            key = parse_public_key(request.public_key_pem)
            if not verify_signature(key, raw_body, signature):
                raise ValueError("the signature does not match the body and its public_key")
        except ValueError as exc:  # also a lone surrogate, which no store takes (its
            # UnicodeEncodeError, from parse_auth_request's size check of the metadata)
            raise self._refused(address, str(exc), banned) from None
        # Any JSON value is fine as a fact (only the three mandatory keys must be strings).
        facts = json.dumps(request.metadata, sort_keys=True, ensure_ascii=False)
        fingerprint = key_fingerprint(key)
        now = self.clock.now_ms()
        entries = await self.store.device_entries(request.device_id, fingerprint)
        accepted = next((e for e in entries if e.state == "accepted"), None)
        # A valid key of an accepted device gets its token even from a throttled address:
        # throttling is for those who fail, not for their neighbours behind one NAT.
        if accepted is not None and await self._usable(accepted.name):
            await self.store.device_seen(accepted.id, accepted.name, facts, address, now)
            token, expires = self.tokens.issue(request.device_id, now // 1000)
            return {"token": token, "expires": expires}
        if banned:
            raise ApiError(401, "Too many failed attempts from this address, try again later")
        pending = next((e for e in entries if e.state == "pending"), None)
        if pending is not None:  # a retry: every minute, for as long as it waits
            await self.store.refresh_enrollment(pending.id, facts, address, now)
        elif any(e.state == "rejected" for e in entries):
            # A rejection sticks to the key: a device retrying forever must not fill the
            # pending list again. (A new key makes a new request.)
            raise ApiError(401, f"Device {request.device_id}: this key was rejected")
        else:
            await self._request(request, key, fingerprint, facts, address, now)
        raise ApiError(401, f"Device {request.device_id} is waiting for an administrator to "
                            "accept it")

    def _banned(self, address: str) -> bool:
        try:
            self.auth.throttle.check(THROTTLE_NAME, address)
        except ApiError:
            return True
        return False

    def _refused(self, address: str, why: str, banned: bool) -> ApiError:
        """400 for what no real client sends, counted and audited like a failed login; 401 to
        a throttled address (the Linux client then waits; after a 429 it would not)."""
        if banned:
            return ApiError(401, "Too many failed attempts from this address, try again later")
        why = why[:_WHY_MAX]
        self.store.audit(THROTTLE_NAME, "rdfm_auth_failed", why, address)
        hit = self.auth.throttle.failed(THROTTLE_NAME, address)
        if hit:
            log.warning("banned %s for %s s (RDFM device authentication)", hit, self.s.ban_s)
            self.store.audit(THROTTLE_NAME, "ban", f"banned {hit} for {self.s.ban_s:g} s",
                             address)
        return ApiError(400, f"Invalid device authentication: {why}")

    async def _request(self, request: AuthRequest, key: RSAPublicKey, fingerprint: str,
                       facts: str, address: str, now: int) -> EnrollmentRecord:
        """A new pending entry for (id, key): audited once, here, not at every retry. The key
        is kept as a standard SubjectPublicKeyInfo PEM, whatever shape it came in."""
        pem = key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
        added = await self.store.add_enrollment(
            "rdfm", None, device_name(request.device_id), facts, None, address, None,
            request.device_id, fingerprint, pem, now, self.s.enroll_pending_max)
        assert added is not None  # None only for an unusable token, and there is none
        record = added[0]
        bits = key.key_size
        weak = bits < WEAK_BITS
        if weak:
            log.warning("RDFM device %s (enrollment %d) uses a weak %d-bit RSA key",
                        request.device_id, record.id, bits)
        self.store.audit(None, "enroll_request",
                         f"rdfm {record.id} as {record.name}: device {request.device_id}, key "
                         f"sha256 {fingerprint[:16]}… ({bits} bits{', weak' if weak else ''}), "
                         f"timestamp {request.timestamp}"
                         + (f", duplicate of {record.duplicate_of}" if record.duplicate_of
                            else ""), address)
        return record

    # --- the device routes after it ------------------------------------------------------------

    async def device_for_token(self, header: str | None) -> str | None:
        """The agent name of the device an Authorization header's token stands for (`Bearer
        token=<T>` or `Bearer <T>`); None when the token is missing, forged or expired, or its
        device is no longer accepted (revoked, removed): the device routes answer 401 then."""
        token = bearer_token(header)
        if token is None:
            return None
        device_id = self.tokens.verify(token, self.clock.now_ms() // 1000)
        if device_id is None:
            return None
        # The store, not memory: a revocation on any node holds at once.
        accepted = await self.store.enrollments("accepted", "rdfm", device_id, limit=1)
        if not accepted or not await self._usable(accepted[0].name):
            return None
        return accepted[0].name

    async def _usable(self, name: str) -> bool:
        """Whether the agent account of an accepted device is there (and not revoked)."""
        await self.auth.knows([name])  # accepted a moment ago, maybe on another node
        account = self.auth.accounts.get(name)
        return account is not None and account.kind == "agent" and account.secret_hash != REVOKED
