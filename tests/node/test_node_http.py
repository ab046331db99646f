"""The node's HTTP face: STOW-RS in (multipart/related, proper STOW response) and the operator endpoints."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset

from dicom_node.node.http import create_app
from dicom_node.node.intake import Intake
from dicom_node.node.jobs import JobStore
from dicom_node.node.metrics import Metrics
from dicom_node.node.spool import Spool
from dicom_node.node.stow import split_multipart
from dicom_node_lab import phantom
from dicom_node_lab.phantom_dicom import ct_series


@pytest.fixture(scope="module")
def slices() -> list[bytes]:
    p = phantom.generate((4, 32, 32), seed=5)
    out = []
    for ds in ct_series(p.image, p.spacing):
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


@pytest.fixture
def app(tmp_path: Path):
    spool = Spool(tmp_path / "spool")
    store = JobStore(spool.db_path)
    metrics = Metrics(store)
    client = TestClient(create_app(store, Intake(spool, store, metrics), metrics, {"ae_title": "DICOMNODE"}))
    yield client, store, spool
    store.close()


def _multipart(parts: list[bytes], boundary: str = "") -> tuple[bytes, str]:
    boundary = boundary or uuid.uuid4().hex
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
                    for p in parts) + b"--" + boundary.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def test_split_multipart_keeps_binary_parts_intact() -> None:
    data = [b"\r\n--not-the-boundary\r\n\x00\xff", b"x" * 1000]
    body, ctype = _multipart(data)
    assert [p for _, p in split_multipart(body, ctype)] == data


def test_split_multipart_takes_orthancs_long_boundary() -> None:
    # Orthanc's DICOMweb plugin joins two UUIDs: 73 characters, more than RFC 2046's 70
    boundary = f"{uuid.uuid4()}-{uuid.uuid4()}"
    body, ctype = _multipart([b"abc"], boundary)
    assert len(boundary) == 73 and [p for _, p in split_multipart(body, ctype)] == [b"abc"]


def test_stow_stores_everything_and_answers_referenced_sequence(app, slices: list[bytes]) -> None:
    client, store, spool = app
    body, ctype = _multipart(slices)
    r = client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/dicom+json")
    answer = Dataset.from_json(r.json())
    assert len(answer.ReferencedSOPSequence) == len(slices) and "FailedSOPSequence" not in answer
    first = pydicom.dcmread(io.BytesIO(slices[0]))
    assert answer.ReferencedSOPSequence[0].ReferencedSOPClassUID == first.SOPClassUID
    jobs = store.list()
    assert len(jobs) == 1 and jobs[0].instances == len(slices)
    assert len(spool.series_files(first.SeriesInstanceUID)) == len(slices)


def test_stow_reports_failures_per_instance(app, slices: list[bytes]) -> None:
    client, _, _ = app
    first = pydicom.dcmread(io.BytesIO(slices[0]))
    body, ctype = _multipart([slices[0], b"not dicom at all"])
    r = client.post(f"/dicomweb/studies/{first.StudyInstanceUID}", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 202
    answer = Dataset.from_json(r.json())
    assert len(answer.ReferencedSOPSequence) == 1 and answer.FailedSOPSequence[0].FailureReason == 0xC000
    body, ctype = _multipart([slices[1]])
    r = client.post("/dicomweb/studies/1.2.3.4", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 409
    failed = Dataset.from_json(r.json()).FailedSOPSequence[0]
    assert failed.FailureReason == 0xC409 and failed.ReferencedSOPInstanceUID == pydicom.dcmread(
        io.BytesIO(slices[1])).SOPInstanceUID


def test_stow_refuses_other_media_types(app) -> None:
    client, _, _ = app
    assert client.post("/dicomweb/studies", content=b"{}", headers={"Content-Type": "application/json"}
                       ).status_code == 415
    r = client.post("/dicomweb/studies", content=b"x",
                    headers={"Content-Type": 'multipart/related; type="application/dicom+xml"; boundary=b'})
    assert r.status_code == 415


def test_operator_endpoints(app, slices: list[bytes]) -> None:
    client, store, _ = app
    body, ctype = _multipart(slices)
    client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype})
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["jobs"]["received"] == 1 and health["ae_title"] == "DICOMNODE"
    jobs = client.get("/jobs").json()
    assert len(jobs) == 1 and jobs[0]["state"] == "received" and jobs[0]["received_at"].endswith("Z")
    assert client.get(f"/jobs/{jobs[0]['id']}").json()["series_uid"] == jobs[0]["series_uid"]
    assert client.get("/jobs/999").status_code == 404
    assert client.get("/jobs", params={"state": "bogus"}).status_code == 400
    assert client.get("/jobs", params={"state": "done"}).json() == []
    metrics = client.get("/metrics").text
    assert 'dicom_node_jobs{state="received"} 1.0' in metrics
    assert f'dicom_node_instances_received_total{{kind="processed",via="stow"}} {float(len(slices))}' in metrics
    page = client.get("/")  # the shell: the browser fills it from /jobs (tests/viewer/test_pages.py)
    assert page.status_code == 200 and "<table>" in page.text and "/jobs?limit=" in page.text
    job_page = client.get(f"/jobs/{jobs[0]['id']}", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert job_page.status_code == 200 and job_page.headers["content-type"].startswith("text/html")
    assert jobs[0]["series_uid"] not in job_page.text  # no data in the shell: it reads the JSON like any client
