"""Copy a drop's tree to another file system and prove the copy complete before anything is
removed: regular files byte for byte (sha256 compared), links as links, FIFOs as FIFOs."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from ..fsops import fsync_dir

CHUNK = 1 << 20


class CopyError(Exception):
    """The copy differs from its source; the source is kept."""


def copy_verified(source: Path, target: Path) -> None:
    """Copy a folder tree, or a single file (an archive drop), verifying every file."""
    if not source.is_dir() or source.is_symlink():
        _copy_entry(source, target)
        fsync_dir(target.parent)
        return
    target.mkdir(mode=0o755)
    for dirpath, dirnames, filenames in os.walk(source):
        here = Path(dirpath)
        there = target / here.relative_to(source)
        for name in dirnames:
            path = here / name
            if os.path.islink(path):
                os.symlink(os.readlink(path), there / name)
            else:
                (there / name).mkdir(mode=stat.S_IMODE(os.lstat(path).st_mode) | 0o700)
        for name in filenames:
            _copy_entry(here / name, there / name)
        fsync_dir(there)


def _copy_entry(source: Path, target: Path) -> None:
    info = os.lstat(source)
    if stat.S_ISLNK(info.st_mode):
        os.symlink(os.readlink(source), target)
    elif stat.S_ISFIFO(info.st_mode):
        os.mkfifo(target, stat.S_IMODE(info.st_mode))
    elif stat.S_ISREG(info.st_mode):
        written = _copy_file(source, target, stat.S_IMODE(info.st_mode))
        if written != sha256(target):
            raise CopyError(f"{target} differs from {source} after copying")
    else:
        raise CopyError(f"{source} is a socket or device file; it can't be copied, so the drop "
                        "stays in the work area: move it by hand")


def _copy_file(source: Path, target: Path, mode: int) -> str:
    digest = hashlib.sha256()
    with open(source, "rb") as reader, open(target, "xb") as writer:
        while chunk := reader.read(CHUNK):
            digest.update(chunk)
            writer.write(chunk)
        writer.flush()
        os.fsync(writer.fileno())
    os.chmod(target, mode)
    return digest.hexdigest()


def sha256(path: Path) -> str:
    with open(path, "rb") as reader:
        return hashlib.file_digest(reader, "sha256").hexdigest()
