"""The store suite for schedules (store/schedule_sql.py, written once): the same tests on SQLite
and PostgreSQL, through the Store port, as the core uses it; two store instances race as two
nodes would."""

from __future__ import annotations

import asyncio
import json

from test_store import OpenStore, open_store  # noqa: F401, F811  (the parametrized fixture)
from pg_support import pg_server, pg_url  # noqa: F401  (fixtures)

JOB = json.dumps({"task": {"type": "ping"}, "selector": "room=204"})
WINDOWS = json.dumps({"tz": "Europe/Paris",
                      "windows": [{"days": ["fri"], "from": "18:00", "to": "23:00"}]})


async def _add(store: object, next_ms: int | None = 1000, enabled: bool = True,
               every_ms: int | None = 500, name: str = "nightly") -> int:
    return int(await store.add_schedule(  # type: ignore[attr-defined]
        name, "admin", 10, JOB, None, None, every_ms, "UTC", WINDOWS, next_ms, enabled))


async def test_a_due_slot_is_taken_by_one_node_only(open_store: OpenStore) -> None:  # noqa: F811
    one, two = await open_store("a"), await open_store("b")
    sid = await _add(one)
    (due,) = await two.due_schedules(1000)
    assert (due.id, due.next_ms, due.enabled) == (sid, 1000, True)
    # Ten claims of the slot at 1000, from two nodes at once: one wins.
    won = await asyncio.gather(*(s.claim_schedule_run(sid, 1000, 1500, 1200)
                                 for s in [one, two] * 5))
    assert won.count(True) == 1
    rec = await two.schedule(sid)
    assert rec is not None and (rec.next_ms, rec.last_run_ms) == (1500, 1200)
    assert await one.due_schedules(1499) == []
    # A once schedule: the winner leaves no next slot.
    assert await one.claim_schedule_run(sid, 1500, None, 1600)
    assert not await two.claim_schedule_run(sid, 1500, None, 1600)
    rec = await one.schedule(sid)
    assert rec is not None and rec.next_ms is None
    assert await one.due_schedules(10**13) == []


async def test_runs_and_skips_are_counted(open_store: OpenStore) -> None:  # noqa: F811
    store = await open_store()
    sid = await _add(store)
    await store.schedule_ran(sid, 42, 2000)
    await store.schedule_skipped(sid, "job 42 of the previous run is still running", 2500)
    rec = await store.schedule(sid)
    assert rec is not None
    assert (rec.runs, rec.last_job_id, rec.skipped, rec.last_skip_ms) == (1, 42, 1, 2500)
    assert rec.last_error == "job 42 of the previous run is still running"
    await store.schedule_ran(sid, 43, 3000)
    rec = await store.schedule(sid)
    assert rec is not None and (rec.runs, rec.last_job_id, rec.last_error) == (2, 43, None)
    assert json.loads(rec.windows or "")["tz"] == "Europe/Paris" and rec.tz == "UTC"


async def test_enable_disable_and_delete_are_compare_and_set(open_store: OpenStore) -> None:  # noqa: F811
    one, two = await open_store("a"), await open_store("b")
    sid = await _add(one)
    results = await asyncio.gather(one.set_schedule_enabled(sid, False, None, 5),
                                   two.set_schedule_enabled(sid, False, None, 5))
    assert sorted(results) == [False, True]
    rec = await one.schedule(sid)
    assert rec is not None and not rec.enabled and rec.next_ms is None
    assert await one.due_schedules(10**13) == []
    assert not await one.claim_schedule_run(sid, 1000, 1500, 1200)  # off: no slot is taken
    assert await two.set_schedule_enabled(sid, True, 7000, 6)
    assert [r.id for r in await one.due_schedules(7000)] == [sid]
    results = await asyncio.gather(one.delete_schedule(sid, 8), two.delete_schedule(sid, 8))
    assert sorted(results) == [False, True]
    assert await one.schedule(sid) is None
    assert await one.due_schedules(10**13) == []
    assert not await one.set_schedule_enabled(sid, False, None, 9)  # gone


async def test_listing_pages_newest_first_without_the_deleted(open_store: OpenStore) -> None:  # noqa: F811
    store = await open_store()
    ids = [await _add(store, name=f"s{n}") for n in range(5)]
    await store.delete_schedule(ids[2], 20)
    assert [r.id for r in await store.schedules(None, 10)] == [ids[4], ids[3], ids[1], ids[0]]
    assert [r.id for r in await store.schedules(ids[3], 2)] == [ids[1], ids[0]]


async def test_jobs_keep_their_windows_and_their_schedule(open_store: OpenStore) -> None:  # noqa: F811
    store = await open_store()
    sid = await _add(store)
    linked = await store.add_job("admin", 1, '{"type": "ping"}', None, "queue", 60, None, None,
                                 True, [["pc1"]], sid, WINDOWS)
    other = await store.add_job("admin", 2, '{"type": "ping"}', None, "queue", 60, None, None,
                                True, [["pc1"]], None)
    job = await store.job(linked)
    assert job is not None and job.windows == WINDOWS and job.schedule_id == sid
    plain = await store.job(other)
    assert plain is not None and plain.windows is None
    assert [j.id for j in await store.jobs(None, None, 10, sid)] == [linked]
    assert [j.id for j in await store.jobs(None, None, 10)] == [other, linked]
