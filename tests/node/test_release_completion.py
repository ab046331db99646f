"""Completion on release (issue 19): a series is queued ``jobs.release_grace_seconds`` after the association
that brought it was released, not after the full quiet timer; a series still being sent over another
association, or by another STOW-RS request still in flight, is not cut in two; an aborted association gives no
hint."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from dicom_node.node.send import requestor_handlers
from dicom_node_lab import phantom
from dicom_node_lab.peers import NodeProcess, free_port, wait_for, write_node_config
from dicom_node_lab.phantom_dicom import write_phantom_series

pytestmark = pytest.mark.integration

QUIET = 60.0  # far longer than any wait here: only the release rule can queue these series
GRACE = 1.0


@pytest.fixture(scope="module", params=[1, 2], ids=["one-receiver", "receiver-pool"])
def node(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """The node receiving in its own process, and with a pool of two receiver processes: there the two
    associations of one series land in different processes (the least busy takes each), and the rule
    that no other association is still sending the series must hold across them."""
    root = tmp_path_factory.mktemp("release-node")
    dicom, http = free_port(), free_port()
    cfg = write_node_config(root, dicom_port=dicom, http_port=http, destinations=[], quiet=QUIET,
                            allowed=[("STORESCU", "127.0.0.1")],
                            extra={"jobs": [f"release_grace_seconds = {GRACE}"],
                                   "node": [f"receiver_processes = {request.param}"]})
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
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE", evt_handlers=requestor_handlers(nagle_off=False))
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


def test_a_released_series_is_prepared_during_its_grace(node: NodeProcess, tmp_path: Path) -> None:
    """The node wires the release hint to its workers: a warm child read the series and detected its calcium
    while the grace ran (jobs.prepare_ahead), and the job's steps say so."""
    files = _series(tmp_path / "s", 5, slices=24)
    assoc = _associate(node.dicom_port)
    _send(assoc, files)
    assoc.release()
    job = wait_for(lambda: next((j for j in _jobs(node, files) if j["state"] in ("done", "failed")), None), 90,
                   "the job to be processed")
    assert job["state"] == "done", job["reason"]
    timings = requests.get(f"{node.url}/jobs/{job['id']}", timeout=5).json()["timings"]
    assert "ahead_detect" in timings and "detect" not in timings, timings
    log = (node.config.parent / "node.log").read_text()
    assert "preparing the series during its release grace" in log


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


def _stow_body(files: list[Path], boundary: str = "release-test") -> tuple[list[bytes], str]:
    """A STOW-RS body in pieces (one per part, then the closing delimiter) and its Content-Type."""
    pieces = [b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + f.read_bytes() + b"\r\n"
              for f in files]
    return pieces + [b"--" + boundary.encode() + b"--\r\n"], \
        f'multipart/related; type="application/dicom"; boundary={boundary}'


def test_a_stow_request_that_ends_while_another_streams_gives_no_hint_until_the_last_ends(
        node: NodeProcess, tmp_path: Path) -> None:
    """Two STOW-RS requests of one series at once, as DICOMweb uploaders send them: the first ends while the
    second's body still arrives (its instances not yet known); the series waits for the second."""
    import threading

    files = _series(tmp_path / "s", 5)
    url = f"{node.url}/dicomweb/studies"
    pieces, ctype = _stow_body(files[6:])
    streaming = threading.Event()
    answers: list[int] = []

    def slow() -> Iterator[bytes]:
        yield pieces[0]
        streaming.set()
        time.sleep(GRACE + 3.0)  # the first request ends meanwhile, and its grace passes
        yield from pieces[1:]

    second = threading.Thread(target=lambda: answers.append(
        requests.post(url, data=slow(), headers={"Content-Type": ctype}, timeout=60).status_code))
    second.start()
    assert streaming.wait(10)
    body, ctype_first = _stow_body(files[:6])
    assert requests.post(url, data=b"".join(body), headers={"Content-Type": ctype_first}, timeout=30).status_code == 200
    time.sleep(GRACE + 1.5)
    assert [j["state"] for j in _jobs(node, files)] == ["received"], "queued while another request was in flight"
    second.join(30)
    assert answers == [200]
    job = wait_for(lambda: next((j for j in _jobs(node, files) if j["state"] != "received"), None), 15,
                   "the job leaving 'received' after the last request")
    assert job["instances"] == len(files) and len(_jobs(node, files)) == 1, job


def test_stow_hints_wait_for_the_last_request_and_skip_refusals() -> None:
    from dicom_node.node.intake import StowRequests

    hints: list[set[int]] = []
    gate = StowRequests(lambda jobs, why: hints.append(set(jobs)))
    gate.begin()
    gate.begin()
    gate.end([1], clean=True)
    assert hints == [], "another request is still in flight"
    gate.end([2], clean=True)
    assert hints == [{1, 2}]
    gate.begin()
    gate.begin()
    gate.end([3], clean=False)  # a refused part: the client may send it again
    gate.end([3, 4], clean=True)
    assert hints == [{1, 2}, {4}]
    gate.begin()
    gate.end([3], clean=True)  # the re-send came through whole
    assert hints == [{1, 2}, {4}, {3}]
