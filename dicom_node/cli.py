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

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "engines" / "dense_unet.onnx"


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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dicom-node",
                                 description="Calcium-free coronary CTA, delivered through the PACS.")
    ap.add_argument("--version", action="version", version=f"dicom-node {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    mi = sub.add_parser("model-info", help="show the ONNX model's contract and training record")
    mi.add_argument("--model", default=str(DEFAULT_MODEL))
    mi.set_defaults(func=cmd_model_info)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
