"""Cancel requests (`xnat-inbox cancel`): a row per drop in the state database until the daemon
has moved the drop to failed/ (or it finished first), so a request made while the daemon is
stopped is carried out when it starts."""

from __future__ import annotations

import time
from datetime import datetime

from .state import State


def request_cancel(state: State, drop_id: str, by: str) -> None:
    """Ask for the drop to be cancelled (asked again: the first request stands)."""
    with state._write() as db:
        db.execute("INSERT OR IGNORE INTO cancels VALUES (?, ?, ?)", (drop_id, by, time.time()))


def cancel_requests(state: State) -> dict[str, str]:
    """Drop id -> the reason its report gives: 'cancelled by <user> at <time>; …'."""
    return {drop_id: cancelled_by(by, at)
            for drop_id, by, at in state._read("SELECT drop_id, by, at FROM cancels")}


def cancelled_by(by: str, at: float) -> str:
    when = datetime.fromtimestamp(at).astimezone().isoformat(timespec="seconds")
    return f"cancelled by {by} at {when}; `xnat-inbox retry` puts it back"
