"""Pixel data decoded for a receiver that takes only what a file is not (issue 17): compressed,
big endian and deflated files given to it in a little endian syntax, for both senders.

Decoding is pydicom's pixel data decoders with the pylibjpeg plugins (pylibjpeg-libjpeg for
JPEG, pylibjpeg-openjpeg for JPEG 2000 and HTJ2K, pylibjpeg-rle for RLE) and pyjpegls (CharLS)
for JPEG-LS; chosen over GDCM's wheel after measuring them (docs/architecture.md, "Decoders").
What the decoder returns is what goes out, frame by frame, in a buffer sized from the header
before anything is decoded: an instance whose decoded pixel data would be larger than
`transcode_max_bytes` is refused instead. The attributes that describe the pixels follow them:
PhotometricInterpretation and PlanarConfiguration as decoded, LossyImageCompression "01" (with
its method and ratio) whenever the compressed data was lossy or may have been; never a claim
of lossless."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from ..reading.dataset import read_dataset
from ..reading.scan import Instance

#: the uncompressed syntaxes a file is transcoded to (the receiver's choice between them)
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
#: pydicom's decoder plugin per syntax, the first installed one: CharLS (pyjpegls) decodes
#: JPEG-LS 2-10 times faster than libjpeg, to the same values (JPEG-LS decoding is exactly
#: specified); pylibjpeg for every other syntax. Never whichever pydicom finds first.
PLUGINS = {"1.2.840.10008.1.2.4.80": ("pyjpegls", "pylibjpeg"),
           "1.2.840.10008.1.2.4.81": ("pyjpegls", "pylibjpeg")}
DEFAULT_PLUGINS = ("pylibjpeg",)
#: always lossy: JPEG baseline and extended, JPEG-LS near-lossless
LOSSY = {"1.2.840.10008.1.2.4.50": "ISO_10918_1", "1.2.840.10008.1.2.4.51": "ISO_10918_1",
         "1.2.840.10008.1.2.4.81": "ISO_14495_1"}
#: lossy or reversible as the encoder chose (JPEG 2000, HTJ2K): lossy unless the file says "00"
MAYBE_LOSSY = {"1.2.840.10008.1.2.4.91": "ISO_15444_1", "1.2.840.10008.1.2.4.93": "ISO_15444_2",
               "1.2.840.10008.1.2.4.203": "ISO_15444_15"}
#: YCbCr with chroma subsampling: decoders return it upsampled
SUBSAMPLED = {"YBR_FULL_422": "YBR_FULL", "YBR_PARTIAL_422": "YBR_FULL",
              "YBR_PARTIAL_420": "YBR_FULL"}
PIXEL_DATA = 0x7FE00010
INSTALL = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle pyjpegls"


class TranscodeRefused(ValueError):
    """An instance this host can't give the receiver uncompressed (no decoder, too large, its
    pixel data undecodable): the same at every attempt. The message names the syntax."""


def uid_name(uid: str) -> str:
    """A SOP class or transfer syntax as people know it, with its UID."""
    name = UID(uid).name
    return f"{name} ({uid})" if name and name != uid else uid


def is_uncompressed(syntax: str) -> bool:
    return syntax in UNCOMPRESSED


def pixels_decoded(syntax: str) -> bool:
    """Whether converting a file of this syntax to little endian decodes its pixel data (big
    endian and compressed ones); the little endian pair and deflated files are re-encoded
    only."""
    return syntax not in UNCOMPRESSED and syntax != DeflatedExplicitVRLittleEndian


@lru_cache(maxsize=64)
def missing_decoder(syntax: str) -> str | None:
    """Why this host can't decode pixel data of `syntax`, or None when it can."""
    if not pixels_decoded(syntax):
        return None
    uid = UID(syntax)
    try:
        decoder = get_decoder(uid)
    except (NotImplementedError, ValueError):
        return (f"no decoder here reads {uid_name(syntax)} (this host decodes JPEG, JPEG-LS, "
                "JPEG 2000, HTJ2K and RLE, and big endian)")
    if uid == ExplicitVRBigEndian or plugin_for(syntax) is not None:
        return None
    missing = "; ".join(decoder.missing_dependencies) or "its plugin"
    return f"the decoder for {uid_name(syntax)} is not installed ({missing}): {INSTALL}"


@lru_cache(maxsize=64)
def plugin_for(syntax: str) -> str | None:
    """The decoder plugin this host uses for `syntax` ("" for big endian: pydicom's own)."""
    if syntax == ExplicitVRBigEndian:
        return ""
    try:
        available = get_decoder(UID(syntax)).available_plugins
    except (NotImplementedError, ValueError):
        return None
    return next((p for p in PLUGINS.get(syntax, DEFAULT_PLUGINS) if p in available), None)


def decoded_size(ds: Dataset) -> int:
    """Bytes of the decoded pixel data, from the header alone: Rows * Columns * SamplesPerPixel
    * BitsAllocated / 8 * NumberOfFrames."""
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise TranscodeRefused("its Image Pixel attributes (Rows, Columns, BitsAllocated) are "
                               "missing or unreadable, so its pixel data can't be "
                               "decoded") from None
    if min(rows, columns, samples, bits, frames) < 1:
        raise TranscodeRefused("its Image Pixel attributes say it has no pixels to decode")
    return (rows * columns * samples * bits * frames + 7) // 8


def check_size(ds: Dataset, syntax: str, max_bytes: int) -> int:
    """The decoded size, or TranscodeRefused when it is over `max_bytes` (before decoding)."""
    size = decoded_size(ds)
    if size > max_bytes:
        raise TranscodeRefused(
            f"its pixel data ({uid_name(syntax)}) would take {size} bytes decoded, more than "
            f"transcode_max_bytes ({max_bytes}); raise transcode_max_bytes for this "
            "destination, or have the receiver accept that syntax")
    return size


@dataclass(frozen=True)
class Decoded:
    """Pixel data as decoded: little endian, frames one after the other (even length)."""

    pixels: bytearray
    vr: str  # OB or OW


def decode(ds: Dataset, syntax: str, max_bytes: int) -> Decoded:
    """Decode `ds`'s pixel data (a file of `syntax`, big endian or compressed) into one buffer
    and make the dataset describe it; its PixelData element is removed (the caller encodes the
    rest around the buffer). One frame at a time besides the buffer."""
    why = missing_decoder(syntax)
    if why:
        raise TranscodeRefused(why)
    size = check_size(ds, syntax, max_bytes)
    bits = int(ds.BitsAllocated)
    if bits == 1 or bits % 8:
        raise TranscodeRefused(f"{bits}-bit pixel data in {uid_name(syntax)} is not decoded "
                               "here; have the receiver accept that syntax")
    uid = UID(syntax)
    if "PixelData" not in ds:
        raise TranscodeRefused("it has no pixel data (7FE0,0010) to decode")
    compressed = len(ds.PixelData) if uid.is_compressed else 0
    # lossy JPEG's YCbCr becomes RGB as dcmtk's dcmdjpeg does; every other decoder's output is
    # kept as its values are (a lossless file's pixels stay exactly what was encoded)
    as_rgb = syntax in ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51")
    pixels = bytearray(size + size % 2)
    at = 0
    image: dict[str, Any] = {}
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    try:
        decoder = get_decoder(uid)
        plugin = plugin_for(syntax) or ""
        for frame, described in decoder.iter_array(ds, decoding_plugin=plugin, as_rgb=as_rgb):
            image = described
            if frame.dtype != dtype:
                frame = frame.astype(dtype)  # e.g. a big endian frame, or a narrower decoder type
            data = np.ascontiguousarray(frame).data.cast("B")
            if at + len(data) > size:
                raise TranscodeRefused("its decoded pixel data is larger than its Image Pixel "
                                       "attributes say")
            pixels[at:at + len(data)] = data
            at += len(data)
    except TranscodeRefused:
        raise
    except Exception as exc:  # a decoder's errors on data it can't read take many forms
        first = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ""
        raise TranscodeRefused(f"its pixel data ({uid_name(syntax)}) can't be decoded "
                               f"({type(exc).__name__}: {first})") from None
    if at != size:
        raise TranscodeRefused(f"its pixel data decoded to {at} bytes, where its Image Pixel "
                               f"attributes say {size}")
    del ds.PixelData
    _describe(ds, syntax, image, size, compressed)
    return Decoded(pixels, "OB" if bits <= 8 else "OW")


def _describe(ds: Dataset, syntax: str, image: dict[str, Any], size: int,
              compressed: int) -> None:
    """The Image Pixel attributes as the decoded pixels are; the lossy history kept."""
    photometric = str(image.get("photometric_interpretation") or ds.PhotometricInterpretation)
    ds.PhotometricInterpretation = SUBSAMPLED.get(photometric, photometric)
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1:
        ds.PlanarConfiguration = int(image.get("planar_configuration", 0) or 0)
    method = LOSSY.get(syntax) or MAYBE_LOSSY.get(syntax)
    if method is None:
        return  # lossless (or big endian): whatever the file said about its history stays
    if syntax in MAYBE_LOSSY and ds.get("LossyImageCompression") == "00":
        return  # the encoder said it was reversible: the file's own word, not ours
    ds.LossyImageCompression = "01"
    if not ds.get("LossyImageCompressionMethod"):
        ds.LossyImageCompressionMethod = method
    if not ds.get("LossyImageCompressionRatio") and compressed:
        ds.LossyImageCompressionRatio = f"{size / compressed:.4g}"[:16]


def pixel_element(syntax: str, vr: str, length: int) -> bytes:
    """The Pixel Data element's header for `length` bytes of native pixel data in `syntax`
    (one of the little endian pair)."""
    if syntax == ImplicitVRLittleEndian:
        return struct.pack("<HHI", 0x7FE0, 0x0010, length)
    return struct.pack("<HH2sHI", 0x7FE0, 0x0010, vr.encode(), 0, length)


#: VRs whose values pydicom keeps as raw bytes in the file's byte order (PS3.5 7.3)
_SWAPPED = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}


def to_little_endian(ds: Dataset) -> None:
    """A big endian file's binary values (OW, OL, OF, OD, OV, in sequences too) swapped into
    little endian: pydicom writes them as the bytes it read. Numbers and text it decodes."""
    for element in ds:
        if element.VR == "SQ":
            for item in element.value or []:
                to_little_endian(item)
        elif element.VR in _SWAPPED and element.tag != PIXEL_DATA and element.value:
            width = _SWAPPED[str(element.VR)]
            value = bytes(element.value)
            whole = len(value) - len(value) % width
            swapped = np.frombuffer(value[:whole], f">u{width}").astype(f"<u{width}").tobytes()
            element.value = swapped + value[whole:]


def refusal_before_decoding(instance: Instance, max_bytes: int) -> str | None:
    """Why `instance` can't be converted to little endian here (no decoder; decoded pixel data
    over `max_bytes`, from its header), or None. A file that can't be read is left for the
    sender's own read to name."""
    syntax = instance.transfer_syntax
    why = missing_decoder(syntax)
    if why or not pixels_decoded(syntax):
        return why
    try:
        with instance.open() as fp:
            header = read_dataset(fp)
        if "Rows" in header:  # no Image Pixel module: nothing to decode
            check_size(header, syntax, max_bytes)
    except TranscodeRefused as exc:
        return str(exc)
    except Exception:  # unreadable: the upload names it
        return None
    return None
