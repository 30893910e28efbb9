"""Properties: random file trees of random bytes never crash the scanner, and every file that
went in is accounted for in the report; the scan's raw-header reading agrees with pydicom's."""

from __future__ import annotations

import tempfile
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian

from xnat_inbox.commands.synthetic import Patient, SeriesSpec, write_session
from xnat_inbox.config import InboxConfig
from xnat_inbox.intake.claim import ClaimedDrop
from xnat_inbox.outcome.report import DropReport
from xnat_inbox.reading.headers import plain_instance, pydicom_header
from xnat_inbox.reading.rawheader import FIRST_WINDOW, has_preamble
from xnat_inbox.reading.scan import scan_drop

pytestmark = pytest.mark.corpus

NAME = st.text(alphabet=st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)),
               min_size=1, max_size=12).filter(lambda n: n not in (".", "..") and
                                               len(n.encode()) < 200)


def _sample_dicom(**options: object) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        session = write_session(Path(folder), series=(SeriesSpec("T1", 1),), **options)
        return session.files[0].read_bytes()


SAMPLE = _sample_dicom()
CONTENT = st.one_of(
    st.binary(max_size=600),
    st.binary(max_size=300).map(lambda tail: b"\0" * 128 + b"DICM" + tail),
    st.integers(min_value=0, max_value=len(SAMPLE)).map(lambda n: SAMPLE[:n]),
    st.tuples(st.integers(0, len(SAMPLE) - 1), st.integers(0, 255)).map(
        lambda flip: SAMPLE[:flip[0]] + bytes([flip[1]]) + SAMPLE[flip[0] + 1:]),
)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(tree=st.lists(st.tuples(st.lists(NAME, min_size=1, max_size=3), CONTENT), max_size=12))
def test_random_trees_never_crash_the_scanner(tmp_path_factory, tree):
    root = tmp_path_factory.mktemp("drop")
    written: set[str] = set()
    for parts, content in tree:
        path = root.joinpath(*parts)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        except (IsADirectoryError, NotADirectoryError, FileExistsError):
            continue  # the tree already has a folder or file at that place
        written.add(str(path.relative_to(root)))
    scan = scan_drop(root)
    inbox = InboxConfig(path=root.parent)
    drop = ClaimedDrop("prop", inbox, root.parent, root.name, False, datetime.now().astimezone())
    report = DropReport(drop, scan=scan).to_dict(datetime.now().astimezone())
    reported = {entry["path"] for entry in report["files"]["entries"]}
    assert reported == written
    assert report["files"]["total"] == len(written) == sum(report["files"]["by_kind"].values())


#: files the raw-header reading must take itself (else the agreement below would say little)
PLAIN_SAMPLES = {
    "explicit VR": SAMPLE,
    "implicit VR": _sample_dicom(transfer_syntax=ImplicitVRLittleEndian),
    "UTF-8 names": _sample_dicom(patient=Patient(patient_id="SÜBJ-1", patient_name="Müller^Zoë")),
    "no pixel data": _sample_dicom(extra={"PixelData": None}),
    "header past the first window": _sample_dicom(extra={"ReferencedImageSequence": [
        Dataset(ReferencedSOPInstanceUID=f"1.2.3.{n}") for n in range(3000)]}),
}


def _both_readings(path: Path, content: bytes) -> tuple[tuple, tuple]:
    plain_phi: set[str] = set()
    slow_phi: set[str] = set()
    with open(path, "rb") as stream:
        plain = plain_instance(stream, path, "f.dcm", len(content), plain_phi)
    with open(path, "rb") as stream:
        slow = pydicom_header(stream, has_preamble(content), path, "f.dcm", len(content),
                              slow_phi)
    return (plain, plain_phi), (slow, slow_phi)


@pytest.mark.parametrize("name", PLAIN_SAMPLES)
def test_ordinary_files_are_read_from_their_raw_header_as_pydicom_reads_them(tmp_path, name):
    content = PLAIN_SAMPLES[name]
    path = tmp_path / "f.dcm"
    path.write_bytes(content)
    (plain, plain_phi), (slow, slow_phi) = _both_readings(path, content)
    assert plain is not None, "the raw-header reading handed an ordinary file to pydicom"
    if name == "header past the first window":
        assert content.index(b"\xe0\x7f\x10\x00") > FIRST_WINDOW
    assert plain == slow and plain.instance is not None
    assert plain_phi == slow_phi and plain_phi


HEADER_MUTATIONS = st.one_of(
    st.integers(min_value=0, max_value=len(SAMPLE)).map(lambda n: SAMPLE[:n]),
    st.tuples(st.integers(0, 1500), st.integers(0, 255)).map(
        lambda flip: SAMPLE[:flip[0]] + bytes([flip[1]]) + SAMPLE[flip[0] + 1:]),
    st.tuples(st.integers(0, 1500), st.binary(min_size=1, max_size=8)).map(
        lambda cut: SAMPLE[:cut[0]] + cut[1] + SAMPLE[cut[0] + len(cut[1]) // 2:]),
)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=HEADER_MUTATIONS)
def test_the_raw_header_reading_never_disagrees_with_pydicom(tmp_path_factory, content):
    """Whatever the raw reading takes on (it hands the rest to pydicom), it reads as pydicom
    does: same kind, same values, same PHI."""
    path = tmp_path_factory.mktemp("mutant") / "f.dcm"
    path.write_bytes(content)
    (plain, plain_phi), (slow, slow_phi) = _both_readings(path, content)
    if plain is not None:
        assert (plain, plain_phi) == (slow, slow_phi)
