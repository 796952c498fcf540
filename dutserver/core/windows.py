"""Maintenance windows: the weekly spans of wall-clock time, in one zone, when a job's tasks
may be delivered. Pure: no clock, no I/O; every answer is computed from the `now_ms` given.

A window is `{"days": ["fri"], "from": "18:00", "to": "23:00"}` (days: mon … sun, full names
or ranges like "mon-fri"; left out, every day; "to" up to "24:00", and a "to" not after
"from" ends on the next day: "22:00"-"02:00"). With `"exclude": true` it is a span when nothing
is delivered, even inside another window. Without any window that is not an exclusion, the
rest of the week is open. Times are wall-clock times in the zone, so a window keeps its hours
across daylight-saving changes: on the spring change a time the clock skips moves on with the
clock (02:30 is 03:30); on the autumn change a time that happens twice is its first occurrence.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dutserver.core.errors import ApiError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MAX_WINDOWS = 50
_DAY_MS = 86_400_000
_HORIZON_DAYS = 16  # a weekly pattern opens within a week and a day, DST or not
_TIME = re.compile(r"(\d{1,2}):(\d{2})")
_FIELDS = frozenset({"days", "from", "to", "exclude"})

Span = tuple[int, int]  # [start_ms, end_ms)


@dataclass(frozen=True, slots=True)
class Window:
    days: frozenset[int]  # 0 is Monday
    start_min: int  # minutes after the start day's midnight
    end_min: int  # minutes after the start day's midnight: more than start_min (< 2 days)
    exclude: bool

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"days": [DAYS[d] for d in sorted(self.days)],
                               "from": _hhmm(self.start_min),
                               "to": _hhmm(self.end_min if self.end_min <= 1440
                                           else self.end_min - 1440)}
        if self.exclude:
            out["exclude"] = True
        return out


def zone(name: object) -> ZoneInfo:
    """An IANA time zone by name (400 naming it when there is none such)."""
    if not isinstance(name, str) or not name or len(name) > 64 or ".." in name or \
            name.startswith("/"):
        raise ApiError(400, "tz must be an IANA time zone name like Europe/Paris or UTC")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ApiError(400, f"Unknown time zone: {name!r} (an IANA name like Europe/Paris "
                            "or UTC)") from None


def parse(raw: object) -> list[Window]:
    """Windows as given in a request; 400 naming the window and the problem."""
    if not isinstance(raw, list):
        raise ApiError(400, 'windows must be a list like [{"days": ["fri"], "from": "18:00", '
                            '"to": "23:00"}]')
    if len(raw) > MAX_WINDOWS:
        raise ApiError(400, f"windows: at most {MAX_WINDOWS}")
    return [_window(n + 1, item) for n, item in enumerate(raw)]


def _window(n: int, item: object) -> Window:
    if not isinstance(item, dict):
        raise ApiError(400, f"window {n}: an object with days, from and to")
    unknown = set(item) - _FIELDS
    if unknown:
        raise ApiError(400, f"window {n}: unknown field {sorted(unknown)[0]!r} (days, from, "
                            "to, exclude)")
    days = _days(n, item.get("days", list(DAYS)))
    start = _minutes(n, "from", item.get("from"), allow_24=False)
    end = _minutes(n, "to", item.get("to"), allow_24=True)
    if start == end:
        raise ApiError(400, f"window {n}: from and to are both {_hhmm(start)}: it would never "
                            "open")
    if end <= start:
        end += 1440  # ends the next day
    exclude = item.get("exclude", False)
    if not isinstance(exclude, bool):
        raise ApiError(400, f"window {n}: exclude must be true or false")
    return Window(days, start, end, exclude)


def _days(n: int, value: object) -> frozenset[int]:
    if not isinstance(value, list) or not all(isinstance(d, str) for d in value):
        raise ApiError(400, f"window {n}: days must be a list like [\"mon\", \"fri\"] or "
                            "[\"mon-fri\"]")
    if not value:
        raise ApiError(400, f"window {n}: days is empty: it would never open")
    found: set[int] = set()
    for text in value:
        ends = [_day(n, part) for part in text.split("-", 1)]
        first, last = ends[0], ends[-1]
        span = range(first, last + 1) if first <= last else [*range(first, 7), *range(last + 1)]
        found.update(span)
    return frozenset(found)


def _day(n: int, text: str) -> int:
    key = text.strip().lower()
    if len(key) >= 3 and key[:3] in DAYS and key in (key[:3], _FULL[DAYS.index(key[:3])]):
        return DAYS.index(key[:3])
    raise ApiError(400, f"window {n}: unknown day {text!r} (mon, tue, wed, thu, fri, sat, sun)")


_FULL = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


def _minutes(n: int, field: str, value: object, allow_24: bool) -> int:
    match = _TIME.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ApiError(400, f"window {n}: {field} must be a time like \"18:00\"")
    hours, minutes = int(match[1]), int(match[2])
    if (hours, minutes) == (24, 0) and allow_24:
        return 1440
    if hours > 23 or minutes > 59:
        raise ApiError(400, f"window {n}: {field} {value!r} is no time of day")
    return hours * 60 + minutes


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def as_json(windows: list[Window]) -> list[dict[str, Any]]:
    return [w.as_json() for w in windows]


# --- the spans they open ------------------------------------------------------------------------

def _wall_ms(tz: ZoneInfo, day: date, minutes: int) -> int:
    """A wall-clock time (day at midnight + minutes) in tz, as epoch ms (PEP 495, fold=0)."""
    wall = datetime(day.year, day.month, day.day, tzinfo=tz) + timedelta(minutes=minutes)
    return int(wall.timestamp() * 1000)


def _merge(spans: list[Span]) -> list[Span]:
    merged: list[Span] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def spans(windows: list[Window], tz: ZoneInfo, start_ms: int, end_ms: int) -> list[Span]:
    """The open spans that meet [start_ms, end_ms), in order, each cut to that range."""
    first = datetime.fromtimestamp(start_ms / 1000, tz).date() - timedelta(days=2)
    last = datetime.fromtimestamp(end_ms / 1000, tz).date() + timedelta(days=1)
    opened: list[Span] = []
    closed: list[Span] = []
    day = first
    while day <= last:
        for w in windows:
            if day.weekday() in w.days:
                (closed if w.exclude else opened).append(
                    (_wall_ms(tz, day, w.start_min), _wall_ms(tz, day, w.end_min)))
        day += timedelta(days=1)
    if not any(not w.exclude for w in windows):
        opened = [(start_ms, end_ms)]
    result = []
    holes = _merge(closed)
    for start, end in _merge(opened):
        for hole_start, hole_end in holes:
            if hole_end <= start or hole_start >= end:
                continue
            if hole_start > start:
                result.append((start, hole_start))
            start = max(start, hole_end)
            if start >= end:
                break
        if start < end:
            result.append((start, end))
    return [(max(s, start_ms), min(e, end_ms)) for s, e in result if e > start_ms and s < end_ms]


def next_open(windows: list[Window], tz: ZoneInfo, now_ms: int) -> tuple[int, int | None] | None:
    """The span open now or the next one: (start, end), start <= now when open now, end None
    when it never closes; None when the windows never open."""
    horizon = now_ms + _HORIZON_DAYS * _DAY_MS
    found = spans(windows, tz, now_ms, horizon)
    if not found:
        return None
    start, end = found[0]
    return start, (None if end >= horizon else end)


def open_until(windows: list[Window], tz: ZoneInfo, now_ms: int) -> tuple[bool, int | None]:
    """(whether a window is open at now_ms, when it closes: None if it never does)."""
    span = next_open(windows, tz, now_ms)
    if span is None or span[0] > now_ms:
        return False, None
    return True, span[1]


def check_opens(windows: list[Window], tz: ZoneInfo, now_ms: int) -> None:
    """400 when the windows never open (every opening is excluded)."""
    if next_open(windows, tz, now_ms) is None:
        raise ApiError(400, "The windows never open: exclusions cover every opening")


def load(text: str | None) -> tuple[list[Window], ZoneInfo] | None:
    """Windows as stored (`{"tz": …, "windows": […]}`), or None."""
    if not text:
        return None
    stored = json.loads(text)
    return parse(stored["windows"]), ZoneInfo(stored["tz"])
