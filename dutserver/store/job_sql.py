"""Fleet jobs' tables and operations, written once for both stores (store/portable.py).

A job is one task body for many targets, in waves: `job_targets` says which wave each target
is in and, once its wave is released, the id of its task (ids are written before the tasks
exist, so that a node that dies between the two leaves ids another node can fill). Every
decision that two nodes could both take (release the next wave, pause on the failure budget,
finish) is a compare-and-set on the job's row: one of them wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dutserver.core.model import JobRecord
from dutserver.store.portable import Operations, Row, Steps

SCHEMA = """
    CREATE TABLE jobs (
        id {id},
        created_by TEXT NOT NULL,
        created_ms {int} NOT NULL,
        updated_ms {int} NOT NULL,
        state TEXT NOT NULL,
        task TEXT NOT NULL,
        selector TEXT,
        offline TEXT NOT NULL,
        expires_s {int} NOT NULL,
        waves {int} NOT NULL,
        pause_ms {int},
        max_failures {int},
        nonzero_fails {int} NOT NULL,
        released {int} NOT NULL,
        released_ms {int},
        next_ms {int},
        reason TEXT,
        schedule_id {int},
        finished_ms {int},
        targets {int} NOT NULL
    );
    CREATE INDEX jobs_state ON jobs (state, id);
    CREATE TABLE job_targets (
        job_id {int} NOT NULL,
        agent TEXT NOT NULL,
        wave {int} NOT NULL,
        task_id {int},
        skipped {int} NOT NULL,
        PRIMARY KEY (job_id, agent)
    );
    CREATE INDEX job_targets_task ON job_targets (task_id)
"""

COLUMNS = ("id, created_by, created_ms, updated_ms, state, task, selector, offline, expires_s, "
           "waves, pause_ms, max_failures, nonzero_fails, released, released_ms, next_ms, "
           "reason, schedule_id, finished_ms, targets, windows")
ACTIVE = ("running", "paused")

# A task of a job failed: the agent said so, no result came, or (nonzero_fails) it ran a
# command that exited non-zero. Both engines: json_extract is rewritten for PostgreSQL.
FAILED = ("(t.state IN ('failed', 'expired') OR (t.state = 'done' AND j.nonzero_fails = 1 AND "
          "coalesce(CAST(json_extract(t.result, '$.status_code') AS TEXT), '0') <> '0'))")


def _job(row: Row) -> JobRecord:
    values = list(row)
    values[12] = bool(values[12])  # nonzero_fails: an integer in both stores
    return JobRecord(*values)


def create(created_by: str, now_ms: int, task: str, selector: str | None, offline: str,
           expires_s: int, pause_ms: int | None, max_failures: int | None, nonzero_fails: bool,
           waves: Sequence[Sequence[str]], schedule_id: int | None,
           windows: str | None) -> Steps:
    """The job and its targets, wave by wave (nothing released yet). Returns its id."""
    rows = yield (f"INSERT INTO jobs ({COLUMNS[4:]}) VALUES (?, ?, ?, 'running', ?, ?, ?, ?, "
                  "?, ?, ?, ?, 0, NULL, NULL, NULL, ?, NULL, ?, ?) RETURNING id",
                  (created_by, now_ms, now_ms, task, selector, offline, expires_s, len(waves),
                   pause_ms, max_failures, int(nonzero_fails), schedule_id,
                   sum(len(w) for w in waves), windows))
    job_id = int(rows[0][0])
    for number, agents in enumerate(waves):
        for agent in agents:
            yield ("INSERT INTO job_targets (job_id, agent, wave, task_id, skipped) "
                   "VALUES (?, ?, ?, NULL, 0)", (job_id, agent, number))
    return job_id


def get(job_id: int) -> Steps:
    rows = yield (f"SELECT {COLUMNS} FROM jobs WHERE id = ?", (job_id,))
    return _job(rows[0]) if rows else None


def find(state: str | None, before_id: int | None, limit: int,
         schedule_id: int | None = None) -> Steps:
    clauses, args = [], []  # type: list[str], list[Any]
    if state is not None:
        clauses.append("state = ?")
        args.append(state)
    if schedule_id is not None:
        clauses.append("schedule_id = ?")
        args.append(schedule_id)
    if before_id is not None:
        clauses.append("id < ?")
        args.append(before_id)
    where = " WHERE " + " AND ".join(clauses) if clauses else ""
    rows = yield (f"SELECT {COLUMNS} FROM jobs{where} ORDER BY id DESC LIMIT ?", (*args, limit))
    return [_job(r) for r in rows]


def active_ids() -> Steps:
    rows = yield ("SELECT id FROM jobs WHERE state IN ('running', 'paused') ORDER BY id", ())
    return [int(r[0]) for r in rows]


def progress(job_id: int) -> Steps:
    """Per wave: (wave, state, failed, count) where state is the task's, `skipped`, or
    `waiting` (its wave is not released, or its task is not stored yet)."""
    rows = yield ("SELECT jt.wave, CASE WHEN jt.skipped = 1 THEN 'skipped' "
                  "WHEN t.state IS NULL THEN 'waiting' ELSE t.state END, "
                  f"sum(CASE WHEN {FAILED} THEN 1 ELSE 0 END), count(*) "
                  "FROM job_targets jt JOIN jobs j ON j.id = jt.job_id "
                  "LEFT JOIN tasks t ON t.id = jt.task_id WHERE jt.job_id = ? "
                  "GROUP BY 1, 2 ORDER BY 1, 2", (job_id,))
    return [(int(r[0]), str(r[1]), int(r[2] or 0), int(r[3])) for r in rows]


def wave_targets(job_id: int, wave: int) -> Steps:
    """(agent, task_id) of one wave's targets that are not skipped."""
    rows = yield ("SELECT agent, task_id FROM job_targets WHERE job_id = ? AND wave = ? "
                  "AND skipped = 0 ORDER BY agent", (job_id, wave))
    return [(str(r[0]), r[1]) for r in rows]


def missing_tasks(job_id: int) -> Steps:
    """(agent, task_id) given ids in released waves whose task was never stored (the node
    that released them died before its commit)."""
    rows = yield ("SELECT jt.agent, jt.task_id FROM job_targets jt JOIN jobs j ON j.id = "
                  "jt.job_id LEFT JOIN tasks t ON t.id = jt.task_id WHERE jt.job_id = ? "
                  "AND jt.task_id IS NOT NULL AND t.id IS NULL", (job_id,))
    return [(str(r[0]), int(r[1])) for r in rows]


def release(job_id: int, wave: int, assigned: Sequence[tuple[str, int]],
            skipped: Sequence[str], node: str, now_ms: int) -> Steps:
    """Claims wave `wave` for release (compare and set on `released`) and records its
    targets' task ids and the skipped ones. False when another node released it first."""
    rows = yield ("UPDATE jobs SET released = ?, released_ms = ?, next_ms = NULL, "
                  "updated_ms = ?, reason = NULL WHERE id = ? AND released = ? "
                  "AND state = 'running' RETURNING id", (wave + 1, now_ms, now_ms, job_id, wave))
    if not rows:
        return False
    for agent, task_id in assigned:
        yield ("UPDATE job_targets SET task_id = ? WHERE job_id = ? AND agent = ?",
               (task_id, job_id, agent))
    for agent in skipped:
        yield ("UPDATE job_targets SET skipped = 1 WHERE job_id = ? AND agent = ?",
               (job_id, agent))
    return True


def refill(job_id: int, released_ms: int, now_ms: int) -> Steps:
    """Claims the re-creation of a released wave's missing tasks (one node does it)."""
    rows = yield ("UPDATE jobs SET released_ms = ? WHERE id = ? AND released_ms = ? "
                  "RETURNING id", (now_ms, job_id, released_ms))
    return bool(rows)


def set_state(job_id: int, before: Sequence[str], state: str, reason: str | None,
              now_ms: int, next_ms: int | None = None) -> Steps:
    """Moves the job from one of `before` to `state` (compare and set); False when it was in
    none of them (another client or node acted first)."""
    marks = ", ".join("?" for _ in before)
    finished = now_ms if state in ("done", "aborted") else None
    rows = yield (f"UPDATE jobs SET state = ?, reason = ?, updated_ms = ?, next_ms = ?, "
                  f"finished_ms = ? WHERE id = ? AND state IN ({marks}) RETURNING id",
                  (state, reason, now_ms, next_ms, finished, job_id, *before))
    return bool(rows)


def schedule_next(job_id: int, next_ms: int, now_ms: int) -> Steps:
    """A pause between waves: the next one goes out at next_ms."""
    rows = yield ("UPDATE jobs SET next_ms = ?, updated_ms = ? WHERE id = ? AND "
                  "state = 'running' AND next_ms IS NULL RETURNING id", (next_ms, now_ms, job_id))
    return bool(rows)


def raise_budget(job_id: int, max_failures: int | None, now_ms: int) -> Steps:
    """"Continue despite failures": the budget grows to what failed so far (or goes)."""
    rows = yield ("UPDATE jobs SET max_failures = ?, updated_ms = ? WHERE id = ? RETURNING id",
                  (max_failures, now_ms, job_id))
    return bool(rows)


def targets(job_id: int, after: str | None, limit: int) -> Steps:
    """The job's targets with their tasks, by agent name, a page at a time."""
    rows = yield ("SELECT jt.agent, jt.wave, jt.task_id, jt.skipped, t.state, t.result "
                  "FROM job_targets jt LEFT JOIN tasks t ON t.id = jt.task_id "
                  "WHERE jt.job_id = ? AND jt.agent > ? ORDER BY jt.agent LIMIT ?",
                  (job_id, after or "", limit))
    return [tuple(r) for r in rows]


def queued_task_ids(job_id: int) -> Steps:
    rows = yield ("SELECT jt.task_id FROM job_targets jt JOIN tasks t ON t.id = jt.task_id "
                  "WHERE jt.job_id = ? AND t.state = 'queued'", (job_id,))
    return [int(r[0]) for r in rows]


def results(job_id: int) -> Steps:
    """(agent, task state, result JSON) of every target whose task ended, for the buckets."""
    rows = yield ("SELECT jt.agent, t.state, t.result FROM job_targets jt JOIN tasks t ON "
                  "t.id = jt.task_id WHERE jt.job_id = ? AND t.state IN "
                  "('done', 'failed', 'expired', 'cancelled')", (job_id,))
    return [(str(r[0]), str(r[1]), r[2]) for r in rows]


class JobStore(Operations):
    """The Store port's job methods (core/ports.py: JobPort), for both stores."""


    async def add_job(self, created_by: str, now_ms: int, task: str, selector: str | None,
                      offline: str, expires_s: int, pause_ms: int | None,
                      max_failures: int | None, nonzero_fails: bool,
                      waves: Sequence[Sequence[str]], schedule_id: int | None,
                      windows: str | None = None) -> int:
        return int(await self._steps(create, created_by, now_ms, task, selector, offline,
                                     expires_s, pause_ms, max_failures, nonzero_fails, waves,
                                     schedule_id, windows))

    async def job(self, job_id: int) -> JobRecord | None:
        found: JobRecord | None = await self._steps_read(get, job_id)
        return found

    async def jobs(self, state: str | None, before_id: int | None, limit: int,
                   schedule_id: int | None = None) -> list[JobRecord]:
        return list(await self._steps_read(find, state, before_id, limit, schedule_id))

    async def active_jobs(self) -> list[int]:
        return list(await self._steps_read(active_ids))

    async def job_progress(self, job_id: int) -> list[tuple[int, str, int, int]]:
        return list(await self._steps_read(progress, job_id))

    async def job_wave(self, job_id: int, wave: int) -> list[tuple[str, int | None]]:
        return list(await self._steps_read(wave_targets, job_id, wave))

    async def job_missing_tasks(self, job_id: int) -> list[tuple[str, int]]:
        return list(await self._steps_read(missing_tasks, job_id))

    async def release_wave(self, job_id: int, wave: int, assigned: Sequence[tuple[str, int]],
                           skipped: Sequence[str], node: str, now_ms: int) -> bool:
        return bool(await self._steps(release, job_id, wave, assigned, skipped, node, now_ms))

    async def claim_refill(self, job_id: int, released_ms: int, now_ms: int) -> bool:
        return bool(await self._steps(refill, job_id, released_ms, now_ms))

    async def set_job_state(self, job_id: int, before: Sequence[str], state: str,
                            reason: str | None, now_ms: int, next_ms: int | None = None) -> bool:
        return bool(await self._steps(set_state, job_id, tuple(before), state, reason, now_ms,
                                      next_ms))

    async def schedule_wave(self, job_id: int, next_ms: int, now_ms: int) -> bool:
        return bool(await self._steps(schedule_next, job_id, next_ms, now_ms))

    async def set_job_budget(self, job_id: int, max_failures: int | None, now_ms: int) -> bool:
        return bool(await self._steps(raise_budget, job_id, max_failures, now_ms))

    async def job_targets(self, job_id: int, after: str | None, limit: int) -> list[tuple[Any, ...]]:
        return list(await self._steps_read(targets, job_id, after, limit))

    async def job_queued_tasks(self, job_id: int) -> list[int]:
        return list(await self._steps_read(queued_task_ids, job_id))

    async def job_results(self, job_id: int) -> list[tuple[str, str, str | None]]:
        return list(await self._steps_read(results, job_id))
