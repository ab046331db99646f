"""Synthetic coronary CTA phantom with a calcium-free ground truth.

We have no patient data, and real CTA never comes with the image that would have been
acquired without calcium. The phantom renders both from one geometry: every calcium
voxel is replaced in the truth by the plaque tissue it sits in, so the true lumen keeps
the narrowing that the plaque's volume causes. Both images share the same partial
volume, the same scanner blur and the same noise realisation, so the only difference
between them is the calcium (and its optional beam-hardening halo).

Arrays are indexed ``[z, y, x]``; ``spacing`` is ``(dz, dy, dx)`` in mm and a voxel's
centre sits at ``index * spacing``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))
CALCIUM_KINDS = ("spotty", "eccentric", "concentric", "long")
_STEP_MM = 0.1  # centreline sampling step


@dataclass
class Calcification:
    """One calcified deposit inside a plaque, in the vessel's local cylindrical frame."""

    kind: str
    s_mm: float  # centre along the centreline
    theta: float  # centre angle (rad)
    half_length_mm: float
    half_arc_rad: float
    half_thickness_mm: float
    gap_mm: float  # soft plaque between lumen and calcium
    hu: float
    boxy: bool


@dataclass
class Plaque:
    """A wall thickening that narrows the lumen; optionally calcified."""

    s_mm: float
    half_length_mm: float
    theta: float
    half_angle_rad: float
    floor: float  # fraction of thickness kept all around (concentric plaques)
    thickness_frac: float  # peak thickness as a fraction of the local lumen radius
    hu: float
    calcium: Calcification | None = None


@dataclass
class Vessel:
    """A centreline sampled every 0.1 mm, with its nominal (disease-free) lumen radius."""

    points_mm: np.ndarray  # (n, 3) z, y, x
    radius_mm: np.ndarray  # (n,) nominal lumen radius
    wall_mm: float
    wall_hu: float
    lumen_hu: np.ndarray  # (n,) contrast along the vessel
    plaques: list[Plaque] = field(default_factory=list)
    parent: int | None = None

    @property
    def s_mm(self) -> np.ndarray:
        return np.arange(len(self.points_mm)) * _STEP_MM


@dataclass
class Lesion:
    """A plaque's position, for measuring stenosis where it matters."""

    vessel: int
    index: int  # centreline sample index at the plaque centre
    calcified: bool
    kind: str  # calcium kind, or "soft"
    point_mm: tuple[float, float, float]


@dataclass
class Phantom:
    """Rendered volumes and the geometry that produced them."""

    image: np.ndarray  # HU, with calcium
    truth: np.ndarray  # HU, calcium replaced by plaque tissue
    calcium_mask: np.ndarray  # bool, calcium covers at least half the voxel
    calcium_fraction: np.ndarray  # float32 partial-volume fraction of calcium
    lumen_mask: np.ndarray  # bool, true lumen covers more than half the voxel
    vessels: list[Vessel]
    lesions: list[Lesion]
    spacing: tuple[float, float, float]
    fwhm_mm: tuple[float, float, float]
    noise_sd: float
    seed: int
    settings: object | None = None  # how a world study was acquired (world.StudySettings); None here
    # What the calcium adds to the anatomy before the scanner sees it (HU, image − truth as rendered, before
    # beam hardening, blur and noise): the sharp calcium a subtraction estimates. World studies only.
    calcium_excess: np.ndarray | None = None
    # The scanner noise drawn into both image and truth (HU; world studies with noise only): truth − noise is
    # the calcium-free anatomy as the scanner blurs it, which a restoration could know at best.
    noise: np.ndarray | None = None

    def centreline_voxels(self, vessel: int) -> np.ndarray:
        """Centreline points of one vessel in (fractional) voxel indices."""
        return self.vessels[vessel].points_mm / np.asarray(self.spacing)


@dataclass
class PhantomOptions:
    """Ranges the phantom samples from; the defaults follow the literature."""

    n_vessels: tuple[int, int] = (1, 1)
    branch_probability: float = 0.5
    radius_mm: tuple[float, float] = (0.9, 2.5)
    lumen_hu: tuple[float, float] = (300.0, 600.0)
    soft_hu: tuple[float, float] = (30.0, 150.0)
    fat_hu: tuple[float, float] = (-120.0, -60.0)
    myocardium_hu: tuple[float, float] = (80.0, 150.0)
    calcium_hu: tuple[float, float] = (400.0, 2000.0)
    # relative frequency of CALCIUM_KINDS; None draws them evenly (training may weight the hard ones up)
    calcium_kind_weights: tuple[float, float, float, float] | None = None
    plaques_per_vessel: tuple[int, int] = (1, 3)
    calcified_probability: float = 0.75
    fwhm_inplane_mm: tuple[float, float] = (0.5, 1.1)
    fwhm_z_mm: tuple[float, float] = (0.5, 0.9)
    noise_sd: tuple[float, float] = (10.0, 50.0)
    chamber_probability: float = 0.3
    bone_probability: float = 0.25
    beam_hardening_probability: float = 0.5
    supersample: int = 2
    lesion_margin_mm: float = 3.0  # keep plaque centres this far inside the volume


def _smooth_curve(rng: np.random.Generator, start: np.ndarray, direction: np.ndarray,
                  length_mm: float, max_curvature: float = 0.08) -> np.ndarray:
    """Integrate a gently curving path: curvature is a sum of slow random sinusoids."""
    n = int(length_mm / _STEP_MM) + 1
    s = np.arange(n) * _STEP_MM
    curv = np.zeros((n, 3))
    for _ in range(3):
        freq = rng.uniform(0.02, 0.12)
        phase = rng.uniform(0, 2 * np.pi)
        axis = rng.normal(size=3)
        curv += np.outer(np.sin(2 * np.pi * freq * s + phase), axis)
    curv *= max_curvature / max(np.abs(curv).max(), 1e-6)
    pts = np.empty((n, 3))
    d = direction / np.linalg.norm(direction)
    p = start.astype(float).copy()
    for i in range(n):
        pts[i] = p
        k = curv[i] - np.dot(curv[i], d) * d
        d = d + k * _STEP_MM
        d /= np.linalg.norm(d)
        p = p + d * _STEP_MM
    return pts


def _frames(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tangent and parallel-transported normal/binormal, so angles do not twist."""
    t = np.gradient(points, axis=0)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    n = np.empty_like(t)
    ref = np.array([1.0, 0.0, 0.0]) if abs(t[0, 0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    v = ref - np.dot(ref, t[0]) * t[0]
    n[0] = v / np.linalg.norm(v)
    for i in range(1, len(t)):
        v = n[i - 1] - np.dot(n[i - 1], t[i]) * t[i]
        n[i] = v / np.linalg.norm(v)
    b = np.cross(t, n)
    return t, n, b


def _bump(u: np.ndarray) -> np.ndarray:
    """Smooth cos² bump on [-1, 1], zero outside."""
    out = np.cos(0.5 * np.pi * np.clip(u, -1.0, 1.0)) ** 2
    return np.where(np.abs(u) < 1.0, out, 0.0)


def _wrap(a: np.ndarray) -> np.ndarray:
    return (a + np.pi) % (2 * np.pi) - np.pi


class _VesselGeometry:
    """Local cylindrical coordinates of fine-grid points around one vessel."""

    def __init__(self, vessel: Vessel):
        self.vessel = vessel
        self.tree = cKDTree(vessel.points_mm)
        self.t, self.n, self.b = _frames(vessel.points_mm)
        self.reach = float(vessel.radius_mm.max() * 1.8 + vessel.wall_mm + 1.0)

    def render(self, pts: np.ndarray) -> dict[str, np.ndarray]:
        """Classify points as lumen, tissue (wall/plaque) and calcium for this vessel."""
        v = self.vessel
        dist, idx = self.tree.query(pts, distance_upper_bound=self.reach)
        near = np.isfinite(dist)
        out_lumen = np.zeros(len(pts), bool)
        out_tissue = np.zeros(len(pts), bool)
        out_calc = np.zeros(len(pts), bool)
        out_calc_hu = np.zeros(len(pts), np.float32)
        out_tissue_hu = np.full(len(pts), v.wall_hu, np.float32)
        out_lumen_hu = np.zeros(len(pts), np.float32)
        if not near.any():
            return dict(lumen=out_lumen, tissue=out_tissue, calcium=out_calc,
                        calcium_hu=out_calc_hu, tissue_hu=out_tissue_hu, lumen_hu=out_lumen_hu)
        i = idx[near]
        d = pts[near] - v.points_mm[i]
        along = np.einsum("ij,ij->i", d, self.t[i])
        perp = d - along[:, None] * self.t[i]
        r = np.linalg.norm(perp, axis=1)
        theta = np.arctan2(np.einsum("ij,ij->i", perp, self.b[i]),
                           np.einsum("ij,ij->i", perp, self.n[i]))
        s = i * _STEP_MM
        r0 = v.radius_mm[i]
        thick = np.zeros_like(r)
        plaque_hu = np.full(r.shape, v.wall_hu)
        for p in v.plaques:
            ang = _bump(_wrap(theta - p.theta) / p.half_angle_rad)
            prof = _bump((s - p.s_mm) / p.half_length_mm) * (p.floor + (1 - p.floor) * ang)
            t_here = p.thickness_frac * r0 * prof
            plaque_hu = np.where(t_here > 0.05, p.hu, plaque_hu)
            thick = np.maximum(thick, t_here)
        r_lumen = np.maximum(r0 - thick, 0.12 * r0)
        r_outer = r0 + v.wall_mm + 0.3 * thick
        lumen = r < r_lumen
        tissue = (~lumen) & (r < r_outer)
        calc = np.zeros_like(lumen)
        calc_hu = np.zeros(r.shape, np.float32)
        for p in v.plaques:
            c = p.calcium
            if c is None:
                continue
            power = 4 if c.boxy else 2
            r_mid = r_lumen + c.gap_mm + c.half_thickness_mm
            arc = _wrap(theta - c.theta) / c.half_arc_rad
            q = (np.abs((s - c.s_mm) / c.half_length_mm) ** power + np.abs(arc) ** power
                 + ((r - r_mid) / c.half_thickness_mm) ** 2)
            hit = tissue & (q <= 1.0)
            calc |= hit
            calc_hu = np.where(hit, c.hu, calc_hu)
        out_lumen[near] = lumen
        out_tissue[near] = tissue
        out_calc[near] = calc
        out_calc_hu[near] = calc_hu
        out_tissue_hu[near] = plaque_hu
        out_lumen_hu[near] = v.lumen_hu[i]
        return dict(lumen=out_lumen, tissue=out_tissue, calcium=out_calc,
                    calcium_hu=out_calc_hu, tissue_hu=out_tissue_hu, lumen_hu=out_lumen_hu)


def _make_plaque(rng: np.random.Generator, s_mm: float, opts: PhantomOptions,
                 calcified: bool) -> Plaque:
    if not calcified:
        kind = "soft"
    elif opts.calcium_kind_weights is None:
        kind = str(rng.choice(CALCIUM_KINDS))
    else:
        w = np.asarray(opts.calcium_kind_weights, float)
        kind = str(rng.choice(CALCIUM_KINDS, p=w / w.sum()))
    concentric = kind == "concentric" or (kind == "soft" and rng.random() < 0.3)
    half_length = rng.uniform(2.0, 5.0)
    if kind == "long":
        half_length = rng.uniform(6.5, 10.0)
    plaque = Plaque(
        s_mm=s_mm, half_length_mm=half_length, theta=rng.uniform(-np.pi, np.pi),
        half_angle_rad=np.pi if concentric else rng.uniform(0.6, 1.6),
        floor=rng.uniform(0.3, 0.7) if concentric else 0.0,
        thickness_frac=rng.uniform(0.25, 0.75), hu=rng.uniform(*opts.soft_hu))
    if calcified:
        if kind == "spotty":
            hl, ha, ht, boxy = rng.uniform(0.7, 1.5), rng.uniform(0.35, 0.7), rng.uniform(0.35, 0.6), False
        elif kind == "eccentric":
            hl, ha, ht, boxy = rng.uniform(1.2, 3.0), rng.uniform(0.5, 1.3), rng.uniform(0.3, 0.6), False
        elif kind == "concentric":
            hl, ha, ht, boxy = rng.uniform(1.0, 2.5), rng.uniform(2.6, 3.2), rng.uniform(0.25, 0.45), True
        else:  # long: over 10 mm
            hl, ha, ht, boxy = rng.uniform(5.2, half_length - 0.8), rng.uniform(0.35, 1.0), \
                rng.uniform(0.25, 0.45), True
        plaque.calcium = Calcification(
            kind=kind, s_mm=s_mm + rng.uniform(-0.3, 0.3), theta=plaque.theta + rng.uniform(-0.2, 0.2),
            half_length_mm=hl, half_arc_rad=ha, half_thickness_mm=ht,
            gap_mm=rng.uniform(0.0, 0.25), hu=rng.uniform(*opts.calcium_hu), boxy=boxy)
    return plaque


def _inside(p: np.ndarray, extent: np.ndarray, margin: float) -> bool:
    return bool(np.all(p >= margin) and np.all(p <= extent - margin))


def _make_vessels(rng: np.random.Generator, extent: np.ndarray, opts: PhantomOptions) -> list[Vessel]:
    vessels: list[Vessel] = []
    n_main = int(rng.integers(opts.n_vessels[0], opts.n_vessels[1] + 1))
    diag = float(np.linalg.norm(extent))
    for _ in range(n_main):
        centre = extent * rng.uniform(0.3, 0.7, size=3)
        direction = rng.normal(size=3)
        half = diag * 0.5 + 6.0
        fwd = _smooth_curve(rng, centre, direction, half)
        back = _smooth_curve(rng, centre, -direction, half)
        pts = np.concatenate([back[::-1], fwd[1:]])
        vessels.append(_finish_vessel(rng, pts, rng.uniform(*opts.radius_mm), opts, None))
        if rng.random() < opts.branch_probability:
            parent = vessels[-1]
            inside = [i for i, p in enumerate(parent.points_mm) if _inside(p, extent, 4.0)]
            if inside:
                j = int(rng.choice(inside))
                t, n, _ = _frames(parent.points_mm[max(j - 5, 0): j + 6])
                ang = rng.uniform(0.5, 1.2)
                rot = rng.uniform(0, 2 * np.pi)
                perp = n[len(n) // 2] * np.cos(rot) + np.cross(t[len(t) // 2], n[len(n) // 2]) * np.sin(rot)
                direction = np.cos(ang) * t[len(t) // 2] + np.sin(ang) * perp
                pts = _smooth_curve(rng, parent.points_mm[j], direction, diag + 6.0)
                radius = max(opts.radius_mm[0], parent.radius_mm[j] * rng.uniform(0.55, 0.85))
                vessels.append(_finish_vessel(rng, pts, radius, opts, len(vessels) - 1))
    for vi, v in enumerate(vessels):
        candidates = [i for i, p in enumerate(v.points_mm) if _inside(p, extent, opts.lesion_margin_mm)]
        if v.parent is not None:  # keep plaques off the ostium, where geometry is ambiguous
            candidates = [i for i in candidates if i * _STEP_MM > 3 * v.radius_mm[0] + 3.0]
        if not candidates:
            continue
        n_plaques = int(rng.integers(opts.plaques_per_vessel[0], opts.plaques_per_vessel[1] + 1))
        if vi > 0 and v.parent is not None:
            n_plaques = min(n_plaques, 1)
        for _ in range(n_plaques):
            j = int(rng.choice(candidates))
            s = j * _STEP_MM
            p = _make_plaque(rng, s, opts, rng.random() < opts.calcified_probability)
            if all(abs(s - q.s_mm) > p.half_length_mm + q.half_length_mm for q in v.plaques):
                v.plaques.append(p)
    return vessels


def _finish_vessel(rng: np.random.Generator, pts: np.ndarray, radius: float,
                   opts: PhantomOptions, parent: int | None) -> Vessel:
    n = len(pts)
    u = np.linspace(0.0, 1.0, n)
    taper = rng.uniform(0.0, 0.3)
    radius_mm = radius * (1.0 - taper * u)
    radius_mm = np.maximum(radius_mm, opts.radius_mm[0])
    base = rng.uniform(*opts.lumen_hu)
    grad = rng.uniform(-0.08, 0.08)
    lumen_hu = base * (1.0 + grad * (u - 0.5))
    return Vessel(points_mm=pts, radius_mm=radius_mm, wall_mm=rng.uniform(0.25, 0.5),
                  wall_hu=rng.uniform(*opts.soft_hu), lumen_hu=lumen_hu.astype(np.float32),
                  parent=parent)


@dataclass
class _Background:
    """Myocardium half-space, an optional contrast chamber and an optional rib."""

    fat_hu: float
    myo_normal: np.ndarray
    myo_offset: float
    myo_hu: float
    chamber: tuple[np.ndarray, float, float] | None  # centre, radius, HU
    bone: tuple[np.ndarray, np.ndarray, float, float, float, float] | None
    # point, axis, radius, cortex thickness, cortex HU, marrow HU

    def render(self, pts: np.ndarray) -> np.ndarray:
        hu = np.full(len(pts), self.fat_hu, np.float32)
        hu[pts @ self.myo_normal > self.myo_offset] = self.myo_hu
        if self.chamber is not None:
            c, r, h = self.chamber
            hu[np.linalg.norm(pts - c, axis=1) < r] = h
        if self.bone is not None:
            p0, axis, r, cortex, cort_hu, marrow_hu = self.bone
            d = pts - p0
            rr = np.linalg.norm(d - np.outer(d @ axis, axis), axis=1)
            hu[rr < r] = cort_hu
            hu[rr < r - cortex] = marrow_hu
        return hu


def _make_background(rng: np.random.Generator, extent: np.ndarray, vessels: list[Vessel],
                     opts: PhantomOptions) -> _Background:
    pts = np.concatenate([v.points_mm for v in vessels])
    rad = np.concatenate([v.radius_mm + v.wall_mm for v in vessels])
    tree = cKDTree(pts)
    normal = rng.normal(size=3)
    normal /= np.linalg.norm(normal)
    offset = float(np.max(pts @ normal + rad)) + rng.uniform(0.8, 4.0)
    chamber = None
    if rng.random() < opts.chamber_probability:
        for _ in range(20):
            c = extent * rng.uniform(-0.3, 1.3, size=3)
            r = rng.uniform(6.0, 20.0)
            d, i = tree.query(c)
            if d - r > rad[i] + 3.0:
                chamber = (c, r, float(rng.uniform(*opts.lumen_hu)))
                break
    bone = None
    if rng.random() < opts.bone_probability:
        for _ in range(20):
            p0 = extent * rng.uniform(-0.2, 1.2, size=3)
            axis = rng.normal(size=3)
            axis /= np.linalg.norm(axis)
            r = rng.uniform(3.0, 7.0)
            d = pts - p0
            rr = np.linalg.norm(d - np.outer(d @ axis, axis), axis=1)
            if np.all(rr - rad > r + 5.0):
                bone = (p0, axis, r, rng.uniform(0.8, 1.5), float(rng.uniform(1000, 1500)),
                        float(rng.uniform(200, 400)))
                break
    return _Background(fat_hu=float(rng.uniform(*opts.fat_hu)), myo_normal=normal, myo_offset=offset,
                       myo_hu=float(rng.uniform(*opts.myocardium_hu)), chamber=chamber, bone=bone)


def _render_slab(z0: int, z1: int, shape: tuple[int, int, int], spacing: np.ndarray, ss: int,
                 geoms: list[_VesselGeometry], bg: _Background) -> dict[str, np.ndarray]:
    """Render native slices [z0, z1): voxels near a vessel on an ss-times finer grid, averaged down.

    Partial volume matters at the lumen, wall and calcium edges, which are all near a
    vessel; elsewhere the background is smooth and rendered at voxel centres. That keeps
    a 512×512×256 study to seconds per slab instead of billions of sub-voxel samples.
    """
    nz = z1 - z0
    native = np.stack(np.meshgrid(np.arange(z0, z1) * spacing[0], np.arange(shape[1]) * spacing[1],
                                  np.arange(shape[2]) * spacing[2], indexing="ij"), axis=-1).reshape(-1, 3)
    half_diag = 0.5 * float(np.linalg.norm(spacing))
    near_by_geom = []
    for g in geoms:
        dist, _ = g.tree.query(native, distance_upper_bound=g.reach + half_diag)
        near_by_geom.append(np.isfinite(dist))
    near_any = np.logical_or.reduce(near_by_geom) if near_by_geom else np.zeros(len(native), bool)
    truth_n = bg.render(native)
    image_n = truth_n.copy()
    lumen_n = np.zeros(len(native), np.float32)
    calc_n = np.zeros(len(native), np.float32)
    voxels = np.flatnonzero(near_any)
    if voxels.size:
        offs = (np.arange(ss) + 0.5) / ss - 0.5
        sub = np.stack(np.meshgrid(offs, offs, offs, indexing="ij"), axis=-1).reshape(-1, 3) * spacing
        k = len(sub)
        grid = (native[voxels][:, None, :] + sub[None]).reshape(-1, 3)
        truth = bg.render(grid)
        lumen = np.zeros(len(grid), bool)
        calc = np.zeros(len(grid), bool)
        calc_hu = np.zeros(len(grid), np.float32)
        for g, near in zip(geoms, near_by_geom):
            mine = np.repeat(near[voxels], k)
            if not mine.any():
                continue
            idx = np.flatnonzero(mine)
            out = g.render(grid[idx])
            t = out["tissue"] & ~lumen[idx]
            truth[idx[t]] = out["tissue_hu"][t]
            calc[idx[out["calcium"]]] = True
            calc_hu[idx[out["calcium"]]] = out["calcium_hu"][out["calcium"]]
            lumen[idx[out["lumen"]]] = True
            truth[idx[out["lumen"]]] = out["lumen_hu"][out["lumen"]]
        calc &= ~lumen
        image = np.where(calc, calc_hu, truth)

        def down(a: np.ndarray) -> np.ndarray:
            return a.reshape(-1, k).mean(axis=1, dtype=np.float32)

        truth_n[voxels] = down(truth)
        image_n[voxels] = down(image)
        lumen_n[voxels] = down(lumen.astype(np.float32))
        calc_n[voxels] = down(calc.astype(np.float32))
    cube = (nz, shape[1], shape[2])
    return dict(image=image_n.reshape(cube), truth=truth_n.reshape(cube), lumen=lumen_n.reshape(cube),
                calcium=calc_n.reshape(cube))


def render(shape: tuple[int, int, int], spacing: np.ndarray, supersample: int, geoms: list, bg: _Background,
           slab: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Acquired and truth HU, lumen and calcium fractions of a whole volume, slab by slab (before blur).

    ``geoms``: anything with ``_VesselGeometry``'s ``tree``, ``reach`` and ``render`` (the
    calibrated world's lesions use the same slabs).
    """
    out = [np.empty(shape, np.float32) for _ in range(4)]
    for z0 in range(0, shape[0], slab):
        z1 = min(z0 + slab, shape[0])
        part = _render_slab(z0, z1, shape, spacing, supersample, geoms, bg)
        for arr, key in zip(out, ("image", "truth", "lumen", "calcium")):
            arr[z0:z1] = part[key]
    return tuple(out)


def _correlated_noise(rng: np.random.Generator, shape: tuple[int, int, int], sd: float) -> np.ndarray:
    """Noise with the fine grain of filtered back-projection: white noise, low-passed."""
    n = rng.standard_normal(shape).astype(np.float32)
    n = ndimage.gaussian_filter(n, sigma=rng.uniform(0.6, 1.0))
    n /= max(float(n.std()), 1e-6)
    return n * sd


def generate(shape: tuple[int, int, int] = (48, 48, 48),
             spacing: tuple[float, float, float] = (0.47, 0.47, 0.47),
             seed: int = 0, options: PhantomOptions | None = None,
             slab: int = 16) -> Phantom:
    """Render one phantom volume; the same seed always gives the same volume."""
    opts = options or PhantomOptions()
    rng = np.random.default_rng(seed)
    sp = np.asarray(spacing, float)
    extent = (np.asarray(shape) - 1) * sp
    vessels = _make_vessels(rng, extent, opts)
    bg = _make_background(rng, extent, vessels, opts)
    geoms = [_VesselGeometry(v) for v in vessels]
    image, truth, lumen, calc = render(shape, sp, opts.supersample, geoms, bg, slab)

    fwhm = (float(rng.uniform(*opts.fwhm_z_mm)), float(rng.uniform(*opts.fwhm_inplane_mm)))
    fwhm_mm = (fwhm[0], fwhm[1], fwhm[1])
    sigma = [f * FWHM_TO_SIGMA / s for f, s in zip(fwhm_mm, sp)]
    if rng.random() < opts.beam_hardening_probability:
        # Mild darkening beside dense calcium; only the acquired image has it.
        density = calc * np.clip(image - 300.0, 0.0, None) / 1000.0
        halo = ndimage.gaussian_filter(density, sigma=0.6 / sp)
        image -= rng.uniform(15.0, 50.0) * halo / max(float(halo.max()), 1e-6) * (calc < 0.5)
    image = ndimage.gaussian_filter(image, sigma=sigma)
    truth = ndimage.gaussian_filter(truth, sigma=sigma)
    noise_sd = float(rng.uniform(*opts.noise_sd))
    noise = _correlated_noise(rng, shape, noise_sd)
    image += noise
    truth += noise
    lesions = []
    for vi, v in enumerate(vessels):
        for p in v.plaques:
            j = int(round(p.s_mm / _STEP_MM))
            lesions.append(Lesion(vessel=vi, index=j, calcified=p.calcium is not None,
                                  kind=p.calcium.kind if p.calcium else "soft",
                                  point_mm=tuple(float(x) for x in v.points_mm[j])))
    return Phantom(image=image, truth=truth, calcium_mask=calc >= 0.5, calcium_fraction=calc,
                   lumen_mask=lumen > 0.5, vessels=vessels, lesions=lesions,
                   spacing=tuple(float(x) for x in sp), fwhm_mm=fwhm_mm, noise_sd=noise_sd, seed=seed)
