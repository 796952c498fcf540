"""The real Clock (core/ports.py): the system's wall time, the monotonic time, the loop's timers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from dutserver.core.ports import Timer


class SystemClock:
    def now_ms(self) -> int:
        return int(time.time() * 1000)

    def monotonic(self) -> float:
        return time.monotonic()

    def call_later(self, delay_s: float, fn: Callable[..., object], *args: Any) -> Timer:
        return asyncio.get_running_loop().call_later(delay_s, fn, *args)


def now_ms() -> int:
    """Wall time in milliseconds, for code outside the core's services (the command line)."""
    return int(time.time() * 1000)
