"""A reader model: diameter stenosis the way a radiologist reads it in cross-sections.

The first ruler (``stenosis.py``) counted as lumen every contrast-range voxel inside an
oracle outer radius and took the lumen's level from the phantom's truth; it could not
show blooming, because the ring that blur draws around calcium counted as lumen. A
reader instead looks out from the centre of the lumen and stops at the first edge:
where the image falls half-way down to the wall, or where it rises to where calcium
"looks white". That second stop is what makes bloomed calcium narrow the lumen.

In each cross-section, rays leave the lumen's centreline every 5°; each stops at its
first edge. The centre is moved to the middle of what the rays found (twice), as a
reader's centreline follows the lumen. The section's minimal diameter (opposite rays
added, smoothed over ±5°) along the lesion gives the minimal lumen diameter (MLD); the
reference diameter is the median minimal diameter of calcium-free sections on both sides.
The lumen's level is measured in those reference sections, never taken from a phantom.
Two white levels (lumen + 100 and + 200 HU) are reported so no figure hangs on one.

The same reader reads the acquired image, the processed image and the truth image (what
the scanner would show without calcium), and its geometric reading of the phantom's own
lumen is the geometric truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

WHITE_LEVELS_HU = (100.0, 200.0)  # above the lumen: where calcium "looks white"
WALL_HU = 50.0  # vessel wall and plaque: the lumen's edge is half-way down to it
# How far the eye integrates, per reconstruction kernel (the header's ConvolutionKernel). A sharp
# kernel's noise grains stand 1.8 noise SDs short of lumen + 100 HU after 0.2 mm of smoothing: a
# reader meeting one at a section's centre, or a patch of them across a sector of rays, read
# calcium-free rescans as occluded (reports/tuning/noise-floor.md). Readers read such images
# integrated over more (a thicker slab, a wider window); the soft and standard kernels keep 0.2 mm,
# so the calibration gate (standard kernel) and the noiseless inserts read as before. Chosen on
# tuning studies (seed 6060) by the reader's test-retest agreement, reports/tuning/reader-smoothing.md.
SMOOTH_MM_BY_KERNEL = {"soft": 0.2, "standard": 0.2, "hd": 0.4, "sharp": 0.4}
REFERENCE_GAP_MM = 1.0  # between a lesion's end and its reference sections
REFERENCE_LENGTH_MM = 2.0
SECTION_STEP_MM = 0.3


@dataclass(frozen=True)
class ReaderSettings:
    """How the reader looks: white level, rays and their sampling."""

    white_hu: float = WHITE_LEVELS_HU[0]
    wall_hu: float = WALL_HU
    rays: int = 72
    step_mm: float = 0.05
    max_mm: float = 5.0
    recentre: int = 2
    smooth_mm: float = 0.2  # the eye integrates over a few pixels: noise grains are not edges
    persist_mm: float = 0.15  # an edge holds for this long along the ray

    def __post_init__(self) -> None:
        if self.rays % 2 or self.rays < 8:
            raise ValueError("rays must be an even number of at least 8 (opposite rays make a diameter)")
        if self.white_hu <= 0 or self.step_mm <= 0 or self.max_mm <= self.step_mm:
            raise ValueError("white level, step and reach must be positive, reach beyond one step")


@dataclass(frozen=True)
class Reading:
    """One lesion's reading."""

    stenosis_pct: float  # 100 (1 − MLD / reference)
    mld_mm: float
    reference_mm: float
    lumen_hu: float  # measured in the reference sections


def frames(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tangent and two normals per centreline point (any consistent pair: rays go all round)."""
    t = np.gradient(points, axis=0)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    ref = np.where(np.abs(t[:, :1]) < 0.9, np.array([[1.0, 0, 0]]), np.array([[0, 1.0, 0]]))
    n = ref - np.sum(ref * t, axis=1, keepdims=True) * t
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    return t, n, np.cross(t, n)


def _sample(volume: np.ndarray, spacing: np.ndarray, pts_mm: np.ndarray) -> np.ndarray:
    return ndimage.map_coordinates(volume, (pts_mm / spacing).reshape(-1, 3).T, order=1,
                                   mode="nearest").reshape(pts_mm.shape[:-1])


def lumen_level(volume: np.ndarray, spacing: tuple[float, float, float], points_mm: np.ndarray) -> float:
    """The lumen's level as a reader places a small ROI in a healthy stretch: the median near the centre."""
    sp = np.asarray(spacing, float)
    _, n, b = frames(points_mm)
    ang = np.linspace(0, 2 * np.pi, 6, endpoint=False)
    ring = 0.25 * (np.cos(ang)[None, :, None] * n[:, None, :] + np.sin(ang)[None, :, None] * b[:, None, :])
    pts = np.concatenate([points_mm[:, None, :], points_mm[:, None, :] + ring], axis=1)
    return float(np.median(_sample(volume, sp, pts)))


def _edges(values: np.ndarray, low: float, high: float, step: float, reach: float, hold: int = 1) -> np.ndarray:
    """Distance along each ray (last axis: samples from the centre) to its first edge.

    An edge is where the ray leaves the lumen's range and stays out for ``hold`` samples.
    """
    out_low = values < low
    out_high = values > high
    out = out_low | out_high
    if hold > 1:
        held = out.copy()
        for k in range(1, hold):
            held[..., :-k] &= out[..., k:]
        out = held
    first = np.where(out.any(axis=-1), out.argmax(axis=-1), -1)
    r = np.full(first.shape, reach)
    hit = first > 0
    k = first[hit]
    rows = np.nonzero(hit)
    v0 = values[rows + (k - 1,)]
    v1 = values[rows + (k,)]
    thr = np.where(out_low[rows + (k,)], low, high)
    frac = np.clip((v0 - thr) / np.where(v0 != v1, v0 - v1, 1.0), 0.0, 1.0)
    r[hit] = (k - 1 + frac) * step
    r[first == 0] = 0.0
    return r


def lesion_sections(s_centre_mm: float, half_length_mm: float, n_points: int, step_mm: float = 0.1
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Centreline indices of the lesion's sections and of its proximal and distal reference sections."""
    def span(a: float, b: float) -> np.ndarray:
        idx = np.arange(int(round(a / step_mm)), int(round(b / step_mm)) + 1, int(round(SECTION_STEP_MM / step_mm)))
        return idx[(idx >= 1) & (idx < n_points - 1)]

    lo, hi = s_centre_mm - half_length_mm, s_centre_mm + half_length_mm
    lesion = span(lo, hi)
    ref = np.concatenate([span(lo - REFERENCE_GAP_MM - REFERENCE_LENGTH_MM, lo - REFERENCE_GAP_MM),
                          span(hi + REFERENCE_GAP_MM, hi + REFERENCE_GAP_MM + REFERENCE_LENGTH_MM)])
    return lesion, ref


def _diameters_at(volume: np.ndarray, spacing: tuple[float, float, float], points_mm: np.ndarray,
                  idx: np.ndarray, level: float, settings: ReaderSettings) -> np.ndarray:
    sp = np.asarray(spacing, float)
    t, n, b = frames(points_mm)
    ang = np.linspace(0, 2 * np.pi, settings.rays, endpoint=False)
    dirs = np.cos(ang)[None, :, None] * n[idx][:, None, :] + np.sin(ang)[None, :, None] * b[idx][:, None, :]
    radii = np.arange(0.0, settings.max_mm + 1e-9, settings.step_mm)
    low = 0.5 * (level + settings.wall_hu)
    high = level + settings.white_hu
    start = points_mm[idx]
    centre = start.copy()
    for it in range(settings.recentre + 1):
        pts = centre[:, None, None, :] + dirs[:, :, None, :] * radii[None, None, :, None]
        r = _edges(_sample(volume, sp, pts), low, high, settings.step_mm, settings.max_mm,
                   max(1, int(round(settings.persist_mm / settings.step_mm))))
        if it == settings.recentre:
            break
        cand = centre + np.mean(r[:, :, None] * dirs, axis=1)
        off = cand - start
        norm = np.linalg.norm(off, axis=1, keepdims=True)
        cand = np.where(norm > 1.0, start + off / np.maximum(norm, 1e-9), cand)
        v = _sample(volume, sp, cand)
        centre = np.where(((v > low) & (v < high))[:, None], cand, centre)
    half = settings.rays // 2
    d = r[:, :half] + r[:, half:]
    return (np.roll(d, 1, axis=1) + d + np.roll(d, -1, axis=1)) / 3.0


def smoothing_for(kernel: str | None) -> float:
    """The reader's smoothing for images reconstructed with ``kernel`` (its default for a kernel it does not know)."""
    default = ReaderSettings.smooth_mm
    return SMOOTH_MM_BY_KERNEL.get(str(kernel).lower(), default) if kernel else default


def as_seen(volume: np.ndarray, spacing: tuple[float, float, float], settings: ReaderSettings = ReaderSettings()
            ) -> np.ndarray:
    """The volume as the reader's eye integrates it (``smooth_mm``); read_lesion does this unless told it is done.

    Callers reading many lesions of one image smooth it once here and pass ``seen=True``.
    """
    if settings.smooth_mm <= 0:
        return volume
    return ndimage.gaussian_filter(volume, settings.smooth_mm / np.asarray(spacing, float), truncate=3.0)


def read_lesion(volume: np.ndarray, spacing: tuple[float, float, float], lumen_points_mm: np.ndarray,
                s_centre_mm: float, half_length_mm: float, settings: ReaderSettings = ReaderSettings(),
                level_hu: float | None = None, seen: bool = False) -> Reading | None:
    """Read one lesion along the lumen's centreline (sampled every 0.1 mm); None without references.

    ``seen``: ``volume`` is already :func:`as_seen` with these settings.
    """
    lesion, ref = lesion_sections(s_centre_mm, half_length_mm, len(lumen_points_mm))
    if len(lesion) == 0 or len(ref) < 4:
        return None
    if not seen:
        volume = as_seen(volume, spacing, settings)
    level = lumen_level(volume, spacing, lumen_points_mm[ref]) if level_hu is None else level_hu
    if level - settings.wall_hu < 100.0:
        return None  # no contrast to read against
    d_ref = _diameters_at(volume, spacing, lumen_points_mm, ref, level, settings)
    d_les = _diameters_at(volume, spacing, lumen_points_mm, lesion, level, settings)
    reference = float(np.median(d_ref.min(axis=1)))  # the same measure as the MLD: a healthy vessel reads ~0
    mins = d_les.min(axis=1)
    if len(mins) >= 3:  # a reader's MLD is not one noisy section: smooth over ±0.3 mm
        mins = np.convolve(np.pad(mins, 1, mode="edge"), np.ones(3) / 3.0, mode="valid")
    mld = float(mins.min())
    if reference <= 0:
        return None
    return Reading(stenosis_pct=100.0 * (1.0 - mld / reference), mld_mm=mld, reference_mm=reference,
                   lumen_hu=level)
