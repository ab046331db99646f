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
