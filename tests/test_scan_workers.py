"""Scans in worker processes: the same result as in the daemon's own process, a worker that
dies between drops costs only time, one that dies reading a drop is that drop's loss, and no
worker outlives the daemon (SIGTERM or kill -9)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.daemon_runner import DaemonProcess, dicom_destination, wait_for_report, write_config
from tests.peers import StoreSCP, descendants, pid_exists
from tests.test_e2e_cstore import ROUTE
from xnat_inbox.commands.synthetic import SeriesSpec, write_session
from xnat_inbox.reading.scan import scan_drop
from xnat_inbox.reading.scan_workers import ReadJob, ScanWorkers, WorkerLost


def odd_drop(root: Path) -> Path:
    """DICOM in two series beside junk, a non-DICOM file, a broken one and a symlink."""
    session = write_session(root / "s", series=(SeriesSpec("T1", 3), SeriesSpec("T2", 2)))
    (root / "Thumbs.db").write_bytes(b"junk")
    (root / "notes.txt").write_text("not DICOM")
    (root / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 40)
    (root / "link.dcm").symlink_to(session.files[0])
    return root


def wait_gone(pids: set[int], timeout: float = 10) -> set[int]:
    deadline = time.monotonic() + timeout
    while (alive := {pid for pid in pids if pid_exists(pid)}) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def test_a_worker_scans_exactly_what_the_daemon_itself_scans(tmp_path):
    root = odd_drop(tmp_path / "drop")
    workers = ScanWorkers(2)
    try:
        in_worker = workers.scan(root)
        pids = set(workers.pids())
    finally:
        workers.close()
    assert pids and os.getpid() not in pids  # it ran elsewhere
    assert in_worker == scan_drop(root)  # every file's kind and reason, studies, PHI values
    assert len(in_worker.files) == 9 and len(in_worker.studies) == 1
    assert wait_gone(pids) == set()  # close() ended them


@pytest.mark.faults
def test_a_scan_worker_that_dies_idle_costs_only_time(tmp_path):
    root = odd_drop(tmp_path / "drop")
    expected = scan_drop(root)
    workers = ScanWorkers(1)
    try:
        assert workers.scan(root) == expected
        [first] = workers.pids()
        os.kill(first, signal.SIGKILL)  # e.g. the OOM killer, between two drops
        assert wait_gone({first}) == set()
        with capture_logs() as events:
            assert workers.scan(root) == expected  # a new worker: not this drop's doing
        assert not [e for e in events if e["log_level"] == "warning"]
        assert workers.pids() and first not in workers.pids()
    finally:
        workers.close()


@pytest.mark.faults
def test_a_worker_killed_reading_a_drop_is_that_drops_loss_and_never_read_here(tmp_path):
    """The drop that was being read is named (WorkerLost, with the signal); it is not read
    again in the calling process, where a bomb would cost the daemon."""
    root = tmp_path / "drop"
    root.mkdir()
    with open(root / "zeros.dcm", "wb") as sparse:  # pydicom walks 8-byte elements for hours
        sparse.truncate(10 * 2**30)
    workers = ScanWorkers(1)
    lost: list[BaseException] = []
    reading = threading.Thread(target=lambda: _read_into(workers, root, lost))
    try:
        reading.start()
        pid = _worker_pid(workers)
        os.kill(pid, signal.SIGKILL)
        reading.join(30)
        assert not reading.is_alive()
        [error] = lost
        assert isinstance(error, WorkerLost)
        assert "killed by signal 9 (SIGKILL)" in str(error)
    finally:
        workers.close()
        reading.join(30)


def _read_into(workers: ScanWorkers, root: Path, outcome: list[BaseException]) -> None:
    try:
        workers.read(ReadJob(root))
    except BaseException as exc:
        outcome.append(exc)


def _worker_pid(workers: ScanWorkers, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while not (pids := workers.pids()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pids, "no scan worker started"
    return pids[0]


@pytest.mark.faults
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_no_scan_worker_outlives_the_daemon(tmp_path, how):
    inbox = tmp_path / "inbox"
    with StoreSCP(tmp_path / "scp") as scp:
        config = write_config(tmp_path, {"scp": dicom_destination(scp)},
                              [{"path": str(inbox), "route": {"destination": "scp", **ROUTE,
                                                              "series": None}}])
        daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
        try:
            write_session(inbox / "S1", series=(SeriesSpec("T1", 3),))
            outcome, report, _ = wait_for_report(inbox, "S1", timeout=30)
            assert outcome == "done", report["reasons"]
            workers = descendants(daemon.pid)
            assert workers, "the scan ran in no process of its own"
            if how == "SIGKILL":
                os.kill(daemon.pid, signal.SIGKILL)
                assert daemon.proc is not None
                daemon.proc.wait(timeout=10)
            else:
                assert daemon.stop() == 0
        finally:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.stop()
        assert wait_gone(workers) == set(), daemon.text()[-2000:]
