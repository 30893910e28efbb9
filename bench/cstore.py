"""C-STORE throughput: the daemon's sender against dcmtk's storescu, same files, same storescp.

All run as processes, alternately, pair by pair, so machine drift cancels in each pair's ratio:
ours with one association, storescu, ours with --associations. ratio = storescu seconds / our
seconds (1.0 = as fast as storescu); storescu's seconds are always its whole process.

Ours are timed three ways. *Drop*: what the daemon does per drop for this destination, timed
inside our process once its modules are imported: the scan of every file's header, grouping,
then the C-STORE of each instance with the routing string; the headline ratio, because the daemon
is a service that starts once and imports once (it is the first drop of that process, so any
first-use cost is in it). *Send*: the C-STORE part alone. *Whole*: the process from exec to exit,
Python's start-up and imports (~0.3-0.4 s) included, as a one-shot tool would pay them.
The receiver is one `storescp --fork` (an association per child), TCP_NODELAY=1. Ends with one
JSON line.

    python bench/cstore.py [--instances 1000] [--pairs 3] [--associations 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ROUTING = "xnat://Bench/BENCH001/BENCH001_S1"


def send_with_daemon_sender(folder: Path, port: int, aet: str, associations: int) -> int:
    """The daemon's own code path: scan the folder, then DicomSender with the routing string;
    prints the seconds of the drop (scan and send) and of the send alone."""
    from xnat_inbox.config import DicomDestination
    from xnat_inbox.reading.scan import scan_drop
    from xnat_inbox.routing.route import Labels, RoutedStudy
    from xnat_inbox.senders.dicom.sender import DicomSender

    drop_started = time.perf_counter()
    [study] = scan_drop(folder).studies.values()
    routed = RoutedStudy(study, "bench", Labels("Bench", "BENCH001", "BENCH001_S1"),
                         "StudyDescription", ROUTING, included=list(study.series.values()))
    destination = DicomDestination(type="dicom", host="127.0.0.1", port=port, called_ae=aet,
                                   associations=associations)
    started = time.perf_counter()
    sender = DicomSender("bench", destination)
    delivery = sender.send(routed, routed.instances)
    finished = time.perf_counter()
    sender.close()  # the association, kept for a next drop that won't come
    if delivery.error or delivery.stored != len(study.instances):
        print(f"sender failed: {delivery.error}; stored {delivery.stored}", file=sys.stderr)
        return 1
    print(json.dumps({"drop_s": finished - drop_started, "send_s": finished - started,
                      "associations": delivery.associations}))
    return 0


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float, float]:
    """Seconds of (the whole process, the drop, the send): ours print the last two; storescu's
    are its whole process."""
    started = time.perf_counter()
    done = subprocess.run(argv, check=True, env=env, stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if argv[0] != sys.executable:
        return seconds, seconds, seconds
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    return seconds, printed["drop_s"], printed["send_s"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--associations", type=int, default=3,
                        help="our parallel run's associations (destination key `associations`)")
    parser.add_argument("--send", nargs=4, metavar=("FOLDER", "PORT", "AET", "N"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.send:
        return send_with_daemon_sender(Path(args.send[0]), int(args.send[1]), args.send[2],
                                       int(args.send[3]))

    from tests.peers import StoreSCP, dcmtk_tool
    from xnat_inbox.commands.synthetic import write_benchmark_session

    storescu = dcmtk_tool("storescu")
    if not storescu:
        print("storescu (dcmtk) is needed: apt-get install dcmtk", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-cstore-") as tmp:
        work = Path(tmp)
        session = write_benchmark_session(work / "session", count=args.instances)
        megabytes = sum(p.stat().st_size for p in session.files) / 1e6
        env = {**os.environ, "TCP_NODELAY": "1"}
        rows = []
        with StoreSCP(work, fork=True) as scp:
            ours = [sys.executable, __file__, "--send", str(work / "session"), str(scp.port),
                    scp.aet]
            one_cmd, many_cmd = [*ours, "1"], [*ours, str(args.associations)]
            ref_cmd = [storescu, "-aec", scp.aet, "+sd", "+r", "127.0.0.1", str(scp.port),
                       str(work / "session")]
            for pair in range(1, args.pairs + 1):
                runs = {}
                order = [("one", one_cmd, None), ("ref", ref_cmd, env), ("many", many_cmd, None)]
                if pair % 2 == 0:
                    order.reverse()
                for name, argv, run_env in order:
                    runs[name] = timed(argv, run_env)
                    _empty(scp.output_dir, args.instances)
                rows.append((pair, runs["one"], runs["many"], runs["ref"][0]))
    n = args.associations
    print(f"C-STORE of {args.instances} instances ({megabytes:.0f} MB) to dcmtk storescp --fork "
          "on 127.0.0.1, writing to disk, TCP_NODELAY=1. Seconds of our drop (scan + send), "
          "our send alone, our whole process; storescu's whole process. "
          "ratio = storescu s / ours")
    print(f"{'pair':>4} {'assoc':>5} {'drop s':>7} {'send s':>7} {'whole s':>8} "
          f"{'storescu':>9} {'ratio':>6} {'send':>6} {'whole':>6}")
    ratios: dict[str, list[float]] = {}
    for pair, one, many, ref in rows:
        for name, ours in (("1", one), (str(n), many)):
            r = [ref / ours[1], ref / ours[2], ref / ours[0]]
            for kind, value in zip(("drop", "send", "whole"), r, strict=True):
                ratios.setdefault(f"{kind}_{name}", []).append(value)
            print(f"{pair:>4} {name:>5} {ours[1]:>7.3f} {ours[2]:>7.3f} {ours[0]:>8.3f} "
                  f"{ref:>9.3f} {r[0]:>6.3f} {r[1]:>6.3f} {r[2]:>6.3f}")

    def median(values: list[float]) -> float:
        return round(statistics.median(values), 3)

    print(json.dumps({
        "bench": "cstore", "ratio": median(ratios[f"drop_{n}"]),
        "ratio_one_association": median(ratios["drop_1"]),
        "send_ratio": median(ratios[f"send_{n}"]),
        "send_ratio_one_association": median(ratios["send_1"]),
        "whole_process_ratio": median(ratios[f"whole_{n}"]),
        "whole_process_ratio_one_association": median(ratios["whole_1"]),
        "instances": args.instances, "associations": n,
        "ours_drop_s": median([row[2][1] for row in rows]),
        "ours_one_association_drop_s": median([row[1][1] for row in rows]),
        "ours_whole_s": median([row[2][0] for row in rows]),
        "storescu_s": median([row[3] for row in rows]),
        "instances_per_s": round(args.instances / statistics.median(row[2][1] for row in rows),
                                 1),
        "pairs": args.pairs}))
    return 0


def _empty(folder: Path, expected: int) -> None:
    """Check every instance arrived (storescp --fork writes from its children), then clear."""
    files = list(folder.rglob("*"))
    stored = [path for path in files if path.is_file()]
    if len(stored) != expected:
        time.sleep(0.5)
        stored = [path for path in folder.rglob("*") if path.is_file()]
    if len(stored) != expected:
        raise SystemExit(f"the receiver holds {len(stored)} of {expected} instances")
    for path in stored:
        path.unlink()
    os.sync()  # no run pays for writing back the last one's files


if __name__ == "__main__":
    sys.exit(main())
