"""Run the planned windows through a backend and put the result back in the volume.

Windows go step by step: step k of every region runs in one batch, and its output
is written into the region before step k+1 reads its context (multi-step
inpainting). Only footprint voxels of the native volume change; everything else
keeps its value, and the caller keeps its stored pixel values untouched there.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal, get_args

import numpy as np
from scipy import ndimage

from dicom_node.backends import Backend
from dicom_node.pipeline.contrast import lumen_level_at
from dicom_node.pipeline.detect import Detection, DetectOptions, detect
from dicom_node.pipeline.morphology import grow_box
from dicom_node.pipeline.subtract import EstimateCombine, SubtractOptions, calcium_blur, calcium_removed
from dicom_node.pipeline.vessel import VesselAt, lumen_range, vessel_at
from dicom_node.pipeline.windows import Region, WindowOptions, plan

log = logging.getLogger(__name__)


# An unsure region: restored and marked; left as acquired; or restored and marked with the lumen the acquired
# image shows held (``keep_visible_lumen``): its white bloom is taken out, its visible lumen never darkened past
# the edge. On the subtraction that also holds faint calcium and the calcium's flank, which the blur lifts into
# the lumen's range (SubtractOptions.keep_lumen holds only the lumen beyond the calcium).
UnsureAction = Literal["mark", "leave", "guard"]
Method = Literal["network", "subtract", "auto"]  # how a region is restored: inpainted by the network, or by physics
# auto: per series, the subtraction where the site's kernel table ([engine.scanner_kernels]) lists the series'
# kernel, the network elsewhere. The subtraction's estimate hangs on the kernel's blur: told a measured one it
# reads level with the network or better (world held out 6.6 vs 10.6; XCIST's inserts 11.1 vs 11.7), given the
# default blur for a kernel nobody measured it reads worse than the network on XCIST (14.8: reports/xcist-restore/).
SeriesMethod = Literal["network", "subtract"]  # what auto chose for one series


def auto_choice(subtract: SubtractOptions, kernel: str) -> SeriesMethod:
    """What ``auto`` restores a series of ``kernel`` with: the subtraction where ``subtract``'s MTF50 table lists
    the kernel (a blur the site measured, not assumed), the network elsewhere. The one rule the engine and the
    derived series' name (``process.engine_id``) share."""
    return "subtract" if subtract.listed_mtf50(kernel) is not None else "network"


@dataclass(frozen=True)
class MethodText:
    """How the outputs name a method (derived series, SEG, contributing equipment): one place per method."""

    words: str  # "Calcium removed by <words>"
    short: str  # "... region restored by <short>" (the SEG's 64-character content description)
    restored_by: str  # what the derived series' description says replaced the calcium
    algorithm: str  # the SEG's algorithm name
    family: str  # the SEG's algorithm family: a name in DICOM CID 7162


METHOD_TEXT: dict[str, MethodText] = {
    "network": MethodText("3D inpainting", "inpainting", "model-restored tissue and lumen. Synthetic-data model",
                          "dicom-node Dense-Unet calcium removal", "ArtificialIntelligence"),
    "subtract": MethodText("subtracting its estimated blur (a physics model, no network)", "blur subtraction",
                           "the image less the calcium's estimated blur. Validated on simulated scans only",
                           "dicom-node blur-subtraction calcium removal", "AdaptiveFiltering"),
}


# How the outputs name each confidence measure (SEG segment description, report, logs): the network's
# compares a window's restoration with its mirrored one, the subtraction's compares the region's
# subtraction under the assumed blur with one under a softer blur (SubtractOptions.second_blur).
# With several learnt estimates (SubtractOptions.companions) it compares the restorations under each instead.
CONFIDENCE_MEASURES: dict[str, str] = {"flip": "flip disagreement", "blur": "blur disagreement",
                                       "estimates": "estimate disagreement"}
# The reason a region holding calcium only the sharpened image found is unsure (``Engine._judge``), as the SEG,
# the lesion table and ``dicom-node doctor`` say it; one string, so that what reads it (the lab's splice) cannot drift.
SHARPENED_ONLY_REASON = "calcium found only in the sharpened image"
UNMEASURED = object()  # Engine._judge: the region's vessel not measured yet (None: measured, no contrast there)


EDGE_MARGIN_HU = 20.0  # a kept lumen voxel stays this far above the edge, so no reader's rounding drops it


@dataclass(frozen=True)
class ConfidenceOptions:
    """How sure the engine must be of a region's restoration, and what it does when it is not.

    A restoration can be wrong where the network has little to go on (a small vessel, a
    lesion unlike its training), and a wrong one can draw a stenosis that is not there.
    With ``flips`` each window is also restored mirrored along all three axes; the mean
    absolute difference between the two restorations over a region's restored voxels is
    its disagreement (HU). Above ``unsure_hu`` the region is unsure: ``mark`` restores it
    and says so (SEG segment, job lesion table), ``leave`` keeps it as acquired, ``guard``
    restores and marks it but holds the lumen the acquired image shows (``keep_visible_lumen``
    from the edge, whatever ``keep_visible_lumen`` says for sure regions): a doubted restoration
    may still take white bloom out of the lumen but not darken what the image shows as lumen
    (on the subtraction it also holds faint calcium there: reports/tuning/learnt-estimate.md §4).
    Flips cost a second pass through the network; with ``average_flips`` that pass is also
    half of what is written (test-time augmentation), so its cost buys accuracy too.

    ``keep_visible_lumen`` holds voxels the acquired image shows as lumen (see
    ``keep_visible_lumen``); ``lumen_guard_from`` says where that range starts, as a fraction
    of the way from the lumen's edge (0) up to its contrast level (1). From the edge (the
    default) the guard also holds the band that thin calcium's blur lifts into the lumen's
    range, which an image without calcium shows as plaque, so processed images under-call by
    about 5 points; from higher up the network may darken that band, and in small vessels
    real residual lumen with it (twice the invented severe stenoses on the tuning studies).
    """

    flips: bool = True
    unsure_hu: float = 30.0
    unsure_action: UnsureAction = "mark"
    keep_visible_lumen: bool = True  # see KeepLumen
    average_flips: bool = True  # with flips, write the mean of the two passes instead of the first
    lumen_guard_from: float = 0.0  # the guard holds voxels from this far (0 edge .. 1 level) up to the lumen level
    # A region in a vessel narrower than this (mm, the engine's own estimate: vessel_calibre_mm) is unsure
    # whatever its disagreement says; 0 = off. In a small vessel a reading beside calcium hangs on a voxel
    # or two of lumen. On 120 tuning studies (the network, its flips at 30 HU) 2.5 mm caught 27 of 46
    # restorations read more than 10 points wrong, against 9 by the flips alone, and flagged 37 of 127 good
    # ones (7 alone): reports/tuning/vessel-calibre.md. 2.75 mm since the fourteenth session: the smallest
    # threshold at which the subtraction's restorations called sure met every goal of issue 16 on the tuning
    # studies (2.5 left a severe stenosis made among them): reports/tuning/confidence-coverage.md.
    unsure_vessel_mm: float = 2.75
    # A region whose vessel's lumen (the engine's own measure: vessel_at's lumen_hu, the median on the lumen's core)
    # is dimmer than this (HU) is unsure; 0 = off, the default. Beside a dim lumen the reader's edge (half-way from
    # the wall to the lumen) has half the margin it has beside a bright one, so the noise and any residue of the
    # calcium cross it more often: held out, calcified lesions in lumens under 330 HU read 9.7 points off against
    # 4.6-6.0 (reports/tuning/dim-lumens.md). Off: on the tuning studies the sure restorations there read little
    # worse, and no threshold lowered the sure ones' error by 0.2 points for 15 points of their share (section 6).
    unsure_lumen_hu: float = 0.0
    # A region whose detected calcium encloses the lumen over this share (``calcium_enclosure``, 0-1: rings and large
    # arcs) is unsure; 0 = off, the default. The subtraction only (the network's regions are not measured). Why:
    # rings and arcs over 180° are where blooming over-calls most and where the restorations called sure still read
    # furthest off (held out, four sets pooled: 5.3 points against 2.7-3.2 for smaller arcs, and the one severe
    # stenosis hidden among the sure), so the SEG marks them to be read beside the original, as the README's
    # reading guide says; 0.7 is the line the engine already writes the second estimate above
    # (reports/tuning/enclosure-flag.md).
    unsure_enclosure: float = 0.0


    def __post_init__(self) -> None:
        if self.unsure_hu <= 0:
            raise ValueError(f"unsure_hu must be positive, not {self.unsure_hu}")
        if self.unsure_action not in get_args(UnsureAction):
            raise ValueError(f"unsure_action must be 'mark', 'leave' or 'guard', not {self.unsure_action!r}")
        if self.lumen_guard_from < 0:
            raise ValueError(f"lumen_guard_from must be 0 (the edge) or more, not {self.lumen_guard_from}")
        if not 0.0 <= self.unsure_vessel_mm <= 10.0:
            raise ValueError(f"unsure_vessel_mm must lie in 0..10 mm (0 = off), not {self.unsure_vessel_mm}")
        if not 0.0 <= self.unsure_lumen_hu <= 1500.0:
            raise ValueError(f"unsure_lumen_hu must lie in 0..1500 HU (0 = off), not {self.unsure_lumen_hu}")
        if not 0.0 <= self.unsure_enclosure < 1.0:
            raise ValueError(f"unsure_enclosure must lie in [0, 1) (a share; 0 = off), not {self.unsure_enclosure}")


def keep_visible_lumen(volume: np.ndarray, spacing: tuple[float, float, float], idx: np.ndarray,
                       values: np.ndarray, box: tuple[slice, slice, slice],
                       guard_from: float = 0.0) -> tuple[np.ndarray, int]:
    """Never darken past the lumen's edge a voxel that the acquired image shows as lumen.

    On small vessels the network sometimes turns a narrow residual lumen beside calcium
    into plaque, and a moderate stenosis reads as an occlusion (Experiment 2 v2, before this
    guard: 7 of 379 lesions under 50 % read ≥ 70 % only after processing). A voxel whose
    acquired value is in the lumen's range (from half-way down to the wall up to
    ``WHITE_ABOVE_LUMEN_HU`` above the local contrast level) is lumen to a reader; the
    restoration may lower it (blooming raises lumen too) but not below the edge. Calcium and
    its white blooming can still be restored to plaque. The local level is measured as the
    detector measures it (``contrast.local_lumen_level``); where there is none, no guard.
    Returns the guarded values and how many voxels it held up.
    """
    lum = lumen_level_at(volume[box], spacing, idx - np.array([s.start for s in box]))
    orig = volume[tuple(idx.T)]
    edge, white = lumen_range(lum)
    seen = np.isfinite(lum) & (orig >= edge + guard_from * (lum - edge)) & (orig <= white)
    floor = np.minimum(orig, edge + EDGE_MARGIN_HU)
    held = seen & (values < floor)
    return np.where(held, floor, values).astype(values.dtype), int(held.sum())


def lumen_disagreement(first: np.ndarray, second: np.ndarray, level: np.ndarray) -> float:
    """Mean absolute difference (HU) of two restorations of a region, over the voxels either shows as lumen.

    What a reader measures is where the lumen ends, so the voxels that matter are those in
    the lumen's range (from its edge, half-way down to the wall, up to the white level) in
    either restoration; calcium cores, which both take out, would only add noise. ``level``
    is the local contrast level at each voxel (NaN where unknown: not counted). 0 when no
    voxel is lumen in either.
    """
    ok = np.isfinite(level)
    edge, white = lumen_range(level)
    seen = ok & (((first >= edge) & (first <= white)) | ((second >= edge) & (second <= white)))
    return float(np.mean(np.abs(first - second)[seen])) if seen.any() else 0.0


def lumen_voxels(values: np.ndarray, level: np.ndarray) -> int:
    """How many voxels of a restoration a reader takes for lumen (``lumen_range`` at the local contrast level)."""
    edge, white = lumen_range(level)
    return int(np.count_nonzero(np.isfinite(level) & (values >= edge) & (values <= white)))


# How a region's enclosure is measured (``calcium_enclosure``): from each voxel this close to the detected calcium
# (and not calcium), rays along the 26 grid directions, each looking this far; in the region's box grown by
# ENCLOSURE_PAD_MM (what lies beside the region's calcium, not the next vessel's).
ENCLOSURE_NEAR_MM = 1.5
ENCLOSURE_RAY_MM = 3.0
ENCLOSURE_PAD_MM = 2.0
_DIRECTIONS = tuple(d for d in itertools.product((-1, 0, 1), repeat=3) if any(d))


def calcium_enclosure(calcium: np.ndarray, spacing: tuple[float, float, float], box: tuple[slice, slice, slice]
                      ) -> float:
    """How far a region's detected calcium encloses its lumen (0-1): in the region's ``box`` grown by
    ``ENCLOSURE_PAD_MM``, the largest share, over the voxels within ``ENCLOSURE_NEAR_MM`` of the calcium, of
    the 26 directions along which a ray meets calcium within ``ENCLOSURE_RAY_MM``.

    Why: the node does not know a deposit's arc, and the two learnt estimates are right on different arcs (the
    split sharpening on rings, the plain one on small arcs). A point inside a ring sees calcium all round but
    along the vessel; beside an arc, on one side. On 120 tuning studies it ranks a lesion whose true arc exceeds
    180° above a smaller one with probability 0.85 (reports/tuning/estimate-ensemble.md)."""
    pad = np.ceil(ENCLOSURE_PAD_MM / np.asarray(spacing, float)).astype(int)
    mask = calcium[grow_box(box, calcium.shape, pad)]
    if not mask.any():
        return 0.0
    near = (ndimage.distance_transform_edt(~mask, sampling=spacing) <= ENCLOSURE_NEAR_MM) & ~mask
    if not near.any():
        return 0.0
    hits = np.zeros(mask.shape, np.int32)
    for d in _DIRECTIONS:
        step_mm = float(np.linalg.norm(np.asarray(d) * np.asarray(spacing, float)))
        seen = np.zeros(mask.shape, bool)
        for k in range(1, int(ENCLOSURE_RAY_MM / step_mm) + 1):
            seen |= _shifted(mask, [-k * c for c in d])
        hits += seen
    return float(hits[near].max() / len(_DIRECTIONS))


def _shifted(mask: np.ndarray, by: list[int]) -> np.ndarray:
    """``mask`` moved by ``by`` voxels (out[x] = mask[x - by]), False where it comes from outside."""
    out = np.zeros_like(mask)
    src = tuple(slice(max(0, -b), n - max(0, b)) for n, b in zip(mask.shape, by))
    dst = tuple(slice(max(0, b), n - max(0, -b)) for n, b in zip(mask.shape, by))
    out[dst] = mask[src]
    return out


def chosen(tries: list[np.ndarray], level: np.ndarray | None, how: EstimateCombine,
           enclosed: bool = False, dim: bool = False) -> int | None:
    """Which of one region's restorations under several learnt estimates is written, as ``how`` says
    (``EstimateCombine``): the first's (0), the one a reader sees the most lumen in (ties: the earlier), or, under
    "enclosed", the first companion's (1) where the region's calcium encloses its lumen (``enclosed``); None for
    "mean", which writes them all averaged. ``dim``: the region lies beside a dim lumen and its tries end with the
    dim-lumen estimate's (``SubtractOptions.dim_learnt``), written in the first's place.

    Why "wider" exists: where two plausible estimates disagree, the one that takes less lumen away cannot invent
    a stenosis the other would not; the reader's lumen, not the HU, decides, since calcium left white also
    stops a reader's ray."""
    if dim and not (how == "enclosed" and enclosed):
        return len(tries) - 1
    if how == "first" or len(tries) == 1:
        return 0
    if how == "mean":
        return None
    if how == "enclosed":
        return 1 if enclosed else 0
    assert level is not None
    return int(np.argmax([lumen_voxels(t, level) for t in tries]))


def restoration_written(tries: list[np.ndarray], which: int | None) -> np.ndarray:
    """The restoration a region gets from its tries under several estimates: the one ``chosen`` picked, or, where it
    picked none ("mean"), their voxel-wise mean."""
    return np.mean(tries, axis=0).astype(np.float32) if which is None else tries[which]


@dataclass
class RegionReport:
    """One restored region, as the job's lesion table and the SEG describe it."""

    region: int
    lesions: list[int]  # detection's lesion numbers in this region
    voxels: int  # native voxels restored (0 when left as acquired)
    disagreement_hu: float | None  # None without flips
    unsure: bool
    action: str  # "restored", "restored, unsure", "restored, unsure, lumen kept" or "left as acquired (unsure)"
    lumen_kept: int = 0  # voxels the visible-lumen guard held at the lumen's edge
    measure: str = "flip"  # what the disagreement compares: a key of CONFIDENCE_MEASURES
    vessel_mm: float | None = None  # the vessel's calibre at the region (vessel_at; None: not measured)
    lumen_hu: float | None = None  # the level of that vessel's lumen (vessel_at; None: not measured)
    why: list[str] = field(default_factory=list)  # what made it unsure, in words
    # With several learnt estimates (the subtraction's companions), which one's restoration was written, so a reader
    # and an audit can tell regions restored differently apart: its file's name ("mean of a + b" under "mean"),
    # and its place (0 the first, k the k-th companion; None for the mean). "" / None: one estimate, the rule or
    # the network.
    estimate: str = ""
    estimate_index: int | None = None
    enclosure: float | None = None  # calcium_enclosure, where subtract_combine = "enclosed" measured it

    def as_dict(self) -> dict:
        return {"region": self.region, "lesions": self.lesions, "voxels": self.voxels,
                "disagreement_hu": None if self.disagreement_hu is None else round(self.disagreement_hu, 1),
                "measure": self.measure, "unsure": self.unsure, "action": self.action, "lumen_kept": self.lumen_kept,
                "vessel_mm": None if self.vessel_mm is None else round(self.vessel_mm, 1),
                "lumen_hu": None if self.lumen_hu is None else round(self.lumen_hu), "why": self.why,
                "estimate": self.estimate, "enclosure": None if self.enclosure is None else round(self.enclosure, 2)}


def _keep_lumen_beyond(volume: np.ndarray, spacing: tuple[float, float, float], calcium: np.ndarray,
                       box: tuple[slice, slice, slice], idx: np.ndarray, local: tuple[np.ndarray, ...],
                       values: np.ndarray, beyond_mm: float) -> tuple[np.ndarray, int]:
    """The subtraction's values with the visible lumen held (``keep_visible_lumen``) on the voxels further than
    ``beyond_mm`` from the detected calcium (``SubtractOptions.keep_lumen_beyond_mm``); how many it held."""
    far = ndimage.distance_transform_edt(~calcium[box], sampling=spacing)[local] > beyond_mm
    if not far.any():
        return values, 0
    values = values.copy()
    values[far], held = keep_visible_lumen(volume, spacing, idx[far], values[far], box)
    return values, held


def _holds_sharpened(detection: Detection, region: Region) -> bool:
    """Whether ``region`` holds calcium only the sharpened image found (``Lesion.sharpened``)."""
    return any(lesion.sharpened for lesion in detection.lesions if lesion.index in region.lesions)


def _estimate_name(opts: SubtractOptions, which: int | None) -> str:
    """The learnt estimate whose restoration a region got (``RegionReport.estimate``): "" with one estimate or none."""
    if not opts.companions and not opts.uses_dim():
        return ""
    names = [e.name for e in (opts.learnt, *opts.companions, opts.dim_learnt) if e is not None]  # need a first
    return "mean of " + " + ".join(names) if which is None else names[which]


def _restored_action(unsure: bool, guard: bool) -> str:
    """A restored region's action, as the lesion table and the SEG say it."""
    return "restored, unsure, lumen kept" if guard else "restored, unsure" if unsure else "restored"


@dataclass
class EngineResult:
    detection: Detection
    regions: list[Region]
    changed: np.ndarray  # bool, native voxels whose value was restored
    windows: int
    batches: int
    seconds: dict[str, float] = field(default_factory=dict)
    reports: list[RegionReport] = field(default_factory=list)  # one per region, in region order
    assumed_mtf50_lp_cm: float | None = None  # the subtraction's: the scanner blur it assumed for this series
    assumed_for_kernel: str = ""  # ... and the series' kernel when the kernel table chose it ("" for the default)
    assumed_edge_enhance: float | None = None  # the subtraction's: the assumed blur's edge lift (ScannerBlur)
    method: SeriesMethod = "network"  # what restored the series (under auto, what it chose for the kernel)


class Engine:
    """Detect → plan → infer for one HU volume."""

    def __init__(self, backend: Backend | None, detect_options: DetectOptions | None = None,
                 window_options: WindowOptions | None = None, confidence: ConfidenceOptions | None = None,
                 method: Method = "network", subtract: SubtractOptions | None = None):
        if method not in get_args(Method):
            raise ValueError(f"unknown method {method!r}: one of {', '.join(get_args(Method))}")
        if method in ("network", "auto") and backend is None:
            raise ValueError(f"the {method} method needs a backend (the network)")
        self.backend = backend
        self.detect_options = detect_options or DetectOptions()
        self.window_options = window_options or WindowOptions()
        self.confidence = confidence or ConfidenceOptions()
        self.method = method
        self.subtract = subtract or SubtractOptions()

    def _judge(self, volume: np.ndarray, spacing: tuple[float, float, float], region: Region, detection: Detection,
               disagreement: float | None, threshold_hu: float, measure: str,
               at: VesselAt | None | object = UNMEASURED, enclosure: float | None = None) -> tuple[dict, list[str]]:
        """The region's vessel as measured (``vessel_mm`` and ``lumen_hu`` for its report) and why the region is
        unsure ([] if it is not). ``at``: the vessel as the caller measured it already (``vessel.vessel_at``; None:
        no contrast there), or ``UNMEASURED`` (the default): measured here where the calibre or the lumen rule is on,
        else not at all (both None). ``enclosure``: the region's ``calcium_enclosure`` where the caller measured it
        (the subtraction), for ``ConfidenceOptions.unsure_enclosure``.

        Calcium found only in the sharpened image always makes its region unsure: held out, such faint deposits
        were where the subtraction took lumen away and made severe stenoses the flags above missed."""
        why = []
        if disagreement is not None and disagreement > threshold_hu:
            why.append(f"{CONFIDENCE_MEASURES[measure]} {disagreement:.0f} HU > {threshold_hu:g}")
        if _holds_sharpened(detection, region):
            why.append(SHARPENED_ONLY_REASON)
        ring = self.confidence.unsure_enclosure
        if ring > 0 and enclosure is not None and enclosure > ring:
            why.append(f"calcium encloses the lumen {enclosure:.2f} > {ring:g}")
        small, dim = self.confidence.unsure_vessel_mm, self.confidence.unsure_lumen_hu
        if at is UNMEASURED:
            at = vessel_at(volume, spacing, region.native_box, detection.calcium) if small > 0 or dim > 0 else None
        if not isinstance(at, VesselAt):
            return {"vessel_mm": None, "lumen_hu": None}, why
        if at.calibre_mm < small:
            why.append(f"vessel {at.calibre_mm:.1f} mm < {small:g}")
        if at.lumen_hu < dim:
            why.append(f"lumen {at.lumen_hu:.0f} HU < {dim:g}")
        return {"vessel_mm": at.calibre_mm, "lumen_hu": at.lumen_hu}, why

    def method_for(self, kernel: str) -> SeriesMethod:
        """How a series reconstructed with ``kernel`` (its ConvolutionKernel) is restored: ``auto`` subtracts where
        the site's MTF50 table lists the kernel (a blur measured, not assumed) and runs the network elsewhere."""
        return auto_choice(self.subtract, kernel) if self.method == "auto" else self.method

    def detect_options_for(self, kernel: str) -> DetectOptions:
        """The detection options for a series reconstructed with ``kernel`` (its ConvolutionKernel).

        The sharpened-image test (and the growth and trim in the sharpened image, ``grow_sharp_hu`` and
        ``trim_sharp_hu``) assumes the blur the site's kernel table gives the series, when the table lists it.
        Under ``auto`` it belongs to the subtraction, whose learnt estimate removes what it finds whole: a series
        ``auto`` gives the network is not sharpened (the network was never judged with it, and a guessed blur
        turns a sharp kernel's noise into calcium: on 120 tuning studies without tables it closed a calcium-free
        segment). Public so that the lab's training extraction detects exactly as the engine does.
        """
        options = self.detect_options
        if options.sharpens and self.method == "auto" and self.method_for(kernel) == "network":
            return options.without_sharpening()
        if options.sharpens:
            listed = self.subtract.listed_mtf50(kernel)
            if listed is not None:
                options = replace(options, sharp_mtf50_lp_cm=listed)
        return options

    def run(self, volume: np.ndarray, spacing: tuple[float, float, float],
            progress: Callable[[int, int], None] | None = None, kernel: str = "",
            level_image: np.ndarray | None = None) -> EngineResult:
        """Detect the calcium, then restore ``volume`` in place (float32 HU); say which voxels changed.
        ``kernel``: the series' reconstruction kernel (ConvolutionKernel), for the subtraction's blur.
        ``level_image``: an image to measure the contrast level on in place of ``volume``, in detection and
        in the subtraction's calcium estimate (a lab oracle: ``detect.detect``); the node never passes one."""
        t0 = time.perf_counter()
        detection = detect(volume, spacing, self.detect_options_for(kernel), level_image)
        seconds = time.perf_counter() - t0
        result = self.restore(volume, spacing, detection, progress, kernel, level_image)
        result.seconds = {"detect": seconds, **result.seconds}
        return result

    def restore(self, volume: np.ndarray, spacing: tuple[float, float, float], detection: Detection,
                progress: Callable[[int, int], None] | None = None, kernel: str = "",
                level_image: np.ndarray | None = None) -> EngineResult:
        """Remove the given calcium from ``volume`` in place (float32 HU): plan the windows, restore them
        step by step through the backend, resample back. Public for callers that know the calcium rather
        than detect it (the lab's diagnostic runs on the phantom's true calcium)."""
        t1 = time.perf_counter()
        regions = plan(detection, spacing, self.window_options)
        t2 = time.perf_counter()
        if self.method_for(kernel) == "subtract":
            opts = self.subtract.for_kernel(kernel)
            result = self._subtract(volume, spacing, detection, regions, progress, {"plan": t2 - t1}, opts,
                                    level_image)
            result.assumed_for_kernel = kernel if opts.blur != self.subtract.blur else ""
            return result
        grids = [ndimage.map_coordinates(volume, r.model_coordinates(), order=1, mode="nearest").astype(np.float32)
                 for r in regions]
        steps = max((len(r.windows) for r in regions), default=0)
        total = sum(len(r.windows) for r in regions)
        flips = self.confidence.flips
        disagree = np.zeros((len(regions), 2))  # per region: sum of |restored - mirrored|, voxels
        done = batches = 0
        for k in range(steps):
            work = [(ri, grid, r.windows[k]) for ri, (grid, r) in enumerate(zip(grids, regions))
                    if k < len(r.windows)]
            for i in range(0, len(work), self.backend.max_batch):
                chunk = work[i:i + self.backend.max_batch]
                images = np.stack([g[w.box()] for _, g, w in chunk])[:, None]
                masks = np.stack([w.network_mask for _, _, w in chunk])[:, None].astype(np.float32)
                restored = self.backend.run(images, masks)
                batches += 1
                if flips:
                    mirror = (slice(None), slice(None), slice(None, None, -1), slice(None, None, -1),
                              slice(None, None, -1))
                    mirrored = self.backend.run(np.ascontiguousarray(images[mirror]),
                                                np.ascontiguousarray(masks[mirror]))[mirror]
                    batches += 1
                    for (ri, _, w), a, b in zip(chunk, restored[:, 0], mirrored[:, 0]):
                        disagree[ri] += (float(np.abs(a[w.mask] - b[w.mask]).sum()), int(w.mask.sum()))
                    if self.confidence.average_flips:
                        restored = 0.5 * (restored + mirrored)
                for (_, g, w), out in zip(chunk, restored[:, 0]):
                    view = g[w.box()]
                    view[w.mask] = out[w.mask]
                done += len(chunk)
                if progress:
                    progress(done, total)
        t3 = time.perf_counter()
        changed = np.zeros(volume.shape, bool)
        reports = []
        ds = [float(sums / n) if flips and n else None for sums, n in disagree]
        # judged on the acquired volume, before any region is written back
        judged = [self._judge(volume, spacing, r, detection, d, self.confidence.unsure_hu, "flip")
                  for r, d in zip(regions, ds)]
        for grid, r, d, (vessel, why) in zip(grids, regions, ds, judged):
            unsure = bool(why)
            if unsure and self.confidence.unsure_action == "leave":
                reports.append(RegionReport(r.index, r.lesions, 0, d, True, "left as acquired (unsure)",
                                            why=why, **vessel))
                continue
            idx = r.native_indices()
            values = ndimage.map_coordinates(grid, r.native_coordinates(idx), order=1, mode="nearest")
            kept = 0
            guard = unsure and self.confidence.unsure_action == "guard"
            if (self.confidence.keep_visible_lumen or guard) and len(idx):
                values, kept = keep_visible_lumen(volume, spacing, idx, values, r.native_box,
                                                  0.0 if guard else self.confidence.lumen_guard_from)
            volume[tuple(idx.T)] = values
            changed[tuple(idx.T)] = True
            reports.append(RegionReport(r.index, r.lesions, len(idx), d, unsure, _restored_action(unsure, guard),
                                        kept, why=why, **vessel))
        t4 = time.perf_counter()
        return EngineResult(detection=detection, regions=regions, changed=changed, windows=total, batches=batches,
                            seconds={"plan": t2 - t1, "infer": t3 - t2, "resample": t4 - t3}, reports=reports)

    def _subtract(self, volume: np.ndarray, spacing: tuple[float, float, float], detection: Detection,
                  regions: list[Region], progress: Callable[[int, int], None] | None,
                  seconds: dict[str, float], opts: SubtractOptions, level_image: np.ndarray | None = None
                  ) -> EngineResult:
        """The physics path (``subtract.py``): each region's calcium estimated and subtracted, region by region.

        Every region is computed from the acquired volume (regions do not see each other's
        result), then written. The network's lumen guard is not applied: subtraction takes out
        only what the calcium's estimated blur adds, and on 120 tuning studies the guard cost it
        2 points of mean absolute error (8.1 -> 10.1) and prevented no invented stenosis
        (reports/tuning/subtract.md).

        With confidence on and ``SubtractOptions.unsure_hu`` above 0, each region is subtracted a second
        time under a softer assumed blur (``SubtractOptions.second_blur``), and its blur disagreement
        (``lumen_disagreement``) over that threshold makes it unsure: the estimate hangs on what the
        scanner's blur is assumed to be, which no image header states reliably. A weak flag
        (reports/tuning/subtract-confidence.md), off by default since it stopped ranking errors once the
        kernel tables and the learnt estimate came (reports/tuning/confidence-coverage.md); the vessel's
        calibre and sharpened-only calcium (``_judge``) make a region unsure either way.
        """
        t0 = time.perf_counter()
        pad = np.ceil(opts.pad_mm / np.asarray(spacing, float)).astype(int)
        fallback = detection.threshold_hu - opts.white_above_lumen_hu
        changed = np.zeros(volume.shape, bool)
        reports = []
        written = []  # (indices, values) per region: all are computed from the acquired volume first
        for k, r in enumerate(regions):
            box = grow_box(r.native_box, volume.shape, pad)
            origin = np.array([s.start for s in box])
            local_idx = r.native_indices() - origin
            levels = None if level_image is None else level_image[box]
            # the calcium's shape decides before the estimates run: an enclosing region takes the companion's
            enclosure = calcium_enclosure(detection.calcium, spacing, r.native_box) \
                if (opts.combine == "enclosed" and opts.companions) or self.confidence.unsure_enclosure > 0 else None
            enclosed = enclosure is not None and enclosure > opts.enclosed_above
            # ... else, beside a dim lumen, the dim-lumen estimate runs too (the vessel measured as _judge measures it)
            at = vessel_at(volume, spacing, r.native_box, detection.calcium) if opts.uses_dim() else UNMEASURED
            dim = not enclosed and isinstance(at, VesselAt) and at.lumen_hu < opts.dim_below_hu
            added = [calcium_blur(volume[box], detection.calcium[box], spacing, o, fallback, levels)
                     for o in opts.estimates(dim)]
            if opts.reach_hu > 0:  # also wherever the calcium's blur reaches past the footprint
                local_idx = np.unique(np.concatenate([local_idx, *(np.argwhere(a > opts.reach_hu) for a in added)]),
                                      axis=0)
            idx = local_idx + origin
            local = tuple(local_idx.T)
            tries = [(volume[box][local] - a[local]).astype(np.float32) for a in added]
            measured = bool(self.confidence.flips and opts.unsure_hu > 0 and len(idx))  # a disagreement to measure
            # the reader's lumen level: for "wider" and a disagreement only (not for "first", "mean" or "enclosed")
            level = lumen_level_at(volume[box], spacing, local_idx) \
                if measured or (opts.combine == "wider" and len(tries) > 1) else None
            which = chosen(tries, level, opts.combine, enclosed, dim)
            values = restoration_written(tries, which)
            named = {"estimate": _estimate_name(opts, which), "estimate_index": which if len(tries) > 1 else None,
                     "enclosure": enclosure}
            d = None
            measure = "estimates" if len(tries) > 1 else "blur"
            if measured:
                if len(tries) > 1:  # the estimates' own disagreement: no further pass
                    d = max(lumen_disagreement(tries[0], other, level) for other in tries[1:])
                else:
                    second = calcium_removed(volume[box], detection.calcium[box], spacing,
                                             replace(opts, blur=opts.second_blur), fallback, levels)[local]
                    d = lumen_disagreement(values, second, level)
            vessel, why = self._judge(volume, spacing, r, detection, d, opts.unsure_hu, measure, at, enclosure)
            unsure = bool(why)
            if unsure and self.confidence.unsure_action == "leave":
                reports.append(RegionReport(r.index, r.lesions, 0, d, True, "left as acquired (unsure)",
                                            measure=measure, why=why, **vessel, enclosure=enclosure))
            else:
                kept = 0
                guard = unsure and self.confidence.unsure_action == "guard"
                if guard and len(idx):  # all the visible lumen: a superset of what keep_lumen holds
                    values, kept = keep_visible_lumen(volume, spacing, idx, values, box)
                elif opts.keep_lumen == "all" or (opts.keep_lumen == "unsure" and unsure) or (
                        opts.keep_lumen == "sharpened" and _holds_sharpened(detection, r)):
                    values, kept = _keep_lumen_beyond(volume, spacing, detection.calcium, box, idx, local, values,
                                                      opts.keep_lumen_beyond_mm)
                written.append((idx, values))
                reports.append(RegionReport(r.index, r.lesions, len(idx), d, unsure, _restored_action(unsure, guard),
                                            kept, measure=measure, why=why, **vessel, **named))
            if progress:
                progress(k + 1, len(regions))
        for idx, values in written:
            volume[tuple(idx.T)] = values
            changed[tuple(idx.T)] = True
        return EngineResult(detection=detection, regions=regions, changed=changed, windows=0, batches=0,
                            seconds={**seconds, "subtract": time.perf_counter() - t0}, reports=reports,
                            assumed_mtf50_lp_cm=opts.blur.mtf50_lp_cm, assumed_edge_enhance=opts.blur.edge_enhance,
                            method="subtract")
