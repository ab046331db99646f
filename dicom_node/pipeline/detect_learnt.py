"""Tell calcium from lumen voxel by voxel with a small learnt classifier on the sharpened image.

Why: the rules (a threshold, the faint-calcium test, the sharpened-image test) each draw one line in one
image, and next to a deposit no line separates the deposit's missed flank from the lumen its bloom lifts:
a growth took lumen with the flank, a trim took 2.3 calcium voxels for each voxel of lumen it gave back
(reports/tuning/trimmed-detection.md). Told the phantom's own calcium, the subtraction reads 3.57 points
from the truth image on the tuning studies against 5.05 with the rules' detection: finding the calcium
is where most of the error left lies. A classifier that sees each voxel's sharpened and acquired values,
their neighbourhood, the rules' own verdict, the kernel and the image's noise at once draws a surface
instead of a line. It does, voxel by voxel (a third more calcium at a third of the wrong voxels on validation
studies), but the readings did not follow on the tuning studies (5.21 and 5.45 against the rules' 5.05, with the
shipped estimate and one extracted on it), so it is off (reports/tuning/learnt-detection.md).

It decides the *pool*: every voxel above the sharpened-image test's floor (``local_floor_hu`` as
acquired) that the sharpened image shows at least ``POOL_ABOVE_HU`` above its vessel's contrast, or that
lies within ``POOL_NEAR_MM`` of what the rules found. Within the pool its verdict replaces the rules';
outside it the rules stand. Trained by the lab (``dicom_node_lab.calcium_detector``) on the world's
training settings against the phantom's own calcium; numpy only, like the learnt calcium estimate.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

FEATURES = ("sharp", "acquired", "sharp_max_3", "sharp_min_3", "sharp_mean_3", "acquired_mean_3",
            "acquired_max_5", "level", "noise_sd", "mtf50", "found_by_rules", "distance_out_mm", "depth_in_mm",
            "sharp_mean_5", "sharp_white_share_5", "sharp_max_5", "acquired_min_3", "sharp_gradient")
POOL_ABOVE_HU = 40.0  # sharpened this far above the contrast level: the classifier decides
POOL_NEAR_MM = 1.0  # ... or this close to (or inside) what the rules found
DISTANCE_CAP_MM = 3.0  # distances are measured this far (the boxes are sharpened with more image around)
NO_LEVEL_HU = -500.0  # what a value above the level reads where no contrast level is known
WHITE_HU = 150.0  # the sharpened-image test's level (sharp_contrast_hu), whose local share is a feature
NOISE_FALLBACK_HU = 30.0  # the noise SD assumed where the image's cannot be measured (a typical CTA's)
CONTEXT_VOXELS = 8  # every feature of a voxel reads at most this far around it (what a box must hold)


def candidate_features(acquired: np.ndarray, sharpened: np.ndarray, level: np.ndarray, found: np.ndarray,
                       spacing: tuple[float, float, float], noise_sd: float, mtf50_lp_cm: float,
                       floor_hu: float) -> tuple[np.ndarray, np.ndarray]:
    """The pool of one sharpened box and its voxels' ``FEATURES``: ``(pool, rows)``, ``pool`` bool over the box
    and ``rows`` (float32, one per pool voxel in ``np.flatnonzero`` order).

    ``acquired`` and ``sharpened`` are the box as acquired and sharpened, ``level`` the contrast level there
    (nan where none: such voxels are never in the pool), ``found`` what the rules found in it. Every feature
    reads at most ``CONTEXT_VOXELS`` around a voxel, so a voxel with that much of the box around it has the
    same features whatever box it is sharpened in (the lab's extraction and the node agree).
    """
    known = np.isfinite(level)
    with np.errstate(invalid="ignore"):
        du = np.where(known, sharpened - level, NO_LEVEL_HU).astype(np.float32)
        dy = np.where(known, acquired - level, NO_LEVEL_HU).astype(np.float32)
    if found.any():
        out = np.minimum(ndimage.distance_transform_edt(~found, sampling=spacing), DISTANCE_CAP_MM)
    else:
        out = np.full(found.shape, DISTANCE_CAP_MM)
    depth = np.minimum(ndimage.distance_transform_edt(found, sampling=spacing), DISTANCE_CAP_MM)
    pool = (acquired > floor_hu) & known & ((du > POOL_ABOVE_HU) | (out <= POOL_NEAR_MM))
    at = np.flatnonzero(pool)
    noise = noise_sd if np.isfinite(noise_sd) and noise_sd > 0 else NOISE_FALLBACK_HU

    def pick(a: np.ndarray) -> np.ndarray:
        return a.reshape(-1)[at]

    cols = [pick(du), pick(dy), pick(ndimage.maximum_filter(du, 3)), pick(ndimage.minimum_filter(du, 3)),
            pick(ndimage.uniform_filter(du, 3)), pick(ndimage.uniform_filter(dy, 3)),
            pick(ndimage.maximum_filter(dy, 5)), pick(np.where(known, level, 0.0)), np.full(len(at), noise),
            np.full(len(at), mtf50_lp_cm), pick(found.astype(np.float32)), pick(out), pick(depth),
            pick(ndimage.uniform_filter(du, 5)), pick(ndimage.uniform_filter((du > WHITE_HU).astype(np.float32), 5)),
            pick(ndimage.maximum_filter(du, 5)), pick(ndimage.minimum_filter(dy, 3)),
            pick(ndimage.gaussian_gradient_magnitude(du, 1.0))]
    return pool, np.stack(cols, axis=1).astype(np.float32)


@dataclass(frozen=True, eq=False)  # compared and hashed as the object: its arrays have no single truth value
class LearntCalcium:
    """A small network that gives each pool voxel the probability that it is calcium.

    ReLU layers on the normalised ``FEATURES``, the last linear to one logit. ``threshold``: the probability
    the lab chose on its validation studies; the engine's ``detect_learnt_probability`` overrides it.
    """

    weights: tuple[np.ndarray, ...] = field(repr=False)  # W0, b0, W1, b1, ...
    mean: np.ndarray = field(repr=False)
    scale: np.ndarray = field(repr=False)
    threshold: float = 0.5
    digest: str = ""  # the file's SHA-256: the engine id (and so the derived series' UIDs) names it
    name: str = ""

    def __post_init__(self) -> None:
        if len(self.weights) < 2 or len(self.weights) % 2:
            raise ValueError("weights must be (W, b) pairs")
        if self.weights[0].shape[0] != len(FEATURES) or self.mean.shape != (len(FEATURES),):
            raise ValueError(f"the network takes {len(FEATURES)} features, not {self.weights[0].shape[0]}")
        if self.weights[-2].shape[1] != 1:
            raise ValueError("the network must give one value per voxel")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold is a probability, 0..1, not {self.threshold}")

    @classmethod
    def load(cls, path: str | Path) -> LearntCalcium:
        """Read an ``.npz`` the lab wrote (``W0, b0, ..., mean, scale, threshold``)."""
        data = Path(path).read_bytes()
        try:
            with np.load(io.BytesIO(data)) as z:
                if "features" in z.files and tuple(str(f) for f in z["features"]) != FEATURES:
                    raise ValueError("its features are not this node's")
                layers = sorted(int(k[1:]) for k in z.files if k.startswith("W"))
                weights = tuple(z[f"{p}{i}"].astype(np.float64) for i in layers for p in ("W", "b"))
                return cls(weights, z["mean"].astype(np.float64), z["scale"].astype(np.float64),
                           float(z["threshold"]), hashlib.sha256(data).hexdigest(), Path(path).stem)
        except (zipfile.BadZipFile, KeyError, EOFError, ValueError) as exc:
            raise ValueError(f"{path} is not a learnt calcium detector ({exc})") from None

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        """The probability (0-1) that each row of ``FEATURES`` is calcium."""
        x = (rows.astype(np.float64) - self.mean) / self.scale
        for k in range(0, len(self.weights) - 2, 2):
            x = np.maximum(x @ self.weights[k] + self.weights[k + 1], 0.0)
        logit = (x @ self.weights[-2] + self.weights[-1])[:, 0]
        return 1.0 / (1.0 + np.exp(-np.clip(logit, -50.0, 50.0)))
