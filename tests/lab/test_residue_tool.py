"""The lab's residue tool (``dicom_node_lab.residue``): the share of a region's calcium core a restoration leaves in
the lumen's range, graded as a flag on top of a run's own. ``--grade`` must count, at each threshold, the large
errors, under-reads and good restorations it would flag, and the sure restorations it would take from the sure,
and rank the shares against the errors."""

from __future__ import annotations

import json
import re

from dicom_node_lab import residue
from tests.lab.test_report_strata import _row


def test_grading_counts_what_each_threshold_flags(tmp_path, capsys):
    # processed - truth = error + 0 (``_row``: processed 40 + e, truth 40): two under-reads, one over-read, three good
    errors = [-20.0, -15.0, 12.0, 1.0, 2.0, 3.0]
    rows = [dict(_row(i, "standard", 0.2, e), unsure=(i == 2)) for i, e in enumerate(errors)]
    rows.append(dict(_row(9, "standard", 0.2, 0.0), unsure=None))  # no region reached it: not graded
    (tmp_path / "run.json").write_text(json.dumps({"lesions": rows}))
    shares = [0.9, 0.6, 0.05, 0.0, 0.3, None]
    joined = [0.0, 0.6, 0.05, 0.0, 0.3, None]  # the first lesion's residue is an island inside its deposit
    (tmp_path / "res.json").write_text(json.dumps({"lesions": [
        {"study": r["study"], "vessel": 0, "lesion": 0, "share150": s, "share300": s, "core150": 10, "core300": 5,
         "joined150": j, "joined300": j} for r, s, j in zip(rows, shares, joined)]}))
    assert residue.main(["--out", str(tmp_path / "res.json"), "--grade", str(tmp_path / "run.json"),
                         "--thresholds", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "6 calcified lesions reached (3 read more than 10 points" in out
    assert "2 of them too low; 5 called sure" in out
    # the two under-reads hold the two largest shares: ranked first against the four others
    assert re.search(r"share, core > 150 HU: .* an under-read with 1\.00", out)
    line = re.search(r"share, core > 150 HU.*\n  (share >= 0.5: .*)", out).group(1)
    assert "flags 2; large errors 2 of 3, under-reads 2 of 2, good ones 0 of 3" in line
    # of the five sure (all but the over-read), the two under-reads (20, 15) newly flagged; 1, 2, 3 stay sure
    assert "2 newly flagged read 17.50, the 3 left sure 2.00 (all sure 8.20)" in line
    # joined to the lumen, only the second under-read's residue counts
    line = re.search(r"joined, core > 150 HU.*\n  (share >= 0.5: .*)", out).group(1)
    assert "flags 1; large errors 1 of 3, under-reads 1 of 2, good ones 0 of 3" in line
