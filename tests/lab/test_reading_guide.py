"""The reading guide (``evaluate.py reading-guide``) advises only what its rule and its numbers allow.

The README's per-stratum answer to "may I read the derived series here?" is this tool's output; if a group
that made a severe stenosis could be advised "read it", or a group no closer than the original "beside", the
guide would tell a radiologist more than the held-out runs show.
"""

from __future__ import annotations

import json

from dicom_node_lab import evaluate, reading_guide
from dicom_node_lab.reading_guide import Cell, Verdict


def _cell(**kw) -> Cell:
    base = dict(n=100, original_mae=20.0, processed_mae=3.0, original_bias=10.0, processed_bias=0.5, made=0,
                hidden=0)
    return Cell(**{**base, **kw})


def test_the_rule_reads_only_where_the_goals_hold():
    assert _cell().verdict is Verdict.READ
    assert _cell(processed_mae=4.5).verdict is Verdict.BESIDE  # over the MAE goal, still closer than the original
    assert _cell(processed_bias=-2.5).verdict is Verdict.BESIDE
    assert _cell(made=1).verdict is Verdict.BESIDE  # one severe stenosis made: never read alone
    assert _cell(hidden=1).verdict is Verdict.BESIDE  # nor one hidden
    assert _cell(processed_mae=12.0, original_mae=12.5).verdict is Verdict.ORIGINAL  # not a point closer
    assert _cell(processed_mae=9.0, original_mae=8.0).verdict is Verdict.ORIGINAL
    assert _cell(n=reading_guide.MIN_LESIONS - 1).verdict is Verdict.TOO_FEW


def _row(i, stratum, arc, unsure, vessel_mm, original, processed, truth, geometric=30.0, lumen_hu=400.0):
    reads = {f"{k}@{w}": v for w in (100, 200)
             for k, v in (("original", original), ("processed", processed), ("truth", truth))}
    return {"study": f"1-{i}", "vessel": 0, "lesion": 0, "type": stratum, "stratum": stratum, "arc": arc,
            "density": ">=500 mg", "geometric": geometric, "unsure": unsure, "vessel_mm": vessel_mm,
            "lumen_hu": lumen_hu, **reads}


def _rows() -> list[dict]:
    rows = []
    for i in range(40):  # small arcs, sure, wide vessels: 2 points off, the original 10 over
        rows.append(_row(i, "calcified", "<90", False, 3.8, 50.0, 42.0, 40.0))
    for i in range(40, 80):  # rings, unsure, small vessels: 6 points off; one of them made severe
        rows.append(_row(i, "calcified", ">180", True, 2.4, 60.0, 46.0, 40.0))
    rows[40] = _row(40, "calcified", ">180", True, 2.4, 60.0, 75.0, 40.0)
    for i in range(80, 90):  # no region reached: left as acquired
        rows.append(_row(i, "calcified", "90-180", None, None, 30.0, 30.0, 45.0))
    rows.append(_row(90, "normal", "none", None, None, 10.0, 10.0, 10.0, geometric=0.0))
    return rows


def test_the_guide_splits_by_what_the_console_shows_and_what_the_node_says():
    got = {label: (whole, by) for label, whole, by in reading_guide.guide(_rows())}
    whole, by = got["white calcium, arc <90°"]
    assert whole.n == 40 and by["called sure"].processed_mae == 2.0 and by["called sure"].verdict is Verdict.READ
    assert by["marked unsure"] is None and by["no region (as acquired)"] is None
    _, by = got["white calcium, arc >180°"]
    unsure = by["marked unsure"]
    assert unsure.n == 40 and unsure.made == 1 and unsure.verdict is Verdict.BESIDE
    assert abs(unsure.processed_mae - (39 * 6.0 + 35.0) / 40) < 1e-9
    _, by = got["white calcium, calibre (engine) < 2.75 mm"]
    assert by["marked unsure"].n == 40 and by["called sure"] is None
    _, by = got["white calcium, arc 90-180°"]
    assert by["no region (as acquired)"].n == 10 and by["no region (as acquired)"].verdict is Verdict.TOO_FEW
    whole, _ = got["white calcium, all"]
    assert whole.n == 90  # the calcium-free segment is not white calcium


def test_the_command_prints_the_pooled_guide(tmp_path, capsys):
    rows = _rows()
    for k, part in enumerate((rows[:45], rows[45:])):
        (tmp_path / f"r{k}").mkdir()
        (tmp_path / f"r{k}" / "experiment2v2.json").write_text(json.dumps({"lesions": part}))
    assert evaluate.main(["reading-guide", f"{tmp_path / 'r0'}+{tmp_path / 'r1'}"]) == 0
    out = capsys.readouterr().out
    assert "| white calcium, arc <90° | 40 | 10.0 (+10.0) | 2.0 (+2.0) | 40: 2.0 (+2.0); **read it** | - | - |" in out
    assert "40: 6.7 (+6.7), 1 made; **beside the original**" in out
    assert "| no calcium (soft plaque, calcium-free) | 1 | - | 0 moved > 1 point |" in out
    assert "lumen rows count only" not in out  # every reached lesion carries its lumen level here
