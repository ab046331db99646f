"""Workers: claim a job, run the offline pipeline on its spooled series, deliver the outputs.

The pipeline is ``process.process_series`` itself, so the node produces exactly what
``dicom-node process`` does. A semaphore bounds how many jobs run the model at once
(each holds a whole series in memory); sending does not need a slot, so deliveries go
on while a long series is being processed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from ..config import Config
from ..dicom.series import read_ct_series
from ..infer import Engine
from ..process import SeriesOutcome, process_series
from .assemble import purge_job_files
from .jobs import Job, JobStore
from .logs import ctx
from .metrics import Metrics
from .send import SendError, deliver
from .spool import Spool

log = logging.getLogger("dicom_node.node.worker")


def input_fingerprint(files: list[Path], model_id: str, cfg: Config) -> str:
    """What a job's result depends on: the instances' data sets (not their file meta, which names
    whoever sent them), the model and the engine/output settings."""
    h = hashlib.sha256()
    h.update(model_id.encode())
    h.update(repr((cfg.engine, cfg.output)).encode())
    for f in sorted(files, key=lambda p: p.name):
        data = f.read_bytes()
        start = 0
        if data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00":
            # (0002,0000) UL group length, explicit VR: tag(4) VR(2) length(2) value(4)
            start = 132 + 12 + int.from_bytes(data[140:144], "little")
        h.update(f.name.encode())
        h.update(hashlib.sha256(data[start:]).digest())
    return h.hexdigest()


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class Workers:
    def __init__(self, cfg: Config, spool: Spool, store: JobStore, metrics: Metrics, engine: Engine,
                 model_id: str, wake: threading.Event) -> None:
        self.cfg = cfg
        self.spool = spool
        self.store = store
        self.metrics = metrics
        self.engine = engine
        self.model_id = model_id
        self.wake = wake
        self.slots = threading.Semaphore(cfg.jobs.inference_slots)
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(self.cfg.jobs.workers):
            t = threading.Thread(target=self._loop, name=f"worker-{i}", daemon=True)
            t.start()
            self.threads.append(t)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Finish the job in hand; anything unfinished resumes at the next start (see JobStore.recover)."""
        self.stop.set()
        self.wake.set()
        for t in self.threads:
            t.join(timeout)

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                busy = self.run_one()
            except Exception:  # noqa: BLE001 - a worker thread must outlive any single job
                log.exception("worker error", **ctx())
                busy = False
            if not busy:
                self.wake.wait(0.5)
                self.wake.clear()

    def run_one(self) -> bool:
        """Claim and handle one job; False when there was nothing to do."""
        job = self.store.claim()
        if job is None:
            return False
        if job.state == "processing":
            self.process(job)
        else:
            self.send(job)
        return True

    # -- processing --------------------------------------------------------------------
    def process(self, job: Job) -> None:
        t0 = time.perf_counter()
        log.info("processing %d instances", job.instances, **ctx(job.id, job.series_uid))
        out_dir = self.spool.out_dir(job.id)
        try:
            with self.slots:
                series_list, notes = read_ct_series([self.spool.series_dir(job.series_uid)])
                if not series_list:
                    reason = "nothing to process: " + ("; ".join(notes) or "no instances in the spool")
                    self.store.finish(job.id, "done", reason)
                    log.info(reason, **ctx(job.id, job.series_uid))
                    return
                fingerprint = input_fingerprint(series_list[0].files, self.model_id, self.cfg)
                self.store.set_fingerprint(job.id, fingerprint)
                twin = self.store.delivered_twin(job.id, job.series_uid, fingerprint)
                if twin is not None and twin.deliveries_cover([d.name for d in self.cfg.destinations]):
                    reason = (f"duplicate of job {twin.id}: identical instances and model, already processed and "
                              "delivered; nothing sent again")
                    self.store.finish(job.id, "done", reason, derived_series_uid=twin.derived_series_uid)
                    log.info(reason, **ctx(job.id, job.series_uid))
                    return
                shutil.rmtree(out_dir, ignore_errors=True)  # a requeued job starts clean
                outcome = process_series(series_list[0], out_dir, self.cfg, self.engine, self.model_id,
                                         self.cfg.output.write_seg)
        except Exception as exc:  # noqa: BLE001 - the reason goes into the job, the node goes on
            log.exception("processing failed", **ctx(job.id, job.series_uid))
            self.store.finish(job.id, "failed", f"processing failed: {exc.__class__.__name__}: {exc}")
            return
        finally:
            self.metrics.stage.labels("processing").observe(time.perf_counter() - t0)
        self._after_processing(job, outcome)

    def _after_processing(self, job: Job, outcome: SeriesOutcome) -> None:
        if outcome.status == "skipped":
            self.store.finish(job.id, "done", f"skipped: {outcome.reason}")
            log.info("skipped: %s", outcome.reason, **ctx(job.id, job.series_uid))
            return
        if outcome.status != "done":
            self.store.finish(job.id, "failed", f"processing failed: {outcome.reason}")
            log.error("processing failed: %s", outcome.reason, **ctx(job.id, job.series_uid))
            return
        summary = (f"{outcome.lesions} lesions, {outcome.windows} windows, {outcome.voxels_changed} voxels "
                   f"changed, {len(outcome.outputs)} files in {outcome.seconds:.1f} s")
        log.info("processed: %s", summary, **ctx(job.id, job.series_uid, derived=outcome.derived_series_uid))
        outputs = [str(p) for p in outcome.outputs]
        if not self.cfg.destinations:
            self.store.finish(job.id, "done", f"processed ({summary}); no destinations configured, outputs kept "
                              "in the spool", outputs=json.dumps(outputs),
                              derived_series_uid=outcome.derived_series_uid)
            return
        self.store.to_sending(job.id, outputs, outcome.derived_series_uid, f"processed ({summary}); sending")
        self.wake.set()

    # -- sending -----------------------------------------------------------------------
    def send(self, job: Job) -> None:
        t0 = time.perf_counter()
        files = [Path(p) for p in job.outputs]
        missing = [f for f in files if not f.is_file()]
        if missing:
            self.store.finish(job.id, "failed", f"outputs missing from the spool: {missing[0]}")
            return
        deliveries: dict[str, dict[str, Any]] = dict(job.deliveries)
        errors: list[str] = []
        for dest in self.cfg.destinations:
            if deliveries.get(dest.name, {}).get("state") == "done":
                continue  # delivered before a retry or a restart: never sent twice
            try:
                n = deliver(files, dest, self.cfg.node.ae_title, self.cfg.node.max_pdu, job.id, job.series_uid)
                deliveries[dest.name] = {"state": "done", "instances": n, "at": _now_iso()}
            except SendError as exc:
                self.metrics.send_failures.labels(dest.name).inc()
                deliveries[dest.name] = {"state": "failed", "error": str(exc), "at": _now_iso()}
                errors.append(str(exc))
                log.warning("delivery failed: %s", exc, **ctx(job.id, job.series_uid, destination=dest.name))
            self.store.set_deliveries(job.id, deliveries)
        self.metrics.stage.labels("sending").observe(time.perf_counter() - t0)
        if not errors:
            names = ", ".join(d.name for d in self.cfg.destinations)
            self.store.finish(job.id, "done", f"delivered to {names}")
            if job.last_instance_at:
                self.metrics.stage.labels("total").observe(time.time() - job.last_instance_at)
            log.info("done: delivered to %s", names, **ctx(job.id, job.series_uid))
            if self.cfg.spool.purge_after_delivery:
                purge_job_files(self.spool, self.store, job.id, job.series_uid)
            return
        attempts = job.attempts + 1
        jc = self.cfg.jobs
        if attempts > jc.retries:
            reason = f"delivery failed after {attempts} attempts: {'; '.join(errors)}"
            self.store.finish(job.id, "failed", reason)
            log.error(reason, **ctx(job.id, job.series_uid))
            return
        delay = min(jc.backoff_max_seconds, jc.backoff_seconds * 2 ** (attempts - 1))
        self.store.retry_later(job.id, attempts, time.time() + delay,
                               f"delivery attempt {attempts} failed, retry in {delay:.0f} s: {'; '.join(errors)}")

