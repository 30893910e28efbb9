"""A backlog: drops waiting at start-up, same-named drops finishing in parallel lanes."""

from __future__ import annotations

import os
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import checksums
from tests.daemon_runner import dicom_destination, reports, wait_for_report, write_config
from tests.peers import StoreSCP
from xnat_inbox.commands.synthetic import SeriesSpec, write_session
from xnat_inbox.config import DicomDestination, InboxConfig, load_config
from xnat_inbox.intake.claim import claim, claimed_drops
from xnat_inbox.intake.settle import RECHECK_SECONDS, snapshot
from xnat_inbox.intake.watch import DropRef
from xnat_inbox.outcome import finish as finish_step
from xnat_inbox.outcome.finish import (
    FINISH_FILE,
    complete_finish,
    finish,
    plan_target,
    reserve_recorded,
)
from xnat_inbox.reading.scan import scan_drop
from xnat_inbox.routing.route import Labels, RoutedStudy
from xnat_inbox.senders.dicom.sender import DicomSender
from xnat_inbox.service.daemon import Daemon

HOUR = 3600.0


def backdate(root: Path, seconds: float) -> None:
    """Date every file and folder below root (and root) `seconds` back: arrived long ago."""
    then = time.time() - seconds
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            os.utime(Path(dirpath, name), (then, then))
        os.utime(dirpath, (then, then))


def two_folder_inbox(tmp_path: Path) -> InboxConfig:
    inbox = InboxConfig(path=tmp_path / "inbox")
    for folder in ("to-a", "to-b"):
        write_session(inbox.path / folder / "MR1", series=(SeriesSpec("T1", 2),))
    return inbox


def test_same_named_drops_finishing_at_once_each_get_their_own_target(tmp_path):
    """Three drops MR1 finish at once: one from each routing folder, and a second MR1 from
    to-a (copied in again after the first was claimed). Each keeps its routing folder under
    done/<day>/; the two from to-a get two names."""
    inbox = two_folder_inbox(tmp_path)
    before = {f: checksums(inbox.path / f / "MR1") for f in ("to-a", "to-b")}
    drops = [claim(DropRef(inbox, inbox.path / f, "MR1")) for f in ("to-a", "to-b")]
    write_session(inbox.path / "to-a" / "MR1", series=(SeriesSpec("T1", 1),))
    before["again"] = checksums(inbox.path / "to-a" / "MR1")
    drops.append(claim(DropRef(inbox, inbox.path / "to-a", "MR1")))
    targets: dict[str, Path] = {}
    start = threading.Barrier(len(drops))

    def finish_one(key, drop):  # what three lanes do at the same moment
        start.wait()
        target = plan_target(drop, True, datetime(2026, 1, 2))
        targets[key] = finish(drop, target, {"outcome": "done"}, ["line"])

    threads = [threading.Thread(target=finish_one, args=(key, d))
               for key, d in zip(("to-a", "to-b", "again"), drops, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    day = inbox.done / "2026-01-02"
    assert sorted(str(p.relative_to(day)) for p in targets.values()) == [
        "to-a/MR1", "to-a/MR1-1", "to-b/MR1"]
    for folder, target in targets.items():
        assert checksums(target) == before[folder]  # moved, not removed
        assert target.with_name(target.name + ".report.json").is_file()


@pytest.mark.faults
def test_a_finish_recorded_before_a_restart_keeps_its_target(tmp_path):
    inbox = two_folder_inbox(tmp_path)
    first = claim(DropRef(inbox, inbox.path / "to-a", "MR1"))
    before = checksums(first.path)
    target = plan_target(first, True, datetime(2026, 1, 2))
    (first.area / FINISH_FILE).write_text(f'{{"target": "{target}"}}')  # then a crash
    finish_step._planned.clear()  # a new process remembers nothing
    [resumed] = claimed_drops(inbox)
    reserve_recorded(resumed)  # what the daemon does at start-up, before any lane runs
    write_session(inbox.path / "to-a" / "MR1", series=(SeriesSpec("T1", 1),))  # copied again
    second = claim(DropRef(inbox, inbox.path / "to-a", "MR1"))
    other = plan_target(second, True, datetime(2026, 1, 2))
    assert other != target
    finish(second, other, {"outcome": "done"}, [])
    assert complete_finish(resumed) == target
    assert checksums(target) == before


def test_a_drop_found_at_start_up_counts_the_time_it_has_been_quiet(tmp_path):
    inbox_path = tmp_path / "inbox"
    config = load_config(write_config(tmp_path, {"scp": {"type": "dicom", "host": "127.0.0.1",
                                                         "port": 1, "called_ae": "X"}},
                                      [{"path": str(inbox_path)}], settle_seconds=HOUR))
    inbox = config.inboxes[0]
    write_session(inbox_path / "OLD", series=(SeriesSpec("T1", 1),))
    write_session(inbox_path / "NEW", series=(SeriesSpec("T1", 1),))
    backdate(inbox_path / "OLD", 2 * HOUR)
    service = Daemon(config)
    try:
        old, new = DropRef(inbox, inbox_path, "OLD"), DropRef(inbox, inbox_path, "NEW")
        assert service._quiet_for(snapshot(old), inbox) == HOUR  # at most the settle period
        assert service._quiet_for(snapshot(new), inbox) < HOUR / 2  # being written, perhaps
        for ref in (old, new):
            service.found_at_start(ref)  # its snapshot, which dated it, is the first
        now = time.monotonic()
        assert service.tracker.due(now) == []  # too soon for the second
        assert service.tracker.due(now + RECHECK_SECONDS) == [old]  # the second agrees
        assert service.tracker.pending() == [new]
    finally:
        service.state.close()


@pytest.mark.e2e
def test_a_backlog_in_two_routing_folders_is_delivered_to_both_destinations(tmp_path, daemon):
    """Same-named drops waiting at start-up in two routing folders (one destination each) with
    the site's long settle period: all delivered, all originals kept under their own names."""
    names = [f"S{n}" for n in range(3)]
    with StoreSCP(tmp_path / "a", fork=True) as scp_a, StoreSCP(tmp_path / "b", fork=True) as scp_b:
        inbox = tmp_path / "inbox"
        config = write_config(tmp_path, {"scp-a": dicom_destination(scp_a),
                                         "scp-b": dicom_destination(scp_b)},
                              [{"path": str(inbox)}], settle_seconds=HOUR)
        sums = {}
        for folder, destination in (("to-a", "scp-a"), ("to-b", "scp-b")):
            (inbox / folder).mkdir()
            (inbox / folder / "route.yaml").write_text(
                f"destination: {destination}\nproject: P\nsubject: '{{PatientID}}'\n"
                "session: '{folder}'\n")
            for name in names:
                write_session(inbox / folder / name, series=(SeriesSpec("T1", 3),))
                sums[folder, name] = checksums(inbox / folder / name)
                backdate(inbox / folder / name, 2 * HOUR)
        proc = daemon(config)
        for name in names:
            wait_for_report(inbox, name, daemon=proc)
        deadline = time.monotonic() + 60
        while len(reports(inbox)) < 2 * len(names) and time.monotonic() < deadline:
            time.sleep(0.1)
        finished = reports(inbox)
        assert len(finished) == 2 * len(names)
        # done/<day>/<routing folder>/<drop>: the same names stay apart, under their folder
        assert sorted((p.parents[2].name, p.parent.name, p.name) for p in finished) == sorted(
            ("done", folder, f"{name}.report.json") for folder in ("to-a", "to-b")
            for name in names)
        kept = [checksums(p.with_name(p.name.removesuffix(".report.json"))) for p in finished]
        assert sorted(sorted(k.items()) for k in kept) == \
            sorted(sorted(s.items()) for s in sums.values())  # every original, moved
        assert len(scp_a.files()) == len(scp_b.files()) == 3 * len(names)


def _send_drops(tmp_path: Path, destination: DicomDestination, count: int,
                sender: DicomSender | None = None) -> DicomSender:
    sender = sender or DicomSender("scp", destination)
    for n in range(count):
        write_session(tmp_path / f"S{n}", series=(SeriesSpec("T1", 2),))
        [study] = scan_drop(tmp_path / f"S{n}").studies.values()
        routed = RoutedStudy(study, "scp", Labels("P", "S", "E"), "StudyDescription",
                             "xnat://P/S/E", included=list(study.series.values()))
        delivery = sender.send(routed, routed.instances)
        assert delivery.stored == 2 and delivery.error is None, delivery.error
    return sender


@pytest.mark.e2e
def test_associations_are_released_not_aborted_while_the_lane_moves_on(tmp_path, storescp):
    """association_close_delay 0: an association per drop, each released in the background
    while the lane moves on; close() (at shutdown) waits for the releases."""
    destination = DicomDestination(type="dicom", host=storescp.host, port=storescp.port,
                                   called_ae=storescp.aet, association_close_delay=0)
    sender = _send_drops(tmp_path, destination, 3)
    sender.close()
    assert not any(thread.is_alive() for thread in threading.enumerate()
                   if thread.name.startswith("release "))
    log = storescp.log_text()
    assert log.count("Association Release") == 3, log[-2000:]
    assert "Abort" not in log
    assert len(storescp.files()) == 6


@pytest.mark.e2e
def test_drops_in_a_row_share_one_association_until_the_close_delay(tmp_path, storescp):
    """The default close delay keeps the association for the next drop (as Orthanc does):
    three drops, one association; it is released once the delay has passed."""
    destination = DicomDestination(type="dicom", host=storescp.host, port=storescp.port,
                                   called_ae=storescp.aet, association_close_delay=1.0)
    sender = _send_drops(tmp_path, destination, 3)
    deadline = time.monotonic() + 10
    while "Association Release" not in storescp.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = storescp.log_text()
    assert log.count("Association Acknowledged") == 1 and log.count("Association Release") == 1, \
        log[-2000:]
    assert len(storescp.files()) == 6
    sender.close()


@pytest.mark.e2e
def test_an_idle_association_the_receiver_dropped_is_replaced(tmp_path, inprocess_scp):
    """The receiver restarts (aborting what was open) between two drops: the next drop notices
    the idle association is gone, opens a new one and is delivered whole at the first attempt."""
    scp = inprocess_scp()
    destination = DicomDestination.model_validate(
        dicom_destination(scp, association_close_delay=30))
    sender = _send_drops(tmp_path / "first", destination, 1)
    scp.stop()
    scp.start()
    _send_drops(tmp_path / "second", destination, 1, sender)
    sender.close()
    assert scp.accepted_associations == 2
    assert len({ds.SOPInstanceUID for ds in scp.received}) == 4
