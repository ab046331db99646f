"""Detection, window planning and the inference loop, with a transparent stand-in model.

The stand-in fills whatever it is asked to restore with a constant, so every assertion
about which voxels change, and by how much, is exact. The real model is exercised in
test_process.py.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from dicom_node.pipeline.detect import DetectOptions, describe, detect
from dicom_node.pipeline.restore import ConfidenceOptions, Engine
from dicom_node.pipeline.windows import PATCH, WindowOptions, footprint, plan
from dicom_node_lab import phantom

FILL_HU = 123.0


class FillBackend:
    """Restores every masked voxel to FILL_HU; records what it was given."""

    name = "fill"
    max_batch = 4

    def __init__(self):
        self.calls: list[int] = []

    def run(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        assert image.shape[1:] == (1, PATCH, PATCH, PATCH) and image.dtype == np.float32
        self.calls.append(len(image))
        return np.where(mask > 0.5, FILL_HU, image).astype(np.float32)


@pytest.fixture(scope="module")
def study() -> phantom.Phantom:
    opts = phantom.PhantomOptions(n_vessels=(2, 2), calcified_probability=1.0, plaques_per_vessel=(2, 3),
                                  bone_probability=0.0, lesion_margin_mm=5.0)
    for seed in range(50):
        p = phantom.generate((64, 80, 80), seed=seed, options=opts)
        if len(detect(p.image, p.spacing).lesions) >= 2:
            return p
    raise AssertionError("no phantom with two detectable lesions")


def test_detects_calcium_and_only_bright_voxels(study):
    fixed = detect(study.image, study.spacing, DetectOptions(local_contrast_hu=0.0))
    assert len(fixed.lesions) >= 2
    assert np.all(study.image[fixed.calcium] > fixed.threshold_hu)
    det = detect(study.image, study.spacing)  # the default also finds calcium against its vessel's contrast
    assert (det.calcium >= fixed.calcium).all()
    assert np.all(study.image[det.calcium] > DetectOptions().local_floor_hu)
    # every detected lesion sits on real calcium
    for les in det.lesions:
        assert study.calcium_fraction[det.labels == les.index].max() > 0


def test_metal_and_bone_are_left_alone_but_calcium_beside_bone_is_not():
    vol = np.full((48, 64, 64), 40.0, np.float32)
    vol[10:14, 10:14, 10:14] = 3800.0  # a stent strut or lead: metal
    vol[:, 40:56, 40:56] = 1200.0  # a bone the whole height of the volume
    vol[20:23, 35:40, 45:48] = 900.0  # calcium touching the bone (within 1 mm of it counts as bone)
    vol[30:33, 20:23, 20:23] = 900.0  # isolated calcium
    det = detect(vol, (0.47, 0.47, 0.47))
    reasons = [e["reason"] for e in det.excluded]
    assert any(r.startswith("metal") for r in reasons)
    assert any(r.startswith("bone") for r in reasons)
    assert not det.calcium[:, 44:52, 44:52].any(), "bone interior is never calcium"
    assert not det.calcium[10:14, 10:14, 10:14].any(), "metal is never inpainted"
    assert det.calcium[31, 21, 21]
    assert det.calcium[20:23, 35:40, 45:48].any(), "calcium touching bone is still calcium"
    assert len(det.lesions) == 2


def test_bright_sliver_cut_by_the_volume_edge_is_left_alone():
    vol = np.full((32, 48, 48), 40.0, np.float32)
    vol[31, 20:30, 0:4] = 1300.0  # the corner of a rib whose rest is outside the scan
    vol[14:17, 20:23, 20:23] = 900.0  # calcium inside the volume
    det = detect(vol, (0.47, 0.47, 0.47))
    assert not det.calcium[31].any()
    assert det.calcium[15, 21, 21] and len(det.lesions) == 1
    assert any("edge of the scanned volume" in e["reason"] for e in det.excluded)
    kept = detect(vol, (0.47, 0.47, 0.47), DetectOptions(keep_edge_components=True))
    assert kept.calcium[31, 25, 2] and len(kept.lesions) == 2


def test_adaptive_threshold_follows_the_lumen():
    rng = np.random.default_rng(0)
    vol = rng.normal(350.0, 20.0, (32, 32, 32)).astype(np.float32)
    det = detect(vol, (0.5, 0.5, 0.5), DetectOptions(adaptive=True))
    assert 450.0 <= det.threshold_hu < 500.0


def test_adaptive_threshold_never_rises_above_the_fixed_one():
    """Bright contrast must not hide calcium between 700 HU and the lumen-derived value."""
    rng = np.random.default_rng(0)
    vol = np.full((32, 32, 32), 40.0, np.float32)
    vol[4:28, 8:24, 8:24] = rng.normal(620.0, 30.0, (24, 16, 16))  # bright contrast: median + 3.5 SD ≈ 725 HU
    vol[14:18, 14:18, 14:18] = 715.0  # calcium the fixed threshold finds
    # (only 3 noise SDs above this lumen: the noise test, checked elsewhere, would rightly doubt it)
    det = detect(vol, (0.5, 0.5, 0.5), DetectOptions(adaptive=True, noise_sigmas=0.0))
    assert det.threshold_hu == 700.0
    assert det.calcium[15, 15, 15]


def test_float_noise_in_the_slice_spacing_does_not_change_the_plan(study):
    """DICOM positions give 0.46999999999999886 mm for 0.47; the masks must not grow by a voxel."""
    det = detect(study.image, study.spacing)
    noisy = (study.spacing[0] * (1 - 2.4e-15), study.spacing[1], study.spacing[2])
    exact, jittered = plan(det, study.spacing), plan(det, noisy)
    assert len(exact) == len(jittered)
    for a, b in zip(exact, jittered):
        assert a.shape == b.shape
        assert np.array_equal(a.model_mask, b.model_mask)
        assert [w.centre for w in a.windows] == [w.centre for w in b.windows]


def test_windows_cover_the_footprint_in_order_along_the_lesion():
    vol = np.full((40, 40, 120), 40.0, np.float32)
    vol[19:21, 19:21, 20:100] = 1000.0  # a 37 mm long calcification along x
    det = detect(vol, (0.47, 0.47, 0.47))
    regions = plan(det, (0.47, 0.47, 0.47), WindowOptions(core=16))
    assert len(regions) == 1
    r = regions[0]
    assert len(r.windows) >= 5
    covered = np.zeros(r.shape, bool)
    xs = []
    for w in r.windows:
        box = w.box()
        assert w.mask.shape == (PATCH,) * 3
        assert not (covered[box] & w.mask).any(), "no voxel is restored twice"
        covered[box] |= w.mask
        xs.append(w.centre[2])
    assert np.array_equal(covered, r.model_mask)
    assert xs == sorted(xs) or xs == sorted(xs, reverse=True), "multi-step walks along the lesion"


@pytest.mark.parametrize("spacing", [(0.47, 0.47, 0.47), (0.6, 0.38, 0.38)])
def test_only_footprint_voxels_change(study, spacing):
    vol = study.image.copy()
    before = vol.copy()
    backend = FillBackend()
    # the visible-lumen guard off: this test checks where values are written, not what (see below); the calibre
    # rule off: a fill is flip-symmetric, so only the flips' verdict is checked
    opts = ConfidenceOptions(keep_visible_lumen=False, unsure_vessel_mm=0.0)
    result = Engine(backend, confidence=opts).run(vol, spacing)
    foot = footprint(result.detection.calcium, spacing, WindowOptions().margin_mm)
    assert np.array_equal(result.changed, foot)
    assert np.array_equal(vol[~foot], before[~foot]), "every other voxel keeps its exact value"
    assert np.allclose(vol[foot], FILL_HU, atol=1e-3)
    # each window twice: as it is and mirrored, for the confidence estimate
    assert sum(backend.calls) == 2 * result.windows and max(backend.calls) <= backend.max_batch
    assert [r.disagreement_hu for r in result.reports] == [0.0] * len(result.regions), "a fill is flip-symmetric"
    assert all(r.action == "restored" and not r.unsure for r in result.reports)
    plain = FillBackend()
    Engine(plain, confidence=ConfidenceOptions(flips=False)).run(study.image.copy(), spacing)
    assert sum(plain.calls) == result.windows, "without flips, one pass"


class LopsidedBackend(FillBackend):
    """Restores one half of each window's x axis differently: a restoration that changes when mirrored."""

    def run(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        out = super().run(image, mask)
        out[..., PATCH // 2:] = np.where(mask[..., PATCH // 2:] > 0.5, FILL_HU + 300.0, out[..., PATCH // 2:])
        return out


@pytest.mark.parametrize("action", ["mark", "leave", "guard"])
def test_an_unsure_region_is_marked_or_left_as_acquired(study, action):
    """A restoration that disagrees with its mirror image is unsure: restored and marked, or left alone, or
    restored and marked with its visible lumen held even where the site turned the guard off for sure ones."""
    vol = study.image.copy()
    before = vol.copy()
    opts = ConfidenceOptions(unsure_hu=50.0, unsure_action=action, keep_visible_lumen=False)
    result = Engine(LopsidedBackend(), confidence=opts).run(vol, study.spacing)
    assert result.reports and all(r.unsure and r.disagreement_hu > 50.0 for r in result.reports)
    if action == "leave":
        assert not result.changed.any() and np.array_equal(vol, before), "left exactly as acquired"
        assert all(r.voxels == 0 and r.action == "left as acquired (unsure)" for r in result.reports)
    elif action == "guard":
        assert result.changed.any() and all(r.action == "restored, unsure, lumen kept" for r in result.reports)
        marked = study.image.copy()
        Engine(LopsidedBackend(), confidence=replace(opts, unsure_action="mark")).run(marked, study.spacing)
        assert np.all(vol >= marked - 1e-3) and (vol > marked + 1e-3).any()
        assert any(r.lumen_kept for r in result.reports)
    else:
        assert result.changed.any() and all(r.action == "restored, unsure" for r in result.reports)
    calm = Engine(LopsidedBackend(), confidence=ConfidenceOptions(unsure_hu=1e6)).run(study.image.copy(),
                                                                                     study.spacing)
    assert not any(r.unsure for r in calm.reports), "below the threshold nothing is unsure"


def test_confidence_options_refuse_nonsense():
    with pytest.raises(ValueError):
        ConfidenceOptions(unsure_hu=0.0)
    with pytest.raises(ValueError):
        ConfidenceOptions(unsure_action="ignore")


def test_cube_mode_hides_the_whole_core_but_writes_only_the_footprint(study):
    vol = study.image.copy()
    before = vol.copy()

    class Spy(FillBackend):
        def run(self, image, mask):
            assert all(m.sum() == 16 ** 3 for m in mask[:, 0])
            return super().run(image, mask)

    result = Engine(Spy(), window_options=WindowOptions(mask_mode="cube")).run(vol, study.spacing)
    assert np.array_equal(vol[~result.changed], before[~result.changed])


def test_a_described_mask_carries_the_threshold_it_is_given_and_refuses_none(study):
    """The subtraction's level where no contrast is near derives from the detection's threshold: a described
    mask must carry a defined one (nan once made an oracle remove nothing there)."""
    given = describe(study.calcium_mask, study.image, study.spacing, threshold_hu=151.0)
    assert given.threshold_hu == 151.0
    with pytest.raises(ValueError, match="threshold_hu"):
        describe(study.calcium_mask, study.image, study.spacing, threshold_hu=float("nan"))


def test_a_given_calcium_mask_is_restored_instead_of_the_detected_one(study):
    """Experiment 2's true-calcium run: the engine restores exactly the calcium it is given."""
    vol = study.image.copy()
    before = vol.copy()
    given = describe(study.calcium_mask, vol, study.spacing, threshold_hu=130.0)
    assert len(given.lesions) == int(given.labels.max()) >= 2
    assert np.array_equal(given.labels > 0, study.calcium_mask)
    result = Engine(FillBackend()).restore(vol, study.spacing, given)
    foot = footprint(study.calcium_mask, study.spacing, WindowOptions().margin_mm)
    assert np.array_equal(result.changed, foot)
    assert not np.array_equal(foot, footprint(detect(before, study.spacing).calcium, study.spacing,
                                              WindowOptions().margin_mm)), "the given mask is not what detect finds"
    assert np.array_equal(vol[~foot], before[~foot])


class DarkBackend(FillBackend):
    """Restores every masked voxel to fat: the worst a network can do to a narrow lumen."""

    def run(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        self.calls.append(len(image))
        return np.where(mask > 0.5, -100.0, image).astype(np.float32)


def test_the_visible_lumen_is_never_darkened_past_its_edge(study):
    """The guard holds voxels the acquired image shows as lumen at its edge; calcium still goes."""
    guarded, free = study.image.copy(), study.image.copy()
    on = Engine(DarkBackend()).run(guarded, study.spacing)
    off = Engine(DarkBackend(), confidence=ConfidenceOptions(keep_visible_lumen=False)).run(free, study.spacing)
    assert np.array_equal(on.changed, off.changed)
    assert sum(r.lumen_kept for r in on.reports) > 0 and all(r.lumen_kept == 0 for r in off.reports)
    assert (guarded >= free).all(), "the guard only ever holds a value up"
    white = study.image > 1000  # calcium itself: no lumen level reaches that high
    assert np.array_equal(guarded[white & on.changed], free[white & on.changed])
    held = on.changed & (guarded > free)
    assert held.any() and (study.image[held] < 1000).all()


def test_the_guard_can_be_kept_to_voxels_as_bright_as_the_lumen(study):
    """lumen_guard_from = 1 holds only voxels at or above the lumen's level: a subset of the edge guard's."""
    edge, level, free = study.image.copy(), study.image.copy(), study.image.copy()
    at_edge = Engine(DarkBackend(), confidence=ConfidenceOptions(lumen_guard_from=0.0)).run(edge, study.spacing)
    at_level = Engine(DarkBackend(), confidence=ConfidenceOptions(lumen_guard_from=1.0)).run(level, study.spacing)
    Engine(DarkBackend(), confidence=ConfidenceOptions(keep_visible_lumen=False)).run(free, study.spacing)
    held_edge, held_level = edge > free, level > free
    assert held_level.any(), "voxels as bright as the lumen beside calcium are still held"
    assert not (held_level & ~held_edge).any(), "the level guard holds nothing the edge guard does not"
    assert held_level.sum() < held_edge.sum(), "the band between the edge and the level is left to the model"
    assert sum(r.lumen_kept for r in at_level.reports) == held_level.sum() < sum(r.lumen_kept for r in
                                                                                 at_edge.reports)
    with pytest.raises(ValueError):
        ConfidenceOptions(lumen_guard_from=-0.5)


def test_averaged_flips_write_the_mean_of_both_passes(study):
    """average_flips: the mirrored pass is not only a measure of doubt but half of what is written."""
    vol = study.image.copy()
    opts = ConfidenceOptions(keep_visible_lumen=False, average_flips=True, unsure_hu=1e6)
    result = Engine(LopsidedBackend(), confidence=opts).run(vol, (0.47, 0.47, 0.47))
    assert result.changed.any()
    assert np.allclose(vol[result.changed], FILL_HU + 150.0, atol=1e-3), "each half once as is, once mirrored"
    single = study.image.copy()
    one = Engine(LopsidedBackend(), confidence=ConfidenceOptions(keep_visible_lumen=False, unsure_hu=1e6,
                                                                 average_flips=False))
    one.run(single, (0.47, 0.47, 0.47))
    assert not np.allclose(single[result.changed], FILL_HU + 150.0, atol=1.0), "without it, the first pass only"
