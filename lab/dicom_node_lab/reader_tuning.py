"""How much the reader's eye smooths, per kernel: chosen by the reader's own test-retest, on tuning studies.

A reader that reads a rescan of the same calcium-free anatomy differently from the first scan
cannot judge a restoration more finely than that. With 0.2 mm of smoothing for every kernel,
sharp-kernel noise grains read calcium-free rescans as occluded (reports/tuning/noise-floor.md).
More smoothing quiets the noise but widens blooming and partial volume, so each candidate table
is judged on all of it: the retest against the truth image (error, CAD-RADS, κ, severe stenoses
that only the noise makes), and what the untreated images over-call (acquired − truth image),
on tuning studies (``EXP2V2_TUNE_SEED``) with the held-out experiment's kernels and motion.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dicom_node_lab import experiment2v2 as e2
from dicom_node_lab.reader import SMOOTH_MM_BY_KERNEL, ReaderSettings
from dicom_node_lab.world import Kernel

BASE = ReaderSettings.smooth_mm


def _table(**smooth_mm: float) -> dict[str, float]:
    """A smoothing per kernel: ``BASE`` unless given."""
    return {str(k): smooth_mm.get(str(k), BASE) for k in Kernel}


CANDIDATES: dict[str, dict[str, float]] = {
    f"{BASE:g} mm everywhere": _table(),
    "HD 0.3, sharp 0.4": _table(hd=0.3, sharp=0.4),
    "HD 0.4, sharp 0.4": _table(hd=0.4, sharp=0.4),
    "HD 0.4, sharp 0.5": _table(hd=0.4, sharp=0.5),
    "standard 0.3, HD 0.4, sharp 0.5": _table(standard=0.3, hd=0.4, sharp=0.5),
}


def _study(job: tuple[int, int]) -> list[dict]:
    """One tuning study read by every candidate: acquired, truth image and a rescan (``experiment2v2.RETEST``)."""
    from dicom_node_lab.readings import read_study

    seed, i = job
    p = e2.make_study(seed, i)
    images = {"original": e2._stored_hu(p.image), "truth": p.truth, e2.RETEST: e2._rescanned(p)}
    read: dict[float, list[dict]] = {}  # candidates that smooth this study's kernel alike read it once
    rows = []
    for name, table in CANDIDATES.items():
        smooth = table[str(p.settings.kernel)]
        if smooth not in read:
            read[smooth] = read_study(p, images, study=f"{seed}-{i}", smooth_mm=smooth)
        rows += [{**r, "candidate": name} for r in read[smooth]]
    return rows


def summarise(rows: list[dict], white: float = e2.PRIMARY_WHITE) -> dict[str, dict]:
    """Per candidate: the retest against the truth image, noise-made severe stenoses, and blooming."""
    w = f"{white:g}"
    out = {}
    for name in CANDIDATES:
        ok = [r for r in rows if r["candidate"] == name
              and all(r[f"{k}@{w}"] is not None for k in ("original", "truth", e2.RETEST))]
        calcified = [r for r in ok if r["stratum"] == e2.CALCIFIED]
        if not calcified:
            continue
        a = e2.agreement(e2._values(calcified, f"{e2.RETEST}@{w}"), e2._values(calcified, f"truth@{w}"))
        every = e2.agreement(e2._values(ok, f"{e2.RETEST}@{w}"), e2._values(ok, f"truth@{w}"))
        noise_made = [r for r in ok if e2._invented_severe(r, w, e2.RETEST)]
        truth_severe = [r for r in ok if r["geometric"] < 50 and r[f"truth@{w}"] >= 70]
        std = [r for r in calcified if r["kernel"] == str(Kernel.STANDARD)]
        sharp = [r for r in calcified if r["kernel"] in (str(Kernel.HD), str(Kernel.SHARP))]

        def mean(sub: list[dict], a_key: str, b_key: str) -> float:
            return float(np.mean([r[a_key] - r[b_key] for r in sub])) if sub else float("nan")

        out[name] = {"n_calcified": len(calcified), "n": len(ok),
                     "retest_mae": a["mae"], "retest_mae_ci": a["mae_ci"], "retest_kappa": a["kappa"],
                     "retest_cadrads_exact": a["cadrads_exact"], "retest_mae_all": every["mae"],
                     "noise_made_severe": len(noise_made), "truth_severe_below_50": len(truth_severe),
                     "blooming": mean(calcified, f"original@{w}", f"truth@{w}"),
                     "blooming_standard": mean(std, f"original@{w}", f"truth@{w}"),
                     "blooming_hd_sharp": mean(sharp, f"original@{w}", f"truth@{w}"),
                     "partial_volume": mean(calcified, f"truth@{w}", "geometric")}
    return out


def run(args) -> int:
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    jobs = [(args.seed, i) for i in range(args.studies)]
    rows: list[dict] = []
    with ProcessPoolExecutor(args.workers) as pool:
        for r in tqdm(pool.map(_study, jobs), total=len(jobs), desc="reader smoothing", unit="study"):
            rows += r
    result = {"seed": args.seed, "studies": args.studies, "shipped": SMOOTH_MM_BY_KERNEL,
              "white": {f"{w:g}": summarise(rows, w) for w in (e2.PRIMARY_WHITE, 200.0)}}
    out = Path(args.report_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reader-smoothing.json").write_text(json.dumps(result, indent=1))
    title = f"The reader's smoothing per kernel, by its test-retest ({args.studies} tuning studies, seed {args.seed})"
    lines = [f"# {title}",
             "", f"Reproduce: `python tools/evaluate.py reader-smoothing --studies {args.studies}`.", "",
             f"Shipped: `reader.SMOOTH_MM_BY_KERNEL` = {SMOOTH_MM_BY_KERNEL}.", ""]
    for w, table in result["white"].items():
        lines += [f"## Lumen + {w} HU", "",
                  "| candidate | calcified | retest MAE [95 %] | retest CAD-RADS exact | retest κ "
                  "| retest MAE, all lesions | severe made by noise | truth image severe, geometry < 50 "
                  "| blooming (acquired − truth image): all / standard / HD+sharp "
                  "| partial volume (truth image − geometry) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, s in table.items():
            lo, hi = s["retest_mae_ci"]
            lines.append(f"| {name} | {s['n_calcified']} | {s['retest_mae']:.1f} [{lo:.1f}, {hi:.1f}] "
                         f"| {100 * s['retest_cadrads_exact']:.0f} % | {s['retest_kappa']:.2f} "
                         f"| {s['retest_mae_all']:.1f} | {s['noise_made_severe']} | {s['truth_severe_below_50']} "
                         f"| {s['blooming']:+.1f} / {s['blooming_standard']:+.1f} / {s['blooming_hd_sharp']:+.1f} "
                         f"| {s['partial_volume']:+.1f} |")
        lines.append("")
    (out / "reader-smoothing.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def add_arguments(ap) -> None:
    ap.add_argument("--studies", type=int, default=80)
    ap.add_argument("--seed", type=int, default=e2.EXP2V2_TUNE_SEED,
                    help=f"study seed base; tuning is {e2.EXP2V2_TUNE_SEED} (never the held-out {e2.EXP2V2_SEED})")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--report-dir", default="reports/tuning")
