"""The lesion report (TID 1500 Comprehensive 3D SR): what it says about each lesion, checked against the
engine's own record, validated with dciodvfy and read back with highdicom.

A phantom CTA goes through the DICOM path (written by the lab's phantom writer, read as a series) and
through the real engine, with a stand-in backend whose restoration moves, when mirrored, by an amount
that depends on each window's content: so the regions' flip disagreements differ, and a threshold
between them makes some lesions unsure and others not, which is what the report must tell apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from dicom_node.pipeline.derived import source_uids
from dicom_node.pipeline.detect import Detection, detect
from dicom_node.pipeline.report import (
    ACTIONS,
    CALCIUM_ENCLOSURE,
    DISAGREEMENTS,
    ESTIMATE_WRITTEN,
    LUMEN_LEVEL,
    RESTORATION,
    RESTORATION_UNSURE,
    VESSEL_CALIBRE,
    VOXELS_RESTORED,
    write_report,
)
from dicom_node.pipeline.restore import ConfidenceOptions, Engine, EngineResult
from dicom_node.pipeline.seg import CALCIFICATION, write_seg
from dicom_node.pipeline.series import Series, load_hu, read_ct_series
from dicom_node.pipeline.subtract import SubtractOptions
from dicom_node.pipeline.windows import PATCH
from dicom_node_lab import phantom
from dicom_node_lab.phantom_dicom import write_phantom_series

from .test_process import _dciodvfy_errors

MODEL = "test-model"
ORIGIN_MM = (-60.0, -60.0, -100.0)  # phantom_dicom.ct_series's default origin (x, y, z)


class SkewBackend:
    """Fills the mask; the +x half of each window by an amount that grows with the window's mean value,
    so a window and its mirror image disagree by a different amount in every region."""

    name = "skew"
    max_batch = 4

    def run(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        out = np.where(mask > 0.5, 123.0, image).astype(np.float32)
        for i in range(len(image)):
            inside = mask[i] > 0.5
            k = 0.2 * float(image[i][inside].mean()) if inside.any() else 0.0
            half = out[i, ..., PATCH // 2:]
            half[inside[..., PATCH // 2:]] = 123.0 + k
        return out


@dataclass
class Case:
    action: str
    p: phantom.Phantom
    series: Series
    result: EngineResult
    uids: dict[str, str]
    seg: Path
    sr: Path


def _phantom() -> phantom.Phantom:
    opts = phantom.PhantomOptions(n_vessels=(2, 2), calcified_probability=1.0, plaques_per_vessel=(2, 3),
                                  bone_probability=0.0, lesion_margin_mm=5.0)
    for seed in range(3, 40):
        p = phantom.generate((64, 80, 80), seed=seed, options=opts)
        if len(detect(p.image, p.spacing).lesions) >= 3:
            return p
    raise AssertionError("no phantom with three detectable lesions")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[phantom.Phantom, Series, np.ndarray]:
    p = _phantom()
    folder = tmp_path_factory.mktemp("report") / "in"
    write_phantom_series(p, folder)
    [series], _ = read_ct_series([folder])
    return p, series, load_hu(series)


@pytest.fixture(scope="module", params=[("network", "mark"), ("network", "leave"), ("subtract", "leave"),
                                        ("subtract", "guard")],
                ids=lambda p: "-".join(p))
def case(request, source, tmp_path_factory) -> Case:
    """The network (its flip disagreement, from SkewBackend) or the subtraction (its blur disagreement),
    with the unsure threshold between the regions' disagreements so that some are unsure and some not."""
    p, series, volume = source
    method, action = request.param
    backend = SkewBackend() if method == "network" else None
    calm = Engine(backend, confidence=ConfidenceOptions(unsure_hu=1e6), method=method,
                  subtract=SubtractOptions(unsure_hu=1e6)).run(volume.copy(), series.spacing)
    levels = sorted(r.disagreement_hu for r in calm.reports)
    assert len(calm.reports) >= 2 and levels[0] < levels[-1], "the case needs regions that disagree differently"
    middle = (levels[0] + levels[-1]) / 2
    # the calibre rule on but below any vessel: each region's calibre is measured and reported, none flagged by it
    result = Engine(backend, confidence=ConfidenceOptions(unsure_hu=middle, unsure_action=action,
                                                          unsure_vessel_mm=0.1), method=method,
                    subtract=SubtractOptions(unsure_hu=middle)).run(volume.copy(), series.spacing)
    assert {r.measure for r in result.reports} == {"flip" if method == "network" else "blur"}
    det = result.detection
    unsure = np.zeros(det.calcium.shape, bool)  # as process.py builds it for write_seg
    for r in result.reports:
        if r.unsure:
            for lesion in r.lesions:
                unsure |= det.labels == lesion
    uids = source_uids(series, MODEL)
    out = tmp_path_factory.mktemp(f"out-{method}-{action}")
    seg = write_seg(series, det.calcium, result.changed, out, MODEL, uids, {"threshold_hu": "700"}, 1001,
                    unsure=unsure, reports=result.reports, method=method)
    sr = write_report(series, det, result.reports, seg, out, MODEL, uids, 1002)
    return Case(action, p, series, result, uids, seg, sr)


def _groups(path: Path) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    return hd.sr.srread(path).content.get_volumetric_roi_measurement_groups()


def _lesion_number(group) -> int:
    return int(re.match(r"Lesion (\d+)\b", group.tracking_identifier).group(1))


def _measurement(group, name) -> float | None:
    found = [m.value for m in group.get_measurements(name=name)]
    assert len(found) <= 1
    return found[0] if found else None


def _evaluation(group, name):
    found = [e.value for e in group.get_qualitative_evaluations() if e.name == name]
    assert len(found) <= 1
    return found[0] if found else None


def test_one_group_per_lesion_pointing_at_the_seg_segment_and_the_slices_it_lies_on(case):
    det = case.result.detection
    seg = pydicom.dcmread(case.seg, stop_before_pixels=True)
    segments = {int(s.SegmentNumber) for s in seg.SegmentSequence}
    source_uids_ = [str(h.SOPInstanceUID) for h in case.series.headers]
    groups = _groups(case.sr)
    assert len(groups) == len(det.lesions) >= 3
    assert sorted(_lesion_number(g) for g in groups) == [lesion.index for lesion in det.lesions]
    region_of = {i: r for r in case.result.reports for i in r.lesions}
    assert {r.unsure for r in region_of.values()} == {True, False}, "the case must mix unsure and sure lesions"
    for g in groups:
        lesion = det.lesions[_lesion_number(g) - 1]
        region = region_of[lesion.index]
        ref = g.referenced_segment
        [segment_item] = [i for i in ref if i.name == codes.DCM.ReferencedSegment]
        sop = segment_item.ReferencedSOPSequence[0]
        assert sop.ReferencedSOPInstanceUID == seg.SOPInstanceUID == case.uids["seg"]
        assert sop.ReferencedSOPClassUID == seg.SOPClassUID
        number = int(sop.ReferencedSegmentNumber)
        assert number in segments
        assert number == (3 if region.unsure else 1), f"lesion {lesion.index}: unsure={region.unsure}"
        sources = [str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in ref
                   if i.name == codes.DCM.SourceImageForSegmentation]
        assert sources == source_uids_[lesion.bbox[0]], "the source slices of the lesion's range, in order"
        for uid in sources:  # and every one of them holds some of this lesion
            assert (det.labels[source_uids_.index(uid)] == lesion.index).any()


def test_measurements_are_the_engines_own(case):
    det = case.result.detection
    region_of = {i: r for r in case.result.reports for i in r.lesions}
    for g in _groups(case.sr):
        lesion = det.lesions[_lesion_number(g) - 1]
        region = region_of[lesion.index]
        assert g.finding_type == CALCIFICATION
        assert [s.value for s in g.finding_sites] == [codes.SCT.CoronaryArtery]
        assert _measurement(g, codes.SCT.Volume) == pytest.approx(lesion.volume_mm3, rel=1e-9)
        [peak] = g.get_measurements(name=codes.DCM.AttenuationCoefficient)
        assert peak.value == pytest.approx(lesion.peak_hu) and peak.derivation == codes.SCT.Maximum
        assert peak.unit == codes.UCUM.HounsfieldUnit
        assert _measurement(g, VOXELS_RESTORED) == region.voxels
        if case.action == "leave" and region.unsure:
            assert region.voxels == 0, "left as acquired: nothing restored"
        assert _measurement(g, DISAGREEMENTS[region.measure]) == pytest.approx(region.disagreement_hu)
        assert _evaluation(g, RESTORATION_UNSURE) == (codes.SCT.Yes if region.unsure else codes.SCT.No)
        assert _evaluation(g, RESTORATION) == ACTIONS[region.action]
        assert region.vessel_mm is not None and 0.5 < region.vessel_mm < 10.0
        [calibre] = g.get_measurements(name=VESSEL_CALIBRE)
        assert calibre.value == pytest.approx(round(region.vessel_mm, 1)) and calibre.unit == codes.UCUM.Millimeter
        [level] = g.get_measurements(name=LUMEN_LEVEL)  # measured with the calibre, the rule on or off
        assert level.value == round(region.lumen_hu) and level.unit == codes.UCUM.HounsfieldUnit
        assert level.derivation == codes.SCT.Median


def test_tracking_identifier_gives_the_lesion_position_in_patient_coordinates(case):
    """Checked against the phantom's geometry, not the report's own arithmetic."""
    dz, dy, dx = case.p.spacing
    det = case.result.detection
    for g in _groups(case.sr):
        lesion = det.lesions[_lesion_number(g) - 1]
        found = re.search(r"at x=(\S+) y=(\S+) z=(\S+) mm", g.tracking_identifier)
        assert found, g.tracking_identifier
        z, y, x = lesion.centroid
        expected = (ORIGIN_MM[0] + x * dx, ORIGIN_MM[1] + y * dy, ORIGIN_MM[2] + z * dz)
        assert [float(v) for v in found.groups()] == pytest.approx(expected, abs=0.051)


def test_dciodvfy_reports_no_errors(case):
    assert _dciodvfy_errors(case.sr) == []


def test_reads_back_with_highdicom(case):
    ds = pydicom.dcmread(case.sr)
    for sr in (hd.sr.srread(case.sr), hd.sr.Comprehensive3DSR.from_dataset(ds)):
        assert isinstance(sr, hd.sr.Comprehensive3DSR)
        report = sr.content
        assert isinstance(report, hd.sr.MeasurementReport)
        groups = report.get_volumetric_roi_measurement_groups(referenced_sop_instance_uid=case.uids["seg"])
        assert len(groups) == len(case.result.detection.lesions)
        for g in groups:
            assert report.get_volumetric_roi_measurement_groups(tracking_uid=g.tracking_uid) == [g]
            assert g.reference_type == codes.DCM.ReferencedSegment
        [device] = report.get_observer_contexts(observer_type=codes.cid270.Device)
        assert device.observer_identifying_attributes.manufacturer_name == "dicom-node"
        assert MODEL in device.observer_identifying_attributes.model_name
    evidence = {str(uid) for _, _, uid, _ in hd.sr.srread(case.sr).get_evidence()}
    assert {str(h.SOPInstanceUID) for h in case.series.headers} | {case.uids["seg"]} == evidence


def test_header_and_deterministic_uids(case, tmp_path):
    ds = pydicom.dcmread(case.sr)
    src = case.series.headers[0]
    assert str(ds.SOPClassUID) == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR Storage
    assert ds.StudyInstanceUID == case.uids["study"] == src.StudyInstanceUID
    assert (ds.SeriesInstanceUID, ds.SOPInstanceUID) == (case.uids["sr_series"], case.uids["sr"])
    assert case.sr.name == f"SR_{case.uids['sr']}.dcm"
    assert ds.SeriesDescription == f"{case.series.description[:40]} CALCIUM REMOVED REPORT"
    assert ds.Manufacturer == "dicom-node" and ds.PatientID == src.PatientID
    assert ds.Modality == "SR" and int(ds.SeriesNumber) == 1002
    procedure = ds.ContentSequence[[i.ConceptNameCodeSequence[0].CodeValue for i in ds.ContentSequence].index(
        "121058")].ConceptCodeSequence[0]
    assert (procedure.CodeValue, procedure.CodingSchemeDesignator) == ("419545005", "SCT")
    assert any(s.CodingSchemeDesignator == "99DCMNODE" for s in ds.CodingSchemeIdentificationSequence)
    again = write_report(case.series, case.result.detection, case.result.reports, pydicom.dcmread(case.seg),
                         tmp_path, MODEL, case.uids, 1002)
    assert again.name == case.sr.name
    assert [g.tracking_uid for g in _groups(again)] == [g.tracking_uid for g in _groups(case.sr)]
    assert len({g.tracking_uid for g in _groups(again)}) == len(case.result.detection.lesions)


def test_a_seg_of_another_series_is_refused(case, tmp_path):
    wrong = {**case.uids, "seg": "2.25.1"}
    with pytest.raises(ValueError, match="not this series' SEG"):
        write_report(case.series, case.result.detection, case.result.reports, case.seg, tmp_path, MODEL, wrong,
                     1002)


def test_without_lesions_the_report_is_still_valid_and_says_calcification_is_absent(case, tmp_path):
    none = Detection(calcium=np.zeros((1, 1, 1), bool), lesions=[], threshold_hu=700.0)
    path = write_report(case.series, none, [], case.seg, tmp_path, MODEL, case.uids, 1002)
    assert _dciodvfy_errors(path) == []
    sr = hd.sr.srread(path)
    assert sr.content.get_volumetric_roi_measurement_groups() == []
    items = {i.ConceptNameCodeSequence[0].CodeValue: i for i in pydicom.dcmread(path).ContentSequence}
    [absent] = items["C0034375"].ContentSequence
    assert absent.ConceptNameCodeSequence[0].CodeValue == CALCIFICATION.value
    assert absent.ConceptCodeSequence[0].CodeValue == codes.SCT.Absent.value


def test_the_estimate_each_region_got_and_its_enclosure_are_reported(case, tmp_path):
    """With several learnt estimates (engine.subtract_companions) each lesion's group says which one's restoration
    its region got and, under "enclosed", how far its calcium encloses the lumen; one estimate or the network: no
    such entry. Validated with dciodvfy."""
    assert not any(_evaluation(g, ESTIMATE_WRITTEN) or _measurement(g, CALCIUM_ENCLOSURE) for g in _groups(case.sr))
    picks = [(1, "calcium_excess_split", 0.83), (0, "calcium_excess_ref", 0.41), (None, "mean of a + b", None)]
    reports = [replace(r, estimate=name, estimate_index=index, enclosure=enclosure)
               for r, (index, name, enclosure) in zip(case.result.reports, picks * len(case.result.reports))]
    sr = write_report(case.series, case.result.detection, reports, pydicom.dcmread(case.seg), tmp_path, MODEL,
                      case.uids, 1002)
    assert _dciodvfy_errors(sr) == []
    region_of = {i: r for r in reports for i in r.lesions}
    seen = set()
    for g in _groups(sr):
        region = region_of[_lesion_number(g)]
        code = _evaluation(g, ESTIMATE_WRITTEN)
        plural = "s," if region.estimate_index is None else ""
        assert code.meaning == f"Learnt calcium estimate{plural} {region.estimate}"
        seen.add(code.value)
        assert code.value == {1: "COMPANION-1", 0: "FIRST-ESTIMATE", None: "MEAN-ESTIMATES"}[region.estimate_index]
        enclosure = _measurement(g, CALCIUM_ENCLOSURE)
        assert enclosure == (None if region.enclosure is None else pytest.approx(region.enclosure))
    assert len(seen) >= 2
