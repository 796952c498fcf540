"""Scenario `nodes`: two dutservers on one PostgreSQL database (needs `--db`).

1. Cross-node latency at a light load: agents parked on node B, blocking pings submitted on
   node A at a fixed rate (open loop, Poisson arrivals); the same on B alone, same run, for the
   price of the hop (a NOTIFY each way). PostgreSQL's own counters give commits, rows written
   and NOTIFYs per round trip.
2. Memory and the restart herd over two nodes: N agents, half parked on each node; RSS per
   parked agent on each; then both nodes stop (SIGTERM) and start again (together), and the
   agents, retrying as `dutagent` does (each keeps to its node here: no failover), are all
   parked again (seconds from the first new spawn).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from bench.actors import DUTAGENT_RETRY, AgentFleet
from bench.drive import CpuMeter, Window, open_loop
from bench.env import Env, Handle, log, skipped
from bench.idle import wait_parked
from bench.loadgen import Connection
from bench.pg import PgCounters, per_op
from bench.throughput import _ping_submitter


@dataclass
class NodesSizes:
    agents: int = 100  # answering agents (on node B)
    rate_per_s: float = 100.0
    connections: int = 16
    warmup_s: float = 2.0
    duration_s: float = 8.0
    herd_agents: int = 2000  # parked over both nodes (--full: 10,000)
    herd_timeout_s: float = 120.0


async def _at_rate(submit_to: Handle, names: list[str], sizes: NodesSizes,
                   counters: PgCounters) -> dict[str, Any]:
    headers = {"Authorization": await submit_to.token(), "Content-Type": "application/json"}
    conns = [Connection(submit_to.target, headers) for _ in range(sizes.connections)]
    window = Window(sizes.warmup_s, sizes.duration_s)
    pid = submit_to.process.pid if submit_to.process else None
    cpu = CpuMeter(pid, window)
    before: dict[str, int] = {}

    async def read_at_start() -> None:
        await asyncio.sleep(max(0.0, window.start - time.monotonic()))
        before.update(await counters.read())

    reader = asyncio.create_task(read_at_start())
    stats = await open_loop(conns, _ping_submitter(names), sizes.rate_per_s, window)
    await reader
    after = await counters.read()
    for c in conns:
        c.close()
    s = stats.summary(sizes.duration_s)
    return {"achieved_per_s": s["per_s"], "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"],
            "max_ms": s["max_ms"], "errors": s["errors"], "error_kinds": s["error_kinds"],
            **per_op(before, after, stats.count), "submit_node_cpu": (await cpu.done()).get(
                "server_cpu")}


async def _herd(nodes: list[Handle], sizes: NodesSizes) -> dict[str, Any]:
    half = sizes.herd_agents // 2
    creds = await nodes[0].agents(sizes.herd_agents)
    fleets = [nodes[0].fleet(creds[:half]), nodes[1].fleet(creds[half:])]
    rss_before = [n.process.rss_kb() for n in nodes if n.process]
    t0 = time.monotonic()
    for f in fleets:
        f.start()
    try:
        await asyncio.gather(*(wait_parked(n, f, t0, sizes.herd_timeout_s)
                               for n, f in zip(nodes, fleets)))
        await asyncio.sleep(1.0)
        rss_after = [n.process.rss_kb() for n in nodes if n.process]
        per_agent = [round((a - b) / len(f.agents), 2)
                     for a, b, f in zip(rss_after, rss_before, fleets)]
        log(f"nodes: RSS per parked agent {per_agent} KB; restarting both nodes")
        for f in fleets:
            f.set_retry(DUTAGENT_RETRY)
        for f in fleets:
            f.counters.errors.clear()
        t_stop = time.monotonic()
        await asyncio.gather(*(n.process.stop() for n in nodes if n.process))
        stop_s = time.monotonic() - t_stop
        ready_s = [round(s, 3) for s in await asyncio.gather(
            *(n.process.start() for n in nodes if n.process))]  # both at once, as a fleet would
        spawned = min(n.process.started_at for n in nodes if n.process)
        parked = await asyncio.gather(*(wait_parked(n, f, spawned, sizes.herd_timeout_s)
                                        for n, f in zip(nodes, fleets)))
        return {"herd_agents": sizes.herd_agents, "rss_per_agent_kb": per_agent,
                "stop_s": round(stop_s, 3), "restart_ready_s": ready_s,
                "herd_s": round(max(parked) - spawned, 3),
                "herd_per_node_s": [round(p - spawned, 3) for p in parked],
                "restart_total_s": round(max(parked) - t_stop, 3),
                "herd_agent_errors": dict(sum((f.counters.errors for f in fleets), Counter()))}
    finally:
        await asyncio.gather(*(f.stop() for f in fleets))


async def nodes(env: Env, sizes: NodesSizes) -> dict[str, Any]:
    if env.db is None:
        return skipped("nodes", "needs a PostgreSQL server: --db postgresql://…")
    if env.external:
        return skipped("nodes", "starts its own servers (not with --url)")
    async with env.nodes(2) as (a, b):
        assert b.database is not None
        creds = await a.agents(sizes.agents)
        names = [c.name for c in creds]
        fleet: AgentFleet = b.fleet(creds)
        counters = PgCounters(b.database)
        await counters.open()
        fleet.start()
        try:
            await a.wait_online(creds, timeout_s=60)  # parked on B, seen from A
            log(f"nodes: {sizes.rate_per_s:g} round trips/s submitted on A to agents on B")
            cross = await _at_rate(a, names, sizes, counters)
            log(f"nodes: {sizes.rate_per_s:g} round trips/s submitted on B to agents on B")
            same = await _at_rate(b, names, sizes, counters)
        finally:
            await fleet.stop()
            await counters.close()
        agent_errors = dict(fleet.counters.errors)
        herd = await _herd([a, b], sizes)
    return {
        "scenario": "nodes", "agents": sizes.agents, "rate_per_s": sizes.rate_per_s,
        "cross_node": cross, "same_node": same, "agent_errors": agent_errors, **herd,
        "targets": {
            "cross-node p50 <= 3 ms": cross["p50_ms"] is not None and cross["p50_ms"] <= 3,
            "cross-node p99 <= 15 ms": cross["p99_ms"] is not None and cross["p99_ms"] <= 15,
            "0 errors": cross["errors"] == 0 and same["errors"] == 0 and not agent_errors,
            "<= 40 KB per parked agent": all(k <= 40 for k in herd["rss_per_agent_kb"]),
            "herd over two nodes within 10 s": herd["herd_s"] <= 10,
        },
    }
