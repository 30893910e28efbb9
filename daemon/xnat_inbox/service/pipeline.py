"""One claimed drop through the flow: scan+group → route → send → verify → finish.

One call is one attempt. Instances a destination acknowledged are recorded as they are
acknowledged, so a later attempt (after a transient failure, a SIGTERM or a crash) sends only
what is missing. A transient failure leaves the drop in the work area for the caller to retry.
"""

from __future__ import annotations

import os
import re
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from structlog.stdlib import BoundLogger

from ..config import SiteConfig
from ..fsops import UnsafePath
from ..intake.claim import ClaimedDrop
from ..intake.watch import is_archive_name
from ..libwarnings import replay
from ..logs import DropName, drop_log, get_logger, phi_pattern, plain_line
from ..outcome.finish import (
    FinishError,
    complete_finish,
    finish,
    finish_pending,
    outcome_of,
    plan_target,
)
from ..outcome.report import DropReport, StudyResult
from ..outcome.verify import verify_delivery
from ..reading.scan import FileEntry, Instance, Kind, ScanResult
from ..reading.scan_workers import NoWorker, ReadCancelled, ReadJob, ScanWorkers, WorkerLost
from ..reading.scanned import holding
from ..reading.unpack import UNPACKED, UnpackError
from ..routing.deidentify import prepare as deidentify
from ..routing.route import Route, RoutedStudy, RouteError, resolve_route, route_study
from ..senders.base import Delivery, InstanceOutcome, Sender
from ..senders.registry import make_sender
from .memo import Memo
from .state import State

#: called with (drop id, instances done, instances to send) as a study is sent
Progress = Callable[[str, int, int], None]
#: why a drop must stop sending at the next instance (paused, cancelled), or None
Halt = Callable[[], str | None]
#: reads of one drop that may cost a scan worker (or the daemon) its life before the drop is
#: set aside unread; counted in the state database, so restarts don't reset them
READ_FAILURES_ALLOWED = 3


class Hooks(Protocol):
    """What else hears of a drop's sends and its end (metrics, notices: service/ops.py)."""

    def sent(self, destination: str, delivery: Delivery) -> None: ...

    def finished(self, drop: ClaimedDrop, target: Path, report: DropReport | None,
                 named: DropName) -> None:
        """Moved to `target`; `report`: None when a restart completed the move."""
        ...


class TransientFailure(Exception):
    """Not delivered yet, but worth another attempt; the drop stays in the work area."""


class Interrupted(Exception):
    """Stopped on request mid-send; the drop stays in the work area and resumes later."""


class Halted(Interrupted):
    """Stopped mid-send by an operator (a pause, a cancel): not a failure, no attempt counted."""


def set_aside(failures: list[str]) -> str:
    reasons = "; ".join(dict.fromkeys(failures))  # each reason once, in the order they came
    return (f"reading this drop crashed a scan worker {len(failures)} times ({reasons}); set "
            "aside unread: look for an archive or file built to blow up a reader, then "
            "`xnat-inbox retry` it")


@dataclass
class DropCount:
    """Files of the whole drop to send and acknowledged so far: what STATUS= shows, so a
    drop of three one-file studies reads 1/3, not 0/1."""
    total: int
    done: int = 0


class Pipeline:
    def __init__(self, config: SiteConfig, state: State, progress: Progress | None = None,
                 stop: threading.Event | None = None,
                 phi_by_drop: dict[str, re.Pattern[str] | None] | None = None,
                 scans: ScanWorkers | None = None,
                 reading: Callable[[str], None] | None = None,
                 hooks: Hooks | None = None) -> None:
        self.config = config
        self.state = state
        self.progress = progress
        self.stop = stop or threading.Event()
        # each drop's PHI values, so what the service shows of a drop (STATUS=) can mask them
        self.phi_by_drop = {} if phi_by_drop is None else phi_by_drop
        # the daemon's worker processes; alone (tests, `explain`), the scan runs in-process
        self.scans = scans or ScanWorkers(0)
        # called with a drop's id as each read of it starts: a read has a time limit of its own
        # (scan_timeout), so reading again after a lost worker is progress, not a stuck drop
        self.reading = reading
        self.hooks = hooks
        self._senders: dict[str, Sender] = {}
        self._lock = threading.Lock()

    def sender(self, name: str) -> Sender:
        with self._lock:
            if name not in self._senders:
                self._senders[name] = make_sender(name, self.config.destinations[name],
                                                  Memo(self.state, f"sender {name}"))
            return self._senders[name]

    def destination_of(self, drop: ClaimedDrop) -> str | None:
        """The destination the drop's route names, or None when it has no usable route."""
        route = self._route(drop)
        return route.destination if isinstance(route, Route) else None

    def named(self, drop: ClaimedDrop) -> DropName:
        """How the service's log and STATUS= name this drop: by its id until its headers have
        been read, then by its name with its PHI masked."""
        read = drop.id in self.phi_by_drop
        return DropName(drop.id, str(drop.inbox.path), drop.relative_origin, drop.name, read,
                        self.phi_by_drop.get(drop.id))

    def process(self, drop: ClaimedDrop, give_up: str | None = None,
                halt: Halt | None = None) -> Path:
        """One attempt: deliver what is missing and finish, or raise TransientFailure /
        Interrupted leaving the drop in place. With `give_up`, send nothing and finish as
        failed with that reason. `halt` says when to stop at the next instance (Halted)."""
        if finish_pending(drop):  # decided and recorded earlier; only the move is left to do
            try:
                target = complete_finish(drop)
            except FinishError as exc:
                raise TransientFailure(str(exc)) from None
            outcome = "done" if outcome_of(drop.inbox, target) else "failed"
            self.state.drop_stage(drop.id, "finished", outcome=outcome, target=str(target))
            named = self.named(drop)  # a restart: its headers were not read again
            with named.scope():
                get_logger(**named.fields()).info("completed an interrupted finish",
                                                  stage="finish", moved_to=str(target))
            if self.hooks:
                self.hooks.finished(drop, target, None, named)
            return target
        with drop_log() as lines:
            lines.append(self._claimed_line(drop))
            named = self.named(drop)
            log = get_logger(**named.fields())
            report = DropReport(drop)
            started = time.monotonic()
            route = self._route(drop)  # once per attempt: it reads every route.yaml above
            attempt = self.state.start_attempt(
                drop.id, route.destination if isinstance(route, Route) else None)
            with named.scope():  # unpack's and the scan's own lines, too
                try:
                    report.scan = scan = self._scan(drop, report, log)
                except (TransientFailure, Interrupted) as exc:
                    self.state.end_attempt(drop.id, attempt, type(exc).__name__, str(exc))
                    raise
            report.timings["scan_seconds"] = time.monotonic() - started
            self.phi_by_drop[drop.id] = phi_pattern(scan.phi)
            named = self.named(drop)
            log = get_logger(**named.fields())
            with named.scope():
                replay(scan.warnings)  # pydicom's, from the scan worker: masked like our own
                log.info("scanned", stage="scan", files=len(scan.files), studies=len(scan.studies),
                         **scan.counts())
                try:
                    with holding(i.root for study in scan.studies.values()
                                 for i in study.instances if i.root is not None):
                        self._deliver(drop, report, log, give_up, route, halt)
                except (TransientFailure, Interrupted) as exc:
                    self.state.end_attempt(drop.id, attempt, type(exc).__name__, str(exc))
                    raise
                except Exception as exc:  # a bug must fail the drop, not lose it
                    log.exception("internal error", stage="send")
                    report.reasons.append(f"internal error ({type(exc).__name__}: {exc}); the "
                                          "originals are kept; please report this")
                report.timings["total_seconds"] = time.monotonic() - started
                return self._finish(drop, report, attempt, lines, log)

    def _claimed_line(self, drop: ClaimedDrop) -> str:
        """The drop's own log starts where its life in the daemon did: the `claimed` line (the
        service's log has it too, logged before any attempt, perhaps before a restart)."""
        skip = self.state.skip_studies(drop.id)
        return plain_line({"timestamp": drop.claimed_at.isoformat(timespec="milliseconds"),
                           "level": "info", "event": "claimed", "stage": "claim",
                           "drop_id": drop.id, "origin": drop.relative_origin,
                           "retry_skips_studies": len(skip) if skip else None})

    def _route(self, drop: ClaimedDrop) -> Route | RouteError:
        try:
            return resolve_route(drop, set(self.config.destinations))
        except RouteError as exc:
            return exc

    def _scan(self, drop: ClaimedDrop, report: DropReport, log: BoundLogger) -> ScanResult:
        """The drop unpacked (archives) and scanned in a scan worker; an empty scan and a reason
        in the report when it can't be: a refused archive, or a drop whose reading cost a
        worker its life READ_FAILURES_ALLOWED times."""
        failures = self.state.start_reading(drop.id)
        try:
            scan = self._read(drop, self._job(drop), failures, log)
        except (UnpackError, ReadCancelled, NoWorker, OSError) as exc:  # UnsafePath too
            self.state.end_reading(drop.id)
            report.reasons.append(self._unread(drop, exc, log))
            return ScanResult(drop.path, [], {}, set())
        # any other exception leaves the read begun: if it crashed the daemon's own process
        # (scan_processes: 0), the next read counts it among the failures
        self.state.end_reading(drop.id)
        if isinstance(scan, list):
            report.reasons.append(set_aside(scan))
            log.error("set aside unread", stage="scan", reasons=scan)
            return ScanResult(drop.path, [], {}, set())
        return scan

    @staticmethod
    def _job(drop: ClaimedDrop) -> ReadJob:
        """What a worker reads: the claimed folder, or the archive unpacked in the work area."""
        if is_archive_name(drop.name) and stat.S_ISREG(os.lstat(drop.path).st_mode):
            return ReadJob(drop.in_area(UNPACKED), drop.path, drop.inbox.archives,
                           drop.inbox.ready_marker)
        return ReadJob(drop.root(), None, drop.inbox.archives, drop.inbox.ready_marker)

    def _unread(self, drop: ClaimedDrop, exc: Exception, log: BoundLogger) -> str:
        """The reason an archive (or a link in a drop's place) was refused; or Interrupted,
        TransientFailure (try again)."""
        if isinstance(exc, UnpackError | UnsafePath):
            return str(exc)
        if isinstance(exc, ReadCancelled):
            raise Interrupted(f"{exc}; read again at the next start") from None
        if isinstance(exc, NoWorker):
            raise TransientFailure(f"{exc}; retried") from None
        log.error("cannot unpack", stage="scan", reason=str(exc))  # e.g. a full disk
        strerror = getattr(exc, "strerror", None) or exc
        raise TransientFailure(f"cannot unpack the archive: {strerror}; retried once there is "
                               "space") from None

    def _read(self, drop: ClaimedDrop, job: ReadJob, failures: list[str],
              log: BoundLogger) -> ScanResult | list[str]:
        """The scan, read again after each lost worker; the failures once there are too many."""
        while len(failures) < READ_FAILURES_ALLOWED:
            if self.reading:
                self.reading(drop.id)
            try:
                return self.scans.read(job, self.config.scan_timeout)
            except WorkerLost as exc:
                failures = self.state.read_failed(drop.id, str(exc))
                log.warning("scan worker lost reading this drop", stage="scan", reason=str(exc),
                            failures=len(failures), allowed=READ_FAILURES_ALLOWED)
        return failures

    def _finish(self, drop: ClaimedDrop, report: DropReport, attempt: int, lines: list[str],
                log: BoundLogger) -> Path:
        outcome = "done" if report.ok else "failed"
        reasons = report.all_reasons()
        self.state.end_attempt(drop.id, attempt, outcome, "; ".join(reasons))
        report.attempts = [a.as_dict() for a in self.state.attempts(drop.id)]
        finished = datetime.now().astimezone()
        self.state.record_summary(drop.id, *report.summary(), reasons[0] if reasons else None)
        try:
            target = plan_target(drop, report.ok, finished)
            log.info("finished", stage="finish", outcome=outcome, moved_to=str(target),
                     reasons=reasons)
            target = finish(drop, target, report.to_dict(finished), lines)
        except FinishError as exc:  # e.g. done/ is full: everything is kept, try again later
            log.error("cannot finish", stage="finish", reason=str(exc))
            raise TransientFailure(str(exc)) from None
        self.state.drop_stage(drop.id, "finished", outcome=outcome, target=str(target))
        if self.hooks:
            self.hooks.finished(drop, target, report, self.named(drop))
        return target

    def _deliver(self, drop: ClaimedDrop, report: DropReport, log: BoundLogger,
                 give_up: str | None, route: Route | RouteError, halt: Halt | None) -> None:
        scan = report.scan
        assert scan is not None
        if isinstance(route, RouteError):
            report.reasons.append(str(route))
            log.error("no route", stage="route", reason=str(route))
            return
        report.route = route
        if not route.template.ignore_unparsable and (bad := scan.of_kind(Kind.NOT_DICOM,
                                                                         Kind.UNREADABLE)):
            names = ", ".join(entry.rel for entry in bad[:5])
            report.reasons.append(f"{len(bad)} file(s) are not usable DICOM ({names}) and the "
                                  "route sets ignore_unparsable: false; remove them or allow it")
        if not scan.studies and not report.reasons:
            broken = scan.of_kind(Kind.UNREADABLE)  # e.g. DICOM without a StudyInstanceUID
            report.reasons.append(f"no DICOM study to send: {_unusable(broken)}" if broken
                                  else "no DICOM files in this drop")
        if report.reasons:
            log.error("drop refused", stage="route", reasons=report.reasons)
            return
        if give_up:
            report.reasons.append(give_up)
        skip = set(self.state.skip_studies(drop.id))
        for study in scan.studies.values():
            result = StudyResult(route_study(study, route, drop))
            deidentify(result.routed, drop, self.config.deid_secret_file,
                       self.state.record_deid_map, log)
            report.studies.append(result)
            result.delivered_earlier = study.uid in skip
        # what `status` counts against: the files of every study this drop sends, not one's
        total = sum(len(r.routed.instances) for r in report.studies
                    if not r.delivered_earlier and r.routed.included and not r.routed.problems)
        count = DropCount(total)
        for result in report.studies:
            if not result.delivered_earlier:
                self._send(drop, result, log, give_up, count, halt)
        retry = [r for r in report.studies if r.verdict and r.verdict.transient]
        if retry and not give_up and not any(r.blocked for r in report.studies):
            raise TransientFailure("; ".join(reason for r in retry for reason in r.reasons))
        if broken := scan.of_kind(Kind.UNREADABLE):
            # readable studies were sent; the drop still fails so a person sees the rest
            report.reasons.append(_unusable(broken))

    def _send(self, drop: ClaimedDrop, result: StudyResult, log: BoundLogger,
              give_up: str | None, count: DropCount, halt: Halt | None) -> None:
        routed = result.routed
        log.info("routed", stage="route", study=routed.study.uid, destination=routed.destination,
                 labels=routed.routing_value or None, series=len(routed.included),
                 excluded=len(routed.excluded), problems=routed.problems)
        if routed.problems or not routed.included:
            return
        earlier = self._acknowledged(drop, routed)
        result.earlier = set(earlier)
        pending = [i for i in routed.instances if i.sop_instance_uid not in earlier]
        self.state.drop_stage(drop.id, "sending", destination=routed.destination,
                              total=count.total)
        count.done += len(earlier)
        if pending and not give_up:
            delivery = self._send_pending(drop, routed, pending, count, halt)
            if self.hooks:
                self.hooks.sent(routed.destination, delivery)
        else:
            delivery = Delivery(routed.destination)
        delivery.outcomes.update(earlier)
        result.delivery = delivery
        result.verdict = verdict = verify_delivery(routed, delivery)
        log.info("sent", stage="send", study=routed.study.uid, destination=routed.destination,
                 stored=delivery.stored, of=len(routed.instances), earlier=len(earlier),
                 seconds=round(delivery.seconds, 2), error=delivery.error)
        if delivery.interrupted:
            why = halt() if halt and not self.stop.is_set() else None
            if why:
                raise Halted(f"{why}: stopped after {delivery.stored} of "
                             f"{len(routed.instances)} instance(s)")
            raise Interrupted(f"stopped after {delivery.stored} of {len(routed.instances)} "
                              "instance(s); resumes at the next start")
        log.info("verified", stage="verify", study=routed.study.uid,
                 delivered=verdict.delivered, retry=verdict.transient, reasons=verdict.reasons)

    def _acknowledged(self, drop: ClaimedDrop, routed: RoutedStudy) -> dict[str, InstanceOutcome]:
        """This study's instances the destination already stored (the state holds the whole
        drop's): what a `sent` event counts as earlier, and progress starts from."""
        rows = self.state.acknowledged(drop.id, routed.destination)
        ours = {instance.sop_instance_uid for instance in routed.instances}
        return {sop: InstanceOutcome(True, status, note) for sop, (status, note) in rows.items()
                if sop in ours}

    def _send_pending(self, drop: ClaimedDrop, routed: RoutedStudy, pending: list[Instance],
                      count: DropCount, halt: Halt | None) -> Delivery:
        done_before = count.done

        def on_instance(instance: Instance, outcome: InstanceOutcome) -> None:
            self.state.record_instance(drop.id, routed.destination, routed.study.uid,
                                       instance.sop_instance_uid, outcome.stored,
                                       outcome.status, outcome.note)
            count.done += 1
            if self.progress:
                self.progress(drop.id, count.done, count.total)

        def on_progress(files: int, sent_bytes: int) -> None:
            # REST uploads acknowledge a study only at its end: show files as they go out
            self.state.record_progress(drop.id, routed.destination, routed.study.uid, files,
                                       sent_bytes)
            if self.progress:
                self.progress(drop.id, done_before + files, count.total)

        def should_stop() -> bool:
            return self.stop.is_set() or (halt is not None and halt() is not None)

        return self.sender(routed.destination).send(routed, pending, on_instance, should_stop,
                                                    on_progress=on_progress)

    def close(self) -> None:
        """Let every sender end its sessions (e.g. log out of XNAT)."""
        with self._lock:
            senders, self._senders = list(self._senders.values()), {}
        for sender in senders:
            close = getattr(sender, "close", None)
            if close:
                close()


def _unusable(broken: list[FileEntry]) -> str:
    """The files that look like DICOM but can't be sent, each with why (the first five)."""
    names = ", ".join(f"{entry.rel} ({entry.reason})" for entry in broken[:5])
    return (f"{len(broken)} file(s) look like DICOM but can't be used: {names}; fix or remove "
            "them, then `xnat-inbox retry`")
