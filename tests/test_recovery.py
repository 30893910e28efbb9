"""The `retry` command, and the finish step completed after a crash (`status`: test_status.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import checksums
from tests.daemon_runner import REPO, dicom_destination, wait_for_report, write_config
from tests.test_e2e_cstore import ROUTE
from xnat_inbox.commands.synthetic import Patient, SeriesSpec, write_session
from xnat_inbox.config import InboxConfig
from xnat_inbox.intake.claim import claim, claimed_drops
from xnat_inbox.intake.watch import DropRef
from xnat_inbox.outcome.finish import (
    FINISH_FILE,
    complete_finish,
    finish,
    finish_pending,
    plan_target,
)


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xnat_inbox", "--config", str(config), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


@pytest.mark.faults
def test_retry_puts_a_failed_drop_back_and_skips_delivered_studies(tmp_path, inprocess_scp,
                                                                     daemon):
    refused_patient = {"on": True}

    def refuse_pb(ds: object, index: int) -> int:
        blocked = refused_patient["on"] and str(ds.PatientID) == "PB"  # type: ignore[attr-defined]
        return 0xC000 if blocked else 0x0000

    scp = inprocess_scp(status_for=refuse_pb)
    inbox = tmp_path / "inbox"
    config = write_config(tmp_path, {"scp": dicom_destination(scp)},
                          [{"path": str(inbox), "route": {"destination": "scp", **ROUTE,
                                                          "series": None}}])
    good = write_session(tmp_path / "src" / "TWO" / "a", series=(SeriesSpec("T1", 3),),
                         patient=Patient("PA"))
    write_session(tmp_path / "src" / "TWO" / "b", series=(SeriesSpec("T1", 2),),
                  patient=Patient("PB"))
    proc = daemon(config)
    (tmp_path / "src" / "TWO").rename(inbox / "TWO")
    outcome, report, path = wait_for_report(inbox, "TWO", daemon=proc)
    assert outcome == "failed"
    delivered = [s["study_instance_uid"] for s in report["studies"] if s["delivered"]]
    assert delivered == [good.study_uid]

    status = json.loads(cli(config, "status", "--json").stdout)
    assert [d["drop"] for d in status["failed_today"]] == ["TWO"]
    assert status["destinations"] == [] or status["destinations"][0]["name"] == "scp"

    refused_patient["on"] = False
    scp_before = len(scp.received)
    result = cli(config, "retry", str(path.with_name("TWO")))
    assert result.returncode == 0, result.stderr
    assert "skipping 1 delivered study(ies)" in result.stdout
    assert list(path.parent.glob("TWO.report.json.retried"))
    outcome, report, _ = wait_for_report(inbox, "TWO", daemon=proc)
    assert outcome == "done", report["reasons"]
    assert [s["delivered_by_an_earlier_drop"] for s in report["studies"]].count(True) == 1
    resent = [str(ds.PatientID) for ds in scp.received[scp_before:]]
    assert resent == ["PB", "PB"]  # the delivered study was not sent again

    wrong = cli(config, "retry", str(inbox / "done"))
    assert wrong.returncode == 1 and "is not a drop this daemon put in failed/" in wrong.stderr


@pytest.mark.faults
@pytest.mark.parametrize("crash_after", ["recorded", "moved", "report moved"])
def test_an_interrupted_finish_is_completed_once(tmp_path, crash_after):
    (tmp_path / "inbox").mkdir()
    inbox = InboxConfig(path=tmp_path / "inbox")
    write_session(inbox.path / "MR1", series=(SeriesSpec("T1", 2),))
    before = checksums(inbox.path / "MR1")
    drop = claim(DropRef(inbox, inbox.path, "MR1"))
    target = plan_target(drop, True, datetime.now())
    # what finish() does, cut short where the crash would come
    (drop.area / FINISH_FILE).write_text(json.dumps({"target": str(target)}))
    (drop.area / "report.json").write_text('{"outcome": "done"}')
    (drop.area / "drop.log").write_text("log\n")
    if crash_after in ("moved", "report moved"):
        drop.path.rename(target)
    if crash_after == "report moved":
        (drop.area / "report.json").rename(target.with_name("MR1.report.json"))
    [again] = claimed_drops(inbox)
    assert finish_pending(again)
    assert complete_finish(again) == target
    assert checksums(target) == before
    assert json.loads(target.with_name("MR1.report.json").read_text()) == {"outcome": "done"}
    assert target.with_name("MR1.log").read_text() == "log\n"
    assert not inbox.work.exists() or not any(inbox.work.iterdir())
    assert dcmread(next(target.rglob("*.dcm"))).PatientID == "SUBJ001"


def test_finish_writes_report_and_log_beside_the_originals(tmp_path):
    (tmp_path / "inbox").mkdir()
    inbox = InboxConfig(path=tmp_path / "inbox")
    (inbox.done / "2026-01-02" / "MR1").mkdir(parents=True)  # the name is taken
    write_session(inbox.path / "MR1", series=(SeriesSpec("T1", 1),))
    drop = claim(DropRef(inbox, inbox.path, "MR1"))
    target = plan_target(drop, True, datetime(2026, 1, 2))
    assert target == inbox.done / "2026-01-02" / "MR1-1"
    assert finish(drop, target, {"outcome": "done"}, ["a", "b"]) == target
    assert target.with_name("MR1-1.log").read_text() == "a\nb\n"
    assert not drop.area.exists()
