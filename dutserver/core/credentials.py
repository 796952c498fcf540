"""Credentials: names, secrets and their digests, the Authorization header's forms.

Admins' passwords are argon2id hashes, checked in a thread. Agents send their secret with every
poll, so their check must cost microseconds: the database holds HMAC-SHA256(key, secret) with the
key in a file beside the database (DBFILE.key), so a stolen database alone does not let anyone
test guesses offline, and a restart with 10,000 agents reconnecting costs no hashing storm.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from dutserver.core.errors import ApiError

NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
MIN_SECRET = {"agent": 16, "admin": 8}
MAX_SECRET = 1024  # argon2 would happily hash megabytes; nobody's password is that long
AGENT_PREFIX = "hmac-sha256$"
REVOKED = "revoked$"  # a revoked agent's secret digest: no credential hashes to it
_hasher = PasswordHasher()
# Unknown users are checked against this, so a wrong name takes as long as a wrong password.
DUMMY_HASH = _hasher.hash(secrets.token_hex(16))


def check_name(name: object) -> None:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ApiError(400, "Invalid name: use 1 to 64 characters of A-Z a-z 0-9 . _ -")


def check_secret(kind: str, secret: object) -> str:
    if kind not in MIN_SECRET:
        raise ApiError(400, "Invalid account type: use admin or agent")
    if not isinstance(secret, str) or not (MIN_SECRET[kind] <= len(secret) <= MAX_SECRET):
        what = "Agent secret" if kind == "agent" else "Password"
        raise ApiError(400, f"{what} must have {MIN_SECRET[kind]} to {MAX_SECRET} characters")
    return secret


def load_key(path: Path) -> bytes:
    """The agent-digest key, created (readable by the owner only) the first time it is needed."""
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    return key


def hash_secret(kind: str, secret: str, key: bytes) -> str:
    if kind == "agent":
        return agent_digest(key, secret)
    return _hasher.hash(secret)


def agent_digest(key: bytes, secret: str) -> str:
    """Keyed HMAC-SHA256: microseconds per poll, worthless without the key file."""
    return AGENT_PREFIX + hmac.digest(key, secret.encode(), "sha256").hex()


def verify_admin(stored: str, password: str) -> bool:
    """Whether password matches an argon2 hash (slow on purpose: run it in a thread)."""
    try:
        return _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


def parse_credentials(header: str | None) -> tuple[str | None, str]:
    """Splits `Basic base64(name:secret)` or the classic bare `name:secret` at the first colon."""
    if not header:
        return None, ""
    if header[:6].lower() == "basic ":
        try:
            header = base64.b64decode(header[6:].strip(), validate=True).decode()
        except ValueError:  # binascii.Error, UnicodeDecodeError, and non-ASCII input
            return None, ""
    name, sep, secret = header.partition(":")
    if not sep or not name:
        return None, ""
    return name, secret


def session_digest(header: str | None) -> str | None:
    if not header:
        return None
    token = header[7:].strip() if header[:7].lower() == "bearer " else header.strip()
    if len(token) != 64:
        return None
    return hashlib.sha256(token.encode()).hexdigest()


def new_session_token() -> tuple[str, str]:
    """A session token for the client, and the digest that the store keeps of it."""
    token = secrets.token_hex(32)
    return token, hashlib.sha256(token.encode()).hexdigest()
