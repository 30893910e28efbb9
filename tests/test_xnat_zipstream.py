"""The streamed zip: files read once (or twice when big), and a file that changes while it is
being sent fails the upload as a local problem, never as a corrupt zip."""

from __future__ import annotations

import builtins
import io
import zipfile
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.fake_xnat import FakeXnat
from tests.fake_xnat.uploads import iter_zip_sequential
from tests.test_xnat_destination import LABELS, xnat_destination
from xnat_inbox.commands.synthetic import write_session
from xnat_inbox.config import XnatDestination
from xnat_inbox.reading.scan import scan_drop
from xnat_inbox.routing.route import Labels, RoutedStudy
from xnat_inbox.senders.xnat import zipstream
from xnat_inbox.senders.xnat.sender import XnatSender
from xnat_inbox.senders.xnat.zipstream import Counter, LocalFileError, Member, zip_chunks

pytestmark = pytest.mark.xnat


def _members(folder: Path, count: int = 3) -> list[Member]:
    members = []
    for i in range(count):
        path = folder / f"IM{i}.dcm"
        path.write_bytes(bytes(range(256)) * (40 + i))
        members.append(Member(f"series/IM{i}.dcm", path, path.stat().st_size))
    return members


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the files zipstream opens, in order."""
    names: list[str] = []

    def counting_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        names.append(Path(file).name)
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(zipstream, "open", counting_open, raising=False)
    return names


@pytest.mark.parametrize(("whole_read", "opens"), [(16 << 20, 1), (0, 2)])
def test_stored_files_read_once_unless_big(tmp_path, monkeypatch, opened, whole_read, opens):
    monkeypatch.setattr(zipstream, "WHOLE_READ", whole_read)
    members = _members(tmp_path)
    counter = Counter()
    data = b"".join(zip_chunks(members, "stored", counter))
    assert opened == [m.path.name for m in members for _ in range(opens)]
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        assert [archive.read(i) for i in archive.infolist()] == [
            m.path.read_bytes() for m in members]
        # Java's ZipInputStream: a STORED entry must not use a data descriptor
        assert all(not i.flag_bits & 0x08 for i in archive.infolist())
    assert counter.files == 3 and counter.bytes == sum(m.size for m in members)
    assert counter.zip_bytes == len(data)


@pytest.mark.parametrize("whole_read", [16 << 20, 0])
@pytest.mark.parametrize("delta", [-1, +1])
def test_a_file_that_changed_size_is_a_local_error(tmp_path, monkeypatch, whole_read, delta):
    monkeypatch.setattr(zipstream, "WHOLE_READ", whole_read)
    members = _members(tmp_path)
    changed = members[1]
    members[1] = Member(changed.name, changed.path, changed.size + delta)  # as scanned
    with pytest.raises(LocalFileError, match=r"IM1\.dcm changed size while being sent"):
        b"".join(zip_chunks(members, "stored", Counter()))


def test_a_big_file_rewritten_between_its_two_reads_is_a_local_error(tmp_path, monkeypatch):
    monkeypatch.setattr(zipstream, "WHOLE_READ", 0)
    # the CRC read saw other bytes than the send read: the check as it is sent trips
    monkeypatch.setattr(zipstream, "crc_and_mtime", lambda member: (12345, datetime.now()))
    with pytest.raises(LocalFileError, match="changed while being sent"):
        b"".join(zip_chunks(_members(tmp_path), "stored", Counter()))


@pytest.mark.parametrize("zip32_limit", [0, zipstream.ZIP32_LIMIT])
def test_stored_zip_is_read_alike_by_zipfile_and_entry_by_entry(tmp_path, monkeypatch,
                                                                zip32_limit):
    """zip64 when the files add up to 4 GiB (forced here by a 0 limit), else zip32; both as
    zipfile reads them and as Java's ZipInputStream would (the fake's local-header reader)."""
    monkeypatch.setattr(zipstream, "ZIP32_LIMIT", zip32_limit)
    members = _members(tmp_path)
    members[0] = Member("séries/IM0.dcm", members[0].path, members[0].size)  # UTF-8 name
    data = b"".join(zip_chunks(members, "stored", Counter()))
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        assert [i.filename for i in archive.infolist()] == [m.name for m in members]
        assert [archive.read(i) for i in archive.infolist()] == [
            m.path.read_bytes() for m in members]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in archive.infolist())
    upload = tmp_path / "upload.zip"
    upload.write_bytes(data)
    (tmp_path / "work").mkdir()
    entries = list(iter_zip_sequential(upload, tmp_path / "work", strict=True))
    assert [(e.name, e.data) for e in entries] == [(m.name, m.path.read_bytes())
                                                   for m in members]


def test_deflate_reads_each_file_once(tmp_path, opened):
    members = _members(tmp_path)
    data = b"".join(zip_chunks(members, "deflate", Counter()))
    assert opened == [m.path.name for m in members]
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None


@pytest.mark.parametrize("whole_read", [16 << 20, 0])
def test_a_file_grown_after_the_scan_fails_the_delivery_not_the_sender(tmp_path, monkeypatch,
                                                                       whole_read):
    monkeypatch.setattr(zipstream, "WHOLE_READ", whole_read)
    write_session(tmp_path / "s")
    [study] = scan_drop(tmp_path / "s").studies.values()
    routed = RoutedStudy(study, "x", Labels("TEST", *LABELS), "StudyDescription", "",
                         included=list(study.series.values()))
    grown = routed.instances[-1]
    with grown.path.open("ab") as stream:  # written to again after the scan
        stream.write(b"\0" * 64)
    with FakeXnat() as xnat:
        destination = XnatDestination.model_validate(xnat_destination(xnat, tmp_path))
        sender = XnatSender("x", destination)
        delivery = sender.send(routed, routed.instances)
        sender.close()
        assert delivery.error and "changed since the drop was scanned" in delivery.error
        assert not delivery.transient and not delivery.outcomes
        assert not [r for r in xnat.requests() if r["query"] == "action=commit"]
