"""Experiment 2's two ways of running: through DICOM and ``dicom-node process``, and in-process.

Candidates are compared with the fast in-process run; that is only sound if it reads
the same stenoses as the DICOM round trip the report is made with.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicom_node_lab import evaluate, experiment2

pytestmark = pytest.mark.slow


def _report(tmp_path: Path, name: str, *extra: str, runs: tuple[str, ...] = ("footprint",)) -> dict:
    out = tmp_path / name
    argv = ["experiment2", "--studies", "1", "--seed", str(experiment2.EXP2_TUNE_SEED), "--runs", *runs,
            "--report-dir", str(out), *extra]
    assert evaluate.main(argv) == 0
    return json.loads((out / "experiment2.json").read_text()) | {"md": (out / "experiment2.md").read_text()}


def test_in_process_run_reads_the_same_stenoses_as_the_dicom_round_trip(tmp_path):
    dicom = _report(tmp_path, "dicom", runs=("footprint", *experiment2.DIAGNOSTIC_RUNS))
    fast = _report(tmp_path, "fast", "--in-process")
    assert dicom["lesions"], "the study has calcified lesions to measure"
    assert [r["footprint"] for r in fast["lesions"]] == [r["footprint"] for r in dicom["lesions"]]
    assert [r["original"] for r in fast["lesions"]] == [r["original"] for r in dicom["lesions"]]
    assert fast["goals"]["footprint"] == dicom["goals"]["footprint"]
    assert any(r["footprint"] != r["original"] for r in dicom["lesions"]), "the engine changed something"
    assert "--in-process" in fast["md"] and "without the DICOM round trip" in fast["md"]
    assert "--in-process" not in dicom["md"]
    # the true-calcium diagnostic runs in-process beside the DICOM runs, and says what it is
    true = [r[experiment2.TRUE_CALCIUM] for r in dicom["lesions"]]
    assert any(t != r["footprint"] for t, r in zip(true, dicom["lesions"])), "the true calcium is not the detected"
    assert "diagnostic, not a product run" in dicom["md"] and "diagnostic" not in fast["md"]
    assert f"`{experiment2.VISIBLE_CALCIUM}` run is a diagnostic" in dicom["md"]
    visible = [r[experiment2.VISIBLE_CALCIUM] for r in dicom["lesions"]]
    assert any(v != r["footprint"] for v, r in zip(visible, dicom["lesions"])), "it adds calcium detection missed"
    assert any(isinstance(r["calcium_contrast_hu"], int) for r in dicom["lesions"])
