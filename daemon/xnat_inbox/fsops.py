"""File-system primitives for folders other people can write to.

An inbox is a share its users write into: they may rename, replace or link anything in it at
any moment. So below a path the site configured, nothing is opened by path: each component is
opened relative to the folder before it, never through a symbolic link (O_NOFOLLOW), and the
daemon's own folders are accepted only when they are its own (owner, type, mode).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .logs import get_logger

#: a folder, never through a link
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: a file, never through a link; O_NONBLOCK so a FIFO put in a file's place can't hang the open
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: the daemon's own folders: only the daemon may write in them
OWN_DIR_MODE = 0o750
PRIVATE_DIR_MODE = 0o700
_RENAME_NOREPLACE = 1

log = get_logger(step="files")


class UnsafePath(OSError):
    """A path is not what it must be (a link, someone else's folder, a swapped file)."""

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}" if self.filename else str(self.strerror)


@dataclass(frozen=True)
class FileStamp:
    """What identifies a file's content as the scan saw it."""

    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, info: os.stat_result) -> FileStamp:
        return cls(info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


@dataclass(frozen=True)
class TrustedPath:
    """`base` (a path the site configured, trusted as it is) and the components below it,
    each opened without following links; the first `owned` must be the daemon's own folders.
    Picklable, so a worker process can open it too."""

    base: Path
    parts: tuple[str, ...] = ()
    owned: int = 0

    @property
    def path(self) -> Path:
        return self.base.joinpath(*self.parts)

    def child(self, *names: str) -> TrustedPath:
        return TrustedPath(self.base, (*self.parts, *names), self.owned)

    def open(self) -> int:
        """A descriptor of the folder or regular file at the end; UnsafePath if a component is
        a link, or one of the owned folders is not the daemon's own."""
        fd = os.open(self.base, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if self.parts else 0))
        try:
            for index, name in enumerate(self.parts):
                last = index == len(self.parts) - 1
                where = self.base.joinpath(*self.parts[:index + 1])
                following = open_entry(fd, name, where, directory=not last)
                os.close(fd)
                fd = following
                if index < self.owned:
                    check_own_folder(fd, where)
            if not self.parts:
                info = os.fstat(fd)
                if not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
                    raise UnsafePath(errno.EINVAL, "not a folder or a regular file", str(self.base))
        except BaseException:
            os.close(fd)
            raise
        return fd


def open_entry(dir_fd: int, name: str, where: Path, directory: bool = False) -> int:
    """`name` in the folder `dir_fd`: a folder, or (directory=False) a folder or regular file;
    never a link, FIFO, socket or device."""
    if not is_component(name):
        raise UnsafePath(errno.EINVAL, "not a single file name", str(where))
    try:
        fd = os.open(name, DIR_FLAGS if directory else FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(dir_fd, name):
            raise UnsafePath(errno.ELOOP, "a symbolic link: not followed", str(where)) from None
        raise
    info = os.fstat(fd)
    if not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
        os.close(fd)
        raise UnsafePath(errno.EINVAL, "not a folder or a regular file", str(where))
    return fd


def open_beneath(root_fd: int, rel: str, root: Path) -> tuple[int, os.stat_result]:
    """The regular file at `rel` below the folder `root_fd`, every component opened without
    following a link, and its status (one fstat: the hot path of every send)."""
    parts = rel.split("/")
    if not all(is_component(part) for part in parts):
        raise UnsafePath(errno.EINVAL, "not a path below the drop's folder", str(root / rel))
    folder, opened = root_fd, []
    try:
        for index, name in enumerate(parts):
            last = index == len(parts) - 1
            try:
                fd = os.open(name, FILE_FLAGS if last else DIR_FLAGS, dir_fd=folder)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(folder, name):
                    raise UnsafePath(errno.ELOOP, "a symbolic link: not followed",
                                     str(root.joinpath(*parts[:index + 1]))) from None
                raise
            opened.append(fd)
            folder = fd
    except BaseException:
        for fd in opened:
            os.close(fd)
        raise
    for fd in opened[:-1]:
        os.close(fd)
    info = os.fstat(opened[-1])
    if not stat.S_ISREG(info.st_mode):
        os.close(opened[-1])
        raise UnsafePath(errno.EINVAL, "not a regular file", str(root / rel))
    return opened[-1], info


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def is_component(name: str) -> bool:
    """A single file name: not empty, not `.` or `..`, no `/` and no NUL."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


def check_own_folder(fd: int, where: Path) -> None:
    """The daemon's own folder: a folder it owns that nobody else may write into. One it owns
    but left writable to others (made by an older version under a lax umask) is tightened."""
    info = os.fstat(fd)
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafePath(errno.ENOTDIR, "not a folder", str(where))
    if info.st_uid != os.geteuid():
        raise UnsafePath(errno.EPERM, f"not the daemon's own folder (owner uid {info.st_uid}, "
                         f"the daemon runs as uid {os.geteuid()}); someone else made or replaced "
                         "it: move it away, the daemon creates its own", str(where))
    if info.st_mode & 0o022:
        os.fchmod(fd, stat.S_IMODE(info.st_mode) & ~0o022)


def own_folder(dir_fd: int, name: str, where: Path, mode: int = OWN_DIR_MODE,
               evict: bool = False) -> int:
    """The daemon's own folder `name` in `dir_fd`, created (with exactly `mode`) if missing;
    never a folder or link someone else put there. With `evict`, such an impostor is renamed
    aside (hidden, so it is never taken for a drop) and a folder of our own made in its place."""
    with contextlib.suppress(FileExistsError):
        return _make_own(dir_fd, name, where, mode)
    try:
        fd = open_entry(dir_fd, name, where, directory=True)
        try:
            check_own_folder(fd, where)
        except BaseException:
            os.close(fd)
            raise
        return fd
    except UnsafePath as exc:
        if not evict:
            raise
        stamp = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(2)}"
        aside = f".{name.lstrip('.')}.not-ours-{stamp}"
        rename_noreplace(dir_fd, name, dir_fd, aside)
        log.warning("found something else in the place of one of the daemon's own folders: "
                    "set it aside, made its own", path=str(where), set_aside_as=aside,
                    reason=exc.strerror)
        return _make_own(dir_fd, name, where, mode)


def _make_own(dir_fd: int, name: str, where: Path, mode: int) -> int:
    os.mkdir(name, mode, dir_fd=dir_fd)
    fd = open_entry(dir_fd, name, where, directory=True)
    os.fchmod(fd, mode | (os.fstat(fd).st_mode & stat.S_ISGID))  # not narrowed by umask
    return fd


def own_folders(base: Path, names: Sequence[str], modes: Sequence[int] = (),
                evict: bool = False) -> int:
    """The descriptor of base/names[0]/names[1]/…, each the daemon's own, made as needed.
    `evict`: set aside what stands in the first one's place (see own_folder)."""
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for index, name in enumerate(names):
            mode = modes[index] if index < len(modes) else OWN_DIR_MODE
            following = own_folder(fd, name, base.joinpath(*names[:index + 1]), mode,
                                   evict=evict and index == 0)
            os.close(fd)
            fd = following
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def held(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def rename_noreplace(src_fd: int, src: str, dst_fd: int, dst: str) -> None:
    """Rename without ever replacing what is at the target (FileExistsError instead)."""
    libc = _libc()
    if libc is not None:
        result = libc.renameat2(src_fd, os.fsencode(src), dst_fd, os.fsencode(dst),
                                _RENAME_NOREPLACE)
        if result == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), dst)
    # a file system without RENAME_NOREPLACE: the target folder is the daemon's own, so
    # nobody else can create the name between the check and the rename
    if exists(dst_fd, dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)


def exists(dir_fd: int, name: str) -> bool:
    """Whether anything (a link too) is called `name` in the folder `dir_fd`."""
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


_LIBC: ctypes.CDLL | bool | None = False


def _libc() -> ctypes.CDLL | None:
    global _LIBC
    if _LIBC is False:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                                       ctypes.c_char_p, ctypes.c_uint]
            _LIBC = libc
        except (OSError, AttributeError):
            _LIBC = None
    return _LIBC  # type: ignore[return-value]


def fsync_dir(path: Path | int) -> None:
    """Make a rename or a new entry in the folder (a path or a descriptor) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY) if isinstance(path, Path) else os.dup(path)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
