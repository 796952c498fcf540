"""Who is asking: password hashing, the agent credential check, sessions, login throttling.

Admins' passwords are argon2id hashes, checked in a thread. Agents send their secret with every
poll, so their check must cost microseconds: the database holds HMAC-SHA256(key, secret) with the
key in a file beside the database (DBFILE.key), so a stolen database alone does not let anyone
test guesses offline, and a restart with 10,000 agents reconnecting costs no hashing storm.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from dutserver import store
from dutserver.config import Settings
from dutserver.errors import ApiError
from dutserver.store import Store

log = logging.getLogger("dutserver.auth")

NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
MIN_SECRET = {"agent": 16, "admin": 8}
MAX_SECRET = 1024  # argon2 would happily hash megabytes; nobody's password is that long
AGENT_PREFIX = "hmac-sha256$"
_hasher = PasswordHasher()
# Unknown users are checked against this, so a wrong name takes as long as a wrong password.
_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))


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


def _verify_admin(stored: str, password: str) -> bool:
    try:
        return _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


@dataclass(slots=True)
class Account:
    name: str
    kind: str
    secret_hash: str


@dataclass(slots=True)
class Session:
    account: str
    created_ms: int
    last_used_ms: int
    dirty: bool = False


class Throttle:
    """Counts failures per (account, address) and per address; bans past the limits."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self._pair: dict[tuple[str, str], tuple[int, float]] = {}  # -> (failures, first at)
        self._addr: dict[str, tuple[int, float]] = {}
        self._banned: dict[object, float] = {}  # (account, address) or address -> until

    def check(self, account: str, address: str) -> None:
        if not self._banned:
            return  # the usual case: nobody is banned
        now = time.monotonic()
        for key in ((account, address), address):
            until = self._banned.get(key)
            if until is not None:
                if until > now:
                    raise ApiError(429, "Too many failed attempts, try again later",
                                   {"Retry-After": str(max(1, round(until - now)))})
                del self._banned[key]

    def failed(self, account: str, address: str) -> str | None:
        """Records a failure; returns what got banned by it, if anything."""
        now = time.monotonic()
        window = max(self.s.ban_s, 60.0)  # failures count for a minute, however short the ban
        count, first = self._pair.get((account, address), (0, now))
        count = count + 1 if now - first < window else 1
        self._pair[(account, address)] = (count, first if count > 1 else now)
        acount, afirst = self._addr.get(address, (0, now))
        acount = acount + 1 if now - afirst < 60 else 1
        self._addr[address] = (acount, afirst if acount > 1 else now)
        if acount >= self.s.ban_address_failures:
            self._banned[address] = now + self.s.ban_s
            self._addr.pop(address, None)
            return f"address {address}"
        if count >= self.s.ban_failures:
            self._banned[(account, address)] = now + self.s.ban_s
            self._pair.pop((account, address), None)
            return f"account {account} from {address}"
        return None

    def succeeded(self, account: str, address: str) -> None:
        self._pair.pop((account, address), None)

    def prune(self) -> None:
        """Forgets old counters and ended bans, so memory stays bounded under a flood."""
        now = time.monotonic()
        window = max(self.s.ban_s, 60)
        self._pair = {k: v for k, v in self._pair.items() if now - v[1] < window}
        self._addr = {k: v for k, v in self._addr.items() if now - v[1] < 60}
        self._banned = {k: v for k, v in self._banned.items() if v > now}


class Auth:
    def __init__(self, settings: Settings, db: Store) -> None:
        self.s = settings
        self.db = db
        self.key = load_key(settings.key_path)
        # Keyed once: OpenSSL 3 spends more on setting up an HMAC than on hashing a secret.
        self._agent_mac = hmac.new(self.key, digestmod=hashlib.sha256)
        self.accounts: dict[str, Account] = {}
        self._verified: dict[str, Account] = {}  # Authorization header -> the agent it proved
        self.sessions: dict[str, Session] = {}
        self._digests: dict[str, str] = {}  # session header -> its token's digest
        self.throttle = Throttle(settings)
        self._rev = -1

    async def load(self) -> None:
        await self.refresh()
        now = store.now_ms()
        for digest, account, created, used in await self.db.read(store.sessions_all):
            self.sessions[digest] = Session(account, created, used)
        self._drop_invalid_sessions(now)

    async def refresh(self) -> bool:
        """Re-reads the accounts when their revision changed (the CLI bumps it on each change).

        Returns whether anything changed."""
        rev = await self.db.read(store.accounts_rev)
        if rev == self._rev:
            return False
        rows = await self.db.read(store.accounts_all)
        before = self.accounts
        self.accounts = {r[0]: Account(r[0], r[1], r[2]) for r in rows}
        for name, acc in before.items():  # a changed password ends the account's sessions
            now = self.accounts.get(name)
            if now is not None and now.secret_hash != acc.secret_hash:
                self.revoke_account(name)
        self._rev = rev
        self._drop_invalid_sessions(store.now_ms())
        return True

    def added(self, name: str, kind: str, secret_hash: str) -> None:
        """An account this process created: usable at once, without re-reading them all (the
        revision it bumped still makes the next refresh re-read, which is then a no-op)."""
        self.accounts[name] = Account(name, kind, secret_hash)

    async def knows(self, names: list[str]) -> None:
        """Makes sure an account the CLI added a moment ago is seen before we call it unknown."""
        if any(n not in self.accounts for n in names):
            await self.refresh()

    def _drop_invalid_sessions(self, now: int) -> None:
        for digest, sess in list(self.sessions.items()):
            acc = self.accounts.get(sess.account)
            if acc is None or acc.kind != "admin" or self._expired(sess, now):
                del self.sessions[digest]

    def _expired(self, sess: Session, now: int) -> bool:
        return (now - sess.last_used_ms > self.s.session_idle_s * 1000
                or now - sess.created_ms > self.s.session_max_s * 1000)

    # --- agents ------------------------------------------------------------------------------

    def agent_known(self, header: str | None, address: str) -> str | None:
        """The agent named by an Authorization header if the accounts in memory say so; None
        when they cannot tell (then `agent` looks again after a refresh). Raises when banned."""
        acc = self._verified.get(header) if header else None
        if acc is not None and self.accounts.get(acc.name) is acc:
            self.throttle.check(acc.name, address)
            return acc.name
        name, secret = parse_credentials(header)
        if name is None:
            raise ApiError(403, "Authorization failure")
        self.throttle.check(name, address)
        if not self._agent_matches(name, self._agent_digest(secret)):
            return None
        self._remember(cast(str, header), self.accounts[name])
        return name

    def _remember(self, header: str, acc: Account) -> None:
        """An agent polls with the same header every time: once it matched, the exact same
        header string stands for that account for as long as the account object is the one in
        memory (a refresh after any change replaces them all). That skips the HMAC and the
        base64 of every later poll; only a header that matched gets in, so it stays small."""
        if len(self._verified) > 2 * len(self.accounts) + 64:
            self._verified.clear()
        self._verified[header] = acc

    async def agent(self, header: str | None, address: str) -> str:
        """The agent named by an Authorization header (Basic or classic name:secret), or 403."""
        known = self.agent_known(header, address)
        if known is not None:
            return known
        name, secret = parse_credentials(header)
        assert name is not None  # agent_known raised otherwise
        digest = self._agent_digest(secret)
        # Maybe the CLI added or changed it a moment ago: look again after a refresh (which may
        # have been done meanwhile by a concurrent request, so check whatever it returned).
        await self.refresh()
        if self._agent_matches(name, digest):
            return name
        self._failure(name, address, "agent_auth_failed")
        raise ApiError(403, "Authorization failure")

    def _agent_digest(self, secret: str) -> str:
        """agent_digest(self.key, secret), from the keyed HMAC state."""
        mac = self._agent_mac.copy()
        mac.update(secret.encode())
        return AGENT_PREFIX + mac.hexdigest()

    def _agent_matches(self, name: str, digest: str) -> bool:
        acc = self.accounts.get(name)
        return (acc is not None and acc.kind == "agent"
                and hmac.compare_digest(digest, acc.secret_hash))

    def _failure(self, name: str, address: str, action: str) -> None:
        self.db.audit(name, action, "bad credentials", address)
        banned = self.throttle.failed(name, address)
        if banned:
            log.warning("banned %s for %s s", banned, self.s.ban_s)
            self.db.audit(name, "ban", f"banned {banned} for {self.s.ban_s:g} s", address)

    # --- admins and sessions -----------------------------------------------------------------

    async def login(self, user: object, password: object, address: str) -> str:
        if not isinstance(user, str) or not isinstance(password, str) or not user:
            raise ApiError(403, "Invalid credentials")
        self.throttle.check(user, address)
        await self.knows([user])
        acc = self.accounts.get(user)
        is_admin = acc is not None and acc.kind == "admin"
        stored = acc.secret_hash if (acc is not None and is_admin) else _DUMMY_HASH
        ok = len(password) <= MAX_SECRET and await asyncio.to_thread(
            _verify_admin, stored, password)
        if not (ok and is_admin):
            self._failure(user, address, "login_failed")
            raise ApiError(403, "Invalid credentials")
        self.throttle.succeeded(user, address)
        token = secrets.token_hex(32)
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = store.now_ms()
        await self.db.write(store.session_insert(digest, user, now))
        self.sessions[digest] = Session(user, now, now)
        self.db.audit(user, "login", "session opened", address)
        return token

    def session(self, header: str | None) -> str | None:
        """The admin a session header belongs to, or None when missing, unknown or expired."""
        digest = self._digest(header)
        sess = self.sessions.get(digest) if digest else None
        if sess is None:
            return None
        now = store.now_ms()
        if self._expired(sess, now) or sess.account not in self.accounts:
            del self.sessions[digest]  # type: ignore[arg-type]
            self.db.write_nowait(store.session_delete(digest))  # type: ignore[arg-type]
            return None
        sess.last_used_ms = now
        sess.dirty = True
        return sess.account

    def expires_ms(self, header: str | None) -> int | None:
        """When the session ends if it stays idle from now."""
        digest = self._digest(header)
        sess = self.sessions.get(digest) if digest else None
        if sess is None:
            return None
        return int(min(sess.last_used_ms + self.s.session_idle_s * 1000,
                       sess.created_ms + self.s.session_max_s * 1000))

    def _digest(self, header: str | None) -> str | None:
        """session_digest, remembered for the headers seen last: a client sends the same one
        with every request, and OpenSSL 3 spends more on setting up a SHA-256 than on the
        hash (1 % of a round trip). Only what hashes to a digest is kept, and only so many."""
        if header is None:
            return None
        digest = self._digests.get(header)
        if digest is None:
            digest = session_digest(header)
            if digest is not None and len(header) <= _DIGEST_HEADER_MAX:
                if len(self._digests) >= _DIGESTS_KEPT:
                    self._digests.clear()
                self._digests[header] = digest
        return digest

    def logout(self, header: str | None) -> bool:
        digest = self._digest(header)
        if header is None or digest is None:
            return False
        sess = self.sessions.pop(digest, None)
        self._digests.pop(header, None)  # a token that ended
        self.db.write_nowait(store.session_delete(digest))
        return sess is not None

    async def create_account(self, name: object, kind: str, secret: object, actor: str,
                             address: str) -> None:
        """Creates an account; never replaces one (409). Self-registration and the admin API."""
        check_name(name)
        assert isinstance(name, str)  # check_name refused anything else
        checked = check_secret(kind, secret)
        exists = "Agent already exists" if kind == "agent" else "Account already exists"
        if name in self.accounts:
            raise ApiError(409, exists)
        digest = await asyncio.to_thread(hash_secret, kind, checked, self.key)

        try:  # a partial, not a closure (a reference cycle when compiled: native.py)
            await self.db.write(functools.partial(_add_account, name, kind, digest))
        except store.AccountExists:
            raise ApiError(409, exists) from None
        self.added(name, kind, digest)
        self.db.audit(actor, "account_create", f"{kind} {name}", address)

    def revoke_account(self, name: str) -> None:
        for digest, sess in list(self.sessions.items()):
            if sess.account == name:
                del self.sessions[digest]

    def flush_sessions(self) -> None:
        """Writes idle-time updates in one batch; called by the sweeper, not per request."""
        now = store.now_ms()
        rows = []
        for digest, sess in list(self.sessions.items()):
            if self._expired(sess, now):
                del self.sessions[digest]
                self.db.write_nowait(store.session_delete(digest))
            elif sess.dirty:
                sess.dirty = False
                rows.append((sess.last_used_ms, digest))
        if rows:
            self.db.write_nowait(store.sessions_touch(rows))


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


_DIGESTS_KEPT = 1024
_DIGEST_HEADER_MAX = 80  # "Bearer " and 64 hex digits, with a little room


def session_digest(header: str | None) -> str | None:
    if not header:
        return None
    token = header[7:].strip() if header[:7].lower() == "bearer " else header.strip()
    if len(token) != 64:
        return None
    return hashlib.sha256(token.encode()).hexdigest()


def _add_account(name: str, kind: str, digest: str, conn: Any) -> None:
    store.account_add(conn, name, kind, digest, store.now_ms())
