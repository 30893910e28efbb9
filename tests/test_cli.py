"""The command line: check, explain, --version, --help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon_runner import REPO, dicom_destination, write_config
from xnat_inbox import __version__
from xnat_inbox.commands.synthetic import Patient, write_session


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xnat_inbox", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=60)


def make_site(tmp_path: Path, peer: object) -> tuple[Path, Path]:
    inbox = tmp_path / "inbox"
    config = write_config(tmp_path, {"scp": dicom_destination(peer)}, [{"path": str(inbox)}])
    (inbox / "route.yaml").write_text(
        'destination: scp\nproject: Proj\nsubject: "{PatientID}"\n'
        'session: "{PatientID}_{StudyDate}"\nseries:\n  exclude:\n'
        '    SeriesDescription: "(?i)localizer"\n')
    return config, inbox


def test_version_and_help():
    assert cli("--version").stdout.strip() == f"xnat-inbox {__version__}"
    help_text = cli("--help").stdout
    for word in ("run", "check", "explain", "demo", "examples:", "exit codes"):
        assert word in help_text


@pytest.mark.e2e
def test_check_validates_routes_and_echoes_destinations(tmp_path, storescp):
    config, inbox = make_site(tmp_path, storescp)
    (inbox / "Proj2").mkdir()
    (inbox / "Proj2" / "route.yaml").write_text("project: P2\n")
    result = cli("--config", str(config), "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"ok   {inbox / 'route.yaml'}" in result.stdout
    assert f"ok   {inbox / 'Proj2' / 'route.yaml'}" in result.stdout
    assert f"ok   destination scp: C-ECHO to STORESCP@127.0.0.1:{storescp.port}: success" \
        in result.stdout

    (inbox / "Proj2" / "route.yaml").write_text("project: P2\ndestination: nowhere\n")
    storescp.stop()
    result = cli("--config", str(config), "check")
    assert result.returncode == 1
    assert f"FAIL {inbox / 'Proj2' / 'route.yaml'}:2: destination: unknown destination " \
           "'nowhere'" in result.stdout
    assert "FAIL destination scp: no DICOM receiver answered at 127.0.0.1" in result.stdout


def test_check_on_a_broken_config_names_file_line_and_key(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("state_dir: /tmp/x\ndestinations:\n  scp:\n    type: dicom\n"
                      "    host: 127.0.0.1\n    prot: 104\ninboxes:\n  - path: /tmp/x\n")
    result = cli("--config", str(config), "check")
    assert result.returncode == 2
    assert f"{config}:6: destinations.scp.prot: unknown key" in result.stderr
    assert f"{config}:3: destinations.scp.port: required key is missing" in result.stderr


def test_explain_shows_grouping_labels_filters_and_destination(tmp_path):
    config, inbox = make_site(tmp_path, type("Peer", (), {"host": "127.0.0.1", "port": 104,
                                                          "aet": "SCP"})())
    drop = inbox / "MR_0042"
    session = write_session(drop, patient=Patient("SUBJ777", "Poe^Edgar"))
    (drop / "Thumbs.db").write_bytes(b"junk")
    result = cli("--config", str(config), "explain", str(drop))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"Drop {drop}  ({{folder}}=MR_0042, {{parent}}=inbox)"
    assert lines[1] == "Files: 34 (dicom 33, junk 1)"
    assert lines[2] == "  junk       Thumbs.db: system or helper file (Thumbs.db)"
    assert lines[3].startswith(f"Limits ({config} inboxes[0].allow): destinations any")
    assert lines[4] == f"Route: destination scp (from {inbox / 'route.yaml'})"
    assert lines[5] == f"Study 1: {session.study_uid}: 33 instance(s) in 4 series"
    assert lines[6] == "  labels: project=Proj subject=[PHI] session=[PHI]_20260115"
    assert "excluded: SeriesDescription 'Localizer' matches exclude pattern" in lines[8]
    assert lines[9].endswith("'T1 MPRAGE' MR 12 instance(s): send")
    assert "  would send 30 instance(s) to scp" in lines
    assert "SUBJ777" not in result.stdout and "Poe" not in result.stdout
    shown = cli("--config", str(config), "explain", str(drop), "--show-phi").stdout
    assert "subject=SUBJ777 session=SUBJ777_20260115" in shown
    assert sorted(p.name for p in drop.iterdir())[-1] == "Thumbs.db"  # nothing moved or sent
