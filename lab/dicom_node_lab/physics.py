"""The scanner between the anatomy and the image: kernels, slice profile, motion, density, noise.

Blooming is a property of the scanner, not of the calcium: a dense deposit looks wider
than it is because the system's point spread function smears it, and a reader who stops
at the first voxel that "looks white" stops early. The first phantom blurred with a
Gaussian of 0.5–1.1 mm and under-called calcified stenoses; a cardiac CTA scanner blurs
more, with heavier tails than a Gaussian's, along z by its slice profile, and along the
vessel's motion. This module models each of those as a transfer function (applied to the
whole volume at once with an FFT) so that one place holds every number the calibration
against XCIST and the literature checks.

Arrays are ``[z, y, x]`` with ``spacing = (dz, dy, dx)`` in mm, as in ``phantom``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np

FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


class Kernel(StrEnum):
    """Reconstruction kernels, soft to sharp (SOFT < STANDARD < HD < SHARP in resolution)."""

    SOFT = "soft"
    STANDARD = "standard"
    SHARP = "sharp"
    HD = "hd"


@dataclass(frozen=True)
class KernelModel:
    """An in-plane MTF: a Gaussian core, a wider Gaussian tail, and an edge enhancement.

    ``mtf50_lp_cm`` is where the MTF falls to 0.5 (cardiac kernels: 3.5–4.5 lp/cm). The
    tail (``tail_weight`` of the PSF's area, ``tail_ratio`` times the core's width) is the
    scatter, focal-spot and detector cross-talk part that a Gaussian lacks and that spreads
    dense calcium furthest. ``enhance`` > 0 lifts mid frequencies the way sharp kernels do,
    which draws the dark undershoot beside calcium. ``noise_sd`` is the range of image
    noise (HU) at cardiac doses with this kernel.
    """

    mtf50_lp_cm: float
    tail_weight: float
    tail_ratio: float
    enhance: float
    noise_sd: tuple[float, float]

    def core_sigma_mm(self) -> float:
        """The core Gaussian's sigma that puts the whole MTF's 50 % point at ``mtf50_lp_cm``."""
        f50 = self.mtf50_lp_cm / 10.0  # lp/mm
        lo, hi = 0.01, 2.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if self.mtf(np.array([f50]), mid)[0] > 0.5:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)

    def mtf(self, f_lp_mm: np.ndarray, sigma_mm: float | None = None) -> np.ndarray:
        """The in-plane modulation transfer at radial frequencies ``f_lp_mm`` (cycles/mm)."""
        s = self.core_sigma_mm() if sigma_mm is None else sigma_mm
        g = np.exp(-2.0 * np.pi ** 2 * (s * f_lp_mm) ** 2)
        t = np.exp(-2.0 * np.pi ** 2 * (s * self.tail_ratio * f_lp_mm) ** 2)
        base = (1.0 - self.tail_weight) * g + self.tail_weight * t
        if self.enhance:
            # a band lift that is 1 at f = 0 and peaks near the MTF50
            base = base * (1.0 + self.enhance * (1.0 - np.exp(-2.0 * np.pi ** 2 * (s * f_lp_mm) ** 2)))
        return base

    def fwhm_mm(self) -> float:
        """The PSF's full width at half maximum, measured on a fine radial profile (what XCIST's wire gives)."""
        return psf_fwhm_mm(self)


# Calibrated against XCIST (reports/calibration.md, reports/calibration/xcist/): its `standard` kernel
# measured MTF50 4.30 lp/cm and a PSF FWHM of 1.09 mm on a 0.15 mm wire, with a slight undershoot and
# no tail beyond a Gaussian's (XCIST models no scatter, crosstalk or lag); its `bone` kernel 6.34 lp/cm,
# 0.85 mm, with a deeper undershoot. STANDARD and SHARP are fitted to those (MTF50, FWHM, and the
# inserts' blooming within 20 %); SOFT (3.5 lp/cm) and HD (5.2 lp/cm) lie either side of STANDARD, so
# a model trained on SOFT, HD and SHARP meets STANDARD only between kernels it has seen.
KERNELS: dict[Kernel, KernelModel] = {
    Kernel.SOFT: KernelModel(3.5, 0.0, 3.0, 0.0, (15.0, 30.0)),
    Kernel.STANDARD: KernelModel(4.3, 0.0, 3.0, 0.3, (20.0, 40.0)),
    Kernel.HD: KernelModel(5.2, 0.0, 3.0, 0.5, (30.0, 55.0)),
    Kernel.SHARP: KernelModel(6.3, 0.0, 3.0, 0.8, (40.0, 70.0)),
}


def psf_fwhm_mm(kernel: KernelModel, extent_mm: float = 8.0, step_mm: float = 0.01) -> float:
    """FWHM of the 2D PSF's radial profile, from the MTF by a Hankel transform."""
    f = np.linspace(0.0, 5.0, 2001)  # lp/mm
    m = kernel.mtf(f)
    r = np.arange(0.0, extent_mm, step_mm)
    # 2D radially symmetric inverse Fourier transform: PSF(r) = 2π ∫ MTF(f) J0(2π f r) f df
    from scipy.special import j0

    psf = np.trapezoid(m[None, :] * j0(2.0 * np.pi * np.outer(r, f)) * f[None, :], f, axis=1)
    half = psf[0] / 2.0
    below = np.flatnonzero(psf < half)
    if len(below) == 0:
        return float("nan")
    i = below[0]
    r_half = r[i - 1] + (psf[i - 1] - half) / (psf[i - 1] - psf[i]) * step_mm
    return float(2.0 * r_half)


def mtf50_from_fwhm(fwhm_mm: float) -> float:
    """The MTF50 (lp/cm) of a Gaussian PSF of this FWHM: how XCIST's measured wire maps onto a kernel."""
    sigma = fwhm_mm * FWHM_TO_SIGMA
    return 10.0 * np.sqrt(np.log(2.0) / (2.0 * np.pi ** 2)) / sigma


# Hydroxyapatite in water, HU per mg HA/cm³: XCIST's 5 mm rods of 400 and 800 mg HA/cm³ read 602 and
# 1,197 HU at 120 kVp, 689 and 1,369 HU at 100 kVp (reports/calibration/xcist/README.md).
HU_PER_MG_HA = {100: 1.70, 120: 1.49}


def calcium_hu(density_mg_cm3: float | np.ndarray, kvp: int) -> float | np.ndarray:
    """CT number of hydroxyapatite at this density and tube voltage."""
    if kvp not in HU_PER_MG_HA:
        raise ValueError(f"no calcium calibration at {kvp} kVp (have {sorted(HU_PER_MG_HA)})")
    return HU_PER_MG_HA[kvp] * density_mg_cm3


@dataclass(frozen=True)
class Acquisition:
    """Everything the scanner does to one study: kernel, slice profile, motion, beam hardening, noise."""

    kernel: Kernel
    slice_fwhm_mm: float
    kvp: int
    noise_sd: float
    beam_hardening_hu: float  # darkening beside dense calcium (0: none)
    noise_seed: int

    def __post_init__(self) -> None:
        if not 0.0 < self.slice_fwhm_mm < 3.0:
            raise ValueError(f"slice profile FWHM {self.slice_fwhm_mm} mm is not a CT slice")
        if self.kvp not in HU_PER_MG_HA:
            raise ValueError(f"kVp {self.kvp} not calibrated")
        if self.noise_sd < 0 or self.beam_hardening_hu < 0:
            raise ValueError("noise and beam hardening are non-negative")


def _frequencies(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> tuple[np.ndarray, ...]:
    return tuple(np.fft.fftfreq(n, d)[(slice(None),) + (None,) * (2 - a)]
                 for a, (n, d) in enumerate(zip(shape, spacing)))


def transfer(shape: tuple[int, int, int], spacing: tuple[float, float, float], kernel: Kernel,
             slice_fwhm_mm: float, motion_mm: np.ndarray | None = None) -> np.ndarray:
    """The system's 3D transfer function on the volume's FFT grid (real, symmetric).

    In-plane MTF of the kernel, a Gaussian slice profile along z, and a uniform smear of
    length |motion| along its direction (a vessel moving during the acquisition window).
    """
    fz, fy, fx = _frequencies(shape, spacing)
    fr = np.sqrt(fy ** 2 + fx ** 2)
    h = KERNELS[kernel].mtf(fr) * np.exp(-2.0 * np.pi ** 2 * (slice_fwhm_mm * FWHM_TO_SIGMA * fz) ** 2)
    if motion_mm is not None and np.linalg.norm(motion_mm) > 1e-6:
        m = np.asarray(motion_mm, float)
        h = h * np.sinc(fz * m[0] + fy * m[1] + fx * m[2])
    return h.astype(np.float32)


def apply(volume: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Filter a volume by a transfer function (periodic edges: phantoms keep anatomy off them)."""
    return np.fft.ifftn(np.fft.fftn(volume) * h).real.astype(np.float32)


def blur(volume: np.ndarray, spacing: tuple[float, float, float], kernel: Kernel, slice_fwhm_mm: float,
         motion: list[tuple[np.ndarray, np.ndarray]] | None = None) -> np.ndarray:
    """The scanner's blur; ``motion``: (weight map, motion vector in mm) per moving region.

    Each vessel moves its own way: the volume is blurred once per motion and the results
    are blended by the smooth weight maps (the rest of the volume stays still). Where the
    maps of two vessels overlap they are shared out (each divided by their sum where it
    exceeds 1), so every voxel's weights sum to one: a blend is an average of blurred
    images, and an average of blurs of a uniform region is that region. Summed as they
    were, a voxel in two vessels' reach got up to twice the image: 371 of the 480 held-out
    studies had such places, one lifted a 590 HU lumen to 770 HU beside a calcium-free
    plaque, and the detector took it for calcium (reports/tuning/motion-overlap.md).
    """
    spectrum = np.fft.fftn(volume)
    still = transfer(volume.shape, spacing, kernel, slice_fwhm_mm)
    if not motion:
        return np.fft.ifftn(spectrum * still).real.astype(np.float32)
    total = np.zeros(volume.shape, np.float32)
    for weight, _ in motion:
        total += weight
    share = 1.0 / np.maximum(total, 1.0)
    out = np.clip(1.0 - total, 0.0, 1.0) * np.fft.ifftn(spectrum * still).real.astype(np.float32)
    for weight, vec in motion:
        h = transfer(volume.shape, spacing, kernel, slice_fwhm_mm, vec)
        out += weight * share * np.fft.ifftn(spectrum * h).real.astype(np.float32)
    return out


def noise(shape: tuple[int, int, int], spacing: tuple[float, float, float], kernel: Kernel,
          slice_fwhm_mm: float, sd: float, rng: np.random.Generator) -> np.ndarray:
    """Noise with filtered back-projection's texture: a ramp in-plane shaped by the kernel's MTF.

    The noise power spectrum of FBP grows with the in-plane frequency and is cut by the
    kernel, so a sharp kernel's noise is finer and stronger; along z it follows the
    slice profile.
    """
    fz, fy, fx = _frequencies(shape, spacing)
    fr = np.sqrt(fy ** 2 + fx ** 2)
    amp = np.sqrt(fr) * KERNELS[kernel].mtf(fr) * np.exp(
        -2.0 * np.pi ** 2 * (slice_fwhm_mm * FWHM_TO_SIGMA * fz) ** 2)
    white = rng.standard_normal(shape).astype(np.float32)
    n = np.fft.ifftn(np.fft.fftn(white) * amp).real
    n /= max(float(n.std()), 1e-6)
    return (n * sd).astype(np.float32)
