"""Detection's shortcuts give exactly what the plain whole-volume operations give.

Labelling in the mask's box and eroding only around the voxels that can survive are there for
speed (a CTA's bright voxels fill a fraction of the volume); these tests hold them to the plain
scipy answers on masks built to find the edges: blobs cut by the volume's edge, thin strands
beside thick ones, empty masks.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from dicom_node.pipeline import morphology
from dicom_node.pipeline.detect import CONNECTIVITY_26, _label


def _masks(seed: int, n: int) -> list[tuple[np.ndarray, tuple[float, float, float]]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        shape = tuple(int(x) for x in rng.integers(6, 48, 3))
        mask = ndimage.gaussian_filter(rng.random(shape), float(rng.uniform(0.5, 3.0))) > rng.uniform(0.45, 0.6)
        z, y, x = (int(rng.integers(0, s)) for s in shape)
        mask[z, :, x] = True  # a one-voxel strand across the volume, touching thicker parts
        mask[:, y, min(x + 3, shape[2] - 1)] = True  # and a one-voxel sheet
        out.append((mask, tuple(float(v) for v in rng.uniform(0.3, 1.2, 3))))
    return out


def _plain_erosion(mask: np.ndarray, sp: tuple[float, float, float], radius: float, outside: bool) -> np.ndarray:
    pad = int(np.ceil(radius / min(sp))) + 2
    padded = np.pad(mask, pad, constant_values=outside)
    return (ndimage.distance_transform_edt(padded, sampling=sp) > radius + 1e-6)[pad:-pad, pad:-pad, pad:-pad]


@pytest.mark.parametrize("outside", [True, False])
def test_erosion_around_the_possible_survivors_equals_the_whole_volume_erosion(outside: bool) -> None:
    rng = np.random.default_rng(3)
    kept = 0
    for mask, sp in _masks(11 + outside, 40):
        radius = float(rng.uniform(0.3, 3.0))
        want = _plain_erosion(mask, sp, radius, outside)
        got = morphology.erode_mm(mask, sp, radius, outside)
        assert np.array_equal(got, want)
        kept += int(want.any() and not want.all())
    assert kept >= 10  # the cases had survivors to get right, not only empty or full erosions


def test_erosion_of_a_thick_blob_beside_a_long_thin_strand() -> None:
    """The box is the survivors' box: strand voxels inside it, whose background lies outside it, must
    not pass for survivors."""
    mask = np.zeros((40, 60, 60), bool)
    mask[15:25, 20:30, 20:30] = True  # survives a 1.5 mm erosion at 0.5 mm voxels in its middle
    mask[20, 25, :] = True  # a strand through the blob and out across the volume
    mask[18:22, 24:27, :] = True  # and a bar 4 × 3 voxels thick: too thin to survive
    sp = (0.5, 0.5, 0.5)
    want = _plain_erosion(mask, sp, 1.5, True)
    assert want.any()
    assert np.array_equal(morphology.erode_mm(mask, sp, 1.5), want)


def test_labels_in_the_box_equal_the_whole_volume_labels() -> None:
    for mask, _ in _masks(5, 30) + [(np.zeros((5, 6, 7), bool), (1.0, 1.0, 1.0))]:
        mask = mask & (np.random.default_rng(int(mask.sum())).random(mask.shape) > 0.3)  # many components
        want = np.zeros(mask.shape, np.int32)
        n_want = ndimage.label(mask, structure=CONNECTIVITY_26, output=want)
        got, n, objects = _label(mask)
        assert got.dtype == np.uint16 and n == n_want
        assert np.array_equal(got, want)
        assert objects == ndimage.find_objects(want)


def test_a_mask_in_one_corner_is_labelled_in_place() -> None:
    mask = np.zeros((30, 40, 50), bool)
    mask[25:, 33:, 44:] = True
    mask[0, 0, 0] = True
    got, n, objects = _label(mask)
    assert n == 2 and got[0, 0, 0] == 1 and (got[25:, 33:, 44:] == 2).all()
    assert objects == [(slice(0, 1), slice(0, 1), slice(0, 1)), (slice(25, 30), slice(33, 40), slice(44, 50))]


def test_erosion_of_small_anisotropic_masks_equals_the_whole_volume_erosion() -> None:
    """Small masks, coarse and anisotropic voxels, many trials: among them are masks where a voxel that
    cannot survive sits near the edge of the survivors' box with its background beyond it (the first
    of them at trial 163), which only the survivors' own mask keeps from passing."""
    rng = np.random.default_rng(1)
    for _ in range(400):
        shape = tuple(int(x) for x in rng.integers(5, 16, 3))
        mask = ndimage.gaussian_filter(rng.random(shape), rng.uniform(0.5, 2)) > rng.uniform(0.4, 0.6)
        sp = tuple(float(x) for x in rng.choice([0.5, 0.7, 1.0], 3))
        radius = float(rng.uniform(0.5, 2.5))
        for outside in (True, False):
            assert np.array_equal(morphology.erode_mm(mask, sp, radius, outside),
                                  _plain_erosion(mask, sp, radius, outside))
