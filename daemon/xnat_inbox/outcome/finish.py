"""Step 8, finish: the drop's originals move to done/ or failed/ (never deleted), with
<drop>.report.json and a readable <drop>.log beside them.

The target is chosen and recorded, with the report and the log, in the drop's work folder
before anything moves; a crash at any point is completed at the next start
(`complete_finish`), so a drop is never left in done/ without its report, nor twice.

done/ and failed/ are the daemon's own folders: made by it, readable by the inbox's group,
writable by nobody else, checked through directory handles before every move. Nothing is
ever renamed over something already there, and an original is removed only once its copy in
done/ or failed/ is proven to be ours and complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

from ..config import InboxConfig
from ..fsops import (
    OWN_DIR_MODE,
    UnsafePath,
    check_own_folder,
    exists,
    fsync_dir,
    held,
    is_component,
    open_entry,
    own_folder,
    own_folders,
    rename_noreplace,
)
from ..intake.claim import ClaimedDrop, release_area
from ..reading.unpack import UNPACKED
from .safecopy import CopyError, copy_verified

FINISH_FILE = "finish.json"
#: written once a copy across file systems is complete and verified: the source may go
COPIED_FILE = "copied.json"
BESIDE = {"report.json": ".report.json", "drop.log": ".log"}  # work-area name: suffix
#: the report and log beside the originals: the daemon's group may read them, nobody else
REPORT_MODE = 0o640

# Targets chosen and not moved into yet. Lanes finish in parallel: two drops of the same name
# (from two routing folders) must not both be given the same free name.
_planned: set[Path] = set()
_planned_lock = threading.Lock()


class FinishError(Exception):
    """The drop could not be moved on; it stays in the work area and is resumed later."""


def outcome_folder(inbox: InboxConfig, ok: bool, *parts: str) -> int:
    """A descriptor of done/ or failed/ (or of the folders `parts` below it: a day, and the
    routing folders a drop came from), each made if missing; UnsafePath if someone else made
    or replaced one of them."""
    folder = inbox.done if ok else inbox.failed
    names = [folder.name, *parts]
    return own_folders(folder.parent, names, (OWN_DIR_MODE,) * len(names), evict=True)


def outcome_of(inbox: InboxConfig, target: Path) -> bool | None:
    """Whether `target` lies in the inbox's done/ (True) or failed/ (False), or neither."""
    tops = [(top, ok) for top, ok in ((inbox.done, True), (inbox.failed, False))
            if top in target.parents]
    return max(tops, key=lambda pair: len(pair[0].parts))[1] if tops else None


def plan_target(drop: ClaimedDrop, ok: bool, when: datetime) -> Path:
    """Where the originals will go: done/ or failed/YYYY-MM-DD/<routing folders>/<name>, a
    free name. The routing folders the drop came from (below the inbox) are kept, so that
    drops of one name from two routing folders stay apart and say where they came from."""
    day = f"{when:%Y-%m-%d}"
    folder = (drop.inbox.done if ok else drop.inbox.failed) / day
    try:
        with _planned_lock:
            fd = outcome_folder(drop.inbox, ok, day)
            with contextlib.ExitStack() as stack:
                for part in drop.origin.relative_to(drop.inbox.path).parts:
                    stack.callback(os.close, fd)
                    name = _routing_name(fd, folder, part)
                    fd = own_folder(fd, name, folder / name)
                    folder = folder / name
                stack.callback(os.close, fd)
                target = folder / free_name(fd, folder, drop.name)
                _planned.add(target)
    except OSError as exc:
        raise FinishError(f"cannot use {folder}: {_why(exc)}; the drop stays in the work area "
                          "and is resumed at the next start") from None
    return target


def _routing_name(folder_fd: int, folder: Path, name: str) -> str:
    """The name for a routing folder in a folder of done/ or failed/: `name`, unless a drop
    (its originals, report or log, or one planned) or anything not our own folder holds it;
    then `name-1`, `name-2`, ... (called with _planned_lock held)."""
    candidate, n = name, 0
    while not _routing_folder_usable(folder_fd, folder, candidate):
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def _routing_folder_usable(folder_fd: int, folder: Path, name: str) -> bool:
    if folder / name in _planned or any(exists(folder_fd, f"{name}{suffix}")
                                        for suffix in BESIDE.values()):
        return False
    if not exists(folder_fd, name):
        return True
    try:
        with held(open_entry(folder_fd, name, folder / name, directory=True)) as fd:
            check_own_folder(fd, folder / name)
    except OSError:  # a drop's originals (a file, or a folder its sender owns)
        return False
    return True


def free_name(folder_fd: int, folder: Path, name: str) -> str:
    """`name` in the folder, with -1, -2, ... when it (or its report) is taken or planned."""
    candidate, n = name, 0
    while folder / candidate in _planned or any(
            exists(folder_fd, f"{candidate}{suffix}") for suffix in ("", *BESIDE.values())):
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def reserve_recorded(drop: ClaimedDrop) -> None:
    """At start-up: a finish recorded before a restart keeps its target from new drops."""
    if finish_pending(drop):
        with contextlib.suppress(FinishError, OSError, ValueError, KeyError), _planned_lock:
            _planned.add(_recorded_target(drop))


def _release(target: Path) -> None:
    with _planned_lock:
        _planned.discard(target)


def finish(drop: ClaimedDrop, target: Path, report: dict[str, Any], log_lines: list[str]) -> Path:
    """Record the plan, then move the originals and put the report and log beside them."""
    try:
        with held(drop.in_area().open()) as area:
            _write_atomically(area, "report.json", json.dumps(report, indent=2) + "\n")
            _write_atomically(area, "drop.log", "\n".join(log_lines) + "\n")
            _write_atomically(area, FINISH_FILE, json.dumps({"target": str(target)}))
    except OSError as exc:
        _release(target)  # nothing recorded: the next attempt plans afresh
        raise FinishError(f"cannot write the report in {drop.area}: {_why(exc)}; the drop "
                          "stays in the work area and is resumed at the next start") from None
    return complete_finish(drop)


def finish_pending(drop: ClaimedDrop) -> bool:
    return os.path.lexists(drop.area / FINISH_FILE)


def complete_finish(drop: ClaimedDrop) -> Path:
    """Carry out a recorded finish; safe to call again after a crash at any point."""
    target = _recorded_target(drop)
    try:
        with held(drop.in_area().open()) as area, \
                held(_target_folder(drop, target)) as day:
            if exists(area, drop.name):
                target = _move_originals(drop, area, day, target)
            for name, suffix in BESIDE.items():
                if exists(area, name):
                    _move_beside(area, name, day, target.name + suffix)
            fsync_dir(day)
            if exists(area, UNPACKED):  # our copy of an archive's content
                shutil.rmtree(UNPACKED, dir_fd=area)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(COPIED_FILE, dir_fd=area)
    except (OSError, CopyError) as exc:
        raise FinishError(f"cannot move {drop.path} to {target}: {_why(exc)}; the drop stays "
                          "in the work area and is resumed at the next start") from None
    release_area(drop, FINISH_FILE)
    _release(target)
    return target


def _move_originals(drop: ClaimedDrop, area: int, day: int, target: Path) -> Path:
    """Rename the originals into the day folder (never over anything); the target actually
    used, a new free name when the planned one was taken meanwhile by anything not ours."""
    if exists(day, target.name):
        if _copied_to(area) == target.name:
            _remove(area, drop.name)  # the verified copy is there: what a crash left to do
            return target
        target = _replan(drop, area, day, target)
    try:
        rename_noreplace(area, drop.name, day, target.name)
        return target
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    # done/ on another file system: copy under a temporary name, verify, rename, record, and
    # only then remove the source, so a crash at any point leaves at least one complete copy
    partial = f".{target.name}.partial-{drop.id}"
    _remove(day, partial)  # our own unfinished copy from before a crash, if any
    copy_verified(_through(area, drop.name), _through(day, partial))
    rename_noreplace(day, partial, day, target.name)
    fsync_dir(day)
    _write_atomically(area, COPIED_FILE, json.dumps({"target": target.name}))
    _remove(area, drop.name)
    return target


def _move_beside(area: int, name: str, day: int, target: str) -> None:
    """The report or log into the day folder: renamed, or copied when done/ is on another
    file system (a crash between copy and unlink leaves the same bytes twice, never none)."""
    try:
        rename_noreplace(area, name, day, target)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    with held(os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=area)) as fd, \
            open(fd, "rb", closefd=False) as source:
        _write_bytes(day, target, source.read())
    os.unlink(name, dir_fd=area)


def _replan(drop: ClaimedDrop, area: int, day: int, taken: Path) -> Path:
    """The planned name was taken by something the daemon did not put there: never remove
    the originals for it; choose another name and record it before moving."""
    with _planned_lock:
        target = taken.parent / free_name(day, taken.parent, drop.name)
        _planned.add(target)
    _release(taken)
    _write_atomically(area, FINISH_FILE, json.dumps({"target": str(target)}))
    return target


def _recorded_target(drop: ClaimedDrop) -> Path:
    """The recorded target, believed only inside this inbox's done/ or failed/."""
    with held(drop.in_area(FINISH_FILE).open()) as fd:
        target = Path(json.loads(os.read(fd, 1 << 16).decode("utf-8"))["target"])
    ok = outcome_of(drop.inbox, target)
    parts = () if ok is None else target.relative_to(
        drop.inbox.done if ok else drop.inbox.failed).parts
    if len(parts) < 2 or not all(is_component(part) for part in parts):
        raise FinishError(f"{drop.area / FINISH_FILE}: its target {target} is not in this "
                          "inbox's done/ or failed/; left for a person")
    return target


def _target_folder(drop: ClaimedDrop, target: Path) -> int:
    """A descriptor of the recorded target's folder (its day and routing folders), each of
    them the daemon's own."""
    ok = outcome_of(drop.inbox, target)
    assert ok is not None  # _recorded_target checked it
    top = drop.inbox.done if ok else drop.inbox.failed
    return outcome_folder(drop.inbox, ok, *target.parent.relative_to(top).parts)


def _copied_to(area: int) -> str | None:
    try:
        fd = os.open(COPIED_FILE, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=area)
    except FileNotFoundError:
        return None
    with held(fd):
        return str(json.loads(os.read(fd, 1 << 16).decode("utf-8"))["target"])


def _through(dir_fd: int, name: str) -> Path:
    """A path to `name` in the folder held by `dir_fd` that no rename of the folders above it
    can redirect (the kernel resolves the descriptor itself)."""
    return Path(f"/proc/self/fd/{dir_fd}") / name


def _remove(dir_fd: int, name: str) -> None:
    """Remove a file or folder tree in a folder of ours; only ever called on a path with a
    verified copy, or on our own unfinished copy."""
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def _write_atomically(dir_fd: int, name: str, text: str) -> None:
    _write_bytes(dir_fd, name, text.encode("utf-8", errors="backslashreplace"))


def _write_bytes(dir_fd: int, name: str, data: bytes) -> None:
    """`name` in the folder holds `data`, complete or not at all; only the daemon writes it."""
    tmp = f"{name}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dir_fd)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 REPORT_MODE, dir_fd=dir_fd)
    os.fchmod(fd, REPORT_MODE)  # exactly, whatever the umask
    with open(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def _why(exc: BaseException) -> str:
    if isinstance(exc, UnsafePath):
        return str(exc)
    return exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)
