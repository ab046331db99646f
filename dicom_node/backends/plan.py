"""TensorRT plans on disk: their names, their JSON sidecars, and whether one fits this host.

A plan is only valid for the GPU architecture (compute capability) and the exact
TensorRT version that built it, and for the ONNX model it was built from. Deserializing
a stale plan fails, or worse, works on a model that is no longer the one configured.
So every plan has a sidecar ``<plan>.json`` that records where it came from, and this
module decides from the sidecar alone, without CUDA or TensorRT, so CI can test it.

The environment is a plain dataclass: ``probe()`` fills it from the host (importing
tensorrt and cuda-python lazily, and only to read versions and device properties), and
tests build it by hand to simulate a GPU host.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import shutil
import subprocess
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SIDECAR_FORMAT = 1
PRECISIONS = ("fp32", "fp16")
DEFAULT_PROFILE = (1, 8, 32)  # min, opt, max windows per call
# Accepted |TensorRT - ONNX Runtime fp32| inside the mask, in HU: (mean, max). The fp16 limits are the
# issue's; fp32 (TF32 off) should agree to rounding, so anything visible there is a bug.
TOLERANCE_HU: dict[str, tuple[float, float]] = {"fp16": (2.0, 20.0), "fp32": (0.5, 5.0)}
BUILD_HINT = "python tools/build_engine.py --precision fp16 --validate"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Environment:
    """What this host offers the TensorRT path. None means absent; ``notes`` say why."""

    gpu: str | None = None  # device 0's name, e.g. "NVIDIA L4"
    compute_capability: str | None = None  # "8.9"
    driver: str | None = None  # NVIDIA driver version, e.g. "550.54.15"
    tensorrt: str | None = None  # tensorrt.__version__, e.g. "10.12.0.36"
    cuda_python: str | None = None  # cuda-python / cuda-bindings version
    notes: tuple[str, ...] = ()

    @property
    def sm(self) -> str | None:
        return sm_tag(self.compute_capability) if self.compute_capability else None

    def tensorrt_blockers(self) -> list[str]:
        """Why the TensorRT backend cannot run here at all, whatever the plan (empty: it can)."""
        out = []
        if not self.gpu:
            out.append("no NVIDIA GPU found" + _why(self.notes, "gpu"))
        if not self.tensorrt:
            out.append("tensorrt is not installed (pip install '.[gpu]' on a GPU host; see README)"
                       + _why(self.notes, "tensorrt"))
        if not self.cuda_python:
            out.append("cuda-python is not installed (part of the [gpu] extra)")
        return out


def _why(notes: tuple[str, ...], topic: str) -> str:
    hits = [n.split(":", 1)[1].strip() for n in notes if n.startswith(f"{topic}:")]
    return f" ({'; '.join(hits)})" if hits else ""


def sm_tag(compute_capability: str) -> str:
    """"8.9" -> "sm89"."""
    return "sm" + compute_capability.replace(".", "")


def trt_tag(version: str) -> str:
    """"10.12.0.36" -> "trt10.12" (the file name shows major.minor; the sidecar keeps the full version)."""
    parts = version.split(".")
    return "trt" + ".".join(parts[:2])


def plan_name(model_stem: str, compute_capability: str, tensorrt: str, precision: str) -> str:
    """E.g. ``dense_unet.sm89.trt10.12.fp16.plan``: never mistaken for a plan of another GPU or TensorRT."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return f"{model_stem}.{sm_tag(compute_capability)}.{trt_tag(tensorrt)}.{precision}.plan"


def timing_cache_name(compute_capability: str, tensorrt: str) -> str:
    """Timing caches are per GPU and TensorRT version too, but shared by every model built there."""
    return f"{sm_tag(compute_capability)}.{trt_tag(tensorrt)}.timing-cache"


def sidecar_path(plan: str | Path) -> Path:
    p = Path(plan)
    return p.with_name(p.name + ".json")


@dataclass
class PlanInfo:
    """The sidecar: everything needed to decide, without TensorRT, whether a plan fits."""

    plan: str  # file name of the plan, next to the sidecar
    plan_sha256: str
    model: str  # the ONNX model the node is configured with (file name)
    model_sha256: str
    onnx: str  # the ONNX TensorRT parsed: the model itself (fp32) or its fp16 copy
    onnx_sha256: str
    precision: str
    profile: dict[str, int]  # {"min": 1, "opt": 8, "max": 32}
    tensorrt: str
    compute_capability: str
    gpu: str
    built_at: str  # UTC, ISO 8601
    build_seconds: float
    workspace_mib: int
    validation: dict[str, Any] | None = None  # filled by --validate
    format: int = SIDECAR_FORMAT

    @property
    def max_batch(self) -> int:
        return int(self.profile["max"])


def now_utc() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_sidecar(plan: str | Path, info: PlanInfo) -> Path:
    path = sidecar_path(plan)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(info), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


class SidecarError(ValueError):
    pass


def read_sidecar(plan: str | Path) -> PlanInfo:
    path = sidecar_path(plan)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SidecarError(f"{path.name} is missing: the plan's origin is unknown, rebuild it ({BUILD_HINT})") from None
    except json.JSONDecodeError as exc:
        raise SidecarError(f"{path.name} is not valid JSON ({exc}); rebuild the plan ({BUILD_HINT})") from None
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        data = data if isinstance(data, dict) else {}
        raise SidecarError(f"{path.name} has sidecar format {data.get('format')!r}, expected {SIDECAR_FORMAT}; "
                           f"rebuild the plan ({BUILD_HINT})")
    known = set(PlanInfo.__dataclass_fields__)
    try:
        return PlanInfo(**{k: v for k, v in data.items() if k in known})
    except TypeError as exc:
        raise SidecarError(f"{path.name} lacks fields ({exc}); rebuild the plan ({BUILD_HINT})") from None


def check(plan: str | Path, info: PlanInfo, env: Environment, model_sha256: str | None = None,
          verify_plan_hash: bool = True, require_validation: bool = True) -> list[str]:
    """Every reason the plan cannot be used on this host for this model; empty means it fits.

    A plan never validated against ONNX Runtime is not used by ``auto`` (only when TensorRT is asked for
    by name): its sidecar is written before validation starts, as failed, so a crash during it leaves a
    plan marked unusable, never one that looks untested-but-fine."""
    problems: list[str] = []
    plan = Path(plan)
    if not plan.is_file():
        problems.append(f"{plan.name} is missing (only its sidecar is there)")
    elif verify_plan_hash and sha256_file(plan) != info.plan_sha256:
        problems.append(f"{plan.name} does not match the sha256 in its sidecar (changed or truncated)")
    if env.compute_capability is None:
        problems.append(f"built for {sm_tag(info.compute_capability)} ({info.gpu}) but no GPU is visible here")
    elif env.compute_capability != info.compute_capability:
        problems.append(f"built for {sm_tag(info.compute_capability)} ({info.gpu}) but this GPU is "
                        f"{sm_tag(env.compute_capability)} ({env.gpu})")
    if env.tensorrt is None:
        problems.append(f"built with TensorRT {info.tensorrt} but TensorRT is not installed here")
    elif env.tensorrt != info.tensorrt:
        # A plan is tied to the exact TensorRT version that built it (unless built version-compatible, which we don't).
        problems.append(f"built with TensorRT {info.tensorrt} but TensorRT {env.tensorrt} is installed")
    if model_sha256 is not None and info.model_sha256 != model_sha256:
        problems.append(f"built from {info.model} sha256:{info.model_sha256[:16]}, but the configured model is "
                        f"sha256:{model_sha256[:16]}")
    v = info.validation
    if v is None:
        if require_validation:
            problems.append(f"not validated against ONNX Runtime (rebuild with {BUILD_HINT})")
    elif not v.get("passed", False):
        problems.append(f"failed validation against ONNX Runtime ({v.get('summary', 'see sidecar')})")
    if info.precision not in PRECISIONS:
        problems.append(f"unknown precision {info.precision!r}")
    return problems


@dataclass
class FoundPlan:
    plan: Path
    info: PlanInfo | None
    problems: list[str]

    @property
    def ok(self) -> bool:
        return self.info is not None and not self.problems


def find_plans(model: str | Path, env: Environment, model_sha256: str | None = None,
               require_validation: bool = True) -> list[FoundPlan]:
    """Every plan beside ``model`` (by sidecar, plus plans without one), checked; newest build first.

    Plans built from another model are left out: they are not candidates, not problems.
    """
    model = Path(model)
    digest = model_sha256 or sha256_file(model)
    found: list[FoundPlan] = []
    seen: set[Path] = set()
    for side in sorted(model.parent.glob("*.plan.json")):
        plan = side.with_name(side.name[:-len(".json")])
        seen.add(plan)
        try:
            info = read_sidecar(plan)
        except SidecarError as exc:
            found.append(FoundPlan(plan, None, [str(exc)]))
            continue
        if info.model_sha256 != digest:
            continue
        found.append(FoundPlan(plan, info, check(plan, info, env, digest, require_validation=require_validation)))
    for plan in sorted(model.parent.glob(f"{model.stem}.*.plan")):
        if plan not in seen:
            found.append(FoundPlan(plan, None, [f"{plan.name} has no sidecar: its origin is unknown, rebuild it"]))
    found.sort(key=lambda f: f.info.built_at if f.info else "", reverse=True)
    return found


@dataclass(frozen=True)
class Choice:
    """What ``auto`` (or an explicit request) resolves to, and the one-line reason an operator sees."""

    backend: str  # "onnxruntime" | "tensorrt"
    reason: str
    plan: Path | None = None
    info: PlanInfo | None = None
    error: str | None = None  # set when "tensorrt" was requested and cannot be had


def decide(requested: str, model: str | Path, env: Environment, model_sha256: str | None = None) -> Choice:
    """Pick the backend from the environment and the plans beside the model; loads nothing."""
    if requested == "onnxruntime":
        return Choice("onnxruntime", "requested")
    blockers = env.tensorrt_blockers()
    if blockers:
        why = "; ".join(blockers)
        if requested == "tensorrt":
            return Choice("onnxruntime", why, error=f"tensorrt backend requested but {why}")
        # Without a GPU the rest is beside the point (a CPU host needs no TensorRT); with one, say all.
        return Choice("onnxruntime", f"auto: {blockers[0] if not env.gpu else why}")
    plans = find_plans(model, env, model_sha256, require_validation=requested == "auto")
    usable = [f for f in plans if f.ok]
    if usable:
        best = usable[0]
        assert best.info is not None
        reason = (f"{'auto' if requested == 'auto' else 'requested'}: {env.gpu} ({env.sm}), TensorRT {env.tensorrt}, "
                  f"plan {best.plan.name} ({best.info.precision}) matches")
        if best.info.validation is None:
            reason += " (not validated; run tools/build_engine.py --validate)"
        return Choice("tensorrt", reason, best.plan, best.info)
    model = Path(model)
    if plans:
        why = "; ".join(f"{f.plan.name}: {', '.join(f.problems)}" for f in plans)
        why = f"no usable TensorRT plan for {model.name} in {model.parent} ({why}); rebuild with {BUILD_HINT}"
    else:
        why = f"no TensorRT plan for {model.name} in {model.parent}; build one with {BUILD_HINT}"
    if requested == "tensorrt":
        return Choice("onnxruntime", why, error=f"tensorrt backend requested but {why}")
    return Choice("onnxruntime", f"auto: {why}")


# ---- probing the host (lazy imports; never raises) ------------------------------------------------------------


def _nvidia_smi() -> tuple[dict[str, str] | None, str | None]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None, "nvidia-smi not found"
    note = None
    # compute_cap is a query field only in newer drivers; older ones refuse it, so ask again without it.
    for query, names in (("name,driver_version,compute_cap", ("name", "driver", "compute_capability")),
                         ("name,driver_version", ("name", "driver"))):
        try:
            done = subprocess.run([exe, f"--query-gpu={query}", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"nvidia-smi failed: {exc}"
        if done.returncode == 0 and done.stdout.strip():
            fields = [f.strip() for f in done.stdout.strip().splitlines()[0].split(",")]
            return {k: v for k, v in zip(names, fields) if v and v != "[N/A]"}, None
        note = f"nvidia-smi: {(done.stderr or done.stdout).strip()[:200] or f'exit {done.returncode}'}"
    return None, note


def _cuda_device() -> tuple[dict[str, str] | None, str | None]:
    """Device 0 through cuda-python's runtime bindings: name and compute capability."""
    try:
        from cuda.bindings import runtime as cudart
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable here"
        return None, f"cuda-python: {exc}"
    try:
        err, count = cudart.cudaGetDeviceCount()
        if err != cudart.cudaError_t.cudaSuccess:
            return None, f"cudaGetDeviceCount: {getattr(err, 'name', err)}"
        if count < 1:
            return None, "cuda-python sees no device"
        err, prop = cudart.cudaGetDeviceProperties(0)
        if err != cudart.cudaError_t.cudaSuccess:
            return None, f"cudaGetDeviceProperties: {getattr(err, 'name', err)}"
        name = prop.name.decode(errors="replace").rstrip("\x00") if isinstance(prop.name, bytes) else str(prop.name)
        return {"name": name, "compute_capability": f"{prop.major}.{prop.minor}"}, None
    except Exception as exc:  # noqa: BLE001
        return None, f"cuda-python: {exc}"


def dist_version(*names: str) -> str | None:
    """The installed version of the first of these distributions found (wheels differ by CUDA build)."""
    for n in names:
        try:
            return importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def probe() -> Environment:
    """Look at this host. Imports tensorrt and cuda-python only if installed, and never raises."""
    notes: list[str] = []
    trt_version = None
    if importlib.util.find_spec("tensorrt") is not None:
        try:
            import tensorrt

            trt_version = str(tensorrt.__version__)
        except Exception as exc:  # noqa: BLE001 - a broken or stub install is reported, not raised
            notes.append(f"tensorrt: import failed: {exc}")
    cuda_python = None
    try:
        if importlib.util.find_spec("cuda") is not None and importlib.util.find_spec("cuda.bindings") is not None:
            cuda_python = dist_version("cuda-python", "cuda-bindings") or "unknown"
    except (ImportError, ValueError) as exc:  # a "cuda" package that is not cuda-python
        notes.append(f"cuda-python: {exc}")
    smi, smi_note = _nvidia_smi()
    dev, dev_note = _cuda_device() if cuda_python else (None, None)
    gpu = (dev or {}).get("name") or (smi or {}).get("name")
    cc = (dev or {}).get("compute_capability") or (smi or {}).get("compute_capability")
    driver = (smi or {}).get("driver")
    if gpu is None:
        notes += [f"gpu: {n}" for n in (smi_note, dev_note) if n]
    return Environment(gpu=gpu, compute_capability=cc, driver=driver, tensorrt=trt_version,
                       cuda_python=cuda_python, notes=tuple(notes))
