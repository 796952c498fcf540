"""The SQL of the SQLite store: functions of a sqlite3.Connection, run by SqliteStore on its
writer (in a group-committed batch) or on its reader thread. Nothing outside dutserver/store/
calls these: the core sees SqliteStore through core.ports.Store.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from dutserver.core.credentials import REVOKED
from dutserver.core.model import (AccountRecord, AgentRecord, AuditRecord, SessionRecord,
                                  TaskFilter, TaskRecord)
from dutserver.core.ports import AccountExists

TASK_COLUMNS = ("id", "agent", "type", "payload", "state", "submitted_by", "created_ms",
                "expires_ms", "delivered_ms", "finished_ms", "result", "delivered_by")
_TASK_SELECT = "SELECT " + ", ".join(TASK_COLUMNS) + " FROM tasks"

# Task rows as SqliteStore.save_task makes them: every field, with 0 or "" for NULL (a None
# costs the sqlite3 module an adapter lookup per value; these cost nothing to bind).
TASK_INSERT = (
    "INSERT INTO tasks (id, agent, type, payload, state, submitted_by, created_ms, expires_ms, "
    "delivered_ms, finished_ms, result, delivered_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, "
    "nullif(?, 0), nullif(?, 0), nullif(?, ''), nullif(?, ''))")
TASK_UPDATE = (
    "UPDATE tasks SET state = ?5, delivered_ms = nullif(?9, 0), finished_ms = nullif(?10, 0), "
    "result = nullif(?11, ''), delivered_by = nullif(?12, '') WHERE id = ?1"
)  # the row of TASK_INSERT: its other fields unused
TASK_SAVE = TASK_INSERT + (
    " ON CONFLICT (id) DO UPDATE SET state = excluded.state, delivered_ms = excluded.delivered_ms, "
    "finished_ms = excluded.finished_ms, result = excluded.result, "
    "delivered_by = excluded.delivered_by")
AUDIT_INSERT = "INSERT INTO audit (at_ms, actor, action, detail, address) VALUES (?, ?, ?, ?, ?)"


def _task(row: Sequence[Any]) -> TaskRecord:
    return TaskRecord(*row)


# --- accounts, sessions, bans, settings -----------------------------------------------------

def account_add(conn: sqlite3.Connection, name: str, kind: str, secret_hash: str,
                now_ms: int) -> None:
    try:
        conn.execute("INSERT INTO accounts (name, type, secret_hash, created_ms, updated_ms) "
                     "VALUES (?, ?, ?, ?, ?)",
                     (name, kind, secret_hash, now_ms, now_ms))
    except sqlite3.IntegrityError as exc:
        raise AccountExists(name) from exc
    _bump_accounts_rev(conn)


def account_set_secret(conn: sqlite3.Connection, name: str, secret_hash: str,
                       now_ms: int) -> bool:
    cur = conn.execute("UPDATE accounts SET secret_hash = ?, updated_ms = ? WHERE name = ?",
                       (secret_hash, now_ms, name))
    if cur.rowcount:
        conn.execute("DELETE FROM sessions WHERE account = ?", (name,))
        _bump_accounts_rev(conn)
    return cur.rowcount > 0


def account_remove(conn: sqlite3.Connection, name: str) -> bool:
    cur = conn.execute("DELETE FROM accounts WHERE name = ?", (name,))
    if cur.rowcount:
        conn.execute("DELETE FROM sessions WHERE account = ?", (name,))
        _bump_accounts_rev(conn)
    return cur.rowcount > 0


def accounts(conn: sqlite3.Connection, name: str | None = None) -> list[AccountRecord]:
    sql = ("SELECT a.name, a.type, a.secret_hash, a.created_ms, a.updated_ms, a.next_hash, "
           "g.capabilities FROM accounts a LEFT JOIN agents g ON g.name = a.name")
    rows = (conn.execute(sql + " WHERE a.name = ?", (name,)) if name is not None
            else conn.execute(sql + " ORDER BY a.name"))
    return [AccountRecord(*row) for row in rows]


def accounts_rev(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT value FROM settings WHERE key = 'accounts_rev'").fetchone()[0])


def _bump_accounts_rev(conn: sqlite3.Connection) -> None:
    # Every process polls this number to see changes made by the others (and the CLI).
    conn.execute("UPDATE settings SET value = CAST(value AS INTEGER) + 1 "
                 "WHERE key = 'accounts_rev'")


def setting_get(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


def setting_set(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute("INSERT INTO settings VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = "
                 "excluded.value", (key, value))


def reserve_task_ids(conn: sqlite3.Connection, count: int) -> range:
    top = int(conn.execute("UPDATE settings SET value = CAST(value AS INTEGER) + ? "
                           "WHERE key = 'tasks_seq' RETURNING value", (count,)).fetchone()[0])
    return range(top - count + 1, top + 1)


def session_add(conn: sqlite3.Connection, digest: str, account: str, now_ms: int) -> None:
    conn.execute("INSERT INTO sessions VALUES (?, ?, ?, ?)", (digest, account, now_ms, now_ms))


def session_delete(conn: sqlite3.Connection, digest: str) -> None:
    conn.execute("DELETE FROM sessions WHERE digest = ?", (digest,))


def sessions_touch(conn: sqlite3.Connection, rows: Sequence[tuple[int, str]]) -> None:
    conn.executemany("UPDATE sessions SET last_used_ms = max(last_used_ms, ?) WHERE digest = ?",
                     rows)


def session_get(conn: sqlite3.Connection, digest: str) -> SessionRecord | None:
    row = conn.execute("SELECT digest, account, created_ms, last_used_ms FROM sessions "
                       "WHERE digest = ?", (digest,)).fetchone()
    return SessionRecord(*row) if row else None


def sessions_prune(conn: sqlite3.Connection, last_used_before_ms: int,
                   created_before_ms: int) -> None:
    conn.execute("DELETE FROM sessions WHERE last_used_ms < ? OR created_ms < ?",
                 (last_used_before_ms, created_before_ms))


def ban_add(conn: sqlite3.Connection, key: str, until_ms: int) -> None:
    conn.execute("INSERT INTO bans VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET "
                 "until_ms = max(until_ms, excluded.until_ms)", (key, until_ms))


def bans(conn: sqlite3.Connection, now_ms: int) -> dict[str, int]:
    return dict(conn.execute("SELECT key, until_ms FROM bans WHERE until_ms > ?", (now_ms,)))


def bans_prune(conn: sqlite3.Connection, now_ms: int) -> None:
    conn.execute("DELETE FROM bans WHERE until_ms <= ?", (now_ms,))


# --- agents' status, audit -------------------------------------------------------------------

def agents_seen(conn: sqlite3.Connection,
                rows: Sequence[tuple[str, int, str | None, str | None, int]]) -> None:
    conn.executemany(
        "INSERT INTO agents (name, last_seen_ms, address, agent_version, online_until_ms) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
        "last_seen_ms = excluded.last_seen_ms, address = excluded.address, "
        "online_until_ms = excluded.online_until_ms, "
        "agent_version = coalesce(excluded.agent_version, agents.agent_version)", rows)


def agent_inventory(conn: sqlite3.Connection, name: str, inventory_json: str) -> None:
    conn.execute("INSERT INTO agents (name, inventory) VALUES (?, ?) ON CONFLICT (name) "
                 "DO UPDATE SET inventory = excluded.inventory", (name, inventory_json))


def agents(conn: sqlite3.Connection, with_inventory: bool,
           name: str | None = None) -> list[AgentRecord]:
    sql = _AGENTS_WITH_INVENTORY if with_inventory else _AGENTS
    rows = (conn.execute(sql + " AND a.name = ?", (name,)) if name is not None
            else conn.execute(sql + " ORDER BY a.name"))
    return [AgentRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8],
                        r[9] == REVOKED) for r in rows]


_AGENTS_SELECT = ("SELECT a.name, s.last_seen_ms, s.address, s.agent_version, {}, "
                  "s.online_until_ms, s.capabilities, s.facts, s.labels, a.secret_hash "
                  "FROM accounts a LEFT JOIN agents s ON s.name = a.name "
                  "WHERE a.type = 'agent'")
_AGENTS_WITH_INVENTORY = _AGENTS_SELECT.format("s.inventory")
_AGENTS = _AGENTS_SELECT.format("NULL")


def audit_rows(conn: sqlite3.Connection, before_id: int | None,
               limit: int) -> list[AuditRecord]:
    sql = "SELECT id, at_ms, actor, action, detail, address FROM audit"
    if before_id is not None:
        rows = conn.execute(sql + " WHERE id < ? ORDER BY id DESC LIMIT ?", (before_id, limit))
    else:
        rows = conn.execute(sql + " ORDER BY id DESC LIMIT ?", (limit,))
    return [AuditRecord(*row) for row in rows]


# --- tasks ----------------------------------------------------------------------------------

def task_get(conn: sqlite3.Connection, task_id: int) -> TaskRecord | None:
    row = conn.execute(_TASK_SELECT + " WHERE id = ?", (task_id,)).fetchone()
    return _task(row) if row else None


def task_finish(conn: sqlite3.Connection, task_id: int, expected: str, state: str,
                result_json: str, finished_ms: int) -> bool:
    return conn.execute("UPDATE tasks SET state = ?, result = ?, finished_ms = ? "
                        "WHERE id = ? AND state = ?",
                        (state, result_json, finished_ms, task_id, expected)).rowcount > 0


def task_rows(conn: sqlite3.Connection, where: TaskFilter) -> list[TaskRecord]:
    """Newest first. Indexed through tasks_by_agent, tasks_by_submitter or tasks_by_state
    when filtered by them: the caller runs `tasks_index` first, so what was inserted or
    changed just now is found too. The state is checked on the task row as well."""
    clauses, args = [], []  # type: list[str], list[Any]
    source, order = "tasks t", "t.id"
    if where.agent is not None:
        source, order = "tasks_by_agent x JOIN tasks t ON t.id = x.id", "x.id"
        clauses.append("x.agent = ?")
        args.append(where.agent)
    elif where.submitted_by is not None:
        source, order = "tasks_by_submitter x JOIN tasks t ON t.id = x.id", "x.id"
        clauses.append("x.submitted_by = ?")
        args.append(where.submitted_by)
    elif where.state is not None:
        source, order = "tasks_by_state x JOIN tasks t ON t.id = x.id", "x.id"
        clauses.append("x.state = ?")
        args.append(where.state)
    for column, value in (("state", where.state), ("submitted_by", where.submitted_by)):
        if value is not None:
            clauses.append(f"t.{column} = ?")
            args.append(value)
    if where.before_id is not None:
        clauses.append(f"{order} < ?")
        args.append(where.before_id)
    if where.ids is not None:
        clauses.append(f"t.id IN ({','.join('?' * len(where.ids))})")
        args.extend(where.ids)
    sql = (f"SELECT {', '.join('t.' + c for c in TASK_COLUMNS)} FROM {source}"
           + (" WHERE " + " AND ".join(clauses) if clauses else ""))
    rows = conn.execute(sql + f" ORDER BY {order} DESC LIMIT ?", (*args, where.limit))
    return [_task(row) for row in rows]


# The look-up tables of migrations 2 and 3: each with the tasks column it holds, and where that
# column sits in a row of TASK_INSERT (constants: the f-strings below take nothing from outside).
# A task's agent and submitter never change; its state has a look-up that follows it.
LOOKUPS = (("tasks_by_agent", "agent", 1), ("tasks_by_submitter", "submitted_by", 5))
_STATE_LOOKUP = ("tasks_by_state", "state", 4)


def tasks_index(conn: sqlite3.Connection, restated: Iterable[int] = (),
                late: Iterable[int] = ()) -> None:
    """Writes the look-up rows of the tasks inserted since the last call, sorted, so that each
    of their pages is written once for all of them. Tasks are inserted in id order, so "since"
    is an id: the highest one indexed, kept in settings. Of the tasks indexed before, those in
    `restated` changed state since: their tasks_by_state rows are written again.

    Only a queued or delivered task can change state, so only such tasks_by_state rows can be
    out of date, also after a crash (`tasks_recover` looks them over).

    `late`: tasks inserted after a task with a higher id (a job's wave takes ids recorded
    before; a refill after a crash): those at or below the mark get their rows one by one."""
    mark = int(setting_get(conn, "tasks_indexed") or 0)
    below = sorted(n for n in late if n <= mark)
    for table, column, _ in (*LOOKUPS, _STATE_LOOKUP) if below else ():
        conn.executemany(f"INSERT OR IGNORE INTO {table} SELECT {column}, id FROM tasks "
                         "WHERE id = ?", ((n,) for n in below))
    changed = sorted(n for n in restated if n <= mark)  # the newer ones are inserted below
    if changed:
        _restate(conn, changed)
    top = conn.execute("SELECT max(id) FROM tasks").fetchone()[0] or 0
    if top <= mark:
        return
    for table, column, _ in (*LOOKUPS, _STATE_LOOKUP):
        conn.execute(f"INSERT OR IGNORE INTO {table} SELECT {column}, id FROM tasks "
                     f"WHERE id > ? ORDER BY {column}, id", (mark,))
    setting_set(conn, "tasks_indexed", str(top))


def _restate(conn: sqlite3.Connection, ids: list[int]) -> None:
    """The tasks_by_state rows of these tasks, from their task rows as they are now."""
    conn.executemany("DELETE FROM tasks_by_state WHERE state IN ('queued', 'delivered') "
                     "AND id = ?", ((n,) for n in ids))
    conn.executemany("INSERT OR IGNORE INTO tasks_by_state SELECT state, id FROM tasks "
                     "WHERE id = ?", ((n,) for n in ids))


def _restate_stale(conn: sqlite3.Connection) -> None:
    """What a crash left out of date in tasks_by_state: queued or delivered rows of tasks
    whose state changed after the last tasks_index (as many as were open then, at most)."""
    _restate(conn, [n for n, in conn.execute(
        "SELECT x.id FROM tasks_by_state x JOIN tasks t ON t.id = x.id "
        "WHERE x.state IN ('queued', 'delivered') AND t.state != x.state")])


def tasks_recover(conn: sqlite3.Connection, node: str, now_ms: int) -> list[TaskRecord]:
    """At a node's start-up: the tasks it delivered without a result fail (and those delivered
    before deliveries named their node); returns the queued tasks."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        tasks_index(conn)  # what the last run inserted after its last tasks_index
        _restate_stale(conn)  # and what changed state after it
        open_ids = "SELECT id FROM tasks_by_state WHERE state = ?"
        ended = conn.execute(
            f"UPDATE tasks SET state = 'failed', finished_ms = ?, result = ? "
            f"WHERE id IN ({open_ids}) AND (delivered_by = ? OR delivered_by IS NULL) "
            f"RETURNING id",
            (now_ms, json.dumps({"error": True, "msg": "no result"}), "delivered",
             node)).fetchall()
        ended += conn.execute(f"UPDATE tasks SET state = 'expired', finished_ms = ? "
                              f"WHERE id IN ({open_ids}) AND expires_ms <= ? RETURNING id",
                              (now_ms, "queued", now_ms)).fetchall()
        _restate(conn, sorted(n for n, in ended))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    rows = conn.execute(_TASK_SELECT + f" WHERE id IN ({open_ids}) ORDER BY id", ("queued",))
    return [_task(row) for row in rows]


def write_rows(conn: sqlite3.Connection, rows: list[dict[Any, Any]]) -> None:
    """One batch of SqliteStore.rows: task inserts, task updates, audit events."""
    inserts, updates, audits = rows
    if inserts:
        conn.executemany(TASK_INSERT, inserts.values())
    if updates:
        if conn.executemany(TASK_UPDATE, updates.values()).rowcount < len(updates):
            # An insert that never landed (its batch failed): the whole row, once more, and
            # its agent and submitter look-ups (its id may be below what tasks_index has done
            # by now). Its state look-up comes with the next pass, as for every update.
            conn.executemany(TASK_SAVE, updates.values())
            for table, _, field in LOOKUPS:
                conn.executemany(f"INSERT OR IGNORE INTO {table} VALUES (?, ?)",
                                 ((r[field], r[0]) for r in updates.values()))
    if audits:
        conn.executemany(AUDIT_INSERT, audits.values())
