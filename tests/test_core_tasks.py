"""The task lifecycle of the core (dutserver/core/tasks.py), in-process on fakes: no sockets,
no SQLite, no real sleeping (the FakeClock's time moves only when a test advances it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core_support import (ADDRESS, Node, poll, spin, start_node, submit, submit_and_wait)
from dutserver.core.errors import ApiError
from dutserver.core.model import TaskState
from dutserver.core.notify import LocalNotifier
from fakes import CommitFailed, FakeClock, FakeHangup, FakeStore


def stored(node: Node, task_id: int) -> dict[str, object]:
    """The committed row of a task, its result decoded."""
    row = node.store.db.tasks[task_id]
    return {"state": row.state, "result": json.loads(row.result) if row.result else None,
            "delivered_by": row.delivered_by}


# --- hand-off -----------------------------------------------------------------------------------

async def test_queued_task_goes_to_a_later_poll_once_its_hand_off_is_recorded(
        tmp_path: Path) -> None:
    node = await start_node(tmp_path)
    task = await submit(node, {"type": "echo", "text": "hi"})
    assert stored(node, task.id)["state"] == "queued"

    answers, _ = poll(node)
    assert answers.got == []  # not before the hand-off is committed
    await spin()
    assert answers.got == [task]
    assert answers.stored_state == ["delivered"]  # recorded before the agent got it
    assert task.payload == {"text": "hi"} and task.type == "echo"
    assert stored(node, task.id)["delivered_by"] == node.store.node

    again, _ = poll(node)  # at most once: a later poll does not get it again
    await spin()
    node.clock.advance(node.settings.poll_timeout_s)
    assert again.got == [None]


async def test_parked_poll_gets_a_task_submitted_later(tmp_path: Path) -> None:
    node = await start_node(tmp_path)
    answers, _ = poll(node)
    await spin()
    assert answers.got == [] and node.dispatcher.parked_count() == 1
    task = await submit(node)
    await spin()
    assert answers.got == [task]
    assert answers.stored_state == ["delivered"]
    assert node.dispatcher.parked_count() == 0


async def test_a_task_goes_to_the_oldest_of_two_parked_polls_and_only_to_it(
        tmp_path: Path) -> None:
    node = await start_node(tmp_path)
    first, _ = poll(node)
    second, _ = poll(node)
    task = await submit(node)
    await spin()
    assert first.got == [task]
    assert second.got == []
    node.clock.advance(node.settings.poll_timeout_s)
    assert second.got == [None]


async def test_polls_of_one_agent_do_not_get_another_agents_tasks(tmp_path: Path) -> None:
    node = await start_node(tmp_path, agents=("agent1", "agent2"))
    other, _ = poll(node, "agent2")
    task = await submit(node, agent="agent1")
    await spin()
    assert other.got == []
    mine, _ = poll(node, "agent1")
    await spin()
    assert mine.got == [task]


async def test_poll_answers_none_after_the_poll_timeout(tmp_path: Path) -> None:
    node = await start_node(tmp_path, poll_timeout_s=20.0)
    answers, _ = poll(node)
    node.clock.advance(19.99)
    await spin()
    assert answers.got == []
    assert node.tasks.dispatcher.is_online("agent1")
    node.clock.advance(0.02)
    assert answers.got == [None]
    assert node.dispatcher.parked_count() == 0
    assert node.clock.pending() == 0  # nothing left behind to fire later

    task = await submit(node)  # not handed to the poll that ended: queued for the next one
    await spin()
    assert answers.got == [None]
    assert node.dispatcher.queued("agent1") == 1
    assert stored(node, task.id)["state"] == "queued"


async def test_agent_is_online_during_a_poll_and_for_the_grace_after_it(tmp_path: Path) -> None:
    node = await start_node(tmp_path, online_grace_s=5.0)
    assert not node.dispatcher.is_online("agent1")
    poll(node)
    node.clock.advance(node.settings.poll_timeout_s)
    assert node.dispatcher.is_online("agent1")
    node.clock.advance(5.1)
    assert not node.dispatcher.is_online("agent1")


async def test_an_agent_that_hung_up_while_parked_keeps_its_task_for_the_next_poll(
        tmp_path: Path) -> None:
    node = await start_node(tmp_path)
    answers, gone = poll(node)
    gone.hang_up()
    await spin()
    assert answers.got == [None]
    assert node.dispatcher.parked_count() == 0

    task = await submit(node)
    await spin()
    assert stored(node, task.id)["state"] == "queued"
    nxt, _ = poll(node)
    await spin()
    assert nxt.got == [task]


async def test_an_agent_that_hung_up_before_its_hand_off_was_committed_keeps_its_task(
        tmp_path: Path) -> None:
    node = await start_node(tmp_path)
    task = await submit(node)
    answers, gone = poll(node)
    gone.hang_up()  # the task was taken, its hand-off not yet committed
    await spin()
    assert answers.got == [None]
    assert task.state is TaskState.QUEUED
    assert stored(node, task.id)["state"] == "queued"  # the hand-off was undone
    nxt, _ = poll(node)
    await spin()
    assert nxt.got == [task]
    assert nxt.stored_state == ["delivered"]


async def test_a_poll_whose_agent_is_gone_already_takes_nothing(tmp_path: Path) -> None:
    node = await start_node(tmp_path)
    task = await submit(node)
    gone = FakeHangup()
    gone.hang_up()
    answers, _ = poll(node, gone=gone)
    await spin()
    assert answers.got == [None]
    assert stored(node, task.id)["state"] == "queued"
    nxt, _ = poll(node)
    await spin()
    assert nxt.got == [task]


async def test_a_failed_hand_off_commit_puts_the_task_back_first_in_its_queue(
        tmp_path: Path) -> None:
    node = await start_node(tmp_path)
    first = await submit(node, {"type": "first"})
    second = await submit(node, {"type": "second"})
    node.store.fail_next_commit = True
    answers, _ = poll(node)
    await spin()
    assert answers.got == [None]  # the agent gets nothing it could run twice
    assert first.state is TaskState.QUEUED and first.delivered_ms is None
    assert stored(node, first.id)["state"] == "queued"

    nxt, _ = poll(node)
    await spin()
    assert nxt.got == [first]  # still first in line, ahead of `second`
    assert nxt.stored_state == ["delivered"]
    last, _ = poll(node)
    await spin()
    assert last.got == [second]


async def test_shutdown_answers_parked_polls_at_once_and_new_ones_empty(tmp_path: Path) -> None:
    node = await start_node(tmp_path)
    parked, _ = poll(node)
    await submit(node, agent="agent1")  # taken by the parked poll
    await spin()
    waiting, _ = poll(node)
    node.services.close()
    assert waiting.got == [None]
    late, _ = poll(node)
    assert late.got == [None]
    assert node.services.closing


# --- submitting ---------------------------------------------------------------------------------

async def test_submit_refuses_what_it_cannot_queue(tmp_path: Path) -> None:
    node = await start_node(tmp_path, queue_max=2)
    with pytest.raises(ApiError) as e:
        await node.tasks.submit(["nobody"], {"type": "echo"}, "admin", None, ADDRESS)
    assert e.value.status == 404
    with pytest.raises(ApiError) as e:
        await node.tasks.submit(["admin"], {"type": "echo"}, "admin", None, ADDRESS)
    assert e.value.status == 404  # an admin account is no agent
    for body in ([1], {"text": "no type"}, {"type": ""}, {"type": "x" * 65}):
        with pytest.raises(ApiError) as e:
            await node.tasks.submit(["agent1"], body, "admin", None, ADDRESS)
        assert e.value.status == 400, body
    with pytest.raises(ApiError) as e:
        await node.tasks.submit(["agent1"] * 3, {"type": "echo"}, "admin", None, ADDRESS)
    assert e.value.status == 503  # more than queue_max
    assert node.dispatcher.queued("agent1") == 0  # nothing of a refused submit was queued
    await node.tasks.submit(["agent1"] * 2, {"type": "echo"}, "admin", None, ADDRESS)
    with pytest.raises(ApiError) as e:
        await node.tasks.submit(["agent1"], {"type": "echo"}, "admin", None, ADDRESS)
    assert e.value.status == 503


async def test_a_task_for_an_agent_added_by_another_process_is_accepted(tmp_path: Path) -> None:
    node = await start_node(tmp_path)
    other = await start_node(tmp_path, store=node.store.sibling("b"), clock=node.clock,
                             agents=("newcomer",))
    assert "newcomer" not in node.auth.accounts
    task = await submit(node, agent="newcomer")
    assert task.agent == "newcomer"
    assert other.tasks.dispatcher.queued("newcomer") == 0


# --- blocking submit ----------------------------------------------------------------------------

async def test_blocking_submit_gets_the_agents_result(tmp_path: Path) -> None:
    node = await start_node(tmp_path)
    results = await submit_and_wait(node, timeout_s=5.0)
    answers, _ = poll(node)
    await spin()
    [task] = answers.got
    assert task is not None and results.calls == []
    committed = node.tasks.result("agent1", ADDRESS, "1.0", task.id, {"out": "hi"})
    assert results.calls == [[{"out": "hi", "error": False}]]
    await committed
    assert stored(node, task.id) == {"state": "done", "result": {"out": "hi", "error": False},
                                     "delivered_by": node.store.node}
    assert node.clock.pending() == 0  # its timer is gone
    node.clock.advance(10)
    assert len(results.calls) == 1


async def test_blocking_submit_times_out_and_its_undelivered_task_is_cancelled(
        tmp_path: Path) -> None:
    node = await start_node(tmp_path)
    results = await submit_and_wait(node, timeout_s=5.0)
    [task_id] = list(node.dispatcher.active)
    node.clock.advance(4.9)
    assert results.calls == []
    node.clock.advance(0.2)
    assert results.calls == [[None]]  # the route answers 504
    await spin()
    view = await node.tasks.view(task_id)
    assert view["state"] == "cancelled"
    assert view["result"] == {"error": True, "msg": "submitter timed out"}

    answers, _ = poll(node)  # the agent never gets it
    await spin()
    node.clock.advance(node.settings.poll_timeout_s)
    assert answers.got == [None]


async def test_blocking_submit_that_times_out_leaves_a_delivered_task_to_its_agent(
        tmp_path: Path) -> None:
    node = await start_node(tmp_path)
    results = await submit_and_wait(node, timeout_s=5.0)
    answers, _ = poll(node)
    await spin()
    [task] = answers.got
    assert task is not None
    node.clock.advance(5.0)
    assert results.calls == [[None]]
    assert task.state is TaskState.DELIVERED  # running on the agent: not cancelled
    await node.tasks.result("agent1", ADDRESS, None, task.id, {"out": "late"})
    assert (await node.tasks.view(task.id))["state"] == "done"


async def test_a_submitter_that_hangs_up_cancels_its_undelivered_task(tmp_path: Path) -> None:
    node = await start_node(tmp_path)
    gone = FakeHangup()
    results = await submit_and_wait(node, timeout_s=5.0, gone=gone)
    [task_id] = list(node.dispatcher.active)
    gone.hang_up()
    await spin()
    assert results.calls == [[None]]
    await spin()
    view = await node.tasks.view(task_id)
    assert view["state"] == "cancelled"
    assert view["result"] == {"error": True, "msg": "submitter disconnected"}


async def test_blocking_submit_handed_to_a_parked_poll(tmp_path: Path) -> None:
    node = await start_node(tmp_path)
    answers, _ = poll(node)
    results = await submit_and_wait(node, timeout_s=5.0)
    await spin()
    [task] = answers.got
    assert task is not None
    await node.tasks.result("agent1", ADDRESS, None, task.id, {"error": True, "msg": "boom"})
    assert results.calls == [[{"error": True, "msg": "boom"}]]
    assert (await node.tasks.view(task.id))["state"] == "failed"


# --- results ------------------------------------------------------------------------------------

async def test_results_that_are_refused(tmp_path: Path) -> None:
    node = await start_node(tmp_path, agents=("agent1", "agent2"))
    task = await submit(node)
    with pytest.raises(ApiError) as e:  # queued, not delivered
        node.tasks.result("agent1", ADDRESS, None, task.id, {"out": 1})
    assert e.value.status == 409
    answers, _ = poll(node)
    await spin()
    with pytest.raises(ApiError) as e:
        node.tasks.result("agent2", ADDRESS, None, task.id, {"out": 1})
    assert e.value.status == 403
    with pytest.raises(ApiError) as e:
        node.tasks.result("agent1", ADDRESS, None, task.id, ["not", "an", "object"])
    assert e.value.status == 400
    with pytest.raises(ApiError) as e:
        await node.tasks.result("agent1", ADDRESS, None, 999_999, {"out": 1})
    assert e.value.status == 404
    await node.tasks.result("agent1", ADDRESS, None, task.id, {"out": 1})
    with pytest.raises(ApiError) as e:  # a second result
        await node.tasks.result("agent1", ADDRESS, None, task.id, {"out": 2})
    assert e.value.status == 409
    assert stored(node, task.id)["result"] == {"out": 1, "error": False}


# --- expiry -------------------------------------------------------------------------------------

async def test_sweep_expires_a_queued_task_after_its_deadline(tmp_path: Path) -> None:
    node = await start_node(tmp_path)
    task = await submit(node, expires_s=10)
    node.clock.advance(9.9)
    node.tasks.sweep()
    assert task.state is TaskState.QUEUED
    node.clock.advance(0.2)
    node.tasks.sweep()
    await spin()
    view = await node.tasks.view(task.id)
    assert view["state"] == "expired"
    assert view["result"] == {"error": True, "msg": "expired in queue"}
    answers, _ = poll(node)
    await spin()
    node.clock.advance(node.settings.poll_timeout_s)
    assert answers.got == [None]


async def test_sweep_fails_a_delivered_task_without_result_after_its_deadline(
        tmp_path: Path) -> None:
    node = await start_node(tmp_path)
    task = await submit(node, expires_s=10)
    answers, _ = poll(node)
    await spin()
    assert answers.got == [task]
    node.clock.advance(10.1)
    node.tasks.sweep()
    await spin()
    assert stored(node, task.id)["state"] == "failed"
    assert stored(node, task.id)["result"] == {"error": True,
                                               "msg": "no result before the deadline"}
    with pytest.raises(ApiError) as e:  # too late
        await node.tasks.result("agent1", ADDRESS, None, task.id, {"out": 1})
    assert e.value.status == 409


async def test_sweep_writes_the_agents_last_seen(tmp_path: Path) -> None:
    node = await start_node(tmp_path)
    poll(node)
    node.tasks.sweep()
    await spin()
    seen = node.store.db.agents["agent1"]
    assert seen.last_seen_ms == node.clock.now_ms()
    assert seen.address == ADDRESS and seen.version == "1.0"


# --- cancel -------------------------------------------------------------------------------------

async def test_cancel_a_queued_task(tmp_path: Path) -> None:
    node = await start_node(tmp_path)
    task = await submit(node)
    view = await node.tasks.cancel(task.id, "admin", ADDRESS)
    assert view["state"] == "cancelled"
    assert view["result"] == {"error": True, "msg": "cancelled by admin"}
    await spin()
    assert stored(node, task.id)["state"] == "cancelled"
    answers, _ = poll(node)
    await spin()
    node.clock.advance(node.settings.poll_timeout_s)
    assert answers.got == [None]


async def test_cancel_refuses_a_delivered_a_finished_and_an_unknown_task(tmp_path: Path) -> None:
    node = await start_node(tmp_path)
    task = await submit(node)
    poll(node)
    await spin()
    with pytest.raises(ApiError) as e:
        await node.tasks.cancel(task.id, "admin", ADDRESS)
    assert e.value.status == 409
    assert task.state is TaskState.DELIVERED
    await node.tasks.result("agent1", ADDRESS, None, task.id, {"out": 1})
    with pytest.raises(ApiError) as e:  # finished: only in the store now
        await node.tasks.cancel(task.id, "admin", ADDRESS)
    assert e.value.status == 409
    with pytest.raises(ApiError) as e:
        await node.tasks.cancel(123_456, "admin", ADDRESS)
    assert e.value.status == 404


async def test_cancel_on_another_process_withdraws_the_task_from_its_queue(
        tmp_path: Path) -> None:
    bus: list[LocalNotifier] = []
    a = await start_node(tmp_path, bus=bus)
    b = await start_node(tmp_path, store=a.store.sibling("b"), clock=a.clock, bus=bus)
    task = await submit(a)
    view = await b.tasks.cancel(task.id, "admin", ADDRESS)
    assert view["state"] == "cancelled"
    await spin()
    assert task.state is TaskState.CANCELLED
    assert a.dispatcher.queued("agent1") == 0
    answers, _ = poll(a)
    await spin()
    a.clock.advance(a.settings.poll_timeout_s)
    assert answers.got == [None]


# --- history ------------------------------------------------------------------------------------

async def test_history_lists_tasks_newest_first_with_their_live_state(tmp_path: Path) -> None:
    from dutserver.core.model import TaskFilter
    node = await start_node(tmp_path)
    one = await submit(node)
    two = await submit(node)
    poll(node)
    await spin()
    views = await node.tasks.history(TaskFilter(agent="agent1"))
    assert [(v["id"], v["state"]) for v in views] == [(two.id, "queued"), (one.id, "delivered")]


# --- recovery and task ids ----------------------------------------------------------------------

async def test_recovery_after_a_restart(tmp_path: Path) -> None:
    """The node stops without a word: what it had delivered fails, what was queued is queued
    again (in order), what expired meanwhile is expired, and new ids are new."""
    store, clock = FakeStore("n1"), FakeClock()
    old = await start_node(tmp_path, store=store, clock=clock)
    delivered = await submit(old, {"type": "delivered", "text": "hi"})
    poll(old)
    await spin()
    queued1 = await submit(old, {"type": "queued1", "text": "hi"})
    expiring = await submit(old, {"type": "expiring", "text": "hi"}, expires_s=5)
    queued2 = await submit(old, {"type": "queued2", "text": "hi"})
    old_ids = {delivered.id, queued1.id, expiring.id, queued2.id}

    clock.advance(10)  # the restart
    new = await start_node(tmp_path, store=store, clock=clock)
    assert stored(new, delivered.id) == {"state": "failed",
                                         "result": {"error": True, "msg": "no result"},
                                         "delivered_by": "n1"}
    assert stored(new, expiring.id)["state"] == "expired"
    assert new.dispatcher.queued("agent1") == 2

    first, _ = poll(new)
    await spin()
    second, _ = poll(new)
    await spin()
    got = [first.got[0], second.got[0]]
    assert [(t.id, t.type, t.payload) for t in got if t is not None] == [
        (queued1.id, "queued1", {"text": "hi"}), (queued2.id, "queued2", {"text": "hi"})]
    assert second.stored_state == ["delivered"]
    await new.tasks.result("agent1", ADDRESS, None, queued1.id, {"out": 1})
    assert stored(new, queued1.id)["state"] == "done"

    fresh = await submit(new)
    assert fresh.id not in old_ids
    assert fresh.id > max(old_ids)


async def test_recovery_leaves_what_another_node_delivered(tmp_path: Path) -> None:
    a = await start_node(tmp_path, store=FakeStore("a"))
    task = await submit(a)
    poll(a)
    await spin()
    b = await start_node(tmp_path, store=a.store.sibling("b"), clock=a.clock)  # b (re)starts
    assert stored(b, task.id)["state"] == "delivered"
    await a.tasks.result("agent1", ADDRESS, None, task.id, {"out": 1})
    assert stored(a, task.id)["state"] == "done"


async def test_two_processes_on_one_store_never_get_the_same_task_id(tmp_path: Path) -> None:
    a = await start_node(tmp_path, store=FakeStore("a"), queue_max=100_000)
    b = await start_node(tmp_path, store=a.store.sibling("b"), clock=a.clock, queue_max=100_000)
    ids: list[int] = []
    for _ in range(3):
        for node in (a, b, a):
            # more than a reserved block (4096) in all: both reserve again while submitting
            tasks = await node.tasks.submit(["agent1"] * 1500, {"type": "bulk"}, "admin", None,
                                            ADDRESS)
            ids += [t.id for t in tasks]
    assert len(ids) == 3 * 3 * 1500
    assert len(set(ids)) == len(ids)
    assert len(set(a.store.db.tasks)) == len(ids)  # none overwrote another's row


# --- several processes: a result recorded elsewhere ----------------------------------------------

async def test_a_result_posted_to_another_process_reaches_the_blocking_submitter(
        tmp_path: Path) -> None:
    bus: list[LocalNotifier] = []
    a = await start_node(tmp_path, store=FakeStore("a"), bus=bus,
                         agents=("agent1", "agent2"))
    b = await start_node(tmp_path, store=a.store.sibling("b"), clock=a.clock, bus=bus)
    results = await submit_and_wait(a, timeout_s=5.0)
    answers, _ = poll(a)  # the agent polls a
    await spin()
    [task] = answers.got
    assert task is not None

    with pytest.raises(ApiError) as e:  # not this agent's task: refused there too
        await b.tasks.result("agent2", ADDRESS, None, task.id, {"out": 1})
    assert e.value.status == 403
    await b.tasks.result("agent1", ADDRESS, None, task.id, {"out": "via b"})  # and posts to b
    assert stored(b, task.id)["state"] == "done"
    await spin()
    assert results.calls == [[{"out": "via b", "error": False}]]
    assert (await a.tasks.view(task.id))["state"] == "done"
    assert task.id not in a.dispatcher.active

    with pytest.raises(ApiError) as e:  # a second result, to either process
        await b.tasks.result("agent1", ADDRESS, None, task.id, {"out": "again"})
    assert e.value.status == 409
    with pytest.raises(ApiError) as e:
        await a.tasks.result("agent1", ADDRESS, None, task.id, {"out": "again"})
    assert e.value.status == 409
    assert stored(a, task.id)["result"] == {"out": "via b", "error": False}


async def test_of_two_processes_recording_one_result_one_wins(tmp_path: Path) -> None:
    bus: list[LocalNotifier] = []
    a = await start_node(tmp_path, store=FakeStore("a"), bus=bus)
    b = await start_node(tmp_path, store=a.store.sibling("b"), clock=a.clock, bus=bus)
    c = await start_node(tmp_path, store=a.store.sibling("c"), clock=a.clock, bus=bus)
    task = await submit(a)
    poll(a)
    await spin()
    first = b.tasks.result("agent1", ADDRESS, None, task.id, {"out": "b"})
    second = c.tasks.result("agent1", ADDRESS, None, task.id, {"out": "c"})
    outcomes = []
    for fut in (first, second):
        try:
            await fut
            outcomes.append("ok")
        except ApiError as exc:
            outcomes.append(exc.status)
    assert sorted(outcomes, key=str) == [409, "ok"]
    await spin()
    assert task.state is TaskState.DONE


async def test_a_task_cancelled_on_another_process_is_never_handed_out(tmp_path: Path) -> None:
    """b cancels a task a holds in its queue; an agent polling a before a has heard of it
    must not get it (a's hand-off is a compare and set on the stored state)."""
    bus: list[LocalNotifier] = []
    a = await start_node(tmp_path, store=FakeStore("a"), bus=bus)
    b = await start_node(tmp_path, store=a.store.sibling("b"), clock=a.clock, bus=bus)
    task = await submit(a)
    assert (await b.tasks.cancel(task.id, "admin", ADDRESS))["state"] == "cancelled"
    answers, _ = poll(a)  # the agent polls a at once
    await spin()
    a.clock.advance(a.settings.poll_timeout_s)
    assert answers.got == [None]
    assert stored(a, task.id)["state"] == "cancelled"

# --- several processes: shared queues ---------------------------------------------------------

async def test_an_agent_polling_another_process_gets_a_task_submitted_here(
        tmp_path: Path) -> None:
    bus: list[LocalNotifier] = []
    a = await start_node(tmp_path, store=FakeStore("a"), bus=bus)
    b = await start_node(tmp_path, store=a.store.sibling("b"), clock=a.clock, bus=bus)
    answers, _ = poll(b)
    await spin()
    task = await submit(a)
    await spin(20)
    assert [t.id for t in answers.got if t is not None] == [task.id]
    assert answers.stored_state == ["delivered"]
    assert stored(a, task.id)["delivered_by"] == "b"
    await b.tasks.result("agent1", ADDRESS, None, task.id, {"out": 1})
    assert stored(a, task.id)["state"] == "done"
    await spin(20)
    assert task.id not in a.dispatcher.active  # a dropped its copy


async def test_an_agent_polling_two_processes_gets_a_task_once(tmp_path: Path) -> None:
    bus: list[LocalNotifier] = []
    a = await start_node(tmp_path, store=FakeStore("a"), bus=bus)
    b = await start_node(tmp_path, store=a.store.sibling("b"), clock=a.clock, bus=bus)
    on_b, _ = poll(b)
    await spin()
    task = await submit(a)
    on_a, _ = poll(a)  # both hold it now, and both hand it over: one wins
    await spin(20)
    a.clock.advance(a.settings.poll_timeout_s)
    await spin()
    got = [t for t in on_a.got + on_b.got if t is not None]
    assert [t.id for t in got] == [task.id]
    assert on_a.got.count(None) + on_b.got.count(None) == 1


async def test_a_restarted_fleet_node_finds_its_queued_tasks_at_the_agents_poll(
        tmp_path: Path) -> None:
    bus: list[LocalNotifier] = []
    a = await start_node(tmp_path, store=FakeStore("a"), bus=bus)
    task = await submit(a)
    again = await start_node(tmp_path, store=a.store.sibling("a"), clock=a.clock, bus=[])
    answers, _ = poll(again)
    await spin(20)
    assert [t.id for t in answers.got if t is not None] == [task.id]


async def test_the_heartbeat_recovers_a_dead_node_and_expires_queued_tasks(
        tmp_path: Path) -> None:
    bus: list[LocalNotifier] = []
    a = await start_node(tmp_path, store=FakeStore("a"), bus=bus)
    b = await start_node(tmp_path, store=a.store.sibling("b"), clock=a.clock, bus=bus)
    running = await submit(a)
    poll(a)
    await spin()
    waiting = await submit(a, expires_s=10)
    a.store.db.dead.add("a")  # a stops, without a word
    a.clock.advance(11)
    await b.tasks.sharing.heartbeat()
    await spin()
    assert stored(b, running.id)["state"] == "failed"
    assert stored(b, waiting.id)["state"] == "expired"

# --- bugs found while writing these tests (they fail until the core is mended) ------------------

async def test_a_submit_refused_because_its_insert_failed_never_runs(tmp_path: Path) -> None:
    """BUG (core/tasks.py, Tasks.submit): when the insert's commit fails, the submitter gets
    an error (a 500: it will likely submit again), but the task stays in the agent's queue
    and is handed out at the next poll (its later writes store it after all)."""
    node = await start_node(tmp_path)
    node.store.fail_next_commit = True
    with pytest.raises(CommitFailed):
        await submit(node)
    answers, _ = poll(node)
    await spin()
    node.clock.advance(node.settings.poll_timeout_s)
    assert answers.got == [None]


async def test_a_result_posted_to_the_node_that_queued_a_task_another_node_delivered(
        tmp_path: Path) -> None:
    """BUG (core/tasks.py, Tasks.record_result, the 409 "Task was not delivered"): a queued the
    task, b handed it to the agent (its compare and set won), and nobody tells a, whose copy
    stays "queued". The agent's result, posted to a (any node behind a load balancer), is
    refused with 409 and lost; the task fails at its deadline although the agent ran it."""
    bus: list[LocalNotifier] = []
    a = await start_node(tmp_path, store=FakeStore("a"), bus=bus)
    b = await start_node(tmp_path, store=a.store.sibling("b"), clock=a.clock, bus=bus)
    answers, _ = poll(b)
    await spin()
    task = await submit(a)
    await spin(20)
    assert [t.id for t in answers.got if t is not None] == [task.id]
    await a.tasks.result("agent1", ADDRESS, None, task.id, {"out": 1})  # posted to a
    assert stored(a, task.id)["state"] == "done"
