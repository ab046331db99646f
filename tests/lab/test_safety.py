"""Safety rules for both restoration methods on the calibrated world: they never invent a stenosis.

The issue's rules, checked on world studies the model never saw (the tuning seed range of
Experiment 2 v2, its held-out kernel and motion included): a lesion under 50 % (geometric
truth) that reads under 70 % on the acquired image never reads 70 % or more after
processing (unless the truth image itself does), and non-calcified lesions and calcium-free
segments read the same before and after (within 1 point).
"""

from __future__ import annotations

import pytest

from dicom_node_lab import experiment2v2
from dicom_node_lab.reader import WHITE_LEVELS_HU


@pytest.mark.slow
@pytest.mark.parametrize("engine_args", [[], ['method = "subtract"']], ids=["network", "subtract"])
def test_processing_invents_no_severe_stenosis_and_leaves_clean_vessels_alone(engine_args, monkeypatch):
    monkeypatch.setattr(experiment2v2, "_ENGINE", None)  # the harness keeps one engine per process
    rows = []
    engine_job = (experiment2v2.EXP2V2_TUNE_SEED, 0, str(experiment2v2.ENGINES / "dense_unet.onnx"), engine_args,
                  False, False, False)
    for i in range(6):
        r, goal, _ = experiment2v2._one_study(engine_job[:1] + (i,) + engine_job[2:])
        rows += r
        assert goal["far_changed"] <= goal["far_voxels"] * 1e-4, "voxels far from calcium stay as acquired"
        assert goal["bone_changed"] == 0
    assert any(r["stratum"] == "calcified" for r in rows) and any(r["type"] in ("soft", "normal") for r in rows)
    for white in WHITE_LEVELS_HU:
        s = experiment2v2.safety(rows, white)
        assert s["invented_severe_by_processing"] == 0, s
        assert s["no_calcium_over_1"] == 0, s
