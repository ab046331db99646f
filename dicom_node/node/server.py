"""Wire the node together and run it until SIGINT/SIGTERM.

Start order matters: the job database recovers interrupted work before anything new
arrives, the engine is built (and the model checked) before we accept a single
instance, and the HTTP server runs in the main thread so uvicorn handles the signals.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from dicom_node.config import Config
from dicom_node.node.completion import CompletionTimer
from dicom_node.node.intake import Intake
from dicom_node.node.jobs import JobStore
from dicom_node.node.logs import ctx
from dicom_node.node.metrics import Metrics
from dicom_node.node.receive import Receiver
from dicom_node.node.spool import Spool
from dicom_node.node.worker import Workers

log = logging.getLogger("dicom_node.node.server")


@dataclass
class Node:
    """Every running part, so tests can start a node in-process and stop it cleanly."""

    cfg: Config
    spool: Spool
    store: JobStore
    metrics: Metrics
    intake: Intake
    receiver: Receiver
    completion: CompletionTimer
    workers: Workers
    info: dict[str, Any]

    def stop(self) -> None:
        self.receiver.stop()
        self.completion.stop.set()
        self.workers.shutdown()
        self.completion.join(5)
        self.store.close()


def start(cfg: Config, backend_name: str | None = None) -> Node:
    """Build and start everything except the HTTP server; raises on a bad model or a busy port."""
    from dicom_node.backends.select import model_id, select

    # Loads the model now, so a bad one fails the start, not the first job; each job's child loads its own.
    backend, why = select(backend_name or cfg.engine.backend, cfg.engine.model, cfg.engine.threads,
                          cfg.engine.batch)
    spool = Spool(cfg.spool.dir, cfg.spool.min_free_mb, cfg.spool.durability, cfg.spool.quarantine_mb)
    store = JobStore(spool.db_path)
    for job in store.recover():
        log.info("resuming: %s", job.reason, **ctx(job.id, job.series_uid))
    mid = model_id(cfg.engine.model)
    log.info("backend: %s; model %s", why, mid, **ctx())
    metrics = Metrics(store)
    intake = Intake(spool, store, metrics, cfg.intake)
    wake = threading.Event()
    workers = Workers(cfg, spool, store, metrics, backend.name, mid, wake)
    completion = CompletionTimer(cfg, spool, store, metrics, wake)
    receiver = Receiver(cfg.node, intake, metrics)
    receiver.start()
    workers.start()
    completion.start()
    info = {"ae_title": cfg.node.ae_title, "dicom_port": cfg.node.port, "http_port": cfg.http.port,
            "backend": why, "model": mid, "spool": str(spool.root),
            "destinations": [d.name for d in cfg.destinations]}
    return Node(cfg, spool, store, metrics, intake, receiver, completion, workers, info)


def serve(cfg: Config, backend_name: str | None = None) -> int:
    """Run the node in the foreground; returns the exit code."""
    import uvicorn

    from dicom_node.node.http import create_app, header_deadline_protocol
    from dicom_node.node.pages import check_viewer_template
    from dicom_node.node.security import check_http, http_tokens

    check_viewer_template(cfg.viewer.url_template)  # a bad template stops the start, not every job link
    tokens = http_tokens(cfg.http)  # before anything listens: an open network-facing HTTP server is refused
    for warning in check_http(cfg.http, tokens):
        log.warning("%s", warning, **ctx())
    node = start(cfg, backend_name)
    try:
        app = create_app(node.store, node.intake, node.metrics, node.info, tokens, cfg.http,
                         pictures=node.spool.pictures_root, viewer_url_template=cfg.viewer.url_template)
        scheme = "https" if cfg.http.cert else "http"
        log.info("HTTP on %s://%s:%d (jobs page /, STOW-RS /dicomweb/studies); %s", scheme, cfg.http.host,
                 cfg.http.port, f"bearer token required except on /healthz ({len(tokens)} configured)" if tokens
                 else "no authentication", **ctx())
        tls = {"ssl_certfile": cfg.http.cert, "ssl_keyfile": cfg.http.key} if cfg.http.cert else {}
        timed_out = node.metrics.connections_refused.labels("http", "header_timeout")
        protocol = header_deadline_protocol(cfg.http.header_seconds, lambda _client: timed_out.inc())
        server = uvicorn.Server(uvicorn.Config(app, host=cfg.http.host, port=cfg.http.port, log_config=None,
                                               access_log=False, http=protocol,
                                               limit_concurrency=cfg.http.max_connections, **tls))
        server.run()
    finally:
        log.info("shutting down", **ctx())
        node.stop()
    return 0
