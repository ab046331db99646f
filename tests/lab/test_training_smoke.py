"""CI smoke: a few real training steps, resume, export, and ONNX == PyTorch."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from dicom_node_lab.model.export import compare_with_onnxruntime, export
from dicom_node_lab.model.training import TrainConfig, load_model, train, validation_set

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


def test_reuse_sets_how_many_patches_each_rendered_volume_gives(monkeypatch):
    """A GPU trains faster than workers render; ``reuse`` trades rendering for patches per volume."""
    from dicom_node_lab.model import data

    rendered = []
    real = data.phantom.generate

    def counting(*args, **kwargs):
        rendered.append(kwargs.get("seed"))
        return real(*args, **kwargs)

    monkeypatch.setattr(data.phantom, "generate", counting)
    for reuse, volumes in ((3, 3), (9, 1)):
        rendered.clear()
        stream = iter(data.PhantomPatches(5, "cube16", reuse=reuse))  # cube masks: every cut succeeds
        for _ in range(9):
            next(stream)
        assert len(rendered) == volumes, f"reuse={reuse}: 9 patches from {len(rendered)} volumes"


def test_train_hands_reuse_to_the_patch_stream(monkeypatch, tmp_path):
    from dicom_node_lab.model import training

    seen = {}
    real = training.PhantomPatches

    def recording(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "PhantomPatches", recording)
    cfg = TrainConfig(steps=1, threads=1, workers=0, reuse=4, validation_patches=0, bn_calibration_batches=0)
    train(cfg, tmp_path, progress=False)
    assert seen["reuse"] == 4


@pytest.mark.gpu
def test_training_on_a_gpu_writes_a_model_that_loads_on_the_cpu(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to PyTorch (this project's CPU machines have none)")
    cfg = TrainConfig(steps=4, threads=1, workers=1, device="cuda", checkpoint_every=2, validation_patches=2,
                      validate_every=2, bn_calibration_batches=2)
    summary = train(cfg, tmp_path, progress=False)
    assert summary["steps"] == 4 and summary["device"] != "cpu"
    state = torch.load(tmp_path / "model.pt", map_location=None, weights_only=False)
    assert all(v.device.type == "cpu" for v in state["model"].values())
    cfg.steps = 6
    assert train(cfg, tmp_path, progress=False)["steps"] == 6, "a GPU run resumes from its checkpoint"
    model, _ = load_model(tmp_path / "model.pt")
    patches = validation_set(1, "mixed")
    assert torch.isfinite(model(patches[0][0], patches[0][1])).all()
