"""SQLite's schema: numbered migrations applied at start, and how a connection is opened."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from dutserver.store import enrollment_sql, job_sql, schedule_sql
from dutserver.store.portable import SQLITE_TYPES

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
    # Several nodes (core/ports.py): who delivered a task (a node's recovery ends only its own
    # deliveries), the bans in force (shared by every node), and task ids handed out in blocks
    # from one counter (tasks_seq, the highest id ever given out).
    """
    ALTER TABLE tasks ADD COLUMN delivered_by TEXT;
    CREATE TABLE bans (key TEXT PRIMARY KEY, until_ms INTEGER NOT NULL);
    UPDATE settings SET value = max(CAST(value AS INTEGER),
                                    (SELECT coalesce(max(id), 0) FROM tasks))
        WHERE key = 'tasks_seq';
    """,
    # Who is online, as every node last wrote it (several nodes read each other's).
    """
    ALTER TABLE agents ADD COLUMN online_until_ms INTEGER;
    """,
    # Enrollment (written once for both stores: store/enrollment_sql.py).
    enrollment_sql.SCHEMA.format(**SQLITE_TYPES),
    # Fleet jobs (store/job_sql.py).
    job_sql.SCHEMA.format(**SQLITE_TYPES),
    # Schedules, and jobs' maintenance windows (store/schedule_sql.py).
    schedule_sql.SCHEMA.format(**SQLITE_TYPES),
]


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
