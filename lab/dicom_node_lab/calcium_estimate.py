"""Train the subtraction's learnt calcium estimate (``dicom_node.pipeline.subtract.LearntExcess``).

The subtraction's rule (a sharpened voxel is all calcium in plaque, or none) is where most of
its error lies: on the held-out studies the phantom's own calcium, subtracted the same way, reads
5.8 points from the truth image where the rule's estimate reads 9.3. This module learns a
per-voxel correction of that rule from the world, on settings training may see (the standard kernel
and motion above 0.7 mm are held out, as for the network): ``extract`` runs the engine's own
detection, planning and sharpening on training studies and keeps, per region, each voxel's
features and what the calcium adds to the acquired image in the region's footprint (acquired minus
truth image, known in the world); ``train`` fits the network so that its estimate, blurred by the
assumed kernel, matches that addition. The loss is the one the node's output is judged by in the
footprint: the processed minus the truth image.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dicom_node_lab import world
from dicom_node_lab.experiment2v2 import PRIMARY_WHITE
from dicom_node_lab.patches import TRAIN_MOTION_MM, trained_kernels, volume_seed
from dicom_node_lab.reader import WALL_HU
from dicom_node_lab.world_oracles import GIVEN_CALCIUM

TRAIN_SEED = 7070  # volume seeds 7070*1000003 + i: neither the tuning (6060) nor the held-out (5050) range
VALIDATION_SEED = 7171


CALIBRE_WEIGHT_MM = 3.0  # the calibre whose regions weigh 1 before normalising (--calibre-weight)
LEVEL_WEIGHT_HU = 400.0  # the contrast level whose regions weigh 1 before normalising (--level-weight)


def _study(seed: int, i: int):
    from dicom_node_lab.experiment2v2 import EXP2V2_SHAPE

    trained = trained_kernels()
    return world.generate(EXP2V2_SHAPE, seed=volume_seed(seed, i), kernel=trained[i % len(trained)],
                          motion_mm=TRAIN_MOTION_MM)


def extract_study(engine, seed: int, i: int, reach_voxels: int, jitter: float = 0.0, level_away_mm: float = 0.0,
                  context_voxels: int = 0, given_calcium: str = "", vessel_feature: bool = False) -> list[dict]:
    """Every planned region of one study: features on the estimate's domain, footprint, target.

    ``jitter`` > 0: half the regions assume a blur whose MTF50 is off the kernel table's by up to this
    fraction, either way, as a site's table will be: the estimate learns to read the image, not the label.
    ``level_away_mm``: how the contrast level is measured (``subtract.reference_levels``); the trained file
    records it, and the node measures it so. ``context_voxels``: features this many voxels beyond the
    estimate's reach too, for an estimate that convolves (``inside`` marks the voxels within reach). The engine's
    ``subtract_anatomy_hu`` decides how the regions are sharpened (``subtract.sharpened``); the trained file
    records it as ``anatomy_above_level_hu``, and the node sharpens so for it. ``given_calcium``: the regions of
    an oracle's calcium (``world_oracles.given_detection``: ``true-calcium``, the phantom's own mask;
    ``found-whole``, ``found-union``) in place of the engine's detection, for an estimate that serves that oracle's
    whole-pipeline run ("": the engine's detection). ``vessel_feature``: the box's vessel calibre as a last
    feature (``subtract.VESSEL_FEATURE``); the trained file's width records it.
    """
    from dataclasses import replace

    from dicom_node.pipeline.detect import detect
    from dicom_node.pipeline.morphology import grow_box
    from dicom_node.pipeline.subtract import learnt_inputs, reference_levels, sharpened, within_reach
    from dicom_node.pipeline.windows import plan
    from dicom_node_lab.experiment2v2 import _stored_hu
    from dicom_node_lab.world_oracles import given_detection

    p = _study(seed, i)
    original, truth = _stored_hu(p.image), _stored_hu(p.truth)
    kernel = str(p.settings.kernel).upper()
    opts = engine.subtract.for_kernel(kernel)
    options = engine.detect_options_for(kernel)
    detection = (given_detection(given_calcium, p.calcium_mask, original, p.spacing, options) if given_calcium
                 else detect(original, p.spacing, options))
    regions = plan(detection, p.spacing, engine.window_options)
    pad = np.ceil(opts.pad_mm / np.asarray(p.spacing, float)).astype(int)
    fallback = detection.threshold_hu - opts.white_above_lumen_hu
    out = []
    listed = opts
    rng = np.random.default_rng([seed, i])
    for r in regions:
        opts = listed
        if jitter > 0 and rng.random() < 0.5:
            opts = replace(listed, blur=replace(listed.blur, mtf50_lp_cm=listed.blur.mtf50_lp_cm
                                                * float(rng.uniform(1.0 - jitter, 1.0 + jitter))))
        box = grow_box(r.native_box, original.shape, pad)
        origin = np.array([s.start for s in box])
        y = original[box].astype(np.float64)
        calcium = detection.calcium[box]
        u = sharpened(y, opts.blur.transfer(y.shape, p.spacing), calcium, p.spacing, opts, fallback)
        domain, features = learnt_inputs(y, u, calcium, p.spacing, opts, reach_voxels, fallback,
                                         level_away_mm=level_away_mm, context_voxels=context_voxels,
                                         vessel_feature=vessel_feature)
        if not len(features):
            continue
        foot = r.native_indices() - origin
        out.append(dict(acquired=y[tuple(foot.T)].astype(np.float32),
                        level=reference_levels(y, calcium, p.spacing, foot, level_away_mm, fallback
                                               ).astype(np.float32), level_away_mm=level_away_mm,
                        features=features.astype(np.float32), domain=np.argwhere(domain).astype(np.int16),
                        inside=within_reach(calcium, reach_voxels)[domain], context_voxels=context_voxels,
                        shape=np.array(y.shape), foot=foot.astype(np.int16),
                        target=(y - truth[box])[tuple(foot.T)].astype(np.float32),
                        excess=p.calcium_excess[box][domain].astype(np.float32),
                        mtf50=opts.blur.mtf50_lp_cm, slice_fwhm=opts.blur.slice_fwhm_mm,
                        edge=opts.blur.edge_enhance, spacing=np.array(p.spacing), study=i, kernel=kernel,
                        anatomy_hu=opts.anatomy_above_level_hu))
    return out


_ENGINE = None


def _extract_job(job):
    global _ENGINE
    seed, i, engine_args, reach, jitter, away, context, given_calcium, vessel, folder = job
    if _ENGINE is None:
        from dicom_node.config import DEFAULT_MODEL
        from dicom_node_lab.experiment2v2 import _engine

        _ENGINE = _engine(DEFAULT_MODEL, engine_args)  # the subtraction runs no network; the config wants one
    regions = extract_study(_ENGINE, seed, i, reach, jitter, away, context, given_calcium, vessel)
    np.save(Path(folder) / f"{seed}-{i}.npy", np.array(regions, dtype=object), allow_pickle=True)
    return len(regions)


def extract(args: argparse.Namespace) -> int:
    from concurrent.futures import ProcessPoolExecutor

    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    studies = range(args.studies)
    if args.studies_from:  # a replay: exactly the studies a (time-limited) run trained on
        studies = json.loads(Path(args.studies_from).read_text())["training_studies"]
    jobs = [(args.seed, i, args.engine, args.reach_voxels, args.jitter if args.seed != VALIDATION_SEED else 0.0,
             args.level_away_mm, args.context_voxels, args.given_calcium, args.vessel_feature, str(folder))
            for i in studies
            if not (folder / f"{args.seed}-{i}.npy").exists()]
    with ProcessPoolExecutor(args.workers) as pool:
        n = sum(tqdm(pool.map(_extract_job, jobs), total=len(jobs), desc="studies"))
    print(f"{n} regions from {len(jobs)} studies in {folder}")
    return 0


def _load(folder: Path, seed: int) -> list[dict]:
    regions = []
    for f in sorted(folder.glob(f"{seed}-*.npy")):
        regions.extend(np.load(f, allow_pickle=True).tolist())
    return regions


def train(args: argparse.Namespace) -> int:
    """Fit the correction network; writes ``args.out`` (``.npz``, read by ``LearntExcess.load``) and a JSON log."""
    import torch

    from dicom_node.pipeline.subtract import FEATURES, RULE, ScannerBlur

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    folder = Path(args.data)
    regions = _load(folder, TRAIN_SEED)
    held = _load(folder, VALIDATION_SEED)
    if not regions or not held:
        raise SystemExit(f"{folder}: no {'training' if not regions else 'validation'} regions; run extract with "
                         f"--seed {TRAIN_SEED if not regions else VALIDATION_SEED} first")
    aways = {float(r.get("level_away_mm", 0.0)) for r in regions + held}
    if len(aways) != 1:
        raise SystemExit(f"{folder}: regions extracted with different --level-away-mm ({sorted(aways)}): "
                         "one per folder")
    (level_away_mm,) = aways
    ceilings = {float(r.get("anatomy_hu", 0.0)) for r in regions + held}
    if len(ceilings) != 1:
        raise SystemExit(f"{folder}: regions sharpened with different anatomy ceilings ({sorted(ceilings)}): "
                         "one per folder")
    (anatomy_hu,) = ceilings
    contexts = {int(r.get("context_voxels", 0)) for r in regions + held}
    if contexts != {args.convolutions}:
        raise SystemExit(f"{folder}: regions extracted with --context-voxels {sorted(contexts)}; an estimate with "
                         f"{args.convolutions} convolutions needs --context-voxels {args.convolutions}")
    widths = {r["features"].shape[1] for r in regions + held}
    if len(widths) != 1:
        raise SystemExit(f"{folder}: regions extracted with and without --vessel-feature: one per folder")
    (n_features,) = widths
    allf = np.concatenate([r["features"] for r in regions])
    mean, scale = np.nanmean(allf, 0), np.nanstd(allf, 0) + 1e-3  # a calibre not measured is NaN

    def prepare(r):
        def tensor(a, dtype=torch.float32):
            return torch.tensor(a, dtype=dtype, device=device)

        blur = ScannerBlur(mtf50_lp_cm=float(r["mtf50"]), edge_enhance=float(r["edge"]),
                           slice_fwhm_mm=float(r["slice_fwhm"]))
        shape = tuple(int(x) for x in r["shape"])
        h = tensor(blur.transfer(shape, tuple(r["spacing"])))
        grid = None
        if args.convolutions:  # the domain's bounding box, where the convolutions run
            at = r["domain"].astype(np.int64)
            at = at - at.min(axis=0)
            box = tuple(int(n) for n in at.max(axis=0) + 1)
            grid = (box, tensor(np.ravel_multi_index(tuple(at.T), box), torch.int64))
        inside = tensor(r["inside"]) if "inside" in r else None
        flat_dom = tensor(np.ravel_multi_index(tuple(r["domain"].astype(np.int64).T), shape), torch.int64)
        flat_foot = tensor(np.ravel_multi_index(tuple(r["foot"].astype(np.int64).T), shape), torch.int64)
        x = tensor(np.nan_to_num((r["features"] - mean) / scale, nan=0.0))  # as LearntExcess reads it
        rule = tensor(r["features"][:, RULE])
        acquired = tensor(r["acquired"] / 1000.0)
        level = tensor(r["level"] / 1000.0)
        target = tensor(r["target"] / 1000.0)
        truth_lumen = _lumen(acquired - target, level)
        # the phantom's own sharp calcium on the domain (regions extracted before it was kept: none)
        excess = tensor(r["excess"] / 1000.0) if "excess" in r else None
        return x, rule, h, shape, flat_dom, flat_foot, target, acquired, level, truth_lumen, excess, grid, inside

    def raw_calibre_weights(items: list[dict]) -> np.ndarray:
        """Each region's weight in the loss before normalising: (``CALIBRE_WEIGHT_MM`` / its vessel's calibre) **
        ``--calibre-weight`` (NaN where no calibre was measured). Why: a voxel on the wrong side of the reader's
        edge moves a stenosis reading by its share of the vessel's diameter, so the same voxel error costs a
        2 mm vessel twice what it costs a 4 mm one, and every severe stenosis made held out lay in a vessel under
        2.8 mm."""
        calibre = np.array([float(r["features"][0, -1]) for r in items])
        return (CALIBRE_WEIGHT_MM / np.clip(calibre, 1.0, None)) ** args.calibre_weight

    def raw_level_weights(items: list[dict]) -> np.ndarray:
        """Each region's weight before normalising: ((``LEVEL_WEIGHT_HU`` - wall) / (its contrast level - wall)) **
        ``--level-weight``, the level the estimate compares with (median over its footprint). Why: the reader's
        edge lies half-way from the wall to the level, so how far a voxel may be off before it crosses the edge
        shrinks with the level, while the estimate's error does not: held out, calcified lesions beside lumens
        under 330 HU read 9.7 points off against 4.6-6.0 (reports/tuning/dim-lumens.md)."""
        level = np.array([float(np.median(r["level"])) for r in items])
        return ((LEVEL_WEIGHT_HU - WALL_HU) / np.clip(level - WALL_HU, 50.0, None)) ** args.level_weight

    region_weight, held_weight = np.ones(len(regions)), np.ones(len(held))
    if args.calibre_weight:  # mean 1 over the training regions; 1 where no calibre was measured
        if n_features != len(FEATURES) + 1:
            raise SystemExit("--calibre-weight reads the regions' calibre: extract with --vessel-feature")
        raw = raw_calibre_weights(regions)
        norm = float(np.nanmean(raw))
        region_weight = np.nan_to_num(raw / norm, nan=1.0)
        held_weight = np.nan_to_num(raw_calibre_weights(held) / norm, nan=1.0)
    if args.level_weight:  # mean 1 over the training regions (times the calibre's, when both are asked)
        raw = raw_level_weights(regions) * region_weight
        norm = float(np.mean(raw))
        region_weight, held_weight = raw / norm, raw_level_weights(held) * held_weight / norm

    train_set = [prepare(r) for r in tqdm(regions, desc="training regions")]
    held_set = [prepare(r) for r in held]
    net = _estimate(n_features, args.width, args.layers, args.convolutions, args.convolution_width).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    if args.lr_schedule == "cosine" and args.steps <= 0:
        raise SystemExit("--lr-schedule cosine decays over --steps: give --steps")
    # cosine: the learning rate falls from --lr to nothing over --steps. Why: with one region a step at a
    # constant rate the validation error wanders by 2-5 HU from one thousand steps to the next (the shipped
    # estimate's log), and the best checkpoint is chosen on that noise; a decaying rate lets the weights settle
    sched = (torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1.0 + np.cos(np.pi * min(k, args.steps)
                                                                             / args.steps)))
             if args.lr_schedule == "cosine" else None)

    def loss_of(item, model=net):
        """(squared error summed over the footprint, each voxel weighted ``1 + --lumen-hu-weight`` where the
        truth image is lumen; those weights summed; lumen-decision error summed; voxels; squared error of the
        calcium itself per domain voxel; squared error summed over the truth's lumen voxels, their soft count)"""
        x, rule, h, shape, flat_dom, flat_foot, target, acquired, level, truth_lumen, excess, grid, inside = item
        e = torch.clamp(rule + (model(x, grid)[:, 0] if model is not None else 0.0), min=0.0)
        if inside is not None:  # features read beyond the reach; calcium is put only within it
            e = e * inside
        own = ((e - excess) ** 2).mean() if excess is not None else torch.zeros((), device=device)
        vol = torch.zeros(int(np.prod(shape)), device=device)
        vol = vol.index_add(0, flat_dom, e).reshape(shape)
        blurred = torch.fft.irfftn(torch.fft.rfftn(vol) * h, s=shape).reshape(-1)[flat_foot]
        lumen = _lumen(acquired - blurred, level)
        # lumen taken away (an invented narrowing) weighs more than calcium's bloom left in the lumen
        weight = 1.0 + args.closing_weight * (truth_lumen > lumen)
        # what a lumen voxel keeps decides where the reader's edge falls: the deposit's own core, where the
        # error is largest, does not (twenty-ninth session: the right amount removed, placed on the lumen)
        voxel = 1.0 + args.lumen_hu_weight * truth_lumen
        sq = (blurred - target) ** 2
        return ((voxel * sq).sum(), voxel.sum(), (weight * (lumen - truth_lumen) ** 2).sum(), len(target), own,
                (truth_lumen * sq).sum(), truth_lumen.sum())

    def evaluate(items, model=net, weights=None, lumen=False):
        """(RMSE in HU in the footprint, its voxels weighted as the objective weighs them (``--lumen-hu-weight``),
        share of footprint voxels on the wrong side of the reader's edges, RMSE in HU of the calcium itself on
        the domain, regions averaged); with ``lumen`` also the RMSE in HU on the truth's lumen voxels alone. Each
        region's voxels counted ``weights`` times (``--calibre-weight``; None: once)."""
        with torch.no_grad():
            s = sn = w = n = own = ls = ln = 0.0
            for k, item in enumerate(items):
                a, an, b, c, o, la, lc = loss_of(item, model)
                r = 1.0 if weights is None else float(weights[k])
                s, sn, w, n, own = s + r * float(a), sn + r * float(an), w + r * float(b), n + r * c, own + float(o)
                ls, ln = ls + r * float(la), ln + r * float(lc)
        out = (float(np.sqrt(s / sn) * 1000.0), float(w / n), float(np.sqrt(own / max(len(items), 1)) * 1000.0))
        return out + (float(np.sqrt(ls / max(ln, 1e-9)) * 1000.0),) if lumen else out

    log = {"rule_rmse_hu_train": evaluate(train_set, None, lumen=True),
           "rule_rmse_hu_held": evaluate(held_set, None, lumen=True),
           "regions": len(train_set), "held_regions": len(held_set), "steps": [],
           # which studies (of --seed 7070) it saw: a replay of a time-limited extraction extracts these
           "training_studies": sorted({int(r["study"]) for r in regions})}
    print(json.dumps({k: v for k, v in log.items() if k not in ("steps", "training_studies")}))
    t0, step = time.time(), 0
    best, best_state = None, None
    def spent() -> bool:  # whichever budget is reached first: wall time (a session's), steps (a replay's)
        return time.time() - t0 > args.minutes * 60 or (args.steps > 0 and step >= args.steps)

    while not spent():
        for k in rng.permutation(len(train_set)):
            a, an, b, c, own, _, _ = loss_of(train_set[k])
            opt.zero_grad()
            (region_weight[k] * (a / an + args.lumen_weight * b / c) + args.excess_weight * own).backward()
            opt.step()
            if sched is not None:
                sched.step()
            step += 1
            if step % args.validate_every == 0:
                rmse, wrong, own, lumen_rmse = evaluate(held_set, weights=held_weight, lumen=True)
                score = (rmse / 1000.0) ** 2 + args.lumen_weight * wrong + args.excess_weight * (own / 1000.0) ** 2
                log["steps"].append({"step": step, "seconds": round(time.time() - t0), "held_rmse_hu": rmse,
                                     "held_wrong_side": wrong, "held_calcium_rmse_hu": own,
                                     "held_lumen_rmse_hu": lumen_rmse, "score": score})
                print(log["steps"][-1], flush=True)
                if best is None or score < best:
                    best, best_state = score, [p.detach().clone() for p in net.parameters()]
            if spent():
                break
    if best_state is not None:
        for p, b in zip(net.parameters(), best_state):
            p.data.copy_(b)
    (log["best_held_rmse_hu"], log["best_held_wrong_side"], log["best_held_calcium_rmse_hu"],
     log["best_held_lumen_rmse_hu"]) = evaluate(held_set, lumen=True)
    if args.calibre_weight or args.level_weight:  # the figures the best step was chosen on
        log["best_held_weighted"] = evaluate(held_set, weights=held_weight)
    arrays = {"mean": mean, "scale": scale, "reach_voxels": np.array(args.reach_voxels),
              "level_away_mm": np.array(level_away_mm), "anatomy_above_level_hu": np.array(anatomy_hu),
              **net.arrays()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, **arrays)
    log["settings"] = {k: v for k, v in vars(args).items() if k != "func"}
    Path(args.out).with_suffix(".json").write_text(json.dumps(log, indent=1))
    print(f"validation, footprint: RMSE {log['best_held_rmse_hu']:.1f} HU, wrong side of the reader's edges "
          f"{log['best_held_wrong_side']:.4f} (rule {log['rule_rmse_hu_held']}); wrote {args.out}")
    return 0


def _estimate_class():
    """The torch twin of ``subtract.LearntExcess`` (defined on first use: torch is the lab's, imported late)."""
    import torch

    class Estimate(torch.nn.Module):
        """Hidden per-voxel layers, then (``convolutions`` > 0) 3x3x3 convolutions on the domain's bounding box
        with zero outside the domain, then one linear unit reading the hidden and convolved units: the node's
        ``LearntExcess.__call__`` step for step; ``arrays`` writes the weights in its file's layout."""

        def __init__(self, features: int, width: int, layers: int, convolutions: int, convolution_width: int):
            super().__init__()
            sizes = [features] + [width] * layers
            self.hidden = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
            widths = [sizes[-1]] + [convolution_width] * convolutions
            self.convs = torch.nn.ModuleList(torch.nn.Conv3d(a, b, 3, padding=1)
                                             for a, b in zip(widths[:-1], widths[1:]))
            self.head = torch.nn.Linear(sizes[-1] + (convolution_width if convolutions else 0), 1)
            torch.nn.init.zeros_(self.head.weight)  # untrained, the estimate is the rule
            torch.nn.init.zeros_(self.head.bias)

        def forward(self, x, grid=None):
            for layer in self.hidden:
                x = torch.relu(layer(x))
            if self.convs:
                box, flat = grid
                n = int(np.prod(box))
                g = torch.zeros(x.shape[1], n, device=x.device).index_copy(1, flat, x.T).reshape(1, -1, *box)
                inside = torch.zeros(n, device=x.device).index_fill(0, flat, 1.0).reshape(1, 1, *box)
                for conv in self.convs:
                    g = torch.relu(conv(g)) * inside
                x = torch.cat([x, g.reshape(g.shape[1], n)[:, flat].T], dim=1)
            return self.head(x)

        def arrays(self) -> dict[str, np.ndarray]:
            out = {}
            for k, m in enumerate([*self.hidden, self.head]):
                out[f"W{k}"] = m.weight.detach().cpu().numpy().T.astype(np.float32)
                out[f"b{k}"] = m.bias.detach().cpu().numpy().astype(np.float32)
            for k, m in enumerate(self.convs):  # (out, in, dz, dy, dx) -> (27 taps in (dz, dy, dx) order, in, out)
                w = m.weight.detach().cpu().permute(2, 3, 4, 1, 0).reshape(27, m.in_channels, m.out_channels)
                out[f"K{k}"] = w.numpy().astype(np.float32)
                out[f"k{k}"] = m.bias.detach().cpu().numpy().astype(np.float32)
            return out

    return Estimate


def _estimate(*args):
    return _estimate_class()(*args)


def merge(args: argparse.Namespace) -> int:
    """Several trained estimates as one: the mean of their corrections, written as one wider network.

    Why: networks trained from different seeds err differently, and their mean errs less than each; the
    node reads the merged file as any other (``LearntExcess``), with no code for ensembles. Member k's
    hidden units are block k of each layer (block-diagonal weights between blocks), and the last layer
    averages the blocks. The members must share their features' normalisation and reach (one extraction).
    """
    from scipy.linalg import block_diag

    from dicom_node.pipeline.subtract import LearntExcess

    members = [LearntExcess.load(path) for path in args.members]  # the node's own reading and checks of each
    if any(m.convolutions for m in members):
        raise SystemExit("convolving estimates cannot be merged into one network: train one")
    first = members[0]
    for m in members[1:]:
        if len(m.weights) != len(first.weights) or m.reach_voxels != first.reach_voxels \
                or m.level_away_mm != first.level_away_mm or m.anatomy_above_level_hu != first.anatomy_above_level_hu \
                or not (np.allclose(m.mean, first.mean) and np.allclose(m.scale, first.scale)):
            raise SystemExit("members differ in depth, reach, level measure or normalisation: "
                             "train them on one extraction")
    arrays = {"mean": first.mean, "scale": first.scale, "reach_voxels": np.array(first.reach_voxels),
              "level_away_mm": np.array(first.level_away_mm),
              "anatomy_above_level_hu": np.array(first.anatomy_above_level_hu)}
    n = len(members)
    for i in range(len(first.weights) // 2):
        ws = [m.weights[2 * i] for m in members]
        b = np.concatenate([m.weights[2 * i + 1] for m in members])
        # every member sees the same features; past the first layer each member's units see only its own
        w = np.concatenate(ws, axis=1) if i == 0 else block_diag(*ws)
        if 2 * i + 2 == len(first.weights):  # the output: the members' mean
            w = w.sum(axis=1, keepdims=True) / n
            b = np.array([b.sum() / n])
        arrays[f"W{i}"], arrays[f"b{i}"] = w.astype(np.float32), b.astype(np.float32)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, **arrays)
    print(f"{n} members merged into {args.out}")
    return 0


def _lumen(hu, level):
    """A soft 'the reader calls this lumen' (HU / 1000): above half-way from the wall to the contrast level
    and below the level + 100 HU (``lab/dicom_node_lab/reader.py``'s edges), 25 HU wide."""
    import torch

    low = 0.5 * (level + WALL_HU / 1000.0)
    return torch.sigmoid((hu - low) / 0.025) * torch.sigmoid((level + PRIMARY_WHITE / 1000.0 - hu) / 0.025)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(required=True)
    e = sub.add_parser("extract", help="regions of training (and validation) studies, through the engine")
    e.add_argument("--out", default="runs/calcium-estimate")
    e.add_argument("--seed", type=int, default=TRAIN_SEED)
    e.add_argument("--studies", type=int, default=200)
    e.add_argument("--workers", type=int, default=2)
    e.add_argument("--studies-from", help="a train log (.json): extract exactly the studies it trained on")
    e.add_argument("--reach-voxels", type=int, default=3)
    e.add_argument("--engine", action="append", default=[])
    e.add_argument("--jitter", type=float, default=0.15, help="training regions' MTF50 off the table by up to this")
    e.add_argument("--vessel-feature", action="store_true",
                   help="the vessel's calibre at each region as a feature (subtract.VESSEL_FEATURE)")
    e.add_argument("--context-voxels", type=int, default=0,
                   help="features this far beyond the reach too (for an estimate with as many convolutions)")
    e.add_argument("--level-away-mm", type=float, default=0.0,
                   help="measure the contrast level this far from the detected calcium (subtract.reference_levels); "
                        "0: around each voxel")
    e.add_argument("--given-calcium", choices=GIVEN_CALCIUM, default="",
                   help="plan the regions on an oracle's calcium, not the engine's detection (the estimate that "
                        "oracle's whole-pipeline run needs; world_oracles)")
    e.add_argument("--true-calcium", dest="given_calcium", action="store_const", const="true-calcium",
                   help="the same as --given-calcium true-calcium")
    e.set_defaults(func=extract)
    t = sub.add_parser("train", help="fit the correction network on extracted regions")
    t.add_argument("--data", default="runs/calcium-estimate")
    t.add_argument("--out", default="engines/calcium_excess.npz")
    t.add_argument("--minutes", type=float, default=20.0)
    t.add_argument("--steps", type=int, default=0, help="stop after this many steps too (0: the time budget only)")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="cosine: the rate falls from --lr to 0 over --steps (constant: as the shipped estimates)")
    t.add_argument("--width", type=int, default=32)
    t.add_argument("--layers", type=int, default=2)
    t.add_argument("--seed", type=int, default=1)
    t.add_argument("--convolutions", type=int, default=0, help="3x3x3 convolutions after the hidden layers")
    t.add_argument("--convolution-width", type=int, default=16)
    t.add_argument("--device", default="auto", help="torch device (auto: cuda where there is one)")
    t.add_argument("--reach-voxels", type=int, default=3)
    t.add_argument("--validate-every", type=int, default=500)
    t.add_argument("--lumen-weight", type=float, default=0.1)
    t.add_argument("--closing-weight", type=float, default=2.0, help="extra weight of lumen the estimate takes away")
    t.add_argument("--calibre-weight", type=float, default=0.0,
                   help="each region's loss times (3 mm / its vessel's calibre) to this power (--vessel-feature data)")
    t.add_argument("--level-weight", type=float, default=0.0,
                   help="each region's loss times ((400 HU - wall) / (its contrast level - wall)) to this power")
    t.add_argument("--lumen-hu-weight", type=float, default=0.0,
                   help="extra weight of the squared error on footprint voxels the truth image shows as lumen")
    t.add_argument("--excess-weight", type=float, default=0.0,
                   help="weight of the estimate's squared error against the phantom's own calcium on its domain")
    t.set_defaults(func=train)
    m = sub.add_parser("merge", help="several trained estimates as one (the mean of their corrections)")
    m.add_argument("members", nargs="+", help=".npz files train wrote from one extraction")
    m.add_argument("--out", required=True)
    m.set_defaults(func=merge)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
