"""Calcium that is brighter than its own vessel's contrast, though below the fixed threshold.

A thin calcified ring of 800-1000 HU blurs to 500-650 HU: below the paper's 700 HU,
yet brighter than the 300-450 HU lumen it surrounds. Left in place, it reads as lumen,
and the stenosis under it is under-called by 20-30 points (Experiment 2 tuning studies).
One global threshold cannot separate it from a brighter vessel elsewhere in the same
study, so each voxel is compared with the contrast level around it.

The level is a normalised convolution on a coarse grid (blocks of ``BLOCK``³ voxels):
cheap, and a few MB for a 512×512×600 series, where a full-resolution map would be
another float32 copy of the volume. Band passes around the previous estimate keep
vessel edges (partial volume with tissue) and the calcium itself from pulling it.

Speed: contrast is a few per cent of a chest CT, so each pass visits only the voxels that
can fall in its band and counts them into their cells, and the Gaussian runs only over the
box that holds them (sums and weights side by side, on two cores). On the 512x512x256
benchmark study this took detection from 6.2 to 4.3 s with identical maps; with HU values
that are not whole numbers the float32 sums may differ from the dense ones in the last bit
(1e-4 HU), which changed no detection in the tests.
"""

from __future__ import annotations

import threading

import numpy as np
from scipy import ndimage

from dicom_node.pipeline.morphology import padded_bbox

BLOCK = 2  # voxels per coarse-grid cell along each axis
SLAB = 32  # slices per pass (a multiple of BLOCK)
CONTRAST_RANGE_HU = (200.0, 800.0)  # what can be iodinated blood, for the first estimate
CORE_BAND_HU = 200.0  # above the first estimate, up to this: the vessel's core
NOISE_BAND_HU = 100.0  # the lumen's own spread around its level (noise)
MIN_WEIGHT = 0.5  # contrast voxels (smoothed) a cell needs before its level is trusted
# Neighbourhood of the level: at 2 mm a small bright vessel's level came out 120 HU low (its
# edges outnumber its core), and its noise passed for calcium; 1 mm keeps to the vessel itself.
SIGMA_MM = 1.0
# A deposit must stand out from the brightest contrast within this distance: where a dim
# vessel meets a brighter one, the brighter one's lumen is not calcium of the dim one.
NEIGHBOUR_MM = 1.0


def _cell_index(idx: np.ndarray, shape: tuple[int, ...], coarse_yx: tuple[int, int]) -> np.ndarray:
    """Flat coarse-cell index of each flat voxel index ``idx`` into an array of ``shape`` (cell rows from 0)."""
    z, y, x = np.unravel_index(idx, shape)
    cy, cx = coarse_yx
    return ((z // BLOCK) * cy + y // BLOCK) * cx + x // BLOCK


def _band_bounds(previous: np.ndarray | None, band: tuple[float, float]) -> tuple[float, float] | None:
    """HU bounds that hold every voxel the band can take (widened by 1 HU: only a pre-filter), or None."""
    if previous is None:
        return band
    finite = previous[np.isfinite(previous)]
    if not finite.size:
        return None
    return float(finite.min()) + band[0] - 1.0, float(finite.max()) + band[1] + 1.0


def _smooth(a: np.ndarray, sigma: list[float]) -> None:
    """Gaussian filter in place, run only over the box that holds the non-zero cells plus the kernel's reach:
    beyond it the result is exactly 0, and inside it every output sums the same taps in the same order, so the
    map is the one a filter over the whole grid gives, at a fraction of the cost (contrast fills little of a
    chest CT's grid)."""
    box = padded_bbox(a, [_reach(s) for s in sigma])
    if box is not None:
        a[box] = ndimage.gaussian_filter(a[box], sigma, mode="nearest")


def _reach(sigma: float, truncate: float = 4.0) -> int:
    """How far scipy's Gaussian kernel reaches, in cells (gaussian_filter1d's radius)."""
    return int(truncate * float(sigma) + 0.5)


def _level(volume: np.ndarray, spacing: tuple[float, float, float], sigma_mm: float,
           previous: np.ndarray | None, band: tuple[float, float]) -> np.ndarray:
    """Coarse map of the mean of the voxels in ``previous + band``; nan where too few are.

    Without ``previous`` the band is absolute HU. Only the voxels that can fall in the band are visited
    (contrast is a few per cent of a CT): each is counted into its cell, where the dense block sums
    it replaced spent most of detection's time. Sums of whole HU values are exact in any order.
    """
    coarse_shape = tuple(-(-n // BLOCK) for n in volume.shape)
    _, cy, cx = coarse_shape
    sums = np.zeros(coarse_shape, np.float32)
    weights = np.zeros(coarse_shape, np.float32)
    bounds = _band_bounds(previous, band)
    flat_previous = None if previous is None else previous.reshape(-1)
    for z0 in range(0, volume.shape[0] if bounds else 0, SLAB):
        slab = volume[z0:z0 + SLAB]
        idx = np.flatnonzero((slab >= bounds[0]) & (slab < bounds[1]))
        if not idx.size:
            continue
        values = slab.reshape(-1)[idx]
        cell = _cell_index(idx, slab.shape, (cy, cx))
        c0, rows = z0 // BLOCK, -(-slab.shape[0] // BLOCK)
        ref = 0.0 if flat_previous is None else flat_previous[cell + c0 * cy * cx]
        inside = (values >= ref + band[0]) & (values < ref + band[1])  # nan (no level) compares False
        cell = cell[inside]
        n = rows * cy * cx
        sums[c0:c0 + rows] = np.bincount(cell, weights=values[inside], minlength=n).reshape(rows, cy, cx)
        weights[c0:c0 + rows] = np.bincount(cell, minlength=n).reshape(rows, cy, cx)
    sigma = [sigma_mm / (BLOCK * sp) for sp in spacing]
    # The two filters are independent and scipy releases the GIL in them: side by side, on two cores.
    helper = threading.Thread(target=_smooth, args=(weights, sigma), name="contrast-smooth")
    helper.start()
    _smooth(sums, sigma)
    helper.join()
    with np.errstate(invalid="ignore", divide="ignore"):
        level = sums / weights
    level[weights < MIN_WEIGHT] = np.nan
    return level


def local_lumen_level(volume: np.ndarray, spacing: tuple[float, float, float], sigma_mm: float = SIGMA_MM
                      ) -> np.ndarray:
    """Contrast level around each BLOCK³ cell of the volume, in HU (nan: no contrast nearby).

    The mean of everything that may be contrast is pulled down by the vessel's edges
    (partial volume with tissue): in a small vessel the edges outnumber the core, and a
    level 150 HU too low made lumen noise look like calcium. The voxels from that first
    mean up to ``CORE_BAND_HU`` above it are the vessel's core (and faint calcium); a
    band of ±``NOISE_BAND_HU`` around their mean is the lumen itself.
    """
    first = _level(volume, spacing, sigma_mm, None, CONTRAST_RANGE_HU)
    core = _level(volume, spacing, sigma_mm, first, (0.0, CORE_BAND_HU))
    return _level(volume, spacing, sigma_mm, core, (-NOISE_BAND_HU, NOISE_BAND_HU))


def brightest_level_nearby(level: np.ndarray, spacing: tuple[float, float, float],
                           radius_mm: float = NEIGHBOUR_MM) -> np.ndarray:
    """The highest level within ``radius_mm`` of each cell (nan where there is none)."""
    size = [2 * int(round(radius_mm / (BLOCK * sp))) + 1 for sp in spacing]
    out = ndimage.maximum_filter(np.nan_to_num(level, nan=-np.inf), size=size, mode="nearest")
    out[np.isneginf(out)] = np.nan
    return out


def lumen_level_at(volume: np.ndarray, spacing: tuple[float, float, float], idx: np.ndarray) -> np.ndarray:
    """The brightest contrast level near each voxel ``idx`` (n, 3) of ``volume`` (nan: no contrast nearby).

    What the visible-lumen guard and the subtraction compare a voxel with: the level the
    detector measures, from :func:`local_lumen_level` and :func:`brightest_level_nearby`.
    """
    level = brightest_level_nearby(local_lumen_level(volume, spacing), spacing)
    return level[tuple((idx // BLOCK).T)]


def brighter_than_lumen(volume: np.ndarray, floor_hu: float,
                        tests: list[tuple[np.ndarray, float]]) -> list[np.ndarray]:
    """For each (level, contrast_hu) test, the voxels above ``floor_hu`` and ``contrast_hu`` above that level.

    Levels are coarse maps (from :func:`local_lumen_level`); all tests share one pass
    over the volume, which visits only the voxels above the floor.
    """
    out = [np.zeros(volume.shape, bool) for _ in tests]
    _, cy, cx = tests[0][0].shape if tests else (0, 0, 0)
    for z0 in range(0, volume.shape[0] if tests else 0, SLAB):
        slab = volume[z0:z0 + SLAB]
        idx = np.flatnonzero(slab > floor_hu)
        if not idx.size:
            continue
        values = slab.reshape(-1)[idx]
        cell = _cell_index(idx, slab.shape, (cy, cx)) + (z0 // BLOCK) * cy * cx
        for mask, (level, contrast_hu) in zip(out, tests):
            above = values > level.reshape(-1)[cell] + contrast_hu  # nan (no level) compares False
            mask[z0:z0 + SLAB].reshape(-1)[idx[above]] = True
    return out
