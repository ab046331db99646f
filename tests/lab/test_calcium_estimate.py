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


def _extract_both(data, studies: int, *options: str) -> dict:
    """Training and validation regions of a few studies; the first training region."""
    for seed in (ce.TRAIN_SEED, ce.VALIDATION_SEED):
        assert ce.main(["extract", "--out", str(data), "--seed", str(seed), "--studies", str(studies),
                        "--workers", "1", *options, *SUBTRACT]) == 0
    return np.load(data / f"{ce.TRAIN_SEED}-0.npy", allow_pickle=True).tolist()[0]


def test_extract_train_and_the_node_loads_what_training_wrote(tmp_path):
    data = tmp_path / "data"
    # sharpened by the split (engine.subtract_anatomy_hu): the file must say so, as it says how levels were measured
    region = _extract_both(data, 3, "--level-away-mm", "2", "--engine", "subtract_anatomy_hu = 100")
    assert region["features"].shape == (len(region["domain"]), len(FEATURES))
    assert len(region["foot"]) == len(region["target"]) == len(region["acquired"]) == len(region["level"])
    assert region["level_away_mm"] == 2.0 and region["anatomy_hu"] == 100.0
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
    assert learnt.anatomy_above_level_hu == 100.0, "and sharpens as training did"
    acquired, _, calcium = _vessel(ScannerBlur())
    out_image = calcium_removed(acquired, acquired > 600.0, SPACING, SubtractOptions(learnt=learnt), 400.0)
    assert np.isfinite(out_image).all() and (acquired - out_image)[calcium].mean() > 100.0
    # the truth's lumen voxels weighted (--lumen-hu-weight): the same steps from the same seed keep the lumen
    # closer to the truth than the plain objective does, and the log gives the lumen's own RMSE beside
    plain, lumen = tmp_path / "plain.npz", tmp_path / "lumen.npz"
    for path, weight in ((plain, "0"), (lumen, "20")):
        assert ce.main(["train", "--data", str(data), "--out", str(path), "--steps", "30", "--validate-every", "10",
                        "--minutes", "5", "--lumen-hu-weight", weight]) == 0
    plain_log, lumen_log = (json.loads(p.with_suffix(".json").read_text()) for p in (plain, lumen))
    assert lumen_log["settings"]["lumen_hu_weight"] == 20.0
    assert 0.0 < lumen_log["best_held_lumen_rmse_hu"] < plain_log["best_held_lumen_rmse_hu"]
    assert len(plain_log["rule_rmse_hu_held"]) == 4 and all("held_lumen_rmse_hu" in s for s in plain_log["steps"])
    # regions weighted by their contrast level (--level-weight): the best step is chosen on the validation figures
    # weighted alike, and those differ from the plain ones where the regions' levels differ
    leveled = tmp_path / "level.npz"
    assert ce.main(["train", "--data", str(data), "--out", str(leveled), "--steps", "30", "--validate-every", "10",
                    "--minutes", "5", "--level-weight", "2"]) == 0
    level_log = json.loads(leveled.with_suffix(".json").read_text())
    assert level_log["settings"]["level_weight"] == 2.0
    assert level_log["best_held_weighted"][0] != pytest.approx(level_log["best_held_rmse_hu"])
    # a cosine learning rate decays over --steps (so it needs them), and the same seed then ends elsewhere
    with pytest.raises(SystemExit, match="--steps"):
        ce.main(["train", "--data", str(data), "--out", str(tmp_path / "x.npz"), "--lr-schedule", "cosine"])
    decayed = tmp_path / "cosine.npz"
    assert ce.main(["train", "--data", str(data), "--out", str(decayed), "--steps", "30", "--validate-every", "10",
                    "--minutes", "5", "--lr-schedule", "cosine"]) == 0
    assert json.loads(decayed.with_suffix(".json").read_text())["settings"]["lr_schedule"] == "cosine"
    assert not np.allclose(np.load(decayed)["W0"], np.load(plain)["W0"])


def test_regions_planned_on_the_phantoms_own_calcium_hold_all_of_it():
    """``extract --true-calcium`` (the estimate a perfect detection would need): the regions are planned on the
    phantom's calcium mask, so their domains hold at least the calcium the engine's detection reaches, with
    finite features (the level where no contrast is near comes from the options' threshold)."""
    from dicom_node.config import DEFAULT_MODEL
    from dicom_node_lab.experiment2v2 import _engine

    engine = _engine(DEFAULT_MODEL, SUBTRACT[1::2])
    found = ce.extract_study(engine, ce.TRAIN_SEED, 0, 3, level_away_mm=2.0)
    true = ce.extract_study(engine, ce.TRAIN_SEED, 0, 3, level_away_mm=2.0, given_calcium="true-calcium")
    assert true and all(np.isfinite(r["features"]).all() and np.isfinite(r["level"]).all() for r in true)
    assert sum(float(r["excess"].sum()) for r in true) >= sum(float(r["excess"].sum()) for r in found) > 0


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


def test_the_torch_twin_of_a_convolving_estimate_is_what_the_node_computes(tmp_path):
    """Training runs the torch model, the node its numpy reading of the written file: the two must agree
    voxel for voxel (tap order, layout of the kernels, zero outside the domain), or the node would apply an
    estimate nobody trained."""
    import torch

    torch.manual_seed(0)
    net = ce._estimate(len(FEATURES), 8, 1, 2, 5)
    torch.nn.init.normal_(net.head.weight)
    rng = np.random.default_rng(0)
    voxels = np.argwhere(rng.random((6, 7, 8)) < 0.5)
    features = rng.normal(size=(len(voxels), len(FEATURES)))
    n = len(FEATURES)
    np.savez(tmp_path / "t.npz", mean=np.zeros(n), scale=np.ones(n), reach_voxels=np.array(3), **net.arrays())
    node = LearntExcess.load(tmp_path / "t.npz")
    at = voxels - voxels.min(axis=0)
    box = tuple(int(k) for k in at.max(axis=0) + 1)
    flat = torch.tensor((at[:, 0] * box[1] + at[:, 1]) * box[2] + at[:, 2])
    with torch.no_grad():
        twin = net(torch.tensor(features, dtype=torch.float32), (box, flat))[:, 0].numpy()
    expected = np.clip(features[:, RULE] + twin, 0.0, None) * 1000.0
    assert np.abs(node(features, voxels) - expected).max() < 0.01 * np.abs(expected).max()
    assert np.abs(expected).max() > 100.0, "a test of zeros would prove nothing"
    # shifted as a whole, the voxels give the same: only their neighbourhood matters
    assert np.allclose(node(features, voxels + 7), node(features, voxels))


def test_a_convolving_estimate_trains_on_features_beyond_its_reach(tmp_path):
    data = tmp_path / "data"
    region = _extract_both(data, 2, "--context-voxels", "1")
    assert region["inside"].shape == (len(region["domain"]),) and 0 < region["inside"].sum() < len(region["inside"])
    with pytest.raises(SystemExit, match="context-voxels"):  # 2 convolutions need 2 voxels of context
        ce.main(["train", "--data", str(data), "--out", str(tmp_path / "x.npz"), "--steps", "2", "--convolutions", "2"])
    out = tmp_path / "conv.npz"
    assert ce.main(["train", "--data", str(data), "--out", str(out), "--steps", "20", "--validate-every", "10",
                    "--convolutions", "1", "--convolution-width", "4", "--device", "cpu"]) == 0
    learnt = LearntExcess.load(out)
    assert learnt.context_voxels == 1
    # the log names the studies trained on, and a replay extracts exactly those
    log = out.with_suffix(".json")
    assert json.loads(log.read_text())["training_studies"] == [0, 1]
    again = tmp_path / "again"
    assert ce.main(["extract", "--out", str(again), "--studies-from", str(log), "--studies", "9", "--workers", "1",
                    "--context-voxels", "1", *SUBTRACT]) == 0
    assert sorted(f.name for f in again.glob("*.npy")) == [f"{ce.TRAIN_SEED}-0.npy", f"{ce.TRAIN_SEED}-1.npy"]
    acquired, _, _ = _vessel(ScannerBlur())
    out_image = calcium_removed(acquired, acquired > 600.0, SPACING, SubtractOptions(learnt=learnt), 400.0)
    assert np.isfinite(out_image).all()
    with pytest.raises(SystemExit, match="convolving"):
        ce.main(["merge", str(out), str(out), "--out", str(tmp_path / "m.npz")])


def test_extract_and_train_with_the_vessels_calibre(tmp_path):
    """``extract --vessel-feature``: each region carries its box's vessel calibre as a last feature (one value per
    region), training builds the network one input wider, and the node's file says it reads the calibre."""
    data = tmp_path / "data"
    region = _extract_both(data, 2, "--level-away-mm", "2", "--vessel-feature")
    assert region["features"].shape == (len(region["domain"]), len(FEATURES) + 1)
    calibre = region["features"][:, -1]
    assert np.all(calibre == calibre[0]) and 1.0 < calibre[0] < 6.0
    out = tmp_path / "estimate.npz"
    assert ce.main(["train", "--data", str(data), "--out", str(out), "--steps", "10", "--validate-every", "5",
                    "--minutes", "5"]) == 0
    learnt = LearntExcess.load(out)
    assert learnt.vessel_feature and learnt.mean.shape == (len(FEATURES) + 1,)
    # the loss weighted by the calibre: the best step is chosen on the weighted validation figures, logged beside
    weighted = tmp_path / "weighted.npz"
    assert ce.main(["train", "--data", str(data), "--out", str(weighted), "--steps", "10", "--validate-every", "5",
                    "--minutes", "5", "--calibre-weight", "2"]) == 0
    log = json.loads(weighted.with_suffix(".json").read_text())
    assert len(log["best_held_weighted"]) == 3 and log["settings"]["calibre_weight"] == 2.0
    # a folder mixing regions with and without the calibre is refused rather than trained on
    narrow = dict(region, features=region["features"][:, :-1])
    np.save(data / f"{ce.TRAIN_SEED}-99.npy", np.array([narrow], dtype=object), allow_pickle=True)
    with pytest.raises(SystemExit, match="vessel-feature"):
        ce.main(["train", "--data", str(data), "--out", str(out), "--steps", "5", "--minutes", "5"])
    plain = tmp_path / "plain"
    _extract_both(plain, 2, "--level-away-mm", "2")
    with pytest.raises(SystemExit, match="vessel-feature"):  # weights by a calibre the regions do not carry
        ce.main(["train", "--data", str(plain), "--out", str(out), "--steps", "5", "--minutes", "5",
                 "--calibre-weight", "2"])
