"""Schedules' table and operations, written once for both stores (store/portable.py), and the
jobs' maintenance windows column.

A schedule is a job body run at cron slots, once, or every so often. Which node runs a due
slot is decided by compare and set on `next_ms`: the node that moves it from the slot it saw
to the following one runs the slot; the others see it moved and do nothing. So a slot runs
once for the fleet, and a slot found long past (the server was down) runs once, then the
schedule goes on from the first slot after now.
"""

from __future__ import annotations


from dutserver.core.model import ScheduleRecord
from dutserver.store.portable import Operations, Row, Steps

SCHEMA = """
    ALTER TABLE jobs ADD COLUMN windows TEXT;
    CREATE INDEX jobs_schedule ON jobs (schedule_id, id);
    CREATE TABLE schedules (
        id {id},
        name TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_ms {int} NOT NULL,
        updated_ms {int} NOT NULL,
        job TEXT NOT NULL,
        cron TEXT,
        at_ms {int},
        every_ms {int},
        tz TEXT NOT NULL,
        windows TEXT,
        next_ms {int},
        last_run_ms {int},
        last_job_id {int},
        runs {int} NOT NULL,
        skipped {int} NOT NULL,
        last_skip_ms {int},
        last_error TEXT,
        enabled {int} NOT NULL,
        deleted {int} NOT NULL
    );
    CREATE INDEX schedules_due ON schedules (next_ms) WHERE enabled = 1 AND deleted = 0
"""

COLUMNS = ("id, name, created_by, created_ms, updated_ms, job, cron, at_ms, every_ms, tz, "
           "windows, next_ms, last_run_ms, last_job_id, runs, skipped, last_skip_ms, "
           "last_error, enabled")
_LIVE = "deleted = 0"


def _schedule(row: Row) -> ScheduleRecord:
    values = list(row)
    values[18] = bool(values[18])  # enabled: an integer in both stores
    return ScheduleRecord(*values)


def create(name: str, created_by: str, now_ms: int, job: str, cron: str | None,
           at_ms: int | None, every_ms: int | None, tz: str, windows: str | None,
           next_ms: int | None, enabled: bool) -> Steps:
    rows = yield ("INSERT INTO schedules (name, created_by, created_ms, updated_ms, job, cron, "
                  "at_ms, every_ms, tz, windows, next_ms, last_run_ms, last_job_id, runs, "
                  "skipped, last_skip_ms, last_error, enabled, deleted) VALUES (?, ?, ?, ?, ?, "
                  "?, ?, ?, ?, ?, ?, NULL, NULL, 0, 0, NULL, NULL, ?, 0) RETURNING id",
                  (name, created_by, now_ms, now_ms, job, cron, at_ms, every_ms, tz, windows,
                   next_ms, int(enabled)))
    return int(rows[0][0])


def get(schedule_id: int) -> Steps:
    rows = yield (f"SELECT {COLUMNS} FROM schedules WHERE id = ? AND {_LIVE}", (schedule_id,))
    return _schedule(rows[0]) if rows else None


def find(before_id: int | None, limit: int) -> Steps:
    rows = yield (f"SELECT {COLUMNS} FROM schedules WHERE {_LIVE} AND id < ? "
                  "ORDER BY id DESC LIMIT ?",
                  (before_id if before_id is not None else 2**63 - 1, limit))
    return [_schedule(r) for r in rows]


def due(now_ms: int) -> Steps:
    rows = yield (f"SELECT {COLUMNS} FROM schedules WHERE enabled = 1 AND {_LIVE} "
                  "AND next_ms <= ? ORDER BY next_ms, id", (now_ms,))
    return [_schedule(r) for r in rows]


def claim(schedule_id: int, seen_next_ms: int, following_ms: int | None,
          now_ms: int) -> Steps:
    """Takes the slot seen (compare and set on next_ms): True for the one node that moves
    next_ms on to the following slot (None: none, a once schedule)."""
    rows = yield ("UPDATE schedules SET next_ms = ?, last_run_ms = ?, updated_ms = ? "
                  f"WHERE id = ? AND next_ms = ? AND enabled = 1 AND {_LIVE} RETURNING id",
                  (following_ms, now_ms, now_ms, schedule_id, seen_next_ms))
    return bool(rows)


def ran(schedule_id: int, job_id: int, now_ms: int) -> Steps:
    yield ("UPDATE schedules SET last_job_id = ?, runs = runs + 1, last_error = NULL, "
           "updated_ms = ? WHERE id = ?", (job_id, now_ms, schedule_id))


def skip(schedule_id: int, why: str, now_ms: int) -> Steps:
    yield ("UPDATE schedules SET skipped = skipped + 1, last_skip_ms = ?, last_error = ?, "
           "updated_ms = ? WHERE id = ?", (now_ms, why, now_ms, schedule_id))


def set_enabled(schedule_id: int, enabled: bool, next_ms: int | None, now_ms: int) -> Steps:
    """Switches it on (with its next slot) or off (compare and set: False when it already
    was, or is gone)."""
    rows = yield ("UPDATE schedules SET enabled = ?, next_ms = ?, updated_ms = ? "
                  f"WHERE id = ? AND enabled = ? AND {_LIVE} RETURNING id",
                  (int(enabled), next_ms, now_ms, schedule_id, int(not enabled)))
    return bool(rows)


def delete(schedule_id: int, now_ms: int) -> Steps:
    """Gone from the listings and never run again; the jobs it made keep its id."""
    rows = yield ("UPDATE schedules SET deleted = 1, enabled = 0, next_ms = NULL, "
                  f"updated_ms = ? WHERE id = ? AND {_LIVE} RETURNING id", (now_ms, schedule_id))
    return bool(rows)


class ScheduleStore(Operations):
    """The Store port's schedule methods (core/ports.py: SchedulePort), for both stores."""


    async def add_schedule(self, name: str, created_by: str, now_ms: int, job: str,
                           cron: str | None, at_ms: int | None, every_ms: int | None, tz: str,
                           windows: str | None, next_ms: int | None, enabled: bool) -> int:
        return int(await self._steps(create, name, created_by, now_ms, job, cron, at_ms,
                                     every_ms, tz, windows, next_ms, enabled))

    async def schedule(self, schedule_id: int) -> ScheduleRecord | None:
        found: ScheduleRecord | None = await self._steps_read(get, schedule_id)
        return found

    async def schedules(self, before_id: int | None, limit: int) -> list[ScheduleRecord]:
        return list(await self._steps_read(find, before_id, limit))

    async def due_schedules(self, now_ms: int) -> list[ScheduleRecord]:
        return list(await self._steps_read(due, now_ms))

    async def claim_schedule_run(self, schedule_id: int, seen_next_ms: int,
                                 following_ms: int | None, now_ms: int) -> bool:
        return bool(await self._steps(claim, schedule_id, seen_next_ms, following_ms, now_ms))

    async def schedule_ran(self, schedule_id: int, job_id: int, now_ms: int) -> None:
        await self._steps(ran, schedule_id, job_id, now_ms)

    async def schedule_skipped(self, schedule_id: int, why: str, now_ms: int) -> None:
        await self._steps(skip, schedule_id, why, now_ms)

    async def set_schedule_enabled(self, schedule_id: int, enabled: bool, next_ms: int | None,
                                   now_ms: int) -> bool:
        return bool(await self._steps(set_enabled, schedule_id, enabled, next_ms, now_ms))

    async def delete_schedule(self, schedule_id: int, now_ms: int) -> bool:
        return bool(await self._steps(delete, schedule_id, now_ms))
