"""DICOM SEG of what was removed and what was restored, built with highdicom.

The derived images alone would hide where the node intervened. The SEG lets a
viewer overlay, on the original series, the calcium that was taken out and the
whole region whose values were replaced (calcium plus blooming margin).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from highdicom.color import CIELabColor
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node import __version__
from dicom_node.pipeline.derived import MANUFACTURER, contributing_equipment, instance_uid, save_atomic
from dicom_node.pipeline.restore import CONFIDENCE_MEASURES, METHOD_TEXT
from dicom_node.pipeline.series import Series

CALCIFICATION = Code("18115005", "SCT", "Pathologic calcification")
REGION_IN_SPACE = Code("130488", "DCM", "Region in Space")
# Recommended display colours, so every viewer shows the same thing the same way (OHIF warns and
# picks its own without them): the calcium taken out red, the restored region green, and calcium
# whose restoration the engine doubts magenta.
CALCIUM_COLOR = CIELabColor.from_rgb(230, 40, 40)
RESTORED_COLOR = CIELabColor.from_rgb(40, 200, 80)
UNSURE_COLOR = CIELabColor.from_rgb(220, 40, 220)


def algorithm(model_id: str, parameters: dict[str, str], method: str = "network",
              ) -> hd.AlgorithmIdentificationSequence:
    """The SEG's algorithm: the Dense-Unet (an AI family) or the blur subtraction (an adaptive filter)."""
    text = METHOD_TEXT[method]
    return hd.AlgorithmIdentificationSequence(name=text.algorithm, family=getattr(codes.cid7162, text.family),
                                              version=f"{__version__} {model_id}"[:64], parameters=parameters)


def _source_headers(series: Series, uids: dict[str, str], slices: Iterable[int] | None = None
                    ) -> list[pydicom.Dataset]:
    """Source headers (all, or those of ``slices``) with the UIDs the derived objects use (stand-ins where
    the source had none)."""
    out = []
    for h in series.headers if slices is None else (series.headers[i] for i in slices):
        h = copy.copy(h)
        h.SOPInstanceUID = instance_uid(h)
        if "SOPClassUID" not in h or not h.SOPClassUID:
            h.SOPClassUID = h.file_meta.MediaStorageSOPClassUID
        h.StudyInstanceUID = uids["study"]
        h.FrameOfReferenceUID = uids["frame"]
        if not getattr(h, "SeriesInstanceUID", ""):
            h.SeriesInstanceUID = series.uid if series.uid[0].isdigit() else uids["series"]
        out.append(h)
    return out


def _confidence_text(reports: list) -> str:
    """Each region's disagreement (the method's measure), or, where no second pass measured one (the
    subtraction's default), its vessel's calibre (mm), for a segment's description; ``!`` marks the unsure
    (LO: 64 characters; cut with "...": the SEG's text is ASCII, and a "…" was written as "?")."""
    measured = [r for r in reports if r.disagreement_hu is not None]
    if measured:
        label, values = f"{CONFIDENCE_MEASURES[measured[0].measure]} HU", [(r, f"{r.disagreement_hu:.0f}")
                                                                           for r in measured]
    else:
        label, values = "vessel calibre mm", [(r, f"{r.vessel_mm:.1f}") for r in reports if r.vessel_mm is not None]
    if not values:
        return ""
    text = f"{label} by region: " + " ".join(f"{r.region}={v}{'!' if r.unsure else ''}" for r, v in values)
    return text if len(text) <= 64 else text[:61] + "..."


def write_seg(series: Series, calcium: np.ndarray, restored: np.ndarray, out_dir: Path, model_id: str,
              uids: dict[str, str], parameters: dict[str, str], series_number: int,
              unsure: np.ndarray | None = None, reports: list | None = None, method: str = "network") -> Path:
    """Write a binary SEG referencing the source series; returns its path.

    Segments: 1 the calcium removed, 2 the region restored (its description gives each
    region's flip or blur disagreement, ``!`` marking the unsure), and 3, only when a restoration
    was unsure, that calcium: restored and marked, or left as acquired, as ``reports`` say.
    """
    algo = algorithm(model_id, parameters, method)
    named = METHOD_TEXT[method]
    segments = [
        hd.seg.SegmentDescription(
            segment_number=1, segment_label="Calcium removed",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=CALCIFICATION, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo, anatomic_regions=[codes.SCT.CoronaryArtery], display_color=CALCIUM_COLOR),
        hd.seg.SegmentDescription(
            segment_number=2, segment_label="Restored region",
            segmented_property_category=codes.SCT.SpatialAndRelationalConcept,
            segmented_property_type=REGION_IN_SPACE, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo, display_color=RESTORED_COLOR),
    ]
    text = _confidence_text(reports or [])
    if text:
        segments[1].SegmentDescription = text
    masks = [calcium, restored]
    if unsure is not None and unsure.any():
        left = any(r.unsure and r.voxels == 0 for r in reports or [])
        segments.append(hd.seg.SegmentDescription(
            segment_number=3, segment_label="Unsure: left as acquired" if left else "Unsure restoration",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=CALCIFICATION, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo, anatomic_regions=[codes.SCT.CoronaryArtery], display_color=UNSURE_COLOR))
        segments[2].SegmentDescription = ("calcium whose restoration the engine is unsure of; read on the "
                                          "original")[:64]
        masks.append(unsure)
    # Only the slices that hold a segment: highdicom would otherwise expand the whole series'
    # masks (several copies of a 600-slice volume) just to drop the empty frames again.
    used = np.flatnonzero(np.logical_or.reduce([m.any(axis=(1, 2)) for m in masks]))
    if used.size == 0:
        used = np.array([0])
    headers = _source_headers(series, uids, used)
    # (frames, rows, columns, segments) as highdicom wants it, but laid out segment by segment in memory:
    # highdicom's overlap check sums over the segments, and adding whole planes takes a fifth of the time
    # that adding pairs of neighbouring bytes does (that sum was half of the SEG's time). Same SEG.
    pixels = np.moveaxis(np.stack([m[used] for m in masks]).astype(np.uint8), 0, -1)
    seg = hd.seg.Segmentation(
        source_images=headers, pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=segments,
        series_instance_uid=uids["seg_series"], series_number=series_number, sop_instance_uid=uids["seg"],
        instance_number=1, manufacturer=MANUFACTURER, manufacturer_model_name="dicom-node calcium removal",
        software_versions=__version__, device_serial_number="0",
        series_description=(f"{series.description[:40]} CALCIUM REMOVED SEG").strip(),
        content_label="CALCIUM", content_description=f"Calcium removed and region restored by {named.short}",
        contributing_equipment=[contributing_equipment(model_id, f"calcium removal by {named.words}")],
        omit_empty_frames=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    return save_atomic(seg, out_dir / f"SEG_{uids['seg']}.dcm")
