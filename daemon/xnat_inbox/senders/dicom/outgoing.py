"""The outgoing copy of an instance when it can't be spliced: its header decoded, transformed
(de-identification), given the routing string and encoded again."""

from __future__ import annotations

from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.dsutils import encode

from ...reading.scan import Instance
from ...routing.route import RoutedStudy


def outgoing_header(instance: Instance, study: RoutedStudy, fp: BinaryIO | None = None, *,
                    whole: bool = False) -> Dataset:
    """The instance's outgoing header (with `whole`, the whole dataset): the one place where
    what goes out differs from the file. The study's `transform` hook (de-identification; it changes
    header elements only) runs first, then the routing string is set. `fp`, when given, is left
    at the start of the pixel data (or the end) so the rest is sent from the file as it is.
    The file itself is never written."""
    dataset = dcmread(fp if fp is not None else instance.path, force=True,
                      stop_before_pixels=not whole)
    if "TransferSyntaxUID" not in dataset.file_meta:
        dataset.file_meta.TransferSyntaxUID = UID(instance.transfer_syntax)
    if study.transform is not None:
        study.transform(dataset)
    if study.routing_value:
        setattr(dataset, study.routing_keyword, study.routing_value)
    return dataset


def encode_dataset(dataset: Dataset, syntax: str) -> bytes:
    uid = UID(syntax)
    encoded = encode(dataset, uid.is_implicit_VR, uid.is_little_endian, uid.is_deflated)
    if encoded is None:
        raise ValueError("cannot encode the dataset")
    return encoded
