"""Experiment 2 v2 with one thing the node cannot know made perfect, to measure what it costs.

Why: ``experiment2v2 --oracle`` replaces images (the truth in the voxels the engine writes, the true calcium
subtracted); these replace the inputs of the whole pipeline instead, and the run reads every lesion as usual:

- ``no-beam-hardening``: each study drawn as usual, then acquired without the darkening the world puts beside dense
  calcium (the same noise draw; ``world.generate`` draws the darkening's amplitude and then leaves it out). Asks
  whether the subtraction, which models no beam hardening, loses to it.
- ``true-calcium``: the engine's detection replaced by the phantom's own calcium mask (each 26-connected piece a
  lesion); planning, the calcium estimate and the writing run as usual. Asks how much finding the calcium whole
  would give with the estimate as it is.
- ``found-whole``: the engine's detection, each of its components that touches the phantom's calcium replaced by
  the whole deposits it touches (components touching none kept as found). Asks how much of ``true-calcium``'s gain
  is the shape of the deposits the detection reaches rather than the deposits it misses: the first is a matter of
  growing what is found, which takes no new noise for calcium.

``python -m dicom_node_lab.world_oracles ORACLE experiment2v2 --studies 120 --seed 6060 ...`` takes the arguments
of ``tools/evaluate.py``. Process workers are forked, so they inherit the change.
"""

from __future__ import annotations

import sys

import numpy as np
from scipy import ndimage

ORACLES = ("no-beam-hardening", "true-calcium", "found-whole")
_HELD: dict = {}


def without_beam_hardening() -> None:
    """Studies acquired without beam hardening, everything else (the noise draw included) as drawn."""
    from dicom_node_lab import physics, world

    def acquisition(**fields):
        fields["beam_hardening_hu"] = 0.0
        return physics.Acquisition(**fields)

    world.Acquisition = acquisition


def true_detection(mask, volume, spacing, options=None):
    """The detection record of the phantom's own calcium mask, with the threshold the engine's options name (the
    subtraction's level where no contrast is near derives from it)."""
    from dicom_node.pipeline import detect

    threshold = (options or detect.DetectOptions()).threshold_hu
    return detect.describe(mask.copy(), volume, spacing, threshold_hu=threshold)


def _detect_with_phantom_mask(oracle: str, detection) -> None:
    """Patch the engine's detection with ``detection(mask, volume, spacing, options, level_image)``, ``mask`` the
    calcium mask of the study being processed (held as ``experiment2v2.make_study`` draws it; one study at a time
    per worker process)."""
    from dicom_node.pipeline import restore
    from dicom_node_lab import experiment2v2

    made = experiment2v2.make_study

    def make_study(seed: int, i: int):
        p = made(seed, i)
        _HELD["mask"] = p.calcium_mask
        return p

    def held_mask_detection(volume, spacing, options=None, level_image=None):
        mask = _HELD.get("mask")
        if mask is None or mask.shape != volume.shape:
            raise RuntimeError(f"{oracle} oracle: no phantom mask for this volume")
        return detection(mask, volume, spacing, options, level_image)

    experiment2v2.make_study = make_study
    restore.detect = held_mask_detection


def with_true_calcium() -> None:
    """The engine detects the study's own calcium mask (``Phantom.calcium_mask``)."""
    _detect_with_phantom_mask("true-calcium",
                              lambda mask, volume, spacing, options, _: true_detection(mask, volume, spacing, options))


def found_whole(detected: np.ndarray, true_mask: np.ndarray) -> np.ndarray:
    """``detected`` with each component that touches ``true_mask`` (26-connected, within one voxel) replaced by the
    whole true deposits it touches; components touching no true deposit are kept as they are."""
    deposits, _ = ndimage.label(true_mask, structure=np.ones((3, 3, 3)))
    found, _ = ndimage.label(detected, structure=np.ones((3, 3, 3)))
    reach = ndimage.binary_dilation(detected, structure=np.ones((3, 3, 3)))
    touched = np.unique(deposits[reach & (deposits > 0)])
    # detected components with a true deposit within one voxel
    near = ndimage.binary_dilation(deposits > 0, structure=np.ones((3, 3, 3)))
    replaced = np.unique(found[near & (found > 0)])
    return np.isin(deposits, touched[touched > 0]) | (detected & ~np.isin(found, replaced[replaced > 0]))


def with_found_whole() -> None:
    """The engine's detection with the deposits it reaches made whole (:func:`found_whole`)."""
    from dicom_node.pipeline import detect, restore

    engine_detect = restore.detect

    def whole_detection(mask, volume, spacing, options, level_image):
        found = engine_detect(volume, spacing, options, level_image)
        return detect.describe(found_whole(found.calcium, mask), volume, spacing, threshold_hu=found.threshold_hu)

    _detect_with_phantom_mask("found-whole", whole_detection)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ORACLES:
        print(f"usage: python -m dicom_node_lab.world_oracles {{{','.join(ORACLES)}}} EVALUATE-ARGS...",
              file=sys.stderr)
        return 2
    {"no-beam-hardening": without_beam_hardening, "true-calcium": with_true_calcium,
     "found-whole": with_found_whole}[argv[0]]()
    from dicom_node_lab import evaluate

    return evaluate.main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
