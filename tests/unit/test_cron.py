"""Schedules: crontab semantics (weekday numbers, DST changes) computed without waiting."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from bot.cron import crontab_weekdays, trigger_for


def fire_times(cron: str, timezone: str, start: datetime, end: datetime) -> list[str]:
    trigger = trigger_for(cron, None, timezone)
    found, previous, now = [], None, start
    while (nxt := trigger.get_next_fire_time(previous, now)) is not None and nxt.astimezone(UTC) <= end:
        found.append(nxt.astimezone(UTC).strftime("%a %m-%d %H:%M"))
        previous, now = nxt, nxt.astimezone(UTC) + timedelta(seconds=1)
    return found


def test_weekdays_at_eight_in_berlin_across_the_spring_change() -> None:
    # Clocks go forward on Sunday 2026-03-29: 08:00 is 07:00 UTC before, 06:00 UTC after.
    got = fire_times(
        "0 8 * * 1-5", "Europe/Berlin", datetime(2026, 3, 26, 12, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC)
    )
    assert got == ["Fri 03-27 07:00", "Mon 03-30 06:00", "Tue 03-31 06:00"]


def test_weekdays_at_eight_in_new_york_across_the_autumn_change() -> None:
    # Clocks go back on Sunday 2026-11-01: 08:00 is 12:00 UTC before, 13:00 UTC after.
    got = fire_times(
        "0 8 * * 1-5", "America/New_York", datetime(2026, 10, 29, tzinfo=UTC), datetime(2026, 11, 4, tzinfo=UTC)
    )
    assert got == ["Thu 10-29 12:00", "Fri 10-30 12:00", "Mon 11-02 13:00", "Tue 11-03 13:00"]


def test_a_fixed_hour_in_the_repeated_hour_runs_once() -> None:
    got = fire_times(
        "30 2 * * *", "Europe/Berlin", datetime(2026, 10, 24, 12, tzinfo=UTC), datetime(2026, 10, 27, tzinfo=UTC)
    )
    assert got == ["Sun 10-25 00:30", "Mon 10-26 01:30"]


def test_an_hourly_job_runs_in_both_repeated_hours() -> None:
    day = fire_times(
        "0 * * * *", "Europe/Berlin", datetime(2026, 10, 24, 22, tzinfo=UTC), datetime(2026, 10, 25, 22, 59, tzinfo=UTC)
    )
    assert len(day) == 25


def test_a_time_skipped_by_the_spring_change_still_runs_that_day() -> None:
    got = fire_times(
        "30 2 * * *", "Europe/Berlin", datetime(2026, 3, 28, 12, tzinfo=UTC), datetime(2026, 3, 31, tzinfo=UTC)
    )
    assert got == ["Sun 03-29 01:30", "Mon 03-30 00:30"]


@pytest.mark.parametrize(
    ("field", "names"),
    [
        ("1-5", "mon,tue,wed,thu,fri"),
        ("0", "sun"),
        ("7", "sun"),
        ("0-2", "sun,mon,tue"),
        ("*/3", "sun,wed,sat"),
        ("mon-fri", "mon-fri"),
        ("*", "*"),
        ("6,7", "sat,sun"),
    ],
)
def test_crontab_weekday_numbers_mean_what_cron_means(field: str, names: str) -> None:
    # APScheduler 3 counts 0 as Monday; an operator's "1-5" must still be Monday to Friday.
    assert crontab_weekdays(field) == names


@pytest.mark.parametrize("cron", ["0 8 * *", "61 * * * *", "0 8 * * 9", "0 8 * * 5-1"])
def test_unreadable_expressions_are_refused(cron: str) -> None:
    with pytest.raises(ValueError, match=r"cron|range|weekday|value|0-7"):
        trigger_for(cron, None, "UTC")


def test_interval_fire_times_agree_between_replicas() -> None:
    # Two daemons started at different moments must compute the same occurrences to claim.
    first = trigger_for(None, 7, "UTC").get_next_fire_time(None, datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC))
    second = trigger_for(None, 7, "UTC").get_next_fire_time(None, datetime(2026, 1, 1, 0, 0, 3, tzinfo=UTC))
    assert first == second
