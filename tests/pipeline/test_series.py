"""Reading real-world CT: the anonymised Siemens JPEG 2000 series in ../shared/data."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.pipeline.series import SeriesError, load_hu, order_series, read_ct_series
from dicom_node.pipeline.subtract import SubtractOptions

from ..conftest import SHARED_DATA

REAL = SHARED_DATA / "real-ct-siemens-j2k"
TOSHIBA = SHARED_DATA / "real-ct-toshiba-qrm-phantom"


@pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} not present (shared/ must sit beside the checkout)")
def test_reads_the_real_siemens_series():
    series, notes = read_ct_series([SHARED_DATA])
    [s] = [x for x in series if x.files[0].parent == REAL]
    assert len(s.files) == 20
    assert s.spacing == pytest.approx((2.0, 0.9765625, 0.9765625))
    # a Siemens header states the kernel and its iterative strength (Br38f\3): a site's table names the kernel
    assert s.kernel == "Br38f\\3"
    assert SubtractOptions(kernels=(("BR38F", 4.0),)).for_kernel(s.kernel).blur.mtf50_lp_cm == 4.0
    vol = load_hu(s)
    assert vol.shape == (20, 512, 512) and vol.dtype == np.float32
    assert vol.min() == pytest.approx(-1024.0)  # modality LUT applied (intercept -1024)
    assert vol.max() > 1000  # bone survives JPEG 2000 decoding
    assert any("README.md" in n for n in notes), "non-DICOM files are reported, not fatal"
    # slices are ordered along the normal, not by file name or InstanceNumber
    z = [float(h.ImagePositionPatient[2]) for h in s.headers]
    assert z == sorted(z)


def _slices(tmp_path, positions, uid="1.2.3.4"):
    items = []
    for i, zpos in enumerate(positions):
        ds = pydicom.Dataset()
        ds.SeriesInstanceUID = uid
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, zpos]
        ds.PixelSpacing = [0.4, 0.4]
        ds.Rows = ds.Columns = 4
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        items.append((tmp_path / f"{i}.dcm", ds))
    return items


def test_missing_slice_is_an_error(tmp_path):
    with pytest.raises(SeriesError, match="missing slices"):
        order_series("1.2.3.4", _slices(tmp_path, [0, 0.5, 1.0, 2.0, 2.5]))


def test_order_follows_position_not_input_order(tmp_path):
    s = order_series("1.2.3.4", _slices(tmp_path, [1.0, 0.0, 0.5, 1.5]))
    assert [float(h.ImagePositionPatient[2]) for h in s.headers] == [0.0, 0.5, 1.0, 1.5]
    assert s.spacing[0] == pytest.approx(0.5)


def test_gantry_tilt_is_refused(tmp_path):
    items = _slices(tmp_path, [0, 0.5, 1.0, 1.5])
    for i, (_, ds) in enumerate(items):
        ds.ImagePositionPatient = [0, 0.3 * i, 0.5 * i]
    with pytest.raises(SeriesError, match="gantry tilt"):
        order_series("1.2.3.4", items)


@pytest.mark.skipif(not TOSHIBA.is_dir(), reason=f"{TOSHIBA} not present (shared/ must sit beside the checkout)")
def test_a_scanner_reformat_marked_derived_primary_is_read(tmp_path, capsys):
    """A real Toshiba Aquilion ONE cardiac series, ImageType DERIVED\\PRIMARY\\MPR (a console reformat): read as
    a volume, and refused by `process` for its 3 mm slices, not for being DERIVED."""
    from dicom_node.cli import main

    series, _ = read_ct_series([TOSHIBA])
    [s] = series
    assert len(s.files) == 47 and list(s.headers[0].ImageType)[:2] == ["DERIVED", "PRIMARY"]
    assert s.kernel == "FC12", "a Toshiba (Canon) kernel, single-valued"
    assert s.spacing[0] == pytest.approx(3.0)
    assert main(["process", str(TOSHIBA), str(tmp_path / "out"), "--quiet"]) == 2
    out = capsys.readouterr()
    assert "too coarse for coronary work" in out.out + out.err and "DERIVED" not in out.out + out.err


@pytest.mark.skipif(not TOSHIBA.is_dir(), reason=f"{TOSHIBA} not present (shared/ must sit beside the checkout)")
def test_derived_secondary_and_our_own_output_are_refused(tmp_path):
    from dicom_node.pipeline.series import MANUFACTURER

    files = sorted(f for f in TOSHIBA.iterdir() if f.name != "LICENSE")[:3]
    for kind in ("secondary", "ours", "listed-off"):
        folder = tmp_path / kind
        folder.mkdir()
        for f in files:
            ds = pydicom.dcmread(f)
            if kind in ("secondary", "listed-off"):
                ds.ImageType = ["DERIVED", "SECONDARY", "MPR"]
            else:
                item = pydicom.Dataset()
                item.Manufacturer = MANUFACTURER
                ds.ContributingEquipmentSequence = [item]
            ds.save_as(folder / f.name)
        refused = () if kind == "listed-off" else ("DERIVED\\SECONDARY",)
        series, notes = read_ct_series([folder], refused=refused)
        if kind == "listed-off":
            assert len(series) == 1, notes  # an operator may take DERIVED\\SECONDARY reconstructions in
        else:
            assert series == [] and any(("intake.refuse_image_types" if kind == "secondary" else "our own output")
                                        in n for n in notes), notes
