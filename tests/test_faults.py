"""Fault injection with real processes: kills, outages, refusals, SIGTERM, a lost state
database, done/ on another file system. Nothing may be lost, nothing falsely done."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import checksums
from tests.daemon_runner import (
    DaemonProcess,
    dicom_destination,
    reports,
    wait_for_report,
    work_area_left,
    write_config,
)
from tests.peers import StoreSCP
from tests.test_e2e_cstore import ROUTE
from xnat_inbox.commands.synthetic import SeriesSpec, write_session

pytestmark = pytest.mark.faults

PATIENT_ROUTE = {"destination": "scp", **ROUTE, "series": None}
PATIENT_RETRY = {"max_attempts": 60, "initial_backoff": 0.2, "max_backoff": 0.6,
                 "give_up_after": 120}


def site(tmp_path: Path, peer: object, **inbox: object) -> tuple[Path, Path]:
    inbox_path = tmp_path / "inbox"
    config = write_config(tmp_path, {"scp": dicom_destination(peer, retry=PATIENT_RETRY)},
                          [{"path": str(inbox_path), "route": PATIENT_ROUTE, **inbox}],
                          settle_seconds=0.3)
    return config, inbox_path


def make_drops(tmp_path: Path, count: int, instances: int) -> dict[str, tuple[set[str], dict]]:
    """Drops staged outside the inbox: name -> (SOP Instance UIDs, checksums of its files)."""
    drops = {}
    for n in range(count):
        name = f"DROP{n:02d}"
        session = write_session(tmp_path / "staging" / name,
                                series=(SeriesSpec("T1", instances // 2),
                                        SeriesSpec("T2", instances - instances // 2)))
        drops[name] = (set(session.sop_instance_uids), checksums(tmp_path / "staging" / name))
    return drops


def received_uids(scp: StoreSCP) -> Counter[str]:
    return Counter(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
                   for path in scp.files())


def kill_hard(process: DaemonProcess) -> None:
    assert process.proc is not None
    os.kill(process.pid, signal.SIGKILL)
    process.proc.wait(timeout=10)


def assert_nothing_lost(inbox: Path, drops: dict[str, tuple[set[str], dict]],
                        received: Counter[str]) -> dict[str, int]:
    """Every original in done/ with its checksum; every done drop's instances received."""
    lost = false_done = 0
    for name, (uids, sums) in drops.items():
        outcome, report, path = wait_for_report(inbox, name, timeout=5)
        assert outcome == "done", (name, report["reasons"])
        moved = checksums(path.with_name(name))
        lost += len(set(sums.items()) - set(moved.items()))
        false_done += len(uids - set(received))
    assert not work_area_left(inbox), "work area not empty"
    return {"lost": lost, "false_done": false_done}


def test_kill_9_at_random_points_loses_nothing(tmp_path):
    rng = random.Random(20261125)
    drops = make_drops(tmp_path, count=16, instances=160)
    kills = kills_mid_send = 0
    with StoreSCP(tmp_path, unique_filenames=True) as scp:
        config, inbox = site(tmp_path, scp)
        pending = list(drops)
        started: list[DaemonProcess] = []
        try:
            for cycle in range(24):
                # keep drops arriving, so there is always something to send when a kill lands
                for name in pending[:4 if cycle == 0 else 1]:
                    (tmp_path / "staging" / name).rename(inbox / name)
                pending = pending[4 if cycle == 0 else 1:]
                before = len(scp.files())
                process = DaemonProcess(config, tmp_path / f"daemon-{cycle}.log").start()
                started.append(process)
                if cycle % 3 == 0:  # anywhere: settling, claiming, scanning, finishing
                    time.sleep(rng.uniform(0.05, 2.0))
                else:  # somewhere in the middle of a send
                    deadline = time.monotonic() + 5
                    while len(scp.files()) == before and time.monotonic() < deadline:
                        time.sleep(0.01)
                    time.sleep(rng.uniform(0.0, 0.4))
                kill_hard(process)
                kills += 1
                kills_mid_send += len(scp.files()) > before
            final = DaemonProcess(config, tmp_path / "daemon-final.log").start()
            started.append(final)
            for name in drops:
                wait_for_report(inbox, name, timeout=120, daemon=final)
        finally:
            for process in started:
                process.stop()
        received = received_uids(scp)
    expected = set().union(*(uids for uids, _ in drops.values()))
    figures = assert_nothing_lost(inbox, drops, received)
    duplicates = sum(received.values()) - len(received)
    summary = {"kills": kills, "kills_while_sending": kills_mid_send, "drops": len(drops),
               "instances": len(expected), "received_unique": len(set(received) & expected),
               "duplicates": duplicates, **figures}
    print(json.dumps({"fault": "kill-9", **summary}))
    assert expected <= set(received)
    assert figures == {"lost": 0, "false_done": 0}
    # one lane: at most the one instance in flight per kill is sent twice
    assert duplicates <= kills, summary


def test_receiver_down_for_several_backoffs_then_up_keeps_order(tmp_path, daemon):
    drops = make_drops(tmp_path, count=3, instances=6)
    with StoreSCP(tmp_path) as scp:
        config, inbox = site(tmp_path, scp)
        scp.stop()
        proc = daemon(config)
        for name in drops:
            (tmp_path / "staging" / name).rename(inbox / name)
            time.sleep(0.8)  # claimed one after the other
        deadline = time.monotonic() + 30
        while sum(e.get("event") == "retrying" or "failing" in str(e.get("event"))
                  for e in proc.events()) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(3.0)  # several backoff periods (0.2 .. 0.6 s) with the receiver down
        assert not reports(inbox)
        scp.start()
        finished = [wait_for_report(inbox, name, daemon=proc) for name in drops]
        received = received_uids(scp)
    assert all(outcome == "done" for outcome, _, _ in finished)
    assert set().union(*(uids for uids, _ in drops.values())) <= set(received)
    times = [report["timings"]["finished_at"] for _, report, _ in finished]
    assert times == sorted(times), "drops for one destination must finish in claim order"
    first = finished[0][1]
    assert len(first["attempts"]) > 3 and first["attempts"][-1]["outcome"] == "done"
    events = [e.get("event") for e in proc.events()]
    assert events.count("destination failing; its drops wait in order and are retried") == 1
    assert events.count("destination reachable again") == 1


def test_out_of_resources_is_retried_and_permanent_refusal_is_not(tmp_path, inprocess_scp,
                                                                  daemon):
    seen: Counter[str] = Counter()

    def busy_once(ds: object, index: int) -> int:
        uid = str(ds.SOPInstanceUID)  # type: ignore[attr-defined]
        seen[uid] += 1
        return 0xA700 if seen[uid] == 1 and index % 2 == 0 else 0x0000

    scp = inprocess_scp(status_for=busy_once)
    config, inbox = site(tmp_path, scp)
    drops = make_drops(tmp_path, count=1, instances=6)
    proc = daemon(config)
    (tmp_path / "staging" / "DROP00").rename(inbox / "DROP00")
    outcome, report, _ = wait_for_report(inbox, "DROP00", daemon=proc)
    assert outcome == "done", report["reasons"]
    assert [a["outcome"] for a in report["attempts"]] == ["TransientFailure", "done"]
    assert "0xA700" in report["attempts"][0]["reason"]
    assert {uid for uid, n in seen.items() if n > 1} <= drops["DROP00"][0]
    assert sum(seen.values()) == 6 + 3  # only the refused instances were sent again

    refusing = inprocess_scp(status_for=lambda ds, i: 0xC001 if i == 0 else 0x0000)
    config, inbox = site(tmp_path / "second", refusing)
    write_session(inbox / "REFUSED", series=(SeriesSpec("T1", 3),))
    proc = daemon(config)
    outcome, report, _ = wait_for_report(inbox, "REFUSED", daemon=proc)
    assert outcome == "failed"
    assert [a["outcome"] for a in report["attempts"]] == ["failed"]
    assert "0xC001" in report["reasons"][0]


def test_sigterm_during_a_send_exits_cleanly_and_resumes(tmp_path):
    drops = make_drops(tmp_path, count=1, instances=800)
    with StoreSCP(tmp_path, unique_filenames=True) as scp:
        config, inbox = site(tmp_path, scp)
        first = DaemonProcess(config, tmp_path / "daemon-1.log").start()
        try:
            (tmp_path / "staging" / "DROP00").rename(inbox / "DROP00")
            deadline = time.monotonic() + 60
            while len(scp.files()) < 100 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert first.proc is not None
            first.proc.send_signal(signal.SIGTERM)
            code = first.proc.wait(timeout=30)
        finally:
            first.stop()
        assert code == 0
        events = [e.get("event") for e in first.events()]
        assert "stopped" in events and "finished" not in events
        assert list(inbox.glob(".xnat-inbox/work/*/DROP00"))
        sent_before = len(scp.files())
        second = DaemonProcess(config, tmp_path / "daemon-2.log").start()
        try:
            outcome, _, _ = wait_for_report(inbox, "DROP00", daemon=second)
        finally:
            second.stop()
        received = received_uids(scp)
    assert outcome == "done"
    assert any(e.get("event") == "resuming claimed drop" and e.get("stored_before", 0) > 0
               for e in second.events())
    assert drops["DROP00"][0] <= set(received)
    assert sum(received.values()) - len(received) <= 1
    assert sent_before < 800


@pytest.mark.parametrize("damage", ["deleted", "corrupted"])
def test_lost_state_database_loses_nothing(tmp_path, damage):
    drops = make_drops(tmp_path, count=2, instances=300)
    with StoreSCP(tmp_path, unique_filenames=True) as scp:
        config, inbox = site(tmp_path, scp)
        first = DaemonProcess(config, tmp_path / "daemon-1.log").start()
        try:
            for name in drops:
                (tmp_path / "staging" / name).rename(inbox / name)
            deadline = time.monotonic() + 60
            while len(scp.files()) < 50 and time.monotonic() < deadline:
                time.sleep(0.02)
            kill_hard(first)
        finally:
            first.stop()
        database = tmp_path / "state" / "state.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{database}{suffix}").unlink(missing_ok=True)
        if damage == "corrupted":
            database.write_bytes(b"this is not an SQLite database" * 100)
        second = DaemonProcess(config, tmp_path / "daemon-2.log").start()
        try:
            for name in drops:
                wait_for_report(inbox, name, timeout=90, daemon=second)
        finally:
            second.stop()
        received = received_uids(scp)
    figures = assert_nothing_lost(inbox, drops, received)
    assert figures == {"lost": 0, "false_done": 0}
    if damage == "corrupted":
        assert any("set aside" in str(e.get("event")) for e in second.events())
        assert list((tmp_path / "state").glob("state.db.corrupt-*"))


@pytest.fixture
def other_file_system(tmp_path: Path):
    """A folder on another device: a tmpfs the test mounts, or /dev/shm if it can't."""
    mount_point = tmp_path / "otherfs"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs",
                              str(mount_point)], capture_output=True).returncode == 0
    folder = mount_point if mounted else Path("/dev/shm") / f"xnat-inbox-test-{os.getpid()}"
    folder.mkdir(exist_ok=True)
    assert os.stat(folder).st_dev != os.stat(tmp_path).st_dev
    yield folder
    if mounted:
        subprocess.run(["umount", str(mount_point)], check=True)
    else:
        shutil.rmtree(folder, ignore_errors=True)


def test_done_on_another_file_system(tmp_path, storescp, daemon, other_file_system):
    drops = make_drops(tmp_path, count=1, instances=6)
    staging = tmp_path / "staging" / "DROP00"
    os.symlink("IM0001.dcm", next(staging.glob("*T1*")) / "link-to-first")
    os.mkfifo(staging / "a-fifo")
    config, inbox = site(tmp_path, storescp, done_dir=str(other_file_system / "done"))
    # wait_for_report looks in <inbox>/done; here done/ is the other file system's folder
    proc = daemon(config)
    staging.rename(inbox / "DROP00")
    outcome, report, path = wait_for_report(other_file_system, "DROP00", daemon=proc)
    moved = path.with_name("DROP00")
    assert outcome == "done", report["reasons"]
    assert checksums(moved) == drops["DROP00"][1]
    assert os.readlink(next(moved.glob("*T1*")) / "link-to-first") == "IM0001.dcm"
    assert (moved / "a-fifo").is_fifo()
    assert not work_area_left(inbox), "the source must be gone once copied"
    assert not list(path.parent.glob(".*partial*"))



def test_a_destination_that_is_down_holds_up_only_its_own_drops(tmp_path, daemon):
    drops = make_drops(tmp_path, count=2, instances=4)
    with StoreSCP(tmp_path) as down, StoreSCP(tmp_path) as up:
        inbox = tmp_path / "inbox"
        config = write_config(
            tmp_path,
            {"scp": dicom_destination(down, retry=PATIENT_RETRY),
             "other": dicom_destination(up, retry=PATIENT_RETRY)},
            [{"path": str(inbox), "route": PATIENT_ROUTE}], settle_seconds=0.3)
        (inbox / "to-other").mkdir()
        (inbox / "to-other" / "route.yaml").write_text("destination: other\n")
        down.stop()
        proc = daemon(config)
        (tmp_path / "staging" / "DROP00").rename(inbox / "DROP00")
        (tmp_path / "staging" / "DROP01").rename(inbox / "to-other" / "DROP01")
        outcome, _, _ = wait_for_report(inbox, "DROP01", daemon=proc)
        assert outcome == "done"
        assert not list(inbox.glob("*/*/DROP00.report.json"))  # still waiting for its receiver
        down.start()
        outcome, _, _ = wait_for_report(inbox, "DROP00", daemon=proc)
        assert outcome == "done"
        assert drops["DROP00"][0] == set(received_uids(down))
        assert drops["DROP01"][0] == set(received_uids(up))
