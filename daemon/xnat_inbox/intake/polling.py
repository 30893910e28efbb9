"""Polling for inboxes on network shares (SMB/NFS deliver no inotify events for remote writes).

A watchdog emitter (the observer/handler split stays watchdog's) whose snapshot is one scandir
walk that never follows a symlink and skips what can never hold a drop (our own folders, hidden
entries), kept as a dict of path -> (inode, device, mode, size, mtime, owner, group). Watchdog's
own DirectorySnapshot stats every path through Python calls and its diff looks up each path's
inode, size and mtime one call at a time: 1.5-2 s a cycle for 100,000 files here
(bench/watch.py). An unchanged inbox now costs one walk and one dict comparison.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable
from typing import Any

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
)
from watchdog.observers.api import EventEmitter

from ..logs import get_logger

#: (st_ino, st_dev, st_mode, st_size, st_mtime_ns, st_uid, st_gid)
Entry = tuple[int, int, int, int, int, int, int]
Snapshot = dict[str, Entry]
#: errors of a folder that vanished or was replaced while we walked: it counts as empty
_GONE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EINVAL})

log = get_logger(step="watch")


def take_snapshot(root: str, skip: Callable[[os.DirEntry[str]], bool]) -> Snapshot:
    """Every entry below `root` but those `skip(entry)` rejects (nor what is below them).

    Errors on `root` itself raise (the inbox is gone or the share is down); a sub-folder that
    vanished or can't be read counts as empty, and any other error (EIO, ESTALE) raises, so
    an unreachable share is not mistaken for the deletion of everything on it."""
    found: Snapshot = {}
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            entries = os.scandir(folder)
        except OSError as exc:
            if folder == root or not (isinstance(exc, PermissionError) or exc.errno in _GONE):
                raise
            continue
        with entries:
            for entry in entries:
                if skip(entry):
                    continue
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                found[entry.path] = (info.st_ino, info.st_dev, info.st_mode, info.st_size,
                                     info.st_mtime_ns, info.st_uid, info.st_gid)
                if stat.S_ISDIR(info.st_mode):
                    pending.append(entry.path)
    return found


def changes(old: Snapshot, new: Snapshot) -> list[FileSystemEvent]:
    """The events that turn `old` into `new`; a path whose inode moved is one moved event."""
    if old == new:
        return []
    created = {path: entry for path, entry in new.items() if path not in old}
    deleted = {path: entry for path, entry in old.items() if path not in new}
    arrived = {entry[:2]: path for path, entry in created.items()}
    events: list[FileSystemEvent] = []
    for path, entry in deleted.items():
        dest = arrived.pop(entry[:2], None)
        is_dir = stat.S_ISDIR(entry[2])
        if dest is None:
            events.append(DirDeletedEvent(path) if is_dir else FileDeletedEvent(path))
        else:
            del created[dest]
            events.append(DirMovedEvent(path, dest) if is_dir else FileMovedEvent(path, dest))
    for path, entry in created.items():
        events.append(DirCreatedEvent(path) if stat.S_ISDIR(entry[2]) else FileCreatedEvent(path))
    for path, entry in new.items():
        before = old.get(path)
        if before is not None and before != entry:
            is_dir = stat.S_ISDIR(entry[2])
            events.append(DirModifiedEvent(path) if is_dir else FileModifiedEvent(path))
    return events


class PruningPollingEmitter(EventEmitter):
    """Polls one watch every `interval` seconds (else the observer's `timeout`), start to
    start (a slow walk does not stretch the interval), with `take_snapshot(path, skip)`.

    The first snapshot is taken when the emitter is made, before the observer starts, so a
    drop written while the daemon starts is either found by its start-up listing or reported
    as a change. `walk_started` (wall clock) is when the last walk but one began: every change
    reported now happened after it."""

    def __init__(self, event_queue: Any, watch: Any, *, timeout: float = 1.0,
                 event_filter: Any = None,
                 skip: Callable[[os.DirEntry[str]], bool] = lambda _: False,
                 interval: float | None = None) -> None:
        super().__init__(event_queue, watch, timeout=timeout, event_filter=event_filter)
        self.interval = timeout if interval is None else interval
        self.skip = skip
        self.walk_started = time.time()
        self._last_walk = self.walk_started
        self._snapshot = take_snapshot(watch.path, skip)
        self._due = time.monotonic() + self.interval
        self._failing = False
        self._slow = False

    def queue_events(self, timeout: float) -> None:
        if self.stopped_event.wait(max(0.0, self._due - time.monotonic())):
            return
        started = time.monotonic()
        self._due = started + self.interval
        self.walk_started, self._last_walk = self._last_walk, time.time()
        try:
            new = take_snapshot(self.watch.path, self.skip)
        except (FileNotFoundError, NotADirectoryError):
            log.error("inbox gone: no longer polled; restart the daemon once it is back",
                      inbox=self.watch.path)
            self.queue_event(DirDeletedEvent(self.watch.path))
            self.stop()
            return
        except OSError as exc:  # e.g. the share is briefly unreachable: keep the last snapshot
            if not self._failing:
                log.warning("cannot poll the inbox; retrying every poll_interval", inbox=
                            self.watch.path, reason=exc.strerror or str(exc))
            self._failing = True
            return
        if self._failing:
            log.info("polling the inbox again", inbox=self.watch.path)
            self._failing = False
        events = changes(self._snapshot, new)
        self._snapshot = new
        for event in events:
            self.queue_event(event)
        seconds = time.monotonic() - started
        log.debug("polled", inbox=self.watch.path, entries=len(new), changes=len(events),
                  seconds=round(seconds, 4))
        if seconds > self.interval and not self._slow:  # once, until it is fast again
            log.warning("polling the inbox takes longer than poll_interval; raise poll_interval "
                        "or move finished folders out of the inbox", inbox=self.watch.path,
                        seconds=round(seconds, 2), entries=len(new))
        self._slow = seconds > self.interval
