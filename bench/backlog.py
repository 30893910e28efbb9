"""Backlog: many small drops waiting at start-up against the same instances as one drop.

The real daemon runs as a process (`python -m xnat_inbox run`, settle_seconds as a site sets it:
the default 30 s) with two `dicom` destinations, two dcmtk `storescp --fork` on 127.0.0.1
(TCP_NODELAY=1) writing to disk, new ones with empty folders for every run. A route names one
destination, so the inbox has two routing folders (to-a/ and to-b/, a route.yaml each) and
every drop waits in both: every instance goes to both receivers, and the two destinations'
lanes flow in parallel.

  run A (reference): the instances as ONE drop (in each routing folder)
  run B:             the same number of instances as --drops drops (100 x 200 by default)

Both runs find their drops waiting when the daemon starts (files dated an hour back, as after a
downtime). Throughput = instances delivered to both destinations ÷ seconds from the first claim
to the last drop finished (the reports' claimed_at and finished_at): the daemon's start-up and
the settle check before the first claim are the same in both runs and are shown apart
("first claim after"). ratio = throughput B ÷ throughput A, pair by pair (A and B alternate, the
order reversed every other pair, so drift cancels); target ≥ 0.9. In run B the daemon's RSS
(/proc/<pid>/status VmRSS) is read after each finished drop: first, last and max are printed.
Also printed: the CPU seconds of the daemon and its scan worker processes (user + system,
/proc/<pid>/stat), the workers' memory at the end of run B (PSS: the pages they share with
each other and their fork server counted once), and how busy the
machine's cores were (/proc/stat), so per-drop CPU and contention show beside the times.
Instances are small synthetic MR (64x64, 16-bit, ≈9 KB) so that per-drop costs show and a run
stays short. Every instance is counted at both receivers and every drop must be in done/.
Ends with one JSON line.

    python bench/backlog.py [--instances 20000] [--drops 100] [--pairs 3] [--profile DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FOLDERS = {"to-a": "scp-a", "to-b": "scp-b"}  # routing folder: destination
AGE_SECONDS = 3600  # the drops arrived while the daemon was down


@dataclass
class Run:
    kind: str  # "A" or "B"
    drops: int  # drop folders finished (both routing folders)
    instances: int  # delivered, both receivers together
    seconds: float  # first claim to last finish
    first_claim_s: float  # daemon launch to the first claim
    scan_s: float = 0.0  # summed over the drops (their reports' timings)
    send_s: float = 0.0
    rss_mb: list[float] = field(default_factory=list)  # after each finished drop
    cpu_s: float = 0.0  # CPU seconds (user + system) of the daemon and its workers, to the end
    workers_mb: float = 0.0  # the fork server's and scan workers' PSS together, at the end
    busy: float = 0.0  # the machine's busy fraction of all cores over the same time

    @property
    def throughput(self) -> float:
        return self.instances / self.seconds


def make_sources(root: Path, instances: int, drops: int, rows: int) -> dict[str, Path]:
    """Pristine drops, written once: A/<one drop>, B/<drops drops>; runs hard-link them."""
    from xnat_inbox.commands.synthetic import write_benchmark_session

    per_drop = [instances // drops + (1 if i < instances % drops else 0) for i in range(drops)]
    write_benchmark_session(root / "A" / "session", count=instances, rows=rows, columns=rows)
    for number, count in enumerate(per_drop, 1):
        write_benchmark_session(root / "B" / f"drop-{number:03d}", count=count, rows=rows,
                                columns=rows)
    return {"A": root / "A", "B": root / "B"}


def write_config(work: Path, inbox: Path, ports: dict[str, int], aet: str) -> Path:
    from tests.daemon_runner import dicom_destination
    from tests.daemon_runner import write_config as write_site

    destinations = {}
    for name, port in ports.items():
        peer = argparse.Namespace(host="127.0.0.1", port=port, aet=aet)
        destinations[name] = dicom_destination(peer, dimse_timeout=30, acse_timeout=30)
    # settle_seconds: the site default (30 s), not a test's short one
    config = write_site(work, destinations, [{"path": str(inbox)}], settle_seconds=30.0)
    for folder, destination in FOLDERS.items():
        (inbox / folder).mkdir(parents=True)
        (inbox / folder / "route.yaml").write_text(
            f"destination: {destination}\nproject: Bench\nsubject: '{{PatientID}}'\n"
            "session: '{folder}'\n")
    return config


def place_drops(source: Path, inbox: Path) -> int:
    """Hard-link every drop of `source` into both routing folders, dated AGE_SECONDS back."""
    old = time.time() - AGE_SECONDS
    count = 0
    for folder in FOLDERS:
        for drop in sorted(source.iterdir()):
            target = inbox / folder / drop.name
            subprocess.run(["cp", "-al", str(drop), str(target)], check=True)
            for dirpath, _, names in os.walk(target):  # links share the sources' inodes
                for name in [*names, "."]:
                    os.utime(os.path.join(dirpath, name), (old, old))
            count += 1
    return count


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # a worker that ended just now
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pss_mb(pid: int) -> float:
    """Proportional set size: shared pages split among the processes sharing them."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in rollup.splitlines()
                 if line.startswith("Pss:")), 0.0)


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all cores, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def rss_mb(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_once(kind: str, source: Path, work: Path, ports: dict[str, int], aet: str,
             receivers: dict[str, Path], instances: int, profile: Path | None,
             logs: Path | None) -> Run:
    from tests.daemon_runner import DaemonProcess
    from tests.peers import descendants

    shutil.rmtree(work, ignore_errors=True)
    inbox = work / "inbox"
    config = write_config(work, inbox, ports, aet)
    expected = place_drops(source, inbox)
    daemon = DaemonProcess(config, work / "daemon.log")
    launched = time.time()
    ticks_before = machine_ticks()
    daemon.launch()
    spy = None
    samples: list[float] = []
    seen = 0
    try:
        spy = _profiler(daemon.pid, profile, kind) if profile else None
        deadline = time.monotonic() + 60 + instances * 0.01
        while seen < expected:
            finished = len(list(inbox.glob("done/*/*.report.json"))) + \
                len(list(inbox.glob("failed/*/*.report.json")))
            if finished > seen:
                seen = finished
                samples.append(rss_mb(daemon.pid))
            if daemon.proc is not None and daemon.proc.poll() is not None:
                raise SystemExit(f"daemon exited:\n{daemon.text()[-3000:]}")
            if time.monotonic() > deadline:
                raise SystemExit(f"run {kind}: {seen} of {expected} drops after the deadline\n"
                                 f"{daemon.text()[-3000:]}")
            time.sleep(0.02)
        workers = descendants(daemon.pid)
        cpu = cpu_seconds(daemon.pid) + sum(cpu_seconds(pid) for pid in workers)
        workers_mb = sum(pss_mb(pid) for pid in workers)
        ticks_after = machine_ticks()
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its profile on SIGINT
            spy.wait(timeout=60)
        code = daemon.stop()
        if logs:
            logs.mkdir(parents=True, exist_ok=True)
            shutil.copy(daemon.log_path, logs / f"daemon-{kind}-{int(launched)}.log")
    if code != 0:
        raise SystemExit(f"daemon exit code {code}")
    reports = _check(inbox, expected, receivers, instances)
    first, last = _span(reports)
    return Run(kind, expected, 2 * instances, last - first, first - launched,
               scan_s=sum(r["timings"]["scan_seconds"] for r in reports),
               send_s=sum(s["send_seconds"] for r in reports for s in r["studies"]),
               rss_mb=samples, cpu_s=cpu, workers_mb=workers_mb,
               busy=(ticks_after[0] - ticks_before[0]) / (ticks_after[1] - ticks_before[1]))


def _profiler(pid: int, profile: Path, kind: str) -> subprocess.Popen[bytes]:
    profile.mkdir(parents=True, exist_ok=True)
    out = profile / f"backlog-{kind}-{int(time.time())}.txt"
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen([spy, "record", "--pid", str(pid),
                             "--format", "raw", "--rate", "200", "--gil", "--nonblocking",
                             "-o", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _check(inbox: Path, drops: int, receivers: dict[str, Path],
           instances: int) -> list[dict[str, Any]]:
    """Every drop in done/ with all its files, every instance at both receivers; the reports."""
    failed = list(inbox.glob("failed/*/*.report.json"))
    if failed:
        raise SystemExit(f"{len(failed)} drop(s) failed, e.g. {failed[0]}")
    reports = [json.loads(p.read_text()) for p in inbox.glob("done/*/*.report.json")]
    if len(reports) != drops:
        raise SystemExit(f"{len(reports)} of {drops} drops in done/")
    originals = sum(1 for _ in inbox.glob("done/*/*/**/*.dcm"))
    if originals != 2 * instances:  # moved, never deleted: both routing folders' copies
        raise SystemExit(f"done/ holds {originals} of {2 * instances} original files")
    for name, folder in receivers.items():
        stored = sum(1 for p in folder.rglob("*") if p.is_file())
        if stored != instances:
            time.sleep(0.5)  # storescp --fork children may still be writing the last file
            stored = sum(1 for p in folder.rglob("*") if p.is_file())
        if stored != instances:
            raise SystemExit(f"receiver {name} holds {stored} of {instances} instances")
    return reports


def _span(reports: list[dict[str, Any]]) -> tuple[float, float]:
    """(first claim, last finish) as epoch seconds."""
    claimed = [datetime.fromisoformat(r["timings"]["claimed_at"]).timestamp() for r in reports]
    finished = [datetime.fromisoformat(r["timings"]["finished_at"]).timestamp()
                for r in reports]
    return min(claimed), max(finished)


def summarise(runs: list[tuple[Run, Run]], args: argparse.Namespace) -> dict[str, Any]:
    print(f"Backlog: {args.instances} instances (64x64 16-bit MR, ≈9 KB) waiting at start-up, "
          f"every drop to two storescp --fork (to disk, TCP_NODELAY=1) through two lanes; "
          f"A = 1 drop, B = {args.drops} drops (per destination); throughput = instances at "
          "both receivers / seconds from the first claim to the last finish")
    print(f"{'pair':>4} {'A s':>7} {'A inst/s':>9} {'B s':>7} {'B inst/s':>9} {'ratio':>6} "
          f"{'claim A':>8} {'claim B':>8} {'scan+send A':>12} {'scan+send B':>12} "
          f"{'CPU A/B s':>11} {'busy A/B':>9} {'RSS B first/last/max MB':>24}")
    ratios = []
    for pair, (a, b) in enumerate(runs, 1):
        ratio = b.throughput / a.throughput
        ratios.append(ratio)
        rss = f"{b.rss_mb[0]:.1f}/{b.rss_mb[-1]:.1f}/{max(b.rss_mb):.1f}"
        print(f"{pair:>4} {a.seconds:>7.2f} {a.throughput:>9.0f} {b.seconds:>7.2f} "
              f"{b.throughput:>9.0f} {ratio:>6.3f} {a.first_claim_s:>8.2f} "
              f"{b.first_claim_s:>8.2f} {f'{a.scan_s:.1f}+{a.send_s:.1f}':>12} "
              f"{f'{b.scan_s:.1f}+{b.send_s:.1f}':>12} "
              f"{f'{a.cpu_s:.1f}/{b.cpu_s:.1f}':>11} {f'{a.busy:.0%}/{b.busy:.0%}':>9} {rss:>24}")
    last_b = runs[-1][1]
    print(f"scan worker processes and their fork server at the end of the last run B: "
          f"{last_b.workers_mb:.1f} MB together (PSS)")
    return {
        "bench": "backlog", "ratio": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        "throughput_a": round(statistics.median(a.throughput for a, _ in runs), 1),
        "throughput_b": round(statistics.median(b.throughput for _, b in runs), 1),
        "instances": args.instances, "drops": args.drops, "destinations": 2,
        "rss_first_mb": round(last_b.rss_mb[0], 1), "rss_last_mb": round(last_b.rss_mb[-1], 1),
        "rss_max_mb": round(max(last_b.rss_mb), 1), "rss_samples": len(last_b.rss_mb),
        "scan_workers_pss_mb": round(last_b.workers_mb, 1),
        "rss_quartiles_mb": [round(last_b.rss_mb[len(last_b.rss_mb) * q // 4], 1)
                             for q in (1, 2, 3)],
        "first_claim_s": round(statistics.median(r.first_claim_s for p in runs for r in p), 2),
        "pairs": len(runs)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=20000,
                        help="instances per run (e.g. 2000 for a quick run)")
    parser.add_argument("--drops", type=int, default=100, help="drops of run B")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--rows", type=int, default=64, help="image rows and columns")
    parser.add_argument("--only", choices=("A", "B"), help="one kind of run (profiling)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="py-spy record --gil --pid the daemon into DIR (raw collapsed "
                        "stacks of the thread holding the GIL: where its CPU goes)")
    parser.add_argument("--logs", type=Path, metavar="DIR", help="keep the daemon's logs in DIR")
    args = parser.parse_args()

    from tests.peers import StoreSCP, dcmtk_tool

    if not dcmtk_tool("storescp"):
        print("storescp (dcmtk) is needed: apt-get install dcmtk", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-backlog-") as tmp:
        root = Path(tmp)
        sources = make_sources(root / "sources", args.instances, args.drops, args.rows)
        runs: list[tuple[Run, Run]] = []
        for pair in range(1, args.pairs + 1):
            order = ["A", "B"] if pair % 2 else ["B", "A"]
            done = {}
            for kind in order:
                if args.only and kind != args.only:
                    continue
                # every run starts alike: new receivers writing into new, empty folders. What
                # they received is deleted only at the end, so no run shares the disk with the
                # deletion of the one before (40,000 files; a disk mounted with `discard` here)
                receiving = root / f"receivers-{pair}-{kind}"
                with StoreSCP(receiving / "a", fork=True) as scp_a, \
                        StoreSCP(receiving / "b", fork=True) as scp_b:
                    ports = {"scp-a": scp_a.port, "scp-b": scp_b.port}
                    receivers = {"scp-a": scp_a.output_dir, "scp-b": scp_b.output_dir}
                    done[kind] = run_once(kind, sources[kind], root / "run", ports, scp_a.aet,
                                          receivers, args.instances, args.profile, args.logs)
                print(f"pair {pair} run {kind}: {done[kind].seconds:.2f} s", flush=True)
            if len(done) == 2:
                runs.append((done["A"], done["B"]))
    if runs:
        print(json.dumps(summarise(runs, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
