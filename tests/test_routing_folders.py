"""Routing folders that appear while the daemon runs (issue 16, blocker 1): a folder copied in
with its own route.yaml, or a route.yaml added to a folder already in the inbox. Its drops are
found at once, inotify and polling alike, and the routing folder itself is never a drop."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_runner import dicom_destination, write_config
from xnat_inbox.commands.synthetic import Patient, SeriesSpec, write_session
from xnat_inbox.config import InboxConfig
from xnat_inbox.intake.claim import ClaimError, claim
from xnat_inbox.intake.settle import SettleTracker
from xnat_inbox.intake.watch import DropRef, InboxWatcher

pytestmark = pytest.mark.e2e

ROUTE = "destination: scp\nproject: P\nsubject: '{PatientID}'\nsession: '{folder}'\n" \
        "clean_labels: true\n"
SERIES = (SeriesSpec("T1", 2),)
DEADLINE_S = 30.0  # after settle: a deadline for the daemon, not a measurement
MODES = [pytest.param(False, id="inotify"), pytest.param(True, id="polling")]


def site(tmp_path: Path, scp: Any, polling: bool, settle: float = 0.5) -> tuple[Path, Path]:
    """An inbox with no route of its own: only a routing folder's route.yaml can send."""
    inbox = tmp_path / "inbox"
    config = write_config(tmp_path, {"scp": dicom_destination(scp)},
                          [{"path": str(inbox), "poll": polling, "poll_interval": 0.2}],
                          settle_seconds=settle)
    return config, inbox


def copy_like_cp(source: Path, into: Path) -> None:
    """`cp -r source into/`, as the report did it: coreutils cp makes the folder, then copies
    each entry in turn, a sub-folder made and filled before the next entry, in the source's
    directory order (route.yaml came after v1/ in an strace of cp 9.1), all within a few
    milliseconds: faster than the daemon reads the event of the folder's creation."""
    subprocess.run(["cp", "-r", str(source), f"{into}/"], check=True, timeout=60)


@contextlib.contextmanager
def daemon_held_still(daemon: Any) -> Iterator[None]:
    """The daemon stopped (SIGSTOP) while the block runs, so it reads the events of what the
    block did only afterwards, as a busy daemon on a loaded machine does: the folder's
    creation is read when its route.yaml is already there. (An idle daemon often reads it
    before cp has written the route.yaml; both orders must work.)"""
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while Path(f"/proc/{daemon.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
            assert time.monotonic() < deadline, "the daemon did not stop on SIGSTOP"
            time.sleep(0.01)
        yield
    finally:
        os.kill(daemon.pid, signal.SIGCONT)


def wait_for_done(inbox: Path, names: list[str], daemon: Any, settle: float) -> dict[str, Any]:
    """The report of each drop in `names` once all are in done/ (wherever below it)."""
    deadline = time.monotonic() + settle + DEADLINE_S
    found: dict[str, Any] = {}
    while time.monotonic() < deadline:
        for name in names:
            for path in inbox.glob(f"done/**/{name}.report.json"):
                found[name] = json.loads(path.read_text())
        if len(found) == len(names):
            return found
        time.sleep(0.1)
    failed = [str(p.relative_to(inbox)) for p in inbox.glob("failed/**/*.report.json")]
    left = sorted(str(p.relative_to(inbox)) for p in inbox.rglob("*")
                  if ".xnat-inbox" not in p.parts)
    raise AssertionError(f"delivered {sorted(found)} of {names} within settle + {DEADLINE_S} s;"
                         f" failed: {failed}; inbox: {left}\n{daemon.text()[-3000:]}")


def assert_routing_folder_kept(inbox: Path, daemon: Any, drops: int) -> None:
    """The routing folder stays with its route.yaml; it was never claimed as a drop: one claim
    per drop inside it, and no report of its own."""
    assert (inbox / "StudyV" / "route.yaml").read_text() == ROUTE
    assert sorted(inbox.glob("**/StudyV.report.json")) == []
    assert sum(e.get("event") == "claimed" for e in daemon.events()) == drops


@pytest.mark.parametrize("how", ["cp", "cp-daemon-busy", "mv"])
@pytest.mark.parametrize("polling", MODES)
def test_a_folder_copied_in_with_its_route_yaml_is_delivered(
        tmp_path, storescp, daemon, polling, how):
    """StudyV/ with route.yaml, session v1/ and a nested routing folder Sub/ (its own
    route.yaml and session v2/), copied in by `cp -r StudyV inbox/` (the daemon reading its
    events as they come, or only after the copy), or moved in whole (one event)."""
    source = tmp_path / "src" / "StudyV"
    one = write_session(source / "v1", series=SERIES, patient=Patient("SUBJ1", "P^One"))
    two = write_session(source / "Sub" / "v2", series=SERIES, patient=Patient("SUBJ2", "P^Two"))
    (source / "route.yaml").write_text(ROUTE)
    (source / "Sub" / "route.yaml").write_text("project: PSub\n")
    config, inbox = site(tmp_path, storescp, polling)
    proc = daemon(config)

    if how == "mv":
        source.rename(inbox / "StudyV")
    elif how == "cp":
        copy_like_cp(source, inbox)
    else:
        with daemon_held_still(proc):
            copy_like_cp(source, inbox)

    done = wait_for_done(inbox, ["v1", "v2"], proc, settle=0.5)
    assert done["v1"]["drop"]["origin"] == "StudyV/v1"
    assert done["v2"]["drop"]["origin"] == "StudyV/Sub/v2"
    assert done["v2"]["route"]["sources"][-1] == str(inbox / "StudyV" / "Sub" / "route.yaml")
    assert len(storescp.files()) == len(one.files) + len(two.files)
    assert_routing_folder_kept(inbox, proc, drops=2)


@pytest.mark.parametrize("polling", MODES)
def test_an_archive_in_a_folder_copied_in_with_its_route_yaml_is_delivered(
        tmp_path, storescp, daemon, polling):
    source = tmp_path / "src" / "StudyV"
    session = write_session(tmp_path / "src" / "z1", series=SERIES)
    source.mkdir()
    shutil.make_archive(str(source / "z1"), "zip", tmp_path / "src" / "z1")
    (source / "route.yaml").write_text(ROUTE)
    config, inbox = site(tmp_path, storescp, polling)
    proc = daemon(config)

    with daemon_held_still(proc):
        copy_like_cp(source, inbox)

    done = wait_for_done(inbox, ["z1.zip"], proc, settle=0.5)
    assert done["z1.zip"]["drop"]["origin"] == "StudyV/z1.zip"
    assert len(storescp.files()) == len(session.files)
    assert_routing_folder_kept(inbox, proc, drops=1)


@pytest.mark.parametrize("when", ["at-once-daemon-busy", "after-a-pause"])
@pytest.mark.parametrize("polling", MODES)
def test_a_route_yaml_added_to_a_folder_holding_sessions_makes_them_drops(
        tmp_path, storescp, daemon, polling, when):
    """StudyV/ with v1/ and v2/ moved into the inbox in one rename; then its route.yaml: at
    once, before the daemon read the rename, or after a pause (long enough for a poll) while
    StudyV/ is settling as a drop (settle 2 s)."""
    staging = tmp_path / "StudyV"
    one = write_session(staging / "v1", series=SERIES, patient=Patient("SUBJ1", "P^One"))
    two = write_session(staging / "v2", series=SERIES, patient=Patient("SUBJ2", "P^Two"))
    config, inbox = site(tmp_path, storescp, polling, settle=2.0)
    proc = daemon(config)

    if when == "after-a-pause":
        staging.rename(inbox / "StudyV")
        time.sleep(0.5)
        (inbox / "StudyV" / "route.yaml").write_text(ROUTE)
    else:
        with daemon_held_still(proc):
            staging.rename(inbox / "StudyV")
            (inbox / "StudyV" / "route.yaml").write_text(ROUTE)

    done = wait_for_done(inbox, ["v1", "v2"], proc, settle=2.0)
    assert {done[name]["drop"]["origin"] for name in done} == {"StudyV/v1", "StudyV/v2"}
    assert len(storescp.files()) == len(one.files) + len(two.files)
    assert_routing_folder_kept(inbox, proc, drops=2)


# --- the two fallbacks behind the watcher: settle and claim -------------------------------

def test_claim_refuses_a_folder_whose_route_yaml_arrived_after_it_settled(tmp_path):
    inbox = InboxConfig(path=tmp_path / "inbox")
    write_session(inbox.path / "StudyV" / "v1", series=SERIES)
    (inbox.path / "StudyV" / "route.yaml").write_text(ROUTE)
    with pytest.raises(ClaimError, match=r"StudyV holds a route\.yaml"):
        claim(DropRef(inbox, inbox.path, "StudyV"))
    assert sorted(os.listdir(inbox.path / "StudyV")) == ["route.yaml", "v1"]
    assert list(inbox.work.iterdir()) == []  # nothing claimed, no record left behind


def test_settle_hands_a_drop_that_became_a_routing_folder_back(tmp_path):
    inbox = InboxConfig(path=tmp_path / "inbox")
    (inbox.path / "StudyV" / "v1").mkdir(parents=True)
    became: list[DropRef] = []
    tracker = SettleTracker(lambda _: 0.0, became_routing_folder=became.append)
    ref = DropRef(inbox, inbox.path, "StudyV")
    tracker.touch(ref, 0.0)
    (inbox.path / "StudyV" / "route.yaml").write_text(ROUTE)
    assert tracker.due(10.0) == []
    assert became == [ref]
    assert tracker.pending() == []


class Touches:
    """The watcher's on_touch calls, to wait for one."""

    def __init__(self) -> None:
        self.seen: list[DropRef] = []
        self.changed = threading.Condition()

    def __call__(self, ref: DropRef, age: float) -> None:
        with self.changed:
            self.seen.append(ref)
            self.changed.notify_all()

    def wait_for(self, ref: DropRef, since: int) -> int:
        """Wait until `ref` is touched after the first `since` touches; the count then."""
        with self.changed:
            found = self.changed.wait_for(lambda: ref in self.seen[since:], timeout=DEADLINE_S)
            assert found, f"{ref} not touched; touched: {sorted(map(str, self.seen[since:]))}"
            return len(self.seen)


@pytest.mark.parametrize("polling", MODES)
def test_a_drop_that_becomes_a_routing_folder_keeps_its_drops_watched(tmp_path, polling):
    """StudyV/ first seen as a drop, then its route.yaml: v1/ inside is touched as a drop of
    its own; later writes into v1/ and a new drop v3/ next to it are seen (with inotify, the
    folder's recursive watch gives way to a flat one only once v1/ has its own)."""
    inbox = InboxConfig(path=tmp_path / "inbox", poll=polling, poll_interval=0.2)
    for folder in (inbox.path, inbox.work, inbox.done, inbox.failed):
        folder.mkdir(parents=True, exist_ok=True)
    touches = Touches()
    watcher = InboxWatcher(inbox, touches)
    watcher.start()
    try:
        study = inbox.path / "StudyV"
        (study / "v1").mkdir(parents=True)
        (study / "v1" / "a.dcm").write_bytes(b"a")
        seen = touches.wait_for(DropRef(inbox, inbox.path, "StudyV"), 0)
        (study / "route.yaml").write_text(ROUTE)
        seen = touches.wait_for(DropRef(inbox, study, "v1"), seen)
        (study / "v1" / "late.dcm").write_bytes(b"b")
        seen = touches.wait_for(DropRef(inbox, study, "v1"), seen)
        (study / "v3").mkdir()
        (study / "v3" / "c.dcm").write_bytes(b"c")
        touches.wait_for(DropRef(inbox, study, "v3"), seen)
    finally:
        watcher.stop()
