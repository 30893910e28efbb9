"""What the scan finds in a drop: each file's kind, and the DICOM instances grouped into series
and studies. Every later step reads these; only the scan makes them."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from ..fsops import FileStamp, TrustedPath, UnsafePath, held, open_beneath


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
    root: TrustedPath | None = None  # the drop's folder the scan read it from
    stamp: FileStamp | None = None  # the file as the scan read it

    def open(self) -> BinaryIO:
        """The file the scan read, opened again below the drop's folder without following a
        link; UnsafePath if it is no longer that file (replaced, or changed in size or time)."""
        root = self.root or TrustedPath(self.path.parents[len(Path(self.rel).parts) - 1])
        root_fd = _held.get(root)
        if root_fd is None:
            with held(root.open()) as fd:
                return self._open_below(fd, root)
        return self._open_below(root_fd, root)

    def _open_below(self, root_fd: int, root: TrustedPath) -> BinaryIO:
        fd, info = open_beneath(root_fd, self.rel, root.path)
        if self.stamp is not None and FileStamp.of(info) != self.stamp:
            os.close(fd)
            raise UnsafePath(0, "changed since the drop was scanned (another file, or another "
                             "size or time): not sent", self.rel)
        return os.fdopen(fd, "rb")


#: drops' folders held open while they are delivered (see holding)
_held: dict[TrustedPath, int] = {}
_held_lock = threading.Lock()


@contextlib.contextmanager
def holding(roots: Iterable[TrustedPath]) -> Iterator[None]:
    """Keep the drop's folders open while it is delivered, so each file is opened below its
    folder (a few system calls) rather than walked to from the inbox (a dozen, ≈90 µs)."""
    opened: dict[TrustedPath, int] = {}
    try:
        for root in set(roots):
            opened[root] = root.open()
        with _held_lock:
            _held.update(opened)
        yield
    finally:
        with _held_lock:
            for root in opened:
                _held.pop(root, None)
        for fd in opened.values():
            os.close(fd)


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
    #: (library module, message): warnings a scan worker collected, for the daemon to log once
    #: the drop's PHI values are known. Log lines, not what the drop holds: left out of ==, so
    #: a scan in a worker equals the same scan in-process
    warnings: list[tuple[str, str]] = field(default_factory=list, compare=False)

    def of_kind(self, *kinds: Kind) -> list[FileEntry]:
        return [entry for entry in self.files if entry.kind in kinds]

    def counts(self) -> dict[str, int]:
        """How many files of each kind, in the order of Kind."""
        counts = {kind.value: len(self.of_kind(kind)) for kind in Kind}
        return {kind: count for kind, count in counts.items() if count}
