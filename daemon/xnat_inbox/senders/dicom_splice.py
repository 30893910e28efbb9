"""The routing string spliced into a file's own header bytes, for the DICOM sender."""

from __future__ import annotations

import struct
from typing import BinaryIO

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from ..route import RoutedStudy
from ..scan import Instance

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


class Unspliceable(Exception):
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
    except (Unspliceable, struct.error, UnicodeEncodeError, KeyError):
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
        raise Unspliceable("header longer than the splice window")
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
