"""asyncpg or psycopg 3: the PostgreSQL driver's own cost on what a round trip asks of the store.

    python -m bench.pgdrivers --db postgresql://postgres@127.0.0.1/postgres [--round-trips 20000]

Per round trip the store writes a task three times (queued, delivered, finished), batched by
group commit, and a node that did not hand the task over reads it once (core/sharing.py). This
runs exactly those statements (dutserver/store/postgres_sql.py's, on dutserver's own schema, in
a fresh database) through each driver in turn, in batches as the writer makes them (one
transaction per state change and batch), and reports what the node would pay: this process's
CPU per round trip (the driver's encoding, decoding and protocol work; the server's is the same
for both) and the wall time. Rounds alternate between the drivers; the medians are printed last,
then what a NOTIFY adds to a commit (asyncpg).
psycopg is not a dependency of dutserver: `pip install 'psycopg[binary]'` to run this.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from bench.pg import fresh_database
from dutserver.store import postgres_sql as pgsql
from dutserver.store.postgres_schema import migrate

READ = f"SELECT {pgsql.TASK_COLUMNS} FROM tasks WHERE id = $1"


def psycopg_text(statement: str) -> str:
    """$1, $2, … (asyncpg, PostgreSQL's own) as psycopg's %s (each appears once, in order)."""
    return re.sub(r"\$\d+", "%s", statement)


def batches(start: int, count: int, size: int) -> list[list[tuple[Any, ...]]]:
    rows = [(i, f"a{i % 100}", "ping", "{}", "queued", "admin", 1, 2**40, None, None, None, None)
            for i in range(start, start + count)]
    return [rows[i:i + size] for i in range(0, count, size)]


def updated(rows: list[tuple[Any, ...]], state: str) -> list[tuple[Any, ...]]:
    result = json.dumps({"pong": True}) if state == "done" else None
    return [(*r[:4], state, *r[5:8], 3, 4 if result else None, result, "n1") for r in rows]


Runner = Callable[[str, list[Any]], Awaitable[Any]]


async def round_trips(execute: Runner, fetch_one: Runner, start: int, count: int,
                      batch: int) -> None:
    for rows in batches(start, count, batch):
        await execute(pgsql.INSERT, pgsql.columns(rows, 12))
        await execute(pgsql.UPDATE, pgsql.update_columns(updated(rows, "delivered")))
        await execute(pgsql.UPDATE, pgsql.update_columns(updated(rows, "done")))
        for r in rows:
            await fetch_one(READ, [r[0]])


async def with_asyncpg(url: str, start: int, count: int, batch: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        async def execute(sql: str, args: list[Any]) -> None:
            async with conn.transaction():
                await conn.execute(sql, *args)

        async def fetch_one(sql: str, args: list[Any]) -> Any:
            return await conn.fetchrow(sql, *args)
        await round_trips(execute, fetch_one, start, count, batch)
    finally:
        await conn.close()


async def with_psycopg(url: str, start: int, count: int, batch: int) -> None:
    import psycopg
    conn = await psycopg.AsyncConnection.connect(url, prepare_threshold=0)
    try:
        async def execute(sql: str, args: list[Any]) -> None:
            async with conn.transaction():
                await conn.execute(psycopg_text(sql), args)

        async def fetch_one(sql: str, args: list[Any]) -> Any:
            cur = await conn.execute(psycopg_text(sql), args)
            return await cur.fetchone()
        await round_trips(execute, fetch_one, start, count, batch)
    finally:
        await conn.close()


DRIVERS = {"asyncpg": with_asyncpg, "psycopg": with_psycopg}


async def notify_cost(url: str, commits: int) -> dict[str, float]:
    """What a NOTIFY adds to a commit: the same one-row write committed `commits` times
    without and with a pg_notify in its statement (a listener connected, as on a fleet's
    nodes), medians of the wall time per commit in µs."""
    listener = await asyncpg.connect(url)
    heard = 0

    def count(*_: object) -> None:
        nonlocal heard
        heard += 1
    await listener.add_listener("dutbench", count)
    conn = await asyncpg.connect(url)
    await conn.execute("CREATE TABLE notify_probe (id bigint)")
    plain = "INSERT INTO notify_probe VALUES ($1)"
    notified = ("WITH i AS (INSERT INTO notify_probe VALUES ($1)) "
                "SELECT pg_notify('dutbench', 'f:node:' || $1::text)")
    figures: dict[str, list[float]] = {"plain": [], "notify": []}
    try:
        for n in range(commits):
            for name, sql in (("plain", plain), ("notify", notified)):
                t0 = time.perf_counter()
                await conn.execute(sql, n)
                figures[name].append((time.perf_counter() - t0) * 1e6)
    finally:
        await conn.close()
        await listener.close()
    return {"commit_us": round(statistics.median(figures["plain"]), 1),
            "commit_with_notify_us": round(statistics.median(figures["notify"]), 1),
            "notifies_heard": heard}


async def main(args: argparse.Namespace) -> None:
    import psycopg  # noqa: F401 - imported before the clock runs, not in psycopg's first round
    async with fresh_database(args.db) as url:
        conn = await asyncpg.connect(url)
        await migrate(conn)
        await conn.close()
        figures: dict[str, list[tuple[float, float]]] = {d: [] for d in DRIVERS}
        next_id = 1
        for run in DRIVERS.values():  # warm-up: connections, caches, the table's first pages
            await run(url, next_id, args.batch * 10, args.batch)
            next_id += args.batch * 10
        for rnd in range(args.rounds):
            for name, run in DRIVERS.items():
                cpu0, wall0 = time.process_time(), time.perf_counter()
                await run(url, next_id, args.round_trips, args.batch)
                cpu = (time.process_time() - cpu0) / args.round_trips * 1e6
                wall = (time.perf_counter() - wall0) / args.round_trips * 1e6
                next_id += args.round_trips
                figures[name].append((cpu, wall))
                print(json.dumps({"driver": name, "round": rnd, "client_cpu_us_per_round_trip":
                                  round(cpu, 1), "wall_us_per_round_trip": round(wall, 1)}),
                      flush=True)
        medians = {name: {"client_cpu_us": round(statistics.median(c for c, _ in f), 1),
                          "wall_us": round(statistics.median(w for _, w in f), 1)}
                   for name, f in figures.items()}
        print(json.dumps({"medians_per_round_trip": medians, "round_trips": args.round_trips,
                          "batch": args.batch, "rounds": args.rounds}), flush=True)
        print(json.dumps({"notify_cost": await notify_cost(url, args.notify_commits)}),
              flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", required=True, help="a PostgreSQL server (a fresh database is made)")
    p.add_argument("--round-trips", type=int, default=5000)
    p.add_argument("--batch", type=int, default=16, help="round trips per group commit")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--notify-commits", type=int, default=2000,
                   help="commits with and without a NOTIFY, for what one costs")
    a = p.parse_args()
    asyncio.run(main(a))
