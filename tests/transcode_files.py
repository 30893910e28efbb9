"""A handful of compressed and re-encoded files for the transcoding tests, one study: made by
encoders nobody on the project wrote (dcmtk's `dcmcjpeg`, `dcmcjpls`, `dcmcrle`, `dcmconv`, and
openjpeg through pydicom's `compress`) from synthetic MR (16-bit, 12 stored) and a two-frame
RGB ultrasound image. Each file is a series of its own, named after its kind. The full corpus
(more sources, every encoder) is tests/transcode_corpus.py.

    made = make_drop(folder, ["jpeg_ls", "rle_rgb", "plain"])
    made["jpeg_ls"].path, .syntax, .sop_instance_uid, .pixels()
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import pixel_array
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

from tests.peers import dcmtk_tool
from xnat_inbox.commands.synthetic import SeriesSpec, write_session

MPEG2 = "1.2.840.10008.1.2.4.100"  # MPEG2 Main Profile / Main Level: no decoder here
#: kind -> (the dcmtk command, its options; or how else it is made), its source
KINDS: dict[str, tuple[tuple[str, ...], str]] = {
    "plain": ((), "mr"),
    "jpeg_baseline_rgb": (("dcmcjpeg", "+eb"), "rgb"),  # YBR_FULL_422, lossy
    "jpeg_lossless": (("dcmcjpeg", "+e1"), "mr"),
    "jpeg_ls": (("dcmcjpls", "+el"), "mr"),
    "jpeg_ls_near": (("dcmcjpls", "+en"), "mr"),  # lossy
    "rle_rgb": (("dcmcrle",), "rgb"),
    "j2k": (("openjpeg",), "mr"),  # lossy, and the file says nothing about it
    "big_endian": (("dcmconv", "+tb"), "mr"),
    "deflated": (("dcmconv", "+td"), "mr_large"),  # 128 KiB of pixels: past pydicom's deferral
    "mpeg2": (("dcmcjpls", "+el", "relabel"), "mr"),
}
LOSSY = {"jpeg_baseline_rgb", "jpeg_ls_near", "j2k"}
PATIENT_ID, STUDY_DATE = "SUBJ001", "20260115"  # write_session's, so one patient and study


@dataclass(frozen=True)
class Made:
    kind: str
    path: Path
    syntax: str
    sop_instance_uid: str

    def dataset(self) -> Dataset:
        return dcmread(self.path)

    def pixels(self) -> np.ndarray:
        """The decoder's output of the file (pylibjpeg, the daemon's decoder), as pydicom's
        pixel_array gives it (YCbCr as RGB)."""
        return decoded(self.dataset())


def decoded(ds: Dataset) -> np.ndarray:
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        return pixel_array(ds, decoding_plugin="pylibjpeg")
    return ds.pixel_array


def make_drop(folder: Path, kinds: Iterable[str], *, study_uid: str | None = None,
              rgb_frames: int = 2) -> dict[str, Made]:
    """One file per kind under `folder` (a series of its own each), in one study."""
    kinds = list(kinds)
    tools = {KINDS[kind][0][0] for kind in kinds if KINDS[kind][0]} - {"openjpeg"}
    missing = [tool for tool in sorted(tools) if dcmtk_tool(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not found: install dcmtk")
    study_uid = study_uid or generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    scratch = folder.parent / f".{folder.name}-scratch"
    made = {}
    for number, kind in enumerate(kinds, start=1):
        command, source = KINDS[kind]
        path = _source(scratch / kind, source, kind, number, study_uid, rgb_frames)
        if command and command[0] == "openjpeg":
            ds = dcmread(path)
            ds.compress(JPEG2000, encoding_plugin="pylibjpeg", j2k_cr=[15],
                        generate_instance_uid=False)
            ds.save_as(path)
        elif command:
            program = dcmtk_tool(command[0])
            options = [option for option in command[1:] if option != "relabel"]
            out = path.with_suffix(".out")
            subprocess.run([str(program), *options, str(path), str(out)], check=True,
                           capture_output=True)
            out.replace(path)
            if "relabel" in command:  # encapsulated data under a syntax nothing here decodes
                ds = dcmread(path)
                ds.file_meta.TransferSyntaxUID = MPEG2
                ds.save_as(path)
        target = folder / f"{kind}.dcm"
        shutil.move(path, target)
        ds = dcmread(target, stop_before_pixels=True)
        made[kind] = Made(kind, target, str(ds.file_meta.TransferSyntaxUID),
                          str(ds.SOPInstanceUID))
    shutil.rmtree(scratch)
    return made


def _source(scratch: Path, source: str, kind: str, number: int, study_uid: str,
            rgb_frames: int) -> Path:
    if source == "rgb":
        return _rgb(scratch, kind, number, study_uid, rgb_frames)
    size = 256 if source == "mr_large" else 64
    info = write_session(scratch, series=(SeriesSpec(kind, 1, number=number),),
                         study_uid=study_uid, rows=size, columns=size, layout="flat")
    return info.files[0]


def _rgb(scratch: Path, kind: str, number: int, study_uid: str, frames: int) -> Path:
    """A small RGB ultrasound cine: colour gradients that differ per frame."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.PatientID, ds.PatientName, ds.StudyDate = PATIENT_ID, "", STUDY_DATE
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "US", number, 1
    ds.SeriesDescription = kind
    ds.Rows, ds.Columns, ds.NumberOfFrames = 48, 64, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    y, x = np.mgrid[0:48, 0:64]
    pixels = np.stack([np.stack([(x * 4 + f * 30) % 256, (y * 5) % 256, ((x + y) * 2) % 256],
                                axis=-1) for f in range(frames)]).astype(np.uint8)
    ds.PixelData = pixels.tobytes()
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / "rgb.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path
