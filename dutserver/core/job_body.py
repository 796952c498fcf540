"""A job's body, checked (what POST /api/v1/jobs and a schedule's job may say, each refusal a
400 naming the field), the waves it is cut in, and what a job looks like."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from dutserver.core import windows
from dutserver.core.errors import ApiError
from dutserver.core.model import JobRecord
from dutserver.core.views import iso

LARGE_FLEET = 10**9  # checking a count's form before the fleet is known (a schedule's job)


@dataclass(slots=True)
class JobSpec:
    """What a body says, checked; its targets are resolved by Jobs.resolve."""

    task: dict[str, Any]
    offline: str
    expires_s: float
    pause_ms: int | None  # None: no pause; -1: until resumed
    nonzero_fails: bool
    windows: str | None  # stored form: {"tz", "windows"} JSON, or None for none


def check(body: dict[str, Any], default_expiry_s: float, default_tz: str,
          now_ms: int) -> JobSpec:
    """Everything of a job's body but its targets and the counts that depend on them."""
    task = body.get("task")
    if not isinstance(task, dict) or not isinstance(task.get("type"), str):
        raise ApiError(400, "task must be a JSON object with a string type")
    offline = body.get("offline", "queue")
    if offline not in ("queue", "skip"):
        raise ApiError(400, "offline must be queue (wait for them until the job expires) "
                            "or skip")
    expires_s = body.get("expires_s", default_expiry_s)
    if isinstance(expires_s, bool) or not isinstance(expires_s, (int, float)) or \
            not 0 < expires_s <= 366 * 86400:
        raise ApiError(400, "expires_s must be a number of seconds between 0 and one year")
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
    nonzero = body.get("nonzero_fails", True)
    if not isinstance(nonzero, bool):
        raise ApiError(400, "nonzero_fails must be true or false")
    return JobSpec(task, offline, expires_s, pause_ms, nonzero,
                   stored_windows(body.get("windows"), body.get("tz"), default_tz, now_ms))


def stored_windows(raw: object, tz_name: object, default_tz: str, now_ms: int) -> str | None:
    """Maintenance windows as given (and their zone), checked, in their stored form; None
    when there are none (left out, or an empty list)."""
    if tz_name is not None:
        windows.zone(tz_name)
    if raw is None or raw == []:
        return None
    name = default_tz if tz_name is None else str(tz_name)
    parsed = windows.parse(raw)
    windows.check_opens(parsed, windows.zone(name), now_ms)
    return json.dumps({"tz": name, "windows": windows.as_json(parsed)})


def check_counts(body: dict[str, Any]) -> None:
    """The forms of canary, wave and max_failures, before the fleet is known."""
    for what in ("canary", "wave", "max_failures"):
        value = body.get(what)
        if value is not None:
            count(value, LARGE_FLEET, what, allow_zero=what != "wave")


def count(value: object, total: int, what: str, allow_zero: bool = True) -> int:
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
    first = count(canary or 0, len(targets), "canary")
    if first > len(targets):
        raise ApiError(400, f"canary of {first} is larger than the {len(targets)} targets")
    rest = targets[first:]
    size = count(wave, len(rest), "wave", allow_zero=False) if wave is not None else len(rest)
    if size > len(rest) and rest and wave is not None and not str(wave).endswith("%"):
        raise ApiError(400, f"wave of {size} is larger than the {len(rest)} targets after the "
                            "canary")
    plan = [targets[:first]] if first else []
    size = max(1, size)
    plan += [rest[i:i + size] for i in range(0, len(rest), size)]
    return plan


def window_view(stored: str | None, now_ms: int) -> dict[str, Any] | None:
    """Whether a job's (or a schedule's) windows are open now, and until or from when."""
    loaded = windows.load(stored)
    if loaded is None:
        return None
    found, tz = loaded
    span = windows.next_open(found, tz, now_ms)
    is_open = span is not None and span[0] <= now_ms
    return {"open": is_open, "opens_at": None if span is None or is_open else iso(span[0]),
            "closes_at": iso(span[1]) if span is not None and span[1] is not None else None}


def job_view(job: JobRecord, progress: list[tuple[int, str, int, int]],
             now_ms: int) -> dict[str, Any]:
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
    stored = json.loads(job.windows) if job.windows else None
    return {"id": job.id, "state": job.state, "created_by": job.created_by,
            "created_at": iso(job.created_ms), "updated_at": iso(job.updated_ms),
            "finished_at": iso(job.finished_ms), "task": task, "type": task.get("type"),
            "selector": job.selector, "offline": job.offline, "expires_s": job.expires_s,
            "targets": job.targets, "counts": counts, "failed": failed,
            "max_failures": job.max_failures, "nonzero_fails": job.nonzero_fails,
            "pause_s": "manual" if job.pause_ms == -1 else (
                None if job.pause_ms is None else job.pause_ms / 1000),
            "released": job.released, "waves": waves, "next_wave_at": iso(job.next_ms),
            "reason": job.reason, "schedule_id": job.schedule_id,
            "windows": stored["windows"] if stored else None,
            "tz": stored["tz"] if stored else None,
            "window": window_view(job.windows, now_ms) if job.state in ("running", "paused")
            else None}
