"""Inference backends: the engine hands them patches and gets restored patches back.

The engine never sees a runtime's API. A backend takes ``image`` and ``mask`` as
float32 [N,1,32,32,32] and returns ``restored`` of the same shape, as the ONNX
contract says, whatever N is.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

PATCH = 32  # the model's window edge, in voxels of 0.47 mm: every backend, the planner and the lab use it


class BackendError(RuntimeError):
    """A backend cannot be built or run (a missing model, a plan for another GPU, a runtime error)."""


class Backend(Protocol):
    name: str
    max_batch: int

    def run(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Restore a batch; N may be anything from 1 to ``max_batch``."""
        ...
