"""Wake-ups between the nodes of one PostgreSQL database (core.ports.Notifier)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import asyncpg

from dutserver.core.model import Outcome, TaskRecord
from dutserver.store.postgres_sql import LOST

if TYPE_CHECKING:
    from dutserver.store.postgres import PostgresStore

log = logging.getLogger("dutserver.store")
CHANNEL = "dutserver"
_MAX_PAYLOAD = 7900  # PostgreSQL refuses a NOTIFY payload of 8,000 bytes or more


# The wake-ups' texts, made by the store's batches (postgres_batch.py) and read here. A row is
# a task row as the store writes it (postgres_sql.py: TASK_COLUMNS, in that order).

def work(node: str, agent: str) -> str:
    return f"w:{node}:{agent}"


def finished(node: str, task_id: int) -> str:
    return f"f:{node}:{task_id}"


def told_task(node: str, row: tuple[Any, ...]) -> str | None:
    """The queued task of a row, if it fits in a NOTIFY."""
    told = "W" + json.dumps([node, row[0], row[1], row[2], row[3], row[5], row[6], row[7]])
    return told if len(told.encode()) <= _MAX_PAYLOAD else None


def told_outcome(node: str, row: tuple[Any, ...]) -> str | None:
    """The outcome of a row, if it fits in a NOTIFY."""
    told = "F" + json.dumps([node, row[0], row[4], row[9], row[10]])
    return told if len(told.encode()) <= _MAX_PAYLOAD else None


class PostgresNotifier:
    """Wake-ups between nodes: NOTIFYs on one channel, each sent with the commit of what it
    announces ("w:<node>:<agent>", or with the queued task, 'W["<node>", id, "agent", "type",
    "payload JSON", "submitted by", created_ms, expires_ms]'; "f:<node>:<task id>", or with
    the outcome, 'F["<node>", id, "state", finished_ms, "result JSON"]', sent only if its
    compare-and-set wins), heard on a connection of its own. What a node sends, it does not
    hear back. A wake-up too long for a NOTIFY (8,000 bytes) goes without what it carries."""

    fleet = True

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self._on_work: Callable[[str, TaskRecord | None], None] | None = None
        self._on_finished: Callable[[int, Outcome | None], None] | None = None
        self._on_gap: Callable[[], None] | None = None
        self._conn: Any = None
        self._closing = False

    def subscribe(self, on_work: Callable[[str, TaskRecord | None], None],
                  on_finished: Callable[[int, Outcome | None], None],
                  on_gap: Callable[[], None]) -> None:
        self._on_work, self._on_finished, self._on_gap = on_work, on_finished, on_gap

    def agent_has_work(self, agent: str, task_id: int | None = None) -> None:
        if task_id is None:
            self.store.notify(work(self.store.node, agent))
        else:  # the store tells the task from the row it commits (postgres_batch.py)
            self.store.tell_queued(task_id, agent)

    def task_finished(self, task_id: int) -> None:
        self.store.tell_finished(task_id)  # likewise, with the outcome if it writes one

    async def listen(self) -> None:
        """Connects the listening connection (again, after it was lost)."""
        self._conn = await asyncpg.connect(self.store.url)
        self._conn.add_termination_listener(self._lost)
        await self._conn.add_listener(CHANNEL, self._heard)

    async def close(self) -> None:
        self._closing = True
        if self._conn is not None:
            await self._conn.close()

    def _heard(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        if payload.startswith("F"):
            self._heard_outcome(payload[1:])
            return
        if payload.startswith("W"):
            self._heard_task(payload[1:])
            return
        kind, _, rest = payload.partition(":")
        node, _, what = rest.rpartition(":")
        if node == self.store.node:
            return
        if kind == "w" and self._on_work is not None:
            self._on_work(what, None)  # "w:node:agent"
        elif kind == "f" and self._on_finished is not None and what.isdigit():
            self._on_finished(int(what), None)

    def _heard_task(self, told: str) -> None:
        try:
            node, task_id, agent, kind, payload, by, created, expires = json.loads(told)
            row = TaskRecord(int(task_id), str(agent), str(kind), str(payload), "queued",
                             str(by), int(created), int(expires), None, None, None)
        except (ValueError, TypeError):
            log.error("a wake-up that is not dutserver's on its channel: %.100r", told)
            return
        if node != self.store.node and self._on_work is not None:
            self._on_work(row.agent, row)

    def _heard_outcome(self, told: str) -> None:
        try:
            node, task_id, state, finished_ms, result = json.loads(told)
            outcome = Outcome(str(state), None if finished_ms is None else int(finished_ms),
                              None if result is None else str(result))
            task_id = int(task_id)
        except (ValueError, TypeError):
            log.error("a wake-up that is not dutserver's on its channel: %.100r", told)
            return
        if node != self.store.node and self._on_finished is not None:
            self._on_finished(task_id, outcome)

    def _lost(self, conn: Any) -> None:
        if not self._closing:
            log.error("the listening connection to the database was lost; reconnecting")
            asyncio.ensure_future(self._relisten())

    async def _relisten(self) -> None:
        delay = 0.1
        while not self._closing:
            try:
                await self.listen()
                log.info("listening to the database again")
                if self._on_gap is not None:  # what was sent meanwhile was not heard
                    self._on_gap()
                return
            except (*LOST, asyncpg.PostgresError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
