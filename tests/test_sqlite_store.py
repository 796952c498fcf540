"""How the store writes a task through its life: inserted once, then updated in place; rows
that meet in one batch merge; an update whose insert never landed still records the task.
Read back with the store's own history query, as GET /api/v1/tasks does."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import pytest

from dutserver.core.model import Task, TaskFilter, TaskState
from dutserver.store import sqlite_schema
from dutserver.store import sqlite_sql as store
from dutserver.store.sqlite import SqliteStore as Store


@pytest.fixture
async def db(tmp_path: Path):  # type: ignore[no-untyped-def]
    db = Store(tmp_path / "dut.db", "NORMAL", 0.0)
    await db.open()
    yield db
    await db.close()


async def row(db: Store, task_id: int) -> dict[str, object] | None:
    await db.barrier()
    record = await db.read(store.task_get, task_id)
    return dataclasses.asdict(record) if record is not None else None


async def test_a_task_is_inserted_then_updated_to_each_state(db: Store) -> None:
    task = Task(7, "pc1", "exec", {"cmd": "ls"}, "admin", 1000, 9000, payload_json='{"cmd":"ls"}')
    await db.save_task(task)
    assert await row(db, 7) == {
        "id": 7, "agent": "pc1", "type": "exec", "payload": '{"cmd":"ls"}', "state": "queued",
        "submitted_by": "admin", "created_ms": 1000, "expires_ms": 9000, "delivered_ms": None,
        "finished_ms": None, "result": None, "delivered_by": None}
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


async def by(db: Store, target: str | None = None, submitted_by: str | None = None,
             state: str | None = None, before_id: int | None = None) -> list[int]:
    await db.index_tasks()
    rows = await db.read(store.task_rows, TaskFilter(target, state, submitted_by, before_id,
                                                     None, 50))
    return [r.id for r in rows]


def _tasks(first: int, count: int) -> list[Task]:
    return [Task(n, f"pc{n % 3}", "ping", {}, f"user{n % 2}", 1000, 9000, payload_json="{}")
            for n in range(first, first + count)]


async def test_history_by_agent_and_submitter_lists_what_was_just_submitted(db: Store) -> None:
    for task in _tasks(1, 12):
        db.save_task(task)  # not awaited: the history's own catch-up waits for them
    assert await by(db, target="pc1") == [10, 7, 4, 1]
    assert await by(db, submitted_by="user0") == [12, 10, 8, 6, 4, 2]
    assert await by(db, target="pc1", submitted_by="user0") == [10, 4]
    assert await by(db, target="pc1", before_id=7) == [4, 1]
    assert await by(db, submitted_by="user1", before_id=5) == [3, 1]
    assert await by(db, target="pc1", state="queued") == [10, 7, 4, 1]
    assert await by(db, target="pc1", state="done") == []
    assert await by(db, target="nobody") == []


async def test_a_task_whose_insert_never_landed_is_found_by_agent_too(db: Store) -> None:
    late = Task(3, "pc9", "ping", {}, "admin", 1000, 9000, payload_json="{}", stored=True)
    for task in _tasks(4, 3):
        await db.save_task(task)
    await db.index_tasks()  # the look-ups are done up to id 6, past the late one
    late.state, late.finished_ms, late.result = TaskState.FAILED, 3000, {"error": True}
    await db.save_task(late)
    assert await by(db, target="pc9") == [3]
    assert await by(db, submitted_by="admin") == [3]


async def test_what_a_crash_left_unindexed_is_indexed_at_start(tmp_path: Path) -> None:
    """The look-ups are written every 100 ms; a kill -9 in between loses them, not the tasks."""
    db = Store(tmp_path / "dut.db", "NORMAL", 0.0)
    await db.open()
    for task in _tasks(1, 5):
        await db.save_task(task)  # committed, never indexed
    await db.close()
    db = Store(tmp_path / "dut.db", "NORMAL", 0.0)
    await db.open()
    try:
        queued = await db.read(store.tasks_recover, "local", 5000)
        assert [t.id for t in queued] == [1, 2, 3, 4, 5]
        rows = await db.read(store.task_rows, TaskFilter(agent="pc2"))
        assert [r.id for r in rows] == [5, 2]
    finally:
        await db.close()


def test_an_old_database_gets_the_look_ups_of_its_tasks(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(sqlite_schema.MIGRATIONS[0])
    conn.execute("PRAGMA user_version = 1")
    for n in range(1, 7):
        conn.execute("INSERT INTO tasks (id, agent, type, payload, state, submitted_by, "
                     "created_ms, expires_ms) VALUES (?, ?, 'ping', '{}', 'done', ?, 1, 2)",
                     (n, f"pc{n % 2}", "admin" if n < 4 else "ops"))
    conn.close()
    conn = sqlite_schema.connect(path)
    try:
        assert [r.id for r in store.task_rows(conn, TaskFilter(agent="pc0"))] \
            == [6, 4, 2]
        assert [r.id for r in store.task_rows(conn, TaskFilter(submitted_by="ops"))] \
            == [6, 5, 4]
        store.tasks_index(conn)  # nothing new: nothing doubled
        assert len(store.task_rows(conn, TaskFilter(agent="pc1"))) == 3
    finally:
        conn.close()


async def test_history_still_answers_when_the_look_ups_cannot_be_written(
        db: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def disk_full(conn: sqlite3.Connection, restated: object = (), late: object = ()) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    for task in _tasks(1, 3):
        db.save_task(task)
    monkeypatch.setattr(db, "index_pass", disk_full)
    await db.index_tasks()  # no exception: the history answers from what is indexed
    assert "database or disk is full" in caplog.text
    assert await db.read(store.task_get, 3) is not None  # the tasks themselves are in
    monkeypatch.undo()
    assert await by(db, target="pc1") == [1]  # and the look-ups catch up once they can


async def test_history_by_state_follows_each_change_of_state(db: Store) -> None:
    tasks = _tasks(1, 6)
    for task in tasks:
        db.save_task(task)
    assert await by(db, state="queued") == [6, 5, 4, 3, 2, 1]  # indexed now, as queued
    tasks[1].state, tasks[1].delivered_ms = TaskState.DELIVERED, 2000
    tasks[2].state, tasks[2].finished_ms = TaskState.CANCELLED, 2000
    for task in tasks[1:3]:
        db.save_task(task)
    assert await by(db, state="queued") == [6, 5, 4, 1]
    assert await by(db, state="delivered") == [2]
    assert await by(db, state="cancelled") == [3]
    tasks[1].state, tasks[1].delivered_ms = TaskState.QUEUED, None  # handed back
    db.save_task(tasks[1])
    assert await by(db, state="delivered") == []
    assert await by(db, state="queued") == [6, 5, 4, 2, 1]
    assert await by(db, state="queued", before_id=4) == [2, 1]
    assert await by(db, target="pc1", state="queued") == [4, 1]


async def test_what_changed_state_after_the_last_index_is_right_after_a_crash(
        tmp_path: Path) -> None:
    """States written, their look-ups not (a kill -9 between two passes): the start-up finds
    the delivered task (fails it), the expired one and the queued ones by their real state."""
    db = Store(tmp_path / "dut.db", "NORMAL", 0.0)
    await db.open()
    tasks = _tasks(1, 5)
    tasks[4].expires_ms = 4000
    for task in tasks:
        db.save_task(task)
    await db.index_tasks()  # all five indexed as queued
    tasks[0].state, tasks[0].finished_ms, tasks[0].result = TaskState.DONE, 3000, {"error": False}
    tasks[1].state, tasks[1].delivered_ms = TaskState.DELIVERED, 3000
    for task in tasks[:2]:
        await db.save_task(task)
    db._restated.clear()  # as if the process died here, before the next pass
    await db.close()
    db = Store(tmp_path / "dut.db", "NORMAL", 0.0)
    await db.open()
    try:
        queued = await db.read(store.tasks_recover, "local", 5000)
        assert [t.id for t in queued] == [3, 4]
        assert await by(db, state="done") == [1]
        assert await by(db, state="failed") == [2]
        assert await by(db, state="expired") == [5]
        assert await by(db, state="queued") == [4, 3]
        assert await by(db, state="delivered") == []
    finally:
        await db.close()


def test_a_version_2_database_keeps_its_ids_and_gets_the_state_look_ups(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for migration in sqlite_schema.MIGRATIONS[:2]:
        conn.executescript(migration)
    conn.execute("PRAGMA user_version = 2")
    for n, state in ((1, "done"), (2, "queued"), (3, "failed")):
        conn.execute("INSERT INTO tasks (id, agent, type, payload, state, submitted_by, "
                     "created_ms, expires_ms) VALUES (?, 'pc1', 'ping', '{}', ?, 'admin', 1, "
                     "9999999999999)", (n, state))
    conn.execute("UPDATE sqlite_sequence SET seq = 40 WHERE name = 'tasks'")  # 4-40: given out
    conn.execute("INSERT INTO audit (at_ms, actor, action, detail) VALUES (1, 'a', 'login', '')")
    conn.execute("INSERT INTO audit (at_ms, actor, action, detail) VALUES (2, 'a', 'logout', '')")
    conn.close()
    conn = sqlite_schema.connect(path)
    try:
        queued = store.tasks_recover(conn, "local", 5000)
        assert [t.id for t in queued] == [2]
        assert store.reserve_task_ids(conn, 2) == range(41, 43)  # 4-40 were given out
        assert [r.id for r in store.task_rows(conn, TaskFilter(state="failed"))] == [3]
        assert [r.id for r in store.task_rows(conn, TaskFilter(agent="pc1"))] == [3, 2, 1]
        conn.execute(store.AUDIT_INSERT, (3, "a", "login", "", None))
        assert [r.id for r in store.audit_rows(conn, None, 50)] == [3, 2, 1]
        sql = " ".join(r[0] for r in conn.execute("SELECT sql FROM sqlite_schema "
                                                  "WHERE name IN ('tasks', 'audit')"))
        assert "AUTOINCREMENT" not in sql
    finally:
        conn.close()


async def test_a_change_whose_pass_failed_is_in_the_next_pass(
        db: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A periodic pass that fails must not take the changes it held with it: a history query
    whose own pass runs meanwhile still finds the task in its new state."""
    tasks = _tasks(1, 3)
    for task in tasks:
        db.save_task(task)
    await db.index_tasks()
    tasks[1].state, tasks[1].delivered_ms = TaskState.DELIVERED, 2000
    db.save_task(tasks[1])
    real, failures = store.tasks_index, []

    def fail_once(conn: sqlite3.Connection, restated: list[int], late: list[int]) -> None:
        if len(failures) < 2:  # the pass fails in its batch and again on its own
            failures.append(restated)
            raise sqlite3.OperationalError("disk I/O error")
        real(conn, restated, late)

    monkeypatch.setattr(db, "index_pass", fail_once)
    db.index_tasks_soon()  # the periodic pass, holding task 2's change
    assert await by(db, state="delivered") == [2]
    assert failures and all(2 in ids for ids in failures)


async def test_a_task_recorded_by_the_fallback_is_listed_once_under_its_state(db: Store) -> None:
    late = Task(1, "pc9", "ping", {}, "admin", 1000, 9000, payload_json="{}", stored=True)
    late.state, late.delivered_ms = TaskState.DELIVERED, 2000
    await db.save_task(late)  # its insert never landed: the fallback writes the row
    late.state, late.delivered_ms = TaskState.QUEUED, None  # handed back
    await db.save_task(late)
    assert await by(db, state="queued") == [1]
    assert await by(db, state="delivered") == []
    await db.barrier()
    assert await db.read(lambda conn: conn.execute(
        "SELECT state, id FROM tasks_by_state").fetchall()) == [("queued", 1)]


async def test_a_task_inserted_below_the_indexed_ones_is_found_by_the_history(db: Store) -> None:
    """A job's wave takes ids recorded before later tasks were inserted: a task with a lower
    id than those already indexed still gets its look-ups (found under every filter)."""
    for task in _tasks(5, 6):
        db.save_task(task)
    await db.index_tasks()
    late = _tasks(2, 1)[0]
    db.save_task(late)
    await db.index_tasks()
    assert 2 in await by(db, target=late.agent)
    assert 2 in await by(db, state="queued")
