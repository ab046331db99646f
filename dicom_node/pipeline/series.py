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
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicom_node.pipeline.structure import MAX_ELEMENT_MB, MAX_SEQUENCE_DEPTH, structure_problem

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
# One instance holds the whole volume: a CT the user wants processed, in a form we do not read (yet).
MULTIFRAME_CT_STORAGE = {"1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
                         "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage"}
# Limits checked before anything is allocated, so a forged header cannot make us ask for gigabytes.
MAX_MATRIX = 4096  # rows or columns of one slice; CT reconstructs 512 to 2048
MAX_VOXELS = 1 << 30  # one series (4 GiB as float32); a 1000-slice 1024x1024 CTA still fits
MAX_POSITION_MM = 1e6  # |ImagePositionPatient| beyond this is a broken header, not a patient
PIXEL_DATA = 0x7FE00010
MANUFACTURER = "dicom-node"  # in ContributingEquipmentSequence (and Manufacturer) of everything we write
# Image types refused as input besides our own output: ImageType values, matched from the first value on
# (config: intake.refuse_image_types). Scanners mark many reconstructions and console reformats
# DERIVED\PRIMARY (a Toshiba Aquilion ONE cardiac MPR is one), so DERIVED alone refuses nothing.
REFUSED_IMAGE_TYPES = ("DERIVED\\SECONDARY",)
PROCESSABLE_PHOTOMETRIC = ("MONOCHROME2", "MONOCHROME1")  # both map stored values to HU through the rescale


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

    @property
    def kernel(self) -> str:
        """The reconstruction kernel (ConvolutionKernel, values joined by a backslash); "" when not stated."""
        value = getattr(self.headers[0], "ConvolutionKernel", None)
        if value is None:
            return ""
        return "\\".join(str(v) for v in value) if isinstance(value, MultiValue) else str(value)


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


def _numbers(ds: Dataset, keyword: str, count: int) -> np.ndarray | str:
    """``count`` finite numbers from a multi-valued attribute, or why not (a header can hold anything)."""
    try:
        elem = ds.get_item(keyword)
        if elem is None:
            return f"{keyword} is missing"
        value = elem.value
        if isinstance(value, bytes):  # still raw (DS is text in every transfer syntax): 10x cheaper than pydicom's
            items: list = value.decode("latin-1").strip(" \x00").split("\\") if value.strip(b" \x00") else []
        else:
            items = [value] if isinstance(value, str | int | float) else list(value or [])
        arr = np.asarray([float(v) for v in items], float)
    except Exception:  # noqa: BLE001 - converting a raw value raises anything (e.g. BytesLengthException)
        return f"{keyword} is not {count} numbers"
    if arr.shape != (count,) or not np.all(np.isfinite(arr)):
        return f"{keyword} is not {count} finite numbers"
    return arr


def geometry_problem(ds: Dataset) -> str | None:
    """Why one slice's geometry cannot place it in a volume, or None: orientation (two orthogonal unit
    vectors), position, pixel spacing and size must all be present and sane."""
    iop = _numbers(ds, "ImageOrientationPatient", 6)
    if isinstance(iop, str):
        return iop
    row, col = iop[:3], iop[3:]
    if abs(np.linalg.norm(row) - 1) > 0.01 or abs(np.linalg.norm(col) - 1) > 0.01 or abs(np.dot(row, col)) > 0.01:
        return "ImageOrientationPatient is not two orthogonal unit vectors"
    ipp = _numbers(ds, "ImagePositionPatient", 3)
    if isinstance(ipp, str):
        return ipp
    if np.any(np.abs(ipp) > MAX_POSITION_MM):
        return f"ImagePositionPatient lies beyond {MAX_POSITION_MM:g} mm"
    spacing = _numbers(ds, "PixelSpacing", 2)
    if isinstance(spacing, str):
        return spacing
    if np.any(spacing <= 0) or np.any(spacing > 1000):
        return f"PixelSpacing {spacing[0]:g}, {spacing[1]:g} is not between 0 and 1000 mm"
    for keyword in ("Rows", "Columns"):
        try:
            n = int(getattr(ds, keyword))
        except Exception:  # noqa: BLE001 - as in _numbers
            return f"{keyword} is missing or not a number"
        if not 1 <= n <= MAX_MATRIX:
            return f"{keyword} {n} is outside 1..{MAX_MATRIX}"
    return None


def truncated_element(ds: Dataset) -> str | None:
    """The element whose value stops short, when a file or a transfer was cut off; else None.

    pydicom keeps whatever bytes arrived without complaint, so only the declared length tells.
    """
    for tag in tuple(ds.keys()):  # iterating the Dataset itself would convert every value
        elem = ds.get_item(tag)
        if (isinstance(elem, RawDataElement) and elem.length != 0xFFFFFFFF and elem.value is not None
                and len(elem.value) < elem.length):
            return f"truncated: element {tag} declares {elem.length} bytes but only {len(elem.value)} arrived"
    return None


def image_problem(ds: Dataset, pixels: bool = True) -> str | None:
    """Why a CT Image Storage instance cannot be one slice of a volume, or None.

    Checked on arrival, from the header alone (nothing decoded or allocated), so the sender sees a
    failure status for the broken instance instead of its whole series failing later.
    """
    values: dict[str, int] = {}
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation"):
        try:
            values[keyword] = int(getattr(ds, keyword))
        except Exception:  # noqa: BLE001 - as in _numbers
            return f"{keyword} is missing or not a number"
    rows, cols, bits = values["Rows"], values["Columns"], values["BitsAllocated"]
    if not (1 <= rows <= MAX_MATRIX and 1 <= cols <= MAX_MATRIX):
        return f"declared size {rows}x{cols} is outside 1..{MAX_MATRIX}"
    if bits != 16:
        return f"BitsAllocated {bits}: the CT Image IOD requires 16"
    if not 1 <= values["BitsStored"] <= bits:
        return f"BitsStored {values['BitsStored']} does not fit BitsAllocated {bits}"
    if values["PixelRepresentation"] not in (0, 1):
        return f"PixelRepresentation {values['PixelRepresentation']} is neither 0 nor 1"
    try:
        samples = int(getattr(ds, "SamplesPerPixel", 1))
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    except Exception:  # noqa: BLE001 - as in _numbers
        return "SamplesPerPixel or NumberOfFrames is not a number"
    if samples != 1:
        return f"SamplesPerPixel {samples}: CT is monochrome"
    photometric = str(getattr(ds, "PhotometricInterpretation", "") or "").strip().upper()
    if photometric not in PROCESSABLE_PHOTOMETRIC:
        return (f"PhotometricInterpretation {photometric or '(missing)'}: the CT Image IOD allows only "
                "MONOCHROME2 or MONOCHROME1, grey values that map to HU")
    if frames != 1:
        return f"NumberOfFrames {frames}: CT Image Storage holds one slice per instance"
    problem = geometry_problem(ds)
    if problem or not pixels:
        return problem
    elem = ds.get_item(PIXEL_DATA)
    if elem is None or elem.value is None:
        return "no Pixel Data"
    encapsulated = elem.length == 0xFFFFFFFF if isinstance(elem, RawDataElement) else elem.is_undefined_length
    data = elem.value
    if encapsulated:
        if bytes(data[:4]) != b"\xfe\xff\x00\xe0":
            return "compressed Pixel Data does not start with an item (not encapsulated)"
        return None
    need = rows * cols * (bits // 8)
    if len(data) != need:
        return f"Pixel Data holds {len(data)} bytes where {rows}x{cols} pixels of {bits} bits need exactly {need}"
    return None


def is_our_output(ds: Dataset) -> bool:
    """True for anything we wrote (our mark in ContributingEquipmentSequence, or ours as Manufacturer):
    our own output never loops back into processing, whatever route brought it here."""
    if str(getattr(ds, "Manufacturer", "")) == MANUFACTURER:
        return True
    return any(str(getattr(item, "Manufacturer", "")) == MANUFACTURER
               for item in getattr(ds, "ContributingEquipmentSequence", []))


def image_type_refusal(ds: Dataset, refused: Iterable[str] = REFUSED_IMAGE_TYPES) -> str | None:
    """Why an image is refused for what it is (our output, a localizer, a listed image type), or None."""
    if is_our_output(ds):
        return "our own output (dicom-node in ContributingEquipmentSequence)"
    image_type = [str(v).strip().upper() for v in getattr(ds, "ImageType", [])]
    if "LOCALIZER" in image_type:
        return "localizer"
    for entry in refused:
        want = [v.strip().upper() for v in entry.split("\\")]
        if image_type[:len(want)] == want:
            shown = "\\".join(image_type)
            return f"ImageType {shown} is in intake.refuse_image_types ({entry})"
    return None


def slice_problem(ds: Dataset, include_derived: bool = False,
                  refused: Iterable[str] = REFUSED_IMAGE_TYPES) -> str | None:
    """Why an instance is not a slice of a CT volume we process, or None. ``include_derived`` reads our
    own output back (evaluation)."""
    modality = str(getattr(ds, "Modality", ""))
    sop = sop_class(ds)
    if modality == "CT" and sop in MULTIFRAME_CT_STORAGE:
        return (f"{MULTIFRAME_CT_STORAGE[sop]} (multi-frame) is not supported: have the scanner or PACS send "
                "the series as CT Image Storage, one slice per instance")
    if modality != "CT" or sop != CT_IMAGE_STORAGE:
        return f"not a CT image series (Modality {modality or '?'}, SOP class {sop or '?'})"
    if include_derived:
        return None
    return image_type_refusal(ds, refused)


def group_series(files: Iterable[Path], max_depth: int = MAX_SEQUENCE_DEPTH, max_element_mb: int = MAX_ELEMENT_MB,
                 ) -> tuple[dict[str, list[tuple[Path, Dataset]]], list[str]]:
    """Read headers only and group them by SeriesInstanceUID; unreadable files are reported, and so are
    files past the structural limits (``max_depth`` 0: unchecked)."""
    groups: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    problems: list[str] = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            key = series_key(ds)
            problem = structure_problem(ds, max_depth, max_element_mb << 20)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported, not fatal
            problems.append(f"{f}: not readable as DICOM ({exc.__class__.__name__})")
            continue
        if problem:  # pydicom copies and writes sequences by recursion: such a file must not reach the writer
            problems.append(f"{f}: left out, {problem}")
            continue
        groups[key].append((f, ds))
    return groups, problems


def slice_normal(ds: Dataset) -> np.ndarray:
    iop = np.asarray(ds.ImageOrientationPatient, float)
    return np.cross(iop[:3], iop[3:])


def order_series(uid: str, items: list[tuple[Path, Dataset]], tolerance: float = 0.05) -> Series:
    """Sort slices along the normal and check the geometry is a regular volume."""
    if not items:
        raise SeriesError(f"series {uid}: no slices")
    first = items[0][1]
    for attr in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "Rows", "Columns"):
        if not all(attr in ds for _, ds in items):  # no hasattr: converting a broken value may raise
            raise SeriesError(f"series {uid}: some slices lack {attr}")
    for _, ds in items:
        problem = geometry_problem(ds)
        if problem:
            raise SeriesError(f"series {uid}: instance {getattr(ds, 'SOPInstanceUID', '?')}: {problem}")
    iop = np.asarray(first.ImageOrientationPatient, float)
    rows, cols = int(first.Rows), int(first.Columns)
    for _, ds in items:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, float), iop, atol=1e-3):
            raise SeriesError(f"series {uid}: slices have different orientations")
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise SeriesError(f"series {uid}: slices have different sizes "
                              f"({ds.Rows}x{ds.Columns} vs {rows}x{cols})")
        if not np.allclose(np.asarray(ds.PixelSpacing, float), np.asarray(first.PixelSpacing, float), atol=1e-4):
            raise SeriesError(f"series {uid}: slices have different pixel spacing")
    try:
        frames = {str(getattr(ds, "FrameOfReferenceUID", "") or "") for _, ds in items} - {""}
    except Exception as exc:  # noqa: BLE001 - as in _numbers
        raise SeriesError(f"series {uid}: unreadable FrameOfReferenceUID ({exc.__class__.__name__})") from exc
    if len(frames) > 1:
        raise SeriesError(f"series {uid}: slices belong to {len(frames)} frames of reference (mixed acquisitions)")
    if len(items) * rows * cols > MAX_VOXELS:
        raise SeriesError(f"series {uid}: {len(items)} slices of {rows}x{cols} exceed the {MAX_VOXELS} voxel limit")
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


NATIVE_SYNTAXES = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})  # implicit and explicit VR little endian


def native_pixels(ds: Dataset) -> np.ndarray | None:
    """The one 16-bit frame of an uncompressed little-endian slice, read straight from its bytes; None for
    anything else (the caller asks pydicom).

    What pydicom's ``pixel_array`` gives for such a slice (the bits above Bits Stored cleared, or filled
    with the sign; excess padding dropped), without its decoder's per-call set-up, which cost 0.8 ms a slice: a fifth
    of loading a 512x512x256 series.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is None or str(meta.get("TransferSyntaxUID", "")) not in NATIVE_SYNTAXES:
        return None
    if (ds.get("BitsAllocated") != 16 or ds.get("SamplesPerPixel", 1) != 1
            or ds.get("PixelRepresentation") not in (0, 1) or int(ds.get("NumberOfFrames", 1) or 1) != 1
            or "PixelData" not in ds):
        return None
    rows, cols = int(ds.Rows), int(ds.Columns)
    data = ds.PixelData
    if not isinstance(data, bytes) or len(data) < rows * cols * 2:
        return None
    stored = ds.get("BitsStored")
    if not isinstance(stored, int) or not 1 <= stored <= 16:
        return None
    arr = np.frombuffer(data, "<i2" if ds.PixelRepresentation == 1 else "<u2", rows * cols).reshape(rows, cols)
    if stored < 16:  # as pydicom does: the unused high bits cleared, or filled with the sign
        arr = np.right_shift(np.left_shift(arr, 16 - stored), 16 - stored)
    return arr


def load_hu(series: Series, z0: int = 0, z1: int | None = None) -> np.ndarray:
    """Decode every slice (or slices [z0, z1)) and apply the modality LUT; one float32 volume, nothing more.

    A slice that does not decode to the series' size fails the series with its file named,
    never with a bare codec error; the volume is allocated only once a slice decoded to the
    declared size, so a forged header cannot make us ask for gigabytes.
    """
    first = series.headers[0]
    rows, cols = int(first.Rows), int(first.Columns)
    if not (1 <= rows <= MAX_MATRIX and 1 <= cols <= MAX_MATRIX) or len(series.files) * rows * cols > MAX_VOXELS:
        raise SeriesError(f"series {series.uid}: {len(series.files)} slices of {rows}x{cols} is too large")
    files = series.files[z0:z1]
    vol: np.ndarray | None = None  # allocated once the first slice proved the declared size real
    for i, f in enumerate(files, start=z0):
        try:
            ds = pydicom.dcmread(f)
            arr = native_pixels(ds)
            if arr is None:
                arr = ds.pixel_array
            slope = float(getattr(ds, "RescaleSlope", 1.0))
            intercept = float(getattr(ds, "RescaleIntercept", 0.0))
        except Exception as exc:  # noqa: BLE001 - codecs raise anything; the series fails with a reason
            raise SeriesError(f"series {series.uid}: slice {i + 1} ({f.name}) cannot be decoded: "
                              f"{exc.__class__.__name__}: {str(exc)[:300]}") from exc
        if arr.shape != (rows, cols):
            raise SeriesError(f"series {series.uid}: slice {i + 1} ({f.name}) decodes to {arr.shape}, "
                              f"not {rows}x{cols}")
        if not (np.isfinite(slope) and np.isfinite(intercept) and slope != 0):
            raise SeriesError(f"series {series.uid}: slice {i + 1} ({f.name}) has rescale slope {slope:g} "
                              f"and intercept {intercept:g}")
        if vol is None:
            vol = np.empty((len(files), rows, cols), np.float32)
        np.multiply(arr, slope, out=vol[i - z0], casting="unsafe")
        vol[i - z0] += intercept
    if vol is None:
        raise SeriesError(f"series {series.uid}: no slices")
    return vol


def read_ct_series(inputs: Iterable[str | Path], include_derived: bool = False, max_depth: int = MAX_SEQUENCE_DEPTH,
                   max_element_mb: int = MAX_ELEMENT_MB, refused: Iterable[str] = REFUSED_IMAGE_TYPES,
                   ) -> tuple[list[Series], list[str]]:
    """CT image series found under the inputs, and a line for everything skipped.

    ``include_derived`` is for reading our own output back (evaluation); processing never sets it.
    The node passes its [intake] limits, so a job reads its series under the same rules as arrival.
    """
    groups, notes = group_series(find_files(inputs), max_depth, max_element_mb)
    found: list[Series] = []
    for uid, items in groups.items():
        # Instance by instance: a report or localizer filed under the CT's series UID must not sink it.
        kept: list[tuple[Path, Dataset]] = []
        left_out: list[str] = []
        for f, ds in items:
            try:
                problem = slice_problem(ds, include_derived, refused)
            except Exception as exc:  # noqa: BLE001 - a value pydicom cannot convert
                problem = f"unreadable header ({exc.__class__.__name__})"
            if problem:
                left_out.append(problem)
            else:
                kept.append((f, ds))
        if not kept:
            notes.append(f"series {uid}: skipped, {left_out[0]}")
            continue
        if left_out:
            notes.append(f"series {uid}: {len(left_out)} instance(s) left out ({left_out[0]})")
        try:
            found.append(order_series(uid, kept))
        except SeriesError as exc:
            notes.append(str(exc))
    return found, notes
