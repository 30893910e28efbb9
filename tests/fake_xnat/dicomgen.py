"""Tiny DICOM objects and zips for testing the fake XNAT (8x8 pixels, a few instances).

Independent of the daemon's own synthetic module on purpose: the fake must be testable
on its own.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

ROWS = COLS = 8


def make_instance(*, study_uid: str, series_uid: str, sop_uid: str | None = None,
                  series_number: int = 1, instance_number: int = 1,
                  patient_id: str = "PAT001", patient_name: str = "Test^Patient",
                  series_description: str = "T1", study_description: str = "",
                  omit: Iterable[str] = ()) -> bytes:
    """One MR image as DICOM Part 10 bytes; `omit` drops keywords (e.g. SOPInstanceUID)."""
    sop_uid = sop_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.Modality = "MR"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.SeriesDescription = series_description
    ds.StudyDescription = study_description
    ds.Rows, ds.Columns = ROWS, COLS
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = bytes((instance_number + i) % 256 for i in range(ROWS * COLS * 2))
    for keyword in omit:
        delattr(ds, keyword)
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


@dataclass
class Study:
    """A study of `series` series with `per_series` instances each; files by zip entry name."""

    series: int = 2
    per_series: int = 3
    patient_id: str = "PAT001"
    study_uid: str = field(default_factory=generate_uid)
    first_series_number: int = 1
    files: dict[str, bytes] = field(default_factory=dict)
    sop_uids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for s in range(self.series):
            number = self.first_series_number + s
            series_uid = generate_uid()
            for i in range(1, self.per_series + 1):
                sop = generate_uid()
                self.sop_uids.append(sop)
                self.files[f"S{number}/IM{i:04d}.dcm"] = make_instance(
                    study_uid=self.study_uid, series_uid=series_uid, sop_uid=sop,
                    series_number=number, instance_number=i, patient_id=self.patient_id,
                    series_description=f"series {number}")

    def __len__(self) -> int:
        return len(self.files)


class _Unseekable(io.RawIOBase):
    """A write-only stream: zipfile then writes data descriptors, as a streaming sender would."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.buf += b
        return len(b)


def build_zip(files: Mapping[str, bytes], *, compression: int = zipfile.ZIP_DEFLATED,
              streamed: bool = False) -> bytes:
    """A zip of `files`; streamed=True writes it to a non-seekable stream (data descriptors)."""
    if streamed:
        sink = _Unseekable()
        with zipfile.ZipFile(sink, "w", compression) as zf:
            for name, data in files.items():
                with zf.open(name, "w") as entry:
                    entry.write(data)
        return bytes(sink.buf)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()
