"""Destination type `dicom`: C-STORE with pynetdicom. The routing string goes into the outgoing
copy only; the original files are never written."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification
from pynetdicom.status import code_to_category

from ..config import DicomDestination
from ..logs import get_logger
from ..route import RoutedStudy
from ..scan import Instance
from .base import Delivery, InstanceOutcome, OnInstance, OnProgress, SendError, ShouldStop

#: a DICOM association carries at most 128 presentation contexts
MAX_CONTEXTS = 128
#: pynetdicom re-encodes between these two; every other syntax is sent as it is
CONVERTIBLE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

log = get_logger(step="send")


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


class DicomSender:
    def __init__(self, name: str, destination: DicomDestination) -> None:
        self.name = name
        self.destination = destination

    @property
    def where(self) -> str:
        d = self.destination
        return f"{d.called_ae}@{d.host}:{d.port}"

    def _ae(self, contexts: list[Any]) -> AE:
        d = self.destination
        ae = AE(ae_title=d.calling_ae)
        ae.connection_timeout = d.connect_timeout
        ae.acse_timeout = d.acse_timeout
        ae.dimse_timeout = d.dimse_timeout
        ae.network_timeout = d.network_timeout
        ae.requested_contexts = contexts
        return ae

    def _associate(self, contexts: list[Any]) -> Association:
        d = self.destination
        connected: list[bool] = []
        try:
            assoc = self._ae(contexts).associate(
                d.host, d.port, ae_title=d.called_ae, max_pdu=d.max_pdu,
                evt_handlers=[(evt.EVT_CONN_OPEN, lambda _: connected.append(True))])
        except OSError as exc:  # e.g. the host name doesn't resolve (DNS down: transient)
            raise SendError(f"cannot reach {d.host}:{d.port}: {exc.strerror or exc}; check "
                            "host in the site config and the name service", transient=True
                            ) from None
        if not assoc.is_established:
            raise SendError(self._refusal(assoc, bool(connected)),
                            transient=not _rejected_permanently(assoc))
        _tune(assoc)
        return assoc

    def _refusal(self, assoc: Association, connected: bool) -> str:
        if not connected:
            return (f"no DICOM receiver answered at {self.destination.host}:"
                    f"{self.destination.port} (connection refused or timed out after "
                    f"{self.destination.connect_timeout:g} s); check the receiver is running and "
                    "host/port in the site config")
        if assoc.is_rejected:
            return f"association rejected by {self.where}: {_rejection_reason(assoc)}; " \
                   "check called_ae/calling_ae against the receiver's configuration"
        if assoc.is_aborted:
            return f"association aborted by {self.where} during negotiation"
        return (f"{self.where} accepted the connection but did not answer the association "
                f"request within acse_timeout {self.destination.acse_timeout:g} s")

    def check(self) -> str:
        assoc = self._associate([build_context(Verification)])
        try:
            status = assoc.send_c_echo()
        finally:
            assoc.release()
        if not status or status.Status != 0:
            raise SendError(f"C-ECHO to {self.where} failed: {_describe_status(status)}",
                            transient=True)
        return f"C-ECHO to {self.where}: success"

    def send(self, study: RoutedStudy, instances: list[Instance],
             on_instance: OnInstance | None = None,
             should_stop: ShouldStop | None = None,
             on_progress: OnProgress | None = None) -> Delivery:
        # on_instance already reports each C-STORE as it is acknowledged: no on_progress
        delivery = Delivery(self.name)
        started = time.monotonic()
        for keys, batch in association_batches(instances):
            contexts = [build_context(k.sop_class, k.proposed_syntaxes()) for k in keys]
            try:
                assoc = self._associate(contexts)
            except SendError as exc:
                delivery.error, delivery.transient = str(exc), exc.transient
                break
            delivery.associations += 1
            try:
                self._store_all(assoc, study, batch, delivery, on_instance, should_stop)
            finally:
                if assoc.is_established:
                    assoc.release()
            if delivery.error or delivery.interrupted:
                break
        delivery.seconds = time.monotonic() - started
        return delivery

    def _store_all(self, assoc: Association, study: RoutedStudy, instances: list[Instance],
                   delivery: Delivery, on_instance: OnInstance | None,
                   should_stop: ShouldStop | None) -> None:
        """Store each instance; note in `delivery` why the association was lost, if it was."""
        accepted = _accepted(assoc)
        for instance in instances:
            if should_stop and should_stop():
                delivery.interrupted = True
                return
            outcome = self._store_one(assoc, study, instance, accepted)
            delivery.outcomes[instance.sop_instance_uid] = outcome
            if outcome.stored:
                delivery.bytes_sent += instance.size
            if on_instance:
                on_instance(instance, outcome)
            if not assoc.is_established:
                delivery.error = (f"association with {self.where} lost after "
                                  f"{len(delivery.outcomes)} instance(s): {outcome.note}")
                delivery.transient = True
                return

    def _store_one(self, assoc: Association, study: RoutedStudy, instance: Instance,
                   accepted: set[tuple[str, str]]) -> InstanceOutcome:
        if not _is_accepted(context_key(instance), accepted):
            return InstanceOutcome(False, None, (
                f"{self.where} does not accept SOP class {_name(instance.sop_class_uid)} in "
                f"{_name(instance.transfer_syntax)}: not sent"))
        try:
            dataset = outgoing_copy(instance, study.routing_keyword, study.routing_value,
                                    study.transform)
        except (OSError, InvalidDicomError, ValueError, EOFError) as exc:
            return InstanceOutcome(False, None, f"cannot read {instance.rel}: {exc}")
        try:
            status = assoc.send_c_store(dataset)
        except (RuntimeError, ValueError, AttributeError, OSError) as exc:
            return InstanceOutcome(False, None, f"C-STORE of {instance.rel} failed: {exc}",
                                   transient=True)
        if not status:
            timeout = self.destination.dimse_timeout
            return InstanceOutcome(False, None, "no C-STORE response (association aborted or "
                                   f"no answer within dimse_timeout {timeout:g} s)",
                                   transient=True)
        return _outcome(status)


def outgoing_copy(instance: Instance, keyword: str, value: str,
                  transform: Callable[[Dataset], None] | None = None) -> Dataset:
    """The instance as read from disk, de-identified by `transform` if the route says so, then
    with the routing string set (so de-identification can't remove it); the file stays
    untouched."""
    dataset = dcmread(instance.path, force=True)
    if "TransferSyntaxUID" not in dataset.file_meta:
        dataset.file_meta.TransferSyntaxUID = UID(instance.transfer_syntax)
    if transform is not None:
        transform(dataset)
    if value:
        setattr(dataset, keyword, value)
    return dataset


def _outcome(status: Dataset) -> InstanceOutcome:
    code = int(status.Status)
    category = code_to_category(code)
    if category == "Success":
        return InstanceOutcome(True, code)
    if category == "Warning":
        return InstanceOutcome(True, code, f"stored with warning {_describe_status(status)}")
    # 0xA7xx: out of resources, the receiver's way of saying "later"
    return InstanceOutcome(False, code, f"refused: {_describe_status(status)}",
                           transient=code & 0xFF00 == 0xA700)


def _describe_status(status: Dataset | None) -> str:
    if not status or "Status" not in status:
        return "no response"
    code = int(status.Status)
    text = f"0x{code:04X} ({code_to_category(code)})"
    comment = status.get("ErrorComment")
    return f"{text}: {comment}" if comment else text


def _accepted(assoc: Association) -> set[tuple[str, str]]:
    return {(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
            for cx in assoc.accepted_contexts}


def _is_accepted(key: ContextKey, accepted: set[tuple[str, str]]) -> bool:
    return any((key.sop_class, syntax) in accepted for syntax in key.proposed_syntaxes())


def _name(uid: str) -> str:
    name = UID(uid).name
    return f"{name} ({uid})" if name and name != uid else uid


def _rejected_permanently(assoc: Association) -> bool:
    """A-ASSOCIATE-RJ result 1 is permanent (wrong AE titles); 2 and aborts are transient."""
    primitive = getattr(assoc.acceptor, "primitive", None)
    return bool(assoc.is_rejected and getattr(primitive, "result", None) == 0x01)


def _rejection_reason(assoc: Association) -> str:
    try:
        primitive = assoc.acceptor.primitive
        return f"{primitive.result_str}, {primitive.source_str}: {primitive.reason_str}"
    except AttributeError:
        return "no reason given"


def _tune(assoc: Association) -> None:
    """Work around two pynetdicom traps measured in perf-notes.md."""
    # Nagle's algorithm costs ~40 ms per C-STORE round trip
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _leave_responses_to_sender(assoc)


def _leave_responses_to_sender(assoc: Association) -> None:
    """pynetdicom's reactor thread can take a C-STORE-RSP off the queue before the sender does
    (about 1 in 10,000-25,000); the sender then waits out dimse_timeout and aborts. The reactor is
    the only non-blocking caller of get_msg, so make non-blocking calls take requests only."""
    dimse = assoc.dimse
    take = dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        if not block:
            _, message = dimse.peek_msg()
            if message is None or getattr(message, "MessageIDBeingRespondedTo", None) is not None:
                return None, None
        return take(block=block)

    dimse.get_msg = get_msg  # type: ignore[method-assign]
