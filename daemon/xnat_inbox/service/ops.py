"""What operators get from the running daemon beside its log: notices to people (webhook,
email) and Prometheus metrics. The daemon calls these few hooks; none of them may hold up or
fail a drop, so each swallows (and logs) its own errors."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from ..config import SiteConfig
from ..intake.claim import ClaimedDrop
from ..logs import DropName, get_logger
from ..outcome.finish import outcome_of
from ..outcome.report import DropReport
from ..senders.base import Delivery
from .metrics import Health, Metrics
from .notices import Notices
from .state import State

log = get_logger(step="service")


class Supervised(Protocol):
    hung: set[str]  # drops whose worker is stuck (the watchdog's condition)


class Observed(Protocol):
    """What notices and metrics read of the running daemon."""

    @property
    def config(self) -> SiteConfig: ...
    @property
    def drops(self) -> Mapping[str, ClaimedDrop]: ...
    @property
    def last_activity(self) -> Mapping[str, float]: ...
    @property
    def supervisor(self) -> Supervised: ...

    def settling(self) -> int: ...

    def named(self, drop_id: str) -> DropName | None: ...


class Ops:
    def __init__(self, daemon: Observed, state: State) -> None:
        self.notices = Notices(daemon, state, self._notified)
        self.health = Health(lambda: bool(daemon.supervisor.hung))
        # metrics: is read at start (a reload doesn't move the port or the file)
        self.daemon = daemon
        self.settings = settings = daemon.config.metrics
        self.metrics = Metrics(daemon, state, settings, self.health, self.notices.pending) \
            if settings else None

    def start(self) -> None:
        """At the end of the daemon's start, as its main loop begins."""
        self.health.tick(time.monotonic())
        if self.metrics:
            self.metrics.start()

    def tick(self, now: float) -> None:
        """From the main loop, every tick."""
        self.health.tick(now)
        if self.daemon.config.metrics != self.settings:  # a reload changed them: say so once
            self.settings = self.daemon.config.metrics
            log.warning("metrics: changed by the reload, but they take effect only at a "
                        "restart (systemctl restart xnat-inbox)")
        try:
            self.notices.tick(now)
        except Exception:
            log.exception("internal error looking for waiting drops to notify")

    def sent(self, destination: str, delivery: Delivery) -> None:
        try:
            if self.metrics:
                self.metrics.sent(destination, delivery)
        except Exception:  # a count must not fail a send
            log.exception("internal error counting a send", destination=destination)

    def finished(self, drop: ClaimedDrop, target: Path, report: DropReport | None,
                 named: DropName) -> None:
        try:
            if self.metrics:
                ok = report.ok if report else bool(outcome_of(drop.inbox, target))
                self.metrics.finished_drop(str(drop.inbox.path), "done" if ok else "failed")
            self.notices.finished(drop, target, report, named)
        except Exception:  # the drop is finished; a notice or a count must not undo that
            with named.scope():
                log.exception("internal error notifying a finished drop", **named.fields())

    def retrying(self, destination: str) -> None:
        if self.metrics:
            self.metrics.retrying(destination)

    def _notified(self, kind: str, delivered: bool) -> None:
        if self.metrics:
            self.metrics.notified(kind, delivered)

    def stop(self) -> None:
        self.health.stopping = True
        self.notices.close()
        if self.metrics:
            self.metrics.stop()
