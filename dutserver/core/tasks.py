"""The task lifecycle in one place: submit, hand-off, result, cancel, expiry, crash recovery,
and the poll bookkeeping every agent protocol shares.

Every agent protocol (classic now; OCO's JSON-RPC and RDFM's device API later) and every admin
API calls this; the rules of PROTOCOL.md live here. The order of writes matters and is kept by
the store's group commit: a task's insert is queued before its hand-off, and the hand-off is
committed before the task is sent to the agent (at most once delivery).

Compiled (dutserver/native.py): no closures here (each would be a reference cycle per call);
partials and methods instead.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from dutserver.config import Settings
from dutserver.core import codec
from dutserver.core.auth import Auth
from dutserver.core.dispatcher import Dispatcher
from dutserver.core.credentials import REVOKED
from dutserver.core.errors import ApiError, unknown_agent
from dutserver.core.model import FINAL_STATES, Task, TaskFilter, TaskState
from dutserver.core.clock import Clock
from dutserver.core.ports import Notifier, Store
from dutserver.core.sharing import Sharing
from dutserver.core.views import record_view, task_view
from dutserver.core.waiting import TIMED_OUT, Hangup, ParkedPoll, Waiting

log = logging.getLogger("dutserver.tasks")

TIMEOUT_MSG = "Time out while waiting for task result"
_QUEUED, _DELIVERED = TaskState.QUEUED.value, TaskState.DELIVERED.value
_ID_BLOCK = 4096  # task ids reserved from the store at a time (a fleet's nodes share them)


class Tasks:
    def __init__(self, settings: Settings, store: Store, notifier: Notifier, clock: Clock,
                 dispatcher: Dispatcher, auth: Auth) -> None:
        self.s = settings
        self.store = store
        self.notifier = notifier
        self.clock = clock
        self.dispatcher = dispatcher
        self.auth = auth
        self._ids = range(0)  # the block of task ids in use, and where in it we are
        self._id_at = 0
        self._spare = range(0)  # the next block, fetched before the one in use runs out
        self._reserving: asyncio.Future[None] | None = None
        # Several nodes on one store (core/sharing.py); a lone process needs none of it.
        self.fleet = notifier.fleet
        # How long a poll keeps its agent online in the other nodes' eyes: as long as it may
        # last, the grace after it, and the sweep that writes it.
        self._online_for_ms = int((settings.poll_timeout_s + settings.online_grace_s
                                   + settings.sweep_interval_s) * 1000)
        self.sharing = Sharing(self)
        notifier.subscribe(self.sharing.on_agent_work, self.sharing.on_task_finished,
                           self.sharing.on_gap)

    @property
    def closing(self) -> bool:
        """Shutting down: polls end at once, empty."""
        return self.dispatcher.closing

    async def recover(self) -> None:
        """Start-up: what this node delivered without a result fails, queued tasks go back into
        their queues."""
        rows = await self.store.recover(self.clock.now_ms())
        # In a fleet the queues are the store's: an agent's first poll here fetches its tasks.
        for row in rows if not self.fleet else ():
            self.dispatcher.enqueue(Task(
                id=row.id, agent=row.agent, type=row.type, payload=json.loads(row.payload),
                submitted_by=row.submitted_by, created_ms=row.created_ms,
                expires_ms=row.expires_ms, payload_json=row.payload, stored=True))
        if rows:
            log.info("recovered %d queued tasks", len(rows))
        await self._reserve(_ID_BLOCK)

    # --- task ids, from the store in blocks ---------------------------------------------------

    def _ids_left(self) -> int:
        return len(self._ids) - self._id_at

    def _has_ids(self, count: int) -> bool:
        return self._ids_left() >= count or len(self._spare) >= count

    async def _reserve(self, count: int) -> None:
        while not self._has_ids(count):
            if self._reserving is None:
                self._reserving = asyncio.ensure_future(self._reserve_block(count))
            await asyncio.shield(self._reserving)

    async def _reserve_block(self, count: int) -> None:
        try:
            self._spare = await self.store.reserve_task_ids(max(count, _ID_BLOCK))
        finally:
            self._reserving = None

    def _take_ids(self, count: int) -> range:
        """count ids, from the block in use or else the spare one (what is left of the old
        block goes unused: ids are never given out twice; gaps are allowed). The next spare
        block is fetched in the background well before it is needed."""
        if self._ids_left() < count:
            self._ids, self._id_at, self._spare = self._spare, 0, range(0)
        start = self._id_at
        self._id_at += count
        if not self._spare and self._reserving is None and self._ids_left() < _ID_BLOCK // 2:
            self._reserving = asyncio.ensure_future(self._reserve_block(_ID_BLOCK))
        return self._ids[start:start + count]

    def prepare(self, targets: Sequence[str]) -> Awaitable[None] | None:
        """What must happen before `create` can run in this turn: None when nothing (the
        usual case), else something to await (an account the CLI added a moment ago, a new
        block of task ids)."""
        if self._has_ids(len(targets)) and all(t in self.auth.accounts for t in targets):
            return None
        return self._prepare(list(targets))

    async def _prepare(self, targets: list[str]) -> None:
        await self.auth.knows([t for t in targets if isinstance(t, str)])
        await self._reserve(len(targets))

    async def reserve(self, count: int) -> None:
        """Makes sure count task ids are at hand, so that creates in one turn need no wait."""
        await self._reserve(count)

    # --- submitting --------------------------------------------------------------------------

    def check(self, targets: Sequence[str], body: Any,
              queued: dict[str, int] | None = None) -> str:
        """Refuses (ApiError) what create would refuse, queuing nothing; the task's type.
        queued: tasks the caller will queue first in the same turn, by agent (an atomic
        batch's earlier parts), counted against each agent's queue bound."""
        if not targets:
            raise ApiError(400, "Missing target parameter")
        if not isinstance(body, dict):
            raise ApiError(400, "Invalid JSON: the task must be a JSON object")
        kind = body.get("type")
        if not isinstance(kind, str) or not kind:
            raise ApiError(400, "Task type missing")
        if len(kind) > 64:
            raise ApiError(400, "Task type too long (at most 64 characters)")
        if not kind.isprintable() or not (kind.isascii() or _encodable(kind)):
            raise ApiError(400, "Task type must be printable text")
        pending: dict[str, int] = dict(queued) if queued else {}
        for name in targets:
            acc = self.auth.accounts.get(name) if isinstance(name, str) else None
            if acc is None or acc.kind != "agent":
                raise unknown_agent(str(name))
            caps = acc.capabilities
            if caps is not None and kind not in caps:
                raise ApiError(400, f"Agent {name} does not run task type {kind} (it offers: "
                                    f"{', '.join(sorted(caps)) or 'nothing'})")
            if acc.secret_hash == REVOKED:
                raise ApiError(409, f"Agent {name} is revoked")
            pending[name] = pending.get(name, 0) + 1
            if self.dispatcher.queued(name) + pending[name] > self.s.queue_max:
                raise ApiError(503, "Task queue is full")
        return kind

    def create(self, targets: Sequence[str], body: Any, submitted_by: str,
               expires_s: float | None = None, address: str | None = None,
               ids: Sequence[int] | None = None,
               waiter: Any = None) -> tuple[list[Task], asyncio.Future[Any]]:
        """Validates and queues one task per target; nothing is queued if anything is wrong.
        Runs after `prepare`. Returns the tasks and the future of their insert's commit.
        ids: given by the caller (a job records them before its tasks exist); waiter: told
        of each task's end (core/waiting.py's Waiting, or a job's)."""
        kind = self.check(targets, body)
        if ids is None and not self._has_ids(len(targets)):  # callers run prepare() first
            raise ApiError(503, "No task ids reserved; try again")
        payload = {k: v for k, v in body.items() if k not in ("id", "type")}
        payload_json = codec.compact(payload)
        now = self.clock.now_ms()
        expires = now + int((expires_s if expires_s is not None else self.s.task_expiry_s) * 1000)
        tasks = []
        store = self.store
        for task_id, name in zip(self._take_ids(len(targets)) if ids is None else ids, targets):
            task = Task(task_id, name, kind, payload, submitted_by, now, expires,
                        payload_json=payload_json, waiter=waiter)
            tasks.append(task)
            inserted = store.save_task(task)  # one batch: the last one's commit is all of them
        span = f"{tasks[0].id}" if len(tasks) == 1 else f"{tasks[0].id}-{tasks[-1].id}"
        store.audit(submitted_by, "task_submit",
                    f"{kind} to {','.join(targets)[:500]} (task {span})", address)
        dispatcher = self.dispatcher
        if self.fleet:  # agents not polling here: the node where they poll is woken
            by_agent: dict[str, int | None] = {}
            for t in tasks:
                if not dispatcher.has_poll(t.agent):  # the task told, if its agent's only one
                    by_agent[t.agent] = t.id if t.agent not in by_agent else None
            for name, only in by_agent.items():
                self.notifier.agent_has_work(name, only)
        for task in tasks:
            dispatcher.enqueue(task)
        return tasks, inserted

    async def submit(self, targets: Sequence[str], body: Any, submitted_by: str,
                     expires_s: float | None, address: str | None) -> list[Task]:
        """Non-blocking submit: returns once the tasks are durably stored."""
        if isinstance(targets, list):
            await self._prepare(targets)
        tasks, inserted = self.create(targets, body, submitted_by, expires_s, address)
        await self.stored(tasks, inserted)
        return tasks

    async def stored(self, tasks: Sequence[Task], inserted: Awaitable[Any]) -> None:
        """Waits for the tasks' insert. If it fails (a 500 or a 503, so the submitter may
        well try again) nothing of it may run: what was not handed out meanwhile is dropped,
        unsent."""
        try:
            await inserted
        except Exception:
            for task in tasks:
                if task.state is TaskState.QUEUED:
                    self.dispatcher.withdraw(task)
                    self.dispatcher.forget(task)
            raise

    def submit_and_wait(self, targets: Sequence[str], body: Any, submitted_by: str,
                        timeout_s: float, gone: Hangup | None, address: str | None,
                        done: Callable[[list[dict[str, Any] | None]], None]) -> None:
        """Blocking submit: done(each target's result, None where none came in time).

        Raises ApiError at once when the submit is refused. Callers run `prepare` first, so
        this runs in the request's own turn, and the poll a task is handed to is answered
        without a task switch in between."""
        tasks, _ = self.create(targets, body, submitted_by, None, address)
        waiting = Waiting(self, tasks, done)
        waiting.timer = self.clock.call_later(timeout_s, waiting.settle_all, TIMED_OUT)
        if gone is not None:
            gone.add_done_callback(waiting.hung_up)

    # --- the agent's side --------------------------------------------------------------------

    def poll(self, agent: str, address: str | None, version: str | None, gone: Hangup,
             answer: Callable[[Task | None], None]) -> None:
        """An agent's long-poll, with its bookkeeping (online status, last seen, address,
        version): answer(the oldest queued task) once its hand-off is committed, answer(None)
        after the poll timeout, at shutdown or when the agent hung up."""
        # In a fleet, an agent that was not polling here may have tasks queued by other nodes.
        fetch = self.fleet and not self.dispatcher.is_online(agent)
        slot = self.dispatcher.poll_started(agent, address, version, self._online_for_ms)
        self.next_for(agent, gone, functools.partial(self._poll_answered, slot, gone, answer))
        if fetch:
            self.sharing.fetch(agent)

    def _poll_answered(self, slot: Any, gone: Hangup, answer: Callable[[Task | None], None],
                       task: Task | None) -> None:
        self.dispatcher.poll_ended(slot, dropped=gone.done() and task is None)
        answer(task)

    def next_for(self, agent: str, gone: Hangup,
                 answer: Callable[[Task | None], None]) -> None:
        """The long-poll itself, without the bookkeeping of `poll`."""
        d = self.dispatcher
        if d.closing:
            answer(None)
            return
        task = d.take(agent)
        if task is not None:
            self.hand_over(task, gone, answer)
            return
        poll = ParkedPoll(self, agent, gone, answer)
        d.park(agent, poll)
        gone.add_done_callback(poll.end_empty)

    def hand_over(self, task: Task, gone: Hangup, answer: Callable[[Task | None], None]) -> None:
        """Records the hand-off; the agent gets the task once that is committed (at most
        once: a crash after the commit fails the task rather than sending it again)."""
        if gone.done():  # the agent hung up meanwhile: keep the task for its next poll
            self.dispatcher.requeue_front(task)
            answer(None)
            return
        task.state = TaskState.DELIVERED
        task.delivered_ms = self.clock.now_ms()
        task.delivered_by = self.store.node
        self.store.save_task(task, _QUEUED if self.fleet else None).add_done_callback(
            functools.partial(self._handed_over, task, gone, answer))

    def _handed_over(self, task: Task, gone: Hangup, answer: Callable[[Task | None], None],
                     fut: asyncio.Future[Any]) -> None:
        failed = fut.exception()
        if failed is None and fut.result() is False:  # another node took or ended it first
            self.sharing.lost(task)
            self.next_for(task.agent, gone, answer)  # this poll goes on
            return
        if failed is not None or gone.done():
            # Recorded (or not) but never sent: never handed out, whatever became of the task
            # meanwhile (another node may have ended it); undone if still ours, so not lost.
            if failed is not None:
                log.error("recording the hand-off of task %d failed: %s", task.id, failed)
            if task.state is TaskState.DELIVERED:
                task.state = TaskState.QUEUED
                task.delivered_ms = None
                task.delivered_by = None
                if task.id in self.dispatcher.active:  # not dropped meanwhile (refused submit)
                    self.store.save_task(task, _DELIVERED if self.fleet else None)
                    self.dispatcher.requeue_front(task)
            answer(None)
            return
        answer(task)

    def result(self, agent: str, address: str | None, version: str | None, task_id: int,
               result: Any) -> asyncio.Future[Any]:
        """An agent's result, with its bookkeeping (last seen, address, version); the future
        resolves once it is committed (or fails with the ApiError that refuses it)."""
        d = self.dispatcher
        d.seen(d.slot(agent), address, version)
        return self.record_result(agent, task_id, result)

    def record_result(self, agent: str, task_id: int, result: Any) -> asyncio.Future[Any]:
        if not isinstance(result, dict):
            raise ApiError(400, "Invalid JSON: the result must be a JSON object")
        if "error" not in result:
            result = {**result, "error": False}
        task = self.dispatcher.active.get(task_id)
        if task is None:  # not in this process's memory: maybe another one delivered it
            return asyncio.ensure_future(self.sharing.record_elsewhere(agent, task_id, result))
        if task.agent != agent:
            raise ApiError(403, "This task was not sent to you")
        if task.state is TaskState.QUEUED and self.fleet:
            # Queued here, maybe delivered by another node meanwhile: the store decides.
            return asyncio.ensure_future(self.sharing.record_for_copy(task, result))
        if task.state is not TaskState.DELIVERED:
            raise ApiError(409, "Task was not delivered")
        state = TaskState.FAILED if result.get("error") is True else TaskState.DONE
        if task.waiter is not None:
            task.waiter.settle(task, result)  # the submitter need not wait for the commit
        if state is TaskState.DONE and task.type == "inventory":
            self.store.agent_inventory(agent, codec.dumps(
                {k: v for k, v in result.items() if k != "error"}))
        closed = self.close(task, state, result)
        return self.sharing.must_win(closed) if self.fleet else closed

    # --- admin actions -----------------------------------------------------------------------

    async def cancel(self, task_id: int, actor: str, address: str | None) -> dict[str, Any]:
        task = self.dispatcher.active.get(task_id)
        if task is None:
            row = await self.store.task(task_id)
            if row is None:
                raise ApiError(404, f"Unknown task: {task_id}")
            if row.state != TaskState.QUEUED.value or not await self.store.finish_task(
                    task_id, TaskState.QUEUED.value, TaskState.CANCELLED.value,
                    codec.dumps(_cancelled(actor)), self.clock.now_ms()):
                state = row.state if row.state != TaskState.QUEUED.value else "taken meanwhile"
                raise ApiError(409, f"Task {task_id} already left the queue ({state})")
            self.store.audit(actor, "task_cancel", f"task {task_id}", address)
            if self.notifier.fleet:
                self.notifier.task_finished(task_id)
            return await self.view(task_id)
        if task.state is not TaskState.QUEUED:
            raise ApiError(409, f"Task {task_id} already left the queue ({task.state.value})")
        closed = self.close(task, TaskState.CANCELLED, _cancelled(actor))
        if await closed is False:  # another node took it meanwhile
            raise ApiError(409, f"Task {task_id} already left the queue (taken meanwhile)")
        self.store.audit(actor, "task_cancel", f"task {task_id}", address)
        return task_view(task)

    async def view(self, task_id: int) -> dict[str, Any]:
        """The task as it is: from memory where this node holds it (its newest state, maybe not
        committed yet); in a fleet, from the store (a copy here may lag another node's)."""
        task = self.dispatcher.active.get(task_id)
        if task is not None and not self.fleet:
            return task_view(task)
        row = await self.store.task(task_id)
        if row is None and task is not None:  # its insert is not committed yet
            return task_view(task)
        if row is None:
            raise ApiError(404, f"Unknown task: {task_id}")
        return record_view(row)

    async def wait_final(self, task_id: int, wait_s: float) -> dict[str, Any]:
        """The task once it is final, or as it is after wait_s."""
        deadline = self.clock.monotonic() + wait_s
        while True:
            view = await self.view(task_id)
            left = deadline - self.clock.monotonic()
            if view["state"] in FINAL_STATES or left <= 0:
                return view
            await asyncio.sleep(min(0.05, left))

    async def history(self, where: TaskFilter) -> list[dict[str, Any]]:
        views = []
        for row in await self.store.tasks(where):
            live = None if self.fleet else self.dispatcher.active.get(row.id)
            views.append(task_view(live) if live is not None else record_view(row))
        return views

    # --- housekeeping ------------------------------------------------------------------------

    def sweep(self) -> None:
        """Ends tasks whose deadline passed, and writes the agents' last-seen status."""
        now = self.clock.now_ms()
        for task in list(self.dispatcher.active.values()):
            if task.expires_ms > now:
                continue
            if task.state is TaskState.QUEUED:
                self.close(task, TaskState.EXPIRED, {"error": True, "msg": "expired in queue"})
            elif task.state is TaskState.DELIVERED:
                self.close(task, TaskState.FAILED,
                           {"error": True, "msg": "no result before the deadline"})
        seen = []
        for name, slot in self.dispatcher.slots.items():
            if slot.seen_dirty and slot.last_seen_ms is not None:
                slot.seen_dirty = False
                seen.append((name, slot.last_seen_ms, slot.address, slot.version,
                             slot.online_until_ms))
        if seen:
            self.store.agents_seen(seen)

    def end_polls_of_changed(self) -> None:
        """Agents whose credential was revoked or replaced (Auth.changed_agents): their parked
        polls are answered now, and their next request is checked against what is stored."""
        changed = self.auth.changed_agents
        while changed:
            self.dispatcher.end_polls(changed.pop())

    def cancel_for_removed_agents(self) -> None:
        for task in list(self.dispatcher.active.values()):
            acc = self.auth.accounts.get(task.agent)
            if task.state is TaskState.QUEUED and (acc is None or acc.kind != "agent"):
                self.close(task, TaskState.CANCELLED, {"error": True, "msg": "agent removed"})

    def close(self, task: Task, state: TaskState, result: dict[str, Any]) -> asyncio.Future[Any]:
        """Ends a task this process holds: out of its queue, into the store, its waiter told.
        In a fleet only if nobody changed it first: the future then resolves False."""
        before = task.state
        if before is TaskState.QUEUED:
            self.dispatcher.withdraw(task)
        task.state = state
        task.finished_ms = self.clock.now_ms()
        task.result = result
        self.dispatcher.forget(task)
        if task.waiter is not None:
            task.waiter.settle(task, TIMED_OUT)
        if not self.fleet:
            return self.store.save_task(task)
        saved = self.store.save_task(task, before.value)
        self.sharing.watch_close(task, saved)
        return saved


def _cancelled(actor: str) -> dict[str, Any]:
    return {"error": True, "msg": f"cancelled by {actor}"}


def _encodable(text: str) -> bool:
    """False for lone surrogates, which JSON allows but UTF-8 (and so a database) does not."""
    try:
        text.encode()
        return True
    except UnicodeEncodeError:
        return False
