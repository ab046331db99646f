"""Warm processing children (``jobs.warm_child``): a child started ahead of its job takes the job, one that
died meanwhile gives way to a cold one, the limits hold for it, and the job records where its time went."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from dicom_node.node.worker import Workers
from dicom_node_lab import phantom
from dicom_node_lab.phantom_dicom import ct_series

from .test_node_queue import Parts, _encode


@pytest.fixture(scope="module")
def slices() -> list[Dataset]:
    p = phantom.generate((24, 48, 48), seed=5)
    return ct_series(p.image, p.spacing)


def _queued(parts: Parts, slices: list[Dataset], tmp_path: Path) -> None:
    for ds in slices:
        assert parts.intake.accept(_encode(ds, tmp_path), ds, "dimse").status == 0
    parts.store.queue_quiet(0, time.time() + 1)


def _warm(workers: Workers):  # noqa: ANN202 - the WarmChild this (test) thread now holds
    workers._keep_warm()
    [child] = workers._warm.values()
    return child


def test_a_warm_child_takes_the_job_and_the_job_records_its_steps(tmp_path: Path, slices: list[Dataset]) -> None:
    parts = Parts(tmp_path)
    workers = parts.workers()
    try:
        _queued(parts, slices, tmp_path)
        child = _warm(workers)
        time.sleep(0.5)
        assert child.alive(), "a warm child waits for its job"
        assert workers.run_one()
        [job] = parts.store.list()
        assert job.state == "done", job.reason
        assert child.proc.returncode == 0, "the warm child, not a new one, processed the job and exited"
        assert workers._warm == {}, "a warm child takes one job only"
        steps = set(job.timings)
        assert {"fingerprint", "child_start", "imports", "read", "model", "load", "detect", "write", "total"} <= steps
        assert all(v >= 0 for v in job.timings.values())
        assert sum(v for k, v in job.timings.items() if k != "total") <= job.timings["total"] + 0.05
        assert parts.metrics.processing_stage.labels("detect")._sum.get() > 0

        second = _warm(workers)  # the worker's loop starts the next one; shutdown ends it and its log file
        assert second is not child
        workers.shutdown(1)
        assert second.proc.returncode is not None
        assert not list((parts.spool.root / "tmp").iterdir()), "no child's files are left behind"
    finally:
        workers.shutdown(1)
        parts.store.close()


def test_a_warm_child_that_died_gives_way_to_a_cold_one(tmp_path: Path, slices: list[Dataset]) -> None:
    parts = Parts(tmp_path)
    workers = parts.workers()
    try:
        _queued(parts, slices, tmp_path)
        child = _warm(workers)
        child.proc.kill()
        child.proc.wait()
        assert workers.run_one()
        [job] = parts.store.list()
        assert job.state == "done" and job.process_starts == 1, job.reason
        assert parts.metrics.job_crashes._value.get() == 0, "a dead warm child is not the job's crash"
        assert not list((parts.spool.root / "tmp").iterdir())
    finally:
        parts.store.close()


@pytest.mark.slow
def test_the_memory_limit_holds_for_a_warm_child(tmp_path: Path, slices: list[Dataset]) -> None:
    parts = Parts(tmp_path, memory_mb=40, max_crashes=1)  # less than a warm child's imports alone
    workers = parts.workers()
    try:
        _queued(parts, slices, tmp_path)
        _warm(workers)
        time.sleep(1.0)
        assert workers.run_one()
        [job] = parts.store.list()
        assert job.state == "failed" and "jobs.memory_mb = 40 MB" in job.reason, job.reason
        assert not list((parts.spool.root / "tmp").iterdir())
    finally:
        parts.store.close()


def test_warm_children_can_be_turned_off(tmp_path: Path) -> None:
    parts = Parts(tmp_path, warm_child=False)
    workers = parts.workers()
    try:
        workers._keep_warm()
        assert workers._warm == {}
    finally:
        parts.store.close()


def test_warm_children_that_keep_dying_are_given_up(tmp_path: Path) -> None:
    """A warm child that dies before its job is replaced, but not forever: after a few, cold children only."""
    from dicom_node.node import worker

    parts = Parts(tmp_path)
    workers = parts.workers()
    try:
        for _ in range(worker.MAX_WARM_DEATHS):
            child = _warm(workers)
            child.proc.kill()
            child.proc.wait()
        workers._keep_warm()
        assert workers._warm == {} and workers._warm_off, "no new warm child after repeated deaths"
    finally:
        parts.store.close()


def _received(parts: Parts, slices: list[Dataset], tmp_path: Path) -> int:
    for ds in slices:
        assert parts.intake.accept(_encode(ds, tmp_path), ds, "dimse").status == 0
    [job] = parts.store.list()
    return job.id


def _prepared(child) -> None:  # noqa: ANN001 - a WarmChild
    deadline = time.monotonic() + 60
    while child.preparing():
        assert time.monotonic() < deadline, "the preparation did not end"
        time.sleep(0.05)


def _outputs(parts: Parts, job_id: int) -> dict[str, bytes]:
    """Each output file's data set without its creation date and time: what the job made."""
    import pydicom

    out = {}
    for f in sorted((parts.spool.out_dir(job_id)).rglob("*.dcm")):
        ds = pydicom.dcmread(f)
        for keyword in ("InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime",
                        "SeriesDate", "SeriesTime"):
            if keyword in ds:
                delattr(ds, keyword)
        out[f.name] = bytes(ds.PixelData) if "PixelData" in ds else repr(ds).encode()
    return out


def test_a_series_prepared_during_its_grace_gives_the_same_result(tmp_path: Path, slices: list[Dataset]) -> None:
    """The job takes the warm child's read, volume and detection (its steps say so), and what it writes is
    what a job without the head start writes."""
    results = {}
    for ahead in (True, False):
        parts = Parts(tmp_path / str(ahead), prepare_ahead=ahead)
        workers = parts.workers()
        try:
            job_id = _received(parts, slices, tmp_path)
            child = _warm(workers)
            workers.prepare([job_id])
            assert bool(child.prepared_for) == ahead
            _prepared(child)
            parts.store.queue_quiet(0, time.time() + 1)
            assert workers.run_one()
            job = parts.store.get(job_id)
            assert job is not None and job.state == "done", job
            assert child.proc.returncode == 0, "the child that prepared the series took its job"
            steps = set(job.timings)
            if ahead:
                assert {"ahead_read", "ahead_load", "ahead_detect", "ahead_wait"} <= steps, steps
                assert not steps & {"read", "load", "detect"}, steps
            else:
                assert {"read", "load", "detect"} <= steps and not any(s.startswith("ahead_") for s in steps)
            results[ahead] = (job.lesions, _outputs(parts, job_id))
            workers.shutdown(1)
            assert not list((parts.spool.root / "tmp").iterdir()), "no preparation's files are left behind"
        finally:
            workers.shutdown(1)
            parts.store.close()
    assert results[True][1] and results[True] == results[False]


@pytest.fixture
def with_workers(tmp_path: Path):  # noqa: ANN201 - (Parts, Workers), shut down and closed afterwards
    parts = Parts(tmp_path)
    workers = parts.workers()
    yield parts, workers
    workers.shutdown(1)
    parts.store.close()


def test_an_instance_after_the_preparation_makes_the_job_start_from_the_files(
        with_workers: tuple[Parts, Workers], tmp_path: Path, slices: list[Dataset]) -> None:
    parts, workers = with_workers
    job_id = _received(parts, slices[:-1], tmp_path)
    child = _warm(workers)
    workers.prepare([job_id])
    _prepared(child)
    assert parts.intake.accept(_encode(slices[-1], tmp_path), slices[-1], "dimse").status == 0
    parts.store.queue_quiet(0, time.time() + 1)
    assert workers.run_one()
    job = parts.store.get(job_id)
    assert job is not None and job.state == "done" and job.instances == len(slices), job
    assert "detect" in job.timings and "ahead_detect" not in job.timings, job.timings
    assert child.proc.returncode == 0, "the same child did the job, from the files"


def test_a_child_that_dies_preparing_costs_the_job_nothing(with_workers: tuple[Parts, Workers], tmp_path: Path,
                                                          slices: list[Dataset]) -> None:
    parts, workers = with_workers
    job_id = _received(parts, slices, tmp_path)
    child = _warm(workers)
    workers.prepare([job_id])
    child.proc.kill()  # a codec's crash, or a limit, while preparing
    child.proc.wait()
    workers._keep_warm()  # the worker's loop replaces it ...
    assert workers._warm_died == 0, "... without counting it against warm children"
    parts.store.queue_quiet(0, time.time() + 1)
    assert workers.run_one()
    job = parts.store.get(job_id)
    assert job is not None and job.state == "done" and job.process_starts == 1, job
    assert parts.metrics.job_crashes._value.get() == 0


@pytest.mark.slow
def test_the_memory_limit_holds_while_preparing(tmp_path: Path, slices: list[Dataset]) -> None:
    parts = Parts(tmp_path, memory_mb=40)
    workers = parts.workers()
    try:
        job_id = _received(parts, slices, tmp_path)
        child = _warm(workers)
        workers.prepare([job_id])
        child.proc.wait(30)  # killed by the preparation's watcher, not by a job's
        assert child.proc.returncode < 0 and not child.preparing()
    finally:
        workers.shutdown(1)
        parts.store.close()


class _Fake:
    """What _take_warm looks at in a warm child."""

    def __init__(self, prepared_for: str = "", preparing: bool = False) -> None:
        self.prepared_for, self._preparing, self.discarded = prepared_for, preparing, False

    def alive(self) -> bool:
        return True

    def preparing(self) -> bool:
        return self._preparing

    def discard(self) -> None:
        self.discarded = True


def test_the_job_takes_the_child_that_prepared_its_series(with_workers: tuple[Parts, Workers]) -> None:
    import threading

    _, workers = with_workers
    me = threading.current_thread().name
    try:
        own, ready = _Fake(), _Fake("1.2.3")
        workers._warm = {me: own, "other": ready}  # type: ignore[dict-item]
        assert workers._take_warm("1.2.3") is ready
        assert workers._warm == {"other": own}, "the other thread gets this thread's child in exchange"

        busy, idle = _Fake("9.9", preparing=True), _Fake()
        workers._warm = {me: busy, "other": idle}  # type: ignore[dict-item]
        assert workers._take_warm("1.2.3") is idle, "a child busy with another series is not waited for"
        assert workers._warm == {"other": busy} and not busy.discarded

        busy, other_busy = _Fake("9.9", preparing=True), _Fake("8.8", preparing=True)
        workers._warm = {me: busy, "other": other_busy}  # type: ignore[dict-item]
        assert workers._take_warm("1.2.3") is None, "none free: the job starts a cold child"
        assert busy.discarded and workers._warm == {"other": other_busy}

        mine = _Fake("1.2.3", preparing=True)
        workers._warm = {me: mine}  # type: ignore[dict-item]
        assert workers._take_warm("1.2.3") is mine, "its own series: worth the wait"
    finally:
        workers._warm = {}


def test_prepared_series_are_bounded_by_the_inference_slots(with_workers: tuple[Parts, Workers]) -> None:
    """A prepared child holds a whole series in memory: no more of them than jobs.inference_slots (1)."""
    parts, workers = with_workers
    workers._warm = {"a": _Fake("1.2.3"), "b": _Fake()}  # type: ignore[dict-item]
    parts.store.note_instance("4.5.6", "4.5", "d")
    [job] = parts.store.list()
    workers.prepare([job.id])
    assert workers._warm["b"].prepared_for == "", "a second series would have been held in memory"
    workers._warm = {}
