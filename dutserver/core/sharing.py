"""What a node does so that several nodes share one set of queues (a fleet on PostgreSQL).

Only used when the Notifier says other processes listen (`fleet`); a lone process (SQLite) holds
every queued and running task in its memory and never needs any of this. In a fleet the store is
the truth and each node's memory a cache of it:

- a task is queued where it was submitted; if its agent's poll is not parked there, the other
  nodes are woken ("agent X has work") and the one where the agent polls fetches it;
- every change of a task's state is a compare-and-set on the stored state, so of two nodes
  handing over, expiring or ending one task, one wins; the loser takes over the stored outcome;
- a node that ends a task tells the others, so that a submitter waiting on another node is
  answered and stale copies are dropped;
- a heartbeat per node: the nodes whose heartbeat stopped are recovered by a survivor.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any

from dutserver.core import codec
from dutserver.core.errors import ApiError
from dutserver.core.model import FINAL_STATES, Outcome, Task, TaskFilter, TaskRecord, TaskState

if TYPE_CHECKING:
    from dutserver.core.tasks import Tasks

log = logging.getLogger("dutserver.tasks")
_FINAL = frozenset(s.value for s in FINAL_STATES)
_ENDED_KEPT = 10_000


class Sharing:
    def __init__(self, tasks: Tasks) -> None:
        self.tasks = tasks
        self._fetching: set[str] = set()  # agents whose queued tasks are being read
        self._again: set[str] = set()  # … and read once more after that, as asked meanwhile
        # Tasks this node saw end lately: a wake-up that announces one of them as queued came
        # late (its node sent it before this one fetched, delivered and ended it) and is dropped.
        self._ended: dict[int, None] = {}

    # --- queued work from other nodes ---------------------------------------------------------

    def on_agent_work(self, agent: str, row: TaskRecord | None = None) -> None:
        """Another node queued work for agent: if the agent polls here, the task as told, or
        the agent's queue as stored when the wake-up did not carry it."""
        dispatcher = self.tasks.dispatcher
        if not dispatcher.is_online(agent):
            return
        if row is None:
            self.fetch(agent)
        elif row.id not in dispatcher.active and row.id not in self._ended:
            dispatcher.enqueue(_queued(row))

    def fetch(self, agent: str) -> None:
        """Reads the agent's queued tasks from the store into this node's queue (those this
        node does not hold yet): they go to its parked poll, or to its next one."""
        if agent in self._fetching:
            self._again.add(agent)
            return
        self._fetching.add(agent)
        asyncio.ensure_future(self._fetch(agent))

    async def _fetch(self, agent: str) -> None:
        tasks = self.tasks
        try:
            while True:
                self._again.discard(agent)
                for row in await tasks.store.queued_tasks(agent):
                    if row.id not in tasks.dispatcher.active:
                        tasks.dispatcher.enqueue(_queued(row))
                if agent not in self._again:
                    return
        except Exception:  # the store is away: the next wake-up or poll fetches again
            log.exception("fetching the queued tasks of %s failed", agent)
        finally:
            self._fetching.discard(agent)

    # --- compare and set ---------------------------------------------------------------------

    def watch_close(self, task: Task, saved: asyncio.Future[Any]) -> None:
        """After a close: the other nodes are told (a submitter may wait there) in the same
        commit, with the outcome it writes if its compare-and-set wins: a commit and a read off
        every cross-node round trip. If it lost, the stored outcome is taken over here."""
        self.tasks.notifier.task_finished(task.id)
        self._remember_end(task.id)
        saved.add_done_callback(lambda fut: self._closed(task, fut))

    def _closed(self, task: Task, fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is None and fut.result() is False:
            self.lost(task)

    def lost(self, task: Task) -> None:
        """Another node changed the task first: what the store says replaces this copy."""
        asyncio.ensure_future(self.take_over(task))

    @staticmethod
    def must_win(saved: asyncio.Future[Any]) -> asyncio.Future[Any]:
        """saved, failing with 409 when the compare-and-set lost (a result came too late)."""
        checked: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def done(fut: asyncio.Future[Any]) -> None:
            if fut.cancelled():
                checked.cancel()
            elif fut.exception() is not None:
                checked.set_exception(fut.exception())  # type: ignore[arg-type]
            elif fut.result() is False:
                checked.set_exception(ApiError(409, "Result already recorded"))
            else:
                checked.set_result(None)
        saved.add_done_callback(done)
        return checked

    # --- what other nodes ended --------------------------------------------------------------

    def on_task_finished(self, task_id: int, outcome: Outcome | None = None) -> None:
        """Another node ended a task: if this one holds a copy (a submitter waits here, or
        it sits in a queue here), its outcome is taken over without writing it again: as told,
        or as stored when the wake-up did not carry it."""
        task = self.tasks.dispatcher.active.get(task_id)
        if task is None:
            return
        if outcome is not None and outcome.state in _FINAL:
            self._finish(task, outcome.state, outcome.finished_ms, outcome.result)
        else:
            asyncio.ensure_future(self.take_over(task))

    def on_gap(self) -> None:
        """Wake-ups may have been missed: the agents polling here fetch their queued tasks
        again, and the tasks held here are compared with the store."""
        dispatcher = self.tasks.dispatcher
        for agent in list(dispatcher.slots):
            if dispatcher.is_online(agent):
                self.fetch(agent)
        asyncio.ensure_future(self._recheck(list(dispatcher.active)))

    async def _recheck(self, ids: list[int]) -> None:
        for start in range(0, len(ids), 1000):
            chunk = tuple(ids[start:start + 1000])
            for row in await self.tasks.store.tasks(TaskFilter(ids=chunk, limit=len(chunk))):
                task = self.tasks.dispatcher.active.get(row.id)
                if task is not None and row.state != task.state.value:
                    self._apply(task, row)

    async def take_over(self, task: Task) -> None:
        row = await self.tasks.store.task(task.id)
        if row is not None:
            self._apply(task, row)

    def _apply(self, task: Task, row: TaskRecord) -> None:
        """What the store says of a task replaces this node's copy."""
        dispatcher = self.tasks.dispatcher
        if row.state not in _FINAL:  # delivered by another node: its end comes later
            if task.state is TaskState.QUEUED:
                dispatcher.withdraw(task)
            task.state = TaskState(row.state)
            task.delivered_ms, task.delivered_by = row.delivered_ms, row.delivered_by
            return
        self._finish(task, row.state, row.finished_ms, row.result)

    def _remember_end(self, task_id: int) -> None:
        self._ended[task_id] = None
        if len(self._ended) > _ENDED_KEPT:  # the oldest half goes: wake-ups are never that late
            for old in list(self._ended)[:_ENDED_KEPT // 2]:
                del self._ended[old]

    def _finish(self, task: Task, state: str, finished_ms: int | None,
                result: str | None) -> None:
        """The task ended elsewhere so: out of this node's queue and memory, its waiter told."""
        self._remember_end(task.id)
        dispatcher = self.tasks.dispatcher
        if task.state is TaskState.QUEUED:
            dispatcher.withdraw(task)
        task.state = TaskState(state)
        task.finished_ms = finished_ms
        task.result = json.loads(result) if result else None
        dispatcher.forget(task)
        if task.waiter is not None:
            task.waiter.settle(task, task.result if task.result is not None else {
                "error": True, "msg": task.state.value})

    async def record_elsewhere(self, agent: str, task_id: int, result: dict[str, Any]) -> None:
        """A result for a task this node does not hold: recorded if the store says it is
        delivered to this agent (compare and set), and the other nodes are told."""
        tasks = self.tasks
        row = await tasks.store.task(task_id)
        if row is None:
            raise ApiError(404, f"Unknown task: {task_id}")
        if row.agent != agent:
            raise ApiError(403, "This task was not sent to you")
        if row.state == TaskState.QUEUED.value:
            raise ApiError(409, "Task was not delivered")
        if row.state != TaskState.DELIVERED.value:
            raise ApiError(409, "Result already recorded")
        state = TaskState.FAILED if result.get("error") is True else TaskState.DONE
        if not await tasks.store.finish_task(task_id, TaskState.DELIVERED.value, state.value,
                                             codec.dumps(result), tasks.clock.now_ms()):
            raise ApiError(409, "Result already recorded")
        if state is TaskState.DONE and row.type == "inventory":
            tasks.store.agent_inventory(agent, codec.dumps(
                {k: v for k, v in result.items() if k != "error"}))
        if tasks.notifier.fleet:
            tasks.notifier.task_finished(task_id)

    async def record_for_copy(self, task: Task, result: dict[str, Any]) -> None:
        """A result for a task this node holds as queued, which another node delivered: the
        store records it, and this node's copy takes the outcome over (a node never hears its
        own wake-ups)."""
        try:
            await self.record_elsewhere(task.agent, task.id, result)
        finally:
            await self.take_over(task)

    # --- the heartbeat -----------------------------------------------------------------------

    async def heartbeat(self) -> None:
        """Every node_heartbeat_s: this node is alive; nodes that are not are recovered (their
        queued tasks woken up where their agents poll now); queued tasks past their deadline
        that no node holds expire."""
        tasks = self.tasks
        agents, ended = await tasks.store.node_alive()
        ended += await tasks.store.expire_queued(tasks.clock.now_ms())
        for agent in agents:
            self.on_agent_work(agent)
            tasks.notifier.agent_has_work(agent)
        for task_id in ended:
            self.on_task_finished(task_id)
            tasks.notifier.task_finished(task_id)


def _queued(row: TaskRecord) -> Task:
    """A task queued by another node, as this node holds it (stored: it updates, never inserts)."""
    return Task(id=row.id, agent=row.agent, type=row.type, payload=json.loads(row.payload),
                submitted_by=row.submitted_by, created_ms=row.created_ms,
                expires_ms=row.expires_ms, payload_json=row.payload, stored=True)
