"""Issue 16, point 13: console lines a person can read. Empty fields are left out, UIDs shortened
(whole in JSON and the journal), times carry their zone, and a library's warning is shown once,
without the path of the virtual environment, in the daemon's process and from scan workers.
Through the real set-up (`configure`), structlog and pydicom."""

from __future__ import annotations

import io
import json
import struct
import warnings
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian

from xnat_inbox.commands.synthetic import SeriesSpec, write_session
from xnat_inbox.logs import configure, drop_log, get_logger, set_log_phi
from xnat_inbox.reading.scan_workers import ReadJob, ScanWorkers

pytestmark = pytest.mark.ops

UID = "1.2.826.0.1.3680043.8.498.29581966997321062741454661365382950580"  # 64 characters
ODD_AGE = "Invalid value for VR AS: 'abc'"
ODD_NUMBER = "Invalid value for VR IS: 'x'"


@pytest.fixture
def output(restore_logging: None) -> Iterator[io.StringIO]:
    """The daemon's log set-up, writing to a buffer; warnings' hooks and filters restored."""
    with warnings.catch_warnings():
        yield io.StringIO()


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def odd_value() -> None:
    """pydicom warns (and logs) about a value VR AS doesn't allow, as for an odd file."""
    Dataset().PatientAge = "abc"


def test_console_lines_leave_out_fields_that_say_nothing(output):
    configure("console", stream=output)
    get_logger().info("sent", stage="send", stored=0, of=3, error=None, problems=[],
                      reasons=[], labels="", retry=False)
    (line,) = lines(output)
    for empty in ("error=", "problems=", "reasons=", "labels="):
        assert empty not in line, line
    assert "stored=0" in line and "of=3" in line and "retry=False" in line
    assert "[xnat_inbox]" not in line  # our own logger's name on every line says nothing


def test_console_shortens_uids_and_json_keeps_them(output):
    configure("console", log_phi=True, stream=output)  # log_phi: the StudyInstanceUID itself
    get_logger().info("routed", study=UID, reason=f"instance {UID}.7 refused",
                      syntax="1.2.840.10008.1.2.1", other="1.2.840.113619.2.55.3.604688119.4711",
                      refused="MR Image Storage (1.2.840.10008.5.1.4.1.1.4) in JPEG 2000")
    (line,) = lines(output)
    assert UID not in line
    assert "study=1.2.826…950580 " in line  # its root and its last digits
    assert "instance 1.2.826…7 refused" in line
    assert "syntax=1.2.840.10008.1.2.1" in line  # short ones stay whole
    assert "other=1.2.840…4711" in line
    assert "(1.2.840.10008.5.1.4.1.1.4)" in line  # the standard's UIDs are looked up: whole

    json_out = io.StringIO()
    configure("json", log_phi=True, stream=json_out)
    get_logger().info("routed", study=UID, error=None)
    event = json.loads(json_out.getvalue())
    assert event["study"] == UID and event["error"] is None  # JSON: every key, whole
    set_log_phi(False)


@pytest.mark.parametrize("log_format", ["console", "json"])
def test_times_carry_their_zone(output, log_format):
    configure(log_format, stream=output)
    with drop_log() as drop_lines:
        get_logger().info("claimed", stage="claim")
    line = lines(output)[0]
    stamp = json.loads(line)["timestamp"] if log_format == "json" else line.split(" ")[0]
    for text in (stamp, drop_lines[0].split(" ")[0]):
        when = datetime.fromisoformat(text)
        assert when.utcoffset() is not None, f"{text!r} has no zone"
        assert abs((when - datetime.now().astimezone()).total_seconds()) < 3600


def test_a_library_warning_is_shown_once_without_paths(output):
    configure("console", stream=output)
    for _ in range(3):  # pydicom warns and logs each time: one line in all
        odd_value()
    shown = [line for line in lines(output) if ODD_AGE in line]
    assert len(shown) == 1, output.getvalue()
    assert "[pydicom" in shown[0]
    for path_part in ("site-packages", ".venv", ".py:", "warn_and_log"):
        assert path_part not in output.getvalue()
    # each drop's log names the odd values of its own files: once per drop
    for _ in range(2):
        with drop_log() as drop_lines:
            odd_value()
            odd_value()
        assert [ODD_AGE in line for line in drop_lines] == [True], drop_lines
    assert sum(ODD_AGE in line for line in lines(output)) == 3


def test_warnings_in_a_scan_worker_reach_the_log_once(output, tmp_path: Path, capfd):
    """A scan worker is a process of its own: its pydicom warnings come back with its answer,
    each once, and are logged by the daemon (once the drop's PHI values are known, so they are
    masked like its own lines), not written raw to the daemon's stderr."""
    from xnat_inbox.libwarnings import replay  # new with issue 16: here, so the rest runs on main

    configure("console", stream=output)
    session = write_session(tmp_path / "drop", series=(SeriesSpec("T1", 3),),
                            transfer_syntax=ImplicitVRLittleEndian)
    number = struct.pack("<HHI", 0x0020, 0x0013, 2)  # InstanceNumber, 2 bytes
    for path in session.files:  # implicit VR: pydicom reads it, and warns about "x "
        data = path.read_bytes()
        at = data.index(number) + len(number)
        path.write_bytes(data[:at] + b"x " + data[at + 2:])
    workers = ScanWorkers(1)
    try:
        scan = workers.read(ReadJob(tmp_path / "drop"), timeout=60)
    finally:
        workers.close()
    assert len(scan.studies) == 1
    assert [text for _, text in scan.warnings if ODD_NUMBER in text] != []
    with drop_log() as drop_lines:
        replay(scan.warnings)  # as the pipeline does
    assert "site-packages" not in capfd.readouterr().err
    assert [line for line in drop_lines if ODD_NUMBER in line] != []
    assert sum(ODD_NUMBER in line for line in lines(output)) == 1, output.getvalue()
