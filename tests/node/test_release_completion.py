"""Completion on release (issue 19): a series is queued ``jobs.release_grace_seconds`` after the association
that brought it was released, not after the full quiet timer; a series still being sent over another
association is not cut in two; an aborted association gives no hint."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
import requests
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from dicom_node_lab import phantom
from dicom_node_lab.peers import NodeProcess, free_port, wait_for, write_node_config
from dicom_node_lab.phantom_dicom import write_phantom_series

pytestmark = pytest.mark.integration

QUIET = 60.0  # far longer than any wait here: only the release rule can queue these series
GRACE = 1.0


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("release-node")
    dicom, http = free_port(), free_port()
    cfg = write_node_config(root, dicom_port=dicom, http_port=http, destinations=[], quiet=QUIET,
                            allowed=[("STORESCU", "127.0.0.1")], extra={"jobs": [f"release_grace_seconds = {GRACE}"]})
    proc = NodeProcess(cfg, http, dicom, root / "node.log").start()
    try:
        yield proc
    finally:
        proc.stop()


def _series(folder: Path, seed: int, slices: int = 12) -> list[Path]:
    folder.mkdir()
    write_phantom_series(phantom.generate((slices, 96, 96), seed=seed), folder)
    return sorted(folder.glob("*.dcm"))


def _associate(port: int):
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    return assoc


def _send(assoc, files: list[Path]) -> None:
    for f in files:
        answer = assoc.send_c_store(pydicom.dcmread(f))
        assert answer is not None and int(answer.Status) == 0, answer


def _jobs(node: NodeProcess, files: list[Path]) -> list[dict]:
    series = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    return [j for j in requests.get(f"{node.url}/jobs", timeout=5).json() if j["series_uid"] == series]


def test_a_released_series_is_queued_after_the_grace_not_the_quiet_time(node: NodeProcess, tmp_path: Path) -> None:
    files = _series(tmp_path / "s", 1)
    assoc = _associate(node.dicom_port)
    _send(assoc, files)
    time.sleep(GRACE + 1.0)
    assert [j["state"] for j in _jobs(node, files)] == ["received"], "queued while the association was still open"
    released = time.time()
    assoc.release()
    job = wait_for(lambda: next((j for j in _jobs(node, files) if j["state"] != "received"), None), 15,
                   "the job leaving 'received' after the release")
    waited = time.time() - released
    assert waited < QUIET / 4, f"queued {waited:.1f} s after the release: the quiet timer, not the release rule"
    assert job["instances"] == len(files), job
    assert len(_jobs(node, files)) == 1


def test_a_series_over_two_associations_is_not_cut_in_two(node: NodeProcess, tmp_path: Path) -> None:
    files = _series(tmp_path / "s", 2)
    first, second = _associate(node.dicom_port), _associate(node.dicom_port)
    _send(first, files[:6])
    _send(second, files[6:8])
    first.release()  # the other association still sends this series: no hint
    time.sleep(GRACE + 1.5)
    assert [j["state"] for j in _jobs(node, files)] == ["received"], "cut in two at the first release"
    _send(second, files[8:])
    second.release()
    job = wait_for(lambda: next((j for j in _jobs(node, files) if j["state"] != "received"), None), 15,
                   "the job leaving 'received' after the second release")
    assert job["instances"] == len(files), job
    assert len(_jobs(node, files)) == 1


def test_an_aborted_association_gives_no_hint(node: NodeProcess, tmp_path: Path) -> None:
    files = _series(tmp_path / "s", 3)
    assoc = _associate(node.dicom_port)
    _send(assoc, files)
    assoc.abort()
    time.sleep(GRACE + 2.0)
    jobs = _jobs(node, files)
    assert [j["state"] for j in jobs] == ["received"], jobs
    assert "ended without a release" in jobs[0]["reason"], jobs[0]["reason"]


def test_an_instance_after_the_job_started_makes_a_new_job(node: NodeProcess, tmp_path: Path) -> None:
    files = _series(tmp_path / "s", 4)
    assoc = _associate(node.dicom_port)
    _send(assoc, files[:-1])
    assoc.release()
    wait_for(lambda: next((j for j in _jobs(node, files) if j["state"] != "received"), None), 15, "the first job")
    late = _associate(node.dicom_port)
    _send(late, files[-1:])
    late.release()
    jobs = wait_for(lambda: (lambda js: js if len(js) == 2 and all(j["state"] != "received" for j in js) else None)(
        _jobs(node, files)), 15, "a second job for the late instance")
    spool = node.config.parent / "spool" / "series"
    assert len(list(spool.rglob("*.dcm"))) >= len(files), "the late instance was lost"
    assert sorted(j["instances"] for j in jobs) == [1, len(files) - 1], jobs
