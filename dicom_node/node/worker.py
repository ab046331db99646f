"""Workers: claim a job, run the offline pipeline on its spooled series, deliver the outputs.

The pipeline is ``process.process_series`` itself, so the node produces exactly what
``dicom-node process`` does, run in a child process under memory and time limits
(``isolate.py``): a series that crashes or exhausts its run fails alone, after
``jobs.max_crashes`` runs, and never takes the node down. A semaphore bounds how many
jobs run the model at once (each holds a whole series in memory); sending does not
need a slot, so deliveries go on while a long series is being processed. A watcher
replaces a worker thread that died and hands its job back, so no job stays in
``processing`` without a live owner.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import hashlib
import itertools
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from dicom_node.config import Config
from dicom_node.node.intake import dataset_offset
from dicom_node.node.isolate import (
    ChildDiedError,
    ChildRequest,
    PrepareRequest,
    StoppedError,
    WarmChild,
    run_child,
)
from dicom_node.node.jobs import Job, JobStore
from dicom_node.node.logs import ctx
from dicom_node.node.metrics import Metrics
from dicom_node.node.retention import purge_job_files
from dicom_node.node.send import SendError, deliver
from dicom_node.node.spool import HOST, Spool, SpoolFullError
from dicom_node.pipeline.process import SeriesOutcome, timed

log = logging.getLogger("dicom_node.node.worker")
REAP_EVERY_S = 5  # how often the watcher looks for claims whose lease ran out
WORKER_ID = f"{HOST}:{os.getpid()}"  # who holds a claim, as /jobs shows it
LEDGER_BATCH = 16  # send-ledger rows written per transaction while a series goes out


class SendLedger:
    """Collects each instance's answer while a series goes out and writes them to the job store in small
    batches, so that a worker killed mid-send leaves a record of what it had sent."""

    def __init__(self, store: JobStore, job: Job, destination: str) -> None:
        self.store, self.job, self.destination = store, job, destination
        self.rows: list[tuple[str, int]] = []

    def add(self, sop_uid: str, status: int) -> None:
        self.rows.append((sop_uid, status))
        if len(self.rows) >= LEDGER_BATCH:
            self.flush()

    def flush(self) -> None:
        rows, self.rows = self.rows, []
        try:
            self.store.record_sends(self.job.id, self.destination, self.job.lease_epoch, rows)
        except Exception:  # noqa: BLE001 - the ledger is a record; delivery itself must not fail on it
            log.warning("could not record %d sends in the ledger", len(rows), exc_info=True,
                        **ctx(self.job.id, self.job.series_uid))


def input_fingerprint(files: list[Path], model_id: str, cfg: Config) -> str:
    """What a job's result depends on: the instances' data sets (not their file meta, which names
    whoever sent them), the model and the engine/output settings."""
    h = hashlib.sha256()
    h.update(model_id.encode())
    h.update(repr((cfg.engine, cfg.output)).encode())
    for f in sorted(files, key=lambda p: p.name):
        data = f.read_bytes()
        h.update(f.name.encode())
        h.update(hashlib.sha256(data[dataset_offset(data):]).digest())
    return h.hexdigest()


def disk_full(exc: BaseException) -> bool:
    """True when an error (or one it came from) says the disk or the job database has no room left."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, SpoolFullError) or (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)):
            return True
        if isinstance(e, sqlite3.Error) and (getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
                                             or "disk is full" in str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


MAX_WARM_DEATHS = 3


class Workers:
    def __init__(self, cfg: Config, spool: Spool, store: JobStore, metrics: Metrics, backend: str,
                 model_id: str, wake: threading.Event) -> None:
        self.cfg = cfg
        self.spool = spool
        self.store = store
        self.metrics = metrics
        self.backend = backend  # the backend the node selected at start; each job's child builds its own
        self.model_id = model_id
        self.wake = wake
        self.slots = threading.Semaphore(cfg.jobs.inference_slots)
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.holding: dict[str, Job] = {}  # thread name -> the job it claimed and has not let go of
        self._watcher: threading.Thread | None = None
        self._started = 0
        self._warm: dict[str, WarmChild] = {}  # thread name -> its next processing child (jobs.warm_child)
        self._warm_lock = threading.Lock()
        self._warm_died = 0  # warm children found dead before their job, in a row
        self._warm_off = False  # after MAX_WARM_DEATHS of them: cold children only, no restart loop
        self._prepared = itertools.count(1)  # preparation requests so far (names their files)

    def start(self) -> None:
        for _ in range(self.cfg.jobs.workers):
            self.threads.append(self._spawn())
        self._watcher = threading.Thread(target=self._watch, name="worker-watch", daemon=True)
        self._watcher.start()

    def _spawn(self) -> threading.Thread:
        t = threading.Thread(target=self._loop, name=f"worker-{self._started}", daemon=True)
        self._started += 1
        t.start()
        return t

    def _watch(self) -> None:
        """Once a second: a worker thread that died is replaced, and the job it held goes back in line;
        every few seconds, claims whose lease ran out (a worker elsewhere died) go back in line too."""
        ticks = 0
        while not self.stop.wait(1.0):
            ticks += 1
            if ticks % REAP_EVERY_S == 0:
                self._reap()
            for i, t in enumerate(list(self.threads)):
                if t.is_alive() or self.stop.is_set():
                    continue
                job = self.holding.pop(t.name, None)
                log.error("worker thread %s died%s; replaced", t.name,
                          f" holding job {job.id}" if job else "", **ctx(job.id if job else None,
                                                                         job.series_uid if job else None))
                self.metrics.worker_deaths.inc()
                if job is not None:
                    self._release(job, "the worker thread handling it died")
                self.threads[i] = self._spawn()

    def _reap(self) -> None:
        try:
            for job in self.store.reap_orphans() + self.store.reap_expired():
                log.warning("%s", job.reason, **ctx(job.id, job.series_uid))
        except Exception:  # noqa: BLE001 - the store unreachable: the next round tries again
            log.warning("could not look for expired leases", exc_info=True, **ctx())

    def _release(self, job: Job, why: str) -> None:
        """A claimed job whose owner is gone: processing counts as a run that never finished."""
        try:
            if job.state == "processing":
                self._crashed(job, why)
            else:
                self.store.hand_back(job.id, "sending", time.time(), f"waiting: {why}; delivery resumes",
                                     epoch=job.lease_epoch)
        except Exception:  # noqa: BLE001 - the database itself failing: recover() puts it back at the next start
            log.exception("could not hand back job %d", job.id, **ctx(job.id, job.series_uid))

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the job in hand (a processing child is stopped, its job handed back uncounted); anything
        unfinished resumes at the next start (see JobStore.recover)."""
        self.stop.set()
        self.wake.set()
        for t in self.threads:
            t.join(timeout)
        if self._watcher is not None:
            self._watcher.join(timeout)
        with self._warm_lock:
            warm, self._warm = list(self._warm.values()), {}
        for child in warm:
            child.discard()

    def _keep_warm(self) -> None:
        """This worker thread's next processing child, started now if it has none (or it died): it imports
        while the worker waits or sends. Started by the thread itself, so it dies with it (PDEATHSIG)."""
        if not self.cfg.jobs.warm_child or self._warm_off or self.stop.is_set():
            return
        name = threading.current_thread().name
        with self._warm_lock:
            child = self._warm.get(name)
        if child is not None and child.alive():
            return
        if child is not None:  # it died before it had a job: something is wrong with starting one
            child.discard()
            with self._warm_lock:
                self._warm.pop(name, None)
                if not child.prepared_for:  # one killed for a limit while preparing says nothing about starting
                    self._warm_died += 1
                if self._warm_died >= MAX_WARM_DEATHS:
                    log.warning("%d warm processing children died before their job; jobs start cold children "
                                "from now on", self._warm_died, **ctx())
                    self._warm_off = True
        if self._warm_off:
            return
        try:
            child = WarmChild(self.spool.tmp_path(f"warm-{name}.stderr"))
        except OSError:  # no room or no process: the job starts a cold child as before
            log.warning("could not start a warm processing child", exc_info=True, **ctx())
            return
        with self._warm_lock:
            self._warm[name] = child

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                self._keep_warm()
                busy = self.run_one()
            except Exception:  # noqa: BLE001 - a worker thread must outlive any single job
                log.exception("worker error", **ctx())
                busy = False
            if not busy:
                self.wake.wait(0.5)
                self.wake.clear()

    def run_one(self) -> bool:
        """Claim and handle one job; False when there was nothing to do.

        The claim's lease is renewed every quarter lease while the job is in hand; every transition
        the worker makes carries the claim's epoch, so if the store gave the job to another worker
        meanwhile (this one was presumed dead), what this one does afterwards changes nothing.
        """
        lease = self.cfg.jobs.lease_seconds
        job = self.store.claim(lease_seconds=lease, owner=WORKER_ID)
        if job is None:
            return False
        name = threading.current_thread().name
        self.holding[name] = job
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job, lease, done), name=f"{name}-lease", daemon=True)
        beat.start()
        try:
            if job.state == "processing":
                self.process(job)
            else:
                self.send(job)
        except Exception as exc:  # noqa: BLE001 - e.g. a full disk: the job waits, it is not lost or stuck
            self._hand_back(job, exc)
        finally:
            done.set()
            beat.join(5)
        self.holding.pop(name, None)
        return True

    def _heartbeat(self, job: Job, lease: float, done: threading.Event) -> None:
        """Renew the job's lease until the worker lets go of it; say so once if the claim was lost."""
        while not done.wait(lease / 4):
            try:
                if not self.store.renew(job.id, job.lease_epoch, lease):
                    log.warning("lease lost: the job was given to another worker; this one's results will not count",
                                **ctx(job.id, job.series_uid))
                    return
            except Exception:  # noqa: BLE001 - the store unreachable for a moment: the lease has 3 more beats
                log.warning("could not renew the lease", exc_info=True, **ctx(job.id, job.series_uid))

    def _hand_back(self, job: Job, exc: Exception) -> None:
        """The node's own trouble (a full disk, a job database it cannot write) is no fault of the job's:
        the job goes back in line without counting an attempt and is claimed again after a pause.
        Until the database takes that note, this worker keeps trying (a claimed job is never left behind)."""
        delay = max(0.1, self.cfg.jobs.backoff_seconds)
        what = "disk full" if disk_full(exc) else f"{exc.__class__.__name__}: {exc}"
        state = "queued" if job.state == "processing" else "sending"
        log.error("%s interrupted (%s); handed back, retry in %.1f s", job.state, what, delay,
                  exc_info=not disk_full(exc), **ctx(job.id, job.series_uid))
        while not self.stop.is_set():
            try:
                self.store.hand_back(job.id, state, time.time() + delay,
                                     f"waiting: {job.state} interrupted ({what}); retry in {delay:g} s",
                                     epoch=job.lease_epoch)
                return
            except Exception:  # noqa: BLE001 - still no room: try again (recover() covers a shutdown)
                self.stop.wait(delay)

    def prepare(self, job_ids: list[int]) -> None:
        """A release hint (completion.py): have idle warm children read, load and detect these jobs' series
        while their grace runs out. Only ever a head start: no child free, no preparation. A prepared child
        holds its series in memory until its job, so there are at most ``jobs.inference_slots`` of them."""
        jc = self.cfg.jobs
        if not (jc.warm_child and jc.prepare_ahead) or self.stop.is_set():
            return
        for job_id in job_ids:
            job = self.store.get(job_id)
            if job is None or job.state != "received":
                continue
            with self._warm_lock:
                if any(c.prepared_for == job.series_uid and c.alive() for c in self._warm.values()):
                    continue  # another association's release: already in hand
                if sum(bool(c.prepared_for) and c.alive() for c in self._warm.values()) >= jc.inference_slots:
                    return  # each holds a whole series in memory: at most one more per inference slot
                free = sorted(((bool(c.prepared_for), name) for name, c in self._warm.items()
                               if c.alive() and not c.preparing()))
                if not free:
                    return
                name = free[0][1]  # one never asked before, else one whose preparation is over
                child = self._warm[name]
                request = PrepareRequest(job.series_uid, str(self.spool.series_dir(job.series_uid)), self.backend,
                                         dataclasses.asdict(self.cfg))
                try:
                    # Named once per request: children move between slots (_take_warm), their files must not.
                    child.prepare(request, self.spool.tmp_path(f"prepare-{next(self._prepared)}.json"),
                                  jc.memory_mb, jc.timeout_seconds)
                except OSError:
                    continue  # it died: _keep_warm replaces it
            log.info("preparing the series during its release grace", **ctx(job.id, job.series_uid))

    def _take_warm(self, series_uid: str) -> WarmChild | None:
        """The warm child for this thread's job: the one that prepared its series if there is one (another
        thread's child is swapped for this thread's own), else this thread's own; one still busy preparing
        another series is swapped for an idle one, or else stopped (the job starts a cold child). A child
        dies with the thread that started it (PDEATHSIG); worker threads live as long as the node, and one
        that dies anyway is replaced: a child of its that another thread holds then dies too, which that
        thread's job meets as a dead warm child (a cold start) or, mid-job, as a crash."""
        name = threading.current_thread().name
        busy = None
        with self._warm_lock:
            mine = self._warm.pop(name, None)
            if mine is not None and mine.prepared_for == series_uid and mine.alive():
                return mine
            ready = next((n for n, c in self._warm.items() if c.prepared_for == series_uid and c.alive()), None)
            if ready is None and mine is not None and mine.preparing():
                ready = next((n for n, c in self._warm.items() if c.alive() and not c.preparing()), None)
                if ready is None:
                    busy, mine = mine, None
            if ready is not None:
                child = self._warm.pop(ready)
                if mine is not None:
                    self._warm[ready] = mine  # that thread's next job takes this one
                mine = child
        if busy is not None:
            busy.discard()
        return mine

    # -- processing --------------------------------------------------------------------
    def process(self, job: Job) -> None:
        jc = self.cfg.jobs
        if job.process_starts > jc.max_crashes:  # earlier runs began and never ended: the node died with them
            self._fail(job, f"processing did not finish in {jc.max_crashes} runs (each crashed, was killed for a "
                       "limit, or ended with the node itself); not tried again")
            return
        t0 = time.perf_counter()
        log.info("processing %d instances (run %d of at most %d)", job.instances, job.process_starts,
                 jc.max_crashes, **ctx(job.id, job.series_uid))
        out_dir = self.spool.out_dir(job.id)
        try:
            with self.slots:
                files = self.spool.series_files(job.series_uid)
                if not files:
                    self._fail(job, "refused: no instances in the spool")
                    return
                before_child: dict[str, float] = {}
                with timed(before_child, "fingerprint"):
                    fingerprint = input_fingerprint(files, self.model_id, self.cfg)
                self.store.set_fingerprint(job.id, fingerprint)
                twin = self.store.delivered_twin(job.id, job.series_uid, fingerprint)
                if twin is not None and twin.deliveries_cover([d.name for d in self.cfg.destinations]):
                    reason = (f"duplicate of job {twin.id}: identical instances and model, already processed and "
                              "delivered; nothing sent again")
                    self.store.finish(job.id, "done", reason, derived_series_uid=twin.derived_series_uid,
                                      epoch=job.lease_epoch)
                    log.info(reason, **ctx(job.id, job.series_uid))
                    return
                shutil.rmtree(out_dir, ignore_errors=True)  # a requeued job starts clean
                self.spool.remove_pictures(job.id)
                warm = self._take_warm(job.series_uid)
                request = ChildRequest(job.id, job.series_uid, str(self.spool.series_dir(job.series_uid)),
                                       str(out_dir), self.backend, self.model_id, dataclasses.asdict(self.cfg),
                                       str(self.spool.pictures_dir(job.id)), handed_at=time.time())
                result = run_child(request, self.spool.tmp_path(f"job-{job.id}"), jc.memory_mb,
                                   jc.timeout_seconds, self.stop, warm)
                if warm is not None and warm.proc.returncode == 0:
                    self._warm_died = 0  # it took the job: only deaths in a row turn warm children off
        except StoppedError:
            shutil.rmtree(out_dir, ignore_errors=True)
            self.store.hand_back(job.id, "queued", time.time(), "requeued: the node stopped while processing",
                                 epoch=job.lease_epoch)
            log.info("processing stopped for shutdown; the job resumes at the next start",
                     **ctx(job.id, job.series_uid))
            return
        except ChildDiedError as exc:
            shutil.rmtree(out_dir, ignore_errors=True)
            self._crashed(job, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - the reason goes into the job, the node goes on
            if disk_full(exc):  # not the input's fault: free what the partial outputs took, try again later
                shutil.rmtree(out_dir, ignore_errors=True)
                raise
            log.exception("processing failed", **ctx(job.id, job.series_uid))
            self._fail(job, f"processing failed: {exc.__class__.__name__}: {exc}")
            return
        finally:
            self.metrics.stage.labels("processing").observe(time.perf_counter() - t0)
        status = result.pop("status")
        if status == "disk_full":
            shutil.rmtree(out_dir, ignore_errors=True)
            raise SpoolFullError(result["reason"])
        if status == "refused":
            self._fail(job, "refused: " + result["reason"])
            return
        if status == "failed" and "uid" not in result:  # an error the child caught: the job fails with it
            self._fail(job, "processing failed: " + result["reason"])
            return
        log.info("processing child: peak %d MB resident", result.pop("peak_mb", 0), **ctx(job.id, job.series_uid))
        self._record_timings(job, before_child, result.pop("child_seconds", None), result.get("stages") or {},
                             time.perf_counter() - t0)
        outcome = SeriesOutcome(status=status, **result)
        outcome.outputs = [Path(p) for p in outcome.outputs]
        self._after_processing(job, outcome)

    def _record_timings(self, job: Job, before_child: dict[str, float], child: float | None,
                        stages: dict[str, float], total: float) -> None:
        """The run's time, step by step, into the job (GET /jobs/{id}) and the metrics: "fingerprint" is the
        duplicate check before the child, "child_start" the child's interpreter start and exit, the rest the
        child's own steps (process.timed)."""
        timings = dict(before_child)
        if child is not None:  # the steps done ahead of the job (ahead_*) took none of the child's time here
            own = sum(v for k, v in stages.items() if not k.startswith("ahead_") or k == "ahead_wait")
            timings["child_start"] = round(max(0.0, child - own), 3)
        timings.update(stages)
        timings["total"] = round(total, 3)
        for step, seconds in timings.items():
            if step != "total":
                self.metrics.processing_stage.labels(step).observe(seconds)
        try:
            self.store.set_timings(job.id, timings)
        except Exception:  # noqa: BLE001 - timings are for people; the job goes on without them
            log.exception("could not record the processing timings", **ctx(job.id, job.series_uid))
        log.info("processing steps (s): %s", ", ".join(f"{k} {v:.2f}" for k, v in timings.items()),
                 **ctx(job.id, job.series_uid))

    def _crashed(self, job: Job, why: str) -> None:
        """A processing run that died: again after a pause, or, after jobs.max_crashes runs, failed for good."""
        jc = self.cfg.jobs
        self.metrics.job_crashes.inc()
        runs = job.process_starts
        if runs >= jc.max_crashes:
            self._fail(job, f"processing {why} (run {runs} of {jc.max_crashes}); not tried again")
            return
        delay = max(0.1, jc.backoff_seconds)
        reason = f"processing {why} (run {runs} of {jc.max_crashes}); trying again in {delay:g} s"
        log.error(reason, **ctx(job.id, job.series_uid))
        self.store.crashed(job.id, time.time() + delay, reason, epoch=job.lease_epoch)

    def _after_processing(self, job: Job, outcome: SeriesOutcome) -> None:
        if outcome.status == "skipped":
            self.store.finish(job.id, "done", f"skipped: {outcome.reason}", epoch=job.lease_epoch)
            log.info("skipped: %s", outcome.reason, **ctx(job.id, job.series_uid))
            return
        if outcome.status != "done":
            self._fail(job, f"processing failed: {outcome.reason}")
            return
        summary = (f"{outcome.lesions} lesions, {outcome.windows} windows, {outcome.voxels_changed} voxels "
                   f"changed, {len(outcome.outputs)} files in {outcome.seconds:.1f} s")
        log.info("processed: %s", summary, **ctx(job.id, job.series_uid, derived=outcome.derived_series_uid,
                                                 settings=outcome.settings))
        outputs = [str(p) for p in outcome.outputs]
        self.store.set_lesions(job.id, outcome.lesion_table)
        unsure = [r for r in outcome.regions if r.get("unsure")]
        if unsure:
            summary += f"; {len(unsure)} region(s) unsure ({unsure[0]['action']})"
        if not self.cfg.destinations:
            self.store.finish(job.id, "done", f"processed ({summary}); no destinations configured, outputs kept "
                              "in the spool", outputs=json.dumps(outputs),
                              derived_series_uid=outcome.derived_series_uid, epoch=job.lease_epoch)
            return
        self.store.to_sending(job.id, outputs, outcome.derived_series_uid, f"processed ({summary}); sending",
                              epoch=job.lease_epoch)
        self.wake.set()

    def _fail(self, job: Job, reason: str) -> None:
        """A job its input can never pass: that input goes to quarantine/job-<id>/ with REASON.json,
        and the job's reason says where (the series folder itself stays, so a re-send can complete it)."""
        try:
            where = self.spool.quarantine_job(job.id, job.series_uid, reason)
            reason = f"{reason} [input kept in {where.relative_to(self.spool.root)}]"
        except OSError as exc:
            log.error("failed job not quarantined: %s", exc, **ctx(job.id, job.series_uid))
        self.store.finish(job.id, "failed", reason, epoch=job.lease_epoch)
        log.error(reason, **ctx(job.id, job.series_uid))

    # -- sending -----------------------------------------------------------------------
    def send(self, job: Job) -> None:
        t0 = time.perf_counter()
        files = [Path(p) for p in job.outputs]
        missing = [f for f in files if not f.is_file()]
        if missing:
            self.store.finish(job.id, "failed", f"outputs missing from the spool: {missing[0]}", epoch=job.lease_epoch)
            return
        deliveries: dict[str, dict[str, Any]] = dict(job.deliveries)
        errors: list[str] = []
        for dest in self.cfg.destinations:
            if deliveries.get(dest.name, {}).get("state") == "done":
                continue  # delivered before a retry or a restart: never sent twice
            ledger = SendLedger(self.store, job, dest.name)
            try:
                n = deliver(files, dest, self.cfg.node.ae_title, self.cfg.node.max_pdu, job.id, job.series_uid,
                            ledger.add)
                ledger.flush()
                deliveries[dest.name] = {"state": "done", "instances": n, "at": _now_iso()}
            except SendError as exc:
                ledger.flush()
                self.metrics.send_failures.labels(dest.name).inc()
                deliveries[dest.name] = {"state": "failed", "error": str(exc), "at": _now_iso()}
                errors.append(str(exc))
                log.warning("delivery failed: %s", exc, **ctx(job.id, job.series_uid, destination=dest.name))
            self.store.set_deliveries(job.id, deliveries)
        self.metrics.stage.labels("sending").observe(time.perf_counter() - t0)
        if not errors:
            names = ", ".join(d.name for d in self.cfg.destinations)
            self.store.finish(job.id, "done", f"delivered to {names}", epoch=job.lease_epoch)
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
            self.store.finish(job.id, "failed", reason, epoch=job.lease_epoch)
            log.error(reason, **ctx(job.id, job.series_uid))
            return
        delay = min(jc.backoff_max_seconds, jc.backoff_seconds * 2 ** (attempts - 1))
        self.store.retry_later(job.id, attempts, time.time() + delay,
                               f"delivery attempt {attempts} failed, retry in {delay:.0f} s: {'; '.join(errors)}",
                               epoch=job.lease_epoch)

