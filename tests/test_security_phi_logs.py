"""People name drops after the patient (`Doe_Jane_MRN4711`). Before a drop's headers are read
nothing can tell that its name holds PHI: the service's log names it by its id and inbox until
then, and by its name with the PHI masked after. A StudyInstanceUID is hashed in every output
(console, JSON, journal) unless `log_phi: true`. The report still lies beside the originals,
named after them."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_runner import DaemonProcess, dicom_destination, wait_for_report, write_config
from tests.security_support import ATTACKER, Lab
from tests.systemd_support import site
from tests.test_e2e_cstore import copy_in
from xnat_inbox.commands.synthetic import Patient, SeriesSpec, write_session
from xnat_inbox.logs import hashed_uid

pytestmark = pytest.mark.security

NAME = "Doe_Jane_MRN4711"
PATIENT = Patient(patient_id="MRN4711", patient_name="Doe^Jane", birth_date="19800101")
#: what of the patient must not reach the service's log
PHI = ("Doe", "Jane", "MRN4711", "19800101")


def assert_no_phi(text: str, where: str, *also: str) -> None:
    for value in (*PHI, *also):
        assert value not in text, f"{value!r} appears in the {where}"


def events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def wait_for_text(process: DaemonProcess, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in process.text():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {text!r} in the daemon log:\n{process.text()[-3000:]}")
        time.sleep(0.05)


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_a_drop_named_after_the_patient_is_never_named_in_the_log(tmp_path, inprocess_scp,
                                                                   gate, log_format):
    """Claimed, stuck mid-send, killed, resumed by the next start, delivered: two daemons' whole
    logs hold neither the patient's name, ID and birth date nor the full StudyInstanceUID."""
    held = gate(2)
    config, (inbox,) = site(tmp_path, inprocess_scp(status_for=held), hung_worker_seconds=1)
    session = write_session(tmp_path / "src" / NAME, patient=PATIENT,
                            series=(SeriesSpec("T1", 4),))
    first = DaemonProcess(config, tmp_path / "daemon-1.log", log_format=log_format)
    second = DaemonProcess(config, tmp_path / "daemon-2.log", log_format=log_format)
    try:
        first.launch()
        wait_for_text(first, "watching")
        copy_in(tmp_path / "src" / NAME, inbox)
        wait_for_text(first, "worker stuck")  # the C-STORE of the third instance is held
        assert first.proc is not None
        first.proc.kill()  # a crash: the drop stays claimed for the next start
        first.proc.wait(timeout=30)
        held.opened.set()
        second.launch()
        outcome, report, report_path = wait_for_report(inbox, NAME, daemon=second)
    finally:
        first.stop()
        second.stop()

    assert outcome == "done", report["reasons"]
    # the originals keep their name, and the report beside them is named after them
    assert report_path.name == f"{NAME}.report.json" and report_path.with_name(NAME).is_dir()
    logs = {"first daemon's log": first.text(), "second daemon's log": second.text()}
    for where, text in logs.items():
        assert_no_phi(text, where, session.study_uid)
    assert "worker stuck" in logs["first daemon's log"]
    assert "resuming claimed drop" in logs["second daemon's log"]
    assert hashed_uid(session.study_uid) in logs["second daemon's log"]
    if log_format == "json":
        lines = events(logs["first daemon's log"]) + events(logs["second daemon's log"])
        by_event = {line["event"].split(":")[0].split(";")[0]: line for line in lines}
        for early in ("claimed", "resuming claimed drop"):  # before the headers are read
            assert "drop" not in by_event[early]
            assert by_event[early]["inbox"] == str(inbox)
            assert by_event[early]["drop_id"] == report["drop"]["id"]
        # after the headers were read (the worker may be stuck before or after): masked
        assert {line.get("drop") for line in lines if "drop_id" in line} == {None, "[PHI]_[PHI]"}
        assert by_event["scanned"]["drop"] == "[PHI]_[PHI]"
        assert by_event["sent"]["study"] == hashed_uid(session.study_uid)


def test_a_claim_failure_names_the_inbox_not_the_drop(lab: Lab, inprocess_scp):
    """A folder the daemon may not rename (a lab member's, not group-writable) stays where it
    is; the failure is logged with the inbox, and the name never reaches the log."""
    scp = inprocess_scp()
    state = lab.root / "state"
    config = write_config(lab.root, {"scp": dicom_destination(scp)}, [{
        "path": str(lab.share), "route": {"destination": "scp", "project": "P",
                                          "subject": "{PatientID}", "session": "S"}}],
        state_dir=str(state))
    folder = lab.root / "staging" / NAME
    write_session(folder, patient=PATIENT, series=(SeriesSpec("T1", 1),))
    lab.give(folder.parent, ATTACKER, 0o755)  # readable by the group, writable by its owner
    daemon = lab.daemon(config, lab.root / "daemon.log")
    try:
        daemon.start()
        lab.attacker("mv", str(folder), str(lab.share / NAME))
        deadline = time.monotonic() + 60
        while not [e for e in daemon.events() if e.get("event") == "claim failed"]:
            assert time.monotonic() < deadline, daemon.text()[-3000:]
            time.sleep(0.05)
    finally:
        daemon.stop()

    failed = next(e for e in daemon.events() if e.get("event") == "claim failed")
    assert failed["inbox"] == str(lab.share) and "drop" not in failed
    assert "Permission denied" in failed["reason"]
    assert_no_phi(daemon.text(), "daemon log")
    assert os.path.isdir(lab.share / NAME)  # left where it was
    assert not list(lab.share.glob(".xnat-inbox/work/*/*"))


def test_the_drop_log_beside_the_report_keeps_the_study_uid(tmp_path, inprocess_scp, daemon):
    config, (inbox,) = site(tmp_path, inprocess_scp())
    session = write_session(tmp_path / "src" / NAME, patient=PATIENT,
                            series=(SeriesSpec("T1", 2),))
    process = daemon(config)
    copy_in(tmp_path / "src" / NAME, inbox)
    outcome, _, report_path = wait_for_report(inbox, NAME, daemon=process)
    assert outcome == "done"
    drop_log = Path(report_path.with_name(f"{NAME}.log")).read_text()
    assert session.study_uid in drop_log  # as in its report: the person who dropped it reads it
    assert_no_phi(process.text(), "daemon log", session.study_uid)
