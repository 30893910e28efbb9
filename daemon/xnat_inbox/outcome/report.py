"""The per-drop report: what came in, where each study went, what became of every file.

It lies beside the originals, which hold the patient's data anyway, readable by the same people:
labels, routing strings and paths are written as they are (secrets never)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .. import __version__
from ..intake.claim import ClaimedDrop
from ..logs import secrets_masked
from ..reading.scan import Kind, ScanResult
from ..reading.scanned import Series
from ..routing.route import Route, RoutedStudy
from ..senders.base import Delivery
from ..senders.transcode import uid_name
from .verify import Verdict

#: a file the destination acknowledged before this attempt (or before `xnat-inbox retry`)
STORED_EARLIER = "stored (earlier attempt)"


@dataclass
class StudyResult:
    routed: RoutedStudy
    delivery: Delivery | None = None
    verdict: Verdict | None = None
    delivered_earlier: bool = False  # by an earlier drop this one is a retry of
    #: SOPInstanceUIDs acknowledged by an earlier attempt of this drop (not sent again)
    earlier: set[str] = field(default_factory=set)

    @property
    def delivered(self) -> bool:
        if self.delivered_earlier:
            return True
        if self.routed.problems:
            return False
        if not self.routed.included:
            return True  # every series filtered out on purpose: nothing to deliver
        return bool(self.verdict and self.verdict.delivered)

    @property
    def blocked(self) -> bool:
        """Failed for a reason no retry will mend."""
        if self.delivered:
            return False
        return bool(self.routed.problems) or bool(self.verdict and not self.verdict.transient)

    @property
    def reasons(self) -> list[str]:
        return [*self.routed.problems, *(self.verdict.reasons if self.verdict else [])]


@dataclass
class DropReport:
    drop: ClaimedDrop
    scan: ScanResult | None = None
    route: Route | None = None
    studies: list[StudyResult] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)  # drop-level: no route, junk policy, ...
    timings: dict[str, float] = field(default_factory=dict)
    attempts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.reasons and bool(self.studies) and all(s.delivered for s in self.studies)

    def all_reasons(self) -> list[str]:
        study_reasons = [f"study {n}: {reason}" for n, s in enumerate(self.studies, 1)
                         for reason in s.reasons]
        return [*self.reasons, *study_reasons]

    def summary(self) -> tuple[int, int, int, float]:
        """What `history` lists of the drop: studies, instances stored (over all attempts),
        bytes this attempt sent, and the seconds it took (read to finish)."""
        studies = self.studies
        return (len(studies), sum(r.verdict.stored for r in studies if r.verdict),
                sum(r.delivery.bytes_sent for r in studies if r.delivery),
                self.timings.get("total_seconds", 0.0))

    def to_dict(self, finished_at: datetime) -> dict[str, Any]:
        report = {
            "version": __version__,
            "outcome": "done" if self.ok else "failed",
            "reasons": self.all_reasons(),
            "drop": {
                "name": self.drop.name,
                "inbox": str(self.drop.inbox.path),
                "origin": self.drop.relative_origin,
                "loose_files": self.drop.loose,
                "id": self.drop.id,
            },
            "route": {"sources": list(self.route.sources), "destination": self.route.destination}
            if self.route else None,
            # what a route.yaml in this inbox may ask for, and where the site admin sets it
            "limits": {"config": f"{self.drop.inbox.config_key}.allow",
                       **self.drop.inbox.allow.model_dump(mode="json")},
            "timings": {
                "claimed_at": self.drop.claimed_at.isoformat(),
                "finished_at": finished_at.isoformat(),
                **{key: round(value, 3) for key, value in self.timings.items()},
            },
            "attempts": self.attempts,
            "studies": [_study(result) for result in self.studies],
            "files": self._files(),
        }
        return secrets_masked(report)

    def _files(self) -> dict[str, Any]:
        entries = self.scan.files if self.scan else []
        by_kind = self.scan.counts() if self.scan else {}
        outcomes = self._file_outcomes()
        listed = []
        for entry in entries:
            outcome, reason = outcomes.get(entry.rel, (_default_outcome(entry.kind), entry.reason))
            listed.append({"path": entry.rel, "size": entry.size, "kind": entry.kind.value,
                           "outcome": outcome, "reason": reason})
        return {"total": len(entries), "by_kind": by_kind, "entries": listed}

    def _file_outcomes(self) -> dict[str, tuple[str, str | None]]:
        outcomes: dict[str, tuple[str, str | None]] = {}
        for result in self.studies:
            routed = result.routed
            for series, why in routed.excluded:
                for instance in series.instances:
                    outcomes[instance.rel] = ("filtered", why)
            for instance in routed.instances:
                outcomes[instance.rel] = _instance_outcome(result, instance.sop_instance_uid)
        return outcomes


def _instance_outcome(result: StudyResult, sop_uid: str) -> tuple[str, str | None]:
    if result.delivered_earlier:
        return STORED_EARLIER, ("the study was delivered before the drop was retried; not sent "
                                "again")
    if result.routed.problems:
        return "not sent", "the study was not sent: " + "; ".join(result.routed.problems)
    outcome = result.delivery.outcomes.get(sop_uid) if result.delivery else None
    if outcome is None:
        return "not sent", (result.delivery.error if result.delivery else None)
    if outcome.stored and sop_uid in result.earlier:
        return STORED_EARLIER, outcome.note
    return ("stored" if outcome.stored else "failed"), outcome.note


def _default_outcome(kind: Kind) -> str:
    return {Kind.JUNK: "kept", Kind.DICOM: "not sent"}.get(kind, "skipped")


def _study(result: StudyResult) -> dict[str, Any]:
    routed, delivery, verdict = result.routed, result.delivery, result.verdict
    labels = routed.labels
    return {
        "study_instance_uid": routed.study.uid,
        "destination": routed.destination,
        "labels": {"project": labels.project, "subject": labels.subject,
                   "session": labels.session} if labels else None,
        "routing_field": routed.routing_keyword,
        "routing_string": routed.routing_value or None,
        "delivered": result.delivered,
        "delivered_by_an_earlier_drop": result.delivered_earlier,
        "instances": len(routed.study.instances),
        "instances_to_send": len(routed.instances),
        "stored": verdict.stored if verdict else 0,
        "warnings": verdict.warnings if verdict else 0,
        "associations": delivery.associations if delivery else 0,
        "bytes_sent": delivery.bytes_sent if delivery else 0,
        "send_seconds": round(delivery.seconds, 3) if delivery else 0,
        "reasons": result.reasons,
        "deidentify": routed.template.deidentify,
        "phi_guard": {"mode": routed.template.phi_guard, "attributes": routed.phi_findings},
        "series": [
            {"number": series.number, "description": series.description,
             "modality": series.modality, "instances": len(series.instances),
             "sent": reason is None, "excluded_because": reason,
             **_sent_as(series, delivery)}
            for series, reason in [*((s, None) for s in routed.included), *routed.excluded]
        ],
    }


def _sent_as(series: Series, delivery: Delivery | None) -> dict[str, Any]:
    """The transfer syntaxes this attempt's stored instances of a series went out in (count
    by syntax), and how many of them were converted from their file's own (transcoded)."""
    sent: dict[str, int] = {}
    converted = 0
    for instance in series.instances:
        outcome = delivery.outcomes.get(instance.sop_instance_uid) if delivery else None
        if outcome is None or not outcome.stored or outcome.syntax is None:
            continue
        name = uid_name(outcome.syntax)
        sent[name] = sent.get(name, 0) + 1
        converted += outcome.syntax != instance.transfer_syntax
    return {"sent_as": sent, "converted": converted}
