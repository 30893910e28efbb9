"""The outgoing copy of an instance when it can't be spliced: its header decoded, transformed
(de-identification), given the routing string and encoded again."""

from __future__ import annotations

from typing import BinaryIO

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.dsutils import encode

from ...reading.dataset import check_decodable, read_dataset
from ...reading.scan import Instance
from ...routing.route import RoutedStudy


def outgoing_header(instance: Instance, study: RoutedStudy, fp: BinaryIO, *,
                    whole: bool = False) -> Dataset:
    """The instance's outgoing header (with `whole`, the whole dataset), read from `fp` (the
    file as `Instance.open` gives it): the one place where what goes out differs from the
    file. The study's `transform` hook (de-identification; it changes header elements only)
    runs first, then the routing string is set. `fp` is left at the start of the pixel data
    (or the end) so the rest is sent from the file as it is. The file is never written."""
    dataset = read_dataset(fp, whole=whole)
    rest = fp.tell()
    if "TransferSyntaxUID" not in dataset.file_meta:
        dataset.file_meta.TransferSyntaxUID = UID(instance.transfer_syntax)
    if study.transform is not None:
        study.transform(dataset)
    if study.routing_value:
        setattr(dataset, study.routing_keyword, study.routing_value)
    check_decodable(dataset)
    for tag in list(dataset._dict):
        dataset[tag]  # a long value read_dataset deferred: read it now, fp is open
    fp.seek(rest)
    return dataset


def encode_dataset(dataset: Dataset, syntax: str) -> bytes:
    uid = UID(syntax)
    encoded = encode(dataset, uid.is_implicit_VR, uid.is_little_endian, uid.is_deflated)
    if encoded is None:
        raise ValueError("cannot encode the dataset")
    return encoded
