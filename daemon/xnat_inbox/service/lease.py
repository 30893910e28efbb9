"""The running daemon's lease on its state_dir: who runs (pid) and since when, for `status`.

The daemon holds an exclusive flock on `state_dir/daemon.lock` for its whole life and writes
its pid and start time into the file. The kernel drops the lock when the process ends, however
it ends (kill -9, a crash, a power cut), so the file may outlive the daemon but the lock never
does: a lock nobody holds reads as "not running", whatever the file says. The lock also keeps
a second daemon off the same state database.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

LEASE_FILE = "daemon.lock"
#: how long a starting daemon waits for the lock: `status` holds it (shared) for an instant
ACQUIRE_SECONDS = 3.0


@dataclass(frozen=True)
class Holder:
    """The daemon holding the lease, as it wrote itself into the file."""

    pid: int | None
    started: float | None  # epoch seconds

    @property
    def since(self) -> str | None:
        if self.started is None:
            return None
        return datetime.fromtimestamp(self.started).astimezone().isoformat(timespec="seconds")


class LeaseHeld(Exception):
    """Another daemon runs on this state_dir."""

    def __init__(self, path: Path, holder: Holder) -> None:
        self.holder = holder
        who = f"pid {holder.pid}" if holder.pid else "another process"
        since = f", since {holder.since}" if holder.since else ""
        super().__init__(f"another xnat-inbox daemon ({who}{since}) runs on this state_dir "
                         f"(it holds {path}): stop it first; two daemons must never share one "
                         "state database")


class Lease:
    """Held from `acquire` until `release` or the end of the process."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LEASE_FILE
        self.fd: int | None = None

    def acquire(self, wait: float = ACQUIRE_SECONDS) -> Holder:
        # O_CLOEXEC: processes the daemon starts never inherit (and so never hold) the lock
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _read(fd)
                    os.close(fd)
                    raise LeaseHeld(self.path, holder) from None
                time.sleep(0.05)
        holder = Holder(os.getpid(), time.time())
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": holder.pid, "started": holder.started}).encode(), 0)
        self.fd = fd
        return holder

    def release(self) -> None:
        """Unlocked as the file is closed; the stale pid left in it is never believed."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def holder(state_dir: Path) -> Holder | None:
    """The daemon running on this state_dir now, or None when none is."""
    try:
        fd = os.open(state_dir / LEASE_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(fd)  # locked: its holder is alive
        return None  # nobody holds it (our shared lock goes with the close)
    finally:
        os.close(fd)


def _read(fd: int) -> Holder:
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return Holder(int(record["pid"]), float(record["started"]))
    return Holder(None, None)  # locked, but written only in a moment
