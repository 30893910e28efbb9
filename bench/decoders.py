"""Pixel data decoders for transcoding: pydicom with the pylibjpeg plugins against GDCM's wheel
(python-gdcm), on the same files, and pyjpegls (CharLS) where it applies (JPEG-LS). Why the
daemon decodes as it does (docs/architecture.md, "Decoders").

Sources are synthetic 512x512 images (MR 16-bit with 12 stored, CT signed 16-bit, RGB 8-bit,
8-bit monochrome, an 8-frame RGB cine), encoded by dcmtk (dcmcjpeg baseline, extended,
lossless SV1 and process 14; dcmcjpls lossless and near-lossless; dcmcrle) and openjpeg
(pydicom's compress: JPEG 2000 lossless and lossy). Each file is decoded `--reps` times by each
decoder (all frames, pydicom's iter_array with that plugin); the median milliseconds per file
are reported. Coverage: what each decoder decodes at all, and whether a lossless file comes
back equal to its source. Ends with one JSON line.

    pip install python-gdcm      # GDCM is measured, not a dependency
    python bench/decoders.py [--reps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    JPEG2000,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PLUGINS = ("pylibjpeg", "gdcm", "pyjpegls")
#: name -> (command, lossless); "openjpeg" is pydicom's compress with pylibjpeg-openjpeg
ENCODERS = {
    "jpeg-baseline": (["dcmcjpeg", "+eb"], False),
    "jpeg-extended": (["dcmcjpeg", "+ee"], False),
    "jpeg-lossless-sv1": (["dcmcjpeg", "+e1"], True),
    "jpeg-lossless-p14": (["dcmcjpeg", "+el"], True),
    "jpeg-ls": (["dcmcjpls", "+el"], True),
    "jpeg-ls-near": (["dcmcjpls", "+en"], False),
    "rle": (["dcmcrle"], True),
    "j2k-lossless": (["openjpeg", "lossless"], True),
    "j2k-lossy": (["openjpeg", "lossy"], False),
}


def sources(folder: Path) -> dict[str, Path]:
    rng = np.random.default_rng(17)
    y, x = np.mgrid[0:512, 0:512]
    made = {}
    disc = np.hypot(x - 256, y - 256) < 200
    mr = (disc * 1800 + x * 2 + rng.integers(0, 60, (512, 512))).clip(0, 4095)
    made["mr16"] = _save(folder, "mr16", MRImageStorage, mr.astype(np.uint16), bits=(16, 12),
                         signed=False)
    ct = (disc * 1040 - 1000 + rng.integers(-40, 40, (512, 512))).clip(-2048, 2047)
    made["ct-signed"] = _save(folder, "ct-signed", CTImageStorage, ct.astype(np.int16),
                              bits=(16, 12), signed=True)
    made["mono8"] = _save(folder, "mono8", SecondaryCaptureImageStorage,
                          ((x + y) // 4 % 256 + rng.integers(0, 8, (512, 512))).clip(0, 255)
                          .astype(np.uint8), bits=(8, 8), signed=False)
    rgb = np.stack([(x // 2) % 256, (y // 2) % 256, ((x + y) // 4) % 256], -1)
    made["rgb8"] = _save(folder, "rgb8", UltrasoundImageStorage, rgb.astype(np.uint8),
                         bits=(8, 8), signed=False)
    cine = np.stack([np.roll(rgb, 16 * f, axis=1) for f in range(8)]).astype(np.uint8)
    made["rgb8-8frames"] = _save(folder, "rgb8-8frames", UltrasoundMultiFrameImageStorage, cine,
                                 bits=(8, 8), signed=False, frames=8)
    return made


def _save(folder: Path, name: str, sop: str, pixels: np.ndarray, bits: tuple[int, int],
          signed: bool, frames: int = 1) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "BENCH", "OT"
    ds.Rows, ds.Columns = 512, 512
    if frames > 1:
        ds.NumberOfFrames = frames
    color = pixels.shape[-1] == 3
    ds.SamplesPerPixel = 3 if color else 1
    ds.PhotometricInterpretation = "RGB" if color else "MONOCHROME2"
    if color:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored = bits
    ds.HighBit, ds.PixelRepresentation = bits[1] - 1, int(signed)
    ds.PixelData = pixels.tobytes()
    path = folder / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def encode(source: Path, encoder: str, out: Path) -> bool:
    command, _ = ENCODERS[encoder]
    if command[0] == "openjpeg":
        ds = dcmread(source)
        try:
            if command[1] == "lossless":
                ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
            else:
                ds.compress(JPEG2000, encoding_plugin="pylibjpeg", j2k_cr=[15])
        except Exception:
            return False
        ds.save_as(out)
        return True
    done = subprocess.run([*command, str(source), str(out)], capture_output=True)
    return done.returncode == 0 and out.exists()


def decode(path: Path, plugin: str) -> np.ndarray:
    ds = dcmread(path)
    decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
    return np.stack([frame for frame, _ in
                     decoder.iter_array(ds, decoding_plugin=plugin, as_rgb=False)])


def measure(path: Path, plugin: str, reps: int) -> tuple[float | None, np.ndarray | None, str]:
    try:
        result = decode(path, plugin)
    except Exception as exc:
        return None, None, str(exc).strip().splitlines()[-1][:90]
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        decode(path, plugin)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000, result, ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    available = {plugin: _available(plugin) for plugin in PLUGINS}
    rows, totals = [], {p: {"decoded": 0, "lossless_exact": 0, "ms": 0.0} for p in PLUGINS}
    files = lossless_files = 0
    both_ms = {p: 0.0 for p in PLUGINS}  # pylibjpeg and gdcm, over the files both decode
    jpegls_ms = {p: 0.0 for p in PLUGINS}  # every plugin, over the JPEG-LS files
    with tempfile.TemporaryDirectory(prefix="decoders-") as tmp:
        folder = Path(tmp)
        made = sources(folder)
        for name, source in made.items():
            original = dcmread(source).pixel_array
            for encoder, (_, lossless) in ENCODERS.items():
                out = folder / f"{name}.{encoder}.dcm"
                if not encode(source, encoder, out):
                    continue  # e.g. baseline JPEG of 12-bit data, near-lossless of signed
                files += 1
                lossless_files += lossless
                row = {"source": name, "encoder": encoder}
                outputs = {}
                syntax = dcmread(out, stop_before_pixels=True).file_meta.TransferSyntaxUID
                for plugin in PLUGINS:
                    if not available[plugin]:
                        row[plugin] = "not installed"
                        continue
                    if plugin == "pyjpegls" and "JPEG-LS" not in syntax.name:
                        row[plugin] = "n/a"
                        continue
                    ms, result, error = measure(out, plugin, args.reps)
                    if ms is None:
                        row[plugin] = f"fails: {error}"
                        continue
                    outputs[plugin] = result
                    if "JPEG-LS" in syntax.name:
                        jpegls_ms[plugin] += ms
                    totals[plugin]["decoded"] += 1
                    totals[plugin]["ms"] += ms
                    exact = lossless and np.array_equal(result.reshape(original.shape),
                                                        original)
                    totals[plugin]["lossless_exact"] += exact
                    row[plugin] = f"{ms:.2f} ms" + (" exact" if exact else "")
                if "pylibjpeg" in outputs and "gdcm" in outputs:
                    for plugin in ("pylibjpeg", "gdcm"):
                        both_ms[plugin] += float(row[plugin].split()[0])
                if len(outputs) > 1:
                    first, *others = (outputs[p].astype(np.int64) for p in outputs)
                    diffs = [int(np.abs(first - other).max()) if other.shape == first.shape
                             else -1 for other in others]
                    row["agree"] = "yes" if not any(diffs) else (
                        "shapes differ" if -1 in diffs else f"max diff {max(diffs)}")
                rows.append(row)
    print(f"{'source':14} {'encoder':18} " + " ".join(f"{p:>22}" for p in PLUGINS) + "  agree")
    for row in rows:
        print(f"{row['source']:14} {row['encoder']:18} "
              + " ".join(f"{row.get(p, '')!s:>22.22}" for p in PLUGINS)
              + f"  {row.get('agree', '')}")
    summary = {"bench": "decoders", "files": files, "lossless_files": lossless_files,
               "reps": args.reps}
    for plugin in PLUGINS:
        summary[plugin] = {"decoded": totals[plugin]["decoded"],
                           "lossless_exact": totals[plugin]["lossless_exact"],
                           "ms_where_both_decode": round(both_ms[plugin], 1)}
    if both_ms["pylibjpeg"]:
        summary["gdcm_over_pylibjpeg_time"] = round(both_ms["gdcm"] / both_ms["pylibjpeg"], 2)
    summary["jpegls_ms"] = {p: round(ms, 1) for p, ms in jpegls_ms.items()}
    for plugin in PLUGINS:
        summary[plugin]["syntaxes"] = _syntaxes(plugin)
    for plugin in PLUGINS:
        print(f"{plugin}: decodes {totals[plugin]['decoded']} of {files} files "
              f"({totals[plugin]['lossless_exact']} of {lossless_files} lossless ones exactly); "
              f"{both_ms[plugin]:.1f} ms for the files pylibjpeg and gdcm both decode; "
              f"{jpegls_ms[plugin]:.1f} ms for the JPEG-LS files")
    print(json.dumps(summary))
    return 0


def _syntaxes(plugin: str) -> list[str]:
    """The compressed transfer syntaxes pydicom offers this plugin for (HTJ2K among them)."""
    from pydicom.pixels.decoders.base import _PIXEL_DATA_DECODERS
    found = []
    for uid in _PIXEL_DATA_DECODERS:
        decoder = get_decoder(uid)
        if plugin in decoder.available_plugins:
            found.append(decoder.UID.name)
    return found


def _available(plugin: str) -> bool:
    decoder = get_decoder("1.2.840.10008.1.2.4.80")  # JPEG-LS: both plugins claim it
    return plugin in decoder.available_plugins


if __name__ == "__main__":
    sys.exit(main())
