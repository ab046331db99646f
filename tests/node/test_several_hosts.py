"""Receivers and workers as separate processes, sharing a spool and a PostgreSQL job store.

What several hosts would run, on one machine: a receiver takes the series from the PACS (Orthanc
routes it over DIMSE), two workers claim, process and send. A worker killed with SIGKILL in the
middle of processing loses its lease; the other takes the job over, and the derived series still
reaches Orthanc exactly once, its job showing two processing runs.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pydicom
import pytest
import requests

from dicom_node_lab import phantom
from dicom_node_lab.peers import NodeProcess, Orthanc, PostgresCluster, free_port, storescu, wait_for, write_node_config
from dicom_node_lab.phantom_dicom import write_phantom_series
from tests.node.conftest import postgres_cluster, send_scu

pytestmark = [pytest.mark.postgres, pytest.mark.integration]

LEASE_S = 4.0  # short, so that a dead worker's job comes back within seconds


@pytest.fixture(scope="module")
def cluster():
    c = postgres_cluster()
    yield c
    c.remove()


def _series(folder: Path, seed: int, slices: int = 40) -> tuple[Path, str]:
    opts = phantom.PhantomOptions(n_vessels=(2, 2), calcified_probability=1.0, bone_probability=0.0,
                                  lesion_margin_mm=5.0)
    folder.mkdir()
    write_phantom_series(phantom.generate((slices, 96, 96), seed=seed, options=opts), folder)
    ds = pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True)
    return folder, str(ds.StudyInstanceUID)


class Hosts:
    """One Orthanc (the PACS), one receiver, two workers, one shared spool and job store."""

    def __init__(self, root: Path, store_url: str) -> None:
        self.receiver_dicom = free_port()
        ports = [free_port() for _ in range(3)]
        self.orthanc = Orthanc(root / "orthanc", self.receiver_dicom, ports[0], "dimse")
        spool = root / "shared-spool"
        dest = [{"name": "pacs", "kind": "dimse", "ae_title": self.orthanc.aet, "host": "127.0.0.1",
                 "port": self.orthanc.dicom_port}]
        extra = {"jobs": [f'store = "{store_url}"', f"lease_seconds = {LEASE_S}"]}
        self.nodes: dict[str, NodeProcess] = {}
        for name, role, http in (("receiver", "receiver", ports[0]), ("worker-a", "worker", ports[1]),
                                 ("worker-b", "worker", ports[2])):
            dicom = self.receiver_dicom if role == "receiver" else free_port()
            cfg = write_node_config(root, dicom_port=dicom, http_port=http, destinations=dest, name=name,
                                    spool=spool, allowed=[("ORTHANC", "127.0.0.1")], extra=extra)
            self.nodes[name] = NodeProcess(cfg, http, dicom, root / f"{name}.log", role=role)

    def start(self) -> Hosts:
        for node in self.nodes.values():
            node.start()
        self.orthanc.start()
        return self

    def stop(self) -> None:
        self.orthanc.stop()
        for node in self.nodes.values():
            node.stop()

    def jobs(self) -> list[dict]:
        return requests.get(f"{self.nodes['receiver'].url}/jobs", timeout=5).json()

    def derived_in_orthanc(self, study: str) -> list[dict]:
        return [s for s in self.orthanc.study_series(study)
                if s["MainDicomTags"].get("SeriesDescription", "").endswith("CALCIUM REMOVED")]


@pytest.fixture
def hosts(tmp_path: Path, cluster: PostgresCluster):
    h = Hosts(tmp_path, cluster.create_database(f"hosts{time.monotonic_ns()}"))
    try:
        yield h.start()
    finally:
        h.stop()


def test_a_receiver_and_two_workers_deliver_every_series_once(hosts: Hosts, tmp_path: Path) -> None:
    studies = []
    for seed in (31, 32, 33):
        folder, study = _series(tmp_path / f"cta{seed}", seed)
        storescu(("127.0.0.1", hosts.orthanc.dicom_port), hosts.orthanc.aet, folder)
        studies.append(study)

    def all_done() -> bool:
        jobs = hosts.jobs()
        failed = [j for j in jobs if j["state"] == "failed"]
        assert not failed, failed[0]["reason"]
        return len(jobs) == 3 and all(j["state"] == "done" for j in jobs)
    wait_for(all_done, 300, "three jobs done", interval=1.0)
    for study in studies:
        derived = wait_for(lambda s=study: hosts.derived_in_orthanc(s) or None, 30, "the derived series")
        assert len(derived) == 1 and len(derived[0]["Instances"]) == 40
    # every role reads the shared store: a worker's page shows the receiver's jobs
    worker_view = requests.get(f"{hosts.nodes['worker-a'].url}/jobs", timeout=5).json()
    assert {j["id"] for j in worker_view} == {j["id"] for j in hosts.jobs()}
    assert requests.get(f"{hosts.nodes['worker-a'].url}/healthz", timeout=5).json()["role"] == "worker"


def test_a_worker_killed_while_processing_hands_its_job_to_the_other(hosts: Hosts, tmp_path: Path) -> None:
    folder, study = _series(tmp_path / "cta", 34, slices=64)
    storescu(("127.0.0.1", hosts.orthanc.dicom_port), hosts.orthanc.aet, folder)
    job = wait_for(lambda: next((j for j in hosts.jobs() if j["state"] == "processing"), None), 120,
                   "a job being processed", interval=0.1)
    # which worker has it: its log names the job as it starts processing
    def started(node: NodeProcess) -> bool:
        return any(f'"job": {job["id"]}' in line and "processing " in line and " instances (run " in line
                   for line in node.log.read_text(errors="replace").splitlines())
    holder = wait_for(lambda: next((n for n, node in hosts.nodes.items() if n.startswith("worker") and
                                    started(node)), None), 20, "the worker holding the job", interval=0.1)
    victim = hosts.nodes[holder]
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(10)

    def done() -> dict | None:
        j = next(j for j in hosts.jobs() if j["id"] == job["id"])
        assert j["state"] != "failed", j["reason"]
        return j if j["state"] == "done" else None
    finished = wait_for(done, 240, "the job finished by the other worker", interval=1.0)
    assert finished["processing_runs"] == 2, finished
    derived = wait_for(lambda: hosts.derived_in_orthanc(study) or None, 30, "the derived series")
    assert len(derived) == 1 and len(derived[0]["Instances"]) == 64  # exactly once


def test_losing_the_database_refuses_what_it_cannot_record_and_recovers_without_a_restart(tmp_path: Path) -> None:
    """PostgreSQL stopped hard in the middle of a series: every instance that got success is recorded and
    spooled; the rest get "out of resources" (STOW-RS: 503); once the database is back, the same node
    takes the re-sent instances and processes the series, without a restart."""
    import psycopg

    cluster = postgres_cluster()
    try:
        url = cluster.create_database("loss")
        dicom, http = free_port(), free_port()
        cfg = write_node_config(tmp_path, dicom_port=dicom, http_port=http, destinations=[], quiet=4.0,
                                allowed=[("STORESCU", "127.0.0.1")], extra={"jobs": [f'store = "{url}"']})
        node = NodeProcess(cfg, http, dicom, tmp_path / "node.log").start()
        try:
            folder, _ = _series(tmp_path / "cta", 35)
            files = sorted(folder.glob("*.dcm"))

            def crash(acknowledged: int) -> None:
                if acknowledged == 15:
                    cluster.stop("immediate")
            sent = send_scu(dicom, files, crash)
            ok = [uid for uid, status in sent.items() if status == 0]
            refused = [status for status in sent.values() if status != 0]
            assert len(ok) == 15 and refused and set(refused) == {0xA700}, sent
            body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + files[-1].read_bytes() + b"\r\n--b--\r\n"
            stow = requests.post(f"{node.url}/dicomweb/studies", data=body, timeout=30,
                                 headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'})
            assert stow.status_code == 503 and stow.headers.get("Retry-After"), stow.text
            cluster.restart()
            with psycopg.connect(url) as db:  # what got success was committed before the answer
                recorded = {r[0] for r in db.execute("SELECT sop_uid FROM instances")}
            assert set(ok) <= recorded
            spooled = {p.stem for p in (tmp_path / "spool" / "series").rglob("*.dcm")}
            assert set(ok) <= spooled
            resent = send_scu(dicom, files[15:])  # the sender retries what was refused
            assert all(status == 0 for status in resent.values()), resent

            def done() -> dict | None:
                jobs = requests.get(f"{node.url}/jobs", timeout=5).json()
                return jobs[0] if jobs and jobs[0]["state"] == "done" else None
            job = wait_for(done, 180, "the series processed after the database came back", interval=1.0)
            assert job["instances"] == len(files) and len(requests.get(f"{node.url}/jobs", timeout=5).json()) == 1
        finally:
            node.stop()
    finally:
        cluster.remove()


def test_an_unreachable_job_store_stops_the_start_with_one_line_and_exit_code_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    url = f"postgresql://node:hunter2-secret@127.0.0.1:{free_port()}/jobs"
    cfg = write_node_config(tmp_path, dicom_port=free_port(), http_port=free_port(), destinations=[], allowed=[],
                            extra={"jobs": [f'store = "{url}"']})
    out = subprocess.run([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1 and "jobs.store" in errors[0], out.stderr[-2000:]
    assert "hunter2-secret" not in out.stderr + out.stdout


def test_a_worker_killed_while_sending_hands_the_send_over_and_the_series_arrives_once(hosts: Hosts,
                                                                                       tmp_path: Path) -> None:
    folder, study = _series(tmp_path / "cta", 36, slices=96)
    storescu(("127.0.0.1", hosts.orthanc.dicom_port), hosts.orthanc.aet, folder)
    job = wait_for(lambda: next((j for j in hosts.jobs() if j["state"] == "sending" and j["claimed"]), None),
                   240, "a job being sent", interval=0.02)
    pid = int(job["worker"].rsplit(":", 1)[1])  # the claim says who holds it
    holder = next(n for n, node in hosts.nodes.items() if node.proc is not None and node.proc.pid == pid)
    victim = hosts.nodes[holder]
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(10)

    def done() -> dict | None:
        j = requests.get(f"{hosts.nodes['receiver'].url}/jobs/{job['id']}", timeout=5).json()
        assert j["state"] != "failed", j["reason"]
        return j if j["state"] == "done" else None
    finished = wait_for(done, 240, "the send finished by the other worker", interval=1.0)
    derived = wait_for(lambda: hosts.derived_in_orthanc(study) or None, 30, "the derived series")
    assert len(derived) == 1 and len(derived[0]["Instances"]) == 96  # exactly once, no duplicate instance
    assert finished["claims"] > job["claims"] and finished["worker"] != job["worker"]  # taken over
    last = finished["sends"]["pacs"][str(finished["claims"])]
    # the whole output again (96 slices, the SEG and the report), by the new claim
    assert last == {"stored": finished["outputs"], "refused": 0} and finished["outputs"] == 98, finished["sends"]
