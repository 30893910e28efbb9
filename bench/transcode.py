"""Transcoding: the daemon's C-STORE sender delivering a JPEG-LS session to a receiver that takes
uncompressed data only, so every instance is decoded on the way, against dcmtk's `dcmsend +dls`
(decompress lossless) doing the same to the same kind of receiver.

The session: synthetic MR, 512x512, 16-bit (12 stored), the generator's phantom plus noise (as
a scanner's images have; without it JPEG-LS would shrink them 12:1 and decoding would cost
next to nothing), compressed with dcmtk's `dcmcjpls` (lossless). The receiver: one
`storescp --fork` started WITHOUT +xa (it accepts the uncompressed syntaxes only), TCP_NODELAY=1.
Ours and dcmsend alternate pair by pair; after each run every instance is checked at the
receiver (there, uncompressed) and a sample's pixels against the decoder's output of the
original, then removed. Ours is timed as in bench/cstore.py: the *drop* (header scan, grouping,
send; inside the process, imports done: the headline ratio, since the daemon imports once),
and the *whole* process; dcmsend's seconds are its whole process. ratio = dcmsend s / ours.
Peak RSS (VmHWM) of both, each run.

RSS over a long session (issue 17: "RSS stays flat over a 2,000-instance compressed session"):
ours sends the first --instances and then all --rss-instances of the same session to a
discarding storescp (no +xa), and the peak RSS of the two runs is compared, with VmRSS at each
quarter of the long run. --rss-instances 0 skips it.

Where the daemon can't decode (before issue 17), its runs fail (the receiver refuses JPEG-LS):
the bench says so, still times dcmsend, ends with "ratio": null and the daemon's error, and
exits 1.

    python bench/transcode.py [--instances 500] [--pairs 3] [--rss-instances 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ROUTING = "xnat://Bench/BENCH001/BENCH001_S1"
ROWS = COLUMNS = 512
NOISE = 32  # uniform 0..31 added to the 12-bit phantom: JPEG-LS then gives ≈2.5:1
CHECKED_PER_RUN = 10  # instances whose pixels are compared with the original's, each run


def send_with_daemon_sender(folder: Path, port: int, aet: str) -> int:
    """The daemon's own code path, as in bench/cstore.py: scan the folder, then DicomSender
    (the destination's defaults: `transcode: when_refused`). Prints one JSON line."""
    from xnat_inbox.config import DicomDestination
    from xnat_inbox.reading.scan import scan_drop
    from xnat_inbox.routing.route import Labels, RoutedStudy
    from xnat_inbox.senders.dicom.sender import DicomSender

    drop_started = time.perf_counter()
    [study] = scan_drop(folder).studies.values()
    routed = RoutedStudy(study, "bench", Labels("Bench", "BENCH001", "BENCH001_S1"),
                         "StudyDescription", ROUTING, included=list(study.series.values()))
    destination = DicomDestination(type="dicom", host="127.0.0.1", port=port, called_ae=aet)
    started = time.perf_counter()
    sender = DicomSender("bench", destination)
    delivery = sender.send(routed, routed.instances)
    finished = time.perf_counter()
    sender.close()
    reasons = sorted({outcome.note for outcome in delivery.outcomes.values()
                      if not outcome.stored and outcome.note})
    print(json.dumps({"drop_s": finished - drop_started, "send_s": finished - started,
                      "stored": delivery.stored, "instances": len(study.instances),
                      "error": delivery.error, "reasons": reasons[:3]}))
    return 0 if delivery.stored == len(study.instances) and not delivery.error else 1


# --- the session ----------------------------------------------------------------------------


def jpegls_session(work: Path, count: int) -> Path:
    """`count` JPEG-LS files (flat folder) made by dcmcjpls from the generator's MR + noise."""
    import numpy as np
    from pydicom import dcmread

    from tests.peers import dcmtk_tool
    from xnat_inbox.commands.synthetic import write_benchmark_session

    dcmcjpls = dcmtk_tool("dcmcjpls")
    if dcmcjpls is None:
        raise SystemExit("dcmcjpls (dcmtk) is needed: apt-get install dcmtk")
    plain = write_benchmark_session(work / "plain", count=count, rows=ROWS, columns=COLUMNS)
    target = work / "jpegls"
    target.mkdir()
    rng = np.random.default_rng(17)
    noises = [rng.integers(0, NOISE, (ROWS, COLUMNS), dtype=np.uint16) for _ in range(16)]

    def one(index: int) -> None:
        source = plain.files[index]
        ds = dcmread(source)
        pixels = np.minimum(ds.pixel_array + noises[index % len(noises)], 4095)
        ds.PixelData = pixels.astype(np.uint16).tobytes()
        noisy = source.with_suffix(".noisy.dcm")
        ds.save_as(noisy)
        source.unlink()
        done = subprocess.run([dcmcjpls, "+el", noisy, target / f"{index:05d}.dcm"],
                              capture_output=True, text=True)
        noisy.unlink()
        if done.returncode != 0:
            raise RuntimeError(f"dcmcjpls failed: {done.stderr.strip()}")

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        list(pool.map(one, range(count)))
    return target


def subset(session: Path, folder: Path, count: int) -> Path:
    """The first `count` files of the session, hard-linked into a folder of their own."""
    folder.mkdir()
    for path in sorted(session.iterdir())[:count]:
        os.link(path, folder / path.name)
    return folder


# --- running and measuring ------------------------------------------------------------------


@dataclass
class Run:
    seconds: float  # the whole process
    peak_rss_mb: float
    drop_s: float | None = None  # ours only
    send_s: float | None = None
    error: str = ""  # why it failed (empty: every instance stored)
    rss_quarters_mb: list[float] = field(default_factory=list)  # VmRSS at 25/50/75/100% of time


def _status_kb(pid: int, key: str) -> int:
    # VmHWM: the process's own high-water mark (getrusage's ru_maxrss would also count the
    # forking parent's memory, which Linux carries across exec); VmRSS: now
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run(argv: list[str], env: dict[str, str] | None = None) -> Run:
    samples: list[tuple[float, int]] = []
    peak = 0
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            peak = max(peak, _status_kb(proc.pid, "VmHWM:"))
            samples.append((time.perf_counter() - started, _status_kb(proc.pid, "VmRSS:")))
            time.sleep(0.01)
        seconds = time.perf_counter() - started
        out.seek(0)
        text = out.read().decode(errors="replace")
    result = Run(seconds, peak / 1024)
    samples = [(at, kb) for at, kb in samples if kb]
    for quarter in (0.25, 0.5, 0.75, 1.0):
        before = [kb for at, kb in samples if at <= seconds * quarter] or [0]
        result.rss_quarters_mb.append(round(before[-1] / 1024, 1))
    if argv[0] == sys.executable:  # ours: its last line is JSON
        lines = [line for line in text.splitlines() if line.startswith("{")]
        printed = json.loads(lines[-1]) if lines else {}
        result.drop_s, result.send_s = printed.get("drop_s"), printed.get("send_s")
        if proc.returncode != 0 and printed:
            why = printed.get("error") or "; ".join(printed.get("reasons", [])) or "?"
            result.error = f"stored {printed.get('stored')} of {printed.get('instances')}: {why}"
        elif proc.returncode != 0:
            result.error = f"exit {proc.returncode}: {text.strip()[-600:]}"
    elif proc.returncode != 0:
        result.error = f"exit {proc.returncode}: {text.strip()[-600:]}"
    return result


def check_and_empty(received: Path, session: Path, expected: int | None) -> str:
    """Every instance at the receiver, uncompressed, a sample's pixels equal to the decoded
    original's (unless expected is None: a failed run); then removed. Returns what is wrong
    (empty: nothing)."""
    import numpy as np
    from pydicom import dcmread

    files = [path for path in received.rglob("*") if path.is_file()]
    if expected is not None and len(files) != expected:
        time.sleep(0.5)  # storescp --fork's children may still be writing the last one
        files = [path for path in received.rglob("*") if path.is_file()]
    problem = ("" if expected is None or len(files) == expected
               else f"the receiver holds {len(files)} of {expected}")
    if expected is not None and not problem:
        originals = {dcmread(path, stop_before_pixels=True).SOPInstanceUID: path
                     for path in sorted(session.iterdir())}
        for path in random.sample(files, min(CHECKED_PER_RUN, len(files))):
            got = dcmread(path)
            if got.file_meta.TransferSyntaxUID.is_compressed:
                problem = f"{path.name} arrived compressed ({got.file_meta.TransferSyntaxUID})"
                break
            if not np.array_equal(got.pixel_array, dcmread(originals[got.SOPInstanceUID])
                                  .pixel_array):
                problem = f"{path.name}: pixels differ from the decoded original"
                break
    for path in files:
        path.unlink()
    os.sync()  # no run pays for writing back the one before
    return problem


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


# --- main -----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--rss-instances", type=int, default=2000,
                        help="the long session of the RSS check (0: skip it)")
    parser.add_argument("--send", nargs=3, metavar=("FOLDER", "PORT", "AET"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.send:
        return send_with_daemon_sender(Path(args.send[0]), int(args.send[1]), args.send[2])

    from tests.peers import StoreSCP, dcmtk_tool

    dcmsend = dcmtk_tool("dcmsend")
    if not dcmsend:
        print("dcmsend (dcmtk) is needed: apt-get install dcmtk", file=sys.stderr)
        return 2
    env = {**os.environ, "TCP_NODELAY": "1"}
    rss_count = max(args.rss_instances, args.instances) if args.rss_instances else 0
    with tempfile.TemporaryDirectory(prefix="bench-transcode-") as tmp:
        work = Path(tmp)
        built = time.perf_counter()
        pool = jpegls_session(work, max(args.instances, rss_count))
        session = subset(pool, work / "session", args.instances)
        jpegls_mb = sum(p.stat().st_size for p in session.iterdir()) / 1e6
        print(f"built {max(args.instances, rss_count)} JPEG-LS instances in "
              f"{time.perf_counter() - built:.1f} s; the session: {args.instances} instances, "
              f"{jpegls_mb:.0f} MB compressed, {args.instances * ROWS * COLUMNS * 2 / 1e6:.0f} MB "
              "of pixels decoded", flush=True)
        pairs: list[tuple[Run, Run]] = []
        with StoreSCP(work, fork=True, syntaxes="") as scp:  # no +xa: uncompressed only
            ours_cmd = [sys.executable, __file__, "--send", str(session), str(scp.port), scp.aet]
            ref_cmd = [dcmsend, "+dls", "-aec", scp.aet, "+sd", "127.0.0.1", str(scp.port),
                       str(session)]
            for number in range(1, args.pairs + 1):
                order = [("ours", ours_cmd, None), ("ref", ref_cmd, env)]
                if number % 2 == 0:
                    order.reverse()
                runs: dict[str, Run] = {}
                for name, argv, run_env in order:
                    result = run(argv, run_env)
                    problem = check_and_empty(scp.output_dir, session,
                                              None if result.error else args.instances)
                    result.error = result.error or problem
                    runs[name] = result
                pairs.append((runs["ours"], runs["ref"]))
                print(f"pair {number}: ours {_describe(runs['ours'])}; dcmsend "
                      f"{_describe(runs['ref'])}", flush=True)
        long_runs: list[Run] = []
        if rss_count:
            with StoreSCP(work, fork=True, syntaxes="", extra_args=["--ignore"]) as scp:
                for count in (args.instances, rss_count):
                    folder = session if count == args.instances else pool
                    long_runs.append(run([sys.executable, __file__, "--send", str(folder),
                                          str(scp.port), scp.aet]))
                    print(f"RSS run, {count} instances: {_describe(long_runs[-1])}; VmRSS at "
                          f"each quarter {long_runs[-1].rss_quarters_mb} MB", flush=True)
    return report(args, pairs, long_runs, rss_count, jpegls_mb)


def _describe(result: Run) -> str:
    timing = (f"drop {result.drop_s:.3f} s, " if result.drop_s is not None else "")
    state = f"FAILED: {result.error}" if result.error else "all stored"
    return f"{timing}whole {result.seconds:.3f} s, peak RSS {result.peak_rss_mb:.1f} MB, {state}"


def report(args: argparse.Namespace, pairs: list[tuple[Run, Run]], long_runs: list[Run],
           rss_count: int, jpegls_mb: float) -> int:
    print(f"\nJPEG-LS {ROWS}x{COLUMNS} MR, {args.instances} instances ({jpegls_mb:.0f} MB), "
          "decompressed for dcmtk storescp --fork without +xa (uncompressed only), 127.0.0.1, "
          "TCP_NODELAY=1. ratio = dcmsend +dls s / ours")
    print(f"{'pair':>4} {'drop s':>7} {'whole s':>8} {'ours MB':>8} {'dcmsend':>8} "
          f"{'its MB':>7} {'ratio':>6} {'whole':>6}")
    ratios, whole_ratios = [], []
    for number, (ours, ref) in enumerate(pairs, start=1):
        ok = not ours.error and not ref.error and ours.drop_s
        ratio = ref.seconds / ours.drop_s if ok and ours.drop_s else None
        whole = ref.seconds / ours.seconds if ok else None
        if ratio is not None and whole is not None:
            ratios.append(ratio)
            whole_ratios.append(whole)
        drop = f"{ours.drop_s:>7.3f}" if ours.drop_s is not None else f"{'-':>7}"
        print(f"{number:>4} {drop} {ours.seconds:>8.3f} {ours.peak_rss_mb:>8.1f} "
              f"{ref.seconds:>8.3f} {ref.peak_rss_mb:>7.1f} "
              f"{(f'{ratio:.3f}' if ratio else 'failed'):>6} "
              f"{(f'{whole:.3f}' if whole else '-'):>6}")
    ours_errors = sorted({ours.error for ours, _ in pairs if ours.error})
    ref_errors = sorted({ref.error for _, ref in pairs if ref.error})
    for error in ours_errors:
        print(f"the daemon's sender failed: {error}")
    for error in ref_errors:
        print(f"dcmsend failed: {error}")
    good_ours = [ours for ours, _ in pairs if not ours.error]
    good_ref = [ref for _, ref in pairs if not ref.error]
    result: dict[str, object] = {
        "bench": "transcode", "ratio": median(ratios), "whole_process_ratio": median(whole_ratios),
        "instances": args.instances, "pairs": args.pairs,
        "ours_drop_s": median([r.drop_s for r in good_ours if r.drop_s is not None]),
        "ours_whole_s": median([r.seconds for r in good_ours]),
        "dcmsend_s": median([r.seconds for r in good_ref]),
        "instances_per_s": (round(args.instances / statistics.median(
            r.drop_s for r in good_ours if r.drop_s), 1) if good_ours else None),
        "dcmsend_instances_per_s": (round(args.instances / statistics.median(
            r.seconds for r in good_ref), 1) if good_ref else None),
        "ours_peak_rss_mb": _peak(good_ours), "dcmsend_peak_rss_mb": _peak(good_ref),
        "ours_error": ours_errors[0] if ours_errors else None,
    }
    if ref_errors:
        result["dcmsend_error"] = ref_errors[0]
    if long_runs:
        short, long = long_runs
        print(f"\nRSS: ours peak {short.peak_rss_mb:.1f} MB over {args.instances} instances, "
              f"{long.peak_rss_mb:.1f} MB over {rss_count} (VmRSS at each quarter of the long "
              f"run: {long.rss_quarters_mb} MB)")
        result.update({
            "rss_instances": rss_count,
            "rss_short_peak_mb": round(short.peak_rss_mb, 1),
            "rss_long_peak_mb": round(long.peak_rss_mb, 1),
            "rss_growth_mb": round(long.peak_rss_mb - short.peak_rss_mb, 1),
            "rss_long_quarters_mb": long.rss_quarters_mb,
            "rss_error": long.error or short.error or None,
        })
    print(json.dumps(result))
    return 1 if ours_errors or ref_errors else 0


def _peak(runs: list[Run]) -> float | None:
    return round(max(r.peak_rss_mb for r in runs), 1) if runs else None


if __name__ == "__main__":
    sys.exit(main())
