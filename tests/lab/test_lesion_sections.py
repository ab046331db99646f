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
    args = ["--seed", "6060", "--study", "67", "--vessel", "0", "--lesion", "0", "--sections", "3",
            "--json", str(out), "--grid"]
    assert lesion_sections.main(args + [a for line in lines for a in ("--engine", line)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("s = ") == 3 and "calcium_fraction" in printed
    sums = json.loads(out.read_text())["sums"]
    assert len(sums) == 3 and all(s["added_hu"] > 10_000 for s in sums)
    assert all(0.3 < s["ratio"] < 3.0 for s in sums)
