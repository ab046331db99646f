"""Train an inpainting network on phantom patches (and optionally a site's own CTA).

Examples:
  # the shipped model (settings recorded in engines/MODEL_CARD.md)
  python tools/train.py --out runs/shipped --network dense_unet --mask-mode mixed \\
      --steps 8000 --lr 1e-3 --schedule cosine --seed 1
  # the paper's setting
  python tools/train.py --out runs/paper --mask-mode cube16 --lr 1e-4
  # fine-tune on a hospital's own scans, self-supervised, half of the patches
  python tools/train.py --out runs/site --dicom /data/cta --dicom-fraction 0.5

Re-running the same command resumes from ``OUT/checkpoint.pt``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from dicom_node_lab.masks import MASK_MODES
from dicom_node_lab.model.inpaint import INPUT_MODES
from dicom_node_lab.model.networks import NETWORKS
from dicom_node_lab.model.training import LOSSES, TrainConfig, train
from dicom_node_lab.phantom import CALCIUM_KINDS


def main(argv: list[str] | None = None) -> int:
    d = TrainConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="run folder: checkpoint, log, model.pt")
    ap.add_argument("--network", choices=sorted(NETWORKS), default=d.network)
    ap.add_argument("--mask-mode", choices=MASK_MODES, default=d.mask_mode)
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--minutes", type=float, default=d.minutes, help="wall-clock budget (0: steps only)")
    ap.add_argument("--cpu-minutes", type=float, default=d.cpu_minutes,
                    help="CPU-time budget of the training process (0: none); fair between parallel runs")
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--schedule", choices=("constant", "cosine"), default=d.schedule)
    ap.add_argument("--batch", type=int, default=d.batch)
    ap.add_argument("--loss", choices=LOSSES, default=d.loss,
                    help="whole: patch MSE (paper); mask: in-mask MSE; lumen: in-mask MSE + lumen-boundary term")
    ap.add_argument("--lumen-weight", type=float, default=d.lumen_weight,
                    help="weight of the lumen-boundary term (--loss lumen)")
    ap.add_argument("--kind-weights", type=float, nargs=len(CALCIUM_KINDS), default=None,
                    metavar="W", help="relative frequency of the calcium kinds " + " ".join(CALCIUM_KINDS))
    ap.add_argument("--inputs", choices=INPUT_MODES, default=d.inputs,
                    help="hidden: masked voxels hidden (paper); observed: seen and corrected downwards")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--threads", type=int, default=d.threads)
    ap.add_argument("--workers", type=int, default=d.workers)
    ap.add_argument("--reuse", type=int, default=d.reuse, help="patches cut from each rendered phantom volume")
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    ap.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    ap.add_argument("--validate-every", type=int, default=d.validate_every)
    ap.add_argument("--validation-patches", type=int, default=d.validation_patches)
    ap.add_argument("--margin-mm", type=float, default=d.margin_mm,
                    help="footprint masks dilate the calcium by 0.8-1.3 × this (the engine uses engine.margin_mm)")
    ap.add_argument("--world", action="store_true",
                    help="train on the calibrated world (world.py; the standard kernel and motion > 0.7 mm held out)")
    ap.add_argument("--init", default="", help="fine-tune from this model.pt instead of random weights")
    ap.add_argument("--bn-calibration-batches", type=int, default=d.bn_calibration_batches,
                    help="batches of 6 fresh patches for exact BatchNorm statistics after training")
    ap.add_argument("--dicom", action="append", default=[], metavar="DIR",
                    help="self-supervised patches from a site's CTA folders (repeatable)")
    ap.add_argument("--dicom-fraction", type=float, default=None,
                    help="share of patches from --dicom (default 0.5 when --dicom is given)")
    ap.add_argument("--device", default=d.device, help="cpu (default) or cuda: train on a GPU")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    values["kind_weights"] = tuple(args.kind_weights or ())
    if values.get("dicom_fraction") is None:
        values["dicom_fraction"] = 0.5 if args.dicom else 0.0
    cfg = TrainConfig(**values)
    source = None
    if cfg.dicom:
        from dicom_node_lab.selfsupervised import DicomPatchSource

        source = DicomPatchSource(cfg.dicom)
    summary = train(cfg, args.out, progress=not args.quiet, dicom_source=source)
    print(f"trained {summary['network']} ({summary['mask_mode']}): {summary['steps']} steps in "
          f"{summary['train_seconds'] / 60:.1f} min, held-out in-mask MSE {summary['val_mask_mse_hu2']:.0f} HU²")
    return 0


if __name__ == "__main__":
    sys.exit(main())
