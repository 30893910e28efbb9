"""First contact (issue 16): the command line as a new site meets it, archives in explain and
retry, check's warning when no route applies, the routing folder kept under done/, a lone
DICOM file without UIDs named for what it is."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time
import zipfile
from datetime import date, datetime
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.daemon_runner import (
    REPO,
    DaemonProcess,
    dicom_destination,
    wait_for_report,
    write_config,
)
from tests.test_e2e_cstore import ROUTE, copy_in
from xnat_inbox.commands.synthetic import Patient, SeriesSpec, write_session
from xnat_inbox.config import InboxConfig
from xnat_inbox.intake.claim import claim
from xnat_inbox.intake.watch import DropRef
from xnat_inbox.outcome.finish import finish, plan_target
from xnat_inbox.service.supervise import finished_today


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "XNAT_INBOX_CONFIG"}
    return subprocess.run([sys.executable, "-m", "xnat_inbox", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=120, env={**environment, **(env or {})})


def site(tmp_path: Path, peer: object, route: bool = True) -> tuple[Path, Path]:
    inbox = tmp_path / "inbox"
    extra = {"route": {"destination": "scp", **ROUTE}} if route else {}
    config = write_config(tmp_path, {"scp": dicom_destination(peer)},
                          [{"path": str(inbox), **extra}])
    return config, inbox


def wait_for(path: Path, proc: DaemonProcess, timeout: float = 60) -> Path:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"no {path}\n{proc.text()[-4000:]}"
        time.sleep(0.1)
    return path


# --- 7: --config and --log-format before or after the command; XNAT_INBOX_CONFIG ------------

@pytest.mark.ops
def test_config_before_or_after_the_command_and_from_the_environment(tmp_path, storescp):
    config, _ = site(tmp_path, storescp)
    valid = f"config {config}: valid"
    for args in (("--config", str(config), "check"), ("check", "--config", str(config)),
                 ("check", "--log-format", "json", "--config", str(config))):
        result = cli(*args)
        assert result.returncode == 0 and valid in result.stdout, (args, result.stderr)
    from_env = cli("check", env={"XNAT_INBOX_CONFIG": str(config)})
    assert from_env.returncode == 0 and valid in from_env.stdout, from_env.stderr
    # the command line wins over the environment, which wins over the default
    missing = tmp_path / "missing.yaml"
    result = cli("check", "--config", str(config), env={"XNAT_INBOX_CONFIG": str(missing)})
    assert result.returncode == 0 and valid in result.stdout, result.stderr
    result = cli("check", env={"XNAT_INBOX_CONFIG": str(missing)})
    assert result.returncode == 2
    assert f"(named by $XNAT_INBOX_CONFIG):\n{missing}: cannot read" in result.stderr
    assert "XNAT_INBOX_CONFIG" in cli("--help").stdout
    assert "XNAT_INBOX_CONFIG" in cli("run", "--help").stdout


@pytest.mark.ops
def test_run_takes_its_options_after_the_command(tmp_path, storescp):
    config, inbox = site(tmp_path, storescp)
    log_path = tmp_path / "daemon.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "xnat_inbox", "run", "--config",
                                 str(config), "--log-format", "json"], stdout=log, stderr=log,
                                cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    runner = DaemonProcess(config, log_path)
    runner.proc = proc  # stopped by its PID below
    try:
        deadline = time.monotonic() + 30
        while not (watching := [e for e in runner.events() if e.get("event") == "watching"]):
            assert proc.poll() is None, runner.text()  # exits 2 on unrecognized arguments
            assert time.monotonic() < deadline, runner.text()
            time.sleep(0.05)
        assert watching[0]["inbox"] == str(inbox)  # JSON lines: --log-format was taken
    finally:
        assert runner.stop() == 0


# --- 8: archives in explain and retry --------------------------------------------------------

def _archives(tmp_path: Path, inbox: Path) -> str:
    session = write_session(tmp_path / "src" / "z1", series=(SeriesSpec("T1", 2),
                                                              SeriesSpec("T2", 1)))
    with zipfile.ZipFile(inbox / "z1.zip", "w") as archive:
        for path in session.files:
            archive.write(path, path.relative_to(tmp_path / "src").as_posix())
    with tarfile.open(inbox / "t1.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "src" / "z1", "z1")
    return session.study_uid


@pytest.mark.ops
def test_explain_shows_how_an_archive_would_be_grouped(tmp_path):
    peer = type("Peer", (), {"host": "127.0.0.1", "port": 104, "aet": "SCP"})()
    config, inbox = site(tmp_path, peer)
    study_uid = _archives(tmp_path, inbox)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    for name in ("z1.zip", "t1.tar.gz"):
        result = cli("--config", str(config), "explain", str(inbox / name),
                     env={"TMPDIR": str(scratch)})
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0] == f"Drop {inbox / name}  ({{folder}}={name}, {{parent}}=inbox)"
        assert lines[1].startswith(f"Archive: unpacked within {config} inboxes[0].archives")
        assert lines[2] == "Files: 3 (dicom 3)"
        assert f"Study 1: {study_uid}: 3 instance(s) in 2 series" in lines
        assert "  would send 3 instance(s) to scp" in lines
    assert list(scratch.iterdir()) == []  # the unpacked copies are gone
    assert sorted(p.name for p in inbox.iterdir()) == ["t1.tar.gz", "z1.zip"]  # nothing moved


@pytest.mark.ops
def test_explain_outside_every_inbox_or_of_a_non_drop_exits_non_zero(tmp_path):
    peer = type("Peer", (), {"host": "127.0.0.1", "port": 104, "aet": "SCP"})()
    config, inbox = site(tmp_path, peer)
    write_session(tmp_path / "elsewhere" / "MR1", series=(SeriesSpec("T1", 1),))
    result = cli("--config", str(config), "explain", str(tmp_path / "elsewhere" / "MR1"))
    assert result.returncode == 2
    assert "is not in a configured inbox; name one with --inbox" in result.stderr
    (inbox / "notes.txt").write_text("hello")
    result = cli("--config", str(config), "explain", str(inbox / "notes.txt"))
    assert result.returncode == 2 and "is not a folder or an archive" in result.stderr


def _zip(session_dir: Path, target: Path) -> None:
    with zipfile.ZipFile(target, "w") as archive:
        for path in sorted(session_dir.rglob("*.dcm")):
            archive.write(path, path.relative_to(session_dir.parent).as_posix())


@pytest.mark.e2e
def test_a_failed_archive_is_retried_after_its_route_is_fixed(tmp_path, storescp, daemon):
    config, inbox = site(tmp_path, storescp, route=False)
    study = inbox / "StudyV"
    study.mkdir()
    (study / "route.yaml").write_text("project: PV\n")  # no destination, no labels yet
    write_session(tmp_path / "src" / "z1", series=(SeriesSpec("T1", 2),))
    write_session(tmp_path / "again" / "z1", series=(SeriesSpec("T1", 1),),
                  patient=Patient("SUBJ002"))
    _zip(tmp_path / "src" / "z1", tmp_path / "z1.zip")
    proc = daemon(config)
    (tmp_path / "z1.zip").rename(study / "z1.zip")
    outcome, report, report_path = wait_for_report(inbox, "z1.zip", daemon=proc)
    assert outcome == "failed" and "has no destination" in report["reasons"][0]
    day = date.today().isoformat()
    assert report_path == inbox / "failed" / day / "StudyV" / "z1.zip.report.json"  # point 11
    proc.stop()

    (study / "route.yaml").write_text('destination: scp\nproject: PV\nsubject: "{PatientID}"\n'
                                      'session: "{PatientID}_{StudyDate}"\n')
    _zip(tmp_path / "again" / "z1", study / "z1.zip")  # meanwhile, another z1.zip arrived
    result = cli("--config", str(config), "retry", str(report_path.with_name("z1.zip")))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(f"-> {study / 'z1-retry1.zip'}")  # still an archive
    # the report and the log are set aside alike (point 11)
    beside = sorted(p.name for p in report_path.parent.iterdir())
    assert beside == ["z1.zip.log.retried", "z1.zip.report.json.retried"], beside
    proc = daemon(config)
    done = inbox / "done" / day / "StudyV"
    for name in ("z1-retry1.zip", "z1.zip"):
        assert '"outcome": "done"' in wait_for(done / f"{name}.report.json", proc).read_text()
    assert len(storescp.files()) == 3
    assert {str(dcmread(p).StudyDescription) for p in storescp.files()} == {
        "xnat://PV/SUBJ001/SUBJ001_20260115", "xnat://PV/SUBJ002/SUBJ002_20260115"}


# --- 10: check warns when no route applies --------------------------------------------------

@pytest.mark.ops
def test_check_warns_when_no_route_applies(tmp_path, storescp):
    config, inbox = site(tmp_path, storescp, route=False)
    result = cli("--config", str(config), "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (f"warn inbox {inbox}: no route applies, every drop copied into it would fail: "
            "no route.yaml applies to this drop") in result.stdout

    (inbox / "StudyV").mkdir()
    (inbox / "StudyV" / "route.yaml").write_text("project: PV\n")  # no destination, labels
    result = cli("--config", str(config), "check")
    assert f"warn   {inbox / 'StudyV'}: the route for this drop (from " \
           f"{inbox / 'StudyV' / 'route.yaml'}) has no destination, subject, session" \
           in result.stdout, result.stdout

    (inbox / "StudyV" / "route.yaml").write_text(
        'destination: scp\nproject: PV\nsubject: "{PatientID}"\nsession: "{StudyDate}"\n')
    result = cli("--config", str(config), "check")
    assert not [line for line in result.stdout.splitlines() if line.startswith("warn")], \
        result.stdout  # StudyV's drops have a route now
    assert f"note drops copied into {inbox} itself (not into a routing folder) would fail" \
        in result.stdout


# --- 11: done/<date>/<routing folder>/<drop> --------------------------------------------------

@pytest.mark.e2e
def test_done_keeps_the_routing_folder_the_drop_came_from(tmp_path, storescp, daemon):
    config, inbox = site(tmp_path, storescp)
    for folder, patient in (("StudyV", "PV1"), ("studyW", "PW1")):
        (inbox / folder).mkdir()
        (inbox / folder / "route.yaml").write_text(f"project: {folder}\n")
        write_session(tmp_path / "src" / folder / "v1", series=(SeriesSpec("T1", 1),),
                      patient=Patient(patient))
    write_session(tmp_path / "src" / "v1", series=(SeriesSpec("T1", 1),),
                  patient=Patient("ROOT1"))
    proc = daemon(config)
    for folder in ("StudyV", "studyW"):
        copy_in(tmp_path / "src" / folder / "v1", inbox / folder)
    copy_in(tmp_path / "src" / "v1", inbox)
    day = inbox / "done" / date.today().isoformat()
    for where in ("StudyV", "studyW", ""):
        report = wait_for(day / where / "v1.report.json", proc)
        assert '"outcome": "done"' in report.read_text()
        assert (day / where / "v1.log").is_file()
        assert sorted(p.name for p in (day / where / "v1").iterdir())  # the originals
    for folder in ("StudyV", "studyW"):  # made by the daemon, like done/ itself
        info = (day / folder).stat()
        assert info.st_uid == os.geteuid() and info.st_mode & 0o777 == 0o750
    assert not (day / "v1-1").exists()
    assert {str(dcmread(p).StudyDescription).split("/")[2] for p in storescp.files()} == {
        "StudyV", "studyW", "Proj"}


# --- 12: a lone DICOM file without its UIDs -------------------------------------------------

@pytest.mark.e2e
def test_a_lone_dicom_file_without_study_uid_is_named_for_what_it_is(tmp_path, storescp,
                                                                      daemon):
    config, inbox = site(tmp_path, storescp)
    session = write_session(tmp_path / "src" / "NOUID", series=(SeriesSpec("T1", 1),))
    ds = dcmread(session.files[0])
    del ds.StudyInstanceUID
    ds.save_as(session.files[0])
    proc = daemon(config)
    copy_in(tmp_path / "src" / "NOUID", inbox)
    outcome, report, _ = wait_for_report(inbox, "NOUID", daemon=proc)
    assert outcome == "failed"
    name = session.files[0].relative_to(tmp_path / "src" / "NOUID").as_posix()
    assert report["reasons"] == [
        f"no DICOM study to send: 1 file(s) look like DICOM but can't be used: {name} (DICOM "
        "file without StudyInstanceUID: XNAT can't place it); fix or remove them, then "
        "`xnat-inbox retry`"]
    assert storescp.files() == []


@pytest.mark.ops
def test_a_routing_folder_under_done_never_mixes_with_a_drop_of_its_name(tmp_path):
    """done/<day>/StudyV is a drop's originals (a drop once copied in as StudyV): the drops of
    the routing folder StudyV go to done/<day>/StudyV-1/, and a later drop StudyV beside the
    routing folder of that name takes another name."""
    (tmp_path / "inbox" / "StudyV").mkdir(parents=True)
    inbox = InboxConfig(path=tmp_path / "inbox")
    day = inbox.done / "2026-01-02"
    (day / "StudyV").mkdir(parents=True)
    (day / "StudyV.report.json").write_text("{}")
    write_session(inbox.path / "StudyV" / "v1", series=(SeriesSpec("T1", 1),))
    drop = claim(DropRef(inbox, inbox.path / "StudyV", "v1"))
    target = plan_target(drop, True, datetime(2026, 1, 2))
    assert target == day / "StudyV-1" / "v1"
    assert finish(drop, target, {"outcome": "done"}, ["log"]) == target
    assert sorted(p.name for p in (day / "StudyV-1").iterdir()) == [
        "v1", "v1.log", "v1.report.json"]
    assert sorted(p.name for p in (day / "StudyV").iterdir()) == []  # the old drop untouched
    write_session(inbox.path / "StudyV-1", series=(SeriesSpec("T1", 1),))  # a drop, this time
    drop = claim(DropRef(inbox, inbox.path, "StudyV-1"))
    assert plan_target(drop, False, datetime(2026, 1, 2)).parent == inbox.failed / "2026-01-02"
    assert plan_target(drop, True, datetime(2026, 1, 2)) == day / "StudyV-1-1"


@pytest.mark.ops
def test_the_status_line_counts_drops_finished_in_routing_folders(tmp_path):
    """STATUS= "n done today" counts done/<day>/StudyV/v1.report.json too, and never walks a
    drop's own folder."""
    done, failed = tmp_path / "done", tmp_path / "failed"
    today = date.today()
    day = done / today.isoformat()
    for folder in (day, day / "StudyV", day / "StudyV" / "deeper"):
        (folder / "v1").mkdir(parents=True)
        (folder / "v1.report.json").write_text("{}")
    (day / "v1" / "inside.report.json").write_text("{}")  # a drop's own file: not counted
    (failed / today.isoformat() / "studyW").mkdir(parents=True)
    (failed / today.isoformat() / "studyW" / "z1.zip.report.json").write_text("{}")
    assert finished_today({(done, failed)}, today) == (3, 1)
