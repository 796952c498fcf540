"""The store suite: what the core relies on from core.ports.Store, run against every store.

Each test takes `open_store`, which opens a store of the kind under test on one database (a
second call opens a second process's view of the same database, as a second node would). SQLite
and PostgreSQL (a throw-away database per test: tests/pg_support.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from dutserver.core.model import Task, TaskFilter, TaskState
from dutserver.core.ports import AccountExists, Store
from dutserver.store.postgres import PostgresStore
from dutserver.store.sqlite import SqliteStore
from pg_support import pg_server, pg_url  # noqa: F401  (fixtures)

OpenStore = Callable[..., Awaitable[Store]]


@pytest.fixture(params=["sqlite", "postgres"])
async def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OpenStore]:
    opened: list[Store] = []
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else ""

    async def open_one(node: str = "local") -> Store:
        store: Store = (PostgresStore(url, node) if url
                        else SqliteStore(tmp_path / "dut.db", node=node))
        await store.open()
        opened.append(store)
        return store

    yield open_one
    for store in reversed(opened):
        await store.close()


def _task(task_id: int, agent: str = "pc1", submitted_by: str = "admin") -> Task:
    return Task(task_id, agent, "exec", {"cmd": "ls"}, submitted_by, 1000, 10**13,
                payload_json='{"cmd":"ls"}')


async def test_task_ids_are_never_given_out_twice(open_store: OpenStore) -> None:
    one, two = await open_store("a"), await open_store("b")
    blocks = await asyncio.gather(*(s.reserve_task_ids(100) for s in (one, two, one, two)))
    ids = [i for block in blocks for i in block]
    assert len(ids) == 400 and len(set(ids)) == 400 and min(ids) >= 1


async def test_a_task_is_found_as_saved_in_each_state(open_store: OpenStore) -> None:
    store = await open_store()
    task = _task(1)
    await store.save_task(task)
    record = await store.task(1)
    assert record is not None
    assert (record.agent, record.type, record.payload, record.state) == (
        "pc1", "exec", '{"cmd":"ls"}', "queued")
    task.state, task.delivered_ms, task.delivered_by = TaskState.DELIVERED, 2000, store.node
    await store.save_task(task)
    task.state, task.finished_ms, task.result = TaskState.DONE, 3000, {"out": "x", "error": False}
    await store.save_task(task)
    record = await store.task(1)
    assert record is not None
    assert (record.state, record.delivered_ms, record.finished_ms, record.delivered_by) == (
        "done", 2000, 3000, "local")
    assert record.result is not None and '"out": "x"' in record.result
    assert await store.task(2) is None


async def test_history_filters_and_pages_newest_first(open_store: OpenStore) -> None:
    store = await open_store()
    for n in range(1, 11):
        store.save_task(_task(n, agent=f"pc{n % 2}", submitted_by=f"u{n % 3}"))  # not awaited
    ids = [r.id for r in await store.tasks(TaskFilter())]
    assert ids == list(range(10, 0, -1))  # what was saved before the call is found
    assert [r.id for r in await store.tasks(TaskFilter(agent="pc1"))] == [9, 7, 5, 3, 1]
    assert [r.id for r in await store.tasks(TaskFilter(submitted_by="u0"))] == [9, 6, 3]
    assert [r.id for r in await store.tasks(TaskFilter(agent="pc1", before_id=5))] == [3, 1]
    assert [r.id for r in await store.tasks(TaskFilter(ids=(2, 3, 99)))] == [3, 2]
    assert [r.id for r in await store.tasks(TaskFilter(limit=2))] == [10, 9]
    assert [r.id for r in await store.tasks(TaskFilter(state="done"))] == []


async def test_of_two_processes_finishing_one_task_one_wins(open_store: OpenStore) -> None:
    one, two = await open_store("a"), await open_store("b")
    task = _task(5)
    task.state, task.delivered_ms, task.delivered_by = TaskState.DELIVERED, 2000, "a"
    await one.save_task(task)
    won = await asyncio.gather(
        one.finish_task(5, "delivered", "done", '{"error": false}', 3000),
        two.finish_task(5, "delivered", "failed", '{"error": true}', 3001))
    assert sorted(won) == [False, True]
    record = await two.task(5)
    assert record is not None and record.state in ("done", "failed")
    assert [r.id for r in await one.tasks(TaskFilter(state=record.state))] == [5]
    assert not await one.finish_task(6, "queued", "cancelled", "{}", 1)  # no such task


async def test_recovery_ends_only_this_nodes_deliveries(open_store: OpenStore) -> None:
    store = await open_store("a")
    tasks = [_task(n) for n in range(1, 6)]
    for task, node in zip(tasks[:2], ("a", "b")):
        task.state, task.delivered_ms, task.delivered_by = TaskState.DELIVERED, 2000, node
    tasks[4].expires_ms = 4000
    for task in tasks:
        await store.save_task(task)
    await store.close()
    again = await open_store("a")  # node a restarts; node b still runs
    queued = await again.recover(5000)
    # One process holds its queues (SQLite); a fleet's are the store's, fetched per agent.
    assert [r.id for r in queued] == ([3, 4] if isinstance(again, SqliteStore) else [])
    assert [r.id for r in await again.queued_tasks("pc1")] == [3, 4]
    assert await again.queued_tasks("pc2") == []
    states = {n: (await again.task(n)).state for n in range(1, 6)}  # type: ignore[union-attr]
    assert states == {1: "failed", 2: "delivered", 3: "queued", 4: "queued", 5: "expired"}


async def test_accounts_and_their_revision(open_store: OpenStore) -> None:
    store, other = await open_store(), await open_store()
    rev = await store.accounts_rev()
    await store.add_account("pc1", "agent", "h1", 1000)
    with pytest.raises(AccountExists):
        await other.add_account("pc1", "agent", "h2", 1001)
    assert await other.accounts_rev() != rev
    found = await other.account("pc1")
    assert found is not None and (found.kind, found.secret_hash) == ("agent", "h1")
    await store.add_session("d1", "pc1", 1000)
    assert await store.set_secret("pc1", "h3", 2000)
    assert await other.session("d1") is None  # a new secret ends the sessions
    assert [(a.name, a.secret_hash, a.updated_ms) for a in await other.accounts()] == [
        ("pc1", "h3", 2000)]
    assert not await store.set_secret("nobody", "h", 1)
    assert await store.remove_account("pc1") and not await store.remove_account("pc1")
    assert await other.accounts() == []


async def test_sessions_are_shared_and_end(open_store: OpenStore) -> None:
    store, other = await open_store("a"), await open_store("b")
    await store.add_account("admin", "admin", "h", 1)
    await store.add_session("d1", "admin", 1000)
    store.touch_sessions([(5000, "d1")])
    await store.barrier()
    record = await other.session("d1")
    assert record is not None and (record.account, record.created_ms, record.last_used_ms) == (
        "admin", 1000, 5000)
    other.touch_sessions([(4000, "d1")])  # an older use reported late never goes back
    other.delete_session("d2")  # unknown: nothing happens
    await other.barrier()
    assert (await store.session("d1")).last_used_ms == 5000  # type: ignore[union-attr]
    store.delete_session("d1")
    await store.barrier()
    assert await other.session("d1") is None


async def test_ended_sessions_are_pruned(open_store: OpenStore) -> None:
    store = await open_store()
    await store.add_account("admin", "admin", "h", 1)
    for digest, created, used in (("idle", 1000, 2000), ("old", 500, 9000), ("live", 3000, 9000)):
        await store.add_session(digest, "admin", created)
        store.touch_sessions([(used, digest)])
    store.prune_sessions(5000, 1000)  # idle since before 5000, or opened before 1000
    await store.barrier()
    assert [d for d in ("idle", "old", "live") if await store.session(d)] == ["live"]


async def test_bans_are_shared_until_they_end(open_store: OpenStore) -> None:
    store, other = await open_store("a"), await open_store("b")
    store.add_ban("pc1\x1f127.0.0.9", 9000)
    store.add_ban("127.0.0.8", 6000)
    store.add_ban("127.0.0.8", 5000)  # a shorter one does not shorten it
    await store.barrier()
    assert await other.bans(5500) == {"pc1\x1f127.0.0.9": 9000, "127.0.0.8": 6000}
    assert await other.bans(7000) == {"pc1\x1f127.0.0.9": 9000}


async def test_settings(open_store: OpenStore) -> None:
    store, other = await open_store(), await open_store()
    assert await store.setting("selfreg") == "0"
    assert await store.setting("no-such") is None
    await store.set_setting("selfreg", "1")
    assert await other.setting("selfreg") == "1"


async def test_agents_status_and_inventory(open_store: OpenStore) -> None:
    store = await open_store()
    await store.add_account("pc1", "agent", "h", 1)
    await store.add_account("pc2", "agent", "h", 1)
    await store.add_account("admin", "admin", "h", 1)
    store.agents_seen([("pc1", 5000, "10.0.0.1", "1.2", 9000)])
    store.agent_inventory("pc1", '{"os": "Linux"}')
    store.agents_seen([("pc1", 6000, "10.0.0.2", None, 7000)])  # no version said: it stays
    await store.barrier()
    rows = await store.agents(True)
    assert [(r.name, r.last_seen_ms, r.address, r.version, r.inventory, r.online_until_ms)
            for r in rows] == [("pc1", 6000, "10.0.0.2", "1.2", '{"os": "Linux"}', 7000),
                               ("pc2", None, None, None, None, None)]
    assert (await store.agents(False, "pc1"))[0].inventory is None
    assert await store.agents(True, "admin") == []


async def test_audit_events_newest_first_and_paged(open_store: OpenStore) -> None:
    store = await open_store()
    for n in range(5):
        store.audit("admin", "login", f"n{n}", "127.0.0.1")
    store.audit(None, "ban", "bad \udc80 name", None)  # a lone surrogate from a hostile name
    events = await store.audit_events(None, 3)
    assert events[0].detail is not None and events[0].detail.startswith("bad \ufffd")
    assert [e.detail for e in events][1:] == ["n4", "n3"]
    older = await store.audit_events(events[-1].id, 10)
    assert [e.detail for e in older] == ["n2", "n1", "n0"]
    assert older[0].actor == "admin" and older[0].address == "127.0.0.1"
