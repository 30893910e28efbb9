"""Step 4, scan + group: classify every file of a claimed drop (headers only, never pixel data)
and group the DICOM ones by StudyInstanceUID, then SeriesInstanceUID."""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from .config import ROUTE_FILE

UNDEFINED_LENGTH = 0xFFFFFFFF

DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
JUNK_NAMES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", ".ds_store", ROUTE_FILE})
JUNK_SUFFIXES = (".log", ".tmp", ".bak", ".lnk")
#: values longer than this (pixel data) are skipped over, never read into memory
DEFER_BYTES = 256
PHI_TAGS = ("PatientName", "PatientID", "PatientBirthDate")


class Kind(StrEnum):
    DICOM = "dicom"
    JUNK = "junk"  # travels with the drop, never an error
    NOT_DICOM = "not_dicom"  # a file that isn't DICOM: skipped, or fails the drop
    UNREADABLE = "unreadable"  # DICOM-looking but broken, or no permission
    DUPLICATE = "duplicate"  # same SOPInstanceUID as another file of the drop
    SYMLINK = "symlink"  # never followed out of the inbox
    SPECIAL = "special"  # FIFO, socket, device: never opened


@dataclass
class Instance:
    path: Path
    rel: str
    size: int
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    study_uid: str
    series_uid: str
    patient_id: str
    instance_number: int | None
    series_number: str
    series_description: str
    modality: str


@dataclass
class FileEntry:
    rel: str
    size: int
    kind: Kind
    reason: str | None = None
    instance: Instance | None = None


@dataclass
class Series:
    uid: str
    number: str
    description: str
    modality: str
    instances: list[Instance] = field(default_factory=list)


@dataclass
class Study:
    uid: str
    series: dict[str, Series] = field(default_factory=dict)
    patient_ids: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)

    @property
    def instances(self) -> list[Instance]:
        return [instance for series in self.series.values() for instance in series.instances]


@dataclass
class ScanResult:
    root: Path
    files: list[FileEntry]
    studies: dict[str, Study]
    phi: set[str]

    def of_kind(self, *kinds: Kind) -> list[FileEntry]:
        return [entry for entry in self.files if entry.kind in kinds]

    def counts(self) -> dict[str, int]:
        """How many files of each kind, in the order of Kind."""
        counts = {kind.value: len(self.of_kind(kind)) for kind in Kind}
        return {kind: count for kind, count in counts.items() if count}


def scan_drop(root: Path, ready_marker: str | None = None) -> ScanResult:
    """Classify every file under `root` and group the DICOM instances."""
    files: list[FileEntry] = []
    phi: set[str] = set()
    for path, info in _walk(root):
        rel = str(path.relative_to(root))
        files.append(classify(path, rel, info, phi, ready_marker))
    studies = group(files)
    return ScanResult(root, files, studies, phi)


def _walk(root: Path) -> list[tuple[Path, os.stat_result]]:
    """Every entry below root (files, links, specials; not directories), in a stable order."""
    found: list[tuple[Path, os.stat_result]] = []
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError:
            continue  # an unreadable folder: its files are counted by the finish step's move
        for entry in entries:
            path = Path(entry.path)
            info = os.lstat(path)
            if stat.S_ISDIR(info.st_mode):
                pending.append(path)
            else:
                found.append((path, info))
    return sorted(found, key=lambda item: str(item[0]))


def classify(path: Path, rel: str, info: os.stat_result, phi: set[str],
             ready_marker: str | None = None) -> FileEntry:
    if stat.S_ISLNK(info.st_mode):
        return FileEntry(rel, 0, Kind.SYMLINK, "symbolic link: not followed, kept with the drop")
    if not stat.S_ISREG(info.st_mode):
        return FileEntry(rel, 0, Kind.SPECIAL, "not a regular file (FIFO, socket or device): "
                         "not opened, kept with the drop")
    junk = _junk_reason(path, rel, ready_marker)
    if junk:
        return FileEntry(rel, info.st_size, Kind.JUNK, junk)
    if info.st_size == 0:
        return FileEntry(rel, 0, Kind.NOT_DICOM, "empty file (0 bytes)")
    try:
        return _read_header(path, rel, info.st_size, phi)
    except OSError as exc:
        return FileEntry(rel, info.st_size, Kind.UNREADABLE, f"cannot read: {exc.strerror}")


def _junk_reason(path: Path, rel: str, ready_marker: str | None) -> str | None:
    name = path.name.casefold()
    if ready_marker and rel == ready_marker:
        return "ready marker"
    if name in JUNK_NAMES or name.startswith(("~$", "._")):
        return f"system or helper file ({path.name})"
    if any(part.startswith(".") for part in Path(rel).parts):
        return "hidden file"
    if name.endswith(JUNK_SUFFIXES):
        return f"log or temporary file ({path.suffix})"
    return None


def _read_header(path: Path, rel: str, size: int, phi: set[str]) -> FileEntry:
    with open(path, "rb") as stream:
        has_preamble = stream.read(132)[128:132] == b"DICM"
        stream.seek(0)
        try:
            ds = dcmread(stream, defer_size=DEFER_BYTES, force=not has_preamble)
        except Exception as exc:  # hostile bytes make pydicom raise many kinds of error
            if isinstance(exc, OSError):
                raise
            if not has_preamble:
                return FileEntry(rel, size, Kind.NOT_DICOM, "not a DICOM file")
            return FileEntry(rel, size, Kind.UNREADABLE, f"corrupt DICOM: {exc}")
    try:  # pydicom converts values lazily: a hostile value raises only when it is read
        return _classify_dataset(ds, path, rel, size, has_preamble, phi)
    except Exception as exc:
        if isinstance(exc, OSError):
            raise
        kind = Kind.UNREADABLE if has_preamble else Kind.NOT_DICOM
        return FileEntry(rel, size, kind, f"corrupt DICOM: {exc}" if has_preamble
                         else "not a DICOM file")


def _classify_dataset(ds: Dataset, path: Path, rel: str, size: int, has_preamble: bool,
                      phi: set[str]) -> FileEntry:
    meta = getattr(ds, "file_meta", None)
    media_class = str(meta.get("MediaStorageSOPClassUID", "")) if meta else ""
    if media_class == DICOMDIR_CLASS:
        return FileEntry(rel, size, Kind.JUNK, "DICOMDIR index (not an image)")
    missing = [tag for tag in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                               "SeriesInstanceUID") if not _text(ds, tag)]
    if len(missing) == 4:
        if not has_preamble:
            return FileEntry(rel, size, Kind.NOT_DICOM, "not a DICOM file")
        return FileEntry(rel, size, Kind.UNREADABLE, "corrupt DICOM: a preamble but no readable "
                         "dataset after it")
    # offsets in a deflated file count inflated bytes: its length can't be checked this way
    if _transfer_syntax(ds) != DeflatedExplicitVRLittleEndian and \
            (short := _truncation(ds, size)) is not None:
        return FileEntry(rel, size, Kind.UNREADABLE, short)
    if missing:
        return FileEntry(rel, size, Kind.UNREADABLE,
                         f"DICOM file without {', '.join(missing)}: XNAT can't place it")
    phi.update(value for tag in PHI_TAGS if (value := _text(ds, tag)))
    instance = Instance(
        path=path,
        rel=rel,
        size=size,
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        sop_class_uid=_text(ds, "SOPClassUID"),
        transfer_syntax=_transfer_syntax(ds),
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        patient_id=_text(ds, "PatientID"),
        instance_number=_int(ds, "InstanceNumber"),
        series_number=_text(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription"),
        modality=_text(ds, "Modality"),
    )
    return FileEntry(rel, size, Kind.DICOM, None, instance)


def _truncation(ds: Dataset, size: int) -> str | None:
    """Why the file is shorter than its own elements say (a half-written copy), or None."""
    for element in ds._dict.values():
        if isinstance(element, RawDataElement) and element.value is None and \
                element.length != UNDEFINED_LENGTH and \
                element.value_tell + element.length > size:
            missing = element.value_tell + element.length - size
            return (f"truncated: ({element.tag >> 16:04X},{element.tag & 0xFFFF:04X}) needs "
                    f"{missing} more bytes than the file has")
    return None


def _text(ds: object, keyword: str) -> str:
    try:
        value = getattr(ds, keyword, None)
    except Exception:  # a malformed value pydicom can't convert
        return ""
    return "" if value is None else str(value).strip()


def _int(ds: object, keyword: str) -> int | None:
    try:
        return int(getattr(ds, keyword))
    except (AttributeError, TypeError, ValueError):
        return None


def _transfer_syntax(ds: object) -> str:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid:
        return str(uid)
    return ImplicitVRLittleEndian if getattr(ds, "is_implicit_VR", True) else ExplicitVRLittleEndian


def group(files: list[FileEntry]) -> dict[str, Study]:
    """Studies by StudyInstanceUID, series by SeriesInstanceUID; duplicates marked."""
    studies: dict[str, Study] = {}
    first_of: dict[str, FileEntry] = {}
    for entry in files:
        if entry.kind is not Kind.DICOM or entry.instance is None:
            continue
        instance = entry.instance
        earlier = first_of.get(instance.sop_instance_uid)
        study = studies.setdefault(instance.study_uid, Study(instance.study_uid))
        if earlier is not None:
            _mark_duplicate(entry, earlier, study)
            continue
        first_of[instance.sop_instance_uid] = entry
        study.patient_ids.add(instance.patient_id)
        series = study.series.get(instance.series_uid)
        if series is None:
            series = study.series[instance.series_uid] = Series(
                instance.series_uid, instance.series_number, instance.series_description,
                instance.modality)
        series.instances.append(instance)
    for study in studies.values():
        if len(study.patient_ids) > 1:
            study.problems.append(f"{len(study.patient_ids)} different PatientIDs in one study; "
                                  "XNAT needs one patient per session: split or fix the files")
        for series in study.series.values():
            series.instances.sort(key=lambda i: (i.instance_number is None, i.instance_number or 0,
                                                 i.rel))
    return studies


def _mark_duplicate(entry: FileEntry, earlier: FileEntry, study: Study) -> None:
    assert entry.instance is not None and earlier.instance is not None
    entry.kind = Kind.DUPLICATE
    if _same_content(entry.instance.path, earlier.instance.path):
        entry.reason = f"same SOPInstanceUID and content as {earlier.rel}: sent once"
        return
    entry.reason = f"same SOPInstanceUID as {earlier.rel} but different content"
    study.problems.append(f"{entry.rel} and {earlier.rel} share a SOPInstanceUID but differ; "
                          "remove the wrong one and drop the study again")


def _same_content(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    return _digest(a) == _digest(b)


def _digest(path: Path) -> str:
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


