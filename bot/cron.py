"""Triggers for ``[[schedule]]`` entries: crontab expressions with crontab's weekday numbers, or intervals."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

_WEEKDAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")
_NUMBER = re.compile(r"\d+")
INTERVAL_ANCHOR = datetime(2000, 1, 1, tzinfo=UTC)


def crontab_weekdays(field: str) -> str:
    """A crontab day-of-week field as APScheduler 3 reads it, which counts 0 as Monday, not Sunday.

    Numbers (0 or 7 Sunday, ranges, steps) become day names; names and ``*`` pass through.
    """
    if not _NUMBER.search(field):
        return field
    days: list[int] = []
    for part in field.split(","):
        span, _, step = part.partition("/")
        if span == "*":
            low, high = 0, 6
        elif _NUMBER.fullmatch(span):
            low = high = int(span)
        else:
            first, dash, last = span.partition("-")
            if not dash or not (_NUMBER.fullmatch(first) and _NUMBER.fullmatch(last)):
                raise ValueError(f"cannot read the weekday field {field!r}: use numbers 0-7 or names")
            low, high = int(first), int(last)
        if high > 7 or low > high:
            raise ValueError(f"weekday range {span!r} is not within 0-7")
        days += range(low, high + 1, int(step or 1))
    return ",".join(dict.fromkeys(_WEEKDAY_NAMES[day] for day in days))


def trigger_for(cron: str | None, every: float | None, timezone: str) -> BaseTrigger:
    """Raises ValueError for an expression APScheduler cannot read."""
    if every is not None:
        # Anchored at a fixed instant, not at start-up: every replica computes the same fire times,
        # so their claims on (job, fire time) meet.
        return IntervalTrigger(seconds=every, start_date=INTERVAL_ANCHOR, timezone=timezone)
    assert cron is not None
    fields = cron.split()
    if len(fields) != 5:
        raise ValueError(f"cron must have 5 fields (minute hour day month weekday), got {cron!r}")
    minute, hour, day, month, weekday = fields
    return CrontabTrigger(
        minute=minute, hour=hour, day=day, month=month, day_of_week=crontab_weekdays(weekday), timezone=timezone
    )


class CrontabTrigger(CronTrigger):  # type: ignore[misc]
    """Cron's rule for the hour that repeats when clocks go back: a job at a fixed hour runs once.

    APScheduler 3 fires ``30 2 * * *`` in Europe/Berlin twice on that night (02:30 CEST and 02:30 CET);
    cron runs it once.  A job whose hour field is a wildcard still runs in both hours: they are two
    real hours.
    """

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime | None:
        found: datetime | None = super().get_next_fire_time(previous_fire_time, now)
        if found is not None and found.fold == 1 and not self._hour_is_wildcard():
            # The same wall time already came (fold=0): skip its repeat.
            return self.get_next_fire_time(found, found + timedelta(hours=1))
        return found

    def _hour_is_wildcard(self) -> bool:
        hour = next(f for f in self.fields if f.name == "hour")
        return str(hour) == "*"
