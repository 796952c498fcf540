"""Helpers of the core tests: one "process" (a Node: the core's services on fakes), agents and
admins, and recorders for the callbacks the core answers through."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher

from dutserver.config import Settings
from dutserver.core.auth import Auth
from dutserver.core.dispatcher import Dispatcher
from dutserver.core.model import Task
from dutserver.core.notify import LocalNotifier
from dutserver.core.services import Services, build_services
from dutserver.core.tasks import Tasks
from fakes import FakeClock, FakeHangup, FakeStore

AGENT_SECRET = "agent-secret-0123456789"
ADMIN_PASSWORD = "adminpass1"
ADDRESS = "10.0.0.1"
# Cheap argon2 parameters: verify() takes them from the hash, so logins in tests are fast.
ADMIN_HASH = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash(ADMIN_PASSWORD)


def settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Short timeouts; the key file beside a database that is never created."""
    values: dict[str, Any] = {"db_path": tmp_path / "x.db", "poll_timeout_s": 1.0,
                              "submit_timeout_s": 5.0, "task_expiry_s": 60.0}
    values.update(overrides)
    return Settings(**values)


@dataclass
class Node:
    """One server process of the core: its services over a store, a notifier and a clock."""

    settings: Settings
    store: FakeStore
    clock: FakeClock
    notifier: LocalNotifier
    services: Services

    @property
    def tasks(self) -> Tasks:
        return self.services.tasks

    @property
    def auth(self) -> Auth:
        return self.services.auth

    @property
    def dispatcher(self) -> Dispatcher:
        return self.services.tasks.dispatcher


async def start_node(tmp_path: Path, store: FakeStore | None = None,
                     clock: FakeClock | None = None, bus: list[LocalNotifier] | None = None,
                     agents: tuple[str, ...] = ("agent1",), admins: tuple[str, ...] = ("admin",),
                     **overrides: Any) -> Node:
    """A started node (accounts read, recovery done). With a bus (a list, shared by the nodes
    of one fleet), it is one of several processes on one store that wake each other up.
    Accounts named in agents and admins are added to the store unless it has them already."""
    store = store if store is not None else FakeStore()
    clock = clock if clock is not None else FakeClock()
    notifier = LocalNotifier(fleet=bus is not None, bus=bus)
    s = settings(tmp_path, **overrides)
    services = build_services(s, store, notifier, clock)
    for name in agents:
        if name not in store.db.accounts:
            await services.auth.create_account(name, "agent", AGENT_SECRET, "test", None)
    for name in admins:
        if name not in store.db.accounts:
            await store.add_account(name, "admin", ADMIN_HASH, clock.now_ms())
    await services.start()
    return Node(s, store, clock, notifier, services)


async def spin(turns: int = 10) -> None:
    """Lets the loop run a few turns: commits, their callbacks, wake-ups."""
    for _ in range(turns):
        await asyncio.sleep(0)


class Answers:
    """An `answer` callback that records what it got; with a store, also the state the task had
    there (committed) at the moment of the answer."""

    def __init__(self, store: FakeStore | None = None) -> None:
        self.store = store
        self.got: list[Task | None] = []
        self.stored_state: list[str | None] = []

    def __call__(self, task: Task | None) -> None:
        self.got.append(task)
        if self.store is not None and task is not None:
            row = self.store.db.tasks.get(task.id)
            self.stored_state.append(row.state if row is not None else None)


class Results:
    """The `done` callback of a blocking submit."""

    def __init__(self) -> None:
        self.calls: list[list[dict[str, Any] | None]] = []

    def __call__(self, results: list[dict[str, Any] | None]) -> None:
        self.calls.append(results)


def poll(node: Node, agent: str = "agent1",
         gone: FakeHangup | None = None) -> tuple[Answers, FakeHangup]:
    answers = Answers(node.store)
    gone = gone if gone is not None else FakeHangup()
    node.tasks.poll(agent, ADDRESS, "1.0", gone, answers)
    return answers, gone


async def submit(node: Node, body: dict[str, Any] | None = None, agent: str = "agent1",
                 expires_s: float | None = None) -> Task:
    """A non-blocking submit, returned once stored."""
    [task] = await node.tasks.submit([agent], body or {"type": "echo", "text": "hi"}, "admin",
                                     expires_s, ADDRESS)
    return task


async def submit_and_wait(node: Node, timeout_s: float = 5.0, agent: str = "agent1",
                          gone: FakeHangup | None = None,
                          body: dict[str, Any] | None = None) -> Results:
    """A blocking submit, as the routes make it (prepare first, then in one turn)."""
    pending = node.tasks.prepare([agent])
    if pending is not None:
        await pending
    results = Results()
    node.tasks.submit_and_wait([agent], body or {"type": "echo", "text": "hi"}, "admin",
                               timeout_s, gone, ADDRESS, results)
    return results
