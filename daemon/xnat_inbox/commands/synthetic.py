"""Realistic synthetic MR sessions for the demo, the tests and the benchmarks.

Every file written here is a DICOM Part 10 file of a real storage SOP class (MR Image
Storage by default) that dcmtk, Orthanc and dciodvfy accept, with the attributes a
scanner export carries. Pixel data is a cheap head-like phantom built with
bytes/array slicing only, so 1,000 instances of 256x256 take about a second plus
the disk writes. Runtime code uses pydicom and the standard library only.
"""

from __future__ import annotations

import math
import re
import sys
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

__all__ = [
    "DEFAULT_PATIENT",
    "DEFAULT_SERIES",
    "SUPPORTED_TRANSFER_SYNTAXES",
    "Patient",
    "SeriesSpec",
    "SessionInfo",
    "write_benchmark_session",
    "write_session",
]

# Uncompressed ones are written directly; RLE is encoded by pydicom's own pure-Python
# encoder (slow: meant for a few files that exercise "compressed input" paths).
SUPPORTED_TRANSFER_SYNTAXES: frozenset[str] = frozenset(
    {
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
        RLELossless,
    }
)

IMPLEMENTATION_VERSION_NAME = "XNAT_INBOX_SYN"
_FIELD_OF_VIEW_MM = 240.0


@dataclass(frozen=True)
class SeriesSpec:
    description: str
    count: int
    number: int | None = None  # SeriesNumber; default 1-based position in the session
    modality: str = "MR"  # MR and CT get their own SOP class; others Secondary Capture


DEFAULT_SERIES: tuple[SeriesSpec, ...] = (
    SeriesSpec("Localizer", 3),
    SeriesSpec("T1 MPRAGE", 12),
    SeriesSpec("T2 FLAIR", 10),
    SeriesSpec("DWI", 8),
)


@dataclass(frozen=True)
class Patient:
    # Frozen so one default instance can be shared safely; use dataclasses.replace.
    patient_id: str = "SUBJ001"
    patient_name: str = "Doe^Jane"
    birth_date: str = "19800101"
    sex: str = "F"


DEFAULT_PATIENT = Patient()


@dataclass
class SessionInfo:
    study_uid: str
    series_uids: list[str] = field(default_factory=list)  # in the order of `series`
    files: list[Path] = field(default_factory=list)  # in write order
    sop_instance_uids: list[str] = field(default_factory=list)  # parallel to `files`


@dataclass(frozen=True)
class _Acquisition:
    """MR acquisition parameters typical of one kind of series."""

    scanning_sequence: str
    sequence_variant: str
    scan_options: str
    acquisition_type: str  # MRAcquisitionType
    repetition_time: str
    echo_time: str
    inversion_time: str | None
    flip_angle: str
    slice_thickness: float
    level: int  # mean tissue value, 12-bit, so series differ in contrast


_LOCALIZER = _Acquisition("GR", "SP", "", "2D", "8.6", "4.0", None, "20", 8.0, 900)
_T1 = _Acquisition("GR\\IR", "SK\\SP\\MP", "", "3D", "2300", "2.98", "900", "9", 1.0, 1400)
_FLAIR = _Acquisition("SE\\IR", "SK\\SP\\MP", "", "2D", "9000", "81", "2500", "150", 5.0, 1100)
_T2 = _Acquisition("SE", "SK\\SP", "", "2D", "4000", "90", None, "150", 4.0, 1800)
_DWI = _Acquisition("EP", "SK\\SP", "PFP\\FS", "2D", "5200", "80", None, "90", 5.0, 700)
_DEFAULT_ACQ = _Acquisition("SE", "NONE", "", "2D", "500", "15", None, "90", 5.0, 1200)

# First matching pattern wins; matched against the series description.
_ACQ_BY_PATTERN: tuple[tuple[re.Pattern[str], _Acquisition], ...] = (
    (re.compile(r"(?i)locali[sz]er|scout|survey"), _LOCALIZER),
    (re.compile(r"(?i)flair"), _FLAIR),
    (re.compile(r"(?i)dwi|diff|dti"), _DWI),
    (re.compile(r"(?i)t1|mprage|spgr"), _T1),
    (re.compile(r"(?i)t2"), _T2),
)

# (ImageOrientationPatient, index of the through-plane axis): axial, sagittal, coronal.
_AXIAL = (("1", "0", "0", "0", "1", "0"), 2)
_SAGITTAL = (("0", "1", "0", "0", "0", "-1"), 0)
_CORONAL = (("1", "0", "0", "0", "0", "-1"), 1)


def write_session(
    dest: Path,
    *,
    series: Sequence[SeriesSpec] = DEFAULT_SERIES,
    patient: Patient = DEFAULT_PATIENT,
    study_date: str = "20260115",
    study_time: str = "101500",
    study_description: str = "Brain MRI",
    study_uid: str | None = None,
    rows: int = 64,
    columns: int = 64,
    transfer_syntax: str = ExplicitVRLittleEndian,
    layout: str = "series",
    extra: Mapping[str, object] | None = None,
) -> SessionInfo:
    """Write one study of synthetic instances under `dest` and describe what was written.

    layout "series": dest/<SeriesNumber>_<description>/IM0001.dcm ...;
    layout "flat": dest/<SOPInstanceUID>.dcm (unique, so sessions can share a folder).
    `extra` sets further top-level keywords on every instance, last, so it can also
    override generated values; a value of None removes the element (for bad inputs).
    Existing files are never overwritten (FileExistsError).
    """
    _check_args(series, rows, columns, transfer_syntax, layout, extra)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    info = SessionInfo(study_uid=study_uid or generate_uid())
    texts = [study_description, *(spec.description for spec in series), *(extra or {}).values()]
    utf8 = _needs_utf8([patient.patient_name, patient.patient_id, *texts])
    study = _study_dataset(patient, study_date, study_time, study_description, info.study_uid)
    if utf8:
        study.SpecificCharacterSet = "ISO_IR 192"  # UTF-8, only when needed, like scanners
    frame_of_reference = generate_uid()  # one scanner session, one patient frame
    for position, spec in enumerate(series, start=1):
        number = spec.number if spec.number is not None else position
        folder = dest / _series_folder(number, spec.description) if layout == "series" else dest
        folder.mkdir(parents=True, exist_ok=True)
        base = _series_dataset(study, spec, number, position, frame_of_reference, rows, columns)
        series_uid = _write_series(base, spec, folder, layout, transfer_syntax, extra, info)
        info.series_uids.append(series_uid)
    return info


def write_benchmark_session(
    dest: Path, count: int = 1000, rows: int = 256, columns: int = 256
) -> SessionInfo:
    """A large session split over up to four series, with fresh UIDs on every call.

    Fresh UIDs matter: Orthanc ignores re-stores of a SOP Instance UID it already has.
    """
    if count < 1:
        raise ValueError("count must be at least 1")
    names = ("Bench T1 MPRAGE", "Bench T2 FLAIR", "Bench DWI", "Bench T2 TSE")
    parts = min(len(names), count)
    sizes = [count // parts + (1 if i < count % parts else 0) for i in range(parts)]
    specs = tuple(SeriesSpec(names[i], sizes[i]) for i in range(parts))
    return write_session(
        dest,
        series=specs,
        patient=Patient(patient_id="BENCH001", patient_name="Bench^Mark"),
        study_description="Benchmark session",
        rows=rows,
        columns=columns,
    )


# --- argument checks -------------------------------------------------------------------


def _check_args(
    series: Sequence[SeriesSpec],
    rows: int,
    columns: int,
    transfer_syntax: str,
    layout: str,
    extra: Mapping[str, object] | None,
) -> None:
    # Fail before anything is written, so a bad call leaves no half-written session.
    if not series:
        raise ValueError("a session needs at least one series")
    if any(spec.count < 1 for spec in series):
        raise ValueError("every series needs at least one instance")
    if not (1 <= rows <= 0xFFFF and 1 <= columns <= 0xFFFF):
        raise ValueError("rows and columns must be between 1 and 65535")
    if transfer_syntax not in SUPPORTED_TRANSFER_SYNTAXES:
        raise ValueError(f"unsupported transfer syntax {transfer_syntax}")
    if layout not in ("series", "flat"):
        raise ValueError(f"layout must be 'series' or 'flat', not {layout!r}")
    unknown = [key for key in extra or {} if tag_for_keyword(key) is None]
    if unknown:
        raise ValueError(f"unknown DICOM keywords in extra: {', '.join(unknown)}")


# --- datasets --------------------------------------------------------------------------


def _study_dataset(
    patient: Patient,
    study_date: str,
    study_time: str,
    description: str,
    study_uid: str,
) -> Dataset:
    """Patient, study and equipment attributes shared by every instance."""
    ds = Dataset()
    ds.PatientName = patient.patient_name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = study_date
    ds.StudyTime = study_time
    ds.StudyDescription = description
    ds.StudyID = "1"
    ds.AccessionNumber = f"A{study_date}{study_time[:4]}"[:16]
    ds.ReferringPhysicianName = "Welby^Marcus"
    ds.InstitutionName = "Synthetic Imaging Centre"
    ds.Manufacturer = "xnat-inbox synthetic"
    ds.ManufacturerModelName = "Phantom 3T"
    ds.StationName = "SYNMR01"
    ds.SoftwareVersions = "1.0"
    ds.DeviceSerialNumber = "0001"
    ds.BodyPartExamined = "BRAIN"
    ds.PatientPosition = "HFS"
    ds.PositionReferenceIndicator = ""
    return ds


def _series_dataset(
    study: Dataset,
    spec: SeriesSpec,
    number: int,
    position: int,
    frame_of_reference: str,
    rows: int,
    columns: int,
) -> Dataset:
    """A template for every instance of one series; per-instance values are set later."""
    ds = Dataset()
    ds.update(study)
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = _sop_class(spec.modality)
    ds.Modality = spec.modality
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = number
    ds.SeriesDescription = spec.description
    ds.ProtocolName = spec.description
    ds.FrameOfReferenceUID = frame_of_reference
    ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = study.StudyDate
    # Series follow each other a few minutes apart, as on a real scanner.
    ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = _add_seconds(
        study.StudyTime, 240 * position
    )
    acq = _acquisition(spec.description)
    _set_image_pixel(ds, rows, columns, acq.level)
    ds.PixelSpacing = [_ds(_FIELD_OF_VIEW_MM / rows), _ds(_FIELD_OF_VIEW_MM / columns)]
    ds.SliceThickness = _ds(acq.slice_thickness)
    _set_modality_specific(ds, spec.modality, acq)
    return ds


def _set_image_pixel(ds: Dataset, rows: int, columns: int, level: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = _ds(level)
    ds.WindowWidth = _ds(2 * level)


def _set_modality_specific(ds: Dataset, modality: str, acq: _Acquisition) -> None:
    if modality == "MR":
        # Value 3 from the standard's defined terms (scanners often put vendor codes).
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence = acq.scanning_sequence
        ds.SequenceVariant = acq.sequence_variant
        ds.ScanOptions = acq.scan_options
        ds.MRAcquisitionType = acq.acquisition_type
        ds.SequenceName = f"*{acq.scanning_sequence.split(chr(92))[0].lower()}"
        ds.RepetitionTime = acq.repetition_time
        ds.EchoTime = acq.echo_time
        ds.EchoTrainLength = 1
        ds.NumberOfAverages = "1"
        ds.FlipAngle = acq.flip_angle
        ds.MagneticFieldStrength = "3"
        ds.ImagingFrequency = "123.2"
        ds.ImagedNucleus = "1H"
        if acq.inversion_time is not None:
            ds.InversionTime = acq.inversion_time
    elif modality == "CT":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = "120"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
    else:
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.PatientOrientation = ""  # type 2C: SC images need not have a plane
        ds.ConversionType = "WSD"  # SC Equipment module: workstation


def _sop_class(modality: str) -> UID:
    # Only MR and CT have their image IOD filled in here; anything else is a valid
    # Secondary Capture rather than an invalid MR instance with a wrong Modality.
    return {"MR": MRImageStorage, "CT": CTImageStorage}.get(modality, SecondaryCaptureImageStorage)


def _acquisition(description: str) -> _Acquisition:
    for pattern, acq in _ACQ_BY_PATTERN:
        if pattern.search(description):
            return acq
    return _DEFAULT_ACQ


# --- writing ---------------------------------------------------------------------------


def _write_series(
    base: Dataset,
    spec: SeriesSpec,
    folder: Path,
    layout: str,
    transfer_syntax: str,
    extra: Mapping[str, object] | None,
    info: SessionInfo,
) -> str:
    """Write every instance of one series by mutating one template (fast: no copies)."""
    acq = _acquisition(spec.description)
    # Read before `extra` can change the template: pixels follow the arguments.
    rows, columns = int(base.Rows), int(base.Columns)
    big_endian = transfer_syntax == ExplicitVRBigEndian
    ds = base
    for index in range(spec.count):
        plane = (_AXIAL, _SAGITTAL, _CORONAL)[index % 3] if acq is _LOCALIZER else _AXIAL
        _set_instance(ds, index, spec.count, plane, acq.slice_thickness)
        ds.PixelData = _phantom(rows, columns, index, spec.count, acq.level, big_endian)
        ds["PixelData"].VR = "OW"
        _apply_extra(ds, extra)
        name = f"IM{index + 1:04d}.dcm" if layout == "series" else f"{ds.SOPInstanceUID}.dcm"
        _save(ds, folder / name, transfer_syntax)
        info.files.append(folder / name)
        info.sop_instance_uids.append(str(ds.SOPInstanceUID))
    return str(ds.SeriesInstanceUID)


def _set_instance(
    ds: Dataset,
    index: int,
    count: int,
    plane: tuple[tuple[str, ...], int],
    thickness: float,
) -> None:
    orientation, axis = plane
    half_fov = _FIELD_OF_VIEW_MM / 2
    # Slices centred on the isocentre, one thickness apart along the plane normal.
    offset = (index - (count - 1) / 2) * thickness
    position = [-half_fov, -half_fov, -half_fov]
    position[axis] = offset
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = index + 1
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = list(orientation)
    ds.ImagePositionPatient = [_ds(value) for value in position]
    ds.SliceLocation = _ds(offset)


def _apply_extra(ds: Dataset, extra: Mapping[str, object] | None) -> None:
    for keyword, value in (extra or {}).items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)


def _save(ds: Dataset, path: Path, transfer_syntax: str) -> None:
    meta = ds.file_meta
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if transfer_syntax == RLELossless:
        # compress() works from an uncompressed dataset; it replaces PixelData, which
        # the next instance overwrites anyway.
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
    else:
        # pydicom 3 takes the encoding (implicit VR, endianness, deflate) from this UID.
        meta.TransferSyntaxUID = transfer_syntax
    ds.save_as(path, enforce_file_format=True, overwrite=False)


# --- pixels ----------------------------------------------------------------------------


def _phantom(
    rows: int, columns: int, index: int, count: int, level: int, big_endian: bool
) -> bytes:
    """A head-like ellipse that shrinks towards the ends of the series.

    Each row is three or five slices of precomputed rows, so an image costs O(rows)
    Python steps, not O(rows*columns).
    """
    # Slices near the ends of the stack cut the "head" near its top or bottom.
    t = (index - (count - 1) / 2) / (count / 2 + 1)
    scale = math.sqrt(max(0.0, 1.0 - t * t))
    tissue, background, dark = _rows(columns, level)
    image = array("H")
    cy, cx = rows / 2, columns / 2
    ry, rx = rows * 0.42 * scale, columns * 0.34 * scale
    for y in range(rows):
        dy = (y + 0.5 - cy) / ry if ry else 2.0
        if abs(dy) >= 1.0:
            image.extend(background)
            continue
        half = int(rx * math.sqrt(1.0 - dy * dy))
        x0, x1 = int(cx) - half, int(cx) + half
        inner = int(half * 0.25) if abs(dy) < 0.3 else 0  # dark "ventricles"
        image.extend(background[:x0])
        if inner:
            image.extend(tissue[x0 : int(cx) - inner])
            image.extend(dark[int(cx) - inner : int(cx) + inner])
            image.extend(tissue[int(cx) + inner : x1])
        else:
            image.extend(tissue[x0:x1])
        image.extend(background[x1:])
    if big_endian == (sys.byteorder == "little"):
        image.byteswap()  # array holds native order; the file wants the other one
    return image.tobytes()


@lru_cache(maxsize=64)
def _rows(columns: int, level: int) -> tuple[array, array, array]:
    """Tissue (textured), background (faint noise) and dark rows, `columns` wide."""
    tissue = array("H", (min(4095, level + (x * 37 % 97) - 48) for x in range(columns)))
    background = array("H", ((x * 13 + 7) % 23 for x in range(columns)))
    dark = array("H", (level // 4 + (x * 17 % 31) for x in range(columns)))
    return tissue, background, dark


# --- small helpers ---------------------------------------------------------------------


def _needs_utf8(values: Sequence[object]) -> bool:
    return any(isinstance(value, str) and not value.isascii() for value in values)


def _series_folder(number: int, description: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9]+", "_", description).strip("_") or "series"
    return f"{number}_{safe}"


def _ds(value: float) -> str:
    # DS is at most 16 characters; format explicitly rather than rely on repr().
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _add_seconds(hhmmss: str, seconds: int) -> str:
    base = int(hhmmss[0:2]) * 3600 + int(hhmmss[2:4]) * 60 + int(hhmmss[4:6] or 0)
    total = (base + seconds) % 86400
    return f"{total // 3600:02d}{total % 3600 // 60:02d}{total % 60:02d}"
