"""``dicom-node measure-kernel``: a kernel's MTF50 and edge lift from a phantom's round edge.

A site fills the subtraction's kernel tables from it, so it must give back a known blur (the model's own
disc, with noise), agree with an independent simulator's wire (XCIST's reconstructions in
reports/calibration/xcist), read a real scanner's phantom series, and refuse what it cannot measure.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import numpy as np
import pytest

from dicom_node import cli, config
from dicom_node.kernel_measure import (
    Circle,
    MeasureError,
    disc_profile,
    find_circles,
    kernel_tables,
    measure_series,
    measure_volume,
)
from dicom_node.pipeline.subtract import ScannerBlur

from ..conftest import REPO, SHARED_DATA

XCIST = REPO / "reports" / "calibration" / "xcist"
TOSHIBA = SHARED_DATA / "real-ct-toshiba-qrm-phantom"


def test_disc_profile_matches_the_closed_form_of_a_gaussian_blur():
    """A Gaussian-blurred disc's centre is 1 - exp(-R^2 / 2 sigma^2); its edge sits at half height; far out, 0."""
    blur = ScannerBlur(mtf50_lp_cm=4.3, edge_enhance=0.0)
    sigma = blur.core_sigma_mm()
    for radius in (0.8, 1.5, 2.5, 20.0):
        centre, edge, far = disc_profile(np.array([0.0, radius, radius + 4.0]), radius, blur)
        assert centre == pytest.approx(1.0 - math.exp(-radius ** 2 / (2 * sigma ** 2)), abs=3e-3)
        assert far == pytest.approx(0.0, abs=3e-3)
        if radius > 10:
            assert edge == pytest.approx(0.5, abs=5e-3)
    rim = np.linspace(20.2, 22.0, 19)
    assert disc_profile(rim, 20.0, ScannerBlur(mtf50_lp_cm=6.3, edge_enhance=0.8)).min() < -0.01  # the lift's dark rim
    assert disc_profile(rim, 20.0, ScannerBlur(mtf50_lp_cm=6.3, edge_enhance=0.0)).min() > -0.003  # none without it


def _rod_volume(blur: ScannerBlur, radius: float, contrast: float, noise_sd: float, seed: int,
                slices: int = 6, pixel: float = 0.4, drift_mm: float = 0.0) -> np.ndarray:
    """Slices of a rod in water drawn from the model itself (point samples of the blurred disc), with white noise;
    ``drift_mm``: how far the rod's centre moves along x from one slice to the next (a phantom not square to z)."""
    n = 128
    yy, xx = np.mgrid[0:n, 0:n] * pixel
    grid = np.linspace(0, 40, 1601)
    profile = disc_profile(grid, radius, blur)
    rng = np.random.default_rng(seed)
    out = []
    for z in range(slices):
        r = np.hypot(yy - 25.3, xx - 26.1 - drift_mm * (z - (slices - 1) / 2))
        out.append(contrast * np.interp(r, grid, profile) + rng.normal(0.0, noise_sd, r.shape))
    return np.stack(out).astype(np.float32)


@pytest.mark.parametrize("mtf50, lift", [(3.5, 0.0), (4.3, 0.3), (6.3, 0.8)])
def test_a_known_blur_is_measured_back_through_noise(mtf50, lift):
    blur = ScannerBlur(mtf50_lp_cm=mtf50, edge_enhance=lift)
    m = measure_volume(_rod_volume(blur, 5.0, 1000.0, 30.0, seed=int(10 * mtf50)), (0.6, 0.4, 0.4), kernel="B46f")
    assert m.circle.radius_mm == pytest.approx(5.0, abs=0.05)
    assert m.circle.x_mm == pytest.approx(26.1, abs=0.05) and m.circle.y_mm == pytest.approx(25.3, abs=0.05)
    assert m.mtf50_lp_cm == pytest.approx(mtf50, rel=0.02)
    assert m.edge_enhance == pytest.approx(lift, abs=0.06)
    assert m.inside_hu - m.outside_hu == pytest.approx(1000.0, rel=0.02)
    assert m.sectors == 72 and m.slices == 6 and not m.warnings
    # what a site pastes into config.toml is a valid kernel table for the subtraction
    tables = tomllib.loads("[engine]\n" + kernel_tables([m]))["engine"]
    assert tables == {"scanner_kernels": {"B46f": round(m.mtf50_lp_cm, 2)},
                      "scanner_edge_enhance": {"B46f": round(m.edge_enhance, 2)}}
    cfg = config.from_dict({"engine": tables})
    assert cfg.engine.subtract_options().for_kernel("b46f").blur.mtf50_lp_cm == round(m.mtf50_lp_cm, 2)


def test_a_rod_not_square_to_z_is_followed_slice_by_slice():
    """A phantom set down off the table's axis: the rod's centre moves 0.1 mm per slice (1 mm over 11 slices).

    Pooled around the slab's one centre, the edge smears and reads 4.5 lp/cm for 5.2; each slice's own centre
    keeps it sharp.
    """
    blur = ScannerBlur(mtf50_lp_cm=5.2, edge_enhance=0.5)
    m = measure_volume(_rod_volume(blur, 5.0, 1000.0, 20.0, seed=3, slices=11, drift_mm=0.1), (0.6, 0.4, 0.4))
    assert m.slices == 11
    assert m.mtf50_lp_cm == pytest.approx(5.2, rel=0.02)
    assert m.edge_enhance == pytest.approx(0.5, abs=0.06)


@pytest.mark.parametrize("kernel", ["standard", "bone"])
def test_xcist_rods_read_the_mtf50_of_xcists_own_wire(kernel):
    """Independent: XCIST's FBP reconstructions (0.47 mm) of 5 mm rods against the MTF50 its 0.15 mm wire gave."""
    meta = json.loads((XCIST / "meta.json").read_text())
    for scan in ("ha800_120kv", "ha400_100kv"):
        wire = meta["runs"][scan]["recon"][f"{kernel}_0.1mm"]["psf"]["mtf50_lp_per_cm_numeric_wire_corrected"]
        data = np.load(XCIST / f"{scan}_{kernel}_0p47mm.npz")
        px = float(data["pixel_mm"])
        m = measure_volume(data["image_hu"], (1.0, px, px), kernel=kernel)
        assert m.mtf50_lp_cm == pytest.approx(wire, rel=0.03), (scan, m.mtf50_lp_cm, wire)
        assert m.rms_hu < 0.01 * m.contrast_hu


def test_no_round_edge_is_refused_with_a_reason():
    flat = np.random.default_rng(0).normal(40.0, 10.0, (3, 96, 96)).astype(np.float32)
    with pytest.raises(MeasureError, match="no round edge"):
        measure_volume(flat, (1.0, 0.5, 0.5))
    with pytest.raises(ValueError):
        Circle.parse("10,20")
    with pytest.raises(ValueError, match="radius"):
        Circle(10.0, 10.0, 0.1)


def test_find_circles_ignores_the_reconstruction_circle():
    """Outside a scanner's field of view the image is padding: that circle is nobody's kernel."""
    n = 160
    yy, xx = np.mgrid[0:n, 0:n] * 0.5
    image = np.where(np.hypot(yy - 40, xx - 40) < 38, 0.0, -2048.0)
    image[np.hypot(yy - 40, xx - 40) < 4] = 900.0
    found = find_circles(image, (0.5, 0.5))
    assert found and all(c.radius_mm < 10 for c, _ in found)


@pytest.mark.skipif(not TOSHIBA.is_dir(), reason="the real CT data is not here")
def test_a_real_scanners_phantom_series_is_measured(capsys):
    """The Toshiba QRM thorax phantom (FC12, implicit VR, 3 mm slices): the heart insert's edge against the lung."""
    m = measure_series([TOSHIBA])
    assert m.kernel == "FC12"
    assert 45.0 < m.circle.radius_mm < 65.0 and m.contrast_hu > 700
    assert 2.0 < m.mtf50_lp_cm < 5.0 and 0.0 <= m.edge_enhance < 0.3  # a soft body kernel
    a, b = m.halves
    assert abs(a.mtf50_lp_cm - b.mtf50_lp_cm) < 0.03 * m.mtf50_lp_cm
    assert m.slices >= 10 and m.rms_hu < 0.02 * m.contrast_hu
    assert cli.main(["measure-kernel", str(TOSHIBA)]) == 0
    out = capsys.readouterr().out
    assert "Kernel FC12: MTF50" in out and '[engine.scanner_kernels]\n"FC12" = ' in out
    assert cli.main(["measure-kernel", str(TOSHIBA), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [m["kernel"] for m in out["series"]] == ["FC12"] and not out["problems"]
    assert tomllib.loads(out["toml"])["engine"]["scanner_kernels"]["FC12"] == round(m.mtf50_lp_cm, 2)


def test_the_cli_says_why_it_cannot_measure(tmp_path: Path, capsys):
    assert cli.main(["measure-kernel", str(tmp_path)]) == 2
    assert "measure-kernel: no CT series found" in capsys.readouterr().out
    assert cli.main(["measure-kernel", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such file or folder" in capsys.readouterr().out
