"""Pictures of each lesion, so that whoever reads a finished job can see what the node did.

A table of voxel counts tells a PACS administrator or a radiologist nothing about whether
the restored lumen is believable. One picture per lesion does: the original and the derived
image side by side, on the same oblique plane, with the restored voxels outlined.

The plane runs along the vessel through the lesion. A cross-section shows the deposit but
not the lumen before and after it, which is what a reader compares the restored part with;
an axial slice cuts an oblique coronary at a slant and shows neither. The vessel's direction
comes from the contrast around the lesion in the *restored* volume, where calcium no longer
outshines it. The plane's other axis points from the vessel's centre line to the calcium, so
the cut passes through both the lumen and the deposit: in every picture the vessel runs left
to right and the calcium sits above its centre line.

Only the restored volume is in memory; the original is read back from the source files one
lesion neighbourhood at a time (lesions in z order, overlapping slices read once), so the
pictures cost a few slabs of slices, never a second volume.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from dicom_node.pipeline.contrast import CONTRAST_RANGE_HU
from dicom_node.pipeline.detect import CONNECTIVITY_26, Detection, Lesion

# Coronary CTA window: level 300, width 1000 (-200..800 HU). Contrast is mid-grey, soft plaque
# dark, calcium white; what the reader's workstation shows by default.
CTA_WINDOW_HU = (300.0, 1000.0)  # (level, width)
OUTSIDE_HU = -1000.0  # drawn where the plane leaves the scanned volume (air: black)
OUTLINE_RGB = (255, 200, 0)  # the restored region's boundary; no grey level can be mistaken for it
LABEL_RGB = (220, 220, 220)
GAP_PX = 4  # between the two panels
LABEL_PX = 14  # strip above the panels for their one-line labels
LABELS = ("original", "calcium removed")
NEAR_LESION_MM = 1.5  # contrast this close to the lesion belongs to its vessel
MIN_CONTRAST_MM3 = 4.0  # less contrast than this (a 1.5 mm vessel over ~0.6 mm) gives no direction
MIN_ELONGATION = 2.0  # the axis's variance over the next one's; a rounder cloud has no direction
MIN_OFFSET_MM = 0.1  # calcium closer than this to the centre line has no side: any perpendicular will do


@dataclass
class LesionPicture:
    lesion: int  # Lesion.index
    path: Path  # PNG: original | derived side by side, restored region outlined
    width: int
    height: int


@dataclass
class ViewPlane:
    """The oblique plane of one lesion's picture, in mm from the volume's first voxel (z, y, x)."""

    centre: np.ndarray  # the lesion's centroid
    axis: np.ndarray  # unit vector along the vessel: the picture's columns, left to right
    side: np.ndarray  # unit vector from the vessel's centre line toward the calcium: the picture's rows, upward
    estimated: bool  # False: too little contrast nearby, the axis is the scanner's z axis


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _any_perpendicular(axis: np.ndarray) -> np.ndarray:
    """The unit vector perpendicular to ``axis`` nearest to the volume axis least aligned with it (deterministic)."""
    e = np.zeros(3)
    e[int(np.argmin(np.abs(axis)))] = 1.0
    return _unit(e - (e @ axis) * axis)


def _neighbourhood(centre_vox: np.ndarray, reach_mm: float, spacing: np.ndarray, shape: tuple[int, ...]
                   ) -> tuple[slice, slice, slice]:
    lo = np.maximum(np.floor(centre_vox - reach_mm / spacing), 0).astype(int)
    hi = np.minimum(np.ceil(centre_vox + reach_mm / spacing) + 1, shape).astype(int)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))  # type: ignore[return-value]


def view_plane(restored: np.ndarray, lesion: Lesion, spacing: tuple[float, float, float],
               half_size_mm: float = 10.0, labels: np.ndarray | None = None) -> ViewPlane:
    """The plane along the vessel through ``lesion``, from the contrast around it in ``restored``.

    The vessel's axis is the weighted principal axis of the contrast-filled voxels' positions
    (mm) within ``half_size_mm`` of the centroid. Only contrast connected to voxels within
    ``NEAR_LESION_MM`` of the lesion (``labels == lesion.index``; the centroid without labels)
    counts, so that the ventricle or a neighbouring branch in the box does not pull the axis;
    a Gaussian weight (sigma ``half_size_mm / 2``) favours the vessel where the lesion is over its
    bends further off. Too little contrast, or a cloud without a long axis (a chamber, a
    stump), gives no direction: the z axis then, as good as any and familiar to readers.
    """
    sp = np.asarray(spacing, float)
    centre_vox = np.asarray(lesion.centroid, float)
    box = _neighbourhood(centre_vox, half_size_mm, sp, restored.shape)
    sub = restored[box]
    contrast = (sub > CONTRAST_RANGE_HU[0]) & (sub < CONTRAST_RANGE_HU[1])
    offset = np.array([s.start for s in box]) - centre_vox  # box index -> voxels from the centroid
    if labels is not None:
        near = labels[box] == lesion.index
    else:
        near = np.zeros(sub.shape, bool)
    if not near.any():
        near[tuple(np.clip(np.round(-offset).astype(int), 0, np.array(sub.shape) - 1))] = True
    near = ndimage.distance_transform_edt(~near, sampling=sp) <= NEAR_LESION_MM
    comp, _ = ndimage.label(contrast, structure=CONNECTIVITY_26)
    touching = np.unique(comp[near & contrast])
    touching = touching[touching > 0]
    idx = np.argwhere(np.isin(comp, touching)) if len(touching) else np.empty((0, 3), int)
    axis = np.array([1.0, 0.0, 0.0])
    estimated = False
    centre_line = np.zeros(3)
    if len(idx) * float(np.prod(sp)) >= MIN_CONTRAST_MM3:
        pos = (idx + offset) * sp  # mm from the centroid
        w = np.exp(-0.5 * (pos ** 2).sum(axis=1) / (0.5 * half_size_mm) ** 2)
        mean = (w @ pos) / w.sum()
        d = pos - mean
        cov = (d * w[:, None]).T @ d / w.sum()
        values, vectors = np.linalg.eigh(cov)  # ascending
        if values[2] >= MIN_ELONGATION * max(values[1], 1e-12):
            axis = vectors[:, 2]
            axis = axis if axis[int(np.argmax(np.abs(axis)))] > 0 else -axis
            estimated = True
            centre_line = mean
    # the centroid is the origin: its offset from the centre line is -centre_line, less its part along the axis
    perp = -centre_line - (-centre_line @ axis) * axis
    side = _unit(perp) if estimated and np.linalg.norm(perp) >= MIN_OFFSET_MM else _any_perpendicular(axis)
    return ViewPlane(centre=centre_vox * sp, axis=axis, side=side, estimated=estimated)


def plane_coordinates(plane: ViewPlane, spacing: tuple[float, float, float], half_size_mm: float,
                      pixel_mm: float) -> np.ndarray:
    """Voxel coordinates (3, n, n) of the picture's pixel centres: columns along the axis, rows down against side."""
    n = max(1, int(round(2 * half_size_mm / pixel_mm)))
    t = (np.arange(n) + 0.5 - 0.5 * n) * pixel_mm
    mm = (plane.centre[:, None, None] + plane.axis[:, None, None] * t[None, None, :]
          - plane.side[:, None, None] * t[None, :, None])
    return mm / np.asarray(spacing, float)[:, None, None]


def _extent(coords: np.ndarray, shape: tuple[int, ...]) -> tuple[slice, slice, slice]:
    """The voxels linear interpolation at ``coords`` reads, within the volume."""
    out = []
    for c, n in zip(coords, shape):
        lo = min(max(int(np.floor(c.min())), 0), n - 1)
        hi = max(min(int(np.floor(c.max())) + 2, n), lo + 1)
        out.append(slice(lo, hi))
    return tuple(out)  # type: ignore[return-value]


def _sample(block: np.ndarray, coords: np.ndarray, origin: tuple[slice, ...], order: int, cval: float
            ) -> np.ndarray:
    shifted = coords - np.array([s.start for s in origin], float)[:, None, None]
    return ndimage.map_coordinates(np.asarray(block, np.float32), shifted, order=order, mode="constant", cval=cval)


def _grey(hu: np.ndarray) -> np.ndarray:
    level, width = CTA_WINDOW_HU
    return (np.clip((hu - (level - 0.5 * width)) / width, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _panel(hu: np.ndarray, outline: np.ndarray) -> np.ndarray:
    rgb = np.repeat(_grey(hu)[:, :, None], 3, axis=2)
    rgb[outline] = OUTLINE_RGB
    return rgb


@functools.cache
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont | None:
    """Pillow's own font: bundled with it, so no system font is needed. None if even that fails."""
    try:
        return ImageFont.load_default()
    except OSError:
        return None


def _write_png(image: Image.Image, target: Path) -> None:
    """Whole or absent, never half-written."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{threading.get_ident()}.part")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _compose(original: np.ndarray, restored: np.ndarray, outline: np.ndarray) -> Image.Image:
    n_rows, n_cols = original.shape
    canvas = np.zeros((LABEL_PX + n_rows, 2 * n_cols + GAP_PX, 3), np.uint8)
    canvas[LABEL_PX:, :n_cols] = _panel(original, outline)
    canvas[LABEL_PX:, n_cols + GAP_PX:] = _panel(restored, outline)
    image = Image.fromarray(canvas, "RGB")
    font = _font()
    if font is not None:
        draw = ImageDraw.Draw(image)
        for x, text in zip((0, n_cols + GAP_PX), LABELS):
            draw.text((x + 2, 1), text, fill=LABEL_RGB, font=font)
    return image


class _Slab:
    """The original slices of the current neighbourhood; for lesions taken in z order, overlapping
    slices are read once. Holds at most one neighbourhood's z range (plus what an earlier, taller one
    left above it), whole slices as ``read_original`` returns them."""

    def __init__(self, read: Callable[[int, int], np.ndarray]):
        self.read = read
        self.z0 = self.z1 = 0
        self.data: np.ndarray | None = None

    def get(self, z0: int, z1: int) -> np.ndarray:
        if self.data is None or z0 < self.z0 or z0 >= self.z1:
            self.data, self.z0, self.z1 = np.asarray(self.read(z0, z1)), z0, z1
        else:
            kept = self.data[z0 - self.z0:]
            if z1 > self.z1:
                kept = np.concatenate([kept, np.asarray(self.read(self.z1, z1))])
            self.data, self.z0, self.z1 = kept, z0, max(z1, self.z1)
        return self.data[:z1 - z0]


def lesion_pictures(read_original: Callable[[int, int], np.ndarray], restored: np.ndarray, changed: np.ndarray,
                    detection: Detection, spacing: tuple[float, float, float], out_dir: Path,
                    half_size_mm: float = 10.0, pixel_mm: float = 0.2, max_lesions: int = 50,
                    ) -> list[LesionPicture]:
    """One picture per lesion (``lesion-{index}.png`` in ``out_dir``), largest lesions first.

    ``restored`` is the HU volume after restoration (z, y, x), ``changed`` its restored voxels;
    ``read_original(z0, z1)`` returns the original HU slices [z0, z1), and is asked only for
    slices within reach of a lesion's plane. Each picture is ``2 * half_size_mm`` square per
    panel at ``pixel_mm``.

    At most ``max_lesions`` pictures: a study with hundreds of small deposits would otherwise
    cost hundreds of slab reads and a job page nobody scrolls through; the largest lesions
    are the ones whose restoration changes the reading, and the lesion table lists them all.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = sorted(detection.lesions, key=lambda le: (-le.voxels, le.index))[:max(max_lesions, 0)]
    work = []
    for lesion in chosen:
        plane = view_plane(restored, lesion, spacing, half_size_mm, detection.labels)
        coords = plane_coordinates(plane, spacing, half_size_mm, pixel_mm)
        work.append((lesion, coords, _extent(coords, restored.shape)))
    slab = _Slab(read_original)
    pictures: dict[int, LesionPicture] = {}
    for lesion, coords, box in sorted(work, key=lambda w: (w[2][0].start, w[2][0].stop)):
        original = slab.get(box[0].start, box[0].stop)[:, box[1], box[2]]
        mask = _sample(changed[box], coords, box, order=0, cval=0.0) > 0.5
        outline = ndimage.binary_dilation(mask) & ~mask
        image = _compose(_sample(original, coords, box, 1, OUTSIDE_HU),
                         _sample(restored[box], coords, box, 1, OUTSIDE_HU), outline)
        path = out_dir / f"lesion-{lesion.index}.png"
        _write_png(image, path)
        pictures[lesion.index] = LesionPicture(lesion.index, path, image.width, image.height)
    return [pictures[lesion.index] for lesion in chosen]


def thumbnail(picture: Path, out: Path, width: int = 160) -> Path:
    """A ``width``-pixel-wide copy of ``picture`` (aspect kept), for the jobs list."""
    if width < 1:
        raise ValueError(f"thumbnail width must be positive, not {width}")
    with Image.open(picture) as im:
        height = max(1, math.floor(im.height * width / im.width + 0.5))
        small = im.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    _write_png(small, out)
    return out
