from __future__ import annotations

import numpy as np

from dicom_node_lab import baselines, masks
from dicom_node_lab.patches import cut, detected_calcium


def test_cube_masks_are_centred():
    for size in (16, 8):
        m = masks.cube_mask((32, 32, 32), size)
        assert m.sum() == size ** 3
        zz, yy, xx = np.nonzero(m)
        assert zz.min() == 16 - size // 2 and zz.max() == 15 + size // 2


def test_footprint_margin_is_physical_on_anisotropic_grids():
    calc = np.zeros((21, 21, 21), bool)
    calc[10, 10, 10] = True
    m = masks.footprint_mask(calc, (1.0, 0.5, 0.5), margin_mm=1.4)
    assert m[10, 10, 10 + 2] and not m[10, 10, 10 + 3]  # 2 voxels of 0.5 mm in-plane
    assert m[11, 10, 10] and not m[12, 10, 10]  # 1 voxel of 1 mm along z


def test_classical_baselines_fill_smooth_fields():
    z, y, x = np.mgrid[:24, :24, :24].astype(np.float32)
    field = 3 * x + 2 * y - z
    mask = masks.cube_mask(field.shape, 8)
    bh = baselines.biharmonic(field, mask)
    nn = baselines.nearest_fill(field, mask)
    inside = mask > 0.5
    assert np.abs(bh - field)[inside].max() < 0.5  # linear fields are biharmonic
    assert np.abs(nn - field)[inside].max() > 5  # nearest fill is piecewise constant
    assert np.array_equal(bh[~inside], field[~inside]) and np.array_equal(nn[~inside], field[~inside])


def test_footprint_patches_cover_the_calcium(calcified_phantoms):
    rng = np.random.default_rng(0)
    for p in calcified_phantoms:
        patch = cut(rng, p, "footprint")
        assert patch is not None and patch.mask.sum() > 0
        inside = patch.mask > 0.5
        # inside the mask the target is the calcium-free truth; outside it is the input
        assert np.array_equal(patch.target[~inside], patch.image[~inside])
        assert patch.image[inside].max() > patch.target[inside].max()
    det = detected_calcium(calcified_phantoms[0].image, calcified_phantoms[0].calcium_fraction)
    assert det[calcified_phantoms[0].calcium_mask].all()


def test_training_margin_sets_the_footprint_size(calcified_phantoms):
    """tools/train.py --margin-mm must reach the masks: the engine's margin is trained for, not assumed."""
    p = calcified_phantoms[0]
    narrow = cut(np.random.default_rng(3), p, "footprint", margin_mm=0.6)
    wide = cut(np.random.default_rng(3), p, "footprint", margin_mm=2.0)
    assert narrow is not None and wide is not None
    assert np.array_equal(narrow.image, wide.image)  # same patch, same draw
    assert wide.mask.sum() > 1.5 * narrow.mask.sum()
    assert np.all(wide.mask >= narrow.mask)


def test_patches_know_their_lumen_level(calcified_phantoms):
    """The lumen-boundary loss needs the contrast level the stenosis ruler uses: the vessel's own."""
    rng = np.random.default_rng(1)
    for p in calcified_phantoms:
        patch = cut(rng, p, "footprint")
        levels = np.concatenate([v.lumen_hu for v in p.vessels])
        assert levels.min() - 1e-3 <= patch.lumen_hu <= levels.max() + 1e-3


def test_lumen_boundary_loss_scores_the_side_of_the_reader_threshold():
    import torch

    from dicom_node_lab.model.training import lumen_boundary_loss

    target = torch.full((2, 1, 4, 4, 4), 100.0)  # plaque behind the calcium
    mask = torch.zeros_like(target)
    mask[:, :, 1:3, 1:3, 1:3] = 1.0
    level = torch.tensor([450.0, 450.0])  # reader's threshold (450 + 50) / 2 = 250 HU
    assert float(lumen_boundary_loss(target.clone(), target, mask, level)) < 1e-4
    hedged = target.clone()
    hedged[mask > 0] = 300.0  # between plaque and lumen: a reader counts it as lumen
    below = target.clone()
    below[mask > 0] = -100.0  # as far off in HU (200), but on the tissue side of the threshold
    assert float(lumen_boundary_loss(hedged, target, mask, level)) > 0.5
    assert float(lumen_boundary_loss(below, target, mask, level)) < 0.25 * float(
        lumen_boundary_loss(hedged, target, mask, level))
    outside = target.clone()
    outside[mask == 0] = 400.0  # outside the mask nothing is scored
    assert float(lumen_boundary_loss(outside, target, mask, level)) < 1e-4
    unknown = torch.tensor([float("nan"), float("nan")])
    assert float(lumen_boundary_loss(hedged, target, mask, unknown)) == 0.0
