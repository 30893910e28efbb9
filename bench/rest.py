"""XNAT REST upload: the daemon's streamed upload against curl posting a prebuilt zip, same
1,000-file session, same fake XNAT server on 127.0.0.1.

Both run as whole processes, alternately, pair by pair; the server is reset before each run, so
each one starts from an empty prearchive. ratio = curl seconds / our seconds (1.0 = as fast as
curl). Ours does the whole careful delivery (login, project check, zips streamed from the
original files, commit, read-back); curl does the import request alone. A third column times
`curl -T file -X POST`, which streams the file instead of loading it (`--data-binary @file`
holds all of it in memory). Ends with one JSON line.

    python bench/rest.py [--instances 1000] [--pairs 3]
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
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

USER, PASSWORD = "alice", "alice-pw"  # the fake server's default test account
PROJECT, SUBJECT = "TEST", "BENCH001"


def send_with_daemon_sender(folder: Path, url: str, secret: Path, label: str) -> int:
    """The daemon's own code path: scan the folder, then XnatSender with its defaults."""
    from xnat_inbox.config import XnatDestination
    from xnat_inbox.route import Labels, RoutedStudy
    from xnat_inbox.scan import scan_drop
    from xnat_inbox.senders.xnat import XnatSender

    [study] = scan_drop(folder).studies.values()
    routed = RoutedStudy(study, "bench", Labels(PROJECT, SUBJECT, label), "StudyDescription",
                         "", included=list(study.series.values()))
    destination = XnatDestination(type="xnat", url=url, username=USER, password_file=secret)
    sender = XnatSender("bench", destination)
    delivery = sender.send(routed, routed.instances)
    sender.close()
    if delivery.error or delivery.stored != len(study.instances):
        print(f"sender failed: {delivery.error}; stored {delivery.stored}", file=sys.stderr)
        return 1
    print(json.dumps({"peak_rss_kb": peak_rss_kb(os.getpid()),
                      "send_s": round(delivery.seconds, 3)}))
    return 0


def peak_rss_kb(pid: int) -> int:
    """VmHWM: the process's own high-water mark (getrusage's ru_maxrss would also count the
    forking parent's memory, which Linux carries across exec)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def timed(argv: list[str]) -> tuple[float, int, str]:
    """Seconds, peak RSS (KiB, sampled every 5 ms) of the process, and its stdout."""
    started = time.perf_counter()
    peak = 0
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.DEVNULL)
        while proc.poll() is None:
            peak = max(peak, peak_rss_kb(proc.pid))
            time.sleep(0.005)
        seconds = time.perf_counter() - started
        out.seek(0)
        text = out.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited with {proc.returncode}: {text[-500:]}")
    return seconds, peak, text


def curl_import(curl: str, url: str, zip_path: Path, label: str, stream: bool) -> list[str]:
    query = (f"import-handler=DICOM-zip&PROJECT_ID={PROJECT}&SUBJECT_ID={SUBJECT}"
             f"&EXPT_LABEL={label}&prevent_auto_commit=true")
    body = ["-T", str(zip_path), "-X", "POST"] if stream else ["--data-binary", f"@{zip_path}"]
    return [curl, "-sS", "--fail", "-u", f"{USER}:{PASSWORD}", "-H",
            "Content-Type: application/zip", *body, f"{url}/data/services/import?{query}"]


def prebuilt_zip(folder: Path, target: Path) -> Path:
    """What a person would upload: the session folder zipped (STORED, like ours by default)."""
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
        for path in sorted(folder.rglob("*.dcm")):
            archive.write(path, str(path.relative_to(folder)))
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--send", nargs=4, metavar=("FOLDER", "URL", "SECRET", "LABEL"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.send:
        folder, url, secret, label = args.send
        return send_with_daemon_sender(Path(folder), url, Path(secret), label)

    from tests.fake_xnat import FakeXnat
    from xnat_inbox.synthetic import write_benchmark_session

    curl = shutil.which("curl")
    if not curl:
        print("curl is needed: apt-get install curl", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-rest-") as tmp:
        work = Path(tmp)
        session = write_benchmark_session(work / "session", count=args.instances)
        megabytes = sum(p.stat().st_size for p in session.files) / 1e6
        zip_path = prebuilt_zip(work / "session", work / "prebuilt.zip")
        secret = work / "xnat.secret"
        secret.write_text(PASSWORD + "\n")
        secret.chmod(0o600)
        rows = []
        with FakeXnat(state_dir=work / "xnat") as xnat:
            ours_cmd = [sys.executable, __file__, "--send", str(work / "session"), xnat.url,
                        str(secret)]
            for pair in range(1, args.pairs + 1):
                xnat.reset()
                ours, rss, out = timed([*ours_cmd, f"OURS{pair}"])
                reported = json.loads(out.strip().splitlines()[-1])
                ours_rss, send_s = reported["peak_rss_kb"], reported["send_s"]
                xnat.reset()
                reference, curl_rss, _ = timed(curl_import(curl, xnat.url, zip_path,
                                                           f"CURL{pair}", stream=False))
                xnat.reset()
                streamed, stream_rss, _ = timed(curl_import(curl, xnat.url, zip_path,
                                                            f"CURLT{pair}", stream=True))
                rows.append((pair, ours, reference, streamed, reference / ours,
                             max(rss, ours_rss), curl_rss, stream_rss, send_s))
    print(f"REST import of {args.instances} instances ({megabytes:.0f} MB) to the fake XNAT "
          "on 127.0.0.1; ours: login, project check, zips streamed, commit, read-back")
    print(f"{'pair':>4} {'xnat-inbox s':>13} {'(send s)':>9} {'curl @zip s':>12} "
          f"{'curl -T s':>10} {'ratio':>6} {'our MB':>7} {'curl MB':>8} {'curl -T MB':>10}")
    for pair, ours, ref, streamed, ratio, rss, curl_rss, stream_rss, send_s in rows:
        print(f"{pair:>4} {ours:>13.2f} {send_s:>9.2f} {ref:>12.2f} {streamed:>10.2f} "
              f"{ratio:>6.3f} {rss / 1024:>7.0f} {curl_rss / 1024:>8.0f} "
              f"{stream_rss / 1024:>10.0f}")
    print(json.dumps({
        "bench": "rest", "ratio": round(statistics.median(r[4] for r in rows), 3),
        "peak_rss_mb": round(max(r[5] for r in rows) / 1024, 1),
        "instances": args.instances, "megabytes": round(megabytes),
        "ours_s": round(statistics.median(r[1] for r in rows), 3),
        "ours_send_s": round(statistics.median(r[8] for r in rows), 3),
        "curl_data_binary_s": round(statistics.median(r[2] for r in rows), 3),
        "curl_T_s": round(statistics.median(r[3] for r in rows), 3),
        "curl_data_binary_peak_rss_mb": round(max(r[6] for r in rows) / 1024, 1),
        "curl_T_peak_rss_mb": round(max(r[7] for r in rows) / 1024, 1),
        "pairs": args.pairs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
