"""Choosing the unsure threshold from a run's recorded disagreements (``evaluate.py thresholds``).

The held-out figures for a threshold chosen on tuning rows are recomputed from the rows alone,
so the recomputation must agree with what the engine's own flag reported at its threshold.
"""

from __future__ import annotations

from dicom_node_lab import experiment2v2


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
