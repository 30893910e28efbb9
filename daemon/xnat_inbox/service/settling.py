"""The drops the daemon settles now, mirrored into the state database for `status`: the
settle tracker lives in the daemon's memory, where no other process can see it."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

from ..intake.watch import DropRef
from .state import State


class SettlingRecord:
    """The daemon's drops settling, mirrored into the state database for `status`: written
    when the set changes, each with the time it was first seen."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.first_seen: dict[DropRef, float] = {}
        self.recorded: list[tuple[str, str, float]] | None = None

    def update(self, pending: Iterable[DropRef]) -> None:
        now = time.time()
        # a claim's own rename touches the drop once more: only what is still there
        there = [ref for ref in pending if os.path.lexists(ref.path)]
        self.first_seen = {ref: self.first_seen.get(ref, now) for ref in there}
        rows = sorted((str(ref.inbox.path), str(ref), seen)
                      for ref, seen in self.first_seen.items())
        if rows != self.recorded:
            self.state.record_settling(rows)
            self.recorded = rows
