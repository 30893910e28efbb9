"""A destination's `send_window` ("19:00-07:00", local time): the hours it may send in. Outside
them it is paused by itself (off-peak sending); config validates with it, the service asks it
whether a destination is open now and when it opens next."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Annotated

from pydantic import AfterValidator

#: HH:MM (seconds allowed: HH:MM:SS) twice, joined by a dash
FORM = re.compile(r"^(\d\d):(\d\d)(?::(\d\d))?-(\d\d):(\d\d)(?::(\d\d))?$")
EXPECTED = ('expected "HH:MM-HH:MM" in local time, 24-hour clock, e.g. "19:00-07:00" (from 19:00 '
            "to 07:00 the next morning; outside it the destination sends nothing)")


class WindowError(ValueError):
    """Not a send window; the message names the form expected."""


@dataclass(frozen=True)
class SendWindow:
    start: time
    end: time
    text: str

    @classmethod
    def parse(cls, text: str) -> SendWindow:
        match = FORM.match(text.strip()) if isinstance(text, str) else None
        if match is None:
            raise WindowError(f"{EXPECTED}; got {text!r}")
        hour, minute, second, hour2, minute2, second2 = (int(g or 0) for g in match.groups())
        try:
            start, end = time(hour, minute, second), time(hour2, minute2, second2)
        except ValueError:
            raise WindowError(f"{EXPECTED}; got {text!r} (hours 00-23, minutes 00-59)") from None
        if start == end:
            raise WindowError(f"{EXPECTED}; got {text!r}, which opens and closes at the same "
                              "time (leave send_window out to send at any hour)")
        return cls(start, end, text.strip())

    def is_open(self, now: datetime) -> bool:
        at = now.time()
        if self.start < self.end:
            return self.start <= at < self.end
        return at >= self.start or at < self.end  # across midnight

    def next_open(self, now: datetime) -> datetime:
        """When the window opens next after `now` (local time, as `now` is)."""
        opening = now.replace(hour=self.start.hour, minute=self.start.minute,
                              second=self.start.second, microsecond=0)
        return opening if opening > now else opening + timedelta(days=1)

    def __str__(self) -> str:
        return self.text


def _valid(value: str | None) -> str | None:
    if value is not None:
        SendWindow.parse(value)  # its WindowError names the form expected
    return value


#: a destination's `send_window` key in the site config (None: it sends at any hour)
SendWindowText = Annotated[str | None, AfterValidator(_valid)]
