"""Several learnt calcium estimates on one region (``SubtractOptions.companions``, ``engine.subtract_companions``).

Two estimates that sharpen differently err on different lesions: their restorations' disagreement is a confidence
measure, and the one written may be the first's, their mean, or the one that leaves the reader the most lumen.
A companion identical to the first must change nothing and disagree by nothing; one that takes more calcium out
must disagree, be outvoted by "wider" and be halved by "mean".
"""

from __future__ import annotations

import numpy as np
import pytest

from dicom_node.config import ConfigError, load
from dicom_node.pipeline.restore import (
    CONFIDENCE_MEASURES,
    ConfidenceOptions,
    Engine,
    _shifted,
    calcium_enclosure,
    chosen,
    lumen_voxels,
    restoration_written,
)
from dicom_node.pipeline.subtract import LearntExcess, ScannerBlur, SubtractOptions
from tests.pipeline.test_learnt_estimate import _write
from tests.pipeline.test_subtract import SPACING, _vessel


def test_combining_takes_the_first_the_mean_or_the_one_with_most_lumen():
    level = np.full(6, 400.0)  # the reader's lumen: from half-way to the wall (225 HU) to the white level (500)
    narrow = np.array([400, 400, 100, 100, 100, 900], np.float32)  # 2 voxels of lumen
    wide = np.array([400, 400, 400, 400, 100, 50], np.float32)  # 4
    assert lumen_voxels(narrow, level) == 2 and lumen_voxels(wide, level) == 4
    def combined(tries, level, how, enclosed=False):
        return restoration_written(tries, chosen(tries, level, how, enclosed))

    assert combined([narrow, wide], level, "first") is narrow
    assert combined([narrow, wide], level, "wider") is wide
    assert combined([wide, narrow], level, "wider") is wide
    assert np.array_equal(combined([narrow, wide], level, "mean"), (narrow + wide) / 2)
    assert chosen([narrow, wide], level, "mean") is None
    assert chosen([narrow, wide], level, "enclosed", True) == 1 and chosen([narrow, wide], level, "enclosed") == 0
    assert chosen([narrow], level, "enclosed", True) == 0, "one try: nothing to choose"
    # white calcium left standing is no lumen: a try that takes less out does not win by leaving calcium
    white = np.array([400, 400, 900, 900, 900, 900], np.float32)
    assert combined([narrow, white], level, "wider") is narrow
    unknown = np.full(6, np.nan)  # no level: no voxel is lumen, the first is kept
    assert combined([narrow, wide], unknown, "wider") is narrow


def test_companions_need_a_first_estimate_and_a_known_combination(tmp_path):
    learnt = LearntExcess.load(_write(tmp_path / "a.npz"))
    with pytest.raises(ValueError, match="first learnt estimate"):
        SubtractOptions(companions=(learnt,))
    with pytest.raises(ValueError, match="combine"):
        SubtractOptions(learnt=learnt, combine="median")  # type: ignore[arg-type]
    opts = SubtractOptions(learnt=learnt, companions=(learnt, learnt), combine="mean")
    runs = opts.estimates()
    assert len(runs) == 3 and runs[0] is opts and all(not o.companions for o in runs[1:])
    assert opts.for_kernel("HD").companions == opts.companions
    assert opts.estimate_text() == "Calcium removed as the mean of the restorations under the learnt estimates a, a, a."
    assert SubtractOptions(learnt=learnt).estimate_text() == "Calcium estimated by the learnt estimate a."
    assert SubtractOptions().estimate_text() == "Calcium estimated by the white-level rule."


def _run(volume: np.ndarray, opts: SubtractOptions):
    return Engine(None, method="subtract", subtract=opts,
                  confidence=ConfidenceOptions(unsure_vessel_mm=0.0, unsure_action="mark")).run(volume, SPACING)


def test_the_engine_runs_every_estimate_and_measures_their_disagreement(tmp_path):
    acquired, _, _ = _vessel(ScannerBlur(mtf50_lp_cm=5.0), 200.0)
    first = LearntExcess.load(_write(tmp_path / "first.npz"))
    more = LearntExcess.load(_write(tmp_path / "more.npz", last=0.05))  # takes more calcium out
    alone = acquired.copy()
    single = _run(alone, SubtractOptions(learnt=first, unsure_hu=1e6))
    assert single.reports and single.changed.any()
    assert all(r.measure == "blur" for r in single.reports)

    twin = acquired.copy()
    same = _run(twin, SubtractOptions(learnt=first, companions=(first,), unsure_hu=1e6))
    assert np.array_equal(twin, alone), "an identical companion changes nothing"
    assert all(r.measure == "estimates" and r.disagreement_hu == 0.0 for r in same.reports)

    outs, named = {}, {}
    for how in ("first", "mean", "wider"):
        out = acquired.copy()
        result = _run(out, SubtractOptions(learnt=first, companions=(more,), combine=how, unsure_hu=30.0))
        outs[how] = out
        named[how] = {(r.estimate, r.estimate_index, r.enclosure) for r in result.reports}
        assert all(r.measure == "estimates" and r.disagreement_hu > 30.0 for r in result.reports)
        assert all(r.unsure and any(CONFIDENCE_MEASURES["estimates"] in w for w in r.why) for r in result.reports)
    assert np.array_equal(outs["first"], alone), "'first' writes the first estimate's restoration"
    assert named == {"first": {("first", 0, None)}, "mean": {("mean of first + more", None, None)},
                     "wider": {("first", 0, None)}}, "each region says which estimate's restoration it got"
    changed = single.changed
    taken = {how: float((acquired - out)[changed].sum()) for how, out in outs.items()}
    over = acquired.copy()
    _run(over, SubtractOptions(learnt=more))
    taken["more"] = float((acquired - over)[changed].sum())
    assert taken["first"] < taken["mean"] < taken["more"]
    assert taken["mean"] == pytest.approx((taken["first"] + taken["more"]) / 2, rel=1e-3)
    assert taken["wider"] == taken["first"], "the estimate that takes less lumen away is written"


def _configured(tmp_path, extra: str):
    """(the config file, its first lines, the config loaded with ``extra`` after them): a subtraction with a first
    estimate ``first.npz`` and a second, ``second.npz``, that takes more out, beside it in ``tmp_path``."""
    _write(tmp_path / "first.npz")
    _write(tmp_path / "second.npz", last=0.05)
    f = tmp_path / "c.toml"
    base = '[engine]\nmethod = "subtract"\nsubtract_estimate = "first.npz"\n'
    f.write_text(base + extra)
    return f, base, load(f)


def test_the_config_reads_companions_beside_it(tmp_path):
    from dicom_node.pipeline.process import engine_id

    f, base, cfg = _configured(tmp_path, 'subtract_companions = ["second.npz"]\nsubtract_combine = "wider"\n')
    assert cfg.engine.subtract_companions == [str(tmp_path / "second.npz")]
    opts = cfg.engine.subtract_options()
    assert opts.combine == "wider" and len(opts.companions) == 1 and opts.companions[0].digest != opts.learnt.digest
    f.write_text(base)
    assert engine_id(load(f)) != engine_id(cfg), "the companions are part of what made the output"
    f.write_text(base + 'subtract_companions = ["nowhere.npz"]\n')
    with pytest.raises(ConfigError, match="nowhere.npz"):
        load(f)
    f.write_text('[engine]\nmethod = "subtract"\nsubtract_companions = ["second.npz"]\n')
    with pytest.raises(ConfigError, match="first learnt estimate"):
        load(f)
    f.write_text(base + 'subtract_combine = "median"\n')
    with pytest.raises(ConfigError, match="subtract_combine"):
        load(f)


def _shell(arc_deg: float) -> np.ndarray:
    """A 0.75 mm thick calcium shell round a 1.5 mm lumen, ``arc_deg`` of the circle, 4 mm long."""
    z, y, x = np.mgrid[:20, :30, :30]
    r = np.hypot(y - 15, x - 15) * SPACING[1]
    angle = np.degrees(np.arctan2(y - 15, x - 15)) % 360
    return (r > 0.75) & (r < 1.5) & (z > 5) & (z < 14) & (angle < arc_deg)


def test_enclosure_grows_with_the_arc_and_a_ring_is_nearly_closed():
    whole = (slice(0, 20), slice(0, 30), slice(0, 30))
    values = [calcium_enclosure(_shell(a), SPACING, whole) for a in (60, 90, 180, 270, 360)]
    assert all(a < b for a, b in zip(values, values[1:])), values
    assert values[1] < 0.6 < values[2] < 0.75 < values[3] and values[-1] > 0.85, values
    assert calcium_enclosure(np.zeros((10, 10, 10), bool), SPACING, whole) == 0.0
    # only the region's box (grown by 2 mm) counts: a ring elsewhere in the volume does not enclose this region
    two = np.zeros((20, 30, 80), bool)
    two[:, :, :30] = _shell(60)
    two[:, :, 50:] = _shell(360)
    assert calcium_enclosure(two, SPACING, (slice(5, 14), slice(8, 23), slice(8, 23))) == pytest.approx(values[0])


def test_a_shift_moves_the_mask_and_drops_what_leaves_the_box():
    mask = np.zeros((4, 5, 6), bool)
    mask[1, 2, 3] = mask[3, 4, 5] = True
    out = _shifted(mask, [1, -2, 2])
    assert out.sum() == 1 and out[2, 0, 5], "the voxel at the corner leaves the box"


def test_enclosed_takes_the_companions_restoration_only_where_the_calcium_encloses_the_lumen(tmp_path):
    first = LearntExcess.load(_write(tmp_path / "first.npz"))
    more = LearntExcess.load(_write(tmp_path / "more.npz", last=0.05))
    for arc, expect in ((100.0, "first"), (360.0, "more")):
        acquired, _, _ = _vessel(ScannerBlur(mtf50_lp_cm=5.0), arc)
        out = {}
        for name, opts in (("first", SubtractOptions(learnt=first)), ("more", SubtractOptions(learnt=more)),
                           ("enclosed", SubtractOptions(learnt=first, companions=(more,), combine="enclosed"))):
            out[name] = acquired.copy()
            result = _run(out[name], opts)
            assert result.reports
            if name != "enclosed":  # one estimate: nothing to tell apart
                assert all(r.estimate == "" and r.enclosure is None and r.estimate_index is None
                           for r in result.reports)
        assert not np.array_equal(out["first"], out["more"])
        assert np.array_equal(out["enclosed"], out[expect]), arc
        # the report says which estimate restored the region, and how enclosed its calcium was
        assert all(r.estimate == expect and r.estimate_index == (expect == "more") for r in result.reports)
        assert all((r.enclosure > 0.7) is (expect == "more") for r in result.reports)
        row = result.reports[0].as_dict()
        assert row["estimate"] == expect and row["enclosure"] == round(result.reports[0].enclosure, 2)
    with pytest.raises(ValueError, match="enclosed_above"):
        SubtractOptions(learnt=first, companions=(more,), combine="enclosed", enclosed_above=1.5)


def test_a_region_beside_a_dim_lumen_takes_the_dim_lumen_estimate(tmp_path):
    """``dim_learnt`` restores the regions whose vessel's lumen the engine measures under ``dim_below_hu`` in the
    first estimate's place, and only those (a bright lumen's region runs the first alone); a region the "enclosed"
    rule gives the companion keeps it; the report names the estimate and the level that chose it."""
    from tests.pipeline.test_subtract import _tube

    first = LearntExcess.load(_write(tmp_path / "first.npz"))
    more = LearntExcess.load(_write(tmp_path / "more.npz", last=0.05))
    dim_opts = SubtractOptions(learnt=first, dim_learnt=more, dim_below_hu=360.0)
    for level, expect in ((280.0, "more"), (500.0, "first")):
        acquired, _ = _tube(3.0, level)
        out = {}
        for name, opts in (("first", SubtractOptions(learnt=first)), ("more", SubtractOptions(learnt=more)),
                           ("dim", dim_opts)):
            out[name] = acquired.copy()
            result = _run(out[name], opts)
        assert not np.array_equal(out["first"], out["more"])
        assert np.array_equal(out["dim"], out[expect]), level
        (report,) = result.reports
        assert report.estimate == expect and report.estimate_index == (1 if expect == "more" else None)
        assert report.lumen_hu == pytest.approx(level, abs=40.0), "measured for the choice, and reported"
    level = np.full(6, 400.0)
    tries = [np.zeros(6, np.float32)] * 3  # the first, the enclosed companion, the dim-lumen estimate
    assert chosen(tries, level, "enclosed", enclosed=False, dim=True) == 2
    assert chosen(tries, level, "enclosed", enclosed=True, dim=True) == 1, "an enclosing ring keeps the companion"
    assert chosen(tries[:2], level, "first", dim=True) == 1 and chosen(tries[:1], level, "first") == 0
    assert dim_opts.estimate_text() == ("Calcium estimated by the learnt estimate first. Beside lumens under 360 HU, "
                                        "by more in its place.")
    assert len(dim_opts.estimates()) == 1 and dim_opts.estimates(dim=True)[1].learnt is more
    assert not SubtractOptions(learnt=first, dim_learnt=more).uses_dim(), "no threshold: off"
    with pytest.raises(ValueError, match="dim lumens needs a first"):
        SubtractOptions(dim_learnt=more, dim_below_hu=300.0)
    with pytest.raises(ValueError, match="cannot join"):
        SubtractOptions(learnt=first, dim_learnt=more, dim_below_hu=300.0, combine="mean")
    with pytest.raises(ValueError, match="dim_below_hu"):
        SubtractOptions(learnt=first, dim_learnt=more, dim_below_hu=-1.0)


def test_the_config_reads_the_dim_lumen_estimate(tmp_path):
    from dicom_node.pipeline.process import engine_id

    f, base, cfg = _configured(tmp_path, 'subtract_dim_estimate = "second.npz"\nsubtract_dim_lumen_hu = 360.0\n')
    assert cfg.engine.subtract_dim_estimate == str(tmp_path / "second.npz")
    opts = cfg.engine.subtract_options()
    assert opts.uses_dim() and opts.dim_below_hu == 360.0 and opts.dim_learnt.digest != opts.learnt.digest
    f.write_text(base)
    assert engine_id(load(f)) != engine_id(cfg), "the dim-lumen estimate is part of what made the output"
    f.write_text(base + 'subtract_dim_estimate = "nowhere.npz"\nsubtract_dim_lumen_hu = 360.0\n')
    with pytest.raises(ConfigError, match="nowhere.npz"):
        load(f)
