"""The outgoing copy of an instance when it can't be spliced: its header decoded, transformed
(de-identification), given the routing string and encoded again; or, converted to another
transfer syntax, the whole dataset decoded (its pixel data too where it is big endian or
compressed: transcoded) and encoded around the pixel bytes."""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import BinaryIO

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID, ExplicitVRBigEndian

from ...reading.dataset import ElementTooLarge, check_decodable, read_dataset
from ...reading.scan import Instance
from ...reading.trailer import read_without_pixels, tail_offset
from ...routing.route import RoutedStudy
from ..transcode import PIXEL_DATA, decode, pixel_element, pixels_decoded, to_little_endian


class EncodingProblem(ValueError):
    """An element of the file whose value can't be decoded or encoded again for sending (e.g. 6
    bytes in an FD element, which takes 8 a value): a fault of the file, the same at every
    attempt. The message names the element, never its value."""

    def __init__(self, path: list[int], verb: str, cause: Exception) -> None:
        where = f"element {' > '.join(map(_element_name, path))}" if path else "an element"
        vr = f" (VR {_vr(path[-1])})" if path else ""
        super().__init__(
            f"{where}{vr} can't be {verb}: its value does not fit its VR "
            f"({type(cause).__name__}); an encoding problem in the file, not a network one: "
            "correct or remove that element (e.g. with dcmodify), then `xnat-inbox retry`")


@dataclass(frozen=True)
class Outgoing:
    """An outgoing dataset: `head`, the file's bytes from `start` to `end` as they are (the
    pixel data), then `tail` (what follows the pixel data, encoded again)."""

    head: bytes
    start: int
    end: int
    tail: bytes
    sop_instance_uid: str  # de-identification remaps it


def outgoing_copy(instance: Instance, study: RoutedStudy, fp: BinaryIO, size: int) -> Outgoing:
    """The outgoing dataset of a file in its own transfer syntax (not deflated). Without a
    transform, the header is encoded again with the routing string and the rest of the file
    follows as it is; with one, every element but the pixel data goes through it."""
    if study.transform is None:
        header = outgoing_header(instance, study, fp)
        return Outgoing(encode_dataset(header, instance.transfer_syntax), fp.tell(), size, b"",
                        str(header.SOPInstanceUID))
    dataset, pixels = read_without_pixels(fp)
    syntax = UID(instance.transfer_syntax)
    try:
        _finish(dataset, instance, study)
        _read_deferred(dataset, fp)
        encoded = encode_dataset(dataset, syntax)
    except Exception as exc:  # a hostile value raises only once the transform decodes it
        if isinstance(exc, OSError | ElementTooLarge | EncodingProblem):
            raise
        # pydicom's messages may quote the value: name the kind of error only
        raise ValueError(f"cannot de-identify it ({type(exc).__name__})") from None
    cut = tail_offset(encoded, dataset.keys(), pixels.tag, syntax.is_implicit_VR,
                      syntax.is_little_endian)
    return Outgoing(encoded[:cut], pixels.start, pixels.end, encoded[cut:],
                    str(dataset.SOPInstanceUID))


@dataclass(frozen=True)
class Converted:
    """An instance encoded in another transfer syntax: `head`, then `pixels` (decoded pixel
    data, or empty when they are inside `head`), then `tail`."""

    head: bytes
    pixels: bytearray | bytes
    tail: bytes
    sop_instance_uid: str


class PixelReader:
    """Decoded pixel data read like a file by the wire, in slices, never copied whole."""

    def __init__(self, data: bytearray | bytes) -> None:
        self._view, self._at = memoryview(data), 0

    def read(self, size: int) -> memoryview:
        piece = self._view[self._at:self._at + size]
        self._at += len(piece)
        return piece


def converted_copy(instance: Instance, study: RoutedStudy, fp: BinaryIO, syntax: str,
                   max_bytes: int) -> Converted:
    """The instance in `syntax`: read whole; big endian or compressed pixel data decoded (at
    most `max_bytes` of it, TranscodeRefused otherwise); transformed and routed; encoded."""
    fp.seek(0)
    dataset = read_dataset(fp, whole=True)
    check_decodable(dataset)
    own = instance.transfer_syntax
    decoded = decode(dataset, own, max_bytes) \
        if pixels_decoded(own) and "PixelData" in dataset else None
    if own == ExplicitVRBigEndian:
        to_little_endian(dataset)
    dataset.file_meta.TransferSyntaxUID = UID(syntax)
    _finish(dataset, instance, study)
    _read_deferred(dataset, fp)
    encoded = encode_dataset(dataset, syntax)
    if decoded is None:  # the little endian pair or deflated re-encoded, pixel data and all
        return Converted(encoded, b"", b"", str(dataset.SOPInstanceUID))
    uid = UID(syntax)
    cut = tail_offset(encoded, dataset.keys(), PIXEL_DATA, uid.is_implicit_VR,
                      uid.is_little_endian)
    head = encoded[:cut] + pixel_element(syntax, decoded.vr, len(decoded.pixels))
    return Converted(head, decoded.pixels, encoded[cut:], str(dataset.SOPInstanceUID))


def outgoing_header(instance: Instance, study: RoutedStudy, fp: BinaryIO, *,
                    whole: bool = False) -> Dataset:
    """The instance's outgoing header (with `whole`, the whole dataset), read from `fp` (the
    file as `Instance.open` gives it): the one place where what goes out differs from the file.
    The study's `transform` hook (de-identification; it never touches the pixel data) runs
    first, then the routing string is set. `fp` is left at the start of the pixel data (or the
    end). The file itself is never written."""
    dataset = read_dataset(fp, whole=whole)
    _finish(dataset, instance, study)
    _read_deferred(dataset, fp)
    return dataset


def _read_deferred(dataset: Dataset, fp: BinaryIO) -> None:
    """Before encoding: the long values read_dataset left in the file, read now (within the
    limit), and `fp` back where it was."""
    check_decodable(dataset)
    at = fp.tell()
    for tag in list(dataset._dict):
        try:
            dataset[tag]  # reads a deferred value, and decodes every value
        except (OSError, ElementTooLarge):
            raise
        except Exception as exc:  # pydicom's message quotes the value: name the element only
            raise EncodingProblem([int(tag)], "decoded", exc) from None
    fp.seek(at)


def _finish(dataset: Dataset, instance: Instance, study: RoutedStudy) -> None:
    """The transform, then the routing string: what makes the outgoing copy differ."""
    if "TransferSyntaxUID" not in dataset.file_meta:
        dataset.file_meta.TransferSyntaxUID = UID(instance.transfer_syntax)
    if study.transform is not None:
        study.transform(dataset)
    if study.routing_value:
        setattr(dataset, study.routing_keyword, study.routing_value)


def encode_dataset(dataset: Dataset, syntax: str) -> bytes:
    """The dataset encoded in `syntax`, or EncodingProblem naming the element that can't be.
    pydicom's writer, called directly: pynetdicom's `encode` would log a traceback per file
    and say only that encoding failed."""
    uid = UID(syntax)
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = uid.is_implicit_VR, uid.is_little_endian
    try:
        write_dataset(fp, dataset)
    except Exception as exc:
        raise EncodingProblem(_failed_at(exc), "encoded", exc) from None
    encoded = fp.getvalue()
    if uid.is_deflated:
        compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
        encoded = compressor.compress(encoded) + compressor.flush()
        encoded += b"\0" if len(encoded) % 2 else b""
    return encoded


#: pydicom's writer prefixes an error with each tag it was in, outermost first
_IN_TAG = re.compile(r"With tag \(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\) got exception")


def _failed_at(exc: Exception) -> list[int]:
    """The tags (outermost first: a sequence, then the element in its item) where the writer
    failed."""
    path: list[int] = []
    for group, element in _IN_TAG.findall(str(exc)):
        tag = int(group + element, 16)
        if not path or path[-1] != tag:  # pydicom may name the same element twice
            path.append(tag)
    return path


def _element_name(tag: int) -> str:
    keyword = keyword_for_tag(tag)
    name = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    return f"{name} {keyword}" if keyword else name


def _vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:  # a private or unknown tag
        return "unknown"
