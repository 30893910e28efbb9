"""Scans run in worker processes. Reading a drop's headers is Python work: in the daemon's own
process it holds the interpreter lock, and every time a sending lane gives the lock up (a
socket call, a file read, a state write) it waits for the scanning lane to give it back.

Measured (bench/backlog.py, 2 cores, two lanes to two storescp): with the scans in the daemon,
100 drops of 200 took 27.7 s and one drop of 20,000 took 25.2 s; with two scan processes,
21.7 s and 20.6 s. Scanning the next drop in a worker while the current one is sent did not
help (23.6 s): that scan then competes with the receivers for the same two cores.

Workers are forked from multiprocessing's fork server, which has imported the scan code once
(a new worker imports nothing), never from the daemon itself, whose threads may hold locks at
the moment of a fork. A worker that dies (e.g. the kernel's OOM killer) costs nothing
but the time: that scan runs again in the daemon's process, and new workers are started.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import Connection
from pathlib import Path

from ..logs import get_logger
from .scan import ScanResult, scan_drop

#: a worker is replaced after this many scans, so its memory can't creep over months
SCANS_PER_WORKER = 200

log = get_logger(step="scan")


class ScanWorkers:
    """`scan(root, ready_marker)` in one of `processes` worker processes (0: in this one)."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        # a pipe nobody writes to: the workers see it close when the daemon ends, kill -9 too
        self._alive: tuple[Connection, Connection] | None = None
        self._closed = processes == 0  # closed: every scan runs in this process
        self._lock = threading.Lock()

    def scan(self, root: Path, ready_marker: str | None = None) -> ScanResult:
        pool = self._executor()
        scanning = self._hand_over(pool, root, ready_marker) if pool else None
        if pool is not None and scanning is not None:
            try:
                return scanning.result()
            except (BrokenProcessPool, CancelledError) as exc:  # cancelled: the pool was given up
                self._died(pool, root, exc)
        return scan_drop(root, ready_marker)

    def _hand_over(self, pool: ProcessPoolExecutor, root: Path,
                   ready_marker: str | None) -> Future[ScanResult] | None:
        """The scan, given to a worker (started now if need be); None: scan it here."""
        try:
            return pool.submit(scan_drop, root, ready_marker)
        except OSError as exc:
            self._cannot_start(pool, exc)
        except BrokenProcessPool as exc:
            self._died(pool, root, exc)
        return None

    def pids(self) -> list[int]:
        """The worker processes running now (for tests and diagnostics)."""
        with self._lock:
            pool = self._pool
        return [p.pid for p in getattr(pool, "_processes", {}).values() if p.pid] if pool else []

    def close(self) -> None:
        """At shutdown: end the workers now, a scan under way included (the drop stays
        claimed and is scanned again at the next start)."""
        with self._lock:
            pool, self._pool, self._closed = self._pool, None, True
            alive, self._alive = self._alive, None
        if pool is not None:
            _stop(pool)
        for end in alive or ():
            end.close()

    def _executor(self) -> ProcessPoolExecutor | None:
        """The pool, started at the first scan; None: scan in this process."""
        with self._lock:
            if self._closed:
                return None
            if self._pool is None:
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload([__name__])
                if self._alive is None:
                    self._alive = multiprocessing.Pipe(duplex=False)
                self._pool = ProcessPoolExecutor(
                    self.processes, mp_context=context, max_tasks_per_child=SCANS_PER_WORKER,
                    initializer=_exit_with_the_daemon, initargs=(self._alive[0],))
            return self._pool

    def _cannot_start(self, pool: ProcessPoolExecutor, exc: OSError) -> None:
        """No worker can start (e.g. no writable temporary folder for the fork server's
        socket): every scan runs in the daemon's own process from now on."""
        log.warning("cannot start scan worker processes; drops are scanned in the daemon's own "
                    "process (slower when several lanes are busy); give it a writable "
                    "temporary folder (PrivateTmp=yes, or TMPDIR) or set scan_processes: 0",
                    reason=str(exc))
        with self._lock:
            self._closed = True
        self._discard(pool)

    def _died(self, pool: ProcessPoolExecutor, root: Path, exc: Exception) -> None:
        log.warning("a scan worker process died; this drop is scanned in the daemon's own "
                    "process and new workers are started for the next ones",
                    root=str(root), reason=str(exc))
        self._discard(pool)

    def _discard(self, pool: ProcessPoolExecutor) -> None:
        """Stop using this pool; the other lane may have found it broken and replaced it."""
        with self._lock:
            if self._pool is pool:
                self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)


def _stop(pool: ProcessPoolExecutor) -> None:
    processes = list(getattr(pool, "_processes", {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:  # ProcessPoolExecutor has no public way (before 3.14)
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=5)


def _exit_with_the_daemon(alive: Connection) -> None:
    """In each worker: exit as soon as the daemon is gone, however it ended. An idle worker
    waits on its task queue, of which it holds the other end itself: it would wait forever."""

    def wait() -> None:
        with contextlib.suppress(EOFError, OSError):
            alive.recv()  # nothing is ever sent: this returns at EOF, when the daemon's end closes
        os._exit(0)

    threading.Thread(target=wait, name="exit with the daemon", daemon=True).start()
