"""A commissioning phantom scanned by the world's kernels, and what ``dicom-node measure-kernel`` reads from it.

Why: a site fills ``[engine.scanner_kernels]`` and ``[engine.scanner_edge_enhance]`` from its own phantom
scan (``dicom_node.kernel_measure``). Before a site trusts the tool, it must give back the kernels the world
is known to use, through the same DICOM path and at the world's noise; and the subtraction must read as well
with the measured tables as with the world's own (reports/tuning/kernel-measure.md).

The phantom: a water cylinder (radius 40 mm) in air, with three rods along z: bone-equivalent (1,000 HU,
10 mm), hydroxyapatite 800 mg/cm3 (5 mm) and iodinated blood (400 HU, 5 mm). It is drawn with area
fractions (4 x 4 sub-pixels), blurred by the kernel's MTF and a slice profile, and given the kernel's
noise texture at its mid-range SD, as the world draws a study. The measurements themselves are
``kernel_report``'s (``python -m dicom_node_lab.kernel_report --out reports/kernel-measure``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from dicom_node.kernel_measure import Circle
from dicom_node_lab import physics
from dicom_node_lab.phantom_dicom import ct_series
from dicom_node_lab.physics import Kernel

SHAPE = (16, 192, 192)
SPACING = (0.47, 0.47, 0.47)
CENTRE_MM = (45.0, 45.0)  # x, y of the cylinder's axis from pixel [0, 0]
# (x offset, y offset from the axis, radius mm, HU): the rods, in water (0 HU)
RODS = ((-15.0, 0.0, 5.0, 1000.0), (12.0, -12.0, 2.5, float(physics.calcium_hu(800.0, 120))),
        (12.0, 12.0, 2.5, 400.0))
CYLINDER_RADIUS_MM = 40.0


def _disc(shape: tuple[int, int], pixel_mm: float, cx: float, cy: float, radius: float, sub: int = 4) -> np.ndarray:
    """The share of each pixel inside a disc (``sub`` x ``sub`` samples per pixel)."""
    offs = (np.arange(sub) + 0.5) / sub - 0.5
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    out = np.zeros(shape)
    for oy in offs:
        for ox in offs:
            out += np.hypot((yy + oy) * pixel_mm - cy, (xx + ox) * pixel_mm - cx) <= radius
    return out / sub ** 2


def render(kernel: Kernel, seed: int = 0, noise: bool = True, slice_fwhm_mm: float = 0.75) -> np.ndarray:
    """The phantom's HU volume ``[z, y, x]`` as the world's scanner would show it with ``kernel``."""
    px = SPACING[1]
    plane = -1000.0 + 1000.0 * _disc(SHAPE[1:], px, *CENTRE_MM, CYLINDER_RADIUS_MM)
    for dx, dy, radius, hu in RODS:
        plane += hu * _disc(SHAPE[1:], px, CENTRE_MM[0] + dx, CENTRE_MM[1] + dy, radius)
    volume = np.repeat(plane[None].astype(np.float32), SHAPE[0], axis=0)
    image = physics.blur(volume, SPACING, kernel, slice_fwhm_mm)
    if noise:
        sd = float(np.mean(physics.KERNELS[kernel].noise_sd))
        image += physics.noise(SHAPE, SPACING, kernel, slice_fwhm_mm, sd, np.random.default_rng(seed))
    return image


def rod_circle(index: int) -> Circle:
    """The ``--circle`` of rod ``index`` (0 bone, 1 HA 800, 2 iodine); -1 is the cylinder's outer edge."""
    if index < 0:
        return Circle(*CENTRE_MM, CYLINDER_RADIUS_MM)
    dx, dy, radius, _ = RODS[index]
    return Circle(CENTRE_MM[0] + dx, CENTRE_MM[1] + dy, radius)


def write(kernel: Kernel, folder: Path, seed: int = 0) -> Path:
    """Write the phantom scanned with ``kernel`` as a CT series whose ConvolutionKernel names it (replacing
    what ``folder`` held)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    series_uid = generate_uid()
    for ds in ct_series(render(kernel, seed), SPACING, series_uid=series_uid, patient_id="KERNEL-PHANTOM",
                        patient_name="Phantom^Kernel", description=f"Kernel phantom {kernel.name}"):
        ds.ConvolutionKernel = kernel.name
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    return folder

