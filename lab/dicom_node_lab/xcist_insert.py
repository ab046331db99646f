"""XCIST reference simulation of calcified coronary vessel inserts (blooming calibration).

Why this module exists
----------------------
Our fast phantom (:mod:`dicom_node_lab.phantom`) renders calcium blooming with a cheap
image-domain model. Its blur and HU scale must be calibrated against something that is
not itself: this module scans a voxelised insert phantom with XCIST, GE's open-source CT
simulator (``gecatsim``), which models the polychromatic tungsten spectrum, bowtie, focal
spot, detector aperture, view blur, a water beam-hardening correction and filtered
back-projection with clinical-like kernels. Its reconstructions are the outside reference
that the fast phantom's blooming (apparent size of calcium, HU of HA and iodine, PSF/MTF)
is calibrated against.

Installing gecatsim (not a project dependency, never add it to a pyproject)
---------------------------------------------------------------------------
The PyPI sdist ships its C build scripts with CRLF line endings, which break ``bash``::

    pip download --no-deps --no-binary :all: gecatsim==1.6.9     # or use a copy of the sdist
    tar xzf gecatsim-1.6.9.tar.gz && cd gecatsim-1.6.9
    find . -type f \\( -name 'Build*' -o -name '*.sh' -o -name 'Makefile*' -o -name 'MakeVariables*' \\
        -o -name '*.c' -o -name '*.h' -o -name '*.cpp' \\) -exec sed -i 's/\\r$//' {} +
    /work/main/.venv/bin/pip install .   # needs gcc, g++, make; builds gecatsim/lib/libcatsim.so

(``gecatsim/clib_build/BuildLinux64`` is the script that fails without the CRLF step.)

Run
---
``python -m dicom_node_lab.xcist_insert --out reports/calibration/xcist``

Phantom (all coordinates in mm, image frame: +x = increasing column, +y = increasing row)
--------------------------------------------------------------------------------------------
A 100 mm water cylinder voxelised at 0.1 mm (area fractions by 10x10 supersampling) holding
a 3x3 grid of vessels (rows = calcium depth fraction S, columns = arc A) 12 mm apart, a
calcium-free reference vessel, 5 mm rods (iodinated blood, HA at both densities, wall
tissue) and a 0.15 mm tungsten wire for the PSF. Materials are XCIST's own: ``water``,
``I`` (iodine), ``ICRU_muscle_adult`` (vessel wall) and ``W`` (wire), plus a hydroxyapatite
material file written from the stoichiometry of Ca10(PO4)6(OH)2 with XCIST's elemental
cross-sections. Mixtures are built by superposition of per-material density maps (XCIST's
voxel value scales each material's nominal density):

* iodinated blood = water at 1.00 g/cm3 + iodine at ``c_I`` mg/mL (no water displaced, as in
  XCIST's own ``water_20C_iodine_*`` materials);
* HA insert of ``c`` mg HA/cm3 = HA at ``c`` mg/cm3 (volume fraction c/3160) + water filling the
  remaining volume fraction 1 - c/3160 (HA crystal density 3.16 g/cm3).

Only the water map covers the whole cylinder; every other material's map is cropped to the
box that holds it (XCIST allows a grid per material), and the wire has its own 0.01 mm grid.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# --------------------------------------------------------------------------------------------------
# Phantom definition
# --------------------------------------------------------------------------------------------------
CYLINDER_RADIUS_MM = 50.0
LUMEN_RADIUS_MM = 1.5
WALL_MM = 0.5
GRID_SPACING_MM = 12.0
S_VALUES = (0.25, 0.50, 0.70)  # calcium depth d = S * R; grid rows (y = -12, 0, +12)
A_VALUES = (90.0, 180.0, 360.0)  # calcium arc in degrees, centred on +x; grid columns (x = -12, 0, +12)
ROD_RADIUS_MM = 2.5
WIRE_DIAMETER_MM = 0.15
REF_VESSEL_XY = (-22.0, 22.0)
WIRE_XY = (22.0, 22.0)
ROD_Y_MM = -32.0
ROD_X_MM = {"iodine": -27.0, "ha_low": -9.0, "ha_high": 9.0, "tissue": 27.0}
WATER_ROIS_XY = ((0.0, 36.0), (-36.0, 0.0), (36.0, 0.0))
WATER_ROI_RADIUS_MM = 3.0
ROD_ROI_RADIUS_MM = 1.5

HA_DENSITIES_MG_CC = (400.0, 800.0)
HA_CRYSTAL_DENSITY_G_CC = 3.16
IODINE_MG_ML = 13.0  # chosen from a pilot scan (12 mg/mL read 374-378 HU) so the lumen reads ~400 HU at 120 kVp
IODINE_ELEMENT_DENSITY_G_CC = 4.93  # density in XCIST's material file "I"
WALL_MATERIAL = "ICRU_muscle_adult"  # XCIST material, 1.05 g/cm3
WIRE_MATERIAL = "W"  # XCIST material, tungsten 19.3 g/cm3

# labels used while voxelising
_BG, _LUMEN, _WALL, _CA, _WIRE = 0, 1, 2, 3, 4

# --------------------------------------------------------------------------------------------------
# Scanner / recon settings (XCIST defaults unless noted)
# --------------------------------------------------------------------------------------------------
KERNELS = ("standard", "bone")  # XCIST has R-L, S-L, soft, standard, bone (sharpest clinical-like), none
COARSE_PIXEL_MM = 0.47
COARSE_MATRIX = 176  # FOV 82.72 mm: every insert, rod and water ROI
FINE_PIXEL_MM = 0.1
FINE_MATRIX = 512  # FOV 51.2 mm: the vessel grid, the reference vessel and the wire
BHC_EFFECTIVE_MU_PER_CM = 0.2  # water BHC target (XCIST example value); recon.mu = 0.02/mm keeps water at 0 HU


NOTES = [
    "XCIST's voxelised projector mirrors the y offset of a map that is not centred on the isocentre (seen with "
    "off-centre test rods: a map centred at +y landed at -y); _xcist_offsets passes y mirrored, and every fine recon "
    "records where the wire was found (psf.wire_centre_found_mm) against its nominal centre.",
    "Reductions, all along z where the slab does not change: 1 detector row, focal spot sampled 4x across the fan and "
    "1x along z, detector cell 3x across and 1x along z; 2 sub-views per view for the rotation blur.",
    "Noise is switched off (physics.enableQuantumNoise = enableElectronicNoise = 0): the images are noiseless; mA "
    "only states the nominal technique.",
    "Iodine 13 mg/mL was chosen from pilot scans: 12 mg/mL read 374-378 HU in the 5 mm rod at 120 kVp (250 views).",
    "Streaks: in a 1000-view pilot (HA800, 120 kVp) the background on a 2 mm ring between vessels had std 2.7 HU "
    "(bone) / 1.4 HU (standard), and 10 mm from the wire std 2.1 / 1.2 HU (extremes -14..+4 HU); calcium and the "
    "wire produce the usual faint dark beam-hardening bands between dense objects.",
    "Rod HU are ROI means (radius 1.5 mm) in 5 mm rods on the 0.47 mm recon; the fine recon's FOV (51.2 mm) does not "
    "reach the rods, so its rod entries are null.",
]


@dataclass
class Insert:
    name: str
    kind: str  # "vessel", "reference_vessel", "rod", "wire"
    x_mm: float
    y_mm: float
    material: str
    S: float | None = None
    A_deg: float | None = None
    d_mm: float | None = None
    R_mm: float | None = None
    wall_mm: float | None = None
    radius_mm: float | None = None
    ha_mg_cc: float | None = None
    grid_row: int | None = None
    grid_col: int | None = None


def layout(ha_mg_cc: float, lumen_radius_mm: float = LUMEN_RADIUS_MM) -> list[Insert]:
    """All inserts of the phantom whose vessels (and reference vessel) have lumens of ``lumen_radius_mm`` and carry
    ``ha_mg_cc`` calcium."""
    out: list[Insert] = []
    for i, s in enumerate(S_VALUES):
        for j, a in enumerate(A_VALUES):
            out.append(
                Insert(
                    name=f"vessel_S{s:.2f}_A{int(a)}",
                    kind="vessel",
                    x_mm=(j - 1) * GRID_SPACING_MM,
                    y_mm=(i - 1) * GRID_SPACING_MM,
                    material=f"lumen=iodinated water, calcium=HA {ha_mg_cc:g} mg/cc in water, wall={WALL_MATERIAL}",
                    S=s,
                    A_deg=a,
                    d_mm=s * lumen_radius_mm,
                    R_mm=lumen_radius_mm,
                    wall_mm=WALL_MM,
                    ha_mg_cc=ha_mg_cc,
                    grid_row=i,
                    grid_col=j,
                )
            )
    out.append(
        Insert(
            name="reference_vessel",
            kind="reference_vessel",
            x_mm=REF_VESSEL_XY[0],
            y_mm=REF_VESSEL_XY[1],
            material=f"lumen=iodinated water, wall={WALL_MATERIAL}",
            S=0.0,
            A_deg=0.0,
            d_mm=0.0,
            R_mm=lumen_radius_mm,
            wall_mm=WALL_MM,
        )
    )
    lo, hi = HA_DENSITIES_MG_CC
    rods = {
        "iodine": ("rod_iodinated_blood", f"water + iodine {IODINE_MG_ML:g} mg/mL", None),
        "ha_low": (f"rod_HA{lo:g}", f"HA {lo:g} mg/cc in water", lo),
        "ha_high": (f"rod_HA{hi:g}", f"HA {hi:g} mg/cc in water", hi),
        "tissue": ("rod_wall_tissue", WALL_MATERIAL, None),
    }
    for key, (name, mat, ha) in rods.items():
        out.append(
            Insert(
                name=name,
                kind="rod",
                x_mm=ROD_X_MM[key],
                y_mm=ROD_Y_MM,
                material=mat,
                radius_mm=ROD_RADIUS_MM,
                ha_mg_cc=ha,
            )
        )
    out.append(
        Insert(
            name="wire",
            kind="wire",
            x_mm=WIRE_XY[0],
            y_mm=WIRE_XY[1],
            material=f"{WIRE_MATERIAL} (tungsten 19.3 g/cm3)",
            radius_mm=WIRE_DIAMETER_MM / 2,
        )
    )
    return out


def _wrap_deg(a: np.ndarray) -> np.ndarray:
    return (a + 180.0) % 360.0 - 180.0


def _label_points(ins: Insert, dx: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label and HA density (mg/cc) of points at offsets (dx, dy) from an insert's centre."""
    r = np.hypot(dx, dy)
    lab = np.full(r.shape, -1, dtype=np.int8)  # -1: outside the insert (background water)
    ha = np.zeros(r.shape, dtype=np.float32)
    if ins.kind in ("vessel", "reference_vessel"):
        R = ins.R_mm
        lab[r <= R + ins.wall_mm] = _WALL
        lab[r <= R] = _LUMEN
        if ins.kind == "vessel":
            ang = np.degrees(np.arctan2(dy, dx))
            in_arc = np.ones(r.shape, bool) if ins.A_deg >= 360 else np.abs(_wrap_deg(ang)) <= ins.A_deg / 2
            ca = (r <= R) & (r >= R - ins.d_mm) & in_arc
            # HA 0: the calcium-free twin of the phantom (``--densities 0``), the deposit's place filled with
            # wall tissue, as plaque: what the same scanner shows without the calcium (the truth image)
            lab[ca] = _CA if ins.ha_mg_cc else _WALL
            ha[ca] = ins.ha_mg_cc
    elif ins.kind == "rod":
        inside = r <= ins.radius_mm
        if ins.ha_mg_cc:
            lab[inside] = _CA
            ha[inside] = ins.ha_mg_cc
        elif ins.name == "rod_wall_tissue":
            lab[inside] = _WALL
        else:
            lab[inside] = _LUMEN
    elif ins.kind == "wire":
        lab[r <= ins.radius_mm] = _WIRE
    return lab, ha


def _supersampled_fractions(ins: Insert, xc: np.ndarray, yc: np.ndarray, vox: float, ss: int) -> dict:
    """Area fractions of each label and HA mass (g/cc x fraction) for voxels centred at (xc[j], yc[i])."""
    off = (np.arange(ss) + 0.5) / ss * vox - vox / 2
    sx = (xc[:, None] + off[None, :]).ravel() - ins.x_mm
    sy = (yc[:, None] + off[None, :]).ravel() - ins.y_mm
    DX, DY = np.meshgrid(sx, sy)
    lab, ha = _label_points(ins, DX, DY)
    ny, nx = len(yc), len(xc)

    def block_mean(a: np.ndarray) -> np.ndarray:
        return a.reshape(ny, ss, nx, ss).mean(axis=(1, 3))

    out = {k: block_mean((lab == k).astype(np.float32)) for k in (_LUMEN, _WALL, _CA, _WIRE)}
    out["ha_g_cc"] = block_mean(ha) / 1000.0
    return out


def _crop(a: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float, float]:
    nz_r = np.flatnonzero(a.any(axis=1))
    nz_c = np.flatnonzero(a.any(axis=0))
    r0, r1 = max(nz_r[0] - 1, 0), min(nz_r[-1] + 2, a.shape[0])
    c0, c1 = max(nz_c[0] - 1, 0), min(nz_c[-1] + 2, a.shape[1])
    return np.ascontiguousarray(a[r0:r1, c0:c1]), float(x[c0]), float(y[r0])


def _xcist_offsets(x0: float, y0: float, shape: tuple[int, int], vox: float) -> tuple[float, float]:
    """XCIST ``x_offset``/``y_offset`` of a map whose first voxel centre is at (x0, y0) mm.

    The offsets are the 1-based index coordinates of the isocentre. Phantom_Voxelized turns them into
    ``((dims + 1) / 2 - offset) * voxel`` (the map centre's position); the C projector places x as given but y
    mirrored (checked with off-centre test objects: a map centred at +y lands at -y), so y is passed mirrored
    here. A map centred on the isocentre is unaffected.
    """
    rows, cols = shape
    xc = x0 + (cols - 1) / 2 * vox
    yc = y0 + (rows - 1) / 2 * vox
    return (cols + 1) / 2 - xc / vox, (rows + 1) / 2 + yc / vox


def build_phantom(workdir: Path, ha_mg_cc: float, vox: float = 0.1, ss: int = 10,
                  lumen_radius_mm: float = LUMEN_RADIUS_MM) -> dict:
    """Write the XCIST voxelised phantom (json + raw maps) for one HA density; return its description."""
    workdir.mkdir(parents=True, exist_ok=True)
    ha_file = write_ha_material(workdir)
    n = int(math.ceil((2 * CYLINDER_RADIUS_MM + 1.0) / vox))
    c = (np.arange(n) - (n - 1) / 2) * vox  # voxel centres, same for x (columns) and y (rows)

    # water cylinder with area-fraction edges (4x4 supersampling, row chunks)
    f_cyl = np.zeros((n, n), np.float32)
    off4 = (np.arange(4) + 0.5) / 4 * vox - vox / 2
    sx = (c[:, None] + off4[None, :]).ravel()
    for r0 in range(0, n, 64):
        rows = c[r0 : r0 + 64]
        sy = (rows[:, None] + off4[None, :]).ravel()
        inside = (sx[None, :] ** 2 + sy[:, None] ** 2) <= CYLINDER_RADIUS_MM**2
        f_cyl[r0 : r0 + len(rows)] = inside.reshape(len(rows), 4, n, 4).mean(axis=(1, 3))

    frac = {k: np.zeros((n, n), np.float32) for k in (_LUMEN, _WALL, _CA, _WIRE)}
    ha_g = np.zeros((n, n), np.float32)
    inserts = layout(ha_mg_cc, lumen_radius_mm)
    for ins in inserts:
        ext = (ins.R_mm + ins.wall_mm) if ins.kind in ("vessel", "reference_vessel") else ins.radius_mm
        ix = np.flatnonzero(np.abs(c - ins.x_mm) <= ext + vox)
        iy = np.flatnonzero(np.abs(c - ins.y_mm) <= ext + vox)
        f = _supersampled_fractions(ins, c[ix], c[iy], vox, ss)
        sl = np.ix_(iy, ix)
        for k in frac:
            frac[k][sl] += f[k]
        ha_g[sl] += f["ha_g_cc"]
    occupied = frac[_LUMEN] + frac[_WALL] + frac[_CA] + frac[_WIRE]
    if np.any(occupied > 1.0 + 1e-5):
        raise RuntimeError("inserts overlap")
    ha_vol = ha_g / HA_CRYSTAL_DENSITY_G_CC
    maps = {
        "water": f_cyl - occupied + frac[_LUMEN] + frac[_CA] - ha_vol,
        "I": frac[_LUMEN] * (IODINE_MG_ML / 1000.0) / IODINE_ELEMENT_DENSITY_G_CC,
        "HA": ha_vol,
        WALL_MATERIAL: frac[_WALL],
    }
    mats, files, dims, offs, sizes = [], [], [], [], []
    for name, m in maps.items():
        if name == "water":
            arr, x0, y0 = np.ascontiguousarray(m.astype(np.float32)), float(c[0]), float(c[0])
        else:
            arr, x0, y0 = _crop(m.astype(np.float32), c, c)
        fname = f"ph_ha{ha_mg_cc:g}_{name}.raw"
        arr.tofile(workdir / fname)
        mats.append(str(ha_file) if name == "HA" else name)
        files.append(fname)
        dims.append((arr.shape[1], arr.shape[0]))
        offs.append(_xcist_offsets(x0, y0, arr.shape, vox))
        sizes.append(vox)

    # tungsten wire on its own 0.01 mm grid
    wv = 0.01
    wire = next(i for i in inserts if i.kind == "wire")
    nw = int(math.ceil((2 * wire.radius_mm + 4 * wv) / wv))
    cw = (np.arange(nw) - (nw - 1) / 2) * wv
    fw = _supersampled_fractions(wire, cw + wire.x_mm, cw + wire.y_mm, wv, 4)[_WIRE].astype(np.float32)
    fw.tofile(workdir / f"ph_ha{ha_mg_cc:g}_W.raw")
    mats.append(WIRE_MATERIAL)
    files.append(f"ph_ha{ha_mg_cc:g}_W.raw")
    dims.append((nw, nw))
    offs.append(_xcist_offsets(cw[0] + wire.x_mm, cw[0] + wire.y_mm, fw.shape, wv))
    sizes.append(wv)

    nm = len(mats)
    vp = {
        "n_materials": nm,
        "mat_name": mats,
        "volumefractionmap_filename": files,
        "volumefractionmap_datatype": ["float"] * nm,
        "cols": [d[0] for d in dims],
        "rows": [d[1] for d in dims],
        "slices": [1] * nm,
        "x_size": sizes,
        "y_size": sizes,
        "z_size": [10.0] * nm,  # one 10 mm thick z-invariant slab
        "x_offset": [o[0] for o in offs],
        "y_offset": [o[1] for o in offs],
        "z_offset": [1.0] * nm,
    }
    json_path = workdir / f"ph_ha{ha_mg_cc:g}.json"
    json_path.write_text(json.dumps(vp, indent=1))
    return {
        "json": str(json_path),
        "voxel_mm": vox,
        "grid": n,
        "wire_voxel_mm": wv,
        "materials": [Path(m).name for m in mats],
        "map_shapes_rows_cols": {Path(m).name: [d[1], d[0]] for m, d in zip(mats, dims)},
        "inserts": inserts,
    }


_ATOMIC_MASS = {1: 1.008, 8: 15.999, 15: 30.974, 20: 40.078}


def ha_mass_fractions() -> dict[int, float]:
    """Mass fractions of Ca10(PO4)6(OH)2 by atomic number."""
    counts = {20: 10, 15: 6, 8: 26, 1: 2}
    tot = sum(_ATOMIC_MASS[z] * k for z, k in counts.items())
    return {z: _ATOMIC_MASS[z] * k / tot for z, k in counts.items()}


def write_ha_material(workdir: Path) -> Path:
    """XCIST material file for pure hydroxyapatite (density 3.16 g/cm3)."""
    mf = ha_mass_fractions()
    names = {20: "calcium", 15: "phosphorus", 8: "oxygen", 1: "hydrogen"}
    lines = [
        "# Material name:",
        "# hydroxyapatite Ca10(PO4)6(OH)2 (written by dicom_node_lab.xcist_insert)",
        "",
        "# Number of elements:",
        str(len(mf)),
        "",
        "# Density:",
        f"{HA_CRYSTAL_DENSITY_G_CC:.6f}",
        "",
        "# Atomic number(s) and corresponding mass fraction(s):",
    ]
    lines += [f"{z}    {f:.6f}    # {names[z]}" for z, f in mf.items()]
    path = workdir / "hydroxyapatite"
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------------------------------
# Scan and recon
# --------------------------------------------------------------------------------------------------
def make_scan(phantom_json: str, results_name: str, kvp: int, views: int):
    """A configured ``gecatsim.CatSim`` for a noiseless axial 360-degree scan of the phantom."""
    import gecatsim as xc  # lazy: gecatsim is an optional, manually installed tool

    ct = xc.CatSim()  # XCIST defaults: Scanner/Protocol/Physics/Recon_Default.cfg
    ct.resultsName = results_name
    ct.phantom.callback = "Phantom_Voxelized"
    ct.phantom.projectorCallback = "C_Projector_Voxelized"
    ct.phantom.filename = phantom_json
    ct.phantom.centerOffset = [0.0, 0.0, 0.0]
    ct.phantom.scale = 1.0
    # z-invariant object: one detector row is enough (recon duplicates it)
    ct.scanner.detectorRowsPerMod = 1
    ct.scanner.detectorRowCount = 1
    ct.protocol.viewsPerRotation = views
    ct.protocol.viewCount = views
    ct.protocol.startViewId = 0
    ct.protocol.stopViewId = views - 1
    ct.protocol.spectrumFilename = f"tungsten_tar7.0_{kvp}_filt.dat"
    # noiseless: blooming, not noise, is measured
    ct.physics.enableQuantumNoise = 0
    ct.physics.enableElectronicNoise = 0
    # sampling: focal spot across the fan 4 points (Gaussian weights), along z 1 (z-invariant object);
    # detector cell 3 samples across, 1 along z; 2 sub-views per view for the gantry motion blur
    ct.physics.srcXSampleCount = 4
    ct.physics.srcYSampleCount = 1
    ct.physics.colSampleCount = 3
    ct.physics.rowSampleCount = 1
    ct.physics.viewSampleCount = 2
    # water beam-hardening correction, as clinical scanners do
    ct.physics.callback_post_log = "Prep_BHC_Accurate"
    ct.physics.EffectiveMu = BHC_EFFECTIVE_MU_PER_CM
    ct.physics.BHC_poly_order = 5
    ct.physics.BHC_max_length_mm = 200
    ct.physics.BHC_length_step_mm = 10
    ct.recon.mu = BHC_EFFECTIVE_MU_PER_CM / 10.0
    ct.recon.unit = "HU"
    ct.recon.huOffset = -1000
    return ct


def scanner_settings(ct, kvp: int) -> dict:
    s, p, ph = ct.scanner, ct.protocol, ct.physics
    mag = s.sid / s.sdd
    return {
        "kVp": kvp,
        "spectrum_file": Path(p.spectrumFilename).name,
        "flat_filter": list(p.flatFilter),
        "bowtie": p.bowtie,
        "mA": p.mA,
        "rotation_time_s": p.rotationTime,
        "mAs_per_rotation": p.mA * p.rotationTime,
        "noise": "off (quantum and electronic noise disabled: noiseless projections)",
        "views_per_rotation": p.viewsPerRotation,
        "scan": "axial, one full 360-degree rotation, no table motion",
        "sid_mm": s.sid,
        "sdd_mm": s.sdd,
        "detector": s.detectorCallback,
        "detector_columns": s.detectorColCount,
        "detector_rows": s.detectorRowCount,
        "detector_cell_mm": [s.detectorColSize, s.detectorRowSize],
        "detector_cell_at_iso_mm": [s.detectorColSize * mag, s.detectorRowSize * mag],
        "detector_fill_fraction": [s.detectorColFillFraction, s.detectorRowFillFraction],
        "detector_col_offset_cells": s.detectorColOffset,
        "detector_material": f"{s.detectorMaterial} {s.detectorDepth} mm",
        "focal_spot": {
            "shape": s.focalspotShape,
            "width_mm": s.focalspotWidth,
            "length_mm": s.focalspotLength,
            "defined_at_fraction_of_max": [s.focalspotWidthThreshold, s.focalspotLengthThreshold],
            "target_angle_deg": s.targetAngle,
        },
        "sampling": {
            "energy_bins": ph.energyCount,
            "focal_spot_samples_xz": [ph.srcXSampleCount, ph.srcYSampleCount],
            "detector_samples_col_row": [ph.colSampleCount, ph.rowSampleCount],
            "subviews_per_view": ph.viewSampleCount,
        },
        "prep": "log, XCIST low-signal correction, water BHC (Prep_BHC_Accurate, 5th order, 0-200 mm water, "
        f"target mu {BHC_EFFECTIVE_MU_PER_CM}/cm)",
        "hu_scale": f"HU = 1000 * mu / {BHC_EFFECTIVE_MU_PER_CM / 10:g} per mm - 1000",
    }


def reconstruct(ct, kernel: str, pixel_mm: float, matrix: int) -> np.ndarray:
    """FBP (XCIST fdk_equiAngle) of the central slice, HU, indexed [row=y, col=x]."""
    import gecatsim.reconstruction.pyfiles.recon as xrecon

    ct.recon.reconType = "fdk_equiAngle"
    ct.recon.kernelType = kernel
    ct.recon.fov = pixel_mm * matrix
    ct.recon.imageSize = matrix
    ct.recon.sliceCount = 1
    ct.recon.sliceThickness = 0.568
    ct.recon.centerOffset = [0.0, 0.0, 0.0]
    ct.recon.startAngle = 0
    ct.do_Recon = 1
    cfg = ct.get_current_cfg()
    vol = xrecon.recon_direct(cfg)  # [rows, cols, slices]
    return np.ascontiguousarray(vol[:, :, vol.shape[2] // 2], dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------
def image_origin(pixel_mm: float, matrix: int) -> float:
    """Coordinate (mm) of pixel 0's centre, for both x (columns) and y (rows)."""
    return -(matrix - 1) / 2 * pixel_mm


def _coords(img: np.ndarray, pixel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    o = image_origin(pixel_mm, img.shape[0])
    x = o + np.arange(img.shape[1]) * pixel_mm
    y = o + np.arange(img.shape[0]) * pixel_mm
    return np.meshgrid(x, y)


def roi_stats(img: np.ndarray, pixel_mm: float, x: float, y: float, r: float) -> dict:
    X, Y = _coords(img, pixel_mm)
    m = (X - x) ** 2 + (Y - y) ** 2 <= r**2
    if not m.any():
        return {"mean": None, "std": None, "n": 0}
    v = img[m]
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(m.sum())}


def _bessel_j1(x: np.ndarray) -> np.ndarray:
    from scipy.special import j1

    return j1(x)


def psf_metrics(img: np.ndarray, pixel_mm: float, x: float, y: float) -> dict:
    """PSF of the wire: FWHM (Gaussian fit, radial half-max) and MTF50 (Gaussian, numeric)."""
    from scipy.optimize import curve_fit

    X, Y = _coords(img, pixel_mm)
    # centre: intensity-weighted centroid of the top of the peak
    near = (X - x) ** 2 + (Y - y) ** 2 <= 1.0
    vals = np.where(near, img, -np.inf)
    pk = np.unravel_index(np.argmax(vals), img.shape)
    xp, yp = X[pk], Y[pk]
    r_bg = np.hypot(X - xp, Y - yp)
    bg = float(np.median(img[(r_bg >= 2.5) & (r_bg <= 3.0)]))
    top = (r_bg <= 0.4) & (img - bg > 0.5 * (img[pk] - bg))
    w = img[top] - bg
    xc, yc = float((X[top] * w).sum() / w.sum()), float((Y[top] * w).sum() / w.sum())
    r = np.hypot(X - xc, Y - yc)

    # radial profile (0.05 mm bins) and its half-maximum radius
    sel = r <= 3.0
    edges = np.arange(0, 3.0 + 0.05, 0.05)
    idx = np.digitize(r[sel], edges) - 1
    prof = np.array([(img[sel][idx == k] - bg).mean() if np.any(idx == k) else np.nan for k in range(len(edges) - 1)])
    rc = (edges[:-1] + edges[1:]) / 2
    peak = float(img[pk] - bg)
    below = np.flatnonzero(prof < 0.5 * peak)
    k = int(below[0]) if len(below) else 0
    hm_r = float(np.interp(0.5 * peak, [prof[k], prof[k - 1]], [rc[k], rc[k - 1]])) if k > 0 else float("nan")

    # 2D Gaussian fit over the main lobe (r <= 1.0 mm)
    fit = r <= 1.0

    def g2(xy, a, x0, y0, s, b):
        return a * np.exp(-((xy[0] - x0) ** 2 + (xy[1] - y0) ** 2) / (2 * s * s)) + b

    p0 = (peak, xc, yc, 0.3, bg)
    lo = (0.0, xc - 0.5, yc - 0.5, 0.02, bg - abs(peak))
    hi = (10 * abs(peak) + 1, xc + 0.5, yc + 0.5, 2.0, bg + abs(peak))
    popt, _ = curve_fit(g2, (X[fit], Y[fit]), img[fit], p0=p0, bounds=(lo, hi), maxfev=20000)
    sigma = abs(float(popt[3]))
    fwhm_g = 2 * math.sqrt(2 * math.log(2)) * sigma
    mtf50_gauss = math.sqrt(math.log(2) / (2 * math.pi**2 * sigma**2))  # cycles/mm

    # numeric MTF: 2D Fourier transform (DTFT) of the background-subtracted PSF patch, averaged over directions
    patch = r <= 3.0
    pv = (img[patch] - bg).astype(np.float64)
    px, py = X[patch] - xc, Y[patch] - yc
    f = np.linspace(0, 2.5, 501)  # cycles/mm
    mtf = np.zeros_like(f)
    angles = np.radians(np.arange(0, 180, 15))
    for th in angles:
        proj = px * np.cos(th) + py * np.sin(th)
        mtf += np.abs(np.exp(-2j * np.pi * np.outer(f, proj)) @ pv)
    mtf /= len(angles)
    mtf /= mtf[0]
    wire = np.pi * WIRE_DIAMETER_MM * f
    disc = np.ones_like(f)
    disc[1:] = 2 * _bessel_j1(wire[1:]) / wire[1:]
    mtf_corr = mtf / disc

    def crossing(m: np.ndarray) -> float:
        below = np.flatnonzero((m < 0.5) & (np.arange(len(m)) > np.argmax(m)))
        if len(below) == 0:
            return float("nan")
        i = below[0]
        return float(np.interp(0.5, [m[i], m[i - 1]], [f[i], f[i - 1]]))

    return {
        "wire_centre_found_mm": [xc, yc],
        "wire_centre_nominal_mm": [x, y],
        "peak_above_background_HU": peak,
        "background_HU": bg,
        "fwhm_mm_gaussian_fit": fwhm_g,
        "gaussian_sigma_mm": sigma,
        "fwhm_mm_radial_half_max": 2 * hm_r,
        "mtf50_lp_per_cm_gaussian": 10 * mtf50_gauss,
        "mtf50_lp_per_cm_numeric": 10 * crossing(mtf),
        "mtf50_lp_per_cm_numeric_wire_corrected": 10 * crossing(mtf_corr),
        "mtf_max_numeric": float(mtf.max()),
        "mtf10_lp_per_cm_numeric": 10
        * float(np.interp(0.1, mtf[::-1], f[::-1]) if np.any(mtf < 0.1) else float("nan")),
        "method": "Gaussian fit: 2D Gaussian + constant over r <= 1 mm; radial: azimuthal mean in 0.05 mm bins minus "
        "the median of the 2.5-3 mm annulus, twice the half-maximum radius; numeric MTF: |2D Fourier transform| "
        "of the background-subtracted PSF within r <= 3 mm, mean over 12 directions, normalised at f=0; "
        f"wire-corrected divides by the transform of a {WIRE_DIAMETER_MM} mm disc",
    }


def measure(img: np.ndarray, pixel_mm: float, inserts: list[Insert]) -> dict:
    out: dict = {"rods": {}, "water": {}}
    for ins in inserts:
        if ins.kind == "rod":
            out["rods"][ins.name] = roi_stats(img, pixel_mm, ins.x_mm, ins.y_mm, ROD_ROI_RADIUS_MM)
        if ins.kind == "reference_vessel":
            out["reference_vessel_lumen_centre_r0.5mm"] = roi_stats(img, pixel_mm, ins.x_mm, ins.y_mm, 0.5)
    ws = [roi_stats(img, pixel_mm, x, y, WATER_ROI_RADIUS_MM) for x, y in WATER_ROIS_XY]
    for (x, y), s in zip(WATER_ROIS_XY, ws):
        out["water"][f"({x:g},{y:g})"] = s
    means = [s["mean"] for s in ws if s["mean"] is not None]
    out["water_mean"] = float(np.mean(means)) if means else None
    return out


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------
def _tag(ha: float, kvp: int, kernel: str, pixel_mm: float) -> str:
    return f"ha{ha:g}_{kvp}kv_{kernel}_{pixel_mm:g}mm".replace(".", "p")


def run(out: Path, work: Path, densities, kvps, views: int, voxel: float,
        lumen_radius_mm: float = LUMEN_RADIUS_MM) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    meta: dict = {
        "purpose": "XCIST (gecatsim) reference scans of calcified coronary vessel inserts; the fast phantom's "
        "blooming is calibrated against these",
        "command": "python -m dicom_node_lab.xcist_insert " + " ".join(sys.argv[1:]),
        "gecatsim_version": _gecatsim_version(),
        "python": platform.python_version(),
        "image_frame": "npz 'image_hu'[row, col]; x_mm = x0_mm + col * pixel_mm, y_mm = y0_mm + row * pixel_mm; "
        "the phantom frame equals the image frame (+x = increasing column, +y = increasing row); arc angle 0 = +x",
        "phantom": {
            "cylinder": f"water, diameter {2 * CYLINDER_RADIUS_MM:g} mm, z-invariant",
            "voxel_mm": voxel,
            "supersampling": "area fractions from 10x10 sub-samples per voxel (4x4 at the cylinder edge); "
            "wire on a 0.01 mm grid with 4x4 sub-samples",
            "grid": "rows = S (y = -12, 0, +12 mm for S = 0.25, 0.50, 0.70), columns = A (x = -12, 0, +12 mm for "
            "A = 90, 180, 360 deg)",
            "lumen_radius_mm": lumen_radius_mm,
            "wall_mm": WALL_MM,
            "calcium_shell": "R - d <= r <= R within |angle| <= A/2 around +x; lumen elsewhere inside R",
            "iodine_mg_per_ml": IODINE_MG_ML,
            "lumen_material": f"XCIST 'water' (1.00 g/cm3) + XCIST 'I' at {IODINE_MG_ML:g} mg/mL (no displacement)",
            "ha_material": {
                "file": "custom XCIST material 'hydroxyapatite' Ca10(PO4)6(OH)2, "
                f"density {HA_CRYSTAL_DENSITY_G_CC} g/cm3, mass fractions "
                + ", ".join(f"Z{z}={f:.5f}" for z, f in ha_mass_fractions().items()),
                "mixture": "c mg HA/cm3 = HA volume fraction c/3160 + XCIST 'water' volume fraction 1 - c/3160",
                "densities_mg_per_cc": list(densities),
            },
            "wall_material": f"XCIST '{WALL_MATERIAL}' (1.05 g/cm3)",
            "wire": f"XCIST '{WIRE_MATERIAL}', diameter {WIRE_DIAMETER_MM} mm",
            "roi_radii_mm": {"rods": ROD_ROI_RADIUS_MM, "water": WATER_ROI_RADIUS_MM, "reference_lumen": 0.5},
        },
        "recon": {
            "algorithm": "XCIST fdk_equiAngle (fan-beam FBP, single row duplicated), central slice",
            "kernels": list(KERNELS),
            "kernels_available_in_xcist": ["R-L", "S-L", "soft", "standard", "bone", "none"],
            "sharpest_clinical_kernel": "bone",
            "coarse": {"pixel_mm": COARSE_PIXEL_MM, "matrix": COARSE_MATRIX, "fov_mm": COARSE_PIXEL_MM * COARSE_MATRIX},
            "fine": {"pixel_mm": FINE_PIXEL_MM, "matrix": FINE_MATRIX, "fov_mm": FINE_PIXEL_MM * FINE_MATRIX},
        },
        "insert_centres_mm": {i.name: [i.x_mm, i.y_mm] for i in layout(densities[0], lumen_radius_mm)},
        "notes": NOTES,
        "phantoms": {},
        "runs": {},
        "files": {},
    }
    t_all = time.time()
    for ha in densities:
        t0 = time.time()
        ph = build_phantom(work / f"ha{ha:g}", ha, vox=voxel, lumen_radius_mm=lumen_radius_mm)
        inserts = ph.pop("inserts")
        ph["build_s"] = round(time.time() - t0, 1)
        ph.pop("json")
        meta["phantoms"][f"ha{ha:g}"] = {**ph, "inserts": [asdict(i) for i in inserts]}
        for kvp in kvps:
            key = f"ha{ha:g}_{kvp}kv"
            print(f"[xcist_insert] {key}: simulating {views} views ...", flush=True)
            ct = make_scan(str(work / f"ha{ha:g}" / f"ph_ha{ha:g}.json"), str(work / key), kvp, views)
            t0 = time.time()
            ct.run_all()
            t_sim = time.time() - t0
            run_meta = {"scanner": scanner_settings(ct, kvp), "sim_s": round(t_sim, 1), "recon": {}}
            for kernel in KERNELS:
                for pixel_mm, matrix in ((COARSE_PIXEL_MM, COARSE_MATRIX), (FINE_PIXEL_MM, FINE_MATRIX)):
                    t0 = time.time()
                    img = reconstruct(ct, kernel, pixel_mm, matrix)
                    t_rec = time.time() - t0
                    tag = _tag(ha, kvp, kernel, pixel_mm)
                    o = image_origin(pixel_mm, matrix)
                    np.savez_compressed(
                        out / f"{tag}.npz",
                        image_hu=img,
                        pixel_mm=np.float32(pixel_mm),
                        x0_mm=np.float32(o),
                        y0_mm=np.float32(o),
                        kvp=np.int32(kvp),
                        ha_mg_cc=np.float32(ha),
                        kernel=np.array(kernel),
                    )
                    m = measure(img, pixel_mm, inserts)
                    if pixel_mm == FINE_PIXEL_MM:
                        m["psf"] = psf_metrics(img, pixel_mm, *WIRE_XY)
                    m["recon_s"] = round(t_rec, 1)
                    m["fov_mm"] = pixel_mm * matrix
                    m["matrix"] = matrix
                    run_meta["recon"][f"{kernel}_{pixel_mm:g}mm"] = m
                    meta["files"][f"{tag}.npz"] = {
                        "ha_mg_cc": ha,
                        "kVp": kvp,
                        "kernel": kernel,
                        "pixel_mm": pixel_mm,
                        "matrix": matrix,
                        "x0_mm": o,
                        "y0_mm": o,
                    }
                    print(f"[xcist_insert]   {tag}: recon {t_rec:.1f} s", flush=True)
            run_meta["total_s"] = round(t_sim + sum(v["recon_s"] for v in run_meta["recon"].values()), 1)
            meta["runs"][key] = run_meta
            (out / "meta.json").write_text(json.dumps(meta, indent=1))
            for ext in (".air", ".offset", ".scan", ".prep"):
                p = Path(str(work / key) + ext)
                if p.exists():
                    p.unlink()
    meta["wall_clock_total_s"] = round(time.time() - t_all, 1)
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    (out / "README.md").write_text(readme(meta))
    return meta


def _gecatsim_version() -> str:
    try:
        from importlib.metadata import version

        return version("gecatsim")
    except Exception:  # noqa: BLE001 - metadata missing is not fatal
        return "unknown"


def _fmt(v, nd=0) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def readme(meta: dict) -> str:
    lines = [
        "# XCIST calcified-vessel insert scans",
        "",
        "Reference CT reconstructions from XCIST (gecatsim "
        f"{meta['gecatsim_version']}) that the fast phantom's blooming is calibrated against.",
        "Made by `lab/dicom_node_lab/xcist_insert.py` (its docstring says how to install gecatsim):",
        "",
        "```",
        meta["command"],
        "```",
        "",
        "## Files",
        "",
        "- `ha<density>_<kVp>kv_<kernel>_<pixel>mm.npz`: `image_hu` (float32 HU, `[row, col]`, central slice),",
        "  `pixel_mm`, `x0_mm`/`y0_mm` (coordinates of pixel [0, 0]'s centre): `col = (x - x0_mm) / pixel_mm`,",
        "  `row = (y - y0_mm) / pixel_mm`; also `kvp`, `ha_mg_cc`, `kernel`.",
        "- `meta.json`: insert centres (mm, image frame) with S, A, d, R, wall and materials, material recipes,",
        "  iodine concentration, scanner/protocol/recon settings, ROI HU, wire PSF/MTF and run times.",
        "",
        "## Phantom",
        "",
        f"- {meta['phantom']['cylinder']}, voxel {meta['phantom']['voxel_mm']} mm; {meta['phantom']['grid']}.",
        f"- Lumen R = {meta['phantom']['lumen_radius_mm']} mm: {meta['phantom']['lumen_material']}; wall {WALL_MM} mm "
        f"{meta['phantom']['wall_material']}.",
        f"- HA: {meta['phantom']['ha_material']['mixture']}; {meta['phantom']['ha_material']['file']}.",
        f"- Wire: {meta['phantom']['wire']}; rods 5 mm (iodinated blood, HA low/high, wall tissue).",
        "",
        "## Measured HU (coarse 0.47 mm recon, ROI radius 1.5 mm in 5 mm rods; water: 3 ROIs of radius 3 mm)",
        "",
        "| scan | kernel | lumen (iodine rod) | HA400 rod | HA800 rod | wall tissue rod | water | ref. lumen centre |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, run_meta in meta["runs"].items():
        for kernel in KERNELS:
            m = run_meta["recon"].get(f"{kernel}_{COARSE_PIXEL_MM:g}mm")
            if not m:
                continue
            rods = m["rods"]

            def rm(name, rods=rods):
                return _fmt(rods.get(name, {}).get("mean"), 1)

            ref = m.get("reference_vessel_lumen_centre_r0.5mm", {}).get("mean")
            lines.append(
                f"| {key} | {kernel} | {rm('rod_iodinated_blood')} | {rm('rod_HA400')} | {rm('rod_HA800')} | "
                f"{rm('rod_wall_tissue')} | {_fmt(m['water_mean'], 1)} | {_fmt(ref, 1)} |"
            )
    lines += [
        "",
        "## Wire PSF (fine 0.1 mm recon)",
        "",
        "| scan | kernel | FWHM Gaussian fit (mm) | FWHM radial half-max (mm) | MTF50 numeric (lp/cm) | "
        "MTF50 from Gaussian (lp/cm) | MTF max |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, run_meta in meta["runs"].items():
        for kernel in KERNELS:
            m = run_meta["recon"].get(f"{kernel}_{FINE_PIXEL_MM:g}mm")
            if not m or "psf" not in m:
                continue
            p = m["psf"]
            lines.append(
                f"| {key} | {kernel} | {_fmt(p['fwhm_mm_gaussian_fit'], 3)} | "
                f"{_fmt(p['fwhm_mm_radial_half_max'], 3)} | "
                f"{_fmt(p['mtf50_lp_per_cm_numeric'], 2)} | {_fmt(p['mtf50_lp_per_cm_gaussian'], 2)} | "
                f"{_fmt(p['mtf_max_numeric'], 2)} |"
            )
    lines += ["", "## Run times (s)", "", "| scan | simulation | all recons | total |", "|---|---|---|---|"]
    for key, run_meta in meta["runs"].items():
        rec = sum(v["recon_s"] for v in run_meta["recon"].values())
        lines.append(f"| {key} | {run_meta['sim_s']:.0f} | {rec:.0f} | {run_meta['total_s']:.0f} |")
    if "notes" in meta:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in meta["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("reports/calibration/xcist"))
    ap.add_argument("--work", type=Path, default=None, help="scratch folder for XCIST's raw files (default: temp)")
    ap.add_argument("--densities", type=float, nargs="+", default=list(HA_DENSITIES_MG_CC))
    ap.add_argument("--kvps", type=int, nargs="+", default=[120, 100])
    ap.add_argument("--views", type=int, default=1000)
    ap.add_argument("--voxel", type=float, default=0.1)
    ap.add_argument("--lumen-radius", type=float, default=LUMEN_RADIUS_MM,
                    help="the vessels' lumen radius (mm; the calcium's depth is a share of it)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        import gecatsim  # noqa: F401
    except ImportError:
        print("gecatsim is not installed; see this module's docstring", file=sys.stderr)
        return 2
    if args.work is None:
        with tempfile.TemporaryDirectory(prefix="xcist_insert_") as tmp:
            run(args.out, Path(tmp), args.densities, args.kvps, args.views, args.voxel, args.lumen_radius)
    else:
        run(args.out, args.work, args.densities, args.kvps, args.views, args.voxel, args.lumen_radius)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
