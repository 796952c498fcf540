"""The embedded store (core.ports.Store) on SQLite in WAL mode: one file, nothing to install.

Writes go through a group-commit writer (store/writer.py): the task rows, audit events and status
updates of one loop turn commit together. Reads run on a reader thread with a connection of
its own (WAL lets them run while the writer commits), checkpoints on a third. The SQL itself
is in sqlite_sql.py, the schema in sqlite_schema.py.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from dutserver.core import codec
from dutserver.core.clock import now_ms as wall_ms
from dutserver.core.model import (AccountRecord, AgentRecord, AuditRecord, SessionRecord, Task,
                                  TaskFilter, TaskRecord)
from dutserver.store import portable
from dutserver.store import sqlite_sql as sql
from dutserver.store.enrollment_sql import EnrollmentStore
from dutserver.store.job_sql import JobStore
from dutserver.store.schedule_sql import ScheduleStore
from dutserver.store.sqlite_schema import connect
from dutserver.store.writer import (GroupCommitWriter, InlineGroupCommitWriter, RowBatches,
                                    background_priority, checkpoint)

T = TypeVar("T")
log = logging.getLogger("dutserver.store")


class _Call:
    """fn(connection, *args) as a writer op (an object, not a closure: native.py)."""

    __slots__ = ("args", "fn")

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.fn = fn
        self.args = args

    def __call__(self, conn: sqlite3.Connection) -> Any:
        return self.fn(conn, *self.args)


class SqliteStore(EnrollmentStore, JobStore, ScheduleStore):
    """The database as the server uses it: group-committed writes, reads on a reader thread."""

    def __init__(self, path: Path, synchronous: str = "NORMAL", commit_interval_s: float = 0.0,
                 node: str = "local", checkpoint_interval_s: float = 1.0,
                 index_interval_s: float = 0.1,
                 wal_restart_bytes: int = 64 * 1024 * 1024) -> None:
        self.path = path
        self.node = node
        self.intervals = (checkpoint_interval_s, index_interval_s)
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
        self.rows = RowBatches(self.writer, 3, sql.write_rows)
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
        self.index_pass: Callable[[sqlite3.Connection, list[int], list[int]], None] = \
            sql.tasks_index
        self._top_inserted = 0  # the highest task id inserted by this process
        self._late: set[int] = set()  # inserted below it: their look-ups are written singly
        # Tasks whose state changed, by id, with the number of that change: an id leaves
        # once a pass that included it committed (a pass that fails must not take it along).
        self._restated: dict[int, int] = {}
        self._changes = 0
        self._checkpointed_commits = -1  # the writer's commit count at the last checkpoint
        self._closed = False

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._reader = await loop.run_in_executor(
            self._reader_pool, connect, self.path, self._synchronous)
        self._checkpointer = await loop.run_in_executor(
            self._checkpoint_pool, connect, self.path, self._synchronous)
        self.writer.start()

    async def close(self) -> None:
        """Commits what is queued, then closes; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
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

    def _write(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """fn(connection, *args) in the writer's next batch; resolves at its commit."""
        return self.writer.write(_Call(fn, *args))

    def _write_nowait(self, fn: Callable[..., Any], *args: Any) -> None:
        self.writer.write_nowait(_Call(fn, *args))

    async def _steps(self, operation: Any, *args: Any) -> Any:
        """An operation written once for both stores (store/portable.py), in the next batch."""
        return await self._write(portable.run_sqlite, operation, *args)

    async def _steps_read(self, operation: Any, *args: Any) -> Any:
        return await self.read(portable.run_sqlite, operation, *args)

    def periodic(self) -> list[tuple[float, Callable[[], Awaitable[None]]]]:
        # The checkpoint once a second: every 0.1 s made the half-load p99 neither better nor
        # worse (bench/README.md, "Session 5").
        return [(self.intervals[0], self.checkpoint), (self.intervals[1], self._index_periodic),
                (60.0, self._prune)]

    async def _index_periodic(self) -> None:
        self.index_tasks_soon()

    async def _prune(self) -> None:
        self._write_nowait(sql.bans_prune, wall_ms())  # bans that ended

    async def ping(self) -> bool:
        return True  # a file of this process's own

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
        restated, upto, late = list(self._restated), self._changes, list(self._late)
        self._unindexed = False
        index_pass = self.index_pass
        done = self.writer.write(lambda conn: index_pass(conn, restated, late))
        done.add_done_callback(lambda fut: self._indexed(fut, upto, late))
        return done

    def _indexed(self, fut: asyncio.Future[Any], upto: int, late: list[int]) -> None:
        failed = fut.exception()
        if failed is not None:  # the next pass does it all again
            self._unindexed = True
            log.error("writing the task look-ups failed: %s", failed)
        else:  # what changed again after the pass was queued stays for the next one
            self._restated = {n: c for n, c in self._restated.items() if c > upto}
            self._late.difference_update(late)

    def save_task(self, task: Task, expected: str | None = None) -> asyncio.Future[Any]:
        """Writes the task as it is now; the future resolves at the commit. Its first save is an
        insert, and so is a later one while that insert is still pending; after that, an update
        of the fields that change (cheaper than an upsert of every field: a third of SQLite's
        work per round trip). `expected` is not checked: one process owns the file, and its
        memory is the truth."""
        row = (task.id, task.agent, task.type, task.payload_json, task.state._value_,
               task.submitted_by, task.created_ms, task.expires_ms, task.delivered_ms or 0,
               task.finished_ms or 0, "" if task.result is None else codec.dumps(task.result),
               task.delivered_by or "")
        if task.stored:
            self._changes += 1
            self._restated[task.id] = self._changes
            return self.rows.add(_UPDATE, row, task.id, unless_pending=_INSERT)
        task.stored = True
        self._unindexed = True
        if task.id > self._top_inserted:
            self._top_inserted = task.id
        else:
            self._late.add(task.id)
        return self.rows.add(_INSERT, row, task.id)

    def audit(self, actor: str | None, action: str, detail: str, address: str | None) -> None:
        """Records an audit event; nobody waits for it, but it lands in the next batch."""
        self.rows.add(_AUDIT, (wall_ms(), _storable(actor), action, _storable(detail) or "",
                               address))

    # --- the rest of core.ports.Store ----------------------------------------------------------

    async def reserve_task_ids(self, count: int) -> range:
        return await self._write(sql.reserve_task_ids, count)

    async def finish_task(self, task_id: int, expected_state: str, state: str,
                          result_json: str, finished_ms: int) -> bool:
        done = await self._write(sql.task_finish, task_id, expected_state, state, result_json,
                                 finished_ms)
        if done:
            self._changes += 1
            self._restated[task_id] = self._changes
        return done

    async def queued_tasks(self, agent: str) -> list[TaskRecord]:
        newest_first = await self.tasks(TaskFilter(agent=agent, state="queued", limit=1 << 30))
        return newest_first[::-1]

    async def node_alive(self) -> tuple[list[str], list[int]]:
        return [], []  # one process owns the file: no other node to recover

    async def expire_queued(self, now_ms: int) -> list[int]:
        return []  # the one process holds every queued task, and its sweep expires them

    async def recover(self, now_ms: int) -> list[TaskRecord]:
        await self.barrier()
        return await self.read(sql.tasks_recover, self.node, now_ms)

    async def task(self, task_id: int) -> TaskRecord | None:
        return await self.read(sql.task_get, task_id)

    async def tasks(self, where: TaskFilter) -> list[TaskRecord]:
        await self.index_tasks()  # read-your-writes: what was submitted just now is listed
        return await self.read(sql.task_rows, where)

    async def accounts_rev(self) -> int:
        return await self.read(sql.accounts_rev)

    async def accounts(self) -> list[AccountRecord]:
        return await self.read(sql.accounts)

    async def account(self, name: str) -> AccountRecord | None:
        found = await self.read(sql.accounts, name)
        return found[0] if found else None

    async def add_account(self, name: str, kind: str, secret_hash: str, now_ms: int) -> None:
        await self._write(sql.account_add, name, kind, secret_hash, now_ms)

    async def set_secret(self, name: str, secret_hash: str, now_ms: int) -> bool:
        return await self._write(sql.account_set_secret, name, secret_hash, now_ms)

    async def remove_account(self, name: str) -> bool:
        return await self._write(sql.account_remove, name)

    async def add_session(self, digest: str, account: str, now_ms: int) -> None:
        await self._write(sql.session_add, digest, account, now_ms)

    def delete_session(self, digest: str) -> None:
        self._write_nowait(sql.session_delete, digest)

    def touch_sessions(self, rows: Sequence[tuple[int, str]]) -> None:
        self._write_nowait(sql.sessions_touch, list(rows))

    async def session(self, digest: str) -> SessionRecord | None:
        await self.barrier()  # a session opened or ended just now by this process
        return await self.read(sql.session_get, digest)

    def prune_sessions(self, last_used_before_ms: int, created_before_ms: int) -> None:
        self._write_nowait(sql.sessions_prune, last_used_before_ms, created_before_ms)

    def add_ban(self, key: str, until_ms: int) -> None:
        self._write_nowait(sql.ban_add, key, until_ms)

    async def bans(self, now_ms: int) -> dict[str, int]:
        return await self.read(sql.bans, now_ms)

    async def setting(self, key: str) -> str | None:
        return await self.read(sql.setting_get, key)

    async def set_setting(self, key: str, value: str) -> None:
        await self._write(sql.setting_set, key, value)

    def agents_seen(self, rows: Sequence[tuple[str, int, str | None, str | None, int]]) -> None:
        self._write_nowait(sql.agents_seen, list(rows))

    def agent_inventory(self, name: str, inventory_json: str) -> None:
        self._write_nowait(sql.agent_inventory, name, inventory_json)

    async def agents(self, with_inventory: bool, name: str | None = None) -> list[AgentRecord]:
        return await self.read(sql.agents, with_inventory, name)

    async def audit_events(self, before_id: int | None, limit: int) -> list[AuditRecord]:
        await self.barrier()
        return await self.read(sql.audit_rows, before_id, limit)


_INSERT, _UPDATE, _AUDIT = range(3)  # the kinds of SqliteStore.rows


def _storable(text: str | None) -> str | None:
    """Text as SQLite can take it: a lone surrogate from a hostile login name becomes U+FFFD."""
    if text is None or text.isascii():
        return text
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
