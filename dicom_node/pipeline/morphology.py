"""Dilation and erosion by a physical radius, in bounded memory and linear time.

A 512×512×600 CTA has 157 M voxels. Dilating it with a 1.4 mm ball by brute force
touches every voxel a few hundred times, and a whole-volume distance transform needs
1.2 GB of float64. Working on the mask's bounding box in z-slabs, with a distance
transform per slab, keeps both the time and the memory proportional to one slab.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

SLAB = 48  # slices per distance-transform slab (plus overlap)


def _bbox(mask: np.ndarray, pad: np.ndarray) -> tuple[slice, ...] | None:
    idx = np.argwhere(mask.any(axis=(1, 2)))
    if len(idx) == 0:
        return None
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        nz = np.flatnonzero(mask.any(axis=other))
        lo = max(int(nz[0]) - int(pad[axis]), 0)
        hi = min(int(nz[-1]) + int(pad[axis]) + 1, mask.shape[axis])
        out.append(slice(lo, hi))
    return tuple(out)


def dilate_mm(mask: np.ndarray, spacing: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    """Voxels within ``radius_mm`` (centre to centre) of any mask voxel."""
    sp = np.asarray(spacing, float)
    out = np.zeros(mask.shape, bool)
    if radius_mm <= 0:
        out |= mask
        return out
    pad = np.ceil(radius_mm / sp).astype(int) + 1
    box = _bbox(mask, pad)
    if box is None:
        return out
    sub = mask[box]
    z_over = int(pad[0])
    for z0 in range(0, sub.shape[0], SLAB):
        z1 = min(z0 + SLAB, sub.shape[0])
        a, b = max(z0 - z_over, 0), min(z1 + z_over, sub.shape[0])
        dist = ndimage.distance_transform_edt(~sub[a:b], sampling=sp)
        out[box][z0:z1] = dist[z0 - a:z1 - a] <= radius_mm + 1e-6
    return out


def erode_mm(mask: np.ndarray, spacing: tuple[float, float, float], radius_mm: float,
             outside_is_foreground: bool = True) -> np.ndarray:
    """Voxels whose whole ``radius_mm`` neighbourhood is in the mask.

    ``outside_is_foreground``: a structure cut by the field of view is not eroded from
    the cut, because it continues beyond it.
    """
    sp = np.asarray(spacing, float)
    out = np.zeros(mask.shape, bool)
    pad = np.ceil(radius_mm / sp).astype(int) + 1
    box = _bbox(mask, pad)
    if box is None:
        return out
    widths = [(p if s.start == 0 else 0, p if s.stop == n else 0) for p, s, n in zip(pad, box, mask.shape)]
    # inside the volume the box margin is background; past the volume's edge, per the flag
    sub = np.pad(mask[box], widths, constant_values=outside_is_foreground)
    if sub.all():
        out[box] = True
        return out
    core = np.zeros(sub.shape, bool)
    z_over = int(pad[0])
    for z0 in range(0, sub.shape[0], SLAB):
        z1 = min(z0 + SLAB, sub.shape[0])
        a, b = max(z0 - z_over, 0), min(z1 + z_over, sub.shape[0])
        part = sub[a:b]
        if part.all():
            core[z0:z1] = True
            continue
        core[z0:z1] = ndimage.distance_transform_edt(part, sampling=sp)[z0 - a:z1 - a] > radius_mm + 1e-6
    out[box] = core[widths[0][0]:core.shape[0] - widths[0][1], widths[1][0]:core.shape[1] - widths[1][1],
                    widths[2][0]:core.shape[2] - widths[2][1]]
    return out


def open_mm(mask: np.ndarray, spacing: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    """Morphological opening by a ball: what a ball of that radius can sweep inside the mask."""
    return dilate_mm(erode_mm(mask, spacing, radius_mm), spacing, radius_mm) & mask
