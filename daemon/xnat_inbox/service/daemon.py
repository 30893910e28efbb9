"""The daemon loop: observers mark drops touched, a tick claims settled drops, and one lane per
destination delivers them in order, retrying transient failures with backoff, so a destination
that is down holds up only its own drops."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential_jitter

from ..config import InboxConfig, RetryPolicy, SiteConfig
from ..intake.claim import ClaimedDrop, ClaimError, Identity, NotADrop, claim, claimed_drops
from ..intake.settle import SettleTracker, Snapshot, snapshot
from ..intake.watch import DropRef, InboxWatcher, existing_drops
from ..logs import DropName, get_logger, set_log_phi, unchecked
from ..outcome.finish import FinishError, reserve_recorded
from ..reading.scan_workers import ScanWorkers
from .lane import IDLE_TICK_SECONDS, Lane
from .lease import Lease, LeaseHeld
from .pipeline import Interrupted, Pipeline, TransientFailure
from .reload import (
    InboxError,
    inbox_changes,
    load_for_reload,
    log_reloaded,
    log_warnings,
    prepare_inboxes,
)
from .settling import SettlingRecord
from .state import State
from .supervise import Supervisor

TICK_SECONDS = 0.25
UNROUTED = "(no route)"  # the lane of drops whose route names no usable destination


#: the kernel's guard against hard links to files the linking user can't read (Debian: 1)
PROTECTED_HARDLINKS = Path("/proc/sys/fs/protected_hardlinks")


def warn_if_links_unprotected() -> None:
    """Symbolic links are never followed, but a hard link is the file itself: inbox users
    could link a file they can't read into a drop if the kernel let them."""
    try:
        unprotected = PROTECTED_HARDLINKS.read_text().strip() == "0"
    except OSError:
        return
    if unprotected:
        get_logger(step="service").warning(
            "the kernel lets users hard-link files they can't read into an inbox: set "
            "fs.protected_hardlinks=1 (sysctl)", setting=str(PROTECTED_HARDLINKS))


class StartupError(Exception):
    """The daemon can't start with this config; the message says what to fix."""


class Daemon:
    def __init__(self, config: SiteConfig, stop: threading.Event | None = None) -> None:
        self.config = config
        self.stop = stop or threading.Event()
        self.log = get_logger(step="service")
        self.state = State(config.state_dir)
        self.tracker = SettleTracker(lambda ref: self.config.settle_for(ref.inbox),
                                     lambda ref: self._watcher_of(ref).add_routing_folder(ref.path))
        self.scans = ScanWorkers(config.scan_processes, config.scan_memory_limit)
        self.pipeline = Pipeline(config, self.state, self._on_progress, self.stop,
                                 scans=self.scans, reading=self._on_reading)
        # pipelines replaced by a reload, closed once no drop in flight uses them any more
        self.retired: list[Pipeline] = []
        self.pipeline_of: dict[str, Pipeline] = {}  # drop id -> the pipeline of its attempts
        self.pipelines_lock = threading.Lock()
        self.lanes: dict[str, Lane] = {}
        self.progress: dict[str, tuple[int, int]] = {}
        self.watchers: list[InboxWatcher] = []
        self.claim_failures: set[DropRef] = set()
        self.own: set[Identity] = set()  # our own folders' (device, inode): never drops
        # for systemd: drops claimed and not finished, their last progress (STATUS=, watchdog)
        self.drops: dict[str, ClaimedDrop] = {}
        self.last_activity: dict[str, float] = {}
        self.reload_requested = threading.Event()
        self.wake = threading.Event()  # ends the main loop's wait: a drop was touched
        self.supervisor = Supervisor(self)
        self.lease = Lease(config.state_dir)
        self.settling_record = SettlingRecord(self.state)  # for `status`

    # --- what the supervisor reads ------------------------------------------------------
    def watching(self) -> tuple[int, int]:
        return len(self.watchers), sum(watcher.polling for watcher in self.watchers)

    def settling(self) -> int:
        # a claim's own rename touches the drop once more: count only what is still there
        return sum(os.path.lexists(ref.path) for ref in self.tracker.pending())

    def named(self, drop_id: str) -> DropName | None:
        drop = self.drops.get(drop_id)
        return self.pipeline.named(drop) if drop else None

    # --- start-up ---------------------------------------------------------------------
    def prepare(self) -> None:
        """Check the inboxes exist and create our own folders."""
        try:
            self.own_folders(prepare_inboxes(self.config))
        except InboxError as exc:
            raise StartupError(str(exc)) from None

    def start(self) -> None:
        try:
            self.lease.acquire()  # before anything is resumed or claimed
        except LeaseHeld as exc:
            raise StartupError(str(exc)) from None
        log_warnings(self.config)
        self.prepare()
        warn_if_links_unprotected()
        for inbox in self.config.inboxes:
            self.adopt_inbox(inbox)
        self.settling_record.update(self.tracker.pending())  # and what a crash left is gone

    def adopt_inbox(self, inbox: InboxConfig) -> None:
        """Resume what an earlier run left claimed in this inbox, then watch it."""
        resumed = claimed_drops(inbox)
        for drop in resumed:  # before any lane plans a target of its own
            reserve_recorded(drop)
        for drop in resumed:
            self.state.drop_stage(drop.id, "resumed", inbox=str(drop.inbox.path),
                                  origin=drop.relative_origin, name=drop.name,
                                  claimed_at=drop.claimed_at.isoformat())
            self.log.info("resuming claimed drop", **self.pipeline.named(drop).fields(),
                          stored_before=self.state.stored_count(drop.id))
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
            self.found_at_start(ref)

    def found_at_start(self, ref: DropRef) -> None:
        """A drop waiting at start-up: tracked as quiet since its newest mtime."""
        found = snapshot(ref)
        self.touch(ref, self._quiet_for(found, ref.inbox), found)

    def _quiet_for(self, found: Snapshot | None, inbox: InboxConfig) -> float:
        """How long a drop found at start-up has been quiet, by its newest mtime (files and
        folders; a copy in progress keeps the folder it fills fresh), at most settle_seconds:
        a backlog that waited through a downtime needs only the two agreeing snapshots, and
        this one, which dated it, is the first of them."""
        if found is None:
            return 0.0
        age = time.time() - found.newest_mtime_ns / 1e9
        return min(max(age, 0.0), self.config.settle_for(inbox))

    # --- the loop -----------------------------------------------------------------------
    def run(self) -> None:
        self.start()
        self.supervisor.ready()
        try:
            while not self.stop.is_set():
                # each wake-up costs CPU: an idle daemon ticks once a second, not four times
                self.wake.wait(TICK_SECONDS if self.busy() else IDLE_TICK_SECONDS)
                self.wake.clear()
                if self.stop.is_set():
                    break
                if self.reload_requested.is_set():
                    self.reload()
                self.tick(time.monotonic())
                self.supervisor.tick(time.monotonic())
                self.settling_record.update(self.tracker.pending())
        finally:
            self.supervisor.stopping()
            self.shutdown()

    def replace_pipeline(self, pipeline: Pipeline) -> None:
        """A reload's new config takes over; the old pipeline is closed once unused."""
        with self.pipelines_lock:
            self.retired.append(self.pipeline)
            self.pipeline = pipeline
        self.close_retired()

    def close_retired(self) -> None:
        """Close the pipelines a reload replaced that no drop in flight uses: their idle
        associations are released and their XNAT sessions logged out now, not left behind."""
        with self.pipelines_lock:
            unused = [p for p in self.retired
                      if not any(p is used for used in self.pipeline_of.values())]
            self.retired = [p for p in self.retired if p not in unused]
        for pipeline in unused:
            pipeline.close()

    def reload(self) -> None:
        """SIGHUP: the config file again; drops in flight keep the config they started with."""
        self.reload_requested.clear()
        self.supervisor.reloading()
        loaded = load_for_reload(self.config.source)
        if loaded is not None:
            new, own = loaded
            self.own_folders(own)
            self.apply_config(new)
        self.supervisor.reloaded(loaded is not None)

    def own_folders(self, found: set[Identity]) -> None:
        """Our own folders in every inbox, as found now and as recorded before (one renamed
        while the daemon was down is still ours): never claimed as a drop."""
        self.state.record_own_folders(found)
        self.own = self.state.own_folders()

    def apply_config(self, new: SiteConfig) -> None:
        changes = inbox_changes(self.config, new, (w.inbox for w in self.watchers))
        stopped = {inbox.path for inbox in changes.stop}
        for watcher in [w for w in self.watchers if w.inbox.path in stopped]:
            watcher.stop()
            self.watchers.remove(watcher)
            # drops still settling come back with the new inbox settings (or not at all)
            for ref in self.tracker.pending():
                if ref.inbox.path == watcher.inbox.path:
                    self.tracker.forget(ref)
        self.config = new
        self.replace_pipeline(Pipeline(new, self.state, self.pipeline.progress, self.stop,
                                       self.pipeline.phi_by_drop, self.scans,
                                       self.pipeline.reading))
        set_log_phi(new.log_phi)
        for inbox in changes.watch:
            self.watch_inbox(inbox)
        for inbox in changes.adopt:
            self.adopt_inbox(inbox)
        log_reloaded(new)

    def touch(self, ref: DropRef, age: float = 0.0, seen: Snapshot | None = None) -> None:
        """The drop changed `age` seconds ago: its quiet period starts then. `seen`: what it
        held just now, when that was read to date the change."""
        now = time.monotonic()
        self.tracker.touch(ref, now - age, seen, now)
        self.wake.set()  # an idle loop ticks at once, then every TICK_SECONDS while it settles

    def tick(self, now: float) -> None:
        for ref in self.tracker.due(now):
            try:
                drop = claim(ref, own=self.own)
            except NotADrop:  # its route.yaml arrived just now: its watcher finds its drops
                self._watcher_of(ref).add_routing_folder(ref.path)
                continue
            except ClaimError as exc:
                if ref not in self.claim_failures:  # once per drop, not every quiet period
                    with unchecked(ref.name):
                        self.log.error("claim failed", inbox=str(ref.inbox.path),
                                       reason=str(exc))
                self.claim_failures.add(ref)
                self.tracker.touch(ref, now)  # try again after another quiet period
                continue
            self.claim_failures.discard(ref)
            self._watcher_of(ref).forget(ref)
            self.state.drop_stage(drop.id, "claimed", inbox=str(drop.inbox.path),
                                  origin=drop.relative_origin, name=drop.name,
                                  claimed_at=drop.claimed_at.isoformat())
            skip = self.state.adopt_retry_request(drop.id, drop.relative_origin)
            self.log.info("claimed", stage="claim", **self.pipeline.named(drop).fields(),
                          retry_skips_studies=len(skip) if skip else None)
            self._submit(drop)

    def _watcher_of(self, ref: DropRef) -> InboxWatcher:
        return next(w for w in self.watchers if w.inbox.path == ref.inbox.path)

    def _submit(self, drop: ClaimedDrop) -> None:
        self.drops[drop.id] = drop
        destination = self.pipeline.destination_of(drop) or UNROUTED
        lane = self.lanes.get(destination)
        if lane is None:
            lane = self.lanes[destination] = Lane(destination, self.deliver, self.stop)
            lane.start()
        lane.put(drop)

    # --- one drop, with retries ---------------------------------------------------------
    def deliver(self, drop: ClaimedDrop, destination: str) -> bool:
        """Deliver with retries; False when stopped first (the drop stays claimed)."""
        policy = self._policy(destination)
        self.last_activity[drop.id] = time.monotonic()
        retrying = Retrying(
            stop=lambda state: self._gave_up(drop, policy, state),
            wait=wait_exponential_jitter(initial=policy.initial_backoff, max=policy.max_backoff,
                                         jitter=policy.initial_backoff),
            retry=retry_if_exception_type(TransientFailure),
            sleep=lambda seconds: self._sleep(drop, seconds),
            before_sleep=lambda state: self._destination_down(destination, state, drop),
            reraise=True,
        )
        with self.pipelines_lock:  # a drop keeps the config it started with
            pipeline = self.pipeline_of[drop.id] = self.pipeline
        try:
            retrying(pipeline.process, drop)
        except TransientFailure as exc:
            attempts = len(self.state.attempts(drop.id))
            return self._finish_anyway(pipeline, drop,
                                       f"gave up after {attempts} attempt(s): {exc}")
        except Interrupted:
            return False
        except FinishError as exc:
            named = pipeline.named(drop)
            with named.scope():
                self.log.error("finish failed", **named.fields(), reason=str(exc))
            return True  # it stays in the work area; the next start resumes it
        except Exception:  # a lane must never die: the drop stays claimed for the next start
            named = pipeline.named(drop)
            with named.scope():
                self.log.exception("internal error; the drop stays in the work area and is "
                                   "resumed at the next start", **named.fields(),
                                   work_area=str(drop.area))
            return True
        finally:
            self.progress.pop(drop.id, None)
            self.last_activity.pop(drop.id, None)
            pipeline.phi_by_drop.pop(drop.id, None)
            with self.pipelines_lock:
                self.pipeline_of.pop(drop.id, None)
            self.close_retired()
        self.drops.pop(drop.id, None)
        if destination != UNROUTED and self.state.destination_health(destination, up=True):
            self.log.info("destination reachable again", destination=destination)
        return True

    def _finish_anyway(self, pipeline: Pipeline, drop: ClaimedDrop, reason: str) -> bool:
        try:
            pipeline.process(drop, give_up=reason)
        except (FinishError, Interrupted) as exc:
            named = pipeline.named(drop)
            with named.scope():
                self.log.error("finish failed", **named.fields(), reason=str(exc))
        return True

    def _policy(self, destination: str) -> RetryPolicy:
        target = self.config.destinations.get(destination)
        return target.retry if target is not None else RetryPolicy(max_attempts=1)

    def _gave_up(self, drop: ClaimedDrop, policy: RetryPolicy, _: RetryCallState) -> bool:
        # counted from the state database, so restarts don't reset the clock
        attempts = self.state.attempts(drop.id)
        first = attempts[0].started if attempts else time.time()
        return len(attempts) >= policy.max_attempts or time.time() - first >= policy.give_up_after

    def _sleep(self, drop: ClaimedDrop, seconds: float) -> None:
        # waiting to retry is not a stuck worker: out of the watchdog's sight meanwhile
        self.last_activity.pop(drop.id, None)
        stopped = self.stop.wait(seconds)
        self.last_activity[drop.id] = time.monotonic()
        if stopped:
            raise Interrupted("stopped while waiting to retry")

    def _destination_down(self, destination: str, state: RetryCallState,
                          drop: ClaimedDrop) -> None:
        wait = state.next_action.sleep if state.next_action else 0.0
        error = str(state.outcome.exception()) if state.outcome else None
        waiting = len(self.lanes[destination]) - 1 if destination in self.lanes else 0
        if self.state.destination_health(destination, up=False, error=error,
                                         next_try=time.time() + wait):
            with self.pipeline.named(drop).scope():  # the error may quote its labels or name
                self.log.warning("destination failing; its drops wait in order and are "
                                 "retried", destination=destination, error=error,
                                 next_try_in=round(wait, 1), drops_waiting=waiting)
        else:
            self.log.debug("retrying", destination=destination, next_try_in=round(wait, 1))

    def _on_progress(self, drop_id: str, done: int, total: int) -> None:
        self.progress[drop_id] = (done, total)
        self.last_activity[drop_id] = time.monotonic()

    def _on_reading(self, drop_id: str) -> None:
        self.last_activity[drop_id] = time.monotonic()

    def busy(self) -> bool:
        """Drops settling or in flight: tick often (claims, STATUS progress, stuck workers)."""
        return bool(self.drops) or bool(self.tracker.pending())

    # --- stop ---------------------------------------------------------------------------
    def shutdown(self) -> None:
        self.stop.set()
        for lane in self.lanes.values():
            lane.wake()
        for watcher in self.watchers:
            watcher.stop()
        # a read under way is given up (its drop is read again at the next start): as soon as
        # we stop, so it is never taken for a crash of its worker
        self.scans.close()
        # a lane stops between two instances: at most one C-STORE is awaited
        destinations = self.config.destinations.values()
        longest = max((getattr(d, "dimse_timeout", 30.0) for d in destinations), default=30.0)
        for lane in self.lanes.values():
            lane.join(timeout=longest + 5)
        for pipeline in [*self.retired, self.pipeline]:
            pipeline.close()  # e.g. log out of XNAT
        self.state.record_settling([])  # nothing settles while the daemon is stopped
        self.state.close()
        self.log.info("stopped")
        self.lease.release()
