"""A corpus of bad and odd drops, generated (never checked in), each with the outcome it must
get: `done` (sent), `failed` (in failed/ with a reason naming the file), or `stays` (left in
the inbox, the log says why)."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

from xnat_inbox.commands.synthetic import Patient, SeriesSpec, write_session

Build = Callable[[Path, Path], None]  # (drop path to create, a scratch folder outside)


@dataclass
class Case:
    name: str
    build: Build
    outcome: str  # done | failed | stays
    reason: str = ""  # text the report's reasons (or the log, for stays) must contain
    stored: int | None = None  # instances the receiver must get from this drop
    kinds: dict[str, str] = field(default_factory=dict)  # file -> kind in the report
    parent: str = ""  # a routing folder the drop is copied into
    archive: str = ""  # the drop is this archive file (name with suffix)

    @property
    def drop_name(self) -> str:
        return self.archive or self.name


def one(count: int = 2, **options: object) -> Build:
    def build(drop: Path, _: Path) -> None:
        write_session(drop, series=(SeriesSpec("T1", count),), **options)  # type: ignore[arg-type]
    return build


def with_extra(count: int, extra_files: dict[str, bytes]) -> Build:
    def build(drop: Path, scratch: Path) -> None:
        one(count)(drop, scratch)
        for name, data in extra_files.items():
            (drop / name).parent.mkdir(parents=True, exist_ok=True)
            (drop / name).write_bytes(data)
    return build


def edited(count: int, change: Callable[[list[Path]], None]) -> Build:
    def build(drop: Path, _: Path) -> None:
        session = write_session(drop, series=(SeriesSpec("T1", count),), layout="flat")
        change(sorted(session.files))
    return build


def _drop_element(keyword: str) -> Callable[[list[Path]], None]:
    def change(files: list[Path]) -> None:
        ds = dcmread(files[0])
        delattr(ds, keyword)
        ds.save_as(files[0])
    return change


def _truncate(files: list[Path]) -> None:
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) - 500])


def _garble(files: list[Path]) -> None:
    files[0].write_bytes(b"\0" * 128 + b"DICM" + os.urandom(64))


def _no_preamble(drop: Path, scratch: Path) -> None:
    session = write_session(drop, series=(SeriesSpec("T1", 2),), layout="flat",
                            transfer_syntax=ImplicitVRLittleEndian)
    for path in session.files:
        ds = dcmread(path)
        path.unlink()
        ds.save_as(path.with_suffix(""), enforce_file_format=False, implicit_vr=True,
                   little_endian=True)


def _compressed(syntax: str, image_format: str) -> Build:
    def build(drop: Path, _: Path) -> None:
        session = write_session(drop, series=(SeriesSpec("T1", 2),), layout="flat")
        for path in session.files:
            ds = dcmread(path)
            frame = io.BytesIO()
            Image.new("L", (ds.Columns, ds.Rows), 90).save(
                frame, format=image_format, **({"no_jp2": True} if image_format == "JPEG2000"
                                               else {}))
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
            ds.PixelData = encapsulate([frame.getvalue()])
            ds["PixelData"].VR = "OB"
            ds.file_meta.TransferSyntaxUID = syntax
            ds.save_as(path, enforce_file_format=True)
    return build


def _duplicate(identical: bool) -> Build:
    def build(drop: Path, _: Path) -> None:
        session = write_session(drop, series=(SeriesSpec("T1", 2),), layout="flat")
        copy = drop / "copy-of-first.dcm"
        shutil.copy(session.files[0], copy)
        if not identical:
            ds = dcmread(copy)
            ds.InstanceNumber = 99
            ds.save_as(copy)
    return build


def _two_patients(drop: Path, _: Path) -> None:
    first = write_session(drop / "a", series=(SeriesSpec("T1", 1),), patient=Patient("PA"))
    write_session(drop / "b", series=(SeriesSpec("T2", 1),), patient=Patient("PB"),
                  study_uid=first.study_uid)


SPLIT_STUDY = generate_uid()


def _split_half(series: str) -> Build:
    def build(drop: Path, _: Path) -> None:
        write_session(drop, series=(SeriesSpec(series, 2),), study_uid=SPLIT_STUDY,
                      patient=Patient("SPLIT01"))
    return build


def _names(names: list[str]) -> Build:
    def build(drop: Path, _: Path) -> None:
        session = write_session(drop, series=(SeriesSpec("T1", len(names)),), layout="flat")
        for path, name in zip(session.files, names, strict=True):
            target = drop / name
            target.parent.mkdir(parents=True, exist_ok=True)
            path.rename(target)
    return build


def _long_path(total: int) -> Build:
    def build(drop: Path, _: Path) -> None:
        session = write_session(drop, series=(SeriesSpec("T1", 1),), layout="flat")
        # the drop will sit at <inbox>/long_path: aim the file's full path there at `total`
        room = total - len(str(drop)) - len("/IM.dcm")
        parts = [("d" * 200)[: min(200, room - 1 - i * 201)] for i in range(room // 201 + 1)]
        folder = drop.joinpath(*[p for p in parts if p])
        folder.mkdir(parents=True)
        session.files[0].rename(folder / "IM.dcm")
    return build


def _deep(levels: int) -> Build:
    def build(drop: Path, _: Path) -> None:
        session = write_session(drop, series=(SeriesSpec("T1", 1),), layout="flat")
        folder = drop.joinpath(*[f"l{i}" for i in range(levels)])
        folder.mkdir(parents=True)
        session.files[0].rename(folder / "IM.dcm")
    return build


def _empty_folders(with_dicom: bool) -> Build:
    def build(drop: Path, scratch: Path) -> None:
        if with_dicom:
            one(2)(drop, scratch)
        for sub in ("empty/a", "empty/b/c"):
            (drop / sub).mkdir(parents=True)
    return build


def _dicomdir(drop: Path, scratch: Path) -> None:
    one(2)(drop, scratch)
    ds = dcmread(next(drop.rglob("*.dcm")))
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    ds.SOPClassUID = "1.2.840.10008.1.3.10"
    ds.save_as(drop / "DICOMDIR")


def _symlink_out(drop: Path, scratch: Path) -> None:
    one(2)(drop, scratch)
    outside = write_session(scratch / "outside", series=(SeriesSpec("X", 1),), layout="flat")
    (drop / "link-outside.dcm").symlink_to(outside.files[0])


def _symlink_loop(drop: Path, scratch: Path) -> None:
    one(2)(drop, scratch)
    (drop / "loop-a").symlink_to("loop-b")
    (drop / "loop-b").symlink_to("loop-a")


def _fifo(drop: Path, scratch: Path) -> None:
    one(2)(drop, scratch)
    os.mkfifo(drop / "a-fifo")


def _unreadable(drop: Path, scratch: Path) -> None:
    session = write_session(drop, series=(SeriesSpec("T1", 2),), layout="flat")
    os.chmod(session.files[0], 0)


def _labels(extra: dict[str, object]) -> Build:
    def build(drop: Path, _: Path) -> None:
        write_session(drop, series=(SeriesSpec("T1", 1),), extra=extra)
    return build


Entries = Callable[[Path, Path], list[tuple[str, Path | bytes]]]


def _archive(kind: str, entries: Entries | None = None,
             compression: int = zipfile.ZIP_DEFLATED) -> Build:
    """An archive at `drop` (a file) holding a session, or the given (name, file|bytes) entries."""
    def build(drop: Path, scratch: Path) -> None:
        if entries is None:
            content = scratch / f"content-{drop.name}"
            session = write_session(content, series=(SeriesSpec("T1", 3),))
            items: list[tuple[str, Path | bytes]] = [
                (str(p.relative_to(content)), p) for p in session.files]
        else:
            items = entries(drop, scratch)
        if kind == "zip":
            with zipfile.ZipFile(drop, "w", compression) as zf:
                for name, item in items:
                    zf.writestr(zipfile.ZipInfo(name), item if isinstance(item, bytes)
                                else item.read_bytes(), compress_type=compression)
        else:
            mode = {"tar": "w", "tar.gz": "w:gz", "tgz": "w:gz"}[kind]
            with tarfile.open(drop, mode) as tf:
                for name, item in items:
                    data = item if isinstance(item, bytes) else item.read_bytes()
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return build


def _session_entries(prefix: str) -> Entries:
    def entries(drop: Path, scratch: Path) -> list[tuple[str, Path | bytes]]:
        session = write_session(scratch / f"content-{drop.name}", series=(SeriesSpec("T1", 1),),
                                layout="flat")
        return [(f"{prefix}{session.files[0].name}", session.files[0])]
    return entries


def _tar_with_symlink(drop: Path, scratch: Path) -> None:
    session = write_session(scratch / "tarlink", series=(SeriesSpec("T1", 1),), layout="flat")
    with tarfile.open(drop, "w:gz") as tf:
        tf.add(session.files[0], arcname="ok.dcm")
        link = tarfile.TarInfo("evil-link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)


def _many_entries(drop: Path, scratch: Path) -> None:
    with zipfile.ZipFile(drop, "w") as zf:
        for n in range(MAX_ENTRIES + 50):
            zf.writestr(f"note-{n}.txt", b"x")


def _corrupt_zip(drop: Path, scratch: Path) -> None:
    _archive("zip")(drop, scratch)
    data = drop.read_bytes()
    drop.write_bytes(data[: len(data) // 2])


def _bomb(drop: Path, scratch: Path) -> None:
    with zipfile.ZipFile(drop, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.dcm", b"\0" * 40_000_000)  # ≈40 KB compressed: ratio ≈ 1000


MAX_ENTRIES = 500  # archives.max_entries of the corpus inbox


def cases() -> list[Case]:
    junk = {".DS_Store": b"\0\0\0\1Bud1", "Thumbs.db": b"junk", "desktop.ini": b"[x]",
            "~$report.docx": b"lock", ".hidden": b"h", "._IM0001.dcm": b"apple double",
            "export.log": b"log"}
    odd = {"report.pdf": b"%PDF-1.4\n%\xe2\xe3\n1 0 obj\n<<>>\nendobj\ntrailer\n%%EOF\n",
           "photo.jpg": b"\xff\xd8\xff\xe0\0\x10JFIF\0" + b"\0" * 64 + b"\xff\xd9",
           "notes.txt": b"scan notes, not DICOM\n"}
    return [
        Case("implicit_no_preamble", _no_preamble, "done", stored=2),
        Case("big_endian", one(2, transfer_syntax=ExplicitVRBigEndian), "done", stored=2),
        Case("deflated", one(2, transfer_syntax=DeflatedExplicitVRLittleEndian), "done",
             stored=2),
        Case("rle_lossless", one(2, transfer_syntax=RLELossless), "done", stored=2),
        Case("jpeg_baseline", _compressed(JPEGBaseline8Bit, "JPEG"), "done", stored=2),
        Case("jpeg_2000", _compressed(JPEG2000Lossless, "JPEG2000"), "done", stored=2),
        Case("names_with_spaces", _names(["my scan 1.dcm", "sub dir/scan 2.dcm"]), "done",
             stored=2),
        Case("names_unicode", _names(["Émile_ß.dcm", "日本/画像.dcm"]), "done", stored=2),
        Case("names_newline", _names(["line\nbreak.dcm", "tab\there.dcm"]), "done", stored=2),
        Case("names_leading_dash", _names(["-rf.dcm", "--help"]), "done", stored=2),
        Case("long_path", _long_path(4000), "done", stored=1),
        Case("deep_nesting", _deep(100), "done", stored=1),
        Case("empty_subfolders", _empty_folders(True), "done", stored=2),
        Case("dicomdir", _dicomdir, "done", stored=2, kinds={"DICOMDIR": "junk"}),
        Case("junk_files", with_extra(2, junk), "done", stored=2,
             kinds={name: "junk" for name in junk}),
        Case("non_dicom_files", with_extra(2, odd), "done", stored=2,
             kinds={name: "not_dicom" for name in odd}),
        Case("zero_byte_file", with_extra(2, {"empty.dcm": b""}), "done", stored=2,
             kinds={"empty.dcm": "not_dicom"}),
        Case("duplicate_identical", _duplicate(True), "done", stored=2,
             kinds={"copy-of-first.dcm": "duplicate"}),
        Case("split_study_part1", _split_half("T1"), "done", stored=2),
        Case("split_study_part2", _split_half("T2"), "done", stored=2),
        Case("symlink_to_outside", _symlink_out, "done", stored=2,
             kinds={"link-outside.dcm": "symlink"}),
        Case("symlink_loop", _symlink_loop, "done", stored=2,
             kinds={"loop-a": "symlink", "loop-b": "symlink"}),
        Case("fifo", _fifo, "done", stored=2, kinds={"a-fifo": "special"}),
        Case("zip_archive", _archive("zip"), "done", stored=3, archive="zip_archive.zip"),
        Case("targz_archive", _archive("tar.gz"), "done", stored=3, archive="targz.tar.gz"),
        Case("tgz_archive", _archive("tgz"), "done", stored=3, archive="session.tgz"),
        Case("tar_archive", _archive("tar"), "done", stored=3, archive="session.tar"),
        Case("stored_zip", _archive("zip", compression=zipfile.ZIP_STORED), "done", stored=3,
             archive="stored.zip"),
        Case("truncated", edited(3, _truncate), "failed", "truncated", stored=2),
        Case("garbage_after_preamble", edited(3, _garble), "failed", "corrupt DICOM: a preamble",
             stored=2),
        Case("no_study_uid", edited(3, _drop_element("StudyInstanceUID")), "failed",
             "without StudyInstanceUID", stored=2),
        Case("no_sop_instance_uid", edited(3, _drop_element("SOPInstanceUID")), "failed",
             "without SOPInstanceUID", stored=2),
        Case("duplicate_different", _duplicate(False), "failed", "share a SOPInstanceUID",
             stored=0),
        Case("two_patient_ids", _two_patients, "failed", "2 different PatientIDs", stored=0),
        Case("only_junk", _only_junk, "failed", "no DICOM files in this drop"),
        Case("only_empty_folders", _empty_folders(False), "failed", "no DICOM files"),
        Case("unreadable_file", _unreadable, "failed", "Permission denied", stored=1),
        Case("label_renders_empty", _labels({}), "failed", "renders empty", stored=0,
             parent="route_empty_label"),
        Case("label_too_long", _labels({"StudyDescription": "A" * 80}), "failed",
             "characters long", stored=0, parent="route_long_label"),
        Case("label_with_dotdot", _labels({"StudyDescription": "../../etc"}), "failed",
             "'/'", stored=0, parent="route_long_label"),
        Case("route_invalid_yaml", one(1), "failed", "invalid YAML", parent="route_bad_yaml"),
        Case("route_unknown_key", one(1), "failed", "subjekt: unknown key",
             parent="route_unknown_key"),
        Case("route_unknown_destination", one(1), "failed", "unknown destination 'nowhere'",
             parent="route_unknown_dest"),
        Case("zip_slip", _archive("zip", _session_entries("../../")), "failed", "zip-slip",
             archive="zip_slip.zip"),
        Case("zip_absolute_path", _archive("zip", _session_entries("/tmp/")), "failed",
             "absolute path", archive="zip_absolute.zip"),
        Case("tar_with_symlink", _tar_with_symlink, "failed", "is a link",
             archive="tar_link.tgz"),
        Case("zip_bomb", _bomb, "failed", "possible zip bomb", archive="bomb.zip"),
        Case("zip_too_many_entries", _many_entries, "failed", "max_entries",
             archive="many.zip"),
        Case("zip_corrupt", _corrupt_zip, "failed", "not a readable archive",
             archive="corrupt.zip"),
        Case("folder_cannot_be_renamed", one(1), "stays", "claim failed"),
        Case("symlink_drop_to_outside", _symlink_drop, "stays", "symbolic link in an inbox"),
    ]


def _only_junk(drop: Path, _: Path) -> None:
    drop.mkdir(parents=True)
    (drop / "Thumbs.db").write_bytes(b"x")
    (drop / "notes.txt").write_bytes(b"y")


def _symlink_drop(drop: Path, scratch: Path) -> None:
    outside = scratch / "outside-folder"
    write_session(outside, series=(SeriesSpec("T1", 1),))
    drop.symlink_to(outside, target_is_directory=True)


ROUTES = {
    "route_empty_label": 'session: "{PatientComments}"\n',
    "route_long_label": 'subject: "{StudyDescription}"\n',
    "route_bad_yaml": "project: [unclosed\n",
    "route_unknown_key": "subjekt: x\n",
    "route_unknown_dest": "destination: nowhere\n",
}
