"""Choosing the unsure threshold from a run's recorded disagreements (``evaluate.py thresholds``).

The held-out figures for a threshold chosen on tuning rows are recomputed from the rows alone,
so the recomputation must agree with what the engine's own flag reported at its threshold.
"""

from __future__ import annotations

import json

from dicom_node_lab import evaluate, experiment2v2


def _row(disagreement, processed, truth, original=50.0, geometric=30.0, stratum="calcified"):
    return {"stratum": stratum, "disagreement_hu": disagreement, "processed@100": processed, "truth@100": truth,
            "original@100": original, "geometric": geometric, "measure": "blur",
            "unsure": None if disagreement is None else disagreement > 90}


ROWS = [
    _row(120.0, 80.0, 40.0),  # large error (40), made severe by processing, high disagreement
    _row(95.0, 45.0, 30.0),  # large error (15)
    _row(60.0, 62.0, 30.0),  # large error (32), low disagreement
    _row(100.0, 31.0, 30.0),  # good
    _row(20.0, 30.0, 30.0),  # good
    _row(None, 30.0, 30.0),  # not reached by a region: no disagreement, never counted
    _row(500.0, 0.0, 0.0, stratum="soft"),  # not calcified: never counted
]


def test_thresholds_match_the_engine_flag_and_move_as_expected():
    at90, at110 = experiment2v2.at_thresholds(ROWS, [90.0, 110.0])
    engine = experiment2v2.confidence([r for r in ROWS if r["stratum"] == "calcified"])
    for key in ("n", "large", "large_flagged", "good", "good_flagged", "made_severe", "made_severe_flagged"):
        assert at90[key] == engine[key], key
    assert (at90["n"], at90["flagged"], at90["large_flagged"], at90["good_flagged"]) == (5, 3, 2, 1)
    assert (at110["flagged"], at110["large_flagged"], at110["good_flagged"]) == (1, 1, 0)
    assert at110["made_severe_flagged"] == at90["made_severe_flagged"] == at90["made_severe"] == 1
    assert abs(at90["mae_flagged"] - (40 + 15 + 1) / 3) < 1e-9
    assert abs(at90["mae_unflagged"] - (32 + 0) / 2) < 1e-9


def test_thresholds_with_no_disagreements_say_so():
    (c,) = experiment2v2.at_thresholds([_row(None, 30.0, 30.0)], [90.0])
    assert c["n"] == 0 and c["flagged"] == 0 and c["mae_flagged"] is None


def test_other_reasons_stay_flagged_and_the_ranking_says_how_well_the_measure_orders_errors():
    """A lesion flagged for its vessel's calibre stays flagged at any threshold (``inf``: the flag without the
    disagreement); the ranking is 1 when every large error out-disagrees every good restoration, 0.5 at chance."""
    small = dict(_row(20.0, 62.0, 30.0), why=["vessel 2.1 mm < 2.5"])  # large error, low disagreement, small vessel
    rows = [*ROWS[:2], small, *ROWS[3:]]
    (off,) = experiment2v2.at_thresholds(rows, [float("inf")])
    assert (off["flagged"], off["large_flagged"], off["good_flagged"]) == (1, 1, 0)
    (at90,) = experiment2v2.at_thresholds(rows, [90.0])
    assert (at90["flagged"], at90["large_flagged"]) == (4, 3)
    ordered = [_row(200.0, 80.0, 40.0), _row(150.0, 60.0, 30.0), _row(10.0, 30.0, 30.0), _row(5.0, 31.0, 30.0)]
    assert experiment2v2.ranking_auc(ordered) == 1.0
    reversed_ = [_row(5.0, 80.0, 40.0), _row(10.0, 60.0, 30.0), _row(150.0, 30.0, 30.0), _row(200.0, 31.0, 30.0)]
    assert experiment2v2.ranking_auc(reversed_) == 0.0
    tied = [_row(50.0, 80.0, 40.0), _row(50.0, 30.0, 30.0)]
    assert experiment2v2.ranking_auc(tied) == 0.5
    assert experiment2v2.ranking_auc([_row(50.0, 30.0, 30.0)]) is None, "no large error: nothing to rank"


def _lesion(processed, truth, unsure, vessel=3.5, disagreement=50.0, original=None, geometric=None, why=()):
    return {"stratum": "calcified", "processed@100": processed, "truth@100": truth,
            "original@100": processed if original is None else original,
            "geometric": truth if geometric is None else geometric, "unsure": unsure, "vessel_mm": vessel,
            "disagreement_hu": disagreement, "why": list(why)}


def test_goals_where_the_node_is_sure_are_counted_on_the_restorations_it_called_sure():
    """``sure_goals`` groups calcified lesions by the engine's flag: a set of exact sure restorations meets every
    goal, a severe stenosis made by processing among them fails it, and the lesions no region reached stand apart."""
    exact = [_lesion(t, t, False) for t in (10.0, 30.0, 55.0, 60.0, 75.0, 80.0, 20.0, 90.0)]
    wrong = [_lesion(80.0, 30.0, True, original=60.0, geometric=30.0)]  # made severe, flagged
    unreached = [_lesion(40.0, 60.0, None)]
    goals = experiment2v2.sure_goals(exact + wrong + unreached)
    assert goals["sure"]["n"] == 8 and goals["sure"]["meets"] and goals["sure"]["mae"] == 0.0
    assert abs(goals["sure"]["share"] - 8 / 9) < 1e-9
    assert goals["unsure"]["n"] == 1 and goals["unsure"]["made"] == 1 and not goals["unsure"]["meets"]
    assert goals["no region"]["n"] == 1 and goals["all"]["n"] == 10
    unflagged = experiment2v2.sure_goals(exact + [dict(wrong[0], unsure=False)])
    assert unflagged["sure"]["made"] == 1 and not unflagged["sure"]["meets"], "one made severe fails the goals"


def test_the_flag_grid_recomputes_the_flag_from_the_recorded_calibre_disagreement_and_reasons():
    """A lesion is unsure under a grid flag where its calibre is under the threshold, its disagreement over it,
    or its calcium was found only in the sharpened image (always); ``inf`` and 0 turn the first two off."""
    rows = [_lesion(50.0, 50.0, False, vessel=3.5, disagreement=20.0),
            _lesion(80.0, 30.0, True, vessel=2.6, disagreement=20.0, original=60.0, geometric=30.0),
            _lesion(45.0, 40.0, True, vessel=3.5, disagreement=120.0),
            _lesion(42.0, 40.0, True, vessel=3.5, disagreement=20.0, why=["restored, unsure: calcium found only "
                                                                        "in the sharpened image"])]
    grid = {(g["disagreement"], g["vessel_mm"]): g for g in
            experiment2v2.flag_grid(rows, [float("inf"), 90.0], [0.0, 2.75])}
    assert grid[(float("inf"), 0.0)]["sure"]["n"] == 3 and grid[(float("inf"), 0.0)]["sure"]["made"] == 1
    assert grid[(float("inf"), 2.75)]["sure"]["n"] == 2, "the 2.6 mm vessel is flagged"
    assert grid[(float("inf"), 2.75)]["sure"]["made"] == 0
    assert grid[(90.0, 2.75)]["sure"]["n"] == 1 and grid[(90.0, 0.0)]["sure"]["n"] == 2
    assert grid[(90.0, 2.75)]["unsure"]["n"] == 3
    # the calcium's measured contrast over the lumen (measured_contrast_hu): under the threshold is unsure, a
    # lesion without a measure (no region measured it) is not, 0 turns it off
    rows[0]["measured_contrast_hu"], rows[1]["measured_contrast_hu"] = 120.0, 400.0
    faint = {g["faint_hu"]: g for g in experiment2v2.flag_grid(rows, [float("inf")], [0.0], faint=(0.0, 150.0))}
    assert faint[0.0]["sure"]["n"] == 3 and faint[150.0]["sure"]["n"] == 2
    assert faint[150.0]["unsure"]["n"] == 2 and faint[150.0]["faint_hu"] == 150.0
    # the engine's measured lumen level (lumen_hu, unsure_lumen_hu's measure) the same way
    rows[0]["lumen_hu"], rows[1]["lumen_hu"] = 280.0, 450.0
    dim = {g["lumen_hu"]: g for g in experiment2v2.flag_grid(rows, [float("inf")], [0.0], lumens=(0.0, 330.0))}
    assert dim[0.0]["sure"]["n"] == 3 and dim[330.0]["sure"]["n"] == 2 and dim[330.0]["unsure"]["n"] == 2
    # how far the calcium encloses the lumen (enclosure, the engine's calcium_enclosure): over the threshold is
    # unsure, a lesion without a measure is not, inf turns it off
    rows[0]["enclosure"], rows[1]["enclosure"] = 0.85, 0.3
    ring = {g["enclosure"]: g for g in experiment2v2.flag_grid(rows, [float("inf")], [0.0],
                                                               enclosures=(float("inf"), 0.7))}
    assert ring[float("inf")]["sure"]["n"] == 3 and ring[0.7]["sure"]["n"] == 2 and ring[0.7]["unsure"]["n"] == 2


def test_the_floor_is_split_by_what_the_node_reports():
    """``floor_by_flag`` gives each group (sure, unsure, no region, all calcified) its own mean error per image, so a
    group's distance to the floor of its voxels is read from its own lesions, not the mix; an image a run did not
    read is left out, and lesions outside the calcified stratum or without a truth reading are not counted."""
    def with_oracles(lesion, known, rescan):
        return dict(lesion, **{"known_anatomy@100": known, "retest@100": rescan})
    rows = [with_oracles(_lesion(34.0, 30.0, False), 31.0, 32.0),  # sure: 4 off, floor 1, rescan 2
            with_oracles(_lesion(40.0, 30.0, True), 36.0, 33.0),  # unsure: 10 off, floor 6, rescan 3
            with_oracles(_lesion(50.0, 70.0, None), 50.0, 69.0),  # no region: the floor is the acquired reading
            with_oracles(_lesion(90.0, None, False), 90.0, 90.0),  # no truth reading: not counted
            dict(with_oracles(_lesion(99.0, 0.0, False), 99.0, 99.0), stratum="soft")]  # not calcified
    by = experiment2v2.floor_by_flag(rows)
    assert by["sure"] == {"n": 1.0, "processed": 4.0, "known_anatomy": 1.0, "retest": 2.0}
    assert by["unsure"] == {"n": 1.0, "processed": 10.0, "known_anatomy": 6.0, "retest": 3.0}
    assert by["no region"]["processed"] == by["no region"]["known_anatomy"] == 20.0
    assert by["all"]["n"] == 3.0 and abs(by["all"]["processed"] - 34.0 / 3) < 1e-9
    assert "perfect_network" not in by["all"], "an oracle the run did not read has no column"


def test_a_regions_calcium_contrast_is_its_brightest_calcium_over_the_lumen_beyond_it():
    """``calcium_contrast`` (what ``flag-grid --faint`` reads): a 1,000 HU arc stands further above the same 400 HU
    lumen than a 700 HU one, each by less than its sharp contrast (blur) and within noise of what the blurred arc
    reaches; a box without calcium is not measured."""
    import numpy as np
    from scipy import ndimage

    from dicom_node.pipeline.subtract import ScannerBlur
    from tests.pipeline.test_subtract import SPACING, _polar, _scan

    shape = (48, 56, 56)
    z, r, angle = _polar(shape)
    box = (slice(10, 38), slice(10, 46), slice(10, 46))
    contrasts = {}
    for calcium_hu in (700.0, 1000.0):
        sharp = np.full(shape, 40.0)
        sharp[r < 2.6] = 50.0
        sharp[r < 1.5] = 400.0
        arc = (z > 7.0) & (z < 15.0) & (r >= 1.5) & (r < 2.3) & (angle < 180.0)
        sharp[arc] = calcium_hu
        noise = ndimage.gaussian_filter(np.random.default_rng(3).normal(0.0, 20.0, shape), 0.7)
        acquired = _scan(sharp, ScannerBlur(mtf50_lp_cm=4.3), noise)
        calcium = acquired > 550.0
        contrasts[calcium_hu] = experiment2v2.calcium_contrast(acquired, SPACING, box, calcium)
        assert contrasts[calcium_hu] < calcium_hu - 400.0
        assert abs(contrasts[calcium_hu] - (acquired[calcium].max() - 400.0)) < 60.0
        assert experiment2v2.calcium_contrast(acquired, SPACING, box, np.zeros(shape, bool)) is None
    assert 100.0 < contrasts[700.0] < contrasts[1000.0] - 150.0, contrasts


def test_the_flag_grid_reads_runs_by_folder_and_pooled(tmp_path, capsys):
    """``evaluate.py flag-grid`` takes a run's ``--report-dir`` and ``A+B`` (held-out sets pooled) as the other
    lab commands do: the sure restorations of two sets together are the two sets' sure restorations."""
    rows = [_lesion(50.0, 50.0, False, vessel=3.5, disagreement=20.0),
            _lesion(80.0, 30.0, True, vessel=2.6, disagreement=20.0, original=60.0, geometric=30.0)]
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, study in ((first, "1-0"), (second, "2-0")):
        folder.mkdir()
        (folder / "experiment2v2.json").write_text(json.dumps({"lesions": [dict(r, study=study) for r in rows]}))
    assert evaluate.main(["flag-grid", str(first), "--vessel", "0"]) == 0
    assert "| 2 (100 %) |" in capsys.readouterr().out
    assert evaluate.main(["flag-grid", f"{first}+{second}", "--vessel", "0"]) == 0
    assert "| 4 (100 %) |" in capsys.readouterr().out
