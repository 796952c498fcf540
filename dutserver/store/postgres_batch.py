"""One group-commit batch of the PostgreSQL store's writer: what it holds, and the one
statement it becomes (store/postgres_sql.py: combined)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from dutserver.store import postgres_sql as pgsql
from dutserver.store.postgres_notify import CHANNEL


class Batch:
    """What one transaction of the writer will hold."""

    __slots__ = ("audits", "cas", "done", "expected", "inserts", "notifies", "notifies_if_queued",
                 "notifies_if_won", "ops", "updates")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.inserts: dict[int, tuple[Any, ...]] = {}
        self.updates: dict[int, tuple[Any, ...]] = {}
        self.expected: dict[int, str] = {}  # updates that are compare-and-set: the state
        self.cas: dict[int, asyncio.Future[Any]] = {}  # … and who waits to know if they won
        self.audits: list[tuple[Any, ...]] = []
        self.notifies: dict[str, None] = {}  # payloads, in order, once each
        self.notifies_if_won: dict[int, str] = {}  # task id -> sent if its compare-and-set won
        # task id -> (sent if its inserted row is still queued at the commit, sent otherwise)
        self.notifies_if_queued: dict[int, tuple[str, str]] = {}
        self.ops: list[tuple[Callable[..., Awaitable[Any]], tuple[Any, ...],
                             asyncio.Future[Any] | None]] = []
        self.done: asyncio.Future[Any] = loop.create_future()

    def statement(self) -> tuple[str, list[Any]]:
        """The letters of the parts this batch has (postgres_sql.combined) and their arguments;
        the NOTIFYs that depend on an inserted row's state are settled here, at the commit."""
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
        for task_id, (told, otherwise) in self.notifies_if_queued.items():
            row = self.inserts.get(task_id)
            self.notifies[told if row is not None and row[4] == "queued" else otherwise] = None
        if self.notifies:
            present += "n"
            args += [CHANNEL, list(self.notifies)]
        if self.notifies_if_won:
            present += "k"
            args += [CHANNEL, list(self.notifies_if_won), list(self.notifies_if_won.values())]
        return present, args


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
