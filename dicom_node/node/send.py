"""Delivering outputs: C-STORE to a DICOM AE or STOW-RS to a DICOMweb server.

Each call sends one job's files to one destination and raises ``SendError`` with a
readable reason on any failure; the worker owns retries and backoff. Sending the same
objects again is harmless: their UIDs are deterministic, so an archive replaces rather
than duplicates them.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom

from dicom_node.config import Destination
from dicom_node.node.logs import ctx

log = logging.getLogger("dicom_node.node.send")

# C-STORE statuses that mean "the peer has it": success and the storage warnings.
STORED = {0x0000, 0xB000, 0xB006, 0xB007}
STOW_BATCH = 32  # instances per STOW-RS request: bounded memory, few round trips


class SendError(RuntimeError):
    pass


def no_delay(event: object) -> None:
    """EVT_CONN_OPEN handler: turn Nagle off. pynetdicom leaves it on, and a data set's last, short
    P-DATA then waits for the peer's delayed ACK: about 40 ms per instance."""
    sock = getattr(getattr(getattr(event, "assoc", None), "dul", None), "socket", None)
    raw = getattr(sock, "socket", None)
    if raw is not None:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class ReactorGate:
    """Stands in for a requesting Association's reactor checkpoint (``_reactor_checkpoint``, a
    ``threading.Event``) so that a C-STORE's answer always reaches the call that waits for it.

    Why: before each ``send_*`` pynetdicom 3 clears the checkpoint, then waits until its reactor thread
    says it is paused (``_is_paused``). The reactor sets that flag *before* it waits at the checkpoint and
    clears it only after, so a request sent while the reactor is between the two reads the stale flag, goes
    out, and when the reactor runs on it takes the answer off the queue itself ("Received unexpected
    C-STORE service message"): the sender waits out the whole DIMSE timeout and aborts. On loopback with
    Nagle off an answer comes back in about a millisecond, inside one thread switch; a clean-clone CI run
    lost one that way. Here ``clear()`` (from any thread but the reactor's own) returns only once the reactor
    is parked at ``wait()``, so the request goes out only after the reactor can no longer take its answer.
    Only the Event methods pynetdicom calls are provided."""

    def __init__(self, assoc: Any, park_timeout: float = 10.0) -> None:
        self._assoc = assoc
        self._park_timeout = park_timeout
        self._cond = threading.Condition()
        self._open = True
        self._parked = False

    def is_set(self) -> bool:
        return self._open

    def set(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._open = False
            if threading.current_thread() is self._assoc or not self._assoc.is_alive():
                return  # the reactor itself (a handler sending on its own association), or none to wait for
            # The reactor reaches wait() within one loop turn (~1 ms) unless it is serving a message. It may
            # also end its loop (an abort) without passing here: look again every 10 ms; the deadline only
            # guards against a reactor that hangs (pynetdicom then reports the missing answer).
            deadline = time.monotonic() + self._park_timeout
            while not self._parked and self._assoc.is_alive() and time.monotonic() < deadline:
                self._cond.wait(0.01)

    def wait(self, timeout: float | None = None) -> bool:
        """Called by the reactor thread once per loop turn: parks it while the gate is closed."""
        with self._cond:
            self._parked = True
            self._cond.notify_all()
            try:
                return self._cond.wait_for(lambda: self._open, timeout)
            finally:
                self._parked = False


def gate_reactor(event: object) -> None:
    """EVT_CONN_OPEN handler for associations we request: install a ReactorGate before the reactor starts."""
    assoc = getattr(event, "assoc", None)
    if assoc is not None and assoc.is_requestor:
        assoc._reactor_checkpoint = ReactorGate(assoc)


def requestor_handlers(nagle_off: bool = True) -> list[tuple[Any, Callable[[Any], None]]]:
    """The event handlers every association this node (or its tooling) requests is opened with: Nagle
    off, and the reactor gated so no answer is lost. Tests that time a sender as pynetdicom's defaults
    leave it keep Nagle (``nagle_off=False``) but are gated all the same."""
    from pynetdicom import evt

    return [(evt.EVT_CONN_OPEN, no_delay)] * nagle_off + [(evt.EVT_CONN_OPEN, gate_reactor)]


def unreachable(host: str, port: int, timeout: float) -> str:
    """Why a TCP connection to the peer fails, or "" when it opens: the operator's reason for a failed send."""
    try:
        with socket.create_connection((host, port), timeout=min(timeout, 5.0)):
            return ""
    except OSError as exc:
        return exc.strerror or str(exc) or exc.__class__.__name__


def _contexts(files: list[Path]) -> tuple[list[tuple[str, str]], list[str]]:
    """(SOP class, transfer syntax) pairs the files need, and each file's SOP Instance UID (for the send
    ledger), read from their file meta in one pass."""
    pairs: list[tuple[str, str]] = []
    sop_uids: list[str] = []
    for f in files:
        meta = pydicom.filereader.read_file_meta_info(f)
        pair = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
        if pair not in pairs:
            pairs.append(pair)
        sop_uids.append(str(meta.MediaStorageSOPInstanceUID))
    return pairs, sop_uids


def send_dimse(files: list[Path], dest: Destination, calling_ae: str, max_pdu: int = 0,
               job: int | None = None, series: str | None = None,
               ledger: Callable[[str, int], None] | None = None) -> int:
    """C-STORE every file, over up to ``dest.associations`` associations at once; returns how many were
    stored. ``ledger(sop_uid, status)`` hears of every answer (0 stored, else the status; -1 no answer).

    Why several: a durable archive spends most of each instance on its own disk and index, and another
    association's instance is stored meanwhile. The first association opens before any other, and failing
    it fails the delivery as always; the others take files from the same queue, so one the PACS refuses
    (many limit associations per caller) leaves its share to those it accepted. A refused instance stops
    its association and fails the delivery with its reason once the others are done (a retry sends it
    all again: the UIDs are deterministic, so the archive keeps one copy).
    """
    pairs, sop_uids = _contexts(files)
    if len(pairs) > 128:
        raise SendError(f"{len(pairs)} presentation contexts needed, at most 128 fit one association")
    work: queue.SimpleQueue[tuple[Path, str]] = queue.SimpleQueue()
    for item in zip(files, sop_uids):
        work.put(item)
    lock = threading.Lock()
    stored: list[int] = []
    errors: list[str] = []

    def answered(sop_uid: str, status: int) -> None:
        if ledger is not None:
            with lock:
                ledger(sop_uid, status)

    def drain(assoc: Any) -> None:
        n = 0
        try:
            n = _drain(assoc, work, dest, answered)
        except SendError as exc:
            with lock:
                errors.append(str(exc))
        finally:
            with lock:
                stored.append(n)

    def extra(i: int) -> None:
        try:
            assoc = _associate(dest, calling_ae, max_pdu, pairs)
        except SendError as exc:  # the PACS takes fewer at once: the others send its share
            log.warning("association %d of %d not opened, the others send its share: %s", i + 1, dest.associations,
                        exc, **ctx(job, series, destination=dest.name))
            return
        drain(assoc)

    first = _associate(dest, calling_ae, max_pdu, pairs)
    helpers = [threading.Thread(target=extra, args=(i,), name=f"send-{dest.name}-{i}", daemon=True)
               for i in range(1, max(1, min(dest.associations, len(files))))]
    for t in helpers:
        t.start()
    drain(first)
    for t in helpers:
        t.join()
    if errors:
        raise SendError(errors[0])
    if not work.empty():  # every association ended without an error and files are left: cannot happen
        raise SendError(f"{dest.name}: {work.qsize()} instances not sent")
    total = sum(stored)
    log.info("sent %d instances by C-STORE to %s over %d association(s)", total, dest.name, len(stored),
             **ctx(job, series, destination=dest.name))
    return total


def _associate(dest: Destination, calling_ae: str, max_pdu: int, pairs: list[tuple[str, str]]) -> Any:
    """One established association to ``dest`` for these (SOP class, transfer syntax) pairs, or SendError
    with the reason (rejected, aborted, or why the connection failed)."""
    from pynetdicom import AE, _config

    from dicom_node.node.security import client_context

    _config.STORE_SEND_CHUNKED_DATASET = SEND_AS_STORED
    ae = AE(ae_title=calling_ae)
    ae.maximum_pdu_size = max_pdu
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = dest.timeout_seconds
    for sop, ts in pairs:
        ae.add_requested_context(sop, [ts])
    tls_args = (client_context(dest), dest.host) if dest.tls else None  # verifies the peer's name, too
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, evt_handlers=requestor_handlers(),
                         tls_args=tls_args)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
        down = "" if assoc.is_rejected else unreachable(dest.host, dest.port, dest.timeout_seconds)
        if down:  # pynetdicom says "aborted" for a refused or timed-out connection too
            why = f"failed: cannot connect ({down})"
        why += " (over TLS: see the log for the handshake error)" if dest.tls and not assoc.is_rejected and \
            not down else ""
        raise SendError(f"{dest.name}: association with {dest.ae_title}@{dest.host}:{dest.port} {why}")
    assoc.dul._run_loop_delay = SEND_POLL_SECONDS
    return assoc


# Sending a derived series: what each C-STORE costs besides the peer's own work. Each file goes out as it
# is stored, its data set's bytes read from the file (pynetdicom's STORE_SEND_CHUNKED_DATASET, set in
# _associate; it needs the file's own transfer syntax accepted, which is the only one _contexts offers),
# where pynetdicom otherwise decodes the file and encodes it again: about 1.9 ms of CPU per 512x512 slice.
# Between one instance's answer and the next request, pynetdicom's DUL reactor sleeps 1 ms whenever it
# has nothing to do; 0.1 ms here (a private attribute, as on the receiving side). Both measured into
# Orthanc 1.10, 256 slices, one association, alternating with pynetdicom's defaults: `tools/bench.py send`.
SEND_AS_STORED = True
SEND_POLL_SECONDS = 0.0001


def _drain(assoc: Any, work: queue.SimpleQueue, dest: Destination, answered: Callable[[str, int], None]) -> int:
    """C-STORE files from ``work`` over ``assoc`` until none are left; released at the end. Returns how
    many were stored; the first refusal raises SendError (the association stops taking files)."""
    stored = 0
    try:
        while True:
            try:
                f, sop_uid = work.get_nowait()
            except queue.Empty:
                return stored
            status = assoc.send_c_store(f)
            code = int(getattr(status, "Status", -1)) if status else -1
            answered(sop_uid, 0 if code in STORED else code)
            if code not in STORED:
                raise SendError(f"{dest.name}: C-STORE of {f.name} answered "
                                f"{'no response' if code < 0 else hex(code)}")
            stored += 1
    finally:
        if assoc.is_established:
            assoc.release()


def send_stow(files: list[Path], dest: Destination, job: int | None = None, series: str | None = None,
              ledger: Callable[[str, int], None] | None = None) -> int:
    """STOW-RS in batches; any FailedSOPSequence entry or HTTP error fails the delivery."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    headers = {"Authorization": f"Bearer {dest.token}"} if dest.token else None
    client = DICOMwebClient(url=dest.url, headers=headers, timeout=dest.timeout_seconds)
    stored = 0
    for i in range(0, len(files), STOW_BATCH):
        batch = [pydicom.dcmread(f) for f in files[i:i + STOW_BATCH]]
        try:
            response = client.store_instances(batch)
        except requests.RequestException as exc:
            raise SendError(f"{dest.name}: STOW-RS to {dest.url} failed: {exc}") from None
        failed = getattr(response, "FailedSOPSequence", None) if response is not None else None
        if ledger is not None:
            refused = {str(getattr(item, "ReferencedSOPInstanceUID", "")): int(getattr(item, "FailureReason", 0xC000))
                       for item in failed or []}
            for ds in batch:
                ledger(str(ds.SOPInstanceUID), refused.get(str(ds.SOPInstanceUID), 0))
        if failed:
            item = failed[0]
            raise SendError(f"{dest.name}: STOW-RS refused {len(failed)} instances, e.g. "
                            f"{getattr(item, 'ReferencedSOPInstanceUID', '?')} (reason "
                            f"{hex(int(getattr(item, 'FailureReason', 0)))})")
        stored += len(batch)
    log.info("sent %d instances by STOW-RS to %s", stored, dest.name, **ctx(job, series, destination=dest.name))
    return stored


def deliver(files: list[Path], dest: Destination, calling_ae: str, max_pdu: int = 0,
            job: int | None = None, series: str | None = None,
            ledger: Callable[[str, int], None] | None = None) -> int:
    try:
        if dest.kind == "stow":
            return send_stow(files, dest, job, series, ledger)
        return send_dimse(files, dest, calling_ae, max_pdu, job, series, ledger)
    except SendError:
        raise
    except Exception as exc:  # noqa: BLE001 - network and library errors become a readable reason
        raise SendError(f"{dest.name}: {exc.__class__.__name__}: {exc}") from None
