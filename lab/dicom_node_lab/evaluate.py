"""The paper's experiments, on held-out phantom data with a real ground truth.

  python tools/evaluate.py experiment1 --patches 200
  python tools/evaluate.py experiment2 --studies 32
  python tools/evaluate.py experiment2v2 --studies 120

experiment1: restore a centre cube (16³ and 8³) that hides a stretch of vessel with
no calcium, and measure MSE against the truth, for every network and the classical
baselines. Writes reports/experiment1.md and reports/experiment1.png.

experiment2: write phantom CTA studies as DICOM, run them through `dicom-node process`
(footprint masks, and the paper's cube masks), read the derived series back and
measure diameter stenosis at every calcified lesion in the original, the processed
and the true image with one method; also, in-process, the engine on the phantom's
true calcium and on its own detection plus the visible true calcium, to separate
detection's error from the restoration's. Writes
reports/experiment2.md and .png.

experiment2v2: the calibrated world (world.py) read by the reader model (reader.py), on
held-out seeds and held-out scanner settings (the standard kernel, motion above 0.7 mm):
bias, error, limits of agreement, CAD-RADS agreement and the ≥ 50 / ≥ 70 % decisions
before and after processing, by stratum; safety and the engine's confidence flag. Writes
reports/experiment2v2.md, .json and .png.
"""

from __future__ import annotations

import argparse
import sys

from dicom_node_lab import calibration, experiment2v2, reader_tuning, reading_guide
from dicom_node_lab.experiment1 import experiment1
from dicom_node_lab.experiment2 import EXP2_RUNS, EXP2_SEED, EXP2_TUNE_SEED, experiment2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e1 = sub.add_parser("experiment1", help="inpainting accuracy on hidden, calcium-free vessel")
    e1.add_argument("--patches", type=int, default=200)
    e1.add_argument("--runs", default="runs", help="folder with exp1-<network>/model.pt")
    e1.add_argument("--report-dir", default="reports")
    e1.add_argument("--example", type=int, default=0, help="which patch the figure shows")
    e1.add_argument("--threads", type=int, default=2)
    e2 = sub.add_parser("experiment2", help="stenosis at calcified lesions: original vs processed vs truth")
    e2.add_argument("--studies", type=int, default=32)
    e2.add_argument("--runs", nargs="+", default=[r[0] for r in EXP2_RUNS], choices=[r[0] for r in EXP2_RUNS],
                    help="which (model, mask mode) runs to compare")
    e2.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                    help="extra [engine] setting (TOML) for every run, e.g. 'adaptive_threshold = true'")
    e2.add_argument("--report-dir", default="reports")
    e2.add_argument("--model", help="a candidate ONNX model in place of the shipped one (engines/dense_unet.onnx)")
    e2.add_argument("--in-process", action="store_true",
                    help="run the engine in this process instead of DICOM through `dicom-node process`: "
                         "faster, same readings; for comparing settings on tuning studies")
    e2.add_argument("--seed", type=int, default=EXP2_SEED,
                    help=f"study seed base; {EXP2_SEED} is the held-out test set, {EXP2_TUNE_SEED} the tuning set")
    e3 = sub.add_parser("experiment2v2", help="the calibrated world: calcified stenoses before and after, by stratum")
    experiment2v2.add_arguments(e3)
    th = sub.add_parser("thresholds", help="the unsure flag at other thresholds, from an experiment2v2 report's JSON")
    th.add_argument("report", help="experiment2v2.json (or its --report-dir; A+B: runs pooled) of a run with "
                    "engine.confidence on")
    th.add_argument("--at", type=float, nargs="+", required=True, metavar="HU", help="thresholds to try")
    th.add_argument("--large", type=float, default=10.0, help="an error over this many points is large")
    fg = sub.add_parser("flag-grid", help="issue 16's goals on the restorations called sure, under other unsure flags")
    fg.add_argument("report", help="experiment2v2.json (or its --report-dir; A+B: runs pooled) of a run that "
                    "measured the disagreement and the calibre")
    fg.add_argument("--disagreement", type=float, nargs="+", default=[float("inf")], metavar="HU",
                    help="disagreement thresholds to try (inf: not used)")
    fg.add_argument("--vessel", type=float, nargs="+", required=True, metavar="MM",
                    help="calibre thresholds to try (0: not used)")
    fg.add_argument("--faint", type=float, nargs="+", default=[0.0], metavar="HU",
                    help="thresholds on the calcium's measured contrast over the lumen to try (0: not used)")
    fg.add_argument("--lumen", type=float, nargs="+", default=[0.0], metavar="HU",
                    help="thresholds on the engine's measured lumen level to try (unsure_lumen_hu; 0: not used)")
    fg.add_argument("--enclosure", type=float, nargs="+", default=[float("inf")], metavar="SHARE",
                    help="thresholds on how far the detected calcium encloses the lumen (0-1, the engine's "
                    "calcium_enclosure; inf: not used)")
    sc = sub.add_parser("safety-cases", help="the lesions behind an experiment2v2 report's safety figures")
    sc.add_argument("report", help="experiment2v2.json or its --report-dir (A+B: runs pooled)")
    rw = sub.add_parser("rewrite", help="write an experiment2v2 report again from its JSON (today's strata, no rerun)")
    rw.add_argument("report", help="experiment2v2.json")
    cmp = sub.add_parser("compare", help="experiment2v2 runs side by side, each paired against the first")
    cmp.add_argument("reports", nargs="+", help="runs on the same studies, each its --report-dir or its "
                     "experiment2v2.json (the first: reference); A+B reads two runs as one, e.g. two held-out sets "
                     "pooled")
    bl = sub.add_parser("by-lumen", help="experiment2v2 runs' calcified lesions by their true lumen level (and the "
                        "oracle images where a run read them)")
    bl.add_argument("reports", nargs="+", help="runs, each its --report-dir or its experiment2v2.json")
    sp = sub.add_parser("splice", help="one run's readings with another's (or the original's) where the node "
                        "reported something: what a region-level option would give, before building it")
    sp.add_argument("base", help="experiment2v2.json (or its --report-dir) whose lesions and report are kept")
    sp.add_argument("--from", dest="source", help="a run on the same studies whose processed readings are taken "
                    "(default: the original's, i.e. left as acquired)")
    sp.add_argument("--where", choices=experiment2v2.SPLICE_WHERE, required=True,
                    help="which lesions, by what base's engine reported for the regions reaching them")
    sp.add_argument("--vessel-mm", type=float, help="small-vessel: calibre under this (default: the node's "
                    "unsure_vessel_mm default)")
    sp.add_argument("--lumen-hu", type=float, default=0.0, help="dim-lumen: the engine's measured lumen level under "
                    "this (HU; a base run that recorded it)")
    sp.add_argument("--out", required=True, help="where the spliced experiment2v2.json goes (for compare)")
    rg = sub.add_parser("reading-guide", help="where the derived series may be read: held-out lesions by what the "
                        "console shows and what the node says, with the guide's advice")
    reading_guide.add_arguments(rg)
    cal = sub.add_parser("calibration", help="the world's blooming against the issue's 2D check, XCIST and the gate")
    calibration.add_arguments(cal)
    rs = sub.add_parser("reader-smoothing",
                        help="the reader's smoothing per kernel, by its test-retest on tuning studies")
    reader_tuning.add_arguments(rs)
    args = ap.parse_args(argv)
    if args.cmd == "reader-smoothing":
        return reader_tuning.run(args)
    if args.cmd == "calibration":
        return calibration.report(args)
    if args.cmd == "thresholds":
        return experiment2v2.thresholds_report(args)
    if args.cmd == "flag-grid":
        return experiment2v2.flag_grid_report(args)
    if args.cmd == "splice":
        return experiment2v2.splice_report(args)
    if args.cmd == "reading-guide":
        return reading_guide.report(args)
    if args.cmd == "compare":
        return experiment2v2.compare_report(args)
    if args.cmd == "by-lumen":
        return experiment2v2.by_lumen_report(args)
    if args.cmd == "rewrite":
        return experiment2v2.rewrite(args)
    if args.cmd == "safety-cases":
        return experiment2v2.safety_cases_report(args)
    if args.cmd == "experiment2v2":
        return experiment2v2.run(args)
    return experiment1(args) if args.cmd == "experiment1" else experiment2(args)


if __name__ == "__main__":
    sys.exit(main())
