"""The Clock port, and the real clock: the system's wall time, the monotonic time, the loop's
timers. Wall time is for what is stored, monotonic time for what is measured; a fake one (tests:
FakeClock, a subclass) lets the core tests run timeouts, expiries and bans without sleeping.

A class, not a typing.Protocol like the other ports: compiled, a call through a Protocol is a
Python method call (a lookup, an argument tuple, a boxed result), through a class a vtable call,
and the hot path asks for the time about ten times per round trip. Interpreted subclasses
(the tests' fake) still override every method.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from mypy_extensions import mypyc_attr

from dutserver.core.ports import Timer


@mypyc_attr(allow_interpreted_subclasses=True)
class Clock:
    def now_ms(self) -> int:
        return int(time.time() * 1000)

    def monotonic(self) -> float:
        return time.monotonic()

    def call_later(self, delay_s: float, fn: Callable[..., object], *args: Any) -> Timer:
        return asyncio.get_running_loop().call_later(delay_s, fn, *args)


def now_ms() -> int:
    """Wall time in milliseconds, for code outside the core's services (the command line)."""
    return int(time.time() * 1000)
