"""Schedules: a job made at cron slots, once at a time, or every N seconds.

Nothing is resolved when a schedule is made, only checked: each run makes a job with
Jobs.create, which resolves the selector then, so machines added since are included. Every
node runs `run_due` each sweep; a due slot is taken by compare and set on the schedule's
`next_ms` (store/schedule_sql.py), so it runs once for the fleet. A slot found long past (the
server was down, or busy) runs once, and the schedule goes on from the first slot after now:
missed slots are not made up one by one.

Overlap: when a slot comes while the job of the schedule's previous run is still running (or
paused), the slot is skipped and recorded (`skipped`, `last_error`, an audit event), never
stacked. Separate schedules are independent of each other.
"""

from __future__ import annotations

import json
import logging
from typing import Any
from zoneinfo import ZoneInfo

from dutserver.config import Settings
from dutserver.core import job_body, selectors, slots, windows
from dutserver.core.clock import Clock
from dutserver.core.errors import ApiError
from dutserver.core.jobs import Jobs
from dutserver.core.model import ScheduleRecord
from dutserver.core.ports import Store
from dutserver.core.views import iso

log = logging.getLogger("dutserver.schedules")

FIELDS = frozenset({"name", "job", "cron", "at", "every_s", "tz", "windows", "enabled"})
MAX_EVERY_S = 366 * 86400


class Schedules:
    def __init__(self, settings: Settings, store: Store, clock: Clock, jobs: Jobs) -> None:
        self.s = settings
        self.store = store
        self.clock = clock
        self.jobs = jobs
        self.zone = settings.zone

    # --- making one --------------------------------------------------------------------------

    async def create(self, body: dict[str, Any], actor: str,
                     address: str | None) -> dict[str, Any]:
        unknown = set(body) - FIELDS
        if unknown:
            raise ApiError(400, f"Unknown field {sorted(unknown)[0]!r} (a schedule has "
                                f"{', '.join(sorted(FIELDS))})")
        now = self.clock.now_ms()
        name = body.get("name", "")
        if not isinstance(name, str) or len(name) > 200 or not name.isprintable():
            raise ApiError(400, "name must be printable text of at most 200 characters")
        tz_name = body.get("tz", self.zone)
        tz = windows.zone(tz_name)
        cron, at_ms, every_ms, next_ms = self._when(body, tz, now)
        job = body.get("job")
        if not isinstance(job, dict):
            raise ApiError(400, 'job must be a job\'s body: {"task": {...}, "targets": [...] '
                                'or "selector": "..."} and its wave settings')
        if "windows" in job or "tz" in job:
            raise ApiError(400, "windows and tz go on the schedule (every run's job gets "
                                "them), not in its job")
        await self.check_job(job, now)
        stored = job_body.stored_windows(body.get("windows"), None, tz_name, now)
        enabled = body.get("enabled", True)
        if not isinstance(enabled, bool):
            raise ApiError(400, "enabled must be true or false")
        schedule_id = await self.store.add_schedule(
            name, actor, now, json.dumps(job), cron, at_ms, every_ms, tz_name, stored,
            next_ms if enabled else None, enabled)
        when = f"cron {cron}" if cron else (f"at {iso(at_ms)}" if at_ms is not None
                                            else f"every {body['every_s']} s")
        self.store.audit(actor, "schedule_create",
                         f"schedule {schedule_id}{f' ({name})' if name else ''}: "
                         f"{job['task']['type']} {when} ({tz_name})"
                         + (", windows" if stored else "") + ("" if enabled else ", disabled"),
                         address)
        return await self.view(schedule_id)

    def _when(self, body: dict[str, Any], tz: ZoneInfo,
              now: int) -> tuple[str | None, int | None, int | None, int]:
        """(cron, at_ms, every_ms, the first slot) from exactly one of cron, at, every_s."""
        given = [k for k in ("cron", "at", "every_s") if body.get(k) is not None]
        if len(given) != 1:
            raise ApiError(400, "say when with exactly one of cron (recurring), at (once) or "
                                "every_s (every N seconds)")
        if given[0] == "cron":
            cron = slots.parse_cron(body["cron"], tz, now)
            first = slots.next_cron(cron, tz, now)
            assert first is not None  # parse_cron refuses one that never fires
            return cron, None, None, first
        if given[0] == "at":
            at_ms = slots.parse_at(body["at"], tz, now)
            return None, at_ms, None, at_ms
        every = body["every_s"]
        least = self.s.schedule_min_interval_s
        if isinstance(every, bool) or not isinstance(every, (int, float)) or \
                not least <= every <= MAX_EVERY_S:
            raise ApiError(400, f"every_s must be a number of seconds from {least:g} to one "
                                "year")
        every_ms = int(every * 1000)
        return None, None, every_ms, now + every_ms

    async def check_job(self, job: dict[str, Any], now: int) -> None:
        """Refuses a job body every run would refuse; a selector is only parsed (what it
        matches is decided at each run), named targets must exist now."""
        spec = job_body.check(job, self.s.task_expiry_s, self.zone, now)
        job_body.check_counts(job)
        selector, targets = job.get("selector"), job.get("targets")
        if selector is not None:
            if targets is not None:
                raise ApiError(400, "give targets or a selector, not both")
            selectors.parse(selector)
        else:
            await self.jobs.resolve(targets, None, spec.task["type"])

    # --- running them ------------------------------------------------------------------------

    def _following(self, rec: ScheduleRecord, after_ms: int) -> int | None:
        """The first slot strictly after after_ms; None for a once schedule."""
        if rec.cron is not None:
            return slots.next_cron(rec.cron, ZoneInfo(rec.tz), after_ms)
        if rec.every_ms is not None:
            return slots.next_every(rec.created_ms, rec.every_ms, after_ms)
        return None

    async def run_due(self) -> None:
        """Every sweep, on every node: each due slot is run by the node that takes it."""
        now = self.clock.now_ms()
        for rec in await self.store.due_schedules(now):
            assert rec.next_ms is not None
            if not await self.store.claim_schedule_run(rec.id, rec.next_ms,
                                                       self._following(rec, now), now):
                continue  # another node took this slot
            try:
                await self._run(rec, rec.next_ms, now)
            except Exception:
                log.exception("schedule %d: its run failed", rec.id)

    def _missed(self, rec: ScheduleRecord, slot_ms: int, now: int) -> int:
        """How many later slots also passed before now (they are not run: this run is their
        one run)."""
        if rec.every_ms is not None:
            return (now - slot_ms) // rec.every_ms
        missed, at = 0, slot_ms
        while missed < 1000:
            following = self._following(rec, at)
            if following is None or following > now:
                break
            missed, at = missed + 1, following
        return missed

    async def _run(self, rec: ScheduleRecord, slot_ms: int, now: int) -> None:
        missed = self._missed(rec, slot_ms, now)
        slot = f"the run of {iso(slot_ms)}" + (
            f" (late by {(now - slot_ms) / 1000:.1f} s; {missed} later slot(s) missed "
            "meanwhile, run once with it)" if missed else "")
        # Its newest job, read after the claim (the node that ran the slot before may not
        # have recorded it as the schedule's last job yet).
        for last in await self.store.jobs(None, None, 1, rec.id):
            if last.state in ("running", "paused"):
                await self._skip(rec, slot, f"job {last.id} of the previous run is still "
                                            f"{last.state}", now)
                return
        body = json.loads(rec.job)
        if rec.windows:
            body.update(json.loads(rec.windows))
        try:
            view = await self.jobs.create(body, rec.created_by, None, schedule_id=rec.id)
        except ApiError as exc:
            await self._skip(rec, slot, f"the job was refused: {exc.msg}", now)
            return
        await self.store.schedule_ran(rec.id, int(view["id"]), now)
        self.store.audit("dutserver", "schedule_run",
                         f"schedule {rec.id}: job {view['id']} for {slot}", None)

    async def _skip(self, rec: ScheduleRecord, slot: str, why: str, now: int) -> None:
        await self.store.schedule_skipped(rec.id, why, now)
        self.store.audit("dutserver", "schedule_skip",
                         f"schedule {rec.id}: {slot} skipped: {why}", None)
        log.info("schedule %d: %s skipped: %s", rec.id, slot, why)

    # --- admins' actions ---------------------------------------------------------------------

    async def _get(self, schedule_id: int) -> ScheduleRecord:
        rec = await self.store.schedule(schedule_id)
        if rec is None:
            raise ApiError(404, f"Unknown schedule: {schedule_id}")
        return rec

    async def set_enabled(self, schedule_id: int, enabled: bool, actor: str,
                          address: str | None) -> dict[str, Any]:
        rec = await self._get(schedule_id)
        now = self.clock.now_ms()
        next_ms = None
        if enabled:  # from now on: slots that passed while it was off are not run
            if rec.at_ms is not None:
                if rec.last_run_ms is not None or rec.at_ms <= now:
                    raise ApiError(409, f"Schedule {schedule_id} was to run once, at "
                                        f"{iso(rec.at_ms)}: that time has passed")
                next_ms = rec.at_ms
            else:
                next_ms = self._following(rec, now)
        if not await self.store.set_schedule_enabled(schedule_id, enabled, next_ms, now):
            await self._get(schedule_id)  # 404 if it was deleted meanwhile
            raise ApiError(409, f"Schedule {schedule_id} is already "
                                f"{'enabled' if enabled else 'disabled'}")
        action = "enable" if enabled else "disable"
        self.store.audit(actor, f"schedule_{action}", f"schedule {schedule_id}", address)
        return await self.view(schedule_id)

    async def delete(self, schedule_id: int, actor: str, address: str | None) -> None:
        """It never runs again and leaves the listings; its jobs stay (and keep running)."""
        if not await self.store.delete_schedule(schedule_id, self.clock.now_ms()):
            raise ApiError(404, f"Unknown schedule: {schedule_id}")
        self.store.audit(actor, "schedule_delete", f"schedule {schedule_id}", address)

    # --- what they look like -----------------------------------------------------------------

    async def view(self, schedule_id: int) -> dict[str, Any]:
        return schedule_view(await self._get(schedule_id), self.clock.now_ms())

    async def listing(self, before_id: int | None, limit: int) -> list[dict[str, Any]]:
        now = self.clock.now_ms()
        return [schedule_view(r, now) for r in await self.store.schedules(before_id, limit)]

    async def runs(self, schedule_id: int, before_id: int | None,
                   limit: int) -> list[dict[str, Any]]:
        await self._get(schedule_id)
        return await self.jobs.listing(None, before_id, limit, schedule_id)


def schedule_view(rec: ScheduleRecord, now_ms: int) -> dict[str, Any]:
    kind = "cron" if rec.cron is not None else ("once" if rec.at_ms is not None else "every")
    stored = json.loads(rec.windows) if rec.windows else None
    return {"id": rec.id, "name": rec.name, "created_by": rec.created_by,
            "created_at": iso(rec.created_ms), "updated_at": iso(rec.updated_ms),
            "job": json.loads(rec.job), "kind": kind, "cron": rec.cron, "at": iso(rec.at_ms),
            "every_s": None if rec.every_ms is None else rec.every_ms / 1000, "tz": rec.tz,
            "windows": stored["windows"] if stored else None,
            "window": job_body.window_view(rec.windows, now_ms), "enabled": rec.enabled,
            "next_run_at": iso(rec.next_ms), "last_run_at": iso(rec.last_run_ms),
            "last_job_id": rec.last_job_id, "runs": rec.runs, "skipped": rec.skipped,
            "last_skip_at": iso(rec.last_skip_ms), "last_error": rec.last_error}
