"""Train the node's learnt calcium detector (``dicom_node.pipeline.detect_learnt.LearntCalcium``).

Why: the detection's rules leave about a third of the calcium they touch unfound and take lumen beside it,
and no threshold in one image tells the two apart (reports/tuning/trimmed-detection.md); the world knows
every voxel's answer. ``extract`` runs the node's own detection on training studies (the settings training
may see: the standard kernel and motion above 0.7 mm are held out) and keeps, for every voxel the
classifier would decide (``detect.learnt_pools``, exactly the node's pools and features), its features and
whether the phantom's calcium fills it; ``train`` fits a small network to that (binary cross-entropy) and
reports, on the validation studies, what it finds and takes against the rules at several probabilities.

    python -m dicom_node_lab.calcium_detector extract --seed 7070 --studies 200 --out runs/cd   # 20 min
    python -m dicom_node_lab.calcium_detector extract --seed 7171 --studies 40 --out runs/cd    # 4 min
    python -m dicom_node_lab.calcium_detector train --data runs/cd --out engines/calcium_detect.npz
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dicom_node_lab.calcium_estimate import TRAIN_SEED, VALIDATION_SEED, _study

# the README's recommended detection (as the held-out command): what the classifier is trained to follow
DETECTION = ['method = "subtract"', 'sharp_contrast_hu = 150',
             'scanner_kernels = { SOFT = 3.41, STANDARD = 4.14, HD = 4.94, SHARP = 5.92 }',
             'scanner_edge_enhance = { SOFT = 0.05, STANDARD = 0.29, HD = 0.45, SHARP = 0.70 }']
NEAR_MM = 1.5  # a wrong voxel this close to the phantom's calcium is the deposit's neighbour, not noise
PROBABILITIES = (0.3, 0.5, 0.7, 0.9)


def extract_study(engine, seed: int, i: int) -> dict:
    """One study's pool voxels: their features, whether they are calcium, whether the rules found them, and
    whether they lie within ``NEAR_MM`` of the phantom's calcium."""
    from scipy import ndimage

    from dicom_node.pipeline.contrast import local_lumen_level
    from dicom_node.pipeline.detect import detect, image_noise_sd, learnt_pools
    from dicom_node.pipeline.detect_learnt import FEATURES
    from dicom_node_lab.experiment2v2 import _stored_hu

    p = _study(seed, i)
    volume = _stored_hu(p.image)
    kernel = str(p.settings.kernel).upper()
    options = engine.detect_options_for(kernel)
    found = detect(volume, p.spacing, options).calcium
    near = ndimage.distance_transform_edt(~p.calcium_mask, sampling=p.spacing) <= NEAR_MM
    rows, calcium, close = [], [], []
    for kept, pool, part in learnt_pools(volume, p.spacing, options, local_lumen_level(volume, p.spacing), found,
                                         image_noise_sd(volume)):
        rows.append(part)
        calcium.append(p.calcium_mask[kept][pool])
        close.append(near[kept][pool])
    empty = np.zeros((0, len(FEATURES)), np.float32)
    return dict(features=np.concatenate(rows) if rows else empty,
                calcium=np.concatenate(calcium) if calcium else np.zeros(0, bool),
                near=np.concatenate(close) if close else np.zeros(0, bool),
                missed_by_rules=int((p.calcium_mask & ~found).sum()), kernel=kernel, study=f"{seed}-{i}")


_ENGINE = None


def _extract_job(job: tuple[int, int, str]) -> int:
    global _ENGINE
    seed, i, folder = job
    if _ENGINE is None:
        from dicom_node.config import DEFAULT_MODEL
        from dicom_node_lab.experiment2v2 import _engine

        _ENGINE = _engine(DEFAULT_MODEL, DETECTION)  # the detection runs no network; the config wants one
    row = extract_study(_ENGINE, seed, i)
    np.savez_compressed(Path(folder) / f"{seed}-{i}.npz", **row)
    return len(row["calcium"])


def extract(args: argparse.Namespace) -> int:
    from concurrent.futures import ProcessPoolExecutor

    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(args.seed, i, str(folder)) for i in range(args.studies) if not (folder / f"{args.seed}-{i}.npz").exists()]
    with ProcessPoolExecutor(args.workers) as pool:
        n = sum(tqdm(pool.map(_extract_job, jobs), total=len(jobs), desc="studies"))
    print(f"{n} pool voxels from {len(jobs)} studies in {folder}")
    return 0


def _load(folder: Path, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    files = sorted(folder.glob(f"{seed}-*.npz"))
    if not files:
        raise SystemExit(f"no {seed}-*.npz in {folder}: run extract first")
    parts = [np.load(f) for f in files]
    return (np.concatenate([z["features"] for z in parts]), np.concatenate([z["calcium"] for z in parts]),
            np.concatenate([z["near"] for z in parts]))


def compare(probability: np.ndarray, calcium: np.ndarray, near: np.ndarray, found: np.ndarray) -> dict:
    """What the classifier finds and takes against the rules (``found``): calcium found, non-calcium taken (and of
    that, how much lies away from all calcium), at each of ``PROBABILITIES``; and the classifier's calcium found at
    as many wrong voxels as the rules take."""
    def counts(chosen: np.ndarray) -> dict:
        return {"calcium": int((chosen & calcium).sum()), "other": int((chosen & ~calcium).sum()),
                "other_far": int((chosen & ~calcium & ~near).sum())}

    order = np.argsort(-probability)
    wrong = np.cumsum(~calcium[order])
    rules = counts(found)
    at = min(int(np.searchsorted(wrong, rules["other"])), len(order) - 1)
    return {"pool": int(len(calcium)), "calcium_in_pool": int(calcium.sum()), "rules": rules,
            "learnt": {f"{p:g}": counts(probability > p) for p in PROBABILITIES},
            "calcium_at_rules_other": int(calcium[order][:at + 1].sum())}


def train(args: argparse.Namespace) -> int:
    import torch

    from dicom_node.pipeline.detect_learnt import FEATURES

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    folder = Path(args.data)
    x, y, _ = _load(folder, TRAIN_SEED)
    xv, yv, nv = _load(folder, VALIDATION_SEED)
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
    xt = torch.tensor((x - mean) / scale, dtype=torch.float32)
    yt = torch.tensor(y, dtype=torch.float32)
    sizes = [len(FEATURES)] + [args.width] * args.layers + [1]
    layers: list[torch.nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers[:-1])
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for _ in tqdm(range(args.steps), desc="steps"):
        batch = torch.randint(0, len(yt), (args.batch,), generator=gen)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(xt[batch])[:, 0], yt[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    seconds = time.time() - t0
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    weights = {}
    for k, m in enumerate(linears):
        weights[f"W{k}"] = m.weight.detach().numpy().T.astype(np.float32)
        weights[f"b{k}"] = m.bias.detach().numpy().astype(np.float32)
    out = Path(args.out)
    np.savez(out, **weights, mean=mean.astype(np.float32), scale=scale.astype(np.float32),
             threshold=np.float32(args.threshold), features=np.array(FEATURES))
    from dicom_node.pipeline.detect_learnt import LearntCalcium

    detector = LearntCalcium.load(out)  # the node's own reading of the file: what validation measures
    found_col = FEATURES.index("found_by_rules")
    report = compare(detector(xv), yv.astype(bool), nv.astype(bool), xv[:, found_col] > 0.5)
    log = {"training_studies": int(len(list(folder.glob(f"{TRAIN_SEED}-*.npz")))), "training_voxels": int(len(y)),
           "validation_studies": int(len(list(folder.glob(f"{VALIDATION_SEED}-*.npz")))),
           "seed": args.seed, "steps": args.steps, "batch": args.batch, "lr": args.lr, "width": args.width,
           "layers": args.layers, "threshold": args.threshold, "seconds": round(seconds, 1),
           "validation": report, "sha256": detector.digest}
    out.with_suffix(".json").write_text(json.dumps(log, indent=1) + "\n")
    print(json.dumps(log["validation"], indent=1))
    print(f"wrote {out} ({seconds:.0f} s of training)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("extract", help="the node's pools and features on world studies, with the phantom's answer")
    ex.add_argument("--seed", type=int, default=TRAIN_SEED)
    ex.add_argument("--studies", type=int, default=200)
    ex.add_argument("--out", default="runs/cd")
    ex.add_argument("--workers", type=int, default=2)
    tr = sub.add_parser("train", help="fit the classifier; validate on the validation seed's studies")
    tr.add_argument("--data", default="runs/cd")
    tr.add_argument("--out", default="engines/calcium_detect.npz")
    tr.add_argument("--steps", type=int, default=8000)
    tr.add_argument("--batch", type=int, default=4096)
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--width", type=int, default=48)
    tr.add_argument("--layers", type=int, default=2)
    tr.add_argument("--threshold", type=float, default=0.5)
    tr.add_argument("--seed", type=int, default=1)
    tr.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    return extract(args) if args.command == "extract" else train(args)


if __name__ == "__main__":
    raise SystemExit(main())
