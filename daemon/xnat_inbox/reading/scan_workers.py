"""Reading a drop (unpacking an archive, then the scan) runs in worker processes, each under a
memory limit (RLIMIT_AS, scan_memory_limit) and each drop under a time limit (scan_timeout).
Any inbox user can drop a file built to make a reader blow up (a tar header bomb, a file
pydicom walks forever): it costs a worker, never the daemon, and the caller learns which drop
it was (WorkerLost) so it can set the drop aside instead of reading it again and again.

Also a matter of speed: reading headers is Python work, and in the daemon's own process it
holds the interpreter lock that the sending lanes need. Measured (bench/backlog.py, 2 cores,
two lanes to two storescp): with the scans in the daemon, 100 drops of 200 took 27.7 s and
one drop of 20,000 took 25.2 s; with two scan processes, 21.7 s and 20.6 s.

Workers are forked from multiprocessing's fork server, which has imported the scan code once,
never from the daemon itself, whose threads may hold locks at the moment of a fork. Where the
fork server can't start (it needs a writable temporary folder for its socket), workers are
started afresh by `spawn` (slower to start, as safe). Each worker has a pipe of its own and
reads one drop at a time, so a worker's death is known to be that drop's doing (unlike a
ProcessPoolExecutor, which fails every pending scan when one worker dies). No thread polls:
the lane that hands a drop over waits on that worker's pipe and its process sentinel.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import resource
import signal
import threading
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from ..config import ArchiveLimits
from ..fsops import TrustedPath
from ..libwarnings import LibraryWarning, collected, replay
from ..logs import get_logger
from .scan import ScanResult, scan_drop
from .unpack import unpack

#: a worker is replaced after this many drops, so its memory can't creep over months
SCANS_PER_WORKER = 200
#: a worker's exit status after a MemoryError outside the places that turn it into a reason
EXIT_OUT_OF_MEMORY = 86
#: how long a new worker may take to say it is ready (spawn imports pydicom afresh)
START_SECONDS = 120.0

log = get_logger(step="scan")
#: a worker's answer: (True, the scan) or (False, the exception), and the libraries' warnings
Answer = tuple[bool, Any, list[LibraryWarning]]


@dataclass(frozen=True)
class ReadJob:
    """One drop to read: the folder `root`, into which `archive` (if any) is unpacked first."""

    root: Path | TrustedPath
    archive: Path | None = None
    limits: ArchiveLimits = field(default_factory=ArchiveLimits)
    ready_marker: str | None = None


def read_drop(job: ReadJob) -> ScanResult:
    """Unpack (archives) and scan; UnpackError, UnsafePath and OSError (a full disk) pass."""
    if job.archive is not None:
        unpack(job.archive, job.root.path if isinstance(job.root, TrustedPath) else job.root,
               job.limits)
    return scan_drop(job.root, job.ready_marker)


class WorkerLost(Exception):
    """The worker reading this drop died or overran scan_timeout; the message says which."""


class NoWorker(Exception):
    """No worker process can be started now (e.g. the system is out of processes)."""


class ReadCancelled(Exception):
    """The daemon is stopping: the read was given up, through no fault of the drop."""


class ScanWorkers:
    """`read(job)` in one of `processes` worker processes (0: in this one, without limits)."""

    def __init__(self, processes: int, memory_limit: int = 0) -> None:
        self.processes = processes
        self.memory_limit = memory_limit
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._slots = threading.BoundedSemaphore(max(processes, 1))
        self._lock = threading.Lock()
        self._closed = False
        self._method = "forkserver"
        # a pipe nobody writes to: the workers see it close when the daemon ends, kill -9 too
        self._alive: tuple[Connection, Connection] | None = None
        self._limit_warned = False

    def read(self, job: ReadJob, timeout: float = 0) -> ScanResult:
        """The drop's scan; WorkerLost, NoWorker, ReadCancelled, or what read_drop raises.
        `timeout`: seconds the worker may take (0: no limit)."""
        if self.processes == 0:
            return read_drop(job)
        self._take_slot()
        try:
            worker = self._worker()
            try:
                answer = worker.run(job, timeout)
            except WorkerLost:
                self._lost(worker)
                if self._closed:
                    raise ReadCancelled("stopped while reading the drop") from None
                raise
            self._give_back(worker)
        finally:
            self._slots.release()
        ok, value, warned = answer
        if not ok:
            replay(warned)  # nothing read: logged now, in the unread drop's scope
            raise value
        value.warnings = warned  # logged by the caller once it can mask the drop's PHI in them
        return value

    def scan(self, root: Path | TrustedPath, ready_marker: str | None = None) -> ScanResult:
        """A folder's scan (for tests and tools): read() without unpacking."""
        return self.read(ReadJob(root, ready_marker=ready_marker))

    def pids(self) -> list[int]:
        """The worker processes running now (for tests and diagnostics)."""
        with self._lock:
            workers = [*self._idle, *self._busy]
        return [w.process.pid for w in workers if w.process.pid and w.process.is_alive()]

    def close(self) -> None:
        """At shutdown: end the workers now, a read under way included (its drop stays claimed
        and is read again at the next start)."""
        with self._lock:
            self._closed = True
            workers, self._idle = [*self._idle, *self._busy], []
            alive, self._alive = self._alive, None
        for worker in workers:
            worker.stop()
        for end in alive or ():
            end.close()

    # --- workers ------------------------------------------------------------------------
    def _take_slot(self) -> None:
        while not self._slots.acquire(timeout=1.0):
            if self._closed:
                raise ReadCancelled("stopped while waiting for a scan worker")
        if self._closed:
            self._slots.release()
            raise ReadCancelled("stopped while waiting for a scan worker")

    def _worker(self) -> _Worker:
        """An idle worker still alive, or a new one."""
        with self._lock:
            while self._idle:
                worker = self._idle.pop()
                if worker.process.is_alive():
                    self._busy.add(worker)
                    return worker
                worker.stop()  # died while idle (e.g. the OOM killer): not this drop's doing
        worker = self._start()
        with self._lock:
            if self._closed:
                worker.stop()
                raise ReadCancelled("stopped while starting a scan worker")
            self._busy.add(worker)
        return worker

    def _start(self) -> _Worker:
        with self._lock:
            if self._alive is None:
                self._alive = multiprocessing.Pipe(duplex=False)
            alive = self._alive[0]
        try:
            worker = _Worker(self._context(), self.memory_limit, alive)
        except (OSError, WorkerLost) as exc:
            if self._method != "forkserver":
                raise NoWorker(f"cannot start a scan worker: {exc}") from None
            log.warning("cannot start scan worker processes by the fork server; they are "
                        "started afresh each (slower); give the daemon a writable temporary "
                        "folder (PrivateTmp=yes, or TMPDIR)", reason=str(exc))
            self._method = "spawn"
            return self._start()
        if worker.limit_problem and not self._limit_warned:
            self._limit_warned = True
            log.warning("cannot limit the scan workers' memory (scan_memory_limit); a bomb "
                        "costs the whole system's memory", reason=worker.limit_problem)
        return worker

    def _context(self) -> BaseContext:
        context = multiprocessing.get_context(self._method)
        if self._method == "forkserver":
            context.set_forkserver_preload([__name__])  # type: ignore[attr-defined]
        return context

    def _give_back(self, worker: _Worker) -> None:
        with self._lock:
            self._busy.discard(worker)
            if worker.scans < SCANS_PER_WORKER and not self._closed:
                self._idle.append(worker)
                return
        worker.stop()

    def _lost(self, worker: _Worker) -> None:
        with self._lock:
            self._busy.discard(worker)
        worker.stop()


class _Worker:
    """One worker process and its own pipe: it reads the drops sent to it one at a time."""

    def __init__(self, context: BaseContext, memory_limit: int, alive: Connection) -> None:
        self.conn, theirs = context.Pipe()  # type: ignore[attr-defined]
        self.process: BaseProcess = context.Process(  # type: ignore[attr-defined]
            target=_serve, args=(theirs, memory_limit, alive), name="xnat-inbox scan worker",
            daemon=True)
        self.memory_limit = memory_limit
        self.scans = 0
        try:
            self.process.start()
        finally:
            theirs.close()
        self.limit_problem: str | None = self._hello()

    def _hello(self) -> str | None:
        """The worker's first word: ready, and whether its memory limit could be set."""
        if not wait([self.conn, self.process.sentinel], START_SECONDS) or \
                not self.conn.poll():
            self.stop()
            raise WorkerLost("the worker did not start")
        try:
            problem: str | None = self.conn.recv()
        except (EOFError, OSError):
            self.stop()
            raise WorkerLost("the worker did not start") from None
        return problem

    def run(self, job: ReadJob, timeout: float) -> Answer:
        """(True, the scan) or (False, the exception read_drop raised), and the libraries'
        warnings meanwhile."""
        self.scans += 1
        try:
            self.conn.send(job)
        except OSError:
            raise WorkerLost(self._death()) from None
        ready = wait([self.conn, self.process.sentinel], timeout or None)
        if not ready:
            raise WorkerLost(f"it took longer than scan_timeout ({timeout:g} s) and was stopped")
        if self.conn in ready or self.conn.poll():
            try:
                answer: Answer = self.conn.recv()
                return answer
            except (EOFError, OSError):
                pass  # died while answering
        raise WorkerLost(self._death())

    def _death(self) -> str:
        self.process.join(5)
        code = self.process.exitcode
        if code == EXIT_OUT_OF_MEMORY:
            return f"it ran out of memory (scan_memory_limit {self.memory_limit} bytes)"
        if code is not None and code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else "?"
            hint = " (e.g. the kernel's OOM killer)" if -code == signal.SIGKILL else ""
            return f"it was killed by signal {-code} ({name}){hint}"
        return f"it exited with status {code}"

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()  # an idle worker ends at the pipe's end
        self.process.join(0.5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


# --- in the worker ----------------------------------------------------------------------------

def _serve(conn: Connection, memory_limit: int, alive: Connection) -> None:
    # systemd's stop signals the whole cgroup: the daemon ends its workers itself, so that a
    # read cut short by a stop is never taken for a crash of that drop's doing
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_the_daemon(alive)
    conn.send(_limit_memory(memory_limit))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return  # the daemon retired this worker, or is gone
        try:
            _send(conn, _answer(job))
        except MemoryError:
            os._exit(EXIT_OUT_OF_MEMORY)


def _send(conn: Connection, answer: Answer) -> None:
    try:
        conn.send(answer)
    except (pickle.PicklingError, TypeError, AttributeError):  # an exception that won't pickle
        conn.send((False, RuntimeError(repr(answer[1])), answer[2]))


def _answer(job: ReadJob) -> Answer:
    # the libraries' warnings go back with the answer, not as raw lines to the daemon's stderr
    with collected() as warned:
        try:
            ok, value = True, read_drop(job)
        except MemoryError:
            raise
        except Exception as exc:  # sent back and raised in the daemon: UnpackError, OSError
            ok, value = False, exc
    return ok, value, warned


def _limit_memory(limit: int) -> str | None:
    """Lower this process's address space to `limit` bytes (0: leave it); the problem, if any."""
    if not limit:
        return None
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY and hard <= limit:
            return None  # already lower than asked
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (OSError, ValueError) as exc:
        return str(exc)
    return None


def _exit_with_the_daemon(alive: Connection) -> None:
    """Exit as soon as the daemon is gone, however it ended, even in the middle of a drop."""

    def wait_for_eof() -> None:
        with contextlib.suppress(EOFError, OSError):
            alive.recv()  # nothing is ever sent: this returns at EOF, when the daemon's end closes
        os._exit(0)

    threading.Thread(target=wait_for_eof, name="exit with the daemon", daemon=True).start()
