"""The in-process Notifier (core/ports.py): a wake-up is a call on this loop, one turn later
(never inside the sender's own step, as one from another process never is).

A lone process (SQLite's default) sends nothing (fleet=False). The core tests connect several
Tasks services through one LocalNotifier(fleet=True), each getting the others' wake-ups, as
PostgreSQL's LISTEN/NOTIFY does between nodes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from dutserver.core.model import Outcome, TaskRecord


class LocalNotifier:
    """fleet: whether other processes listen. bus: the notifiers of the processes that hear
    each other (tests: one list shared by several); a process never hears itself."""

    def __init__(self, fleet: bool = False, bus: list[LocalNotifier] | None = None) -> None:
        self.fleet = fleet
        self._bus = bus if bus is not None else []
        self._bus.append(self)
        self._on_work: Callable[[str, TaskRecord | None], None] | None = None
        self._on_finished: Callable[[int, Outcome | None], None] | None = None

    def subscribe(self, on_work: Callable[[str, TaskRecord | None], None],
                  on_finished: Callable[[int, Outcome | None], None],
                  on_gap: Callable[[], None]) -> None:
        # A call on this loop is never missed: no gap to report.
        self._on_work, self._on_finished = on_work, on_finished

    def agent_has_work(self, agent: str, task_id: int | None = None) -> None:
        # Without the task, as task_finished without the outcome: the others read the store.
        loop = asyncio.get_running_loop()
        for other in self._bus:
            if other is not self and other._on_work is not None:
                loop.call_soon(other._on_work, agent, None)

    def task_finished(self, task_id: int) -> None:
        loop = asyncio.get_running_loop()
        for other in self._bus:
            if other is not self and other._on_finished is not None:
                loop.call_soon(other._on_finished, task_id, None)
