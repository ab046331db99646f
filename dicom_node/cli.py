"""The ``dicom-node`` command.

Subcommands arrive with the capabilities they drive; each one is a thin layer over
a module that does the work, so the same code runs from the CLI, the server and tests.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .config import DEFAULT_MODEL


def cmd_model_info(args: argparse.Namespace) -> int:
    """Print the model's contract and training record, so an operator can see what runs."""
    import onnxruntime as ort

    path = Path(args.model)
    if not path.is_file():
        print(f"error: no model at {path}", file=sys.stderr)
        return 2
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    info = {
        "model": str(path),
        "inputs": {i.name: [d if isinstance(d, int) else str(d) for d in i.shape] for i in sess.get_inputs()},
        "outputs": {o.name: [d if isinstance(d, int) else str(d) for d in o.shape] for o in sess.get_outputs()},
        "metadata": {k: (json.loads(v) if k.endswith(".training") else v) for k, v in sorted(meta.items())},
    }
    print(json.dumps(info, indent=2))
    return 0


def cmd_process(args: argparse.Namespace) -> int:
    """Process CT series on disk into derived series and SEGs."""
    from tqdm import tqdm

    from .backends.select import BackendError, model_id, select
    from .config import ConfigError, load
    from .process import build_engine, process_inputs

    try:
        cfg = load(args.config)
        if args.backend:
            cfg.engine.backend = args.backend
        missing = [p for p in args.input if not Path(p).exists()]
        if missing:
            raise FileNotFoundError(f"input not found: {missing[0]}")
        backend, why = select(cfg.engine.backend, cfg.engine.model, cfg.engine.threads, cfg.engine.batch)
    except (ConfigError, BackendError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"backend: {why}", file=sys.stderr)
    bars: list = []

    def progress_factory(series):
        bar = tqdm(desc=f"{series.description or series.uid}"[:40], unit="window", leave=False,
                   disable=args.quiet or not sys.stderr.isatty())
        bars.append(bar)

        def update(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()
        return update

    engine = build_engine(cfg, backend)
    write_seg = cfg.output.write_seg and not args.no_seg
    outcomes, notes = process_inputs(args.input, Path(args.output), cfg, engine, model_id(cfg.engine.model),
                                     write_seg, progress_factory)
    for bar in bars:
        bar.close()
    for note in notes:
        print(f"skipped: {note}", file=sys.stderr)
    for o in outcomes:
        print(o.summary())
    done = [o for o in outcomes if o.status == "done"]
    if not done:
        reasons = [o.reason for o in outcomes] or ["no CT image series found in the input"]
        print(f"error: nothing processed: {reasons[0]}", file=sys.stderr)
        return 2
    return 0 if all(o.status != "failed" for o in outcomes) else 1


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dicom-node",
                                 description="Calcium-free coronary CTA, delivered through the PACS.")
    ap.add_argument("--version", action="version", version=f"dicom-node {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    mi = sub.add_parser("model-info", help="show the ONNX model's contract and training record")
    mi.add_argument("--model", default=str(DEFAULT_MODEL))
    mi.set_defaults(func=cmd_model_info)
    pr = sub.add_parser("process", help="remove calcium from CT series on disk (offline)")
    pr.add_argument("input", nargs="+", help="folders or files holding one or more CT series")
    pr.add_argument("output", help="folder that receives the derived series and SEGs")
    pr.add_argument("--config", help="config.toml (default: embedded defaults)")
    pr.add_argument("--backend", choices=("auto", "onnxruntime", "tensorrt"))
    pr.add_argument("--no-seg", action="store_true", help="do not write the DICOM SEG")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.set_defaults(func=cmd_process)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
