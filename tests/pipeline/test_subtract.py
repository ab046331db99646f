"""The physics path: sharpen, take the calcium out, blur back (``pipeline/subtract.py``).

A synthetic vessel with a half-ring of calcium, blurred by a known scanner, must come
back close to the same vessel scanned without calcium (the calcium replaced by plaque);
nothing far from the calcium may move; and the engine runs the path without a network.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from dicom_node.pipeline.contrast import lumen_level_at
from dicom_node.pipeline.detect import DetectOptions, detect
from dicom_node.pipeline.morphology import grow_box
from dicom_node.pipeline.restore import EDGE_MARGIN_HU, ConfidenceOptions, Engine, lumen_disagreement
from dicom_node.pipeline.subtract import (
    ANATOMY_FLOOR_HU,
    ScannerBlur,
    SubtractOptions,
    calcium_removed,
    sharpen,
    sharpened,
    split_sharpen,
    through,
)
from dicom_node.pipeline.vessel import lumen_range

SPACING = (0.47, 0.47, 0.47)


def _scan(sharp: np.ndarray, blur: ScannerBlur, noise: np.ndarray) -> np.ndarray:
    h = blur.transfer(sharp.shape, SPACING)
    return (np.fft.irfftn(np.fft.rfftn(sharp) * h, s=sharp.shape, axes=(0, 1, 2)) + noise).astype(np.float32)


def _polar(shape: tuple[int, int, int], dy_mm: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z mm, radius mm from an axis, angle in degrees) of every voxel: a vessel along z through the middle,
    or ``dy_mm`` beside it."""
    z, y, x = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, SPACING)], indexing="ij")
    cy, cx = (shape[1] - 1) * SPACING[1] / 2 + dy_mm, (shape[2] - 1) * SPACING[2] / 2
    return z, np.hypot(y - cy, x - cx), np.degrees(np.arctan2(y - cy, x - cx)) % 360.0


def _vessel(blur: ScannerBlur, arc_deg: float = 180.0, seed: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(acquired, truth image, true calcium): a 3 mm lumen at 400 HU, a 0.8 mm calcium arc at 1,000 HU."""
    shape = (48, 56, 56)
    z, r, angle = _polar(shape)
    sharp = np.full(shape, 40.0)
    sharp[r < 2.6] = 50.0  # plaque and wall around the lumen
    sharp[r < 1.5] = 400.0
    middle = (z > 7.0) & (z < 15.0)
    calcium = middle & (r >= 1.5) & (r < 2.3) & (angle < arc_deg)
    truth = sharp.copy()
    sharp[calcium] = 1000.0
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).normal(0.0, 60.0, shape), 0.7)
    return _scan(sharp, blur, noise), _scan(truth, blur, noise), calcium


def _near(mask: np.ndarray, mm: float) -> np.ndarray:
    return ndimage.distance_transform_edt(~mask, sampling=SPACING) <= mm


def test_blur_model_puts_its_mtf50_where_it_is_asked():
    blur = ScannerBlur(mtf50_lp_cm=4.3, edge_enhance=0.3)
    assert blur.mtf(np.array([0.43]))[0] == pytest.approx(0.5, abs=1e-6)
    h = blur.transfer((8, 8, 8), SPACING)
    assert h[0, 0, 0] == pytest.approx(1.0) and h.shape == (8, 8, 5)
    for bad in ({"mtf50_lp_cm": 0.2}, {"edge_enhance": -1.0}, {"slice_fwhm_mm": 5.0}):
        with pytest.raises(ValueError):
            ScannerBlur(**bad)
    with pytest.raises(ValueError):
        SubtractOptions(iterations=0)


@pytest.mark.parametrize("arc_deg", [120.0, 360.0])
def test_subtraction_brings_a_calcified_vessel_close_to_the_same_vessel_without_calcium(arc_deg):
    scanner = ScannerBlur(mtf50_lp_cm=4.8, edge_enhance=0.4, slice_fwhm_mm=0.8)
    acquired, truth, calcium = _vessel(scanner, arc_deg)
    detected = acquired > 600.0
    assert detected.any()
    # the engine does not know the scanner: it assumes its default blur
    out = calcium_removed(acquired, detected, SPACING, SubtractOptions(), fallback_level=400.0)
    near = _near(calcium, 2.0)
    before = float(np.sqrt(np.mean((acquired[near] - truth[near]) ** 2)))
    after = float(np.sqrt(np.mean((out[near] - truth[near]) ** 2)))
    assert after < 0.4 * before, (before, after)
    assert out[calcium].max() < 400.0, "no calcium left brighter than the lumen"
    far = ~_near(calcium, 4.0)
    assert np.abs(out[far] - acquired[far]).max() < 2.0, "what lies beyond the blur's reach stays as acquired"


def test_the_level_is_measured_on_the_level_image_when_one_is_given():
    """``level_image`` (the lab's ``--oracle-level``) replaces only where the contrast level is measured."""
    acquired, truth, calcium = _vessel(ScannerBlur(mtf50_lp_cm=4.8), 360.0)
    detected = acquired > 600.0
    own = calcium_removed(acquired, detected, SPACING, SubtractOptions(), 400.0)
    assert np.array_equal(calcium_removed(acquired, detected, SPACING, SubtractOptions(), 400.0, acquired), own)
    assert (acquired - own)[calcium].min() > 100.0
    # measured on an image 300 HU brighter: the calcium's faint flank no longer stands above the level, and stays
    brighter = calcium_removed(acquired, detected, SPACING, SubtractOptions(), 400.0, acquired + 300.0)
    assert (acquired - brighter)[calcium].sum() < 0.995 * (acquired - own)[calcium].sum()


def test_no_calcium_means_no_change():
    acquired, _, _ = _vessel(ScannerBlur(), arc_deg=0.0)
    out = calcium_removed(acquired, np.zeros(acquired.shape, bool), SPACING, SubtractOptions(), 400.0)
    assert np.abs(out - acquired).max() < 1e-2


def test_engine_runs_the_physics_path_without_a_network_and_writes_only_the_footprint():
    acquired, truth, calcium = _vessel(ScannerBlur(mtf50_lp_cm=5.0), 200.0)
    volume = acquired.copy()
    result = Engine(None, method="subtract").run(volume, SPACING)
    assert result.detection.calcium.any() and result.regions
    assert result.windows == 0 and "subtract" in result.seconds
    assert all(r.action in ("restored", "restored, unsure") and r.disagreement_hu is None and r.vessel_mm is not None
               for r in result.reports), "by default no blur disagreement (subtract_unsure_hu 0), the calibre measured"
    measured = Engine(None, method="subtract", subtract=SubtractOptions(unsure_hu=90.0)).run(acquired.copy(), SPACING)
    assert all(r.measure == "blur" and r.disagreement_hu is not None for r in measured.reports)
    assert np.array_equal(measured.changed, result.changed), "the second pass only measures"
    assert np.array_equal(volume[~result.changed], acquired[~result.changed])
    near = _near(calcium, 2.0) & result.changed
    assert np.abs(volume[near] - truth[near]).mean() < 0.5 * np.abs(acquired[near] - truth[near]).mean()
    with pytest.raises(ValueError):
        Engine(None)  # the network method needs a backend
    with pytest.raises(ValueError):
        Engine(None, method="inpaint")  # type: ignore[arg-type]


def test_grown_box_stays_inside_the_volume():
    box = grow_box((slice(1, 4), slice(5, 9), slice(0, 2)), (6, 10, 3), np.array([2, 3, 2]))
    assert box == (slice(0, 6), slice(2, 10), slice(0, 3))


def test_unsure_regions_are_marked_or_left_as_acquired():
    """A threshold under every region's blur disagreement makes them all unsure: ``mark`` restores them and
    says so, ``leave`` writes nothing; without confidence there is no second pass and nothing is measured."""
    acquired, _, _ = _vessel(ScannerBlur(mtf50_lp_cm=5.0), 200.0)
    tiny = SubtractOptions(unsure_hu=1e-6)
    marked = acquired.copy()
    result = Engine(None, method="subtract", subtract=tiny).run(marked, SPACING)
    assert result.reports and all(r.unsure and r.action == "restored, unsure" and r.voxels for r in result.reports)
    left = acquired.copy()
    result = Engine(None, confidence=ConfidenceOptions(unsure_action="leave"), method="subtract",
                    subtract=tiny).run(left, SPACING)
    assert all(r.unsure and r.voxels == 0 and r.action == "left as acquired (unsure)" for r in result.reports)
    assert np.array_equal(left, acquired) and not result.changed.any()
    guarded = acquired.copy()
    result = Engine(None, confidence=ConfidenceOptions(unsure_action="guard"), method="subtract",
                    subtract=tiny).run(guarded, SPACING)
    assert all(r.unsure and r.voxels and r.action == "restored, unsure, lumen kept" for r in result.reports)
    assert sum(r.lumen_kept for r in result.reports) > 0, "the subtraction darkens some visible lumen here"
    assert np.all(guarded >= marked - 1e-3), "the guard only holds voxels up"
    held = guarded > marked + 1e-3
    level = lumen_level_at(acquired, SPACING, np.argwhere(held))
    edge, white = lumen_range(level)
    seen = acquired[held]
    assert np.all((seen >= edge) & (seen <= white)), "only what the acquired image shows as lumen is held"
    assert np.all(guarded[held] >= np.minimum(seen, edge + EDGE_MARGIN_HU) - 1e-3)
    plain = acquired.copy()
    result = Engine(None, confidence=ConfidenceOptions(flips=False), method="subtract").run(plain, SPACING)
    assert all(r.disagreement_hu is None and not r.unsure for r in result.reports)
    assert np.array_equal(plain[result.changed], marked[result.changed]), "the second pass only measures"


def test_lumen_disagreement_counts_only_what_either_shows_as_lumen():
    level = np.full(6, 400.0)  # edge (400 + 50) / 2 = 225, white 500
    first = np.array([300.0, 300.0, 900.0, 100.0, 100.0, 300.0])
    second = np.array([300.0, 340.0, 600.0, 100.0, 260.0, 300.0])
    # counted: lumen in either (0, 1, 4, 5); not the calcium (2: white in both) nor plaque (3: below the edge)
    assert lumen_disagreement(first, second, level) == pytest.approx((0 + 40 + 160 + 0) / 4)
    level[1] = np.nan  # no contrast level known: not counted
    assert lumen_disagreement(first, second, level) == pytest.approx(160 / 3)
    assert lumen_disagreement(first[[2, 3]], second[[2, 3]], level[[2, 3]]) == 0.0


def test_a_kernel_table_picks_the_blur_the_series_header_names():
    """The site's table maps a series' ConvolutionKernel to the blur assumed; the confidence pass's blur moves
    with it in proportion; an unlisted kernel, or none, keeps the default."""
    opts = SubtractOptions(kernels=(("SOFT", 3.5), ("FC43", 4.0)))
    soft = opts.for_kernel(" soft ")
    assert soft.blur.mtf50_lp_cm == 3.5 and soft.second_blur.mtf50_lp_cm == pytest.approx(3.5 * 3.5 / 5.2)
    assert opts.for_kernel("FC43\\AIDR 3D").blur.mtf50_lp_cm == 4.0, "a multi-valued header matches by its first"
    assert opts.for_kernel("B26f") is opts and opts.for_kernel("") is opts
    for bad in ((("SOFT", 0.5),), (("SOFT", 3.5), ("soft", 4.0)), (("", 4.0),)):
        with pytest.raises(ValueError):
            SubtractOptions(kernels=bad)
    acquired, _, _ = _vessel(ScannerBlur(mtf50_lp_cm=5.0), 200.0)
    engine = Engine(None, method="subtract", subtract=opts)
    listed, plain = acquired.copy(), acquired.copy()
    result = engine.run(listed, SPACING, kernel="SOFT")
    assert result.regions and result.assumed_mtf50_lp_cm == 3.5 and result.assumed_for_kernel == "SOFT"
    other = engine.run(plain, SPACING, kernel="B26f")
    assert other.assumed_mtf50_lp_cm == 5.2 and other.assumed_for_kernel == ""
    assert not np.array_equal(listed, plain), "the assumed blur changes the result"


def test_reach_writes_where_the_calcium_blur_reaches_and_nothing_beyond():
    """``reach_hu`` grows what is written past the footprint to where the estimated calcium's blur adds more
    than that many HU; off (0), the footprint only; never negative."""
    acquired, _, calcium = _vessel(ScannerBlur(mtf50_lp_cm=5.0), 200.0)
    footprint_only = acquired.copy()
    base = Engine(None, method="subtract").run(footprint_only, SPACING)
    reached = acquired.copy()
    result = Engine(None, method="subtract", subtract=SubtractOptions(reach_hu=10.0)).run(reached, SPACING)
    assert (result.changed & ~base.changed).any(), "the calcium's blur reaches past the margin"
    assert not (base.changed & ~result.changed).any(), "the footprint is always written"
    assert np.array_equal(reached[~result.changed], acquired[~result.changed])
    assert np.array_equal(reached[base.changed], footprint_only[base.changed]), "the same estimate, written wider"
    extra = result.changed & ~base.changed
    assert (acquired[extra] - reached[extra]).min() > 10.0 - 1e-3, "only where the blur adds more than reach_hu"
    assert not (extra & ~_near(calcium, 4.0)).any(), "never beyond the blur's reach"
    with pytest.raises(ValueError):
        SubtractOptions(reach_hu=-1.0)


def test_a_kernel_can_have_its_own_white_level():
    """``white_by_kernel`` sets the white level for the series of a listed kernel only, alongside (or without)
    its blur; the blur table still decides the blur."""
    opts = SubtractOptions(kernels=(("SOFT", 4.3),), white_by_kernel=(("soft", 70.0), ("FC03", 80.0)))
    soft = opts.for_kernel("SOFT")
    assert soft.white_above_lumen_hu == 70.0 and soft.blur.mtf50_lp_cm == 4.3
    fc03 = opts.for_kernel("FC03\\AIDR 3D")
    assert fc03.white_above_lumen_hu == 80.0 and fc03.blur == opts.blur
    assert opts.for_kernel("SHARP").white_above_lumen_hu == opts.white_above_lumen_hu == 100.0
    for bad in ((("", 70.0),), (("SOFT", 0.0),), (("SOFT", 70.0), (" soft", 90.0))):
        with pytest.raises(ValueError):
            SubtractOptions(white_by_kernel=bad)


def test_a_kernel_can_have_its_own_edge_enhancement():
    """``enhance_by_kernel`` sets the assumed blur's mid-frequency lift for a listed kernel's series, in both
    blurs (the confidence pass differs from the first in softness only), beside the MTF50 table; a kernel not
    listed keeps the default lift; lifts outside what a blur accepts and repeated names are refused."""
    opts = SubtractOptions(kernels=(("SHARP", 6.3),), enhance_by_kernel=(("sharp", 0.8), ("SOFT", 0.0)))
    sharp = opts.for_kernel("SHARP")
    assert sharp.blur.mtf50_lp_cm == 6.3 and sharp.blur.edge_enhance == 0.8
    assert sharp.second_blur.edge_enhance == 0.8 and sharp.second_blur.mtf50_lp_cm < sharp.blur.mtf50_lp_cm
    soft = opts.for_kernel("SOFT\\AIDR 3D")
    assert soft.blur.edge_enhance == 0.0 and soft.blur.mtf50_lp_cm == opts.blur.mtf50_lp_cm
    assert opts.for_kernel("HD").blur == opts.blur
    lifted = ScannerBlur(mtf50_lp_cm=6.3, edge_enhance=0.8)
    assert lifted.core_sigma_mm() != replace(lifted, edge_enhance=0.5).core_sigma_mm(), "MTF50 held, core moves"
    for bad in ((("SHARP", 2.5),), (("SHARP", -0.1),), (("SHARP", 0.8), (" sharp", 0.7))):
        with pytest.raises(ValueError):
            SubtractOptions(enhance_by_kernel=bad)


def _tube(lumen_mm: float, level_hu: float = 400.0, arc_deg: float = 150.0) -> tuple[np.ndarray, np.ndarray]:
    """(acquired, calcium): a straight vessel of ``lumen_mm`` at ``level_hu`` with a 1,000 HU calcium arc of
    ``arc_deg``, scanned."""
    shape = (48, 56, 56)
    z, r, angle = _polar(shape)
    sharp = np.full(shape, 40.0)
    a = lumen_mm / 2
    sharp[r < a + 1.1] = 50.0
    sharp[r < a] = level_hu
    calcium = (z > 8.0) & (z < 14.0) & (r >= a) & (r < a + 0.8) & (angle < arc_deg)
    sharp[calcium] = 1000.0
    noise = ndimage.gaussian_filter(np.random.default_rng(5).normal(0.0, 40.0, shape), 0.7)
    return _scan(sharp, ScannerBlur(mtf50_lp_cm=4.8, slice_fwhm_mm=0.8), noise), calcium


@pytest.mark.parametrize("lumen_mm", [2.0, 3.0, 4.0])
def test_the_engine_measures_the_vessels_calibre_at_each_region(lumen_mm):
    """``vessel_calibre_mm`` (the largest ball of lumen in and around a region) finds a straight vessel's
    diameter within a voxel, though the calcium narrows it and the scanner blurs its edge."""
    from dicom_node.pipeline.vessel import vessel_calibre_mm

    acquired, _ = _tube(lumen_mm)
    result = Engine(None, method="subtract").run(acquired.copy(), SPACING)
    assert len(result.regions) == 1
    calibre = vessel_calibre_mm(acquired, SPACING, result.regions[0].native_box, result.detection.calcium)
    assert calibre == pytest.approx(lumen_mm, abs=0.5)
    flat = np.full(acquired.shape, 40.0, np.float32)
    assert vessel_calibre_mm(flat, SPACING, result.regions[0].native_box, result.detection.calcium) is None


def test_a_wider_neighbour_does_not_lend_a_small_vessel_its_calibre():
    """Only the lumen connected to the region's own calcium is measured: a 4 mm vessel running 2 mm
    beside a 2 mm one (within the calibre's reach, but not touching the calcium) must not hide it."""
    from dicom_node.pipeline.vessel import vessel_calibre_mm

    shape = (48, 56, 56)
    z, r, angle = _polar(shape)
    _, beside, _ = _polar(shape, dy_mm=-5.0)
    sharp = np.full(shape, 40.0)
    sharp[(r < 2.1) | (beside < 3.1)] = 50.0
    sharp[(r < 1.0) | (beside < 2.0)] = 400.0
    calcium = (z > 8.0) & (z < 14.0) & (r >= 1.0) & (r < 1.8) & (angle < 150.0)
    sharp[calcium] = 1000.0
    noise = ndimage.gaussian_filter(np.random.default_rng(5).normal(0.0, 40.0, shape), 0.7)
    acquired = _scan(sharp, ScannerBlur(mtf50_lp_cm=4.8, slice_fwhm_mm=0.8), noise)
    result = Engine(None, method="subtract").run(acquired.copy(), SPACING)
    assert len(result.regions) == 1
    calibre = vessel_calibre_mm(acquired, SPACING, result.regions[0].native_box, result.detection.calcium)
    assert calibre == pytest.approx(2.0, abs=0.5)


class _Same:
    """A network that gives back what it is shown: no disagreement between flips."""

    name, max_batch = "same", 4

    def run(self, image, mask):
        from dicom_node.pipeline.windows import PATCH

        assert image.shape[1:] == (1, PATCH, PATCH, PATCH)
        return image


@pytest.mark.parametrize("method", ["subtract", "network"])
def test_a_region_in_a_small_vessel_is_unsure_whatever_its_disagreement(method):
    """With ``unsure_vessel_mm`` a region in a narrower vessel is unsure, and says why; a wider one is not;
    0 measures nothing. Both methods apply it, with or without the disagreement pass."""
    backend = _Same() if method == "network" else None
    for lumen_mm, unsure in ((2.0, True), (4.0, False)):
        acquired, _ = _tube(lumen_mm)
        for flips in (True, False):
            engine = Engine(backend, method=method, confidence=ConfidenceOptions(flips=flips, unsure_vessel_mm=2.5))
            (report,) = engine.run(acquired.copy(), SPACING).reports
            assert report.vessel_mm == pytest.approx(lumen_mm, abs=0.5)
            assert (f"vessel {report.vessel_mm:.1f} mm < 2.5" in report.why) is unsure
            assert report.unsure is bool(report.why) and report.as_dict()["why"] == report.why
            assert report.action == ("restored, unsure" if report.unsure else "restored")
    off_rule = ConfidenceOptions(unsure_vessel_mm=0.0)
    (off,) = Engine(backend, method=method, confidence=off_rule).run(_tube(2.0)[0], SPACING).reports
    assert off.vessel_mm is None and not any(w.startswith("vessel") for w in off.why)
    for bad in (-1.0, 11.0):
        with pytest.raises(ValueError):
            ConfidenceOptions(unsure_vessel_mm=bad)



@pytest.mark.parametrize("method", ["subtract", "network"])
def test_a_region_beside_a_dim_lumen_is_unsure_with_the_lumen_rule(method):
    """With ``unsure_lumen_hu`` a region whose vessel's lumen the engine measures dimmer is unsure, and says why;
    the level is read on the lumen's core, near the contrast the vessel was given (the scanner's blur and the
    calcium's bloom aside); off (0, the default) it adds no reason. Both methods apply it."""
    from dicom_node.pipeline.vessel import vessel_at
    backend = _Same() if method == "network" else None
    rule = ConfidenceOptions(flips=False, unsure_vessel_mm=0.0, unsure_lumen_hu=330.0)
    for level, unsure in ((280.0, True), (500.0, False)):
        acquired, _ = _tube(3.0, level)
        result = Engine(backend, method=method, confidence=rule).run(acquired.copy(), SPACING)
        (report,) = result.reports
        assert report.lumen_hu == pytest.approx(level, abs=40.0)
        assert report.vessel_mm == pytest.approx(3.0, abs=0.5), "measured with either rule on"
        assert (f"lumen {report.lumen_hu:.0f} HU < 330" in report.why) is unsure
        assert report.unsure is unsure and report.as_dict()["lumen_hu"] == round(report.lumen_hu)
        at = vessel_at(acquired, SPACING, result.regions[0].native_box, result.detection.calcium)
        assert at.lumen_hu == report.lumen_hu
    (off,) = Engine(backend, method=method).run(_tube(3.0, 280.0)[0], SPACING).reports
    assert off.lumen_hu is not None and not any(w.startswith("lumen") for w in off.why), "measured, no rule"
    for bad in (-1.0, 2000.0):
        with pytest.raises(ValueError):
            ConfidenceOptions(unsure_lumen_hu=bad)


def test_a_ring_is_unsure_with_the_enclosure_rule():
    """With ``unsure_enclosure`` a region whose calcium encloses the lumen beyond it (a ring) is unsure and says why,
    a small arc is not; off (0, the default) the enclosure is not measured unless the enclosed estimate needs it."""
    from dicom_node.pipeline.restore import calcium_enclosure
    rule = ConfidenceOptions(flips=False, unsure_vessel_mm=0.0, unsure_enclosure=0.7)
    for arc, unsure in ((360.0, True), (90.0, False)):
        acquired, _ = _tube(3.0, arc_deg=arc)
        result = Engine(None, method="subtract", confidence=rule).run(acquired.copy(), SPACING)
        (report,) = result.reports
        measured = calcium_enclosure(result.detection.calcium, SPACING, result.regions[0].native_box)
        assert report.as_dict()["enclosure"] == round(measured, 2)
        assert (measured > 0.7) is unsure, (arc, measured)
        assert (f"calcium encloses the lumen {measured:.2f} > 0.7" in report.why) is unsure
        assert report.unsure is unsure
    (off,) = Engine(None, method="subtract", confidence=ConfidenceOptions(flips=False, unsure_vessel_mm=0.0)
                    ).run(_tube(3.0, arc_deg=360.0)[0], SPACING).reports
    assert off.enclosure is None and not off.unsure
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError):
            ConfidenceOptions(unsure_enclosure=bad)


@pytest.mark.parametrize("scanner_mtf50, arc_deg, setting, at, ratio", [
    # total variation pulls the sharpened calcium's peak down: refit its amplitude on its own voxels
    (4.8, 120.0, "refit_iterations", 30, 0.95),
    # under a soft kernel a ring of the calcium's flank sharpens to under the white level, at lumen
    # brightness: hysteresis down to 40 HU above the level takes it out
    (4.3, 360.0, "grow_above_lumen_hu", 40.0, 0.85),
])
def test_the_estimates_refinements_bring_the_vessel_closer_and_touch_nothing_far(scanner_mtf50, arc_deg, setting,
                                                                                 at, ratio):
    """Both refinements (off by default: on the world's tuning studies neither helped,
    reports/tuning/subtract-estimate.md) must do what they are for on the synthetic vessel."""
    scanner = ScannerBlur(mtf50_lp_cm=scanner_mtf50, edge_enhance=0.4, slice_fwhm_mm=0.8)
    acquired, truth, calcium = _vessel(scanner, arc_deg)
    detected = acquired > 600.0
    near, far = _near(calcium, 2.0), ~_near(calcium, 4.0)
    rmse = []
    for value in (0, at):
        options = SubtractOptions(blur=ScannerBlur(mtf50_lp_cm=min(scanner_mtf50, 5.2)), **{setting: value})
        out = calcium_removed(acquired, detected, SPACING, options, 400.0)
        rmse.append(float(np.sqrt(np.mean((out[near] - truth[near]) ** 2))))
        assert np.abs(out[far] - acquired[far]).max() < 2.0
    assert rmse[1] < ratio * rmse[0], rmse
    with pytest.raises(ValueError):
        SubtractOptions(**{setting: -1})


def test_the_sharpened_image_detection_assumes_the_blur_the_kernel_table_gives_the_series(monkeypatch):
    """A kernel the site lists (even at the default blur's MTF50) is sharpened under its own MTF50;
    an unlisted one under the detection's own setting."""
    from dicom_node.pipeline import detect as detect_module
    from dicom_node.pipeline import restore

    seen = []
    monkeypatch.setattr(restore, "detect", lambda volume, spacing, options, level_image=None: (
        seen.append(options.sharp_mtf50_lp_cm), detect_module.describe(np.zeros(volume.shape, bool), volume,
                                                                         spacing, threshold_hu=130.0))[1])
    engine = Engine(None, detect_module.DetectOptions(sharp_contrast_hu=150.0), method="subtract",
                    subtract=SubtractOptions(kernels=(("HD", 5.2), ("B26f", 3.9))))
    volume = np.zeros((8, 8, 8), np.float32)
    for kernel in ("hd", "B26F", "FC43", ""):
        engine.run(volume.copy(), SPACING, kernel=kernel)
    assert seen == [5.2, 3.9, 4.3, 4.3]
    assert [engine.detect_options_for(k).sharp_mtf50_lp_cm for k in ("hd", "FC43")] == [5.2, 4.3]


def test_kept_lumen_beyond_the_calcium_is_never_darkened_past_its_edge():
    """An estimate that overshoots (a soft kernel's blur assumed for a sharp scan) takes lumen away beyond the
    calcium; with ``keep_lumen_beyond_mm`` the voxels that far from the detected calcium that the acquired image
    shows as lumen are held at the edge, closer to the image without calcium, while the calcium itself and its
    near flank are still taken out as before."""
    acquired, truth, _ = _vessel(ScannerBlur(mtf50_lp_cm=6.3, edge_enhance=0.5), 360.0)
    over = SubtractOptions(blur=ScannerBlur(mtf50_lp_cm=3.5))
    plain = acquired.copy()
    Engine(None, confidence=ConfidenceOptions(flips=False), method="subtract", subtract=over).run(plain, SPACING)
    kept = acquired.copy()
    result = Engine(None, confidence=ConfidenceOptions(flips=False), method="subtract",
                    subtract=replace(over, keep_lumen="all")).run(kept, SPACING)
    near = _near(result.detection.calcium, 0.5)
    held = kept > plain + 1e-3
    assert held.sum() > 50 and sum(r.lumen_kept for r in result.reports) == held.sum()
    assert not (held & near).any() and np.array_equal(kept[near], plain[near]), "the near flank is the estimate's"
    assert np.all(kept >= plain - 1e-3)
    level = lumen_level_at(acquired, SPACING, np.argwhere(held))
    edge, white = lumen_range(level)
    assert np.all((acquired[held] >= edge - 5.0) & (acquired[held] <= white + 5.0)), "only visible lumen is held"
    assert np.mean(np.abs(kept[held] - truth[held])) < 0.7 * np.mean(np.abs(plain[held] - truth[held]))
    # "unsure": only the regions the engine doubts (here, with a threshold under every disagreement, all of them)
    for unsure_hu, expected in ((1e-6, kept), (1e6, plain)):
        only = acquired.copy()
        doubting = replace(over, keep_lumen="unsure", unsure_hu=unsure_hu, second_blur=ScannerBlur(6.3))
        Engine(None, method="subtract", subtract=doubting,
               confidence=ConfidenceOptions(unsure_vessel_mm=0.0)).run(only, SPACING)
        assert np.array_equal(only, expected)
    # "sharpened": only the regions holding calcium the sharpened image alone found (the lesions' own mark)
    found = detect(acquired.copy(), SPACING, DetectOptions())
    assert found.lesions and not any(lesion.sharpened for lesion in found.lesions)
    marked = replace(found, lesions=[replace(lesion, sharpened=True) for lesion in found.lesions])
    for detection, expected in ((marked, kept), (found, plain)):
        only = acquired.copy()
        Engine(None, confidence=ConfidenceOptions(flips=False), method="subtract",
               subtract=replace(over, keep_lumen="sharpened")).restore(only, SPACING, detection)
        assert np.array_equal(only, expected)
    with pytest.raises(ValueError):
        SubtractOptions(keep_lumen_beyond_mm=-1.0)
    with pytest.raises(ValueError):
        SubtractOptions(keep_lumen="everywhere")


def _ring_around_small_lumen(blur: ScannerBlur) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(acquired, sharp anatomy and calcium, detected): a 1.5 mm lumen at 400 HU inside a full ring of 1,200 HU
    calcium 0.75 mm thick (a 3 mm vessel, 50 % stenosis), noiseless, blurred by ``blur``."""
    shape = (40, 40, 40)
    z, r, _ = _polar(shape)
    sharp = np.zeros(shape)
    sharp[r < 2.0] = 40.0
    sharp[r < 1.5] = 400.0
    sharp[(z > 5.0) & (z < 13.0) & (r >= 0.75) & (r < 1.5)] = 1200.0
    acquired = _scan(sharp, blur, np.zeros(shape)).astype(np.float64)
    return acquired, sharp, acquired > 700.0


def test_the_split_sharpening_keeps_a_small_lumen_inside_a_ring_of_calcium():
    """The plain deconvolution has one image to explain the box; a 1.5 mm lumen inside calcium gets too little
    signal through the blur to be placed, and the fit is as good with it drawn dark and its rim calcium-bright.
    With the anatomy bounded (no darker than fat, no brighter than contrast + 100 HU) and calcium only near
    the detected calcium, the lumen comes back near its level."""
    scanner = ScannerBlur(mtf50_lp_cm=4.6, edge_enhance=0.35)  # the site's table is a little off, as it always is
    assumed = replace(scanner, mtf50_lp_cm=4.33, edge_enhance=0.3)
    acquired, sharp, detected = _ring_around_small_lumen(scanner)
    h = assumed.transfer(acquired.shape, SPACING)
    centre = (19, 19, 19)  # the middle of the ring: lumen at 400 HU
    plain = sharpen(acquired, h, SubtractOptions.tv_weight, SubtractOptions.iterations)
    split = sharpened(acquired, h, detected, SPACING, SubtractOptions(blur=assumed, anatomy_above_level_hu=100.0),
                      fallback_level=400.0)
    assert sharp[centre] == 400.0
    assert plain[centre] < 250.0, "the plain sharpening no longer loses this lumen: the test shows nothing"
    assert abs(split[centre] - 400.0) < 100.0, (plain[centre], split[centre])
    # the options off: the plain sharpening, bit for bit
    off = sharpened(acquired, h, detected, SPACING, SubtractOptions(blur=assumed), fallback_level=400.0)
    assert np.array_equal(off, plain)
    with pytest.raises(ValueError):
        SubtractOptions(anatomy_above_level_hu=-1.0)


def test_split_sharpening_stays_within_its_bounds_and_explains_the_box():
    acquired, _, detected = _ring_around_small_lumen(ScannerBlur(mtf50_lp_cm=4.33, edge_enhance=0.3))
    blur = ScannerBlur(mtf50_lp_cm=4.33, edge_enhance=0.3)
    h = blur.transfer(acquired.shape, SPACING)
    support = ndimage.binary_dilation(detected, iterations=2)
    ceiling = np.full(acquired.shape, 450.0)
    u = split_sharpen(acquired, h, support, ceiling, 3.0, 120)
    assert u.min() >= ANATOMY_FLOOR_HU - 1e-6
    assert u[~support].max() <= 450.0 + 1e-6, "off the calcium's support, nothing is brighter than the ceiling"
    assert u[support].max() > 1000.0, "the calcium is found"
    fit = np.sqrt(np.mean((through(u, h) - acquired) ** 2))
    assert fit < 15.0, fit


def test_the_sharpenings_fast_arithmetic_is_the_plain_one():
    """``_tv_gradient`` in place is ``np.diff``/``np.roll``'s, bit for bit, and the sharpening with one FFT pair a
    step (h² on z's spectrum) is the one that blurs twice, to rounding: the detection's sharpened-image test and
    the subtraction's estimate must not move when they get faster."""
    from dicom_node.pipeline.subtract import TV_EPSILON_HU, _accelerated, _tv_gradient

    def plain_tv(u: np.ndarray) -> np.ndarray:
        g = [np.diff(u, axis=a, append=np.take(u, [-1], axis=a)) for a in range(3)]
        norm = np.sqrt(g[0] ** 2 + g[1] ** 2 + g[2] ** 2 + TV_EPSILON_HU ** 2)
        return -sum(p - np.roll(p, 1, axis=a) for a, p in enumerate(x / norm for x in g))

    rng = np.random.default_rng(5)
    u = rng.normal(400.0, 40.0, (20, 24, 28))
    u[8:11, 10:13, 12:15] += 700.0
    assert np.array_equal(_tv_gradient(u), plain_tv(u))
    h = ScannerBlur(mtf50_lp_cm=4.3).transfer(u.shape, SPACING)
    w, steps = SubtractOptions.tv_weight, 30
    rate = 1.0 / (float(np.max(h)) ** 2 + 12.0 * w / TV_EPSILON_HU)
    plain = _accelerated(u, lambda z: z - rate * (through(through(z, h) - u, h) + w * plain_tv(z)), steps)
    fast = sharpen(u, h, w, steps)
    assert np.abs(fast - plain).max() < 1e-8
    assert np.abs(fast - u).max() > 100.0, "the sharpening did sharpen"
