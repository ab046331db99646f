"""Streams of training patches, generated on the fly in a worker process.

Rendering a phantom volume costs more than one training step on two cores, so the
worker keeps a rolling pool of volumes and cuts several differently masked, flipped
patches from each before replacing it. Every patch is still new.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dicom_node_lab import phantom
from dicom_node_lab.masks import DEFAULT_MARGIN_MM
from dicom_node_lab.patches import Patch, cut, training_volume, volume_seed


class PhantomPatches(IterableDataset):
    """Infinite stream of (image, mask, target, lumen level) tensors for one mask mode.

    The lumen level (HU, nan where unknown) lets the loss see the lumen boundary the
    way a reader's threshold does.
    """

    def __init__(self, seed: int, mode: str, start: int = 0, pool: int = 32, reuse: int = 10,
                 extra: Callable[[np.random.Generator], Patch | None] | None = None,
                 extra_fraction: float = 0.0, margin_mm: float = DEFAULT_MARGIN_MM,
                 kind_weights: tuple[float, ...] = (), use_world: bool = False):
        self.seed = seed
        self.margin_mm = margin_mm
        self.mode = mode
        self.start = start  # resume: skip volume indices already used
        self.pool = pool
        self.reuse = reuse
        self.extra = extra
        self.extra_fraction = extra_fraction
        self.kind_weights = kind_weights
        self.use_world = use_world  # the calibrated world (world.py) instead of the first phantom

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng([self.seed, self.start, wid])
        index = self.start * nw + wid
        vols: list[phantom.Phantom] = []
        while True:
            vols.append(training_volume(volume_seed(self.seed, index), self.kind_weights, self.use_world))
            index += nw
            if len(vols) > self.pool:
                vols.pop(0)
            for _ in range(self.reuse):
                if self.extra is not None and rng.random() < self.extra_fraction:
                    patch = self.extra(rng)
                else:
                    patch = cut(rng, vols[int(rng.integers(len(vols)))], self.mode, self.margin_mm)
                if patch is None:
                    continue
                yield (torch.from_numpy(patch.image[None]), torch.from_numpy(patch.mask[None]),
                       torch.from_numpy(patch.target[None]), torch.tensor(patch.lumen_hu, dtype=torch.float32))
