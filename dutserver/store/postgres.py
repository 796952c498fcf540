"""The store for several nodes (core.ports.Store) on PostgreSQL, with asyncpg.

Writes are group-committed as on SQLite: what the loop queued during one turn (task inserts,
state changes, audit events, wake-ups) goes in one transaction on the writer connection, a
statement per kind with arrays (`unnest`), so a batch costs a handful of round trips to the
server whatever it holds; the batch after it collects meanwhile. A state change that several
nodes may race for carries the state this node last knew, and is written only if the stored task
is still in it (compare and set); its future says whether it won. Reads take a connection from a
pool. Wake-ups between nodes are NOTIFYs on one channel, sent in the transaction that commits
what they announce, heard on a listening connection (PostgresNotifier).

Why asyncpg: bench/README.md, "Session 7" (round trips with each driver, same run).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg

from dutserver.config import redact_url
from dutserver.core import codec
from dutserver.core.clock import now_ms as wall_ms
from dutserver.core.errors import ApiError
from dutserver.core.model import (AccountRecord, AgentRecord, AuditRecord, SessionRecord, Task,
                                  TaskFilter, TaskRecord)
from dutserver.core.ports import AccountExists
from dutserver.store.postgres_schema import migrate

log = logging.getLogger("dutserver.store")
CHANNEL = "dutserver"
_LOST = (OSError, asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError,
         asyncpg.AdminShutdownError, asyncpg.ConnectionDoesNotExistError, asyncio.TimeoutError)


def _is_lost(exc: BaseException) -> bool:
    """Whether exc says the database went away (not that a statement was wrong)."""
    return isinstance(exc, _LOST) or (
        isinstance(exc, asyncpg.InterfaceError) and "closed" in str(exc))
_TASK_COLUMNS = ("id, agent, type, payload, state, submitted_by, created_ms, expires_ms, "
                 "delivered_ms, finished_ms, result, delivered_by")
_NO_RESULT = json.dumps({"error": True, "msg": "no result"})
_EXPIRED = json.dumps({"error": True, "msg": "expired in queue"})


def unavailable(exc: BaseException) -> ApiError:
    log.error("database unavailable: %s", type(exc).__name__)
    return ApiError(503, "database unavailable")


class _Batch:
    """What one transaction of the writer will hold."""

    __slots__ = ("audits", "cas", "done", "expected", "inserts", "notifies", "ops", "updates")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.inserts: dict[int, tuple[Any, ...]] = {}
        self.updates: dict[int, tuple[Any, ...]] = {}
        self.expected: dict[int, str] = {}  # updates that are compare-and-set: the state
        self.cas: dict[int, asyncio.Future[Any]] = {}  # … and who waits to know if they won
        self.audits: list[tuple[Any, ...]] = []
        self.notifies: dict[str, None] = {}  # payloads, in order, once each
        self.ops: list[tuple[Callable[..., Awaitable[Any]], tuple[Any, ...],
                             asyncio.Future[Any] | None]] = []
        self.done: asyncio.Future[Any] = loop.create_future()


class PostgresStore:
    def __init__(self, url: str, node: str, lease_s: float = 5.0, pool_size: int = 8) -> None:
        self.url = url
        self.node = node
        self.lease_s = lease_s
        self.pool_size = pool_size
        self._pool: Any = None
        self._writer: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: _Batch | None = None
        self._scheduled = False
        self._committing = False
        self._unlanded: set[int] = set()  # tasks whose insert was in a batch that failed
        self._closed = False
        self.commits = 0
        self.notifier = PostgresNotifier(self)

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            self._pool = await asyncpg.create_pool(self.url, min_size=1, max_size=self.pool_size)
            async with self._pool.acquire() as conn:
                await migrate(conn)
                now = wall_ms()
                await conn.execute("INSERT INTO nodes VALUES ($1, $2, $2) ON CONFLICT (name) "
                                   "DO UPDATE SET started_ms = $2, seen_ms = $2", self.node, now)
            self._writer = await asyncpg.connect(self.url)
            await self.notifier.listen()
        except (*_LOST, asyncpg.PostgresError) as exc:
            raise ConnectionError(f"cannot use the database {redact_url(self.url)}: "
                                  f"{type(exc).__name__}: {redact_url(str(exc))}") from None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        while self._pending is not None or self._committing:
            await self.barrier()
        await self.notifier.close()
        if self._writer is not None:
            await self._writer.close()
        if self._pool is not None:
            await self._pool.close()

    def periodic(self) -> list[tuple[float, Callable[[], Awaitable[None]]]]:
        return [(60.0, self._prune)]

    async def _prune(self) -> None:
        await self._write(_bans_prune, wall_ms())

    # --- the group commit --------------------------------------------------------------------

    def _batch(self) -> _Batch:
        batch = self._pending
        if batch is None:
            assert self._loop is not None, "store not open"
            batch = self._pending = _Batch(self._loop)
            if not self._scheduled:
                self._scheduled = True
                # One turn later: what this turn's writes woke up writes into the same batch.
                self._loop.call_soon(self._loop.call_soon, self._flush)
        return batch

    def _flush(self) -> None:
        self._scheduled = False
        if self._committing or self._pending is None:
            return  # the commit in flight flushes when it ends
        batch, self._pending = self._pending, None
        self._committing = True
        asyncio.ensure_future(self._commit(batch))

    async def _commit(self, batch: _Batch) -> None:
        try:
            try:
                won, values = await self._run(batch)
            except Exception as exc:
                if _is_lost(exc):
                    await self._reconnect()
                    self._fail(batch, unavailable(exc))
                else:
                    log.error("a write batch failed: %s", exc)
                    self._fail(batch, exc)
                return
            self.commits += 1
            self._unlanded.difference_update(batch.inserts)
            for task_id, fut in batch.cas.items():
                if not fut.done():
                    fut.set_result(task_id in won)
            for op_fut, value in zip((f for _, _, f in batch.ops), values):
                if op_fut is not None and not op_fut.done():
                    op_fut.set_result(value)
            if not batch.done.done():
                batch.done.set_result(None)
        finally:
            self._committing = False
            if self._pending is not None and not self._scheduled:
                self._flush()

    def _fail(self, batch: _Batch, exc: BaseException) -> None:
        """A batch that did not commit: whoever waits is told; inserts that did not land are
        written whole by their task's next save."""
        self._unlanded.update(batch.inserts)
        for fut in (batch.done, *batch.cas.values(), *(f for _, _, f in batch.ops if f)):
            if not fut.done():
                fut.set_exception(exc)
        # Nobody may wait for the batch's own future: keep "never retrieved" out of the log.
        batch.done.exception()

    async def _reconnect(self) -> None:
        try:
            await self._writer.close(timeout=1)
        except Exception:
            pass
        try:
            self._writer = await asyncpg.connect(self.url, timeout=5)
        except (*_LOST, asyncpg.PostgresError) as exc:
            log.error("database still unavailable: %s", type(exc).__name__)

    async def _run(self, batch: _Batch) -> tuple[set[int], list[Any]]:
        """The batch in one transaction: the compare-and-sets that won, the ops' values."""
        conn = self._writer
        if conn is None or conn.is_closed():
            await self._reconnect()
            conn = self._writer
        won: set[int] = set()
        values: list[Any] = []
        async with conn.transaction():
            if batch.inserts:
                await conn.execute(_INSERT, *_columns(batch.inserts.values(), 12))
            plain = [r for i, r in batch.updates.items() if i not in batch.expected]
            if plain:
                await conn.execute(_UPDATE, *_update_columns(plain))
            checked = [r for i, r in batch.updates.items() if i in batch.expected]
            if checked:
                rows = await conn.fetch(_UPDATE_IF, *_update_columns(checked),
                                        [batch.expected[r[0]] for r in checked])
                won = {r[0] for r in rows}
            if batch.audits:
                await conn.execute(_AUDIT, *_columns(batch.audits, 5))
            for fn, args, _ in batch.ops:
                values.append(await fn(conn, *args))
            if batch.notifies:
                await conn.execute("SELECT pg_notify($1, p) FROM unnest($2::text[]) p",
                                   CHANNEL, list(batch.notifies))
        return won, values

    def _write(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> asyncio.Future[Any]:
        """fn(connection, *args) in the next batch; resolves with its value at the commit."""
        batch = self._batch()
        assert self._loop is not None
        fut = self._loop.create_future()
        batch.ops.append((fn, args, fut))
        return fut

    def _write_nowait(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        self._batch().ops.append((fn, args, None))

    def notify(self, payload: str) -> None:
        """A NOTIFY sent with the next batch's commit (PostgresNotifier)."""
        self._batch().notifies[payload] = None

    async def barrier(self) -> None:
        await asyncio.shield(self._batch().done)

    async def ping(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self._pool.fetchval("SELECT 1"), 1.0))
        except Exception:
            return False

    # --- tasks -------------------------------------------------------------------------------

    def save_task(self, task: Task, expected: str | None = None) -> asyncio.Future[Any]:
        row = (task.id, task.agent, task.type, task.payload_json, task.state._value_,
               task.submitted_by, task.created_ms, task.expires_ms, task.delivered_ms,
               task.finished_ms, None if task.result is None else codec.dumps(task.result),
               task.delivered_by)
        batch = self._batch()
        if not task.stored or task.id in batch.inserts or task.id in self._unlanded:
            # Not committed yet: no other node can know it, so nobody can have changed it.
            task.stored = True
            batch.inserts[task.id] = row
            return batch.done
        batch.updates[task.id] = row
        if expected is None and task.id not in batch.expected:
            return batch.done
        if expected is not None:
            batch.expected.setdefault(task.id, expected)  # the first: what the store holds
        fut = batch.cas.get(task.id)
        if fut is None:
            assert self._loop is not None
            fut = batch.cas[task.id] = self._loop.create_future()
        return fut

    async def finish_task(self, task_id: int, expected_state: str, state: str,
                          result_json: str, finished_ms: int) -> bool:
        return bool(await self._write(_finish, task_id, expected_state, state, result_json,
                                      finished_ms))

    async def reserve_task_ids(self, count: int) -> range:
        top = int(await self._write(_reserve, count))
        return range(top - count + 1, top + 1)

    async def queued_tasks(self, agent: str) -> list[TaskRecord]:
        rows = await self._fetch(f"SELECT {_TASK_COLUMNS} FROM tasks WHERE state = 'queued' "
                                 "AND agent = $1 ORDER BY id", agent)
        return [TaskRecord(*r) for r in rows]

    async def recover(self, now_ms: int) -> list[TaskRecord]:
        await self._write(_recover, self.node, now_ms)
        return []  # a fleet's queues are the store's: each agent's first poll fetches its own

    async def node_alive(self) -> tuple[list[str], list[int]]:
        agents, ended = await self._write(_heartbeat, self.node, wall_ms(),
                                          int(self.lease_s * 1000))
        return agents, ended

    async def expire_queued(self, now_ms: int) -> list[int]:
        return list(await self._write(_expire, now_ms))

    async def task(self, task_id: int) -> TaskRecord | None:
        row = await self._fetchrow(f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id = $1", task_id)
        return TaskRecord(*row) if row else None

    async def tasks(self, where: TaskFilter) -> list[TaskRecord]:
        await self.barrier()  # read-your-writes: what was submitted just now is listed
        clauses, args = [], []  # type: list[str], list[Any]
        for column, value in (("agent", where.agent), ("state", where.state),
                              ("submitted_by", where.submitted_by)):
            if value is not None:
                args.append(value)
                clauses.append(f"{column} = ${len(args)}")
        if where.before_id is not None:
            args.append(where.before_id)
            clauses.append(f"id < ${len(args)}")
        if where.ids is not None:
            args.append(list(where.ids))
            clauses.append(f"id = ANY(${len(args)}::bigint[])")
        args.append(where.limit)
        sql = (f"SELECT {_TASK_COLUMNS} FROM tasks"
               + (" WHERE " + " AND ".join(clauses) if clauses else "")
               + f" ORDER BY id DESC LIMIT ${len(args)}")
        return [TaskRecord(*r) for r in await self._fetch(sql, *args)]

    # --- accounts, sessions, bans, settings --------------------------------------------------

    async def accounts_rev(self) -> int:
        return int(await self._fetchval(
            "SELECT value FROM settings WHERE key = 'accounts_rev'"))

    async def accounts(self) -> list[AccountRecord]:
        return [AccountRecord(*r) for r in await self._fetch(
            "SELECT name, type, secret_hash, created_ms, updated_ms FROM accounts ORDER BY name")]

    async def account(self, name: str) -> AccountRecord | None:
        row = await self._fetchrow("SELECT name, type, secret_hash, created_ms, updated_ms "
                                   "FROM accounts WHERE name = $1", name)
        return AccountRecord(*row) if row else None

    async def add_account(self, name: str, kind: str, secret_hash: str, now_ms: int) -> None:
        if not await self._write(_add_account, name, kind, secret_hash, now_ms):
            raise AccountExists(name)

    async def set_secret(self, name: str, secret_hash: str, now_ms: int) -> bool:
        return bool(await self._write(_set_secret, name, secret_hash, now_ms))

    async def remove_account(self, name: str) -> bool:
        return bool(await self._write(_remove_account, name))

    async def add_session(self, digest: str, account: str, now_ms: int) -> None:
        await self._write(_execute, "INSERT INTO sessions VALUES ($1, $2, $3, $3)", digest,
                          account, now_ms)

    def delete_session(self, digest: str) -> None:
        self._write_nowait(_execute, "DELETE FROM sessions WHERE digest = $1", digest)

    def touch_sessions(self, rows: Sequence[tuple[int, str]]) -> None:
        self._write_nowait(_executemany, "UPDATE sessions SET last_used_ms = "
                           "greatest(last_used_ms, $1) WHERE digest = $2", list(rows))

    async def session(self, digest: str) -> SessionRecord | None:
        await self.barrier()  # a session opened or ended just now by this node
        row = await self._fetchrow("SELECT digest, account, created_ms, last_used_ms "
                                   "FROM sessions WHERE digest = $1", digest)
        return SessionRecord(*row) if row else None

    def prune_sessions(self, last_used_before_ms: int, created_before_ms: int) -> None:
        self._write_nowait(_execute, "DELETE FROM sessions WHERE last_used_ms < $1 OR "
                           "created_ms < $2", last_used_before_ms, created_before_ms)

    def add_ban(self, key: str, until_ms: int) -> None:
        self._write_nowait(_execute, "INSERT INTO bans VALUES ($1, $2) ON CONFLICT (key) DO "
                           "UPDATE SET until_ms = greatest(bans.until_ms, excluded.until_ms)",
                           _text(key), until_ms)

    async def bans(self, now_ms: int) -> dict[str, int]:
        return {r[0]: r[1] for r in await self._fetch(
            "SELECT key, until_ms FROM bans WHERE until_ms > $1", now_ms)}

    async def setting(self, key: str) -> str | None:
        value = await self._fetchval("SELECT value FROM settings WHERE key = $1", key)
        return None if value is None else str(value)

    async def set_setting(self, key: str, value: str) -> None:
        await self._write(_execute, "INSERT INTO settings VALUES ($1, $2) ON CONFLICT (key) "
                          "DO UPDATE SET value = excluded.value", key, value)

    # --- agents' status, audit ---------------------------------------------------------------

    def agents_seen(self, rows: Sequence[tuple[str, int, str | None, str | None, int]]) -> None:
        self._write_nowait(_executemany, _AGENTS_SEEN, list(rows))

    def agent_inventory(self, name: str, inventory_json: str) -> None:
        self._write_nowait(_execute, "INSERT INTO agents (name, inventory) VALUES ($1, $2) "
                           "ON CONFLICT (name) DO UPDATE SET inventory = excluded.inventory",
                           name, inventory_json)

    async def agents(self, with_inventory: bool, name: str | None = None) -> list[AgentRecord]:
        inventory = "s.inventory" if with_inventory else "NULL"
        sql = (f"SELECT a.name, s.last_seen_ms, s.address, s.agent_version, {inventory}, "
               "s.online_until_ms "
               "FROM accounts a LEFT JOIN agents s ON s.name = a.name WHERE a.type = 'agent'")
        rows = (await self._fetch(sql + " AND a.name = $1", name) if name is not None
                else await self._fetch(sql + " ORDER BY a.name"))
        return [AgentRecord(*r) for r in rows]

    def audit(self, actor: str | None, action: str, detail: str, address: str | None) -> None:
        self._batch().audits.append((wall_ms(), _text(actor), action, _text(detail) or "",
                                     address))

    async def audit_events(self, before_id: int | None, limit: int) -> list[AuditRecord]:
        await self.barrier()
        sql = "SELECT id, at_ms, actor, action, detail, address FROM audit"
        rows = (await self._fetch(sql + " WHERE id < $1 ORDER BY id DESC LIMIT $2",
                                  before_id, limit) if before_id is not None
                else await self._fetch(sql + " ORDER BY id DESC LIMIT $1", limit))
        return [AuditRecord(*r) for r in rows]

    # --- reads -------------------------------------------------------------------------------

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        try:
            return list(await self._pool.fetch(sql, *args))
        except Exception as exc:
            raise unavailable(exc) if _is_lost(exc) else exc from None

    async def _fetchrow(self, sql: str, *args: Any) -> Any:
        try:
            return await self._pool.fetchrow(sql, *args)
        except Exception as exc:
            raise unavailable(exc) if _is_lost(exc) else exc from None

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        try:
            return await self._pool.fetchval(sql, *args)
        except Exception as exc:
            raise unavailable(exc) if _is_lost(exc) else exc from None


def _text(text: str | None) -> str | None:
    """Text as PostgreSQL takes it: no NUL, no lone surrogate (from a hostile login name)."""
    if text is None or (text.isascii() and "\x00" not in text):
        return text
    return text.replace("\x00", "\ufffd").encode("utf-8", "surrogatepass").decode(
        "utf-8", "replace")


def _columns(rows: Sequence[tuple[Any, ...]] | Any, width: int) -> list[list[Any]]:
    columns: list[list[Any]] = [[] for _ in range(width)]
    for row in rows:
        for column, value in zip(columns, row):
            column.append(value)
    return columns


def _update_columns(rows: list[tuple[Any, ...]]) -> list[list[Any]]:
    """id, state, delivered_ms, finished_ms, result, delivered_by of task rows."""
    return [[r[i] for r in rows] for i in (0, 4, 8, 9, 10, 11)]


_INSERT = (
    f"INSERT INTO tasks ({_TASK_COLUMNS}) SELECT * FROM unnest($1::bigint[], $2::text[], "
    "$3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[], $8::bigint[], $9::bigint[], "
    "$10::bigint[], $11::text[], $12::text[]) ON CONFLICT (id) DO UPDATE SET "
    "state = excluded.state, delivered_ms = excluded.delivered_ms, "
    "finished_ms = excluded.finished_ms, result = excluded.result, "
    "delivered_by = excluded.delivered_by")
_UPDATE = (
    "UPDATE tasks t SET state = u.state, delivered_ms = u.dms, finished_ms = u.fms, "
    "result = u.res, delivered_by = u.dby FROM unnest($1::bigint[], $2::text[], $3::bigint[], "
    "$4::bigint[], $5::text[], $6::text[]) AS u(id, state, dms, fms, res, dby) WHERE t.id = u.id")
_UPDATE_IF = (
    "UPDATE tasks t SET state = u.state, delivered_ms = u.dms, finished_ms = u.fms, "
    "result = u.res, delivered_by = u.dby FROM unnest($1::bigint[], $2::text[], $3::bigint[], "
    "$4::bigint[], $5::text[], $6::text[], $7::text[]) AS u(id, state, dms, fms, res, dby, was) "
    "WHERE t.id = u.id AND t.state = u.was RETURNING t.id")
_AUDIT = ("INSERT INTO audit (at_ms, actor, action, detail, address) SELECT * FROM "
          "unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[])")
_AGENTS_SEEN = (
    "INSERT INTO agents (name, last_seen_ms, address, agent_version, online_until_ms) "
    "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO UPDATE SET "
    "last_seen_ms = greatest(agents.last_seen_ms, excluded.last_seen_ms), "
    "address = excluded.address, online_until_ms = excluded.online_until_ms, "
    "agent_version = coalesce(excluded.agent_version, agents.agent_version)")


# --- writer ops: functions of the writer's connection, inside its batch's transaction ---------

async def _execute(conn: Any, sql: str, *args: Any) -> None:
    await conn.execute(sql, *args)


async def _executemany(conn: Any, sql: str, rows: list[tuple[Any, ...]]) -> None:
    await conn.executemany(sql, rows)


async def _reserve(conn: Any, count: int) -> int:
    return int(await conn.fetchval(
        "UPDATE settings SET value = (value::bigint + $1)::text WHERE key = 'tasks_seq' "
        "RETURNING value::bigint", count))


async def _finish(conn: Any, task_id: int, expected: str, state: str, result_json: str,
                  finished_ms: int) -> bool:
    done = await conn.fetchval("UPDATE tasks SET state = $1, result = $2, finished_ms = $3 "
                               "WHERE id = $4 AND state = $5 RETURNING id",
                               state, result_json, finished_ms, task_id, expected)
    return done is not None


async def _bump_accounts_rev(conn: Any) -> None:
    await conn.execute("UPDATE settings SET value = (value::bigint + 1)::text "
                       "WHERE key = 'accounts_rev'")


async def _add_account(conn: Any, name: str, kind: str, secret_hash: str, now_ms: int) -> bool:
    added = await conn.fetchval("INSERT INTO accounts VALUES ($1, $2, $3, $4, $4) "
                                "ON CONFLICT (name) DO NOTHING RETURNING name",
                                name, kind, secret_hash, now_ms)
    if added is not None:
        await _bump_accounts_rev(conn)
    return added is not None


async def _set_secret(conn: Any, name: str, secret_hash: str, now_ms: int) -> bool:
    changed = await conn.fetchval("UPDATE accounts SET secret_hash = $1, updated_ms = $2 "
                                  "WHERE name = $3 RETURNING name", secret_hash, now_ms, name)
    if changed is not None:
        await conn.execute("DELETE FROM sessions WHERE account = $1", name)
        await _bump_accounts_rev(conn)
    return changed is not None


async def _remove_account(conn: Any, name: str) -> bool:
    removed = await conn.fetchval("DELETE FROM accounts WHERE name = $1 RETURNING name", name)
    if removed is not None:
        await conn.execute("DELETE FROM sessions WHERE account = $1", name)
        await _bump_accounts_rev(conn)
    return removed is not None


async def _bans_prune(conn: Any, now_ms: int) -> None:
    await conn.execute("DELETE FROM bans WHERE until_ms <= $1", now_ms)


async def _recover(conn: Any, node: str, now_ms: int) -> None:
    await conn.execute("UPDATE tasks SET state = 'failed', finished_ms = $1, result = $2 "
                       "WHERE state = 'delivered' AND (delivered_by = $3 OR delivered_by IS NULL)",
                       now_ms, _NO_RESULT, node)
    await _expire(conn, now_ms)


async def _expire(conn: Any, now_ms: int) -> list[int]:
    rows = await conn.fetch("UPDATE tasks SET state = 'expired', finished_ms = $1, result = $2 "
                            "WHERE state = 'queued' AND expires_ms <= $1 RETURNING id",
                            now_ms, _EXPIRED)
    return [r[0] for r in rows]


async def _heartbeat(conn: Any, node: str, now_ms: int,
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


class PostgresNotifier:
    """Wake-ups between nodes: NOTIFYs on one channel, each sent with the commit of what it
    announces ("w:<node>:<agent>", "f:<node>:<task id>"), heard on a connection of its own.
    What a node sends, it does not hear back."""

    fleet = True

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self._on_work: Callable[[str], None] | None = None
        self._on_finished: Callable[[int], None] | None = None
        self._on_gap: Callable[[], None] | None = None
        self._conn: Any = None
        self._closing = False

    def subscribe(self, on_work: Callable[[str], None], on_finished: Callable[[int], None],
                  on_gap: Callable[[], None]) -> None:
        self._on_work, self._on_finished, self._on_gap = on_work, on_finished, on_gap

    def agent_has_work(self, agent: str) -> None:
        self.store.notify(f"w:{self.store.node}:{agent}")

    def task_finished(self, task_id: int) -> None:
        self.store.notify(f"f:{self.store.node}:{task_id}")

    async def listen(self) -> None:
        """Connects the listening connection (again, after it was lost)."""
        self._conn = await asyncpg.connect(self.store.url)
        self._conn.add_termination_listener(self._lost)
        await self._conn.add_listener(CHANNEL, self._heard)

    async def close(self) -> None:
        self._closing = True
        if self._conn is not None:
            await self._conn.close()

    def _heard(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        kind, _, rest = payload.partition(":")
        node, _, what = rest.rpartition(":")
        if node == self.store.node:
            return
        if kind == "w" and self._on_work is not None:
            self._on_work(what)
        elif kind == "f" and self._on_finished is not None and what.isdigit():
            self._on_finished(int(what))

    def _lost(self, conn: Any) -> None:
        if not self._closing:
            log.error("the listening connection to the database was lost; reconnecting")
            asyncio.ensure_future(self._relisten())

    async def _relisten(self) -> None:
        delay = 0.1
        while not self._closing:
            try:
                await self.listen()
                log.info("listening to the database again")
                if self._on_gap is not None:  # what was sent meanwhile was not heard
                    self._on_gap()
                return
            except (*_LOST, asyncpg.PostgresError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
