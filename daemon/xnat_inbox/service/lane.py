"""One lane per destination: its drops delivered one after the other, in the order they were
claimed, so a destination that is down holds up only its own drops."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from ..intake.claim import ClaimedDrop

#: with nothing settling or in flight (a touch wakes the main loop, a drop its lane, at once;
#: a signal is seen at the next tick: a handler must not take the locks an Event.set() takes)
IDLE_TICK_SECONDS = 1.0
#: delivers a drop to a destination, retrying as its policy says; False when stopped first
Deliver = Callable[[ClaimedDrop, str], bool]


class Lane(threading.Thread):
    """Delivers one destination's drops one after the other, in the order they were claimed."""

    def __init__(self, destination: str, deliver: Deliver, stop: threading.Event,
                 held: Callable[[], object] = lambda: None) -> None:
        super().__init__(name=f"lane {destination}", daemon=True)
        self.destination = destination
        self.deliver = deliver
        self.stop = stop
        #: something (a pause, the send window) while the destination may not send: its drops
        #: wait in order, the first one is not even started
        self.held = held
        self.queue: deque[ClaimedDrop] = deque()
        self.current: ClaimedDrop | None = None  # the drop being delivered now
        self.wakeup = threading.Condition()

    def put(self, drop: ClaimedDrop) -> None:
        with self.wakeup:
            self.queue.append(drop)
            self.wakeup.notify()

    def wake(self) -> None:
        with self.wakeup:
            self.wakeup.notify()

    def take(self, drop_id: str) -> ClaimedDrop | None:
        """Take a waiting drop out of line (it was cancelled); None when it is not waiting
        here, or being delivered now (its delivery sees the cancel itself)."""
        with self.wakeup:
            for drop in self.queue:
                if drop.id == drop_id and drop is not self.current:
                    self.queue.remove(drop)
                    return drop
        return None

    def __len__(self) -> int:
        return len(self.queue)

    def run(self) -> None:
        while not self.stop.is_set():
            with self.wakeup:
                if not self.queue or self.held():
                    self.wakeup.wait(timeout=IDLE_TICK_SECONDS)
                    continue
                drop = self.current = self.queue[0]
            delivered = self.deliver(drop, self.destination)
            with self.wakeup:
                self.current = None
                if delivered:
                    self.queue.popleft()
