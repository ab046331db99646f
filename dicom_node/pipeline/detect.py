"""Find the calcium to remove, and the bright things that must be left alone.

A 700 HU threshold (the paper's) separates calcium from contrast, but not from
bone, metal or noise spikes. Thick bone is found as the part of the bright voxels
that survives a morphological opening of about 2 mm: coronary calcium is thinner
than that, so calcium touching the spine or sternum is still found as calcium.
Thin dense structures that the opening misses (a rib's cortex) are recognised by
their size. A small bright piece cut by the edge of the scanned volume cannot be
told from the sliver of a rib or vertebra whose rest lies outside it, so by default
it is left alone and reported; coronary calcium sits well inside a cardiac field of
view. Metal (stents, pacing leads) is left untouched and reported, because inpainting
over it would hide a device the reader must see.

Noise is the other impostor. A sharp kernel's noise (50-60 HU SD) makes blobs of a
millimetre that rise 200-300 HU above a bright lumen: past the 700 HU threshold and the
faint-calcium test alike. Restored as calcium, one such blob in a calcium-free segment
read as a 100 % stenosis (Experiment 2 v2, held-out study 57). So a small component must
stand out from its own vessel's contrast by several noise SDs, measured in the image.

Calcium the blur has spread into the lumen's own range escapes all of these; an optional last
test looks for it where the blur is undone (``sharp_contrast_hu``, off: on the tuning studies it
found such deposits, but the subtraction removed them only in part and some then read as open
lumen, reports/tuning/subtract-estimate.md). Two more, off, reshape what the rules found where the blur is undone:
a growth into the deposit's flanks (``grow_sharp_hu``) and a trim of the lumen its bloom lifted past the rules
(``trim_sharp_hu``); neither read closer on the tuning studies (reports/tuning/grown-detection.md,
reports/tuning/trimmed-detection.md). A learnt classifier (``learnt``, ``detect_learnt``), off, decides last the
voxels near and above the contrast level in the sharpened image and those next to what the rules found, and its
verdict replaces theirs there; or (``learnt_mode = "trim"``) it only gives back the rules' voxels it calls lumen
(reports/tuning/learnt-detection.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Literal, get_args

import numpy as np
from scipy import ndimage

from dicom_node.pipeline.contrast import (
    BLOCK,
    NOISE_BAND_HU,
    SIGMA_MM,
    brighter_than_lumen,
    brightest_level_nearby,
    local_lumen_level,
)
from dicom_node.pipeline.detect_learnt import CONTEXT_VOXELS, LearntCalcium, candidate_features
from dicom_node.pipeline.morphology import THREADS, dilate_mm, grow_box, open_mm, padded_bbox
from dicom_node.pipeline.subtract import REFERENCE_REACH_MM, ScannerBlur, SubtractOptions, reference_levels, sharpen

CONNECTIVITY_26 = np.ones((3, 3, 3), bool)


DEFAULT_THRESHOLD_HU = 700.0  # calcium by the classic rule; the lab's training masks use the same

# What a learnt detector may do with the rules' calcium: "decide" each voxel of its pool (find a deposit's missed
# flank, give back lumen), or only "trim" (give back what the rules took that it calls lumen, never add). Why the
# second: on validation voxels the classifier separates the rules' extra voxels from their calcium far better than
# it finds what they missed, and in the oracles the extras made the severe stenoses
# (reports/tuning/learnt-detection.md, section 6).
LearntMode = Literal["decide", "trim"]

# What the sharpened-image test compares a sharpened voxel with: the contrast level of the "acquired" image around it
# (as every other rule), or also the "sharpened" lumen's own level (``_sharpened_lumen_level``; the higher counts).
# Why the second: partial volume holds a small vessel's acquired level under its true lumen (a 2.2 mm vessel under
# the soft kernel: 437 HU for a 579 HU lumen), the sharpening gives the lumen's core back, and the core then stands
# the test's 150 HU above the acquired level with no calcium there: on the second held-out set a calcium-free soft
# plaque read 30 -> 100 % so (reports/fresh-heldout.md). The sharpened lumen's level there is the core's own.
SharpLevel = Literal["acquired", "sharpened"]

# The settings only the rules that look at the sharpened image read (``DetectOptions.without_sharpening``).
_SHARPENING_ONLY = ("sharp_min_volume_mm3", "sharp_mtf50_lp_cm", "sharp_max_above_hu", "sharp_min_excess_mm3",
                    "sharp_level", "grow_mm", "trim_mm", "learnt_probability", "learnt_min_volume_mm3", "learnt_mode")


@dataclass
class DetectOptions:
    threshold_hu: float = DEFAULT_THRESHOLD_HU
    adaptive: bool = False  # lower the threshold toward the measured lumen (never above threshold_hu)
    adaptive_sd: float = 3.5  # adaptive threshold = lumen median + this many lumen SDs
    adaptive_floor_hu: float = 450.0
    local_contrast_hu: float = 200.0  # > 0: also calcium, deposits peaking this far above their vessel's contrast
    local_extent_hu: float = 120.0  # ... taken down to this far above it
    local_floor_hu: float = 400.0  # ... and never below this
    metal_hu: float = 3000.0
    min_volume_mm3: float = 0.5  # smaller components are noise spikes in bright contrast
    dense_opening_mm: float = 2.0  # radius that coronary calcium does not survive
    dense_min_volume_mm3: float = 300.0  # opened bright volume bigger than this is bone or a device
    keep_edge_components: bool = False  # remove bright components cut by the volume's edge as calcium
    noise_sigmas: float = 8.0  # > 0: small components must peak this many noise SDs above their lumen
    noise_keep_mm3: float = 20.0  # ... components at least this large are kept whatever their peak
    # > 0: ... and a component at least noise_away_min_mm3 large passes too when its peak rises that many noise SDs
    # above the contrast level measured this far from it (beyond its own bloom; peak_above_level_beyond). 0 = off.
    noise_away_mm: float = 0.0
    noise_away_min_mm3: float = 2.0
    # > 0: also calcium, deposits that the image sharpened by total-variation deconvolution (under a blur
    # of sharp_mtf50_lp_cm) shows this far above their vessel's contrast, at least sharp_min_volume_mm3
    # large and away from calcium already found. 0 = off.
    sharp_contrast_hu: float = 0.0
    sharp_min_volume_mm3: float = 5.0
    sharp_mtf50_lp_cm: float = 4.3
    sharp_max_above_hu: float = 0.0  # > 0: ... only deposits that peak less than this above it as acquired
    # > 0: ... and a smaller deposit too, when its sharpened excess over sharp_contrast_hu, summed over its voxels
    # (HU × mm³) and divided by the image's noise SD (HU), reaches this many mm³. 0 = off.
    sharp_min_excess_mm3: float = 0.0
    sharp_level: SharpLevel = "acquired"  # ... the contrast level the sharpened image is compared with (SharpLevel)
    # > 0: each deposit found grows, up to grow_mm from where it was found, into the neighbouring voxels that
    # the sharpened image shows this far above their vessel's contrast (connected to it through such voxels).
    # 0 = off. Needs the contrast level; not into bone, devices or what the rules left alone.
    grow_sharp_hu: float = 0.0
    grow_mm: float = 1.0
    # > 0: each deposit found gives up, on its lumen's side, the voxels that the sharpened image shows less than
    # this far above their vessel's contrast: lumen the blur made bright, reached from the lumen through such
    # voxels, at most trim_mm deep. 0 = off. Needs the contrast level; after the growth when both are on.
    trim_sharp_hu: float = 0.0
    trim_mm: float = 1.0
    # A learnt classifier (``detect_learnt.LearntCalcium``) that decides, after every rule, each voxel the
    # sharpened image shows near the contrast level or above it, or that lies next to what the rules found
    # (``detect_learnt``'s pool): its verdict replaces the rules' there. None = the rules alone.
    learnt: LearntCalcium | None = None
    learnt_probability: float = 0.0  # the probability above which a voxel is calcium; 0 = the file's own
    learnt_min_volume_mm3: float = 2.0  # a component the rules did not touch must be at least this large
    # "decide": the verdict replaces the rules' over the whole pool (adds and takes away); "trim": it may only take
    # voxels out of what the rules found (the lumen their bloom lifted), never add any
    learnt_mode: LearntMode = "decide"

    @property
    def sharpens(self) -> bool:
        """Whether any rule looks at the sharpened image (and so needs the kernel's blur and the level)."""
        return self.sharp_contrast_hu > 0 or self.grow_sharp_hu > 0 or self.trim_sharp_hu > 0 or self.learnt is not None

    def without_sharpening(self) -> DetectOptions:
        """These options with every rule that looks at the sharpened image off (kept beside :attr:`sharpens`, so
        that a rule added to one is added to both), and the settings only those rules read back at their
        defaults: options that detect alike compare equal, so what names an output (``process.engine_id``) does
        not change with a setting that changed no voxel."""
        return replace(self, sharp_contrast_hu=0.0, grow_sharp_hu=0.0, trim_sharp_hu=0.0, learnt=None,
                       **{name: getattr(DetectOptions, name) for name in _SHARPENING_ONLY})

    def probability(self) -> float:
        """The learnt classifier's probability threshold in force (the option's, else the file's)."""
        if self.learnt is None:
            return float("nan")
        return self.learnt_probability if self.learnt_probability > 0 else self.learnt.threshold

    def __post_init__(self) -> None:
        if (self.sharp_contrast_hu < 0 or self.sharp_max_above_hu < 0 or self.sharp_min_excess_mm3 < 0
                or self.grow_sharp_hu < 0 or self.trim_sharp_hu < 0):
            raise ValueError("sharp_contrast_hu, sharp_max_above_hu, sharp_min_excess_mm3, grow_sharp_hu and "
                             "trim_sharp_hu must be >= 0 (0 = off)")
        if self.grow_mm <= 0 or self.trim_mm <= 0:
            raise ValueError(f"grow_mm and trim_mm must be positive, not {self.grow_mm} and {self.trim_mm}")
        if self.sharp_level not in get_args(SharpLevel):
            raise ValueError(f"sharp_level must be one of {', '.join(get_args(SharpLevel))}, not {self.sharp_level!r}")
        if not 0.0 <= self.learnt_probability < 1.0:
            raise ValueError(f"learnt_probability must lie in 0..1 (0 = the file's own), not {self.learnt_probability}")
        if self.learnt_min_volume_mm3 < 0:
            raise ValueError(f"learnt_min_volume_mm3 must be >= 0, not {self.learnt_min_volume_mm3}")
        if self.learnt_mode not in get_args(LearntMode):
            raise ValueError(f"learnt_mode must be one of {get_args(LearntMode)}, not {self.learnt_mode!r}")
        if self.noise_away_mm < 0 or self.noise_away_min_mm3 < 0:
            raise ValueError(f"noise_away_mm and noise_away_min_mm3 must be >= 0, not {self.noise_away_mm} and "
                             f"{self.noise_away_min_mm3}")
        if self.sharp_min_volume_mm3 <= 0:
            raise ValueError(f"sharp_min_volume_mm3 must be positive, not {self.sharp_min_volume_mm3}")
        ScannerBlur(mtf50_lp_cm=self.sharp_mtf50_lp_cm)  # checks it as any blur's MTF50


@dataclass
class Lesion:
    """One 26-connected calcium component, in voxel indices of the volume."""

    index: int
    voxels: int
    volume_mm3: float
    peak_hu: float
    centroid: tuple[float, float, float]
    bbox: tuple[slice, slice, slice]
    # found only where the blur is undone (``sharp_contrast_hu``): a faint deposit whose removal can take
    # lumen with it, so the engine marks its region unsure (reports/tuning/learnt-estimate.md, section 3)
    sharpened: bool = False


@dataclass
class Detection:
    calcium: np.ndarray  # bool, the calcium to remove
    lesions: list[Lesion]
    threshold_hu: float
    excluded: list[dict] = field(default_factory=list)  # what was left alone, and why
    labels: np.ndarray | None = None  # uint16 lesion labels (1-based), same shape as calcium


def _label(mask: np.ndarray) -> tuple[np.ndarray, int, list[tuple[slice, slice, slice]]]:
    """26-connected components of ``mask`` as 16-bit labels, their number, and each one's box
    (``ndimage.find_objects`` of the labels).

    16 bits because a volume's worth of int32 would cost as much as the HU volume itself.
    Labelled in the mask's bounding box only: scipy visits every voxel it is given, and a
    CTA's bright voxels fill a fraction of the volume. The numbering is the whole volume's
    (components are numbered in the order a raster scan meets them, and a box keeps that order).
    """
    lab = np.zeros(mask.shape, np.uint16)
    box = padded_bbox(mask, [0, 0, 0])
    if box is None:
        return lab, 0, []
    sub = np.zeros(tuple(s.stop - s.start for s in box), np.uint16)
    try:
        n = ndimage.label(mask[box], structure=CONNECTIVITY_26, output=sub)
    except RuntimeError as exc:
        raise ValueError("more than 65535 bright components: not a CT angiogram, or a broken rescale") from exc
    lab[box] = sub
    objects = [tuple(slice(o.start + b.start, o.stop + b.start) for o, b in zip(obj, box))
               for obj in ndimage.find_objects(sub)]
    return lab, int(n), objects  # type: ignore[return-value]


def _lesion(index: int, part: np.ndarray, sl: tuple[slice, slice, slice], volume: np.ndarray,
            voxel_mm3: float) -> Lesion:
    """The lesion record of one component ``part`` (a bool array over ``volume[sl]``)."""
    voxels = int(part.sum())
    return Lesion(index=index, voxels=voxels, volume_mm3=voxels * voxel_mm3, peak_hu=float(volume[sl][part].max()),
                  centroid=tuple(float(c + s.start) for c, s in zip(ndimage.center_of_mass(part), sl)), bbox=sl)


def describe(calcium: np.ndarray, volume: np.ndarray, spacing: tuple[float, float, float], *,
             threshold_hu: float) -> Detection:
    """The detection record of a calcium mask as it is (each 26-connected component a lesion), for callers
    that know the calcium rather than detect it; :func:`detect` is the product's way to find it.

    ``threshold_hu`` is required because the subtraction derives its level where no contrast is near from it:
    left undefined (nan) it silently removed nothing there, which once made an oracle read 7.23 for 4.42
    (reports/tuning/estimate-detection.md).
    """
    if not np.isfinite(threshold_hu):
        raise ValueError(f"threshold_hu must be finite, not {threshold_hu}")
    lab, _, objects = _label(calcium)
    voxel_mm3 = float(np.prod(spacing))
    lesions = [_lesion(i, lab[sl] == i, sl, volume, voxel_mm3) for i, sl in enumerate(objects, start=1)]
    return Detection(calcium=calcium.astype(bool), lesions=lesions, threshold_hu=float(threshold_hu), labels=lab)


def lumen_statistics(volume: np.ndarray) -> tuple[float, float]:
    """Median and robust SD of contrast-filled voxels (200-800 HU)."""
    vals = volume[(volume > 200.0) & (volume < 800.0)]
    if vals.size < 100:
        return float("nan"), float("nan")
    med = float(np.median(vals))
    sd = float(1.4826 * np.median(np.abs(vals - med)))
    return med, sd


NOISE_SLICES = 32  # slices sampled for the noise estimate (evenly spread)


def image_noise_sd(volume: np.ndarray) -> float:
    """Robust SD of the image noise inside contrast-filled regions (HU; nan without enough contrast).

    The residual after a 3×3 in-plane mean, inside contrast (150-800 HU) eroded by two
    voxels so that vessel edges do not count, scaled by the MAD. It is not the noise SD a
    phantom was drawn with (the mean takes some of it, and FBP noise is correlated), but
    it moves with it (0.75-0.95 of it over the calibrated world's kernels), which is all a
    threshold in units of it needs; Experiment 2 v2's tuning studies chose the threshold.
    """
    step = max(1, volume.shape[0] // NOISE_SLICES)
    parts = []
    for z in range(0, volume.shape[0], step):
        sl = volume[z].astype(np.float32)
        inside = ndimage.binary_erosion((sl > 150.0) & (sl < 800.0), iterations=2)
        if inside.any():
            parts.append((sl - ndimage.uniform_filter(sl, 3))[inside])
    if not parts:
        return float("nan")
    res = np.concatenate(parts)
    if res.size < 500:
        return float("nan")
    return float(1.4826 * np.median(np.abs(res - np.median(res))))


def _faint_calcium(volume: np.ndarray, spacing: tuple[float, float, float], bright: np.ndarray,
                   opts: DetectOptions, level: np.ndarray) -> np.ndarray:
    """Deposits that never reach the threshold but stand out from their own vessel's contrast.

    A deposit counts if some voxel is ``local_contrast_hu`` above the brightest lumen
    level within 1 mm, and it extends over the voxels ``local_extent_hu`` above the local
    level (hysteresis: lumen noise rarely reaches the first, a faint ring's flanks rarely
    the second). Deposits that touch calcium the threshold finds are left to the
    threshold and the margin: taken as calcium, their faint flanks widened every mask and
    read stenoses worse.
    """
    low, seed = brighter_than_lumen(volume, opts.local_floor_hu, [
        (level, opts.local_extent_hu), (brightest_level_nearby(level, spacing), opts.local_contrast_hu)])
    low &= ~bright
    seed &= low
    lab, n, _ = _label(low | bright)
    flat = lab.reshape(-1)
    # Label lookups at the (few) voxels that matter rather than over the whole volume.
    low_idx = np.flatnonzero(low)
    found = (np.bincount(flat[np.flatnonzero(bright)], minlength=n + 1) * float(np.prod(spacing))
             >= opts.min_volume_mm3)
    keep = (np.bincount(flat[np.flatnonzero(seed)], minlength=n + 1) > 0) & ~found
    keep[0] = False
    out = np.zeros(low.shape, bool)
    out.reshape(-1)[low_idx[keep[flat[low_idx]]]] = True
    return out


# The sharpened-image test sharpens the acquired image with this many voxels around every voxel it looks at
# (beyond the blur's reach), in tiles of SHARP_TILE voxels a side where that is cheaper than one box.
SHARP_PAD = 8
assert SHARP_PAD >= CONTEXT_VOXELS, "a learnt classifier's features must see their whole neighbourhood in a box"
SHARP_TILE = 64
SHARP_MEMO_MB = 512  # sharpened boxes one detection keeps for a second look (Sharpenings)


def sharpening_boxes(mask: np.ndarray, pad: int = SHARP_PAD, tile: int | None = None
                     ) -> list[tuple[tuple[slice, slice, slice], tuple[slice, slice, slice]]]:
    """Where to sharpen so that every voxel of ``mask`` is sharpened with ``pad`` voxels of image around it:
    (box to sharpen, the bounding box of the mask's voxels it answers for) pairs; the cheaper (in voxels) of one
    box around the whole mask and one box per ``tile``-voxel tile (default ``SHARP_TILE``) that holds some of it.

    Why: what the test looks at (everything above its 400 HU floor) is about a thousandth of a CTA, but its one
    bounding box spans most of the volume: on a 128x512x512 phantom CTA detection took 306 s and 2.6 GB
    with the one box, 19 s and 1.1 GB in tiles (0.9 s, 1.1 GB without the test; ``tools/bench.py detect``),
    the same calcium voxel for voxel. Each kept voxel has ``pad`` voxels
    of image around it in its box, as in the one box, so the two differ only where the deconvolution's far
    tail reaches a box's edge: on 20 of the world's tuning studies (most of which tiles also make cheaper)
    the calcium found was the same voxel for voxel in 19, and one 60-voxel deposit more in the 20th.
    """
    tile = SHARP_TILE if tile is None else tile
    held = padded_bbox(mask, [0, 0, 0])
    if held is None:
        return []
    whole = grow_box(held, mask.shape, [pad] * 3)
    tiles = []
    for z0 in range(whole[0].start, whole[0].stop, tile):
        for y0 in range(whole[1].start, whole[1].stop, tile):
            for x0 in range(whole[2].start, whole[2].stop, tile):
                core = (slice(z0, min(z0 + tile, whole[0].stop)), slice(y0, min(y0 + tile, whole[1].stop)),
                        slice(x0, min(x0 + tile, whole[2].stop)))
                inner = padded_bbox(mask[core], [0, 0, 0])
                if inner is not None:
                    kept = tuple(slice(c.start + i.start, c.start + i.stop) for c, i in zip(core, inner))
                    tiles.append((grow_box(kept, mask.shape, [pad] * 3), kept))

    def size(box: tuple[slice, ...]) -> int:
        return int(np.prod([s.stop - s.start for s in box]))

    if sum(size(box) for box, _ in tiles) < size(whole):
        return tiles
    return [(whole, held)]


def _levels_over(level: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """A coarse level map (``contrast.BLOCK`` cells) at every voxel of ``box``."""
    cells = [np.minimum(np.arange(sl.start, sl.stop) // BLOCK, n - 1) for sl, n in zip(box, level.shape)]
    return level[np.ix_(*cells)]


class Sharpenings:
    """The boxes one detection has sharpened, kept (up to ``budget_bytes``) for a later rule that sharpens the same
    boxes under the same blur.

    Why: the learnt detector looks at everything the sharpened-image test looked at, after it (it needs the test's
    deposits among the rules' calcium); sharpening it all again took the engine 1.8 times as long on the tuning
    studies (921 s against 510). The budget bounds what a large CTA holds (its tiles are sharpened again instead).
    """

    def __init__(self, budget_bytes: int = SHARP_MEMO_MB << 20) -> None:
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self._kept: dict[tuple, list[np.ndarray]] = {}

    def get(self, key: tuple) -> list[np.ndarray] | None:
        return self._kept.get(key)

    def put(self, key: tuple, sharpened: list[np.ndarray]) -> None:
        size = sum(u.nbytes for u in sharpened)
        if self.used_bytes + size <= self.budget_bytes:
            self._kept[key] = sharpened
            self.used_bytes += size


def _sharpened_parts(volume: np.ndarray, spacing: tuple[float, float, float], mask: np.ndarray, mtf50_lp_cm: float,
                     memo: Sharpenings | None = None) -> Iterator[tuple[tuple[slice, ...], np.ndarray, np.ndarray]]:
    """The image sharpened (total-variation deconvolution under a blur of ``mtf50_lp_cm``, the subtraction's)
    over every voxel of ``mask``, box by box (:func:`sharpening_boxes`): ``(kept, acquired, sharpened)`` with
    ``kept`` the slices of the volume the two float64 arrays cover; together the kept boxes hold all of ``mask``.
    """
    for box, kept, part, u in _sharpened_boxes(volume, spacing, mask, mtf50_lp_cm, memo):
        inner = _relative(kept, box)
        yield kept, part[inner], u[inner]


def _sharpened_boxes(volume: np.ndarray, spacing: tuple[float, float, float], mask: np.ndarray, mtf50_lp_cm: float,
                     memo: Sharpenings | None = None
                     ) -> Iterator[tuple[tuple[slice, ...], tuple[slice, ...], np.ndarray, np.ndarray]]:
    """As :func:`_sharpened_parts`, with each whole box: ``(box, kept, acquired, sharpened)``, the two arrays over
    ``box``, which holds ``kept`` with ``SHARP_PAD`` voxels of image around it (what a neighbourhood reads).
    ``memo``: where the same boxes sharpened under the same blur are looked up first, and kept when sharpened here
    (and consumed whole); the sharpened arrays are shared, and no caller writes into them."""
    boxes = sharpening_boxes(mask)
    if not boxes:
        return
    key = (float(mtf50_lp_cm), tuple((s.start, s.stop) for box, kept in boxes for s in (*box, *kept)))
    known = memo.get(key) if memo is not None else None
    if known is not None:
        for (box, kept), u in zip(boxes, known):
            yield box, kept, volume[box].astype(np.float64), u
        return
    made: list[np.ndarray] = []
    blur = ScannerBlur(mtf50_lp_cm=mtf50_lp_cm)

    def sharpened(box: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray]:
        part = volume[box].astype(np.float64)
        return part, sharpen(part, blur.transfer(part.shape, spacing), SubtractOptions.tv_weight,
                             SubtractOptions.iterations)

    # the boxes are independent and numpy's FFT releases the GIL: side by side on two cores (4 tiles of 80^3:
    # 11.7 s one after the other, 6.0 s in two threads, the same values); one box needs no pool
    with ThreadPoolExecutor(max_workers=min(THREADS, len(boxes))) as pool:
        for (box, kept), (part, u) in zip(boxes, pool.map(sharpened, [box for box, _ in boxes])):
            if memo is not None:
                made.append(u)
            yield box, kept, part, u
    if memo is not None:
        memo.put(key, made)


def _relative(box: tuple[slice, ...], within: tuple[slice, ...]) -> tuple[slice, ...]:
    """``box``'s slices counted from the start of ``within`` (which holds it)."""
    return tuple(slice(b.start - w.start, b.stop - w.start) for b, w in zip(box, within))


def _sharpened_with_levels(volume: np.ndarray, spacing: tuple[float, float, float], mask: np.ndarray,
                           opts: DetectOptions, reference: np.ndarray, memo: Sharpenings | None = None
                           ) -> Iterator[tuple[tuple[slice, ...], np.ndarray, np.ndarray, np.ndarray]]:
    """As :func:`_sharpened_parts`, with the contrast level each kept voxel is compared with (``opts.sharp_level``):
    ``reference`` (the acquired image's brightest level nearby, coarse) at those voxels, and with ``"sharpened"``
    the higher of that and the sharpened lumen's level, measured on each whole box (a kept voxel's neighbourhood
    is the box's, ``SHARP_PAD`` voxels of it)."""
    for box, kept, part, u in _sharpened_boxes(volume, spacing, mask, opts.sharp_mtf50_lp_cm, memo):
        inner = _relative(kept, box)
        if opts.sharp_level == "sharpened":  # the acquired level over the whole box, where the lumen's band is read
            around = _levels_over(reference, box)
            levels = np.fmax(around, _sharpened_lumen_level(part, u, around, spacing))[inner]
        else:
            levels = _levels_over(reference, kept)
        yield kept, part[inner], u[inner], levels


SHARP_LEVEL_TRIMS = 2  # times the sharpened lumen's level is measured again without what stands above it
SHARP_LEVEL_MIN_WEIGHT = 0.25  # the Gaussian-weighted share of lumen-band voxels around a voxel its level needs


def _sharpened_lumen_level(part: np.ndarray, u: np.ndarray, reference: np.ndarray,
                           spacing: tuple[float, float, float]) -> np.ndarray:
    """The lumen's level in the sharpened box ``u``: its values averaged (Gaussian, ``contrast.SIGMA_MM``) over the
    voxels the acquired box ``part`` shows in the lumen's band (within ``contrast.NOISE_BAND_HU`` of ``reference``,
    the acquired level at each voxel), measured again ``SHARP_LEVEL_TRIMS`` times without the voxels that stand
    ``NOISE_BAND_HU`` above it; nan where too few are near (``SHARP_LEVEL_MIN_WEIGHT``).

    Why the acquired image picks the voxels: measured on the sharpened image alone, a faint deposit next to the
    lumen is averaged into its own level and no longer stands above it (a 700 HU half-ring beside a 400 HU lumen
    was found no more). The acquired image shows both that deposit and a small vessel's core in the lumen's band;
    what tells them apart is the sharpened lumen beside them: a 3 mm lumen sharpens back to its level, under the
    deposit, while a small vessel's sharpened core is its lumen. So what stands above the level is left out and the
    level measured again.
    """
    band = np.abs(part - reference) < NOISE_BAND_HU
    sigma = [SIGMA_MM / s for s in spacing]
    level = np.full(part.shape, np.nan)
    for _ in range(1 + SHARP_LEVEL_TRIMS):
        weight = ndimage.gaussian_filter(band.astype(np.float64), sigma)
        total = ndimage.gaussian_filter(np.where(band, u, 0.0), sigma)
        with np.errstate(invalid="ignore", divide="ignore"):
            level = np.where(weight >= SHARP_LEVEL_MIN_WEIGHT, total / weight, np.nan)
        with np.errstate(invalid="ignore"):
            band &= ~(u > level + NOISE_BAND_HU)  # what stands above the level is not the lumen's: measured again
    return level


@dataclass(frozen=True)
class SharpPiece:
    """One connected candidate of the sharpened-image test, measured, before the tests that keep or drop it.

    Why its own type: the lab counts what each test would keep (``dicom_node_lab.sharp_pieces``), and must
    see the pieces ``detect`` sees, measured as ``detect`` measures them, rather than a second copy of the
    sharpening that drifts from this one.
    """

    voxels: np.ndarray  # bool, over ``where``
    where: tuple[slice, ...]  # its slices of the volume
    volume_mm3: float
    # how far it stands above the test's threshold in the sharpened image, summed over its voxels (HU mm³) and
    # divided by the image's noise SD: what sharp_min_excess_mm3 compares (nan where no noise was measured)
    excess_noise_mm3: float
    sharpened_peak_hu: float  # the sharpened image's peak above the vessel's contrast level
    acquired_peak_hu: float  # the acquired image's peak above it (what sharp_max_above_hu compares)


def sharp_candidates(volume: np.ndarray, spacing: tuple[float, float, float], avoid: np.ndarray,
                     opts: DetectOptions, level: np.ndarray, noise_sd: float = float("nan"),
                     measure: bool = True, memo: Sharpenings | None = None) -> Iterator[SharpPiece]:
    """Every connected piece that stands ``sharp_contrast_hu`` above its vessel's contrast in the sharpened
    image (and above ``local_floor_hu`` as acquired), none within two voxels of ``avoid``, measured.

    ``measure=False`` leaves each piece's excess and peaks nan and skips the float map they are read from (4
    bytes a voxel over the candidate area, about 130 MB on a 128 x 512 x 512 CTA): the node's defaults use
    none of them, so a study pays for them only when an option that reads them is on.

    The image is sharpened by total-variation deconvolution (the subtraction's) box by box
    (``sharpening_boxes``), over all that stands above ``local_floor_hu``; ``level`` is the contrast level
    map (``contrast.local_lumen_level``), each voxel compared with the brightest level nearby.
    """
    above = volume > opts.local_floor_hu
    # what holds every kept part (the bounding box of all above the floor), with the margin the one box has
    area = padded_bbox(above, [SHARP_PAD] * 3)
    if area is None:
        return
    ref = brightest_level_nearby(level, spacing)
    cand = np.zeros(tuple(s.stop - s.start for s in area), bool)
    # how far each candidate voxel stands above the test's threshold (only when the pieces are measured)
    excess = np.zeros(cand.shape, np.float32) if measure else None
    for kept, part, u, levels in _sharpened_with_levels(volume, spacing, above, opts, ref, memo):
        with np.errstate(invalid="ignore"):  # nan (no contrast) is False
            over = u - levels - opts.sharp_contrast_hu
            hit = (over > 0) & (part > opts.local_floor_hu)
        cand[_relative(kept, area)] |= hit
        if excess is not None:
            held = excess[_relative(kept, area)]
            np.maximum(held, np.where(hit, over, 0.0), out=held)
    del above
    cand &= ~ndimage.binary_dilation(avoid[area], iterations=2)
    lab, _, objects = _label(cand)
    voxel_mm3 = float(np.prod(spacing))
    noise_known = np.isfinite(noise_sd) and noise_sd > 0
    nan = float("nan")
    for i, sl in enumerate(objects, start=1):
        piece = lab[sl] == i
        where = tuple(slice(s.start + a.start, s.stop + a.start) for s, a in zip(sl, area))
        volume_mm3 = float(piece.sum()) * voxel_mm3
        if excess is None:
            yield SharpPiece(voxels=piece, where=where, volume_mm3=volume_mm3, excess_noise_mm3=nan,
                             sharpened_peak_hu=nan, acquired_peak_hu=nan)
            continue
        over = excess[sl][piece]
        # the acquired level (finite wherever the test compared with it; with sharp_level = "sharpened" nan where the
        # acquired image has no contrast near, which no acquired-peak test then keeps out)
        levels = _levels_over(ref, where)[piece]
        yield SharpPiece(voxels=piece, where=where, volume_mm3=volume_mm3,
                         excess_noise_mm3=float(over.sum()) * voxel_mm3 / noise_sd if noise_known else nan,
                         sharpened_peak_hu=float(over.max()) + opts.sharp_contrast_hu,
                         acquired_peak_hu=float(np.max(volume[where][piece].astype(np.float64) - levels)))


def _sharp_deposits(volume: np.ndarray, spacing: tuple[float, float, float], avoid: np.ndarray,
                    opts: DetectOptions, level: np.ndarray, noise_sd: float = float("nan"),
                    memo: Sharpenings | None = None) -> Iterator[tuple[np.ndarray, tuple[slice, ...]]]:
    """Deposits that the scanner's blur has spread into the lumen's own range, found where the blur is undone:
    each as its voxels (bool) over its slices of the volume.

    Calcium of 400-500 mg HA/cm³ stands about 200 HU above a bright lumen; blurred, its peak sinks to within
    the lumen's noise, and neither the threshold nor the faint-calcium test sees it, though left in place it
    reads as lumen (under-call). Sharpened by total-variation deconvolution (the subtraction's), it stands
    clear again (:func:`sharp_candidates`). Only components of some volume count (a sharpened image's noise
    makes small ones), and none within two voxels of ``avoid`` (calcium already found, whose flank is the
    threshold's and the margin's; what the rules left alone, around which a deconvolution rings).

    A smaller component counts too with ``sharp_min_excess_mm3``, when how far it stands above the test's
    threshold, summed over its voxels and measured in the image's noise SD (``noise_sd``), is that large. Why:
    a thin deposit is found piece by piece, and the pieces the volume test drops (1-5 mm³) are where a long
    lesion goes on unrestored and reads as lumen; the sharpened noise makes pieces as large, but fainter. Of
    the pieces under 5 mm³ on the 120 tuning studies, 26 of the 138 touching the phantom's calcium and none of
    the 2,517 elsewhere (not cut by the volume's edge) reach 10 mm³ (reports/tuning/sharpened-excess.md).
    """
    measure = opts.sharp_min_excess_mm3 > 0 or opts.sharp_max_above_hu > 0
    for piece in sharp_candidates(volume, spacing, avoid, opts, level, noise_sd, measure=measure, memo=memo):
        # nan (no noise measured) keeps nothing by its excess
        if piece.volume_mm3 < opts.sharp_min_volume_mm3 and not (
                opts.sharp_min_excess_mm3 > 0 and piece.excess_noise_mm3 >= opts.sharp_min_excess_mm3):
            continue
        # a deposit that already looks white is one the reader stops at; removed only in part, it would read as lumen
        if opts.sharp_max_above_hu > 0 and piece.acquired_peak_hu >= opts.sharp_max_above_hu:
            continue
        yield piece.voxels, piece.where


def cut_by_edge(box: tuple[slice, ...], shape: tuple[int, ...]) -> bool:
    """Whether a component's slices reach the scanned volume's edge, where it cannot be told from the sliver of
    a structure lying outside (and where the sharpened image rings: a box's FFT wraps there)."""
    return any(s.start == 0 or s.stop == n for s, n in zip(box, shape))


def _structure_reason(lesion: Lesion, shape: tuple[int, ...], opts: DetectOptions) -> str:
    """Why a component is bone, a device or a piece cut by the volume's edge rather than calcium ("" if none)."""
    if lesion.volume_mm3 >= opts.dense_min_volume_mm3:
        return "large dense structure (bone cortex or device)"
    if lesion.peak_hu >= opts.metal_hu:
        return f"metal (peak {lesion.peak_hu:.0f} HU >= {opts.metal_hu:.0f})"
    if cut_by_edge(lesion.bbox, shape) and not opts.keep_edge_components:
        return "cut by the edge of the scanned volume (cannot be told from bone)"
    return ""


def _peak_above_lumen(volume: np.ndarray, sl: tuple[slice, slice, slice], part: np.ndarray,
                      level: np.ndarray | None) -> float:
    """How far a component's brightest voxel rises above the contrast level around it (nan: no contrast near)."""
    if level is None:
        return float("nan")
    values = np.where(part, volume[sl], -np.inf)
    idx = np.unravel_index(int(np.argmax(values)), part.shape)
    cell = tuple(min((s.start + j) // BLOCK, n - 1) for s, j, n in zip(sl, idx, level.shape))
    return float(values[idx] - level[cell])


def peak_above_level_beyond(volume: np.ndarray, spacing: tuple[float, float, float], sl: tuple[slice, slice, slice],
                            part: np.ndarray, away_mm: float, box_mm: float | None = None) -> float:
    """How far a component's brightest voxel rises above the contrast level measured more than ``away_mm`` from the
    component (``subtract.reference_levels``: the nearest such contrast within its reach; nan: none), looked for in
    ``sl`` grown by ``box_mm`` (None: ``away_mm`` plus that reach). The lab's ``experiment2v2.calcium_contrast``
    measures a region's calcium so too.

    Why: the noise test compares a component's peak with the level around it, and a faint deposit's own bloom fills
    a small lumen and lifts that level: on 200 training studies (seed 7070) the test dropped as noise components
    of 2-16 mm³ lying on the phantom's calcium, one peaking 157 HU above the level around it and 460 HU above its
    true lumen, and none of that size elsewhere. A clump of noise in a lumen has the same lumen beyond it.
    """
    reach_mm = away_mm + REFERENCE_REACH_MM if box_mm is None else box_mm
    reach = np.ceil(reach_mm / np.asarray(spacing, float)).astype(int)
    grown = grow_box(sl, volume.shape, reach)
    sub = volume[grown].astype(np.float32)
    mine = np.zeros(sub.shape, bool)
    mine[tuple(slice(b.start - g.start, b.stop - g.start) for b, g in zip(sl, grown))] = part
    peak = np.unravel_index(int(np.argmax(np.where(mine, sub, -np.inf))), sub.shape)
    level = reference_levels(sub, mine, spacing, np.array([peak]), away_mm, np.nan)[0]
    return float(sub[peak] - level) if np.isfinite(level) else float("nan")


def detect(volume: np.ndarray, spacing: tuple[float, float, float], options: DetectOptions | None = None,
           level_image: np.ndarray | None = None) -> Detection:
    """Calcium mask and lesion list for a HU volume; everything excluded is explained.

    ``level_image`` (same shape): the image the vessels' contrast level is measured on, when not
    ``volume`` itself. The node never passes one; the lab passes the calcium-free truth image to ask
    how much the calcium's own blur, pulling the measured level up, costs (``--oracle-level``).
    """
    opts = options or DetectOptions()
    threshold = opts.threshold_hu
    excluded: list[dict] = []
    if opts.adaptive:
        med, sd = lumen_statistics(volume)
        if np.isfinite(med):
            # Only ever lower the fixed threshold: raised above it in bright-contrast studies, the
            # adaptive threshold left a quarter of the calcium in place (Experiment 2 tuning studies).
            threshold = min(opts.threshold_hu, max(opts.adaptive_floor_hu, med + opts.adaptive_sd * sd))
    voxel_mm3 = float(np.prod(spacing))
    bright = volume > threshold
    if level_image is not None and level_image.shape != volume.shape:
        raise ValueError(f"level_image has shape {level_image.shape}, the volume {volume.shape}")
    level = (local_lumen_level(volume if level_image is None else level_image, spacing)
             if opts.local_contrast_hu > 0 or opts.noise_sigmas > 0 or opts.sharpens else None)
    if opts.local_contrast_hu > 0:
        bright |= _faint_calcium(volume, spacing, bright, opts, level)
    noise_sd = (image_noise_sd(volume) if opts.noise_sigmas > 0 or opts.sharp_min_excess_mm3 > 0
                or opts.learnt is not None else float("nan"))
    # Large dense structures: what survives an opening wider than any coronary calcium.
    # Bone cut by the field of view stays bone: the opening treats the volume as continuing.
    opened = open_mm(bright, spacing, opts.dense_opening_mm)
    dense = np.zeros_like(bright)
    lab, n, objects = _label(opened)
    if n:
        sizes = np.bincount(lab.reshape(-1)[np.flatnonzero(opened)], minlength=n + 1)[1:] * voxel_mm3
        for i, (size, sl) in enumerate(zip(sizes, objects), start=1):
            if size >= opts.dense_min_volume_mm3:
                part = lab[sl] == i
                dense[sl] |= part
                c = [x + s.start for x, s in zip(ndimage.center_of_mass(part), sl)]
                excluded.append({"reason": "bone or large dense structure", "volume_mm3": round(float(size), 1),
                                 "centroid": [round(float(x), 1) for x in c]})
    if dense.any():
        # edges and corners of the structure do not survive the opening; grow it back by half the
        # opening radius, no further, so that calcium touching the structure stays (mostly) calcium
        regrow = max(0.5 * opts.dense_opening_mm, max(spacing) * 1.01)
        dense = dilate_mm(dense, spacing, regrow) & bright
    candidates = bright & ~dense
    del bright, opened
    # what the sharpened-image test must keep away from: bone, and the metal, bone slivers and large
    # structures the rules below leave alone (a deconvolution rings around them); not the noise they drop
    avoid = dense if opts.sharpens else None
    del dense
    lab, n, objects = _label(candidates)
    lesions: list[Lesion] = []
    calcium = np.zeros(volume.shape, bool)
    labels = lab  # relabelled in place below: only kept lesions, numbered from 1
    if n:
        for i, sl in enumerate(objects, start=1):
            part = lab[sl] == i
            lesion = _lesion(len(lesions) + 1, part, sl, volume, voxel_mm3)
            vol_mm3, centroid = lesion.volume_mm3, lesion.centroid
            if vol_mm3 < opts.min_volume_mm3:
                lab[sl][part] = 0
                continue  # noise spike; not worth a line in the report
            reason = _structure_reason(lesion, volume.shape, opts)
            if reason and avoid is not None:
                avoid[sl] |= part
            if (not reason and opts.noise_sigmas > 0 and vol_mm3 < opts.noise_keep_mm3 and np.isfinite(noise_sd)
                    and np.isfinite(above := _peak_above_lumen(volume, sl, part, level))
                    and above < opts.noise_sigmas * noise_sd
                    and not (opts.noise_away_mm > 0 and vol_mm3 >= opts.noise_away_min_mm3
                             and peak_above_level_beyond(volume, spacing, sl, part, opts.noise_away_mm)
                             >= opts.noise_sigmas * noise_sd)):
                reason = (f"noise (peak {above:.0f} HU above its lumen, under {opts.noise_sigmas:g} × "
                          f"the image's noise SD of {noise_sd:.0f} HU)")
            if reason:
                lab[sl][part] = 0
                excluded.append({"reason": reason, "volume_mm3": round(vol_mm3, 1),
                                 "centroid": [round(c, 1) for c in centroid]})
                continue
            lesions.append(lesion)
            calcium[sl] |= part
            labels[sl][part] = lesion.index  # index <= i, so unvisited labels are never overwritten
    # the learnt detector looks again at what the sharpened-image test sharpened: kept for it
    memo = Sharpenings() if opts.learnt is not None else None
    if opts.sharp_contrast_hu > 0:
        _add_sharp_calcium(volume, spacing, opts, level, calcium | avoid, calcium, labels, lesions, excluded, noise_sd,
                           memo)
    if opts.grow_sharp_hu > 0 and lesions:
        _grow_in_sharpened(volume, spacing, opts, level, avoid, calcium, labels, lesions)
    if opts.trim_sharp_hu > 0 and lesions:
        lesions = _trim_in_sharpened(volume, spacing, opts, level, calcium, labels, lesions, excluded)
    if opts.learnt is not None:
        calcium, labels, lesions = _learnt_calcium(volume, spacing, opts, level, avoid, calcium, labels, lesions,
                                                   excluded, noise_sd, memo)
    return Detection(calcium=calcium, lesions=lesions, threshold_hu=threshold, excluded=excluded, labels=labels)


def _add_sharp_calcium(volume: np.ndarray, spacing: tuple[float, float, float], opts: DetectOptions,
                       level: np.ndarray, avoid: np.ndarray, calcium: np.ndarray, labels: np.ndarray,
                       lesions: list[Lesion], excluded: list[dict], noise_sd: float = float("nan"),
                       memo: Sharpenings | None = None) -> None:
    """Add the deposits only the sharpened image shows (:func:`_sharp_deposits`) as lesions, in place.

    After the other rules, not before: such a deposit is faint, and the noise test (made for the acquired
    image, where a faint deposit and a noise blob look alike) would drop it; the sharpened image's volume
    test stands in for it. Bone, devices and pieces cut by the volume's edge are left as the rules say.
    """
    voxel_mm3 = float(np.prod(spacing))
    for part, sl in _sharp_deposits(volume, spacing, avoid, opts, level, noise_sd, memo):
        lesion = replace(_lesion(len(lesions) + 1, part, sl, volume, voxel_mm3), sharpened=True)
        reason = _structure_reason(lesion, volume.shape, opts)
        if reason:
            excluded.append({"reason": f"sharpened: {reason}", "volume_mm3": round(lesion.volume_mm3, 1),
                             "centroid": [round(c, 1) for c in lesion.centroid]})
            continue
        lesions.append(lesion)
        calcium[sl] |= part
        labels[sl][part] = lesion.index


def _grow_in_sharpened(volume: np.ndarray, spacing: tuple[float, float, float], opts: DetectOptions,
                       level: np.ndarray, avoid: np.ndarray, calcium: np.ndarray, labels: np.ndarray,
                       lesions: list[Lesion]) -> None:
    """Grow each lesion, in place, into the voxels next to it that the sharpened image shows ``grow_sharp_hu``
    above their vessel's contrast, up to ``grow_mm`` from where it was found (connected to it through such
    voxels; not into ``avoid`` nor another lesion).

    Why: the rules find a deposit's bright core, about 60 % of its voxels on the world's tuning studies (the rest
    lies on its flanks and its outer side, where the blur mixes it with the wall's tissue and it reads no
    brighter than the lumen as acquired); an estimate of the calcium's blur made on the phantom's whole deposits
    reads 4.04 points against 5.05 for the detection as found (reports/tuning/estimate-detection.md). Where the
    blur is undone, the flank stands clear of the lumen again; lumen and wall do not.
    """
    pad = np.ceil(opts.grow_mm / np.asarray(spacing, float)).astype(int) + 1
    area = padded_bbox(calcium, pad)  # holds every lesion's box below
    if area is None:
        return
    reach = dilate_mm(calcium, spacing, opts.grow_mm)
    ref = brightest_level_nearby(level, spacing)
    bright = np.zeros(tuple(s.stop - s.start for s in area), bool)
    for kept, _, u in _sharpened_parts(volume, spacing, reach, opts.sharp_mtf50_lp_cm):
        with np.errstate(invalid="ignore"):  # nan (no contrast) is False
            bright[_relative(kept, area)] |= u - _levels_over(ref, kept) > opts.grow_sharp_hu
    bright &= reach[area] & ~avoid[area]
    del reach
    sp = np.asarray(spacing, float)
    voxel_mm3 = float(np.prod(spacing))
    for k, lesion in enumerate(lesions):
        box = grow_box(lesion.bbox, volume.shape, pad)
        part = labels[box] == lesion.index
        near = ndimage.distance_transform_edt(~part, sampling=sp) <= opts.grow_mm
        free = bright[_relative(box, area)] & near & ~calcium[box]
        grown = ndimage.binary_propagation(part, structure=CONNECTIVITY_26, mask=part | free)
        new = grown & ~part
        if not new.any():
            continue
        calcium[box] |= new
        labels[box][new] = lesion.index
        lesions[k] = _reshaped(lesion, lesion.index, grown, box, volume, voxel_mm3)


def _reshaped(lesion: Lesion, index: int, mask: np.ndarray, box: tuple[slice, ...], volume: np.ndarray,
              voxel_mm3: float) -> Lesion:
    """``lesion``'s record after the growth or the trim changed its voxels to ``mask`` (bool over ``volume[box]``),
    numbered ``index``; whether it was found only where the blur is undone stays as it was."""
    held = padded_bbox(mask, [0, 0, 0])
    whole = tuple(slice(b.start + h.start, b.start + h.stop) for b, h in zip(box, held))
    return replace(_lesion(index, mask[held], whole, volume, voxel_mm3), sharpened=lesion.sharpened)


def _trim_in_sharpened(volume: np.ndarray, spacing: tuple[float, float, float], opts: DetectOptions,
                       level: np.ndarray, calcium: np.ndarray, labels: np.ndarray, lesions: list[Lesion],
                       excluded: list[dict]) -> list[Lesion]:
    """Take from each lesion, in place, the voxels on its lumen's side that the sharpened image shows less than
    ``trim_sharp_hu`` above their vessel's contrast, reached from the lumen through such voxels and at most
    ``trim_mm`` from it; return the lesions left (renumbered from 1 where one is taken whole, which is reported).

    Why: the rules take, beside each deposit, voxels of lumen that the calcium's blur lifted past them (1,050
    against 15,471 of calcium found on 30 of the world's tuning studies); removed as calcium they are where the
    severe stenoses the subtraction makes come from (taken away by an oracle: 2 / 3 made -> 1 / 1,
    reports/tuning/grown-detection.md). Where the blur is undone they fall back to the lumen's level (median 43
    HU above it, the calcium found 499), but so does some calcium on the deposit's outer side, mixed with the
    wall: so the trim starts from the lumen, here the voxels next to the calcium that the sharpened image shows
    between half the contrast level and ``trim_sharp_hu`` above it, and never reaches past ``trim_mm``. That lumen
    is often the deposit's own missed calcium, which the sharpened image also puts near the level: at 100 HU the trim
    takes 60 % of the extra voxels and 2.3 calcium voxels for each (reports/tuning/trimmed-detection.md), so it
    stays off.
    """
    sp = np.asarray(spacing, float)
    pad = np.ceil(opts.trim_mm / sp).astype(int) + 1
    area = padded_bbox(calcium, pad)  # holds every lesion's box below
    if area is None:
        return lesions
    ref = brightest_level_nearby(level, spacing)
    low = np.zeros(tuple(s.stop - s.start for s in area), bool)
    lumen = np.zeros(low.shape, bool)
    ring = ndimage.binary_dilation(calcium[area], structure=CONNECTIVITY_26)
    around = np.zeros(volume.shape, bool)
    around[area] = ring
    del ring
    for kept, _, u in _sharpened_parts(volume, spacing, around, opts.sharp_mtf50_lp_cm):
        with np.errstate(invalid="ignore"):  # nan (no contrast) is False: no level, no trim
            below = u - _levels_over(ref, kept) < opts.trim_sharp_hu
            low[_relative(kept, area)] |= below
            lumen[_relative(kept, area)] |= below & (u > 0.5 * _levels_over(level, kept))
    del around
    inside = calcium[area]
    low &= inside
    lumen &= ~inside
    voxel_mm3 = float(np.prod(spacing))
    kept_lesions: list[Lesion] = []
    for lesion in lesions:
        box = grow_box(lesion.bbox, volume.shape, pad)
        rel = _relative(box, area)
        part = labels[box] == lesion.index
        near = lumen[rel]
        if near.any():
            reach = ndimage.distance_transform_edt(~near, sampling=sp) <= opts.trim_mm
            soft = low[rel] & part & reach
            seed = soft & ndimage.binary_dilation(near, structure=CONNECTIVITY_26)
            gone = ndimage.binary_propagation(seed, structure=CONNECTIVITY_26, mask=soft)
        else:
            gone = np.zeros_like(part)
        left = part & ~gone
        if not left.any():
            calcium[box][part] = False
            labels[box][part] = 0
            excluded.append({"reason": "trimmed whole: the sharpened image shows it at its lumen's level",
                             "volume_mm3": round(lesion.volume_mm3, 1),
                             "centroid": [round(c, 1) for c in lesion.centroid]})
            continue
        index = len(kept_lesions) + 1
        if gone.any() or index != lesion.index:
            calcium[box][gone] = False
            labels[box][gone] = 0
            labels[box][left] = index
            lesion = _reshaped(lesion, index, left, box, volume, voxel_mm3)
        kept_lesions.append(lesion)
    return kept_lesions


def learnt_pools(volume: np.ndarray, spacing: tuple[float, float, float], opts: DetectOptions, level: np.ndarray,
                 found: np.ndarray, noise_sd: float, memo: Sharpenings | None = None, only_found: bool = False
                 ) -> Iterator[tuple[tuple[slice, ...], np.ndarray, np.ndarray]]:
    """What the learnt classifier decides, box by box: ``(kept, pool, rows)``, ``pool`` bool over ``kept`` (a
    part of the volume) and ``rows`` its voxels' ``detect_learnt.FEATURES`` (``np.flatnonzero`` order).

    The image is sharpened as the sharpened-image test sharpens it, over all above ``local_floor_hu`` (the test's
    floor); ``found`` is what the rules found. ``only_found`` (``learnt_mode = "trim"``): the pool cut to ``found``,
    and a box with none of it skipped before its features are computed. Public so that the lab's extraction sees
    exactly the node's pools.
    """
    level_near = brightest_level_nearby(level, spacing)
    above = volume > opts.local_floor_hu  # what the sharpened-image test sharpens: its boxes come from ``memo``
    for box, kept, part, u in _sharpened_boxes(volume, spacing, above, opts.sharp_mtf50_lp_cm, memo):
        if only_found and not found[kept].any():
            continue
        pool, rows = candidate_features(part, u, _levels_over(level_near, box), found[box], spacing, noise_sd,
                                        opts.sharp_mtf50_lp_cm, opts.local_floor_hu)
        inner = _relative(kept, box)
        keep = np.zeros(pool.shape, bool)
        keep[inner] = True
        if only_found:
            keep &= found[box]
        yield kept, (pool & keep)[inner], rows[keep[pool]]  # the kept voxels' rows, in their flat order in ``kept``


def _learnt_calcium(volume: np.ndarray, spacing: tuple[float, float, float], opts: DetectOptions, level: np.ndarray,
                    avoid: np.ndarray | None, calcium: np.ndarray, labels: np.ndarray, lesions: list[Lesion],
                    excluded: list[dict], noise_sd: float, memo: Sharpenings | None = None
                    ) -> tuple[np.ndarray, np.ndarray, list[Lesion]]:
    """The calcium after the learnt classifier decided its pool (``learnt_pools``): ``(calcium, labels, lesions)``.

    Within the pool its verdict replaces the rules' (``learnt_mode = "trim"``: only on the rules' own voxels, which
    it may give back but never add to); outside it the rules' calcium stands. Bone, devices and
    what the rules left alone (``avoid``) stay out. A component the rules did not touch must be
    ``learnt_min_volume_mm3`` large (the classifier's odd voxel in a bright lumen is noise, not a deposit); it is
    recorded as found only in the sharpened image, as the sharpened-image test's deposits are (the engine marks
    its restoration unsure), and so is a component that holds any of such a deposit. Lesions are numbered afresh,
    in raster order.

    Why the last: the sharpened-image test keeps its deposits two voxels (city-block) from the rules' calcium, so a
    deposit can touch a rules' lesion corner to corner; numbered afresh, the two became one lesion "found as
    acquired", and the region lost its unsure mark (held out, 5050-427: a faint deposit whose restoration read
    54 % as 72 %, called sure under the learnt trim; reports/tuning/learnt-detection.md, section 8).
    """
    assert opts.learnt is not None
    threshold = opts.probability()
    chosen = calcium.copy()
    # trimming, only the rules' own voxels are asked: the verdict can then only give them back
    for kept, pool, rows in learnt_pools(volume, spacing, opts, level, calcium, noise_sd, memo,
                                         only_found=opts.learnt_mode == "trim"):
        if not len(rows):
            continue
        verdict = np.zeros(pool.shape, bool)
        verdict[pool] = opts.learnt(rows) > threshold
        held = chosen[kept]
        held[pool] = verdict[pool]
    if avoid is not None:
        chosen &= ~avoid
    plain = {lesion.index for lesion in lesions if not lesion.sharpened}  # the rules' lesions found as acquired
    sharp_only = {lesion.index for lesion in lesions if lesion.sharpened}  # ... and those found only sharpened
    lab, _, objects = _label(chosen)
    voxel_mm3 = float(np.prod(spacing))
    out: list[Lesion] = []
    for i, sl in enumerate(objects, start=1):
        part = lab[sl] == i
        touched = set(np.unique(labels[sl][part]).tolist()) - {0}
        lesion = _lesion(len(out) + 1, part, sl, volume, voxel_mm3)
        reason = "" if lesion.volume_mm3 >= opts.min_volume_mm3 else "tiny"
        if not reason and not touched and lesion.volume_mm3 < opts.learnt_min_volume_mm3:
            reason = "tiny"
        if not reason:
            reason = _structure_reason(lesion, volume.shape, opts)
            if reason:
                excluded.append({"reason": f"learnt: {reason}", "volume_mm3": round(lesion.volume_mm3, 1),
                                 "centroid": [round(c, 1) for c in lesion.centroid]})
        if reason:
            chosen[sl][part] = False
            lab[sl][part] = 0
            continue
        out.append(replace(lesion, sharpened=bool(touched & sharp_only) or not (touched & plain)))
        lab[sl][part] = lesion.index
    return chosen, lab, out
