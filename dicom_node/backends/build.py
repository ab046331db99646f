"""Build a TensorRT plan from the ONNX model, for this GPU and this TensorRT version.

  python tools/build_engine.py --precision fp16 --validate     # engines/dense_unet.sm89.trt10.12.fp16.plan
  python tools/build_engine.py --check engines/dense_unet.sm89.trt10.12.fp16.plan

The plan goes beside the model, named after the GPU's compute capability and the
TensorRT version, with a JSON sidecar (``<plan>.json``: ONNX sha256, precision, batch
profile, TensorRT version, GPU, build time) that ``dicom-node serve`` with
``backend = "auto"`` uses to pick it up, and to refuse it once it no longer fits.

Precision: fp16 is written into the ONNX graph (``dicom_node.backends.fp16``: NAME.fp16.onnx,
float32 I/O) and built as a strongly typed network. TensorRT 10.12 deprecated
BuilderFlag.FP16 and TensorRT 11 removed it, so no precision flag is ever set here;
this works the same on TensorRT 10.x and 11.x.

--validate runs phantom footprint windows through the plan and through ONNX Runtime
(fp32 model, CPU) and fails (exit 1) past 2 HU mean / 20 HU max inside the mask
(fp16; fp32: 0.5 / 5), or if anything outside the mask changes. --check PLAN exits 1
if PLAN does not fit this GPU, this TensorRT or the ONNX model, and says how to rebuild.
Exit 2: no GPU/TensorRT here, or a build error.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from dicom_node.backends import plan as plans
from dicom_node.config import DEFAULT_MODEL

log = logging.getLogger("build_engine")


class BuildError(RuntimeError):
    pass


def onnx_precision(path: Path) -> str:
    """``dicom_node.precision`` from the model's metadata (fp32 when absent)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}.get("dicom_node.precision", "fp32")


def network_onnx(model: Path, precision: str, out_dir: Path) -> Path:
    """The ONNX TensorRT should parse: the model itself, or its fp16 copy (made now, from this model)."""
    from dicom_node.backends.fp16 import convert, fp16_path

    have = onnx_precision(model)
    if have == precision:
        return model
    if have == "fp16":
        raise BuildError(f"{model.name} is already an fp16 graph: use --precision fp16, or give the fp32 model")
    out = out_dir / fp16_path(model).name
    log.info("writing the fp16 graph %s from %s (network body fp16; I/O, normalisation and mask select fp32)",
             out.name, model.name)
    return convert(model, out)


def build_serialized(onnx_path: Path, profile: tuple[int, int, int], workspace_mib: int,
                     cache_path: Path) -> bytes:
    """Parse, configure and build; the timing cache is read first and saved after."""
    import tensorrt as trt

    from dicom_node.backends.tensorrt import trt_logger

    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    # STRONGLY_TYPED: TensorRT 10.x takes each tensor's type from the ONNX graph (our fp16 body, fp32 I/O) and
    # forbids precision flags; TensorRT 11 is always strongly typed and keeps the flag as a deprecated no-op.
    # EXPLICIT_BATCH is deprecated and ignored since TensorRT 10.0 (gone from 11), so it is not set.
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    for i in range(network.num_inputs):
        t = network.get_input(i)
        log.info("network input %s %s %s", t.name, t.dtype, tuple(t.shape))
    for i in range(network.num_outputs):
        t = network.get_output(i)
        log.info("network output %s %s %s", t.name, t.dtype, tuple(t.shape))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    # TF32 is on by default for float32 convolutions (10-bit mantissa); off, an fp32 plan is fp32. Our fp16 plans
    # keep only element-wise HU arithmetic in fp32, which TF32 never touched. TF32 is not among the precision
    # flags that strong typing removed (TensorRT 11's BuilderFlag still lists it); getattr in case one drops it.
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None:
        config.clear_flag(tf32)
    lo, opt, hi = profile
    shape = (1, 32, 32, 32)
    prof = builder.create_optimization_profile()
    for name in ("image", "mask"):
        prof.set_shape(name, (lo, *shape), (opt, *shape), (hi, *shape))
    if config.add_optimization_profile(prof) < 0:
        raise BuildError(f"TensorRT rejected the batch profile {profile}")

    blob = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(blob)
    # ignore_mismatch=False: a cache from another device or TensorRT version is refused rather than trusted.
    if cache is None or not config.set_timing_cache(cache, False):
        log.warning("timing cache %s not usable; starting an empty one", cache_path.name)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    else:
        log.info("timing cache %s (%d bytes)", cache_path.name, len(blob))

    log.info("building (profile min/opt/max %d/%d/%d, workspace %d MiB); the first build takes minutes",
             lo, opt, hi, workspace_mib)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError("TensorRT build failed (see the tensorrt log lines above)")
    saved = config.get_timing_cache().serialize()
    tmp = cache_path.with_name(cache_path.name + ".tmp")
    tmp.write_bytes(bytes(memoryview(saved)))
    tmp.replace(cache_path)
    return bytes(memoryview(serialized))


def validate(plan: Path, model: Path, network: Path, precision: str, n_patches: int) -> dict:
    """Plan vs ONNX Runtime (fp32 model, CPU) on phantom footprint windows; the fp16 ONNX on the CPU too."""
    from dicom_node.backends.onnxruntime import OnnxRuntimeBackend
    from dicom_node.backends.tensorrt import TensorRTBackend
    from dicom_node_lab.validate import compare, judge, phantom_patches

    images, masks = phantom_patches(n_patches)
    want = OnnxRuntimeBackend(model).run(images, masks)
    engine = TensorRTBackend(plan, max_batch=n_patches)
    try:
        t0 = time.perf_counter()
        got = engine.run(images, masks)
        seconds = time.perf_counter() - t0
    finally:
        engine.close()
    diff = compare(want, got, images, masks)
    passed, verdict = judge(diff, precision)
    result = {"passed": passed, "summary": verdict, "reference": f"onnxruntime cpu {model.name}",
              "tensorrt_vs_reference": diff.as_dict(), "tensorrt_seconds": round(seconds, 4), "at": plans.now_utc()}
    log.info("TensorRT vs ONNX Runtime (%s): %s", model.name, diff.summary())
    if network != model:
        cpu = compare(want, OnnxRuntimeBackend(network).run(images, masks), images, masks)
        result["onnx_fp16_cpu_vs_reference"] = cpu.as_dict()
        log.info("for comparison, %s in ONNX Runtime (CPU) vs %s: %s", network.name, model.name, cpu.summary())
    (log.info if passed else log.error)("validation %s: %s", "passed" if passed else "FAILED", verdict)
    return result


def cmd_check(plan: Path, model: Path) -> int:
    env = plans.probe()
    try:
        info = plans.read_sidecar(plan)
    except plans.SidecarError as exc:
        print(f"{plan.name}: rejected: {exc}")
        return 1
    digest = plans.sha256_file(model) if model.is_file() else None
    problems = plans.check(plan, info, env, digest)
    if not model.is_file():
        problems.append(f"model {model} not found, so the plan's ONNX hash cannot be checked")
    if problems:
        print(f"{plan.name}: rejected:")
        for p in problems:
            print(f"  - {p}")
        print(f"rebuild: python tools/build_engine.py --onnx {model} --precision {info.precision} --validate")
        return 1
    state = "validated" if info.validation else "not validated (run with --validate)"
    print(f"{plan.name}: ok for {env.gpu} ({env.sm}), TensorRT {env.tensorrt}, {model.name} "
          f"sha256:{info.model_sha256[:16]}; {info.precision}, profile {info.profile}; {state}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx", type=Path, default=DEFAULT_MODEL, help="the fp32 ONNX model (default: %(default)s)")
    ap.add_argument("--precision", choices=plans.PRECISIONS, default="fp16")
    ap.add_argument("--min-batch", type=int, default=plans.DEFAULT_PROFILE[0])
    ap.add_argument("--opt-batch", type=int, default=plans.DEFAULT_PROFILE[1])
    ap.add_argument("--max-batch", type=int, default=plans.DEFAULT_PROFILE[2])
    ap.add_argument("--workspace-mib", type=int, default=2048, help="TensorRT workspace limit (default: %(default)s)")
    ap.add_argument("--out-dir", type=Path, help="where the plan goes (default: the model's folder, where the node "
                                                   "looks for it)")
    ap.add_argument("--timing-cache", type=Path, help="default: OUT_DIR/sm<cc>.trt<version>.timing-cache")
    ap.add_argument("--validate", action="store_true", help="compare the plan with ONNX Runtime on phantom windows")
    ap.add_argument("--patches", type=int, default=32, help="windows for --validate (default: %(default)s)")
    ap.add_argument("--check", type=Path, metavar="PLAN", help="only check PLAN against this host and --onnx")
    ap.add_argument("-v", "--verbose", action="store_true", help="TensorRT's verbose log too")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = args.onnx.resolve()
    if args.check:
        return cmd_check(args.check, model)

    if not model.is_file():
        log.error("no model at %s", model)
        return 2
    profile = (args.min_batch, args.opt_batch, args.max_batch)
    if not 1 <= profile[0] <= profile[1] <= profile[2]:
        log.error("batch profile must satisfy 1 <= min <= opt <= max, got %s", profile)
        return 2
    env = plans.probe()
    blockers = env.tensorrt_blockers()
    if blockers or not env.compute_capability or not env.tensorrt:
        log.error("cannot build here: %s", "; ".join(blockers) or "GPU compute capability unknown")
        return 2
    log.info("host: %s (%s), driver %s, TensorRT %s, cuda-python %s", env.gpu, env.sm, env.driver, env.tensorrt,
             env.cuda_python)
    out_dir = (args.out_dir or model.parent).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        network = network_onnx(model, args.precision, out_dir)
        plan = out_dir / plans.plan_name(model.stem, env.compute_capability, env.tensorrt, args.precision)
        cache = args.timing_cache or out_dir / plans.timing_cache_name(env.compute_capability, env.tensorrt)
        t0 = time.perf_counter()
        serialized = build_serialized(network, profile, args.workspace_mib, cache)
        seconds = time.perf_counter() - t0
    except BuildError as exc:
        log.error("%s", exc)
        return 2
    except Exception as exc:  # noqa: BLE001 - TensorRT raises anything; the operator gets one line, exit 2
        log.error("TensorRT failed to build the plan: %s: %s", exc.__class__.__name__, str(exc).splitlines()[0]
                  if str(exc) else "")
        return 2
    tmp = plan.with_name(plan.name + ".tmp")
    tmp.write_bytes(serialized)
    tmp.replace(plan)
    info = plans.PlanInfo(
        plan=plan.name, plan_sha256=plans.sha256_file(plan), model=model.name, model_sha256=plans.sha256_file(model),
        onnx=network.name, onnx_sha256=plans.sha256_file(network), precision=args.precision,
        profile={"min": profile[0], "opt": profile[1], "max": profile[2]}, tensorrt=env.tensorrt,
        compute_capability=env.compute_capability, gpu=env.gpu or "", built_at=plans.now_utc(),
        build_seconds=round(seconds, 1), workspace_mib=args.workspace_mib)
    if args.validate:  # until validation passes, the sidecar says it has not: a crash leaves the plan unusable
        info.validation = {"passed": False, "summary": f"validation started {plans.now_utc()} and did not finish"}
    side = plans.write_sidecar(plan, info)
    log.info("wrote %s (%.1f MB, built in %.0f s) and %s", plan, plan.stat().st_size / 1e6, seconds, side.name)
    if not args.validate:
        log.info("not validated: engine.backend = \"auto\" will not use it; run again with --validate")
        return 0
    try:
        info.validation = validate(plan, model, network, args.precision, args.patches)
    except Exception as exc:  # noqa: BLE001 - the sidecar already marks the plan failed; say why in one line
        log.error("validation failed to run: %s: %s", exc.__class__.__name__, exc)
        return 2
    plans.write_sidecar(plan, info)
    if not info.validation["passed"]:
        log.error("the plan stays on disk but its sidecar marks it failed, so the node will not use it")
        return 1
    log.info("ready: dicom-node serve (engine.backend = \"auto\") will use %s on this host", plan.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
