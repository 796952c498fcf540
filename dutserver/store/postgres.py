"""The store for several nodes (core.ports.Store) on PostgreSQL, with asyncpg.

Writes are group-committed as on SQLite: what the loop queued during one turn (task inserts,
state changes, audit events, wake-ups) goes in one transaction on the writer connection, a
statement per kind with arrays (`unnest`), so a batch costs a handful of round trips to the
server whatever it holds; the batch after it collects meanwhile. A state change that several
nodes may race for carries the state this node last knew, and is written only if the stored task
is still in it (compare and set); its future says whether it won. Reads take a connection from a
pool. Wake-ups between nodes are NOTIFYs on one channel, sent in the transaction that commits
what they announce, heard on a listening connection (PostgresNotifier).

Why asyncpg: docs/scaling.md, "The driver" (the round trip's statements with each, same run).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg

from dutserver.config import redact_url
from dutserver.core import codec
from dutserver.core.clock import now_ms as wall_ms
from dutserver.core.credentials import REVOKED
from dutserver.core.errors import ApiError
from dutserver.core.model import (AccountRecord, AgentRecord, AuditRecord, SessionRecord, Task,
                                  TaskFilter, TaskRecord)
from dutserver.core.ports import AccountExists
from dutserver.store import postgres_sql as pgsql
from dutserver.store import portable
from dutserver.store.enrollment_sql import EnrollmentStore
from dutserver.store.job_sql import JobStore
from dutserver.store.schedule_sql import ScheduleStore
from dutserver.store.postgres_batch import Batch, settle_won
from dutserver.store.postgres_notify import PostgresNotifier
from dutserver.store.postgres_schema import migrate
from dutserver.store.postgres_sql import LOST

log = logging.getLogger("dutserver.store")


async def _no_reset(conn: Any) -> None:
    """The pool's connections only ever run single reads (no session state to undo), so
    asyncpg's reset on release (a round trip to the server, on every read's way back) is
    skipped."""


def unavailable(exc: BaseException) -> ApiError:
    log.error("database unavailable: %s", type(exc).__name__)
    return ApiError(503, "database unavailable")


class PostgresStore(EnrollmentStore, JobStore, ScheduleStore):
    def __init__(self, url: str, node: str, lease_s: float = 5.0, pool_size: int = 8) -> None:
        self.url = url
        self.node = node
        self.lease_s = lease_s
        self.pool_size = pool_size
        self._pool: Any = None
        self._writer: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: Batch | None = None
        self._scheduled = False
        self._committing = False
        self._unlanded: set[int] = set()  # tasks whose insert was in a batch that failed
        self._closed = False
        self.commits = 0
        self.notifier = PostgresNotifier(self)

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            self._pool = await asyncpg.create_pool(self.url, min_size=1, max_size=self.pool_size,
                                                   reset=_no_reset)
            async with self._pool.acquire() as conn:
                await migrate(conn)
                now = wall_ms()
                await conn.execute("INSERT INTO nodes VALUES ($1, $2, $2) ON CONFLICT (name) "
                                   "DO UPDATE SET started_ms = $2, seen_ms = $2", self.node, now)
            self._writer = await asyncpg.connect(self.url)
            await self.notifier.listen()
        except (*LOST, asyncpg.PostgresError) as exc:
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
        await self._write(pgsql.bans_prune, wall_ms())

    # --- the group commit --------------------------------------------------------------------

    def _batch(self) -> Batch:
        batch = self._pending
        if batch is None:
            assert self._loop is not None, "store not open"
            batch = self._pending = Batch(self._loop)
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

    async def _commit(self, batch: Batch) -> None:
        try:
            try:
                won, values = await self._run(batch)
            except Exception as exc:
                if pgsql.is_lost(exc):
                    await self._reconnect()
                    self._fail(batch, unavailable(exc), await self._landed(batch.inserts))
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

    def _fail(self, batch: Batch, exc: BaseException, landed: set[int] | None = None) -> None:
        """A batch that did not commit (or whose commit was not confirmed): whoever waits is
        told; inserts that did not land are written whole by their task's next save."""
        self._unlanded.update(i for i in batch.inserts if landed is None or i not in landed)
        for fut in (batch.done, *batch.cas.values(), *(f for _, _, f in batch.ops if f)):
            if not fut.done():
                fut.set_exception(exc)
        # Nobody may wait for the batch's own future: keep "never retrieved" out of the log.
        batch.done.exception()

    async def _landed(self, ids: dict[int, Any]) -> set[int] | None:
        """Which of a lost batch's inserted tasks are stored after all (the connection went
        after the commit): those must not be written whole again (an upsert would undo what
        another node did with them meanwhile). None when that cannot be read now."""
        if not ids:
            return set()
        try:
            rows = await self._writer.fetch("SELECT id FROM tasks WHERE id = ANY($1::bigint[])",
                                            list(ids))
        except Exception:
            return None
        return {r[0] for r in rows}

    async def _reconnect(self) -> None:
        try:
            await self._writer.close(timeout=1)
        except Exception:
            pass
        try:
            self._writer = await asyncpg.connect(self.url, timeout=5)
        except (*LOST, asyncpg.PostgresError) as exc:
            log.error("database still unavailable: %s", type(exc).__name__)

    async def _run(self, batch: Batch) -> tuple[set[int], list[Any]]:
        """The batch in one transaction (one statement unless it has ops): the compare-and-sets
        that won, the ops' values."""
        conn = self._writer
        if conn is None or conn.is_closed():
            await self._reconnect()
            conn = self._writer
        present, args = batch.statement(self.node)
        won: set[int] = set()
        values: list[Any] = []
        if not batch.ops:  # the usual batch: one statement, its own transaction
            if present:
                won = set((await conn.fetchrow(pgsql.combined(present), *args))["won"])
            return won, values
        async with conn.transaction():
            if present:
                won = set((await conn.fetchrow(pgsql.combined(present), *args))["won"])
            for fn, op_args, _ in batch.ops:
                values.append(await fn(conn, *op_args))
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

    def tell_queued(self, task_id: int, agent: str) -> None:
        """A wake-up for agent with the next batch's commit: with the task as that inserts it,
        if it is still queued then (not handed over in the same batch)."""
        self._batch().tell_queued[task_id] = agent

    def tell_finished(self, task_id: int) -> None:
        """A wake-up for the task's end with the next batch's commit: with the outcome that
        writes, if it writes one (and for a compare-and-set, if that wins)."""
        self._batch().tell_finished[task_id] = None

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
            if batch.updates.pop(task.id, None) is not None:
                # A compare-and-set of it queued here before (its insert had failed): the insert
                # writes the newer row, and, nobody else knowing the task, it wins. (One statement
                # cannot insert a row and update it: its parts see the same snapshot.)
                batch.expected.pop(task.id, None)
                cas = batch.cas.pop(task.id, None)
                if cas is not None:
                    batch.done.add_done_callback(functools.partial(settle_won, cas))
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
        return bool(await self._write(pgsql.finish, task_id, expected_state, state, result_json,
                                      finished_ms))

    async def reserve_task_ids(self, count: int) -> range:
        top = int(await self._write(pgsql.reserve, count))
        return range(top - count + 1, top + 1)

    async def queued_tasks(self, agent: str) -> list[TaskRecord]:
        rows = await self._fetch(f"SELECT {pgsql.TASK_COLUMNS} FROM tasks WHERE state = 'queued' "
                                 "AND agent = $1 ORDER BY id", agent)
        return [TaskRecord(*r) for r in rows]

    async def recover(self, now_ms: int) -> list[TaskRecord]:
        await self._write(pgsql.recover, self.node, now_ms)
        return []  # a fleet's queues are the store's: each agent's first poll fetches its own

    async def node_alive(self) -> tuple[list[str], list[int]]:
        agents, ended = await self._write(pgsql.heartbeat, self.node, wall_ms(),
                                          int(self.lease_s * 1000))
        return agents, ended

    async def expire_queued(self, now_ms: int) -> list[int]:
        return list(await self._write(pgsql.expire, now_ms))

    async def task(self, task_id: int) -> TaskRecord | None:
        row = await self._fetchrow(f"SELECT {pgsql.TASK_COLUMNS} FROM tasks WHERE id = $1", task_id)
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
        sql = (f"SELECT {pgsql.TASK_COLUMNS} FROM tasks"
               + (" WHERE " + " AND ".join(clauses) if clauses else "")
               + f" ORDER BY id DESC LIMIT ${len(args)}")
        return [TaskRecord(*r) for r in await self._fetch(sql, *args)]

    # --- accounts, sessions, bans, settings --------------------------------------------------

    async def accounts_rev(self) -> int:
        return int(await self._fetchval(
            "SELECT value FROM settings WHERE key = 'accounts_rev'"))

    async def accounts(self) -> list[AccountRecord]:
        return [AccountRecord(*r) for r in await self._fetch(pgsql.ACCOUNTS + " ORDER BY a.name")]

    async def account(self, name: str) -> AccountRecord | None:
        row = await self._fetchrow(pgsql.ACCOUNTS + " WHERE a.name = $1", name)
        return AccountRecord(*row) if row else None

    async def add_account(self, name: str, kind: str, secret_hash: str, now_ms: int) -> None:
        if not await self._write(pgsql.add_account, name, kind, secret_hash, now_ms):
            raise AccountExists(name)

    async def set_secret(self, name: str, secret_hash: str, now_ms: int) -> bool:
        return bool(await self._write(pgsql.set_secret, name, secret_hash, now_ms))

    async def remove_account(self, name: str) -> bool:
        return bool(await self._write(pgsql.remove_account, name))

    async def add_session(self, digest: str, account: str, now_ms: int) -> None:
        await self._write(pgsql.execute, "INSERT INTO sessions VALUES ($1, $2, $3, $3)", digest,
                          account, now_ms)

    def delete_session(self, digest: str) -> None:
        self._write_nowait(pgsql.execute, "DELETE FROM sessions WHERE digest = $1", digest)

    def touch_sessions(self, rows: Sequence[tuple[int, str]]) -> None:
        self._write_nowait(pgsql.executemany, "UPDATE sessions SET last_used_ms = "
                           "greatest(last_used_ms, $1) WHERE digest = $2", list(rows))

    async def session(self, digest: str) -> SessionRecord | None:
        await self.barrier()  # a session opened or ended just now by this node
        row = await self._fetchrow("SELECT digest, account, created_ms, last_used_ms "
                                   "FROM sessions WHERE digest = $1", digest)
        return SessionRecord(*row) if row else None

    def prune_sessions(self, last_used_before_ms: int, created_before_ms: int) -> None:
        self._write_nowait(pgsql.execute, "DELETE FROM sessions WHERE last_used_ms < $1 OR "
                           "created_ms < $2", last_used_before_ms, created_before_ms)

    def add_ban(self, key: str, until_ms: int) -> None:
        self._write_nowait(pgsql.execute, "INSERT INTO bans VALUES ($1, $2) ON CONFLICT (key) DO "
                           "UPDATE SET until_ms = greatest(bans.until_ms, excluded.until_ms)",
                           pgsql.text(key), until_ms)

    async def bans(self, now_ms: int) -> dict[str, int]:
        return {r[0]: r[1] for r in await self._fetch(
            "SELECT key, until_ms FROM bans WHERE until_ms > $1", now_ms)}

    async def setting(self, key: str) -> str | None:
        value = await self._fetchval("SELECT value FROM settings WHERE key = $1", key)
        return None if value is None else str(value)

    async def set_setting(self, key: str, value: str) -> None:
        await self._write(pgsql.execute, "INSERT INTO settings VALUES ($1, $2) ON CONFLICT (key) "
                          "DO UPDATE SET value = excluded.value", key, value)

    # --- agents' status, audit ---------------------------------------------------------------

    def agents_seen(self, rows: Sequence[tuple[str, int, str | None, str | None, int]]) -> None:
        self._write_nowait(pgsql.executemany, pgsql.AGENTS_SEEN, list(rows))

    def agent_inventory(self, name: str, inventory_json: str) -> None:
        self._write_nowait(pgsql.execute, "INSERT INTO agents (name, inventory) VALUES ($1, $2) "
                           "ON CONFLICT (name) DO UPDATE SET inventory = excluded.inventory",
                           name, inventory_json)

    async def agents(self, with_inventory: bool, name: str | None = None) -> list[AgentRecord]:
        inventory = "s.inventory" if with_inventory else "NULL"
        sql = (f"SELECT a.name, s.last_seen_ms, s.address, s.agent_version, {inventory}, "
               "s.online_until_ms, s.capabilities, s.facts, s.labels, a.secret_hash "
               "FROM accounts a LEFT JOIN agents s ON s.name = a.name WHERE a.type = 'agent'")
        rows = (await self._fetch(sql + " AND a.name = $1", name) if name is not None
                else await self._fetch(sql + " ORDER BY a.name"))
        return [AgentRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8],
                        r[9] == REVOKED) for r in rows]

    def audit(self, actor: str | None, action: str, detail: str, address: str | None) -> None:
        self._batch().audits.append((wall_ms(), pgsql.text(actor), action, pgsql.text(detail) or "",
                                     address))

    async def audit_events(self, before_id: int | None, limit: int) -> list[AuditRecord]:
        await self.barrier()
        sql = "SELECT id, at_ms, actor, action, detail, address FROM audit"
        rows = (await self._fetch(sql + " WHERE id < $1 ORDER BY id DESC LIMIT $2",
                                  before_id, limit) if before_id is not None
                else await self._fetch(sql + " ORDER BY id DESC LIMIT $1", limit))
        return [AuditRecord(*r) for r in rows]

    # --- operations written once for both stores (store/portable.py) ------------------------

    async def _steps(self, operation: Any, *args: Any) -> Any:
        return portable.value(await self._write(portable.run_postgres, operation, *args))

    async def _steps_read(self, operation: Any, *args: Any) -> Any:
        try:
            async with self._pool.acquire() as conn:
                return await portable.run_postgres(conn, operation, *args)
        except Exception as exc:
            raise unavailable(exc) if pgsql.is_lost(exc) else exc from None

    # --- reads -------------------------------------------------------------------------------

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        try:
            return list(await self._pool.fetch(sql, *args))
        except Exception as exc:
            raise unavailable(exc) if pgsql.is_lost(exc) else exc from None

    async def _fetchrow(self, sql: str, *args: Any) -> Any:
        try:
            return await self._pool.fetchrow(sql, *args)
        except Exception as exc:
            raise unavailable(exc) if pgsql.is_lost(exc) else exc from None

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        try:
            return await self._pool.fetchval(sql, *args)
        except Exception as exc:
            raise unavailable(exc) if pgsql.is_lost(exc) else exc from None
