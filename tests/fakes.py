"""Small in-memory fakes of the core's ports (dutserver/core/ports.py), for the core tests:
a clock whose time moves only when a test says so, a store without SQL, a client that hangs up.

They are meant to be obviously right rather than fast or complete: the store keeps one dict
per table and applies a batch of writes at its "commit", one loop turn after the first write
(as the SQLite store's group commit does); reads see what is committed.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from dutserver.core.clock import Clock
from dutserver.core.model import (AccountRecord, AgentRecord, AuditRecord, SessionRecord, Task,
                                  TaskFilter, TaskRecord)
from dutserver.core.ports import AccountExists

# --- the clock ---------------------------------------------------------------------------------


class FakeTimer:
    def __init__(self, due: float, fn: Callable[..., object], args: tuple[Any, ...]) -> None:
        self.due = due
        self.fn = fn
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock(Clock):
    """Wall and monotonic time that move only in `advance`, which runs the timers that fall due,
    in order of their due time (then of their creation), each at its own time."""

    def __init__(self, now_ms: int = 1_700_000_000_000, monotonic: float = 1000.0) -> None:
        self._wall0 = now_ms
        self._mono0 = monotonic
        self._elapsed = 0.0  # seconds since the start, the one number both times follow
        self._timers: list[tuple[float, int, FakeTimer]] = []
        self._seq = itertools.count()

    def now_ms(self) -> int:
        return self._wall0 + int(round(self._elapsed * 1000))

    def monotonic(self) -> float:
        return self._mono0 + self._elapsed

    def call_later(self, delay_s: float, fn: Callable[..., object], *args: Any) -> FakeTimer:
        timer = FakeTimer(self._elapsed + max(0.0, delay_s), fn, args)
        heapq.heappush(self._timers, (timer.due, next(self._seq), timer))
        return timer

    def pending(self) -> int:
        """Timers neither run nor cancelled."""
        return sum(not t.cancelled for _, _, t in self._timers)

    def advance(self, seconds: float) -> None:
        end = self._elapsed + seconds
        while self._timers and self._timers[0][0] <= end:
            due, _, timer = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            self._elapsed = max(self._elapsed, due)
            timer.cancelled = True  # ran: a cancel() now is a no-op, as for asyncio's handles
            timer.fn(*timer.args)
        self._elapsed = end


# --- the client's hang-up ----------------------------------------------------------------------


class FakeHangup:
    """core.waiting.Hangup: callbacks run one loop turn after hang_up(), with this as argument
    (as an asyncio Future's do)."""

    def __init__(self) -> None:
        self._done = False
        self._callbacks: list[Callable[[Any], object]] = []

    def done(self) -> bool:
        return self._done

    def add_done_callback(self, fn: Callable[[Any], object], /) -> None:
        if self._done:
            asyncio.get_running_loop().call_soon(fn, self)
        else:
            self._callbacks.append(fn)

    def hang_up(self) -> None:
        if self._done:
            return
        self._done = True
        loop = asyncio.get_running_loop()
        for fn in self._callbacks:
            loop.call_soon(fn, self)
        self._callbacks.clear()


# --- the store ---------------------------------------------------------------------------------


class CommitFailed(Exception):
    """What a FakeStore commit raises when a test asked for it (FakeStore.fail_next_commit)."""


@dataclass
class Tables:
    """The database: shared by every FakeStore of one fleet (FakeStore.sibling)."""

    tasks: dict[int, TaskRecord] = field(default_factory=dict)
    tasks_seq: int = 0
    accounts: dict[str, AccountRecord] = field(default_factory=dict)
    accounts_rev: int = 0
    sessions: dict[str, SessionRecord] = field(default_factory=dict)
    bans: dict[str, int] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)
    agents: dict[str, AgentRecord] = field(default_factory=dict)
    audit: list[AuditRecord] = field(default_factory=list)
    dead: set[str] = field(default_factory=set)  # nodes whose heartbeat stopped (tests say so)
    down: bool = False  # the database does not answer (ping)


def task_record(task: Task) -> TaskRecord:
    """The row of a task as it is now (a copy: later changes of the Task are not in it)."""
    return TaskRecord(
        task.id, task.agent, task.type, task.payload_json or json.dumps(task.payload),
        task.state.value, task.submitted_by, task.created_ms, task.expires_ms, task.delivered_ms,
        task.finished_ms, None if task.result is None else json.dumps(task.result),
        task.delivered_by)


class FakeStore:
    """core.ports.Store in memory. Writes queue into a batch committed one loop turn later;
    `fail_next_commit = True` makes that commit fail (nothing of the batch is applied, its
    futures get CommitFailed). Awaited writes wait for the pending batch first, then apply."""

    def __init__(self, node: str = "local", tables: Tables | None = None) -> None:
        self.node = node
        self.db = tables if tables is not None else Tables()
        self.fail_next_commit = False
        self.commits = 0  # batches committed (failed ones not counted)
        self.opened = False
        self._batch: list[tuple[Callable[[], object], asyncio.Future[Any]]] = []

    def sibling(self, node: str) -> FakeStore:
        """Another process's store on the same database."""
        return FakeStore(node, self.db)

    # --- the group commit ---------------------------------------------------------------------

    def _queue(self, apply: Callable[[], object]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if not self._batch:
            loop.call_soon(self._commit)
        self._batch.append((apply, fut))
        return fut

    def _commit(self) -> None:
        batch, self._batch = self._batch, []
        if self.fail_next_commit:
            self.fail_next_commit = False
            for _, fut in batch:
                if not fut.cancelled():
                    fut.set_exception(CommitFailed("commit failed (FakeStore)"))
            return
        self.commits += 1
        for apply, fut in batch:
            value = apply()
            if not fut.cancelled():
                fut.set_result(value)

    def _nowait(self, apply: Callable[[], object]) -> None:
        fut = self._queue(apply)
        fut.add_done_callback(_ignore_failure)

    async def ping(self) -> bool:
        return not self.db.down

    async def barrier(self) -> None:
        """Waits for the pending batch's commit (failed or not)."""
        if self._batch:
            fut = self._queue(lambda: None)
            fut.add_done_callback(_ignore_failure)
            await asyncio.wait([fut])

    # --- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        self.opened = True

    async def close(self) -> None:
        await self.barrier()
        self.opened = False

    def periodic(self) -> list[tuple[float, Callable[[], Awaitable[None]]]]:
        return []

    # --- tasks --------------------------------------------------------------------------------

    async def reserve_task_ids(self, count: int) -> range:
        await asyncio.sleep(0)  # a round trip to the database
        start = self.db.tasks_seq + 1
        self.db.tasks_seq += count
        return range(start, start + count)

    def save_task(self, task: Task, expected: str | None = None) -> asyncio.Future[Any]:
        """Resolves True once written; False when `expected` is given and the stored task was
        no longer in that state (compare and set: another process changed it first)."""
        row = task_record(task)
        task.stored = True

        def apply() -> bool:
            old = self.db.tasks.get(row.id)
            if expected is not None and old is not None and old.state != expected:
                return False
            self.db.tasks[row.id] = row
            return True
        return self._queue(apply)

    async def queued_tasks(self, agent: str) -> list[TaskRecord]:
        return [replace(r) for _, r in sorted(self.db.tasks.items())
                if r.agent == agent and r.state == "queued"]

    async def node_alive(self) -> tuple[list[str], list[int]]:
        """Recovers the nodes a test declared dead (`db.dead`) as recover() would: their
        deliveries fail. Returns the agents with queued tasks when it recovered any, and the
        ids of the tasks it ended."""
        await self.barrier()
        dead, self.db.dead = self.db.dead - {self.node}, self.db.dead & {self.node}
        if not dead:
            return [], []
        ended = []
        for row in list(self.db.tasks.values()):
            if row.state == "delivered" and row.delivered_by in dead:
                self.db.tasks[row.id] = replace(
                    row, state="failed", result=json.dumps({"error": True, "msg": "no result"}))
                ended.append(row.id)
        return sorted({r.agent for r in self.db.tasks.values() if r.state == "queued"}), ended

    async def expire_queued(self, now_ms: int) -> list[int]:
        """Every queued task past its deadline expires here (the fake knows no holders)."""
        await self.barrier()
        ended = []
        for row in list(self.db.tasks.values()):
            if row.state == "queued" and row.expires_ms <= now_ms:
                self.db.tasks[row.id] = replace(row, state="expired", finished_ms=now_ms)
                ended.append(row.id)
        return ended

    async def finish_task(self, task_id: int, expected_state: str, state: str,
                          result_json: str, finished_ms: int) -> bool:
        await self.barrier()
        row = self.db.tasks.get(task_id)
        if row is None or row.state != expected_state:
            return False
        self.db.tasks[task_id] = replace(row, state=state, result=result_json,
                                         finished_ms=finished_ms)
        return True

    async def recover(self, now_ms: int) -> list[TaskRecord]:
        await self.barrier()
        for row in list(self.db.tasks.values()):
            if row.state == "delivered" and row.delivered_by in (self.node, None):
                self.db.tasks[row.id] = replace(
                    row, state="failed", finished_ms=now_ms,
                    result=json.dumps({"error": True, "msg": "no result"}))
            elif row.state == "queued" and row.expires_ms <= now_ms:
                self.db.tasks[row.id] = replace(row, state="expired", finished_ms=now_ms)
        return sorted((r for r in self.db.tasks.values() if r.state == "queued"),
                      key=lambda r: r.id)

    async def task(self, task_id: int) -> TaskRecord | None:
        row = self.db.tasks.get(task_id)
        return replace(row) if row is not None else None

    async def tasks(self, where: TaskFilter) -> list[TaskRecord]:
        await self.barrier()
        rows = [r for r in sorted(self.db.tasks.values(), key=lambda r: -r.id)
                if (where.agent is None or r.agent == where.agent)
                and (where.state is None or r.state == where.state)
                and (where.submitted_by is None or r.submitted_by == where.submitted_by)
                and (where.before_id is None or r.id < where.before_id)
                and (where.ids is None or r.id in where.ids)]
        return [replace(r) for r in rows[:where.limit]]

    # --- accounts, sessions, bans, settings ---------------------------------------------------

    async def accounts_rev(self) -> int:
        return self.db.accounts_rev

    async def accounts(self) -> list[AccountRecord]:
        return [replace(a) for _, a in sorted(self.db.accounts.items())]

    async def account(self, name: str) -> AccountRecord | None:
        acc = self.db.accounts.get(name)
        return replace(acc) if acc is not None else None

    async def add_account(self, name: str, kind: str, secret_hash: str, now_ms: int) -> None:
        await self.barrier()
        if name in self.db.accounts:
            raise AccountExists(name)
        self.db.accounts[name] = AccountRecord(name, kind, secret_hash, now_ms, now_ms)
        self.db.accounts_rev += 1

    async def set_secret(self, name: str, secret_hash: str, now_ms: int) -> bool:
        await self.barrier()
        acc = self.db.accounts.get(name)
        if acc is None:
            return False
        self.db.accounts[name] = replace(acc, secret_hash=secret_hash, updated_ms=now_ms)
        self._end_sessions_of(name)
        self.db.accounts_rev += 1
        return True

    async def remove_account(self, name: str) -> bool:
        await self.barrier()
        if self.db.accounts.pop(name, None) is None:
            return False
        self._end_sessions_of(name)
        self.db.accounts_rev += 1
        return True

    def _end_sessions_of(self, name: str) -> None:
        for digest, sess in list(self.db.sessions.items()):
            if sess.account == name:
                del self.db.sessions[digest]

    async def add_session(self, digest: str, account: str, now_ms: int) -> None:
        await self.barrier()
        self.db.sessions[digest] = SessionRecord(digest, account, now_ms, now_ms)

    def delete_session(self, digest: str) -> None:
        self._nowait(lambda: self.db.sessions.pop(digest, None))

    def touch_sessions(self, rows: Sequence[tuple[int, str]]) -> None:
        touched = list(rows)

        def apply() -> None:
            for last_used_ms, digest in touched:
                sess = self.db.sessions.get(digest)
                if sess is not None:
                    sess.last_used_ms = max(sess.last_used_ms, last_used_ms)
        self._nowait(apply)

    async def session(self, digest: str) -> SessionRecord | None:
        await self.barrier()
        sess = self.db.sessions.get(digest)
        return replace(sess) if sess is not None else None

    def prune_sessions(self, last_used_before_ms: int, created_before_ms: int) -> None:
        def apply() -> None:
            for digest, sess in list(self.db.sessions.items()):
                if sess.last_used_ms < last_used_before_ms or sess.created_ms < created_before_ms:
                    del self.db.sessions[digest]
        self._nowait(apply)

    def add_ban(self, key: str, until_ms: int) -> None:
        def apply() -> None:  # a ban is only ever made longer
            self.db.bans[key] = max(until_ms, self.db.bans.get(key, 0))
        self._nowait(apply)

    async def bans(self, now_ms: int) -> dict[str, int]:
        return {k: v for k, v in self.db.bans.items() if v > now_ms}

    async def setting(self, key: str) -> str | None:
        return self.db.settings.get(key)

    async def set_setting(self, key: str, value: str) -> None:
        await self.barrier()
        self.db.settings[key] = value

    # --- agents' status, audit ----------------------------------------------------------------

    def _agent(self, name: str) -> AgentRecord:
        rec = self.db.agents.get(name)
        if rec is None:
            rec = self.db.agents[name] = AgentRecord(name, None, None, None, None)
        return rec

    def agents_seen(self, rows: Sequence[tuple[str, int, str | None, str | None, int]]) -> None:
        seen = list(rows)

        def apply() -> None:
            for name, last_seen_ms, address, version, online_until_ms in seen:
                rec = self._agent(name)
                rec.last_seen_ms, rec.address = last_seen_ms, address
                rec.online_until_ms = online_until_ms
                rec.version = version if version is not None else rec.version
        self._nowait(apply)

    def agent_inventory(self, name: str, inventory_json: str) -> None:
        def apply() -> None:
            self._agent(name).inventory = inventory_json
        self._nowait(apply)

    async def agents(self, with_inventory: bool, name: str | None = None) -> list[AgentRecord]:
        names = sorted(n for n, a in self.db.accounts.items() if a.kind == "agent"
                       and (name is None or n == name))
        out = []
        for n in names:
            rec = replace(self.db.agents.get(n) or AgentRecord(n, None, None, None, None))
            if not with_inventory:
                rec.inventory = None
            out.append(rec)
        return out

    def audit(self, actor: str | None, action: str, detail: str, address: str | None) -> None:
        def apply() -> None:
            self.db.audit.append(AuditRecord(len(self.db.audit) + 1, 0, actor, action, detail,
                                             address))
        self._nowait(apply)

    async def audit_events(self, before_id: int | None, limit: int) -> list[AuditRecord]:
        await self.barrier()
        rows = [a for a in reversed(self.db.audit) if before_id is None or a.id < before_id]
        return rows[:limit]


def _ignore_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: a failed commit of a write nobody waits for is no error
