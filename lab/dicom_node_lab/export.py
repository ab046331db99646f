"""Export a trained model to ONNX and prove ONNX Runtime matches PyTorch.

  python tools/export.py runs/exp1-dense_unet/model.pt --out engines/dense_unet.onnx [--fp16]

Fails (exit 1) if ONNX Runtime and PyTorch differ by more than --tolerance HU
anywhere on held-out phantom patches. --fp16 also writes the fp16 copy for
TensorRT (engines/dense_unet.fp16.onnx: network body in float16, I/O and HU
arithmetic in float32) and fails if, on the CPU, it leaves the fp16 limits
(2 HU mean, 20 HU max inside the mask) or changes anything outside the mask.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from dicom_node_lab.model.export import compare_with_onnxruntime, export
from dicom_node_lab.model.training import load_model, validation_set


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="model.pt or checkpoint.pt from tools/train.py")
    ap.add_argument("--out", type=Path, default=Path("engines/dense_unet.onnx"))
    ap.add_argument("--check-patches", type=int, default=16)
    ap.add_argument("--tolerance", type=float, default=0.5, help="max |ORT - torch| in HU")
    ap.add_argument("--fp16", action="store_true", help="also write OUT's fp16 copy (NAME.fp16.onnx) and check it")
    args = ap.parse_args(argv)
    model, state = load_model(args.model)
    export(model, state, args.out)
    patches = validation_set(args.check_patches, "mixed")
    images = np.concatenate([p[0].numpy() for p in patches])
    masks = np.concatenate([p[1].numpy() for p in patches])
    diff = compare_with_onnxruntime(model, args.out, images, masks)
    print(f"exported {args.out} ({args.out.stat().st_size / 1e6:.2f} MB); ONNX Runtime vs PyTorch on "
          f"{len(images)} patches: max {diff['max_abs_hu']:.4f} HU, mean in mask {diff['mean_abs_in_mask_hu']:.4f} HU, "
          f"outside mask identical: {diff['outside_identical']}")
    ok = diff["max_abs_hu"] <= args.tolerance and diff["outside_identical"]
    if args.fp16:
        ok = export_fp16(args.out, args.check_patches) and ok
    return 0 if ok else 1


def export_fp16(fp32: Path, n_patches: int) -> bool:
    """Write the fp16 copy beside ``fp32`` and compare the two in ONNX Runtime on footprint windows."""
    from dicom_node.backends.fp16 import convert, fp16_path
    from dicom_node.backends.onnxruntime import OnnxRuntimeBackend
    from dicom_node_lab.validate import compare, judge, phantom_patches

    out = convert(fp32, fp16_path(fp32))
    images, masks = phantom_patches(n_patches)
    want = OnnxRuntimeBackend(fp32).run(images, masks)
    got = OnnxRuntimeBackend(out).run(images, masks)
    diff = compare(want, got, images, masks)
    passed, verdict = judge(diff, "fp16")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB); fp16 vs fp32 in ONNX Runtime: {diff.summary()}; "
          f"{'ok' if passed else 'FAILED'}: {verdict}")
    return passed


if __name__ == "__main__":
    sys.exit(main())
