"""``tools/train_estimate_gpu.sh``: the one-command GPU run, smoke-tested here on the CPU at a small scale.

A lent machine is held for minutes and starts bare; a script broken since its last run would spend the whole
lease. This runs every step of it (extraction with a time limit, the clean-up of cut studies, two trainings
side by side) on 3 studies, and checks that what it writes is what the node loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.pipeline.subtract import LearntExcess

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_the_gpu_script_runs_end_to_end_on_the_cpu(tmp_path):
    env = dict(os.environ, PY=sys.executable, N="3", NV="2", WORKERS="1", XLIMIT="60", DEADLINE="60", WIDTHS="4 6",
               DATA=str(tmp_path / "data"), OUT=str(tmp_path / "out"))
    done = subprocess.run(["bash", str(REPO / "tools" / "train_estimate_gpu.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 training studies, 0 cut short" in done.stdout
    for width in (4, 6):
        learnt = LearntExcess.load(tmp_path / "out" / f"c{width}.npz")
        assert learnt.context_voxels == 2 and learnt.convolutions[0].shape[2] == width
        assert json.loads((tmp_path / "out" / f"c{width}.json").read_text())["training_studies"] == [0, 1, 2]
