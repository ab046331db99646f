"""Training and evaluation patches cut from phantom volumes.

Each patch carries the acquired image (with calcium), the mask, and the target: the
calcium-free truth inside the mask and the acquired image outside it, because outside
the mask the network is only asked to pass its input through.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from dicom_node.backends import PATCH
from dicom_node.pipeline.detect import DEFAULT_THRESHOLD_HU
from dicom_node_lab import phantom
from dicom_node_lab.masks import DEFAULT_MARGIN_MM, core_box, cube_mask, footprint_mask

VOLUME = (48, 48, 48)


@dataclass
class Patch:
    image: np.ndarray  # float32 HU, (32, 32, 32)
    mask: np.ndarray  # float32 0/1
    target: np.ndarray  # float32 HU
    lumen: np.ndarray  # bool, true lumen
    mode: str
    lumen_hu: float = float("nan")  # contrast level of the true lumen in the patch; nan if none


def lumen_level(p: phantom.Phantom, box: tuple[slice, ...]) -> float:
    """The contrast level of the vessel nearest the patch centre, as Experiment 2's ruler takes it."""
    centre_mm = np.array([(b.start + b.stop - 1) / 2 for b in box]) * np.asarray(p.spacing)
    best, level = np.inf, float("nan")
    for v in p.vessels:
        d = np.linalg.norm(v.points_mm - centre_mm, axis=1)
        i = int(np.argmin(d))
        if d[i] < best:
            best, level = float(d[i]), float(v.lumen_hu[i])
    return level


def training_options(kind_weights: tuple[float, ...] = ()) -> phantom.PhantomOptions:
    """Phantom ranges for training volumes: lesions kept near the middle so patches hold them.

    ``kind_weights`` as TrainConfig keeps them: empty draws the calcium kinds evenly.
    """
    return phantom.PhantomOptions(lesion_margin_mm=7.0, calcium_kind_weights=tuple(kind_weights) or None)


# Held out of training, for Experiment 2 v2: the standard kernel and motion above TRAIN_MOTION_MM.
HELD_OUT_KERNELS = ("standard",)
TRAIN_MOTION_MM = (0.0, 0.7)


def trained_kernels() -> list:
    """The kernels training sees (``physics.Kernel`` order, ``HELD_OUT_KERNELS`` out): one list for the network's
    world, Experiment 2 v2's studies and the calcium estimate's extraction."""
    from dicom_node_lab.physics import Kernel

    return [k for k in Kernel if k not in HELD_OUT_KERNELS]


def training_world_options():
    """The calibrated world for training volumes: one vessel, one lesion near the middle, held-out settings out."""
    from dicom_node_lab import world

    return world.WorldOptions(kernels=tuple(trained_kernels()),
                              motion_mm=TRAIN_MOTION_MM, n_vessels=(1, 1), lesions_per_vessel=(1, 1),
                              lesion_margin_mm=3.0, reference_gap_mm=0.5)


def training_volume(seed: int, kind_weights: tuple[float, ...] = (), use_world: bool = False) -> phantom.Phantom:
    """One training volume (VOLUME voxels): from the calibrated world, or from the first phantom."""
    if use_world:
        from dicom_node_lab import world

        return world.generate(VOLUME, seed=seed, options=training_world_options())
    return phantom.generate(VOLUME, seed=seed, options=training_options(kind_weights))


def _crop(p: phantom.Phantom, centre: np.ndarray) -> tuple[slice, ...]:
    lo = [int(np.clip(c - PATCH // 2, 0, n - PATCH)) for c, n in zip(centre, p.image.shape)]
    return tuple(slice(a, a + PATCH) for a in lo)


def detected_calcium(image: np.ndarray, calcium_fraction: np.ndarray,
                     threshold_hu: float = DEFAULT_THRESHOLD_HU) -> np.ndarray:
    """What the engine's detector finds: bright voxels attached to real calcium, plus the calcium.

    Thresholding alone would also pick up noise spikes in bright contrast; the engine
    drops those by component size, so training masks drop them by attachment.
    """
    near = ndimage.binary_dilation(calcium_fraction > 0.05, iterations=2)
    return ((image > threshold_hu) & near) | (calcium_fraction > 0.25)


def _vessel_point(rng: np.random.Generator, p: phantom.Phantom) -> np.ndarray:
    """A random centreline voxel inside the volume, far enough in for a centred patch."""
    pts = np.concatenate([p.centreline_voxels(i) for i in range(len(p.vessels))])
    shape = np.asarray(p.image.shape)
    inside = np.all((pts >= PATCH // 2) & (pts <= shape - PATCH // 2), axis=1)
    pool = pts[inside] if inside.any() else pts[np.all((pts >= 0) & (pts < shape), axis=1)]
    if len(pool) == 0:
        return shape / 2
    return np.round(pool[rng.integers(len(pool))]).astype(int)


def _flip(rng: np.random.Generator, arrays: list[np.ndarray]) -> list[np.ndarray]:
    axes = [a for a in range(3) if rng.random() < 0.5]
    if not axes:
        return arrays
    return [np.ascontiguousarray(np.flip(x, axis=axes)) for x in arrays]


def cut(rng: np.random.Generator, p: phantom.Phantom, mode: str,
        margin_mm: float = DEFAULT_MARGIN_MM, allow_calcium_in_cube: bool = True) -> Patch | None:
    """Cut one patch with a mask of the given mode; None if the volume has nothing to mask."""
    if mode == "mixed":
        has_calcium = bool(p.calcium_mask.any())
        r = rng.random()
        if has_calcium and r < 0.55:
            mode = "footprint"
        else:
            mode = "cube16" if rng.random() < 0.5 else "cube8"
    if mode == "footprint":
        calc = detected_calcium(p.image, p.calcium_fraction)
        if not calc.any():
            return None
        lab, n = ndimage.label(calc, structure=np.ones((3, 3, 3)))
        k = int(rng.integers(1, n + 1))
        zyx = np.argwhere(lab == k)
        centre = zyx[rng.integers(len(zyx))] + rng.integers(-3, 4, size=3)
        box = _crop(p, centre)
        margin = float(rng.uniform(0.8, 1.3)) * margin_mm
        mask = footprint_mask(calc[box], p.spacing, margin)
        core = np.zeros_like(mask)
        local = np.clip(centre - np.array([b.start for b in box]), 0, PATCH - 1)
        core[core_box(mask.shape, tuple(local), int(rng.integers(16, 25)))] = 1.0
        mask *= core
        if mask.sum() == 0:
            return None
    else:
        size = 16 if mode == "cube16" else 8
        if mode not in ("cube16", "cube8"):
            raise ValueError(f"unknown mask mode {mode!r}")
        centre = _vessel_point(rng, p) + rng.integers(-2, 3, size=3)
        box = _crop(p, centre)
        mask = cube_mask((PATCH,) * 3, size)
        if not allow_calcium_in_cube and (p.calcium_fraction[box] * mask).max() > 0.01:
            return None
    image = p.image[box]
    target = np.where(mask > 0.5, p.truth[box], image).astype(np.float32)
    level = lumen_level(p, box)
    image, mask, target, lumen = _flip(rng, [image, mask, target, p.lumen_mask[box]])
    return Patch(image=image, mask=mask, target=target, lumen=lumen, mode=mode, lumen_hu=level)


def volume_seed(base_seed: int, index: int) -> int:
    """Training and evaluation draw volumes from disjoint seed ranges by their base seed."""
    return base_seed * 1_000_003 + index
