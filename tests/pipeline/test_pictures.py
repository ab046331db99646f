"""Lesion pictures for the job page (dicom_node.pipeline.pictures)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dicom_node.pipeline import pictures
from dicom_node.pipeline.detect import describe, detect
from dicom_node.pipeline.morphology import dilate_mm
from dicom_node.pipeline.pictures import (
    GAP_PX,
    LABEL_PX,
    OUTLINE_RGB,
    _grey,
    lesion_pictures,
    thumbnail,
    view_plane,
)

SPACING = (0.5, 0.4, 0.4)
SHAPE = (140, 80, 80)  # 70 × 32 × 32 mm: taller than one lesion's neighbourhood
TUBE_DIR = np.array([0.8, 0.45, 0.6]) / np.linalg.norm([0.8, 0.45, 0.6])  # z, y, x: oblique to every axis
TUBE_MM = 1.5
CENTRE_MM = np.array([35.0, 16.0, 16.0])
LUMEN_HU, PLAQUE_HU, TISSUE_HU, CALCIUM_HU = 400.0, 60.0, 40.0, 1000.0


def _mm() -> np.ndarray:
    return np.stack(np.indices(SHAPE), axis=-1) * np.asarray(SPACING)


def _side(direction: np.ndarray) -> np.ndarray:
    """A unit vector perpendicular to the tube, not along any volume axis."""
    s = np.cross(direction, [0.0, 0.0, 1.0])
    return s / np.linalg.norm(s)


def _tube(deposits: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The oblique contrast tube with calcium deposits at (mm along the tube from its centre, radius mm),
    each against its wall on the same side. Returns original, restored, changed and the calcium mask."""
    mm = _mm()
    rel = mm - CENTRE_MM
    along = rel @ TUBE_DIR
    dist = np.linalg.norm(rel - along[..., None] * TUBE_DIR, axis=-1)
    lumen = dist <= TUBE_MM
    side = _side(TUBE_DIR)
    calcium = np.zeros(SHAPE, bool)
    for t, r in deposits:
        c = CENTRE_MM + t * TUBE_DIR + (TUBE_MM + 0.3) * side
        calcium |= np.linalg.norm(mm - c, axis=-1) <= r
    original = np.full(SHAPE, TISSUE_HU, np.float32)
    original[lumen] = LUMEN_HU
    restored = original.copy()
    restored[calcium] = np.where(lumen[calcium], LUMEN_HU, PLAQUE_HU)
    original[calcium] = CALCIUM_HU
    changed = dilate_mm(calcium, SPACING, 0.5)
    return original, restored, changed, calcium


class Reader:
    """``read_original`` that records what it was asked for."""

    def __init__(self, volume: np.ndarray):
        self.volume = volume
        self.calls: list[tuple[int, int]] = []

    def __call__(self, z0: int, z1: int) -> np.ndarray:
        assert 0 <= z0 < z1 <= self.volume.shape[0]
        self.calls.append((z0, z1))
        return self.volume[z0:z1].copy()


def _panels(path) -> tuple[np.ndarray, np.ndarray]:
    rgb = np.asarray(Image.open(path).convert("RGB"))
    n = (rgb.shape[1] - GAP_PX) // 2
    body = rgb[LABEL_PX:]
    return body[:, :n], body[:, n + GAP_PX:]


def _grey_only(panel: np.ndarray) -> np.ndarray:
    """Grey values; -1 where the pixel is coloured (the outline)."""
    grey = panel[..., 0].astype(int)
    coloured = (panel[..., 0] != panel[..., 1]) | (panel[..., 1] != panel[..., 2])
    return np.where(coloured, -1, grey)


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.degrees(np.arccos(min(1.0, abs(float(a @ b)) / np.linalg.norm(a) / np.linalg.norm(b)))))


@pytest.fixture(scope="module")
def one_lesion():
    return _tube([(0.0, 1.2)])


def test_view_follows_the_oblique_vessel_toward_the_calcium(one_lesion):
    original, restored, changed, calcium = one_lesion
    detection = detect(original, SPACING)
    assert len(detection.lesions) == 1
    plane = view_plane(restored, detection.lesions[0], SPACING, labels=detection.labels)
    assert plane.estimated
    assert _angle_deg(plane.axis, TUBE_DIR) < 10.0
    # the second axis points from the vessel toward the calcium, perpendicular to the vessel
    assert float(plane.side @ _side(TUBE_DIR)) > np.cos(np.radians(15.0))
    assert abs(float(plane.side @ plane.axis)) < 1e-6


def test_picture_shows_calcium_removed_along_the_vessel(one_lesion, tmp_path):
    original, restored, changed, calcium = one_lesion
    detection = detect(original, SPACING)
    reader = Reader(original)
    out = lesion_pictures(reader, restored, changed, detection, SPACING, tmp_path)
    assert len(out) == 1
    pic = out[0]
    assert pic.lesion == detection.lesions[0].index
    assert pic.path == tmp_path / f"lesion-{pic.lesion}.png"
    n = 100  # 2 × 10 mm at 0.2 mm
    assert (pic.width, pic.height) == (2 * n + GAP_PX, n + LABEL_PX)
    with Image.open(pic.path) as im:
        assert im.size == (pic.width, pic.height) and im.format == "PNG"
    assert not list(tmp_path.glob("*.part"))

    before, after = _panels(pic.path)
    g0, g1 = _grey_only(before), _grey_only(after)
    bright = int(_grey(np.array(800.0)))  # the window's top: calcium, never contrast
    centre = (slice(n // 2 - 15, n // 2 + 15), slice(n // 2 - 15, n // 2 + 15))
    assert (g0[centre] >= bright).sum() >= 20  # the deposit, in the original
    assert (g1 >= bright).sum() == 0  # gone from the derived image
    for panel in (before, after):
        assert np.all(panel == OUTLINE_RGB, axis=-1).sum() >= 10

    # the tube is a long band across the picture (a longitudinal cut), not a cross-section:
    # contrast-grey pixels in nearly every column, within a band a few mm tall, below the calcium
    lumen = np.abs(g1 - int(_grey(np.array(LUMEN_HU)))) <= 10
    assert lumen.any(axis=0).mean() > 0.9
    rows = np.flatnonzero(lumen.sum(axis=1) > 0.5 * n)
    assert len(rows) >= 8  # 3 mm at 0.2 mm, less the partial rows
    assert rows.max() - rows.min() < 25
    calcium_rows = np.flatnonzero((g0 >= bright).any(axis=1))
    assert calcium_rows.mean() < rows.mean()  # calcium above the vessel's centre line

    # only the lesion's neighbourhood of the original was read: ≤ 10 mm × √2 (+1 slice) around it
    cz = detection.lesions[0].centroid[0]
    reach = 10.0 * np.sqrt(2) / SPACING[0] + 2
    assert len(reader.calls) == 1
    z0, z1 = reader.calls[0]
    assert z0 >= cz - reach and z1 <= cz + reach
    assert z1 - z0 < SHAPE[0] // 2


def test_without_contrast_the_view_falls_back_to_z(tmp_path):
    volume = np.full((40, 40, 40), TISSUE_HU, np.float32)
    calcium = np.zeros(volume.shape, bool)
    calcium[18:22, 18:22, 18:22] = True
    volume[calcium] = CALCIUM_HU
    detection = describe(calcium, volume, SPACING, threshold_hu=130.0)
    restored = np.where(calcium, PLAQUE_HU, volume).astype(np.float32)
    plane = view_plane(restored, detection.lesions[0], SPACING, labels=detection.labels)
    assert not plane.estimated
    assert np.allclose(plane.axis, [1.0, 0.0, 0.0])
    out = lesion_pictures(Reader(volume), restored, calcium, detection, SPACING, tmp_path)
    assert len(out) == 1 and out[0].path.exists()


def test_one_picture_per_lesion_largest_first_capped(tmp_path):
    original, restored, changed, calcium = _tube([(-12.0, 0.8), (0.0, 1.3), (12.0, 1.0)])
    # and a deposit cut by the volume's edge (detect would leave it alone: describe takes it as it is)
    edge = np.zeros(SHAPE, bool)
    edge[0:3, 0:4, 30:36] = True
    calcium |= edge
    original[edge] = CALCIUM_HU
    changed |= edge
    detection = describe(calcium, original, SPACING, threshold_hu=130.0)
    assert len(detection.lesions) == 4
    by_size = sorted(detection.lesions, key=lambda le: (-le.voxels, le.index))

    reader = Reader(original)
    out = lesion_pictures(reader, restored, changed, detection, SPACING, tmp_path)
    assert [p.lesion for p in out] == [le.index for le in by_size]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"lesion-{le.index}.png"
                                                                     for le in detection.lesions)
    for p in out:
        with Image.open(p.path) as im:
            assert im.size == (p.width, p.height)
    # overlapping neighbourhoods were read once: no slice asked for twice
    asked = np.concatenate([np.arange(z0, z1) for z0, z1 in reader.calls])
    assert len(asked) == len(np.unique(asked))

    edge_lesion = next(le for le in detection.lesions if le.bbox[0].start == 0)
    before, _ = _panels(tmp_path / f"lesion-{edge_lesion.index}.png")
    assert (_grey_only(before) >= int(_grey(np.array(800.0)))).any()  # the edge deposit is in its picture

    capped = tmp_path / "capped"
    out = lesion_pictures(Reader(original), restored, changed, detection, SPACING, capped, max_lesions=2)
    assert [p.lesion for p in out] == [le.index for le in by_size[:2]]
    assert len(list(capped.iterdir())) == 2
    assert lesion_pictures(Reader(original), restored, changed, detection, SPACING, capped, max_lesions=0) == []


def test_thumbnail_width(tmp_path, one_lesion):
    original, restored, changed, _ = one_lesion
    detection = detect(original, SPACING)
    pic = lesion_pictures(Reader(original), restored, changed, detection, SPACING, tmp_path)[0]
    for width in (160, 64):
        out = thumbnail(pic.path, tmp_path / f"thumb-{width}.png", width=width)
        with Image.open(out) as im:
            assert im.width == width
            assert im.height == round(pic.height * width / pic.width)
    with pytest.raises(ValueError):
        thumbnail(pic.path, tmp_path / "bad.png", width=0)


def test_a_failed_write_leaves_nothing_behind(tmp_path, one_lesion, monkeypatch):
    original, restored, changed, _ = one_lesion
    detection = detect(original, SPACING)

    def broken(image, target, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pictures.os, "replace", broken)
    with pytest.raises(OSError):
        lesion_pictures(Reader(original), restored, changed, detection, SPACING, tmp_path)
    assert list(tmp_path.iterdir()) == []
