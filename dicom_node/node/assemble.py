"""Assemble: every stored instance is classified and counted into its series' job; a per-series
quiet timer then decides that the series is complete and queues the job.

Association release is no signal of completeness (a PACS may send one series over several
associations, or several series over one), so only silence counts. An instance that arrives
after its series' job left "received" starts a new job, which processes the grown series.
This module also runs the spool's retention policy, on the same slow tick.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from pydicom.dataset import Dataset

from ..config import Config
from ..dicom.derived import is_our_output
from ..dicom.series import CT_IMAGE_STORAGE, series_key, sop_class
from .jobs import JobStore
from .logs import ctx
from .metrics import Metrics
from .spool import Spool, SpoolFullError

log = logging.getLogger("dicom_node.node.assemble")

# DIMSE statuses shared by C-STORE and STOW-RS failure reasons.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110


@dataclass
class Accepted:
    status: int
    reason: str = ""
    job_id: int | None = None


def why_not_processed(ds: Dataset) -> str | None:
    """None for an instance that belongs in a job; else why it is only stored.

    Our own output must never loop back into processing, whatever route brought it here.
    """
    if is_our_output(ds):
        return "our own output (dicom-node in ContributingEquipmentSequence)"
    modality = str(getattr(ds, "Modality", ""))
    sop = sop_class(ds)
    if modality != "CT" or sop != CT_IMAGE_STORAGE:
        return f"not a CT image (Modality {modality or '?'}, SOP class {sop or '?'})"
    image_type = [str(v).upper() for v in getattr(ds, "ImageType", [])]
    if "DERIVED" in image_type:
        return "DERIVED image"
    if "LOCALIZER" in image_type:
        return "localizer"
    return None


class Intake:
    """The one door into the spool, shared by C-STORE and STOW-RS."""

    def __init__(self, spool: Spool, store: JobStore, metrics: Metrics) -> None:
        self.spool = spool
        self.store = store
        self.metrics = metrics
        self._ignored_series: set[str] = set()

    def accept(self, data: bytes, ds: Dataset, via: str) -> Accepted:
        """Store durably, then count the instance into a job; never raises."""
        try:
            sop_uid = str(ds.SOPInstanceUID)
            series_uid = series_key(ds)
        except Exception as exc:  # noqa: BLE001 - a malformed header is the peer's error, not ours
            self.metrics.rejected.labels(via, "cannot_understand").inc()
            log.warning("instance refused: unreadable header (%s)", exc, **ctx())
            return Accepted(CANNOT_UNDERSTAND, f"unreadable header: {exc.__class__.__name__}")
        try:
            self.spool.write_instance(series_uid, sop_uid, data)
        except (SpoolFullError, OSError) as exc:
            self.metrics.rejected.labels(via, "out_of_resources").inc()
            log.error("instance refused, spool write failed: %s", exc, **ctx(series=series_uid, sop=sop_uid))
            return Accepted(OUT_OF_RESOURCES, f"spool write failed: {exc}")
        skip = why_not_processed(ds)
        if skip:
            self.metrics.instances.labels(via, "stored_only").inc()
            if series_uid not in self._ignored_series:
                if len(self._ignored_series) > 10000:  # only there to log once per series; keep it small
                    self._ignored_series.clear()
                self._ignored_series.add(series_uid)
                log.info("stored, no job: %s", skip, **ctx(series=series_uid))
            return Accepted(SUCCESS, skip)
        try:
            job_id, created = self.store.note_instance(series_uid, str(getattr(ds, "StudyInstanceUID", "") or ""),
                                                       str(getattr(ds, "SeriesDescription", "") or ""))
        except Exception as exc:  # noqa: BLE001 - the database is on the same disk as the spool
            self.metrics.rejected.labels(via, "out_of_resources").inc()
            log.error("instance refused, job database failed: %s", exc, **ctx(series=series_uid, sop=sop_uid))
            return Accepted(OUT_OF_RESOURCES, f"job database failed: {exc}")
        self.metrics.instances.labels(via, "processed").inc()
        if created:
            log.info("new job: first instance of the series (via %s)", via, **ctx(job_id, series_uid))
        return Accepted(SUCCESS, "", job_id)


class Assembler(threading.Thread):
    """Once a second: queue quiet series, wake the workers; once a minute: apply retention."""

    def __init__(self, cfg: Config, spool: Spool, store: JobStore, metrics: Metrics, wake: threading.Event) -> None:
        super().__init__(name="assembler", daemon=True)
        self.cfg = cfg
        self.spool = spool
        self.store = store
        self.metrics = metrics
        self.wake = wake
        self.stop = threading.Event()
        self._last_retention = 0.0

    def run(self) -> None:
        while not self.stop.wait(min(1.0, max(0.05, self.cfg.jobs.quiet_seconds / 4))):
            self.tick()

    def tick(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        try:
            for job in self.store.queue_quiet(self.cfg.jobs.quiet_seconds, now):
                if job.received_at is not None:
                    self.metrics.stage.labels("receive").observe(max(0.0, (job.last_instance_at or now) -
                                                                     job.received_at))
                log.info("queued: %d instances, quiet for %.0f s", job.instances, self.cfg.jobs.quiet_seconds,
                         **ctx(job.id, job.series_uid))
                self.wake.set()
            if now - self._last_retention > 60:
                self._last_retention = now
                apply_retention(self.cfg, self.spool, self.store, now)
        except Exception:  # noqa: BLE001 - the timer must survive anything one tick throws
            log.exception("assembler tick failed", **ctx())


def purge_job_files(spool: Spool, store: JobStore, job_id: int, series_uid: str) -> None:
    """Drop a finished job's outputs, and its input unless a newer job still needs that series."""
    spool.remove_outputs(job_id)
    if series_uid not in store.unfinished_series():
        spool.remove_series(series_uid)
    store.mark_purged(job_id)
    log.info("files purged (retention)", **ctx(job_id, series_uid))


def apply_retention(cfg: Config, spool: Spool, store: JobStore, now: float) -> None:
    """keep_days: purge done jobs' files after N days. Failed jobs keep theirs for a person to look at."""
    if cfg.spool.keep_days <= 0:
        return
    for job in store.finished_unpurged(now - cfg.spool.keep_days * 86400):
        purge_job_files(spool, store, job.id, job.series_uid)
