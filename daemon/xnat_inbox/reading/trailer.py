"""Every element of a DICOM file but its pixel data: the header, and the trailer that may follow
the pixel data (private groups, digital signatures, padding). De-identification and the PHI
guard must see both, while the pixel data's bytes are only ever copied.

pydicom's `stop_before_pixels` stops reading at the pixel data and nothing reads past it; its
`defer_size` can't skip encapsulated pixel data (undefined length: it reads the fragments to
find the end). So the pixel data is stepped over here, reading only element and item headers,
and what follows is read with pydicom and merged into the header's dataset.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import FileDataset
from pydicom.filereader import read_dataset as read_elements
from pydicom.uid import DeflatedExplicitVRLittleEndian

from .dataset import read_dataset
from .rawheader import UNDEFINED, Unusual, element_at, elements

#: PixelData and its float and double float forms: where pydicom's stop_before_pixels stops
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
ITEM, SEQUENCE_END = 0xFFFEE000, 0xFFFEE0DD
NO_PIXELS = 0xFFFFFFFF  # the span's tag without pixel data: no element follows it
#: at most this much is read (and decoded) after the pixel data: a trailer is a few KB at
#: most in real files, so more is refused rather than held in memory
TRAILER_LIMIT = 16 << 20


class TrailerError(ValueError):
    """What follows the pixel data can't be read (too long, not DICOM elements)."""


@dataclass(frozen=True)
class PixelSpan:
    """Where the pixel data lies in the file: [start, end), empty at the end without any."""

    start: int
    end: int
    tag: int  # the first pixel data element's: encoded elements past it follow the pixels


def read_without_pixels(fp: BinaryIO) -> tuple[FileDataset, PixelSpan]:
    """The file's dataset without its pixel data, the trailer included, and where the pixel data
    lies; `fp` is left at its start. A deflated file is inflated whole by pydicom anyway: its
    span is empty and means nothing."""
    dataset = read_dataset(fp)
    if dataset.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        fp.seek(0)
        return _inflated(fp), PixelSpan(0, 0, NO_PIXELS)
    implicit, little = (bool(flag) for flag in dataset.original_encoding)
    start = fp.tell()
    tag, end = _past_pixels(fp, implicit, little)
    if (size := fp.seek(0, io.SEEK_END)) > end:
        if size - end > TRAILER_LIMIT:
            raise TrailerError(f"{size - end} bytes follow the pixel data, more than the "
                               f"{TRAILER_LIMIT >> 20} MiB read there to de-identify and check")
        fp.seek(end)
        _merge_trailer(dataset, fp.read(size - end), tag, implicit, little)
    fp.seek(start)
    return dataset, PixelSpan(start, end, tag)


def _inflated(fp: BinaryIO) -> FileDataset:
    dataset = dcmread(fp, force=True)
    for tag in PIXEL_TAGS & set(dataset.keys()):
        del dataset[tag]
    return dataset


def _past_pixels(fp: BinaryIO, implicit: bool, little: bool) -> tuple[int, int]:
    """(the first pixel data element's tag, the file offset past the last one) from fp's
    position; (NO_PIXELS, the position) where no pixel data starts there. Values are seeked
    over, never read."""
    first, end = NO_PIXELS, fp.tell()
    while (found := _element_header(fp, implicit, little)) is not None:
        tag, length = found
        if tag not in PIXEL_TAGS:
            break
        first = min(first, tag)
        if length == UNDEFINED:
            _past_fragments(fp, little)
        else:
            fp.seek(length, io.SEEK_CUR)
        end = fp.tell()
    fp.seek(end)
    return first, end


def _element_header(fp: BinaryIO, implicit: bool, little: bool) -> tuple[int, int] | None:
    """(tag, length) of the element at fp, which is left at its value; None at the end or where
    no plain element starts (an undefined-length sequence is no pixel data either)."""
    at = fp.tell()
    try:
        tag, value_at, length, _ = element_at(fp.read(12), 0, implicit, little)
    except (Unusual, struct.error):
        return None
    fp.seek(at + value_at)
    return tag, length


def _past_fragments(fp: BinaryIO, little: bool) -> None:
    """Past the items of encapsulated pixel data and its sequence delimiter (PS3.5 A.4)."""
    order = "<" if little else ">"
    while len(head := fp.read(8)) == 8:
        group, element, length = struct.unpack(order + "HHI", head)
        tag = group << 16 | element
        if tag == SEQUENCE_END:
            return
        if tag != ITEM or length == UNDEFINED:
            raise TrailerError("the encapsulated pixel data is malformed (an element other "
                               "than an item among its fragments)")
        fp.seek(length, io.SEEK_CUR)
    raise TrailerError("the encapsulated pixel data has no sequence delimiter")


def _merge_trailer(dataset: FileDataset, trailer: bytes, pixels: int, implicit: bool,
                   little: bool) -> None:
    """The trailer's elements added to the header's dataset, raw: their values are decoded
    with the header's character set, when the transform or the guard reads them. Zero bytes
    (a writer's padding) carry nothing and are left out."""
    if not trailer.strip(b"\0"):
        return
    try:
        found = read_elements(io.BytesIO(trailer), implicit, little)
        tags = list(found.keys())
        if any(tag <= pixels for tag in tags):
            # it would replace a header element: refused, not guessed at
            raise TrailerError("what follows the pixel data is out of order (elements that "
                               "belong before it)")
        for tag in tags:
            dataset[tag] = found.get_item(tag)
    except TrailerError:
        raise
    except Exception as exc:  # hostile bytes make pydicom raise many kinds of error
        raise TrailerError("what follows the pixel data is not DICOM elements "
                           f"({type(exc).__name__})") from None


def tail_offset(encoded: bytes, tags: Iterable[int], tag: int, implicit: bool,
                little: bool) -> int:
    """Where, in an encoded dataset of elements `tags` without pixel data, those that follow
    the pixel data element `tag` begin (the end when none do)."""
    if all(found <= tag for found in tags):
        return len(encoded)  # the usual case: nothing follows the pixel data
    at = 0
    try:
        for found, _, _, end in elements(encoded, 0, implicit, little):
            if found > tag:
                return at
            at = end
    except (Unusual, struct.error) as exc:
        raise TrailerError(f"cannot split the encoded dataset: {exc}") from None
    return len(encoded)
