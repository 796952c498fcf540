"""Scenario 3: N agents parked in long-polls — server memory per agent, then the restart herd."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from bench.actors import (
    DUTAGENT_RETRY,
    EAGER_RETRY,
    TRANSIENT,
    AgentFleet,
    BenchError,
    online_agents,
)
from bench.drive import Window, open_loop, ratio
from bench.env import Env, Handle, log
from bench.loadgen import Connection
from bench.throughput import _ping_submitter


@dataclass
class IdleSizes:
    agents: int = 2000
    settle_s: float = 1.0  # after parking, before reading RSS: lets allocations level out
    herd_timeout_s: float = 120.0
    probe_per_s: float = 50.0  # blocking pings to random parked agents, once all are parked
    probe_s: float = 4.0


async def wait_parked(srv: Handle, fleet: AgentFleet, since: float, timeout_s: float,
                      poll_s: float = 0.1) -> float:
    """Waits until every agent has a poll sent after `since` and still open, and the server reports
    them all online; returns the monotonic time that was first true.

    The generator's own view is checked first because it costs the server nothing; the server's
    `GET /agents` (with all N names) is asked only once the generator sees all polls out."""
    names = {a.cred.name for a in fleet.agents}
    n = len(names)
    deadline = time.monotonic() + timeout_s
    conn: Connection | None = None
    try:
        while time.monotonic() < deadline:
            if fleet.counters.parked >= n and fleet.all_polled_since(since):
                try:
                    if conn is None:
                        conn = Connection(srv.target, {"Authorization": await srv.token()})
                    if await online_agents(conn, names) >= n:
                        return time.monotonic()
                except TRANSIENT:
                    conn = None  # the server is still coming up: ask again
            await asyncio.sleep(poll_s)
    finally:
        if conn is not None:
            conn.close()
    raise BenchError(f"not all {n} agents parked within {timeout_s} s "
                     f"(generator sees {fleet.counters.parked} polls open)")


async def idle(env: Env, sizes: IdleSizes) -> dict[str, Any]:
    n = sizes.agents
    async with env.server() as srv:
        log(f"idle: creating {n} agent accounts")
        t0 = time.monotonic()
        creds = await srv.agents(n)
        create_s = time.monotonic() - t0
        proc = srv.process
        rss_before_kb = proc.rss_kb() if proc else None

        fleet = srv.fleet(creds)
        log(f"idle: parking {n} agents")
        t0 = time.monotonic()
        fleet.start()
        try:
            park_s = await wait_parked(srv, fleet, t0, sizes.herd_timeout_s) - t0
            await asyncio.sleep(sizes.settle_s)
            rss_after_kb = proc.rss_kb() if proc else None
            result: dict[str, Any] = {
                "scenario": "idle", "agents": n,
                "accounts_created_per_s": round(n / create_s, 1),
                "first_park_s": round(park_s, 3),
                "probe": await _probe(srv, [c.name for c in creds], sizes),
            }
            if proc is not None and rss_before_kb is not None and rss_after_kb is not None:
                per_agent_kb = (rss_after_kb - rss_before_kb) / n
                log(f"idle: {per_agent_kb:.1f} KB per parked agent")
                result |= {
                    "rss_before_mb": round(rss_before_kb / 1024, 1),
                    "rss_parked_mb": round(rss_after_kb / 1024, 1),
                    "rss_per_agent_kb": round(per_agent_kb, 2),
                }
                for label, retry in (("", DUTAGENT_RETRY), ("eager_", EAGER_RETRY)):
                    log(f"idle: restarting the server, agents retrying like {retry}")
                    fleet.set_retry(retry)
                    herd = await _restart_herd(srv, fleet, sizes, env.calibrate_per_s)
                    result |= {label + k: v for k, v in herd.items()}
            else:
                result["restart"] = "skipped: the server is not ours to restart (external URL)"
        finally:
            await fleet.stop()
    result["agent_errors"] = dict(fleet.counters.errors)
    result["targets"] = {
        "<= 40 KB per agent": (None if "rss_per_agent_kb" not in result
                               else result["rss_per_agent_kb"] <= 40),
        "all parked again within 10 s": (None if "herd_s" not in result
                                         else result["herd_s"] <= 10),
    }
    return result


async def _probe(srv: Handle, names: list[str], sizes: IdleSizes) -> dict[str, Any]:
    """A task to a random one among all the parked agents, at a light rate: how long a round
    trip takes while the server holds them all (open loop, latency from the scheduled send)."""
    if sizes.probe_per_s <= 0 or sizes.probe_s <= 0:
        return {}
    headers = {"Authorization": await srv.token(), "Content-Type": "application/json"}
    conns = [Connection(srv.target, headers) for _ in range(8)]
    try:
        stats = await open_loop(conns, _ping_submitter(names), sizes.probe_per_s,
                                Window(0.5, sizes.probe_s))
    finally:
        for c in conns:
            c.close()
    s = stats.summary(sizes.probe_s)
    return {"rate_per_s": sizes.probe_per_s, "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"],
            "max_ms": s["max_ms"], "errors": s["errors"]}


async def _restart_herd(srv: Handle, fleet: AgentFleet, sizes: IdleSizes,
                        calibrate_per_s: float | None) -> dict[str, Any]:
    """A graceful stop (SIGTERM) with every agent parked, then a start on the same port and
    database: seconds until all agents are parked again, counted from the new spawn.

    Agents first retry as the reference agent does (from 1 s, doubling, full jitter), which is
    the figure users meet; then every 0.1 s at most, the worst herd, which shows how fast the
    server itself takes agents back."""
    proc = srv.process
    assert proc is not None
    t0 = time.monotonic()
    await proc.stop()
    stop_s = time.monotonic() - t0
    ready_s = await proc.start()
    spawned = proc.started_at
    all_parked = await wait_parked(srv, fleet, spawned, sizes.herd_timeout_s)
    herd_s = all_parked - spawned
    rss_kb = proc.rss_kb()
    return {
        "stop_s": round(stop_s, 3),
        "restart_ready_s": round(ready_s, 3),
        "herd_s": round(herd_s, 3),
        "restart_total_s": round(all_parked - t0, 3),  # from the stop signal, stop included
        "herd_agents_per_s": round(sizes.agents / herd_s, 1),
        "herd_ratio": ratio(sizes.agents / herd_s, calibrate_per_s),
        "rss_after_herd_mb": round(rss_kb / 1024, 1),
    }
