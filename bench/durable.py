"""Scenario 5: non-blocking submits to offline agents, `kill -9` during delivery, restart, drain:
every acknowledged task must be delivered at most once and accounted for."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from bench.actors import TRANSIENT, BenchError, Credentials
from bench.drive import ratio
from bench.env import Env, Handle, log, skipped
from bench.loadgen import Connection

FINAL_STATES = {"done", "failed", "cancelled", "expired"}


@dataclass
class DurableSizes:
    agents: int = 50
    tasks_per_agent: int = 40
    submitters: int = 4
    kill_at: list[float] = field(default_factory=lambda: [0.25, 0.6])  # fractions delivered
    drain_timeout_s: float = 60.0


async def durable(env: Env, sizes: DurableSizes) -> dict[str, Any]:
    if env.external:
        return skipped("durable", "needs a server it can kill and restart (not an external URL)")
    async with env.server() as srv:
        proc = srv.process
        assert proc is not None
        creds = await srv.agents(sizes.agents)
        token = await srv.token()
        log(f"durable: submitting {sizes.agents * sizes.tasks_per_agent} tasks to offline agents")
        t0 = time.monotonic()
        acked, submit_errors = await _submit_all(srv, token, creds, sizes)
        submit_s = time.monotonic() - t0
        total = len(acked)

        fleet = srv.fleet(creds)
        counters = fleet.counters
        counters.deliveries = {}
        counters.acked_results = set()
        kill_walls: list[float] = []
        fleet.start()
        try:
            for fraction in sizes.kill_at:
                wanted = fraction * total
                await _wait_for(lambda n=wanted: counters.tasks >= n, 60,
                                f"{fraction:.0%} of tasks delivered")
                log(f"durable: kill -9 after {counters.tasks} deliveries")
                kill_walls.append(time.time())
                await proc.kill9()
                await proc.start()
            t_drain = time.monotonic()
            delivered_at_restart = counters.tasks
            states = await _drain(srv, token, list(acked), sizes.drain_timeout_s)
            drain_s = time.monotonic() - t_drain
        finally:
            await fleet.stop()
    tally = _account(acked, states, counters.deliveries, counters.acked_results,
                     max(kill_walls, default=time.time()))
    drained = counters.tasks - delivered_at_restart
    return {
        "scenario": "durable", "tasks": total, "agents": sizes.agents, "kills": len(kill_walls),
        "lost": tally["lost"], "duplicated": tally["duplicated"],
        "wrong_agent": tally["wrong_agent"],
        "failed_in_flight_at_kill": tally["failed_in_flight"],
        "done": tally["done"],
        "submit_errors": dict(submit_errors),
        "tasks_stored_per_s": round(total / submit_s, 1),
        "tasks_stored_ratio": ratio(total / submit_s, env.calibrate_per_s),
        "drain_tasks_per_s": round(drained / drain_s, 1) if drain_s > 0 else None,
        "result_status_after_kill": {str(k): v for k, v in counters.result_status.items()},
        "lost_examples": tally["lost_examples"],
        "targets": {"0 lost": tally["lost"] == 0, "0 duplicated": tally["duplicated"] == 0},
    }


async def _submit_all(srv: Handle, token: str, creds: list[Credentials],
                      sizes: DurableSizes) -> tuple[dict[int, str], Counter[str]]:
    """One `POST /api/v1/tasks` per round for all agents; returns acknowledged id -> target."""
    acked: dict[int, str] = {}
    errors: Counter[str] = Counter()
    rounds = iter(range(sizes.tasks_per_agent))
    names = [c.name for c in creds]

    async def submitter() -> None:
        conn = Connection(srv.target, {"Authorization": token})
        try:
            for seq in rounds:
                body = json.dumps({"targets": names, "task": {"type": "ping", "seq": seq},
                                   "expires_s": 3600}).encode()
                try:
                    r = await conn.request("POST", "/api/v1/tasks", body, timeout_s=30)
                except TRANSIENT as e:
                    errors[type(e).__name__] += 1
                    continue
                if r.status != 202:
                    errors[f"http {r.status}"] += 1
                    continue
                for t in r.json()["tasks"]:
                    acked[int(t["id"])] = str(t["target"])
        finally:
            conn.close()

    await asyncio.gather(*(submitter() for _ in range(sizes.submitters)))
    if not acked:
        raise BenchError(f"no submit was acknowledged: {dict(errors)}")
    return acked, errors


async def _wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


async def _drain(srv: Handle, token: str, ids: list[int],
                 timeout_s: float) -> dict[int, dict[str, Any]]:
    """Waits until every task is in a final state (or the timeout); returns id -> task."""
    conn = Connection(srv.target, {"Authorization": token})
    deadline = time.monotonic() + timeout_s
    states: dict[int, dict[str, Any]] = {}
    try:
        while True:
            states = {}
            for i in range(0, len(ids), 1000):
                chunk = ",".join(map(str, ids[i:i + 1000]))
                r = await conn.request("GET", f"/api/v1/tasks?ids={chunk}&limit=1000",
                                       timeout_s=30)
                if r.status != 200:
                    raise BenchError(f"GET /api/v1/tasks?ids=…: {r.status} {r.body[:200]!r}")
                states |= {int(t["id"]): t for t in r.json()["tasks"]}
            pending = sum(1 for i in ids if states.get(i, {}).get("state") not in FINAL_STATES)
            if pending == 0 or time.monotonic() > deadline:
                return states
            await asyncio.sleep(0.5)
    finally:
        conn.close()


def _account(acked: dict[int, str], states: dict[int, dict[str, Any]],
             deliveries: dict[int, list[str]], acked_results: set[int],
             last_kill_wall: float) -> dict[str, Any]:
    """Sorts every acknowledged task into done, failed-in-flight (allowed: delivery is at most
    once, so a task handed out just before a crash is reported failed, never run twice) or lost."""
    lost: list[str] = []
    tally = Counter[str]()
    for task_id, target in acked.items():
        got = deliveries.get(task_id, [])
        tally["duplicated"] += max(0, len(got) - 1)
        tally["wrong_agent"] += sum(1 for name in got if name != target)
        task = states.get(task_id)
        why = _lost_because(task, got, task_id in acked_results, last_kill_wall)
        if why:
            lost.append(f"{task_id}: {why}")
        elif task is not None and task["state"] == "failed":
            tally["failed_in_flight"] += 1
        else:
            tally["done"] += 1
    return {"lost": len(lost), "lost_examples": lost[:10], "duplicated": tally["duplicated"],
            "wrong_agent": tally["wrong_agent"], "failed_in_flight": tally["failed_in_flight"],
            "done": tally["done"]}


def _lost_because(task: dict[str, Any] | None, got: list[str], result_acked: bool,
                  last_kill_wall: float) -> str | None:
    if task is None:
        return "unknown to the server after the restart"
    state = task.get("state")
    if state == "done":
        result = task.get("result") or {}
        if not got:
            return "done, but no agent ever received it"
        return None if result.get("pong") is True else f"done with a foreign result {result!r:.80}"
    if state == "failed":
        if result_acked:
            return "its result was acknowledged (200), then the task ended failed"
        delivered = _wall(task.get("delivered_at"))
        if delivered is None or delivered > last_kill_wall + 0.05:
            return f"failed without being in flight at a kill (delivered_at {delivered})"
        return None
    return f"ended {state!r} after the drain"


def _wall(iso: str | None) -> float | None:
    return datetime.fromisoformat(iso).timestamp() if iso else None
