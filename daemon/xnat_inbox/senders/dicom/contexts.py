"""Presentation contexts from the study itself: one per SOP class for little endian files
(offering both little endian syntaxes, which pynetdicom converts into each other), one per SOP
class and transfer syntax for every other syntax; a study needing more than an association
carries is split over several."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.association import Association

from ...reading.scan import Instance

#: a DICOM association carries at most 128 presentation contexts
MAX_CONTEXTS = 128
#: pynetdicom re-encodes between these two; every other syntax is sent as it is
CONVERTIBLE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


@dataclass(frozen=True)
class ContextKey:
    sop_class: str
    transfer_syntax: str | None  # None: either little endian syntax will do

    def proposed_syntaxes(self) -> list[str]:
        return [self.transfer_syntax] if self.transfer_syntax else list(CONVERTIBLE)


def context_key(instance: Instance) -> ContextKey:
    syntax = None if instance.transfer_syntax in CONVERTIBLE else instance.transfer_syntax
    return ContextKey(instance.sop_class_uid, syntax)


def association_batches(
        instances: list[Instance]) -> Iterator[tuple[list[ContextKey], list[Instance]]]:
    """Split a study so each association needs at most MAX_CONTEXTS contexts."""
    keys: list[ContextKey] = []
    for instance in instances:
        key = context_key(instance)
        if key not in keys:
            keys.append(key)
    for start in range(0, len(keys), MAX_CONTEXTS):
        chunk = keys[start:start + MAX_CONTEXTS]
        members = set(chunk)
        yield chunk, [instance for instance in instances if context_key(instance) in members]


def accepted_contexts(assoc: Association) -> dict[tuple[str, str], int]:
    return {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])): int(cx.context_id)
            for cx in assoc.accepted_contexts}


def context_for(key: ContextKey, accepted: dict[tuple[str, str], int],
                 own: str) -> tuple[int, str] | None:
    """The accepted context to send this instance in: its own syntax first (no conversion)."""
    for syntax in sorted(key.proposed_syntaxes(), key=lambda syntax: syntax != own):
        if (key.sop_class, syntax) in accepted:
            return accepted[key.sop_class, syntax], syntax
    return None


def sop_class_name(uid: str) -> str:
    name = UID(uid).name
    return f"{name} ({uid})" if name and name != uid else uid
