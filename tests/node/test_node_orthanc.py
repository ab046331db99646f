"""The node against real peers: Orthanc as the PACS, DCMTK as a foreign client, all on loopback.

Round trips prove the product: a CTA series arrives in the PACS, the PACS routes it to us
(Lua OnStableSeries), and the derived CT series and SEG come back into the same study,
over DIMSE and over DICOMweb, exactly once, and never routed back to us.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from scipy import ndimage

from dicom_node_lab import phantom
from dicom_node_lab.peers import NodeProcess, Orthanc, echoscu, free_port, storescu, wait_for, write_node_config
from dicom_node_lab.phantom_dicom import write_phantom_series

pytestmark = pytest.mark.integration

LOCAL = [("ORTHANC", "127.0.0.1"), ("STORESCU", "127.0.0.1"), ("ECHOSCU", "127.0.0.1"), ("DICOMNODE-SCU", "127.0.0.1")]


@pytest.fixture(scope="module")
def cta(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small calcified phantom CTA series on disk (40 slices of 96x96)."""
    opts = phantom.PhantomOptions(n_vessels=(2, 2), calcified_probability=1.0, bone_probability=0.0,
                                  lesion_margin_mm=5.0)
    p = phantom.generate((40, 96, 96), seed=31, options=opts)
    folder = tmp_path_factory.mktemp("cta")
    write_phantom_series(p, folder)
    return folder


def _peers(tmp_path: Path, route: str, extra: dict[str, list[str]] | None = None) -> tuple[NodeProcess, Orthanc]:
    node_dicom, node_http = free_port(), free_port()
    orthanc = Orthanc(tmp_path / "orthanc", node_dicom, node_http, route)
    dest = ({"name": "pacs", "kind": "dimse", "ae_title": orthanc.aet, "host": "127.0.0.1",
             "port": orthanc.dicom_port} if route == "dimse" else
            {"name": "pacs-web", "kind": "stow", "url": f"{orthanc.url}/dicom-web"})
    cfg = write_node_config(tmp_path, dicom_port=node_dicom, http_port=node_http, destinations=[dest],
                            allowed=LOCAL, extra=extra)
    node = NodeProcess(cfg, node_http, node_dicom, tmp_path / "node.log")
    return node, orthanc


@pytest.fixture
def dimse_peers(tmp_path: Path):
    node, orthanc = _peers(tmp_path, "dimse")
    try:
        yield node.start(), orthanc.start()
    finally:
        orthanc.stop()
        node.stop()


@pytest.fixture
def stow_peers(tmp_path: Path):
    node, orthanc = _peers(tmp_path, "stow", extra={"output": ["multiframe = true"]})
    try:
        yield node.start(), orthanc.start()
    finally:
        orthanc.stop()
        node.stop()


def _study_uid(folder: Path) -> str:
    return str(pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)


def _by_modality(orthanc: Orthanc, study_uid: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for s in orthanc.study_series(study_uid):
        out.setdefault(s["MainDicomTags"].get("Modality", ""), []).append(s)
    return out


def _wait_round_trip(node: NodeProcess, orthanc: Orthanc, study_uid: str, n_slices: int,
                     ) -> tuple[dict, dict]:
    """Wait until Orthanc holds the complete derived CT series and the SEG in the study."""
    def complete() -> tuple[dict, dict] | None:
        jobs = node.jobs()
        failed = [j for j in jobs if j["state"] == "failed"]
        if failed:
            pytest.fail(f"node job failed: {failed[0]['reason']}\n{node.log.read_text()[-3000:]}")
        series = _by_modality(orthanc, study_uid)
        derived = [s for s in series.get("CT", []) if "CALCIUM REMOVED" in s["MainDicomTags"].get(
            "SeriesDescription", "") and len(s["Instances"]) == n_slices]
        segs = series.get("SEG", [])
        if derived and segs:
            return derived[0], segs[0]
        return None
    return wait_for(complete, 240, "the derived series and the SEG in Orthanc", interval=1.0)


def _check_outputs(orthanc: Orthanc, source: Path, derived: dict, seg: dict) -> str:
    """Identity attributes, and pixels changed only around calcium; returns the derived series UID."""
    src = {}
    for f in source.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        src[ds.SOPInstanceUID] = ds
    first = next(iter(src.values()))
    out = [pydicom.dcmread(io.BytesIO(orthanc.file(i))) for i in derived["Instances"]]
    assert len({d.SeriesInstanceUID for d in out}) == 1
    pairs = []
    for d in out:
        s = src[d.SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert list(d.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert d.StudyInstanceUID == s.StudyInstanceUID and d.PatientID == s.PatientID
        assert d.FrameOfReferenceUID == s.FrameOfReferenceUID
        assert d.ImagePositionPatient == s.ImagePositionPatient
        assert d.SeriesInstanceUID != s.SeriesInstanceUID and d.SOPInstanceUID != s.SOPInstanceUID
        assert any(e.Manufacturer == "dicom-node" for e in d.ContributingEquipmentSequence)
        pairs.append((float(s.ImagePositionPatient[2]), s.pixel_array.astype(np.int32),
                      d.pixel_array.astype(np.int32)))
    pairs.sort(key=lambda t: t[0])
    before = np.stack([p[1] for p in pairs]) + int(first.RescaleIntercept)
    after = np.stack([p[2] for p in pairs]) + int(first.RescaleIntercept)
    changed = before != after
    assert changed.any(), "the derived series equals the source"
    near_calcium = ndimage.binary_dilation(before > 700, ndimage.generate_binary_structure(3, 3), iterations=5)
    assert not (changed & ~near_calcium).any(), "pixels changed away from calcium"
    seg_ds = pydicom.dcmread(io.BytesIO(orthanc.file(seg["Instances"][0])))
    assert seg_ds.Modality == "SEG" and seg_ds.StudyInstanceUID == first.StudyInstanceUID
    return str(out[0].SeriesInstanceUID)


def _not_routed_back(node: NodeProcess, derived_uid: str) -> None:
    """Our output reached the PACS but never came back into the node's processing."""
    assert all(j["series_uid"] != derived_uid for j in node.jobs())
    spool = node.config.parent / "spool" / "series"
    assert not (spool / derived_uid).exists(), "the PACS routed the derived series back to the node"


def _round_trip(node: NodeProcess, orthanc: Orthanc, cta: Path, destination: str) -> tuple[dict, dict]:
    """storescu into Orthanc, which routes to the node; checks what comes back; returns (derived, job)."""
    n = len(list(cta.glob("*.dcm")))
    storescu(("127.0.0.1", orthanc.dicom_port), orthanc.aet, cta)
    derived, seg = _wait_round_trip(node, orthanc, _study_uid(cta), n)
    derived_uid = _check_outputs(orthanc, cta, derived, seg)
    # the lesion report travels with them, into the same study (tests/pipeline/test_report.py checks its content)
    reports = wait_for(lambda: _by_modality(orthanc, _study_uid(cta)).get("SR"), 30, "the lesion report in Orthanc")
    assert len(reports) == 1 and "CALCIUM REMOVED REPORT" in reports[0]["MainDicomTags"]["SeriesDescription"]
    done = node.jobs(state="done")
    assert len(done) == 1 and done[0]["deliveries"][destination]["state"] == "done"
    # the job's lesion table: every lesion with its position, size, its region's restoration and confidence,
    # and its picture for the job page
    table = done[0]["lesions"]
    assert table and all(r["action"] in ("restored", "restored, unsure") and r["voxels"] > 0 and r["region"]
                         and r["disagreement_hu"] >= 0 and r["volume_mm3"] > 0 and len(r["position_mm"]) == 3
                         for r in table), table
    assert done[0]["pictures"] and all(p["file"] == f"lesion-{p['lesion']}.png" for p in done[0]["pictures"])
    picture = requests.get(f"{node.url}/jobs/{done[0]['id']}/pictures/{done[0]['pictures'][0]['file']}", timeout=5)
    assert picture.ok and picture.headers["content-type"] == "image/png" and picture.content[:4] == b"\x89PNG"
    _not_routed_back(node, derived_uid)
    return derived, done[0]


def test_dimse_round_trip_through_orthanc(dimse_peers, cta: Path) -> None:
    node, orthanc = dimse_peers
    n = len(list(cta.glob("*.dcm")))
    study = _study_uid(cta)
    derived, _ = _round_trip(node, orthanc, cta, "pacs")

    # Re-sending the identical series: a second job runs, but no second derived series appears.
    storescu(("127.0.0.1", node.dicom_port), "DICOMNODE", cta)
    wait_for(lambda: len(node.jobs(state="done")) == 2, 240, "the second job")
    series = _by_modality(orthanc, study)
    assert len(series["CT"]) == 2 and len(series["SEG"]) == 1, {k: len(v) for k, v in series.items()}
    assert len(orthanc.get(f"/series/{derived['ID']}")["Instances"]) == n

    metrics = requests.get(f"{node.url}/metrics", timeout=5).text
    assert 'dicom_node_jobs{state="done"} 2.0' in metrics
    assert "dicom_node_instances_received_total" in metrics


def test_dicomweb_round_trip_through_orthanc(stow_peers, cta: Path) -> None:
    """Also with output.multiframe: the enhanced copy reaches the PACS and is not routed back either."""
    node, orthanc = stow_peers
    derived, job = _round_trip(node, orthanc, cta, "pacs-web")
    multi = [s for s in _by_modality(orthanc, _study_uid(cta))["CT"]
             if s["ID"] != derived["ID"] and "CALCIUM REMOVED" in s["MainDicomTags"].get("SeriesDescription", "")]
    assert len(multi) == 1 and len(multi[0]["Instances"]) == 1
    mf = pydicom.dcmread(io.BytesIO(orthanc.file(multi[0]["Instances"][0])), stop_before_pixels=True)
    assert str(mf.SOPClassUID) == "1.2.840.10008.5.1.4.1.1.2.2"
    assert int(mf.NumberOfFrames) == len(list(cta.glob("*.dcm")))
    _not_routed_back(node, str(mf.SeriesInstanceUID))
    assert job["instances"] == len(list(cta.glob("*.dcm")))  # every instance came in by STOW-RS


def _secondary_capture(folder: Path) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "SC-1", "Secondary^Capture", "OT"
    ds.ConversionType = "WSD"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(64)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sc.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def lone_node(tmp_path: Path):
    dicom_port, http_port = free_port(), free_port()
    cfg = write_node_config(tmp_path, dicom_port=dicom_port, http_port=http_port, destinations=[], allowed=LOCAL,
                            quiet=1.0)
    node = NodeProcess(cfg, http_port, dicom_port, tmp_path / "node.log")
    try:
        yield node.start()
    finally:
        node.stop()


def test_unknown_caller_rejected_and_non_ct_stored_without_job(lone_node: NodeProcess, tmp_path: Path) -> None:
    node = lone_node
    ok = echoscu(node.dicom_port, "DICOMNODE", "ECHOSCU")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = echoscu(node.dicom_port, "DICOMNODE", "INTRUDER")
    assert bad.returncode != 0
    assert "Calling AE Title Not Recognized" in bad.stdout + bad.stderr
    wrong_called = echoscu(node.dicom_port, "SOMEONE", "ECHOSCU")
    assert wrong_called.returncode != 0

    sc = _secondary_capture(tmp_path / "sc")
    storescu(("127.0.0.1", node.dicom_port), "DICOMNODE", sc.parent)
    uid = pydicom.dcmread(sc).SeriesInstanceUID
    assert (node.config.parent / "spool" / "series" / uid / f"{pydicom.dcmread(sc).SOPInstanceUID}.dcm").is_file()
    time.sleep(2.5)  # longer than the quiet time: a job would have been queued by now
    assert node.jobs() == []
    assert "association" in node.log.read_text()


def test_stow_rs_into_the_node(lone_node: NodeProcess, cta: Path) -> None:
    from dicomweb_client.api import DICOMwebClient

    node = lone_node
    client = DICOMwebClient(url=f"{node.url}/dicomweb")
    datasets = [pydicom.dcmread(f) for f in sorted(cta.glob("*.dcm"))]
    response = client.store_instances(datasets)
    assert len(response.ReferencedSOPSequence) == len(datasets)
    assert "FailedSOPSequence" not in response
    job = wait_for(lambda: [j for j in node.jobs() if j["state"] == "done"], 240, "the STOW-RS job")[0]
    assert job["instances"] == len(datasets) and "processed" in job["reason"]


def test_cli_echo_send_and_demo(lone_node: NodeProcess, cta: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The newcomer's path: echo the node, send a folder, and let `demo` send a generated study."""
    from dicom_node.cli import main

    node = lone_node
    to = ["--to", f"127.0.0.1:{node.dicom_port}", "--aet", "DICOMNODE"]
    assert main(["echo", *to]) == 0
    assert main(["echo", *to, "--calling-aet", "STRANGER"]) == 1
    assert main(["send", str(cta), *to]) == 0
    assert f"sent {len(list(cta.glob('*.dcm')))} instances" in capsys.readouterr().out
    assert main(["demo", *to, "--slices", "32", "--seed", "7"]) == 0
    done = wait_for(lambda: [j for j in node.jobs() if j["state"] == "done"] if len(node.jobs(state="done")) == 2
                    else None, 240, "the send and demo jobs")
    assert {j["instances"] for j in done} == {len(list(cta.glob("*.dcm"))), 32}
    assert all("processed" in j["reason"] for j in done), [j["reason"] for j in done]


def test_compressed_series_from_storescu_is_processed(lone_node: NodeProcess, cta: Path, tmp_path: Path) -> None:
    """JPEG-LS as some PACS send it: accepted as is, decoded by the pipeline.

    storescu's default offers uncompressed in the same context although it cannot decompress
    JPEG-LS; we prefer uncompressed, so it is told to offer JPEG-LS alone (-xt -R).
    """
    from pydicom.uid import JPEGLSLossless

    node = lone_node
    folder = tmp_path / "jls"
    folder.mkdir()
    for f in sorted(cta.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.compress(JPEGLSLossless)
        ds.save_as(folder / f.name, enforce_file_format=True)
    storescu(("127.0.0.1", node.dicom_port), "DICOMNODE", folder, extra=("-xt", "-R"))
    stored = next((node.config.parent / "spool" / "series").rglob("*.dcm"))
    assert pydicom.dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID == JPEGLSLossless
    job = wait_for(lambda: node.jobs(state="done") or node.jobs(state="failed"), 240, "the job")[0]
    assert job["state"] == "done" and "processed" in job["reason"], job["reason"]
