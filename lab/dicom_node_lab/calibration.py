"""Calibration of the world's blooming: a vessel insert, read by the reader model.

A 3 mm vessel (lumen radius R = 1.5 mm, a 0.5 mm wall) whose calcium shell fills radii
R − d … R over an arc of A degrees, d = S·R: the insert XCIST simulates
(``xcist_insert.py``). The same insert is rasterised here (supersampled, so partial
volume is exact), blurred by the world's scanner (``physics``), and read by ``reader``;
XCIST's reconstructions of it are read the same way. The calcium's apparent width and the
over-call must agree within 20 % before the world's figures mean anything.

The insert is z-invariant: a 2D slice is stacked along z, and the reference vessel (same
lumen and wall, no calcium) gives the lumen level and the reference diameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dicom_node_lab import physics
from dicom_node_lab.reader import WHITE_LEVELS_HU, ReaderSettings, _diameters_at, lumen_level

INSERT_RADIUS_MM = 1.5
INSERT_WALL_MM = 0.5
STENOSES = (0.25, 0.50, 0.70)
ARCS_DEG = (90.0, 180.0, 360.0)


@dataclass(frozen=True)
class Insert:
    """One vessel insert: depth d = stenosis · R over an arc, in a background of one HU."""

    stenosis: float
    arc_deg: float
    calcium_hu: float
    lumen_hu: float = 400.0
    wall_hu: float = 50.0
    background_hu: float = 0.0
    radius_mm: float = INSERT_RADIUS_MM
    wall_mm: float = INSERT_WALL_MM

    def __post_init__(self) -> None:
        if not 0.0 <= self.stenosis < 1.0 or not 0.0 <= self.arc_deg <= 360.0:
            raise ValueError("stenosis in [0, 1) and an arc in [0, 360] degrees")

    def classify(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Lumen, calcium and wall masks at points (mm from the vessel centre; the arc points along +x)."""
        r = np.hypot(x, y)
        phi = np.abs(np.arctan2(y, x))
        in_arc = phi <= np.radians(self.arc_deg) / 2 + 1e-9
        d = self.stenosis * self.radius_mm
        calcium = in_arc & (r >= self.radius_mm - d) & (r <= self.radius_mm) & (self.calcium_hu > 0)
        lumen = (r < self.radius_mm) & ~calcium
        wall = (r >= self.radius_mm) & (r < self.radius_mm + self.wall_mm)
        return lumen, calcium, wall

    def slice(self, pixel_mm: float, size_mm: float = 12.0, supersample: int = 8, calcium: bool = True,
              offset_mm: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
        """The insert's HU on a square grid centred on the vessel (partial volume by supersampling)."""
        n = int(round(size_mm / pixel_mm)) | 1
        sub = (np.arange(supersample) + 0.5) / supersample - 0.5
        c = (np.arange(n) - n // 2) * pixel_mm
        yy = (c[:, None, None, None] + sub[None, None, :, None] * pixel_mm) - offset_mm[0]
        xx = (c[None, :, None, None] + sub[None, None, None, :] * pixel_mm) - offset_mm[1]
        yy, xx = np.broadcast_arrays(yy, xx)
        lumen, calc, wall = self.classify(xx, yy)
        hu = np.full(xx.shape, self.background_hu, np.float32)
        hu[wall] = self.wall_hu
        hu[lumen] = self.lumen_hu
        hu[calc] = self.calcium_hu if calcium else self.wall_hu
        return hu.mean(axis=(2, 3))


def stack(insert_slice: np.ndarray, reference_slice: np.ndarray, ref_slices: int = 8, lesion_slices: int = 16
          ) -> np.ndarray:
    """A z-invariant vessel: reference, insert, reference, as consecutive slices."""
    return np.concatenate([np.repeat(reference_slice[None], ref_slices, 0),
                           np.repeat(insert_slice[None], lesion_slices, 0),
                           np.repeat(reference_slice[None], ref_slices, 0)]).astype(np.float32)


def read_stack(volume: np.ndarray, pixel_mm: float, white_hu: float, ref_slices: int = 8,
               lesion_slices: int = 16, centre_px: tuple[float, float] | None = None) -> float:
    """Diameter stenosis (%) of a stacked insert by the reader: reference sections give level and diameter."""
    nz, ny, nx = volume.shape
    spacing = (pixel_mm, pixel_mm, pixel_mm)
    cy, cx = centre_px if centre_px is not None else ((ny - 1) / 2, (nx - 1) / 2)
    pts = np.stack([np.arange(nz) * pixel_mm, np.full(nz, cy * pixel_mm), np.full(nz, cx * pixel_mm)], axis=1)
    settings = ReaderSettings(white_hu=white_hu, smooth_mm=0.0)
    ref = np.arange(2, ref_slices - 2)
    mid = np.arange(ref_slices + 4, ref_slices + lesion_slices - 4)
    level = lumen_level(volume, spacing, pts[ref])
    d_ref = float(np.median(_diameters_at(volume, spacing, pts, ref, level, settings).min(axis=1)))
    d_les = float(np.median(_diameters_at(volume, spacing, pts, mid, level, settings).min(axis=1)))
    return 100.0 * (1.0 - d_les / d_ref) if d_ref > 0 else float("nan")


def apparent_width_mm(image: np.ndarray, pixel_mm: float, level_hu: float, centre_px: tuple[float, float],
                      direction: tuple[float, float] = (0.0, 1.0), reach_mm: float = 5.0) -> float:
    """Width of the calcium along a ray through its arc's centre, where it stands 100 HU above the lumen.

    Blooming as a reader meets it: the stretch of the ray where the image is brighter
    than the lumen + 100 HU (the reader's white level); the true width is d.
    """
    from scipy import ndimage

    r = np.arange(-reach_mm, reach_mm, 0.01)
    yy = centre_px[0] + r * direction[0] / pixel_mm
    xx = centre_px[1] + r * direction[1] / pixel_mm
    v = ndimage.map_coordinates(image, [yy, xx], order=1, mode="nearest")
    white = v > level_hu + WHITE_LEVELS_HU[0]
    pos = r[white & (r > 0)]
    return float(pos.max() - pos.min() + 0.01) if len(pos) else 0.0


def fast_reading(ins: Insert, kernel: physics.Kernel | None, pixel_mm: float, white_hu: float,
                 gaussian_fwhm_mm: float | None = None) -> dict[str, float]:
    """The fast phantom's reading of an insert: acquired, truth image (calcium as wall), geometry."""
    def blurred(sl: np.ndarray) -> np.ndarray:
        vol = np.repeat(sl[None], 3, 0)
        if gaussian_fwhm_mm is not None:
            from scipy import ndimage

            s = gaussian_fwhm_mm * physics.FWHM_TO_SIGMA / pixel_mm
            return ndimage.gaussian_filter(sl, s, mode="nearest")
        return physics.blur(vol, (pixel_mm,) * 3, kernel, 0.7)[1]

    ref = Insert(0.0, 0.0, 0.0, ins.lumen_hu, ins.wall_hu, ins.background_hu)
    out = {}
    for name, calcium, blur in (("acquired", True, True), ("truth", False, True), ("geometric", False, False)):
        sl = ins.slice(pixel_mm if blur else 0.02, calcium=calcium)
        rf = ref.slice(pixel_mm if blur else 0.02)
        px = pixel_mm if blur else 0.02
        if blur:
            sl, rf = blurred(sl), blurred(rf)
        out[name] = read_stack(stack(sl, rf), px, white_hu)
        if name == "acquired":
            c = ((sl.shape[0] - 1) / 2, (sl.shape[1] - 1) / 2)
            out["width_mm"] = apparent_width_mm(sl, px, ins.lumen_hu, c)
    out["true_width_mm"] = ins.stenosis * ins.radius_mm
    return out
