"""Server CPU per round trip at a fixed offered load: for telling two builds apart in time.

    python -m bench.fixedrate [--rate 3000] [--rounds 3] [--server-arg ARG ...]

At the maximum load the round trips per second follow the machine's spell and how requests
happen to batch; at a fixed rate (open loop, Poisson arrivals, 64 connections, 100 bench agents
answering at once) the same work is offered every time, so the server's CPU seconds per round
trip compare across builds run one after the other. Each round is a fresh server. To compare two
commits, run this from a worktree of each, alternating (the server is started from the tree the
bench is imported from). One JSON line per round, then one with the medians.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
from typing import Any

from bench.drive import CpuMeter, Window, open_loop
from bench.env import Env, run_on_uvloop
from bench.loadgen import Connection
from bench.servers import ROOT, pin_generator, raise_fd_limit
from bench.throughput import _ping_submitter


async def one_round(rate: float, agents: int, server_args: list[str], warmup_s: float,
                    duration_s: float) -> dict[str, Any]:
    async with Env(server_args=server_args).server() as srv:
        creds = await srv.agents(agents)
        fleet = srv.fleet(creds)
        fleet.start()
        try:
            await srv.wait_online(creds, timeout_s=60)
            headers = {"Authorization": await srv.token(), "Content-Type": "application/json"}
            conns = [Connection(srv.target, headers) for _ in range(64)]
            window = Window(warmup_s, duration_s)
            cpu = CpuMeter(srv.process.pid if srv.process else None, window)
            stats = await open_loop(conns, _ping_submitter([c.name for c in creds]), rate, window)
            used = await cpu.done()
            for c in conns:
                c.close()
        finally:
            await fleet.stop()
    s = stats.summary(duration_s)
    errors = s["errors"] + sum(fleet.counters.errors.values())
    per_s = s["per_s"] or 0
    return {"scenario": "fixedrate", "tree": str(ROOT), "rate_per_s": rate, "achieved_per_s": per_s,
            "server_cpu": used.get("server_cpu"),
            "server_us_per_round_trip": round(used["server_cpu"] / per_s * 1e6, 1)
            if per_s and used.get("server_cpu") is not None else None,
            "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"], "errors": errors,
            "other_load": used.get("other_load"), "steal": used.get("steal")}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.fixedrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=3000.0, help="round trips offered per second")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--agents", type=int, default=100)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG")
    args = p.parse_args()
    gc.set_threshold(100_000, 50, 100)  # as bench.run: the generator's own GC pauses stay rare
    print(pin_generator(), flush=True)
    raise_fd_limit()

    async def run() -> int:
        rounds = []
        for _ in range(args.rounds):
            r = await one_round(args.rate, args.agents, args.server_arg, args.warmup,
                                args.duration)
            rounds.append(r)
            print(json.dumps(r), flush=True)
        us = [r["server_us_per_round_trip"] for r in rounds if r["server_us_per_round_trip"]]
        print(json.dumps({"scenario": "fixedrate-median", "tree": str(ROOT), "rate_per_s": args.rate,
                          "server_us_per_round_trip": statistics.median(us) if us else None,
                          "p99_ms": statistics.median(r["p99_ms"] for r in rounds),
                          "errors": sum(r["errors"] for r in rounds)}), flush=True)
        return 0

    raise SystemExit(run_on_uvloop(run()))


if __name__ == "__main__":
    main()
