"""Soak: N agents polling and answering for M minutes while clients submit at a steady rate.

    python -m bench.soak --agents 2000 --minutes 10 --rate 100
    python -m bench.soak --agents 200 --minutes 1            # a quick look
    python -m bench.soak --url http://host:port --admin user:pass   # no RSS / fds then

Half the submits (--blocking-share) are blocking `POST /tasks?target=<random agent>`, the
others non-blocking `POST /api/v1/tasks` whose ids are kept and looked up at the end. Every
--sample-s seconds the server's RSS and open file descriptors are read from /proc. One JSON
line on stdout; progress on stderr. The server runs under `taskset -c 0`, this generator on
core 1, as in bench.run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.actors import TRANSIENT, AgentCounters
from bench.drive import Stats
from bench.durable import _drain
from bench.env import run_on_uvloop, Env, log
from bench.loadgen import Connection, error_kind
from bench.servers import pin_generator, proc_rss_kb, raise_fd_limit

PING = json.dumps({"type": "ping"}).encode()
BLOCKING_TIMEOUT_S = 30  # the server's wait for a blocking submit; agents answer in milliseconds
LATE_S = 5.0  # an arrival this late is skipped (counted as behind), so the run ends on time


@dataclass
class SoakSizes:
    agents: int = 2000
    minutes: float = 10.0
    rate_per_s: float = 100.0
    clients: int = 32  # submitter connections; bounds the submits in flight
    blocking_share: float = 0.5
    sample_s: float = 10.0
    drain_timeout_s: float = 60.0


@dataclass
class Submits:
    """What the submitters did: blocking outcomes, acknowledged non-blocking ids, failures."""

    blocking_ok: int = 0
    blocking_failed: int = 0
    ids: list[int] = field(default_factory=list)
    behind: int = 0  # arrivals skipped because the submitters were more than LATE_S behind
    errors: Counter[str] = field(default_factory=Counter)
    latency: Stats = field(default_factory=Stats)


# ---------------------------------------------------------------------------------------------
# Pure helpers (tests/test_loadgen.py checks them)
# ---------------------------------------------------------------------------------------------

def slope_per_min(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over t, per minute of t (t in seconds); None below 2 points."""
    if len(points) < 2:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    cov = sum((t - mean_t) * (y - mean_y) for t, y in points)
    return cov / var * 60


def summarise_samples(samples: Sequence[tuple[float, float, int]],
                      duration_s: float) -> dict[str, Any]:
    """first/last/max of RSS (MB) and fds, and the RSS slope over the second half of the run."""
    if not samples:
        return {"rss_mb": None, "fds": None, "rss_slope_mb_per_min_second_half": None}
    rss = [s[1] for s in samples]
    fds = [s[2] for s in samples]
    half = [(t, r) for t, r, _ in samples if t >= duration_s / 2]
    slope = slope_per_min(half)
    return {
        "rss_mb": {"first": rss[0], "last": rss[-1], "max": max(rss)},
        "fds": {"first": fds[0], "last": fds[-1], "max": max(fds)},
        "rss_slope_mb_per_min_second_half": None if slope is None else round(slope, 3),
    }


def account(ids: Sequence[int], states: dict[int, dict[str, Any]],
            deliveries: dict[int, list[str]]) -> dict[str, Any]:
    """Non-blocking tasks at the end: done, lost (missing, or not done: agents answer every task
    at once and nothing is killed, so any other state is a loss) and duplicated (deliveries of
    any task id, blocking ones included, beyond the first)."""
    states_seen = Counter(str(states[i].get("state")) if i in states else "missing" for i in ids)
    lost = [i for i in ids if states.get(i, {}).get("state") != "done"]
    duplicated = sum(len(got) - 1 for got in deliveries.values() if len(got) > 1)
    return {"done": states_seen.get("done", 0), "lost": len(lost), "lost_examples": lost[:10],
            "duplicated": duplicated, "states": dict(states_seen)}


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def sample(pid: int | None, t0: float, every_s: float, until: float,
                 out: list[tuple[float, float, int]]) -> None:
    """Appends (t, rss_mb, fds) now and every every_s until `until` (monotonic)."""
    if pid is None:
        return
    while True:
        now = time.monotonic()
        out.append((round(now - t0, 1), round(proc_rss_kb(pid) / 1024, 1), proc_fds(pid)))
        if now + every_s > until + 0.5:
            return
        await asyncio.sleep(max(0.0, t0 + len(out) * every_s - time.monotonic()))


async def submit_one(conn: Connection, target: str, blocking: bool, done: Submits) -> None:
    sent = time.monotonic()
    try:
        if blocking:
            r = await conn.request("POST", f"/tasks?target={target}&timeout={BLOCKING_TIMEOUT_S}",
                                   PING, timeout_s=BLOCKING_TIMEOUT_S + 10, reuse_head=False)
            if r.status == 200 and json.loads(r.body).get("pong") is True:
                done.blocking_ok += 1
                done.latency.ok(time.monotonic() - sent)
                return
            done.blocking_failed += 1
            done.errors[f"blocking http {r.status}"] += 1
            return
        body = json.dumps({"targets": [target], "task": {"type": "ping"},
                           "expires_s": 3600}).encode()
        r = await conn.request("POST", "/api/v1/tasks", body, timeout_s=30)
        if r.status != 202:
            done.errors[f"queued http {r.status}"] += 1
            return
        done.ids.extend(int(t["id"]) for t in r.json()["tasks"])
        done.latency.ok(time.monotonic() - sent)
    except TRANSIENT as e:
        if blocking:
            done.blocking_failed += 1
        done.errors[("blocking " if blocking else "queued ") + error_kind(e)] += 1
    except (ValueError, KeyError) as e:
        done.errors["bad answer " + error_kind(e)] += 1


async def submitters(conns: Sequence[Connection], names: list[str], sizes: SoakSizes,
                     start: float, end: float, done: Submits) -> None:
    """Arrivals evenly spaced at rate_per_s from start to end, shared by the connections: at
    most one submit in flight on each; an arrival more than LATE_S overdue is skipped."""
    total = int((end - start) * sizes.rate_per_s)
    arrivals = iter(range(total))
    rng = random.Random(1)

    async def worker(conn: Connection) -> None:
        for i in arrivals:
            due = start + i / sizes.rate_per_s
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif -delay > LATE_S:
                done.behind += 1
                continue
            await submit_one(conn, rng.choice(names), rng.random() < sizes.blocking_share, done)

    await asyncio.gather(*(worker(c) for c in conns))


async def soak(env: Env, sizes: SoakSizes) -> dict[str, Any]:
    async with env.server() as srv:
        pid = srv.process.pid if srv.process is not None else None
        if pid is None:
            log("soak: external server, no RSS or file descriptor samples")
        log(f"soak: creating {sizes.agents} agents")
        creds = await srv.agents(sizes.agents)
        fleet = srv.fleet(creds)
        counters: AgentCounters = fleet.counters
        counters.deliveries = {}
        fleet.start()
        try:
            await srv.wait_online(creds, timeout_s=120)
            duration_s = sizes.minutes * 60
            log(f"soak: {sizes.agents} agents online; {sizes.rate_per_s:g} submits/s for "
                f"{sizes.minutes:g} min")
            headers = {"Authorization": await srv.token(), "Content-Type": "application/json"}
            # Connected before the first sample, closed after the last: the fd count then
            # shows what the soak did to the server, not the submitters arriving.
            conns = [Connection(srv.target, headers) for _ in range(sizes.clients)]
            await asyncio.gather(*(c.connect() for c in conns))
            samples: list[tuple[float, float, int]] = []
            done = Submits()
            t0 = time.monotonic()
            end = t0 + duration_s
            sampler = asyncio.create_task(sample(pid, t0, sizes.sample_s, end, samples))
            progress = asyncio.create_task(_progress(t0, end, done, samples))
            try:
                await submitters(conns, [c.name for c in creds], sizes, t0, end, done)
                load_s = time.monotonic() - t0
                await sampler
            finally:
                progress.cancel()
                for c in conns:
                    c.close()
            log(f"soak: load over after {load_s:.0f} s; looking up {len(done.ids)} task ids")
            token = await srv.token()
            states = await _drain(srv, token, done.ids, sizes.drain_timeout_s) if done.ids else {}
            if pid is not None:
                after = (round(time.monotonic() - t0, 1), round(proc_rss_kb(pid) / 1024, 1),
                         proc_fds(pid))
        finally:
            await fleet.stop()
    tally = account(done.ids, states, counters.deliveries)
    refused_results = sum(counters.result_status.values())
    agent_errors = sum(counters.errors.values())
    errors = sum(done.errors.values()) + agent_errors + refused_results
    submitted = done.blocking_ok + done.blocking_failed + len(done.ids)
    return {
        "scenario": "soak", "agents": sizes.agents, "minutes": sizes.minutes,
        "rate_per_s": sizes.rate_per_s, "clients": sizes.clients,
        "blocking_share": sizes.blocking_share,
        "samples": [list(s) for s in samples],
        **summarise_samples(samples, duration_s),
        "after_drain": list(after) if pid is not None else None,
        "tasks": {
            "submitted": submitted,
            "done": done.blocking_ok + tally["done"],
            "lost": tally["lost"],
            "duplicated": tally["duplicated"],
            "errors": errors,
        },
        "blocking": {"ok": done.blocking_ok, "failed": done.blocking_failed},
        "queued": {"acked": len(done.ids), "states": tally["states"],
                   "lost_examples": tally["lost_examples"]},
        "submit_p50_ms": done.latency.percentile_ms(50),
        "submit_p99_ms": done.latency.percentile_ms(99),
        "submit_max_ms": done.latency.percentile_ms(100),
        "achieved_per_s": round(submitted / load_s, 1) if load_s > 0 else None,
        "behind_schedule": done.behind,
        "error_kinds": dict(done.errors), "agent_errors": dict(counters.errors),
        "agent_result_status": {str(k): v for k, v in counters.result_status.items()},
        "agent_polls": counters.polls, "agent_empty_polls": counters.empty_polls,
        "targets": {"0 lost": tally["lost"] == 0, "0 duplicated": tally["duplicated"] == 0,
                    "0 errors": errors == 0},
    }


async def _progress(t0: float, end: float, done: Submits,
                    samples: list[tuple[float, float, int]]) -> None:
    """One stderr line a minute, so a long run shows it is alive."""
    while time.monotonic() < end:
        await asyncio.sleep(60)
        last = samples[-1] if samples else None
        log(f"soak: {time.monotonic() - t0:.0f} s, blocking ok {done.blocking_ok}, "
            f"queued {len(done.ids)}, errors {sum(done.errors.values())}"
            + (f", rss {last[1]} MB, fds {last[2]}" if last else ""))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = SoakSizes()
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=d.agents)
    p.add_argument("--minutes", type=float, default=d.minutes)
    p.add_argument("--rate", type=float, default=d.rate_per_s, help="submits per second")
    p.add_argument("--clients", type=int, default=d.clients,
                   help="submitter connections (at most this many submits in flight)")
    p.add_argument("--blocking-share", type=float, default=d.blocking_share,
                   help="fraction of submits that are blocking POST /tasks (the rest: /api/v1/tasks)")
    p.add_argument("--sample-s", type=float, default=d.sample_s,
                   help="seconds between RSS / fd samples")
    p.add_argument("--url", help="soak this running server instead of a fresh dutserver")
    p.add_argument("--admin", default=None, metavar="USER:PASS", help="admin credentials on --url")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for the dutserver started (repeatable)")
    p.add_argument("--keep-workdir", action="store_true", help="keep the database and server log")
    args = p.parse_args(argv)
    if args.agents < 1 or args.minutes <= 0 or args.rate <= 0 or args.clients < 1:
        p.error("--agents, --minutes, --rate and --clients must be positive")
    if not 0 <= args.blocking_share <= 1:
        p.error("--blocking-share is a fraction between 0 and 1")
    if args.sample_s <= 0:
        p.error("--sample-s must be positive")
    if args.url and not args.admin:
        p.error("--url needs --admin USER:PASS")
    return args


async def main(args: argparse.Namespace) -> int:
    gc.set_threshold(100_000, 50, 100)  # as bench.run: thousands of connection objects
    log(pin_generator())
    log(f"file descriptor limit {raise_fd_limit()}")
    env = Env(url=args.url, server_args=args.server_arg, keep_workdir=args.keep_workdir)
    if args.admin:
        user, _, password = args.admin.partition(":")
        env.admin = (user, password)
    sizes = SoakSizes(agents=args.agents, minutes=args.minutes, rate_per_s=args.rate,
                      clients=args.clients, blocking_share=args.blocking_share,
                      sample_s=args.sample_s)
    t0 = time.monotonic()
    result = await soak(env, sizes)
    result["wall_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps(result), flush=True)
    return 0 if all(result["targets"].values()) else 1


def run(argv: list[str] | None = None) -> int:
    return run_on_uvloop(main(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(run())
