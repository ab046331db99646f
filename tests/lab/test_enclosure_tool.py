"""The lab's enclosure tool (``dicom_node_lab.enclosure``): how the "enclosed" threshold was chosen without
processing a study again. ``--emulate BASE SPLIT`` must take the second run's reading exactly where a lesion's
recorded enclosure exceeds the threshold (or, for the oracle line, where the true arc exceeds 180°), and rank
enclosures against the true arcs."""

from __future__ import annotations

import json
import re

from dicom_node_lab import enclosure
from tests.lab.test_report_strata import _row


def _rows(errors: list[float], arcs: list[str]) -> list[dict]:
    return [dict(_row(i, "standard", 0.2, e), arc=a) for i, (e, a) in enumerate(zip(errors, arcs))]


def test_the_emulation_takes_the_second_reading_only_above_the_threshold(tmp_path, capsys):
    arcs = ["<90", "90-180", ">180", ">180"]
    base, split = _rows([4.0, 4.0, 8.0, 8.0], arcs), _rows([10.0, 10.0, 0.0, 0.0], arcs)
    (tmp_path / "base.json").write_text(json.dumps({"lesions": base}))
    (tmp_path / "split.json").write_text(json.dumps({"lesions": split}))
    enclosures = [0.2, 0.5, 0.8, 0.9]
    (tmp_path / "enc.json").write_text(json.dumps([{"study": r["study"], "vessel": 0, "lesion": 0, "enclosure": e}
                                                   for r, e in zip(base, enclosures)]))
    assert enclosure.main(["--out", str(tmp_path / "enc.json"), "--emulate", str(tmp_path / "base.json"),
                           str(tmp_path / "split.json"), "--thresholds", "0.1", "0.7", "0.95"]) == 0
    out = capsys.readouterr().out
    assert "4 calcified lesions reached" in out and "probability 1.00" in out
    mae = {m[0]: float(m[1]) for m in re.findall(r"split where (.+?): MAE ([0-9.]+)", out)}
    # every lesion split: 10, 10, 0, 0; above 0.7 only the two rings: 4, 4, 0, 0; nothing above 0.95: the base
    assert mae == {"enclosure > 0.1": 5.0, "enclosure > 0.7": 2.0, "enclosure > 0.95": 6.0,
                   "the true arc > 180°": 2.0}
