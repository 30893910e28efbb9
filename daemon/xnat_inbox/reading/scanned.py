"""What the scan finds in a drop: each file's kind, and the DICOM instances grouped into series
and studies. Every later step reads these; only the scan makes them."""

from __future__ import annotations

import os
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
        with held(root.open()) as root_fd:
            fd = open_beneath(root_fd, self.rel, root.path)
        if self.stamp is not None and FileStamp.of(os.fstat(fd)) != self.stamp:
            os.close(fd)
            raise UnsafePath(0, "changed since the drop was scanned (another file, or another "
                             "size or time): not sent", self.rel)
        return os.fdopen(fd, "rb")


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
