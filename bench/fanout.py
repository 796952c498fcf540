"""Scenario 4: one blocking submit to N targets — time until all N results are in."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

from bench.actors import BenchError
from bench.drive import ratio
from bench.env import Env, log
from bench.idle import wait_parked
from bench.loadgen import Connection
from bench.throughput import PING_TASK


@dataclass
class FanoutSizes:
    agents: int = 1000
    repeats: int = 5
    timeout_s: int = 30


async def fanout(env: Env, sizes: FanoutSizes) -> dict[str, Any]:
    n = sizes.agents
    async with env.server() as srv:
        log(f"fanout: creating and parking {n} agents")
        creds = await srv.agents(n)
        fleet = srv.fleet(creds)
        t0 = time.monotonic()
        fleet.start()
        try:
            await wait_parked(srv, fleet, t0, timeout_s=120)
            names = [c.name for c in creds]
            conn = Connection(srv.target, {"Authorization": await srv.token()})
            path = f"/tasks?target={','.join(names)}&timeout={sizes.timeout_s}"
            times_s: list[float] = []
            failures: list[str] = []
            sent = t0
            for attempt in range(sizes.repeats):
                # Every agent back in its poll first (a poll sent after the previous round's
                # submit), so each round starts from the same state.
                await wait_parked(srv, fleet, sent, timeout_s=30, poll_s=0.02)
                sent = time.monotonic()
                r = await conn.request("POST", path, PING_TASK, timeout_s=sizes.timeout_s + 10)
                took = time.monotonic() - sent
                problem = _check(r.status, r.json() if r.status == 200 else None, names)
                if problem:
                    failures.append(f"round {attempt}: {problem}")
                else:
                    times_s.append(took)
                log(f"fanout: round {attempt}: {took:.3f} s {problem or ''}")
            conn.close()
        finally:
            await fleet.stop()
    if not times_s:
        raise BenchError(f"no fan-out round succeeded: {failures}")
    median_s = statistics.median(times_s)
    return {
        "scenario": "fanout", "targets_n": n, "rounds": sizes.repeats,
        "all_answered_median_s": round(median_s, 3),
        "all_answered_max_s": round(max(times_s), 3),
        "all_answered_min_s": round(min(times_s), 3),
        "results_per_s": round(n / median_s, 1),
        "ratio": ratio(n / median_s, env.calibrate_per_s),
        "errors": len(failures), "failures": failures,
        "agent_errors": dict(fleet.counters.errors),
        "targets": {"all answered within 1 s": max(times_s) <= 1.0 and not failures},
    }


def _check(status: int, body: Any, names: list[str]) -> str | None:
    """None when the answer holds one successful pong per target, in target order."""
    if status != 200:
        return f"http {status}"
    results = body.get("results") if isinstance(body, dict) else None
    if not isinstance(results, list) or len(results) != len(names):
        return f"expected {len(names)} results, got {type(results).__name__}"
    bad = [r.get("target") for r, n in zip(results, names)
           if r.get("target") != n or r.get("pong") is not True or r.get("error") is not False]
    return f"{len(bad)} targets without a pong (first: {bad[0]})" if bad else None
