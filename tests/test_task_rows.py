"""How the store writes a task through its life: inserted once, then updated in place; rows
that meet in one batch merge; an update whose insert never landed still records the task.
Read back with the store's own history query, as GET /api/v1/tasks does."""

from __future__ import annotations

from pathlib import Path

import pytest

from dutserver import store
from dutserver.model import Task, TaskState
from dutserver.store import Store


@pytest.fixture
async def db(tmp_path: Path):  # type: ignore[no-untyped-def]
    db = Store(tmp_path / "dut.db", "NORMAL", 0.0)
    await db.open()
    yield db
    await db.close()


async def row(db: Store, task_id: int) -> dict[str, object] | None:
    await db.barrier()
    return await db.read(store.task_row, task_id)


async def test_a_task_is_inserted_then_updated_to_each_state(db: Store) -> None:
    task = Task(7, "pc1", "exec", {"cmd": "ls"}, "admin", 1000, 9000, payload_json='{"cmd":"ls"}')
    await db.save_task(task)
    assert await row(db, 7) == {
        "id": 7, "agent": "pc1", "type": "exec", "payload": '{"cmd":"ls"}', "state": "queued",
        "submitted_by": "admin", "created_ms": 1000, "expires_ms": 9000, "delivered_ms": None,
        "finished_ms": None, "result": None}
    task.state, task.delivered_ms = TaskState.DELIVERED, 2000
    await db.save_task(task)
    task.state, task.finished_ms, task.result = TaskState.DONE, 3000, {"out": "x", "error": False}
    await db.save_task(task)
    got = await row(db, 7)
    assert got is not None
    assert (got["state"], got["delivered_ms"], got["finished_ms"], got["result"]) == (
        "done", 2000, 3000, '{"out": "x", "error": false}')
    assert got["payload"] == '{"cmd":"ls"}' and got["agent"] == "pc1"


async def test_saves_in_one_batch_write_the_last_state(db: Store) -> None:
    task = Task(8, "pc1", "ping", {}, "admin", 1000, 9000, payload_json="{}")
    first = db.save_task(task)
    task.state, task.delivered_ms = TaskState.DELIVERED, 2000
    second = db.save_task(task)  # its insert is still pending: it becomes that insert
    assert first is second
    await second
    got = await row(db, 8)
    assert got is not None and (got["state"], got["delivered_ms"]) == ("delivered", 2000)


async def test_a_task_whose_insert_never_landed_is_recorded_by_its_next_save(db: Store) -> None:
    """A batch that fails rolls back; the tasks in it were marked stored, so their next save is
    an update, which finds no row: the store writes the whole row instead of nothing."""
    task = Task(9, "pc1", "ping", {}, "admin", 1000, 9000, payload_json="{}", stored=True)
    task.state, task.finished_ms, task.result = TaskState.FAILED, 3000, {"error": True, "msg": "x"}
    other = Task(10, "pc2", "ping", {}, "admin", 1000, 9000, payload_json="{}")
    await db.save_task(other)
    other.state, other.finished_ms, other.result = TaskState.DONE, 3000, {"error": False}
    db.save_task(other)
    await db.save_task(task)  # the same batch: one update that lands, one that does not
    got = await row(db, 9)
    assert got is not None
    assert (got["state"], got["agent"], got["result"]) == (
        "failed", "pc1", '{"error": true, "msg": "x"}')
    got = await row(db, 10)
    assert got is not None and got["state"] == "done"
