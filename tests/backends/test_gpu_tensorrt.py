"""End to end on a GPU host: build a plan with tools/build_engine.py, validate it, check it,
and run the TensorRT backend against ONNX Runtime.

Skipped, with the reason, wherever there is no NVIDIA GPU with TensorRT and cuda-python
(our CI has none; see README, "GPU hosts"). Builds take minutes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dicom_node.backends import plan as plans

ENV = plans.probe()
if ENV.tensorrt_blockers() or not ENV.compute_capability:
    pytest.skip("needs an NVIDIA GPU with TensorRT and cuda-python (pip install '.[gpu]'): "
                + ("; ".join(ENV.tensorrt_blockers()) or "GPU compute capability unknown"), allow_module_level=True)

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "engines" / "dense_unet.onnx"


def _build(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/build_engine.py", "--onnx", str(folder / MODEL.name), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=3600)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """The shipped model copied to a scratch folder, and the fp16 plan built and validated beside it."""
    folder = tmp_path_factory.mktemp("engines")
    shutil.copyfile(MODEL, folder / MODEL.name)
    done = _build(folder, "--precision", "fp16", "--validate", "--patches", "16")
    assert done.returncode == 0, done.stderr[-4000:]
    plan = folder / plans.plan_name("dense_unet", ENV.compute_capability, ENV.tensorrt, "fp16")
    return folder / MODEL.name, plan


def test_build_writes_plan_sidecar_fp16_onnx_and_timing_cache(built):
    model, plan = built
    assert plan.is_file()
    info = plans.read_sidecar(plan)
    assert info.precision == "fp16" and info.tensorrt == ENV.tensorrt
    assert info.compute_capability == ENV.compute_capability and info.gpu == ENV.gpu
    assert info.profile == {"min": 1, "opt": 8, "max": 32}
    assert info.model_sha256 == plans.sha256_file(model) and info.plan_sha256 == plans.sha256_file(plan)
    assert info.onnx == "dense_unet.fp16.onnx" and (model.parent / info.onnx).is_file()
    assert (model.parent / plans.timing_cache_name(ENV.compute_capability, ENV.tensorrt)).stat().st_size > 0
    v = info.validation
    assert v and v["passed"], v
    d = v["tensorrt_vs_reference"]
    assert d["mean_abs_hu"] <= 2.0 and d["max_abs_hu"] <= 20.0 and d["outside_identical"]


def test_check_accepts_the_plan_and_rejects_a_tampered_sidecar(built, tmp_path):
    model, plan = built
    done = subprocess.run([sys.executable, "tools/build_engine.py", "--check", str(plan), "--onnx", str(model)],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0 and ": ok for" in done.stdout, done.stdout + done.stderr
    copy = tmp_path / plan.name
    shutil.copyfile(plan, copy)
    data = json.loads(plans.sidecar_path(plan).read_text())
    data["tensorrt"] = "0.0.0"
    plans.sidecar_path(copy).write_text(json.dumps(data))
    done = subprocess.run([sys.executable, "tools/build_engine.py", "--check", str(copy), "--onnx", str(model)],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 1 and "rebuild" in done.stdout


def test_backend_matches_onnxruntime_splits_large_batches_and_keeps_the_contract(built):
    from dicom_node.backends.onnxruntime import OnnxRuntimeBackend
    from dicom_node.backends.tensorrt import TensorRTBackend
    from dicom_node_lab.validate import compare, judge, phantom_patches

    model, plan = built
    images, masks = phantom_patches(40)  # more than the profile's max (32): split into two executes
    want = OnnxRuntimeBackend(model).run(images, masks)
    backend = TensorRTBackend(plan, max_batch=64)
    try:
        assert backend.chunk == 32 and backend.profile == (1, 8, 32)
        got = backend.run(images, masks)
        one = backend.run(images[:1], masks[:1])
    finally:
        backend.close()
    assert got.shape == images.shape and got.dtype == np.float32
    for out, n in ((got, len(images)), (one, 1)):  # a batch of one may run other kernels: judge it on its own
        passed, verdict = judge(compare(want[:n], out, images[:n], masks[:n]), "fp16")
        assert passed, verdict


def test_auto_picks_the_plan(built):
    from dicom_node.backends.select import select

    model, plan = built
    backend, why = select("auto", model, batch=8)
    try:
        assert backend.name == "tensorrt" and plan.name in why, why
    finally:
        backend.close()
