#!/usr/bin/env python3
"""Speed measurements. Figures go in the notes, never into timed tests.

  python tools/bench.py process            # 512×512×256 phantom CTA, about 10 lesions

process: times `dicom-node process` end to end on a 512×512×256 phantom CTA (written
once as DICOM into --cache), then each stage on its own: read (decode + modality LUT),
detect, plan, infer (with windows/s), resample back, write (derived series + SEG).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicom_node import phantom  # noqa: E402
from dicom_node.config import load  # noqa: E402
from dicom_node.phantom_dicom import write_phantom_series  # noqa: E402

BENCH_SEED = 4711


def bench_series(cache: Path, shape: tuple[int, int, int]) -> Path:
    """The benchmark study as DICOM, rendered once and reused."""
    folder = cache / f"cta-{shape[0]}x{shape[1]}x{shape[2]}-seed{BENCH_SEED}"
    if (folder / "done").exists():
        return folder
    print(f"rendering a {shape[2]}×{shape[1]}×{shape[0]} phantom CTA (once; cached in {folder}) ...", flush=True)
    opts = phantom.PhantomOptions(n_vessels=(4, 4), plaques_per_vessel=(2, 3), calcified_probability=0.8,
                                  branch_probability=0.5, lesion_margin_mm=8.0)
    p = phantom.generate(shape, seed=BENCH_SEED, options=opts)
    write_phantom_series(p, folder / "series", patient_id="BENCH-0001", patient_name="Bench^Phantom")
    (folder / "lesions.json").write_text(json.dumps([les.kind for les in p.lesions if les.calcified]))
    (folder / "done").write_text("ok")
    return folder


def bench_process(args: argparse.Namespace) -> int:
    from dicom_node.backends.select import model_id, select
    from dicom_node.dicom.derived import source_uids, write_derived_series
    from dicom_node.dicom.seg import write_seg
    from dicom_node.dicom.series import load_hu, read_ct_series
    from dicom_node.process import build_engine

    shape = tuple(args.shape)
    folder = bench_series(Path(args.cache), shape)
    out = Path(args.cache) / "out"
    cfg = load(args.config)
    cmd = [sys.executable, "-m", "dicom_node.cli", "process", str(folder / "series"), str(out / "e2e"), "--quiet",
           "--backend", "onnxruntime"] + (["--config", args.config] if args.config else [])
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    e2e = time.perf_counter() - t0
    if done.returncode != 0:
        print(done.stdout, done.stderr, file=sys.stderr)
        return 1
    stages: dict[str, float] = {}
    t = time.perf_counter()
    series, _ = read_ct_series([folder / "series"])
    volume = load_hu(series[0])
    stages["read"] = time.perf_counter() - t
    backend, why = select("onnxruntime", cfg.engine.model, cfg.engine.threads, cfg.engine.batch)
    engine = build_engine(cfg, backend)
    result = engine.run(volume, series[0].spacing)
    stages |= result.seconds
    mid = model_id(cfg.engine.model)
    t = time.perf_counter()
    uids = source_uids(series[0], mid)
    write_derived_series(series[0], volume, result.changed, out / "stages", mid, "benchmark")
    write_seg(series[0], result.detection.calcium, result.changed, out / "stages", mid, uids, {}, 1999)
    stages["write"] = time.perf_counter() - t
    report = {"shape_zyx": shape, "lesions_detected": len(result.detection.lesions), "windows": result.windows,
              "batches": result.batches, "end_to_end_s": round(e2e, 1),
              "stages_s": {k: round(v, 2) for k, v in stages.items()},
              "windows_per_s": round(result.windows / max(result.seconds["infer"], 1e-9), 1),
              "backend": why, "summary_line": done.stdout.strip()}
    print(json.dumps(report, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("process", help="time dicom-node process on a 512×512×256 phantom CTA")
    pr.add_argument("--shape", type=int, nargs=3, default=[256, 512, 512], metavar=("Z", "Y", "X"))
    pr.add_argument("--cache", default="runs/bench")
    pr.add_argument("--config", default=None)
    args = ap.parse_args(argv)
    return bench_process(args)


if __name__ == "__main__":
    sys.exit(main())
