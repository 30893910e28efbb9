"""The whole transcode corpus (tests/transcode_corpus.py: 64 files from dcmtk and openjpeg, MR,
CT, US, SC, 8/12/16-bit, signed, RGB, YBR_FULL_422, multi-frame) as one drop through the daemon:
to dcmtk storescp without +xa every file arrives uncompressed, a lossless one with exactly its
original's pixels, a lossy one with the decoder's output; to storescp +xa every file arrives as
it was, pixel data byte for byte; with `transcode: never` exactly the refused ones fail."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian

from tests.daemon_runner import dicom_destination, wait_for_report, write_config
from tests.peers import StoreSCP
from tests.test_e2e_cstore import copy_in
from tests.test_e2e_refused import never_failing
from tests.transcode_corpus import Corpus, Entry

pytestmark = pytest.mark.corpus

ROUTE = {"project": "Proj", "subject": "{PatientID}", "session": "{PatientID}_{StudyDate}",
         "series": None}
PATIENT = {"max_attempts": 100, "initial_backoff": 30, "max_backoff": 900}
UNCOMPRESSED = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
JPEG_LOSSLESS_P14 = "1.2.840.10008.1.2.4.57"


def deliver(tmp_path: Path, daemon: Any, corpus: Corpus, scp: StoreSCP,
            **destination: Any) -> tuple[str, dict[str, Any], dict[str, Dataset]]:
    inbox = tmp_path / "inbox"
    config = write_config(
        tmp_path, {"scp": dicom_destination(scp, retry=PATIENT, **destination)},
        [{"path": str(inbox), "route": {"destination": "scp", **ROUTE}}], settle_seconds=0.5)
    corpus.copy_to(tmp_path / "src" / "CORPUS")
    proc = daemon(config)
    copy_in(tmp_path / "src" / "CORPUS", inbox)
    outcome, report, _ = wait_for_report(inbox, "CORPUS", timeout=180, daemon=proc)
    never_failing(proc, tmp_path / "state")
    got = {str(ds.SOPInstanceUID): ds for ds in (dcmread(p) for p in scp.files())}
    return outcome, report, got


def _decoded(entry: Entry) -> np.ndarray:
    """The decoder's output of the file (the daemon's decoders give the same values)."""
    ds = dcmread(entry.path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        return pixel_array(ds, decoding_plugin="pylibjpeg")
    return ds.pixel_array


def test_uncompressed_only_receiver_gets_the_corpus_decoded(tmp_path, daemon, transcode_corpus):
    with StoreSCP(tmp_path, syntaxes="") as scp:
        outcome, report, got = deliver(tmp_path, daemon, transcode_corpus, scp)

    assert outcome == "done", report["reasons"]
    assert set(got) == set(transcode_corpus.by_sop_instance_uid)
    for entry in transcode_corpus.entries:
        ds = got[entry.sop_instance_uid]
        syntax = str(ds.file_meta.TransferSyntaxUID)
        assert syntax == ExplicitVRBigEndian if entry.transfer_syntax == ExplicitVRBigEndian \
            else syntax in UNCOMPRESSED, entry.name
        if entry.lossless:
            assert np.array_equal(ds.pixel_array, entry.reference), entry.name  # identical
        else:
            assert np.array_equal(ds.pixel_array, _decoded(entry)), entry.name
            assert ds.LossyImageCompression == "01", entry.name
        assert "422" not in ds.PhotometricInterpretation, entry.name
        assert int(ds.get("NumberOfFrames", 1)) == entry.frames, entry.name


def test_receiver_taking_every_syntax_gets_the_corpus_as_it_is(tmp_path, daemon,
                                                               transcode_corpus):
    """storescp +xa takes every syntax of the corpus but JPEG Lossless process 14 with another
    predictor than 1 (1.2.840.10008.1.2.4.57: dcmtk's +xa leaves it out): those arrive
    decoded, the rest as they were."""
    with StoreSCP(tmp_path) as scp:
        outcome, report, got = deliver(tmp_path, daemon, transcode_corpus, scp)

    assert outcome == "done", report["reasons"]
    for entry in transcode_corpus.entries:
        ds, original = got[entry.sop_instance_uid], dcmread(entry.path)
        if entry.transfer_syntax == JPEG_LOSSLESS_P14:
            assert str(ds.file_meta.TransferSyntaxUID) in UNCOMPRESSED, entry.name
            assert np.array_equal(ds.pixel_array, entry.reference), entry.name
            continue
        assert ds.file_meta.TransferSyntaxUID == entry.transfer_syntax, entry.name
        assert ds.PixelData == original.PixelData, entry.name
        assert ds.PhotometricInterpretation == entry.photometric, entry.name


def test_transcode_never_fails_exactly_the_refused(tmp_path, daemon, transcode_corpus):
    with StoreSCP(tmp_path, syntaxes="") as scp:
        outcome, report, got = deliver(tmp_path, daemon, transcode_corpus, scp,
                                       transcode="never")

    assert outcome == "failed"
    refused = {e.sop_instance_uid for e in transcode_corpus.entries
               if UID(e.transfer_syntax).is_compressed
               or e.transfer_syntax == DeflatedExplicitVRLittleEndian}
    assert set(got) == set(transcode_corpus.by_sop_instance_uid) - refused
    failed = {e["path"].rsplit("/", 1)[-1] for e in report["files"]["entries"]
              if e["outcome"] == "failed"}
    assert failed == {transcode_corpus.by_sop_instance_uid[uid].path.name for uid in refused}
    assert len(report["attempts"]) == 1
