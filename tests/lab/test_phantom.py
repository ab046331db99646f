from __future__ import annotations

import numpy as np
from scipy import ndimage

from dicom_node.pipeline.morphology import dilate_mm
from dicom_node_lab import phantom


def test_same_seed_same_volume_and_different_seed_differs():
    a = phantom.generate((24, 24, 24), seed=5)
    b = phantom.generate((24, 24, 24), seed=5)
    c = phantom.generate((24, 24, 24), seed=6)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.truth, b.truth)
    assert not np.array_equal(a.image, c.image)


def test_any_size_and_anisotropic_spacing():
    p = phantom.generate((20, 40, 30), spacing=(0.6, 0.4, 0.35), seed=3)
    for arr in (p.image, p.truth, p.calcium_mask, p.lumen_mask, p.calcium_fraction):
        assert arr.shape == (20, 40, 30)
    assert p.image.dtype == np.float32 and p.lumen_mask.dtype == bool
    assert p.spacing == (0.6, 0.4, 0.35)
    assert p.vessels and all(len(v.points_mm) == len(v.radius_mm) for v in p.vessels)


def test_truth_differs_only_around_calcium(calcified_phantoms):
    for p in calcified_phantoms:
        diff = np.abs(p.image - p.truth)
        near = dilate_mm(p.calcium_fraction > 0, p.spacing, 2.5)
        assert diff[~near].max() < 1.0, "image and truth share blur and noise away from calcium"
        assert diff[near].max() > 100.0, "calcium must be visible in the image"


def test_truth_has_no_calcium_and_keeps_the_lumen(calcified_phantoms):
    for p in calcified_phantoms:
        core = p.calcium_mask
        assert core.any()
        # calcium voxels become plaque tissue in the truth (faint spots blur away, hence the mean)
        assert np.mean(p.image[core] - p.truth[core]) > 50
        assert np.median(p.truth[core]) < 250
        # the true lumen never overlaps calcium: the plaque's footprint stays tissue
        assert not (p.lumen_mask & core).any()
        assert np.median(p.truth[p.lumen_mask]) > 250


def test_literature_ranges_over_many_seeds():
    sizes, kinds, diam = [], set(), []
    for seed in range(30):
        p = phantom.generate((48, 48, 48), seed=seed)
        lab, n = ndimage.label(p.calcium_mask, structure=np.ones((3, 3, 3)))
        sizes += list(ndimage.sum(p.calcium_mask, lab, range(1, n + 1)))
        kinds |= {les.kind for les in p.lesions}
        diam += [2 * v.radius_mm.max() for v in p.vessels]
        assert 10.0 <= p.noise_sd <= 50.0
        assert all(0.5 <= f <= 1.1 for f in p.fwhm_mm)
    assert kinds >= {"spotty", "eccentric", "concentric", "long", "soft"}
    sizes = np.array(sizes)
    assert np.median(sizes) > 20 and sizes.max() <= 600
    assert min(diam) >= 1.8 and max(diam) <= 5.0


def test_lesions_narrow_the_true_lumen():
    """A plaque's volume narrows the lumen in the truth: a real stenosis, not a normal vessel."""
    narrowed = 0
    for seed in range(12):
        p = phantom.generate((48, 48, 48), seed=seed)
        for les in p.lesions:
            v = p.vessels[les.vessel]
            centre = np.round(np.asarray(les.point_mm) / p.spacing).astype(int)
            if np.any(centre < 2) or np.any(centre >= 46):
                continue
            r = v.radius_mm[les.index]
            region = tuple(slice(c - 2, c + 3) for c in centre)
            lumen_frac = p.lumen_mask[region].mean()
            narrowed += lumen_frac < 1.0 and r > 0
    assert narrowed > 0


def test_calcium_kind_weights_choose_the_kinds():
    """Training can weight the hard kinds up; without weights every kind is still drawn."""
    only_rings = phantom.PhantomOptions(calcified_probability=1.0, calcium_kind_weights=(0.0, 0.0, 1.0, 0.0))
    kinds = set()
    for seed in range(6):
        kinds |= {les.kind for les in phantom.generate((24, 24, 24), seed=seed, options=only_rings).lesions}
    assert kinds == {"concentric"}
    even = phantom.PhantomOptions(calcified_probability=1.0, plaques_per_vessel=(3, 3))
    drawn = [les.kind for seed in range(40) for les in phantom.generate((24, 24, 24), seed=seed, options=even).lesions]
    assert len(set(drawn)) == 4
