"""Where the derived series may be read: held-out readings split the way a radiologist can split them.

Why this exists: the README's Status must say, per stratum, where the "CALCIUM REMOVED" series may be read
(issue 16). Written by hand, that table drifted from the runs behind it (it quoted the network's figures long after
the recommended configuration changed). Here it is computed from experiment2v2 runs (several held-out sets pooled
with ``A+B``), and each cell's advice follows from one written rule (``verdict``), so the README's guide is
reproduced by a command and cannot say more than the numbers do.

Rows are what can be seen at the reading console: the calcium's arc and brightness on the image, the engine's
measured vessel calibre and lumen level (the job's lesion table), a mixed plaque's soft tissue, and calcium no
brighter than the lumen. Columns are what the node says about a lesion (the SEG and the lesion table): restored
and called sure, restored and marked unsure, or reached by no region (left as acquired).

Run as ``python tools/evaluate.py reading-guide RUN[+RUN...]``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import numpy as np

from dicom_node_lab.experiment2v2 import (
    CALCIFIED,
    GOALS,
    LUMEN_BANDS_HU,
    NO_CALCIUM,
    PRIMARY_WHITE,
    errors_by_group,
    hidden_by_processing,
    made_by_processing,
    moved_without_calcium,
    run_lesions,
)

# Fewer lesions than this in a cell and the guide does not advise (a 95 % interval on an MAE of about 6 points is
# wider than +-1.5 points under about 30 lesions).
MIN_LESIONS = 30
# Closer than the original by at least this much (mean absolute error, points) to be worth reading beside it.
CLOSER_POINTS = 1.0
# The engine's calibre bands (mm) the guide splits restored lesions at: 2.75 is the unsure flag's own line
# (engine.unsure_vessel_mm), 3.5 splits the larger vessels in two.
CALIBRE_BANDS_MM = (2.75, 3.5)
CALIBRE_LABELS = (f"< {CALIBRE_BANDS_MM[0]:g} mm", f"{CALIBRE_BANDS_MM[0]:g}-{CALIBRE_BANDS_MM[1]:g} mm",
                  f">= {CALIBRE_BANDS_MM[1]:g} mm")
# The engine's measured lumen level (HU) under which a lumen counts as dim: the first of the lab's lumen bands
# (``experiment2v2.LUMEN_BANDS_HU``; README: a calcium residue under a dim lumen reads as lumen).
DIM_LUMEN_HU = LUMEN_BANDS_HU[0]
LUMEN_LABELS = (f"< {DIM_LUMEN_HU:g} HU (dim)", f">= {DIM_LUMEN_HU:g} HU")


class Verdict(Enum):
    """What a radiologist may do with the derived series for a group of lesions."""

    READ = "read it"  # meets the goals there: MAE, bias, no severe stenosis made or hidden
    BESIDE = "beside the original"  # clearly closer to the truth than the original, but short of the goals
    ORIGINAL = "the original"  # not clearly closer: read the acquired series
    TOO_FEW = "too few to say"


@dataclass(frozen=True)
class Cell:
    """One group's figures against the truth image at the primary white level."""

    n: int
    original_mae: float
    processed_mae: float
    original_bias: float
    processed_bias: float
    made: int
    hidden: int

    @property
    def verdict(self) -> Verdict:
        return verdict(self)


def verdict(c: Cell) -> Verdict:
    """The guide's one rule. READ needs the issue's own goals in the group (MAE <= 4, bias within +-2, no severe
    stenosis made, and none hidden: a restored severe lesion is never cleared on the derived series alone); BESIDE
    needs the derived series closer than the original by ``CLOSER_POINTS``; too few lesions, no advice."""
    if c.n < MIN_LESIONS:
        return Verdict.TOO_FEW
    if (c.processed_mae <= GOALS["mae"] and abs(c.processed_bias) <= GOALS["bias"] and c.made == 0
            and c.hidden == 0):
        return Verdict.READ
    if c.processed_mae <= c.original_mae - CLOSER_POINTS:
        return Verdict.BESIDE
    return Verdict.ORIGINAL


def cell(rows: list[dict], white: float = PRIMARY_WHITE) -> Cell | None:
    """The figures of ``rows`` that hold all three readings; None when none does."""
    w = f"{white:g}"
    ok = [r for r in rows if all(r.get(f"{k}@{w}") is not None for k in ("original", "processed", "truth"))]
    if not ok:
        return None
    errors = errors_by_group([ok], ("original", "processed"), white)
    (original_mae, original_bias), (processed_mae, processed_bias) = errors["original"][0], errors["processed"][0]
    return Cell(n=len(ok), original_mae=original_mae, processed_mae=processed_mae, original_bias=original_bias,
                processed_bias=processed_bias, made=sum(made_by_processing(r, w) for r in ok),
                hidden=sum(hidden_by_processing(r, w) for r in ok))


# What the node says about a lesion (the guide's columns), from the run's recorded flag. Lesions no region reached
# are left as acquired: the guide gives their figures but no advice on a derived series that does not touch them.
NO_REGION = "no region (as acquired)"
NODE_GROUPS: dict[str, Callable[[dict], bool]] = {
    "called sure": lambda r: r.get("unsure") is False,
    "marked unsure": lambda r: r.get("unsure") is True,
    NO_REGION: lambda r: r.get("unsure") is None,
}


def _calibre(r: dict) -> str | None:
    mm = r.get("vessel_mm")
    return None if mm is None else CALIBRE_LABELS[int(np.searchsorted(CALIBRE_BANDS_MM, mm, side="right"))]


def _lumen(r: dict) -> str | None:
    hu = r.get("lumen_hu")
    return None if hu is None else LUMEN_LABELS[int(hu >= DIM_LUMEN_HU)]


# The guide's rows: (label, which lesions). Calcified rows are issue 16's stratum (calcium that looks white).
def _rows_of(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    calc = [r for r in rows if r["stratum"] == CALCIFIED]
    out: list[tuple[str, list[dict]]] = [("white calcium, all", calc)]
    for arc in ("<90", "90-180", ">180"):
        out.append((f"white calcium, arc {arc}°", [r for r in calc if r["arc"] == arc]))
    for band in CALIBRE_LABELS:
        out.append((f"white calcium, calibre (engine) {band}", [r for r in calc if _calibre(r) == band]))
    for band in LUMEN_LABELS:
        out.append((f"white calcium, lumen (engine) {band}", [r for r in calc if _lumen(r) == band]))
    for density in ("<500 mg", ">=500 mg"):
        out.append((f"white calcium, {density} HA/cm³", [r for r in calc if r["density"] == density]))
    out.append(("mixed plaque (calcium behind soft tissue)", [r for r in rows if r["stratum"] == "mixed"]))
    out.append(("faint calcium (no brighter than the lumen)", [r for r in rows if r["stratum"] == "faint"]))
    return out


def guide(rows: list[dict], white: float = PRIMARY_WHITE) -> list[tuple[str, Cell | None, dict[str, Cell | None]]]:
    """Per guide row: its cell over all its lesions, and one per ``NODE_GROUPS`` column."""
    return [(label, cell(members, white), {name: cell([r for r in members if keep(r)], white)
                                           for name, keep in NODE_GROUPS.items()})
            for label, members in _rows_of(rows)]


def _fmt(c: Cell | None, advise: bool) -> str:
    if c is None:
        return "-"
    text = f"{c.n}: {c.processed_mae:.1f} ({c.processed_bias:+.1f})"
    extra = [f"{c.made} made"] if c.made else []
    extra += [f"{c.hidden} hidden"] if c.hidden else []
    if extra:
        text += ", " + ", ".join(extra)
    return text + (f"; **{c.verdict.value}**" if advise else "")


def report(args: argparse.Namespace) -> int:
    """``evaluate.py reading-guide``: the guide as a markdown table, for each run (or pooled runs) named."""
    w = f"{PRIMARY_WHITE:g}"
    print(f"Where the derived series may be read: lesions against the truth image at lumen + {w} HU, by what the "
          f"console shows (rows) and what the node says (columns). Cells: n: MAE (bias) on the derived series; "
          f"severe stenoses made or hidden by processing. Advice (`reading_guide.verdict`): "
          f"**{Verdict.READ.value}** where the issue's goals hold (MAE <= {GOALS['mae']:g}, bias within "
          f"+-{GOALS['bias']:g}, none made or hidden); **{Verdict.BESIDE.value}** where it is at least "
          f"{CLOSER_POINTS:g} point closer than the original; otherwise **{Verdict.ORIGINAL.value}**; under "
          f"{MIN_LESIONS} lesions no advice.\n")
    for name in args.reports:
        rows = run_lesions(name, "reading-guide")
        print(f"**{name}**\n")
        print("| lesions | n | as acquired: MAE (bias) | derived: MAE (bias) | " + " | ".join(NODE_GROUPS) + " |")
        print("|---|---:|---|---|" + "---|" * len(NODE_GROUPS))
        for label, whole, by in guide(rows):
            if whole is None:
                continue
            cells = [_fmt(by[g], g != NO_REGION) for g in NODE_GROUPS]
            print(f"| {label} | {whole.n} | {whole.original_mae:.1f} ({whole.original_bias:+.1f}) | "
                  f"{whole.processed_mae:.1f} ({whole.processed_bias:+.1f}) | " + " | ".join(cells) + " |")
        clean = [r for r in rows if r["type"] in NO_CALCIUM and r.get(f"processed@{w}") is not None
                 and r.get(f"original@{w}") is not None]
        moved = sum(moved_without_calcium(r, w) for r in clean)
        print(f"| no calcium (soft plaque, calcium-free) | {len(clean)} | - | {moved} moved > 1 point | "
              + " | ".join("-" for _ in NODE_GROUPS) + " |\n")
        recorded, reached = lumen_recorded(rows)
        if recorded < reached:
            print(f"The lumen rows count only the lesions whose run recorded the engine's lumen level: {recorded} of "
                  f"the {reached} white-calcium lesions a region reached (runs before the field existed lack it).\n")
    return 0


def lumen_recorded(rows: list[dict]) -> tuple[int, int]:
    """How many white-calcium lesions a region reached carry the engine's lumen level, of how many reached."""
    reached = [r for r in rows if r["stratum"] == CALCIFIED and r.get("unsure") is not None]
    return sum(r.get("lumen_hu") is not None for r in reached), len(reached)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("reports", nargs="+", help="experiment2v2 runs, each its --report-dir or its experiment2v2.json; "
                    "A+B reads held-out sets pooled")
