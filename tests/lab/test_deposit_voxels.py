"""The voxel diagnostics behind reports/tuning/grown-detection.md count what their names say."""

from __future__ import annotations

import numpy as np

from dicom_node_lab import deposit_voxels


def test_found_missed_and_extra_voxels_are_told_apart():
    true = np.zeros((20, 20, 20), bool)
    true[2:5, 2:12, 5] = True  # a long deposit, detected only at its start
    true[10:13, 15, 2:6] = True  # a deposit the detection misses: none of its voxels is "missed"
    detected = np.zeros_like(true)
    detected[2:5, 2:4, 5:7] = True  # its start, with a voxel of bloom beside it
    detected[17, 17, 17] = True  # a component near no deposit: neither found nor extra
    kinds = deposit_voxels.classify(detected, true)
    assert {k: int(m.sum()) for k, m in kinds.items()} == {"found": 6, "missed": 24, "extra": 6}
    assert kinds["extra"][2:5, 2:4, 6].all() and not (kinds["found"] & kinds["extra"]).any()
    assert not any(m[17, 17, 17] for m in kinds.values())


def test_the_summary_prices_each_trim_in_both_kinds():
    rows = [{"calcium": 10, "found": 4, "missed": 3, "extra": 2,
             "acquired": {"found": [300.0, 400.0], "missed": [-50.0], "extra": [100.0, float("nan")]},
             "sharpened": {"found": [50.0, 500.0, 600.0, 700.0], "missed": [80.0], "extra": [20.0, 250.0]}}]
    s = deposit_voxels.summary(rows)
    assert (s["found"], s["missed"], s["extra"]) == (4, 3, 2)
    assert s["drop_below"]["100"] == {"extra": 0.5, "found": 0.25}
    assert s["drop_below"]["300"] == {"extra": 1.0, "found": 0.25}
    assert s["acquired"]["extra"]["p50"] == 100.0  # nan (no level near) left out


def _rows_of(job):
    seed, i, engine = job
    return [{"study": f"{seed}-{i}", "lines": len(engine)}] * (i + 1)


def test_the_per_study_runner_writes_the_summary_and_the_rows(tmp_path, capsys):
    import json

    from dicom_node_lab import per_study

    out = tmp_path / "r.json"
    assert per_study.run(["--studies", "3", "--seed", "7", "--workers", "1", "--out", str(out), "--engine", "a = 1"],
                         "test", _rows_of, lambda rows: {"n": len(rows)}, studies=9, out="unused", rows_key="rows",
                         flatten=True) == 0
    result = json.loads(out.read_text())
    assert result["summary"] == {"n": 1 + 2 + 3} and result["engine"] == ["a = 1"] and len(result["rows"]) == 6
    assert result["rows"][0] == {"study": "7-0", "lines": 1} and '"n": 6' in capsys.readouterr().out
