"""A DICOM file's top-level elements found in its raw bytes, without building a pydicom dataset.

Measured (bench/cstore.py): pydicom's dcmread plus the conversion of a dozen values costs
~0.4 ms per file, as much as the C-STORE of the file itself. The scan needs a handful of values
and the sender the offset of one element, so both walk the header's bytes with this module and
hand anything unusual (no preamble, deflated or big endian, odd VRs, a header longer than
HEADER_WINDOW) to pydicom by catching `Unusual`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import BinaryIO, TypeVar

from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR

T = TypeVar("T")

#: how much of a file's start is read first (most MR headers are 2-10 KB), and at most
FIRST_WINDOW = 16384
HEADER_WINDOW = 65536
#: explicit VRs with a 4-byte length (PS3.5 7.1.2), and every VR: as pydicom knows them
LONG_VRS = frozenset(vr.value.encode() for vr in EXPLICIT_VR_LENGTH_32)
KNOWN_VRS = frozenset(vr.value.encode() for vr in VR if len(vr.value) == 2)
ITEM_END, SEQUENCE_END = 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
UNDEFINED = 0xFFFFFFFF

_LITTLE = struct.Struct("<HHI")
_LITTLE_SHORT = struct.Struct("<HH2sH")
_LONG_LITTLE = struct.Struct("<I")


class Unusual(Exception):
    """Something only pydicom's reader should judge."""


class PastWindow(Unusual):
    """The header goes on past the bytes read: read more (up to HEADER_WINDOW) and walk again."""


def read_window(fp: BinaryIO, walk: Callable[[bytes], T]) -> tuple[bytes, T]:
    """`walk` over the file's first FIRST_WINDOW bytes, or over its first HEADER_WINDOW bytes
    when the header is longer; the bytes walked and walk's result (Unusual passes)."""
    buf = fp.read(FIRST_WINDOW)
    try:
        return buf, walk(buf)
    except PastWindow:
        if len(buf) < FIRST_WINDOW:
            raise
        buf += fp.read(HEADER_WINDOW - len(buf))
        return buf, walk(buf)


def has_preamble(buf: bytes) -> bool:
    return buf[128:132] == b"DICM"


def file_meta(buf: bytes) -> tuple[dict[int, bytes], int]:
    """The group 0002 values of a file with a preamble, and the offset where the dataset starts.
    The file meta is always Explicit VR Little Endian (PS3.10 7.1)."""
    values: dict[int, bytes] = {}
    at = 132
    while True:
        if at + 2 > len(buf):
            raise PastWindow("the file meta goes on past the window")
        group, = struct.unpack_from("<H", buf, at)
        if group != 0x0002:
            return values, at
        tag, value_at, length, at = element_at(buf, at, False, True)
        values[tag] = buf[value_at:value_at + length]


def element_at(buf: bytes, at: int, implicit: bool,
               little: bool = True) -> tuple[int, int, int, int]:
    """(tag, value offset, value length, offset after the element) of the element at `at`.
    Encapsulated pixel data (undefined length) ends the walk: its end is its value offset."""
    if at + 8 > len(buf):
        raise PastWindow("header longer than the window")
    if little:
        group, elem, length = _LITTLE.unpack_from(buf, at)
    else:
        group, elem, length = struct.unpack_from(">HHI", buf, at)
    tag = group << 16 | elem
    value_at = at + 8
    if not implicit and group != 0xFFFE:
        vr = buf[at + 4:at + 6]
        if vr not in KNOWN_VRS:
            raise Unusual("not a VR where one should be")
        if vr in LONG_VRS:
            if at + 12 > len(buf):
                raise PastWindow("header longer than the window")
            length, = struct.unpack_from("<I" if little else ">I", buf, at + 8)
            value_at = at + 12
        else:
            length = length >> 16 if little else length & 0xFFFF
    if length != UNDEFINED:
        return tag, value_at, length, value_at + length
    if tag == PIXEL_DATA:
        return tag, value_at, length, value_at
    return tag, value_at, length, _past_delimiter(buf, value_at, implicit, little)


def _past_delimiter(buf: bytes, at: int, implicit: bool, little: bool) -> int:
    """Past the delimiter of a sequence or item of undefined length starting at `at`."""
    while True:
        tag, _, _, end = element_at(buf, at, implicit, little)
        if tag in (SEQUENCE_END, ITEM_END):
            return end
        at = end


def elements(buf: bytes, at: int, implicit: bool,
             little: bool = True) -> Iterator[tuple[int, int, int, int]]:
    """The top-level elements from `at` on, as element_at gives them, until the end of buf;
    PastWindow when one runs past it (stop iterating before that to keep what was read)."""
    while at < len(buf):
        element = element_at(buf, at, implicit, little)
        yield element
        at = element[3]
    if at > len(buf):
        raise PastWindow("an element runs past the bytes read")
