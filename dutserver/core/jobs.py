"""Fleet jobs: one task for many agents (a list or a selector), in waves with a failure budget.

A job's decisions are taken on the store's row, by compare and set, so that several nodes
take each one once: a wave is released by the node that claims it (its task ids recorded in
the same transaction, the tasks inserted right after); the job pauses the moment its budget is
exceeded (counted from the stored outcomes, so two nodes that each saw one failure still see
both); nothing of the next wave is sent before the current one ended within budget.

When is a job looked at: when one of its tasks ends on the node that released it (the tasks
carry a JobWaiter, told like a blocking submit's waiter), and every sweep on every node (a
task that ended elsewhere, a node that died mid-release, a pause between waves that is over).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from typing import Any

from dutserver.config import Settings
from dutserver.core import buckets, selectors, windows
from dutserver.core.clock import Clock
from dutserver.core.credentials import REVOKED
from dutserver.core.errors import ApiError
from dutserver.core.job_body import check, count, job_view, plan_waves
from dutserver.core.model import FINAL_STATES, JobRecord, Task
from dutserver.core.ports import Store
from dutserver.core.tasks import Tasks

log = logging.getLogger("dutserver.jobs")

STATES = ("running", "paused", "done", "aborted")
_ENDED = frozenset(s.value for s in FINAL_STATES) | {"skipped"}
LOOK_DELAY_S = 0.02
REFILL_AFTER_MS = 10_000  # a released wave whose tasks are not stored this long: its node died


class JobWaiter:
    """Told when one of a job's tasks ends on this node (Task.waiter): the job is looked at."""

    __slots__ = ("job_id", "jobs")

    def __init__(self, jobs: Jobs, job_id: int) -> None:
        self.jobs = jobs
        self.job_id = job_id

    def settle(self, task: Task, outcome: object) -> None:
        task.waiter = None
        self.jobs.look_at(self.job_id)


class Jobs:
    def __init__(self, settings: Settings, store: Store, clock: Clock, tasks: Tasks) -> None:
        self.s = settings
        self.store = store
        self.clock = clock
        self.tasks = tasks
        self.zone = settings.zone  # of windows that name none
        self._looking: dict[int, bool] = {}  # job id -> looked at again when the look ends

    # --- making one --------------------------------------------------------------------------

    async def create(self, body: dict[str, Any], actor: str, address: str | None,
                     schedule_id: int | None = None) -> dict[str, Any]:
        spec = check(body, self.s.task_expiry_s, self.zone, self.clock.now_ms())
        task = spec.task
        selector_text = body.get("selector")
        targets = await self.resolve(body.get("targets"), selector_text, task["type"])
        waves = plan_waves(targets, body.get("canary"), body.get("wave"))
        budget = body.get("max_failures")
        max_failures = None if budget is None else count(budget, len(targets), "max_failures")
        if max_failures is not None and max_failures > len(targets):
            raise ApiError(400, f"max_failures of {max_failures} is more than the "
                                f"{len(targets)} targets")
        job_id = await self.store.add_job(
            actor, self.clock.now_ms(), json.dumps(task), selector_text, spec.offline,
            int(spec.expires_s), spec.pause_ms, max_failures, spec.nonzero_fails, waves,
            schedule_id, spec.windows)
        self.store.audit(actor, "job_create",
                         f"job {job_id}: {task['type']} to {len(targets)} agents in "
                         f"{len(waves)} wave(s)" + (f" ({selector_text})" if selector_text else "")
                         + (f" (schedule {schedule_id})" if schedule_id is not None else ""),
                         address)
        await self._release(job_id, 0)
        return await self.view(job_id)

    async def resolve(self, targets: object, selector_text: object, kind: str) -> list[str]:
        """The agents a job goes to: a list of names, or those a selector matches now (not
        revoked, and offering the task's type when they said what they offer)."""
        auth = self.tasks.auth
        if selector_text is not None:
            if targets is not None:
                raise ApiError(400, "give targets or a selector, not both")
            selector = selectors.parse(selector_text)
            chosen = []
            for record in await self.store.agents(False):  # facts and labels: small
                acc = auth.accounts.get(record.name)
                if acc is None or acc.secret_hash == REVOKED:
                    continue
                if acc.capabilities is not None and kind not in acc.capabilities:
                    continue
                facts = json.loads(record.facts) if record.facts else {}
                labels = json.loads(record.labels) if record.labels else {}
                if selector.matches(record.name, labels, facts):
                    chosen.append(record.name)
            if not chosen:
                raise ApiError(400, f"The selector {selector_text!r} matches no agent")
            return chosen
        if not isinstance(targets, list) or not targets or not all(
                isinstance(t, str) for t in targets):
            raise ApiError(400, "targets must be a non-empty list of agent names (or give a "
                                "selector)")
        if len(set(targets)) != len(targets):
            raise ApiError(400, "targets must not repeat an agent")
        await auth.knows(targets)
        self.tasks.check(targets, {"type": kind})
        return list(targets)

    async def preview(self, selector_text: object, kind: str | None) -> list[str]:
        return await self.resolve(None, selector_text, kind or "")

    # --- its waves ---------------------------------------------------------------------------

    async def _release(self, job_id: int, wave: int) -> None:
        """Sends wave `wave` if this node wins its claim: offline agents skipped when the job
        says so, and agents gone or unable to run it skipped."""
        job = await self.store.job(job_id)
        if job is None or job.state != "running" or job.released != wave or wave >= job.waves:
            return
        if self._until(job) is None:
            return  # outside its windows: looked at again every sweep until one opens
        body = json.loads(job.task)
        members = [agent for agent, task_id in await self.store.job_wave(job_id, wave)
                   if task_id is None]
        await self.tasks.auth.knows(members)
        online = self.tasks.dispatcher.is_online
        send, skipped = [], []
        for agent in members:
            try:
                self.tasks.check([agent], body)
            except ApiError:
                skipped.append(agent)
                continue
            if job.offline == "skip" and not online(agent) and not await self._online_elsewhere(agent):
                skipped.append(agent)
            else:
                send.append(agent)
        ids = list(await self.store.reserve_task_ids(len(send))) if send else []
        if not await self.store.release_wave(job_id, wave, list(zip(send, ids)), skipped,
                                             self.store.node, self.clock.now_ms()):
            return  # another node released it
        self._send(job, send, ids)
        self.store.audit(job.created_by, "job_wave",
                         f"job {job_id}: wave {wave + 1} of {job.waves} to {len(send)} agents"
                         + (f", {len(skipped)} skipped" if skipped else ""), None)
        if not send:
            self.look_at(job_id)

    async def _online_elsewhere(self, agent: str) -> bool:
        if not self.tasks.fleet:
            return False
        records = await self.store.agents(False, agent)
        return bool(records) and (records[0].online_until_ms or 0) > self.clock.now_ms()

    def _until(self, job: JobRecord) -> float | None:
        """How long a task of the job sent now may stay queued: its expiry, cut one sweep
        before its window closes (the sweep expires it by then); None outside its windows, or
        in their last two sweeps (a task could not be delivered in time)."""
        loaded = windows.load(job.windows)
        if loaded is None:
            return float(job.expires_s)
        now = self.clock.now_ms()
        is_open, closes_ms = windows.open_until(*loaded, now)
        if not is_open:
            return None
        if closes_ms is None:
            return float(job.expires_s)
        left_s = (closes_ms - now) / 1000 - self.s.sweep_interval_s
        if left_s < self.s.sweep_interval_s:
            return None  # it closes before a task could be delivered: wait for the next one
        return min(float(job.expires_s), left_s)

    def _send(self, job: JobRecord, agents: Sequence[str], ids: Sequence[int]) -> None:
        if not agents:
            return
        body = json.loads(job.task)
        try:
            self.tasks.create(agents, body, job.created_by, self._until(job) or 0.001, None,
                              ids=ids, waiter=JobWaiter(self, job.id))
        except ApiError as exc:  # changed since the check: the refill tries again later
            log.warning("job %d: sending a wave failed: %s", job.id, exc.msg)

    # --- looking at a job --------------------------------------------------------------------

    def look_at(self, job_id: int) -> None:
        """Looks at the job soon: once at a time, again if asked meanwhile."""
        if job_id in self._looking:
            self._looking[job_id] = True
            return
        self._looking[job_id] = False
        asyncio.ensure_future(self._look(job_id))

    async def _look(self, job_id: int) -> None:
        try:
            while True:
                # A wave's tasks end in a burst: one look for the ends of a moment, not one
                # per task (each look reads the job's progress over all its targets).
                await asyncio.sleep(LOOK_DELAY_S)
                try:
                    await self.step(job_id)
                except ApiError as exc:
                    log.warning("job %d: %s", job_id, exc.msg)
                except Exception:
                    log.exception("job %d: looking at it failed", job_id)
                if not self._looking.get(job_id):
                    return
                self._looking[job_id] = False
        finally:
            self._looking.pop(job_id, None)

    async def sweep(self) -> None:
        """Every sweep: each running job is looked at (ends seen elsewhere, pauses over)."""
        for job_id in await self.store.active_jobs():
            self.look_at(job_id)

    async def step(self, job_id: int) -> None:
        """One decision for the job, from what is stored: pause on the budget, finish, or
        release the next wave (after its pause)."""
        job = await self.store.job(job_id)
        if job is None or job.state != "running":
            return
        now = self.clock.now_ms()
        progress = await self.store.job_progress(job_id)
        failed = sum(f for _, _, f, _ in progress)
        if job.max_failures is not None and failed > job.max_failures:
            reason = (f"failure budget exceeded: {failed} failed (budget {job.max_failures}); "
                      "nothing more is sent until resumed")
            if await self.store.set_job_state(job_id, ("running",), "paused", reason, now):
                self.store.audit("dutserver", "job_pause", f"job {job_id}: {reason}", None)
            return
        pending = [(w, s) for w, s, _, n in progress if w < job.released and s not in _ENDED]
        if any(s == "waiting" for _, s in pending) and job.released_ms is not None and \
                now - job.released_ms > REFILL_AFTER_MS:
            await self._refill(job, now)
            return
        if pending:
            return
        if job.released >= job.waves:
            if await self.store.set_job_state(job_id, ("running",), "done", None, now):
                self.store.audit("dutserver", "job_done", f"job {job_id}: {failed} failed",
                                 None)
            return
        if job.pause_ms is not None and job.released > 0:
            if job.pause_ms == -1 and job.next_ms is None:  # a resume sets next_ms: go
                reason = f"wave {job.released} of {job.waves} ended: waiting for resume"
                await self.store.set_job_state(job_id, ("running",), "paused", reason, now)
                return
            if job.next_ms is None:
                await self.store.schedule_wave(job_id, now + job.pause_ms, now)
                return
            if now < job.next_ms:
                return
        await self._release(job_id, job.released)

    async def _refill(self, job: JobRecord, now: int) -> None:
        """Tasks of a released wave that were never stored (their node died between the
        claim and the commit): made again, with the ids recorded for them."""
        assert job.released_ms is not None
        if self._until(job) is None:
            return  # its window closed: they go when the next one opens
        if not await self.store.claim_refill(job.id, job.released_ms, now):
            return
        missing = await self.store.job_missing_tasks(job.id)
        await self.tasks.auth.knows([a for a, _ in missing])
        log.warning("job %d: %d tasks of a released wave were never stored; sending them",
                    job.id, len(missing))
        self._send(job, [a for a, _ in missing], [i for _, i in missing])

    # --- admins' actions ---------------------------------------------------------------------

    async def act(self, job_id: int, action: str, actor: str,
                  address: str | None) -> dict[str, Any]:
        job = await self.store.job(job_id)
        if job is None:
            raise ApiError(404, f"Unknown job: {job_id}")
        now = self.clock.now_ms()
        store = self.store
        if action == "pause":
            done = await store.set_job_state(job_id, ("running",), "paused",
                                             f"paused by {actor}", now)
        elif action in ("resume", "continue"):
            if action == "continue":  # despite failures: the budget no longer stops it
                await store.set_job_budget(job_id, None, now)
            # next_ms = now: a pause between waves (timed or manual) is over with this.
            done = await store.set_job_state(job_id, ("paused",), "running", None, now,
                                             next_ms=now)
        elif action == "abort":
            done = await store.set_job_state(job_id, ("running", "paused"), "aborted",
                                             f"aborted by {actor}", now)
            if done:
                for task_id in await store.job_queued_tasks(job_id):
                    try:
                        await self.tasks.cancel(task_id, actor, address)
                    except ApiError:
                        pass  # it left the queue meanwhile: it runs to its end
        else:
            raise ApiError(400, "action must be pause, resume, continue or abort")
        if not done:
            current = await store.job(job_id)
            state = current.state if current is not None else "gone"
            raise ApiError(409, f"Job {job_id} is {state}: it cannot be {action}d"
                           if action != "continue" else f"Job {job_id} is {state}")
        store.audit(actor, f"job_{action}", f"job {job_id}", address)
        if action in ("resume", "continue"):
            self.look_at(job_id)
        return await self.view(job_id)

    # --- what it looks like ------------------------------------------------------------------

    async def view(self, job_id: int) -> dict[str, Any]:
        job = await self.store.job(job_id)
        if job is None:
            raise ApiError(404, f"Unknown job: {job_id}")
        return job_view(job, await self.store.job_progress(job_id), self.clock.now_ms())

    async def listing(self, state: str | None, before_id: int | None, limit: int,
                      schedule_id: int | None = None) -> list[dict[str, Any]]:
        if state is not None and state not in STATES:
            raise ApiError(400, f"Invalid state: use one of {', '.join(STATES)}")
        now = self.clock.now_ms()
        return [job_view(j, await self.store.job_progress(j.id), now)
                for j in await self.store.jobs(state, before_id, limit, schedule_id)]

    async def targets(self, job_id: int, after: str | None, limit: int) -> list[dict[str, Any]]:
        rows = await self.store.job_targets(job_id, after, limit)
        return [{"agent": agent, "wave": wave + 1, "task_id": task_id,
                 "state": "skipped" if skipped else (state or "waiting"),
                 "result": json.loads(result) if result else None}
                for agent, wave, task_id, skipped, state, result in rows]

    async def buckets(self, job_id: int, normalize: bool, digits: bool) -> list[dict[str, Any]]:
        await self.store.barrier()
        return buckets.group(await self.store.job_results(job_id), normalize, digits)

    async def rerun(self, job_id: int, body: dict[str, Any], actor: str,
                    address: str | None) -> dict[str, Any]:
        """A new job with the same task and settings, to one bucket's agents or the failed."""
        job = await self.store.job(job_id)
        if job is None:
            raise ApiError(404, f"Unknown job: {job_id}")
        groups = buckets.group(await self.store.job_results(job_id),
                               body.get("normalize", True) is not False,
                               body.get("digits", False) is True)
        which = body.get("bucket")
        if body.get("failed") is True:
            agents = sorted(a for g in groups if g["failed"] for a in g["agents"])
        elif isinstance(which, int) and not isinstance(which, bool) and 0 <= which < len(groups):
            agents = groups[which]["agents"]
        else:
            raise ApiError(400, 'say which agents: {"bucket": N} (0 is the largest) or '
                                '{"failed": true}')
        if not agents:
            raise ApiError(400, f"Job {job_id} has no such agents to run again")
        again = {"task": json.loads(job.task), "targets": agents, "offline": job.offline,
                 "expires_s": job.expires_s, "nonzero_fails": bool(job.nonzero_fails),
                 "max_failures": None if job.max_failures is None
                 else min(job.max_failures, len(agents))}
        if job.windows:  # the same maintenance windows, in the same zone
            again.update(json.loads(job.windows))
        return await self.create(again, actor, address)

