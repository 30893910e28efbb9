"""The steps of the flow one by one, on real files: watch's drop mapping, settle, claim, scan."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,
)

from xnat_inbox.commands.synthetic import SUPPORTED_TRANSFER_SYNTAXES, SeriesSpec, write_session
from xnat_inbox.config import InboxConfig
from xnat_inbox.intake.claim import claim, claimed_drops
from xnat_inbox.intake.settle import RECHECK_SECONDS, SettleTracker
from xnat_inbox.intake.watch import DropRef, drop_for_path, existing_drops, filesystem_type
from xnat_inbox.reading.rawheader import FIRST_WINDOW, HEADER_WINDOW
from xnat_inbox.reading.scan import Kind, scan_drop
from xnat_inbox.routing.route import Labels, Route, RoutedStudy, RouteError, resolve_route
from xnat_inbox.senders.dicom.contexts import ContextKey, association_batches, context_key
from xnat_inbox.senders.dicom.outgoing import outgoing_header
from xnat_inbox.senders.dicom.splice import routing_splice


@pytest.fixture
def inbox(tmp_path: Path) -> InboxConfig:
    (tmp_path / "inbox").mkdir()
    return InboxConfig(path=tmp_path / "inbox")


def test_paths_map_to_their_drop(inbox):
    root = inbox.path
    (root / "Proj").mkdir()
    (root / "Proj" / "route.yaml").write_text("project: P\n")
    (root / "MR1" / "sub").mkdir(parents=True)
    (root / "loose.dcm").write_bytes(b"x")
    assert drop_for_path(inbox, root / "MR1" / "sub" / "a.dcm") == DropRef(inbox, root, "MR1")
    assert drop_for_path(inbox, root / "loose.dcm") == DropRef(inbox, root, None)
    in_project = DropRef(inbox, root / "Proj", "S1")
    assert drop_for_path(inbox, root / "Proj" / "S1" / "x.dcm") == in_project
    for ours in ("done/2026-01-01/MR1/a", "failed/x", ".xnat-inbox/work/1/MR1", ".hidden/a",
                 "route.yaml", "Proj/route.yaml"):
        assert drop_for_path(inbox, root / ours) is None, ours
    assert drop_for_path(inbox, inbox.path.parent / "elsewhere") is None
    assert set(existing_drops(inbox)) == {DropRef(inbox, root, "MR1"), DropRef(inbox, root, None)}


def test_network_file_systems_are_recognised():
    assert filesystem_type(Path("/proc/self")) == "proc"
    assert filesystem_type(Path("/")) not in {"unknown", ""}


def test_settle_waits_for_quiet_and_two_equal_snapshots(inbox):
    drop = inbox.path / "MR1"
    drop.mkdir()
    (drop / "a").write_bytes(b"1")
    ref = DropRef(inbox, inbox.path, "MR1")
    tracker = SettleTracker(lambda _: 5.0)
    tracker.touch(ref, 100.0)
    tracker.touch(ref, 99.0)  # an older change reported late does not shorten the wait
    first = 105.0 - RECHECK_SECONDS  # the first snapshot, so the second ends the quiet period
    assert tracker.due(first - 0.1) == []  # not quiet yet
    assert tracker.due(first) == []  # first snapshot
    (drop / "b").write_bytes(b"22")  # a write no event reported (a network share)
    assert tracker.due(105.0) == []  # quiet, but the snapshots differ: wait again from here
    assert tracker.due(110.0 - RECHECK_SECONDS) == []  # first snapshot of the second period
    assert tracker.due(110.0 - 0.1) == []  # too soon for the second snapshot
    assert tracker.due(110.0) == [ref]  # quiet for settle_seconds and two snapshots agree
    assert tracker.pending() == []


def test_settle_forgets_vanished_drops_and_honours_the_marker(tmp_path):
    (tmp_path / "inbox").mkdir()
    inbox = InboxConfig(path=tmp_path / "inbox", ready_marker="READY")
    tracker = SettleTracker(lambda _: 3600.0)
    gone = DropRef(inbox, inbox.path, "GONE")
    tracker.touch(gone, 0.0)
    assert tracker.due(4000.0) == [] and tracker.pending() == []
    marked = inbox.path / "MARKED"
    marked.mkdir()
    ref = DropRef(inbox, inbox.path, "MARKED")
    tracker.touch(ref, 0.0)
    assert tracker.due(1.0) == []
    (marked / "READY").touch()
    assert tracker.due(1.0) == [ref]


def test_claim_moves_the_drop_and_a_restart_finds_it(inbox):
    write_session(inbox.path / "MR1", series=(SeriesSpec("T1", 2),))
    drop = claim(DropRef(inbox, inbox.path, "MR1"), datetime(2026, 1, 2, 3, 4, 5).astimezone())
    assert not (inbox.path / "MR1").exists()
    assert drop.path.parent.parent == inbox.work and len(list(drop.path.rglob("*.dcm"))) == 2
    [again] = claimed_drops(inbox)
    assert (again.id, again.name, again.origin) == (drop.id, "MR1", inbox.path)


def test_a_claim_cut_short_before_its_record_is_cleaned_up_at_start(inbox):
    """A kill between the work folder's mkdir and the claim record's rename leaves our own
    folder, empty or with the record's temporary file: the drop never moved."""
    write_session(inbox.path / "MR1", series=(SeriesSpec("T1", 1),))
    drop = claim(DropRef(inbox, inbox.path, "MR1"))
    empty, half = inbox.work / "20260101T000000-aaaaaa", inbox.work / "20260101T000000-bbbbbb"
    foreign = inbox.work / "someone-elses"
    for folder in (empty, half, foreign):
        folder.mkdir()
    (half / "claim.json.tmp").write_text('{"id": ')
    (foreign / "notes.txt").write_text("keep me")
    assert [d.id for d in claimed_drops(inbox)] == [drop.id]
    assert sorted(p.name for p in inbox.work.iterdir()) == sorted([drop.id, foreign.name])
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_route_is_parsed_again_whenever_its_file_changed(inbox):
    """Route files are kept parsed between drops: an edit, even one of the same length within
    the same clock tick, a broken edit and a removal all count for the next drop."""
    route_file = inbox.path / "route.yaml"
    destinations = {"pacs", "xnat"}

    def next_drop_route() -> Route:
        name = f"MR{len(list(inbox.work.glob('*'))) if inbox.work.exists() else 0}"
        (inbox.path / name).mkdir()
        return resolve_route(claim(DropRef(inbox, inbox.path, name)), destinations)

    route_file.write_text("destination: pacs\nproject: AAA\nsubject: S\nsession: E\n")
    assert next_drop_route().template.project.text == "AAA"
    assert next_drop_route().template.project.text == "AAA"
    route_file.write_text("destination: xnat\nproject: BBB\nsubject: S\nsession: E\n")
    again = next_drop_route()
    assert (again.destination, again.template.project.text) == ("xnat", "BBB")
    route_file.write_text("destination: xnat\nproject: [unclosed\n")
    with pytest.raises(RouteError, match=r"route\.yaml"):
        next_drop_route()
    route_file.unlink()
    with pytest.raises(RouteError, match=r"no route\.yaml applies"):
        next_drop_route()


def test_claim_of_loose_files_leaves_route_yaml_and_hidden_files(inbox):
    for name in ("a.dcm", "b.dcm", "route.yaml", ".hidden"):
        (inbox.path / name).write_bytes(b"x")
    drop = claim(DropRef(inbox, inbox.path, None))
    assert drop.loose and drop.name.startswith("loose-")
    assert sorted(p.name for p in drop.path.iterdir()) == ["a.dcm", "b.dcm"]
    assert sorted(p.name for p in inbox.path.iterdir() if p.is_file()) == [".hidden", "route.yaml"]


def test_scan_classifies_every_file(tmp_path):
    root = tmp_path / "drop"
    session = write_session(root / "s", series=(SeriesSpec("T1", 3),))
    implicit = write_session(root / "imp", series=(SeriesSpec("T2", 1),),
                             transfer_syntax=ImplicitVRLittleEndian, study_uid=session.study_uid)
    raw = root / "no_preamble.dcm"  # a bare dataset: valid DICOM a naive check rejects
    ds = dcmread(implicit.files[0])
    ds.SOPInstanceUID = "1.2.3.4.5.6.7"
    ds.save_as(raw, enforce_file_format=False, implicit_vr=True, little_endian=True)
    (root / "Thumbs.db").write_bytes(b"junk")
    (root / "notes.txt").write_text("not DICOM")
    (root / "empty.dcm").write_bytes(b"")
    (root / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 40)
    (root / "z_copy.dcm").write_bytes(session.files[0].read_bytes())
    (root / "link.dcm").symlink_to(session.files[1])
    os.mkfifo(root / "pipe")
    scan = scan_drop(root)
    kinds = {entry.rel: entry.kind for entry in scan.files}
    assert kinds == {
        "s/1_T1/IM0001.dcm": Kind.DICOM, "s/1_T1/IM0002.dcm": Kind.DICOM,
        "s/1_T1/IM0003.dcm": Kind.DICOM, "imp/1_T2/IM0001.dcm": Kind.DICOM,
        "no_preamble.dcm": Kind.DICOM, "Thumbs.db": Kind.JUNK, "notes.txt": Kind.NOT_DICOM,
        "empty.dcm": Kind.NOT_DICOM, "broken.dcm": Kind.UNREADABLE, "z_copy.dcm": Kind.DUPLICATE,
        "link.dcm": Kind.SYMLINK, "pipe": Kind.SPECIAL,
    }
    [study] = scan.studies.values()
    assert len(study.series) == 2 and len(study.instances) == 5
    assert {"SUBJ001", "Doe^Jane", "19800101"} <= scan.phi
    duplicate = next(e for e in scan.files if e.kind is Kind.DUPLICATE)
    assert "same SOPInstanceUID and content" in duplicate.reason
    assert study.problems == []


def test_association_batches_hold_at_most_128_contexts(tmp_path):
    write_session(tmp_path / "s", series=(SeriesSpec("T1", 3),))
    instances = [e.instance for e in scan_drop(tmp_path / "s").files]
    many = []
    for number in range(300):
        clone = type(instances[0])(**{**vars(instances[number % 3]),
                                      "sop_class_uid": f"1.2.3.{number % 200}"})
        many.append(clone)
    batches = list(association_batches(many))
    assert [len(keys) for keys, _ in batches] == [128, 72]
    assert sum(len(members) for _, members in batches) == 300
    for keys, members in batches:
        assert {context_key(i) for i in members} <= set(keys)


def test_association_batches_offer_little_endian_beside_compressed(tmp_path):
    """A SOP class in a compressed syntax is proposed in little endian too, in the same
    association: the receiver's answer says what it takes instead."""
    write_session(tmp_path / "s", series=(SeriesSpec("T1", 3),))
    instances = [e.instance for e in scan_drop(tmp_path / "s").files]
    many = [type(instances[0])(**{**vars(instances[n % 3]), "sop_class_uid": f"1.2.3.{n}",
                                  "transfer_syntax": JPEGLosslessSV1})
            for n in range(100)]
    plain = instances[0]  # little endian, its own SOP class: no second context
    batches = list(association_batches([*many, plain]))
    assert [len(keys) for keys, _ in batches] == [128, 73]
    assert sum(len(members) for _, members in batches) == 101
    for keys, members in batches:
        for instance in members:
            key = context_key(instance)
            assert key in keys
            assert ContextKey(key.sop_class, None) in keys


@pytest.mark.parametrize("syntax", sorted(SUPPORTED_TRANSFER_SYNTAXES))
@pytest.mark.parametrize("keyword", ["StudyDescription", "PatientComments"])
def test_routing_splice_sends_what_the_pydicom_header_path_sends(tmp_path, syntax, keyword):
    """The fast path (routing element spliced into the file's bytes) and outgoing_header (the
    place a header transform runs) produce the same dataset; the file stays untouched."""
    session = write_session(tmp_path / "s", series=(SeriesSpec("T1", 2),),
                            transfer_syntax=syntax,
                            extra={"ReferencedStudySequence": [Dataset()]})
    [study] = scan_drop(tmp_path / "s").studies.values()
    routed = RoutedStudy(study, "scp", Labels("P", "S", "E"), keyword, "Project: P Subject: S",
                         included=list(study.series.values()))
    for instance in routed.instances:
        before = instance.path.read_bytes()
        with instance.path.open("rb") as fp:
            splice = routing_splice(fp, instance, routed)
            if syntax == DeflatedExplicitVRLittleEndian:
                assert splice is None
                continue
            assert splice is not None
            head, offset = splice
            fp.seek(offset)
            sent = head + fp.read()
        with instance.open() as fp:
            expected = outgoing_header(instance, routed, fp, whole=True)
        uid = UID(syntax)
        got = _decode(sent, uid)
        assert getattr(got, keyword) == "Project: P Subject: S"
        assert [e.tag for e in got] == [e.tag for e in expected]
        for element in expected:
            assert got[element.tag].value == element.value, element.keyword
        assert instance.path.read_bytes() == before
    assert session.files


@pytest.mark.parametrize("window", [FIRST_WINDOW, HEADER_WINDOW])
@pytest.mark.parametrize("before_end", [4000, 2, 0])
def test_routing_splice_of_an_element_that_runs_past_the_header_window(tmp_path, window,
                                                                       before_end):
    """The old routing element's value starts `before_end` bytes before the end of a window
    the splice reads (the first, or the longest), and ends past it: what is sent is still the
    file, with only that element replaced."""
    comments = "c" * 8000
    session = write_session(tmp_path / "s", series=(SeriesSpec("T1", 1),),
                            extra={"PatientComments": comments})
    path = session.files[0]
    original = dcmread(path)

    def value_at(items: int, padding: int) -> int:
        item = Dataset()
        item.ReferencedSOPInstanceUID = "1.2.3.4"
        original.ReferencedImageSequence = [item] * items  # group 0008: before the comments
        original.ReferringPhysicianAddress = "a" * padding
        original.save_as(path, enforce_file_format=True)
        return path.read_bytes().index(comments.encode())

    per_item = value_at(1001, 0) - value_at(1000, 0)
    items = (window - before_end - value_at(0, 0)) // per_item
    padding = window - before_end - value_at(items, 0)
    assert value_at(items, padding) == window - before_end
    [study] = scan_drop(tmp_path / "s").studies.values()
    routed = RoutedStudy(study, "scp", Labels("P", "S", "E"), "PatientComments", "xnat://P/S/E",
                         included=list(study.series.values()))
    [instance] = routed.instances
    with instance.path.open("rb") as fp:
        splice = routing_splice(fp, instance, routed)
        assert splice is not None
        head, offset = splice
        fp.seek(offset)
        sent = head + fp.read()
    got = _decode(sent, UID(instance.transfer_syntax))
    with instance.open() as fp:
        expected = outgoing_header(instance, routed, fp, whole=True)
    assert got.PatientComments == "xnat://P/S/E"
    assert [e.tag for e in got] == [e.tag for e in expected]
    assert got.PixelData == expected.PixelData and len(got.ReferencedImageSequence) == items


def _decode(raw: bytes, syntax: UID) -> Dataset:
    return read_dataset(DicomBytesIO(raw), syntax.is_implicit_VR, syntax.is_little_endian)
