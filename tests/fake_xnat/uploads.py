"""Request bodies, multipart forms, archives and DICOM headers, read as XNAT reads them.

Bodies are streamed to a temp file in 1 MiB pieces (never held whole in memory).
Zip uploads are read with Python's zipfile, plus a check that emulates Java's
ZipInputStream, which XNAT uses and which refuses STORED entries that carry a data
descriptor. A body cut short is read entry by entry from the local headers, the way
ZipInputStream would have consumed it before the connection broke.
"""

from __future__ import annotations

import hashlib
import io
import mmap
import os
import re
import struct
import tarfile
import time
import uuid
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.errors import InvalidDicomError

from .state import Instance, XnatError

CHUNK = 1 << 20
IN_MEMORY_LIMIT = 4 << 20  # archive entries up to this size are parsed from memory
LOCAL_SIG = b"PK\x03\x04"
DESCRIPTOR_SIG = b"PK\x07\x08"
FLAG_DESCRIPTOR = 0x08
FLAG_UTF8 = 0x800
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
ZIP_TYPES = {"application/zip", "application/x-zip", "application/x-zip-compressed"}
TAR_TYPES = {"application/x-tar"}
TGZ_TYPES = {"application/x-gzip", "application/gzip", "application/x-tgz",
             "application/x-compressed-tar"}


class BodyError(Exception):
    """A malformed request body (bad chunk framing)."""


class IncompleteBody(ConnectionError):
    """The client closed the connection before the body was complete."""


class BodyReader:
    """Reads one request body, chunked or with Content-Length, in pieces of at most 1 MiB."""

    def __init__(self, rfile: BinaryIO, headers: object):
        get = headers.get  # type: ignore[attr-defined]
        self.rfile = rfile
        self.chunked = "chunked" in str(get("Transfer-Encoding", "")).lower()
        try:
            self.remaining = 0 if self.chunked else int(get("Content-Length") or 0)
        except ValueError as exc:
            raise BodyError("bad Content-Length") from exc
        self.done = not self.chunked and self.remaining == 0
        self.received = 0
        self.done_at: float | None = None  # time.monotonic() when the last byte was read

    def chunks(self, limit: int | None = None) -> Iterator[bytes]:
        """Yield body pieces; stop after `limit` bytes if given (the rest stays unread)."""
        source = self._chunked() if self.chunked else self._sized()
        start = self.received
        for piece in source:
            over = -1 if limit is None else self.received - start - limit
            if over >= 0:
                self.received -= over  # what lies past the limit counts as never read
                yield piece[:len(piece) - over]
                return
            yield piece

    def _sized(self) -> Iterator[bytes]:
        while self.remaining > 0:
            piece = self.rfile.read(min(CHUNK, self.remaining))
            if not piece:
                raise IncompleteBody("client closed the connection mid-body")
            self.remaining -= len(piece)
            self.received += len(piece)
            if self.remaining == 0:
                self._finished()
            yield piece
        self._finished()

    def _chunked(self) -> Iterator[bytes]:
        while not self.done:
            line = self.rfile.readline(1024)
            if not line:
                raise IncompleteBody("client closed the connection mid-body")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError as exc:
                raise BodyError(f"bad chunk size line {line[:40]!r}") from exc
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                self._finished()
                return
            while size > 0:
                piece = self.rfile.read(min(CHUNK, size))
                if not piece:
                    raise IncompleteBody("client closed the connection mid-chunk")
                size -= len(piece)
                self.received += len(piece)
                yield piece
            if self.rfile.readline(1024) not in (b"\r\n", b"\n"):
                raise BodyError("chunk not followed by CRLF")

    def _finished(self) -> None:
        if self.done_at is None:
            self.done_at = time.monotonic()
        self.done = True

    def read_all(self, cap: int) -> bytes:
        buf = bytearray()
        for piece in self.chunks():
            buf += piece
            if len(buf) > cap:
                raise BodyError("body too large for this endpoint")
        return bytes(buf)

    def drain(self) -> None:
        for _ in self.chunks():
            pass


class HashingWriter:
    """Writes through to a file and keeps the MD5 of what went by: the fake catalogs each
    file's digest from the bytes it writes, never by reading the file again."""

    def __init__(self, out: BinaryIO):
        self.out = out
        self.md5 = hashlib.md5()

    def write(self, data: bytes) -> int:
        self.md5.update(data)
        return self.out.write(data)

    def hexdigest(self) -> str:
        return self.md5.hexdigest()


def save_body(body: BodyReader, out: BinaryIO | HashingWriter, limit: int | None) -> bool:
    """Copy the body into `out`. False: it stopped early (drop limit, or the client left)."""
    try:
        for piece in body.chunks(limit):
            out.write(piece)
    except IncompleteBody:
        return False
    return limit is None and body.done


# ---- multipart -------------------------------------------------------------------------

@dataclass
class Part:
    name: str
    filename: str | None
    content_type: str
    start: int
    end: int


def boundary_of(content_type: str) -> str:
    m = re.search(r'boundary=(?:"([^"]+)"|([^;\s]+))', content_type, re.IGNORECASE)
    if not m:
        raise XnatError(400, "multipart/form-data without a boundary")
    return m.group(1) or m.group(2)


def split_multipart(path: Path, boundary: str) -> list[Part]:
    """Locate the parts of a multipart body saved in `path` (a truncated last part is kept)."""
    size = path.stat().st_size
    if size == 0:
        return []
    delim = b"--" + boundary.encode("latin-1")
    parts: list[Part] = []
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        pos = mm.find(delim)
        while pos >= 0:
            pos += len(delim)
            if mm[pos:pos + 2] == b"--":
                break
            head_end = mm.find(b"\r\n\r\n", pos)
            if head_end < 0:
                break
            headers = mm[pos:head_end].decode("latin-1")
            start = head_end + 4
            nxt = mm.find(b"\r\n" + delim, start)
            end = size if nxt < 0 else nxt
            parts.append(_part(headers, start, end))
            pos = -1 if nxt < 0 else nxt + 2
    return parts


def _part(headers: str, start: int, end: int) -> Part:
    disp = re.search(r"(?im)^content-disposition:(.*)$", headers)
    ctype = re.search(r"(?im)^content-type:\s*(.*?)\s*$", headers)
    text = disp.group(1) if disp else ""
    name = re.search(r'\bname="([^"]*)"', text)
    filename = re.search(r'\bfilename="([^"]*)"', text)
    return Part(name=name.group(1) if name else "",
                filename=filename.group(1) if filename else None,
                content_type=ctype.group(1) if ctype else "", start=start, end=end)


def read_range(path: Path, start: int, end: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def copy_range(src: Path, start: int, end: int, dst: Path) -> None:
    """Copy bytes [start, end) of src into dst (in the kernel where it can)."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        offset, left = start, end - start
        try:
            while left > 0:
                n = os.copy_file_range(fi.fileno(), fo.fileno(), min(left, 1 << 30), offset)
                if n <= 0:
                    break
                offset += n
                left -= n
        except OSError:
            fi.seek(offset)
            while left > 0 and (piece := fi.read(min(CHUNK, left))):
                fo.write(piece)
                left -= len(piece)


# ---- formats and archives --------------------------------------------------------------

def format_of(content_type: str, filename: str | None = None) -> str:
    """zip, tar, tgz or UNKNOWN, from a file name (multipart) or else a content type."""
    name = (filename or "").lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith((".tar.gz", ".tgz", ".gz")):
        return "tgz"
    if name.endswith(".tar"):
        return "tar"
    ctype = content_type.split(";", 1)[0].strip().lower()
    if ctype in ZIP_TYPES:
        return "zip"
    if ctype in TAR_TYPES:
        return "tar"
    return "tgz" if ctype in TGZ_TYPES else "UNKNOWN"


@dataclass
class Entry:
    """One file from an upload: small ones in memory, large ones in a temp file.

    digest: the MD5 of a file written to `path`, taken while it was written (files in
    memory are hashed from `data` when filed).
    """

    name: str
    data: bytes | None = None
    path: Path | None = None
    digest: str | None = None

    def discard(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def iter_entries(fmt: str, path: Path, work: Path, complete: bool,
                 digest: str | None = None) -> Iterator[Entry]:
    """The files of an upload in the order XNAT's importer sees them. digest: the MD5 of
    the body, when it was hashed as it was saved (a gradual-DICOM upload is one file)."""
    if fmt == "DICOM":
        yield _whole_file("upload.dcm", path, work, digest)
    elif fmt == "zip":
        yield from _iter_zip(path, work, complete)
    else:
        yield from _iter_tar(path, work, complete)


def _whole_file(name: str, path: Path, work: Path, digest: str | None) -> Entry:
    if path.stat().st_size <= IN_MEMORY_LIMIT:
        return Entry(name, data=path.read_bytes())
    target = work / uuid.uuid4().hex
    os.replace(path, target)
    return Entry(name, path=target, digest=digest)


def _copy_hashed(src: BinaryIO, target: Path) -> str:
    """Copy a stream into a new file; the MD5 of the bytes copied."""
    with open(target, "wb") as dst:
        out = HashingWriter(dst)
        while piece := src.read(CHUNK):
            out.write(piece)
    return out.hexdigest()


def _iter_zip(path: Path, work: Path, complete: bool) -> Iterator[Entry]:
    if not complete:
        yield from iter_zip_sequential(path, work, strict=False)
        return
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        # No central directory: ZipInputStream never needed one, so read the local headers.
        yield from iter_zip_sequential(path, work, strict=True)
        return
    with zf, open(path, "rb") as raw:
        for info in sorted(zf.infolist(), key=lambda i: i.header_offset):
            check_local_header(raw, info.header_offset)
            if info.is_dir():
                continue
            yield _zip_member(zf, info, work)


def check_local_header(raw: BinaryIO, offset: int) -> None:
    """Refuse what java.util.zip.ZipInputStream refuses (XNAT reads uploads with it)."""
    raw.seek(offset)
    head = raw.read(30)
    if len(head) < 30 or head[:4] != LOCAL_SIG:
        raise XnatError(400, "invalid LOC header (bad signature)")
    flags, method = struct.unpack("<HH", head[6:10])
    if method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise XnatError(400, f"invalid compression method {method}")
    if method == zipfile.ZIP_STORED and flags & FLAG_DESCRIPTOR:
        raise XnatError(400, "only DEFLATED entries can have EXT descriptor")


def _zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, work: Path) -> Entry:
    try:
        if info.file_size <= IN_MEMORY_LIMIT:
            return Entry(info.filename, data=zf.read(info))
        target = work / uuid.uuid4().hex
        with zf.open(info) as src:
            digest = _copy_hashed(src, target)
        return Entry(info.filename, path=target, digest=digest)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise XnatError(400, f"unable to read zip entry {info.filename}: {exc}") from exc


def iter_zip_sequential(path: Path, work: Path, strict: bool) -> Iterator[Entry]:
    """Read entries from local headers like ZipInputStream; stop at the first broken one.

    strict: a broken entry is a 400 (complete upload); otherwise the entries read so far
    are all there is (a dropped upload).
    """
    with open(path, "rb") as f:
        while True:
            offset = f.tell()
            head = f.read(4)
            if head != LOCAL_SIG:
                return  # central directory or end of data: ZipInputStream stops here too
            try:
                check_local_header(f, offset)
                entry = _read_local_entry(f, offset, work)
            except (XnatError, EOFError, zlib.error, struct.error, UnicodeDecodeError) as exc:
                if strict:
                    raise exc if isinstance(exc, XnatError) else XnatError(
                        400, f"Unexpected end of ZLIB input stream ({exc})") from exc
                return
            if entry is not None:
                yield entry


def _read_local_entry(f: BinaryIO, offset: int, work: Path) -> Entry | None:
    f.seek(offset)
    fields = struct.unpack("<4sHHHHHIIIHH", _exact(f, 30))
    flags, method, csize, usize, nlen, elen = (fields[2], fields[3], fields[7], fields[8],
                                               fields[9], fields[10])
    raw_name = _exact(f, nlen)
    extra = _exact(f, elen)
    name = raw_name.decode("utf-8" if flags & FLAG_UTF8 else "cp437")
    if csize == 0xFFFFFFFF or usize == 0xFFFFFFFF:
        usize, csize = _zip64_sizes(extra, usize, csize)
    target = work / uuid.uuid4().hex
    with open(target, "wb") as raw_out:
        out = HashingWriter(raw_out)
        if flags & FLAG_DESCRIPTOR:
            _inflate_until_end(f, out)
            _skip_descriptor(f)
        else:
            _copy_sized(f, out, csize, method)
    if name.endswith("/"):
        target.unlink()
        return None
    if target.stat().st_size <= IN_MEMORY_LIMIT:
        data = target.read_bytes()
        target.unlink()
        return Entry(name, data=data)
    return Entry(name, path=target, digest=out.hexdigest())


def _exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise EOFError("truncated zip")
    return data


def _zip64_sizes(extra: bytes, usize: int, csize: int) -> tuple[int, int]:
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack("<HH", extra[pos:pos + 4])
        if tag == 0x0001:
            values = list(struct.unpack(f"<{size // 8}Q", extra[pos + 4:pos + 4 + size // 8 * 8]))
            if usize == 0xFFFFFFFF and values:
                usize = values.pop(0)
            if csize == 0xFFFFFFFF and values:
                csize = values.pop(0)
            break
        pos += 4 + size
    return usize, csize


def _copy_sized(f: BinaryIO, out: HashingWriter, csize: int, method: int) -> None:
    inflater = zlib.decompressobj(-15) if method == zipfile.ZIP_DEFLATED else None
    left = csize
    while left > 0:
        piece = f.read(min(CHUNK, left))
        if not piece:
            raise EOFError("truncated zip entry")
        left -= len(piece)
        out.write(inflater.decompress(piece) if inflater else piece)
    if inflater is not None:
        out.write(inflater.flush())
        if not inflater.eof:
            raise EOFError("truncated deflate stream")


def _inflate_until_end(f: BinaryIO, out: HashingWriter) -> None:
    """A deflated entry of unknown size ends where its deflate stream ends."""
    inflater = zlib.decompressobj(-15)
    while not inflater.eof:
        piece = f.read(CHUNK)
        if not piece:
            raise EOFError("truncated deflate stream")
        out.write(inflater.decompress(piece))
    f.seek(-len(inflater.unused_data), io.SEEK_CUR)


def _skip_descriptor(f: BinaryIO) -> None:
    first = _exact(f, 4)
    if first == DESCRIPTOR_SIG:
        _exact(f, 4)  # CRC
    _exact(f, 8)  # 32-bit sizes
    peek = f.read(4)
    if peek and not peek.startswith(b"PK"):
        f.seek(4, io.SEEK_CUR)  # ZIP64 descriptor: 8-byte sizes
    else:
        f.seek(-len(peek), io.SEEK_CUR)


def _iter_tar(path: Path, work: Path, complete: bool) -> Iterator[Entry]:
    try:
        with tarfile.open(path, "r:*") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                src = tf.extractfile(member)
                if src is None:
                    continue
                if member.size <= IN_MEMORY_LIMIT:
                    entry = Entry(member.name, data=src.read())
                else:
                    target = work / uuid.uuid4().hex
                    entry = Entry(member.name, path=target,
                                  digest=_copy_hashed(src, target))
                yield entry
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        if complete:
            raise XnatError(400, f"unable to read archive: {exc}") from exc


# ---- DICOM -----------------------------------------------------------------------------

class Unparsable(Exception):
    """Not a DICOM object (XNAT: 'unable to read DICOM object X')."""


def read_instance(entry: Entry) -> Instance:
    """The header fields the importer needs; Unparsable if the entry isn't DICOM."""
    head = entry.data[:132] if entry.data is not None else _head(entry.path)
    if len(head) >= 132 and head[128:132] == b"DICM":
        force = False
    elif _raw_dicom_start(head):
        force = True  # no preamble: dcm4che reads these, so XNAT does too
    else:
        raise Unparsable(entry.name)
    source: BinaryIO | Path = io.BytesIO(entry.data) if entry.data is not None else \
        entry.path  # type: ignore[assignment]
    try:
        ds = pydicom.dcmread(source, stop_before_pixels=True, force=force)
        inst = _instance_of(ds)
    except (InvalidDicomError, ValueError, KeyError, TypeError, EOFError, OSError,
            struct.error, AttributeError) as exc:
        raise Unparsable(entry.name) from exc
    if inst is None:
        raise Unparsable(entry.name)
    for value, what in ((inst.sop_class_uid, "SOP Class UID"),
                        (inst.sop_uid, "SOP Instance UID"),
                        (inst.study_uid, "Study Instance UID")):
        if not value:
            raise XnatError(400, f"no {what} in {entry.name}")
    return inst


def _head(path: Path | None) -> bytes:
    if path is None:
        return b""
    with open(path, "rb") as f:
        return f.read(132)


def _raw_dicom_start(head: bytes) -> bool:
    if len(head) < 8:
        return False
    group, _element = struct.unpack("<HH", head[:4])
    return group in (0x0002, 0x0008)


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _instance_of(ds: pydicom.Dataset) -> Instance | None:
    meta = getattr(ds, "file_meta", None)
    if meta is not None and _text(meta, "MediaStorageSOPClassUID") == DICOMDIR_CLASS:
        return None  # a DICOMDIR is no image: XNAT can't file it
    return Instance(
        sop_class_uid=_text(ds, "SOPClassUID"), sop_uid=_text(ds, "SOPInstanceUID"),
        study_uid=_text(ds, "StudyInstanceUID"), series_uid=_text(ds, "SeriesInstanceUID"),
        series_number=_text(ds, "SeriesNumber"), instance_number=_text(ds, "InstanceNumber"),
        patient_id=_text(ds, "PatientID"), patient_name=_text(ds, "PatientName"),
        modality=_text(ds, "Modality"), series_description=_text(ds, "SeriesDescription"),
        study_date=_text(ds, "StudyDate"), study_time=_text(ds, "StudyTime"),
        routing=header_routing(ds))


def header_routing(ds: pydicom.Dataset) -> tuple[str, str, str]:
    """Project/subject/session from the headers, as XNAT's DICOM routing rules read them."""
    desc = _text(ds, "StudyDescription")
    m = re.match(r"xnat://([^/]*)/([^/]*)/([^/]*)$", desc)
    if m:  # the site's custom rule
        return m.group(1), m.group(2), m.group(3)
    for keyword in ("PatientComments", "StudyComments"):
        found = {k.lower(): v for k, v in re.findall(
            r"(?i)\b(project|subject|session)\s*:\s*([^\s,;]+)", _text(ds, keyword))}
        if found:
            return found.get("project", ""), found.get("subject", ""), found.get("session", "")
    return "", "", ""
