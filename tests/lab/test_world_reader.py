"""The calibrated world and the reader model: known geometry reads right, blooming shows up where it should."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicom_node_lab import calibration, physics, reader, world
from dicom_node_lab.calibration import Insert, fast_reading

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("stenosis", [0.0, 0.25, 0.5, 0.7])
def test_the_reader_reads_a_known_ring_within_two_points(stenosis):
    """A sharp, noiseless concentric lumen of known diameter reads its stenosis within 2 points."""
    r = fast_reading(Insert(stenosis, 360.0, 0.0 if stenosis == 0 else 1000.0), None, 0.1, 100.0,
                     gaussian_fwhm_mm=0.6)
    assert r["geometric"] == pytest.approx(100 * stenosis, abs=2.0)
    assert r["truth"] == pytest.approx(100 * stenosis, abs=6.0), "a light blur barely moves a calcium-free reading"


def test_the_reader_reproduces_the_issues_2d_check():
    """Rings over-call as the issue's clean 2D check says; arcs much less; 70 % rings read occluded."""
    got = {(r["fwhm"], r["arc"], r["S"]): r["read"] for r in calibration.two_d_check()}
    for key, expected in calibration.ISSUE_2D_CHECK.items():
        assert got[key] == pytest.approx(expected, abs=5.0), key
    assert got[(0.6, 360.0, 0.70)] > 95 and got[(0.8, 360.0, 0.70)] > 95
    for fwhm in (0.6, 0.8):
        for s in (0.25, 0.5):
            ring = got[(fwhm, 360.0, s)] - 100 * s
            arc = got[(fwhm, 90.0, s)] - calibration.fast_reading(Insert(s, 90.0, 1000.0), None, 0.1, 100.0,
                                                                   gaussian_fwhm_mm=fwhm)["geometric"]
            assert 0 < arc < ring, "a 90° arc over-calls, less than a ring"


def test_thin_calcium_under_calls_and_thick_dense_calcium_over_calls():
    """The two faces of blooming under a standard cardiac kernel (the issue's 'what we know')."""
    kernel = physics.Kernel.STANDARD
    thin = fast_reading(Insert(0.25, 360.0, physics.calcium_hu(400, 120)), kernel, 0.47, 100.0)
    thick = fast_reading(Insert(0.5, 180.0, physics.calcium_hu(800, 120)), kernel, 0.47, 100.0)
    assert thin["acquired"] < thin["geometric"] - 10, thin
    assert thick["acquired"] > thick["truth"] + 8, thick


def test_kernels_are_cardiac_kernels():
    """Soft to sharp; standard and sharp as XCIST measured its standard and bone kernels (FWHM 1.09, 0.85 mm)."""
    fwhm = {k: m.fwhm_mm() for k, m in physics.KERNELS.items()}
    assert 0.8 < fwhm[physics.Kernel.SHARP] < fwhm[physics.Kernel.HD] < fwhm[physics.Kernel.STANDARD] \
        < fwhm[physics.Kernel.SOFT] < 1.3
    assert fwhm[physics.Kernel.STANDARD] == pytest.approx(1.09, abs=0.05)
    assert fwhm[physics.Kernel.SHARP] == pytest.approx(0.85, abs=0.05)
    for m in physics.KERNELS.values():
        assert m.mtf(np.array([m.mtf50_lp_cm / 10]))[0] == pytest.approx(0.5, abs=1e-3)


def test_motion_blends_average_where_two_vessels_reach_one_voxel():
    """Blurring a uniform region leaves it uniform, however the vessels' motion maps overlap.

    Two moving vessels whose neighbourhoods both cover a voxel used to add their blurred images
    there: a 600 HU region came out at up to 1200 HU, a bright spot no scanner draws.
    """
    shape, spacing = (24, 32, 32), (0.5, 0.5, 0.5)
    volume = np.full(shape, 600.0, np.float32)
    both = np.ones(shape, np.float32)
    half = np.zeros(shape, np.float32)
    half[:, :, :16] = 0.5
    motion = [(both, np.array([0.0, 1.0, 0.0])), (both.copy(), np.array([0.0, 0.0, 1.0])),
              (half, np.array([0.8, 0.0, 0.0]))]
    out = physics.blur(volume, spacing, physics.Kernel.STANDARD, 0.7, motion)
    assert np.allclose(out, 600.0, atol=0.5), (out.min(), out.max())
    # one vessel's map alone, partly on: moving and still parts blend to the same uniform region
    out = physics.blur(volume, spacing, physics.Kernel.SHARP, 0.7, [(half, np.array([0.0, 1.2, 0.0]))])
    assert np.allclose(out, 600.0, atol=0.5)


def test_world_studies_keep_their_lumen_level_where_moving_vessels_meet():
    """No voxel of a world study's calcium-free image is brighter than its brightest lumen plus the
    kernel's overshoot (held-out study 5050-292 showed 770 HU in a 590 HU lumen where two vessels'
    motion maps overlapped)."""
    from dicom_node_lab.experiment2v2 import make_study

    p = make_study(5050, 292)
    clean = p.truth - p.noise
    brightest = max(float(v.lumen_hu.max()) for v in p.vessels)
    assert float(clean.max()) < brightest * 1.12, (float(clean.max()), brightest)


def test_world_lesions_have_their_drawn_stenosis_and_strata():
    p = world.generate((64, 80, 80), seed=11, kernel=physics.Kernel.SOFT, motion_mm=(0.0, 0.0))
    lesions = [(v, les) for v in p.vessels for les in v.lesions_w]
    assert lesions and p.settings.kernel == physics.Kernel.SOFT
    for v, les in lesions:
        # reference and lesion radii differ only by the vessel's taper
        assert world.geometric_stenosis(v, les) == pytest.approx(100 * les.stenosis, abs=3.0)
        assert 0 <= les.stenosis <= 0.95 and 2.0 <= 2 * les.half_length_mm <= 15.0
    assert np.array_equal(p.image[~p.calcium_mask & (p.calcium_fraction == 0)].shape,
                          p.truth[~p.calcium_mask & (p.calcium_fraction == 0)].shape)
    if p.calcium_mask.any():
        assert (p.image - p.truth)[p.calcium_mask].mean() > 100, "calcium is brighter in the acquired image"


@pytest.mark.slow
def test_calibration_gate_small():
    """A small, fast version of the gate: untreated calcified lesions over-call, faint ones under-call.

    Eight standard-kernel studies (the report uses 60); bounds are looser than the gate's
    because the sample is small, but every one of them fails on the first phantom (which
    under-called by 5 points).
    """
    rows = calibration.world_gate(8, seed=1000, workers=1)
    table = calibration.gate_summary(rows, reader.WHITE_LEVELS_HU[0])
    calcified = table["calcified"]
    assert calcified["n"] >= 8
    assert calcified["blooming"] > 4.0, calcified
    assert calcified["original_vs_geometry"] > calibration.GATE_OVER_GEOMETRY[0], calcified
    assert table["faint"]["blooming"] < 0, "calcium no brighter than the lumen makes it look wider"
    for clean in ("soft", "normal"):
        if clean in table:
            # the acquired and truth images differ only at calcium and its beam-hardening halo
            assert table[clean]["blooming"] == pytest.approx(0.0, abs=0.5), table[clean]


@pytest.mark.slow
def test_the_fast_phantom_blooms_like_xcist():
    """The committed XCIST scans and the fast phantom, standard kernel: widths and over-calls within 20 %."""
    folder = ROOT / calibration.XCIST_DIR
    if not (folder / "meta.json").is_file():
        pytest.fail("reports/calibration/xcist is missing: run python -m dicom_node_lab.xcist_insert")
    rows = [r for r in calibration.xcist_rows(str(folder)) if r["kernel"] == "standard" and r["kvp"] == 120]
    summary = calibration._xcist_summary(rows, reader.WHITE_LEVELS_HU[0])
    assert summary
    for s in summary:
        assert s["width_within_20"] and s["over_within_20"], s
