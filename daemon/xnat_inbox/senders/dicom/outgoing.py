"""The outgoing copy of an instance when it can't be spliced: its header decoded, transformed
(de-identification), given the routing string and encoded again."""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.dsutils import encode

from ...reading.dataset import ElementTooLarge, check_decodable, read_dataset
from ...reading.scan import Instance
from ...reading.trailer import read_without_pixels, tail_offset
from ...routing.route import RoutedStudy


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
        if isinstance(exc, OSError | ElementTooLarge):
            raise
        # pydicom's messages may quote the value: name the kind of error only
        raise ValueError(f"cannot de-identify it ({type(exc).__name__})") from None
    cut = tail_offset(encoded, dataset.keys(), pixels.tag, syntax.is_implicit_VR,
                      syntax.is_little_endian)
    return Outgoing(encoded[:cut], pixels.start, pixels.end, encoded[cut:],
                    str(dataset.SOPInstanceUID))


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
        dataset[tag]  # reads a deferred value
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
    uid = UID(syntax)
    encoded = encode(dataset, uid.is_implicit_VR, uid.is_little_endian, uid.is_deflated)
    if encoded is None:
        raise ValueError("cannot encode the dataset")
    return encoded
