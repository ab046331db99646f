"""Where a restoration took its HU at one lesion: cross-sections of the truth, acquired and processed images.

Why: a severe stenosis the node makes is one lesion, and its reading says only that the lumen closed. Whether the
restoration took too much in all (the calcium's excess overestimated) or took the right amount from the wrong
place (the excess put on the lumen's side of the deposit) are different faults with different cures, and the
world knows the answer: what the calcium added is the acquired image minus the truth image. Section by section
along the lesion this prints that addition and what the engine removed, summed over the section, their ratio, and
the mean over-removal on the voxels the truth image shows as lumen (above half-way from the wall to the lumen's
level: what the reader calls lumen); ``--grid`` prints each section's images as numbers too.

``python -m dicom_node_lab.lesion_sections lesion --seed 6060 --study 62 --vessel 1 --lesion 0 --engine ...``
(seconds); ``... lesion_sections run --seed 6060 --studies 120 --engine ... --out F.json`` scores every calcified
lesion of a run so (over-removal on the truth's lumen against the reading's error; minutes).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from dicom_node_lab.reader import WALL_HU

SECTION_STEP_MM = 0.25  # in-plane sampling of a section
HALF_WIDTH_MM = 2.0  # a section reaches this far from the centreline
AT_LEAST_HU = 20.0  # a voxel counts in the section's sums where the addition or the removal exceeds this
SCORE_SECTIONS = 7  # sections per lesion when a whole run is scored (the two ends left out)
MIN_LUMEN_SAMPLES = 5  # a section whose truth shows fewer lumen samples says nothing of the lumen


def processed_study(seed: int, study: int, engine_lines: list[str]):
    """Study ``study`` of ``seed`` and its images as stored: ``(phantom, {truth, acquired, processed, detected,
    calcium_fraction})``, processed in-process by the engine these ``--engine`` lines build (as experiment2v2)."""
    from dicom_node_lab.experiment2v2 import _stored_hu, engine_for, make_study, restored

    p = make_study(seed, study)
    original, processed, result = restored(engine_for(engine_lines), p)
    return p, {"truth": _stored_hu(p.truth), "acquired": original, "processed": processed,
               "detected": result.detection.calcium.astype(np.float32), "calcium_fraction": p.calcium_fraction}


def cut(p, images: dict[str, np.ndarray], vessel: int, lesion: int, count: int = 7) -> dict:
    """The lesion's ``count`` cross-sections (planes normal to its centreline, evenly over its length) of each of
    ``images`` (``processed_study``), each (count, n, n), what was removed, and the section sums (``section_sums``)
    against the truth image's lumen level in the lesion's reference sections."""
    from scipy import ndimage

    from dicom_node_lab import world
    from dicom_node_lab.reader import frames, lesion_sections, lumen_level

    v = p.vessels[vessel]
    les = v.lesions_w[lesion]
    points = v.lumen_points_mm()
    _, n, b = frames(points)
    _, ref = lesion_sections(les.s_mm, les.half_length_mm, len(points))
    level = float(lumen_level(images["truth"], p.spacing, points[ref])) if len(ref) else float("nan")
    u = np.arange(-HALF_WIDTH_MM, HALF_WIDTH_MM + 1e-9, SECTION_STEP_MM)
    s_mm = np.linspace(les.s_mm - les.half_length_mm, les.s_mm + les.half_length_mm, count)
    volumes = {name: volume.astype(np.float32, copy=False) for name, volume in images.items()}  # once, not per section
    out: dict = {name: [] for name in images}
    for s in s_mm:
        k = int(np.clip(round(s / world.STEP_MM), 0, len(points) - 1))
        plane = points[k] + u[:, None, None] * n[k] + u[None, :, None] * b[k]
        coords = (plane / np.asarray(p.spacing)).reshape(-1, 3).T
        for name, volume in volumes.items():
            order = 0 if name == "detected" else 1
            out[name].append(ndimage.map_coordinates(volume, coords, order=order)
                             .reshape(len(u), len(u)))
    arrays = {name: np.stack(v) for name, v in out.items()}
    arrays["removed"] = arrays["acquired"] - arrays["processed"]
    return {"s_mm": s_mm, "level_hu": level, **arrays, "sums": section_sums(arrays, level)}


def sections(seed: int, study: int, vessel: int, lesion: int, engine_lines: list[str], count: int = 7) -> dict:
    """One lesion's cross-sections and section sums (``cut``) after the engine these lines build."""
    p, images = processed_study(seed, study, engine_lines)
    return cut(p, images, vessel, lesion, count)


def lesion_scores(job: tuple[int, int, list[str]]) -> list[dict]:
    """Every calcified lesion of one study (a worker's job: seed, study, engine lines): its reading error against
    the truth image at lumen + 100 HU and, over its inner sections (the first and last of ``SCORE_SECTIONS`` are
    the lesion's ends), the mean over-removal on the truth's lumen and the median removed ÷ added."""
    from dicom_node_lab.experiment2v2 import CALCIFIED, PRIMARY_WHITE
    from dicom_node_lab.readings import read_study

    seed, study, lines = job
    p, images = processed_study(seed, study, lines)
    rows = read_study(p, {"original": images["acquired"], "processed": images["processed"], "truth": p.truth},
                      study=f"{seed}-{study}")
    w = f"{PRIMARY_WHITE:g}"
    out = []
    for r in rows:
        if r["stratum"] != CALCIFIED or r[f"processed@{w}"] is None or r[f"truth@{w}"] is None:
            continue
        sums = cut(p, images, r["vessel"], r["lesion"], SCORE_SECTIONS)["sums"][1:-1]
        over = [s["lumen_over_removed_hu"] for s in sums if s["lumen_voxels"] >= MIN_LUMEN_SAMPLES]
        out.append({"study": r["study"], "vessel": r["vessel"], "lesion": r["lesion"], "kernel": r["kernel"],
                    "diameter_mm": r["diameter_mm"], "error": r[f"processed@{w}"] - r[f"truth@{w}"],
                    "lumen_over_removed_hu": float(np.mean(over)) if over else None,
                    "ratio": float(np.nanmedian([s["ratio"] for s in sums]))})
    return out


def summarise_scores(rows: list[dict]) -> dict:
    """Does the lumen's over-removal go with the reading's error? Pearson r between the two (signed) over the
    lesions that have both, and the mean absolute and signed error in thirds of the over-removal."""
    ok = [r for r in rows if r["lumen_over_removed_hu"] is not None]
    if len(ok) < 3:
        return {"lesions": len(rows), "scored": len(ok)}
    over = np.array([r["lumen_over_removed_hu"] for r in ok])
    err = np.array([r["error"] for r in ok])
    cuts = np.quantile(over, [1 / 3, 2 / 3])
    thirds = {}
    for name, sel in (("lowest third", over <= cuts[0]), ("middle third", (over > cuts[0]) & (over <= cuts[1])),
                      ("highest third", over > cuts[1])):
        thirds[name] = {"n": int(sel.sum()), "over_removed_hu": float(over[sel].mean()),
                        "mae": float(np.abs(err[sel]).mean()), "bias": float(err[sel].mean())}
    return {"lesions": len(rows), "scored": len(ok), "pearson_r": float(np.corrcoef(over, err)[0, 1]),
            "mean_over_removed_hu": float(over.mean()), "thirds": thirds}


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


def _one_lesion(args: argparse.Namespace) -> int:
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
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "func"}, "level_hu": got["level_hu"],
                       "s_mm": got["s_mm"].tolist(), "sums": got["sums"]}, f, indent=1)
    return 0


def _a_run(args: argparse.Namespace) -> int:
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    rows: list[dict] = []
    jobs = [(args.seed, i, list(args.engine)) for i in range(args.studies)]
    with ProcessPoolExecutor(args.workers) as pool:
        for r in tqdm(pool.map(lesion_scores, jobs), total=len(jobs), desc="studies"):
            rows += r
    summary = summarise_scores(rows)
    with open(args.out, "w") as f:
        json.dump({"seed": args.seed, "studies": args.studies, "engine": args.engine, "summary": summary,
                   "lesions": rows}, f, indent=1)
    print(json.dumps(summary, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(required=True)
    one = sub.add_parser("lesion", help="one lesion, section by section")
    one.add_argument("--seed", type=int, required=True)
    one.add_argument("--study", type=int, required=True)
    one.add_argument("--vessel", type=int, required=True)
    one.add_argument("--lesion", type=int, required=True)
    one.add_argument("--sections", type=int, default=7)
    one.add_argument("--grid", action="store_true", help="print each section's images as numbers")
    one.add_argument("--json", help="write the section sums here")
    one.set_defaults(func=_one_lesion)
    run = sub.add_parser("run", help="every calcified lesion of a seed's studies: over-removal against reading error")
    run.add_argument("--seed", type=int, default=6060)
    run.add_argument("--studies", type=int, default=120)
    run.add_argument("--workers", type=int, default=2)
    run.add_argument("--out", required=True, help="JSON: the summary and one row per lesion")
    run.set_defaults(func=_a_run)
    for p in (one, run):
        p.add_argument("--engine", action="append", default=[],
                       help="[engine] lines (TOML), as experiment2v2 takes them")
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
