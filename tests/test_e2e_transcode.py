"""Whatever the receiver accepts (issue 17): each file goes in its own transfer syntax where the
receiver takes it, else decoded to an uncompressed syntax it takes (`transcode: when_refused`,
the default); `never` fails exactly the refused files, `uncompressed` decodes every file. What
can't be decoded here (no decoder, or over `transcode_max_bytes`) fails alone, with its reason,
and never holds the destination's queue. The pixels that arrive are the decoder's output of
the original, frame by frame."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    MRImageStorage,
    UltrasoundMultiFrameImageStorage,
)

from tests.conftest import checksums
from tests.daemon_runner import dicom_destination, wait_for_report, write_config
from tests.peers import Orthanc, StoreSCP
from tests.test_e2e_cstore import copy_in
from tests.test_e2e_refused import (  # the same site, storescp as Debian starts it, patience
    PATIENT,
    ROUTE,
    SETTLE,
    never_failing,
    site,
    wait_event,
)
from tests.transcode_files import KINDS, LOSSY, MPEG2, Made, decoded, make_drop

pytestmark = pytest.mark.e2e

#: every kind a decoder here reads
DECODABLE = [kind for kind in KINDS if kind != "mpeg2"]
COMPRESSED = [kind for kind in DECODABLE if kind not in ("plain", "big_endian", "deflated")]


def deliver(tmp_path: Path, daemon: Any, config: Path, inbox: Path, kinds: list[str],
            name: str = "DROP") -> tuple[str, dict[str, Any], dict[str, Made]]:
    made = make_drop(tmp_path / "src" / name, kinds)
    before = checksums(tmp_path / "src" / name)
    proc = daemon(config)
    copy_in(tmp_path / "src" / name, inbox)
    outcome, report, _ = wait_for_report(inbox, name, daemon=proc)
    kept = next((inbox / outcome).glob(f"*/{name}"))
    assert checksums(kept) == before  # the originals untouched
    never_failing(proc, tmp_path / "state")
    return outcome, report, made


def by_kind(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["path"].rsplit("/", 1)[-1].removesuffix(".dcm"): e
            for e in report["files"]["entries"]}


def series_of(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["description"]: s for s in report["studies"][0]["series"]}


def received(scp: StoreSCP) -> dict[str, Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in (dcmread(p) for p in scp.files())}


def assert_decoded(got: Dataset, original: Made) -> None:
    """What arrived uncompressed is the decoder's output of the original, frame by frame, and
    its header says what its pixels are."""
    source = original.dataset()
    assert np.array_equal(decoded(got), original.pixels()), original.kind
    assert got.Rows == source.Rows and got.Columns == source.Columns
    assert int(got.get("NumberOfFrames", 1)) == int(source.get("NumberOfFrames", 1))
    if original.kind in LOSSY:
        assert got.LossyImageCompression == "01", original.kind  # never claimed lossless
        assert got.LossyImageCompressionMethod, original.kind
        assert got.LossyImageCompressionRatio, original.kind
    else:
        assert got.get("LossyImageCompression") in (None, "00"), original.kind
    if source.SamplesPerPixel == 3:
        assert got.PlanarConfiguration == 0
        # lossy JPEG's YBR_FULL_422 arrives as RGB (decoded so), never still claiming 422
        assert got.PhotometricInterpretation == "RGB", original.kind
    else:
        assert got.PhotometricInterpretation == source.PhotometricInterpretation


def test_uncompressed_only_receiver_gets_every_file_decoded(tmp_path, uncompressed_scp, daemon):
    """storescp without +xa: each compressed and deflated file arrives decoded, in a little
    endian syntax, pixels equal to the originals' decoded ones; big endian, which storescp
    takes, and plain little endian arrive as they are. The report says per series which
    syntax went out."""
    config, inbox = site(tmp_path, uncompressed_scp)
    outcome, report, made = deliver(tmp_path, daemon, config, inbox, DECODABLE)

    assert outcome == "done", report["reasons"]
    got = received(uncompressed_scp)
    assert set(got) == {m.sop_instance_uid for m in made.values()}
    series = series_of(report)
    for kind, original in made.items():
        ds = got[original.sop_instance_uid]
        syntax = str(ds.file_meta.TransferSyntaxUID)
        if kind == "big_endian":
            assert syntax == ExplicitVRBigEndian
        else:
            assert syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian), kind
        assert_decoded(ds, original)
        assert series[kind]["sent_as"] == {_name(syntax): 1}, kind
        assert series[kind]["converted"] == (kind not in ("plain", "big_endian")), kind


def _name(syntax: str) -> str:
    from pydicom.uid import UID
    return f"{UID(syntax).name} ({syntax})"


@pytest.mark.parametrize("transcode", ["when_refused", "never"])
def test_storescp_taking_every_syntax_gets_the_files_as_they_are(tmp_path, daemon, transcode):
    """storescp +xa: nothing is decoded, whatever the policy short of `uncompressed`; the pixel
    data arrives byte for byte as it was in each file."""
    with StoreSCP(tmp_path) as scp:
        config, inbox = site(tmp_path, scp, transcode=transcode)
        outcome, report, made = deliver(tmp_path, daemon, config, inbox, DECODABLE)
        got = received(scp)

    assert outcome == "done", report["reasons"]
    for kind, original in made.items():
        _assert_as_is(got[original.sop_instance_uid], original)
        assert series_of(report)[kind]["converted"] == 0


def _assert_as_is(got: Dataset, original: Made) -> None:
    source = original.dataset()
    assert got.file_meta.TransferSyntaxUID == original.syntax, original.kind
    assert got.PixelData == source.PixelData, original.kind  # byte for byte
    assert got.PhotometricInterpretation == source.PhotometricInterpretation


def test_orthanc_gets_the_files_as_they_are(tmp_path, daemon):
    kinds = ["jpeg_baseline_rgb", "jpeg_ls", "j2k", "rle_rgb", "deflated", "plain"]
    with Orthanc(tmp_path, graceful_stop=False) as orthanc:
        config, inbox = site(tmp_path, orthanc)
        outcome, report, made = deliver(tmp_path, daemon, config, inbox, kinds)
        stored = {}
        for instance_id in orthanc.get("/instances"):
            with orthanc._opener.open(f"{orthanc.url}/instances/{instance_id}/file",
                                      timeout=10) as response:
                ds = dcmread(io.BytesIO(response.read()))
            stored[str(ds.SOPInstanceUID)] = ds

    assert outcome == "done", report["reasons"]
    for original in made.values():
        _assert_as_is(stored[original.sop_instance_uid], original)


def test_fixed_list_receiver_gets_jpeg_ls_as_is_and_the_rest_decoded(tmp_path, inprocess_scp,
                                                                      daemon):
    """A receiver that takes JPEG-LS Lossless and Implicit VR Little Endian only: JPEG-LS files
    arrive as they are, every other one decoded to Implicit VR Little Endian (big endian and
    deflated converted too)."""
    scp = inprocess_scp(transfer_syntaxes=[JPEGLSLossless, ImplicitVRLittleEndian])
    config, inbox = site(tmp_path, scp)
    kinds = ["jpeg_ls", "jpeg_baseline_rgb", "jpeg_lossless", "rle_rgb", "j2k", "big_endian",
             "deflated", "plain"]
    outcome, report, made = deliver(tmp_path, daemon, config, inbox, kinds)

    assert outcome == "done", report["reasons"]
    got = {str(ds.SOPInstanceUID): ds for ds in scp.stored}
    _assert_as_is(got[made["jpeg_ls"].sop_instance_uid], made["jpeg_ls"])
    for kind in kinds[1:]:
        ds = got[made[kind].sop_instance_uid]
        assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian, kind
        assert_decoded(ds, made[kind])
    series = series_of(report)
    assert series["jpeg_ls"]["sent_as"] == {_name(JPEGLSLossless): 1}
    assert series["rle_rgb"]["sent_as"] == {_name(ImplicitVRLittleEndian): 1}


def test_receiver_taking_jpeg_ls_alone_fails_the_others_with_the_reason(tmp_path, inprocess_scp,
                                                                        daemon):
    """A receiver that takes nothing but JPEG-LS Lossless: JPEG-LS arrives; the others can't be
    given to it in any syntax it takes (it takes no uncompressed one) and fail, each with the
    reason, at once."""
    scp = inprocess_scp(transfer_syntaxes=[JPEGLSLossless])
    config, inbox = site(tmp_path, scp)
    outcome, report, made = deliver(tmp_path, daemon, config, inbox,
                                    ["jpeg_ls", "jpeg_lossless", "plain"])  # all MR

    assert outcome == "failed"
    assert [str(ds.SOPInstanceUID) for ds in scp.stored] == [made["jpeg_ls"].sop_instance_uid]
    entries = by_kind(report)
    assert entries["jpeg_ls"]["outcome"] == "stored"
    reason = entries["jpeg_lossless"]["reason"]
    assert "MR Image Storage" in reason and made["jpeg_lossless"].syntax in reason
    assert "it takes that SOP class in JPEG-LS Lossless" in reason
    assert "not in an uncompressed syntax" in reason
    assert "Explicit or Implicit VR Little Endian" in entries["plain"]["reason"]
    assert len(report["attempts"]) == 1


def test_transcode_never_fails_exactly_the_refused_files(tmp_path, uncompressed_scp, daemon):
    config, inbox = site(tmp_path, uncompressed_scp, transcode="never")
    outcome, report, made = deliver(tmp_path, daemon, config, inbox, DECODABLE)

    assert outcome == "failed"
    entries = by_kind(report)
    refused = {kind for kind, entry in entries.items() if entry["outcome"] == "failed"}
    assert refused == {*COMPRESSED, "deflated"}  # storescp takes big endian, not deflated
    for kind in refused:
        reason = entries[kind]["reason"]
        assert "transcode: never" in reason and uncompressed_scp.aet in reason, reason
        assert made[kind].syntax in reason  # the file's syntax, named
    assert set(received(uncompressed_scp)) == {made["plain"].sop_instance_uid,
                                               made["big_endian"].sop_instance_uid}
    assert len(report["attempts"]) == 1


def test_transcode_uncompressed_decodes_what_the_receiver_would_take(tmp_path, daemon):
    """`uncompressed` to a receiver that takes everything: every file arrives little endian,
    decoded."""
    with StoreSCP(tmp_path) as scp:
        config, inbox = site(tmp_path, scp, transcode="uncompressed")
        kinds = ["jpeg_ls", "jpeg_baseline_rgb", "rle_rgb", "big_endian", "deflated", "plain"]
        outcome, report, made = deliver(tmp_path, daemon, config, inbox, kinds)
        got = received(scp)

    assert outcome == "done", report["reasons"]
    for kind, original in made.items():
        ds = got[original.sop_instance_uid]
        assert ds.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian,
                                                  ImplicitVRLittleEndian), kind
        assert_decoded(ds, original)


def test_over_transcode_max_bytes_fails_with_the_reason(tmp_path, uncompressed_scp, daemon):
    """A two-frame RGB cine of 48x64 decodes to 18,432 bytes, an MR of 64x64 16-bit to 8,192:
    with transcode_max_bytes 10000 the cine fails, counted from its header before decoding;
    the MR goes out."""
    config, inbox = site(tmp_path, uncompressed_scp, transcode_max_bytes=10000)
    outcome, report, made = deliver(tmp_path, daemon, config, inbox, ["rle_rgb", "jpeg_ls"])

    assert outcome == "failed"
    entries = by_kind(report)
    assert entries["jpeg_ls"]["outcome"] == "stored"
    reason = entries["rle_rgb"]["reason"]
    assert entries["rle_rgb"]["outcome"] == "failed"
    assert "18432 bytes decoded" in reason and "transcode_max_bytes (10000)" in reason
    assert "RLE Lossless" in reason
    assert set(received(uncompressed_scp)) == {made["jpeg_ls"].sop_instance_uid}
    assert len(report["attempts"]) == 1


def test_syntax_without_a_decoder_fails_alone_and_holds_no_other_drop(tmp_path,
                                                                      uncompressed_scp, daemon):
    """A file in MPEG2 (no decoder here) to a receiver that takes only uncompressed: it fails
    naming the syntax and the missing decoder; the rest of its drop is sent, and the next drop
    is not held behind it."""
    config, inbox = site(tmp_path, uncompressed_scp)
    made = make_drop(tmp_path / "src" / "VIDEO", ["mpeg2", "jpeg_ls", "plain"])
    other = make_drop(tmp_path / "src" / "NEXT", ["rle_rgb"])
    proc = daemon(config)
    copy_in(tmp_path / "src" / "VIDEO", inbox)
    wait_event(proc, "claimed")
    copy_in(tmp_path / "src" / "NEXT", inbox)
    outcome, report, _ = wait_for_report(inbox, "NEXT", timeout=SETTLE + 15, daemon=proc)
    assert outcome == "done", report["reasons"]

    outcome, report, _ = wait_for_report(inbox, "VIDEO", daemon=proc)
    assert outcome == "failed"
    entries = by_kind(report)
    reason = entries["mpeg2"]["reason"]
    assert "MPEG2" in reason and MPEG2 in reason and "no decoder here" in reason
    assert {kind for kind, e in entries.items() if e["outcome"] == "stored"} == {"jpeg_ls",
                                                                                  "plain"}
    assert set(received(uncompressed_scp)) == {made["jpeg_ls"].sop_instance_uid,
                                               made["plain"].sop_instance_uid,
                                               other["rle_rgb"].sop_instance_uid}
    assert len(report["attempts"]) == 1
    never_failing(proc, tmp_path / "state")


def test_deidentified_and_decoded(tmp_path, uncompressed_scp, daemon):
    """De-identification applies to a decoded copy as to any other: the header is
    de-identified, the pixels are the decoder's output."""
    secret = tmp_path / "deid.secret"
    secret.write_text("s3cret-for-tests\n")
    secret.chmod(0o600)
    inbox = tmp_path / "inbox"
    config = write_config(
        tmp_path, {"scp": dicom_destination(uncompressed_scp, retry=PATIENT)},
        [{"path": str(inbox), "route": {"destination": "scp", **ROUTE, "deidentify": "basic",
                                        "phi_guard": "off"}}],
        settle_seconds=SETTLE, deid_secret_file=str(secret))
    outcome, report, made = deliver(tmp_path, daemon, config, inbox, ["jpeg_ls", "rle_rgb"])

    assert outcome == "done", report["reasons"]
    got = list(received(uncompressed_scp).values())
    assert len(got) == 2
    by_class = {str(ds.SOPClassUID): ds for ds in got}
    for kind, sop_class in (("jpeg_ls", MRImageStorage),
                            ("rle_rgb", UltrasoundMultiFrameImageStorage)):
        ds = by_class[sop_class]
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.SOPInstanceUID != made[kind].sop_instance_uid  # remapped
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert_decoded(ds, made[kind])

