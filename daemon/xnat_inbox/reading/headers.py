"""One file's header, for the scan: its kind and, when it is a usable DICOM instance, the values
the later steps need. Headers only: pixel data is never read."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.charset import convert_encodings
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pydicom.values import convert_PN, convert_text

from .rawheader import (
    PIXEL_DATA,
    UNDEFINED,
    PastWindow,
    Unusual,
    elements,
    file_meta,
    has_preamble,
    read_window,
)
from .scanned import FileEntry, Instance, Kind

DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
#: values longer than this (pixel data) are skipped over, never read into memory
DEFER_BYTES = 256
PHI_TAGS = ("PatientName", "PatientID", "PatientBirthDate")
PHI_TAG_NUMBERS = tuple(Tag(keyword) for keyword in PHI_TAGS)
#: what XNAT needs to place an instance
REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
REQUIRED_UIDS = tuple(Tag(keyword) for keyword in REQUIRED)
#: what the scan reads of a file: the UIDs, PHI, series and instance numbers, Modality,
#: SeriesDescription, and SpecificCharacterSet to decode the texts
PLAIN_TAGS = frozenset({*REQUIRED_UIDS, *PHI_TAG_NUMBERS, 0x00080005, 0x00080060, 0x0008103E,
                        0x00200011, 0x00200013})


def read_header(stream: BinaryIO, path: Path, rel: str, size: int, phi: set[str]) -> FileEntry:
    """The header of the file open as `stream` (`path`: where it lies, for the instance)."""
    if (plain := plain_instance(stream, path, rel, size, phi)) is not None:
        return plain
    stream.seek(0)
    preamble = has_preamble(stream.read(132))
    stream.seek(0)
    return pydicom_header(stream, preamble, path, rel, size, phi)


def pydicom_header(stream: BinaryIO, preamble: bool, path: Path, rel: str, size: int,
                   phi: set[str]) -> FileEntry:
    """Any file pydicom can make sense of, with the reason when it can't."""
    try:
        ds = dcmread(stream, defer_size=DEFER_BYTES, force=not preamble)
    except Exception as exc:  # hostile bytes make pydicom raise many kinds of error
        if isinstance(exc, OSError):
            raise
        if not preamble:
            return FileEntry(rel, size, Kind.NOT_DICOM, "not a DICOM file")
        return FileEntry(rel, size, Kind.UNREADABLE, f"corrupt DICOM: {exc}")
    try:  # pydicom converts values lazily: a hostile value raises only when it is read
        return _classify_dataset(ds, path, rel, size, preamble, phi)
    except Exception as exc:
        if isinstance(exc, OSError):
            raise
        kind = Kind.UNREADABLE if preamble else Kind.NOT_DICOM
        return FileEntry(rel, size, kind, f"corrupt DICOM: {exc}" if preamble
                         else "not a DICOM file")


def plain_instance(stream: BinaryIO, path: Path, rel: str, size: int,
                   phi: set[str]) -> FileEntry | None:
    """The usual file read from its raw header: a preamble, little endian, every UID there,
    native pixel data (or none) ending exactly at the end of the file. None for anything else:
    pydicom judges it and words the reason."""
    try:
        _, found = read_window(stream, lambda buf: _plain_values(buf, size))
    except (Unusual, struct.error, UnicodeDecodeError, ValueError):
        return None
    return None if found is None else _plain_entry(found, path, rel, size, phi)


def _plain_entry(found: dict[str, Any], path: Path, rel: str, size: int,
                 phi: set[str]) -> FileEntry:
    phi_values = (found["patient_id"], found.pop("patient_name"), found.pop("birth_date"))
    phi.update(value for value in phi_values if value)
    instance = Instance(path=path, rel=rel, size=size, **found)
    return FileEntry(rel, size, Kind.DICOM, None, instance)


def _plain_values(buf: bytes, size: int) -> dict[str, Any] | None:
    if not has_preamble(buf):
        return None
    meta, at = file_meta(buf)
    syntax = _ascii(meta.get(0x00020010, b""))
    if syntax not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) or \
            _ascii(meta.get(0x00020002, b"")) == DICOMDIR_CLASS:
        return None
    raw: dict[int, bytes] = {}
    end = at
    for tag, value_at, length, end in elements(buf, at, syntax == ImplicitVRLittleEndian):
        if tag in PLAIN_TAGS:
            if end > len(buf):
                raise PastWindow("a value runs past the bytes read")
            raw[tag] = buf[value_at:end]
        if tag == PIXEL_DATA:
            if length == UNDEFINED:
                return None
            break
    if end == len(buf) < size:
        raise PastWindow("the header goes on past the bytes read")
    if end != size:
        return None  # truncated, or elements after the pixel data
    uids = [_ascii(raw.get(tag, b"")) for tag in REQUIRED_UIDS]
    if not all(uids):
        return None
    texts = _decoded_texts(raw)
    number = _ascii(raw.get(0x00200013, b""))
    return {"sop_class_uid": uids[0], "sop_instance_uid": uids[1], "study_uid": uids[2],
            "series_uid": uids[3], "transfer_syntax": syntax,
            "instance_number": int(number) if number else None,
            "series_number": _ascii(raw.get(0x00200011, b"")),
            "modality": _ascii(raw.get(0x00080060, b"")),
            "patient_id": texts[0x00100020], "series_description": texts[0x0008103E],
            "patient_name": texts[0x00100010], "birth_date": texts[0x00100030]}


def _classify_dataset(ds: Dataset, path: Path, rel: str, size: int, preamble: bool,
                      phi: set[str]) -> FileEntry:
    meta = getattr(ds, "file_meta", None)
    media_class = str(meta.get("MediaStorageSOPClassUID", "")) if meta else ""
    if media_class == DICOMDIR_CLASS:
        return FileEntry(rel, size, Kind.JUNK, "DICOMDIR index (not an image)")
    missing = [keyword for keyword in REQUIRED if not _text(ds, keyword)]
    if len(missing) == 4:
        if not preamble:
            return FileEntry(rel, size, Kind.NOT_DICOM, "not a DICOM file")
        return FileEntry(rel, size, Kind.UNREADABLE, "corrupt DICOM: a preamble but no readable "
                         "dataset after it")
    # offsets in a deflated file count inflated bytes: its length can't be checked this way
    if _transfer_syntax(ds) != DeflatedExplicitVRLittleEndian and \
            (short := _truncation(ds, size)) is not None:
        return FileEntry(rel, size, Kind.UNREADABLE, short)
    if missing:
        return FileEntry(rel, size, Kind.UNREADABLE,
                         f"DICOM file without {', '.join(missing)}: XNAT can't place it")
    phi.update(value for tag in PHI_TAGS if (value := _text(ds, tag)))
    instance = Instance(
        path=path,
        rel=rel,
        size=size,
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        sop_class_uid=_text(ds, "SOPClassUID"),
        transfer_syntax=_transfer_syntax(ds),
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        patient_id=_text(ds, "PatientID"),
        instance_number=_int(ds, "InstanceNumber"),
        series_number=_text(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription"),
        modality=_text(ds, "Modality"),
    )
    return FileEntry(rel, size, Kind.DICOM, None, instance)


def _ascii(value: bytes) -> str:
    """A UI, CS, IS or DA value (ASCII by their VR), single-valued (else Unusual), trimmed as
    pydicom trims it and then as the scan does."""
    if b"\\" in value:
        raise Unusual("more than one value")
    return value.decode("ascii").rstrip("\0 ").strip()


def _decoded_texts(raw: dict[int, bytes]) -> dict[int, str]:
    """PatientName, PatientID, PatientBirthDate and SeriesDescription in the file's character
    set, as pydicom decodes them."""
    charset = raw.get(0x00080005, b"").decode("ascii").rstrip("\0 ").strip()
    encodings = convert_encodings(charset.split("\\") if charset else None)
    texts: dict[int, str] = {}
    for tag in (*PHI_TAG_NUMBERS, 0x0008103E):
        value = raw.get(tag, b"")
        if b"\\" in value:
            raise Unusual("more than one value")
        if tag == 0x00100010:
            texts[tag] = str(convert_PN(value, encodings)).strip()
        elif tag == 0x00100030:
            texts[tag] = _ascii(value)
        else:
            texts[tag] = str(convert_text(value, encodings)).strip()
    return texts


def _truncation(ds: Dataset, size: int) -> str | None:
    """Why the file is shorter than its own elements say (a half-written copy), or None."""
    for element in ds._dict.values():
        if isinstance(element, RawDataElement) and element.value is None and \
                element.length != UNDEFINED and \
                element.value_tell + element.length > size:
            missing = element.value_tell + element.length - size
            return (f"truncated: ({element.tag >> 16:04X},{element.tag & 0xFFFF:04X}) needs "
                    f"{missing} more bytes than the file has")
    return None


def _text(ds: object, keyword: str) -> str:
    try:
        value = getattr(ds, keyword, None)
    except Exception:  # a malformed value pydicom can't convert
        return ""
    return "" if value is None else str(value).strip()


def _int(ds: object, keyword: str) -> int | None:
    try:
        return int(getattr(ds, keyword))
    except (AttributeError, TypeError, ValueError):
        return None


def _transfer_syntax(ds: object) -> str:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid:
        return str(uid)
    return ImplicitVRLittleEndian if getattr(ds, "is_implicit_VR", True) else ExplicitVRLittleEndian
