"""Paused destinations: by `xnat-inbox pause` (until resumed, or until a time), or by themselves
outside their `send_window`. A pause is a row in the state database, so it survives restarts;
the running daemon reads them every tick (steering.py), `status` reads them too."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from ..config import Destination
from ..sendwindow import SendWindow
from .state import State


@dataclass(frozen=True)
class Hold:
    """Why a destination sends nothing now, and until when (None: until resumed)."""

    destination: str
    kind: Literal["pause", "send_window"]
    reason: str
    until: float | None  # epoch
    by: str | None = None  # who paused it (a send window: nobody)
    since: float | None = None

    def describe(self, short: bool = False) -> str:
        """'paused (maintenance) until 2026-12-08T07:00:00+01:00'; short: '… until 12-08 07:00'."""
        if self.until is None:
            when = "resumed"
        else:
            at = datetime.fromtimestamp(self.until).astimezone()
            when = f"{at:%Y-%m-%d %H:%M}" if short else at.isoformat(timespec="seconds")
        return f"paused ({self.reason}) until {when}"

    def as_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "reason": self.reason, "until": _iso(self.until),
                "by": self.by, "since": _iso(self.since)}


def record_pause(state: State, destination: str, reason: str | None, until: float | None,
                 by: str) -> None:
    """Pause `destination` (again: the new reason and time replace the old)."""
    with state._write() as db:
        db.execute("INSERT OR REPLACE INTO pauses VALUES (?, ?, ?, ?, ?)",
                   (destination, reason, until, by, time.time()))


def remove_pauses(state: State, destination: str | None) -> list[str]:
    """Lift the pause of `destination` (None: of every destination); the names lifted."""
    with state._write() as db:
        where, args = ("", ()) if destination is None else (" WHERE destination=?",
                                                            (destination,))
        names = [row[0] for row in db.execute(f"SELECT destination FROM pauses{where}", args)]
        db.execute(f"DELETE FROM pauses{where}", args)
    return sorted(names)


def expire_pauses(state: State, now: float) -> None:
    """Pauses whose time came are lifted for good (the daemon does this as it sees them)."""
    with state._write() as db:
        db.execute("DELETE FROM pauses WHERE until IS NOT NULL AND until <= ?", (now,))


def recorded_pauses(state: State) -> dict[str, Hold]:
    rows = state._read("SELECT destination, reason, until, by, at FROM pauses")
    return {name: Hold(name, "pause", reason or f"by {by}", until, by, at)
            for name, reason, until, by, at in rows}


def holds(destinations: Mapping[str, Destination], recorded: Mapping[str, Hold],
          now: float) -> dict[str, Hold]:
    """Each configured destination that may not send at `now` (epoch), and why: a pause
    recorded (and not yet over) first, else a send window that is closed."""
    found: dict[str, Hold] = {}
    local = datetime.fromtimestamp(now).astimezone()
    for name, destination in destinations.items():
        pause = recorded.get(name)
        if pause is not None and (pause.until is None or pause.until > now):
            found[name] = pause
        elif destination.send_window is not None:
            window = SendWindow.parse(destination.send_window)
            if not window.is_open(local):
                found[name] = Hold(name, "send_window", f"outside send_window {window}",
                                   window.next_open(local).timestamp())
    return found


def _iso(epoch: float | None) -> str | None:
    return datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds") \
        if epoch is not None else None
