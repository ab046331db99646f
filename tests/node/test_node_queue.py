"""The node's durable core without peers: spool, job states, quiet timer, intake rules, sending and retries."""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts

from dicom_node.config import Config, Destination
from dicom_node.node.completion import CompletionTimer
from dicom_node.node.intake import OUT_OF_RESOURCES, SUCCESS, Intake
from dicom_node.node.jobs import JobStore
from dicom_node.node.metrics import Metrics
from dicom_node.node.retention import apply_retention
from dicom_node.node.send import SendError, send_dimse
from dicom_node.node.spool import Spool, safe_name
from dicom_node.node.worker import Workers, input_fingerprint
from dicom_node.pipeline.derived import MANUFACTURER
from dicom_node_lab import phantom
from dicom_node_lab.peers import free_port
from dicom_node_lab.phantom_dicom import ct_series


@pytest.fixture(scope="module")
def slices() -> list[Dataset]:
    p = phantom.generate((6, 32, 32), seed=3)
    return ct_series(p.image, p.spacing)


def _encode(ds: Dataset, tmp: Path) -> bytes:
    path = tmp / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


class Parts:
    def __init__(self, root: Path, **jobs: Any) -> None:
        self.cfg = Config()
        self.cfg.spool.dir = str(root / "spool")
        self.cfg.spool.min_free_mb = 0
        for k, v in jobs.items():
            setattr(self.cfg.jobs, k, v)
        self.spool = Spool(self.cfg.spool.dir)
        self.store = JobStore(self.spool.db_path)
        self.metrics = Metrics(self.store)
        self.intake = Intake(self.spool, self.store, self.metrics)
        self.wake = threading.Event()

    def workers(self) -> Workers:
        # Sending and queue handling need no engine; processing tests use the real one elsewhere.
        return Workers(self.cfg, self.spool, self.store, self.metrics, "onnxruntime", "model sha256:0",
                       self.wake)


@pytest.fixture
def parts(tmp_path: Path) -> Parts:
    p = Parts(tmp_path)
    yield p
    p.store.close()


def test_spool_writes_atomically_and_names_safely(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    (spool.root / "tmp" / "stale.part").write_bytes(b"half")
    spool = Spool(tmp_path / "s")  # a restart drops unacknowledged partial writes
    assert list((spool.root / "tmp").iterdir()) == []
    path = spool.write_instance("1.2.3", "1.2.3.4", b"abc")
    assert path.read_bytes() == b"abc" and path.parent.name == "1.2.3"
    assert spool.write_instance("1.2.3", "1.2.3.4", b"new").read_bytes() == b"new"  # re-sent: replaced
    assert safe_name("../../etc") != "../../etc" and "/" not in safe_name("a/b")
    assert list((spool.root / "tmp").iterdir()) == []


def test_spool_full_answers_out_of_resources(tmp_path: Path, slices: list[Dataset]) -> None:
    p = Parts(tmp_path)
    p.spool.min_free = 1 << 62  # more than any disk has
    result = p.intake.accept(_encode(slices[0], tmp_path), slices[0], "dimse")
    assert result.status == OUT_OF_RESOURCES
    assert p.store.list() == []


def test_intake_counts_ct_and_only_stores_the_rest(parts: Parts, tmp_path: Path, slices: list[Dataset]) -> None:
    for ds in slices:
        assert parts.intake.accept(_encode(ds, tmp_path), ds, "dimse").status == SUCCESS
    jobs = parts.store.list()
    assert len(jobs) == 1 and jobs[0].instances == len(slices) and jobs[0].state == "received"

    ours = copy.deepcopy(slices[0])
    ours.SeriesInstanceUID = pydicom.uid.generate_uid()
    item = Dataset()
    item.Manufacturer = MANUFACTURER
    ours.ContributingEquipmentSequence = [item]
    derived = copy.deepcopy(slices[1])
    derived.SeriesInstanceUID = pydicom.uid.generate_uid()
    derived.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    other = copy.deepcopy(slices[2])
    other.SeriesInstanceUID = pydicom.uid.generate_uid()
    other.Modality = "MR"
    for ds, why in ((ours, "our own output"), (derived, "DERIVED"), (other, "not a CT image")):
        result = parts.intake.accept(_encode(ds, tmp_path), ds, "dimse")
        assert result.status == SUCCESS and why in result.reason
        assert parts.spool.series_files(ds.SeriesInstanceUID), "stored even without a job"
    assert len(parts.store.list()) == 1


def test_quiet_timer_and_a_growing_series_gets_a_new_job(parts: Parts, tmp_path: Path,
                                                         slices: list[Dataset]) -> None:
    parts.cfg.jobs.quiet_seconds = 10
    asm = CompletionTimer(parts.cfg, parts.spool, parts.store, parts.metrics, parts.wake)
    t0 = time.time()
    for ds in slices[:3]:
        parts.intake.accept(_encode(ds, tmp_path), ds, "dimse")
    asm.tick(t0 + 5)
    assert parts.store.list()[0].state == "received"
    asm.tick(t0 + 11)
    assert parts.store.list()[0].state == "queued" and parts.wake.is_set()
    parts.intake.accept(_encode(slices[2], tmp_path), slices[2], "dimse")  # a late (re-sent) instance
    first = parts.store.list()[0]
    assert first.state == "received" and first.instances == 4, "queued but not started: it waits again"
    asm.tick(time.time() + 11)
    first = parts.store.list()[0]
    assert first.state == "queued" and len(parts.store.list()) == 1
    claimed = parts.store.claim()
    assert claimed is not None and claimed.id == first.id and claimed.state == "processing"
    assert parts.store.claim() is None  # never handed out twice
    for ds in slices[3:]:
        parts.intake.accept(_encode(ds, tmp_path), ds, "dimse")
    jobs = parts.store.list()
    assert [j.state for j in jobs] == ["received", "processing"] and jobs[0].instances == len(slices) - 3
    assert jobs[0].id != first.id


def test_restart_requeues_processing_and_resumes_sending(parts: Parts, tmp_path: Path,
                                                         slices: list[Dataset]) -> None:
    parts.intake.accept(_encode(slices[0], tmp_path), slices[0], "dimse")
    parts.store.queue_quiet(0, time.time() + 1)
    job = parts.store.claim()
    assert job is not None
    parts.store.close()  # "crash" while processing
    store = JobStore(parts.spool.db_path)
    resumed = store.recover()
    assert [(j.id, j.state) for j in resumed] == [(job.id, "queued")]
    again = store.claim()
    assert again is not None and again.id == job.id
    store.to_sending(job.id, ["/nonexistent"], "2.25.1", "sending")
    sending = store.claim()
    assert sending is not None and sending.state == "sending" and store.claim() is None
    store.close()
    store = JobStore(parts.spool.db_path)  # crash while sending: unclaimed, handed out once more
    store.recover()
    assert store.claim().id == job.id and store.claim() is None
    store.close()


class StoreSCP:
    """A minimal archive: a pynetdicom storage SCP that records what it receives."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[str] = []
        self.associations: set[int] = set()  # the associations that brought them
        self.ae = AE(ae_title="ARCHIVE")
        self.ae.supported_contexts = AllStoragePresentationContexts

    refuse: set[str] = set()  # SOP Instance UIDs answered "out of resources"

    def _store(self, event: evt.Event) -> int:
        if str(event.dataset.SOPInstanceUID) in self.refuse:
            return 0xA700
        self.received.append(str(event.dataset.SOPInstanceUID))
        self.associations.add(id(event.assoc))
        time.sleep(0.01)  # an archive's own write: lets the associations overlap
        return 0x0000

    def __enter__(self) -> StoreSCP:
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()


def _job_with_outputs(parts: Parts, tmp_path: Path, slices: list[Dataset]) -> int:
    outs = parts_outputs(tmp_path, slices)
    job_id, _ = parts.store.note_instance("1.2.3", "1.2", "d")
    parts.store.queue_quiet(0, time.time() + 1)
    parts.store.claim()
    parts.store.to_sending(job_id, outs, "2.25.9", "sending")
    return job_id


def test_send_delivers_once_per_destination(parts: Parts, tmp_path: Path, slices: list[Dataset]) -> None:
    with StoreSCP() as a, StoreSCP() as b:
        parts.cfg.destinations = [Destination(name="a", ae_title="ARCHIVE", host="127.0.0.1", port=a.port),
                                  Destination(name="b", ae_title="ARCHIVE", host="127.0.0.1", port=b.port)]
        job_id = _job_with_outputs(parts, tmp_path, slices)
        w = parts.workers()
        # "a" already has the outputs (an earlier attempt): it must not get them twice.
        parts.store.set_deliveries(job_id, {"a": {"state": "done"}})
        assert w.run_one()
        job = parts.store.get(job_id)
        assert job.state == "done", job.reason
        assert a.received == [] and sorted(b.received) == sorted(ds.SOPInstanceUID for ds in slices)
        assert job.deliveries["b"]["state"] == "done"


def test_send_over_several_associations_delivers_each_instance_once(parts: Parts, tmp_path: Path,
                                                                    slices: list[Dataset]) -> None:
    with StoreSCP() as a:
        parts.cfg.destinations = [Destination(name="a", ae_title="ARCHIVE", host="127.0.0.1", port=a.port,
                                              associations=3)]
        job_id = _job_with_outputs(parts, tmp_path, slices)
        assert parts.workers().run_one()
        job = parts.store.get(job_id)
        assert job.state == "done" and job.deliveries["a"]["instances"] == len(slices), job.reason
        assert sorted(a.received) == sorted(ds.SOPInstanceUID for ds in slices), "each instance once"
        assert len(a.associations) == 3
        ledger = parts.store.ledger(job_id)["a"]
        assert sum(v["stored"] for v in ledger.values()) == len(slices), ledger


def test_associations_the_pacs_refuses_leave_their_share_to_the_accepted_one(tmp_path: Path,
                                                                            slices: list[Dataset]) -> None:
    with StoreSCP() as a:
        a.ae.maximum_associations = 1  # a PACS that takes one association per caller
        dest = Destination(name="a", ae_title="ARCHIVE", host="127.0.0.1", port=a.port, associations=3)
        sent: list[tuple[str, int]] = []
        n = send_dimse([Path(p) for p in parts_outputs(tmp_path, slices)], dest, "DICOMNODE",
                       ledger=lambda uid, status: sent.append((uid, status)))
        assert n == len(slices) and sorted(a.received) == sorted(ds.SOPInstanceUID for ds in slices)
        assert len(a.associations) == 1
        assert sorted(uid for uid, status in sent if status == 0) == sorted(a.received)


def test_a_refused_instance_fails_the_delivery_after_the_other_associations_finish(tmp_path: Path,
                                                                                   slices: list[Dataset]) -> None:
    with StoreSCP() as a:
        bad = slices[3].SOPInstanceUID
        a.refuse = {bad}
        dest = Destination(name="a", ae_title="ARCHIVE", host="127.0.0.1", port=a.port, associations=2)
        sent: list[tuple[str, int]] = []
        with pytest.raises(SendError, match="0xa700"):
            send_dimse([Path(p) for p in parts_outputs(tmp_path, slices)], dest, "DICOMNODE",
                       ledger=lambda uid, status: sent.append((uid, status)))
        assert (bad, 0xA700) in sent
        assert sorted(uid for uid, status in sent if status == 0) == sorted(a.received)
        assert len(a.received) >= len(slices) // 2, "the other association sent its share to the end"


def parts_outputs(tmp_path: Path, slices: list[Dataset]) -> list[str]:
    outs = []
    for ds in slices:
        path = tmp_path / "files" / f"{ds.SOPInstanceUID}.dcm"
        path.parent.mkdir(exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        outs.append(str(path))
    return outs


def test_send_retries_with_backoff_then_fails(parts: Parts, tmp_path: Path, slices: list[Dataset]) -> None:
    parts.cfg.jobs.retries = 2
    parts.cfg.jobs.backoff_seconds = 0.2
    parts.cfg.destinations = [Destination(name="down", ae_title="NOBODY", host="127.0.0.1", port=free_port(),
                                          timeout_seconds=2)]
    job_id = _job_with_outputs(parts, tmp_path, slices[:2])
    w = parts.workers()
    waits = []
    for attempt in range(1, 4):
        assert w.run_one()
        job = parts.store.get(job_id)
        if attempt <= 2:
            assert job.state == "sending" and job.attempts == attempt
            waits.append(job.next_attempt_at - time.time())
            assert not w.run_one()  # not due yet
            parts.store._update(job_id, next_attempt_at=0)
    job = parts.store.get(job_id)
    assert job.state == "failed" and "after 3 attempts" in job.reason and "down" in job.reason
    assert 0.1 < waits[0] <= 0.2 + 0.05 and 0.3 < waits[1] <= 0.4 + 0.05  # doubling
    assert all(Path(p).is_file() for p in job.outputs), "a failed job keeps its files"


def test_retention_purges_done_jobs_only(parts: Parts, tmp_path: Path, slices: list[Dataset]) -> None:
    for ds in slices:
        parts.intake.accept(_encode(ds, tmp_path), ds, "dimse")
    uid = slices[0].SeriesInstanceUID
    job = parts.store.list()[0]
    parts.store.finish(job.id, "done", "ok")
    parts.spool.out_dir(job.id).mkdir(parents=True)
    parts.cfg.spool.keep_days = 1
    apply_retention(parts.cfg, parts.spool, parts.store, time.time())
    assert parts.spool.series_files(uid), "younger than keep_days"
    apply_retention(parts.cfg, parts.spool, parts.store, time.time() + 2 * 86400)
    assert not parts.spool.series_files(uid) and not parts.spool.out_dir(job.id).exists()
    assert parts.store.get(job.id).purged


def test_fingerprint_ignores_who_sent_it(tmp_path: Path, slices: list[Dataset]) -> None:
    cfg = Config()
    a, b = tmp_path / "a.dcm", tmp_path / "b" / "a.dcm"
    b.parent.mkdir()
    ds = copy.deepcopy(slices[0])
    ds.save_as(a, enforce_file_format=True)
    ds.file_meta.SourceApplicationEntityTitle = "SOMEONE"
    ds.save_as(b, enforce_file_format=True)
    assert a.read_bytes() != b.read_bytes()
    assert input_fingerprint([a], "m", cfg) == input_fingerprint([b], "m", cfg)
    assert input_fingerprint([a], "m", cfg) != input_fingerprint([a], "other model", cfg)


def test_purge_after_delivery(parts: Parts, tmp_path: Path, slices: list[Dataset]) -> None:
    for ds in slices:
        parts.intake.accept(_encode(ds, tmp_path), ds, "dimse")
    uid = slices[0].SeriesInstanceUID
    job = parts.store.list()[0]
    parts.store.queue_quiet(0, time.time() + 1)
    parts.store.claim()
    out = parts.spool.out_dir(job.id) / "derived"
    out.mkdir(parents=True)
    files = []
    for ds in slices[:2]:
        ds.save_as(out / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        files.append(str(out / f"{ds.SOPInstanceUID}.dcm"))
    parts.store.to_sending(job.id, files, "2.25.1", "sending")
    parts.cfg.spool.purge_after_delivery = True
    with StoreSCP() as archive:
        parts.cfg.destinations = [Destination(name="a", ae_title="ARCHIVE", host="127.0.0.1", port=archive.port)]
        assert parts.workers().run_one()
        assert len(archive.received) == 2
    done = parts.store.get(job.id)
    assert done.state == "done" and done.purged
    assert not parts.spool.series_files(uid) and not parts.spool.out_dir(job.id).exists()


def test_node_trouble_hands_the_job_back(parts: Parts, tmp_path: Path, slices: list[Dataset],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk is no fault of the job's: it waits (no attempt counted) instead of failing or staying claimed."""
    import errno
    import sqlite3

    parts.cfg.jobs.backoff_seconds = 5
    parts.cfg.destinations = [Destination(name="a", ae_title="ARCHIVE", host="127.0.0.1", port=free_port(),
                                          timeout_seconds=2)]
    job_id = _job_with_outputs(parts, tmp_path, slices[:2])
    w = parts.workers()

    def full(*args: Any, **kw: Any) -> None:
        raise sqlite3.OperationalError("database or disk is full")
    with monkeypatch.context() as m:
        m.setattr(parts.store, "set_deliveries", full)
        assert w.run_one()
    job = parts.store.get(job_id)
    assert (job.state, job.claimed, job.attempts) == ("sending", 0, 0) and "disk full" in job.reason, job
    assert parts.store.claim() is None and parts.store.claim(time.time() + 6).id == job_id

    parts.intake.accept(_encode(slices[0], tmp_path), slices[0], "dimse")
    queued = parts.store.queue_quiet(0, time.time() + 1)[0]

    def no_space(job: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(w, "process", no_space)
    assert w.run_one()
    job = parts.store.get(queued.id)
    assert (job.state, job.claimed) == ("queued", 0) and "disk full" in job.reason, job
    assert parts.store.claim() is None, "claimed again before the pause"
    assert parts.store.claim(time.time() + 6).id == queued.id


def test_restart_gives_a_series_still_arriving_a_fresh_quiet_time(parts: Parts, tmp_path: Path,
                                                                  slices: list[Dataset]) -> None:
    """The time a node was down is no silence of the sender's: after a crash it waits for the retry."""
    t0 = time.time()
    parts.store.note_instance(slices[0].SeriesInstanceUID, "1.2", "d", now=t0)
    assert [j.state for j in parts.store.recover(now=t0 + 100)] == ["received"]
    assert parts.store.queue_quiet(10, now=t0 + 105) == []
    assert [j.state for j in parts.store.queue_quiet(10, now=t0 + 111)] == ["queued"]


def test_a_shared_spool_leaves_other_hosts_partial_writes_alone(tmp_path: Path) -> None:
    """Several hosts share the spool: a host's start must not delete what another is writing right now."""
    import os
    import subprocess

    from dicom_node.node.spool import HOST, STALE_SECONDS

    Spool(tmp_path / "s")
    tmp = tmp_path / "s" / "tmp"
    dead = subprocess.Popen(["true"])
    dead.wait()
    files = {"other-host": tmp / "otherhost-123-1-1.part", "other-host-old": tmp / "otherhost-124-1-1.part",
             "mine-dead": tmp / f"{HOST}-{dead.pid}-1-1.part", "mine-alive": tmp / f"{HOST}-1-1-1.part"}
    for f in files.values():
        f.write_bytes(b"half")
    old = time.time() - STALE_SECONDS - 60
    os.utime(files["other-host-old"], (old, old))
    Spool(tmp_path / "s", shared=True)
    assert {k for k, f in files.items() if f.exists()} == {"other-host", "mine-alive"}  # pid 1 lives
    Spool(tmp_path / "s")  # one host owning the spool: everything left is a leftover
    assert not any(f.exists() for f in files.values())


def test_files_go_out_as_stored_not_decoded_again(tmp_path: Path, slices: list[Dataset],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The sender reads each file's data set bytes and sends them; pynetdicom's default would decode every
    file and encode it again (about 2 ms a slice). The archive receives the file's own bytes."""
    import pynetdicom.association

    from dicom_node.node.intake import dataset_offset

    def no_decoding(*_a: Any, **_k: Any) -> None:
        raise AssertionError("a file was decoded to be sent")

    monkeypatch.setattr(pynetdicom.association, "dcmread", no_decoding)
    files = [Path(p) for p in parts_outputs(tmp_path, slices)]
    got: dict[str, bytes] = {}

    class Raw(StoreSCP):
        def _store(self, event: evt.Event) -> int:
            got[str(event.dataset.SOPInstanceUID)] = event.request.DataSet.getvalue()
            return 0x0000

    with Raw() as scp:
        dest = Destination(name="a", ae_title="ARCHIVE", host="127.0.0.1", port=scp.port)
        assert send_dimse(files, dest, "DICOMNODE") == len(files)
    for f in files:
        data = f.read_bytes()
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        assert got[uid] == data[dataset_offset(data):]
