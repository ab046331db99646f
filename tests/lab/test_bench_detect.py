"""`bench.py detect` times the sharpened-image test in one box and in tiles, each in a fresh process; it exits
non-zero unless the two found the same calcium voxel for voxel."""

from __future__ import annotations

import json

import pytest

from dicom_node_lab import bench


@pytest.mark.slow
def test_bench_detect_times_both_ways_and_checks_they_find_the_same_calcium(tmp_path, capsys):
    assert bench.main(["detect", "--shape", "24", "96", "96", "--cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{\n"):])
    assert report["same calcium"] is True and report["shape_zyx"] == [24, 96, 96]
    for mode in ("one box", "tiles", "without the test"):
        assert report[mode]["seconds"] >= 0 and report[mode]["peak_gib"] > 0
