"""The in-process Notifier (core/ports.py): one process, so a wake-up is a call on this loop.

What one process sends, its own subscriber gets, one loop turn later (never inside the caller's
own step, as a wake-up from another process never is). PostgreSQL's store replaces this with
LISTEN/NOTIFY so that the other processes of a fleet get it too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class LocalNotifier:
    """fleet: whether other Tasks services listen (the core tests run two on one store);
    a lone process never needs to tell itself, and the core then sends nothing."""

    def __init__(self, fleet: bool = False) -> None:
        self.fleet = fleet
        self._on_finished: list[Callable[[int], None]] = []

    def subscribe(self, on_finished: Callable[[int], None]) -> None:
        self._on_finished.append(on_finished)

    def task_finished(self, task_id: int) -> None:
        loop = asyncio.get_running_loop()
        for fn in self._on_finished:
            loop.call_soon(fn, task_id)
