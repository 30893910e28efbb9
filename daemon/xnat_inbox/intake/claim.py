"""Step 3, claim: a ready drop is renamed into the inbox's work area before anything reads it,
so late writes can't mix into a send in flight (they form a new drop instead)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ..config import InboxConfig
from ..fsops import fsync_dir
from .watch import DropRef, loose_files

CLAIM_FILE = "claim.json"


class ClaimError(Exception):
    """The drop could not be moved into the work area; it stays where it is."""


@dataclass(frozen=True)
class ClaimedDrop:
    id: str
    inbox: InboxConfig
    origin: Path  # the routing folder the drop came from
    name: str  # the drop's name as it arrived (loose files get a made-up one)
    loose: bool
    claimed_at: datetime

    @property
    def area(self) -> Path:
        return self.inbox.work / self.id

    @property
    def path(self) -> Path:
        return self.area / self.name

    @property
    def relative_origin(self) -> str:
        return str((self.origin / self.name).relative_to(self.inbox.path))


def claim(ref: DropRef, now: datetime | None = None) -> ClaimedDrop:
    """Move the drop into <inbox>/.xnat-inbox/work/<id>/; the intent is recorded first."""
    now = now or datetime.now().astimezone()
    drop_id = f"{now:%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"
    name = ref.name or f"loose-{now:%Y%m%dT%H%M%S}"
    drop = ClaimedDrop(drop_id, ref.inbox, ref.folder, name, ref.name is None, now)
    try:
        drop.area.mkdir(parents=True)
        _write_claim_record(drop)
        if ref.name is None:
            _claim_loose_files(ref.folder, drop.path)
        else:
            os.rename(ref.path, drop.path)
    except OSError as exc:
        _undo_empty_claim(drop)
        raise ClaimError(f"cannot move {ref} into the work area {drop.area}: {exc.strerror}; "
                         "it stays in the inbox; check permissions and free space") from None
    fsync_dir(drop.area)
    return drop


def _claim_loose_files(folder: Path, target: Path) -> None:
    target.mkdir()
    for path in loose_files(folder):
        os.rename(path, target / path.name)


def _write_claim_record(drop: ClaimedDrop) -> None:
    record = {
        "id": drop.id,
        "inbox": str(drop.inbox.path),
        "origin": str(drop.origin),
        "name": drop.name,
        "loose": drop.loose,
        "claimed_at": drop.claimed_at.isoformat(),
    }
    tmp = drop.area / (CLAIM_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        json.dump(record, out)
        out.flush()
        os.fsync(out.fileno())
    os.rename(tmp, drop.area / CLAIM_FILE)


def _undo_empty_claim(drop: ClaimedDrop) -> None:
    """Remove our own bookkeeping when nothing of the drop was moved yet."""
    if drop.path.exists() and any(drop.path.iterdir()):
        return
    shutil.rmtree(drop.area, ignore_errors=True)


def claimed_drops(inbox: InboxConfig) -> list[ClaimedDrop]:
    """Drops left in the work area by an earlier run, oldest first, to resume them.

    A claim whose drop never arrived (a crash between record and rename) is cleaned up.
    """
    found = []
    if not inbox.work.is_dir():
        return found
    for area in sorted(inbox.work.iterdir()):
        record = area / CLAIM_FILE
        try:
            data = json.loads(record.read_text(encoding="utf-8"))
            drop = ClaimedDrop(data["id"], inbox, Path(data["origin"]), data["name"],
                               bool(data["loose"]), datetime.fromisoformat(data["claimed_at"]))
        except (OSError, ValueError, KeyError):
            _remove_unrecorded_claim(area)
            continue  # else not ours, or unreadable: left for a person
        if drop.path.exists() or any(p.name != CLAIM_FILE for p in area.iterdir()):
            found.append(drop)  # to resume, or a finish to complete
        else:
            shutil.rmtree(area, ignore_errors=True)
    return found


def _remove_unrecorded_claim(area: Path) -> None:
    """A claim cut short before its record was complete (a kill between the folder's mkdir and
    the record's rename): the drop never moved, so only our own empty folder is left."""
    if not area.is_dir() or area.is_symlink():
        return
    if all(entry.name == CLAIM_FILE + ".tmp" for entry in area.iterdir()):
        (area / (CLAIM_FILE + ".tmp")).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            area.rmdir()


def release_area(drop: ClaimedDrop, *bookkeeping: str) -> None:
    """Remove the work folder once the drop has been moved on: our own records only."""
    for name in (*bookkeeping, CLAIM_FILE):
        (drop.area / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # something unexpected is left: never delete data
        drop.area.rmdir()
