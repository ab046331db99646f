"""Experiment 1: inpainting accuracy on hidden, calcium-free vessel.

Restore a centre cube (16³ and 8³) that hides a stretch of vessel with no calcium, and measure MSE
against the truth, for every network and the classical baselines. Writes reports/experiment1.md and
reports/experiment1.png. Run as ``python tools/evaluate.py experiment1`` (see ``evaluate.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dicom_node.config import DEFAULT_MODEL
from dicom_node_lab import phantom
from dicom_node_lab.baselines import CLASSICAL
from dicom_node_lab.patches import VOLUME, Patch, cut, training_options, volume_seed

EVAL_SEED = 2026  # volume seeds 2026*1_000_003 + i: disjoint from training (1) and validation (7)
NETWORK_LABELS = {"dense_unet": "Dense-Unet", "unet": "U-Net", "densenet": "DenseNet", "autoencoder": "Autoencoder",
                  "paper": "Dense-Unet, paper inputs (equal budget + in-mask fine-tune)"}
DENSE_UNETS = ("dense_unet", "paper")
ENGINES = DEFAULT_MODEL.parent  # the shipped models, beside the node
# Experiment 1 hides calcium-free vessel: only models that do not see under the mask ("hidden"
# inputs, as in the paper) are comparable. The shipped engine's model sees the acquired values
# under the mask (it corrects them), so here it would see the answer; it is evaluated in Experiment 2.
PAPER_WEIGHTS = ENGINES / "dense_unet_paper.pt"
CLASSICAL_LABELS = {"biharmonic": "Biharmonic", "nearest": "Nearest fill"}


def experiment1_patches(n: int, size: int) -> list[Patch]:
    """n held-out patches, each with a calcium-free stretch of vessel under a size³ centre cube."""
    rng = np.random.default_rng([EVAL_SEED, size])
    out: list[Patch] = []
    i = 0
    while len(out) < n:
        p = phantom.generate(VOLUME, seed=volume_seed(EVAL_SEED, i), options=training_options())
        i += 1
        patch = cut(rng, p, f"cube{size}", allow_calcium_in_cube=False)
        if patch is not None and patch.lumen[patch.mask > 0.5].any():
            out.append(patch)
    return out


def _run_network(model, patches: list[Patch]) -> tuple[np.ndarray, np.ndarray, float]:
    import torch

    from dicom_node_lab.model.inpaint import to_hu

    images = torch.from_numpy(np.stack([p.image for p in patches])[:, None])
    masks = torch.from_numpy(np.stack([p.mask for p in patches])[:, None])
    raw, comp = [], []
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(patches), 8):
            r = to_hu(model.predict(images[i:i + 8], masks[i:i + 8]))
            raw.append(r[:, 0].numpy())
            comp.append(torch.where(masks[i:i + 8] > 0.5, r, images[i:i + 8])[:, 0].numpy())
    return np.concatenate(comp), np.concatenate(raw), (time.perf_counter() - t0) / len(patches)


def _metrics(outputs: np.ndarray, whole: np.ndarray, patches: list[Patch]) -> dict[str, float]:
    inm, who = [], []
    for out, w, p in zip(outputs, whole, patches):
        m = p.mask > 0.5
        inm.append(float(((out - p.target)[m] ** 2).mean()))
        who.append(float(((w - p.target) ** 2).mean()))
    return {"mask_mse": float(np.mean(inm)), "mask_mse_sd": float(np.std(inm)),
            "mask_mse_median": float(np.median(inm)), "whole_mse": float(np.mean(who))}


def experiment1(args: argparse.Namespace) -> int:
    import torch

    from dicom_node_lab.model.training import load_model

    torch.set_num_threads(args.threads)
    models = {}
    for name in NETWORK_LABELS:
        path = PAPER_WEIGHTS if name == "paper" else Path(args.runs) / f"exp1-{name}" / "model.pt"
        if path.exists():
            models[name] = load_model(path)
            if models[name][1]["config"].get("inputs", "hidden") != "hidden":
                raise SystemExit(f"{path} sees the values under the mask; Experiment 1 needs hidden-input models")
        else:
            print(f"note: {path} missing; {NETWORK_LABELS[name]} left out", file=sys.stderr)
    results: dict[int, dict[str, dict]] = {}
    examples: dict[int, dict[str, np.ndarray]] = {}
    for size in (16, 8):
        patches = experiment1_patches(args.patches, size)
        results[size] = {}
        examples[size] = {}
        for name, (model, _) in models.items():
            comp, raw, dt = _run_network(model, patches)
            results[size][name] = _metrics(comp, raw, patches) | {"seconds_per_patch": dt}
            examples[size][name] = comp[args.example]
        for name, fn in CLASSICAL.items():
            t0 = time.perf_counter()
            outs = np.stack([fn(p.image, p.mask) for p in tqdm(patches, desc=f"{name} {size}³", leave=False)])
            dt = (time.perf_counter() - t0) / len(patches)
            results[size][name] = _metrics(outs, outs, patches) | {"seconds_per_patch": dt}
            examples[size][name] = outs[args.example]
        examples[size]["_patch"] = patches[args.example]
    report = Path(args.report_dir)
    report.mkdir(parents=True, exist_ok=True)
    budgets = {n: s.get("summary", {}) for n, (_, s) in models.items()}
    (report / "experiment1.json").write_text(json.dumps({"patches": args.patches, "eval_seed": EVAL_SEED,
                                                         "results": results, "budgets": budgets}, indent=2))
    _write_markdown(report / "experiment1.md", results, budgets, args)
    _figure(report / "experiment1.png", examples)
    print((report / "experiment1.md").read_text())
    return 0


def _label(name: str) -> str:
    return NETWORK_LABELS.get(name) or CLASSICAL_LABELS[name]


def _write_markdown(path: Path, results: dict, budgets: dict, args: argparse.Namespace) -> None:
    lines = [
        "# Experiment 1: restoring hidden, calcium-free vessel (held-out phantom patches)",
        "",
        f"Reproduce: `python tools/evaluate.py experiment1 --patches {args.patches}` "
        "(networks from `runs/exp1-*/model.pt`, trained as in `engines/MODEL_CARD.md`).",
        "",
        f"{args.patches} patches of 32³ at 0.47 mm per mask size, from phantom volumes with seeds "
        f"`{EVAL_SEED}*1000003 + i` (training used base seed 1, validation 7). Each centre cube hides a "
        "stretch of vessel lumen and holds no calcium, so the truth is known exactly. All networks in "
        "`runs/exp1-*` were trained with the same CPU-time budget (32 CPU-minutes) on the same patch stream "
        "(mixed masks, whole-patch loss). The paper-input Dense-Unet (`engines/dense_unet_paper.pt`) is that "
        "Dense-Unet fine-tuned for 8 more CPU-minutes with the in-mask loss (`engines/MODEL_CARD.md`), so it had "
        "more budget than the baselines. The node's shipped model sees the values under the mask and is not "
        "comparable here; Experiment 2 evaluates it.",
        "",
        "- **In-mask MSE**: mean over patches of the squared error inside the cube (HU²). This is the figure "
        "of merit.",
        "- **Whole-patch MSE**: squared error of the network's raw output over the whole 32³ patch (HU²), as "
        "in the paper; for classical methods it equals the in-mask error diluted by the unmasked voxels.",
        "",
    ]
    for size in (16, 8):
        r = results[size]
        best_base = min(v["mask_mse"] for k, v in r.items() if k not in DENSE_UNETS)
        lines += [f"## {size}³ mask", "",
                  "| method | in-mask MSE (HU²) | sd | median | whole-patch MSE (HU²) | ms / patch |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, v in sorted(r.items(), key=lambda kv: kv[1]["mask_mse"]):
            lines.append(f"| {_label(name)} | {v['mask_mse']:.0f} | {v['mask_mse_sd']:.0f} | "
                         f"{v['mask_mse_median']:.0f} | {v['whole_mse']:.1f} | {1000 * v['seconds_per_patch']:.1f} |")
        lines.append("")
        for name in DENSE_UNETS:
            if name not in r:
                continue
            du = r[name]["mask_mse"]
            bh = r["biharmonic"]["mask_mse"]
            verdict = "beats" if du < best_base else "does NOT beat"
            lines.append(f"- {_label(name)} {verdict} every baseline at {size}³ ({du:.0f} vs best baseline "
                         f"{best_base:.0f} HU²); its in-mask MSE is {du / bh:.2f}× biharmonic's (goal: at most 0.5×).")
        lines.append("")
    lines += ["## Training budget", "", "| network | parameters | steps | CPU s | wall s |",
              "|---|---:|---:|---:|---:|"]
    for name, s in budgets.items():
        lines.append(f"| {_label(name)} | {s.get('params', 0):,} | {s.get('steps')} | {s.get('train_cpu_seconds')} | "
                     f"{s.get('train_seconds')} |")
    lines += ["", "![Experiment 1](experiment1.png)", "",
              "Figure: central axial slice of one held-out patch per mask size. Columns: original (truth), masked "
              "input, then each method's restoration; the red box outlines the mask. Window −200..800 HU.", ""]
    path.write_text("\n".join(lines))


def _figure(path: Path, examples: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    names = [n for n in examples[16] if n != "_patch"]
    cols = 2 + len(names)
    fig, axes = plt.subplots(2, cols, figsize=(2.2 * cols, 4.8))
    for row, size in enumerate((16, 8)):
        p: Patch = examples[size]["_patch"]
        z = 16
        masked = np.where(p.mask > 0.5, np.nan, p.image)
        panels = [("original", p.target), ("masked input", masked)] + [(_label(n), examples[size][n]) for n in names]
        for col, (title, arr) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(arr[z], cmap="gray", vmin=-200, vmax=800)
            lo = 16 - size // 2
            ax.add_patch(Rectangle((lo - 0.5, lo - 0.5), size, size, fill=False, ec="red", lw=1))
            ax.set_title(f"{title}" + (f" ({size}³)" if col == 0 else ""), fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
