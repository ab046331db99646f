"""Which voxels of the phantom's calcium the detection finds, misses and takes beyond it, and how each stands.

Why: whole-pipeline oracles (``world_oracles``) say that what the detection misses of the deposits it reaches is
most of the error left, and what it takes beyond them makes the severe stenoses (reports/tuning/grown-detection.md).
A detection that grows or trims must tell those voxels from the lumen and wall beside them; this counts them per
study and says where each kind stands above the vessel's contrast level, as acquired and in the image sharpened as
the sharpened-image test sharpens it (the kernel's blur, total-variation deconvolution).

- *found*: detected voxels inside the true deposits the detection touches (within one voxel);
- *missed*: those deposits' voxels it does not find;
- *extra*: detected voxels of the touching components outside every true deposit
  (``world_oracles.found_trimmed`` takes exactly these away).

``python -m dicom_node_lab.deposit_voxels --studies 30 --seed 6060 --out runs/deposit-voxels.json`` (2 min).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

KINDS = ("found", "missed", "extra")
PERCENTILES = (10, 25, 50, 75, 90)
DROP_BELOW_HU = (100, 200, 300)  # trims the summary prices: drop what the sharpened image shows less than this above
BOX_PAD = 10  # voxels of image around each component when it is sharpened


def classify(detected: np.ndarray, true_mask: np.ndarray) -> dict[str, np.ndarray]:
    """The three kinds of voxel (bool masks, see the module's docstring) of one study."""
    from dicom_node_lab.world_oracles import _touched_deposits, found_trimmed

    deposits, touched = _touched_deposits(detected, true_mask)
    reached = np.isin(deposits, touched)
    return {"found": detected & reached, "missed": reached & ~detected,
            "extra": detected & ~found_trimmed(detected, true_mask)}


def _one(job: tuple[int, int, list[str]]) -> dict:
    """One study's counts and each kind's values above the level (acquired, sharpened), as lists."""
    from dicom_node.pipeline.contrast import brightest_level_nearby, local_lumen_level
    from dicom_node.pipeline.detect import _levels_over
    from dicom_node.pipeline.morphology import grow_box
    from dicom_node.pipeline.subtract import ScannerBlur, SubtractOptions, sharpen
    from dicom_node_lab.experiment2v2 import detected_study

    seed, i, engine_args = job
    p, volume, engine, det = detected_study(seed, i, engine_args)
    kinds = classify(det.calcium, p.calcium_mask)
    row = {"study": f"{seed}-{i}", "calcium": int(p.calcium_mask.sum()),
           **{k: int(m.sum()) for k, m in kinds.items()}, "acquired": {k: [] for k in KINDS},
           "sharpened": {k: [] for k in KINDS}}
    anywhere = kinds["found"] | kinds["missed"] | kinds["extra"]
    if not anywhere.any():
        return row
    mtf50 = engine.detect_options_for(str(p.settings.kernel).upper()).sharp_mtf50_lp_cm
    ref = brightest_level_nearby(local_lumen_level(volume, p.spacing), p.spacing)
    # each connected stretch of the three kinds, sharpened in its own box (as the test's tiles do, with margin)
    lab, _ = ndimage.label(anywhere, structure=np.ones((3, 3, 3)))
    for index, sl in enumerate(ndimage.find_objects(lab), start=1):
        box = grow_box(sl, volume.shape, [BOX_PAD] * 3)
        part = volume[box].astype(np.float64)
        u = sharpen(part, ScannerBlur(mtf50_lp_cm=mtf50).transfer(part.shape, p.spacing), SubtractOptions.tv_weight,
                    SubtractOptions.iterations)
        level = _levels_over(ref, box)
        own = lab[box] == index
        for k, m in kinds.items():
            at = m[box] & own
            row["acquired"][k] += (part - level)[at].round(1).tolist()
            row["sharpened"][k] += (u - level)[at].round(1).tolist()
    return row


def summary(rows: list[dict]) -> dict:
    """Totals, each kind's percentiles above the level, and what each trim threshold would drop of each kind."""
    out: dict = {"studies": len(rows), "calcium": sum(r["calcium"] for r in rows),
                 **{k: sum(r[k] for r in rows) for k in KINDS}}
    for image in ("acquired", "sharpened"):
        out[image] = {}
        for k in KINDS:
            v = np.array([x for r in rows for x in r[image][k]], float)
            v = v[np.isfinite(v)]  # no contrast level near: nan
            out[image][k] = {f"p{q}": round(float(np.percentile(v, q)), 1) for q in PERCENTILES} if v.size else {}
    found = np.array([x for r in rows for x in r["sharpened"]["found"]], float)
    extra = np.array([x for r in rows for x in r["sharpened"]["extra"]], float)
    out["drop_below"] = {str(t): {"extra": round(float(np.mean(extra < t)), 3) if extra.size else None,
                                  "found": round(float(np.mean(found < t)), 3) if found.size else None}
                         for t in DROP_BELOW_HU}
    return out


def main(argv: list[str] | None = None) -> int:
    from dicom_node_lab import per_study

    return per_study.run(argv, __doc__.split("\n\n")[0], _one, summary, studies=30, out="runs/deposit-voxels.json")


if __name__ == "__main__":
    raise SystemExit(main())
