"""The world's kernels, scanned in a commissioning phantom and written as DICOM, are measured back.

``dicom-node measure-kernel`` reads a site's kernel tables from a phantom; here the scanner is the world,
whose kernels are known (physics.KERNELS), at the world's noise and through the DICOM path a site uses.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.kernel_measure import measure_series
from dicom_node_lab import kernel_phantom, physics
from dicom_node_lab.physics import Kernel


@pytest.mark.parametrize("kernel", [Kernel.STANDARD, Kernel.SHARP])
def test_the_worlds_kernel_is_measured_back_from_its_phantom_series(tmp_path: Path, kernel):
    folder = kernel_phantom.write(kernel, tmp_path / kernel.name, seed=5)
    model = physics.KERNELS[kernel]
    # The world draws objects by their pixels' area shares: counted as such, the kernel itself reads back.
    m = measure_series([folder], aperture_mm=kernel_phantom.SPACING[1])
    assert m.kernel == kernel.name
    assert m.mtf50_lp_cm == pytest.approx(model.mtf50_lp_cm, rel=0.03)
    assert m.edge_enhance == pytest.approx(model.enhance, abs=0.1)
    # The tool's own choice is a rod in water, not the water-air edge whose air the stored range clips at -1024.
    assert m.circle.radius_mm < 10 and not m.warnings
    # As a site runs it (no aperture): the pixel shares read a few per cent softer, never sharper.
    site = measure_series([folder])
    assert 0.9 * model.mtf50_lp_cm < site.mtf50_lp_cm < model.mtf50_lp_cm


def test_a_clipped_dark_side_is_named(tmp_path: Path):
    folder = kernel_phantom.write(Kernel.SHARP, tmp_path / "sharp", seed=6)
    m = measure_series([folder], circle=kernel_phantom.rod_circle(-1), aperture_mm=kernel_phantom.SPACING[1])
    assert any("clips the dark side" in w for w in m.warnings)


def test_one_phantom_scan_with_several_kernels_gives_the_whole_table(tmp_path: Path, capsys):
    """A site scans once and reconstructs with each kernel: every series is measured, one table comes out.

    Two series of one kernel are averaged (and say so); a series with nothing round in it is named, not fatal.
    """
    import tomllib

    import numpy as np

    from dicom_node import cli
    from dicom_node_lab.phantom_dicom import ct_series

    kernel_phantom.write(Kernel.SOFT, tmp_path / "scan" / "soft", seed=1)
    kernel_phantom.write(Kernel.SHARP, tmp_path / "scan" / "sharp-a", seed=2)
    kernel_phantom.write(Kernel.SHARP, tmp_path / "scan" / "sharp-b", seed=3)
    (tmp_path / "scan" / "flat").mkdir()
    for ds in ct_series(np.zeros((4, 64, 64), np.float32), (1.0, 0.5, 0.5), description="flat"):
        ds.ConvolutionKernel = "FLAT"
        ds.save_as(tmp_path / "scan" / "flat" / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    assert cli.main(["measure-kernel", str(tmp_path / "scan")]) == 0
    out = capsys.readouterr().out
    assert "(FLAT): no round edge found" in out
    tables = tomllib.loads("[engine]\n" + out.split("For config.toml:\n")[1])["engine"]
    assert set(tables["scanner_kernels"]) == {"SOFT", "SHARP"} == set(tables["scanner_edge_enhance"])
    assert "# mean of 2 series" in out
    assert tables["scanner_kernels"]["SOFT"] < tables["scanner_kernels"]["SHARP"]
    assert tables["scanner_edge_enhance"]["SOFT"] < tables["scanner_edge_enhance"]["SHARP"]
