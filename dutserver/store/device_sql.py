"""RDFM devices on the enrollment tables, written once for both stores (store/portable.py).

A device is an enrollment of kind `rdfm` keyed by (device id, key fingerprint): the entries that
decide its authentication, what an accepted device's authentication refreshes, and the key
rotation when an admin accepts a new key of a device that is accepted already (the device keeps
its agent, under the same name; shared/protocols/rdfm-device.md, section 2).
"""

from __future__ import annotations

import json
from typing import Any

from dutserver.core.model import EnrollmentRecord
from dutserver.store.enrollment_rows import COLUMNS, enrollment
from dutserver.store.portable import Operations, Steps, bump_accounts_rev

DEVICE_SECRET = "device$"  # + the entry's id: a device proves itself by its key, never a secret


def entries(device_id: str, key_fp: str) -> Steps:
    """The entries of one device's key that decide its authentication: accepted first, then
    pending, then rejected; newest first within each."""
    rows = yield (f"SELECT {COLUMNS} FROM enrollments WHERE device_id = ? "
                  "AND state IN ('accepted', 'pending', 'rejected') AND kind = 'rdfm' "
                  "AND key_fp = ? ORDER BY CASE state WHEN 'accepted' THEN 0 "
                  "WHEN 'pending' THEN 1 ELSE 2 END, id DESC LIMIT 10", (device_id, key_fp))
    return [enrollment(r) for r in rows]


def seen(enrollment_id: int, name: str, facts: str, address: str | None, now_ms: int) -> Steps:
    """An accepted device authenticated: its metadata becomes its agent's facts (nothing else
    of the agent changes: not its capabilities, not its labels) and its entry's last contact."""
    yield ("UPDATE enrollments SET facts = ?, address = ?, updated_ms = ? WHERE id = ?",
           (facts, address, now_ms, enrollment_id))
    yield ("INSERT INTO agents (name, facts) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET "
           "facts = excluded.facts", (name, facts))
    return None


def holder(device_id: str, enrollment_id: int) -> Steps:
    """The accepted entry of a device id other than enrollment_id (another key of the same
    device), as (id, agent name); None when the device has none."""
    rows = yield ("SELECT id, name FROM enrollments WHERE device_id = ? AND state = 'accepted' "
                  "AND kind = 'rdfm' AND id <> ? ORDER BY id DESC LIMIT 1",
                  (device_id, enrollment_id))
    return (int(rows[0][0]), str(rows[0][1])) if rows else None


def rotate(record: EnrollmentRecord, old_id: int, name: str, labels: str | None, actor: str,
           now_ms: int) -> Steps:
    """Accepts record (pending) as the new key of the device whose accepted entry is old_id,
    agent `name`: the agent keeps its name, labels and history (its facts become the new
    entry's), and the old entry is revoked, superseded: its key gets 401 from now on. Returns
    the record, or "name taken" (then nothing changed) when the name is no agent's any more."""
    # The account first: should it fail, nothing has been written yet.
    added = yield ("INSERT INTO accounts (name, type, secret_hash, created_ms, updated_ms) "
                   "VALUES (?, 'agent', ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                   "secret_hash = excluded.secret_hash, next_hash = NULL, "
                   "updated_ms = excluded.updated_ms WHERE accounts.type = 'agent' "
                   "RETURNING name", (name, DEVICE_SECRET + str(record.id), now_ms, now_ms))
    if not added:
        return "name taken"
    yield bump_accounts_rev()
    yield ("UPDATE enrollments SET state = 'revoked', decided_ms = ?, decided_by = ?, "
           "updated_ms = ? WHERE id = ? AND state = 'accepted'", (now_ms, actor, now_ms, old_id))
    rows = yield ("SELECT labels FROM agents WHERE name = ?", (name,))
    merged: dict[str, Any] = json.loads(rows[0][0]) if rows and rows[0][0] else {}
    merged.update(json.loads(record.labels or "{}"))
    if labels is not None:
        merged.update(json.loads(labels))
    merged_text = json.dumps(merged, sort_keys=True)
    yield ("INSERT INTO agents (name, facts, labels) VALUES (?, ?, ?) ON CONFLICT (name) "
           "DO UPDATE SET facts = excluded.facts, labels = excluded.labels",
           (name, record.facts, merged_text))
    rows = yield ("UPDATE enrollments SET state = 'accepted', name = ?, labels = ?, "
                  "decided_ms = ?, decided_by = ?, updated_ms = ? WHERE id = ? "
                  f"AND state = 'pending' RETURNING {COLUMNS}",
                  (name, merged_text, now_ms, actor, now_ms, record.id))
    return enrollment(rows[0])


class DeviceStore(Operations):
    """The Store port's RDFM device methods (a base of store/enrollment_sql.EnrollmentStore)."""


    async def device_entries(self, device_id: str, key_fp: str) -> list[EnrollmentRecord]:
        return list(await self._steps_read(entries, device_id, key_fp))

    async def device_seen(self, enrollment_id: int, name: str, facts: str, address: str | None,
                          now_ms: int) -> None:
        await self._steps(seen, enrollment_id, name, facts, address, now_ms)
