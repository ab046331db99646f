"""Experiment 2 v2's --oracle: the error a perfect network (and a perfect detection) would leave.

The oracles are what says whether a goal is out of reach of the network or of the rest of the
engine, so they must be what they claim: the truth image exactly where the engine wrote, and
the acquired image everywhere else.
"""

from __future__ import annotations

import numpy as np
import pytest

from dicom_node_lab import experiment2v2 as e


@pytest.mark.slow
def test_the_oracles_read_as_the_truth_where_they_restore_and_as_acquired_elsewhere():
    job = (e.EXP2V2_TUNE_SEED, 0, str(e.ENGINES / "dense_unet.onnx"), [], False, True)
    rows = []
    for i in range(3):
        r, _, _ = e._one_study(job[:1] + (i,) + job[2:])
        rows += r
    w = f"{e.PRIMARY_WHITE:g}"
    assert all(f"{e.PERFECT_NETWORK}@{w}" in r and f"{e.PERFECT_DETECTION}@{w}" in r for r in rows)
    clean = [r for r in rows if r["type"] in ("soft", "normal")]
    assert clean, "the studies hold calcium-free readings"
    for r in clean:  # nothing to restore: the perfect network changes nothing the engine did not
        assert r[f"{e.PERFECT_NETWORK}@{w}"] == pytest.approx(r[f"processed@{w}"], abs=1.0)
    calcified = [r for r in rows if r["stratum"] == e.CALCIFIED]
    f = e.floor(calcified)
    assert f[e.PERFECT_DETECTION]["n"] == len(calcified) > 0
    # with the truth written around every deposit, what is left is the reader's rounding, not blooming
    assert f[e.PERFECT_DETECTION]["median_abs"] < 2.0, f
    assert f[e.PERFECT_DETECTION]["mae"] < f["original"]["mae"], f
    assert np.isfinite(f[e.PERFECT_NETWORK]["mae"])
