"""Diameter stenosis from a CT volume along a known centreline.

Experiment 2 measures the original, the calcium-removed and the true image with this
one method, so any difference between them comes from the images, not the ruler.
Like a reader, the method counts as lumen the contrast-range voxels connected to the
centre of each cross-section (holes from noise filled) inside the vessel's outer
boundary, and excludes what is clearly brighter than the lumen (calcium and its
blooming), which is exactly what makes calcified stenoses look worse than they are.
The outer boundary (nominal lumen radius + 0.3 mm) stops the count from leaking into
the blurred halo outside a calcified ring, which no reader would call lumen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from scipy import ndimage

from dicom_node_lab.reader import frames

TISSUE_HU = 50.0
BRIGHTER_THAN_LUMEN_HU = 100.0  # above lumen + this, a voxel reads as calcium or blooming
Level = TypeVar("Level")  # a float, a numpy array or a torch tensor of HU


def lumen_threshold(lumen_hu: Level) -> Level:
    """Where a reader puts the lumen edge: half-way between the vessel's contrast and tissue.

    One definition for the ruler and for the training loss that teaches the network to
    put the edge where the ruler will look; works on floats, arrays and tensors.
    """
    return 0.5 * (lumen_hu + TISSUE_HU)


@dataclass
class LumenProfile:
    s_mm: np.ndarray  # arclength of each sampled cross-section
    diameter_mm: np.ndarray  # equivalent diameter (from area); nan outside the volume


def lumen_profile(volume: np.ndarray, spacing: tuple[float, float, float], points_mm: np.ndarray,
                  lumen_hu: np.ndarray, radius_mm: np.ndarray, indices: np.ndarray, half_width_mm: float = 4.0,
                  pixel_mm: float = 0.1) -> LumenProfile:
    """Equivalent lumen diameter at the given centreline sample indices."""
    sp = np.asarray(spacing, float)
    t, n, b = frames(points_mm)
    u = np.arange(-half_width_mm, half_width_mm + 1e-6, pixel_mm)
    uu, vv = np.meshgrid(u, u, indexing="ij")
    centre = (len(u) // 2, len(u) // 2)
    extent = (np.asarray(volume.shape) - 1) * sp
    diam = np.full(len(indices), np.nan)
    for k, i in enumerate(indices):
        p = points_mm[i]
        if np.any(p - half_width_mm < 0) or np.any(p + half_width_mm > extent):
            continue
        plane = p[None, None, :] + uu[..., None] * n[i] + vv[..., None] * b[i]
        vals = ndimage.map_coordinates(volume, (plane / sp).transpose(2, 0, 1), order=1, mode="nearest")
        ref = float(lumen_hu[i])
        low = lumen_threshold(ref)
        high = ref + BRIGHTER_THAN_LUMEN_HU
        lumen = (vals > low) & (vals < high) & (np.hypot(uu, vv) <= radius_mm[i] + 0.3)
        lab, nlab = ndimage.label(lumen)
        if nlab == 0:
            diam[k] = 0.0
            continue
        seed = lab[centre]
        if seed == 0:  # centre covered by plaque: take the lumen part nearest to it, within 1 mm
            d = ndimage.distance_transform_edt(lab == 0, return_indices=True)[1]
            nearest = tuple(d[:, centre[0], centre[1]])
            if np.hypot(nearest[0] - centre[0], nearest[1] - centre[1]) * pixel_mm > 1.0:
                diam[k] = 0.0
                continue
            seed = lab[nearest]
        area = float(ndimage.binary_fill_holes(lab == seed).sum()) * pixel_mm ** 2
        diam[k] = 2.0 * np.sqrt(area / np.pi)
    return LumenProfile(s_mm=indices * 0.1, diameter_mm=diam)


def diameter_stenosis(profile: LumenProfile, lesion_s_mm: float, half_length_mm: float,
                      reference_gap_mm: float = 2.0, reference_length_mm: float = 3.0) -> float | None:
    """Percent diameter stenosis: minimal lumen over the lesion vs the median of proximal and distal references."""
    s, d = profile.s_mm, profile.diameter_mm
    in_lesion = np.abs(s - lesion_s_mm) <= half_length_mm
    off = np.abs(s - lesion_s_mm) - half_length_mm
    in_ref = (off >= reference_gap_mm) & (off <= reference_gap_mm + reference_length_mm)
    if not np.isfinite(d[in_lesion]).any() or np.isfinite(d[in_ref]).sum() < 3:
        return None
    d_min = float(np.nanmin(d[in_lesion]))
    d_ref = float(np.nanmedian(d[in_ref]))
    if d_ref <= 0:
        return None
    return 100.0 * (1.0 - d_min / d_ref)
