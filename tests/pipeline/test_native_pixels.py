"""The native-pixel shortcut in load_hu reads exactly what pydicom's pixel_array reads, or steps aside."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from dicom_node.pipeline.series import native_pixels

from ..conftest import SHARED_DATA


def _slice(syntax: str, signed: int, bits_stored: int, values: np.ndarray, pad: bytes = b"") -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID = CTImageStorage
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, signed
    ds.PixelData = values.astype("<i2" if signed else "<u2").tobytes() + pad
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)  # through a file, as the spool holds it
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("signed", [0, 1])
@pytest.mark.parametrize("bits_stored", [12, 16])
def test_native_pixels_equal_pixel_array(syntax: str, signed: int, bits_stored: int) -> None:
    rng = np.random.default_rng(bits_stored + signed)
    # Values over the whole 16 bits: with 12 stored, the unused high bits hold garbage, left as pydicom leaves it.
    values = rng.integers(-32768 if signed else 0, 32768 if signed else 65536, (7, 9))
    for pad in (b"", b"\0\0"):  # an even-length excess that pydicom drops
        ds = _slice(syntax, signed, bits_stored, values, pad)
        got = native_pixels(ds)
        assert got is not None
        want = ds.pixel_array
        assert got.dtype == want.dtype and np.array_equal(got, want)


def test_anything_else_is_left_to_pydicom() -> None:
    values = np.arange(12).reshape(3, 4)
    assert native_pixels(_slice(ExplicitVRBigEndian, 0, 16, values)) is None
    ds = _slice(ExplicitVRLittleEndian, 0, 16, values)
    ds.file_meta.TransferSyntaxUID = RLELossless
    assert native_pixels(ds) is None
    short = _slice(ExplicitVRLittleEndian, 0, 16, values)
    short.PixelData = short.PixelData[:-2]
    assert native_pixels(short) is None  # pydicom says why it is short
    eight = _slice(ExplicitVRLittleEndian, 0, 16, values)
    eight.BitsAllocated = 8
    assert native_pixels(eight) is None


@pytest.mark.skipif(not (SHARED_DATA / "real-ct-toshiba-qrm-phantom").is_dir(), reason="the real CT data is not here")
def test_native_pixels_of_a_real_implicit_vr_scan_equal_pixel_array() -> None:
    files = sorted(p for p in (SHARED_DATA / "real-ct-toshiba-qrm-phantom").rglob("*") if p.is_file())[:8]
    checked = 0
    for f in files:
        try:
            ds = pydicom.dcmread(f)
        except Exception:  # noqa: BLE001 - not every file in the folder is an image
            continue
        got = native_pixels(ds)
        if got is not None:
            assert np.array_equal(got, ds.pixel_array) and got.dtype == ds.pixel_array.dtype
            checked += 1
    assert checked
