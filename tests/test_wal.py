"""The SQLite WAL stays bounded under steady writes. A checkpoint on the reader thread never
caught up with a writer that commits all the time, and a WAL that is never caught up never
starts over: it grew by some 5 KB per round trip for as long as the load lasted (850 MB after
150,000 round trips), and the server's memory with its index."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from agent_support import Admin
from support import start_server, wait_until

from dutserver.core.model import Task, TaskState
from dutserver.store.sqlite import SqliteStore as Store
from dutserver.store.writer import InlineGroupCommitWriter

RESTART_BYTES = 256 * 1024
PAYLOAD = '{"pad": "' + "x" * 1000 + '"}'  # rows of a busy server's size: a WAL that grows fast


async def steady_writes(db: Store, seconds: float) -> int:
    """Task rows saved and committed back to back, with checkpoints every 20 ms meanwhile, as
    the server does every checkpoint_interval_s. Returns how large the WAL grew."""
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + seconds
    largest = 0

    async def checkpoints() -> None:
        nonlocal largest
        while loop.time() < stop_at:
            await db.checkpoint()
            largest = max(largest, os.stat(f"{db.path}-wal").st_size)
            await asyncio.sleep(0.02)

    async def writes() -> None:
        task_id = 0
        while loop.time() < stop_at:
            batch = []
            for _ in range(20):
                task_id += 1
                task = Task(task_id, f"pc{task_id % 50}", "ping", {}, "admin", 1, 2,
                            TaskState.DONE, 1, 2, {"pong": True}, payload_json=PAYLOAD)
                batch.append(db.save_task(task))
            await asyncio.gather(*batch)
            await asyncio.sleep(0.001)  # a busy server's pace, not a tight loop's

    await asyncio.gather(checkpoints(), writes())
    return largest


@pytest.mark.parametrize("restart_bytes,bounded", [(RESTART_BYTES, True), (1 << 40, False)])
async def test_wal_starts_over_under_steady_writes(tmp_path: Path, restart_bytes: int,
                                                   bounded: bool) -> None:
    db = Store(tmp_path / "dut.db", "NORMAL", 0.0, wal_restart_bytes=restart_bytes)
    await db.open()
    try:
        largest = await steady_writes(db, 2.0)
    finally:
        await db.close()
    if bounded:
        assert largest < 16 * RESTART_BYTES, f"the WAL grew to {largest} bytes"
    else:
        # The same load without the held pass (the check above is one this load can fail).
        assert largest > 64 * RESTART_BYTES, f"the WAL stayed at {largest} bytes"


async def test_commits_are_held_only_while_the_wal_is_long(tmp_path: Path) -> None:
    """The WAL file keeps its size when it starts over, so its size says nothing about how much
    it holds: judged by it, every checkpoint after the first restart held all commits."""
    db = Store(tmp_path / "dut.db", "NORMAL", 0.0, wal_restart_bytes=RESTART_BYTES)
    await db.open()
    writer = db.writer
    assert isinstance(writer, InlineGroupCommitWriter)
    try:
        await asyncio.gather(*(db.save_task(_task(n)) for n in range(1, 2001)))
        await db.checkpoint()  # long: starts over, with commits held once
        assert writer.holds == 1
        wal_file = os.stat(f"{db.path}-wal").st_size
        assert wal_file > RESTART_BYTES
        for n in range(2001, 2011):  # a little more
            await db.save_task(_task(n))
            await db.checkpoint()
        assert writer.holds == 1, "commits were held although the WAL held little"
        assert os.stat(f"{db.path}-wal").st_size == wal_file  # the file did not shrink
    finally:
        await db.close()


def _task(task_id: int) -> Task:
    return Task(task_id, f"pc{task_id % 50}", "ping", {"pad": "x" * 200}, "admin", 1, 2,
                TaskState.DONE, 1, 2, {"pong": True}, payload_json='{"pad": "' + "x" * 200 + '"}')


def test_the_running_server_copies_its_wal_into_the_database(tmp_path: Path) -> None:
    """What is committed reaches the database file while the server runs, every
    checkpoint_interval_s, not only at its stop: a WAL never copied grows without end."""
    server = start_server(tmp_path, "--checkpoint-interval-s", "0.05")
    try:
        admin = Admin(server)
        admin.add_agent("pc1")
        before = server.db.stat().st_size
        for _ in range(20):  # about 1 MB of payloads, queued for an agent that never polls
            admin.enqueue("pc1", {"type": "execute_cmd", "cmd": "x" * 50_000})
        wait_until(lambda: server.db.stat().st_size > before + 500_000, timeout_s=5)
    finally:
        server.stop()
