"""Servers under test: started on their own core, watched through /proc, stopped or killed on demand."""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.loadgen import Connection, ProtocolError, Target

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
SERVER_CORE = 0
GENERATOR_CORE = 1
BENCH_ADMIN = ("benchadmin", "benchadmin-pass-1")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


_pinning = False  # set once the generator is on its core: servers then go to theirs


def pin_generator() -> str:
    """Pins this process (the generator) to its core; says what it did."""
    global _pinning
    cores = os.sched_getaffinity(0)
    if len(cores) < 2 or GENERATOR_CORE not in cores or SERVER_CORE not in cores:
        return f"not pinned: only cores {sorted(cores)} available"
    if not shutil.which("taskset"):
        return "not pinned: no taskset command"
    os.sched_setaffinity(0, {GENERATOR_CORE})
    _pinning = True
    return f"generator on core {GENERATOR_CORE}, servers under taskset -c {SERVER_CORE}"


def raise_fd_limit(wanted: int = 262_144) -> int:
    """Raises RLIMIT_NOFILE, for this process and the servers it spawns: to `wanted` where it
    may (root: the 100,000-agent runs need it; the product's defaults stay as they are), else
    to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with open("/proc/sys/fs/nr_open") as f:
            wanted = min(wanted, int(f.read()))
        if hard < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
    except (OSError, ValueError):
        pass  # not allowed: the hard limit it is
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pinned(cmd: list[str]) -> list[str]:
    return ["taskset", "-c", str(SERVER_CORE), *cmd] if _pinning else cmd


def proc_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    return sum(proc_cpu_split_s(pid))


def proc_cpu_split_s(pid: int) -> tuple[float, float]:
    """User and system (kernel: syscalls, loopback TCP) CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


@dataclass
class ServerProcess:
    """A server subprocess on SERVER_CORE; `ready_path` answers 200 once it serves."""

    cmd: list[str]
    port: int
    ready_path: str
    log: Path
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0  # monotonic time of the latest spawn
    history: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def target(self) -> Target:
        return Target.from_url(self.url)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, ready_timeout_s: float = 60.0) -> float:
        """Spawns the server and waits until it answers; returns seconds from spawn to ready."""
        log_fd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            self.started_at = time.monotonic()
            self.proc = await asyncio.create_subprocess_exec(
                *_pinned(self.cmd), stdout=log_fd, stderr=subprocess.STDOUT, cwd=ROOT,
                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        finally:
            os.close(log_fd)
        self.history.append(" ".join(_pinned(self.cmd)))
        deadline = self.started_at + ready_timeout_s
        conn = Connection(self.target, connect_timeout_s=1.0)
        try:
            while True:
                if not self.running:
                    raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.tail()}")
                try:
                    r = await conn.request("GET", self.ready_path, timeout_s=2.0)
                    if r.status == 200:
                        return time.monotonic() - self.started_at
                except (OSError, TimeoutError, ProtocolError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server not ready in {ready_timeout_s} s:\n{self.tail()}")
                await asyncio.sleep(0.01)
        finally:
            conn.close()

    async def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout_s)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise RuntimeError(f"server did not stop within {timeout_s} s after {sig}") from None

    async def kill9(self) -> None:
        await self.stop(signal.SIGKILL)

    def rss_kb(self) -> int:
        return proc_rss_kb(self.pid)

    def cpu_s(self) -> float:
        return proc_cpu_s(self.pid)

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="dutbench-"))


def calibrate_server(tmp: Path) -> ServerProcess:
    """The hello-world Starlette app under uvicorn with its defaults (uvloop and httptools when
    installed, as here), minus the access log, which dutserver does not write either."""
    port = free_port()
    cmd = [PYTHON, "-m", "uvicorn", "bench.calibrate_app:app", "--host", "127.0.0.1",
           "--port", str(port), "--no-access-log", "--log-level", "warning"]
    return ServerProcess(cmd, port, "/", tmp / "calibrate.log")


def dutserver(tmp: Path, *extra_args: str, db: str | None = None) -> ServerProcess:
    """A dutserver on a fresh database with the bench admin account: an SQLite file in tmp, or
    the PostgreSQL database of the URL db (made by bench/pg.py; the key file stays in tmp, so
    several servers started with the same tmp share it, as the nodes of one fleet must)."""
    database = db if db is not None else str(tmp / "dut.db")
    key = ["--key-file", str(tmp / "dut.key")] if db is not None else []
    marker = tmp / ".admin-added"
    if not marker.exists():
        subprocess.run([PYTHON, "-m", "dutserver", "addaccount", database, BENCH_ADMIN[0],
                        "admin"], input=BENCH_ADMIN[1] + "\n", text=True, check=True,
                       capture_output=True, cwd=ROOT, timeout=60,
                       env=dict(os.environ, **({"DUTSERVER_KEY_FILE": key[1]} if key else {})))
        marker.touch()
    port = free_port()
    cmd = [PYTHON, "-m", "dutserver", "server", str(port), database, *key, *extra_args]
    return ServerProcess(cmd, port, "/readyz", tmp / f"dutserver-{port}.log")
