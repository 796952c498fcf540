"""The fakes the core tests stand on (tests/fakes.py): they keep to the ports they fake."""

from __future__ import annotations

import asyncio
import inspect

import pytest

from dutserver.core.model import Task
from dutserver.core.clock import Clock
from dutserver.core.ports import Store
from fakes import CommitFailed, FakeClock, FakeHangup, FakeStore


def test_the_fake_clock_overrides_every_method_of_the_clock() -> None:
    """FakeClock subclasses the real one (a class, core/clock.py): a method it forgot would
    read the system's time in the middle of a test."""
    for name in ("now_ms", "monotonic", "call_later"):
        assert hasattr(Clock, name)
        assert name in vars(FakeClock), name
    assert {n for n in dir(Clock) if not n.startswith("_")} == {"now_ms", "monotonic",
                                                                 "call_later"}


@pytest.mark.parametrize(("port", "fake"), [(Store, FakeStore)])
def test_fakes_have_every_method_of_their_port(port: type, fake: type) -> None:
    for name, fn in vars(port).items():
        if name.startswith("_") or not callable(fn):
            continue
        mine = getattr(fake, name, None)
        assert mine is not None, f"{fake.__name__}.{name} is missing"
        assert list(inspect.signature(mine).parameters) == list(
            inspect.signature(fn).parameters), name
        assert inspect.iscoroutinefunction(mine) == inspect.iscoroutinefunction(fn), name


def test_fake_clock_runs_due_timers_in_order_each_at_its_time() -> None:
    clock = FakeClock()
    t0, wall0 = clock.monotonic(), clock.now_ms()
    ran: list[tuple[str, float]] = []
    clock.call_later(2, lambda: ran.append(("b", clock.monotonic() - t0)))
    clock.call_later(1, lambda: ran.append(("a", clock.monotonic() - t0)))
    clock.call_later(1, lambda: clock.call_later(0.5, lambda: ran.append(
        ("a+", clock.monotonic() - t0))))
    clock.call_later(3, lambda: ran.append(("cancelled", 0))).cancel()
    clock.advance(2.5)
    assert ran == [("a", 1), ("a+", 1.5), ("b", 2)]
    assert clock.monotonic() - t0 == 2.5 and clock.now_ms() - wall0 == 2500
    assert clock.pending() == 0


async def test_fake_store_commits_a_batch_one_turn_later_or_fails_it() -> None:
    store = FakeStore()
    await store.set_setting("k", "v")
    store.add_ban("x", 10)
    assert await store.bans(0) == {}  # not committed yet
    await asyncio.sleep(0)
    assert await store.bans(0) == {"x": 10}
    store.fail_next_commit = True
    store.add_ban("y", 10)
    await store.barrier()
    assert "y" not in await store.bans(0)
    task = Task(1, "agent1", "echo", {}, "admin", 0, 1)
    store.fail_next_commit = True
    with pytest.raises(CommitFailed):
        await store.save_task(task)
    assert store.db.tasks == {}
    await store.save_task(task)  # the switch is for one commit
    assert store.db.tasks[1].state == "queued"


async def test_fake_hangup_calls_back_one_turn_later() -> None:
    gone = FakeHangup()
    seen: list[object] = []
    gone.add_done_callback(seen.append)
    gone.hang_up()
    assert gone.done() and seen == []
    await asyncio.sleep(0)
    assert seen == [gone]
