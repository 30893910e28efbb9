"""The XNAT REST destination end to end: the daemon as a process, the fake XNAT server."""

from __future__ import annotations

import base64
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_runner import REPO, DaemonProcess, wait_for_report, write_config
from tests.fake_xnat import UNASSIGNED, FakeXnat
from xnat_inbox.commands.synthetic import Patient, write_session
from xnat_inbox.config import XnatDestination
from xnat_inbox.reading.scan import scan_drop
from xnat_inbox.routing.route import Labels, RoutedStudy
from xnat_inbox.senders.xnat.sender import XnatSender

pytestmark = pytest.mark.xnat

PASSWORD = "alice-pw"
TOKEN_ALIAS, TOKEN_SECRET = "tok-3f9a", "S3cr3t-Token-Value-7Qx"
LABELS = ("SUBJ001", "SUBJ001_20260115")  # subject, session of write_session's defaults
ROUTE = {"project": "TEST", "subject": "{PatientID}", "session": "{PatientID}_{StudyDate}",
         "series": {"exclude": {"SeriesDescription": "(?i)localizer"}}}
SENT = 30  # write_session's 33 instances less the localizer's 3
RETRY = {"max_attempts": 4, "initial_backoff": 0.2, "max_backoff": 0.5}


@pytest.fixture
def xnat() -> Any:
    config = {"tokens": [{"alias": TOKEN_ALIAS, "secret": TOKEN_SECRET, "user": "alice"}]}
    with FakeXnat(config) as server:
        yield server


def secret_file(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def xnat_destination(xnat: FakeXnat, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {"type": "xnat", "url": xnat.url, "allow_http": True, "username": "alice",
            "password_file": str(secret_file(tmp_path, "xnat.secret", PASSWORD)),
            "connect_timeout": 3, "read_timeout": 30, "retry": RETRY, **extra}


def site(tmp_path: Path, destination: dict[str, Any], **route: Any) -> tuple[Path, Path]:
    inbox = tmp_path / "inbox"
    config = write_config(tmp_path, {"xnat": destination},
                          [{"path": str(inbox), "route": {"destination": "xnat", **ROUTE,
                                                          **route}}])
    return config, inbox


def drop(tmp_path: Path, inbox: Path, name: str, **session: Any) -> Path:
    """Write a session beside the inbox, then rename it in whole."""
    staging = tmp_path / "staging" / name
    write_session(staging, **session)
    target = inbox / name
    staging.rename(target)
    return target


def archived(xnat: FakeXnat, label: str = LABELS[1]) -> dict[str, Any]:
    [session] = [s for s in xnat.archive() if s["label"] == label]
    return session


def http_events(proc: Any) -> list[dict[str, Any]]:
    return [e for e in proc.events() if e.get("event") == "xnat http"]


def test_prearchive_drop_arrives_with_labels_and_file_count(tmp_path, xnat, daemon):
    config, inbox = site(tmp_path, xnat_destination(xnat, tmp_path))
    proc = daemon(config)
    drop(tmp_path, inbox, "MR_PRE")
    outcome, report, report_path = wait_for_report(inbox, "MR_PRE", daemon=proc)

    assert outcome == "done", report["reasons"]
    [entry] = xnat.prearchive()
    assert (entry["project"], entry["subject"], entry["name"]) == ("TEST", *LABELS)
    assert entry["status"] == "READY" and int(entry["file_count"]) == SENT
    assert report["studies"][0]["stored"] == SENT
    assert not xnat.archive()
    # one event per HTTP exchange, with what the issue asks for, in the drop's own log too
    events = http_events(proc)
    assert {"method", "path", "status", "bytes_out", "bytes_in", "seconds"} <= events[0].keys()
    imports = [e for e in events if e["path"] == "/data/services/import"]
    assert len(imports) == 1 and imports[0]["status"] == 200 and imports[0]["bytes_out"] > 0
    assert "xnat http" in report_path.with_name("MR_PRE.log").read_text()
    # progress was recorded as it went (status and the STATUS line read it)
    with sqlite3.connect(tmp_path / "state" / "state.db") as db:
        files, sent = db.execute("SELECT files, bytes FROM progress").fetchone()
    assert files == SENT and sent == report["studies"][0]["bytes_sent"] > 0
    requests = xnat.requests()
    commits = [r for r in requests if r["query"] == "action=commit"]
    assert len(commits) == 1
    [upload] = [r for r in requests if r["path"] == "/data/services/import"]
    assert "prevent_auto_commit=true" in upload["query"]


def test_archive_drop_per_series_zips_in_parallel(tmp_path, xnat, daemon):
    destination = xnat_destination(xnat, tmp_path, study_zip_max_files=5, max_parallel=2,
                                   compression="deflate")
    config, inbox = site(tmp_path, destination, dest="archive")  # dest set by the route
    proc = daemon(config)
    drop(tmp_path, inbox, "MR_ARC")
    outcome, report, _ = wait_for_report(inbox, "MR_ARC", daemon=proc)

    assert outcome == "done", report["reasons"]
    session = archived(xnat)
    assert (session["project"], session["subject"]) == ("TEST", LABELS[0])
    assert len(session["files"]) == SENT and session["scans"] == ["2", "3", "4"]
    assert not xnat.prearchive()
    paths = [r["path"] for r in xnat.requests()]
    assert paths.count("/data/services/import") == 3  # one zip per series
    assert paths.count("/data/services/archive") == 1


def test_overwrite_none_on_existing_session_fails_with_xnat_message(tmp_path, xnat, daemon):
    config, inbox = site(tmp_path, xnat_destination(xnat, tmp_path, dest="archive"))
    proc = daemon(config)
    drop(tmp_path, inbox, "FIRST")
    assert wait_for_report(inbox, "FIRST", daemon=proc)[0] == "done"
    drop(tmp_path, inbox, "SECOND")  # another study, same labels
    outcome, report, report_path = wait_for_report(inbox, "SECOND", daemon=proc)

    assert outcome == "failed"
    reasons = " ".join(report["reasons"])
    assert "Session already exists, retry with overwrite enabled" in reasons
    assert "label clash" in reasons and "choose another session label" in reasons
    assert "CONFLICT" in reasons
    assert report_path.with_name("SECOND").is_dir()
    assert len(report["attempts"]) == 1  # permanent: not retried
    assert len(archived(xnat)["files"]) == SENT  # the first session untouched


def test_append_merges_into_the_existing_session(tmp_path, xnat, daemon):
    config, inbox = site(tmp_path, xnat_destination(xnat, tmp_path, dest="archive"),
                         overwrite="append", series=None)
    source = tmp_path / "source"
    write_session(source)
    parts = sorted(p.name for p in source.iterdir())  # 1_Localizer, 2_T1..., 3_..., 4_DWI
    proc = daemon(config)
    for name, series in (("PART1", parts[:2]), ("PART2", parts[2:])):
        staging = tmp_path / "staging" / name
        for folder in series:
            shutil.copytree(source / folder, staging / folder)
        staging.rename(inbox / name)
        outcome, report, _ = wait_for_report(inbox, name, daemon=proc)
        assert outcome == "done", report["reasons"]

    session = archived(xnat)
    assert session["scans"] == ["1", "2", "3", "4"] and len(session["files"]) == 33
    archives = [r for r in xnat.requests() if r["path"] == "/data/services/archive"]
    assert len(archives) == 2 and all(r["status"] == 200 for r in archives)


def test_same_series_appended_twice_is_a_uid_conflict_with_its_remedy(tmp_path, xnat, daemon):
    config, inbox = site(tmp_path, xnat_destination(xnat, tmp_path, dest="archive",
                                                    overwrite="append"))
    write_session(tmp_path / "source")
    proc = daemon(config)
    for name in ("ONCE", "TWICE"):
        shutil.copytree(tmp_path / "source", tmp_path / "staging" / name)
        (tmp_path / "staging" / name).rename(inbox / name)
        outcome, report, _ = wait_for_report(inbox, name, daemon=proc)
    assert outcome == "failed"
    reasons = " ".join(report["reasons"])
    assert "with the same UID and number" in reasons
    assert "UID conflict: resolve it in XNAT's Prearchive" in reasons
    [entry] = xnat.prearchive()
    assert entry["status"] == "CONFLICT" and entry["message"] in reasons


@pytest.mark.parametrize("project", ["SECRET", "OTHER", "NOSUCH"])
def test_project_without_access_fails_and_nothing_lands_in_unassigned(tmp_path, xnat, daemon,
                                                                       project):
    config, inbox = site(tmp_path, xnat_destination(xnat, tmp_path), project=project)
    proc = daemon(config)
    drop(tmp_path, inbox, "MR_NOACCESS")
    outcome, report, _ = wait_for_report(inbox, "MR_NOACCESS", daemon=proc)

    assert outcome == "failed"
    assert f"no access to project {project}" in " ".join(report["reasons"])
    assert xnat.prearchive() == [] and xnat.archive() == []
    assert not [r for r in xnat.requests() if r["path"] == "/data/services/import"]


def test_uri_in_another_project_is_a_failure(tmp_path, xnat, daemon):
    # an XNAT that can't list writable projects: only the returned URI betrays Unassigned
    xnat.add_fault(path_prefix="/data/projects/OTHER", times=-1)  # passes, matched first
    xnat.add_fault(path_prefix="/data/projects", method="GET", status=400, times=-1,
                   body="permissions not supported")
    config, inbox = site(tmp_path, xnat_destination(xnat, tmp_path), project="OTHER")
    proc = daemon(config)
    drop(tmp_path, inbox, "MR_UNASSIGNED")
    outcome, report, _ = wait_for_report(inbox, "MR_UNASSIGNED", daemon=proc)

    assert outcome == "failed"
    assert "XNAT filed the import under project Unassigned" in " ".join(report["reasons"])
    assert len(report["attempts"]) == 1
    assert not [r for r in xnat.requests() if r["query"] == "action=commit"]
    assert [e["project"] for e in xnat.prearchive()] == [UNASSIGNED]  # XNAT's doing, reported


def test_session_expired_mid_run_logs_in_again(tmp_path, xnat, daemon):
    config, inbox = site(tmp_path, xnat_destination(xnat, tmp_path))
    proc = daemon(config)
    drop(tmp_path, inbox, "MR_A", study_date="20260101")
    assert wait_for_report(inbox, "MR_A", daemon=proc)[0] == "done"
    assert xnat.expire_sessions() == 1  # the server forgot our session (15 min idle)
    drop(tmp_path, inbox, "MR_B", study_date="20260102")
    outcome, report, _ = wait_for_report(inbox, "MR_B", daemon=proc)
    assert outcome == "done", report["reasons"]
    xnat.add_fault(path_prefix="/data/services/import", status=401, times=1)
    drop(tmp_path, inbox, "MR_C", study_date="20260103")
    outcome, report, _ = wait_for_report(inbox, "MR_C", daemon=proc)

    assert outcome == "done", report["reasons"]
    assert len(report["attempts"]) == 1  # renewed within the attempt
    requests = xnat.requests()
    logins = [r for r in requests if r["path"] == "/data/JSESSION" and r["method"] == "POST"]
    assert len(logins) == 3  # at first, after the expiry, after the 401 on import
    assert [r["status"] for r in requests].count(401) == 2
    assert all(r["auth"] == "cookie" for r in requests
               if r["path"] != "/data/JSESSION" and r["status"] == 200)
    assert len(xnat.prearchive()) == 3


def test_service_unavailable_twice_then_success(tmp_path, xnat, daemon):
    xnat.add_fault(path_prefix="/data/services/import", status=503, times=2,
                   body="Service Temporarily Unavailable")
    config, inbox = site(tmp_path, xnat_destination(xnat, tmp_path, dest="archive"))
    proc = daemon(config)
    drop(tmp_path, inbox, "MR_503")
    outcome, report, _ = wait_for_report(inbox, "MR_503", daemon=proc)

    assert outcome == "done", report["reasons"]
    assert [a["outcome"] for a in report["attempts"]] == ["TransientFailure"] * 2 + ["done"]
    assert "503" in report["attempts"][0]["reason"]
    assert len(archived(xnat)["files"]) == SENT


def test_connection_dropped_mid_upload_is_retried_without_duplicates(tmp_path, xnat, daemon):
    xnat.add_fault(path_prefix="/data/services/import", drop_connection_after_bytes=120_000)
    config, inbox = site(tmp_path, xnat_destination(xnat, tmp_path, dest="archive"))
    proc = daemon(config)
    drop(tmp_path, inbox, "MR_DROP")
    outcome, report, _ = wait_for_report(inbox, "MR_DROP", daemon=proc)

    assert outcome == "done", report["reasons"]
    assert len(report["attempts"]) == 2
    files = archived(xnat)["files"]
    assert len(files) == SENT
    assert len({f["sop_uid"] for f in files}) == SENT  # merged, not duplicated
    assert not xnat.prearchive()
    dropped = [r for r in xnat.requests() if r["dropped"]]
    assert len(dropped) == 1


@pytest.mark.parametrize("fault", [
    {"status": 503},  # the archive step failed: archive the uploaded entry again
    {"process": True},  # archived, but the answer was lost: read back, archive nothing twice
])
def test_archive_step_failure_continues_with_the_uploaded_entry(tmp_path, xnat, daemon, fault):
    xnat.add_fault(path_prefix="/data/services/archive", **fault)
    config, inbox = site(tmp_path, xnat_destination(xnat, tmp_path, dest="archive"))
    proc = daemon(config)
    drop(tmp_path, inbox, "MR_ARCFAIL")
    outcome, report, _ = wait_for_report(inbox, "MR_ARCFAIL", daemon=proc)

    assert outcome == "done", report["reasons"]
    assert len(report["attempts"]) == 2
    paths = [r["path"] for r in xnat.requests()]
    assert paths.count("/data/services/import") == 1  # not uploaded again
    assert paths.count("/data/services/archive") == (2 if "status" in fault else 1)
    assert len(archived(xnat)["files"]) == SENT and not xnat.prearchive()


def test_a_restart_between_upload_and_archive_continues_with_the_uploaded_entry(tmp_path,
                                                                                xnat):
    xnat.add_fault(path_prefix="/data/services/archive", status=503, times=-1)
    config, inbox = site(tmp_path, xnat_destination(
        xnat, tmp_path, dest="archive",
        retry={"max_attempts": 50, "initial_backoff": 0.2, "max_backoff": 0.3}))
    first = DaemonProcess(config, tmp_path / "daemon-1.log").start()
    try:
        drop(tmp_path, inbox, "MR_RESTART")
        deadline = time.monotonic() + 60
        while [r["path"] for r in xnat.requests()].count("/data/services/archive") < 2:
            assert time.monotonic() < deadline, first.text()[-3000:]
            time.sleep(0.05)
        assert first.proc is not None
        first.proc.kill()  # kill -9 after the upload, with the archive step still failing
        first.proc.wait(timeout=10)
    finally:
        first.stop()
    xnat.clear_faults()
    second = DaemonProcess(config, tmp_path / "daemon-2.log").start()
    try:
        outcome, report, _ = wait_for_report(inbox, "MR_RESTART", daemon=second)
    finally:
        second.stop()
    assert outcome == "done", report["reasons"]
    paths = [r["path"] for r in xnat.requests()]
    assert paths.count("/data/services/import") == 1  # the restart did not upload again
    assert len(archived(xnat)["files"]) == SENT and not xnat.prearchive()


def test_verify_shortfall_fails_with_the_numbers(tmp_path, xnat, daemon):
    subject, session = LABELS
    listing = (f"/data/archive/projects/TEST/subjects/{subject}/experiments/{session}"
               "/scans/ALL/files")
    rows = [{"Name": f"f{i}.dcm", "Size": "1000", "cat_ID": "2", "URI": ""} for i in range(2)]
    xnat.add_fault(path_prefix=listing, status=200, content_type="application/json",
                   body=json.dumps({"ResultSet": {"Result": rows}}))
    config, inbox = site(tmp_path, xnat_destination(xnat, tmp_path, dest="archive"))
    proc = daemon(config)
    drop(tmp_path, inbox, "MR_SHORT")
    outcome, report, _ = wait_for_report(inbox, "MR_SHORT", daemon=proc)

    assert outcome == "failed"
    reasons = " ".join(report["reasons"])
    assert f"XNAT holds 2 of the {SENT} file(s) sent ({SENT - 2} missing" in reasons
    assert f"sent {SENT} file(s)" in reasons
    assert report["studies"][0]["stored"] == 0


def test_wrong_password_fails_without_retries(tmp_path, xnat, daemon):
    destination = xnat_destination(xnat, tmp_path)
    secret = Path(destination["password_file"])
    secret.write_text("not-the-password\n")
    secret.chmod(0o644)
    config, inbox = site(tmp_path, destination)
    proc = daemon(config)
    drop(tmp_path, inbox, "MR_BADPW")
    outcome, report, _ = wait_for_report(inbox, "MR_BADPW", daemon=proc)
    assert outcome == "failed" and len(report["attempts"]) == 1
    assert "refused the password of 'alice'" in " ".join(report["reasons"])
    proc.stop()
    assert "not-the-password" not in proc.text()
    assert "secret file is readable by other users; make it private" in proc.text()


def test_credentials_never_appear_in_logs_or_reports(tmp_path, xnat, daemon):
    token = secret_file(tmp_path, "token", f"{TOKEN_ALIAS}:{TOKEN_SECRET}")
    destinations = {
        "pw": xnat_destination(xnat, tmp_path),
        "tok": {"type": "xnat", "url": xnat.url, "allow_http": True, "token_file": str(token),
                "retry": RETRY},
    }
    inbox = tmp_path / "inbox"
    config = write_config(tmp_path, destinations, [{"path": str(inbox)}])
    for name in ("pw", "tok"):
        (inbox / name).mkdir(parents=True)
        (inbox / name / "route.yaml").write_text(json.dumps(
            {"destination": name, **ROUTE, "session": f"{{PatientID}}_{name}"}))
    proc = daemon(config)
    for name in ("pw", "tok"):
        staging = tmp_path / "staging" / name
        write_session(staging, patient=Patient(f"SUBJ_{name}", "Roe^Rick"))
        staging.rename(inbox / name / f"MR_{name}")
        outcome, report, _ = wait_for_report(inbox, f"MR_{name}", daemon=proc)
        assert outcome == "done", report["reasons"]
    users = [r["auth"] for r in xnat.requests() if r["path"] == "/data/JSESSION"]
    assert "basic" in users and "token" in users
    proc.stop()
    texts = [proc.text()] + [p.read_text() for p in tmp_path.rglob("*.log")] + \
        [p.read_text() for p in tmp_path.rglob("*.report.json*")]
    basic = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    for text in texts:
        for secret in (PASSWORD, TOKEN_SECRET, basic):
            assert secret not in text
    # logged out at shutdown: no server session left behind
    assert xnat.state(log=False)["sessions"] == []


def test_check_logs_in_and_lists_writable_projects(tmp_path, xnat):
    config, _ = site(tmp_path, xnat_destination(xnat, tmp_path))
    result = subprocess.run([sys.executable, "-m", "xnat_inbox", "--config", str(config),
                             "check"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"ok   destination xnat: logged in to {xnat.url} as alice; can write: TEST" \
        in result.stdout
    assert xnat.state(log=False)["sessions"] == []  # logged out again
    assert PASSWORD not in result.stdout + result.stderr


def test_explain_tells_where_in_xnat_a_study_would_go(tmp_path, xnat):
    config, inbox = site(tmp_path, xnat_destination(xnat, tmp_path), dest="archive")
    write_session(tmp_path / "MR_X")
    result = subprocess.run([sys.executable, "-m", "xnat_inbox", "--config", str(config),
                             "explain", str(tmp_path / "MR_X"), "--inbox", str(inbox),
                             "--show-phi"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (f"would send {SENT} instance(s) to xnat (XNAT REST: TEST/{LABELS[0]}/{LABELS[1]} "
            "into the archive, overwrite: none)") in result.stdout
    assert xnat.requests() == []  # explain sends nothing


def test_check_fails_on_bad_credentials(tmp_path, xnat):
    destination = xnat_destination(xnat, tmp_path)
    Path(destination["password_file"]).write_text("wrong\n")
    config, _ = site(tmp_path, destination)
    result = subprocess.run([sys.executable, "-m", "xnat_inbox", "--config", str(config),
                             "check"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 1
    assert "FAIL destination xnat: XNAT at" in result.stdout
    assert "refused the password of 'alice'" in result.stdout


def test_stop_request_abandons_the_upload_between_files(tmp_path, xnat):
    write_session(tmp_path / "s")
    [study] = scan_drop(tmp_path / "s").studies.values()
    routed = RoutedStudy(study, "x", Labels("TEST", *LABELS), "StudyDescription", "",
                         included=list(study.series.values()))
    destination = XnatDestination.model_validate(xnat_destination(xnat, tmp_path))
    sender = XnatSender("x", destination)
    answers = iter([False] * 5 + [True] * 100)
    delivery = sender.send(routed, routed.instances, should_stop=lambda: next(answers))
    sender.close()
    assert delivery.interrupted and not delivery.outcomes and delivery.error is None
    assert not [r for r in xnat.requests() if r["query"] == "action=commit"]
    assert xnat.state(log=False)["sessions"] == []
