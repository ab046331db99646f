"""Experiment 2's visible-calcium diagnostic: what a perfect detector of visible calcium would give.

The figure only means something if the calcium it adds is the phantom's own, and only
the part that stands out from the contrast beside it.
"""

from __future__ import annotations

import numpy as np

from dicom_node.backends.onnxruntime import OnnxRuntimeBackend
from dicom_node.pipeline.detect import DetectOptions, detect
from dicom_node.pipeline.restore import Engine
from dicom_node_lab import experiment2, phantom
from dicom_node_lab.patches import volume_seed


def _study() -> phantom.Phantom:
    # tuning study 4040012120: calcium both brighter than its lumen and blurred into it
    return phantom.generate(experiment2.EXP2_SHAPE, seed=volume_seed(experiment2.EXP2_TUNE_SEED, 0),
                            options=experiment2.EXP2_OPTIONS)


def test_visible_calcium_is_the_true_calcium_that_stands_out_from_its_lumen():
    p = _study()
    image = np.round(p.image).astype(np.float32)
    seen = experiment2.visible_calcium(p, image)
    assert seen.any() and not (seen & ~p.calcium_mask).any(), "only the phantom's own calcium"
    hidden = p.calcium_mask & ~seen
    assert hidden.any(), "this study also has calcium no brighter than its contrast"
    # the same voxel, brighter or darker as acquired, moves between the two
    a, b = tuple(np.argwhere(hidden)[0]), tuple(np.argwhere(seen)[0])
    image[a] += 2000.0
    image[b] = 0.0
    moved = experiment2.visible_calcium(p, image)
    assert moved[a] and not moved[b]
    assert not (moved & ~p.calcium_mask).any()


def test_the_visible_calcium_run_adds_to_the_engines_own_detection():
    p = _study()
    image = np.round(p.image).astype(np.float32)
    engine = Engine(OnnxRuntimeBackend(experiment2.EXP2_RUNS[0][1]), DetectOptions())  # the shipped default's model
    given = experiment2._given_calcium(experiment2.VISIBLE_CALCIUM, p, image, engine)
    found = detect(image, p.spacing, engine.detect_options).calcium
    seen = experiment2.visible_calcium(p, image)
    assert np.array_equal(given.calcium, found | seen)
    assert (seen & ~found).any(), "the diagnostic gives calcium the detector missed"
    assert experiment2._given_calcium("footprint", p, image, engine) is None
