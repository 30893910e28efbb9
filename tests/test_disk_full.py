"""A full disk in the work area or in done/: the drop waits, the log says why, and it goes on
once there is space again."""

from __future__ import annotations

import os
import subprocess
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import checksums
from tests.daemon_runner import (
    DaemonProcess,
    dicom_destination,
    wait_for_report,
    work_area_left,
    write_config,
)
from tests.test_faults import PATIENT_RETRY, PATIENT_ROUTE
from xnat_inbox.commands.synthetic import SeriesSpec, write_session

pytestmark = pytest.mark.faults


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[str, int], Path]]:
    mounted: list[Path] = []

    def mount(name: str, megabytes: int) -> Path:
        point = tmp_path / name
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs",
                                 str(point)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"a small file system is needed and mount failed: {result.stderr}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=True)


def fill(folder: Path, leave_bytes: int) -> Path:
    """A filler file that leaves about `leave_bytes` free on folder's file system."""
    stats = os.statvfs(folder)
    free = stats.f_bavail * stats.f_frsize
    filler = folder / ".filler"
    with open(filler, "wb") as out:
        out.write(b"\0" * max(free - leave_bytes, 0))
    return filler


def wait_for_event(daemon: DaemonProcess, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in str(e.get("reason", "")) for e in daemon.events()):
        assert time.monotonic() < deadline, daemon.text()[-3000:]
        time.sleep(0.1)


def test_full_work_area_then_full_done_wait_for_space(tmp_path, storescp, daemon, small_disk):
    inbox = small_disk("inbox-fs", 4)
    done = small_disk("done-fs", 2)
    config = write_config(tmp_path, {"scp": dicom_destination(storescp, retry=PATIENT_RETRY)},
                          [{"path": str(inbox), "route": PATIENT_ROUTE,
                            "done_dir": str(done / "done")}], settle_seconds=0.3)
    session = write_session(tmp_path / "src" / "BIG", series=(SeriesSpec("T1", 10),),
                            rows=256, columns=256)
    (inbox / ".staging").mkdir()  # hidden: never a drop; same file system for the rename
    archive = inbox / ".staging" / "BIG.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for path in session.files:
            zf.write(path, path.name)
    before = checksums(archive.parent)["BIG.zip"]
    proc = daemon(config)
    done_filler = fill(done, leave_bytes=200_000)  # done/ can't take 1.3 MB either
    archive.rename(inbox / "BIG.zip")
    work_filler = fill(inbox, leave_bytes=300_000)  # unpacking needs 1.3 MB

    wait_for_event(proc, "No space left on device")
    assert list(inbox.glob(".xnat-inbox/work/*/BIG.zip")), "the claimed archive must wait"
    work_filler.unlink()
    wait_for_event(proc, "cannot move")  # sent, but done/ is full: it waits again
    assert len(storescp.files()) == 10
    done_filler.unlink()
    outcome, report, path = wait_for_report(done, "BIG.zip", daemon=proc)
    assert outcome == "done", report["reasons"]
    assert checksums(path.parent)["BIG.zip"] == before
    assert not work_area_left(inbox), "nothing of ours is left behind"
    outcomes = [a["outcome"] for a in report["attempts"]]
    assert outcomes[0] == "TransientFailure" and outcomes[-1] == "done"
    assert len(storescp.files()) == 10  # acknowledged instances were not sent again
