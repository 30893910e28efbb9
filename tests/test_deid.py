"""De-identification and the PHI guard: the daemon as a process, real receivers, fake PHI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom import dcmread
from pydicom.tag import Tag

from tests.conftest import checksums
from tests.daemon_runner import REPO, dicom_destination, wait_for_report, write_config
from xnat_inbox.commands.synthetic import Patient, SeriesSpec, write_session
from xnat_inbox.config import ConfigError, load_config
from xnat_inbox.routing.deidentify import action_for, profile_table, remap_uid

pytestmark = pytest.mark.deid

SECRET = "site-secret-for-tests-7f3a"
PATIENT = Patient("MRN4471923", "Harrington^Eleanor^Q", "19570312", "F")
EXTRA = {"PatientAddress": "42 Linden Lane, Springfield", "OtherPatientIDs": "NHS9434765919",
         "PatientTelephoneNumbers": "+44 20 7946 0958", "InstitutionName": "St Elsewhere Clinic",
         "ReferringPhysicianName": "Westphall^Donald", "OperatorsName": "Craig^Victor",
         "PatientMotherBirthName": "Auslander^Ruth", "AccessionNumber": "ACC99812"}
PHI = ("MRN4471923", "Harrington", "Eleanor", "19570312", "42 Linden Lane", "NHS9434765919",
       "7946 0958", "St Elsewhere", "Westphall", "Craig^Victor", "Auslander", "ACC99812")
PRIVATE = (0x0019, 0x1010)
ROUTE = {"project": "Proj", "subject": "{PatientID}", "session": "{folder}",
         "deidentify": "basic", "label_source": "deidentified", "phi_guard": "reject"}
SERIES = (SeriesSpec("T1 MPRAGE", 4), SeriesSpec("T2 FLAIR", 3))


def site(tmp_path: Path, peer: Any, route: dict[str, Any]) -> tuple[Path, Path]:
    inbox = tmp_path / "inbox"
    secret = tmp_path / "deid.secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    destination = dicom_destination(peer) if peer else {"type": "dicom", "host": "127.0.0.1",
                                                         "port": 1}
    config = write_config(tmp_path, {"scp": destination},
                          [{"path": str(inbox), "route": {"destination": "scp", **route}}],
                          deid_secret_file=str(secret))
    return config, inbox


def session(where: Path, series: tuple[SeriesSpec, ...] = SERIES, **kwargs: Any) -> Any:
    """A study full of fake PHI, with a private tag holding PHI too."""
    info = write_session(where, series=series, patient=PATIENT, extra=EXTRA, **kwargs)
    for path in info.files:
        ds = dcmread(path)
        ds.private_block(PRIVATE[0], "ACME PHI", create=True).add_new(0x10, "LO", PHI[0])
        ds.save_as(path)
    return info


def put(source: Path, inbox: Path, name: str) -> None:
    staging = source.parent / f"staging-{name}"
    shutil.copytree(source, staging)
    staging.rename(inbox / name)


def assert_no_phi(proc: Any, report_path: Path, name: str) -> None:
    texts = {"daemon log": proc.text(), "report": report_path.read_text(),
             "drop log": report_path.with_name(f"{name}.log").read_text()}
    for where, text in texts.items():
        for value in PHI:
            assert value not in text, f"{value!r} appears in the {where}"


def test_basic_profile_leaves_nothing_of_the_table_in_what_storescp_stored(
        tmp_path, storescp, daemon):
    info = session(tmp_path / "src" / "MR_DEID")
    before = checksums(tmp_path / "src" / "MR_DEID")
    originals = {str(dcmread(p).SOPInstanceUID): dcmread(p) for p in info.files}
    config, inbox = site(tmp_path, storescp, ROUTE)
    proc = daemon(config)
    put(tmp_path / "src" / "MR_DEID", inbox, "MR_DEID")
    outcome, report, report_path = wait_for_report(inbox, "MR_DEID", daemon=proc)
    proc.stop()

    assert outcome == "done", report["reasons"]
    received = [dcmread(path) for path in storescp.files()]
    assert len(received) == len(info.files)
    by_sop = {remap_uid(SECRET.encode(), sop): ds for sop, ds in originals.items()}
    for ds in received:
        original = by_sop[str(ds.SOPInstanceUID)]  # every SOP UID remapped, deterministically
        for element in original:
            action = action_for(element.tag)
            if action is None or element.tag == Tag("StudyDescription") or not element.value:
                continue
            kept = ds.get(element.tag)
            assert kept is None or kept.value != element.value, (element.keyword, action)
        assert not any(element.tag.is_private for element in ds)
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.StudyDescription == f"xnat://Proj/{ds.PatientID}/MR_DEID"  # written after
        assert ds.PixelData == original.PixelData
        raw = ds.to_json()
        for value in PHI:
            assert value not in raw, f"{value!r} reached the receiver"
    assert checksums(report_path.with_name("MR_DEID")) == before  # originals byte-identical
    assert_no_phi(proc, report_path, "MR_DEID")


def test_two_drops_of_one_study_merge_in_orthanc_and_lookup_finds_the_original(
        tmp_path, orthanc, daemon):
    study_uid = "1.2.826.0.1.3680043.8.498.1234567890123456789"
    session(tmp_path / "src" / "PART1", series=SERIES[:1], study_uid=study_uid)
    session(tmp_path / "src" / "PART2", series=(SeriesSpec("DWI", 2, number=3),),
            study_uid=study_uid)
    config, inbox = site(tmp_path, orthanc, {**ROUTE, "session": "S1"})
    proc = daemon(config)
    for name in ("PART1", "PART2"):
        put(tmp_path / "src" / name, inbox, name)
        outcome, report, _ = wait_for_report(inbox, name, daemon=proc)
        assert outcome == "done", report["reasons"]
    proc.stop()

    new_uid = remap_uid(SECRET.encode(), study_uid)
    assert orthanc.study_by_uid(study_uid) is None
    assert orthanc.instance_count(new_uid) == 6  # both drops in one study
    assert len(orthanc.studies()) == 1
    lookup = subprocess.run(
        [sys.executable, "-m", "xnat_inbox", "--config", str(config), "lookup", new_uid],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert lookup.returncode == 0, lookup.stderr
    assert f"StudyInstanceUID\t{study_uid}\t{new_uid}" in lookup.stdout
    helptext = subprocess.run([sys.executable, "-m", "xnat_inbox", "--help"], cwd=REPO,
                              capture_output=True, text=True, timeout=60).stdout
    assert "PHI-BEARING" in helptext


def test_phi_guard_reject_names_the_attributes_and_sends_nothing(tmp_path, storescp, daemon):
    write_session(tmp_path / "src" / "MANUAL", series=SERIES, patient=PATIENT,
                  extra={"BurnedInAnnotation": "YES", "InstitutionName": None,
                         "ReferringPhysicianName": None})
    config, inbox = site(tmp_path, storescp, {"project": "Proj", "subject": "SUBJ7",
                                              "session": "{folder}", "phi_guard": "reject"})
    proc = daemon(config)
    put(tmp_path / "src" / "MANUAL", inbox, "MANUAL")
    outcome, report, report_path = wait_for_report(inbox, "MANUAL", daemon=proc)
    proc.stop()

    assert outcome == "failed"
    assert not storescp.files()
    [reason] = report["studies"][0]["reasons"]
    assert "PHI guard" in reason
    for name in ("PatientName", "PatientBirthDate", "BurnedInAnnotation"):
        assert name in reason
    assert "InstitutionName" not in reason  # absent attributes are not named
    assert report["studies"][0]["phi_guard"]["attributes"][:2] == ["PatientName",
                                                                   "PatientBirthDate"]
    assert_no_phi(proc, report_path, "MANUAL")


def test_deidentify_without_a_site_secret_is_a_config_error(tmp_path):
    config = write_config(tmp_path, {"scp": {"type": "dicom", "host": "127.0.0.1", "port": 1}},
                          [{"path": str(tmp_path / "in"),
                            "route": {"destination": "scp", "deidentify": "basic"}}])
    with pytest.raises(ConfigError, match="deid_secret_file"):
        load_config(config)


def test_explain_lists_changes_with_values_redacted(tmp_path, storescp):
    config, inbox = site(tmp_path, storescp, ROUTE)
    session(inbox.parent / "MR_EXPL")
    run = [sys.executable, "-m", "xnat_inbox", "--config", str(config), "explain",
           str(inbox.parent / "MR_EXPL"), "--inbox", str(inbox)]
    shown = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    for line in ("PatientBirthDate: emptied", "InstitutionName: removed",
                 "StudyInstanceUID: UID remapped", "PatientID: pseudonymised",
                 "(0019,1010): removed (private)"):
        assert line in shown.stdout
    for value in PHI:
        assert value not in shown.stdout
    revealed = subprocess.run([*run, "--show-phi"], cwd=REPO, capture_output=True, text=True,
                              timeout=60).stdout
    assert "19570312" in revealed


def test_the_table_is_complete_for_the_basic_profile():
    exact, masked = profile_table()
    assert len(exact) + len(masked) >= 600  # Table E.1-1 has ~650 rows
    expected = {"PatientName": "Z", "PatientID": "Z", "PatientBirthDate": "Z",
                "StudyInstanceUID": "U", "SOPInstanceUID": "U", "InstitutionName": "X",
                "PatientAddress": "X", "ReferringPhysicianName": "Z", "AccessionNumber": "Z"}
    for keyword, action in expected.items():
        assert action_for(Tag(keyword)) == action, keyword
    assert action_for(Tag(0x6002, 0x4000)) == "X"  # overlay comments, a repeating group


def test_xnat_rest_upload_is_the_deidentified_copy_and_reads_back(tmp_path, daemon):
    from tests.fake_xnat import FakeXnat

    password = tmp_path / "xnat.secret"
    password.write_text("alice-pw\n")
    password.chmod(0o600)
    with FakeXnat({}) as xnat:
        destination = {"type": "xnat", "url": xnat.url, "allow_http": True,
                       "username": "alice",
                       "password_file": str(password), "connect_timeout": 3,
                       "retry": {"max_attempts": 2, "initial_backoff": 0.2, "max_backoff": 0.5}}
        config, inbox = site(tmp_path, None, {**ROUTE, "project": "TEST"})
        data = yaml.safe_load(config.read_text())
        data["destinations"] = {"xnat": destination}
        data["inboxes"][0]["route"]["destination"] = "xnat"
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        info = session(tmp_path / "src" / "MR_REST")
        before = checksums(tmp_path / "src" / "MR_REST")
        proc = daemon(config)
        put(tmp_path / "src" / "MR_REST", inbox, "MR_REST")
        outcome, report, report_path = wait_for_report(inbox, "MR_REST", daemon=proc)
        proc.stop()
        assert outcome == "done", report["reasons"]  # the read-back matched remapped series
        [entry] = xnat.prearchive()
        assert int(entry["file_count"]) == len(info.files)
        assert entry["subject"].startswith("ANON")
    assert checksums(report_path.with_name("MR_REST")) == before
    assert_no_phi(proc, report_path, "MR_REST")
