"""Optional sampling profile of the server during a measured window, with py-spy.

py-spy is not a project dependency: install it anywhere (`pip install --target DIR py-spy`) and
pass `--profile-dir OUT --py-spy DIR/bin/py-spy`. The raw output is collapsed stacks, which
speedscope.app and flamegraph.pl read; the top functions also go to stderr.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections import Counter
from pathlib import Path

from bench.drive import Window

# Frames every sample of a thread passes through: inclusive shares of them say nothing.
_ENTRY_FRAMES = ("<frozen runpy>", "click/", "dutserver/__main__.py", "dutserver/cli.py",
                 "dutserver/server.py:run", "uvicorn/server.py", "uvicorn/main.py",
                 "uvicorn/_compat.py", "uvicorn/__main__.py", "asyncio/runners.py", "threading.py")

# A frame in py-spy's collapsed output: "function (path/to/file.py:123)".
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


class ServerProfile:
    """Records the server `pid` with py-spy during `window`; summary() after it closed."""

    def __init__(self, py_spy: str, pid: int, window: Window, out: Path) -> None:
        self.out = out
        self._task = asyncio.create_task(self._record(py_spy, pid, window))

    async def _record(self, py_spy: str, pid: int, window: Window) -> str:
        await asyncio.sleep(max(0.0, window.start - time.monotonic()))
        duration = max(1, round(window.end - time.monotonic()))
        proc = await asyncio.create_subprocess_exec(
            py_spy, "record", "--pid", str(pid), "--duration", str(duration), "--rate", "250",
            "--format", "raw", "--output", str(self.out),
            *os.environ.get("BENCH_PY_SPY_ARGS", "--nonblocking").split(),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        return "" if proc.returncode == 0 else err.decode(errors="replace")[-500:]

    async def summary(self, top: int = 25) -> dict[str, object]:
        problem = await self._task
        if problem or not self.out.exists():
            return {"profile_error": problem or "py-spy wrote nothing"}
        return {"profile": str(self.out), **top_functions(self.out.read_text(), top)}


def top_functions(collapsed: str, top: int) -> dict[str, object]:
    """Self and inclusive sample shares per function (file:function) from collapsed stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_name(f) for f in stack.split(";")]
        own[frames[-1]] += count
        for name in set(frames):
            if not name.startswith(_ENTRY_FRAMES):
                inclusive[name] += count
    if not total:
        return {"samples": 0}

    def share(c: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(n / total, 3)) for name, n in c.most_common(top)]

    return {"samples": total, "self": share(own), "inclusive": share(inclusive)}


def _name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m["file"]
    # Keep the part that says where the code lives: "dutserver/tasks.py", "uvicorn/…", "asyncio/…".
    for marker in ("site-packages/", "python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{m['func']}"


def format_profile(summary: dict[str, object]) -> str:
    """A few readable lines: where the server's samples are spent, own time and inclusive."""
    if "self" not in summary:
        return str(summary)
    lines = [f"{summary['samples']} samples (all threads) in {summary.get('profile')}"]
    for kind in ("self", "inclusive"):
        entries = summary[kind]
        assert isinstance(entries, list)
        lines.append(f"  {kind}:")
        lines += [f"    {share * 100:5.1f}%  {name}" for name, share in entries]
    return "\n".join(lines)
