"""Scenarios 1 and 2: calibrate (hello world under uvicorn) and roundtrip (submit → agent → result)."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from typing import Any

from bench.drive import CpuMeter, Window, closed_loop, open_loop, ratio
from bench.env import Env, log
from bench.loadgen import Connection, Response, Target
from bench.profile import format_profile
from bench.servers import calibrate_server, workdir

HELLO = b"Hello, world!"
PING_TASK = json.dumps({"type": "ping"}).encode()


@dataclass
class ThroughputSizes:
    warmup_s: float = 2.0
    duration_s: float = 8.0
    calibrate_connections: int = 64
    agents: int = 100
    clients: int = 64
    half_load_connections: int = 64


async def hello(conn: Connection) -> str | None:
    r = await conn.request("GET", "/", timeout_s=10)
    if r.status != 200:
        return f"http {r.status}"
    return None if r.body == HELLO else "wrong body"


async def calibrate(sizes: ThroughputSizes, url: str | None = None) -> dict[str, Any]:
    """Requests/s of hello world with `calibrate_connections` keep-alive connections."""
    tmp = workdir()
    proc = None if url else calibrate_server(tmp)
    try:
        if proc is not None:
            await proc.start()
            url = proc.url
        assert url is not None
        target = Target.from_url(url)
        conns = [Connection(target) for _ in range(sizes.calibrate_connections)]
        window = Window(sizes.warmup_s, sizes.duration_s)
        cpu = CpuMeter(proc.pid if proc else None, window)
        stats = await closed_loop(conns, hello, window)
        for c in conns:
            c.close()
        summary = stats.summary(sizes.duration_s)
        return {
            "scenario": "calibrate",
            "requests_per_s": summary["per_s"],
            "p50_ms": summary["p50_ms"], "p99_ms": summary["p99_ms"],
            "errors": summary["errors"], "error_kinds": summary["error_kinds"],
            "connections": sizes.calibrate_connections, "duration_s": sizes.duration_s,
            **(cpu_figures := await cpu.done()),
            **generator_cost(cpu_figures, summary["per_s"]),
            "server": proc.history[-1] if proc else url,
        }
    finally:
        if proc is not None and proc.running:
            await proc.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def generator_cost(cpu: dict[str, Any], per_s: float | None) -> dict[str, Any]:
    """The generator's CPU per operation, and whether it may be what limits the figure (near one
    full core: then the figure is a lower bound of what the server can do)."""
    gen = cpu.get("generator_cpu")
    if gen is None or not per_s:
        return {}
    figures = {"generator_us_per_op": round(gen / per_s * 1e6, 1), "generator_bound": gen >= 0.9}
    if cpu.get("server_cpu"):
        # CPU time per operation does not depend on how busy the generator's core was.
        figures["server_us_per_op"] = round(cpu["server_cpu"] / per_s * 1e6, 1)
    return figures


def _ping_submitter(names: list[str]) -> Any:
    async def submit(conn: Connection) -> str | None:
        target = random.choice(names)
        r: Response = await conn.request("POST", f"/tasks?target={target}", PING_TASK,
                                         timeout_s=30)
        if r.status != 200:
            return f"http {r.status}"
        result = json.loads(r.body.decode())  # str: json skips its encoding sniffing
        if result.get("pong") is not True or result.get("error") is not False:
            return "wrong result"
        return None
    return submit


async def roundtrip(env: Env, sizes: ThroughputSizes) -> dict[str, Any]:
    """A agents answering at once, C clients submitting blocking pings to random agents: first as
    fast as it goes (closed loop), then at half that rate (open loop) for the latency figure."""
    async with env.server() as srv:
        creds = await srv.agents(sizes.agents)
        fleet = srv.fleet(creds)
        fleet.start()
        try:
            await srv.wait_online(creds, timeout_s=60)
            token = await srv.token()
            submit = _ping_submitter([c.name for c in creds])
            headers = {"Authorization": token, "Content-Type": "application/json"}

            conns = [Connection(srv.target, headers) for _ in range(sizes.clients)]
            window = Window(sizes.warmup_s, sizes.duration_s)
            cpu = CpuMeter(srv.process.pid if srv.process else None, window)
            profile = srv.profile("roundtrip", window)
            log(f"roundtrip: closed loop, {sizes.agents} agents, {sizes.clients} clients")
            full = (await closed_loop(conns, submit, window)).summary(sizes.duration_s)
            full_cpu = await cpu.done()
            if profile is not None:
                profile_summary = await profile.summary()
                log("roundtrip: server profile\n" + format_profile(profile_summary))
                full_cpu["profile"] = profile_summary.get("profile",
                                                          profile_summary.get("profile_error"))
            for c in conns:
                c.close()

            rate = (full["per_s"] or 0) / 2
            half: dict[str, Any] = {"rate_per_s": round(rate, 1)}
            if rate > 0:
                conns = [Connection(srv.target, headers) for _ in range(sizes.half_load_connections)]
                window = Window(sizes.warmup_s, sizes.duration_s)
                cpu = CpuMeter(srv.process.pid if srv.process else None, window)
                log(f"roundtrip: open loop at {rate:.0f}/s")
                stats = await open_loop(conns, submit, rate, window)
                s = stats.summary(sizes.duration_s)
                half |= {"achieved_per_s": s["per_s"], "p50_ms": s["p50_ms"],
                         "p99_ms": s["p99_ms"], "max_ms": s["max_ms"], "errors": s["errors"],
                         "error_kinds": s["error_kinds"], **await cpu.done()}
                for c in conns:
                    c.close()
        finally:
            await fleet.stop()
        agent_errors = sum(fleet.counters.errors.values())
        result_status = dict(fleet.counters.result_status)
    errors = full["errors"] + half.get("errors", 0) + agent_errors + sum(result_status.values())
    r = ratio(full["per_s"], env.calibrate_per_s)
    return {
        "scenario": "roundtrip",
        "round_trips_per_s": full["per_s"], "ratio": r,
        "p50_ms": full["p50_ms"], "p99_ms": full["p99_ms"], "max_ms": full["max_ms"],
        "per_second": full["per_second"],
        "errors": full["errors"], "error_kinds": full["error_kinds"], **full_cpu,
        **generator_cost(full_cpu, full["per_s"]),
        "half_load": half,
        "agent_errors": dict(fleet.counters.errors), "agent_result_status": result_status,
        "agents": sizes.agents, "clients": sizes.clients, "duration_s": sizes.duration_s,
        "targets": {
            "ratio >= 0.45": None if r is None else r >= 0.45,
            "0 errors": errors == 0,
            "half-load p99 <= 10 ms": None if half.get("p99_ms") is None
            else half["p99_ms"] <= 10.0,
        },
    }
