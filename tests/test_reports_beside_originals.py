"""Issue 16 ("first contact"), points 5, 6, 9 and 13: what a drop's report and its own .log say,
read by the people who copied the drop in, through the real daemon and real receivers."""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_runner import (
    REPO,
    DaemonProcess,
    dicom_destination,
    wait_for_report,
    write_config,
)
from tests.test_e2e_cstore import ROUTE, copy_in
from xnat_inbox.commands.synthetic import Patient, SeriesSpec, write_session

#: a console line: time with its zone, level, event
CONSOLE_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}(?:[+-]\d\d:\d\d|Z) \[\w+ *\] ")


def site(tmp_path: Path, peer: object, route: dict[str, object] | None = None) -> tuple[Path, Path]:
    inbox = tmp_path / "inbox"
    config = write_config(tmp_path, {"scp": dicom_destination(peer)}, [{
        "path": str(inbox), "route": {"destination": "scp", **ROUTE, "series": None,
                                      **(route or {})}}])
    return config, inbox


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xnat_inbox", "--config", str(config), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def entries(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["path"]: entry for entry in report["files"]["entries"]}


@pytest.mark.e2e
def test_after_retry_the_report_names_files_stored_by_the_first_attempt(tmp_path, inprocess_scp,
                                                                        daemon):
    """Point 5: study a/ was delivered by the first attempt, b/ refused; after `retry` the
    report says a/'s files were stored earlier, not `not sent` without a reason."""
    refusing = {"on": True}

    def refuse_pb(ds: Any, index: int) -> int:
        return 0xC000 if refusing["on"] and str(ds.PatientID) == "PB" else 0x0000

    scp = inprocess_scp(status_for=refuse_pb)
    config, inbox = site(tmp_path, scp)
    write_session(tmp_path / "src" / "TWO" / "a", series=(SeriesSpec("T1", 3),),
                  patient=Patient("PA"))
    write_session(tmp_path / "src" / "TWO" / "b", series=(SeriesSpec("T1", 2),),
                  patient=Patient("PB"))
    proc = daemon(config)
    copy_in(tmp_path / "src" / "TWO", inbox)
    outcome, first, path = wait_for_report(inbox, "TWO", daemon=proc)
    assert outcome == "failed"
    assert {e["path"][0]: e["outcome"] for e in entries(first).values()} == {
        "a": "stored", "b": "failed"}

    refusing["on"] = False
    result = cli(config, "retry", str(path.with_name("TWO")))
    assert result.returncode == 0, result.stderr
    outcome, report, _ = wait_for_report(inbox, "TWO", daemon=proc)
    assert outcome == "done", report["reasons"]
    listed = entries(report)
    assert len(listed) == 5
    for name, entry in listed.items():
        if name.startswith("a/"):
            assert entry["outcome"] == "stored (earlier attempt)", entry
            assert "before the drop was retried" in entry["reason"]
        else:
            assert entry["outcome"] == "stored", entry
    assert [str(ds.PatientID) for ds in scp.received].count("PA") == 3  # never sent again


@pytest.mark.e2e
def test_an_empty_label_names_the_empty_attribute_not_clean_labels(tmp_path, inprocess_scp,
                                                                   daemon):
    """Point 6: with clean_labels already true, an empty PatientID is not mended by setting it;
    the reason names the attribute that was empty."""
    scp = inprocess_scp()
    config, inbox = site(tmp_path, scp, {"clean_labels": True})
    write_session(tmp_path / "src" / "NOID", series=(SeriesSpec("T1", 1),),
                  patient=Patient("", "Doe^Jane"))
    proc = daemon(config)
    copy_in(tmp_path / "src" / "NOID", inbox)
    outcome, report, _ = wait_for_report(inbox, "NOID", daemon=proc)
    assert outcome == "failed"
    [reason] = report["studies"][0]["reasons"]
    assert reason.startswith("subject label '' renders empty: PatientID is empty or missing "
                             "in this study's files"), reason
    assert "clean_labels" not in reason
    assert scp.received == []


@pytest.mark.security
def test_report_and_drop_log_beside_the_originals_name_labels_and_paths(tmp_path, storescp,
                                                                        daemon):
    """Point 9: a CD export keeps its files under DICOM/<PatientID>/. Beside the originals
    (which hold the PHI anyway) the report names real paths, the labels and the routing string
    as they are; the service's own log still masks them."""
    patient = Patient("MRN4711", "Doe^Jane", "19800101")
    write_session(tmp_path / "src" / "CD_EXPORT" / "DICOM" / "MRN4711",
                  series=(SeriesSpec("T1", 2), SeriesSpec("T2", 1)), patient=patient)
    config, inbox = site(tmp_path, storescp)
    proc = daemon(config)
    copy_in(tmp_path / "src" / "CD_EXPORT", inbox)
    outcome, report, report_path = wait_for_report(inbox, "CD_EXPORT", daemon=proc)
    proc.stop()

    assert outcome == "done", report["reasons"]
    [study] = report["studies"]
    assert study["labels"] == {"project": "Proj", "subject": "MRN4711",
                               "session": "MRN4711_20260115"}
    assert study["routing_string"] == "xnat://Proj/MRN4711/MRN4711_20260115"
    originals = report_path.with_name("CD_EXPORT")
    listed = list(entries(report))
    assert len(listed) == 3 and all(p.startswith("DICOM/MRN4711/") for p in listed), listed
    assert all((originals / p).is_file() for p in listed)  # names files that exist
    drop_log = report_path.with_name("CD_EXPORT.log").read_text()
    assert "labels=xnat://Proj/MRN4711/MRN4711_20260115" in drop_log
    assert "[PHI]" not in drop_log + report_path.read_text()
    # readable where the originals are, by the same people: the daemon's group, not others
    for beside in (report_path, report_path.with_name("CD_EXPORT.log")):
        assert stat.S_IMODE(beside.stat().st_mode) == 0o640
    for value in ("MRN4711", "Doe", "Jane", "19800101"):
        assert value not in proc.text(), f"{value!r} in the daemon's log"
    routed = next(e for e in proc.events() if e.get("event") == "routed")
    assert routed["labels"] == "xnat://Proj/[PHI]/[PHI]_20260115"


@pytest.mark.e2e
def test_console_lines_and_the_drop_log_read_well(tmp_path, inprocess_scp):
    """Point 13, end to end in the console format: every line starts with a time and its zone,
    no empty fields, a route error on one line, and each drop's .log starts with its claimed
    line (the routing folder it came from included)."""
    scp = inprocess_scp()
    config, inbox = site(tmp_path, scp)
    trials = inbox / "Trials"
    trials.mkdir(parents=True)
    (trials / "route.yaml").write_text("destination: nowhere\nsubjekt: x\n")  # two mistakes
    write_session(tmp_path / "src" / "v1", series=(SeriesSpec("T1", 1),))
    write_session(tmp_path / "src" / "MR_OK", series=(SeriesSpec("T1", 2),))
    proc = DaemonProcess(config, tmp_path / "daemon.log", log_format="console")
    try:
        proc.launch()
        deadline = time.monotonic() + 30
        while "watching" not in proc.text():
            assert time.monotonic() < deadline, proc.text()
            time.sleep(0.05)
        copy_in(tmp_path / "src" / "v1", trials)
        copy_in(tmp_path / "src" / "MR_OK", inbox)
        failed, bad, bad_path = wait_for_report(inbox, "v1", daemon=proc)
        done, good, good_path = wait_for_report(inbox, "MR_OK", daemon=proc)
    finally:
        assert proc.stop() == 0

    assert (failed, done) == ("failed", "done"), (bad["reasons"], good["reasons"])
    [reason] = bad["reasons"]
    assert "\n" not in reason
    assert "unknown destination 'nowhere'" in reason and "subjekt: unknown key" in reason
    console = proc.text().splitlines()
    assert [line for line in console if not CONSOLE_LINE.match(line)] == []
    for line in console:
        assert "\\n" not in line, line
        assert not re.search(r"\w=(None|\[\]|''|\{\})(\s|$)", line), line
    for report, path in ((bad, bad_path), (good, good_path)):
        first = path.with_name(path.name.replace(".report.json", ".log")).read_text()
        first = first.splitlines()[0]
        stamp, level, event, *fields = first.split()
        assert (level, event) == ("info", "claimed"), first
        assert f"drop_id={report['drop']['id']}" in fields
        assert f"origin={report['drop']['origin']}" in fields
        claimed = datetime.fromisoformat(report["timings"]["claimed_at"])
        assert abs((datetime.fromisoformat(stamp) - claimed).total_seconds()) < 0.001
    assert bad["drop"]["origin"] == "Trials/v1"
    assert json.dumps(bad).count("Trials/route.yaml") >= 1
