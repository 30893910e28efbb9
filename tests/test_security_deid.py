"""De-identification and the PHI guard see every element of every instance, including what
follows the pixel data: private groups, digital signatures, trailing padding (issue 23, item 4).

The daemon runs as a process; the receivers are real (dcmtk storescp, the fake XNAT)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from tests.daemon_runner import REPO, dicom_destination, wait_for_report, write_config
from xnat_inbox.commands.synthetic import Patient, SeriesSpec, write_session
from xnat_inbox.routing.deidentify import remap_uid

pytestmark = [pytest.mark.security, pytest.mark.deid]

SECRET = "site-secret-for-security-tests"
HIDDEN = "Doe^Jane MRN4711 DOB 19800101"  # what a scanner or a user left after the pixel data
PATIENT = Patient("MRN4711", "Doe^Jane", "19800101", "F")
#: byte strings no de-identified copy may carry anywhere
PHI = (b"Doe^Jane", b"MRN4711", b"19800101", b"DOB 1980")
PRIVATE_GROUP = 0x7FE1
SERIES = (SeriesSpec("T1 MPRAGE", 3), SeriesSpec("T2 FLAIR", 2))
#: a route that needs the outgoing copy clean of PHI
DEID = {"project": "Proj", "subject": "{PatientID}", "session": "{folder}",
        "deidentify": "basic", "label_source": "deidentified"}
CLEAN = Patient("SUBJ7", "SUBJ7", "", "O")  # a header the guard accepts with subject SUBJ7
NO_DEID = {"project": "Proj", "subject": "SUBJ7", "session": "{folder}"}
CLEAN_EXTRA: dict[str, object] = {"InstitutionName": None, "ReferringPhysicianName": None}


def add_trailer(path: Path) -> None:
    """PHI after the pixel data, where no header read looks: a private block, a signature and
    trailing padding, and a standard element the profile keeps."""
    ds = dcmread(path)
    block = ds.private_block(PRIVATE_GROUP, "ACME HIDDEN", create=True)
    block.add_new(0x10, "LO", HIDDEN)
    block.add_new(0x11, "OB", HIDDEN.encode() + b"\0")
    signature = Dataset()
    signature.MACIDNumber = 1
    signature.DigitalSignatureUID = "1.2.3.4"
    signature.CertificateType = "X509_1993_SIG"
    signature.CertificateOfSigner = f"CN={HIDDEN}".encode() + b"\0"
    ds.DigitalSignaturesSequence = Sequence([signature])
    ds.add_new(0xFFFCFFFC, "OB", HIDDEN.encode() + b"\0")  # DataSetTrailingPadding
    ds.add_new(0x7FE00020, "OW", b"\x01\x02" * 8)  # CoefficientsSDVN (retired): kept
    ds.save_as(path)
    raw = path.read_bytes()
    assert raw.find(HIDDEN.encode()) > raw.find(b"\xe0\x7f\x10\x00")  # after the pixel data


def make_site(tmp_path: Path, destination: dict[str, Any], route: dict[str, Any]
              ) -> tuple[Path, Path]:
    inbox = tmp_path / "inbox"
    secret = tmp_path / "deid.secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    config = write_config(tmp_path, {"dest": destination},
                          [{"path": str(inbox), "route": {"destination": "dest", **route}}],
                          deid_secret_file=str(secret))
    return config, inbox


def put(source: Path, inbox: Path) -> None:
    staging = source.parent / f"staging-{source.name}"
    shutil.copytree(source, staging)
    staging.rename(inbox / source.name)


def assert_clean_copies(received: list[Path], originals: list[Path]) -> None:
    """No PHI byte anywhere in what the receiver stored, no private element, nothing of the
    trailer the profile removes; the pixel data is the original's, byte for byte."""
    assert len(received) == len(originals)
    by_sop = {remap_uid(SECRET.encode(), str(dcmread(p).SOPInstanceUID)): p for p in originals}
    for path in received:
        raw = path.read_bytes()
        for value in PHI:
            assert value not in raw, f"{value!r} reached the receiver in {path.name}"
        ds = dcmread(path)
        assert not [element.tag for element in ds if element.tag.is_private]
        assert "DigitalSignaturesSequence" not in ds
        assert 0xFFFCFFFC not in ds
        original = dcmread(by_sop[str(ds.SOPInstanceUID)])
        assert ds.PixelData == original.PixelData
        assert ds[0x7FE00020].value == original[0x7FE00020].value  # kept, encoded again


@pytest.mark.parametrize(("guard", "syntax"), [
    ("reject", ExplicitVRLittleEndian),
    ("warn", RLELossless),  # encapsulated pixel data: its items are stepped over, not read
], ids=["reject-native", "warn-encapsulated"])
def test_cstore_of_a_deidentified_copy_carries_nothing_of_what_follows_the_pixel_data(
        tmp_path, storescp, daemon, guard, syntax):
    info = write_session(tmp_path / "src" / "MR_TRAIL", series=SERIES, patient=PATIENT,
                         transfer_syntax=syntax)
    for path in info.files:
        add_trailer(path)
    config, inbox = make_site(tmp_path, dicom_destination(storescp),
                              {**DEID, "phi_guard": guard})
    proc = daemon(config)
    put(tmp_path / "src" / "MR_TRAIL", inbox)
    outcome, report, _ = wait_for_report(inbox, "MR_TRAIL", daemon=proc)
    proc.stop()

    assert outcome == "done", report["reasons"]
    [study] = report["studies"]
    assert study["phi_guard"] == {"mode": guard, "attributes": []}  # the copy is clean
    assert_clean_copies(storescp.files(), info.files)


def test_xnat_upload_of_a_deidentified_copy_carries_nothing_of_what_follows_the_pixel_data(
        tmp_path, daemon):
    from tests.fake_xnat import FakeXnat

    password = tmp_path / "xnat.secret"
    password.write_text("alice-pw\n")
    password.chmod(0o600)
    info = write_session(tmp_path / "src" / "MR_REST", series=SERIES, patient=PATIENT)
    for path in info.files:
        add_trailer(path)
    with FakeXnat({}) as xnat:
        destination = {"type": "xnat", "url": xnat.url, "allow_http": True, "username": "alice",
                       "password_file": str(password), "connect_timeout": 3,
                       "retry": {"max_attempts": 2, "initial_backoff": 0.2, "max_backoff": 0.5}}
        config, inbox = make_site(tmp_path, destination,
                                  {**DEID, "project": "TEST", "phi_guard": "reject"})
        proc = daemon(config)
        put(tmp_path / "src" / "MR_REST", inbox)
        outcome, report, _ = wait_for_report(inbox, "MR_REST", daemon=proc)
        proc.stop()
        assert outcome == "done", report["reasons"]
        assert report["studies"][0]["phi_guard"]["attributes"] == []
        stored = [p for p in Path(xnat.state_dir).rglob("*")
                  if p.is_file() and p.parent.name == "DICOM"]
        assert_clean_copies(stored, info.files)


def clean_session(where: Path, syntax: str = ExplicitVRLittleEndian) -> Any:
    """A study whose headers pass the guard (the patient name is the subject label)."""
    return write_session(where, series=SERIES, patient=CLEAN, extra=CLEAN_EXTRA,
                         transfer_syntax=syntax)


def test_phi_guard_reads_past_the_pixel_data_and_refuses_private_phi_there(
        tmp_path, storescp, daemon):
    info = clean_session(tmp_path / "src" / "MR_PRIV", ImplicitVRLittleEndian)
    for path in info.files:
        add_trailer(path)
    config, inbox = make_site(tmp_path, dicom_destination(storescp),
                              {**NO_DEID, "phi_guard": "reject"})
    proc = daemon(config)
    put(tmp_path / "src" / "MR_PRIV", inbox)
    outcome, report, report_path = wait_for_report(inbox, "MR_PRIV", daemon=proc)
    proc.stop()

    assert outcome == "failed"
    assert not storescp.files()
    [study] = report["studies"]
    assert study["phi_guard"]["attributes"] == ["private tags"]
    assert "private tags" in " ".join(study["reasons"])
    for text in (report_path.read_text(), proc.text()):
        assert "MRN4711" not in text  # names only, never values


@pytest.mark.parametrize("guard", ["reject", "warn"])
def test_phi_guard_finds_phi_in_the_second_instance_of_a_series(
        tmp_path, storescp, daemon, guard):
    info = clean_session(tmp_path / "src" / "MR_SECOND")
    second = info.files[1]  # of the first series; the first instance is clean
    ds = dcmread(second)
    assert ds.InstanceNumber == 2
    ds.OtherPatientIDs = "NHS9434765919"
    ds.save_as(second)
    config, inbox = make_site(tmp_path, dicom_destination(storescp),
                              {**NO_DEID, "phi_guard": guard})
    proc = daemon(config)
    put(tmp_path / "src" / "MR_SECOND", inbox)
    outcome, report, _ = wait_for_report(inbox, "MR_SECOND", daemon=proc)
    proc.stop()

    [study] = report["studies"]
    assert study["phi_guard"] == {"mode": guard, "attributes": ["OtherPatientIDs"]}
    if guard == "reject":
        assert outcome == "failed"
        assert not storescp.files()
    else:
        assert outcome == "done", report["reasons"]
        assert len(storescp.files()) == len(info.files)
    assert "NHS9434765919" not in proc.text()


def test_explain_lists_what_follows_the_pixel_data(tmp_path):
    info = write_session(tmp_path / "MR_EXPL", series=SERIES[:1], patient=PATIENT)
    for path in info.files:
        add_trailer(path)
    config, inbox = make_site(tmp_path, {"type": "dicom", "host": "127.0.0.1", "port": 1},
                              {**DEID, "phi_guard": "reject"})
    shown = subprocess.run(
        [sys.executable, "-m", "xnat_inbox", "--config", str(config), "explain",
         str(tmp_path / "MR_EXPL"), "--inbox", str(inbox)],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    for line in ("(7FE1,1010): removed (private)", "DigitalSignaturesSequence: removed",
                 "DataSetTrailingPadding: removed"):
        assert line in shown.stdout
    assert "MRN4711" not in shown.stdout


@pytest.mark.parametrize("guard", ["reject", "off"])
def test_what_follows_the_pixel_data_is_read_up_to_a_limit_and_never_sent_unseen(
        tmp_path, storescp, daemon, guard):
    info = write_session(tmp_path / "src" / "MR_HUGE", series=SERIES[:1], patient=PATIENT)
    huge = info.files[-1]  # not the first: that one gives the de-identified labels
    with open(huge, "ab") as stream:  # a private element of 17 MiB, sparse on disk
        stream.write(b"\xe1\x7f\x10\x00LO\x04\x00ACME")
        stream.write(b"\xe1\x7f\x10\x10OB\x00\x00" + (17 << 20).to_bytes(4, "little"))
        stream.write(HIDDEN.encode() + b"\0")
        stream.truncate(stream.tell() - len(HIDDEN) - 1 + (17 << 20))
    config, inbox = make_site(tmp_path, dicom_destination(storescp),
                              {**DEID, "phi_guard": guard})
    proc = daemon(config)
    put(tmp_path / "src" / "MR_HUGE", inbox)
    outcome, report, _ = wait_for_report(inbox, "MR_HUGE", daemon=proc)
    proc.stop()

    assert outcome == "failed"
    [study] = report["studies"]
    reasons = " ".join(study["reasons"])
    assert "follow the pixel data, more than the 16 MiB" in reasons
    assert "IM0003.dcm" in reasons
    if guard == "reject":  # nothing is sent before every instance is inspected
        assert "PHI guard: cannot inspect 1 file(s)" in reasons
        assert not storescp.files()
    for path in storescp.files():  # the others, de-identified
        assert not any(value in path.read_bytes() for value in PHI)
    assert len(storescp.files()) < len(info.files)
