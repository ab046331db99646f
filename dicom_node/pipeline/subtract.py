"""Remove calcium by its physics: sharpen the image, take the calcium out, blur back.

Blooming is the scanner's blur spreading dense calcium into its surroundings. If the
blur is known, the calcium's own contribution to the image can be estimated and
subtracted, and what is left is what the scanner would show without the calcium: the
same blur, noise and partial volume of the lumen, with no network to invent anything.

For each planned region (the calcium and its margin, as the network path restores it):

1. take a box around it, padded by ``pad_mm`` (the blur's reach) from the volume;
2. sharpen it: total-variation deconvolution by the assumed scanner blur (``ScannerBlur``),
   which recovers a piecewise-flat image in which calcium stands clear of the lumen;
3. call calcium what is sharp-brighter than the local contrast level by
   ``white_above_lumen_hu``, near the detected calcium; its excess over ``plaque_hu``
   (calcium sits in plaque) is what the calcium adds to the anatomy;
4. blur that excess back and subtract it; only the region's footprint voxels are written.

The blur need not match the scanner exactly: on the calibrated world's tuning studies a
generic cardiac kernel did as well as each study's own (reports/tuning/subtract.md).
The deconvolution's weights are per voxel, so they assume a spacing near the model's 0.47 mm.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, get_args

import numpy as np
from scipy import ndimage

from dicom_node.pipeline.contrast import BLOCK, brightest_level_nearby, local_lumen_level, lumen_level_at
from dicom_node.pipeline.vessel import vessel_calibre_mm

FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))
TV_EPSILON_HU = 20.0  # smooths total variation below this step between neighbours (noise-sized)


@dataclass(frozen=True)
class ScannerBlur:
    """The scanner's blur as a transfer function: an in-plane MTF and a slice profile.

    In-plane: a Gaussian core with a mid-frequency lift of ``edge_enhance`` (sharp cardiac
    kernels lift the band near their MTF50, which draws the dark rim beside calcium), its
    width set so that the whole MTF falls to 0.5 at ``mtf50_lp_cm``. Along z: a Gaussian
    slice profile of ``slice_fwhm_mm``. Cardiac kernels lie at 3.5–6.5 lp/cm.
    """

    mtf50_lp_cm: float = 5.2
    edge_enhance: float = 0.5
    slice_fwhm_mm: float = 0.75

    def __post_init__(self) -> None:
        if not 1.0 <= self.mtf50_lp_cm <= 15.0:
            raise ValueError(f"mtf50_lp_cm {self.mtf50_lp_cm} is not a CT kernel's (1-15 lp/cm)")
        if not 0.0 <= self.edge_enhance <= 2.0:
            raise ValueError(f"edge_enhance must lie in 0..2, not {self.edge_enhance}")
        if not 0.1 <= self.slice_fwhm_mm <= 3.0:
            raise ValueError(f"slice_fwhm_mm {self.slice_fwhm_mm} is not a CT slice profile (0.1-3 mm)")

    def mtf(self, f_lp_mm: np.ndarray, sigma_mm: float | None = None) -> np.ndarray:
        """In-plane modulation transfer at radial frequencies ``f_lp_mm`` (cycles per mm)."""
        s = self.core_sigma_mm() if sigma_mm is None else sigma_mm
        g = np.exp(-2.0 * np.pi ** 2 * (s * f_lp_mm) ** 2)
        return g * (1.0 + self.edge_enhance * (1.0 - g))

    def core_sigma_mm(self) -> float:
        """The core's sigma that puts the MTF's 50 % point at ``mtf50_lp_cm`` (bisection)."""
        f50 = np.array([self.mtf50_lp_cm / 10.0])
        lo, hi = 0.01, 3.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if self.mtf(f50, mid)[0] > 0.5 else (lo, mid)
        return 0.5 * (lo + hi)

    def transfer(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
        """The transfer function on the real-FFT grid of a ``[z, y, x]`` box (``numpy.fft.rfftn``)."""
        fz = np.fft.fftfreq(shape[0], spacing[0])[:, None, None]
        fy = np.fft.fftfreq(shape[1], spacing[1])[None, :, None]
        fx = np.fft.rfftfreq(shape[2], spacing[2])[None, None, :]
        sigma = self.core_sigma_mm()
        z = np.exp(-2.0 * np.pi ** 2 * (self.slice_fwhm_mm * FWHM_TO_SIGMA * fz) ** 2)
        return (self.mtf(np.sqrt(fy ** 2 + fx ** 2), sigma) * z).astype(np.float64)


FEATURES = ("sharp", "acquired", "sharp_0.5mm", "sharp_max_1mm", "sharp_min_1mm", "acquired_1mm", "rule_excess",
            "distance_mm", "detected", "level", "mtf50", "acquired_max_1mm", "sharp_detail", "white")
RULE = FEATURES.index("rule_excess")
# A feature of the whole box rather than of a voxel, after ``FEATURES`` where an estimate's file takes it: the
# calibre of the vessel at the calcium (``vessel.vessel_calibre_mm`` on the box; NaN where there is no contrast to
# measure, which the estimate reads as the training mean). Why: every severe stenosis the subtraction made held out
# lies in a vessel under 2.8 mm, where a voxel of lumen taken is a quarter of the diameter, and a voxel's own
# neighbourhood (2 voxels) cannot say how wide the vessel is.
VESSEL_FEATURE = "vessel_mm"


@dataclass(frozen=True, eq=False)  # compared and hashed as the object: its arrays have no single truth value
class LearntExcess:
    """A small network that estimates the calcium's excess over plaque from the sharpened image.

    Why: the white-level rule (a voxel is all calcium or none) mistakes the sharpened calcium's flank for
    lumen on one side and the lumen's share of an edge voxel for calcium on the other; which way it errs
    depends on the kernel and the deposit. Trained (lab ``calcium_estimate.py``) so that the estimate,
    blurred, matches what the calcium adds to the acquired image in the region's footprint. Inputs: the
    ``FEATURES`` of each voxel near the detected calcium; output: its excess in HU (never below 0), as a
    correction of the rule's (the network's output is added to ``rule_excess``), so an untrained network
    is the rule.

    Per voxel (``convolutions`` empty) it sees one voxel's features. With ``convolutions`` (3x3x3, each one
    voxel further) it also sees its neighbours': how wide the lumen is around a ring, how far the ring goes
    round, which a single voxel's features cannot tell and where the per-voxel estimate errs most (dense
    calcium in 2-3 mm vessels). The convolutions run on the hidden layers' output, on the domain grown by
    one voxel per convolution (zero outside it), and the last layer reads the hidden and the convolved units
    side by side.
    """

    weights: tuple[np.ndarray, ...] = field(repr=False)  # W0, b0, W1, b1, ...: ReLU layers, the last linear
    mean: np.ndarray = field(repr=False)  # the features' normalisation (training's mean and SD)
    scale: np.ndarray = field(repr=False)
    reach_voxels: int = 3  # the estimate's domain: the detected calcium dilated by this many voxels
    digest: str = ""  # the weights file's SHA-256: what the derived series' UIDs and job records name
    # How its inputs' contrast level was measured (``reference_levels``): 0 = around each voxel, as detection
    # measures it; above 0, from the contrast further than this many mm from the detected calcium. Part of the
    # file (like ``reach_voxels``): an estimate sees its features only as it was trained on them.
    level_away_mm: float = 0.0
    # K0, k0, K1, k1, ...: 3x3x3 convolutions after the hidden layers, K of shape (27, in, out) in
    # ``itertools.product(range(3), repeat=3)`` order of (dz, dy, dx), each followed by ReLU
    convolutions: tuple[np.ndarray, ...] = field(default=(), repr=False)
    # How its inputs were sharpened: 0 = the plain total-variation sharpening; above 0, the anatomy-and-calcium
    # split with this ceiling above the contrast level (``SubtractOptions.anatomy_above_level_hu``). Part of the
    # file, for the same reason as ``level_away_mm``; the node sharpens for the estimate as the file says.
    anatomy_above_level_hu: float = 0.0
    # The file's name without its suffix (e.g. "calcium_excess_split"): how the lesion table, the job page and the
    # SR say which estimate restored a region when several run (``SubtractOptions.companions``)
    name: str = ""

    def __post_init__(self) -> None:
        if len(self.weights) < 2 or len(self.weights) % 2 or len(self.convolutions) % 2:
            raise ValueError("weights must be (W, b) pairs")
        takes = self.weights[0].shape[0]
        if takes not in (len(FEATURES), len(FEATURES) + 1) or self.mean.shape != (takes,):
            raise ValueError(f"the network takes {len(FEATURES)} features (or {len(FEATURES) + 1}, with "
                             f"{VESSEL_FEATURE}), not {takes}")
        if self.weights[-2].shape[1] != 1:
            raise ValueError("the network must give one value per voxel")
        if not 0.0 <= self.level_away_mm <= 10.0:
            raise ValueError(f"level_away_mm must lie in 0..10 mm, not {self.level_away_mm}")
        if not 0.0 <= self.anatomy_above_level_hu <= 1000.0:
            raise ValueError(f"anatomy_above_level_hu must lie in 0..1000 HU, not {self.anatomy_above_level_hu}")
        hidden = self.weights[-4].shape[1] if len(self.weights) > 2 else takes
        width = hidden
        for k in range(0, len(self.convolutions), 2):
            kernel, bias = self.convolutions[k], self.convolutions[k + 1]
            if kernel.shape[:2] != (27, width) or bias.shape != kernel.shape[2:]:
                raise ValueError(f"convolution {k // 2} must map {width} units with 27 taps, not {kernel.shape}")
            width = kernel.shape[2]
        if self.convolutions and self.weights[-2].shape[0] != hidden + width:
            raise ValueError(f"the last layer must read {hidden} hidden and {width} convolved units")

    @property
    def vessel_feature(self) -> bool:
        """Whether it reads the vessel's calibre (``VESSEL_FEATURE``) after the voxel's ``FEATURES``."""
        return self.weights[0].shape[0] == len(FEATURES) + 1

    @property
    def context_voxels(self) -> int:
        """How far beyond its domain the estimate looks: one voxel per convolution."""
        return len(self.convolutions) // 2

    @classmethod
    def load(cls, path: str | Path) -> LearntExcess:
        """Read an ``.npz`` written by the lab (``W0, b0, W1, b1, ..., mean, scale, reach_voxels``,
        ``level_away_mm`` where its levels were measured away from the calcium, ``anatomy_above_level_hu`` where
        its inputs were split-sharpened, ``K0, k0, ...`` where it convolves)."""
        data = Path(path).read_bytes()
        try:
            with np.load(io.BytesIO(data)) as z:
                layers = sorted(int(k[1:]) for k in z.files if k.startswith("W"))
                weights = tuple(z[f"{p}{i}"].astype(np.float64) for i in layers for p in ("W", "b"))
                convs = sorted(int(k[1:]) for k in z.files if k.startswith("K"))
                convolutions = tuple(z[f"{p}{i}"].astype(np.float64) for i in convs for p in ("K", "k"))
                away = float(z["level_away_mm"]) if "level_away_mm" in z.files else 0.0
                ceiling = float(z["anatomy_above_level_hu"]) if "anatomy_above_level_hu" in z.files else 0.0
                return cls(weights, z["mean"].astype(np.float64), z["scale"].astype(np.float64),
                           int(z["reach_voxels"]), hashlib.sha256(data).hexdigest(), away, convolutions, ceiling,
                           Path(path).stem)
        except (zipfile.BadZipFile, KeyError, EOFError, ValueError) as exc:  # not an .npz, or not the lab's
            raise ValueError(f"{path} is not a learnt calcium estimate ({exc})") from None

    def __call__(self, features: np.ndarray, voxels: np.ndarray | None = None) -> np.ndarray:
        """The excess (HU) of each row of ``features``; ``voxels`` (rows' [z, y, x], needed where the network
        convolves) place them on a grid."""
        x = (features - self.mean) / self.scale
        if self.vessel_feature:  # a calibre not measured reads as the training mean
            x[:, -1] = np.nan_to_num(x[:, -1], nan=0.0)
        for k in range(0, len(self.weights) - 2, 2):
            x = np.maximum(x @ self.weights[k] + self.weights[k + 1], 0.0)
        if self.convolutions:
            if voxels is None:
                raise ValueError("a convolving estimate needs its voxels' positions")
            x = np.concatenate([x, _convolved(x, voxels, self.convolutions)], axis=1)
        x = x @ self.weights[-2] + self.weights[-1]
        return np.clip(features[:, RULE] + x[:, 0], 0.0, None) * 1000.0


def _convolved(units: np.ndarray, voxels: np.ndarray, convolutions: tuple[np.ndarray, ...]) -> np.ndarray:
    """``units`` (one row per voxel of ``voxels``) through the 3x3x3 convolutions (ReLU after each), on
    those voxels' bounding box with zero elsewhere, read back at ``voxels``."""
    low = voxels.min(axis=0)
    at = tuple((voxels - low).T)
    shape = tuple(int(n) for n in voxels.max(axis=0) - low + 1)
    inside = np.zeros(shape, bool)
    inside[at] = True
    grid = np.zeros((*shape, units.shape[1]))
    grid[at] = units
    offsets = [(dz, dy, dx) for dz in range(3) for dy in range(3) for dx in range(3)]
    for k in range(0, len(convolutions), 2):
        kernel, bias = convolutions[k], convolutions[k + 1]
        padded = np.pad(grid, ((1, 1), (1, 1), (1, 1), (0, 0)))
        out = np.broadcast_to(bias, (*shape, len(bias))).copy()
        for tap, (dz, dy, dx) in enumerate(offsets):
            out += padded[dz:dz + shape[0], dy:dy + shape[1], dx:dx + shape[2]] @ kernel[tap]
        grid = np.where(inside[..., None], np.maximum(out, 0.0), 0.0)
    return grid[at]


def excess_features(y: np.ndarray, u: np.ndarray, calcium: np.ndarray, domain: np.ndarray, level: np.ndarray,
                    spacing: tuple[float, float, float], options: SubtractOptions) -> np.ndarray:
    """The ``FEATURES`` of each ``domain`` voxel (in ``np.nonzero`` order), HU / 1000 relative to ``level``
    (the contrast level at those voxels): what the learnt estimate sees."""
    sp = np.asarray(spacing, float)
    at = np.nonzero(domain)
    foot = np.ones((5, 5, 5), bool)
    rule = np.clip(u - options.plaque_hu, 0.0, None)
    white = u[at] > level + options.white_above_lumen_hu
    distance = ndimage.distance_transform_edt(~calcium, sampling=sp)[at] if calcium.any() else np.full(len(at[0]), 9.0)
    cols = [u[at] - level, y[at] - level, ndimage.gaussian_filter(u, 0.5 / sp)[at] - level,
            ndimage.maximum_filter(u, footprint=foot)[at] - level,
            ndimage.minimum_filter(u, footprint=foot)[at] - level,
            ndimage.gaussian_filter(y, 1.0 / sp)[at] - level, np.where(white, rule[at], 0.0),
            distance * 1000.0, calcium[at] * 1000.0, level, np.full(len(at[0]), options.blur.mtf50_lp_cm * 100.0),
            ndimage.maximum_filter(y, footprint=foot)[at] - level, u[at] - ndimage.gaussian_filter(u, 1.0 / sp)[at],
            white * 1000.0]
    return np.stack(cols, axis=1) / 1000.0


# Which regions' visible lumen beyond the calcium the subtraction holds: none, the unsure ones, every one, or
# those holding calcium only the sharpened image found ("sharpened"). Why the last: such a deposit is faint, so the
# acquired image shows its lumen with little bloom, and where the estimate takes the whole deposit in a small vessel
# it takes a voxel of that lumen too (held out, three lesions of about 50 % read 70-74 % so). Measured, it gives the
# under-call back (a faint deposit's own voxels lie in the lumen's range as acquired): off everywhere recommended
# (reports/tuning/sharpened-excess.md section 7).
KeepLumen = Literal["off", "unsure", "all", "sharpened"]
# How a region's restorations under several learnt estimates (``SubtractOptions.companions``) become the one
# written: the first estimate's (the others only measure the disagreement), their mean, the one that leaves
# the reader the most lumen (the most voxels in the lumen's range: the least calcium taken as lumen), or the
# first companion's where the detected calcium encloses the lumen (``restore.calcium_enclosure`` above
# ``SubtractOptions.enclosed_above``) and the first's elsewhere.
EstimateCombine = Literal["first", "mean", "wider", "enclosed"]


@dataclass(frozen=True)
class SubtractOptions:
    """How the calcium's contribution is estimated (see the module's docstring)."""

    blur: ScannerBlur = ScannerBlur()
    tv_weight: float = 3.0  # total-variation weight of the sharpening (HU per unit of variation)
    iterations: int = 60  # accelerated gradient steps of the sharpening
    white_above_lumen_hu: float = 100.0  # sharp voxels this far above the contrast level are calcium
    plaque_hu: float = 50.0  # what calcium is replaced by: the plaque it sits in
    pad_mm: float = 4.0  # image taken around each region for the blur's reach
    near_calcium_voxels: int = 2  # calcium in the sharp image is looked for this close to the detected
    # Confidence (with the engine's confidence on and ``unsure_hu`` above 0): the region is estimated again under
    # this second, softer blur (the softest cardiac kernel), and the two are compared where either shows lumen
    # (restore.lumen_disagreement); above unsure_hu the region is unsure. Off (0) by default: with the learnt
    # estimate and the site's kernel tables this blur disagreement ranks a large error above a good restoration
    # no better than chance held out (0.48; tuning 0.62), and the flag without it, a vessel under 2.75 mm, leaves
    # more restorations called sure that still meet issue 16's goals (reports/tuning/confidence-coverage.md).
    second_blur: ScannerBlur = ScannerBlur(mtf50_lp_cm=3.5)
    unsure_hu: float = 0.0
    # Reconstruction kernels (a series' ConvolutionKernel) and the in-plane MTF50 (lp/cm) to assume for
    # each, as a site knows them; a series whose kernel is not listed gets ``blur``. The estimate hangs
    # on the blur: assumed too sharp, soft-kernel calcium is under-removed; too soft, sharp-kernel
    # calcium is over-removed and stenoses over-called (reports/tuning/subtract-kernels.md).
    kernels: tuple[tuple[str, float], ...] = ()
    # ... and the white level (``white_above_lumen_hu``) for a kernel whose sharpened calcium stands lower:
    # under a soft kernel the deconvolution recovers less of the calcium's flank, which a threshold of
    # 100 HU leaves in the lumen's range, where the reader takes it for lumen (under-call).
    white_by_kernel: tuple[tuple[str, float], ...] = ()
    # ... and the mid-frequency lift (``ScannerBlur.edge_enhance``) to assume for a kernel: sharp cardiac kernels
    # lift more than soft ones, and the lift draws the dark rim beside calcium that the estimate must not take
    # for calcium's blur. A kernel not listed keeps ``blur.edge_enhance`` (reports/tuning/learnt-estimate.md §13).
    enhance_by_kernel: tuple[tuple[str, float], ...] = ()
    # Where the subtraction is written: the region's footprint (calcium + engine.margin_mm, as the network
    # restores it) and, when this is above 0, every voxel of the box where the calcium's estimated blur
    # adds more than this many HU. A fixed margin fits one blur; the blur's own reach fits every kernel
    # (a soft kernel spreads calcium further than the margin). 0 = the footprint only.
    reach_hu: float = 0.0
    # Steps of a refit of the calcium's excess, the anatomy held (0 = none): total variation shrinks a small
    # bright object's contrast, so the sharpened calcium under-explains its own blur; the excess is refitted,
    # non-negative and on the calcium's own voxels, to what the acquired box shows.
    refit_iterations: int = 0
    # > 0: the sharp calcium also takes its connected flank down to this far above the contrast level
    # (hysteresis below ``white_above_lumen_hu``): a flank voxel left in the anatomy keeps lumen brightness
    # where the calcium-free scan shows plaque, and the reader takes it for lumen. 0 = no growth.
    grow_above_lumen_hu: float = 0.0
    # Where (``KeepLumen``: no region, the unsure ones, all, those with sharpened-only calcium) a voxel further
    # than ``keep_lumen_beyond_mm`` from the detected calcium that the acquired image shows as lumen is never
    # darkened past the lumen's edge (``restore.keep_visible_lumen``); the calcium and its near flank may still go.
    # Where the estimate overshoots, its blurred excess takes lumen away beyond the calcium, and a reader sees a
    # narrowing the calcium-free scan does not show.
    keep_lumen: KeepLumen = "off"
    keep_lumen_beyond_mm: float = 0.5
    # A learnt estimate of the calcium's excess (``LearntExcess``, trained by the lab on the world's training
    # settings) in place of the white-level rule; None = the rule.
    learnt: LearntExcess | None = None
    # > 0: the sharpening splits the box into anatomy and calcium (``split_sharpen``): the anatomy may stand at
    # most this far above the vessel's contrast level (measured ``ANATOMY_LEVEL_AWAY_MM`` from the calcium), and
    # only what it cannot explain is calcium, on the voxels near the detected calcium. 0 = the plain
    # total-variation sharpening. Why: inside a ring of calcium a small lumen is at the limit of what a
    # deconvolution can resolve; unbounded, it drew the lumen of a 50 % ring of XCIST's as -228 HU between
    # calcium-bright voxels, whose excess, blurred back, took the lumen away (read occluded, truth 63 %).
    anatomy_above_level_hu: float = 0.0
    # Further learnt estimates, each run on every region beside ``learnt`` (each sharpening as its own file says),
    # and how their restorations are combined (``EstimateCombine``). Why: two estimates trained on the same world
    # but sharpening differently (plain; anatomy-and-calcium split) err on different lesions (on 120 tuning studies
    # their readings differ by more than 5 points at 36 of 197 calcified lesions, and where they do the error is
    # large more often). Measured, off: held out their mean reads 0.22 points closer but makes 2 more severe
    # stenoses, the wider 0.11 closer with as many, and their HU disagreement ranks errors no better than chance
    # (reports/tuning/estimate-ensemble.md). () = the one estimate. "enclosed" (the split's restoration where the
    # calcium encloses the lumen) is part of the README's recommended subtraction since the seventeenth session.
    companions: tuple[LearntExcess, ...] = ()
    combine: EstimateCombine = "first"
    # With combine = "enclosed": the enclosure (0-1) above which a region takes the first companion's restoration.
    # The split estimate reads rings better and small arcs worse; 0.7 was chosen on the tuning studies (the
    # enclosure's median is 0.38 / 0.54 / 0.73 for arcs < 90° / 90-180° / > 180°; reports/tuning/estimate-ensemble.md).
    enclosed_above: float = 0.7
    # A learnt estimate for the regions whose vessel's lumen (``vessel.vessel_at``'s ``lumen_hu``, the engine's own
    # measure) is dimmer than ``dim_below_hu``, in place of the first (a region the "enclosed" rule gives the
    # companion keeps it). Why: beside a dim lumen the reader's edge lies near the wall, and a residue of calcium
    # as faint as half the lumen's level already reads as lumen (under-call); beside a bright one a voxel of lumen
    # taken is the larger harm. How much more taking lumen costs than leaving bloom (the estimate's closing weight)
    # is right for one and wrong for the other: on the tuning studies an estimate trained without that extra cost
    # read dim lumens 5.8 points off against 6.9, bright ones 5.1 against 3.8, and under 360 HU only 4.89 against
    # 5.14; held out 6.58 against 6.50, the dim lumens' under-call halved but not their error
    # (reports/tuning/dim-lumens.md §7). None / 0 = one estimate for every lumen, the default.
    dim_learnt: LearntExcess | None = None
    dim_below_hu: float = 0.0

    def __post_init__(self) -> None:
        if self.companions and self.learnt is None:
            raise ValueError("further estimates (companions) need a first learnt estimate beside them")
        if self.dim_learnt is not None and self.learnt is None:
            raise ValueError("an estimate for dim lumens needs a first learnt estimate for the others")
        if not 0.0 <= self.dim_below_hu <= 1500.0:
            raise ValueError(f"dim_below_hu must lie in 0..1500 HU (0 = off), not {self.dim_below_hu}")
        if self.dim_learnt is not None and self.combine in ("mean", "wider"):
            raise ValueError(f"an estimate for dim lumens replaces the first: it cannot join combine = "
                             f"{self.combine!r}")
        if not 0.0 <= self.enclosed_above <= 1.0:
            raise ValueError(f"enclosed_above is a share of directions, 0..1, not {self.enclosed_above}")
        if self.combine not in get_args(EstimateCombine):
            raise ValueError(f"combine must be one of {', '.join(get_args(EstimateCombine))}, not {self.combine!r}")
        if self.tv_weight < 0 or self.iterations < 1:
            raise ValueError("tv_weight must be >= 0 and iterations >= 1")
        if self.pad_mm <= 0 or self.near_calcium_voxels < 0:
            raise ValueError("pad_mm must be positive and near_calcium_voxels >= 0")
        if self.grow_above_lumen_hu < 0:
            raise ValueError(f"grow_above_lumen_hu must be >= 0 (0 = no growth), not {self.grow_above_lumen_hu}")
        if self.refit_iterations < 0:
            raise ValueError(f"refit_iterations must be >= 0 (0 = no refit), not {self.refit_iterations}")
        if self.keep_lumen not in get_args(KeepLumen):
            raise ValueError(f"keep_lumen must be one of {', '.join(get_args(KeepLumen))}, not {self.keep_lumen!r}")
        if self.keep_lumen_beyond_mm < 0:
            raise ValueError(f"keep_lumen_beyond_mm must be >= 0 mm, not {self.keep_lumen_beyond_mm}")
        if not 0.0 <= self.anatomy_above_level_hu <= 1000.0:
            raise ValueError(f"anatomy_above_level_hu must lie in 0..1000 HU (0 = off), "
                             f"not {self.anatomy_above_level_hu}")
        if self.reach_hu < 0:
            raise ValueError(f"reach_hu must be >= 0 (0 = footprint only), not {self.reach_hu}")
        if self.unsure_hu < 0:
            raise ValueError(f"unsure_hu must be positive (0 = no blur disagreement), not {self.unsure_hu}")
        for table in (self.kernels, self.white_by_kernel, self.enhance_by_kernel):
            keys = [kernel_key(name) for name, _ in table]
            for (name, _), key in zip(table, keys):
                # two spellings of one kernel (B26f, b26f) would leave which value applies to the table's order
                if not key or keys.count(key) > 1:
                    raise ValueError(f"kernel names must be given and differ, not {name!r}")
        for name, white in self.white_by_kernel:
            if white <= 0:
                raise ValueError(f"a kernel's white level must be a positive HU, not {name!r} = {white}")
        for _, mtf50 in self.kernels:
            replace(self.blur, mtf50_lp_cm=mtf50)  # checks the MTF50 as any blur's
        for _, enhance in self.enhance_by_kernel:
            replace(self.blur, edge_enhance=enhance)  # checks the lift as any blur's

    @property
    def sharpening_ceiling_hu(self) -> float:
        """The split sharpening's ceiling this subtraction runs with (0: the plain sharpening): a learnt estimate's
        own (it is fed what it was trained on), else ``anatomy_above_level_hu`` (the rule's)."""
        return self.anatomy_above_level_hu if self.learnt is None else self.learnt.anatomy_above_level_hu

    def estimate_text(self) -> str:
        """What estimated the calcium, in a sentence for the derived series' DerivationDescription: a reader of the
        series (and an audit) can tell the rule from a learnt estimate, and which estimate wrote which regions."""
        if self.learnt is None:
            return "Calcium estimated by the white-level rule."
        first, others = self.learnt.name or "a learnt estimate", [c.name or "another" for c in self.companions]
        dim = "" if not self.uses_dim() else \
            f" Beside lumens under {self.dim_below_hu:g} HU, by {self.dim_learnt.name or 'another'} in its place."
        if not others or self.combine == "first":
            return f"Calcium estimated by the learnt estimate {first}.{dim}"
        if self.combine == "enclosed":
            return (f"Calcium estimated by the learnt estimate {first}, and by {others[0]} where the detected calcium "
                    f"encloses the lumen (enclosure above {self.enclosed_above:g}).{dim}")
        listed = ", ".join([first, *others])
        if self.combine == "mean":
            return f"Calcium removed as the mean of the restorations under the learnt estimates {listed}."
        return (f"Calcium removed, region by region, as the restoration under whichever of the learnt estimates "
                f"{listed} leaves the most lumen.")

    def uses_dim(self) -> bool:
        """Whether regions beside a dim lumen get their own estimate (``dim_learnt`` below ``dim_below_hu``)."""
        return self.dim_learnt is not None and self.dim_below_hu > 0

    def estimates(self, dim: bool = False) -> list[SubtractOptions]:
        """These options once per learnt estimate (the first, then each companion, then, for a region beside a dim
        lumen, ``dim_learnt``), each subtracting on its own."""
        plain = dict(companions=(), dim_learnt=None, dim_below_hu=0.0)
        extra = [replace(self, learnt=self.dim_learnt, **plain)] if dim and self.uses_dim() else []
        return [self] + [replace(self, learnt=c, **plain) for c in self.companions] + extra

    def lists(self, kernel: str) -> bool:
        """Whether any of the kernel tables names the series' ConvolutionKernel (an unlisted one gets the defaults)."""
        return any(_listed(t, kernel) is not None for t in (self.kernels, self.white_by_kernel, self.enhance_by_kernel))

    def listed_mtf50(self, kernel: str) -> float | None:
        """The MTF50 the kernel table gives a series' ConvolutionKernel, or None where it lists none."""
        return _listed(self.kernels, kernel)

    def for_kernel(self, kernel: str) -> SubtractOptions:
        """These options with the blur (MTF50, edge lift) and the white level assumed for ``kernel`` (a series'
        ConvolutionKernel), each where its table lists the kernel.

        A header may hold several values (``FC43\\AIDR 3D``): the whole value matches, or its first part.
        The confidence pass's blur moves with it, in proportion (so it stays the softer of the two).
        """
        out = self
        white = _listed(self.white_by_kernel, kernel)
        if white is not None:
            out = replace(out, white_above_lumen_hu=white)
        mtf50 = _listed(self.kernels, kernel)
        if mtf50 is not None:
            scale = mtf50 / self.blur.mtf50_lp_cm
            second = replace(self.second_blur, mtf50_lp_cm=max(1.0, self.second_blur.mtf50_lp_cm * scale))
            out = replace(out, blur=replace(self.blur, mtf50_lp_cm=mtf50), second_blur=second)
        enhance = _listed(self.enhance_by_kernel, kernel)
        if enhance is not None:  # both blurs: the confidence pass differs from the first in softness only
            out = replace(out, blur=replace(out.blur, edge_enhance=enhance),
                          second_blur=replace(out.second_blur, edge_enhance=enhance))
        return out


def _listed(table: tuple[tuple[str, float], ...], kernel: str) -> float | None:
    """The value a kernel table gives a series' ConvolutionKernel (the whole value, or its first part), or None."""
    names = (kernel_key(kernel), kernel_key(kernel.split("\\")[0]))
    return next((value for name, value in table if kernel_key(name) in names), None)


def kernel_key(name: str) -> str:
    """How kernel names are compared: without case or surrounding spaces (``B26f`` is ``b26f``)."""
    return name.strip().casefold()

def _tv_gradient(u: np.ndarray) -> np.ndarray:
    """Gradient of the smoothed total variation (negative divergence of the normalised gradient).

    Forward differences (0 at each axis' last voxel), normalised by the smoothed gradient's length, then their
    backward differences (the first voxel keeps its own: the wrapped neighbour is a last voxel, 0). Written on
    preallocated arrays rather than ``np.diff``/``np.roll`` copies: the sharpening calls it 60 times a box, and
    the detection's sharpened-image test sharpens every tile of a CTA's bright voxels. The same arithmetic in
    the same order, bit for bit (tests/pipeline/test_subtract.py keeps the plain form to compare).
    """
    g = []
    for a in range(3):
        d = np.zeros_like(u)
        head, tail = _axis_slices(a)
        np.subtract(u[tail], u[head], out=d[head])
        g.append(d)
    norm = g[0] * g[0]
    norm += g[1] * g[1]
    norm += g[2] * g[2]
    norm += TV_EPSILON_HU ** 2
    np.sqrt(norm, out=norm)
    out = None
    for a, d in enumerate(g):
        d /= norm
        head, tail = _axis_slices(a)
        d[tail] -= d[head].copy()
        out = d if out is None else np.add(out, d, out=out)
    return np.negative(out, out=out)


def _axis_slices(axis: int) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """All but the last voxel along ``axis``, and all but the first (for differences along it)."""
    head, tail = [slice(None)] * 3, [slice(None)] * 3
    head[axis], tail[axis] = slice(None, -1), slice(1, None)
    return tuple(head), tuple(tail)


def through(volume: np.ndarray, h: np.ndarray) -> np.ndarray:
    """``volume`` through the transfer function ``h`` (on its real-FFT grid, ``ScannerBlur.transfer``)."""
    return np.fft.irfftn(np.fft.rfftn(volume) * h, s=volume.shape, axes=(0, 1, 2))


def _misfit_gradient(image: np.ndarray, h: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """The least-squares term's gradient, hᵀ(h∗z − image), as one FFT pair per call: the image's part is
    transformed once, and h is real, so h∗h∗z is z's spectrum times h² (half the FFTs of blurring twice; the
    same values to about 1e-11 HU)."""
    squared = h * h
    seen = np.fft.rfftn(image) * h

    def gradient(z: np.ndarray) -> np.ndarray:
        spectrum = np.fft.rfftn(z)
        spectrum *= squared
        spectrum -= seen
        return np.fft.irfftn(spectrum, s=z.shape, axes=(0, 1, 2))

    return gradient


def sharpen(image: np.ndarray, h: np.ndarray, tv_weight: float, iterations: int) -> np.ndarray:
    """Total-variation deconvolution: argmin ½‖h∗u − image‖² + w·TV(u), by accelerated gradient (FISTA)."""
    step = 1.0 / (float(np.max(h)) ** 2 + 12.0 * tv_weight / TV_EPSILON_HU)
    misfit = _misfit_gradient(image, h)

    def descend(z: np.ndarray) -> np.ndarray:
        change = misfit(z)
        change += tv_weight * _tv_gradient(z)
        change *= step
        return z - change

    return _accelerated(image, descend, iterations)


# Where the split sharpening measures the contrast level its anatomy is bounded by: past the calcium's bloom,
# as the learnt estimate's levels are (``reference_levels``; the level right beside dense calcium stands high),
# from anywhere in the box (a long lesion's middle lies further than REFERENCE_REACH_MM from its reference:
# one contrast bolus fills a patient's coronaries, so a ceiling may be taken from further along).
ANATOMY_LEVEL_AWAY_MM = 2.0
ANATOMY_FLOOR_HU = -150.0  # below epicardial fat less its noise: no anatomy beside a coronary is darker
SPLIT_ITERATIONS_FACTOR = 2  # the split solves for two images: it is given twice the plain sharpening's steps


def sharpened(y: np.ndarray, h: np.ndarray, calcium: np.ndarray, spacing: tuple[float, float, float],
              options: SubtractOptions, fallback_level: float, level_image: np.ndarray | None = None) -> np.ndarray:
    """The box sharpened as ``options`` say: the plain total-variation deconvolution (``sharpen``), or, with
    ``anatomy_above_level_hu`` above 0, the anatomy-and-calcium split (``split_sharpen``); the node's estimate
    and the lab's training both sharpen here. A learnt estimate is fed what it was trained on: its own file's
    ceiling decides (``LearntExcess.anatomy_above_level_hu``), not the options'."""
    ceiling_hu = options.sharpening_ceiling_hu
    if ceiling_hu <= 0 or not calcium.any():
        return sharpen(y, h, options.tv_weight, options.iterations)
    every = np.argwhere(np.ones(y.shape, bool))
    level = reference_levels(y if level_image is None else level_image, calcium, spacing, every,
                             ANATOMY_LEVEL_AWAY_MM, fallback_level, reach_mm=np.inf).reshape(y.shape)
    support = within_reach(calcium, options.near_calcium_voxels)
    return split_sharpen(y, h, support, level + ceiling_hu, options.tv_weight,
                         SPLIT_ITERATIONS_FACTOR * options.iterations)


def split_sharpen(image: np.ndarray, h: np.ndarray, support: np.ndarray, ceiling: np.ndarray, tv_weight: float,
                  iterations: int) -> np.ndarray:
    """Deconvolution into anatomy and calcium: argmin ½‖h∗(a + c) − image‖² + w·TV(a) over anatomy ``a``
    between ``ANATOMY_FLOOR_HU`` and ``ceiling`` (per voxel) and calcium ``c`` ≥ 0 on ``support``; returns a + c.

    Why: the plain sharpening has one image to explain the blurred box, and where a small lumen lies inside
    calcium the blur leaves it too little signal to be placed: the fit is as good with the lumen drawn dark and
    its neighbours calcium-bright. Anatomy no brighter than contrast and no darker than fat, and calcium only
    where the detector found it, leave far fewer such answers. By accelerated projected gradient (FISTA).
    """
    step = 1.0 / (2.0 * float(np.max(h)) ** 2 + 12.0 * tv_weight / TV_EPSILON_HU)
    anatomy = np.clip(image, ANATOMY_FLOOR_HU, ceiling)
    start = np.stack([anatomy, np.where(support, np.maximum(image - anatomy, 0.0), 0.0)])

    gradient = _misfit_gradient(image, h)

    def descend(z: np.ndarray) -> np.ndarray:  # z = [anatomy, calcium]: a gradient step, then onto the bounds
        misfit = gradient(z[0] + z[1])
        return np.stack([np.clip(z[0] - step * (misfit + tv_weight * _tv_gradient(z[0])), ANATOMY_FLOOR_HU, ceiling),
                         np.where(support, np.maximum(z[1] - step * misfit, 0.0), 0.0)])

    split = _accelerated(start, descend, iterations)
    return split[0] + split[1]


def _accelerated(start: np.ndarray, step: Callable[[np.ndarray], np.ndarray], iterations: int) -> np.ndarray:
    """FISTA's momentum around a (projected) gradient ``step``: ``iterations`` steps from ``start``.

    The sharpening and the calcium's refit are both least-squares fits through the scanner's blur; they
    differ only in the step, and share the acceleration that makes 30-60 steps enough.
    """
    x = start.copy()
    z = x.copy()
    t = 1.0
    for _ in range(iterations):
        nxt = step(z)
        t_next = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
        z = nxt + (t - 1.0) / t_next * (nxt - x)
        x, t = nxt, t_next
    return x


def calcium_removed(image: np.ndarray, calcium: np.ndarray, spacing: tuple[float, float, float],
                    options: SubtractOptions, fallback_level: float, level_image: np.ndarray | None = None
                    ) -> np.ndarray:
    """A box of HU without its calcium: ``image`` minus the blurred excess of the sharp calcium.

    ``calcium`` (bool, same box) says where the detector found calcium; the sharp image
    decides its extent. Values far from any calcium come back unchanged up to float error.
    """
    return (image.astype(np.float64) - calcium_blur(image, calcium, spacing, options, fallback_level, level_image)) \
        .astype(np.float32)


def calcium_blur(image: np.ndarray, calcium: np.ndarray, spacing: tuple[float, float, float],
                 options: SubtractOptions, fallback_level: float, level_image: np.ndarray | None = None
                 ) -> np.ndarray:
    """What the calcium adds to a box of HU as the scanner shows it: its sharp excess, blurred (float64).
    Its reach also says where the subtraction must be written (``SubtractOptions.reach_hu``).
    ``level_image``: the box the contrast level is measured on, when not ``image`` (see ``detect.detect``)."""
    y = image.astype(np.float64)
    h = options.blur.transfer(y.shape, spacing)
    u = sharpened(y, h, calcium, spacing, options, fallback_level, level_image)
    if options.learnt is not None:
        return through(learnt_excess(y, u, calcium, spacing, options, fallback_level, level_image), h)
    near = ndimage.binary_dilation(calcium, iterations=options.near_calcium_voxels) if options.near_calcium_voxels \
        else calcium
    idx = np.argwhere(near)
    level = levels_at(image if level_image is None else level_image, spacing, idx, fallback_level)
    values = u[tuple(idx.T)]
    white = np.zeros(y.shape, bool)
    white[tuple(idx[values > level + options.white_above_lumen_hu].T)] = True
    if options.grow_above_lumen_hu > 0 and white.any():
        # hysteresis: the white calcium extends over its connected flank that still stands above the lumen
        flank = np.zeros(y.shape, bool)
        flank[tuple(idx[values > level + options.grow_above_lumen_hu].T)] = True
        white = ndimage.binary_propagation(white, structure=np.ones((3, 3, 3), bool), mask=flank | white)
    sharp = np.nonzero(white)
    excess = np.zeros(y.shape)
    excess[sharp] = np.clip(u[sharp] - options.plaque_hu, 0.0, None)
    if options.refit_iterations and excess.any():
        excess = refit_excess(y, u - excess, excess, h, options.refit_iterations)
    return through(excess, h)


def levels_at(image: np.ndarray, spacing: tuple[float, float, float], idx: np.ndarray, fallback: float
              ) -> np.ndarray:
    """The contrast level at the voxels ``idx`` of ``image`` (``lumen_level_at``), ``fallback`` where none is near."""
    level = lumen_level_at(image.astype(np.float32), spacing, idx)
    return np.where(np.isfinite(level), level, fallback)


# How far a reference level may be taken from (``reference_levels``): past the calcium's bloom along its
# vessel, not from the next vessel over.
REFERENCE_REACH_MM = 6.0


def reference_levels(image: np.ndarray, calcium: np.ndarray, spacing: tuple[float, float, float], idx: np.ndarray,
                     away_mm: float, fallback: float, reach_mm: float = REFERENCE_REACH_MM) -> np.ndarray:
    """The contrast level at the voxels ``idx`` of a box, measured only on what lies further than ``away_mm``
    from the detected ``calcium``: at each voxel, the level of the nearest such contrast within
    ``reach_mm`` (``REFERENCE_REACH_MM``); where there is none, the level as ``levels_at`` measures it.

    Why: the level around each voxel (``contrast.lumen_level_at``, 1 mm) is measured on whatever looks like
    contrast there, and dense calcium blooms into its own lumen: a 260 HU lumen inside a full ring of
    calcium was measured at 600-640 HU, so everything the estimate compares with the level (is this voxel
    white? lumen?) was off by 400 HU, and the ring's residue was left at lumen brightness (held-out
    5050-43: true 58 %, read 11 %). At the calcified lesions of 20 tuning studies the local level stood
    133 HU above the true lumen on average, this one (2 mm away) 3 HU below it. A reader measures the
    lumen in a calcium-free reference segment; this is that segment as far as a box without a centreline
    can give it: the vessel's contrast beyond the calcium's bloom. ``away_mm`` <= 0: ``levels_at``.
    """
    base = levels_at(image, spacing, idx, fallback)
    if away_mm <= 0 or not calcium.any() or not len(idx):
        return base
    near = ndimage.distance_transform_edt(~calcium, sampling=spacing) <= away_mm
    beyond = np.where(near, np.float32(-1000.0), image.astype(np.float32))  # air: in no contrast band
    level = brightest_level_nearby(local_lumen_level(beyond, spacing), spacing)
    known = np.isfinite(level)
    if not known.any():
        return base
    distance, nearest = ndimage.distance_transform_edt(~known, sampling=[BLOCK * s for s in spacing],
                                                       return_indices=True)
    cells = tuple((idx // BLOCK).T)
    at = level[tuple(n[cells] for n in nearest)]
    return np.where(distance[cells] <= reach_mm, at, base)


def learnt_inputs(y: np.ndarray, u: np.ndarray, calcium: np.ndarray, spacing: tuple[float, float, float],
                  options: SubtractOptions, reach_voxels: int, fallback_level: float,
                  level_image: np.ndarray | None = None, level_away_mm: float = 0.0, context_voxels: int = 0,
                  vessel_feature: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """What the learnt estimate sees in a box: its domain (the detected calcium dilated by ``reach_voxels``
    + ``context_voxels``; bool) and the ``FEATURES`` of the domain's voxels, relative to the contrast level
    measured as ``level_away_mm`` says (``reference_levels``). The node's estimate and the lab's training
    both take their inputs from here, so the two cannot drift apart. ``vessel_feature``: the box's vessel calibre
    (``VESSEL_FEATURE``) as a last column."""
    domain = within_reach(calcium, reach_voxels + context_voxels)
    if not domain.any():
        return domain, np.zeros((0, len(FEATURES) + vessel_feature))
    level = reference_levels(y if level_image is None else level_image, calcium, spacing, np.argwhere(domain),
                             level_away_mm, fallback_level)
    features = excess_features(y, u, calcium, domain, level, spacing, options)
    if vessel_feature:
        calibre = vessel_calibre_mm(y.astype(np.float32), spacing, tuple(slice(0, n) for n in y.shape), calcium)
        column = np.full((len(features), 1), np.nan if calibre is None else calibre)
        features = np.concatenate([features, column], axis=1)
    return domain, features


def within_reach(calcium: np.ndarray, reach_voxels: int) -> np.ndarray:
    """Where the learnt estimate may put calcium: the detected calcium dilated by ``reach_voxels``."""
    return ndimage.binary_dilation(calcium, iterations=reach_voxels) if calcium.any() and reach_voxels \
        else calcium.copy()


def learnt_excess(y: np.ndarray, u: np.ndarray, calcium: np.ndarray, spacing: tuple[float, float, float],
                  options: SubtractOptions, fallback_level: float, level_image: np.ndarray | None = None
                  ) -> np.ndarray:
    """The calcium's excess by ``options.learnt`` on the voxels within its reach of the detected calcium
    (a convolving estimate reads its features further out, and writes only within reach)."""
    model = options.learnt
    assert model is not None
    domain, features = learnt_inputs(y, u, calcium, spacing, options, model.reach_voxels, fallback_level, level_image,
                                     model.level_away_mm, model.context_voxels, model.vessel_feature)
    excess = np.zeros(y.shape)
    if len(features):
        at = np.nonzero(domain)
        values = model(features, np.stack(at, axis=1))
        if model.context_voxels:
            values = np.where(within_reach(calcium, model.reach_voxels)[at], values, 0.0)
        excess[at] = values
    return excess


def refit_excess(image: np.ndarray, anatomy: np.ndarray, excess: np.ndarray, h: np.ndarray,
                 iterations: int) -> np.ndarray:
    """The calcium's excess refitted to the acquired ``image``: argmin ½‖h∗(anatomy + e) − image‖² over
    e ≥ 0 that is zero wherever ``excess`` is, from ``excess``, by accelerated projected gradient.

    Why: the sharpening's total variation pulls a small bright object's peak down (its cost grows with
    the object's contrast), so its excess, blurred back, leaves part of the bloom in the image. Holding
    the anatomy and the calcium's footprint, only the calcium's amplitude is solved for; it cannot spread.
    """
    support = excess > 0
    step = 1.0 / float(np.max(h)) ** 2
    misfit = _misfit_gradient(image - through(anatomy, h), h)

    def descend(z: np.ndarray) -> np.ndarray:  # a gradient step, then back onto e >= 0 on the support
        return np.where(support, np.maximum(z - step * misfit(z), 0.0), 0.0)

    return _accelerated(excess, descend, iterations)

