"""Enrollment's tables: their DDL (a migration of each store), the column lists, and the
records a row becomes; shared by store/enrollment_sql.py and store/device_sql.py."""

from __future__ import annotations

from dutserver.core.model import EnrollmentRecord, EnrollTokenRecord
from dutserver.store.portable import Row

# Migration text; {id} and {int} are the engine's types (portable.SQLITE_TYPES, POSTGRES_TYPES).
SCHEMA = """
    ALTER TABLE accounts ADD COLUMN next_hash TEXT;
    ALTER TABLE agents ADD COLUMN capabilities TEXT;
    ALTER TABLE agents ADD COLUMN facts TEXT;
    ALTER TABLE agents ADD COLUMN labels TEXT;
    CREATE TABLE enroll_tokens (
        id {id},
        digest TEXT NOT NULL UNIQUE,
        note TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_ms {int} NOT NULL,
        expires_ms {int} NOT NULL,
        max_uses {int},
        uses {int} NOT NULL,
        labels TEXT NOT NULL,
        auto_accept {int} NOT NULL,
        revoked_ms {int}
    );
    CREATE TABLE enrollments (
        id {id},
        kind TEXT NOT NULL,
        state TEXT NOT NULL,
        name TEXT NOT NULL,
        facts TEXT NOT NULL,
        capabilities TEXT,
        token_id {int},
        address TEXT,
        secret_hash TEXT,
        device_id TEXT,
        key_fp TEXT,
        public_key TEXT,
        duplicate_of TEXT,
        labels TEXT NOT NULL,
        created_ms {int} NOT NULL,
        updated_ms {int} NOT NULL,
        decided_ms {int},
        decided_by TEXT
    );
    CREATE INDEX enrollments_state ON enrollments (state, id);
    CREATE INDEX enrollments_name ON enrollments (name, state);
    CREATE INDEX enrollments_device ON enrollments (device_id, state);
    CREATE INDEX enrollments_token ON enrollments (token_id, state);
    CREATE INDEX enrollments_address ON enrollments (address, state)
"""

TOKEN_COLUMNS = ("id, digest, note, created_by, created_ms, expires_ms, max_uses, uses, labels, "
                 "auto_accept, revoked_ms")
COLUMNS = ("id, kind, state, name, facts, capabilities, token_id, address, secret_hash, "
           "device_id, key_fp, public_key, duplicate_of, labels, created_ms, updated_ms, "
           "decided_ms, decided_by")


def token(row: Row) -> EnrollTokenRecord:
    values = list(row)
    values[9] = bool(values[9])
    return EnrollTokenRecord(*values)


def enrollment(row: Row) -> EnrollmentRecord:
    return EnrollmentRecord(*row)
