"""The routing string spliced into a file's own header bytes, for the DICOM sender."""

from __future__ import annotations

import struct
from typing import BinaryIO

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from ..rawheader import LONG_VRS, Unusual, element_at, file_meta, has_preamble, read_window
from ..route import RoutedStudy
from ..scan import Instance

# Measured: decoding the header with pydicom and encoding it again costs ~0.65 ms per instance,
# more than the rest of a C-STORE. Without a header transform the only change is one element,
# so it is spliced into the file's own bytes: walk the top-level elements up to the routing
# element's tag, replace or insert it, and send the rest of the file as it is. Anything unusual
# (no preamble, deflated, a header over HEADER_WINDOW) takes the pydicom path.


def routing_splice(fp: BinaryIO, instance: Instance,
                   study: RoutedStudy) -> tuple[bytes, int] | None:
    """(the outgoing dataset's first bytes: those of the file's first bytes read, 16 KB or up to
    64 KB for a long header, with the routing element spliced in; the file offset where the
    rest continues), or None when only the pydicom path will do. Nothing is read twice."""
    syntax = instance.transfer_syntax
    if syntax == DeflatedExplicitVRLittleEndian:
        return None
    implicit = syntax == ImplicitVRLittleEndian
    little = syntax != ExplicitVRBigEndian
    try:
        buf, (start, at, resume) = read_window(
            fp, lambda buf: _splice_points(buf, study, implicit, little))
        if at < 0:
            return buf[start:], len(buf)  # no routing string: the file's dataset as it is
        element = _encode_element(_routing_tag(study), dictionary_VR(_routing_tag(study)),
                                  study.routing_value.encode("ascii"), implicit, little)
    except (Unusual, struct.error, UnicodeEncodeError, KeyError):
        return None
    if resume > len(buf):  # the old routing element runs past the bytes read
        return buf[start:at] + element, resume
    return b"".join((buf[start:at], element, buf[resume:])), len(buf)


def _splice_points(buf: bytes, study: RoutedStudy, implicit: bool,
                   little: bool) -> tuple[int, int, int]:
    """Where the dataset starts, where the routing element goes, and where the file's dataset
    resumes after it (past an old routing element); (start, -1, -1) without a routing string."""
    if not has_preamble(buf):
        raise Unusual("no preamble")
    _, start = file_meta(buf)
    if not study.routing_value:
        return start, -1, -1
    tag = _routing_tag(study)
    at = start
    while True:
        found, _, _, end = element_at(buf, at, implicit, little)
        if found >= tag:
            return start, at, (end if found == tag else at)
        at = end


def _routing_tag(study: RoutedStudy) -> int:
    tag = tag_for_keyword(study.routing_keyword)
    if tag is None:
        raise KeyError(study.routing_keyword)
    return tag


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
