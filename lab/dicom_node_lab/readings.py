"""Every lesion of a world study read by the reader model, on each image, at both white levels.

The calibration gate, Experiment 2 v2 and the safety tests all need the same table: one
row per lesion with its strata (type, arc, density, vessel size, kernel, motion), its
geometric truth, and the reader's stenosis on each image it is given.
"""

from __future__ import annotations

import numpy as np

from dicom_node_lab import world
from dicom_node_lab.phantom import Phantom
from dicom_node_lab.reader import WHITE_LEVELS_HU, ReaderSettings, as_seen, read_lesion, smoothing_for


def arc_stratum(arc_deg: float) -> str:
    """The issue's arc strata: < 90°, 90–180°, > 180° (and none)."""
    if arc_deg <= 0:
        return "none"
    return "<90" if arc_deg < 90 else "90-180" if arc_deg <= 180 else ">180"


def size_stratum(diameter_mm: float) -> str:
    return "2-3 mm" if diameter_mm < 3.0 else "3-4.5 mm"


def density_stratum(mg_cm3: float) -> str:
    return "none" if mg_cm3 <= 0 else "<500 mg" if mg_cm3 < 500 else ">=500 mg"


def read_study(p: Phantom, images: dict[str, np.ndarray], whites: tuple[float, ...] = WHITE_LEVELS_HU,
               study: str = "", smooth_mm: float | None = None) -> list[dict]:
    """One row per lesion: strata, geometric truth, and ``<image>@<white>`` readings (None if unreadable).

    ``smooth_mm``: the eye's smoothing, in place of the kernel's (``reader.smoothing_for``), for tuning it.
    """
    rows = []
    settings = p.settings
    # every image of a study is seen alike, with the smoothing its kernel asks for; the white level does
    # not change how the eye smooths, so each image is smoothed once, not per lesion and level
    smooth = smoothing_for(settings.kernel if settings else None) if smooth_mm is None else smooth_mm
    seen = {name: as_seen(vol, p.spacing, ReaderSettings(smooth_mm=smooth)) for name, vol in images.items()}
    for vi, v in enumerate(p.vessels):
        if not isinstance(v, world.WorldVessel):
            raise TypeError("read_study reads world studies (world.generate)")
        lumen_pts = v.lumen_points_mm()
        for li, les in enumerate(v.lesions_w):
            i = int(round(les.s_mm / world.STEP_MM))
            row = {"study": study, "seed": p.seed, "vessel": vi, "lesion": li, "type": str(les.kind),
                   "geometric": world.geometric_stenosis(v, les), "drawn": 100.0 * les.stenosis,
                   "arc_deg": les.arc_deg, "arc": arc_stratum(les.arc_deg), "density_mg_cm3": les.density_mg_cm3,
                   "calcium_hu": les.calcium_hu, "lumen_hu_true": float(v.lumen_hu[i]),
                   "diameter_mm": 2.0 * float(v.radius_mm[i]), "length_mm": 2.0 * les.half_length_mm,
                   "calcium_thickness_mm": les.calcium_thickness_mm,
                   "kernel": str(settings.kernel) if settings else "", "kvp": settings.kvp if settings else 0,
                   "motion_mm": float(np.linalg.norm(v.motion_mm)), "reader_smooth_mm": smooth}
            row["calcium_contrast_hu"] = world.calcium_contrast(p.image, p.spacing, v, les)
            # the stratum as a reader meets it: calcium that never looks white reads with the faint ones
            row["stratum"] = (str(world.LesionType.FAINT) if les.arc_deg > 0
                              and not row["calcium_contrast_hu"] > WHITE_LEVELS_HU[0] else str(les.kind))
            row["size"] = size_stratum(row["diameter_mm"])
            row["density"] = density_stratum(les.density_mg_cm3)
            for white in whites:
                st = ReaderSettings(white_hu=white, smooth_mm=smooth)
                for name, vol in seen.items():
                    r = read_lesion(vol, p.spacing, lumen_pts, les.s_mm, les.half_length_mm, st, seen=True)
                    row[f"{name}@{white:g}"] = None if r is None else r.stenosis_pct
            rows.append(row)
    return rows
