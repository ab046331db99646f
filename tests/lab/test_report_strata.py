"""Experiment 2 v2's strata separate kernel from motion, and a report can be written again from its JSON.

The held-out design puts every held-out motion on the sharp kernel's studies (and the standard
kernel's every third), so the plain kernel and motion tables mix the two effects; the
separating tables must hold exactly the lesions they name. ``evaluate.py rewrite`` brings a
committed report's tables up to date from the run's own rows, measuring nothing anew.
"""

from __future__ import annotations

import json

import pytest

from dicom_node_lab import evaluate, experiment2v2


def _row(i, kernel, motion_mm, error, stratum="calcified"):
    reads = {f"{n}@{w}": v for w in (100, 200)
             for n, v in (("original", 50.0 + error), ("processed", 40.0 + error), ("truth", 40.0))}
    return {"study": f"1-{i}", "vessel": 0, "lesion": 0, "type": stratum, "stratum": stratum, "kernel": kernel,
            "diameter_mm": 3.0, "geometric": 30.0, "arc_deg": 120.0, "density_mg_cm3": 800.0, "size": "3-4.5 mm",
            "arc": "90-180", "density": ">=500 mg", "motion_mm": motion_mm, "unsure": False,
            "disagreement_hu": 10.0, **reads}


ROWS = [_row(0, "standard", 1.0, 4.0), _row(1, "standard", 0.3, 2.0), _row(2, "standard", 0.3, 2.0),
        _row(3, "sharp", 1.1, 8.0), _row(4, "soft", 0.5, 6.0), _row(5, "hd", 0.2, 1.0),
        _row(6, "standard", 0.2, 0.0, stratum="normal")]


def test_the_separating_tables_hold_the_lesions_they_name():
    by = experiment2v2.all_strata(ROWS)
    assert by["motion"]["held-out > 0.7 mm"]["n"] == 2  # standard and sharp: the mixed table
    within = by["motion, standard kernel only"]
    assert within["held-out > 0.7 mm"]["n"] == 1 and within["seen <= 0.7 mm"]["n"] == 2
    assert within["held-out > 0.7 mm"]["processed_mae"] == 4.0 and within["seen <= 0.7 mm"]["processed_mae"] == 2.0
    seen = by["kernel, seen motion only"]
    assert set(seen) == {"standard", "soft", "hd"}  # the sharp kernel has no study with seen motion
    assert seen["standard"]["n"] == 2
    assert by["stratum"]["normal"]["n"] == 1 and by["kernel"]["sharp"]["n"] == 1


def test_a_report_is_written_again_from_its_json(tmp_path):
    res = {"studies": 7, "seed": experiment2v2.EXP2V2_SEED, "model": "/x/engines/dense_unet.onnx",
           "engine": ['method = "subtract"'], "wall_seconds": 60.0, "lesions": ROWS, "strata": {},
           "summary_calcified": {f"{w:g}": experiment2v2.summarise(
               [r for r in ROWS if r["stratum"] == "calcified"], w) for w in (100.0, 200.0)},
           "safety": {f"{w:g}": experiment2v2.safety(ROWS, w) for w in (100.0, 200.0)},
           "confidence": {"n": 0}, "goals": {"residual_calcium_fraction": 0.01, "rmse_original_hu": 200.0,
                                             "rmse_processed_hu": 50.0, "far_changed": 0, "far_voxels": 9,
                                             "bone_changed": 0, "bone_voxels": 9}}
    path = tmp_path / "experiment2v2.json"
    path.write_text(json.dumps(res))
    assert evaluate.main(["rewrite", str(path)]) == 0
    md = (tmp_path / "experiment2v2.md").read_text()
    assert "Reproduce: `python tools/evaluate.py experiment2v2 --studies 7 --engine 'method = \"subtract\"'`" in md
    assert "**motion, standard kernel only**" in md and "**kernel, seen motion only**" in md
    # every row's truth image shows a lumen: the second headline holds all six calcified lesions
    assert "## Calcified lesions whose truth image shows a lumen, white + 100 HU (6 lesions)" in md
    again = json.loads(path.read_text())
    assert again["lesions"] == ROWS and set(again["strata"]) >= {"kernel, seen motion only", "arc"}
    # a run with the level oracle says so in its command
    path.write_text(json.dumps(dict(res, oracle_level=True)))
    assert evaluate.main(["rewrite", str(path)]) == 0
    assert "--engine 'method = \"subtract\"' --oracle-level`" in (tmp_path / "experiment2v2.md").read_text()
    path.write_text(json.dumps(dict(res, oracle_level="detect")))  # ... and where it measured the level
    assert evaluate.main(["rewrite", str(path)]) == 0
    assert "--oracle-level detect`" in (tmp_path / "experiment2v2.md").read_text()
    path.write_text(json.dumps(dict(res, oracle_level="find")))
    assert evaluate.main(["rewrite", str(path)]) == 0
    assert "--oracle-level find`" in (tmp_path / "experiment2v2.md").read_text()
    assert "7 held-out studies of the world" in md
    # the second held-out range names itself, and its command its seed
    path.write_text(json.dumps(dict(res, seed=experiment2v2.EXP2V2_FRESH_SEED)))
    assert evaluate.main(["rewrite", str(path)]) == 0
    md = (tmp_path / "experiment2v2.md").read_text()
    assert f"--seed {experiment2v2.EXP2V2_FRESH_SEED}" in md and "7 fresh held-out studies of the world" in md
    path.write_text(json.dumps(dict(res, seed=experiment2v2.EXP2V2_THIRD_SEED)))
    assert evaluate.main(["rewrite", str(path)]) == 0
    assert "7 third held-out studies of the world" in (tmp_path / "experiment2v2.md").read_text()
    path.write_text(json.dumps(dict(res, seed=experiment2v2.EXP2V2_FOURTH_SEED)))
    assert evaluate.main(["rewrite", str(path)]) == 0
    assert "7 fourth held-out studies of the world" in (tmp_path / "experiment2v2.md").read_text()
    path.write_text(json.dumps(dict(res, seed=experiment2v2.EXP2V2_FIFTH_SEED)))
    assert evaluate.main(["rewrite", str(path)]) == 0
    assert "7 fifth held-out studies of the world" in (tmp_path / "experiment2v2.md").read_text()
    # a seed no set is named for (the estimate's training range, say) is not called tuning
    path.write_text(json.dumps(dict(res, seed=7070)))
    assert evaluate.main(["rewrite", str(path)]) == 0
    assert "7 other studies of the world" in (tmp_path / "experiment2v2.md").read_text()


def test_lesions_are_also_split_by_what_the_node_tells_the_radiologist():
    """The flag, the engine's calibre and whether a region reached the calcium are what a reader sees;
    each lesion lands in exactly one of those rows (and runs without a calibre get no such table)."""
    rows = [dict(_row(0, "standard", 0.2, 1.0), unsure=None, vessel_mm=None),
            dict(_row(1, "standard", 0.2, 9.0), unsure=True, vessel_mm=2.1),
            dict(_row(2, "standard", 0.2, 3.0), unsure=False, vessel_mm=2.7),
            dict(_row(3, "standard", 0.2, 2.0), unsure=False, vessel_mm=3.4),
            dict(_row(4, "standard", 0.2, 4.0), unsure=False, vessel_mm=3.0)]
    says = experiment2v2.all_strata(rows)[experiment2v2.NODE_SAYS]
    assert {k: t["n"] for k, t in says.items()} == {
        "no region: left as acquired": 1, "restored, marked unsure": 1, "restored, vessel < 3 mm": 1,
        "restored, vessel >= 3 mm": 2}
    assert says["restored, vessel >= 3 mm"]["processed_mae"] == 3.0
    assert experiment2v2.NODE_SAYS not in experiment2v2.all_strata(ROWS)


def test_lesions_are_also_split_by_whether_the_truth_image_shows_a_lumen():
    """A truth image that reads a total occlusion where the geometry has a lumen is a reference of its own kind
    (partial volume in a small lumen): its lesions get a row, apart from true occlusions and from the rest."""
    rows = [dict(_row(0, "standard", 0.2, 1.0), geometric=45.0), dict(_row(1, "standard", 0.2, 2.0), geometric=80.0),
            _row(2, "standard", 0.2, 3.0)]
    for r in rows[:2]:
        r["truth@100"], r["processed@100"], r["original@100"] = 100.0, 60.0, 70.0
    shows = experiment2v2.all_strata(rows)[experiment2v2.TRUTH_SHOWS]
    assert {k: t["n"] for k, t in shows.items()} == {
        "no lumen: true stenosis < 70 %": 1, "no lumen: true stenosis >= 70 %": 1, "a lumen": 1}
    assert shows["no lumen: true stenosis < 70 %"]["processed_mae"] == 40.0
    assert shows["a lumen"]["processed_mae"] == 3.0


def test_compare_pairs_the_same_lesions_and_says_which_way_they_moved(tmp_path, capsys):
    """``evaluate.py compare``: a setting is judged lesion by lesion against the reference run."""
    other = [dict(r) for r in ROWS]
    other[0] = _row(0, "standard", 1.0, 0.0)  # 4 points closer
    other[3] = _row(3, "sharp", 1.1, 10.0)  # 2 points further
    change = experiment2v2.paired_change(ROWS, other)
    assert change["n"] == 6  # the calcium-free segment is not paired
    assert abs(change["mean"] - (-4.0 + 2.0) / 6) < 1e-9
    assert change["better"] == 1 and change["worse"] == 1
    assert change["ci"][0] <= change["mean"] <= change["ci"][1]
    assert experiment2v2.paired_change(ROWS, [])["n"] == 0
    paths = []
    for name, rows in (("a", ROWS), ("b", other)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"lesions": rows}))
        paths.append(str(path))
    assert evaluate.main(["compare", *paths]) == 0
    out = capsys.readouterr().out
    assert "(reference)" in out and "-0.33 [" in out and "1 better / 1 worse" in out
    # the restorations the node called sure, and CAD-RADS agreement, beside the headline (the owner's decision table)
    assert "| sure: n (share), MAE, CAD-RADS (κ), made |" in out and "| 6 (100 %), 3.83, " in out
    # a run's --report-dir names it too; a folder without a run is refused by name
    run = tmp_path / "run-b"
    run.mkdir()
    (run / "experiment2v2.json").write_text(json.dumps({"lesions": other}))
    assert evaluate.main(["compare", paths[0], str(run)]) == 0
    assert "1 better / 1 worse" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no experiment2v2.json"):
        evaluate.main(["compare", paths[0], str(tmp_path / "nothing")])


def test_compare_pools_held_out_sets_joined_by_plus_and_resamples_whole_studies(tmp_path, capsys):
    """Two held-out sets read under the same two settings pool into one paired figure (``A+B``); the second
    interval resamples whole studies, whose lesions share a kernel and a noise draw."""
    second = [dict(r, study=r["study"].replace("1-", "2-"), seed=2) for r in ROWS]
    base, other = ROWS + second, [dict(r) for r in ROWS + second]
    other[0] = _row(0, "standard", 1.0, 0.0)  # 4 points closer in the first set
    other[len(ROWS)] = dict(_row(0, "standard", 1.0, 0.0), study="2-0", seed=2)  # and in the second
    change = experiment2v2.paired_change(base, other)
    assert change["n"] == 12 and change["studies"] == 12 and change["better"] == 2
    assert abs(change["mean"] - (-8.0 / 12)) < 1e-9
    assert change["ci_studies"][0] <= change["mean"] <= change["ci_studies"][1]
    # a study of one lesion each: the same draws as the lesions' own interval; all lesions in one study: the
    # resampled studies always hold all of them, so the interval closes on the mean
    single = experiment2v2.paired_change(ROWS, other[:len(ROWS)])
    assert single["ci_studies"] == pytest.approx(single["ci"])
    one = experiment2v2.paired_change([dict(r, study="1-0", vessel=i) for i, r in enumerate(ROWS)],
                                      [dict(r, study="1-0", vessel=i) for i, r in enumerate(other[:len(ROWS)])])
    assert one["studies"] == 1 and one["ci_studies"] == pytest.approx((one["mean"], one["mean"]))
    paths = {}
    for name, rows in (("a1", ROWS), ("a2", second), ("b1", other[:len(ROWS)]), ("b2", other[len(ROWS):])):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps({"lesions": rows}))
    assert evaluate.main(["compare", f"{paths['a1']}+{paths['a2']}", f"{paths['b1']}+{paths['b2']}"]) == 0
    out = capsys.readouterr().out
    assert "| 12 |" in out and "-0.67 [" in out and "studies resampled" in out and "2 better / 0 worse" in out
    with pytest.raises(SystemExit, match="no experiment2v2.json"):
        evaluate.main(["compare", f"{paths['a1']}+{tmp_path / 'nothing'}", str(paths["b1"])])


def test_splice_takes_the_other_readings_only_where_the_node_reported_what_was_asked(tmp_path, capsys):
    """``evaluate.py splice``: a region-level option asked of two runs' readings. Only the lesions the base run's
    report picks change; without ``--from`` they read as acquired; a lesion the other run lacks is refused."""
    base = [dict(r) for r in ROWS]
    from dicom_node.pipeline.restore import SHARPENED_ONLY_REASON

    base[0].update(unsure=True, why=[f"restored, unsure: {SHARPENED_ONLY_REASON}"], vessel_mm=2.1)
    base[1].update(unsure=True, why=["restored, unsure: vessel 2.5 mm < 2.75"], vessel_mm=2.5)
    base[2].update(vessel_mm=3.4)
    other = [dict(r, **{"processed@100": 40.0, "processed@200": 41.0}) for r in ROWS]  # the truth: 40
    sharp = experiment2v2.splice(base, other, "sharpened-only")
    assert [r["processed@100"] for r in sharp[:3]] == [40.0, 42.0, 42.0] and sharp[0]["spliced"]
    assert sharp[0]["processed@200"] == 41.0 and sharp[0]["original@100"] == base[0]["original@100"]
    assert [r.get("spliced", False) for r in experiment2v2.splice(base, other, "unsure")][:3] == [True, True, False]
    small = experiment2v2.splice(base, other, "small-vessel", vessel_mm=2.3)
    assert [r.get("spliced", False) for r in small][:3] == [True, False, False]
    base[0]["lumen_hu"], base[1]["lumen_hu"] = 300.0, 420.0  # the engine's measure (vessel_at); base[2] has none
    dim = experiment2v2.splice(base, other, "dim-lumen", lumen_hu=360.0)
    assert [r.get("spliced", False) for r in dim][:3] == [True, False, False]
    acquired = experiment2v2.splice(base, None, "unsure")
    assert acquired[1]["processed@100"] == base[1]["original@100"] == 52.0
    assert base[1]["processed@100"] == 42.0  # the base rows themselves are not changed
    with pytest.raises(ValueError, match="not in the other run"):
        experiment2v2.splice(base, other[1:], "unsure")
    with pytest.raises(ValueError, match="where must be one of"):
        experiment2v2.splice(base, other, "everywhere")
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"lesions": base}))
    b.write_text(json.dumps({"lesions": other}))
    out = tmp_path / "s" / "experiment2v2.json"
    assert evaluate.main(["splice", str(a), "--from", str(b), "--where", "unsure", "--out", str(out)]) == 0
    assert "2 of 7 lesions took the other run's readings" in capsys.readouterr().out
    assert evaluate.main(["compare", str(a), str(out.parent)]) == 0
    assert "2 better / 0 worse" in capsys.readouterr().out


def test_by_lumen_splits_calcified_lesions_by_their_true_lumen_level(capsys):
    """``evaluate.py by-lumen``: beside a dim lumen the reader's edge has less margin, so the same restoration error
    reads further off there; the table must hold each lesion in its band, and count the faint deposits no region
    reached (``unsure`` None) among the faint ones only."""
    rows = [dict(_row(0, "standard", 0.2, 8.0), lumen_hu_true=300.0, calcium_contrast_hu=200.0, unsure=None),
            dict(_row(1, "standard", 0.2, 2.0), lumen_hu_true=329.0, calcium_contrast_hu=500.0, unsure=None),
            dict(_row(2, "standard", 0.2, -4.0), lumen_hu_true=330.0, calcium_contrast_hu=250.0, unsure=True),
            dict(_row(3, "standard", 0.2, 1.0), lumen_hu_true=600.0, calcium_contrast_hu=100.0, unsure=False),
            dict(_row(4, "standard", 0.2, 50.0, stratum="normal"), lumen_hu_true=300.0, calcium_contrast_hu=None)]
    t = experiment2v2.by_lumen(rows)
    assert t["n"] == [2, 1, 0, 1]
    assert t["images"]["processed"][0] == pytest.approx((5.0, 5.0)) and t["images"]["processed"][1] == (4.0, -4.0)
    assert t["images"]["processed"][2] is None and "retest" not in t["images"]
    assert t["faint_unreached"] == [(1, 1), (0, 1), (0, 0), (0, 1)]
    assert experiment2v2.lumen_band(329.9) == 0 and experiment2v2.lumen_band(510.0) == 3


def test_the_level_oracle_in_detection_alone_leaves_the_restoration_to_the_acquired_image(monkeypatch):
    """``--oracle-level detect``: the calcium-free truth image's level decides what detection finds, and the
    restoration runs as the node runs it (no level image), so the two oracles' costs are told apart."""
    import types

    import numpy as np

    from dicom_node.pipeline import detect as detect_module

    seen = {}

    class Engine:
        def detect_options_for(self, kernel):
            seen["kernel"] = kernel
            return "options"

        def restore(self, volume, spacing, detection, kernel=""):
            seen["restore"] = (detection, kernel)
            return types.SimpleNamespace(changed=np.zeros(volume.shape, bool), detection=detection)

        def run(self, volume, spacing, kernel="", level_image=None):
            seen["run"] = level_image
            return types.SimpleNamespace(changed=np.zeros(volume.shape, bool))

    def fake_detect(volume, spacing, options, level_image=None):
        seen["detect"] = (options, level_image)
        return "found"

    monkeypatch.setattr(detect_module, "detect", fake_detect)
    p = types.SimpleNamespace(image=np.full((4, 4, 4), 300.0, np.float32), spacing=(0.5, 0.5, 0.5),
                              settings=types.SimpleNamespace(kernel="soft"))
    level = np.full((4, 4, 4), 280.0, np.float32)
    experiment2v2.restored(Engine(), p, level, "detect")
    assert seen["detect"][0] == "options" and seen["detect"][1] is level and seen["kernel"] == "SOFT"
    assert seen["restore"] == ("found", "SOFT") and "run" not in seen
    experiment2v2.restored(Engine(), p, level)  # the whole oracle: detection and the estimate, through run
    assert seen["run"] is level
