"""``dicom-node doctor``: what this host has, and which backend the node would run on, and why.

The first thing to run on a new machine, and the first thing to ask for when a site
reports "it is slow": versions, GPU and driver, TensorRT, the model, the plans beside
it and whether each fits. Loads no backend, so it is safe next to a running node.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any

from dicom_node import __version__
from dicom_node.backends import plan as plans

PACKAGES: dict[str, tuple[str, ...]] = {  # shown name -> distribution names to try
    "pydicom": ("pydicom",),
    "pynetdicom": ("pynetdicom",),
    "highdicom": ("highdicom",),
    "numpy": ("numpy",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "onnx": ("onnx",),
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11"),
    "cuda-python": ("cuda-python", "cuda-bindings"),
}


def _model(path: Path) -> dict[str, Any]:
    from dicom_node.backends.select import model_id

    out: dict[str, Any] = {"path": str(path), "found": path.is_file()}
    if not path.is_file():
        return out
    out["model_id"] = model_id(path)
    try:
        import onnxruntime as ort

        meta = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta()
        out["precision"] = meta.custom_metadata_map.get("dicom_node.precision", "unknown")
    except Exception as exc:  # noqa: BLE001 - a broken model is exactly what doctor should show
        out["error"] = f"ONNX Runtime cannot load it: {exc}"
    return out


def report(model: str | Path, configured: str = "auto", env: plans.Environment | None = None) -> dict[str, Any]:
    """Everything doctor knows, as plain data (``--json`` prints it as is)."""
    env = env or plans.probe()
    model = Path(model)
    info: dict[str, Any] = {
        "dicom_node": __version__,
        "python": {"version": platform.python_version(), "executable": sys.executable, "platform": platform.platform()},
        "packages": {name: plans.dist_version(*dists) for name, dists in PACKAGES.items()},
        "gpu": ({"name": env.gpu, "compute_capability": env.compute_capability, "driver": env.driver}
                if env.gpu else None),
        "environment_notes": list(env.notes),
        "tensorrt": {"version": env.tensorrt, "cuda_python": env.cuda_python, "usable": not env.tensorrt_blockers(),
                     "blockers": env.tensorrt_blockers()},
        "model": _model(model),
        "plans": [],
        "configured_backend": configured,
    }
    if model.is_file():
        digest = plans.sha256_file(model)
        for f in plans.find_plans(model, env, digest):
            i = f.info
            info["plans"].append({
                "plan": str(f.plan), "ok": f.ok, "problems": f.problems,
                **({"precision": i.precision, "tensorrt": i.tensorrt, "sm": plans.sm_tag(i.compute_capability),
                    "gpu": i.gpu, "built_at": i.built_at, "profile": i.profile,
                    "validated": None if i.validation is None else bool(i.validation.get("passed"))} if i else {}),
            })
        for key, requested in (("auto", "auto"), ("configured", configured)):
            if key == "configured" and configured == "auto":
                continue
            choice = plans.decide(requested, model, env, digest)
            info[key] = {"backend": None if choice.error else choice.backend,
                         "reason": choice.error or choice.reason, "plan": str(choice.plan) if choice.plan else None}
    else:
        info["auto"] = {"backend": None, "reason": f"model not found: {model}", "plan": None}
    return info


def render(info: dict[str, Any]) -> str:
    """The report for a person: one fact per line, the verdict last."""
    py = info["python"]
    lines = [f"dicom-node {info['dicom_node']} on Python {py['version']} ({py['executable']}), {py['platform']}",
             "packages:"]
    lines += [f"  {name:<12} {v or 'not installed'}" for name, v in info["packages"].items()]
    gpu = info["gpu"]
    notes = "; ".join(n.split(":", 1)[1].strip() for n in info["environment_notes"] if n.startswith("gpu:"))
    lines.append(f"GPU:          {gpu['name']} (sm{gpu['compute_capability'].replace('.', '')}), driver {gpu['driver']}"
                 if gpu and gpu["compute_capability"] else
                 f"GPU:          {gpu['name']}, driver {gpu['driver']}" if gpu else
                 f"GPU:          none{f' ({notes})' if notes else ''}")
    trt = info["tensorrt"]
    lines.append(f"TensorRT:     {trt['version']} with cuda-python {trt['cuda_python']}, usable" if trt["usable"] else
                 f"TensorRT:     not usable: {'; '.join(trt['blockers'])}")
    m = info["model"]
    if m["found"]:
        extra = f", precision {m.get('precision')}" if "precision" in m else f"; {m.get('error')}"
        lines.append(f"model:        {m['path']} ({m['model_id']}{extra})")
    else:
        lines.append(f"model:        {m['path']} NOT FOUND")
    if not info["plans"]:
        lines.append(f"plans:        none beside the model (build one on a GPU host: {plans.BUILD_HINT})")
    else:
        lines.append(f"plans:        {len(info['plans'])} beside the model")
    for p in info["plans"]:
        head = f"  {Path(p['plan']).name}: " + ("ok" if p["ok"] else "rejected")
        if "precision" in p:
            head += (f" ({p['precision']}, TensorRT {p['tensorrt']}, {p['sm']} {p['gpu']}, built {p['built_at']}, "
                     f"validated: {p['validated']})")
        lines.append(head)
        lines += [f"      - {why}" for why in p["problems"]]
    auto = info["auto"]
    lines.append(f"backend auto: {auto['backend'] or 'none'} ({auto['reason']})")
    if "configured" in info:
        c = info["configured"]
        lines.append(f"configured:   {info['configured_backend']} -> {c['backend'] or 'ERROR'} ({c['reason']})")
    return "\n".join(lines)


def main(model: str | Path, configured: str = "auto", as_json: bool = False) -> int:
    info = report(model, configured)
    print(json.dumps(info, indent=2) if as_json else render(info))
    return 0
