"""Instructions per round trip: the server's own CPU work, counted instead of timed.

    python -m bench.instructions [--round-trips 1000] [--agents 16] [--clients 16]

This VM's speed drifts by 20-30 % between runs, so a change worth 5 % cannot be seen in
round trips/s. valgrind's callgrind counts the instructions the server executes in user space,
which repeat within about a percent for the same code and load, whatever else the machine does.
The server runs under callgrind with counting off; after start-up and a warm-up the generator
switches it on (`callgrind_control -i on`), sends exactly N blocking pings through bench agents
that answer at once, and switches it off again. Kernel work (sockets, file writes) is not in
the count, and the server runs about 50 times slower, so commits batch differently than at full
speed: compare builds with each other, not with the timed figures. The server's periodic
work is slowed down alike (`--index-interval-s 5`, 50 x 0.1 s), so that each pass over the
history's look-ups covers as many tasks as at full speed, and costs as much per round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path

from bench.actors import Credentials, create_agents, login
from bench.env import Env, Handle, run_on_uvloop
from bench.loadgen import Connection
from bench.servers import BENCH_ADMIN, dutserver, workdir
from bench.throughput import _ping_submitter


async def count(round_trips: int, agents: int, clients: int, warmup: int,
                keep: Path | None = None) -> dict[str, object]:
    tmp = workdir()
    out = tmp / "callgrind.out"
    proc = dutserver(tmp, "--index-interval-s", "5")
    proc.cmd[:0] = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                    f"--callgrind-out-file={out}"]
    try:
        await proc.start(ready_timeout_s=300)
        handle = Handle(Env(), proc.target, proc)
        token = await login(proc.target, *BENCH_ADMIN)
        creds: list[Credentials] = await create_agents(
            proc.target, token, [f"i{n}" for n in range(agents)])
        fleet = handle.fleet(creds)
        fleet.start()
        try:
            await handle.wait_online(creds, timeout_s=300)
            submit = _ping_submitter([c.name for c in creds])
            conns = [Connection(proc.target, {"Authorization": token,
                                              "Content-Type": "application/json"})
                     for _ in range(clients)]
            errors = await _send(conns, submit, warmup)
            _control("-i", "on", proc.pid)
            errors += await _send(conns, submit, round_trips)
            _control("-i", "off", proc.pid)
            for c in conns:
                c.close()
        finally:
            await fleet.stop()
        await proc.stop(timeout_s=120)
        instructions = _total(out)
        if keep is not None:  # for callgrind_annotate: which C functions the count is made of
            keep.mkdir(parents=True, exist_ok=True)
            for path in out.parent.glob(out.name + "*"):
                shutil.copy(path, keep)
    finally:
        if proc.running:
            await proc.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"scenario": "instructions", "round_trips": round_trips, "agents": agents,
            "clients": clients, "errors": errors,
            "instructions_per_round_trip": round(instructions / round_trips)}


async def _send(conns: list[Connection], submit, total: int) -> int:  # type: ignore[no-untyped-def]
    """Exactly `total` round trips over the connections; returns how many failed."""
    left = total
    errors = 0

    async def worker(conn: Connection) -> None:
        nonlocal left, errors
        while left > 0:
            left -= 1
            if await submit(conn) is not None:
                errors += 1

    await asyncio.gather(*(worker(c) for c in conns))
    return errors


def _control(*args: object) -> None:
    subprocess.run(["callgrind_control", *map(str, args)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _total(out: Path) -> int:
    """The instruction total of the callgrind dump(s) (one file per dump and thread)."""
    total = 0
    for path in sorted(out.parent.glob(out.name + "*")):
        m = re.search(r"^totals: (\d+)", path.read_text(errors="replace"), re.M)
        if m:
            total += int(m.group(1))
    return total


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--round-trips", type=int, default=1000)
    p.add_argument("--agents", type=int, default=16)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--keep", type=Path, metavar="DIR",
                   help="copy the callgrind output into DIR (read it with callgrind_annotate)")
    args = p.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("bench.instructions needs valgrind (apt-get install valgrind)")

    async def run() -> int:
        print(json.dumps(await count(args.round_trips, args.agents, args.clients, args.warmup,
                                      args.keep)))
        return 0

    run_on_uvloop(run())


if __name__ == "__main__":
    main()
