"""The engines on outside physics: XCIST's calcified vessel inserts, restored and read against XCIST's own
calcium-free scan.

Why this exists: every restoration figure in Experiment 2 v2 comes from our world, whose scanner is built from
the same family of transfer functions that the subtraction assumes (a Gaussian-like MTF with a mid-frequency
lift). A method that wins there may be winning on that shared assumption. XCIST (``xcist_insert.py``) scans the
same kind of insert with a polychromatic spectrum, a detector, view blur, beam hardening and filtered
back-projection with its own kernels: physics none of our code wrote. Here each of its inserts (a 3 mm vessel,
calcium 25/50/70 % deep over 90/180/360°, 400 and 800 mg HA/cm³, 120 and 100 kVp, its standard and bone kernels)
is restored by the node's engines and read by the Experiment 2 v2 reader against the same scanner's
calcium-free twin (``python -m dicom_node_lab.xcist_insert --densities 0``: the deposit's place filled with wall
tissue), the truth image of this bench.

How a 2D scan becomes a study: XCIST's slice is z-invariant, so each insert is a stack (calcium-free reference
vessel, insert, reference) of the slice cropped around the vessel, given a slice profile along z (a Gaussian of
``SLICE_FWHM_MM``) and a noise draw with the world's FBP texture for the matching kernel (XCIST's images are
noiseless; the truth stack gets the same draw, as the world's truth image keeps the acquired image's noise).
The engine sees the stack as the node would (stored-value rounding; the kernel's name as a header states it).
Limits: one vessel orientation (along z), no motion, a straight insert, 9 lesion geometries per vessel size.

Two vessel sizes: the calibration's 3 mm phantom (``reports/calibration/xcist`` and its twin ``xcist-free``,
120 and 100 kVp) and a 2 mm one, where a restoration's error of one voxel is a large share of the lumen
(``reports/calibration/xcist-2mm``: ``xcist_insert --lumen-radius 1.0 --densities 800 400 0 --kvps 120``, twin
and all in one folder; ``--xcist`` and ``--free`` both name it).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from dicom_node_lab import physics
from dicom_node_lab.calibration import ARCS_DEG, STENOSES, Insert, _centred_crop, read_stack, stack
from dicom_node_lab.reader import WHITE_LEVELS_HU

XCIST_DIR = Path("reports/calibration/xcist")
FREE_DIR = Path("reports/calibration/xcist-free")
PIXEL_TAG = "0p47mm"
CROP_MM = 18.0  # around each vessel: its neighbours stand 12 mm away, their walls 10 mm
REF_SLICES, LESION_SLICES = 12, 24
SLICE_FWHM_MM = 0.75
# XCIST's kernel → the world's kernel whose noise texture and SD it gets, and the name its header states
KERNELS = {"standard": (physics.Kernel.STANDARD, "XSTANDARD"), "bone": (physics.Kernel.SHARP, "XBONE")}
# What `dicom-node measure-kernel` reads from XCIST's own rods (reports/kernel-measure/): a site's tables
MEASURED_MTF50 = {"XSTANDARD": 4.33, "XBONE": 6.27}
MEASURED_LIFT = {"XSTANDARD": 0.30, "XBONE": 0.79}


@dataclass(frozen=True)
class Configuration:
    """One way of processing: a name, and its ``[engine]`` lines as Experiment 2 v2's ``--engine`` takes them
    (none: the node's defaults, the network)."""

    name: str
    engine: tuple[str, ...]


def _table(values: dict[str, float]) -> str:
    return "{ " + ", ".join(f"{k} = {v:g}" for k, v in values.items()) + " }"


# The README's recommended subtraction (since the seventeenth session with the split estimate written where the
# calcium encloses the lumen: reports/tuning/estimate-ensemble.md), less the site's tables, as the committed reports
# ran it: the twenty-seventh session's sharp_level = "sharpened" is compared beside it
# (reports/xcist-restore-sharp-level/)
RECOMMENDED = ('method = "subtract"', 'subtract_estimate = "engines/calcium_excess_ref.npz"',
               'subtract_companions = ["engines/calcium_excess_split.npz"]', 'subtract_combine = "enclosed"',
               "sharp_contrast_hu = 150")
MEASURED = (f"scanner_kernels = {_table(MEASURED_MTF50)}", f"scanner_edge_enhance = {_table(MEASURED_LIFT)}")
CONFIGURATIONS = (
    Configuration("network (default)", ()),
    Configuration("subtraction, site-measured tables", RECOMMENDED + MEASURED),
    Configuration("subtraction, no tables", RECOMMENDED),
    # the same without the learnt estimate: the white-level rule, which nothing was trained for
    Configuration("subtraction (rule), site-measured tables", ('method = "subtract"', "sharp_contrast_hu = 150")
                  + MEASURED),
)


def compared(estimate: Path | None = None, extra: tuple[str, ...] = ()) -> Configuration:
    """The recommended subtraction with another learnt estimate in place of the shipped one (``--compare-estimate``)
    and further engine lines (``--compare-engine``: a key already set is replaced), named by what differs."""
    keys = {line.partition("=")[0].strip() for line in extra}
    engine = tuple(f'subtract_estimate = "{estimate}"' if estimate and line.startswith("subtract_estimate") else line
                   for line in RECOMMENDED + MEASURED if line.partition("=")[0].strip() not in keys) + tuple(extra)
    differs = ([estimate.name] if estimate else []) + [_short(line) for line in extra]
    return Configuration("subtraction, site-measured tables, " + ", ".join(differs), engine)


def _short(line: str) -> str:
    """An engine line as a configuration's name shows it: file paths by their names."""
    key, _, value = line.partition("=")
    return f"{key.strip()} = " + re.sub(r'"[^"]*/([^"/]+)"', r'"\1"', value.strip())


def _scan(folder: Path, ha: float, kvp: int, kernel: str) -> tuple[np.ndarray, float, float, float]:
    meta = json.loads((folder / "meta.json").read_text())
    name = f"ha{ha:g}_{kvp}kv_{kernel}_{PIXEL_TAG}.npz"
    info = meta["files"][name]
    data = np.load(folder / name)
    return data["image_hu"].astype(np.float32), float(info["pixel_mm"]), float(info["x0_mm"]), float(info["y0_mm"])


def _stacked(image: np.ndarray, px: float, x0: float, y0: float, centre: list[float], ref_centre: list[float]
             ) -> np.ndarray:
    crop = _centred_crop(image, px, x0, y0, tuple(centre), CROP_MM)
    ref = _centred_crop(image, px, x0, y0, tuple(ref_centre), CROP_MM)
    vol = stack(crop, ref, REF_SLICES, LESION_SLICES)
    return ndimage.gaussian_filter1d(vol, SLICE_FWHM_MM * physics.FWHM_TO_SIGMA / px, axis=0, mode="nearest")


def _geometric(s: float, a: float, white: float, radius_mm: float) -> float:
    ins, ref = Insert(s, a, 1000.0, radius_mm=radius_mm), Insert(0.0, 0.0, 0.0, radius_mm=radius_mm)
    return read_stack(stack(ins.slice(0.02, calcium=False), ref.slice(0.02), REF_SLICES, LESION_SLICES), 0.02,
                      white, REF_SLICES, LESION_SLICES)


def calcium_contrast_hu(image: np.ndarray, px: float, x0: float, y0: float, centre: list[float], s: float, a: float,
                        lumen_hu: float, radius_mm: float) -> float:
    """How far the deposit's brightest pixel stands above the lumen in the noiseless acquired slice: Experiment 2
    v2's headline stratum is calcium that looks white (more than 100 HU above the lumen)."""
    crop = _centred_crop(image, px, x0, y0, tuple(centre), CROP_MM)
    ins = Insert(s, a, 1000.0, radius_mm=radius_mm)
    where = ins.slice(px, CROP_MM, calcium=True) != ins.slice(px, CROP_MM, calcium=False)
    return float(crop[where].max() - lumen_hu)


def rows(draws: int, seed: int, model: Path, kvps: tuple[int, ...] = (120, 100),
         kernels: tuple[str, ...] = tuple(KERNELS), densities: tuple[float, ...] = (400.0, 800.0),
         stenoses: tuple[float, ...] = STENOSES, arcs: tuple[float, ...] = ARCS_DEG, xcist_dir: Path = XCIST_DIR,
         free_dir: Path = FREE_DIR, configurations: tuple[Configuration, ...] = CONFIGURATIONS) -> list[dict]:
    """One row per insert, scan and noise draw: the readings of the acquired, each configuration's processed and
    the calcium-free scan's stacks, at both white levels. The noise draws do not depend on the configurations:
    a configuration added to a run reads the same noisy stacks as the others."""
    from dicom_node_lab.experiment2v2 import _engine, _stored_hu

    meta = json.loads((xcist_dir / "meta.json").read_text())
    centres = meta["insert_centres_mm"]
    radius = float(meta["phantom"]["lumen_radius_mm"])
    engines = {c.name: _engine(model, list(c.engine)) for c in configurations}
    geometric = {(s, a, w): _geometric(s, a, w, radius) for s in stenoses for a in arcs for w in WHITE_LEVELS_HU}
    out = []
    rng = np.random.default_rng(seed)
    for kvp in kvps:
        for kernel in kernels:
            world_kernel, header = KERNELS[kernel]
            free, px, x0, y0 = _scan(free_dir, 0, kvp, kernel)
            lo, hi = physics.KERNELS[world_kernel].noise_sd
            for ha in densities:
                image, px2, x02, y02 = _scan(xcist_dir, ha, kvp, kernel)
                lumen = meta["runs"][f"ha{ha:g}_{kvp}kv"]["recon"][f"{kernel}_{px:g}mm"]["rods"]["rod_iodinated_blood"]
                assert (px2, x02, y02) == (px, x0, y0), "the calcium-free scan must share the calcified one's grid"
                for s in stenoses:
                    for a in arcs:
                        centre = centres[f"vessel_S{s:.2f}_A{a:.0f}"]
                        contrast = calcium_contrast_hu(image, px, x0, y0, centre, s, a, lumen["mean"], radius)
                        acquired = _stacked(image, px, x0, y0, centre, centres["reference_vessel"])
                        truth = _stacked(free, px, x0, y0, centre, centres["reference_vessel"])
                        spacing = (px, px, px)
                        for d in range(draws):
                            sd = float(rng.uniform(lo, hi))
                            n = physics.noise(acquired.shape, spacing, world_kernel, SLICE_FWHM_MM, sd, rng)
                            images = {"original": _stored_hu(acquired + n), "truth": _stored_hu(truth + n)}
                            seen = {}
                            for c in configurations:
                                vol = images["original"].copy()
                                t0 = time.perf_counter()
                                res = engines[c.name].run(vol, spacing, kernel=header)
                                images[c.name] = np.where(res.changed, _stored_hu(vol), images["original"])
                                seen[c.name] = {"seconds": round(time.perf_counter() - t0, 2),
                                                "lesions": len(res.detection.lesions),
                                                "unsure": any(r.unsure for r in res.reports),
                                                "why": sorted({w for r in res.reports for w in r.why})}
                            row = {"vessel_mm": 2 * radius, "kvp": kvp, "kernel": kernel, "ha_mg_cc": ha, "S": s,
                                   "arc_deg": a, "draw": d,
                                   "noise_sd": round(sd, 1), "calcium_contrast_hu": round(contrast, 1),
                                   "looks_white": contrast > WHITE_LEVELS_HU[0], "engines": seen}
                            for w in WHITE_LEVELS_HU:
                                row[f"geometric@{w:g}"] = geometric[(s, a, w)]
                                for name, vol in images.items():
                                    row[f"{name}@{w:g}"] = read_stack(vol, px, w, REF_SLICES, LESION_SLICES)
                            out.append(row)
    return out


def _severe(r: dict, name: str, w: str, against: str = "truth") -> bool:
    """A severe reading: the reference under 50 %, ``name`` read 70 % or more."""
    return r[f"{against}@{w}"] < 50 and r[f"{name}@{w}"] >= 70


def made_by_processing(r: dict, name: str, w: str, against: str = "truth") -> bool:
    """... that the acquired image did not read as severe (Experiment 2 v2's "made by processing")."""
    return _severe(r, name, w, against) and r[f"original@{w}"] < 70


def summary(rs: list[dict], name: str, white: float, against: str = "truth") -> dict:
    """Bias, MAE and severe stenoses read (reference < 50 %, read >= 70 %) of ``name`` against ``against``; of
    those, how many processing made (the acquired image read under 70 %), and how many of them were flagged."""
    e = np.array([r[f"{name}@{white:g}"] - r[f"{against}@{white:g}"] for r in rs])
    w = f"{white:g}"
    made = [r for r in rs if _severe(r, name, w, against)]
    by = [r for r in made if made_by_processing(r, name, w, against)]
    flagged = sum(1 for r in by if name in r["engines"] and r["engines"][name]["unsure"])
    return {"n": len(rs), "bias": float(e.mean()) if len(e) else float("nan"),
            "mae": float(np.abs(e).mean()) if len(e) else float("nan"),
            "mae_ci": _insert_bootstrap(rs, np.abs(e)) if len(e) else [float("nan")] * 2, "made_severe": len(made),
            "made_by_processing": len(by), "made_by_processing_flagged": flagged}


def by_flag(rs: list[dict], name: str, white: float) -> dict:
    """The readings of configuration ``name`` split by its own flag: how many it called sure and how those read
    against the truth image (MAE, severe stenoses made by processing), beside the flagged ones: whether the
    world's finding, that the restorations the node calls sure meet issue 16's goals, holds on outside physics."""
    w = f"{white:g}"
    out = {}
    reached = lambda r: r["engines"][name]["lesions"] > 0  # noqa: E731 - no calcium found: left as acquired
    for group, keep in (("sure", lambda r: reached(r) and not r["engines"][name]["unsure"]),
                        ("unsure", lambda r: reached(r) and r["engines"][name]["unsure"]),
                        ("no calcium found", lambda r: not reached(r))):
        sel = [r for r in rs if keep(r)]
        e = np.array([abs(r[f"{name}@{w}"] - r[f"truth@{w}"]) for r in sel])
        made = sum(made_by_processing(r, name, w) for r in sel)
        out[group] = {"n": len(sel), "mae": float(e.mean()) if len(e) else None, "made_by_processing": int(made)}
    return out


def _insert(r: dict) -> tuple:
    """Which insert and scan a reading is of: its noise draws are not independent readings of the lesion."""
    return r["kvp"], r["kernel"], r["ha_mg_cc"], r["S"], r["arc_deg"]


def _insert_bootstrap(rs: list[dict], values: np.ndarray, n: int = 2000, seed: int = 0) -> list[float]:
    """A 95 % interval of the mean of ``values`` (one per row of ``rs``) that resamples inserts, not readings."""
    groups: dict[tuple, list[float]] = {}
    for r, v in zip(rs, values):
        groups.setdefault(_insert(r), []).append(float(v))
    sums = np.array([sum(g) for g in groups.values()])
    counts = np.array([len(g) for g in groups.values()])
    pick = np.random.default_rng(seed).integers(0, len(sums), (n, len(sums)))
    boot = sums[pick].sum(axis=1) / counts[pick].sum(axis=1)
    return [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]


def paired(rs: list[dict], first: str, second: str, white: float) -> dict:
    """How much closer to the truth image ``second`` reads than ``first``, reading by reading (negative: closer),
    with its insert-resampled 95 % interval."""
    w = f"{white:g}"
    d = np.array([abs(r[f"{second}@{w}"] - r[f"truth@{w}"]) - abs(r[f"{first}@{w}"] - r[f"truth@{w}"]) for r in rs])
    return {"delta": float(d.mean()), "ci": _insert_bootstrap(rs, d)}


# The comparisons the report pairs reading by reading: each subtraction against the default, and the learnt
# estimate against the rule it corrects.
PAIRS = (("network (default)", "subtraction, site-measured tables"),
         ("network (default)", "subtraction (rule), site-measured tables"),
         ("subtraction (rule), site-measured tables", "subtraction, site-measured tables"))

SELECTIONS = {"calcium that looks white (> lumen + 100 HU as acquired)": lambda r: r["looks_white"],
              "every insert": lambda r: True}


def _markdown(result: dict) -> str:
    names = ["original"] + list(result["configurations"])
    lines = ["# The engines on XCIST's calcified vessel inserts", "",
             f"Reproduce: `{result['command']}` ({result['minutes']:.0f} min on this machine's 2 cores). "
             f"Inputs: `{result['xcist']}/` (calcified) and `{result['free']}/` (the same phantom without calcium, "
             "`python -m dicom_node_lab.xcist_insert --densities 0 ...`: see its README). Method and limits: the "
             "module's docstring (`lab/dicom_node_lab/xcist_restore.py`).", "",
             f"{result['n']} readings: 9 inserts ({result['vessel_mm']:g} mm vessel; calcium 25/50/70 % deep over "
             f"90/180/360°) × 400 and 800 mg HA/cm³ × {' and '.join(str(k) for k in result['kvps'])} kVp × XCIST's "
             f"standard and bone kernels × {result['draws']} noise draws "
             "(the world's FBP texture and SD range for the matching kernel). Against the calcium-free scan read "
             "by the same reader (the truth image); the geometric truth beside it. Subtraction tables: what "
             "`dicom-node measure-kernel` reads from XCIST's own rods (MTF50 4.33 / 6.27 lp/cm, lift 0.30 / 0.79, "
             "the HA800 rod its automatic pick; `reports/kernel-measure/`); no tables: the default blur "
             "(5.2 lp/cm, lift 0.5) for both kernels; (rule): the white-level rule in place of the learnt estimate. "
             "Severe read: the truth image reads under 50 %, the image "
             "70 % or more; made by processing: ... where the acquired image read under 70 % (flagged: the engine "
             "marked the region unsure).", "", "Configurations, as their `[engine]` lines:", ""]
    lines += [f"- {name}: " + ("; ".join(f"`{line}`" for line in engine) or "the node's defaults")
              for name, engine in result.get("configurations", {}).items()] + [""]
    for w in WHITE_LEVELS_HU:
        for sel, summ in result["summary"][f"{w:g}"].items():
            geo = result["summary_geometry"][f"{w:g}"][sel]
            n = summ["original"]["n"]
            lines += [f"## {sel[0].upper() + sel[1:]}, white level lumen + {w:g} HU ({n} readings)", "",
                      "| image | bias vs truth image | MAE vs truth image | severe read | "
                      "made by processing (flagged) | bias vs geometry | MAE vs geometry |",
                      "|---|---:|---:|---:|---:|---:|---:|"]
            for name in names:
                t, g = summ[name], geo[name]
                made = f"{t['made_by_processing']} ({t['made_by_processing_flagged']})" if name != "original" else ""
                mae = f"{t['mae']:.1f} [{t['mae_ci'][0]:.1f}, {t['mae_ci'][1]:.1f}]"
                lines.append(f"| {name} | {t['bias']:+.1f} | {mae} | {t['made_severe']} | {made} | "
                             f"{g['bias']:+.1f} | {g['mae']:.1f} |")
            lines.append("")
            pairs = result["paired"][f"{w:g}"][sel]
            lines += ["Paired, reading by reading (change in absolute error against the truth image; negative: "
                      "closer; 95 % interval resampling inserts): "
                      + "; ".join(f"{k}: {v['delta']:+.1f} [{v['ci'][0]:+.1f}, {v['ci'][1]:+.1f}]"
                                  for k, v in pairs.items()) + ".", ""]
        flags = result.get("by_flag", {}).get(f"{w:g}")
        if flags:
            lines += ["Called sure or flagged unsure by each configuration's own flag (calcium that looks white, "
                      f"lumen + {w:g} HU; MAE against the truth image; made: severe stenoses made by processing):", "",
                      "| configuration | sure | MAE sure | made among sure | unsure | MAE unsure | no calcium found | "
                      "MAE there |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
            fmt = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
            for name, f in flags.items():
                sure, unsure, none = f["sure"], f["unsure"], f["no calcium found"]
                lines.append(f"| {name} | {sure['n']} | {fmt(sure['mae'])} | {sure['made_by_processing']} "
                             f"| {unsure['n']} | {fmt(unsure['mae'])} | {none['n']} | {fmt(none['mae'])} |")
            lines.append("")
        lines += [f"By scan, kernel, HA density and depth (MAE vs truth image, lumen + {w:g} HU; * calcium looks "
                  "white):", "", "| kernel | mg HA/cm³ | depth | n | " + " | ".join(names) + " |",
                  "|---|---:|---:|---:|" + "---:|" * len(names)]
        for key, st in result["strata"][f"{w:g}"].items():
            k, ha, depth = key.split("/")
            lines.append(f"| {k} | {ha}{'*' if st['white'] else ''} | {depth} | {st['n']} | "
                         + " | ".join(f"{st[n]:.1f}" for n in names) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def report(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    saved = args.out / "xcist-restore.json"
    before = json.loads(saved.read_text()) if args.rewrite else None
    configurations, pairs = CONFIGURATIONS, PAIRS
    if args.compare_estimate or args.compare_engine:  # beside the shipped estimate's subtraction, paired with it
        other = compared(args.compare_estimate, tuple(args.compare_engine))
        configurations, pairs = configurations + (other,), pairs + ((CONFIGURATIONS[1].name, other.name),)
    rs = before["rows"] if before else rows(args.draws, args.seed, args.model, tuple(args.kvps),
                                            xcist_dir=args.xcist, free_dir=args.free, configurations=configurations)
    names = ["original"] + [c.name for c in configurations]
    where = "" if (args.xcist, args.free) == (XCIST_DIR, FREE_DIR) else f" --xcist {args.xcist} --free {args.free}"
    kvps = "" if tuple(args.kvps) == (120, 100) else " --kvps " + " ".join(map(str, args.kvps))
    compare = (f" --compare-estimate {args.compare_estimate}" if args.compare_estimate else "") \
        + "".join(f" --compare-engine {shlex.quote(line)}" for line in args.compare_engine)
    meta = json.loads((args.xcist / "meta.json").read_text())
    command = f"python -m dicom_node_lab.xcist_restore --draws {args.draws}{where}{kvps}{compare} --out {args.out}"
    result = {"command": command,
              "xcist": str(args.xcist), "free": str(args.free), "kvps": list(args.kvps),
              "vessel_mm": 2 * float(meta["phantom"]["lumen_radius_mm"]),
              "draws": args.draws, "n": len(rs), "rows": rs,
              "configurations": {c.name: list(c.engine) for c in configurations},
              "summary": {}, "summary_geometry": {}, "strata": {}}
    for w in WHITE_LEVELS_HU:
        key = f"{w:g}"
        result["summary"][key] = {sel: {n: summary([r for r in rs if keep(r)], n, w) for n in names}
                                  for sel, keep in SELECTIONS.items()}
        result["summary_geometry"][key] = {sel: {n: summary([r for r in rs if keep(r)], n, w, "geometric")
                                                 for n in names} for sel, keep in SELECTIONS.items()}
        result.setdefault("paired", {})[key] = {
            sel: {f"{b} vs {a}": paired([r for r in rs if keep(r)], a, b, w) for a, b in pairs}
            for sel, keep in SELECTIONS.items()}
        white = [r for r in rs if r["looks_white"]]
        result.setdefault("by_flag", {})[key] = {c.name: by_flag(white, c.name, w) for c in configurations}
        table = {}
        for k in KERNELS:
            for ha in (400.0, 800.0):
                for s in STENOSES:
                    sel = [r for r in rs if r["kernel"] == k and r["ha_mg_cc"] == ha and r["S"] == s]
                    table[f"{k}/{ha:g}/{s:.0%}"] = {"n": len(sel), "white": any(r["looks_white"] for r in sel),
                                                    **{n: summary(sel, n, w)["mae"] for n in names}}
        result["strata"][key] = table
    result["minutes"] = before["minutes"] if before else (time.perf_counter() - t0) / 60
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "xcist-restore.json").write_text(json.dumps(result, indent=1))
    (args.out / "README.md").write_text(_markdown(result))
    print((args.out / "README.md").read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("reports/xcist-restore"))
    ap.add_argument("--draws", type=int, default=3, help="noise draws per insert and scan")
    ap.add_argument("--seed", type=int, default=8080)
    ap.add_argument("--model", type=Path, default=Path("engines/dense_unet.onnx"))
    ap.add_argument("--xcist", type=Path, default=XCIST_DIR, help="the calcified scans (xcist_insert --out)")
    ap.add_argument("--free", type=Path, default=FREE_DIR, help="their calcium-free twin (--densities 0)")
    ap.add_argument("--kvps", type=int, nargs="+", default=[120, 100])
    ap.add_argument("--rewrite", action="store_true", help="summarise the rows --out holds again, scan nothing")
    ap.add_argument("--compare-estimate", type=Path,
                    help="also run the recommended subtraction with this learnt estimate (.npz) for the shipped one")
    ap.add_argument("--compare-engine", action="append", default=[], metavar="LINE",
                    help="... and with this engine line (TOML, repeatable; replaces the recommended line of its key)")
    return report(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
