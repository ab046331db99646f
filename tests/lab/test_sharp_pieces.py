"""The lab's count of the pieces the sharpened-image test drops (``dicom_node_lab.sharp_pieces``), behind
``engine.sharp_min_excess_mm3``: a small calcium piece must be listed as calcium with the excess the node compares,
a calcium-free lumen must list no calcium, and the summary must count what each threshold keeps."""

from __future__ import annotations

import numpy as np

from dicom_node.pipeline.detect import DetectOptions, detect
from dicom_node_lab import sharp_pieces
from tests.pipeline.test_contrast import SPACING, _scanned_vessel


def test_a_small_calcium_piece_is_listed_with_the_excess_the_node_keeps_it_by():
    options = DetectOptions(sharp_contrast_hu=150.0)
    vol, deposit = _scanned_vessel(750.0, 0, noise=80.0, length_mm=1.5, pool=True)
    rows = sharp_pieces.pieces(vol, SPACING, options, detect(vol, SPACING, options).calcium, deposit)
    calcium = [r for r in rows if r["calcium"]]
    assert len(calcium) == 1 and calcium[0]["mm3"] < options.sharp_min_volume_mm3
    # the node keeps it at 6 mm³ (tests/pipeline/test_contrast.py): the lab's figure must say so too
    assert calcium[0]["excess_noise_mm3"] >= 6.0
    clean, _ = _scanned_vessel(None, 0, noise=130.0, length_mm=1.5, pool=True)
    none = np.zeros(clean.shape, bool)
    assert not [r for r in sharp_pieces.pieces(clean, SPACING, options, none, none) if r["calcium"]]


def test_the_summary_counts_what_each_threshold_keeps():
    rows = [{"kernel": "soft", "calcium": True, "excess_noise_mm3": 9.0},
            {"kernel": "soft", "calcium": False, "excess_noise_mm3": 5.0},
            {"kernel": "sharp", "calcium": False, "excess_noise_mm3": 7.0},
            {"kernel": "sharp", "calcium": True, "excess_noise_mm3": None}]  # no measurable noise: not counted
    s = sharp_pieces.summary(rows, thresholds=(4.0, 6.0, 8.0))
    assert s["all"]["calcium"] == 1 and s["all"]["other"] == 2
    assert s["all"]["kept"]["4"] == {"calcium": 1, "other": 2}
    assert s["all"]["kept"]["6"] == {"calcium": 1, "other": 1}
    assert s["soft"]["kept"]["8"] == {"calcium": 1, "other": 0}
    assert s["sharp"]["kept"]["8"] == {"calcium": 0, "other": 0}
