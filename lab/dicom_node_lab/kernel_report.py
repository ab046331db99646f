"""The evidence behind ``dicom-node measure-kernel``: XCIST's rods, the world's kernels, a real scanner's phantom.

Why: a site pastes what the tool measures into the subtraction's kernel tables, so the tool is checked
where the answer is known independently (XCIST's reconstructions, whose 0.15 mm wire gave the MTF50), where
it is known by construction (the world's kernels, through DICOM and at the world's noise), and on real
files (the Toshiba QRM phantom in ../shared/data, whose answer is not known but must be repeatable).

    python -m dicom_node_lab.kernel_report --out reports/kernel-measure
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from dicom_node.kernel_measure import Circle, KernelMeasurement, measure_series, measure_volume
from dicom_node_lab import kernel_phantom, physics
from dicom_node_lab.physics import Kernel

REPO = Path(__file__).resolve().parents[2]
XCIST = REPO / "reports" / "calibration" / "xcist"
TOSHIBA = REPO.parent / "shared" / "data" / "real-ct-toshiba-qrm-phantom"
XCIST_RODS = ("rod_iodinated_blood", "rod_HA400", "rod_HA800", "rod_wall_tissue")


def _row(m: KernelMeasurement, **extra) -> dict:
    return {**extra, "mtf50": m.mtf50_lp_cm, "lift": m.edge_enhance, "radius_mm": m.circle.radius_mm,
            "contrast_hu": m.contrast_hu, "rms_hu": m.rms_hu, "halves_mtf50": [h.mtf50_lp_cm for h in m.halves],
            "halves_lift": [h.edge_enhance for h in m.halves], "slices": m.slices, "sectors": m.sectors,
            "warnings": list(m.warnings)}


def xcist_rows(plots: dict) -> list[dict]:
    meta = json.loads((XCIST / "meta.json").read_text())
    rows = []
    for scan, run in meta["runs"].items():
        for kernel in ("standard", "bone"):
            wire = run["recon"][f"{kernel}_0.1mm"]["psf"]["mtf50_lp_per_cm_numeric_wire_corrected"]
            data = np.load(XCIST / f"{scan}_{kernel}_0p47mm.npz")
            px, x0, y0 = float(data["pixel_mm"]), float(data["x0_mm"]), float(data["y0_mm"])
            for rod in ("auto",) + XCIST_RODS:
                circle = None
                if rod != "auto":
                    x, y = meta["insert_centres_mm"][rod]
                    circle = Circle(x - x0, y - y0, 2.5)
                m = measure_volume(data["image_hu"], (1.0, px, px), kernel=kernel, circle=circle)
                rows.append(_row(m, source="xcist", scan=scan, kernel=kernel, edge=rod, wire_mtf50=wire))
                if scan == "ha800_120kv" and rod == "auto":
                    plots[f"XCIST {kernel} (wire {wire:.2f} lp/cm), HA800 rod"] = m.profile
    return rows


def world_rows(plots: dict, repeats: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kernel in (Kernel.SOFT, Kernel.STANDARD, Kernel.HD, Kernel.SHARP):
            model = physics.KERNELS[kernel]
            for rep in range(repeats):
                folder = kernel_phantom.write(kernel, Path(tmp) / f"{kernel.name}-{rep}", seed=1000 + rep)
                for aperture in (0.0, kernel_phantom.SPACING[1]):
                    for edge in ("auto", "-1"):
                        circle = None if edge == "auto" else kernel_phantom.rod_circle(int(edge))
                        m = measure_series([folder], circle=circle, aperture_mm=aperture)
                        rows.append(_row(m, source="world", kernel=kernel.name, repeat=rep, edge=edge,
                                         aperture_mm=aperture, nominal_mtf50=model.mtf50_lp_cm,
                                         nominal_lift=model.enhance))
                        if rep == 0 and edge == "auto" and not aperture and kernel == Kernel.SHARP:
                            plots[f"world SHARP (nominal {model.mtf50_lp_cm} lp/cm, lift {model.enhance}), "
                                  "bone rod, as a site measures it"] = m.profile
    return rows


def toshiba_rows(plots: dict) -> list[dict]:
    if not TOSHIBA.is_dir():
        return []
    m = measure_series([TOSHIBA])
    plots[f"Toshiba Aquilion ONE {m.kernel}, QRM heart insert vs lung"] = m.profile
    return [_row(m, source="toshiba", kernel=m.kernel, edge="auto", circle=[m.circle.x_mm, m.circle.y_mm])]


def figure(plots: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(plots), figsize=(4.2 * len(plots), 3.6))
    for ax, (title, (r, hu, fit)) in zip(np.atleast_1d(axes), plots.items()):
        ax.plot(r, hu, ".", ms=2.5, color="0.35", label="pixels, binned 0.05 mm")
        ax.plot(r, fit, "-", color="tab:red", lw=1.2, label="fitted disc (ScannerBlur)")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("distance from the rod's centre (mm)")
        ax.set_ylabel("HU")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=3, help="noise realisations per world kernel")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    plots: dict = {}
    rows = xcist_rows(plots) + world_rows(plots, args.repeats) + toshiba_rows(plots)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    figure(plots, args.out / "edge-profiles.png")
    for r in rows:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "warnings"},
              "WARN" if r["warnings"] else "")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
