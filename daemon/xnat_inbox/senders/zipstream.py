"""A zip of original DICOM files, produced as chunks while it is uploaded: nothing of it is
written to disk or held whole in memory (stream-zip does the format).

XNAT reads uploads with Java's ZipInputStream, which refuses a STORED entry followed by a data
descriptor. So STORED entries get their CRC and size in the local header. A file up to
WHOLE_READ bytes (every ordinary DICOM instance) is read once, whole, and its CRC and data come
from that one read, so they always agree; a bigger one is read twice, first for the CRC (the
second read, while sending, comes from the page cache). DEFLATE entries may use data
descriptors and are read once.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from stream_zip import (
    NO_COMPRESSION_32,
    NO_COMPRESSION_64,
    ZIP_32,
    ZIP_64,
    ZipIntegrityError,
    stream_zip,
)

CHUNK = 1 << 20
#: files up to this size are read once, whole: one open and one read per file, and only one
#: such buffer is held at a time (stream-zip pulls the next entry once this one is sent)
WHOLE_READ = 16 << 20
ZIP32_LIMIT = 0xFFFF_FFFF - (1 << 20)  # stay clear of the 4 GiB zip32 field limit
MODE = 0o100644  # a regular file, rw-r--r--
#: changes a file's dataset in place (de-identification); its entry is then the rewritten copy
Transform = Callable[[Dataset], None]


class StopUpload(Exception):
    """Raised inside the body generator to abandon an upload (shutdown was requested)."""


class LocalFileError(Exception):
    """An original file could not be read while zipping (not an OSError on purpose: the HTTP
    stack would take that for a network failure)."""


@dataclass(frozen=True)
class Member:
    """One zip entry: a stable name (a retry must repeat it, so XNAT merges) and its file."""

    name: str
    path: Path
    size: int
    transform: Transform | None = None


@dataclass
class Counter:
    """What went out so far: the upload's progress, updated as the generator is consumed."""

    files: int = 0
    bytes: int = 0  # of the original files (not of the zip)
    zip_bytes: int = 0


Hook = Callable[[Member], None]


def zip_chunks(members: list[Member], compression: str, counter: Counter,
               after_member: Hook | None = None,
               should_stop: Callable[[], bool] | None = None) -> Iterator[bytes]:
    """The zip as chunks; `after_member` runs once a file is fully read into the stream."""
    big = sum(member.size for member in members) >= ZIP32_LIMIT  # zip64 offsets needed
    entries = (_entry(member, big, compression, counter, after_member, should_stop)
               for member in members)
    chunks = stream_zip(entries, chunk_size=CHUNK,
                        get_compressobj=lambda: zlib.compressobj(1, zlib.DEFLATED, -15))
    try:
        for chunk in chunks:
            counter.zip_bytes += len(chunk)
            yield chunk
    except ZipIntegrityError:
        # stream-zip checks the CRC and size it was promised: a big file (read twice)
        # changed between the two reads
        raise LocalFileError(f"a file changed while being sent ({counter.files} of "
                             f"{len(members)} sent)") from None


def _entry(member: Member, big: bool, compression: str, counter: Counter, after: Hook | None,
           should_stop: Callable[[], bool] | None) -> tuple[str, datetime, int, object,
                                                             Iterable[bytes]]:
    if should_stop and should_stop():
        raise StopUpload("stop requested")
    method = ZIP_64 if big else ZIP_32
    if member.transform is not None:
        return _transformed_entry(member, big, compression, counter, after)
    try:
        modified = datetime.fromtimestamp(member.path.stat().st_mtime)
        if compression != "deflate" and member.size <= WHOLE_READ:
            data = _read_whole(member)
            method = (NO_COMPRESSION_64 if big else NO_COMPRESSION_32)(len(data),
                                                                      zlib.crc32(data))
            return member.name, modified, MODE, method, _chunks(data, member, counter, after)
        if compression != "deflate":
            # sizes and CRC known upfront: ZipInputStream-safe STORED entries
            method = (NO_COMPRESSION_64 if big else NO_COMPRESSION_32)(member.size,
                                                                      crc32_of(member.path))
    except OSError as exc:
        raise LocalFileError(f"cannot read {member.name}: {exc.strerror}") from None
    return member.name, modified, MODE, method, _read(member, counter, after)


def _read_whole(member: Member) -> bytes:
    """The file's bytes, checked against the size the scan saw (one read; OSError passes)."""
    with open(member.path, "rb") as stream:
        data = stream.read(member.size + 1)  # one byte more reveals a file that grew
    if len(data) != member.size:
        now = f"{len(data)}" if len(data) < member.size else f"over {member.size}"
        raise LocalFileError(f"{member.name} changed size while being sent "
                             f"({member.size} -> {now} bytes)")
    return data


def _read(member: Member, counter: Counter, after: Hook | None) -> Iterator[bytes]:
    size = 0
    try:
        with open(member.path, "rb") as stream:
            while piece := stream.read(CHUNK):
                size += len(piece)
                counter.bytes += len(piece)
                yield piece
    except OSError as exc:
        raise LocalFileError(f"cannot read {member.name}: {exc.strerror}") from None
    if size != member.size:
        raise LocalFileError(f"{member.name} changed size while being sent "
                             f"({member.size} -> {size} bytes)")
    counter.files += 1
    if after:
        after(member)


def _transformed_entry(member: Member, big: bool, compression: str, counter: Counter,
                       after: Hook | None) -> tuple[str, datetime, int, object, Iterable[bytes]]:
    """The entry for a rewritten copy: read with pydicom, transformed, written to memory (one
    file at a time); the original file is only read."""
    assert member.transform is not None
    try:
        dataset = dcmread(member.path, force=True)
        member.transform(dataset)
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        modified = datetime.fromtimestamp(member.path.stat().st_mtime)
    except OSError as exc:
        raise LocalFileError(f"cannot read {member.name}: {exc.strerror}") from None
    except Exception as exc:  # pydicom's errors on a file it can't rewrite
        raise LocalFileError(f"cannot de-identify {member.name}: {type(exc).__name__}") from None
    data = buffer.getvalue()
    method = ZIP_64 if big else ZIP_32
    if compression != "deflate":
        method = (NO_COMPRESSION_64 if big else NO_COMPRESSION_32)(len(data), zlib.crc32(data))
    return member.name, modified, MODE, method, _chunks(data, member, counter, after)


def _chunks(data: bytes, member: Member, counter: Counter, after: Hook | None) -> Iterator[bytes]:
    if len(data) <= CHUNK:
        pieces: Iterable[bytes] = (data,)  # the common case: no slicing, no copy
    else:
        pieces = (data[start:start + CHUNK] for start in range(0, len(data), CHUNK))
    for piece in pieces:
        counter.bytes += len(piece)
        yield piece
    counter.files += 1
    if after:
        after(member)


def crc32_of(path: Path) -> int:
    crc = 0
    with open(path, "rb") as stream:
        while piece := stream.read(CHUNK):
            crc = zlib.crc32(piece, crc)
    return crc
