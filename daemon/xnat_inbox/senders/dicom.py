"""Destination type `dicom`: C-STORE with pynetdicom. The routing string goes into the outgoing
copy only; the original files are never written."""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.dsutils import encode
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
                lanes = self._open_lanes(contexts, len(batch))
            except SendError as exc:
                delivery.error, delivery.transient = str(exc), exc.transient
                break
            delivery.associations += len(lanes)
            try:
                self._store_all(lanes, study, batch, delivery, on_instance, should_stop)
            finally:
                for lane in lanes:
                    lane.close()
            if delivery.error or delivery.interrupted:
                break
        delivery.seconds = time.monotonic() - started
        return delivery

    def _open_lanes(self, contexts: list[Any], instances: int) -> list[_Lane]:
        """One association per lane (`associations` in the destination's config); when the
        receiver takes fewer at once, send over those it took."""
        wanted = max(1, min(self.destination.associations, instances))
        lanes = [_Lane(self, self._associate(contexts))]
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

        Outcomes are reported (on_instance, on this thread) in send order. With several lanes,
        at most len(lanes) instances are sent but not yet reported at any time: a kill -9
        re-sends at most that many at the next start."""
        if len(lanes) == 1:
            lane = lanes[0]
            for instance in instances:
                if should_stop and should_stop():
                    delivery.interrupted = True
                    return
                outcome = lane.store(study, instance)
                self._report(delivery, instance, outcome, on_instance)
                if not lane.alive:
                    self._lost(delivery, outcome)
                    return
            return
        self._store_parallel(lanes, study, instances, delivery, on_instance, should_stop)

    def _store_parallel(self, lanes: list[_Lane], study: RoutedStudy, instances: list[Instance],
                        delivery: Delivery, on_instance: OnInstance | None,
                        should_stop: ShouldStop | None) -> None:
        work: queue.SimpleQueue[tuple[int, Instance] | None] = queue.SimpleQueue()
        done: queue.SimpleQueue[tuple[int, InstanceOutcome, _Lane]] = queue.SimpleQueue()

        def run(lane: _Lane) -> None:
            while (item := work.get()) is not None:
                index, instance = item
                try:
                    outcome = lane.store(study, instance)
                except Exception as exc:  # reported as the instance's outcome
                    lane.lost(f"{type(exc).__name__}: {exc}")
                    outcome = InstanceOutcome(False, None, f"C-STORE of {instance.rel} failed: "
                                              f"{exc}", transient=True)
                done.put((index, outcome, lane))

        threads = [threading.Thread(target=run, args=(lane,), name=f"cstore-{n}", daemon=True)
                   for n, lane in enumerate(lanes)]
        for thread in threads:
            thread.start()
        window, sent, reported = len(lanes), 0, 0
        finished: dict[int, tuple[InstanceOutcome, _Lane]] = {}
        stop = False
        try:
            while reported < sent or (sent < len(instances) and not stop):
                while not stop and sent < len(instances) and sent - reported < window:
                    if should_stop and should_stop():
                        delivery.interrupted = stop = True
                        break
                    work.put((sent, instances[sent]))
                    sent += 1
                if reported == sent:
                    break
                index, outcome, lane = done.get()
                finished[index] = (outcome, lane)
                while reported in finished:
                    outcome, lane = finished.pop(reported)
                    self._report(delivery, instances[reported], outcome, on_instance)
                    reported += 1
                    if not lane.alive and not delivery.error:
                        self._lost(delivery, outcome)
                        stop = True
        finally:
            for _ in threads:
                work.put(None)
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
        self.accepted = _accepted(assoc)
        self.wire = _Wire(assoc, sender.destination.dimse_timeout)

    @property
    def alive(self) -> bool:
        return self.wire.failure is None and self.assoc.is_established

    def lost(self, reason: str) -> None:
        self.wire.failure = self.wire.failure or reason

    def store(self, study: RoutedStudy, instance: Instance) -> InstanceOutcome:
        where = self.sender.where
        context = _context_for(context_key(instance), self.accepted,
                               instance.transfer_syntax)
        if context is None:
            return InstanceOutcome(False, None, (
                f"{where} does not accept SOP class {_name(instance.sop_class_uid)} in "
                f"{_name(instance.transfer_syntax)}: not sent"))
        context_id, syntax = context
        try:
            with open(instance.path, "rb") as fp:
                size = os.fstat(fp.fileno()).st_size
                sop_uid = instance.sop_instance_uid
                splice = None
                if syntax == instance.transfer_syntax and study.transform is None:
                    splice = routing_splice(fp, instance, study)
                if splice is not None:
                    # the usual case: the routing element spliced into the file's own bytes
                    head, offset = splice
                    fp.seek(offset)
                    body, remaining = fp, size - offset
                elif syntax == instance.transfer_syntax \
                        and syntax != DeflatedExplicitVRLittleEndian:
                    # a header transform: re-encode the header only, copy the pixel data's bytes
                    fp.seek(0)
                    header = outgoing_header(instance, study, fp)
                    head = _encode(header, syntax)
                    body, remaining = fp, size - fp.tell()
                    sop_uid = str(header.SOPInstanceUID)  # de-identification remaps it
                else:  # the little endian pair converted, or deflated: decode it all
                    fp.seek(0)
                    whole = outgoing_header(instance, study, fp, whole=True)
                    head = _encode(whole, syntax)
                    body, remaining = None, 0
                    sop_uid = str(whole.SOPInstanceUID)
                # the command must name the instance the dataset carries, or 0xA900
                status = self.wire.store(context_id, instance.sop_class_uid, sop_uid, head,
                                         body, remaining)
        except _WireError as exc:
            if exc.no_response:
                timeout = self.sender.destination.dimse_timeout
                return InstanceOutcome(False, None, "no C-STORE response (association aborted "
                                       f"or no answer within dimse_timeout {timeout:g} s)",
                                       transient=True)
            return InstanceOutcome(False, None, f"C-STORE of {instance.rel} failed: {exc}",
                                   transient=True)
        except (OSError, InvalidDicomError, ValueError, EOFError, AttributeError) as exc:
            return InstanceOutcome(False, None, f"cannot read {instance.rel}: {exc}")
        return _outcome(status)

    def close(self) -> None:
        failed = self.wire.failure is not None
        self.wire.close()
        if failed:
            if self.assoc.is_established:
                self.assoc.abort()
        elif self.assoc.is_established:
            self.assoc.release()


def outgoing_header(instance: Instance, study: RoutedStudy, fp: BinaryIO | None = None, *,
                    whole: bool = False) -> Dataset:
    """The instance's outgoing header (with `whole`, the whole dataset): the one place where
    what goes out differs from the file. The study's `transform` hook (de-identification; it changes
    header elements only) runs first, then the routing string is set. `fp`, when given, is left
    at the start of the pixel data (or the end) so the rest is sent from the file as it is.
    The file itself is never written."""
    dataset = dcmread(fp if fp is not None else instance.path, force=True,
                      stop_before_pixels=not whole)
    if "TransferSyntaxUID" not in dataset.file_meta:
        dataset.file_meta.TransferSyntaxUID = UID(instance.transfer_syntax)
    if study.transform is not None:
        study.transform(dataset)
    if study.routing_value:
        setattr(dataset, study.routing_keyword, study.routing_value)
    return dataset


def _encode(dataset: Dataset, syntax: str) -> bytes:
    uid = UID(syntax)
    encoded = encode(dataset, uid.is_implicit_VR, uid.is_little_endian, uid.is_deflated)
    if encoded is None:
        raise ValueError("cannot encode the dataset")
    return encoded


# --- the routing string spliced into the raw header -----------------------------------------
#
# Measured: decoding the header with pydicom and encoding it again costs ~0.65 ms per instance,
# more than the rest of a C-STORE. Without a header transform the only change is one element,
# so it is spliced into the file's own bytes: walk the top-level elements up to the routing
# element's tag (skipping sequences), replace or insert it, and send the rest of the file as it
# is. Anything unusual (no preamble, deflated, a header over SPLICE_WINDOW) takes the pydicom path.

#: how much of a file's start the splice looks at
SPLICE_WINDOW = 65536
#: explicit VRs with a 4-byte length (PS3.5 7.1.2)
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                      b"UR", b"UT", b"UV"})
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF


class _Unspliceable(Exception):
    pass


def routing_splice(fp: BinaryIO, instance: Instance,
                   study: RoutedStudy) -> tuple[bytes, int] | None:
    """(the outgoing dataset's bytes up to and including the routing element, the file offset
    where the rest of the dataset continues), or None when only the pydicom path will do."""
    syntax = instance.transfer_syntax
    if syntax == DeflatedExplicitVRLittleEndian:
        return None
    implicit = syntax == ImplicitVRLittleEndian
    little = syntax != ExplicitVRBigEndian
    buf = fp.read(SPLICE_WINDOW)
    try:
        if buf[128:132] != b"DICM":
            return None
        start = _skip_meta(buf, 132)
        value = study.routing_value
        if not value:
            return b"", start
        tag = tag_for_keyword(study.routing_keyword)
        if tag is None:
            return None
        encoded = value.encode("ascii")
        element = _encode_element(tag, dictionary_VR(tag), encoded, implicit, little)
        at = start
        while True:
            found, end = _element_at(buf, at, implicit, little)
            if found >= tag:
                break
            at = end
        return buf[start:at] + element, (end if found == tag else at)
    except (_Unspliceable, struct.error, UnicodeEncodeError, KeyError):
        return None


def _skip_meta(buf: bytes, at: int) -> int:
    while True:
        group, = struct.unpack_from("<H", buf, at)
        if group != 0x0002:
            return at
        _, at = _element_at(buf, at, False, True)


def _element_at(buf: bytes, at: int, implicit: bool, little: bool) -> tuple[int, int]:
    """(tag, offset after the element) of the element at `at`; the end of buf is (UNDEFINED,)"""
    if at >= len(buf):
        raise _Unspliceable("header longer than the splice window")
    e = "<" if little else ">"
    group, elem = struct.unpack_from(e + "HH", buf, at)
    tag = group << 16 | elem
    if implicit or group == 0xFFFE:
        length, = struct.unpack_from(e + "I", buf, at + 4)
        value_at = at + 8
    else:
        vr = buf[at + 4:at + 6]
        if vr in LONG_VRS:
            length, = struct.unpack_from(e + "I", buf, at + 8)
            value_at = at + 12
        else:
            length, = struct.unpack_from(e + "H", buf, at + 6)
            value_at = at + 8
    if tag == 0x7FE00010 and length == UNDEFINED:  # encapsulated pixel data: stop the walk
        return tag, value_at
    if length != UNDEFINED:
        return tag, value_at + length
    return tag, _skip_undefined(buf, value_at, implicit, little)


def _skip_undefined(buf: bytes, at: int, implicit: bool, little: bool) -> int:
    """Past the delimiter of a sequence or item of undefined length starting at `at`."""
    while True:
        tag, end = _element_at(buf, at, implicit, little)
        if tag in (SEQUENCE_END, ITEM_END):
            return end
        at = end


def _encode_element(tag: int, vr: str, value: bytes, implicit: bool, little: bool) -> bytes:
    if len(value) % 2:
        value += b" "
    e = "<" if little else ">"
    group, elem = tag >> 16, tag & 0xFFFF
    if implicit:
        return struct.pack(e + "HHI", group, elem, len(value)) + value
    raw_vr = vr.encode("ascii")
    if raw_vr in LONG_VRS:
        return struct.pack(e + "HH2sHI", group, elem, raw_vr, 0, len(value)) + value
    return struct.pack(e + "HH2sH", group, elem, raw_vr, len(value)) + value


# --- the C-STORE wire ---------------------------------------------------------------------
#
# Measured (perf-notes.md, bench/cstore.py): pynetdicom spends ~3-4 ms per C-STORE whatever the
# size, mostly handing each message between three threads (ours, the association's reactor,
# the DUL reactor) that poll with 0.1-1 ms sleeps, plus encoding PDUs through its state
# machine. pynetdicom still negotiates, releases and aborts the association; between the two,
# the DUL and association reactors are parked and this thread writes the P-DATA-TF PDUs of each
# C-STORE-RQ and reads its C-STORE-RSP on the association's socket itself, synchronously. Only
# P-DATA is exchanged meanwhile, so pynetdicom's state machine stays in Sta6 (established), and
# no other thread reads the socket: the response race of pynetdicom#435 cannot happen here.

#: PDU types (PS3.8 9.3)
P_DATA_TF, A_RELEASE_RQ, A_ABORT = 0x04, 0x05, 0x07
#: largest P-DATA-TF we send when the receiver sets no limit (maximum length 0)
UNLIMITED_PDU = 1 << 20
#: pynetdicom's DUL thread polls every _run_loop_delay (1 ms); while parked, every 20 ms
PARKED_LOOP_DELAY = 0.02


class _WireError(Exception):
    def __init__(self, message: str, no_response: bool = False) -> None:
        super().__init__(message)
        self.no_response = no_response


class _Wire:
    def __init__(self, assoc: Association, timeout: float) -> None:
        self.assoc = assoc
        self.timeout = timeout
        self.failure: str | None = None
        self.message_id = 0
        peer_max = int(assoc.acceptor.maximum_length or 0)
        self.max_pdv = (peer_max or UNLIMITED_PDU) - 6  # PDV item: length, context, control
        self._parked = False
        self._saw_parked = threading.Event()
        dul = assoc.dul
        self._dul_transport_event = dul._is_transport_event
        # the association's reactor: paused for the whole data phase (not between messages)
        assoc._reactor_checkpoint.clear()
        deadline = time.monotonic() + 5
        while not assoc._is_paused and assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.0001)
        # the DUL reactor: keeps running (timers, the release later) but no longer reads
        self._parked = True
        dul._is_transport_event = self._transport_event  # type: ignore[method-assign]
        # parked, it would still wake every ms and take the GIL from the sender: measured slower
        self._loop_delay = dul._run_loop_delay
        dul._run_loop_delay = PARKED_LOOP_DELAY
        if not self._saw_parked.wait(5) or not assoc.is_established:
            self.failure = "pynetdicom's DUL thread did not yield the socket"
        self.sock: socket.socket = dul.socket.socket  # type: ignore[union-attr]
        self._timeout_before = self.sock.gettimeout()
        self.sock.settimeout(timeout)

    def _transport_event(self) -> bool:
        if self._parked:
            self._saw_parked.set()
            return False
        return self._dul_transport_event()

    def close(self) -> None:
        """Hand the socket back to pynetdicom (for the release or the abort)."""
        if not self._parked:
            return
        self._parked = False
        with contextlib.suppress(OSError):
            self.sock.settimeout(self._timeout_before)
        del self.assoc.dul._is_transport_event  # back to the class's method
        self.assoc.dul._run_loop_delay = self._loop_delay
        self.assoc._reactor_checkpoint.set()

    def store(self, context_id: int, sop_class: str, sop_instance: str, head: bytes,
              body: BinaryIO | None, remaining: int) -> Dataset:
        if self.failure:
            raise _WireError(self.failure)
        self.message_id = self.message_id % 0xFFFF + 1
        command = _c_store_rq(self.message_id, sop_class, sop_instance)
        try:
            self._send_pdvs(context_id, 0x03, memoryview(command), None, 0)
            self._send_pdvs(context_id, 0x00, memoryview(head), body, remaining)
            return self._response()
        except _WireError as exc:
            self.failure = str(exc)
            raise
        except TimeoutError:
            self.failure = "no response"
            raise _WireError(self.failure, no_response=True) from None
        except OSError as exc:
            self.failure = str(exc)
            raise _WireError(f"{exc.strerror or exc}") from None

    def _send_pdvs(self, context_id: int, control: int, head: memoryview,
                   body: BinaryIO | None, remaining: int) -> None:
        """Fragments (head + `remaining` bytes of body) into P-DATA-TF PDUs, one PDV each;
        control: 0x01 command, 0x00 data set; 0x02 marks the last fragment."""
        total, offset = len(head) + remaining, 0
        size = self.max_pdv
        out: list[bytes] = []
        pending = 0
        while True:
            n = min(size, total - offset)
            if offset + n <= len(head):
                chunk: bytes | memoryview = head[offset:offset + n]
            else:
                part = bytes(head[offset:]) if offset < len(head) else b""
                more = body.read(n - len(part)) if body else b""
                if len(part) + len(more) != n:
                    raise _WireError("the file changed while it was sent")
                chunk = part + more
            offset += n
            last = control & 0x01 | (0x02 if offset >= total else 0x00)
            out.append(struct.pack(">BBIIBB", P_DATA_TF, 0, n + 6, n + 2, context_id, last))
            out.append(chunk)  # type: ignore[arg-type]
            pending += n + 12
            if offset >= total or pending >= 262144:
                self.sock.sendall(b"".join(out))
                out, pending = [], 0
            if offset >= total:
                return

    def _response(self) -> Dataset:
        command = bytearray()
        while True:
            kind, length = struct.unpack(">BxI", self._recv(6))
            body = self._recv(length)
            if kind == A_ABORT:
                raise _WireError(f"association aborted by the receiver "
                                 f"(source {body[2]}, reason {body[3]})")
            if kind != P_DATA_TF:
                raise _WireError(f"unexpected PDU type 0x{kind:02X} instead of a C-STORE "
                                 "response")
            at = 0
            while at < length:
                (item,) = struct.unpack_from(">I", body, at)
                control = body[at + 5]
                if control & 0x01:
                    command += body[at + 6:at + 4 + item]
                    if control & 0x02:
                        return _c_store_rsp(bytes(command), self.message_id)
                at += 4 + item

    def _recv(self, n: int) -> bytes:
        data = bytearray(n)
        view, got = memoryview(data), 0
        while got < n:
            count = self.sock.recv_into(view[got:])
            if not count:
                raise _WireError("the receiver closed the connection", no_response=True)
            got += count
        return bytes(data)


def _element(group: int, element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", group, element, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def _c_store_rq(message_id: int, sop_class: str, sop_instance: str) -> bytes:
    """The C-STORE-RQ command set, Implicit VR Little Endian (PS3.7 9.3.1.1)."""
    body = b"".join((
        _element(0x0000, 0x0002, _uid(sop_class)),
        _element(0x0000, 0x0100, struct.pack("<H", 0x0001)),  # CommandField C-STORE-RQ
        _element(0x0000, 0x0110, struct.pack("<H", message_id)),
        _element(0x0000, 0x0700, struct.pack("<H", 0x0000)),  # Priority medium
        _element(0x0000, 0x0800, struct.pack("<H", 0x0000)),  # a data set follows
        _element(0x0000, 0x1000, _uid(sop_instance)),
    ))
    return _element(0x0000, 0x0000, struct.pack("<I", len(body))) + body


def _c_store_rsp(command: bytes, message_id: int) -> Dataset:
    """The Status and ErrorComment of a C-STORE-RSP command set."""
    values: dict[int, bytes] = {}
    at = 0
    while at + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHI", command, at)
        values[group << 16 | element] = command[at + 8:at + 8 + length]
        at += 8 + length
    field = values.get(0x0100)
    if field is None or struct.unpack("<H", field[:2])[0] != 0x8001:
        raise _WireError("the receiver answered with another message than a C-STORE response")
    answered = values.get(0x0120)
    if answered is not None and struct.unpack("<H", answered[:2])[0] != message_id:
        raise _WireError("the receiver answered another message ID")
    status = Dataset()
    status.Status = struct.unpack("<H", values[0x0900][:2])[0] if 0x0900 in values else 0xFFFF
    if comment := values.get(0x0902):
        status.ErrorComment = comment.decode("ascii", "replace").strip(" \0")
    return status


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


def _accepted(assoc: Association) -> dict[tuple[str, str], int]:
    return {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])): int(cx.context_id)
            for cx in assoc.accepted_contexts}


def _context_for(key: ContextKey, accepted: dict[tuple[str, str], int],
                 own: str) -> tuple[int, str] | None:
    """The accepted context to send this instance in: its own syntax first (no conversion)."""
    for syntax in sorted(key.proposed_syntaxes(), key=lambda syntax: syntax != own):
        if (key.sop_class, syntax) in accepted:
            return accepted[key.sop_class, syntax], syntax
    return None


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
