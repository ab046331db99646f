"""Classical inpainting baselines for Experiment 1 (no learning involved).

They set the bar a network has to clear: if a smooth interpolation restores the
lumen as well as the Dense-Unet, the network is not worth shipping.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def nearest_fill(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Every masked voxel takes the value of the nearest unmasked one."""
    hidden = mask > 0.5
    if not hidden.any():
        return image.copy()
    _, idx = ndimage.distance_transform_edt(hidden, return_indices=True)
    return image[tuple(idx)]


def biharmonic(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Biharmonic (smoothest) fill of the masked voxels from their surroundings, in 3D."""
    from skimage.restoration import inpaint_biharmonic

    hidden = mask > 0.5
    if not hidden.any():
        return image.copy()
    out = inpaint_biharmonic(image.astype(np.float64), hidden)
    return np.where(hidden, out, image).astype(np.float32)


CLASSICAL = {"biharmonic": biharmonic, "nearest": nearest_fill}
