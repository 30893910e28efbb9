"""Presentation contexts from the study itself: one per SOP class for little endian files
(offering both little endian syntaxes, which the sender converts into each other), one per SOP
class and transfer syntax for every other syntax, beside the little endian pair of its SOP
class (what a file can be transcoded to); a study needing more than an association carries is
split over several. With `transcode: uncompressed` only the little endian pair is proposed.

And the one place that decides, from the receiver's answer and the destination's `transcode`
policy, which instances go out and in which context (`choose`): the file's own syntax where
accepted; else, where the policy allows and a decoder here reads the file, an uncompressed
syntax the receiver took; else the instance is refused for good (the same proposal gets the
same answer), with a reason naming its SOP class, its transfer syntax and what the receiver
took instead."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from ...reading.scan import Instance
from ..transcode import UNCOMPRESSED, missing_decoder, uid_name

#: a DICOM association carries at most 128 presentation contexts
MAX_CONTEXTS = 128
#: the sender re-encodes between these two; other syntaxes are decoded into them (transcoded)
CONVERTIBLE = UNCOMPRESSED
#: the destination's `transcode` policy (config.DicomDestination)
WHEN_REFUSED, NEVER, ALWAYS_UNCOMPRESSED = "when_refused", "never", "uncompressed"
#: A-ASSOCIATE-AC presentation context results (PS3.8 9.3.3.2)
RESULTS = {1: "refused by the receiver", 2: "refused, no reason given",
           3: "SOP class not supported", 4: "transfer syntax not supported"}


@dataclass(frozen=True)
class ContextKey:
    sop_class: str
    transfer_syntax: str | None  # None: either little endian syntax will do

    def proposed_syntaxes(self) -> list[str]:
        return [self.transfer_syntax] if self.transfer_syntax else list(CONVERTIBLE)


def context_key(instance: Instance, policy: str = WHEN_REFUSED) -> ContextKey:
    """The context an instance is proposed in: its own syntax's, or with `transcode:
    uncompressed` (and for little endian files) the little endian pair's."""
    syntax = instance.transfer_syntax
    if syntax in CONVERTIBLE or policy == ALWAYS_UNCOMPRESSED:
        return ContextKey(instance.sop_class_uid, None)
    return ContextKey(instance.sop_class_uid, syntax)


def _with_fallback(key: ContextKey) -> list[ContextKey]:
    """A key and, for a SOP class in another syntax than little endian, the little endian pair
    too: the receiver's answer then says what it takes instead (named when it refuses the
    file's own syntax; what a transcoder would send)."""
    return [key, ContextKey(key.sop_class, None)] if key.transfer_syntax else [key]


def association_batches(instances: list[Instance], policy: str = WHEN_REFUSED
                        ) -> Iterator[tuple[list[ContextKey], list[Instance]]]:
    """Split a study so each association needs at most MAX_CONTEXTS contexts; a key and its
    little endian fallback stay in the same association."""
    chunks: list[list[ContextKey]] = [[]]
    seen: set[ContextKey] = set()  # in some chunk: its instances go with the first such
    for instance in instances:
        key = context_key(instance, policy)
        if key in seen:
            continue
        wanted = [k for k in _with_fallback(key) if k not in chunks[-1]]
        if len(chunks[-1]) + len(wanted) > MAX_CONTEXTS:
            chunks.append([])
            wanted = _with_fallback(key)
        chunks[-1] += wanted
        seen.update(wanted)
    left = list(instances)
    for chunk in chunks:
        members = set(chunk)
        batch = [i for i in left if context_key(i, policy) in members]
        left = [i for i in left if context_key(i, policy) not in members]
        if batch:
            yield chunk, batch


@dataclass(frozen=True)
class Negotiated:
    """The receiver's answer to the contexts proposed for one association."""

    where: str  # the receiver, e.g. XNAT@xnat.example.org:8104
    accepted: dict[tuple[str, str], int] = field(default_factory=dict)  # (SOP class, syntax)
    refused: dict[ContextKey, int] = field(default_factory=dict)  # the result, see RESULTS

    @classmethod
    def of(cls, assoc: Association, where: str) -> Negotiated:
        accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])): int(cx.context_id)
                    for cx in assoc.accepted_contexts}
        # a refused context's answer names no syntax: what it was is what we proposed
        proposed = {cx.context_id: _key_of(cx) for cx in assoc.requestor.requested_contexts}
        refused = {proposed[cx.context_id]: int(cx.result or 0)
                   for cx in assoc.rejected_contexts if cx.context_id in proposed}
        return cls(where, accepted, refused)

    def syntaxes_for(self, sop_class: str) -> list[str]:
        return [syntax for (sop, syntax) in self.accepted if sop == sop_class]

    def nothing_accepted(self) -> str:
        """Why an association had nothing to carry (the receiver took no context at all)."""
        refused = "; ".join(f"{uid_name(k.sop_class)} ({RESULTS.get(result, result)})"
                            for k, result in list(self.refused.items())[:3])
        return (f"{self.where} accepted none of the {len(self.refused)} presentation "
                f"context(s) proposed: {refused}")


@dataclass(frozen=True)
class Choice:
    """The accepted context an instance goes out in."""

    context_id: int
    syntax: str  # the instance's own where accepted; else a little endian one (converted)


@dataclass(frozen=True)
class Refusal:
    """Why an instance can't go out on this association; permanent: another attempt would
    propose the same and hear the same."""

    reason: str


def choose(instance: Instance, negotiated: Negotiated,
           policy: str = WHEN_REFUSED) -> Choice | Refusal:
    """The context to send this instance in: its own syntax first (no conversion), then the
    other little endian one for a little endian file, then, where `policy` allows and a
    decoder here reads the file, an uncompressed syntax the receiver took; or why none."""
    own, sop = instance.transfer_syntax, instance.sop_class_uid
    if (own in CONVERTIBLE or policy != ALWAYS_UNCOMPRESSED) \
            and (sop, own) in negotiated.accepted:
        return Choice(negotiated.accepted[sop, own], own)
    taken = [syntax for syntax in CONVERTIBLE if (sop, syntax) in negotiated.accepted]
    if taken and (own in CONVERTIBLE or policy != NEVER):
        why = missing_decoder(own)
        if why:
            return Refusal(_undecodable(instance, negotiated, taken[0], why, policy))
        return Choice(negotiated.accepted[sop, taken[0]], taken[0])
    return Refusal(_refusal(context_key(instance, policy), negotiated, policy))


def _undecodable(instance: Instance, negotiated: Negotiated, taken: str, why: str,
                 policy: str) -> str:
    sop, own = uid_name(instance.sop_class_uid), uid_name(instance.transfer_syntax)
    if policy == ALWAYS_UNCOMPRESSED:
        what = f"{sop} is sent uncompressed to {negotiated.where} (transcode: uncompressed)"
    else:
        what = f"{negotiated.where} does not accept {sop} in {own}"
    return (f"{what}, but {why}: not sent; have the receiver accept {own}, or convert these "
            f"files to {uid_name(taken)} with a tool that reads them")


def _refusal(key: ContextKey, negotiated: Negotiated, policy: str = WHEN_REFUSED) -> str:
    sop = uid_name(key.sop_class)
    syntax = uid_name(key.transfer_syntax) if key.transfer_syntax else \
        "Explicit or Implicit VR Little Endian"
    result = negotiated.refused.get(key)
    takes = negotiated.syntaxes_for(key.sop_class)
    if result == 3 and not takes:
        what, remedy = f"{sop} at all (SOP class not supported)", "this SOP class"
    else:
        why = f" ({RESULTS[result]})" if result in RESULTS else ""
        what, remedy = f"{sop} in {syntax}{why}", "this transfer syntax"
    uncompressed = [s for s in takes if s in CONVERTIBLE]
    if takes and policy == NEVER and key.transfer_syntax and uncompressed:
        instead = (f"; it takes that SOP class in {', '.join(uid_name(s) for s in takes)}, "
                   "and this destination has transcode: never")
        remedy += " (or set transcode: when_refused, to send them decoded)"
    elif takes:
        instead = f"; it takes that SOP class in {', '.join(uid_name(s) for s in takes)}"
        if key.transfer_syntax and policy != NEVER:
            instead += ", not in an uncompressed syntax these files could be decoded to"
        remedy += " (or send these files in a syntax it takes)"
    elif negotiated.accepted:
        instead = "; it took no context for that SOP class"
    else:
        instead = "; it took none of the contexts proposed"
    if policy == ALWAYS_UNCOMPRESSED and not key.transfer_syntax:
        instead += " (transcode: uncompressed proposes only those)"
    return (f"{negotiated.where} does not accept {what}{instead}: not sent, and no retry "
            f"will change that; have the receiver accept {remedy}")


def _key_of(context: PresentationContext) -> ContextKey:
    syntaxes = [str(syntax) for syntax in context.transfer_syntax]
    own = None if set(syntaxes) == set(CONVERTIBLE) else syntaxes[0]
    return ContextKey(str(context.abstract_syntax), own)
