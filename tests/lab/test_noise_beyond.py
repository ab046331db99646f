"""The rules' noise test measured beyond a deposit's bloom (``engine.noise_away_mm``), on a world study where the
default test drops a deposit as noise: its bloom fills a 3.6 mm lumen and lifts the level around it."""

from __future__ import annotations

from scipy import ndimage

from dicom_node_lab import experiment2v2

# The recommended configuration's [engine] lines (README, Status; reports/issue16.md), as the lab's runs pass them
RECOMMENDED = ['method = "subtract"', 'subtract_estimate = "engines/calcium_excess_ref.npz"',
               'sharp_contrast_hu = 150', 'scanner_kernels = { SOFT = 3.41, STANDARD = 4.14, HD = 4.94, SHARP = 5.92 }',
               'scanner_edge_enhance = { SOFT = 0.05, STANDARD = 0.29, HD = 0.45, SHARP = 0.70 }',
               'subtract_companions = ["engines/calcium_excess_split.npz"]', 'subtract_combine = "enclosed"',
               'sharp_level = "sharpened"']


def test_a_deposit_lifting_its_own_lumens_level_is_kept_when_the_level_is_measured_beyond_it():
    # training study 7070-108, vessel 1, lesion 1: a 263° deposit 1.5 mm thick, 460 HU above its lumen as acquired
    p, _, _, plain = experiment2v2.detected_study(7070, 108, RECOMMENDED)
    _, _, _, away = experiment2v2.detected_study(7070, 108, RECOMMENDED + ["noise_away_mm = 2.0"])
    reached = [any(experiment2v2.reaches(p, 1, 1, lesion.bbox) for lesion in d.lesions) for d in (plain, away)]
    assert reached == [False, True]
    dropped = [e for e in plain.excluded if e["reason"].startswith("noise") and e["volume_mm3"] >= 10.0]
    assert dropped, "the default test takes the deposit's largest piece for noise"
    near_calcium = ndimage.binary_dilation(p.calcium_fraction > 0.1, iterations=3)
    added = away.calcium & ~plain.calcium
    assert added.sum() > 100 and not (added & ~near_calcium).any(), "only the deposit is added, nothing beside it"
