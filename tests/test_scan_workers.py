"""Scans in worker processes: the same result as in the daemon's own process, a worker that
dies costs only time, and no worker outlives the daemon (SIGTERM or kill -9)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.daemon_runner import DaemonProcess, dicom_destination, wait_for_report, write_config
from tests.peers import StoreSCP, descendants, pid_exists
from tests.test_e2e_cstore import ROUTE
from xnat_inbox.commands.synthetic import SeriesSpec, write_session
from xnat_inbox.reading.scan import scan_drop
from xnat_inbox.reading.scan_workers import ScanWorkers


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
def test_a_scan_worker_that_dies_costs_only_time(tmp_path):
    root = odd_drop(tmp_path / "drop")
    expected = scan_drop(root)
    workers = ScanWorkers(1)
    try:
        assert workers.scan(root) == expected
        [first] = workers.pids()
        os.kill(first, signal.SIGKILL)  # e.g. the OOM killer
        assert wait_gone({first}) == set()
        with capture_logs() as events:
            assert workers.scan(root) == expected  # in the daemon's own process this time
        [warning] = [e for e in events if e["log_level"] == "warning"]
        assert "scan worker process died" in warning["event"] and warning["root"] == str(root)
        assert workers.scan(root) == expected  # and new workers for the next drops
        assert workers.pids() and first not in workers.pids()
    finally:
        workers.close()


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
