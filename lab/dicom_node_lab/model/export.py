"""ONNX export of a trained inpainter, with the contract every backend relies on.

Contract (see README, "The model contract"):
  inputs  ``image`` float32 [N,1,32,32,32] raw HU (calcium included)
          ``mask``  float32 [N,1,32,32,32], 1 = restore
  output  ``restored`` float32 [N,1,32,32,32] HU; equal to ``image`` outside the mask
Normalisation is inside the graph and N is dynamic. ``metadata_props`` carry what a
backend needs to use the model correctly (patch size, spacing, mask mode) and what a
reader needs to trust it (training summary).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from dicom_node_lab.model import inpaint
from dicom_node_lab.model.inpaint import Inpainter
from dicom_node_lab.patches import PATCH

OPSET = 17
SPACING_MM = 0.47


def metadata(state: dict) -> dict[str, str]:
    cfg = state["config"]
    summary = state.get("summary", {})
    return {
        "dicom_node.contract": "image,mask -> restored; HU in, HU out; restored == image outside mask",
        "dicom_node.patch_size": str(PATCH),
        "dicom_node.spacing_mm": f"{SPACING_MM}",
        "dicom_node.mask_mode": cfg["mask_mode"],
        "dicom_node.network": cfg["network"],
        "dicom_node.inputs": cfg.get("inputs", "hidden"),
        "dicom_node.calcium_evidence_hu": f"{inpaint.CALCIUM_EVIDENCE_HU}",
        "dicom_node.normalisation":
            f"(clip(HU,{inpaint.HU_MIN},{inpaint.HU_MAX})-{inpaint.HU_CENTRE})/{inpaint.HU_SCALE}",
        "dicom_node.training": json.dumps({k: summary.get(k) for k in
                                           ("steps", "train_seconds", "train_cpu_seconds", "val_mask_mse_hu2", "torch")}
                                          | {k: cfg.get(k) for k in ("lr", "schedule", "batch", "loss", "seed",
                                                                      "cpu_minutes", "mask_mode", "inputs")}),
        "dicom_node.training_data": "synthetic coronary CTA phantom (dicom_node_lab.phantom); no patient data",
    }


def export(model: Inpainter, state: dict, path: Path, fp16: bool = False) -> Path:
    """Write the ONNX graph with dynamic batch and the contract's metadata (``fp16``: its fp16 copy instead)."""
    import onnx

    model = model.eval()
    image = torch.zeros(2, 1, PATCH, PATCH, PATCH)
    mask = torch.zeros_like(image)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".onnx.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (image, mask), str(tmp), input_names=["image", "mask"],
                          output_names=["restored"], opset_version=OPSET, dynamo=False,
                          dynamic_axes={n: {0: "N"} for n in ("image", "mask", "restored")})
    proto = onnx.load(str(tmp))
    meta = metadata(state)
    meta["dicom_node.precision"] = "fp32"  # fp16 is derived from this graph below, at the ONNX level
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.producer_name = "dicom-node tools/export.py"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))
    tmp.replace(path)
    if fp16:  # body in float16, I/O and HU arithmetic in float32 (see dicom_node.backends.fp16)
        from dicom_node.backends.fp16 import convert

        convert(path, path)
    return path


def compare_with_onnxruntime(model: Inpainter, path: Path, images: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """Max and mean |ORT - torch| in HU inside the masks, to prove the export is faithful."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(["restored"], {"image": images, "mask": masks})[0]
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(images), torch.from_numpy(masks)).numpy()
    diff = np.abs(got - want)
    inside = masks > 0.5
    return {"max_abs_hu": float(diff.max()), "mean_abs_in_mask_hu": float(diff[inside].mean()),
            "outside_identical": bool(np.array_equal(got[~inside], images[~inside]))}
