"""Step 7, verify: a study counts as delivered only when every instance it should carry is
acknowledged (for C-STORE: a success or warning status per instance)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..routing.route import RoutedStudy
from ..senders.base import Delivery, InstanceOutcome

#: how many refused instances a reason quotes before summarising
QUOTED = 3


@dataclass
class Verdict:
    delivered: bool
    expected: int
    stored: int
    warnings: int
    reasons: list[str] = field(default_factory=list)
    transient: bool = False  # not delivered yet, but another attempt may succeed


def verify_delivery(study: RoutedStudy, delivery: Delivery) -> Verdict:
    expected = [instance.sop_instance_uid for instance in study.instances]
    outcomes = delivery.outcomes
    stored = [uid for uid in expected if uid in outcomes and outcomes[uid].stored]
    warnings = sum(1 for uid in stored if outcomes[uid].note)
    failed = [outcomes[uid] for uid in expected if uid in outcomes and not outcomes[uid].stored]
    refused = [outcome.note or "refused" for outcome in failed]
    unsent = len(expected) - len(outcomes.keys() & set(expected))
    reasons = []
    if delivery.error:
        reasons.append(delivery.error)
    if refused:
        shown = "; ".join(sorted(set(refused))[:QUOTED])
        reasons.append(f"{len(refused)} of {len(expected)} instance(s) not stored: {shown}")
    if unsent and not delivery.error:
        reasons.append(f"{unsent} of {len(expected)} instance(s) were never sent")
    delivered = len(stored) == len(expected) and not delivery.error
    transient = not delivered and _worth_retrying(delivery, failed)
    return Verdict(delivered, len(expected), len(stored), warnings, reasons, transient)


def _worth_retrying(delivery: Delivery, failed: list[InstanceOutcome]) -> bool:
    """Only when every problem is of the passing kind: one permanent refusal fails the study."""
    if delivery.error and not delivery.transient:
        return False  # e.g. the association rejected for good (wrong AE title)
    return all(outcome.transient for outcome in failed)
