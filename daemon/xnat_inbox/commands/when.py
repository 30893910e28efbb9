"""Times as operators type them: `--since 7d`, `--until "2026-12-08 07:00"`, `--until 2h`."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
FORMS = ('a duration (90s, 30m, 2h, 7d, 1w), a local date and time ("2026-12-08 07:00"), a date '
         '(2026-12-08) or a time of day (07:00, the next one)')


class WhenError(ValueError):
    """Not a time or a duration; the message names the forms understood."""


def duration(text: str) -> float | None:
    """Seconds in '90s', '30m', '2h', '7d', '1w'; None when it is not a duration."""
    match = DURATION.match(text.strip().lower())
    return float(match.group(1)) * UNITS[match.group(2)] if match else None


def moment(text: str, now: datetime) -> datetime:
    """A local date, date and time, or time of day (the next such time after `now`)."""
    text = text.strip()
    try:
        if re.fullmatch(r"\d{1,2}:\d{2}(:\d{2})?", text):
            hour, minute, *second = (int(part) for part in text.split(":"))
            at = now.replace(hour=hour, minute=minute, second=second[0] if second else 0,
                             microsecond=0)
            return at if at > now else at + timedelta(days=1)
        at = datetime.fromisoformat(text)
    except ValueError:
        raise WhenError(f"{text!r}: expected {FORMS}") from None
    return at.astimezone() if at.tzinfo is None else at  # naive: local time


def since(text: str, now: datetime) -> datetime:
    """`--since`: a duration back from now, or a moment (a date: its midnight)."""
    seconds = duration(text)
    if seconds is not None:
        return now - timedelta(seconds=seconds)
    at = moment(text, now)
    if re.fullmatch(r"\d{1,2}:\d{2}(:\d{2})?", text.strip()) and at > now:
        at -= timedelta(days=1)  # a time of day: the last one, not the next
    return at


def until(text: str, now: datetime) -> datetime:
    """`--until`: a duration from now, or a moment; it must lie ahead."""
    seconds = duration(text)
    at = now + timedelta(seconds=seconds) if seconds is not None else moment(text, now)
    if at <= now:
        raise WhenError(f"{text!r} is in the past ({at.isoformat(timespec='seconds')}); give a "
                        "time ahead, or leave --until out to pause until `xnat-inbox resume`")
    return at
