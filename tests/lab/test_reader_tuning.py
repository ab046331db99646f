"""The reader-smoothing tuning reads each candidate with its own kernel's smoothing, on tuning studies only."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_node_lab import experiment2v2 as e
from dicom_node_lab import reader, reader_tuning


def test_the_shipped_table_covers_every_kernel_and_keeps_the_standard_kernel_as_calibrated():
    from dicom_node_lab.world import Kernel

    assert set(reader.SMOOTH_MM_BY_KERNEL) == {str(k) for k in Kernel}
    # the calibration gate reads standard-kernel studies: its figures were measured at the base smoothing
    assert reader.smoothing_for("STANDARD") == reader.ReaderSettings.smooth_mm
    assert reader.smoothing_for(None) == reader.smoothing_for("B26f") == reader.ReaderSettings.smooth_mm
    assert reader.smoothing_for("sharp") > reader.ReaderSettings.smooth_mm


@pytest.mark.slow
def test_candidates_differ_only_where_their_kernel_smoothing_does(monkeypatch):
    monkeypatch.setattr(reader_tuning, "CANDIDATES", {
        "base": {k: 0.2 for k in reader.SMOOTH_MM_BY_KERNEL},
        "sharper": {**{k: 0.2 for k in reader.SMOOTH_MM_BY_KERNEL}, "standard": 0.5}})
    every = []
    sharp = next(i for i in range(40) if str(e.study_setting(i)[0]) == "sharp")
    for i, differs in ((sharp, False), (next(i for i in range(40) if str(e.study_setting(i)[0]) == "standard"), True)):
        rows = reader_tuning._study((e.EXP2V2_TUNE_SEED, i))
        every += rows
        w = f"{e.PRIMARY_WHITE:g}"
        a = np.array([r[f"truth@{w}"] for r in rows if r["candidate"] == "base"], float)
        b = np.array([r[f"truth@{w}"] for r in rows if r["candidate"] == "sharper"], float)
        assert len(a) == len(b) > 0
        assert (not np.allclose(a, b, equal_nan=True)) == differs
    summary = reader_tuning.summarise(every)
    assert set(summary) == {"base", "sharper"}
    for s in summary.values():
        assert s["n_calcified"] > 0 and np.isfinite(s["retest_mae"]) and s["noise_made_severe"] >= 0
