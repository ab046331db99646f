"""The command line the lab's per-study diagnostics share: studies of a seed, the recommended detection or the
``--engine`` lines given, worker processes, one JSON with the summary.

Why: ``sharp_pieces`` and ``deposit_voxels`` ask different questions of the same studies as the engine detects
them (``experiment2v2.detected_study``); one runner keeps their arguments and output alike.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm


def run(argv: list[str] | None, description: str, job: Callable, summarise: Callable[[list], dict], *,
        studies: int, out: str, rows_key: str | None = None, flatten: bool = False,
        engine: list[str] | None = None) -> int:
    """Parse ``--studies --seed --engine --workers --out``, map ``job((seed, i, engine_lines))`` over the studies
    in worker processes, and write ``{studies, seed, engine, summary[, rows_key: rows]}`` to ``--out``, printing
    the summary. ``flatten``: each job returns a list of rows, joined into one. ``engine``: the lines used when
    none are given (None: the recommended detection, ``sharp_pieces.RECOMMENDED_DETECTION``)."""
    from dicom_node_lab.sharp_pieces import RECOMMENDED_DETECTION

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--studies", type=int, default=studies)
    ap.add_argument("--seed", type=int, default=6060)
    ap.add_argument("--engine", action="append", default=[], help="[engine] lines in place of the recommended ones")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=out)
    args = ap.parse_args(argv)
    engine = args.engine or engine or RECOMMENDED_DETECTION
    rows: list = []
    with ProcessPoolExecutor(args.workers) as pool:
        for r in tqdm(pool.map(job, [(args.seed, i, engine) for i in range(args.studies)]), total=args.studies,
                      desc="studies"):
            rows += r if flatten else [r]
    result = {"studies": args.studies, "seed": args.seed, "engine": engine, "summary": summarise(rows)}
    if rows_key:
        result[rows_key] = rows
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    return 0
