"""Reading real-world CT: the anonymised Siemens JPEG 2000 series in ../shared/data."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.dicom.series import SeriesError, load_hu, order_series, read_ct_series

from .conftest import SHARED_DATA

REAL = SHARED_DATA / "real-ct-siemens-j2k"


@pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} not present (shared/ must sit beside the checkout)")
def test_reads_the_real_siemens_series():
    series, notes = read_ct_series([SHARED_DATA])
    assert len(series) == 1
    s = series[0]
    assert len(s.files) == 20
    assert s.spacing == pytest.approx((2.0, 0.9765625, 0.9765625))
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
