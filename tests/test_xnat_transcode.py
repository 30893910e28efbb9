"""The XNAT REST destination and compressed files (issue 17): sent as they are by default (XNAT's
importer reads the common compressed syntaxes); with `transcode: uncompressed`, decoded in the
zip stream to Explicit VR Little Endian, within `transcode_max_bytes`; a file that can't be
decoded here fails alone, and the read-back expects only what was sent."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian

from tests.daemon_runner import wait_for_report
from tests.fake_xnat import FakeXnat
from tests.test_e2e_cstore import copy_in
from tests.test_xnat_destination import site, xnat_destination
from tests.transcode_files import LOSSY, MPEG2, decoded, make_drop

pytestmark = pytest.mark.xnat

KINDS = ["jpeg_ls", "rle_rgb", "jpeg_baseline_rgb", "big_endian", "deflated", "plain"]


@pytest.fixture
def xnat(shared_xnat: FakeXnat) -> FakeXnat:
    shared_xnat.reset()
    return shared_xnat


def stored_files(xnat: Any) -> dict[str, Path]:
    """The files of the one prearchive entry, by SOPInstanceUID."""
    [entry] = xnat.prearchive()
    return {f["sop_uid"]: xnat.state_dir / f["path"] for f in entry["files"]}


def deliver(tmp_path: Path, xnat: Any, daemon: Any, kinds: list[str], **destination: Any
            ) -> tuple[str, dict[str, Any], dict[str, Any]]:
    config, inbox = site(tmp_path, xnat_destination(xnat, tmp_path, **destination),
                         series=None)
    made = make_drop(tmp_path / "src" / "MIXED", kinds)
    proc = daemon(config)
    copy_in(tmp_path / "src" / "MIXED", inbox)
    outcome, report, _ = wait_for_report(inbox, "MIXED", daemon=proc)
    return outcome, report, made


def test_files_go_as_they_are_by_default(tmp_path, xnat, daemon):
    outcome, report, made = deliver(tmp_path, xnat, daemon, KINDS)

    assert outcome == "done", report["reasons"]
    files = stored_files(xnat)
    for original in made.values():
        digest = hashlib.sha256(original.path.read_bytes()).hexdigest()
        assert hashlib.sha256(files[original.sop_instance_uid].read_bytes()).hexdigest() == digest
    series = {s["description"]: s for s in report["studies"][0]["series"]}
    assert all(s["converted"] == 0 for s in series.values())


def test_uncompressed_decodes_in_the_zip(tmp_path, xnat, daemon):
    outcome, report, made = deliver(tmp_path, xnat, daemon, KINDS, transcode="uncompressed")

    assert outcome == "done", report["reasons"]
    files = stored_files(xnat)
    for kind, original in made.items():
        ds = dcmread(files[original.sop_instance_uid])
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian, kind
        assert np.array_equal(decoded(ds), original.pixels()), kind
        if kind in LOSSY:
            assert ds.LossyImageCompression == "01", kind
        if ds.SamplesPerPixel == 3:
            assert ds.PhotometricInterpretation == "RGB", kind
    series = {s["description"]: s for s in report["studies"][0]["series"]}
    assert series["rle_rgb"]["converted"] == 1 and series["plain"]["converted"] == 0


def test_uncompressed_fails_what_cant_be_decoded_and_sends_the_rest(tmp_path, xnat, daemon):
    """An MPEG2 file (no decoder here) and a cine over transcode_max_bytes fail, each with its
    reason; the JPEG-LS file is uploaded and read back."""
    outcome, report, made = deliver(tmp_path, xnat, daemon, ["mpeg2", "rle_rgb", "jpeg_ls"],
                                    transcode="uncompressed", transcode_max_bytes=10000)

    assert outcome == "failed"
    entries = {e["path"].rsplit("/", 1)[-1].removesuffix(".dcm"): e
               for e in report["files"]["entries"]}
    assert entries["jpeg_ls"]["outcome"] == "stored"
    assert "no decoder here" in entries["mpeg2"]["reason"] and MPEG2 in entries["mpeg2"]["reason"]
    assert "transcode_max_bytes (10000)" in entries["rle_rgb"]["reason"]
    assert set(stored_files(xnat)) == {made["jpeg_ls"].sop_instance_uid}
    assert len(report["attempts"]) == 1
    assert not any("read-back" in reason for reason in report["reasons"])
