"""Between claim and scan, for archive drops: unpack a .zip, .tar, .tar.gz or .tgz into the
drop's work folder, refusing anything that could escape it (absolute or `..` paths, links,
devices) and anything too big (total bytes, entry count, compression ratio: zip bombs).
The archive itself stays the original that moves to done/ or failed/; the unpacked copy is
ours and is removed once the drop is finished."""

from __future__ import annotations

import errno
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO

from ..config import ArchiveLimits
from ..intake.claim import ClaimedDrop

UNPACKED = "unpacked"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
CHUNK = 1 << 20


class UnpackError(Exception):
    """The archive is unsafe, too big or broken: the drop fails with this reason."""


def unpack(drop: ClaimedDrop, limits: ArchiveLimits) -> Path:
    """Unpack the archive drop into <work>/<id>/unpacked/ and return that folder."""
    target = drop.area / UNPACKED
    if target.exists():
        shutil.rmtree(target)  # our own copy from an attempt cut short
    target.mkdir()
    budget = _Budget(limits, drop.path.stat().st_size, drop.name)
    try:
        if drop.path.name.lower().endswith(".zip"):
            _unzip(drop.path, target, budget)
        else:
            _untar(drop.path, target, budget)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error,
            NotImplementedError, RuntimeError) as exc:
        raise UnpackError(f"{drop.name}: not a readable archive ({exc}); the archive is kept "
                          "in failed/: check it opens, then drop it again") from None
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise  # a full disk passes: the caller retries once there is space
        raise UnpackError(f"{drop.name}: cannot unpack ({exc.strerror}: "
                          f"{Path(exc.filename or '').name}), e.g. two entries with one name"
                          ) from None
    return target


class _Budget:
    """Counts entries and bytes as they are unpacked, against the limits."""

    def __init__(self, limits: ArchiveLimits, archive_bytes: int, name: str) -> None:
        self.limits = limits
        self.name = name
        self.max_bytes = min(limits.max_bytes, max(archive_bytes, 1) * limits.max_ratio)
        self.entries = 0
        self.bytes = 0

    def entry(self) -> None:
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise UnpackError(f"{self.name}: more than {self.limits.max_entries} entries "
                              "(archives.max_entries); split it or raise the limit")

    def add(self, count: int) -> None:
        self.bytes += count
        if self.bytes > self.max_bytes:
            raise UnpackError(
                f"{self.name}: unpacks to more than {self.max_bytes} bytes (archives.max_bytes "
                f"{self.limits.max_bytes}, max_ratio {self.limits.max_ratio:g} times the archive's "
                "size): refused as a possible zip bomb")


def safe_relative(name: str, archive: str) -> PurePosixPath:
    """The entry's path inside the target, or UnpackError if it would land outside it."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or (path.parts and path.parts[0].endswith(":")):
        raise UnpackError(f"{archive}: entry {name!r} has an absolute path: refused "
                          "(it could write outside the work area)")
    if ".." in path.parts:
        raise UnpackError(f"{archive}: entry {name!r} climbs out with '..': refused "
                          "(zip-slip)")
    return path


def _unzip(archive: Path, target: Path, budget: _Budget) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            budget.entry()
            relative = safe_relative(info.filename, archive.name)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise UnpackError(f"{archive.name}: entry {info.filename!r} is a symbolic "
                                  "link: refused (it could point outside the work area)")
            if info.flag_bits & 0x1:
                raise UnpackError(f"{archive.name}: entry {info.filename!r} is encrypted; "
                                  "send an unencrypted archive")
            if info.is_dir():
                (target / relative).mkdir(parents=True, exist_ok=True)
                continue
            with zf.open(info) as source:
                _write(source, target / relative, budget)


def _untar(archive: Path, target: Path, budget: _Budget) -> None:
    with tarfile.open(archive, "r:*") as tf:
        for member in _members(tf):
            budget.entry()
            relative = safe_relative(member.name, archive.name)
            if member.isdir():
                (target / relative).mkdir(parents=True, exist_ok=True)
            elif member.isreg():
                source = tf.extractfile(member)
                assert source is not None
                with source:
                    _write(source, target / relative, budget)
            else:
                kind = "a link" if member.issym() or member.islnk() else "a device or FIFO"
                raise UnpackError(f"{archive.name}: entry {member.name!r} is {kind}: refused "
                                  "(only files and folders are unpacked)")


def _members(tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    member = tf.next()
    while member is not None:
        yield member
        member = tf.next()


def _write(source: IO[bytes], path: Path, budget: _Budget) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "xb") as out:
        while chunk := source.read(CHUNK):
            budget.add(len(chunk))
            out.write(chunk)
