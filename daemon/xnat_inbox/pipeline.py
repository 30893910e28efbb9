"""One claimed drop through the flow: scan+group → route → send → verify → finish."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from structlog.stdlib import BoundLogger

from .claim import ClaimedDrop
from .config import SiteConfig
from .finish import move_originals, write_beside
from .logs import drop_log, get_logger, phi_pattern, phi_scope
from .report import DropReport, StudyResult
from .route import RouteError, resolve_route, route_study
from .scan import Kind, scan_drop
from .senders import Sender, make_sender
from .verify import verify_delivery

#: called with (drop id, instances done, instances to send) as a study is sent
Progress = Callable[[str, int, int], None]


class Pipeline:
    def __init__(self, config: SiteConfig, progress: Progress | None = None) -> None:
        self.config = config
        self.progress = progress
        self._senders: dict[str, Sender] = {}
        self._lock = threading.Lock()

    def sender(self, name: str) -> Sender:
        with self._lock:
            if name not in self._senders:
                self._senders[name] = make_sender(name, self.config.destinations[name])
            return self._senders[name]

    def process(self, drop: ClaimedDrop) -> Path:
        """Deliver the drop and move it to done/ or failed/; returns where it went."""
        with drop_log() as lines:
            log = get_logger(drop=drop.relative_origin, drop_id=drop.id)
            report = DropReport(drop)
            started = time.monotonic()
            report.scan = scan = scan_drop(drop.path, drop.inbox.ready_marker)
            report.timings["scan_seconds"] = time.monotonic() - started
            phi = phi_pattern(scan.phi)
            with phi_scope(phi):
                log.info("scanned", stage="scan", files=len(scan.files), studies=len(scan.studies),
                         **scan.counts())
                try:
                    self._deliver(drop, report, log)
                except Exception as exc:  # a bug must fail the drop, not lose it
                    log.exception("internal error", stage="send")
                    report.reasons.append(f"internal error ({type(exc).__name__}: {exc}); the "
                                          "originals are kept; please report this")
                report.timings["total_seconds"] = time.monotonic() - started
                finished = datetime.now().astimezone()
                target = move_originals(drop, report.ok, finished)
                log.info("finished", stage="finish", outcome="done" if report.ok else "failed",
                         moved_to=str(target), reasons=report.all_reasons())
                write_beside(target, report.to_dict(finished, phi), lines)
            return target

    def _deliver(self, drop: ClaimedDrop, report: DropReport, log: BoundLogger) -> None:
        scan = report.scan
        assert scan is not None
        try:
            report.route = route = resolve_route(drop, set(self.config.destinations))
        except RouteError as exc:
            report.reasons.append(str(exc))
            log.error("no route", stage="route", reason=str(exc))
            return
        if not route.template.ignore_unparsable and (bad := scan.of_kind(Kind.NOT_DICOM,
                                                                         Kind.UNREADABLE)):
            names = ", ".join(entry.rel for entry in bad[:5])
            report.reasons.append(f"{len(bad)} file(s) are not usable DICOM ({names}) and the "
                                  "route sets ignore_unparsable: false; remove them or allow it")
        if not scan.studies:
            report.reasons.append("no DICOM files in this drop")
        if report.reasons:
            log.error("drop refused", stage="route", reasons=report.reasons)
            return
        for study in scan.studies.values():
            result = StudyResult(route_study(study, route, drop))
            report.studies.append(result)
            self._send(drop, result, log)

    def _send(self, drop: ClaimedDrop, result: StudyResult, log: BoundLogger) -> None:
        routed = result.routed
        log.info("routed", stage="route", study=routed.study.uid,
                 destination=routed.destination,
                 labels=routed.routing_value or None, series=len(routed.included),
                 excluded=len(routed.excluded), problems=routed.problems)
        if routed.problems or not routed.included:
            return
        total, done = len(routed.instances), 0

        def on_instance(*_: object) -> None:
            nonlocal done
            done += 1
            if self.progress:
                self.progress(drop.id, done, total)

        delivery = self.sender(routed.destination).send(routed, on_instance)
        result.delivery = delivery
        result.verdict = verdict = verify_delivery(routed, delivery)
        log.info("sent", stage="send", study=routed.study.uid,
                 destination=routed.destination, stored=delivery.stored, of=total,
                 seconds=round(delivery.seconds, 2), error=delivery.error)
        log.info("verified", stage="verify", study=routed.study.uid,
                 delivered=verdict.delivered, reasons=verdict.reasons)
