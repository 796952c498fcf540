"""Wake-ups between nodes on PostgreSQL (store/postgres_notify.py): a queued task is told to the
other nodes with the commit of its insert, carrying the task; its end with its outcome, in the
commit that records it and only if that commit's compare-and-set won, so that what a node is
told is what the database holds. Too long for a NOTIFY, a wake-up names the task only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from dutserver.core import codec
from dutserver.core.model import Outcome, Task, TaskRecord, TaskState
from dutserver.store.postgres import PostgresStore
from pg_support import pg_server, pg_url  # noqa: F401  (fixtures)


Heard = list[tuple[int, Outcome | None]]
Work = list[tuple[str, TaskRecord | None]]  # what b was told was queued, in order


class Nodes:
    def __init__(self, a: PostgresStore, b: PostgresStore) -> None:
        self.a, self.b = a, b
        self.heard: Heard = []
        self.work: Work = []


@pytest.fixture
async def two_nodes(pg_url: str) -> AsyncIterator[Nodes]:  # noqa: F811
    """Nodes a and b on one database; what b hears of the tasks that end elsewhere."""
    nodes = Nodes(PostgresStore(pg_url, "a"), PostgresStore(pg_url, "b"))
    await nodes.a.open()
    await nodes.b.open()
    nodes.b.notifier.subscribe(lambda agent, row: nodes.work.append((agent, row)),
                               lambda task_id, outcome: nodes.heard.append((task_id, outcome)),
                               lambda: None)
    yield nodes
    await nodes.a.close()
    await nodes.b.close()


async def heard_within(heard: Heard, task_id: int,
                       seconds: float = 5.0) -> Outcome | None:
    for _ in range(int(seconds / 0.01)):
        for tid, outcome in heard:
            if tid == task_id:
                return outcome
        await asyncio.sleep(0.01)
    raise AssertionError(f"no wake-up for task {task_id}: heard {heard}")


def _ended(task: Task, state: TaskState, result: dict[str, object]) -> Outcome:
    """Ends the task in memory; the outcome the other nodes should be told."""
    task.state, task.finished_ms, task.result = state, 2000, result
    return Outcome(state.value, 2000, codec.dumps(result))


async def test_an_outcome_that_won_is_told_with_it(two_nodes: Nodes) -> None:
    a, b, heard = two_nodes.a, two_nodes.b, two_nodes.heard
    task = Task(1, "pc1", "ping", {}, "admin", 1000, 10**13, payload_json="{}")
    await a.save_task(task)  # stored, queued
    outcome = _ended(task, TaskState.DONE, {"ok": 1})
    saved = a.save_task(task, "queued")
    a.notifier.task_finished(task.id)
    assert await saved is True
    assert await heard_within(heard, 1) == outcome
    assert (await b.task(1)).state == "done"  # type: ignore[union-attr]


async def test_an_outcome_that_lost_is_not_told(two_nodes: Nodes) -> None:
    a, b, heard = two_nodes.a, two_nodes.b, two_nodes.heard
    task = Task(2, "pc1", "ping", {}, "admin", 1000, 10**13, payload_json="{}")
    await a.save_task(task)
    # Another node ended it first (cancelled); this node's close, expecting "queued", loses.
    assert await b.finish_task(2, "queued", "cancelled", '{"error": true}', 1500)
    _ended(task, TaskState.DONE, {"ok": 1})
    saved = a.save_task(task, "queued")
    a.notifier.task_finished(task.id)
    assert await saved is False
    # A later wake-up in the same channel arrives; the lost one never did.
    later = Task(3, "pc1", "ping", {}, "admin", 1000, 10**13, payload_json="{}")
    await a.save_task(later)
    _ended(later, TaskState.DONE, {"ok": 1})
    saved = a.save_task(later, "queued")
    a.notifier.task_finished(later.id)
    assert await saved is True
    await heard_within(heard, 3)
    assert [tid for tid, _ in heard] == [3]
    assert (await b.task(2)).state == "cancelled"  # type: ignore[union-attr]


async def test_an_outcome_too_long_to_tell_is_read_back(two_nodes: Nodes) -> None:
    a, heard = two_nodes.a, two_nodes.heard
    task = Task(4, "pc1", "ping", {}, "admin", 1000, 10**13, payload_json="{}")
    await a.save_task(task)
    task.state, task.finished_ms, task.result = TaskState.DONE, 2000, {"output": "x" * 9000}
    saved = a.save_task(task, "queued")
    a.notifier.task_finished(task.id)
    assert await saved is True
    assert await heard_within(heard, 4) is None  # the id alone: the node reads it back


async def test_a_queued_task_is_told_with_it_unless_too_long(two_nodes: Nodes) -> None:
    a, work = two_nodes.a, two_nodes.work
    short = Task(5, "pc1", "exec", {"cmd": "ls"}, "admin", 1000, 10**13,
                 payload_json='{"cmd": "ls"}')
    long = Task(6, "pc2", "exec", {"cmd": "x" * 9000}, "admin", 1000, 10**13,
                payload_json='{"cmd": "' + "x" * 9000 + '"}')
    for task in (short, long):
        inserted = a.save_task(task)
        a.notifier.agent_has_work(task.agent, task.id)
        await inserted
    for _ in range(500):
        if len(work) == 2:
            break
        await asyncio.sleep(0.01)
    assert work == [("pc1", TaskRecord(5, "pc1", "exec", '{"cmd": "ls"}', "queued", "admin",
                                       1000, 10**13, None, None, None)), ("pc2", None)]


async def test_a_task_handed_over_in_its_insert_batch_is_not_told_as_queued(
        two_nodes: Nodes) -> None:
    """Submitted where its agent polls: the hand-off lands in the insert's batch, and the
    others are not told of a queued task that the database never holds as queued."""
    a, work = two_nodes.a, two_nodes.work
    task = Task(7, "pc3", "ping", {}, "admin", 1000, 10**13, payload_json="{}")
    inserted = a.save_task(task)
    a.notifier.agent_has_work(task.agent, task.id)
    task.state, task.delivered_ms, task.delivered_by = TaskState.DELIVERED, 1100, "a"
    handed = a.save_task(task, "queued")  # the same batch: it becomes the inserted row
    await inserted
    assert await handed is not False
    for _ in range(500):
        if work:
            break
        await asyncio.sleep(0.01)
    assert work == [("pc3", None)]  # the agent named, nothing to take as queued
    row = await two_nodes.b.task(7)
    assert row is not None and row.state == "delivered"
