"""Property: random file trees of random bytes never crash the scanner, and every file that
went in is accounted for in the report."""

from __future__ import annotations

import tempfile
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xnat_inbox.claim import ClaimedDrop
from xnat_inbox.config import InboxConfig
from xnat_inbox.report import DropReport
from xnat_inbox.scan import scan_drop
from xnat_inbox.synthetic import SeriesSpec, write_session

pytestmark = pytest.mark.corpus

NAME = st.text(alphabet=st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)),
               min_size=1, max_size=12).filter(lambda n: n not in (".", "..") and
                                               len(n.encode()) < 200)


def _sample_dicom() -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        session = write_session(Path(folder), series=(SeriesSpec("T1", 1),))
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
    report = DropReport(drop, scan=scan).to_dict(datetime.now().astimezone(), None)
    reported = {entry["path"] for entry in report["files"]["entries"]}
    assert reported == written
    assert report["files"]["total"] == len(written) == sum(report["files"]["by_kind"].values())
