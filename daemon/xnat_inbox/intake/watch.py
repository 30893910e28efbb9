"""Step 1, watch: observers on each inbox mark drops as touched; they never drive work directly.

A folder holding a route.yaml is a *routing folder*; the inbox itself is one too. A drop is a
direct child of a routing folder (a folder, or all the loose files in it together).
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch

from ..config import ROUTE_FILE, InboxConfig
from ..logs import get_logger, unchecked
from .polling import PruningPollingEmitter

#: file systems whose remote writes never reach inotify
NETWORK_FS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs",
                        "fuse.sshfs", "fuse.glusterfs", "fuse.s3fs", "davfs", "lustre", "gpfs"})
IGNORED_EVENTS = frozenset({"opened", "closed_no_write"})
#: file times come from the kernel's coarse clock, up to a tick behind time.time()
MTIME_SLACK_S = 0.02
#: how long an observer's dispatch thread waits for an event before it looks again whether to
#: stop; stopping wakes it at once, so this only counts idle wake-ups (each costs CPU)
DISPATCH_TIMEOUT_S = 30.0
#: an archive in a routing folder is a drop of its own, not one of the loose files
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")

log = get_logger(step="watch")


@dataclass(frozen=True)
class DropRef:
    """Where a drop sits before it is claimed: routing folder and name (None: loose files)."""

    inbox: InboxConfig = field(compare=False)  # folder is absolute: it tells inboxes apart
    folder: Path
    name: str | None

    @property
    def path(self) -> Path:
        return self.folder / self.name if self.name else self.folder

    def __str__(self) -> str:
        rel = self.path.relative_to(self.inbox.path)
        return f"{rel}/ (loose files)" if self.name is None else str(rel)


def is_routing_folder(path: Path) -> bool:
    """A folder with a route.yaml (which must be a regular file: a link there fails the drops
    below it with the reason, rather than quietly making them part of a parent's route)."""
    try:
        return not os.path.islink(path) and \
            not stat.S_ISDIR(os.lstat(path / ROUTE_FILE).st_mode)
    except OSError:
        return False


def is_archive_name(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def is_candidate(name: str) -> bool:
    """Hidden entries and route.yaml in a routing folder are never drops."""
    return not name.startswith(".") and name != ROUTE_FILE


def _parts_below(inbox: InboxConfig, path: Path) -> tuple[str, ...]:
    """`path`'s parts below the inbox; none for the inbox itself, paths outside it and the
    daemon's own folders (done/, failed/, .xnat-inbox/)."""
    try:
        parts = path.relative_to(inbox.path).parts
    except ValueError:
        return ()
    if any(path == r or r in path.parents for r in inbox.reserved()):
        return ()
    return parts


def drop_for_path(inbox: InboxConfig, path: Path) -> DropRef | None:
    """The drop a changed path belongs to, or None for our own folders and non-drops."""
    parts = _parts_below(inbox, path)
    if not parts:
        return None
    folder = inbox.path
    for index, part in enumerate(parts):
        if not is_candidate(part):
            return None
        child = folder / part
        try:
            mode = os.lstat(child).st_mode
        except OSError:
            mode = 0
        if stat.S_ISDIR(mode) and is_routing_folder(child):
            folder = child
            continue
        if index == len(parts) - 1 and not stat.S_ISDIR(mode) and mode != 0:
            archive = stat.S_ISREG(mode) and is_archive_name(part)
            return DropRef(inbox, folder, part if archive else None)
        return DropRef(inbox, folder, part)
    return None  # a routing folder itself changed: its drops report their own events


def routing_folder_at(inbox: InboxConfig, path: Path) -> Path | None:
    """The routing folder below the inbox that `path` is (or whose route.yaml it is), reached
    from the inbox through routing folders only; None for anything else."""
    folder = path.parent if path.name == ROUTE_FILE else path
    parts = _parts_below(inbox, folder)
    if not parts:
        return None
    current = inbox.path
    for part in parts:
        current = current / part
        if not is_candidate(part) or not os.path.isdir(current) or \
                not is_routing_folder(current):
            return None
    return folder


def routing_folders(inbox: InboxConfig, below: Path | None = None) -> Iterator[Path]:
    """The inbox (or `below`) and every routing folder inside it, parents first."""
    pending = [below or inbox.path]
    reserved = set(inbox.reserved())
    while pending:
        folder = pending.pop(0)
        yield folder
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError:
            continue
        pending.extend(Path(entry.path) for entry in entries
                       if is_candidate(entry.name) and Path(entry.path) not in reserved
                       and entry.is_dir(follow_symlinks=False)
                       and is_routing_folder(Path(entry.path)))


def existing_drops(inbox: InboxConfig, below: Path | None = None) -> Iterator[DropRef]:
    """Drops already present (at start-up, or in a folder that just became a routing folder):
    every child of every routing folder."""
    for folder in routing_folders(inbox, below):
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError:
            continue
        for entry in entries:
            path = Path(entry.path)
            if not is_candidate(entry.name) or path in inbox.reserved():
                continue
            if (entry.is_dir(follow_symlinks=False) and not is_routing_folder(path)) or \
                    (entry.is_file(follow_symlinks=False) and is_archive_name(entry.name)):
                yield DropRef(inbox, folder, entry.name)
        if loose_files(folder):
            yield DropRef(inbox, folder, None)


def loose_files(folder: Path) -> list[Path]:
    """The loose files of a routing folder (symlinks and sub-folders excluded)."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    return sorted(Path(entry.path) for entry in entries
                  if is_candidate(entry.name) and entry.is_file(follow_symlinks=False)
                  and not is_archive_name(entry.name))


def filesystem_type(path: Path) -> str:
    """The type of the file system `path` lives on, from /proc/self/mountinfo."""
    best, fstype = "", "unknown"
    target = str(path.resolve())
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
            for line in mountinfo:
                fields = line.split()
                mount_point = fields[4].replace("\\040", " ")
                dash = fields.index("-")
                inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) >= len(best):
                    best, fstype = mount_point, fields[dash + 1]
    except (OSError, ValueError, IndexError):
        pass
    return fstype


def wants_polling(inbox: InboxConfig) -> bool:
    if inbox.poll == "auto":
        return filesystem_type(inbox.path) in NETWORK_FS
    return bool(inbox.poll)


class InboxWatcher(FileSystemEventHandler):
    """Watches one inbox without ever watching done/, failed/ or the work area.

    inotify: each routing folder flat and each drop folder recursively (watchdog's recursive
    watch on the inbox would add a watch for every folder in done/, forever).
    Polling: one recursive watch on the inbox whose walk skips our own folders and hidden
    entries (never part of a drop's events) and never follows a symlink.

    `on_touch(ref, age)`: the drop changed `age` seconds ago (0: just now, as far as we know).
    """

    def __init__(self, inbox: InboxConfig, on_touch: Callable[[DropRef, float], None]) -> None:
        self.inbox = inbox
        self.on_touch = on_touch
        self.polling = wants_polling(inbox)
        self.reserved = {str(path) for path in inbox.reserved()}
        self.watches: dict[Path, ObservedWatch] = {}
        self.symlinks_noted: set[Path] = set()
        self.routing: set[Path] = set()  # routing folders found so far (logged once each)
        self.lock = threading.Lock()
        self.observer: BaseObserver = (
            BaseObserver(partial(PruningPollingEmitter, skip=self._never_polled,  # type: ignore[arg-type]
                                 interval=inbox.poll_interval), timeout=DISPATCH_TIMEOUT_S)
            if self.polling else Observer(timeout=DISPATCH_TIMEOUT_S)
        )
        self.observer.daemon = True

    def start(self) -> None:
        for folder in routing_folders(self.inbox):
            self.routing.add(folder)
            self._note_symlinks(folder)
            if not self.polling:
                self._watch(folder, recursive=False)
        if self.polling:
            self._watch(self.inbox.path, recursive=True)
        else:
            for ref in existing_drops(self.inbox):
                self._watch_drop(ref)
        self.observer.start()

    def stop(self) -> None:
        self.observer.stop()
        self.observer.join(timeout=5)

    def forget(self, ref: DropRef) -> None:
        """The drop was claimed: stop watching the folder it had."""
        if self.polling or ref.name is None:
            return
        with self.lock:
            watch = self.watches.pop(ref.path, None)
        if watch is not None:
            with contextlib.suppress(KeyError, OSError):
                self.observer.unschedule(watch)

    def add_routing_folder(self, folder: Path) -> None:
        """`folder` is a routing folder now (it arrived with its route.yaml, or one arrived in
        it): watch it and every routing folder below it, then touch the drops already inside,
        which may have arrived before any watch could report them."""
        if routing_folder_at(self.inbox, folder) != folder:
            return  # not one any more, or below a folder that is none
        replaced: list[tuple[Path, ObservedWatch]] = []
        for below in routing_folders(self.inbox, folder):  # each watched before it is listed
            self._note_routing_folder(below)
            if not self.polling:
                with self.lock:  # watched as a drop (recursively) until now: flat from now on
                    old = self.watches.get(below)
                    if old is not None and old.is_recursive:
                        replaced.append((below, self.watches.pop(below)))
                self._watch(below, recursive=False)
            self._note_symlinks(below)
        drops = list(existing_drops(self.inbox, folder))
        for ref in drops:
            if not self.polling:
                self._watch_drop(ref)
        for below, old in replaced:  # only now: it reported its drops' writes until they had
            with self.lock:          # watches of their own
                keep = below not in self.watches
                if keep:  # its flat watch could not be made
                    self.watches[below] = old
            if not keep:
                with contextlib.suppress(KeyError, OSError):
                    self.observer.unschedule(old)
        for ref in drops:
            self.on_touch(ref, 0.0)

    def _note_routing_folder(self, folder: Path) -> None:
        """Log a routing folder the first time it is found while the daemon runs."""
        with self.lock:
            if folder in self.routing:
                return
            self.routing.add(folder)
        where = folder.relative_to(self.inbox.path)
        with unchecked(*where.parts):  # folders may be named after the patient
            log.info("routing folder found: its sub-folders, archives and loose files are drops",
                     inbox=str(self.inbox.path), folder=str(where))

    def _note_symlinks(self, folder: Path) -> None:
        with contextlib.suppress(OSError):
            for entry in os.scandir(folder):
                if entry.is_symlink():
                    self._note_symlink(Path(entry.path))

    def _note_symlink(self, path: Path) -> None:
        if path not in self.symlinks_noted:
            self.symlinks_noted.add(path)
            with unchecked(path.name):  # it may be named after the patient
                log.warning("symbolic link in an inbox: not followed, left in place; copy the "
                            "files themselves", path=str(path))

    def _never_polled(self, entry: os.DirEntry[str]) -> bool:
        return entry.name.startswith(".") or entry.path in self.reserved

    def _age(self, path: Path) -> float:
        """Polling only: seconds since the change a poll just reported, from the path's mtime,
        so a drop's quiet period starts at the write, not up to poll_interval later. Trusted
        only when it falls after the previous poll began (the change can't be older): a copy
        that preserves mtimes, or a share whose clock is off, counts from now instead."""
        emitters = list(self.observer.emitters) if self.polling else []
        if not emitters:
            return 0.0
        try:
            mtime = os.lstat(path).st_mtime
        except OSError:
            return 0.0
        now = time.time()
        since = getattr(emitters[0], "walk_started", now)
        if not since - MTIME_SLACK_S <= mtime <= now:
            return 0.0
        return now - max(mtime, since)

    def _watch(self, path: Path, recursive: bool) -> bool:
        """True when the watch is new."""
        with self.lock:
            if path in self.watches:
                return False
            try:
                self.watches[path] = self.observer.schedule(self, str(path), recursive=recursive)
            except OSError as exc:  # gone already, or out of inotify watches
                with unchecked(self._drop_name(path)):
                    log.warning("cannot watch folder", folder=str(path), reason=exc.strerror)
                return False
            return True

    def _watch_drop(self, ref: DropRef) -> bool:
        """True when a new watch was put on a drop folder."""
        if ref.name is not None and os.path.isdir(ref.path) and not os.path.islink(ref.path):
            return self._watch(ref.path, recursive=True)
        if ref.folder != self.inbox.path:
            self._watch(ref.folder, recursive=False)
        return False

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in IGNORED_EVENTS:
            return
        try:
            self._touch_drops_of(event)
        except Exception:  # an exception here would silently end the observer thread
            with unchecked(self._drop_name(Path(os.fsdecode(event.src_path)))):
                log.exception("cannot handle a file system event", path=str(event.src_path))

    def _drop_name(self, path: Path) -> str | None:
        """The name of the drop `path` is in: not checked for PHI before its headers are read."""
        ref = drop_for_path(self.inbox, path)
        return ref.name if ref else None

    def _touch_drops_of(self, event: FileSystemEvent) -> None:
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            if not raw:
                continue
            path = Path(os.fsdecode(raw))
            ref = drop_for_path(self.inbox, path)
            if ref is not None and path.parent == ref.folder and os.path.islink(path):
                self._note_symlink(path)
                continue
            if ref is None:
                # a folder that arrived with its route.yaml (cp -r, mv), or a route.yaml that
                # arrived in a folder: a routing folder, whose children are the drops. Not
                # for every change in it (a claim modifies it too), which would touch them all
                folder = routing_folder_at(self.inbox, path)
                if folder is not None and (path.name == ROUTE_FILE or event.event_type in
                                           ("created", "moved")):
                    self.add_routing_folder(folder)
                continue
            if not self.polling and self._watch_drop(ref) and is_routing_folder(ref.path):
                # its route.yaml landed after the event was read, before the watch saw it
                self.add_routing_folder(ref.path)
                continue
            self.on_touch(ref, self._age(path))
