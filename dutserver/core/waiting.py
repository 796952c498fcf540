"""The two ways a request waits on the task lifecycle (core/tasks.py): an agent's parked
long-poll, and a blocking submit waiting for its tasks' outcomes.

Both hold a timer from the Clock and drop it when they end (it refers back to them: no
reference cycle left for the garbage collector, whose full passes stall the loop).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from dutserver.core.dispatcher import Poll
from dutserver.core.model import Task, TaskState
from dutserver.core.ports import Timer

if TYPE_CHECKING:
    from dutserver.core.tasks import Tasks

TIMED_OUT = object()  # a waiter's outcome: the submitter's time ran out, or it hung up
GONE = object()


class Hangup(Protocol):
    """What tells a long request that its client went away: an asyncio Future (the ASGI path)
    or the direct path's request itself. done() is true once it happened; callbacks added
    before run soon after it, with one argument."""

    def done(self) -> bool: ...

    def add_done_callback(self, fn: Callable[[Any], object], /) -> None: ...


class ParkedPoll(Poll):
    """A long-poll parked until a task comes for its agent, its time is up or it hangs up."""

    __slots__ = ("agent", "answer", "gone", "owner", "timer")

    def __init__(self, owner: Tasks, agent: str, gone: Hangup,
                 answer: Callable[[Task | None], None]) -> None:
        super().__init__()
        self.owner = owner
        self.agent = agent
        self.gone = gone
        self.answer = answer
        self.timer: Timer | None = owner.clock.call_later(owner.s.poll_timeout_s, self.end_empty)

    def deliver(self, task: Task | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if task is None:
            self.answer(None)
        else:
            self.owner.hand_over(task, self.gone, self.answer)

    def end_empty(self, *_: object) -> None:
        if self.settle(None):
            self.owner.dispatcher.unpark(self.agent, self)


class Waiting:
    """A blocking submit waiting for its tasks' outcomes: results, or why none will come."""

    __slots__ = ("done", "left", "outcomes", "owner", "tasks", "timer")

    def __init__(self, owner: Tasks, tasks: list[Task],
                 done: Callable[[list[dict[str, Any] | None]], None]) -> None:
        self.owner = owner
        self.tasks = tasks
        self.done = done
        self.outcomes: dict[int, object] = {}
        self.left = len(tasks)
        self.timer: Timer | None = None
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
        self.settle_all(GONE)

    def settle_all(self, outcome: object) -> None:
        for task in self.tasks:
            if task.id not in self.outcomes:
                self.settle(task, outcome)

    def _finish(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        results: list[dict[str, Any] | None] = []
        for task in self.tasks:
            outcome = self.outcomes[task.id]
            if isinstance(outcome, dict):
                results.append(outcome)
                continue
            results.append(None)
            if task.state is TaskState.QUEUED:  # never delivered later: its submitter left
                why = "submitter disconnected" if outcome is GONE else "submitter timed out"
                self.owner.close(task, TaskState.CANCELLED, {"error": True, "msg": why})
        self.done(results)
