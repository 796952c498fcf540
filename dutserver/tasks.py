"""The task lifecycle in one place: submit, hand-off, result, cancel, expiry, crash recovery.

Both route modules call this; the rules of PROTOCOL.md live here. The order of writes matters
and is kept by the single group-commit writer: a task's insert is queued before its hand-off,
and the hand-off is committed before the task is sent to the agent (at most once delivery).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from dutserver import codec, store
from dutserver.auth import Auth
from dutserver.config import Settings
from dutserver.dispatcher import Dispatcher, Poll
from dutserver.errors import ApiError, unknown_agent
from dutserver.model import FINAL_STATES, Task, TaskState
from dutserver.store import Store, now_ms

log = logging.getLogger("dutserver.tasks")

TIMEOUT_MSG = "Time out while waiting for task result"
NO_RESULT = {"error": True, "msg": "no result"}
_TIMED_OUT = object()  # waiter sentinels: the submitter's time ran out, or it hung up
_GONE = object()


class Hangup(Protocol):
    """What tells a long request that its client went away: an asyncio Future (the ASGI path)
    or the direct path's request itself. done() is true once it happened; callbacks added
    before run soon after it, with one argument."""

    def done(self) -> bool: ...

    def add_done_callback(self, fn: Callable[[Any], object], /) -> None: ...


class Tasks:
    def __init__(self, settings: Settings, db: Store, dispatcher: Dispatcher, auth: Auth) -> None:
        self.s = settings
        self.db = db
        self.dispatcher = dispatcher
        self.auth = auth
        self._next_id = 1

    async def recover(self) -> None:
        """Start-up: unanswered deliveries fail, queued tasks go back into their queues."""
        next_id, rows = await self.db.read(store.tasks_recover, now_ms())
        self._next_id = next_id
        for row in rows:
            self.dispatcher.enqueue(Task(
                id=row["id"], agent=row["agent"], type=row["type"],
                payload=json.loads(row["payload"]), submitted_by=row["submitted_by"],
                created_ms=row["created_ms"], expires_ms=row["expires_ms"],
                payload_json=row["payload"], stored=True))
        if rows:
            log.info("recovered %d queued tasks", len(rows))

    # --- submitting --------------------------------------------------------------------------

    def create(self, targets: Sequence[str], body: Any, submitted_by: str,
               expires_s: float | None = None,
               address: str | None = None) -> tuple[list[Task], asyncio.Future[Any]]:
        """Validates and queues one task per target; nothing is queued if anything is wrong.

        Returns the tasks and the future of their insert's commit."""
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
        pending: dict[str, int] = {}
        for name in targets:
            acc = self.auth.accounts.get(name) if isinstance(name, str) else None
            if acc is None or acc.kind != "agent":
                raise unknown_agent(str(name))
            pending[name] = pending.get(name, 0) + 1
            if self.dispatcher.queued(name) + pending[name] > self.s.queue_max:
                raise ApiError(503, "Task queue is full")
        payload = {k: v for k, v in body.items() if k not in ("id", "type")}
        payload_json = codec.compact(payload)
        now = now_ms()
        expires = now + int((expires_s if expires_s is not None else self.s.task_expiry_s) * 1000)
        tasks = []
        for name in targets:
            task = Task(self._next_id, name, kind, payload, submitted_by, now, expires,
                        payload_json=payload_json)
            self._next_id += 1
            tasks.append(task)
            inserted = self.db.save_task(task)  # one batch: the last one's commit is all of them
        ids = f"{tasks[0].id}" if len(tasks) == 1 else f"{tasks[0].id}-{tasks[-1].id}"
        self.db.audit(submitted_by, "task_submit",
                      f"{kind} to {','.join(targets)[:500]} (task {ids})", address)
        for task in tasks:
            self.dispatcher.enqueue(task)
        return tasks, inserted

    async def submit(self, targets: Sequence[str], body: Any, submitted_by: str,
                     expires_s: float | None, address: str | None) -> list[Task]:
        """Non-blocking submit: returns once the tasks are durably stored."""
        if isinstance(targets, list):
            await self.auth.knows([t for t in targets if isinstance(t, str)])
        tasks, inserted = self.create(targets, body, submitted_by, expires_s, address)
        await inserted
        return tasks

    def submit_and_wait(self, targets: Sequence[str], body: Any, submitted_by: str,
                        timeout_s: float, gone: Hangup | None, address: str | None,
                        done: Callable[[list[dict[str, Any] | None]], None]) -> None:
        """Blocking submit: done(each target's result, None where none came in time).

        Raises ApiError at once when the submit is refused. Callers make sure first that every
        target is known (`auth.knows`), so this runs in the request's own turn, and the poll
        a task is handed to is answered without a task switch in between."""
        tasks, _ = self.create(targets, body, submitted_by, None, address)
        waiting = _Waiting(self, tasks, done)
        waiting.timer = asyncio.get_running_loop().call_later(timeout_s, waiting.settle_all,
                                                              _TIMED_OUT)
        if gone is not None:
            gone.add_done_callback(waiting.hung_up)

    # --- the agent's side --------------------------------------------------------------------

    def next_for(self, agent: str, gone: Hangup,
                 answer: Callable[[Task | None], None]) -> None:
        """A long-poll: answer(the oldest queued task for agent) once its hand-off is
        committed; answer(None) after the poll timeout, at shutdown or when the agent hung up."""
        d = self.dispatcher
        if d.closing:
            answer(None)
            return
        task = d.take(agent)
        if task is not None:
            self._hand_over(task, gone, answer)
            return
        poll = _ParkedPoll(self, agent, gone, answer)
        d.park(agent, poll)
        gone.add_done_callback(poll.end_empty)

    def _hand_over(self, task: Task, gone: Hangup,
                   answer: Callable[[Task | None], None]) -> None:
        """Records the hand-off; the agent gets the task once that is committed (at most
        once: a crash after the commit fails the task rather than sending it again)."""
        if gone.done():  # the agent hung up meanwhile: keep the task for its next poll
            self.dispatcher.requeue_front(task)
            answer(None)
            return
        task.state = TaskState.DELIVERED
        task.delivered_ms = now_ms()

        def committed(fut: asyncio.Future[Any]) -> None:
            failed = fut.exception()
            if (failed is not None or gone.done()) and task.state is TaskState.DELIVERED:
                # Recorded (or not) but never sent: undo, so it is not lost.
                if failed is not None:
                    log.error("recording the hand-off of task %d failed: %s", task.id, failed)
                task.state = TaskState.QUEUED
                task.delivered_ms = None
                self.db.save_task(task)
                self.dispatcher.requeue_front(task)
                answer(None)
                return
            answer(task)

        self.db.save_task(task).add_done_callback(committed)

    def record_result(self, agent: str, task_id: int, result: Any) -> asyncio.Future[Any]:
        """Records a result; the future resolves once it is committed (or fails with the
        ApiError that refuses it)."""
        if not isinstance(result, dict):
            raise ApiError(400, "Invalid JSON: the result must be a JSON object")
        task = self.dispatcher.active.get(task_id)
        if task is None:
            return asyncio.ensure_future(self._refuse_result(agent, task_id))
        if task.agent != agent:
            raise ApiError(403, "This task was not sent to you")
        if task.state is not TaskState.DELIVERED:
            raise ApiError(409, "Task was not delivered")
        if "error" not in result:
            result = {**result, "error": False}
        state = TaskState.FAILED if result.get("error") is True else TaskState.DONE
        if task.waiter is not None:
            task.waiter.settle(task, result)  # the submitter need not wait for the commit
        if state is TaskState.DONE and task.type == "inventory":
            self.db.write_nowait(store.agent_inventory(
                agent, codec.dumps({k: v for k, v in result.items() if k != "error"})))
        return self._close(task, state, result)

    async def _refuse_result(self, agent: str, task_id: int) -> None:
        """Why a result for a task that is no longer active is refused."""
        row = await self.db.read(store.task_row, task_id)
        if row is None:
            raise ApiError(404, f"Unknown task: {task_id}")
        if row["agent"] != agent:
            raise ApiError(403, "This task was not sent to you")
        raise ApiError(409, "Result already recorded")

    # --- admin actions -----------------------------------------------------------------------

    async def cancel(self, task_id: int, actor: str, address: str | None) -> dict[str, Any]:
        task = self.dispatcher.active.get(task_id)
        if task is None or task.state is not TaskState.QUEUED:
            row = await self.view(task_id)  # 404 when unknown
            raise ApiError(409, f"Task {task_id} already left the queue ({row['state']})")
        await self._close(task, TaskState.CANCELLED, {"error": True, "msg": f"cancelled by {actor}"})
        self.db.audit(actor, "task_cancel", f"task {task_id}", address)
        return task_view(task)

    async def view(self, task_id: int) -> dict[str, Any]:
        task = self.dispatcher.active.get(task_id)
        if task is not None:
            return task_view(task)
        row = await self.db.read(store.task_row, task_id)
        if row is None:
            raise ApiError(404, f"Unknown task: {task_id}")
        return row_view(row)

    async def wait_final(self, task_id: int, wait_s: float) -> dict[str, Any]:
        """The task once it is final, or as it is after wait_s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            view = await self.view(task_id)
            if view["state"] in FINAL_STATES or loop.time() >= deadline:
                return view
            await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))

    async def history(self, target: str | None, state: str | None, submitted_by: str | None,
                      before_id: int | None, ids: list[int] | None,
                      limit: int) -> list[dict[str, Any]]:
        await self.db.index_tasks()  # read-your-writes: what was submitted just now is listed
        rows = await self.db.read(store.task_rows, target, state, submitted_by, before_id, ids,
                                  limit)
        views = []
        for row in rows:
            live = self.dispatcher.active.get(row["id"])
            views.append(task_view(live) if live is not None else row_view(row))
        return views

    # --- housekeeping ------------------------------------------------------------------------

    def sweep(self) -> None:
        """Ends tasks whose deadline passed, and writes the agents' last-seen status."""
        now = now_ms()
        for task in list(self.dispatcher.active.values()):
            if task.expires_ms > now:
                continue
            if task.state is TaskState.QUEUED:
                self._close(task, TaskState.EXPIRED, {"error": True, "msg": "expired in queue"})
            elif task.state is TaskState.DELIVERED:
                self._close(task, TaskState.FAILED,
                            {"error": True, "msg": "no result before the deadline"})
        seen = []
        for name, slot in self.dispatcher.slots.items():
            if slot.seen_dirty and slot.last_seen_ms is not None:
                slot.seen_dirty = False
                seen.append((name, slot.last_seen_ms, slot.address, slot.version))
        if seen:
            self.db.write_nowait(store.agents_seen(seen))

    def cancel_for_removed_agents(self) -> None:
        for task in list(self.dispatcher.active.values()):
            acc = self.auth.accounts.get(task.agent)
            if task.state is TaskState.QUEUED and (acc is None or acc.kind != "agent"):
                self._close(task, TaskState.CANCELLED, {"error": True, "msg": "agent removed"})

    def _close(self, task: Task, state: TaskState, result: dict[str, Any]) -> asyncio.Future[Any]:
        if task.state is TaskState.QUEUED:
            self.dispatcher.withdraw(task)
        task.state = state
        task.finished_ms = now_ms()
        task.result = result
        self.dispatcher.forget(task)
        if task.waiter is not None:
            task.waiter.settle(task, _TIMED_OUT)
        return self.db.save_task(task)


class _ParkedPoll(Poll):
    """A long-poll parked until a task comes for its agent, its time is up or it hangs up."""

    __slots__ = ("agent", "answer", "gone", "owner", "timer")

    def __init__(self, owner: Tasks, agent: str, gone: Hangup,
                 answer: Callable[[Task | None], None]) -> None:
        super().__init__()
        self.owner = owner
        self.agent = agent
        self.gone = gone
        self.answer = answer
        self.timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            owner.s.poll_timeout_s, self.end_empty)

    def deliver(self, task: Task | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None  # it refers back to us: no reference cycle for the GC to find
        if task is None:
            self.answer(None)
        else:
            self.owner._hand_over(task, self.gone, self.answer)

    def end_empty(self, *_: object) -> None:
        if self.settle(None):
            self.owner.dispatcher.unpark(self.agent, self)


class _Waiting:
    """A blocking submit waiting for its tasks' outcomes: results, or why none will come."""

    __slots__ = ("done", "left", "outcomes", "owner", "tasks", "timer")

    def __init__(self, owner: Tasks, tasks: list[Task],
                 done: Callable[[list[dict[str, Any] | None]], None]) -> None:
        self.owner = owner
        self.tasks = tasks
        self.done = done
        self.outcomes: dict[int, object] = {}
        self.left = len(tasks)
        self.timer: asyncio.TimerHandle | None = None
        for task in tasks:
            task.waiter = self

    def settle(self, task: Task, outcome: object) -> None:
        if task.id in self.outcomes:
            return
        self.outcomes[task.id] = outcome
        task.waiter = None
        self.left -= 1
        if self.left == 0:
            self._finish()

    def hung_up(self, _: object) -> None:
        self.settle_all(_GONE)

    def settle_all(self, outcome: object) -> None:
        for task in self.tasks:
            if task.id not in self.outcomes:
                self.settle(task, outcome)

    def _finish(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None  # it refers back to us: no reference cycle for the GC to find
        results: list[dict[str, Any] | None] = []
        for task in self.tasks:
            outcome = self.outcomes[task.id]
            if isinstance(outcome, dict):
                results.append(outcome)
                continue
            results.append(None)
            if task.state is TaskState.QUEUED:  # never delivered later: its submitter left
                why = "submitter disconnected" if outcome is _GONE else "submitter timed out"
                self.owner._close(task, TaskState.CANCELLED, {"error": True, "msg": why})
        self.done(results)


def _encodable(text: str) -> bool:
    """False for lone surrogates, which JSON allows but UTF-8 (and so SQLite) does not."""
    try:
        text.encode()
        return True
    except UnicodeEncodeError:
        return False


def iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


def task_view(task: Task) -> dict[str, Any]:
    return {"id": task.id, "target": task.agent, "type": task.type, "payload": task.payload,
            "state": task.state.value, "submitted_by": task.submitted_by,
            "created_at": iso(task.created_ms), "delivered_at": iso(task.delivered_ms),
            "finished_at": iso(task.finished_ms), "expires_at": iso(task.expires_ms),
            "result": task.result}


def row_view(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "target": row["agent"], "type": row["type"],
            "payload": json.loads(row["payload"]), "state": row["state"],
            "submitted_by": row["submitted_by"], "created_at": iso(row["created_ms"]),
            "delivered_at": iso(row["delivered_ms"]), "finished_at": iso(row["finished_ms"]),
            "expires_at": iso(row["expires_ms"]),
            "result": json.loads(row["result"]) if row["result"] else None}
