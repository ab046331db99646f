"""Faults, against the real node process and a real Orthanc on loopback.

- a crash (kill -9) while a series arrives: every acknowledged instance survives, the sender's
  retry completes the series, and one job processes it whole;
- a crash while processing and while sending: the derived series reaches the PACS exactly once;
- the destination down: jobs wait and retry with backoff, deliver once it is back, or fail with
  the reason after the retry limit and keep their files;
- the disk full: new instances are refused with 0xA700, what was received stays intact, and the
  node resumes (receiving and processing) when space returns.

Senders are pynetdicom SCUs in the test where the exact per-instance status matters, DCMTK's
storescu elsewhere. The source series go straight to the node; Orthanc is only the destination,
so everything in its study is our output.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests

from dicom_node.node.spool import HOST
from dicom_node_lab import phantom
from dicom_node_lab.peers import NodeProcess, Orthanc, free_port, storescu, wait_for, write_node_config
from dicom_node_lab.phantom_dicom import write_phantom_series
from tests.node.conftest import send_scu

pytestmark = pytest.mark.integration

LOCAL = [("STORESCU", "127.0.0.1")]
SUCCESS, OUT_OF_RESOURCES = 0x0000, 0xA700


@pytest.fixture(scope="module")
def cta() -> phantom.Phantom:
    """A small phantom with calcium the model finds (48 slices of 64x64: about a second to process)."""
    opts = phantom.PhantomOptions(n_vessels=(2, 2), calcified_probability=1.0, bone_probability=0.0,
                                  lesion_margin_mm=5.0)
    p = phantom.generate((48, 64, 64), seed=31, options=opts)
    assert p.calcium_mask.any()
    return p


def _series(p: phantom.Phantom, folder: Path) -> list[Path]:
    """The phantom as a new series (fresh study, series and instance UIDs), slice order."""
    return write_phantom_series(p, folder)


def _uids(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def _node(tmp_path: Path, dest_port: int | None, *, quiet: float = 1.0, retries: int = 50, backoff: float = 0.5,
          min_free_mb: int | None = None) -> NodeProcess:
    dicom_port, http_port = free_port(), free_port()
    dests = [] if dest_port is None else [{"name": "pacs", "kind": "dimse", "ae_title": "ORTHANC",
                                           "host": "127.0.0.1", "port": dest_port, "timeout_seconds": 5.0}]
    cfg = write_node_config(tmp_path, dicom_port=dicom_port, http_port=http_port, destinations=dests,
                            allowed=LOCAL, quiet=quiet, retries=retries, backoff=backoff)
    if min_free_mb is not None:
        text = cfg.read_text()
        assert "min_free_mb = 16" in text
        cfg.write_text(text.replace("min_free_mb = 16", f"min_free_mb = {min_free_mb}"))
    return NodeProcess(cfg, http_port, dicom_port, tmp_path / "node.log")


def _orthanc(tmp_path: Path) -> Orthanc:
    # The node's ports only matter for routing into the node, which these tests do not use.
    return Orthanc(tmp_path / "orthanc", free_port(), free_port(), "dimse")


@pytest.fixture
def peers(tmp_path: Path):
    """(make_node, orthanc): Orthanc is created but not started; everything stops at the end."""
    orthanc = _orthanc(tmp_path)
    nodes: list[NodeProcess] = []

    def make(dest_port: int | None = None, **kw: Any) -> NodeProcess:
        node = _node(tmp_path, orthanc.dicom_port if dest_port is None else dest_port, **kw)
        nodes.append(node)
        return node
    try:
        yield make, orthanc
    finally:
        for node in nodes:
            node.stop()
        orthanc.stop()


def crash(node: NodeProcess) -> None:
    """kill -9: no shutdown handler, no flush, no goodbye to peers."""
    assert node.proc is not None and node.proc.poll() is None, "the node was not running"
    node.proc.kill()
    node.proc.wait(10)
    node.proc = None


def outputs_in_orthanc(orthanc: Orthanc, study_uid: str) -> dict[str, list[dict]]:
    """The study's series in Orthanc by modality (only our outputs go there in these tests)."""
    out: dict[str, list[dict]] = {}
    for s in orthanc.study_series(study_uid):
        out.setdefault(s["MainDicomTags"].get("Modality", ""), []).append(s)
    return out


def wait_delivered(node: NodeProcess, orthanc: Orthanc, study_uid: str, n: int, timeout: float = 90) -> None:
    """Until the node's jobs are all done and Orthanc holds the complete derived series, its SEG and its report."""
    def complete() -> bool:
        jobs = node.jobs()
        failed = [j for j in jobs if j["state"] == "failed"]
        if failed:
            pytest.fail(f"job failed: {failed[0]['reason']}\n{node.log.read_text()[-3000:]}")
        series = outputs_in_orthanc(orthanc, study_uid)
        return (bool(jobs) and all(j["state"] == "done" for j in jobs) and bool(series.get("SEG"))
                and bool(series.get("SR")) and any(len(s["Instances"]) >= n for s in series.get("CT", [])))
    wait_for(complete, timeout, "delivery of the derived series and the SEG to Orthanc", interval=0.5)


def assert_exactly_once(orthanc: Orthanc, study_uid: str, n: int, derived_uid: str, studies: int = 1) -> None:
    """One derived CT series with exactly n instances (one per source slice), one SEG and one lesion report
    (SR) with one instance each; and nothing else in Orthanc (``studies`` such studies in all)."""
    series = outputs_in_orthanc(orthanc, study_uid)
    counts = {k: [len(s["Instances"]) for s in v] for k, v in series.items()}
    assert counts == {"CT": [n], "SEG": [1], "SR": [1]}, counts
    ct = series["CT"][0]
    assert ct["MainDicomTags"]["SeriesInstanceUID"] == derived_uid
    assert "CALCIUM REMOVED" in ct["MainDicomTags"].get("SeriesDescription", "").upper()
    # Orthanc keys instances by SOP Instance UID: n distinct UIDs, and Orthanc stored no more than n.
    sops = {orthanc.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] for i in ct["Instances"]}
    assert len(sops) == n
    stats = orthanc.get("/statistics")
    assert (stats["CountStudies"], stats["CountInstances"]) == (studies, studies * (n + 2)), stats


def log_messages(node: NodeProcess) -> list[dict]:
    out = []
    for line in node.log.read_text().splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


# -- 1. crash while receiving ------------------------------------------------------------------

@pytest.mark.slow
def test_crash_during_receive_keeps_acknowledged_instances(peers, cta: phantom.Phantom, tmp_path: Path) -> None:
    make, orthanc = peers
    orthanc.start()
    files = _series(cta, tmp_path / "cta")
    n = len(files)
    study, series_uid, _ = _uids(files[0])
    # Quiet time 3 s: the node stays down longer than that, and the PACS retries 1.5 s after it is back.
    node = make(quiet=3.0).start()
    killer: list[threading.Thread] = []

    def kill_midway(successes: int) -> None:
        if successes == n // 2:  # kill while the association carries on with the next instances
            killer.append(threading.Thread(target=crash, args=(node,)))
            killer[0].start()
    statuses = send_scu(node.dicom_port, files, on_success=kill_midway)
    assert killer, f"only {sum(s == SUCCESS for s in statuses.values())} of {n} instances acknowledged"
    killer[0].join(10)
    assert node.proc is None, "the kill did not happen"
    acked = [uid for uid, s in statuses.items() if s == SUCCESS]
    assert n // 2 <= len(acked) < n, f"{len(acked)} of {n} acknowledged: the crash did not interrupt the series"
    assert all(s in (SUCCESS, None) for s in statuses.values()), statuses

    time.sleep(3.5)  # down for longer than the quiet time: a crash is no end of the series
    node.start()
    spool = node.config.parent / "spool"
    # What tmp/ holds now is the new node's own: its workers' warm processing children's logs.
    ours = f"{HOST}-{node.proc.pid}-warm-"
    assert [p.name for p in (spool / "tmp").iterdir() if not p.name.startswith(ours)] == [], \
        "an unacknowledged partial write survived the restart"
    by_uid = {_uids(f)[2]: f for f in files}
    for uid in acked:
        stored = spool / "series" / series_uid / f"{uid}.dcm"
        assert stored.is_file(), f"acknowledged instance {uid} is not in the spool"
        a, b = pydicom.dcmread(stored), pydicom.dcmread(by_uid[uid])
        assert a.SOPInstanceUID == b.SOPInstanceUID and a.PixelData == b.PixelData

    resumed = [m["msg"] for m in log_messages(node) if m["msg"].startswith("resuming:")]
    assert len(resumed) == 1 and "waiting for the rest of the series" in resumed[0], resumed

    # The PACS retries what it got no success for, a while later (here: half the quiet time).
    time.sleep(1.5)
    rest = [by_uid[uid] for uid, s in statuses.items() if s != SUCCESS]
    assert all(s == SUCCESS for s in send_scu(node.dicom_port, rest).values())
    wait_delivered(node, orthanc, study, n)
    jobs = node.jobs()
    assert len(jobs) == 1, f"the series was processed in pieces: {[(j['instances'], j['reason']) for j in jobs]}"
    assert jobs[0]["instances"] >= n and jobs[0]["deliveries"]["pacs"]["state"] == "done"
    assert len(list((spool / "series" / series_uid).glob("*.dcm"))) == n
    assert_exactly_once(orthanc, study, n, jobs[0]["derived_series_uid"])


# -- 2. crash while processing, crash while sending -------------------------------------------

def test_crash_during_processing_delivers_once(peers, cta: phantom.Phantom, tmp_path: Path) -> None:
    make, orthanc = peers
    orthanc.start()
    files = _series(cta, tmp_path / "cta")
    n = len(files)
    study = _uids(files[0])[0]
    node = make(quiet=0.5).start()
    storescu(("127.0.0.1", node.dicom_port), "DICOMNODE", files[0].parent)
    wait_for(lambda: node.jobs(state="processing"), 30, "the job to start processing", interval=0.02)
    crash(node)
    out_dir = node.config.parent / "spool" / "out"
    assert outputs_in_orthanc(orthanc, study) == {}, "sent before processing ended"

    node.start()
    resumed = [m for m in log_messages(node) if m["msg"].startswith("resuming:")]
    assert [m["msg"] for m in resumed] == ["resuming: requeued after restart"], "the crash missed processing"
    wait_delivered(node, orthanc, study, n)
    jobs = node.jobs()
    assert len(jobs) == 1 and jobs[0]["state"] == "done" and jobs[0]["outputs"] == n + 2
    assert len(list(out_dir.rglob("*.dcm"))) == n + 2, "the interrupted run left stray outputs"
    assert_exactly_once(orthanc, study, n, jobs[0]["derived_series_uid"])


class SlowRelay:
    """A TCP relay on loopback that holds back each chunk the node sends: a reachable but slow PACS."""

    def __init__(self, target_port: int, delay: float) -> None:
        self.target_port, self.delay = target_port, delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []

    def __enter__(self) -> SlowRelay:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.listener.close()
        for s in self.sockets:
            s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            except OSError:
                return
            upstream.settimeout(None)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.sockets.append(s)
            threading.Thread(target=self._pump, args=(client, upstream, self.delay), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, 0.0), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, delay: float) -> None:
        try:
            while data := src.recv(65536):
                time.sleep(delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def test_crash_during_sending_delivers_once(peers, cta: phantom.Phantom, tmp_path: Path) -> None:
    make, orthanc = peers
    orthanc.start()
    files = _series(cta, tmp_path / "cta")
    n = len(files)
    study = _uids(files[0])[0]
    with SlowRelay(orthanc.dicom_port, delay=0.05) as relay:
        node = make(relay.port, quiet=0.5).start()
        storescu(("127.0.0.1", node.dicom_port), "DICOMNODE", files[0].parent)

        def part_delivered() -> bool:
            ct = outputs_in_orthanc(orthanc, study).get("CT", [])
            return bool(ct) and len(ct[0]["Instances"]) >= 3
        wait_for(part_delivered, 60, "the first derived instances in Orthanc", interval=0.1)
        assert [j["state"] for j in node.jobs()] == ["sending"]
        crash(node)
        time.sleep(1.0)  # Orthanc notices the dead association and drops the instance in flight
        before = outputs_in_orthanc(orthanc, study)
        assert 3 <= len(before["CT"][0]["Instances"]) < n, "the crash did not interrupt the delivery"

        node.start()
        resumed = [m["msg"] for m in log_messages(node) if m["msg"].startswith("resuming:")]
        assert resumed == ["resuming: resuming delivery after restart"], resumed
        wait_delivered(node, orthanc, study, n)
    jobs = node.jobs()
    assert len(jobs) == 1 and jobs[0]["state"] == "done"
    assert_exactly_once(orthanc, study, n, jobs[0]["derived_series_uid"])


# -- 3. the destination down -------------------------------------------------------------------

def _delivery_failures(node: NodeProcess) -> list[float]:
    """Times of the failed delivery attempts, from the node's log."""
    import datetime as dt
    return [dt.datetime.fromisoformat(m["time"]).timestamp() for m in log_messages(node)
            if m["msg"].startswith("delivery failed:")]


def test_destination_down_then_back_delivers(peers, cta: phantom.Phantom, tmp_path: Path) -> None:
    make, orthanc = peers  # Orthanc not started: nothing listens on its port yet
    files = _series(cta, tmp_path / "cta")
    n = len(files)
    study = _uids(files[0])[0]
    node = make(quiet=0.5, retries=50, backoff=0.5).start()
    storescu(("127.0.0.1", node.dicom_port), "DICOMNODE", files[0].parent)
    job = wait_for(lambda: [j for j in node.jobs() if j["attempts"] >= 3], 60, "three failed delivery attempts")[0]
    assert job["state"] == "sending" and "retry in" in job["reason"], job
    assert f"127.0.0.1:{orthanc.dicom_port}" in job["reason"] and "refused" in job["reason"].lower(), job["reason"]
    assert job["deliveries"]["pacs"]["state"] == "failed"
    times = _delivery_failures(node)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert len(gaps) >= 2 and gaps[0] >= 0.45 and gaps[1] >= 0.9, f"no backoff between attempts: {gaps}"

    orthanc.start()
    wait_delivered(node, orthanc, study, n, timeout=60)
    done = node.jobs()
    assert len(done) == 1 and done[0]["deliveries"]["pacs"]["state"] == "done" and done[0]["attempts"] >= 3
    assert_exactly_once(orthanc, study, n, done[0]["derived_series_uid"])


def test_destination_never_back_fails_with_reason_and_keeps_files(peers, cta: phantom.Phantom,
                                                                  tmp_path: Path) -> None:
    make, orthanc = peers  # never started
    files = _series(cta, tmp_path / "cta")
    n = len(files)
    series_uid = _uids(files[0])[1]
    node = make(quiet=0.5, retries=2, backoff=0.2).start()
    storescu(("127.0.0.1", node.dicom_port), "DICOMNODE", files[0].parent)
    job = wait_for(lambda: node.jobs(state="failed"), 60, "the job to fail")[0]
    reason = job["reason"]
    assert reason.startswith("delivery failed after 3 attempts: pacs: "), reason
    assert f"ORTHANC@127.0.0.1:{orthanc.dicom_port}" in reason and "connection refused" in reason.lower(), reason
    assert job["attempts"] == 2 and len(_delivery_failures(node)) == 3
    assert len(node.jobs()) == 1
    spool = node.config.parent / "spool"
    assert len(list((spool / "series" / series_uid).glob("*.dcm"))) == n, "the input is gone"
    outputs = list((spool / "out" / str(job["id"])).rglob("*.dcm"))
    assert job["outputs"] == len(outputs) == n + 2, "the outputs are gone"
    assert all(pydicom.dcmread(f).SOPInstanceUID for f in outputs)


# -- 4. the disk full --------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path: Path):
    """A 24 MB tmpfs where the node's spool goes; unmounted at the end."""
    mnt = tmp_path / "spool"
    mnt.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0755", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(folder: Path, name: str = "filler") -> Path:
    """Write one file until the file system has no byte left."""
    path = folder / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    chunk = 1 << 20
    try:
        while chunk >= 512:
            try:
                os.write(fd, bytes(chunk))
            except OSError:
                chunk //= 2
    finally:
        os.close(fd)
    assert shutil.disk_usage(folder).free < 64 * 1024
    return path


def stow_one(node: NodeProcess, path: Path) -> requests.Response:
    boundary = "fault-test-boundary"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + path.read_bytes()
            + f"\r\n--{boundary}--\r\n".encode())
    return requests.post(f"{node.url}/dicomweb/studies", data=body, timeout=30, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json"})


@pytest.mark.slow
def test_disk_full_refuses_keeps_and_resumes(peers, small_disk: Path, cta: phantom.Phantom, tmp_path: Path) -> None:
    """The disk fills up while a job is processing (no min_free_mb floor: the real ENOSPC everywhere)."""
    make, orthanc = peers
    orthanc.start()
    first = _series(cta, tmp_path / "first")
    second = _series(cta, tmp_path / "second")
    n = len(first)
    study_a, series_a, _ = _uids(first[0])
    study_b, series_b, _ = _uids(second[0])
    node = make(quiet=0.5, backoff=0.5, min_free_mb=0).start()
    spool = node.config.parent / "spool"
    assert spool == small_disk
    assert all(s == SUCCESS for s in send_scu(node.dicom_port, first).values())
    wait_for(lambda: node.jobs(state="processing"), 30, "the first job to start processing", interval=0.02)
    fillers = [fill(spool)]  # the job's outputs no longer fit
    try:
        wait_for(lambda: any("interrupted (disk full)" in m["msg"] for m in log_messages(node)), 30,
                 "the node to notice the full disk")
        fillers.append(fill(spool, "filler-2"))  # what the node freed when it gave up its partial outputs
        refused = send_scu(node.dicom_port, second)
        assert set(refused.values()) == {OUT_OF_RESOURCES}, refused
        answer = stow_one(node, second[0])  # the HTTP door answers the same
        assert answer.status_code == 409, answer.text
        assert [i["00081197"]["Value"] for i in answer.json()["00081198"]["Value"]] == [[OUT_OF_RESOURCES]]
        assert not list((spool / "series").glob(f"{series_b}/*.dcm")), "a refused instance was kept"
        time.sleep(3.0)
        jobs = node.jobs()
        assert [j["series_uid"] for j in jobs] == [series_a], jobs
        assert jobs[0]["state"] not in ("failed", "done"), f"a full disk ended the job: {jobs[0]['reason']}"
        assert requests.get(f"{node.url}/healthz", timeout=5).ok
    finally:
        for f in fillers:
            f.unlink()

    by_uid = {_uids(f)[2]: f for f in first}
    stored = sorted((spool / "series" / series_a).glob("*.dcm"))
    assert len(stored) == n
    for f in stored:
        a = pydicom.dcmread(f)
        assert a.PixelData == pydicom.dcmread(by_uid[a.SOPInstanceUID]).PixelData, f"{f.name} changed"

    # Space is back: the waiting job goes on by itself, and the refused series is accepted when re-sent.
    wait_delivered(node, orthanc, study_a, n, timeout=60)
    assert all(s == SUCCESS for s in send_scu(node.dicom_port, second).values()), "no service after space returned"
    wait_delivered(node, orthanc, study_b, n, timeout=60)
    jobs = {j["series_uid"]: j for j in node.jobs()}
    assert set(jobs) == {series_a, series_b} and all(j["state"] == "done" for j in jobs.values()), jobs
    assert_exactly_once(orthanc, study_a, n, jobs[series_a]["derived_series_uid"], studies=2)
    assert_exactly_once(orthanc, study_b, n, jobs[series_b]["derived_series_uid"], studies=2)
