"""Sender memory: peak RSS of the daemon's C-STORE sender (a whole process: imports, the header
scan, the send) delivering a large session to dcmtk storescp (discarding what it receives).

The issue's case is 10,000 instances of 512 KB (5 GB); --instances makes it lighter. The sender
streams each file in PDU-sized pieces, so the peak should not grow with the session.
Ends with one JSON line.

    python bench/memory.py [--instances 10000] [--associations 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LIMIT_MB = 150


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=10000)
    parser.add_argument("--associations", type=int, default=1)
    args = parser.parse_args()

    from tests.peers import StoreSCP
    from xnat_inbox.commands.synthetic import write_benchmark_session

    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        work = Path(tmp)
        session = write_benchmark_session(work / "session", count=args.instances, rows=512,
                                          columns=512)
        gigabytes = sum(p.stat().st_size for p in session.files) / 1e9
        with StoreSCP(work, fork=True, extra_args=["--ignore"]) as scp:
            started = time.perf_counter()
            subprocess.run([sys.executable, str(REPO / "bench" / "cstore.py"), "--send",
                            str(work / "session"), str(scp.port), scp.aet,
                            str(args.associations)], check=True, stdout=subprocess.DEVNULL)
            seconds = time.perf_counter() - started
        # ru_maxrss of the waited-for children: the sender (storescp is still running then)
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"C-STORE of {args.instances} instances ({gigabytes:.1f} GB, 512x512 16-bit) to "
          f"storescp --ignore, {args.associations} association(s)")
    print(f"{'instances':>9} {'GB':>5} {'seconds':>8} {'peak RSS MB':>12} {'limit MB':>9}")
    print(f"{args.instances:>9} {gigabytes:>5.1f} {seconds:>8.1f} {peak_mb:>12.1f} {LIMIT_MB:>9}")
    print(json.dumps({"bench": "memory", "instances": args.instances,
                      "gigabytes": round(gigabytes, 2), "associations": args.associations,
                      "seconds": round(seconds, 1), "peak_rss_mb": round(peak_mb, 1),
                      "below_limit": peak_mb < LIMIT_MB}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
