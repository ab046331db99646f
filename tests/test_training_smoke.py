"""CI smoke: a few real training steps, resume, export, and ONNX == PyTorch."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from dicom_node.model.export import compare_with_onnxruntime, export
from dicom_node.model.training import TrainConfig, load_model, train, validation_set

pytestmark = pytest.mark.slow


def test_train_resume_export_and_onnx_matches_torch(tmp_path):
    cfg = TrainConfig(steps=6, lr=1e-3, threads=2, workers=1, checkpoint_every=3, validate_every=3,
                      validation_patches=2, bn_calibration_batches=2)
    first = train(cfg, tmp_path, progress=False)
    assert first["steps"] == 6
    cfg.steps = 9
    second = train(cfg, tmp_path, progress=False)
    assert second["steps"] == 9, "a second run resumes from the checkpoint instead of starting over"
    log = [json.loads(line) for line in (tmp_path / "train.log").read_text().splitlines()]
    assert any("val_mask_mse_hu2" in entry for entry in log)

    model, state = load_model(tmp_path / "model.pt")
    path = export(model, state, tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["dicom_node.patch_size"] == "32" and meta["dicom_node.mask_mode"] == "mixed"
    assert json.loads(meta["dicom_node.training"])["steps"] == 9
    patches = validation_set(3, "mixed")
    images = np.concatenate([p[0].numpy() for p in patches])
    masks = np.concatenate([p[1].numpy() for p in patches])
    diff = compare_with_onnxruntime(model, path, images, masks)
    assert diff["max_abs_hu"] <= 0.5
    assert diff["outside_identical"]
