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
from dicom_node.config import EngineConfig
from dicom_node.pipeline.restore import SHARPENED_ONLY_REASON
from dicom_node.pipeline.subtract import kernel_key

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


def unsure_rules(engine: EngineConfig) -> dict[str, Any]:
    """What makes a restoration unsure, per method the node may run, and what is then done with it.

    Why: the flag decides which lesions a radiologist may read on the derived series and which on the
    original (reports/tuning/confidence-coverage.md); an administrator should see it without reading the
    config's comments.
    """
    methods = ("network", "subtract") if engine.method == "auto" else (engine.method,)
    rules: dict[str, list[str]] = {}
    for method in methods:
        why = []
        if method == "network" and engine.confidence:
            why.append(f"flip disagreement over {engine.unsure_hu:g} HU")
        if method == "subtract" and engine.confidence and engine.subtract_unsure_hu > 0:
            measure = "estimate" if engine.subtract_companions else "blur"
            why.append(f"{measure} disagreement over {engine.subtract_unsure_hu:g} HU")
        if engine.unsure_vessel_mm > 0:
            why.append(f"vessel under {engine.unsure_vessel_mm:g} mm")
        if engine.unsure_lumen_hu > 0:
            why.append(f"lumen dimmer than {engine.unsure_lumen_hu:g} HU")
        if method == "subtract" and engine.unsure_enclosure > 0:
            why.append(f"calcium enclosing the lumen over {engine.unsure_enclosure:g}")
        # the sharpened-image test runs for every series, but under auto for the subtraction's only
        if engine.sharp_contrast_hu > 0 and not (engine.method == "auto" and method == "network"):
            why.append(SHARPENED_ONLY_REASON)
        rules[method] = why
    return {"action": engine.unsure_action, "rules": rules}


def _sharpening(options: Any) -> dict[str, Any]:
    """How the subtraction sharpens before it estimates the calcium, and who decided: a learnt estimate's own file
    (it is fed what it was trained on) or ``engine.subtract_anatomy_hu`` (the rule's)."""
    ceiling = options.sharpening_ceiling_hu
    return {"method": "split" if ceiling > 0 else "plain", "anatomy_above_level_hu": ceiling,
            "set_by": "the estimate's file" if options.learnt is not None else "engine.subtract_anatomy_hu"}


def engine_report(engine: EngineConfig) -> dict[str, Any]:
    """The restoration the node runs and, for the subtraction, the blur it assumes for each listed kernel.

    Why: the subtraction's result hangs on the kernel tables, which a site fills by hand (or from
    ``dicom-node measure-kernel``); a kernel listed in one table and not the other, or tables under the
    network, silently do less than the site thinks.
    """
    out: dict[str, Any] = {"method": engine.method, "kernels": [], "notes": [], "unsure": unsure_rules(engine)}
    auto = engine.method == "auto"
    if engine.method == "network":
        if engine.scanner_kernels or engine.scanner_edge_enhance or engine.subtract_white_by_kernel:
            out["notes"].append('the kernel tables apply to method = "subtract" or "auto" only; '
                                'this node runs the network')
        return out
    options = engine.subtract_options()
    out["estimate"] = engine.subtract_estimate or "rule"
    detector = engine.detect_options()
    if detector.learnt is not None:  # it decides which voxels are restored: say which file, how and how sure
        out["detector"] = {"file": engine.detect_learnt, "mode": detector.learnt_mode,
                           "probability": detector.probability()}
    out["sharpening"] = _sharpening(options)
    if options.companions:  # every region restored once per estimate: which is written, and how each sharpens
        out["companions"] = [{"estimate": path, "sharpening": _sharpening(o)}
                             for path, o in zip(engine.subtract_companions, options.estimates()[1:])]
        out["combine"] = options.combine
    if options.uses_dim():  # regions beside a dim lumen get their own estimate: which, and under what level
        out["dim"] = {"estimate": engine.subtract_dim_estimate, "below_hu": options.dim_below_hu}
    elif engine.subtract_dim_estimate:
        out["notes"].append("engine.subtract_dim_estimate is set but subtract_dim_lumen_hu is 0: it is never used")
    if options.learnt is not None and engine.subtract_anatomy_hu > 0 \
            and engine.subtract_anatomy_hu != options.learnt.anatomy_above_level_hu:
        out["notes"].append(f"engine.subtract_anatomy_hu = {engine.subtract_anatomy_hu:g} applies to the white-level "
                            "rule only: the learnt estimate sharpens as it was trained (its file says "
                            f"{options.learnt.anatomy_above_level_hu:g})")

    def assumed(o: Any) -> dict[str, float]:
        return {"mtf50_lp_cm": o.blur.mtf50_lp_cm, "edge_enhance": o.blur.edge_enhance,
                "white_above_lumen_hu": o.white_above_lumen_hu}

    names: dict[str, str] = {}
    for table in (engine.scanner_kernels, engine.scanner_edge_enhance, engine.subtract_white_by_kernel):
        for name in table:
            names.setdefault(kernel_key(name), name)
    listed_mtf = {kernel_key(n) for n in engine.scanner_kernels}
    listed_lift = {kernel_key(n) for n in engine.scanner_edge_enhance}
    for key, name in names.items():
        chosen = {"method": "subtract" if key in listed_mtf else "network"} if auto else {}
        out["kernels"].append({"kernel": name, **chosen, **assumed(options.for_kernel(name))})
        if auto and key not in listed_mtf:
            out["notes"].append(f"{name}: not in [engine.scanner_kernels]: method auto runs the network for it")
        elif key not in listed_mtf:
            out["notes"].append(f"{name}: no MTF50 in [engine.scanner_kernels]; the default "
                                f"{options.blur.mtf50_lp_cm:g} lp/cm is assumed")
        if key not in listed_lift:
            out["notes"].append(f"{name}: no edge lift in [engine.scanner_edge_enhance]; the default "
                                f"{options.blur.edge_enhance:g} is assumed")
    out["default"] = assumed(options)
    if auto:
        out["notes"].append("method auto: the subtraction for the kernels [engine.scanner_kernels] lists, the "
                            "network for every other series")
    if not names and auto:
        out["notes"].append("no kernel tables: method auto runs the network for every series; measure the site's "
                            "kernels with dicom-node measure-kernel (README: Measuring the site's kernels)")
    elif not names:
        out["notes"].append("no kernel tables: every series gets the default blur; measure the site's kernels "
                            "with dicom-node measure-kernel (README: Measuring the site's kernels)")
    return out


def report(model: str | Path, configured: str = "auto", env: plans.Environment | None = None,
           engine: EngineConfig | None = None) -> dict[str, Any]:
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
    if engine is not None:
        info["engine"] = engine_report(engine)
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
    if "engine" in info:
        lines += _render_engine(info["engine"])
    return "\n".join(lines)


def _render_engine(e: dict[str, Any]) -> list[str]:
    def blur(a: dict[str, float]) -> str:
        return (f"MTF50 {a['mtf50_lp_cm']:g} lp/cm, edge lift {a['edge_enhance']:g}, "
                f"white {a['white_above_lumen_hu']:g} HU above the contrast")

    if e["method"] == "network":
        lines = [f"engine:       {e['method']}"]
    elif e["method"] == "auto":  # per kernel: the subtraction where its MTF50 is listed, the network elsewhere
        estimate = "the white-level rule" if e["estimate"] == "rule" else e["estimate"]
        lines = [f"engine:       auto (subtract with {estimate} where the kernel is measured, network elsewhere)"]
        lines += [f"  kernel {k['kernel']}: " + (f"subtract, {blur(k)}" if k["method"] == "subtract" else "network")
                  for k in e["kernels"]]
        lines.append(f"  {'any other kernel' if e['kernels'] else 'every kernel'}: network")
    else:
        lines = [f"engine:       subtract ({'white-level rule' if e['estimate'] == 'rule' else e['estimate']})"]
        lines += [f"  kernel {k['kernel']}: {blur(k)}" for k in e["kernels"]]
        lines.append(f"  {'any other kernel' if e['kernels'] else 'every kernel'}: {blur(e['default'])}")
    sharp = e.get("sharpening")
    if sharp:
        how = (f"split, anatomy at most {sharp['anatomy_above_level_hu']:g} HU above the contrast"
               if sharp["method"] == "split" else "plain total variation")
        lines.append(f"  sharpening: {how} (set by {sharp['set_by']})")
    found = e.get("detector")
    if found:
        how = {"trim": "gives back the rules' calcium it calls lumen", "decide": "decides the voxels near the rules' "
               "calcium and the contrast level"}[found["mode"]]
        lines.append(f"  calcium detection: {found['file']} {how} (probability > {found['probability']:g}; "
                     f"{'subtracted series only' if e['method'] == 'auto' else 'every series'})")
    written = {"first": "the first estimate's (the others measure the disagreement)", "mean": "the mean of all",
               "wider": "the one a reader sees the most lumen in",
               "enclosed": "the second estimate's where the calcium encloses the lumen, else the first's"}
    for c in e.get("companions", []):
        lines.append(f"  also estimated by {c['estimate']} ({c['sharpening']['method']} sharpening)")
    if e.get("companions"):
        lines.append(f"  restoration written: {written[e['combine']]}")
    if e.get("dim"):
        lines.append(f"  beside a lumen under {e['dim']['below_hu']:g} HU: {e['dim']['estimate']} in the first "
                     "estimate's place")
    actions = {"mark": "restored and marked", "leave": "left as acquired", "guard": "restored, visible lumen kept"}
    for method, why in e["unsure"]["rules"].items():
        said = ", ".join(why) if why else "never (no rule on)"
        lines.append(f"  unsure ({method}): {said}; then {actions[e['unsure']['action']]}")
    lines += [f"  note: {n}" for n in e["notes"]]
    return lines


def main(model: str | Path, configured: str = "auto", as_json: bool = False, engine: EngineConfig | None = None
         ) -> int:
    info = report(model, configured, engine=engine)
    print(json.dumps(info, indent=2) if as_json else render(info))
    return 0
