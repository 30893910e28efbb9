"""End to end: drops in an inbox, the daemon as a process, real receivers."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import checksums
from tests.daemon_runner import dicom_destination, reports, wait_for_report, write_config
from xnat_inbox.commands.synthetic import Patient, SeriesSpec, write_session

pytestmark = pytest.mark.e2e

ROUTE = {
    "project": "Proj",
    "subject": "{PatientID}",
    "session": "{PatientID}_{StudyDate}",
    "series": {"exclude": {"SeriesDescription": "(?i)localizer"}},
}
PHI = ("SUBJ001", "Doe^Jane", "Doe", "Jane", "19800101")


def site(tmp_path: Path, peer: object, route: dict | None = None,
         **inbox: object) -> tuple[Path, Path]:
    inbox_path = tmp_path / "inbox"
    config = write_config(
        tmp_path, {"scp": dicom_destination(peer)},
        [{"path": str(inbox_path), "route": {"destination": "scp", **(route or ROUTE)}, **inbox}])
    return config, inbox_path


def copy_in(source: Path, inbox: Path, name: str | None = None) -> Path:
    """Copy a session next to the inbox first, then rename it in, as a careful user would."""
    staging = inbox.parent / f"staging-{name or source.name}"
    shutil.copytree(source, staging)
    target = inbox / (name or source.name)
    staging.rename(target)
    return target


def test_storescp_receives_every_instance_with_routing_string(tmp_path, storescp, daemon):
    session = write_session(tmp_path / "src" / "MR_0001")
    (tmp_path / "src" / "MR_0001" / "Thumbs.db").write_bytes(b"junk")
    (tmp_path / "src" / "MR_0001" / ".DS_Store").write_bytes(b"junk")
    before = checksums(tmp_path / "src" / "MR_0001")
    config, inbox = site(tmp_path, storescp)
    proc = daemon(config)

    copy_in(tmp_path / "src" / "MR_0001", inbox)
    outcome, report, report_path = wait_for_report(inbox, "MR_0001", daemon=proc)

    assert outcome == "done", report["reasons"]
    received = storescp.files()
    assert len(received) == len(session.files) - 3  # the localizer's 3 instances are filtered
    descriptions = {str(dcmread(path).StudyDescription) for path in received}
    assert descriptions == {"xnat://Proj/SUBJ001/SUBJ001_20260115"}
    # the originals moved to done/ unchanged, junk files with them
    done = report_path.with_name("MR_0001")
    assert checksums(done) == before
    listed = {entry["path"]: entry for entry in report["files"]["entries"]}
    assert listed["Thumbs.db"]["kind"] == "junk" and listed["Thumbs.db"]["outcome"] == "kept"
    assert listed[".DS_Store"]["kind"] == "junk"
    study = report["studies"][0]
    assert study["stored"] == 30 and study["instances"] == 33
    assert [s["number"] for s in study["series"] if not s["sent"]] == ["1"]
    assert report_path.with_name("MR_0001.log").read_text().count("stage=send") == 1
    # the inbox is empty again: nothing left behind, nothing in failed/
    assert sorted(p.name for p in inbox.iterdir()) == [".xnat-inbox", "done", "failed"]
    assert not list((inbox / "failed").iterdir())


def test_no_phi_in_the_daemon_log_labels_as_they_are_beside_the_originals(tmp_path, storescp,
                                                                           daemon):
    """The service's log masks PHI; the report and the drop's .log lie beside the original
    files, which hold it anyway, and name the labels as sent (issue 16, point 9)."""
    write_session(tmp_path / "src" / "MR_PHI")
    config, inbox = site(tmp_path, storescp)
    proc = daemon(config)
    copy_in(tmp_path / "src" / "MR_PHI", inbox)
    outcome, _, report_path = wait_for_report(inbox, "MR_PHI", daemon=proc)
    assert outcome == "done"
    proc.stop()
    for value in PHI:
        assert value not in proc.text(), f"{value!r} appears in the daemon log"
    assert "xnat://Proj/[PHI]/[PHI]_20260115" in proc.text()
    beside = {"report": report_path.read_text(),
              "drop log": report_path.with_name("MR_PHI.log").read_text()}
    for where, text in beside.items():
        assert "xnat://Proj/SUBJ001/SUBJ001_20260115" in text, where
        assert "[PHI]" not in text, where


def test_orthanc_holds_study_with_labels(tmp_path, orthanc, daemon):
    session = write_session(tmp_path / "src" / "MR_ORTH", patient=Patient("SUBJ042", "Roe^Rick"))
    config, inbox = site(tmp_path, orthanc)
    proc = daemon(config)
    copy_in(tmp_path / "src" / "MR_ORTH", inbox)
    outcome, report, _ = wait_for_report(inbox, "MR_ORTH", daemon=proc)
    assert outcome == "done", report["reasons"]
    study = orthanc.study_by_uid(session.study_uid)
    assert study is not None
    assert study["MainDicomTags"]["StudyDescription"] == "xnat://Proj/SUBJ042/SUBJ042_20260115"
    assert orthanc.instance_count(session.study_uid) == 30
    assert sorted(orthanc.series_descriptions(session.study_uid)) == [
        "DWI", "T1 MPRAGE", "T2 FLAIR"]


def test_two_studies_in_one_folder_are_sent_with_their_own_labels(tmp_path, storescp, daemon):
    drop = tmp_path / "src" / "TWO"
    one = write_session(drop / "a", patient=Patient("SUBJA", "A^A"), study_date="20260101")
    two = write_session(drop / "b", patient=Patient("SUBJB", "B^B"), study_date="20260202")
    config, inbox = site(tmp_path, storescp, {**ROUTE, "series": None})
    proc = daemon(config)
    copy_in(drop, inbox)
    outcome, report, _ = wait_for_report(inbox, "TWO", daemon=proc)
    assert outcome == "done", report["reasons"]
    by_uid = {s["study_instance_uid"]: s for s in report["studies"]}
    assert by_uid[one.study_uid]["labels"]["session"] == "SUBJA_20260101"
    assert by_uid[two.study_uid]["labels"]["session"] == "SUBJB_20260202"
    strings: dict[str, set[str]] = {}
    for path in storescp.files():
        ds = dcmread(path)
        strings.setdefault(str(ds.StudyInstanceUID), set()).add(str(ds.StudyDescription))
    assert strings == {one.study_uid: {"xnat://Proj/SUBJA/SUBJA_20260101"},
                       two.study_uid: {"xnat://Proj/SUBJB/SUBJB_20260202"}}
    assert all(s["associations"] == 1 for s in report["studies"])


def test_patient_comments_routing_field(tmp_path, storescp, daemon):
    write_session(tmp_path / "src" / "PC", series=(SeriesSpec("T1", 2),))
    config, inbox = site(tmp_path, storescp, {**ROUTE, "routing_field": "patient_comments"})
    proc = daemon(config)
    copy_in(tmp_path / "src" / "PC", inbox)
    assert wait_for_report(inbox, "PC", daemon=proc)[0] == "done"
    comments = {str(dcmread(p).PatientComments) for p in storescp.files()}
    assert comments == {"Project: Proj Subject: SUBJ001 Session: SUBJ001_20260115"}
    assert {str(dcmread(p).StudyDescription) for p in storescp.files()} == {"Brain MRI"}


def test_slowly_copied_folder_is_sent_once_and_complete(tmp_path, storescp, daemon):
    source = write_session(tmp_path / "src" / "SLOW", series=(SeriesSpec("T1", 12),))
    config, inbox = site(tmp_path, storescp, {**ROUTE, "series": None}, settle_seconds=1.5)
    proc = daemon(config)
    target = inbox / "SLOW"

    def copy_slowly() -> None:
        for path in source.files:
            dest = target / path.relative_to(tmp_path / "src" / "SLOW")
            dest.parent.mkdir(parents=True, exist_ok=True)
            data = path.read_bytes()
            with open(dest, "wb") as out:  # half a file, a pause, the rest
                out.write(data[: len(data) // 2])
                out.flush()
                time.sleep(0.3)
                out.write(data[len(data) // 2:])
            time.sleep(0.4)  # pauses shorter than settle_seconds

    copier = threading.Thread(target=copy_slowly)
    copier.start()
    copier.join()
    outcome, report, _ = wait_for_report(inbox, "SLOW", daemon=proc)
    time.sleep(2.5)  # long enough for a second, wrong drop to appear if one were made
    assert outcome == "done", report["reasons"]
    assert len(reports(inbox)) == 1
    assert report["studies"][0]["stored"] == 12
    assert len(storescp.files()) == 12


def test_receiver_down_sends_drop_to_failed_with_reason(tmp_path, storescp, daemon):
    write_session(tmp_path / "src" / "DOWN", series=(SeriesSpec("T1", 3),))
    before = checksums(tmp_path / "src" / "DOWN")
    config, inbox = site(tmp_path, storescp)
    storescp.stop()
    proc = daemon(config)
    copy_in(tmp_path / "src" / "DOWN", inbox)
    outcome, report, path = wait_for_report(inbox, "DOWN", daemon=proc)
    assert outcome == "failed"
    assert any(f"127.0.0.1:{storescp.port}" in reason and "no DICOM receiver answered" in reason
               for reason in report["reasons"]), report["reasons"]
    assert "gave up after 2 attempt(s)" in report["reasons"][0]
    assert [a["outcome"] for a in report["attempts"]] == ["TransientFailure", "TransientFailure",
                                                          "failed"]
    assert checksums(path.with_name("DOWN")) == before
    entries = report["files"]["entries"]
    assert {e["outcome"] for e in entries} == {"not sent"}


def test_loose_files_in_the_inbox_root_form_one_drop(tmp_path, storescp, daemon):
    session = write_session(tmp_path / "src", series=(SeriesSpec("T1", 4),), layout="flat")
    config, inbox = site(tmp_path, storescp)
    proc = daemon(config)
    for path in session.files:
        shutil.copy(path, inbox / path.name)
    deadline = time.monotonic() + 30
    while not reports(inbox) and time.monotonic() < deadline:
        time.sleep(0.1)
    [report_path] = reports(inbox)
    assert report_path.parent.parent.name == "done", proc.text()[-3000:]
    assert report_path.name.startswith("loose-")
    assert len(storescp.files()) == 4
    moved = report_path.with_name(report_path.name.removesuffix(".report.json"))
    assert sorted(p.name for p in moved.iterdir()) == sorted(p.name for p in session.files)


def test_nearest_route_yaml_wins_and_parent_is_the_routing_folder(tmp_path, storescp, daemon):
    config, inbox = site(tmp_path, storescp)
    project = inbox / "Study_A"
    project.mkdir()
    (project / "route.yaml").write_text('project: StudyA\nsubject: "{parent}"\n'
                                        'session: "{folder}"\n')
    write_session(tmp_path / "src" / "visit-2", series=(SeriesSpec("T1", 2),))
    proc = daemon(config)
    copy_in(tmp_path / "src" / "visit-2", project)
    outcome, report, _ = wait_for_report(inbox, "visit-2", daemon=proc)
    assert outcome == "done", report["reasons"]
    assert report["studies"][0]["routing_string"] == "xnat://StudyA/Study_A/visit-2"
    assert report["drop"]["origin"] == "Study_A/visit-2"
    assert report["route"]["sources"][-1] == str(project / "route.yaml")


def test_drop_without_any_route_fails_with_reason(tmp_path, storescp, daemon):
    inbox = tmp_path / "inbox"
    config = write_config(tmp_path, {"scp": dicom_destination(storescp)}, [{"path": str(inbox)}])
    write_session(tmp_path / "src" / "NOROUTE", series=(SeriesSpec("T1", 2),))
    proc = daemon(config)
    copy_in(tmp_path / "src" / "NOROUTE", inbox)
    outcome, report, _ = wait_for_report(inbox, "NOROUTE", daemon=proc)
    assert outcome == "failed"
    assert "no route.yaml applies to this drop" in report["reasons"][0]
    assert storescp.files() == []


def test_label_breaking_xnat_rule_is_not_sent_unless_cleaned(tmp_path, storescp, daemon):
    route = {**ROUTE, "subject": "{PatientName}", "series": None}
    config, inbox = site(tmp_path, storescp, route)
    write_session(tmp_path / "src" / "BADLABEL", series=(SeriesSpec("T1", 2),),
                  patient=Patient("P1", "Smith^John J"))
    proc = daemon(config)
    copy_in(tmp_path / "src" / "BADLABEL", inbox)
    outcome, report, _ = wait_for_report(inbox, "BADLABEL", daemon=proc)
    assert outcome == "failed"
    [reason] = report["studies"][0]["reasons"]
    assert "subject label" in reason and "PatientName" in reason and "'^'" in reason
    # the report lies beside the originals: the label as rendered; the service's log masks it
    assert "subject label 'Smith^John J'" in reason
    assert "Smith" not in proc.text()
    assert storescp.files() == []

    (inbox / "route.yaml").write_text("clean_labels: true\n")
    copy_in(tmp_path / "src" / "BADLABEL", inbox, "BADLABEL2")
    outcome, report, _ = wait_for_report(inbox, "BADLABEL2", daemon=proc)
    assert outcome == "done", report["reasons"]
    assert {str(dcmread(p).StudyDescription) for p in storescp.files()} == {
        "xnat://Proj/Smith_John_J/P1_20260115"}


def test_two_patient_ids_in_one_study_are_not_sent(tmp_path, storescp, daemon):
    drop = tmp_path / "src" / "MIXED"
    first = write_session(drop / "a", series=(SeriesSpec("T1", 2),), patient=Patient("PA"))
    write_session(drop / "b", series=(SeriesSpec("T2", 2),), patient=Patient("PB"),
                  study_uid=first.study_uid)
    config, inbox = site(tmp_path, storescp)
    proc = daemon(config)
    copy_in(drop, inbox)
    outcome, report, _ = wait_for_report(inbox, "MIXED", daemon=proc)
    assert outcome == "failed"
    assert "2 different PatientIDs in one study" in report["reasons"][0]
    assert storescp.files() == []


def test_drops_present_at_start_up_are_delivered(tmp_path, storescp, daemon):
    config, inbox = site(tmp_path, storescp, {**ROUTE, "series": None})
    for name in ("EARLY1", "EARLY2"):
        write_session(inbox / name, series=(SeriesSpec("T1", 2),))
    proc = daemon(config)
    assert wait_for_report(inbox, "EARLY1", daemon=proc)[0] == "done"
    assert wait_for_report(inbox, "EARLY2", daemon=proc)[0] == "done"
    assert len(storescp.files()) == 4


def test_ready_marker_and_polling_inbox(tmp_path, storescp, daemon):
    config, inbox = site(tmp_path, storescp, {**ROUTE, "series": None}, poll=True,
                         poll_interval=0.5, settle_seconds=3600, ready_marker="READY")
    proc = daemon(config)
    assert any(e.get("mode") == "polling" for e in proc.events())
    staging = tmp_path / "src" / "MARKED"
    write_session(staging, series=(SeriesSpec("T1", 2),))
    (staging / "READY").write_text("")
    staging.rename(inbox / "MARKED")
    # settle_seconds is an hour: only the marker can make this drop ready
    outcome, report, _ = wait_for_report(inbox, "MARKED", timeout=20, daemon=proc)
    assert outcome == "done", report["reasons"]
    marker = [e for e in report["files"]["entries"] if e["path"] == "READY"]
    assert marker == [{"path": "READY", "size": 0, "kind": "junk", "outcome": "kept",
                       "reason": "ready marker"}]


def test_sigterm_stops_the_daemon_cleanly(tmp_path, storescp, daemon):
    config, _ = site(tmp_path, storescp)
    proc = daemon(config)
    assert proc.stop() == 0
    assert any(e.get("event") == "stopped" for e in proc.events())
