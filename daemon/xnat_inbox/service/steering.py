"""What the running daemon reads of the operators' requests: paused destinations (and closed
send windows) and cancelled drops. The state database is read once a tick (the CLI writes
there, from another process); lanes and senders then ask this object, in memory, between
every two instances."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from ..config import Destination
from ..intake.claim import ClaimedDrop
from ..logs import get_logger
from .cancel import cancel_requests
from .lane import IDLE_TICK_SECONDS, Deliver, Lane
from .pause import Hold, expire_pauses, holds, recorded_pauses
from .pipeline import Halted, Pipeline
from .state import Attempt, State


def counted(attempts: list[Attempt]) -> list[Attempt]:
    """The attempts that count against a retry policy: not those a pause cut short."""
    return [attempt for attempt in attempts if attempt.outcome != Halted.__name__]


class Steering:
    def __init__(self, state: State,
                 destinations: Callable[[], Mapping[str, Destination]]) -> None:
        self.state = state
        self.destinations = destinations  # the config's now (a reload may change them)
        self.log = get_logger(step="service")
        self.holds: dict[str, Hold] = {}
        self.cancels: dict[str, str] = {}  # drop id -> "cancelled by <user> at <time>"
        self.cancelling: list[threading.Thread] = []

    def refresh(self, now: float | None = None) -> set[str]:
        """Read the requests again; the destinations that may send again. A pause whose time
        came is lifted here, for good."""
        now = time.time() if now is None else now
        recorded = recorded_pauses(self.state)
        if any(p.until is not None and p.until <= now for p in recorded.values()):
            expire_pauses(self.state, now)
        found = holds(self.destinations(), recorded, now)
        cancels = cancel_requests(self.state)
        for name, hold in found.items():
            if self.holds.get(name) != hold:
                self.log.info("destination paused: the instance in flight is finished, then "
                              "nothing is sent; its drops wait in order", destination=name,
                              reason=hold.reason, until=hold.as_dict()["until"], by=hold.by)
        released = set(self.holds) - set(found)
        for name in sorted(released):
            self.log.info("destination resumed", destination=name,
                          was=self.holds[name].reason)
        for drop_id in sorted(set(cancels) - set(self.cancels)):
            self.log.info("cancel requested: the drop goes to failed/ (if it is sending, at its "
                          "next instance)", drop_id=drop_id, reason=cancels[drop_id])
        self.holds, self.cancels = found, cancels
        return released

    def tick(self, lanes: Mapping[str, Lane], deliver: Deliver) -> None:
        """From the main loop: a destination that may send again wakes its lane; a cancelled
        drop waiting in a lane leaves it and goes to failed/ at once, delivered (as the
        daemon's `deliver` does with a cancelled drop) beside the lane; one being delivered
        stops at its next instance by itself."""
        for name in self.refresh() & set(lanes):
            lanes[name].wake()
        self.cancelling = [thread for thread in self.cancelling if thread.is_alive()]
        for drop_id in self.cancels:  # a request stays until its drop is finished
            for name, lane in lanes.items():
                if (drop := lane.take(drop_id)) is not None:
                    thread = threading.Thread(target=deliver, args=(drop, name),
                                              name=f"cancel {drop_id}", daemon=True)
                    thread.start()
                    self.cancelling.append(thread)

    def join(self, timeout: float) -> None:
        """At shutdown: let cancelled drops being moved to failed/ get there."""
        for thread in self.cancelling:
            thread.join(timeout)

    def wait(self, stop: threading.Event, seconds: float, drop_id: str,
             destination: str) -> bool:
        """Wait to retry; a pause or a cancel ends the wait early (the next attempt sees it
        and begins none). True when stopped."""
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            if stop.wait(min(left, IDLE_TICK_SECONDS)):
                return True
            if self.halt(drop_id, destination):
                break
        return stop.is_set()

    def attempt(self, pipeline: Pipeline, drop: ClaimedDrop, destination: str) -> Path:
        """One attempt of the drop, unless it must not send now (Halted, and none begun)."""
        if why := self.halt(drop.id, destination):
            raise Halted(why)
        return pipeline.process(drop, halt=lambda: self.halt(drop.id, destination))

    def held(self, destination: str) -> Hold | None:
        return self.holds.get(destination)

    def cancelled(self, drop_id: str) -> str | None:
        return self.cancels.get(drop_id)

    def halt(self, drop_id: str, destination: str) -> str | None:
        """Why this drop must not send now (cancelled, or its destination paused), or None."""
        if reason := self.cancels.get(drop_id):
            return reason
        hold = self.holds.get(destination)
        return hold.describe() if hold else None
