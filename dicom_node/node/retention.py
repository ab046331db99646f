"""Retention: finished jobs' files are purged after spool.keep_days, the quarantine after its own limit."""

from __future__ import annotations

import logging

from dicom_node.config import Config
from dicom_node.node.jobs import JobStore
from dicom_node.node.logs import ctx
from dicom_node.node.spool import Spool

log = logging.getLogger("dicom_node.node.retention")


def purge_job_files(spool: Spool, store: JobStore, job_id: int, series_uid: str, pictures: bool = False) -> None:
    """Drop a finished job's outputs, and its input unless a newer job still needs that series; with
    ``pictures``, its page's pictures too (kept after delivery, gone with the job's retention)."""
    spool.remove_outputs(job_id)
    if pictures:
        spool.remove_pictures(job_id)
    if series_uid not in store.unfinished_series():
        spool.remove_series(series_uid)
    store.mark_purged(job_id)
    log.info("files purged (retention)", **ctx(job_id, series_uid))


def apply_retention(cfg: Config, spool: Spool, store: JobStore, now: float) -> None:
    """keep_days: purge done jobs' files after N days. Failed jobs keep theirs for a person to look at,
    until the quarantine's own age limit (quarantine_keep_days) takes the evidence."""
    if cfg.spool.quarantine_keep_days > 0:
        removed = spool.purge_quarantine(now - cfg.spool.quarantine_keep_days * 86400)
        if removed:
            log.info("quarantine: %d entries older than %g days purged", removed, cfg.spool.quarantine_keep_days,
                     **ctx())
    if cfg.spool.keep_days <= 0:
        return
    for job in store.finished_unpurged(now - cfg.spool.keep_days * 86400):
        purge_job_files(spool, store, job.id, job.series_uid, pictures=True)
