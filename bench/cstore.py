"""C-STORE throughput: the daemon's sender against dcmtk's storescu, same files, same storescp.

Both run as whole processes (start-up included), alternately, pair by pair, so machine drift
cancels in each pair's ratio. ratio = storescu seconds / our seconds (1.0 = as fast as storescu).
Ends with one JSON line.

    python bench/cstore.py [--instances 1000] [--pairs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ROUTING = "xnat://Bench/BENCH001/BENCH001_S1"


def send_with_daemon_sender(folder: Path, port: int, aet: str) -> int:
    """The daemon's own code path: scan the folder, then DicomSender with the routing string."""
    from xnat_inbox.config import DicomDestination
    from xnat_inbox.route import Labels, RoutedStudy
    from xnat_inbox.scan import scan_drop
    from xnat_inbox.senders.dicom import DicomSender

    [study] = scan_drop(folder).studies.values()
    routed = RoutedStudy(study, "bench", Labels("Bench", "BENCH001", "BENCH001_S1"),
                         "StudyDescription", ROUTING, included=list(study.series.values()))
    destination = DicomDestination(type="dicom", host="127.0.0.1", port=port, called_ae=aet)
    delivery = DicomSender("bench", destination).send(routed, routed.instances)
    if delivery.error or delivery.stored != len(study.instances):
        print(f"sender failed: {delivery.error}; stored {delivery.stored}", file=sys.stderr)
        return 1
    return 0


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--send", nargs=3, metavar=("FOLDER", "PORT", "AET"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.send:
        return send_with_daemon_sender(Path(args.send[0]), int(args.send[1]), args.send[2])

    from tests.peers import StoreSCP
    from xnat_inbox.synthetic import write_benchmark_session

    storescu = shutil.which("storescu")
    if not storescu:
        print("storescu (dcmtk) is needed: apt-get install dcmtk", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-cstore-") as tmp:
        work = Path(tmp)
        session = write_benchmark_session(work / "session", count=args.instances)
        megabytes = sum(p.stat().st_size for p in session.files) / 1e6
        env = {**os.environ, "TCP_NODELAY": "1"}
        ours_cmd = [sys.executable, __file__, "--send", str(work / "session")]
        rows = []
        with StoreSCP(work) as scp:
            ours_cmd += [str(scp.port), scp.aet]
            ref_cmd = [storescu, "-aec", scp.aet, "+sd", "+r", "127.0.0.1", str(scp.port),
                       str(work / "session")]
            for pair in range(1, args.pairs + 1):
                ours = timed(ours_cmd)
                _empty(scp.output_dir)
                reference = timed(ref_cmd, env)
                _empty(scp.output_dir)
                rows.append((pair, ours, reference, reference / ours))
    print(f"C-STORE of {args.instances} instances ({megabytes:.0f} MB) to dcmtk storescp on "
          "127.0.0.1, storescp writing to disk, TCP_NODELAY=1")
    print(f"{'pair':>4} {'xnat-inbox s':>13} {'storescu s':>11} {'ratio':>7}")
    for pair, ours, reference, ratio in rows:
        print(f"{pair:>4} {ours:>13.2f} {reference:>11.2f} {ratio:>7.3f}")
    ratio = statistics.median(row[3] for row in rows)
    ours_median = statistics.median(row[1] for row in rows)
    print(json.dumps({"bench": "cstore", "ratio": round(ratio, 3),
                      "instances": args.instances, "ours_s": round(ours_median, 3),
                      "storescu_s": round(statistics.median(row[2] for row in rows), 3),
                      "instances_per_s": round(args.instances / ours_median, 1),
                      "associations": 1, "pairs": args.pairs}))
    return 0


def _empty(folder: Path) -> None:
    for path in folder.iterdir():
        path.unlink()


if __name__ == "__main__":
    sys.exit(main())
