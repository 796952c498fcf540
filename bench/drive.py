"""Load shapes: a closed loop (as fast as the server answers) and an open loop (a fixed arrival rate)."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.actors import TRANSIENT
from bench.loadgen import Connection, error_kind
from bench.servers import CLOCK_TICKS, GENERATOR_CORE, SERVER_CORE, proc_cpu_split_s


@dataclass
class Stats:
    """Latencies of successful requests and counts of failures, inside one measurement window."""

    latencies_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    window_start: float = 0.0
    # Successes per second of the window (by send time): shows stalls that an average hides.
    per_second: Counter[int] = field(default_factory=Counter)

    def ok(self, latency_s: float, sent_at: float | None = None) -> None:
        self.latencies_s.append(latency_s)
        if sent_at is not None:
            self.per_second[int(sent_at - self.window_start)] += 1

    def error(self, kind: str) -> None:
        self.errors[kind] += 1

    @property
    def count(self) -> int:
        return len(self.latencies_s)

    def percentile_ms(self, p: float) -> float | None:
        """Nearest-rank percentile in milliseconds; None without samples."""
        if not self.latencies_s:
            return None
        ordered = sorted(self.latencies_s)
        rank = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
        return round(ordered[rank] * 1000, 3)

    def summary(self, elapsed_s: float) -> dict[str, Any]:
        return {
            "count": self.count,
            "per_s": round(self.count / elapsed_s, 1) if elapsed_s > 0 else None,
            "p50_ms": self.percentile_ms(50),
            "p99_ms": self.percentile_ms(99),
            "max_ms": self.percentile_ms(100),
            "errors": sum(self.errors.values()),
            "error_kinds": dict(self.errors),
            "per_second": [self.per_second[i] for i in range(int(elapsed_s))],
        }


class Window:
    """The measurement window of a run: a warm-up, then `duration_s` during which results count."""

    def __init__(self, warmup_s: float, duration_s: float) -> None:
        now = time.monotonic()
        self.start = now + warmup_s
        self.end = self.start + duration_s

    def counts(self, sent_at: float) -> bool:
        """Counts a request by when it was sent, so a stalled one in the window is not lost."""
        return self.start <= sent_at < self.end

    def closed(self) -> bool:
        return time.monotonic() >= self.end

# One request (or exchange) on a connection: None when it went as expected, else an error kind.
Call = Callable[[Connection], Awaitable[str | None]]


async def _timed(conn: Connection, call: Call) -> str | None:
    try:
        return await call(conn)
    except TRANSIENT as e:
        return error_kind(e)
    except ValueError as e:  # a body that is not the JSON it should be
        return error_kind(e)


async def closed_loop(conns: Sequence[Connection], call: Call, window: Window) -> Stats:
    """Each connection sends its next request as soon as the previous one is answered."""
    stats = Stats(window_start=window.start)

    async def worker(conn: Connection) -> None:
        while True:
            sent = time.monotonic()
            if sent >= window.end:
                return
            err = await _timed(conn, call)
            if window.counts(sent):
                if err is None:
                    stats.ok(time.monotonic() - sent, sent)
                else:
                    stats.error(err)
            if err is not None:
                await asyncio.sleep(0.01)  # a failing server must not turn this into a busy loop

    await asyncio.gather(*(worker(c) for c in conns))
    return stats


async def open_loop(conns: Sequence[Connection], call: Call, rate_per_s: float, window: Window,
                    seed: int = 1) -> Stats:
    """Requests arrive as a Poisson process of `rate_per_s`, whatever the server's speed.

    Latency runs from the scheduled arrival, not from the send, so a request that waited for a
    free connection counts its wait (no coordinated omission)."""
    rng = random.Random(seed)
    schedule: deque[float] = deque()
    t = time.monotonic()
    while t < window.end:
        t += rng.expovariate(rate_per_s)
        schedule.append(t)
    stats = Stats(window_start=window.start)

    async def worker(conn: Connection) -> None:
        while schedule:
            due = schedule.popleft()
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            err = await _timed(conn, call)
            if window.counts(due):
                if err is None:
                    stats.ok(time.monotonic() - due, due)
                else:
                    stats.error(err)

    await asyncio.gather(*(worker(c) for c in conns))
    return stats


def _core_busy_s() -> dict[int, tuple[float, float]]:
    """Busy CPU seconds per core since boot, and of those the seconds the hypervisor took
    (steal), from /proc/stat (all processes)."""
    busy: dict[int, tuple[float, float]] = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *ticks = line.split()
                user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, ticks[:8])
                busy[int(name[3:])] = ((user + nice + system + irq + softirq + steal) / CLOCK_TICKS,
                                       steal / CLOCK_TICKS)
    return busy


def _postgres_cpu_s() -> float:
    """CPU seconds so far of every process of a PostgreSQL server on this machine (all of its
    backends: the figure says what the database cost when it runs beside the server)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # ended meanwhile
        name, rest = text.split("(", 1)[1].rsplit(")", 1)
        if name == "postgres":
            fields = rest.split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


class CpuMeter:
    """CPU use inside a window, in fractions of one core: the server's, this generator's, and
    everything else's on each of the two cores. Other load on the machine skews every figure,
    so it is reported next to them rather than guessed at."""

    def __init__(self, server_pid: int | None, window: Window) -> None:
        self.server_pid = server_pid
        self.window = window
        self.result: dict[str, Any] = {}
        self._task = asyncio.create_task(self._measure())

    async def _measure(self) -> None:
        await asyncio.sleep(max(0.0, self.window.start - time.monotonic()))
        t0, gen0, cores0 = time.monotonic(), time.process_time(), _core_busy_s()
        user0, sys0 = proc_cpu_split_s(self.server_pid) if self.server_pid else (0.0, 0.0)
        db0 = _postgres_cpu_s()
        await asyncio.sleep(max(0.0, self.window.end - time.monotonic()))
        wall = time.monotonic() - t0
        gen = (time.process_time() - gen0) / wall
        user1, sys1 = proc_cpu_split_s(self.server_pid) if self.server_pid else (0.0, 0.0)
        srv = (user1 - user0 + sys1 - sys0) / wall
        cores1 = _core_busy_s()
        busy: dict[int, float] = {}
        stolen: dict[int, float] = {}
        for c, (busy1, stolen1) in cores1.items():
            busy0, stolen0 = cores0.get(c, (0.0, 0.0))
            busy[c], stolen[c] = (busy1 - busy0) / wall, (stolen1 - stolen0) / wall
        self.result["generator_cpu"] = round(gen, 2)
        db1 = _postgres_cpu_s()
        if db1 > db0:  # a PostgreSQL on this machine worked meanwhile (ours, or anyone's)
            self.result["postgres_cpu"] = round((db1 - db0) / wall, 2)
        if self.server_pid:
            self.result["server_cpu"] = round(srv, 2)
            self.result["server_kernel_cpu"] = round((sys1 - sys0) / wall, 2)
        if self.server_pid and SERVER_CORE in busy and GENERATOR_CORE in busy:
            # Softirq work for loopback traffic lands on either core, so small values are noise.
            self.result["other_load"] = {
                "server_core": round(max(0.0, busy[SERVER_CORE] - srv), 2),
                "generator_core": round(max(0.0, busy[GENERATOR_CORE] - gen), 2),
            }
            # The part of it the hypervisor took from this VM. In a 10 s window 0.01 is 100 ms:
            # one such pause of the server is a p99 of 100 ms at any load.
            self.result["steal"] = {"server_core": round(stolen[SERVER_CORE], 3),
                                    "generator_core": round(stolen[GENERATOR_CORE], 3)}

    async def done(self) -> dict[str, Any]:
        await self._task
        return self.result


def ratio(value: float | None, calibrate_per_s: float | None) -> float | None:
    if value is None or not calibrate_per_s:
        return None
    return round(value / calibrate_per_s, 3)
