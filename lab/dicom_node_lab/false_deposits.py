"""Deposits the detection finds where the phantom has no calcium, and how the sharpened-image test saw them.

Why: on the fresh held-out studies (seed 5151, opened once in the twenty-sixth session) the recommended
configuration read a calcium-free soft plaque in a 2.2 mm vessel (study 5151-403, soft kernel) at 100 % where the
acquired image and the truth image read 30 %: a restoration drew an occlusion with no calcium there. Its region was
found only in the sharpened image. This lists, for each study, every connected deposit the engine detects, whether
it touches the phantom's calcium, whether the rules without the sharpened-image test find it, and the levels that
test compared: the sharpened image's median and peak over the deposit, the acquired image's contrast level it was
compared with (``contrast.brightest_level_nearby`` of ``local_lumen_level``, as ``detect.sharp_candidates`` reads
it), the level the same estimator measures on the sharpened image, the level ``engine.sharp_level = "sharpened"``
compares with (the higher of the acquired level and the sharpened lumen's, ``detect._sharpened_lumen_level``), and
the nearest vessel's true lumen HU and radius. A small vessel's acquired level sits under its true lumen (partial
volume), and the sharpening gives the lumen's core back: the core then stands the test's 150 HU above the acquired
level without any calcium. The share of each deposit's voxels that stand the test's margin above the acquired level
and above the option's says how the option removes them: on 5151-403 a fifth to two thirds of their voxels still
pass, in pieces of 2.4–3.4 mm³, which ``engine.sharp_min_volume_mm3`` (5) drops; a thin margin.

``python -m dicom_node_lab.false_deposits --seed 5151 --study 403`` (20 s a study).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from dicom_node_lab.sharp_pieces import RECOMMENDED_DETECTION

TOUCH_VOXELS = 2  # a deposit within this many voxels of the phantom's calcium mask is calcium


def deposits(seed: int, study: int, engine_args: list[str] | None = None) -> list[dict]:
    """Every detected deposit of one study (see the module's docstring), one dict each.

    The sharpened image and the levels are ``detect``'s own (its boxes, through ``_sharpened_with_levels``, once
    with each ``sharp_level``): a deposit's box sharpened on its own gives other values at its edges."""
    from dataclasses import replace

    from scipy import ndimage

    from dicom_node.pipeline.contrast import BLOCK, brightest_level_nearby, local_lumen_level
    from dicom_node.pipeline.detect import Sharpenings, _sharpened_with_levels, detect
    from dicom_node_lab.experiment2v2 import detected_study

    p, volume, engine, found = detected_study(seed, study, list(engine_args or RECOMMENDED_DETECTION))
    spacing = p.spacing
    options = engine.detect_options_for(str(p.settings.kernel).upper())
    rules = detect(volume, spacing, replace(options, sharp_contrast_hu=0.0)).calcium
    reference = brightest_level_nearby(local_lumen_level(volume, spacing), spacing)
    above = volume > options.local_floor_hu
    memo = Sharpenings()
    sharp, levels = volume.astype(np.float32), {}
    for level in ("acquired", "sharpened"):
        levels[level] = np.full(volume.shape, np.nan, np.float32)
        for kept, _, u, at in _sharpened_with_levels(volume, spacing, above, replace(options, sharp_level=level),
                                                     reference, memo):
            sharp[kept], levels[level][kept] = u, at
    # the first measure tried and rejected: the acquired image's estimator run on the sharpened image (as
    # contrast.lumen_level_at reads it; its coarse cells cover the volume, as ceil(n / BLOCK) of them)
    own = brightest_level_nearby(local_lumen_level(sharp, spacing), spacing)
    near_calcium = ndimage.binary_dilation(p.calcium_mask, iterations=TOUCH_VOXELS)
    labels, n = ndimage.label(found.calcium, structure=np.ones((3, 3, 3), bool))
    out = []
    for k in range(1, n + 1):
        voxels = np.argwhere(labels == k)
        inside = tuple(voxels.T)
        centre_mm = voxels.mean(axis=0) * np.asarray(spacing)
        gaps = [float(np.linalg.norm(v.points_mm - centre_mm, axis=1).min()) for v in p.vessels]
        vessel = p.vessels[int(np.argmin(gaps))]
        out.append({
            "study": f"{seed}-{study}", "kernel": str(p.settings.kernel), "deposit": k, "voxels": len(voxels),
            "calcium": bool(near_calcium[inside].any()), "rules_find_it": bool(rules[inside].any()),
            "sharpened_median_hu": float(np.median(sharp[inside])), "sharpened_peak_hu": float(sharp[inside].max()),
            "acquired_level_hu": float(np.nanmedian(levels["acquired"][inside])),
            "sharpened_level_hu": float(np.nanmedian(own[tuple((voxels // BLOCK).T)])),
            "sharp_level_option_hu": float(np.nanmedian(levels["sharpened"][inside])),
            # the share of its voxels that stand the test's margin above each level (nan, no level: they do not)
            "passes_acquired": _share_over(sharp[inside], levels["acquired"][inside], options.sharp_contrast_hu),
            "passes_option": _share_over(sharp[inside], levels["sharpened"][inside], options.sharp_contrast_hu),
            "vessel_lumen_hu": float(np.median(vessel.lumen_hu)),
            "vessel_radius_mm": float(np.median(vessel.radius_mm)),
            "centre_to_centreline_mm": float(min(gaps))})
    return out


def _share_over(values: np.ndarray, level: np.ndarray, margin_hu: float) -> float:
    with np.errstate(invalid="ignore"):
        return float(np.mean(values - level > margin_hu))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, required=True, help="study seed base (5151: the fresh held-out set)")
    ap.add_argument("--study", type=int, nargs="+", required=True, help="study indices")
    ap.add_argument("--engine", action="append", default=None, metavar="KEY=VALUE",
                    help="[engine] lines in place of the recommended detection's")
    args = ap.parse_args(argv)
    for i in args.study:
        for row in deposits(args.seed, i, args.engine):
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
