"""Intake: the one door into the spool, shared by C-STORE and STOW-RS.

Every received instance is checked on arrival (structure, UIDs, the image it must carry), stored
durably, and counted into its series' job; an instance that cannot be processed safely is refused
with a status the sender sees, and kept in the quarantine with the reason.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from dicom_node.config import IntakeConfig
from dicom_node.node.jobs import JobStore
from dicom_node.node.logs import ctx
from dicom_node.node.metrics import Metrics
from dicom_node.node.spool import Spool, SpoolFullError
from dicom_node.pipeline.series import (
    CT_IMAGE_STORAGE,
    MULTIFRAME_CT_STORAGE,
    PIXEL_DATA,
    REFUSED_IMAGE_TYPES,
    image_problem,
    image_type_refusal,
    is_our_output,
    series_key,
    sop_class,
    truncated_element,
)
from dicom_node.pipeline.structure import structure_problem, uid_problem

log = logging.getLogger("dicom_node.node.intake")

# DIMSE statuses shared by C-STORE and STOW-RS failure reasons.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
JOB_STORE_FAILED = "job database failed"  # the start of an Accepted.reason when the job store failed
DOES_NOT_MATCH_SOP_CLASS = 0xA900  # the IOD's rules broken: no pixels, wrong BitsAllocated, impossible size
CANNOT_UNDERSTAND = 0xC000  # not a data set, or one cut short
DUPLICATE_SOP_INSTANCE = 0x0111  # the UID came before with other content; the first copy is kept


@dataclass
class Accepted:
    status: int
    reason: str = ""
    job_id: int | None = None


def why_not_processed(ds: Dataset, refused: Iterable[str] = REFUSED_IMAGE_TYPES) -> str | None:
    """None for an instance that belongs in a job; else why it is only stored.

    Our own output must never loop back into processing, whatever route brought it here.
    """
    if is_our_output(ds):
        return "our own output (dicom-node in ContributingEquipmentSequence)"
    modality = str(getattr(ds, "Modality", ""))
    sop = sop_class(ds)
    # Multi-frame CT gets a job all the same: it fails with a reason the sender can act on (see series.py).
    if modality != "CT" or (sop != CT_IMAGE_STORAGE and sop not in MULTIFRAME_CT_STORAGE):
        return f"not a CT image (Modality {modality or '?'}, SOP class {sop or '?'})"
    return image_type_refusal(ds, refused)


class StowRequests:
    """STOW-RS requests in flight, so that the end of one is a completion hint only when none is left.

    DICOMweb clients upload a series as several requests, often at once, and a request's instances
    are known only once its body has arrived: while one request streams, another that ended cannot
    tell that the series is not finished. So the hints of requests that end while others are in flight
    wait for the last of them, and go out together when it ends. A request with a refused part gives no
    hint for its series (the client may send the part again): the quiet timer decides, as it does for
    an association with a refusal. A request that never ends holds the hints back; the quiet timer
    stays the fallback.
    """

    def __init__(self, released: Callable[[Iterable[int], str], None]) -> None:
        self._released = released
        self._lock = threading.Lock()
        self._in_flight = 0
        self._pending: set[int] = set()
        self._unsure: set[int] = set()  # series a request with refusals touched, until all requests end

    def begin(self) -> None:
        with self._lock:
            self._in_flight += 1

    def end(self, jobs: Iterable[int], clean: bool) -> None:
        """A request ended having stored instances of ``jobs``; ``clean``: none of its parts was refused."""
        with self._lock:
            self._in_flight -= 1
            (self._pending if clean else self._unsure).update(jobs)
            if self._in_flight > 0:
                return
            due, self._pending, self._unsure = self._pending - self._unsure, set(), set()
        if due:
            self._released(due, "the last STOW-RS request in flight ended")


class Intake:
    """The one door into the spool, shared by C-STORE and STOW-RS."""

    def __init__(self, spool: Spool, store: JobStore, metrics: Metrics, limits: IntakeConfig | None = None) -> None:
        self.spool = spool
        self.store = store
        self.metrics = metrics
        self.limits = limits or IntakeConfig()
        self._ignored_series: set[str] = set()
        # (job ids, released at, why): the end of an association or STOW-RS request, the completion hint
        self.on_released: Callable[[list[int], float, str], None] | None = None
        self.stow = StowRequests(self.released)

    def released(self, job_ids: Iterable[int], why: str, at: float | None = None) -> None:
        """Whatever brought instances of these jobs has ended (an association released, a STOW-RS request
        answered): tell completion, which queues them after ``jobs.release_grace_seconds``."""
        ids = sorted(set(job_ids))
        if ids and self.on_released is not None:
            self.on_released(ids, time.time() if at is None else at, why)

    def accept(self, data: bytes, ds: Dataset, via: str, loud: bool = True) -> Accepted:
        """Store durably, then count the instance into a job; never raises.

        ``ds`` is the whole data set decoded from ``data``, Pixel Data included. An instance that
        cannot be processed safely is refused here, with a status the sender sees, and kept in the
        quarantine with the reason: one broken slice must not fail its series an hour later.
        """
        sop_uid = series_uid = ""
        try:
            if "SOPInstanceUID" not in ds or not str(ds.SOPInstanceUID):
                return self.refuse(data, "", "", via, CANNOT_UNDERSTAND, "cannot_understand",
                                    "no SOP Instance UID: not a DICOM data set, or its header is damaged", loud=loud)
            # Structure first: nothing below may walk a sequence nested hundreds deep.
            problem = structure_problem(ds, self.limits.max_sequence_depth, self.limits.max_element_mb << 20)
            if problem:
                return self.refuse(data, "", "", via, CANNOT_UNDERSTAND, "structure", problem, loud=loud)
            problem = uid_problem(ds)
            if problem:  # the UIDs name our files and are copied into the outputs: refused before either
                return self.refuse(data, "", "", via, DOES_NOT_MATCH_SOP_CLASS, "invalid", problem, loud=loud)
            sop_uid = str(ds.SOPInstanceUID)
            series_uid = series_key(ds)
            problem = truncated_element(ds)
            if problem:
                return self.refuse(data, series_uid, sop_uid, via, CANNOT_UNDERSTAND, "cannot_understand", problem,
                                   loud=loud)
            skip = why_not_processed(ds, self.limits.refuse_image_types)
            problem = image_problem(ds) if skip is None and sop_class(ds) == CT_IMAGE_STORAGE else None
            if problem:
                return self.refuse(data, series_uid, sop_uid, via, DOES_NOT_MATCH_SOP_CLASS, "invalid", problem,
                                   loud=loud)
            earlier = self.spool.instance_path(series_uid, sop_uid)
            if earlier.is_file() and not same_instance(earlier.read_bytes(), data):
                return self.refuse(data, series_uid, sop_uid, via, DUPLICATE_SOP_INSTANCE, "duplicate",
                                    f"SOP Instance UID {sop_uid} was received before with different content; "
                                    "the first copy is kept", loud=loud)
            try:
                other = self.store.series_of_instance(sop_uid) if skip is None else None
            except Exception as exc:  # noqa: BLE001 - the job store, not the instance: a retry will do
                return self._store_failed(via, series_uid, sop_uid, exc)
            if other is not None and other != series_uid:
                # Derived UIDs are hashed from the source's: two series sharing one would collide downstream.
                return self.refuse(data, series_uid, sop_uid, via, DUPLICATE_SOP_INSTANCE, "duplicate",
                                    f"SOP Instance UID {sop_uid} was received before in another series ({other}); "
                                    "a UID names one instance only", loud=loud)
        except Exception as exc:  # noqa: BLE001 - a malformed header is the peer's error, not ours
            return self.refuse(data, series_uid, sop_uid, via, CANNOT_UNDERSTAND, "cannot_understand",
                                f"unreadable header ({exc.__class__.__name__}: {str(exc)[:200]})", loud=loud)
        try:
            self.spool.write_instance(series_uid, sop_uid, data)
        except (SpoolFullError, OSError) as exc:
            self.metrics.rejected.labels(via, "out_of_resources").inc()
            log.error("instance refused, spool write failed: %s", exc, **ctx(series=series_uid, sop=sop_uid))
            return Accepted(OUT_OF_RESOURCES, f"spool write failed: {exc}")
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
                                                       str(getattr(ds, "SeriesDescription", "") or ""),
                                                       sop_uid=sop_uid)
        except Exception as exc:  # noqa: BLE001 - the database is on the same disk as the spool, or away
            return self._store_failed(via, series_uid, sop_uid, exc)
        self.metrics.instances.labels(via, "processed").inc()
        if created:
            log.info("new job: first instance of the series (via %s)", via, **ctx(job_id, series_uid))
        return Accepted(SUCCESS, "", job_id)

    def _store_failed(self, via: str, series_uid: str, sop_uid: str, exc: Exception) -> Accepted:
        """The job store cannot record the instance (a full disk, or a shared database that is away): refused
        with "out of resources", which senders retry, never taken without a job to process it."""
        self.metrics.rejected.labels(via, "out_of_resources").inc()
        log.error("instance refused, job database failed: %s", exc, **ctx(series=series_uid, sop=sop_uid))
        return Accepted(OUT_OF_RESOURCES, f"{JOB_STORE_FAILED}: {exc}")

    def refuse(self, data: bytes, series_uid: str, sop_uid: str, via: str, status: int, label: str,
                reason: str, loud: bool = True) -> Accepted:
        """Count, log and quarantine a refused instance; the status stands even if the quarantine fails.
        ``loud`` False logs at debug level only (a request's refusals past the first few)."""
        self.metrics.rejected.labels(via, label).inc()
        log.log(logging.WARNING if loud else logging.DEBUG, "instance refused (0x%04X): %s", status, reason,
                **ctx(series=series_uid or None, sop=sop_uid or None, via=via))
        try:
            self.spool.quarantine_instance(data, series_uid, sop_uid,
                                           {"reason": reason, "status": f"0x{status:04X}", "via": via})
        except Exception as exc:  # noqa: BLE001 - a full disk must not turn a refusal into a crash
            log.error("refused instance not quarantined: %s", exc, **ctx(series=series_uid or None))
        return Accepted(status, reason)


def dataset_offset(data: bytes) -> int:
    """Where the data set starts in a Part-10 file: past the preamble and the file meta group."""
    if data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00":
        # (0002,0000) UL group length, explicit VR: tag(4) VR(2) length(2) value(4)
        return 132 + 12 + int.from_bytes(data[140:144], "little")
    return 0


def same_instance(old: bytes, new: bytes) -> bool:
    """Whether a re-sent instance carries the data set already stored; file meta (who sent it, how)
    does not count, nor does a change of transfer syntax that decodes to the same pixels."""
    if old[dataset_offset(old):] == new[dataset_offset(new):]:
        return True
    try:
        a = pydicom.dcmread(io.BytesIO(old), force=True)
        b = pydicom.dcmread(io.BytesIO(new), force=True)
        same_syntax = a.file_meta.get("TransferSyntaxUID") == b.file_meta.get("TransferSyntaxUID")
        for tag in (set(a.keys()) | set(b.keys())) - {PIXEL_DATA}:
            if tag.is_private and not same_syntax:
                continue  # private values read under implicit VR are opaque bytes
            if tag not in a or tag not in b or a[tag].value != b[tag].value:
                return False
        if (PIXEL_DATA in a) != (PIXEL_DATA in b):
            return False
        if PIXEL_DATA not in a or same_syntax:
            return a.get(PIXEL_DATA) == b.get(PIXEL_DATA)
        return bool(np.array_equal(a.pixel_array, b.pixel_array))
    except Exception:  # noqa: BLE001 - what cannot be compared is not the same
        return False
