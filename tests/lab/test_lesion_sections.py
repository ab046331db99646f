"""The lesion probe's section sums: what the calcium added against what the engine removed, and where."""

import numpy as np

from dicom_node_lab.lesion_sections import section_sums
from dicom_node_lab.reader import WALL_HU


def test_a_removal_moved_onto_the_lumen_reads_as_misplaced_not_as_too_much():
    """Same total, wrong place: the ratio stays 1 and the lumen shows the over-removal; the right removal reads 0."""
    level = 400.0
    truth = np.full((1, 5, 5), float(WALL_HU))
    truth[0, :, 3:] = level  # the lumen on the right
    added = np.zeros_like(truth)
    added[0, :, 1] = 300.0  # the calcium's addition, left of the lumen
    acquired = truth + added
    shifted = np.zeros_like(truth)
    shifted[0, :, 1], shifted[0, :, 3] = 200.0, 100.0  # a third of it taken from the lumen's first column
    for removed, ratio, over in ((added, 1.0, 0.0), (shifted, 1.0, 50.0), (0.5 * added, 0.5, 0.0)):
        arrays = {"truth": truth, "acquired": acquired, "removed": removed}
        (row,) = section_sums(arrays, level)
        assert abs(row["ratio"] - ratio) < 1e-9
        assert abs(row["lumen_over_removed_hu"] - over) < 1e-9  # 100 HU on one of the two lumen columns
        assert row["lumen_voxels"] == 10


def test_a_tuning_lesion_is_cut_where_the_calcium_is_and_the_engine_removed_it(tmp_path, capsys):
    """End to end on one tuning study (6060-67, a 254° arc in a 2.7 mm vessel) with the subtraction: every section
    along the lesion holds the calcium's addition, the engine removed most of it, and the JSON says so."""
    import json

    from dicom_node_lab import lesion_sections

    out = tmp_path / "sums.json"
    lines = ['method = "subtract"', 'subtract_estimate = "engines/calcium_excess_ref.npz"']
    args = ["lesion", "--seed", "6060", "--study", "67", "--vessel", "0", "--lesion", "0", "--sections", "3",
            "--json", str(out), "--grid"]
    assert lesion_sections.main(args + [a for line in lines for a in ("--engine", line)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("s = ") == 3 and "calcium_fraction" in printed
    sums = json.loads(out.read_text())["sums"]
    assert len(sums) == 3 and all(s["added_hu"] > 10_000 for s in sums)
    assert all(0.3 < s["ratio"] < 3.0 for s in sums)


def test_a_run_is_scored_by_how_far_its_lumen_over_removal_goes_with_its_error():
    """``summarise_scores``: a run whose over-removal makes its error reads r = 1 and its thirds in order; lesions
    without a lumen to score are counted, not scored; too few to correlate says so."""
    from dicom_node_lab.lesion_sections import summarise_scores

    rows = [{"lumen_over_removed_hu": 10.0 * k, "error": 2.0 * k - 4.0} for k in range(9)]
    rows.append({"lumen_over_removed_hu": None, "error": 30.0})
    s = summarise_scores(rows)
    assert s["lesions"] == 10 and s["scored"] == 9 and abs(s["pearson_r"] - 1.0) < 1e-9
    t = s["thirds"]
    assert [t[k]["n"] for k in ("lowest third", "middle third", "highest third")] == [3, 3, 3]
    assert t["lowest third"]["bias"] < t["middle third"]["bias"] < t["highest third"]["bias"]
    assert t["lowest third"]["mae"] == (4.0 + 2.0 + 0.0) / 3
    assert "pearson_r" not in summarise_scores(rows[:2])


def test_one_study_scores_each_calcified_lesion_it_reads():
    """``lesion_scores`` end to end on tuning study 6060-67: a row per calcified lesion the reader reads, with its
    error and an over-removal where the truth shows a lumen."""
    from dicom_node_lab.lesion_sections import lesion_scores

    rows = lesion_scores((6060, 67, ['method = "subtract"', 'subtract_estimate = "engines/calcium_excess_ref.npz"']))
    assert rows and {(r["vessel"], r["lesion"]) for r in rows} >= {(0, 0)}
    first = next(r for r in rows if (r["vessel"], r["lesion"]) == (0, 0))
    assert first["study"] == "6060-67" and first["lumen_over_removed_hu"] is not None
    assert -100.0 <= first["error"] <= 100.0 and 0.3 < first["ratio"] < 3.0
