"""Inpainting masks: the paper's centre cube and the calcium footprint.

The same functions build the masks for training and for inference, so the model is
never asked to restore a region shaped unlike the ones it learned on.
"""

from __future__ import annotations

import numpy as np

from dicom_node.pipeline.morphology import dilate_mm

MASK_MODES = ("cube16", "cube8", "footprint", "mixed")
DEFAULT_MARGIN_MM = 1.4  # blooming margin around thresholded calcium


def cube_mask(shape: tuple[int, int, int], size: int, centre: tuple[int, int, int] | None = None) -> np.ndarray:
    """A ``size``³ cube, at the patch centre unless ``centre`` is given."""
    mask = np.zeros(shape, np.float32)
    c = centre if centre is not None else tuple(s // 2 for s in shape)
    lo = [int(ci) - size // 2 for ci in c]
    mask[lo[0]:lo[0] + size, lo[1]:lo[1] + size, lo[2]:lo[2] + size] = 1.0
    return mask


def footprint_mask(calcium: np.ndarray, spacing: tuple[float, float, float],
                   margin_mm: float = DEFAULT_MARGIN_MM) -> np.ndarray:
    """Calcium voxels dilated by the blooming margin: the region whose values are unreliable."""
    return dilate_mm(calcium, spacing, margin_mm).astype(np.float32)


def core_box(shape: tuple[int, int, int], centre: tuple[int, int, int], size: int) -> tuple[slice, ...]:
    """The window's core: the part of a patch a window may restore; the rest is context."""
    out = []
    for c, n in zip(centre, shape):
        lo = int(np.clip(c - size // 2, 0, n - size))
        out.append(slice(lo, lo + size))
    return tuple(out)
