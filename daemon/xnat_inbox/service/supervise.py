"""What systemd sees of the running daemon: READY=1 once every inbox is watched, a STATUS line a
person reads in `systemctl status`, RELOADING=1/STOPPING=1, and WATCHDOG=1 pings from the main
loop, which stop (and ask systemd to step in) when a worker makes no progress."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from datetime import date, datetime
from pathlib import Path
from typing import Protocol

from ..config import SiteConfig
from ..intake.claim import ClaimedDrop
from ..logs import DropName, get_logger
from .notify import Notifier
from .pause import Hold

SEPARATOR = " · "
#: recount today's reports this often even when no drop finished (the date may change)
RECOUNT_SECONDS = 60.0
#: routing folders kept below a day folder of done/ or failed/ that are counted in
MAX_ROUTING_DEPTH = 16


def finished_today(folders: set[tuple[Path, Path]], today: date) -> tuple[int, int]:
    """(done, failed) drops today: the reports in each inbox's done/ and failed/ day folder."""
    done = failed = 0
    for done_dir, failed_dir in folders:
        done += _reports(done_dir / f"{today:%Y-%m-%d}")
        failed += _reports(failed_dir / f"{today:%Y-%m-%d}")
    return done, failed


def _reports(folder: Path, depth: int = 0) -> int:
    """Reports in a day folder and in the routing folders kept below it (a folder beside
    which a report or log lies is a drop's originals, never walked; nor, should one be
    caught between its move and its report's, anything past MAX_ROUTING_DEPTH)."""
    try:
        with os.scandir(folder) as scan:
            entries = list(scan)
    except OSError:
        return 0
    names = {entry.name for entry in entries}
    count = 0
    for entry in entries:
        if entry.name.endswith(".report.json"):
            count += 1
        elif entry.is_dir(follow_symlinks=False) and depth < MAX_ROUTING_DEPTH and \
                f"{entry.name}.report.json" not in names and f"{entry.name}.log" not in names:
            count += _reports(Path(entry.path), depth + 1)
    return count


def inboxes(count: int, polling: int) -> str:
    text = "1 inbox" if count == 1 else f"{count} inboxes"
    return f"{text} ({polling} polling)" if polling else text


class Supervised(Protocol):
    """What the supervisor reads of the running daemon."""

    @property
    def config(self) -> SiteConfig: ...
    @property
    def drops(self) -> Mapping[str, ClaimedDrop]: ...  # claimed and not finished
    @property
    def last_activity(self) -> Mapping[str, float]: ...  # drop id -> last progress (monotonic)
    @property
    def progress(self) -> Mapping[str, tuple[int, int]]: ...  # drop id -> (sent, to send)

    def paused(self) -> Mapping[str, Hold]:
        """Destinations that send nothing now: paused, or outside their send window."""
        ...

    def watching(self) -> tuple[int, int]:
        """Inboxes watched, and how many of them by polling."""
        ...

    def settling(self) -> int:
        """Drops touched and not yet claimed."""
        ...

    def named(self, drop_id: str) -> DropName | None:
        """How to name a drop in flight (by its id until its headers were read)."""
        ...


class Supervisor:
    """Called from the daemon's main loop; talks to systemd through a Notifier."""

    def __init__(self, daemon: Supervised, notifier: Notifier | None = None) -> None:
        self.daemon = daemon
        self.notifier = notifier or Notifier.from_environment()
        self.log = get_logger(step="service")
        self.note: str | None = None  # e.g. a refused reload, until the next good one
        self.hung: set[str] = set()
        self._next_ping = 0.0
        self._counted: tuple[frozenset[str], float] | None = None
        self._today = (0, 0)

    # --- the service's state changes -----------------------------------------------------
    def ready(self) -> None:
        self.notifier.ready(self.status_line(time.monotonic()))

    def reloading(self) -> None:
        self.notifier.reloading()

    def reloaded(self, ok: bool) -> None:
        self.note = None if ok else f"config reload refused {datetime.now():%H:%M}, see the log"
        self.ready()

    def stopping(self) -> None:
        self.notifier.stopping()

    # --- every tick ---------------------------------------------------------------------
    def tick(self, now: float) -> None:
        self._check_workers(now)
        self.notifier.status(self.status_line(now))
        every = self.notifier.watchdog_every
        if every is not None and not self.hung and now >= self._next_ping:
            self.notifier.watchdog()
            self._next_ping = now + every

    def _check_workers(self, now: float) -> None:
        """A drop without progress for hung_worker_seconds has a stuck worker: say so once and
        let systemd's watchdog restart the daemon (the drop is resumed at the next start)."""
        limit = self.daemon.config.hung_worker_seconds
        activity = dict(self.daemon.last_activity)
        self.hung &= set(activity)  # finished after all
        if not limit:
            return
        for drop_id, last in activity.items():
            named = self.daemon.named(drop_id)
            if drop_id in self.hung or now - last < limit or named is None:
                continue  # None: finished just now
            self.hung.add(drop_id)
            with named.scope():
                self.log.error("worker stuck: no progress on this drop; asking systemd's "
                               "watchdog to restart the daemon (the drop is resumed at the next "
                               "start)", **named.fields(), seconds=round(now - last),
                               watchdog=self.notifier.watchdog_every is not None)
            self.notifier.watchdog_trigger()

    # --- the STATUS line ----------------------------------------------------------------
    def status_line(self, now: float) -> str:
        """e.g. "3 inboxes · 2 waiting · sending MR_0042 412/980 · xnat-web paused (upgrade)
        until 2026-12-08 07:00 · 4 done, 1 failed today"."""
        daemon = self.daemon
        parts = [inboxes(*daemon.watching())]
        in_flight = set(daemon.drops)
        started = dict(daemon.last_activity)
        waiting = daemon.settling() + len(in_flight - set(started))
        if waiting:
            parts.append(f"{waiting} waiting")
        for drop_id in sorted(started):
            parts.append(self._describe(drop_id))
        for name, hold in sorted(daemon.paused().items()):
            parts.append(f"{name} {hold.describe(short=True)}")
        done, failed = self._finished_today(frozenset(in_flight), now)
        parts.append(f"{done} done, {failed} failed today")
        if self.note:
            parts.append(self.note)
        return SEPARATOR.join(parts)

    def _describe(self, drop_id: str) -> str:
        # anyone on the host may read `systemctl status`: a folder named after the patient
        # shows as [PHI] once the drop's headers have been read
        named = self.daemon.named(drop_id)
        if named is not None and not named.read:
            return "reading a drop"  # its name is shown once its PHI values are known
        name = named.masked if named else drop_id
        if drop_id in self.hung:
            return f"STUCK {name}"
        progress = self.daemon.progress.get(drop_id)
        return f"sending {name} {progress[0]}/{progress[1]}" if progress else f"reading {name}"

    def _finished_today(self, in_flight: frozenset[str], now: float) -> tuple[int, int]:
        # counting reads folders: only when a drop finished, or now and then for a new day
        if self._counted is None or self._counted[0] != in_flight or \
                now - self._counted[1] >= RECOUNT_SECONDS:
            folders = {(inbox.done, inbox.failed) for inbox in self.daemon.config.inboxes}
            self._today = finished_today(folders, date.today())
            self._counted = (in_flight, now)
        return self._today
