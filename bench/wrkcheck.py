"""A second opinion on calibrate and roundtrip from an independent generator: wrk.

    python -m bench.wrkcheck [--rounds 2] [--duration 8] [--wrk /usr/bin/wrk]

wrk (C, Debian's package `wrk`; not a project dependency) sends the hello requests of
calibrate and the blocking submits of roundtrip (64 connections, one thread, each submit to a
random one of 100 agents), pinned to the generator's core like bench.run; the agents that
answer are the bench's own (this process, the same core). The ratio is wrk's round trips/s
over wrk's hellos/s in the same round. One JSON line per round; no wrk, one line saying so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bench.env import Env, run_on_uvloop
from bench.servers import calibrate_server, pin_generator, raise_fd_limit, workdir

_SUBMITS = """
wrk.method = "POST"
wrk.body = '{"type": "ping"}'
wrk.headers["Authorization"] = "%(token)s"
wrk.headers["Content-Type"] = "application/json"
local names = {%(names)s}
request = function()
  return wrk.format(nil, "/tasks?target=" .. names[math.random(#names)])
end
"""


async def _wrk(wrk: str, url: str, duration_s: float, script: Path | None = None) -> dict[str, Any]:
    args = [wrk, "-t1", "-c64", f"-d{duration_s:g}s", "--latency", url]
    if script is not None:
        args[1:1] = ["-s", str(script)]
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    return parse((await proc.communicate())[0].decode(errors="replace"))


def parse(out: str) -> dict[str, Any]:
    """wrk's report: requests/s, the p99 of --latency, errors (non-2xx/3xx and socket)."""
    per_s = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    return {"per_s": float(per_s.group(1)) if per_s else None,
            "p99_ms": round(float(p99.group(1)) * scale[p99.group(2)], 3) if p99 else None,
            "errors": (int(bad.group(1)) if bad else 0)
            + (sum(int(n) for n in errors.groups()) if errors else 0)}


async def one_round(wrk: str, duration_s: float, agents: int) -> dict[str, Any]:
    tmp = workdir()
    calibrate = calibrate_server(tmp)
    await calibrate.start()
    try:
        hello = await _wrk(wrk, calibrate.url, duration_s)
    finally:
        await calibrate.stop()
    async with Env().server() as srv:
        creds = await srv.agents(agents)
        fleet = srv.fleet(creds)
        fleet.start()
        try:
            await srv.wait_online(creds, timeout_s=60)
            with tempfile.NamedTemporaryFile("w", suffix=".lua", dir=tmp, delete=False) as f:
                f.write(_SUBMITS % {"token": await srv.token(),
                                    "names": ", ".join(f'"{c.name}"' for c in creds)})
            url = f"http://{srv.target.host}:{srv.target.port}"
            submits = await _wrk(wrk, url, duration_s, Path(f.name))
        finally:
            await fleet.stop()
    agent_errors = sum(fleet.counters.errors.values())
    shutil.rmtree(tmp, ignore_errors=True)
    ratio = (round(submits["per_s"] / hello["per_s"], 3)
             if submits["per_s"] and hello["per_s"] else None)
    return {"scenario": "wrkcheck", "calibrate_per_s": hello["per_s"],
            "round_trips_per_s": submits["per_s"], "ratio": ratio,
            "p99_ms": submits["p99_ms"], "errors": submits["errors"] + agent_errors}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.wrkcheck", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--agents", type=int, default=100)
    p.add_argument("--wrk", default=shutil.which("wrk") or "wrk")
    args = p.parse_args()
    if shutil.which(args.wrk) is None:
        print(json.dumps({"scenario": "wrkcheck", "skipped": "no wrk (apt-get install wrk)"}))
        return
    print(pin_generator(), flush=True)
    raise_fd_limit()

    async def run() -> int:
        for _ in range(args.rounds):
            print(json.dumps(await one_round(args.wrk, args.duration, args.agents)), flush=True)
        return 0

    run_on_uvloop(run())


if __name__ == "__main__":
    main()
