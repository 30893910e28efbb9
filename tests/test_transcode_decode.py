"""Decoding for transcoding (senders/transcode.py) over pydicom's own test files, made by other
encoders (dcmtk, GDCM, openjpeg, CharLS...): what comes out is the decoder's output of the
original, frame by frame; the header describes it; the size is checked before anything is
decoded; a syntax without a decoder is named."""

from __future__ import annotations

import io

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.pixels import pixel_array
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian

from xnat_inbox.senders.transcode import (
    TranscodeRefused,
    decode,
    decoded_size,
    missing_decoder,
    plugin_for,
    to_little_endian,
)

pytestmark = pytest.mark.corpus

#: (file, lossy): JPEG baseline/extended (dcmtk, GDCM), JPEG lossless, JPEG-LS (lossless and
#: near-lossless, 8/16-bit, RGB), JPEG 2000 (lossless with YBR_RCT, lossy), RLE (8/16/32-bit,
#: multi-frame, RGB), big endian (16 and 32-bit, multi-frame, RGB)
FILES = [
    ("JPGExtended.dcm", True), ("SC_rgb_jpeg_dcmtk.dcm", True),
    ("SC_rgb_small_odd_jpeg.dcm", True), ("SC_jpeg_no_color_transform.dcm", True),
    ("SC_rgb_jpeg_gdcm.dcm", False), ("MR_small_jpeg_ls_lossless.dcm", False),
    ("JPEGLSNearLossless_16.dcm", True), ("SC_rgb_jls_lossy_line.dcm", True),
    ("MR_small_jp2klossless.dcm", False), ("GDCMJ2K_TextGBR.dcm", False),
    ("JPEG2000.dcm", True), ("693_J2KI.dcm", True), ("MR_small_RLE.dcm", False),
    ("SC_rgb_rle_2frame.dcm", False), ("SC_rgb_rle_16bit_2frame.dcm", False),
    ("rtdose_rle.dcm", False), ("MR_small_bigendian.dcm", False),
    ("SC_rgb_small_odd_big_endian.dcm", False), ("rtdose_expb.dcm", False),
]
MAX = 1 << 30


def _original(ds: Dataset) -> np.ndarray:
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        return pixel_array(ds, decoding_plugin="pylibjpeg")
    return ds.pixel_array


def _as_uncompressed(ds: Dataset, pixels: bytearray, vr: str) -> Dataset:
    """The decoded dataset written and read again as Explicit VR Little Endian (a big endian
    one's binary values swapped, as the senders do)."""
    if ds.file_meta.TransferSyntaxUID == ExplicitVRBigEndian:
        to_little_endian(ds)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = bytes(pixels)
    ds["PixelData"].VR = vr
    fp = DicomBytesIO()
    fp.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(fp, ds.file_meta, enforce_standard=True)
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return dcmread(io.BytesIO(fp.getvalue()))


@pytest.mark.parametrize(("name", "lossy"), FILES)
def test_decoded_pixels_are_the_decoders_output(name, lossy):
    path = get_testdata_file(name)
    original = dcmread(path)
    syntax = str(original.file_meta.TransferSyntaxUID)
    ds = dcmread(path)
    decoded = decode(ds, syntax, MAX)
    assert "PixelData" not in ds  # the caller encodes the rest around the buffer
    assert len(decoded.pixels) == decoded_size(original) + decoded_size(original) % 2
    out = _as_uncompressed(ds, decoded.pixels, decoded.vr)
    assert np.array_equal(out.pixel_array, _original(original)), name
    assert "422" not in out.PhotometricInterpretation
    if original.SamplesPerPixel == 3:
        assert out.PlanarConfiguration == 0
        if original.PhotometricInterpretation.startswith("YBR") and lossy:
            assert out.PhotometricInterpretation == "RGB"  # lossy JPEG: decoded to RGB
    if lossy:
        assert out.LossyImageCompression == "01"
        assert out.LossyImageCompressionMethod and out.LossyImageCompressionRatio
    else:
        assert out.get("LossyImageCompression") == original.get("LossyImageCompression")


def test_size_is_checked_before_decoding():
    """Pixel data that isn't JPEG at all: over the limit it is refused for its size (so it was
    never decoded), under it the decoder's failure is named."""
    ds = dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    size = decoded_size(ds)  # 100 x 100 x 3
    assert size == 30000
    ds.PixelData = b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + b"\xfe\xff\x00\xe0\x04\x00\x00\x00junk" \
        + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    with pytest.raises(TranscodeRefused, match=r"30000 bytes decoded, more than "
                                                r"transcode_max_bytes \(29999\)"):
        decode(ds, str(ds.file_meta.TransferSyntaxUID), 29999)
    with pytest.raises(TranscodeRefused, match="can't be decoded"):
        decode(ds, str(ds.file_meta.TransferSyntaxUID), 30000)


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.4.100",  # MPEG2 Main Profile
                                    "1.2.840.10008.1.2.4.102",  # MPEG-4 AVC/H.264
                                    "1.2.826.0.1.3680043.9.9999.1"])  # a private one
def test_a_syntax_without_decoder_is_named(syntax):
    why = missing_decoder(syntax)
    assert why is not None and syntax in why and "no decoder here" in why
    ds = dcmread(get_testdata_file("JPEG2000.dcm"))
    with pytest.raises(TranscodeRefused, match="no decoder here"):
        decode(ds, syntax, MAX)


def test_installed_decoders_cover_the_common_syntaxes():
    for syntax in ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                   "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
                   "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
                   "1.2.840.10008.1.2.4.203", "1.2.840.10008.1.2.5", ExplicitVRBigEndian):
        assert missing_decoder(syntax) is None, syntax
    # JPEG-LS by CharLS (faster, same values), everything else by the pylibjpeg family
    assert plugin_for("1.2.840.10008.1.2.4.80") == "pyjpegls"
    assert plugin_for("1.2.840.10008.1.2.4.50") == "pylibjpeg"


def test_big_endian_binary_values_are_swapped():
    """pydicom writes OW/OL/OF values as the bytes it read: a big endian file's must be swapped,
    in sequences too, before they are written little endian."""
    words = np.arange(1, 9, dtype=np.uint16) * 257 + 1
    floats = np.array([1.5, -2.25], dtype=np.float32)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", "1.2.3.4"
    ds.add_new(0x60003000, "OW", words.astype(">u2").tobytes())  # OverlayData
    item = Dataset()
    item.add_new(0x00660016, "OF", floats.astype(">f4").tobytes())  # PointCoordinatesData
    ds.add_new(0x00081140, "SQ", [item])
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    read = dcmread(io.BytesIO(buffer.getvalue()))
    to_little_endian(read)
    assert bytes(read[0x60003000].value) == words.astype("<u2").tobytes()
    assert bytes(read[0x00081140].value[0][0x00660016].value) == floats.astype("<f4").tobytes()
