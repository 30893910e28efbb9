"""C-STORE on the association's own socket, for the DICOM sender (pynetdicom negotiates)."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any, NamedTuple, Protocol

from pynetdicom.association import Association

# --- the C-STORE wire ---------------------------------------------------------------------
#
# Measured (bench/cstore.py, docs/benchmarks.md): pynetdicom spends ~3-4 ms per C-STORE whatever the
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
#: buffers per gathered write (well under the kernel's IOV_MAX, 1024)
IOV_BATCH = 256
#: how much of a file is read at once for sending
READ_SIZE = 1 << 20
#: pynetdicom's DUL thread polls every _run_loop_delay (1 ms); while parked, every 20 ms
PARKED_LOOP_DELAY = 0.02


class Readable(Protocol):
    """Where a data set's bulk comes from: the file itself, or decoded pixel data."""

    def read(self, size: int, /) -> bytes | memoryview: ...


class StoreStatus(NamedTuple):
    """A C-STORE-RSP's Status and ErrorComment."""

    code: int
    comment: str | None = None


class WireError(Exception):
    def __init__(self, message: str, no_response: bool = False) -> None:
        super().__init__(message)
        self.no_response = no_response


class Wire:
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
              body: Readable | None, remaining: int, tail: bytes = b"") -> StoreStatus:
        """C-STORE `head`, `remaining` bytes of `body`, then `tail`; the receiver's answer."""
        if self.failure:
            raise WireError(self.failure)
        self.message_id = self.message_id % 0xFFFF + 1
        command = _c_store_rq(self.message_id, sop_class, sop_instance)
        try:
            # the command and the data set's PDUs go out in gathered writes, straight from the
            # file's buffers: no copy into one block
            out = list(self._pdvs(context_id, 0x03, memoryview(command), None, 0))
            for piece in self._pdvs(context_id, 0x00, memoryview(head), body, remaining, tail):
                out.append(piece)
                if len(out) >= IOV_BATCH:
                    self._send_gathered(out)
                    out = []
            self._send_gathered(out)
            return self._response()
        except WireError as exc:
            self.failure = str(exc)
            raise
        except TimeoutError:
            self.failure = "no response"
            raise WireError(self.failure, no_response=True) from None
        except OSError as exc:
            self.failure = str(exc)
            raise WireError(f"{exc.strerror or exc}") from None

    def _pdvs(self, context_id: int, control: int, head: memoryview, body: Readable | None,
              remaining: int, tail: bytes = b"") -> Iterator[bytes | memoryview]:
        """(head + `remaining` bytes of body + tail) as P-DATA-TF PDUs of one PDV each: each
        PDU's header, then its value as one or two slices of the buffers read (a value may span
        the end of one buffer and the start of the next). control: 0x01 command, 0x00 data set;
        0x02 marks the last. The body is read in pieces of up to 1 MiB: a large file is never
        held whole."""
        total, offset = len(head) + remaining + len(tail), 0
        data, unread = head, remaining
        while offset < total:
            n = min(self.max_pdv, total - offset)
            offset += n
            last = control & 0x01 | (0x02 if offset >= total else 0x00)
            yield struct.pack(">BBIIBB", P_DATA_TF, 0, n + 6, n + 2, context_id, last)
            while n:
                if not data and not unread and tail:  # the body is sent: the tail follows
                    data, tail = memoryview(tail), b""
                elif not data:
                    more = body.read(min(unread, READ_SIZE)) if body and unread else b""
                    if not more:
                        raise WireError("the file changed while it was sent")
                    data, unread = memoryview(more), unread - len(more)
                piece, data = data[:n], data[n:]
                n -= len(piece)
                yield piece

    def _send_gathered(self, pieces: list[bytes | memoryview]) -> None:
        """sendall for a list of buffers, in sendmsg calls (which may send part of them)."""
        views = [memoryview(piece) for piece in pieces]
        while views:
            sent = self.sock.sendmsg(views)
            while sent:
                if sent >= len(views[0]):
                    sent -= len(views.pop(0))
                else:
                    views[0], sent = views[0][sent:], 0

    def _response(self) -> StoreStatus:
        command = bytearray()
        while True:
            kind, length = struct.unpack(">BxI", self._recv(6))
            body = self._recv(length)
            if kind == A_ABORT:
                raise WireError(f"association aborted by the receiver "
                                 f"(source {body[2]}, reason {body[3]})")
            if kind != P_DATA_TF:
                raise WireError(f"unexpected PDU type 0x{kind:02X} instead of a C-STORE "
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
                raise WireError("the receiver closed the connection", no_response=True)
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


def _c_store_rsp(command: bytes, message_id: int) -> StoreStatus:
    """The Status and ErrorComment of a C-STORE-RSP command set."""
    values: dict[int, bytes] = {}
    at = 0
    while at + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHI", command, at)
        values[group << 16 | element] = command[at + 8:at + 8 + length]
        at += 8 + length
    field = values.get(0x0100)
    if field is None or struct.unpack("<H", field[:2])[0] != 0x8001:
        raise WireError("the receiver answered with another message than a C-STORE response")
    answered = values.get(0x0120)
    if answered is not None and struct.unpack("<H", answered[:2])[0] != message_id:
        raise WireError("the receiver answered another message ID")
    code = struct.unpack("<H", values[0x0900][:2])[0] if 0x0900 in values else 0xFFFF
    comment = values.get(0x0902)
    return StoreStatus(code, comment.decode("ascii", "replace").strip(" \0") if comment else None)


def tune(assoc: Association) -> None:
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
