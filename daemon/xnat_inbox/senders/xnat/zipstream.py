"""A zip of original DICOM files, produced as chunks while it is uploaded: nothing of it is
written to disk or held whole in memory.

XNAT reads uploads with Java's ZipInputStream, which refuses a STORED entry followed by a data
descriptor. So STORED entries get their CRC and size in the local header. A file up to
WHOLE_READ bytes (every ordinary DICOM instance) is read once, whole, and its CRC and data come
from that one read, so they always agree; a bigger one is read twice, first for the CRC (the
second read, while sending, comes from the page cache). DEFLATE entries may use data
descriptors and are read once.

STORED zips (the default) are framed here, not by stream-zip: each file's bytes go out as
they were read, with no copy into even-sized blocks and no second CRC pass (stream-zip
checks the CRC it was promised by computing it again, which a whole-read file, CRC and bytes
from one read, doesn't need; a big file read twice is still checked, as it is sent). Those
two passes were about half of the sender's CPU per upload. DEFLATE zips use stream-zip.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian
from stream_zip import ZIP_32, ZIP_64, stream_zip

from ...reading.dataset import ElementTooLarge, check_decodable, read_dataset
from ...reading.trailer import tail_offset
from ..transcode import (
    PIXEL_DATA,
    Decoded,
    TranscodeRefused,
    decode,
    is_uncompressed,
    pixel_element,
    pixels_decoded,
    to_little_endian,
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
    """One zip entry: a stable name (a retry must repeat it, so XNAT merges) and its file,
    opened by `opener` when given (the file as the scan saw it, see Instance.open)."""

    name: str
    path: Path
    size: int
    transform: Transform | None = None
    opener: Callable[[], BinaryIO] | None = None
    syntax: str = ""  # the file's transfer syntax
    #: `transcode: uncompressed`: a file not little endian goes as Explicit VR Little Endian,
    #: its pixel data decoded if at most this many bytes (None: every file as it is)
    decode_max: int | None = None

    def open(self) -> BinaryIO:
        return self.opener() if self.opener is not None else open(self.path, "rb")

    @property
    def rewritten(self) -> bool:
        """Whether the entry is a rewritten copy (de-identified, or converted), not the file."""
        return self.transform is not None or self.converted

    @property
    def converted(self) -> bool:
        return self.decode_max is not None and bool(self.syntax) \
            and not is_uncompressed(self.syntax)


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
    if compression == "deflate":
        entries = (_entry(member, big, counter, after_member, should_stop) for member in members)
        chunks: Iterable[bytes] = stream_zip(
            entries, chunk_size=CHUNK,
            get_compressobj=lambda: zlib.compressobj(1, zlib.DEFLATED, -15))
    else:
        chunks = _stored_zip(members, big, counter, after_member, should_stop)
    for chunk in chunks:
        counter.zip_bytes += len(chunk)
        yield chunk


def _entry(member: Member, big: bool, counter: Counter, after: Hook | None,
           should_stop: Callable[[], bool] | None) -> tuple[str, datetime, int, object,
                                                             Iterable[bytes]]:
    """One DEFLATE entry for stream-zip (with a data descriptor: each file is read once)."""
    if should_stop and should_stop():
        raise StopUpload("stop requested")
    method = ZIP_64 if big else ZIP_32
    if member.rewritten:
        data, modified = _transformed(member)
        return member.name, modified, MODE, method, _counted(_all_pieces(data), member, counter,
                                                             after)
    try:
        stream = member.open()
    except OSError as exc:
        raise LocalFileError(f"cannot read {member.name}: {exc.strerror}") from None
    modified = datetime.fromtimestamp(os.fstat(stream.fileno()).st_mtime)
    pieces = _counted(_file_pieces(member, stream), member, counter, after)
    return member.name, modified, MODE, method, pieces


LOCAL = struct.Struct("<4sHHHHHIIIHH")
CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
ZIP64_LOCAL_EXTRA = struct.Struct("<HHQQ")  # tag 1: uncompressed, compressed size
ZIP64_CENTRAL_EXTRA = struct.Struct("<HHQQQ")  # tag 1: both sizes, local header offset
END64 = struct.Struct("<4sQHHIIQQQQ")
END64_LOCATOR = struct.Struct("<4sIQI")
END = struct.Struct("<4sHHHHIIH")
UTF8 = 0x0800  # names are UTF-8
MADE_BY_UNIX = 3 << 8


def _stored_zip(members: list[Member], big: bool, counter: Counter, after: Hook | None,
                should_stop: Callable[[], bool] | None) -> Iterator[bytes]:
    """A zip of STORED entries, each with its CRC and sizes in the local header (what Java's
    ZipInputStream accepts), zip64 throughout when `big`; the central directory at the end."""
    version = 45 if big else 20
    offset = 0
    central: list[bytes] = []
    for member in members:
        if should_stop and should_stop():
            raise StopUpload("stop requested")
        size, crc, modified, pieces = _stored_source(member)
        dos_time, dos_date = _dos(modified)
        name = member.name.encode()
        sizes = 0xFFFF_FFFF if big else size
        extra = ZIP64_LOCAL_EXTRA.pack(1, 16, size, size) if big else b""
        header = LOCAL.pack(b"PK\x03\x04", version, UTF8, 0, dos_time, dos_date, crc, sizes,
                            sizes, len(name), len(extra)) + name + extra
        yield header
        yield from _counted(pieces, member, counter, after)
        extra = ZIP64_CENTRAL_EXTRA.pack(1, 24, size, size, offset) if big else b""
        central.append(CENTRAL.pack(
            b"PK\x01\x02", MADE_BY_UNIX | version, version, UTF8, 0, dos_time, dos_date, crc,
            sizes, sizes, len(name), len(extra), 0, 0, 0, MODE << 16,
            0xFFFF_FFFF if big else offset) + name + extra)
        offset += len(header) + size
    directory = b"".join(central)
    count = len(central)
    tail = b""
    if big or count >= 0xFFFF:
        tail = END64.pack(b"PK\x06\x06", 44, MADE_BY_UNIX | 45, 45, 0, 0, count, count,
                          len(directory), offset) + END64_LOCATOR.pack(
            b"PK\x06\x07", 0, offset + len(directory), 1)
    yield directory + tail + END.pack(
        b"PK\x05\x06", 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
        min(len(directory), 0xFFFF_FFFF), 0xFFFF_FFFF if big else offset, 0)


def _stored_source(member: Member) -> tuple[int, int, datetime, Iterable[bytes]]:
    """Size, CRC, mtime and the bytes of one STORED entry."""
    if member.rewritten:
        data, modified = _transformed(member)
        crc = 0
        for piece in data:
            crc = zlib.crc32(piece, crc)
        return sum(len(piece) for piece in data), crc, modified, _all_pieces(data)
    try:
        if member.size <= WHOLE_READ:
            data, modified = _read_whole(member)
            return member.size, zlib.crc32(data), modified, _pieces(data)
        crc, modified = crc_and_mtime(member)
    except OSError as exc:
        raise LocalFileError(f"cannot read {member.name}: {exc.strerror}") from None
    return member.size, crc, modified, _checked(member, crc)


def _all_pieces(data: list[bytes | memoryview]) -> Iterator[bytes]:
    """A rewritten copy's parts in CHUNK pieces, as bytes (the HTTP stack's and zlib's type)."""
    for part in data:
        if isinstance(part, bytes):
            yield from _pieces(part)
        else:
            for start in range(0, len(part), CHUNK):
                yield bytes(part[start:start + CHUNK])


def _pieces(data: bytes) -> Iterable[bytes]:
    if len(data) <= CHUNK:
        return (data,)  # the common case: no slicing, no copy
    return (data[start:start + CHUNK] for start in range(0, len(data), CHUNK))


def _checked(member: Member, crc: int) -> Iterator[bytes]:
    """A big file's second read, checked against the size and CRC its header promised."""
    actual = 0
    for piece in _file_pieces(member):
        actual = zlib.crc32(piece, actual)
        yield piece
    if actual != crc:
        raise LocalFileError(f"{member.name} changed while being sent (its CRC differs "
                             "from the first read's)")


def _file_pieces(member: Member, opened: BinaryIO | None = None) -> Iterator[bytes]:
    """The file (`opened` already, or opened now) in CHUNK pieces; LocalFileError when it
    can't be read or its size is no longer the one the scan saw (nothing past that size is
    sent)."""
    size = 0
    try:
        with opened or member.open() as stream:
            while piece := stream.read(CHUNK):
                size += len(piece)
                if size > member.size:
                    break
                yield piece
    except OSError as exc:
        raise LocalFileError(f"cannot read {member.name}: {exc.strerror}") from None
    if size != member.size:
        raise LocalFileError(f"{member.name} changed size while being sent "
                             f"({member.size} -> {size} bytes)")


def _dos(modified: datetime) -> tuple[int, int]:
    """MS-DOS time and date (2-second resolution, 1980 to 2107)."""
    t = min(max(modified, datetime(1980, 1, 1)), datetime(2107, 12, 31, 23, 59, 58))
    return (t.hour << 11 | t.minute << 5 | t.second // 2,
            (t.year - 1980) << 9 | t.month << 5 | t.day)


def _read_whole(member: Member) -> tuple[bytes, datetime]:
    """The file's bytes and mtime, checked against the size the scan saw (one read; OSError
    passes)."""
    with member.open() as stream:
        modified = datetime.fromtimestamp(os.fstat(stream.fileno()).st_mtime)
        data = stream.read(member.size + 1)  # one byte more reveals a file that grew
    if len(data) != member.size:
        now = f"{len(data)}" if len(data) < member.size else f"over {member.size}"
        raise LocalFileError(f"{member.name} changed size while being sent "
                             f"({member.size} -> {now} bytes)")
    return data, modified


def _counted(pieces: Iterable[bytes], member: Member, counter: Counter,
             after: Hook | None) -> Iterator[bytes]:
    """An entry's bytes, counted as they go out; `after` once the last has gone."""
    for piece in pieces:
        counter.bytes += len(piece)
        yield piece
    counter.files += 1
    if after:
        after(member)


def _transformed(member: Member) -> tuple[list[bytes | memoryview], datetime]:
    """The rewritten copy's bytes (read with pydicom, converted where asked, transformed,
    written to memory; decoded pixel data kept in its own buffer) and the original's mtime."""
    what = "de-identify" if member.transform is not None else "decode"
    try:
        with member.open() as stream:
            modified = datetime.fromtimestamp(os.fstat(stream.fileno()).st_mtime)
            dataset = read_dataset(stream, whole=True)
            check_decodable(dataset)
            decoded = _converted(member, dataset) if member.converted else None
            if member.transform is not None:
                member.transform(dataset)
            check_decodable(dataset)
            data = _encoded(dataset, decoded, member.converted)
    except OSError as exc:
        raise LocalFileError(f"cannot read {member.name}: {exc.strerror}") from None
    except (ElementTooLarge, TranscodeRefused) as exc:
        raise LocalFileError(f"cannot {what} {member.name}: {exc}") from None
    except Exception as exc:  # pydicom's errors on a file it can't rewrite
        raise LocalFileError(f"cannot {what} {member.name}: {type(exc).__name__}") from None
    return data, modified


def _converted(member: Member, dataset: Dataset) -> Decoded | None:
    """A file that isn't little endian made Explicit VR Little Endian: its pixel data decoded
    (returned apart) where big endian or compressed, within member.decode_max."""
    assert member.decode_max is not None
    decoded = None
    if pixels_decoded(member.syntax) and "PixelData" in dataset:
        decoded = decode(dataset, member.syntax, member.decode_max)
    if member.syntax == ExplicitVRBigEndian:
        to_little_endian(dataset)
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return decoded


def _encoded(dataset: Dataset, decoded: Decoded | None, converted: bool
             ) -> list[bytes | memoryview]:
    """A Part 10 file of the dataset: in its own syntax, or converted to Explicit VR Little
    Endian (pydicom's save_as won't turn big endian into little), decoded pixel data apart."""
    if not converted:
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        return [buffer.getvalue()]
    meta = DicomBytesIO()
    meta.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(meta, dataset.file_meta, enforce_standard=True)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, dataset)
    encoded = body.getvalue()
    if decoded is None:
        return [meta.getvalue() + encoded]
    cut = tail_offset(encoded, dataset.keys(), PIXEL_DATA, False, True)
    pixels = decoded.pixels
    return [meta.getvalue() + encoded[:cut]
            + pixel_element(ExplicitVRLittleEndian, decoded.vr, len(pixels)),
            memoryview(pixels), encoded[cut:]]


def crc_and_mtime(member: Member) -> tuple[int, datetime]:
    """A big file's first read: its CRC, and its mtime from the same open file."""
    crc = 0
    with member.open() as stream:
        modified = datetime.fromtimestamp(os.fstat(stream.fileno()).st_mtime)
        while piece := stream.read(CHUNK):
            crc = zlib.crc32(piece, crc)
    return crc, modified
