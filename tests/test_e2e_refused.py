"""A receiver that refuses what a file needs (its SOP class or transfer syntax), and files whose
outgoing copy can't be encoded: those files fail for good, with a reason naming what was
refused; the rest of the study is sent, and no other drop waits behind them."""

from __future__ import annotations

import shutil
import sqlite3
import struct
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import CTImageStorage

from tests.daemon_runner import DaemonProcess, dicom_destination, wait_for_report, write_config
from tests.peers import StoreSCP, dcmtk_tool
from tests.test_e2e_cstore import copy_in
from xnat_inbox.commands.synthetic import SeriesSpec, write_session
from xnat_inbox.logs import hashed_uid

pytestmark = pytest.mark.e2e

SETTLE = 0.5
#: the defaults' patience: a drop taken for a passing failure waits 30 s before its next try
PATIENT = {"max_attempts": 100, "initial_backoff": 30, "max_backoff": 900}
ROUTE = {"project": "Proj", "subject": "{PatientID}", "session": "{PatientID}_{StudyDate}",
         "series": None}
JPEG2000 = "1.2.840.10008.1.2.4.91"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"


def site(tmp_path: Path, peer: object, **destination: object) -> tuple[Path, Path]:
    inbox = tmp_path / "inbox"
    config = write_config(
        tmp_path, {"scp": dicom_destination(peer, retry=PATIENT, **destination)},
        [{"path": str(inbox), "route": {"destination": "scp", **ROUTE}}],
        settle_seconds=SETTLE)
    return config, inbox


def wait_event(proc: DaemonProcess, event: str, timeout: float = 30, **fields: object) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
               for e in proc.events()):
            return
        time.sleep(0.05)
    raise AssertionError(f"no {event} event within {timeout} s\n{proc.text()[-4000:]}")


def never_failing(proc: DaemonProcess, state_dir: Path) -> None:
    """The destination was never taken for down: no such event, and the state agrees."""
    assert not [e for e in proc.events() if e.get("event", "").startswith("destination failing")]
    with sqlite3.connect(state_dir / "state.db") as db:
        assert db.execute("SELECT name FROM destinations WHERE up=0").fetchall() == []
    assert "aborted" not in proc.text()


def compress(tool: str, path: Path) -> None:
    """Compress a file in place with one of dcmtk's tools (dcmcjpeg, dcmcjpls, dcmcrle)."""
    program = dcmtk_tool(tool)
    if program is None:
        pytest.skip(f"{tool} not found: install dcmtk")
    out = path.with_suffix(".tmp")
    subprocess.run([program, str(path), str(out)], check=True, capture_output=True)
    out.replace(path)


def test_refused_transfer_syntax_fails_its_drop_and_holds_no_other(tmp_path, uncompressed_scp,
                                                                    daemon):
    # transcode: never, else the JPEG 2000 file would go out decoded (test_e2e_transcode.py)
    config, inbox = site(tmp_path, uncompressed_scp, transcode="never")
    j2k = tmp_path / "src" / "J2K"
    j2k.mkdir(parents=True)
    shutil.copy(get_testdata_file("JPEG2000.dcm"), j2k / "IM0001.dcm")
    write_session(tmp_path / "src" / "CLEAN", series=(SeriesSpec("T1", 2),))
    proc = daemon(config)

    copy_in(j2k, inbox)
    wait_event(proc, "claimed")
    copy_in(tmp_path / "src" / "CLEAN", inbox)
    # the clean drop is not held behind the refused one: delivered within settle + 10 s
    outcome, report, _ = wait_for_report(inbox, "CLEAN", timeout=SETTLE + 10, daemon=proc)
    assert outcome == "done", report["reasons"]
    assert len(uncompressed_scp.files()) == 2

    outcome, report, _ = wait_for_report(inbox, "J2K", daemon=proc)
    assert outcome == "failed"
    [reason] = report["reasons"]
    assert "JPEG 2000" in reason and JPEG2000 in reason  # the transfer syntax
    assert "Secondary Capture Image Storage" in reason  # the SOP class
    assert "Explicit VR Little Endian" in reason  # what the receiver does accept
    [entry] = report["files"]["entries"]
    assert entry["outcome"] == "failed" and JPEG2000 in entry["reason"]
    assert len(report["attempts"]) == 1  # failed for good at once, never retried
    never_failing(proc, tmp_path / "state")


def test_mixed_drop_stores_what_is_accepted_and_fails_the_rest(tmp_path, uncompressed_scp,
                                                              daemon):
    config, inbox = site(tmp_path, uncompressed_scp, transcode="never")
    session = write_session(tmp_path / "src" / "MIXED", series=(SeriesSpec("T1", 5),))
    compressed = session.files[1], session.files[3]
    compress("dcmcjpeg", compressed[0])  # JPEG lossless
    compress("dcmcrle", compressed[1])  # RLE lossless
    proc = daemon(config)

    copy_in(tmp_path / "src" / "MIXED", inbox)
    outcome, report, _ = wait_for_report(inbox, "MIXED", daemon=proc)

    assert outcome == "failed"
    assert len(uncompressed_scp.files()) == 3
    study = report["studies"][0]
    assert (study["stored"], study["instances"]) == (3, 5)
    by_name = {e["path"].rsplit("/", 1)[-1]: e for e in report["files"]["entries"]}
    failed = {name for name, e in by_name.items() if e["outcome"] == "failed"}
    assert failed == {path.name for path in compressed}
    assert JPEG_LOSSLESS in by_name[compressed[0].name]["reason"]
    assert "RLE Lossless" in by_name[compressed[1].name]["reason"]
    for name in failed:
        assert "MR Image Storage" in by_name[name]["reason"]
        assert "Explicit VR Little Endian" in by_name[name]["reason"]
    assert [e["outcome"] for e in by_name.values()].count("stored") == 3
    [reason] = report["reasons"]
    assert "2 of 5 instance(s) not stored" in reason
    assert len(report["attempts"]) == 1
    never_failing(proc, tmp_path / "state")


def test_receiver_accepting_no_context_is_not_an_abort(tmp_path, inprocess_scp, daemon):
    """A receiver that takes none of the study's contexts (here: CT only, an MR study): the
    association has nothing to carry, which no retry changes; not the receiver aborting."""
    scp = inprocess_scp(sop_classes=[CTImageStorage])
    config, inbox = site(tmp_path, scp)
    write_session(tmp_path / "src" / "MRONLY", series=(SeriesSpec("T1", 2),))
    write_session(tmp_path / "src" / "CTOK", series=(SeriesSpec("Head", 2, modality="CT"),))
    proc = daemon(config)

    copy_in(tmp_path / "src" / "MRONLY", inbox)
    wait_event(proc, "claimed")
    copy_in(tmp_path / "src" / "CTOK", inbox)
    outcome, report, _ = wait_for_report(inbox, "CTOK", timeout=SETTLE + 10, daemon=proc)
    assert outcome == "done", report["reasons"]

    outcome, report, _ = wait_for_report(inbox, "MRONLY", daemon=proc)
    assert outcome == "failed"
    [reason] = report["reasons"]
    assert "2 of 2 instance(s) not stored" in reason
    assert "MR Image Storage" in reason and "does not accept" in reason
    assert len(report["attempts"]) == 1
    assert "No accepted presentation contexts" not in proc.text()  # said once, by our event
    never_failing(proc, tmp_path / "state")


def test_sent_events_count_per_study(tmp_path, inprocess_scp, daemon):
    """Two studies in one drop; one instance of the second is refused for now (0xA700) at the
    first attempt. Each `sent` event counts its own study: never more stored than it has."""
    first, second = tmp_path / "src" / "TWO" / "a", tmp_path / "src" / "TWO" / "b"
    one = write_session(first, series=(SeriesSpec("T1", 3),))
    two = write_session(second, series=(SeriesSpec("T2", 2),), study_date="20260116")
    busy = {two.sop_instance_uids[0]}

    def status_for(ds, index):
        if ds.SOPInstanceUID in busy:
            busy.clear()
            return 0xA700
        return 0x0000

    scp = inprocess_scp(status_for=status_for)
    inbox = tmp_path / "inbox"
    config = write_config(tmp_path, {"scp": dicom_destination(scp)},
                          [{"path": str(inbox), "route": {"destination": "scp", **ROUTE}}],
                          settle_seconds=SETTLE)
    proc = daemon(config)
    copy_in(tmp_path / "src" / "TWO", inbox)
    outcome, report, _ = wait_for_report(inbox, "TWO", daemon=proc)
    assert outcome == "done", report["reasons"]
    assert len(report["attempts"]) == 2

    sizes = {hashed_uid(one.study_uid): 3, hashed_uid(two.study_uid): 2}
    sent = [e for e in proc.events() if e.get("event") == "sent"]
    assert len(sent) == 4  # two studies, two attempts
    for event in sent:
        assert event["of"] == sizes[event["study"]]
        assert event["earlier"] <= event["stored"] <= event["of"]
    last = {event["study"]: event for event in sent[2:]}  # the second attempt
    assert (last[hashed_uid(one.study_uid)]["stored"],
            last[hashed_uid(one.study_uid)]["earlier"]) == (3, 3)
    assert (last[hashed_uid(two.study_uid)]["stored"],
            last[hashed_uid(two.study_uid)]["earlier"]) == (2, 1)


# --- files whose outgoing copy can't be encoded -------------------------------------------

def _insert_element(path: Path, tag: int, vr: bytes, value: bytes) -> None:
    """Write an explicit VR little endian element into a file's top-level dataset, in tag
    order, as raw bytes: pydicom reads such a file, but the value is wrong for its VR."""
    raw = path.read_bytes()
    at = 144 + struct.unpack_from("<I", raw, 140)[0]  # past the preamble and file meta
    while at < len(raw):
        group, element = struct.unpack_from("<HH", raw, at)
        if (group << 16 | element) > tag:
            break
        if raw[at + 4:at + 6] in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR"):
            at += 12 + struct.unpack_from("<I", raw, at + 8)[0]
        else:
            at += 8 + struct.unpack_from("<H", raw, at + 6)[0]
    new = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    if vr == b"SQ":
        new += b"\0\0" + struct.pack("<I", len(value)) + value
    else:
        new += struct.pack("<H", len(value)) + value
    path.write_bytes(raw[:at] + new + raw[at:])


def _item(*elements: bytes) -> bytes:
    body = b"".join(elements)
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr + struct.pack("<H", len(value)) + value


DIFFUSION_B_VALUE = 0x00189087  # FD: 8 bytes a value
REFERENCED_IMAGE_SEQUENCE = 0x00081140


def test_unencodable_element_is_named_without_a_traceback(tmp_path, daemon):
    """A receiver taking Implicit VR Little Endian only: the sender converts each Explicit VR
    file. A float element of 6 bytes (FD takes 8 a value), at the top level and inside a
    sequence item, can't be converted: those files fail naming the element, as an encoding
    problem, for good; the others are stored; the daemon's log has one line per event."""
    session = write_session(tmp_path / "src" / "BADVALUE", series=(SeriesSpec("DWI", 3),))
    top, nested = session.files[0], session.files[1]
    _insert_element(top, DIFFUSION_B_VALUE, b"FD", b"\0" * 6)
    _insert_element(nested, REFERENCED_IMAGE_SEQUENCE, b"SQ",
                    _item(_element(DIFFUSION_B_VALUE, b"FD", b"\0" * 6)))
    for path in (top, nested):
        dcmread(path)  # pydicom reads them (the bad value is only decoded when used)
    with StoreSCP(tmp_path, syntaxes="+xi") as scp:
        config, inbox = site(tmp_path, scp)
        proc = daemon(config)
        copy_in(tmp_path / "src" / "BADVALUE", inbox)
        outcome, report, report_path = wait_for_report(inbox, "BADVALUE", daemon=proc)
        assert len(scp.files()) == 1

    assert outcome == "failed"
    assert len(report["attempts"]) == 1  # an encoding problem is no reason to try again
    by_name = {e["path"].rsplit("/", 1)[-1]: e for e in report["files"]["entries"]}
    for path in (top, nested):
        reason = by_name[path.name]["reason"]
        assert by_name[path.name]["outcome"] == "failed"
        assert "(0018,9087) DiffusionBValue" in reason and "FD" in reason
        assert "encod" in reason and "cannot read" not in reason
    assert "(0008,1140) ReferencedImageSequence" in by_name[nested.name]["reason"]
    text = proc.text()
    assert "Traceback" not in text and "pydicom.write_dataset() failed" not in text
    # every line of the daemon's log is one JSON event
    assert all(line.startswith("{") for line in text.splitlines())
    assert "Traceback" not in report_path.with_name("BADVALUE.log").read_text()
    never_failing(proc, tmp_path / "state")
