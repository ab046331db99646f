"""Where a restoration took its HU at one lesion: cross-sections of the truth, acquired and processed images.

Why: a severe stenosis the node makes is one lesion, and its reading says only that the lumen closed. Whether the
restoration took too much in all (the calcium's excess overestimated) or took the right amount from the wrong
place (the excess put on the lumen's side of the deposit) are different faults with different cures, and the
world knows the answer: what the calcium added is the acquired image minus the truth image. Section by section
along the lesion this prints that addition and what the engine removed, summed over the section, their ratio, and
the mean over-removal on the voxels the truth image shows as lumen (above half-way from the wall to the lumen's
level: what the reader calls lumen); ``--grid`` prints each section's images as numbers too.

``python -m dicom_node_lab.lesion_sections --seed 6060 --study 62 --vessel 1 --lesion 0 --engine ...`` (a minute).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from dicom_node_lab.reader import WALL_HU

SECTION_STEP_MM = 0.25  # in-plane sampling of a section
HALF_WIDTH_MM = 2.0  # a section reaches this far from the centreline
AT_LEAST_HU = 20.0  # a voxel counts in the section's sums where the addition or the removal exceeds this


def sections(seed: int, study: int, vessel: int, lesion: int, engine_lines: list[str], count: int = 7
             ) -> dict:
    """The lesion's ``count`` cross-sections (planes normal to its centreline, evenly over its length) of the truth,
    acquired and processed images, what was removed, the detected calcium and the phantom's calcium fraction,
    each (count, n, n) in HU (fractions for the last two), with the section sums (``section_sums``)."""
    from scipy import ndimage

    from dicom_node_lab import world
    from dicom_node_lab.experiment2v2 import ENGINES, _engine, _stored_hu, make_study
    from dicom_node_lab.reader import frames, lesion_sections, lumen_level

    engine = _engine(ENGINES / "dense_unet.onnx", list(engine_lines))
    p = make_study(seed, study)
    original = _stored_hu(p.image)
    processed = original.copy()
    result = engine.run(processed, p.spacing, kernel=str(p.settings.kernel).upper())
    processed = np.where(result.changed, _stored_hu(processed), original)
    truth = _stored_hu(p.truth)
    v = p.vessels[vessel]
    les = v.lesions_w[lesion]
    points = v.lumen_points_mm()
    _, n, b = frames(points)
    _, ref = lesion_sections(les.s_mm, les.half_length_mm, len(points))
    level = float(lumen_level(truth, p.spacing, points[ref])) if len(ref) else float("nan")
    u = np.arange(-HALF_WIDTH_MM, HALF_WIDTH_MM + 1e-9, SECTION_STEP_MM)
    s_mm = np.linspace(les.s_mm - les.half_length_mm, les.s_mm + les.half_length_mm, count)
    images = {"truth": truth, "acquired": original, "processed": processed,
              "detected": result.detection.calcium.astype(np.float32), "calcium_fraction": p.calcium_fraction}
    out: dict = {name: [] for name in images}
    for s in s_mm:
        k = int(np.clip(round(s / world.STEP_MM), 0, len(points) - 1))
        plane = points[k] + u[:, None, None] * n[k] + u[None, :, None] * b[k]
        coords = (plane / np.asarray(p.spacing)).reshape(-1, 3).T
        for name, volume in images.items():
            order = 0 if name == "detected" else 1
            out[name].append(ndimage.map_coordinates(volume.astype(np.float32), coords, order=order)
                             .reshape(len(u), len(u)))
    arrays = {name: np.stack(v) for name, v in out.items()}
    arrays["removed"] = arrays["acquired"] - arrays["processed"]
    return {"s_mm": s_mm, "level_hu": level, **arrays, "sums": section_sums(arrays, level)}


def section_sums(arrays: dict[str, np.ndarray], level_hu: float) -> list[dict]:
    """Per section: what the calcium added (acquired − truth) and what was removed, summed where either exceeds
    ``AT_LEAST_HU``, their ratio, and the mean of removed − added on the voxels the truth shows as lumen
    (above half-way from ``WALL_HU`` to ``level_hu``; nan where none)."""
    rows = []
    half = 0.5 * (level_hu + WALL_HU)
    for truth, acquired, removed in zip(arrays["truth"], arrays["acquired"], arrays["removed"]):
        added = acquired - truth
        counted = (np.abs(added) > AT_LEAST_HU) | (np.abs(removed) > AT_LEAST_HU)
        lumen = truth > half
        a, r = float(added[counted].sum()), float(removed[counted].sum())
        rows.append({"added_hu": a, "removed_hu": r, "ratio": r / a if a > 0 else float("nan"),
                     "lumen_over_removed_hu": float((removed - added)[lumen].mean()) if lumen.any() else float("nan"),
                     "lumen_voxels": int(lumen.sum())})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--study", type=int, required=True)
    ap.add_argument("--vessel", type=int, required=True)
    ap.add_argument("--lesion", type=int, required=True)
    ap.add_argument("--engine", action="append", default=[], help="[engine] lines (TOML), as experiment2v2 takes them")
    ap.add_argument("--sections", type=int, default=7)
    ap.add_argument("--grid", action="store_true", help="print each section's images as numbers")
    ap.add_argument("--json", help="write the section sums here")
    args = ap.parse_args(argv)
    got = sections(args.seed, args.study, args.vessel, args.lesion, args.engine, args.sections)
    print(f"lumen level (truth image, reference sections) {got['level_hu']:.0f} HU; sections every "
          f"{SECTION_STEP_MM} mm to {HALF_WIDTH_MM} mm from the centreline")
    for k, (s, row) in enumerate(zip(got["s_mm"], got["sums"])):
        print(f"s = {s:5.1f} mm: added {row['added_hu']:9.0f}  removed {row['removed_hu']:9.0f}  ratio "
              f"{row['ratio']:.2f}  over-removed on the truth's lumen {row['lumen_over_removed_hu']:+5.0f} HU "
              f"({row['lumen_voxels']} samples)")
        if args.grid:
            for name in ("truth", "acquired", "processed", "removed", "detected", "calcium_fraction"):
                print(f"  {name}")
                fmt = "{:5.2f}" if name in ("detected", "calcium_fraction") else "{:5.0f}"
                for line in got[name][k]:
                    print("   " + " ".join(fmt.format(x) for x in line))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "level_hu": got["level_hu"], "s_mm": got["s_mm"].tolist(),
                       "sums": got["sums"]}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
