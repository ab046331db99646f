"""The engines on XCIST's inserts (lab/dicom_node_lab/xcist_restore.py): outside physics, its own truth image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dicom_node_lab import xcist_restore as xr
from dicom_node_lab.calibration import _centred_crop

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _from_the_repository(monkeypatch):
    monkeypatch.chdir(ROOT)


def _crop(folder: Path, ha: float, name: str) -> np.ndarray:
    image, px, x0, y0 = xr._scan(folder, ha, 120, "standard")
    centre = json.loads((xr.XCIST_DIR / "meta.json").read_text())["insert_centres_mm"][name]
    return _centred_crop(image, px, x0, y0, tuple(centre), 6.0)


def test_the_calcium_free_twin_has_the_vessels_without_their_calcium():
    """The truth image's scan: the same vessel and lumen, no deposit (a 70 % ring of 800 mg HA reads over 900 HU
    in the calcified scan; its twin nowhere brighter than the iodinated lumen)."""
    calcified = _crop(xr.XCIST_DIR, 800, "vessel_S0.70_A360")
    free = _crop(xr.FREE_DIR, 0, "vessel_S0.70_A360")
    reference = _crop(xr.FREE_DIR, 0, "reference_vessel")
    assert calcified.max() > 900
    assert free.max() < 300  # a 0.45 mm residual lumen, partial volume: below the 405 HU lumen
    assert 380 < reference.max() < 430  # the calcium-free reference vessel is the same in both scans
    assert abs(reference.max() - _crop(xr.XCIST_DIR, 800, "reference_vessel").max()) < 5


def test_the_engines_restore_a_blooming_xcist_arc_against_its_calcium_free_scan():
    """A 180° arc of 800 mg HA, 70 % deep, standard kernel, 120 kVp: blooming reads it occluded (100 % in all
    three of the report's noise draws); the truth image about 40 %. Every engine must bring it back near the truth
    image (the report's draws: network 35-40, subtraction 35-40)."""
    rows = xr.rows(1, 1, ROOT / "engines" / "dense_unet.onnx", kvps=(120,), kernels=("standard",),
                   densities=(800.0,), stenoses=(0.7,), arcs=(180.0,))
    assert len(rows) == 1
    r = rows[0]
    assert r["looks_white"] and r["calcium_contrast_hu"] > 300
    assert 30 < r["truth@100"] < 50 and 35 < r["geometric@100"] < 45
    assert r["original@100"] - r["truth@100"] > 30  # the over-call blooming makes
    for c in xr.CONFIGURATIONS:
        assert abs(r[f"{c.name}@100"] - r["truth@100"]) < 15, c.name
        assert r["engines"][c.name]["lesions"] >= 1


def test_the_summary_counts_severe_stenoses_made_and_flagged():
    rows = [{"truth@100": 30.0, "original@100": 60.0, "a@100": 75.0, "engines": {"a": {"unsure": True}}},
            {"truth@100": 30.0, "original@100": 50.0, "a@100": 72.0, "engines": {"a": {"unsure": False}}},
            {"truth@100": 30.0, "original@100": 100.0, "a@100": 72.0, "engines": {"a": {"unsure": True}}},
            {"truth@100": 60.0, "original@100": 50.0, "a@100": 90.0, "engines": {"a": {"unsure": False}}}]
    for k, r in enumerate(rows):  # two inserts, two noise draws each
        r.update(kvp=120, kernel="standard", ha_mg_cc=800.0, S=0.5, arc_deg=90.0 * (1 + k // 2))
    s = xr.summary(rows, "a", 100.0)
    assert s["made_severe"] == 3 and s["made_by_processing"] == 2 and s["made_by_processing_flagged"] == 1
    assert s["bias"] == pytest.approx((45 + 42 + 42 + 30) / 4)
    lo, hi = s["mae_ci"]
    assert 30 <= lo <= s["mae"] <= hi <= 43.5  # the two inserts' means: 43.5 and 36
    d = xr.paired(rows, "original", "a", 100.0)
    assert d["delta"] == pytest.approx(((45 - 30) + (42 - 20) + (42 - 70) + (30 - 10)) / 4)
    assert d["ci"][0] <= d["delta"] <= d["ci"][1]
    for k, r in enumerate(rows):
        r["engines"]["a"]["lesions"] = 0 if k == 3 else 1  # the fourth: no calcium found, left as acquired
    f = xr.by_flag(rows, "a", 100.0)  # sure: row 2 (made by processing); unsure: rows 1 and 3; none: row 4
    assert (f["sure"]["n"], f["sure"]["made_by_processing"], f["unsure"]["n"]) == (1, 1, 2)
    assert f["no calcium found"]["n"] == 1 and f["no calcium found"]["mae"] == pytest.approx(30)
    assert f["sure"]["mae"] == pytest.approx(42) and f["unsure"]["mae"] == pytest.approx((45 + 42) / 2)


def test_the_2mm_phantom_has_its_own_lumen_and_its_twin_in_one_folder():
    """reports/calibration/xcist-2mm: lumens of 1.0 mm radius, the calcified and calcium-free scans side by side;
    its reference vessel is narrower than the 3 mm phantom's (partial volume lowers its centre)."""
    folder = Path("reports/calibration/xcist-2mm")
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["phantom"]["lumen_radius_mm"] == 1.0
    assert {"ha800_120kv_standard_0p47mm.npz", "ha0_120kv_standard_0p47mm.npz"} <= set(meta["files"])
    image, px, x0, y0 = xr._scan(folder, 0, 120, "standard")
    centre = meta["insert_centres_mm"]["reference_vessel"]
    small = _centred_crop(image, px, x0, y0, tuple(centre), 6.0)
    assert 300 < small.max() < _crop(xr.FREE_DIR, 0, "reference_vessel").max()
    calcified = xr._scan(folder, 800, 120, "standard")[0]
    ring = _centred_crop(calcified, px, x0, y0, tuple(meta["insert_centres_mm"]["vessel_S0.70_A360"]), 6.0)
    assert ring.max() > 700


def test_a_compared_estimate_reads_the_same_noisy_stacks_as_the_others():
    """``--compare-estimate`` adds a configuration to a run; the noise draws must not depend on which
    configurations run, or the paired comparison would compare different scans. The 50 % full ring of 800 mg
    HA (the split sharpening's case, reports/tuning/split-sharpening.md): one draw, two configuration sets."""
    model = ROOT / "engines" / "dense_unet.onnx"
    shipped = xr.CONFIGURATIONS[1]
    split = xr.compared(Path("engines/calcium_excess_split.npz"))
    assert split.name == "subtraction, site-measured tables, calcium_excess_split.npz"
    assert [line for line in split.engine if "subtract_estimate" not in line] == \
        [line for line in shipped.engine if "subtract_estimate" not in line], "only the estimate differs"
    args = dict(kvps=(120,), kernels=("standard",), densities=(800.0,), stenoses=(0.5,), arcs=(360.0,))
    alone = xr.rows(1, 3, model, configurations=(shipped,), **args)[0]
    both = xr.rows(1, 3, model, configurations=(shipped, split), **args)[0]
    for key in ("original@100", "truth@100", f"{shipped.name}@100", "noise_sd"):
        assert alone[key] == both[key], key
    assert f"{split.name}@100" in both and f"{split.name}@100" not in alone


def test_a_compared_configuration_adds_engine_lines_and_replaces_those_of_its_keys():
    """``--compare-engine``: the recommended subtraction with further lines (an ensemble of estimates, say); a line
    whose key the recommended configuration sets replaces it, and the name says what differs, paths by file name."""
    ensemble = xr.compared(None, ('subtract_companions = ["engines/other.npz"]', "subtract_enclosed_share = 0.6",
                                  'subtract_combine = "mean"'))
    assert ensemble.name == ('subtraction, site-measured tables, subtract_companions = ["other.npz"], '
                             'subtract_enclosed_share = 0.6, subtract_combine = "mean"')
    assert [line for line in ensemble.engine if line.startswith("subtract_combine")] == ['subtract_combine = "mean"']
    recommended = xr.CONFIGURATIONS[1].engine
    kept = set(recommended) - {'subtract_companions = ["engines/calcium_excess_split.npz"]',
                               'subtract_combine = "enclosed"'}
    assert kept < set(ensemble.engine) and len(ensemble.engine) == len(recommended) + 1
    first_only = " ".join(xr.compared(None, ("subtract_companions = []", 'subtract_combine = "first"')).engine)
    assert "subtract_estimate" in first_only and "calcium_excess_split" not in first_only
