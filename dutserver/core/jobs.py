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
import math
from collections.abc import Sequence
from typing import Any

from dutserver.config import Settings
from dutserver.core import buckets, selectors
from dutserver.core.clock import Clock
from dutserver.core.credentials import REVOKED
from dutserver.core.errors import ApiError
from dutserver.core.model import FINAL_STATES, JobRecord, Task
from dutserver.core.ports import Store
from dutserver.core.tasks import Tasks
from dutserver.core.views import iso

log = logging.getLogger("dutserver.jobs")

STATES = ("running", "paused", "done", "aborted")
_ENDED = frozenset(s.value for s in FINAL_STATES) | {"skipped"}
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


def _count(value: object, total: int, what: str, allow_zero: bool = True) -> int:
    """A number of agents, or "P%" of total (rounded up, at least 1 when P > 0)."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            pct = float(value.strip()[:-1])
        except ValueError:
            pct = -1.0
        if not 0 <= pct <= 100:
            raise ApiError(400, f"{what}: a percentage from 0 to 100, or a number of agents")
        return min(total, math.ceil(total * pct / 100)) if pct else 0
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise ApiError(400, f"{what}: a number of agents, or a percentage like \"20%\"")
    return value


def plan_waves(targets: list[str], canary: object, wave: object) -> list[list[str]]:
    """The targets cut in waves: the canary first, then waves of `wave` (a number or a % of
    the rest). Refuses waves larger than the fleet."""
    first = _count(canary or 0, len(targets), "canary")
    if first > len(targets):
        raise ApiError(400, f"canary of {first} is larger than the {len(targets)} targets")
    rest = targets[first:]
    size = _count(wave, len(rest), "wave", allow_zero=False) if wave is not None else len(rest)
    if size > len(rest) and rest and wave is not None and not str(wave).endswith("%"):
        raise ApiError(400, f"wave of {size} is larger than the {len(rest)} targets after the "
                            "canary")
    plan = [targets[:first]] if first else []
    size = max(1, size)
    plan += [rest[i:i + size] for i in range(0, len(rest), size)]
    return plan


class Jobs:
    def __init__(self, settings: Settings, store: Store, clock: Clock, tasks: Tasks) -> None:
        self.s = settings
        self.store = store
        self.clock = clock
        self.tasks = tasks
        self._looking: dict[int, bool] = {}  # job id -> looked at again when the look ends

    # --- making one --------------------------------------------------------------------------

    async def create(self, body: dict[str, Any], actor: str, address: str | None,
                     schedule_id: int | None = None) -> dict[str, Any]:
        task = body.get("task")
        if not isinstance(task, dict) or not isinstance(task.get("type"), str):
            raise ApiError(400, "task must be a JSON object with a string type")
        selector_text = body.get("selector")
        targets = await self.resolve(body.get("targets"), selector_text, task["type"])
        offline = body.get("offline", "queue")
        if offline not in ("queue", "skip"):
            raise ApiError(400, "offline must be queue (wait for them until the job expires) "
                                "or skip")
        expires_s = body.get("expires_s", self.s.task_expiry_s)
        if isinstance(expires_s, bool) or not isinstance(expires_s, (int, float)) or \
                not 0 < expires_s <= 366 * 86400:
            raise ApiError(400, "expires_s must be a number of seconds between 0 and one year")
        waves = plan_waves(targets, body.get("canary"), body.get("wave"))
        pause = body.get("pause_s")
        if pause == "manual":
            pause_ms: int | None = -1
        elif pause is None:
            pause_ms = None
        elif isinstance(pause, bool) or not isinstance(pause, (int, float)) or \
                not 0 <= pause <= 30 * 86400:
            raise ApiError(400, 'pause_s: seconds between waves (at most 30 days), or "manual"')
        else:
            pause_ms = int(pause * 1000)
        budget = body.get("max_failures")
        max_failures = None if budget is None else _count(budget, len(targets), "max_failures")
        if max_failures is not None and max_failures > len(targets):
            raise ApiError(400, f"max_failures of {max_failures} is more than the "
                                f"{len(targets)} targets")
        nonzero = body.get("nonzero_fails", True)
        if not isinstance(nonzero, bool):
            raise ApiError(400, "nonzero_fails must be true or false")
        job_id = await self.store.add_job(
            actor, self.clock.now_ms(), json.dumps(task), selector_text, offline,
            int(expires_s), pause_ms, max_failures, nonzero, waves, schedule_id)
        self.store.audit(actor, "job_create",
                         f"job {job_id}: {task['type']} to {len(targets)} agents in "
                         f"{len(waves)} wave(s)" + (f" ({selector_text})" if selector_text else ""),
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
            for record in await self.store.agents(True):
                acc = auth.accounts.get(record.name)
                if acc is None or acc.secret_hash == REVOKED:
                    continue
                if acc.capabilities is not None and kind not in acc.capabilities:
                    continue
                facts = {**(json.loads(record.inventory) if record.inventory else {}),
                         **(json.loads(record.facts) if record.facts else {})}
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

    def _send(self, job: JobRecord, agents: Sequence[str], ids: Sequence[int]) -> None:
        if not agents:
            return
        body = json.loads(job.task)
        try:
            self.tasks.create(agents, body, job.created_by, job.expires_s, None, ids=ids,
                              waiter=JobWaiter(self, job.id))
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
            if job.pause_ms == -1:
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
            done = await store.set_job_state(job_id, ("paused",), "running", None, now)
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
        return job_view(job, await self.store.job_progress(job_id))

    async def listing(self, state: str | None, before_id: int | None,
                      limit: int) -> list[dict[str, Any]]:
        if state is not None and state not in STATES:
            raise ApiError(400, f"Invalid state: use one of {', '.join(STATES)}")
        return [job_view(j, await self.store.job_progress(j.id))
                for j in await self.store.jobs(state, before_id, limit)]

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
        return await self.create(again, actor, address)


def job_view(job: JobRecord, progress: list[tuple[int, str, int, int]]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    waves: list[dict[str, Any]] = [{"wave": n + 1, "targets": 0, "counts": {}}
                                   for n in range(job.waves)]
    failed = 0
    for wave, state, wave_failed, n in progress:
        counts[state] = counts.get(state, 0) + n
        waves[wave]["targets"] += n
        waves[wave]["counts"][state] = n
        failed += wave_failed
    task = json.loads(job.task)
    return {"id": job.id, "state": job.state, "created_by": job.created_by,
            "created_at": iso(job.created_ms), "updated_at": iso(job.updated_ms),
            "finished_at": iso(job.finished_ms), "task": task, "type": task.get("type"),
            "selector": job.selector, "offline": job.offline, "expires_s": job.expires_s,
            "targets": job.targets, "counts": counts, "failed": failed,
            "max_failures": job.max_failures, "nonzero_fails": job.nonzero_fails,
            "pause_s": "manual" if job.pause_ms == -1 else (
                None if job.pause_ms is None else job.pause_ms / 1000),
            "released": job.released, "waves": waves, "next_wave_at": iso(job.next_ms),
            "reason": job.reason, "schedule_id": job.schedule_id}
