"""The SQL of the PostgreSQL store: statements, and the writer's ops (functions of the writer's
connection, run inside its batch's transaction)."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
from collections.abc import Sequence
from typing import Any

import asyncpg

log = logging.getLogger("dutserver.store")

LOST = (OSError, asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError,
         asyncpg.AdminShutdownError, asyncpg.ConnectionDoesNotExistError, asyncio.TimeoutError)


def is_lost(exc: BaseException) -> bool:
    """Whether exc says the database went away (not that a statement was wrong)."""
    return isinstance(exc, LOST) or (
        isinstance(exc, asyncpg.InterfaceError) and "closed" in str(exc))

TASK_COLUMNS = ("id, agent, type, payload, state, submitted_by, created_ms, expires_ms, "
                "delivered_ms, finished_ms, result, delivered_by")
ACCOUNTS = ("SELECT a.name, a.type, a.secret_hash, a.created_ms, a.updated_ms, a.next_hash, "
            "g.capabilities FROM accounts a LEFT JOIN agents g ON g.name = a.name")
_NO_RESULT = json.dumps({"error": True, "msg": "no result"})
_EXPIRED = json.dumps({"error": True, "msg": "expired in queue"})


def text(text: str | None) -> str | None:
    """Text as PostgreSQL takes it: no NUL, no lone surrogate (from a hostile login name)."""
    if text is None or (text.isascii() and "\x00" not in text):
        return text
    return text.replace("\x00", "\ufffd").encode("utf-8", "surrogatepass").decode(
        "utf-8", "replace")


def columns(rows: Sequence[tuple[Any, ...]] | Any, width: int) -> list[list[Any]]:
    columns: list[list[Any]] = [[] for _ in range(width)]
    for row in rows:
        for column, value in zip(columns, row):
            column.append(value)
    return columns


def update_columns(rows: list[tuple[Any, ...]]) -> list[list[Any]]:
    """id, state, delivered_ms, finished_ms, result, delivered_by of task rows."""
    return [[r[i] for r in rows] for i in (0, 4, 8, 9, 10, 11)]


INSERT = (
    f"INSERT INTO tasks ({TASK_COLUMNS}) SELECT * FROM unnest($1::bigint[], $2::text[], "
    "$3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[], $8::bigint[], $9::bigint[], "
    "$10::bigint[], $11::text[], $12::text[]) ON CONFLICT (id) DO UPDATE SET "
    "state = excluded.state, delivered_ms = excluded.delivered_ms, "
    "finished_ms = excluded.finished_ms, result = excluded.result, "
    "delivered_by = excluded.delivered_by")
UPDATE = (
    "UPDATE tasks t SET state = u.state, delivered_ms = u.dms, finished_ms = u.fms, "
    "result = u.res, delivered_by = u.dby FROM unnest($1::bigint[], $2::text[], $3::bigint[], "
    "$4::bigint[], $5::text[], $6::text[]) AS u(id, state, dms, fms, res, dby) WHERE t.id = u.id")
UPDATE_IF = (
    "UPDATE tasks t SET state = u.state, delivered_ms = u.dms, finished_ms = u.fms, "
    "result = u.res, delivered_by = u.dby FROM unnest($1::bigint[], $2::text[], $3::bigint[], "
    "$4::bigint[], $5::text[], $6::text[], $7::text[]) AS u(id, state, dms, fms, res, dby, was) "
    "WHERE t.id = u.id AND t.state = u.was RETURNING t.id")
NOTIFY = "SELECT pg_notify($1, p) FROM unnest($2::text[]) p"
AUDIT = ("INSERT INTO audit (at_ms, actor, action, detail, address) SELECT * FROM "
          "unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[])")
NOTIFY_IF_WON = ("SELECT pg_notify($1, q.p) FROM unnest($2::bigint[], $3::text[]) AS q(id, p) "
                 "WHERE q.id IN (SELECT id FROM c)")  # c: the compare-and-sets' CTE, below
# The parts of a write batch, in the order they run, by the letter that names each.
_PARTS = {"i": INSERT, "u": UPDATE, "c": UPDATE_IF, "a": AUDIT, "n": NOTIFY, "k": NOTIFY_IF_WON}


def _shift(sql: str, by: int) -> str:
    """sql with its parameters $1, $2, … renumbered from $(1 + by)."""
    return re.sub(r"\$(\d+)", lambda m: f"${int(m.group(1)) + by}", sql)


@functools.cache
def combined(present: str) -> str:
    """One statement for the batch parts named in present (letters of "iucank", in that order;
    k, the NOTIFYs sent only for the compare-and-sets that won, only with c):
    each a data-modifying CTE, their parameters numbered on. One statement is a transaction
    of its own, so a batch costs one round trip to the server instead of one per part plus
    BEGIN and COMMIT. The parts touch different rows (a task is inserted or updated in a batch,
    never both; compare-and-sets apart from plain updates). Its row: the ids whose
    compare-and-set won, and the NOTIFYs sent (referencing n is what makes PostgreSQL run it:
    a CTE that only reads runs when used)."""
    ctes, offset = [], 0
    for key in present:
        sql = _PARTS[key]
        ctes.append(f"{key} AS ({_shift(sql, offset)})")
        offset += max(int(n) for n in re.findall(r"\$(\d+)", sql))
    won = "ARRAY(SELECT id FROM c)" if "c" in present else "ARRAY[]::bigint[]"
    sent = " + ".join(f"(SELECT count(*) FROM {key})" for key in "nk" if key in present) or "0"
    return f"WITH {', '.join(ctes)} SELECT {won} AS won, {sent} AS notified"


AGENTS_SEEN = (
    "INSERT INTO agents (name, last_seen_ms, address, agent_version, online_until_ms) "
    "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO UPDATE SET "
    "last_seen_ms = greatest(agents.last_seen_ms, excluded.last_seen_ms), "
    "address = excluded.address, online_until_ms = excluded.online_until_ms, "
    "agent_version = coalesce(excluded.agent_version, agents.agent_version)")


# --- writer ops: functions of the writer's connection, inside its batch's transaction ---------

async def execute(conn: Any, sql: str, *args: Any) -> None:
    await conn.execute(sql, *args)


async def executemany(conn: Any, sql: str, rows: list[tuple[Any, ...]]) -> None:
    await conn.executemany(sql, rows)


async def reserve(conn: Any, count: int) -> int:
    return int(await conn.fetchval(
        "UPDATE settings SET value = (value::bigint + $1)::text WHERE key = 'tasks_seq' "
        "RETURNING value::bigint", count))


async def finish(conn: Any, task_id: int, expected: str, state: str, result_json: str,
                  finished_ms: int) -> bool:
    done = await conn.fetchval("UPDATE tasks SET state = $1, result = $2, finished_ms = $3 "
                               "WHERE id = $4 AND state = $5 RETURNING id",
                               state, result_json, finished_ms, task_id, expected)
    return done is not None


async def _bump_accounts_rev(conn: Any) -> None:
    await conn.execute("UPDATE settings SET value = (value::bigint + 1)::text "
                       "WHERE key = 'accounts_rev'")


async def add_account(conn: Any, name: str, kind: str, secret_hash: str, now_ms: int) -> bool:
    added = await conn.fetchval("INSERT INTO accounts (name, type, secret_hash, created_ms, "
                                "updated_ms) VALUES ($1, $2, $3, $4, $4) "
                                "ON CONFLICT (name) DO NOTHING RETURNING name",
                                name, kind, secret_hash, now_ms)
    if added is not None:
        await _bump_accounts_rev(conn)
    return added is not None


async def set_secret(conn: Any, name: str, secret_hash: str, now_ms: int) -> bool:
    changed = await conn.fetchval("UPDATE accounts SET secret_hash = $1, updated_ms = $2 "
                                  "WHERE name = $3 RETURNING name", secret_hash, now_ms, name)
    if changed is not None:
        await conn.execute("DELETE FROM sessions WHERE account = $1", name)
        await _bump_accounts_rev(conn)
    return changed is not None


async def remove_account(conn: Any, name: str) -> bool:
    removed = await conn.fetchval("DELETE FROM accounts WHERE name = $1 RETURNING name", name)
    if removed is not None:
        await conn.execute("DELETE FROM sessions WHERE account = $1", name)
        await _bump_accounts_rev(conn)
    return removed is not None


async def bans_prune(conn: Any, now_ms: int) -> None:
    await conn.execute("DELETE FROM bans WHERE until_ms <= $1", now_ms)


async def recover(conn: Any, node: str, now_ms: int) -> None:
    await conn.execute("UPDATE tasks SET state = 'failed', finished_ms = $1, result = $2 "
                       "WHERE state = 'delivered' AND (delivered_by = $3 OR delivered_by IS NULL)",
                       now_ms, _NO_RESULT, node)
    await expire(conn, now_ms)


async def expire(conn: Any, now_ms: int) -> list[int]:
    rows = await conn.fetch("UPDATE tasks SET state = 'expired', finished_ms = $1, result = $2 "
                            "WHERE state = 'queued' AND expires_ms <= $1 RETURNING id",
                            now_ms, _EXPIRED)
    return [r[0] for r in rows]


async def heartbeat(conn: Any, node: str, now_ms: int,
                     lease_ms: int) -> tuple[list[str], list[int]]:
    """This node's heartbeat; the nodes past their lease recovered, by one survivor (the
    DELETE that finds them decides which)."""
    if await conn.fetchval("UPDATE nodes SET seen_ms = $2 WHERE name = $1 RETURNING name",
                           node, now_ms) is None:
        log.warning("node %s was taken for dead by the others: its deliveries failed", node)
        await conn.execute("INSERT INTO nodes VALUES ($1, $2, $2) ON CONFLICT DO NOTHING",
                           node, now_ms)
    dead = [r[0] for r in await conn.fetch(
        "DELETE FROM nodes WHERE seen_ms < $1 AND name != $2 RETURNING name",
        now_ms - lease_ms, node)]
    if not dead:
        return [], []
    log.warning("recovering node(s) %s: silent for over %.1f s", ", ".join(dead),
                lease_ms / 1000)
    ended = [r[0] for r in await conn.fetch(
        "UPDATE tasks SET state = 'failed', finished_ms = $1, result = $2 "
        "WHERE state = 'delivered' AND delivered_by = ANY($3::text[]) RETURNING id",
        now_ms, _NO_RESULT, dead)]
    agents = [r[0] for r in await conn.fetch(
        "SELECT DISTINCT agent FROM tasks WHERE state = 'queued'")]
    return agents, ended
