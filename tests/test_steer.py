"""Operators steer the running daemon: pause and resume a destination (by hand, until a time,
outside its send_window), cancel a waiting or a sending drop, and read the history of drops
finished. Real daemon, real receivers (dcmtk storescp, a pynetdicom SCP held at a gate)."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import checksums
from tests.daemon_runner import (
    REPO,
    DaemonProcess,
    dicom_destination,
    wait_for_report,
    work_area_left,
    write_config,
)
from tests.systemd_support import status_with
from xnat_inbox.commands.status import status_lines
from xnat_inbox.commands.synthetic import Patient, SeriesSpec, write_session
from xnat_inbox.outcome.report import STORED_EARLIER
from xnat_inbox.sendwindow import SendWindow

pytestmark = pytest.mark.ops

ROUTE = {"destination": "scp", "project": "Proj", "subject": "{PatientID}",
         "session": "{PatientID}_{StudyDate}"}
USER = pwd.getpwuid(os.getuid()).pw_name


def site(tmp_path: Path, peer: Any, settings: dict[str, Any] | None = None,
         **destination: Any) -> tuple[Path, Path]:
    inbox = tmp_path / "inbox"
    config = write_config(tmp_path, {"scp": dicom_destination(peer, **destination)},
                          [{"path": str(inbox), "route": ROUTE}], **(settings or {}))
    return config, inbox


def paused_metric(textfile: Path, expected: float, timeout: float = 30) -> None:
    """Wait for the metrics textfile's xnat_inbox_destination_paused of scp to be `expected`."""
    deadline, value = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        if textfile.exists():
            value = next((s.value for family in text_string_to_metric_families(
                textfile.read_text()) for s in family.samples
                if s.name == "xnat_inbox_destination_paused" and
                s.labels.get("destination") == "scp"), None)
            if value == expected:
                return
        time.sleep(0.1)
    raise AssertionError(f"xnat_inbox_destination_paused{{destination=scp}} is {value}, "
                         f"not {expected}")


def copy_in(tmp_path: Path, inbox: Path, name: str, instances: int = 2,
            patient: str = "P1") -> Path:
    """A one-study drop, written aside and renamed in at once."""
    staging = tmp_path / "staging" / name
    write_session(staging, series=(SeriesSpec("T1", instances),), patient=Patient(patient))
    (inbox / name).parent.mkdir(parents=True, exist_ok=True)
    staging.rename(inbox / name)
    return staging


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xnat_inbox", "--config", str(config), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def status(config: Path) -> tuple[dict[str, Any], str]:
    """`status --json`, and its text as `status` prints it (from the same moment)."""
    summary = json.loads(cli(config, "status", "--json").stdout)
    return summary, "\n".join(status_lines(summary))


def status_until(config: Path, condition: Callable[[dict[str, Any]], bool],
                 timeout: float = 30) -> tuple[dict[str, Any], str]:
    deadline = time.monotonic() + timeout
    while True:
        summary, text = status(config)
        if condition(summary):
            return summary, text
        if time.monotonic() > deadline:
            raise AssertionError(f"status never showed it within {timeout} s:\n{text}")
        time.sleep(0.2)


def waiting_paused(*names: str) -> Callable[[dict[str, Any]], bool]:
    return lambda s: sorted(d["drop"] for d in s["waiting"] if d["state"] == "paused") == \
        sorted(names)


def event(process: DaemonProcess, name: str, timeout: float = 30, **fields: Any) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for found in process.events():
            if found.get("event", "").startswith(name) and \
                    all(found.get(k) == v for k, v in fields.items()):
                return found
        time.sleep(0.05)
    raise AssertionError(f"no {name!r} event within {timeout} s:\n{process.text()[-3000:]}")


def received(peer: Any) -> int:
    return len(peer.files()) if hasattr(peer, "files") else len(peer.received)


# --- pause and resume -----------------------------------------------------------------------

def test_paused_destination_holds_its_drops_until_resumed(tmp_path, storescp, service, notify):
    """1: a drop copied in while its destination is paused waits in order, nothing reaches the
    receiver; status and the STATUS line say "paused (reason) until resumed"; resume delivers
    them in order, and the wait counted as no attempt."""
    config, inbox = site(tmp_path, storescp)
    proc = service(config)
    paused = cli(config, "pause", "scp", "--reason", "maintenance")
    assert paused.returncode == 0, paused.stderr
    assert "scp: paused (maintenance) until resumed" in paused.stdout
    notify.wait_for(status_with("scp paused (maintenance) until resumed"))

    copy_in(tmp_path, inbox, "MR1")
    copy_in(tmp_path, inbox, "MR2", patient="P2")
    summary, text = status_until(config, waiting_paused("MR1", "MR2"))
    assert "  MR1 -> scp: paused (maintenance) until resumed; waits its turn" in text
    assert f"  scp: paused (maintenance) until resumed (`xnat-inbox pause` by {USER} at " in text
    [scp] = summary["destinations"]
    assert scp["paused"]["reason"] == "maintenance" and scp["paused"]["by"] == USER
    assert scp["paused"]["until"] is None
    notify.wait_for(status_with("2 waiting · scp paused (maintenance) until resumed"))
    time.sleep(1.5)  # several ticks of the daemon's loop: still nothing may go out
    assert received(storescp) == 0
    assert not list(inbox.glob("done/*/*.report.json"))
    assert [d["attempts"] for d in status(config)[0]["waiting"]] == [0, 0]

    resumed = cli(config, "resume", "scp")
    assert resumed.returncode == 0 and "scp: resumed" in resumed.stdout
    first = wait_for_report(inbox, "MR1", daemon=proc)
    second = wait_for_report(inbox, "MR2", daemon=proc)
    assert first[0] == second[0] == "done"
    assert first[1]["timings"]["finished_at"] <= second[1]["timings"]["finished_at"]  # in order
    assert [a["outcome"] for a in first[1]["attempts"]] == ["done"]
    assert received(storescp) == 4
    assert status(config)[0]["destinations"][0]["paused"] is None
    assert event(proc, "destination resumed", destination="scp")["was"] == "maintenance"


def test_a_pause_finishes_the_instance_in_flight_and_counts_no_attempt(tmp_path, inprocess_scp,
                                                                       gate, daemon):
    """1: paused mid-send, the instance in flight is finished, then nothing is sent; the drop
    waits without failing (its destination is not marked failing); resumed, only the rest is
    sent, and the halted attempt does not count against max_attempts (2 here: the one
    transient failure after the resume is retried, not given up on)."""
    held = gate(1)  # the second C-STORE waits until the test opens the gate

    reached = threading.Event()

    def answer(dataset: object, index: int) -> int:
        reached.set() if index == 1 else None
        return 0xA700 if index == 2 else held(dataset, index)  # 0xA700: out of resources

    scp = inprocess_scp(status_for=answer)
    config, inbox = site(tmp_path, scp, dimse_timeout=120, retry={
        "max_attempts": 2, "initial_backoff": 0.2, "max_backoff": 0.5})
    proc = daemon(config)
    copy_in(tmp_path, inbox, "MR1", instances=4)
    assert reached.wait(30), proc.text()[-3000:]  # the second instance is in flight, held
    assert cli(config, "pause", "scp").returncode == 0
    event(proc, "destination paused", destination="scp")
    held.opened.set()

    _, text = status_until(config, waiting_paused("MR1"))
    assert f"  MR1 -> scp: 2 of 4 file(s) stored; paused (by {USER}) until resumed" in text
    time.sleep(1.5)
    assert len(scp.received) == 2
    assert status(config)[0]["destinations"][0]["state"] == "no drop sent yet"  # not down
    assert not any(e.get("event", "").startswith("destination failing") for e in proc.events())

    assert cli(config, "resume", "--all").returncode == 0
    outcome, report, _ = wait_for_report(inbox, "MR1", daemon=proc)
    assert outcome == "done", report["reasons"]
    assert [a["outcome"] for a in report["attempts"]] == ["Halted", "TransientFailure", "done"]
    # the two after the resume, the one refused with 0xA700 again: none of the first two twice
    assert len(scp.received) == 5
    assert sorted(f["outcome"] for f in report["files"]["entries"]) == \
        ["stored"] + [STORED_EARLIER] * 3


def test_a_pause_survives_a_restart(tmp_path, storescp, daemon):
    """1: the pause is in the state database: a restarted daemon holds the drop still (and
    its metrics say so)."""
    textfile = tmp_path / "metrics.prom"
    config, inbox = site(tmp_path, storescp, {"metrics": {"textfile": str(textfile),
                                                          "textfile_seconds": 0.2}})
    first = daemon(config)
    assert cli(config, "pause", "scp", "--reason", "XNAT upgrade").returncode == 0
    copy_in(tmp_path, inbox, "MR1")
    status_until(config, waiting_paused("MR1"))
    assert first.stop() == 0

    second = daemon(config)
    assert event(second, "destination paused", destination="scp")["reason"] == "XNAT upgrade"
    _, text = status_until(config, lambda s: s["daemon"]["pid"] == second.pid and
                           waiting_paused("MR1")(s))
    assert "  MR1 -> scp: paused (XNAT upgrade) until resumed; waits its turn" in text
    paused_metric(textfile, 1)
    time.sleep(1.5)
    assert received(storescp) == 0
    assert cli(config, "resume", "scp").returncode == 0
    assert wait_for_report(inbox, "MR1", daemon=second)[0] == "done"
    assert received(storescp) == 2
    paused_metric(textfile, 0)


def test_pause_until_a_time_ends_by_itself(tmp_path, storescp, daemon):
    """1: `pause --until` a few seconds ahead: the drop claimed meanwhile waits, then goes
    out once that time has come, with nobody resuming it."""
    config, inbox = site(tmp_path, storescp)
    proc = daemon(config)
    until = (datetime.now() + timedelta(seconds=6)).replace(microsecond=0)
    paused = cli(config, "pause", "scp", "--until", f"{until:%Y-%m-%d %H:%M:%S}")
    assert paused.returncode == 0, paused.stderr
    local = until.astimezone()
    assert f"scp: paused (by {USER}) until {local.isoformat()}" in paused.stdout
    copy_in(tmp_path, inbox, "MR1")
    _, text = status_until(config, waiting_paused("MR1"))
    assert f"MR1 -> scp: paused (by {USER}) until {local.isoformat()}; waits its turn" in text

    outcome, report, _ = wait_for_report(inbox, "MR1", daemon=proc)
    assert outcome == "done"
    assert datetime.fromisoformat(report["timings"]["claimed_at"]) < local
    assert datetime.fromisoformat(report["timings"]["finished_at"]) >= local
    assert event(proc, "destination resumed", destination="scp")
    assert status(config)[0]["destinations"][0]["paused"] is None  # lifted for good

    refused = cli(config, "pause", "scp", "--until", "2020-01-01 07:00")
    assert refused.returncode == 2 and "is in the past" in refused.stderr
    unknown = cli(config, "pause", "nowhere")
    assert unknown.returncode == 1
    assert "unknown destination 'nowhere'; the site config defines: scp" in unknown.stderr


def test_send_window_holds_drops_until_it_opens(tmp_path, storescp, daemon):
    """1: outside its send_window a destination is paused by itself; the window opening (a
    few seconds ahead here) releases the drop."""
    opens = (datetime.now() + timedelta(seconds=8)).replace(microsecond=0)
    window = f"{opens:%H:%M:%S}-{opens + timedelta(hours=1):%H:%M:%S}"
    config, inbox = site(tmp_path, storescp, send_window=window)
    proc = daemon(config)
    copy_in(tmp_path, inbox, "MR1")
    summary, text = status_until(config, waiting_paused("MR1"))
    local = opens.astimezone()
    assert f"MR1 -> scp: paused (outside send_window {window}) until {local.isoformat()}" in text
    assert summary["destinations"][0]["paused"]["kind"] == "send_window"

    outcome, report, _ = wait_for_report(inbox, "MR1", daemon=proc)
    assert outcome == "done"
    assert datetime.fromisoformat(report["timings"]["claimed_at"]) < local
    assert datetime.fromisoformat(report["timings"]["finished_at"]) >= local
    assert received(storescp) == 2
    resumed = cli(config, "resume", "scp")  # nothing to lift: the window is the config's
    assert "scp: was not paused" in resumed.stdout


# --- cancel ---------------------------------------------------------------------------------

def test_cancel_a_waiting_drop_and_retry_brings_it_back(tmp_path, storescp, daemon):
    """2: drops waiting (their destination paused) are cancelled by name and by id: each goes
    to failed/ whole with "cancelled by <user> at <time>", nothing sent; retry puts it back."""
    config, inbox = site(tmp_path, storescp)
    proc = daemon(config)
    assert cli(config, "pause", "scp").returncode == 0
    sources = {name: copy_in(tmp_path, inbox, name) for name in ("MR1", "MR2")}
    before = {name: checksums(inbox / name) for name in sources}
    summary, _ = status_until(config, waiting_paused("MR1", "MR2"))
    ids = {d["drop"]: d["id"] for d in summary["waiting"]}

    done = cli(config, "cancel", "MR1", ids["MR2"], "NOPE")
    assert done.returncode == 1
    assert f"MR1 in {inbox} (id {ids['MR1']}): cancel requested" in done.stdout
    assert f"MR2 in {inbox} (id {ids['MR2']}): cancel requested" in done.stdout
    assert "xnat-inbox cancel: NOPE: no drop waiting or sending has that name" in done.stderr
    for name in ("MR1", "MR2"):
        outcome, report, path = wait_for_report(inbox, name, daemon=proc)
        assert outcome == "failed"
        assert report["reasons"][0].startswith(f"cancelled by {USER} at ")
        assert checksums(path.parent / name) == before[name]  # nothing deleted
        assert {f["outcome"] for f in report["files"]["entries"]} == {"not sent"}
    assert received(storescp) == 0
    assert work_area_left(inbox) == []
    assert status(config)[0]["waiting"] == []

    [failed] = [p for p in inbox.glob("failed/*/MR1")]
    retried = cli(config, "retry", str(failed))
    assert retried.returncode == 0, retried.stderr
    assert cli(config, "resume", "scp").returncode == 0
    deadline = time.monotonic() + 60
    while not list(inbox.glob("done/*/MR1.report.json")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(inbox.glob("done/*/MR1.report.json")), proc.text()[-3000:]
    assert received(storescp) == 2


def test_cancel_a_sending_drop_at_its_next_instance(tmp_path, inprocess_scp, gate, daemon):
    """2: a drop being sent is cancelled at its next instance: failed/, the instances already
    acknowledged listed as such; a drop queued behind it is cancelled at once, without
    waiting for the lane."""
    held = gate(1)
    reached = threading.Event()

    def answer(dataset: object, index: int) -> int:
        reached.set() if index == 1 else None
        return held(dataset, index)

    scp = inprocess_scp(status_for=answer)
    config, inbox = site(tmp_path, scp, dimse_timeout=120)
    proc = daemon(config)
    copy_in(tmp_path, inbox, "MR1", instances=4)
    assert reached.wait(30), proc.text()[-3000:]  # the second instance is in flight, held
    copy_in(tmp_path, inbox, "MR2", patient="P2")
    summary, _ = status_until(config, lambda s: [d["drop"] for d in s["waiting"]] == ["MR2"])
    assert [d["drop"] for d in summary["sending"]] == ["MR1"]

    assert cli(config, "cancel", "MR2").returncode == 0  # waiting behind MR1, still held
    outcome, report, _ = wait_for_report(inbox, "MR2", daemon=proc)
    assert outcome == "failed" and report["reasons"][0].startswith(f"cancelled by {USER} at ")
    assert not held.opened.is_set()

    sending = cli(config, "cancel", str(inbox / "MR1"))  # by its path, as copied in
    assert sending.returncode == 0, sending.stderr
    event(proc, "cancel requested", drop_id=summary["sending"][0]["id"])
    held.opened.set()
    outcome, report, _ = wait_for_report(inbox, "MR1", daemon=proc)
    assert outcome == "failed"
    assert report["reasons"][0].startswith(f"cancelled by {USER} at ")
    assert sorted(f["outcome"] for f in report["files"]["entries"]) == \
        ["not sent"] * 2 + [STORED_EARLIER] * 2
    assert len(scp.received) == 2
    assert work_area_left(inbox) == []


# --- history --------------------------------------------------------------------------------

def test_history_lists_drops_finished_before_a_restart(tmp_path, storescp, daemon):
    """3: one line per drop finished, from the state database: a restart loses none;
    --failed keeps the failed ones, --json gives every field."""
    config, inbox = site(tmp_path, storescp)
    first = daemon(config)
    copy_in(tmp_path, inbox, "MR1", instances=3)
    assert wait_for_report(inbox, "MR1", daemon=first)[0] == "done"
    (inbox / "JUNK").mkdir()
    (inbox / "JUNK" / "notes.txt").write_text("not DICOM")
    assert wait_for_report(inbox, "JUNK", daemon=first)[0] == "failed"
    assert first.stop() == 0

    second = daemon(config)
    copy_in(tmp_path, inbox, "MR2", patient="P2")
    assert wait_for_report(inbox, "MR2", daemon=second)[0] == "done"

    listing = cli(config, "history")
    assert listing.returncode == 0, listing.stderr
    header, *lines = listing.stdout.splitlines()
    assert header.split() == ["finished", "inbox", "drop", "outcome", "destination", "studies",
                              "instances", "bytes", "seconds", "first", "reason"]
    assert [line.split()[2:5] for line in lines] == \
        [[str(inbox), "MR1", "done"], [str(inbox), "JUNK", "failed"], [str(inbox), "MR2", "done"]]
    assert lines[1].endswith("no DICOM files in this drop")

    failed = cli(config, "history", "--failed").stdout.splitlines()
    assert len(failed) == 2 and " JUNK " in failed[1]

    rows = json.loads(cli(config, "history", "--json").stdout)
    assert [(r["drop"], r["outcome"], r["destination"], r["studies"], r["instances"])
            for r in rows] == [("MR1", "done", "scp", 1, 3), ("JUNK", "failed", "scp", 0, 0),
                               ("MR2", "done", "scp", 1, 2)]
    assert rows[0]["bytes"] > 0 and rows[0]["seconds"] > 0 and rows[0]["first_reason"] is None
    assert rows[1]["first_reason"] == "no DICOM files in this drop"
    assert Path(rows[0]["moved_to"]).parent.parent == inbox / "done"
    none = cli(config, "history", "--since", "2099-01-01")
    assert none.returncode == 0 and none.stdout.startswith("no drop finished since 2099-01-01")


# --- send_window in the config --------------------------------------------------------------

def test_send_window_errors_name_file_key_and_the_form_expected(tmp_path):
    """1: a send_window that is not "HH:MM-HH:MM" is refused when the config loads, naming the
    file, line, key and the form expected; one across midnight opens and closes as read."""
    config = tmp_path / "config.yaml"
    for bad in ("7pm-7am", "19:00-19:00", "25:00-07:00"):
        config.write_text(f"state_dir: {tmp_path}/state\ndestinations:\n  scp:\n    type: dicom\n"
                          f"    host: 127.0.0.1\n    port: 11112\n    send_window: \"{bad}\"\n"
                          f"inboxes:\n  - path: {tmp_path}/inbox\n")
        checked = cli(config, "check")
        assert checked.returncode == 2
        assert f"{config}:7: destinations.scp.send_window: expected \"HH:MM-HH:MM\" in local " \
               f"time, 24-hour clock, e.g. \"19:00-07:00\"" in checked.stderr
        assert f"got '{bad}'" in checked.stderr

    window = SendWindow.parse("19:00-07:00")
    day = datetime(2026, 12, 8).astimezone()
    assert [window.is_open(day.replace(hour=h, minute=m)) for h, m in
            ((18, 59), (19, 0), (23, 30), (6, 59), (7, 0), (12, 0))] == \
        [False, True, True, True, False, False]
    assert window.next_open(day.replace(hour=12)) == day.replace(hour=19)
    assert window.next_open(day.replace(hour=20)) == day.replace(hour=19) + timedelta(days=1)
