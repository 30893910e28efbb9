"""An instance's header (or whole dataset) for the steps after the scan: read from the file the
scan saw (`Instance.open`), a long value read only when a step asks for it, and from that same
open file, never by its name again; no element but the pixel data is ever decoded past
MAX_ELEMENT_BYTES, so one file with a huge (or sparse) element can't exhaust the daemon."""

from __future__ import annotations

from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian

#: values longer than this are read only when asked for
DEFER_BYTES = 64 * 1024
#: the longest value (pixel data aside) a step decodes; a header element this size is not real
MAX_ELEMENT_BYTES = 64 * 2**20
PIXEL_DATA = Tag(0x7FE0, 0x0010)


class ElementTooLarge(ValueError):
    """A value the daemon will not read into memory."""


def read_dataset(stream: BinaryIO, *, whole: bool = False) -> Dataset:
    """The header (with `whole`, the whole dataset) of the file open as `stream`, which must
    stay open while long values are read."""
    start = stream.tell()
    dataset = dcmread(stream, force=True, stop_before_pixels=not whole, defer_size=DEFER_BYTES)
    if dataset.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        # pydicom inflates the whole file into memory, and a deferred value's offset is one in
        # the inflated data, not in this stream: read it again without deferring
        stream.seek(start)
        return dcmread(stream, force=True, stop_before_pixels=not whole)
    # pydicom reads a deferred value by opening the file's name again: from this stream instead
    dataset.filename, dataset.buffer = None, stream
    return dataset


def check_decodable(dataset: Dataset) -> None:
    """Before a dataset is encoded again: every value it still holds can be read into memory."""
    for tag, element in dataset._dict.items():
        if isinstance(element, RawDataElement) and element.value is None and \
                tag != PIXEL_DATA and element.length > MAX_ELEMENT_BYTES:
            raise ElementTooLarge(
                f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) holds {element.length} bytes, "
                f"over the {MAX_ELEMENT_BYTES >> 20} MiB a header element may have: not sent")


def text_value(dataset: Dataset, keyword: str) -> str:
    """A value as text for templates and filters; "" when absent, unreadable or too long to
    be a label (never read into memory then)."""
    tag = Tag(keyword)
    element = dataset._dict.get(tag)
    if element is None:
        return ""
    if isinstance(element, RawDataElement) and element.value is None and \
            element.length > DEFER_BYTES:
        return ""
    try:
        value = dataset[tag].value
    except Exception:  # a malformed value pydicom can't convert counts as absent
        return ""
    if value is None:
        return ""
    if isinstance(value, MultiValue):
        return "\\".join(str(item) for item in value)
    return str(value).strip()
