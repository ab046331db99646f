"""Run the planned windows through a backend and put the result back in the volume.

Windows go step by step: step k of every region runs in one batch, and its output
is written into the region before step k+1 reads its context (multi-step
inpainting). Only footprint voxels of the native volume change; everything else
keeps its value, and the caller keeps its stored pixel values untouched there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from dicom_node.backends import Backend
from dicom_node.pipeline.detect import Detection, DetectOptions, detect
from dicom_node.pipeline.windows import Region, WindowOptions, plan

log = logging.getLogger(__name__)


@dataclass
class EngineResult:
    detection: Detection
    regions: list[Region]
    changed: np.ndarray  # bool, native voxels whose value was restored
    windows: int
    batches: int
    seconds: dict[str, float] = field(default_factory=dict)


class Engine:
    """Detect → plan → infer for one HU volume."""

    def __init__(self, backend: Backend, detect_options: DetectOptions | None = None,
                 window_options: WindowOptions | None = None):
        self.backend = backend
        self.detect_options = detect_options or DetectOptions()
        self.window_options = window_options or WindowOptions()

    def run(self, volume: np.ndarray, spacing: tuple[float, float, float],
            progress: Callable[[int, int], None] | None = None) -> EngineResult:
        """Detect the calcium, then restore ``volume`` in place (float32 HU); say which voxels changed."""
        t0 = time.perf_counter()
        detection = detect(volume, spacing, self.detect_options)
        seconds = time.perf_counter() - t0
        result = self.restore(volume, spacing, detection, progress)
        result.seconds = {"detect": seconds, **result.seconds}
        return result

    def restore(self, volume: np.ndarray, spacing: tuple[float, float, float], detection: Detection,
                progress: Callable[[int, int], None] | None = None) -> EngineResult:
        """Remove the given calcium from ``volume`` in place (float32 HU): plan the windows, restore them
        step by step through the backend, resample back. Public for callers that know the calcium rather
        than detect it (the lab's diagnostic runs on the phantom's true calcium)."""
        t1 = time.perf_counter()
        regions = plan(detection, spacing, self.window_options)
        t2 = time.perf_counter()
        grids = [ndimage.map_coordinates(volume, r.model_coordinates(), order=1, mode="nearest").astype(np.float32)
                 for r in regions]
        steps = max((len(r.windows) for r in regions), default=0)
        total = sum(len(r.windows) for r in regions)
        done = batches = 0
        for k in range(steps):
            work = [(grid, r.windows[k]) for grid, r in zip(grids, regions) if k < len(r.windows)]
            for i in range(0, len(work), self.backend.max_batch):
                chunk = work[i:i + self.backend.max_batch]
                images = np.stack([g[w.box()] for g, w in chunk])[:, None]
                masks = np.stack([w.network_mask for _, w in chunk])[:, None].astype(np.float32)
                restored = self.backend.run(images, masks)
                batches += 1
                for (g, w), out in zip(chunk, restored[:, 0]):
                    view = g[w.box()]
                    view[w.mask] = out[w.mask]
                done += len(chunk)
                if progress:
                    progress(done, total)
        t3 = time.perf_counter()
        changed = np.zeros(volume.shape, bool)
        for grid, r in zip(grids, regions):
            idx = r.native_indices()
            values = ndimage.map_coordinates(grid, r.native_coordinates(idx), order=1, mode="nearest")
            volume[tuple(idx.T)] = values
            changed[tuple(idx.T)] = True
        t4 = time.perf_counter()
        return EngineResult(detection=detection, regions=regions, changed=changed, windows=total, batches=batches,
                            seconds={"plan": t2 - t1, "infer": t3 - t2, "resample": t4 - t3})
