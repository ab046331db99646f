"""Compare a backend (or a converted model) with the fp32 reference on real restoration windows.

Used by ``tools/build_engine.py --validate`` on a GPU host and by CI for the fp16 ONNX:
the same patches, the same statistics, the same limits (``plan.TOLERANCE_HU``).
Patches are footprint windows, the masks the node really asks the model to fill,
cut from calcified phantom volumes that neither training nor evaluation uses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from dicom_node.backends.plan import TOLERANCE_HU
from dicom_node_lab import patches, phantom

VALIDATE_SEED = 4242  # volume seeds 4242*1_000_003 + i: disjoint from training (1), validation (7), evaluation (2026)


def phantom_patches(n: int, seed: int = VALIDATE_SEED) -> tuple[np.ndarray, np.ndarray]:
    """``n`` footprint windows as float32 [n,1,32,32,32] image and mask; the same ones every time."""
    images, masks = [], []
    i = 0
    while len(images) < n:
        if i > 50 * n + 100:
            raise RuntimeError("phantom volumes keep coming out without calcium")
        vseed = patches.volume_seed(seed, i)
        i += 1
        p = phantom.generate(patches.VOLUME, seed=vseed, options=patches.training_options())
        patch = patches.cut(np.random.default_rng(vseed), p, "footprint")
        if patch is None:
            continue
        images.append(patch.image)
        masks.append(patch.mask)
    return (np.stack(images)[:, None].astype(np.float32), np.stack(masks)[:, None].astype(np.float32))


@dataclass
class Diff:
    patches: int
    masked_voxels: int
    max_abs_hu: float  # inside the mask
    mean_abs_hu: float  # inside the mask
    outside_identical: bool  # restored == image outside the mask, bit for bit (the contract)

    def summary(self) -> str:
        return (f"{self.patches} patches, inside mask: max {self.max_abs_hu:.3f} HU, mean {self.mean_abs_hu:.3f} HU; "
                f"outside mask identical to input: {self.outside_identical}")

    def as_dict(self) -> dict:
        return asdict(self)


def compare(reference: np.ndarray, candidate: np.ndarray, images: np.ndarray, masks: np.ndarray) -> Diff:
    """|candidate - reference| inside the mask, and the outside-mask contract checked on the candidate."""
    inside = masks > 0.5
    d = np.abs(candidate.astype(np.float64) - reference.astype(np.float64))[inside]
    return Diff(patches=len(images), masked_voxels=int(inside.sum()),
                max_abs_hu=float(d.max(initial=0.0)), mean_abs_hu=float(d.mean()) if d.size else 0.0,
                outside_identical=bool(np.array_equal(candidate[~inside], images[~inside])))


def judge(diff: Diff, precision: str) -> tuple[bool, str]:
    """Within the precision's limits (mean, max HU) and exact outside the mask?"""
    mean_limit, max_limit = TOLERANCE_HU[precision]
    failures = []
    if not diff.mean_abs_hu <= mean_limit:
        failures.append(f"mean {diff.mean_abs_hu:.3f} HU > {mean_limit}")
    if not diff.max_abs_hu <= max_limit:
        failures.append(f"max {diff.max_abs_hu:.3f} HU > {max_limit}")
    if not diff.outside_identical:
        failures.append("output differs from input outside the mask")
    if failures:
        return False, "; ".join(failures)
    return True, f"within {precision} limits (mean <= {mean_limit} HU, max <= {max_limit} HU)"
