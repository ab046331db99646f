"""The DIMSE side of receiving: a pynetdicom SCP for Verification and the storage SOP classes.

Uncompressed transfer syntaxes are listed first: pynetdicom, as acceptor, picks the first
of ours that the caller offers, so a PACS that offers both sends uncompressed (no decode
cost for us). The compressed ones PACS commonly send are accepted too; the pipeline
decodes them with pylibjpeg/pyjpegls. Callers are checked against the allowlist by AE
title and host before any data flows.

Ingest speed: a CT slice is half a megabyte, and pynetdicom reads sockets 4 KiB per
``recv`` and polls its reactor every millisecond. ``_BulkSocket`` reads each PDU with
``recv_into`` into one preallocated buffer, and the DUL polls ten times as often while
an association is open. Neither changes a byte on the wire; measured, they help little
(151 -> 159 instances/s on a loaded machine): the per-instance fsync and pynetdicom's
own receive path dominate. ``tools/bench.py ingest --ceiling`` times bare pynetdicom SCPs
beside the node to show how much of the gap to DCMTK's storescp is pynetdicom's.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from functools import lru_cache

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

from ..config import NodeConfig
from .assemble import OUT_OF_RESOURCES, Intake
from .logs import ctx
from .metrics import Metrics
from .security import TlsAssociationServer, server_context
from .send import no_delay

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


def caller_allowed(cfg: NodeConfig, ae_title: str, address: str) -> bool:
    """True when (calling AE title, peer address) matches an allowlist entry."""
    return caller_refusal(cfg, ae_title, address) is None


DUL_POLL_SECONDS = 0.0001  # pynetdicom's default is 0.001: up to 1 ms idle per PDU round


class _BulkSocket(AssociationSocket):
    """pynetdicom's socket, reading whole PDUs with recv_into instead of 4 KiB recv calls."""

    def recv(self, nr_bytes: int) -> bytearray:
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


class _BulkRequestHandler(RequestHandler):
    def _create_association(self):  # noqa: ANN202 - pynetdicom's own (untyped) hook
        assoc = super()._create_association()
        if type(assoc.dul.socket) is AssociationSocket:  # recv_into works on plain and TLS sockets alike
            assoc.dul.socket.__class__ = _BulkSocket
        assoc.dul._run_loop_delay = DUL_POLL_SECONDS
        return assoc


class Receiver:
    """Owns the SCP: start it in the background, stop it on shutdown."""

    def __init__(self, cfg: NodeConfig, intake: Intake, metrics: Metrics) -> None:
        self.cfg = cfg
        self.intake = intake
        self.metrics = metrics
        self.ae = AE(ae_title=cfg.ae_title)
        self.ae.maximum_pdu_size = cfg.max_pdu
        self.ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        self.ae.require_called_aet = cfg.check_called_ae
        self.server: ThreadedAssociationServer | None = None
        self.plain_server: ThreadedAssociationServer | None = None  # node.tls.keep_plain: the old port as well

    def start(self) -> None:
        handlers = [(evt.EVT_CONN_OPEN, no_delay), (evt.EVT_REQUESTED, self._on_requested),
                    (evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo)]
        tls = self.cfg.tls
        context = server_context(tls) if tls.enabled else None  # TLS replaces the plain listener unless keep_plain
        self.server = self._listen(tls.port if tls.enabled else self.cfg.port, handlers, context)
        if tls.enabled and tls.keep_plain:
            self.plain_server = self._listen(self.cfg.port, handlers, None)

    def _listen(self, port: int, handlers: list, context: ssl.SSLContext | None) -> ThreadedAssociationServer:
        server_class = TlsAssociationServer if context is not None else ThreadedAssociationServer
        server = self.ae.make_server((self.cfg.host, port), evt_handlers=handlers, ssl_context=context,
                                     server_class=server_class, request_handler=_BulkRequestHandler)
        if isinstance(server, TlsAssociationServer):
            server.handshake_seconds = self.cfg.tls.handshake_seconds
            server.on_refused = lambda _address, _why: self.metrics.associations_rejected.labels("tls").inc()
        threading.Thread(target=server.serve_forever, name="dimse-acceptor", daemon=True).start()
        self.ae._servers.append(server)
        mode = (" over TLS" + (", client certificates required" if self.cfg.tls.require_client_cert else "")
                if context is not None else "")
        log.info("DICOM listening on %s:%d as %s%s", self.cfg.host, port, self.cfg.ae_title, mode, **ctx())
        return server

    def stop(self) -> None:
        for server in (self.server, self.plain_server):
            if server is not None:
                server.shutdown()
        self.server = self.plain_server = None

    def _on_requested(self, event: Event) -> None:
        req = event.assoc.requestor
        # At this point only the A-ASSOCIATE-RQ primitive carries the caller's AE title.
        calling = str(getattr(req.primitive, "calling_ae_title", "") or req.ae_title or "").strip()
        refusal = caller_refusal(self.cfg, calling, req.address)
        if refusal is not None:
            label, why = refusal
            self.metrics.associations_rejected.labels(label).inc()
            log.warning("association from %s rejected: %s", req.address, why,
                        **ctx(peer=f"{calling}@{req.address}", calling_ae=calling, reason=label))
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognised
            event.assoc.kill()  # as pynetdicom's own rejections do: lets the DUL flush the A-ASSOCIATE-RJ

    def _on_echo(self, event: Event) -> int:
        return 0x0000

    def _on_store(self, event: Event) -> int:
        """Spool first, answer after: success means the instance is on disk."""
        try:
            data = event.encoded_dataset()
            ds = event.dataset
        except Exception as exc:  # noqa: BLE001 - a broken request must not take the server down
            log.error("C-STORE could not be decoded: %s", exc, **ctx())
            return 0xC000
        try:
            return self.intake.accept(data, ds, "dimse").status
        except Exception as exc:  # noqa: BLE001 - never let a handler crash the association thread
            log.exception("C-STORE failed: %s", exc, **ctx())
            return OUT_OF_RESOURCES
