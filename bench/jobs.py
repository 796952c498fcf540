"""Scenario `jobs`: what a fleet job costs next to a plain multi-target submit.

1. N agents parked and answering. A blocking multi-target submit of a ping to all N, then a
   job of the same ping to the same N in waves of 10 % (the server releases each wave when the
   previous one ended, and counts failures against a budget): the server's CPU seconds per
   task of each, measured from /proc around each, several rounds alternating; their ratio.
2. A selector over the fleet's labels (`GET /api/v1/selector`), the agents labelled first:
   milliseconds per resolution, end to end (the store read of every agent included).
3. Result buckets of a job's N results (`GET /api/v1/jobs/{id}/buckets`): milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from bench.actors import BenchError
from bench.env import Env, log
from bench.idle import wait_parked
from bench.loadgen import Connection
from bench.servers import proc_cpu_split_s
from bench.throughput import PING_TASK


@dataclass
class JobSizes:
    agents: int = 1000
    rounds: int = 3
    selector_agents: int = 10_000  # labelled, for the selector's figure (--full; else 2,000)
    timeout_s: float = 60.0


def _cpu(pid: int) -> float:
    user, system = proc_cpu_split_s(pid)
    return user + system


async def _job(conn: Connection, names: list[str], timeout_s: float) -> int:
    body = {"task": {"type": "ping"}, "targets": names, "wave": "10%",
            "max_failures": len(names) // 10}
    r = await conn.request("POST", "/api/v1/jobs", json.dumps(body).encode(), timeout_s=30)
    if r.status != 201:
        raise BenchError(f"job refused: {r.status} {r.body[:200]!r}")
    job_id = int(r.json()["job"]["id"])
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = await conn.request("GET", f"/api/v1/jobs/{job_id}", timeout_s=30)
        job = r.json()["job"]
        if job["state"] != "running":
            if job["state"] != "done" or job["counts"].get("done") != len(names):
                raise BenchError(f"job {job_id} ended {job['state']}: {job['counts']}")
            return job_id
        await asyncio.sleep(0.25)  # a dutctl --follow polls every 0.5 s, the web 1.5 s
    raise BenchError(f"job {job_id} did not end in {timeout_s} s")


async def jobs(env: Env, sizes: JobSizes) -> dict[str, Any]:
    async with env.server() as srv:
        if srv.process is None:
            raise BenchError("the jobs scenario measures the server's CPU: it needs its own")
        pid = srv.process.pid
        creds = await srv.agents(sizes.agents)
        names = [c.name for c in creds]
        fleet = srv.fleet(creds)
        t0 = time.monotonic()
        fleet.start()
        conn = Connection(srv.target, {"Authorization": await srv.token(),
                                       "Content-Type": "application/json"})
        submit_cpu, job_cpu = [], []
        job_id = 0
        try:
            await wait_parked(srv, fleet, t0, timeout_s=120)
            path = f"/tasks?target={','.join(names)}&timeout={int(sizes.timeout_s)}"
            for n in range(sizes.rounds):
                await wait_parked(srv, fleet, time.monotonic(), timeout_s=30, poll_s=0.02)
                before = _cpu(pid)
                r = await conn.request("POST", path, PING_TASK, timeout_s=sizes.timeout_s)
                if r.status != 200:
                    raise BenchError(f"multi-target submit: {r.status}")
                submit_cpu.append((_cpu(pid) - before) / len(names))
                await wait_parked(srv, fleet, time.monotonic(), timeout_s=30, poll_s=0.02)
                before = _cpu(pid)
                job_id = await _job(conn, names, sizes.timeout_s)
                job_cpu.append((_cpu(pid) - before) / len(names))
                log(f"jobs: round {n}: submit {submit_cpu[-1] * 1e6:.0f} µs/task, "
                    f"job {job_cpu[-1] * 1e6:.0f} µs/task")
            buckets_ms = []
            for _ in range(5):
                start = time.monotonic()
                r = await conn.request("GET", f"/api/v1/jobs/{job_id}/buckets", timeout_s=30)
                buckets_ms.append((time.monotonic() - start) * 1000)
                if r.status != 200:
                    raise BenchError(f"buckets: {r.status}")
        finally:
            await fleet.stop()
        selector = await _selector(srv, conn, sizes.selector_agents)
        conn.close()
    ratio = statistics.median(job_cpu) / statistics.median(submit_cpu)
    return {
        "scenario": "jobs", "agents": sizes.agents,
        "submit_cpu_us_per_task": [round(x * 1e6) for x in submit_cpu],
        "job_cpu_us_per_task": [round(x * 1e6) for x in job_cpu],
        "job_vs_submit": round(ratio, 3),
        "buckets_ms_median": round(statistics.median(buckets_ms), 1),
        "buckets_results": sizes.agents, **selector,
        "targets": {"job CPU per task within 20 % of a multi-target submit": ratio <= 1.2,
                    "selector over the fleet <= 50 ms": selector["selector_ms_median"] <= 50},
    }


async def _selector(srv: Any, conn: Connection, count: int) -> dict[str, Any]:
    """count more agents, every tenth labelled room=204: a selector's resolution time."""
    log(f"jobs: creating and labelling {count} agents for the selector")
    creds = await srv.agents(count)
    labelled = [c.name for i, c in enumerate(creds) if i % 10 == 0]
    for name in labelled:
        r = await conn.request("PUT", f"/api/v1/agents/{name}/labels",
                               json.dumps({"labels": {"room": "204"}}).encode(), timeout_s=30)
        if r.status != 200:
            raise BenchError(f"labelling: {r.status}")
    times = []
    for _ in range(7):
        start = time.monotonic()
        r = await conn.request("GET", "/api/v1/selector?selector=" + quote("room=204,!retired"),
                               timeout_s=30)
        times.append((time.monotonic() - start) * 1000)
        if r.status != 200 or r.json()["count"] < len(labelled):
            raise BenchError(f"selector: {r.status} {r.body[:200]!r}")
    return {"selector_agents": r.json()["count"], "selector_fleet": count,
            "selector_ms_median": round(statistics.median(times), 1)}
