"""`xnat-inbox retry`: put drops from failed/ back in line."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

from ..config import InboxConfig, SiteConfig
from ..fsops import TrustedPath, exists, held, is_component, open_entry, rename_noreplace
from ..outcome.finish import outcome_folder
from ..service.state import State


class RetryError(Exception):
    """This path can't be put back; the message says why."""


def requeue(config: SiteConfig, state: State, path: Path, resend_all: bool) -> str:
    """Move a failed drop back to where it arrived; the running daemon picks it up.

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
    if inbox is None or path.parent.parent != inbox.failed:
        raise RetryError(f"{path}: its inbox {record['inbox']} is no longer in the config")
    origin = _inside(inbox, record["origin"])
    try:
        with held(outcome_folder(inbox, False, path.parent.name)) as day, \
                held(TrustedPath(inbox.path, origin.parent.parts).open()) as folder:
            skip = [] if resend_all else _delivered(day, path.name)
            name = _free(folder, origin.name)
            state.request_retry(str(origin.with_name(name)), skip)
            rename_noreplace(day, path.name, folder, name)
            with contextlib.suppress(FileNotFoundError):
                report = f"{path.name}.report.json"
                rename_noreplace(day, report, day, _free(day, f"{report}.retried"))
    except OSError as exc:
        raise RetryError(f"{path}: cannot put it back in {inbox.path / origin.parent}: {exc}"
                         ) from None
    skipped = f", skipping {len(skip)} delivered study(ies)" if skip else ""
    return f"{path} -> {inbox.path / origin.with_name(name)}{skipped}"


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
    candidate, n = name, 0
    while exists(folder, candidate):
        n += 1
        candidate = f"{name}-retry{n}"
    return candidate

