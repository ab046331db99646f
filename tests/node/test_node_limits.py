"""Limits in-process: what no caller may take from the others, and jobs that crash without taking the node.

Raw sockets speak the DICOM upper layer directly (a PDU header that claims a gigabyte, connections that
never say anything); the processing tests run real child processes under limits small enough to trip.
"""

from __future__ import annotations

import copy
import socket
import struct
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_node.config import AllowedPeer
from dicom_node.node.completion import CompletionTimer
from dicom_node.node.receive import Receiver, pdu_bound
from dicom_node.node.send import requestor_handlers
from dicom_node_lab import phantom
from dicom_node_lab.peers import free_port, wait_for
from dicom_node_lab.phantom_dicom import ct_series

from .test_node_queue import Parts, _encode

GATED = requestor_handlers(nagle_off=False)  # reactor gated (no lost answer); Nagle as pynetdicom leaves it


@pytest.fixture(scope="module")
def slices() -> list[Dataset]:
    p = phantom.generate((8, 32, 32), seed=9)
    return ct_series(p.image, p.spacing)


def _receiver(tmp_path: Path, **node: object) -> tuple[Receiver, Parts]:
    parts = Parts(tmp_path)
    parts.cfg.node.port = free_port()
    parts.cfg.node.allowed = [AllowedPeer("SCU", "127.0.0.1"), AllowedPeer("SCU", "127.0.0.2")]
    for k, v in node.items():
        setattr(parts.cfg.node, k, v)
    r = Receiver(parts.cfg.node, parts.intake, parts.metrics)
    r.start()
    return r, parts


@pytest.fixture
def receiver(tmp_path: Path):
    r, parts = _receiver(tmp_path, request_seconds=1.0, max_connections_per_host=4, max_connections=8)
    yield r, parts
    r.stop()
    parts.store.close()


def _echo(port: int, source: str = "127.0.0.1", called: str = "DICOMNODE") -> AE:
    ae = AE(ae_title="SCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    return ae.associate("127.0.0.1", port, ae_title=called, bind_address=(source, 0), evt_handlers=GATED)


def _closed_by_peer(s: socket.socket, within: float) -> bool:
    """True when the other side closes the connection (or resets it) within ``within`` seconds."""
    s.settimeout(within)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_pdu_longer_than_ours_is_refused_before_anything_is_allocated(receiver) -> None:
    r, parts = receiver
    tracemalloc.start()
    try:
        sockets = []
        for _ in range(3):  # the probe's case: 6 bytes that claim a 1 GiB A-ASSOCIATE-RQ
            s = socket.create_connection(("127.0.0.1", r.cfg.port))
            s.sendall(struct.pack(">BBL", 0x01, 0x00, 1 << 30))
            sockets.append(s)
        for s in sockets:
            assert _closed_by_peer(s, 5.0), "the node kept reading a PDU it cannot accept"
            s.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB allocated for three empty 1 GiB claims"
    assert pdu_bound(r.cfg.max_pdu) < 1 << 30
    assert parts.metrics.connections_refused.labels("dimse", "pdu_too_long")._value.get() == 3
    assert parts.metrics.connections_refused.labels("dimse", "no_request")._value.get() == 0, "counted twice"
    assoc = _echo(r.cfg.port)
    assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_idle_connections_cannot_lock_senders_out(receiver) -> None:
    r, parts = receiver
    idle = []
    for _ in range(6):  # more than one host may hold, from 127.0.0.2
        s = socket.socket()
        s.bind(("127.0.0.2", 0))
        s.connect(("127.0.0.1", r.cfg.port))
        idle.append(s)
    time.sleep(0.3)  # refusals are immediate; request_seconds (1 s) has not run out for the others yet
    refused = [s for s in idle if _closed_by_peer(s, 0.01)]
    assert len(refused) == 2, "connections over max_connections_per_host are closed at once"
    assert parts.metrics.connections_refused.labels("dimse", "per_host")._value.get() == 2
    t0 = time.monotonic()
    assoc = _echo(r.cfg.port)  # another host is not locked out by the idle ones
    assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert time.monotonic() - t0 < 2
    held = [s for s in idle if s not in refused]
    assert all(_closed_by_peer(s, 3.0) for s in held), "idle callers are dropped after request_seconds"
    wait_for(lambda: r.limits.open() == 0, 5, "every connection to be counted out")
    assert parts.metrics.connections_refused.labels("dimse", "no_request")._value.get() == len(held)
    assoc = _echo(r.cfg.port, source="127.0.0.2")  # and their host may connect again
    assert assoc.is_established
    assoc.release()
    for s in idle:
        s.close()


def test_total_connection_limit(tmp_path: Path) -> None:
    r, parts = _receiver(tmp_path, request_seconds=2.0, max_connections_per_host=10, max_connections=3)
    try:
        idle = [socket.create_connection(("127.0.0.1", r.cfg.port)) for _ in range(3)]
        extra = socket.create_connection(("127.0.0.1", r.cfg.port))
        assert _closed_by_peer(extra, 2.0)
        assert parts.metrics.connections_refused.labels("dimse", "total")._value.get() == 1
        for s in [*idle, extra]:
            s.close()
        wait_for(lambda: r.limits.open() == 0, 5, "the closed connections to be counted out")
        assoc = _echo(r.cfg.port)
        assert assoc.is_established
        assoc.release()
    finally:
        r.stop()
        parts.store.close()


def test_wrong_called_ae_is_rejected_logged_and_counted(receiver, caplog: pytest.LogCaptureFixture) -> None:
    r, parts = receiver
    assoc = _echo(r.cfg.port, called="SOMEONEELSE")
    assert assoc.is_rejected
    assert parts.metrics.associations_rejected.labels("called_ae")._value.get() == 1
    assert any("called AE 'SOMEONEELSE' is not ours" in rec.getMessage() for rec in caplog.records)


def test_an_aborted_association_leaves_its_series_incomplete(receiver, slices: list[Dataset],
                                                             tmp_path: Path) -> None:
    r, parts = receiver
    parts.cfg.jobs.quiet_seconds = 0.1
    asm = CompletionTimer(parts.cfg, parts.spool, parts.store, parts.metrics, parts.wake)
    ae = AE(ae_title="SCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", r.cfg.port, ae_title="DICOMNODE", evt_handlers=GATED)
    for ds in slices[:3]:
        assert assoc.send_c_store(ds).Status == 0x0000
    assoc.abort()
    wait_for(lambda: parts.store.list()[0].incomplete_since is not None, 5, "the job to be marked incomplete")
    [job] = parts.store.list()
    assert "ended without a release after 3 instances" in job.reason, job.reason
    asm.tick(time.time() + 60)
    assert parts.store.list()[0].state == "received", "an aborted series was queued as if complete"

    # the sender sends it all again
    assoc = ae.associate("127.0.0.1", r.cfg.port, ae_title="DICOMNODE", evt_handlers=GATED)
    for ds in slices:
        assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    time.sleep(0.3)
    asm.tick()
    [job] = parts.store.list()
    assert job.state == "queued" and job.incomplete_since is None, job

    # a second series, never re-sent
    assoc = ae.associate("127.0.0.1", r.cfg.port, ae_title="DICOMNODE", evt_handlers=GATED)
    other = [_reseries(ds, "1.2.826.0.1.3680043.8.498.99") for ds in slices[:2]]
    for ds in other:
        assert assoc.send_c_store(ds).Status == 0x0000
    assoc.abort()
    wait_for(lambda: parts.store.list(series_uid=other[0].SeriesInstanceUID)[0].incomplete_since, 5,
             "the second job to be marked incomplete")
    asm.tick(time.time() + parts.cfg.jobs.incomplete_seconds + 1)
    [failed] = parts.store.list(series_uid=other[0].SeriesInstanceUID)
    assert failed.state == "failed" and "aborted after 2 instances and the rest never came" in failed.reason
    assert len(parts.spool.series_files(other[0].SeriesInstanceUID)) == 2, "its instances stay in the spool"


def _reseries(ds: Dataset, series_uid: str) -> Dataset:
    out = copy.deepcopy(ds)
    out.SeriesInstanceUID = series_uid
    out.SOPInstanceUID = out.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return out


# ---- jobs that crash -----------------------------------------------------------------------------


def _queued(parts: Parts, slices: list[Dataset], tmp_path: Path) -> None:
    for ds in slices:
        parts.intake.accept(_encode(ds, tmp_path), ds, "dimse")
    parts.store.queue_quiet(0, time.time() + 1)


@pytest.mark.slow
def test_a_child_over_its_memory_limit_fails_the_job_after_max_crashes(tmp_path: Path, slices: list[Dataset]) -> None:
    parts = Parts(tmp_path, memory_mb=40, max_crashes=2, backoff_seconds=0.01)  # less than Python + numpy
    try:
        _queued(parts, slices, tmp_path)
        workers = parts.workers()
        assert workers.run_one()
        [job] = parts.store.list()
        assert job.state == "queued" and "run 1 of 2" in job.reason and "jobs.memory_mb = 40 MB" in job.reason, job
        time.sleep(0.15)  # the retry's pause (at least 0.1 s)
        assert workers.run_one()
        [job] = parts.store.list()
        assert job.state == "failed" and "run 2 of 2" in job.reason and "not tried again" in job.reason, job.reason
        assert (parts.spool.root / "quarantine" / f"job-{job.id}" / "REASON.json").is_file()
        assert parts.metrics.job_crashes._value.get() == 2
        assert not list((parts.spool.root / "tmp").iterdir()), "the child's files are cleaned up"
    finally:
        parts.store.close()


@pytest.mark.slow
def test_a_child_past_its_time_limit_is_killed(tmp_path: Path, slices: list[Dataset]) -> None:
    parts = Parts(tmp_path, timeout_seconds=0.3, max_crashes=1)
    try:
        _queued(parts, slices, tmp_path)
        assert parts.workers().run_one()
        [job] = parts.store.list()
        assert job.state == "failed" and "jobs.timeout_seconds = 0.3 s" in job.reason, job.reason
    finally:
        parts.store.close()


def test_runs_the_node_never_finished_count_too(tmp_path: Path, slices: list[Dataset]) -> None:
    """The node itself died during processing (twice): after the restart the job fails, no third run."""
    parts = Parts(tmp_path, max_crashes=2)
    try:
        _queued(parts, slices, tmp_path)
        for _ in range(2):
            assert parts.store.claim().state == "processing"  # a run begins ...
            parts.store.recover()  # ... and the node dies with it
        assert parts.workers().run_one()
        [job] = parts.store.list()
        assert job.state == "failed" and "did not finish in 2 runs" in job.reason, job.reason
    finally:
        parts.store.close()


def test_a_handed_back_run_does_not_count(tmp_path: Path, slices: list[Dataset]) -> None:
    parts = Parts(tmp_path)
    try:
        _queued(parts, slices, tmp_path)
        job = parts.store.claim()
        parts.store.hand_back(job.id, "queued", 0, "disk full")
        assert parts.store.get(job.id).process_starts == 0
    finally:
        parts.store.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_worker_thread_is_replaced_and_its_job_not_left_processing(tmp_path: Path,
                                                                          slices: list[Dataset]) -> None:
    parts = Parts(tmp_path, workers=1, max_crashes=2, backoff_seconds=0.01)
    workers = parts.workers()
    died = threading.Event()

    def die(job: object) -> None:
        died.set()
        raise SystemExit("a worker thread dies (as under a memory cap, mid-job)")

    workers.process = die  # type: ignore[method-assign]
    try:
        _queued(parts, slices, tmp_path)
        first = None
        workers.start()
        first = workers.threads[0]
        assert died.wait(10)
        wait_for(lambda: workers.threads[0] is not first and workers.threads[0].is_alive(), 10,
                 "the dead worker thread to be replaced")
        wait_for(lambda: parts.store.list()[0].state in ("queued", "failed", "processing")
                 and parts.store.list()[0].process_starts >= 2, 10, "the job to be retried")
        wait_for(lambda: parts.store.list()[0].state == "failed", 10, "the job to fail after max_crashes")
        assert "worker thread handling it died" in parts.store.list()[0].reason
        assert parts.metrics.worker_deaths._value.get() >= 2
    finally:
        workers.shutdown(5)
        parts.store.close()


# ---- the quarantine, the job lookup, telemetry -------------------------------------------------------


def test_the_quarantine_is_capped_and_purged_by_age(tmp_path: Path) -> None:
    from dicom_node.node.spool import Spool

    spool = Spool(tmp_path / "s", quarantine_mb=1)
    for i in range(40):  # 40 distinct 64 KiB junk parts: 2.5 MiB, more than the cap
        spool.quarantine_instance(bytes([i]) * 65536, "", "", {"reason": f"junk {i}"})
    kept = [f for f in spool.refused_dir.rglob("*") if f.is_file()]
    assert sum(max(4096, f.stat().st_size) for f in kept) <= 1 << 20
    assert (spool.refused_dir / "unreadable").is_dir() and len(kept) >= 2
    newest = max(kept, key=lambda f: f.stat().st_mtime)
    assert newest.read_bytes()[:1] in (b"\x27", b"{"), "the newest copies are the ones kept"
    spool.quarantine_instance(b"x" * 100, "", "", {"reason": "again"})
    spool.quarantine_instance(b"x" * 100, "", "", {"reason": "again"})  # the same bytes: one copy
    assert len([f for f in spool.refused_dir.rglob("*.dcm") if f.read_bytes() == b"x" * 100]) == 1
    (spool.root / "quarantine" / "job-7").mkdir()
    (spool.root / "quarantine" / "job-7" / "REASON.json").write_text("{}")
    assert spool.purge_quarantine(time.time() + 1) >= 3
    assert not [f for f in (spool.root / "quarantine").rglob("*") if f.is_file()]
    again = Spool(tmp_path / "s", quarantine_mb=1)  # a restart counts what is there
    assert again._refused_bytes == 0


def test_a_job_id_beyond_sqlite_is_404(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from dicom_node.node.http import create_app

    parts = Parts(tmp_path)
    try:
        client = TestClient(create_app(parts.store, parts.intake, parts.metrics, {}))
        for job_id in ("99999999999999999999999", "9223372036854775808", "0", "-1"):
            assert client.get(f"/jobs/{job_id}").status_code == 404, job_id
    finally:
        parts.store.close()


def test_onnx_runtime_writes_nothing_under_home(tmp_path: Path) -> None:
    """Defect 7: importing ONNX Runtime made a device id and a telemetry database under ~/.cache."""
    import os
    import subprocess
    import sys

    from dicom_node.config import DEFAULT_MODEL

    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("ORT_DISABLE_TELEMETRY", None)
    code = ("import dicom_node.backends.onnxruntime as b; import sys; "
            "b.OnnxRuntimeBackend(sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(DEFAULT_MODEL)], env=env, check=True, timeout=120)
    assert not list(tmp_path.rglob("*")), list(tmp_path.rglob("*"))
