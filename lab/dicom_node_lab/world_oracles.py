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
- ``found-union``: the engine's detection with the whole deposits it touches added, its own voxels all kept (those
  outside the phantom's calcium too). Against ``found-whole``, asks whether the gain is what the detection misses
  of a deposit or what it takes beyond it.
- ``found-trimmed``: the engine's detection with what it takes beyond the true deposits it touches taken away,
  nothing added: the other half of ``found-whole``.

``calcium_estimate extract --given-calcium ORACLE`` extracts an estimate on the same calcium (an estimate must be
extracted on the detection it serves: the whole-deposit estimate on the engine's own detection reads 10.01).

``python -m dicom_node_lab.world_oracles ORACLE experiment2v2 --studies 120 --seed 6060 ...`` takes the arguments
of ``tools/evaluate.py``. Process workers are forked, so they inherit the change.
"""

from __future__ import annotations

import sys

import numpy as np
from scipy import ndimage

ORACLES = ("no-beam-hardening", "true-calcium", "found-whole", "found-union", "found-trimmed")
# the oracles that replace the detection
GIVEN_CALCIUM = ("true-calcium", "found-whole", "found-union", "found-trimmed")
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


def _touched_deposits(detected: np.ndarray, true_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The true deposits (26-connected labels) and the labels of those within one voxel of ``detected``."""
    deposits, _ = ndimage.label(true_mask, structure=np.ones((3, 3, 3)))
    reach = ndimage.binary_dilation(detected, structure=np.ones((3, 3, 3)))
    touched = np.unique(deposits[reach & (deposits > 0)])
    return deposits, touched[touched > 0]


def found_union(detected: np.ndarray, true_mask: np.ndarray) -> np.ndarray:
    """``detected`` with every true deposit within one voxel of it added whole (nothing of it taken away)."""
    deposits, touched = _touched_deposits(detected, true_mask)
    return detected | np.isin(deposits, touched)


def _touching_components(detected: np.ndarray, true_mask: np.ndarray) -> np.ndarray:
    """The components of ``detected`` (26-connected) with a voxel of ``true_mask`` within one voxel, whole."""
    found, _ = ndimage.label(detected, structure=np.ones((3, 3, 3)))
    near = ndimage.binary_dilation(true_mask, structure=np.ones((3, 3, 3)))
    touching = np.unique(found[near & (found > 0)])
    return np.isin(found, touching[touching > 0])


def found_trimmed(detected: np.ndarray, true_mask: np.ndarray) -> np.ndarray:
    """``detected`` without its voxels outside ``true_mask`` in each component that touches it (within one voxel);
    components touching no true deposit are kept as they are, and nothing is added."""
    return detected & (true_mask | ~_touching_components(detected, true_mask))


def found_whole(detected: np.ndarray, true_mask: np.ndarray) -> np.ndarray:
    """``detected`` with each component that touches ``true_mask`` (26-connected, within one voxel) replaced by the
    whole true deposits it touches; components touching no true deposit are kept as they are."""
    deposits, touched = _touched_deposits(detected, true_mask)
    return np.isin(deposits, touched) | (detected & ~_touching_components(detected, true_mask))


# how each oracle that starts from the engine's detection shapes it with the phantom's calcium
_SHAPES = {"found-whole": found_whole, "found-union": found_union, "found-trimmed": found_trimmed}
def given_detection(oracle: str, mask: np.ndarray, volume: np.ndarray, spacing, options=None, level_image=None):
    """The detection record an oracle of ``GIVEN_CALCIUM`` puts in place of the engine's, ``mask`` the phantom's
    calcium: what the whole-pipeline run restores and ``calcium_estimate extract --given-calcium`` extracts on."""
    from dicom_node.pipeline import detect

    if oracle == "true-calcium":
        return true_detection(mask, volume, spacing, options)
    if oracle not in GIVEN_CALCIUM:
        raise ValueError(f"not an oracle that gives the calcium: {oracle!r} (one of {', '.join(GIVEN_CALCIUM)})")
    found = detect.detect(volume, spacing, options, level_image)
    return detect.describe(_SHAPES[oracle](found.calcium, mask), volume, spacing, threshold_hu=found.threshold_hu)


def with_given_calcium(oracle: str) -> None:
    """The engine's detection replaced by :func:`given_detection`'s for ``oracle`` (one of ``GIVEN_CALCIUM``)."""
    if oracle not in GIVEN_CALCIUM:
        raise ValueError(f"not an oracle that gives the calcium: {oracle!r}")
    _detect_with_phantom_mask(oracle, lambda mask, volume, spacing, options, level_image: given_detection(
        oracle, mask, volume, spacing, options, level_image))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ORACLES:
        print(f"usage: python -m dicom_node_lab.world_oracles {{{','.join(ORACLES)}}} EVALUATE-ARGS...",
              file=sys.stderr)
        return 2
    if argv[0] in GIVEN_CALCIUM:
        with_given_calcium(argv[0])
    else:
        without_beam_hardening()
    from dicom_node_lab import evaluate

    return evaluate.main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
