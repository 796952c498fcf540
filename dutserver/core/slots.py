"""When a schedule runs: a cron expression, once at a time, or every N seconds. Pure: every
answer is computed from the time given.

Cron expressions are parsed and iterated by croniter (the maintained library: pallets-eco), in
the schedule's time zone, five fields (minute hour day-of-month month day-of-week) or an alias
(@hourly, @daily, @weekly, @monthly, @yearly). Across daylight-saving changes a slot is a
wall-clock time: one the spring change skips runs when the clock jumps (02:30 runs at 03:00);
one the autumn change repeats runs once, at its first occurrence, when the expression names
its hours (`30 2 * * *`), and every time the clock passes it when the hour is `*` or a step
(`*/15 * * * *` keeps its real interval), as Vixie cron does.
"""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

# croniter ships no type information (no py.typed; types-croniter lags its releases): Any.
from croniter import (  # type: ignore[import-untyped, unused-ignore]
    CroniterBadDateError, CroniterError, croniter)

from dutserver.core.errors import ApiError

ALIASES = ("@hourly", "@daily", "@midnight", "@weekly", "@monthly", "@yearly", "@annually")
MAX_CRON = 200


def parse_cron(text: object, tz: ZoneInfo, now_ms: int) -> str:
    """A cron expression, checked: 400 naming the problem, or when it never fires."""
    if not isinstance(text, str) or not text.strip():
        raise ApiError(400, 'cron must be a cron expression like "0 18 * * fri"')
    expr = " ".join(text.split())
    if len(expr) > MAX_CRON:
        raise ApiError(400, f"cron: longer than {MAX_CRON} characters")
    if expr.startswith("@"):
        if expr.lower() not in ALIASES:
            raise ApiError(400, f"Invalid cron expression {text!r}: unknown alias (use one of "
                                f"{', '.join(ALIASES)})")
        expr = expr.lower()
    else:
        fields = expr.split(" ")
        if len(fields) != 5:
            raise ApiError(400, f"Invalid cron expression {text!r}: {len(fields)} fields; "
                                "cron has 5 (minute hour day-of-month month day-of-week)")
        if any("h" in f.lower().replace("thu", "") for f in fields):
            raise ApiError(400, f"Invalid cron expression {text!r}: hashed fields (H) are not "
                                "supported")
    try:
        croniter(expr, datetime.fromtimestamp(now_ms / 1000, tz))
    except CroniterError as exc:
        raise ApiError(400, f"Invalid cron expression {text!r}: {exc}") from None
    if next_cron(expr, tz, now_ms) is None:
        raise ApiError(400, f"The cron expression {text!r} never fires (no such date)")
    return expr


def next_cron(expr: str, tz: ZoneInfo, after_ms: int) -> int | None:
    """The first slot strictly after after_ms (epoch ms), or None when there is none."""
    if expr.startswith("@"):
        fixed_hour = expr != "@hourly"
    else:
        fixed_hour = not any(c in expr.split(" ")[1] for c in "*/")
    try:
        it = croniter(expr, datetime.fromtimestamp(after_ms / 1000, tz))
        for _ in range(1000):
            slot: datetime = it.get_next(datetime)
            ms = int(slot.timestamp() * 1000)
            if ms <= after_ms:
                continue
            if fixed_hour and slot.fold == 1 and _repeated(slot):
                continue  # the second occurrence of a wall-clock time: run once
            return ms
    except CroniterBadDateError:
        return None
    return None


def _repeated(slot: datetime) -> bool:
    """Whether slot's wall-clock time also happened an hour (or so) earlier (autumn DST)."""
    return slot.replace(fold=0).utcoffset() != slot.replace(fold=1).utcoffset()


def parse_at(value: object, tz: ZoneInfo, now_ms: int) -> int:
    """A time once, ISO 8601 (without an offset: in the schedule's zone); 400 in the past."""
    if not isinstance(value, str):
        raise ApiError(400, 'at must be a time like "2026-05-01T18:00:00+02:00" (ISO 8601)')
    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(400, f"at: {value!r} is not an ISO 8601 time like "
                            "2026-05-01T18:00:00+02:00") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=tz)
    ms = int(when.timestamp() * 1000)
    if ms <= now_ms:
        raise ApiError(400, f"at: {value} is in the past")
    return ms


def next_every(first_ms: int, every_ms: int, after_ms: int) -> int:
    """The first slot of first_ms + k * every_ms strictly after after_ms (slots missed are
    not made up: one run, then the grid goes on)."""
    if after_ms < first_ms:
        return first_ms
    return first_ms + ((after_ms - first_ms) // every_ms + 1) * every_ms
