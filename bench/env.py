"""What every scenario gets: the server to measure (ours, or any dutserver-compatible URL) and the
calibration figure to relate its throughput to."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.actors import (
    AgentFleet,
    BenchError,
    Credentials,
    create_agents,
    login,
    online_agents,
    unique_prefix,
)
from bench.drive import Window
from bench.loadgen import Connection, Target
from bench.pg import fresh_database
from bench.profile import ServerProfile
from bench.servers import BENCH_ADMIN, ServerProcess, dutserver, workdir


def log(msg: str) -> None:
    """Progress goes to stderr; stdout carries only the JSON lines."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


@dataclass
class Env:
    url: str | None = None  # an external server; None starts a fresh dutserver per scenario
    admin: tuple[str, str] = BENCH_ADMIN
    classic_agents: bool = False  # agents send `Authorization: name:secret` and post to /task_result
    server_args: list[str] = field(default_factory=list)  # extra flags for our dutserver
    calibrate_per_s: float | None = None
    keep_workdir: bool = False
    profile_dir: Path | None = None  # with py_spy: where server profiles of load windows go
    py_spy: str | None = None
    # A PostgreSQL server (postgresql://user@host:port/any): each scenario's server then runs
    # on a fresh database there (bench/pg.py) instead of a fresh SQLite file.
    db: str | None = None

    @property
    def external(self) -> bool:
        return self.url is not None

    @contextlib.asynccontextmanager
    async def server(self, *extra_args: str) -> AsyncIterator[Handle]:
        """A server for one scenario: a fresh dutserver on its core, or the external URL."""
        if self.url is not None:
            yield Handle(self, Target.from_url(self.url), None)
            return
        async with self.nodes(1, *extra_args) as handles:
            yield handles[0]

    @contextlib.asynccontextmanager
    async def database(self) -> AsyncIterator[str | None]:
        """A fresh PostgreSQL database for one scenario (dropped after), or None: SQLite."""
        if self.db is None:
            yield None
            return
        async with fresh_database(self.db) as url:
            yield url

    @contextlib.asynccontextmanager
    async def nodes(self, count: int, *extra_args: str) -> AsyncIterator[list[Handle]]:
        """count fresh dutservers on one new database (several need PostgreSQL: --db), each
        with its own node name, started one after the other."""
        if count > 1 and self.db is None:
            raise BenchError("several nodes share one PostgreSQL database: give --db")
        tmp = workdir()
        procs: list[ServerProcess] = []
        try:
            async with self.database() as url:
                try:
                    for _ in range(count):
                        proc = dutserver(tmp, *self.server_args, *extra_args, db=url)
                        procs.append(proc)
                        await proc.start()
                    yield [Handle(self, p.target, p, url) for p in procs]
                finally:
                    for proc in procs:
                        if proc.running:
                            await proc.stop()
        finally:
            if not self.keep_workdir:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                log(f"kept {tmp}")


@dataclass
class Handle:
    env: Env
    target: Target
    process: ServerProcess | None  # None for an external server: no restart, no RSS
    database: str | None = None  # the PostgreSQL database's URL, when it runs on one

    async def token(self) -> str:
        return await login(self.target, *self.env.admin)

    async def agents(self, count: int) -> list[Credentials]:
        prefix = unique_prefix()
        names = [f"{prefix}{i}" for i in range(count)]
        return await create_agents(self.target, await self.token(), names)

    async def wait_online(self, creds: list[Credentials], timeout_s: float,
                          interval_s: float = 0.2) -> float:
        """Waits until the server reports all these agents online; returns the seconds it took."""
        names = {c.name for c in creds}
        conn = Connection(self.target, {"Authorization": await self.token()})
        start = time.monotonic()
        try:
            while True:
                seen = await online_agents(conn, names)
                if seen >= len(names):
                    return time.monotonic() - start
                if time.monotonic() - start > timeout_s:
                    raise BenchError(f"only {seen} of {len(names)} agents online after {timeout_s} s")
                await asyncio.sleep(interval_s)
        finally:
            conn.close()

    def profile(self, name: str, window: Window) -> ServerProfile | None:
        """A py-spy profile of this server during window, when asked for on the command line."""
        if self.process is None or self.env.profile_dir is None or self.env.py_spy is None:
            return None
        self.env.profile_dir.mkdir(parents=True, exist_ok=True)
        out = self.env.profile_dir / f"{name}.collapsed.txt"
        return ServerProfile(self.env.py_spy, self.process.pid, window, out)

    def fleet(self, creds: list[Credentials], **kwargs: object) -> AgentFleet:
        return AgentFleet(self.target, creds, classic_auth=self.env.classic_agents, **kwargs)


def skipped(scenario: str, why: str) -> dict[str, object]:
    return {"scenario": scenario, "skipped": why}


def run_on_uvloop(main: Coroutine[Any, Any, int]) -> int:
    """Runs main on uvloop (the generator costs less CPU per request there), else on asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
