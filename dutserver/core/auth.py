"""Who is asking: the agent credential check, admin logins and sessions, throttling and bans.

The store is the truth, shared by every process of a fleet; this module keeps what it needs on
every request in memory, with a bounded staleness: the accounts (re-read when their revision
changes, looked at every `accounts_refresh_s`), the bans in force (re-read as often), and the
sessions this process has seen (each read again once it is `session_cache_s` old, so that a
logout or an expiry on another node holds here after that long at most).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from dataclasses import dataclass
from typing import cast

from dutserver.config import Settings
from dutserver.core.credentials import (AGENT_PREFIX, DUMMY_HASH, MAX_SECRET, check_name,
                                        check_secret, hash_secret, load_key, new_session_token,
                                        parse_credentials, session_digest, verify_admin)
from dutserver.core.errors import ApiError
from dutserver.core.model import SessionRecord
from dutserver.core.clock import Clock
from dutserver.core.ports import AccountExists, Store
from dutserver.core.throttle import Throttle

log = logging.getLogger("dutserver.auth")

_DIGESTS_KEPT = 1024
_DIGEST_HEADER_MAX = 80  # "Bearer " and 64 hex digits, with a little room
_PRUNE_EVERY_S = 60.0
_KEY_CHECK = "key_check"


@dataclass(slots=True)
class Account:
    name: str
    kind: str
    secret_hash: str
    next_hash: str | None = None  # a re-keyed agent's new credential, until first used
    # The task types the agent said it runs (None: it never said; a classic agent runs any).
    capabilities: frozenset[str] | None = None


def _capabilities(text: str | None) -> frozenset[str] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return frozenset(v for v in value if isinstance(v, str)) if isinstance(value, list) else None


@dataclass(slots=True)
class Session:
    account: str
    created_ms: int
    last_used_ms: int
    checked: float  # monotonic time it was last read from the store
    dirty: bool = False
    rechecking: bool = False  # a read of it from the store is under way


class Auth:
    def __init__(self, settings: Settings, store: Store, clock: Clock) -> None:
        self.s = settings
        self.store = store
        self.clock = clock
        self.key = load_key(settings.key_path)
        # Keyed once: OpenSSL 3 spends more on setting up an HMAC than on hashing a secret.
        self._agent_mac = hmac.new(self.key, digestmod=hashlib.sha256)
        self.accounts: dict[str, Account] = {}
        self._verified: dict[str, Account] = {}  # Authorization header -> the agent it proved
        self.sessions: dict[str, Session] = {}  # digest -> the session, as last read
        self._digests: dict[str, str] = {}  # session header -> its token's digest
        self.throttle = Throttle(settings, store, clock)
        self._rev = -1
        self._next_prune = 0.0
        # Agents whose credential changed or ended since the last look (revoked, re-keyed,
        # removed): whoever refreshes ends their parked polls.
        self.changed_agents: set[str] = set()

    async def check_key(self) -> None:
        """Start-up: the agent-digest key must be the one this database's digests were made
        with (every node of a fleet needs a copy of the same key file). Raises ValueError."""
        check = hmac.new(self.key, b"dutserver key check", hashlib.sha256).hexdigest()[:32]
        stored = await self.store.setting(_KEY_CHECK)
        if stored is None:
            await self.store.set_setting(_KEY_CHECK, check)
        elif not hmac.compare_digest(stored, check):
            raise ValueError(f"the key file {self.s.key_path} is not the key of this database: "
                             "give every node a copy of the same key file (--key-file)")

    async def refresh(self) -> bool:
        """Re-reads the accounts when their revision changed (every change bumps it), and the
        bans in force. Returns whether the accounts changed."""
        await self.throttle.refresh()
        rev = await self.store.accounts_rev()
        if rev == self._rev:
            return False
        rows = await self.store.accounts()
        before = self.accounts
        fresh: dict[str, Account] = {}
        for r in rows:
            acc = Account(r.name, r.kind, r.secret_hash, r.next_hash,
                          _capabilities(r.capabilities))
            old = before.get(r.name)
            # An unchanged account keeps its object: the headers it proved stay proved
            # (_remember), so that one agent's change costs the others no HMAC.
            fresh[r.name] = old if old == acc else acc
        self.accounts = fresh
        for name, acc in before.items():  # a changed password ends the account's sessions
            current = self.accounts.get(name)
            if current is None or current.secret_hash != acc.secret_hash:
                self.revoke_account(name)
                if acc.kind == "agent":
                    self.changed_agents.add(name)  # its parked polls end (Services.refresh)
        self._rev = rev
        for digest, sess in list(self.sessions.items()):
            owner = self.accounts.get(sess.account)
            if owner is None or owner.kind != "admin":
                del self.sessions[digest]
        return True

    def added(self, name: str, kind: str, secret_hash: str) -> None:
        """An account this process created: usable at once, without re-reading them all (the
        revision it bumped still makes the next refresh re-read, which is then a no-op)."""
        self.accounts[name] = Account(name, kind, secret_hash)

    async def knows(self, names: list[str]) -> None:
        """Makes sure an account added a moment ago (by the CLI, another node) is seen before
        we call it unknown."""
        if any(n not in self.accounts for n in names):
            await self.refresh()

    # --- agents ------------------------------------------------------------------------------

    def agent_known(self, header: str | None, address: str) -> str | None:
        """The agent named by an Authorization header if the accounts in memory say so; None
        when they cannot tell (then `agent` looks again after a refresh). Raises when banned."""
        acc = self._verified.get(header) if header else None
        if acc is not None and self.accounts.get(acc.name) is acc:
            # A valid credential is never refused for what others did from its address (a
            # re-imaged room behind one NAT): throttling is for the ones that fail.
            return acc.name
        name, secret = parse_credentials(header)
        if name is None:
            raise ApiError(403, "Authorization failure")
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
        # Maybe added or changed a moment ago: look again after a refresh (which may have been
        # done meanwhile by a concurrent request, so check whatever it returned).
        await self.refresh()
        if self._agent_matches(name, digest):
            return name
        # Only now the throttle: a banned pair gets 429 instead of 403. A known name counts
        # per (name, address) only; an unknown one counts against its address too (a scan).
        self.throttle.check(name, address, whole_address=name not in self.accounts)
        self._failure(name, address, "agent_auth_failed",
                      per_address=name not in self.accounts)
        raise ApiError(403, "Authorization failure")

    def _agent_digest(self, secret: str) -> str:
        """agent_digest(self.key, secret), from the keyed HMAC state."""
        mac = self._agent_mac.copy()
        mac.update(secret.encode())
        return AGENT_PREFIX + mac.hexdigest()

    def _agent_matches(self, name: str, digest: str) -> bool:
        acc = self.accounts.get(name)
        if acc is None or acc.kind != "agent":
            return False
        if hmac.compare_digest(digest, acc.secret_hash):
            return True
        if acc.next_hash is not None and hmac.compare_digest(digest, acc.next_hash):
            # A re-keyed agent's first use of its new credential: from now on only that one
            # works (the old one kept working until here, in case the agent died midway).
            promoted = Account(acc.name, acc.kind, acc.next_hash, None, acc.capabilities)
            self.accounts[name] = promoted
            self.revoke_account(name)
            asyncio.ensure_future(self._promote(name, acc.next_hash))
            return True
        return False

    async def _promote(self, name: str, next_hash: str) -> None:
        try:
            await self.store.promote_secret(name, next_hash, self.clock.now_ms())
        except Exception:  # the store is away: the old credential works until it is back
            log.exception("recording %s's new credential failed", name)

    def enrollment_failure(self, address: str, what: str) -> None:
        """A wrong enrollment token or credential: counted against the address, as logins."""
        self._failure("(enrollment)", address, "enroll_failed", detail=what)

    def _failure(self, name: str, address: str, action: str, per_address: bool = True,
                 detail: str = "bad credentials") -> None:
        self.store.audit(name, action, detail, address)
        banned = self.throttle.failed(name, address, per_address)
        if banned:
            log.warning("banned %s for %s s", banned, self.s.ban_s)
            self.store.audit(name, "ban", f"banned {banned} for {self.s.ban_s:g} s", address)

    # --- admins and sessions -----------------------------------------------------------------

    async def login(self, user: object, password: object, address: str) -> str:
        if not isinstance(user, str) or not isinstance(password, str) or not user:
            raise ApiError(403, "Invalid credentials")
        self.throttle.check(user, address)
        # Always, not only for a name not in memory: a store read for unknown names alone would
        # tell them apart by time. It also makes a password changed on another node count at once.
        await self.refresh()
        acc = self.accounts.get(user)
        is_admin = acc is not None and acc.kind == "admin"
        stored = acc.secret_hash if (acc is not None and is_admin) else DUMMY_HASH
        ok = len(password) <= MAX_SECRET and await asyncio.to_thread(
            verify_admin, stored, password)
        if not (ok and is_admin):
            self._failure(user, address, "login_failed")
            raise ApiError(403, "Invalid credentials")
        self.throttle.succeeded(user, address)
        token, digest = new_session_token()
        now = self.clock.now_ms()
        await self.store.add_session(digest, user, now)
        self.sessions[digest] = Session(user, now, now, self.clock.monotonic())
        self.store.audit(user, "login", "session opened", address)
        return token

    def session(self, header: str | None) -> str | None:
        """The admin a session header belongs to, from memory: None when missing, unknown,
        expired, or not checked against the store for `session_cache_s` (then `session_of`
        reads it). A session in steady use is read again in the background after half that
        time, so that its requests never wait for the store."""
        digest = self._digest(header)
        sess = self.sessions.get(digest) if digest else None
        if sess is None:
            return None
        age = self.clock.monotonic() - sess.checked
        if age > self.s.session_cache_s:
            return None
        if age > self.s.session_cache_s / 2 and not sess.rechecking:
            sess.rechecking = True
            asyncio.ensure_future(self._recheck(cast(str, digest), sess))
        return self._use(cast(str, digest), sess)

    async def _recheck(self, digest: str, sess: Session) -> None:
        # No try/finally with a return inside: compiled, that released the store once too
        # often (a crash a little later).
        record: SessionRecord | None = None
        failed = False
        try:
            record = await self.store.session(digest)
        except Exception:  # the store is away: the session ages out of the cache instead
            log.exception("reading session from the store failed")
            failed = True
        sess.rechecking = False
        if failed:
            return
        if record is None:  # ended elsewhere
            if self.sessions.get(digest) is sess:
                del self.sessions[digest]
            return
        sess.last_used_ms = max(sess.last_used_ms, record.last_used_ms)
        sess.checked = self.clock.monotonic()

    async def session_of(self, header: str | None) -> str | None:
        """session(), reading the store when memory cannot tell (the session was opened on
        another node, or was last checked too long ago)."""
        user = self.session(header)
        if user is not None:
            return user
        digest = self._digest(header)
        if digest is None:
            return None
        record = await self.store.session(digest)
        if record is None:
            self.sessions.pop(digest, None)
            return None
        sess = self.sessions.get(digest)
        if sess is None:
            sess = self.sessions[digest] = Session(record.account, record.created_ms,
                                                   record.last_used_ms, 0.0)
        sess.last_used_ms = max(sess.last_used_ms, record.last_used_ms)
        sess.checked = self.clock.monotonic()
        return self._use(digest, sess)

    def _use(self, digest: str, sess: Session) -> str | None:
        now = self.clock.now_ms()
        acc = self.accounts.get(sess.account)
        if self._expired(sess, now) or acc is None or acc.kind != "admin":
            del self.sessions[digest]
            self.store.delete_session(digest)
            return None
        sess.last_used_ms = now
        sess.dirty = True
        return sess.account

    def _expired(self, sess: Session, now: int) -> bool:
        return (now - sess.last_used_ms > self.s.session_idle_s * 1000
                or now - sess.created_ms > self.s.session_max_s * 1000)

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

    async def logout(self, header: str, address: str | None) -> None:
        """Ends the session; audited when it was one."""
        user = await self.session_of(header)
        digest = self._digest(header)
        if digest is None:
            return
        self.sessions.pop(digest, None)
        self._digests.pop(header, None)  # a token that ended
        self.store.delete_session(digest)
        if user is not None:
            self.store.audit(user, "logout", "session closed", address)

    async def create_account(self, name: object, kind: str, secret: object, actor: str,
                             address: str | None) -> None:
        """Creates an account; never replaces one (409). Self-registration and the admin API."""
        check_name(name)
        assert isinstance(name, str)  # check_name refused anything else
        checked = check_secret(kind, secret)
        exists = "Agent already exists" if kind == "agent" else "Account already exists"
        if name in self.accounts:
            raise ApiError(409, exists)
        digest = await asyncio.to_thread(hash_secret, kind, checked, self.key)
        try:
            await self.store.add_account(name, kind, digest, self.clock.now_ms())
        except AccountExists:
            raise ApiError(409, exists) from None
        self.added(name, kind, digest)
        self.store.audit(actor, "account_create", f"{kind} {name}", address)

    def revoke_account(self, name: str) -> None:
        for digest, sess in list(self.sessions.items()):
            if sess.account == name:
                del self.sessions[digest]

    def flush_sessions(self) -> None:
        """Writes idle-time updates in one batch; called by the sweeper, not per request.
        Now and then also deletes the stored sessions that ended (those of every node)."""
        now = self.clock.now_ms()
        if self.clock.monotonic() >= self._next_prune:
            self._next_prune = self.clock.monotonic() + _PRUNE_EVERY_S
            self.store.prune_sessions(now - int(self.s.session_idle_s * 1000),
                                      now - int(self.s.session_max_s * 1000))
        rows = []
        for digest, sess in list(self.sessions.items()):
            if self._expired(sess, now):
                # Only forgotten here: another node may have used it since this one last read
                # it; prune_sessions deletes by the stored last use, which every node writes.
                del self.sessions[digest]
            elif sess.dirty:
                sess.dirty = False
                rows.append((sess.last_used_ms, digest))
        if rows:
            self.store.touch_sessions(rows)
