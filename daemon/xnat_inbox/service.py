"""The daemon loop: observers mark drops touched, a tick hands settled drops to workers."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from .claim import ClaimedDrop, ClaimError, claim, claimed_drops
from .config import InboxConfig, SiteConfig
from .finish import FinishError
from .logs import get_logger
from .pipeline import Pipeline
from .reload import reload_config
from .settle import SettleTracker
from .supervise import Supervisor
from .watch import DropRef, InboxWatcher, existing_drops, is_routing_folder

TICK_SECONDS = 0.25


class StartupError(Exception):
    """The daemon can't start with this config; the message says what to fix."""


class Daemon:
    def __init__(self, config: SiteConfig) -> None:
        self.config = config
        self.log = get_logger(step="service")
        self.tracker = SettleTracker(lambda ref: self.config.settle_for(ref.inbox))
        self.pipeline = Pipeline(config, progress=self._on_progress)
        self.executor = ThreadPoolExecutor(config.workers, thread_name_prefix="drop")
        self.in_flight: dict[str, Future[None]] = {}
        self.progress: dict[str, tuple[int, int]] = {}
        self.watchers: list[InboxWatcher] = []
        # systemd: names and last progress of drops in flight (STATUS=, the watchdog), reload
        self.drops: dict[str, ClaimedDrop] = {}
        self.last_activity: dict[str, float] = {}
        self.reload_requested = threading.Event()
        self.supervisor = Supervisor(self)

    # --- start-up ---------------------------------------------------------------------
    def prepare(self) -> None:
        """Check the inboxes exist and create our own folders."""
        for index, inbox in enumerate(self.config.inboxes):
            if not inbox.path.is_dir():
                raise StartupError(
                    f"{self.config.source}: inboxes[{index}].path {inbox.path} is not a folder; "
                    "create it (writable by the daemon's user) or fix the path")
            for folder in (inbox.work, inbox.done, inbox.failed):
                folder.mkdir(parents=True, exist_ok=True)
        self.config.state_dir.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        self.prepare()
        for inbox in self.config.inboxes:
            self.adopt_inbox(inbox)

    def adopt_inbox(self, inbox: InboxConfig) -> None:
        """Resume what an earlier run left claimed in this inbox, then watch it."""
        for drop in claimed_drops(inbox):
            self.log.info("resuming claimed drop", drop=drop.relative_origin, drop_id=drop.id)
            self._submit(drop)
        self.watch_inbox(inbox)

    def watch_inbox(self, inbox: InboxConfig) -> None:
        watcher = InboxWatcher(inbox, self.touch)
        watcher.start()
        self.watchers.append(watcher)
        self.log.info("watching", inbox=str(inbox.path),
                      mode="polling" if watcher.polling else "inotify",
                      settle_seconds=self.config.settle_for(inbox))
        for ref in existing_drops(inbox):
            self.touch(ref)

    # --- the loop -----------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        self.start()
        self.supervisor.ready()
        try:
            while not stop.wait(TICK_SECONDS):
                if self.reload_requested.is_set():
                    self.reload()
                self.tick(time.monotonic())
                self.supervisor.tick(time.monotonic())
        finally:
            self.supervisor.stopping()
            self.shutdown()

    def reload(self) -> None:
        """SIGHUP: the config file again; drops in flight keep the config they started with."""
        self.reload_requested.clear()
        self.supervisor.reloading()
        self.supervisor.reloaded(reload_config(self))

    def touch(self, ref: DropRef) -> None:
        self.tracker.touch(ref, time.monotonic())
        if ref.name is None and ref.folder != ref.inbox.path and is_routing_folder(ref.folder):
            # a route.yaml just made this a routing folder: what is in it are drops now
            for child in existing_drops(ref.inbox, ref.folder):
                self.tracker.touch(child, time.monotonic())

    def tick(self, now: float) -> None:
        for ref in self.tracker.due(now):
            try:
                drop = claim(ref)
            except ClaimError as exc:
                self.log.error("claim failed", drop=str(ref), reason=str(exc))
                self.tracker.touch(ref, now)  # try again after another quiet period
                continue
            self._watcher_of(ref).forget(ref)
            self.log.info("claimed", stage="claim", drop=drop.relative_origin, drop_id=drop.id)
            self._submit(drop)
        self._reap()

    def _watcher_of(self, ref: DropRef) -> InboxWatcher:
        return next(w for w in self.watchers if w.inbox.path == ref.inbox.path)

    def _submit(self, drop: ClaimedDrop) -> None:
        self.drops[drop.id] = drop
        self.in_flight[drop.id] = self.executor.submit(self._process, drop)

    def _process(self, drop: ClaimedDrop) -> None:
        self.last_activity[drop.id] = time.monotonic()
        try:
            target = self.pipeline.process(drop)
        except FinishError as exc:
            self.log.error("finish failed", drop=drop.relative_origin, reason=str(exc))
        except Exception:  # a worker must never take the daemon down
            self.log.exception("internal error; the drop stays in the work area and is "
                               "resumed at the next start", drop=drop.relative_origin,
                               work_path=str(drop.path))
        else:
            self.log.debug("drop done", drop=drop.relative_origin, target=str(target))
        finally:
            self.progress.pop(drop.id, None)
            self.last_activity.pop(drop.id, None)

    def _on_progress(self, drop_id: str, done: int, total: int) -> None:
        self.progress[drop_id] = (done, total)
        self.last_activity[drop_id] = time.monotonic()

    def _reap(self) -> None:
        for drop_id in [d for d, future in self.in_flight.items() if future.done()]:
            del self.in_flight[drop_id]
            self.drops.pop(drop_id, None)

    def idle(self) -> bool:
        return not self.in_flight and not self.tracker.pending()

    # --- stop ---------------------------------------------------------------------------
    def shutdown(self) -> None:
        for watcher in self.watchers:
            watcher.stop()
        # queued drops stay claimed in the work area and are resumed at the next start
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.log.info("stopped")

