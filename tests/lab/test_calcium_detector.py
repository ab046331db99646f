"""The learnt calcium detector's training (``dicom_node_lab.calcium_detector``): extract, train, load.

Two training and one validation study, a few real steps: the pools are the node's (its features, in its
order), the phantom's calcium labels them, and the file training writes is one the node reads and runs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from dicom_node.pipeline.detect_learnt import FEATURES, LearntCalcium
from dicom_node_lab import calcium_detector as cd
from dicom_node_lab.calcium_estimate import TRAIN_SEED, VALIDATION_SEED

pytestmark = pytest.mark.slow


def test_extract_train_and_the_node_loads_what_training_wrote(tmp_path):
    data = tmp_path / "data"
    for seed, studies in ((TRAIN_SEED, 2), (VALIDATION_SEED, 1)):
        assert cd.main(["extract", "--out", str(data), "--seed", str(seed), "--studies", str(studies),
                        "--workers", "1"]) == 0
    z = np.load(data / f"{TRAIN_SEED}-0.npz")
    assert z["features"].shape == (len(z["calcium"]), len(FEATURES)) == (len(z["near"]), len(FEATURES))
    assert z["calcium"].any() and not z["calcium"].all(), "the pool holds calcium and lumen beside it"
    assert not (z["calcium"] & ~z["near"]).any(), "calcium is near calcium"
    found = z["features"][:, FEATURES.index("found_by_rules")] > 0.5
    assert found.any() and (z["calcium"][found].mean() > z["calcium"][~found].mean()), \
        "what the rules find is calcium more often than what they leave"
    out = tmp_path / "detector.npz"
    assert cd.main(["train", "--data", str(data), "--out", str(out), "--steps", "40", "--batch", "256",
                    "--threshold", "0.6"]) == 0
    log = json.loads(out.with_suffix(".json").read_text())
    assert log["training_studies"] == 2 and log["validation_studies"] == 1 and log["steps"] == 40
    report = log["validation"]
    assert report["rules"]["calcium"] <= report["calcium_in_pool"] and set(report["learnt"]) == {"0.3", "0.5", "0.7",
                                                                                                 "0.9"}
    detector = LearntCalcium.load(out)
    assert detector.threshold == pytest.approx(0.6) and log["sha256"] == detector.digest
    p = detector(z["features"])
    assert p.shape == (len(z["calcium"]),) and ((p >= 0) & (p <= 1)).all()
    assert p[z["calcium"]].mean() > p[~z["calcium"]].mean(), "40 steps already tell calcium from the rest"


def test_compare_counts_what_each_side_takes():
    calcium = np.array([1, 1, 1, 0, 0, 0], bool)
    near = np.array([1, 1, 1, 1, 0, 0], bool)
    found = np.array([1, 0, 0, 1, 0, 0], bool)
    probability = np.array([0.95, 0.8, 0.2, 0.6, 0.4, 0.1])
    out = cd.compare(probability, calcium, near, found)
    assert out["rules"] == {"calcium": 1, "other": 1, "other_far": 0}
    assert out["learnt"]["0.5"] == {"calcium": 2, "other": 1, "other_far": 0}
    assert out["learnt"]["0.3"] == {"calcium": 2, "other": 2, "other_far": 1}
    assert out["calcium_at_rules_other"] == 2, "ranked, the classifier reaches 2 calcium before its first wrong voxel"
