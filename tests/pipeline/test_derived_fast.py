"""The derived series' shortcuts (issue 19) write the files the long way would.

``write_derived_series`` keeps an unchanged slice's Pixel Data as encoded instead of decoding it, and
leaves header values that pydicom writes back unchanged as read instead of converting them. Each test
writes a small series both ways, with the time of writing fixed, and compares the files byte for byte;
the long way is the code as it was (decode every slice, convert every header value).
"""

from __future__ import annotations

import datetime as _dt
import types
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node.pipeline import derived
from dicom_node.pipeline.series import Series, load_hu, read_ct_series
from dicom_node_lab.phantom_dicom import ct_series

MODEL = "test sha256:0"
SHAPE = (6, 32, 40)
STUDY_DESCRIPTION = 0x00081030


class _FixedTime(_dt.datetime):
    @classmethod
    def now(cls, tz=None):  # noqa: ANN206 - as datetime's
        return cls(2024, 5, 6, 7, 8, 9)


@pytest.fixture(autouse=True)
def fixed_time(monkeypatch):
    """SeriesDate/Time, ContentDate/Time and ContributionDateTime come from the clock: fix it."""
    monkeypatch.setattr(derived, "dt", types.SimpleNamespace(datetime=_FixedTime))


def _raw(tag: int, vr: str, value: bytes) -> RawDataElement:
    return RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def write_series(folder: Path, transfer_syntax=ExplicitVRLittleEndian, mutate=None, mutate_read=None) -> Series:
    """A small CT series; ``mutate(ds, z)`` changes a slice before it is written, ``mutate_read(ds, z)``
    changes it as read back (there raw elements are written as they are) and writes it again."""
    rng = np.random.default_rng(5)
    volume = rng.uniform(-1000, 1500, SHAPE)
    folder.mkdir(parents=True)
    for z, ds in enumerate(ct_series(volume, (0.5, 0.4, 0.4), study_uid="1.2.826.0.1.3680043.8.498.11",
                                     series_uid="1.2.826.0.1.3680043.8.498.12")):
        if mutate:
            mutate(ds, z)
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        path = folder / f"{z:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        if mutate_read:
            ds = pydicom.dcmread(path)
            mutate_read(ds, z)
            ds.save_as(path, enforce_file_format=True)
    [series], _ = read_ct_series([folder])
    return series


def changed_mask() -> np.ndarray:
    changed = np.zeros(SHAPE, bool)
    changed[2, 5:9, 7:12] = True
    changed[4, 0:3, 30:40] = True
    return changed


def write(series: Series, out: Path, volume: np.ndarray | None = None) -> dict[str, bytes]:
    volume = load_hu(series) - 300.0 if volume is None else volume
    paths = derived.write_derived_series(series, volume, changed_mask(), out, MODEL, "test")
    assert [p.parent for p in paths] == [out] * SHAPE[0]
    return {p.name: p.read_bytes() for p in paths}


def write_the_long_way(series: Series, out: Path, monkeypatch) -> dict[str, bytes]:
    """As the code was: every slice decoded, every header value converted and written back."""
    with monkeypatch.context() as m:
        m.setattr(derived, "_encoded_pixels", lambda src: None)
        m.setattr(derived, "_remove_private_tags", lambda ds, verbatim: ds.remove_private_tags())
        return write(series, out)


@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian],
                         ids=["explicit-le", "implicit-le", "big-endian"])
def test_files_are_those_the_long_way_writes(tmp_path, monkeypatch, transfer_syntax):
    series = write_series(tmp_path / "in", transfer_syntax)
    src = pydicom.dcmread(series.files[0])
    encoded = derived._encoded_pixels(src)
    if transfer_syntax == ExplicitVRBigEndian:
        assert encoded is None, "big-endian words are decoded and written little endian"
    else:
        assert encoded == src.pixel_array.copy().tobytes(), "the shortcut keeps what decoding would write"
    assert write(series, tmp_path / "fast") == write_the_long_way(series, tmp_path / "slow", monkeypatch)


def test_changed_voxels_are_written_and_the_rest_is_the_source(tmp_path):
    series = write_series(tmp_path / "in")
    volume = load_hu(series) - 300.0
    write(series, tmp_path / "out", volume)
    changed = changed_mask()
    for z, f in enumerate(series.files):
        src = pydicom.dcmread(f)
        out = pydicom.dcmread(tmp_path / "out" / f"CT_{derived.derived_uid('ct-sop', src.SOPInstanceUID, MODEL)}.dcm")
        before, after = src.pixel_array, out.pixel_array
        np.testing.assert_array_equal(after[~changed[z]], before[~changed[z]])
        np.testing.assert_array_equal(after[changed[z]], np.clip(before[changed[z]].astype(int) - 300, 0, 4095))
    assert changed.any(axis=(1, 2)).sum() == 2, "and the other slices took the shortcut"


def _high_bits(ds: Dataset, z: int) -> None:
    words = np.frombuffer(ds.PixelData, "<u2").copy()
    words[::7] |= 0xA000  # bits above BitsStored 12 that pydicom's decoder clears
    ds.PixelData = words.tobytes()


def _signed(broken: bool):
    def mutate(ds: Dataset, z: int) -> None:
        words = (np.frombuffer(ds.PixelData, "<u2").astype(np.int32) - 1024).astype("<i2")
        if broken:
            words = words.view("<u2").copy()
            words[::5] &= 0x0FFF  # a negative 12-bit value whose sign is not carried into bits 12-15
        ds.PixelRepresentation, ds.RescaleIntercept = 1, 0
        ds.PixelData = words.tobytes()
    return mutate


def _padded(ds: Dataset, z: int) -> None:
    ds[0x7FE00010] = _raw(0x7FE00010, "OW", ds.PixelData + b"\0\0")  # two bytes more than Rows x Columns


@pytest.mark.parametrize(("mutate", "mutate_read", "shortcut"), [
    (_high_bits, None, False), (_signed(broken=True), None, False), (None, _padded, False),
    (_signed(broken=False), None, True)], ids=["unused-high-bits", "signed-broken", "padded", "signed-12-bit"])
def test_pixel_data_a_decoder_would_change_is_decoded(tmp_path, monkeypatch, mutate, mutate_read, shortcut):
    series = write_series(tmp_path / "in", mutate=mutate, mutate_read=mutate_read)
    src = pydicom.dcmread(series.files[0])
    assert (derived._encoded_pixels(src) is not None) == shortcut
    assert write(series, tmp_path / "fast") == write_the_long_way(series, tmp_path / "slow", monkeypatch)


def _vendor(ds: Dataset, z: int) -> None:
    """Private elements at the top, in a sequence and in a ContributingEquipment item; Japanese names."""
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.add_new(0x00091010, "LO", "ACME CT 1")
    ds.add_new(0x00091001, "LO", f"acquisition detail {z % 2}")
    item = Dataset()
    item.CodeValue = "X1"
    item.add_new(0x00111010, "LO", "ACME")
    item.add_new(0x00111001, "LO", "private")
    ds.ProcedureCodeSequence = Sequence([item])
    equipment = Dataset()
    equipment.Manufacturer = "Other vendor"
    equipment.add_new(0x00131010, "LO", "OTHER")
    equipment.add_new(0x00131001, "LO", "x")
    ds.ContributingEquipmentSequence = Sequence([equipment])


def _odd_text(ds: Dataset, z: int) -> None:
    """Values pydicom writes back differently from how they were read (and one it writes back unchanged)."""
    ds[STUDY_DESCRIPTION] = _raw(STUDY_DESCRIPTION, "LO", b"Study   ")  # padded with three spaces
    ds[0x00200011] = _raw(0x00200011, "IS", b"+3")
    ds[0x00081090] = _raw(0x00081090, "UN", b"model ")  # a known tag received as UN
    ds[0x00100010] = _raw(0x00100010, "PN", b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B")


@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
                         ids=["explicit-le", "implicit-le"])
def test_header_values_are_written_as_the_long_way_writes_them(tmp_path, monkeypatch, transfer_syntax):
    series = write_series(tmp_path / "in", transfer_syntax, mutate=_vendor, mutate_read=_odd_text)
    files = write(series, tmp_path / "fast")
    assert files == write_the_long_way(series, tmp_path / "slow", monkeypatch)
    ds = pydicom.dcmread(tmp_path / "fast" / next(iter(files)))
    assert not any(e.tag.is_private for e in ds), "vendor tags go"
    assert not any(e.tag.is_private for e in ds.ProcedureCodeSequence[0])
    assert ds.StudyDescription == "Study"


def test_a_repeated_value_is_left_as_read_once_checked(tmp_path):
    series = write_series(tmp_path / "in", mutate=_vendor, mutate_read=_odd_text)
    verbatim: dict = {}
    for f in series.files[:3]:
        ds = pydicom.dcmread(f)
        derived._remove_private_tags(ds, verbatim)
    patient_id = ds.get_item("PatientID")
    assert patient_id.is_raw, "the third time, a value pydicom writes back unchanged is not converted"
    assert not ds.get_item(STUDY_DESCRIPTION).is_raw, "a value pydicom writes back otherwise is converted"
    assert not ds.get_item("SOPInstanceUID").is_raw, "a value seen once is converted, never checked"
    assert not any(elem.tag.is_private for elem in ds)


def test_derive_slice_takes_the_source_it_is_given(tmp_path):
    series = write_series(tmp_path / "in")
    src = pydicom.dcmread(series.files[0])
    uids = derived.source_uids(series, MODEL)
    ds = derived.derive_slice(src, np.zeros(SHAPE[1:], np.float32), np.zeros(SHAPE[1:], bool), uids, MODEL, "test",
                              derived.DerivedOptions())
    assert ds is src and ds.SeriesInstanceUID == uids["series"]
