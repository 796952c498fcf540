"""Group commit: one thread owns the write connection and commits whatever queued up meanwhile.

A writer op is a function of a sqlite3.Connection. Ops queued while the previous batch was
committing go into the next transaction together, so a burst of N submits costs one commit, not N,
and a request that must be durable waits for its batch's commit, not for a commit of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Hashable, Iterator
from typing import Any

log = logging.getLogger("dutserver.store")

Op = Callable[[sqlite3.Connection], Any]
_STOP = object()
_MAX_BATCH = 2000


class GroupCommitWriter:
    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._connect = connect
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._worker_thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.commits = 0  # batches committed; read by tests and the bench to see the batching

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._worker_thread = threading.Thread(target=self._run, name="dutserver-writer",
                                               daemon=True)
        self._worker_thread.start()

    def write(self, op: Op) -> asyncio.Future[Any]:
        """Queues op; the future resolves with its return value once its batch is committed."""
        assert self._loop is not None, "writer not started"
        fut = self._loop.create_future()
        self._queue.put((op, fut))
        return fut

    def write_nowait(self, op: Op) -> None:
        """Queues op without anyone waiting for it (status updates, audit events)."""
        self._queue.put((op, None))

    async def barrier(self) -> None:
        """Waits until everything queued before this call is committed (read-your-writes)."""
        await self.write(_noop)

    def stop(self) -> None:
        """Commits what is queued, then ends the thread."""
        if self._worker_thread is not None:
            self._queue.put(_STOP)
            self._worker_thread.join()
            self._worker_thread = None

    def _run(self) -> None:
        conn = self._connect()
        try:
            while True:
                first = self._queue.get()
                if first is _STOP:
                    return
                batch = [first]
                stop = False
                while len(batch) < _MAX_BATCH:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is _STOP:
                        stop = True
                        break
                    batch.append(item)
                self._commit(conn, batch)
                if stop:
                    return
        finally:
            conn.close()

    def _commit(self, conn: sqlite3.Connection, batch: list[tuple[Op, Any]]) -> None:
        waited = commit_batch(conn, batch)
        self.commits += 1
        if waited and self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(_resolve, waited)
            except RuntimeError:  # loop closed between the check and the call
                pass


class InlineGroupCommitWriter:
    """Group commit on the event loop itself, for synchronous=NORMAL or OFF.

    A commit in WAL mode without fsync costs tens of microseconds, less than the two thread
    hand-offs (queue wake-up, call_soon_threadsafe) a writer thread needs per batch. Ops queued
    during one turn of the loop are committed together by one callback scheduled behind them.
    The WAL is checkpointed on a thread of its own (`checkpoint`), so no commit here runs a
    checkpoint's fsyncs (though the kernel can make a WAL write wait while one syncs the WAL:
    bench/README.md, "The half-load p99").
    """

    def __init__(self, connect: Callable[[], sqlite3.Connection],
                 interval_s: float = 0.0) -> None:
        self._connect = connect
        self._conn: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[tuple[Op, Any]] = []
        self._scheduled = False
        self._interval_s = interval_s
        self._last_commit = float("-inf")
        self._held = False
        self.commits = 0
        self.holds = 0  # times held() ran: read by tests

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._conn = self._connect()
        self._conn.execute("PRAGMA wal_autocheckpoint = 0")

    def write(self, op: Op) -> asyncio.Future[Any]:
        assert self._loop is not None, "writer not started"
        fut = self._loop.create_future()
        self._pending.append((op, fut))
        self._schedule()
        return fut

    def write_nowait(self, op: Op) -> None:
        self._pending.append((op, None))
        self._schedule()

    async def barrier(self) -> None:
        await self.write(_noop)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """No commits inside (writes queue up and go in one batch after): lets a checkpoint
        on its thread catch up with the WAL's end, so that the WAL can start over."""
        self._held = True
        self.holds += 1
        try:
            yield
        finally:
            self._held = False
            if self._pending:
                self._scheduled = False
                self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled and self._loop is not None:
            self._scheduled = True
            # Under load, at most one commit per interval: a commit writes its pages to the WAL
            # whatever it holds, so a few dozen rows cost about what one does. When the last
            # commit is longer ago than that, nobody waits beyond the next turn.
            wait_s = self._last_commit + self._interval_s - self._loop.time()
            if wait_s > 0:
                self._loop.call_later(wait_s, self._flush)
            else:
                self._loop.call_soon(self._flush_next_turn)

    def _flush_next_turn(self) -> None:
        # One turn later: what this turn's writes woke up (the poll a submit handed its task
        # to, the submitter a result answered) writes into the same batch, and a task queued
        # and delivered at once is written once, as delivered.
        if self._loop is not None:
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        if self._held:
            return  # held() schedules it again when it ends
        self._scheduled = False
        if not self._pending or self._conn is None:
            return
        batch, self._pending = self._pending, []
        waited = commit_batch(self._conn, batch)
        self.commits += 1
        if self._loop is not None:
            self._last_commit = self._loop.time()
        _resolve(waited)

    def stop(self) -> None:
        self._held = False
        self._flush()
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class RowBatches:
    """Rows written together in the writer's next batch, by `write(conn, rows)`: one dict of rows
    per kind (a statement, say), by key.

    The hot path saves a task three times (queued, delivered, done); most of those saves, and the
    audit events beside them, meet in one batch. A row added under a key that is still pending
    replaces the earlier one, so a task queued and delivered before its batch commits is written
    once, as delivered. Every add of one batch shares one future: its commit.
    """

    def __init__(self, writer: GroupCommitWriter | InlineGroupCommitWriter, kinds: int,
                 write: Callable[[sqlite3.Connection, list[dict[Hashable, Any]]], None]) -> None:
        self._writer = writer
        self._kinds = kinds
        self._write = write
        self._lock = threading.Lock()  # the threaded writer takes a batch while the loop adds
        self._pending: list[dict[Hashable, Any]] | None = None
        self._future: asyncio.Future[Any] | None = None
        self._serial = itertools.count()

    def add(self, kind: int, row: Any, key: Hashable | None = None,
            unless_pending: int | None = None) -> asyncio.Future[Any]:
        """Queues row under kind (rows with the same key: the last one wins). With
        unless_pending: under that kind instead while key has a row pending there."""
        with self._lock:
            pending = self._pending
            if pending is None or self._future is None:
                pending = self._pending = [{} for _ in range(self._kinds)]
                self._future = self._writer.write(self._op(pending))
            if unless_pending is not None and key in pending[unless_pending]:
                kind = unless_pending
            pending[kind][next(self._serial) if key is None else key] = row
            return self._future

    def _op(self, pending: list[dict[Hashable, Any]]) -> Op:
        def op(conn: sqlite3.Connection) -> None:
            with self._lock:
                if self._pending is pending:
                    self._pending = None
            self._write(conn, pending)
        return op


def commit_batch(conn: sqlite3.Connection,
                 batch: list[tuple[Op, Any]]) -> list[tuple[Any, Any, BaseException | None]]:
    """Runs a batch in one transaction; returns the outcomes somebody waits for."""
    outcomes: list[tuple[Any, Any, BaseException | None]] = []
    try:
        conn.execute("BEGIN IMMEDIATE")
        for op, fut in batch:
            outcomes.append((fut, op(conn), None))
        conn.execute("COMMIT")
    except Exception:
        # Optimistic batching failed: roll back and run each op in its own transaction,
        # so that one bad op fails alone and the others still land.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        outcomes = [_commit_one(conn, op, fut) for op, fut in batch]
    for fut, _, exc in outcomes:
        if exc is not None and fut is None:  # nobody waits for it, so say it here
            log.error("background write failed: %s", exc)
    return [o for o in outcomes if o[0] is not None]


def _commit_one(conn: sqlite3.Connection, op: Op, fut: Any) -> tuple[Any, Any, BaseException | None]:
    try:
        conn.execute("BEGIN IMMEDIATE")
        value = op(conn)
        conn.execute("COMMIT")
        return fut, value, None
    except Exception as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        return fut, None, exc


def checkpoint(conn: sqlite3.Connection) -> int:
    """Copies the WAL into the database without blocking the writer (run off the loop);
    returns how many bytes the WAL holds (its file does not shrink when it starts over)."""
    _, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    return max(0, int(frames)) * (page_size + 24)  # a frame: its header and one page


def background_priority() -> None:
    """For a thread that copies the WAL: on a server pinned to one core it competes with the
    event loop for it, copying tens of MB at a time under load; at a lower priority the loop's
    work goes first when both want the core (Linux: nice is per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10))
    except (AttributeError, OSError):  # not Linux, or not allowed: the default priority
        pass


def _noop(conn: sqlite3.Connection) -> None:
    return None


def _resolve(outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for fut, value, exc in outcomes:
        if fut.done():
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)
