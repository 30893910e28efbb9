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

    def __init__(self, destination: str, deliver: Deliver, stop: threading.Event) -> None:
        super().__init__(name=f"lane {destination}", daemon=True)
        self.destination = destination
        self.deliver = deliver
        self.stop = stop
        self.queue: deque[ClaimedDrop] = deque()
        self.wakeup = threading.Condition()

    def put(self, drop: ClaimedDrop) -> None:
        with self.wakeup:
            self.queue.append(drop)
            self.wakeup.notify()

    def wake(self) -> None:
        with self.wakeup:
            self.wakeup.notify()

    def __len__(self) -> int:
        return len(self.queue)

    def run(self) -> None:
        while not self.stop.is_set():
            with self.wakeup:
                if not self.queue:
                    self.wakeup.wait(timeout=IDLE_TICK_SECONDS)
                    continue
                drop = self.queue[0]
            if self.deliver(drop, self.destination):
                with self.wakeup:
                    self.queue.popleft()
