"""C-STORE statuses, refused associations and association splitting, against an in-process
pynetdicom SCP whose answers the test chooses."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AllStoragePresentationContexts

from tests.daemon_runner import dicom_destination, wait_for_report, write_config
from tests.test_e2e_cstore import ROUTE, copy_in
from xnat_inbox.commands.synthetic import SeriesSpec, write_session
from xnat_inbox.config import DicomDestination
from xnat_inbox.reading.scan import scan_drop
from xnat_inbox.routing.route import Labels, RoutedStudy
from xnat_inbox.senders.dicom.contexts import MAX_CONTEXTS
from xnat_inbox.senders.dicom.sender import DicomSender

pytestmark = pytest.mark.e2e


def site(tmp_path: Path, peer: object) -> tuple[Path, Path]:
    inbox = tmp_path / "inbox"
    config = write_config(tmp_path, {"scp": dicom_destination(peer)},
                          [{"path": str(inbox), "route": {"destination": "scp", **ROUTE,
                                                          "series": None}}])
    return config, inbox


def test_warning_statuses_count_as_stored_and_are_noted(tmp_path, inprocess_scp, daemon):
    scp = inprocess_scp(status_for=lambda ds, i: 0xB000 if i == 1 else 0x0000)
    config, inbox = site(tmp_path, scp)
    write_session(tmp_path / "src" / "WARN", series=(SeriesSpec("T1", 4),))
    proc = daemon(config)
    copy_in(tmp_path / "src" / "WARN", inbox)
    outcome, report, _ = wait_for_report(inbox, "WARN", daemon=proc)
    assert outcome == "done", report["reasons"]
    study = report["studies"][0]
    assert (study["stored"], study["warnings"]) == (4, 1)
    notes = [e["reason"] for e in report["files"]["entries"] if e["reason"]]
    assert len(notes) == 1 and "0xB000 (Warning)" in notes[0]


def test_failure_status_fails_the_drop_naming_the_status(tmp_path, inprocess_scp, daemon):
    scp = inprocess_scp(status_for=lambda ds, i: 0xC000 if i == 2 else 0x0000)
    config, inbox = site(tmp_path, scp)
    write_session(tmp_path / "src" / "REFUSE", series=(SeriesSpec("T1", 4),))
    proc = daemon(config)
    copy_in(tmp_path / "src" / "REFUSE", inbox)
    outcome, report, _ = wait_for_report(inbox, "REFUSE", daemon=proc)
    assert outcome == "failed"
    assert report["studies"][0]["stored"] == 3
    assert "1 of 4 instance(s) not stored: refused: 0xC000 (Failure)" in report["reasons"][0]
    failed = [e for e in report["files"]["entries"] if e["outcome"] == "failed"]
    assert len(failed) == 1 and "0xC000" in failed[0]["reason"]
    assert len(scp.received) == 4  # the other instances were still sent


def test_rejected_association_fails_with_the_reason(tmp_path, inprocess_scp, daemon):
    scp = inprocess_scp(require_called_aet="RIGHT_AE")
    config, inbox = site(tmp_path, scp)
    config.write_text(config.read_text().replace("RIGHT_AE", "WRONG_AE"))
    write_session(tmp_path / "src" / "REJECT", series=(SeriesSpec("T1", 2),))
    proc = daemon(config)
    copy_in(tmp_path / "src" / "REJECT", inbox)
    outcome, report, _ = wait_for_report(inbox, "REJECT", daemon=proc)
    assert outcome == "failed"
    [reason] = report["reasons"]
    assert "association rejected by WRONG_AE@127.0.0.1" in reason
    assert "Called AE title not recognised" in reason
    assert scp.rejected_associations == 1 and scp.received == []


def test_more_than_128_contexts_are_split_over_associations(tmp_path, inprocess_scp, daemon):
    scp = inprocess_scp()
    config, inbox = site(tmp_path, scp)
    drop = tmp_path / "src" / "MANYCLASSES"
    classes = [cx.abstract_syntax for cx in AllStoragePresentationContexts][: MAX_CONTEXTS + 5]
    session = write_session(drop, series=(SeriesSpec("T1", len(classes)),), layout="flat")
    for path, sop_class in zip(session.files, classes, strict=True):
        ds = dcmread(path)  # one SOP class per instance: 133 contexts in one study
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.save_as(path)
    proc = daemon(config)
    copy_in(drop, inbox)
    outcome, report, _ = wait_for_report(inbox, "MANYCLASSES", daemon=proc)
    assert outcome == "done", report["reasons"]
    study = report["studies"][0]
    assert study["associations"] == 2
    assert study["stored"] == len(classes) == len(scp.received)
    assert scp.accepted_associations == 2


def test_parallel_associations_deliver_every_instance_once(tmp_path, inprocess_scp):
    """associations: 3 sends over three associations at once; every outcome is reported once,
    one report at a time; never more than 3 instances in flight."""
    busy, most = [0], [0]
    lock = threading.Lock()

    def status_for(ds, index):
        with lock:
            busy[0] += 1
            most[0] = max(most[0], busy[0])
        time.sleep(0.005)  # let the other lanes' requests arrive meanwhile
        with lock:
            busy[0] -= 1
        return 0xB000 if index == 4 else 0x0000

    scp = inprocess_scp(status_for=status_for)
    session = write_session(tmp_path / "PAR", series=(SeriesSpec("T1", 10), SeriesSpec("T2", 8)))
    [study] = scan_drop(tmp_path / "PAR").studies.values()
    routed = RoutedStudy(study, "scp", Labels("P", "S", "E"), "StudyDescription",
                         "xnat://P/S/E", included=list(study.series.values()))
    destination = DicomDestination.model_validate(dicom_destination(scp, associations=3))
    reported: list[tuple[str, bool, str]] = []
    reporting = threading.Lock()

    def on_instance(instance, outcome):
        assert reporting.acquire(blocking=False), "two reports at once"
        time.sleep(0.001)  # a report that takes a while (a DB commit) must still be alone
        reported.append((instance.sop_instance_uid, outcome.stored, threading.current_thread()))
        reporting.release()

    sender = DicomSender("scp", destination)
    delivery = sender.send(routed, routed.instances, on_instance)
    sender.close()  # the associations kept for a next drop
    assert delivery.error is None and delivery.associations == 3
    assert sorted(uid for uid, _, _ in reported) == sorted(session.sop_instance_uids)
    assert all(stored for _, stored, _ in reported)
    assert scp.accepted_associations == 3
    received = [ds.SOPInstanceUID for ds in scp.received]
    assert sorted(received) == sorted(session.sop_instance_uids)  # each once
    assert {ds.StudyDescription for ds in scp.received} == {"xnat://P/S/E"}
    originals = {dcmread(p).SOPInstanceUID: dcmread(p).PixelData for p in session.files}
    assert all(ds.PixelData == originals[ds.SOPInstanceUID] for ds in scp.received)
    assert most[0] <= 3


def test_parallel_associations_stop_between_instances(tmp_path, inprocess_scp):
    scp = inprocess_scp()
    write_session(tmp_path / "STOP", series=(SeriesSpec("T1", 12),))
    [study] = scan_drop(tmp_path / "STOP").studies.values()
    routed = RoutedStudy(study, "scp", Labels("P", "S", "E"), "StudyDescription",
                         "xnat://P/S/E", included=list(study.series.values()))
    destination = DicomDestination.model_validate(dicom_destination(scp, associations=2))
    seen: list[str] = []
    sender = DicomSender("scp", destination)
    delivery = sender.send(routed, routed.instances, lambda i, o: seen.append(i.sop_instance_uid),
                           should_stop=lambda: len(seen) >= 5)
    sender.close()
    assert delivery.interrupted
    # every instance sent was reported; at most 2 (the lanes) went out after the stop was asked
    assert set(seen) == {i.sop_instance_uid for i in routed.instances[:len(seen)]}
    assert 5 <= len(seen) <= 7 and len(scp.received) == len(seen)


def test_parallel_associations_through_the_daemon(tmp_path, inprocess_scp, daemon):
    scp = inprocess_scp()
    inbox = tmp_path / "inbox"
    config = write_config(tmp_path, {"scp": dicom_destination(scp, associations=4)},
                          [{"path": str(inbox), "route": {"destination": "scp", **ROUTE,
                                                          "series": None}}])
    write_session(tmp_path / "src" / "PARD", series=(SeriesSpec("T1", 9), SeriesSpec("T2", 7)))
    proc = daemon(config)
    copy_in(tmp_path / "src" / "PARD", inbox)
    outcome, report, _ = wait_for_report(inbox, "PARD", daemon=proc)
    assert outcome == "done", report["reasons"]
    assert report["studies"][0]["stored"] == 16
    assert scp.accepted_associations == 4
    assert len({ds.SOPInstanceUID for ds in scp.received}) == len(scp.received) == 16
