"""Measure a reconstruction kernel's MTF50 and edge lift from a phantom scan (site commissioning).

Why: the subtraction engine blurs its calcium estimate by the scanner's own transfer function, which a
site states per reconstruction kernel in ``[engine.scanner_kernels]`` (MTF50) and
``[engine.scanner_edge_enhance]`` (the mid-frequency lift). Assumed too soft, calcium is over-removed
and stenoses over-called; the lift is what draws the dark rim beside calcium, and a vendor's data sheet
rarely gives it. This measures both on the site's own scanner, from any phantom with a round edge.

Method: the circular-edge transfer function (as in AAPM TG-233): a rod or round insert parallel to z, of
uniform material in a uniform surround. The edge is found (a Hough transform that follows the gradient),
the sectors of it where both sides are flat are kept (a rod touching a wall is used where it does not),
the centre is refined slice by slice, and the pixels' values against their distance from the centre give
an edge profile oversampled far below the pixel size. That profile is fitted with the subtraction's own
model (``ScannerBlur``: a Gaussian core ``g`` times ``1 + lift (1 - g)``) applied to a disc, through a
Hankel transform, so small rods are measured as exactly as large inserts. The fit gives the MTF50, the
lift and the disc's radius at once; fits on the two halves of the slices (or of the circle) say how
repeatable it is.

Only the in-plane transfer is measured: the slice profile needs a ramp or a bead, and the engine's
``slice_fwhm_mm`` is not a per-kernel table. The scan should be a phantom at the site's cardiac dose and
field of view; a reconstruction's pixels are taken as samples of the blurred object (no pixel aperture).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dicom_node.pipeline.series import Series, SeriesError, load_hu, read_ct_series
from dicom_node.pipeline.subtract import ScannerBlur, kernel_key

SECTORS = 72  # 5 degrees each: a wall touching the insert costs only the sectors it touches
EDGE_HALF_WIDTH_MM = 5.0  # the profile is taken this far either side of the edge
BIN_MM = 0.05  # the oversampled profile's bin width
PADDING_HU = -1500.0  # below any material: the reconstruction circle's outside, never a phantom's edge
MTF50_BOUNDS = (1.5, 12.0)  # lp/cm: every CT kernel, soft to ultra-high resolution
LIFT_BOUNDS = (0.0, 2.0)  # ScannerBlur's range
CLIPPED_SHARE = 0.002  # above this share of an edge's pixels at the series' floor, its dark side is clipped


class MeasureError(ValueError):
    """No round edge to measure, or one too poor to trust; the message says why."""


@dataclass(frozen=True)
class Circle:
    """A round edge in a slice: centre (mm, along the image's columns and rows from pixel [0, 0]) and radius."""

    x_mm: float
    y_mm: float
    radius_mm: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.x_mm) and math.isfinite(self.y_mm)):
            raise ValueError("a circle's centre must be finite")
        if not 0.5 <= self.radius_mm <= 200.0:
            raise ValueError(f"radius {self.radius_mm} mm is not a phantom insert's (0.5-200 mm)")

    @classmethod
    def parse(cls, text: str) -> Circle:
        """``X,Y,R`` in mm (as ``--circle`` takes it)."""
        parts = [p for p in text.replace(" ", "").split(",") if p]
        if len(parts) != 3:
            raise ValueError(f"a circle is X,Y,R in mm, not {text!r}")
        return cls(*(float(p) for p in parts))


@dataclass(frozen=True)
class EdgeFit:
    """The model's fit to one edge profile."""

    mtf50_lp_cm: float
    edge_enhance: float
    radius_mm: float
    inside_hu: float
    outside_hu: float
    rms_hu: float  # the bins' residual, weighted as fitted


@dataclass(frozen=True)
class KernelMeasurement:
    """What one phantom series says of its kernel, with the evidence a physicist checks before using it."""

    kernel: str  # the series' ConvolutionKernel ("" when not stated)
    mtf50_lp_cm: float
    edge_enhance: float
    circle: Circle
    inside_hu: float
    outside_hu: float
    rms_hu: float
    slices: int
    sectors: int  # of SECTORS, where the edge is clean on the slab
    samples: int
    halves: tuple[EdgeFit, EdgeFit]  # fits on the slices' two halves (or the circle's, with under 4 slices)
    pixel_mm: float
    series_uid: str = ""
    warnings: tuple[str, ...] = field(default=())
    # the oversampled edge profile (radius mm, mean HU, the fitted model's HU): for a physicist's plot, not output
    profile: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(default=None, repr=False, compare=False)

    @property
    def contrast_hu(self) -> float:
        return self.inside_hu - self.outside_hu

    def as_dict(self) -> dict:
        out = asdict(self)
        out.pop("profile")
        out["contrast_hu"] = self.contrast_hu
        return out

    def summary(self) -> str:
        """What was measured and from what, in a few lines (the warnings last)."""
        c = self.circle
        a, b = self.halves
        lines = [
            f"Kernel {self.kernel or '(not stated)'}: MTF50 {self.mtf50_lp_cm:.2f} lp/cm, "
            f"edge lift {self.edge_enhance:.2f}",
            f"  edge: radius {c.radius_mm:.2f} mm at x {c.x_mm:.1f}, y {c.y_mm:.1f} mm; "
            f"inside {self.inside_hu:.0f} HU, outside {self.outside_hu:.0f} HU",
            f"  from {self.sectors} of {SECTORS} sectors, {self.slices} slice(s), {self.samples} pixels "
            f"({self.pixel_mm:.3f} mm); fit residual {self.rms_hu:.1f} HU",
            f"  halves: MTF50 {a.mtf50_lp_cm:.2f} / {b.mtf50_lp_cm:.2f} lp/cm, lift {a.edge_enhance:.2f} / "
            f"{b.edge_enhance:.2f}",
        ]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the model

def _frequencies(r_max_mm: float, radius_mm: float) -> np.ndarray:
    """Radial frequencies (cycles/mm) fine enough for the Bessel products and far enough for any kernel's MTF."""
    blur = ScannerBlur(mtf50_lp_cm=MTF50_BOUNDS[1], edge_enhance=LIFT_BOUNDS[1])
    rho_max = math.sqrt(math.log(1e5 * (1 + LIFT_BOUNDS[1])) / (2 * math.pi ** 2)) / blur.core_sigma_mm()
    step = 1.0 / (10.0 * (radius_mm + r_max_mm + 1.0))
    return np.arange(0.5 * step, rho_max, step)


def aperture_mtf(rho: np.ndarray, pixel_mm: float) -> np.ndarray:
    """A square pixel's averaging (sinc x sinc), averaged over directions: what drawing an object by its pixels'
    area shares adds to a kernel's blur. A reconstruction samples at pixel centres and adds none; a phantom
    rendered by area shares (the lab's world) does, and its nominal kernels do not count it.
    """
    if pixel_mm <= 0:
        return np.ones_like(rho)
    theta = (np.arange(32) + 0.5) / 32 * (np.pi / 2)
    fx, fy = np.outer(rho, np.cos(theta)) * pixel_mm, np.outer(rho, np.sin(theta)) * pixel_mm
    return (np.sinc(fx) * np.sinc(fy)).mean(axis=1)


def disc_profile(r_mm: np.ndarray, radius_mm: float, blur: ScannerBlur, rho: np.ndarray | None = None,
                 j0: np.ndarray | None = None, aperture: np.ndarray | float = 1.0) -> np.ndarray:
    """A uniform disc of ``radius_mm`` (1 inside, 0 outside) blurred by ``blur``'s in-plane MTF, at radii ``r_mm``.

    The 2D Fourier transform of a disc is ``R J1(2 pi R rho) / rho``; back through the radially symmetric
    (Hankel) transform: ``2 pi R  integral MTF(rho) J1(2 pi R rho) J0(2 pi r rho) d rho``. ``rho`` and the
    ``J0`` matrix may be given (the fit keeps them while the radius and the MTF change); ``aperture`` multiplies
    the MTF on ``rho`` (``aperture_mtf``).
    """
    from scipy.special import j0 as bessel_j0
    from scipy.special import j1 as bessel_j1

    r = np.asarray(r_mm, float)
    if rho is None:
        rho = _frequencies(float(r.max(initial=0.0)), radius_mm)
    if j0 is None:
        j0 = bessel_j0(2 * np.pi * np.outer(r, rho))
    step = float(rho[1] - rho[0])
    weights = blur.mtf(rho) * aperture * bessel_j1(2 * np.pi * radius_mm * rho) * (2 * np.pi * radius_mm * step)
    return j0 @ weights


def fit_edge(r_mm: np.ndarray, values: np.ndarray, radius_mm: float, counts: np.ndarray | None = None,
             aperture_mm: float = 0.0) -> EdgeFit:
    """Fit the blurred disc to an edge profile: MTF50, lift and radius by least squares, the two levels linearly.

    Several starts (soft and sharp, lifted and not): the lift and the core's width trade against each
    other near the edge, and a single start can stop in the wrong valley.
    """
    return _fit_edge(r_mm, values, radius_mm, counts, aperture_mm)[0]


def _fit_edge(r_mm: np.ndarray, values: np.ndarray, radius_mm: float, counts: np.ndarray | None,
              aperture_mm: float) -> tuple[EdgeFit, np.ndarray]:
    """``fit_edge``, and the fitted model's HU at ``r_mm`` (the profile plot's curve)."""
    from scipy.optimize import least_squares
    from scipy.special import j0 as bessel_j0

    r = np.asarray(r_mm, float)
    v = np.asarray(values, float)
    w = np.sqrt(np.ones_like(r) if counts is None else np.asarray(counts, float))
    rho = _frequencies(float(r.max()), radius_mm + 1.0)
    j0 = bessel_j0(2 * np.pi * np.outer(r, rho))
    aperture = aperture_mtf(rho, aperture_mm)

    def levels(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = disc_profile(r, p[2], ScannerBlur(mtf50_lp_cm=p[0], edge_enhance=p[1]), rho, j0, aperture)
        a = np.stack([np.ones_like(d), d], axis=1) * w[:, None]
        coef, *_ = np.linalg.lstsq(a, v * w, rcond=None)
        return coef, a @ coef - v * w

    best = None
    lo = [MTF50_BOUNDS[0], LIFT_BOUNDS[0], max(0.5, radius_mm - 1.5)]
    hi = [MTF50_BOUNDS[1], LIFT_BOUNDS[1], radius_mm + 1.5]
    for start in ((3.5, 0.0), (5.0, 0.5), (7.0, 1.0)):
        res = least_squares(lambda p: levels(p)[1], np.array([start[0], start[1], radius_mm]),
                            bounds=(lo, hi), x_scale=[1.0, 0.3, 0.3], diff_step=1e-4)
        if best is None or res.cost < best.cost:
            best = res
    coef, resid = levels(best.x)
    rms = float(np.sqrt(np.sum(resid ** 2) / np.sum(w ** 2)))
    return (EdgeFit(mtf50_lp_cm=float(best.x[0]), edge_enhance=float(best.x[1]), radius_mm=float(best.x[2]),
                    inside_hu=float(coef[0] + coef[1]), outside_hu=float(coef[0]), rms_hu=rms),
            resid / w + v)


# ----------------------------------------------------------------------------------------- finding an edge

def _usable(image: np.ndarray) -> np.ndarray:
    """Pixels whose neighbourhood holds no padding (the reconstruction circle's edge is no kernel's)."""
    from scipy import ndimage

    return ~ndimage.binary_dilation(image < PADDING_HU, iterations=4)


def find_circles(image: np.ndarray, pixel_mm: tuple[float, float], r_min_mm: float = 1.5, r_max_mm: float = 80.0,
                 limit: int = 5) -> list[tuple[Circle, float]]:
    """Round edges in a slice (best first), each with the share of its circumference that votes for it.

    A Hough transform that follows the gradient: each strong edge pixel votes, for every radius, for the
    one centre its gradient points at (inwards for a bright insert, outwards for a dark one).
    """
    from scipy import ndimage

    dy, dx = pixel_mm
    smooth = ndimage.gaussian_filter(image.astype(np.float64), 1.0)
    gy, gx = np.gradient(smooth, dy, dx)
    mag = np.hypot(gy, gx)
    ok = _usable(image)
    strong = ok & (mag > max(0.25 * float(np.percentile(mag[ok], 99.9)) if ok.any() else 0.0, 30.0))
    ys, xs = np.nonzero(strong)
    if len(ys) == 0:
        return []
    uy, ux = gy[ys, xs] / mag[ys, xs], gx[ys, xs] / mag[ys, xs]
    py, px = ys * dy, xs * dx
    step = max(0.5, min(dy, dx))
    found: list[tuple[Circle, float]] = []
    shape = image.shape
    for radius in np.arange(r_min_mm, min(r_max_mm, 0.5 * min(shape[0] * dy, shape[1] * dx)), step):
        circumference_px = 2 * np.pi * radius / min(dy, dx)
        for sign in (1.0, -1.0):  # +: bright inside (the gradient points in); -: dark inside
            cy = np.rint((py + sign * radius * uy) / dy).astype(int)
            cx = np.rint((px + sign * radius * ux) / dx).astype(int)
            inside = (cy >= 0) & (cy < shape[0]) & (cx >= 0) & (cx < shape[1])
            acc = np.zeros(shape, np.float64)
            np.add.at(acc, (cy[inside], cx[inside]), 1.0)
            acc = ndimage.uniform_filter(acc, 3) * 9.0  # a centre smeared over its neighbours by rounding
            k = int(np.argmax(acc))
            share = float(acc.flat[k]) / circumference_px
            if share > 0.3:
                found.append((Circle(x_mm=(k % shape[1]) * dx, y_mm=(k // shape[1]) * dy, radius_mm=float(radius)),
                              share))
    # one circle per place: the best radius of neighbouring ones, ranked by the edge length that votes for it
    found.sort(key=lambda cs: -cs[1] * cs[0].radius_mm)
    kept: list[tuple[Circle, float]] = []
    for c, share in found:
        if all(math.hypot(c.x_mm - k.x_mm, c.y_mm - k.y_mm) > 0.5 * max(c.radius_mm, k.radius_mm)
               or abs(c.radius_mm - k.radius_mm) > 0.5 * max(c.radius_mm, k.radius_mm) for k, _ in kept):
            kept.append((c, share))
    return kept[:limit]


def _polar(shape: tuple[int, int], pixel_mm: tuple[float, float], cx: float, cy: float) -> tuple[np.ndarray, ...]:
    dy, dx = pixel_mm
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    oy, ox = yy * dy - cy, xx * dx - cx
    return np.hypot(oy, ox), (np.arctan2(oy, ox) % (2 * np.pi))


def clean_sectors(image: np.ndarray, pixel_mm: tuple[float, float], circle: Circle,
                  half_width_mm: float = EDGE_HALF_WIDTH_MM) -> tuple[np.ndarray, float, float]:
    """Which of the ``SECTORS`` show a clean step (flat either side, the common levels), and those levels.

    A sector is left out where the surround holds another object or a wall, where the insert touches
    something, or where the padding comes near.
    """
    r, theta = _polar(image.shape, pixel_mm, circle.x_mm, circle.y_mm)
    sector = (theta / (2 * np.pi) * SECTORS).astype(int) % SECTORS
    ok = _usable(image)
    margin = min(2.5, 0.6 * circle.radius_mm)
    inner = (r < circle.radius_mm - margin) & (r > circle.radius_mm - half_width_mm)
    outer = (r > circle.radius_mm + 2.5) & (r < circle.radius_mm + half_width_mm)
    band = np.abs(r - circle.radius_mm) < half_width_mm
    ins = np.full(SECTORS, np.nan)
    outs = np.full(SECTORS, np.nan)
    in_sd = np.full(SECTORS, np.nan)
    out_sd = np.full(SECTORS, np.nan)
    padded = np.zeros(SECTORS, bool)
    for s in range(SECTORS):
        here = sector == s
        padded[s] = bool((band & here & ~ok).any())
        a, b = image[inner & here], image[outer & here]
        if len(a) >= 3:
            ins[s], in_sd[s] = float(np.median(a)), float(np.std(a))
        if len(b) >= 3:
            outs[s], out_sd[s] = float(np.median(b)), float(np.std(b))
    if np.isnan(ins).sum() > SECTORS // 2:
        # a small rod: its inside is too short for a plateau; its level is the centre's
        centre = image[r < max(0.4 * circle.radius_mm, 0.6 * min(pixel_mm))]
        ins[:] = float(np.median(centre)) if len(centre) else np.nan
        in_sd[:] = 0.0
    inside, outside = float(np.nanmedian(ins)), float(np.nanmedian(outs))
    contrast = abs(inside - outside)
    noise = float(np.nanmedian(np.concatenate([in_sd, out_sd])))
    tol = max(0.08 * contrast, 3.0 * noise / math.sqrt(10.0))
    good = (~padded & (np.abs(ins - inside) < tol) & (np.abs(outs - outside) < tol)
            & (out_sd < max(2.0 * noise, 0.05 * contrast)) & (in_sd < max(2.0 * noise, 0.05 * contrast)))
    return good, inside, outside


def clipped_share(volume: np.ndarray, pixel_mm: tuple[float, float], circle: Circle,
                  half_width_mm: float = EDGE_HALF_WIDTH_MM) -> float:
    """The share of the edge band's pixels at the series' lowest value (padding aside): a stored range that clips.

    Air at -1000 HU with noise reaches a -1024 floor; the clipped values raise the dark side and, worse, the
    dark rim a lifted kernel draws beside the edge, so the lift reads low (the world's sharp kernel, lift 0.8,
    read 0.71 on a water-air edge stored from -1024 and 0.79 on a rod in water).
    """
    values = volume[volume > PADDING_HU]
    if values.size == 0:
        return 0.0
    floor = float(values.min())
    r, _ = _polar(volume.shape[-2:], pixel_mm, circle.x_mm, circle.y_mm)
    band = volume[:, np.abs(r - circle.radius_mm) < half_width_mm]
    band = band[band > PADDING_HU]
    return float(np.mean(band <= floor + 0.5)) if band.size else 0.0


def _refined_centre(image: np.ndarray, pixel_mm: tuple[float, float], circle: Circle, good: np.ndarray,
                    inside: float, outside: float) -> tuple[float, float, float] | None:
    """The slice's own centre and radius: a circle through the edge's half-level crossings on the clean sectors."""
    from scipy import ndimage

    dy, dx = pixel_mm
    half = 0.5 * (inside + outside)
    steps = np.arange(-3.0, 3.0, 0.05)
    points = []
    for s in np.flatnonzero(good):
        for frac in (0.25, 0.75):
            ang = (s + frac) / SECTORS * 2 * np.pi
            rr = circle.radius_mm + steps
            ys, xs = (circle.y_mm + rr * np.sin(ang)) / dy, (circle.x_mm + rr * np.cos(ang)) / dx
            prof = ndimage.map_coordinates(image, [ys, xs], order=1, mode="nearest")
            above = (prof - half) * np.sign(inside - outside) > 0  # on the inside's side of the half level
            cross = np.flatnonzero(above[:-1] & ~above[1:])
            if len(cross) != 1:
                continue
            i = cross[0]
            t = (prof[i] - half) / (prof[i] - prof[i + 1])
            r_edge = rr[i] + t * (rr[i + 1] - rr[i])
            points.append((circle.x_mm + r_edge * np.cos(ang), circle.y_mm + r_edge * np.sin(ang)))
    if len(points) < 8:
        return None
    p = np.asarray(points)
    # Kasa's algebraic circle fit: x^2 + y^2 = 2 a x + 2 b y + c
    a = np.column_stack([2 * p[:, 0], 2 * p[:, 1], np.ones(len(p))])
    sol, *_ = np.linalg.lstsq(a, (p ** 2).sum(axis=1), rcond=None)
    cx, cy = sol[0], sol[1]
    radius = math.sqrt(max(sol[2] + cx ** 2 + cy ** 2, 0.0))
    if math.hypot(cx - circle.x_mm, cy - circle.y_mm) > 1.0 or abs(radius - circle.radius_mm) > 1.0:
        return None
    return float(cx), float(cy), radius


# ------------------------------------------------------------------------------------------ the measurement

def _profile(r: np.ndarray, v: np.ndarray, radius: float, half_width_mm: float) -> tuple[np.ndarray, ...]:
    lo = max(0.0, radius - half_width_mm)
    edges = np.arange(lo, radius + half_width_mm + BIN_MM, BIN_MM)
    idx = np.digitize(r, edges) - 1
    keep = (idx >= 0) & (idx < len(edges) - 1)
    n = np.bincount(idx[keep], minlength=len(edges) - 1).astype(float)
    s = np.bincount(idx[keep], weights=v[keep], minlength=len(edges) - 1)
    rs = np.bincount(idx[keep], weights=r[keep], minlength=len(edges) - 1)
    ok = n > 0
    return rs[ok] / n[ok], s[ok] / n[ok], n[ok]


def measure_volume(volume: np.ndarray, spacing: tuple[float, float, float], kernel: str = "",
                   circle: Circle | None = None, half_width_mm: float = EDGE_HALF_WIDTH_MM,
                   series_uid: str = "", aperture_mm: float = 0.0) -> KernelMeasurement:
    """Measure the in-plane MTF50 and lift of ``volume`` (``[z, y, x]`` HU) from its best round edge (or ``circle``).

    The slices whose edge matches the slab's (the same levels and a centre within 1 mm) are pooled; a slice
    where the insert ends or changes is left out. ``aperture_mm``: a pixel averaging to count as not the
    kernel's (``aperture_mtf``; 0 for a scanner's reconstruction).
    """
    vol = np.asarray(volume, np.float32)
    if vol.ndim == 2:
        vol = vol[None]
    if vol.ndim != 3 or min(vol.shape[1:]) < 16:
        raise MeasureError(f"a volume of slices is needed, not shape {vol.shape}")
    pixel = (float(spacing[1]), float(spacing[2]))
    slab = np.median(vol, axis=0) if len(vol) > 1 else vol[0]
    if circle is None:
        candidates = find_circles(slab, pixel)
        if not candidates:
            raise MeasureError("no round edge found: scan a phantom with a rod or round insert parallel to the "
                               "table (or give --circle X,Y,R)")
        ranked = []
        for c, _ in candidates:
            good, inside, outside = clean_sectors(slab, pixel, c, half_width_mm)
            ranked.append((clipped_share(vol, pixel, c, half_width_mm) <= CLIPPED_SHARE,
                           good.sum() * c.radius_mm * abs(inside - outside), c))
        circle = max(ranked, key=lambda t: t[:2])[2]
    good, inside, outside = clean_sectors(slab, pixel, circle, half_width_mm)
    if good.sum() < SECTORS // 6:
        raise MeasureError(f"the edge at x {circle.x_mm:.1f}, y {circle.y_mm:.1f} mm (radius {circle.radius_mm:.1f} mm)"
                           f" is clean in only {int(good.sum())} of {SECTORS} sectors: choose an insert with a "
                           "uniform surround")
    refined = _refined_centre(slab, pixel, circle, good, inside, outside)
    if refined is not None:
        circle = Circle(*refined)
        good, inside, outside = clean_sectors(slab, pixel, circle, half_width_mm)
    per_slice = []
    for z in range(len(vol)):
        centre = _refined_centre(vol[z], pixel, circle, good, inside, outside)
        if centre is None:
            continue
        r, theta = _polar(vol[z].shape, pixel, centre[0], centre[1])
        sector = (theta / (2 * np.pi) * SECTORS).astype(int) % SECTORS
        sel = good[sector] & (np.abs(r - circle.radius_mm) < half_width_mm)
        if (vol[z][sel] <= PADDING_HU).any():
            continue  # the reconstruction circle cuts the edge in this slice
        deep = sel & (r < circle.radius_mm - min(2.5, 0.6 * circle.radius_mm))  # inside, clear of the edge
        level_in = float(np.median(vol[z][deep])) if deep.any() else inside
        if abs(level_in - inside) > 0.1 * abs(inside - outside):
            continue  # the insert ends or changes in this slice
        per_slice.append((z, r[sel], vol[z][sel].astype(np.float64), sector[sel]))
    if not per_slice:
        raise MeasureError("no slice shows the edge the slab shows (is the insert parallel to z?)")

    def fit(parts: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[EdgeFit, int, tuple[np.ndarray, ...]]:
        rs, vs = zip(*parts)
        r_all, v_all = np.concatenate(rs), np.concatenate(vs)
        pr, pv, n = _profile(r_all, v_all, circle.radius_mm, half_width_mm)
        edge, fitted = _fit_edge(pr, pv, circle.radius_mm, n, aperture_mm)
        return edge, len(r_all), (pr, pv, fitted)

    whole, samples, profile = fit((r, v) for _, r, v, _ in per_slice)
    # Repeatability: the upper and lower halves of the slices (alternate slices share their noise through the
    # slice profile and would agree too well), or with few slices the two halves of the circle.
    if len(per_slice) >= 4:
        mid = len(per_slice) // 2
        halves = (fit((r, v) for _, r, v, _ in per_slice[:mid])[0], fit((r, v) for _, r, v, _ in per_slice[mid:])[0])
    else:
        upper = [(r[s < SECTORS // 2], v[s < SECTORS // 2]) for _, r, v, s in per_slice]
        lower = [(r[s >= SECTORS // 2], v[s >= SECTORS // 2]) for _, r, v, s in per_slice]
        halves = (fit(upper)[0], fit(lower)[0])
    warnings = []
    clipped = clipped_share(vol, pixel, circle, half_width_mm)
    if clipped > CLIPPED_SHARE:
        warnings.append(f"{100 * clipped:.1f} % of the edge's pixels sit at the series' lowest value: the stored "
                        "range clips the dark side (air at -1024?), which flattens the dark rim and reads the lift "
                        "low; use an insert in water or tissue")
    contrast = abs(whole.inside_hu - whole.outside_hu)
    if contrast < 300:
        warnings.append(f"the edge's contrast is {contrast:.0f} HU: below 300 HU noise decides the lift; use a "
                        "denser insert (bone-equivalent, Teflon) or air")
    spread = abs(halves[0].mtf50_lp_cm - halves[1].mtf50_lp_cm) / whole.mtf50_lp_cm
    if spread > 0.05:
        warnings.append(f"the halves' MTF50 differ by {100 * spread:.0f} %: scan more slices or a longer insert")
    if abs(halves[0].edge_enhance - halves[1].edge_enhance) > 0.15:
        warnings.append("the halves' lifts differ by more than 0.15: the lift is not well determined")
    if whole.rms_hu > 0.05 * contrast:
        warnings.append(f"the fit leaves {whole.rms_hu:.0f} HU: the edge is not a clean disc (streaks, a wall, "
                        "beam hardening)")
    nyquist = 5.0 / max(pixel)  # lp/cm
    if whole.mtf50_lp_cm > 0.7 * nyquist:
        warnings.append(f"the MTF50 lies near the pixel grid's limit ({nyquist:.1f} lp/cm): reconstruct the "
                        "phantom with a smaller field of view")
    if not good.sum() >= SECTORS // 3:
        warnings.append(f"only {int(good.sum())} of {SECTORS} sectors are clean")
    return KernelMeasurement(kernel=kernel, mtf50_lp_cm=whole.mtf50_lp_cm, edge_enhance=whole.edge_enhance,
                             circle=Circle(circle.x_mm, circle.y_mm, whole.radius_mm), inside_hu=whole.inside_hu,
                             outside_hu=whole.outside_hu, rms_hu=whole.rms_hu, slices=len(per_slice),
                             sectors=int(good.sum()), samples=samples, halves=halves, pixel_mm=max(pixel),
                             series_uid=series_uid, warnings=tuple(warnings), profile=profile)


def _series(inputs: Iterable[str | Path], series_uid: str | None) -> list[Series]:
    try:
        found, notes = read_ct_series(inputs, include_derived=True)
    except OSError as exc:  # a path that is not there, or cannot be read
        raise MeasureError(str(exc)) from exc
    if series_uid:
        found = [s for s in found if s.uid == series_uid]
    if not found:
        raise MeasureError("no CT series found" + (f" ({notes[0]})" if notes else ""))
    return found


def _measure(series: Series, circle: Circle | None, aperture_mm: float) -> KernelMeasurement:
    try:
        volume = load_hu(series)
    except SeriesError as exc:
        raise MeasureError(str(exc)) from exc
    spacing = series.spacing if len(series.files) > 1 else (1.0,) + tuple(series.spacing[1:])
    return measure_volume(volume, spacing, kernel=series.kernel, circle=circle, series_uid=series.uid,
                          aperture_mm=aperture_mm)


def measure_series(inputs: Iterable[str | Path], series_uid: str | None = None,
                   circle: Circle | None = None, aperture_mm: float = 0.0) -> KernelMeasurement:
    """Measure the kernel of one phantom series on disk (DICOM files or folders), read as the node reads CT."""
    found = _series(inputs, series_uid)
    if len(found) > 1:
        listed = ", ".join(f"{s.uid} ({s.kernel or 'no kernel'})" for s in found)
        raise MeasureError(f"{len(found)} series found: choose one with --series ({listed})")
    return _measure(found[0], circle, aperture_mm)


def measure_study(inputs: Iterable[str | Path], series_uid: str | None = None, circle: Circle | None = None,
                  ) -> tuple[list[KernelMeasurement], list[str]]:
    """Measure every CT series under the inputs: a site scans the phantom once and reconstructs it with each
    of its kernels. Returns the measurements and a line for each series that could not be measured."""
    measured, problems = [], []
    for series in _series(inputs, series_uid):
        try:
            measured.append(_measure(series, circle, 0.0))
        except MeasureError as exc:
            problems.append(f"series {series.uid} ({series.kernel or 'no kernel'}): {exc}")
    return measured, problems


def kernel_tables(measured: Iterable[KernelMeasurement]) -> str:
    """The config lines for all measured kernels; several series of one kernel are averaged, and say so."""
    groups: dict[str, list[KernelMeasurement]] = {}
    unnamed = 0
    for m in measured:
        if not m.kernel:
            unnamed += 1  # nothing to match a series by: the default blur (scanner_mtf50_lp_cm) applies
            continue
        groups.setdefault(kernel_key(m.kernel), []).append(m)
    mtf, lift = ["[engine.scanner_kernels]"], ["[engine.scanner_edge_enhance]"]
    def line(name: str, values: list[float]) -> str:
        each = f"  # mean of {len(values)} series: " + ", ".join(f"{v:.2f}" for v in values) if len(values) > 1 else ""
        return f"{name} = {float(np.mean(values)):.2f}{each}"

    for ms in groups.values():
        name = json.dumps(ms[0].kernel)  # a TOML basic string is a JSON string
        mtf.append(line(name, [m.mtf50_lp_cm for m in ms]))
        lift.append(line(name, [m.edge_enhance for m in ms]))
    out = "\n".join(mtf) + "\n\n" + "\n".join(lift) + "\n"
    if unnamed:
        out += (f"# {unnamed} series state no ConvolutionKernel: a table cannot name them; they get "
                "scanner_mtf50_lp_cm\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dicom-node measure-kernel", description=__doc__.split("\n\n")[0])
    ap.add_argument("input", nargs="+",
                    help="the phantom scan: DICOM files or folders, one series per kernel (each is measured)")
    ap.add_argument("--series", help="measure only this SeriesInstanceUID")
    ap.add_argument("--circle", type=Circle.parse, help="X,Y,R in mm (from pixel [0,0]): the edge to use")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    args = ap.parse_args(argv)
    try:
        measured, problems = measure_study(args.input, args.series, args.circle)
    except MeasureError as exc:
        print(f"measure-kernel: {exc}")
        return 2
    tables = kernel_tables(measured) if measured else ""
    if args.json:
        print(json.dumps({"series": [m.as_dict() for m in measured], "problems": problems, "toml": tables}, indent=1))
    else:
        for m in measured:
            print(m.summary() + "\n")
        for line in problems:
            print(f"measure-kernel: {line}")
        if measured:
            print(("\n" if problems else "") + "For config.toml:\n" + tables, end="")
    return 0 if measured else 2
