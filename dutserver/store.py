"""The only module with SQL: schema and migrations, accounts, sessions, tasks, agents, audit.

The sync functions take a sqlite3.Connection so that the command line (its own process) and the
server's writer thread share them. The server reaches the database through `Store`: writes go
through the group-commit writer, reads run on a reader thread with its own connection (WAL lets
them run while the writer commits).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from dutserver import codec
from dutserver.model import Task
from dutserver.writer import (GroupCommitWriter, InlineGroupCommitWriter, Op, RowBatches,
                              background_priority, checkpoint)

T = TypeVar("T")
log = logging.getLogger("dutserver.store")

# Numbered migrations, applied in order at start; PRAGMA user_version records how far we got.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE accounts (
        name TEXT PRIMARY KEY,
        type TEXT NOT NULL CHECK (type IN ('admin', 'agent')),
        secret_hash TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL
    );
    CREATE TABLE sessions (
        digest TEXT PRIMARY KEY,
        account TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        last_used_ms INTEGER NOT NULL
    );
    CREATE INDEX sessions_account ON sessions (account);
    CREATE TABLE tasks (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        agent TEXT NOT NULL,
        type TEXT NOT NULL,
        payload TEXT NOT NULL,
        state TEXT NOT NULL,
        submitted_by TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        expires_ms INTEGER NOT NULL,
        delivered_ms INTEGER,
        finished_ms INTEGER,
        result TEXT
    );
    CREATE INDEX tasks_agent ON tasks (agent, id);
    CREATE INDEX tasks_state ON tasks (state, id);
    CREATE INDEX tasks_submitter ON tasks (submitted_by, id);
    CREATE TABLE agents (
        name TEXT PRIMARY KEY,
        last_seen_ms INTEGER,
        address TEXT,
        agent_version TEXT,
        inventory TEXT
    );
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms INTEGER NOT NULL,
        actor TEXT,
        action TEXT NOT NULL,
        detail TEXT,
        address TEXT
    );
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    INSERT INTO settings VALUES ('selfreg', '0'), ('accounts_rev', '0');
    """,
    # A task's agent and submitter are looked up through tables of their own, written in bulk
    # every 100 ms (`tasks_index`) rather than as an index of every insert: under load each
    # commit touched one index page per agent in it, for a third of the WAL's bytes.
    """
    CREATE TABLE tasks_by_agent (agent TEXT NOT NULL, id INTEGER NOT NULL,
                                 PRIMARY KEY (agent, id)) WITHOUT ROWID;
    CREATE TABLE tasks_by_submitter (submitted_by TEXT NOT NULL, id INTEGER NOT NULL,
                                     PRIMARY KEY (submitted_by, id)) WITHOUT ROWID;
    INSERT INTO tasks_by_agent SELECT agent, id FROM tasks ORDER BY agent, id;
    INSERT INTO tasks_by_submitter SELECT submitted_by, id FROM tasks ORDER BY submitted_by, id;
    DROP INDEX tasks_agent;
    DROP INDEX tasks_submitter;
    INSERT INTO settings VALUES ('tasks_indexed', (SELECT coalesce(max(id), 0) FROM tasks));
    """,
    # The state index goes the same way (tasks_by_state, written with the other look-ups), and
    # tasks and audit lose AUTOINCREMENT: it wrote sqlite_sequence for every inserted row, and
    # with task ids given by the server and nothing ever deleted, max(id) + 1 is what it gave.
    # Together a third of SQLite's work per round trip. The old highest task id is kept for
    # tasks_recover, which used to read it from sqlite_sequence.
    """
    INSERT INTO settings VALUES ('tasks_seq',
        (SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = 'tasks'));
    CREATE TABLE tasks_new (
        id INTEGER PRIMARY KEY,
        agent TEXT NOT NULL,
        type TEXT NOT NULL,
        payload TEXT NOT NULL,
        state TEXT NOT NULL,
        submitted_by TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        expires_ms INTEGER NOT NULL,
        delivered_ms INTEGER,
        finished_ms INTEGER,
        result TEXT
    );
    INSERT INTO tasks_new SELECT id, agent, type, payload, state, submitted_by, created_ms,
        expires_ms, delivered_ms, finished_ms, result FROM tasks ORDER BY id;
    DROP TABLE tasks;
    ALTER TABLE tasks_new RENAME TO tasks;
    CREATE TABLE audit_new (
        id INTEGER PRIMARY KEY,
        at_ms INTEGER NOT NULL,
        actor TEXT,
        action TEXT NOT NULL,
        detail TEXT,
        address TEXT
    );
    INSERT INTO audit_new SELECT id, at_ms, actor, action, detail, address FROM audit ORDER BY id;
    DROP TABLE audit;
    ALTER TABLE audit_new RENAME TO audit;
    CREATE TABLE tasks_by_state (state TEXT NOT NULL, id INTEGER NOT NULL,
                                 PRIMARY KEY (state, id)) WITHOUT ROWID;
    INSERT INTO tasks_by_state SELECT state, id FROM tasks ORDER BY state, id;
    """,
]

TASK_COLUMNS = ("id", "agent", "type", "payload", "state", "submitted_by", "created_ms",
                "expires_ms", "delivered_ms", "finished_ms", "result")
_TASK_SELECT = "SELECT " + ", ".join(TASK_COLUMNS) + " FROM tasks"


class AccountExists(Exception):
    pass


def connect(path: Path | str, synchronous: str = "NORMAL") -> sqlite3.Connection:
    """Opens (creating if needed) the database in WAL mode with the schema up to date."""
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=10)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
    conn.execute("PRAGMA busy_timeout = 10000")
    migrate(conn)
    return conn


def migrate(conn: sqlite3.Connection) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version >= len(MIGRATIONS):
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Re-read under the lock: another process may have migrated meanwhile.
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for number in range(version, len(MIGRATIONS)):
            for statement in MIGRATIONS[number].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number + 1}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


# --- accounts (shared by the command line and the server) -----------------------------------

def account_add(conn: sqlite3.Connection, name: str, kind: str, secret_hash: str,
                now_ms: int) -> None:
    try:
        conn.execute("INSERT INTO accounts VALUES (?, ?, ?, ?, ?)",
                     (name, kind, secret_hash, now_ms, now_ms))
    except sqlite3.IntegrityError as exc:
        raise AccountExists(name) from exc
    _bump_accounts_rev(conn)


def account_set_secret(conn: sqlite3.Connection, name: str, secret_hash: str, now_ms: int) -> bool:
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


def account_get(conn: sqlite3.Connection, name: str) -> tuple[str, str, str] | None:
    row = conn.execute("SELECT name, type, secret_hash FROM accounts WHERE name = ?",
                       (name,)).fetchone()
    return (row[0], row[1], row[2]) if row else None


def accounts_all(conn: sqlite3.Connection) -> list[tuple[str, str, str, int, int]]:
    return conn.execute("SELECT name, type, secret_hash, created_ms, updated_ms FROM accounts "
                        "ORDER BY name").fetchall()


def accounts_rev(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT value FROM settings WHERE key = 'accounts_rev'").fetchone()[0])


def _bump_accounts_rev(conn: sqlite3.Connection) -> None:
    # The running server polls this number to see changes made by the command line.
    conn.execute("UPDATE settings SET value = CAST(value AS INTEGER) + 1 "
                 "WHERE key = 'accounts_rev'")


def setting_get(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


def setting_set(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute("INSERT INTO settings VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = "
                 "excluded.value", (key, value))


# --- the server's view ----------------------------------------------------------------------

class Store:
    """The database as the server uses it: group-committed writes, reads on a reader thread."""

    def __init__(self, path: Path, synchronous: str = "NORMAL",
                 commit_interval_s: float = 0.0, wal_restart_bytes: int = 64 * 1024 * 1024) -> None:
        self.path = path
        self.wal_restart_bytes = wal_restart_bytes
        self._synchronous = synchronous
        # Without fsync a commit is cheaper than a thread hand-off, so it runs on the loop;
        # with FULL every commit waits for the disk, so it gets a thread of its own (and the
        # disk's own pace batches its commits).
        self.writer: GroupCommitWriter | InlineGroupCommitWriter
        if synchronous.upper() in ("FULL", "EXTRA"):
            self.writer = GroupCommitWriter(lambda: connect(path, synchronous))
        else:
            self.writer = InlineGroupCommitWriter(lambda: connect(path, synchronous),
                                                  commit_interval_s)
        self.rows = RowBatches(self.writer, 3, _write_rows)
        self._reader_pool = ThreadPoolExecutor(1, thread_name_prefix="dutserver-reader")
        self._reader: sqlite3.Connection | None = None
        # Checkpoints get a thread and a connection of their own, at a lower priority, so that
        # copying the WAL neither delays reads nor takes the core from the event loop.
        self._checkpoint_pool = ThreadPoolExecutor(1, thread_name_prefix="dutserver-checkpoint",
                                                   initializer=background_priority)
        self._checkpointer: sqlite3.Connection | None = None
        self._unindexed = False  # tasks inserted since the last tasks_index
        # The look-up pass, an attribute so that tests can make it fail as a full disk would
        # (compiled, a patch of the module's function would not reach this module's calls).
        self.index_pass: Callable[[sqlite3.Connection, list[int]], None] = tasks_index
        # Tasks whose state changed, by id, with the number of that change: an id leaves
        # once a pass that included it committed (a pass that fails must not take it along).
        self._restated: dict[int, int] = {}
        self._changes = 0
        self._checkpointed_commits = -1  # the writer's commit count at the last checkpoint

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._reader = await loop.run_in_executor(
            self._reader_pool, connect, self.path, self._synchronous)
        self._checkpointer = await loop.run_in_executor(
            self._checkpoint_pool, connect, self.path, self._synchronous)
        self.writer.start()

    async def close(self) -> None:
        if isinstance(self.writer, InlineGroupCommitWriter):
            self.writer.stop()
        else:
            await asyncio.get_running_loop().run_in_executor(None, self.writer.stop)
        if self._reader is not None:
            self._reader_pool.submit(self._reader.close).result()
        self._reader_pool.shutdown()
        if self._checkpointer is not None:
            self._checkpoint_pool.submit(self._checkpointer.close).result()
        self._checkpoint_pool.shutdown()

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs fn(connection, *args) on the reader thread."""
        return await asyncio.get_running_loop().run_in_executor(
            self._reader_pool, fn, self._reader, *args)

    def write(self, op: Op) -> asyncio.Future[Any]:
        return self.writer.write(op)

    def write_nowait(self, op: Op) -> None:
        self.writer.write_nowait(op)

    async def barrier(self) -> None:
        await self.writer.barrier()

    async def checkpoint(self) -> None:
        """Copies the WAL into the database, on a thread of its own (the loop never waits for
        the fsyncs of a checkpoint). Under steady writes such a pass never quite catches up
        with the writer, and a WAL that is never caught up never starts over: it grew without
        end (850 MB after 150,000 round trips). So once it is past `wal_restart_bytes`, one
        more pass catches up with what came in meanwhile, and a last one runs with commits
        held, copying the little left; the next commit writes the WAL from its start again."""
        if not isinstance(self.writer, InlineGroupCommitWriter):
            return  # the writer thread checkpoints itself (wal_autocheckpoint)
        if self.writer.commits == self._checkpointed_commits:
            return  # nothing committed since the last pass
        self._checkpointed_commits = self.writer.commits
        if await self._copy_wal() > self.wal_restart_bytes:
            await self._copy_wal()  # what came in during the first: the held pass is short
            with self.writer.held():
                await self._copy_wal()

    def _copy_wal(self) -> asyncio.Future[int]:
        conn = self._checkpointer
        assert conn is not None, "store not open"
        return asyncio.get_running_loop().run_in_executor(self._checkpoint_pool, checkpoint, conn)

    async def index_tasks(self) -> None:
        """Brings the look-up tables up to date (and, like barrier(), waits for everything
        queued before it)."""
        try:
            await self._index()
        except sqlite3.Error:  # a full disk, say: the history still answers from what is
            pass               # indexed, the newest tasks missing under a filter (logged)

    def index_tasks_soon(self) -> None:
        """The periodic tasks_index (app.py): in the next batch, if anything changed."""
        if self._unindexed or self._restated:
            self._index()

    def _index(self) -> asyncio.Future[Any]:
        restated, upto = list(self._restated), self._changes
        self._unindexed = False
        index_pass = self.index_pass
        done = self.writer.write(lambda conn: index_pass(conn, restated))
        done.add_done_callback(lambda fut: self._indexed(fut, upto))
        return done

    def _indexed(self, fut: asyncio.Future[Any], upto: int) -> None:
        failed = fut.exception()
        if failed is not None:  # the next pass does it all again
            self._unindexed = True
            log.error("writing the task look-ups failed: %s", failed)
        else:  # what changed again after the pass was queued stays for the next one
            self._restated = {n: c for n, c in self._restated.items() if c > upto}

    def save_task(self, task: Task) -> asyncio.Future[Any]:
        """Writes the task as it is now; the future resolves at the commit. Its first save is an
        insert, and so is a later one while that insert is still pending; after that, an update
        of the fields that change (cheaper than an upsert of every field: a third of SQLite's
        work per round trip)."""
        row = (task.id, task.agent, task.type, task.payload_json, task.state._value_,
               task.submitted_by, task.created_ms, task.expires_ms, task.delivered_ms or 0,
               task.finished_ms or 0, "" if task.result is None else codec.dumps(task.result))
        if task.stored:
            self._changes += 1
            self._restated[task.id] = self._changes
            return self.rows.add(_UPDATE, row, task.id, unless_pending=_INSERT)
        task.stored = True
        self._unindexed = True
        return self.rows.add(_INSERT, row, task.id)

    def audit(self, actor: str | None, action: str, detail: str, address: str | None) -> None:
        """Records an audit event; nobody waits for it, but it lands in the next batch."""
        self.rows.add(_AUDIT, (now_ms(), _storable(actor), action, _storable(detail) or "",
                               address))


_INSERT, _UPDATE, _AUDIT = range(3)  # the kinds of Store.rows


def _write_rows(conn: sqlite3.Connection, rows: list[dict[Any, Any]]) -> None:
    inserts, updates, audits = rows
    if inserts:
        conn.executemany(TASK_INSERT, inserts.values())
    if updates:
        if conn.executemany(TASK_UPDATE, updates.values()).rowcount < len(updates):
            # An insert that never landed (its batch failed): the whole row, once more, and
            # its agent and submitter look-ups (its id may be below what tasks_index has done
            # by now). Its state look-up comes with the next pass, as for every update.
            conn.executemany(TASK_SAVE, updates.values())
            for table, _, field in _LOOKUPS:
                conn.executemany(f"INSERT OR IGNORE INTO {table} VALUES (?, ?)",
                                 ((r[field], r[0]) for r in updates.values()))
    if audits:
        conn.executemany(AUDIT_INSERT, audits.values())


def _storable(text: str | None) -> str | None:
    """Text as SQLite can take it: a lone surrogate from a hostile login name becomes U+FFFD."""
    if text is None or text.isascii():
        return text
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def now_ms() -> int:
    return int(time.time() * 1000)


# --- tasks ----------------------------------------------------------------------------------

# Task rows as Store.save_task makes them: every field, with 0 or "" for NULL (a None costs
# the sqlite3 module an adapter lookup per value; these cost nothing to bind).
TASK_INSERT = (
    "INSERT INTO tasks (id, agent, type, payload, state, submitted_by, created_ms, expires_ms, "
    "delivered_ms, finished_ms, result) VALUES (?, ?, ?, ?, ?, ?, ?, ?, nullif(?, 0), "
    "nullif(?, 0), nullif(?, ''))")
TASK_UPDATE = (
    "UPDATE tasks SET state = ?5, delivered_ms = nullif(?9, 0), finished_ms = nullif(?10, 0), "
    "result = nullif(?11, '') WHERE id = ?1")  # the row of TASK_INSERT: its other fields unused
TASK_SAVE = TASK_INSERT + (
    " ON CONFLICT (id) DO UPDATE SET state = excluded.state, delivered_ms = excluded.delivered_ms, "
    "finished_ms = excluded.finished_ms, result = excluded.result")


def task_row(conn: sqlite3.Connection, task_id: int) -> dict[str, Any] | None:
    row = conn.execute(_TASK_SELECT + " WHERE id = ?", (task_id,)).fetchone()
    return dict(zip(TASK_COLUMNS, row)) if row else None


def task_rows(conn: sqlite3.Connection, target: str | None, state: str | None,
              submitted_by: str | None, before_id: int | None, ids: list[int] | None,
              limit: int) -> list[dict[str, Any]]:
    """Newest first. Indexed through tasks_by_agent, tasks_by_submitter or tasks_by_state
    when filtered by them: the caller runs `tasks_index` first, so what was inserted or
    changed just now is found too. The state is checked on the task row as well."""
    where, args = [], []  # type: list[str], list[Any]
    source, order = "tasks t", "t.id"
    if target is not None:
        source, order = "tasks_by_agent x JOIN tasks t ON t.id = x.id", "x.id"
        where.append("x.agent = ?")
        args.append(target)
    elif submitted_by is not None:
        source, order = "tasks_by_submitter x JOIN tasks t ON t.id = x.id", "x.id"
        where.append("x.submitted_by = ?")
        args.append(submitted_by)
    elif state is not None:
        source, order = "tasks_by_state x JOIN tasks t ON t.id = x.id", "x.id"
        where.append("x.state = ?")
        args.append(state)
    for column, value in (("state", state), ("submitted_by", submitted_by)):
        if value is not None:
            where.append(f"t.{column} = ?")
            args.append(value)
    if before_id is not None:
        where.append(f"{order} < ?")
        args.append(before_id)
    if ids is not None:
        where.append(f"t.id IN ({','.join('?' * len(ids))})")
        args.extend(ids)
    sql = (f"SELECT {', '.join('t.' + c for c in TASK_COLUMNS)} FROM {source}"
           + (" WHERE " + " AND ".join(where) if where else ""))
    rows = conn.execute(sql + f" ORDER BY {order} DESC LIMIT ?", (*args, limit)).fetchall()
    return [dict(zip(TASK_COLUMNS, row)) for row in rows]


# The look-up tables of migrations 2 and 3: each with the tasks column it holds, and where that
# column sits in a row of TASK_INSERT (constants: the f-strings below take nothing from outside).
# A task's agent and submitter never change; its state has a look-up that follows it.
_LOOKUPS = (("tasks_by_agent", "agent", 1), ("tasks_by_submitter", "submitted_by", 5))
_STATE_LOOKUP = ("tasks_by_state", "state", 4)


def tasks_index(conn: sqlite3.Connection, restated: Iterable[int] = ()) -> None:
    """Writes the look-up rows of the tasks inserted since the last call, sorted, so that each
    of their pages is written once for all of them. Tasks are inserted in id order, so "since"
    is an id: the highest one indexed, kept in settings. Of the tasks indexed before, those in
    `restated` changed state since: their tasks_by_state rows are written again.

    Only a queued or delivered task can change state, so only such tasks_by_state rows can be
    out of date, also after a crash (`tasks_recover` looks them over)."""
    mark = int(setting_get(conn, "tasks_indexed") or 0)
    changed = sorted(n for n in restated if n <= mark)  # the newer ones are inserted below
    if changed:
        _restate(conn, changed)
    top = conn.execute("SELECT max(id) FROM tasks").fetchone()[0] or 0
    if top <= mark:
        return
    for table, column, _ in (*_LOOKUPS, _STATE_LOOKUP):
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


def tasks_recover(conn: sqlite3.Connection, now_ms: int) -> tuple[int, list[dict[str, Any]]]:
    """At start-up: delivered tasks without a result fail; returns (next id, queued tasks)."""
    conn.execute("BEGIN IMMEDIATE")
    tasks_index(conn)  # what the last run inserted after its last tasks_index
    _restate_stale(conn)  # and what changed state after it
    open_ids = "SELECT id FROM tasks_by_state WHERE state = ?"
    ended = conn.execute(f"UPDATE tasks SET state = 'failed', finished_ms = ?, result = ? "
                         f"WHERE id IN ({open_ids}) RETURNING id",
                         (now_ms, json.dumps({"error": True, "msg": "no result"}),
                          "delivered")).fetchall()
    ended += conn.execute(f"UPDATE tasks SET state = 'expired', finished_ms = ? "
                          f"WHERE id IN ({open_ids}) AND expires_ms <= ? RETURNING id",
                          (now_ms, "queued", now_ms)).fetchall()
    _restate(conn, sorted(n for n, in ended))
    conn.execute("COMMIT")
    rows = conn.execute(_TASK_SELECT + f" WHERE id IN ({open_ids}) ORDER BY id",
                        ("queued",)).fetchall()
    # The highest id ever given out (tasks_seq: as AUTOINCREMENT had it before migration 3).
    seq = int(setting_get(conn, "tasks_seq") or 0)
    top = conn.execute("SELECT max(id) FROM tasks").fetchone()[0]
    next_id = max(seq, top or 0) + 1
    return next_id, [dict(zip(TASK_COLUMNS, row)) for row in rows]


# --- sessions -------------------------------------------------------------------------------

def session_insert(digest: str, account: str, now_ms: int) -> Op:
    def op(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO sessions VALUES (?, ?, ?, ?)", (digest, account, now_ms, now_ms))
    return op


def session_delete(digest: str) -> Op:
    def op(conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM sessions WHERE digest = ?", (digest,))
    return op


def sessions_touch(rows: list[tuple[int, str]]) -> Op:
    def op(conn: sqlite3.Connection) -> None:
        conn.executemany("UPDATE sessions SET last_used_ms = ? WHERE digest = ?", rows)
    return op


def sessions_all(conn: sqlite3.Connection) -> list[tuple[str, str, int, int]]:
    return conn.execute("SELECT digest, account, created_ms, last_used_ms FROM sessions").fetchall()


# --- agents' status -------------------------------------------------------------------------

def agents_seen(rows: list[tuple[str, int, str | None, str | None]]) -> Op:
    """(name, last_seen_ms, address, version), written in batches by the sweeper."""
    def op(conn: sqlite3.Connection) -> None:
        conn.executemany(
            "INSERT INTO agents (name, last_seen_ms, address, agent_version) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET last_seen_ms = excluded.last_seen_ms, "
            "address = excluded.address, "
            "agent_version = coalesce(excluded.agent_version, agents.agent_version)", rows)
    return op


def agent_inventory(name: str, inventory_json: str) -> Op:
    def op(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO agents (name, inventory) VALUES (?, ?) ON CONFLICT (name) "
                     "DO UPDATE SET inventory = excluded.inventory", (name, inventory_json))
    return op


def agent_rows(conn: sqlite3.Connection, with_inventory: bool,
               name: str | None = None) -> list[tuple[Any, ...]]:
    inventory = "s.inventory" if with_inventory else "NULL"
    sql = f"SELECT a.name, s.last_seen_ms, s.address, s.agent_version, {inventory} "
    sql += "FROM accounts a LEFT JOIN agents s ON s.name = a.name WHERE a.type = 'agent'"
    if name is not None:
        return conn.execute(sql + " AND a.name = ?", (name,)).fetchall()
    return conn.execute(sql + " ORDER BY a.name").fetchall()


# --- audit ----------------------------------------------------------------------------------

AUDIT_INSERT = "INSERT INTO audit (at_ms, actor, action, detail, address) VALUES (?, ?, ?, ?, ?)"


def audit_write(conn: sqlite3.Connection, actor: str | None, action: str, detail: str,
                address: str | None) -> None:
    """An audit event written at once (the command line, outside the server)."""
    conn.execute(AUDIT_INSERT, (now_ms(), actor, action, detail, address))


def audit_rows(conn: sqlite3.Connection, before_id: int | None,
               limit: int) -> list[tuple[Any, ...]]:
    sql = "SELECT id, at_ms, actor, action, detail, address FROM audit"
    if before_id is not None:
        return conn.execute(sql + " WHERE id < ? ORDER BY id DESC LIMIT ?",
                            (before_id, limit)).fetchall()
    return conn.execute(sql + " ORDER BY id DESC LIMIT ?", (limit,)).fetchall()


def setting_write(key: str, value: str) -> Op:
    def op(conn: sqlite3.Connection) -> None:
        setting_set(conn, key, value)
    return op
