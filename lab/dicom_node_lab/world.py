"""The calibrated test world: coronary lesions in clinical strata, through a cardiac CT scanner.

The first phantom (``phantom.py``) drew mostly small spotty deposits with true stenoses
under 25 % and blurred them with a light Gaussian; its untreated images under-called
calcified stenoses, so nothing measured on it could say whether removing calcium helps.
This world draws what the clinical problem is made of:

- lesions whose true diameter stenosis is spread evenly over the CAD-RADS bands
  (0, 1–24, 25–49, 50–69, 70–99 %), 2–15 mm long, in vessels of 2–4.5 mm;
- calcium arcs of < 90°, 90–180° and > 180° that hug the lumen, at a density in
  mg HA/cm³ turned into HU at the study's tube voltage; non-calcified and mixed plaques
  (calcium behind soft plaque), calcium-free segments, and calcium no brighter than the
  lumen as strata of their own;
- the scanner of ``physics.py``: a kernel's MTF with tails, a slice profile, motion per
  vessel, beam hardening and noise with the kernel's texture.

The lumen of a lesion is a circle of radius ``a = r0 (1 − S)`` (S the true stenosis),
pushed away from the plaque by an eccentricity, so the geometric truth is exact and known
without measuring it; the reader (``reader.py``) follows the lumen's own centreline.
The truth image replaces calcium by the plaque tissue it sits in and goes through the same
scanner, motion and noise: what the scanner would show without calcium.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from dicom_node_lab import physics
from dicom_node_lab.phantom import (
    Lesion,
    Phantom,
    PhantomOptions,
    Vessel,
    _frames,
    _make_background,
    _smooth_curve,
    _wrap,
    render,
)
from dicom_node_lab.physics import Acquisition, Kernel

STEP_MM = 0.1  # centreline sampling, as in phantom.py
CADRADS_BANDS = ((0.0, 0.0), (1.0, 24.0), (25.0, 49.0), (50.0, 69.0), (70.0, 95.0))  # % diameter stenosis
CADRADS_EDGES = (0.5, 24.5, 49.5, 69.5)  # a reading's band: 0, 1-24, 25-49, 50-69, 70-100
REFERENCE_GAP_MM = 3.0  # calcium-free vessel kept on both sides of a lesion, for its reference


class LesionType(StrEnum):
    """What a lesion is made of; each is a stratum of its own in the reports."""

    CALCIFIED = "calcified"  # calcium brighter than the lumen, hugging it
    MIXED = "mixed"  # calcium behind a layer of soft plaque
    FAINT = "faint"  # calcium no brighter than the lumen: no reader can see it
    SOFT = "soft"  # non-calcified plaque
    NORMAL = "normal"  # a calcium-free, plaque-free segment


def cadrads_band(stenosis_pct: float) -> int:
    """CAD-RADS stenosis category of a diameter stenosis (0: none … 4: 70-99, 5 read as 4)."""
    return int(np.searchsorted(CADRADS_EDGES, stenosis_pct))


@dataclass
class WorldLesion:
    """One lesion's geometry in its vessel's frame, and the truth it was drawn to have."""

    kind: LesionType
    s_mm: float  # centre along the centreline
    half_length_mm: float  # the narrowing's half length
    stenosis: float  # true diameter stenosis, 0..0.95
    theta: float  # where the plaque sits (rad, in the vessel's n/b frame)
    eccentricity: float  # 0: concentric lumen; 1: lumen touches the wall opposite the plaque
    plaque_hu: float
    arc_deg: float = 0.0  # calcium arc around the lumen (0: no calcium)
    calcium_half_length_mm: float = 0.0
    calcium_thickness_mm: float = 0.0
    calcium_gap_mm: float = 0.0  # soft plaque between lumen and calcium (mixed plaques)
    density_mg_cm3: float = 0.0
    calcium_hu: float = 0.0

    def profile(self, s: np.ndarray) -> np.ndarray:
        """How much of the narrowing is present at arclength ``s``: 1 over the middle 40 %, cos² ends."""
        u = np.abs(s - self.s_mm) / self.half_length_mm
        ramp = np.clip((u - 0.4) / 0.6, 0.0, 1.0)
        return np.where(u < 1.0, np.cos(0.5 * np.pi * ramp) ** 2, 0.0)


@dataclass
class WorldVessel(Vessel):
    """A vessel with world lesions; ``lumen_offset_mm`` is the lumen centre's shift from the centreline."""

    lesions_w: list[WorldLesion] = field(default_factory=list)
    motion_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def lumen_geometry(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Lumen radius and centre offset (along n and b, mm) at arclength ``s``."""
        i = np.clip(np.round(s / STEP_MM).astype(int), 0, len(self.points_mm) - 1)
        r0 = self.radius_mm[i]
        a = r0.copy()
        cx = np.zeros_like(a)
        cy = np.zeros_like(a)
        for les in self.lesions_w:
            w = les.profile(s)
            on = w > 0
            if not on.any():
                continue
            a_here = r0 * (1.0 - les.stenosis * w)
            e = les.eccentricity * (r0 - a_here)
            a = np.where(on, a_here, a)
            cx = np.where(on, -e * np.cos(les.theta), cx)
            cy = np.where(on, -e * np.sin(les.theta), cy)
        return a, cx, cy

    def lumen_points_mm(self) -> np.ndarray:
        """The lumen's own centreline: what a reader's centreline extraction follows."""
        _, n, b = _frames(self.points_mm)
        _, cx, cy = self.lumen_geometry(self.s_mm)
        return self.points_mm + cx[:, None] * n + cy[:, None] * b


@dataclass
class WorldOptions:
    """Ranges of the world; training and the experiments pick kernels and motion from them."""

    kernels: tuple[Kernel, ...] = (Kernel.SOFT, Kernel.STANDARD, Kernel.SHARP, Kernel.HD)
    motion_mm: tuple[float, float] = (0.0, 1.2)
    slice_fwhm_mm: tuple[float, float] = (0.6, 0.9)
    kvps: tuple[int, ...] = (100, 120)
    n_vessels: tuple[int, int] = (2, 3)
    lesions_per_vessel: tuple[int, int] = (1, 2)
    radius_mm: tuple[float, float] = (1.0, 2.25)  # 2-4.5 mm vessels
    lumen_hu: tuple[float, float] = (250.0, 600.0)
    # relative frequency of LesionType; calcified lesions are the question, the rest its controls
    type_weights: dict[LesionType, float] = field(default_factory=lambda: {
        LesionType.CALCIFIED: 0.55, LesionType.MIXED: 0.1, LesionType.FAINT: 0.1,
        LesionType.SOFT: 0.15, LesionType.NORMAL: 0.1})
    arc_strata: tuple[tuple[float, float], ...] = ((30.0, 90.0), (90.0, 180.0), (180.0, 360.0))
    length_mm: tuple[float, float] = (2.0, 15.0)
    density_mg_cm3: tuple[float, float] = (400.0, 1000.0)
    calcium_thickness_mm: tuple[float, float] = (0.6, 1.8)
    faint_thickness_mm: tuple[float, float] = (0.3, 0.8)
    beam_hardening_probability: float = 0.5
    lesion_margin_mm: float = 4.0
    reference_gap_mm: float = REFERENCE_GAP_MM  # calcium-free vessel each side of a lesion (training: less)
    supersample: int = 2
    background: PhantomOptions = field(default_factory=lambda: PhantomOptions(
        chamber_probability=0.3, bone_probability=0.3, lumen_hu=(250.0, 600.0)))


class _Geometry:
    """Lumen, tissue and calcium of one world vessel at fine-grid points (``phantom._render_slab``'s interface)."""

    def __init__(self, vessel: WorldVessel):
        self.vessel = vessel
        self.tree = cKDTree(vessel.points_mm)
        self.t, self.n, self.b = _frames(vessel.points_mm)
        thick = max((les.calcium_gap_mm + les.calcium_thickness_mm for les in vessel.lesions_w), default=0.0)
        self.reach = float(vessel.radius_mm.max() + vessel.wall_mm + thick + 1.0)

    def render(self, pts: np.ndarray) -> dict[str, np.ndarray]:
        v = self.vessel
        m = len(pts)
        out = dict(lumen=np.zeros(m, bool), tissue=np.zeros(m, bool), calcium=np.zeros(m, bool),
                   calcium_hu=np.zeros(m, np.float32), tissue_hu=np.full(m, v.wall_hu, np.float32),
                   lumen_hu=np.zeros(m, np.float32))
        dist, idx = self.tree.query(pts, distance_upper_bound=self.reach)
        near = np.isfinite(dist)
        if not near.any():
            return out
        i = idx[near]
        d = pts[near] - v.points_mm[i]
        along = np.einsum("ij,ij->i", d, self.t[i])
        perp = d - along[:, None] * self.t[i]
        x = np.einsum("ij,ij->i", perp, self.n[i])
        y = np.einsum("ij,ij->i", perp, self.b[i])
        r = np.hypot(x, y)
        s = i * STEP_MM + along
        r0 = v.radius_mm[i]
        a, cx, cy = v.lumen_geometry(s)
        rho = np.hypot(x - cx, y - cy)
        phi = np.arctan2(y - cy, x - cx)
        lumen = rho < a
        tissue = (~lumen) & (r < r0 + v.wall_mm)
        tissue_hu = np.full(len(r), v.wall_hu, np.float32)
        calc = np.zeros(len(r), bool)
        calc_hu = np.zeros(len(r), np.float32)
        for les in v.lesions_w:
            w = les.profile(s)
            plaque = (w > 0) & (~lumen) & (r < r0 + 0.5 * v.wall_mm)
            tissue_hu = np.where(plaque, les.plaque_hu, tissue_hu)
            if les.arc_deg <= 0:
                continue
            in_arc = np.abs(_wrap(phi - les.theta)) <= np.radians(les.arc_deg) / 2
            depth = rho - a - les.calcium_gap_mm
            hit = (in_arc & (np.abs(s - les.s_mm) <= les.calcium_half_length_mm)
                   & (depth >= 0) & (depth <= les.calcium_thickness_mm))
            calc |= hit
            calc_hu = np.where(hit, les.calcium_hu, calc_hu)
            # calcium pushing out past the wall is still inside the vessel; soft plaque around it
            shell = (in_arc & (np.abs(s - les.s_mm) <= les.calcium_half_length_mm) & (depth >= 0)
                     & (depth <= les.calcium_thickness_mm + v.wall_mm))
            tissue_hu = np.where(shell & ~(r < r0 + 0.5 * v.wall_mm), les.plaque_hu, tissue_hu)
            tissue |= shell & ~lumen
        tissue |= calc
        out["lumen"][near] = lumen
        out["tissue"][near] = tissue
        out["calcium"][near] = calc
        out["calcium_hu"][near] = calc_hu
        out["tissue_hu"][near] = tissue_hu
        out["lumen_hu"][near] = v.lumen_hu[i]
        return out


def _draw_lesion(rng: np.random.Generator, kind: LesionType, s_mm: float, half_length: float, r0: float,
                 lumen_hu: float, kvp: int, opts: WorldOptions) -> WorldLesion:
    """One lesion of a stratum; calcium's HU from its density at the study's kVp."""
    band = CADRADS_BANDS[int(rng.integers(len(CADRADS_BANDS)))]
    if kind == LesionType.NORMAL:
        band = (0.0, 0.0)
    stenosis = float(rng.uniform(*band)) / 100.0
    arc_lo, arc_hi = opts.arc_strata[int(rng.integers(len(opts.arc_strata)))]
    arc = float(rng.uniform(arc_lo, arc_hi)) if kind in (LesionType.CALCIFIED, LesionType.MIXED,
                                                          LesionType.FAINT) else 0.0
    if arc > 0 and arc_lo >= 180.0 and rng.random() < 0.3:
        arc = 360.0  # full rings: the concentric calcification
    # large arcs narrow the lumen all round; small ones push it aside
    ecc = float(rng.uniform(0.0, 0.3)) if arc >= 270 else float(rng.uniform(0.2, 0.9))
    les = WorldLesion(kind=kind, s_mm=s_mm, half_length_mm=half_length, stenosis=stenosis,
                      theta=float(rng.uniform(-np.pi, np.pi)), eccentricity=ecc,
                      plaque_hu=float(rng.uniform(20.0, 90.0)), arc_deg=arc)
    if arc > 0:
        les.calcium_half_length_mm = float(max(0.75, half_length * rng.uniform(0.5, 1.0)))
        # calcified plaque in a significant lesion is a sheet; faint deposits are thin
        thick = opts.faint_thickness_mm if kind == LesionType.FAINT else opts.calcium_thickness_mm
        les.calcium_thickness_mm = float(rng.uniform(*thick))
        les.calcium_gap_mm = float(rng.uniform(0.3, 0.7)) if kind == LesionType.MIXED else 0.0
        if kind == LesionType.FAINT:
            hu = float(rng.uniform(130.0, lumen_hu))
            les.density_mg_cm3 = hu / physics.HU_PER_MG_HA[kvp]
        else:
            # brighter than the lumen by at least 100 HU, or it is the faint stratum
            lo = max(opts.density_mg_cm3[0], (lumen_hu + 100.0) / physics.HU_PER_MG_HA[kvp])
            les.density_mg_cm3 = float(rng.uniform(lo, max(lo, opts.density_mg_cm3[1])))
        les.calcium_hu = float(physics.calcium_hu(les.density_mg_cm3, kvp))
    return les


def _draw_vessels(rng: np.random.Generator, extent: np.ndarray, kvp: int, opts: WorldOptions,
                  motion_range: tuple[float, float]) -> list[WorldVessel]:
    vessels: list[WorldVessel] = []
    n_vessels = int(rng.integers(opts.n_vessels[0], opts.n_vessels[1] + 1))
    diag = float(np.linalg.norm(extent))
    kinds = list(opts.type_weights)
    weights = np.array([opts.type_weights[k] for k in kinds], float)
    for _ in range(50):
        if len(vessels) == n_vessels:
            break
        centre = extent * rng.uniform(0.3, 0.7, size=3)
        direction = rng.normal(size=3)
        half = diag * 0.5 + 6.0
        fwd = _smooth_curve(rng, centre, direction, half, max_curvature=0.04)
        back = _smooth_curve(rng, centre, -direction, half, max_curvature=0.04)
        pts = np.concatenate([back[::-1], fwd[1:]])
        r = float(rng.uniform(*opts.radius_mm))
        if vessels:  # keep vessels apart so one lesion's blooming never falls on another vessel
            others = np.concatenate([v.points_mm for v in vessels])
            if cKDTree(others).query(pts)[0].min() < r + 6.0:
                continue
        n = len(pts)
        taper = float(rng.uniform(0.0, 0.08))
        radius = np.maximum(r * (1.0 - taper * np.linspace(0, 1, n)), opts.radius_mm[0] * 0.9)
        lumen_level = float(rng.uniform(*opts.lumen_hu))
        grad = float(rng.uniform(-0.05, 0.05))
        lumen_hu = (lumen_level * (1.0 + grad * (np.linspace(0, 1, n) - 0.5))).astype(np.float32)
        motion = float(rng.uniform(*motion_range))
        mdir = rng.normal(size=3)
        mdir /= np.linalg.norm(mdir)
        v = WorldVessel(points_mm=pts, radius_mm=radius, wall_mm=float(rng.uniform(0.3, 0.5)),
                        wall_hu=float(rng.uniform(30.0, 70.0)), lumen_hu=lumen_hu,
                        motion_mm=tuple(float(c) for c in motion * mdir))
        inside = np.flatnonzero(np.all((pts >= opts.lesion_margin_mm) & (pts <= extent - opts.lesion_margin_mm),
                                       axis=1))
        if len(inside) == 0:
            continue
        s_lo, s_hi = inside[0] * STEP_MM, inside[-1] * STEP_MM
        gap = opts.reference_gap_mm
        free_from = s_lo + gap + 2.0  # the first reference segment
        for _ in range(int(rng.integers(opts.lesions_per_vessel[0], opts.lesions_per_vessel[1] + 1))):
            half = float(rng.uniform(*opts.length_mm)) / 2.0
            start = free_from + half
            room = s_hi - gap - 2.0 - half - start
            if room < 0:
                break
            s_mm = start + float(rng.uniform(0.0, min(room, 6.0)))
            kind = LesionType(kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))])
            i = int(round(s_mm / STEP_MM))
            les = _draw_lesion(rng, kind, s_mm, half, float(radius[i]), float(lumen_hu[i]), kvp, opts)
            v.lesions_w.append(les)
            free_from = s_mm + half + 2 * gap + 2.0
        if v.lesions_w:
            vessels.append(v)
    return vessels


def geometric_stenosis(vessel: WorldVessel, lesion: WorldLesion) -> float:
    """True diameter stenosis (%) from the lumen's own geometry, with the reader's sections.

    The lesion's lumen is a circle of radius a(s): its diameter is 2a(s) in every
    direction, so the reader's MLD on a perfect image is 2 min a(s); the reference is the
    nominal diameter in the same reference sections the reader uses.
    """
    from dicom_node_lab.reader import lesion_sections

    idx, ref = lesion_sections(lesion.s_mm, lesion.half_length_mm, len(vessel.points_mm))
    a, _, _ = vessel.lumen_geometry(idx * STEP_MM)
    return 100.0 * (1.0 - float(a.min()) / float(np.mean(vessel.radius_mm[ref])))


def calcium_contrast(image: np.ndarray, spacing: tuple[float, float, float], vessel: WorldVessel,
                     lesion: WorldLesion) -> float:
    """How much brighter than its lumen a lesion's calcium looks in ``image`` (90th percentile, HU).

    Sampled at the middle of the calcium shell over its arc and length. Whether calcium
    "looks white" to a reader depends on the scanner as much as on the calcium: a thin
    dense shell blurs down into the lumen's range. Below ``reader.WHITE_LEVELS_HU[0]`` the
    lesion belongs to the stratum of calcium no brighter than the lumen.
    """
    if lesion.arc_deg <= 0:
        return float("nan")
    _, n, b = _frames(vessel.points_mm)
    s = np.arange(lesion.s_mm - lesion.calcium_half_length_mm, lesion.s_mm + lesion.calcium_half_length_mm + 1e-6, 0.2)
    half = np.radians(lesion.arc_deg) / 2
    phi = lesion.theta + np.linspace(-half, half, max(3, int(lesion.arc_deg / 5)))
    i = np.clip(np.round(s / STEP_MM).astype(int), 0, len(vessel.points_mm) - 1)
    a, cx, cy = vessel.lumen_geometry(s)
    rr = a + lesion.calcium_gap_mm + lesion.calcium_thickness_mm / 2
    x = cx[:, None] + rr[:, None] * np.cos(phi)[None]
    y = cy[:, None] + rr[:, None] * np.sin(phi)[None]
    pts = vessel.points_mm[i][:, None, :] + x[..., None] * n[i][:, None, :] + y[..., None] * b[i][:, None, :]
    vals = ndimage.map_coordinates(image, (pts / np.asarray(spacing)).reshape(-1, 3).T, order=1, mode="nearest")
    return float(np.percentile(vals, 90) - np.median(vessel.lumen_hu[i]))


def _motion_weight(v: WorldVessel, shape: tuple[int, int, int], spacing: np.ndarray) -> np.ndarray:
    """Where a vessel's motion applies: its neighbourhood (4 mm past the wall), smoothly."""
    near = np.zeros(shape, bool)
    idx = np.round(v.points_mm / spacing).astype(int)
    ok = np.all((idx >= 0) & (idx < np.asarray(shape)), axis=1)
    near[tuple(idx[ok].T)] = True
    dist = ndimage.distance_transform_edt(~near, sampling=spacing)
    reach = float(v.radius_mm.max()) + v.wall_mm + 4.0
    return np.clip((reach + 1.5 - dist) / 3.0, 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class StudySettings:
    """The scanner settings one study was drawn with: what held-out settings are held out by."""

    kernel: Kernel
    kvp: int
    slice_fwhm_mm: float
    noise_sd: float
    beam_hardening_hu: float
    max_motion_mm: float


def generate(shape: tuple[int, int, int] = (80, 112, 112), spacing: tuple[float, float, float] = (0.47, 0.47, 0.47),
             seed: int = 0, options: WorldOptions | None = None, kernel: Kernel | None = None,
             motion_mm: tuple[float, float] | None = None, noise: bool = True) -> Phantom:
    """Render one study of the world; the same seed and settings always give the same study.

    ``kernel`` and ``motion_mm`` fix what would otherwise be drawn from ``options``: the
    experiments hold settings out by them. The returned ``Phantom`` carries the world's
    vessels (``WorldVessel``) and one ``Lesion`` per world lesion; ``settings`` on the
    phantom say how it was acquired.
    """
    opts = options or WorldOptions()
    rng = np.random.default_rng(seed)
    sp = np.asarray(spacing, float)
    extent = (np.asarray(shape) - 1) * sp
    kern = kernel or Kernel(opts.kernels[int(rng.integers(len(opts.kernels)))])
    kvp = int(opts.kvps[int(rng.integers(len(opts.kvps)))])
    vessels = _draw_vessels(rng, extent, kvp, opts, motion_mm or opts.motion_mm)
    bg = _make_background(rng, extent, vessels, opts.background)
    geoms = [_Geometry(v) for v in vessels]
    image, truth, lumen, calc = render(shape, sp, opts.supersample, geoms, bg)
    excess = np.clip(image - truth, 0.0, None).astype(np.float32)
    km = physics.KERNELS[kern]
    acq = Acquisition(kernel=kern, slice_fwhm_mm=float(rng.uniform(*opts.slice_fwhm_mm)), kvp=kvp,
                      noise_sd=float(rng.uniform(*km.noise_sd)) if noise else 0.0,
                      beam_hardening_hu=float(rng.uniform(15.0, 60.0))
                      if rng.random() < opts.beam_hardening_probability else 0.0,
                      noise_seed=int(rng.integers(2 ** 31)))
    if acq.beam_hardening_hu:
        # darkening beside dense calcium, in the acquired image only (the truth has no calcium)
        density = calc * np.clip(image - 300.0, 0.0, None) / 1000.0
        halo = ndimage.gaussian_filter(density, sigma=0.8 / sp)
        image -= acq.beam_hardening_hu * halo / max(float(halo.max()), 1e-6) * (calc < 0.5)
    motion = [(_motion_weight(v, shape, sp), np.asarray(v.motion_mm)) for v in vessels
              if np.linalg.norm(v.motion_mm) > 0.05]
    image = physics.blur(image, spacing, kern, acq.slice_fwhm_mm, motion)
    truth = physics.blur(truth, spacing, kern, acq.slice_fwhm_mm, motion)
    n = None
    if acq.noise_sd:
        n = physics.noise(shape, spacing, kern, acq.slice_fwhm_mm, acq.noise_sd,
                          np.random.default_rng(acq.noise_seed))
        image += n
        truth += n
    lesions = []
    for vi, v in enumerate(vessels):
        for les in v.lesions_w:
            j = int(round(les.s_mm / STEP_MM))
            lesions.append(Lesion(vessel=vi, index=j, calcified=les.arc_deg > 0, kind=str(les.kind),
                                  point_mm=tuple(float(x) for x in v.points_mm[j])))
    settings = StudySettings(kernel=kern, kvp=kvp, slice_fwhm_mm=acq.slice_fwhm_mm, noise_sd=acq.noise_sd,
                               beam_hardening_hu=acq.beam_hardening_hu,
                               max_motion_mm=max((float(np.linalg.norm(v.motion_mm)) for v in vessels), default=0.0))
    return Phantom(image=image, truth=truth, calcium_mask=calc >= 0.5, calcium_fraction=calc,
                   lumen_mask=lumen > 0.5, vessels=vessels, lesions=lesions,
                   spacing=tuple(float(x) for x in sp), fwhm_mm=(acq.slice_fwhm_mm, km.fwhm_mm(), km.fwhm_mm()),
                   noise_sd=acq.noise_sd, seed=seed, settings=settings, calcium_excess=excess, noise=n)
