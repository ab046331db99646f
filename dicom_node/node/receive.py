"""The DIMSE side of receiving: a pynetdicom SCP for Verification and the storage SOP classes.

Uncompressed transfer syntaxes are listed first: pynetdicom, as acceptor, picks the first
of ours that the caller offers, so a PACS that offers both sends uncompressed (no decode
cost for us). The compressed ones PACS commonly send are accepted too; the pipeline
decodes them with pylibjpeg/pyjpegls. Callers are checked against the allowlist by AE
title and host before any data flows.

Limits, so that no caller can take the node from the others: a PDU longer than our own
maximum is refused before a byte of it is buffered (the 6-byte header may claim 4 GiB);
connections are counted in total and per calling host at accept, before anything is read;
a caller that connects and sends no A-ASSOCIATE-RQ is dropped after ``request_seconds``,
an association that goes silent after ``idle_seconds``. Each refusal is logged and counted.

An association that ends without a release (an A-ABORT, a reset) brought a series that may
be cut short: its jobs wait for the sender's re-send instead of the quiet timer.

Ingest speed: a CT slice is half a megabyte, and pynetdicom reads sockets 4 KiB per
``recv`` and polls its reactor every millisecond. ``_BulkSocket`` reads each PDU with
``recv_into`` into one preallocated buffer, and the DUL polls ten times as often while
an association is open. Neither changes a byte on the wire. The poll delay was measured
again for issue 19 (a node process, 256 slices of 512x512 from storescu, alternating five
times each): median 138 instances/s against 124 with pynetdicom's 1 ms over one
association, 117 against 121 over four. The socket class
also carries the PDU bound, a security limit that pynetdicom's public API has no hook for.
pynetdicom's chunked receive (``STORE_RECV_CHUNKED_DATASET``) was measured for issue 19
and not adopted: storing nothing, it cost 2.97 ms of CPU per instance against 1.84 ms for
this path, and with an fsync per instance both received at the same rate (README).
``tools/bench.py ingest`` times the node beside Orthanc and storescp at 1, 2 and 4
associations.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import ssl
import threading
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pydicom.uid import JPEGLossless as JPEGLosslessP14
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dicom_node.config import NodeConfig, TlsConfig
from dicom_node.node.intake import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, Intake
from dicom_node.node.logs import ctx
from dicom_node.node.metrics import Metrics
from dicom_node.node.security import TlsAssociationServer, server_context
from dicom_node.node.send import no_delay

log = logging.getLogger("dicom_node.node.receive")

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian,  # preferred: no decoding
    JPEGLosslessSV1, JPEGLosslessP14, JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000,
    RLELossless, JPEGBaseline8Bit, JPEGExtended12Bit, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
]


@lru_cache(maxsize=256)
def _addresses(host: str) -> frozenset[str]:
    """The IP addresses a configured host name stands for (cached: DNS is slow and flaky)."""
    try:
        return frozenset(info[4][0] for info in socket.getaddrinfo(host, None))
    except OSError:
        return frozenset({host})


def caller_refusal(cfg: NodeConfig, ae_title: str, address: str) -> tuple[str, str] | None:
    """(metric label, reason) when the caller is refused, else None. "Unknown AE" and "wrong host"
    are told apart: they are different fixes on the PACS's side."""
    if cfg.accept_any_caller:
        return None
    title = ae_title.strip()
    hosts = [peer.host for peer in cfg.allowed if peer.ae_title.strip() == title]
    if not hosts:
        return "calling_ae", f"calling AE {title!r} is not in node.allowed"
    if any(host == address or address in _addresses(host) for host in hosts):
        return None
    return "host", f"calling AE {title!r} is allowed only from {', '.join(hosts)}, not from {address}"


DUL_POLL_SECONDS = 0.0001  # pynetdicom's default is 0.001: up to 1 ms idle per PDU round
MIN_PDU_BOUND = 1 << 20  # an A-ASSOCIATE-RQ with every storage class and syntax is ~60 KiB; P-DATA is ours to size
UNLIMITED_PDU_BOUND = 64 << 20  # node.max_pdu = 0 (unlimited): still no 4 GiB claims


def pdu_bound(max_pdu: int) -> int:
    """The longest PDU body we read: our own maximum (the peer's P-DATA must respect it), at least 1 MiB."""
    return max(MIN_PDU_BOUND, max_pdu) if max_pdu > 0 else UNLIMITED_PDU_BOUND


class PduTooLongError(OSError):
    """A PDU header claimed more than we accept; pynetdicom treats it as the connection closing."""


class _BulkSocket(AssociationSocket):
    """pynetdicom's socket, reading whole PDUs with recv_into instead of 4 KiB recv calls, and refusing
    a PDU longer than our bound before anything is allocated for it."""

    def recv(self, nr_bytes: int) -> bytearray:
        bound = pdu_bound(self.assoc.ae.maximum_pdu_size or 0)
        if nr_bytes > bound:
            try:
                peer = str(self.socket.getpeername()[0])  # type: ignore[union-attr]
            except (OSError, AttributeError):
                peer = "?"
            log.warning("connection from %s dropped: a PDU of %d bytes announced, more than the %d accepted",
                        peer, nr_bytes, bound, **ctx(peer=peer))
            if self.on_refused is not None:
                self.on_refused("pdu_too_long")
            self.refused = True
            raise PduTooLongError(f"PDU of {nr_bytes} bytes announced")
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        got = 0
        while got < nr_bytes:
            n = self.socket.recv_into(view[got:], nr_bytes - got)  # type: ignore[union-attr]
            if not n:  # peer closed: return what arrived, as pynetdicom's recv does
                del view
                return buf[:got]
            got += n
        return buf


    on_refused: Callable[[str], None] | None = None  # metric hook, set per association
    refused = False  # this connection was dropped for a PDU it announced


class NodeRequestHandler(RequestHandler):
    """The node's request handler: its socket class (the PDU bound) and poll delay; also used by the
    benchmark's bare SCPs, so that they read the wire exactly as the node does."""

    def handle(self) -> None:
        """pynetdicom's handle, but the request thread stays until the association ends: the server's
        connection count (``_LimitedServer``) is released when the connection is really gone."""
        assoc = self._create_association()
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        assoc.join()

    def _create_association(self):  # noqa: ANN202 - pynetdicom's own (untyped) hook
        assoc = super()._create_association()
        if type(assoc.dul.socket) is AssociationSocket:  # recv_into works on plain and TLS sockets alike
            assoc.dul.socket.__class__ = _BulkSocket
            assoc.dul.socket.on_refused = getattr(self.server, "on_refused", None)
        assoc.dul._run_loop_delay = DUL_POLL_SECONDS
        return assoc


class ConnectionLimits:
    """Open connections, in total and per calling host; thread-safe. ``admit`` says why not, or None."""

    def __init__(self, total: int, per_host: int) -> None:
        self.total, self.per_host = total, per_host
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def admit(self, host: str) -> str | None:
        with self._lock:
            if sum(self._open.values()) >= self.total:
                return f"{self.total} connections already open (node.max_connections)"
            if self._open.get(host, 0) >= self.per_host:
                return f"{self.per_host} connections already open from {host} (node.max_connections_per_host)"
            self._open[host] = self._open.get(host, 0) + 1
            return None

    def release(self, host: str) -> None:
        with self._lock:
            left = self._open.get(host, 0) - 1
            if left > 0:
                self._open[host] = left
            else:
                self._open.pop(host, None)

    def open(self) -> int:
        with self._lock:
            return sum(self._open.values())


def refuse_connection(host: str, why: str, on_refused: Callable[[str], None] | None) -> None:
    """Log and count a connection that ``ConnectionLimits.admit`` refused (``why``); the caller closes it.
    Shared by the one-process listener and the receiver pool's parent, which count the same limits."""
    log.warning("connection from %s refused: %s", host, why, **ctx(peer=host))
    if on_refused is not None:
        on_refused("per_host" if "from" in why else "total")


def listening_mode(tls: TlsConfig, on_tls: bool) -> str:
    """What the "DICOM listening" log line says about a port: nothing for plain DICOM."""
    if not on_tls:
        return ""
    return " over TLS" + (", client certificates required" if tls.require_client_cert else "")


def _host(client_address: object) -> str:
    return str(client_address[0]) if isinstance(client_address, tuple) else str(client_address)


class _LimitedServer:
    """Counts connections at accept (before a byte is read) against ``limits``; refusals are closed at once,
    logged and counted. Mixed in before pynetdicom's threaded server (plain or TLS)."""

    limits: ConnectionLimits
    on_refused: Callable[[str], None] | None = None  # (reason label), for metrics
    on_closed: Callable[[str], None] | None = None  # (calling host): a connection ended (receiver pool)

    def process_request(self, request: Any, client_address: Any) -> None:
        host = _host(client_address)
        why = self.limits.admit(host)
        if why is not None:
            refuse_connection(host, why, self.on_refused)
            self.shutdown_request(request)  # type: ignore[attr-defined]
            if self.on_closed is not None:
                self.on_closed(host)
            return
        try:
            super().process_request(request, client_address)  # type: ignore[misc]
        except BaseException:
            self.limits.release(host)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)  # type: ignore[misc]
        finally:
            self.limits.release(_host(client_address))
            if self.on_closed is not None:
                self.on_closed(_host(client_address))

    def shutdown(self) -> None:
        """Stop serve_forever and close the socket. pynetdicom's own shutdown also takes the server out of
        the AE's private server list, which only its start_server fills: ours were made with make_server."""
        socketserver.TCPServer.shutdown(self)  # type: ignore[arg-type]
        self.server_close()  # type: ignore[attr-defined]


class LimitedAssociationServer(_LimitedServer, ThreadedAssociationServer):
    pass


class LimitedTlsAssociationServer(_LimitedServer, TlsAssociationServer):
    pass


class _Handed:
    """A server that never binds or listens: in a receiver pool (receive_pool.py) the parent accepts each
    connection and hands it to one child, whose server then runs it as if it had accepted it itself."""

    def server_bind(self) -> None:
        pass

    def server_activate(self) -> None:
        pass

    def shutdown(self) -> None:
        """No serve_forever loop runs here (TCPServer.shutdown would wait for one forever)."""
        self.server_close()  # type: ignore[attr-defined]


class HandedAssociationServer(_Handed, LimitedAssociationServer):
    pass


class HandedTlsAssociationServer(_Handed, LimitedTlsAssociationServer):
    pass


class Receiver:
    """Owns the SCP: start it in the background, stop it on shutdown.

    ``listen=False`` is a receiver pool's child: nothing is bound, and the connections its parent
    accepted arrive through ``adopt``. Its hooks tell the parent what only this process sees.
    """

    def __init__(self, cfg: NodeConfig, intake: Intake, metrics: Metrics, *, listen: bool = True) -> None:
        self.cfg = cfg
        self.listen = listen
        # (job id, True): the first open association of this process began sending the job's series;
        # (job id, False): the last one ended. Called with the association lock held, so in order.
        self.on_job_senders: Callable[[int, bool], None] | None = None
        self.on_closed: Callable[[str], None] | None = None  # (calling host): a connection ended
        self.intake = intake
        self.metrics = metrics
        self.ae = AE(ae_title=cfg.ae_title)
        self.ae.maximum_pdu_size = cfg.max_pdu
        self.ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        self.ae.require_called_aet = False  # checked in _on_requested, where the refusal is logged and counted
        self.ae.maximum_associations = cfg.max_connections
        self.ae.acse_timeout = cfg.request_seconds  # ARTIM: connected, and no A-ASSOCIATE-RQ by then
        self.ae.network_timeout = cfg.idle_seconds
        self.limits = ConnectionLimits(cfg.max_connections, cfg.max_connections_per_host)
        self._assoc_jobs: dict[int, tuple[str, set[int], int]] = {}  # id(assoc) -> (peer, jobs, instances)
        self._job_assocs: dict[int, set[int]] = {}  # job id -> the open associations that sent it instances
        self._assoc_refused: set[int] = set()  # associations that had an instance refused: no completion hint
        self._assoc_lock = threading.Lock()
        self._requested: set[int] = set()  # associations whose A-ASSOCIATE-RQ arrived
        self.server: ThreadedAssociationServer | None = None
        self.plain_server: ThreadedAssociationServer | None = None  # node.tls.keep_plain: the old port as well

    def start(self) -> None:
        handlers = [(evt.EVT_CONN_OPEN, no_delay), (evt.EVT_REQUESTED, self._on_requested),
                    (evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo),
                    (evt.EVT_RELEASED, self._on_released), (evt.EVT_ABORTED, self._on_ended),
                    (evt.EVT_CONN_CLOSE, self._on_ended)]
        tls = self.cfg.tls
        context = server_context(tls) if tls.enabled else None  # TLS replaces the plain listener unless keep_plain
        self.server = self._listen(tls.port if tls.enabled else self.cfg.port, handlers, context)
        if tls.enabled and tls.keep_plain:
            self.plain_server = self._listen(self.cfg.port, handlers, None)

    def _listen(self, port: int, handlers: list, context: ssl.SSLContext | None) -> ThreadedAssociationServer:
        if self.listen:
            server_class = LimitedTlsAssociationServer if context is not None else LimitedAssociationServer
        else:
            server_class = HandedTlsAssociationServer if context is not None else HandedAssociationServer
        server = self.ae.make_server((self.cfg.host, port), evt_handlers=handlers, ssl_context=context,
                                     server_class=server_class, request_handler=NodeRequestHandler)
        assert isinstance(server, _LimitedServer)
        server.limits = self.limits
        server.on_closed = self.on_closed
        refused = self.metrics.connections_refused
        server.on_refused = lambda label: refused.labels("dimse", label).inc()
        if isinstance(server, TlsAssociationServer):
            server.handshake_seconds = self.cfg.tls.handshake_seconds
            server.on_tls_refused = lambda _address, _why: self.metrics.associations_rejected.labels("tls").inc()
        if not self.listen:
            server.socket.close()  # made by TCPServer, never bound: connections come through adopt()
            return server
        threading.Thread(target=server.serve_forever, name="dimse-acceptor", daemon=True).start()
        log.info("DICOM listening on %s:%d as %s%s", self.cfg.host, port, self.cfg.ae_title,
                 listening_mode(self.cfg.tls, context is not None), **ctx())
        return server

    def adopt(self, sock: socket.socket, address: tuple[str, int], tls: bool) -> None:
        """Run a connection that a receiver pool's parent accepted, on the TLS port (``tls``) or the plain
        one, exactly as if this process had accepted it (the handshake too: in the connection's thread)."""
        server = self.server if tls == self.cfg.tls.enabled else self.plain_server
        if server is None:
            sock.close()
            return
        if server.ssl_context is not None:
            sock = server.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        server.process_request(sock, address)

    def stop(self) -> None:
        for server in (self.server, self.plain_server):
            if server is not None:
                server.shutdown()
        self.server = self.plain_server = None

    def _on_requested(self, event: Event) -> None:
        with self._assoc_lock:
            self._requested.add(id(event.assoc))
        req = event.assoc.requestor
        # At this point only the A-ASSOCIATE-RQ primitive carries the AE titles.
        calling = str(getattr(req.primitive, "calling_ae_title", "") or req.ae_title or "").strip()
        called = str(getattr(req.primitive, "called_ae_title", "") or "").strip()
        refusal = caller_refusal(self.cfg, calling, req.address)
        diagnostic = 0x03  # calling AE title not recognised
        if refusal is None and self.cfg.check_called_ae and called != self.cfg.ae_title.strip():
            refusal = "called_ae", f"called AE {called!r} is not ours ({self.cfg.ae_title!r})"
            diagnostic = 0x07  # called AE title not recognised
        if refusal is not None:
            label, why = refusal
            self.metrics.associations_rejected.labels(label).inc()
            log.warning("association from %s rejected: %s", req.address, why,
                        **ctx(peer=f"{calling}@{req.address}", calling_ae=calling, reason=label))
            event.assoc.acse.send_reject(0x01, 0x01, diagnostic)  # permanent, service user
            event.assoc.kill()  # as pynetdicom's own rejections do: lets the DUL flush the A-ASSOCIATE-RJ

    def _on_released(self, event: Event) -> None:
        """A release is the sender saying it is done: each series it brought whose other senders (if any)
        are done too is a completion hint (see completion.py)."""
        with self._assoc_lock:
            peer, jobs, count = self._assoc_jobs.pop(id(event.assoc), ("", set(), 0))
            done = self._forget(id(event.assoc), jobs)
            if id(event.assoc) in self._assoc_refused:
                self._assoc_refused.discard(id(event.assoc))
                done = []  # the sender may re-send what was refused: the quiet timer decides
        self.intake.released(done, f"the association from {peer} was released after {count} instances")

    def _forget(self, assoc: int, jobs: set[int]) -> list[int]:
        """Take an ended association off its jobs; returns the jobs no open association is sending (lock held)."""
        done = []
        for job_id in jobs:
            senders = self._job_assocs.get(job_id, set())
            senders.discard(assoc)
            if not senders:
                self._job_assocs.pop(job_id, None)
                done.append(job_id)
                if self.on_job_senders is not None:
                    self.on_job_senders(job_id, False)
        return done

    def _on_ended(self, event: Event) -> None:
        """Aborted or closed without a release: what this association brought may be cut short. A connection
        that never sent an A-ASSOCIATE-RQ (request_seconds ran out, or the caller gave up) is logged and counted."""
        with self._assoc_lock:
            peer, jobs, count = self._assoc_jobs.pop(id(event.assoc), ("", set(), 0))
            self._forget(id(event.assoc), jobs)  # no hint: what it brought may be cut short
            self._assoc_refused.discard(id(event.assoc))
            requested = id(event.assoc) in self._requested
            self._requested.discard(id(event.assoc))
        if not requested and event.event is evt.EVT_CONN_CLOSE and not getattr(event.assoc.dul.socket, "refused",
                                                                                False):
            host = str(event.assoc.requestor.address or "?")
            self.metrics.connections_refused.labels("dimse", "no_request").inc()
            log.warning("connection from %s closed without an association request (node.request_seconds = %g)",
                        host, self.cfg.request_seconds, **ctx(peer=host))
        if not jobs:
            return
        self.metrics.aborted_associations.inc()
        reason = (f"incomplete: the association from {peer} ended without a release after {count} instances; "
                  "waiting for the sender to send the series again")
        try:
            for job_id in self.intake.store.mark_incomplete(sorted(jobs), reason):
                log.warning("%s", reason, **ctx(job_id, peer=peer))
        except Exception:  # noqa: BLE001 - the database failing must not take the listener with it
            log.exception("could not mark aborted series incomplete", **ctx(peer=peer))

    def _on_echo(self, event: Event) -> int:
        return 0x0000

    def _on_store(self, event: Event) -> int:
        status = self._store(event)
        if status != 0x0000:
            with self._assoc_lock:
                self._assoc_refused.add(id(event.assoc))
        return status

    def _store(self, event: Event) -> int:
        """Spool first, answer after: success means the instance is on disk."""
        try:
            data = event.encoded_dataset()
        except Exception as exc:  # noqa: BLE001 - a broken request must not take the server down
            log.error("C-STORE could not be read: %s", exc, **ctx())
            return CANNOT_UNDERSTAND
        try:
            ds = event.dataset
        except Exception as exc:  # noqa: BLE001 - e.g. sequences nested past the decoder's recursion limit
            return self.intake.refuse(data, "", "", "dimse", CANNOT_UNDERSTAND, "cannot_understand",
                                      f"the data set cannot be decoded ({exc.__class__.__name__}: "
                                      f"{str(exc)[:200]})").status
        try:
            accepted = self.intake.accept(data, ds, "dimse")
            if accepted.job_id is not None:
                with self._assoc_lock:
                    peer, jobs, count = self._assoc_jobs.setdefault(
                        id(event.assoc), (f"{event.assoc.requestor.ae_title}@{event.assoc.requestor.address}",
                                          set(), 0))
                    jobs.add(accepted.job_id)
                    self._assoc_jobs[id(event.assoc)] = (peer, jobs, count + 1)
                    if accepted.job_id not in self._job_assocs and self.on_job_senders is not None:
                        self.on_job_senders(accepted.job_id, True)
                    self._job_assocs.setdefault(accepted.job_id, set()).add(id(event.assoc))
            return accepted.status
        except Exception as exc:  # noqa: BLE001 - never let a handler crash the association thread
            log.exception("C-STORE failed: %s", exc, **ctx())
            return OUT_OF_RESOURCES
