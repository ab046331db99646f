"""Self-supervised patches from a site's own CTA, as the paper trained on its 60 patients.

There is no calcium-free truth for a real scan, but wherever the masked region holds
no calcium the scan itself is the truth. Mixing such patches into training teaches the
network the site's scanner (noise texture, kernel, contrast timing) without labels.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from scipy import ndimage

from dicom_node.pipeline.detect import DEFAULT_THRESHOLD_HU
from dicom_node.pipeline.series import load_hu, read_ct_series
from dicom_node_lab.masks import cube_mask
from dicom_node_lab.patches import PATCH, Patch

log = logging.getLogger(__name__)
MODEL_SPACING_MM = 0.47


class DicomPatchSource:
    """Loads every CT series under the folders once, resampled to the model's spacing."""

    def __init__(self, folders: Iterable[str | Path], spacing_mm: float = MODEL_SPACING_MM,
                 max_pixel_mm: float = 0.8, max_slice_mm: float = 1.25):
        self.volumes: list[np.ndarray] = []
        series, notes = read_ct_series(folders)
        for note in notes:
            log.info("self-supervised: %s", note)
        for s in series:
            if max(s.spacing[1:]) > max_pixel_mm or s.spacing[0] > max_slice_mm:
                log.warning("self-supervised: series %s skipped: %.2f mm pixels, %.2f mm slices are too coarse "
                            "for coronary work", s.uid, max(s.spacing[1:]), s.spacing[0])
                continue
            vol = load_hu(s)
            zoom = [sp / spacing_mm for sp in s.spacing]
            vol = ndimage.zoom(vol, zoom, order=1).astype(np.float32)
            if min(vol.shape) >= PATCH:
                self.volumes.append(vol)
        if not self.volumes:
            raise ValueError(f"no usable CT series under {list(map(str, folders))}")

    def sample(self, rng: np.random.Generator, tries: int = 50) -> Patch | None:
        """A patch whose masked region, widened by the blooming margin, holds no calcium."""
        for _ in range(tries):
            vol = self.volumes[int(rng.integers(len(self.volumes)))]
            lo = [int(rng.integers(0, n - PATCH + 1)) for n in vol.shape]
            image = vol[lo[0]:lo[0] + PATCH, lo[1]:lo[1] + PATCH, lo[2]:lo[2] + PATCH].copy()
            mask = cube_mask(image.shape, 16 if rng.random() < 0.5 else 8)
            guard = ndimage.binary_dilation(mask > 0.5, iterations=3)
            if image[guard].max() > DEFAULT_THRESHOLD_HU or image[mask > 0.5].max() < 200.0:
                continue  # calcium or bone nearby, or no contrast-filled structure to learn from
            return Patch(image=image, mask=mask, target=image.copy(), lumen=np.zeros(image.shape, bool),
                         mode="dicom")
        return None
