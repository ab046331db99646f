"""The parts of the GPU path that need no GPU: the fp16 ONNX, plan names and sidecars,
the plan check, backend selection on simulated hosts, ``doctor`` and ``build_engine --check``.

The TensorRT calls themselves are exercised by test_gpu_tensorrt.py on a GPU host.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dicom_node.backends import fp16
from dicom_node.backends import plan as plans
from dicom_node.backends import select as select_mod
from dicom_node.backends.onnxruntime import OnnxRuntimeBackend
from dicom_node_lab.validate import compare, judge, phantom_patches

from ..support import trt_standin

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "engines" / "dense_unet.onnx"

GPU_HOST = plans.Environment(gpu="NVIDIA L4", compute_capability="8.9", driver="550.54.15",
                             tensorrt="10.12.0.36", cuda_python="12.9.0")
NO_GPU = plans.Environment(notes=("gpu: nvidia-smi not found",))


# ---- the fp16 ONNX ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp16_model(tmp_path_factory) -> Path:
    return fp16.convert(MODEL, tmp_path_factory.mktemp("fp16") / "dense_unet.fp16.onnx")


def _types(model: onnx.ModelProto) -> dict[str, int]:
    g = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def test_fp16_graph_keeps_float32_io_and_hu_arithmetic(fp16_model):
    src, out = onnx.load(str(MODEL)), onnx.load(str(fp16_model))
    g = out.graph
    assert [(i.name, i.type.tensor_type.elem_type) for i in g.input] == [("image", TensorProto.FLOAT),
                                                                         ("mask", TensorProto.FLOAT)]
    assert [(o.name, o.type.tensor_type.elem_type) for o in g.output] == [("restored", TensorProto.FLOAT)]
    types = _types(out)
    convs = [n for n in g.node if n.op_type == "Conv"]
    assert convs and all(types[n.input[1]] == TensorProto.FLOAT16 for n in convs)  # the body really is fp16
    for n in g.node:  # the normalisation, the HU de-normalisation and the mask select never see fp16
        if n.op_type in ("Clip", "Div", "Greater", "Where"):
            assert all(types.get(x) != TensorProto.FLOAT16 for x in n.input if x), n.name
    where = next(n for n in g.node if n.op_type == "Where")
    assert where.output[0] == "restored" and where.input[2] == "image"
    # metadata: every key of the source, with precision fp16 and the source's hash
    meta = {p.key: p.value for p in out.metadata_props}
    src_meta = {p.key: p.value for p in src.metadata_props}
    assert {k: v for k, v in meta.items() if k in src_meta and k != "dicom_node.precision"} == \
        {k: v for k, v in src_meta.items() if k != "dicom_node.precision"}
    assert meta["dicom_node.precision"] == "fp16"
    assert meta["dicom_node.fp16_source"] == f"dense_unet.onnx sha256:{plans.sha256_file(MODEL)}"
    assert fp16_model.stat().st_size < 0.7 * MODEL.stat().st_size  # weights halved


@pytest.mark.slow
def test_fp16_matches_fp32_on_footprint_windows(fp16_model):
    """The issue's limits, inside the mask; bit-for-bit outside it."""
    images, masks = phantom_patches(8)
    want = OnnxRuntimeBackend(MODEL, threads=1).run(images, masks)
    got = OnnxRuntimeBackend(fp16_model, threads=1).run(images, masks)
    diff = compare(want, got, images, masks)
    passed, verdict = judge(diff, "fp16")
    assert passed, verdict
    assert diff.mean_abs_hu <= 2.0 and diff.max_abs_hu <= 20.0
    assert diff.outside_identical
    assert np.array_equal(got[masks <= 0.5], images[masks <= 0.5])
    assert diff.max_abs_hu > 0.0  # it is a different graph: identical output would mean nothing was converted
    assert diff.masked_voxels > 1000


def _tiny(ops_between: list[str], direct_output: bool = False) -> onnx.ModelProto:
    """x -> scale -> Conv -> ops -> Conv -> (+x) -> y: pre/post arithmetic around a conv body."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(0, 0.3, (4, 1, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.3, (1, 4, 3, 3, 3)).astype(np.float32), "w2")
    scale = numpy_helper.from_array(np.array(0.01, np.float32), "scale")
    nodes = [helper.make_node("Mul", ["x", "scale"], ["xs"]),
             helper.make_node("Conv", ["xs", "w1"], ["c1"], pads=[1] * 6)]
    last = "c1"
    for k, op in enumerate(ops_between):
        nodes.append(helper.make_node(op, [last], [f"o{k}"]))
        last = f"o{k}"
    if direct_output:
        nodes.append(helper.make_node("Conv", [last, "w2"], ["y"], pads=[1] * 6))
    else:
        nodes += [helper.make_node("Conv", [last, "w2"], ["c2"], pads=[1] * 6),
                  helper.make_node("Add", ["c2", "xs"], ["y"])]
    shape = ["N", 1, 8, 8, 8]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], [w1, w2, scale])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("direct_output", [False, True])
def test_to_fp16_on_a_generic_graph(direct_output):
    model = _tiny(["Relu"], direct_output)
    out = fp16.to_fp16(model)
    types = _types(out)
    assert types["x"] == types["y"] == TensorProto.FLOAT
    assert types["xs"] == TensorProto.FLOAT  # before the first conv: fp32
    assert types["w1__fp16"] == types["w2__fp16"] == TensorProto.FLOAT16
    assert "w1" not in types  # the fp32 weights are gone
    x = np.random.default_rng(1).normal(0, 100, (2, 1, 8, 8, 8)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    got = ort.InferenceSession(out.SerializeToString()).run(None, {"x": x})[0]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=1e-2)


def test_to_fp16_refuses_ops_nobody_checked():
    with pytest.raises(ValueError, match="Softsign"):
        fp16.to_fp16(_tiny(["Softsign"]))


def test_to_fp16_needs_a_convolution():
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    with pytest.raises(ValueError, match="no convolution"):
        fp16.to_fp16(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_convert_refuses_an_fp16_graph(fp16_model, tmp_path):
    with pytest.raises(ValueError, match="already an fp16"):
        fp16.convert(fp16_model, tmp_path / "again.onnx")
    assert fp16.fp16_path(MODEL).name == "dense_unet.fp16.onnx"


# ---- plan names, sidecars and the check --------------------------------------------------------------------------


def test_plan_names():
    assert plans.plan_name("dense_unet", "8.9", "10.12.0.36", "fp16") == "dense_unet.sm89.trt10.12.fp16.plan"
    assert plans.plan_name("dense_unet", "12.0", "11.4.0.106", "fp32") == "dense_unet.sm120.trt11.4.fp32.plan"
    assert plans.timing_cache_name("9.0", "10.12.0.36") == "sm90.trt10.12.timing-cache"
    assert plans.sidecar_path("engines/a.plan") == Path("engines/a.plan.json")
    with pytest.raises(ValueError, match="precision"):
        plans.plan_name("dense_unet", "8.9", "10.12.0.36", "int8")


def test_plans_and_caches_are_never_committed():
    ignored = [line.strip() for line in (REPO / ".gitignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for name in ("dense_unet.sm89.trt10.12.fp16.plan", "dense_unet.sm89.trt10.12.fp16.plan.json",
                 plans.timing_cache_name("8.9", "10.12.0.36")):
        assert any(fnmatch.fnmatch(f"engines/{name}", pat) for pat in ignored), name


VALIDATED = {"passed": True, "summary": "ok"}


def make_plan(folder: Path, model: Path, env: plans.Environment = GPU_HOST, precision: str = "fp16",
              validation: dict | None = VALIDATED, built_at: str = "2026-01-01T00:00:00Z", **changes) -> Path:
    """A fake plan (random bytes) with a sidecar as tools/build_engine.py --validate writes it."""
    plan = folder / plans.plan_name(model.stem, changes.get("compute_capability", env.compute_capability),
                                    changes.get("tensorrt", env.tensorrt), precision)
    plan.write_bytes(np.random.default_rng(len(str(plan))).bytes(4096))
    info = plans.PlanInfo(
        plan=plan.name, plan_sha256=plans.sha256_file(plan), model=model.name, model_sha256=plans.sha256_file(model),
        onnx=model.name, onnx_sha256=plans.sha256_file(model), precision=precision,
        profile={"min": 1, "opt": 8, "max": 32}, tensorrt=env.tensorrt, compute_capability=env.compute_capability,
        gpu=env.gpu, built_at=built_at, build_seconds=61.0, workspace_mib=2048, validation=validation)
    for k, v in changes.items():
        setattr(info, k, v)
    plans.write_sidecar(plan, info)
    return plan


@pytest.fixture
def model(tmp_path) -> Path:
    dst = tmp_path / "dense_unet.onnx"
    shutil.copyfile(MODEL, dst)
    return dst


def test_sidecar_round_trip(model):
    plan = make_plan(model.parent, model, validation={"passed": True, "summary": "ok"})
    info = plans.read_sidecar(plan)
    assert info.plan == plan.name and info.precision == "fp16" and info.max_batch == 32
    assert info.tensorrt == "10.12.0.36" and info.compute_capability == "8.9" and info.gpu == "NVIDIA L4"
    assert info.model_sha256 == plans.sha256_file(model)
    data = json.loads(plans.sidecar_path(plan).read_text())
    assert data["profile"] == {"min": 1, "opt": 8, "max": 32} and data["format"] == plans.SIDECAR_FORMAT


def test_sidecar_errors_say_rebuild(model):
    plan = model.parent / "x.plan"
    with pytest.raises(plans.SidecarError, match="missing.*rebuild"):
        plans.read_sidecar(plan)
    plans.sidecar_path(plan).write_text("{not json")
    with pytest.raises(plans.SidecarError, match="not valid JSON"):
        plans.read_sidecar(plan)
    plans.sidecar_path(plan).write_text(json.dumps({"format": 99}))
    with pytest.raises(plans.SidecarError, match="format 99"):
        plans.read_sidecar(plan)


def test_check_accepts_a_matching_plan(model):
    plan = make_plan(model.parent, model)
    assert plans.check(plan, plans.read_sidecar(plan), GPU_HOST, plans.sha256_file(model)) == []


@pytest.mark.parametrize(("env", "expect"), [
    (replace(GPU_HOST, compute_capability="8.6", gpu="NVIDIA A10"), r"built for sm89 \(NVIDIA L4\).*sm86"),
    (replace(GPU_HOST, tensorrt="10.13.3.9"), r"TensorRT 10.12.0.36 but TensorRT 10.13.3.9"),
    (replace(GPU_HOST, tensorrt="10.12.0.37"), r"TensorRT 10.12.0.36 but TensorRT 10.12.0.37"),  # exact version
    (NO_GPU, r"no GPU is visible"),
])
def test_check_rejects_another_host(model, env, expect):
    plan = make_plan(model.parent, model)
    problems = plans.check(plan, plans.read_sidecar(plan), env, plans.sha256_file(model))
    assert any(re.search(expect, p) for p in problems), problems


def test_check_rejects_another_model_a_changed_plan_and_a_failed_validation(model):
    plan = make_plan(model.parent, model, validation={"passed": False, "summary": "max 31.0 HU > 20.0"})
    info = plans.read_sidecar(plan)
    problems = plans.check(plan, info, GPU_HOST, "0" * 64)
    assert any("configured model" in p for p in problems)
    assert any("failed validation" in p and "31.0" in p for p in problems)
    plan.write_bytes(b"truncated")
    assert any("does not match the sha256" in p for p in plans.check(plan, info, GPU_HOST))
    plan.unlink()
    assert any("missing" in p for p in plans.check(plan, info, GPU_HOST))


# ---- selection on simulated hosts --------------------------------------------------------------------------------


def test_auto_without_gpu_is_onnxruntime(model):
    c = plans.decide("auto", model, NO_GPU)
    assert c.backend == "onnxruntime" and c.error is None
    assert c.reason.startswith("auto: no NVIDIA GPU found")


def test_tensorrt_requested_without_gpu_is_a_clear_error(model):
    c = plans.decide("tensorrt", model, NO_GPU)
    assert c.error and "tensorrt backend requested but no NVIDIA GPU found" in c.error
    assert "tensorrt is not installed" in c.error
    with pytest.raises(select_mod.BackendError, match="tensorrt backend requested but no NVIDIA GPU"):
        select_mod.select("tensorrt", model, env=NO_GPU)


def test_gpu_without_tensorrt(model):
    c = plans.decide("auto", model, replace(GPU_HOST, tensorrt=None))
    assert c.backend == "onnxruntime" and "tensorrt is not installed" in c.reason
    c = plans.decide("auto", model, replace(GPU_HOST, cuda_python=None))
    assert c.backend == "onnxruntime" and "cuda-python is not installed" in c.reason


def test_gpu_and_tensorrt_but_no_plan(model):
    c = plans.decide("auto", model, GPU_HOST)
    assert c.backend == "onnxruntime" and "no TensorRT plan for dense_unet.onnx" in c.reason
    assert plans.BUILD_HINT in c.reason
    assert plans.decide("tensorrt", model, GPU_HOST).error


def test_gpu_tensorrt_and_matching_plan_is_tensorrt(model):
    plan = make_plan(model.parent, model, validation={"passed": True, "summary": "ok"})
    c = plans.decide("auto", model, GPU_HOST)
    assert (c.backend, c.plan, c.error) == ("tensorrt", plan, None)
    assert "NVIDIA L4 (sm89)" in c.reason and plan.name in c.reason and "not validated" not in c.reason


def test_stale_plan_falls_back_and_says_rebuild(model):
    make_plan(model.parent, model, compute_capability="8.6", gpu="NVIDIA A10")
    c = plans.decide("auto", model, GPU_HOST)
    assert c.backend == "onnxruntime" and "sm86" in c.reason and "rebuild" in c.reason
    c = plans.decide("auto", model, replace(GPU_HOST, compute_capability="8.6", tensorrt="10.13.0.35"))
    assert c.backend == "onnxruntime" and "TensorRT 10.12.0.36 but TensorRT 10.13.0.35" in c.reason


def test_plans_of_other_models_are_ignored_and_the_newest_match_wins(model):
    other = model.parent / "other.onnx"
    other.write_bytes(b"another model")
    make_plan(model.parent, other)
    assert "no TensorRT plan" in plans.decide("auto", model, GPU_HOST).reason
    old = make_plan(model.parent, model, precision="fp32", built_at="2026-01-01T00:00:00Z")
    new = make_plan(model.parent, model, precision="fp16", built_at="2026-02-01T00:00:00Z")
    assert plans.decide("auto", model, GPU_HOST).plan == new
    make_plan(model.parent, model, precision="fp16", built_at="2026-02-01T00:00:00Z",
              validation={"passed": False, "summary": "mean 3 HU > 2.0"})
    assert plans.decide("auto", model, GPU_HOST).plan == old  # a failed validation is never used


def test_auto_refuses_a_plan_never_validated_or_whose_validation_never_finished(model):
    """The sidecar is written before validation runs, marked failed until it passes: a build whose
    validation crashed leaves a plan that auto refuses. A plan built without --validate is refused by
    auto too, and used only when TensorRT is asked for by name, with the reason saying so."""
    plan = make_plan(model.parent, model, validation={"passed": False, "summary": "validation started "
                                                      "2026-01-01T00:00:00Z and did not finish"})
    c = plans.decide("auto", model, GPU_HOST)
    assert c.backend == "onnxruntime" and "did not finish" in c.reason
    make_plan(model.parent, model, validation=None)
    c = plans.decide("auto", model, GPU_HOST)
    assert c.backend == "onnxruntime" and "not validated against ONNX Runtime" in c.reason
    c = plans.decide("tensorrt", model, GPU_HOST)
    assert (c.backend, c.plan, c.error) == ("tensorrt", plan, None) and "not validated" in c.reason


def test_a_plan_without_sidecar_is_rejected(model):
    (model.parent / "dense_unet.sm89.trt10.12.fp16.plan").write_bytes(b"x")
    c = plans.decide("auto", model, GPU_HOST)
    assert c.backend == "onnxruntime" and "no sidecar" in c.reason


class FakeTensorRT:
    """Stands in for TensorRTBackend: records how select() built it."""

    name = "tensorrt"
    fail: str | None = None

    def __init__(self, plan, max_batch=8):
        if FakeTensorRT.fail:
            raise RuntimeError(FakeTensorRT.fail)
        self.plan, self.max_batch = Path(plan), max_batch


@pytest.fixture
def fake_trt(monkeypatch):
    import dicom_node.backends.tensorrt as trt_mod

    FakeTensorRT.fail = None
    monkeypatch.setattr(trt_mod, "TensorRTBackend", FakeTensorRT)
    return FakeTensorRT


def test_select_wires_a_matching_plan_into_the_tensorrt_backend(model, fake_trt, caplog):
    plan = make_plan(model.parent, model)
    with caplog.at_level("INFO", logger="dicom_node.backends.select"):
        backend, why = select_mod.select("auto", model, threads=1, batch=16, env=GPU_HOST)
    assert isinstance(backend, FakeTensorRT) and backend.plan == plan and backend.max_batch == 16
    assert why.startswith("tensorrt (auto: NVIDIA L4 (sm89)") and "not validated" not in why
    assert any("backend: tensorrt" in r.getMessage() for r in caplog.records)


def test_select_falls_back_when_the_plan_does_not_load(model, fake_trt):
    make_plan(model.parent, model)
    fake_trt.fail = "Serialization assertion failed"
    backend, why = select_mod.select("auto", model, threads=1, env=GPU_HOST)
    assert backend.name == "onnxruntime" and "failed to load" in why and "Serialization" in why
    with pytest.raises(select_mod.BackendError, match="requested but .* failed to load"):
        select_mod.select("tensorrt", model, threads=1, env=GPU_HOST)


def test_select_keeps_its_old_signature_and_probes_this_host(model):
    backend, why = select_mod.select("auto", model, 1, 4)
    assert backend.max_batch == 4 and why.startswith(("onnxruntime (auto:", "tensorrt (auto:"))
    assert select_mod.select("onnxruntime", model, 1, 4)[1] == "onnxruntime (requested)"
    with pytest.raises(select_mod.BackendError, match="unknown backend"):
        select_mod.select("cuda", model)


def test_nothing_on_the_import_path_needs_cuda():
    code = ("import sys; import dicom_node.cli, dicom_node.pipeline.process, dicom_node.doctor, "
            "dicom_node.backends.select, dicom_node.backends.tensorrt, dicom_node.backends.plan, "
            "dicom_node.backends.fp16; "
            "bad = [m for m in ('tensorrt', 'cuda', 'torch') if m in sys.modules]; assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr


# ---- doctor and build_engine --check, as a person runs them ------------------------------------------------------


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_doctor_reports_versions_model_plans_and_the_choice(model):
    stale = make_plan(model.parent, model, compute_capability="0.1", tensorrt="0.0.0", gpu="Nonexistent GPU")
    done = _run("-m", "dicom_node.cli", "doctor", "--model", str(model))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for needle in ("packages:", "pydicom", "pynetdicom", "highdicom", "numpy", "onnxruntime", "tensorrt",
                   "cuda-python", "GPU:", "TensorRT:", f"{model} (dense_unet sha256:", "precision fp32",
                   f"{stale.name}: rejected", "sm01", "backend auto: onnxruntime ("):
        assert needle in out, (needle, out)
    info = json.loads(_run("-m", "dicom_node.cli", "doctor", "--model", str(model), "--json").stdout)
    assert info["auto"]["backend"] == "onnxruntime"
    assert info["model"]["precision"] == "fp32" and info["model"]["model_id"].startswith("dense_unet sha256:")
    assert [p["ok"] for p in info["plans"]] == [False] and info["plans"][0]["sm"] == "sm01"
    assert set(info["packages"]) >= {"pydicom", "pynetdicom", "highdicom", "numpy", "onnxruntime", "tensorrt",
                                     "cuda-python"}


def test_doctor_on_a_simulated_gpu_host(model):
    from dicom_node import doctor

    plan = make_plan(model.parent, model, validation={"passed": True, "summary": "ok"})
    info = doctor.report(model, "onnxruntime", env=GPU_HOST)
    text = doctor.render(info)
    assert "GPU:          NVIDIA L4 (sm89), driver 550.54.15" in text
    assert "TensorRT:     10.12.0.36 with cuda-python 12.9.0, usable" in text
    assert f"{plan.name}: ok (fp16, TensorRT 10.12.0.36, sm89 NVIDIA L4" in text
    assert "backend auto: tensorrt (" in text
    assert "configured:   onnxruntime -> onnxruntime (requested)" in text


def test_build_engine_check_rejects_a_stale_plan(model):
    plan = make_plan(model.parent, model, compute_capability="0.1", tensorrt="0.0.0")
    done = _run("tools/build_engine.py", "--check", str(plan), "--onnx", str(model))
    assert done.returncode == 1, done.stderr
    assert f"{plan.name}: rejected" in done.stdout and "TensorRT 0.0.0" in done.stdout
    assert f"rebuild: python tools/build_engine.py --onnx {model} --precision fp16" in done.stdout
    plans.sidecar_path(plan).unlink()
    done = _run("tools/build_engine.py", "--check", str(plan), "--onnx", str(model))
    assert done.returncode == 1 and "is missing" in done.stdout and "rebuild" in done.stdout


@pytest.mark.skipif(not plans.probe().tensorrt_blockers(), reason="this host can build; test_gpu_tensorrt covers it")
def test_build_engine_without_gpu_says_why(model):
    done = _run("tools/build_engine.py", "--onnx", str(model), "--precision", "fp16")
    assert done.returncode == 2
    assert "cannot build here" in done.stderr and "no NVIDIA GPU" in done.stderr
    assert not list(model.parent.glob("*.plan"))


# ---- our TensorRT code against a stand-in runtime (see trt_standin.py for what this does and does not prove) -----


@pytest.mark.slow
def test_tensorrt_backend_batches_pads_and_copies_through_pinned_buffers(monkeypatch, model, tmp_path):
    from dicom_node.backends.tensorrt import TensorRTBackend

    _, rt = trt_standin.install(monkeypatch)
    plan = tmp_path / "standin.plan"
    plan.write_bytes(f"STANDIN-PLAN 2 8 8 {model}".encode())  # profile min 2, max 8
    backend = TensorRTBackend(plan, max_batch=32)
    engine = backend.engine
    assert (backend.profile, backend.chunk, backend.max_batch) == ((2, 8, 8), 8, 32)
    assert engine.executions == [8, 2]  # warm-up: a full chunk, then one window padded to the profile's minimum
    assert rt.calls.count("cudaMalloc") == 3 and rt.calls.count("cudaMallocHost") == 3
    images, masks = phantom_patches(3)
    images, masks = np.concatenate([images] * 7), np.concatenate([masks] * 7)  # 21 windows
    engine.executions.clear()
    got = backend.run(images, masks)
    assert engine.executions == [8, 8, 5]  # split at the profile's max, no padding needed
    one = backend.run(images[:1], masks[:1])
    assert engine.executions[-1] == 2  # padded up to the minimum; the padding is dropped
    assert rt.calls.count("cudaMalloc") == 3  # buffers allocated once, reused for every batch
    want = OnnxRuntimeBackend(model, threads=1).run(images, masks)
    np.testing.assert_allclose(got, want, atol=1e-2)  # in order, nothing lost or duplicated, padding dropped
    np.testing.assert_allclose(one, want[:1], atol=1e-2)
    backend.close()
    assert not rt.buffers  # every device and pinned host buffer freed
    with pytest.raises(select_mod.BackendError, match="closed"):
        backend.run(images[:1], masks[:1])


@pytest.mark.slow
def test_build_engine_flow_with_a_stand_in_tensorrt(monkeypatch, model, caplog):
    """tools/build_engine.py end to end (fp16 ONNX, plan, sidecar, timing cache, --validate), TensorRT stood in."""
    from dicom_node.backends import build as tool

    trt, _ = trt_standin.install(monkeypatch)
    host = replace(GPU_HOST, tensorrt=trt.__version__)
    monkeypatch.setattr(plans, "probe", lambda: host)
    with caplog.at_level("INFO"):
        rc = tool.main(["--onnx", str(model), "--precision", "fp16", "--validate", "--patches", "4"])
    assert rc == 0, caplog.text
    plan = model.parent / "dense_unet.sm89.trt10.12.fp16.plan"
    info = plans.read_sidecar(plan)
    assert info.onnx == "dense_unet.fp16.onnx" and info.onnx_sha256 == plans.sha256_file(model.parent / info.onnx)
    assert plan.read_bytes().endswith(b"dense_unet.fp16.onnx")  # TensorRT parsed the fp16 graph, not the model
    assert info.model_sha256 == plans.sha256_file(model) and info.profile == {"min": 1, "opt": 8, "max": 32}
    assert info.validation["passed"] and info.validation["tensorrt_vs_reference"]["patches"] == 4
    assert "onnx_fp16_cpu_vs_reference" in info.validation
    assert (model.parent / "sm89.trt10.12.timing-cache").read_bytes() == b"timing"
    assert plans.decide("auto", model, host).plan == plan
    assert tool.cmd_check(plan, model) == 0
    assert tool.cmd_check(plan, MODEL.parent / "missing.onnx") == 1


def _build_tool(monkeypatch):
    from dicom_node.backends import build as tool

    trt, _ = trt_standin.install(monkeypatch)
    monkeypatch.setattr(plans, "probe", lambda: replace(GPU_HOST, tensorrt=trt.__version__))
    return trt, tool


@pytest.mark.slow
def test_build_engine_exits_2_with_one_line_when_tensorrt_raises(monkeypatch, model, caplog):
    trt, tool = _build_tool(monkeypatch)

    def boom(self, network, config):
        raise RuntimeError("[builder.cpp::buildSerializedNetwork::123] Error Code 2: out of memory\n(details...)")

    monkeypatch.setattr(trt.Builder, "build_serialized_network", boom)
    assert tool.main(["--onnx", str(model), "--precision", "fp16"]) == 2
    [line] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "RuntimeError" in line and "Error Code 2" in line and "\n" not in line
    assert not list(model.parent.glob("*.plan"))


@pytest.mark.slow
def test_a_validation_that_crashes_leaves_a_plan_auto_refuses(monkeypatch, model, caplog):
    _, tool = _build_tool(monkeypatch)

    def crash(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(tool, "validate", crash)
    assert tool.main(["--onnx", str(model), "--precision", "fp16", "--validate"]) == 2
    plan = model.parent / "dense_unet.sm89.trt10.12.fp16.plan"
    assert plan.is_file() and plans.read_sidecar(plan).validation["passed"] is False
    c = plans.decide("auto", model, replace(GPU_HOST, tensorrt=trt_standin.VERSION))
    assert c.backend == "onnxruntime" and "did not finish" in c.reason
