"""Completion: decides that a series is complete and queues its job.

Two rules. The release rule is fast: a PACS usually sends a series over one association and
releases it, so a series is complete ``jobs.release_grace_seconds`` (about 2 s) after the
association that brought it was released, when no other association of this receiver is still
sending it and no instance of it arrived since (the job store's last_instance_at: that also sees
other hosts' receivers). The end of a STOW-RS request is the same kind of hint, once no other
STOW-RS request is in flight (intake.StowRequests: a request's series is known only after its
body has arrived). The quiet timer
is the fallback: silence for ``jobs.quiet_seconds`` completes a series whatever brought it (one
series spread over several associations with gaps, a sender that never releases). An association
that ended without a release gives no hint: its series waits for a re-send (see receive.py), and
one never re-sent fails after jobs.incomplete_seconds. An instance that arrives after its series'
job left "received" starts a new job, which processes the grown series: nothing is lost, the
series is processed again whole. The same slow tick runs retention.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from dicom_node.config import Config
from dicom_node.node.jobs import Job, JobStore
from dicom_node.node.logs import ctx
from dicom_node.node.metrics import Metrics
from dicom_node.node.retention import apply_retention
from dicom_node.node.spool import Spool

log = logging.getLogger("dicom_node.node.completion")


class CompletionTimer(threading.Thread):
    """Once a second: queue quiet series, wake the workers; once a minute: apply retention."""

    def __init__(self, cfg: Config, spool: Spool, store: JobStore, metrics: Metrics, wake: threading.Event) -> None:
        super().__init__(name="completion", daemon=True)
        self.cfg = cfg
        self.spool = spool
        self.store = store
        self.metrics = metrics
        self.wake = wake
        self.stop = threading.Event()
        self._last_retention = 0.0
        self._store_failed = False  # the last tick could not reach the job store
        self._released: list[tuple[float, list[int], str]] = []  # (released at, job ids, why), oldest first
        self._released_lock = threading.Lock()
        self._hinted = threading.Event()  # a release hint arrived: recompute the next wake-up
        # Told of each release hint as it arrives (the workers' prepare_ahead, in a node that also works)
        self.on_hint: Callable[[list[int]], None] | None = None

    def released(self, job_ids: list[int], at: float, why: str) -> None:
        """The association (or STOW-RS request) that brought these jobs' instances ended at ``at``; their
        series are queued ``jobs.release_grace_seconds`` later unless more of them arrives."""
        if not job_ids or self.cfg.jobs.release_grace_seconds <= 0:
            return
        with self._released_lock:
            self._released.append((at, sorted(job_ids), why))
        self._hinted.set()
        if self.on_hint is not None:
            try:
                self.on_hint(sorted(job_ids))
            except Exception:  # noqa: BLE001 - a head start only: completion goes on without it
                log.warning("could not start preparing the released series", exc_info=True, **ctx())

    def shutdown(self) -> None:
        self.stop.set()
        self._hinted.set()

    def run(self) -> None:
        period = min(1.0, max(0.05, self.cfg.jobs.quiet_seconds / 4))
        while not self.stop.is_set():
            with self._released_lock:
                due = self._released[0][0] + self.cfg.jobs.release_grace_seconds if self._released else None
            wait = period if due is None else min(period, max(0.0, due - time.time()) + 0.01)
            self._hinted.wait(wait)
            self._hinted.clear()
            if not self.stop.is_set():
                self.tick()

    def tick(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        try:
            if self._store_failed:
                # The receivers refused instances while the store was away: a series is not complete just
                # because nothing could arrive. Every series still collecting waits its full quiet again.
                for job in self.store.restart_quiet("the job store was unavailable", now):
                    log.info("quiet period restarted: the job store was unavailable", **ctx(job.id, job.series_uid))
                self._store_failed = False
            self._queue_released(now)
            for job in self.store.queue_quiet(self.cfg.jobs.quiet_seconds, now):
                self._queued(job, f"quiet for {self.cfg.jobs.quiet_seconds:.1f} s", now)
            for job in self.store.expire_incomplete(now - self.cfg.jobs.incomplete_seconds, now):
                log.error("%s", job.reason, **ctx(job.id, job.series_uid))
            if now - self._last_retention > 60:
                self._last_retention = now
                apply_retention(self.cfg, self.spool, self.store, now)
        except Exception:  # noqa: BLE001 - the timer must survive anything one tick throws
            if not self._store_failed:  # once per outage, not once a second
                log.exception("completion tick failed", **ctx())
            self._store_failed = True

    def _queue_released(self, now: float) -> None:
        grace = self.cfg.jobs.release_grace_seconds
        with self._released_lock:
            due = [hint for hint in self._released if hint[0] + grace <= now]
            self._released = [hint for hint in self._released if hint[0] + grace > now]
        try:
            for at, job_ids, why in due:
                for job in self.store.queue_released(job_ids, at, f"{why}; nothing more for {grace:g} s", now):
                    self._queued(job, why, now)
        except Exception:
            with self._released_lock:  # the store is away: try again next tick (the quiet timer stays the fallback)
                self._released = due + self._released
            raise

    def _queued(self, job: Job, why: str, now: float) -> None:
        """A job just queued, by either rule: its receive time observed, a line logged, the workers woken."""
        if job.received_at is not None:
            self.metrics.stage.labels("receive").observe(max(0.0, (job.last_instance_at or now) - job.received_at))
        log.info("queued: %d instances, %s", job.instances, why, **ctx(job.id, job.series_uid))
        self.wake.set()
