"""``python tools/bench.py hosts``: what the shared job store costs, and receivers and workers as separate processes.

Three measurements in one run on this machine, each against its peer in the same run:

1. the job store's overhead: per instance (``note_instance``: one transaction, one row in
   ``instances``) and per job (quiet → claim → sending → claim → done), SQLite in the spool
   vs PostgreSQL on loopback (a private cluster started here, ``fsync`` and synchronous commit on);
2. ingest over DIMSE with one receiver (one association) and with two receivers (one
   association each, at once), sharing the spool and the PostgreSQL store;
3. ``--studies`` studies through one receiver and two workers into Orthanc, end to end, with
   every derived series checked complete.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

from dicom_node.node.jobs import open_job_store
from dicom_node_lab import peers


def store_overhead(url: str, sqlite_path: Path, instances: int, jobs: int) -> dict[str, float]:
    store = open_job_store(url, sqlite_path)
    try:
        t0 = time.perf_counter()
        for i in range(instances):
            store.note_instance(f"1.2.{i // 250}", "1.2", "bench", sop_uid=f"1.2.{i // 250}.{i}")
        per_instance = (time.perf_counter() - t0) / instances
        for j in range(jobs):
            store.note_instance(f"9.{j}", "9", "bench", now=1000.0, sop_uid=f"9.{j}.1")
        store.queue_quiet(1.0, now=2000.0)
        t0 = time.perf_counter()
        for _ in range(jobs):
            job = store.claim(now=3000.0)
            store.to_sending(job.id, [], "", "sending", epoch=job.lease_epoch)
            send = store.claim(now=3000.0)
            store.finish(send.id, "done", "delivered", epoch=send.lease_epoch)
        per_job = (time.perf_counter() - t0) / jobs
    finally:
        store.close()
    return {"us_per_instance": round(per_instance * 1e6, 1), "ms_per_job": round(per_job * 1e3, 2)}


def _receivers(root: Path, url: str, n: int) -> list[peers.NodeProcess]:
    nodes = []
    for i in range(n):
        dicom, http = peers.free_port(), peers.free_port()
        cfg = peers.write_node_config(root, dicom_port=dicom, http_port=http, destinations=[], name=f"receiver{i}",
                                      spool=root / "spool", allowed=[("STORESCU", "127.0.0.1")], quiet=3600,
                                      extra={"jobs": [f'store = "{url}"', "release_grace_seconds = 0"]})
        nodes.append(peers.NodeProcess(cfg, http, dicom, root / f"receiver{i}.log", role="receiver").start())
    return nodes


def ingest(cluster: peers.PostgresCluster, root: Path, studies: list[Path]) -> dict[str, float]:
    n = len(list(studies[0].glob("*.dcm")))
    out = {}
    for count in (1, 2):
        url = cluster.create_database(f"ingest{count}")
        work = root / f"ingest{count}"
        work.mkdir()
        nodes = _receivers(work, url, count)
        try:
            time.sleep(1.0)
            t0 = time.perf_counter()
            threads = [threading.Thread(target=peers.storescu, args=(("127.0.0.1", node.dicom_port), "DICOMNODE",
                                                                     studies[i])) for i, node in enumerate(nodes)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            out[f"{count}_receivers_instances_per_s"] = round(count * n / (time.perf_counter() - t0), 1)
        finally:
            for node in nodes:
                node.stop()
    out["ratio_2_to_1"] = round(out["2_receivers_instances_per_s"] / out["1_receivers_instances_per_s"], 2)
    return out


def end_to_end(cluster: peers.PostgresCluster, root: Path, studies: list[Path], timeout: float) -> dict:
    from dicom_node_lab.bench import _study_uid

    def delivered(study: str, n: int) -> bool:  # the derived series complete (a SEG only where calcium was)
        return any(s["MainDicomTags"].get("SeriesDescription", "").endswith("CALCIUM REMOVED")
                   and len(s["Instances"]) == n for s in orthanc.study_series(study))

    url = cluster.create_database("e2e")
    work = root / "e2e"
    work.mkdir()
    receiver_dicom = peers.free_port()
    orthanc = peers.Orthanc(work / "orthanc", receiver_dicom, peers.free_port(), "dimse")
    dest = [{"name": "pacs", "kind": "dimse", "ae_title": orthanc.aet, "host": "127.0.0.1",
             "port": orthanc.dicom_port}]
    nodes = []
    for name, role in (("receiver", "receiver"), ("worker-a", "worker"), ("worker-b", "worker")):
        dicom = receiver_dicom if role == "receiver" else peers.free_port()
        http = peers.free_port()
        cfg = peers.write_node_config(work, dicom_port=dicom, http_port=http, destinations=dest, name=name,
                                      spool=work / "spool", allowed=[("STORESCU", "127.0.0.1")], quiet=3.0,
                                      extra={"jobs": [f'store = "{url}"', "release_grace_seconds = 0"]})
        nodes.append(peers.NodeProcess(cfg, http, dicom, work / f"{name}.log", role=role))
    try:
        for node in nodes:
            node.start()
        orthanc.start()
        n = len(list(studies[0].glob("*.dcm")))
        uids = [_study_uid(s) for s in studies]
        t0 = time.perf_counter()
        for s in studies:
            peers.storescu(("127.0.0.1", receiver_dicom), "DICOMNODE", s)
        sent = time.perf_counter() - t0
        peers.wait_for(lambda: all(delivered(u, n) for u in uids), timeout,
                       "every derived series in Orthanc", interval=2.0)
        wall = time.perf_counter() - t0
        jobs = nodes[0].jobs()
        by_worker: dict[str, int] = {}
        for j in jobs:
            by_worker[j["worker"]] = by_worker.get(j["worker"], 0) + 1
        return {"studies": len(studies), "slices": n, "all_delivered": True, "seconds_sending_in": round(sent, 1),
                "seconds_until_all_delivered": round(wall, 1),
                "seconds_per_study": round(wall / len(studies), 1),
                "jobs_done": sum(j["state"] == "done" for j in jobs),
                "jobs_per_worker": sorted(by_worker.values())}
    finally:
        orthanc.stop()
        for node in nodes:
            node.stop()


def bench_hosts(args: argparse.Namespace) -> int:
    from dicom_node_lab.bench import study_copies

    cache = Path(args.cache)
    root = Path(tempfile.mkdtemp(prefix="bench-hosts-", dir=cache.resolve() if cache.exists() else None))
    cluster = peers.PostgresCluster().start()
    report: dict = {}
    try:
        report["job_store"] = {
            "sqlite": store_overhead("", root / "jobs.sqlite", args.instances, args.jobs),
            "postgresql": store_overhead(cluster.create_database("overhead"), root / "unused", args.instances,
                                         args.jobs)}
        # copies under a folder of their own: study_copies caches by count, not by shape
        shape = tuple(args.shape)
        studies = study_copies(cache / f"hosts-{shape[0]}x{shape[1]}x{shape[2]}", shape, max(args.studies, 2))
        report["ingest"] = ingest(cluster, root, studies[:2])
        report["end_to_end"] = end_to_end(cluster, root, studies[:args.studies], args.timeout)
    finally:
        cluster.remove()
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return 0


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--shape", type=int, nargs=3, default=[96, 512, 512], metavar=("Z", "Y", "X"))
    sp.add_argument("--studies", type=int, default=12)
    sp.add_argument("--instances", type=int, default=2000, help="note_instance calls for the store overhead")
    sp.add_argument("--jobs", type=int, default=200, help="job cycles for the store overhead")
    sp.add_argument("--timeout", type=float, default=1800.0)
    sp.add_argument("--cache", default="runs/bench")
