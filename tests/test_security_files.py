"""Hostile lab members against the daemon's files: links, swaps, planted and replaced folders,
forged claims and reports. Three accounts on a setgid share (tests/security_support.py): the
daemon, an attacker and the victim whose data the attacker tries to have sent or deleted.
Each test reproduces a finding of issue 23 (items 1, 2 and 9)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_runner import (
    REPO,
    DaemonProcess,
    dicom_destination,
    wait_for_report,
    write_config,
)
from tests.security_support import ATTACKER, DAEMON, GROUP, Lab, without_capabilities
from tests.systemd_support import Gate
from xnat_inbox.commands.synthetic import Patient, SeriesSpec, SessionInfo, write_session

pytestmark = pytest.mark.security

ROUTE = {"destination": "scp", "project": "Proj", "subject": "{PatientID}",
         "session": "{PatientID}_{StudyDate}"}
VICTIM_PATIENT = Patient("VICTIM01", "Victim^Vera", "19700101")


@pytest.fixture
def site(lab: Lab, inprocess_scp: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """The daemon on the lab's share, sending to an in-process SCP; stopped by PID after."""
    started: list[DaemonProcess] = []

    def start(scp: Any = None, **inbox: Any) -> tuple[DaemonProcess, Any]:
        scp = scp or inprocess_scp()
        config = write_config(lab.root, {"scp": dicom_destination(scp, dimse_timeout=120)},
                              [{"path": str(lab.share), "route": ROUTE, **inbox}])
        process = lab.daemon(config, lab.root / f"daemon-{len(started)}.log")
        started.append(process)
        process.start()
        return process, scp

    yield start
    for process in started:
        process.stop()


def victim_data(lab: Lab) -> SessionInfo:
    """Another lab's delivered session: the daemon can read it, the attacker can't."""
    folder = lab.root / "other-lab" / "done" / "PatientX"
    session = write_session(folder, series=(SeriesSpec("T1", 3),), patient=VICTIM_PATIENT)
    (lab.root / "other-lab").chmod(0o700)  # owner: the daemon's uid (root, no capabilities)
    assert lab.attacker("ls", str(folder), check=False).returncode != 0
    return session


def attacker_session(lab: Lab, name: str, instances: int = 3) -> Any:
    """A session of the attacker's own, written where they can move it into the inbox."""
    source = lab.root / "staging" / name
    session = write_session(source, series=(SeriesSpec("T1", instances),),
                            patient=Patient(f"ATT{name[-2:]}"))
    lab.give(lab.root / "staging", ATTACKER, 0o775)
    return session


def move_in(lab: Lab, name: str, target: str | None = None) -> Path:
    lab.attacker("mv", str(lab.root / "staging" / name), str(lab.share / (target or name)))
    return lab.share / (target or name)


def received_uids(scp: Any) -> set[str]:
    return {str(ds.SOPInstanceUID) for ds in scp.received}


def test_a_link_put_in_the_inbox_is_left_alone_and_never_followed(lab, site):
    victim = victim_data(lab)
    daemon, scp = site()
    lab.attacker("ln", "-s", str(victim.files[0].parent.parent), str(lab.share / "PatientX"))
    ours = attacker_session(lab, "MR01")
    move_in(lab, "MR01")

    outcome, _, _ = wait_for_report(lab.share, "MR01", daemon=daemon)
    assert outcome == "done"
    time.sleep(1.5)  # past the quiet period the link would have needed
    assert received_uids(scp) == set(ours.sop_instance_uids)
    assert not received_uids(scp) & set(victim.sop_instance_uids)
    assert (lab.share / "PatientX").is_symlink()  # left in place
    assert any("symbolic link" in e["event"] for e in daemon.events())


def test_a_drop_swapped_for_a_link_while_it_settles_is_not_followed(lab, site):
    victim = victim_data(lab)
    daemon, scp = site(settle_seconds=3)
    attacker_session(lab, "MR02")
    move_in(lab, "MR02")
    time.sleep(0.5)  # the daemon tracks MR02 as a folder now
    lab.attacker("mv", str(lab.share / "MR02"), str(lab.share / "MR02.real"))
    lab.attacker("ln", "-s", str(victim.files[0].parent.parent), str(lab.share / "MR02"))

    outcome, _, _ = wait_for_report(lab.share, "MR02.real", daemon=daemon)
    assert outcome == "done"
    time.sleep(4)  # a whole quiet period more for the link
    assert not received_uids(scp) & set(victim.sop_instance_uids)
    assert (lab.share / "MR02").is_symlink()
    assert not list(lab.share.glob("*/*/MR02")) and not list(lab.share.glob("*/*/MR02.report.json"))


SWAPPER = """
import os, sys, time
folder, victim, go, done = sys.argv[1:5]
fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)  # held from before the claim
open(done + ".ready", "w").close()
while not os.path.exists(go):
    time.sleep(0.05)
series = os.listdir(fd)[0]
inner = os.open(series, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
last = sorted(os.listdir(inner))[-1]
os.unlink(last, dir_fd=inner)
os.symlink(victim, last, dir_fd=inner)
open(done, "w").close()
"""


class HeldGate(Gate):
    """Holds the `at`-th instance, and says when it is being held."""

    def __init__(self, at: int) -> None:
        super().__init__(at)
        self.reached = threading.Event()

    def __call__(self, dataset: object, index: int) -> int:
        if index == self.at:
            self.reached.set()
        return super().__call__(dataset, index)


def test_a_file_swapped_through_a_held_folder_after_the_scan_is_not_sent(lab, site,
                                                                          inprocess_scp):
    victim = victim_data(lab)
    gate = HeldGate(at=0)  # the receiver holds the first instance until the swap is done
    daemon, scp = site(scp=inprocess_scp(status_for=gate))
    ours = attacker_session(lab, "MR03")
    signals = lab.root / "signals"
    signals.mkdir()
    lab.give(signals, ATTACKER, 0o775)
    swapper = subprocess.Popen(
        [*without_capabilities(ATTACKER), "/usr/bin/python3", "-c", SWAPPER,
         str(lab.root / "staging" / "MR03"), str(victim.files[-1]), str(signals / "go"),
         str(signals / "swapped")])
    try:
        deadline = time.monotonic() + 30
        while not (signals / "swapped.ready").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        move_in(lab, "MR03")
        assert gate.reached.wait(60)  # scanned, and the first instance is at the receiver
        (signals / "go").touch()
        assert swapper.wait(timeout=30) == 0
    finally:
        gate.opened.set()
        if swapper.poll() is None:
            swapper.kill()
            swapper.wait()

    outcome, report, _ = wait_for_report(lab.share, "MR03", daemon=daemon)
    assert outcome == "failed"
    assert not received_uids(scp) & set(victim.sop_instance_uids)
    assert received_uids(scp) == set(ours.sop_instance_uids[:-1])
    reasons = " ".join(report["reasons"] + [i.get("reason") or "" for s in report["studies"]
                                            for i in s.get("failed_instances", [])])
    assert "not followed" in json.dumps(report) or "changed since" in json.dumps(report), reasons


def test_claims_planted_before_the_daemon_made_its_work_area_are_never_believed(lab, site):
    victim = victim_data(lab)
    outside = lab.root / "outside-keep"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    area = lab.share / ".xnat-inbox" / "work" / "20260101T000000-abcdef"
    lab.attacker("mkdir", "-p", str(area))
    record = {"id": "20260101T000000-abcdef", "inbox": str(lab.share),
              "origin": "../../../other-lab/done", "name": "PatientX", "loose": False,
              "claimed_at": "2026-01-01T00:00:00+00:00"}
    lab.attacker_python(f"open({str(area / 'claim.json')!r}, 'w').write({json.dumps(record)!r})")
    lab.attacker("ln", "-s", str(outside), str(area / "PatientX"))

    daemon, scp = site()
    ours = attacker_session(lab, "MR04")
    move_in(lab, "MR04")
    outcome, _, _ = wait_for_report(lab.share, "MR04", daemon=daemon)
    assert outcome == "done"
    assert received_uids(scp) == set(ours.sop_instance_uids)
    assert not received_uids(scp) & set(victim.sop_instance_uids)
    assert (outside / "precious.txt").read_text() == "keep me"
    assert all(path.exists() for path in victim.files)
    # the planted tree is kept, set aside; the work area in use is the daemon's own
    [aside] = lab.share.glob(".xnat-inbox.not-ours-*")
    assert (aside / "work" / "20260101T000000-abcdef" / "claim.json").exists()
    work = (lab.share / ".xnat-inbox").stat()
    assert (work.st_uid, work.st_mode & 0o077) == (DAEMON, 0)


def test_a_claim_record_naming_a_path_outside_the_inbox_is_left_for_a_person(tmp_path):
    """Even inside the daemon's own work area, a record is believed only inside its inbox."""
    from xnat_inbox.config import InboxConfig
    from xnat_inbox.intake.claim import claimed_drops, work_folder

    inbox = InboxConfig(path=tmp_path / "inbox")
    inbox.path.mkdir()
    os.close(work_folder(inbox))
    for n, (origin, name) in enumerate([("../..", "victim"), (".", "../../victim"),
                                        ("/etc", "passwd")]):
        drop_id = f"20260101T00000{n}-abcdef"
        (inbox.work / drop_id).mkdir(mode=0o700)
        (inbox.work / drop_id / "claim.json").write_text(json.dumps(
            {"id": drop_id, "inbox": str(inbox.path), "origin": origin, "name": name,
             "loose": False, "claimed_at": "2026-01-01T00:00:00+00:00"}))
        (inbox.work / drop_id / "data").write_text("kept")
    assert claimed_drops(inbox) == []
    assert len(list(inbox.work.glob("*/data"))) == 3  # nothing removed


def test_a_replaced_done_folder_is_set_aside_and_the_originals_survive(lab, site):
    daemon, scp = site()
    first = attacker_session(lab, "MR05")
    move_in(lab, "MR05")
    outcome, _, first_report = wait_for_report(lab.share, "MR05", daemon=daemon)
    assert outcome == "done"
    day = first_report.parent.name
    # done/ is the daemon's: the attacker can't write in it, but can rename it in the share
    assert lab.attacker("touch", str(lab.share / "done" / day / "x"), check=False).returncode
    lab.attacker("mv", str(lab.share / "done"), str(lab.share / "done.old"))
    lab.attacker("mkdir", "-p", str(lab.share / "done" / day / "MR06"))
    lab.attacker("touch", str(lab.share / "done" / day / "MR06" / "planted"))

    second = attacker_session(lab, "MR06")
    move_in(lab, "MR06")
    outcome, report, report_path = wait_for_report(lab.share, "MR06", daemon=daemon)
    assert outcome == "done", report["reasons"]
    # the originals are in the daemon's own done/, complete; the planted folder is kept aside
    moved = report_path.with_name("MR06")
    assert sorted(p.name for p in moved.rglob("*.dcm")) == sorted(f.name for f in second.files)
    assert (lab.share / "done").stat().st_uid == DAEMON
    [aside] = lab.share.glob(".done.not-ours-*")
    assert (aside / day / "MR06" / "planted").exists()
    # the renamed done.old is the daemon's own folder, never a drop: nothing sent twice
    time.sleep(1.5)
    assert len(scp.received) == len(first.files) + len(second.files)
    assert (lab.share / "done.old" / day / "MR05").is_dir()
    assert any("daemon's own folders" in json.dumps(e) for e in daemon.events())


def test_retry_takes_only_what_the_daemon_itself_put_in_failed(lab, site):
    daemon, _ = site()
    bad = lab.root / "staging" / "MR07"
    bad.mkdir(parents=True)
    (bad / "notes.txt").write_text("not DICOM")
    lab.give(lab.root / "staging", ATTACKER, 0o775)
    move_in(lab, "MR07")
    outcome, _, report_path = wait_for_report(lab.share, "MR07", daemon=daemon)
    assert outcome == "failed"
    day = report_path.parent.name

    # a forged failed/ with a report whose origin leaves the inbox
    outside = lab.root / "outside-keep"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    lab.attacker("mv", str(lab.share / "failed"), str(lab.share / "failed.old"))
    forged = lab.share / "failed" / day / "FORGED"
    lab.attacker("mkdir", "-p", str(forged))
    report = {"drop": {"origin": "../outside-keep"}, "studies": []}
    lab.attacker_python(f"open({str(forged) + '.report.json'!r}, 'w').write("
                        f"{json.dumps(report)!r})")
    config = lab.root / "config.yaml"
    forged_retry = _cli(config, "retry", str(forged))
    assert forged_retry.returncode == 1
    assert "is not a drop this daemon put in failed/" in forged_retry.stderr
    assert (outside / "precious.txt").read_text() == "keep me"
    assert forged.is_dir()

    # the daemon's own failed drop, in its renamed folder, is not taken from there either
    renamed = _cli(config, "retry", str(lab.share / "failed.old" / day / "MR07"))
    assert renamed.returncode == 1


def test_a_route_yaml_that_is_a_link_is_refused_not_read(lab, site):
    other = lab.root / "other-lab" / "route.yaml"
    other.parent.mkdir()
    other.write_text("project: SecretProject\nsubject: '{PatientID}'\n")
    folder = lab.root / "staging" / "Study"
    write_session(folder / "MR08", series=(SeriesSpec("T1", 2),))
    lab.give(lab.root / "staging", ATTACKER, 0o775)
    lab.attacker("ln", "-s", str(other), str(folder / "route.yaml"))
    move_in(lab, "Study")
    daemon, scp = site()  # (a routing folder copied in whole while it runs: issue 16)
    outcome, report, _ = wait_for_report(lab.share, "MR08", daemon=daemon)
    assert outcome == "failed"
    assert any("symbolic link: not followed" in reason for reason in report["reasons"])
    assert "SecretProject" not in json.dumps(report)
    assert scp.received == []


def test_claim_refuses_a_link_and_leaves_it_in_place(tmp_path):
    from xnat_inbox.config import InboxConfig
    from xnat_inbox.intake.claim import ClaimError, claim
    from xnat_inbox.intake.watch import DropRef

    inbox = InboxConfig(path=tmp_path / "inbox")
    inbox.path.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (inbox.path / "MR09").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ClaimError, match="symbolic link is never followed"):
        claim(DropRef(inbox, inbox.path, "MR09"))
    assert (inbox.path / "MR09").is_symlink()
    assert not any(inbox.work.iterdir())


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The command as an administrator runs it: root, here without capabilities."""
    return subprocess.run([*without_capabilities(DAEMON, (GROUP,)), sys.executable, "-m",
                           "xnat_inbox", "--config", str(config), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
