"""Step 8, finish: the drop's originals move to done/ or failed/ (never deleted), with
<drop>.report.json and a readable <drop>.log beside them.

The target is chosen and recorded, with the report and the log, in the drop's work folder
before anything moves; a crash at any point is completed at the next start
(`complete_finish`), so a drop is never left in done/ without its report, nor twice."""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

from ..fsops import fsync_dir
from ..intake.claim import ClaimedDrop, release_area
from ..reading.unpack import UNPACKED
from .safecopy import CopyError, copy_verified

FINISH_FILE = "finish.json"
BESIDE = {"report.json": ".report.json", "drop.log": ".log"}  # work-area name: suffix

# Targets chosen and not moved into yet. Lanes finish in parallel: two drops of the same name
# (from two routing folders) must not both be given the same free name, or the second would
# find it taken, believe it its own completed copy and remove its originals.
_planned: set[Path] = set()
_planned_lock = threading.Lock()


class FinishError(Exception):
    """The drop could not be moved on; it stays in the work area and is resumed later."""


def plan_target(drop: ClaimedDrop, ok: bool, when: datetime) -> Path:
    """Where the originals will go: done/ or failed/YYYY-MM-DD/<name>, a free name."""
    folder = (drop.inbox.done if ok else drop.inbox.failed) / f"{when:%Y-%m-%d}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FinishError(f"cannot create {folder}: {exc.strerror}; the drop stays in the work "
                          "area and is resumed at the next start") from None
    with _planned_lock:
        target = free_name(folder, drop.name)
        _planned.add(target)
    return target


def free_name(folder: Path, name: str) -> Path:
    """`name` in `folder`, with -1, -2, ... when it (or its report) is taken or planned."""
    candidate, n = name, 0
    while folder / candidate in _planned or any(
            os.path.lexists(folder / f"{candidate}{suffix}") for suffix in ("", *BESIDE.values())):
        n += 1
        candidate = f"{name}-{n}"
    return folder / candidate


def reserve_recorded(drop: ClaimedDrop) -> None:
    """At start-up: a finish recorded before a restart keeps its target from new drops."""
    if finish_pending(drop):
        with _planned_lock:
            _planned.add(_recorded_target(drop))


def _release(target: Path) -> None:
    with _planned_lock:
        _planned.discard(target)


def finish(drop: ClaimedDrop, target: Path, report: dict[str, Any], log_lines: list[str]) -> Path:
    """Record the plan, then move the originals and put the report and log beside them."""
    try:
        _write_atomically(drop.area / "report.json", json.dumps(report, indent=2) + "\n")
        _write_atomically(drop.area / "drop.log", "\n".join(log_lines) + "\n")
        _write_atomically(drop.area / FINISH_FILE, json.dumps({"target": str(target)}))
    except OSError as exc:
        _release(target)  # nothing recorded: the next attempt plans afresh
        raise FinishError(f"cannot write the report in {drop.area}: {exc.strerror}; the drop "
                          "stays in the work area and is resumed at the next start") from None
    return complete_finish(drop)


def finish_pending(drop: ClaimedDrop) -> bool:
    return (drop.area / FINISH_FILE).exists()


def complete_finish(drop: ClaimedDrop) -> Path:
    """Carry out a recorded finish; safe to call again after a crash at any point."""
    target = _recorded_target(drop)
    try:
        if os.path.lexists(drop.path):
            if os.path.lexists(target):
                # only a complete, verified copy is ever renamed to the target
                remove(drop.path)
            else:
                _move(drop, target)
        for name, suffix in BESIDE.items():
            if (drop.area / name).exists():
                shutil.move(drop.area / name, target.with_name(target.name + suffix))
    except (OSError, CopyError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise FinishError(f"cannot move {drop.path} to {target}: {why}; the drop stays "
                          "in the work area and is resumed at the next start") from None
    shutil.rmtree(drop.area / UNPACKED, ignore_errors=True)  # our copy of an archive's content
    release_area(drop, FINISH_FILE)
    _release(target)
    return target


def _recorded_target(drop: ClaimedDrop) -> Path:
    return Path(json.loads((drop.area / FINISH_FILE).read_text(encoding="utf-8"))["target"])


def _move(drop: ClaimedDrop, target: Path) -> None:
    try:
        os.rename(drop.path, target)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    # done/ on another file system: copy under a temporary name, verify, rename, and only then
    # remove the source, so a crash at any point leaves at least one complete copy
    partial = target.with_name(f".{target.name}.partial-{drop.id}")
    remove(partial)  # our own unfinished copy from before a crash, if any
    copy_verified(drop.path, partial)
    os.rename(partial, target)
    fsync_dir(target.parent)
    remove(drop.path)


def remove(path: Path) -> None:
    """Remove a file or a folder tree; only ever called on a path with a verified copy."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", errors="backslashreplace") as out:
        # not the setgid share's group nor the umask: only the daemon's own group may read it
        os.fchown(out.fileno(), -1, os.getegid())
        os.fchmod(out.fileno(), 0o640)
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.rename(tmp, path)
