"""Between claim and scan, for archive drops: unpack a .zip, .tar, .tar.gz or .tgz into the
drop's work folder, refusing anything that could escape it (absolute or `..` paths, links,
devices) and anything too big (total bytes, entry count, compression ratio: zip bombs; a tar
name or pax header of a huge claimed size, which tarfile would read into memory at once).
The archive itself stays the original that moves to done/ or failed/; the unpacked copy is
ours and is removed once the drop is finished. It runs in a scan worker (scan_workers.py),
under that worker's memory limit."""

from __future__ import annotations

import errno
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from tarfile import GNUTYPE_SPARSE, XGLTYPE
from typing import IO

from ..config import ArchiveLimits

UNPACKED = "unpacked"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
CHUNK = 1 << 20
#: bytes of GNU long-name/long-link and pax headers before one tar entry, and of global pax
#: headers in all: a path is at most a few KB, a pax header a few hundred bytes
MAX_TAR_HEADER_BYTES = 1 << 20
TAR_HEADER_KINDS = {tarfile.GNUTYPE_LONGNAME: "GNU long-name", tarfile.GNUTYPE_LONGLINK:
                    "GNU long-link", tarfile.XHDTYPE: "pax", tarfile.SOLARIS_XHDTYPE: "pax",
                    tarfile.XGLTYPE: "global pax"}


class UnpackError(Exception):
    """The archive is unsafe, too big or broken: the drop fails with this reason."""


def unpack(archive: Path, target: Path, limits: ArchiveLimits) -> Path:
    """Unpack the archive drop into `target` (<work>/<id>/unpacked/) and return it."""
    if target.exists():
        shutil.rmtree(target)  # our own copy from an attempt cut short
    target.mkdir()
    budget = _Budget(limits, archive.stat().st_size, archive.name)
    try:
        if archive.name.lower().endswith(".zip"):
            _unzip(archive, target, budget)
        else:
            _untar(archive, target, budget)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error,
            NotImplementedError, RuntimeError) as exc:
        raise UnpackError(f"{archive.name}: not a readable archive ({exc}); the archive is kept "
                          "in failed/: check it opens, then drop it again") from None
    except MemoryError:
        raise UnpackError(f"{archive.name}: unpacking it needs more memory than a scan worker "
                          "may use (scan_memory_limit): refused as a possible archive bomb"
                          ) from None
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise  # a full disk passes: the caller retries once there is space
        raise UnpackError(f"{archive.name}: cannot unpack ({exc.strerror}: "
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
    try:
        with _BoundedTarFile.open(archive, "r:*") as tf:
            for member in _members(tf):
                _untar_member(tf, member, archive, target, budget)
    except _HeaderRefused as exc:
        raise UnpackError(f"{archive.name}: {exc}") from None


def _untar_member(tf: tarfile.TarFile, member: tarfile.TarInfo, archive: Path, target: Path,
                  budget: _Budget) -> None:
    budget.entry()
    if member.sparse is not None:
        raise UnpackError(f"{archive.name}: entry {member.name!r} is a GNU sparse file: refused "
                          "(make the archive without --sparse)")
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


def _members(tf: _BoundedTarFile) -> Iterator[tarfile.TarInfo]:
    member = tf.next()
    while member is not None:
        yield member
        tf.entry_header_bytes = 0  # the next entry's long names and pax headers count afresh
        member = tf.next()


class _BoundedTarFile(tarfile.TarFile):
    """A TarFile whose entries' extended headers are checked before they are read."""

    entry_header_bytes = 0
    global_header_bytes = 0


class _HeaderRefused(Exception):
    """A tar header refused before tarfile reads it; _untar names the archive."""


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads a long-name or pax header's claimed size into memory at once (a 1 MB
    .tar.gz can claim gigabytes): their sizes are checked here first, in TarInfo's
    dispatch of each header block (private to tarfile, and stable since Python 3.2)."""

    def _proc_member(self, tf: _BoundedTarFile) -> tarfile.TarInfo:
        kind = TAR_HEADER_KINDS.get(self.type)
        if kind is not None:
            size = self._block(self.size)
            if self.type == XGLTYPE:
                tf.global_header_bytes += size
            else:
                tf.entry_header_bytes += size
            if max(tf.entry_header_bytes, tf.global_header_bytes) > MAX_TAR_HEADER_BYTES:
                raise _HeaderRefused(
                    f"the entry at byte {self.offset} has a {kind} header of {self.size} "
                    f"bytes, more than the {MAX_TAR_HEADER_BYTES} bytes a name or pax header "
                    "may take: refused as a tar header bomb")
        elif self.type == GNUTYPE_SPARSE:
            self._refuse_sparse()
        return super()._proc_member(tf)  # type: ignore[misc]

    def _refuse_sparse(self, *_: object) -> None:
        raise _HeaderRefused(f"the entry at byte {self.offset} is a GNU sparse file: refused "
                             "(make the archive without --sparse)")

    # pax's GNU sparse maps (version 1.0 reads one number per line for as long as it claims)
    _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _refuse_sparse


_BoundedTarFile.tarinfo = _BoundedTarInfo


def _write(source: IO[bytes], path: Path, budget: _Budget) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "xb") as out:
        while chunk := source.read(CHUNK):
            budget.add(len(chunk))
            out.write(chunk)
