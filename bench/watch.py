"""Watching: what idle inboxes cost, and how a polling inbox holding 100,000 files keeps up.

Everything runs the real daemon (`python -m xnat_inbox run`) as a process with a real config:

1. Idle: two daemons with 10 empty inboxes each, one watching with inotify (`poll: false`), one
   polling (`poll: true`, the default `poll_interval` of 2 s). After start-up the daemon's CPU
   seconds (utime + stime from /proc/<pid>/stat) are read over `--idle-seconds` (60).
   Target: < 1% of one core each; ratio = 0.01 / measured fraction.
2. Busy polling inbox: one `poll: true` inbox holding 100,000 files in 1,000 folders. Why a site
   has that: the daemon waits until a drop is complete, and a drop is any folder in a routing
   folder whatever its depth (DESIGN.md, watch and settle), so a retrospective export of 1,000
   sessions copied onto the scanner share as one folder is one drop that takes hours to copy
   over SMB. The poller has to walk all of it every cycle (a write deep inside must restart
   the drop's quiet period), while the scanner's routine drops keep arriving beside it and must
   not wait. The bench plays the copy: the 100,000 tiny files are written before the daemon
   starts, and one more lands in the export every second, so it never settles. Measured:
   - one poll cycle (listing + stat of every entry + the diff against the last cycle): the
     daemon logs each cycle's duration (`polled` events, at debug level, turned on through
     XNAT_INBOX_LOG_LEVEL=debug), and the same emitter is timed in this process on the same
     tree as a second measure. Target: < 2 s; ratio = 2 / slowest cycle in the daemon.
   - latency: `--drops` (5) small sessions (20 synthetic DICOM files each) are written one after
     the other at odd intervals; latency = the daemon's `claimed` event (the drop is taken and
     goes to its destination's lane) minus the end of the session's last write.
     Target: <= settle_seconds + 2 s; ratio = (settle + 2) / the largest latency.
   - the daemon's CPU share while holding the 100,000 files.
   The destination is dcmtk `storescp` on 127.0.0.1 (TCP_NODELAY=1); each drop must arrive.

The final JSON line's "ratio" is the smallest of the four ratios (>= 1.0: every target met).

    python bench/watch.py [--idle-seconds 60] [--files 100000] [--folders 1000]
                          [--settle 5] [--drops 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.daemon_runner import DaemonProcess, dicom_destination, write_config  # noqa: E402
from tests.peers import StoreSCP, dcmtk_tool  # noqa: E402

IDLE_INBOXES = 10
CPU_TARGET = 0.01  # of one core
CYCLE_TARGET_S = 2.0
LATENCY_SLACK_S = 2.0
EXPORT = "retro-export"  # the big drop still being copied
IDLE_FRAMES = ("Condition.wait", "Event.wait", "select", "poll ", "epoll")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_over(pids: list[int], seconds: float) -> list[float]:
    """Each process's share of one core over the next `seconds`."""
    before = [cpu_seconds(pid) for pid in pids]
    started = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    return [(cpu_seconds(pid) - b) / elapsed for pid, b in zip(pids, before, strict=True)]


@contextlib.contextmanager
def daemons(configs: list[tuple[Path, Path, int]]) -> Iterator[list[DaemonProcess]]:
    """Start one daemon per (config, log, inboxes); stop each by its PID, also on error."""
    started: list[DaemonProcess] = []
    env = {"XNAT_INBOX_LOG_LEVEL": "debug"}
    try:
        for config, log, inboxes in configs:
            process = DaemonProcess(config, log, env=env)
            started.append(process)
            process.start(inboxes, timeout=60)
        yield started
    finally:
        for process in started:
            process.stop()


# --- 1. idle inboxes ---------------------------------------------------------------------
def idle_config(root: Path, poll: bool, port: int) -> Path:
    inboxes = [{"path": str(root / f"inbox-{i}"), "poll": poll} for i in range(IDLE_INBOXES)]
    destination = {"type": "dicom", "host": "127.0.0.1", "port": port}
    return write_config(root, {"scp": destination}, inboxes, settle_seconds=30)


def measure_idle(work: Path, seconds: float) -> dict[str, float]:
    from tests.peers import free_port

    port = free_port()  # nothing is sent: no receiver needed
    configs = []
    for mode in ("inotify", "polling"):
        root = work / f"idle-{mode}"
        root.mkdir()
        configs.append((idle_config(root, mode == "polling", port), root / "daemon.log",
                        IDLE_INBOXES))
    with daemons(configs) as started:
        time.sleep(2)  # start-up is not idling
        shares = cpu_over([process.pid for process in started], seconds)
    return dict(zip(("inotify", "polling"), shares, strict=True))


# --- 2. a polling inbox holding 100,000 files ---------------------------------------------
def write_tree(export: Path, files: int, folders: int) -> None:
    """The copy so far: `folders` session folders of tiny files (size does not matter to a
    poller, which reads names and stat only)."""
    per_folder = files // folders
    for i in range(folders):
        folder = export / f"session-{i:04d}" / "DICOM"
        folder.mkdir(parents=True)
        for j in range(per_folder):
            fd = os.open(folder / f"IM{j:05d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, b"\0")
            os.close(fd)


class CopyInProgress(threading.Thread):
    """One more file in the export every second: the big drop never settles."""

    def __init__(self, export: Path) -> None:
        super().__init__(daemon=True)
        self.folder = export / "session-late"
        self.stop = threading.Event()

    def run(self) -> None:
        self.folder.mkdir(exist_ok=True)
        count = 0
        while not self.stop.wait(1.0):
            (self.folder / f"IM{count:05d}").write_bytes(b"\0")
            count += 1


def time_emitter_in_process(inbox_path: Path, cycles: int) -> list[float]:
    """The daemon's own polling emitter on the same tree, timed here: seconds per cycle."""
    from xnat_inbox.config import InboxConfig
    from xnat_inbox.intake.watch import InboxWatcher
    from xnat_inbox.logs import configure

    configure(stream=open(os.devnull, "w"))  # noqa: SIM115 (the process's log, to its end)
    inbox = InboxConfig(path=inbox_path, poll=True)
    watcher = InboxWatcher(inbox, lambda ref: None)
    watcher._watch(inbox.path, recursive=True)
    [emitter] = list(watcher.observer.emitters)
    emitter.on_thread_start()  # the first snapshot (watchdog's emitter)
    emitter.queue_events(0)  # ours waits for its first poll_interval: not timed
    seconds = []
    for _ in range(cycles):
        started = time.perf_counter()
        emitter.queue_events(0)
        seconds.append(time.perf_counter() - started)
    return seconds


@contextlib.contextmanager
def profiled(pid: int, out: Path | None, seconds: int) -> Iterator[None]:
    """py-spy samples the process meanwhile (its own process, stopped by PID)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if out is None or not os.path.exists(spy):
        yield
        return
    proc = subprocess.Popen([spy, "record", "-p", str(pid), "-d", str(seconds), "-r", "200",
                             "-f", "raw", "-o", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        yield
        proc.wait(timeout=seconds + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def profile_summary(raw: Path, top: int = 12) -> list[tuple[str, float, float]]:
    """(function, own share, inclusive share) of the busy samples, from py-spy's collapsed
    stacks, by own share."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        frames = [_function(frame) for frame in stack.split(";")
                  if not frame.startswith(("process ", "thread "))]
        if not frames or frames[-1].startswith(IDLE_FRAMES):
            continue  # a thread waiting for work: py-spy counts some waits as active
        count = int(count_text)
        total += count
        if frames:
            own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
    ranked = sorted(inclusive, key=lambda f: (own.get(f, 0), inclusive[f]), reverse=True)
    return [(f, own.get(f, 0) / total, inclusive[f] / total) for f in ranked[:top]]


def _function(frame: str) -> str:
    """"take_snapshot (xnat_inbox/polling.py:65)" -> "take_snapshot (polling.py)"."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1].split(':')[0]})"


def write_drops(inbox: Path, count: int) -> dict[str, float]:
    """Small sessions, one after the other at uneven gaps; name -> end of its last write."""
    from xnat_inbox.commands.synthetic import Patient, SeriesSpec, write_session

    finished = {}
    for i in range(count):
        time.sleep(1.3 + 0.7 * i)  # uneven, so the writes fall at different poll phases
        name = f"scan-{i:02d}"
        write_session(inbox / name, series=(SeriesSpec("T1", 20),),  # in place, as scanners do
                      patient=Patient(patient_id=f"WATCH{i:03d}"))
        finished[name] = time.time()
    return finished


def claimed_at(daemon: DaemonProcess, names: set[str], timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    found: dict[str, float] = {}
    while time.monotonic() < deadline and len(found) < len(names):
        for event in daemon.events():
            if event.get("event") == "claimed" and event.get("drop") in names:
                found[event["drop"]] = datetime.fromisoformat(event["timestamp"]).timestamp()
        time.sleep(0.2)
    return found


def poll_cycles(daemon: DaemonProcess) -> list[float]:
    return [e["seconds"] for e in daemon.events() if e.get("event") == "polled"
            and e.get("entries", 0) >= 1000]


def measure_polling(work: Path, files: int, folders: int, settle: float,
                    drops: int, profile: Path | None) -> dict[str, Any]:
    inbox = work / "scanner-share"
    export = inbox / EXPORT
    started = time.perf_counter()
    write_tree(export, files, folders)
    created_s = time.perf_counter() - started
    with StoreSCP(work) as scp:
        (inbox / "route.yaml").write_text(
            "destination: scp\nproject: Bench\nsubject: '{PatientID}'\nsession: '{folder}'\n")
        config = write_config(work, {"scp": dicom_destination(scp)},
                              [{"path": str(inbox), "poll": True}], settle_seconds=settle)
        copy = CopyInProgress(export)
        with daemons([(config, work / "daemon.log", 1)]) as [daemon]:
            copy.start()
            try:
                time.sleep(5)  # the first snapshots, then a few cycles of the idle tree
                with profiled(daemon.pid, profile, seconds=10):
                    [share] = cpu_over([daemon.pid], 10)
                written = write_drops(inbox, drops)
                claimed = claimed_at(daemon, set(written), timeout=settle + 30)
            finally:
                copy.stop.set()
                copy.join()
            cycles = poll_cycles(daemon)
        missing = sorted(set(written) - set(claimed))
        if missing:
            raise SystemExit(f"drops never claimed: {', '.join(missing)}; see {work}/daemon.log")
    in_process = time_emitter_in_process(inbox, cycles=5)
    latencies = {name: claimed[name] - written[name] for name in sorted(written)}
    return {"created_s": created_s, "cycles": cycles, "in_process": in_process,
            "latencies": latencies, "cpu_share": share, "entries": files + folders}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--folders", type=int, default=1_000)
    parser.add_argument("--settle", type=float, default=5.0, help="settle_seconds of the inbox")
    parser.add_argument("--drops", type=int, default=5)
    parser.add_argument("--profile", type=Path, metavar="FILE",
                        help="py-spy the busy daemon for 10 s: collapsed stacks to FILE, and "
                        "the functions where its time went to the output")
    parser.add_argument("--skip-idle", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not dcmtk_tool("storescp"):
        print("storescp (dcmtk) is needed: apt-get install dcmtk", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-watch-") as tmp:
        work = Path(tmp)
        idle = {"inotify": 0.0, "polling": 0.0} if args.skip_idle else \
            measure_idle(work, args.idle_seconds)
        busy = measure_polling(work / "busy", args.files, args.folders, args.settle, args.drops,
                               args.profile)
    report(args, idle, busy)
    return 0


def report(args: argparse.Namespace, idle: dict[str, float], busy: dict[str, Any]) -> None:
    cycles, in_process, latencies = busy["cycles"], busy["in_process"], busy["latencies"]
    worst_cycle = max(cycles) if cycles else float("nan")
    worst_latency = max(latencies.values())
    print(f"Idle: {IDLE_INBOXES} empty inboxes per daemon, CPU over {args.idle_seconds:.0f} s "
          f"(target < {CPU_TARGET:.0%} of one core)")
    print(f"{'mode':>8} {'core share':>11} {'ratio':>7}")
    for mode, share in idle.items():
        print(f"{mode:>8} {share:>10.3%} {CPU_TARGET / max(share, 1e-6):>7.2f}")
    print(f"\nPolling inbox with {args.files:,} files in {args.folders:,} folders "
          f"({busy['entries']:,} entries; written in {busy['created_s']:.1f} s), "
          f"poll_interval 2 s, settle_seconds {args.settle:g}")
    print(f"poll cycle in the daemon ({len(cycles)} cycles): median "
          f"{_median(cycles):.3f} s, max {worst_cycle:.3f} s (target < {CYCLE_TARGET_S:g} s)")
    print(f"same emitter timed in this process: {', '.join(f'{s:.3f}' for s in in_process)} s")
    print(f"daemon CPU while holding them: {busy['cpu_share']:.1%} of one core")
    print(f"{'drop':>8} {'latency s':>10}   (last write -> claimed; target <= "
          f"{args.settle + LATENCY_SLACK_S:g} s)")
    for name, latency in latencies.items():
        print(f"{name:>8} {latency:>10.2f}")
    if args.profile and args.profile.exists():
        print(f"\nwhere the busy daemon's time went (py-spy, 10 s, {args.profile}):")
        print(f"{'own':>6} {'incl':>6}  function")
        for function, own, inclusive in profile_summary(args.profile):
            print(f"{own:>6.1%} {inclusive:>6.1%}  {function}")
    ratios = {
        "idle_inotify": CPU_TARGET / max(idle["inotify"], 1e-6),
        "idle_polling": CPU_TARGET / max(idle["polling"], 1e-6),
        "poll_cycle": CYCLE_TARGET_S / worst_cycle if cycles else 0.0,
        "latency": (args.settle + LATENCY_SLACK_S) / worst_latency,
    }
    print(json.dumps({
        "bench": "watch", "ratio": round(min(ratios.values()), 3),
        **{f"ratio_{key}": round(value, 3) for key, value in ratios.items()},
        "idle_cpu_fraction": round(idle["inotify"], 5),
        "idle_cpu_fraction_polling": round(idle["polling"], 5),
        "idle_seconds": args.idle_seconds, "idle_inboxes": IDLE_INBOXES,
        "files": args.files, "folders": args.folders,
        "poll_cycle_s": {"median": round(_median(cycles), 4), "max": round(worst_cycle, 4),
                         "cycles": len(cycles)},
        "poll_cycle_in_process_s": {"median": round(_median(in_process), 4),
                                    "max": round(max(in_process), 4)},
        "busy_cpu_fraction": round(busy["cpu_share"], 4),
        "latency_s": [round(v, 3) for v in latencies.values()],
        "latency_max_s": round(worst_latency, 3),
        "settle_seconds": args.settle}))


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


if __name__ == "__main__":
    sys.exit(main())
