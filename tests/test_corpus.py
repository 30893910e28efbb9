"""Every case of the corpus through the real daemon and a real receiver (dcmtk storescp)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import checksums
from tests.corpus import MAX_ENTRIES, ROUTES, SPLIT_STUDY, Case, cases
from tests.daemon_runner import (
    DaemonProcess,
    dicom_destination,
    report_files,
    reports,
    write_config,
)
from tests.peers import StoreSCP

pytestmark = pytest.mark.corpus

ROUTE = {"destination": "scp", "project": "Corpus", "subject": "{PatientID}",
         "session": "{PatientID}_{StudyDate}"}


def without_file_capabilities() -> list[str]:
    """As root, permission bits bind only without CAP_DAC_OVERRIDE: drop it for the daemon."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to test permissions as root"
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--"]


def originals(path: Path) -> dict[str, str]:
    if path.is_symlink():
        return {}
    if path.is_file():
        return {path.name: checksums(path.parent)[path.name]}
    return checksums(path)


def place(case: Case, staging: Path, inbox: Path) -> Path:
    target = inbox / case.parent / case.drop_name
    (staging / case.drop_name).rename(target)
    if case.name == "folder_cannot_be_renamed":
        os.chmod(target, 0o555)  # renaming a folder needs write permission on it
    return target


def find_report(inbox: Path, name: str) -> tuple[str, dict, Path] | None:
    for outcome in ("done", "failed"):
        for path in report_files(inbox / outcome):  # done/<day>/[<routing folder>/]<name>
            if path.name == f"{name}.report.json":
                return outcome, json.loads(path.read_text()), path.with_name(name)
    return None


def all_reasons(report: dict) -> str:
    entries = [e["reason"] or "" for e in report["files"]["entries"]]
    return " | ".join([*report["reasons"], *entries])


def test_every_bad_or_odd_drop_gets_its_outcome_and_nothing_is_lost(tmp_path):
    corpus = cases()
    inbox, staging, scratch = tmp_path / "inbox", tmp_path / "staging", tmp_path / "scratch"
    staging.mkdir()
    scratch.mkdir()
    with StoreSCP(tmp_path) as scp:
        config = write_config(
            tmp_path, {"scp": dicom_destination(scp)},
            [{"path": str(inbox), "route": ROUTE, "archives": {"max_entries": MAX_ENTRIES}}])
        for folder, text in ROUTES.items():
            (inbox / folder).mkdir()
            (inbox / folder / "route.yaml").write_text(text)
        before = {}
        for case in corpus:
            case.build(staging / case.drop_name, scratch)
            before[case.name] = originals(staging / case.drop_name)
        daemon = DaemonProcess(config, tmp_path / "daemon.log",
                               wrapper=without_file_capabilities())
        daemon.start()
        try:
            placed = {case.name: place(case, staging, inbox) for case in corpus}
            results = wait_for_all(inbox, corpus, daemon)
            time.sleep(1.0)  # the stays-cases have had several settle periods to go wrong
        finally:
            code = daemon.stop()
        received = [dcmread(p, stop_before_pixels=True) for p in scp.files()]
    log = daemon.text()
    table = []
    for case in corpus:
        observed, detail = observe(case, results.get(case.name), placed[case.name], log)
        table.append({"case": case.name, "expected": case.outcome, "observed": observed,
                      "detail": detail})
    print("\n".join(json.dumps(row) for row in table))
    assert code == 0
    assert [r["case"] for r in table if r["expected"] != r["observed"]] == [], table
    check_details(corpus, results, placed, before, log)
    check_receiver(corpus, results, received, scratch)
    check_every_file_in_one_place(inbox, before)


def wait_for_all(inbox: Path, corpus: list[Case], daemon: DaemonProcess,
                 timeout: float = 180) -> dict[str, tuple[str, dict, Path]]:
    results: dict[str, tuple[str, dict, Path]] = {}
    expected = [case for case in corpus if case.outcome != "stays"]
    deadline = time.monotonic() + timeout
    while len(results) < len(expected) and time.monotonic() < deadline:
        for case in expected:
            if case.name not in results and (found := find_report(inbox, case.drop_name)):
                results[case.name] = found
        time.sleep(0.2)
    missing = [case.name for case in expected if case.name not in results]
    assert not missing, f"no report for {missing}\n{daemon.text()[-5000:]}"
    return results


def observe(case: Case, result: tuple[str, dict, Path] | None, placed: Path,
            log: str) -> tuple[str, str]:
    if result is None:
        still_there = os.path.lexists(placed)
        said = case.reason in log
        return ("stays" if still_there and said else "lost?"), f"in inbox: {still_there}"
    outcome, report, _ = result
    if case.reason and case.reason not in all_reasons(report):
        return f"{outcome} (reason missing)", all_reasons(report)[:300]
    return outcome, "; ".join(report["reasons"])[:200]


def check_details(corpus: list[Case], results: dict, placed: dict, before: dict,
                  log: str) -> None:
    for case in corpus:
        if case.outcome == "stays":
            assert originals(placed[case.name]) == before[case.name], case.name
            continue
        _, report, moved = results[case.name]
        assert originals(moved) == before[case.name], f"{case.name}: originals changed"
        if case.stored is not None:
            stored = sum(study["stored"] for study in report["studies"])
            assert stored == case.stored, (case.name, stored, report["reasons"])
        kinds = {e["path"]: e["kind"] for e in report["files"]["entries"]}
        for name, kind in case.kinds.items():
            assert kinds.get(name) == kind, (case.name, name, kinds.get(name))
        listed = report["files"]["total"]
        assert listed == len(report["files"]["entries"])


def check_receiver(corpus: list[Case], results: dict, received: list, scratch: Path) -> None:
    uids = [str(ds.SOPInstanceUID) for ds in received]
    assert len(uids) == len(set(uids)), "an instance was sent twice"
    expected = sum(case.stored or 0 for case in corpus)
    assert len(uids) == expected
    split = [ds for ds in received if str(ds.StudyInstanceUID) == SPLIT_STUDY]
    assert len(split) == 4  # both drops of the split study, merged under one study
    assert {str(ds.StudyDescription) for ds in split} == {"xnat://Corpus/SPLIT01/SPLIT01_20260115"}
    outside = dcmread(next((scratch / "outside").glob("*.dcm")))
    assert str(outside.SOPInstanceUID) not in uids, "a symlink was followed out of the inbox"


def check_every_file_in_one_place(inbox: Path, before: dict[str, dict[str, str]]) -> None:
    """As many regular files as went in, each case's in exactly its one final place."""
    ours = {beside for report in reports(inbox) for beside in
            (report, report.with_name(report.name.removesuffix(".report.json") + ".log"))}
    found = [p for p in inbox.rglob("*") if p.is_file() and not p.is_symlink()
             and ".xnat-inbox" not in p.parts and p.name != "route.yaml" and p not in ours]
    assert len(found) == sum(len(files) for files in before.values())
