"""Compressed and re-encoded DICOM files for the transcoding tests (issue 17), made by encoders
nobody on the project wrote: dcmtk's `dcmcjpeg`, `dcmcjpls`, `dcmcrle` and `dcmconv`, and
openjpeg (pylibjpeg-openjpeg, through pydicom's `compress`).

Sources are synthetic and carry no PHI (PatientName empty, PatientID "CORPUS01"): MR (16-bit
unsigned, 12 stored), CT (16-bit signed), US RGB 8-bit, 8-bit monochrome Secondary Capture, a
US cine of 8 RGB frames and an 8-frame 12-bit grayscale Secondary Capture; their pixels are
gradients with seeded noise, so every encoder has work to do. Each entry (source x encoder) is
a file of its own with its own SOP Instance UID, in a series of its own, all in one study, and
records the decoded pixels of its ORIGINAL uncompressed source: a lossless entry's decoded
pixels must equal them.

    corpus = build_corpus(folder)     # or the `transcode_corpus` fixture (once per session)
    for entry in corpus.lossless: ...

`python -m tests.transcode_corpus [FOLDER]` builds it and prints the table.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

from tests.peers import dcmtk_tool
from xnat_inbox.commands.synthetic import Patient, SeriesSpec, write_session

PATIENT = Patient(patient_id="CORPUS01", patient_name="", birth_date="", sex="")
MULTIFRAME_GRAYSCALE_WORD_SC = UID("1.2.840.10008.5.1.4.1.1.7.3")
ROWS, COLUMNS, FRAMES = 96, 128, 8
DCMTK_TOOLS = ("dcmcjpeg", "dcmcjpls", "dcmcrle", "dcmconv", "dcmdump")


# --- what an entry is -----------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """An uncompressed original: its name, and how its data set is made."""

    name: str
    description: str
    make: Callable[[Path, str, np.random.Generator], Dataset]  # (scratch, study UID, rng)
    eight_bit: bool = False  # JPEG baseline takes 8-bit samples only
    twelve_bit: bool = False  # JPEG extended: 8 or 12 bits (dcmtk would window 16 down)
    signed: bool = False  # dcmcjpls refuses near-lossless for signed pixels


@dataclass(frozen=True)
class Encoder:
    name: str
    syntax: UID
    lossless: bool
    argv: tuple[str, ...] = ()  # a dcmtk tool and its options: `tool [options] in out`
    j2k: dict[str, object] | None = None  # pydicom compress() options (openjpeg)
    applies: Callable[[Source], bool] = lambda source: True


@dataclass
class Entry:
    name: str  # "<source>-<encoder>"
    source: str
    encoder: str
    path: Path
    transfer_syntax: UID
    sop_class_uid: UID
    sop_instance_uid: str
    series_instance_uid: str
    lossless: bool
    photometric: str  # as the file says (e.g. YBR_FULL_422 from a JPEG baseline of RGB)
    frames: int
    reference: np.ndarray = field(repr=False)  # the original's decoded pixels

    def decoded(self) -> np.ndarray:
        """The file's pixels as pydicom (with the pylibjpeg plug-ins) decodes them, colour
        converted to RGB where the file is YBR (pydicom's default)."""
        return dcmread(self.path).pixel_array


@dataclass
class Corpus:
    folder: Path  # one file per entry, flat: <name>.dcm
    study_uid: str
    entries: list[Entry]

    @cached_property
    def by_name(self) -> dict[str, Entry]:
        return {entry.name: entry for entry in self.entries}

    @cached_property
    def by_sop_instance_uid(self) -> dict[str, Entry]:
        """For matching what a receiver got to the entry it came from."""
        return {entry.sop_instance_uid: entry for entry in self.entries}

    @property
    def lossless(self) -> list[Entry]:
        return [entry for entry in self.entries if entry.lossless]

    @property
    def lossy(self) -> list[Entry]:
        return [entry for entry in self.entries if not entry.lossless]

    def select(self, *, syntaxes: Iterable[str] | None = None, sources: Iterable[str] | None = None,
               encoders: Iterable[str] | None = None) -> list[Entry]:
        wanted = [set(x) if x is not None else None for x in (syntaxes, sources, encoders)]
        return [entry for entry in self.entries
                if all(want is None or value in want for want, value in zip(
                    wanted, (entry.transfer_syntax, entry.source, entry.encoder), strict=True))]

    def copy_to(self, drop: Path, entries: Iterable[Entry] | None = None) -> list[Path]:
        """Copy entries (default all) into a drop folder, for a test to hand to the daemon."""
        drop.mkdir(parents=True, exist_ok=True)
        return [Path(shutil.copy2(entry.path, drop / entry.path.name))
                for entry in (self.entries if entries is None else entries)]


# --- sources --------------------------------------------------------------------------------


def _noise(rng: np.random.Generator, shape: tuple[int, ...], spread: int) -> np.ndarray:
    return rng.integers(0, spread, shape, dtype=np.int64)


def _gradient(frames: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    f, y, x = np.mgrid[0:frames, 0:ROWS, 0:COLUMNS]
    return f, y, x


def _from_generator(scratch: Path, study_uid: str, modality: str) -> Dataset:
    """One instance of the project's generator (valid MR / CT / SC modules), read back."""
    info = write_session(scratch / f"gen-{modality}-{generate_uid()[-12:]}",
                         series=(SeriesSpec(f"{modality} source", 1, modality=modality),),
                         patient=PATIENT, study_uid=study_uid, study_description="Transcode corpus",
                         rows=ROWS, columns=COLUMNS, layout="flat")
    return dcmread(info.files[0])


def _set_pixels(ds: Dataset, pixels: np.ndarray) -> Dataset:
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds["PixelData"].VR = "OB" if ds.BitsAllocated == 8 else "OW"
    return ds


def _mr(scratch: Path, study_uid: str, rng: np.random.Generator) -> Dataset:
    ds = _from_generator(scratch, study_uid, "MR")
    phantom = ds.pixel_array.astype(np.int64)  # the generator's head phantom, 12-bit
    return _set_pixels(ds, np.clip(phantom + _noise(rng, phantom.shape, 40), 0, 4095)
                       .astype(np.uint16))


def _ct(scratch: Path, study_uid: str, rng: np.random.Generator) -> Dataset:
    ds = _from_generator(scratch, study_uid, "CT")
    _, y, x = _gradient()
    hu = (x[0] * 24 - y[0] * 9 - 1000) + _noise(rng, (ROWS, COLUMNS), 60) - 30
    hu[:, :6] = -2000  # padding outside the field of view, as scanners write it
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    return _set_pixels(ds, hu.astype(np.int16))


def _secondary_capture(scratch: Path, study_uid: str, *, samples: int, bits: int,
                       frames: int = 1) -> Dataset:
    ds = _from_generator(scratch, study_uid, "OT")
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = "RGB" if samples == 3 else "MONOCHROME2"
    if samples == 3:
        ds.PlanarConfiguration = 0
        for keyword in ("WindowCenter", "WindowWidth"):
            delattr(ds, keyword)
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    return ds


def _mono8(scratch: Path, study_uid: str, rng: np.random.Generator) -> Dataset:
    ds = _secondary_capture(scratch, study_uid, samples=1, bits=8)
    ds.WindowCenter, ds.WindowWidth = "128", "256"
    _, y, x = _gradient()
    pixels = (x[0] + y[0]) * 255 // (ROWS + COLUMNS) + _noise(rng, (ROWS, COLUMNS), 12)
    return _set_pixels(ds, np.clip(pixels, 0, 255).astype(np.uint8))


def _rgb(rng: np.random.Generator, frames: int) -> np.ndarray:
    f, y, x = _gradient(frames)
    planes = [x * 255 // COLUMNS, y * 255 // ROWS, ((x + y + 9 * f) * 2) % 256]
    rgb = np.stack(planes, axis=-1) + _noise(rng, (frames, ROWS, COLUMNS, 3), 10)
    rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    return rgb[0] if frames == 1 else rgb


def _as_ultrasound(ds: Dataset, sop_class: UID) -> Dataset:
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.Modality = "US"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL", "0001"]  # US value 4: no extra data
    ds.LossyImageCompression = "00"
    del ds.ConversionType  # Secondary Capture's own
    return ds


def _us_rgb(scratch: Path, study_uid: str, rng: np.random.Generator) -> Dataset:
    ds = _secondary_capture(scratch, study_uid, samples=3, bits=8)
    return _set_pixels(_as_ultrasound(ds, UltrasoundImageStorage), _rgb(rng, 1))


def _us_cine(scratch: Path, study_uid: str, rng: np.random.Generator) -> Dataset:
    ds = _secondary_capture(scratch, study_uid, samples=3, bits=8, frames=FRAMES)
    _as_ultrasound(ds, UltrasoundMultiFrameImageStorage)
    ds.FrameTime = "33.3"
    ds.FrameIncrementPointer = 0x00181063  # FrameTime
    return _set_pixels(ds, _rgb(rng, FRAMES))


def _multiframe_word(scratch: Path, study_uid: str, rng: np.random.Generator) -> Dataset:
    ds = _secondary_capture(scratch, study_uid, samples=1, bits=12, frames=FRAMES)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MULTIFRAME_GRAYSCALE_WORD_SC
    ds.BurnedInAnnotation = "NO"
    ds.PresentationLUTShape = "IDENTITY"
    ds.FrameIncrementPointer = 0x00200013  # InstanceNumber: not a real sweep
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
    ds.WindowCenter, ds.WindowWidth = "2048", "4096"
    f, y, x = _gradient(FRAMES)
    pixels = (x * 24 + y * 9 + f * 300) % 4096 + _noise(rng, (FRAMES, ROWS, COLUMNS), 30)
    return _set_pixels(ds, np.clip(pixels, 0, 4095).astype(np.uint16))


SOURCES: tuple[Source, ...] = (
    Source("mr12", "MR, 16-bit unsigned, 12 stored", _mr, twelve_bit=True),
    Source("ct16s", "CT, 16-bit signed", _ct, signed=True),
    Source("us-rgb", "US, 8-bit RGB", _us_rgb, eight_bit=True),
    Source("sc-mono8", "Secondary Capture, 8-bit monochrome", _mono8, eight_bit=True),
    Source("us-cine", "US multi-frame, 8 RGB frames", _us_cine, eight_bit=True),
    Source("sc-mf12", "Multi-frame grayscale word SC, 8 frames, 12 stored", _multiframe_word,
           twelve_bit=True),
)


# --- encoders -------------------------------------------------------------------------------

# dcmcjpeg/dcmcjpls: +un keeps the SOP Instance UID we gave each entry (fresh already)
ENCODERS: tuple[Encoder, ...] = (
    Encoder("explicit-le", ExplicitVRLittleEndian, True),  # the source itself, as sites send
    Encoder("big-endian", ExplicitVRBigEndian, True, ("dcmconv", "+tb")),
    Encoder("deflated", DeflatedExplicitVRLittleEndian, True, ("dcmconv", "+td")),
    Encoder("rle", RLELossless, True, ("dcmcrle",)),
    Encoder("jpeg-baseline", JPEGBaseline8Bit, False, ("dcmcjpeg", "+eb", "+un"),
            applies=lambda s: s.eight_bit),  # of RGB: YBR_FULL_422
    Encoder("jpeg-extended", JPEGExtended12Bit, False, ("dcmcjpeg", "+ee", "+un"),
            applies=lambda s: s.twelve_bit),
    Encoder("jpeg-lossless-sv1", JPEGLosslessSV1, True, ("dcmcjpeg", "+e1", "+un")),
    Encoder("jpeg-lossless-sv6", JPEGLossless, True, ("dcmcjpeg", "+el", "+un")),
    Encoder("jpegls-lossless", JPEGLSLossless, True, ("dcmcjpls", "+el", "+un")),
    Encoder("jpegls-near", JPEGLSNearLossless, False, ("dcmcjpls", "+en", "+un"),
            applies=lambda s: not s.signed),
    Encoder("j2k-lossless", JPEG2000Lossless, True, j2k={}),
    Encoder("j2k-lossy", JPEG2000, False, j2k={"j2k_cr": [12]}),
)


# --- building -------------------------------------------------------------------------------


def entry_names() -> list[str]:
    """The names build_corpus() gives its entries, in order, without building anything (for
    tests parametrized by entry)."""
    return [f"{source.name}-{encoder.name}" for source in SOURCES for encoder in ENCODERS
            if encoder.applies(source)]


def missing_tools() -> list[str]:
    """What this machine lacks to build the corpus (empty: nothing)."""
    missing = [f"{tool} (dcmtk)" for tool in DCMTK_TOOLS if dcmtk_tool(tool) is None]
    try:
        from pydicom.pixels.decoders import JPEGLSLosslessDecoder
        from pydicom.pixels.encoders import JPEG2000LosslessEncoder
        if not JPEG2000LosslessEncoder.is_available:
            missing.append("pylibjpeg-openjpeg (the JPEG 2000 encoder)")
        if not JPEGLSLosslessDecoder.is_available:
            missing.append("pylibjpeg-libjpeg (the JPEG and JPEG-LS decoder)")
    except ImportError as error:  # pragma: no cover - pydicom 3 has both
        missing.append(str(error))
    return missing


def build_corpus(folder: Path, *, seed: int = 17) -> Corpus:
    """Write every source x encoder that applies into `folder` (created; must be empty)."""
    missing = missing_tools()
    if missing:
        raise RuntimeError(f"cannot build the transcode corpus, missing: {', '.join(missing)}; "
                           "apt-get install dcmtk, pip install -e '.[test]'")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty")
    scratch = folder.parent / f".{folder.name}-sources"
    scratch.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    study_uid = generate_uid()
    jobs: list[tuple[Entry, Dataset, Encoder]] = []
    number = 0
    for source in SOURCES:
        original = source.make(scratch, study_uid, rng)
        reference = original.pixel_array.copy()
        reference.setflags(write=False)
        for encoder in ENCODERS:
            if not encoder.applies(source):
                continue
            number += 1
            ds = _derive(original, number, f"{source.name} {encoder.name}")
            entry = Entry(name=f"{source.name}-{encoder.name}", source=source.name,
                          encoder=encoder.name, path=folder / f"{source.name}-{encoder.name}.dcm",
                          transfer_syntax=encoder.syntax, sop_class_uid=UID(ds.SOPClassUID),
                          sop_instance_uid=str(ds.SOPInstanceUID),
                          series_instance_uid=str(ds.SeriesInstanceUID),
                          lossless=encoder.lossless, photometric="",
                          frames=int(ds.get("NumberOfFrames", 1) or 1), reference=reference)
            jobs.append((entry, ds, encoder))
    # dcmtk's tools run as processes, a few at a time; openjpeg runs here, one file at a time
    # (pydicom's encoders are shared objects: two threads encoding at once wrote broken files)
    tools = [job for job in jobs if job[2].j2k is None]
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for _ in pool.map(lambda job: _encode(*job, scratch), tools):
            pass
    for entry, ds, encoder in jobs:
        if encoder.j2k is not None:
            _encode_j2k(ds, encoder, entry.path)
    shutil.rmtree(scratch)
    entries = [entry for entry, _, _ in jobs]
    for entry in entries:
        entry.photometric = str(dcmread(entry.path, stop_before_pixels=True)
                                .PhotometricInterpretation)
    return Corpus(folder, study_uid, entries)


def _derive(original: Dataset, number: int, description: str) -> Dataset:
    """A copy of the source with UIDs of its own: its own series, its own instance."""
    ds = copy.deepcopy(original)
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesNumber = number
    ds.SeriesDescription = ds.ProtocolName = description[:64]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _encode(entry: Entry, ds: Dataset, encoder: Encoder, scratch: Path) -> None:
    if not encoder.argv:
        ds.save_as(entry.path, enforce_file_format=True)
        return
    plain = scratch / f"{entry.name}.in.dcm"
    ds.save_as(plain, enforce_file_format=True)
    tool, *options = encoder.argv
    done = subprocess.run([str(dcmtk_tool(tool)), *options, str(plain), str(entry.path)],
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{tool} {' '.join(options)} failed on {entry.name} "
                           f"(exit {done.returncode}): {done.stderr.strip()}")


def _encode_j2k(ds: Dataset, encoder: Encoder, path: Path) -> None:
    """openjpeg through pydicom. RGB is coded with the multiple component transform, as
    modalities do: YBR_RCT (reversible) for lossless, YBR_ICT (irreversible) for lossy."""
    options = dict(encoder.j2k or {})
    if ds.SamplesPerPixel == 3:
        ds.PhotometricInterpretation = "YBR_RCT" if encoder.lossless else "YBR_ICT"
    size = len(ds.PixelData)
    ds.compress(encoder.syntax, encoding_plugin="pylibjpeg", generate_instance_uid=False,
                **options)  # type: ignore[arg-type]
    if not encoder.lossless:
        # what a lossy encoder must record (PS3.3 C.7.6.1.1.5); pydicom leaves it to us
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = f"{size / len(ds.PixelData):.2f}"
        ds.LossyImageCompressionMethod = "ISO_15444_1"
    ds.save_as(path, enforce_file_format=True)


# --- the fixture ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def transcode_corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corpus]:
    """The corpus, built once per test session under pytest's temporary folder. Tests copy
    entries into their drops (`corpus.copy_to(drop, entries)`), never change the files."""
    missing = missing_tools()
    if missing:
        pytest.fail(f"the transcode corpus needs {', '.join(missing)}: apt-get install dcmtk, "
                    "pip install -e '.[test]'")
    yield build_corpus(tmp_path_factory.mktemp("transcode-corpus") / "corpus")


def table(corpus: Corpus) -> str:
    """Markdown table: source x encoder → transfer syntax, photometric, lossless."""
    lines = ["| entry | source | encoder | transfer syntax | photometric | frames | lossless |",
             "|---|---|---|---|---|---|---|"]
    descriptions = {source.name: source.description for source in SOURCES}
    for e in corpus.entries:
        lines.append(f"| {e.name} | {descriptions[e.source]} | {e.encoder} | "
                     f"{e.transfer_syntax} ({e.transfer_syntax.name}) | {e.photometric} | "
                     f"{e.frames} | {'yes' if e.lossless else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "transcode-corpus")
    print(table(build_corpus(target)))
