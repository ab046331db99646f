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
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

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


def _blocks(slab: np.ndarray) -> np.ndarray:
    """The slab as a (cz, B, cy, B, cx, B) view of BLOCK³ cells; partial cells padded with nan.

    nan compares False, so padding never counts: comparing a cell's voxels with the
    cell's level needs no full-resolution copy of the level.
    """
    pad = [(0, -n % BLOCK) for n in slab.shape]
    if any(p for _, p in pad):
        slab = np.pad(slab.astype(np.float32, copy=False), pad, constant_values=np.nan)
    cz, cy, cx = (n // BLOCK for n in slab.shape)
    return slab.reshape(cz, BLOCK, cy, BLOCK, cx, BLOCK)


def _cells(coarse: np.ndarray, z0: int, blocks: np.ndarray) -> np.ndarray:
    """The coarse values of the slab starting at slice ``z0``, shaped to broadcast against its blocks."""
    part = coarse[z0 // BLOCK: z0 // BLOCK + blocks.shape[0]]
    return part[:, None, :, None, :, None]


def _block_sum(v: np.ndarray) -> np.ndarray:
    """``v.sum(axis=(1, 3, 5))`` in float32 for blocks shaped (cz, BLOCK, cy, BLOCK, cx, BLOCK), added slice by
    slice: numpy's reduction over those short, strided axes was most of detection's time (4.6 of 8.7 s on a
    512x512x256 study). HU values are whole numbers, so the order of the additions changes nothing."""
    s = v[..., 0].astype(np.float32)
    for k in range(1, BLOCK):
        s += v[..., k]
    t = s[:, :, :, 0].copy()
    for k in range(1, BLOCK):
        t += s[:, :, :, k]
    u = t[:, 0].copy()
    for k in range(1, BLOCK):
        u += t[:, k]
    return u


def _level(volume: np.ndarray, spacing: tuple[float, float, float], sigma_mm: float,
           previous: np.ndarray | None, band: tuple[float, float]) -> np.ndarray:
    """Coarse map of the mean of the voxels in ``previous + band``; nan where too few are.

    Without ``previous`` the band is absolute HU.
    """
    coarse_shape = tuple(-(-n // BLOCK) for n in volume.shape)
    sums = np.zeros(coarse_shape, np.float32)
    weights = np.zeros(coarse_shape, np.float32)
    for z0 in range(0, volume.shape[0], SLAB):
        b = _blocks(volume[z0:z0 + SLAB])
        ref = 0.0 if previous is None else _cells(previous, z0, b)
        w = (b >= ref + band[0]) & (b < ref + band[1])  # nan (padding, or no level) compares False
        c = z0 // BLOCK
        sums[c:c + b.shape[0]] = _block_sum(np.where(w, b, np.float32(0.0)))
        weights[c:c + b.shape[0]] = _block_sum(w)
    sigma = [sigma_mm / (BLOCK * sp) for sp in spacing]
    ndimage.gaussian_filter(sums, sigma, output=sums, mode="nearest")
    ndimage.gaussian_filter(weights, sigma, output=weights, mode="nearest")
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


def brighter_than_lumen(volume: np.ndarray, floor_hu: float,
                        tests: list[tuple[np.ndarray, float]]) -> list[np.ndarray]:
    """For each (level, contrast_hu) test, the voxels above ``floor_hu`` and ``contrast_hu`` above that level.

    Levels are coarse maps (from :func:`local_lumen_level`); all tests share one pass
    over the volume.
    """
    out = [np.zeros(volume.shape, bool) for _ in tests]
    for z0 in range(0, volume.shape[0], SLAB):
        v = volume[z0:z0 + SLAB]
        b = _blocks(v)
        bright = b > floor_hu
        for mask, (level, contrast_hu) in zip(out, tests):
            above = bright & (b > _cells(level, z0, b) + contrast_hu)
            mask[z0:z0 + SLAB] = above.reshape(b.shape[0] * BLOCK, b.shape[2] * BLOCK, b.shape[4] * BLOCK)[
                :v.shape[0], :v.shape[1], :v.shape[2]]
    return out
