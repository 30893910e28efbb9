"""Step 8, finish: the drop's originals move to done/ or failed/ (never deleted), with
<drop>.report.json and a readable <drop>.log beside them."""

from __future__ import annotations

import errno
import json
import os
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

from .claim import ClaimedDrop, mark_moved, release_area
from .safecopy import CopyError, copy_verified, fsync_dir


class FinishError(Exception):
    """The drop could not be moved on; it stays in the work area and is resumed later."""


def destination_folder(drop: ClaimedDrop, ok: bool, when: datetime) -> Path:
    base = drop.inbox.done if ok else drop.inbox.failed
    return base / f"{when:%Y-%m-%d}"


def free_name(folder: Path, name: str) -> Path:
    """`name` in `folder`, with -1, -2, ... when it (or its report) is taken."""
    candidate, n = name, 0
    while any(os.path.lexists(folder / f"{candidate}{suffix}")
              for suffix in ("", ".report.json", ".log")):
        n += 1
        candidate = f"{name}-{n}"
    return folder / candidate


def move_originals(drop: ClaimedDrop, ok: bool, when: datetime) -> Path:
    folder = destination_folder(drop, ok, when)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        target = free_name(folder, drop.name)
        _move(drop, target)
    except (OSError, CopyError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise FinishError(f"cannot move {drop.path} to {folder}: {why}; the drop stays "
                          "in the work area and is resumed at the next start") from None
    release_area(drop)
    return target


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
    if os.path.lexists(partial):
        shutil.rmtree(partial)  # our own unfinished copy from before a crash
    copy_verified(drop.path, partial)
    os.rename(partial, target)
    fsync_dir(target.parent)
    mark_moved(drop, target)
    shutil.rmtree(drop.path)


def write_beside(target: Path, report: dict[str, Any], log_lines: list[str]) -> tuple[Path, Path]:
    report_path = target.with_name(target.name + ".report.json")
    log_path = target.with_name(target.name + ".log")
    _write_atomically(report_path, json.dumps(report, indent=2) + "\n")
    _write_atomically(log_path, "\n".join(log_lines) + "\n")
    return report_path, log_path


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", errors="backslashreplace") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.rename(tmp, path)
