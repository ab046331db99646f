"""Self-supervised patches from a site's own CT series (tools/train.py --dicom)."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_node_lab import phantom
from dicom_node_lab.phantom_dicom import write_phantom_series
from dicom_node_lab.selfsupervised import DicomPatchSource

from ..conftest import SHARED_DATA


def test_patches_avoid_calcium_and_use_the_scan_as_target(tmp_path):
    opts = phantom.PhantomOptions(n_vessels=(2, 2), calcified_probability=1.0, bone_probability=0.0)
    p = phantom.generate((40, 64, 64), seed=12, options=opts)
    write_phantom_series(p, tmp_path / "site" / "cta")
    source = DicomPatchSource([tmp_path / "site"])
    rng = np.random.default_rng(0)
    got = [source.sample(rng) for _ in range(6)]
    got = [g for g in got if g is not None]
    assert got, "a CTA with contrast-filled vessels yields patches"
    for patch in got:
        inside = patch.mask > 0.5
        assert inside.sum() in (8 ** 3, 16 ** 3)
        assert patch.image[inside].max() <= 700.0, "no calcium under the mask: the scan is the truth there"
        assert patch.image[inside].max() >= 200.0, "the mask covers contrast, not just fat"
        assert np.array_equal(patch.target, patch.image)


@pytest.mark.skipif(not (SHARED_DATA / "real-ct-siemens-j2k").is_dir(), reason="shared/data not beside checkout")
def test_coarse_series_are_refused():
    with pytest.raises(ValueError, match="no usable CT series"):
        DicomPatchSource([SHARED_DATA])
