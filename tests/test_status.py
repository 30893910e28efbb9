"""`xnat-inbox status` against the real daemon: whether it runs and since when, drops settling,
waiting, sending, done and failed today, destinations' health; every figure true now."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_runner import (
    REPO,
    DaemonProcess,
    dicom_destination,
    wait_for_report,
    work_area_left,
    write_config,
)
from tests.peers import free_port, pid_exists
from xnat_inbox.commands.status import gather, status_lines
from xnat_inbox.commands.synthetic import Patient, SeriesSpec, write_session
from xnat_inbox.config import load_config
from xnat_inbox.service.lease import LEASE_FILE, Lease, LeaseHeld, holder
from xnat_inbox.service.state import State

ROUTE = {"project": "Proj", "subject": "{PatientID}", "session": "{PatientID}_{StudyDate}"}

pytestmark = pytest.mark.ops


def status(config: Path) -> tuple[int, dict[str, Any], str]:
    """(exit code, the --json summary, the text)."""
    as_json = subprocess.run([sys.executable, "-m", "xnat_inbox", "--config", str(config),
                              "status", "--json"], capture_output=True, text=True, cwd=REPO,
                             timeout=60)
    text = subprocess.run([sys.executable, "-m", "xnat_inbox", "--config", str(config),
                           "status"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert as_json.returncode == text.returncode, as_json.stderr + text.stderr
    return as_json.returncode, json.loads(as_json.stdout), text.stdout


def status_until(config: Path, condition: Callable[[dict[str, Any]], bool],
                 timeout: float = 30) -> tuple[dict[str, Any], str]:
    deadline = time.monotonic() + timeout
    while True:
        _, summary, text = status(config)
        if condition(summary):
            return summary, text
        if time.monotonic() > deadline:
            raise AssertionError(f"status never showed it within {timeout} s:\n{text}")
        time.sleep(0.2)


def site(tmp_path: Path, destination: dict[str, Any], **inbox: Any) -> tuple[Path, Path]:
    path = tmp_path / "inbox"
    config = write_config(tmp_path, {"scp": destination},
                          [{"path": str(path), "route": {"destination": "scp", **ROUTE},
                            **inbox}])
    return config, path


def copy_in(tmp_path: Path, inbox: Path, name: str, patient: str = "P1",
            studies: int = 1) -> None:
    """A drop of `studies` one-file studies, written aside and renamed in at once."""
    staging = tmp_path / "staging" / name
    for n in range(studies):
        write_session(staging / f"s{n}", series=(SeriesSpec("T1", 1),), patient=Patient(patient))
    staging.rename(inbox / name)


def test_status_says_whether_the_daemon_runs_and_a_stopped_one_knows_no_health(tmp_path,
                                                                                storescp):
    """3: running (pid, since when) or not, a kill -9 included; with the daemon stopped a
    destination's health is unknown, not `up`; a second daemon is refused."""
    config, inbox = site(tmp_path, dicom_destination(storescp))
    before = datetime.now().astimezone().replace(microsecond=0)
    first = DaemonProcess(config, tmp_path / "daemon-1.log").start()
    try:
        copy_in(tmp_path, inbox, "MR1")
        assert wait_for_report(inbox, "MR1", daemon=first)[0] == "done"
        code, summary, text = status(config)
        assert code == 0
        assert summary["daemon"]["running"] is True and summary["daemon"]["pid"] == first.pid
        assert before <= datetime.fromisoformat(summary["daemon"]["since"]) <= \
            datetime.now().astimezone()
        assert f"daemon: running (pid {first.pid}) since {summary['daemon']['since']}" in text
        [scp] = summary["destinations"]
        assert scp["state"] == "up" and scp["last_delivery"] is not None
        assert "  scp: up since " in text

        second = subprocess.run([sys.executable, "-m", "xnat_inbox", "--config", str(config),
                                 "run"], capture_output=True, text=True, cwd=REPO, timeout=60)
        assert second.returncode == 2
        assert f"another xnat-inbox daemon (pid {first.pid}" in second.stderr
    finally:
        assert first.stop() == 0

    code, summary, text = status(config)
    assert code == 1
    assert summary["daemon"] == {"running": False, "pid": None, "since": None}
    assert text.startswith("daemon: NOT RUNNING")
    [scp] = summary["destinations"]
    assert scp["state"] == "unknown" and scp["last_known"]["state"] == "up"
    assert "  scp: unknown (daemon not running); last known: up since " in text
    assert "  scp: up" not in text

    # a crash leaves the lease file with its pid, never the lock: read as not running
    crashed = DaemonProcess(config, tmp_path / "daemon-2.log").start()
    try:
        assert status(config)[1]["daemon"]["pid"] == crashed.pid
        assert crashed.proc is not None
        crashed.proc.kill()
        crashed.proc.wait(timeout=30)
    finally:
        crashed.stop()
    assert not pid_exists(crashed.pid)
    assert str(crashed.pid) in (tmp_path / "state" / LEASE_FILE).read_text()
    code, summary, text = status(config)
    assert code == 1 and summary["daemon"]["running"] is False and "NOT RUNNING" in text


def test_status_shows_drops_settling_and_what_waits_for_a_stopped_daemon(tmp_path, storescp):
    """3: a drop settling is shown while the daemon settles it; once the daemon stops, what is
    in the inboxes is shown as not taken, not as settling."""
    config, inbox = site(tmp_path, dicom_destination(storescp), settle_seconds=60)
    (inbox / "StudyV").mkdir()
    (inbox / "StudyV" / "route.yaml").write_text("project: StudyV\n")
    proc = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        copy_in(tmp_path, inbox / "StudyV", "v1")
        summary, text = status_until(config, lambda s: bool(s["settling"]))
        [settling] = summary["settling"]  # the routing folder is no drop
        assert (settling["drop"], settling["inbox"], settling["settle_seconds"]) == \
            ("StudyV/v1", str(inbox), 60)
        assert "settling: 1" in text
        assert f"  StudyV/v1 in {inbox}: seen {settling['seen']}, taken once quiet for 60 s" \
            in text
        assert summary["waiting"] == [] and summary["sending"] == []
    finally:
        assert proc.stop() == 0
    code, summary, text = status(config)
    assert code == 1
    assert summary["settling"] == []
    assert summary["not_taken"] == [{"inbox": str(inbox), "drop": "StudyV/v1"}]
    assert "settling" not in text and "in the inboxes, not taken: 1" in text


def test_done_and_failed_today_list_what_is_there_now_each_once(tmp_path, inprocess_scp,
                                                                 daemon):
    """3: "done today"; "failed today" lists neither a drop retried and delivered since nor one
    twice that failed again after a retry, and every path it names exists."""
    refused = {"PA", "PB"}
    scp = inprocess_scp(status_for=lambda ds, _: 0xC000 if str(ds.PatientID) in refused
                        else 0x0000)
    config, inbox = site(tmp_path, dicom_destination(scp))
    proc = daemon(config)
    copy_in(tmp_path, inbox, "A", "PA")
    copy_in(tmp_path, inbox, "B", "PB")
    failed = {name: wait_for_report(inbox, name, daemon=proc) for name in ("A", "B")}
    assert {name: found[0] for name, found in failed.items()} == {"A": "failed", "B": "failed"}
    assert len(status(config)[1]["failed_today"]) == 2

    refused.discard("PA")
    for name in ("A", "B"):
        result = subprocess.run([sys.executable, "-m", "xnat_inbox", "--config", str(config),
                                 "retry", str(failed[name][2].with_name(name))],
                                capture_output=True, text=True, cwd=REPO, timeout=60)
        assert result.returncode == 0, result.stderr
    assert wait_for_report(inbox, "A", daemon=proc)[0] == "done"
    deadline = time.monotonic() + 60
    while not list(inbox.glob("failed/*/B*.report.json")) and time.monotonic() < deadline:
        time.sleep(0.1)  # B failed again (its first report was renamed by the retry)
    assert list(inbox.glob("failed/*/B*.report.json")), proc.text()[-3000:]
    assert not work_area_left(inbox)

    _, summary, text = status(config)
    assert [d["drop"] for d in summary["failed_today"]] == ["B"]
    assert all(Path(d["moved_to"]).exists() for d in summary["failed_today"])
    assert [d["drop"] for d in summary["done_today"]] == ["A"]
    assert Path(summary["done_today"][0]["moved_to"]).exists()
    assert "done today: 1\n  A -> " in text
    assert "failed today: 1\n  B -> " in text


def test_a_retry_wait_shows_every_file_of_the_drop_and_when_it_is_tried_again(tmp_path):
    """3: during a retry wait a 3-file drop (three one-file studies) counts 3 files, none
    stored, and says it waits to retry; not `sending 0/1`."""
    nobody = type("Peer", (), {"host": "127.0.0.1", "port": free_port(), "aet": "DOWN"})
    destination = dicom_destination(nobody, retry={"max_attempts": 3, "initial_backoff": 60,
                                                   "max_backoff": 60})
    config, inbox = site(tmp_path, destination)
    proc = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        copy_in(tmp_path, inbox, "MR3", studies=3)
        summary, text = status_until(config, lambda s: any(
            d.get("state") == "retry" for d in s["waiting"]))
        [waiting] = summary["waiting"]
        assert (waiting["drop"], waiting["files"], waiting["stored"]) == ("MR3", 3, 0)
        assert summary["sending"] == []
        assert waiting["next_try"] is not None
        assert f"  MR3 -> scp: 0 of 3 file(s) stored; waiting to retry, next try " \
               f"{waiting['next_try']}; attempt 1 failed" in text
        assert "sending: 0" in text
    finally:
        assert proc.stop() == 0
    _, summary, text = status(config)
    [held] = summary["waiting"]
    assert (held["state"], held["files"], held["stored"]) == ("held", 3, 0)
    assert "  MR3 -> scp: 0 of 3 file(s) stored; held in the work area; resumes when the " \
           "daemon starts" in text


def test_the_lease_is_held_once_and_released(tmp_path):
    assert holder(tmp_path) is None
    lease = Lease(tmp_path)
    taken = lease.acquire()
    assert holder(tmp_path) == taken
    with pytest.raises(LeaseHeld, match=f"another xnat-inbox daemon \\(pid {taken.pid}, since "):
        Lease(tmp_path).acquire(wait=0)
    lease.release()
    assert holder(tmp_path) is None
    assert (tmp_path / LEASE_FILE).exists()  # the stale record stays and is not believed


def test_status_reads_claimed_drops_from_the_state_database(tmp_path):
    """Each claimed drop in its place: queued, being read, sending (with a REST upload's files
    sent before they are acknowledged), waiting to retry; a drop whose work folder is gone (it
    finished a moment ago) is not shown."""
    inbox_path = tmp_path / "inbox"
    config = load_config(write_config(tmp_path, {"scp": {"type": "dicom", "host": "127.0.0.1",
                                                         "port": 1, "called_ae": "X"}},
                                      [{"path": str(inbox_path)}]))
    inbox = config.inboxes[0]
    state = State(config.state_dir)
    lease = Lease(config.state_dir)
    lease.acquire()
    try:
        for n, name in enumerate(("QUEUED", "READING", "REST", "RETRY", "GONE")):
            state.drop_stage(f"d{n}", "claimed", inbox=str(inbox.path), origin=name, name=name,
                             claimed_at=f"2026-11-25T10:00:0{n}")
            if name != "GONE":
                (inbox.work / f"d{n}").mkdir(parents=True)
        state.start_attempt("d1", "scp")
        state.start_attempt("d2", "scp")
        state.drop_stage("d2", "sending", destination="scp", total=30)
        state.record_progress("d2", "scp", "1.2.3", 12, 1_500_000)
        state.record_progress("d2", "scp", "1.2.3", 20, 2_500_000)  # replaces, per study
        attempt = state.start_attempt("d3", "scp")
        state.drop_stage("d3", "sending", destination="scp", total=10)
        for n in range(4):
            state.record_instance("d3", "scp", "1.2", f"1.2.{n}", True, 0, None)
        state.end_attempt("d3", attempt, "TransientFailure", "association aborted")
        state.destination_health("scp", up=False, error="refused", next_try=time.time() + 60)
        summary = gather(config, state)
        lines = status_lines(summary)
        assert state.acknowledged("d3", "scp").keys() == {f"1.2.{n}" for n in range(4)}
    finally:
        lease.release()
        state.close()
    assert [(d["drop"], d["state"]) for d in summary["waiting"]] == [("QUEUED", "queued"),
                                                                    ("RETRY", "retry")]
    assert [(d["drop"], d["state"]) for d in summary["sending"]] == [("READING", "reading"),
                                                                    ("REST", "sending")]
    retry = summary["waiting"][1]
    assert (retry["files"], retry["stored"], retry["last_attempt"]["reason"]) == \
        (10, 4, "association aborted")
    assert "  QUEUED -> ?: queued behind the destination's other drops" in lines
    assert "  READING -> scp: reading the drop (attempt 1)" in lines
    assert "  REST -> scp: 0 of 30 file(s) stored (sent 20 file(s), 2.5 MB)" in lines
    assert f"  RETRY -> scp: 4 of 10 file(s) stored; waiting to retry, next try " \
           f"{retry['next_try']}; attempt 1 failed: association aborted" in lines
    assert f"  scp: DOWN since {summary['destinations'][0]['since']}: refused (next try " \
           f"{retry['next_try']})" in lines
