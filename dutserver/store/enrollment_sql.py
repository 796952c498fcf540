"""Enrollment's tables and operations, written once for both stores (store/portable.py).

Tokens are kept as digests; a machine's request is a row of `enrollments`, whatever protocol it
came by (our agent, an RDFM device, an OCO agent); accepting one makes an agent account with the
machine's own credential digest, so an enrolled agent's poll is checked exactly as a classic
agent's (no enrollment look-up on the hot path).
"""

from __future__ import annotations

import json
from typing import Any

from dutserver.core.credentials import REVOKED
from dutserver.core.model import EnrollmentRecord, EnrollTokenRecord
from dutserver.store import device_sql, enrollment_rows
from dutserver.store.device_sql import DeviceStore
from dutserver.store.enrollment_rows import COLUMNS, TOKEN_COLUMNS
from dutserver.store.enrollment_rows import enrollment as _enrollment
from dutserver.store.enrollment_rows import token as _token
from dutserver.store.portable import Steps, bump_accounts_rev

SCHEMA = enrollment_rows.SCHEMA  # the migrations of both stores take it from here


# --- tokens ----------------------------------------------------------------------------------

def add_token(digest: str, note: str, created_by: str, now_ms: int, expires_ms: int,
              max_uses: int | None, labels: str, auto_accept: bool) -> Steps:
    rows = yield (f"INSERT INTO enroll_tokens ({TOKEN_COLUMNS[4:]}) "
                  "VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, NULL) RETURNING id",
                  (digest, note, created_by, now_ms, expires_ms, max_uses, labels,
                   int(auto_accept)))
    return int(rows[0][0])


def tokens() -> Steps:
    rows = yield (f"SELECT {TOKEN_COLUMNS} FROM enroll_tokens ORDER BY id DESC", ())
    return [_token(r) for r in rows]


def revoke_token(token_id: int, now_ms: int) -> Steps:
    rows = yield ("UPDATE enroll_tokens SET revoked_ms = ? WHERE id = ? AND revoked_ms IS NULL "
                  "RETURNING id", (now_ms, token_id))
    return bool(rows)


def token_by_digest(digest: str) -> Steps:
    rows = yield (f"SELECT {TOKEN_COLUMNS} FROM enroll_tokens WHERE digest = ?", (digest,))
    return _token(rows[0]) if rows else None


# --- requests --------------------------------------------------------------------------------

def request(kind: str, token_digest: str | None, name: str, facts: str, capabilities: str | None,
            address: str | None, secret_hash: str | None, device_id: str | None,
            key_fp: str | None, public_key: str | None, now_ms: int,
            pending_max: int) -> Steps:
    """A machine asks to join. With a token: it must be usable now, and one use of it is
    taken in the same transaction (two machines racing for its last use: one wins). A name or
    machine id that an accepted agent holds already makes it a duplicate: pending whatever the
    token says. At most pending_max pending requests per token and per address: past that the
    oldest of them expires. Returns (record, auto_accept, labels) or None when the token is
    not usable."""
    token: EnrollTokenRecord | None = None
    if token_digest is not None:
        rows = yield ("UPDATE enroll_tokens SET uses = uses + 1 WHERE digest = ? "
                      "AND revoked_ms IS NULL AND expires_ms > ? "
                      "AND (max_uses IS NULL OR uses < max_uses) "
                      f"RETURNING {TOKEN_COLUMNS}", (token_digest, now_ms))
        if not rows:
            return None
        token = _token(rows[0])
    duplicate = yield from _duplicate_of(name, device_id)
    labels = token.labels if token is not None else "{}"
    token_id = token.id if token is not None else None
    rows = yield (f"INSERT INTO enrollments ({COLUMNS[4:]}) VALUES "
                  "(?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL) "
                  f"RETURNING {COLUMNS}",
                  (kind, name, facts, capabilities, token_id, address, secret_hash, device_id,
                   key_fp, public_key, duplicate, labels, now_ms, now_ms))
    record = _enrollment(rows[0])
    for column, key in (("token_id", token_id), ("address", address)):
        if key is not None:
            yield from _expire_oldest(column, key, pending_max, now_ms)
    return record, bool(token is not None and token.auto_accept and duplicate is None), labels


def _duplicate_of(name: str, device_id: str | None) -> Steps:
    rows = yield ("SELECT name FROM accounts WHERE name = ?", (name,))
    if rows:
        return str(rows[0][0])
    if device_id:
        rows = yield ("SELECT name FROM enrollments WHERE device_id = ? AND state = 'accepted' "
                      "ORDER BY id LIMIT 1", (device_id,))
        if rows:
            return str(rows[0][0])
    return None


def _expire_oldest(column: str, key: Any, pending_max: int, now_ms: int) -> Steps:
    rows = yield (f"SELECT id FROM enrollments WHERE {column} = ? AND state = 'pending' "
                  "ORDER BY id DESC", (key,))
    for (old,) in rows[pending_max:]:
        yield ("UPDATE enrollments SET state = 'expired', updated_ms = ? WHERE id = ? "
               "AND state = 'pending'", (now_ms, old))


def refresh_device(enrollment_id: int, facts: str, address: str | None, now_ms: int) -> Steps:
    """A device asking again (an RDFM retry): its facts and last contact, nothing else."""
    yield ("UPDATE enrollments SET facts = ?, address = ?, updated_ms = ? WHERE id = ?",
           (facts, address, now_ms, enrollment_id))
    return None


def get(enrollment_id: int) -> Steps:
    rows = yield (f"SELECT {COLUMNS} FROM enrollments WHERE id = ?", (enrollment_id,))
    return _enrollment(rows[0]) if rows else None


def find(state: str | None, kind: str | None, device_id: str | None, name: str | None,
         limit: int) -> Steps:
    clauses, args = [], []  # type: list[str], list[Any]
    for column, value in (("state", state), ("kind", kind), ("device_id", device_id),
                          ("name", name)):
        if value is not None:
            clauses.append(f"{column} = ?")
            args.append(value)
    where = " WHERE " + " AND ".join(clauses) if clauses else ""
    rows = yield (f"SELECT {COLUMNS} FROM enrollments{where} ORDER BY id DESC LIMIT ?",
                  (*args, limit))
    return [_enrollment(r) for r in rows]


def pending_count() -> Steps:
    rows = yield ("SELECT count(*) FROM enrollments WHERE state = 'pending'", ())
    return int(rows[0][0])


# --- decisions -------------------------------------------------------------------------------

def accept(enrollment_id: int, name: str | None, labels: str | None, actor: str,
           now_ms: int) -> Steps:
    """pending -> accepted, and the agent account it becomes: under the name asked for (or
    given), made unique with -2, -3 … when taken; a name given by the admin must be free. A
    new key of an accepted RDFM device rotates its key instead (device_sql.rotate). Returns the
    record, or a string saying why not."""
    rows = yield (f"SELECT {COLUMNS} FROM enrollments WHERE id = ?", (enrollment_id,))
    if not rows:
        return "unknown"
    record = _enrollment(rows[0])
    if record.state != "pending":
        return f"already {record.state}"
    if record.kind == "rdfm" and record.device_id is not None:
        holder = yield from device_sql.holder(record.device_id, record.id)
        if holder is not None:  # a new key of an accepted device: the device keeps its agent
            if name is not None and name != holder[1]:
                return f"a new key of {holder[1]}: accept it without a name"
            return (yield from device_sql.rotate(record, holder[0], holder[1], labels, actor,
                                                 now_ms))
    final = name if name is not None else record.name
    if name is None:
        # (`_` in a name is a LIKE wildcard too: a few rows more, which the set sorts out)
        taken = yield ("SELECT name FROM accounts WHERE name = ? OR name LIKE ?",
                       (final, final + "-%"))
        final = _free_name(final, {str(r[0]) for r in taken})
    secret = record.secret_hash if record.secret_hash is not None else "device$" + str(record.id)
    added = yield ("INSERT INTO accounts (name, type, secret_hash, created_ms, updated_ms) "
                   "VALUES (?, 'agent', ?, ?, ?) ON CONFLICT (name) DO NOTHING RETURNING name",
                   (final, secret, now_ms, now_ms))
    if not added:
        return "name taken"
    yield bump_accounts_rev()
    merged = json.loads(record.labels or "{}")
    if labels is not None:
        merged.update(json.loads(labels))
    merged_text = json.dumps(merged, sort_keys=True)
    yield ("INSERT INTO agents (name, facts, labels, capabilities) VALUES (?, ?, ?, ?) "
           "ON CONFLICT (name) DO UPDATE SET facts = excluded.facts, labels = excluded.labels, "
           "capabilities = excluded.capabilities",
           (final, record.facts, merged_text, record.capabilities))
    rows = yield ("UPDATE enrollments SET state = 'accepted', name = ?, labels = ?, "
                  "decided_ms = ?, decided_by = ?, updated_ms = ? WHERE id = ? "
                  f"AND state = 'pending' RETURNING {COLUMNS}",
                  (final, merged_text, now_ms, actor, now_ms, enrollment_id))
    return _enrollment(rows[0])


def _free_name(base: str, taken: set[str]) -> str:
    if base not in taken:
        return base
    n = 2
    while True:
        suffix = f"-{n}"
        candidate = base[:64 - len(suffix)] + suffix
        if candidate not in taken:
            return candidate
        n += 1


def reject(enrollment_id: int, actor: str, now_ms: int) -> Steps:
    rows = yield ("UPDATE enrollments SET state = 'rejected', decided_ms = ?, decided_by = ?, "
                  f"updated_ms = ? WHERE id = ? AND state = 'pending' RETURNING {COLUMNS}",
                  (now_ms, actor, now_ms, enrollment_id))
    if rows:
        return _enrollment(rows[0])
    rows = yield ("SELECT state FROM enrollments WHERE id = ?", (enrollment_id,))
    return f"already {rows[0][0]}" if rows else "unknown"


def revoke_agent(name: str, actor: str, now_ms: int) -> Steps:
    """The agent's credential stops working at once (every node re-reads the accounts when
    their revision moves); the account stays, so its history keeps its name."""
    rows = yield ("UPDATE accounts SET secret_hash = ?, next_hash = NULL, "
                  "updated_ms = ? WHERE name = ? AND type = 'agent' RETURNING name",
                  (REVOKED, now_ms, name))
    if not rows:
        return False
    yield bump_accounts_rev()
    yield ("UPDATE enrollments SET state = 'revoked', decided_ms = ?, decided_by = ?, "
           "updated_ms = ? WHERE name = ? AND state = 'accepted'", (now_ms, actor, now_ms, name))
    return True


def set_next_secret(name: str, next_hash: str, now_ms: int) -> Steps:
    rows = yield ("UPDATE accounts SET next_hash = ?, updated_ms = ? WHERE name = ? "
                  "AND type = 'agent' AND secret_hash <> ? RETURNING name",
                  (next_hash, now_ms, name, REVOKED))
    if rows:
        yield bump_accounts_rev()
    return bool(rows)


def promote_secret(name: str, next_hash: str, now_ms: int) -> Steps:
    """The new credential was used: it replaces the old one (which stops working)."""
    rows = yield ("UPDATE accounts SET secret_hash = next_hash, next_hash = NULL, updated_ms = ? "
                  "WHERE name = ? AND next_hash = ? RETURNING name", (now_ms, name, next_hash))
    if rows:
        yield bump_accounts_rev()
    return bool(rows)


def adopt(name: str, facts: str, actor: str, now_ms: int) -> Steps:
    """An existing agent account becomes an enrolled identity (an accepted enrollment of its
    own, so that it can be revoked and re-keyed like one); False when it is not an agent or
    is enrolled already."""
    rows = yield ("SELECT secret_hash FROM accounts WHERE name = ? AND type = 'agent'", (name,))
    if not rows:
        return "unknown"
    have = yield ("SELECT id FROM enrollments WHERE name = ? AND state = 'accepted'", (name,))
    if have:
        return "already enrolled"
    rows = yield (f"INSERT INTO enrollments ({COLUMNS[4:]}) VALUES "
                  "('agent', 'accepted', ?, ?, NULL, NULL, NULL, ?, NULL, NULL, NULL, NULL, '{}', "
                  f"?, ?, ?, ?) RETURNING {COLUMNS}",
                  (name, facts, rows[0][0], now_ms, now_ms, now_ms, actor))
    return _enrollment(rows[0])


# --- an agent's own declarations -------------------------------------------------------------

def set_profile(name: str, capabilities: str | None, facts: str | None) -> Steps:
    """What an agent says of itself when it connects; bumps the accounts' revision only when
    its capabilities changed (every node checks submits against them)."""
    rows = yield ("SELECT capabilities FROM agents WHERE name = ?", (name,))
    changed = not rows or rows[0][0] != capabilities
    if rows:
        yield ("UPDATE agents SET capabilities = ?, facts = coalesce(?, facts) WHERE name = ?",
               (capabilities, facts, name))
    else:
        yield ("INSERT INTO agents (name, capabilities, facts) VALUES (?, ?, ?)",
               (name, capabilities, facts))
    if changed:
        yield bump_accounts_rev()
    return changed


def set_labels(name: str, labels: str) -> Steps:
    rows = yield ("SELECT name FROM accounts WHERE name = ? AND type = 'agent'", (name,))
    if not rows:
        return False
    yield ("INSERT INTO agents (name, labels) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET "
           "labels = excluded.labels", (name, labels))
    return True


def profiles() -> Steps:
    """name -> (capabilities, facts, labels) of every agent that has any."""
    rows = yield ("SELECT name, capabilities, facts, labels FROM agents", ())
    return {str(r[0]): (r[1], r[2], r[3]) for r in rows}


class EnrollmentStore(DeviceStore):
    """The Store port's enrollment methods, for both stores: each provides `_steps` (an
    operation in its writer's next transaction) and `_steps_read` (on a reader)."""


    async def add_enroll_token(self, digest: str, note: str, created_by: str, now_ms: int,
                               expires_ms: int, max_uses: int | None, labels: str,
                               auto_accept: bool) -> int:
        return int(await self._steps(add_token, digest, note, created_by, now_ms, expires_ms,
                                     max_uses, labels, auto_accept))

    async def enroll_tokens(self) -> list[EnrollTokenRecord]:
        return list(await self._steps_read(tokens))

    async def revoke_enroll_token(self, token_id: int, now_ms: int) -> bool:
        return bool(await self._steps(revoke_token, token_id, now_ms))

    async def enroll_token(self, digest: str) -> EnrollTokenRecord | None:
        found: EnrollTokenRecord | None = await self._steps_read(token_by_digest, digest)
        return found

    async def add_enrollment(self, kind: str, token_digest: str | None, name: str, facts: str,
                             capabilities: str | None, address: str | None,
                             secret_hash: str | None, device_id: str | None, key_fp: str | None,
                             public_key: str | None, now_ms: int,
                             pending_max: int) -> tuple[EnrollmentRecord, bool, str] | None:
        return await self._steps(request, kind, token_digest, name, facts, capabilities, address,  # type: ignore[no-any-return]
                                 secret_hash, device_id, key_fp, public_key, now_ms, pending_max)

    async def refresh_enrollment(self, enrollment_id: int, facts: str, address: str | None,
                                 now_ms: int) -> None:
        await self._steps(refresh_device, enrollment_id, facts, address, now_ms)

    async def enrollment(self, enrollment_id: int) -> EnrollmentRecord | None:
        found: EnrollmentRecord | None = await self._steps_read(get, enrollment_id)
        return found

    async def enrollments(self, state: str | None = None, kind: str | None = None,
                          device_id: str | None = None, name: str | None = None,
                          limit: int = 1000) -> list[EnrollmentRecord]:
        return list(await self._steps_read(find, state, kind, device_id, name, limit))

    async def pending_enrollments(self) -> int:
        return int(await self._steps_read(pending_count))

    async def accept_enrollment(self, enrollment_id: int, name: str | None, labels: str | None,
                                actor: str, now_ms: int) -> EnrollmentRecord | str:
        return await self._steps(accept, enrollment_id, name, labels, actor, now_ms)  # type: ignore[no-any-return]

    async def reject_enrollment(self, enrollment_id: int, actor: str,
                                now_ms: int) -> EnrollmentRecord | str:
        return await self._steps(reject, enrollment_id, actor, now_ms)  # type: ignore[no-any-return]

    async def revoke_agent(self, name: str, actor: str, now_ms: int) -> bool:
        return bool(await self._steps(revoke_agent, name, actor, now_ms))

    async def set_next_secret(self, name: str, next_hash: str, now_ms: int) -> bool:
        return bool(await self._steps(set_next_secret, name, next_hash, now_ms))

    async def promote_secret(self, name: str, next_hash: str, now_ms: int) -> bool:
        return bool(await self._steps(promote_secret, name, next_hash, now_ms))

    async def adopt_agent(self, name: str, facts: str, actor: str,
                          now_ms: int) -> EnrollmentRecord | str:
        return await self._steps(adopt, name, facts, actor, now_ms)  # type: ignore[no-any-return]

    async def set_agent_profile(self, name: str, capabilities: str | None,
                                facts: str | None) -> bool:
        return bool(await self._steps(set_profile, name, capabilities, facts))

    async def set_agent_labels(self, name: str, labels: str) -> bool:
        return bool(await self._steps(set_labels, name, labels))

    async def agent_profiles(self) -> dict[str, tuple[str | None, str | None, str | None]]:
        return dict(await self._steps_read(profiles))
