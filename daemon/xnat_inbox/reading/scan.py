"""Step 4, scan + group: classify every file of a claimed drop (headers only, never pixel data)
and group the DICOM ones by StudyInstanceUID, then SeriesInstanceUID."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Generator, Iterator
from pathlib import Path

from ..config import ROUTE_FILE
from ..fsops import FileStamp, TrustedPath, UnsafePath, held, open_entry
from .headers import read_header
from .scanned import FileEntry, Instance, Kind, ScanResult, Series, Study

__all__ = ["FileEntry", "Instance", "Kind", "ScanResult", "Series", "Study", "scan_drop"]

JUNK_NAMES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", ".ds_store", ROUTE_FILE})
JUNK_SUFFIXES = (".log", ".tmp", ".bak", ".lnk")


#: folders nested deeper than this in a drop are not read (the walk holds a descriptor per
#: level: a hostile tree must not exhaust them)
MAX_DEPTH = 256


def scan_drop(root: Path | TrustedPath, ready_marker: str | None = None) -> ScanResult:
    """Classify every file under `root` and group the DICOM instances. A plain `root` is
    trusted as it is (a command's argument); below it nothing is followed through a link.
    UnsafePath when `root` itself is not a folder (e.g. a link put in a drop's place)."""
    trusted = root if isinstance(root, TrustedPath) else TrustedPath(root)
    files: list[FileEntry] = []
    phi: set[str] = set()
    with held(trusted.open()) as root_fd:
        if not stat.S_ISDIR(os.fstat(root_fd).st_mode):
            raise UnsafePath(0, "not a folder", str(trusted.path))
        for rel, info, folder_fd in _walk(root_fd):
            files.append(classify(trusted, rel, info, folder_fd, phi, ready_marker))
    files.sort(key=lambda entry: entry.rel)
    studies = group(files)
    return ScanResult(trusted.path, files, studies, phi)


def _walk(root_fd: int) -> Iterator[tuple[str, os.stat_result, int]]:
    """Every entry below the root (files, links, specials; not folders) with the descriptor of
    its folder, depth first, one descriptor open per level; a sub-folder is opened relative to
    its parent, never through a link, so one swapped for a link meanwhile is reported as a
    link, not read."""
    stack: list[tuple[int, str, Iterator[str]]] = []
    subfolders = yield from _entries(root_fd, "", 0)
    stack.append((os.dup(root_fd), "", iter(subfolders)))
    while stack:
        folder_fd, prefix, pending = stack[-1]
        name = next(pending, None)
        if name is None:
            os.close(folder_fd)
            stack.pop()
            continue
        rel = f"{prefix}{name}"
        try:
            child = open_entry(folder_fd, name, Path(rel), directory=True)
        except UnsafePath:  # swapped for a link since it was listed
            if (info := _lstat(folder_fd, name)) is not None:
                yield rel, info, folder_fd
            continue
        except OSError:
            continue  # unreadable: its files are counted by the finish step's move
        try:
            subfolders = yield from _entries(child, f"{rel}/", len(stack))
        except BaseException:
            os.close(child)
            raise
        stack.append((child, f"{rel}/", iter(subfolders)))
    # (a generator closed early leaves descriptors to the garbage collector: scans never stop)


def _entries(folder_fd: int, prefix: str,
             depth: int) -> Generator[tuple[str, os.stat_result, int], None, list[str]]:
    """Yield the folder's non-folder entries (and folders past MAX_DEPTH); return the names of
    the sub-folders to walk."""
    try:
        entries = sorted(os.scandir(folder_fd), key=lambda entry: entry.name)
    except OSError:
        return []  # an unreadable folder: its files are counted by the finish step's move
    subfolders = []
    for entry in entries:
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue  # gone meanwhile
        if stat.S_ISDIR(info.st_mode) and depth < MAX_DEPTH:
            subfolders.append(entry.name)
        else:
            yield f"{prefix}{entry.name}", info, folder_fd
    return subfolders


def _lstat(folder_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
    except OSError:
        return None


def classify(root: TrustedPath, rel: str, info: os.stat_result, folder_fd: int, phi: set[str],
             ready_marker: str | None = None) -> FileEntry:
    if stat.S_ISDIR(info.st_mode):
        return FileEntry(rel, 0, Kind.SPECIAL, f"a folder nested over {MAX_DEPTH} levels deep: "
                         "not read, kept with the drop")
    if stat.S_ISLNK(info.st_mode):
        return FileEntry(rel, 0, Kind.SYMLINK, "symbolic link: not followed, kept with the drop")
    if not stat.S_ISREG(info.st_mode):
        return FileEntry(rel, 0, Kind.SPECIAL, "not a regular file (FIFO, socket or device): "
                         "not opened, kept with the drop")
    path = root.path / rel
    junk = _junk_reason(path, rel, ready_marker)
    if junk:
        return FileEntry(rel, info.st_size, Kind.JUNK, junk)
    if info.st_size == 0:
        return FileEntry(rel, 0, Kind.NOT_DICOM, "empty file (0 bytes)")
    try:
        fd = open_entry(folder_fd, path.name, path)
    except UnsafePath as exc:
        return FileEntry(rel, 0, Kind.SYMLINK, f"{exc.strerror} (replaced while the drop was "
                         "read), kept with the drop")
    except OSError as exc:
        return FileEntry(rel, info.st_size, Kind.UNREADABLE, f"cannot read: {exc.strerror}")
    with open(fd, "rb") as stream:
        opened = os.fstat(fd)
        try:
            entry = read_header(stream, path, rel, opened.st_size, phi)
        except OSError as exc:
            return FileEntry(rel, info.st_size, Kind.UNREADABLE, f"cannot read: {exc.strerror}")
    if entry.instance is not None:
        entry.instance.root = root
        entry.instance.stamp = FileStamp.of(opened)
    return entry


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
    if _same_content(entry.instance, earlier.instance):
        entry.reason = f"same SOPInstanceUID and content as {earlier.rel}: sent once"
        return
    entry.reason = f"same SOPInstanceUID as {earlier.rel} but different content"
    study.problems.append(f"{entry.rel} and {earlier.rel} share a SOPInstanceUID but differ; "
                          "remove the wrong one and drop the study again")


def _same_content(a: Instance, b: Instance) -> bool:
    if a.size != b.size:
        return False
    return _digest(a) == _digest(b)


def _digest(instance: Instance) -> str:
    with instance.open() as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


