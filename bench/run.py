"""`make bench`: runs the scenarios and prints one JSON line per scenario on stdout.

    python -m bench.run                      # default sizes, whole run well under 5 minutes
    python -m bench.run --full               # issue sizes: 10,000 idle agents, 15 s load runs
    python -m bench.run --url http://host:port --admin user:pass   # any dutserver-compatible server
    python -m bench.run --db postgresql://postgres@127.0.0.1/postgres   # on PostgreSQL; `nodes` too

Servers run under `taskset -c 0`, this generator on core 1. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.durable import DurableSizes, durable
from bench.env import run_on_uvloop, Env, log
from bench.fanout import FanoutSizes, fanout
from bench.idle import IdleSizes, idle
from bench.jobs import JobSizes, jobs
from bench.enrolled import EnrolledSizes, enrolled
from bench.nodes import NodesSizes, nodes
from bench.servers import pin_generator, raise_fd_limit
from bench.throughput import ThroughputSizes, calibrate, roundtrip

SCENARIOS = ["calibrate", "roundtrip", "idle", "fanout", "durable", "nodes", "enrolled", "jobs"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help="comma-separated subset of: " + ", ".join(SCENARIOS))
    p.add_argument("--full", action="store_true",
                   help="the issue's sizes: 10,000 idle agents, 15 s load runs (fan-out: 1,000 always)")
    p.add_argument("--url", help="measure this running server instead of starting dutservers")
    p.add_argument("--admin", default=None, metavar="USER:PASS",
                   help="admin credentials on --url (our own servers get a bench admin)")
    p.add_argument("--classic-agents", action="store_true",
                   help="agents send `Authorization: name:secret` and post to /task_result")
    p.add_argument("--calibrate-url", help="measure this hello-world server instead of our own")
    p.add_argument("--calibrate-per-s", type=float,
                   help="skip calibrate and use this requests/s for the ratios")
    p.add_argument("--warmup", type=float, default=None, help="seconds of warm-up per load run")
    p.add_argument("--duration", type=float, default=None, help="seconds measured per load run")
    p.add_argument("--calibrate-connections", type=int, default=None)
    p.add_argument("--agents", type=int, default=None, help="roundtrip: agents")
    p.add_argument("--clients", type=int, default=None, help="roundtrip: concurrent submitters")
    p.add_argument("--idle-agents", type=int, default=None)
    p.add_argument("--fanout-agents", type=int, default=None)
    p.add_argument("--fanout-rounds", type=int, default=None)
    p.add_argument("--durable-agents", type=int, default=None)
    p.add_argument("--durable-tasks-per-agent", type=int, default=None)
    p.add_argument("--db", metavar="URL",
                   help="a PostgreSQL server (postgresql://user@host:port/db): every scenario "
                        "runs on a fresh database there (created, then dropped) instead of a "
                        "fresh SQLite file; `nodes` needs it")
    p.add_argument("--nodes-agents", type=int, default=None, help="nodes: answering agents")
    p.add_argument("--nodes-rate", type=float, default=None,
                   help="nodes: round trips/s offered")
    p.add_argument("--herd-agents", type=int, default=None,
                   help="nodes: agents parked over both nodes for the restart herd")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for every dutserver started (repeatable), "
                        "e.g. --server-arg=--poll-timeout-s --server-arg=26")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run the scenarios N times (figures vary by some 10-20 %% between runs)")
    p.add_argument("--keep-workdir", action="store_true", help="keep databases and server logs")
    p.add_argument("--profile-dir", type=Path, metavar="DIR",
                   help="profile the server during the roundtrip run with py-spy into DIR")
    p.add_argument("--py-spy", default=shutil.which("py-spy"), metavar="PATH",
                   help="the py-spy program for --profile-dir (default: py-spy on PATH)")
    args = p.parse_args(argv)
    unknown = set(args.scenarios.split(",")) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if args.url and not args.admin:
        p.error("--url needs --admin USER:PASS")
    if args.profile_dir and not args.py_spy:
        p.error("--profile-dir needs py-spy: pip install --target DIR py-spy; --py-spy DIR/bin/py-spy")
    return args


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def sizes_from(args: argparse.Namespace) -> tuple[ThroughputSizes, IdleSizes, FanoutSizes,
                                                  DurableSizes, NodesSizes]:
    full = args.full
    tp = ThroughputSizes()
    tp.warmup_s = _pick(args.warmup, tp.warmup_s)
    tp.duration_s = _pick(args.duration, 15.0 if full else tp.duration_s)
    tp.calibrate_connections = _pick(args.calibrate_connections, tp.calibrate_connections)
    tp.agents = _pick(args.agents, tp.agents)
    tp.clients = _pick(args.clients, tp.clients)
    idle_sizes = IdleSizes(agents=_pick(args.idle_agents, 10_000 if full else IdleSizes.agents))
    nodes_sizes = NodesSizes(
        agents=_pick(args.nodes_agents, NodesSizes.agents),
        rate_per_s=_pick(args.nodes_rate, NodesSizes.rate_per_s),
        warmup_s=tp.warmup_s, duration_s=tp.duration_s,
        herd_agents=_pick(args.herd_agents, 10_000 if full else NodesSizes.herd_agents))
    fan = FanoutSizes(agents=_pick(args.fanout_agents, FanoutSizes.agents),
                      repeats=_pick(args.fanout_rounds, FanoutSizes.repeats))
    dur = DurableSizes(agents=_pick(args.durable_agents, DurableSizes.agents),
                       tasks_per_agent=_pick(args.durable_tasks_per_agent,
                                             DurableSizes.tasks_per_agent))
    return tp, idle_sizes, fan, dur, nodes_sizes


async def main(args: argparse.Namespace) -> int:
    # Every request leaves a few short-lived objects; the default thresholds would run the cyclic
    # collector hundreds of times a second over tens of thousands of connection objects.
    gc.set_threshold(100_000, 50, 100)
    log(pin_generator())
    log(f"file descriptor limit {raise_fd_limit()}")
    admin = tuple(args.admin.split(":", 1)) if args.admin else None
    env = Env(url=args.url, classic_agents=args.classic_agents, server_args=args.server_arg,
              db=args.db,
              calibrate_per_s=args.calibrate_per_s, keep_workdir=args.keep_workdir,
              profile_dir=args.profile_dir, py_spy=args.py_spy)
    if admin is not None:
        env.admin = (admin[0], admin[1])
    tp, idle_sizes, fan, dur, nodes_sizes = sizes_from(args)
    wanted = args.scenarios.split(",")
    runs: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {
        "calibrate": lambda: calibrate(tp, args.calibrate_url),
        "roundtrip": lambda: roundtrip(env, tp),
        "idle": lambda: idle(env, idle_sizes),
        "fanout": lambda: fanout(env, fan),
        "durable": lambda: durable(env, dur),
        "nodes": lambda: nodes(env, nodes_sizes),
        "enrolled": lambda: enrolled(env, EnrolledSizes(
            agents=tp.agents, clients=tp.clients, warmup_s=tp.warmup_s,
            duration_s=tp.duration_s, herd_agents=5000 if args.full else 1000)),
        "jobs": lambda: jobs(env, JobSizes(selector_agents=10_000 if args.full else 2000)),
    }
    failed = 0
    for rep in range(args.repeat):
        for name in SCENARIOS:
            if name not in wanted or (name == "calibrate" and args.calibrate_per_s):
                continue
            log(f"{name}: start")
            t0 = time.monotonic()
            try:
                result = await runs[name]()
            except Exception as e:  # noqa: BLE001 - one broken scenario must not hide the others
                traceback.print_exc(file=sys.stderr)
                result = {"scenario": name, "failed": f"{type(e).__name__}: {e}"}
                failed += 1
            result["wall_s"] = round(time.monotonic() - t0, 1)
            if args.repeat > 1:
                result["repeat"] = rep
            if name == "calibrate" and result.get("requests_per_s"):
                env.calibrate_per_s = result["requests_per_s"]
            print(json.dumps(result), flush=True)
    return 1 if failed else 0


def run(argv: list[str] | None = None) -> int:
    return run_on_uvloop(main(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(run())
