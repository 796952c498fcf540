"""PostgreSQL's schema: numbered migrations, applied at start under an advisory lock (several
nodes may start at once); the number reached is kept in schema_version."""

from __future__ import annotations

from typing import Any

from dutserver.store import enrollment_sql, job_sql, schedule_sql
from dutserver.store.portable import POSTGRES_TYPES

MIGRATIONS: list[str] = [
    """
    CREATE TABLE accounts (
        name TEXT PRIMARY KEY,
        type TEXT NOT NULL CHECK (type IN ('admin', 'agent')),
        secret_hash TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        updated_ms BIGINT NOT NULL
    );
    CREATE TABLE sessions (
        digest TEXT PRIMARY KEY,
        account TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        last_used_ms BIGINT NOT NULL
    );
    CREATE INDEX sessions_account ON sessions (account);
    CREATE TABLE tasks (
        id BIGINT PRIMARY KEY,
        agent TEXT NOT NULL,
        type TEXT NOT NULL,
        payload TEXT NOT NULL,
        state TEXT NOT NULL,
        submitted_by TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        expires_ms BIGINT NOT NULL,
        delivered_ms BIGINT,
        finished_ms BIGINT,
        result TEXT,
        delivered_by TEXT
    );
    CREATE INDEX tasks_agent ON tasks (agent, id);
    CREATE INDEX tasks_submitter ON tasks (submitted_by, id);
    CREATE INDEX tasks_state ON tasks (state, id);
    CREATE INDEX tasks_queued ON tasks (agent, id) WHERE state = 'queued';
    CREATE INDEX tasks_queued_expiry ON tasks (expires_ms) WHERE state = 'queued';
    CREATE INDEX tasks_delivered ON tasks (delivered_by) WHERE state = 'delivered';
    CREATE TABLE agents (
        name TEXT PRIMARY KEY,
        last_seen_ms BIGINT,
        address TEXT,
        agent_version TEXT,
        inventory TEXT,
        online_until_ms BIGINT
    );
    CREATE TABLE audit (
        id BIGSERIAL PRIMARY KEY,
        at_ms BIGINT NOT NULL,
        actor TEXT,
        action TEXT NOT NULL,
        detail TEXT,
        address TEXT
    );
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    INSERT INTO settings VALUES ('selfreg', '0'), ('accounts_rev', '0'), ('tasks_seq', '0');
    CREATE TABLE bans (key TEXT PRIMARY KEY, until_ms BIGINT NOT NULL);
    CREATE TABLE nodes (name TEXT PRIMARY KEY, started_ms BIGINT NOT NULL,
                        seen_ms BIGINT NOT NULL);
    """,
    # Enrollment (written once for both stores: store/enrollment_sql.py).
    enrollment_sql.SCHEMA.format(**POSTGRES_TYPES),
    # Fleet jobs (store/job_sql.py).
    job_sql.SCHEMA.format(**POSTGRES_TYPES),
    # Schedules, and jobs' maintenance windows (store/schedule_sql.py).
    schedule_sql.SCHEMA.format(**POSTGRES_TYPES),
]

_LOCK = 0x64757473  # "duts": the advisory lock that serializes migrations between nodes


async def migrate(conn: Any) -> None:
    """Brings the schema up to date (conn: an asyncpg connection)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        version = await conn.fetchval("SELECT max(version) FROM schema_version") or 0
        for number in range(version, len(MIGRATIONS)):
            await conn.execute(MIGRATIONS[number])
            await conn.execute("INSERT INTO schema_version VALUES ($1)", number + 1)
