"""How much of a region's calcium core the restoration leaves in the lumen's range, lesion by lesion, and whether
flagging by it would find the restorations that read wrong.

Why: a severe stenosis can be hidden by processing (``experiment2v2``'s safety line): a deposit taken off in part
leaves its rest at the lumen's brightness, and the reader's ray walks through it. Held out, one such lesion was
called sure (5050-24: truth image 91 %, restored 46 %; 40 % of its sharpened core left at or above half-way from
the wall to the lumen). If the share of the core a restoration leaves there ranked the restorations that read too
low, the engine could mark them unsure. This measures that share without changing the node, and grades it as a
flag against an ``experiment2v2`` run of the same studies.

``python -m dicom_node_lab.residue --studies 120 --seed 6060 --out runs/residue.json`` regenerates the studies,
restores each as the recommended configuration does and writes, per lesion its regions reach, the largest share
over those regions (the core: the voxels of the detected calcium that the region's sharpened box shows more than
150 or 300 HU above the lumen's level measured beyond the calcium; "left" = restored at or above the reader's
edge, half-way from the wall to that level; "joined": left there and joined to the restored lumen, the residue a
ray from the lumen can walk into); ``--grade RUN.json`` then reads the shares as a flag on top of the run's own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from dicom_node.pipeline.vessel import lumen_range
from dicom_node_lab import per_study
from dicom_node_lab.sharp_pieces import RECOMMENDED_DETECTION
from dicom_node_lab.xcist_restore import RECOMMENDED as SUBTRACTION

CORES_HU = (150.0, 300.0)  # how far above the lumen's level a sharpened voxel must stand to be the calcium's core
LEVEL_AWAY_MM = 2.0  # the lumen's level, measured this far beyond the calcium (the learnt estimate's reference)
# the two measures per core: the share left in the lumen's range, and the share left there joined to the restored
# lumen (the residue a ray from the lumen can walk into, not an island inside the deposit)
MEASURES = {"share": 1, "joined": 2}
LARGE_POINTS = 10.0  # a restoration reads "wrong" this far from the truth image
# the recommended configuration on the world (README): the subtraction with both estimates, the world's site kernel
# tables, the sharpened lumen's level
RECOMMENDED = [*SUBTRACTION, *RECOMMENDED_DETECTION[2:], 'sharp_level = "sharpened"']


def _restored_lumen(restored: np.ndarray, level: float) -> np.ndarray:
    """The vessel's lumen in a restored box as the reader takes it at ``level`` (``vessel.lumen_range``): the
    largest 26-connected piece of that range."""
    edge, white = lumen_range(level)
    in_range = (restored >= edge) & (restored < white)
    labels, n = ndimage.label(in_range, structure=np.ones((3, 3, 3), bool))
    if not n:
        return in_range
    return labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))


def _one(job: tuple[int, int, list[str]]) -> list[dict]:
    from dicom_node.pipeline.morphology import grow_box
    from dicom_node.pipeline.subtract import reference_levels, sharpened
    from dicom_node_lab import experiment2v2 as e2

    seed, i, engine_args = job
    engine = e2.engine_for(engine_args)
    p = e2.make_study(seed, i)
    original, processed, result = e2.restored(engine, p)
    opts = engine.subtract.for_kernel(str(p.settings.kernel).upper())
    fallback = result.detection.threshold_hu - opts.white_above_lumen_hu
    pad = np.ceil(opts.pad_mm / np.asarray(p.spacing, float)).astype(int)
    # (region box, {core: (core voxels, share left in the lumen's range, share left there joined to the lumen)})
    measured = []
    for region in result.regions:
        box = grow_box(region.native_box, original.shape, pad)
        calcium = result.detection.calcium[box]
        if not calcium.any():
            continue
        y = original[box].astype(np.float64)
        u = sharpened(y, opts.blur.transfer(y.shape, p.spacing), calcium, p.spacing, opts, fallback)
        idx = np.argwhere(calcium)
        level = reference_levels(y, calcium, p.spacing, idx, LEVEL_AWAY_MM, fallback)
        above = u[tuple(idx.T)] - level
        restored = processed[box]
        left = restored[tuple(idx.T)] >= lumen_range(level)[0]
        joined = left & _restored_lumen(restored, float(np.median(level)))[tuple(idx.T)]
        shares = {}
        for core in CORES_HU:
            c = above > core
            shares[core] = ((int(c.sum()), float(left[c].mean()), float(joined[c].mean())) if c.any()
                            else (0, None, None))
        measured.append((region.native_box, shares))
    rows = []
    for vi, v in enumerate(p.vessels):
        for li in range(len(v.lesions_w)):
            hits = [s for b, s in measured if e2.reaches(p, vi, li, b)]
            if not hits:
                continue
            row = {"study": f"{seed}-{i}", "vessel": vi, "lesion": li}
            for core in CORES_HU:
                for key, at in MEASURES.items():
                    values = [h[core][at] for h in hits if h[core][at] is not None]
                    row[f"{key}{core:g}"] = max(values) if values else None
                row[f"core{core:g}"] = sum(h[core][0] for h in hits)
            rows.append(row)
    return rows


def grade(args: argparse.Namespace) -> int:
    from dicom_node_lab.experiment2v2 import CALCIFIED, rank_auc

    def auc(score: np.ndarray, positive: np.ndarray) -> str:
        value = rank_auc(score, positive)
        return "-" if value is None else f"{value:.2f}"

    shares = {(r["study"], r["vessel"], r["lesion"]): r for r in json.loads(args.out.read_text())["lesions"]}
    run = json.loads(args.grade.read_text())["lesions"]
    rows = [(r, shares[(r["study"], r["vessel"], r["lesion"])]) for r in run
            if r["stratum"] == CALCIFIED and r.get("unsure") is not None
            and (r["study"], r["vessel"], r["lesion"]) in shares]
    err = np.array([r["processed@100"] - r["truth@100"] for r, _ in rows])
    unsure = np.array([bool(r["unsure"]) for r, _ in rows])
    large, low = np.abs(err) > LARGE_POINTS, err < -LARGE_POINTS
    print(f"{len(rows)} calcified lesions reached ({int(large.sum())} read more than {LARGE_POINTS:g} points from "
          f"the truth image, {int(low.sum())} of them too low; {int((~unsure).sum())} called sure by the run)")
    for key, core in ((key, core) for key in MEASURES for core in CORES_HU):
        if not any(f"{key}{core:g}" in s for _, s in rows):
            continue  # measured before this measure existed
        share = np.array([np.nan if s.get(f"{key}{core:g}") is None else s[f"{key}{core:g}"] for _, s in rows])
        score = np.nan_to_num(share, nan=0.0)
        print(f"{key}, core > {core:g} HU: the share ranks a large error above a good restoration with probability "
              f"{auc(score, large)}, an under-read with {auc(score, low)}")
        for t in args.thresholds:
            flag = score >= t
            newly, kept = flag & ~unsure, ~flag & ~unsure
            mae = lambda m: float(np.abs(err[m]).mean()) if m.any() else float("nan")  # noqa: E731
            print(f"  share >= {t:g}: flags {int(flag.sum())}; large errors {int((flag & large).sum())} of "
                  f"{int(large.sum())}, under-reads {int((flag & low).sum())} of {int(low.sum())}, good ones "
                  f"{int((flag & ~large).sum())} of {int((~large).sum())}; of the sure, {int(newly.sum())} newly "
                  f"flagged read {mae(newly):.2f}, the {int(kept.sum())} left sure {mae(kept):.2f} "
                  f"(all sure {mae(~unsure):.2f})")
    return 0


def _summary(rows: list[dict]) -> dict:
    out: dict = {"lesions reached": len(rows)}
    for core in CORES_HU:
        shares = [r[f"share{core:g}"] for r in rows if r[f"share{core:g}"] is not None]
        out[f"core > {core:g} HU: median share left"] = float(np.median(shares)) if shares else None
    return out


def main(argv: list[str] | None = None) -> int:
    """``--grade RUN [--out SHARES] [--thresholds ...]`` grades; anything else measures (``per_study.run``'s
    arguments: ``--studies --seed --engine --workers --out``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--grade" not in argv:
        return per_study.run(argv, __doc__.splitlines()[0], _one, _summary, studies=120, out="runs/residue.json",
                             rows_key="lesions", flatten=True, engine=RECOMMENDED)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/residue.json"), help="the shares measured")
    ap.add_argument("--grade", type=Path, metavar="RUN", required=True,
                    help="an experiment2v2.json of the same studies under the same engine: grade the shares in --out")
    ap.add_argument("--thresholds", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.4, 0.5])
    return grade(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
