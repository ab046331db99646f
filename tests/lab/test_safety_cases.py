"""The lesions behind a run's safety figures (``evaluate.py safety-cases``) are exactly the ones it counted.

The held-out report says how many severe stenoses processing made and how many calcium-free
readings moved; the listing must name those lesions and no others, or the causes looked for in
them would be the wrong ones.
"""

from __future__ import annotations

import json

from dicom_node_lab import evaluate, experiment2v2


def _row(i, kind, geometric, original, processed, truth, original_200=None, processed_200=None):
    reads = {"original@100": original, "processed@100": processed, "truth@100": truth,
             "original@200": original if original_200 is None else original_200,
             "processed@200": processed if processed_200 is None else processed_200, "truth@200": truth}
    return {"study": f"1-{i}", "vessel": 0, "lesion": 0, "type": kind, "stratum": kind, "kernel": "standard",
            "diameter_mm": 2.5, "geometric": geometric, "arc_deg": 120.0, "density_mg_cm3": 800.0,
            "motion_mm": 0.2, "unsure": False, "disagreement_hu": 10.0, **reads}


ROWS = [
    _row(0, "calcified", 30.0, 65.0, 80.0, 40.0),  # made severe at both levels
    _row(1, "calcified", 30.0, 75.0, 80.0, 40.0),  # severe before processing too: not made by it
    _row(2, "calcified", 60.0, 60.0, 80.0, 75.0),  # truly 60 %: not invented
    _row(3, "calcified", 30.0, 60.0, 65.0, 40.0, original_200=60.0, processed_200=72.0),  # made at + 200 only
    _row(4, "soft", 0.0, 20.0, 20.5, 20.0),  # moved half a point: within the rule
    _row(5, "normal", 0.0, 20.0, 25.0, 20.0),  # moved five points
    _row(6, "calcified", 30.0, None, None, 40.0),  # unreadable: never counted
    _row(7, "calcified", 80.0, 75.0, 40.0, 85.0),  # severe, read severe as acquired, hidden by processing
    _row(8, "calcified", 40.0, 75.0, 40.0, 85.0),  # the truth image severe only by partial volume: not counted
    _row(9, "calcified", 80.0, 45.0, 40.0, 85.0),  # read under 50 % before processing too: not hidden by it
]


def test_safety_cases_name_the_lesions_the_figures_count():
    cases = experiment2v2.safety_cases(ROWS)
    assert [(c["study"], c["why"]) for c in cases] == [
        ("1-0", ["severe made at + 100", "severe made at + 200"]),
        ("1-3", ["severe made at + 200"]),
        ("1-5", ["no calcium, moved at + 100", "no calcium, moved at + 200"]),
        ("1-7", ["severe hidden at + 100", "severe hidden at + 200"])]
    for w in (100.0, 200.0):
        figures = experiment2v2.safety(ROWS, w)
        listed = [c for c in cases if f"severe made at + {w:g}" in c["why"]]
        assert figures["invented_severe_by_processing"] == len(listed)
        assert figures["no_calcium_over_1"] == sum(f"no calcium, moved at + {w:g}" in c["why"] for c in cases)
        assert figures["hidden_severe_by_processing"] == sum(f"severe hidden at + {w:g}" in c["why"] for c in cases)


def test_safety_cases_carry_what_the_engine_said():
    """A run records, per lesion, why the engine called its region unsure and what it did; the listing keeps it
    beside the reading (reports before the eleventh session have no such field: an empty list)."""
    said = ["restored, unsure: calcium found only in the sharpened image"]
    rows = [dict(ROWS[0], unsure=True, why=said), ROWS[3]]
    cases = experiment2v2.safety_cases(rows)
    assert [c["engine_why"] for c in cases] == [said, []]


def test_safety_cases_read_a_run_by_its_folder_and_pool_runs(tmp_path, capsys):
    """``evaluate.py safety-cases`` takes a run as every other lab command does (its ``--report-dir`` or its
    JSON, ``A+B`` for runs pooled), so a held-out set's safety lesions and two sets' together come from one line."""
    first, second = tmp_path / "first", tmp_path / "second.json"
    first.mkdir()
    (first / "experiment2v2.json").write_text(json.dumps({"lesions": ROWS}))
    moved = [dict(r, study=r["study"].replace("1-", "2-")) for r in ROWS]
    second.write_text(json.dumps({"lesions": moved}))
    alone = len(experiment2v2.safety_cases(ROWS))
    assert evaluate.main(["safety-cases", str(first)]) == 0
    assert f"{alone} lesions behind the safety figures" in capsys.readouterr().out
    assert evaluate.main(["safety-cases", f"{first}+{second}"]) == 0
    assert f"{2 * alone} lesions behind the safety figures" in capsys.readouterr().out
