"""Step 3, claim: a ready drop is renamed into the inbox's work area before anything reads it,
so late writes can't mix into a send in flight (they form a new drop instead).

The work area (`<inbox>/.xnat-inbox/work/`) is the daemon's own: made by it, private to it,
checked through directory handles each time it is used. What users put in the inbox is
renamed into it as it is (a rename never follows a link); only real folders and regular files
are drops, and a claim record is believed only as far as it names things inside the inbox."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import stat
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath

from ..config import ROUTE_FILE, WORK_PARTS, InboxConfig
from ..fsops import (
    PRIVATE_DIR_MODE,
    TrustedPath,
    UnsafePath,
    check_own_folder,
    fsync_dir,
    held,
    is_component,
    open_entry,
    own_folders,
    rename_noreplace,
)
from ..logs import get_logger
from .watch import DropRef, loose_files

CLAIM_FILE = "claim.json"
#: a drop id: when it was claimed, and 24 random bits
DROP_ID = re.compile(r"^\d{8}T\d{6}-[0-9a-f]{6}$")
#: (st_dev, st_ino) of a folder
Identity = tuple[int, int]

log = get_logger(step="claim")


class ClaimError(Exception):
    """The drop could not be moved into the work area; it stays where it is."""


class NotADrop(ClaimError):
    """The folder holds a route.yaml now: a routing folder, not a drop; its children are."""


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

    def in_area(self, *names: str) -> TrustedPath:
        """A path in the drop's work folder, opened through the daemon's own folders."""
        return TrustedPath(self.inbox.path, (*WORK_PARTS, self.id, *names), len(WORK_PARTS) + 1)

    def root(self) -> TrustedPath:
        """The drop as it was claimed: a folder, or an archive."""
        return self.in_area(self.name)


def work_folder(inbox: InboxConfig) -> int:
    """A descriptor of the inbox's work area, made if missing; UnsafePath if it (or
    .xnat-inbox) is not the daemon's own."""
    return own_folders(inbox.path, WORK_PARTS, (PRIVATE_DIR_MODE, PRIVATE_DIR_MODE), evict=True)


def routing_folder(ref: DropRef) -> TrustedPath:
    """The folder the drop lies in, reached from the inbox without following a link."""
    return TrustedPath(ref.inbox.path, ref.folder.relative_to(ref.inbox.path).parts)


def claim(ref: DropRef, now: datetime | None = None,
          own: Collection[Identity] = ()) -> ClaimedDrop:
    """Move the drop into <inbox>/.xnat-inbox/work/<id>/; the intent is recorded first.
    `own`: the daemon's own folders, which are never drops, whatever they are renamed to."""
    now = now or datetime.now().astimezone()
    drop_id = f"{now:%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"
    name = ref.name or f"loose-{now:%Y%m%dT%H%M%S}"
    drop = ClaimedDrop(drop_id, ref.inbox, ref.folder, name, ref.name is None, now)
    try:
        with held(routing_folder(ref).open()) as folder_fd, held(work_folder(ref.inbox)) as work:
            names = _claimable(folder_fd, ref, own)
            os.mkdir(drop_id, PRIVATE_DIR_MODE, dir_fd=work)
            with held(open_entry(work, drop_id, drop.area, directory=True)) as area:
                try:
                    _write_claim_record(drop, area)
                    _move_in(folder_fd, names, area, drop)
                except OSError:
                    _undo_empty_claim(work, area, drop)
                    raise
                fsync_dir(area)
    except UnsafePath as exc:
        raise ClaimError(f"cannot claim {ref}: {exc.filename}: {exc.strerror}; it stays where it "
                         "is") from None
    except OSError as exc:
        raise ClaimError(f"cannot move {ref} into the work area {drop.area}: {exc.strerror}; "
                         "it stays in the inbox; check permissions and free space") from None
    return drop


def _claimable(folder_fd: int, ref: DropRef, own: Collection[Identity]) -> list[str]:
    """The names to move: the drop itself (a real folder or a regular file, never a link), or
    the routing folder's loose files."""
    if ref.name is None:
        return [path.name for path in loose_files(ref.folder)]
    info = os.stat(ref.name, dir_fd=folder_fd, follow_symlinks=False)
    if not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
        raise UnsafePath(0, "not a folder or a regular file (a symbolic link is never "
                         "followed); left in place", str(ref.path))
    if (info.st_dev, info.st_ino) in own and info.st_uid == os.geteuid():
        raise UnsafePath(0, "this is one of the daemon's own folders (done/, failed/ or "
                         ".xnat-inbox/), renamed: not a drop; rename it back", str(ref.path))
    if stat.S_ISDIR(info.st_mode) and _holds_route_file(folder_fd, ref):
        raise NotADrop(f"{ref} holds a {ROUTE_FILE}: a routing folder, not a drop")
    return [ref.name]


def _holds_route_file(folder_fd: int, ref: DropRef) -> bool:
    """Whether the folder drop has a route.yaml (of any kind but a folder) at its top: one that
    arrived after it settled makes it a routing folder, which is never claimed."""
    if ref.name is None:
        return False
    try:
        with held(open_entry(folder_fd, ref.name, ref.path, directory=True)) as drop:
            info = os.stat(ROUTE_FILE, dir_fd=drop, follow_symlinks=False)
    except OSError:  # none there, or unreadable: the rename decides
        return False
    return not stat.S_ISDIR(info.st_mode)


def _move_in(folder_fd: int, names: list[str], area: int, drop: ClaimedDrop) -> None:
    if not drop.loose:
        rename_noreplace(folder_fd, names[0], area, drop.name)
        return
    os.mkdir(drop.name, PRIVATE_DIR_MODE, dir_fd=area)
    with held(open_entry(area, drop.name, drop.path, directory=True)) as target:
        for name in names:
            with contextlib.suppress(FileNotFoundError):  # taken away meanwhile
                info = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
                if stat.S_ISREG(info.st_mode):
                    rename_noreplace(folder_fd, name, target, name)


def _write_claim_record(drop: ClaimedDrop, area: int) -> None:
    record = {
        "id": drop.id,
        "inbox": str(drop.inbox.path),
        "origin": str(drop.origin.relative_to(drop.inbox.path)),
        "name": drop.name,
        "loose": drop.loose,
        "claimed_at": drop.claimed_at.isoformat(),
    }
    tmp = CLAIM_FILE + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                 dir_fd=area)
    with open(fd, "w", encoding="utf-8") as out:
        json.dump(record, out)
        out.flush()
        os.fsync(out.fileno())
    os.rename(tmp, CLAIM_FILE, src_dir_fd=area, dst_dir_fd=area)


def _undo_empty_claim(work: int, area: int, drop: ClaimedDrop) -> None:
    """Remove our own bookkeeping when nothing of the drop was moved yet."""
    with contextlib.suppress(OSError):
        os.rmdir(drop.name, dir_fd=area)  # loose files' folder, if still empty
    for name in (CLAIM_FILE, CLAIM_FILE + ".tmp"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=area)
    with contextlib.suppress(OSError):  # something of the drop is in it: never delete data
        os.rmdir(drop.id, dir_fd=work)


def claimed_drops(inbox: InboxConfig) -> list[ClaimedDrop]:
    """Drops left in the work area by an earlier run, oldest first, to resume them.

    A claim whose drop never arrived (a crash between record and rename) is cleaned up.
    Anything else in the work area that is not a sound claim of ours is left for a person.
    """
    found: list[ClaimedDrop] = []
    if not os.path.isdir(inbox.work):
        return found
    try:
        work = work_folder(inbox)
    except OSError as exc:
        log.error("cannot resume this inbox's claimed drops", inbox=str(inbox.path),
                  reason=f"{exc.filename}: {exc.strerror}")
        return found
    with held(work):
        for entry in sorted(os.listdir(work)):
            drop = _resumable(inbox, work, entry)
            if drop is not None:
                found.append(drop)
    return found


def _resumable(inbox: InboxConfig, work: int, entry: str) -> ClaimedDrop | None:
    where = inbox.work / entry
    if not DROP_ID.match(entry):
        log.warning("not a claim of this daemon in its work area: left alone", path=str(where))
        return None
    try:
        area = open_entry(work, entry, where, directory=True)
    except OSError:
        log.warning("not a claim of this daemon in its work area: left alone", path=str(where))
        return None
    with held(area):
        try:
            check_own_folder(area, where)
        except UnsafePath as exc:
            log.warning("not a claim of this daemon in its work area: left alone",
                        path=str(where), reason=exc.strerror)
            return None
        contents = set(os.listdir(area))
        try:
            drop = _read_claim_record(inbox, area, entry)
        except FileNotFoundError:
            _remove_unrecorded_claim(work, area, entry, contents)
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("claim record unusable: left for a person", path=str(where),
                        reason=str(exc))
            return None
        if contents - {CLAIM_FILE}:
            return drop  # to resume, or a finish to complete
        os.unlink(CLAIM_FILE, dir_fd=area)  # the drop never arrived: our record only
        with contextlib.suppress(OSError):
            os.rmdir(entry, dir_fd=work)
    return None


def _read_claim_record(inbox: InboxConfig, area: int, entry: str) -> ClaimedDrop:
    """The claim record, believed only as far as it stays inside the inbox."""
    with held(open_entry(area, CLAIM_FILE, inbox.work / entry / CLAIM_FILE)) as fd:
        data = json.loads(os.read(fd, 1 << 16).decode("utf-8"))
    if data["id"] != entry:
        raise ValueError(f"its id {data['id']!r} is not its folder's name")
    if not isinstance(data["name"], str) or not is_component(data["name"]):
        raise ValueError("its drop name is not a single file name")
    origin = PurePosixPath(data["origin"])
    if origin.is_absolute():  # written by an older version: absolute, inside the inbox
        origin = origin.relative_to(inbox.path)
    if any(part in ("..", ".") for part in origin.parts):
        raise ValueError("its origin leaves the inbox")
    return ClaimedDrop(entry, inbox, inbox.path.joinpath(*origin.parts), data["name"],
                       bool(data["loose"]), datetime.fromisoformat(data["claimed_at"]))


def _remove_unrecorded_claim(work: int, area: int, entry: str, contents: set[str]) -> None:
    """A claim cut short before its record was complete (a kill between the folder's mkdir and
    the record's rename): the drop never moved, so only our own empty folder is left."""
    if contents <= {CLAIM_FILE + ".tmp"}:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(CLAIM_FILE + ".tmp", dir_fd=area)
        with contextlib.suppress(OSError):
            os.rmdir(entry, dir_fd=work)


def release_area(drop: ClaimedDrop, *bookkeeping: str) -> None:
    """Remove the work folder once the drop has been moved on: our own records only."""
    with held(work_folder(drop.inbox)) as work, \
            held(open_entry(work, drop.id, drop.area, directory=True)) as area:
        for name in (*bookkeeping, CLAIM_FILE):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=area)
        with contextlib.suppress(OSError):  # something unexpected is left: never delete data
            os.rmdir(drop.id, dir_fd=work)
