"""Scenario `enrolled`: agents that joined by enrollment cost what classic agents cost.

One server, two fleets of the same size answering at once: classic agents (accounts made by an
admin, `name:secret`) and enrolled ones (a token, `POST /api/v1/enroll` with the agent's own
256-bit credential, accepted by an admin). Closed-loop blocking pings to one fleet, then the
other, then the first again (A-B-A, so that drift on a shared machine falls on both): round
trips per second of each, and their ratio. Then the restart herd: the server restarts and both
fleets park again; seconds until each is all online.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import statistics
import time
from dataclasses import dataclass
from typing import Any

from bench.actors import BenchError, Credentials, unique_prefix
from bench.drive import Window, closed_loop
from bench.env import Env, Handle, log
from bench.loadgen import Connection
from bench.throughput import _ping_submitter


@dataclass
class EnrolledSizes:
    agents: int = 100  # per fleet
    clients: int = 16
    warmup_s: float = 2.0
    duration_s: float = 6.0
    herd_agents: int = 1000  # per fleet (--full: 5,000 each, 10,000 in all)


async def enroll_agents(srv: Handle, count: int, parallel: int = 8) -> list[Credentials]:
    """count agents through enrollment: one unlimited token, a request each, accepted."""
    admin_headers = {"Authorization": await srv.token(), "Content-Type": "application/json"}
    admin = Connection(srv.target, admin_headers)
    try:
        r = await admin.request("POST", "/api/v1/enrollment-tokens", json.dumps(
            {"max_uses": None, "note": "bench"}).encode(), timeout_s=30)
        if r.status != 201:
            raise BenchError(f"creating an enrollment token failed: {r.status} {r.body[:200]!r}")
        token = r.json()["token"]["token"]
        prefix = unique_prefix()
        pending = iter(range(count))
        creds: list[Credentials] = []

        async def work() -> None:
            conn = Connection(srv.target, {"Content-Type": "application/json"})
            accepting = Connection(srv.target, admin_headers)  # one request at a time each
            try:
                for i in pending:
                    credential = secrets.token_urlsafe(32)
                    body = {"token": token, "credential": credential,
                            "facts": {"hostname": f"{prefix}{i}", "machine_id": f"{prefix}{i}"}}
                    r = await conn.request("POST", "/api/v1/enroll", json.dumps(body).encode(),
                                           timeout_s=30)
                    if r.status != 202:
                        raise BenchError(f"enrolling failed: {r.status} {r.body[:200]!r}")
                    request_id = r.json()["enrollment"]["id"]
                    r = await accepting.request(
                        "POST", f"/api/v1/enrollments/{request_id}/accept", b"", timeout_s=30)
                    if r.status != 200:
                        raise BenchError(f"accepting failed: {r.status} {r.body[:200]!r}")
                    creds.append(Credentials(r.json()["enrollment"]["name"], credential))
            finally:
                conn.close()
                accepting.close()

        await asyncio.gather(*(work() for _ in range(parallel)))
        return creds
    finally:
        admin.close()


async def _rate(srv: Handle, names: list[str], sizes: EnrolledSizes) -> float:
    headers = {"Authorization": await srv.token(), "Content-Type": "application/json"}
    conns = [Connection(srv.target, headers) for _ in range(sizes.clients)]
    try:
        stats = await closed_loop(conns, _ping_submitter(names), Window(sizes.warmup_s,
                                                                        sizes.duration_s))
    finally:
        for c in conns:
            c.close()
    summary = stats.summary(sizes.duration_s)
    if summary["errors"]:
        raise BenchError(f"round trips failed: {summary['error_kinds']}")
    return float(summary["per_s"] or 0.0)


async def enrolled(env: Env, sizes: EnrolledSizes) -> dict[str, Any]:
    async with env.server() as srv:
        classic = await srv.agents(sizes.agents)
        joined = await enroll_agents(srv, sizes.agents)
        fleets = [srv.fleet(classic), srv.fleet(joined)]
        for f in fleets:
            f.start()
        try:
            await srv.wait_online(classic + joined, timeout_s=60)
            rates: dict[str, list[float]] = {"classic": [], "enrolled": []}
            for kind, creds in (("classic", classic), ("enrolled", joined),
                                ("classic", classic), ("enrolled", joined)):
                log(f"enrolled: closed loop to {len(creds)} {kind} agents")
                rates[kind].append(await _rate(srv, [c.name for c in creds], sizes))
        finally:
            for f in fleets:
                await f.stop()
        herd_classic = await srv.agents(sizes.herd_agents)
        herd_joined = await enroll_agents(srv, sizes.herd_agents)
        herd = await _herd(srv, herd_classic, herd_joined)
    classic_rate = statistics.median(rates["classic"])
    joined_rate = statistics.median(rates["enrolled"])
    ratio = joined_rate / classic_rate if classic_rate else None
    return {
        "scenario": "enrolled", "agents_per_fleet": sizes.agents,
        "classic_per_s": rates["classic"], "enrolled_per_s": rates["enrolled"],
        "enrolled_vs_classic": None if ratio is None else round(ratio, 3),
        **herd,
        "targets": {"enrolled round trips within 5 % of classic": None if ratio is None
                    else ratio >= 0.95},
    }


async def _herd(srv: Handle, classic: list[Credentials],
                joined: list[Credentials]) -> dict[str, Any]:
    """Both fleets parked, the server restarted: seconds until each fleet is all online."""
    fleets = [srv.fleet(classic), srv.fleet(joined)]
    for f in fleets:
        f.start()
    try:
        await srv.wait_online(classic + joined, timeout_s=120)
        if srv.process is None:
            return {"herd": "external server: no restart"}
        log(f"enrolled: restarting with {len(classic)} classic and {len(joined)} enrolled "
            "agents parked")
        await srv.process.stop()
        await srv.process.start()
        start = srv.process.started_at
        waits = await asyncio.gather(srv.wait_online(classic, timeout_s=120),
                                     srv.wait_online(joined, timeout_s=120))
        # Each figure from the moment the server answered ready; the last from its spawn.
        return {"herd_agents_per_fleet": len(classic), "herd_classic_s": round(waits[0], 2),
                "herd_enrolled_s": round(waits[1], 2),
                "herd_all_s": round(time.monotonic() - start, 2)}
    finally:
        for f in fleets:
            await f.stop()
