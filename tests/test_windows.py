"""Pure time math: maintenance windows (core/windows.py) and schedules' slots (core/slots.py),
with fixed dates, across daylight-saving changes."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from dutserver.core import slots, windows
from dutserver.core.errors import ApiError

PARIS = ZoneInfo("Europe/Paris")
UTC = ZoneInfo("UTC")


def ms(*parts: int, tz: ZoneInfo = PARIS, fold: int = 0) -> int:
    return int(datetime(*parts, tzinfo=tz, fold=fold).timestamp() * 1000)  # type: ignore[misc]


def wall(value: int, tz: ZoneInfo = PARIS) -> str:
    return datetime.fromtimestamp(value / 1000, tz).strftime("%a %Y-%m-%d %H:%M %z")


OCO = [{"days": ["fri"], "from": "18:00", "to": "23:00"},
       {"days": ["sat"], "from": "11:00", "to": "13:00", "exclude": True}]


# --- windows ----------------------------------------------------------------------------------

def test_a_friday_evening_window_opens_and_closes_on_time() -> None:
    found = windows.parse(OCO)
    # 2025-01-08 is a Wednesday: closed, and it opens on Friday at 18:00.
    assert windows.open_until(found, PARIS, ms(2025, 1, 8, 12, 0)) == (False, None)
    start, end = windows.next_open(found, PARIS, ms(2025, 1, 8, 12, 0))  # type: ignore[misc]
    assert (wall(start), wall(end)) == ("Fri 2025-01-10 18:00 +0100", "Fri 2025-01-10 23:00 +0100")
    assert windows.open_until(found, PARIS, ms(2025, 1, 10, 19, 30)) == (True, ms(2025, 1, 10, 23))
    assert windows.open_until(found, PARIS, ms(2025, 1, 10, 23, 0)) == (False, None)  # [from, to)
    assert windows.open_until(found, PARIS, ms(2025, 1, 10, 18, 0))[0]


def test_an_exclusion_inside_a_window_cuts_it_in_two() -> None:
    found = windows.parse([{"days": ["fri"], "from": "18:00", "to": "23:00"},
                           {"days": ["fri"], "from": "20:00", "to": "21:00", "exclude": True}])
    assert windows.open_until(found, PARIS, ms(2025, 1, 10, 19)) == (True, ms(2025, 1, 10, 20))
    assert windows.open_until(found, PARIS, ms(2025, 1, 10, 20, 30)) == (False, None)
    assert windows.next_open(found, PARIS, ms(2025, 1, 10, 20, 30)) == (
        ms(2025, 1, 10, 21), ms(2025, 1, 10, 23))
    spans = windows.spans(found, PARIS, ms(2025, 1, 6), ms(2025, 1, 13))
    assert [(wall(a), wall(b)) for a, b in spans] == [
        ("Fri 2025-01-10 18:00 +0100", "Fri 2025-01-10 20:00 +0100"),
        ("Fri 2025-01-10 21:00 +0100", "Fri 2025-01-10 23:00 +0100")]


def test_a_window_past_midnight_ends_the_next_day_and_adjacent_ones_merge() -> None:
    found = windows.parse([{"days": ["fri"], "from": "22:00", "to": "02:00"},
                           {"days": ["sat"], "from": "02:00", "to": "03:00"}])
    assert windows.open_until(found, PARIS, ms(2025, 1, 11, 1)) == (True, ms(2025, 1, 11, 3))
    assert windows.as_json(found)[0] == {"days": ["fri"], "from": "22:00", "to": "02:00"}


def test_only_exclusions_leave_the_rest_of_the_week_open() -> None:
    found = windows.parse([OCO[1]])
    assert windows.open_until(found, PARIS, ms(2025, 1, 11, 10)) == (True, ms(2025, 1, 11, 11))
    assert windows.open_until(found, PARIS, ms(2025, 1, 11, 12)) == (False, None)
    every_day = windows.parse([{"from": "00:00", "to": "24:00"}])
    assert windows.open_until(every_day, PARIS, ms(2025, 1, 11, 12)) == (True, None)  # never closes


def test_daylight_saving_changes_keep_the_wall_clock_hours() -> None:
    night = windows.parse([{"from": "01:00", "to": "04:00"}])
    # Spring (2025-03-30, 02:00 -> 03:00): three wall-clock hours, two real ones.
    start, end = windows.next_open(night, PARIS, ms(2025, 3, 29, 12))  # type: ignore[misc]
    assert (wall(start), wall(end)) == ("Sun 2025-03-30 01:00 +0100", "Sun 2025-03-30 04:00 +0200")
    assert end - start == 2 * 3600_000
    # Autumn (2025-10-26, 03:00 -> 02:00): four real hours.
    start, end = windows.next_open(night, PARIS, ms(2025, 10, 25, 12))  # type: ignore[misc]
    assert (wall(start), wall(end)) == ("Sun 2025-10-26 01:00 +0200", "Sun 2025-10-26 04:00 +0100")
    assert end - start == 4 * 3600_000
    # A start in the skipped hour moves on with the clock: 02:30 is 03:30.
    skipped = windows.parse([{"days": ["sun"], "from": "02:30", "to": "05:00"}])
    start, _ = windows.next_open(skipped, PARIS, ms(2025, 3, 29, 12))  # type: ignore[misc]
    assert wall(start) == "Sun 2025-03-30 03:30 +0200"
    # The day after, nothing moved.
    start, end = windows.next_open(night, PARIS, ms(2025, 10, 26, 12))  # type: ignore[misc]
    assert end - start == 3 * 3600_000


@pytest.mark.parametrize("raw, words", [
    ([{"days": ["fri"], "from": "18:00", "to": "18:00"}], "window 1: from and to are both 18:00"),
    ([{"days": [], "from": "18:00", "to": "19:00"}], "window 1: days is empty"),
    ([{"days": ["fri"], "from": "18:00", "to": "23:00"},
      {"days": ["fri"], "from": "17:00", "to": "23:30", "exclude": True}], "never open"),
    ([{"from": "00:00", "to": "24:00", "exclude": True}], "never open"),
    ([{"days": ["fry"], "from": "18:00", "to": "19:00"}], "unknown day 'fry'"),
    ([{"from": "25:00", "to": "26:00"}], "is no time of day"),
    ([{"from": "6pm", "to": "19:00"}], "like \"18:00\""),
    ([{"from": "24:00", "to": "01:00"}], "is no time of day"),
    ([{"from": "18:00", "to": "19:00", "every": "week"}], "unknown field 'every'"),
    ({"from": "18:00"}, "must be a list"),
])
def test_windows_that_never_open_or_make_no_sense_are_refused(raw: object, words: str) -> None:
    with pytest.raises(ApiError) as caught:
        windows.check_opens(windows.parse(raw), PARIS, ms(2025, 1, 8))
    assert caught.value.status == 400 and words in caught.value.msg, caught.value.msg


def test_day_ranges_and_full_names() -> None:
    (weekdays,) = windows.parse([{"days": ["mon-fri"], "from": "08:00", "to": "09:00"}])
    assert weekdays.days == frozenset(range(5))
    (weekend,) = windows.parse([{"days": ["Saturday", "sun"], "from": "08:00", "to": "09:00"}])
    assert weekend.days == frozenset({5, 6})
    (wrapping,) = windows.parse([{"days": ["fri-mon"], "from": "08:00", "to": "09:00"}])
    assert wrapping.days == frozenset({4, 5, 6, 0})


def test_zones_are_iana_names() -> None:
    assert windows.zone("Europe/Paris") == PARIS
    for bad in ("Mars/Olympus", "../etc/passwd", "", 3):
        with pytest.raises(ApiError, match="time zone"):
            windows.zone(bad)


# --- cron, once, every ------------------------------------------------------------------------

def test_next_cron_slot_from_fixed_times() -> None:
    friday = slots.parse_cron("0 18 * * fri", PARIS, ms(2025, 1, 8))
    assert wall(slots.next_cron(friday, PARIS, ms(2025, 1, 8)) or 0) == "Fri 2025-01-10 18:00 +0100"
    # Strictly after: a slot is not its own next one.
    assert slots.next_cron(friday, PARIS, ms(2025, 1, 10, 18)) == ms(2025, 1, 17, 18)
    assert slots.next_cron("*/15 * * * *", UTC, ms(2025, 1, 1, 0, 7, tz=UTC)) == \
        ms(2025, 1, 1, 0, 15, tz=UTC)
    assert slots.next_cron("@daily", PARIS, ms(2025, 1, 1, 12)) == ms(2025, 1, 2, 0)
    # The same expression in another zone is another instant.
    assert slots.next_cron("0 18 * * *", ZoneInfo("America/New_York"), ms(2025, 1, 8)) == \
        ms(2025, 1, 8, 18, tz=ZoneInfo("America/New_York"))


def test_cron_across_daylight_saving_changes() -> None:
    # Spring: 02:30 does not happen on 2025-03-30; it runs when the clock jumps, at 03:00.
    assert wall(slots.next_cron("30 2 * * *", PARIS, ms(2025, 3, 29, 12)) or 0) == \
        "Sun 2025-03-30 03:00 +0200"
    # Autumn: 02:30 happens twice on 2025-10-26; a job at a named hour runs once.
    first = slots.next_cron("30 2 * * *", PARIS, ms(2025, 10, 25, 12)) or 0
    assert wall(first) == "Sun 2025-10-26 02:30 +0200"
    assert wall(slots.next_cron("30 2 * * *", PARIS, first) or 0) == "Mon 2025-10-27 02:30 +0100"
    # ... and one every 30 minutes keeps its real interval through the repeated hour.
    at, seen = ms(2025, 10, 26, 1, 45), []
    for _ in range(4):
        at = slots.next_cron("*/30 * * * *", PARIS, at) or 0
        seen.append(wall(at))
    assert seen == ["Sun 2025-10-26 02:00 +0200", "Sun 2025-10-26 02:30 +0200",
                    "Sun 2025-10-26 02:00 +0100", "Sun 2025-10-26 02:30 +0100"]


@pytest.mark.parametrize("expr, words", [
    ("* * *", "3 fields; cron has 5"),
    ("0 0 * * * *", "6 fields"),
    ("61 * * * *", "out of range"),
    ("x 1 * * *", "Invalid cron expression 'x 1 * * *'"),
    ("0 0 31 2 *", "never fires"),
    ("H * * * *", "hashed fields"),
    ("@reboot", "unknown alias"),
    ("", "cron must be"),
])
def test_malformed_cron_expressions_are_named(expr: str, words: str) -> None:
    with pytest.raises(ApiError) as caught:
        slots.parse_cron(expr, PARIS, ms(2025, 1, 8))
    assert caught.value.status == 400 and words in caught.value.msg, caught.value.msg


def test_once_and_every() -> None:
    now = ms(2025, 1, 8, 12)
    assert slots.parse_at("2025-01-08T13:00:00", PARIS, now) == ms(2025, 1, 8, 13)  # its zone
    assert slots.parse_at("2025-01-08T12:00:00Z", PARIS, now) == ms(2025, 1, 8, 13)
    with pytest.raises(ApiError, match="in the past"):
        slots.parse_at("2025-01-08T11:59:00", PARIS, now)
    with pytest.raises(ApiError, match="ISO 8601"):
        slots.parse_at("next friday", PARIS, now)
    # Every 10 s from 0: after a long gap, the first slot after now (no make-up runs).
    assert slots.next_every(0, 10_000, 5_000) == 10_000
    assert slots.next_every(0, 10_000, 10_000) == 20_000
    assert slots.next_every(0, 10_000, 1_234_567) == 1_240_000
