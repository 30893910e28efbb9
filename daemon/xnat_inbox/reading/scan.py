"""Step 4, scan + group: classify every file of a claimed drop (headers only, never pixel data)
and group the DICOM ones by StudyInstanceUID, then SeriesInstanceUID."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from ..config import ROUTE_FILE
from .headers import read_header
from .scanned import FileEntry, Instance, Kind, ScanResult, Series, Study

__all__ = ["FileEntry", "Instance", "Kind", "ScanResult", "Series", "Study", "scan_drop"]

JUNK_NAMES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", ".ds_store", ROUTE_FILE})
JUNK_SUFFIXES = (".log", ".tmp", ".bak", ".lnk")


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
        return read_header(path, rel, info.st_size, phi)
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


