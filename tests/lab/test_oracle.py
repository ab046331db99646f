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


def test_the_calcium_excess_is_what_the_scanner_blurs_into_the_image():
    """image − truth is exactly the calcium's excess through the scanner (no motion, noise or beam hardening)."""
    from dicom_node_lab import physics, world

    for seed in range(20):
        p = world.generate(seed=seed, motion_mm=(0.0, 0.0), noise=False)
        if p.settings.beam_hardening_hu == 0 and p.calcium_fraction.max() > 0.5:
            break
    else:
        pytest.fail("no study without beam hardening in 20 seeds")
    assert p.calcium_excess.min() >= 0 and p.calcium_excess.max() > 300  # calcium over the plaque it replaced
    through = physics.blur(p.calcium_excess, p.spacing, p.settings.kernel, p.settings.slice_fwhm_mm)
    assert np.abs((p.image - p.truth) - through).max() < 1.0


@pytest.mark.slow
def test_the_subtraction_oracle_subtracts_the_true_calcium_only_where_the_engine_wrote(monkeypatch):
    monkeypatch.setattr(e, "_ENGINE", None)  # one engine per worker process, built for its settings
    job = (e.EXP2V2_TUNE_SEED, 0, str(e.ENGINES / "dense_unet.onnx"), ['method = "subtract"'], False, True)
    rows = []
    for i in range(6):
        r, _, _ = e._one_study(job[:1] + (i,) + job[2:])
        rows += r
    w = f"{e.PRIMARY_WHITE:g}"
    name = f"{e.TRUE_CALCIUM_SUBTRACTED}@{w}"
    for r in rows:
        if r["type"] in ("soft", "normal"):  # the engine wrote nothing there
            assert r[name] == pytest.approx(r[f"original@{w}"], abs=1.0)
    calcified = [r for r in rows if r["stratum"] == e.CALCIFIED]
    for r in calcified:  # where the engine left a lesion as acquired, so does the oracle
        if r[f"processed@{w}"] == r[f"original@{w}"]:
            assert r[name] == pytest.approx(r[f"original@{w}"], abs=1.0)
    f = e.floor([r for r in calcified if r[f"processed@{w}"] != r[f"original@{w}"]])
    assert f[e.TRUE_CALCIUM_SUBTRACTED]["n"] >= 3, f
    # the true calcium, even under a blur that is not the scanner's, removes most of the blooming
    assert f[e.TRUE_CALCIUM_SUBTRACTED]["mae"] < f["original"]["mae"], f
    # and the network path has no such oracle
    monkeypatch.setattr(e, "_ENGINE", None)
    net = e._one_study((e.EXP2V2_TUNE_SEED, 0, job[2], [], False, True))[0]
    assert all(name not in r for r in net)
