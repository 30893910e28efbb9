"""`xnat-inbox retry`: put drops from failed/ back in line."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

from ..config import InboxConfig, SiteConfig
from ..fsops import TrustedPath, exists, held, is_component, open_entry, rename_noreplace
from ..intake.watch import ARCHIVE_SUFFIXES, is_archive_name
from ..outcome.finish import BESIDE, outcome_folder
from ..service.state import State


class RetryError(Exception):
    """This path can't be put back; the message says why."""


def requeue(config: SiteConfig, state: State, path: Path, resend_all: bool) -> str:
    """Move a failed drop (a folder or an archive) back to where it arrived; the running daemon
    picks it up. Its report and log stay in failed/, renamed alike to `.retried`.

    Only what the daemon itself put in failed/ (its state database says so) is moved, and
    only back into the folder it came from inside its inbox. Studies its report shows as
    delivered are skipped unless `resend_all`."""
    path = Path(os.path.abspath(path))
    record = state.finished_drop(str(path))
    if record is None or record["outcome"] != "failed":
        raise RetryError(f"{path} is not a drop this daemon put in failed/ (its state database "
                         "has no such drop); retry takes only drops it moved there itself, e.g. "
                         f"{config.inboxes[0].failed}/YYYY-MM-DD/<drop>")
    inbox = next((i for i in config.inboxes if str(i.path) == record["inbox"]), None)
    if inbox is None or inbox.failed not in path.parents:
        raise RetryError(f"{path}: its inbox {record['inbox']} is no longer in the config")
    where = path.parent.relative_to(inbox.failed).parts  # its day and routing folders
    origin = _inside(inbox, record["origin"])
    try:
        with held(outcome_folder(inbox, False, *where)) as day, \
                held(TrustedPath(inbox.path, origin.parent.parts).open()) as folder:
            skip = [] if resend_all else _delivered(day, path.name)
            name = _free(folder, origin.name)
            state.request_retry(str(origin.with_name(name)), skip)
            rename_noreplace(day, path.name, folder, name)
            _set_aside_beside(day, path.name)
    except OSError as exc:
        raise RetryError(f"{path}: cannot put it back in {inbox.path / origin.parent}: {exc}"
                         ) from None
    skipped = f", skipping {len(skip)} delivered study(ies)" if skip else ""
    return f"{path} -> {inbox.path / origin.with_name(name)}{skipped}"


def _set_aside_beside(day: int, name: str) -> None:
    """The drop's report and log get the same `.retried` suffix (`.retried-retry1`, ... when
    it was retried before), so the next attempt's pair takes their names and these stay
    together."""
    beside = [f"{name}{suffix}" for suffix in BESIDE.values() if exists(day, f"{name}{suffix}")]
    suffix, n = ".retried", 0
    while any(exists(day, f"{entry}{suffix}") for entry in beside):
        n += 1
        suffix = f".retried-retry{n}"
    for entry in beside:
        with contextlib.suppress(FileNotFoundError):
            rename_noreplace(day, entry, day, f"{entry}{suffix}")


def _inside(inbox: InboxConfig, origin: str) -> PurePosixPath:
    """The drop's origin as recorded at claim time, relative to its inbox."""
    relative = PurePosixPath(origin)
    if relative.is_absolute() or not relative.parts or \
            any(not is_component(part) for part in relative.parts):
        raise RetryError(f"its recorded origin {origin!r} is not a path inside {inbox.path}")
    return relative


def _delivered(day: int, name: str) -> list[str]:
    """StudyInstanceUIDs the report beside the drop shows as delivered."""
    try:
        with held(open_entry(day, f"{name}.report.json", Path(name))) as fd:
            report: dict[str, Any] = json.loads(os.read(fd, 1 << 26).decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise RetryError(f"{name}: no readable report beside it ({exc})") from None
    return [s["study_instance_uid"] for s in report["studies"] if s["delivered"]]


def _free(folder: int, name: str) -> str:
    """`name`, or `name-retry1`, ... when taken; an archive keeps its suffix last
    (`z1-retry1.zip`), so it is still taken for an archive."""
    stem, suffix = name, ""
    if is_archive_name(name):
        suffix = next(s for s in ARCHIVE_SUFFIXES if name.lower().endswith(s))
        stem, suffix = name[:-len(suffix)], name[-len(suffix):]
    candidate, n = name, 0
    while exists(folder, candidate):
        n += 1
        candidate = f"{stem}-retry{n}{suffix}"
    return candidate

