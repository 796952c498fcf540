"""PostgreSQL for the bench: a fresh database per scenario on a server the user names
(`--db postgresql://user@host:port/any`), dropped afterwards, and the counters that PostgreSQL
keeps of it (commits, rows written) plus the wake-ups sent between nodes (NOTIFYs heard).

asyncpg is a dependency of dutserver itself, so the bench needs nothing more."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from dutserver.store.postgres_notify import CHANNEL



def with_database(url: str, name: str) -> str:
    """url with its database part replaced by name."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


@contextlib.asynccontextmanager
async def fresh_database(server_url: str) -> AsyncIterator[str]:
    """A new, empty database on the server of server_url; yields its URL, drops it after."""
    name = "dutbench_" + secrets.token_hex(4)
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield with_database(server_url, name)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


class PgCounters:
    """What PostgreSQL did for one database in a window: commits, rows written, NOTIFYs sent on
    dutserver's channel. read() before and after; the difference is the window's."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.notifies = 0
        self._conn: Any = None

    async def open(self) -> None:
        self._conn = await asyncpg.connect(self.url)
        await self._conn.add_listener(CHANNEL, self._heard)

    def _heard(self, *_: object) -> None:
        self.notifies += 1

    async def read(self) -> dict[str, int]:
        # The statistics are a snapshot per transaction: a fresh one each time.
        await self._conn.execute("SELECT pg_stat_clear_snapshot()")
        row = await self._conn.fetchrow(
            "SELECT xact_commit, tup_inserted, tup_updated, tup_deleted FROM pg_stat_database "
            "WHERE datname = current_database()")
        return {"commits": row["xact_commit"], "rows_written": row["tup_inserted"]
                + row["tup_updated"] + row["tup_deleted"], "notifies": self.notifies}

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()


def per_op(before: dict[str, int], after: dict[str, int], ops: int) -> dict[str, float | None]:
    """Each counter's growth per operation (commits include this reader's own few)."""
    return {f"{k}_per_round_trip": (round((after[k] - before[k]) / ops, 3) if ops else None)
            for k in before}
