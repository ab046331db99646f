"""The learnt calcium estimate's training (``dicom_node_lab.calcium_estimate``): extract, train, load.

A few real steps on one training and one validation study: the regions carry what the loss needs,
the written file is what the node loads, and a correction trained from zero moves the estimate away
from the rule's only as far as the data pulled it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from dicom_node.pipeline.subtract import FEATURES, RULE, LearntExcess, ScannerBlur, SubtractOptions, calcium_removed
from dicom_node_lab import calcium_estimate as ce
from tests.pipeline.test_subtract import SPACING, _vessel

pytestmark = pytest.mark.slow

SUBTRACT = ["--engine", 'method = "subtract"', "--engine", 'confidence = false']


def test_extract_train_and_the_node_loads_what_training_wrote(tmp_path):
    data = tmp_path / "data"
    for seed in (ce.TRAIN_SEED, ce.VALIDATION_SEED):
        assert ce.main(["extract", "--out", str(data), "--seed", str(seed), "--studies", "3", "--workers", "1",
                        "--level-away-mm", "2", *SUBTRACT]) == 0
    (region, *_) = np.load(data / f"{ce.TRAIN_SEED}-0.npy", allow_pickle=True).tolist()
    assert region["features"].shape == (len(region["domain"]), len(FEATURES))
    assert len(region["foot"]) == len(region["target"]) == len(region["acquired"]) == len(region["level"])
    assert region["level_away_mm"] == 2.0
    assert region["target"].max() > 100.0, "the footprint holds the calcium's bloom"
    assert region["excess"].shape == (len(region["domain"]),) and region["excess"].max() > 100.0, \
        "the phantom's own calcium on the estimate's domain"
    out = tmp_path / "estimate.npz"
    assert ce.main(["train", "--data", str(data), "--out", str(out), "--steps", "30", "--validate-every", "10",
                    "--minutes", "5", "--excess-weight", "0.1"]) == 0
    log = json.loads(out.with_suffix(".json").read_text())
    assert [s["step"] for s in log["steps"]] == [10, 20, 30]
    assert all(s["held_calcium_rmse_hu"] > 0 for s in log["steps"])
    assert log["best_held_rmse_hu"] <= log["rule_rmse_hu_held"][0] * 1.5
    learnt = LearntExcess.load(out)
    assert learnt.level_away_mm == 2.0, "the node measures the level as training did"
    acquired, _, calcium = _vessel(ScannerBlur())
    out_image = calcium_removed(acquired, acquired > 600.0, SPACING, SubtractOptions(learnt=learnt), 400.0)
    assert np.isfinite(out_image).all() and (acquired - out_image)[calcium].mean() > 100.0


def test_an_experiments_relative_estimate_path_is_taken_from_the_working_folder(tmp_path, monkeypatch):
    """The experiments write the engine's config to a temporary folder; a relative ``subtract_estimate``
    given on their command line must still name the file beside the user, as the reports' commands do."""
    from dicom_node_lab.experiment2v2 import _engine_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "engines").mkdir()
    np.savez(tmp_path / "engines" / "e.npz", W0=np.zeros((len(FEATURES), 2)), b0=np.zeros(2), W1=np.zeros((2, 1)),
             b1=np.zeros(1), mean=np.zeros(len(FEATURES)), scale=np.ones(len(FEATURES)), reach_voxels=np.array(3))
    cfg = _engine_config(tmp_path / "m.onnx", ['method = "subtract"', 'subtract_estimate = "engines/e.npz"'])
    assert cfg.engine.subtract_estimate == str(tmp_path / "engines" / "e.npz")
    assert cfg.engine.subtract_options().learnt is not None


def _random_estimate(path, rng, width=5, level_away_mm=0.0):
    n = len(FEATURES)
    np.savez(path, W0=rng.normal(size=(n, width)), b0=rng.normal(size=width), W1=rng.normal(size=(width, width)),
             b1=rng.normal(size=width), W2=rng.normal(size=(width, 1)) * 0.01, b2=rng.normal(size=1) * 0.01,
             mean=np.linspace(0.0, 1.0, n), scale=np.full(n, 2.0), reach_voxels=np.array(3),
             level_away_mm=np.array(level_away_mm))


@pytest.mark.parametrize("members", [2, 3])
def test_merged_estimates_give_the_mean_of_their_members(tmp_path, members):
    """One wider network that the node loads as any other, whose excess is the members' mean correction."""
    rng = np.random.default_rng(members)
    paths = [tmp_path / f"m{k}.npz" for k in range(members)]
    for p in paths:
        _random_estimate(p, rng)
    out = tmp_path / "merged.npz"
    assert ce.main(["merge", *map(str, paths), "--out", str(out)]) == 0
    merged = LearntExcess.load(out)
    features = rng.normal(size=(500, len(FEATURES)))
    features[:, RULE] = 1.0  # far above any correction: the clip at 0 does not act, so the mean must be exact
    mean = np.mean([LearntExcess.load(p)(features) for p in paths], axis=0)
    assert np.allclose(merged(features), mean, atol=1e-3)
    assert merged.weights[0].shape == (len(FEATURES), 5 * members)


def test_estimates_from_different_extractions_are_not_merged(tmp_path):
    rng = np.random.default_rng(0)
    _random_estimate(tmp_path / "a.npz", rng)
    _random_estimate(tmp_path / "b.npz", rng)
    with np.load(tmp_path / "b.npz") as z:
        other = dict(z)
    other["mean"] = other["mean"] + 0.5
    np.savez(tmp_path / "b.npz", **other)
    with pytest.raises(SystemExit, match="normalisation"):
        ce.main(["merge", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--out", str(tmp_path / "m.npz")])
    _random_estimate(tmp_path / "c.npz", np.random.default_rng(0), level_away_mm=2.0)
    with pytest.raises(SystemExit, match="level"):
        ce.main(["merge", str(tmp_path / "a.npz"), str(tmp_path / "c.npz"), "--out", str(tmp_path / "m.npz")])


def test_merged_estimates_keep_how_their_levels_were_measured(tmp_path):
    rng = np.random.default_rng(5)
    for k in range(2):
        _random_estimate(tmp_path / f"m{k}.npz", rng, level_away_mm=2.0)
    assert ce.main(["merge", str(tmp_path / "m0.npz"), str(tmp_path / "m1.npz"), "--out", str(tmp_path / "m.npz")]) == 0
    assert LearntExcess.load(tmp_path / "m.npz").level_away_mm == 2.0
