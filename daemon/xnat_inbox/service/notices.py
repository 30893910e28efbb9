"""Who hears of which drop, and when: the site config's notify targets hear of every drop,
a route's notify entries of the drops below it; `failed` and `done` as the drop finishes,
`waiting` once a claimed drop has waited (not being read or sent) `after` minutes, once per
drop and target while the daemon runs. The notices go out on courier threads
(outcome/notices), so nothing here waits for a receiver.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Protocol

from ..config import SiteConfig
from ..intake.claim import ClaimedDrop
from ..logs import DropName
from ..notifyconfig import NoticeEvent, NoticeTarget, RouteNotice
from ..outcome.finish import outcome_of
from ..outcome.notices.dispatch import Dispatcher, Outcome
from ..outcome.notices.message import Notice
from ..outcome.report import DropReport
from ..routing.route import RouteError, resolve_route
from .state import State

#: how often the main loop looks for drops that waited long enough for a `waiting` notice
WAITING_CHECK_SECONDS = 2.0
REPORT_SUFFIX = ".report.json"  # beside the originals (outcome/finish.py)

#: (the target's label, the target, the route's recipients or None for the target's own)
Recipient = tuple[str, NoticeTarget, tuple[str, ...] | None]


class Watched(Protocol):
    """What the notices read of the running daemon."""

    @property
    def config(self) -> SiteConfig: ...
    @property
    def drops(self) -> Mapping[str, ClaimedDrop]: ...  # claimed and not finished
    @property
    def last_activity(self) -> Mapping[str, float]: ...  # drops being read or sent

    def named(self, drop_id: str) -> DropName | None: ...


def recipients(config: SiteConfig, event: NoticeEvent, entries: list[RouteNotice],
               waited: float | None = None) -> list[Recipient]:
    """The targets that hear of `event` (for `waiting`, after `waited` minutes): the site's,
    then the route's, each target and set of recipients once."""
    found: dict[tuple[str, tuple[str, ...] | None], Recipient] = {}
    named: dict[str, tuple[int, NoticeTarget]] = {}
    for index, target in enumerate(config.notify):
        if target.name:
            named[target.name] = (index, target)
        if event in target.on and (waited is None or waited >= target.after):
            found[(target.label(index), None)] = (target.label(index), target, None)
    for entry in entries:
        if entry.use not in named:  # checked with the route; gone from a reloaded config
            continue
        index, target = named[entry.use]
        on = entry.on if entry.on is not None else (target.on or ["failed"])
        after = entry.after if entry.after is not None else target.after
        if event in on and (waited is None or waited >= after):
            to = tuple(entry.to) if entry.to else None
            found.setdefault((target.label(index), to), (target.label(index), target, to))
    return list(found.values())


class Notices:
    def __init__(self, daemon: Watched, state: State, outcome: Outcome | None = None) -> None:
        self.daemon = daemon
        self.state = state
        self.dispatcher = Dispatcher(outcome)
        self.host = socket.gethostname()
        # lanes finish drops while the main loop looks for waiting ones
        self.lock = threading.Lock()
        self.told: dict[str, set[str]] = {}  # drop id -> targets told it waits
        self.routes: dict[str, tuple[list[RouteNotice], str | None]] = {}  # drop id -> route's
        self.ended: set[str] = set()  # finished, not yet out of the daemon's drops
        self._next_check = 0.0

    def finished(self, drop: ClaimedDrop, target: Path, report: DropReport | None,
                 named: DropName) -> None:
        with self.lock:
            self.ended.add(drop.id)  # no `waiting` notice after it finished
            self.told.pop(drop.id, None)
            cached = self.routes.pop(drop.id, None)
        if not self.daemon.config.notify:
            return
        if report is not None:
            ok = report.ok
            entries = list(report.route.template.notify or []) if report.route else []
        else:  # a restart completed the move: the route as it is now
            ok = bool(outcome_of(drop.inbox, target))
            entries = (cached or self._route(drop))[0]
        event: NoticeEvent = "done" if ok else "failed"
        notice = self._notice(event, drop, named,
                              report=target.with_name(target.name + REPORT_SUFFIX))
        self._send(notice, recipients(self.daemon.config, event, entries))

    def tick(self, now: float) -> None:
        """From the main loop: `waiting` notices for drops that waited long enough."""
        if now < self._next_check:
            return
        self._next_check = now + WAITING_CHECK_SECONDS
        config = self.daemon.config
        drops = dict(self.daemon.drops)
        with self.lock:  # forget drops no longer held (finished, or given back at a stop)
            self.ended &= set(drops)
            for known in (self.told, self.routes):
                for drop_id in set(known) - set(drops):
                    known.pop(drop_id, None)
        if not any(target.name or "waiting" in target.on for target in config.notify):
            return
        active = set(self.daemon.last_activity)
        for drop_id, drop in drops.items():
            if drop_id not in active:
                with self.lock:
                    if drop_id not in self.ended:
                        self._check_waiting(drop, config)

    def _check_waiting(self, drop: ClaimedDrop, config: SiteConfig) -> None:
        waited = (time.time() - drop.claimed_at.timestamp()) / 60
        entries, destination = self.routes.get(drop.id) or self._route(drop)
        self.routes[drop.id] = (entries, destination)
        told = self.told.setdefault(drop.id, set())
        due = [r for r in recipients(config, "waiting", entries, waited)
               if _key(r) not in told]
        named = self.daemon.named(drop.id)
        if not due or named is None:  # None: finished just now
            return
        notice = self._notice("waiting", drop, named, destination=destination,
                              reasons=tuple(self._why(drop, destination)),
                              waited_minutes=round(waited, 2))
        self._send(notice, due)
        told.update(_key(r) for r in due)

    def _route(self, drop: ClaimedDrop) -> tuple[list[RouteNotice], str | None]:
        try:
            route = resolve_route(drop, set(self.daemon.config.destinations))
        except RouteError:
            return [], None  # its own notices can't be known; the site's still go out
        return list(route.template.notify or []), route.destination

    def _why(self, drop: ClaimedDrop, destination: str | None) -> list[str]:
        """Why a drop waits: its destination's health, its last attempt's reason."""
        reasons = []
        # a daemon that can pause destinations says which, and why (service/pause.py)
        paused = getattr(self.daemon, "paused", None)
        hold = paused().get(destination) if callable(paused) and destination else None
        if hold is not None:
            describe = getattr(hold, "describe", None)
            reasons.append(f"{destination} is {describe() if callable(describe) else 'paused'}")
        health = self.state.health().get(destination or "")
        if health and health.get("up") is False:
            since = datetime.fromtimestamp(health["since"]).astimezone()
            reasons.append(f"{destination} is down since {since.isoformat(timespec='seconds')}"
                           f": {health.get('error')}")
        attempts = self.state.attempts(drop.id)
        if not attempts:
            reasons.append(f"queued behind other drops of {destination}" if destination
                           else "queued behind other drops")
        elif attempts[-1].reason:
            reasons.append(f"attempt {attempts[-1].number}: {attempts[-1].reason}")
        return reasons

    def _notice(self, event: NoticeEvent, drop: ClaimedDrop, named: DropName,
                report: Path | None = None, destination: str | None = None,
                reasons: tuple[str, ...] = (), waited_minutes: float | None = None) -> Notice:
        return Notice(event=event, drop_id=drop.id, inbox=str(drop.inbox.path),
                      shown=named.shown, name=named.name, read=named.read, phi=named.phi,
                      host=self.host, claimed_at=drop.claimed_at.isoformat(timespec="seconds"),
                      report=report, destination=destination, reasons=reasons,
                      waited_minutes=waited_minutes)

    def _send(self, notice: Notice, to: list[Recipient]) -> None:
        for label, target, recipients_ in to:
            self.dispatcher.send(label, target, notice, recipients_)

    def pending(self) -> int:
        return self.dispatcher.pending()

    def close(self) -> None:
        self.dispatcher.close()


def _key(recipient: Recipient) -> str:
    label, _, to = recipient
    return f"{label} {','.join(to) if to else ''}"
