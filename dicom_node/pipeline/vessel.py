"""The vessel at a calcium deposit as a reader sees it: what counts as its lumen, and how wide it is.

Why a module of its own: the restoration (which lumen to hold, how sure a region is) and the subtraction's learnt
estimate (which reads the vessel's calibre as an input) both need these, and the restoration is built on the
subtraction; here they sit below both, so neither imports the other for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from dicom_node.pipeline.contrast import lumen_level_at
from dicom_node.pipeline.morphology import grow_box

# A reader puts the lumen's edge half-way between the contrast and the wall, and calls white what
# stands this far above the contrast (the reader model's levels, lab/dicom_node_lab/reader.py).
WALL_HU = 50.0
WHITE_ABOVE_LUMEN_HU = 100.0


def lumen_range(level: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What a reader takes for lumen at a local contrast ``level``: from the edge, half-way down to the
    wall, up to the white level (``WHITE_ABOVE_LUMEN_HU`` above the contrast)."""
    return 0.5 * (level + WALL_HU), level + WHITE_ABOVE_LUMEN_HU


CALIBRE_REACH_MM = 4.5  # the vessel's calibre is looked for this far around a region's box (a coronary's widest)
CALIBRE_TOUCH_MM = 1.5  # lumen this close to a region's calcium is its own vessel's (past the bloom's ring)


@dataclass(frozen=True)
class VesselAt:
    """The vessel at a region as the engine measures it (``vessel_at``).

    ``calibre_mm``: the diameter of the largest ball of its lumen. ``lumen_hu``: the median acquired value on the
    lumen's core (the voxels at least half as deep in it as the deepest), the contrast a reader sees in this
    vessel. Why the level too: the reader's edge lies half-way from the wall to it, so beside a dim lumen every
    error, the noise's and the restoration's, crosses that edge more often (reports/tuning/dim-lumens.md)."""

    calibre_mm: float
    lumen_hu: float


def vessel_at(volume: np.ndarray, spacing: tuple[float, float, float], box: tuple[slice, slice, slice],
              calcium: np.ndarray) -> VesselAt | None:
    """The vessel at a region: its calibre and its lumen's level (``VesselAt``).

    How wide a vessel is decides how far a restoration can be trusted: beside calcium a small
    lumen is a voxel or two wide, and an error of one voxel is a large share of its diameter.
    The lumen is what a reader takes for it (``lumen_range`` at the local contrast level, the
    calcium aside), within ``CALIBRE_REACH_MM`` of the region's box, which reaches past the
    calcium into the vessel on either side. Only the lumen connected to the region's own calcium
    counts (within ``CALIBRE_TOUCH_MM`` of it): a wider neighbour within reach (a larger vessel,
    a chamber) would otherwise lend the small vessel its calibre and hide it. Where no lumen
    touches the calcium, all the lumen within reach is measured. The largest inscribed ball
    measures the vessel where it is widest, so the narrowing itself does not shrink it; the level is
    read on the same lumen's core, away from its partial-volume rim. None where the box holds no
    contrast to measure.
    """
    grown = grow_box(box, volume.shape, np.ceil(CALIBRE_REACH_MM / np.asarray(spacing, float)).astype(int))
    sub = volume[grown]
    idx = np.argwhere(np.ones(sub.shape, bool))
    level = lumen_level_at(sub, spacing, idx).reshape(sub.shape)
    edge, white = lumen_range(level)
    lumen = np.isfinite(level) & (sub > edge) & (sub < white) & ~calcium[grown]
    if not lumen.any():
        return None
    own = np.zeros(sub.shape, bool)  # the region's calcium: the calcium in its own box, not a neighbour's
    inner = tuple(slice(b.start - g.start, b.stop - g.start) for b, g in zip(box, grown))
    own[inner] = calcium[box]
    near = ndimage.distance_transform_edt(~own, sampling=spacing) <= CALIBRE_TOUCH_MM
    parts, _ = ndimage.label(lumen, structure=np.ones((3, 3, 3), bool))
    touching = np.unique(parts[near & lumen])
    if touching.size:
        lumen = np.isin(parts, touching)
    # outside the box counts as not lumen: a vessel leaving the box is measured inside it (smaller, never larger)
    depth = ndimage.distance_transform_edt(np.pad(lumen, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    deepest = float(depth.max())
    core = lumen & (depth >= 0.5 * deepest)
    return VesselAt(calibre_mm=2.0 * deepest, lumen_hu=float(np.median(sub[core])))


def vessel_calibre_mm(volume: np.ndarray, spacing: tuple[float, float, float], box: tuple[slice, slice, slice],
                      calcium: np.ndarray) -> float | None:
    """The calibre of the vessel at a region (``vessel_at``'s ``calibre_mm``; None: no contrast to measure)."""
    at = vessel_at(volume, spacing, box, calcium)
    return None if at is None else at.calibre_mm
