"""DICOM Structured Report of the lesions: a TID 1500 Measurement Report, built with highdicom.

The SEG shows where the node intervened; it does not say how big each lesion was, how
bright, how much of the image was replaced around it, nor how sure the engine was. The
job's lesion table says so, but only to whoever reads the node's logs. The SR carries
it in the study, coded, beside the images: one measurement group per lesion, each
pointing at the SEG segment and at the source slices it was measured on, so a viewer or
a registry can read the numbers without our software, and a reader can check an unsure
restoration on the original series.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr.templates import DEFAULT_LANGUAGE  # what MeasurementReport writes
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node import __version__
from dicom_node.pipeline.derived import MANUFACTURER, contributing_equipment, derived_uid, save_atomic
from dicom_node.pipeline.detect import Detection, Lesion
from dicom_node.pipeline.restore import RegionReport
from dicom_node.pipeline.seg import CALCIFICATION, _source_headers
from dicom_node.pipeline.series import Series

log = logging.getLogger(__name__)

# SNOMED CT 419545005 "CT angiography of coronary arteries": pydicom's codes.SCT (CID 3757 "Cardiac
# Diagnostic Procedure" in PS3.16). TID 1500 takes the procedure reported from the extensible CID 100.
PROCEDURE = codes.SCT.CTAngiographyOfCoronaryArteries
# (C0034375, UMLS, "Qualitative Evaluations"): TID 1500's container for evaluations of the whole
# report, used when there is no lesion to measure (pydicom has no keyword for it).
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")

# No standard concept names what only this engine measures (voxels its restoration replaced, how far
# a restoration moved when the input was mirrored, what it did with an unsure region), so they are
# private codes (PS3.16 8.2: designators beginning "99"), identified in the Coding Scheme
# Identification Sequence of every report that uses them. Code values are SH: 16 characters at most.
PRIVATE_SCHEME = "99DCMNODE"
VOXELS_RESTORED = Code("RESTORED-VOXELS", PRIVATE_SCHEME, "Voxels restored in the lesion's region")
FLIP_DISAGREEMENT = Code("FLIP-DISAGREE", PRIVATE_SCHEME, "Restoration flip disagreement")
BLUR_DISAGREEMENT = Code("BLUR-DISAGREE", PRIVATE_SCHEME, "Restoration blur disagreement")
DISAGREEMENTS = {"flip": FLIP_DISAGREEMENT, "blur": BLUR_DISAGREEMENT}  # RegionReport.measure → its code
RESTORATION_UNSURE = Code("UNSURE", PRIVATE_SCHEME, "Restoration unsure")
VESSEL_CALIBRE = Code("VESSEL-CALIBRE", PRIVATE_SCHEME, "Vessel calibre at the restoration")
# ... and the level of that vessel's lumen: beside a dim lumen a restoration's residue reads as lumen more often
LUMEN_LEVEL = Code("LUMEN-LEVEL", PRIVATE_SCHEME, "Lumen level at the restoration")
RESTORATION = Code("RESTORATION", PRIVATE_SCHEME, "Restoration")
# With several learnt calcium estimates (engine.subtract_companions): which one's restoration the region got, and,
# under subtract_combine = "enclosed", how far its calcium encloses the lumen (0-1: restore.calcium_enclosure)
ESTIMATE_WRITTEN = Code("CA-ESTIMATE", PRIVATE_SCHEME, "Calcium estimate written")
CALCIUM_ENCLOSURE = Code("CA-ENCLOSURE", PRIVATE_SCHEME, "Calcium enclosure of the lumen")
ACTIONS = {  # RegionReport.action → its coded value
    "restored": Code("RESTORED", PRIVATE_SCHEME, "Restored"),
    "restored, unsure": Code("RESTORED-UNSURE", PRIVATE_SCHEME, "Restored, unsure"),
    "restored, unsure, lumen kept": Code("RESTORED-KEPT", PRIVATE_SCHEME, "Restored, unsure, visible lumen kept"),
    "left as acquired (unsure)": Code("LEFT-AS-ACQUIRED", PRIVATE_SCHEME, "Left as acquired (unsure)"),
}
VOXELS = Code("{voxels}", "UCUM", "voxels")  # a count: UCUM unity with an annotation
CALCIUM_SEGMENT = 1  # seg.write_seg: "Calcium removed"
UNSURE_SEGMENT = 3  # seg.write_seg: only when some restoration was unsure


def estimate_code(index: int | None, name: str) -> Code:
    """The coded value of ``ESTIMATE_WRITTEN``: the first estimate, the k-th companion, or the mean of them all;
    the meaning names the file (LO: 64 characters)."""
    if index is None:
        return Code("MEAN-ESTIMATES", PRIVATE_SCHEME, f"Learnt calcium estimates, {name}"[:64])
    value = "FIRST-ESTIMATE" if index == 0 else f"COMPANION-{index}"
    return Code(value, PRIVATE_SCHEME, f"Learnt calcium estimate {name}"[:64])


def patient_position(series: Series, centroid: tuple[float, float, float]) -> tuple[float, float, float]:
    """A (z, y, x) voxel-index position as patient coordinates (mm), from the slices' own geometry.

    In-plane from the slice's ImagePositionPatient, ImageOrientationPatient and PixelSpacing (row
    spacing first); between slices, linear between the two neighbouring slices' positions, so an
    uneven spacing is followed rather than assumed away.
    """
    z, y, x = centroid
    last = len(series.headers) - 1
    z0 = int(np.clip(np.floor(z), 0, last))
    z1 = min(z0 + 1, last)

    def at(h: pydicom.Dataset) -> np.ndarray:
        iop = np.asarray(h.ImageOrientationPatient, float)
        dy, dx = (float(v) for v in h.PixelSpacing)
        return np.asarray(h.ImagePositionPatient, float) + x * dx * iop[:3] + y * dy * iop[3:]

    a, b = at(series.headers[z0]), at(series.headers[z1])
    p = a + (z - z0) * (b - a) if z1 != z0 else a
    return float(p[0]), float(p[1]), float(p[2])


def _report_for(lesion: Lesion, reports: list[RegionReport]) -> RegionReport | None:
    return next((r for r in reports if lesion.index in r.lesions), None)


def _group(lesion: Lesion, region: RegionReport | None, series: Series, headers: list[pydicom.Dataset],
           seg: pydicom.Dataset, segment: int, uids: dict[str, str],
           algorithm: hd.sr.AlgorithmIdentification) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """One lesion's TID 1411 measurement group."""
    # The whole segment (a SOP reference may name a segment or frames, not both: PS3.3 C.10.5), and
    # the source slices that hold this lesion: every slice of its range holds some of it (26-connected).
    slices = headers[lesion.bbox[0]]
    roi = hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=segment,
        source_images=[hd.sr.SourceImageForSegmentation(h.SOPClassUID, h.SOPInstanceUID) for h in slices])
    # The position goes into the human-readable tracking identifier. A TID 1411 group has exactly one
    # ROI, here the segment (a Volume Surface of a point would replace it), highdicom refuses spatial
    # coordinates in the measurements of such a group, and no standard concept names a centroid's
    # coordinates as numbers. The tracking identifier is free text, and what a reader finds a lesion by.
    x, y, z = patient_position(series, lesion.centroid)
    where = f" (region {region.region})" if region is not None else ""
    tracking = hd.sr.TrackingIdentifier(
        uid=derived_uid("sr-lesion", uids["sr"], str(lesion.index)),
        identifier=f"Lesion {lesion.index}{where} at x={x:.1f} y={y:.1f} z={z:.1f} mm (patient)")
    measurements = [
        hd.sr.Measurement(name=codes.SCT.Volume, value=float(lesion.volume_mm3), unit=codes.UCUM.CubicMillimeter,
                          method=codes.DCM.SumOfSegmentedVoxelMethodForVolume),
        hd.sr.Measurement(name=codes.DCM.AttenuationCoefficient, value=float(lesion.peak_hu),
                          unit=codes.UCUM.HounsfieldUnit, derivation=codes.SCT.Maximum),
        # per region, not per lesion: lesions restored together share the replaced voxels
        hd.sr.Measurement(name=VOXELS_RESTORED, value=int(region.voxels) if region is not None else 0,
                          unit=VOXELS),
    ]
    evaluations = []
    if region is not None:
        # without its second pass or the calibre rule the engine cannot tell, so it neither measures nor
        # says whether it was sure
        if region.disagreement_hu is not None:
            measurements.append(hd.sr.Measurement(name=DISAGREEMENTS[region.measure],
                                                  value=float(region.disagreement_hu),
                                                  unit=codes.UCUM.HounsfieldUnit, derivation=codes.SCT.Mean))
        if region.vessel_mm is not None:  # its own vessel's widest lumen (vessel.vessel_calibre_mm)
            measurements.append(hd.sr.Measurement(name=VESSEL_CALIBRE, value=round(float(region.vessel_mm), 1),
                                                  unit=codes.UCUM.Millimeter, derivation=codes.SCT.Maximum))
        if region.lumen_hu is not None:  # the median on that lumen's core (vessel.vessel_at)
            measurements.append(hd.sr.Measurement(name=LUMEN_LEVEL, value=round(float(region.lumen_hu)),
                                                  unit=codes.UCUM.HounsfieldUnit, derivation=codes.SCT.Median))
        if region.disagreement_hu is not None or region.vessel_mm is not None:
            evaluations.append(hd.sr.QualitativeEvaluation(RESTORATION_UNSURE,
                                                           codes.SCT.Yes if region.unsure else codes.SCT.No))
        if region.enclosure is not None:
            measurements.append(hd.sr.Measurement(name=CALCIUM_ENCLOSURE, value=round(float(region.enclosure), 2),
                                                  unit=codes.UCUM.NoUnits))
        if region.estimate:
            evaluations.append(hd.sr.QualitativeEvaluation(ESTIMATE_WRITTEN,
                                                           estimate_code(region.estimate_index, region.estimate)))
        action = ACTIONS.get(region.action)
        if action is not None:
            evaluations.append(hd.sr.QualitativeEvaluation(RESTORATION, action))
        else:
            log.warning("lesion %d: unknown restoration action %r left out of the report", lesion.index,
                        region.action)
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, referenced_segment=roi, finding_type=CALCIFICATION,
        finding_category=codes.SCT.MorphologicallyAbnormalStructure, algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.CoronaryArtery)],
        measurements=measurements, qualitative_evaluations=evaluations or None)


def _report_without_lesions(context: hd.sr.ObservationContext) -> hd.sr.ContentSequence:
    """TID 1500 for a series with no lesion: calcification "Absent" under Qualitative Evaluations.

    highdicom's MeasurementReport insists on at least one measurement group; the template asks only
    for one of its Imaging Measurements, Derived Imaging Measurements or Qualitative Evaluations
    containers, so the report is put together here from the same highdicom items.
    """
    root = hd.sr.ContainerContentItem(name=codes.cid7021.ImagingMeasurementReport, template_id="1500")
    root.ContentSequence = hd.sr.ContentSequence()
    root.ContentSequence.extend(hd.sr.LanguageOfContentItemAndDescendants(DEFAULT_LANGUAGE))
    root.ContentSequence.extend(context)
    root.ContentSequence.append(hd.sr.CodeContentItem(
        name=codes.DCM.ProcedureReported, value=PROCEDURE,
        relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD))
    evaluations = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS,
                                             relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    evaluations.ContentSequence = hd.sr.ContentSequence([hd.sr.CodeContentItem(
        name=CALCIFICATION, value=codes.SCT.Absent, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)])
    root.ContentSequence.append(evaluations)
    return hd.sr.ContentSequence([root], is_root=True)


def _first_evidence(header: pydicom.Dataset, seg: pydicom.Dataset) -> pydicom.Dataset:
    """The first source slice, as highdicom takes patient, study and acquisition equipment from it.

    highdicom reads the patient and study attributes of the first piece of evidence without a
    fallback, and anonymisers strip some of them: missing ones are taken from the SEG, which
    carries them as every derived object of the series does.
    """
    header = copy.copy(header)
    for kw in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
               "StudyDate", "StudyTime"):
        if kw not in header:
            setattr(header, kw, getattr(seg, kw, "") or "")
    return header


def write_report(series: Series, detection: Detection, reports: list[RegionReport], seg: pydicom.Dataset | Path,
                 out_dir: Path, model_id: str, uids: dict[str, str], series_number: int) -> Path:
    """Write a Comprehensive 3D SR (TID 1500 Measurement Report) of the lesions; returns its path.

    One TID 1411 measurement group per lesion of ``detection``: its ROI is the SEG that
    :func:`dicom_node.pipeline.seg.write_seg` wrote with the same ``uids`` (``seg``, as a data set
    or its file), segment 1 "Calcium removed", or segment 3 for a lesion whose restoration was
    unsure (when the SEG has it), with the source slices the lesion lies on.
    Each group gives the lesion's volume and peak HU, the voxels restored in its region, the flip
    disagreement when there was one, whether the restoration was unsure and what was done, and the
    lesion's position in the human-readable tracking identifier. ``reports`` are the engine's region
    reports; a lesion in none of them is reported with 0 voxels restored and no evaluation.
    UIDs are ``uids["sr_series"]`` and ``uids["sr"]`` (:func:`dicom_node.pipeline.derived.source_uids`),
    so re-processing a series replaces its report rather than adding a second one.

    The caller writes no report for a series without lesions (there is no SEG either); called
    anyway, this writes a valid report that says calcification is absent.
    """
    seg_ds = pydicom.dcmread(seg, stop_before_pixels=True) if isinstance(seg, str | Path) else seg
    if str(seg_ds.SOPInstanceUID) != uids["seg"]:
        raise ValueError(f"SEG {seg_ds.SOPInstanceUID} is not this series' SEG ({uids['seg']})")
    numbers = {int(s.SegmentNumber) for s in seg_ds.SegmentSequence}
    if CALCIUM_SEGMENT not in numbers:
        raise ValueError(f"SEG {seg_ds.SOPInstanceUID} has no segment {CALCIUM_SEGMENT} (calcium removed)")
    headers = _source_headers(series, uids)
    algorithm = hd.sr.AlgorithmIdentification(name="dicom-node Dense-Unet calcium removal",
                                              version=f"{__version__} {model_id}"[:64])
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid("sr-device", model_id), name="dicom-node", manufacturer_name=MANUFACTURER,
        model_name=f"dicom-node calcium removal {model_id}"[:64])
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.cid270.Device, observer_identifying_attributes=device))
    groups = []
    for lesion in detection.lesions:
        region = _report_for(lesion, reports)
        segment = CALCIUM_SEGMENT
        if region is not None and region.unsure:
            if UNSURE_SEGMENT in numbers:
                segment = UNSURE_SEGMENT
            else:
                log.warning("lesion %d is unsure but SEG %s has no segment %d; pointing at segment %d",
                            lesion.index, seg_ds.SOPInstanceUID, UNSURE_SEGMENT, CALCIUM_SEGMENT)
        groups.append(_group(lesion, region, series, headers, seg_ds, segment, uids, algorithm))
    if groups:
        content: hd.sr.ContentSequence = hd.sr.MeasurementReport(
            observation_context=context, procedure_reported=PROCEDURE, imaging_measurements=groups)
    else:
        content = _report_without_lesions(context)
    sr = hd.sr.Comprehensive3DSR(
        # evidence: the whole series the lesions were looked for in (a slice without one is a finding
        # too), and the SEG
        evidence=[_first_evidence(headers[0], seg_ds), *headers[1:], seg_ds], content=content[0],
        series_instance_uid=uids["sr_series"], series_number=series_number, sop_instance_uid=uids["sr"],
        instance_number=1, manufacturer=MANUFACTURER, manufacturer_model_name="dicom-node calcium removal",
        software_versions=__version__, device_serial_number="0",
        series_description=f"{series.description[:40]} CALCIUM REMOVED REPORT".strip(),
        # complete: every lesion the engine found is in it; unverified and preliminary: no one has read
        # it, and it measures what a research model did
        is_complete=True, is_verified=False, is_final=False,
        coding_schemes=[CodingSchemeIdentificationItem(designator=PRIVATE_SCHEME, name="dicom-node calcium removal",
                                                       responsible_organization=MANUFACTURER)] if groups else None,
        contributing_equipment=[contributing_equipment(model_id, "lesion measurements of calcium removal")])
    out_dir.mkdir(parents=True, exist_ok=True)
    return save_atomic(sr, out_dir / f"SR_{uids['sr']}.dcm")
