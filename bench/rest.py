"""XNAT REST upload: the daemon's streamed upload against curl posting a prebuilt zip, same
1,000-file session, same fake XNAT server on 127.0.0.1. No zip of ours is ever written to disk.

Every pair runs, alternately, with the server reset before each run (an empty prearchive)
and the page cache's dirty pages written back (`sync`), so no run pays for the last one's.
After each run the fake server's request log gives the import span: from the start of the
first POST /data/services/import (the server has read its headers) to the end of the last
(the server has filed everything and is about to answer), measured by the server's clock
for ours and for curl alike. curl sends one zip; ours sends one zip per series (the first
alone, which creates the prearchive entry, then the others `max_parallel` at once), so the
span also counts the gaps between those requests (reported apart). The runs:

- ours, whole process: Python start-up and imports, the header scan, login, project check,
  zips streamed from the original files, commit, read-back; one drop, then exit.
- ours, warm: what the daemon (a long-running service: start-up and imports are paid once)
  spends per drop. One process does a first drop to warm imports and caches, the server is
  reset, a fresh sender logs in (the daemon keeps its JSESSION across drops: that login is
  the only thing done before the timer), then the second drop is timed: header scan, then
  the whole delivery (project check, streamed upload, commit, read-back). The labels come
  straight from the bench, not from a route.yaml. Its send part alone is reported too.
- curl --data-binary @prebuilt.zip, the reference (a small C process: its start-up is
  negligible, so its whole process is compared with each of ours), then `curl -T file -X
  POST`, which streams the file instead of loading it whole.

Ratios are curl --data-binary seconds / ours, pair by pair (machine drift cancels), medians
over the pairs; 1.0 = as fast as curl:
- "ratio": the import span, curl's / ours (ours from the warm drop): the issue's measure,
  streaming the study to the import endpoint against posting the prebuilt zip to it, the
  same part of the work on both sides.
- "ratio_warm_drop": curl's whole process / our warm per-drop time (scan, project check,
  upload, commit, read-back): what the daemon spends per drop, against curl doing only the
  import request.
- "ratio_whole_process": curl's whole process / ours (adds Python start-up and imports).
- "ratio_send": curl's whole process / our warm send (the per-drop time without the scan).
Ends with one JSON line.

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
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xnat_inbox.senders.xnat.sender import XnatSender

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

USER, PASSWORD = "alice", "alice-pw"  # the fake server's default test account
PROJECT, SUBJECT = "TEST", "BENCH001"


def one_drop(folder: Path, sender: XnatSender, label: str) -> tuple[float, float]:
    """The daemon's own code path for one drop: scan the folder, then XnatSender.send;
    returns (scan seconds, send seconds)."""
    from xnat_inbox.reading.scan import scan_drop
    from xnat_inbox.routing.route import Labels, RoutedStudy

    started = time.perf_counter()
    [study] = scan_drop(folder).studies.values()
    routed = RoutedStudy(study, "bench", Labels(PROJECT, SUBJECT, label), "StudyDescription",
                         "", included=list(study.series.values()))
    scanned = time.perf_counter()
    delivery = sender.send(routed, routed.instances)
    sent = time.perf_counter()
    if delivery.error or delivery.stored != len(study.instances):
        raise SystemExit(f"sender failed: {delivery.error}; stored {delivery.stored}")
    return scanned - started, sent - scanned


def run_ours(mode: str, folder: Path, url: str, secret: Path, label: str) -> int:
    """A child process: `whole` sends one drop; `warm` warms up, then times a second drop."""
    from xnat_inbox.config import XnatDestination
    from xnat_inbox.senders.xnat.sender import XnatSender

    destination = XnatDestination(type="xnat", url=url, allow_http=True, username=USER,
                                  password_file=secret)
    sender = XnatSender("bench", destination)
    scan_s, send_s = one_drop(folder, sender, label)
    if mode == "warm":
        sender.close()
        reset_server(url)  # the timed drop starts from an empty prearchive, like curl's
        sender = XnatSender("bench", destination)  # so the project check is not cached
        sender.client.login()  # the daemon reuses its session: not part of a drop
        scan_s, send_s = one_drop(folder, sender, label + "W")
    sender.close()
    print(json.dumps({"peak_rss_kb": peak_rss_kb(os.getpid()), "scan_s": scan_s,
                      "send_s": send_s}))
    return 0


IMPORT_PATH = "/data/services/import"


@dataclass
class Span:
    """The import requests of one run, from the server's request log (monotonic seconds)."""

    seconds: float  # first import's start to last import's end
    requests: int
    gaps: float  # time in the span with no import request in progress

    @classmethod
    def of(cls, url: str) -> Span:
        with urllib.request.urlopen(f"{url}/_fake/requests", timeout=30) as answer:
            log = json.loads(answer.read())
        imports = sorted((r["start"], r["end"]) for r in log
                         if r["method"] == "POST" and r["path"] == IMPORT_PATH)
        if not imports or any(r["status"] != 200 for r in log if r["path"] == IMPORT_PATH):
            raise RuntimeError(f"no successful import in the server's log: {log[-5:]}")
        busy, until = 0.0, imports[0][0]
        for start, end in imports:  # the union of the requests' intervals
            busy += max(0.0, end - max(start, until))
            until = max(until, end)
        seconds = max(end for _, end in imports) - imports[0][0]
        return cls(seconds, len(imports), seconds - busy)


def reset_server(url: str) -> None:
    """An empty prearchive, and no dirty pages of the last run left to write back (the server
    writes every upload twice: the body, then the filed instances)."""
    request = urllib.request.Request(f"{url}/_fake/reset", data=b"{}", method="POST")
    with urllib.request.urlopen(request, timeout=30) as answer:
        answer.read()
    os.sync()


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


@dataclass
class Pair:
    whole: float  # ours, whole process
    warm_scan: float  # ours, warm: the header scan of the timed drop
    warm_send: float  # ours, warm: project check, upload, commit, read-back
    curl: float  # curl --data-binary @zip, whole process (the reference)
    curl_t: float  # curl -T zip -X POST, whole process
    rss: int  # KiB: ours (whole process), curl, curl -T
    curl_rss: int
    curl_t_rss: int
    span: Span  # ours, the warm drop's import requests
    span_whole: Span  # ours, the whole-process run's
    curl_span: Span  # curl --data-binary's one import request
    curl_t_span: Span

    @property
    def warm(self) -> float:
        return self.warm_scan + self.warm_send

    @property
    def ratios(self) -> tuple[float, float, float, float]:
        """import span, warm per drop, whole process, send alone"""
        return (self.curl_span.seconds / self.span.seconds, self.curl / self.warm,
                self.curl / self.whole, self.curl / self.warm_send)


def run_pair(number: int, url: str, ours_cmd: list[str], curl: str, zip_path: Path) -> Pair:
    reset_server(url)
    whole, rss, out = timed([*ours_cmd, "whole", f"OURS{number}"])
    rss = max(rss, json.loads(out.strip().splitlines()[-1])["peak_rss_kb"])
    span_whole = Span.of(url)
    reset_server(url)
    _, _, out = timed([*ours_cmd, "warm", f"WARM{number}"])
    warm = json.loads(out.strip().splitlines()[-1])
    span = Span.of(url)  # the child reset the server after its warm-up drop
    reset_server(url)
    reference, curl_rss, _ = timed(curl_import(curl, url, zip_path, f"CURL{number}", False))
    curl_span = Span.of(url)
    reset_server(url)
    streamed, stream_rss, _ = timed(curl_import(curl, url, zip_path, f"CURLT{number}", True))
    curl_t_span = Span.of(url)
    return Pair(whole, warm["scan_s"], warm["send_s"], reference, streamed, rss, curl_rss,
                stream_rss, span, span_whole, curl_span, curl_t_span)


def report(pairs: list[Pair], instances: int, megabytes: float) -> None:
    print(f"REST import of {instances} instances ({megabytes:.0f} MB) to the fake XNAT on "
          "127.0.0.1")
    print("import span (server clock): first import request's start to last one's end; "
          "ours = warm drop, n requests, gaps between them")
    print("warm drop = scan + project check + streamed upload + commit + read-back; whole = "
          "the process; curl = its whole process")
    print(f"{'pair':>4} {'span ours':>9} {'n':>2} {'gaps':>5} {'span curl':>9} {'-T':>5} "
          f"{'ratio':>6} | {'warm':>5} {'(scan':>6} {'send)':>6} {'whole':>5} "
          f"{'curl':>5} {'-T':>5} | {'r warm':>6} {'r send':>6} {'r whole':>7} | "
          f"{'MB ours':>7} {'curl':>4} {'-T':>3}")
    for n, p in enumerate(pairs, 1):
        ratio, warm, whole, send = p.ratios
        print(f"{n:>4} {p.span.seconds:>9.3f} {p.span.requests:>2} {p.span.gaps:>5.3f} "
              f"{p.curl_span.seconds:>9.3f} {p.curl_t_span.seconds:>5.2f} {ratio:>6.3f} | "
              f"{p.warm:>5.2f} {p.warm_scan:>6.2f} {p.warm_send:>6.2f} {p.whole:>5.2f} "
              f"{p.curl:>5.2f} {p.curl_t:>5.2f} | {warm:>6.3f} {send:>6.3f} {whole:>7.3f} | "
              f"{p.rss / 1024:>7.0f} {p.curl_rss / 1024:>4.0f} {p.curl_t_rss / 1024:>3.0f}")

    def median(values: list[float]) -> float:
        return round(statistics.median(values), 3)

    print(json.dumps({
        "bench": "rest", "ratio": median([p.ratios[0] for p in pairs]),
        "ratio_warm_drop": median([p.ratios[1] for p in pairs]),
        "ratio_whole_process": median([p.ratios[2] for p in pairs]),
        "ratio_send": median([p.ratios[3] for p in pairs]),
        "peak_rss_mb": round(max(p.rss for p in pairs) / 1024, 1),
        "instances": instances, "megabytes": round(megabytes),
        "ours_import_span_s": median([p.span.seconds for p in pairs]),
        "ours_import_requests": pairs[0].span.requests,
        "ours_import_gaps_s": median([p.span.gaps for p in pairs]),
        "ours_whole_process_import_span_s": median([p.span_whole.seconds for p in pairs]),
        "curl_import_span_s": median([p.curl_span.seconds for p in pairs]),
        "curl_T_import_span_s": median([p.curl_t_span.seconds for p in pairs]),
        "ours_whole_s": median([p.whole for p in pairs]),
        "ours_warm_s": median([p.warm for p in pairs]),
        "ours_warm_scan_s": median([p.warm_scan for p in pairs]),
        "ours_warm_send_s": median([p.warm_send for p in pairs]),
        "curl_data_binary_s": median([p.curl for p in pairs]),
        "curl_T_s": median([p.curl_t for p in pairs]),
        "curl_data_binary_peak_rss_mb": round(max(p.curl_rss for p in pairs) / 1024, 1),
        "curl_T_peak_rss_mb": round(max(p.curl_t_rss for p in pairs) / 1024, 1),
        "pairs": len(pairs)}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--ours", nargs=5, metavar=("FOLDER", "URL", "SECRET", "MODE", "LABEL"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ours:
        folder, url, secret, mode, label = args.ours
        return run_ours(mode, Path(folder), url, Path(secret), label)

    from tests.fake_xnat import FakeXnat
    from xnat_inbox.commands.synthetic import write_benchmark_session

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
        with FakeXnat(state_dir=work / "xnat") as xnat:
            ours_cmd = [sys.executable, __file__, "--ours", str(work / "session"), xnat.url,
                        str(secret)]
            pairs = [run_pair(n, xnat.url, ours_cmd, curl, zip_path)
                     for n in range(1, args.pairs + 1)]
    report(pairs, args.instances, megabytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
