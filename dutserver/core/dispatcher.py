"""Per-agent queues, parked polls and online status. Plain Python on the event loop's thread.

Knows nothing of HTTP or SQL: tasks.py decides what a hand-off means and records it; this module
only makes sure that a queued task meets a waiting poll without a database round trip between.
"""

from __future__ import annotations

from collections import deque

from dutserver.core.model import Task, TaskState
from dutserver.core.clock import Clock


class Poll:
    """A parked agent long-poll. `deliver` runs once: with a Task, or with None when the poll
    should end empty (timeout, hang-up, shutdown). A method, not a future: the hand-off happens
    in the same turn as the submit, with no task switch in between."""

    __slots__ = ("settled",)

    def __init__(self) -> None:
        self.settled = False

    def settle(self, task: Task | None) -> bool:
        """Ends the poll with task; False if it had ended already."""
        if self.settled:
            return False
        self.settled = True
        self.deliver(task)
        return True

    def deliver(self, task: Task | None) -> None:
        raise NotImplementedError


class AgentSlot:
    __slots__ = (
        "active_polls",
        "address",
        "last_poll_end",
        "last_seen_ms",
        "online_until_ms",
        "polls",
        "queue",
        "seen_dirty",
        "version",
    )

    def __init__(self) -> None:
        self.queue: deque[Task] = deque()
        self.polls: deque[Poll] = deque()
        self.active_polls = 0
        self.last_poll_end = float("-inf")
        self.last_seen_ms: int | None = None
        self.online_until_ms = 0  # what the other nodes are told (the store's agents rows)
        self.address: str | None = None
        self.version: str | None = None
        self.seen_dirty = False


class Dispatcher:
    def __init__(self, online_grace_s: float, clock: Clock) -> None:
        self.online_grace_s = online_grace_s
        self.clock = clock
        self.slots: dict[str, AgentSlot] = {}
        self.active: dict[int, Task] = {}  # queued or delivered tasks, by id
        self.closing = False

    def slot(self, agent: str) -> AgentSlot:
        slot = self.slots.get(agent)
        if slot is None:
            slot = self.slots[agent] = AgentSlot()
        return slot

    def queued(self, agent: str) -> int:
        slot = self.slots.get(agent)
        return len(slot.queue) if slot else 0

    def enqueue(self, task: Task) -> None:
        """Hands task to the oldest parked poll of its agent, or queues it."""
        self.active[task.id] = task
        slot = self.slot(task.agent)
        while slot.polls:
            if slot.polls.popleft().settle(task):
                return
        slot.queue.append(task)

    def requeue_front(self, task: Task) -> None:
        """A task taken by a poll whose connection died before it was sent goes back first."""
        slot = self.slot(task.agent)
        while slot.polls:
            if slot.polls.popleft().settle(task):
                return
        slot.queue.appendleft(task)

    def take(self, agent: str) -> Task | None:
        slot = self.slots.get(agent)
        if slot is None:
            return None
        while slot.queue:
            task = slot.queue.popleft()
            if task.state is TaskState.QUEUED:
                return task
        return None

    def withdraw(self, task: Task) -> None:
        """Removes a task that is still queued (cancelled or expired) from its queue."""
        slot = self.slots.get(task.agent)
        if slot is not None:
            try:
                slot.queue.remove(task)
            except ValueError:
                pass  # already taken by a poll that has not yet recorded the hand-off

    def forget(self, task: Task) -> None:
        self.active.pop(task.id, None)

    def has_poll(self, agent: str) -> bool:
        """Whether a poll of agent is parked here."""
        slot = self.slots.get(agent)
        return slot is not None and len(slot.polls) > 0

    def park(self, agent: str, poll: Poll) -> None:
        self.slot(agent).polls.append(poll)

    def unpark(self, agent: str, poll: Poll) -> None:
        slot = self.slots.get(agent)
        if slot is not None:
            try:
                slot.polls.remove(poll)
            except ValueError:
                pass

    def poll_started(self, agent: str, address: str | None, version: str | None,
                     online_for_ms: int) -> AgentSlot:
        """A poll began: online for as long as it may last (online_for_ms)."""
        slot = self.slot(agent)
        slot.active_polls += 1
        slot.online_until_ms = self.seen(slot, address, version) + online_for_ms
        return slot

    def poll_ended(self, slot: AgentSlot, dropped: bool) -> None:
        slot.active_polls -= 1
        if not dropped:  # a poll whose agent hung up does not keep it online
            slot.last_poll_end = self.clock.monotonic()
        if slot.active_polls == 0:
            slot.online_until_ms = self.clock.now_ms() + (
                0 if dropped else int(self.online_grace_s * 1000))
            slot.seen_dirty = True

    def seen(self, slot: AgentSlot, address: str | None, version: str | None) -> int:
        """The agent was seen now (returned, wall time in ms) at address, saying version."""
        now = self.clock.now_ms()
        slot.last_seen_ms = now
        slot.address = address
        if version is not None:
            slot.version = version
        slot.seen_dirty = True
        return now

    def is_online(self, agent: str) -> bool:
        slot = self.slots.get(agent)
        if slot is None:
            return False
        if slot.active_polls > 0:
            return True
        return self.clock.monotonic() - slot.last_poll_end < self.online_grace_s

    def parked_count(self) -> int:
        return sum(len(s.polls) for s in self.slots.values())

    def end_polls(self, agent: str) -> None:
        """The agent's parked polls end now, empty (its credential ended: the next is refused)."""
        slot = self.slots.get(agent)
        while slot is not None and slot.polls:
            slot.polls.popleft().settle(None)

    def close(self) -> None:
        """Shutdown: every parked poll ends now, empty; new polls end at once too."""
        self.closing = True
        for slot in self.slots.values():
            while slot.polls:
                slot.polls.popleft().settle(None)
