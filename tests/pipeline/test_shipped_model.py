"""The shipped ONNX model honours its contract and actually removes calcium."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from dicom_node_lab import phantom
from dicom_node_lab.patches import VOLUME, cut, training_options, volume_seed

from ..conftest import REPO

ONNX_PATH = REPO / "engines" / "dense_unet.onnx"
WEIGHTS = REPO / "engines" / "dense_unet.pt"


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    return ort.InferenceSession(str(ONNX_PATH), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def footprint_patches():
    rng = np.random.default_rng(11)
    out, i = [], 0
    while len(out) < 12:
        p = phantom.generate(VOLUME, seed=volume_seed(4242, i), options=training_options())
        i += 1
        patch = cut(rng, p, "footprint")
        if patch is not None:
            out.append(patch)
    return out


def test_contract(session):
    ins = {i.name: i for i in session.get_inputs()}
    outs = {o.name: o for o in session.get_outputs()}
    assert set(ins) == {"image", "mask"} and set(outs) == {"restored"}
    for t in list(ins.values()) + list(outs.values()):
        assert t.type == "tensor(float)"
        assert t.shape[1:] == [1, 32, 32, 32] and not isinstance(t.shape[0], int), "batch must be dynamic"
    meta = {p.key: p.value for p in onnx.load(str(ONNX_PATH)).metadata_props}
    for key in ("dicom_node.patch_size", "dicom_node.spacing_mm", "dicom_node.mask_mode", "dicom_node.training"):
        assert key in meta
    assert meta["dicom_node.spacing_mm"] == "0.47"
    assert json.loads(meta["dicom_node.training"])["steps"] > 100


def test_removes_calcium_and_keeps_everything_else(session, footprint_patches):
    images = np.stack([p.image for p in footprint_patches])[:, None]
    masks = np.stack([p.mask for p in footprint_patches])[:, None]
    targets = np.stack([p.target for p in footprint_patches])[:, None]
    restored = session.run(["restored"], {"image": images, "mask": masks})[0]
    inside = masks > 0.5
    assert np.array_equal(restored[~inside], images[~inside])
    before = float(((images - targets)[inside] ** 2).mean())
    after = float(((restored - targets)[inside] ** 2).mean())
    assert after < 0.25 * before, f"in-mask MSE {after:.0f} HU² vs {before:.0f} HU² with the calcium left in"
    one = session.run(["restored"], {"image": images[:1], "mask": masks[:1]})[0]
    assert np.allclose(one, restored[:1], atol=1e-3), "batch size must not change results"


def test_onnx_matches_the_shipped_pytorch_weights(footprint_patches):
    torch = pytest.importorskip("torch")
    from dicom_node_lab.model.export import compare_with_onnxruntime
    from dicom_node_lab.model.training import load_model

    torch.set_num_threads(2)
    model, _ = load_model(WEIGHTS)
    images = np.stack([p.image for p in footprint_patches])[:, None]
    masks = np.stack([p.mask for p in footprint_patches])[:, None]
    diff = compare_with_onnxruntime(model, ONNX_PATH, images, masks)
    assert diff["max_abs_hu"] <= 0.5
