"""Completion: a per-series quiet timer decides that a series is complete and queues its job.

Association release is no signal of completeness (a PACS may send one series over several
associations, or several series over one), so only silence counts; an association that ended
without a release leaves its series waiting for a re-send (see receive.py), and one never re-sent
fails after jobs.incomplete_seconds. An instance that arrives after its series' job left
"received" starts a new job, which processes the grown series. The same slow tick runs retention.
"""

from __future__ import annotations

import logging
import threading
import time

from dicom_node.config import Config
from dicom_node.node.jobs import JobStore
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

    def run(self) -> None:
        while not self.stop.wait(min(1.0, max(0.05, self.cfg.jobs.quiet_seconds / 4))):
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
            for job in self.store.queue_quiet(self.cfg.jobs.quiet_seconds, now):
                if job.received_at is not None:
                    self.metrics.stage.labels("receive").observe(max(0.0, (job.last_instance_at or now) -
                                                                     job.received_at))
                log.info("queued: %d instances, quiet for %.1f s", job.instances, self.cfg.jobs.quiet_seconds,
                         **ctx(job.id, job.series_uid))
                self.wake.set()
            for job in self.store.expire_incomplete(now - self.cfg.jobs.incomplete_seconds, now):
                log.error("%s", job.reason, **ctx(job.id, job.series_uid))
            if now - self._last_retention > 60:
                self._last_retention = now
                apply_retention(self.cfg, self.spool, self.store, now)
        except Exception:  # noqa: BLE001 - the timer must survive anything one tick throws
            if not self._store_failed:  # once per outage, not once a second
                log.exception("completion tick failed", **ctx())
            self._store_failed = True
