"""Destination type `dicom`: C-STORE with pynetdicom. The routing string goes into the outgoing
copy only; the original files are never written."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
)
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import Verification
from pynetdicom.status import code_to_category

from ...config import DicomDestination
from ...logs import get_logger
from ...reading.scan import Instance
from ...routing.route import RoutedStudy
from ..base import Delivery, InstanceOutcome, OnInstance, OnProgress, SendError, ShouldStop
from ..transcode import TranscodeRefused, uid_name
from .contexts import Choice, Negotiated, Refusal, association_batches, choose
from .outgoing import EncodingProblem, PixelReader, converted_copy, outgoing_copy
from .pool import IdleAssociations
from .splice import routing_splice
from .wire import Readable, StoreStatus, Wire, WireError, tune

log = get_logger(step="send")


class NothingAccepted(SendError):
    """The receiver answered, but accepted none of the contexts proposed: pynetdicom then
    aborts the association itself. The same proposal gets the same answer: permanent."""

    def __init__(self, negotiated: Negotiated) -> None:
        super().__init__(negotiated.nothing_accepted(), transient=False)
        self.negotiated = negotiated


class DicomSender:
    def __init__(self, name: str, destination: DicomDestination) -> None:
        self.name = name
        self.destination = destination
        self._releasing: list[threading.Thread] = []
        self._idle = IdleAssociations(destination.association_close_delay, self._close)

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
            if _nothing_accepted(assoc):
                raise NothingAccepted(Negotiated.of(assoc, self.where))
            raise SendError(self._refusal(assoc, bool(connected)),
                            transient=not _rejected_permanently(assoc))
        tune(assoc)
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
        if not status or "Status" not in status or status.Status != 0:
            answer = _describe_status(StoreStatus(int(status.Status), status.get("ErrorComment"))
                                      ) if status and "Status" in status else "no response"
            raise SendError(f"C-ECHO to {self.where} failed: {answer}", transient=True)
        return f"C-ECHO to {self.where}: success"

    def send(self, study: RoutedStudy, instances: list[Instance],
             on_instance: OnInstance | None = None,
             should_stop: ShouldStop | None = None,
             on_progress: OnProgress | None = None) -> Delivery:
        # on_instance already reports each C-STORE as it is acknowledged: no on_progress
        delivery = Delivery(self.name)
        started = time.monotonic()
        for keys, batch in association_batches(instances, self.destination.transcode):
            contexts = [build_context(k.sop_class, k.proposed_syntaxes()) for k in keys]
            key = frozenset(keys)
            wanted = max(1, min(self.destination.associations, len(batch)))
            lanes: list[_Lane] = self._idle.take(key, wanted)  # type: ignore[assignment]
            try:
                lanes += self._open_lanes(contexts, wanted - len(lanes), bool(lanes))
            except NothingAccepted as exc:  # each instance refused for good; on to the next
                self._close(lanes)
                self._refuse(delivery, batch, exc.negotiated, on_instance)
                continue
            except SendError as exc:
                self._close(lanes)
                delivery.error, delivery.transient = str(exc), exc.transient
                break
            delivery.associations += len(lanes)
            done = keep = False
            try:
                batch = self._refuse(delivery, batch, lanes[0].negotiated, on_instance)
                self._store_all(lanes, study, batch, delivery, on_instance, should_stop)
                done = not (delivery.error or delivery.interrupted)
                # an association that carried nothing is not worth keeping: a receiver that
                # takes one association at a time would hold the next drop's until it expires
                keep = done and bool(batch)
            finally:
                if keep and all(lane.alive for lane in lanes):
                    self._idle.park(key, lanes)  # type: ignore[arg-type]
                else:
                    self._close(lanes)
            if not done:
                break
        delivery.seconds = time.monotonic() - started
        return delivery

    def _refuse(self, delivery: Delivery, batch: list[Instance], negotiated: Negotiated,
                on_instance: OnInstance | None) -> list[Instance]:
        """Fail, for good, the instances the receiver's answer leaves no context for (their SOP
        class or transfer syntax refused); the others, to send."""
        sendable = []
        for instance in batch:
            choice = choose(instance, negotiated, self.destination.transcode)
            if isinstance(choice, Refusal):
                self._report(delivery, instance, InstanceOutcome(False, None, choice.reason),
                             on_instance)
            else:
                sendable.append(instance)
        return sendable

    def _close(self, lanes: list[Any]) -> None:
        """Release in the background: every C-STORE was answered, and pynetdicom's A-RELEASE
        handshake (≈30 ms, mostly its reactors' sleeps) would hold up the lane's next drop."""
        self._releasing = [thread for thread in self._releasing if thread.is_alive()]
        for lane in lanes:
            if not lane.alive:
                lane.close()  # an abort: at once
                continue
            # not a daemon thread: a process that exits after send() still releases politely
            thread = threading.Thread(target=lane.close, name=f"release {self.name}")
            thread.start()
            self._releasing.append(thread)

    def close(self) -> None:
        """Release the idle associations and wait for the releases under way (at shutdown)."""
        self._idle.close()
        for thread in self._releasing:
            thread.join(timeout=self.destination.acse_timeout + 5)
        self._releasing = []

    def _open_lanes(self, contexts: list[Any], wanted: int, have_some: bool) -> list[_Lane]:
        """`wanted` more associations, one per lane (`associations` in the destination's
        config); when the receiver takes fewer at once, send over those it took."""
        lanes: list[_Lane] = []
        if wanted > 0 and not have_some:
            lanes.append(_Lane(self, self._associate(contexts)))
        while len(lanes) < wanted:
            try:
                lanes.append(_Lane(self, self._associate(contexts)))
            except SendError as exc:
                log.warning("fewer associations than configured", destination=self.name,
                            associations=len(lanes), configured=wanted, reason=str(exc))
                break
        return lanes

    def _store_all(self, lanes: list[_Lane], study: RoutedStudy, instances: list[Instance],
                   delivery: Delivery, on_instance: OnInstance | None,
                   should_stop: ShouldStop | None) -> None:
        """Store each instance; note in `delivery` why an association was lost, if one was.

        Each lane takes the next instance as soon as its last one is answered and reported (no
        lane waits for a slower one), so at most len(lanes) instances are sent but not yet
        reported: a kill -9 re-sends at most that many at the next start. With several lanes,
        on_instance runs on the lanes' threads, one call at a time."""
        work = iter(instances)
        take, report = threading.Lock(), threading.Lock()
        halt = threading.Event()

        def next_instance() -> Instance | None:
            with take:
                if halt.is_set():
                    return None
                if should_stop and should_stop():
                    delivery.interrupted = True
                    halt.set()
                    return None
                return next(work, None)

        def run(lane: _Lane) -> None:
            while (instance := next_instance()) is not None:
                try:
                    outcome = lane.store(study, instance)
                except Exception as exc:  # reported as the instance's outcome
                    lane.lost(f"{type(exc).__name__}: {exc}")
                    outcome = InstanceOutcome(False, None, f"C-STORE of {instance.rel} failed: "
                                              f"{exc}", transient=True)
                with report:
                    self._report(delivery, instance, outcome, on_instance)
                    if not lane.alive:
                        if not delivery.error:
                            self._lost(delivery, outcome)
                        halt.set()  # the others finish the one they are sending, then stop
                        return

        if len(lanes) == 1:
            run(lanes[0])  # on the caller's thread
            return
        threads = [threading.Thread(target=run, args=(lane,), name=f"cstore-{n}", daemon=True)
                   for n, lane in enumerate(lanes)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _report(self, delivery: Delivery, instance: Instance, outcome: InstanceOutcome,
                on_instance: OnInstance | None) -> None:
        delivery.outcomes[instance.sop_instance_uid] = outcome
        if outcome.stored:
            delivery.bytes_sent += instance.size
        if on_instance:
            on_instance(instance, outcome)

    def _lost(self, delivery: Delivery, outcome: InstanceOutcome) -> None:
        delivery.error = (f"association with {self.where} lost after "
                          f"{len(delivery.outcomes)} instance(s): {outcome.note}")
        delivery.transient = True


class _Lane:
    """One association and its C-STORE wire."""

    def __init__(self, sender: DicomSender, assoc: Association) -> None:
        self.sender = sender
        self.assoc = assoc
        self.negotiated = Negotiated.of(assoc, sender.where)
        self.wire = Wire(assoc, sender.destination.dimse_timeout)

    @property
    def alive(self) -> bool:
        return self.wire.failure is None and self.assoc.is_established

    def sock_fileno(self) -> int:
        return self.wire.sock.fileno()

    def lost(self, reason: str) -> None:
        self.wire.failure = self.wire.failure or reason

    def store(self, study: RoutedStudy, instance: Instance) -> InstanceOutcome:
        destination = self.sender.destination
        choice = choose(instance, self.negotiated, destination.transcode)
        if not isinstance(choice, Choice):  # refused before sending, unless this lane's
            return InstanceOutcome(False, None, choice.reason)  # receiver answered otherwise
        context_id, syntax = choice.context_id, choice.syntax
        try:
            with instance.open() as fp:
                size = os.fstat(fp.fileno()).st_size
                sop_uid = instance.sop_instance_uid
                tail = b""
                splice = None
                body: Readable
                if syntax == instance.transfer_syntax and study.transform is None:
                    splice = routing_splice(fp, instance, study)
                if splice is not None:
                    # the usual case: the routing element spliced into the file's own bytes
                    head, offset = splice
                    fp.seek(offset)
                    body, remaining = fp, size - offset
                elif syntax == instance.transfer_syntax \
                        and syntax != DeflatedExplicitVRLittleEndian:
                    # a header transform: re-encode all but the pixel data, copy its bytes
                    fp.seek(0)
                    copy = outgoing_copy(instance, study, fp, size)
                    head, tail, sop_uid = copy.head, copy.tail, copy.sop_instance_uid
                    fp.seek(copy.start)
                    body, remaining = fp, copy.end - copy.start
                else:  # converted (transcoded where the pixel data is decoded), or deflated:
                    # the whole dataset decoded and encoded, never spliced
                    converted = converted_copy(instance, study, fp, syntax,
                                               destination.transcode_max_bytes)
                    head, tail = converted.head, converted.tail
                    body, remaining = PixelReader(converted.pixels), len(converted.pixels)
                    sop_uid = converted.sop_instance_uid
                # the command must name the instance the dataset carries, or 0xA900
                status = self.wire.store(context_id, instance.sop_class_uid, sop_uid, head,
                                         body, remaining, tail)
        except WireError as exc:
            if exc.no_response:
                timeout = self.sender.destination.dimse_timeout
                return InstanceOutcome(False, None, "no C-STORE response (association aborted "
                                       f"or no answer within dimse_timeout {timeout:g} s)",
                                       transient=True)
            return InstanceOutcome(False, None, f"C-STORE of {instance.rel} failed: {exc}",
                                   transient=True)
        except EncodingProblem as exc:
            return InstanceOutcome(False, None, f"cannot send {instance.rel}: {exc}")
        except TranscodeRefused as exc:
            return InstanceOutcome(False, None, f"cannot send {instance.rel} to "
                                   f"{self.sender.where} in {uid_name(syntax)}: {exc}")
        except (OSError, InvalidDicomError, ValueError, EOFError, AttributeError) as exc:
            return InstanceOutcome(False, None, f"cannot read {instance.rel}: {exc}")
        return _outcome(status, syntax)

    def close(self) -> None:
        failed = self.wire.failure is not None
        self.wire.close()
        if failed:
            if self.assoc.is_established:
                self.assoc.abort()
        elif self.assoc.is_established:
            self.assoc.release()


def _outcome(status: StoreStatus, syntax: str) -> InstanceOutcome:
    code = status.code
    category = code_to_category(code)
    if category == "Success":
        return InstanceOutcome(True, code, syntax=syntax)
    if category == "Warning":
        return InstanceOutcome(True, code, f"stored with warning {_describe_status(status)}",
                               syntax=syntax)
    # 0xA7xx: out of resources, the receiver's way of saying "later"
    return InstanceOutcome(False, code, f"refused: {_describe_status(status)}",
                           transient=code & 0xFF00 == 0xA700)


def _describe_status(status: StoreStatus) -> str:
    text = f"0x{status.code:04X} ({code_to_category(status.code)})"
    return f"{text}: {status.comment}" if status.comment else text


def _nothing_accepted(assoc: Association) -> bool:
    """The receiver accepted the association but none of its contexts (pynetdicom aborted it
    then), as opposed to a receiver that aborted or rejected it."""
    primitive = getattr(assoc.acceptor, "primitive", None)
    return isinstance(primitive, A_ASSOCIATE) and primitive.result == 0x00 \
        and not assoc.accepted_contexts


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
