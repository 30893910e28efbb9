"""Step 7, verify: a study counts as delivered only when every instance it should carry is
acknowledged (for C-STORE: a success or warning status per instance)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .route import RoutedStudy
from .senders import Delivery

#: how many refused instances a reason quotes before summarising
QUOTED = 3


@dataclass
class Verdict:
    delivered: bool
    expected: int
    stored: int
    warnings: int
    reasons: list[str] = field(default_factory=list)


def verify_delivery(study: RoutedStudy, delivery: Delivery) -> Verdict:
    expected = [instance.sop_instance_uid for instance in study.instances]
    outcomes = delivery.outcomes
    stored = [uid for uid in expected if uid in outcomes and outcomes[uid].stored]
    warnings = sum(1 for uid in stored if outcomes[uid].note)
    refused = [outcomes[uid].note or "refused" for uid in expected
               if uid in outcomes and not outcomes[uid].stored]
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
    return Verdict(delivered, len(expected), len(stored), warnings, reasons)
