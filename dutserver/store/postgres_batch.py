"""One group-commit batch of the PostgreSQL store's writer: what it holds, and the one
statement it becomes (store/postgres_sql.py: combined)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from dutserver.store import postgres_sql as pgsql
from dutserver.core.model import FINAL_STATES
from dutserver.store.postgres_notify import (CHANNEL, finished, told_outcome, told_task,
                                             work)

FINAL = frozenset(s.value for s in FINAL_STATES)


class Batch:
    """What one transaction of the writer will hold."""

    __slots__ = ("audits", "cas", "done", "expected", "inserts", "notifies", "ops",
                 "tell_finished", "tell_queued", "updates")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.inserts: dict[int, tuple[Any, ...]] = {}
        self.updates: dict[int, tuple[Any, ...]] = {}
        self.expected: dict[int, str] = {}  # updates that are compare-and-set: the state
        self.cas: dict[int, asyncio.Future[Any]] = {}  # … and who waits to know if they won
        self.audits: list[tuple[Any, ...]] = []
        self.notifies: dict[str, None] = {}  # payloads, in order, once each
        # Wake-ups told from the rows this batch writes, made at the commit (statement):
        self.tell_queued: dict[int, str] = {}  # task id -> its agent
        self.tell_finished: dict[int, None] = {}  # task ids
        self.ops: list[tuple[Callable[..., Awaitable[Any]], tuple[Any, ...],
                             asyncio.Future[Any] | None]] = []
        self.done: asyncio.Future[Any] = loop.create_future()

    def statement(self, node: str) -> tuple[str, list[Any]]:
        """The letters of the parts this batch has (postgres_sql.combined) and their arguments,
        with the wake-ups told from its rows (node: the name they carry)."""
        present = ""
        args: list[Any] = []
        if self.inserts:
            present += "i"
            args += pgsql.columns(self.inserts.values(), 12)
        plain = [r for i, r in self.updates.items() if i not in self.expected]
        if plain:
            present += "u"
            args += pgsql.update_columns(plain)
        checked = [r for i, r in self.updates.items() if i in self.expected]
        if checked:
            present += "c"
            args += [*pgsql.update_columns(checked), [self.expected[r[0]] for r in checked]]
        if self.audits:
            present += "a"
            args += pgsql.columns(self.audits, 5)
        if_won = self._tell(node)
        if self.notifies:
            present += "n"
            args += [CHANNEL, list(self.notifies)]
        if if_won:
            present += "k"
            args += [CHANNEL, list(if_won), list(if_won.values())]
        return present, args

    def _tell(self, node: str) -> dict[int, str]:
        """Turns the wake-ups to tell into NOTIFY texts (into `notifies`), from the rows this
        batch writes; returns those to send only if their compare-and-set wins."""
        if_won: dict[int, str] = {}
        for task_id, agent in self.tell_queued.items():
            row = self.inserts.get(task_id)
            told = told_task(node, row) if row is not None and row[4] == "queued" else None
            self.notifies[told or work(node, agent)] = None
        for task_id in self.tell_finished:
            row = self.updates.get(task_id) or self.inserts.get(task_id)
            told = told_outcome(node, row) if row is not None and row[4] in FINAL else None
            if told is None:  # no outcome written here, or too long: the others read it
                self.notifies[finished(node, task_id)] = None
            elif task_id in self.expected:
                if_won[task_id] = told
            else:
                self.notifies[told] = None
        return if_won


def settle_won(cas: asyncio.Future[Any], done: asyncio.Future[Any]) -> None:
    """A compare-and-set that an insert in the same batch superseded: won if that committed."""
    if cas.done():
        return
    if done.cancelled():
        cas.cancel()
    elif done.exception() is not None:
        cas.set_exception(done.exception())  # type: ignore[arg-type]
    else:
        cas.set_result(True)
