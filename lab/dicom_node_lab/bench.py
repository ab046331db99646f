"""Speed measurements. Figures go in the notes, never into timed tests.

  python tools/bench.py process            # 512×512×256 phantom CTA, about 10 lesions
  python tools/bench.py ingest             # node vs Orthanc vs storescp, 256 slices, 1/2/4 associations
  python tools/bench.py latency            # last instance in -> derived series in Orthanc
  python tools/bench.py memory             # peak RSS of `process` on a 512×512×600 series
  python tools/bench.py memory --isolated  # the same as a node job: a child under jobs.memory_mb
  python tools/bench.py load               # 4 concurrent senders × 3 studies of 256 slices
  python tools/bench.py durable-write      # ms per 512 KiB instance made durable, by method
  python tools/bench.py send               # the node's C-STORE sender vs storescu into Orthanc
  python tools/bench.py hosts              # job store SQLite vs PostgreSQL; 1 vs 2 receivers; 12 studies, 2 workers
  python tools/bench.py detect             # the sharpened-image test: one box vs tiles, 128×512×512

process: times `dicom-node process` end to end on a 512×512×256 phantom CTA (written
once as DICOM into --cache), then each stage on its own: read (decode + modality LUT),
detect, plan, infer (with windows/s), resample back, write (derived series + SEG).

ingest: DCMTK storescu sends the 256 slices over 1, 2 and 4 concurrent associations (the
slices dealt round-robin, one storescu each), in turn to DCMTK storescp (no fsync),
Orthanc (Debian's, TCP_NODELAY=1, its default SyncStorageArea: an fsync per write) and
`dicom-node serve` (fsync and atomic rename before each success; one node per
`--receiver-processes` value, default 1 and 2) and a bare pynetdicom receiver
(`dicom_node_lab.bare_scp`: the encoded data set, a new file, rename, fsync, Success: the
ceiling for a node on pynetdicom's public API in one process), in the same run and on the
same disk; reports instances/s, node/Orthanc, bare/Orthanc and 4/1, and the fsync ceiling:
instances/s if one durable write per instance were all there was to do.

latency: a private Orthanc on loopback routes the study to the node (Lua OnStableSeries),
as a hospital's would; reports the time from the node's last received instance to the
derived series and SEG complete in Orthanc, and where it went (quiet timer, processing,
sending). The node runs with the embedded defaults except ports and spool.

memory: peak resident memory of `dicom-node process` on a 512×512×600 series, made by
mirroring the benchmark study along z (so the calcium and anatomy are real phantom).
The float32 HU volume alone is 600 MiB; the engine keeps only that one float copy.
--isolated runs it as the node's workers do, in a child process watched against the default
jobs.memory_mb and jobs.timeout_seconds, and reports the child's peak as the watcher saw it.

load: four DCMTK storescu senders at once, each sending three different 256-slice studies
(copies of the benchmark study with new UIDs) to the node, which processes them and sends
every derived series and SEG to a private Orthanc. Reports whether every derived series
arrived complete, throughput, p50/p95 job latency (last instance received to delivered),
and the node's resident memory: its peak, and after each finished job, so growth with the
number of studies shows.

send: 256 slices into Orthanc (TCP_NODELAY=1, durable) over one association, alternating: DCMTK
storescu, the node's sender as shipped (send.send_dimse), and the same sender with pynetdicom's
defaults (each file decoded and encoded again; the DUL reactor's 1 ms idle sleep). Orthanc's
study is deleted between runs. Reports seconds per run and the medians' ratios.

detect: detection with the sharpened-image test (`sharp_contrast_hu = 150`, recommended with the
subtraction) on the benchmark phantom (128 slices by default), with the image sharpened in one box
around everything above 400 HU (`detect.SHARP_TILE` set past the volume: how it was done before)
and tile by tile (`detect.sharpening_boxes`), alternating, each in a fresh process; and once without
the test. Reports seconds and peak resident memory of each, the ratio, and whether the calcium found
is the same voxel for voxel.

durable-write: what one durable 512 KiB write costs on the --cache disk: a new file with
fsync (what the spool does, with the rename), a new file with fdatasync, and a write into
a preallocated, already-written journal file with fdatasync or O_DSYNC.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dicom_node.config import load
from dicom_node_lab import phantom
from dicom_node_lab.bare_scp import durable_write
from dicom_node_lab.phantom_dicom import write_phantom_series

BENCH_SEED = 4711


def bench_phantom(shape: tuple[int, int, int]) -> phantom.Phantom:
    """The benchmark study's phantom: one seed and one set of settings for every benchmark that renders it."""
    opts = phantom.PhantomOptions(n_vessels=(4, 4), plaques_per_vessel=(2, 3), calcified_probability=0.8,
                                  branch_probability=0.5, lesion_margin_mm=8.0)
    return phantom.generate(shape, seed=BENCH_SEED, options=opts)


def bench_series(cache: Path, shape: tuple[int, int, int]) -> Path:
    """The benchmark study as DICOM, rendered once and reused."""
    folder = cache / f"cta-{shape[0]}x{shape[1]}x{shape[2]}-seed{BENCH_SEED}"
    if (folder / "done").exists():
        return folder
    print(f"rendering a {shape[2]}×{shape[1]}×{shape[0]} phantom CTA (once; cached in {folder}) ...", flush=True)
    p = bench_phantom(shape)
    write_phantom_series(p, folder / "series", patient_id="BENCH-0001", patient_name="Bench^Phantom")
    (folder / "lesions.json").write_text(json.dumps([les.kind for les in p.lesions if les.calcified]))
    (folder / "done").write_text("ok")
    return folder


def bench_process(args: argparse.Namespace) -> int:
    from dicom_node.backends.select import model_id, select
    from dicom_node.pipeline.process import build_engine, process_series
    from dicom_node.pipeline.series import read_ct_series

    shape = tuple(args.shape)
    folder = bench_series(Path(args.cache), shape)
    out = Path(args.cache) / "out"
    cfg = load(args.config)
    cmd = [sys.executable, "-m", "dicom_node.cli", "process", str(folder / "series"), str(out / "e2e"), "--quiet",
           "--backend", "onnxruntime"] + (["--config", args.config] if args.config else [])
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    e2e = time.perf_counter() - t0
    if done.returncode != 0:
        print(done.stdout, done.stderr, file=sys.stderr)
        return 1
    t = time.perf_counter()
    series, _ = read_ct_series([folder / "series"])
    stages: dict[str, float] = {"read": time.perf_counter() - t}
    backend, why = select("onnxruntime", cfg.engine.model, cfg.engine.threads, cfg.engine.batch)
    engine = build_engine(cfg, backend)
    outcome = process_series(series[0], out / "stages", cfg, engine, model_id(cfg.engine.model),
                             pictures_dir=out / "pictures")  # the steps a node job runs, timed by process_series
    stages |= outcome.stages
    report = {"shape_zyx": shape, "lesions_detected": outcome.lesions, "windows": outcome.windows,
              "end_to_end_s": round(e2e, 1), "in_process_s": round(sum(stages.values()), 1),
              "stages_s": {k: round(v, 2) for k, v in stages.items()},
              "windows_per_s": round(outcome.windows / max(stages.get("infer", 0.0), 1e-9), 1),
              "backend": why, "summary_line": done.stdout.strip()}
    print(json.dumps(report, indent=2))
    return 0


def _peers():
    """The integration tests' real-peer helpers (Orthanc, node process, storescu), reused as is."""
    from dicom_node_lab import peers

    return peers


def _epoch(iso: str) -> float:
    """Seconds since the epoch of the node's /jobs timestamps (ISO 8601, UTC, trailing Z)."""
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _study_uid(folder: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)


def _delivered(orthanc, study_uid: str, n: int) -> bool:
    """True when the study in Orthanc holds exactly one complete derived CT series and one SEG."""
    series = orthanc.study_series(study_uid)
    derived = [s for s in series if s["MainDicomTags"].get("Modality") == "CT"
               and "CALCIUM REMOVED" in s["MainDicomTags"].get("SeriesDescription", "")]
    seg = [s for s in series if s["MainDicomTags"].get("Modality") == "SEG"]
    return len(derived) == 1 and len(derived[0]["Instances"]) == n and len(seg) == 1


ASSOCIATIONS = (1, 2, 4)
BARE = "pynetdicom-bare"  # dicom_node_lab.bare_scp: the least a durable pynetdicom receiver can do


def _split(folder: Path, root: Path, k: int) -> list[Path]:
    """The series' files dealt round-robin into ``k`` folders (symbolic links): one per concurrent sender."""
    if k == 1:
        return [folder]
    dirs = [root / f"split-{k}" / str(i) for i in range(k)]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(sorted(folder.glob("*.dcm"))):
        (dirs[i % k] / f.name).symlink_to(f.resolve())
    return dirs


def _concurrent_storescu(peers, port: int, called: str, dirs: list[Path]) -> float:
    """Seconds from starting ``len(dirs)`` storescu processes at once (one association each) to the last one done."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen([peers.need("storescu"), "-aet", "STORESCU", "-aec", called, "127.0.0.1", str(port),
                               "+sd", str(d)], env=peers.NODELAY, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for d in dirs]
    for p in procs:
        _, err = p.communicate(timeout=300)
        if p.returncode != 0:
            raise RuntimeError(f"storescu to {called} failed: {err.decode(errors='replace')[-500:]}")
    return time.perf_counter() - t0


def _fsync_ceiling(root: Path, size: int, writes: int = 100) -> float:
    """Instances/s if a durable write (new file, rename, fsync) of one instance were all there was to do."""
    import os

    data = os.urandom(size)
    t0 = time.perf_counter()
    for i in range(writes):
        durable_write(root, f"c{i}", data)
    rate = writes / (time.perf_counter() - t0)
    for i in range(writes):
        (root / f"c{i}.dcm").unlink()
    return rate


def bench_ingest(args: argparse.Namespace) -> int:
    """1, 2 and 4 concurrent storescu associations into the node, Orthanc (durable: SyncStorageArea, its
    default) and DCMTK storescp (no fsync), alternating, in one run on one disk."""
    import shutil
    import tempfile

    import requests

    peers = _peers()
    folder = bench_series(Path(args.cache), tuple(args.shape)) / "series"
    n = len(list(folder.glob("*.dcm")))
    root = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=Path(args.cache).resolve()))
    scp_port = peers.free_port()
    scp_dir = root / "storescp"
    scp_dir.mkdir()
    scp = subprocess.Popen([peers.need("storescp"), "-aet", "STORESCP", "-od", str(scp_dir), str(scp_port)],
                           env=peers.NODELAY, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    nodes: dict[str, Any] = {}  # one node per node.receiver_processes value, each with its own spool
    received: dict[str, Path] = {}  # where each node's spool keeps the series it receives
    for processes in args.receiver_processes:
        name = "dicom-node" if processes == 1 else f"dicom-node-x{processes}"
        dicom_port, http_port = peers.free_port(), peers.free_port()
        spool = root / f"spool-{name}"
        cfg = peers.write_node_config(root, dicom_port=dicom_port, http_port=http_port, destinations=[],
                                      allowed=[("STORESCU", "127.0.0.1")], quiet=3600, name=name,
                                      spool=spool,
                                      extra={"jobs": ["release_grace_seconds = 0"],  # receive only: no processing
                                             "node": [f"receiver_processes = {processes}"]})
        nodes[name] = peers.NodeProcess(cfg, http_port, dicom_port, root / f"{name}.log").start()
        received[name] = spool / "series"
    # The ceiling for any receiver on pynetdicom's public API: encoded data set, new file, rename, fsync, Success.
    bare_port, bare_dir = peers.free_port(), root / "pynetdicom-bare"
    bare = subprocess.Popen([sys.executable, "-m", "dicom_node_lab.bare_scp", "--port", str(bare_port),
                             "--out", str(bare_dir), "--ae-title", "BARE"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    received[BARE] = bare_dir
    (root / "pacs").mkdir()
    orthanc = peers.Orthanc(root / "pacs", peers.free_port(), peers.free_port(), route=None).start()
    splits = {k: _split(folder, root, k) for k in ASSOCIATIONS}
    targets = {"storescp": (scp_port, "STORESCP"), "orthanc": (orthanc.dicom_port, orthanc.aet),
               BARE: (bare_port, "BARE"), **{name: (node.dicom_port, "DICOMNODE") for name, node in nodes.items()}}
    rates: dict[str, dict[int, list[float]]] = {name: {k: [] for k in ASSOCIATIONS} for name in targets}

    def clear() -> None:
        shutil.rmtree(scp_dir, ignore_errors=True)
        scp_dir.mkdir()
        for study in requests.get(f"{orthanc.url}/studies", timeout=30).json():
            requests.delete(f"{orthanc.url}/studies/{study}", timeout=60)
        for name, spooled_series in received.items():
            if name == BARE:  # the bare receiver keeps writing into its folder: empty it, keep it
                for f in spooled_series.glob("*.dcm"):
                    f.unlink()
            else:
                shutil.rmtree(spooled_series, ignore_errors=True)

    spooled: dict[str, int] = {}
    try:
        time.sleep(1.0)
        for _ in range(args.repeats):
            for k in ASSOCIATIONS:
                for name, (port, aet) in targets.items():
                    clear()
                    rates[name][k].append(n / _concurrent_storescu(peers, port, aet, splits[k]))
                    if name in received:  # every instance of every run on disk, checked before the next clears it
                        spooled[name] = min(spooled.get(name, n), len(list(received[name].rglob("*.dcm"))))
        ceiling = _fsync_ceiling(root, next(folder.glob("*.dcm")).stat().st_size)
    finally:
        for node in nodes.values():
            node.stop()
        orthanc.stop()
        for proc in (scp, bare):
            proc.terminate()
            proc.wait(10)
    med = {name: {k: float(sorted(v)[len(v) // 2]) for k, v in by_k.items()} for name, by_k in rates.items()}
    report = {"instances": n, "instance_bytes": next(folder.glob("*.dcm")).stat().st_size, "repeats": args.repeats,
              "instances_per_s": {name: {k: [round(x, 1) for x in v] for k, v in by_k.items()}
                                  for name, by_k in rates.items()},
              "median_instances_per_s": {name: {k: round(v, 1) for k, v in by_k.items()} for name, by_k in med.items()},
              "node_to_orthanc": {name: {k: round(med[name][k] / med["orthanc"][k], 2) for k in ASSOCIATIONS}
                                  for name in nodes},
              "node_to_storescp": {name: {k: round(med[name][k] / med["storescp"][k], 2) for k in ASSOCIATIONS}
                                   for name in nodes},
              "node_4_to_1": {name: round(med[name][4] / med[name][1], 2) for name in nodes},
              "pynetdicom_bare_to_orthanc": {k: round(med[BARE][k] / med["orthanc"][k], 2) for k in ASSOCIATIONS},
              "pynetdicom_bare_4_to_1": round(med[BARE][4] / med[BARE][1], 2),
              "orthanc_4_to_1": round(med["orthanc"][4] / med["orthanc"][1], 2),
              "fsync_ceiling_instances_per_s": round(ceiling, 1),
              "spooled_fewest": spooled,
              "durability": "node and pynetdicom-bare: atomic rename + fsync per instance; Orthanc: "
                            "SyncStorageArea (default); storescp: none"}
    print(json.dumps(report, indent=2))
    shutil.rmtree(root, ignore_errors=True)
    return 0 if spooled and all(v == n for v in spooled.values()) else 1


def bench_send(args: argparse.Namespace) -> int:
    import shutil
    import statistics
    import tempfile

    import requests

    from dicom_node.config import Destination
    from dicom_node.node import send

    peers = _peers()
    folder = bench_series(Path(args.cache), tuple(args.shape)) / "series"
    files = sorted(folder.glob("*.dcm"))
    root = Path(tempfile.mkdtemp(prefix="bench-send-", dir=Path(args.cache).resolve()))
    orthanc = peers.Orthanc(root, peers.free_port(), peers.free_port(), None).start()
    dest = Destination(name="pacs", kind="dimse", host="127.0.0.1", port=orthanc.dicom_port, ae_title=orthanc.aet)
    shipped = (send.SEND_AS_STORED, send.SEND_POLL_SECONDS)
    gate = send.gate_reactor
    # node_ungated: the shipped sender with pynetdicom's own reactor checkpoint (what the gate costs)
    times: dict[str, list[float]] = {"storescu": [], "node": [], "node_ungated": [], "node_pynetdicom_defaults": []}
    try:
        for _ in range(args.repeats):
            for name in times:
                for study in requests.get(f"{orthanc.url}/studies", timeout=10).json():
                    requests.delete(f"{orthanc.url}/studies/{study}", timeout=30)
                t0 = time.perf_counter()
                if name == "storescu":
                    peers.storescu(("127.0.0.1", orthanc.dicom_port), orthanc.aet, folder)
                else:
                    send.SEND_AS_STORED, send.SEND_POLL_SECONDS = \
                        (False, 0.001) if name == "node_pynetdicom_defaults" else shipped
                    send.gate_reactor = (lambda event: None) if name == "node_ungated" else gate
                    send.send_dimse(files, dest, "DICOMNODE")
                times[name].append(round(time.perf_counter() - t0, 2))
    finally:
        send.SEND_AS_STORED, send.SEND_POLL_SECONDS = shipped
        send.gate_reactor = gate
        orthanc.stop()
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"instances": len(files), "seconds": times, "median_s": med,
                      "node_over_storescu": round(med["node"] / med["storescu"], 2),
                      "node_over_node_ungated": round(med["node"] / med["node_ungated"], 2),
                      "node_over_pynetdicom_defaults": round(med["node"] / med["node_pynetdicom_defaults"], 2)},
                     indent=2))
    return 0


def bench_durable_write(args: argparse.Namespace) -> int:
    import os
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="bench-fsync-", dir=Path(args.cache).resolve()))
    data = os.urandom(525_702)  # one 512×512 CT slice as the bench series stores it
    n = args.writes

    journal = root / "journal"
    fd_j = os.open(journal, os.O_RDWR | os.O_CREAT, 0o644)
    os.pwrite(fd_j, bytes(n * len(data)), 0)  # written once: later writes change no metadata
    os.fsync(fd_j)
    fd_dsync = os.open(journal, os.O_RDWR | os.O_DSYNC)

    def journal_fdatasync(i: int) -> None:
        os.pwrite(fd_j, data, i * len(data))
        os.fdatasync(fd_j)

    methods = {"new file, rename, fsync (the spool)": lambda i: durable_write(root, str(i), data),
               "new file, rename, fdatasync": lambda i: durable_write(root, str(i), data, os.fdatasync),
               "preallocated journal, pwrite + fdatasync": journal_fdatasync,
               "preallocated journal, O_DSYNC pwrite": lambda i: os.pwrite(fd_dsync, data, i * len(data))}
    report = {}
    try:
        for name, write in methods.items():
            t0 = time.perf_counter()
            for i in range(n):
                write(i)
            report[name] = round(1000 * (time.perf_counter() - t0) / n, 3)
    finally:
        os.close(fd_j)
        os.close(fd_dsync)
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"bytes": len(data), "writes": n, "ms_per_write": report}, indent=2))
    return 0


def bench_latency(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    import requests

    peers = _peers()
    folder = bench_series(Path(args.cache), tuple(args.shape)) / "series"
    n = len(list(folder.glob("*.dcm")))
    root = Path(tempfile.mkdtemp(prefix="bench-latency-", dir=Path(args.cache).resolve()))
    dicom_port, http_port = peers.free_port(), peers.free_port()
    (root / "pacs").mkdir()
    orthanc = peers.Orthanc(root / "pacs", dicom_port, http_port, "dimse")
    cfg = peers.write_node_config(root, dicom_port=dicom_port, http_port=http_port,
                                  destinations=[{"name": "pacs", "kind": "dimse", "host": "127.0.0.1",
                                                 "port": orthanc.dicom_port, "ae_title": orthanc.aet,
                                                 "associations": args.send_associations}],
                                  allowed=[("ORTHANC", "127.0.0.1")], quiet=args.quiet)
    node = peers.NodeProcess(cfg, http_port, dicom_port, root / "node.log").start()
    orthanc.start()
    study_uid = _study_uid(folder)
    try:
        t_send = time.time()
        peers.storescu(("127.0.0.1", orthanc.dicom_port), orthanc.aet, folder)
        t_in_pacs = time.time()

        deadline = time.time() + args.timeout
        got = False
        while not got and time.time() < deadline:
            got = _delivered(orthanc, study_uid, n)
            time.sleep(0.2)
        t_done = time.time()
        jobs = requests.get(f"{node.url}/jobs", timeout=5).json()
    finally:
        node.stop()
        orthanc.stop()
    if not got:
        print(f"derived series did not arrive within {args.timeout} s; node log: {root / 'node.log'}", file=sys.stderr)
        return 1
    job = next(j for j in jobs if j.get("state") == "done")
    t_last = _epoch(job["last_instance_at"])
    report = {"instances": n, "quiet_seconds": args.quiet, "orthanc_stable_age_s": 2,
              "send_associations": args.send_associations,
              "storescu_to_orthanc_s": round(t_in_pacs - t_send, 1),
              "orthanc_to_node_first_instance_s": round(_epoch(job["received_at"]) - t_in_pacs, 1),
              "node_receive_s": round(t_last - _epoch(job["received_at"]), 1),
              "latency_last_instance_to_derived_in_orthanc_s": round(t_done - t_last, 1),
              "stages_s": {"completion": round(_epoch(job["queued_at"]) - t_last, 1),
                           "queue_wait": round(_epoch(job["processing_at"]) - _epoch(job["queued_at"]), 1),
                           "processing": round(_epoch(job["sending_at"]) - _epoch(job["processing_at"]), 1),
                           "sending": round(_epoch(job["finished_at"]) - _epoch(job["sending_at"]), 1),
                           "orthanc_indexed_after_send": round(t_done - _epoch(job["finished_at"]), 1)},
              "processing_steps_s": {k: round(v, 2) for k, v in (job.get("timings") or {}).items()}}
    print(json.dumps(report, indent=2, default=str))
    shutil.rmtree(root, ignore_errors=True)
    return 0


def tall_series(cache: Path, base_shape: tuple[int, int, int], slices: int) -> Path:
    """The benchmark study mirrored along z to ``slices`` slices, written once."""
    import numpy as np

    from dicom_node.pipeline.series import load_hu, read_ct_series
    from dicom_node_lab.phantom_dicom import ct_series

    base = bench_series(cache, base_shape)
    folder = cache / f"cta-{slices}x{base_shape[1]}x{base_shape[2]}-mirrored-seed{BENCH_SEED}"
    if (folder / "done").exists():
        return folder
    series, _ = read_ct_series([base / "series"])
    vol = load_hu(series[0])
    reps = [vol if i % 2 == 0 else vol[::-1] for i in range(-(-slices // len(vol)))]
    tall = np.concatenate(reps)[:slices]
    del reps, vol
    (folder / "series").mkdir(parents=True, exist_ok=True)
    for ds in ct_series(tall, series[0].spacing, patient_id="BENCH-0002", patient_name="Bench^Tall"):
        ds.save_as(folder / "series" / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    (folder / "done").write_text("ok")
    return folder


def bench_memory(args: argparse.Namespace) -> int:
    import resource
    import shutil

    folder = tall_series(Path(args.cache), (256, 512, 512), args.slices)
    out = Path(args.cache) / "out" / "memory"
    shutil.rmtree(out, ignore_errors=True)
    if args.isolated:
        return _memory_isolated(folder, out, args.slices, args.config)
    cmd = [sys.executable, "-m", "dicom_node.cli", "process", str(folder / "series"), str(out), "--quiet",
           "--backend", "onnxruntime"] + (["--config", args.config] if args.config else [])
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        print(done.stdout, done.stderr, file=sys.stderr)
        return 1
    # the largest resident set of any waited-for child: the process run is the only big one
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    volume_bytes = args.slices * 512 * 512 * 4
    print(json.dumps({"slices": args.slices, "peak_rss_gib": round(peak / 2**30, 2),
                      "float32_volume_gib": round(volume_bytes / 2**30, 2),
                      "peak_over_volume": round(peak / volume_bytes, 2), "seconds": round(seconds, 1),
                      "summary_line": done.stdout.strip()}, indent=2))
    return 0


def _memory_isolated(folder: Path, out: Path, slices: int, config: str | None = None) -> int:
    """The same series as one node job: a child process under the node's default jobs.memory_mb and
    jobs.timeout_seconds (or ``config``'s), watched as the worker watches it (does the limit fit this series?)."""
    import dataclasses
    import threading

    from dicom_node.backends.select import model_id
    from dicom_node.node.isolate import ChildDiedError, ChildRequest, run_child

    cfg = load(config)  # the embedded defaults where no file is given
    out.mkdir(parents=True, exist_ok=True)
    request = ChildRequest(0, "bench", str(folder / "series"), str(out), "onnxruntime", model_id(cfg.engine.model),
                           dataclasses.asdict(cfg))
    t0 = time.perf_counter()
    try:
        result = run_child(request, out / "job", cfg.jobs.memory_mb, cfg.jobs.timeout_seconds, threading.Event())
    except ChildDiedError as exc:
        print(json.dumps({"slices": slices, "killed": str(exc)}, indent=2))
        return 1
    print(json.dumps({"slices": slices, "status": result["status"], "child_peak_rss_mb": result["peak_mb"],
                      "limit_mb": cfg.jobs.memory_mb, "seconds": round(time.perf_counter() - t0, 1),
                      "limit_seconds": cfg.jobs.timeout_seconds}, indent=2))
    return 0


def study_copies(cache: Path, base_shape: tuple[int, int, int], n: int) -> list[Path]:
    """``n`` copies of the benchmark study, each with its own patient, study, series and SOP UIDs."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    base = bench_series(cache, base_shape) / "series"
    out = []
    for i in range(n):
        folder = cache / "load" / f"study{i:02d}" / "series"
        out.append(folder)
        if (folder.parent / "done").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        study, series, frame = generate_uid(), generate_uid(), generate_uid()
        for f in sorted(base.glob("*.dcm")):
            ds = dcmread(f)
            sop = generate_uid()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
            ds.PatientID, ds.PatientName = f"LOAD-{i:02d}", f"Load^{i:02d}"
            ds.save_as(folder / f"{sop}.dcm", enforce_file_format=True)
        (folder.parent / "done").write_text("ok")
    return out


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def bench_load(args: argparse.Namespace) -> int:
    import shutil
    import statistics
    import tempfile
    import threading

    import requests

    peers = _peers()
    studies = study_copies(Path(args.cache).resolve(), (256, 512, 512), args.senders * args.studies)
    n = len(list(studies[0].glob("*.dcm")))
    root = Path(tempfile.mkdtemp(prefix="bench-load-", dir=Path(args.cache).resolve()))
    dicom_port, http_port = peers.free_port(), peers.free_port()
    (root / "pacs").mkdir()
    orthanc = peers.Orthanc(root / "pacs", dicom_port, http_port, "dimse")  # routes only ORIGINAL CT
    cfg = peers.write_node_config(root, dicom_port=dicom_port, http_port=http_port,
                                  destinations=[{"name": "pacs", "kind": "dimse", "host": "127.0.0.1",
                                                 "port": orthanc.dicom_port, "ae_title": orthanc.aet}],
                                  allowed=[("STORESCU", "127.0.0.1")], quiet=args.quiet)
    orthanc.start()
    node = peers.NodeProcess(cfg, http_port, dicom_port, root / "node.log").start()
    pid = node.proc.pid
    rss_after_job: list[tuple[int, int]] = []
    errors: list[str] = []

    def sender(k: int) -> None:
        for folder in studies[k * args.studies:(k + 1) * args.studies]:
            try:
                peers.storescu(("127.0.0.1", dicom_port), "DICOMNODE", folder)
            except BaseException as exc:  # noqa: BLE001 - reported, not raised, from a thread
                errors.append(f"sender {k}: {exc}")

    t0 = time.time()
    threads = [threading.Thread(target=sender, args=(k,)) for k in range(args.senders)]
    for t in threads:
        t.start()
    done: list[dict] = []
    try:
        deadline = t0 + args.timeout
        while time.time() < deadline:
            jobs = requests.get(f"{node.url}/jobs", timeout=10).json()
            finished = [j for j in jobs if j["state"] in ("done", "failed")]
            if len(finished) > len(done):
                rss_after_job.append((len(finished), _rss_kib(pid, "VmRSS")))
                done = finished
            if len(done) >= len(studies) and not any(t.is_alive() for t in threads):
                break
            time.sleep(1.0)
        t_end = time.time()
        peak_kib = _rss_kib(pid, "VmHWM")
        for t in threads:
            t.join()
        delivered = sum(_delivered(orthanc, _study_uid(folder), n) for folder in studies)
    finally:
        node.stop()
        orthanc.stop()
    latencies = sorted(_epoch(j["finished_at"]) - _epoch(j["last_instance_at"]) for j in done if j["state"] == "done")
    p95 = latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))] if latencies else None
    report = {"senders": args.senders, "studies_per_sender": args.studies, "instances_per_study": n,
              "quiet_seconds": args.quiet, "jobs_done": sum(j["state"] == "done" for j in done),
              "jobs_failed": sum(j["state"] == "failed" for j in done),
              "failure_reasons": sorted({j["reason"] for j in done if j["state"] == "failed"}),
              "derived_series_complete_in_orthanc": f"{delivered} of {len(studies)}", "sender_errors": errors,
              "wall_s": round(t_end - t0, 1),
              "throughput_studies_per_min": round(60 * len(done) / max(t_end - t0, 1e-9), 2),
              "throughput_instances_per_s": round(len(studies) * n / max(t_end - t0, 1e-9), 1),
              "job_latency_s": {"p50": round(statistics.median(latencies), 1) if latencies else None,
                                "p95": round(p95, 1) if p95 is not None else None},
              "node_peak_rss_gib": round(peak_kib / 2**20, 2),
              "node_rss_gib_after_jobs": [(k, round(v / 2**20, 2)) for k, v in rss_after_job]}
    print(json.dumps(report, indent=2))
    ok = delivered == len(studies) and not errors
    if ok:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"kept for inspection: {root}", file=sys.stderr)
    return 0 if ok else 1


DETECT_MODES = {"one box": 10**9, "tiles": None, "without the test": None}


def _detect_once(path: str, spacing: tuple[float, float, float], mode: str, out: str) -> dict[str, float]:
    """One detection of the cached volume in this (fresh) process: seconds, peak RSS; the calcium to ``out``."""
    import resource

    import numpy as np

    from dicom_node.pipeline import detect as detect_module

    volume = np.load(path)
    if DETECT_MODES[mode] is not None:
        detect_module.SHARP_TILE = DETECT_MODES[mode]
    options = detect_module.DetectOptions(sharp_contrast_hu=0.0 if mode == "without the test" else 150.0)
    t0 = time.perf_counter()
    found = detect_module.detect(volume, spacing, options)
    seconds = time.perf_counter() - t0
    np.save(out, found.calcium)
    return {"seconds": seconds, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "lesions": len(found.lesions), "calcium_voxels": int(found.calcium.sum())}


def bench_detect(args: argparse.Namespace) -> int:
    import multiprocessing

    import numpy as np

    shape = tuple(args.shape)
    cache = Path(args.cache) / f"volume-{shape[0]}x{shape[1]}x{shape[2]}-seed{BENCH_SEED}"
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / "hu.npy"
    if not (cache / "spacing.json").exists():
        print(f"rendering a {shape[2]}×{shape[1]}×{shape[0]} phantom CTA (once; cached in {cache}) ...", flush=True)
        p = bench_phantom(shape)
        np.save(path, p.image.astype(np.float32))
        (cache / "spacing.json").write_text(json.dumps([float(s) for s in p.spacing]))
    spacing = tuple(json.loads((cache / "spacing.json").read_text()))
    ctx = multiprocessing.get_context("spawn")
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in DETECT_MODES}
    order = [m for _ in range(args.repeats) for m in ("one box", "tiles")] + ["without the test"]
    for mode in order:
        with ctx.Pool(1) as pool:  # a fresh process each: its own peak memory
            runs[mode].append(pool.apply(_detect_once, (str(path), spacing, mode, str(cache / f"{mode}.npy"))))
        print(mode, json.dumps({k: round(v, 2) for k, v in runs[mode][-1].items()}), flush=True)
    same = np.array_equal(np.load(cache / "one box.npy"), np.load(cache / "tiles.npy"))

    def median(mode: str, key: str) -> float:
        return float(np.median([r[key] for r in runs[mode]]))

    report = {"shape_zyx": shape, "repeats": args.repeats,
              **{mode: {"seconds": round(median(mode, "seconds"), 1), "peak_gib": round(median(mode, "peak_gib"), 2)}
                 for mode in DETECT_MODES},
              "one box / tiles": round(median("one box", "seconds") / median("tiles", "seconds"), 1),
              "same calcium": same, "lesions": runs["tiles"][0]["lesions"]}
    print(json.dumps(report, indent=2))
    return 0 if same else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("process", help="time dicom-node process on a 512×512×256 phantom CTA")
    pr.add_argument("--shape", type=int, nargs=3, default=[256, 512, 512], metavar=("Z", "Y", "X"))
    pr.add_argument("--cache", default="runs/bench")
    pr.add_argument("--config", default=None)
    for name, text in (("ingest", "C-STORE ingest: dicom-node vs DCMTK storescp, same run"),
                       ("latency", "last instance received -> derived series and SEG stored in Orthanc")):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("--shape", type=int, nargs=3, default=[256, 512, 512], metavar=("Z", "Y", "X"))
        sp.add_argument("--cache", default="runs/bench")
        if name == "ingest":
            sp.add_argument("--repeats", type=int, default=3)
            sp.add_argument("--receiver-processes", type=int, nargs="+", default=[1, 2],
                            help="a node for each node.receiver_processes value, in the same run (default: 1 2)")
        else:
            sp.add_argument("--quiet", type=float, default=15.0, help="the node's quiet time (default: the default)")
            sp.add_argument("--timeout", type=float, default=600.0)
        if name == "latency":
            sp.add_argument("--send-associations", type=int, default=1,
                            help="the Orthanc destination's associations setting (default: the default, 1)")
    mem = sub.add_parser("memory", help="peak RSS of process on a 512×512×600 series")
    mem.add_argument("--slices", type=int, default=600)
    mem.add_argument("--cache", default="runs/bench")
    mem.add_argument("--isolated", action="store_true", help="as a node job: a child under the default limits")
    mem.add_argument("--config", default=None, help="a node config.toml (default: the embedded defaults)")
    ld = sub.add_parser("load", help="4 concurrent senders × 3 studies of 256 slices, through to Orthanc")
    ld.add_argument("--senders", type=int, default=4)
    ld.add_argument("--studies", type=int, default=3, help="studies per sender")
    ld.add_argument("--quiet", type=float, default=15.0, help="the node's quiet time (default: the default)")
    ld.add_argument("--timeout", type=float, default=1500.0)
    ld.add_argument("--cache", default="runs/bench")
    se = sub.add_parser("send", help="the node's C-STORE sender vs storescu into Orthanc, one association")
    se.add_argument("--shape", type=int, nargs=3, default=[256, 512, 512], metavar=("Z", "Y", "X"))
    se.add_argument("--cache", default="runs/bench")
    se.add_argument("--repeats", type=int, default=5)
    dw = sub.add_parser("durable-write", help="ms per durable 512 KiB write, by method, on the --cache disk")
    dw.add_argument("--writes", type=int, default=200)
    dw.add_argument("--cache", default="runs/bench")
    de = sub.add_parser("detect", help="the sharpened-image test: one box vs tiles (seconds, peak memory)")
    de.add_argument("--shape", type=int, nargs=3, default=[128, 512, 512], metavar=("Z", "Y", "X"))
    de.add_argument("--cache", default="runs/bench")
    de.add_argument("--repeats", type=int, default=1)
    from dicom_node_lab import bench_hosts

    hosts = sub.add_parser("hosts", help="several hosts: job store overhead, 1 vs 2 receivers, studies end to end "
                                         "through a receiver and two workers (PostgreSQL)")
    bench_hosts.add_arguments(hosts)
    args = ap.parse_args(argv)
    modes = {"process": bench_process, "ingest": bench_ingest, "latency": bench_latency, "memory": bench_memory,
             "load": bench_load, "durable-write": bench_durable_write, "send": bench_send,
             "hosts": bench_hosts.bench_hosts, "detect": bench_detect}
    return modes[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
