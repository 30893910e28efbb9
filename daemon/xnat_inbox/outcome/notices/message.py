"""What a notice says: the facts of a drop's report (or of its wait), as a JSON payload for a
webhook and as a short plain-text email.

PatientName, PatientID and PatientBirthDate stay out unless the target sets include_phi: the
drop's PHI values (and the forms they take in names and paths) are masked as [PHI] in the
drop's name, the reasons and the report's path. A drop whose headers were never read is
named by its id, since its folder may be named after the patient. Labels are shown as they
are: they are what a person looks for in XNAT. Secrets are masked always.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ... import __version__
from ...logs import REDACTED, phi_pattern, printable, secrets_masked
from ...notifyconfig import NoticeEvent

#: a report larger than this is not read for a notice (a drop of very many files): the
#: notice then gives what the daemon knows without it
REPORT_MAX_BYTES = 64 * 2**20
#: at most this many reasons in a notice (the report has them all)
MAX_REASONS = 20


class NoticeError(Exception):
    """A notice was not delivered: `transient` ones are tried again later. The message names
    the target's host, never its URL's path or a header."""

    def __init__(self, message: str, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class Notice:
    """One event of one drop, before it is rendered for a target."""

    event: NoticeEvent
    drop_id: str
    inbox: str
    shown: str  # the drop as `status` names it: routing folders and name, below the inbox
    name: str  # its own name, as it arrived
    read: bool  # its headers were read: `phi` holds its PHI values
    phi: re.Pattern[str] | None
    host: str
    claimed_at: str
    report: Path | None = None  # the report beside the originals (done, failed)
    outcome: str | None = None  # done or failed; from the report when there is one
    destination: str | None = None
    reasons: tuple[str, ...] = ()  # waiting: why it waits
    waited_minutes: float | None = None
    #: an email target's recipients for this notice (a route's `to:`); None: the target's own
    to: tuple[str, ...] | None = None
    facts: dict[str, Any] = field(default_factory=dict, compare=False)  # the report, once read

    def mask(self) -> re.Pattern[str] | None:
        """What is PHI in this notice: the drop's values, or, unread, its own name."""
        return self.phi if self.read else phi_pattern([self.name])

    def report_facts(self) -> dict[str, Any]:
        """The report's content (read once, by the first target that renders it)."""
        if not self.facts and self.report is not None:
            self.facts.update(read_report(self.report))
        return self.facts


def read_report(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            data = file.read(REPORT_MAX_BYTES + 1)
        if len(data) > REPORT_MAX_BYTES:
            return {}
        report = json.loads(data)
    except (OSError, ValueError):
        return {}  # the notice still goes out, with what the daemon knows
    return report if isinstance(report, dict) else {}


def payload(notice: Notice, include_phi: bool) -> dict[str, Any]:
    """The webhook's JSON (and what the email says)."""
    report = notice.report_facts()
    studies = report.get("studies") or []
    files = report.get("files") or {}
    reasons = list(report.get("reasons") or notice.reasons)
    route = report.get("route") or {}
    timings = report.get("timings") or {}
    masked = _masker(notice, include_phi)
    return secrets_masked({
        "event": notice.event,
        "outcome": report.get("outcome") or notice.outcome or notice.event,
        "drop": masked(notice.shown) if notice.read or include_phi else None,
        "drop_id": notice.drop_id,
        "inbox": notice.inbox,
        "destination": route.get("destination") or notice.destination,
        "reasons": [masked(reason) for reason in reasons[:MAX_REASONS]],
        "studies": [{"labels": study.get("labels"),  # as they are, PHI or not
                     "destination": study.get("destination"),
                     "delivered": study.get("delivered"),
                     "instances": study.get("instances_to_send"),
                     "stored": study.get("stored")} for study in studies],
        "counts": {"studies": len(studies), "files": files.get("total"),
                   "by_kind": files.get("by_kind"),
                   "instances": sum(s.get("instances_to_send") or 0 for s in studies),
                   "stored": sum(s.get("stored") or 0 for s in studies)} if report else None,
        "report": masked(str(notice.report)) if notice.report else None,
        "claimed_at": timings.get("claimed_at") or notice.claimed_at,
        "finished_at": timings.get("finished_at"),
        "waited_minutes": notice.waited_minutes,
        "host": notice.host,
        "sent_by": f"xnat-inbox {__version__}",
    })


def _masker(notice: Notice, include_phi: bool) -> Any:
    pattern = None if include_phi else notice.mask()
    return lambda text: pattern.sub(REDACTED, text) if pattern else text


def email_text(facts: dict[str, Any]) -> tuple[str, str]:
    """(subject, body) from a payload: a few lines a person reads on a phone."""
    line = printable  # a name with a line break must not add a line (or a header)
    drop = facts["drop"] or f"drop {facts['drop_id']}"
    where = f"{line(drop)} in {line(facts['inbox'])}"
    destination = facts.get("destination")
    if facts["event"] == "waiting":
        subject = f"xnat-inbox: {line(drop)} waiting"
        minutes = facts.get("waited_minutes")
        waited = f"has waited {minutes:.0f} minutes" if minutes is not None else "waits"
        opening = (f"The drop {where} {waited}"
                   + (f" to be sent to {line(destination)}." if destination else "."))
    else:
        delivered = facts["outcome"] == "done"
        subject = f"xnat-inbox: {line(drop)} {'delivered' if delivered else 'failed'}"
        opening = (f"The drop {where} {'was delivered' if delivered else 'failed'}"
                   + (f" ({line(destination)})." if destination else "."))
    body = [opening, ""]
    if facts["reasons"]:
        body += ["Why:", *(f"  - {line(reason)}" for reason in facts["reasons"]), ""]
    if facts["studies"]:
        body.append("Studies:")
        for number, study in enumerate(facts["studies"], 1):
            labels = study["labels"] or {}
            names = " / ".join(line(str(labels.get(k, "?"))) for k in
                               ("project", "subject", "session")) if labels else "(no labels)"
            body.append(f"  {number}. {names}: {study['stored']} of {study['instances']} "
                        "instance(s) stored")
        body.append("")
    counts = facts.get("counts") or {}
    if counts.get("files") is not None:
        kinds = ", ".join(f"{n} {kind}" for kind, n in (counts.get("by_kind") or {}).items())
        body.append(f"Files: {counts['files']}" + (f" ({kinds})" if kinds else ""))
    if facts["report"]:
        body.append(f"Report: {line(facts['report'])}")
    body.append(f"Claimed: {_when(facts['claimed_at'])}" + (
        f", finished {_when(facts['finished_at'])}" if facts.get("finished_at") else ""))
    body.append(f"Host: {line(facts['host'])} ({facts['sent_by']})")
    if facts["event"] == "failed":
        body += ["", "Once the cause is fixed, `xnat-inbox retry` the drop (see the report)."]
    return subject, "\n".join(body) + "\n"



def _when(text: str) -> str:
    """A time to the second, for people: 2026-12-08T07:00:01+01:00."""
    try:
        return datetime.fromisoformat(text).isoformat(timespec="seconds")
    except (TypeError, ValueError):
        return str(text)
