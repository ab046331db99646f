"""Assemble CT series from a pile of DICOM files into HU volumes.

PACS exports come in every layout: nested folders, no extensions, several series
mixed together. We group by SeriesInstanceUID, order slices along the slice
normal (never by file name or InstanceNumber), and refuse geometry we cannot
trust, with a reason a person can act on.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


class SeriesError(ValueError):
    """A series we will not process; the message says why."""


@dataclass
class Series:
    """Headers of one series, slices ordered along the normal (pixel data not yet loaded)."""

    uid: str
    files: list[Path]
    headers: list[Dataset]
    spacing: tuple[float, float, float] = (0.0, 0.0, 0.0)  # dz, dy, dx in mm
    skipped: list[str] = field(default_factory=list)

    @property
    def description(self) -> str:
        return str(getattr(self.headers[0], "SeriesDescription", ""))


def find_files(inputs: Iterable[str | Path]) -> list[Path]:
    """Every regular file under the inputs, recursively, in a stable order."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return out


def series_key(ds: Dataset) -> str:
    """SeriesInstanceUID, or a stand-in when an anonymiser blanked it.

    Over-eager anonymisers empty the UIDs but keep the frame of reference and the
    description, which still separate the series of one study.
    """
    uid = str(getattr(ds, "SeriesInstanceUID", "") or "")
    if uid:
        return uid
    return f"(no SeriesInstanceUID: FrameOfReference {getattr(ds, 'FrameOfReferenceUID', '?')}, " \
           f"'{getattr(ds, 'SeriesDescription', '')}')"


def sop_class(ds: Dataset) -> str:
    """SOPClassUID, falling back to the file meta when the data set lost it."""
    uid = str(getattr(ds, "SOPClassUID", "") or "")
    if not uid and hasattr(ds, "file_meta"):
        uid = str(getattr(ds.file_meta, "MediaStorageSOPClassUID", "") or "")
    return uid


def group_series(files: Iterable[Path]) -> tuple[dict[str, list[tuple[Path, Dataset]]], list[str]]:
    """Read headers only and group them by SeriesInstanceUID; unreadable files are reported."""
    groups: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    problems: list[str] = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported, not fatal
            problems.append(f"{f}: not readable as DICOM ({exc.__class__.__name__})")
            continue
        groups[series_key(ds)].append((f, ds))
    return groups, problems


def slice_normal(ds: Dataset) -> np.ndarray:
    iop = np.asarray(ds.ImageOrientationPatient, float)
    return np.cross(iop[:3], iop[3:])


def order_series(uid: str, items: list[tuple[Path, Dataset]], tolerance: float = 0.05) -> Series:
    """Sort slices along the normal and check the geometry is a regular volume."""
    first = items[0][1]
    for attr in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "Rows", "Columns"):
        if not all(hasattr(ds, attr) for _, ds in items):
            raise SeriesError(f"series {uid}: some slices lack {attr}")
    iop = np.asarray(first.ImageOrientationPatient, float)
    for _, ds in items:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, float), iop, atol=1e-3):
            raise SeriesError(f"series {uid}: slices have different orientations")
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise SeriesError(f"series {uid}: slices have different sizes "
                              f"({ds.Rows}x{ds.Columns} vs {first.Rows}x{first.Columns})")
        if not np.allclose(np.asarray(ds.PixelSpacing, float), np.asarray(first.PixelSpacing, float), atol=1e-4):
            raise SeriesError(f"series {uid}: slices have different pixel spacing")
    normal = slice_normal(first)
    pos = np.array([np.dot(np.asarray(ds.ImagePositionPatient, float), normal) for _, ds in items])
    order = np.argsort(pos, kind="stable")
    pos = pos[order]
    items = [items[i] for i in order]
    if len(items) < 2:
        raise SeriesError(f"series {uid}: a single slice is not a volume")
    steps = np.diff(pos)
    if np.any(steps < 1e-3):
        raise SeriesError(f"series {uid}: two slices share a position (duplicate or mixed acquisitions)")
    dz = float(np.median(steps))
    if np.any(np.abs(steps - dz) > tolerance * dz + 1e-3):
        worst = float(steps[np.argmax(np.abs(steps - dz))])
        kind = "missing slices" if worst > dz * 1.5 else "uneven slice spacing"
        raise SeriesError(f"series {uid}: {kind} (step {worst:.3f} mm where {dz:.3f} mm is typical)")
    # Gantry tilt: the in-plane origin drifts along the row/column axes between slices.
    origin = np.array([np.asarray(ds.ImagePositionPatient, float) for _, ds in items])
    drift = origin[-1] - origin[0] - normal * (pos[-1] - pos[0])
    if np.linalg.norm(drift) > 0.5 * float(min(first.PixelSpacing)):
        tilt = np.degrees(np.arctan2(np.linalg.norm(drift), pos[-1] - pos[0]))
        raise SeriesError(f"series {uid}: slices are sheared (gantry tilt {tilt:.1f}°); "
                          "resample it on the scanner or PACS first")
    dy, dx = (float(v) for v in first.PixelSpacing)
    return Series(uid=uid, files=[f for f, _ in items], headers=[ds for _, ds in items], spacing=(dz, dy, dx))


def load_hu(series: Series) -> np.ndarray:
    """Decode every slice and apply the modality LUT; one float32 volume, nothing more."""
    first = series.headers[0]
    vol = np.empty((len(series.files), int(first.Rows), int(first.Columns)), np.float32)
    for i, f in enumerate(series.files):
        ds = pydicom.dcmread(f)
        arr = ds.pixel_array
        slope = float(getattr(ds, "RescaleSlope", 1.0))
        intercept = float(getattr(ds, "RescaleIntercept", 0.0))
        np.multiply(arr, slope, out=vol[i], casting="unsafe")
        vol[i] += intercept
    return vol


def read_ct_series(inputs: Iterable[str | Path], include_derived: bool = False) -> tuple[list[Series], list[str]]:
    """CT image series found under the inputs, and a line for everything skipped.

    ``include_derived`` is for reading our own output back (evaluation); processing never sets it.
    """
    groups, notes = group_series(find_files(inputs))
    found: list[Series] = []
    for uid, items in groups.items():
        ds = items[0][1]
        modality = str(getattr(ds, "Modality", ""))
        sop = sop_class(ds)
        image_type = [str(v).upper() for v in getattr(ds, "ImageType", [])]
        if modality != "CT" or sop != CT_IMAGE_STORAGE:
            notes.append(f"series {uid}: skipped, not a CT image series (Modality {modality or '?'}, SOP class {sop})")
            continue
        if "LOCALIZER" in image_type:
            notes.append(f"series {uid}: skipped, localizer")
            continue
        if "DERIVED" in image_type and not include_derived:
            notes.append(f"series {uid}: skipped, DERIVED images are not processed again")
            continue
        try:
            found.append(order_series(uid, items))
        except SeriesError as exc:
            notes.append(str(exc))
    return found, notes
