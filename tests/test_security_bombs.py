"""One file must not take the service down (issue 23, item 3): a YAML bomb in a route.yaml, a
catastrophic series regex, a tar header bomb, a sparse DICOM file with a huge element, a drop
whose reading kills its scan worker each time or never ends. The daemon runs as root without
capabilities, the attacker as a member of the lab's group (security_support.lab). Tests assert
outcomes, and memory bounds an order of magnitude below what the bugs took, never seconds."""

from __future__ import annotations

import gzip
import json
import os
import signal
import sqlite3
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests.daemon_runner import DaemonProcess, dicom_destination, wait_for_report, write_config
from tests.peers import StoreSCP, descendants
from tests.security_support import ATTACKER, VICTIM, Lab
from tests.systemd_support import QUIET, NotifySocket, has
from tests.test_e2e_cstore import ROUTE
from xnat_inbox.commands.synthetic import SeriesSpec, write_session
from xnat_inbox.config import ROUTE_MAX_BYTES, ConfigError, load_config, load_route

pytestmark = pytest.mark.security

#: the daemon's own peak RSS (VmHWM) must stay below this; the bugs took 1-6 GB
DAEMON_MEMORY_BOUND = 500 * 2**20
NO_SERIES_FILTER = {**ROUTE, "series": None}


# --- the site, the attacker's and the victim's drops ------------------------------------------

def lab_site(tmp_path: Path, lab: Lab, peer: Any, **settings: Any) -> Path:
    """The lab share as the one inbox; its inline route sends everything to `peer`."""
    return write_config(tmp_path, {"scp": dicom_destination(peer)},
                        [{"path": str(lab.share),
                          "route": {"destination": "scp", **NO_SERIES_FILTER}}], **settings)


def place(lab: Lab, uid: int, name: str, build: Callable[[Path], None]) -> Path:
    """`build` a drop (or routing folder) outside the share, hand it to `uid`, who moves it in
    whole, as a careful user would."""
    stage = lab.root / f"stage-{name}"
    stage.mkdir()
    build(stage / name)
    lab.give(stage, uid, 0o775)  # a lab member's umask: group-writable, so others may move it
    lab.run_as(uid, ["mv", str(stage / name), str(lab.share / name)])
    return lab.share / name


def session(series: str = "T1", count: int = 2) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        write_session(folder, series=(SeriesSpec(series, count),))
    return make


def routing_folder(route_text: str, drop: str,
                   build: Callable[[Path], None]) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        folder.mkdir()
        (folder / "route.yaml").write_text(route_text)
        build(folder / drop)
    return make


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def billion_laughs() -> str:
    """A valid route whose nine levels of aliases expand to 9**9 strings (416 bytes)."""
    lines = ["destination: scp", "project: P", 'subject: "{PatientID}"', 'session: "{PatientID}"',
             'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for previous, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]")
    return "\n".join(lines) + "\n"


# --- route.yaml: YAML bombs and regexes, refused or bounded at load ---------------------------

def route_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "route.yaml"
    path.write_text(text)
    return path


def load_error(path: Path, load: Callable[[Path], Any] = lambda p: load_route(p, {"scp"})
               ) -> str:
    with pytest.raises(ConfigError) as caught:
        load(path)
    return str(caught.value)


def test_route_yaml_bombs_are_refused_unexpanded_with_file_and_line(tmp_path):
    laughs = route_file(tmp_path, billion_laughs())
    assert load_error(laughs).startswith(f"{laughs}:5: anchors and aliases (&name, *name) are "
                                         "not allowed here")
    merge = route_file(tmp_path, "project: P\n<<: {subject: S}\n")
    assert load_error(merge).startswith(f"{merge}:2: merge keys (<<) are not allowed here")
    big = route_file(tmp_path, "# padding\n" * (ROUTE_MAX_BYTES // 10 + 1))
    assert load_error(big) == (f"{big}: {big.stat().st_size} bytes, more than the "
                               f"{ROUTE_MAX_BYTES} bytes this file may have; it should hold a "
                               "few lines of YAML: check it is the right file")
    # each of these used to escape as ValueError or RecursionError: a crash, not a reason
    digits = route_file(tmp_path, "project: " + "9" * 5000 + "\n")
    assert "a value can't be read" in load_error(digits)
    deep = route_file(tmp_path, "project: " + "[" * 5000 + "\n")
    assert load_error(deep) == f"{deep}: nested too deeply to read; flatten it"


def test_the_site_config_may_share_settings_by_alias_but_not_explode(tmp_path):
    inbox = tmp_path / "inbox"
    shared = (f"state_dir: {tmp_path}/state\ndestinations:\n"
              "  a: {type: dicom, host: 127.0.0.1, port: 104, retry: &quick {max_attempts: 2}}\n"
              "  b: {type: dicom, host: 127.0.0.1, port: 105, retry: *quick}\n"
              f"inboxes:\n  - path: {inbox}\n")
    config = load_config(route_file(tmp_path, shared))
    assert config.destinations["b"].retry.max_attempts == 2
    bomb = route_file(tmp_path, billion_laughs().replace("destination: scp",
                                                         f"state_dir: {tmp_path}/state"))
    assert load_error(bomb, load_config) == (
        f"{bomb}: nests more than 64 levels deep or expands to more than 100000 values "
        "(aliases, *name, that repeat or contain themselves); flatten it or use fewer aliases")
    endless = route_file(tmp_path, "state_dir: &x [*x]\n")
    assert "nests more than 64 levels deep" in load_error(endless, load_config)


def test_route_regexes_match_in_linear_time_and_re2_refusals_name_the_key(tmp_path):
    text = "series:\n  exclude:\n    SeriesDescription: '{}'\n"
    route = load_route(route_file(tmp_path, text.format("^(a+)+$")), {"scp"})
    pattern = route.series.exclude["SeriesDescription"]
    # Python's re backtracks 2**64 times here; RE2 answers at once
    assert not pattern.search("a" * 64 + "!") and pattern.search("a" * 64)
    backreference = route_file(tmp_path, text.format(r"(a+)\1"))
    error = load_error(backreference)
    assert error.startswith(f"{backreference}:3: series.exclude.SeriesDescription: "
                            "'(a+)\\\\1' is not a pattern this service accepts")
    assert "RE2, which has no backreferences" in error


# --- the daemon: bombs cost a drop (and a worker), never the service --------------------------

def test_a_billion_laughs_route_fails_its_drop_and_the_daemon_stays_small(
        tmp_path, lab, inprocess_scp):
    peer = inprocess_scp()
    config = lab_site(tmp_path, lab, peer)
    place(lab, ATTACKER, "evil", routing_folder(billion_laughs(), "S_EVIL", session()))
    place(lab, VICTIM, "S_VICTIM", session())
    daemon = lab.daemon(config, tmp_path / "daemon.log").start()
    try:
        evil, evil_report, _ = wait_for_report(lab.share, "S_EVIL", daemon=daemon)
        victim, victim_report, _ = wait_for_report(lab.share, "S_VICTIM", daemon=daemon)
        peak = peak_rss(daemon.pid)
    finally:
        daemon.stop()
    assert evil == "failed"
    route = lab.share / "evil" / "route.yaml"
    assert any(reason.startswith(f"{route}:5: anchors and aliases")
               for reason in evil_report["reasons"]), evil_report["reasons"]
    assert victim == "done", victim_report["reasons"]
    assert peak < DAEMON_MEMORY_BOUND, f"the daemon peaked at {peak >> 20} MiB"


def test_a_catastrophic_series_regex_neither_stalls_the_daemon_nor_its_watchdog(
        tmp_path, lab, inprocess_scp, notify: NotifySocket):
    peer = inprocess_scp()
    config = lab_site(tmp_path, lab, peer)
    route = ("destination: scp\nproject: Lab2\nsubject: '{PatientID}'\nsession: 'S_{StudyDate}'\n"
             "series:\n  exclude:\n    SeriesDescription: '^(a+)+$'\n")
    # Python's re needs 2**40 steps to find that this does not match: the GIL, for hours
    place(lab, ATTACKER, "lab2", routing_folder(route, "S_REGEX", session("a" * 40 + "!")))
    place(lab, VICTIM, "S_VICTIM", session())
    env = {**QUIET, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"}
    daemon = lab.daemon(config, tmp_path / "daemon.log", env=env).start()
    try:
        ready = notify.wait_for(has("READY=1"))
        regex, regex_report, _ = wait_for_report(lab.share, "S_REGEX", daemon=daemon)
        victim, victim_report, _ = wait_for_report(lab.share, "S_VICTIM", daemon=daemon)
        first = notify.wait_for(has("WATCHDOG=1"), after=ready)
        notify.wait_for(has("WATCHDOG=1"), after=first + 1)  # and the pings go on
    finally:
        daemon.stop()
    assert regex == "done", regex_report["reasons"]
    assert regex_report["studies"][0]["stored"] == 2  # the pattern does not match: sent
    assert victim == "done", victim_report["reasons"]
    notify.drain()
    assert not any("WATCHDOG=trigger" in message for message in notify.messages)


def tar_header_bomb(path: Path, claimed: int, kind: bytes) -> None:
    """A .tar.gz of ~1 MB: one long-name (or pax) header claiming `claimed` bytes of name,
    which tarfile reads into memory whole, then a small entry."""
    def header(name: str, size: int, member_type: bytes) -> bytes:
        info = tarfile.TarInfo(name)
        info.size, info.type = size, member_type
        return info.tobuf(format=tarfile.GNU_FORMAT)

    chunk = b"a" * 2**20
    with gzip.open(path, "wb", compresslevel=9) as out:
        out.write(header("././@LongLink", claimed, kind))
        for start in range(0, claimed, len(chunk)):
            out.write(chunk[:claimed - start])
        out.write(b"\0" * (-claimed % 512) + header("x.dcm", 0, tarfile.REGTYPE) + b"\0" * 1024)


@pytest.mark.parametrize("kind", [tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE],
                         ids=["gnu-long-name", "pax"])
def test_a_tar_header_bomb_is_refused_by_a_worker_and_the_daemon_stays_small(
        tmp_path, lab, inprocess_scp, kind):
    peer = inprocess_scp()
    config = lab_site(tmp_path, lab, peer)
    place(lab, ATTACKER, "bomb.tar.gz", lambda path: tar_header_bomb(path, 2**30, kind))
    assert (lab.share / "bomb.tar.gz").stat().st_size < 2 * 2**20
    daemon = lab.daemon(config, tmp_path / "daemon.log").start()
    try:
        bomb, bomb_report, _ = wait_for_report(lab.share, "bomb.tar.gz", daemon=daemon)
        place(lab, VICTIM, "S_VICTIM", session())  # and the daemon goes on serving
        victim, victim_report, _ = wait_for_report(lab.share, "S_VICTIM", daemon=daemon)
        peak = peak_rss(daemon.pid)
    finally:
        daemon.stop()
    assert bomb == "failed"
    what = "GNU long-name" if kind == tarfile.GNUTYPE_LONGNAME else "pax"
    assert bomb_report["reasons"] == [
        f"bomb.tar.gz: the entry at byte 0 has a {what} header of {2**30} bytes, more than the "
        "1048576 bytes a name or pax header may take: refused as a tar header bomb"]
    assert victim == "done", victim_report["reasons"]
    assert peak < DAEMON_MEMORY_BOUND, f"the daemon peaked at {peak >> 20} MiB"


def sparse_huge_element(folder: Path, size: int = 2**31 - 2) -> None:
    """A drop of one real instance with a private OB element of `size` bytes before its pixel
    data: a sparse file, so the gigabytes cost no disk."""
    [source] = write_session(folder.parent / "src", series=(SeriesSpec("T1", 1),)).files
    folder.mkdir()
    path = folder / "huge.dcm"
    data = source.read_bytes()
    at = data.rindex(b"\xe0\x7f\x10\x00")  # (7FE0,0010) Pixel Data
    creator = b"\xdf\x7f\x10\x00LO\x04\x00ACME"  # (7FDF,0010): group 7FDF sorts before 7FE0
    huge = b"\xdf\x7f\x00\x10OB\x00\x00" + size.to_bytes(4, "little")  # (7FDF,1000)
    with open(path, "wb") as out:
        out.write(data[:at] + creator + huge)
        out.seek(size, os.SEEK_CUR)
        out.write(data[at:])


def test_a_sparse_file_with_a_huge_element_does_not_swell_the_daemon(tmp_path, lab):
    with StoreSCP(tmp_path, extra_args=["--ignore"]) as peer:  # receives, stores nothing
        config = lab_site(tmp_path, lab, peer)
        place(lab, ATTACKER, "S_HUGE", sparse_huge_element)
        assert dcmread(lab.share / "S_HUGE" / "huge.dcm", defer_size=256).PatientID
        daemon = lab.daemon(config, tmp_path / "daemon.log").start()
        try:
            huge, huge_report, _ = wait_for_report(lab.share, "S_HUGE", timeout=300,
                                                   daemon=daemon)
            place(lab, VICTIM, "S_VICTIM", session())
            victim, victim_report, _ = wait_for_report(lab.share, "S_VICTIM", daemon=daemon)
            peak = peak_rss(daemon.pid)
        finally:
            daemon.stop()
    assert huge in ("done", "failed") and (huge == "done" or huge_report["reasons"])
    assert victim == "done", victim_report["reasons"]
    assert peak < DAEMON_MEMORY_BOUND, f"the daemon peaked at {peak >> 20} MiB"


# --- a drop whose reading never ends, or kills its worker every time --------------------------

def endless_drop(folder: Path) -> None:
    """10 GiB of zeros (sparse): pydicom walks it as 8-byte empty elements for hours."""
    folder.mkdir()
    with open(folder / "zeros.dcm", "wb") as out:
        out.truncate(10 * 2**30)


def test_a_drop_that_outlasts_scan_timeout_is_set_aside_and_others_flow(
        tmp_path, lab, inprocess_scp):
    peer = inprocess_scp()
    config = lab_site(tmp_path, lab, peer, scan_timeout=1)
    place(lab, ATTACKER, "S_ENDLESS", endless_drop)
    daemon = lab.daemon(config, tmp_path / "daemon.log").start()
    try:
        endless, report, _ = wait_for_report(lab.share, "S_ENDLESS", daemon=daemon)
        place(lab, VICTIM, "S_VICTIM", session())
        victim, victim_report, _ = wait_for_report(lab.share, "S_VICTIM", daemon=daemon)
    finally:
        daemon.stop()
    assert endless == "failed"
    assert report["reasons"] == [
        "reading this drop crashed a scan worker 3 times (it took longer than scan_timeout "
        "(1 s) and was stopped); set aside unread: look for an archive or file built to blow up "
        "a reader, then `xnat-inbox retry` it"]
    assert victim == "done", victim_report["reasons"]


def readers_of(daemon: DaemonProcess, name: str, timeout: float = 60) -> set[int]:
    """The daemon's processes (its scan worker) that have the drop's file `name` open."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = set()
        for pid in descendants(daemon.pid):
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
                targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in fds]
            except OSError:
                continue  # gone meanwhile
            if any(target.endswith(f"/{name}") for target in targets):
                found.add(pid)
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no process of the daemon is reading {name}\n{daemon.text()[-3000:]}")


def read_failures(state_dir: Path, count: int, timeout: float = 60) -> list[str]:
    """The drop's failed reads, once there are `count` of them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sqlite3.connect(state_dir / "state.db", timeout=30) as db:
            rows = db.execute("SELECT failures FROM reads").fetchall()
        if rows and len(failures := json.loads(rows[0][0])) >= count:
            return failures
        time.sleep(0.05)
    raise AssertionError(f"not {count} failed reads within {timeout} s")


def test_a_drop_that_kills_its_worker_every_time_is_set_aside_across_a_restart(
        tmp_path, lab, inprocess_scp):
    """As if the OOM killer took the worker each time: killed once, then the daemon itself
    dies (kill -9) reading the drop, restarts, and the third loss sets the drop aside. It is
    never read in the daemon's own process."""
    peer = inprocess_scp()
    config = lab_site(tmp_path, lab, peer)
    state = tmp_path / "state"
    place(lab, ATTACKER, "S_KILLER", endless_drop)
    first = lab.daemon(config, tmp_path / "daemon-1.log").start()
    try:
        for pid in readers_of(first, "S_KILLER/zeros.dcm"):
            os.kill(pid, signal.SIGKILL)
        assert read_failures(state, 1) == ["it was killed by signal 9 (SIGKILL) (e.g. the "
                                           "kernel's OOM killer)"]
        readers_of(first, "S_KILLER/zeros.dcm")  # a new worker reads it again
        os.kill(first.pid, signal.SIGKILL)  # the daemon dies in the middle of that read
    finally:
        first.stop()
    second = lab.daemon(config, tmp_path / "daemon-2.log").start()
    try:
        readers = readers_of(second, "S_KILLER/zeros.dcm")
        assert second.pid not in readers  # read in a worker, not the daemon
        assert read_failures(state, 2)[1] == "the daemon stopped while reading it"
        for pid in readers:
            os.kill(pid, signal.SIGKILL)
        killer, report, _ = wait_for_report(lab.share, "S_KILLER", daemon=second)
        place(lab, VICTIM, "S_VICTIM", session())
        victim, victim_report, _ = wait_for_report(lab.share, "S_VICTIM", daemon=second)
    finally:
        second.stop()
    assert killer == "failed"
    assert report["reasons"] == [
        "reading this drop crashed a scan worker 3 times (it was killed by signal 9 (SIGKILL) "
        "(e.g. the kernel's OOM killer); the daemon stopped while reading it); set aside "
        "unread: look for an archive or file built to blow up a reader, then `xnat-inbox "
        "retry` it"]
    assert victim == "done", victim_report["reasons"]
