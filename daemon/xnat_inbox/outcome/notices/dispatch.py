"""One courier thread per notify target: its notices delivered in order, each tried again with
backoff while the target fails, so a receiver that is down delays only its own notices and
never a drop. An outage is logged once when it starts and once when it ends; a notice that
can't be delivered at all (refused, or past the target's give_up_after) once each.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable

from tenacity import RetryCallState, Retrying, retry_if_exception, wait_exponential_jitter

from ...logs import get_logger
from ...notifyconfig import NoticeTarget
from .mail import Mail
from .message import Notice, NoticeError, email_text, payload
from .webhook import Webhook

#: notices kept per target while it is down; past this the oldest are dropped (and counted)
MAX_QUEUED = 1000
#: called after each try: (the target's kind, delivered)
Outcome = Callable[[str, bool], None]

log = get_logger(step="notify")


class Stopped(Exception):
    """The daemon stops: notices not yet delivered are given up."""


class Courier(threading.Thread):
    def __init__(self, label: str, target: NoticeTarget, stop: threading.Event,
                 outcome: Outcome | None = None) -> None:
        super().__init__(name=f"notify {label}", daemon=True)
        self.label = label
        self.target = target
        self.stop = stop
        self.outcome = outcome
        self.queue: deque[Notice] = deque()
        self.wakeup = threading.Condition()
        self.dropped = 0
        self.failing: str | None = None  # the error of the outage under way
        self.refused: set[str] = set()  # errors of notices given up, each logged once
        self.sender: Webhook | Mail = Webhook(target) if target.webhook else Mail(target)

    def put(self, notice: Notice) -> None:
        with self.wakeup:
            if len(self.queue) >= MAX_QUEUED:
                self.queue.popleft()
                self.dropped += 1
                if self.dropped == 1:
                    log.error("notification queue full: the oldest notices are dropped",
                              target=self.label, kept=MAX_QUEUED)
            self.queue.append(notice)
            self.wakeup.notify()

    def pending(self) -> int:
        return len(self.queue)

    def run(self) -> None:
        while not self.stop.is_set():
            with self.wakeup:
                if not self.queue:
                    self.wakeup.wait(timeout=1.0)
                    continue
                notice = self.queue[0]
            try:
                self.deliver(notice)
            except Stopped:
                break
            except Exception:  # a courier must never die: this notice is given up
                log.exception("notification failed", target=self.label, drop_id=notice.drop_id)
            with self.wakeup:
                if self.queue and self.queue[0] is notice:
                    self.queue.popleft()
        if self.queue:
            log.warning("notifications not delivered before the daemon stopped",
                        target=self.label, notices=len(self.queue))
        self.sender.close()

    def deliver(self, notice: Notice) -> None:
        retry = self.target.retry
        retrying = Retrying(
            stop=self._give_up,
            wait=wait_exponential_jitter(initial=retry.initial_backoff, max=retry.max_backoff,
                                         jitter=retry.initial_backoff),
            retry=retry_if_exception(lambda exc: isinstance(exc, NoticeError) and exc.transient),
            sleep=self._sleep,
            before_sleep=self._failed_try,
            reraise=True,
        )
        try:
            retrying(self._send, notice)
        except NoticeError as exc:
            self._counted(False)
            self._given_up(notice, exc)
            return
        self._counted(True)
        log.info("notification sent", target=self.label, kind=self.target.kind,
                 notice=notice.event, drop_id=notice.drop_id)
        if self.failing is not None:
            log.info("notification target reachable again", target=self.label,
                     host=self.target.host, waiting=len(self.queue) - 1)
            self.failing = None

    def _send(self, notice: Notice) -> None:
        if self.stop.is_set():
            raise Stopped
        facts = payload(notice, self.target.include_phi)
        if isinstance(self.sender, Webhook):
            self.sender.send(facts)
        else:
            assert self.target.email is not None
            subject, body = email_text(facts)
            self.sender.send(notice.to or tuple(self.target.email.to), subject, body)

    def _give_up(self, state: RetryCallState) -> bool:
        return self.stop.is_set() or \
            state.seconds_since_start >= self.target.retry.give_up_after

    def _sleep(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise Stopped

    def _failed_try(self, state: RetryCallState) -> None:
        self._counted(False)
        error = str(state.outcome.exception()) if state.outcome else "?"
        if self.failing is None:  # once per outage, not once per try
            log.warning("notification target failing; its notices wait and are retried",
                        target=self.label, kind=self.target.kind, host=self.target.host,
                        error=error, waiting=len(self.queue))
        self.failing = error

    def _given_up(self, notice: Notice, exc: NoticeError) -> None:
        if self.stop.is_set():
            raise Stopped
        reason = str(exc)
        if exc.transient:  # past give_up_after
            log.error("notification given up after retrying", target=self.label,
                      drop_id=notice.drop_id, notice=notice.event, error=reason,
                      hours=round(self.target.retry.give_up_after / 3600, 1))
        elif reason not in self.refused:
            self.refused.add(reason)
            log.error("notification refused; not retried (said once per reason)",
                      target=self.label, drop_id=notice.drop_id, notice=notice.event,
                      error=reason)

    def _counted(self, delivered: bool) -> None:
        if self.outcome:
            self.outcome(self.target.kind, delivered)


class Dispatcher:
    """Hands each notice to its target's courier, started at the first notice it gets."""

    def __init__(self, outcome: Outcome | None = None) -> None:
        self.stop = threading.Event()
        self.outcome = outcome
        self.couriers: dict[str, Courier] = {}
        self.lock = threading.Lock()

    def send(self, label: str, target: NoticeTarget, notice: Notice,
             to: tuple[str, ...] | None = None) -> None:
        # a target changed by a reload gets a courier of its own
        key = f"{label} {target.model_dump_json()}"
        with self.lock:
            if self.stop.is_set():
                return
            courier = self.couriers.get(key)
            if courier is None:
                courier = self.couriers[key] = Courier(label, target, self.stop, self.outcome)
                courier.start()
        courier.put(dataclasses.replace(notice, to=to) if to else notice)

    def pending(self) -> int:
        return sum(courier.pending() for courier in list(self.couriers.values()))

    def close(self, grace: float = 5.0) -> None:
        """Stop every courier, once notices for targets that answer are out (at most `grace`
        seconds): a drop finished just before a stop is still told."""
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(
                c.pending() and c.failing is None for c in list(self.couriers.values())):
            time.sleep(0.05)
        with self.lock:
            self.stop.set()
            couriers = list(self.couriers.values())
        for courier in couriers:
            with courier.wakeup:
                courier.wakeup.notify()
        for courier in couriers:
            courier.join(timeout=grace)
