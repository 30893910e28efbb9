"""The routing string spliced into a file's own header bytes, for the DICOM sender."""

from __future__ import annotations

import struct
from functools import lru_cache
from typing import BinaryIO

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from ...reading.rawheader import Unusual, element_at, file_meta, has_preamble, read_window
from ...reading.scan import Instance
from ...routing.route import RoutedStudy

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
        tag = _routing_tag(study) if study.routing_value else None
        element = _routing_element(tag, study.routing_value, implicit, little) if tag else b""
        buf, (start, at, resume) = read_window(
            fp, lambda buf: _splice_points(buf, tag, implicit, little))
    except (Unusual, struct.error, UnicodeEncodeError, KeyError):
        return None
    if tag is None:
        return buf[start:], len(buf)  # no routing string: the file's dataset as it is
    if resume > len(buf):  # the old routing element runs past the bytes read
        return buf[start:at] + element, resume
    return b"".join((buf[start:at], element, buf[resume:])), len(buf)


def _splice_points(buf: bytes, tag: int | None, implicit: bool,
                   little: bool) -> tuple[int, int, int]:
    """Where the dataset starts, where the routing element (`tag`) goes, and where the file's
    dataset resumes after it (past an old routing element); (start, -1, -1) without a tag."""
    if not has_preamble(buf):
        raise Unusual("no preamble")
    _, start = file_meta(buf)
    if tag is None:
        return start, -1, -1
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


@lru_cache(maxsize=64)
def _routing_element(tag: int, value: str, implicit: bool, little: bool) -> bytes:
    """The routing element as pydicom encodes it: once per study and transfer syntax."""
    value.encode("ascii")  # UnicodeEncodeError: the file's character set decides, so pydicom
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = little, implicit
    write_data_element(fp, DataElement(tag, dictionary_VR(tag), value))
    return fp.getvalue()
