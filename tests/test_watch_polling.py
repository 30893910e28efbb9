"""The polling watcher (network shares): its snapshot, its events, and the drops they touch,
on real files with the real observer threads; no timing thresholds (waits are deadlines)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from tests.daemon_runner import dicom_destination, wait_for_report, write_config
from xnat_inbox.commands.synthetic import SeriesSpec, write_session
from xnat_inbox.config import InboxConfig
from xnat_inbox.intake.polling import changes, take_snapshot
from xnat_inbox.intake.watch import DropRef, InboxWatcher

WAIT_S = 20.0  # a deadline for the observer's threads, not a measurement


@pytest.fixture
def inbox(tmp_path: Path) -> InboxConfig:
    (tmp_path / "inbox").mkdir()
    return InboxConfig(path=tmp_path / "inbox", poll=True, poll_interval=0.2)


class Touches:
    """Collects the watcher's on_touch calls: (drop, age)."""

    def __init__(self) -> None:
        self.seen: list[tuple[DropRef, float]] = []
        self.changed = threading.Condition()

    def __call__(self, ref: DropRef, age: float) -> None:
        with self.changed:
            self.seen.append((ref, age))
            self.changed.notify_all()

    def wait_for(self, ref: DropRef) -> float:
        """The age of `ref`'s first touch from now on."""
        with self.changed:
            start = len(self.seen)
            found = self.changed.wait_for(
                lambda: any(r == ref for r, _ in self.seen[start:]), timeout=WAIT_S)
            assert found, f"{ref} never touched; touched: {self.refs()}"
            return next(age for r, age in self.seen[start:] if r == ref)

    def refs(self) -> set[str]:
        with self.changed:
            return {str(ref) for ref, _ in self.seen}


@pytest.fixture
def watched(inbox: InboxConfig):
    touches = Touches()
    watcher = InboxWatcher(inbox, touches)
    assert watcher.polling
    for folder in (inbox.work, inbox.done, inbox.failed):
        folder.mkdir(parents=True)
    watcher.start()
    yield touches
    watcher.stop()


def test_snapshot_skips_what_it_is_told_and_never_follows_symlinks(tmp_path):
    root = tmp_path / "root"
    (root / "drop" / "deep" / "er").mkdir(parents=True)
    (root / "drop" / "deep" / "er" / "a.dcm").write_bytes(b"1")
    (root / ".hidden" / "x").mkdir(parents=True)
    (root / "done" / "d").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.dcm").write_bytes(b"2")
    (root / "link").symlink_to(outside, target_is_directory=True)
    skip = {str(root / "done")}
    snap = take_snapshot(str(root), lambda e: e.name.startswith(".") or e.path in skip)
    assert sorted(Path(p).relative_to(root).as_posix() for p in snap) == [
        "drop", "drop/deep", "drop/deep/er", "drop/deep/er/a.dcm", "link"]


def test_changes_are_watchdog_events(tmp_path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "f").write_bytes(b"1")
    (root / "gone").write_bytes(b"1")
    before = take_snapshot(str(root), lambda _: False)
    assert changes(before, take_snapshot(str(root), lambda _: False)) == []
    (root / "a" / "f").write_bytes(b"longer")
    os.rename(root / "a", root / "b")
    (root / "new").write_bytes(b"1")  # before the unlink: a reused inode looks like a move
    (root / "gone").unlink()
    found = {(e.event_type, os.path.relpath(e.src_path, root),
              os.path.relpath(e.dest_path, root) if e.dest_path else "")
             for e in changes(before, take_snapshot(str(root), lambda _: False))}
    assert found == {("moved", "a", "b"), ("moved", "a/f", "b/f"), ("deleted", "gone", ""),
                     ("created", "new", "")}


def test_polling_touches_new_drops_nested_writes_and_route_folders(inbox, watched):
    write_session(inbox.path / "MR1", series=(SeriesSpec("T1", 2),))
    watched.wait_for(DropRef(inbox, inbox.path, "MR1"))
    deep = inbox.path / "EXPORT" / "a" / "b" / "c"
    deep.mkdir(parents=True)
    export = DropRef(inbox, inbox.path, "EXPORT")
    watched.wait_for(export)
    (deep / "late.dcm").write_bytes(b"x")  # deep inside: still the same drop
    watched.wait_for(export)
    (inbox.path / "Proj").mkdir()
    (inbox.path / "Proj" / "S1").mkdir()
    watched.wait_for(DropRef(inbox, inbox.path, "Proj"))
    (inbox.path / "Proj" / "route.yaml").write_text("project: P\n")
    watched.wait_for(DropRef(inbox, inbox.path / "Proj", "S1"))  # its children are drops now
    (inbox.path / "Proj" / "S1" / "x.dcm").write_bytes(b"x")
    watched.wait_for(DropRef(inbox, inbox.path / "Proj", "S1"))


def test_polling_ignores_our_folders_hidden_entries_and_symlinked_trees(
        inbox, watched, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (inbox.path / "linked").symlink_to(outside, target_is_directory=True)
    for folder in (inbox.done / "2026-01-01" / "MR0", inbox.work / "1" / "MR0",
                   inbox.failed / "x", inbox.path / ".recycle" / "old"):
        folder.mkdir(parents=True)
        (folder / "a.dcm").write_bytes(b"x")
    (outside / "b.dcm").write_bytes(b"x")  # behind the link: never walked
    (inbox.path / "SENTINEL").mkdir()
    watched.wait_for(DropRef(inbox, inbox.path, "SENTINEL"))
    (inbox.path / "SENTINEL2").mkdir()  # a later poll: every event before it was handled
    watched.wait_for(DropRef(inbox, inbox.path, "SENTINEL2"))
    assert watched.refs() == {"SENTINEL", "SENTINEL2"}


def test_a_polled_change_counts_from_its_mtime_unless_that_is_implausible(
        inbox, watched, tmp_path):
    fresh = inbox.path / "FRESH"
    fresh.mkdir()
    assert watched.wait_for(DropRef(inbox, inbox.path, "FRESH")) > 0.0
    copied = tmp_path / "COPIED"  # cp -p / rsync -a: mtimes of long ago
    copied.mkdir()
    (copied / "a.dcm").write_bytes(b"x")
    an_hour_ago = time.time() - 3600
    for path in (copied / "a.dcm", copied):
        os.utime(path, (an_hour_ago, an_hour_ago))
    copied.rename(inbox.path / "COPIED")
    assert watched.wait_for(DropRef(inbox, inbox.path, "COPIED")) == 0.0


@pytest.mark.e2e
def test_a_polling_inbox_delivers_a_nested_drop(tmp_path, storescp, daemon):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "route.yaml").write_text(
        "destination: scp\nproject: P\nsubject: S\nsession: '{folder}'\n")
    config = write_config(tmp_path, {"scp": dicom_destination(storescp)},
                          [{"path": str(inbox), "poll": True, "poll_interval": 0.3}])
    proc = daemon(config)
    write_session(inbox / "NESTED" / "visit" / "dicom", series=(SeriesSpec("T1", 3),))
    (inbox / ".DS_Store").write_bytes(b"x")  # hidden: never a drop, never polled
    outcome, report, _ = wait_for_report(inbox, "NESTED", daemon=proc)
    assert outcome == "done", report["reasons"]
    assert len(storescp.files()) == 3
    assert [e["drop"] for e in proc.events() if e.get("event") == "scanned"] == ["NESTED"]
